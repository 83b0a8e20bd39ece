"""`python -m specdsl` is the `specdsl` command (useful where the console script is not on PATH)."""

from specdsl.cli import entry

entry()
