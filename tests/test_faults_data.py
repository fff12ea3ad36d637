"""Bad inputs that used to give a useless error (or none): each must name the file, line and field or
option and say what to do. Issue "Never lose a user's data"; no test here touches the network."""

from __future__ import annotations

import json
import logging
import signal
import sys
import types
from pathlib import Path

import pytest

from todi import cli
from todi.data import DataError, Example, encode_examples, load_examples

RECORDS = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def fake_hub(monkeypatch, offline):
    """A ``datasets`` module whose Hub loads fail as they do offline; records the names asked for."""
    asked: list[str] = []

    def load_dataset(name, *args, **kwargs):
        asked.append(name)
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (offline mode is enabled)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return asked


# ------------------------------------------------------------------------------------ 1. JSON arrays


@pytest.mark.parametrize("indent", [None, 2])
def test_json_file_holding_an_array_of_records_loads(tmp_path, indent):
    path = write(tmp_path / "data.json", json.dumps(RECORDS, indent=indent))
    examples = load_examples(path)
    assert [(e.instruction, e.output) for e in examples] == [(r["instruction"], r["output"]) for r in RECORDS]
    assert len(load_examples(path, max_examples=2)) == 2


def test_json_file_holding_json_lines_still_loads(tmp_path):
    path = write(tmp_path / "data.json", "".join(json.dumps(r) + "\n" for r in RECORDS))
    assert len(load_examples(path)) == 3


def test_bad_record_in_a_json_array_names_the_file_record_and_line(tmp_path):
    records = [RECORDS[0], {"instruction": "q", "output": ""}, RECORDS[1]]
    path = write(tmp_path / "data.json", json.dumps(records, indent=2))
    with pytest.raises(DataError) as err:
        load_examples(path)
    message = str(err.value)
    assert f"{path}, record 2 (line 7)" in message and "field 'output' is empty" in message
    assert err.value.hint


def test_malformed_json_array_names_line_and_column(tmp_path):
    path = write(tmp_path / "data.json", '[\n  {"instruction": "q", "output": "a"},\n  {"instruction": }\n]')
    with pytest.raises(DataError, match=r"data\.json, line 3: malformed JSON .* column 19") as err:
        load_examples(path)
    assert err.value.hint


def test_json_array_of_non_objects_is_an_error(tmp_path):
    path = write(tmp_path / "data.json", '["a", "b"]')
    with pytest.raises(DataError, match=r"record 1 \(line 1\): expected a JSON object, got a string"):
        load_examples(path)


@pytest.mark.parametrize("indent", [None, 2])
def test_jsonl_file_holding_one_array_says_rename_it(tmp_path, indent):
    path = write(tmp_path / "train.jsonl", "  " + json.dumps(RECORDS, indent=indent))
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert str(err.value) == f"{path} holds one JSON array, not one record per line"
    assert "rename it to .json" in err.value.hint and "one record per line" in err.value.hint


def test_json_array_edge_cases(tmp_path):
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf\n" + json.dumps(RECORDS).encode())
    assert len(load_examples(bom)) == 3
    with pytest.raises(DataError, match="holds no examples"):
        load_examples(write(tmp_path / "empty.json", " [ ]\n"))
    extra = write(tmp_path / "extra.json", json.dumps(RECORDS[:1], indent=1) + "\n[]")  # 7 lines, then []
    with pytest.raises(DataError, match=r"line 8: malformed JSON \(Extra data after the array at column 1\)"):
        load_examples(extra)
    with pytest.raises(DataError, match=r"line 2: malformed JSON \(Expecting ',' delimiter at column 1\)"):
        load_examples(write(tmp_path / "comma.json", json.dumps(RECORDS[0]).join("[\n\n]")))
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'[\n {"instruction": "caf\xe9", "output": "x"}\n]')
    needle = r"line 2: field 'instruction' is not valid UTF-8 \(byte 0xe9 at column 22\)"
    with pytest.raises(DataError, match=needle):
        load_examples(latin)


def test_jsonl_whose_first_line_is_an_array_record_reports_that_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '["a", "b"]\n' + json.dumps(RECORDS[0]) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl, line 1: expected a JSON object, got a list"):
        load_examples(path)


def test_folder_with_json_split_files(tmp_path):
    write(tmp_path / "train.json", json.dumps(RECORDS))
    write(tmp_path / "dev.jsonl", json.dumps(RECORDS[0]) + "\n")
    assert len(load_examples(tmp_path, "train")) == 3
    assert len(load_examples(tmp_path, "dev")) == 1
    with pytest.raises(DataError, match=r"found: dev\.jsonl, train\.json"):
        load_examples(tmp_path, "test")


# ------------------------------------------------------------------------------ 2. lone surrogates


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ('{"instruction": "ab\\ud800", "output": "x"}', "instruction"),
        ('{"instruction": "a", "input": "\\udfff", "output": "x"}', "input"),
        ('{"prompt": "P\\ud83d", "output": "x"}', "prompt"),
        ('{"instruction": "a", "output": "x\\ud800y"}', "output"),
        ('{"instruction": "a", "output": ["ok", "\\ud800"]}', "output[1]"),
    ],
)
def test_lone_surrogate_names_file_line_and_field(tmp_path, record, field):
    path = write(tmp_path / "d.jsonl", json.dumps(RECORDS[0]) + "\n" + record + "\n")
    with pytest.raises(DataError) as err:
        load_examples(path)
    message = str(err.value)
    assert message.startswith(f"{path}, line 2: field {field!r}") and "surrogate" in message
    assert "fix or drop that character" in err.value.hint


def test_surrogate_pair_escape_is_fine(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"instruction": "smile \\ud83d\\ude00", "output": "x"}\n')
    assert load_examples(path)[0].instruction == "smile \U0001f600"


