"""The teacher's encoding of each example and its alignment with the student's; the adapter training uses.

Each side encodes the prompt and the response exactly as :func:`todi.data.encode_examples` does with its
own tokenizer (its own BOS/EOS rule, chat template and truncation, same lengths in its own tokens); the
response is additionally encoded with character offsets and the two are aligned
(:mod:`todi.xtok.alignment`). The result is stored in the student's encoded example dicts
(``teacher_input_ids``, ``xtok_student_pos``, ``xtok_teacher_pos``), so batches, the data plan, resume
and the data-parallel split are those of same-tokenizer training. Generated responses (``--lmbda``,
``--seq-kd``) are paired the same way, from their text (:class:`GeneratedPairing`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from todi.cache import example_digest
from todi.data import (
    DataCollator,
    DataError,
    Example,
    _assemble,
    _bos_prefix,
    _eos_id,
    _tokenize,
    check_template,
    render_prompt,
    supervised_positions,
)
from todi.onpolicy import SamplerTokens, prompt_of
from todi.xtok.alignment import align, check_offsets, target_boundaries
from todi.xtok.vocab import VocabMap, load_or_build_vocab_map, require_matches

logger = logging.getLogger(__name__)

__all__ = [
    "AlignmentStats",
    "CrossTokenizerTeacher",
    "GeneratedPairing",
    "SideEncoding",
    "encode_side",
    "pair_examples",
]

Paired = tuple["SideEncoding", "SideEncoding", list[tuple[int, int]]]


@dataclass
class SideEncoding:
    """One example under one tokenizer: its features, prompt length, response tokens and their offsets,
    and per kept target (response tokens, then EOS when not cut) the boundary its prefix ends on."""

    features: dict[str, list[int]]
    prompt_length: int
    response_ids: list[int]
    offsets: list[tuple[int, int]]
    boundaries: list[int | None]


def encode_side(
    examples: Sequence[Example], tokenizer: Any, *, template: str, max_prompt_length: int, max_length: int
) -> list[SideEncoding | None]:
    """Every example as :func:`todi.data.encode_examples` encodes it (None where it is dropped), with the
    response's character offsets."""
    check_template(template, tokenizer)
    for ex in examples:
        if ex.turns:  # their loss spans several turns, each encoded through the chat template
            raise DataError(
                f"{ex.source or 'an example'} is a chat conversation ('messages'), which --cross-tokenizer "
                "cannot align yet (it pairs one prompt with one response)",
                "give that data as prompt/response records (instruction/output or prompt/completion), or "
                "distil it with a teacher of the student's tokenizer",
            )
    bos, eos = _bos_prefix(tokenizer, template), _eos_id(tokenizer)
    prompts = _tokenize(tokenizer, [render_prompt(ex, template, tokenizer) for ex in examples])
    texts = [ex.output for ex in examples]
    responses = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    out: list[SideEncoding | None] = []
    for prompt_ids, response_ids, offsets, text in zip(
        prompts, responses["input_ids"], responses["offset_mapping"], texts
    ):
        features, _, _ = _assemble(prompt_ids, response_ids, bos, eos, max_prompt_length, max_length)
        if features is None:
            out.append(None)
            continue
        prompt_length = next(i for i, label in enumerate(features["labels"]) if label != -100)
        kept = len(features["labels"]) - prompt_length
        tokens = min(kept, len(response_ids))
        boundaries = target_boundaries(offsets[:tokens], len(text), with_eos=kept > len(response_ids))
        out.append(SideEncoding(features, prompt_length, list(response_ids), list(offsets), boundaries))
    return out


@dataclass
class AlignmentStats:
    """Counts over a data set: supervised targets per side and the aligned pairs."""

    examples: int = 0
    student_targets: int = 0
    teacher_targets: int = 0
    aligned: int = 0
    per_example: list[float] = field(default_factory=list)  # aligned share of each example's student targets

    def add(self, student_targets: int, teacher_targets: int, aligned: int) -> None:
        self.examples += 1
        self.student_targets += student_targets
        self.teacher_targets += teacher_targets
        self.aligned += aligned
        self.per_example.append(aligned / max(student_targets, 1))

    def summary(self) -> str:
        return (
            f"cross-tokenizer alignment: {self.aligned} of {self.student_targets} student positions "
            f"({100 * self.aligned / max(self.student_targets, 1):.1f}%) aligned with one of the teacher's "
            f"{self.teacher_targets}, over {self.examples} examples"
        )


