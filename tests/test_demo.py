"""The demo's embedded data and its pipeline on a micro profile (the real profiles are timed by hand)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from todi import demo, demo_report, demo_tasks
from todi.cli import main
from todi.data import load_examples


def test_generator_is_deterministic_and_balanced():
    rows = demo_tasks.generate(80, seed=3)
    assert rows == demo_tasks.generate(80, seed=3)
    assert rows != demo_tasks.generate(80, seed=4)
    tasks = [row["task"] for row in rows]
    assert {tasks.count(name) for name in demo_tasks.TASKS} == {10}


@pytest.mark.parametrize("seed", [0, 1])
def test_answers_are_checkable(seed):
    for row in demo_tasks.generate(400, seed):
        words = row["instruction"].split()
        assert row["output"] in row["references"]
        if row["task"] == "arithmetic":
            if words[0] == "add":
                assert int(row["output"]) == int(words[1]) + int(words[3])
            else:
                assert int(row["output"]) == int(words[0]) - int(words[2])
        elif row["task"] == "sort":
            items = row["instruction"].split(" : ")[1].split()
            assert row["output"].split() == sorted(items)
        elif row["task"] == "reverse":
            items = row["instruction"].split(" : ")[1].split()
            assert row["output"].split() == items[::-1]
        elif row["task"] == "spell":
            assert row["output"].replace(" ", "") == words[1]
        elif row["task"] == "name_one":
            assert set(row["references"]) == set(demo_tasks.CATEGORIES[words[-1]])


def test_tokenizer_covers_every_generated_word():
    tokenizer = demo_tasks.build_tokenizer()
    vocab = set(demo_tasks.vocabulary())
    assert len(tokenizer) == len(vocab)
    for row in demo_tasks.generate(600, seed=5):
        text = demo_tasks.PROMPT_TEMPLATE.format(instruction=row["instruction"]) + " " + row["output"]
        assert set(text.split()) <= vocab
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text


def test_splits_load_with_the_data_loader(tmp_path):
    paths = demo_tasks.write_splits(tmp_path, train=40, dev=8, test=16, seed=0)
    train, test = load_examples(paths["train"]), load_examples(paths["test"])
    assert len(train) == 40 and len(test) == 16
    assert all(len(example.references) == 1 for example in train)
    # held-out examples keep every right answer, so ROUGE-L takes the best match
    naming = [e for e in test if e.instruction.startswith("name ")]
    assert naming and all(len(e.references) == 10 for e in naming)


def _fit_float64(teacher, student, test, unlikely: float) -> dict[str, float]:
    """CE of the reference answers, KL(p || q), KL(q || p) and the student's mass where p < ``unlikely``, at
    T = 1 over the supervised answer positions, in float64 (teacher forcing). The CE is checked against the
    model's own shifted loss, so the positions are right."""
    from transformers import AutoModelForCausalLM

    from todi.data import DataCollator, encode_examples

    tokenizer = demo_tasks.build_tokenizer()
    features, _ = encode_examples(
        load_examples(test),
        tokenizer,
        template=demo_tasks.PROMPT_TEMPLATE,
        max_length=64,
        max_prompt_length=48,
    )
    batch = DataCollator(tokenizer.pad_token_id)(features)
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    models = [AutoModelForCausalLM.from_pretrained(path).double() for path in (teacher, student)]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    lp, lq = (m(**inputs).logits[:, :-1][keep].log_softmax(-1).detach() for m in models)
    ce = -lq.gather(-1, labels[keep][:, None]).mean().item()
    # (transformers computes its loss in float32)
    assert ce == pytest.approx(models[1](**inputs, labels=batch["labels"]).loss.item(), rel=1e-6)
    return {
        "ce": ce,
        "fkl": (lp.exp() * (lp - lq)).sum(-1).mean().item(),
        "rkl": (lq.exp() * (lq - lp)).sum(-1).mean().item(),
        "unlikely_mass": (lq.exp() * (lp.exp() < unlikely)).sum(-1).mean().item(),
    }


