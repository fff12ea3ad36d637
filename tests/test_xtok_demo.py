"""experiments/xtok_demo: its tokenizers (hand-checked pieces and offsets), and the --quick profile end to
end (run, resume, report; the report's paired numbers recomputed here from the result files)."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
STUDY = HERE.parent / "experiments" / "xtok_demo"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"xtok_demo_{name}", STUDY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tokenizers_split_as_documented():
    import yaml

    from todi.xtok import align, target_boundaries

    run = _module("run")
    patterns = yaml.safe_load((STUDY / "config.yaml").read_text())["tokenizers"]
    texts = ["mango , banana", "48", "reverse the order of : knife"]
    words, pieces = (run.regex_tokenizer(patterns[n], texts) for n in ("words", "pieces"))
    assert words.tokenize("mango , banana") == ["mango", " ,", " banana"]
    assert pieces.tokenize("mango , banana") == ["mang", "o", " ,", " bana", "na"]
    assert pieces.tokenize("48") == ["4", "8"] and words.tokenize("48") == ["48"]
    # Every character lies in a token, so word starts are boundaries on both sides.
    enc = {n: t("mango , banana", add_special_tokens=False, return_offsets_mapping=True) for n, t in
           (("words", words), ("pieces", pieces))}  # fmt: skip
    assert enc["pieces"]["offset_mapping"] == [(0, 4), (4, 5), (5, 7), (7, 12), (12, 14)]
    b = {n: target_boundaries(e["offset_mapping"], 14, with_eos=True) for n, e in enc.items()}
    assert align(b["pieces"], b["words"]) == [(0, 0), (2, 1), (3, 2), (5, 3)]  # "o" and "na" are inside words
    assert words.decode(words("mango , banana", add_special_tokens=False)["input_ids"]) == "mango , banana"


@pytest.mark.slow
def test_quick_profile_runs_resumes_and_reports(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, str(STUDY / "run.py"), "--out", str(out), "--quick", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), "TODI_CACHE": str(tmp_path / "cache")}
    env["TODI_COMPILE"] = "0"
    first = subprocess.run(command, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    run = _module("run")
    config = run.load_config(STUDY / "config.yaml", quick=True)
    cells = [(v, s) for v in config["variants"] for s in range(config["student_seeds"])]
    scores: dict[str, dict[int, float]] = {}
    stamps = {}
    for variant, seed in cells:
        path = out / "results" / variant / f"seed{seed}.json"
        cell = json.loads(path.read_text())
        assert cell["variant"] == variant and cell["seed"] == seed and 0 <= cell["rougeL"] <= 100
        scores.setdefault(variant, {})[seed] = cell["rougeL"]
        stamps[path] = path.stat().st_mtime_ns
    pair = json.loads((out / "results" / "pair.json").read_text())["pieces"]
    assert 0 < pair["aligned_positions"] < pair["student_positions"] and pair["vocab"]["matched"] > 0
    assert 0 < pair["teacher_matched_mass"]["T=1"]["mean"] < 1
    second = subprocess.run(command, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{len(cells)} cells, {len(cells)} finished earlier, 0 to run" in second.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    doc, summary = tmp_path / "doc.md", tmp_path / "summary.json"
    doc.write_text("# title\n\nkept\n")
    report = [sys.executable, str(STUDY / "report.py"), str(out), "--doc", str(doc), "--json", str(summary)]
    for _ in range(2):  # the second run replaces its section, not appends another
        done = subprocess.run(report, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    text = doc.read_text()
    assert text.startswith("# title\n\nkept\n") and text.count("<!-- xtok_demo: begin -->") == 1
    assert f"all {len(cells)} cells finished" in text
    paired = {(d["name"], d["reference"]): d for d in json.loads(summary.read_text())["paired"]}
    for variant in ("hybrid-todi", "uld"):
        diffs = [scores[variant][s] - scores["sft"][s] for s in sorted(scores["sft"])]
        d = paired[(variant, "sft")]
        assert d["mean"] == pytest.approx(statistics.fmean(diffs)) and d["n"] == len(diffs)
        assert f"| {variant} − sft | {d['mean']:+.1f} |" in text
