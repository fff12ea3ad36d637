"""``TodiTrainer``: a Hugging Face ``Trainer`` whose loss is todi's distillation objective.

Everything that is not the loss stays ``Trainer``'s: optimizers and schedulers, gradient accumulation,
DDP / FSDP / DeepSpeed through accelerate, gradient checkpointing, mixed precision, ``checkpoint-N``
folders and ``resume_from_checkpoint``, callbacks, evaluation, ``push_to_hub``, report_to. What this
module adds:

- :meth:`TodiTrainer.compute_loss` calls :func:`todi.losses.causal_lm_distillation_loss` (fused or on
  materialised logits, any registered divergence) with the ``num_items_in_batch`` that ``Trainer`` counts
  over the whole step (every micro-batch, every rank), and scales the loss by the number of processes
  as ``Trainer.compute_loss`` does, so that DDP's gradient averaging gives the single-process update.
- ``ce``, ``kd`` and ``todi_weight`` in the training logs, summed over the step's micro-batches and
  ranks and averaged over the steps since the last log line, exactly as ``loss`` is.
- :class:`TodiBatchPlan`: by default the training batches are those of ``todi distill`` (the same
  length-grouped, seeded plan, shared out over ranks the same way), so a ``TodiTrainer`` run and a
  ``todi distill`` run with the same settings train on the same micro-batches.
- A teacher model (a path or a loaded model) or a teacher cache built by ``todi cache-teacher``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler
from transformers import Trainer, TrainingArguments

from todi.divergences import DIVERGENCES, get_divergence
from todi.losses import LossOutput, causal_lm_distillation_loss
from todi.losses.causal_lm import output_head, unwrap

logger = logging.getLogger(__name__)

__all__ = ["TodiBatchPlan", "TodiDistillationConfig", "TodiTrainer"]

_BATCH_KEYS = ("input_ids", "attention_mask", "position_ids", "labels")


@dataclass
class TodiDistillationConfig(TrainingArguments):
    """``TrainingArguments`` plus the distillation options (the rest of ``Trainer`` is unchanged).

    The objective is ``(1 - kd_rate) * CE + kd_rate * divergence(teacher || student)`` per supervised
    token, normalised by the supervised tokens of the whole optimizer step, as in ``todi distill``.
    Defaults follow the ToDi paper's code: ``divergence="todi"`` with ``beta`` 1, ``kd_rate`` 0.5 and
    ``temperature`` 2.0 on both logit sets (no T^2 factor). Note that TRL's ``GKDConfig.beta`` is a
    different thing (the generalised JSD's interpolation weight); ToDi's ``beta`` goes in
    ``divergence_params``.
    """

    _VALID_DICT_FIELDS: ClassVar[list[str]] = [*TrainingArguments._VALID_DICT_FIELDS, "divergence_params"]

    teacher: str | None = field(
        default=None,
        metadata={
            "help": "Teacher model: a local folder or a Hub id (or pass a loaded model as "
            "TodiTrainer(teacher_model=...)). Not needed with teacher_cache or kd_rate=0."
        },
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={
            "help": "A teacher cache written by `todi cache-teacher`, used instead of running a teacher; "
            "the training examples must be the ones the cache was built from (matched by content)."
        },
    )
    cache_tail: str = field(
        default="sampled",
        metadata={"help": "With teacher_cache: sampled, bucket or uniform (see `todi distill --help`)."},
    )
    teacher_lora: str | None = field(
        default=None, metadata={"help": "PEFT adapter folder merged into the teacher when it loads."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow models (student by path, teacher) whose code comes with them."},
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={"help": "Teacher dtype: auto (bfloat16 on GPUs, float32 on CPU), float32, ..."},
    )
    divergence: str = field(
        default="todi",
        metadata={"help": f"The divergence, one of: {', '.join(DIVERGENCES)} (or a registered one)."},
    )
    divergence_params: dict[str, float] | str | None = field(
        default=None,
        metadata={
            "help": 'The divergence\'s parameters, e.g. {"beta": 1.0} for todi, {"skew": 0.1} for skl/srkl, '
            '{"mu": 0.5} for akl; checked by the divergence itself. A JSON string on the command line.'
        },
    )
    kd_rate: float = field(
        default=0.5, metadata={"help": "Weight of the divergence; 1 - kd_rate weighs the cross-entropy."}
    )
    temperature: float = field(
        default=2.0,
        metadata={"help": "Temperature of both distributions inside the divergence (no T^2 factor)."},
    )
    fused: bool = field(
        default=True,
        metadata={
            "help": "Fused chunked head + loss: the [tokens, vocab] logits are never built. Turned off (with a "
            "warning) under FSDP / ZeRO-3, where the head weight is a shard."
        },
    )
    chunk_size: int | None = field(
        default=None, metadata={"help": "Positions per chunk of the fused loss (default: automatic)."}
    )
    compile_loss: bool | None = field(
        default=None, metadata={"help": "torch.compile the fused loss's chunk math (default: automatic)."}
    )
    batch_plan: Literal["todi", "trainer"] = field(
        default="todi",
        metadata={
            "help": "todi: the training batches of `todi distill` (length-grouped, seeded by data_seed or "
            "seed, reshuffled every epoch, a last incomplete optimizer step dropped); trainer: Trainer's "
            "own sampler (train_sampling_strategy)."
        },
    )
    length_grouping: Literal["bucket", "sort", "none"] = field(
        default="bucket",
        metadata={
            "help": "With batch_plan=todi: group examples of similar length (less padding), as `todi distill`."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.divergence_params, str):
            self.divergence_params = json.loads(self.divergence_params)
        problems = []
        if not 0.0 <= self.kd_rate <= 1.0:
            problems.append(f"kd_rate must be in [0, 1], got {self.kd_rate}")
        if not (math.isfinite(self.temperature) and self.temperature >= 1e-2):
            problems.append(f"temperature must be a finite number >= 0.01, got {self.temperature}")
        if self.teacher and self.teacher_cache:
            problems.append("give at most one of teacher and teacher_cache")
        if self.cache_tail not in ("sampled", "bucket", "uniform"):
            problems.append(f"cache_tail must be sampled, bucket or uniform, got {self.cache_tail!r}")
        if self.batch_plan not in ("todi", "trainer"):
            problems.append(f"batch_plan must be todi or trainer, got {self.batch_plan!r}")
        if self.length_grouping not in ("bucket", "sort", "none"):
            problems.append(f"length_grouping must be bucket, sort or none, got {self.length_grouping!r}")
        try:
            get_divergence(self.divergence).resolve(self.divergence_params or {})
        except ValueError as err:
            problems.append(f"divergence {self.divergence!r}: {err}")
        if problems:
            raise ValueError("TodiDistillationConfig: " + "; ".join(problems))

    def loss_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`todi.losses.causal_lm_distillation_loss`."""
        return {
            "divergence": self.divergence,
            "kd_rate": self.kd_rate,
            "temperature": self.temperature,
            "chunk_size": self.chunk_size,
            "compile": self.compile_loss,
            **(self.divergence_params or {}),
        }


class TodiBatchPlan(Sampler):
    """The micro-batches of ``todi distill`` (:func:`todi.training.epoch_plan`), one epoch after another,
    as a batch sampler.

    Steps of ``grad_accum x world_size`` micro-batches are laid end to end; accelerate gives rank r the
    batches r, r + world, ... and each rank accumulates ``grad_accum`` of them, so every optimizer step
    sees the micro-batches ``todi distill`` gives it, on any split over ranks. ``set_epoch`` (called by
    ``Trainer``) reshuffles as ``todi distill`` does (seed + epoch); the plan is a pure function of the
    epoch, so ``Trainer``'s resume (skipping the batches already trained) is exact.
    """

    # accelerate's BatchSamplerShard: batches may differ in size (None), and no batch is repeated to even
    # out the ranks (every epoch is a whole number of optimizer steps already).
    batch_size = None
    drop_last = True

    def __init__(
        self, lengths: Sequence[int], *, batch_size: int, micro_per_step: int, seed: int, grouping: str
    ) -> None:
        from todi.training import epoch_plan

        self._plan = epoch_plan
        self.options = {
            "batch_size": batch_size,
            "micro_per_step": micro_per_step,
            "seed": seed,
            "grouping": grouping,
        }
        self.lengths = list(lengths)
        self.epoch = 0
        self.steps_per_epoch = len(self._plan(self.lengths, epoch=0, **self.options))
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.lengths)} training examples do not fill one optimizer step of {micro_per_step} "
                f"micro-batches of {batch_size}; lower per_device_train_batch_size or gradient_accumulation_steps"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        for step in self._plan(self.lengths, epoch=self.epoch, **self.options):
            yield from step

    def __len__(self) -> int:
        return self.steps_per_epoch * self.options["micro_per_step"]


