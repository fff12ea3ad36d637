"""The losses on a CUDA device, checked against float64 references computed on the CPU.

Skipped without a CUDA device. Every check compares CUDA results with an independent float64 CPU reference:
the materialised objective (:func:`todi.losses.distillation_loss` on ``hidden @ weight.T (+ bias)`` logits,
the sparse teacher's :func:`todi.losses.sparse_distillation_loss`) evaluated in float64 with autograd.
Errors are norm-relative per tensor. float32 on the device agrees to ~3e-7 (measured on the CPU), so the
float32 tolerance (2e-5) is loose enough for any reduction order and tight enough to catch TF32 matmuls
(~2e-4 on the gradients, emulated) or bf16 softmax math (>= 4e-4 on the divergence).

Order matters with ``pytest -x``: the eager loss checks, then the torch.compile (Triton) ones, then the
Triton row kernel of the fused loss (``backend="triton"``, todi.losses.triton_loss), then one ``todi distill``
run (the most likely to trip over a library version, and the least central; it takes the Triton backend,
the default on CUDA). The torch-backend checks pass ``backend="torch"``.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

import todi.losses.fused as fused_mod
from helpers import (
    IGNORE,
    PARAMS,
    STUDENT,
    TEACHER,
    assert_rel,
    make_inputs,
    materialised_logits,
    sparse_problem,
)
from todi.divergences import DIVERGENCES
from todi.losses import (
    SparseTeacher,
    distillation_loss,
    fused_linear_distillation_loss,
    sparse_distillation_loss,
)

DEVICE = "cuda"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("no_compile_override"),  # the tests choose the compile path explicitly
]

RTOL = 2e-5  # float32 on the device vs float64
# bf16 inputs: against float64 on the same bf16 values, the logits' own bf16 rounding dominates (measured
# ~1e-5 on the loss, ~2.5e-3 on the bf16 gradients); against float64 math on the bf16-rounded logits the
# float32 softmax agrees to ~1e-7, while bf16 softmax math would be off by >= 4e-4.
BF16_LOSS_RTOL, BF16_GRAD_RTOL, BF16_LOGIT_RTOL = 1e-3, 2e-2, 5e-5


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
    """TF32 matmuls would dominate the float32 error."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def cast(inputs: dict, dtype: torch.dtype, device: str) -> dict:
    """Fresh leaves of ``dtype`` on ``device``; student tensors require grad, teacher ones do too (no
    gradient may reach them)."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.to(device=device, dtype=dtype).detach().requires_grad_(key in STUDENT + TEACHER)
        elif isinstance(value, torch.Tensor):
            value = value.to(device)
        out[key] = value
    return out


def reference(inputs: dict, **kwargs) -> tuple:
    """float64 CPU: distillation_loss on the materialised logits, autograd gradients of the student."""
    leaves = cast(inputs, torch.float64, "cpu")
    student, teacher = materialised_logits(leaves)
    out = distillation_loss(student, teacher, leaves["labels"], **kwargs)
    out.loss.backward()
    return out, {k: leaves[k].grad for k in STUDENT if leaves[k] is not None}


def fused(inputs: dict, dtype: torch.dtype, device: str, backend: str = "torch", **kwargs) -> tuple:
    leaves = cast(inputs, dtype, device)
    out = fused_linear_distillation_loss(
        leaves["student_hidden"],
        leaves["student_weight"],
        leaves["teacher_hidden"],
        leaves["teacher_weight"],
        leaves["labels"],
        student_bias=leaves["student_bias"],
        teacher_bias=leaves["teacher_bias"],
        backend=backend,
        **kwargs,
    )
    out.loss.backward()
    for key in TEACHER:
        assert leaves[key] is None or leaves[key].grad is None, f"{key} received a gradient"
    return out, {k: leaves[k].grad for k in STUDENT if leaves[k] is not None}


def assert_matches(out, ref, grads, ref_grads, device: str, rtol: float, grad_rtol: float) -> None:
    assert out.loss.device.type == torch.device(device).type
    assert out.loss.dtype == torch.float32
    assert out.num_tokens == ref.num_tokens
    for attr in ("loss", "ce", "kd"):
        assert_rel(getattr(out, attr), getattr(ref, attr), rtol, attr)
    if ref.todi_weight is not None:
        assert_rel(out.todi_weight, ref.todi_weight, rtol, "todi_weight")
    assert grads.keys() == ref_grads.keys()
    for key, expected in ref_grads.items():
        assert grads[key].device.type == torch.device(device).type, key
        assert_rel(grads[key], expected, grad_rtol, key)


# (n, ignored): 170 supervised rows in chunks of 32 = 5 full chunks (compiled when compile=True) + 10 rows
DENSE = dict(n=200, h_s=64, h_t=96, vocab=1000, num_ignored=30, student_bias=True, teacher_bias=True)
DENSE_CHUNK = 32


def check_dense_float32(
    name: str, compile: bool, device: str = DEVICE, backend: str = "torch", temperature: float = 2.0
) -> None:
    inputs = make_inputs(**DENSE, seed=DIVERGENCES.index(name), dtype=torch.float64)  # CPU master copies
    kwargs = dict(divergence=name, kd_rate=0.5, temperature=temperature, **PARAMS.get(name, {}))
    ref, ref_grads = reference(inputs, **kwargs)
    out, grads = fused(
        inputs, torch.float32, device, backend, chunk_size=DENSE_CHUNK, compile=compile, **kwargs
    )
    assert_matches(out, ref, grads, ref_grads, device, RTOL, RTOL)
    for key, grad in grads.items():
        assert grad.dtype == torch.float32, key
    ignored = inputs["labels"] == IGNORE
    assert torch.all(grads["student_hidden"][ignored.to(device)] == 0)


def bf16_rounded(inputs: dict) -> dict:
    """The same values rounded to bf16 and held again in float64 (the reference's inputs)."""
    return {
        k: v.to(torch.bfloat16).double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in inputs.items()
    }


def check_fused_bf16(name: str, masked: bool, device: str = DEVICE, backend: str = "torch") -> None:
    """bf16 hidden states and heads: float32 softmax math on the bf16 logits."""
    inputs = bf16_rounded(make_inputs(**DENSE, seed=100 + DIVERGENCES.index(name), dtype=torch.float64))
    if masked:  # masked vocabulary items: -inf and +inf teacher logits in whole columns
        inputs["teacher_bias"][[3, 500, 998]] = -math.inf
        inputs["teacher_bias"][[41]] = math.inf
    kwargs = dict(divergence=name, kd_rate=0.5, temperature=2.0, **PARAMS.get(name, {}))
    ref, ref_grads = reference(inputs, **kwargs)
    out, grads = fused(
        inputs, torch.bfloat16, device, backend, chunk_size=DENSE_CHUNK, compile=False, **kwargs
    )
    assert math.isfinite(out.loss.item()) and math.isfinite(float(out.kd))
    assert_matches(out, ref, grads, ref_grads, device, BF16_LOSS_RTOL, BF16_GRAD_RTOL)
    for key, grad in grads.items():
        assert grad.dtype == torch.bfloat16, key
        assert torch.isfinite(grad).all(), key
    # Sharper: float64 math on the logits rounded to bf16 as the device's bf16 matmul rounds them. Only the
    # softmax / divergence precision differs now: float32 (the reference semantics) passes, bf16 would not.
    with torch.no_grad():
        z_s = inputs["student_hidden"] @ inputs["student_weight"].T + inputs["student_bias"]
        z_t = inputs["teacher_hidden"] @ inputs["teacher_weight"].T + inputs["teacher_bias"]
        rounded = distillation_loss(
            z_s.bfloat16().double(), z_t.bfloat16().double(), inputs["labels"], **kwargs
        )
    for attr in ("loss", "ce", "kd"):
        assert_rel(getattr(out, attr), getattr(rounded, attr), BF16_LOGIT_RTOL, f"{attr} vs bf16 logits")


def check_dense_loss_bf16_non_finite(name: str, device: str = DEVICE) -> None:
    """distillation_loss on bf16 [B, T, V] logits with -inf / +inf teacher entries (and a -inf student
    entry): finite, float32 math, equal to float64 math on the same values."""
    g = torch.Generator().manual_seed(200 + DIVERGENCES.index(name))
    vocab = 301
    student = (torch.randn(3, 20, vocab, generator=g, dtype=torch.float64) * 3).bfloat16().double()
    teacher = (torch.randn(3, 20, vocab, generator=g, dtype=torch.float64) * 3).bfloat16().double()
    labels = torch.randint(0, vocab, (3, 20), generator=g)
    labels[:, :4] = IGNORE
    teacher[0, 5, [2, 7, 100]] = -math.inf
    teacher[1, 9, 50] = math.inf
    teacher[:, :, 300] = -math.inf  # a column masked everywhere
    teacher[2, 11] = -math.inf  # a fully masked position: divergence 0
    student[0, 6, 17] = -math.inf
    labels[labels == 17] = 0  # a -inf target would make CE infinite in both
    kwargs = dict(divergence=name, kd_rate=0.5, temperature=2.0, **PARAMS.get(name, {}))

    s64 = student.clone().requires_grad_()
    ref = distillation_loss(s64, teacher, labels, **kwargs)
    ref.loss.backward()
    s = student.to(device=device, dtype=torch.bfloat16).requires_grad_()
    out = distillation_loss(s, teacher.to(device=device, dtype=torch.bfloat16), labels.to(device), **kwargs)
    out.loss.backward()
    assert out.loss.device.type == torch.device(device).type and out.loss.dtype == torch.float32
    assert math.isfinite(out.loss.item())
    for attr in ("loss", "ce", "kd"):
        assert_rel(getattr(out, attr), getattr(ref, attr), RTOL, attr)
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad).all()
    assert_rel(s.grad, s64.grad, BF16_GRAD_RTOL, "grad of the student logits")


