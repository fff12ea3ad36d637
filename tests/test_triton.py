"""The Triton backend of the fused loss (todi.losses.triton_loss / triton_kernel) on the CPU.

The row kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors, float32), which
conftest.py switches on for the test process on a machine without CUDA (with CUDA the compiled kernel is
checked by tests/test_cuda.py and these tests skip). The interpreter runs every program in Python, so the
shapes are tiny: V = 61 in blocks of 16 (every block edge and a partial last block). Every check is against float64 references
written from the formulas below, or the materialised float64 objective (distillation_loss on
``hidden @ weight.T + bias``), with norm-relative errors.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

from helpers import IGNORE, PARAMS, STUDENT, assert_rel, make_inputs, materialised_logits
from todi import cli
from todi.divergences import get_divergence
from todi.errors import UsageError
from todi.losses import distillation_loss, fused_linear_distillation_loss
from todi.losses import triton_loss as backend_mod
from todi.run_record import FREE_ON_RESUME
from todi.training import DistillConfig

KERNEL = list(backend_mod.KERNEL_DIVERGENCES)
RTOL = 1e-5  # float32 registers vs float64


def _interpreter_unavailable() -> str | None:
    """Why the interpreter tests cannot run here, or None (conftest.py sets TRITON_INTERPRET=1 first)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton; it is in the test extra)"
    if torch.cuda.is_available():
        return "a CUDA device is present: the compiled kernel is tested in tests/test_cuda.py"
    try:
        from triton.language import standard
        from triton.runtime.interpreter import InterpretedFunction

        from todi.losses import triton_kernel
    except Exception as err:  # a broken install
        return f"Triton does not import: {type(err).__name__}: {err}"
    if not (
        isinstance(standard.sum, InterpretedFunction)
        and isinstance(triton_kernel.distill_rows, InterpretedFunction)
    ):
        return (
            "Triton was imported without TRITON_INTERPRET=1 (see conftest.py); run TRITON_INTERPRET=1 pytest"
        )
    return None


NO_INTERPRETER = _interpreter_unavailable()
needs_interpreter = pytest.mark.skipif(NO_INTERPRETER is not None, reason=str(NO_INTERPRETER))


@pytest.fixture
def interpreter(monkeypatch):
    """TRITON_INTERPRET=1 (backend='triton' accepts CPU tensors only then) and 16-entry vocabulary blocks."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backend_mod, "_BLOCK", 16)


# ----------------------------------------------------------------------------------------------------------
# float64 references from the formulas
# ----------------------------------------------------------------------------------------------------------


def ref_divergence(name: str, lq: torch.Tensor, lp: torch.Tensor, params: dict) -> torch.Tensor:
    """D(p, q) of one position from log q (student) and log p (teacher) over the unmasked entries."""
    p, q = lp.exp(), lq.exp()
    if name == "fkl":
        return (p * (lp - lq)).sum()
    if name == "rkl":
        return (q * (lq - lp)).sum()
    if name == "js":
        log_m = ((p + q) / 2).log()
        return 0.5 * (p * (lp - log_m)).sum() + 0.5 * (q * (lq - log_m)).sum()
    if name == "tvd":
        return 0.5 * (p - q).abs().sum()
    if name == "skl":
        skew = params["skew"]
        return (p * (lp - (skew * p + (1 - skew) * q).log())).sum()
    if name == "srkl":
        skew = params["skew"]
        return (q * (lq - ((1 - skew) * p + skew * q).log())).sum()
    assert name == "todi"
    a = torch.sigmoid(params["beta"] * (lp - lq)).detach()  # stop-gradient weight
    return (a * p * (lp - lq) + (1 - a) * q * (lq - lp)).sum()


def ref_share(lq: torch.Tensor, lp: torch.Tensor, beta: float) -> float:
    """ToDi's FKL share sum a c / sum c, c = (a p - (1 - a) q) log(p / q); 1/2 when sum c = 0."""
    p, q = lp.exp(), lq.exp()
    a = torch.sigmoid(beta * (lp - lq))
    c = (a * p - (1 - a) * q) * (lp - lq)
    return float((a * c).sum() / c.sum()) if c.sum() > 0 else 0.5


