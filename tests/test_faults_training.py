"""Fault injection for `todi sft` / `todi distill`: a careless or hostile user must never lose data.

Each test is one case the reliability probe found (issue: "Never lose a user's data"): --overwrite on
folders that are not todi runs or that hold an input, non-finite losses, a NaN teacher, two runs on one
--out, a resume that would mix runs, a full disk, a damaged trainer state. Runs are tiny (2-layer Llama,
hidden 32/64) and in-process unless a signal is involved.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny import ENV, GPT2_DIR, TINY, run_todi
from tiny import gpt2_tokenizer as _tokenizer
from tiny import save_llama as _save_llama
from tiny import write_data as _write_data
from todi.checkpoint import TrainerState, list_checkpoints, verify_checkpoint
from todi.outputs import LOCK_NAME, MARKER_NAME, OutputFolder

pytestmark = [
    pytest.mark.skipif(not GPT2_DIR.is_dir(), reason=f"GPT-2 tokenizer not found at {GPT2_DIR}"),
    pytest.mark.usefixtures("fresh_accelerate_state"),
]


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> SimpleNamespace:
    """The probe's W: a folder with a tiny teacher, student and data."""
    root = tmp_path_factory.mktemp("w")
    tokenizer = _tokenizer()
    return SimpleNamespace(
        teacher=_save_llama(root / "teacher", tokenizer, hidden=64, seed=1),
        student=_save_llama(root / "student", tokenizer, hidden=32, seed=2),
        data=_write_data(root / "train.jsonl", 24, seed=0),
    )


def base(w: SimpleNamespace, out: Path, *extra: object) -> list[object]:
    """The probe's B: a 2-step distill."""
    return ["distill", "--teacher", w.teacher, "--student", w.student, "--data", w.data, "--max-steps", 2,
            "--out", out, *TINY, *extra]  # fmt: skip


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def finite_weights(folder: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(folder / "model.safetensors")).values())


# --------------------------------------------------------------------------------------------------
# 1-2. --overwrite deletes only todi's own runs, never an input, and only after the inputs load
# --------------------------------------------------------------------------------------------------


def test_overwrite_refuses_a_folder_todi_did_not_write(tmp_path, w, capsys):
    p = tmp_path / "p"
    (p / "src").mkdir(parents=True)
    (p / "src" / "main.py").write_text("x\n")
    (p / "config.yaml").write_text("a: 1\n")
    before = tree(p)
    assert run_todi(*base(w, p, "--overwrite")) == 2
    assert "was not written by todi" in capsys.readouterr().err
    assert tree(p) == before


def test_overwrite_never_deletes_the_model_it_loads(tmp_path, w, capsys):
    r = tmp_path / "r"
    assert run_todi(*base(w, r)) == 0
    before = tree(r)
    args = base(w, r, "--overwrite")
    args[args.index("--teacher") + 1] = r / "final"
    assert run_todi(*args) == 2
    assert "contains the input --teacher" in capsys.readouterr().err
    assert tree(r) == before


def test_overwrite_inside_an_input_is_refused(tmp_path, w, capsys):
    student = tmp_path / "student"
    import shutil

    shutil.copytree(w.student, student)
    out = student / "run"
    assert run_todi(*base(w, out)) == 0
    args = base(w, out, "--overwrite")
    args[args.index("--student") + 1] = student
    assert run_todi(*args) == 2
    assert "lies inside the input --student" in capsys.readouterr().err
    assert (out / "final" / "model.safetensors").is_file()


