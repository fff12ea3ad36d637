"""Loading, freezing, LoRA-wrapping and exporting the causal LMs that ``todi sft`` / ``todi distill`` train.

Everything here is plain Hugging Face + PEFT; the training loop only calls these functions, so a model
family that ``AutoModelForCausalLM`` loads needs no code in todi.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from todi.errors import TodiError, UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "DTYPES",
    "add_lora",
    "causal_lm",
    "count_parameters",
    "export_model",
    "freeze",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_dtype",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

_LOAD_HINT = (
    "give a folder written by save_pretrained (config, weights and tokenizer files) or a Hugging Face "
    "Hub id reachable from this machine; models with custom code need --trust-remote-code"
)


def resolve_dtype(name: str, device: torch.device, *, auto: torch.dtype = torch.float32) -> torch.dtype:
    """The torch dtype for a ``--dtype`` value; ``auto`` gives ``auto`` on GPUs and float32 on CPU
    (CPUs run half precision slowly and without autocast benefits)."""
    if name == "auto":
        return auto if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}", f"use auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved with a model; fast to load, so the CLI checks it before loading any weights."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise TodiError(
            f"cannot load the tokenizer of {name_or_path}: {err}".splitlines()[0], _LOAD_HINT
        ) from err
    if tokenizer.eos_token_id is None:
        # A bare tokenizer.json (e.g. GPT-2's) may lack the EOS the model was trained with; the model's
        # generation config names it, and reading that JSON costs nothing.
        eos = _eos_from_config(name_or_path)
        if eos is not None:
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    return tokenizer


def _eos_from_config(name_or_path: str) -> int | None:
    import json

    for name in ("generation_config.json", "config.json"):
        path = Path(name_or_path) / name
        if path.is_file():
            eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
            if isinstance(eos, int):
                return eos
    return None


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    adapter: str | None = None,
) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` (safetensors preferred), optionally with a PEFT adapter
    merged into the weights (``adapter``: the teacher's LoRA from a LoRA SFT run).

    The model is returned in train mode on the CPU; the caller moves it.
    """
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=None
        )
    except (OSError, ValueError) as err:
        raise TodiError(f"cannot load model {name_or_path}: {err}".splitlines()[0], _LOAD_HINT) from err
    if adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        except (OSError, ValueError) as err:
            raise TodiError(
                f"cannot load the adapter {adapter} into {name_or_path}: {err}".splitlines()[0],
                "give the folder a PEFT save_pretrained wrote (adapter_config.json, adapter_model.safetensors) "
                "for this base model",
            ) from err
        logger.info("merged adapter %s into %s", adapter, name_or_path)
    model.train()
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Teacher mode: eval (no dropout) and no gradients, so it costs no optimizer state or grad memory."""
    model.eval()
    model.requires_grad_(False)
    return model


def add_lora(model: nn.Module, *, r: int, alpha: float, dropout: float, target: str) -> nn.Module:
    """Wrap ``model`` in a PEFT LoRA model; only the adapter weights stay trainable.

    ``target`` is ``all-linear`` (every linear layer but the output head) or a comma-separated list of
    module names (``q_proj,v_proj``; GPT-2: ``c_attn,c_proj,c_fc``).
    """
    from peft import LoraConfig, get_peft_model

    modules: str | list[str] = (
        target if target == "all-linear" else [t.strip() for t in target.split(",") if t]
    )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=modules,
        task_type="CAUSAL_LM",
        bias="none",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise UsageError(
            f"LoRA could not wrap the model: {err}".splitlines()[0],
            "pass --lora-target all-linear or module names that exist in the model",
        ) from err


def causal_lm(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` inside a PEFT wrapper (LoRA layers are injected in place, so calling it trains
    them); the model itself otherwise. The loss needs it to reach the backbone and the output head."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and _is_peft(model) else model


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but a bare model needs no PEFT to be recognised
        return False
    return isinstance(model, PeftModel)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def export_model(
    model: nn.Module,
    tokenizer: Any,
    path: str | os.PathLike,
    *,
    merge_lora: bool = True,
    copy_before_merge: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a plain Hugging Face folder (weights as safetensors + config + tokenizer) that
    ``AutoModelForCausalLM.from_pretrained`` loads; atomically (temporary folder, then rename).

    A LoRA model is merged into its base weights unless ``merge_lora`` is False (then the folder holds the
    adapter, which transformers loads on top of the base model named in adapter_config.json).
    ``copy_before_merge`` merges a copy so that training can go on with the adapter (best-model exports).
    ``state_dict`` (full, unsharded) replaces the module's own, for FSDP / ZeRO-3 gathered weights
    (not with a LoRA merge: load it into an unsharded copy of the model first).
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    if _is_peft(model) and merge_lora:
        if state_dict is not None:
            raise ValueError("merging LoRA needs the module's own weights; load state_dict into it first")
        model = (copy.deepcopy(model) if copy_before_merge else model).merge_and_unload()
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path
