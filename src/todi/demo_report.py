"""The demo's report: a results table, loss curves, ROUGE-L bars and ToDi's weights, in report.md."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

import torch

from todi import demo_tasks
from todi.stats import PairedDifference, markdown_paired_table, paired_difference


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_losses(runs: Path, objectives: list[str], path: Path) -> None:
    """Training cross-entropy (the term every objective shares) and total loss per step."""
    plt = _plt()
    fig, (ax_ce, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for objective in objectives:
        # The first seed's run: the curves of one seed show the dynamics; the table averages the seeds.
        first = sorted((runs / objective).glob("seed*"))
        records = [r for r in _read_metrics(first[0] / "metrics.jsonl") if "ce" in r] if first else []
        steps = [r["step"] for r in records]
        ax_ce.plot(steps, [r["ce"] for r in records], label=objective)
        ax_loss.plot(steps, [r["loss"] for r in records], label=objective)
    ax_ce.set(title="training cross-entropy on the labels", xlabel="step", ylabel="CE (nats/token)")
    ax_loss.set(title="training objective", xlabel="step", ylabel="(1-k) CE + k KD")
    for ax in (ax_ce, ax_loss):
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scores(results: dict[str, dict[str, float]], path: Path) -> None:
    plt = _plt()
    names = list(results)
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names)), 4))
    means = [results[n]["rougeL"] for n in names]
    stds = [results[n]["rougeL_std"] for n in names]
    colors = ["#777777" if n == "teacher" else "#1f77b4" if n == "sft" else "#d62728" if n == "todi" else "#ff7f0e"
              for n in names]  # fmt: skip
    ax.bar(names, means, yerr=stds, capsize=4, color=colors)
    for x, m in enumerate(means):
        ax.text(x, m + 0.5, f"{m:.1f}", ha="center", va="bottom", fontsize=9)
    ax.set(ylabel="ROUGE-L (x100)", title="held-out ROUGE-L (mean ± std over training seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def _answer_logits(
    models: list[Path], test: Path, max_examples: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each model's logits ``[positions, V]`` at the supervised positions of the test answers (teacher
    forcing: the reference answer is fed in), and the reference tokens there."""
    from transformers import AutoModelForCausalLM

    from todi.data import DataCollator, encode_examples, load_examples

    tokenizer = demo_tasks.build_tokenizer()
    examples = load_examples(test, max_examples=max_examples)
    features, _ = encode_examples(examples, tokenizer, template=demo_tasks.PROMPT_TEMPLATE, max_length=64,
                                  max_prompt_length=48)  # fmt: skip
    batch = DataCollator(tokenizer.pad_token_id)(features)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logits = []
    for path in models:
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        logits.append(model(**inputs).logits[:, :-1][keep].float())
    return logits, labels[keep]


def todi_weight_statistics(teacher: Path, student: Path, test: Path, *, temperature: float = 2.0,
                           max_examples: int = 100) -> dict[str, Any]:  # fmt: skip
    """log(p/q) and ToDi's weight a = sigmoid(log p/q) for every vocabulary item at every supervised
    position of the test answers (teacher forcing), with the probability mass m = (p + q) / 2 of each."""
    from todi.divergences import log_probs, todi_weight

    (teacher_logits, student_logits), _ = _answer_logits([teacher, student], test, max_examples)
    ls, lt = log_probs(student_logits, teacher_logits, temperature)
    log_ratio = (lt - ls).flatten()
    mass = (0.5 * (lt.exp() + ls.exp())).flatten()
    return {
        "log_ratio": log_ratio,
        "mass": mass,
        "fkl_share": float(todi_weight(ls, lt).mean()),
        "positions": int(ls.shape[0]),
    }


# A token the teacher gives less than this is one it would (almost) never say.
UNLIKELY = 1e-4
# What heldout_fit measures, in the report's column order.
FIT_KEYS = ("ce", "fkl", "rkl", "unlikely_mass")


def heldout_fit(teacher: Path, students: dict[str, Path], test: Path, *, max_examples: int = 200,
                unlikely: float = UNLIKELY) -> dict[str, dict[str, float]]:  # fmt: skip
    """How closely each student matches the teacher on the test answers under teacher forcing, at T = 1:
    ``ce`` (cross-entropy of the reference tokens), ``fkl`` = KL(p || q), ``rkl`` = KL(q || p) (means over
    positions) and ``unlikely_mass``: the student's mean probability on tokens with p < ``unlikely``, which
    sampling turns into wrong words. Far less noisy than sampled ROUGE-L."""
    names = list(students)
    logits, labels = _answer_logits([teacher, *students.values()], test, max_examples)
    lp = logits[0].log_softmax(-1)
    ruled_out = lp < math.log(unlikely)
    fits = {}
    for name, student_logits in zip(names, logits[1:]):
        lq = student_logits.log_softmax(-1)
        fits[name] = {
            "ce": float(torch.nn.functional.nll_loss(lq, labels)),
            "fkl": float((lp.exp() * (lp - lq)).sum(-1).mean()),
            "rkl": float((lq.exp() * (lq - lp)).sum(-1).mean()),
            "unlikely_mass": float((lq.exp() * ruled_out).sum(-1).mean()),
        }
    return fits


