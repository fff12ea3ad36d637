"""``todi sft`` and ``todi distill``: fine-tune a teacher, distil it into a student.

One loop serves both: SFT is distillation without a teacher (``kd_rate = 0``). :func:`train` reads top
to bottom: checks, data, models, the step loop (micro-batches, backward, clip, step), evaluation,
checkpoints, export. Model loading lives in :mod:`todi.models`, checkpoint files in
:mod:`todi.checkpoint`, the objective in :func:`todi.losses.causal_lm_distillation_loss`.

Running it
----------

One device (a GPU if there is one, else the CPU), no launcher::

    todi sft --model gpt2-xl --data data/dolly --dev data/dolly/dev.jsonl --out runs/teacher
    todi distill --teacher runs/teacher/final --student gpt2 --data data/dolly \\
        --dev data/dolly/dev.jsonl --loss todi --out runs/todi

Two GPUs on one machine (DDP). ``--batch-size`` is per GPU, so one optimizer step sees
``batch-size x grad-accum x GPUs`` examples; ``--grad-accum 2`` on one GPU and two GPUs with
``--grad-accum 1`` make the same updates::

    accelerate launch --num_processes 2 -m todi.cli distill --teacher runs/teacher/final \\
        --student gpt2 --data data/dolly --dev data/dolly/dev.jsonl --loss todi --out runs/todi
    # or: torchrun --nproc_per_node 2 -m todi.cli distill ...

FSDP or DeepSpeed ZeRO: write an accelerate config (``accelerate config``, or a YAML file with
``distributed_type: FSDP`` / ``DEEPSPEED``) and pass it: ``accelerate launch --config_file fsdp.yaml -m
todi.cli distill ...``. The student is sharded; the frozen teacher is replicated on every GPU (in
``--teacher-dtype``, bfloat16 by default on GPUs). Under ZeRO-3 set
``zero3_save_16bit_model: true`` so the final model can be gathered.

Several machines (here 2 x 8 GPUs; run on every machine, ``NODE_RANK`` 0 on the head node ``HEAD``)::

    accelerate launch --num_machines 2 --num_processes 16 --machine_rank $NODE_RANK \\
        --main_process_ip $HEAD --main_process_port 29500 -m todi.cli distill ... --out /shared/runs/todi
    # or: torchrun --nnodes 2 --nproc_per_node 8 --node_rank $NODE_RANK \\
    #        --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 -m todi.cli distill ...

``--out`` must be on a file system every machine sees (checkpoints are written by all ranks and
renamed by rank 0). A run stopped by Ctrl-C / SIGTERM saves a checkpoint first; a killed one loses
the steps since its last checkpoint. Either way, the same command with ``--resume`` continues it and
ends with the same weights as a run never stopped.
"""

from __future__ import annotations

import array
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import random
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from todi.checkpoint import (
    TrainerState,
    any_rank,
    list_checkpoints,
    load_latest_checkpoint,
    remove_stale,
    rotate_checkpoints,
    save_checkpoint,
)
from todi.data import supervised_positions
from todi.divergences import DIVERGENCES, get_divergence
from todi.errors import NonFiniteError, Stopped, TodiError, UsageError
from todi.losses.sparse import SparseTeacher
from todi.models import (
    add_lora,
    causal_lm,
    check_finite_parameters,
    count_parameters,
    export_model,
    freeze,
    load_causal_lm,
    load_tokenizer,
    model_identity,
    resolve_dtype,
)
from todi.outputs import OutputFolder, read_marker
from todi.report import write_text_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "DistillConfig",
    "SFTConfig",
    "TrainConfig",
    "cosine_schedule",
    "epoch_plan",
    "run_distill",
    "run_sft",
    "train",
]

CONFIG_NAME = "config.yaml"
RUN_INFO_NAME = "run_info.json"
METRICS_NAME = "metrics.jsonl"
SEGMENTS_NAME = "segments.jsonl"
MIN_TEMPERATURE = 1e-2
_MAX_SKIPS_IN_A_ROW = 10
# Options whose change would make --resume continue a different run (another batch plan or other
# parameter shapes): refused, even with --resume-changed.
_LOCKED_ON_RESUME = (
    "data",
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
)
# Options free to change on resume: how long to train, how the run is evaluated, logged, checkpointed
# and how the loss is computed (not what it computes). Any other change needs --resume-changed.
_FREE_ON_RESUME = frozenset(
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
    }
)


