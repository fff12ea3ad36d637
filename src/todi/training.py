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
from typing import Any, ClassVar, Literal

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
from todi.divergences import DIVERGENCES, get_divergence, parse_params, registered_names
from todi.errors import NonFiniteError, Stopped, UsageError
from todi.formats import parse_columns
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
from todi.onpolicy import PolicyOptions, ResponseSource, StepBatches
from todi.optim import (
    build_optimizer,
    build_scheduler,
    cosine_schedule,
    optimizer_problem,
    resolve_warmup,
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
from todi.plugins import load_plugins
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
SAMPLES_NAME = "samples.jsonl"
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
        "training data (required): a .jsonl, .json, .parquet or .csv file, a folder holding train.jsonl, a "
        "datasets save_to_disk folder or a Hub data set name; records in the instruction/input/output form "
        "(Dolly's context/response too), prompt/completion or chat messages (docs/data_formats.md)",
        aliases=["--dataset_name"],
    )
    data_config: str | None = option(
        None, "configuration of a Hub data set (load_dataset's name)", aliases=["--dataset_config"]
    )
    data_split: str = option("train", "split of --data to train on", aliases=["--dataset_train_split"])
    dev_split: str = option(
        "dev", "split of --dev (dev also finds valid / validation)", aliases=["--dataset_test_split"]
    )
    columns: str | None = option(
        None,
        "read fields from other columns, FIELD=COLUMN,...: e.g. input=context,output=response, "
        "messages=conversation (fields: instruction, input, output, prompt, completion, messages)",
    )
    out: str = option(
        "",
        "run folder (required): config, metrics.jsonl, tb/, checkpoints/, best/, final/",
        aliases=["--output_dir"],
    )
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
    epochs: int = option(
        10, "passes over the training data (ignored when --max-steps is set)", aliases=["--num_train_epochs"]
    )
    max_steps: int = option(0, "optimizer steps to run; 0 = --epochs full passes")
    batch_size: int = option(
        8, "examples per micro-batch per device", aliases=["--per_device_train_batch_size"]
    )
    grad_accum: int = option(
        1, "micro-batches per optimizer step per device", aliases=["--gradient_accumulation_steps"]
    )
    lr: float = option(5e-4, "peak learning rate", aliases=["--learning_rate"])
    optim: Literal[
        "adamw", "adamw_torch", "adamw_fused", "adamw_torch_fused", "sgd", "adamw_8bit", "adamw_bnb_8bit"
    ] = option(
        "adamw",
        "optimizer: adamw (PyTorch's AdamW), adamw_fused (its fused kernel), sgd, adamw_8bit (bitsandbytes); "
        "the Trainer's names adamw_torch, adamw_torch_fused, adamw_bnb_8bit work too",
    )
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = option(
        "cosine",
        "learning-rate schedule after the warm-up: cosine (todi's, decays to --min-lr), or transformers' "
        "linear, constant, constant_with_warmup",
        aliases=["--lr_scheduler_type"],
    )
    min_lr: float = option(0.0, "learning rate at the end of the cosine decay")
    warmup_steps: int = option(0, "steps of linear warm-up before the decay")
    warmup_ratio: float = option(
        0.0, "warm-up as a share of all steps (rounded up); instead of --warmup-steps"
    )
    weight_decay: float = option(0.0, "AdamW weight decay, applied to weight matrices only")
    max_grad_norm: float = option(1.0, "gradient clipping threshold (global L2 norm)")
    seed: int = option(42, "seed of initialisation (LoRA), data order and dropout")
    gradient_checkpointing: bool = option(
        False, "recompute activations in the backward pass (less memory, more compute)"
    )
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
    loss_backend: Literal["auto", "triton", "torch"] = option(
        "auto",
        "the fused loss's chunk math: triton (one GPU kernel; not akl or --teacher-cache), torch, or auto = "
        "triton on CUDA where it serves the loss",
    )
    trust_remote_code: bool = option(False, "allow models whose code comes with their checkpoint")
    # LoRA
    lora_r: int = option(0, "LoRA rank of the trained model; 0 = train all weights")
    lora_alpha: float = option(16.0, "LoRA alpha (scale alpha / r)")
    lora_dropout: float = option(0.05, "LoRA dropout")
    lora_target: str = option("all-linear", "LoRA target modules: all-linear or comma-separated module names")
    keep_adapter: bool = option(False, "export the LoRA adapter instead of merging it into the weights")
    # evaluation
    eval_every: int = option(
        0, "evaluate on --dev every N steps; 0 = at the end of every epoch", aliases=["--eval_steps"]
    )
    eval_seeds: str = option("10", "comma-separated sampling seeds for dev ROUGE-L (mean over seeds)")
    eval_max_new_tokens: int = option(256, "tokens generated per dev answer")
    eval_batch_size: int = option(8, "dev prompts generated at once per device")
    # checkpoints and logs
    save_every: int = option(
        500,
        "checkpoint every N steps (also after every evaluation and at the end); 0 = off",
        aliases=["--save_steps"],
    )
    save_best: int = option(1, "keep the N checkpoints with the best dev score (ROUGE-L), besides the newest")
    keep_last: int = option(
        2, "keep the N newest checkpoints (>= 2 leaves one to fall back on)", aliases=["--save_total_limit"]
    )
    log_every: int = option(10, "write metrics every N steps", aliases=["--logging_steps"])
    report_to: str = option("tensorboard", "comma-separated: tensorboard, wandb, none (metrics.jsonl always)")
    push_to_hub: bool = option(False, "upload OUT/final to the Hugging Face Hub once the run has succeeded")
    hub_model_id: str | None = option(None, "Hub repository for --push-to-hub (default: the name of --out)")

    command = "train"
    # `--help` shows the options in these groups (see todi.cli); every option belongs to one.
    option_groups: ClassVar[dict[str, tuple[str, ...]]] = {
        "required": ("model", "teacher", "student", "data", "out"),
        "data": (
            "data_config",
            "data_split",
            "columns",
            "dev",
            "dev_split",
            "template",
            "max_length",
            "max_prompt_length",
            "max_examples",
            "dev_max_examples",
            "group_by_length",
        ),
        "training": (
            "epochs",
            "max_steps",
            "batch_size",
            "grad_accum",
            "lr",
            "optim",
            "lr_scheduler",
            "min_lr",
            "warmup_steps",
            "warmup_ratio",
            "weight_decay",
            "max_grad_norm",
            "seed",
            "gradient_checkpointing",
            "dtype",
            "mixed_precision",
            "trust_remote_code",
            "lora_r",
            "lora_alpha",
            "lora_dropout",
            "lora_target",
            "keep_adapter",
            "nan_policy",
        ),
        "distillation": (
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
            "todi_weight",
            "loss_params",
            "plugin",
            "cross_tokenizer",
            "uld_weight",
            "unaligned",
            "fused",
            "chunk_size",
            "compile",
            "loss_backend",
        ),
        "on-policy": (
            "lmbda",
            "seq_kd",
            "on_policy_ce",
            "replay_buffer",
            "replay_ratio",
            "gen_temperature",
            "gen_top_p",
            "gen_top_k",
            "gen_max_new_tokens",
        ),
        "evaluation on --dev": ("eval_every", "eval_seeds", "eval_max_new_tokens", "eval_batch_size"),
        "output": (
            "resume",
            "resume_changed",
            "overwrite",
            "save_every",
            "save_best",
            "keep_last",
            "log_every",
            "report_to",
            "push_to_hub",
            "hub_model_id",
            "save_samples",
        ),
    }
    # Trainer flags that set another option: --bf16 [true|false] -> --mixed-precision bf16 (false: no).
    flag_values: ClassVar[dict[str, tuple[str, str, str]]] = {
        "bf16": ("mixed_precision", "bf16", "no"),
        "fp16": ("mixed_precision", "fp16", "no"),
    }

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

    @property
    def cross_tokenizer_mode(self) -> str | None:
        """``hybrid`` / ``uld`` when the teacher scores with its own tokenizer, else None."""
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
        try:
            parse_columns(self.columns)
        except UsageError as err:
            out.append(str(err))
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
        need(0 <= self.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        need(
            not (self.warmup_ratio and self.warmup_steps),
            "give one of --warmup-steps and --warmup-ratio, not both",
        )
        need(
            self.lr_scheduler == "cosine" or not self.min_lr,
            f"--min-lr applies to --lr-scheduler cosine (the {self.lr_scheduler} schedule ends at 0)",
        )
        problem = optimizer_problem(self.optim)
        need(problem is None, problem or "")
        need(not self.hub_model_id or self.push_to_hub, "--hub-model-id applies to --push-to-hub")
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

    model: str = option(
        "",
        "model to fine-tune (required): a local folder or a Hugging Face Hub id",
        aliases=["--model_name_or_path"],
    )

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
        "",
        "teacher (required unless --teacher-cache): a local folder (e.g. runs/teacher/final) or a Hub id",
        aliases=["--teacher_model_name_or_path"],
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
        "uniform = on all tokens, the tail mass spread evenly (see docs/performance.md); with "
        "--cross-tokenizer, sampled or uniform",
    )
    student: str = option(
        "", "student to train (required): a local folder or a Hub id", aliases=["--model_name_or_path"]
    )
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
    loss_params: str | None = option(
        None,
        "parameters of the --loss divergence, NAME=VALUE,... (e.g. beta=2 for todi); any registered "
        "divergence, a --plugin's included, checks its own",
    )
    plugin: str | None = option(
        None,
        "comma-separated modules to import first; they register divergences for --loss (installed packages "
        "can use the entry point group todi.divergences instead)",
    )
    # on-policy: the responses a step learns from (see todi.onpolicy)
    lmbda: float = option(
        0.0,
        "probability that an optimizer step's responses (all its micro-batches, on all ranks: the batch, "
        "as in TRL's GKD) are the student's own samples for the same prompts instead of the data's; the "
        "choice and the samples are seeded by (--seed, step, example), so ranks and accumulation agree",
    )
    seq_kd: bool = option(
        False, "train on responses sampled from the teacher instead of the data's (sequence-level KD)"
    )
    on_policy_ce: bool = option(
        False,
        "keep the (1 - kd_rate) CE term on the student's own samples (default: the divergence alone, "
        "since the CE of its own tokens teaches the student nothing)",
    )
    replay_buffer: int = option(
        0, "keep the last N generated examples (saved with each checkpoint) to reuse them; 0 = off"
    )
    replay_ratio: float = option(
        0.0, "with --replay-buffer: share of a generated micro-batch drawn from the buffer, not generated"
    )
    gen_temperature: float = option(1.0, "sampling temperature of the generated responses")
    gen_top_p: float = option(1.0, "nucleus sampling of the generated responses; 1 = off")
    gen_top_k: int = option(0, "top-k sampling of the generated responses; 0 = off")
    gen_max_new_tokens: int | None = option(
        None,
        "tokens per generated response, in the sampler's own tokens (default: the longest response in the "
        "training data, in those tokens)",
    )
    save_samples: bool = option(False, "write every generated response to samples.jsonl in --out")
    cross_tokenizer: Literal["refuse", "hybrid", "uld"] = option(
        "refuse",
        "a teacher whose tokenizer differs from the student's: refuse; hybrid = --loss on the tokens both "
        "vocabularies spell the same (renormalised) + --uld-weight x ULD on the rest, at positions aligned "
        "by text offsets; uld = ULD alone. With --teacher or a --teacher-cache (which stores the teacher's "
        "tokenizer); see docs/cross_tokenizer.md",
    )
    uld_weight: float = option(1.0, "--cross-tokenizer hybrid: weight of ULD on the unmatched vocabulary")
    unaligned: Literal["ce", "skip"] = option(
        "ce",
        "--cross-tokenizer: at student positions with no aligned teacher position (inside a teacher token), "
        "ce = the data's token stands in for the teacher in the KD term (their CE gets the full weight); "
        "skip = the CE term alone (see docs/cross_tokenizer.md)",
    )

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

    @property
    def cross_tokenizer_mode(self) -> str | None:
        return None if self.cross_tokenizer == "refuse" else self.cross_tokenizer

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
        named = {
            param: getattr(self, name) for name, param in names.items() if getattr(self, name) is not None
        }
        return named | parse_params(self.loss_params)

    def loss_options(self) -> dict[str, Any]:
        options = {"divergence": self.loss, "kd_rate": self.kd_rate, "temperature": self.temperature}
        return options | self.divergence_params()

    def problems(self) -> list[str]:
        out = [] if self.student else ["--student is required"]
        if bool(self.teacher) == bool(self.teacher_cache):
            out.append("give exactly one of --teacher and --teacher-cache")
        if self.cache_tail != "sampled" and not self.teacher_cache:
            out.append("--cache-tail applies to --teacher-cache")
        if self.teacher_cache and self.cross_tokenizer != "refuse" and self.cache_tail == "bucket":
            out.append(
                "--cache-tail bucket compares one tail bucket, which is a token of neither vocabulary under "
                "--cross-tokenizer; use --cache-tail sampled (the default) or uniform"
            )
        if self.unaligned != "ce" and self.cross_tokenizer == "refuse":
            out.append("--unaligned applies to --cross-tokenizer hybrid or uld")
        if not (math.isfinite(self.uld_weight) and self.uld_weight >= 0):
            out.append(f"--uld-weight must be a finite number >= 0, got {self.uld_weight}")
        if self.teacher_cache and self.teacher_lora:
            out.append("--teacher-lora applies to --teacher; a cache already holds the teacher's outputs")
        if not 0.0 <= self.kd_rate <= 1.0:
            out.append(f"--kd-rate must be in [0, 1], got {self.kd_rate}")
        if not (math.isfinite(self.temperature) and self.temperature >= MIN_TEMPERATURE):
            # Below it softmax(z / T) is a hard argmax whose 1/T gradient scale overflows float32.
            out.append(f"--temperature must be a finite number >= {MIN_TEMPERATURE}, got {self.temperature}")
        if self.loss_backend == "triton" and (self.loss == "akl" or self.teacher_cache):
            what = "--teacher-cache" if self.teacher_cache else "--loss akl"
            out.append(f"--loss-backend triton does not serve {what}; use --loss-backend auto or torch")
        if self.todi_weight is not None and self.loss != "todi":
            out.append(f"--todi-weight applies to --loss todi, not --loss {self.loss}")
        return out + self._loss_problems() + self._policy_problems() + super().problems()

    def _loss_problems(self) -> list[str]:
        """--plugin, --loss and its parameters, which the divergence checks itself."""
        try:
            load_plugins(self.plugin)  # first: a plugin registers divergences that --loss may name
            params = parse_params(self.loss_params)
        except (UsageError, ValueError) as err:
            return [str(err)]
        both = sorted(
            name for name in ("beta", "skew", "mu") if name in params and getattr(self, name) is not None
        )
        if both:
            return [f"--loss-params and --{both[0]} both give {both[0]}; keep one"]
        try:
            divergence = get_divergence(self.loss)
        except ValueError:
            known = ", ".join(registered_names())
            return [
                f"--loss: unknown divergence {self.loss!r} (choose one of {known}, or add one with --plugin)"
            ]
        try:
            divergence.resolve(self.divergence_params())
        except ValueError as err:
            return [f"--loss {self.loss}: {err}"]
        return []

    def _policy_problems(self) -> list[str]:
        out = []
        if not 0.0 <= self.lmbda <= 1.0:
            out.append(f"--lmbda must be in [0, 1], got {self.lmbda}")
        if self.teacher_cache and (self.lmbda > 0 or self.seq_kd):
            out.append(
                "--teacher-cache cannot score new text: --lmbda > 0 and --seq-kd need the teacher model "
                "(--teacher)"
            )
        if self.replay_buffer < 0:
            out.append(f"--replay-buffer must be >= 0, got {self.replay_buffer}")
        if not 0.0 <= self.replay_ratio <= 1.0:
            out.append(f"--replay-ratio must be in [0, 1], got {self.replay_ratio}")
        if self.replay_ratio > 0 and not self.replay_buffer:
            out.append("--replay-ratio needs a buffer to draw from (--replay-buffer N)")
        if self.replay_buffer and not self.lmbda > 0:
            out.append("--replay-buffer keeps the student's samples: it needs --lmbda > 0")
        if not (math.isfinite(self.gen_temperature) and self.gen_temperature > 0):
            out.append(f"--gen-temperature must be a finite number > 0, got {self.gen_temperature}")
        if not 0.0 < self.gen_top_p <= 1.0:
            out.append(f"--gen-top-p must be in (0, 1], got {self.gen_top_p}")
        if self.gen_top_k < 0:
            out.append(f"--gen-top-k must be >= 0 (0 = off), got {self.gen_top_k}")
        if self.gen_max_new_tokens is not None and self.gen_max_new_tokens < 1:
            out.append(f"--gen-max-new-tokens must be at least 1, got {self.gen_max_new_tokens}")
        return out

    def policy_options(self, data_max_response: int) -> PolicyOptions:
        """The on-policy options, with the generation length resolved against the data."""
        return PolicyOptions(
            lmbda=self.lmbda,
            seq_kd=self.seq_kd,
            on_policy_ce=self.on_policy_ce,
            replay_buffer=self.replay_buffer,
            replay_ratio=self.replay_ratio,
            temperature=self.gen_temperature,
            top_p=self.gen_top_p,
            top_k=self.gen_top_k,
            max_new_tokens=self.gen_max_new_tokens or data_max_response,
        )


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
        final = _train(config, accelerator, folder)
    if config.push_to_hub and accelerator.is_main_process:  # only once the run folder is complete
        from todi.hub import push_folder

        repo = config.hub_model_id or Path(config.out).resolve().name
        push_folder(final, repo, commit_message=f"todi {config.command}: {Path(config.out).name}")
    return final


