"""The one exception type for mistakes in what a user asked for.

The command line prints a `UserError` as one line and exits with code 2; every other exception
keeps its traceback, so a real bug is never mistaken for a typo.
"""


class UserError(ValueError):
    """A mistake in what the user asked for (a value out of range, a missing file): one line, exit 2.

    `param`: the argument at fault where one is (the HTTP API answers it as OpenAI's `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
