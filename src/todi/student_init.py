"""``todi init-student``: a smaller student made of a subset of a teacher's layers.

The student keeps the teacher's architecture, tokenizer, embeddings, final norm and output head, and
takes its transformer blocks from the chosen teacher layers (student layer ``i`` is a copy of teacher
layer ``layers[i]``); only ``num_hidden_layers`` (and per-layer config lists such as ``layer_types``)
changes. Such a student starts far closer to the teacher than a random one, the usual initialisation
for layer-pruned distillation. ``--random`` writes the same smaller architecture randomly initialised,
the baseline to compare against, from the teacher's config alone (its weights are never read). Any causal LM whose blocks sit in one ``nn.ModuleList`` works: Llama,
Mistral, Qwen2, GPT-2, GPT-NeoX and most others that ``AutoModelForCausalLM`` loads; the teacher may be
a folder, a Hub id or a GGUF file (see :func:`todi.models.resolve_model_path`).

Example (a 6-layer student of the 30-layer SmolLM2-135M, then distilled)::

    todi init-student --from HuggingFaceTB/SmolLM2-135M-Instruct --layers 0,6,12,18,24,29 --out student
    todi init-student --from SmolLM2-135M-Instruct.Q4_1.gguf --layers 6 --out student   # 0,6,12,17,23,29
    todi distill --teacher HuggingFaceTB/SmolLM2-135M-Instruct --student student --data data/dolly ...

``--layers`` takes comma-separated teacher layer indices (0-based, strictly increasing), or one number
``K`` (no comma): K layers evenly spaced over the teacher's N, always including the first and the last,
layer ``i`` of the student being teacher layer ``round(i * (N - 1) / (K - 1))`` (halves round up);
K = 1 gives layer 0. For a single chosen layer write it with a comma: ``--layers 5,``.

The output folder holds the model (safetensors), config, tokenizer and ``todi_init.json``, which records
the teacher and the layers taken. ``--overwrite`` replaces only a student folder this command wrote (it
carries todi's marker, see :mod:`todi.outputs`); a folder of anything else is never written into.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from todi import __version__
from todi.errors import TodiError, UsageError
from todi.models import (
    DTYPES,
    count_parameters,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
)
from todi.options import option
from todi.outputs import OutputFolder

logger = logging.getLogger(__name__)

__all__ = [
    "INIT_RECORD",
    "Config",
    "evenly_spaced_layers",
    "find_layer_list",
    "make_student",
    "parse_layers",
    "run",
    "student_config",
]

INIT_RECORD = "todi_init.json"


@dataclass
class Config:
    """Make a smaller student from a subset of a teacher's layers (same tokenizer and architecture)."""

    teacher: str = option(
        "",
        "the teacher (required): a model folder, a Hugging Face Hub id or a GGUF file",
        aliases=["--from"],
    )
    layers: str = option(
        "",
        "teacher layers to keep (required): 0-based indices, comma-separated and increasing (0,6,12), "
        "or a count K (6): K layers evenly spaced, first and last included",
    )
    out: str = option("", "output folder (required) for the student model, tokenizer and todi_init.json")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "dtype of the saved weights")
    random: bool = option(
        False, "initialise the smaller architecture randomly instead of copying teacher weights"
    )
    seed: int = option(0, "seed of the random initialisation (--random)")
    overwrite: bool = option(
        False, "replace a student an earlier init-student wrote in --out (never a folder of anything else)"
    )
    trust_remote_code: bool = option(False, "allow models whose code comes with their checkpoint")

    def __post_init__(self) -> None:
        """A config checks itself when built (--layers against the teacher waits for its config)."""
        if not self.teacher:
            raise UsageError(
                "--from is required", "give the teacher: a model folder, a Hub id or a GGUF file"
            )
        if not self.out:
            raise UsageError("--out is required", "give the folder to write the student to")
        if not self.layers.strip():
            raise UsageError("--layers is required", "e.g. --layers 0,6,12 (indices) or --layers 6 (a count)")
        if self.dtype not in DTYPES:
            raise UsageError(f"unknown --dtype {self.dtype!r}", "use float32, bfloat16 or float16")


# --------------------------------------------------------------------------------------------------
# Choosing layers
# --------------------------------------------------------------------------------------------------