def _train(config: TrainConfig, accelerator: Any, folder: OutputFolder) -> Path:
    run_dir, device = folder.path, accelerator.device
    best, final = run_dir / "best", run_dir / "final"  # the best dev checkpoint's model, the last one's
    # ---- Setup: everything that can refuse the run comes before --out is touched.
    cache = _open_teacher_cache(config)
    data = _setup_data(config, accelerator, cache)
    policy = _setup_policy(config, data)
    identity = run_identity(config, data.train_set)
    changes = check_resume(run_dir, config, accelerator.num_processes, identity) if config.resume else {}
    student = _setup_student(config, accelerator)
    teacher = _setup_teacher(config, accelerator, data, student, cache)
    model, optimizer, scheduler = _setup_optimizer(config, accelerator, student, teacher, data.total_steps)
    responses = _setup_responses(config, accelerator, data, policy, model)
    _take_over_run_dir(config, accelerator, folder)
    state = _resume(config, accelerator, run_dir, data.total_steps)
    if accelerator.is_main_process:
        append_segment(run_dir, config, accelerator, identity, changes, state.global_step)
    reporter = _Reporter(run_dir, config, data.total_steps, state, accelerator.is_main_process)
    window = _Window(device, timed=teacher.timer is not None, generating=responses is not None)
    last_saved = state.global_step if list_checkpoints(run_dir) else -1
    skips_in_a_row = 0

    # ---- The loop: one iteration = one optimizer step over grad_accum x processes micro-batches.
    model.train()
    try:
        with _StopRequest() as stop:
            while state.global_step < data.total_steps:
                step = data.plan.step(state)
                batches = _step_batches(config, accelerator, model, data, teacher, responses, step, state)
                reporter.samples(batches.samples)
                sums = _forward_backward(config, accelerator, model, data, teacher, step, batches)
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                applied = _finite_step(accelerator, sums, grad_norm)
                window.add(sums, applied)
                if applied:
                    optimizer.step()
                    skips_in_a_row = 0
                else:  # nothing non-finite reaches the weights: stop, or skip this update and count it
                    skips_in_a_row = _skip_or_stop(
                        config, accelerator, state, sums, grad_norm, skips_in_a_row
                    )
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                epoch_float, end_of_epoch = data.plan.advance(state, step, batches.num_items)
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

    def advance(self, state: TrainerState, step: list[list[int]], supervised: int) -> tuple[float, bool]:
        """Move ``state`` past ``step``, which trained on ``supervised`` tokens; returns the epoch reached
        (fractional) and whether it ended one."""
        steps = len(self.epoch(state.epoch))
        epoch_float = state.epoch + (state.step_in_epoch + 1) / steps
        state.global_step += 1
        state.step_in_epoch += 1
        state.tokens_seen += supervised
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
    xtok: Any = None  # a todi.xtok.CrossTokenizerTeacher when the teacher has its own tokenizer
    cache_rows: list[int] | None = None  # per training example, its teacher-cache example (None: the same)

    def batch(
        self, indices: Sequence[int], device: torch.device, examples: Sequence[dict] | None = None
    ) -> dict[str, Tensor]:
        rows = self.train_set if examples is None else examples
        return self.collated([rows[i] for i in indices], device)

    def collated(self, examples: Sequence[dict], device: torch.device) -> dict[str, Tensor]:
        return {k: v.to(device) for k, v in self.collate(list(examples)).items()}


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
    cross = config.cross_tokenizer_mode is not None
    if config.teacher_path:
        teacher_tokenizer = load_tokenizer(config.teacher_path, trust_remote_code=config.trust_remote_code)
        if not cross:
            check_tokenizers(teacher_tokenizer, tokenizer)
    elif cache is not None and cross:
        teacher_tokenizer = cache.teacher_tokenizer(config.trust_remote_code)
    # Exported as loaded: a pad token added for batching would make the exported teacher's tokenizer
    # differ from its student's (check_tokenizers compares pad ids) in the next `todi distill`.
    pristine_tokenizer = copy.deepcopy(tokenizer)
    pad_id = ensure_pad_token(tokenizer)
    train_set, dev_examples, dev_set = _load_data(config, tokenizer)
    xtok, cache_rows = None, None
    if cross:  # the teacher's side of each example
        from todi.xtok import CrossTokenizerTeacher

        xtok = CrossTokenizerTeacher.build(config, tokenizer, teacher_tokenizer, train_set, dev_set)
    if cache is not None:
        cache.check(
            tokenizer=teacher_tokenizer if cross else pristine_tokenizer,
            encoded=None if cross else train_set,
            template=config.template,
            max_length=config.max_length,
            max_prompt_length=config.max_prompt_length,
            data=config.data,
        )
        if cross:
            cache_rows = xtok.cache_rows(cache, train_set, config.data)
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
    if xtok is not None:
        collate = xtok.collator(collate)
    return _Data(
        tokenizer, pristine_tokenizer, collate, train_set, dev_examples, dev_set, plan, total_steps, xtok,
        cache_rows,
    )  # fmt: skip


