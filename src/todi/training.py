"""``todi sft`` and ``todi distill``: fine-tune a teacher, distil it into a student.

One loop serves both: SFT is distillation without a teacher (``kd_rate = 0``). The file reads top to
bottom: the options, :func:`train` (checks, then the loop: each step of a training step is a call named
for what it does), the setup functions it calls (data, student, teacher, optimizer, run folder), then the
pieces of a step. Model loading lives in :mod:`todi.models`, checkpoint files in :mod:`todi.checkpoint`,
what the run folder records (and strict resume) in :mod:`todi.run_record`, processes and sharding in
:mod:`todi.parallel`, dev ROUGE-L in :func:`todi.evaluation.dev_rouge`, the objective in
:func:`todi.losses.causal_lm_distillation_loss`.

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

import abc
import copy
import dataclasses
import functools
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from todi.checkpoint import (
    TrainerState,
    any_rank,
    list_checkpoints,
    load_latest_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
)
from todi.data import DataCollator, supervised_positions
from todi.divergences import DIVERGENCES, get_divergence
from todi.errors import NonFiniteError, Stopped, UsageError
from todi.losses import LossOutput
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
    resolve_dtype,
)
from todi.options import option
from todi.outputs import OutputFolder
from todi.parallel import (
    claimed,
    is_sharded,
    make_accelerator,
    prepare_fused_head,
    replicated_loading,
    sum_over_ranks,
)
from todi.run_record import append_segment, check_resume, run_identity, write_run_info

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

METRICS_NAME = "metrics.jsonl"
MIN_TEMPERATURE = 1e-2
_MAX_SKIPS_IN_A_ROW = 10


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig(abc.ABC):
    """Options shared by ``todi sft`` and ``todi distill``; a config checks itself when built, so an
    invalid one cannot exist (every problem is reported at once, by option name)."""

    data: str = option(
        "",
        "training data (required): a .jsonl file, a folder holding train.jsonl, a datasets save_to_disk "
        "folder or a Hub data set name",
    )
    out: str = option("", "run folder (required): config, metrics.jsonl, tb/, checkpoints/, best/, final/")
    dev: str | None = option(
        None, "dev data, scored during training (dev loss, dev ROUGE-L); a folder gives its dev.jsonl"
    )
    resume: bool = option(False, "continue the run in --out from its newest usable checkpoint")
    resume_changed: bool = option(
        False,
        "with --resume: continue even though the teacher, student or data contents, the loss or its "
        "parameters, or the optimisation options changed (each change is recorded in segments.jsonl)",
    )
    overwrite: bool = option(
        False,
        "replace the todi run in --out: it is set aside once the inputs have loaded and deleted when this "
        "run succeeds (a folder without todi's marker is never deleted)",
    )
    nan_policy: Literal["stop", "skip"] = option(
        "stop",
        "a NaN/inf loss or gradient norm: stop (before any weights are written) or skip that update and "
        "count it (stops anyway after 10 in a row)",
    )
    # data
    template: str = option(
        "alpaca", "prompt template: alpaca, chat, none or a format string with {instruction}"
    )
    max_length: int = option(512, "tokens per example (prompt + response); longer responses are cut")
    max_prompt_length: int = option(256, "prompt tokens kept (from the end of the prompt)")
    max_examples: int | None = option(None, "use only the first N training examples")
    dev_max_examples: int | None = option(None, "use only the first N dev examples")
    group_by_length: Literal["bucket", "sort", "none"] = option(
        "bucket", "batch examples of similar length together (less padding)"
    )
    # optimisation
    epochs: int = option(10, "passes over the training data (ignored when --max-steps is set)")
    max_steps: int = option(0, "optimizer steps to run; 0 = --epochs full passes")
    batch_size: int = option(8, "examples per micro-batch per device")
    grad_accum: int = option(1, "micro-batches per optimizer step per device")
    lr: float = option(5e-4, "peak learning rate (AdamW)")
    min_lr: float = option(0.0, "learning rate at the end of the cosine decay")
    warmup_steps: int = option(0, "steps of linear warm-up before the cosine decay")
    weight_decay: float = option(0.0, "AdamW weight decay, applied to weight matrices only")
    max_grad_norm: float = option(1.0, "gradient clipping threshold (global L2 norm)")
    seed: int = option(42, "seed of initialisation (LoRA), data order and dropout")
    # precision and memory
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "dtype of the trained weights; auto = float32 (with bf16 autocast on GPUs)"
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = option(
        "auto", "autocast; auto = the accelerate config's, else bf16 on GPUs that support it, no on CPU"
    )
    fused: bool = option(True, "fused chunked head + loss (never builds [tokens, vocab] logits); --no-fused")
    chunk_size: int | None = option(None, "positions per chunk of the fused loss (default: automatic)")
    compile: bool | None = option(
        None, "torch.compile the fused loss's chunk math (default: when a batch has several full chunks)"
    )
    trust_remote_code: bool = option(False, "allow models whose code comes with their checkpoint")
    # LoRA
    lora_r: int = option(0, "LoRA rank of the trained model; 0 = train all weights")
    lora_alpha: float = option(16.0, "LoRA alpha (scale alpha / r)")
    lora_dropout: float = option(0.05, "LoRA dropout")
    lora_target: str = option("all-linear", "LoRA target modules: all-linear or comma-separated module names")
    keep_adapter: bool = option(False, "export the LoRA adapter instead of merging it into the weights")
    # evaluation
    eval_every: int = option(0, "evaluate on --dev every N steps; 0 = at the end of every epoch")
    eval_seeds: str = option("10", "comma-separated sampling seeds for dev ROUGE-L (mean over seeds)")
    eval_max_new_tokens: int = option(256, "tokens generated per dev answer")
    eval_batch_size: int = option(8, "dev prompts generated at once per device")
    # checkpoints and logs
    save_every: int = option(
        500, "checkpoint every N steps (also after every evaluation and at the end); 0 = off"
    )
    save_best: int = option(1, "keep the N checkpoints with the best dev score (ROUGE-L), besides the newest")
    keep_last: int = option(2, "keep the N newest checkpoints (>= 2 leaves one to fall back on)")
    log_every: int = option(10, "write metrics every N steps")
    report_to: str = option("tensorboard", "comma-separated: tensorboard, wandb, none (metrics.jsonl always)")

    command = "train"

    def __post_init__(self) -> None:
        self.check()

    @property
    @abc.abstractmethod
    def student_path(self) -> str:
        """The model that is trained."""

    @property
    def teacher_path(self) -> str | None:
        return None

    @property
    def teacher_lora_path(self) -> str | None:
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
        from todi.evaluation import parse_seeds

        try:
            parse_seeds(self.eval_seeds, "--eval-seeds")
        except UsageError as err:
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

    model: str = option("", "model to fine-tune (required): a local folder or a Hugging Face Hub id")

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

    teacher: str = option(
        "", "teacher (required unless --teacher-cache): a local folder (e.g. runs/teacher/final) or a Hub id"
    )
    teacher_cache: str | None = option(
        None,
        "distil from a teacher cache written by `todi cache-teacher` instead of running --teacher "
        "(the dev loss is then the CE alone)",
    )
    cache_tail: Literal["sampled", "bucket", "uniform"] = option(
        "sampled",
        "with --teacher-cache: sampled = divergences on all tokens, the teacher's tail mass shared out by "
        "the tail tokens the cache drew; bucket = on the k stored tokens + one tail bucket (fastest); "
        "uniform = on all tokens, the tail mass spread evenly (see docs/performance.md)",
    )
    student: str = option("", "student to train (required): a local folder or a Hub id")
    teacher_lora: str | None = option(None, "PEFT adapter folder merged into the teacher when it loads")
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "teacher dtype; auto = bfloat16 on GPUs, float32 on CPU"
    )
    loss: str = option("todi", f"divergence: {', '.join(DIVERGENCES)}")
    kd_rate: float = option(0.5, "weight of the divergence; 1 - kd_rate weighs the cross-entropy")
    temperature: float = option(2.0, "temperature of both distributions inside the divergence")
    beta: float | None = option(None, "ToDi: sharpness of the FKL/RKL weight (default 1.0)")
    todi_weight: Literal["sigmoid", "hard", "constant", "inverse"] | None = option(
        None,
        "ToDi: how the FKL weight a is formed from log p/q: sigmoid = sigmoid(beta log p/q) (default, the "
        "paper's); hard = 1 where p > q else 0; constant = 1/2; inverse = sigmoid(beta log q/p), a control",
    )
    skew: float | None = option(None, "skl / srkl: mixing weight (default 0.1)")
    mu: float | None = option(None, "akl: head/tail threshold (default 0.5)")

    command = "distill"

    @property
    def student_path(self) -> str:
        return self.student

    @property
    def teacher_path(self) -> str | None:
        return self.teacher

    @property
    def teacher_lora_path(self) -> str | None:
        return self.teacher_lora

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

    def divergence_params(self) -> dict[str, float | str]:
        # option name -> the divergence's parameter name
        names = {"beta": "beta", "skew": "skew", "mu": "mu", "todi_weight": "weight"}
        return {
            param: getattr(self, name) for name, param in names.items() if getattr(self, name) is not None
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
        elif self.todi_weight is not None and self.loss != "todi":
            out.append(f"--todi-weight applies to --loss todi, not --loss {self.loss}")
        else:
            try:
                get_divergence(self.loss).resolve(self.divergence_params())
            except ValueError as err:
                out.append(f"--loss {self.loss}: {err}")
        return out + super().problems()


def _report_targets(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip() and t.strip() != "none"]


# --------------------------------------------------------------------------------------------------
# Entry points and the loop
# --------------------------------------------------------------------------------------------------


def run_sft(config: SFTConfig) -> None:
    """``todi sft``."""
    train(config)


def run_distill(config: DistillConfig) -> None:
    """``todi distill``."""
    train(config)


def train(config: TrainConfig) -> Path:
    """Run SFT (no teacher) or distillation; returns the folder of the final model (``OUT/final``)."""
    config.check()  # built configs check themselves; this catches one changed since
    accelerator = make_accelerator(config)
    folder = OutputFolder(
        config.out,
        config.command,
        inputs=config.inputs(),
        overwrite=config.overwrite,
        keep_on_failure=lambda path: bool(list_checkpoints(path)),
    )
    folder.check(reuse=config.resume)  # read-only: every rank may run it
    with claimed(accelerator, folder):
        return _train(config, accelerator, folder)


def _train(config: TrainConfig, accelerator: Any, folder: OutputFolder) -> Path:
    run_dir, device = folder.path, accelerator.device
    best, final = run_dir / "best", run_dir / "final"  # the best dev checkpoint's model, the last one's
    # ---- Setup: everything that can refuse the run comes before --out is touched.
    cache = _open_teacher_cache(config)
    data = _setup_data(config, accelerator, cache)
    identity = run_identity(config, data.train_set)
    changes = check_resume(run_dir, config, accelerator.num_processes, identity) if config.resume else {}
    student = _setup_student(config, accelerator)
    teacher = _setup_teacher(config, accelerator, data.tokenizer, student, cache)
    model, optimizer, scheduler = _setup_optimizer(config, accelerator, student, teacher, data.total_steps)
    _take_over_run_dir(config, accelerator, folder)
    state = _resume(config, accelerator, run_dir, data.total_steps)
    if accelerator.is_main_process:
        append_segment(run_dir, config, accelerator, identity, changes, state.global_step)
    reporter = _Reporter(run_dir, config, data.total_steps, state, accelerator.is_main_process)
    window = _Window(device)
    last_saved = state.global_step if list_checkpoints(run_dir) else -1
    skips_in_a_row = 0

    # ---- The loop: one iteration = one optimizer step over grad_accum x processes micro-batches.
    model.train()
    try:
        with _StopRequest() as stop:
            while state.global_step < data.total_steps:
                step = data.plan.step(state)
                sums = _forward_backward(config, accelerator, model, data, teacher, step)
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                if _finite_step(accelerator, sums, grad_norm):
                    optimizer.step()
                    window.add(sums)
                    skips_in_a_row = 0
                else:  # nothing non-finite reaches the weights: stop, or skip this update and count it
                    skips_in_a_row = _skip_or_stop(
                        config, accelerator, state, sums, grad_norm, skips_in_a_row
                    )
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                epoch_float, end_of_epoch = data.plan.advance(state, step)
                window.tokens += data.plan.tokens(step)
                reporter.advance(epoch_float)
                done = state.global_step >= data.total_steps

                if state.global_step % config.log_every == 0 or done:
                    reporter.log(window.flush(accelerator, state, epoch_float, scheduler, grad_norm))
                evaluate_now = bool(data.dev_set) and (
                    (config.eval_every and state.global_step % config.eval_every == 0)
                    or (not config.eval_every and end_of_epoch)
                    or done
                )
                with window.paused():  # evaluation and checkpoints do not count for tokens/s
                    if evaluate_now and state.evaluated_step != state.global_step:
                        if _evaluate_on_dev(config, accelerator, model, data, state, reporter, epoch_float):
                            _export(accelerator, model, data.pristine_tokenizer, best, config, final=False)
                    else:
                        state.dev, state.score = None, None
                    stopping = any_rank(accelerator, stop.requested)
                    saving = config.save_every and state.global_step % config.save_every == 0
                    if saving or evaluate_now or done or stopping:
                        last_saved = _checkpoint(config, accelerator, run_dir, state)
                if stopping:
                    reporter.write(
                        f"stopped at step {state.global_step}; checkpoint saved, continue with --resume"
                    )
                    raise Stopped(stop.signum)

        # ---- The final student as a plain Hugging Face folder.
        if last_saved != state.global_step:
            _checkpoint(config, accelerator, run_dir, state)
        _export(accelerator, model, data.pristine_tokenizer, final, config, final=True)
        if state.best_step is not None:
            reporter.write(
                f"best dev score {state.best_score:.4f} at step {state.best_step} (exported to {best})"
            )
        reporter.write(f"final model: {final}")
        return final
    finally:
        reporter.close()


# --------------------------------------------------------------------------------------------------
# Setup: data, student, teacher, optimizer, run folder
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


class _DataPlan:
    """Which examples every optimizer step trains on (see :func:`epoch_plan`), and the data position."""

    def __init__(self, train_set: Sequence[dict], config: TrainConfig, world_size: int) -> None:
        self.lengths = [len(example["input_ids"]) for example in train_set]
        self.supervised = [supervised_positions(example) for example in train_set]
        self.options = {
            "batch_size": config.batch_size,
            "micro_per_step": config.grad_accum * world_size,
            "seed": config.seed,
            "grouping": config.group_by_length,
        }
        self._epoch, self._steps = -1, []
        self.steps_per_epoch = len(self.epoch(0))

    def epoch(self, epoch: int) -> list[list[list[int]]]:
        if epoch != self._epoch:
            self._steps, self._epoch = epoch_plan(self.lengths, epoch=epoch, **self.options), epoch
        return self._steps

    def step(self, state: TrainerState) -> list[list[int]]:
        """The micro-batches (lists of example indices) of the step ``state`` stands before."""
        return self.epoch(state.epoch)[state.step_in_epoch]

    def supervised_tokens(self, step: list[list[int]]) -> int:
        return sum(self.supervised[i] for micro in step for i in micro)

    def tokens(self, step: list[list[int]]) -> int:
        return sum(self.lengths[i] for micro in step for i in micro)

    def advance(self, state: TrainerState, step: list[list[int]]) -> tuple[float, bool]:
        """Move ``state`` past ``step``; returns the epoch reached (fractional) and whether it ended one."""
        steps = len(self.epoch(state.epoch))
        epoch_float = state.epoch + (state.step_in_epoch + 1) / steps
        state.global_step += 1
        state.step_in_epoch += 1
        state.tokens_seen += self.supervised_tokens(step)
        end_of_epoch = state.step_in_epoch == steps
        if end_of_epoch:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        return epoch_float, end_of_epoch


@dataclass
class _Data:
    tokenizer: Any  # with a pad token for batching
    pristine_tokenizer: Any  # as loaded: exported with the model
    collate: DataCollator
    train_set: list[dict]
    dev_examples: list[Any]
    dev_set: list[dict]
    plan: _DataPlan
    total_steps: int

    def batch(
        self, indices: Sequence[int], device: torch.device, examples: Sequence[dict] | None = None
    ) -> dict[str, Tensor]:
        rows = self.train_set if examples is None else examples
        return {k: v.to(device) for k, v in self.collate([rows[i] for i in indices]).items()}


def _open_teacher_cache(config: TrainConfig) -> Any:
    """The teacher cache of ``--teacher-cache`` (None without one); opened first: it is cheap, and a bad
    one refuses the run before anything loads."""
    if not config.teacher_cache_path:
        return None
    from todi.cache import TeacherCache

    return TeacherCache(config.teacher_cache_path, tail_mode=config.cache_tail)


def _setup_data(config: TrainConfig, accelerator: Any, cache: Any) -> _Data:
    """Tokenizer(s), training and dev sets, the batch plan; data errors surface here, before any model."""
    from todi.data import check_tokenizers, ensure_pad_token

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
    plan = _DataPlan(train_set, config, accelerator.num_processes)
    if plan.steps_per_epoch == 0:
        micro_per_step = plan.options["micro_per_step"]
        raise UsageError(
            f"{len(train_set)} training examples do not fill one optimizer step of {micro_per_step} "
            f"micro-batches of {config.batch_size}",
            "lower --batch-size or --grad-accum, or use more data",
        )
    collate = DataCollator(pad_id, pad_to_multiple_of=8 if accelerator.device.type == "cuda" else None)
    total_steps = config.max_steps or config.epochs * plan.steps_per_epoch
    return _Data(tokenizer, pristine_tokenizer, collate, train_set, dev_examples, dev_set, plan, total_steps)


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


def _setup_student(config: TrainConfig, accelerator: Any) -> nn.Module:
    """The trained model (optionally with LoRA), in ``--dtype``; its weights must be finite."""
    from accelerate.utils import set_seed

    set_seed(config.seed)  # LoRA initialisation and dropout; a resume restores the RNG states later
    student = _build_student(config, resolve_dtype(config.dtype, accelerator.device))
    check_finite_parameters(student, f"student {config.student_path}")
    trainable, total = count_parameters(student)
    logger.info(
        "student %s: %.1fM of %.1fM parameters trainable", config.student_path, trainable / 1e6, total / 1e6
    )
    return student


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


@dataclass
class _Teacher:
    """Where the teacher's distributions come from: a frozen model run beside the student, a cache of its
    outputs, or nothing (SFT)."""

    model: nn.Module | None
    cache: Any  # a todi.cache.TeacherCache, or None
    vocab_size: int | None  # the vocabulary both sides share (the loss slices padded heads to it)

    def for_batch(self, indices: Sequence[int], device: torch.device) -> SparseTeacher | None:
        """The cached teacher rows of these examples; None when the model (or nobody) is the teacher."""
        return None if self.cache is None else self.cache.rows(list(indices)).to(device)


def _setup_teacher(
    config: TrainConfig, accelerator: Any, tokenizer: Any, student: nn.Module, cache: Any
) -> _Teacher:
    """The frozen teacher model (replicated on every rank, never in the optimizer), or the cache."""
    student_head = causal_lm(student).get_output_embeddings().weight.shape[0]
    model, vocab_size = None, None
    if config.teacher_path:
        with replicated_loading(accelerator):
            model = load_causal_lm(
                config.teacher_path,
                dtype=resolve_dtype(config.teacher_dtype, accelerator.device, auto=torch.bfloat16),
                trust_remote_code=config.trust_remote_code,
                adapter=config.teacher_lora_path,
            )
        check_finite_parameters(model, f"teacher {config.teacher_path}", "--teacher-dtype")
        model = freeze(model).to(accelerator.device)
        from todi.data import shared_vocab_size

        vocab_size = shared_vocab_size(tokenizer, student_head, model.get_output_embeddings().weight.shape[0])
        if config.loss_options()["kd_rate"] == 0:
            logger.warning("--kd-rate 0: the teacher is loaded but does not contribute to the loss")
    if cache is not None:
        from todi.data import shared_vocab_size

        vocab_size = shared_vocab_size(tokenizer, student_head)
        if vocab_size != cache.vocab_size:
            raise UsageError(
                f"the student's tokenizer has {vocab_size} tokens but teacher cache {config.teacher_cache_path} "
                f"covers {cache.vocab_size}",
                "use a student with the teacher's tokenizer",
            )
    return _Teacher(model, cache, vocab_size)


def _setup_optimizer(
    config: TrainConfig, accelerator: Any, student: nn.Module, teacher: _Teacher, total_steps: int
) -> tuple[nn.Module, Any, Any]:
    """The student with its objective (:class:`LossModule`), AdamW and the cosine schedule, prepared by
    accelerate (DDP / FSDP / DeepSpeed wrap them here)."""
    from todi.losses import causal_lm_distillation_loss

    loss_fn = functools.partial(
        causal_lm_distillation_loss,
        **config.loss_options(),
        chunk_size=config.chunk_size,
        vocab_size=teacher.vocab_size,
        compile=config.compile,
    )
    model = LossModule(student, teacher.model, loss_fn)
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr)
    schedule = cosine_schedule(config.warmup_steps, total_steps, config.min_lr / config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    module = accelerator.unwrap_model(model)
    module.fused = config.fused
    if config.fused:
        reason = prepare_fused_head(accelerator, model)
        if reason:
            logger.warning("fused loss disabled: %s; computing the loss on materialised logits", reason)
            module.fused = False
    return model, optimizer, scheduler


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on norms and biases), the usual choice for transformers."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


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


def _take_over_run_dir(config: TrainConfig, accelerator: Any, folder: OutputFolder) -> None:
    """The inputs have loaded: only now may an old run in --out be set aside (--overwrite), and the run's
    options be recorded."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        folder.replace_old()
        write_run_info(folder.path, config, accelerator)
    accelerator.wait_for_everyone()