SPARSE = dict(n=120, vocab=257, hidden=16, ignored=(0, 4, 9, 50, 51))  # sparse_problem's shape here


def check_sparse(name: str, mode: str, k: int | None, compile: bool, device: str = DEVICE) -> None:
    """The fused sparse-teacher path vs the materialised sparse loss in float64 (same stored teacher)."""
    h, w, teacher, labels = sparse_problem(**SPARSE, seed=300 + DIVERGENCES.index(name))
    keep = labels != IGNORE
    k = k or teacher.shape[1]
    g = torch.Generator().manual_seed(0)
    sparse = SparseTeacher.from_logits(teacher[keep].float(), k, (2.0,), tail_samples=8, generator=g)
    sparse.tail_mode = mode
    kwargs = dict(divergence=name, kd_rate=0.5, temperature=2.0, **PARAMS.get(name, {}))

    sparse64 = sparse.apply(lambda t: t.double() if t.is_floating_point() else t)
    h64, w64 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = sparse_distillation_loss(h64 @ w64.T, sparse64, labels, **kwargs)
    ref.loss.backward()

    hd = h.to(device=device, dtype=torch.float32).requires_grad_()
    wd = w.to(device=device, dtype=torch.float32).requires_grad_()
    out = fused_linear_distillation_loss(
        hd,
        wd,
        None,
        None,
        labels.to(device),
        sparse_teacher=sparse.to(device),
        chunk_size=16,  # 115 supervised rows: 7 full chunks + 3 rows
        compile=compile,
        **kwargs,
    )
    out.loss.backward()
    assert_matches(out, ref, {"h": hd.grad, "w": wd.grad}, {"h": h64.grad, "w": w64.grad}, device, RTOL, RTOL)


