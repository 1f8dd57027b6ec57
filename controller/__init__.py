"""regionshift's controller: configuration, windows and verdicts, the daemon, its API and CLI."""
