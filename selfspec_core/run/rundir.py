"""The run directory: one folder per stage, atomic writes, manifests, resumable record files.

A stage works in ``<run>/<stage>.partial/`` and, when it is done, writes its manifest and renames
the folder to ``<run>/<stage>/`` in one step, so a finished stage is never half-written. Records of
long stages are appended to JSONL in flushed, fsynced chunks; a torn last line (a kill mid-write)
is cut off on resume and never parsed as data.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from selfspec_core import __version__
from selfspec_core.errors import SelfspecError
from selfspec_core.jsonl import numbered_rows

STAGES = ("generate", "respond", "train", "evaluate", "report")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def safe_name(name: str, what: str) -> str:
    """Refuse names that could escape the runs folder (``../x``, ``/abs``) or are not portable."""
    if not _SAFE_NAME.match(name) or ".." in name:
        raise SelfspecError(f"invalid {what} {name!r}: use letters, digits, '-', '_' and '.' only")
    return name


def stage_command(domain: str, stage: str, run_path: Path) -> str:
    """The command line that runs ``stage`` of ``domain`` on ``run_path``, as a user can paste it."""
    return shlex.join(["selfspec", stage, "--domain", domain, "--out", str(run_path)])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SelfspecError(
            f"{path}: could not write ({exc.strerror}); free space or fix permissions and rerun"
        ) from exc
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_json(path: Path):
    """The JSON value in ``path``, or None when the file is missing or unreadable (a stage not run, a
    torn write): for readers that show what is there and leave out what is not."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def dump_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(dump_line(r) for r in records))


def read_jsonl(path: Path) -> list[dict]:
    """Read complete JSONL records; an unterminated last line (torn write) is ignored."""
    return list(iter_jsonl(path))


def iter_jsonl(path: Path) -> Iterator[dict]:
    """The JSON objects of ``path``, one a line, up to an unterminated last line (a torn write); a line
    that is not one raises ValueError naming it."""
    with open(path, "rb") as handle:
        complete = itertools.takewhile(lambda line: line.endswith(b"\n"), handle)
        for _, record in numbered_rows(complete):
            yield record


def file_hash(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        try:
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except OSError as exc:
            raise SelfspecError(f"{path}: cannot read ({exc.strerror}); it must be a readable file") from None
    return digest.hexdigest()[:16]


class RecordLog:
    """Append-only JSONL of finished records, written in fsynced chunks, resumable after a kill."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_torn_tail()
        try:
            self.records = read_jsonl(self.path) if self.path.exists() else []
        except ValueError as exc:
            raise SelfspecError(
                f"{self.path}: corrupt record log ({exc}); delete {self.path.parent} to start that stage again"
            ) from None

    def _truncate_torn_tail(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(end)

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write("".join(dump_line(r) for r in records))
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise SelfspecError(
                f"{self.path}: could not write ({exc.strerror}); free space and rerun to resume"
            ) from exc
        self.records.extend(records)


class RunDir:
    """A run's folder: resolved config, one folder per stage, each with ``manifest.json``."""

    def __init__(self, path: Path, domain: str):
        self.path = Path(path)
        self.domain = domain

    def open(self) -> RunDir:
        """Create the run folder, or check an existing one belongs to this domain and version."""
        info_path = self.path / "run.json"
        if info_path.exists():
            try:
                info = json.loads(info_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                info = None
            if not isinstance(info, dict):
                raise SelfspecError(f"{info_path}: corrupt run file; use a new --out directory")
            if info.get("domain") != self.domain:
                raise SelfspecError(
                    f"{self.path}: this run directory belongs to domain {info.get('domain')!r}, not "
                    f"{self.domain!r}; pass --out with a new directory"
                )
            if str(info.get("version", "")).split(".")[:2] != __version__.split(".")[:2]:
                raise SelfspecError(
                    f"{self.path}: made by selfspec {info.get('version')}, this is {__version__}; "
                    "start a new run with --out"
                )
        elif self.path.exists() and any(self.path.iterdir()):
            raise SelfspecError(f"{self.path}: exists and is not a selfspec run directory; pass another --out")
        else:
            atomic_write_json(info_path, {"domain": self.domain, "version": __version__})
        return self

    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    def partial_dir(self, stage: str) -> Path:
        """Working folder of an unfinished stage; kept across kills so the stage can resume."""
        path = self.path / f"{stage}.partial"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def manifest(self, stage: str) -> dict | None:
        path = self.stage_dir(stage) / "manifest.json"
        if not path.exists():
            return None
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return manifest if isinstance(manifest, dict) else None  # anything else: not sealed

    def is_fresh(self, stage: str, config_hash: str, input_hash: str) -> bool:
        manifest = self.manifest(stage)
        return (
            manifest is not None
            and manifest.get("config_hash") == config_hash
            and manifest.get("input_hash") == input_hash
        )

    def finish(self, stage: str, manifest: dict) -> Path:
        """Seal a stage: write its manifest into the partial folder, then swap it into place."""
        partial = self.partial_dir(stage)
        manifest = {"stage": stage, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **manifest}
        atomic_write_json(partial / "manifest.json", manifest)
        final = self.stage_dir(stage)
        if final.exists():
            trash = self.path / f".{stage}.old"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(partial, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(partial, final)
        _fsync_dir(self.path)
        return final

    def discard_partial(self, stage: str) -> None:
        shutil.rmtree(self.path / f"{stage}.partial", ignore_errors=True)

    def require(self, stage: str, file: str) -> Path:
        """Path of a finished stage's output, or an error saying which command makes it."""
        path = self.stage_dir(stage) / file
        if self.manifest(stage) is None or not path.exists():
            raise SelfspecError(f"{path} is missing: run `{stage_command(self.domain, stage, self.path)}` first")
        return path

    @contextmanager
    def locked(self):
        """Hold the run directory for this process: a second command on it stops at once, naming this one.

        The lock is an OS file lock (filelock: flock on POSIX), which the kernel releases when its
        process dies, so a lock left by a killed command is taken over by the next one; the holder's
        pid, host and command line are written beside it only to be named in that message.
        """
        from filelock import FileLock, Timeout

        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.path / ".lock", timeout=0, preserve_lock_file=True)
        holder = self.path / ".lock.holder.json"
        try:
            lock.acquire()
        except Timeout:
            raise SelfspecError(
                f"{self.path} is in use by {_describe_holder(holder)}; wait for it to finish "
                "(or stop it) and rerun, or pass another --out"
            ) from None
        except OSError as exc:
            raise SelfspecError(
                f"{self.path}: cannot lock the run directory ({exc.strerror}); "
                "check its permissions or pass another --out"
            ) from None
        try:
            atomic_write_json(
                holder,
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "command": shlex.join(["selfspec", *sys.argv[1:]]),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                },
            )
            yield self
        finally:
            holder.unlink(missing_ok=True)
            lock.release()


def _describe_holder(holder: Path) -> str:
    """'process 123 on host (selfspec run ..., since ...)', or less when the holder has not written it yet."""
    try:
        info = json.loads(holder.read_text(encoding="utf-8"))
        return f"process {int(info['pid'])} on {info['host']} ({info['command']!s}, since {info['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another selfspec process"
