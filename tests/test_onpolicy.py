"""On-policy and mixed-policy distillation (``--lmbda``, ``--seq-kd``, replay buffer) on tiny models.

References are independent of the code under test: the generated-batch loss is recomputed in float64
from the recorded sequences and both models' logits with the ToDi formula written here; the sampler is
checked against the softmax it claims to sample; masks against hand-built sequences.
"""

from __future__ import annotations

import json
import math
import random
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from test_training import _wait_for_checkpoint, assert_same_weights, finish, todi_process, train_records
from tiny import GPT2_DIR, TINY, run_todi
from tiny import gpt2_tokenizer as _tokenizer
from tiny import save_llama as _save_llama
from tiny import write_data as _write_data
from todi.data import IGNORE_INDEX
from todi.onpolicy import (
    PolicyOptions,
    ReplayBuffer,
    ResponseSource,
    _PerRowSampling,
    prompt_of,
    sample_responses,
)

pytestmark = [
    pytest.mark.skipif(not GPT2_DIR.is_dir(), reason=f"GPT-2 tokenizer not found at {GPT2_DIR}"),
    pytest.mark.usefixtures("fresh_accelerate_state"),
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("onpolicy")
    tokenizer = _tokenizer()
    return SimpleNamespace(
        tokenizer=tokenizer,
        teacher=_save_llama(root / "teacher", tokenizer, hidden=64, seed=1),
        student=_save_llama(root / "student", tokenizer, hidden=32, seed=2),
        data=_write_data(root / "train.jsonl", 32, seed=0),
    )


def _distill(assets, out: Path, *extra: object) -> list[object]:
    return ["distill", "--teacher", assets.teacher, "--student", assets.student, "--data", assets.data,
            "--out", out, "--log-every", 1, "--gen-max-new-tokens", 8, *TINY, *map(str, extra)]  # fmt: skip


def _samples(run: Path) -> list[dict]:
    path = run / "samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --------------------------------------------------------------------------------------------------
# The sampler and the masks
# --------------------------------------------------------------------------------------------------


def test_per_row_gumbel_sampling_follows_the_softmax():
    """argmax(log softmax + Gumbel) is a sample of the softmax: empirical frequencies match it."""
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0, float("-inf")]])
    probs = torch.softmax(logits, -1)[0]
    counts = torch.zeros(5)
    for seed in range(4000):
        scores = _PerRowSampling([seed], PolicyOptions(), torch.device("cpu"))(None, logits.clone())
        counts[scores.argmax(-1)] += 1
    freq = counts / counts.sum()
    assert freq[4] == 0  # a -inf logit is never drawn
    # 4000 draws: the binomial std is at most 0.008; 4 sigma.
    assert torch.allclose(freq, probs, atol=0.032), (freq, probs)


def test_a_rows_sample_does_not_depend_on_its_neighbours():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    alone = _PerRowSampling([7], PolicyOptions(), torch.device("cpu"))(None, logits[1:2].clone())
    together = _PerRowSampling([3, 7, 9], PolicyOptions(), torch.device("cpu"))(None, logits.clone())
    assert torch.equal(alone[0], together[1])


def test_top_k_and_temperature_warp_before_sampling():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    seen = set()
    for seed in range(300):
        options = PolicyOptions(top_k=2, temperature=5.0)
        seen.add(int(_PerRowSampling([seed], options, torch.device("cpu"))(None, logits.clone()).argmax()))
    assert seen == {0, 1}  # only the top two ever; with T = 5 both are frequent


def _stub_generate(outputs: list[list[int]]):
    """A ``generate`` that appends fixed continuations (right-padded with 0) to the left-padded prompts."""

    def generate(input_ids, **kwargs):
        width = max(map(len, outputs))
        new = torch.tensor([row + [0] * (width - len(row)) for row in outputs])
        return torch.cat([input_ids, new], dim=1)

    return generate


