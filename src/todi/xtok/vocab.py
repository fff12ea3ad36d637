"""The exact-match map between two vocabularies, after normalising each tokenizer's spelling of bytes.

Two tokenizers spell the same text differently: GPT-2-style byte-level BPE writes a space as ``Ġ`` and
every byte as one printable character (``Ã©`` is the two bytes of ``é``); SentencePiece writes a space
as ``▁`` and bytes it has no piece for as ``<0xC3>``. A token is normalised to the bytes it decodes to;
two tokens match when their bytes are equal. Added and special tokens (``<|endoftext|>``, ``<|im_end|>``)
match only a token with the same text, and the two EOS tokens always match each other: both end a
response. The map is one-to-one: where one vocabulary spells the same bytes twice (a piece and its
``<0xNN>`` byte token), the regular piece takes part and the other stays unmatched.

Building a map reads every token once (about a second for two 50k vocabularies); it is cached under
``$TODI_CACHE/xtok/`` keyed on both tokenizers' vocabulary hashes, so a change to either builds a new one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from todi.data import DataError
from todi.report import write_text_atomic

logger = logging.getLogger(__name__)

__all__ = ["VocabMap", "build_vocab_map", "load_or_build_vocab_map", "normalised_vocab", "spelling"]

_VERSION = 1
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.lru_cache(maxsize=1)
def _byte_level_decoding() -> dict[str, int]:
    """GPT-2's printable character -> byte table, inverted (the bytes_to_unicode of its encoder)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _component_types(node: Any) -> list[dict]:
    """Every component of a tokenizers JSON node (decoders nest in ``Sequence``)."""
    if not isinstance(node, dict):
        return []
    found = [node]
    for key in ("decoders", "pretokenizers"):
        for child in node.get(key) or []:
            found.extend(_component_types(child))
    return found


