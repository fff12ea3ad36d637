"""experiments/ablation_demo: the report against hand-made run files (numbers recomputed here with numpy),
and the --quick profile end to end (run, resume, report)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
STUDY = HERE.parent / "experiments" / "ablation_demo"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"ablation_{name}", STUDY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _numpy_paired(a, b, resamples: int = 10_000, seed: int = 0):
    d = np.asarray(a) - np.asarray(b)
    idx = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))
    low, high = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
    return d.mean(), low, high, int((d > 0).sum()), int((d < 0).sum())


VARIANTS = {
    "todi": {"loss": "todi"},
    "todi-beta0.5": {"loss": "todi", "beta": 0.5},
    "todi-beta2": {"loss": "todi", "beta": 2.0},
    "todi-hard": {"loss": "todi", "todi_weight": "hard"},
    "fkl": {"loss": "fkl"},
}


def _fake_run(out: Path, scores: dict[str, list[float]], efficiency: dict | None) -> None:
    run = _module("run")
    config = {
        "profile": "default", "seed": 0, "student_seeds": 6, "reference": "todi",
        "variants": VARIANTS, "efficiency": {"cache_top_k": 64, "repeats": 3},
    }  # fmt: skip
    info = {"config": config, "machine": "test", "torch": "x", "torch_threads": 1, "wall_s": 60.0}
    (out / "results").mkdir(parents=True)
    (out / "run_info.json").write_text(json.dumps(info))
    for variant, values in scores.items():
        for seed, value in enumerate(values):
            cell = {"variant": variant, "seed": seed, "objective": run.variant_options(VARIANTS[variant]),
                    "rougeL": value, "exact": 10.0 + seed, "best_step": 100 * (1 + seed % 4)}  # fmt: skip
            (out / "results" / variant).mkdir(exist_ok=True)
            (out / "results" / variant / f"seed{seed}.json").write_text(json.dumps(cell))
    (out / "results" / "teacher.json").write_text(
        json.dumps({"rougeL": 42.9, "rougeL_std": 0.4, "exact": 30.1})
    )
    if efficiency:
        (out / "efficiency.json").write_text(json.dumps(efficiency))


def test_report_tables_paired_numbers_and_reading(tmp_path):
    rng = np.random.default_rng(0)
    todi = list(rng.normal(30, 4, 6))
    scores = {
        "todi": todi,
        "todi-beta0.5": [t + e for t, e in zip(todi, rng.normal(0, 1.5, 6))],  # noise around todi
        "todi-beta2": [t - 3 + e for t, e in zip(todi, rng.normal(0, 0.5, 6))],  # clearly worse
        "todi-hard": [t + e for t, e in zip(todi, rng.normal(0, 2, 6))][:4],  # only 4 seeds finished
        "fkl": [t - 5 + e for t, e in zip(todi, rng.normal(0, 1, 6))],
    }
    step = {"cpu_s": 0.02, "step_s": 0.03, "peak_mib": 12.5}
    efficiency = {
        "objectives": ["sft", "todi"], "repeats": 3, "memory": "VmHWM",
        "pairs": {"demo": {"shape": "tiny", "supervised_positions": 64,
                           "online": {"sft": step, "todi": {**step, "cpu_s": 0.05}},
                           "cache": {"sft": step, "todi": {**step, "cpu_s": 0.04, "peak_mib": 20.0}}}},
    }  # fmt: skip
    _fake_run(tmp_path / "run", scores, efficiency)
    report = _module("report")
    doc = tmp_path / "docs" / "ablation.md"
    text = report.write(tmp_path / "run", doc)
    assert doc.read_text() == text
    assert (doc.parent / "figures" / "ablation_beta.png").read_bytes()[:4] == b"\x89PNG"
    assert "**partial: 28 of 30 cells finished**" in text
    for variant, values in scores.items():
        row = f"| {variant} | "
        line = next(line for line in text.splitlines() if line.startswith(row))
        assert f"| {len(values)} | {np.mean(values):.1f} ± {np.std(values, ddof=1):.1f} |" in line
        if variant == "todi":
            continue
        n = len(values)
        mean, low, high, wins, losses = _numpy_paired(values, todi[:n])
        assert f"| {variant} − todi | {mean:+.1f} | {low:+.1f}..{high:+.1f} | {wins} / {losses} / 0 |" in text
    # The reading is composed from the intervals: beta 2 and FKL are detected as worse, beta 0.5 is not.
    assert "todi beats todi-beta2 by +" in text and "todi beats fkl by +" in text
    assert "No difference detected for todi-beta0.5" in text
    # Efficiency: CPU ms, the ratio to SFT and cache/online, peak MiB.
    assert "| todi | 50.0 | 2.50 | 40.0 | 0.80 | 30.0 | 30.0 | 12.5 | 20.0 |" in text


@pytest.mark.slow
def test_quick_profile_runs_resumes_and_reports(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, str(STUDY / "run.py"), "--out", str(out), "--quick", "--threads", "1"]
    env_path = str(HERE.parent / "src")
    import os

    env = {**os.environ, "PYTHONPATH": env_path, "TODI_CACHE": str(Path.home() / ".cache" / "todi")}
    first = subprocess.run(command, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    run = _module("run")
    config = run.load_config(STUDY / "config.yaml", quick=True)
    cells = [(v, s) for v in config["variants"] for s in range(config["student_seeds"])]
    stamps = {}
    for variant, seed in cells:
        path = out / "results" / variant / f"seed{seed}.json"
        cell = json.loads(path.read_text())
        assert cell["variant"] == variant and cell["seed"] == seed and 0 <= cell["rougeL"] <= 100
        stamps[path] = path.stat().st_mtime_ns
    # Every variant trained the same student initialisation and data for a seed: the runs record it.
    efficiency = json.loads((out / "efficiency.json").read_text())
    assert set(efficiency["pairs"]) == {"demo", "smollm2"}
    # A second invocation finds every cell finished and retrains nothing.
    second = subprocess.run(command, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{len(cells)} finished earlier, 0 to run" in second.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    doc = tmp_path / "ablation.md"
    report = subprocess.run(
        [sys.executable, str(STUDY / "report.py"), str(out), "--doc", str(doc)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    text = doc.read_text()
    assert f"all {len(cells)} cells finished" in text and "| todi-hard − todi |" in text
