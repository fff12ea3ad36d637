"""``todi xtok-report``: how well a teacher and a student with different tokenizers match, before training.

Figures, over the first ``--max-examples`` examples of ``--data`` encoded as ``todi distill`` encodes
them: the share of the student's supervised positions aligned with a teacher position (pooled, and the
10th percentile over examples); the vocabulary overlap; where ``--teacher`` has weights, the share of the
teacher's probability on matched tokens at aligned positions of the first ``--mass-examples`` examples
(mean and 10th percentile over positions, at T = 1 and at ``--temperature``): what the hybrid loss's matched part sees, the rest going to ULD; and a few examples of
the alignment. Prints a text report; ``--json FILE`` also writes the figures.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from todi.errors import UsageError
from todi.options import option

logger = logging.getLogger(__name__)

__all__ = ["Config", "run", "xtok_figures"]


@dataclass
class Config:
    """Alignment and vocabulary figures for a teacher and a student with different tokenizers."""

    teacher: str = option(
        "", "teacher (required): a model folder, a Hub id, a GGUF file, or a tokenizer folder"
    )
    student: str = option("", "student (required): a model or tokenizer folder, a Hub id or a GGUF file")
    data: str = option("", "data (required): a .jsonl file or a folder holding train.jsonl")
    split: str = option("train", "split of a data folder")
    template: str = option("alpaca", "prompt template, as for todi distill")
    max_length: int = option(512, "tokens per example, as for todi distill")
    max_prompt_length: int = option(256, "prompt tokens kept, as for todi distill")
    max_examples: int = option(1000, "examples read (alignment and vocabulary figures)")
    mass_examples: int = option(100, "of those, examples the teacher is run on (matched-mass figure)")
    temperature: float = option(2.0, "the distillation temperature for the matched-mass figure")
    batch_size: int = option(4, "examples per teacher forward pass")
    examples: int = option(2, "alignment examples shown")
    json: str | None = option(None, "also write the figures to this JSON file")
    trust_remote_code: bool = option(False, "allow models whose code comes with their checkpoint")

    def __post_init__(self) -> None:
        missing = [f"--{name}" for name in ("teacher", "student", "data") if not getattr(self, name)]
        if missing:
            raise UsageError(
                f"{', '.join(missing)} required", "run 'todi xtok-report --help' for the options"
            )
        for name in ("max_examples", "mass_examples", "batch_size", "max_length", "max_prompt_length"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_prompt_length >= self.max_length:
            raise UsageError(f"--max-prompt-length must be below --max-length ({self.max_length})")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise UsageError(f"--temperature must be a finite number > 0, got {self.temperature}")


def _has_weights(name_or_path: str) -> bool:
    from todi.models import resolve_model_path

    resolved = Path(resolve_model_path(name_or_path))
    return not resolved.exists() or (resolved / "config.json").is_file()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(torch.tensor(values, dtype=torch.float64).quantile(q))


def _matched_mass(
    config: Config, paired: list, teacher_ids: torch.Tensor
) -> dict[str, dict[str, float | None]]:
    """Per aligned teacher position, the teacher's probability on matched tokens (T = 1 and --temperature)."""
    from todi.data import DataCollator
    from todi.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(config.teacher, trust_remote_code=config.trust_remote_code).eval()
    tokenizer = load_tokenizer(config.teacher, trust_remote_code=config.trust_remote_code)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = DataCollator(pad)
    size = len(tokenizer)
    masses: dict[float, list[float]] = {1.0: [], config.temperature: []}
    for start in range(0, len(paired), config.batch_size):
        chunk = paired[start : start + config.batch_size]
        batch = collate([{"input_ids": teacher.features["input_ids"]} for _, teacher, _ in chunk])
        with torch.no_grad():
            logits = model(**batch, use_cache=False).logits[:, :, :size].float()
        for row, (_, teacher, pairs) in enumerate(chunk):
            positions = torch.tensor([teacher.prompt_length + k - 1 for _, k in pairs], dtype=torch.long)
            if not len(positions):
                continue
            rows = logits[row, positions]
            for temperature, found in masses.items():
                found.extend(rows.div(temperature).softmax(-1)[:, teacher_ids].sum(-1).tolist())
    return {
        f"T={temperature:g}": {"mean": sum(v) / len(v) if v else None, "p10": _percentile(v, 0.1)}
        for temperature, v in masses.items()
    }