def _opt(default: Any, text: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": text, **extra})


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Options shared by ``todi sft`` and ``todi distill``."""

    data: str = _opt(
        "",
        "training data (required): a .jsonl file, a folder holding train.jsonl, a datasets save_to_disk "
        "folder or a Hub data set name",
    )
    out: str = _opt("", "run folder (required): config, metrics.jsonl, tb/, checkpoints/, best/, final/")
    dev: str | None = _opt(
        None, "dev data, scored during training (dev loss, dev ROUGE-L); a folder gives its dev.jsonl"
    )
    resume: bool = _opt(False, "continue the run in --out from its newest usable checkpoint")
    resume_changed: bool = _opt(
        False,
        "with --resume: continue even though the teacher, student or data contents, the loss or its "
        "parameters, or the optimisation options changed (each change is recorded in segments.jsonl)",
    )
    overwrite: bool = _opt(
        False,
        "replace the todi run in --out: it is set aside once the inputs have loaded and deleted when this "
        "run succeeds (a folder without todi's marker is never deleted)",
    )
    nan_policy: Literal["stop", "skip"] = _opt(
        "stop",
        "a NaN/inf loss or gradient norm: stop (before any weights are written) or skip that update and "
        "count it (stops anyway after 10 in a row)",
    )
    # data
    template: str = _opt(
        "alpaca", "prompt template: alpaca, chat, none or a format string with {instruction}"
    )
    max_length: int = _opt(512, "tokens per example (prompt + response); longer responses are cut")
    max_prompt_length: int = _opt(256, "prompt tokens kept (from the end of the prompt)")
    max_examples: int | None = _opt(None, "use only the first N training examples")
    dev_max_examples: int | None = _opt(None, "use only the first N dev examples")
    group_by_length: Literal["bucket", "sort", "none"] = _opt(
        "bucket", "batch examples of similar length together (less padding)"
    )
    # optimisation
    epochs: int = _opt(10, "passes over the training data (ignored when --max-steps is set)")
    max_steps: int = _opt(0, "optimizer steps to run; 0 = --epochs full passes")
    batch_size: int = _opt(8, "examples per micro-batch per device")
    grad_accum: int = _opt(1, "micro-batches per optimizer step per device")
    lr: float = _opt(5e-4, "peak learning rate (AdamW)")
    min_lr: float = _opt(0.0, "learning rate at the end of the cosine decay")
    warmup_steps: int = _opt(0, "steps of linear warm-up before the cosine decay")
    weight_decay: float = _opt(0.0, "AdamW weight decay, applied to weight matrices only")
    max_grad_norm: float = _opt(1.0, "gradient clipping threshold (global L2 norm)")
    seed: int = _opt(42, "seed of initialisation (LoRA), data order and dropout")
    # precision and memory
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _opt(
        "auto", "dtype of the trained weights; auto = float32 (with bf16 autocast on GPUs)"
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _opt(
        "auto", "autocast; auto = the accelerate config's, else bf16 on GPUs that support it, no on CPU"
    )
    fused: bool = _opt(True, "fused chunked head + loss (never builds [tokens, vocab] logits); --no-fused")
    chunk_size: int | None = _opt(None, "positions per chunk of the fused loss (default: automatic)")
    compile: bool | None = _opt(
        None, "torch.compile the fused loss's chunk math (default: when a batch has several full chunks)"
    )
    trust_remote_code: bool = _opt(False, "allow models whose code comes with their checkpoint")
    # LoRA
    lora_r: int = _opt(0, "LoRA rank of the trained model; 0 = train all weights")
    lora_alpha: float = _opt(16.0, "LoRA alpha (scale alpha / r)")
    lora_dropout: float = _opt(0.05, "LoRA dropout")
    lora_target: str = _opt("all-linear", "LoRA target modules: all-linear or comma-separated module names")
    keep_adapter: bool = _opt(False, "export the LoRA adapter instead of merging it into the weights")
    # evaluation
    eval_every: int = _opt(0, "evaluate on --dev every N steps; 0 = at the end of every epoch")
    eval_seeds: str = _opt("10", "comma-separated sampling seeds for dev ROUGE-L (mean over seeds)")
    eval_max_new_tokens: int = _opt(256, "tokens generated per dev answer")
    eval_batch_size: int = _opt(8, "dev prompts generated at once per device")
    # checkpoints and logs
    save_every: int = _opt(
        500, "checkpoint every N steps (also after every evaluation and at the end); 0 = off"
    )
    save_best: int = _opt(1, "keep the N checkpoints with the best dev score (ROUGE-L), besides the newest")
    keep_last: int = _opt(2, "keep the N newest checkpoints (>= 2 leaves one to fall back on)")
    log_every: int = _opt(10, "write metrics every N steps")
    report_to: str = _opt("tensorboard", "comma-separated: tensorboard, wandb, none (metrics.jsonl always)")

    command = "train"

    @property
    def student_path(self) -> str:
        raise NotImplementedError

    @property
    def teacher_path(self) -> str | None:
        return None

    @property
    def teacher_cache_path(self) -> str | None:
        return None

    def loss_options(self) -> dict[str, Any]:
        """Keyword arguments of the objective (see :func:`todi.losses.causal_lm_distillation_loss`)."""
        return {"divergence": "fkl", "kd_rate": 0.0, "temperature": 1.0}

    def inputs(self) -> dict[str, str | None]:
        """The options naming what this run reads: --out may never be, or hold, one of them."""
        return {"--data": self.data, "--dev": self.dev}

    def problems(self) -> list[str]:
        """Everything wrong with the options, for one error message."""
        out: list[str] = []

        def need(ok: bool, text: str) -> None:
            if not ok:
                out.append(text)

        need(bool(self.data), "--data is required")
        need(bool(self.out), "--out is required")
        need(not (self.resume and self.overwrite), "--resume and --overwrite exclude each other")
        need(not self.resume_changed or self.resume, "--resume-changed applies to --resume")
        need(
            self.dtype != "float16",
            "--dtype float16 trains float16 weights without float32 master weights (updates underflow, "
            "the loss overflows); use --dtype float32 with --mixed-precision fp16 on a GPU, or bfloat16",
        )
        need(self.max_length >= 2, f"--max-length must be at least 2, got {self.max_length}")
        need(
            1 <= self.max_prompt_length < self.max_length,
            f"--max-prompt-length must be in [1, max-length), got {self.max_prompt_length}",
        )
        for name in ("max_examples", "dev_max_examples", "chunk_size"):
            value = getattr(self, name)
            need(value is None or value >= 1, f"--{name.replace('_', '-')} must be at least 1, got {value}")
        need(self.max_steps >= 0, f"--max-steps must be >= 0, got {self.max_steps}")
        need(self.max_steps > 0 or self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        for name in (
            "batch_size",
            "grad_accum",
            "log_every",
            "keep_last",
            "eval_max_new_tokens",
            "eval_batch_size",
        ):
            value = getattr(self, name)
            need(value >= 1, f"--{name.replace('_', '-')} must be at least 1, got {value}")
        for name in ("warmup_steps", "save_every", "save_best", "eval_every", "lora_r"):
            value = getattr(self, name)
            need(value >= 0, f"--{name.replace('_', '-')} must be >= 0, got {value}")
        need(math.isfinite(self.lr) and self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(0 <= self.min_lr <= self.lr, f"--min-lr must be in [0, lr], got {self.min_lr}")
        need(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            f"--weight-decay must be a finite number >= 0, got {self.weight_decay}",
        )
        need(self.max_grad_norm > 0, f"--max-grad-norm must be > 0, got {self.max_grad_norm}")
        need(
            math.isfinite(self.lora_alpha) and self.lora_alpha > 0,
            f"--lora-alpha must be a finite number > 0, got {self.lora_alpha}",
        )
        need(0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        need(not self.keep_adapter or self.lora_r > 0, "--keep-adapter needs LoRA (--lora-r > 0)")
        try:
            _parse_seeds(self.eval_seeds)
        except ValueError as err:
            out.append(str(err))
        for target in _report_targets(self.report_to):
            need(target in ("tensorboard", "wandb"), f"--report-to: unknown target {target!r}")
            if target == "wandb":
                try:
                    import wandb  # noqa: F401
                except ImportError:
                    out.append("--report-to wandb needs the wandb package (pip install wandb)")
        return out

    def check(self) -> None:
        """Raise UsageError listing every invalid option (before anything is loaded)."""
        problems = self.problems()
        if problems:
            raise UsageError("; ".join(problems), f"run 'todi {self.command} --help' for the options")


@dataclass
class SFTConfig(TrainConfig):
    """Fine-tune a causal LM on instruction data (cross-entropy on the response tokens)."""

    model: str = _opt("", "model to fine-tune (required): a local folder or a Hugging Face Hub id")

    command = "sft"

    @property
    def student_path(self) -> str:
        return self.model

    def inputs(self) -> dict[str, str | None]:
        return {"--model": self.model, **super().inputs()}

    def problems(self) -> list[str]:
        return (["--model is required"] if not self.model else []) + super().problems()


@dataclass
class DistillConfig(TrainConfig):
    """Distil a teacher into a student: (1 - kd_rate) CE + kd_rate divergence(teacher || student)."""

    teacher: str = _opt(
        "", "teacher (required unless --teacher-cache): a local folder (e.g. runs/teacher/final) or a Hub id"
    )
    teacher_cache: str | None = _opt(
        None,
        "distil from a teacher cache written by `todi cache-teacher` instead of running --teacher "
        "(the dev loss is then the CE alone)",
    )
    cache_tail: Literal["sampled", "bucket", "uniform"] = _opt(
        "sampled",
        "with --teacher-cache: sampled = divergences on all tokens, the teacher's tail mass shared out by "
        "the tail tokens the cache drew; bucket = on the k stored tokens + one tail bucket (fastest); "
        "uniform = on all tokens, the tail mass spread evenly (see docs/performance.md)",
    )
    student: str = _opt("", "student to train (required): a local folder or a Hub id")
    teacher_lora: str | None = _opt(None, "PEFT adapter folder merged into the teacher when it loads")
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _opt(
        "auto", "teacher dtype; auto = bfloat16 on GPUs, float32 on CPU"
    )
    loss: str = _opt("todi", f"divergence: {', '.join(DIVERGENCES)}")
    kd_rate: float = _opt(0.5, "weight of the divergence; 1 - kd_rate weighs the cross-entropy")
    temperature: float = _opt(2.0, "temperature of both distributions inside the divergence")
    beta: float | None = _opt(None, "ToDi: sharpness of the FKL/RKL weight (default 1.0)")
    skew: float | None = _opt(None, "skl / srkl: mixing weight (default 0.1)")
    mu: float | None = _opt(None, "akl: head/tail threshold (default 0.5)")

    command = "distill"

    @property
    def student_path(self) -> str:
        return self.student

    @property
    def teacher_path(self) -> str | None:
        return self.teacher

    @property
    def teacher_cache_path(self) -> str | None:
        return self.teacher_cache

    def inputs(self) -> dict[str, str | None]:
        return {
            "--student": self.student,
            "--teacher": self.teacher,
            "--teacher-cache": self.teacher_cache,
            "--teacher-lora": self.teacher_lora,
            **super().inputs(),
        }

    def divergence_params(self) -> dict[str, float]:
        return {
            name: getattr(self, name) for name in ("beta", "skew", "mu") if getattr(self, name) is not None
        }

    def loss_options(self) -> dict[str, Any]:
        options = {"divergence": self.loss, "kd_rate": self.kd_rate, "temperature": self.temperature}
        return options | self.divergence_params()

    def problems(self) -> list[str]:
        out = [] if self.student else ["--student is required"]
        if bool(self.teacher) == bool(self.teacher_cache):
            out.append("give exactly one of --teacher and --teacher-cache")
        if self.cache_tail != "sampled" and not self.teacher_cache:
            out.append("--cache-tail applies to --teacher-cache")
        if self.teacher_cache and self.teacher_lora:
            out.append("--teacher-lora applies to --teacher; a cache already holds the teacher's outputs")
        if not 0.0 <= self.kd_rate <= 1.0:
            out.append(f"--kd-rate must be in [0, 1], got {self.kd_rate}")
        if not (math.isfinite(self.temperature) and self.temperature >= MIN_TEMPERATURE):
            # Below it softmax(z / T) is a hard argmax whose 1/T gradient scale overflows float32.
            out.append(f"--temperature must be a finite number >= {MIN_TEMPERATURE}, got {self.temperature}")
        if self.loss not in DIVERGENCES:
            out.append(f"--loss: unknown divergence {self.loss!r} (choose one of {', '.join(DIVERGENCES)})")
        else:
            try:
                get_divergence(self.loss).resolve(self.divergence_params())
            except ValueError as err:
                out.append(f"--loss {self.loss}: {err}")
        return out + super().problems()


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--eval-seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ValueError("--eval-seeds needs at least one seed")
    return seeds


def _report_targets(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip() and t.strip() != "none"]


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def run_sft(config: SFTConfig) -> None:
    """``todi sft``."""
    train(config)


def run_distill(config: DistillConfig) -> None:
    """``todi distill``."""
    train(config)


# --------------------------------------------------------------------------------------------------
# Pieces of the loop: batch plan, schedule, the loss module, evaluation, reporting
# --------------------------------------------------------------------------------------------------


def epoch_plan(
    lengths: Sequence[int], *, batch_size: int, micro_per_step: int, seed: int, epoch: int, grouping: str
) -> list[list[list[int]]]:
    """The optimizer steps of one epoch, each a list of ``micro_per_step`` micro-batches of example indices.

    A pure function of (seed, epoch), so a resumed run rebuilds the same plan and skips to its step. A
    step's micro-batches are shared out over ranks (rank r takes ``step[r::world]``), so the plan — and
    the training — is the same for any split of ``micro_per_step = grad_accum x world_size``. Micro-batches
    left over at the end of an epoch (fewer than one step) are skipped; the next epoch reshuffles.
    """
    from todi.data import length_grouped_batches

    batches = length_grouped_batches(lengths, batch_size, seed=seed + epoch, mode=grouping)
    steps = len(batches) // micro_per_step
    return [batches[s * micro_per_step : (s + 1) * micro_per_step] for s in range(steps)]


def cosine_schedule(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier for step ``step``: linear warm-up to 1, then cosine decay to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    # A plain function on purpose: LambdaLR checkpoints the __dict__ of callable objects, which would
    # pin total_steps on resume; a function is rebuilt from the current options instead.
    return factor


class LossModule(nn.Module):
    """The student plus its objective in one ``forward``, so DDP / FSDP / DeepSpeed see one model call.

    Why: the fused loss uses the head weight outside the head's own forward call (the model runs with
    its head as the identity, then the loss projects chunk by chunk). FSDP unshards the root unit's
    parameters (embeddings, final norm, head) for the whole of the root module's forward, so with the
    loss inside this forward it reads the gathered head, not a shard. The teacher is held outside the
    module tree (frozen, replicated, never in the optimizer, the state dict or a DDP bucket).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, loss_fn: Callable[..., Any]) -> None:
        super().__init__()
        self.student = student
        self._teacher = (teacher,)  # a tuple hides it from nn.Module's registration
        self.loss_fn = loss_fn
        self.fused = True
        # FSDP's transformer auto-wrap reads the layer classes to wrap from the root module.
        self._no_split_modules = getattr(causal_lm(student), "_no_split_modules", None)

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0]

    def forward(
        self,
        batch: dict[str, Tensor],
        num_items_in_batch: int | Tensor | None = None,
        teacher_rows: SparseTeacher | None = None,
        ce_only: bool = False,
    ) -> Any:
        """``teacher_rows``: the batch's rows of a teacher cache, used instead of the teacher model;
        ``ce_only``: the cross-entropy alone (dev batches under a teacher cache, which holds no dev rows)."""
        extra = {"kd_rate": 0.0} if ce_only else {}
        return self.loss_fn(
            causal_lm(self.student),
            None if ce_only else (teacher_rows if teacher_rows is not None else self.teacher),
            batch,
            num_items_in_batch=num_items_in_batch,
            fused=self.fused,
            **extra,
        )


