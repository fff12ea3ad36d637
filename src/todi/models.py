"""Loading, freezing, LoRA-wrapping and exporting the causal LMs that ``todi sft`` / ``todi distill`` train.

Everything here is plain Hugging Face + PEFT; the training loop only calls these functions, so a model
family that ``AutoModelForCausalLM`` loads needs no code in todi.

Both loaders also take a GGUF file (or a folder holding exactly one ``.gguf`` and no ``config.json``):
:func:`resolve_model_path` converts it once into a plain Hugging Face folder under the todi cache
(``$TODI_CACHE/gguf/``, default ``~/.cache/todi/gguf/``) and every later load reads that folder.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from todi.errors import NonFiniteError, TodiError, UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "DTYPES",
    "add_lora",
    "causal_lm",
    "check_finite_parameters",
    "count_parameters",
    "export_model",
    "freeze",
    "load_causal_lm",
    "load_tokenizer",
    "model_identity",
    "resolve_dtype",
    "resolve_model_path",
    "todi_cache_dir",
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


def todi_cache_dir() -> Path:
    """The root of todi's caches: ``$TODI_CACHE``, else ``$XDG_CACHE_HOME/todi``, else ``~/.cache/todi``."""
    if os.environ.get("TODI_CACHE"):
        return Path(os.environ["TODI_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "todi"


# --------------------------------------------------------------------------------------------------
# GGUF files
# --------------------------------------------------------------------------------------------------

_GGUF_MARKER = "todi_gguf.json"


def _find_gguf(name_or_path: str) -> Path | None:
    """The GGUF file ``name_or_path`` stands for, or None when it is an ordinary folder or a Hub id."""
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise TodiError(
                f"GGUF file {name_or_path} does not exist", "check the path, or give a model folder or Hub id"
            )
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(found) > 1:
        raise UsageError(
            f"{name_or_path} holds {len(found)} GGUF files ({', '.join(p.name for p in found)})",
            "give the path of the one to use (folder/file.gguf)",
        )
    return found[0] if found else None


def _gguf_cache_folder(gguf: Path) -> Path:
    # The key changes when the file is replaced or touched, so an updated GGUF is converted afresh;
    # the stem keeps the folder recognisable to someone browsing the cache.
    stat = gguf.stat()
    key = f"{gguf.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return todi_cache_dir() / "gguf" / f"{gguf.stem}-{digest}"


def _require_gguf_package() -> None:
    from transformers.utils.import_utils import GGUF_MIN_VERSION, is_gguf_available

    if importlib.util.find_spec("gguf") is None or not is_gguf_available():
        raise TodiError(
            f"reading GGUF files needs the gguf package (version {GGUF_MIN_VERSION} or newer)",
            "pip install gguf   (or: pip install 'todi[gguf]')",
        )


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` into a float32 Hugging Face folder at ``target``, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf_package()
    start = time.perf_counter()
    logger.info("converting %s to a Hugging Face folder (once; later loads use the cache)", gguf)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, NotImplementedError) as err:
        raise TodiError(
            f"cannot read the GGUF file {gguf}: {err}".splitlines()[0],
            "transformers reads GGUF files of the architectures and quantisation types listed in its "
            "GGUF documentation; convert others with llama.cpp's tools or use the original HF model",
        ) from err
    # A GGUF-loaded model refuses save_pretrained (its config carries a GGUF quantization_config);
    # a plain model of the same config with the dequantised weights saves like any other.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Built on the meta device and given the loaded tensors themselves: no random initialisation (minutes
    # for a 7B model on a CPU) and no second copy of the weights. Only saved, never run, so the
    # non-persistent buffers left on the meta device (rotary frequencies) do not matter.
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(loaded.generation_config)
    del loaded

    target.parent.mkdir(parents=True, exist_ok=True)
    # Per-process staging name: two commands converting the same file at once must not share it.
    staging = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        stat = gguf.stat()
        marker = {"gguf": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        (staging / _GGUF_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished the same conversion first; its folder is as good as ours.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("converted %s into %s in %.0f s", gguf.name, target, time.perf_counter() - start)


def resolve_model_path(name_or_path: str) -> str:
    """The folder or Hub id to hand to ``from_pretrained`` for ``name_or_path``.

    A ``.gguf`` file, or a folder holding exactly one ``.gguf`` file and no ``config.json``, becomes a
    plain Hugging Face folder in the cache (converted on first use: dequantised to float32 weights plus
    the tokenizer); anything else is returned unchanged.
    """
    gguf = _find_gguf(str(name_or_path))
    if gguf is None:
        return str(name_or_path)
    target = _gguf_cache_folder(gguf)
    if (target / "config.json").is_file():
        logger.info("GGUF %s: using the converted copy in %s", gguf.name, target)
    else:
        _convert_gguf(gguf, target)
    return str(target)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved with a model; fast to load, so the CLI checks it before loading any weights
    (a GGUF model is converted here, on first use: see :func:`resolve_model_path`)."""
    from transformers import AutoTokenizer

    source, name_or_path = name_or_path, resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise TodiError(f"cannot load the tokenizer of {source}: {err}".splitlines()[0], _LOAD_HINT) from err
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
    merged into the weights (``adapter``: the teacher's LoRA from a LoRA SFT run). ``name_or_path`` may
    also be a GGUF file (see :func:`resolve_model_path`).

    The model is returned in train mode on the CPU; the caller moves it.
    """
    from transformers import AutoModelForCausalLM

    source, name_or_path = name_or_path, resolve_model_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=None
        )
    except (OSError, ValueError) as err:
        raise TodiError(f"cannot load model {source}: {err}".splitlines()[0], _LOAD_HINT) from err
    if adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        except (OSError, ValueError) as err:
            raise TodiError(
                f"cannot load the adapter {adapter} into {source}: {err}".splitlines()[0],
                "give the folder a PEFT save_pretrained wrote (adapter_config.json, adapter_model.safetensors) "
                "for this base model",
            ) from err
        logger.info("merged adapter %s into %s", adapter, source)
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


def check_finite_parameters(model: nn.Module, what: str, dtype_option: str = "--dtype") -> None:
    """Raise NonFiniteError naming the first parameter of ``model`` holding a NaN or an infinity: such a
    model can only train to NaN (or, as a teacher, teach NaN), and finding out at load time costs one
    pass over the weights (one max and one min per tensor: no copies)."""
    for name, param in model.named_parameters():
        if not param.is_floating_point() or param.numel() == 0:
            continue
        if not bool(torch.isfinite(param.amax()) & torch.isfinite(param.amin())):
            raise NonFiniteError(
                f"{what}: parameter {name} {tuple(param.shape)} holds NaN or infinite values (loaded as "
                f"{str(param.dtype).removeprefix('torch.')})",
                "a NaN weight means a damaged checkpoint or a diverged training run: use another one; an "
                f"infinite weight may be a float16 overflow: try {dtype_option} float32 or bfloat16",
            )


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
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write a plain Hugging Face folder (weights as safetensors + config + tokenizer) that
    ``AutoModelForCausalLM.from_pretrained`` loads; atomically (temporary folder, then rename).

    A LoRA model is merged into its base weights unless ``merge_lora`` is False (then the folder holds the
    adapter, which transformers loads on top of the base model named in adapter_config.json).
    ``copy_before_merge`` merges a copy so that training can go on with the adapter (best-model exports).
    ``state_dict`` (full, unsharded) replaces the module's own, for FSDP / ZeRO-3 gathered weights
    (not with a LoRA merge: load it into an unsharded copy of the model first).
    ``extra_files`` (file name -> text) are written into the folder before it appears, so a record of
    how the model was made never goes missing from it.
    """
    from todi.checkpoint import write_errors

    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    if _is_peft(model) and merge_lora:
        if state_dict is not None:
            raise ValueError("merging LoRA needs the module's own weights; load state_dict into it first")
        model = (copy.deepcopy(model) if copy_before_merge else model).merge_and_unload()
    with write_errors(path, "the model", cleanup=tmp):
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


# Files whose bytes make a model what it is (weights, adapters, the config that shapes them).
_IDENTITY_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_IDENTITY_FILES = ("config.json", "adapter_config.json")
_SAMPLE = 1 << 16  # bytes read at each of _SAMPLES places of a large file
_SAMPLES = 32


def model_identity(name_or_path: str | os.PathLike) -> str:
    """A content key of a model that is cheap for any size: ``sha256:...`` over, for each weights and
    config file of a local folder (or a single file such as a GGUF), its name, its size and 32 evenly
    spaced 64 KiB samples of its bytes (the whole file when smaller). Retraining or replacing the
    weights changes it; copying or touching the folder does not. A Hub id (not a local path) is keyed by
    its name: ``hub:ID``."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return f"hub:{name_or_path}"
    files = (
        [path]
        if path.is_file()
        else sorted(
            p
            for p in path.iterdir()
            if p.is_file() and (p.suffix in _IDENTITY_SUFFIXES or p.name in _IDENTITY_FILES)
        )
    )
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with file.open("rb") as handle:
            if size <= _SAMPLE * _SAMPLES:
                digest.update(handle.read())
                continue
            for i in range(_SAMPLES):
                handle.seek((size - _SAMPLE) * i // (_SAMPLES - 1))
                digest.update(handle.read(_SAMPLE))
    return f"sha256:{digest.hexdigest()}"