class TodiTrainer(Trainer):
    """A ``transformers.Trainer`` that distils a teacher into ``model`` with todi's objective.

    Args:
        model: the student, a causal LM (a loaded ``*ForCausalLM``, possibly PEFT-wrapped) or its path.
        args: a :class:`TodiDistillationConfig`.
        teacher_model: a loaded teacher (instead of ``args.teacher``); frozen and moved to the device here.
        data_collator: defaults to :class:`todi.data.DataCollator` (right padding, position ids); the
            examples hold ``input_ids`` and unshifted ``labels`` (-100 on the prompt), as
            :func:`todi.data.encode_examples` writes them.
        Everything else as in ``Trainer``.

    The loss is normalised by the supervised tokens of the whole optimizer step (``num_items_in_batch``,
    counted by ``Trainer`` over every micro-batch and, with ``average_tokens_across_devices`` (the
    default), every rank), so gradient accumulation and data parallelism give the single-process update.
    """

    def __init__(
        self,
        model: nn.Module | str,
        args: TodiDistillationConfig,
        teacher_model: nn.Module | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, TodiDistillationConfig):
            raise TypeError(
                f"TodiTrainer needs args=TodiDistillationConfig(...), got {type(args).__name__}; "
                "TodiDistillationConfig takes every TrainingArguments option plus the distillation ones"
            )
        if teacher_model is not None and (args.teacher or args.teacher_cache):
            raise ValueError("pass the teacher once: teacher_model, args.teacher or args.teacher_cache")
        if isinstance(model, str):
            from todi.models import load_causal_lm

            model = load_causal_lm(model, trust_remote_code=args.trust_remote_code)
        if data_collator is None:
            data_collator = _default_collator(model, processing_class)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        # The loss takes num_items_in_batch: Trainer must count it (over labels[:, 1:], the positions the
        # shifted loss scores, whatever the model's own loss_type says) and pass it to compute_loss.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self.teacher_model, self._cache, self._digests = self._setup_teacher(args, teacher_model)
        self._vocab_size = self._shared_vocab_size()
        self._fused = self._use_fused(args)
        from todi.training import _Sums

        self._sums = _Sums.zeros(self.args.device)
        self._window_start: int | None = None  # the global step before the first step of the log window

    # ---- setup --------------------------------------------------------------------------------------

    def _setup_teacher(
        self, args: TodiDistillationConfig, teacher_model: nn.Module | None
    ) -> tuple[nn.Module | None, Any, dict[int, int]]:
        from todi.models import freeze, load_causal_lm, resolve_dtype

        device = self.args.device
        if args.teacher_cache:
            from todi.cache import TeacherCache

            cache = TeacherCache(args.teacher_cache, tail_mode=args.cache_tail)
            return None, cache, {digest: i for i, digest in enumerate(cache.digests())}
        if args.teacher:
            if self.processing_class is not None and hasattr(self.processing_class, "get_vocab"):
                from todi.data import check_tokenizers
                from todi.models import load_tokenizer

                teacher_tokenizer = load_tokenizer(args.teacher, trust_remote_code=args.trust_remote_code)
                check_tokenizers(teacher_tokenizer, self.processing_class)
            from todi.parallel import replicated_loading

            with replicated_loading(self.accelerator):  # whole on every rank, even under ZeRO-3 / FSDP
                teacher_model = load_causal_lm(
                    args.teacher,
                    dtype=resolve_dtype(args.teacher_dtype, device, auto=torch.bfloat16),
                    trust_remote_code=args.trust_remote_code,
                    adapter=args.teacher_lora,
                )
        if teacher_model is None:
            if args.kd_rate > 0:
                raise ValueError(
                    "TodiTrainer has no teacher: set args.teacher (a path or Hub id) or args.teacher_cache, "
                    "or pass teacher_model=...; for plain SFT set kd_rate=0"
                )
            return None, None, {}
        # Frozen and replicated on every rank: never in the optimizer, the checkpoints or a DDP bucket.
        return freeze(teacher_model).to(device), None, {}

    def _shared_vocab_size(self) -> int | None:
        """Logits the loss compares: the tokenizer's size when heads are padded past it."""
        tokenizer = self.processing_class
        if self.teacher_model is None or tokenizer is None or not hasattr(tokenizer, "get_vocab"):
            return None
        from todi.data import shared_vocab_size

        rows = [m.get_output_embeddings().weight.shape[0] for m in (unwrap(self.model), self.teacher_model)]
        return shared_vocab_size(tokenizer, *rows)

    def _use_fused(self, args: TodiDistillationConfig) -> bool:
        if not args.fused:
            return False
        from todi.parallel import is_sharded

        if is_sharded(self.accelerator):
            logger.warning(
                "fused loss disabled under FSDP / ZeRO-3 (the head weight is a shard outside the head's "
                "forward); computing the loss on materialised logits"
            )
            return False
        output_head(self.model)  # refuses models whose logits are post-processed, before training starts
        return True

    # ---- data ---------------------------------------------------------------------------------------

    def get_train_dataloader(self) -> DataLoader:
        if self.args.batch_plan != "todi":
            return super().get_train_dataloader()
        if self.train_dataset is None:
            raise ValueError("TodiTrainer: training needs a train_dataset")
        dataset = self.train_dataset
        plan = TodiBatchPlan(
            [len(example["input_ids"]) for example in dataset],
            batch_size=self.args.per_device_train_batch_size,
            micro_per_step=self.args.gradient_accumulation_steps * self.args.world_size,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            grouping=self.args.length_grouping,
        )
        loader = DataLoader(
            dataset,
            batch_sampler=plan,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    # ---- the loss -----------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        batch = {key: inputs[key] for key in _BATCH_KEYS if inputs.get(key) is not None}
        options = self.args.loss_options()
        teacher: Any = self.teacher_model
        if self._cache is not None:
            if model.training:
                teacher = self._cached_rows(batch)
            else:  # the cache holds the training examples only: evaluate the CE, as todi distill's dev loss
                teacher, options["kd_rate"] = None, 0.0
        inner = self.accelerator.unwrap_model(model)
        out = _inside_forward(
            model,
            inner,
            lambda: causal_lm_distillation_loss(
                inner,
                teacher,
                batch,
                num_items_in_batch=num_items_in_batch,
                fused=self._fused,
                vocab_size=self._vocab_size,
                **options,
            ),
        )
        scale = self._rank_scale(num_items_in_batch)
        loss = out.loss * scale
        if model.training:
            self._add_to_window(out, scale, num_items_in_batch)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _rank_scale(self, num_items_in_batch: Tensor | int | None) -> float:
        """What Trainer.compute_loss multiplies a loss normalised by a count taken over all ranks by: DDP
        averages the ranks' gradients, the count already divided by all of them."""
        if num_items_in_batch is None or not self.args.average_tokens_across_devices:
            return 1.0
        return float(self.accelerator.num_processes // self.get_tp_size())

    def _add_to_window(self, out: LossOutput, scale: float, num_items_in_batch: Any) -> None:
        """Add this micro-batch's share of the step's ce / kd (see LossOutput): with the step's count
        over all ranks the shares sum to the step's value over micro-batches and ranks; otherwise they
        are brought to the normalisation of the loss Trainer logs (mean over ranks and micro-batches)."""
        if self._window_start is None:
            self._window_start = self.state.global_step  # a resumed run starts at its checkpoint's step
        share = scale / self.accelerator.num_processes
        if num_items_in_batch is None:
            share /= self.current_gradient_accumulation_steps
        self._sums.add(
            dataclasses.replace(out, loss=out.loss.detach() * share, ce=out.ce * share, kd=out.kd * share)
        )

    def _cached_rows(self, batch: dict[str, Tensor]) -> Any:
        """The teacher cache's rows of the batch's examples, found by content (the examples' digests), so
        that any data order, sampler or rank split reads the right rows."""
        from todi.cache import example_digest

        indices = []
        mask = batch.get("attention_mask")
        for row, (ids, labels) in enumerate(zip(batch["input_ids"].tolist(), batch["labels"].tolist())):
            keep = mask[row].bool().tolist() if mask is not None else [True] * len(ids)
            example = {
                "input_ids": [t for t, k in zip(ids, keep) if k],
                "labels": [t for t, k in zip(labels, keep) if k],
            }
            index = self._digests.get(example_digest(example))
            if index is None:
                raise ValueError(
                    f"a training example (row {row} of this batch, {len(example['input_ids'])} tokens) is not in "
                    f"teacher cache {self.args.teacher_cache}; train on the data, template and lengths the "
                    "cache was built from"
                )
            indices.append(index)
        return self._cache.rows(indices).to(batch["input_ids"].device)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Tensor | None, None, None]:
        """The evaluation loss only (the objective per supervised token; with a teacher cache, the CE):
        the fused loss builds no logits to return."""
        loss, _, _ = super().prediction_step(
            model, inputs, prediction_loss_only=True, ignore_keys=ignore_keys
        )
        return loss, None, None

    # ---- logging ------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # A training log line ("loss" is there; Trainer calls this on every rank, so the sum is collective).
        if "loss" in logs and self._window_start is not None:
            steps = max(self.state.global_step - self._window_start, 1)
            sums = self._sums.over_ranks(self.accelerator)
            logs["ce"] = sums["ce"] / steps
            logs["kd"] = sums["kd"] / steps
            if sums["todi_tokens"]:
                logs["todi_weight"] = sums["fkl_share_x_tokens"] / sums["todi_tokens"]
            self._sums = type(self._sums).zeros(self.args.device)
            self._window_start = None
        super().log(logs, start_time)


def _inside_forward(wrapper: nn.Module, inner: nn.Module, loss: Callable[[], LossOutput]) -> LossOutput:
    """Run ``loss()`` as the forward of ``wrapper`` (DDP, FSDP, DeepSpeed around ``inner``).

    The fused loss reads the head weight after the model's forward has returned (the model runs with its
    head as the identity). DDP with find_unused_parameters (Trainer's default without gradient
    checkpointing) would mark that weight unused at the end of the forward and then see its gradient
    arrive ("marked ready twice"); FSDP would hand the loss a shard. Inside the wrapper's forward, the
    whole loss is what DDP traces and what FSDP unshards for (the reason todi distill has LossModule).
    """
    if wrapper is inner:
        return loss()
    original = inner.forward

    def forward(*args: Any, **kwargs: Any) -> LossOutput:
        inner.forward = original  # the loss calls the model's real forward
        return loss()

    inner.forward = forward
    try:
        return wrapper()
    finally:
        inner.forward = original


def _default_collator(model: nn.Module, tokenizer: Any) -> Any:
    """todi's collator, padding with the pad token, else EOS (padding is masked, so any id works). The
    tokenizer is left as it is: Trainer saves it with the model, and a pad token added here would make
    it differ from its teacher's (check_tokenizers compares pad ids) in a later distillation."""
    from todi.data import DataCollator

    config = getattr(unwrap(model), "config", None)
    for source in (tokenizer, config):
        for name in ("pad_token_id", "eos_token_id"):
            pad = getattr(source, name, None)
            pad = pad[0] if isinstance(pad, list) and pad else pad
            if isinstance(pad, int):
                return DataCollator(pad)
    raise ValueError(
        "TodiTrainer cannot pick a pad token: pass processing_class=tokenizer or a data_collator"
    )
