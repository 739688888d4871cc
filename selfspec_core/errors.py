"""User-facing problems: the one exception type the CLI turns into a one-line message and exit code 2, and
the one-line warning for a problem a run works around."""

import difflib
import sys
from collections.abc import Iterable


class SelfspecError(Exception):
    """A problem the user can fix: the message says what is wrong, where, and what to do."""

    exit_code = 2


def print_warning(message: str) -> None:
    """A problem the run works around (a skipped document, say): one line on stderr."""
    print(f"warning: {message}", file=sys.stderr)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to a misspelled ``word``; "" when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """What ``exc`` says, cut to its first line (a library's message may run on for pages); its type's
    name when it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
