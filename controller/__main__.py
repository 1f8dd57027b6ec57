"""`python -m controller` is `regionshift`."""

import sys

from controller.entry import main

sys.exit(main())
