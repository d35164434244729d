"""The one exception type the CLI turns into a message and exit code 2."""


class DataError(Exception):
    """One-line, user-facing: names the problem and the fix."""