def _load_data(config: TrainConfig, tokenizer: Any) -> tuple[list[dict], list[Any], list[dict]]:
    """(encoded train set, dev examples, encoded dev set); data errors surface here, before any model."""
    from todi.data import check_template, encode_examples, load_examples

    check_template(config.template, tokenizer)
    lengths = {
        "template": config.template,
        "max_prompt_length": config.max_prompt_length,
        "max_length": config.max_length,
    }
    source = {"columns": config.columns, "hub_config": config.data_config}
    examples = load_examples(config.data, config.data_split, max_examples=config.max_examples, **source)
    train_set, _ = encode_examples(examples, tokenizer, **lengths)
    dev_examples: list[Any] = []
    dev_set: list[dict] = []
    if config.dev:
        dev_examples = load_examples(
            config.dev, config.dev_split, max_examples=config.dev_max_examples, **source
        )
        dev_set, _ = encode_examples(dev_examples, tokenizer, **lengths)
    return train_set, dev_examples, dev_set


def _setup_policy(config: TrainConfig, data: _Data) -> PolicyOptions | None:
    """The on-policy options (None when every step trains on the data), checked against the models'
    positions before any weights load."""
    if not isinstance(config, DistillConfig):
        return None
    from todi.onpolicy import prompt_of

    prompts = [len(prompt_of(example)) for example in data.train_set]
    longest_response = max(len(e["input_ids"]) - n for e, n in zip(data.train_set, prompts))
    policy = config.policy_options(max(longest_response, 1))
    if not policy.generates:
        return None
    # (longest prompt, new tokens) each model reads while it generates or scores a generated sequence.
    lengths = {"--student": (max(prompts), policy.max_new_tokens)}
    lengths["--teacher"] = lengths["--student"]
    if data.xtok is not None:
        # Each model samples in its own tokens; the other scores the text re-encoded within --max-length.
        lengths = {"--student": lengths["--student"]} if policy.lmbda > 0 else {}
        if policy.seq_kd:
            prompt, response = data.xtok.longest_teacher_generation(data.train_set)
            lengths["--teacher"] = (prompt, config.gen_max_new_tokens or max(response, 1))
    for flag, (prompt, new) in lengths.items():
        path = config.student_path if flag == "--student" else config.teacher_path
        positions = _max_positions(path, config.trust_remote_code)
        if positions is not None and prompt + new > positions:
            raise UsageError(
                f"a generated sequence can reach {prompt + new} tokens (longest prompt {prompt} + "
                f"--gen-max-new-tokens {new}), past the {positions} positions of {flag} {path}",
                "lower --gen-max-new-tokens or --max-prompt-length",
            )
    return policy