def ref_rows(z, t, targets, name, params, kd_rate, temperature, scale):
    """float64: per-row CE, divergence and share, and d(sum_rows ((1 - k) CE + k D) * scale) / dz. Entries
    non-finite in either logit set leave both distributions; a row without entries has D = 0."""
    z64 = z.double().requires_grad_()
    t64 = t.double()
    ce, kd, share, total = [], [], [], 0.0
    for r in range(z.shape[0]):
        ce_r = torch.logsumexp(z64[r], 0) - z64[r, targets[r]]
        valid = torch.isfinite(z64[r]) & torch.isfinite(t64[r])
        d_r, s_r = z64.new_zeros(()), 0.5
        if name is not None and valid.any():
            lq = torch.log_softmax(z64[r][valid] / temperature, 0)
            lp = torch.log_softmax(t64[r][valid] / temperature, 0)
            d_r = ref_divergence(name, lq, lp, params)
            s_r = ref_share(lq.detach(), lp, params.get("beta", 1.0))
        total = total + ((1 - kd_rate) * ce_r + kd_rate * d_r) * scale
        ce.append(ce_r.detach())
        kd.append(d_r.detach())
        share.append(s_r)
    total.backward()
    return torch.stack(ce), torch.stack(kd), torch.tensor(share, dtype=torch.float64), z64.grad


# ----------------------------------------------------------------------------------------------------------
# the row kernel alone
# ----------------------------------------------------------------------------------------------------------