def test_demo_end_to_end_on_a_micro_profile(tmp_path, monkeypatch):
    micro = demo.Profile(
        train_examples=64, test_examples=8, eval_seeds=(10,), teacher_layers=1, teacher_hidden=32,
        teacher_steps=4, student_layers=1, student_hidden=32, student_steps=3, batch_size=8,
        dev_examples=8, dev_evals=3,
    )  # fmt: skip
    monkeypatch.setitem(demo.PROFILES, "quick", micro)
    monkeypatch.setenv("TODI_COMPILE", "0")
    out, cache = tmp_path / "demo", tmp_path / "cache"
    assert main(["demo", "--quick", "--out", str(out), "--cache-dir", str(cache)]) == 0
    for name in ("report.md", "loss.png", "rougeL.png", "todi_weights.png", "results.json"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"teacher", "sft", "fkl", "rkl", "todi", "fkl-on", "todi-on"}
    report = (out / "report.md").read_text()
    assert "| todi |" in report and "trained in this run" in report
    # the on-policy students trained on their own samples at every step, and the report pairs them by seed
    for name in ("fkl-on", "todi-on"):
        records = [
            r
            for r in map(
                json.loads, (out / "runs" / name / "seed0" / "metrics.jsonl").read_text().splitlines()
            )
            if "loss" in r
        ]
        assert records and all(r["generated"] == 1.0 and r["ce"] == 0.0 for r in records), name
    diff = results["todi-on"]["rougeL_per_run"][0] - results["todi"]["rougeL_per_run"][0]
    assert "On-policy distillation" in report and f"| todi-on (λ 1) − todi (λ 0) | {diff:+.1f} |" in report
    # every student is the checkpoint with the best dev ROUGE-L of its run, scored at steps 1, 2 and 3: the
    # weights evaluated are those of the kept checkpoint at the step the report names
    from safetensors.torch import load_file

    for name in ("sft", "fkl", "rkl", "todi"):
        run = out / "runs" / name / "seed0"
        scores = [
            r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "dev_rougeL" in r
        ]
        assert [r["step"] for r in scores] == [1, 2, 3]
        (step,) = results[name]["steps"]
        best = load_file(run / "best" / "model.safetensors")
        saved = load_file(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors")
        saved = {key.removeprefix("student."): value for key, value in saved.items()}
        assert best.keys() <= saved.keys()
        assert all(torch.equal(best[key], saved[key]) for key in best), name
        assert next(r for r in scores if r["step"] == step)["dev_rougeL"] == max(
            r["dev_rougeL"] for r in scores
        )
    assert "Checkpoints chosen by dev ROUGE-L" in report
    # the held-out fit to the teacher, recomputed here in float64 from the two models
    teacher = next((cache / "demo").glob("teacher-*/final"))
    student = out / "runs" / "fkl" / "seed0" / "best"
    test = out / "data" / "test.jsonl"
    expected = _fit_float64(teacher, student, test, demo_report.UNLIKELY)
    for key, value in expected.items():
        assert results["fkl"]["fit"][key]["mean"] == pytest.approx(value, rel=1e-4, abs=1e-6), key
        assert results["fkl"]["fit"][key]["std"] == 0.0  # one training seed
    # a threshold near 1 / V puts tokens on both sides of it, so the mass check has something to count
    near = 1.0 / len(demo_tasks.vocabulary())
    fit = demo_report.heldout_fit(teacher, {"fkl": student}, test, max_examples=8, unlikely=near)["fkl"]
    reference = _fit_float64(teacher, student, test, near)
    assert 0.01 < reference["unlikely_mass"] < 0.99
    assert fit["unlikely_mass"] == pytest.approx(reference["unlikely_mass"], rel=1e-4)
    assert "Held-out fit to the teacher" in report and "closer to the teacher than the SFT-only" in report
    # the second run takes the cached teacher
    assert main(["demo", "--quick", "--out", str(out), "--cache-dir", str(cache)]) == 0
    assert "from the cache" in (out / "report.md").read_text()


def test_demo_refuses_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "something.txt").write_text("mine")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "not a todi demo folder" in capsys.readouterr().err
    assert (tmp_path / "something.txt").read_text() == "mine"


def test_a_profile_without_dev_scoring_is_refused():
    from todi.errors import UsageError

    sizes = dict(
        train_examples=64, test_examples=8, eval_seeds=(10,), teacher_layers=1, teacher_hidden=32,
        teacher_steps=4, student_layers=1, student_hidden=32, student_steps=3,
    )  # fmt: skip
    for bad in ({"dev_evals": 0}, {"dev_examples": 0}):
        with pytest.raises(UsageError, match="dev_evals >= 1 and dev_examples >= 1"):
            demo.Profile(**sizes, **bad)
    assert demo.Profile(**sizes, dev_evals=2).dev_every == 1
    assert demo.Profile(**{**sizes, "student_steps": 400}).dev_every == 100


def _numpy_paired(a: list[float], b: list[float], resamples: int = 10_000, seed: int = 0):
    """a - b from the definitions: mean and the percentile bootstrap of the mean over the pairs (numpy's
    default_rng(seed) drawing resample indices), and the win/loss counts."""
    import numpy as np

    d = np.asarray(a) - np.asarray(b)
    idx = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))
    low, high = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
    return d.mean(), low, high, int((d > 0).sum()), int((d < 0).sum())


def test_report_has_paired_differences_to_todi(tmp_path):
    per_seed = {
        "sft": [20.1, 25.3, 18.7, 22.0, 19.5],
        "rkl": [28.0, 30.2, 24.9, 27.5, 29.9],
        "todi": [30.5, 31.0, 27.2, 29.0, 33.4],
    }
    results = {
        name: {"rougeL": sum(v) / 5, "rougeL_std": 1.0, "exact": 5.0, "exact_std": 1.0, "rougeL_per_run": v}
        for name, v in per_seed.items()
    }
    results["teacher"] = {"rougeL": 42.0, "rougeL_std": 0.5, "exact": 30.0, "exact_std": 1.0}
    profile = dataclasses.asdict(demo.PROFILES["quick"]) | {"student_seeds": (0, 1, 2, 3, 4)}
    profile |= {"teacher_data": 1, "dev_every": 50, "dev_seed": demo.DEV_SEED}
    (tmp_path / "runs").mkdir()
    demo_report.write_report(
        tmp_path, results=results, runs=tmp_path / "runs", teacher=tmp_path, student=None, test=tmp_path,
        profile=profile, elapsed=1.0, teacher_seconds=0.0, quick=True,
    )  # fmt: skip
    text = (tmp_path / "report.md").read_text()
    saved = {d["name"]: d for d in json.loads((tmp_path / "results.json").read_text())["paired_vs_todi"]}
    assert set(saved) == {"sft", "rkl"}
    for name in ("sft", "rkl"):
        mean, low, high, wins, losses = _numpy_paired(per_seed[name], per_seed["todi"])
        assert saved[name]["mean"] == pytest.approx(mean, abs=1e-12)
        assert (saved[name]["low"], saved[name]["high"]) == pytest.approx((low, high), abs=1e-12)
        assert (saved[name]["wins"], saved[name]["losses"]) == (wins, losses)
        assert f"| {name} − todi | {mean:+.1f} | {low:+.1f}..{high:+.1f} | {wins} / {losses} / 0 |" in text
    # todi wins every seed against sft: the interval excludes 0 and the sentence names the winner.
    assert "todi beats sft by +" in text