def pair_examples(
    examples: Sequence[Example],
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    *,
    template: str,
    max_prompt_length: int,
    max_length: int,
) -> tuple[list[Paired], AlignmentStats]:
    """(student encoding, teacher encoding, aligned target pairs) of every example the student keeps, in
    the order :func:`todi.data.encode_examples` keeps them; and the alignment counts."""
    _, paired, stats = _pair(
        examples,
        student_tokenizer,
        teacher_tokenizer,
        template=template,
        max_prompt_length=max_prompt_length,
        max_length=max_length,
    )
    return paired, stats


def _pair(
    examples: Sequence[Example],
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    *,
    template: str,
    max_prompt_length: int,
    max_length: int,
) -> tuple[list[Example], list[Paired], AlignmentStats]:
    """:func:`pair_examples`, with the examples it kept."""
    check_offsets(student_tokenizer, "student")
    check_offsets(teacher_tokenizer, "teacher")
    lengths = {"template": template, "max_prompt_length": max_prompt_length, "max_length": max_length}
    students = encode_side(examples, student_tokenizer, **lengths)
    teachers = encode_side(examples, teacher_tokenizer, **lengths)
    stats = AlignmentStats()
    paired, kept = [], []
    for example, student, teacher in zip(examples, students, teachers):
        if student is None:
            continue
        if teacher is None:  # unreachable while max_prompt_length < max_length, kept for safety
            raise DataError("an example's teacher prompt fills --max-length", "raise --max-length")
        pairs = [
            (j, k) for j, k in align(student.boundaries, teacher.boundaries) if student.prompt_length + j > 0
        ]
        stats.add(len(student.boundaries), len(teacher.boundaries), len(pairs))
        paired.append((student, teacher, pairs))
        kept.append(example)
    return kept, paired, stats


def _teacher_side(student: SideEncoding, teacher: SideEncoding, pairs: list[tuple[int, int]]) -> dict:
    """The keys :meth:`CrossTokenizerTeacher.attach` adds to the student's features of one example."""
    student_pos = [student.prompt_length + j - 1 for j, _ in pairs]
    teacher_pos = [teacher.prompt_length + k - 1 for _, k in pairs]
    # For a teacher cache: its rows of an example are the teacher's supervised positions in order, the
    # first being the one before the first response token (none when nothing precedes it).
    first = max(teacher.prompt_length - 1, 0)
    return {
        "teacher_input_ids": teacher.features["input_ids"],
        "xtok_student_pos": student_pos,
        "xtok_teacher_pos": teacher_pos,
        "xtok_teacher_rows": [p - first if p >= 0 else -1 for p in teacher_pos],
        "xtok_teacher_count": supervised_positions(teacher.features),
        "xtok_teacher_digest": example_digest(teacher.features),
    }


def _without_eos(side: SideEncoding) -> tuple[SideEncoding, int | None]:
    """``side`` without its EOS target (a sampled response cut by --gen-max-new-tokens did not end), and
    the index of the target removed (None when it had none: already cut by --max-length)."""
    kept = len(side.boundaries)
    if kept <= len(side.response_ids):
        return side, None
    features = {key: value[:-1] for key, value in side.features.items()}
    return dataclasses.replace(side, features=features, boundaries=side.boundaries[:-1]), kept - 1