def _show(student_tok: Any, teacher_tok: Any, student: Any, teacher: Any, pairs: list) -> str:
    """The response cut at aligned boundaries; the pieces that are not one same token on both sides are
    listed with the student's and the teacher's tokens."""
    s_cuts = [j for j, _ in pairs] + [len(student.boundaries)]
    t_cuts = [k for _, k in pairs] + [len(teacher.boundaries)]
    pieces = list(zip(itertools.pairwise(s_cuts), itertools.pairwise(t_cuts)))
    lines, same = [], 0
    for (s0, s1), (t0, t1) in pieces:
        s_part = [student_tok.decode([i]) for i in student.response_ids[s0:s1]]
        t_part = [teacher_tok.decode([i]) for i in teacher.response_ids[t0:t1]]
        s_part += ["<EOS>"] * (s1 > len(student.response_ids))
        t_part += ["<EOS>"] * (t1 > len(teacher.response_ids))
        if len(s_part) == len(t_part) == 1 and s_part == t_part:
            same += 1
        elif len(lines) < 12:
            lines.append(f"    {'|'.join(s_part)!r:40} <-> {'|'.join(t_part)!r}")
    head = f"    {same} of {len(pieces)} aligned pieces are one same token on both sides; the others"
    return "\n".join([head + (":" if lines else ": none"), *lines])


def xtok_figures(config: Config) -> tuple[dict[str, Any], str]:
    """(the figures, the alignment examples as text)."""
    from todi.data import load_examples
    from todi.models import load_tokenizer
    from todi.xtok.pairing import pair_examples
    from todi.xtok.vocab import load_or_build_vocab_map

    student_tok = load_tokenizer(config.student, trust_remote_code=config.trust_remote_code)
    teacher_tok = load_tokenizer(config.teacher, trust_remote_code=config.trust_remote_code)
    examples = load_examples(config.data, config.split, max_examples=config.max_examples)
    lengths = {
        "template": config.template,
        "max_prompt_length": config.max_prompt_length,
        "max_length": config.max_length,
    }
    paired, stats = pair_examples(examples, student_tok, teacher_tok, **lengths)
    vocab_map = load_or_build_vocab_map(student_tok, teacher_tok)
    figures: dict[str, Any] = {
        "student": config.student,
        "teacher": config.teacher,
        "data": config.data,
        "examples": stats.examples,
        "student_positions": stats.student_targets,
        "teacher_positions": stats.teacher_targets,
        "aligned_positions": stats.aligned,
        "aligned_share": stats.aligned / max(stats.student_targets, 1),
        "aligned_share_p10_over_examples": _percentile(stats.per_example, 0.1),
        "vocab": vocab_map.summary(),
        "teacher_matched_mass": None,
    }
    if _has_weights(config.teacher):
        teacher_ids = torch.tensor(vocab_map.teacher_ids, dtype=torch.long)
        figures["teacher_matched_mass"] = _matched_mass(config, paired[: config.mass_examples], teacher_ids)
        figures["mass_examples"] = min(config.mass_examples, len(paired))
    shown = [
        f"  example {i + 1}:\n{_show(student_tok, teacher_tok, s, t, pairs)}"
        for i, (s, t, pairs) in enumerate(paired[: config.examples])
    ]
    return figures, "\n".join(shown)


def _text(figures: dict[str, Any], shown: str) -> str:
    vocab = figures["vocab"]
    lines = [
        f"student {figures['student']}  <-  teacher {figures['teacher']}  on {figures['data']} "
        f"({figures['examples']} examples)",
        f"aligned student positions: {figures['aligned_positions']} of {figures['student_positions']} "
        f"({100 * figures['aligned_share']:.1f}%; 10th percentile over examples "
        f"{100 * (figures['aligned_share_p10_over_examples'] or 0):.1f}%); teacher positions: "
        f"{figures['teacher_positions']}",
        f"matched vocabulary: {vocab['matched']} tokens ({100 * vocab['share_of_student_vocab']:.1f}% of the "
        f"student's {vocab['student_vocab']}, {100 * vocab['share_of_teacher_vocab']:.1f}% of the teacher's "
        f"{vocab['teacher_vocab']})",
    ]
    mass = figures["teacher_matched_mass"]
    if mass is None:
        lines.append("teacher mass on matched tokens: not measured (--teacher has no model weights)")
    else:
        for key, value in mass.items():
            if value["mean"] is None:
                continue
            lines.append(
                f"teacher mass on matched tokens at aligned positions, {key}: mean {100 * value['mean']:.1f}%, "
                f"10th percentile {100 * value['p10']:.1f}%"
            )
    lines.append("alignment (student tokens <-> teacher tokens, cut where the prefixes coincide):")
    lines.append(shown)
    return "\n".join(lines)


def run(config: Config) -> None:
    """``todi xtok-report``."""
    figures, shown = xtok_figures(config)
    print(_text(figures, shown))
    if config.json:
        from todi.report import write_text_atomic

        path = Path(config.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(figures, indent=2) + "\n")
