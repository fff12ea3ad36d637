"""On-policy generation (``--lmbda``, ``--seq-kd``) with a teacher of another tokenizer (``--cross-tokenizer``).

A sampled response becomes text and both sides are encoded from it as data: the references here are the
data path itself (:func:`todi.data.encode_examples` and :meth:`CrossTokenizerTeacher.attach` on the same
text written as an example) and a float64 recomputation from samples.jsonl and both saved models.
"""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch

import tiny
from test_cross_tokenizer import char_tokenizer, reference_loss
from test_training import train_records
from tiny import run_todi
from todi.data import Example, encode_examples, load_examples, render_prompt
from todi.onpolicy import SamplerTokens
from todi.xtok import CrossTokenizerTeacher, build_vocab_map, pair_examples

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _config(data, **overrides) -> SimpleNamespace:
    """What :meth:`CrossTokenizerTeacher.build` reads of a ``todi distill`` configuration."""
    values = dict(
        cross_tokenizer="hybrid", student="S", teacher="T", teacher_cache=None, uld_weight=0.5,
        unaligned="skip", template="alpaca", max_prompt_length=100, max_length=160, data=str(data),
        max_examples=None, dev=None, dev_max_examples=None,
    )  # fmt: skip
    values.update(overrides)
    return SimpleNamespace(**values)


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _as_data(item: Example, text: str, student, teacher, adapter, lengths, stand_in: int = 0) -> dict:
    """The attached features of ``item`` with response ``text``, through the data path; ``stand_in``: may
    the text's tokens stand in for the teacher at unaligned positions (not for the student's own sample)."""
    written = Example(item.instruction, item.input, references=(text,))
    (features,), _ = encode_examples([written], student, **lengths)
    adapter.attach([written], student, [features], **lengths)
    return {**features, "xtok_stand_in": stand_in}


def _positions(features) -> list[tuple[int, int]]:
    return list(zip(features["xtok_student_pos"], features["xtok_teacher_pos"]))


def _build(tmp_path, student, teacher, records, **overrides):
    config = _config(_write(tmp_path / "train.jsonl", records), **overrides)
    lengths = {k: getattr(config, k) for k in ("template", "max_prompt_length", "max_length")}
    items = load_examples(config.data, "train")
    train_set, _ = encode_examples(items, student, **lengths)
    adapter = CrossTokenizerTeacher.build(config, student, teacher, train_set, [])
    return adapter, items, train_set, lengths


def test_a_student_sample_is_paired_as_the_same_text_written_as_data(gpt2, tmp_path):
    chars = char_tokenizer()
    records = [
        {"instruction": "name a pet", "output": "a cat"},
        {"instruction": "say what runs", "input": "the dog", "output": "the dog runs fast"},
    ]
    adapter, items, train_set, lengths = _build(tmp_path, gpt2, chars, records)
    eos, teacher_eos = gpt2.eos_token_id, chars.eos_token_id
    pairing = adapter.generated_pairing(
        train_set, SamplerTokens(eos, [eos], 8), SamplerTokens(teacher_eos, [teacher_eos], 40)
    )
    text = " red tree 12345"
    sampled = gpt2(text)["input_ids"]
    ended, cut, empty = pairing.pair([1, 1, 0], [[*sampled, eos], sampled, [eos]], "student")
    data = _as_data(items[1], text, gpt2, chars, adapter, lengths)
    prompt = gpt2(render_prompt(items[1], "alpaca"))["input_ids"]
    assert data["input_ids"] == prompt + sampled + [eos]  # the reference's own check
    assert ended == data and len(_positions(ended)) > 2
    # Cut by --gen-max-new-tokens: no EOS target on either side, nor an aligned pair predicting one.
    assert cut["input_ids"] == data["input_ids"][:-1] and cut["labels"] == data["labels"][:-1]
    assert cut["teacher_input_ids"] == data["teacher_input_ids"][:-1]
    assert cut["teacher_input_ids"][-1] != teacher_eos and cut["labels"][-1] != eos
    last_student, last_teacher = len(data["input_ids"]) - 2, len(data["teacher_input_ids"]) - 2
    assert _positions(cut) == [(s, t) for s, t in _positions(data) if s != last_student and t != last_teacher]
    assert len(_positions(cut)) == len(_positions(data)) - 1  # EOS aligned with EOS: one pair fewer
    # EOS at once: the example's only target is EOS, on both sides.
    assert empty == _as_data(items[0], "", gpt2, chars, adapter, lengths)
    assert [label for label in empty["labels"] if label != -100] == [eos]
    assert empty["teacher_input_ids"][-1] == teacher_eos and len(_positions(empty)) == 1
    assert pairing.non_canonical == 0
    # A non-canonical sample (" red" as " " + "red"): the student trains on the text's own encoding.
    spelled = [gpt2.convert_tokens_to_ids("Ġ"), gpt2.convert_tokens_to_ids("red")]
    (canonical,) = pairing.pair([0], [[*spelled, eos]], "student")
    assert canonical == _as_data(items[0], " red", gpt2, chars, adapter, lengths)
    assert canonical["input_ids"][-2] == gpt2(" red")["input_ids"][0] and pairing.non_canonical == 1
    assert pairing.texts([[*spelled, eos], spelled], "student") == [" red", " red"]