def test_overwrite_replaces_a_run_only_when_the_new_one_succeeds(tmp_path, w, monkeypatch, capsys):
    r = tmp_path / "r"
    assert run_todi(*base(w, r)) == 0
    before = tree(r)

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure in the first optimizer step")

    monkeypatch.setattr(torch.optim.AdamW, "step", fail)
    assert run_todi(*base(w, r, "--overwrite")) == 1
    assert "injected failure" in capsys.readouterr().err
    assert tree(r) == before, "a failed --overwrite must put the old run back"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"], "nothing may be left beside it"

    monkeypatch.undo()
    monkeypatch.setenv("TODI_COMPILE", "0")
    assert run_todi(*base(w, r, "--overwrite", "--seed", 7)) == 0
    assert json.loads((r / "segments.jsonl").read_text().splitlines()[0])["options"]["seed"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"], "the replaced run is deleted on success"


def test_overwrite_of_an_older_unmarked_run_is_refused(tmp_path, w, capsys):
    r = tmp_path / "r"
    assert run_todi(*base(w, r)) == 0
    (r / MARKER_NAME).unlink()  # as written by todi before markers: recognised, resumable, not deleted
    assert run_todi(*base(w, r, "--overwrite")) == 2
    assert "written by an older todi" in capsys.readouterr().err
    assert (r / "final").is_dir()


# --------------------------------------------------------------------------------------------------
# 3-4. Non-finite guard and NaN teachers
# --------------------------------------------------------------------------------------------------


def test_exploding_lr_stops_before_nan_weights_are_written(tmp_path, w, capsys):
    out = tmp_path / "run"
    status = run_todi(*base(w, out, "--lr", "1e10", "--max-steps", 6, "--save-every", 1))
    err = capsys.readouterr().err
    assert status == 1
    assert "the update was not applied" in err and "--lr 1e+10 is far above" in err, err
    assert not (out / "final").exists()
    assert list_checkpoints(out), "the steps before the blow-up were checkpointed"
    for checkpoint in list_checkpoints(out):
        assert finite_weights(checkpoint), f"{checkpoint} holds NaN/inf weights"


def test_nan_policy_skip_skips_one_bad_step_and_counts_it(tmp_path, w, monkeypatch):
    from todi import training

    real, calls = training.LossModule.forward, []

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the second training micro-batch: one step's loss becomes NaN
            out.loss = out.loss * math.nan
        return out

    monkeypatch.setattr(training.LossModule, "forward", forward)
    out = tmp_path / "run"
    assert run_todi(*base(w, out, "--nan-policy", "skip", "--max-steps", 3, "--log-every", 1)) == 0
    assert finite_weights(out / "final")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped_steps") for r in records] == [None, 1, 1]
    assert math.isnan(records[1]["loss"]) and math.isfinite(records[2]["loss"])


def test_nan_policy_skip_still_stops_a_run_that_never_recovers(tmp_path, w, capsys):
    out = tmp_path / "run"
    status = run_todi(*base(w, out, "--lr", "1e10", "--max-steps", 30, "--nan-policy", "skip"))
    assert status == 1
    assert "the update was not applied" in capsys.readouterr().err
    assert not (out / "final").exists()


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_a_model_with_a_nan_weight_is_refused_at_load(tmp_path, w, capsys, role):
    import shutil

    broken = tmp_path / role
    shutil.copytree(getattr(w, role), broken)
    tensors = load_file(str(broken / "model.safetensors"))
    name = sorted(tensors)[3]
    tensors[name].view(-1)[5] = math.nan
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    args = base(w, tmp_path / "run")
    args[args.index(f"--{role}") + 1] = broken
    assert run_todi(*args) == 1
    err = capsys.readouterr().err
    assert f"{role} {broken}: parameter" in err and "holds NaN or infinite values" in err, err
    assert not (tmp_path / "run").exists()


def test_nan_teacher_logits_are_an_error_not_a_masked_item():
    from todi.errors import NonFiniteError
    from todi.losses import distillation_loss, fused_linear_distillation_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(6, 11), torch.randn(6, 11)
    labels = torch.randint(0, 11, (6,))
    masked = teacher.clone()
    masked[1, 3] = -math.inf  # a masked item stays allowed
    assert torch.isfinite(distillation_loss(student, masked, labels).loss)
    teacher[2, 4] = math.nan
    with pytest.raises(NonFiniteError, match="teacher's logits are NaN at 1 of 6 positions"):
        distillation_loss(student, teacher, labels)
    hidden_s, weight_s = torch.randn(6, 5), torch.randn(11, 5)
    hidden_t, weight_t = torch.randn(6, 7), torch.randn(11, 7)
    weight_t[4, 0] = math.nan
    with pytest.raises(NonFiniteError):
        fused_linear_distillation_loss(hidden_s, weight_s, hidden_t, weight_t, labels)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--dtype", "float16"], "--dtype float16 trains float16 weights"),
        (["--weight-decay", "inf"], "--weight-decay must be a finite number"),
        (["--temperature", "1e-30"], "--temperature must be a finite number >= 0.01"),
        (["--beta", "-1"], "beta=-1.0 must be >= 0"),
        (["--mixed-precision", "fp16"], "--mixed-precision fp16 needs a GPU"),
        (["--resume-changed"], "--resume-changed applies to --resume"),
    ],
)
def test_options_that_can_only_give_nan_are_refused(tmp_path, w, capsys, option, message):
    if "fp16" in option and torch.cuda.is_available():
        pytest.skip("fp16 autocast is valid on a GPU")
    out = tmp_path / "run"
    assert run_todi(*base(w, out, *option)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# 5. One run per --out
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [[], ["--resume"], ["--overwrite"]])
def test_a_locked_out_is_refused_and_left_alone(tmp_path, w, capsys, mode):
    r = tmp_path / "r"
    if mode:  # resumed or replaced while it still trains; else a second new run started at the same time
        assert run_todi(*base(w, r)) == 0
    other = OutputFolder(r, "distill")  # stands for a run still training in r
    before = tree(r) if r.exists() else {}
    other.lock()
    try:
        assert run_todi(*base(w, r, *mode)) == 1
        err = capsys.readouterr().err
        assert f"is in use by todi distill (pid {os.getpid()}" in err, err
        assert {k: v for k, v in tree(r).items() if k != LOCK_NAME} == {
            k: v for k, v in before.items() if k != LOCK_NAME
        }
        assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    finally:
        other.unlock()


