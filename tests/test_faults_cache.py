"""`todi cache-teacher` never loses data and never mixes or serves a damaged cache: --overwrite only
replaces a marked teacher cache (late, reversibly), a resume checks the teacher's weights and every
setting that changes the bytes, shards are verified by size and SHA-256, and a NaN teacher is an error
(tiny random Llama teachers, GPT-2 tokenizer)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

from tiny import GPT2_DIR, gpt2_tokenizer, save_llama, write_data
from todi import cache, cli
from todi.cache import Config, TeacherCache, build_cache
from todi.checkpoint import sha256_file
from todi.errors import NonFiniteError, TodiError, UsageError
from todi.outputs import MARKER_NAME, OutputFolder

pytestmark = [
    pytest.mark.skipif(not GPT2_DIR.is_dir(), reason=f"GPT-2 tokenizer not found at {GPT2_DIR}"),
    pytest.mark.usefixtures("one_intra_op_thread"),
]

NAN = float("nan")
SHARDS = ("shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-cache")
    return {
        "teacher": str(save_llama(root / "teacher", gpt2_tokenizer(), 32, seed=1)),
        "data": str(write_data(root / "train.jsonl", 24, seed=3)),  # 3 shards of 10, 10 and 4 examples
    }


def _config(inputs, out: Path, **options) -> Config:
    settings = {"max_length": 64, "max_prompt_length": 32, "shard_size": 10, "top_k": 8, "batch_size": 4}
    return Config(teacher=inputs["teacher"], data=inputs["data"], out=str(out), **{**settings, **options})


def _argv(config: Config) -> list[str]:
    argv = ["cache-teacher"]
    for key in (
        "teacher",
        "data",
        "out",
        "max_length",
        "max_prompt_length",
        "shard_size",
        "top_k",
        "batch_size",
    ):
        argv += [f"--{key.replace('_', '-')}", str(getattr(config, key))]
    return argv + (["--overwrite"] if config.overwrite else [])


class Killed(Exception):
    """Stands for the process dying."""


def _die_before_shard(monkeypatch, n: int) -> None:
    """Make the build die just before it writes its shard number ``n`` (counting from 0)."""
    real, calls = cache._write_shard, []

    def write(*args, **kwargs):
        if len(calls) == n:
            raise Killed
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(cache, "_write_shard", write)


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.todi-"))


# ---- --overwrite, the marker and the lock ---------------------------------------------------------


def test_overwrite_never_deletes_a_folder_todi_did_not_write(inputs, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("a year of work")
    assert cli.main(_argv(_config(inputs, out, overwrite=True))) == 2
    assert "not written by todi" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "a year of work"
    # nor an input: --out naming the teacher's folder is refused before anything is touched
    teacher = tmp_path / "teacher"
    shutil.copytree(inputs["teacher"], teacher)
    before = sorted(p.name for p in teacher.iterdir())
    assert cli.main(_argv(_config({**inputs, "teacher": str(teacher)}, teacher, overwrite=True))) == 2
    assert sorted(p.name for p in teacher.iterdir()) == before


def test_overwrite_replaces_only_a_cache_and_only_after_success(inputs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "c"
    build_cache(_config(inputs, out, top_k=4))
    assert json.loads((out / MARKER_NAME).read_text())["command"] == "cache-teacher"
    with pytest.raises(UsageError, match=r"built with other settings .*top_k: 4 -> 8"):
        build_cache(_config(inputs, out))
    # a rebuild that dies before writing a shard puts the old cache back
    _die_before_shard(monkeypatch, 0)
    with pytest.raises(Killed):
        build_cache(_config(inputs, out, overwrite=True))
    assert _manifest(out)["top_k"] == 4 and _manifest(out)["complete"] and not _siblings(out)
    # one that dies after writing a shard keeps both: its partial output, and the old cache aside
    monkeypatch.undo()
    _die_before_shard(monkeypatch, 1)
    with pytest.raises(Killed):
        build_cache(_config(inputs, out, overwrite=True))
    assert _manifest(out)["top_k"] == 8 and not _manifest(out)["complete"]
    (aside,) = _siblings(out)
    assert ".todi-old-" in aside and _manifest(tmp_path / aside)["top_k"] == 4
    shutil.rmtree(tmp_path / aside)
    # the partial rebuild resumes without flags; a successful --overwrite leaves nothing aside
    monkeypatch.undo()
    build_cache(_config(inputs, out))
    assert _manifest(out)["complete"] and _manifest(out)["top_k"] == 8
    assert cli.main(_argv(_config(inputs, out, top_k=4, overwrite=True))) == 0
    assert _manifest(out)["top_k"] == 4 and not _siblings(out)


def test_a_cache_in_use_is_refused(inputs, tmp_path, capsys):
    out = tmp_path / "c"
    holder = OutputFolder(out, "cache-teacher")
    holder.lock()
    try:
        assert cli.main(_argv(_config(inputs, out))) == 1
        assert "is in use by todi cache-teacher" in capsys.readouterr().err
    finally:
        holder.unlock()


# ---- resuming: same teacher weights, same settings -------------------------------------------------


def test_resume_keeps_finished_shards(inputs, tmp_path, monkeypatch):
    out = tmp_path / "c"
    _die_before_shard(monkeypatch, 1)
    with pytest.raises(Killed):
        build_cache(_config(inputs, out))
    assert _manifest(out)["checksums"].keys() == {SHARDS[0]}
    first = (out / SHARDS[0]).stat().st_mtime_ns
    monkeypatch.undo()
    build_cache(_config(inputs, out))
    assert (out / SHARDS[0]).stat().st_mtime_ns == first
    manifest = _manifest(out)
    assert manifest["complete"] and manifest["checksums"].keys() == set(SHARDS)
    assert manifest["batch_size"] == 4 and manifest["shard_size"] == 10 and manifest["device_type"] == "cpu"
    assert manifest["teacher_identity"].startswith("sha256:")


def test_resume_with_other_teacher_weights_is_refused(inputs, tmp_path, monkeypatch):
    teacher = tmp_path / "teacher"
    shutil.copytree(inputs["teacher"], teacher)
    config = _config({**inputs, "teacher": str(teacher)}, tmp_path / "c")
    _die_before_shard(monkeypatch, 1)
    with pytest.raises(Killed):
        build_cache(config)
    monkeypatch.undo()
    save_llama(teacher, gpt2_tokenizer(), 32, seed=7)  # retrained in place: same config, other weights
    with pytest.raises(UsageError, match="teacher_identity"):
        build_cache(config)
    assert sorted(p.name for p in (tmp_path / "c").glob("shard-*")) == [SHARDS[0]]


def test_resume_with_other_batch_size_or_shard_size_or_device_is_refused(inputs, tmp_path, monkeypatch):
    out = tmp_path / "c"
    _die_before_shard(monkeypatch, 1)
    with pytest.raises(Killed):
        build_cache(_config(inputs, out))
    monkeypatch.undo()
    with pytest.raises(UsageError, match=r"batch_size: 4 -> 5"):
        build_cache(_config(inputs, out, batch_size=5))
    with pytest.raises(UsageError, match=r"shard_size: 10 -> 12"):
        build_cache(_config(inputs, out, shard_size=12))
    manifest = _manifest(out)
    (out / "manifest.json").write_text(json.dumps({**manifest, "device_type": "cuda"}))
    with pytest.raises(UsageError, match=r"device_type: 'cuda' -> 'cpu'"):
        build_cache(_config(inputs, out))


def test_batch_size_changes_the_bytes(inputs, tmp_path):
    """Why it is part of the settings: the tail draws are seeded and allotted per batch."""
    build_cache(_config(inputs, tmp_path / "a", batch_size=4))
    build_cache(_config(inputs, tmp_path / "b", batch_size=5))
    build_cache(_config(inputs, tmp_path / "a2", batch_size=4))
    a, b, a2 = (_manifest(tmp_path / n)["checksums"][SHARDS[0]] for n in ("a", "b", "a2"))
    assert a == a2 and a["sha256"] != b["sha256"]


# ---- shards verified by size and SHA-256 ----------------------------------------------------------


def test_damaged_shard_is_refused_on_open_and_rebuilt_by_the_same_command(inputs, tmp_path, caplog):
    out = tmp_path / "c"
    build_cache(_config(inputs, out))
    good = (out / SHARDS[1]).read_bytes()
    (out / SHARDS[1]).write_bytes(good[: len(good) // 2])  # truncated (a full disk, a copy cut short)
    with pytest.raises(TodiError, match=SHARDS[1]) as err:
        TeacherCache(out)
    assert "todi cache-teacher" in err.value.hint
    damaged = bytearray(good)
    damaged[-5] ^= 0xFF  # same size, eight bits flipped
    (out / SHARDS[1]).write_bytes(bytes(damaged))
    with pytest.raises(TodiError, match=f"{SHARDS[1]}.*SHA-256"):
        TeacherCache(out)
    with caplog.at_level(logging.WARNING):
        build_cache(_config(inputs, out))
    assert SHARDS[1] in caplog.text and "rebuilding" in caplog.text
    assert (out / SHARDS[1]).read_bytes() == good
    assert len(TeacherCache(out).rows([0, 12, 23])) > 0


def test_shard_not_recorded_in_the_manifest_is_rebuilt(inputs, tmp_path, monkeypatch, caplog):
    out = tmp_path / "c"
    _die_before_shard(monkeypatch, 1)
    with pytest.raises(Killed):
        build_cache(_config(inputs, out))
    monkeypatch.undo()
    (out / SHARDS[1]).write_bytes(b"written, renamed, never recorded")
    with caplog.at_level(logging.WARNING):
        build_cache(_config(inputs, out))
    assert f"{SHARDS[1]} is not recorded" in caplog.text and "rebuilding it" in caplog.text
    TeacherCache(out)  # verifies every shard


def test_legacy_cache_without_checksums(inputs, tmp_path):
    """A cache built before checksums: a damaged shard is a TodiError naming it, not a SafetensorError;
    an unfinished one resumes (its unverifiable shards are rebuilt) and gets a marker."""
    out = tmp_path / "c"
    build_cache(_config(inputs, out))
    legacy = _manifest(out)
    for key in (
        "checksums",
        "batch_size",
        "shard_size",
        "device_type",
        "teacher_identity",
        "teacher_lora_identity",
    ):
        legacy.pop(key)
    (out / MARKER_NAME).unlink()
    (out / "manifest.json").write_text(json.dumps(legacy))
    good = (out / SHARDS[2]).read_bytes()
    (out / SHARDS[2]).write_bytes(good[:100])
    with pytest.raises(TodiError, match=SHARDS[2]):
        TeacherCache(out)
    (out / "manifest.json").write_text(json.dumps({**legacy, "complete": False}))
    build_cache(_config(inputs, out))
    assert (out / MARKER_NAME).is_file() and _manifest(out)["checksums"].keys() == set(SHARDS)
    assert (out / SHARDS[2]).read_bytes() == good
    TeacherCache(out)


def test_sha256_reads_a_file_in_blocks(tmp_path):
    data = bytes(range(256)) * 5000  # 1.22 MiB: one full 1 MiB block and a partial one
    (tmp_path / "blob").write_bytes(data)
    assert sha256_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest()


# ---- a NaN teacher ------------------------------------------------------------------------------


def _teacher_with(path: Path, change) -> Path:
    from transformers import LlamaForCausalLM

    save_llama(path, gpt2_tokenizer(), 32, seed=1)
    model = LlamaForCausalLM.from_pretrained(path)
    with torch.no_grad():
        change(model)
    model.save_pretrained(path)
    return path


def test_nan_weight_is_an_error_naming_the_parameter(inputs, tmp_path):
    teacher = _teacher_with(tmp_path / "t", lambda m: m.model.layers[1].mlp.up_proj.weight[3, 5].fill_(NAN))
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.up_proj\.weight") as err:
        build_cache(_config({**inputs, "teacher": str(teacher)}, tmp_path / "c"))
    assert "--teacher-dtype" in err.value.hint
    assert not list((tmp_path / "c").glob("shard-*"))


def test_non_finite_logits_are_an_error_naming_the_examples(inputs, tmp_path):
    def overflow(model):  # finite weights whose logits overflow float32, as float16 does far sooner
        model.model.norm.weight.fill_(1e6)
        model.lm_head.weight.mul_(1e35)

    teacher = _teacher_with(tmp_path / "t", overflow)
    with pytest.raises(NonFiniteError, match="logits are NaN or infinite") as err:
        build_cache(_config({**inputs, "teacher": str(teacher)}, tmp_path / "c"))
    (indices, lines, path), *_ = re.findall(
        r"examples ([\d, ]+) \(lines ([\d, ]+) of (.+?)\)", str(err.value)
    )
    assert path == inputs["data"] and [int(i) + 1 for i in indices.split(", ")] == [
        int(n) for n in lines.split(", ")
    ]
    assert "--teacher-dtype float32 or bfloat16" in err.value.hint
    assert not list((tmp_path / "c").glob("shard-*")) and not list((tmp_path / "c").glob(".tmp-*"))
    # the unfinished cache holds nothing: a build with a sound teacher takes its place without --overwrite
    build_cache(_config(inputs, tmp_path / "c"))
    assert _manifest(tmp_path / "c")["complete"]


# ---- options ---------------------------------------------------------------------------------------


def test_max_prompt_length_must_be_below_max_length(inputs, tmp_path, capsys):
    argv = _argv(_config(inputs, tmp_path / "c"))
    argv[argv.index("--max-prompt-length") + 1] = "64"  # = --max-length
    assert cli.main(argv) == 2
    assert "--max-prompt-length must be in [1, max-length), got 64" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
