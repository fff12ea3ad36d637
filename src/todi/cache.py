"""``todi cache-teacher``: run the teacher once, store its next-token distributions, distil many students.

A big teacher is expensive to keep beside the student and is rerun identically for every objective
compared. The cache stores, for every supervised position of the training data, the teacher's top-k
token ids and log-probabilities at temperature 1, the log of the remaining (tail) mass, and for each
distillation temperature named at build time the tail's power sum and M token ids drawn from the tail
(see :mod:`todi.losses.sparse` for how the divergences use them and what the approximation loses).
Example::

    todi cache-teacher --teacher runs/teacher/final --data data/dolly --top-k 64 --out cache/dolly-k64
    todi distill --teacher-cache cache/dolly-k64 --student gpt2 --data data/dolly --loss todi --out runs/todi

Layout of ``--out``::

    manifest.json              the settings that fix the bytes: format version; the teacher's name,
                               weights identity (todi.models.model_identity), config hash and dtype; the
                               --teacher-lora adapter and its identity; the device type; tokenizer hash;
                               data file hash and example digests; template, max lengths, batch size,
                               shard size, k, temperatures, tail samples; the shard plan. Then
                               "checksums" (size and SHA-256 of each shard written) and "complete"
                               (false until the last shard is recorded; written first, completed last)
    .todi-output.json          marker: a folder todi wrote as a teacher cache (see todi.outputs)
    .todi.lock                 held by the build writing the folder: a second one is refused
    tokenizer/                 the teacher's tokenizer as loaded (save_pretrained): a student with another
                               tokenizer pairs its examples with the teacher's through it
                               (``todi distill --teacher-cache C --cross-tokenizer hybrid``)
    shard-00000.safetensors    examples [0, shard_size): digests [n] (one hash per encoded example),
                               offsets [n + 1] (rows of each example), ids [rows, k], logprobs [rows, k],
                               tail [rows], tail_T<t> [rows] per stored temperature t != 1, and with
                               --tail-samples M per stored temperature t: tail_draws_T<t> [rows] (uint8,
                               draws of each row) and tail_ids_T<t> [M x rows on average] (their ids)

A shard is written under a temporary name, renamed when complete, then recorded in the manifest with its
size and SHA-256. Rerunning the same command resumes an interrupted build: a shard whose file matches
its record is kept, any other (missing, never recorded, cut short, changed) is rebuilt with a warning.
A resume with other settings, other teacher (or adapter) weights or on another device type is refused,
since its shards would differ from those already written (an unfinished cache holding no shard yet is
simply started afresh); ``--overwrite`` rebuilds such a cache instead, but only a folder marked as a
teacher cache, setting the old one aside until the new build succeeds (:mod:`todi.outputs`). Opening a
cache (``todi distill --teacher-cache``) checks every shard's size and SHA-256 and names a damaged one
(a 600 MB cache opens in 0.4-0.7 s on one core, from the page cache or an SSD: about 1 s per GB, more on
a slow disk). Caches built before checksums open with no check beyond safetensors' own, and a rerun
rebuilds their shards (they cannot be verified).

A teacher holding a NaN or infinite weight, or whose logits for a batch are NaN or infinite (a float16
overflow), is an error naming the parameter or the examples; nothing of it is written. Token ids are
stored in 16 bits when the vocabulary allows (offset by 32768), log-probabilities in float16: 4 k + 4 +
4 t + (2 M + 1) t' bytes per position for t temperatures other than 1 and t' in all (297 bytes at the
defaults k = 64, T = 2, M = 16). The tail draws come from a generator seeded by the batch's examples and
are allotted among the rows of a batch, so the batch size, the shard size (shards batch their own
examples) and the device type are settings too: a rebuild with the same ones writes the same bytes (the
same software and, on GPUs, the same model of GPU assumed: neither is recorded).
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from todi.checkpoint import sha256_file
from todi.data import DataError
from todi.errors import NonFiniteError, TodiError, UsageError
from todi.losses.sparse import NO_SAMPLE, SparseTeacher
from todi.options import option
from todi.outputs import OutputFolder
from todi.report import write_text_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "Config",
    "TeacherCache",
    "build_cache",
    "example_digest",
    "run",
    "tokenizer_hash",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_ID_OFFSET = 32768  # ids < 65,536 fit int16 after this shift
_LOGPROB_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class Config:
    """Run a teacher over training data once and store its top-k next-token distributions."""

    teacher: str = option("", "teacher (required): a local folder, a .gguf file or a Hugging Face Hub id")
    data: str = option("", "training data (required), as for `todi distill --data`")
    data_config: str | None = option(None, "configuration of a Hub data set, as for `todi distill`")
    data_split: str = option("train", "split of --data, as for `todi distill`")
    columns: str | None = option(
        None, "read fields from other columns (FIELD=COLUMN,...), as for `todi distill`"
    )
    out: str = option("", "cache folder (required); rerunning the same command resumes an interrupted build")
    top_k: int = option(64, "tokens kept per position (the rest form one tail bucket)")
    temperatures: str = option(
        "2.0", "comma-separated distillation temperatures whose tail statistics are stored (exact at these)"
    )
    tail_samples: int = option(
        16,
        "tail tokens drawn per position and temperature on average, for `todi distill --cache-tail "
        "sampled` (2 bytes each, shared among positions by their tail mass; 0 = none)",
    )
    batch_size: int = option(8, "examples per teacher forward pass")
    shard_size: int = option(1024, "examples per shard file (the unit of resumption)")
    template: str = option("alpaca", "prompt template; must match the later `todi distill --template`")
    max_length: int = option(512, "tokens per example; must match the later `todi distill --max-length`")
    max_prompt_length: int = option(256, "prompt tokens kept; must match `todi distill --max-prompt-length`")
    max_examples: int | None = option(None, "cache only the first N training examples")
    teacher_lora: str | None = option(None, "PEFT adapter folder merged into the teacher when it loads")
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "teacher dtype; auto = bfloat16 on GPUs, float32 on CPU"
    )
    logprob_dtype: Literal["float16", "float32"] = option(
        "float16", "storage of the log-probabilities (float32 doubles their size; exact)"
    )
    overwrite: bool = option(
        False,
        "replace a teacher cache in --out built with other settings (only a folder todi marked as a cache; "
        "the old one is deleted once the new build succeeds)",
    )
    trust_remote_code: bool = option(False, "allow models whose code comes with their checkpoint")

    def temperature_list(self) -> list[float]:
        """The temperatures whose tail power sums are stored (1 needs none: it is the tail itself)."""
        return [t for t in self.sample_temperatures() if t != 1.0]

    def sample_temperatures(self) -> list[float]:
        """Every temperature named, each of which gets its own tail samples."""
        try:
            values = sorted({float(t) for t in self.temperatures.split(",") if t.strip()})
        except ValueError:
            raise UsageError(
                f"--temperatures must be comma-separated numbers, got {self.temperatures!r}"
            ) from None
        if any(not (math.isfinite(t) and t > 0) for t in values):
            raise UsageError(f"--temperatures must be > 0, got {self.temperatures!r}")
        return values

    def __post_init__(self) -> None:
        self.check()  # a config checks itself when built

    def check(self) -> None:
        problems = [f"--{name} is required" for name in ("teacher", "data", "out") if not getattr(self, name)]
        for name in ("top_k", "batch_size", "shard_size", "max_length"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 1 <= self.max_prompt_length < self.max_length:  # as `todi distill`, which reads the cache
            problems.append(f"--max-prompt-length must be in [1, max-length), got {self.max_prompt_length}")
        if self.tail_samples < 0:
            problems.append(f"--tail-samples must be at least 0, got {self.tail_samples}")
        if self.max_examples is not None and self.max_examples < 1:
            problems.append(f"--max-examples must be at least 1, got {self.max_examples}")
        if problems:
            raise UsageError("; ".join(problems), "run 'todi cache-teacher --help' for the options")
        self.temperature_list()


def run(config: Config) -> None:
    """``todi cache-teacher``."""
    build_cache(config)


# --------------------------------------------------------------------------------------------------
# Hashes that tie a cache to the data, tokenizer and teacher it was built from
# --------------------------------------------------------------------------------------------------


def tokenizer_hash(tokenizer: Any) -> str:
    """SHA-256 of the vocabulary (token -> id, added tokens included): what makes stored ids meaningful."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def example_digest(example: dict[str, list[int]]) -> int:
    """A signed 64-bit hash of one encoded example (ids and labels): the cache's per-example key."""
    raw = json.dumps([example["input_ids"], example["labels"]]).encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little", signed=True)