def _resume(config: TrainConfig, accelerator: Any, run_dir: Path, total_steps: int) -> TrainerState:
    """With --resume: weights, optimizer, scheduler, RNG states and the data position of the newest usable
    checkpoint; else a fresh state."""
    if not config.resume:
        return TrainerState()
    loaded = load_latest_checkpoint(accelerator, run_dir)
    if loaded is None:
        logger.info("--resume: %s has no checkpoint yet; starting from step 0", run_dir)
        return TrainerState()
    state, path = loaded
    logger.info("resumed from %s (step %d, epoch %d)", path, state.global_step, state.epoch)
    if state.global_step > total_steps:
        raise UsageError(
            f"--resume: the run in {run_dir} is already at step {state.global_step}, past the "
            f"{total_steps} steps this command asks for",
            f"raise --max-steps (or --epochs) to train longer; its final model is in {run_dir / 'final'}",
        )
    return state


# --------------------------------------------------------------------------------------------------
# The pieces of a step: forward/backward, the finite check, metrics, dev evaluation, checkpoints
# --------------------------------------------------------------------------------------------------


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


def _forward_backward(
    config: TrainConfig,
    accelerator: Any,
    model: nn.Module,
    data: _Data,
    teacher: _Teacher,
    step: list[list[int]],
) -> _Sums:
    """This rank's micro-batches of the step: forward, backward (gradients accumulate); their loss parts."""
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    num_items = data.plan.supervised_tokens(step)
    # The loss is normalised by the supervised tokens of the whole global step (all micro-batches and
    # ranks); accelerate divides it by grad_accum and DDP averages gradients over ranks, so scaling by
    # both makes the update the gradient of exactly that normalised loss, whatever the split.
    loss_scale = config.grad_accum * world
    sums = _Sums.zeros(device)
    for micro in step[rank::world]:
        batch = data.batch(micro, device)
        rows = teacher.for_batch(micro, device)
        # accumulate() skips the gradient all-reduce on all but the last micro-batch.
        with accelerator.accumulate(model):
            out = model(batch, num_items_in_batch=num_items, teacher_rows=rows)
            accelerator.backward(out.loss * loss_scale)
        sums.add(out)
    return sums


