"""Synthetic probes: kinds, the scheduler that runs them, and the `Result` records they produce.

This package imports nothing from `controller`: agents inside regions run it on its own.
"""
