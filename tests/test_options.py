"""Options a Trainer / TRL user types: aliases, --bf16/--fp16, "did you mean", grouped --help, YAML configs,
--optim, --lr-scheduler, --gradient-checkpointing, --push-to-hub, --loss-params and --plugin divergences.

Schedules are checked against the formulas written out here; training runs use tiny 2-layer Llamas over a
word-level vocabulary in this process.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as vocab_models
from transformers import PreTrainedTokenizerFast

from tiny import REPO, TEXT, TINY, run_todi, save_llama, write_data
from todi import cli
from todi.divergences import _REGISTRY, get_divergence
from todi.optim import build_optimizer, build_scheduler, cosine_schedule, optimizer_problem
from todi.run_record import CHANGED_ON_PURPOSE, FREE_ON_RESUME, LOCKED_ON_RESUME
from todi.training import DistillConfig, SFTConfig

REQUIRED = ["--teacher", "t", "--student", "s", "--data", "d.jsonl", "--out", "o"]


def distill(*argv: str) -> DistillConfig:
    return cli.parse_config("distill", [*REQUIRED, *argv])[1]


# ---------------------------------------------------------------------------------------------- aliases

ALIASES = [  # (Trainer / TRL spelling, value, todi field, parsed value)
    ("--learning_rate", "3e-4", "lr", 3e-4),
    ("--per_device_train_batch_size", "2", "batch_size", 2),
    ("--gradient_accumulation_steps", "4", "grad_accum", 4),
    ("--num_train_epochs", "3", "epochs", 3),
    ("--max_steps", "7", "max_steps", 7),
    ("--seed", "5", "seed", 5),
    ("--warmup_steps", "3", "warmup_steps", 3),
    ("--warmup_ratio", "0.1", "warmup_ratio", 0.1),
    ("--weight_decay", "0.01", "weight_decay", 0.01),
    ("--max_grad_norm", "0.5", "max_grad_norm", 0.5),
    ("--logging_steps", "5", "log_every", 5),
    ("--save_steps", "50", "save_every", 50),
    ("--save_total_limit", "3", "keep_last", 3),
    ("--eval_steps", "20", "eval_every", 20),
    ("--lr_scheduler_type", "linear", "lr_scheduler", "linear"),
    ("--optim", "adamw_torch_fused", "optim", "adamw_torch_fused"),
    ("--gradient_checkpointing", "true", "gradient_checkpointing", True),
    ("--report_to", "none", "report_to", "none"),
    ("--dataset_config", "en", "data_config", "en"),
    ("--dataset_train_split", "train[:90%]", "data_split", "train[:90%]"),
    ("--dataset_test_split", "test", "dev_split", "test"),
    ("--push_to_hub", "true", "push_to_hub", True),
]


@pytest.mark.parametrize(("flag", "value", "field", "expected"), ALIASES)
def test_trainer_spellings_set_the_same_option(flag, value, field, expected):
    assert getattr(distill(flag, value), field) == expected
    own = "--" + field.replace("_", "-")
    assert getattr(distill(own, value), field) == expected


def test_output_dir_model_and_dataset_names():
    config = cli.parse_config(
        "distill",
        [
            "--teacher_model_name_or_path",
            "t",
            "--model_name_or_path",
            "s",
            "--dataset_name",
            "d",
            "--output_dir",
            "o",
        ],
    )[1]
    assert (config.teacher, config.student, config.data, config.out) == ("t", "s", "d", "o")
    sft = cli.parse_config("sft", ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o"])[
        1
    ]
    assert (sft.model, sft.data, sft.out) == ("m", "d", "o")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], "auto"),
        (["--bf16"], "bf16"),
        (["--bf16", "True"], "bf16"),
        (["--fp16", "true"], "fp16"),
        (["--bf16", "false"], "no"),
        (["--bf16", "true", "--fp16", "false"], "bf16"),  # a Trainer config often spells out both
        (["--fp16", "false", "--bf16"], "bf16"),
        (["--mixed-precision", "fp16", "--bf16", "false"], "fp16"),
    ],
)
def test_bf16_and_fp16_flags_set_mixed_precision(flags, expected):
    assert distill(*flags).mixed_precision == expected


def test_bf16_and_fp16_together_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        distill("--bf16", "--fp16")
    assert exit_info.value.code == 2
    assert "--fp16: not allowed with --bf16" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("typed", "suggested"),
    [
        ("--learning-rte", "--learning_rate"),
        ("--gradient_acumulation_steps", "--gradient_accumulation_steps"),
        ("--max-lenght=64", "--max-length"),
        ("--kd_rte", "--kd_rate"),
    ],
)
def test_unknown_flags_suggest_the_nearest_option(typed, suggested, capsys):
    value = [] if "=" in typed else ["3"]
    assert cli.main(["distill", *REQUIRED, typed, *value]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"todi distill: error: unknown option {typed.split('=')[0]}"
    assert err[1].startswith("hint: did you mean ") and suggested in err[1]


def test_stray_values_are_refused(capsys):
    assert cli.main(["distill", *REQUIRED, "--lr", "1e-4", "5"]) == 2
    assert "unexpected argument(s) 5" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- YAML


def test_yaml_takes_trainer_spellings_and_refuses_one_option_twice(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("teacher: t\nstudent: s\ndata: d\noutput_dir: o\nlearning_rate: 0.001\nbf16: true\n")
    config = cli.parse_config("distill", ["--config", str(path)])[1]
    assert (config.out, config.lr, config.mixed_precision) == ("o", 0.001, "bf16")
    path.write_text("teacher: t\nstudent: s\ndata: d\nout: o\ncolumns: {input: context, output: response}\n")
    assert cli.parse_config("distill", ["--config", str(path)])[1].columns == {
        "input": "context",
        "output": "response",
    }
    path.write_text("teacher: t\nstudent: s\ndata: d\nout: o\ncolumns: {answer: response}\n")
    assert cli.main(["distill", "--config", str(path)]) == 2
    assert "--columns: unknown field 'answer'" in capsys.readouterr().err
    path.write_text("teacher: t\nstudent: s\ndata: d\nout: o\nlr: 0.1\nlearning_rate: 0.001\n")
    assert cli.main(["distill", "--config", str(path)]) == 2
    assert "lr and learning_rate name the same option" in capsys.readouterr().err
    path.write_text("teacher: t\nstudent: s\ndata: d\nout: o\nlearnig_rate: 0.1\n")
    assert cli.main(["distill", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown option(s) learnig_rate" in err and "did you mean learning_rate" in err


def test_example_distill_config_loads_and_is_valid():
    path = REPO / "configs" / "distill.yaml"
    config = cli.parse_config("distill", ["--config", str(path)])[1]
    assert isinstance(config, DistillConfig) and config.problems() == []
    import yaml

    written = yaml.safe_load(path.read_text(encoding="utf-8"))
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    assert set(written) <= fields  # todi's own names, so the file documents the options as --help shows them
    for key, value in written.items():
        assert getattr(config, key) == value, key


# ------------------------------------------------------------------------------------------ grouped help


def test_distill_help_groups_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["distill", "--help"])
    out = capsys.readouterr().out
    sections: dict[str, str] = {}
    for block in out.split("\n\n"):
        header, _, body = block.partition("\n")
        if header.endswith("options:"):
            sections[header] = body
    names = ["required", "data", "training", "distillation", "on-policy", "evaluation on --dev", "output"]
    assert list(sections) == ["options:", *(f"{name} options:" for name in names)]
    expected = {
        "required": ("--student", "--teacher", "--data", "--output_dir"),
        "data": ("--columns", "--data-config", "--data-split", "--template", "--max-length"),
        "training": ("--learning_rate", "--optim", "--lr-scheduler", "--gradient-checkpointing", "--bf16"),
        "distillation": ("--loss", "--kd-rate", "--loss-params", "--plugin", "--temperature"),
        "on-policy": ("--lmbda", "--seq-kd", "--replay-buffer", "--gen-max-new-tokens"),
        "output": ("--push-to-hub", "--hub-model-id", "--save-every", "--report-to", "--save-samples"),
    }
    for name, flags in expected.items():
        assert all(flag in sections[f"{name} options:"] for flag in flags), name
    for cls in (DistillConfig, SFTConfig):
        grouped = {name for members in cls.option_groups.values() for name in members}
        assert {f.name for f in dataclasses.fields(cls)} <= grouped


def test_every_training_option_says_what_resume_does_with_it():
    for cls in (DistillConfig, SFTConfig):
        for field in dataclasses.fields(cls):
            homes = [s for s in (LOCKED_ON_RESUME, FREE_ON_RESUME, CHANGED_ON_PURPOSE) if field.name in s]
            assert len(homes) == 1, field.name


# ------------------------------------------------------------------------------------ optimizer, schedule


def _lrs(name: str, warmup: int, total: int, min_ratio: float = 0.0) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = build_scheduler(name, optimizer, warmup=warmup, total_steps=total, min_ratio=min_ratio)
    lrs = []
    for _ in range(total):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def test_schedules_follow_their_formulas():
    w, n = 3, 10
    assert _lrs("linear", w, n) == pytest.approx(
        [2.0 * (s / w if s < w else (n - s) / (n - w)) for s in range(n)]
    )
    assert _lrs("constant_with_warmup", w, n) == pytest.approx([2.0 * min(1.0, s / w) for s in range(n)])
    assert _lrs("constant", w, n) == pytest.approx([2.0] * n)
    # The default is todi's own cosine, unchanged: (s + 1) / (w + 1) warm-up, then decay to min_ratio.
    cosine = [
        2.0 * ((s + 1) / (w + 1) if s < w else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - w) / (n - w))))
        for s in range(n)
    ]
    assert _lrs("cosine", w, n, 0.1) == cosine
    assert [2.0 * cosine_schedule(w, n, 0.1)(s) for s in range(n)] == cosine


def test_optimizers():
    def groups():
        return [{"params": [torch.nn.Parameter(torch.ones(2, 2))], "weight_decay": 0.1}]

    default = build_optimizer(
        "adamw", groups(), 1e-3
    )  # what todi always built: torch.optim.AdamW(groups, lr)
    assert type(default) is torch.optim.AdamW and not default.defaults["fused"]
    assert default.defaults["lr"] == 1e-3 and default.param_groups[0]["weight_decay"] == 0.1
    assert build_optimizer("adamw_torch_fused", groups(), 1e-3).defaults["fused"] is True
    assert type(build_optimizer("sgd", groups(), 1e-3)) is torch.optim.SGD
    if importlib.util.find_spec("bitsandbytes") is None:
        assert "pip install bitsandbytes" in distill_problems("--optim", "adamw_8bit")[0]
    else:
        assert type(build_optimizer("adamw_8bit", groups(), 1e-3)).__name__ == "AdamW8bit"
    assert optimizer_problem("adamw") is None


def distill_problems(*argv: str) -> list[str]:
    try:
        distill(*argv)
    except Exception as err:  # UsageError listing the problems
        return [str(err)]
    return []


def test_option_conflicts_are_reported():
    assert (
        "give one of --warmup-steps and --warmup-ratio"
        in distill_problems("--warmup-steps", "2", "--warmup-ratio", "0.1")[0]
    )
    assert (
        "--min-lr applies to --lr-scheduler cosine"
        in distill_problems("--lr-scheduler", "linear", "--min-lr", "1e-5")[0]
    )
    assert "--hub-model-id applies to --push-to-hub" in distill_problems("--hub-model-id", "me/x")[0]


# ------------------------------------------------------------------------------------ loss parameters, plugins

PLUGIN = '''
import torch
from todi.divergences import register_divergence

calls = []


def _check(params):
    if params["power"] <= 0:
        raise ValueError(f"power={params['power']} must be > 0 (it raises the FKL terms to a power)")


@register_divergence("NAME", params={"power": 1.0}, check=_check)
def powered_fkl(student_logp, teacher_logp, power):
    """FKL to a power: sum_v p (log p - log q), raised to ``power``."""
    calls.append(power)
    fkl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    return fkl.clamp_min(0) ** power
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A module registering a divergence with its own parameter check; unregistered afterwards."""
    name = f"todi_test_plugin_{tmp_path.name[-8:].replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(PLUGIN.replace("NAME", name), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    _REGISTRY.pop(name, None)
    sys.modules.pop(name, None)


