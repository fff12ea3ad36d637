"""Output folders todi owns: a marker, an exclusive lock, and an ``--overwrite`` that cannot delete your data.

Every command that writes a folder (``sft``, ``distill``, ``cache-teacher``, ``init-student``, ``eval``,
``judge``, ``demo``) goes through :class:`OutputFolder`:

* **Marker.** ``.todi-output.json`` names the command and a run id. ``--overwrite`` replaces only a
  folder whose marker names a command of the same kind (a training run by a training run, a cache by a
  cache, ...); a folder without one is never deleted, whatever files it holds.
* **Inputs.** ``--out`` may never be, or contain, an input (``--teacher``, ``--student``, ``--model``,
  ``--from``, ``--teacher-cache``, ``--data``, ``--dev``): the run would write over what it reads. With
  ``--overwrite`` it may not lie inside one either.
* **Late and reversible replacement.** The old folder is moved aside (``.NAME.todi-old-RUNID`` beside it)
  only once the inputs have loaded (:meth:`OutputFolder.replace_old`), and deleted only when the command
  succeeds. When it fails, the old folder is put back, unless the new one already holds work worth
  keeping (checkpoints, shards); then both are kept and the log says where.
* **Lock.** ``.todi.lock`` inside the folder holds the pid, host and command of the process using it,
  under an exclusive ``flock`` for the whole run; a second process is refused with a message naming the
  first. The kernel drops the ``flock`` when a process dies, so a lock left by a killed run is stale by
  construction; on a file system without ``flock`` a lock naming a dead process of this host is taken
  over, and one naming another host must be removed by hand.

Folders written before markers existed (``legacy``) are recognised by the file their command always
writes (``run_info.json``, a cache's ``manifest.json``, ...): they may be resumed or extended and get a
marker then, but ``--overwrite`` refuses them (delete such a folder yourself).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from todi.errors import TodiError, UsageError
from todi.report import write_text_atomic

logger = logging.getLogger(__name__)

__all__ = ["LOCK_NAME", "MARKER_NAME", "OutputFolder", "local_input", "read_json", "read_marker"]

MARKER_NAME = ".todi-output.json"
LOCK_NAME = ".todi.lock"
_OURS = (MARKER_NAME, LOCK_NAME)

# Commands whose outputs may replace each other's with --overwrite.
_KIND = {
    "sft": "training run",
    "distill": "training run",
    "cache-teacher": "teacher cache",
    "init-student": "student",
    "eval": "evaluation",
    "judge": "judgment",
    "demo": "demo",
}


def _legacy_kind(path: Path) -> str | None:
    """The kind of output a folder written before markers holds, from the file its command always wrote."""
    info = read_json(path / "run_info.json")
    if info.get("command") in ("sft", "distill"):
        return "training run"
    manifest = read_json(path / "manifest.json")
    if "format_version" in manifest and "shards" in manifest:
        return "teacher cache"
    if (path / "todi_init.json").is_file():
        return "student"
    if (path / "predictions" / "settings.json").is_file():
        return "evaluation"
    if (path / "report.md").is_file() and (path / "runs").is_dir():
        return "demo"
    return None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file; {} when the file is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def read_marker(path: str | os.PathLike) -> dict[str, Any]:
    """The marker of a todi output folder (command, run id, created), or {} when it has none."""
    return read_json(Path(path) / MARKER_NAME)


def local_input(name_or_path: str | os.PathLike | None) -> Path | None:
    """The resolved local path an input option names, or None for a Hub id or nothing."""
    if not name_or_path:
        return None
    path = Path(name_or_path).expanduser()
    return path.resolve() if path.exists() else None


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


class _Lock:
    """An exclusive ``flock`` on a file inside the folder, with who holds it written into the file."""

    def __init__(self, path: Path, command: str, run_id: str) -> None:
        self.path = path
        self.info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "run_id": run_id,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.fd: int | None = None

    def acquire(self, folder_for_message: Path) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
                os.close(fd)
                raise TodiError(
                    f"{folder_for_message} is in use by {_holder(self.path)}",
                    "wait for that run to finish or stop it; two commands must not write one --out",
                ) from None
            # No flock on this file system: fall back on the pid and host written in the file.
            held = read_json(self.path)
            if held and not _stale(held):
                os.close(fd)
                raise TodiError(
                    f"{folder_for_message} is in use by {_holder(self.path)} (this file system has no "
                    "flock, so todi trusts the lock file)",
                    f"if that process is gone, delete {self.path}",
                ) from None
        held = read_json(self.path)
        if held and held.get("host") != self.info["host"]:
            logger.warning("taking over %s, left by %s (its lock is free)", self.path, _describe(held))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(self.info) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)  # an empty lock file says nobody holds it
        os.close(self.fd)  # closing drops the flock
        self.fd = None


def _describe(info: dict[str, Any]) -> str:
    return (
        f"todi {info.get('command', '?')} (pid {info.get('pid', '?')} on {info.get('host', '?')}, "
        f"since {info.get('since', '?')})"
    )


def _holder(lock: Path) -> str:
    info = read_json(lock)
    return _describe(info) if info else "another process"


def _stale(info: dict[str, Any]) -> bool:
    """A lock naming a process of this host that no longer runs (one of another host cannot be checked)."""
    if info.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(info.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False
    return False


class OutputFolder:
    """The folder a command writes, guarded as the module docstring describes.

    Typical use (training: check, lock, load the inputs, then replace an old run, work, finish)::

        folder = OutputFolder(config.out, "distill", inputs={"--teacher": config.teacher, ...},
                              overwrite=config.overwrite)
        with folder.claim(resume=config.resume):
            ...load models and data (a failure here leaves an old run untouched)...
            folder.replace_old()
            ...write into folder.path...

    ``keep_on_failure(path)`` says whether a failed run's new folder holds work worth keeping rather
    than restoring the old folder over it (default: anything besides the marker and the lock).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        command: str,
        *,
        inputs: Mapping[str, str | os.PathLike | None] | None = None,
        overwrite: bool = False,
        keep_on_failure: Callable[[Path], bool] | None = None,
    ) -> None:
        if command not in _KIND:
            raise ValueError(f"unknown command {command!r}")
        # absolute() (not resolve()) keeps a link the user named as the folder, and makes `--out .` usable.
        self.path = Path(path).expanduser().absolute()
        self.command = command
        self.kind = _KIND[command]
        self.inputs = dict(inputs or {})
        self.overwrite = overwrite
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.keep_on_failure = keep_on_failure or _has_work
        self._lock: _Lock | None = None
        self._created = False
        self._aside: Path | None = None
        self._replaced = False

    # ---- reading (safe on every rank)

    def status(self) -> str:
        """``missing``, ``empty``, ``ours`` (marked, our kind), ``legacy`` (our kind, no marker),
        ``other`` (another todi command's) or ``foreign`` (not written by todi)."""
        if not self.path.exists():
            return "missing"
        if not self.path.is_dir():
            return "file"
        entries = [p for p in self.path.iterdir() if p.name not in _OURS]
        marker = read_marker(self.path)
        if not entries and (not marker or marker.get("command") in (None, self.command)):
            return "empty"
        if marker:
            return "ours" if _KIND.get(marker.get("command", "")) == self.kind else "other"
        legacy = _legacy_kind(self.path)
        if legacy is None:
            return "foreign"
        return "legacy" if legacy == self.kind else "other"

    def holds_output(self) -> bool:
        """Whether the folder already holds an output of this command's kind (marked or legacy)."""
        return self.status() in ("ours", "legacy")

    def check(self, *, reuse: bool = False, option: str = "--out") -> None:
        """Refuse, before anything is written, what the command must not do to this folder.

        ``reuse``: the command continues an output already there (``--resume``, an unfinished cache,
        ``todi eval`` adding cells). Without it or ``--overwrite``, an existing output is refused.
        Read-only, so every rank of a distributed run may call it.
        """
        status = self.status()
        where = f"{option} {self.path}"
        if status == "file":
            raise UsageError(f"{where} is a file", "give a folder path")
        self._check_inputs(option, replacing=self.overwrite and status not in ("missing", "empty"))
        if status in ("missing", "empty"):
            return
        if status == "foreign":
            raise UsageError(
                f"{where} is not empty and was not written by todi; refusing to write into it"
                + (" or delete it" if self.overwrite else ""),
                f"choose a new or empty folder (todi marks its own folders with {MARKER_NAME})",
            )
        if status == "other":
            theirs = read_marker(self.path).get("command") or _legacy_kind(self.path)
            raise UsageError(
                f"{where} holds the output of todi {theirs}, not a {self.kind}",
                "choose another --out; --overwrite only replaces an output of the same kind",
            )
        if self.overwrite:
            if status == "legacy":
                raise UsageError(
                    f"{where} holds a {self.kind} written by an older todi (no {MARKER_NAME}); "
                    "--overwrite only deletes folders that carry the marker",
                    "delete the folder yourself if you no longer need it, or choose another --out",
                )
            return
        if not reuse:
            resume = "pass --resume to continue it, " if self.kind == "training run" else ""
            replace = (
                "delete it yourself (written by an older todi, it has no marker, so --overwrite keeps it)"
                if status == "legacy"
                else "--overwrite to replace it"
            )
            raise UsageError(
                f"{where} already holds a {self.kind}", f"{resume}{replace}, or choose another --out"
            )

    def _check_inputs(self, option: str, *, replacing: bool) -> None:
        out = self.path.resolve()
        for name, value in self.inputs.items():
            inp = local_input(value)
            if inp is None:
                continue
            if _within(inp, out):
                what = "is" if inp == out else "contains"
                raise UsageError(
                    f"{option} {self.path} {what} the input {name} {value}: the run would write over what it "
                    "reads",
                    "write the output to a folder outside every input",
                )
            if replacing and _within(out, inp):
                raise UsageError(
                    f"{option} {self.path} lies inside the input {name} {value}; --overwrite never deletes "
                    "anything inside an input",
                    "choose an --out outside the inputs, or delete the old output yourself",
                )

    # ---- writing (the main process only)

    @contextlib.contextmanager
    def claim(self, *, reuse: bool = False, option: str = "--out") -> Iterator[OutputFolder]:
        """Check, create and lock the folder for the block; on leaving, finish or undo a replacement."""
        self.check(reuse=reuse, option=option)
        with self.held():
            yield self

    @contextlib.contextmanager
    def held(self) -> Iterator[OutputFolder]:
        """Lock an already checked folder for the block (the main process of a distributed run); on
        leaving, delete the output it replaced (success) or put it back (failure)."""
        self.lock()
        try:
            yield self
        except BaseException:
            self.undo()
            raise
        else:
            self.finish()
        finally:
            self.unlock()

    def lock(self) -> None:
        if not self.path.exists():
            self.path.mkdir(parents=True)
            self._created = True
        self._lock = _Lock(self.path / LOCK_NAME, self.command, self.run_id)
        try:
            self._lock.acquire(self.path)
        except BaseException:
            self._lock = None
            self._remove_if_untouched()
            raise

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._remove_if_untouched()

    def replace_old(self) -> None:
        """Make the folder this run's own: with ``--overwrite``, move the old output aside (deleted when
        the command succeeds); write the marker. Call once the inputs have loaded."""
        if self._replaced:
            return
        self._replaced = True
        has_old = any(p.name not in _OURS for p in self.path.iterdir())
        if self.overwrite and has_old:
            fresh = self.path.with_name(f".{self.path.name}.todi-new-{self.run_id}")
            aside = self.path.with_name(f".{self.path.name}.todi-old-{self.run_id}")
            fresh.mkdir()
            new_lock = _Lock(fresh / LOCK_NAME, self.command, self.run_id)
            new_lock.acquire(self.path)
            os.replace(self.path, aside)  # the old lock moves with it; we still hold it
            try:
                os.replace(fresh, self.path)
            except OSError:
                os.replace(aside, self.path)
                new_lock.release()
                shutil.rmtree(fresh, ignore_errors=True)
                raise
            assert self._lock is not None
            self._lock.release()
            self._lock, self._aside = new_lock, aside
            logger.info(
                "--overwrite: the old %s in %s is set aside until this run succeeds", self.kind, self.path
            )
        self.write_marker()

    def write_marker(self) -> None:
        old = read_marker(self.path)
        marker = {
            "command": self.command,
            "run_id": old.get("run_id", self.run_id) if old.get("command") == self.command else self.run_id,
            "created": old.get("created", time.strftime("%Y-%m-%dT%H:%M:%S%z")),
            "note": "written by todi; --overwrite replaces only folders that carry this file",
        }
        write_text_atomic(self.path / MARKER_NAME, json.dumps(marker, indent=2) + "\n")

    def finish(self) -> None:
        """Success: the replaced output is deleted."""
        if self._aside is not None:
            shutil.rmtree(self._aside, ignore_errors=True)
            self._aside = None

    def undo(self) -> None:
        """Failure: put the replaced output back, unless the new one holds work worth keeping."""
        if self._aside is None:
            return
        if self.keep_on_failure(self.path):
            logger.warning(
                "the run failed; its partial output stays in %s and the output it was to replace in %s",
                self.path,
                self._aside,
            )
            return
        failed = self.path.with_name(f".{self.path.name}.todi-failed-{self.run_id}")
        os.replace(self.path, failed)
        os.replace(self._aside, self.path)
        if self._lock is not None:
            self._lock.release()  # its file now lies in the folder being deleted
            self._lock = None
        shutil.rmtree(failed, ignore_errors=True)
        self._aside = None
        logger.warning("the run failed; the previous %s in %s is restored", self.kind, self.path)

    def _remove_if_untouched(self) -> None:
        """A folder this command created but never wrote into goes again (a refused run leaves no trace)."""
        if not self._created or self._lock is not None or not self.path.is_dir():
            return
        if all(p.name in _OURS for p in self.path.iterdir()):
            shutil.rmtree(self.path, ignore_errors=True)
            self._created = False


def _has_work(path: Path) -> bool:
    return any(p.name not in _OURS for p in path.iterdir()) if path.is_dir() else False