def _is_sharded(accelerator: Any) -> bool:
    """Whether parameters are split over ranks (FSDP, ZeRO-3): then only collectives can read them whole."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return (
        accelerator.distributed_type == DistributedType.DEEPSPEED
        and plugin is not None
        and plugin.zero_stage == 3
    )


def _prepare_fused_head(accelerator: Any, model: nn.Module) -> str | None:
    """Make the fused loss read the whole output head under sharding; the reason it cannot, else None.

    ZeRO-3 gathers a module's parameters only around that module's own forward, and the fused loss
    reads the head weight after the head's forward has returned: registering it as an external parameter
    of the root module makes DeepSpeed keep it gathered for the root's whole forward. FSDP already
    unshards the root unit inside LossModule.forward, unless the wrapping policy gave the head a unit of
    its own (then its weight is a shard outside its forward).
    """
    from accelerate.utils import DistributedType

    if not _is_sharded(accelerator):
        return None
    root = accelerator.unwrap_model(model)
    head = causal_lm(root.student).get_output_embeddings()
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        try:
            import deepspeed

            for param in (head.weight, getattr(head, "bias", None)):
                if param is not None:
                    deepspeed.zero.register_external_parameter(root, param)
        except Exception as err:  # an old DeepSpeed or a model layout it cannot hook
            return f"could not register the output head with ZeRO-3 ({type(err).__name__}: {err})"
        return None
    import torch.distributed.fsdp as fsdp

    # FSDP1 wraps units in FullyShardedDataParallel; FSDP2 (fully_shard) turns them into FSDPModule.
    names = ("FullyShardedDataParallel", "FSDPModule")
    units = tuple(cls for cls in (getattr(fsdp, name, None) for name in names) if cls is not None)
    for module in model.modules():
        if module is model or module is root or not isinstance(module, units):
            continue
        if any(sub is head for sub in module.modules()):
            return "the FSDP wrapping policy puts the output head into its own unit, so it is a shard there"
    return None


@contextmanager
def _keep_rng() -> Iterator[None]:
    """Evaluation must not move the training RNG streams (dropout, sampling), or a run with --dev would
    train differently from one without."""
    import numpy as np  # an accelerate dependency

    py, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def _peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _sum_over_ranks(accelerator: Any, values: list[float]) -> list[float]:
    if accelerator.num_processes == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


class _Reporter:
    """Progress bar, metrics.jsonl, TensorBoard and wandb; active on the main process only."""

    def __init__(
        self, run_dir: Path, config: TrainConfig, total_steps: int, state: TrainerState, active: bool
    ):
        self.active = active
        self.writers: list[Any] = []
        self.wandb: Any = None
        self.bar: Any = None
        if not active:
            return
        from tqdm.auto import tqdm

        self.metrics = run_dir / METRICS_NAME
        self._truncate(state.global_step)
        targets = _report_targets(config.report_to)
        if "tensorboard" in targets:
            from torch.utils.tensorboard import SummaryWriter

            self.writers.append(SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=state.global_step + 1))
        if "wandb" in targets:
            import wandb

            self.wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "todi"),
                name=run_dir.name,
                dir=str(run_dir),
                config=dataclasses.asdict(config),
                resume="allow",
            )
        self.bar = tqdm(total=total_steps, initial=state.global_step, desc=config.command, dynamic_ncols=True)

    def _truncate(self, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: drop their old records."""
        if not self.metrics.exists():
            return
        kept = [
            line
            for line in self.metrics.read_text(encoding="utf-8").splitlines()
            if _record_step(line) <= step
        ]
        self.metrics.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def advance(self, epoch: float) -> None:
        if self.bar is not None:
            self.bar.set_description(f"epoch {epoch:.2f}", refresh=False)
            self.bar.update(1)

    def log(self, record: dict[str, Any], prefix: str = "train") -> None:
        if not self.active:
            return
        with self.metrics.open("a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
        step = record["step"]
        scalars = {
            k: v for k, v in record.items() if k not in ("step", "epoch") and isinstance(v, (int, float))
        }
        for writer in self.writers:
            for key, value in scalars.items():
                writer.add_scalar(f"{prefix}/{key}", value, step)
            writer.flush()
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in scalars.items()}, step=step)
        if self.bar is not None and prefix == "train":
            shown = {k: record[k] for k in ("loss", "ce", "kd") if k in record}
            postfix = {k: f"{v:.4f}" for k, v in shown.items()}
            postfix["tok/s"] = f"{record['tokens_per_s']:.0f}"
            self.bar.set_postfix(postfix, refresh=False)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)  # with the bar and the log, not into piped stdout
        elif self.active:
            logger.info("%s", text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for writer in self.writers:
            writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


class _StopRequest:
    """Ctrl-C / SIGTERM: the first one lets the current step finish, saves a checkpoint and stops; a
    second one aborts at once. Stopping at a step boundary keeps resume exact."""

    def __init__(self) -> None:
        self.requested = False
        self.signum = int(signal.SIGINT)
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise Stopped(signum)
        self.requested, self.signum = True, signum
        logger.warning(
            "%s received: stopping after this step with a checkpoint (send it again to abort at once)",
            signal.Signals(signum).name,
        )

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------------------------------
# Setup helpers (all run before any model weights are loaded)
# --------------------------------------------------------------------------------------------------


def _make_accelerator(config: TrainConfig) -> Any:
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    mixed = config.mixed_precision
    if mixed == "auto":
        mixed = os.environ.get("ACCELERATE_MIXED_PRECISION") or (
            "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
        )
    if mixed == "fp16" and not cuda:
        # accelerate would silently train in float32 on a CPU.
        source = (
            "--mixed-precision fp16" if config.mixed_precision == "fp16" else "the accelerate config's fp16"
        )
        raise UsageError(f"{source} needs a GPU; this machine has none", "use --mixed-precision no or bf16")
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision=mixed,
        gradient_accumulation_steps=config.grad_accum,
        # The schedule counts optimizer steps; accelerate would otherwise step it once per process.
        step_scheduler_with_optimizer=False,
    )
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        # DeepSpeed reads the micro-batch size from a prepared DataLoader, and todi batches on its own.
        ds = plugin.deepspeed_config
        if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds["train_micro_batch_size_per_gpu"] = config.batch_size
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = config.max_grad_norm
    if not accelerator.is_main_process:
        logging.getLogger("todi").setLevel(logging.WARNING)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # accelerate logs every file of every checkpoint at INFO; keep the console to todi's own lines.
        logging.getLogger("accelerate").setLevel(logging.WARNING)
        # Tied embeddings (GPT-2) are stored once in safetensors and re-tied on load, as intended: the
        # warning would repeat at every checkpoint. Resume tests check the reloaded weights are exact.
        logging.getLogger("accelerate.utils.other").addFilter(_drop_shared_tensor_warning)
    return accelerator


