"""Tests of :func:`todi.losses.causal_lm_distillation_loss` on tiny random Hugging Face causal LMs.

The fused path (head projections chunked inside the loss) and the materialised path (``fused=False``) must
both equal an independent computation written here: run the models for their full logits, shift by hand,
slice the vocabulary and call :func:`todi.losses.distillation_loss`. Losses and every student parameter
gradient agree to a norm-relative 1e-5 (float32).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
)

from helpers import IGNORE, assert_rel
from tiny import llama_config
from todi.losses import causal_lm_distillation_loss, distillation_loss

RTOL = 1e-5
MODEL_VOCAB = 101  # rows of every head here
TOKENIZER_VOCAB = 97  # for the vocab_size slicing tests: heads padded beyond the tokenizer
# Tiny models: one intra-op thread; TODI_COMPILE unset, as the tests choose the compile path explicitly.
pytestmark = pytest.mark.usefixtures("one_intra_op_thread", "no_compile_override")


# ----------------------------------------------------------------------------------------------------------
# tiny models and batches
# ----------------------------------------------------------------------------------------------------------


def llama(hidden: int, *, tied: bool = False, seed: int = 0, vocab: int = MODEL_VOCAB, **config) -> nn.Module:
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        llama_config(vocab, hidden, max_positions=64, tie_word_embeddings=tied, **config)
    ).eval()


def gpt2(hidden: int, *, seed: int = 0, vocab: int = MODEL_VOCAB) -> nn.Module:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab, n_embd=hidden, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(cfg).eval()  # eval: no dropout


def gemma2(hidden: int, *, seed: int = 0, vocab: int = MODEL_VOCAB) -> nn.Module:
    torch.manual_seed(seed)
    cfg = Gemma2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        final_logit_softcapping=5.0,
    )
    return Gemma2ForCausalLM(cfg).eval()


PAIRS = {
    # student hidden 32, teacher hidden 48 (the teacher is wider)
    "llama-untied": lambda: (llama(32, seed=1), llama(48, seed=2)),
    "llama-tied": lambda: (llama(32, tied=True, seed=3), llama(48, tied=True, seed=4)),
    "gpt2": lambda: (gpt2(32, seed=5), gpt2(48, seed=6)),
    "gpt2-student-llama-teacher": lambda: (gpt2(32, seed=7), llama(48, seed=8)),
}


def make_batch(seed: int = 0, token_vocab: int = TOKENIZER_VOCAB) -> dict:
    """Right-padded batch: lengths 11, 8, 5; labels -100 on the prompt (first 2-4 tokens) and on padding."""
    g = torch.Generator().manual_seed(seed)
    lengths, prompts, width = [11, 8, 5], [3, 2, 4], 11
    input_ids = torch.randint(3, token_vocab, (len(lengths), width), generator=g)
    attention_mask = torch.zeros_like(input_ids)
    labels = input_ids.clone()
    for row, (length, prompt) in enumerate(zip(lengths, prompts)):
        attention_mask[row, :length] = 1
        input_ids[row, length:] = 0  # pad id
        labels[row, :prompt] = IGNORE
        labels[row, length:] = IGNORE
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def num_supervised(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def independent_loss(student, teacher, batch, *, vocab_size=None, **kwargs):
    """Full logits of both models, shifted and sliced here, through distillation_loss."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = student(**inputs).logits
    assert logits.shape[-1] == MODEL_VOCAB
    student_logits = logits[:, :-1, : vocab_size or logits.shape[-1]]
    teacher_logits = None
    if teacher is not None:
        with torch.no_grad():
            full = teacher(**inputs).logits
            teacher_logits = full[:, :-1, : vocab_size or full.shape[-1]]
    return distillation_loss(student_logits, teacher_logits, batch["labels"][:, 1:], **kwargs)


def student_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        name: None if p.grad is None else p.grad.clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def run(fn, model: nn.Module):
    """Call fn(), backpropagate its loss, return (output, student grads) and reset the grads."""
    model.zero_grad(set_to_none=True)
    out = fn()
    out.loss.backward()
    grads = student_grads(model)
    model.zero_grad(set_to_none=True)
    return out, grads