class CrossTokenizerTeacher:
    """Teacher scoring with another tokenizer: attaches the teacher's inputs and the alignment to the
    student's encoded examples, collates them, and gives the objective (``--cross-tokenizer``)."""

    def __init__(
        self,
        mode: str,
        vocab_map: VocabMap | None,
        teacher_tokenizer: Any,
        uld_weight: float,
        unaligned: str = "ce",
    ) -> None:
        self.mode = mode
        self.vocab_map = vocab_map
        self.teacher_tokenizer = teacher_tokenizer
        self.uld_weight = uld_weight
        self.unaligned = unaligned
        pad = teacher_tokenizer.pad_token_id
        self.teacher_pad_id = pad if pad is not None else _eos_id(teacher_tokenizer)
        self.train: _TrainingPrompts | None = None

    @classmethod
    def build(
        cls,
        config: Any,
        student_tokenizer: Any,
        teacher_tokenizer: Any,
        train_set: list[dict],
        dev_set: list[dict],
    ) -> CrossTokenizerTeacher:
        """For ``todi distill --cross-tokenizer``: the vocabulary map (hybrid) and the teacher's side of
        every training and dev example, stored in ``train_set`` / ``dev_set`` (encoded by the caller)."""
        from todi.data import load_examples

        check_offsets(student_tokenizer, "student")
        check_offsets(teacher_tokenizer, "teacher")
        vocab_map = None
        if config.cross_tokenizer == "hybrid":
            vocab_map = load_or_build_vocab_map(student_tokenizer, teacher_tokenizer)
            require_matches(vocab_map, config.student, config.teacher or config.teacher_cache)
            logger.info(
                "cross-tokenizer vocabulary: %d matched tokens (%.1f%% of the student's %d, %.1f%% of the "
                "teacher's %d)",
                len(vocab_map),
                100 * len(vocab_map) / vocab_map.student_size,
                vocab_map.student_size,
                100 * len(vocab_map) / vocab_map.teacher_size,
                vocab_map.teacher_size,
            )
        adapter = cls(
            config.cross_tokenizer, vocab_map, teacher_tokenizer, config.uld_weight, config.unaligned
        )
        lengths = {
            "template": config.template,
            "max_prompt_length": config.max_prompt_length,
            "max_length": config.max_length,
        }
        sets = [("train", config.data, config.max_examples, train_set)]
        if config.dev:
            sets.append(("dev", config.dev, config.dev_max_examples, dev_set))
        for split, source, limit, encoded in sets:
            examples = load_examples(source, split, max_examples=limit)
            stats, kept, paired = adapter._attach(examples, student_tokenizer, encoded, **lengths)
            logger.info("%s (%s)", stats.summary(), split)
            if split == "train":  # what generated responses are paired from (GeneratedPairing)
                adapter.train = _TrainingPrompts(
                    kept, [t.prompt_length for _, t, _ in paired], student_tokenizer, lengths
                )
        return adapter

    def generated_pairing(
        self, train_set: list[dict], student: SamplerTokens, teacher: SamplerTokens
    ) -> GeneratedPairing:
        """The :class:`todi.onpolicy.Retokenizer` of ``train_set`` (built and attached by :meth:`build`)
        for samplers generating with ``student`` / ``teacher``."""
        if self.train is None or len(self.train.examples) != len(train_set):
            raise DataError(
                "on-policy generation with --cross-tokenizer needs the training set the adapter was built on",
                "report this as a bug in todi",
            )
        return GeneratedPairing(self, train_set, {"student": student, "teacher": teacher})

    def longest_teacher_generation(self, train_set: list[dict]) -> tuple[int, int]:
        """(longest prompt, longest response) of the training set in the teacher's tokens."""
        if self.train is None:
            raise DataError("the adapter holds no training set", "report this as a bug in todi")
        prompts = self.train.teacher_prompt_lengths
        responses = [len(f["teacher_input_ids"]) - n for f, n in zip(train_set, prompts)]
        return max(prompts), max(responses)

    def attach(
        self, examples: Sequence[Example], student_tokenizer: Any, encoded: list[dict], **lengths: Any
    ) -> AlignmentStats:
        """Store the teacher's input ids and the aligned positions (after the shift) in ``encoded``, the
        student's encoding of ``examples``."""
        return self._attach(examples, student_tokenizer, encoded, **lengths)[0]

    def _attach(
        self, examples: Sequence[Example], student_tokenizer: Any, encoded: list[dict], **lengths: Any
    ) -> tuple[AlignmentStats, list[Example], list[Paired]]:
        kept, paired, stats = _pair(examples, student_tokenizer, self.teacher_tokenizer, **lengths)
        if len(paired) != len(encoded):
            raise DataError(
                f"the student's encoding kept {len(encoded)} examples, the cross-tokenizer pairing {len(paired)}",
                "report this as a bug in todi",
            )
        for features, (student, teacher, pairs) in zip(encoded, paired):
            if features["input_ids"] != student.features["input_ids"]:
                raise DataError(
                    "the student's tokens differ between two encodings of the same example",
                    "report this as a bug in todi (its tokenizer may not be deterministic)",
                )
            features.update(_teacher_side(student, teacher, pairs))
        return stats, kept, paired

    def cache_rows(self, cache: Any, encoded: list[dict], data: str) -> list[int]:
        """Per training example of ``encoded`` (attached), the teacher cache's example holding its teacher
        encoding (:meth:`todi.cache.TeacherCache.locate`), checked to hold one row per teacher supervised
        position."""
        sources = [ex.source for ex in self.train.examples] if self.train is not None else None
        found = cache.locate([f["xtok_teacher_digest"] for f in encoded], data, sources)
        counts = cache.row_counts()
        for i, (features, j) in enumerate(zip(encoded, found)):
            if counts[j] != features["xtok_teacher_count"]:
                where = sources[i] if sources and sources[i] else f"example {i} of {data}"
                raise DataError(
                    f"teacher cache {cache.path} holds {counts[j]} rows for {where}, whose "
                    f"teacher encoding has {features['xtok_teacher_count']} supervised positions",
                    "rebuild the cache with this todi (`todi cache-teacher ... --overwrite`)",
                )
        return found

    def collator(self, student_collate: DataCollator) -> Callable[[list[dict]], dict[str, Tensor]]:
        """The student's collator, plus the teacher's padded inputs and ``xtok_teacher_pos``."""
        teacher_collate = DataCollator(
            self.teacher_pad_id, pad_to_multiple_of=student_collate.pad_to_multiple_of
        )
        return _PairedCollator(student_collate, teacher_collate)

    def loss_fn(
        self,
        options: dict[str, Any],
        student_tokenizer: Any,
        student_head: int,
        teacher_head: int,
        *,
        chunk_size: int | None = None,
    ) -> Callable[..., Any]:
        """The objective, called as ``loss_fn(student, teacher, batch, num_items_in_batch=..., fused=...)``
        (see :class:`todi.training.LossModule`); each side uses the first ``len(tokenizer)`` logits of its
        head (heads may be padded beyond their tokenizers)."""
        from todi.data import shared_vocab_size
        from todi.losses.cross_tokenizer import MatchedVocab, causal_lm_cross_tokenizer_loss

        if self.mode == "uld" and options.get("divergence") not in (None, "todi"):
            logger.warning(
                "--cross-tokenizer uld uses ULD alone; --loss %s is not used", options["divergence"]
            )
        student_vocab = shared_vocab_size(student_tokenizer, student_head)
        teacher_vocab = shared_vocab_size(self.teacher_tokenizer, teacher_head)
        vocab_map = self.vocab_map
        on_device: dict[torch.device, MatchedVocab] = {}

        def loss_fn(student: Any, teacher: Any, batch: dict[str, Tensor], **call: Any) -> Any:
            device = batch["input_ids"].device
            vocab = None
            if vocab_map is not None:
                if device not in on_device:
                    on_device[device] = MatchedVocab.from_ids(
                        vocab_map.student_ids, vocab_map.teacher_ids, student_vocab, teacher_vocab, device
                    )
                vocab = on_device[device]
            return causal_lm_cross_tokenizer_loss(
                student,
                teacher,
                batch,
                student_vocab=student_vocab,
                teacher_vocab=teacher_vocab,
                chunk_size=chunk_size,
                mode=self.mode,
                vocab=vocab,
                **{"uld_weight": self.uld_weight, "unaligned": self.unaligned, **options, **call},
            )

        return loss_fn


