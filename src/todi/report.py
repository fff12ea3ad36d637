"""Evaluation reports: per-seed ROUGE-L scores summarised into results.json, a Markdown table and a bar plot.

The summary keeps every per-seed score next to the mean and std, so ``todi eval --compare`` can merge
several result folders and recompute everything from the same numbers a run wrote.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from todi.errors import UsageError
from todi.stats import PairedDifference, markdown_paired_table, paired_by_key

log = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
RESULTS_PNG = "rougeL.png"
AVERAGE = "average"

# model -> dataset -> seed -> ROUGE-L (x100) averaged over the examples of that dataset.
Scores = Mapping[str, Mapping[str, Mapping[int, float]]]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std (numpy's default, ddof=0), so a single seed reports std 0 rather than NaN."""
    return statistics.fmean(values), statistics.pstdev(values)


def _cell(per_seed: Mapping[int, float]) -> dict[str, Any]:
    mean, std = mean_std(list(per_seed.values()))
    return {"seeds": {str(s): per_seed[s] for s in sorted(per_seed)}, "mean": mean, "std": std}


def summarize(
    scores: Scores,
    datasets: Sequence[str],
    *,
    n_examples: Mapping[str, Mapping[str, int]] | None = None,
    paths: Mapping[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per model: each dataset's per-seed scores with mean/std, and the average over ``datasets``.

    The average is taken per seed (mean over datasets of that seed's scores) and then summarised over
    seeds, so its std is the seed-to-seed spread of the average, not a mix of dataset spreads. It is only
    given (else None) when the model has all ``datasets``, for the seeds they share: an average over a
    different set of datasets would not be comparable with the other rows.
    """
    models: dict[str, dict[str, Any]] = {}
    for model, per_dataset in scores.items():
        entry: dict[str, Any] = {"datasets": {}}
        if paths and model in paths:
            entry["path"] = paths[model]
        for dataset in datasets:
            if per_dataset.get(dataset):
                cell = _cell(per_dataset[dataset])
                if n_examples and dataset in n_examples.get(model, {}):
                    cell["n_examples"] = n_examples[model][dataset]
                entry["datasets"][dataset] = cell
        complete = bool(datasets) and all(per_dataset.get(d) for d in datasets)
        shared = set.intersection(*(set(per_dataset[d]) for d in datasets)) if complete else set()
        entry[AVERAGE] = (
            _cell({s: statistics.fmean(per_dataset[d][s] for d in datasets) for s in shared})
            if shared
            else None
        )
        models[model] = entry
    return models


def scores_from_results(results: Mapping[str, Any]) -> dict[str, dict[str, dict[int, float]]]:
    """The per-seed scores of a results.json, back in the shape ``summarize`` takes."""
    return {
        model: {
            dataset: {int(seed): float(value) for seed, value in cell["seeds"].items()}
            for dataset, cell in entry["datasets"].items()
        }
        for model, entry in results["models"].items()
    }


def _fmt(cell: Mapping[str, Any] | None) -> str:
    return "–" if not cell else f"{cell['mean']:.2f} ± {cell['std']:.2f}"


def markdown_table(results: Mapping[str, Any]) -> str:
    """Rows: models; columns: datasets and their average; cells: mean ± std of ROUGE-L over seeds."""
    datasets = list(results["datasets"])
    header = ["model", *datasets, "Average"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + [":---:"] * (len(header) - 1)) + "|"]
    for model, entry in results["models"].items():
        cells = [_fmt(entry["datasets"].get(d)) for d in datasets] + [_fmt(entry.get(AVERAGE))]
        lines.append("| " + " | ".join([model, *cells]) + " |")
    seeds = ", ".join(str(s) for s in results.get("seeds", []))
    note = f"ROUGE-L F (x100), mean ± std (population) over seeds {seeds}."
    counts = _example_counts(results)
    if counts:
        note += " Examples: " + ", ".join(f"{d} {n}" for d, n in counts.items()) + "."
    return "\n".join(["# ROUGE-L", "", *lines, "", note, "", *_paired_section(results.get("paired"))])


def paired_comparisons(results: Mapping[str, Any], reference: str | None = None) -> dict[str, Any] | None:
    """Every model's average ROUGE-L minus the ``reference`` model's, sampling seed by sampling seed
    (:mod:`todi.stats`), for the models that have an average and share at least two seeds with it.

    ``reference`` defaults to a model named ``todi`` if there is one, else the first model. None when
    fewer than two models have an average.
    """
    averages = {m: e[AVERAGE]["seeds"] for m, e in results["models"].items() if e.get(AVERAGE)}
    if reference is not None and reference not in averages:
        raise UsageError(
            f"--reference {reference!r} is not a compared model with an average over all data sets "
            f"(those are: {', '.join(averages) or 'none'})",
            "give --reference one of those names (the --name of a model)",
        )
    if len(averages) < 2:
        return None
    ref = reference or ("todi" if "todi" in averages else next(iter(averages)))
    comparisons = [
        paired_by_key(seeds, averages[ref], name=model, reference=ref).as_dict()
        for model, seeds in averages.items()
        if model != ref and len(set(seeds) & set(averages[ref])) >= 2
    ]
    return {"reference": ref, "pairs": "sampling seeds", "comparisons": comparisons}


def _paired_section(paired: Mapping[str, Any] | None) -> list[str]:
    if not paired or not paired["comparisons"]:
        return []
    diffs = [PairedDifference.from_dict(c) for c in paired["comparisons"]]
    return [
        f"## Paired differences to {paired['reference']}",
        "",
        "Average ROUGE-L of each model minus the reference's, paired by sampling seed (same seed, same "
        "examples): mean with a 95% bootstrap interval and the sign test (src/todi/stats.py). The pairs are "
        "sampling seeds of one trained model each, so the interval covers sampling noise, not training "
        "noise.",
        "",
        markdown_paired_table(diffs),
        "",
    ]


def _example_counts(results: Mapping[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in results["models"].values():
        for dataset, cell in entry["datasets"].items():
            if "n_examples" in cell:
                counts.setdefault(dataset, cell["n_examples"])
    return counts


def plot_rouge(results: Mapping[str, Any], path: Path) -> None:
    """Grouped bars (one group per dataset plus the average, one bar per model) with std error bars."""
    # Figure + the Agg canvas directly rather than pyplot: no global backend switch, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [*results["datasets"], AVERAGE]
    models = list(results["models"])
    width = 0.8 / max(len(models), 1)
    fig = Figure(figsize=(max(6.0, 1.6 * len(groups) * max(1, len(models)) ** 0.5), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, model in enumerate(models):
        entry = results["models"][model]
        cells = [entry.get(AVERAGE) if g == AVERAGE else entry["datasets"].get(g) for g in groups]
        means = [c["mean"] if c else math.nan for c in cells]
        stds = [c["std"] if c else 0.0 for c in cells]
        xs = [g + (i - (len(models) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=model)
    ax.set_xticks(range(len(groups)), ["Average" if g == AVERAGE else g for g in groups])
    ax.set_ylabel("ROUGE-L")
    ax.set_title("ROUGE-L, mean ± std over seeds", fontsize="medium")
    ax.margins(y=0.15)  # headroom so the legend does not cover the tallest bars
    ax.grid(axis="y", alpha=0.3)
    if models:
        ax.legend(fontsize="small", ncols=min(len(models), 3))
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a crash never leaves a half-written file under ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(results: Mapping[str, Any], out: Path) -> None:
    """results.json, results.md and rougeL.png under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / RESULTS_JSON, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(out / RESULTS_MD, markdown_table(results))
    plot_rouge(results, out / RESULTS_PNG)
    log.info("wrote %s, %s and %s in %s", RESULTS_JSON, RESULTS_MD, RESULTS_PNG, out)


def load_results(folder: str | Path) -> dict[str, Any]:
    path = Path(folder)
    if path.is_dir():
        path = path / RESULTS_JSON
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(
            f"{path} does not exist", "give --compare the --out folders of earlier 'todi eval' runs"
        ) from None
    except json.JSONDecodeError as err:
        raise UsageError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(results, dict) or not isinstance(results.get("models"), dict):
        raise UsageError(f"{path} is not a 'todi eval' results file (no 'models' mapping)")
    return results


def merge_results(folders: Sequence[str | Path]) -> dict[str, Any]:
    """One results mapping from several results.json files, averages recomputed over all their datasets.

    A model name met again is merged when the two hold different datasets (one model evaluated in parts);
    when they overlap the later one is renamed ``name (folder)`` so neither result is lost.
    """
    scores: dict[str, dict[str, dict[int, float]]] = {}
    n_examples: dict[str, dict[str, int]] = {}
    paths: dict[str, str] = {}
    datasets: list[str] = []
    seeds: set[int] = set()
    sources = []
    for folder in folders:
        results = load_results(folder)
        sources.append({"folder": str(folder), "settings": results.get("settings", {})})
        datasets += [d for d in results.get("datasets", []) if d not in datasets]
        for model, per_dataset in scores_from_results(results).items():
            name = model
            if model in scores and set(scores[model]) & set(per_dataset):
                name = f"{model} ({Path(folder).name or folder})"
            scores.setdefault(name, {}).update(per_dataset)
            entry = results["models"][model]
            for dataset, cell in entry["datasets"].items():
                datasets += [dataset] if dataset not in datasets else []
                seeds.update(int(s) for s in cell["seeds"])
                if "n_examples" in cell:
                    n_examples.setdefault(name, {})[dataset] = cell["n_examples"]
            if "path" in entry:
                paths.setdefault(name, entry["path"])
    distinct = {json.dumps(s["settings"], sort_keys=True) for s in sources}
    if len(distinct) > 1:
        log.warning("the compared folders used different generation settings; see 'sources' in results.json")
    return {
        "metric": "rougeL",
        "datasets": datasets,
        "seeds": sorted(seeds),
        "models": summarize(scores, datasets, n_examples=n_examples, paths=paths),
        "sources": sources,
    }