def assert_same(out, grads, ref, ref_grads, rtol: float = RTOL) -> None:
    assert out.num_tokens == ref.num_tokens
    assert_rel(out.loss, ref.loss, rtol, "loss")
    assert_rel(out.ce, ref.ce, rtol, "ce")
    assert_rel(out.kd, ref.kd, rtol, "kd")
    assert (out.todi_weight is None) == (ref.todi_weight is None)
    if ref.todi_weight is not None:
        assert_rel(out.todi_weight, ref.todi_weight, rtol, "todi_weight")
    assert grads.keys() == ref_grads.keys()
    for name, expected in ref_grads.items():
        assert expected is not None, f"reference has no gradient for {name}"
        assert grads[name] is not None, f"no gradient for {name}"
        assert_rel(grads[name], expected, rtol, name)


def assert_no_teacher_grads(teacher: nn.Module) -> None:
    assert any(p.requires_grad for p in teacher.parameters())  # so that a leak would show
    assert all(p.grad is None for p in teacher.parameters())


# ----------------------------------------------------------------------------------------------------------
# fused == materialised == independent
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size", [None, TOKENIZER_VOCAB])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_fused_and_materialised_match_independent(pair, vocab_size):
    student, teacher = PAIRS[pair]()
    batch = make_batch(seed=1)
    kwargs = dict(divergence="todi", kd_rate=0.5, temperature=2.0, beta=2.0)
    ref, ref_grads = run(
        lambda: independent_loss(student, teacher, batch, vocab_size=vocab_size, **kwargs), student
    )
    fused, fused_grads = run(
        lambda: causal_lm_distillation_loss(
            student, teacher, batch, vocab_size=vocab_size, chunk_size=4, compile=False, **kwargs
        ),
        student,
    )
    plain, plain_grads = run(
        lambda: causal_lm_distillation_loss(
            student, teacher, batch, vocab_size=vocab_size, fused=False, **kwargs
        ),
        student,
    )
    assert ref.num_tokens == num_supervised(batch) == 15  # (11 - 3) + (8 - 2) + (5 - 4)
    assert fused.loss.requires_grad and fused.loss.dim() == 0
    assert_same(fused, fused_grads, ref, ref_grads)
    assert_same(plain, plain_grads, ref, ref_grads)
    assert_no_teacher_grads(teacher)
    head = student.get_output_embeddings()
    if vocab_size is not None:
        # only the first vocab_size logits are used: the extra head rows get no gradient
        head_grad = fused_grads[next(n for n, p in student.named_parameters() if p is head.weight)]
        assert torch.all(head_grad[vocab_size:] == 0) and head_grad[:vocab_size].abs().sum() > 0
    # the head is restored after the head-less forward
    assert student(input_ids=batch["input_ids"]).logits.shape[-1] == MODEL_VOCAB
    assert teacher(input_ids=batch["input_ids"]).logits.shape[-1] == MODEL_VOCAB


def test_vocab_slicing_ignores_extra_head_rows():
    """Making the padded head rows dominant changes the full-vocabulary loss but not the sliced one."""
    student, teacher = llama(32, seed=11), llama(48, seed=12)
    batch = make_batch(seed=2)
    kwargs = dict(vocab_size=TOKENIZER_VOCAB, chunk_size=5, compile=False)
    before = causal_lm_distillation_loss(student, teacher, batch, **kwargs)
    with torch.no_grad():
        for model in (student, teacher):
            model.lm_head.weight[TOKENIZER_VOCAB:] *= 50.0
    after = causal_lm_distillation_loss(student, teacher, batch, **kwargs)
    unsliced = causal_lm_distillation_loss(student, teacher, batch, chunk_size=5, compile=False)
    assert_rel(after.loss, before.loss, RTOL)
    assert abs(unsliced.loss.item() - after.loss.item()) > 0.1 * after.loss.item()


