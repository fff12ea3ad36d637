"""Cross-tokenizer distillation: a teacher and a student that do not share a vocabulary.

:mod:`todi.xtok.alignment` aligns the two token sequences by character offsets, :mod:`todi.xtok.vocab`
maps the two vocabularies, :mod:`todi.xtok.pairing` attaches the teacher's side to the training data
(:class:`CrossTokenizerTeacher`, the adapter ``todi distill --cross-tokenizer`` uses) and
:mod:`todi.xtok.report` is ``todi xtok-report``. The loss is :mod:`todi.losses.cross_tokenizer`.
"""

from todi.xtok.alignment import align, check_offsets, target_boundaries
from todi.xtok.pairing import AlignmentStats, CrossTokenizerTeacher, pair_examples
from todi.xtok.vocab import VocabMap, build_vocab_map, load_or_build_vocab_map

__all__ = [
    "AlignmentStats",
    "CrossTokenizerTeacher",
    "VocabMap",
    "align",
    "build_vocab_map",
    "check_offsets",
    "load_or_build_vocab_map",
    "pair_examples",
    "target_boundaries",
]
