"""Training checkpoints: atomic writes, newest-usable resume with fallback, rotation (best N + last K).

Layout under the run folder::

    checkpoints/step-00000120/      one complete checkpoint
        model.safetensors ...       accelerate's save_state: model, optimizer, scheduler, RNG states per
                                    rank (python, numpy, torch, cuda); FSDP / DeepSpeed shard folders
        manifest.json               every file's size (and small files' SHA-256), to detect damage
        trainer_state.json          data position (epoch, step in epoch, global step) and dev scores;
                                    written last
    checkpoints/.tmp-step-00000140/ a checkpoint being written (ignored, removed on the next start)

A checkpoint is written under a temporary name and renamed only once complete, so a crash or SIGKILL
mid-write never leaves a broken newest checkpoint; a checkpoint damaged later (a full disk, a copy cut
short) is detected on resume, and the previous one is used instead, with a warning. The folder must be
on a file system every rank sees (multi-node runs: a shared file system).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from todi.errors import TodiError

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINTS",
    "TrainerState",
    "any_rank",
    "list_checkpoints",
    "load_latest_checkpoint",
    "remove_stale",
    "rotate_checkpoints",
    "save_checkpoint",
    "sha256_file",
    "verify_checkpoint",
    "write_errors",
]

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"
MANIFEST_NAME = "manifest.json"
_NAME = re.compile(r"^step-(\d+)$")
_HASHED_BYTES = 64 * 2**20


@dataclass
class TrainerState:
    """Where training stands after ``global_step`` optimizer steps.

    ``step_in_epoch`` is the index of the NEXT step within ``epoch`` (the data position: the batch plan of
    an epoch is a pure function of the seed and the epoch, so this index is enough to continue it).
    ``dev`` holds the dev results measured at this step, if any; ``score`` ranks checkpoints (higher is
    better: dev ROUGE-L, or minus the dev loss when no ROUGE-L was measured).
    """

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens_seen: int = 0
    dev: dict[str, float] | None = None
    score: float | None = None
    best_score: float | None = None
    best_step: int | None = None
    evaluated_step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_file(cls, path: Path) -> TrainerState:
        """Read a state file; ValueError when it is not one (so a damaged checkpoint is skipped, never
        half-trusted: a step count that is a string would only fail steps later)."""
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for name in ("global_step", "epoch", "step_in_epoch", "tokens_seen"):
            value = known.get(name, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{path}: {name} must be a whole number >= 0, got {value!r}")
        for name in ("score", "best_score"):
            value = known.get(name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise ValueError(f"{path}: {name} must be a number or null, got {value!r}")
        for name in ("best_step", "evaluated_step"):
            value = known.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"{path}: {name} must be a whole number or null, got {value!r}")
        for name in ("dev", "extra"):
            if known.get(name) is not None and not isinstance(known[name], dict):
                raise ValueError(f"{path}: {name} must be an object, got {known[name]!r}")
        if known.get("extra") is None:
            known.pop("extra", None)
        return cls(**known)


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def _step_of(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Completed checkpoint folders (renamed from their temporary name), oldest first."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=lambda p: _step_of(p) or 0)


def remove_stale(run_dir: str | os.PathLike) -> None:
    """Delete temporary folders a killed run left behind (main process only)."""
    folder = checkpoints_dir(run_dir)
    if folder.is_dir():
        for path in folder.glob(".tmp-*"):
            logger.info("removing unfinished checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Size of every file, and the SHA-256 of the small ones (RNG states, scheduler): accelerate loads a
    damaged RNG file silently (it only logs at INFO), which would break exact resume unnoticed; large
    files (weights, optimizer) fail loudly in their loaders, and hashing them would slow every save."""
    entries: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name in (MANIFEST_NAME, STATE_NAME):
            continue
        entry: dict[str, Any] = {"size": path.stat().st_size}
        if entry["size"] <= _HASHED_BYTES:
            entry["sha256"] = sha256_file(path)
        entries[str(path.relative_to(folder))] = entry
    return entries


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_synced(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some file systems refuse to open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(accelerator: Any, run_dir: str | os.PathLike, state: TrainerState) -> Path:
    """Save model, optimizer, scheduler and RNG states (``accelerator.save_state``) plus ``state``.

    Collective: every rank must call it (each writes its own RNG state; FSDP/DeepSpeed their shards).
    """
    folder = checkpoints_dir(run_dir)
    final = folder / f"step-{state.global_step:08d}"
    tmp = folder / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    with write_errors(tmp, f"checkpoint {final.name}", cleanup=tmp):
        accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with write_errors(tmp, f"checkpoint {final.name}", cleanup=tmp):
            _write_synced(tmp / MANIFEST_NAME, json.dumps(_manifest(tmp), indent=1, sort_keys=True))
            # The state file goes last: a folder holding it was written completely.
            _write_synced(tmp / STATE_NAME, state.to_json())
        if final.exists():  # a resume that fell back past this step rewrites it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(folder)
    accelerator.wait_for_everyone()
    return final


@contextlib.contextmanager
def write_errors(path: Path, what: str, *, cleanup: Path | None = None) -> Iterator[None]:
    """Turn a failed write (a full disk, a file size limit, a quota, a read-only mount) into an error that
    names the file and says what survived; ``cleanup`` (a partial folder) is removed first. torch reports a
    full disk as an obscure ``inline_container.cc`` RuntimeError, safetensors as its own SafetensorError."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as err:
        text, code = str(err), getattr(err, "errno", None)
        if code in (errno.ENOSPC, errno.EDQUOT) or any(
            s in text for s in ("No space left", "os error 28", "quota")
        ):
            cause = "the disk is full"
        elif code == errno.EFBIG or any(s in text for s in ("File too large", "os error 27")):
            cause = "a file size limit was reached (ulimit -f)"
        elif any(s in text for s in ("file write failed", "unexpected pos")):
            cause = "the write failed (a full disk or a file size limit)"
        elif isinstance(err, OSError):
            cause = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
        else:
            raise
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        try:
            free = f"{shutil.disk_usage(_existing_parent(path)).free / 2**20:.0f} MiB free"
        except OSError:
            free = "free space unknown"
        raise TodiError(
            f"could not write {what} to {path}: {cause} ({free})",
            "earlier checkpoints and exports are intact; free space (or fix the folder) and rerun with --resume",
        ) from err


def _existing_parent(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()


def verify_checkpoint(path: Path) -> str | None:
    """None when every file the manifest lists is present with its size; else what is wrong."""
    state, manifest = path / STATE_NAME, path / MANIFEST_NAME
    if not state.is_file() or not manifest.is_file():
        return f"{STATE_NAME} or {MANIFEST_NAME} is missing"
    try:
        expected = json.loads(manifest.read_text(encoding="utf-8"))
        TrainerState.from_file(state)
    except (OSError, ValueError, TypeError) as err:
        return f"unreadable {STATE_NAME}/{MANIFEST_NAME}: {err}"
    for name, entry in expected.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["size"]:
            return f"{name} has {file.stat().st_size} bytes, expected {entry['size']}"
        if "sha256" in entry and sha256_file(file) != entry["sha256"]:
            return f"{name} does not match its checksum"
    return None


def any_rank(accelerator: Any, flag: bool) -> bool:
    """True when ``flag`` is True on any rank, so that all ranks take the same branch."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item() > 0)


def load_latest_checkpoint(accelerator: Any, run_dir: str | os.PathLike) -> tuple[TrainerState, Path] | None:
    """Restore the newest usable checkpoint into the prepared model/optimizer/scheduler and RNGs.

    A checkpoint that fails verification or loading is skipped with a warning and the previous one is
    tried (each attempt restores every component, so a half-loaded one leaves no trace). Returns None when
    the run has no checkpoint; raises TodiError when it has some and none is usable.
    """
    candidates = list_checkpoints(run_dir)
    for index in range(len(candidates) - 1, -1, -1):
        path = candidates[index]
        problem = verify_checkpoint(path)
        state = None
        if problem is None:
            try:
                accelerator.load_state(str(path))
                state = TrainerState.from_file(path / STATE_NAME)
            except Exception as err:  # any failure means "not usable"; the reason is logged
                problem = f"{type(err).__name__}: {err}".splitlines()[0]
        if not any_rank(accelerator, problem is not None):
            return state, path
        previous = f"falling back to {candidates[index - 1].name}" if index else "no earlier checkpoint left"
        logger.warning(
            "checkpoint %s is unusable (%s); %s", path, problem or "failed on another rank", previous
        )
    if candidates:
        raise TodiError(
            f"none of the {len(candidates)} checkpoints in {checkpoints_dir(run_dir)} could be loaded",
            "see the warnings above; start afresh with --overwrite",
        )
    return None


def rotate_checkpoints(run_dir: str | os.PathLike, *, keep_last: int, keep_best: int) -> list[Path]:
    """Delete checkpoints that are neither among the ``keep_last`` newest nor the ``keep_best`` best
    scored (main process only). Returns the deleted folders."""
    checkpoints = list_checkpoints(run_dir)
    keep = set(checkpoints[-max(keep_last, 1) :])
    scored = []
    for path in checkpoints:
        try:
            score = TrainerState.from_file(path / STATE_NAME).score
        except (OSError, ValueError, TypeError):
            continue  # unreadable: never counted among the best
        if score is not None and math.isfinite(score):
            scored.append((score, _step_of(path) or 0, path))
    # Ties go to the earlier step: it reached the score first.
    scored.sort(key=lambda item: (-item[0], item[1]))
    keep.update(path for _, _, path in scored[: max(keep_best, 0)])
    removed = [path for path in checkpoints if path not in keep]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
