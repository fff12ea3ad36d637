"""Data formats besides JSON lines (todi.formats): parquet / CSV / TSV / Arrow / JSON files, Dolly's and other
column names (--columns), TRL's prompt-completion and messages records, Hub ids with a configuration.

Every format must give the example the equivalent JSON-lines record gives, and the expected token ids and
label masks are written out by hand from a tiny word-level vocabulary (never captured from the code).
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tiny import TINY, gpt2_tokenizer, run_todi, save_llama
from todi.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    encode_example,
    encode_examples,
    encode_prompt,
    load_examples,
    render_prompt,
)
from todi.errors import UsageError
from todi.formats import Turn, parse_columns

datasets = pytest.importorskip("datasets")
pd = pytest.importorskip("pandas")

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "[", "]", "system", "user", "assistant", "Q", ":", "A"]
WORDS += ["hello", "world", "good", "bye", "one", "two", "three", "be", "nice", "42"]
# A template whose assistant turn ends with EOS; a chat's first turns render as a prefix of the whole chat.
CHAT = (
    "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<s>[assistant]{% endif %}"
)
CUSTOM = "Q: {instruction} : {input} A:"
X = IGNORE_INDEX


@pytest.fixture(scope="module")
def tok():
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT
    return tokenizer


def ids(tok, text: str) -> list[int]:
    """Token ids of space-separated tokens, looked up one by one in the vocabulary."""
    return tok.convert_tokens_to_ids(text.split())


def same(examples: list[Example], reference: list[Example]) -> None:
    strip = [Example(e.instruction, e.input, e.references, e.prompt, "", e.turns) for e in examples]
    assert strip == [Example(e.instruction, e.input, e.references, e.prompt, "", e.turns) for e in reference]


RECORDS = [
    {"instruction": "hello world", "input": "one two", "output": "good bye"},
    {"instruction": "hello", "input": "", "output": "42"},  # a numeric answer must stay text in CSV
    {"instruction": "two three", "input": "be nice", "output": "bye"},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_table(path: Path, records: list[dict]) -> Path:
    """``records`` as a parquet / csv / tsv / arrow / json file, written by pandas or datasets."""
    frame = pd.DataFrame(records)
    suffix = path.suffix
    if suffix == ".parquet":
        frame.to_parquet(path)
    elif suffix in (".csv", ".tsv"):
        frame.to_csv(path, index=False, sep="\t" if suffix == ".tsv" else ",")
    elif suffix == ".json":
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    elif suffix == ".arrow":
        saved = path.parent / f"{path.stem}_saved"
        datasets.Dataset.from_list(records).save_to_disk(saved)
        shutil.copy(next(saved.glob("*.arrow")), path)
    return path


# -------------------------------------------------------------------------------------------- file formats


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".tsv", ".arrow", ".json"])
def test_every_file_format_gives_the_jsonl_examples_and_ids(tmp_path, tok, suffix):
    reference = load_examples(write_jsonl(tmp_path / "ref.jsonl", RECORDS))
    path = write_table(tmp_path / f"train{suffix}", RECORDS)
    examples = load_examples(path)
    same(examples, reference)
    if suffix != ".json":  # a table's rows count from 1 (a JSON array's records are named by their line)
        assert [e.source for e in examples] == [f"{path}:{i}" for i in (1, 2, 3)]
    encoded, _ = encode_examples(examples, tok, template=CUSTOM, max_length=64)
    # Q : hello world : one two A : | good bye </s>
    prompt = ids(tok, "Q : hello world : one two A :")
    assert encoded[0] == {
        "input_ids": prompt + ids(tok, "good bye </s>"),
        "labels": [X] * len(prompt) + ids(tok, "good bye </s>"),
    }
    assert encoded[1]["input_ids"][-2:] == ids(tok, "42 </s>")  # "42" read as text, not the number 42
    assert encoded == encode_examples(reference, tok, template=CUSTOM, max_length=64)[0]
    assert load_examples(path, max_examples=2) == examples[:2]


def test_a_folder_finds_split_files_of_any_format(tmp_path):
    write_table(tmp_path / "train.parquet", RECORDS)
    write_table(tmp_path / "validation.csv", RECORDS[:2])
    assert len(load_examples(tmp_path, "train")) == 3
    assert load_examples(tmp_path, "dev")[0].source == f"{tmp_path / 'validation.csv'}:1"


def test_dolly_names_and_columns_read_like_instruction_input_output(tmp_path):
    reference = load_examples(write_jsonl(tmp_path / "ref.jsonl", RECORDS))
    dolly = [
        {"instruction": r["instruction"], "context": r["input"], "response": r["output"], "category": "qa"}
        for r in RECORDS
    ]
    same(load_examples(write_table(tmp_path / "dolly.parquet", dolly)), reference)
    same(load_examples(write_jsonl(tmp_path / "dolly.jsonl", dolly)), reference)
    own = [{"q": r["instruction"], "ctx": r["input"], "a": r["output"]} for r in RECORDS]
    path = write_table(tmp_path / "own.csv", own)
    same(load_examples(path, columns="instruction=q,input=ctx,output=a"), reference)
    same(load_examples(path, columns={"instruction": "q", "input": "ctx", "output": "a"}), reference)
    with pytest.raises(
        DataError, match=r"own\.csv, row 1: missing field 'answer' \(found fields: q, ctx, a\)"
    ):
        load_examples(path, columns="instruction=q,input=ctx,output=answer")


def test_parse_columns_refuses_bad_specs():
    assert parse_columns("input=context, output=response") == {"input": "context", "output": "response"}
    for bad, needle in [
        ("input", "not FIELD=COLUMN"),
        ("answer=a", "unknown field 'answer'"),
        ("output=a,output=b", "given twice"),
        ("=a", "not FIELD=COLUMN"),
    ]:
        with pytest.raises(UsageError, match=needle):
            parse_columns(bad)


# ------------------------------------------------------------------------------------- bad rows and files


@pytest.mark.parametrize(
    ("suffix", "rows", "needle"),
    [
        (".csv", [RECORDS[0], {**RECORDS[0], "output": ""}], r"bad\.csv, row 2: field 'output' is empty"),
        (
            ".parquet",
            [RECORDS[0], {**RECORDS[0], "output": None}],
            r"bad\.parquet, row 2: field 'output' is null",
        ),
        (
            ".parquet",
            [
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
            ],
            r"bad\.parquet, row 2: field 'messages\[1\]\.content' is empty",
        ),
        (
            ".json",
            [{"messages": [{"role": "user", "content": "hi"}]}],
            r"bad\.json, record 1 \(line 2\): field 'messages' has no 'assistant' message",
        ),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, suffix, rows, needle):
    with pytest.raises(DataError, match=needle) as err:
        load_examples(write_table(tmp_path / f"bad{suffix}", rows))
    assert err.value.hint


@pytest.mark.parametrize(
    ("message", "needle"),
    [
        ({"role": "user", "content": 3}, r"field 'messages\[0\]\.content' is a number"),
        ({"content": "hi"}, r"field 'messages\[0\]\.role' is missing"),
        ("hi", r"field 'messages\[0\]' is a string, expected an object"),
    ],
)
def test_bad_messages_name_line_and_field(tmp_path, message, needle):
    record = {"messages": [message, {"role": "assistant", "content": "yo"}]}
    path = write_jsonl(
        tmp_path / "chat.jsonl", [{"messages": [{"role": "assistant", "content": "a"}]}, record]
    )
    with pytest.raises(DataError, match=r"chat\.jsonl, line 2: " + needle):
        load_examples(path)


def test_unreadable_table_files_say_so_not_utf8_or_json(tmp_path):
    parquet = tmp_path / "train.parquet"
    parquet.write_bytes(b"PAR1\x00\x01\x02PAR1")
    with pytest.raises(DataError, match=r"train\.parquet: cannot read it as a \.parquet file") as err:
        load_examples(parquet)
    assert "UTF-8" not in str(err.value) and "JSON" not in str(err.value)
    csv = tmp_path / "train.csv"
    csv.write_text('instruction,output\n"a",b\nc,"d\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.csv: cannot read it as a \.csv file \(ParserError: .*row 2"):
        load_examples(csv)


# ------------------------------------------------------------------------- prompt-completion and messages


def test_prompt_completion_strings_are_a_verbatim_prompt(tmp_path, tok):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q : hello A :", "completion": "good bye"}])
    (example,) = load_examples(path)
    assert example == Example("", "", ("good bye",), prompt="Q : hello A :", source=f"{path}:1")
    features, status = encode_example(example, tok, template="alpaca")  # the template does not apply
    prompt = ids(tok, "Q : hello A :")
    assert status == "ok"
    assert features == {
        "input_ids": prompt + ids(tok, "good bye </s>"),
        "labels": [X] * 5 + ids(tok, "good bye </s>"),
    }
    with pytest.raises(DataError, match=r"line 1: field 'prompt' is a string but 'completion' is a list"):
        load_examples(write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a", "completion": [{"role": "x"}]}]))


MULTI_TURN = [
    {"role": "system", "content": "be nice"},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "good"},
    {"role": "user", "content": "two three"},
    {"role": "assistant", "content": "bye bye"},
]


def test_multi_turn_messages_train_on_every_assistant_turn_only(tmp_path, tok):
    path = write_table(tmp_path / "chat.parquet", [{"messages": MULTI_TURN}])
    (example,) = load_examples(path)
    assert example.references == ("bye bye",)
    assert [t.train for t in example.turns] == [False, False, True, False, True]
    features, status = encode_example(example, tok, template="alpaca", max_length=64)
    # <s> [ system ] be nice <s> [ user ] hello <s> [ assistant ] | good </s> | <s> [ user ] two three
    # <s> [ assistant ] | bye bye </s>   (no BOS or EOS added: the chat template writes them)
    context1 = ids(tok, "<s> [ system ] be nice <s> [ user ] hello <s> [ assistant ]")
    turn1 = ids(tok, "good </s>")
    context2 = ids(tok, "<s> [ user ] two three <s> [ assistant ]")
    turn2 = ids(tok, "bye bye </s>")
    assert status == "ok"
    assert features["input_ids"] == context1 + turn1 + context2 + turn2
    assert features["labels"] == [X] * len(context1) + turn1 + [X] * len(context2) + turn2
    # The same conversation from JSON lines and as TRL's conversational prompt-completion (history in the
    # prompt): the prompt's assistant turn is context there, so only the last turn is trained on.
    (jsonl,) = load_examples(write_jsonl(tmp_path / "chat.jsonl", [{"messages": MULTI_TURN}]))
    assert encode_example(jsonl, tok, max_length=64) == (features, "ok")
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": MULTI_TURN[:4], "completion": MULTI_TURN[4:]}])
    (history,) = load_examples(pc)
    features, _ = encode_example(history, tok, max_length=64)
    assert features["input_ids"] == context1 + turn1 + context2 + turn2
    assert features["labels"] == [X] * (len(context1) + len(turn1) + len(context2)) + turn2


def test_single_turn_messages_equal_an_instruction_record_under_the_chat_template(tmp_path, tok):
    messages = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "good bye"}]
    (chat,) = load_examples(write_jsonl(tmp_path / "m.jsonl", [{"messages": messages}]))
    plain = Example("hello world", "", ("good bye",))
    assert encode_example(chat, tok) == encode_example(plain, tok, template="chat")
    # Evaluation prompts: the chat up to the last assistant turn, with the generation prompt.
    assert render_prompt(chat, "alpaca", tok) == "<s>[user] hello world<s>[assistant]"
    assert encode_prompt(chat, tok) == ids(tok, "<s> [ user ] hello world <s> [ assistant ]")


def test_conversation_truncation_keeps_the_end_of_the_context_and_cuts_the_rest(tok):
    example = Example(
        "",
        references=("bye bye",),
        turns=tuple(Turn(m["role"], m["content"], m["role"] == "assistant") for m in MULTI_TURN),
    )
    # Context before the first trained turn (13 tokens) left-truncated to its last 5; the rest cut at 10.
    features, status = encode_example(example, tok, max_prompt_length=5, max_length=10)
    assert status == "response_truncated"
    assert features["input_ids"] == ids(tok, "hello <s> [ assistant ] good </s> <s> [ user")
    assert features["labels"] == [X] * 5 + ids(tok, "good </s>") + [X] * 3
    assert encode_example(example, tok, max_prompt_length=5, max_length=5) == (None, "dropped")


def test_a_template_refusing_a_conversation_names_the_record(tmp_path, tok):
    strict = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="</s>")
    strict.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + CHAT
    )
    (chat,) = load_examples(write_jsonl(tmp_path / "m.jsonl", [{"messages": MULTI_TURN}]))
    with pytest.raises(
        DataError,
        match=r"m\.jsonl:1: the tokenizer's chat template cannot render .*System role not supported",
    ):
        encode_examples([chat], strict)


def test_messages_need_a_chat_template(tmp_path, tok):
    plain = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="</s>")
    (chat,) = load_examples(write_jsonl(tmp_path / "m.jsonl", [{"messages": MULTI_TURN}]))
    with pytest.raises(
        DataError, match=r"m\.jsonl:1: a chat conversation needs the tokenizer's chat template"
    ):
        encode_examples([chat], plain)


# ----------------------------------------------------------------------------------------------- the Hub


def test_hub_ids_pass_their_configuration_and_split_to_load_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    asked = []
    rows = [{"instruction": "hello", "context": "", "response": "bye", "category": "qa"}]

    loaded = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows * 2)}
    )

    def load_dataset(*args, **kwargs):
        asked.append((args, kwargs))
        return loaded

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    examples = load_examples("databricks/databricks-dolly-15k", "test", hub_config="en")
    assert asked == [(("databricks/databricks-dolly-15k", "en"), {})]
    assert [e.source for e in examples] == [f"databricks/databricks-dolly-15k[test]:{i}" for i in (1, 2)]
    assert examples[0].references == ("bye",)
    load_examples("someone/data")
    assert asked[-1] == (("someone/data",), {})


# ------------------------------------------------------------------------------------- training end to end


def test_sft_reads_parquet_and_columns_like_jsonl(tmp_path, tok, fresh_accelerate_state):
    """`todi sft` on Dolly-named parquet data with --columns trains exactly as on the JSON lines file."""
    model = save_llama(tmp_path / "model", tok, hidden=32, seed=0)
    records = [RECORDS[i % 3] for i in range(16)]
    write_jsonl(tmp_path / "train.jsonl", records)
    own = [{"q": r["instruction"], "ctx": r["input"], "a": r["output"]} for r in records]
    write_table(tmp_path / "train.parquet", own)
    common = ["sft", "--model", model, "--max-steps", "2", "--template", CUSTOM, "--save-every", "0", *TINY]
    assert run_todi(*common, "--data", tmp_path / "train.jsonl", "--out", tmp_path / "a") == 0
    assert (
        run_todi(
            *common,
            "--data",
            tmp_path / "train.parquet",
            "--columns",
            "instruction=q,input=ctx,output=a",
            "--out",
            tmp_path / "b",
        )
        == 0
    )
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    segment = json.loads((tmp_path / "b" / "segments.jsonl").read_text().splitlines()[-1])
    first = json.loads((tmp_path / "a" / "segments.jsonl").read_text().splitlines()[-1])
    assert segment["identity"]["data"] == first["identity"]["data"]  # the encoded data is the same


def test_eval_reads_table_files_with_columns(tmp_path):
    from todi.evaluation import _load_datasets, resolve_datasets

    dolly = [{"q": r["instruction"], "ctx": r["input"], "a": [r["output"], "bye"]} for r in RECORDS]
    (tmp_path / "mine").mkdir()
    path = write_table(tmp_path / "mine" / "test.parquet", dolly)
    sources = resolve_datasets(str(path))
    assert sources == {"mine": path}
    loaded = _load_datasets(sources, None, "instruction=q,input=ctx,output=a")
    assert [e.references for e in loaded["mine"]] == [(r["output"], "bye") for r in RECORDS]


def test_sft_on_multi_turn_messages_with_dev_rouge(tmp_path, tok, fresh_accelerate_state):
    """Conversations train (assistant turns only) and score on --dev: the chat prompt up to the last turn."""
    model = save_llama(tmp_path / "model", tok, hidden=32, seed=0)
    chats = [{"messages": MULTI_TURN}, {"messages": MULTI_TURN[1:3]}] * 8
    write_table(tmp_path / "chat.parquet", chats)
    out = tmp_path / "run"
    argv = ["sft", "--model", model, "--data", tmp_path / "chat.parquet", "--dev", tmp_path / "chat.parquet"]
    argv += [
        "--dev-split",
        "train",
        "--dev-max-examples",
        "2",
        "--eval-max-new-tokens",
        "3",
        "--max-steps",
        "2",
    ]
    assert run_todi(*argv, "--save-every", "0", "--out", out, *TINY) == 0
    dev = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "dev_loss" in line
    ]
    assert dev and 0 <= dev[-1]["dev_rougeL"] <= 100 and dev[-1]["dev_ce"] > 0


CHATML = (  # ChatML with the generation marks transformers reads for its assistant-token mask
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_assistant_masks_match_transformers_on_chatml(gpt2):
    """Peer reference: transformers' own assistant-token mask (what TRL's assistant_only_loss trains on),
    from a BPE tokenizer and a ChatML template, equals todi's labels for a multi-turn chat."""
    tok = gpt2_tokenizer()  # a fresh one: the fixture's is shared (it only skips when the files are absent)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris, of course."},
        {"role": "user", "content": "And Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    ref = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    example = Example(
        "",
        references=("Rome.",),
        turns=tuple(Turn(m["role"], m["content"], m["role"] == "assistant") for m in messages),
    )
    features, status = encode_example(example, tok, max_length=512)
    assert status == "ok" and features["input_ids"] == ref["input_ids"]
    assert features["labels"] == [i if m else X for i, m in zip(ref["input_ids"], ref["assistant_masks"])]


def test_real_dolly_as_parquet_and_csv_encodes_like_jsonl(tmp_path, gpt2):
    """The shared Dolly dev file converted by pandas to parquet and CSV gives the same GPT-2 token ids."""
    from tiny import DATA

    source = DATA / "dolly" / "dev.jsonl"
    if not source.is_file():
        pytest.skip(f"shared Dolly data not found at {source} (set TODI_DATA)")
    frame = pd.read_json(source, lines=True, dtype=False)
    frame.to_parquet(tmp_path / "dev.parquet")
    frame.rename(columns={"input": "context", "output": "response"}).to_csv(tmp_path / "dev.csv", index=False)
    reference, _ = encode_examples(load_examples(source), gpt2)
    assert encode_examples(load_examples(tmp_path / "dev.parquet"), gpt2)[0] == reference
    assert encode_examples(load_examples(tmp_path / "dev.csv"), gpt2)[0] == reference  # Dolly's own names