@dataclass
class _Sums:
    """Loss parts summed over micro-batches (and steps), in float64 on the device: reading them back each
    micro-batch would stall a GPU."""

    loss: Tensor
    ce: Tensor
    kd: Tensor
    fkl_share_x_tokens: Tensor  # ToDi's FKL share (LossOutput.todi_weight) times the tokens it averages
    todi_tokens: Tensor  # the tokens that have a ToDi weight (none for other divergences)

    @classmethod
    def zeros(cls, device: torch.device) -> _Sums:
        return cls(*(torch.zeros((), dtype=torch.float64, device=device) for _ in range(5)))

    def add(self, out: LossOutput) -> None:
        self.loss += out.loss.detach().double()
        self.ce += out.ce.double()
        self.kd += out.kd.double()
        if out.todi_weight is not None:
            tokens = out.loss.new_tensor(float(out.num_tokens))
            self.fkl_share_x_tokens += (out.todi_weight.detach() * tokens).double()
            self.todi_tokens += tokens.double()

    def __iadd__(self, other: _Sums) -> _Sums:
        for name in self.__dataclass_fields__:
            getattr(self, name).add_(getattr(other, name))
        return self

    def finite(self) -> Tensor:
        return torch.isfinite(torch.stack([self.loss, self.ce, self.kd])).all()

    def over_ranks(self, accelerator: Any) -> dict[str, float]:
        values = torch.stack([getattr(self, name) for name in self.__dataclass_fields__]).tolist()
        return dict(zip(self.__dataclass_fields__, sum_over_ranks(accelerator, values)))