def _drop_shared_tensor_warning(record: logging.LogRecord) -> bool:
    return "Removed shared tensor" not in record.getMessage()


@contextmanager
def _claimed(accelerator: Any, folder: OutputFolder) -> Iterator[None]:
    """The main process holds the lock on --out for the whole run (see :mod:`todi.outputs`); the other
    ranks learn whether it got it, so that none waits in a collective for a rank that gave up."""
    with contextlib.ExitStack() as stack:
        error: TodiError | None = None
        if accelerator.is_main_process:
            try:
                stack.enter_context(folder.held())
            except TodiError as err:
                error = err
        if any_rank(accelerator, error is not None):
            raise error or TodiError(f"the main process could not lock {folder.path}", "see its error")
        yield


def _run_identity(config: TrainConfig, train_set: Sequence[dict]) -> dict[str, str]:
    """What the run's inputs hold (not just their names): a resumed run must continue on the same ones."""
    identity = {"data": _data_digest(train_set), "student": model_identity(config.student_path)}
    if config.teacher_path:
        identity["teacher"] = model_identity(config.teacher_path)
    lora = getattr(config, "teacher_lora", None)
    if lora:
        identity["teacher_lora"] = model_identity(lora)
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


def _recorded_options(config: TrainConfig) -> dict[str, Any]:
    # How this invocation treated --out is not part of the run.
    return {
        k: v
        for k, v in dataclasses.asdict(config).items()
        if k not in ("resume", "resume_changed", "overwrite")
    }


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
            info = _read_json(run_dir / RUN_INFO_NAME)
            return {
                "options": options,
                "command": info.get("command"),
                "micro_batches_per_step": info.get("micro_batches_per_step"),
            }
    return None


