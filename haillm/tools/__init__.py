"""Command-line tools (run with ``python -m haillm.tools.<name>``)."""
