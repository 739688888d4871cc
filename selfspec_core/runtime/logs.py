"""What reaches the console: selfspec's own lines; third-party warnings and log records go to a file.

Libraries under selfspec (transformers, bitsandbytes, peft, torch) warn about things a user of
selfspec cannot act on (a missing optional CPU kernel, a deprecated argument selfspec does not
pass). Those records are kept in memory until the command knows its run directory, then written
to ``<run>/selfspec.log``; a command without a run directory writes them to
``<cache>/logs/selfspec.log``. Errors a user can act on are selfspec's own and still reach stderr.
"""

from __future__ import annotations

import atexit
import collections
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress

LOG_NAME = "selfspec.log"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _FileWhenKnown(logging.Handler):
    """Buffers records (the newest 10,000) until :meth:`attach` names the file, then appends there."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter(_FORMAT))
        self.pending: collections.deque[logging.LogRecord] = collections.deque(maxlen=10_000)
        self.target: logging.FileHandler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.target is None:
            self.pending.append(record)
        else:
            self.target.handle(record)

    def attach(self, path: Path) -> None:
        if self.target is not None and Path(self.target.baseFilename) == path.resolve():
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            target = logging.FileHandler(path, encoding="utf-8", delay=True)
        except OSError:
            return  # an unwritable log must not stop the run; the records stay buffered
        target.setFormatter(self.formatter)
        if self.target is not None:
            self.target.close()
        self.target = target
        while self.pending:
            target.handle(self.pending.popleft())

    def close(self) -> None:
        if self.target is not None:
            self.target.close()
        super().close()


_handler: _FileWhenKnown | None = None


def capture() -> None:
    """Route Python warnings and every library's log records away from the console (once per process)."""
    global _handler
    if _handler is not None:
        return
    _handler = _FileWhenKnown()
    root = logging.getLogger()
    root.addHandler(_handler)  # with a handler on the root, logging's last-resort stderr printer stays silent
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    atexit.register(_write_leftovers)


def adopt_library_loggers() -> None:
    """Send transformers' records, which it prints through a stderr handler of its own, to the log file too,
    and switch off its progress bars.

    Called once a command is about to load a model: transformers is imported by then anyway.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()  # "Loading weights" bars: selfspec reports its own progress


def progress_bar(stage: str) -> Progress:
    """The console's progress bar of a stage (on stderr, so stdout stays the command's own output)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn(f"[bold]{stage}[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )


def write_to(path: Path) -> None:
    """From now on (and for what was buffered) the log file is ``path``."""
    if _handler is not None:
        _handler.attach(Path(path))


def log_path() -> Path | None:
    """The file the records go to, once known."""
    return Path(_handler.target.baseFilename) if _handler is not None and _handler.target is not None else None


def _write_leftovers() -> None:
    if _handler is not None and _handler.target is None and _handler.pending:
        from selfspec_core.runtime.cache import cache_dir

        _handler.attach(cache_dir() / "logs" / LOG_NAME)