def plot_todi_weights(stats: dict[str, Any], path: Path) -> None:
    plt = _plt()
    x, mass = stats["log_ratio"].numpy(), stats["mass"].numpy()
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = [-8 + 0.25 * i for i in range(65)]
    ax.hist(
        x.clip(-8, 8), bins=bins, weights=mass / mass.sum(), color="#bbbbbb", label="probability mass (p+q)/2"
    )
    ax.set(xlabel="log p/q (teacher / student, T = 2)", ylabel="share of probability mass")
    twin = ax.twinx()
    grid = torch.linspace(-8, 8, 200)
    twin.plot(grid, torch.sigmoid(grid), color="#d62728", label="ToDi weight a = sigmoid(log p/q)")
    twin.set(ylabel="a (weight of FKL; 1 - a weighs RKL)", ylim=(0, 1))
    ax.set_title(f"ToDi student vs teacher on held-out answers (FKL share {stats['fkl_share']:.2f})")
    lines = ax.get_legend_handles_labels()
    twin_lines = twin.get_legend_handles_labels()
    ax.legend(lines[0] + twin_lines[0], lines[1] + twin_lines[1], loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def paired_rouge(results: dict[str, dict[str, Any]], reference: str = "todi") -> list[PairedDifference]:
    """Every student objective's held-out ROUGE-L minus ``reference``'s, training seed by training seed
    (``rougeL_per_run`` lists the seeds in the same order for every objective); empty without the
    reference or with fewer than two seeds."""
    if reference not in results or len(results[reference].get("rougeL_per_run", [])) < 2:
        return []
    return [
        paired_difference(
            r["rougeL_per_run"], results[reference]["rougeL_per_run"], name=name, reference=reference
        )
        for name, r in results.items()
        if name not in ("teacher", reference)
    ]


def write_report(out: Path, *, results: dict[str, dict[str, float]], runs: Path, teacher: Path,
                 student: Path | None, test: Path, profile: dict[str, Any], elapsed: float,
                 teacher_seconds: float, quick: bool) -> Path:  # fmt: skip
    objectives = [n for n in results if n != "teacher"]
    plot_losses(runs, objectives, out / "loss.png")
    plot_scores(results, out / "rougeL.png")
    weight_line = ""
    if student is not None:
        stats = todi_weight_statistics(teacher, student, test)
        plot_todi_weights(stats, out / "todi_weights.png")
        weight_line = (
            f"On {stats['positions']} held-out answer positions, ToDi's weight routed "
            f"{100 * stats['fkl_share']:.0f}% of the divergence to FKL (student underestimates) and "
            f"{100 * (1 - stats['fkl_share']):.0f}% to RKL.\n\n![ToDi weights](todi_weights.png)\n"
        )
    sft = results.get("sft", {}).get("rougeL")
    rows = ["| model | ROUGE-L | exact match | ROUGE-L vs SFT |", "|---|---|---|---|"]
    for name, r in results.items():
        delta = "" if sft is None or name in ("sft", "teacher") else f"{r['rougeL'] - sft:+.1f}"
        rows.append(
            f"| {name} | {r['rougeL']:.1f} ± {r['rougeL_std']:.1f} | {r['exact']:.1f} ± {r['exact_std']:.1f} | {delta} |"
        )
    kd = {n: r["rougeL"] for n, r in results.items() if n not in ("sft", "teacher") and not _on_policy(n)}
    lines = []
    if sft is not None and kd:
        beat = [n for n, v in kd.items() if v > sft]
        lines.append(
            f"Distilled students that beat the SFT-only student on held-out ROUGE-L: {', '.join(beat) or 'none'} "
            f"(by {', '.join(f'{n} {kd[n] - sft:+.1f}' for n in kd)} points)."
        )
        if "todi" in kd:
            others = {n: v for n, v in kd.items() if n != "todi"}
            best_other = max(others, key=others.get) if others else None
            if best_other is not None:
                verdict = "beats" if kd["todi"] > others[best_other] else "does not beat"
                lines.append(
                    f"ToDi ({kd['todi']:.1f}) {verdict} the best other divergence, {best_other} "
                    f"({others[best_other]:.1f}), at these settings. With "
                    f"{len(profile['student_seeds'])} training seed(s), {len(profile['eval_seeds'])} sampling "
                    f"seed(s) and {profile['test_examples']} test examples, differences within the ± spread "
                    "are noise."
                )
    paired = paired_rouge(results)
    paired_text = ""
    if paired:
        paired_text = (
            "Paired differences to ToDi (held-out ROUGE-L per training seed, the objective's minus ToDi's; mean "
            "with a 95% bootstrap interval over the seeds and the sign test, src/todi/stats.py):\n\n"
            + markdown_paired_table(paired)
            + "\n"
        )
    fit_rows = []
    fitted = {n: r["fit"] for n, r in results.items() if "fit" in r}
    if fitted:
        fit_rows = [
            "| model | CE of the reference answers | KL(teacher, student) | KL(student, teacher) "
            f"| student mass on tokens with p < {UNLIKELY:g} |",
            "|---|---|---|---|---|",
        ]
        for name, f in fitted.items():
            several = len(profile["student_seeds"]) > 1
            cells = " | ".join(
                f"{f[k]['mean']:.3f}" + (f" ± {f[k]['std']:.3f}" if several else "") for k in FIT_KEYS
            )
            fit_rows.append(f"| {name} | {cells} |")
        if "sft" in fitted:
            closer = [
                n for n, f in fitted.items()
                if n != "sft" and all(f[k]["mean"] < fitted["sft"][k]["mean"] for k in FIT_KEYS)
            ]  # fmt: skip
            fit_rows.append(
                f"\nDistilled students closer to the teacher than the SFT-only student on all four: "
                f"{', '.join(closer) or 'none'}."
            )
    fit_text = ""
    if fit_rows:
        fit_text = (
            "Held-out fit to the teacher (teacher forcing on the test answers, T = 1; the mean over training "
            f"seeds{' ± their std' if len(profile['student_seeds']) > 1 else ''}): less noisy than sampled "
            "ROUGE-L, and where a distillation effect shows first.\n\n" + "\n".join(fit_rows)
        )
    chosen = [f"{n} {', '.join(map(str, r['steps']))}" for n, r in results.items() if r.get("steps")]
    if chosen:
        lines.append(f"Checkpoints chosen by dev ROUGE-L (step per training seed): {'; '.join(chosen)}.")
    dev_line = ""
    if "dev_every" in profile:
        dev_line = (
            f"As in the paper, each student is the checkpoint\nwith the best dev ROUGE-L ({profile['dev_examples']} "
            f"dev tasks, sampling seed {profile['dev_seed']}, scored every {profile['dev_every']} steps)."
        )
    text = f"""# todi demo report

Profile: {"quick" if quick else "default"}. Embedded tasks (arithmetic, sorting, reversing, spelling,
opposites, extremes, naming members of a category), word-level tokenizer of {len(demo_tasks.vocabulary())} tokens.
Teacher: Llama {profile["teacher_layers"]} layers x {profile["teacher_hidden"]}, {profile["teacher_steps"]} SFT steps
on {profile["teacher_data"]} tasks ({"trained in this run, " + f"{teacher_seconds:.0f} s" if teacher_seconds else "from the cache"}).
Students: Llama {profile["student_layers"]} layers x {profile["student_hidden"]}, {profile["student_steps"]} steps each
on the first {profile["train_examples"]} of those tasks (a labelled budget much smaller than the teacher's);
each objective trained with {len(profile["student_seeds"])} seed(s) (initialisation and data order, shared by all
objectives); distilled ones use kd_rate 0.5 and temperature 2.0. {dev_line}
Evaluation: {profile["test_examples"]} held-out tasks, sampling at temperature 1 with seeds {", ".join(map(str, profile["eval_seeds"]))},
ROUGE-L (x100, max over references) and exact match (any reference); a student's score is the mean over
its training seeds (each the mean over the sampling seeds), ± the std over training seeds (over sampling
seeds for the teacher{" and for single-seed students" if len(profile["student_seeds"]) == 1 else ""}).

{chr(10).join(rows)}

{chr(10).join(lines)}

{paired_text}

{onpolicy_text(results)}

![ROUGE-L](rougeL.png)

{fit_text}

![losses](loss.png)

{weight_line}
Total wall time {elapsed / 60:.1f} min on {platform.processor() or platform.machine()} with {torch.get_num_threads()} threads.
"""
    path = out / "report.md"
    path.write_text(text, encoding="utf-8")
    (out / "results.json").write_text(
        json.dumps(
            {
                "results": results,
                "paired_vs_todi": [d.as_dict() for d in paired],
                "profile": profile,
                "elapsed_s": elapsed,
            },
            indent=2,
        )
    )
    return path


def _on_policy(name: str) -> bool:
    from todi.demo import MIXED_POLICY, ON_POLICY

    return name in ON_POLICY or name in MIXED_POLICY


def onpolicy_text(results: dict[str, dict[str, Any]]) -> str:
    """The on-policy comparison: each on-policy student against the same divergence off-policy, paired by
    training seed (same initialisation and data order), with the bootstrap interval of todi.stats."""
    from todi.demo import MIXED_POLICY, ON_POLICY
    from todi.stats import markdown_paired_table, paired_difference

    variants = {**ON_POLICY, **MIXED_POLICY}
    diffs = []
    for name, (loss, lmbda) in variants.items():
        if name in results and loss in results:
            a, b = results[name]["rougeL_per_run"], results[loss]["rougeL_per_run"]
            if len(a) == len(b):
                diffs.append(paired_difference(a, b, name=f"{name} (λ {lmbda:g})", reference=f"{loss} (λ 0)"))
    if not diffs:
        return ""
    return (
        "On-policy distillation: students trained on their own samples (`--lmbda 1`: every step; `0.5`: half "
        "of the steps, with --all) against the same divergence on the data's answers, held-out ROUGE-L paired "
        "by training seed. On generated steps the objective is the divergence alone.\n\n"
        + markdown_paired_table(diffs)
    )
