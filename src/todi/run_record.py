"""What a run folder records about its run, and the check that a ``--resume`` continues that same run.

Files (beside the checkpoints, see :mod:`todi.checkpoint`)::

    config.yaml      the options of the run's first invocation (reusable as --config); never rewritten
    run_info.json    the command, versions and process layout of that first invocation
    segments.jsonl   one line per invocation that trained the run: its options, the content identity of
                     its inputs (teacher, student, adapter, cache, encoded data) and what changed

A ``--resume`` that would continue with other data order or parameter shapes is refused; one with other
inputs or other settings is refused unless ``--resume-changed`` says so, and then recorded.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from todi.checkpoint import list_checkpoints, remove_stale
from todi.errors import UsageError
from todi.models import model_identity
from todi.outputs import read_json, read_marker
from todi.report import write_text_atomic

if TYPE_CHECKING:
    from todi.training import TrainConfig

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_NAME",
    "RUN_INFO_NAME",
    "SEGMENTS_NAME",
    "append_segment",
    "check_resume",
    "recorded_options",
    "run_identity",
    "write_run_info",
]

CONFIG_NAME = "config.yaml"
RUN_INFO_NAME = "run_info.json"
SEGMENTS_NAME = "segments.jsonl"
# Options whose change would make --resume continue a different run (another batch plan or other
# parameter shapes): refused, even with --resume-changed.
LOCKED_ON_RESUME = (
    "data",
    "data_config",
    "data_split",
    "columns",
    "max_examples",
    "template",
    "max_length",
    "max_prompt_length",
    "group_by_length",
    "batch_size",
    "seed",
    "lora_r",
    "lora_target",
    "model",
    "student",
    "optim",  # another optimizer cannot take over this one's state
    "cross_tokenizer",
    "uld_weight",
)
# Options that act only under others: compared on resume only where they act in both records (an older
# todi may have recorded them where they did nothing).
ACTS_ONLY_IF: dict[str, Callable[[dict[str, Any]], bool]] = {
    "unaligned": lambda options: options.get("cross_tokenizer", "refuse") != "refuse",
}
# Options a run recorded by an older todi lacks, where they act: the value that todi used in their place.
# A resume compares against it; an unrecorded option is otherwise not compared, and its new default would
# silently change the run.
ADDED_LATER: dict[str, Any] = {"unaligned": "skip"}
# Options free to change on resume: how long to train, how the run is evaluated, logged, checkpointed
# and how the loss is computed (not what it computes). Any other change needs --resume-changed.
FREE_ON_RESUME = frozenset(
    {
        "out",
        "resume",
        "resume_changed",
        "overwrite",
        "nan_policy",
        "epochs",
        "max_steps",
        "dev",
        "dev_max_examples",
        "eval_every",
        "eval_seeds",
        "eval_max_new_tokens",
        "eval_batch_size",
        "save_every",
        "save_best",
        "keep_last",
        "log_every",
        "report_to",
        "fused",
        "chunk_size",
        "compile",
        "loss_backend",
        "save_samples",
        "dev_split",
        "gradient_checkpointing",
        "push_to_hub",
        "hub_model_id",
        "plugin",  # imports code only; what the loss computes is --loss and its parameters
    }
)
# Options whose change continues the run with another objective or optimisation: allowed with
# --resume-changed (and recorded), refused without. Every option is in exactly one of the three sets.
CHANGED_ON_PURPOSE = frozenset(
    {
        "lr",
        "lr_scheduler",
        "min_lr",
        "warmup_steps",
        "warmup_ratio",
        "weight_decay",
        "max_grad_norm",
        "grad_accum",
        "dtype",
        "mixed_precision",
        "trust_remote_code",
        "lora_alpha",
        "lora_dropout",
        "keep_adapter",
        "teacher",
        "teacher_cache",
        "cache_tail",
        "teacher_lora",
        "teacher_dtype",
        "loss",
        "kd_rate",
        "temperature",
        "beta",
        "skew",
        "mu",
        "loss_params",
        "todi_weight",
        "unaligned",
        # on-policy (todi.onpolicy): which responses the steps learn from
        "lmbda",
        "seq_kd",
        "on_policy_ce",
        "replay_buffer",
        "replay_ratio",
        "gen_temperature",
        "gen_top_p",
        "gen_top_k",
        "gen_max_new_tokens",
    }
)


def run_identity(config: TrainConfig, train_set: Sequence[dict]) -> dict[str, str]:
    """What the run's inputs hold (not just their names): a resumed run must continue on the same ones."""
    identity = {"data": _data_digest(train_set), "student": model_identity(config.student_path)}
    if config.teacher_path:
        identity["teacher"] = model_identity(config.teacher_path)
    if config.teacher_lora_path:
        identity["teacher_lora"] = model_identity(config.teacher_lora_path)
    if config.teacher_cache_path:
        manifest = Path(config.teacher_cache_path) / "manifest.json"
        identity["teacher_cache"] = "sha256:" + hashlib.sha256(manifest.read_bytes()).hexdigest()
    return identity


def _data_digest(encoded: Sequence[dict]) -> str:
    """SHA-256 of the encoded training set (token ids and labels): the data as the model sees it, so a
    file replaced at the same path, or another template, changes it."""
    digest = hashlib.sha256()
    for example in encoded:
        for key in ("input_ids", "labels"):
            digest.update(array.array("q", example[key]).tobytes())
            digest.update(b";")
    return "sha256:" + digest.hexdigest()


def recorded_options(config: TrainConfig) -> dict[str, Any]:
    # How this invocation treated --out is not part of the run.
    return {
        k: v
        for k, v in dataclasses.asdict(config).items()
        if k not in ("resume", "resume_changed", "overwrite")
    }


