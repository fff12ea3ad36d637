"""todi.data: loading/validation, templates, tokenisation with label masks, collation, batching.

Expected ids below are worked out by hand from the tiny word-level vocabulary, not captured from runs.
Tests on the real Dolly files and the GPT-2 tokenizer skip when the shared folder is absent.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from tiny import DATA
from todi.data import (
    TEMPLATES,
    DataCollator,
    DataError,
    EncodeStats,
    Example,
    check_template,
    check_tokenizers,
    encode_example,
    encode_examples,
    encode_prompt,
    ensure_pad_token,
    length_grouped_batches,
    load_examples,
    render_prompt,
    resolve_data_root,
    shared_vocab_size,
)
from todi.errors import TodiError

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "Q", ":", "A", "hello", "world", "good", "bye"]
WORDS += ["one", "two", "three", "four", "five", "[", "user", "]", "assistant"]
# ids: <pad> 0, <s> 1, </s> 2, <unk> 3, Q 4, : 5, A 6, hello 7, world 8, good 9, bye 10,
#      one 11, two 12, three 13, four 14, five 15, [ 16, user 17, ] 18, assistant 19
CUSTOM = "Q: {instruction} A:"
CHAT = (
    "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %} [assistant]{% endif %}"
)


def make_tokenizer(*, adds_bos: bool = False, words: list[str] = WORDS, eos: str | None = "</s>", **kw):
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    specials = {"bos_token": "<s>", "eos_token": eos, "pad_token": "<pad>", "unk_token": "<unk>"} | kw
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{k: v for k, v in specials.items() if v})


@pytest.fixture
def tok():
    return make_tokenizer()


@pytest.fixture
def bos_tok():
    return make_tokenizer(adds_bos=True)


def hello(references=("good bye",), **kw) -> Example:
    return Example(instruction="hello world", references=tuple(references), **kw)


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


GOOD = json.dumps({"instruction": "hello", "input": "", "output": "bye"})


# ---------------------------------------------------------------------------------------------- templates


def test_alpaca_strings_match_minillm():
    with_input = Example("Sum it.", "1 and 2", ("3",))
    assert render_prompt(with_input) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSum it.\n\n### Input:\n1 and 2\n\n### Response:\n"
    )
    assert render_prompt(Example("Say hi.", "", ("hi",))) == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSay hi.\n\n### Response:\n"
    )


def test_none_and_custom_templates_and_verbatim_prompt():
    ex = Example("do it", "with this", ("done",))
    assert "alpaca" in TEMPLATES and "chat" in TEMPLATES
    assert render_prompt(ex, "none") == "do it\n\nwith this"
    assert (
        render_prompt(ex, "I: {instruction} | C: {input} | {{literal}}")
        == "I: do it | C: with this | {literal}"
    )
    verbatim = Example("ignored", references=("x",), prompt="<PROMPT> ")
    for template in ("alpaca", "none", CUSTOM):
        assert render_prompt(verbatim, template) == "<PROMPT> "


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ("{instruction} {context}", "{context}"),
        ("{instruction} {}", "{}"),
        ("{instruction!r}", "unknown template"),
        ("{instruction} {input:>10}", "{input} has a format spec"),
        ("{instruction} {input!r}", "{input} has a format spec or conversion"),
        ("{instruction} {", "not a valid format string"),
        ("alpacca", "unknown template 'alpacca'"),
    ],
)
def test_bad_templates_fail_before_any_work(template, needle, tok):
    with pytest.raises(DataError, match="template") as err:
        check_template(template)
    assert needle in str(err.value)
    assert err.value.hint
    with pytest.raises(DataError):  # encode_examples validates up front, even with nothing to encode
        encode_examples([], tok, template=template)


def test_chat_template_renders_and_adds_no_second_bos(bos_tok):
    bos_tok.chat_template = CHAT
    ex = Example("hello", "world", ("good",))
    assert render_prompt(ex, "chat", bos_tok) == "<s>[user] hello\n\nworld [assistant]"
    features, status = encode_example(ex, bos_tok, template="chat")
    # <s> [ user ] hello world [ assistant ] | good </s>
    assert features == {
        "input_ids": [1, 16, 17, 18, 7, 8, 16, 19, 18, 9, 2],
        "labels": [-100] * 9 + [9, 2],
    }
    assert status == "ok"


def test_custom_template_without_input_warns_once(caplog):
    template = "Do: {instruction}"
    with caplog.at_level(logging.WARNING, logger="todi.data"):
        for source in ("a.jsonl:1", "a.jsonl:2"):
            assert render_prompt(Example("x", "context", ("y",), source=source), template) == "Do: x"
    assert [r.getMessage() for r in caplog.records] == [
        "the custom template has no {input}: the input of examples such as a.jsonl:1 is left out"
    ]


def test_chat_template_requires_one(tok):
    with pytest.raises(DataError, match="chat template"):
        check_template("chat", tok)
    with pytest.raises(DataError, match="chat template"):
        render_prompt(Example("x", references=("y",)), "chat", tok)


# ---------------------------------------------------------------------------------------------- encoding


def test_encode_exact_ids_and_label_mask(tok):
    features, status = encode_example(hello(), tok, template=CUSTOM)
    # Q : hello world A : | good bye </s>; no BOS since this tokenizer does not add one
    assert features == {"input_ids": [4, 5, 7, 8, 6, 5, 9, 10, 2], "labels": [-100] * 6 + [9, 10, 2]}
    assert status == "ok"


def test_bos_prepended_only_when_tokenizer_adds_it(bos_tok):
    features, _ = encode_example(hello(), bos_tok, template=CUSTOM)
    assert features == {"input_ids": [1, 4, 5, 7, 8, 6, 5, 9, 10, 2], "labels": [-100] * 7 + [9, 10, 2]}
    # a verbatim prompt that already begins with BOS keeps exactly one
    features, _ = encode_example(hello(prompt="<s> hello"), bos_tok, template=CUSTOM)
    assert features["input_ids"] == [1, 7, 9, 10, 2]


def test_prompt_left_truncation_keeps_the_end(tok, bos_tok):
    features, status = encode_example(hello(), tok, template=CUSTOM, max_prompt_length=3)
    assert features == {"input_ids": [8, 6, 5, 9, 10, 2], "labels": [-100] * 3 + [9, 10, 2]}
    assert status == "prompt_truncated"
    features, _ = encode_example(hello(), bos_tok, template=CUSTOM, max_prompt_length=3)
    assert features["input_ids"] == [1, 6, 5, 9, 10, 2]  # BOS survives; prompt budget includes it
    assert encode_prompt(hello(), bos_tok, template=CUSTOM, max_prompt_length=3) == [1, 6, 5]


def test_response_truncation_and_drop(tok):
    features, status = encode_example(hello(), tok, template=CUSTOM, max_length=8)
    assert features == {"input_ids": [4, 5, 7, 8, 6, 5, 9, 10], "labels": [-100] * 6 + [9, 10]}  # EOS cut
    assert status == "response_truncated"
    assert encode_example(hello(), tok, template=CUSTOM, max_length=6) == (None, "dropped")
    features, status = encode_example(hello(), tok, template=CUSTOM, max_prompt_length=3, max_length=4)
    assert features == {"input_ids": [8, 6, 5, 9], "labels": [-100, -100, -100, 9]}
    assert status == "response_truncated"


def test_encode_examples_counts_and_logs_once(tok, caplog):
    examples = [
        hello(),  # prompt Q : hello world A : (6) | good bye </s> (3)
        Example("one two three four", references=("good",)),  # prompt 8 | good </s> (2)
        hello(("good bye one two",)),  # prompt 6 | 5
        Example("one two three four five", references=("bye",)),  # prompt 9 | bye </s> (2)
    ]
    with caplog.at_level(logging.INFO, logger="todi.data"):
        encoded, stats = encode_examples(examples, tok, template=CUSTOM, max_prompt_length=7, max_length=10)
    # prompts of 8 and 9 tokens are cut to 7; 6 + 5 > 10 cuts the third response to 4 tokens
    assert stats == EncodeStats(examples=4, kept=4, prompt_truncated=2, response_truncated=1, dropped=0)
    assert [len(f["input_ids"]) for f in encoded] == [9, 9, 10, 9]
    assert encoded[1]["input_ids"] == [5, 11, 12, 13, 14, 6, 5, 9, 2]  # left-truncated: "Q" gone
    assert encoded[2]["labels"] == [-100] * 6 + [9, 10, 11, 12]
    summaries = [r.getMessage() for r in caplog.records if "encoded 4 examples" in r.getMessage()]
    assert summaries == [stats.summary()]
    assert "2 with the prompt left-truncated" in stats.summary()

    _, stats = encode_examples(examples, tok, template=CUSTOM, max_prompt_length=9, max_length=8)
    # responses of examples 0 and 2 keep 2 tokens; prompts of 8 and 9 leave no room: dropped
    assert stats == EncodeStats(examples=4, kept=2, prompt_truncated=0, response_truncated=2, dropped=2)
    _, stats = encode_examples(examples, tok, template=CUSTOM, max_prompt_length=3, max_length=4)
    assert stats == EncodeStats(examples=4, kept=4, prompt_truncated=4, response_truncated=4, dropped=0)
    with pytest.raises(DataError, match="all 4 examples were dropped"):
        encode_examples(examples, tok, template=CUSTOM, max_prompt_length=20, max_length=5)


def test_encode_examples_matches_encode_example_and_prompt(bos_tok):
    examples = [hello(), Example("one two", "three", ("four five",)), hello(prompt="A : one")]
    encoded, _ = encode_examples(examples, bos_tok, template=CUSTOM, max_prompt_length=5, max_length=9)
    for ex, features in zip(examples, encoded):
        assert encode_example(ex, bos_tok, template=CUSTOM, max_prompt_length=5, max_length=9)[0] == features
        prompt = encode_prompt(ex, bos_tok, template=CUSTOM, max_prompt_length=5)
        assert features["input_ids"][: len(prompt)] == prompt
        assert features["labels"][: len(prompt)] == [-100] * len(prompt)


TOKENIZERS = {False: make_tokenizer(), True: make_tokenizer(adds_bos=True)}
WORD_IDS = st.lists(st.integers(7, 15), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(
    instruction=WORD_IDS,
    response=WORD_IDS,
    adds_bos=st.booleans(),
    max_prompt_length=st.integers(1, 20),
    max_length=st.integers(1, 30),
)
def test_encoding_matches_a_plain_reference(instruction, response, adds_bos, max_prompt_length, max_length):
    tokenizer = TOKENIZERS[adds_bos]
    example = Example(
        " ".join(WORDS[i] for i in instruction), references=(" ".join(WORDS[i] for i in response),)
    )
    prompt = [4, 5, *instruction, 6, 5]  # Q : ... A :
    keep = max_prompt_length - adds_bos
    prompt = [1] * adds_bos + (prompt[len(prompt) - keep :] if len(prompt) > keep else prompt)
    full = [*response, 2][: max(max_length - len(prompt), 0)]
    features, status = encode_example(
        example, tokenizer, template=CUSTOM, max_prompt_length=max_prompt_length, max_length=max_length
    )
    if not full:
        assert (features, status) == (None, "dropped")
        return
    assert features == {"input_ids": prompt + full, "labels": [-100] * len(prompt) + full}
    assert encode_prompt(example, tokenizer, template=CUSTOM, max_prompt_length=max_prompt_length) == prompt
    expected = "response_truncated" if len(full) <= len(response) else "ok"
    if expected == "ok" and len(prompt) - adds_bos < len(instruction) + 4:
        expected = "prompt_truncated"
    assert status == expected


def test_missing_eos_is_an_error():
    tokenizer = make_tokenizer(eos=None)
    with pytest.raises(DataError, match="no EOS") as err:
        encode_example(hello(), tokenizer, template=CUSTOM)
    assert "eos_token" in err.value.hint


# ---------------------------------------------------------------------------------------------- loading


def test_load_jsonl_with_lists_extra_fields_and_prompts(tmp_path):
    path = write_lines(
        tmp_path / "eval.jsonl",
        [
            json.dumps({"instruction": "a", "input": "b", "output": ["r1", "r2"], "topic": "t"}),
            "",
            json.dumps({"prompt": "P: x\n", "output": "y", "category": "c"}),
            json.dumps({"instruction": "c", "input": None, "output": "z"}),
        ],
    )
    examples = load_examples(path)
    assert examples == [
        Example("a", "b", ("r1", "r2"), source=f"{path}:1"),
        Example("", "", ("y",), prompt="P: x\n", source=f"{path}:3"),
        Example("c", "", ("z",), source=f"{path}:4"),
    ]
    assert examples[0].output == "r1"
    assert load_examples(path, max_examples=2) == examples[:2]


BAD_LINES = [
    ('{"instruction": "a", "output": "b"', "malformed JSON", None),
    (json.dumps({"instruction": "a", "input": ""}), "missing field 'output'", "output"),
    (
        json.dumps({"input": "x", "output": "b"}),
        "missing field 'instruction' (found fields: input, output)",
        None,
    ),
    (json.dumps({"instruction": "a", "output": None}), "field 'output' is null", "output"),
    (json.dumps({"instruction": "a", "output": ""}), "field 'output' is empty", "output"),
    (json.dumps({"instruction": "a", "output": "  \n"}), "field 'output' is empty", "output"),
    (json.dumps({"instruction": "a", "output": []}), "field 'output' is an empty list", "output"),
    (json.dumps({"instruction": "a", "output": ["ok", ""]}), "field 'output[1]' is empty", "output[1]"),
    (json.dumps({"instruction": 5, "output": "b"}), "field 'instruction' is a number", "instruction"),
    (json.dumps({"instruction": "a", "input": ["x"], "output": "b"}), "field 'input' is a list", "input"),
    (json.dumps({"instruction": "a", "output": {"t": 1}}), "field 'output' is an object", "output"),
    (json.dumps({"instruction": "a", "output": ["x", 3]}), "field 'output[1]' is a number", "output[1]"),
    (json.dumps(["a", "b"]), "expected a JSON object", None),
    (b'{"instruction": "a", "input": "caf\xe9", "output": "b"}', "field 'input' is not valid UTF-8", "input"),
]


@pytest.mark.parametrize(("line", "needle", "field"), BAD_LINES)
def test_bad_line_names_file_line_and_field(tmp_path, line, needle, field):
    path = write_lines(tmp_path / "my_data.jsonl", [GOOD, line, GOOD])
    with pytest.raises(DataError) as err:
        load_examples(path)
    message = str(err.value)
    assert f"{path}, line 2:" in message
    assert needle in message
    if field:
        assert f"'{field}'" in message
    assert err.value.hint  # says what to do
    assert isinstance(err.value, TodiError)


def test_non_utf8_hint_and_byte(tmp_path):
    path = write_lines(tmp_path / "latin.jsonl", [GOOD, GOOD, b'{"instruction": "\xff", "output": "b"}'])
    with pytest.raises(DataError, match=r"line 3: field 'instruction' is not valid UTF-8 \(byte 0xff") as err:
        load_examples(path)
    assert "UTF-8" in err.value.hint


def test_empty_file_and_missing_path(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match=r"empty\.jsonl.*holds no examples"):
        load_examples(path)
    with pytest.raises(DataError, match="no such file or folder"):
        load_examples(tmp_path / "nope.jsonl")


def test_load_folder_splits(tmp_path):
    for split, n in (("train", 3), ("valid", 2), ("test", 1)):
        write_lines(tmp_path / f"{split}.jsonl", [GOOD] * n)
    assert [len(load_examples(tmp_path, s)) for s in ("train", "dev", "test")] == [3, 2, 1]
    assert load_examples(tmp_path, "dev")[0].source == f"{tmp_path / 'valid.jsonl'}:1"
    with pytest.raises(
        DataError, match=r"no extra\.jsonl \(found: test\.jsonl, train\.jsonl, valid\.jsonl\)"
    ):
        load_examples(tmp_path, "extra")


def test_load_hf_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(4)]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "single")
    examples = load_examples(tmp_path / "single")
    assert [(e.instruction, e.references) for e in examples] == [(f"q{i}", (f"a{i}",)) for i in range(4)]
    assert len(load_examples(tmp_path / "single", max_examples=2)) == 2

    bad = [*rows[:2], {"instruction": "q", "input": "", "output": ""}]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "validation": datasets.Dataset.from_list(bad)}
    ).save_to_disk(tmp_path / "dict")
    assert len(load_examples(tmp_path / "dict", "train")) == 4
    with pytest.raises(DataError, match=r"\[validation\], row 3: field 'output' is empty"):
        load_examples(tmp_path / "dict", "dev")
    with pytest.raises(DataError, match="has no split 'test'"):
        load_examples(tmp_path / "dict", "test")


# ---------------------------------------------------------------------------------------------- batching


def test_collator_pads_right_with_masks_and_positions():
    features = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8, 9, 10, 11, 12], "labels": [-100] * 2 + [10, 11, 12]},
    ]
    batch = DataCollator(pad_token_id=0)(features)
    assert {k: v.dtype for k, v in batch.items()} == dict.fromkeys(
        ("input_ids", "attention_mask", "position_ids", "labels"), torch.long
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 10, 11, 12]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0], [0, 1, 2, 3, 4]]
    batch = DataCollator(pad_token_id=2, pad_to_multiple_of=4)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2, 2, 2, 2, 2], [8, 9, 10, 11, 12, 2, 2, 2]]
    assert batch["labels"][0, 3:].tolist() == [-100] * 5


def padding(lengths, batches):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 500), max_size=300),
    batch_size=st.integers(1, 9),
    seed=st.integers(0, 2**32),
    mode=st.sampled_from(["none", "sort", "bucket"]),
)
def test_batches_cover_every_index_once(lengths, batch_size, seed, mode):
    batches = length_grouped_batches(lengths, batch_size, seed=seed, mode=mode)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert batches == length_grouped_batches(lengths, batch_size, seed=seed, mode=mode)


def test_grouping_reduces_padding_and_depends_on_seed():
    lengths = [random.Random(i).randint(10, 500) for i in range(2000)]
    plain = length_grouped_batches(lengths, 8, seed=1, mode="none")
    bucket = length_grouped_batches(lengths, 8, seed=1, mode="bucket")
    ordered = length_grouped_batches(lengths, 8, seed=1, mode="sort")
    assert padding(lengths, ordered) <= padding(lengths, bucket) < padding(lengths, plain) / 5
    assert bucket != length_grouped_batches(lengths, 8, seed=2, mode="bucket")
    assert all(lengths[b[0]] >= lengths[b[-1]] for b in ordered)
    with pytest.raises(TodiError, match="unknown length grouping"):
        length_grouped_batches(lengths, 8, seed=1, mode="random")


# ---------------------------------------------------------------------------------------------- tokenizers


def test_check_tokenizers_same_and_first_difference():
    assert check_tokenizers(make_tokenizer(), make_tokenizer()) is None
    other = [*WORDS[:2], "<eos>", *WORDS[3:]]
    with pytest.raises(DataError) as err:
        check_tokenizers(make_tokenizer(), make_tokenizer(words=other, eos="<eos>"))
    assert "id 2: teacher '</s>' vs student '<eos>'" in str(err.value)
    assert "--cross-tokenizer hybrid" in str(err.value.hint)
    with pytest.raises(
        DataError, match=r"id 20: teacher \(none\) vs student 'extra' \(teacher has 20 tokens, student 21\)"
    ):
        check_tokenizers(make_tokenizer(), make_tokenizer(words=[*WORDS, "extra"]))
    with pytest.raises(DataError, match="eos_token_id: teacher 2 vs student 0"):
        check_tokenizers(make_tokenizer(), make_tokenizer(eos="<pad>"))
    with pytest.raises(DataError, match="different tokenisation"):
        check_tokenizers(make_tokenizer(), make_tokenizer(adds_bos=True))


def test_shared_vocab_size_padded_heads_log_once(tok, caplog):
    assert len(tok) == 20
    with caplog.at_level(logging.INFO, logger="todi.data"):
        assert shared_vocab_size(tok, 24, 20, 32) == 20
        assert shared_vocab_size(tok, 24) == 20
    messages = [r.getMessage() for r in caplog.records if "model head" in r.getMessage()]
    assert messages == [
        "model head has 24 logits but the tokenizer has 20 tokens; the loss uses the first 20",
        "model head has 32 logits but the tokenizer has 20 tokens; the loss uses the first 20",
    ]
    assert shared_vocab_size(tok) == 20
    with pytest.raises(DataError, match="model head has 16 logits but the tokenizer has 20 tokens"):
        shared_vocab_size(tok, 24, 16)


def test_ensure_pad_token_falls_back_to_eos():
    tokenizer = make_tokenizer(pad_token=None)
    assert tokenizer.pad_token_id is None
    assert ensure_pad_token(tokenizer) == 2 == tokenizer.pad_token_id
    assert ensure_pad_token(make_tokenizer()) == 0


def test_resolve_data_root(tmp_path, monkeypatch):
    monkeypatch.delenv("TODI_DATA", raising=False)
    work = tmp_path / "repo"
    work.mkdir()
    monkeypatch.chdir(work)
    assert resolve_data_root() is None
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert resolve_data_root().resolve() == (tmp_path / "shared" / "data").resolve()
    monkeypatch.setenv("TODI_DATA", str(tmp_path))
    assert resolve_data_root() == tmp_path
    assert resolve_data_root(str(work)) == work
    with pytest.raises(DataError, match="is not a folder"):
        resolve_data_root(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def dolly() -> Path:
    folder = DATA / "dolly"
    if not (folder / "train.jsonl").is_file():
        pytest.skip(f"shared Dolly data not found at {folder} (set TODI_DATA)")
    return folder


def test_real_dolly_splits_load(dolly):
    counts = {split: len(load_examples(dolly, split)) for split in ("train", "dev", "test")}
    assert counts == {"train": 11_435, "dev": 1_000, "test": 500}
    for name, n in (("self-inst", 242), ("vicuna", 80)):
        assert len(load_examples(DATA / name / "test.jsonl")) == n


def test_real_dolly_encodes_with_gpt2(dolly, gpt2):
    examples = load_examples(dolly / "train.jsonl", max_examples=200)
    encoded, stats = encode_examples(examples, gpt2, max_prompt_length=256, max_length=512)
    # prompts are capped at 256 < 512 tokens, so every example keeps part of its response
    assert stats.examples == 200 == stats.kept == len(encoded) and stats.dropped == 0
    assert stats.prompt_truncated <= stats.kept and stats.response_truncated <= stats.kept
    eos = gpt2.eos_token_id
    for f in encoded:
        labels, ids = f["labels"], f["input_ids"]
        assert len(ids) == len(labels) <= 512
        assert all(0 <= i < len(gpt2) for i in ids)
        assert all(lab == -100 or 0 <= lab < len(gpt2) for lab in labels)
        n_prompt = labels.count(-100)
        assert labels[:n_prompt] == [-100] * n_prompt and -100 not in labels[n_prompt:]
        assert labels[n_prompt:] == ids[n_prompt:]
        assert ids[0] != gpt2.bos_token_id  # GPT-2 does not add BOS by default
    # a short, untruncated example decodes back to the alpaca prompt and the response + EOS
    first = next(i for i, f in enumerate(encoded) if f["input_ids"][-1] == eos and len(f["input_ids"]) < 256)
    ex, f = examples[first], encoded[first]
    n_prompt = f["labels"].count(-100)
    decode = lambda ids: gpt2.decode(ids, clean_up_tokenization_spaces=False)  # noqa: E731
    assert decode(f["input_ids"][:n_prompt]) == render_prompt(ex)
    assert decode(f["input_ids"][n_prompt:-1]) == ex.output
