"""Errors the CLI turns into one line on stderr and exit code 2."""


class UsageError(Exception):
    """A flag value the run cannot honour; the message names it and the fix."""