def test_generated_examples_mask_prompt_and_stop_at_the_first_eos():
    eos = 50256
    examples = [
        {"input_ids": [11, 12, 13, 21, 22, eos], "labels": [IGNORE_INDEX] * 3 + [21, 22, eos]},
        {"input_ids": [31, 32, 41, eos], "labels": [IGNORE_INDEX] * 2 + [41, eos]},
    ]
    assert prompt_of(examples[0]) == [11, 12, 13] and prompt_of(examples[1]) == [31, 32]
    source = ResponseSource(
        PolicyOptions(lmbda=1.0, max_new_tokens=5), seed=0, pad_id=eos, eos_ids=[eos], buffer=None
    )
    # Row 0 stops at its EOS (tokens after it are the finished row's padding); row 1 never ends.
    generate = _stub_generate([[5, 6, eos, 7, 8], [9, 10, 11, 12, 13]])
    batches = source.for_step(
        0,
        [(0, [0, 1])],
        examples,
        999,
        generators={"student": generate},
        device=torch.device("cpu"),
        world=lambda x: [x],
    )
    (micro,) = batches.micro_batches
    assert micro[0] == {"input_ids": [11, 12, 13, 5, 6, eos], "labels": [IGNORE_INDEX] * 3 + [5, 6, eos]}
    assert micro[1] == {
        "input_ids": [31, 32, 9, 10, 11, 12, 13],
        "labels": [IGNORE_INDEX] * 2 + [9, 10, 11, 12, 13],
    }
    # The normaliser is the generated batch's own supervised tokens (labels after the shift), not the data's.
    assert batches.num_items == 3 + 5 and batches.kd_rate == 1.0 and batches.kind == "student"
    assert (batches.stats.sequences, batches.stats.tokens, batches.stats.eos) == (2, 8, 1)


def test_lambda_choice_is_a_function_of_seed_and_step_only():
    source = ResponseSource(PolicyOptions(lmbda=0.5), seed=3, pad_id=0, eos_ids=[0], buffer=None)
    kinds = [source.kind(step) for step in range(400)]
    again = ResponseSource(PolicyOptions(lmbda=0.5), seed=3, pad_id=0, eos_ids=[0], buffer=None)
    assert kinds == [again.kind(step) for step in range(400)]
    share = kinds.count("student") / len(kinds)
    assert 0.4 < share < 0.6  # binomial(400, 0.5): std 0.025
    assert {
        ResponseSource(PolicyOptions(lmbda=1.0), seed=1, pad_id=0, eos_ids=[0], buffer=None).kind(s)
        for s in range(50)
    } == {"student"}


def test_replay_buffer_keeps_the_newest_and_round_trips_its_state():
    buffer = ReplayBuffer(3)
    buffer.add([{"input_ids": [i], "labels": [i]} for i in range(5)])
    assert [e["input_ids"][0] for e in buffer.examples] == [2, 3, 4]
    copy = ReplayBuffer(3)
    copy.load_state_dict(buffer.state_dict())
    assert list(copy.examples) == list(buffer.examples)
    drawn = buffer.draw(2, random.Random(0))
    assert len(drawn) == 2 and len({d["input_ids"][0] for d in drawn}) == 2
    assert len(buffer.draw(10, random.Random(0))) == 3


def test_sample_responses_through_a_real_model_is_seeded_per_row(assets):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets.student).eval()
    prompts = [[464, 3797, 318], [40, 588, 257, 1310, 3290]]
    options = PolicyOptions(max_new_tokens=6)
    eos = assets.tokenizer.eos_token_id
    both = sample_responses(
        model.generate, prompts, [11, 22], options, pad_id=eos, eos_ids=[eos], device=torch.device("cpu")
    )
    second = sample_responses(
        model.generate, prompts[1:], [22], options, pad_id=eos, eos_ids=[eos], device=torch.device("cpu")
    )
    assert both[1] == second[0]  # same seed, different batch: same sample
    other = sample_responses(
        model.generate, prompts[1:], [23], options, pad_id=eos, eos_ids=[eos], device=torch.device("cpu")
    )
    assert other[0] != second[0]


