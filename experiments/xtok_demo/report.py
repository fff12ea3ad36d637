"""The cross-tokenizer study's section of docs/cross_tokenizer.md and its JSON summary, from a run folder.

    python experiments/xtok_demo/report.py /tmp/xtok
    python experiments/xtok_demo/report.py /tmp/xtok --doc docs/cross_tokenizer.md --json benchmarks/results/xtok_demo.json

The section between the markers below is replaced whole; the rest of the document is left as it is.
Nothing in it is typed in by hand: every number comes from the run's result files.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from todi.report import write_text_atomic
from todi.stats import PairedDifference, bootstrap_mean_ci, markdown_paired_table, paired_by_key

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BEGIN, END = "<!-- xtok_demo: begin -->", "<!-- xtok_demo: end -->"


def load(out: Path) -> dict[str, Any]:
    """The run's configuration, per-variant per-seed results, the teacher's score and the pair figures."""
    info = json.loads((out / "run_info.json").read_text())
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for variant in info["config"]["variants"]:
        cells = [json.loads(p.read_text()) for p in sorted((out / "results" / variant).glob("seed*.json"))]
        results[variant] = {c["seed"]: c for c in cells}
    read = lambda name: json.loads(p.read_text()) if (p := out / "results" / name).is_file() else None  # noqa: E731
    return {"info": info, "results": results, "teacher": read("teacher.json"), "pair": read("pair.json")}


def rouge(cells: dict[int, dict[str, Any]]) -> dict[int, float]:
    return {seed: c["rougeL"] for seed, c in cells.items()}


def paired(run: dict[str, Any]) -> list[PairedDifference]:
    """The configured comparisons (variant minus reference), over the seeds both finished (at least two)."""
    out = []
    for variant, reference in run["info"]["config"]["comparisons"]:
        scores, ref = rouge(run["results"].get(variant, {})), rouge(run["results"].get(reference, {}))
        if len(set(scores) & set(ref)) >= 2:
            out.append(paired_by_key(scores, ref, name=variant, reference=reference))
    return out


def describe(spec: dict[str, Any]) -> str:
    if spec["loss"] == "sft":
        return "SFT (cross-entropy only)"
    mode = spec.get("cross_tokenizer", "refuse")
    unaligned = f"--unaligned {spec.get('unaligned', 'ce')}"
    if mode == "uld":
        return f"`--cross-tokenizer uld {unaligned}` (ULD alone)"
    if mode == "hybrid":
        weight = spec.get("uld_weight", 1.0)
        return f"`--cross-tokenizer hybrid --loss {spec['loss']} {unaligned}` (+ ULD on the rest, weight {weight:g})"
    return f"`--loss {spec['loss']}`, the teacher's tokenizer"


def variant_table(run: dict[str, Any]) -> str:
    rows = ["| variant | student tokenizer | objective | seeds | ROUGE-L mean ± std | 95% CI | exact match | train s (median) |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for variant, cells in run["results"].items():
        if not cells:
            continue
        spec = run["info"]["config"]["variants"][variant]
        scores = [c["rougeL"] for c in cells.values()]
        mean, low, high = bootstrap_mean_ci(scores)
        std = statistics.stdev(scores) if len(scores) > 1 else 0.0
        exact = statistics.fmean(c["exact"] for c in cells.values())
        train = statistics.median(c["train_s"] for c in cells.values())
        rows.append(
            f"| {variant} | {spec['tokenizer']} | {describe(spec)} | {len(scores)} | {mean:.1f} ± {std:.1f} "
            f"| {low:.1f}..{high:.1f} | {exact:.1f} | {train:.0f} |"
        )
    return "\n".join(rows)


def pair_text(run: dict[str, Any]) -> str:
    pair, config = run["pair"], run["info"]["config"]
    if not pair:
        return "Not measured yet."
    lines = []
    for name in config["tokenizers"]:
        if name == config["teacher_tokenizer"] or name not in pair:
            continue
        f = pair[name]
        v = f["vocab"]
        mass = f.get("teacher_matched_mass") or {}
        masses = "; ".join(
            f"{t}: mean {100 * m['mean']:.1f}%, p10 {100 * m['p10']:.1f}%" for t, m in mass.items()
        )
        lines.append(
            f"- `{config['teacher_tokenizer']}` teacher -> `{name}` student (`todi xtok-report`, first "
            f"{f['examples']} training tasks): {f['aligned_positions']:,} of {f['student_positions']:,} student "
            f"positions aligned ({100 * f['aligned_share']:.1f}%; p10 over examples "
            f"{100 * f['aligned_share_p10_over_examples']:.1f}%); {v['matched']} matched tokens "
            f"({100 * v['share_of_student_vocab']:.0f}% of the student's {v['student_vocab']}, "
            f"{100 * v['share_of_teacher_vocab']:.0f}% of the teacher's {v['teacher_vocab']}); the trained "
            f"teacher's probability on matched tokens at aligned positions ({f.get('mass_examples', 0)} "
            f"examples): {masses or 'not measured'}."
        )
    return "\n".join(lines)


def section(out: Path) -> tuple[str, dict[str, Any]]:
    from todi import demo_tasks  # noqa: F401  (the run needs todi importable; fail early otherwise)

    run = load(out)
    info, config = run["info"], run["info"]["config"]
    p = info["profile"]
    done = sum(len(c) for c in run["results"].values())
    total = len(config["variants"]) * config["student_seeds"]
    status = (
        f"all {total} cells finished" if done == total else f"**partial: {done} of {total} cells finished**"
    )
    diffs = paired(run)
    teacher = run["teacher"]
    cell_s = sum(c["train_s"] + c["eval_s"] for cells in run["results"].values() for c in cells.values())
    patterns = "\n".join(f"  - `{name}`: `{pattern}`" for name, pattern in config["tokenizers"].items())
    text = f"""{BEGIN}
