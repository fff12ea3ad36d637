"""`todi init-student`: layer choice, exact weight copies, the reference forward pass, the CLI."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from todi.cli import main
from todi.errors import TodiError, UsageError
from todi.student_init import (
    INIT_RECORD,
    Config,
    evenly_spaced_layers,
    find_layer_list,
    parse_layers,
    run,
)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

WORDS = ["<pad>", "<s>", "</s>", "<unk>", *(f"w{i}" for i in range(60))]
LAYERS = [0, 3]


def _tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


CONFIGS = {
    # Untied head, grouped-query attention.
    "llama": lambda: LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ),
    # Tied head, learned positions, layers in transformer.h, layer count in n_layer.
    "gpt2": lambda: GPT2Config(vocab_size=len(WORDS), n_positions=64, n_embd=32, n_layer=4, n_head=4),
    # Per-layer layer_types (full attention below max_window_layers, sliding above): must be cut too.
    # Untied like llama; GPT-2 covers the tied head.
    "qwen2": lambda: Qwen2Config(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
    ),
}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    """One tiny saved teacher (model + tokenizer) per architecture."""
    root = tmp_path_factory.mktemp("teachers")
    folders = {}
    for seed, (name, make_config) in enumerate(CONFIGS.items()):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(make_config())
        # Non-trivial norms, so that copying the wrong norm would show.
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 1:
                    param.add_(torch.randn_like(param) * 0.1)
        folders[name] = root / name
        model.save_pretrained(folders[name])
        _tokenizer().save_pretrained(folders[name])
    return folders


def _load(path: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _inputs() -> torch.Tensor:
    return torch.tensor([[1, 5, 9, 17, 33, 40, 41, 7, 12, 60]])


# --------------------------------------------------------------------------------------------------
# Choosing layers
# --------------------------------------------------------------------------------------------------


def test_evenly_spaced_layers_include_first_and_last_and_never_repeat():
    assert evenly_spaced_layers(6, 30) == [0, 6, 12, 17, 23, 29]
    assert evenly_spaced_layers(2, 4) == [0, 3]
    assert evenly_spaced_layers(1, 4) == [0]
    for num_layers in range(1, 41):
        for count in range(2, num_layers + 1):
            layers = evenly_spaced_layers(count, num_layers)
            assert layers[0] == 0 and layers[-1] == num_layers - 1 and len(layers) == count
            assert all(a < b for a, b in itertools.pairwise(layers))
        assert evenly_spaced_layers(num_layers, num_layers) == list(range(num_layers))


def test_parse_layers_accepts_lists_and_counts():
    assert parse_layers("0,3", 4) == [0, 3]
    assert parse_layers(" 0 , 2, 3, ", 4) == [0, 2, 3]
    assert parse_layers("1,", 4) == [1]
    assert parse_layers("2", 4) == [0, 3]
    assert parse_layers("6", 30) == [0, 6, 12, 17, 23, 29]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0,4", r"--layers: layer 4 is out of range"),
        ("-1,2", r"--layers: layer -1 is out of range"),
        ("0,3,2", r"--layers must be strictly increasing: 2 follows 3"),
        ("1,1", r"--layers must be strictly increasing: 1 follows 1"),
        ("0,x", r"--layers: 'x' is not a layer index"),
        ("0,,3", r"--layers .* has an empty item"),
        ("0", r"--layers 0 asks for 0 evenly spaced layers"),
        ("5", r"--layers 5 asks for 5 evenly spaced layers.*1\.\.4"),
        ("six", r"--layers 'six' is neither a count nor"),
        (" ", r"--layers is required"),
    ],
)
def test_parse_layers_names_the_problem(spec, message):
    with pytest.raises(UsageError, match=message) as caught:
        parse_layers(spec, 4)
    assert caught.value.hint


def test_find_layer_list_refuses_a_model_without_one():
    with pytest.raises(TodiError, match="no list of 4 layers"):
        find_layer_list(nn.Sequential(nn.Linear(2, 2)), 4)


# --------------------------------------------------------------------------------------------------
# The student
# --------------------------------------------------------------------------------------------------


def _reference(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """The teacher with its layer list replaced by the chosen layers (its own modules, not copies)."""
    reference = copy.deepcopy(teacher)
    name, block_list = find_layer_list(reference, teacher.config.num_hidden_layers)
    parent_name, _, attr = name.rpartition(".")
    parent = reference.get_submodule(parent_name) if parent_name else reference
    setattr(parent, attr, nn.ModuleList([block_list[i] for i in layers]))
    # Qwen2 picks each layer's mask by its position in config.layer_types, not from the layer itself.
    if getattr(reference.config, "layer_types", None):
        reference.config.layer_types = [reference.config.layer_types[i] for i in layers]
    return reference


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_student_copies_the_chosen_layers_exactly(arch, teachers, tmp_path):
    out = tmp_path / "student"
    run(Config(teacher=str(teachers[arch]), layers="0,3", out=str(out)))
    teacher, student = _load(teachers[arch]), _load(out)

    assert student.config.num_hidden_layers == 2
    assert type(student) is type(teacher)
    prefix, teacher_layers = find_layer_list(teacher, 4)
    _, student_layers = find_layer_list(student, 2)
    for i, t in enumerate(LAYERS):
        teacher_state, student_state = teacher_layers[t].state_dict(), student_layers[i].state_dict()
        assert teacher_state.keys() == student_state.keys()
        for key, value in student_state.items():
            assert torch.equal(value, teacher_state[key]), f"layer {i} {key}"
    teacher_state = teacher.state_dict()
    outside = [key for key in student.state_dict() if not key.startswith(prefix + ".")]
    assert any("emb" in key or "wte" in key for key in outside)
    for key in outside:
        assert torch.equal(student.state_dict()[key], teacher_state[key]), key
    assert torch.equal(student.get_output_embeddings().weight, teacher.get_output_embeddings().weight)
    tied = student.get_output_embeddings().weight is student.get_input_embeddings().weight
    assert tied == teacher.config.tie_word_embeddings
    assert tied or arch != "gpt2"

    with torch.no_grad():
        expected = _reference(teacher, LAYERS)(_inputs(), use_cache=False).logits
        got = student(_inputs(), use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)

    record = json.loads((out / INIT_RECORD).read_text())
    assert record["teacher"] == str(teachers[arch]) and record["layers"] == LAYERS
    assert record["teacher_layers"] == 4 and record["random"] is False
    assert record["student_parameters"] < record["teacher_parameters"]
    assert (out / "tokenizer.json").is_file()


def test_per_layer_config_lists_follow_the_chosen_layers(teachers, tmp_path):
    teacher = _load(teachers["qwen2"])
    assert teacher.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    run(Config(teacher=str(teachers["qwen2"]), layers="1,2", out=str(tmp_path / "s")))
    assert _load(tmp_path / "s").config.layer_types == ["full_attention", "sliding_attention"]


def test_count_form_and_dtype(teachers, tmp_path):
    out = tmp_path / "student"
    run(Config(teacher=str(teachers["llama"]), layers="2", out=str(out), dtype="bfloat16"))
    assert json.loads((out / INIT_RECORD).read_text())["layers"] == [0, 3]
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.dtype == torch.bfloat16


def test_random_student_has_the_small_architecture_but_no_teacher_weights(teachers, tmp_path):
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        run(Config(teacher=str(teachers["llama"]), layers="0,3", out=str(folder), random=True, seed=3))
    teacher, student, again = _load(teachers["llama"]), _load(folders[0]), _load(folders[1])
    assert student.config.num_hidden_layers == 2
    teacher_state = teacher.state_dict()
    for key, value in student.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), f"--seed does not fix {key}"
        if value.dim() == 2:  # norms start at ones in both models
            assert not torch.equal(value, teacher_state[key.replace("layers.1.", "layers.3.")]), key
    assert json.loads((folders[0] / INIT_RECORD).read_text())["random"] is True


def test_random_student_never_reads_the_teacher_weights(teachers, tmp_path):
    # The same seed gives the same random student whether or not the teacher's weights exist.
    import shutil

    weightless = tmp_path / "teacher"
    shutil.copytree(teachers["llama"], weightless)
    for weights in weightless.glob("*.safetensors"):
        weights.unlink()
    with_weights, without = tmp_path / "a", tmp_path / "b"
    run(Config(teacher=str(teachers["llama"]), layers="0,3", out=str(with_weights), random=True, seed=5))
    run(Config(teacher=str(weightless), layers="0,3", out=str(without), random=True, seed=5))
    a, b = _load(with_weights), _load(without)
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert a.generation_config.to_dict() == b.generation_config.to_dict()
    record = json.loads((without / INIT_RECORD).read_text())
    assert record["student_parameters"] == sum(p.numel() for p in b.parameters())
    assert record["teacher_parameters"] == sum(p.numel() for p in _load(teachers["llama"]).parameters())
    # layer copying does need them, and says which model could not be loaded
    with pytest.raises(TodiError, match="cannot load model"):
        run(Config(teacher=str(weightless), layers="0,3", out=str(tmp_path / "c")))


def test_existing_output_is_kept_unless_overwrite(teachers, tmp_path):
    # A folder init-student did not write is never written into, even with --overwrite.
    out = tmp_path / "student"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    options = {"teacher": str(teachers["gpt2"]), "layers": "0,3", "out": str(out)}
    for overwrite in (False, True):
        with pytest.raises(UsageError, match="not empty and was not written by todi"):
            run(Config(**options, overwrite=overwrite))
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    # A student it wrote is refused without --overwrite and replaced with it.
    out = tmp_path / "ours"
    run(Config(**options | {"out": str(out)}))
    with pytest.raises(UsageError, match="already holds a student") as caught:
        run(Config(**options | {"out": str(out), "layers": "1,2"}))
    assert "--overwrite" in caught.value.hint
    assert json.loads((out / INIT_RECORD).read_text())["layers"] == [0, 3]
    run(Config(**options | {"out": str(out), "layers": "1,2"}, overwrite=True))
    assert json.loads((out / INIT_RECORD).read_text())["layers"] == [1, 2]


def test_refuses_to_write_over_the_teacher(teachers):
    with pytest.raises(UsageError, match="teacher's own folder"):
        run(Config(teacher=str(teachers["gpt2"]), layers="0,3", out=str(teachers["gpt2"]), overwrite=True))


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------


def test_cli_end_to_end(teachers, tmp_path, capsys):
    out = tmp_path / "student"
    argv = ["init-student", "--from", str(teachers["llama"]), "--layers", "0,3", "--out", str(out)]
    assert main(argv) == 0
    assert json.loads((out / INIT_RECORD).read_text())["layers"] == LAYERS

    bad = ["init-student", "--from", str(teachers["llama"]), "--layers", "0,7", "--out", str(tmp_path / "x")]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "--layers: layer 7 is out of range" in err and "hint: the teacher has 4 layers" in err
    assert not (tmp_path / "x").exists()


def test_cli_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["init-student", "--help"])
    text = capsys.readouterr().out
    for option in ("--from", "--layers", "--out", "--dtype", "--random", "--overwrite", "evenly spaced"):
        assert option in text