def compiled_kernels(device: str) -> dict:
    """The fused module's compiled kernels for ``device`` that have not failed."""
    return {
        key: fn
        for key, fn in fused_mod._COMPILED.items()
        if key[4] == torch.device(device).type and key not in fused_mod._COMPILE_FAILED
    }


def run_compiled(check, *args, device: str = DEVICE, caplog: pytest.LogCaptureFixture) -> None:
    """``check(*args, compile=True)`` must compile a new chunk kernel with inductor (Triton on CUDA) and
    never fall back to eager. Dynamo's caches are reset first, so each test compiles its own graph rather
    than reusing one an earlier test compiled."""
    torch._dynamo.reset()
    before = set(compiled_kernels(device))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with caplog.at_level(logging.WARNING, logger="todi.losses.fused"):
        check(*args, compile=True, device=device)
    assert not [r for r in caplog.records if "torch.compile" in r.getMessage()], caplog.text
    assert set(compiled_kernels(device)) - before, "no chunk kernel was compiled"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs, "dynamo compiled no graph"


# ----------------------------------------------------------------------------------------------------------
# eager
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DIVERGENCES)
def test_fused_float32_eager_matches_float64(name):
    check_dense_float32(name, compile=False)


@pytest.mark.parametrize("masked", [False, True], ids=["finite", "inf-teacher"])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_fused_bf16_uses_float32_softmax(name, masked):
    check_fused_bf16(name, masked)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_materialised_loss_bf16_with_inf_teacher_logits(name):
    check_dense_loss_bf16_non_finite(name)