def test_a_teacher_sample_starts_from_the_teachers_prompt_and_skips_dropped_examples(gpt2, tmp_path):
    """--seq-kd: the char-level teacher samples from its own prompt ids; example indices are those of the
    encoded training set, which drops the examples whose prompt fills --max-length."""
    chars = char_tokenizer()
    records = [
        {"instruction": "the cat", "output": "runs"},
        {"instruction": "the big blue house by the river", "output": "dark"},  # 31 characters: dropped
        {"instruction": "a dog", "output": "sun"},
    ]
    lengths = {"template": "none", "max_prompt_length": 30, "max_length": 30}
    adapter, items, train_set, _ = _build(tmp_path, chars, gpt2, records, **lengths)
    assert len(train_set) == 2
    eos, teacher_eos = chars.eos_token_id, gpt2.eos_token_id
    pairing = adapter.generated_pairing(
        train_set, SamplerTokens(eos, [eos], 8), SamplerTokens(teacher_eos, [teacher_eos], 8)
    )
    assert pairing.prompts([1], "teacher") == [gpt2("a dog")["input_ids"]]
    assert pairing.prompts([1], "student") == [chars("a dog")["input_ids"]]
    sampled = gpt2(" moon star")["input_ids"]
    (made,) = pairing.pair([1], [[*sampled, teacher_eos]], "teacher")
    assert made == _as_data(items[2], " moon star", chars, gpt2, adapter, lengths, stand_in=1)
    assert made["input_ids"] == chars("a dog moon star")["input_ids"] + [eos]


def test_the_refusal_is_lifted_but_a_teacher_cache_still_cannot_score_samples(tmp_path):
    from todi.errors import UsageError
    from todi.training import DistillConfig

    common = dict(student="s", data="x.jsonl", out=str(tmp_path / "run"), cross_tokenizer="hybrid")
    for policy in ({"lmbda": 0.5}, {"seq_kd": True}):
        assert DistillConfig(teacher="t", **common, **policy).problems() == []
        with pytest.raises(UsageError) as err:
            DistillConfig(teacher_cache="c", **common, **policy)
        assert str(err.value).startswith("--teacher-cache cannot score new text") and ";" not in str(
            err.value
        )


# ---------------------------------------------------------------------------------------- distill runs


@pytest.fixture(scope="module")
def assets(tmp_path_factory, gpt2) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("onpolicy-xtok")
    return SimpleNamespace(
        teacher=tiny.save_llama(root / "teacher", char_tokenizer(), 16, 0),
        student=tiny.save_llama(root / "student", gpt2, 16, 1),
        data=tiny.write_data(root / "train.jsonl", 16, 0),
    )


def _distill(assets, out, *extra) -> list[object]:
    return ["distill", "--teacher", assets.teacher, "--student", assets.student, "--data", assets.data,
            "--cross-tokenizer", "hybrid", "--uld-weight", "0.5", "--temperature", "2", *tiny.TINY,
            "--max-length", "160", "--max-prompt-length", "100", "--log-every", "1", "--out", out,
            *extra]  # fmt: skip


def _samples(run) -> list[dict]:
    return [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]