@dataclass
class _TrainingPrompts:
    """The training examples as kept (the order of the encoded training set), their teacher prompt
    lengths, and how they were encoded: what a generated response is paired with."""

    examples: list[Example]
    teacher_prompt_lengths: list[int]
    student_tokenizer: Any
    lengths: dict[str, Any]


class GeneratedPairing:
    """The training examples of generated responses with ``--cross-tokenizer`` (a
    :class:`todi.onpolicy.Retokenizer`).

    A response is sampled in the sampler's own tokens (the student's for ``--lmbda``, the teacher's from
    its own prompt for ``--seq-kd``), decoded to text, and that text becomes the response of the training
    example: both sides are encoded and aligned from it as :func:`pair_examples` does for data. The
    student thus trains on the canonical encoding of the text, which differs from the sampled ids where
    sampling produced a non-canonical tokenization (counted in a debug log). A response cut by
    ``--gen-max-new-tokens`` did not end: neither side gets an EOS target.
    """

    def __init__(
        self, adapter: CrossTokenizerTeacher, train_set: list[dict], samplers: dict[str, SamplerTokens]
    ) -> None:
        assert adapter.train is not None
        self.train = adapter.train
        self.train_set = train_set
        self.samplers = samplers
        self.tokenizers = {"student": adapter.train.student_tokenizer, "teacher": adapter.teacher_tokenizer}
        self.non_canonical = 0  # responses whose sampled ids are not their text's encoding

    def sampler(self, kind: str) -> SamplerTokens:
        """The pad id, EOS ids and new-token budget the ``kind`` model samples with, in its own tokens."""
        return self.samplers[kind]

    def prompts(self, indices: Sequence[int], kind: str) -> list[list[int]]:
        """Each example's prompt ids in the sampler's tokens."""
        if kind == "student":
            return [prompt_of(self.train_set[i]) for i in indices]
        lengths = self.train.teacher_prompt_lengths
        return [list(self.train_set[i]["teacher_input_ids"][: lengths[i]]) for i in indices]

    def _ended(self, response: list[int], kind: str) -> bool:
        return bool(response) and response[-1] in self.samplers[kind].eos_ids

    def texts(self, responses: Sequence[list[int]], kind: str) -> list[str]:
        """Each response's text, without its EOS. Special tokens other than EOS stay spelled out: the
        data's encoding reads such text back as the same special token. No clean-up of spaces: it would
        change the text the sampler wrote (" ." to ".")."""
        bodies = [r[:-1] if self._ended(r, kind) else r for r in responses]
        return self.tokenizers[kind].batch_decode(
            bodies, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def pair(self, indices: Sequence[int], responses: Sequence[list[int]], kind: str) -> list[dict]:
        """The student's encoded example of each response, with the teacher's side attached."""
        texts = self.texts(responses, kind)
        examples = [
            dataclasses.replace(self.train.examples[i], references=(text,)) for i, text in zip(indices, texts)
        ]
        _, paired, _ = _pair(examples, *self.tokenizers.values(), **self.train.lengths)
        if len(paired) != len(examples):  # the prompts are the data's, which were kept
            raise DataError(
                "a generated response's example was dropped by the encoding", "report this as a bug in todi"
            )
        out = []
        for response, (student, teacher, pairs) in zip(responses, paired):
            sampler = student if kind == "student" else teacher
            body = response[:-1] if self._ended(response, kind) else response
            self.non_canonical += sampler.response_ids != body
            if not self._ended(response, kind):
                student, student_eos = _without_eos(student)
                teacher, teacher_eos = _without_eos(teacher)
                pairs = [(j, k) for j, k in pairs if j != student_eos and k != teacher_eos]
            # A student's own sample is no stand-in for the teacher: its unaligned positions get no CE
            # under --unaligned ce (that CE would reward whatever the student sampled).
            stand_in = int(kind != "student")
            out.append(
                {**student.features, **_teacher_side(student, teacher, pairs), "xtok_stand_in": stand_in}
            )
        if self.non_canonical:
            logger.debug(
                "cross-tokenizer on-policy: %d sampled responses so far re-encode to other tokens",
                self.non_canonical,
            )
        return out


class _PairedCollator:
    def __init__(self, student: DataCollator, teacher: DataCollator) -> None:
        self.student, self.teacher = student, teacher
        self.pad_token_id = student.pad_token_id  # it stands in for the student's collator

    def __call__(self, features: list[dict]) -> dict[str, Tensor]:
        batch = self.student(features)
        teacher = self.teacher([{"input_ids": f["teacher_input_ids"]} for f in features])
        positions = torch.full((len(features), batch["input_ids"].shape[1] - 1), -1, dtype=torch.long)
        for row, f in enumerate(features):
            positions[row, f["xtok_student_pos"]] = torch.tensor(f["xtok_teacher_pos"], dtype=torch.long)
        if "xtok_teacher_rows" in features[0]:  # rows of the batch's teacher-cache rows (example by example)
            cache_rows = torch.full_like(positions, -1)
            base = 0
            for row, f in enumerate(features):
                found = [
                    (s, base + r) for s, r in zip(f["xtok_student_pos"], f["xtok_teacher_rows"]) if r >= 0
                ]
                if found:
                    where, value = zip(*found)
                    cache_rows[row, list(where)] = torch.tensor(value, dtype=torch.long)
                base += f["xtok_teacher_count"]
            batch["xtok_cache_row"] = cache_rows
        # Per example: may the data's token stand in for the teacher at its unaligned positions (not for the
        # student's own samples)
        batch["xtok_stand_in"] = torch.tensor([bool(f.get("xtok_stand_in", 1)) for f in features])
        batch["teacher_input_ids"] = teacher["input_ids"]
        batch["teacher_attention_mask"] = teacher["attention_mask"]
        batch["teacher_position_ids"] = teacher["position_ids"]
        batch["xtok_teacher_pos"] = positions
        return batch
