"""Which student positions and teacher positions predict from the same text.

Both tokenizers encode the same response text; each side's fast tokenizer reports every token's
character span. A supervised position predicts the next target (a response token, then EOS) from a
prefix: the prompt plus the response up to the target's start. The prefix ends on a *boundary* at
character ``b`` when the tokens before the target cover exactly ``response[:b]``. A student position and
a teacher position are aligned when their prefixes end on the same boundary: both then predict the
continuation of the same text, so a token spelled the same on both sides is the same event.

A boundary is certain only where the target starts exactly where the previous token ends. It is not one
where tokens overlap (byte-level BPE splits a multi-byte character over tokens that each report the whole
character) or leave a gap (offsets trimmed of whitespace: the gap may belong to either token); the first
target's boundary is always 0 (the prefix is the prompt) and EOS's is the end of the text. Where several
targets share a boundary (a zero-width token), the first one keeps it.
"""

from __future__ import annotations

from collections.abc import Sequence

from todi.data import DataError

__all__ = ["align", "check_offsets", "target_boundaries"]


def check_offsets(tokenizer: object, role: str) -> None:
    """Refuse a tokenizer that cannot report character offsets (a slow, pure-Python one)."""
    if not getattr(tokenizer, "is_fast", False):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"the {role}'s tokenizer ({name}, {type(tokenizer).__name__}) is a slow tokenizer without character "
            "offsets, which --cross-tokenizer needs to align the two sequences",
            "save its fast version next to the model (a tokenizer.json, e.g. AutoTokenizer.from_pretrained("
            "..., use_fast=True).save_pretrained(folder)), or install the tokenizers package",
        )


def target_boundaries(
    offsets: Sequence[tuple[int, int]], text_length: int, *, with_eos: bool
) -> list[int | None]:
    """Per target (the response tokens given by ``offsets``, then EOS when ``with_eos``), the character
    where its prefix ends, or None where that is not a boundary (see the module docstring)."""
    boundaries: list[int | None] = []
    seen: set[int] = set()
    covered = 0  # the furthest character reached by the tokens so far

    def keep(boundary: int | None) -> None:
        if boundary is not None and boundary in seen:
            boundary = None
        if boundary is not None:
            seen.add(boundary)
        boundaries.append(boundary)

    for j, (start, end) in enumerate(offsets):
        keep(0 if j == 0 else (covered if start == covered else None))
        covered = max(covered, end)
    if with_eos:
        keep(text_length)
    return boundaries


def align(student: Sequence[int | None], teacher: Sequence[int | None]) -> list[tuple[int, int]]:
    """(student target, teacher target) pairs whose prefixes end on the same boundary, in order."""
    where = {b: k for k, b in enumerate(teacher) if b is not None}
    return [(j, where[b]) for j, b in enumerate(student) if b is not None and b in where]