@pytest.mark.parametrize(
    ("divergence", "params"), [("fkl", {}), ("js", {}), ("akl", {"mu": 0.3}), ("srkl", {"skew": 0.2})]
)
def test_other_divergences_and_settings(divergence, params):
    student, teacher = llama(32, seed=13), gpt2(48, seed=14)
    batch = make_batch(seed=3)
    kwargs = dict(divergence=divergence, kd_rate=0.3, temperature=1.5, num_items_in_batch=20, **params)
    ref, ref_grads = run(lambda: independent_loss(student, teacher, batch, **kwargs), student)
    for fused_kwargs in (
        dict(chunk_size=3, compile=False),
        dict(chunk_size=None, compile=False),
        dict(fused=False),
    ):
        out, grads = run(
            lambda kw=fused_kwargs: causal_lm_distillation_loss(student, teacher, batch, **kw, **kwargs),
            student,
        )
        assert_same(out, grads, ref, ref_grads)
    assert_no_teacher_grads(teacher)


def test_head_with_bias():
    """A head with a bias: the fused path projects with it and returns its gradient."""
    student, teacher = llama(32, seed=15), llama(48, seed=16)
    for model in (student, teacher):
        head = nn.Linear(model.config.hidden_size, MODEL_VOCAB, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.normal_(0.0, 0.5)
        model.lm_head = head
    batch = make_batch(seed=4)
    ref, ref_grads = run(
        lambda: independent_loss(student, teacher, batch, vocab_size=TOKENIZER_VOCAB), student
    )
    out, grads = run(
        lambda: causal_lm_distillation_loss(
            student, teacher, batch, vocab_size=TOKENIZER_VOCAB, chunk_size=4, compile=False
        ),
        student,
    )
    assert_same(out, grads, ref, ref_grads)
    assert grads["lm_head.bias"].abs().sum() > 0 and torch.all(grads["lm_head.bias"][TOKENIZER_VOCAB:] == 0)
    assert_no_teacher_grads(teacher)


@pytest.mark.parametrize("fused", [True, False])
def test_gradient_accumulation_over_micro_batches(fused):
    student, teacher = llama(32, tied=True, seed=17), llama(48, seed=18)
    batch = make_batch(seed=5)
    total = num_supervised(batch)
    kwargs = dict(fused=fused, compile=False, chunk_size=4) if fused else dict(fused=False)
    full, full_grads = run(lambda: causal_lm_distillation_loss(student, teacher, batch, **kwargs), student)
    student.zero_grad(set_to_none=True)
    parts = []
    for rows in (slice(0, 2), slice(2, 3)):
        micro = {k: v[rows] for k, v in batch.items()}
        out = causal_lm_distillation_loss(student, teacher, micro, num_items_in_batch=total, **kwargs)
        out.loss.backward()
        parts.append(out)
    accumulated = student_grads(student)
    assert parts[0].num_tokens + parts[1].num_tokens == total == full.num_tokens
    assert_rel(parts[0].loss + parts[1].loss, full.loss, RTOL)
    for name, expected in full_grads.items():
        assert_rel(accumulated[name], expected, RTOL, name)


def test_eval_under_no_grad():
    student, teacher = gpt2(32, seed=19), gpt2(48, seed=20)
    batch = make_batch(seed=6)
    with torch.no_grad():
        ref = independent_loss(student, teacher, batch)
        out = causal_lm_distillation_loss(student, teacher, batch, chunk_size=4, compile=False)
    assert not out.loss.requires_grad
    assert_rel(out.loss, ref.loss, RTOL)
    assert_rel(out.kd, ref.kd, RTOL)
    assert all(p.grad is None for p in student.parameters())


# ----------------------------------------------------------------------------------------------------------
# SFT (no teacher)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("pair", ["llama-tied", "gpt2"])
def test_sft_without_teacher_is_cross_entropy(pair, fused):
    student, _ = PAIRS[pair]()
    batch = make_batch(seed=7)

    def cross_entropy():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)

    student.zero_grad(set_to_none=True)
    ce = cross_entropy()
    ce.backward()
    ref_grads = student_grads(student)
    kwargs = dict(chunk_size=4, compile=False) if fused else dict(fused=False)
    out, grads = run(
        lambda: causal_lm_distillation_loss(student, None, batch, kd_rate=0.0, **kwargs), student
    )
    assert out.num_tokens == num_supervised(batch)
    assert_rel(out.loss, ce, RTOL, "loss")
    assert_rel(out.ce, ce, RTOL, "ce")
    assert float(out.kd) == 0.0 and out.todi_weight is None
    for name, expected in ref_grads.items():
        assert_rel(grads[name], expected, RTOL, name)