class _Window:
    """The training metrics of the steps since the last log line."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.sums, self.steps, self.tokens, self.start = _Sums.zeros(self.device), 0, 0, time.perf_counter()

    def add(self, sums: _Sums) -> None:
        self.sums += sums
        self.steps += 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent in the block does not count for tokens/s."""
        paused = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - paused

    def flush(
        self, accelerator: Any, state: TrainerState, epoch: float, scheduler: Any, grad_norm: Any
    ) -> dict[str, Any]:
        """The window's record for metrics.jsonl (means per applied step), then a new window."""
        sums = self.sums.over_ranks(accelerator)
        elapsed = max(time.perf_counter() - self.start, 1e-9)

        def per_step(value: float) -> float:
            return value / self.steps if self.steps else math.nan  # every step skipped (--nan-policy skip)

        record = {
            "step": state.global_step,
            "epoch": round(epoch, 4),
            "lr": scheduler.get_last_lr()[0],
            "loss": per_step(sums["loss"]),
            "ce": per_step(sums["ce"]),
            "kd": per_step(sums["kd"]),
            "todi_weight": sums["fkl_share_x_tokens"] / sums["todi_tokens"] if sums["todi_tokens"] else None,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": self.tokens / elapsed,
            "peak_mem": _peak_memory_mib(),
        }
        if state.extra.get("skipped_steps"):
            record["skipped_steps"] = state.extra["skipped_steps"]
        self._reset()
        return record