def test_a_lock_left_by_a_killed_process_is_not_in_the_way(tmp_path, w):
    r = tmp_path / "r"
    code = (
        "import os, sys; from todi.outputs import OutputFolder; "
        f"f = OutputFolder({str(r)!r}, 'distill'); f.lock(); os.kill(os.getpid(), 9)"
    )
    subprocess.run([sys.executable, "-c", code], env=ENV, check=False)
    assert json.loads((r / LOCK_NAME).read_text())["pid"] != os.getpid()
    assert run_todi(*base(w, r)) == 0


# --------------------------------------------------------------------------------------------------
# 6. Strict resume
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def run2(tmp_path, w) -> Path:
    """A finished 2-step run with checkpoints, resumable for more steps."""
    out = tmp_path / "run"
    assert run_todi(*base(w, out, "--save-every", 1)) == 0
    return out


@pytest.mark.parametrize(
    ("change", "listed"),
    [
        (["--lr", "1e-3"], "lr 0.0005 -> 0.001"),
        (["--loss", "fkl"], "loss 'todi' -> 'fkl'"),
        (["--kd-rate", "0.7"], "kd_rate 0.5 -> 0.7"),
        (["--temperature", "1.0"], "temperature 2.0 -> 1.0"),
        (["--beta", "2"], "beta None -> 2.0"),
        (["--todi-weight", "hard"], "todi_weight None -> 'hard'"),
    ],
)
def test_resume_with_changed_settings_is_refused_unless_asked(run2, w, capsys, change, listed):
    config = (run2 / "config.yaml").read_text()
    assert run_todi(*base(w, run2, "--resume", "--max-steps", 3, *change)) == 2
    err = capsys.readouterr().err
    assert listed in err and "--resume-changed" in err, err
    assert run_todi(*base(w, run2, "--resume", "--max-steps", 3, "--resume-changed", *change)) == 0
    segments = [json.loads(line) for line in (run2 / "segments.jsonl").read_text().splitlines()]
    assert [s["from_step"] for s in segments] == [0, 2]
    assert list(segments[1]["changed"]) == [listed.split()[0]]
    assert (run2 / "config.yaml").read_text() == config, "the first segment's options are kept"


def test_resume_on_a_data_file_replaced_at_the_same_path_is_refused(tmp_path, w, capsys):
    import shutil

    data = tmp_path / "data.jsonl"
    shutil.copy(w.data, data)
    out = tmp_path / "run"
    assert run_todi(*_with(base(w, out, "--save-every", 1), "--data", data)) == 0
    _write_data(data, 24, seed=5)  # other records under the same name
    assert run_todi(*_with(base(w, out, "--resume", "--max-steps", 3), "--data", data)) == 2
    assert "data contents (the files changed)" in capsys.readouterr().err


def _with(args: list[object], option: str, value: object) -> list[object]:
    args = list(args)
    args[args.index(option) + 1] = value
    return args


def test_resume_with_replaced_teacher_weights_at_the_same_path_is_refused(tmp_path, w, capsys):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(w.teacher, teacher)
    out = tmp_path / "run"
    assert run_todi(*_with(base(w, out, "--save-every", 1), "--teacher", teacher)) == 0
    _save_llama(teacher, _tokenizer(), hidden=64, seed=99)  # retrained in place: same config, new weights
    assert run_todi(*_with(base(w, out, "--resume", "--max-steps", 3), "--teacher", teacher)) == 2
    assert "teacher contents (the files changed)" in capsys.readouterr().err


