"""The one exception type the CLI turns into a one-line message and exit code 2."""


class SelfspecError(Exception):
    """A problem the user can fix: the message says what is wrong, where, and what to do."""

    exit_code = 2