# --------------------------------------------------------------------------------------------------
# Refusals, before anything loads
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--lmbda", "1.5"], "--lmbda must be in [0, 1]"),
        (["--lmbda", "-0.1"], "--lmbda must be in [0, 1]"),
        (["--lmbda", "0.5", "--replay-ratio", "0.5"], "--replay-ratio needs a buffer"),
        (["--replay-buffer", "8"], "--replay-buffer keeps the student's samples: it needs --lmbda > 0"),
        (["--lmbda", "1", "--gen-top-p", "0"], "--gen-top-p must be in (0, 1]"),
        (["--lmbda", "1", "--gen-temperature", "0"], "--gen-temperature must be a finite number > 0"),
    ],
)
def test_bad_policy_options_are_refused_first(tmp_path, capsys, option, message, monkeypatch):
    monkeypatch.setattr("todi.training.load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "run"
    status = run_todi("distill", "--teacher", tmp_path / "t", "--student", tmp_path / "s", "--data", "x.jsonl",
                      "--out", out, *option)  # fmt: skip
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) <= 2
    assert not out.exists()


@pytest.mark.parametrize("option", [["--lmbda", "0.5"], ["--seq-kd"]])
def test_a_teacher_cache_cannot_score_new_text(tmp_path, capsys, option):
    status = run_todi("distill", "--teacher-cache", tmp_path / "c", "--student", tmp_path / "s", "--data", "x.jsonl",
                      "--out", tmp_path / "run", *option)  # fmt: skip
    assert status == 2
    assert "--teacher-cache cannot score new text" in capsys.readouterr().err