def _config_hash(model: Any) -> str:
    config = model.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        config.pop(key, None)
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _data_file(data: str) -> Path | None:
    path = Path(data)
    if path.is_file():
        return path
    if (path / "train.jsonl").is_file():
        return path / "train.jsonl"
    return None


def _file_hash(path: Path | None) -> str | None:
    return None if path is None else sha256_file(path)


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------

# Settings that manifests written before shard checksums lack: such a cache is compared without them.
_ADDED_WITH_CHECKSUMS = (
    "teacher_identity",
    "teacher_lora_identity",
    "device_type",
    "batch_size",
    "shard_size",
)


@dataclass
class _Build:
    """What one build works from: the encoded data, the loaded teacher and the settings the manifest holds."""

    config: Config
    encoded: list[dict[str, list[int]]]
    sources: list[str] | None  # where each encoded example comes from ("file:line"), when known
    digests: list[int]
    rows: list[int]  # supervised positions per example
    collate: Any
    teacher: Any
    head: Any
    vocab: int
    device: torch.device
    spec: dict[str, Any]
    tokenizer: Any  # as loaded, before a pad token is set for batching: what tokenizer/ holds


def build_cache(config: Config) -> Path:
    """Build (or finish building) the cache in ``config.out``; returns the folder."""
    config.check()
    folder = OutputFolder(
        config.out,
        "cache-teacher",
        inputs={"--teacher": config.teacher, "--data": config.data, "--teacher-lora": config.teacher_lora},
        overwrite=config.overwrite,
        keep_on_failure=_has_shards,
    )
    with folder.claim(reuse=True):
        build = _load(config)  # a failure here leaves --out as it was
        checksums = _start(folder, build.spec)
        _save_tokenizer(build.tokenizer, folder.path)
        _fill(build, folder.path, checksums)
    return Path(config.out)