## Measured on the demo task

Written by `python experiments/xtok_demo/report.py {out}` from the files of
`python experiments/xtok_demo/run.py --out {out}` ({status}; {cell_s / 60:.0f} min of training and
evaluation summed over the cells; {info["machine"]}, torch {info["torch"]}, {info["torch_threads"]} torch
thread(s) per process). Nothing here is typed in by hand.

**Setup.** The demo's tasks, model sizes, training options and evaluation (src/todi/demo.py, profile
`{config["profile"] if isinstance(config["profile"], str) else "custom"}`), with two tokenizers built from the
demo's own text by these patterns (experiments/xtok_demo/config.yaml; every character lies in some token,
so the alignment can find boundaries inside a response; the demo's own word-level tokenizer drops spaces
from its offsets, so no boundary inside a response would be certain with it):
{patterns}

The teacher ({p["teacher_layers"]} layers x {p["teacher_hidden"]}, `{config["teacher_tokenizer"]}` tokenizer) is trained
from scratch on {p["teacher_examples"] or p["train_examples"]} tasks by the demo's teacher recipe; held-out ROUGE-L
{teacher["rougeL"]:.1f} (exact match {teacher["exact"]:.1f}). Students ({p["student_layers"]} layers x {p["student_hidden"]}) train
{p["student_steps"]} steps on the first {p["train_examples"]} tasks; each keeps its best dev ROUGE-L checkpoint and is scored
on {p["test_examples"]} held-out tasks by sampled ROUGE-L (T = 1, seeds {", ".join(map(str, p["eval_seeds"]))}). Every variant
trains the same {config["student_seeds"]} seeds (initialisation and data order); differences are taken seed by
seed (95% percentile-bootstrap interval of the mean difference and the exact sign test, src/todi/stats.py;
"no difference detected" means the interval includes 0).

**The pair.**
{pair_text(run)}

**Held-out ROUGE-L.**

{variant_table(run)}

**Paired differences.**

{markdown_paired_table(diffs) if diffs else "Not enough paired seeds yet."}
{END}
"""
    summary = {
        "run": str(out),
        "status": status,
        "teacher": teacher,
        "pair": {k: v for k, v in (run["pair"] or {}).items() if not k.endswith("_examples")},
        "variants": {
            v: {"spec": config["variants"][v], "rougeL_per_seed": rouge(cells)}
            for v, cells in run["results"].items()
        },
        "paired": [d.as_dict() for d in diffs],
    }
    return text, summary


def replace_section(doc: Path, text: str) -> None:
    """Put ``text`` between the markers of ``doc`` (appended when it has none yet)."""
    current = doc.read_text(encoding="utf-8")
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        new = head + text.rstrip("\n") + tail
    else:
        new = current.rstrip("\n") + "\n\n" + text
    write_text_atomic(doc, new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the run folder of run.py")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "cross_tokenizer.md")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "xtok_demo.json")
    args = parser.parse_args()
    text, summary = section(args.out.resolve())
    replace_section(args.doc, text)
    write_text_atomic(args.json, json.dumps(summary, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