def chunk_problem(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """5 rows, V = 61: plain; a -inf student entry; -inf and +inf teacher entries; a fully masked teacher
    row; logits large enough that float32 probabilities underflow."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(5, 61, generator=g) * 3
    t = torch.randn(5, 61, generator=g) * 3
    targets = torch.randint(0, 61, (5,), generator=g)
    z[1, [4, 40]] = -math.inf
    targets[1] = 7
    t[2, [0, 15, 16, 60]] = -math.inf
    t[2, 33] = math.inf
    t[3] = -math.inf
    z[4] *= 15
    t[4] *= 15
    return z, t, targets


@needs_interpreter
@pytest.mark.parametrize("name", [*KERNEL, None], ids=[*KERNEL, "ce-only"])
def test_row_kernel_matches_float64(name, interpreter):
    params = get_divergence(name or "fkl").resolve(PARAMS.get(name, {}))
    for temperature, kd_rate in ((1.0, 0.3), (2.0, 0.5)):
        z, t, targets = chunk_problem(seed=KERNEL.index(name) if name else 99)
        kd_rate = kd_rate if name else 0.0
        scale = torch.tensor(1 / 9.0)
        ref_ce, ref_kd, ref_share_, ref_grad = ref_rows(
            z, t, targets, name, params, kd_rate, temperature, 1 / 9.0
        )
        buffer = z.clone()
        ce, kd, share = backend_mod.run_chunk(
            buffer, None if name is None else t, targets, scale, name or "fkl", params, kd_rate, temperature,
            need_grad=True,
        )  # fmt: skip
        label = f"{name} T={temperature}"
        assert_rel(ce, ref_ce, RTOL, f"CE {label}")
        assert_rel(kd, ref_kd, RTOL, f"divergence {label}")
        assert kd[3] == 0 or name is None  # every entry masked
        if name == "todi":
            assert_rel(share, ref_share_, RTOL, f"share {label}")
        assert_rel(buffer, ref_grad, RTOL, f"d loss / d logits {label}")
        # a masked entry gets CE's gradient only; -inf student logits get none at all
        assert torch.all(buffer[1, [4, 40]] == 0)

    values = z.clone()  # without gradients the logits are left alone
    again = backend_mod.run_chunk(
        values, None if name is None else t, targets, scale, name or "fkl", params, kd_rate, temperature,
        need_grad=False,
    )  # fmt: skip
    assert torch.equal(values, z)
    assert torch.equal(again[0], ce) and torch.equal(again[1], kd)


# ----------------------------------------------------------------------------------------------------------
# through fused_linear_distillation_loss(backend="triton")
# ----------------------------------------------------------------------------------------------------------


def leaves(inputs: dict) -> dict:
    return {
        k: v.detach().clone().requires_grad_(k in STUDENT) if isinstance(v, torch.Tensor) and v.is_floating_point()
        else v
        for k, v in inputs.items()
    }  # fmt: skip


def fused_and_reference(inputs: dict, chunk: int, **kwargs) -> tuple:
    ref_leaves = leaves({k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                         for k, v in inputs.items()})  # fmt: skip
    student, teacher = materialised_logits(ref_leaves)
    ref = distillation_loss(student, teacher, ref_leaves["labels"], **kwargs)
    ref.loss.backward()
    mine = leaves(inputs)
    out = fused_linear_distillation_loss(
        mine["student_hidden"],
        mine["student_weight"],
        mine["teacher_hidden"],
        mine["teacher_weight"],
        mine["labels"],
        student_bias=mine["student_bias"],
        teacher_bias=mine["teacher_bias"],
        chunk_size=chunk,
        backend="triton",
        **kwargs,
    )
    out.loss.backward()
    grads = {k: mine[k].grad for k in STUDENT if mine[k] is not None}
    ref_grads = {k: ref_leaves[k].grad for k in STUDENT if ref_leaves[k] is not None}
    return out, ref, grads, ref_grads


def assert_close(out, ref, grads, ref_grads, rtol=RTOL) -> None:
    assert out.num_tokens == ref.num_tokens
    for attr in ("loss", "ce", "kd"):
        assert_rel(getattr(out, attr), getattr(ref, attr), rtol, attr)
    assert (out.todi_weight is None) == (ref.todi_weight is None)
    if ref.todi_weight is not None:
        assert_rel(out.todi_weight, ref.todi_weight, rtol, "todi_weight")
    assert grads.keys() == ref_grads.keys()
    for key, expected in ref_grads.items():
        assert grads[key].dtype == torch.float32
        assert_rel(grads[key], expected, rtol, key)


@needs_interpreter
@pytest.mark.parametrize("name", KERNEL)
def test_fused_triton_matches_float64(name, interpreter):
    """14 rows, 4 ignored: chunks of 4 supervised rows (two full, one of 2); masked vocabulary items: two
    -inf teacher bias entries and one -inf student bias entry; T = 2 or 1 by divergence."""
    inputs = make_inputs(
        14, vocab=61, num_ignored=4, student_bias=True, teacher_bias=True, seed=KERNEL.index(name)
    )
    inputs["teacher_bias"][[3, 50]] = -math.inf
    inputs["student_bias"][20] = -math.inf
    inputs["labels"][inputs["labels"] == 20] = 0  # a -inf target makes CE infinite
    temperature = 2.0 if KERNEL.index(name) % 2 == 0 else 1.0
    kwargs = dict(divergence=name, kd_rate=0.5, temperature=temperature, **PARAMS.get(name, {}))
    out, ref, grads, ref_grads = fused_and_reference(inputs, chunk=4, **kwargs)
    assert_close(out, ref, grads, ref_grads)
    assert torch.all(grads["student_hidden"][inputs["labels"] == IGNORE] == 0)
    assert torch.all(grads["student_weight"][20] == 0) and grads["student_bias"][20] == 0


@needs_interpreter
@pytest.mark.parametrize("kd_rate", [0.0, 1.0])
def test_fused_triton_ce_alone_and_divergence_alone(kd_rate, interpreter):
    inputs = make_inputs(9, vocab=61, num_ignored=2, seed=5)
    if kd_rate == 0:
        inputs["teacher_hidden"] = inputs["teacher_weight"] = None  # plain SFT: no teacher at all
    out, ref, grads, ref_grads = fused_and_reference(inputs, chunk=4, divergence="todi", kd_rate=kd_rate)
    assert_close(out, ref, grads, ref_grads)
    assert float(out.ce if kd_rate == 1 else out.kd) == 0.0


@needs_interpreter
def test_fused_triton_without_supervised_rows_and_without_grad(interpreter):
    inputs = make_inputs(6, vocab=61, num_ignored=6, seed=6)
    out, ref, grads, _ = fused_and_reference(inputs, chunk=4, divergence="js")
    assert out.num_tokens == 0 and out.loss.item() == 0.0
    assert all(torch.all(g == 0) for g in grads.values())

    inputs = make_inputs(7, vocab=61, num_ignored=1, seed=7)
    student, teacher = materialised_logits({k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point()
                                            else v for k, v in inputs.items()})  # fmt: skip
    ref = distillation_loss(student, teacher, inputs["labels"], divergence="tvd")
    with torch.no_grad():
        out = fused_linear_distillation_loss(
            *(inputs[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")),
            inputs["labels"],
            divergence="tvd",
            backend="triton",
        )
    assert not out.loss.requires_grad
    assert_rel(out.loss, ref.loss, RTOL, "loss without grad")


@pytest.mark.slow
@needs_interpreter
def test_causal_lm_takes_the_backend(interpreter, monkeypatch):
    """causal_lm_distillation_loss(backend="triton") on a tiny Llama pair (heads of 101 rows sliced to 97)
    against the materialised loss of float64 copies of the models."""
    import copy

    from transformers import LlamaForCausalLM

    from tiny import llama_config
    from todi.losses import causal_lm_distillation_loss

    monkeypatch.setattr(backend_mod, "_BLOCK", 64)  # 2 tiles of the 97 entries: a shorter interpreter run
    models = []
    for hidden, seed in ((32, 1), (48, 2)):
        torch.manual_seed(seed)
        models.append(LlamaForCausalLM(llama_config(101, hidden, max_positions=32)).eval())
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(3, 97, (2, 9), generator=g),
        "attention_mask": torch.ones(2, 9).long(),
    }
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][:, :3] = IGNORE
    kwargs = dict(divergence="todi", kd_rate=0.5, temperature=2.0, vocab_size=97)

    ref_models = [copy.deepcopy(m).double() for m in models]
    ref = causal_lm_distillation_loss(*ref_models, batch, fused=False, **kwargs)
    ref.loss.backward()
    out = causal_lm_distillation_loss(*models, batch, backend="triton", **kwargs)
    out.loss.backward()
    assert out.num_tokens == ref.num_tokens == 12
    assert_rel(out.loss, ref.loss, RTOL, "loss")
    assert_rel(out.todi_weight, ref.todi_weight, RTOL, "todi_weight")
    for name in ("lm_head.weight", "model.norm.weight", "model.layers.0.mlp.up_proj.weight"):
        grad = dict(models[0].named_parameters())[name].grad
        assert_rel(grad, dict(ref_models[0].named_parameters())[name].grad, 1e-4, name)
    assert all(p.grad is None for p in models[1].parameters())


# ----------------------------------------------------------------------------------------------------------
# choosing the backend (no kernel runs)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_auto_takes_triton_on_cuda_where_it_serves_the_case():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for name in KERNEL:
        assert backend_mod.resolve_backend("auto", cuda, name, "dense") == "triton"
    assert backend_mod.resolve_backend("auto", cuda, "akl", "dense") == "torch"
    assert backend_mod.resolve_backend("auto", cuda, "akl", "none") == "triton"  # CE alone
    for form in ("sparse", "spread"):
        assert backend_mod.resolve_backend("auto", cuda, "todi", form) == "torch"
    assert backend_mod.resolve_backend("auto", cpu, "todi", "dense") == "torch"
    assert backend_mod.resolve_backend("torch", cuda, "todi", "dense") == "torch"


def test_auto_stays_on_torch_on_the_cpu(monkeypatch):
    """The CPU path is the torch one, whatever TRITON_INTERPRET says."""
    import todi.losses.fused as fused_mod

    def refuse(*args, **kwargs):
        raise AssertionError("the Triton kernel ran on the CPU without backend='triton'")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(fused_mod._ChunkStep, "run_triton", refuse)
    inputs = make_inputs(8, vocab=61, seed=8)
    out = fused_linear_distillation_loss(
        *(inputs[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")),
        inputs["labels"],
        compile=False,
    )
    assert math.isfinite(out.loss.item())


def test_triton_backend_refusals(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="does not serve divergence 'akl'"):
        backend_mod.resolve_backend("triton", cpu, "akl", "dense")
    with pytest.raises(ValueError, match="does not serve a sparse"):
        backend_mod.resolve_backend("triton", cpu, "todi", "spread")
    with pytest.raises(ValueError, match="backend must be one of auto, triton, torch"):
        backend_mod.resolve_backend("cuda", cpu, "todi", "dense")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if importlib.util.find_spec("triton") is not None:
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            backend_mod.resolve_backend("triton", cpu, "todi", "dense")
    else:
        with pytest.raises(ValueError, match="pip install triton"):
            backend_mod.resolve_backend("triton", cpu, "todi", "dense")


def test_triton_chunk_size_documented_examples():
    # 256 MiB for the student and teacher blocks in bf16: V = 49,152 -> 1,365 rows -> 1,024
    assert backend_mod.triton_chunk_size(100_000, 49152, 2, True) == 1024
    assert backend_mod.triton_chunk_size(100_000, 128256, 2, True) == 512
    assert backend_mod.triton_chunk_size(100_000, 128256, 2, False) == 1024  # CE alone: one block
    assert backend_mod.triton_chunk_size(300, 49152, 2, True) == 512  # the rows, rounded up
    assert backend_mod.triton_chunk_size(100_000, 10**8, 4, True) == 16  # the lower clamp


def test_loss_backend_option(tmp_path):
    _, config = cli.parse_config(
        "distill",
        ["--teacher", "t", "--student", "s", "--data", "d", "--out", "o", "--loss-backend", "torch"],
    )
    assert config.loss_backend == "torch" and config.problems() == []
    assert "loss_backend" in FREE_ON_RESUME  # how the loss is computed, not what it computes
    with pytest.raises(UsageError, match="--loss-backend triton does not serve --teacher-cache"):
        DistillConfig(teacher_cache="c", student="s", data="d", out="o", loss_backend="triton")


# ----------------------------------------------------------------------------------------------------------
# the compiled kernel, without a GPU: Triton's compiler targets sm_90 (H100 / H200) from any machine
# ----------------------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = """
import json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from todi.losses import triton_kernel, triton_loss

codes = [0, *triton_loss.KERNEL_DIVERGENCES.values()]
assert [int(c) for c in (triton_kernel.CE_ONLY, triton_kernel.FKL, triton_kernel.RKL, triton_kernel.JS,
        triton_kernel.TVD, triton_kernel.SKL, triton_kernel.SRKL, triton_kernel.TODI)] == list(range(8))
names = ["z_ptr", "t_ptr", "target_ptr", "scale_ptr", "out_ptr", "n_rows", "vocab", "z_stride", "t_stride",
         "kd_rate", "inv_t", "beta", "log_w_teacher", "log_w_student"]
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
usage = {}
for code, dtype, need_grad in [(c, "bf16", True) for c in codes] + [(7, "fp32", False)]:
    types = [f"*{dtype}", f"*{dtype}", "*i64", "*fp32", "*fp32", "i32", "i32", "i32", "i32"] + ["fp32"] * 5
    signature = {**dict(zip(names, types)), "DIV": "constexpr", "NEED_GRAD": "constexpr", "BLOCK": "constexpr"}
    constexprs = {"DIV": code, "NEED_GRAD": need_grad, "BLOCK": triton_loss._BLOCK}
    kernel = triton.compile(ASTSource(triton_kernel.distill_rows, signature, constexprs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": triton_loss._NUM_WARPS})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        if os.path.exists(cuobjdump):
            out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
            usage[f"{code}-{dtype}-{need_grad}"] = [l.strip() for l in out.stdout.splitlines() if "REG:" in l]
print(json.dumps(usage))
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_kernel_compiles_for_sm90_without_spilling(tmp_path):
    """Every divergence's kernel (bf16, with gradients) and one float32 variant go through Triton's whole
    compiler to an sm_90 cubin (the interpreter accepts code the compiler refuses, e.g. non-constexpr
    globals), in a fresh process without TRITON_INTERPRET; none spills registers to local memory."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = str(Path(backend_mod.__file__).parents[2])
    env.update(PYTHONPATH=os.pathsep.join([src, env.get("PYTHONPATH", "")]), TRITON_CACHE_DIR=str(tmp_path))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this Triton build has no NVIDIA backend")
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    usage = json.loads(proc.stdout.strip().splitlines()[-1])
    for variant, lines in usage.items():
        assert lines and all("LOCAL:0" in line for line in lines), (variant, lines)