TOKENIZER_FOLDER = "tokenizer"


def _save_tokenizer(tokenizer: Any, out: Path) -> None:
    """Write ``out/tokenizer`` whole or not at all (a rerun of a cache built before it existed adds it)."""
    final = out / TOKENIZER_FOLDER
    staging = out / f".{TOKENIZER_FOLDER}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)


def _load(config: Config) -> _Build:
    """Load the tokenizer, data and teacher; work out the settings (``spec``) the manifest records."""
    from todi.data import (
        DataCollator,
        encode_examples,
        ensure_pad_token,
        load_examples,
        shared_vocab_size,
        supervised_positions,
    )
    from todi.losses.causal_lm import output_head
    from todi.models import (
        check_finite_parameters,
        freeze,
        load_causal_lm,
        load_tokenizer,
        model_identity,
        resolve_dtype,
    )

    temperatures = config.temperature_list()
    sample_temperatures = config.sample_temperatures() if config.tail_samples else []
    tokenizer = load_tokenizer(config.teacher, trust_remote_code=config.trust_remote_code)
    as_loaded = copy.deepcopy(tokenizer)
    pad_id = ensure_pad_token(tokenizer)
    examples = load_examples(
        config.data,
        config.data_split,
        max_examples=config.max_examples,
        columns=config.columns,
        hub_config=config.data_config,
    )
    encoded, _ = encode_examples(
        examples,
        tokenizer,
        template=config.template,
        max_prompt_length=config.max_prompt_length,
        max_length=config.max_length,
    )
    digests = [example_digest(e) for e in encoded]
    rows = [supervised_positions(e) for e in encoded]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The weights' identity is read before they load: a resumed build must use the same ones.
    teacher_identity = model_identity(config.teacher)
    lora_identity = model_identity(config.teacher_lora) if config.teacher_lora else None
    teacher = load_causal_lm(
        config.teacher,
        dtype=resolve_dtype(config.teacher_dtype, device, auto=torch.bfloat16),
        trust_remote_code=config.trust_remote_code,
        adapter=config.teacher_lora,
    )
    teacher = freeze(teacher).to(device)
    check_finite_parameters(teacher, f"teacher {config.teacher}", "--teacher-dtype")
    head = output_head(teacher)
    vocab = shared_vocab_size(tokenizer, head.weight.shape[0])
    if config.top_k > vocab:
        raise UsageError(f"--top-k {config.top_k} exceeds the vocabulary ({vocab} tokens)")
    if config.top_k == vocab:
        sample_temperatures = []  # no tail to draw from

    shards = [
        {"file": f"shard-{i:05d}.safetensors", "first": a, "end": min(a + config.shard_size, len(encoded))}
        for i, a in enumerate(range(0, len(encoded), config.shard_size))
    ]
    for shard in shards:
        shard["rows"] = sum(rows[shard["first"] : shard["end"]])
    spec = {
        "format_version": FORMAT_VERSION,
        "teacher": config.teacher,
        "teacher_identity": teacher_identity,
        "teacher_lora": config.teacher_lora,
        "teacher_lora_identity": lora_identity,
        "teacher_config_hash": _config_hash(teacher),
        "teacher_dtype": str(next(teacher.parameters()).dtype).removeprefix("torch."),
        "device_type": device.type,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "data": config.data,
        "data_file_sha256": _file_hash(_data_file(config.data)),
        "examples": len(encoded),
        "examples_sha256": hashlib.sha256(json.dumps(digests).encode()).hexdigest(),
        "supervised_positions": sum(rows),
        "template": config.template,
        "max_length": config.max_length,
        "max_prompt_length": config.max_prompt_length,
        "batch_size": config.batch_size,
        "shard_size": config.shard_size,
        "top_k": config.top_k,
        "vocab_size": vocab,
        "temperatures": temperatures,
        "tail_samples": config.tail_samples if sample_temperatures else 0,
        "sample_temperatures": sample_temperatures,
        "id_encoding": f"int16+{_ID_OFFSET}" if vocab <= 2 * _ID_OFFSET else "int32",
        "logprob_dtype": config.logprob_dtype,
        "shards": shards,
    }
    # Encoding drops no example when max_prompt_length < max_length: then encoded[i] is examples[i].
    sources = [e.source for e in examples] if len(examples) == len(encoded) else None
    return _Build(
        config,
        encoded,
        sources,
        digests,
        rows,
        DataCollator(pad_id),
        teacher,
        head,
        vocab,
        device,
        spec,
        as_loaded,
    )