def _finite_step(accelerator: Any, sums: _Sums, grad_norm: Tensor | float | None) -> bool:
    """Whether this step's loss (and gradient norm) are finite on every rank. Under fp16 loss scaling an
    infinite gradient norm is the scaler's business (it skips the step and lowers the scale)."""
    finite = sums.finite()
    if grad_norm is not None and getattr(accelerator, "scaler", None) is None:
        finite = finite & torch.isfinite(torch.as_tensor(grad_norm, device=finite.device)).all()
    return not any_rank(accelerator, not bool(finite))


def _skip_or_stop(
    config: TrainConfig,
    accelerator: Any,
    state: TrainerState,
    sums: _Sums,
    grad_norm: Any,
    skips_in_a_row: int,
) -> int:
    """A non-finite step: raise (``--nan-policy stop``, or too many in a row), else count it as skipped.
    Returns the new count of skips in a row."""
    skips_in_a_row += 1
    error = _non_finite_error(config, accelerator, state, float(sums.loss), grad_norm)
    if config.nan_policy == "stop" or skips_in_a_row >= _MAX_SKIPS_IN_A_ROW:
        raise error
    state.extra["skipped_steps"] = state.extra.get("skipped_steps", 0) + 1
    logger.warning("%s; update skipped (--nan-policy skip)", error)
    return skips_in_a_row