def _float64(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


def test_lambda_one_loss_is_the_float64_divergence_of_the_re_encoded_samples(assets, gpt2, tmp_path):
    chars = char_tokenizer()
    out = tmp_path / "run"
    extra = ("--max-steps", "2", "--lmbda", "1", "--save-samples", "--gen-max-new-tokens", "6")
    assert run_todi(*_distill(assets, out, *extra)) == 0
    records, samples = train_records(out), [s for s in _samples(out) if s["step"] == 1]
    assert [r["generated"] for r in records] == [1.0, 1.0] and len(samples) == 4
    items = load_examples(str(assets.data), "train")
    lengths = {"template": "alpaca", "max_prompt_length": 100, "max_length": 160}
    student, teacher = _float64(assets.student), _float64(assets.teacher)
    s_rows, targets, t_rows, aligned = [], [], [], []
    ended = 0
    for sample in samples:
        response = sample["response_ids"]
        done = response[-1] == gpt2.eos_token_id
        ended += done
        body = response[:-1] if done else response
        text = gpt2.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert sample["text"] == text
        assert sample["prompt_ids"] == gpt2(render_prompt(items[sample["example"]], "alpaca"))["input_ids"]
        written = Example(items[sample["example"]].instruction, items[sample["example"]].input, (text,))
        ((s_enc, t_enc, pairs),), _ = pair_examples([written], gpt2, chars, **lengths)
        s_ids, t_ids = s_enc.features["input_ids"], t_enc.features["input_ids"]
        s_targets, t_targets = len(s_ids) - s_enc.prompt_length, len(t_ids) - t_enc.prompt_length
        if not done:  # no EOS target on either side
            assert s_ids[-1] == gpt2.eos_token_id and t_ids[-1] == chars.eos_token_id
            s_ids, t_ids, s_targets, t_targets = s_ids[:-1], t_ids[:-1], s_targets - 1, t_targets - 1
            pairs = [(j, k) for j, k in pairs if j < s_targets and k < t_targets]
        with torch.no_grad():
            sl, tl = student(torch.tensor([s_ids])).logits[0], teacher(torch.tensor([t_ids])).logits[0]
        first = len(s_rows)
        for j in range(s_targets):
            s_rows.append(sl[s_enc.prompt_length + j - 1])
            targets.append(s_ids[s_enc.prompt_length + j])
        for j, k in pairs:
            aligned.append(first + j)
            t_rows.append(tl[t_enc.prompt_length + k - 1])
    vocab = build_vocab_map(gpt2, chars)
    ref, _, ref_kd = reference_loss(
        torch.stack(s_rows), torch.tensor(targets), torch.stack(t_rows), torch.tensor(aligned),
        list(zip(vocab.student_ids, vocab.teacher_ids)), mode="hybrid", divergence="todi", kd_rate=1.0,
        T=2.0, uld_weight=0.5, denom=len(targets), unaligned_ce=False,  # the student's own samples: no stand-in
    )  # fmt: skip
    assert len(aligned) > 0 and ended < 4  # some samples were cut at 6 tokens
    assert records[0]["ce"] == 0.0 and ref_kd > 0
    assert records[0]["loss"] == pytest.approx(float(ref), rel=1e-5)
    assert records[0]["kd"] == pytest.approx(float(ref_kd), rel=1e-5)


def test_seq_kd_samples_in_the_teachers_tokens(assets, tmp_path):
    chars = char_tokenizer()
    out = tmp_path / "run"
    extra = ("--max-steps", "1", "--seq-kd", "--save-samples", "--gen-max-new-tokens", "24")
    assert run_todi(*_distill(assets, out, *extra)) == 0
    (record,) = train_records(out)
    samples = _samples(out)
    assert {s["kind"] for s in samples} == {"teacher"} and len(samples) == 4
    for sample in samples:  # the char teacher's own prompt ids, and its own tokens
        assert chars.decode(sample["prompt_ids"]).endswith("### Response:\n")
        assert len(sample["response_ids"]) <= 24 and max(sample["response_ids"]) < len(chars)
    assert record["kd"] > 0 and record["ce"] > 0 and math.isfinite(record["loss"])


def test_lambda_with_a_replay_buffer_resumes_exactly(assets, tmp_path):
    from safetensors.torch import load_file

    extra = ("--max-steps", "6", "--lmbda", "0.5", "--replay-buffer", "4", "--replay-ratio", "0.5",
             "--save-samples", "--save-every", "2", "--gen-max-new-tokens", "6", "--seed", "3")  # fmt: skip
    run = tmp_path / "run"
    assert run_todi(*_distill(assets, run, *extra)) == 0
    straight, records = load_file(run / "final" / "model.safetensors"), train_records(run)
    samples = _samples(run)
    generated = [r["generated"] for r in records]
    # The resumed part (steps 5-6) replays examples the buffer held in the step-4 checkpoint.
    assert sum(generated[:4]) >= 1 and any(r["replayed"] > 0 for r in records[4:]), generated
    shutil.rmtree(run / "checkpoints" / "step-00000006")  # as if killed after the step-4 checkpoint
    assert run_todi(*_distill(assets, run, *extra, "--resume")) == 0
    resumed = load_file(run / "final" / "model.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert _samples(run) == samples
    assert [r["loss"] for r in train_records(run)] == [r["loss"] for r in records]