def test_loss_params_are_checked_by_the_divergence(plugin, capsys):
    assert distill("--loss-params", "beta=2").loss_options()["beta"] == 2.0
    assert distill("--loss", "akl", "--loss-params", "mu=0.3").loss_options()["mu"] == 0.3
    assert cli.main(["distill", *REQUIRED, "--loss", "akl", "--loss-params", "mu=2"]) == 2
    assert "mu=2.0 must lie in [0, 1]" in capsys.readouterr().err
    # A plugin's divergence is unknown without --plugin, usable with it, and checks its own parameters.
    assert cli.main(["distill", *REQUIRED, "--loss", plugin]) == 2
    assert f"unknown divergence {plugin!r}" in capsys.readouterr().err
    config = distill("--plugin", plugin, "--loss", plugin, "--loss-params", "power=2")
    assert config.loss_options() == {"divergence": plugin, "kd_rate": 0.5, "temperature": 2.0, "power": 2.0}
    assert (
        cli.main(["distill", *REQUIRED, "--plugin", plugin, "--loss", plugin, "--loss-params", "power=-1"])
        == 2
    )
    assert "power=-1.0 must be > 0 (it raises the FKL terms to a power)" in capsys.readouterr().err


def test_entry_point_divergences_load_when_first_asked_for(plugin, monkeypatch):
    import importlib

    from todi import plugins

    entry = types.SimpleNamespace(name="mine", value=plugin, load=lambda: importlib.import_module(plugin))
    monkeypatch.setattr(
        plugins.metadata, "entry_points", lambda group: [entry] if group == "todi.divergences" else []
    )
    monkeypatch.setattr(plugins, "_loaded_entry_points", False)
    assert get_divergence(plugin).params == {"power": 1.0}
    assert distill("--loss", plugin).loss == plugin  # no --plugin needed


