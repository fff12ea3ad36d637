"""todi.evaluation: ROUGE-L scoring, seeded batched generation, and the `todi eval` command end to end.

Models are tiny random Llamas with the shared GPT-2 tokenizer; the end-to-end tests use the first few
Dolly test examples from the shared data and skip when it is absent.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny import llama_config
from todi import evaluation
from todi.cli import main
from todi.data import DataError, Example, encode_prompt, resolve_data_root
from todi.evaluation import (
    GenerationSettings,
    evaluate_model,
    generate,
    load_model,
    rouge_l,
    score_predictions,
)

TOKENIZER = Path(
    os.environ.get("TODI_TOKENIZER", Path(__file__).resolve().parents[2] / "shared/tokenizers/gpt2")
)
EOS = 50256  # <|endoftext|>
try:
    DATA_ROOT = resolve_data_root()
except DataError:  # TODI_DATA names no folder: the data tests skip rather than break collection
    DATA_ROOT = None
needs_data = pytest.mark.skipif(
    DATA_ROOT is None or not (DATA_ROOT / "dolly/test.jsonl").is_file(),
    reason="shared data not found (set TODI_DATA or provide ../shared/data)",
)
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # tiny models


EXAMPLES = [
    Example("Name three primary colours.", references=("Red, yellow and blue.",)),
    Example(
        "Summarise the text in one sentence.",
        "The cat sat on the mat all afternoon, watching birds outside the window and ignoring its dinner.",
        references=("A cat watched birds instead of eating.",),
    ),
    Example("What is 2 + 2?", references=("4", "four")),
]


# --------------------------------------------------------------------------------------------------
# ROUGE-L
# --------------------------------------------------------------------------------------------------


def test_rouge_l_hand_checkable_cases() -> None:
    assert rouge_l("the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert rouge_l("dogs bark loudly", ["the cat sat"]) == 0.0
    assert rouge_l("", ["the cat sat"]) == 0.0
    # LCS "the cat" = 2 of 4 tokens on each side: P = R = F = 0.5.
    assert rouge_l("the cat ran away", ["the cat sat down"]) == pytest.approx(50.0)


def test_rouge_l_matches_rouge_score() -> None:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = [
        ("The quick brown foxes jumped over the lazy dogs.", "A quick brown fox jumps over a lazy dog"),
        ("Paris is the capital of France.", "The capital of France is Paris."),
        ("Running runners ran.", "run"),
        ("1. Eggs\n2. Flour\n3. Sugar", "eggs, flour, sugar and butter"),
    ]
    for prediction, reference in pairs:
        expected = 100 * scorer.score(reference, prediction)["rougeL"].fmeasure
        assert rouge_l(prediction, [reference]) == pytest.approx(expected)


def test_rouge_l_takes_the_best_reference() -> None:
    prediction = "the answer is four"
    scores = [rouge_l(prediction, [ref]) for ref in ("4", "four", "the answer is 4")]
    assert rouge_l(prediction, ["4", "four", "the answer is 4"]) == pytest.approx(max(scores))
    assert rouge_l(prediction, "the answer is four") == pytest.approx(100.0)  # a bare string is one reference
    with pytest.raises(ValueError):
        rouge_l(prediction, [])


def test_score_predictions_mean_and_per_example() -> None:
    mean, per_example = score_predictions(["Red, yellow and blue.", "nothing alike", "four"], EXAMPLES)
    assert per_example[0] == pytest.approx(100.0) and per_example[2] == pytest.approx(100.0)
    assert per_example[1] == 0.0
    assert mean == pytest.approx(200.0 / 3)
    with pytest.raises(ValueError):
        score_predictions(["one"], EXAMPLES)


# --------------------------------------------------------------------------------------------------
# Generation with a tiny random model
# --------------------------------------------------------------------------------------------------


def _tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    tokenizer.eos_token = tokenizer.bos_token = "<|endoftext|>"  # the bare tokenizer.json names neither
    return tokenizer


def _tiny_llama(seed: int = 0, vocab: int = 50257):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = llama_config(vocab, 32, max_positions=512, eos=EOS)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = EOS
    return model


@pytest.fixture(scope="module")
def tiny():
    if not TOKENIZER.is_dir():
        pytest.skip(f"GPT-2 tokenizer not found at {TOKENIZER}")
    return _tiny_llama(), _tokenizer()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny) -> Path:
    """The tiny model and tokenizer saved as a folder, so load_model(path) is exercised."""
    model, tokenizer = tiny
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


SAMPLE = GenerationSettings(max_new_tokens=8, batch_size=2)
GREEDY = GenerationSettings(max_new_tokens=8, do_sample=False, batch_size=2)


def test_fixed_seed_gives_identical_predictions(tiny) -> None:
    model, tokenizer = tiny
    first = generate(model, tokenizer, EXAMPLES, settings=SAMPLE, seed=10)
    second = generate(model, tokenizer, EXAMPLES, settings=SAMPLE, seed=10)
    assert first == second
    assert len(first) == len(EXAMPLES) and all(isinstance(p, str) and p for p in first)


def test_different_seeds_differ(tiny) -> None:
    model, tokenizer = tiny
    assert generate(model, tokenizer, EXAMPLES, settings=SAMPLE, seed=10) != generate(
        model, tokenizer, EXAMPLES, settings=SAMPLE, seed=20
    )


def test_generation_leaves_caller_rng_and_train_mode_alone(tiny) -> None:
    model, tokenizer = tiny
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model.train()
    try:
        generate(model, tokenizer, EXAMPLES[:1], settings=SAMPLE, seed=10)
        assert model.training
    finally:
        model.eval()
    assert torch.equal(torch.rand(3), expected)


def _manual_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Argmax decoding without cache or generate(): the reference greedy_decode must reproduce."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == EOS:
                break
    return ids[len(prompt) :]


def test_greedy_is_deterministic_and_matches_manual_decode(tiny) -> None:
    model, tokenizer = tiny
    settings = GenerationSettings(max_new_tokens=8, do_sample=False, no_repeat_ngram_size=0, batch_size=1)
    first = generate(model, tokenizer, EXAMPLES[:1], settings=settings, seed=1)
    assert generate(model, tokenizer, EXAMPLES[:1], settings=settings, seed=2) == first
    prompt = encode_prompt(EXAMPLES[0], tokenizer)
    manual = tokenizer.decode(_manual_greedy(model, prompt, 8), skip_special_tokens=True).strip()
    assert first == [manual]


def _tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=50257, n_positions=512, n_embd=32, n_layer=2, n_head=4, bos_token_id=EOS, eos_token_id=EOS
    )
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padding_does_not_change_greedy_tokens(tiny, family, monkeypatch) -> None:
    """The short prompt's answer ids are the same alone and batched (left-padded) with a longer prompt.

    This needs position ids that skip the padding: GPT-2 (learned absolute positions) would break first.
    """
    model, tokenizer = tiny
    if family == "gpt2":
        model = _tiny_gpt2()
    short, long = EXAMPLES[0], EXAMPLES[1]
    captured: list[list[int]] = []
    real_decode = tokenizer.batch_decode

    def spy(sequences, **kwargs):
        captured.extend(list(s) for s in sequences)
        return real_decode(sequences, **kwargs)

    monkeypatch.setattr(tokenizer, "batch_decode", spy)
    generate(model, tokenizer, [short], settings=GREEDY, seed=0)
    alone = captured[-1]
    captured.clear()
    batched_settings = GenerationSettings(max_new_tokens=8, do_sample=False, batch_size=2)
    generate(model, tokenizer, [short, long], settings=batched_settings, seed=0)
    # Batches are ordered longest prompt first, so the short one is the second row.
    assert len(captured) == 2 and captured[1] == alone
    assert len(encode_prompt(long, tokenizer)) > len(encode_prompt(short, tokenizer))


def test_evaluate_model_returns_mean_and_predictions(tiny) -> None:
    model, tokenizer = tiny
    mean, predictions = evaluate_model(model, tokenizer, EXAMPLES, settings=SAMPLE, seed=10)
    assert predictions == generate(model, tokenizer, EXAMPLES, settings=SAMPLE, seed=10)
    assert mean == pytest.approx(score_predictions(predictions, EXAMPLES)[0])
    assert 0.0 <= mean <= 100.0


def test_load_model_from_folder(saved_model, tiny) -> None:
    model, tokenizer = load_model(str(saved_model), device="cpu")
    assert not model.training
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    assert model.dtype == torch.float32
    reference_model, reference_tokenizer = tiny
    assert generate(model, tokenizer, EXAMPLES, settings=SAMPLE, seed=3) == generate(
        reference_model, reference_tokenizer, EXAMPLES, settings=SAMPLE, seed=3
    )


def test_load_model_missing_folder_is_a_user_error(tmp_path) -> None:
    from todi.errors import TodiError

    # The tokenizer loads first (cheap), so it is the one that reports the missing folder, by name.
    with pytest.raises(TodiError, match=r"cannot load the tokenizer of .*nothing-here"):
        load_model(str(tmp_path / "nothing-here"), device="cpu")


def test_display_name_uses_last_two_path_parts(tmp_path) -> None:
    assert evaluation.display_name("runs/todi/final") == "todi-final"
    assert evaluation.display_name("gpt2") == "gpt2"
    assert evaluation.display_name(str(tmp_path / "a" / "b")) == "a-b"


# --------------------------------------------------------------------------------------------------
# `todi eval` end to end
# --------------------------------------------------------------------------------------------------


def _eval_args(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "eval",
        "--model",
        str(model),
        "--data",
        "dolly",
        "--data-root",
        str(DATA_ROOT),
        "--seeds",
        "10,20",
        "--max-examples",
        "10",
        "--max-new-tokens",
        "8",
        "--batch-size",
        "5",
        "--device",
        "cpu",
        "--name",
        "tiny",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def eval_out(saved_model, tmp_path_factory) -> Path:
    """One `todi eval` run (10 Dolly examples, seeds 10 and 20), shared by the tests below (read-only)."""
    if DATA_ROOT is None or not (DATA_ROOT / "dolly/test.jsonl").is_file():
        pytest.skip("shared data not found (set TODI_DATA or provide ../shared/data)")
    out = tmp_path_factory.mktemp("eval") / "out"
    assert main(_eval_args(saved_model, out)) == 0
    return out


def _copy(eval_out: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(eval_out, out)
    return out


@needs_data
def test_cli_eval_writes_all_outputs(eval_out) -> None:
    out = eval_out
    for seed in (10, 20):
        lines = (out / f"predictions/tiny/dolly/seed{seed}.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines]
        assert len(rows) == 10
        assert set(rows[0]) == {"instruction", "input", "references", "prediction", "rougeL"}
        assert isinstance(rows[0]["references"], list)
    results = json.loads((out / "results.json").read_text())
    cell = results["models"]["tiny"]["datasets"]["dolly"]
    assert set(cell["seeds"]) == {"10", "20"} and cell["n_examples"] == 10
    assert cell["mean"] == pytest.approx(sum(cell["seeds"].values()) / 2)
    assert cell["std"] == pytest.approx(abs(cell["seeds"]["10"] - cell["seeds"]["20"]) / 2)
    assert results["models"]["tiny"]["average"]["mean"] == pytest.approx(cell["mean"])
    table = (out / "results.md").read_text()
    assert "| model | dolly | Average |" in table and f"{cell['mean']:.2f} ± {cell['std']:.2f}" in table
    assert (out / "rougeL.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob("*.tmp"))


@needs_data
def test_rerun_skips_finished_cells(saved_model, eval_out, tmp_path, monkeypatch) -> None:
    out = _copy(eval_out, tmp_path)
    calls = []
    monkeypatch.setattr(evaluation, "_sample", lambda *a, **k: calls.append(a) or [])
    monkeypatch.setattr(evaluation, "load_model", lambda *a, **k: calls.append(a) or (None, None))
    mtime = (out / "predictions/tiny/dolly/seed10.jsonl").stat().st_mtime_ns
    assert main(_eval_args(saved_model, out)) == 0
    assert calls == []  # nothing generated, the model not even loaded
    assert (out / "predictions/tiny/dolly/seed10.jsonl").stat().st_mtime_ns == mtime
    before = json.loads((eval_out / "results.json").read_text())
    assert json.loads((out / "results.json").read_text())["models"] == before["models"]


@needs_data
def test_resume_computes_only_missing_cells(saved_model, eval_out, tmp_path, monkeypatch) -> None:
    out = _copy(eval_out, tmp_path)
    (out / "predictions/tiny/dolly/seed20.jsonl").unlink()
    real_sample = evaluation._sample
    seeds_run = []

    def counting(model, tokenizer, examples, settings, seed, *args, **kwargs):
        seeds_run.append(seed)
        return real_sample(model, tokenizer, examples, settings, seed, *args, **kwargs)

    monkeypatch.setattr(evaluation, "_sample", counting)
    assert main(_eval_args(saved_model, out)) == 0
    assert seeds_run == [20]
    # Same seed, same model: the recomputed cell equals the deleted one.
    before = json.loads((eval_out / "results.json").read_text())
    assert json.loads((out / "results.json").read_text())["models"] == before["models"]


@needs_data
def test_changed_settings_are_refused_in_the_same_out(saved_model, eval_out, tmp_path, capsys) -> None:
    out = _copy(eval_out, tmp_path)
    assert main(_eval_args(saved_model, out, "--top-p", "0.9")) == 2
    assert "top_p 1.0 -> 0.9" in capsys.readouterr().err
    assert main(_eval_args(saved_model, out, "--max-examples", "5")) == 2
    assert "max_examples 10 -> 5" in capsys.readouterr().err


@needs_data
def test_a_cell_for_other_examples_is_an_error_not_overwritten(
    saved_model, eval_out, tmp_path, capsys
) -> None:
    out = _copy(eval_out, tmp_path)
    cell = out / "predictions/tiny/dolly/seed10.jsonl"
    cell.write_text("".join(cell.read_text().splitlines(keepends=True)[:-1]))  # as if the data had changed
    before = cell.read_text()
    assert main(_eval_args(saved_model, out)) == 2
    assert "seed10.jsonl does not hold predictions for the current examples" in capsys.readouterr().err
    assert cell.read_text() == before


@needs_data
def test_missing_dataset_name_lists_the_names_found(tmp_path, capsys) -> None:
    code = main(
        [
            "eval",
            "--model",
            "unused",
            "--data",
            "dolly,nosuchset",
            "--data-root",
            str(DATA_ROOT),
            "--out",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "nosuchset" in err and "dolly" in err and "self-inst" in err and "vicuna" in err


def test_missing_dataset_name_with_a_local_root(tmp_path) -> None:
    for name in ("alpha", "beta"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "test.jsonl").write_text('{"instruction": "x", "output": "y"}\n')
    from todi.errors import UsageError

    with pytest.raises(UsageError, match=r"found: alpha, beta"):
        evaluation.resolve_datasets("alpha,gamma", str(tmp_path))
    sources = evaluation.resolve_datasets(f"alpha,{tmp_path / 'beta' / 'test.jsonl'}", str(tmp_path))
    assert sources == {"alpha": tmp_path / "alpha/test.jsonl", "beta": tmp_path / "beta/test.jsonl"}


def _fake_results(out: Path, model: str, datasets: dict[str, dict[int, float]]) -> None:
    from todi import report

    results = {
        "metric": "rougeL",
        "datasets": list(datasets),
        "seeds": sorted({s for per_seed in datasets.values() for s in per_seed}),
        "settings": {"do_sample": True},
        "models": report.summarize({model: datasets}, list(datasets)),
    }
    report.write_report(results, out)


def test_compare_merges_result_folders(tmp_path) -> None:
    _fake_results(tmp_path / "a", "sft", {"dolly": {10: 20.0, 20: 22.0}, "vicuna": {10: 14.0, 20: 16.0}})
    _fake_results(tmp_path / "b", "todi", {"dolly": {10: 25.0, 20: 27.0}, "vicuna": {10: 17.0, 20: 19.0}})
    out = tmp_path / "merged"
    assert main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    merged = json.loads((out / "results.json").read_text())
    assert list(merged["models"]) == ["sft", "todi"]
    assert merged["models"]["todi"]["datasets"]["dolly"]["mean"] == pytest.approx(26.0)
    assert merged["models"]["todi"]["datasets"]["dolly"]["std"] == pytest.approx(1.0)
    # Average per seed over datasets, then over seeds: seeds give 21 and 23.
    assert merged["models"]["todi"]["average"]["mean"] == pytest.approx(22.0)
    assert merged["models"]["todi"]["average"]["std"] == pytest.approx(1.0)
    table = (out / "results.md").read_text()
    assert "| sft | 21.00 ± 1.00 | 15.00 ± 1.00 | 18.00 ± 1.00 |" in table
    assert "| todi | 26.00 ± 1.00 | 18.00 ± 1.00 | 22.00 ± 1.00 |" in table
    assert (out / "rougeL.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_same_model_name_in_two_folders_keeps_both(tmp_path) -> None:
    _fake_results(tmp_path / "run1", "final", {"dolly": {10: 20.0}})
    _fake_results(tmp_path / "run2", "final", {"dolly": {10: 30.0}})
    _fake_results(tmp_path / "run3", "final", {"vicuna": {10: 10.0}})
    out = tmp_path / "merged"
    assert (
        main(["eval", "--compare", *(str(tmp_path / r) for r in ("run1", "run2", "run3")), "--out", str(out)])
        == 0
    )
    models = json.loads((out / "results.json").read_text())["models"]
    # run3 holds another data set of "final" and is merged into it; run2 overlaps and is kept apart.
    assert set(models) == {"final", "final (run2)"}
    assert set(models["final"]["datasets"]) == {"dolly", "vicuna"}
    assert models["final"]["average"]["mean"] == pytest.approx(15.0)
    assert models["final (run2)"]["average"] is None  # has no vicuna, so no comparable average


def test_compare_of_a_folder_without_results_is_a_usage_error(tmp_path, capsys) -> None:
    assert main(["eval", "--compare", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "results.json" in capsys.readouterr().err


def test_cli_options_parse_with_dashes_and_repeated_models() -> None:
    from todi.cli import parse_config

    run, config = parse_config(
        "eval",
        [
            "--model",
            "a",
            "--model",
            "b",
            "c",
            "--out",
            "o",
            "--max-examples",
            "5",
            "--batch-size",
            "2",
            "--greedy",
        ],
    )
    assert run is evaluation.run
    assert config.model == ["a", "b", "c"] and config.max_examples == 5 and config.batch_size == 2
    assert config.greedy and not config.generation_settings().do_sample
    assert config.seeds == "10,20,30,40,50" and config.top_k == 0 and config.no_repeat_ngram_size == 6


def test_yaml_config_single_model_and_cli_override(tmp_path) -> None:
    from todi.cli import parse_config

    file = tmp_path / "eval.yaml"
    file.write_text("model: runs/todi/final\nmax-examples: 7\nout: somewhere\n")
    _, config = parse_config("eval", ["--config", str(file)])
    assert config.model == ["runs/todi/final"] and config.max_examples == 7 and config.out == "somewhere"
    _, config = parse_config("eval", ["--config", str(file), "--model", "x", "--model", "y"])
    assert config.model == ["x", "y"]  # the command line replaces the file's list rather than adding to it


def test_no_model_is_a_usage_error(tmp_path, capsys) -> None:
    assert main(["eval", "--out", str(tmp_path)]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["eval", "--model", "m"]) == 2
    assert "--out is required" in capsys.readouterr().err


def _numpy_paired(a: list[float], b: list[float], resamples: int = 10_000, seed: int = 0) -> dict:
    """Paired difference a - b from the definitions: mean, percentile bootstrap (resampling the pairs with
    numpy's default_rng(seed)), and the exact two-sided sign test by counting."""
    d = np.asarray(a) - np.asarray(b)
    idx = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))
    low, high = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    n, k = wins + losses, min(wins, losses)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    return {"mean": d.mean(), "low": low, "high": high, "wins": wins, "losses": losses, "p": p}