def test_teacher_none_needs_kd_rate_zero():
    student = llama(32, seed=21)
    with pytest.raises(ValueError, match="kd_rate"):
        causal_lm_distillation_loss(student, None, make_batch(), kd_rate=0.5)


# ----------------------------------------------------------------------------------------------------------
# PEFT student
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lora_student_fused_only_adapters_get_grads():
    base, teacher = llama(32, seed=22), llama(48, seed=23)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    student = get_peft_model(base, config)
    batch = make_batch(seed=8)
    kwargs = dict(divergence="todi", kd_rate=0.5, vocab_size=TOKENIZER_VOCAB)
    ref, ref_grads = run(lambda: independent_loss(student, teacher, batch, **kwargs), student)
    out, grads = run(
        lambda: causal_lm_distillation_loss(student, teacher, batch, chunk_size=4, compile=False, **kwargs),
        student,
    )
    plain, plain_grads = run(
        lambda: causal_lm_distillation_loss(student, teacher, batch, fused=False, **kwargs), student
    )
    assert grads and all("lora_" in name for name in grads)
    assert {name.split("lora_")[1].split(".")[0] for name in grads} == {"A", "B"}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert_same(out, grads, ref, ref_grads)
    assert_same(plain, plain_grads, ref, ref_grads)
    # the frozen base weights (head and embeddings included) get nothing
    out = causal_lm_distillation_loss(student, teacher, batch, chunk_size=4, compile=False, **kwargs)
    out.loss.backward()
    for name, param in student.named_parameters():
        if "lora_" not in name:
            assert param.grad is None, name
    assert_no_teacher_grads(teacher)
    assert student(input_ids=batch["input_ids"]).logits.shape[-1] == MODEL_VOCAB  # head restored


# ----------------------------------------------------------------------------------------------------------
# models whose logits are post-processed
# ----------------------------------------------------------------------------------------------------------


def test_softcapping_attribute_refused_on_fused_path():
    student, teacher = llama(32, seed=24, final_logit_softcapping=30.0), llama(48, seed=25)
    batch = make_batch(seed=9)
    with pytest.raises(ValueError, match="final_logit_softcapping") as info:
        causal_lm_distillation_loss(student, teacher, batch, compile=False)
    assert "--no-fused" in str(info.value)
    # the teacher is checked too
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        causal_lm_distillation_loss(teacher, student, batch, compile=False)
    ref, ref_grads = run(lambda: independent_loss(student, teacher, batch), student)
    out, grads = run(lambda: causal_lm_distillation_loss(student, teacher, batch, fused=False), student)
    assert_same(out, grads, ref, ref_grads)


def test_gemma2_softcapping_refused_fused_and_works_materialised():
    student, teacher = gemma2(32, seed=26), gemma2(32, seed=27)
    batch = make_batch(seed=10)
    with pytest.raises(ValueError, match="final_logit_softcapping") as info:
        causal_lm_distillation_loss(student, teacher, batch, compile=False)
    assert "--no-fused" in str(info.value)
    ref, ref_grads = run(lambda: independent_loss(student, teacher, batch, divergence="fkl"), student)
    out, grads = run(
        lambda: causal_lm_distillation_loss(student, teacher, batch, divergence="fkl", fused=False), student
    )
    assert_same(out, grads, ref, ref_grads)
    # soft-capped logits really differ from the head's own output, which is why the fused path refuses
    logits = student(input_ids=batch["input_ids"]).logits
    assert logits.abs().max() < 5.0
