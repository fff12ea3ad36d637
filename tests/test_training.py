"""todi sft / todi distill on tiny random models (CPU): DDP equivalence, exact resume, refusals, end to end.

Models are built here (2-layer Llama / GPT-2, hidden 32-64, the GPT-2 tokenizer's 50,257 tokens).
Runs that need their own process (torchrun, SIGKILL, SIGINT) go through ``python -m todi.cli``; the
rest call ``todi.cli.main`` in this process. Tests on the shared Dolly files skip when they are absent.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tiny import DATA, ENV, GPT2_DIR, TINY, run_todi
from tiny import gpt2_tokenizer as _tokenizer
from tiny import save_llama as _save_llama
from tiny import write_data as _write_data
from todi import cli
from todi.checkpoint import (
    TrainerState,
    list_checkpoints,
    remove_stale,
    rotate_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from todi.training import DistillConfig, SFTConfig, cosine_schedule, epoch_plan

DOLLY = DATA / "dolly"

pytestmark = [
    pytest.mark.skipif(not GPT2_DIR.is_dir(), reason=f"GPT-2 tokenizer not found at {GPT2_DIR}"),
    pytest.mark.usefixtures("fresh_accelerate_state"),
]


def _save_gpt2(path: Path, tokenizer, hidden: int, seed: int) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    # GPT-2 keeps its dropout (0.1) and tied embeddings: resume must restore the RNG and shared weights.
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=hidden, n_layer=2, n_head=4, n_positions=256)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("assets")
    tokenizer = _tokenizer()
    return SimpleNamespace(
        teacher=_save_llama(root / "teacher", tokenizer, hidden=64, seed=1),
        student=_save_llama(root / "student", tokenizer, hidden=32, seed=2),
        gpt2=_save_gpt2(root / "gpt2", tokenizer, hidden=32, seed=3),
        data=_write_data(root / "train.jsonl", 48, seed=0),
        dev=_write_data(root / "dev.jsonl", 8, seed=1),
    )


def todi_process(*argv: object, launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    command = [sys.executable, *(launcher or ("-m", "todi.cli")), *map(str, argv)]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 240) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"exit {process.returncode}\n{out[-3000:]}\n{err[-6000:]}"
    return err


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)
    assert worst <= atol, f"weights of {a} and {b} differ by up to {worst}"


def _records(run: Path, key: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if key in r]


def train_records(run: Path) -> list[dict]:
    return _records(run, "loss")


def dev_records(run: Path) -> list[dict]:
    return _records(run, "dev_loss")


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


# --------------------------------------------------------------------------------------------------
# Options and small pieces
# --------------------------------------------------------------------------------------------------


def test_options_parse_from_command_line_and_yaml(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("teacher: t\nstudent: s\ndata: d.jsonl\nout: o\nkd-rate: 0.3\nepochs: 2\n")
    _, config = cli.parse_config(
        "distill", ["--config", str(yaml_file), "--epochs", "5", "--no-fused", "--beta", "2"]
    )
    assert isinstance(config, DistillConfig)
    assert (config.teacher, config.student, config.kd_rate, config.epochs) == ("t", "s", 0.3, 5)
    assert config.fused is False and config.loss_options() == {
        "divergence": "todi",
        "kd_rate": 0.3,
        "temperature": 2.0,
        "beta": 2.0,
    }
    _, sft = cli.parse_config("sft", ["--model", "m", "--data", "d", "--out", "o", "--lora-r", "8"])
    assert isinstance(sft, SFTConfig) and sft.lora_r == 8 and sft.loss_options()["kd_rate"] == 0.0
    assert sft.problems() == []


def test_cosine_schedule_warms_up_then_decays_to_min():
    factor = cosine_schedule(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [round(factor(s), 3) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert factor(4) == pytest.approx(1.0)
    assert factor(9) == pytest.approx(0.55)
    assert factor(14) == pytest.approx(0.1) and factor(20) == pytest.approx(0.1)


def test_epoch_plan_is_deterministic_and_drops_partial_steps():
    lengths = [random.Random(i).randint(5, 50) for i in range(23)]
    plan = epoch_plan(lengths, batch_size=4, micro_per_step=2, seed=7, epoch=3, grouping="bucket")
    assert plan == epoch_plan(lengths, batch_size=4, micro_per_step=2, seed=7, epoch=3, grouping="bucket")
    assert len(plan) == 3 and all(len(step) == 2 for step in plan)  # 6 micro-batches; the 6th is left over
    used = [i for step in plan for micro in step for i in micro]
    assert len(used) == len(set(used))
    assert plan != epoch_plan(lengths, batch_size=4, micro_per_step=2, seed=7, epoch=4, grouping="bucket")


def test_rotation_keeps_best_and_newest(tmp_path):
    scores = {1: 10.0, 2: 30.0, 3: None, 4: 20.0, 5: 5.0, 6: None}
    for step, score in scores.items():
        folder = tmp_path / "checkpoints" / f"step-{step:08d}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(TrainerState(global_step=step, score=score).to_json())
    removed = rotate_checkpoints(tmp_path, keep_last=1, keep_best=2)
    assert sorted(p.name for p in removed) == ["step-00000001", "step-00000003", "step-00000005"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000004", "step-00000006"]


class _FakeAccelerator:
    """Just enough of accelerate.Accelerator for save_checkpoint, writing two small state files."""

    is_main_process, num_processes = True, 1

    def __init__(self, crash: bool = False) -> None:
        self.crash = crash

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str, safe_serialization: bool = True) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"weights" * 100)
        if self.crash:
            raise RuntimeError("killed mid-write")
        (Path(folder) / "random_states_0.pkl").write_bytes(b"rng state")


def test_checkpoints_are_atomic_and_damage_is_detected(tmp_path):
    path = save_checkpoint(
        _FakeAccelerator(), tmp_path, TrainerState(global_step=3, epoch=1, step_in_epoch=2)
    )
    assert path.name == "step-00000003" and verify_checkpoint(path) is None
    assert TrainerState.from_file(path / "trainer_state.json").step_in_epoch == 2
    with pytest.raises(RuntimeError):
        save_checkpoint(_FakeAccelerator(crash=True), tmp_path, TrainerState(global_step=4))
    assert list_checkpoints(tmp_path) == [path], "a half-written checkpoint must not count"
    remove_stale(tmp_path)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000003"]

    (path / "random_states_0.pkl").write_bytes(b"rng stat3")  # same size, other bytes
    assert "checksum" in verify_checkpoint(path)
    (path / "random_states_0.pkl").write_bytes(b"rng state")
    (path / "model.safetensors").write_bytes(b"weights")
    assert "bytes" in verify_checkpoint(path)
    (path / "trainer_state.json").unlink()
    assert "missing" in verify_checkpoint(path)


# --------------------------------------------------------------------------------------------------
# Refusals: before any model loads, without touching --out
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the run was refused")

    monkeypatch.setattr("todi.training.load_causal_lm", refuse)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--kd-rate", "1.5"], "--kd-rate must be in [0, 1]"),
        (["--temperature", "0"], "--temperature must be a finite number >= 0.01"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--skew", "0.2"], "takes no parameter 'skew'"),
        (["--loss", "nope"], "unknown divergence 'nope'"),
        (["--loss", "akl", "--loss-backend", "triton"], "--loss-backend triton does not serve --loss akl"),
    ],
)
def test_bad_options_are_refused_first(tmp_path, capsys, no_model_loading, option, message):
    out = tmp_path / "run"
    models = ["--teacher", tmp_path / "t", "--student", tmp_path / "s"]
    status = run_todi("distill", *models, "--data", "x.jsonl", "--out", out, *option)
    assert status == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_existing_run_is_refused_and_left_alone(tmp_path, assets, capsys, no_model_loading):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".todi-output.json").write_text('{"command": "sft", "run_id": "x"}\n')
    (out / "config.yaml").write_text("model: other\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = snapshot(out)
    status = run_todi("sft", "--model", assets.student, "--data", assets.data, "--out", out, *TINY)
    assert status == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert snapshot(out) == before


def test_mismatched_tokenizers_are_refused(tmp_path, assets, capsys, no_model_loading):
    other = _tokenizer()
    other.add_tokens(["<extra>"])
    other.save_pretrained(tmp_path / "student")  # a tokenizer only: loading a model from here would fail
    out = tmp_path / "run"
    models = ["--teacher", assets.teacher, "--student", tmp_path / "student"]
    status = run_todi("distill", *models, "--data", assets.data, "--out", out, *TINY)
    assert status == 1
    assert "tokenizers differ" in capsys.readouterr().err
    assert not out.exists()


def test_unreadable_data_is_refused(tmp_path, assets, capsys, no_model_loading):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "ok"}\n{"instruction": "no output"}\n')
    out = tmp_path / "run"
    status = run_todi("sft", "--model", assets.student, "--data", bad, "--out", out, *TINY)
    assert status == 1
    assert "line 2" in capsys.readouterr().err
    assert not out.exists()


def test_no_fused_reaches_the_loss(tmp_path, assets, monkeypatch):
    import todi.losses

    seen = []
    real = todi.losses.causal_lm_distillation_loss

    def spy(*args, **kwargs):
        seen.append(kwargs["fused"])
        return real(*args, **kwargs)

    monkeypatch.setattr(todi.losses, "causal_lm_distillation_loss", spy)
    out = tmp_path / "run"
    status = run_todi("sft", "--model", assets.student, "--data", assets.data, "--out", out, "--max-steps", 1,
                      "--no-fused", *TINY)  # fmt: skip
    assert status == 0
    assert seen and not any(seen)
    assert (out / "final" / "model.safetensors").is_file()


def test_keep_adapter_then_teacher_lora(tmp_path, assets):
    """A LoRA SFT run exported as an adapter (--keep-adapter) serves as --teacher-lora of a distillation."""
    from transformers import AutoModelForCausalLM

    sft = tmp_path / "sft"
    status = run_todi("sft", "--model", assets.student, "--data", assets.data, "--out", sft, "--max-steps", 2,
                      "--lora-r", 4, "--lr", "1e-2", "--keep-adapter", *TINY)  # fmt: skip
    assert status == 0
    assert (sft / "final" / "adapter_config.json").is_file() and not (
        sft / "final" / "model.safetensors"
    ).exists()
    loaded = AutoModelForCausalLM.from_pretrained(sft / "final")  # base model + adapter, via PEFT
    assert any("lora" in name for name, _ in loaded.named_parameters())

    out = tmp_path / "distill"
    status = run_todi("distill", "--teacher", assets.student, "--teacher-lora", sft / "final", "--student",
                      assets.student, "--data", assets.data, "--out", out, "--max-steps", 1, "--log-every", 1,
                      *TINY)  # fmt: skip
    assert status == 0
    # Teacher = student + trained adapter: the two differ, so the divergence is not zero.
    assert train_records(out)[0]["kd"] > 0


# --------------------------------------------------------------------------------------------------
# Distributed: 2 ranks x 1 micro-batch == 1 rank x 2 micro-batches
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_two_processes_match_grad_accum_two(tmp_path, assets):
    common = ["distill", "--teacher", assets.teacher, "--student", assets.student, "--data", assets.data,
              "--dev", assets.dev, "--eval-every", 2, "--eval-max-new-tokens", 4, "--max-steps", 3,
              "--log-every", 1, "--save-every", 0, *TINY]  # fmt: skip
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "todi.cli")
    ddp = todi_process(*common, "--out", tmp_path / "ddp", launcher=torchrun)
    single = todi_process(*common, "--grad-accum", "2", "--out", tmp_path / "single")
    finish(single)
    finish(ddp)
    assert json.loads((tmp_path / "ddp" / "run_info.json").read_text())["world_size"] == 2
    assert_same_weights(tmp_path / "ddp" / "final", tmp_path / "single" / "final", atol=1e-5)
    trained, initial = weights(tmp_path / "single" / "final"), weights(assets.student)
    assert max((trained[k] - initial[k]).abs().max().item() for k in initial) > 1e-5, "nothing was trained"
    for a, b in zip(train_records(tmp_path / "ddp"), train_records(tmp_path / "single"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    # The dev loss is shared out over the two ranks and summed: it must not depend on the split.
    dev = {run: dev_records(tmp_path / run) for run in ("ddp", "single")}
    assert [r["step"] for r in dev["ddp"]] == [2, 3]
    for a, b in zip(dev["ddp"], dev["single"], strict=True):
        assert a["dev_loss"] == pytest.approx(b["dev_loss"], rel=1e-5)


# --------------------------------------------------------------------------------------------------
# Exact resume after SIGKILL / SIGINT, and from a corrupt newest checkpoint
# --------------------------------------------------------------------------------------------------


def _resume_args(assets, out: Path) -> list[object]:
    # GPT-2 student (dropout, tied head), ToDi with a teacher, dev evaluation in between checkpoints.
    return ["distill", "--teacher", assets.teacher, "--student", assets.gpt2, "--data", assets.data,
            "--dev", assets.dev, "--eval-every", 5, "--eval-max-new-tokens", 4, "--max-steps", 16,
            "--save-every", 2, "--log-every", 1, "--lr", "2e-3", "--warmup-steps", 2, "--out", out, *TINY]  # fmt: skip


@pytest.fixture(scope="module")
def reference_run(assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    finish(todi_process(*_resume_args(assets, out)))
    return out


def _wait_for_checkpoint(process: subprocess.Popen, run: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(int(p.name.split("-")[1]) >= step for p in list_checkpoints(run)):
            return
        if process.poll() is not None:
            raise AssertionError(f"run ended before checkpoint {step}: {process.communicate()[1][-3000:]}")
        time.sleep(0.01)
    process.kill()
    raise AssertionError(f"no checkpoint {step} within {timeout} s")


def _check_resumed(run: Path, reference: Path) -> None:
    assert_same_weights(run / "final", reference / "final", atol=1e-6)
    steps = [r["step"] for r in train_records(run)]
    assert steps == list(range(1, 17)), "metrics.jsonl must hold each step once after a resume"


@pytest.mark.slow
def test_sigkill_then_resume_ends_with_the_same_weights(tmp_path, assets, reference_run):
    out = tmp_path / "run"
    process = todi_process(*_resume_args(assets, out))
    _wait_for_checkpoint(process, out, 4)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "final").exists(), "the run finished before it was killed"
    finish(todi_process(*_resume_args(assets, out), "--resume"))
    _check_resumed(out, reference_run)


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_resume_is_exact(tmp_path, assets, reference_run):
    out = tmp_path / "run"
    process = todi_process(*_resume_args(assets, out))
    _wait_for_checkpoint(process, out, 2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert "checkpoint saved" in err and "Traceback" not in err
    assert not (out / "final").exists()
    stopped = list_checkpoints(out)[-1]
    state = json.loads((stopped / "trainer_state.json").read_text())
    assert state["global_step"] == int(stopped.name.split("-")[1]) < 16
    finish(todi_process(*_resume_args(assets, out), "--resume"))
    _check_resumed(out, reference_run)


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, assets, reference_run):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    shutil.rmtree(out / "final")
    previous, newest = list_checkpoints(out)[-2:]
    assert newest.name == "step-00000016"
    model_file = newest / "model.safetensors"
    model_file.write_bytes(b"\0" * model_file.stat().st_size)  # same size: only loading can tell
    err = finish(todi_process(*_resume_args(assets, out), "--resume"))
    assert "step-00000016 is unusable" in err and f"falling back to {previous.name}" in err, err[-3000:]
    _check_resumed(out, reference_run)


# --------------------------------------------------------------------------------------------------
# End to end on real data: SFT a teacher, distil it into a LoRA student
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (DOLLY / "train.jsonl").is_file(), reason=f"Dolly data not found under {DOLLY}")
def test_sft_then_lora_distill_on_dolly(tmp_path, assets):
    from transformers import AutoModelForCausalLM

    data = ["--data", DOLLY / "train.jsonl", "--max-examples", 200, "--dev", DOLLY / "dev.jsonl",
            "--dev-max-examples", 8, "--eval-max-new-tokens", 16, "--batch-size", 8, "--max-length", 128,
            "--max-prompt-length", 64, "--log-every", 5, "--save-every", 0]  # fmt: skip
    teacher = tmp_path / "teacher"
    status = run_todi(
        "sft", "--model", assets.teacher, "--out", teacher, "--epochs", 2, "--lr", "3e-3", *data
    )
    assert status == 0
    records = train_records(teacher)
    assert len(records) == 10  # 200 examples / 8 = 25 steps per epoch, logged every 5
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    expected = {"step", "epoch", "lr", "loss", "ce", "kd", "grad_norm", "tokens_per_s", "peak_mem"}
    assert expected <= records[0].keys()
    dev = dev_records(teacher)
    assert [r["step"] for r in dev] == [25, 50] and "dev_rougeL" in dev[0]  # once per epoch
    assert list((teacher / "tb").glob("events.out.tfevents.*")), "no TensorBoard events"
    assert (teacher / "config.yaml").is_file() and "transformers" in (teacher / "run_info.json").read_text()
    assert (teacher / "best" / "model.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(teacher / "final")

    student = tmp_path / "student"
    status = run_todi("distill", "--teacher", teacher / "final", "--student", assets.student, "--out", student,
                      "--loss", "todi", "--lora-r", 8, "--lora-alpha", 16, "--lr", "5e-3", "--max-steps", 25,
                      "--eval-every", 25, *data)  # fmt: skip
    assert status == 0
    records = train_records(student)
    assert records[-1]["loss"] < records[0]["loss"]
    assert all(0.0 < r["todi_weight"] < 1.0 for r in records)
    final = weights(student / "final")
    initial = weights(assets.student)
    assert final.keys() == initial.keys(), "the LoRA adapter must be merged into the plain weights"
    changed = {k for k in final if not torch.equal(final[k], initial[k])}
    # Only the LoRA-wrapped linear layers of the blocks move; embeddings, norms and the head stay frozen.
    assert changed and all(k.endswith("_proj.weight") and ".layers." in k for k in changed)
    reloaded = AutoModelForCausalLM.from_pretrained(student / "final")
    assert torch.equal(
        reloaded.model.layers[0].self_attn.q_proj.weight, final["model.layers.0.self_attn.q_proj.weight"]
    )