@pytest.mark.parametrize("k", [7, None], ids=["k7", "kV"])
@pytest.mark.parametrize("mode", ["bucket", "uniform", "sampled"])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_fused_sparse_teacher_eager_matches_float64(name, mode, k):
    check_sparse(name, mode, k, compile=False)


def check_gpu_draws(device: str) -> None:
    """Identical rows get m draws each, independent across rows: their pooled frequencies must match the
    float64 tempered tail (5 binomial standard deviations)."""
    teacher = sparse_problem(**SPARSE, seed=7)[2][:1]
    rows, m = 5000, 8
    g = torch.Generator(device).manual_seed(1)
    logits = teacher.float().to(device).expand(rows, -1)
    sparse = SparseTeacher.from_logits(logits, 6, (2.0,), tail_samples=m, generator=g)
    samples, ids = sparse.tail_samples[2.0].cpu(), sparse.ids[0].cpu()
    assert samples.shape == (rows, m) and not torch.isin(samples, ids).any()
    p = torch.softmax(teacher[0] / 2.0, -1).scatter(-1, ids, 0.0)
    expected = p / p.sum()
    draws = rows * m
    ones = torch.ones(draws, dtype=torch.float64)
    freq = torch.zeros_like(expected).scatter_add(0, samples.flatten(), ones) / draws
    sd = (expected * (1 - expected) / draws).sqrt()
    assert ((freq - expected).abs() <= 5 * sd + 1e-4).all()


def test_tail_samples_drawn_on_the_gpu_follow_the_tempered_tail():
    """todi cache-teacher draws the tail samples where the teacher runs: with a CUDA generator."""
    check_gpu_draws(DEVICE)


# ----------------------------------------------------------------------------------------------------------
# torch.compile (inductor -> Triton on CUDA)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DIVERGENCES)
def test_fused_float32_compiled_matches_float64(name, caplog):
    run_compiled(check_dense_float32, name, caplog=caplog)


@pytest.mark.parametrize("mode", ["bucket", "uniform", "sampled"])
def test_fused_sparse_teacher_compiled_matches_float64(mode, caplog):
    run_compiled(check_sparse, "todi", mode, 7, caplog=caplog)


# ----------------------------------------------------------------------------------------------------------
# the Triton row kernel (backend="triton"): the same checks as the torch backend's
# ----------------------------------------------------------------------------------------------------------

