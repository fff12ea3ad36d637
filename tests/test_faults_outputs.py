"""Never lose a user's data: `todi init-student`, `todi eval` and `todi demo` write only folders they own
(todi's marker, see todi.outputs), never into or over an input, and eval never reuses one model's answers
for another. Tiny random Llamas with the shared GPT-2 tokenizer; a few seconds in all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiny import GPT2_DIR, gpt2_tokenizer, save_llama, write_data
from todi import demo, demo_tasks, evaluation
from todi.cli import main
from todi.models import model_identity
from todi.outputs import LOCK_NAME, MARKER_NAME, OutputFolder, read_marker
from todi.student_init import INIT_RECORD

pytestmark = [
    pytest.mark.usefixtures("one_intra_op_thread"),
    pytest.mark.skipif(not GPT2_DIR.is_dir(), reason=f"GPT-2 tokenizer not found at {GPT2_DIR}"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


def _model(path: Path, tokenizer, seed: int) -> Path:
    return save_llama(path, tokenizer, 16, seed)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    """Folders OutputFolder sets aside while it replaces one: none may stay behind."""
    return sorted(p.name for p in parent.iterdir() if ".todi-" in p.name or p.name.startswith(".tmp-"))


# --------------------------------------------------------------------------------------------------
# todi init-student
# --------------------------------------------------------------------------------------------------


def _init(teacher: Path, out: Path, *extra: str, layers: str = "2") -> list[str]:
    return ["init-student", "--from", str(teacher), "--layers", layers, "--out", str(out), *extra]


def test_init_student_never_deletes_the_teacher_beside_or_inside_out(tmp_path, tokenizer, capsys):
    runs = tmp_path / "runs"
    teacher = _model(runs / "teacher", tokenizer, 0)
    (runs / "notes.txt").write_text("my notes")
    before = _snapshot(runs)
    assert main(_init(teacher, runs, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "contains the input --from" in err
    assert _snapshot(runs) == before
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_init_student_refuses_a_folder_it_did_not_write(tmp_path, tokenizer, capsys, overwrite):
    teacher = _model(tmp_path / "teacher", tokenizer, 0)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert main(_init(teacher, out, *(["--overwrite"] if overwrite else []))) == 2
    assert "was not written by todi" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_init_student_replaces_only_its_own_student(tmp_path, tokenizer, capsys):
    teacher = _model(tmp_path / "teacher", tokenizer, 0)
    out = tmp_path / "student"
    assert main(_init(teacher, out)) == 0
    assert read_marker(out)["command"] == "init-student"
    assert (out / INIT_RECORD).is_file() and (out / "model.safetensors").is_file()
    assert main(_init(teacher, out)) == 2
    assert "already holds a student" in capsys.readouterr().err
    assert main(_init(teacher, out, "--overwrite", layers="1,")) == 0
    assert json.loads((out / INIT_RECORD).read_text())["layers"] == [1]
    assert read_marker(out)["command"] == "init-student"
    assert _leftovers(tmp_path) == []


def test_init_student_keeps_a_student_written_before_markers(tmp_path, tokenizer, capsys):
    teacher = _model(tmp_path / "teacher", tokenizer, 0)
    out = tmp_path / "student"
    assert main(_init(teacher, out)) == 0
    (out / MARKER_NAME).unlink()  # as an older todi left it: todi_init.json, no marker
    before = _snapshot(out)
    assert main(_init(teacher, out)) == 2
    assert "already holds a student" in capsys.readouterr().err
    assert main(_init(teacher, out, "--overwrite")) == 2
    assert "written by an older todi" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_a_failed_init_student_leaves_no_half_student_and_restores_the_old(tmp_path, tokenizer, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    teacher = _model(tmp_path / "teacher", tokenizer, 0)
    out = tmp_path / "student"
    assert main(_init(teacher, out)) == 0
    old = _snapshot(out)

    def broken_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # The model is written, then the tokenizer fails: nothing of the new student may stay.
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", broken_disk)
    assert main(_init(teacher, out, "--overwrite", layers="1,")) == 1
    restored = _snapshot(out)
    assert restored.keys() == old.keys() | {LOCK_NAME}
    assert all(restored[name] == data for name, data in old.items() if name != LOCK_NAME)
    fresh = tmp_path / "fresh"
    assert main(_init(teacher, fresh)) == 1
    assert not fresh.exists()
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# todi eval
# --------------------------------------------------------------------------------------------------


def _eval(out: Path, data: Path, *models: Path, extra: tuple[str, ...] = ()) -> list[str]:
    argv = ["eval", "--data", str(data), "--seeds", "10", "--max-new-tokens", "2", "--device", "cpu"]
    for model in models:
        argv += ["--model", str(model)]
    return [*argv, "--out", str(out), *extra]


@pytest.fixture
def data(tmp_path) -> Path:
    return write_data(tmp_path / "set.jsonl", 3, seed=0)


def test_eval_never_reuses_another_models_cells_under_the_same_name(tmp_path, tokenizer, data, capsys):
    first = _model(tmp_path / "a" / "todi" / "final", tokenizer, 0)
    second = _model(tmp_path / "b" / "todi" / "final", tokenizer, 1)
    out = tmp_path / "eval"
    assert main(_eval(out, data, first)) == 0
    cell = out / "predictions" / "todi-final" / "set" / "seed10.jsonl"
    answers = cell.read_text()
    record = json.loads((cell.parents[1] / "model.json").read_text())
    assert record == {"path": str(first), "identity": model_identity(first)}

    assert main(_eval(out, data, second)) == 2
    err = capsys.readouterr().err
    assert str(first) in err and str(second) in err and "another model" in err and "--name" in err
    assert cell.read_text() == answers
    # Told apart by --name, both are evaluated.
    assert main(_eval(out, data, second, extra=("--name", "b-final"))) == 0
    assert json.loads((out / "predictions/b-final/model.json").read_text())["path"] == str(second)


def test_eval_refuses_a_model_changed_at_the_same_path(tmp_path, tokenizer, data, capsys, monkeypatch):
    model = _model(tmp_path / "runs" / "final", tokenizer, 0)
    out = tmp_path / "eval"
    assert main(_eval(out, data, model)) == 0
    _model(model, tokenizer, 5)  # retrained into the same folder
    monkeypatch.setattr(evaluation, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(_eval(out, data, model)) == 2
    err = capsys.readouterr().err
    assert f"--model {model} has changed" in err and "delete" in err


def test_eval_adopts_predictions_written_before_model_json(tmp_path, tokenizer, data, monkeypatch):
    model = _model(tmp_path / "runs" / "final", tokenizer, 0)
    out = tmp_path / "eval"
    assert main(_eval(out, data, model)) == 0
    (out / "predictions/runs-final/model.json").unlink()
    (out / MARKER_NAME).unlink()  # an --out of an older todi: predictions/settings.json, no marker
    monkeypatch.setattr(evaluation, "load_model", lambda *a, **k: pytest.fail("the cells were recomputed"))
    assert main(_eval(out, data, model)) == 0
    record = json.loads((out / "predictions/runs-final/model.json").read_text())
    assert record["identity"] == model_identity(model)
    assert read_marker(out)["command"] == "eval"


def test_eval_refuses_a_folder_that_is_not_an_evaluation(tmp_path, tokenizer, data, capsys):
    model = _model(tmp_path / "model", tokenizer, 0)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.json").write_text("my own results")
    assert main(_eval(out, data, model)) == 2
    assert "was not written by todi" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    assert (out / "results.json").read_text() == "my own results"
    # nor the folder of a model it reads
    assert main(_eval(model, data, model)) == 2
    assert "is the input --model" in capsys.readouterr().err


def test_eval_refuses_an_out_in_use(tmp_path, tokenizer, data, capsys):
    model = _model(tmp_path / "model", tokenizer, 0)
    out = tmp_path / "eval"
    with OutputFolder(out, "eval").claim(reuse=True):
        assert main(_eval(out, data, model)) == 1
    assert "is in use by todi eval" in capsys.readouterr().err
    assert not (out / "predictions").exists()


def test_compare_writes_only_an_evaluation_folder(tmp_path, tokenizer, data, capsys):
    model = _model(tmp_path / "model", tokenizer, 0)
    first = tmp_path / "eval"
    assert main(_eval(first, data, model)) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.md").write_text("my table")
    assert main(["eval", "--compare", str(first), "--out", str(mine)]) == 2
    assert "was not written by todi" in capsys.readouterr().err
    assert (mine / "results.md").read_text() == "my table"
    assert main(["eval", "--compare", str(first), "--out", str(tmp_path)]) == 2
    assert "contains the input --compare" in capsys.readouterr().err
    merged = tmp_path / "merged"
    for _ in range(2):  # a merged table is refreshed in place
        assert main(["eval", "--compare", str(first), "--out", str(merged)]) == 0
    assert read_marker(merged)["command"] == "eval"


# --------------------------------------------------------------------------------------------------
# todi demo (the pipeline itself is tests/test_demo.py's; here it must not start)
# --------------------------------------------------------------------------------------------------


class _Started(Exception):
    pass


@pytest.fixture
def no_pipeline(monkeypatch):
    """The demo stops where it would start its work, so only the folder checks run."""

    def started():
        raise _Started

    monkeypatch.setattr(demo_tasks, "build_tokenizer", started)


@pytest.mark.parametrize("overwrite", [False, True])
def test_demo_never_writes_into_a_foreign_folder(tmp_path, capsys, no_pipeline, overwrite):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(tmp_path), *(["--overwrite"] if overwrite else [])]) == 2
    assert "not a todi demo folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def _legacy_demo(out: Path) -> Path:
    (out / "runs").mkdir(parents=True)
    (out / "report.md").write_text("# an earlier demo\n")
    return out


def test_demo_reruns_in_its_own_folder_and_overwrite_restores_it_on_failure(tmp_path, no_pipeline, capsys):
    out = _legacy_demo(tmp_path / "demo")
    with pytest.raises(_Started):  # an older demo folder is reused, as before markers
        demo.run(demo.Config(out=str(out)))
    assert read_marker(out)["command"] == "demo"
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 1  # rerun: reaches the pipeline again
    capsys.readouterr()
    with pytest.raises(_Started):  # --overwrite sets the old demo aside; it comes back when the run fails
        demo.run(demo.Config(out=str(out), overwrite=True))
    assert (out / "report.md").read_text() == "# an earlier demo\n"
    assert _leftovers(tmp_path) == []


def test_demo_overwrite_refuses_a_demo_of_an_older_todi(tmp_path, no_pipeline, capsys):
    out = _legacy_demo(tmp_path / "demo")
    assert main(["demo", "--out", str(out), "--overwrite"]) == 2
    assert "written by an older todi" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "runs"]


def test_demo_refuses_at_once_a_student_run_it_may_not_replace(tmp_path, no_pipeline, capsys):
    out = _legacy_demo(tmp_path / "demo")
    run = out / "runs" / "sft" / "seed0"
    run.mkdir(parents=True)
    (run / "run_info.json").write_text(json.dumps({"command": "sft"}))  # a run of an older todi
    (run / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(out)]) == 2  # before any work, not after the teacher's training
    err = capsys.readouterr().err
    assert str(run) in err and "older todi" in err
    assert (run / "notes.txt").read_text() == "mine"