def _start(folder: OutputFolder, spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Start a new cache, or continue one built with exactly these settings (another is refused, or with
    --overwrite set aside); write the unfinished manifest. Returns the checksums of the intact shards."""
    out = folder.path
    old = _old_manifest(out)
    kept: dict[str, dict[str, Any]] = {}
    if old is None:
        folder.replace_old()
    elif not (changed := _changes(old, spec)):
        folder.write_marker()  # even with --overwrite: a cache of these very settings is continued
        kept = _intact_shards(out, spec["shards"], old.get("checksums") or {})
    elif folder.overwrite or not (old.get("complete") or _has_shards(out)):
        if not folder.overwrite:  # an unfinished build that wrote nothing (a NaN teacher, say): nothing lost
            logger.info("replacing the unfinished cache in %s, which holds no shard yet", out)
        folder.replace_old()
    else:
        raise UsageError(
            f"{out} holds a teacher cache built with other settings ({', '.join(changed)})",
            "use another --out, the original settings, or --overwrite to rebuild it",
        )
    for stale in out.glob(".tmp-*"):
        stale.unlink()
    for stale in out.glob(f".{TOKENIZER_FOLDER}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    _write_manifest(out, {**spec, "complete": False, "checksums": kept})
    return kept


def _old_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of the cache in ``out``, None when there is none (an unreadable one: ``{"?": why}``)."""
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return {"?": f"its {MANIFEST} cannot be read: {err}"}
    return old if isinstance(old, dict) else {"?": f"its {MANIFEST} is not a JSON object"}


def _changes(old: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """The settings of ``spec`` that differ from those of the manifest ``old``, as ``key: old -> new``."""
    if "?" in old:
        return [old["?"]]
    legacy = "checksums" not in old  # built before checksums: it records none of the settings added then
    changed = [
        f"{key}: {old.get(key)!r} -> {spec[key]!r}"
        for key in spec
        if key != "shards"
        and old.get(key) != spec[key]
        and not (legacy and key in _ADDED_WITH_CHECKSUMS and key not in old)
    ]
    if not changed and old.get("shards") != spec["shards"]:
        changed.append("shard plan")
    return changed


def _intact_shards(
    out: Path, shards: list[dict[str, Any]], recorded: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The checksums of the shards already built whose size and SHA-256 match the manifest; every other
    shard is built (again)."""
    kept, unrecorded = {}, []
    for shard in shards:
        name = shard["file"]
        record = recorded.get(name)
        if record is None:
            if (out / name).exists():
                unrecorded.append(name)
            continue
        problem = _shard_problem(out / name, record)
        if problem:
            logger.warning("teacher cache %s: %s %s; rebuilding it", out, name, problem)
        else:
            kept[name] = record
    if unrecorded:
        more = f" and {len(unrecorded) - 5} more" if len(unrecorded) > 5 else ""
        logger.warning(
            "teacher cache %s: %s %s not recorded in %s (written by an interrupted build, or by a todi "
            "older than shard checksums); rebuilding %s",
            out,
            ", ".join(unrecorded[:5]) + more,
            "is" if len(unrecorded) == 1 else "are",
            MANIFEST,
            "it" if len(unrecorded) == 1 else "them",
        )
    return kept


def _shard_problem(path: Path, record: dict[str, Any]) -> str | None:
    """What is wrong with a shard file against its record in the manifest (size, then SHA-256), or None."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing"
    if size != record.get("size", size):
        return f"holds {size} bytes where {MANIFEST} records {record['size']} (cut short or overwritten)"
    if "sha256" in record and sha256_file(path) != record["sha256"]:
        return f"does not match the SHA-256 {MANIFEST} records (its bytes changed)"
    return None


def _has_shards(path: Path) -> bool:
    """Whether a failed build left shards worth keeping (rather than putting back the cache it replaced)."""
    return any(path.glob("shard-*.safetensors"))


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    manifest["checksums"] = dict(sorted(manifest["checksums"].items()))
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def _fill(build: _Build, out: Path, checksums: dict[str, dict[str, Any]]) -> None:
    """Build the shards missing from ``checksums``, recording each in the manifest; then complete it."""
    from tqdm.auto import tqdm

    spec = build.spec
    shards = spec["shards"]
    if checksums:
        logger.info(
            "resuming the cache in %s: %d of %d shards already written", out, len(checksums), len(shards)
        )
    started = time.perf_counter()
    progress = tqdm(total=sum(build.rows), desc="teacher cache", unit="tok", dynamic_ncols=True)
    for shard in shards:
        if shard["file"] in checksums:
            progress.update(shard["rows"])
            continue
        index = range(shard["first"], shard["end"])
        parts = _shard_rows(build, index, progress)
        checksums[shard["file"]] = _write_shard(
            out / shard["file"], [parts[i] for i in index], build.digests[shard["first"] : shard["end"]], spec
        )
        _write_manifest(out, {**spec, "complete": False, "checksums": checksums})
    progress.close()
    size = sum(checksums[s["file"]]["size"] for s in shards)
    manifest = {**spec, "complete": True, "checksums": checksums, "bytes": size}
    manifest["bytes_per_position"] = size / max(1, spec["supervised_positions"])
    _write_manifest(out, manifest)
    logger.info(
        "teacher cache %s: %d examples, %d positions, %.1f MiB (%.0f bytes per position), %.0f s",
        out,
        spec["examples"],
        spec["supervised_positions"],
        size / 2**20,
        manifest["bytes_per_position"],
        time.perf_counter() - started,
    )


def _shard_rows(build: _Build, index: range, progress: Any) -> dict[int, SparseTeacher]:
    """The teacher rows of each example of one shard."""
    parts: dict[int, SparseTeacher] = {}
    # Longest first, batches of similar length: less padding; the caller puts rows back in example order.
    order = sorted(index, key=lambda i: -len(build.encoded[i]["input_ids"]))
    for start in range(0, len(order), build.config.batch_size):
        batch_ids = order[start : start + build.config.batch_size]
        teacher_rows = _teacher_batch(build, batch_ids)
        offset = 0
        for i in batch_ids:
            parts[i] = teacher_rows.slice(offset, offset + build.rows[i])
            offset += build.rows[i]
        progress.update(offset)
    return parts


def _teacher_batch(build: _Build, batch_ids: list[int]) -> SparseTeacher:
    """One teacher forward pass over the examples ``batch_ids``: their rows, on the CPU."""
    from todi.losses.causal_lm import final_hidden_states, shift_labels
    from todi.losses.fused import auto_chunk_size

    config, head, vocab = build.config, build.head, build.vocab
    sample_temperatures = build.spec["sample_temperatures"]
    batch = {k: v.to(build.device) for k, v in build.collate([build.encoded[i] for i in batch_ids]).items()}
    with torch.no_grad():
        hidden = final_hidden_states(build.teacher, batch, head)[:, :-1]
        kept = hidden[shift_labels(batch["labels"]) != -100]
        generator = torch.Generator(build.device).manual_seed(_batch_seed(build.digests, batch_ids))
        step = auto_chunk_size(kept.shape[0], vocab)
        pieces = []
        for c in range(0, kept.shape[0], step):
            logits = F.linear(kept[c : c + step], head.weight[:vocab], _bias(head, vocab))
            if not torch.isfinite(logits.amax()):  # NaN (amax propagates it) or +inf, in one reduction
                raise _non_finite_logits(build, batch_ids, kept)
            piece = SparseTeacher.from_logits(
                logits,
                config.top_k,
                tuple(sample_temperatures or build.spec["temperatures"]),
                tail_samples=config.tail_samples,
                generator=generator,
            )
            pieces.append(piece.to("cpu"))
    return SparseTeacher.cat(pieces)


def _non_finite_logits(build: _Build, batch_ids: list[int], kept: torch.Tensor) -> NonFiniteError:
    """The error naming the examples of a batch whose teacher logits hold a NaN or +inf (or only -inf)."""
    head, vocab = build.head, build.vocab
    flags = []
    for c in range(0, kept.shape[0], 256):
        logits = F.linear(kept[c : c + 256], head.weight[:vocab], _bias(head, vocab))
        flags.append(~torch.isfinite(logits.amax(-1)).cpu())  # as the check per chunk, row by row
    bad_rows = torch.cat(flags)
    owner = torch.repeat_interleave(torch.tensor(batch_ids), torch.tensor([build.rows[i] for i in batch_ids]))
    bad = sorted(set(owner[bad_rows].tolist()))
    return NonFiniteError(
        f"the teacher's logits are NaN or infinite for {len(bad)} example(s) of --data {build.config.data}: "
        f"{_where(bad, build.sources)}; nothing holding them was written",
        "likely a NaN weight in the teacher or a float16 overflow (teacher dtype "
        f"{build.spec['teacher_dtype']}): try --teacher-dtype float32 or bfloat16",
    )


def _where(indices: list[int], sources: list[str] | None, shown: int = 10) -> str:
    """``examples 1, 4 (lines 2, 5 of data/train.jsonl)``: indices, and where they are when known."""
    more = f" and {len(indices) - shown} more" if len(indices) > shown else ""
    text = f"example{'s' if len(indices) > 1 else ''} {', '.join(map(str, indices[:shown]))}{more}"
    places = [sources[i].rpartition(":") for i in indices[:shown]] if sources else []
    files = {file for file, _, _ in places}
    if len(files) == 1 and all(n.isdigit() for _, _, n in places):
        (file,) = files
        word = "line" if file.endswith(".jsonl") else "row"
        text += f" ({word}{'s' if len(places) > 1 else ''} {', '.join(n for _, _, n in places)} of {file})"
    return text


def _batch_seed(digests: list[int], batch_ids: list[int]) -> int:
    """A seed for the tail samples of one batch, from its examples: the same cache on every rebuild."""
    raw = json.dumps([digests[i] for i in batch_ids]).encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=7).digest(), "little")


def _bias(head: Any, vocab: int) -> torch.Tensor | None:
    bias = getattr(head, "bias", None)
    return None if bias is None else bias[:vocab]


def _tail_key(temperature: float) -> str:
    return f"tail_T{temperature:g}"


def _samples_key(temperature: float) -> str:
    return f"tail_ids_T{temperature:g}"


def _draws_key(temperature: float) -> str:
    return f"tail_draws_T{temperature:g}"


def _write_shard(
    path: Path, parts: list[SparseTeacher], digests: list[int], spec: dict[str, Any]
) -> dict[str, Any]:
    """Write one shard (under a temporary name, renamed when complete); returns its size and SHA-256."""
    from safetensors.torch import save

    merged = SparseTeacher.cat(parts)
    int16 = spec["id_encoding"].startswith("int16")

    def encode(ids: torch.Tensor) -> torch.Tensor:
        return (ids - _ID_OFFSET).to(torch.int16) if int16 else ids.to(torch.int32)

    tensors = {
        "digests": torch.tensor(digests, dtype=torch.int64),
        "offsets": torch.tensor(
            [0, *torch.tensor([len(p) for p in parts]).cumsum(0).tolist()], dtype=torch.int64
        ),
        "ids": encode(merged.ids),
        "logprobs": merged.logprobs.to(_LOGPROB_DTYPES[spec["logprob_dtype"]]),
        "tail": merged.tail.float(),
    }
    for t in spec["temperatures"]:
        tensors[_tail_key(t)] = merged.tempered_tails[float(t)].float()
    for t in spec["sample_temperatures"]:
        # ragged rows, stored flat: the draws of row i follow those of rows < i; one byte says how many
        samples = merged.tail_samples[float(t)]
        valid = samples != NO_SAMPLE
        tensors[_samples_key(t)] = encode(samples[valid])
        tensors[_draws_key(t)] = valid.sum(-1).to(torch.uint8)
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format_version": "1"})
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


class TeacherCache:
    """A built teacher cache, read lazily (memory-mapped shards): ``rows(example_indices)`` gives the
    :class:`SparseTeacher` rows of those examples, in order, for one batch."""

    def __init__(self, path: str | os.PathLike, *, tail_mode: str = "bucket") -> None:
        self.path = Path(path)
        self.tail_mode = tail_mode
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise TodiError(
                f"{self.path} is not a teacher cache (no {MANIFEST})",
                "build one with `todi cache-teacher --teacher T --data D --out CACHE`",
            )
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text(encoding="utf-8"))
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise TodiError(
                f"teacher cache {self.path} has format version {version}; this todi reads version {FORMAT_VERSION}",
                "rebuild the cache with this version of `todi cache-teacher`",
            )
        if not self.manifest.get("complete"):
            raise TodiError(
                f"teacher cache {self.path} is incomplete (its build was interrupted)",
                "rerun the same `todi cache-teacher` command to finish it",
            )
        self.vocab_size: int = self.manifest["vocab_size"]
        self.temperatures: list[float] = [float(t) for t in self.manifest["temperatures"]]
        # Caches built before tail samples existed have none (the keys are absent).
        self.sample_temperatures: list[float] = [
            float(t) for t in self.manifest.get("sample_temperatures", [])
        ]
        if (
            tail_mode == "sampled"
            and not self.sample_temperatures
            and self.manifest["top_k"] < self.vocab_size
        ):
            raise UsageError(
                f"teacher cache {self.path} holds no tail samples, which --cache-tail sampled (the default) "
                "needs",
                "rebuild it with `todi cache-teacher --tail-samples 16` (the default), or distil with "
                "--cache-tail uniform (or bucket, without --cross-tokenizer)",
            )
        self._int16 = self.manifest["id_encoding"].startswith("int16")
        self._starts = [s["first"] for s in self.manifest["shards"]]
        checksums = self.manifest.get("checksums") or {}  # none in caches built before checksums
        self._files: list[Any] = []
        self._offsets: list[torch.Tensor] = []
        # per shard and temperature, where each example's draws start in the flat id list (per example, not
        # per row: memory stays O(examples) for caches of millions of positions)
        self._draw_starts: list[dict[float, torch.Tensor]] = []
        for shard in self.manifest["shards"]:
            self._open_shard(shard["file"], checksums.get(shard["file"]))

    def _open_shard(self, name: str, record: dict[str, Any] | None) -> None:
        """Open one shard, verified against its size and SHA-256 in the manifest when recorded."""
        from safetensors import SafetensorError, safe_open

        path = self.path / name
        hint = (
            "rerun the `todi cache-teacher` command that built this cache, with the same options: it checks "
            "every shard and rebuilds the damaged ones"
        )
        problem = _shard_problem(path, record) if record else None
        if problem:
            raise TodiError(f"teacher cache {self.path}: {name} {problem}", hint)
        try:
            f = safe_open(str(path), framework="pt")
            offsets = f.get_tensor("offsets")
            starts = {
                t: F.pad(f.get_tensor(_draws_key(t)).long().cumsum(0), (1, 0))[offsets]
                for t in self.sample_temperatures
            }
        except (SafetensorError, OSError) as err:
            raise TodiError(f"teacher cache {self.path}: cannot read {name}: {err}", hint) from err
        self._files.append(f)
        self._offsets.append(offsets)
        self._draw_starts.append(starts)

    def __len__(self) -> int:
        return self.manifest["examples"]

    def digests(self) -> list[int]:
        return [d for f in self._files for d in f.get_tensor("digests").tolist()]

    def row_counts(self) -> list[int]:
        """Rows (supervised positions) of each example, in order."""
        return [n for offsets in self._offsets for n in offsets.diff().tolist()]

    def teacher_tokenizer(self, trust_remote_code: bool = False) -> Any:
        """The teacher's tokenizer stored with the cache (``tokenizer/``), checked against its hash."""
        from todi.models import load_tokenizer

        folder = self.path / TOKENIZER_FOLDER
        if not (folder / "tokenizer_config.json").is_file():
            raise TodiError(
                f"teacher cache {self.path} holds no teacher tokenizer ({TOKENIZER_FOLDER}/), which a student "
                "with another tokenizer (--cross-tokenizer) needs to pair its examples with the cache's",
                "rerun the `todi cache-teacher` command that built it (a complete cache only gains the "
                "tokenizer, nothing is recomputed), or save the teacher's tokenizer there yourself "
                f"(AutoTokenizer.from_pretrained(TEACHER).save_pretrained('{folder}'): its vocabulary is checked)",
            )
        tokenizer = load_tokenizer(str(folder), trust_remote_code=trust_remote_code)
        if tokenizer_hash(tokenizer) != self.manifest["tokenizer_hash"]:
            raise TodiError(
                f"teacher cache {self.path}: {TOKENIZER_FOLDER}/ is not the tokenizer the cache was built with",
                "rerun the `todi cache-teacher` command that built it (with --overwrite if its settings changed)",
            )
        return tokenizer

    def locate(self, digests: list[int], data: str, sources: Sequence[str] | None = None) -> list[int]:
        """The cache example holding each of these teacher encodings (by digest): example i where the
        cache's i-th matches, else the first that does. A cross-tokenizer student may drop an example the
        teacher kept (its own tokens fill --max-length), which shifts the order. ``sources`` ("file:line"
        of each) name a missing one."""
        stored = self.digests()
        first: dict[int, int] = {}
        for i, d in enumerate(stored):
            first.setdefault(d, i)
        found = []
        for i, d in enumerate(digests):
            if i < len(stored) and stored[i] == d:
                found.append(i)
            elif d in first:
                found.append(first[d])
            else:
                m = self.manifest
                where = sources[i] if sources and sources[i] else f"example {i} of --data {data}"
                raise DataError(
                    f"{where}, encoded with the teacher's tokenizer, is not in teacher "
                    f"cache {self.path} (built from {m['data']}, sha256 {str(m['data_file_sha256'])[:12]}, "
                    f"{len(self)} examples)",
                    "distil from the data the cache was built from (same --template and max lengths), or "
                    "rebuild the cache with this --data",
                )
        return found

    def check(
        self,
        *,
        tokenizer: Any,
        encoded: list[dict[str, list[int]]] | None,
        template: str,
        max_length: int,
        max_prompt_length: int,
        data: str,
    ) -> None:
        """Refuse a run whose data, tokenizer, template or lengths differ from the cache's (``encoded``
        None: the examples are checked by :meth:`locate` instead)."""
        m = self.manifest
        if tokenizer_hash(tokenizer) != m["tokenizer_hash"]:
            raise DataError(
                f"the student's tokenizer differs from the one teacher cache {self.path} was built with "
                f"(teacher {m['teacher']})",
                "token-level distillation needs the teacher's tokenizer: use a student of the same family",
            )
        settings = {"template": template, "max_length": max_length, "max_prompt_length": max_prompt_length}
        wrong = [k for k, v in settings.items() if m[k] != v]
        if wrong:
            raise UsageError(
                "teacher cache "
                f"{self.path} was built with "
                + ", ".join(f"--{k.replace('_', '-')} {m[k]} (this run: {settings[k]})" for k in wrong),
                "rerun with "
                + " ".join(f"--{k.replace('_', '-')} {m[k]}" for k in wrong)
                + " or rebuild the cache with this run's settings",
            )
        if encoded is None:
            return
        if len(encoded) > len(self):
            raise DataError(
                f"--data has {len(encoded)} examples but teacher cache {self.path} holds {len(self)}",
                f"use --max-examples {len(self)} or rebuild the cache from this data",
            )
        stored = self.digests()
        for i, example in enumerate(encoded):
            if example_digest(example) != stored[i]:
                raise DataError(
                    f"example {i} of --data {data} differs from the one teacher cache {self.path} holds "
                    f"(the cache was built from {m['data']}, sha256 {str(m['data_file_sha256'])[:12]})",
                    "distil from the data the cache was built from, or rebuild the cache with this --data",
                )

    def _decode(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(torch.int64)
        return ids + _ID_OFFSET if self._int16 else ids

    def _draws(self, shard: int, temperature: float, example: int, a: int, b: int) -> torch.Tensor:
        """``[b - a, m_max]`` tail draws of the rows [a, b) of one example of a shard, padded with NO_SAMPLE."""
        f = self._files[shard]
        counts = f.get_slice(_draws_key(temperature))[a:b].long()
        start = int(self._draw_starts[shard][temperature][example])
        flat = self._decode(f.get_slice(_samples_key(temperature))[start : start + int(counts.sum())])
        slots = torch.arange(int(counts.max()) if len(counts) else 0)
        valid = slots < counts.unsqueeze(1)
        draws = torch.full(valid.shape, NO_SAMPLE, dtype=torch.int64)
        draws[valid] = flat  # row by row, each row's draws first: the order they were stored in
        return draws

    def rows(self, example_indices: list[int]) -> SparseTeacher:
        """The teacher rows of these examples (their supervised positions, in order), on the CPU."""
        parts = []
        for i in example_indices:
            if not 0 <= i < len(self):
                raise IndexError(f"example {i} is not in teacher cache {self.path} ({len(self)} examples)")
            s = bisect.bisect_right(self._starts, i) - 1
            local = i - self._starts[s]
            a, b = int(self._offsets[s][local]), int(self._offsets[s][local + 1])
            f = self._files[s]
            parts.append(
                SparseTeacher(
                    self._decode(f.get_slice("ids")[a:b]),
                    f.get_slice("logprobs")[a:b].float(),
                    f.get_slice("tail")[a:b],
                    self.vocab_size,
                    {t: f.get_slice(_tail_key(t))[a:b] for t in self.temperatures},
                    self.tail_mode,
                    {t: self._draws(s, t, local, a, b) for t in self.sample_temperatures},
                )
            )
        return SparseTeacher.cat(parts)