# ------------------------------------------------------------------------------------------- training runs

WORDS = ["<pad>", "<s>", "</s>", "<unk>", *sorted(set(TEXT.split()))]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    backend = Tokenizer(models_vocab())
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    return types.SimpleNamespace(
        teacher=save_llama(root / "teacher", tokenizer, hidden=32, seed=1),
        student=save_llama(root / "student", tokenizer, hidden=16, seed=2),
        data=write_data(root / "train.jsonl", 16, seed=0),
    )


def models_vocab():
    return vocab_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>")


def run(models, out: Path, *argv: object) -> int:
    common = ["--teacher", models.teacher, "--student", models.student, "--data", models.data, "--out", out]
    return run_todi("distill", *common, "--template", "none", "--save-every", "0", *TINY, *argv)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_gradient_checkpointing_recomputes_and_trains_the_same(models, tmp_path, monkeypatch):
    assert run(models, tmp_path / "plain", "--max-steps", "2") == 0
    import transformers.modeling_utils as modeling

    calls = []
    original = modeling.checkpoint  # what transformers' checkpointing wraps each layer call in

    def counted(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling, "checkpoint", counted)
    assert run(models, tmp_path / "ckpt", "--max-steps", "2", "--gradient_checkpointing") == 0
    assert calls and set(calls) == {False}  # 2 layers x 2 steps x micro-batches, non-reentrant
    plain, ckpt = final_weights(tmp_path / "plain"), final_weights(tmp_path / "ckpt")
    assert all(torch.allclose(plain[k], ckpt[k], rtol=0, atol=1e-6) for k in plain)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_plugin_divergence_sgd_linear_schedule_and_push_to_hub(models, plugin, tmp_path, monkeypatch):
    """One run with the Trainer's spellings: a plugin's divergence, SGD, a linear schedule with a warm-up
    ratio, and --push-to-hub, whose upload (offline here) must receive the finished final folder."""
    import huggingface_hub

    uploads = []

    def create_repo(self, repo_id, **kwargs):
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        uploads.append((repo_id, folder, sorted(p.name for p in folder.iterdir())))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    out = tmp_path / "run"
    status = run(
        models,
        out,
        "--plugin",
        plugin,
        "--loss",
        plugin,
        "--loss-params",
        "power=2",
        "--optim",
        "sgd",
        "--learning_rate",
        "0.5",
        "--lr_scheduler_type",
        "linear",
        "--warmup_ratio",
        "0.25",
        "--max_steps",
        "4",
        "--logging_steps",
        "1",
        "--push_to_hub",
        "--hub_model_id",
        "me/tiny-todi",
    )
    assert status == 0
    assert sys.modules[plugin].calls and set(sys.modules[plugin].calls) == {2.0}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # warm-up ceil(0.25 x 4) = 1 step: lr after step s is 0.5 x (4 - s) / 3 (the Trainer's linear decay)
    assert [r["lr"] for r in records if "loss" in r] == pytest.approx([0.5, 1 / 3, 1 / 6, 0.0])
    assert uploads == [("me/tiny-todi", out / "final", sorted(p.name for p in (out / "final").iterdir()))]
    assert "model.safetensors" in uploads[0][2] and "config.json" in uploads[0][2]


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_failed_upload_keeps_the_run_and_says_how_to_upload(models, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def refuse(self, repo_id, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    out = tmp_path / "run"
    assert run(models, out, "--max-steps", "1", "--push-to-hub") == 1
    err = capsys.readouterr().err
    assert f"uploading {out / 'final'} to run failed (ConnectionError: offline)" in err
    assert "hf upload run" in err
    assert (out / "final" / "model.safetensors").is_file()


def test_sft_takes_the_same_training_options():
    config = cli.parse_config(
        "sft",
        ["--model", "m", "--data", "d", "--out", "o", "--optim", "sgd", "--lr_scheduler_type", "constant"],
    )[1]
    assert (config.optim, config.lr_scheduler) == ("sgd", "constant")


def test_data_options_reach_the_loader(monkeypatch):
    """--data-config, --data-split, --dev-split and --columns are what load_examples gets for --data / --dev."""
    import todi.data
    from todi.training import _load_data

    asked = []

    def load_examples(source, split, **kwargs):
        asked.append((source, split, kwargs))
        return []

    monkeypatch.setattr(todi.data, "load_examples", load_examples)
    monkeypatch.setattr(todi.data, "encode_examples", lambda examples, tokenizer, **kw: ([], None))
    monkeypatch.setattr(todi.data, "check_template", lambda *args: None)
    config = cli.parse_config(
        "sft",
        [
            "--model",
            "m",
            "--dataset_name",
            "org/set",
            "--dataset_config",
            "en",
            "--dataset_train_split",
            "tr",
            "--dev",
            "org/set",
            "--dev-split",
            "te",
            "--columns",
            "input=context",
            "--out",
            "o",
        ],
    )[1]
    _load_data(config, tokenizer=None)
    options = {"max_examples": None, "columns": "input=context", "hub_config": "en"}
    assert asked == [("org/set", "tr", options), ("org/set", "te", options)]


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_fused_adamw_trains_like_adamw(models, tmp_path):
    """PyTorch's fused AdamW kernel makes the updates of its default AdamW (same math, other kernel)."""
    assert run(models, tmp_path / "adamw", "--max-steps", "2") == 0
    assert run(models, tmp_path / "fused", "--max-steps", "2", "--optim", "adamw_torch_fused") == 0
    plain, fused = final_weights(tmp_path / "adamw"), final_weights(tmp_path / "fused")
    start = load_file(str(models.student / "model.safetensors"))
    assert any(not torch.equal(plain[k], start[k]) for k in plain)  # it trained
    assert all(torch.allclose(plain[k], fused[k], rtol=0, atol=1e-6) for k in plain)
