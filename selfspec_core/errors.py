"""User-facing problems: the one exception type the CLI turns into a one-line message and exit code 2, and
the one-line warning for a problem a run works around."""

import sys


class SelfspecError(Exception):
    """A problem the user can fix: the message says what is wrong, where, and what to do."""

    exit_code = 2


def print_warning(message: str) -> None:
    """A problem the run works around (a skipped document, say): one line on stderr."""
    print(f"warning: {message}", file=sys.stderr)