KERNEL_DIVERGENCES = [name for name in DIVERGENCES if name != "akl"]  # akl stays on the torch backend


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", KERNEL_DIVERGENCES)
def test_triton_float32_matches_float64(name, temperature):
    check_dense_float32(name, compile=False, backend="triton", temperature=temperature)


@pytest.mark.parametrize("masked", [False, True], ids=["finite", "inf-teacher"])
@pytest.mark.parametrize("name", KERNEL_DIVERGENCES)
def test_triton_bf16_uses_float32_registers(name, masked):
    """bf16 logits in memory, float32 in the kernel; the gradient is written over the bf16 logits (rounded
    to bf16 before the dX and dW products) and dW is summed over chunks in float32."""
    check_fused_bf16(name, masked, backend="triton")


def test_triton_is_the_default_on_cuda(monkeypatch):
    """backend="auto" takes the row kernel on CUDA (and the torch backend for akl)."""
    calls = []
    real = fused_mod._ChunkStep.run_triton

    def spy(self, *args):
        calls.append(self.objective.divergence.name)
        return real(self, *args)

    monkeypatch.setattr(fused_mod._ChunkStep, "run_triton", spy)
    inputs = cast(make_inputs(40, vocab=300, num_ignored=5, seed=3), torch.float32, DEVICE)
    for name in ("todi", "akl"):
        fused_linear_distillation_loss(
            *(inputs[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")),
            inputs["labels"],
            divergence=name,
        ).loss.backward()
    assert calls and set(calls) == {"todi"}


# ----------------------------------------------------------------------------------------------------------
# one training step end to end
# ----------------------------------------------------------------------------------------------------------


def _byte_level_tokenizer():
    """A small byte-level BPE tokenizer trained here (no files needed on the GPU machine)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tiny import TEXT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    prompt = "Below is an instruction that describes a task. Write a response. ### Instruction: ### Response:"
    tok.train_from_iterator([TEXT, prompt] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def run_distill_steps(tmp_path, device: str = DEVICE) -> dict:
    """`todi distill` for 2 steps (2-layer Llama teacher and student) in this process; returns the last
    metrics record and run_info.json."""
    from accelerate.state import AcceleratorState, GradientState

    from tiny import save_llama, write_data
    from todi import cli

    tokenizer = _byte_level_tokenizer()
    teacher = save_llama(tmp_path / "teacher", tokenizer, hidden=64, seed=1)
    student = save_llama(tmp_path / "student", tokenizer, hidden=32, seed=2)
    data = write_data(tmp_path / "train.jsonl", 16, seed=0)
    out = tmp_path / "run"
    argv = ["distill", "--teacher", teacher, "--student", student, "--data", data, "--out", out]
    argv += ["--loss", "todi", "--max-steps", "2", "--batch-size", "4", "--max-length", "64"]
    argv += ["--max-prompt-length", "32", "--report-to", "none", "--log-every", "1", "--save-every", "0"]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        status = cli.main([str(a) for a in argv])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert status == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2], records
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kd"]) for r in train), train
    assert (out / "final" / "model.safetensors").is_file()
    return {"last": train[-1], "info": json.loads((out / "run_info.json").read_text())}


def test_distill_two_steps_on_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv("TODI_COMPILE", "0")  # compilation is covered above; keep this step quick
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_distill_steps(tmp_path)
    # The trainer picked the GPU: bf16 autocast is only chosen there, and the models' tensors took device
    # memory (the CUDA allocator's peak was reset just before the run).
    expected = "bf16" if torch.cuda.is_bf16_supported() else "no"
    assert result["info"]["mixed_precision"] == expected, result["info"]
    # metrics.jsonl's peak_mem is the CUDA allocator's peak on a GPU (the resident set size on a CPU)
    assert 0 < result["last"]["peak_mem"] <= torch.cuda.max_memory_allocated() / 2**20
