"""Write docs/ablation.md and its figure from a run.py folder; every number comes from the run's files.

    python experiments/ablation_demo/report.py /work/ablation-run [--doc docs/ablation.md]

Reads OUT/run_info.json (the configuration and machine), OUT/results/<variant>/seed<k>.json (one per
finished cell), OUT/results/teacher.json and OUT/efficiency.json. A run still going (or cut short) gives
a report over the seeds finished so far, and says how many; the paired comparisons use only the seeds
both sides have. The reading at the end is composed from the paired intervals, so it states a null
result wherever the intervals include 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "src"))

from todi.report import write_text_atomic  # noqa: E402
from todi.stats import PairedDifference, bootstrap_mean_ci, markdown_paired_table, paired_by_key  # noqa: E402

FIGURE = "figures/ablation_beta.png"


def load(out: Path) -> dict[str, Any]:
    """The run's configuration, per-variant per-seed results, teacher score and efficiency measurements."""
    info = json.loads((out / "run_info.json").read_text())
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for variant in info["config"]["variants"]:
        folder = out / "results" / variant
        cells = [json.loads(p.read_text()) for p in sorted(folder.glob("seed*.json"))]
        results[variant] = {c["seed"]: c for c in cells}
    teacher_path, efficiency_path = out / "results" / "teacher.json", out / "efficiency.json"
    return {
        "info": info,
        "results": results,
        "teacher": json.loads(teacher_path.read_text()) if teacher_path.is_file() else None,
        "efficiency": json.loads(efficiency_path.read_text()) if efficiency_path.is_file() else None,
    }


def rouge(cells: dict[int, dict[str, Any]]) -> dict[int, float]:
    return {seed: c["rougeL"] for seed, c in cells.items()}


def paired_to_reference(run: dict[str, Any]) -> dict[str, PairedDifference]:
    """Every variant's ROUGE-L minus the reference variant's, over the seeds both finished."""
    reference = run["info"]["config"]["reference"]
    ref = rouge(run["results"].get(reference, {}))
    out = {}
    for variant, cells in run["results"].items():
        scores = rouge(cells)
        if variant != reference and len(set(scores) & set(ref)) >= 2:
            out[variant] = paired_by_key(scores, ref, name=variant, reference=reference)
    return out


def describe(options: dict[str, Any]) -> str:
    if options["loss"] == "sft":
        return "SFT (cross-entropy only)"
    parts = [options["loss"].upper() if options["loss"] != "todi" else "ToDi"]
    if options["loss"] == "todi":
        parts.append(f"a = {options['todi_weight']}, β {options['beta']:g}")
    parts.append(f"T {options['temperature']:g}, kd_rate {options['kd_rate']:g}")
    return ", ".join(parts)