def _non_finite_error(
    config: TrainConfig, accelerator: Any, state: TrainerState, loss: float, grad_norm: Any
) -> NonFiniteError:
    norm = "?" if grad_norm is None else f"{float(grad_norm):.4g}"
    causes = []
    if config.lr > 1e-2:
        causes.append(f"--lr {config.lr:g} is far above the usual 1e-5..1e-3")
    if accelerator.mixed_precision == "fp16":
        causes.append("float16 overflow (use bf16, or float32)")
    causes.append("NaN/inf in the data or in a model's outputs (a teacher in float16 overflows)")
    saved = list_checkpoints(config.out)
    resume = f"--resume continues from {saved[-1].name}" if saved else "no checkpoint was written yet"
    return NonFiniteError(
        f"step {state.global_step + 1}: the loss is {loss:.4g} and the gradient norm {norm}; the update was "
        "not applied, so no weights with NaN/inf were written",
        f"likely causes: {'; '.join(causes)}. Fix it and rerun ({resume}), or pass --nan-policy skip to "
        "skip such steps",
    )


def _evaluate_on_dev(
    config: TrainConfig,
    accelerator: Any,
    model: nn.Module,
    data: _Data,
    state: TrainerState,
    reporter: _Reporter,
    epoch: float,
) -> bool:
    """Score the dev set now, record it in ``state`` and the logs; True when it is the best score yet."""
    started = time.perf_counter()
    results = _dev_scores(config, accelerator, model, data)
    state.dev = results
    state.evaluated_step = state.global_step
    state.score = results.get("dev_rougeL", -results["dev_loss"])
    reporter.log({"step": state.global_step, "epoch": round(epoch, 4), **results}, "dev")
    shown = ", ".join(f"{k} {v:.4f}" for k, v in results.items())
    reporter.write(f"step {state.global_step} dev: {shown} ({time.perf_counter() - started:.0f} s)")
    if state.best_score is None or state.score > state.best_score:
        state.best_score, state.best_step = state.score, state.global_step
        return True
    return False


