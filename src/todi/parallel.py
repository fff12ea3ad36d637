"""The processes of a run: the accelerate set-up, the lock on --out, and what sharded training (FSDP,
DeepSpeed ZeRO-3) needs from a loss that reads the output head outside the head's own forward."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from todi.checkpoint import any_rank
from todi.errors import TodiError, UsageError
from todi.models import causal_lm
from todi.outputs import OutputFolder

if TYPE_CHECKING:
    from todi.training import TrainConfig

__all__ = [
    "claimed",
    "is_sharded",
    "make_accelerator",
    "prepare_fused_head",
    "replicated_loading",
    "sum_over_ranks",
]


def make_accelerator(config: TrainConfig) -> Any:
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
def claimed(accelerator: Any, folder: OutputFolder) -> Iterator[None]:
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


def is_sharded(accelerator: Any) -> bool:
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


def prepare_fused_head(accelerator: Any, model: nn.Module) -> str | None:
    """Make the fused loss read the whole output head under sharding; the reason it cannot, else None.

    ZeRO-3 gathers a module's parameters only around that module's own forward, and the fused loss
    reads the head weight after the head's forward has returned: registering it as an external parameter
    of the root module makes DeepSpeed keep it gathered for the root's whole forward. FSDP already
    unshards the root unit inside LossModule.forward, unless the wrapping policy gave the head a unit of
    its own (then its weight is a shard outside its forward).
    """
    from accelerate.utils import DistributedType

    if not is_sharded(accelerator):
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
def replicated_loading(accelerator: Any) -> Iterator[None]:
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


def sum_over_ranks(accelerator: Any, values: list[float]) -> list[float]:
    if accelerator.num_processes == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()