def _max_positions(path: str | None, trust_remote_code: bool) -> int | None:
    """The model's context length from its config alone (no weights); None when the config says none."""
    if not path:
        return None
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None  # an adapter folder, say: the model's own loading reports real problems
    return getattr(model_config, "max_position_embeddings", None)


def _setup_student(config: TrainConfig, accelerator: Any) -> nn.Module:
    """The trained model (optionally with LoRA), in ``--dtype``; its weights must be finite."""
    from accelerate.utils import set_seed

    set_seed(config.seed)  # LoRA initialisation and dropout; a resume restores the RNG states later
    student = _build_student(config, resolve_dtype(config.dtype, accelerator.device))
    check_finite_parameters(student, f"student {config.student_path}")
    if config.gradient_checkpointing:
        _enable_activation_checkpointing(causal_lm(student))
    trainable, total = count_parameters(student)
    logger.info(
        "student %s: %.1fM of %.1fM parameters trainable", config.student_path, trainable / 1e6, total / 1e6
    )
    return student


def _enable_activation_checkpointing(model: nn.Module) -> None:
    """``--gradient-checkpointing``, non-reentrant: it needs no input that requires grad, so frozen
    embeddings (LoRA) work as they are. transformers 5 renamed the method; 4.x has the old name only."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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
    xtok_loss: Callable[..., Any] | None = None  # the objective when the teacher has its own tokenizer
    timer: _ForwardTimer | None = None  # seconds spent in the teacher model's forward passes
    cache_rows: list[int] | None = None  # training example -> cache example, when they differ

    def seconds(self) -> float:
        return 0.0 if self.timer is None else self.timer.seconds

    def for_batch(self, indices: Sequence[int], device: torch.device) -> SparseTeacher | None:
        """The cached teacher rows of these examples; None when the model (or nobody) is the teacher."""
        if self.cache is None:
            return None
        where = list(indices) if self.cache_rows is None else [self.cache_rows[i] for i in indices]
        return self.cache.rows(where).to(device)


def _setup_teacher(
    config: TrainConfig, accelerator: Any, data: _Data, student: nn.Module, cache: Any
) -> _Teacher:
    """The frozen teacher model (replicated on every rank, never in the optimizer), or the cache."""
    tokenizer = data.tokenizer
    student_head = causal_lm(student).get_output_embeddings().weight.shape[0]
    model, vocab_size, xtok_loss = None, None, None
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
        if config.loss_options()["kd_rate"] == 0:
            logger.warning("--kd-rate 0: the teacher is loaded but does not contribute to the loss")
    if model is None and cache is None:
        return _Teacher(None, None, None)
    from todi.data import shared_vocab_size

    # A cache's rows cover its vocabulary as a model's head covers its own.
    teacher_head = cache.vocab_size if model is None else model.get_output_embeddings().weight.shape[0]
    if data.xtok is not None:  # the teacher scores with its own tokenizer: the adapter gives the objective
        xtok_loss = data.xtok.loss_fn(
            config.loss_options(), tokenizer, student_head, teacher_head, chunk_size=config.chunk_size
        )
    elif model is not None:
        vocab_size = shared_vocab_size(tokenizer, student_head, teacher_head)
    else:
        vocab_size = shared_vocab_size(tokenizer, student_head)
        if vocab_size != cache.vocab_size:
            raise UsageError(
                f"the student's tokenizer has {vocab_size} tokens but teacher cache {config.teacher_cache_path} "
                f"covers {cache.vocab_size}",
                "use a student with the teacher's tokenizer",
            )
    timer = None if model is None else _ForwardTimer(model)
    return _Teacher(model, cache, vocab_size, xtok_loss, timer, data.cache_rows)


class _ForwardTimer:
    """Seconds spent inside a module's forward calls, through forward hooks (on a GPU it waits for the
    kernels, so the time is the module's and not the next one's)."""

    def __init__(self, module: nn.Module) -> None:
        self.seconds = 0.0
        self._start = 0.0
        module.register_forward_pre_hook(self._enter)
        module.register_forward_hook(self._leave)

    def _now(self, module: nn.Module) -> float:
        device = next(module.parameters()).device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def _enter(self, module: nn.Module, args: Any) -> None:
        self._start = self._now(module)

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.seconds += self._now(module) - self._start


def _setup_optimizer(
    config: TrainConfig, accelerator: Any, student: nn.Module, teacher: _Teacher, total_steps: int
) -> tuple[nn.Module, Any, Any]:
    """The student with its objective (:class:`LossModule`), the optimizer and schedule (:mod:`todi.optim`), prepared by
    accelerate (DDP / FSDP / DeepSpeed wrap them here)."""
    from todi.losses import causal_lm_distillation_loss

    loss_fn = functools.partial(
        causal_lm_distillation_loss,
        **config.loss_options(),
        chunk_size=config.chunk_size,
        vocab_size=teacher.vocab_size,
        compile=config.compile,
        backend=config.loss_backend,
    )
    model = LossModule(student, teacher.model, teacher.xtok_loss or loss_fn)
    optimizer = build_optimizer(config.optim, _param_groups(model, config.weight_decay), config.lr)
    scheduler = build_scheduler(
        config.lr_scheduler,
        optimizer,
        warmup=resolve_warmup(config.warmup_steps, config.warmup_ratio, total_steps),
        total_steps=total_steps,
        min_ratio=config.min_lr / config.lr,
    )
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


def _setup_responses(
    config: TrainConfig, accelerator: Any, data: _Data, policy: PolicyOptions | None, model: nn.Module
) -> ResponseSource | None:
    """What builds each step's batches when responses are generated; its replay buffer is registered
    with the checkpoint, so it must exist before a resume loads one."""
    if policy is None:
        return None
    from todi.evaluation import eos_token_ids
    from todi.onpolicy import ReplayBuffer, ResponseSource, SamplerTokens

    buffer = ReplayBuffer(policy.replay_buffer) if policy.replay_buffer else None
    if buffer is not None:
        accelerator.register_for_checkpointing(buffer)
    unwrapped = accelerator.unwrap_model(model)
    pad_id, eos_ids = data.collate.pad_token_id, eos_token_ids(unwrapped.student, data.tokenizer)
    retokenize = None
    if data.xtok is not None:  # samples become text, re-encoded by both tokenizers
        _, longest = data.xtok.longest_teacher_generation(data.train_set)
        retokenize = data.xtok.generated_pairing(
            data.train_set,
            SamplerTokens(pad_id, eos_ids, policy.max_new_tokens),
            SamplerTokens(
                data.xtok.teacher_pad_id,
                eos_token_ids(unwrapped.teacher, data.xtok.teacher_tokenizer),
                config.gen_max_new_tokens or max(longest, 1),
            ),
        )
    return ResponseSource(
        policy, seed=config.seed, pad_id=pad_id, eos_ids=eos_ids, buffer=buffer, retokenize=retokenize
    )


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
        kd_rate: float | None = None,
        generate: dict[str, Any] | None = None,
    ) -> Any:
        """``teacher_rows``: the batch's rows of a teacher cache, used instead of the teacher model;
        ``ce_only``: the cross-entropy alone (dev batches under a teacher cache, which holds no dev rows);
        ``kd_rate``: this batch's instead of the run's (generated batches: the divergence alone);
        ``generate``: sample from the student with these ``generate`` arguments instead (under FSDP /
        ZeRO-3 its parameters are whole only inside this root forward, as for the fused head)."""
        if generate is not None:
            return self.student.generate(**generate)
        extra = {"kd_rate": 0.0} if ce_only else {} if kd_rate is None else {"kd_rate": kd_rate}
        return self.loss_fn(
            causal_lm(self.student),
            None if ce_only else (teacher_rows if teacher_rows is not None else self.teacher),
            batch,
            num_items_in_batch=num_items_in_batch,
            fused=self.fused,
            **extra,
        )


def _step_batches(
    config: TrainConfig,
    accelerator: Any,
    model: nn.Module,
    data: _Data,
    teacher: _Teacher,
    responses: ResponseSource | None,
    step: list[list[int]],
    state: TrainerState,
) -> StepBatches:
    """This rank's micro-batches of the step: the data's examples, or (see :mod:`todi.onpolicy`)
    responses sampled by the student or the teacher for their prompts."""
    rank, world = accelerator.process_index, accelerator.num_processes
    micro_batches = list(enumerate(step))[rank::world]
    num_items = data.plan.supervised_tokens(step)
    if responses is None:
        return StepBatches.of_data(micro_batches, data.train_set, num_items)
    from todi.onpolicy import gather_objects

    sharded = is_sharded(accelerator)
    generators = {
        # Sharded students generate through the root forward, where their parameters are whole.
        "student": (lambda **kw: model(None, generate=kw))
        if sharded
        else accelerator.unwrap_model(model).student.generate,
        "teacher": teacher.model.generate if teacher.model is not None else None,
    }
    model.eval()  # the student samples as it will answer: without dropout
    with _keep_rng(), torch.no_grad(), accelerator.autocast():
        batches = responses.for_step(
            state.global_step,
            micro_batches,
            data.train_set,
            num_items,
            generators=generators,
            device=accelerator.device,
            world=gather_objects(accelerator),
            synced_gpus=sharded,
        )
    model.train()
    batches.samples = (
        [s for part in gather_objects(accelerator)(batches.samples) for s in part]
        if config.save_samples
        else []
    )
    return batches


def _forward_backward(
    config: TrainConfig,
    accelerator: Any,
    model: nn.Module,
    data: _Data,
    teacher: _Teacher,
    step: list[list[int]],
    batches: StepBatches,
) -> _Sums:
    """This rank's micro-batches of the step: forward, backward (gradients accumulate); their loss parts."""
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    # The loss is normalised by the supervised tokens of the whole global step (all micro-batches and
    # ranks); accelerate divides it by grad_accum and DDP averages gradients over ranks, so scaling by
    # both makes the update the gradient of exactly that normalised loss, whatever the split.
    loss_scale = config.grad_accum * world
    sums = _Sums.zeros(device)
    started, teacher_before = time.perf_counter(), teacher.seconds()
    for micro, examples in zip(step[rank::world], batches.micro_batches):
        batch = data.collated(examples, device)
        rows = teacher.for_batch(micro, device) if batches.kind == "data" else None
        # accumulate() skips the gradient all-reduce on all but the last micro-batch.
        with accelerator.accumulate(model):
            out = model(
                batch, num_items_in_batch=batches.num_items, teacher_rows=rows, kd_rate=batches.kd_rate
            )
            accelerator.backward(out.loss * loss_scale)
        sums.add(out)
    teacher_s = teacher.seconds() - teacher_before
    sums.record_step(batches, teacher_s, time.perf_counter() - started - teacher_s)
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
    tokens: Tensor  # tokens of the micro-batches (prompt and response)
    # Where the step's time went and what generation did (see todi.onpolicy.GeneratedStats); seconds and
    # generated_steps are per rank, so the window divides their sums over ranks by the number of ranks.
    teacher_s: Tensor
    student_s: Tensor
    gen_s: Tensor
    generated_steps: Tensor
    gen_sequences: Tensor
    gen_tokens: Tensor
    gen_eos: Tensor
    replayed: Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> _Sums:
        return cls(*(torch.zeros((), dtype=torch.float64, device=device) for _ in dataclasses.fields(cls)))

    def record_step(self, batches: StepBatches, teacher_s: float, student_s: float) -> None:
        """The step's tokens, timings and generation figures (host numbers: no device sync)."""
        stats = batches.stats
        for name, value in (
            ("tokens", batches.tokens),
            ("teacher_s", teacher_s),
            ("student_s", student_s),
            ("gen_s", stats.seconds),
            ("generated_steps", stats.generated_steps),
            ("gen_sequences", stats.sequences),
            ("gen_tokens", stats.tokens),
            ("gen_eos", stats.eos),
            ("replayed", stats.replayed),
        ):
            getattr(self, name).add_(value)

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
    """The training metrics of the steps since the last log line. ``timed``: report where a step's time
    went (teacher, student); ``generating``: report what the step's generation did."""

    def __init__(self, device: torch.device, *, timed: bool = False, generating: bool = False) -> None:
        self.device, self.timed, self.generating = device, timed, generating
        self._reset()

    def _reset(self) -> None:
        self.sums, self.steps, self.start = _Sums.zeros(self.device), 0, time.perf_counter()
        self.spent, self.all_steps = _Sums.zeros(self.device), 0  # skipped steps too: their time was spent

    def add(self, sums: _Sums, applied: bool) -> None:
        """A step's sums; its loss parts count only when its update was ``applied`` (finite)."""
        self.spent += sums
        self.all_steps += 1
        if applied:
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
        spent = self.spent.over_ranks(accelerator)
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
            "tokens_per_s": spent["tokens"] / elapsed,
            "peak_mem": _peak_memory_mib(),
        }
        if state.extra.get("skipped_steps"):
            record["skipped_steps"] = state.extra["skipped_steps"]
        record.update(self._where_time_went(spent, accelerator.num_processes))
        self._reset()
        return record

    def _where_time_went(self, spent: dict[str, float], world: int) -> dict[str, Any]:
        """Per step (seconds: per rank) over every step of the window, skipped ones included."""
        steps = max(self.all_steps, 1)
        record: dict[str, Any] = {}
        if self.timed or self.generating:
            record |= {
                "teacher_s": spent["teacher_s"] / world / steps,
                "student_s": spent["student_s"] / world / steps,
            }
        if self.generating:
            sequences = spent["gen_sequences"]
            record |= {
                "generated": spent["generated_steps"] / world / steps,  # share of the steps
                "gen_s": spent["gen_s"] / world / steps,
                "gen_tokens": spent["gen_tokens"] / steps,
                "gen_mean_length": spent["gen_tokens"] / sequences if sequences else None,
                "gen_eos_share": spent["gen_eos"] / sequences if sequences else None,
                "replayed": spent["replayed"] / steps,
            }
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
        self.samples_file = run_dir / SAMPLES_NAME
        self._truncate(self.metrics, state.global_step)
        self._truncate(self.samples_file, state.global_step)
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

    @staticmethod
    def _truncate(path: Path, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: drop their old records."""
        if not path.exists():
            return
        kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _record_step(line) <= step]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def samples(self, samples: list[dict[str, Any]]) -> None:
        """Generated responses (``--save-samples``), one JSON line each."""
        if self.active and samples:
            with self.samples_file.open("a", encoding="utf-8") as file:
                file.writelines(json.dumps(sample) + "\n" for sample in samples)

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
            if "generated" in record:
                postfix["gen"] = f"{record['generated']:.2f}"
                postfix["gen_len"] = f"{record['gen_mean_length'] or 0:.0f}"
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