def _dev_scores(config: TrainConfig, accelerator: Any, model: nn.Module, data: _Data) -> dict[str, float]:
    """Dev loss (objective, CE and KD per supervised token) and dev ROUGE-L of sampled answers (x100),
    each shared out over ranks and summed. The training RNG streams are left as they were."""
    from todi.evaluation import GenerationSettings, dev_rouge, parse_seeds

    model.eval()
    with _keep_rng(), torch.no_grad():
        results = _dev_loss(config, accelerator, model, data)
        if is_sharded(accelerator):
            # Sampling runs each rank's own number of forwards, which sharded parameters cannot serve.
            logger.warning("dev ROUGE-L is skipped under FSDP / ZeRO-3; checkpoints are ranked by dev loss")
        else:
            shard = list(data.dev_examples[accelerator.process_index :: accelerator.num_processes])
            score = 0.0
            if shard:
                with accelerator.autocast():
                    score = dev_rouge(
                        accelerator.unwrap_model(model).student,
                        data.tokenizer,
                        shard,
                        seeds=parse_seeds(config.eval_seeds, "--eval-seeds"),
                        settings=GenerationSettings(
                            max_new_tokens=config.eval_max_new_tokens, batch_size=config.eval_batch_size
                        ),
                        template=config.template,
                        max_prompt_length=config.max_prompt_length,
                    )
            (total,) = sum_over_ranks(accelerator, [score * len(shard)])
            results["dev_rougeL"] = total / len(data.dev_examples)
    model.train()
    return results