def evenly_spaced_layers(count: int, num_layers: int) -> list[int]:
    """``count`` of ``num_layers`` layer indices, evenly spaced, first and last included (halves round up).

    With ``count <= num_layers`` the spacing is at least 1, so the rounded indices never repeat."""
    if not 1 <= count <= num_layers:
        raise ValueError(f"count must be in 1..{num_layers}, got {count}")
    if count == 1:
        return [0]
    # Integer form of floor(i * (N - 1) / (K - 1) + 1/2): no float rounding surprises.
    return [(2 * i * (num_layers - 1) + count - 1) // (2 * (count - 1)) for i in range(count)]


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """The teacher layer indices ``--layers`` names, checked against a teacher of ``num_layers`` layers."""
    text = spec.strip()
    if not text:
        raise UsageError("--layers is required", "e.g. --layers 0,6,12 (indices) or --layers 6 (a count)")
    hint_range = f"the teacher has {num_layers} layers: indices 0..{num_layers - 1}"
    if "," not in text:
        if not re.fullmatch(r"[+-]?\d+", text):
            raise UsageError(
                f"--layers {spec!r} is neither a count nor a comma-separated list of layer indices",
                "e.g. --layers 0,6,12 (indices) or --layers 6 (a count)",
            )
        count = int(text)
        if not 1 <= count <= num_layers:
            raise UsageError(
                f"--layers {count} asks for {count} evenly spaced layers, but the count must be 1..{num_layers}",
                f"{hint_range}; to keep one given layer write it with a comma (--layers {count},)",
            )
        return evenly_spaced_layers(count, num_layers)
    items = [item.strip() for item in text.split(",")]
    if any(not item for item in items[:-1]):
        raise UsageError(f"--layers {spec!r} has an empty item", "write indices separated by single commas")
    layers = []
    for item in filter(None, items):
        if not re.fullmatch(r"[+-]?\d+", item):
            raise UsageError(f"--layers: {item!r} is not a layer index (an integer)", hint_range)
        layers.append(int(item))
    for index in layers:
        if not 0 <= index < num_layers:
            raise UsageError(f"--layers: layer {index} is out of range", hint_range)
    for before, after in itertools.pairwise(layers):
        if after <= before:
            raise UsageError(
                f"--layers must be strictly increasing: {after} follows {before}",
                "list each teacher layer once, in order (the student keeps the teacher's layer order)",
            )
    return layers


# --------------------------------------------------------------------------------------------------
# Building the student
# --------------------------------------------------------------------------------------------------


def find_layer_list(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """The name and the ``nn.ModuleList`` of the transformer blocks: the first ModuleList of
    ``num_layers`` modules (``model.layers``, ``transformer.h``, ``gpt_neox.layers``, ...)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return name, module
    raise TodiError(
        f"{type(model).__name__} has no list of {num_layers} layers (nn.ModuleList) to take layers from",
        "init-student supports models whose transformer blocks sit in one nn.ModuleList "
        "(Llama, Mistral, Qwen2, GPT-2, GPT-NeoX, ...)",
    )


def student_config(teacher_config: Any, layers: list[int]) -> Any:
    """A copy of ``teacher_config`` with ``len(layers)`` layers; per-layer lists are cut to ``layers``."""
    num_layers = teacher_config.num_hidden_layers
    config = copy.deepcopy(teacher_config)
    # Per-layer settings (layer_types: sliding vs full attention, SmolLM3's no_rope_layers, ...) are lists
    # with one entry per layer; the student's layer i behaves as teacher layer layers[i] did.
    for name, value in vars(teacher_config).items():
        if "layer" in name and isinstance(value, list | tuple) and len(value) == num_layers:
            setattr(config, name, type(value)(value[i] for i in layers))
            logger.debug("config %s cut to the chosen layers", name)
    # attribute_map turns this into n_layer for GPT-2 and the like.
    config.num_hidden_layers = len(layers)
    validate = getattr(config, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as err:
            raise TodiError(
                f"{type(config).__name__} with {len(layers)} layers is not valid: {err}".splitlines()[0],
                "a config setting ties the layer count to other options; try other --layers or --random",
            ) from err
    return config


def make_student(
    teacher: nn.Module, layers: list[int], *, random_init: bool = False, seed: int = 0
) -> nn.Module:
    """A model of the teacher's class with ``len(layers)`` layers, in float32, eval mode.

    Unless ``random_init``, every weight is the teacher's: student layer ``i`` gets teacher layer
    ``layers[i]``, everything outside the layer list (embeddings, final norm, head) is copied as is; tied
    embeddings stay tied, since the config (``tie_word_embeddings``) is the teacher's.
    """
    num_layers = teacher.config.num_hidden_layers
    prefix, _ = find_layer_list(teacher, num_layers)
    config = student_config(teacher.config, layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = type(teacher)(config).float()
    student_layers = student.get_submodule(prefix)
    if not (isinstance(student_layers, nn.ModuleList) and len(student_layers) == len(layers)):
        raise TodiError(
            f"{type(teacher).__name__} built with {len(layers)} layers has no {len(layers)} modules in {prefix}",
            "init-student cannot map this architecture's layers onto a smaller one",
        )
    student.generation_config = copy.deepcopy(teacher.generation_config)
    if random_init:
        return student.eval()

    teacher_state = teacher.state_dict()
    layer_key = re.compile(rf"{re.escape(prefix)}\.(\d+)\.(.+)")
    mapped = {}
    for key in student.state_dict():
        match = layer_key.fullmatch(key)
        source = f"{prefix}.{layers[int(match[1])]}.{match[2]}" if match else key
        if source not in teacher_state:
            raise TodiError(
                f"the teacher has no weight {source} for the student's {key}",
                "init-student needs a teacher whose class builds the same modules for fewer layers",
            )
        mapped[key] = teacher_state[source]
    student.load_state_dict(mapped, strict=True)
    return student.eval()


# --------------------------------------------------------------------------------------------------
# The `todi init-student` command
# --------------------------------------------------------------------------------------------------


def _teacher_num_layers(path: str, source: str, trust_remote_code: bool) -> int:
    """The teacher's layer count from its config alone, so --layers is checked before any weights load."""
    from transformers import AutoConfig

    try:
        teacher_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise TodiError(
            f"cannot load the config of {source}: {err}".splitlines()[0],
            "give a folder written by save_pretrained, a Hub id reachable from this machine or a GGUF file",
        ) from err
    num_layers = getattr(teacher_config, "num_hidden_layers", None)
    if not isinstance(num_layers, int):
        raise TodiError(
            f"the config of {source} ({type(teacher_config).__name__}) gives no num_hidden_layers",
            "init-student supports decoder-only causal LMs with one stack of layers",
        )
    return num_layers


def _weightless_teacher(path: str, trust_remote_code: bool) -> nn.Module:
    """The teacher's class, config and generation config on the meta device: all a random student needs,
    without reading (or holding) the teacher's weights, which for a 70B teacher would be 140 GB."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    teacher_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(teacher_config, trust_remote_code=trust_remote_code)
    with contextlib.suppress(OSError):  # without generation_config.json, keep the config-derived one
        teacher.generation_config = GenerationConfig.from_pretrained(path)
    return teacher


def _write_student(student: nn.Module, tokenizer: Any, folder: Path, record: dict[str, Any]) -> None:
    """Save the student into ``folder``, the locked output folder (fresh, or empty but for todi's marker and
    lock); ``todi_init.json`` comes last, so a folder that has it holds a whole student.

    Not :func:`todi.models.export_model`: it renames a finished folder over ``folder``, which would drop the
    marker and the lock. A failure deletes the files written here (nothing else was in the folder), so a
    failed run leaves no half-written student behind, and an ``--overwrite`` run gets the old one back.
    """
    before = {entry.name for entry in folder.iterdir()}
    try:
        student.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        tmp = folder / f".tmp-{INIT_RECORD}"
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, folder / INIT_RECORD)
    except BaseException:
        for entry in folder.iterdir():
            if entry.name not in before:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        raise


def run(config: Config) -> None:
    """Write the student ``config`` describes; every option is checked before any weights load, and --out
    before the teacher is read (see :class:`todi.outputs.OutputFolder`)."""
    out, teacher = Path(config.out).expanduser(), Path(config.teacher).expanduser()
    if teacher.is_dir() and out.resolve() == teacher.resolve():
        raise UsageError(f"--out {out} is the teacher's own folder", "write the student to another folder")
    folder = OutputFolder(
        out,
        "init-student",
        inputs={"--from": config.teacher},
        overwrite=config.overwrite,
        # A student is cheap to remake: a failed run never keeps a partial one over the old.
        keep_on_failure=lambda _path: False,
    )
    with folder.claim():
        _make(config, folder)
    logger.info("wrote %s", out)


def _make(config: Config, folder: OutputFolder) -> None:
    teacher_path = resolve_model_path(config.teacher)
    num_layers = _teacher_num_layers(teacher_path, config.teacher, config.trust_remote_code)
    layers = parse_layers(config.layers, num_layers)

    dtype = DTYPES[config.dtype]
    tokenizer = load_tokenizer(teacher_path, trust_remote_code=config.trust_remote_code)
    if config.random:
        teacher = _weightless_teacher(teacher_path, config.trust_remote_code)
    else:
        teacher = load_causal_lm(teacher_path, dtype=dtype, trust_remote_code=config.trust_remote_code)
    student = make_student(teacher, layers, random_init=config.random, seed=config.seed).to(dtype)
    _, teacher_total = count_parameters(teacher)
    _, student_total = count_parameters(student)
    del teacher

    record = {
        "teacher": config.teacher,
        "teacher_path": teacher_path,
        "teacher_layers": num_layers,
        "layers": layers,
        "random": config.random,
        "seed": config.seed if config.random else None,
        "dtype": config.dtype,
        "teacher_parameters": teacher_total,
        "student_parameters": student_total,
        "todi_version": __version__,
    }
    # Everything has loaded: only now is an old student (--overwrite) set aside, deleted on success.
    folder.replace_old()
    _write_student(student, tokenizer, folder.path, record)
    logger.info(
        "%s student: %d of %d teacher layers (%s); %.1fM parameters vs the teacher's %.1fM (%.0f%%)",
        "random" if config.random else "layer-copied",
        len(layers),
        num_layers,
        ",".join(map(str, layers)),
        student_total / 1e6,
        teacher_total / 1e6,
        100 * student_total / teacher_total,
    )
