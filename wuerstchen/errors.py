"""The one exception type for mistakes in what a user asked for.

The command line prints a `UserError` as one line and exits with code 2; every other exception
keeps its traceback, so a real bug is never mistaken for a typo.
"""


class UserError(ValueError):
    """A mistake in what the user asked for (a value out of range, a missing file): one line, exit 2."""