def _dev_loss(config: TrainConfig, accelerator: Any, model: nn.Module, data: _Data) -> dict[str, float]:
    """Every rank runs the same number of forward passes (DDP / FSDP forwards hold collectives): ranks with
    no batch left repeat one and discard it. Under a teacher cache (no dev rows) the CE alone."""
    rank, world = accelerator.process_index, accelerator.num_processes
    dev_set = data.dev_set
    order = sorted(range(len(dev_set)), key=lambda i: -len(dev_set[i]["input_ids"]))
    batches = [order[s : s + config.batch_size] for s in range(0, len(order), config.batch_size)]
    total = sum(supervised_positions(example) for example in dev_set)
    mine = batches[rank::world]
    sums = [0.0, 0.0, 0.0]
    ce_only = config.teacher_cache_path is not None
    for i in range(math.ceil(len(batches) / world)):
        indices = mine[i] if i < len(mine) else batches[0]
        out = model(
            data.batch(indices, accelerator.device, dev_set), num_items_in_batch=total, ce_only=ce_only
        )
        if i < len(mine):
            sums = [sums[0] + float(out.loss), sums[1] + float(out.ce), sums[2] + float(out.kd)]
    loss, ce, kd = sum_over_ranks(accelerator, sums)
    return {"dev_loss": loss, "dev_ce": ce} if ce_only else {"dev_loss": loss, "dev_ce": ce, "dev_kd": kd}


def _checkpoint(config: TrainConfig, accelerator: Any, run_dir: Path, state: TrainerState) -> int:
    """Save a checkpoint of this step (collective) and rotate the old ones; returns the step saved."""
    save_checkpoint(accelerator, run_dir, state)
    if accelerator.is_main_process:
        rotate_checkpoints(run_dir, keep_last=config.keep_last, keep_best=config.save_best)
    return state.global_step


def _export(
    accelerator: Any, model: nn.Module, tokenizer: Any, path: Path, config: TrainConfig, *, final: bool
) -> None:
    """Write a plain Hugging Face folder of the student (collective under FSDP / ZeRO-3)."""
    student = accelerator.unwrap_model(model).student
    merge = config.lora_r > 0 and not config.keep_adapter
    if is_sharded(accelerator):
        state_dict = accelerator.get_state_dict(model)  # gathers the full weights on the main process
        if accelerator.is_main_process:
            state_dict = {k.removeprefix("student."): v for k, v in state_dict.items()}
            if merge:
                # Merging needs whole weights: rebuild the LoRA student on the CPU and load the gathered ones.
                with replicated_loading(accelerator):
                    cpu_student = _build_student(config, torch.float32)
                cpu_student.load_state_dict(state_dict)
                export_model(cpu_student, tokenizer, path, merge_lora=True)
            else:
                export_model(student, tokenizer, path, merge_lora=False, state_dict=state_dict)
    elif accelerator.is_main_process:
        export_model(student, tokenizer, path, merge_lora=merge, copy_before_merge=not final)
    accelerator.wait_for_everyone()


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


# --------------------------------------------------------------------------------------------------
# Reporting and stopping
# --------------------------------------------------------------------------------------------------


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