def spelling(tokenizer: Any) -> dict[str, bool]:
    """How ``tokenizer`` spells bytes and spaces, read from its fast backend's decoder: ``byte_level``
    (GPT-2's table), ``metaspace`` (``▁`` for a space), ``byte_fallback`` (``<0xNN>`` tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return {"byte_level": False, "metaspace": False, "byte_fallback": False}
    spec = json.loads(backend.to_str())
    parts = _component_types(spec.get("decoder")) + _component_types(spec.get("pre_tokenizer"))
    types = {part.get("type") for part in parts}
    replaces_marker = any(
        part.get("type") == "Replace" and (part.get("pattern") or {}).get("String") == "▁" for part in parts
    )
    return {
        "byte_level": "ByteLevel" in types,
        "metaspace": "Metaspace" in types or replaces_marker,
        "byte_fallback": "ByteFallback" in types or bool((spec.get("model") or {}).get("byte_fallback")),
    }


def _normalise(token: str, style: dict[str, bool]) -> tuple[bytes, bool]:
    """(the bytes ``token`` stands for, whether it is a ``<0xNN>`` byte token)."""
    if style["byte_level"]:
        table = _byte_level_decoding()
        if all(c in table for c in token):
            return bytes(table[c] for c in token), False
    if style["byte_fallback"]:
        found = _BYTE_TOKEN.fullmatch(token)
        if found:
            return bytes([int(found.group(1), 16)]), True
    if style["metaspace"]:
        token = token.replace("▁", " ")
    return token.encode("utf-8"), False


def _special_tokens(tokenizer: Any) -> dict[str, int]:
    """Added / special tokens (text -> id): matched by their text, never by normalised bytes."""
    specials = dict(tokenizer.get_added_vocab()) if hasattr(tokenizer, "get_added_vocab") else {}
    for text, index in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids):
        specials[text] = index
    return specials


def normalised_vocab(tokenizer: Any) -> tuple[dict[bytes, int], dict[str, int]]:
    """(bytes -> id for regular tokens, text -> id for added/special ones), ids below ``len(tokenizer)``.
    Where two regular tokens decode to the same bytes, the regular piece wins over a ``<0xNN>`` token
    and then the lower id."""
    style = spelling(tokenizer)
    size = len(tokenizer)
    specials = {text: i for text, i in _special_tokens(tokenizer).items() if i < size}
    special_ids = set(specials.values())
    chosen: dict[bytes, tuple[bool, int]] = {}
    for token, index in tokenizer.get_vocab().items():
        if index >= size or index in special_ids:
            continue
        raw, is_byte_token = _normalise(token, style)
        key = (is_byte_token, index)
        if raw not in chosen or key < chosen[raw]:
            chosen[raw] = key
    return {raw: index for raw, (_, index) in chosen.items()}, specials


@dataclass(frozen=True)
class VocabMap:
    """Matched pairs ``student_ids[i] <-> teacher_ids[i]`` (each id at most once), with both vocabulary
    sizes; ``eos_pair`` is the pair of EOS ids when both tokenizers have one."""

    student_ids: tuple[int, ...]
    teacher_ids: tuple[int, ...]
    student_size: int
    teacher_size: int
    eos_pair: tuple[int, int] | None = None
    regular: int = 0  # pairs matched by their bytes (not EOS, not added / special tokens)

    def __len__(self) -> int:
        return len(self.student_ids)

    def summary(self) -> dict[str, float]:
        return {
            "matched": len(self),
            "student_vocab": self.student_size,
            "teacher_vocab": self.teacher_size,
            "share_of_student_vocab": len(self) / max(self.student_size, 1),
            "share_of_teacher_vocab": len(self) / max(self.teacher_size, 1),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "student_ids": list(self.student_ids),
            "teacher_ids": list(self.teacher_ids),
            "student_size": self.student_size,
            "teacher_size": self.teacher_size,
            "eos_pair": list(self.eos_pair) if self.eos_pair else None,
            "regular": self.regular,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VocabMap:
        eos = data.get("eos_pair")
        return cls(
            tuple(int(i) for i in data["student_ids"]),
            tuple(int(i) for i in data["teacher_ids"]),
            int(data["student_size"]),
            int(data["teacher_size"]),
            (int(eos[0]), int(eos[1])) if eos else None,
            int(data["regular"]),
        )


def build_vocab_map(student_tokenizer: Any, teacher_tokenizer: Any) -> VocabMap:
    """The exact-match map (see the module docstring); ordered by student id."""
    s_regular, s_special = normalised_vocab(student_tokenizer)
    t_regular, t_special = normalised_vocab(teacher_tokenizer)
    pairs: dict[int, int] = {}
    used_teacher: set[int] = set()
    s_eos, t_eos = student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id
    eos_pair = None
    if s_eos is not None and t_eos is not None:
        eos_pair = (s_eos, t_eos)
        pairs[s_eos] = t_eos
        used_teacher.add(t_eos)
    for text, s_id in s_special.items():
        t_id = t_special.get(text)
        if t_id is not None and s_id not in pairs and t_id not in used_teacher:
            pairs[s_id] = t_id
            used_teacher.add(t_id)
    regular = 0
    for raw, s_id in s_regular.items():
        t_id = t_regular.get(raw)
        if t_id is not None and s_id not in pairs and t_id not in used_teacher:
            pairs[s_id] = t_id
            used_teacher.add(t_id)
            regular += 1
    ordered = sorted(pairs.items())
    return VocabMap(
        tuple(s for s, _ in ordered),
        tuple(t for _, t in ordered),
        len(student_tokenizer),
        len(teacher_tokenizer),
        eos_pair,
        regular,
    )


def _cache_file(student_tokenizer: Any, teacher_tokenizer: Any) -> Path:
    from todi.cache import tokenizer_hash
    from todi.models import todi_cache_dir

    key = f"v{_VERSION}\0{tokenizer_hash(student_tokenizer)}\0{tokenizer_hash(teacher_tokenizer)}"
    # The EOS pair is part of the map, and a tokenizer's EOS can be set outside its vocabulary.
    key += f"\0{student_tokenizer.eos_token_id}\0{teacher_tokenizer.eos_token_id}"
    return todi_cache_dir() / "xtok" / f"vocab-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def load_or_build_vocab_map(student_tokenizer: Any, teacher_tokenizer: Any) -> VocabMap:
    """The map from the on-disk cache, else built and written there (atomically; an unreadable cache
    file is rebuilt, and an unwritable cache only costs the rebuild next time)."""
    path = _cache_file(student_tokenizer, teacher_tokenizer)
    if path.is_file():
        try:
            return VocabMap.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError, IndexError) as err:
            logger.warning("vocabulary map cache %s is unreadable (%s); rebuilding it", path, err)
    vocab_map = build_vocab_map(student_tokenizer, teacher_tokenizer)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(vocab_map.to_json()))
    except OSError as err:
        logger.warning("could not cache the vocabulary map at %s: %s", path, err)
    return vocab_map


def require_matches(vocab_map: VocabMap, student: str, teacher: str) -> None:
    """Refuse a pair whose vocabularies share no regular token (EOS and special tokens aside): the hybrid
    loss would have no matched part to compare."""
    if vocab_map.regular == 0:
        raise DataError(
            f"the tokenizers of student {student} and teacher {teacher} share no token after normalising "
            "spaces and bytes, so --cross-tokenizer hybrid has no matched vocabulary",
            "use --cross-tokenizer uld (sorted-probability distance, no vocabulary map needed)",
        )
