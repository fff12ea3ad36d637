"""Sharded training on one GPU through ``accelerate launch``: FSDP2 and DeepSpeed ZeRO-3 against the plain run.

Skipped without a CUDA device (accelerate offers no FSDP on a CPU); the ZeRO-3 tests also skip without
``deepspeed``. benchmarks/gpu_evidence.sh runs this file on the GPU machine. Every sharded run goes through
tests/sharded_probe.py, which records the output-head weight that the fused loss receives.

What is checked, each against the plain single-process run of the same command (same seed, data order,
float32 weights and math, no mixed precision):
- a tiny distill under FSDP2 and under ZeRO-3 ends with the plain run's weights;
- a FSDP2 run killed (SIGKILL) after its first checkpoint and resumed with ``--resume`` ends there too;
- the fused loss receives the whole head ([vocab, hidden], a plain tensor), not an FSDP2 DTensor shard or
  ZeRO-3's empty placeholder, and it really runs (the fused path was not switched off);
- the final folder loads with ``from_pretrained`` and holds float32 weights.

Tolerance ATOL = 5e-5 (absolute, per weight, after 12 AdamW steps at lr 5e-4). With one rank a shard is
the whole tensor, so the sharded runs do the plain run's arithmetic in another order (FSDP's gradient
reduce-scatter, ZeRO's flattened buffers and gradient-norm sums, CUDA kernels that add atomically): we
expect float32 rounding, ~1e-7 relative on the gradients and ~1e-6 on the weights (an estimate; the GPU
run will tell). A real fault moves a weight by about one update (lr = 5e-4 per step), ten times ATOL: a
missed or doubled gradient, a step lost on resume, a stale or partial head. The tests also check that
training moved the weights far beyond ATOL, so the equality is not that of two untrained models.

One GPU cannot show a numerically wrong shard (the one shard is everything); what it can show is the
representation the loss receives: FSDP2 hands out a DTensor and ZeRO-3 an empty placeholder outside an
unshard, and the probe's record must show neither. Several GPUs would test the shard contents as well.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny import ENV, GPT2_DIR, REPO, save_llama, write_data

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (accelerate has no FSDP on a CPU)"
    ),
]

ATOL = 5e-5
LR = 5e-4
STEPS = 12
CONFIGS = REPO / "configs" / "accelerate"
PROBE = Path(__file__).resolve().parent / "sharded_probe.py"
LAUNCH_TIMEOUT = 240


def _has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:  # an install without its compiled ops can fail on import with other errors
        return False
    return True


needs_deepspeed = pytest.mark.skipif(not _has_deepspeed(), reason="deepspeed is not installed")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    if not (GPT2_DIR / "tokenizer.json").is_file():
        pytest.skip(f"GPT-2 tokenizer not found at {GPT2_DIR} (set TODI_DATA)")
    from tiny import gpt2_tokenizer

    root = tmp_path_factory.mktemp("sharded")
    tokenizer = gpt2_tokenizer()
    return {
        "teacher": save_llama(root / "teacher", tokenizer, hidden=64, seed=1),
        "student": save_llama(root / "student", tokenizer, hidden=32, seed=2),
        "data": write_data(root / "train.jsonl", 64, seed=0),
        "root": root,
    }


def distill_args(assets: dict, out: Path, *extra: object) -> list[str]:
    args = ["distill", "--teacher", assets["teacher"], "--student", assets["student"], "--data", assets["data"],
            "--loss", "todi", "--max-steps", STEPS, "--lr", LR, "--batch-size", 4, "--max-length", 64,
            "--max-prompt-length", 32, "--dtype", "float32", "--teacher-dtype", "float32",
            "--mixed-precision", "no", "--fused", "--log-every", 1, "--report-to", "none",
            "--out", out, *extra]  # fmt: skip
    return [str(a) for a in args]


def command(config: str | None, record: Path, args: list[str]) -> list[str]:
    """The probe, plain (one process, no launcher) or under ``accelerate launch`` with one GPU."""
    if config is None:
        return [sys.executable, str(PROBE), str(record), *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
            "--num_processes", "1", "--mixed_precision", "no", str(PROBE), str(record), *args]  # fmt: skip


def env(**extra: str) -> dict[str, str]:
    # TODI_COMPILE=0 (from tiny.ENV): the same eager fused kernel in every run; compile is tested in test_cuda.
    # Keep what PYTHONPATH already holds: the GPU script installs carried wheels (deepspeed) there.
    path = os.pathsep.join(p for p in (str(REPO / "src"), ENV.get("PYTHONPATH", "")) if p)
    return {**ENV, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **extra}


def launch(config: str | None, record: Path, args: list[str], **extra_env: str) -> str:
    done = subprocess.run(
        command(config, record, args), env=env(**extra_env), capture_output=True, text=True,
        timeout=LAUNCH_TIMEOUT, cwd=REPO,
    )  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, f"{config or 'plain'} run failed (exit {done.returncode}):\n{log[-4000:]}"
    return log


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(run: Path, reference: Path) -> None:
    got, want = weights(run), weights(reference)
    assert got.keys() == want.keys(), f"{run}: tensors {sorted(got.keys() ^ want.keys())} differ"
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32, f"{run}/{name} saved as {tensor.dtype}, trained in float32"
    worst = max(float((got[k] - want[k]).abs().max()) for k in got)
    assert worst <= ATOL, f"weights of {run} and the plain run differ by up to {worst:.3g} (ATOL {ATOL})"


def assert_whole_head(record_path: Path, student: Path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(student)
    record = json.loads(record_path.read_text())
    assert record["calls"] > 0, "the fused loss never ran: it was switched off (see the log's warning)"
    assert not record["weight_is_dtensor"], f"the fused loss got an FSDP2 shard: {record}"
    assert record["weight_shape"] == [config.vocab_size, config.hidden_size], (
        f"the fused loss got a head of shape {record['weight_shape']}, not the whole "
        f"[{config.vocab_size}, {config.hidden_size}]: {record}"
    )
    assert record["weight_device"].startswith("cuda"), record


@pytest.fixture(scope="module")
def plain(assets):
    out = assets["root"] / "plain"
    record = assets["root"] / "plain.json"
    launch(None, record, distill_args(assets, out))
    assert_whole_head(record, assets["student"])
    trained, initial = weights(out / "final"), weights(assets["student"])
    moved = max(float((trained[k] - initial[k]).abs().max()) for k in trained)
    assert moved > 20 * ATOL, f"training moved the weights by only {moved:.3g}: the comparison would be empty"
    return out


def loads_with_from_pretrained(folder: Path, reference: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    want = weights(reference)
    state = model.state_dict()
    assert all(torch.equal(state[k], want[k]) for k in want), f"{folder} loads other weights than it holds"


@pytest.mark.parametrize(
    "config", ["fsdp2.yaml", pytest.param("zero3.yaml", marks=needs_deepspeed)], ids=["fsdp2", "zero3"]
)
def test_sharded_distill_equals_the_plain_run(assets, plain, config):
    name = config.removesuffix(".yaml")
    out, record = assets["root"] / name, assets["root"] / f"{name}.json"
    log = launch(config, record, distill_args(assets, out))
    info = json.loads((out / "run_info.json").read_text())
    expected = "FSDP" if name == "fsdp2" else "DEEPSPEED"
    assert expected in info["distributed_type"], (
        f"the run was not sharded: {info['distributed_type']}\n{log[-2000:]}"
    )
    assert "fused loss disabled" not in log, log[-2000:]
    assert_whole_head(record, assets["student"])
    assert_same_weights(out / "final", plain / "final")
    loads_with_from_pretrained(out / "final", out / "final")


def test_fsdp2_resume_after_a_kill_equals_the_plain_run(assets, plain):
    from todi.checkpoint import list_checkpoints

    out, record = assets["root"] / "fsdp2-killed", assets["root"] / "fsdp2-killed.json"
    args = distill_args(assets, out, "--save-every", 4)
    # 0.5 s per step: the kill lands after the first checkpoint (step 4) and well before step 12.
    process = subprocess.Popen(
        command("fsdp2.yaml", record, args), env=env(SHARDED_PROBE_SLEEP="0.5"), cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not list_checkpoints(out) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    # The worker first (torchrun gave it a session of its own), then the launcher: no chance to save.
    for pid_file in record.parent.glob(f"{record.name}.pid*"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    log = process.communicate(timeout=60)[0]
    assert not (out / "final").exists(), f"the run ended before it was killed:\n{log[-2000:]}"
    checkpoints = list_checkpoints(out)
    assert checkpoints, f"no checkpoint before the kill:\n{log[-2000:]}"
    log = launch("fsdp2.yaml", record, [*args, "--resume"])
    assert "resumed from" in log, log[-2000:]
    assert_whole_head(record, assets["student"])
    assert_same_weights(out / "final", plain / "final")
    loads_with_from_pretrained(out / "final", out / "final")


@pytest.mark.parametrize(
    "config", ["fsdp2.yaml", pytest.param("zero3.yaml", marks=needs_deepspeed)], ids=["fsdp2", "zero3"]
)
def test_sharded_on_policy_distill_equals_the_plain_run(assets, config):
    """``--lmbda 1``: under FSDP2 / ZeRO-3 the student samples through the wrapped model's forward with
    ``synced_gpus`` (todi.onpolicy), so the engines gather its parameters; the samples and the update must
    be the plain run's."""
    name = config.removesuffix(".yaml")
    extra = ("--lmbda", "1", "--save-samples", "--gen-max-new-tokens", "8")
    runs = {}
    for label, launch_config in (("plain", None), (name, config)):
        out = assets["root"] / f"onpolicy-{label}"
        launch(launch_config, assets["root"] / f"onpolicy-{label}.json", distill_args(assets, out, *extra))
        runs[label] = out
    samples = {label: (out / "samples.jsonl").read_text().splitlines() for label, out in runs.items()}
    assert len(samples["plain"]) == STEPS * 4, "every step of the plain run should have sampled 4 responses"
    assert samples[name] == samples["plain"], "the sharded student sampled other responses"
    assert_same_weights(runs[name] / "final", runs["plain"] / "final")
