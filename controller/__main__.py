"""`python -m controller` is `regionshift`."""

import sys

from controller.cli import main

sys.exit(main())