def test_a_generation_longer_than_the_models_positions_is_refused(tmp_path, assets, capsys, monkeypatch):
    monkeypatch.setattr("todi.training.load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    # The tiny models have 256 positions; prompts are up to 32 tokens.
    status = run_todi(*_distill(assets, tmp_path / "run", "--lmbda", "1", "--gen-max-new-tokens", "240"))
    assert status == 2
    err = capsys.readouterr().err
    assert "--gen-max-new-tokens 240" in err and "past the 256 positions of --student" in err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def test_lambda_zero_is_the_off_policy_run(tmp_path, assets):
    plain, zero = tmp_path / "plain", tmp_path / "zero"
    assert run_todi(*_distill(assets, plain, "--max-steps", 3)) == 0
    # Generation settings without --lmbda change nothing: no step generates.
    assert (
        run_todi(*_distill(assets, zero, "--max-steps", 3, "--lmbda", "0", "--gen-temperature", "0.5")) == 0
    )
    assert_same_weights(plain / "final", zero / "final", atol=0.0)
    assert not (zero / "samples.jsonl").exists()
    assert all("generated" not in r for r in train_records(zero))


def _todi_kd_float64(student_logits, teacher_logits, temperature: float = 2.0, beta: float = 1.0):
    """Sum over positions of the ToDi divergence (the paper's formula) in float64."""
    log_q = torch.log_softmax(student_logits.double() / temperature, -1)
    log_p = torch.log_softmax(teacher_logits.double() / temperature, -1)
    alpha = torch.sigmoid(beta * (log_p - log_q))
    p, q = log_p.exp(), log_q.exp()
    per_position = (alpha * p * (log_p - log_q) + (1 - alpha) * q * (log_q - log_p)).sum(-1)
    return per_position.sum().item()


def test_lambda_one_trains_only_on_samples_and_the_loss_is_the_divergence(tmp_path, assets):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert run_todi(*_distill(assets, out, "--max-steps", 2, "--lmbda", "1", "--save-samples")) == 0
    samples = _samples(out)
    records = train_records(out)
    assert [r["generated"] for r in records] == [1.0, 1.0]
    # Every example of every step was sampled (batch 4, one micro-batch per step), and logged.
    assert sorted({s["step"] for s in samples}) == [1, 2] and len(samples) == 8
    assert all(s["kind"] == "student" and 1 <= len(s["response_ids"]) <= 8 for s in samples)
    # Step 1's loss, recomputed in float64 from the recorded sequences and both models' logits:
    # the divergence alone (kd_rate 1 on generated batches), normalised by the step's supervised tokens.
    student = AutoModelForCausalLM.from_pretrained(assets.student, torch_dtype=torch.float64).eval()
    teacher = AutoModelForCausalLM.from_pretrained(assets.teacher, torch_dtype=torch.float64).eval()
    total, positions = 0.0, 0
    with torch.no_grad():
        for s in (s for s in samples if s["step"] == 1):
            ids = torch.tensor([s["prompt_ids"] + s["response_ids"]])
            start = len(s["prompt_ids"]) - 1  # the position predicting the first response token
            sl, tl = student(ids).logits[0, start:-1], teacher(ids).logits[0, start:-1]
            total += _todi_kd_float64(sl, tl)
            positions += len(s["response_ids"])
    assert records[0]["ce"] == 0.0
    assert records[0]["loss"] == pytest.approx(total / positions, rel=1e-5)
    assert records[0]["gen_mean_length"] == pytest.approx(positions / 4)


def test_seq_kd_trains_on_teacher_samples_with_the_full_objective(tmp_path, assets):
    out = tmp_path / "run"
    assert run_todi(*_distill(assets, out, "--max-steps", 1, "--seq-kd", "--save-samples")) == 0
    (record,) = train_records(out)
    assert {s["kind"] for s in _samples(out)} == {"teacher"}
    assert record["ce"] > 0 and record["loss"] == pytest.approx(
        0.5 * record["ce"] + 0.5 * record["kd"], rel=1e-5
    )


def test_on_policy_ce_keeps_the_cross_entropy(tmp_path, assets):
    out = tmp_path / "run"
    assert run_todi(*_distill(assets, out, "--max-steps", 1, "--lmbda", "1", "--on-policy-ce")) == 0
    (record,) = train_records(out)
    assert record["ce"] > 0 and record["loss"] == pytest.approx(
        0.5 * record["ce"] + 0.5 * record["kd"], rel=1e-5
    )


def _mixed(assets, out: Path) -> list[object]:
    return _distill(assets, out, "--max-steps", 8, "--lmbda", "0.5", "--replay-buffer", "6", "--replay-ratio", "0.5",
                    "--save-samples", "--save-every", 2, "--lr", "2e-3", "--seed", "5")  # fmt: skip


@pytest.mark.slow
def test_two_processes_equal_grad_accum_two_with_lambda_and_replay(tmp_path, assets):
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "todi.cli")
    ddp = todi_process(*_mixed(assets, tmp_path / "ddp"), "--batch-size", "2", launcher=torchrun)
    single = todi_process(*_mixed(assets, tmp_path / "single"), "--batch-size", "2", "--grad-accum", "2")
    finish(single)
    finish(ddp)
    runs = {name: tmp_path / name for name in ("ddp", "single")}
    kinds = {name: [r["generated"] for r in train_records(run)] for name, run in runs.items()}
    assert kinds["ddp"] == kinds["single"] and 0 < sum(kinds["single"]) < 8  # mixed, and the same steps
    key = lambda s: (s["step"], s["example"])  # noqa: E731
    assert sorted(_samples(runs["ddp"]), key=key) == sorted(_samples(runs["single"]), key=key)
    assert any(r["replayed"] > 0 for r in train_records(runs["single"]))
    assert_same_weights(runs["ddp"] / "final", runs["single"] / "final", atol=1e-5)


@pytest.mark.slow
def test_sigkill_and_resume_with_lambda_and_a_replay_buffer_is_exact(tmp_path, assets):
    reference, run = tmp_path / "reference", tmp_path / "run"
    finish(todi_process(*_mixed(assets, reference)))
    assert any(r["replayed"] > 0 for r in train_records(reference)), "the buffer was never used"
    process = todi_process(*_mixed(assets, run))
    _wait_for_checkpoint(process, run, 4)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert not (run / "final").exists(), "the run finished before it was killed"
    finish(todi_process(*_mixed(assets, run), "--resume"))
    assert_same_weights(run / "final", reference / "final", atol=1e-6)
    assert [r["step"] for r in train_records(run)] == list(range(1, 9))
    assert _samples(run) == _samples(reference)  # the resumed run drew the same samples and replays
    assert math.isclose(train_records(run)[-1]["loss"], train_records(reference)[-1]["loss"], rel_tol=1e-6)
