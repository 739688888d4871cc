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


# How much of what a library says goes into a one-line error: its message may run on for pages.
LIBRARY_MESSAGE_LIMIT = 300


def one_line(message: object, limit: int | None = None) -> str:
    """What ``message`` (an exception or text) says, as one line: a library's message inside it may
    span several. ``limit`` cuts it; an exception that says nothing gives its type's name."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    if not text and isinstance(message, BaseException):
        text = type(message).__name__
    return text[:limit] if limit is not None else text