def test_an_sft_run_cannot_be_resumed_as_distill(tmp_path, w, capsys):
    out = tmp_path / "run"
    sft = ["sft", "--model", w.student, "--data", w.data, "--max-steps", 2, "--out", out, *TINY]
    assert run_todi(*sft) == 0
    assert run_todi(*base(w, out, "--resume", "--max-steps", 3)) == 2
    assert "the command (todi sft before, todi distill now)" in capsys.readouterr().err


def test_resume_into_a_folder_with_an_unrelated_config_is_refused(tmp_path, w, capsys):
    out = tmp_path / "p"
    out.mkdir()
    (out / "config.yaml").write_text("a: 1\n")
    assert run_todi(*base(w, out, "--resume")) == 2
    assert "was not written by todi" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == "a: 1\n"


def test_resume_with_fewer_steps_than_done_is_refused(run2, w, capsys):
    final = tree(run2 / "final")
    assert run_todi(*base(w, run2, "--resume", "--max-steps", 1)) == 2
    assert "already at step 2, past the 1 steps" in capsys.readouterr().err
    assert tree(run2 / "final") == final


def test_a_malformed_trainer_state_falls_back_to_the_previous_checkpoint(run2, w, caplog):
    previous, newest = list_checkpoints(run2)[-2:]
    for bad in ("[]", '{"global_step": "two"}', '{"global_step": 2, "extra": 5}'):
        (newest / "trainer_state.json").write_text(bad)
        assert verify_checkpoint(newest) is not None
        with pytest.raises(ValueError):
            TrainerState.from_file(newest / "trainer_state.json")
    assert run_todi(*base(w, run2, "--resume", "--max-steps", 3)) == 0
    assert f"falling back to {previous.name}" in caplog.text


# --------------------------------------------------------------------------------------------------
# Weaker cases: full disk, --out ., SIGTERM
# --------------------------------------------------------------------------------------------------


def _safetensor_error(text: str) -> Exception:
    from safetensors import SafetensorError

    return SafetensorError(text)


FULL_DISK = {  # how each writer reports a failed write -> what the error must say
    "oserror": (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
    "torch": (
        RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4416 vs 4306"),
        "the write failed (a full disk or a file size limit)",
    ),
    "safetensors": (
        _safetensor_error("Error while serializing: I/O error: No space left on device (os error 28)"),
        "the disk is full",
    ),
    "ulimit": (
        _safetensor_error("Error while serializing: I/O error: File too large (os error 27)"),
        "a file size limit was reached",
    ),
}


@pytest.mark.parametrize("case", list(FULL_DISK))
def test_a_full_disk_gives_an_error_that_says_so_and_keeps_older_checkpoints(
    tmp_path, w, monkeypatch, capsys, case
):
    failure, cause = FULL_DISK[case]
    import accelerate

    real, calls = accelerate.Accelerator.save_state, []

    def save_state(self, output_dir, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "partial.bin").write_bytes(b"x" * 10)
            raise failure
        return real(self, output_dir, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    out = tmp_path / "run"
    assert run_todi(*base(w, out, "--save-every", 1)) == 1
    err = capsys.readouterr().err
    assert "could not write checkpoint step-00000002" in err and cause in err, err
    assert "Traceback" not in err
    assert [p.name for p in list_checkpoints(out)] == ["step-00000001"]
    assert verify_checkpoint(list_checkpoints(out)[0]) is None
    assert not list((out / "checkpoints").glob(".tmp-*")), "the partial checkpoint is removed"


def test_a_full_disk_while_exporting_the_final_model_names_it_and_leaves_no_partial_folder(
    tmp_path, w, monkeypatch, capsys
):
    from transformers import PreTrainedModel

    def save_pretrained(self, folder, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"x" * 10)
        raise _safetensor_error("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_pretrained)
    out = tmp_path / "run"
    assert run_todi(*base(w, out)) == 1
    err = capsys.readouterr().err
    assert f"could not write the model to {out / 'final'}: the disk is full" in err, err
    assert not (out / "final").exists() and not (out / ".tmp-final").exists()
    assert list_checkpoints(out), "the last checkpoint was written before the export"


def test_out_dot_is_the_current_folder(tmp_path, w, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert run_todi(*base(w, ".")) == 0
    assert (here / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path, w):
    import time

    out = tmp_path / "run"
    args = base(w, out, "--max-steps", 400, "--save-every", 1000)
    process = subprocess.Popen(
        [sys.executable, "-m", "todi.cli", *map(str, args)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out / "segments.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-3000:]
    assert "checkpoint saved" in err and list_checkpoints(out)
