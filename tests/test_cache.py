"""The teacher cache: sparse-teacher losses against float64 references, the cache files, and
`todi distill --teacher-cache` against online distillation (tiny random models, GPT-2 tokenizer)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import sparse_problem
from tiny import GPT2_DIR, TINY
from tiny import gpt2_tokenizer as _tokenizer
from tiny import save_llama as _save_llama
from tiny import write_data as _write_data
from todi import cli
from todi.divergences import DIVERGENCES
from todi.losses import (
    SparseTeacher,
    distillation_loss,
    fused_linear_distillation_loss,
    sparse_distillation_loss,
)


@pytest.fixture(autouse=True)
def _no_compile(monkeypatch):
    monkeypatch.setenv("TODI_COMPILE", "0")


def _bucketed(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """float64 reference: the tempered distribution over the k ids plus one bucket for the rest."""
    p = torch.softmax(logits.double() / temperature, dim=-1)
    top = p.gather(-1, ids)
    return torch.cat([top, (1 - top.sum(-1, keepdim=True)).clamp_min(0)], dim=-1)


# ---- the sparse teacher ---------------------------------------------------------------------------


def test_from_logits_matches_float64_top_k_and_tail():
    _, _, teacher, _ = sparse_problem()
    sparse = SparseTeacher.from_logits(teacher.float(), 5, (2.0, 3.0))
    p = torch.softmax(teacher, -1)
    top, ids = p.topk(5, dim=-1)
    assert torch.equal(sparse.ids, ids)
    torch.testing.assert_close(sparse.logprobs.double(), top.log(), atol=1e-5, rtol=0)
    torch.testing.assert_close(sparse.tail.double(), (1 - top.sum(-1)).log(), atol=1e-5, rtol=0)
    rest = p.scatter(-1, ids, 0.0)
    for t in (2.0, 3.0):
        torch.testing.assert_close(
            sparse.tempered_tails[t].double(), rest.pow(1 / t).sum(-1).log(), atol=1e-5, rtol=0
        )
    # at temperature T the bucket distribution is the exactly tempered teacher, merged outside the k ids
    torch.testing.assert_close(
        sparse.bucket_log_probs(2.0).double().exp(), _bucketed(teacher, ids, 2.0), atol=1e-6, rtol=0
    )


def test_untabled_temperature_spreads_the_tail_evenly(caplog):
    _, _, teacher, _ = sparse_problem(vocab=50)
    sparse = SparseTeacher.from_logits(teacher.float(), 10, ())
    with caplog.at_level("WARNING"):
        bucket = sparse.bucket_log_probs(4.0).double().exp()
    assert "no tail statistics for temperature 4" in caplog.text
    p = torch.softmax(teacher, -1)
    top = p.gather(-1, sparse.ids)
    tail = 1 - top.sum(-1, keepdim=True)
    even = torch.cat([top.pow(0.25), 40 * (tail / 40).pow(0.25)], -1)
    torch.testing.assert_close(bucket, even / even.sum(-1, keepdim=True), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_k_equal_vocab_is_the_online_loss_value_and_gradient(name):
    hidden, weight, teacher, labels = sparse_problem()
    keep = labels != -100
    logits = (hidden @ weight.T).float().requires_grad_()
    online = distillation_loss(logits, teacher.float(), labels, divergence=name)
    online.loss.backward()
    expected = logits.grad.clone()
    logits.grad = None
    sparse = SparseTeacher.from_logits(teacher[keep].float(), teacher.shape[1])
    cached = sparse_distillation_loss(logits, sparse, labels, divergence=name)
    cached.loss.backward()
    torch.testing.assert_close(cached.loss, online.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.grad, expected, atol=1e-6, rtol=1e-4)
    if name == "todi":
        torch.testing.assert_close(cached.todi_weight, online.todi_weight, atol=1e-5, rtol=0)


def _reference(name: str, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Independent float64 formulas on bucket distributions (rows of p, q sum to 1)."""
    lp, lq = p.log(), q.log()
    if name == "fkl":
        return (p * (lp - lq)).sum(-1)
    if name == "rkl":
        return (q * (lq - lp)).sum(-1)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "todi":
        a = torch.sigmoid(lp - lq)
        return (a * p * (lp - lq) + (1 - a) * q * (lq - lp)).sum(-1)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["fkl", "rkl", "tvd", "todi"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bucket_loss_matches_float64_reference(name, temperature):
    hidden, weight, teacher, labels = sparse_problem()
    keep = labels != -100
    sparse = SparseTeacher.from_logits(teacher[keep].float(), 6, (2.0,))
    logits = hidden @ weight.T
    p = _bucketed(teacher[keep], sparse.ids, temperature)
    q = _bucketed(logits[keep], sparse.ids, temperature)
    ce = F.cross_entropy(logits[keep], labels[keep], reduction="sum")
    expected = (0.5 * ce + 0.5 * _reference(name, p, q).sum()) / keep.sum()
    got = sparse_distillation_loss(logits.float(), sparse, labels, divergence=name, temperature=temperature)
    assert abs(float(got.loss) - float(expected)) < 1e-5


@pytest.mark.parametrize(
    "name", ["fkl", "js", "tvd", "srkl"]
)  # no stop-gradient inside (unlike ToDi's alpha)
def test_bucket_gradient_matches_finite_differences(name):
    hidden, weight, teacher, labels = sparse_problem(n=10, vocab=12)
    keep = labels != -100
    sparse = SparseTeacher.from_logits(teacher[keep].float(), 3, (2.0,))
    sparse64 = sparse.apply(lambda t: t.double() if t.is_floating_point() else t)
    logits = (hidden @ weight.T).requires_grad_()

    def f(z):
        return sparse_distillation_loss(z, sparse64, labels, divergence=name).loss

    f(logits).backward()
    analytic = logits.grad
    eps = 1e-6
    for idx in [(1, 0), (2, 5), (5, 11), (3, int(sparse.ids[1, 0])), (9, 7)]:
        plus, minus = logits.detach().clone(), logits.detach().clone()
        plus[idx] += eps
        minus[idx] -= eps
        numeric = (f(plus) - f(minus)) / (2 * eps)
        assert abs(float(numeric) - float(analytic[idx])) < 1e-7


@pytest.mark.parametrize("k", [7, 31])  # with a tail bucket, and k = V (none)
@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("mode", ["bucket", "uniform", "sampled"])
def test_fused_sparse_path_equals_materialised(name, k, mode):
    """The fused kernels (the bucket's hand-written chain rule, the dense one for a spread tail) against
    autograd through the materialised loss; with k = V (nothing in the tail) both equal the online loss."""
    hidden, weight, teacher, labels = sparse_problem(n=40, vocab=31)
    keep = labels != -100
    g = torch.Generator().manual_seed(0)
    sparse = SparseTeacher.from_logits(teacher[keep].float(), k, (2.0,), tail_samples=5, generator=g)
    sparse.tail_mode = mode
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    fused = fused_linear_distillation_loss(
        h, w, None, None, labels, sparse_teacher=sparse, divergence=name, chunk_size=8
    )
    fused.loss.backward()
    h2, w2 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    plain = sparse_distillation_loss(h2 @ w2.T, sparse, labels, divergence=name)
    plain.loss.backward()
    torch.testing.assert_close(fused.loss, plain.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=1e-4)
    if k == 31:
        online = distillation_loss(
            hidden.float() @ weight.float().T, teacher.float(), labels, divergence=name
        )
        torch.testing.assert_close(fused.loss, online.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["bucket", "uniform", "sampled"])
def test_underflowed_tail_gives_finite_gradients(mode):
    hidden, weight, teacher, labels = sparse_problem(n=12, vocab=20)
    keep = labels != -100
    sparse = SparseTeacher.from_logits(teacher[keep].float(), 5, (2.0,), tail_samples=4)
    sparse.tail_mode = mode
    sparse.tail[0] = -math.inf  # a teacher row with no mass left outside its top k
    sparse.tempered_tails[2.0][0] = -math.inf
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    out = fused_linear_distillation_loss(h, w, None, None, labels, sparse_teacher=sparse, chunk_size=4)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    h2, w2 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    plain = sparse_distillation_loss(h2 @ w2.T, sparse, labels)
    plain.loss.backward()
    torch.testing.assert_close(out.loss, plain.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-5, rtol=1e-4)


def test_row_count_mismatch_is_refused():
    hidden, weight, teacher, labels = sparse_problem()
    sparse = SparseTeacher.from_logits(teacher[:5].float(), 4)
    with pytest.raises(ValueError, match="5 rows but the batch has 20 supervised positions"):
        sparse_distillation_loss(hidden @ weight.T, sparse, labels)


# ---- the cache files and `todi distill --teacher-cache` -------------------------------------------

needs_tokenizer = pytest.mark.skipif(not GPT2_DIR.is_dir(), reason=f"GPT-2 tokenizer not found at {GPT2_DIR}")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    if not GPT2_DIR.is_dir():
        pytest.skip(f"GPT-2 tokenizer not found at {GPT2_DIR}")
    root = tmp_path_factory.mktemp("cache-models")
    tokenizer = _tokenizer()
    return {
        "teacher": str(_save_llama(root / "teacher", tokenizer, 64, seed=1)),
        "student": str(_save_llama(root / "student", tokenizer, 32, seed=2)),
        "data": str(_write_data(root / "train.jsonl", 24, seed=3)),
        "other": str(_write_data(root / "other.jsonl", 24, seed=4)),
    }


def _cache(models, out: Path, *extra: str) -> int:
    args = ["cache-teacher", "--teacher", models["teacher"], "--data", models["data"], "--out", str(out)]
    return cli.main([*args, "--max-length", "64", "--max-prompt-length", "32", "--shard-size", "10", *extra])


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@needs_tokenizer
def test_cache_files_manifest_and_bytes(models, tmp_path):
    from safetensors import safe_open

    assert _cache(models, tmp_path / "c", "--top-k", "16", "--batch-size", "5") == 0
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["top_k"] == 16 and manifest["vocab_size"] == 50257
    assert manifest["id_encoding"] == "int16+32768" and len(manifest["shards"]) == 3  # 24 examples / 10
    for key in ("teacher_config_hash", "tokenizer_hash", "data_file_sha256", "template", "max_length"):
        assert manifest[key]
    assert manifest["tail_samples"] == 16 and manifest["sample_temperatures"] == [2.0]
    with safe_open(str(tmp_path / "c" / "shard-00000.safetensors"), "pt") as f:
        assert f.get_tensor("ids").dtype == torch.int16 and f.get_tensor("logprobs").dtype == torch.float16
        rows = int(f.get_tensor("offsets")[-1])
        # 16 draws per position on average, stored flat (int16), and one byte per position saying how many
        assert (
            f.get_tensor("tail_ids_T2").shape == (16 * rows,)
            and f.get_tensor("tail_ids_T2").dtype == torch.int16
        )
        assert (
            f.get_tensor("tail_draws_T2").dtype == torch.uint8
            and int(f.get_tensor("tail_draws_T2").sum()) == 16 * rows
        )
    # 16 ids x 2 bytes + 16 log-probs x 2 bytes + tail + tail at T=2 (4 bytes each) + 16 draws x 2 + 1
    assert 105 <= manifest["bytes_per_position"] < 105 + 2000 / max(rows, 1) + 40


@needs_tokenizer
def test_stored_top_k_equals_the_teacher(models, tmp_path):
    from transformers import AutoModelForCausalLM

    from todi.cache import TeacherCache
    from todi.data import DataCollator, encode_examples, load_examples

    assert _cache(models, tmp_path / "c", "--top-k", "8", "--logprob-dtype", "float32") == 0
    cache = TeacherCache(tmp_path / "c")
    tokenizer = _tokenizer()
    examples = load_examples(models["data"], "train")
    encoded, _ = encode_examples(examples, tokenizer, max_prompt_length=32, max_length=64)
    teacher = AutoModelForCausalLM.from_pretrained(models["teacher"]).eval()
    for i in (0, 13, 23):  # three shards
        batch = DataCollator(tokenizer.eos_token_id)([encoded[i]])
        with torch.no_grad():
            logits = teacher(input_ids=batch["input_ids"]).logits[0, :-1]
        keep = batch["labels"][0, 1:] != -100
        logp = torch.log_softmax(logits[keep].double(), -1)
        top, ids = logp.topk(8, -1)
        rows = cache.rows([i])
        assert torch.equal(rows.ids, ids)
        torch.testing.assert_close(rows.logprobs.double(), top, atol=1e-4, rtol=0)
        torch.testing.assert_close(rows.tail.double(), torch.log1p(-top.exp().sum(-1)), atol=1e-4, rtol=0)


@needs_tokenizer
def test_resume_skips_written_shards_and_refuses_other_settings(models, tmp_path, capsys):
    out = tmp_path / "c"
    assert _cache(models, out, "--top-k", "4") == 0
    first = (out / "shard-00001.safetensors").stat().st_mtime_ns
    written = (out / "shard-00002.safetensors").read_bytes()
    (out / "shard-00002.safetensors").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    assert _cache(models, out, "--top-k", "4") == 0
    assert (out / "shard-00001.safetensors").stat().st_mtime_ns == first
    # the tail samples come from a generator seeded by the examples: the rebuilt shard is the same file
    assert (out / "shard-00002.safetensors").read_bytes() == written
    assert json.loads((out / "manifest.json").read_text())["complete"]
    assert _cache(models, out, "--top-k", "5") == 2
    assert "other settings (top_k: 4 -> 5" in capsys.readouterr().err
    assert _cache(models, out, "--top-k", "5", "--overwrite") == 0


@needs_tokenizer
@pytest.mark.parametrize("loss", ["todi", "akl"])
def test_distill_from_full_cache_equals_online(models, tmp_path, loss):
    """k = V stored in float32: the cached run takes the same steps as the online one."""
    assert (
        _cache(models, tmp_path / "c", "--top-k", "50257", "--logprob-dtype", "float32", "--temperatures", "")
        == 0
    )
    common = [
        "distill",
        "--student",
        models["student"],
        "--data",
        models["data"],
        "--loss",
        loss,
        "--max-steps",
        "3",
        "--log-every",
        "1",
        *TINY,
    ]
    assert cli.main([*common, "--teacher", models["teacher"], "--out", str(tmp_path / "online")]) == 0
    assert cli.main([*common, "--teacher-cache", str(tmp_path / "c"), "--out", str(tmp_path / "cached")]) == 0
    online, cached = _metrics(tmp_path / "online"), _metrics(tmp_path / "cached")
    assert len(online) == len(cached) == 3
    for a, b in zip(online, cached):
        for key in ("loss", "ce", "kd", "grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=2e-4, abs_tol=1e-6), (key, a[key], b[key])


@needs_tokenizer
def test_distill_refuses_a_mismatched_cache(models, tmp_path, capsys):
    assert _cache(models, tmp_path / "c", "--top-k", "4") == 0
    base = ["distill", "--student", models["student"], "--teacher-cache", str(tmp_path / "c"), *TINY]
    assert cli.main([*base, "--data", models["other"], "--out", str(tmp_path / "r1")]) == 1
    assert "example 0 of --data" in capsys.readouterr().err
    bad = [a if a != "64" else "48" for a in base]  # --max-length 48
    assert cli.main([*bad, "--data", models["data"], "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "--max-length 64 (this run: 48)" in err and "rerun with --max-length 64" in err
    assert (
        cli.main([*base, "--data", models["data"], "--template", "none", "--out", str(tmp_path / "r3")]) == 2
    )
    assert (
        cli.main(
            [*base, "--data", models["data"], "--teacher", models["teacher"], "--out", str(tmp_path / "r4")]
        )
        == 2
    )
    assert "exactly one of --teacher and --teacher-cache" in capsys.readouterr().err
    assert not (tmp_path / "r1" / "final").exists()


def test_sparse_kernel_compiles(monkeypatch):
    from todi.losses import fused as fused_mod

    monkeypatch.delenv("TODI_COMPILE", raising=False)
    hidden, weight, teacher, labels = sparse_problem(n=64, vocab=40)
    keep = labels != -100
    sparse = SparseTeacher.from_logits(teacher[keep].float(), 6, (2.0,))
    h = hidden.float().requires_grad_()
    out = fused_linear_distillation_loss(
        h, weight.float(), None, None, labels, sparse_teacher=sparse, chunk_size=16, compile=True
    )
    out.loss.backward()
    keys = [key for key in fused_mod._COMPILED if "_sparse_chunk_kernel" in key]
    assert keys and not fused_mod._COMPILE_FAILED.intersection(keys)
    h2 = hidden.float().requires_grad_()
    plain = sparse_distillation_loss(h2 @ weight.float().T, sparse, labels)
    plain.loss.backward()
    torch.testing.assert_close(out.loss, plain.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-5, rtol=1e-4)


# ---- tail_mode="uniform": the tail mass spread evenly over the tokens outside the top k ---------


@pytest.mark.parametrize("name", ["fkl", "rkl", "tvd", "todi"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uniform_tail_matches_float64_reference(name, temperature):
    hidden, weight, teacher, labels = sparse_problem()
    keep = labels != -100
    k, v = 6, teacher.shape[1]
    sparse = SparseTeacher.from_logits(teacher[keep].float(), k, (2.0,))
    sparse.tail_mode = "uniform"
    logits = hidden @ weight.T
    p_t = torch.softmax(teacher[keep] / temperature, -1)
    top = p_t.gather(-1, sparse.ids)
    p = ((1 - top.sum(-1, keepdim=True)) / (v - k)).expand(-1, v).scatter(-1, sparse.ids, top)
    q = torch.softmax(logits[keep] / temperature, -1)
    ce = F.cross_entropy(logits[keep], labels[keep], reduction="sum")
    expected = (0.5 * ce + 0.5 * _reference(name, p, q).sum()) / keep.sum()
    got = sparse_distillation_loss(logits.float(), sparse, labels, divergence=name, temperature=temperature)
    assert abs(float(got.loss) - float(expected)) < 1e-5


@needs_tokenizer
@pytest.mark.parametrize("mode", ["bucket", "uniform"])
def test_distill_with_other_tail_modes(models, tmp_path, capsys, mode):
    assert _cache(models, tmp_path / "c", "--top-k", "16") == 0
    base = ["distill", "--student", models["student"], "--data", models["data"], "--max-steps", "2", *TINY]
    cached = [*base, "--teacher-cache", str(tmp_path / "c"), "--cache-tail", mode]
    assert cli.main([*cached, "--out", str(tmp_path / "r")]) == 0
    assert all(math.isfinite(r["loss"]) for r in _metrics(tmp_path / "r"))
    online = [*base, "--teacher", models["teacher"], "--cache-tail", mode, "--out", str(tmp_path / "r2")]
    assert cli.main(online) == 2
    assert "--cache-tail applies to --teacher-cache" in capsys.readouterr().err


# ---- tail_mode="sampled": the tail mass shared by tokens drawn from the teacher's tail ----------------


def _tempered_tail(teacher: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """float64: the teacher's distribution at T restricted to the tokens outside ``ids`` (0 on them)."""
    p = torch.softmax(teacher.double() / temperature, -1)
    return p.scatter(-1, ids, 0.0)


def _sampled_reference(teacher: torch.Tensor, sparse: SparseTeacher, temperature: float) -> torch.Tensor:
    """float64 from the module's formula: top k exact at T; tail token drawn c of its row's m times gets
    B ((1 - f) c / m + f / (V - k)), B the exact tail mass at T (B / (V - k) in a row without draws)."""
    from todi.losses.sparse import TAIL_FLOOR

    n, v = teacher.shape
    samples = sparse.tail_samples[temperature]
    valid = samples != -1
    m, k = valid.sum(-1, keepdim=True).double(), sparse.k
    tail = _tempered_tail(teacher, sparse.ids, temperature)
    mass = tail.sum(-1, keepdim=True)
    counts = torch.zeros(n, v + 1, dtype=torch.float64)
    counts = counts.scatter_add(-1, torch.where(valid, samples, v), valid.double())[:, :v]
    drawn = mass * ((1 - TAIL_FLOOR) * counts / m.clamp_min(1) + TAIL_FLOOR / (v - k))
    shared = torch.where(m > 0, drawn, mass / (v - k))  # a row without draws: even
    top = torch.softmax(teacher.double() / temperature, -1).gather(-1, sparse.ids)
    return shared.scatter(-1, sparse.ids, top)


def test_tail_draws_are_shared_by_tail_mass_and_systematic():
    """M x N draws shared among the rows in proportion to their tail mass at T (largest remainders), and
    within a row systematic: a token holding a share w of the tail is drawn floor(m w) or ceil(m w)
    times. float64 reference."""
    teacher = sparse_problem(vocab=40)[2][:6].clone()
    teacher[0, 3] += 40  # nearly all of row 0's mass in its top k: its share of the draws rounds to 0
    m, k, rows = 24, 6, 6
    sparse = SparseTeacher.from_logits(
        teacher.float(), k, (2.0,), tail_samples=m, generator=torch.Generator().manual_seed(1)
    )
    samples = sparse.tail_samples[2.0]
    tail = _tempered_tail(teacher, sparse.ids, 2.0)
    mass = tail.sum(-1)
    share = mass / mass.sum() * m * rows
    drawn = (samples != -1).sum(-1)
    assert int(drawn.sum()) == m * rows and drawn[0] == 0
    assert ((drawn - share).abs() < 1).all()  # each row within one draw of its share
    for row in range(1, rows):
        ids = samples[row, : drawn[row]]
        assert (samples[row, drawn[row] :] == -1).all() and not torch.isin(ids, sparse.ids[row]).any()
        counts = torch.zeros(40, dtype=torch.float64).scatter_add(
            0, ids, torch.ones(len(ids), dtype=torch.float64)
        )
        target = drawn[row] * tail[row] / mass[row]
        assert ((counts - target).abs() < 1 + 1e-9).all()


def test_sampled_teacher_is_unbiased_up_to_the_floor():
    """Averaged over independent draws, the sampled teacher is (1 - f) x the true tempered tail + f x the
    even spread: what makes FKL's gradient right on average. float64 reference; 20,000 draws of m = 4."""
    from todi.losses.sparse import TAIL_FLOOR, dense_teacher_log_probs

    teacher = sparse_problem(vocab=30)[2][:1]
    draws, k, v = 20_000, 5, 30
    sparse = SparseTeacher.from_logits(
        teacher.float().expand(draws, -1),
        k,
        (2.0,),
        tail_samples=4,
        generator=torch.Generator().manual_seed(2),
    )
    ids, bucket, samples = sparse.ids, sparse.bucket_log_probs(2.0), sparse.tail_samples[2.0]
    dense = dense_teacher_log_probs(ids, bucket, v, samples).double().exp()
    torch.testing.assert_close(dense.sum(-1), torch.ones(draws, dtype=torch.float64), atol=1e-5, rtol=0)
    tail = _tempered_tail(teacher, ids[:1], 2.0)[0]
    even = torch.full_like(tail, float(tail.sum()) / (v - k)).scatter(-1, ids[0], 0.0)
    top = torch.softmax(teacher[0].double() / 2.0, -1) * (tail == 0)
    expected = top + (1 - TAIL_FLOOR) * tail + TAIL_FLOOR * even
    sd = (dense.var(0) / draws).sqrt()
    assert ((dense.mean(0) - expected).abs() <= 5 * sd + 1e-6).all()


@pytest.mark.parametrize("name", ["fkl", "rkl", "tvd", "todi"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_tail_matches_float64_reference(name, temperature):
    hidden, weight, teacher, labels = sparse_problem()
    keep = labels != -100
    sparse = SparseTeacher.from_logits(
        teacher[keep].float(), 6, (temperature,), tail_samples=8, generator=torch.Generator().manual_seed(3)
    )
    sparse.tail_mode = "sampled"
    logits = hidden @ weight.T
    p = _sampled_reference(teacher[keep], sparse, temperature)
    q = torch.softmax(logits[keep] / temperature, -1)
    ce = F.cross_entropy(logits[keep], labels[keep], reduction="sum")
    expected = (0.5 * ce + 0.5 * _reference(name, p, q).sum()) / keep.sum()
    got = sparse_distillation_loss(logits.float(), sparse, labels, divergence=name, temperature=temperature)
    assert abs(float(got.loss) - float(expected)) < 1e-5


def test_sampled_tail_without_samples_at_the_temperature_spreads_evenly(caplog):
    hidden, weight, teacher, labels = sparse_problem()
    keep = labels != -100
    sparse = SparseTeacher.from_logits(teacher[keep].float(), 6, (2.0, 3.0), tail_samples=8)
    sparse.tail_samples.pop(3.0)
    logits = (hidden @ weight.T).float()
    sparse.tail_mode = "uniform"
    even = sparse_distillation_loss(logits, sparse, labels, temperature=3.0)
    sparse.tail_mode = "sampled"
    with caplog.at_level("WARNING"):
        got = sparse_distillation_loss(logits, sparse, labels, temperature=3.0)
    assert "no tail samples for temperature 3" in caplog.text
    torch.testing.assert_close(got.loss, even.loss)


@needs_tokenizer
def test_cached_tail_samples_lie_in_the_tail_and_need_a_sampled_cache(models, tmp_path, capsys):
    from todi.cache import TeacherCache
    from todi.errors import TodiError

    assert _cache(models, tmp_path / "c", "--top-k", "8", "--temperatures", "1,2", "--tail-samples", "5") == 0
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["temperatures"] == [2.0] and manifest["sample_temperatures"] == [1.0, 2.0]
    rows = TeacherCache(tmp_path / "c", tail_mode="sampled").rows([0, 13, 23])
    for t in (1.0, 2.0):
        samples = rows.tail_samples[t]
        valid = samples != -1
        # a random teacher is nearly flat: its tail holds about the same mass everywhere, so 5 draws a row
        assert samples.shape[0] == len(rows) and valid.sum(-1).float().mean() == pytest.approx(5, abs=1)
        assert samples[valid].min() >= 0 and samples.max() < 50257
        assert not (samples.unsqueeze(-1) == rows.ids.unsqueeze(1)).any()  # never one of the top k
    # read back per example, the ragged draws are the shard's flat list cut at its per-row counts
    from safetensors import safe_open

    cache = TeacherCache(tmp_path / "c", tail_mode="sampled")
    with safe_open(str(tmp_path / "c" / "shard-00001.safetensors"), "pt") as f:
        flat = (f.get_tensor("tail_ids_T2").long() + 32768).tolist()
        counts = f.get_tensor("tail_draws_T2").long().tolist()
        offsets = f.get_tensor("offsets").tolist()
    per_row, at = [], 0
    for c in counts:
        per_row.append(flat[at : at + c])
        at += c
    for local in (0, 4, 9):
        got = cache.rows([10 + local]).tail_samples[2.0]
        expected = per_row[offsets[local] : offsets[local + 1]]
        assert [[d for d in row if d != -1] for row in got.tolist()] == expected
    assert _cache(models, tmp_path / "none", "--top-k", "8", "--tail-samples", "0") == 0
    assert "tail_ids_T2" not in (tmp_path / "none" / "shard-00000.safetensors").read_bytes()[:4096].decode(
        "latin-1"
    )
    with pytest.raises(TodiError, match="holds no tail samples"):
        TeacherCache(tmp_path / "none", tail_mode="sampled")
    base = ["distill", "--student", models["student"], "--data", models["data"], "--max-steps", "2", *TINY]
    # the default --cache-tail is sampled
    assert cli.main([*base, "--teacher-cache", str(tmp_path / "c"), "--out", str(tmp_path / "ok")]) == 0
    assert all(math.isfinite(r["loss"]) for r in _metrics(tmp_path / "ok"))
    args = [
        *base,
        "--teacher-cache",
        str(tmp_path / "none"),
        "--cache-tail",
        "sampled",
        "--out",
        str(tmp_path / "r"),
    ]
    assert cli.main(args) == 2
    assert "--tail-samples 16" in capsys.readouterr().err