def test_compare_writes_paired_differences_to_the_reference(tmp_path) -> None:
    seeds = [10, 20, 30, 40, 50]
    rng = np.random.default_rng(4)
    todi = {s: float(v) for s, v in zip(seeds, rng.normal(30, 3, 5))}
    rkl = {s: todi[s] - float(v) for s, v in zip(seeds, [2.0, 1.5, 3.0, -0.5, 2.5])}
    sft = {s: float(v) for s, v in zip(seeds, rng.normal(30, 3, 5))}
    for name, scores in (("sft", sft), ("rkl", rkl), ("todi", todi)):
        _fake_results(tmp_path / name, name, {"dolly": scores})
    out = tmp_path / "merged"
    folders = [str(tmp_path / n) for n in ("sft", "rkl", "todi")]
    assert main(["eval", "--compare", *folders, "--out", str(out)]) == 0
    merged = json.loads((out / "results.json").read_text())
    assert merged["paired"]["reference"] == "todi"  # a model named todi is the default reference
    by_name = {c["name"]: c for c in merged["paired"]["comparisons"]}
    assert set(by_name) == {"sft", "rkl"}
    table = (out / "results.md").read_text()
    for name, scores in (("sft", sft), ("rkl", rkl)):
        ref = _numpy_paired([scores[s] for s in seeds], [todi[s] for s in seeds])
        got = by_name[name]
        assert got["mean"] == pytest.approx(ref["mean"], abs=1e-9)
        assert (got["low"], got["high"]) == pytest.approx((ref["low"], ref["high"]), abs=1e-9)
        assert (got["wins"], got["losses"]) == (ref["wins"], ref["losses"])
        assert got["sign_p"] == pytest.approx(ref["p"])
        assert f"| {name} − todi | {ref['mean']:+.1f} | {ref['low']:+.1f}..{ref['high']:+.1f} |" in table
    # rkl trails todi by 1.7 on average with 4 of 5 seeds; the interval's side decides the sentence.
    ref = _numpy_paired([rkl[s] for s in seeds], [todi[s] for s in seeds])
    expected = "todi beats rkl" if ref["high"] < 0 else "no difference detected between rkl and todi"
    assert expected in table

    # --reference names another model; one that was not compared is refused by name.
    out2 = tmp_path / "merged2"
    assert main(["eval", "--compare", *folders, "--out", str(out2), "--reference", "sft"]) == 0
    paired = json.loads((out2 / "results.json").read_text())["paired"]
    assert paired["reference"] == "sft" and {c["name"] for c in paired["comparisons"]} == {"rkl", "todi"}
    assert main(["eval", "--compare", *folders, "--out", str(tmp_path / "m3"), "--reference", "akl"]) == 2


def test_reference_defaults_to_the_first_model_without_todi(tmp_path) -> None:
    from todi import report

    scores = {"b": {"d": {1: 3.0, 2: 5.0}}, "a": {"d": {1: 1.0, 2: 4.0}}}
    results = {"datasets": ["d"], "models": report.summarize(scores, ["d"])}
    paired = report.paired_comparisons(results)
    assert paired["reference"] == "b"
    assert paired["comparisons"][0]["mean"] == pytest.approx(((1.0 - 3.0) + (4.0 - 5.0)) / 2)
    one = {"datasets": ["d"], "models": report.summarize({"a": scores["a"]}, ["d"])}
    assert report.paired_comparisons(one) is None


def test_reference_must_be_an_evaluated_model() -> None:
    from todi.errors import UsageError

    with pytest.raises(UsageError, match="--reference 'todi' is not one of the evaluated models"):
        evaluation.Config(out="x", model=["runs/a/final", "runs/b/final"], name=["a", "b"], reference="todi")
