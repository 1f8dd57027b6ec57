"""Route 53 errors, as the project's own: retryable (throttling, a change still applying, a server
or network fault) or terminal (invalid batch, access denied, no credentials), and drift (a hand
edit found where the last written weights should be). The actuator translates SDK exceptions
into these; everything else reads them without importing boto3."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping


class Route53Error(Exception):
    """Something went wrong talking to Route 53."""

    kind = "error"


class RetryableError(Route53Error):
    """Try again later: throttling, a change still applying, a server or network fault."""

    kind = "retryable"


class TerminalError(Route53Error):
    """Retrying will not help: the batch is invalid, access is denied, the zone is missing."""

    kind = "terminal"


class NoCredentialsError(TerminalError):
    """boto3 found no AWS credentials at all: nothing was asked of Route 53."""

    kind = "no_credentials"


class DriftError(Route53Error):
    """Route 53 holds weights other than the ones last written: someone changed them."""

    def __init__(
        self, record: str, expected: Mapping[str, int], observed: Mapping[str, int | None], *, written: bool = True
    ) -> None:
        changed = {
            k: (expected.get(k), observed.get(k))
            for k in sorted(set(expected) | set(observed))
            if expected.get(k) != observed.get(k)
        }
        # Before its first write, what regionshift compares with is what it first saw there.
        verb, basis = (
            ("wrote", "the ones last written") if written else ("saw", "the ones first seen (none written yet)")
        )
        detail = ", ".join(f"{k}: {verb} {e}, found {o}" for k, (e, o) in changed.items())
        super().__init__(f"{record}: Route 53 holds weights other than {basis} ({detail})")
        self.record = record
        self.expected = dict(expected)
        self.observed = dict(observed)


# How a Route 53 error is counted (regionshift_route53_errors_total{kind}).
ERROR_KINDS = tuple(e.kind for e in (RetryableError, TerminalError, NoCredentialsError))


# Why a request was tried again, as `regionshift_route53_retries_total` counts it (a few causes:
# the raw codes would be a label without bound).
RETRY_CAUSES = ("throttling", "prior_request", "server", "network", "timeout")
OPERATIONS = ("list_resource_record_sets", "change_resource_record_sets", "get_change")


def retry_cause(error: Route53Error) -> str:
    """The cause of a retryable error, one of `RETRY_CAUSES`."""
    said = str(error)
    if said.startswith(("Throttling", "429")):
        return "throttling"
    if said.startswith("PriorRequestNotComplete"):
        return "prior_request"
    if said.startswith("network"):
        return "timeout" if "timeout" in said.lower() or "timed out" in said.lower() else "network"
    if "Timeout" in said.split(":", 1)[0]:
        return "timeout"
    return "server"