def _check_resume(
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
    old, new = last["options"], _recorded_options(config)
    fixed = [
        f"{k} ({old[k]!r} before, {new[k]!r} now)"
        for k in _LOCKED_ON_RESUME
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
        if k in old and old[k] != new[k] and k not in _FREE_ON_RESUME and k not in _LOCKED_ON_RESUME
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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _init_run_dir(run_dir: Path, config: TrainConfig, accelerator: Any) -> None:
    """Main process: a new run records its options (config.yaml, reusable as --config) and versions; a
    resumed one keeps them (each segment is appended to segments.jsonl instead)."""
    import yaml

    remove_stale(run_dir)
    if (run_dir / CONFIG_NAME).is_file() and config.resume:
        return
    options = _recorded_options(config)
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


def _append_segment(
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
        "options": _recorded_options(config),
        "identity": identity,
        "changed": changes,
    }
    with (run_dir / SEGMENTS_NAME).open("a", encoding="utf-8") as file:
        file.write(json.dumps(record, default=str) + "\n")


def _finite_step(accelerator: Any, step_sums: Tensor, grad_norm: Tensor | float | None) -> bool:
    """Whether this step's loss (and gradient norm) are finite on every rank. Under fp16 loss scaling an
    infinite gradient norm is the scaler's business (it skips the step and lowers the scale)."""
    finite = torch.isfinite(step_sums[:3]).all()
    if grad_norm is not None and getattr(accelerator, "scaler", None) is None:
        finite = finite & torch.isfinite(torch.as_tensor(grad_norm, device=finite.device)).all()
    return not any_rank(accelerator, not bool(finite))


def _non_finite_error(
    config: TrainConfig,
    accelerator: Any,
    state: TrainerState,
    step_sums: Tensor,
    grad_norm: Tensor | float | None,
    run_dir: Path,
) -> NonFiniteError:
    loss = float(step_sums[0])
    norm = "?" if grad_norm is None else f"{float(grad_norm):.4g}"
    causes = []
    if config.lr > 1e-2:
        causes.append(f"--lr {config.lr:g} is far above the usual 1e-5..1e-3")
    if accelerator.mixed_precision == "fp16":
        causes.append("float16 overflow (use bf16, or float32)")
    causes.append("NaN/inf in the data or in a model's outputs (a teacher in float16 overflows)")
    saved = list_checkpoints(run_dir)
    resume = f"--resume continues from {saved[-1].name}" if saved else "no checkpoint was written yet"
    return NonFiniteError(
        f"step {state.global_step + 1}: the loss is {loss:.4g} and the gradient norm {norm}; the update was "
        "not applied, so no weights with NaN/inf were written",
        f"likely causes: {'; '.join(causes)}. Fix it and rerun ({resume}), or pass --nan-policy skip to "
        "skip such steps",
    )


def _load_data(config: TrainConfig, tokenizer: Any) -> tuple[list[dict], list[Any], list[dict]]:
    """(encoded train set, dev examples, encoded dev set); data errors surface here, before any model."""
    from todi.data import check_template, encode_examples, load_examples

    check_template(config.template, tokenizer)
    lengths = {
        "template": config.template,
        "max_prompt_length": config.max_prompt_length,
        "max_length": config.max_length,
    }
    examples = load_examples(config.data, "train", max_examples=config.max_examples)
    train_set, _ = encode_examples(examples, tokenizer, **lengths)
    dev_examples: list[Any] = []
    dev_set: list[dict] = []
    if config.dev:
        dev_examples = load_examples(config.dev, "dev", max_examples=config.dev_max_examples)
        dev_set, _ = encode_examples(dev_examples, tokenizer, **lengths)
    return train_set, dev_examples, dev_set


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on norms and biases), the usual choice for transformers."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


# --------------------------------------------------------------------------------------------------
# Evaluation and export
# --------------------------------------------------------------------------------------------------


def _evaluate(
    accelerator: Any,
    model: nn.Module,
    tokenizer: Any,
    collate: Callable[[list[dict]], dict[str, Tensor]],
    dev_examples: Sequence[Any],
    dev_set: Sequence[dict],
    config: TrainConfig,
) -> dict[str, float]:
    """Dev loss (objective, CE and KD per supervised token) and dev ROUGE-L of sampled answers (x100).

    Both are shared out over ranks and summed; every rank runs the same number of forward passes, as
    DDP / FSDP forwards hold collectives.
    """
    from todi.evaluation import GenerationSettings, evaluate_model

    rank, world = accelerator.process_index, accelerator.num_processes
    results: dict[str, float] = {}
    model.eval()
    with _keep_rng(), torch.no_grad():
        order = sorted(range(len(dev_set)), key=lambda i: -len(dev_set[i]["input_ids"]))
        batches = [order[s : s + config.batch_size] for s in range(0, len(order), config.batch_size)]
        total = sum(supervised_positions(example) for example in dev_set)
        mine = batches[rank::world]
        rounds = math.ceil(len(batches) / world)
        sums = [0.0, 0.0, 0.0]
        ce_only = bool(getattr(config, "teacher_cache", None))
        for i in range(rounds):
            # Ranks with no batch left repeat one and discard it, to keep forwards in lockstep.
            idx = mine[i] if i < len(mine) else batches[0]
            batch = {k: v.to(accelerator.device) for k, v in collate([dev_set[j] for j in idx]).items()}
            out = model(batch, num_items_in_batch=total, ce_only=ce_only)
            if i < len(mine):
                sums = [sums[0] + float(out.loss), sums[1] + float(out.ce), sums[2] + float(out.kd)]
        loss, ce, kd = _sum_over_ranks(accelerator, sums)
        results.update(dev_loss=loss, dev_ce=ce)
        if not ce_only:
            results["dev_kd"] = kd

        if _is_sharded(accelerator):
            # Sampling runs each rank's own number of forwards, which sharded parameters cannot serve.
            logger.warning("dev ROUGE-L is skipped under FSDP / ZeRO-3; checkpoints are ranked by dev loss")
        else:
            settings = GenerationSettings(
                max_new_tokens=config.eval_max_new_tokens, batch_size=config.eval_batch_size
            )
            student = accelerator.unwrap_model(model).student
            shard = list(dev_examples[rank::world])
            seeds = _parse_seeds(config.eval_seeds)
            total_score = 0.0
            with accelerator.autocast():
                for seed in seeds:
                    if shard:
                        mean, _ = evaluate_model(
                            student,
                            tokenizer,
                            shard,
                            settings=settings,
                            seed=seed,
                            template=config.template,
                            max_prompt_length=config.max_prompt_length,
                        )
                        total_score += mean * len(shard)
            (score_sum,) = _sum_over_ranks(accelerator, [total_score])
            results["dev_rougeL"] = score_sum / (len(dev_examples) * len(seeds))
    model.train()
    return results


def _export(
    accelerator: Any, model: nn.Module, tokenizer: Any, path: Path, config: TrainConfig, *, final: bool
) -> None:
    """Write a plain Hugging Face folder of the student (collective under FSDP / ZeRO-3)."""
    student = accelerator.unwrap_model(model).student
    merge = config.lora_r > 0 and not config.keep_adapter
    if _is_sharded(accelerator):
        state_dict = accelerator.get_state_dict(model)  # gathers the full weights on the main process
        if accelerator.is_main_process:
            state_dict = {k.removeprefix("student."): v for k, v in state_dict.items()}
            if merge:
                # Merging needs whole weights: rebuild the LoRA student on the CPU and load the gathered ones.
                with _replicated_loading(accelerator):
                    cpu_student = _build_student(config, torch.float32)
                cpu_student.load_state_dict(state_dict)
                export_model(cpu_student, tokenizer, path, merge_lora=True)
            else:
                export_model(student, tokenizer, path, merge_lora=False, state_dict=state_dict)
    elif accelerator.is_main_process:
        export_model(student, tokenizer, path, merge_lora=merge, copy_before_merge=not final)
    accelerator.wait_for_everyone()


@contextmanager
def _replicated_loading(accelerator: Any) -> Iterator[None]:
    """Load a whole, unsharded model on every rank (the frozen teacher; a CPU copy for export).

    Under ZeRO-3, from_pretrained would partition it at load time (zero.Init), and FSDP's RAM-efficient
    loading would leave it on the meta device on all ranks but 0; neither suits a model no engine wraps.
    """
    with contextlib.ExitStack() as stack:
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if plugin is not None:
            stack.enter_context(plugin.zero3_init_context_manager(enable=False))
        saved = os.environ.pop("FSDP_CPU_RAM_EFFICIENT_LOADING", None)
        try:
            yield
        finally:
            if saved is not None:
                os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = saved


def _build_student(config: TrainConfig, dtype: torch.dtype) -> nn.Module:
    student = load_causal_lm(config.student_path, dtype=dtype, trust_remote_code=config.trust_remote_code)
    if config.lora_r:
        student = add_lora(
            student,
            r=config.lora_r,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            target=config.lora_target,
        )
    return student


# --------------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------------


def train(config: TrainConfig) -> Path:
    """Run SFT (no teacher) or distillation; returns the folder of the final model (``OUT/final``)."""
    # ---- 1. Everything that can refuse the run, before any weights load and before --out is touched.
    config.check()
    accelerator = _make_accelerator(config)
    folder = OutputFolder(
        config.out,
        config.command,
        inputs=config.inputs(),
        overwrite=config.overwrite,
        keep_on_failure=lambda path: bool(list_checkpoints(path)),
    )
    folder.check(reuse=config.resume)  # read-only: every rank may run it
    with _claimed(accelerator, folder):
        return _train(config, accelerator, folder)


def _train(config: TrainConfig, accelerator: Any, folder: OutputFolder) -> Path:
    from accelerate.utils import set_seed

    from todi.data import DataCollator, check_tokenizers, ensure_pad_token, shared_vocab_size
    from todi.losses import causal_lm_distillation_loss

    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    run_dir = folder.path
    cache = None
    if getattr(config, "teacher_cache", None):
        from todi.cache import TeacherCache

        cache = TeacherCache(config.teacher_cache, tail_mode=config.cache_tail)
    tokenizer = load_tokenizer(config.student_path, trust_remote_code=config.trust_remote_code)
    if config.teacher_path:
        teacher_tokenizer = load_tokenizer(config.teacher_path, trust_remote_code=config.trust_remote_code)
        check_tokenizers(teacher_tokenizer, tokenizer)
    # Exported as loaded: a pad token added for batching would make the exported teacher's tokenizer
    # differ from its student's (check_tokenizers compares pad ids) in the next `todi distill`.
    pristine_tokenizer = copy.deepcopy(tokenizer)
    pad_id = ensure_pad_token(tokenizer)
    train_set, dev_examples, dev_set = _load_data(config, tokenizer)
    if cache is not None:
        cache.check(
            tokenizer=pristine_tokenizer,
            encoded=train_set,
            template=config.template,
            max_length=config.max_length,
            max_prompt_length=config.max_prompt_length,
            data=config.data,
        )
    identity = _run_identity(config, train_set)
    changes = _check_resume(run_dir, config, world, identity) if config.resume else {}
    lengths = [len(example["input_ids"]) for example in train_set]
    supervised = [supervised_positions(example) for example in train_set]
    micro_per_step = config.grad_accum * world
    plan_options = {
        "batch_size": config.batch_size,
        "micro_per_step": micro_per_step,
        "seed": config.seed,
        "grouping": config.group_by_length,
    }
    steps_per_epoch = len(epoch_plan(lengths, epoch=0, **plan_options))
    if steps_per_epoch == 0:
        raise UsageError(
            f"{len(train_set)} training examples do not fill one optimizer step of {micro_per_step} "
            f"micro-batches of {config.batch_size}",
            "lower --batch-size or --grad-accum, or use more data",
        )
    total_steps = config.max_steps or config.epochs * steps_per_epoch

    # ---- 2. Models: the trained student (optionally LoRA) and the frozen teacher.
    set_seed(config.seed)  # LoRA initialisation and dropout; a resume restores the RNG states later
    student = _build_student(config, resolve_dtype(config.dtype, device))
    check_finite_parameters(student, f"student {config.student_path}")
    trainable, total = count_parameters(student)
    logger.info(
        "student %s: %.1fM of %.1fM parameters trainable", config.student_path, trainable / 1e6, total / 1e6
    )
    teacher, vocab_size = None, None
    if config.teacher_path:
        assert isinstance(config, DistillConfig)
        with _replicated_loading(accelerator):
            teacher = load_causal_lm(
                config.teacher_path,
                dtype=resolve_dtype(config.teacher_dtype, device, auto=torch.bfloat16),
                trust_remote_code=config.trust_remote_code,
                adapter=config.teacher_lora,
            )
        check_finite_parameters(teacher, f"teacher {config.teacher_path}", "--teacher-dtype")
        teacher = freeze(teacher).to(device)
        heads = [m.get_output_embeddings().weight.shape[0] for m in (causal_lm(student), teacher)]
        vocab_size = shared_vocab_size(tokenizer, *heads)
        if config.kd_rate == 0:
            logger.warning("--kd-rate 0: the teacher is loaded but does not contribute to the loss")
    if cache is not None:
        vocab_size = shared_vocab_size(tokenizer, causal_lm(student).get_output_embeddings().weight.shape[0])
        if vocab_size != cache.vocab_size:
            raise UsageError(
                f"the student's tokenizer has {vocab_size} tokens but teacher cache {config.teacher_cache} "
                f"covers {cache.vocab_size}",
                "use a student with the teacher's tokenizer",
            )
    loss_fn = functools.partial(
        causal_lm_distillation_loss,
        **config.loss_options(),
        chunk_size=config.chunk_size,
        vocab_size=vocab_size,
        compile=config.compile,
    )
    model = LossModule(student, teacher, loss_fn)
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr)
    schedule = cosine_schedule(config.warmup_steps, total_steps, config.min_lr / config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    module = accelerator.unwrap_model(model)
    module.fused = config.fused
    if config.fused:
        reason = _prepare_fused_head(accelerator, model)
        if reason:
            logger.warning("fused loss disabled: %s; computing the loss on materialised logits", reason)
            module.fused = False

    # ---- 3. The inputs have loaded: only now may an old run in --out be set aside (--overwrite).
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        folder.replace_old()
        _init_run_dir(run_dir, config, accelerator)
    accelerator.wait_for_everyone()

    # ---- 4. Resume: weights, optimizer, scheduler, RNG states and the data position.
    state = TrainerState()
    if config.resume:
        loaded = load_latest_checkpoint(accelerator, run_dir)
        if loaded is None:
            logger.info("--resume: %s has no checkpoint yet; starting from step 0", run_dir)
        else:
            state, path = loaded
            logger.info("resumed from %s (step %d, epoch %d)", path, state.global_step, state.epoch)
            if state.global_step > total_steps:
                raise UsageError(
                    f"--resume: the run in {run_dir} is already at step {state.global_step}, past the "
                    f"{total_steps} steps this command asks for",
                    "raise --max-steps (or --epochs) to train longer; its final model is in "
                    f"{run_dir / 'final'}",
                )
    if accelerator.is_main_process:
        _append_segment(run_dir, config, accelerator, identity, changes, state.global_step)

    collate = DataCollator(pad_id, pad_to_multiple_of=8 if device.type == "cuda" else None)
    # The loss is normalised by the supervised tokens of the whole global step (all micro-batches and
    # ranks); accelerate divides it by grad_accum and DDP averages gradients over ranks, so scaling by
    # both makes the update the gradient of exactly that normalised loss, whatever the split.
    loss_scale = config.grad_accum * world
    reporter = _Reporter(run_dir, config, total_steps, state, accelerator.is_main_process)
    # Per logging window: loss, ce, kd, ToDi weight x tokens, tokens with a ToDi weight.
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    window_steps, window_tokens, window_start = 0, 0, time.perf_counter()
    skips_in_a_row = 0
    last_saved = state.global_step if list_checkpoints(run_dir) else -1
    grad_norm = torch.zeros(())

    def checkpoint() -> None:
        nonlocal last_saved
        save_checkpoint(accelerator, run_dir, state)
        last_saved = state.global_step
        if accelerator.is_main_process:
            rotate_checkpoints(run_dir, keep_last=config.keep_last, keep_best=config.save_best)

    # ---- 5. The loop: one iteration = one optimizer step over `micro_per_step` micro-batches.
    model.train()
    try:
        with _StopRequest() as stop:
            plan, plan_epoch = [], -1
            while state.global_step < total_steps:
                if plan_epoch != state.epoch:
                    plan, plan_epoch = epoch_plan(lengths, epoch=state.epoch, **plan_options), state.epoch
                step_micro = plan[state.step_in_epoch]
                num_items = sum(supervised[i] for micro in step_micro for i in micro)
                step_sums = torch.zeros_like(sums)
                for micro in step_micro[rank::world]:
                    batch = {k: v.to(device) for k, v in collate([train_set[i] for i in micro]).items()}
                    rows = None if cache is None else cache.rows(micro).to(device)
                    # accumulate() skips the gradient all-reduce on all but the last micro-batch.
                    with accelerator.accumulate(model):
                        out = model(batch, num_items_in_batch=num_items, teacher_rows=rows)
                        accelerator.backward(out.loss * loss_scale)
                    # Kept on the device: reading the values back each micro-batch would stall a GPU.
                    weighted = out.loss.new_zeros(2)
                    if out.todi_weight is not None:
                        tokens = out.loss.new_tensor(float(out.num_tokens))
                        weighted = torch.stack([out.todi_weight.detach() * tokens, tokens])
                    step_sums += torch.cat(
                        [torch.stack([out.loss.detach(), out.ce, out.kd]), weighted]
                    ).double()
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                if _finite_step(accelerator, step_sums, grad_norm):
                    optimizer.step()
                    sums += step_sums
                    window_steps += 1
                    skips_in_a_row = 0
                else:
                    # Nothing non-finite reaches the weights: stop here, or skip this update and count it.
                    skips_in_a_row += 1
                    error = _non_finite_error(config, accelerator, state, step_sums, grad_norm, run_dir)
                    if config.nan_policy == "stop" or skips_in_a_row >= _MAX_SKIPS_IN_A_ROW:
                        raise error
                    state.extra["skipped_steps"] = state.extra.get("skipped_steps", 0) + 1
                    logger.warning("%s; update skipped (--nan-policy skip)", error)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                epoch_float = state.epoch + (state.step_in_epoch + 1) / len(plan)
                state.global_step += 1
                state.step_in_epoch += 1
                state.tokens_seen += num_items
                window_tokens += sum(lengths[i] for micro in step_micro for i in micro)
                end_of_epoch = state.step_in_epoch == len(plan)
                if end_of_epoch:
                    state.epoch, state.step_in_epoch = state.epoch + 1, 0
                done = state.global_step >= total_steps
                reporter.advance(epoch_float)

                if state.global_step % config.log_every == 0 or done:
                    loss, ce, kd, weight, has_weight = _sum_over_ranks(accelerator, sums.tolist())
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    per_step = 1.0 / window_steps if window_steps else math.nan  # all skipped: NaN
                    record = {
                        "step": state.global_step,
                        "epoch": round(epoch_float, 4),
                        "lr": scheduler.get_last_lr()[0],
                        "loss": loss * per_step,
                        "ce": ce * per_step,
                        "kd": kd * per_step,
                        "todi_weight": weight / has_weight if has_weight else None,
                        "grad_norm": float(grad_norm) if grad_norm is not None else None,
                        "tokens_per_s": window_tokens / elapsed,
                        "peak_mem": _peak_memory_mib(),
                    }
                    if state.extra.get("skipped_steps"):
                        record["skipped_steps"] = state.extra["skipped_steps"]
                    reporter.log(record)
                    sums.zero_()
                    window_steps, window_tokens, window_start = 0, 0, time.perf_counter()

                evaluate_now = bool(dev_set) and (
                    (config.eval_every and state.global_step % config.eval_every == 0)
                    or (not config.eval_every and end_of_epoch)
                    or done
                )
                paused = time.perf_counter()  # evaluation and checkpoints do not count for tokens/s
                if evaluate_now and state.evaluated_step != state.global_step:
                    started = time.perf_counter()
                    results = _evaluate(accelerator, model, tokenizer, collate, dev_examples, dev_set, config)
                    state.dev = results
                    state.evaluated_step = state.global_step
                    state.score = results.get("dev_rougeL", -results["dev_loss"])
                    reporter.log(
                        {"step": state.global_step, "epoch": round(epoch_float, 4), **results}, "dev"
                    )
                    shown = ", ".join(f"{k} {v:.4f}" for k, v in results.items())
                    reporter.write(
                        f"step {state.global_step} dev: {shown} ({time.perf_counter() - started:.0f} s)"
                    )
                    if state.best_score is None or state.score > state.best_score:
                        state.best_score, state.best_step = state.score, state.global_step
                        _export(accelerator, model, pristine_tokenizer, run_dir / "best", config, final=False)
                else:
                    state.dev, state.score = None, None

                stopping = any_rank(accelerator, stop.requested)
                if (
                    (config.save_every and state.global_step % config.save_every == 0)
                    or evaluate_now
                    or done
                    or stopping
                ):
                    checkpoint()
                window_start += time.perf_counter() - paused
                if stopping:
                    reporter.write(
                        f"stopped at step {state.global_step}; checkpoint saved, continue with --resume"
                    )
                    raise Stopped(stop.signum)
        # ---- 6. Export the final student as a plain Hugging Face folder.
        if last_saved != state.global_step:
            checkpoint()
        final = run_dir / "final"
        _export(accelerator, model, pristine_tokenizer, final, config, final=True)
        if state.best_step is not None:
            reporter.write(
                f"best dev score {state.best_score:.4f} at step {state.best_step} (exported to {run_dir / 'best'})"
            )
        reporter.write(f"final model: {final}")
        return final
    finally:
        reporter.close()