# ------------------------------------------------------------------------- 3. local paths vs the Hub


@pytest.mark.parametrize(
    "given", ["data/dolyl/train.jsonl", "./trian.jsonl", "mydata.jsonl", "data/dolyl/train", "mydata.parquet"]
)
def test_missing_local_path_is_never_looked_up_on_the_hub(tmp_path, monkeypatch, fake_hub, given):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "data" / "dolly" / "train.jsonl", json.dumps(RECORDS[0]) + "\n")
    with pytest.raises(DataError) as err:
        load_examples(given)
    assert fake_hub == []
    absolute = (tmp_path / given).resolve()
    assert str(err.value) == f"no such file or folder: {given} (looked for it at {absolute})"
    assert err.value.hint


def test_missing_path_hint_lists_the_nearest_existing_folder(tmp_path, monkeypatch, fake_hub):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "data" / "dolly" / "train.jsonl", json.dumps(RECORDS[0]) + "\n")
    write(tmp_path / "data" / "vicuna" / "test.jsonl", json.dumps(RECORDS[0]) + "\n")
    with pytest.raises(DataError) as err:
        load_examples("data/dolyl/train.jsonl")
    assert "dolly" in err.value.hint and "vicuna" in err.value.hint and "data" in err.value.hint
    assert "did you mean 'dolly' for 'dolyl'" in err.value.hint


def test_bare_owner_name_goes_to_the_hub_and_says_what_was_tried(tmp_path, monkeypatch, fake_hub):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        load_examples("someone/dolly-typo")
    assert fake_hub == ["someone/dolly-typo"]
    message = str(err.value)
    assert "not a local path" in message and str(tmp_path / "someone" / "dolly-typo") in message
    assert "Hub" in message and "ConnectionError" in message and "\n" not in message
    assert err.value.hint


def test_hub_name_without_the_datasets_package(tmp_path, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match="not a local path") as err:
        load_examples("someone/name")
    assert "datasets" in str(err.value) + err.value.hint


def test_existing_parquet_file_is_refused_with_a_conversion_hint(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1\x00\x01\x02PAR1")
    with pytest.raises(DataError, match=r"train\.parquet: .*\.parquet") as err:
        load_examples(path)
    assert ".jsonl" in err.value.hint


# ------------------------------------------------------------------------ 4. special tokens in data


def test_special_token_text_in_data_warns_once_per_file(tmp_path, gpt2, caplog):
    lines = [
        RECORDS[0],
        {"instruction": "q", "output": "stop here<|endoftext|> then more"},
        RECORDS[1],
        {"instruction": "say <|endoftext|>", "output": "ok"},
    ]
    first = write(tmp_path / "a.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    second = write(tmp_path / "b.jsonl", json.dumps({"instruction": "x", "output": "<|endoftext|>!"}) + "\n")
    clean = write(tmp_path / "c.jsonl", json.dumps(RECORDS[2]) + "\n")
    examples = load_examples(first) + load_examples(second) + load_examples(clean)
    with caplog.at_level(logging.WARNING, logger="todi.data"):
        encoded, _ = encode_examples(examples, gpt2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert f"{first}, line 2" in warnings[0] and "'<|endoftext|>'" in warnings[0]
    assert "2 of 4 examples" in warnings[0]
    assert f"{second}, line 1" in warnings[1] and "1 of 1 example" in warnings[1]
    # Behaviour kept (as HF tokenizers and TRL): the text becomes the real EOS inside the response.
    eos = gpt2.eos_token_id
    assert encoded[1]["labels"][:-1].count(eos) == 1 and encoded[1]["labels"][-1] == eos


def test_no_special_token_no_warning(gpt2, caplog):
    examples = [Example("hello <|endoftext", references=("a <| endoftext |> b",), source="x.jsonl:1")]
    with caplog.at_level(logging.WARNING, logger="todi.data"):
        encode_examples(examples, gpt2)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


# ---------------------------------------------------------------------------------- 5. YAML config


def test_duplicate_yaml_option_names_file_line_and_option(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr("todi.demo.run", ran.append)  # never the real demo, even if the check is missing
    config = write(tmp_path / "demo.yaml", "out: a\nseed: 1\nout: b\n")
    assert cli.main(["demo", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"config file {config} line 3: option out is given twice" in err
    assert "hint:" in err
    assert ran == []


def test_dash_and_underscore_spellings_of_one_option_are_duplicates(tmp_path):
    config = write(tmp_path / "demo.yaml", "max_examples: 3\nmax-examples: 4\n")
    with pytest.raises(cli.UsageError, match="line 2: option max-examples is given twice"):
        cli._load_yaml(str(config))


def test_yaml_without_duplicates_and_nested_mappings_load(tmp_path):
    config = write(tmp_path / "x.yaml", "a: 1\nb:\n  a: 2\n  c: 3\nc-d: 4\n")
    assert cli._load_yaml(str(config)) == {"a": 1, "b": {"a": 2, "c": 3}, "c_d": 4}


# ------------------------------------------------------------------------------------- 6. signals


class Terminated(KeyboardInterrupt):
    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (Terminated(signal.SIGTERM), 128 + signal.SIGTERM),
        (Terminated(signal.SIGHUP), 128 + signal.SIGHUP),
        (KeyboardInterrupt(), 130),
    ],
)
def test_interrupt_exit_status_follows_the_signal(monkeypatch, capsys, error, status):
    def run(config):
        raise error

    monkeypatch.setattr(cli, "parse_config", lambda name, argv: (run, None))
    assert cli.main(["demo"]) == status
    assert "interrupted" in capsys.readouterr().err
