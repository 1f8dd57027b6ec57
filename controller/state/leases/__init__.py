"""Lease backends, one module each (see `controller.state.lease` for the protocol)."""