def variant_table(run: dict[str, Any]) -> str:
    lines = [
        "| variant | objective | seeds | ROUGE-L mean ± std | 95% CI of the mean | exact match | dev-chosen step (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, cells in run["results"].items():
        if not cells:
            lines.append(f"| {variant} | | 0 | not run yet | | | |")
            continue
        values = list(rouge(cells).values())
        mean, low, high = bootstrap_mean_ci(values)
        std = f"{statistics.stdev(values):.1f}" if len(values) > 1 else "–"
        exact = statistics.fmean(c["exact"] for c in cells.values())
        steps = [c["best_step"] for c in cells.values() if c.get("best_step") is not None]
        objective = describe(next(iter(cells.values()))["objective"])
        step = f"{statistics.median(steps):g}" if steps else "–"
        lines.append(
            f"| {variant} | {objective} | {len(values)} | {mean:.1f} ± {std} | {low:.1f}..{high:.1f} "
            f"| {exact:.1f} | {step} |"
        )
    if run["teacher"]:
        t = run["teacher"]
        lines.append(
            f"| teacher | the demo's teacher (± over sampling seeds) | – | {t['rougeL']:.1f} ± {t['rougeL_std']:.1f} | | {t['exact']:.1f} | |"
        )
    return "\n".join(lines)


def beta_variants(run: dict[str, Any]) -> list[tuple[float, str]]:
    """(beta, variant) of the sigmoid-rule ToDi variants at the default T and kd_rate, by beta."""
    found = []
    for variant, cells in run["results"].items():
        if not cells:
            continue
        o = next(iter(cells.values()))["objective"]
        if (
            o["loss"] == "todi"
            and o["todi_weight"] == "sigmoid"
            and o["temperature"] == 2.0
            and o["kd_rate"] == 0.5
        ):
            found.append((o["beta"], variant))
    return sorted(found)


def plot_beta(run: dict[str, Any], paired: dict[str, PairedDifference], path: Path) -> bool:
    """ROUGE-L against beta (mean and 95% bootstrap CI over seeds) and the paired difference to the
    reference at each beta; the anchors as horizontal lines. False when fewer than two betas have results."""
    points = beta_variants(run)
    if len(points) < 2:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    betas = [b for b, _ in points]
    cis = [bootstrap_mean_ci(list(rouge(run["results"][v]).values())) for _, v in points]
    means = [c[0] for c in cis]
    left.errorbar(betas, means, yerr=[[m - c[1] for m, c in zip(means, cis)], [c[2] - m for m, c in zip(means, cis)]],
                  marker="o", capsize=4, label="ToDi (sigmoid rule)")  # fmt: skip
    for variant, style in (("fkl", ":"), ("rkl", "--"), ("sft", "-.")):
        values = list(rouge(run["results"].get(variant, {})).values())
        if values:
            left.axhline(statistics.fmean(values), linestyle=style, color="grey", label=variant.upper())
    left.set_xscale("log", base=2)
    left.set_xticks(betas, [f"{b:g}" for b in betas])
    left.set_xlabel("β")
    left.set_ylabel("held-out ROUGE-L")
    left.set_title("mean over training seeds, 95% bootstrap CI", fontsize="medium")
    left.legend(fontsize="small")
    reference = run["info"]["config"]["reference"]
    diffs = [(b, paired.get(v)) for b, v in points]
    right.axhline(0.0, color="grey", linewidth=0.8)
    xs = [b for b, d in diffs if d is not None]
    ds = [d for _, d in diffs if d is not None]
    right.errorbar(xs, [d.mean for d in ds], yerr=[[d.mean - d.low for d in ds], [d.high - d.mean for d in ds]],
                   marker="o", capsize=4, linestyle="none")  # fmt: skip
    ref_beta = [b for b, v in points if v == reference]
    right.plot(ref_beta, [0.0] * len(ref_beta), marker="o", fillstyle="none", linestyle="none", color="C0")
    right.set_xscale("log", base=2)
    right.set_xlim(left.get_xlim())
    right.set_xticks(betas, [f"{b:g}" for b in betas])
    right.set_xlabel("β")
    right.set_ylabel(f"ROUGE-L − {reference} (paired by seed)")
    right.set_title("paired difference to β = 1, 95% bootstrap CI", fontsize="medium")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    tmp.replace(path)
    return True


def efficiency_table(efficiency: dict[str, Any]) -> str:
    objectives = efficiency["objectives"]
    parts = []
    for pair, data in efficiency["pairs"].items():
        base_online = data["online"]["sft"]["cpu_s"] if "sft" in objectives else None
        lines = [
            f"**{pair}** ({data['shape']}; {data['supervised_positions']} supervised positions per batch)",
            "",
            "| objective | online CPU ms / step | × SFT | cache CPU ms / step | cache / online | online wall ms "
            "| cache wall ms | online peak MiB | cache peak MiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name in objectives:
            on, ca = data["online"][name], data["cache"][name]
            ratio = f"{on['cpu_s'] / base_online:.2f}" if base_online else "–"
            lines.append(
                f"| {name} | {1000 * on['cpu_s']:.1f} | {ratio} | {1000 * ca['cpu_s']:.1f} | "
                f"{ca['cpu_s'] / on['cpu_s']:.2f} | {1000 * on['step_s']:.1f} | {1000 * ca['step_s']:.1f} | "
                f"{on['peak_mib']:.1f} | {ca['peak_mib']:.1f} |"
            )
        ranges = sorted(
            max(r["cpu_s_all"]) / min(r["cpu_s_all"]) - 1
            for mode in ("online", "cache")
            for r in data[mode].values()
            if r.get("cpu_s_all")
        )
        if ranges:
            lines.append(
                f"\nBetween rounds an objective's CPU time varied by {100 * statistics.median(ranges):.0f}% "
                f"(max / min - 1, the median over rows; up to {100 * ranges[-1]:.0f}%): medians closer than "
                "that are not told apart."
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _group_reading(
    label: str, variants: list[str], paired: dict[str, PairedDifference], reference: str
) -> str:
    done = [paired[v] for v in variants if v in paired]
    if not done:
        return f"- {label}: no paired results yet."
    detected = [d for d in done if d.detected]
    if not detected:
        spread = ", ".join(f"{d.name} {d.mean:+.1f} ({d.low:+.1f}..{d.high:+.1f})" for d in done)
        return (
            f"- {label}: no difference from {reference} detected for any of {len(done)} variant(s) "
            f"(paired mean differences with 95% CIs: {spread}). A null result at n = {done[0].n} seeds: "
            "differences smaller than the intervals' half-width cannot be excluded."
        )
    rest = [d.name for d in done if not d.detected]
    text = f"- {label}: " + "; ".join(d.sentence() for d in detected) + "."
    if rest:
        text += f" No difference detected for {', '.join(rest)}."
    return text


def reading(run: dict[str, Any], paired: dict[str, PairedDifference]) -> str:
    """What the weight rule, beta, temperature, kd_rate and the anchors do here, from the paired intervals."""
    reference = run["info"]["config"]["reference"]
    groups: dict[str, list[str]] = {
        "weight rule": [],
        "β (sigmoid rule)": [],
        "temperature / kd_rate": [],
        "anchors": [],
    }
    for variant, cells in run["results"].items():
        if variant == reference or not cells:
            continue
        o = next(iter(cells.values()))["objective"]
        if o["loss"] != "todi":
            groups["anchors"].append(variant)
        elif o["todi_weight"] != "sigmoid":
            groups["weight rule"].append(variant)
        elif o["temperature"] != 2.0 or o["kd_rate"] != 0.5:
            groups["temperature / kd_rate"].append(variant)
        else:
            groups["β (sigmoid rule)"].append(variant)
    return "\n".join(_group_reading(label, vs, paired, reference) for label, vs in groups.items())


def write(out: Path, doc: Path) -> str:
    run = load(out)
    config, info = run["info"]["config"], run["info"]
    paired = paired_to_reference(run)
    reference = config["reference"]
    figure = plot_beta(run, paired, doc.parent / FIGURE)
    finished = {v: len(c) for v, c in run["results"].items()}
    total = len(config["variants"]) * config["student_seeds"]
    status = (
        f"all {total} cells finished"
        if sum(finished.values()) == total
        else f"**partial: {sum(finished.values())} of {total} cells finished** (the run was still going or was "
        "cut short; rerun report.py once it is complete)"
    )
    from todi import demo

    p = demo.PROFILES[config["profile"]]
    paired_md = (
        markdown_paired_table([paired[v] for v in run["results"] if v in paired])
        if paired
        else "Not enough paired seeds yet."
    )
    efficiency = (
        efficiency_table(run["efficiency"])
        if run["efficiency"]
        else "Not measured yet (run.py measures it after the cells)."
    )
    wall = (
        f"{info['wall_s'] / 60:.0f} min of wall time summed over its finished invocations (copies run side by side add up)"
        if "wall_s" in info
        else "no invocation finished yet"
    )
    text = f"""# ToDi ablations on the demo task

Written by `python experiments/ablation_demo/report.py {out}` from the files of
`python experiments/ablation_demo/run.py --out {out}` ({status}; {wall}; {info["machine"]}, torch
{info["torch"]}, {info["torch_threads"]} torch thread(s), a machine shared with other jobs).
Nothing below is typed in by hand.

## Setup

The task, teacher, students and evaluation of `todi demo` (profile `{config["profile"]}`, src/todi/demo.py): the
demo's cached teacher (Llama {p.teacher_layers} layers x {p.teacher_hidden}, trained on {p.teacher_data} tasks), students of
{p.student_layers} layers x {p.student_hidden} trained {p.student_steps} steps on the first {p.train_examples} tasks, the checkpoint with the best dev
ROUGE-L ({p.dev_examples} dev tasks, {p.dev_evals} scores per run), scored on {p.test_examples} held-out tasks by sampled ROUGE-L (T = 1, the
mean over sampling seeds {", ".join(map(str, p.eval_seeds))}). Every variant is trained with the same {config["student_seeds"]} training seeds
(initialisation and data order); a variant's score per seed is one number, so variants are compared
**seed by seed**: the per-seed difference to `{reference}` (ToDi as the paper defines it: sigmoid weight, β 1,
T 2, kd_rate 0.5), its mean with a 95% percentile-bootstrap interval over the seeds, and the exact sign
test (src/todi/stats.py). "No difference detected" means the interval includes 0, not that the variants
are equal. With few pairs the percentile bootstrap is too narrow (its interval never leaves the range of
the pairs' differences), so below about 8 seeds read the sign test beside it: with n pairs its p is at
least 2 / 2^n.

Weight rules (`todi distill --todi-weight`, src/todi/divergences.py): `sigmoid` a = σ(β log p/q) (the paper's);
`hard` a = 1 where p > q, else 0; `constant` a = 1/2 (the token-blind mix (FKL + RKL) / 2); `inverse`
a = σ(β log q/p), the routing reversed (at β = 1 its value is 0 at every token and only the gradient
through the detached a is left: a control).

## Held-out ROUGE-L per variant

Mean ± sample std over training seeds; the CI is the 95% bootstrap interval of the mean.

{variant_table(run)}

## Paired differences to {reference}

Variant minus {reference}, per training seed.

{paired_md}

{"![ROUGE-L against beta](" + FIGURE + ")" if figure else ""}

## What the weight rule and β do here

{reading(run, paired)}

## Efficiency

Written by experiments/ablation_demo/efficiency.py (run.py's last stage, or the script by itself with `--config experiments/ablation_demo/config.yaml --out OUT/efficiency.json`): one training step (student forward, fused
loss, backward, AdamW) per objective, online (the teacher's forward every step) and from a teacher cache (the
teacher's top-{config["efficiency"]["cache_top_k"]} rows with 16 sampled tail draws per position, built once, outside the timing; reading
it from disk is not included). {run["efficiency"]["repeats"] if run["efficiency"] else config["efficiency"]["repeats"]} side-by-side rounds after one warm-up step each, medians
reported; torch on one thread, CPU time (process time) as the main measure because the machine was shared
(wall time also given). Peak memory: the step's peak resident set above the resident set before it
(Linux VmHWM reset through /proc/self/clear_refs, glibc mmap threshold fixed at 64 KiB so freed tensors leave the
resident set). The SmolLM2-shaped pair is random-initialised Llamas of SmolLM2-135M's width, heads and vocabulary with
fewer layers (the real teacher has 30), so the teacher's share of an online step is smaller here than with SmolLM2.

{efficiency}
"""
    write_text_atomic(doc, text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the run.py --out folder")
    parser.add_argument("--doc", default=str(REPO / "docs" / "ablation.md"))
    args = parser.parse_args()
    write(Path(args.out), Path(args.doc))
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