def check_resume(
    run_dir: Path, config: TrainConfig, world_size: int, identity: dict[str, str]
) -> dict[str, list[Any]]:
    """Refuse a --resume that would continue another run; return the changes it carries (option ->
    [before, now]). Read-only, so every rank can run it before the main one writes anything."""
    last = _last_segment(run_dir)
    if last is None:
        if list_checkpoints(run_dir):
            raise UsageError(
                f"--resume: {run_dir} holds checkpoints but no record of its options ({SEGMENTS_NAME} or "
                f"{CONFIG_NAME})",
                "start a new run in another --out",
            )
        return {}
    old, new = _comparable(last["options"], added_later=True), _comparable(recorded_options(config))
    fixed = [
        f"{k} ({old[k]!r} before, {new[k]!r} now)"
        for k in LOCKED_ON_RESUME
        if k in old and k in new and old[k] != new[k]
    ]
    command = last.get("command") or read_marker(run_dir).get("command")
    if command and command != config.command:
        fixed.insert(0, f"the command (todi {command} before, todi {config.command} now)")
    per_step = last.get("micro_batches_per_step")
    if per_step is not None and per_step != config.grad_accum * world_size:
        fixed.append(f"grad_accum x processes ({per_step} before, {config.grad_accum * world_size} now)")
    if fixed:
        raise UsageError(
            f"--resume: options that fix the data order or the model changed: {', '.join(fixed)}",
            f"resume with the options in {run_dir / CONFIG_NAME}, or start a new run",
        )
    changes = {
        k: [old[k], new[k]]
        for k in new
        if k in old and old[k] != new[k] and k not in FREE_ON_RESUME and k not in LOCKED_ON_RESUME
    }
    before = last.get("identity") or {}
    for key, value in identity.items():
        if key in before and before[key] != value:
            changes[f"{key} contents"] = [before[key], value]
    if not before:
        logger.warning(
            "--resume: %s was written by an older todi that did not record what its teacher, student and "
            "data held; only the options are checked",
            run_dir,
        )
    if changes and not config.resume_changed:
        shown = "; ".join(
            f"{k} (the files changed)" if k.endswith(" contents") else f"{k} {a!r} -> {b!r}"
            for k, (a, b) in changes.items()
        )
        raise UsageError(
            f"--resume would continue the run in {run_dir} with other inputs or settings: {shown}",
            "resume with the run's own options (see its segments.jsonl / config.yaml), start a new run, or "
            "pass --resume-changed to continue with these changes on purpose (they are recorded)",
        )
    if changes:
        logger.warning("--resume-changed: continuing with changes: %s", ", ".join(changes))
    return changes


def _comparable(options: dict[str, Any], added_later: bool = False) -> dict[str, Any]:
    """``options`` as a resume compares them: those that do not act dropped, those an older record lacks
    (``added_later``) filled with what that todi used."""
    out = {**ADDED_LATER, **options} if added_later else dict(options)
    return {k: v for k, v in out.items() if k not in ACTS_ONLY_IF or ACTS_ONLY_IF[k](out)}


def _last_segment(run_dir: Path) -> dict[str, Any] | None:
    """The options and identity the run in ``run_dir`` last trained with: its newest segment, or for a run
    written before segments were recorded, config.yaml (options only)."""
    segments = run_dir / SEGMENTS_NAME
    if segments.is_file():
        for line in reversed(segments.read_text(encoding="utf-8").splitlines()):
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and isinstance(record.get("options"), dict):
                    return record
    saved = run_dir / CONFIG_NAME
    if saved.is_file():
        import yaml

        options = yaml.safe_load(saved.read_text(encoding="utf-8"))
        if isinstance(options, dict):
            info = read_json(run_dir / RUN_INFO_NAME)
            return {
                "options": options,
                "command": info.get("command"),
                "micro_batches_per_step": info.get("micro_batches_per_step"),
            }
    return None


def write_run_info(run_dir: Path, config: TrainConfig, accelerator: Any) -> None:
    """Main process: a new run records its options (config.yaml, reusable as --config) and versions; a
    resumed one keeps them (each segment is appended to segments.jsonl instead)."""
    import yaml

    remove_stale(run_dir)
    if (run_dir / CONFIG_NAME).is_file() and config.resume:
        return
    options = recorded_options(config)
    write_text_atomic(run_dir / CONFIG_NAME, yaml.safe_dump(options, sort_keys=False))
    info = {"command": config.command, **_environment(accelerator, config)}
    write_text_atomic(run_dir / RUN_INFO_NAME, json.dumps(info, indent=2) + "\n")


def _environment(accelerator: Any, config: TrainConfig) -> dict[str, Any]:
    import accelerate
    import transformers

    import todi

    return {
        "versions": {
            "todi": todi.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
        },
        "world_size": accelerator.num_processes,
        "micro_batches_per_step": config.grad_accum * accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": accelerator.mixed_precision,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def append_segment(
    run_dir: Path,
    config: TrainConfig,
    accelerator: Any,
    identity: dict[str, str],
    changes: dict[str, list[Any]],
    from_step: int,
) -> None:
    """One line per invocation that trained this run: its options, inputs' identity and what changed."""
    record = {
        "command": config.command,
        "from_step": from_step,
        **_environment(accelerator, config),
        "options": recorded_options(config),
        "identity": identity,
        "changed": changes,
    }
    with (run_dir / SEGMENTS_NAME).open("a", encoding="utf-8") as file:
        file.write(json.dumps(record, default=str) + "\n")
