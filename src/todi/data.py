"""Instruction data to training batches: load, validate, template, tokenise, pad, batch.

The pipeline is the one MiniLLM / DistiLLM / ToDi use for Dolly-style data, so numbers stay comparable:
an Alpaca prompt, the response tokenised after it with EOS appended, loss only on response tokens.
Teacher and student share one tokenisation unless ``--cross-tokenizer`` is given (``check_tokenizers``
says so early instead of producing silently wrong losses; :mod:`todi.xtok` pairs two tokenizations).

Every problem with a user's data raises :class:`DataError` naming the file, the 1-based line and the
field, with a hint saying how to fix it, before any training starts.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import random
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from todi.errors import DataError, UsageError
from todi.formats import (
    ASSISTANT,
    DOLLY_NAMES,
    FIELDS,
    TABLE_SUFFIXES,
    Turn,
    check_surrogates,
    conversation,
    json_type,
    parse_columns,
    read_table,
)

logger = logging.getLogger(__name__)

TEMPLATES: tuple[str, ...] = ("alpaca", "chat", "none")
"""Named prompt templates; any other string containing ``{instruction}`` is a custom template."""

IGNORE_INDEX = -100
"""Label value that the cross-entropy / distillation losses skip (PyTorch and HF convention)."""

# Exact strings of MiniLLM / DistiLLM ``tools/process_data_dolly.py`` (and ToDi, which reuses them).
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

_SPLIT_ALIASES = {
    "dev": ("dev", "valid", "validation"),
    "valid": ("valid", "dev", "validation"),
    "validation": ("validation", "dev", "valid"),
}
_FORMAT_HINT = (
    "each line must be one JSON object with 'instruction', optional 'input' and 'output' "
    "(a string or a list of reference strings), a pre-templated 'prompt' and 'output' (or 'completion'), "
    "or chat 'messages'; --columns FIELD=COLUMN reads a field from another column"
)
_JSON_HINT = (
    "a .json file must hold one JSON array of records, [{...}, {...}], or one JSON object per line; "
    "each record has 'instruction', optional 'input' and 'output', or 'prompt' and 'output'"
)
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt", ".arrow")
"""A value of ``--data`` ending so names a local file, never a Hugging Face Hub data set."""
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


@dataclass(frozen=True)
class Example:
    """One instruction-following example; ``references[0]`` is the training target.

    Several references exist for evaluation sets scored by the best ROUGE-L over references.
    """

    instruction: str
    input: str = ""
    references: tuple[str, ...] = ()
    prompt: str | None = None
    source: str = ""
    turns: tuple[Turn, ...] = ()
    """A chat conversation (``messages`` records): rendered with the tokenizer's chat template, the loss on
    the turns marked ``train``; ``references[0]`` is then the last trained turn's text."""

    def __post_init__(self) -> None:
        # A bare string would silently become a tuple of characters; a list is accepted for convenience.
        if isinstance(self.references, str):
            raise TypeError("Example.references must be a tuple of strings, not a single string")
        if not isinstance(self.references, tuple):
            object.__setattr__(self, "references", tuple(self.references))
        if not isinstance(self.turns, tuple):
            object.__setattr__(self, "turns", tuple(Turn(*t) for t in self.turns))

    @property
    def output(self) -> str:
        """The training target (the first reference)."""
        if not self.references:
            raise DataError(
                f"{self.source or 'example'}: has no reference output to train on",
                "give every training example an 'output'",
            )
        return self.references[0]


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------


def load_examples(
    source: str | os.PathLike,
    split: str = "train",
    *,
    max_examples: int | None = None,
    columns: str | Mapping[str, str] | None = None,
    hub_config: str | None = None,
) -> list[Example]:
    """Load and validate a data set, failing on the first bad record with its file, line (or row) and field.

    ``source`` is a JSON-lines file; a ``.json`` file holding either one JSON array of records or one
    record per line (as ``datasets`` reads them); a ``.parquet``, ``.csv``, ``.tsv`` or ``.arrow`` file
    (read through ``datasets``); a folder holding ``{split}.jsonl`` / ``.json`` / ``.parquet`` / ``.csv``
    (``valid`` serves for ``dev``); a folder saved with ``datasets``' ``save_to_disk``; or a Hugging Face
    ``datasets`` name (``hub_config`` names its configuration). A ``.jsonl`` (or other non-``.json``) file
    holding one JSON array is refused with a hint to rename it to ``.json``: that extension promises one
    record per line, which other line-based tools rely on. The record forms are listed in
    :mod:`todi.formats`; ``columns`` (``"input=context,output=response"``) reads fields from other columns.

    A value that ends in a data-file suffix (``.jsonl``, ``.json``, ``.parquet``, ``.csv``, ``.txt``...),
    starts with ``./``, ``../``, ``/`` or ``~``, holds more than one path separator, or is a
    ``PathLike`` is a local path only: if it does not exist the error says where it was looked for,
    and no Hub look-up happens. Any other missing value (``owner/name``) is tried on the Hub.

    ``max_examples`` keeps the first N examples (and reads no further), for quick runs.
    """
    if max_examples is not None and max_examples < 1:
        raise UsageError(f"max_examples must be at least 1, got {max_examples}", "leave it unset to load all")
    path = Path(source).expanduser()
    make = _Records(parse_columns(columns))
    if path.is_file():
        examples = _read_file(path, max_examples, make)
    elif path.is_dir():
        examples = _load_folder(path, split, max_examples, make)
    elif isinstance(source, os.PathLike) or _is_local_path(str(source)):
        raise _no_such_path(str(source), path)
    else:
        examples = _load_hub(str(source), split, max_examples, path, make, hub_config)
    if not examples:
        raise DataError(
            f"{source} holds no examples" + ("" if path.is_file() else f" for split {split!r}"),
            "the file is empty or holds only blank lines; check the path and the split name",
        )
    logger.info("loaded %d examples from %s (split %s)", len(examples), source, split)
    return examples


def _load_folder(folder: Path, split: str, max_examples: int | None, make: _Records) -> list[Example]:
    for name in _SPLIT_ALIASES.get(split, (split,)):
        for suffix in (".jsonl", ".json", *TABLE_SUFFIXES):
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file():
                return _read_file(candidate, max_examples, make)
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        import datasets

        return _from_hf(datasets.load_from_disk(str(folder)), str(folder), split, max_examples, make)
    found = sorted(p.name for p in (*folder.glob("*.jsonl"), *folder.glob("*.json"))) or ["no .jsonl files"]
    raise DataError(
        f"folder {folder} has no {split}.jsonl (found: {', '.join(found)})",
        "name the split files train.jsonl, dev.jsonl (or valid.jsonl) and test.jsonl, or pass a file path",
    )


def _is_local_path(text: str) -> bool:
    """Whether ``text`` can only mean a local path (see ``load_examples``), not a Hub data set name."""
    separators = text.count("/") + (text.count(os.sep) if os.sep != "/" else 0)
    return text.lower().endswith(_DATA_SUFFIXES) or text.startswith((".", "/", "~", os.sep)) or separators > 1


def _no_such_path(given: str, path: Path) -> DataError:
    """Say where a missing path was looked for, and what the nearest existing folder holds."""
    absolute = path.resolve()
    parent = absolute.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    hint = "check the path (a relative one starts from the current folder)"
    try:
        names = sorted(
            entry.name + ("/" if entry.is_dir() else "")
            for entry in os.scandir(parent)
            if entry.name[:1] != "."
        )
    except OSError:
        return DataError(f"no such file or folder: {given} (looked for it at {absolute})", hint)
    missing = absolute.relative_to(parent).parts[0]
    close = difflib.get_close_matches(missing, [n.rstrip("/") for n in names], n=1, cutoff=0.6)
    shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
    hint = f"{hint}; the nearest existing folder, {parent}, holds: {shown or 'nothing'}"
    if close:
        hint += f" (did you mean {close[0]!r} for {missing!r}?)"
    return DataError(f"no such file or folder: {given} (looked for it at {absolute})", hint)


def _load_hub(
    name: str, split: str, max_examples: int | None, path: Path, make: _Records, hub_config: str | None
) -> list[Example]:
    not_local = f"could not load {name!r}: it is not a local path (nothing at {path.resolve()})"
    hint = (
        "check the spelling; pass a .jsonl or .json file, a folder with train/dev/test.jsonl or a "
        "save_to_disk folder (start a relative path with ./); a Hugging Face Hub name needs network access"
    )
    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "") not in ("", "0")]
    if offline:
        hint += f" and {' / '.join(offline)} unset"
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{not_local}, and the Hugging Face Hub cannot be tried: the 'datasets' package is not installed",
            hint + ", and `pip install datasets` for Hub data sets",
        ) from None
    try:
        loaded = datasets.load_dataset(name, hub_config) if hub_config else datasets.load_dataset(name)
    except Exception as err:  # network, unknown name, bad script: all mean "cannot use this source"
        reason = (f"{type(err).__name__}: {err}".strip().splitlines() or [""])[0][:300]
        raise DataError(
            f"{not_local}, nor a data set reachable on the Hugging Face Hub ({reason})", hint
        ) from err
    return _from_hf(loaded, name, split, max_examples, make)


def _from_hf(loaded: Any, name: str, split: str, max_examples: int | None, make: _Records) -> list[Example]:
    """Validate rows of a ``datasets.Dataset`` (or pick ``split`` from a ``DatasetDict``) like JSONL lines."""
    if isinstance(loaded, Mapping):  # DatasetDict
        for candidate in _SPLIT_ALIASES.get(split, (split,)):
            if candidate in loaded:
                loaded, split = loaded[candidate], candidate
                break
        else:
            raise DataError(
                f"data set {name} has no split {split!r} (splits: {', '.join(loaded)})",
                "pass one of the listed split names",
            )
    elif split != "train":
        logger.warning("data set %s has no splits; using all of it for split %r", name, split)
    if max_examples is not None:
        loaded = loaded.select(range(min(max_examples, len(loaded))))
    label = f"{name}[{split}]"
    return [make(row, f"{label}, row {i}", f"{label}:{i}") for i, row in enumerate(loaded, 1)]


def _read_file(path: Path, max_examples: int | None, make: _Records) -> list[Example]:
    """JSON lines, (``.json`` only) one JSON array of records, or a table file read through ``datasets``."""
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        rows = read_table(path, max_examples)
        return [make(row, f"{path}, row {i}", f"{path}:{i}") for i, row in enumerate(rows, 1)]
    if _starts_with_array(path):
        if suffix == ".json":
            return _read_json_array(path, max_examples, make)
        raise DataError(
            f"{path} holds one JSON array, not one record per line",
            "rename it to .json (todi reads a .json file holding one array of records) "
            "or write one record per line",
        )
    return _read_jsonl(path, max_examples, make)


def _starts_with_array(path: Path) -> bool:
    """Whether the file's first non-space character is ``[`` and its first line is not one complete
    JSON value followed by more lines (that is JSON lines with a bad first line, reported as such)."""
    with path.open("rb") as file:
        first = file.readline()
        head = first.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
        while not head and first:
            first = file.readline()
            head = first.lstrip(b" \t\r\n")
        if not head.startswith(b"["):
            return False
        try:
            json.loads(head)
        except ValueError:  # an array spread over lines, or bad bytes: let the array reader report it
            return True
        return not any(line.strip() for line in file)


def _read_json_array(path: Path, max_examples: int | None, make: _Records) -> list[Example]:
    """One JSON array of records; a record's place is ``record N (line L)``, L where the record starts."""
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        start, end = raw.rfind(b"\n", 0, err.start) + 1, raw.find(b"\n", err.start)
        line = raw[start : len(raw) if end < 0 else end]
        lineno = raw.count(b"\n", 0, start) + 1
        where = f"{path}, line {lineno}"
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as line_err:
            raise _not_utf8(line, line_err, where) from None
        raise  # unreachable: the bad byte is on that line

    def malformed(msg: str, pos: int) -> DataError:
        lineno = text.count("\n", 0, pos) + 1
        column = pos - (text.rfind("\n", 0, pos) + 1) + 1
        return DataError(f"{path}, line {lineno}: malformed JSON ({msg} at column {column})", _JSON_HINT)

    decoder = json.JSONDecoder()
    pos = _JSON_SPACE.match(text, 0).end()
    if not text.startswith("[", pos):
        raise malformed("Expecting '['", pos)
    pos = _JSON_SPACE.match(text, pos + 1).end()
    examples: list[Example] = []
    lineno, counted = 1, 0
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                record, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                raise malformed(err.msg, err.pos) from None
            lineno, counted = lineno + text.count("\n", counted, pos), pos
            where = f"{path}, record {len(examples) + 1} (line {lineno})"
            examples.append(make(record, where, f"{path}:{lineno}"))
            if max_examples is not None and len(examples) >= max_examples:
                return examples
            pos = _JSON_SPACE.match(text, end).end()
            if text.startswith(",", pos):
                pos = _JSON_SPACE.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                raise malformed("Expecting ',' delimiter" if pos < len(text) else "Expecting ']'", pos)
    pos = _JSON_SPACE.match(text, pos).end()
    if pos != len(text):
        raise malformed("Extra data after the array", pos)
    return examples


def _read_jsonl(path: Path, max_examples: int | None, make: _Records) -> list[Example]:
    examples: list[Example] = []
    with path.open("rb") as file:
        for lineno, raw in enumerate(file, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark, as some editors write
            where = f"{path}, line {lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(raw, err, where) from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{where}: malformed JSON ({err.msg} at column {err.colno})", _FORMAT_HINT
                ) from None
            examples.append(make(record, where, f"{path}:{lineno}"))
            if max_examples is not None and len(examples) >= max_examples:
                break
    return examples


def _not_utf8(raw: bytes, err: UnicodeDecodeError, where: str) -> DataError:
    """Name the field holding the bad byte: parse with the bytes smuggled through as surrogates."""
    byte = f"byte 0x{raw[err.start]:02x} at column {err.start + 1}"
    field = None
    try:
        record = json.loads(raw.decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError:
        record = None
    if isinstance(record, dict):
        field = next((key for key, value in record.items() if not _is_utf8(key) or not _is_utf8(value)), None)
    what = f"field {field!r}" if field is not None else "the line"
    return DataError(
        f"{where}: {what} is not valid UTF-8 ({byte})",
        "re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`",
    )


def _is_utf8(value: Any) -> bool:
    if isinstance(value, list):
        return all(_is_utf8(v) for v in value)
    if not isinstance(value, str):
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Records:
    """Records -> examples. A record's form (see :mod:`todi.formats`) follows from its fields: ``messages``,
    else ``prompt`` + ``completion``, else the instruction form (or ``prompt`` + ``output``); each field is
    read from the column ``--columns`` names for it, and errors name that column."""

    def __init__(self, columns: Mapping[str, str] | None = None) -> None:
        self.columns = dict(columns or {})

    def names(self, record: Mapping[str, Any]) -> dict[str, str]:
        names = {field: self.columns.get(field, field) for field in FIELDS}
        dolly = (
            "output" not in self.columns
            and names["output"] not in record
            and DOLLY_NAMES["output"] in record
            and names["instruction"] in record
        )
        if dolly:  # databricks-dolly-15k: instruction, context, response
            names["output"] = DOLLY_NAMES["output"]
            if "input" not in self.columns and names["input"] not in record:
                names["input"] = DOLLY_NAMES["input"]
        return names

    def __call__(self, record: Any, where: str, source: str) -> Example:
        if not isinstance(record, Mapping):
            raise DataError(f"{where}: expected a JSON object, got {json_type(record)}", _FORMAT_HINT)
        names = self.names(record)
        if names["messages"] in record:
            turns = conversation(record[names["messages"]], where, names["messages"], train=True)
            return _conversation_example(turns, where, names["messages"], source)
        if names["completion"] in record:
            return _prompt_completion(record, where, source, names)
        return _instruction_example(record, where, source, names)


def _missing(record: Mapping[str, Any], column: str) -> str:
    if column in record:
        return f"field {column!r} is null"
    return f"missing field {column!r} (found fields: {', '.join(map(str, record)) or 'none'})"


def _text_field(record: Mapping[str, Any], column: str, where: str) -> str | None:
    value = record.get(column)
    if value is not None and not isinstance(value, str):
        raise DataError(
            f"{where}: field {column!r} is {json_type(value)}, expected a string",
            f"make {column!r} a JSON string (in quotes)",
        )
    if value is not None:
        check_surrogates(value, where, column)
    return value


def _conversation_example(turns: list[Turn], where: str, field: str, source: str) -> Example:
    trained = [t for t in turns if t.train]
    if not trained:
        raise DataError(
            f"{where}: field {field!r} has no {ASSISTANT!r} message to train on",
            "a conversation needs at least one message with role 'assistant'",
        )
    return Example(instruction="", references=(trained[-1].content,), source=source, turns=tuple(turns))


def _prompt_completion(record: Mapping[str, Any], where: str, source: str, names: dict[str, str]) -> Example:
    """TRL's prompt-completion form: two strings (a verbatim prompt), or two lists of messages."""
    prompt_col, completion_col = names["prompt"], names["completion"]
    prompt, completion = record.get(prompt_col), record.get(completion_col)
    if prompt is None:
        raise DataError(
            f"{where}: {_missing(record, prompt_col)}", _FORMAT_HINT + "; rename or add the field"
        )
    if completion is None:
        raise DataError(f"{where}: {_missing(record, completion_col)}", _FORMAT_HINT)
    if isinstance(prompt, list) or isinstance(completion, list):
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise DataError(
                f"{where}: field {prompt_col!r} is {json_type(prompt)} but {completion_col!r} is "
                f"{json_type(completion)}",
                "give both as strings, or both as lists of chat messages",
            )
        turns = conversation(prompt, where, prompt_col, train=False)
        turns += conversation(completion, where, completion_col, train=True)
        return _conversation_example(turns, where, completion_col, source)
    prompt_text = _text_field(record, prompt_col, where)
    output = _text_field(record, completion_col, where)
    for column, text in ((prompt_col, prompt_text), (completion_col, output)):
        if not text.strip():
            raise DataError(f"{where}: field {column!r} is empty", "fill it in or drop the record")
    return Example(instruction="", references=(output,), prompt=prompt_text, source=source)


def _instruction_example(
    record: Mapping[str, Any], where: str, source: str, names: dict[str, str]
) -> Example:
    prompt = _text_field(record, names["prompt"], where)
    instruction = _text_field(record, names["instruction"], where)
    input_text = _text_field(record, names["input"], where) or ""  # null input means "no input"
    if prompt is None:
        if instruction is None:
            raise DataError(
                f"{where}: {_missing(record, names['instruction'])}",
                _FORMAT_HINT + "; rename or add the field",
            )
        if not instruction.strip():
            raise DataError(
                f"{where}: field {names['instruction']!r} is empty",
                "fill in the instruction or drop the line",
            )
    elif not prompt.strip():
        raise DataError(f"{where}: field {names['prompt']!r} is empty", "fill in the prompt or drop the line")

    col = names["output"]
    output = record.get(col)
    if output is None:
        raise DataError(f"{where}: {_missing(record, col)}", _FORMAT_HINT + "; rename or add the field")
    if isinstance(output, str):
        check_surrogates(output, where, col)
        references: tuple[str, ...] = (output,)
    elif isinstance(output, (list, tuple)):
        if not output:
            raise DataError(f"{where}: field {col!r} is an empty list", "give at least one reference string")
        for i, ref in enumerate(output):
            if not isinstance(ref, str):
                raise DataError(
                    f"{where}: field '{col}[{i}]' is {json_type(ref)}, expected a string",
                    f"make every reference in {col!r} a JSON string",
                )
            check_surrogates(ref, where, f"{col}[{i}]")
        references = tuple(output)
    else:
        raise DataError(
            f"{where}: field {col!r} is {json_type(output)}, expected a string or a list of strings",
            f"make {col!r} a JSON string (or a list of reference strings)",
        )
    for i, ref in enumerate(references):
        if not ref.strip():
            field = col if isinstance(output, str) else f"{col}[{i}]"
            raise DataError(
                f"{where}: field {field!r} is empty",
                "every example needs a non-empty reference response; fill it in or drop the line",
            )
    return Example(
        instruction=instruction or "", input=input_text, references=references, prompt=prompt, source=source
    )


# --------------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------------

_warned_input_dropped: set[str] = set()


def check_template(template: str, tokenizer: Any = None) -> None:
    """Reject an unknown template name or field before any data is processed.

    ``"chat"`` needs a tokenizer with a chat template; that is checked when ``tokenizer`` is given.
    """
    if template in ("alpaca", "none"):
        return
    if template == "chat":
        if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "template 'chat' needs a tokenizer with a chat template, and this tokenizer has none",
                "use --template alpaca for base models, or the tokenizer of an instruct/chat model",
            )
        return
    if "{instruction}" not in template:
        raise DataError(
            f"unknown template {template!r}",
            f"use one of {', '.join(TEMPLATES)}, or a format string containing {{instruction}} "
            "(and optionally {input})",
        )
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        raise DataError(
            f"template {template!r} is not a valid format string: {err}",
            "write literal braces as {{ and }}",
        ) from None
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if field not in ("instruction", "input"):
            raise DataError(
                f"template field {{{field}}} is unknown",
                "a custom template may use only {instruction} and {input}; write literal braces as {{ and }}",
            )
        if spec or conversion:
            raise DataError(
                f"template field {{{field}}} has a format spec or conversion",
                "write plain {instruction} / {input}",
            )


def render_prompt(example: Example, template: str = "alpaca", tokenizer: Any = None) -> str:
    """The prompt text the model sees before its response (``example.prompt`` verbatim when set; for a
    conversation, the chat up to its last trained turn, rendered by the tokenizer's chat template)."""
    if example.prompt is not None:
        return example.prompt
    if example.turns:
        last = max(i for i, turn in enumerate(example.turns) if turn.train)
        return _chat_text(example, tokenizer, example.turns[:last], generation_prompt=True)
    check_template(template, tokenizer)
    if template == "alpaca":
        # MiniLLM / DistiLLM test ``len(input) == 0``; whitespace-only input still counts as input.
        if example.input:
            return ALPACA_WITH_INPUT.format(instruction=example.instruction, input=example.input)
        return ALPACA_NO_INPUT.format(instruction=example.instruction)
    user = example.instruction + (f"\n\n{example.input}" if example.input else "")
    if template == "none":
        return user
    if template == "chat":
        if tokenizer is None:
            raise DataError("template 'chat' needs the tokenizer", "pass tokenizer= to render_prompt")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    if example.input and "{input}" not in template and template not in _warned_input_dropped:
        _warned_input_dropped.add(template)
        logger.warning(
            "the custom template has no {input}: the input of examples such as %s is left out",
            example.source or "this one",
        )
    return template.format(instruction=example.instruction, input=example.input)


def _chat_text(example: Example, tokenizer: Any, turns: Sequence[Turn], *, generation_prompt: bool) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{example.source or 'an example'}: a chat conversation needs the tokenizer's chat template, and "
            + ("no tokenizer was given" if tokenizer is None else "this tokenizer has none"),
            "use the tokenizer of an instruct/chat model, or write the data as instruction/output records",
        )
    messages = [{"role": turn.role, "content": turn.content} for turn in turns]
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except (
        Exception
    ) as err:  # the template's own refusals (e.g. "System role not supported") are jinja errors
        reason = (f"{type(err).__name__}: {err}".strip().splitlines() or [""])[0][:300]
        raise DataError(
            f"{example.source or 'an example'}: the tokenizer's chat template cannot render this conversation "
            f"({reason})",
            "drop or merge the messages the template refuses (some templates take no system message)",
        ) from err


def conversation_pieces(example: Example, tokenizer: Any) -> list[tuple[str, bool]]:
    """A conversation's text in order, cut where trained turns start and end: ``(text, trained)`` pieces.

    A trained (assistant) turn's piece is what the chat template adds for it after the generation prompt:
    its content and the template's end-of-turn text (e.g. ``<|im_end|>``), so the model learns to stop, as
    TRL's ``assistant_only_loss`` marks it. The pieces are found by rendering the conversation's prefixes,
    which needs a template that renders a prefix of a chat as a prefix of its text (templates that do not
    are refused, naming the example)."""
    full = _chat_text(example, tokenizer, example.turns, generation_prompt=False)
    pieces: list[tuple[str, bool]] = []
    done = 0
    for i, turn in enumerate(example.turns):
        if not turn.train:
            continue
        before = _chat_text(example, tokenizer, example.turns[:i], generation_prompt=True)
        through = _chat_text(example, tokenizer, example.turns[: i + 1], generation_prompt=False)
        if not (full.startswith(through) and through.startswith(before) and len(before) >= done):
            raise DataError(
                f"{example.source or 'an example'}: the tokenizer's chat template does not render turn {i + 1} "
                "of this conversation as a continuation of the turns before it, so the assistant turns "
                "cannot be told apart from the rest",
                "use a chat template whose rendering of a chat's first turns is a prefix of the whole chat",
            )
        pieces += [(full[done : len(before)], False), (full[len(before) : len(through)], True)]
        done = len(through)
    pieces.append((full[done:], False))
    return [piece for piece in pieces if piece[0]]


# --------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------


@dataclass
class EncodeStats:
    """What truncation did to a data set. ``kept + dropped == examples``; truncation counts are of kept ones."""

    examples: int = 0
    kept: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    dropped: int = 0

    def summary(self) -> str:
        """One line for the log."""
        return (
            f"encoded {self.examples} examples: {self.kept} kept ({self.prompt_truncated} with the prompt "
            f"left-truncated, {self.response_truncated} with the response cut), {self.dropped} dropped "
            "(prompt left no room for the response)"
        )


def _bos_prefix(tokenizer: Any, template: str) -> list[int]:
    """BOS only where the tokenizer adds one by default, i.e. the model was trained with it; never for
    the chat template, which writes its own special tokens."""
    bos = tokenizer.bos_token_id
    if bos is None or template == "chat":
        return []
    default = tokenizer("a")["input_ids"]
    return [bos] if default[:1] == [bos] else []


def _eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(
            "the tokenizer has no EOS token, so responses cannot be terminated",
            "set tokenizer.eos_token (GPT-2: '<|endoftext|>') or add it to the tokenizer's tokenizer_config.json",
        )
    return eos


def _check_lengths(max_prompt_length: int, max_length: int | None = None) -> None:
    if max_prompt_length < 1:
        raise UsageError(f"max_prompt_length must be at least 1, got {max_prompt_length}")
    if max_length is not None and max_length < 1:
        raise UsageError(f"max_length must be at least 1, got {max_length}")


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _prompt_part(prompt_ids: list[int], bos: list[int], max_prompt_length: int) -> tuple[list[int], bool]:
    """BOS + the END of the prompt (the instruction's last words and '### Response:' matter most)."""
    if bos and prompt_ids[:1] == bos:
        prompt_ids = prompt_ids[1:]  # a verbatim prompt that already starts with BOS: keep exactly one
    room = max(max_prompt_length - len(bos), 0)
    if len(prompt_ids) <= room:
        return bos + prompt_ids, False
    return bos + prompt_ids[len(prompt_ids) - room :], True


def _assemble(
    prompt_ids: list[int],
    response_ids: list[int],
    bos: list[int],
    eos: int,
    max_prompt_length: int,
    max_length: int,
) -> tuple[dict[str, list[int]] | None, bool, bool]:
    prompt, prompt_truncated = _prompt_part(prompt_ids, bos, max_prompt_length)
    response = [*response_ids, eos]
    room = max_length - len(prompt)
    if room <= 0:
        return None, prompt_truncated, True
    response_truncated = len(response) > room
    response = response[:room]  # a cut response loses its EOS too: the model must not learn to stop there
    features = {"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response}
    return features, prompt_truncated, response_truncated


def _assemble_conversation(
    example: Example, tokenizer: Any, max_prompt_length: int, max_length: int
) -> tuple[dict[str, list[int]] | None, bool, bool]:
    """Like :func:`_assemble` for a conversation: the text before its first trained turn is the prompt
    (left-truncated to ``max_prompt_length``), the rest is cut at ``max_length``; labels only on trained
    turns. No BOS or EOS is added: the chat template writes its own special tokens."""
    pieces = conversation_pieces(example, tokenizer)
    first = next(i for i, (_, trained) in enumerate(pieces) if trained)
    ids = _tokenize(tokenizer, [text for text, _ in pieces])
    prompt_ids = [token for piece in ids[:first] for token in piece]
    rest = [token for piece in ids[first:] for token in piece]
    labels = [
        token if trained else IGNORE_INDEX
        for piece, (_, trained) in zip(ids[first:], pieces[first:])
        for token in piece
    ]
    prompt, prompt_truncated = _prompt_part(prompt_ids, [], max_prompt_length)
    room = max_length - len(prompt)
    if room <= 0:
        return None, prompt_truncated, True
    features = {"input_ids": prompt + rest[:room], "labels": [IGNORE_INDEX] * len(prompt) + labels[:room]}
    return features, prompt_truncated, len(rest) > room


def _status(features: dict | None, prompt_truncated: bool, response_truncated: bool) -> str:
    if features is None:
        return "dropped"
    if response_truncated:
        return "response_truncated"
    return "prompt_truncated" if prompt_truncated else "ok"


def encode_example(
    example: Example,
    tokenizer: Any,
    *,
    template: str = "alpaca",
    max_prompt_length: int = 256,
    max_length: int = 512,
) -> tuple[dict[str, list[int]] | None, str]:
    """Tokenise one example into ``input_ids`` and unshifted ``labels`` (-100 on the prompt).

    Status is the most severe of ``dropped`` > ``response_truncated`` > ``prompt_truncated`` > ``ok``;
    ``encode_examples`` counts both truncations when both happen.
    """
    _check_lengths(max_prompt_length, max_length)
    check_template(template, tokenizer)
    if example.turns:
        features, p_cut, r_cut = _assemble_conversation(example, tokenizer, max_prompt_length, max_length)
        return features, _status(features, p_cut, r_cut)
    bos, eos = _bos_prefix(tokenizer, template), _eos_id(tokenizer)
    prompt_ids, response_ids = _tokenize(
        tokenizer, [render_prompt(example, template, tokenizer), example.output]
    )
    features, p_cut, r_cut = _assemble(prompt_ids, response_ids, bos, eos, max_prompt_length, max_length)
    return features, _status(features, p_cut, r_cut)


def encode_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    template: str = "alpaca",
    max_prompt_length: int = 256,
    max_length: int = 512,
) -> tuple[list[dict[str, list[int]]], EncodeStats]:
    """Encode a data set exactly as ``encode_example`` does (batched for speed); log what truncation did.

    Text in the data that spells a special token of the tokenizer (``tokenizer.all_special_tokens``,
    e.g. ``<|endoftext|>`` in an output) is read as that special token, e.g. EOS, not as plain text,
    as Hugging Face tokenizers and TRL do by default. It is kept so, but one warning per data file names
    the first example holding one (file and line), the token text and how many examples hold one.
    ``instruction``, ``input`` and the training ``output`` are scanned; a verbatim ``prompt`` is not, as
    pre-templated prompts carry special tokens on purpose.
    """
    _check_lengths(max_prompt_length, max_length)
    check_template(template, tokenizer)
    if not examples:
        raise DataError("no examples to encode", "check the data path and split")
    bos = _bos_prefix(tokenizer, template)
    plain = [ex for ex in examples if not ex.turns]
    eos = _eos_id(tokenizer) if plain else None
    prompts = iter(
        _tokenize(tokenizer, [render_prompt(ex, template, tokenizer) for ex in plain]) if plain else []
    )
    responses = iter(_tokenize(tokenizer, [ex.output for ex in plain]) if plain else [])
    _warn_special_token_text(examples, tokenizer)
    stats = EncodeStats(examples=len(examples))
    encoded = []
    for example in examples:
        if example.turns:
            features, p_cut, r_cut = _assemble_conversation(example, tokenizer, max_prompt_length, max_length)
        else:
            features, p_cut, r_cut = _assemble(
                next(prompts), next(responses), bos, eos, max_prompt_length, max_length
            )
        if features is None:
            stats.dropped += 1
            continue
        encoded.append(features)
        stats.kept += 1
        stats.prompt_truncated += p_cut
        stats.response_truncated += r_cut
    logger.info("%s", stats.summary())
    if not encoded:
        raise DataError(
            f"all {stats.examples} examples were dropped: the prompts fill max_length={max_length}",
            "raise max_length above max_prompt_length so every response keeps some tokens",
        )
    return encoded, stats


def _warn_special_token_text(examples: Sequence[Example], tokenizer: Any) -> None:
    """One warning per data file whose examples spell a special token (a substring scan, no tokenising)."""
    specials = {t for t in getattr(tokenizer, "all_special_tokens", ()) if isinstance(t, str) and t}
    if not specials:
        return
    pattern = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
    # file -> [examples, examples holding a special token, (where, field, token) of the first]
    files: dict[str, list] = {}
    for ex in examples:
        file, _, number = ex.source.rpartition(":")
        if not number.isdigit():
            file, number = ex.source, ""
        counts = files.setdefault(file, [0, 0, None])
        counts[0] += 1
        for field, text in (("instruction", ex.instruction), ("input", ex.input), ("output", ex.output)):
            found = pattern.search(text)
            if found:
                counts[1] += 1
                if counts[2] is None:
                    row = "row" if file.endswith(("]", *TABLE_SUFFIXES)) else "line"
                    where = f"{file}, {row} {number}" if number else file or "an example without a source"
                    counts[2] = (where, field, found.group())
                break
    for file, (total, with_special, first) in files.items():
        if with_special:
            where, field, token = first
            logger.warning(
                "%s: %d of %d examples hold the text of a special token, first %s in field %r of %s; the "
                "tokenizer reads it as that special token, not as plain text (edit the data if it is meant "
                "as text)",
                file or "data",
                with_special,
                total,
                repr(token),
                field,
                where,
            )


def encode_prompt(
    example: Example, tokenizer: Any, *, template: str = "alpaca", max_prompt_length: int = 256
) -> list[int]:
    """The prompt ids exactly as training sees them (same BOS rule and left truncation), for generation."""
    _check_lengths(max_prompt_length)
    check_template(template, tokenizer)
    bos = [] if example.turns else _bos_prefix(tokenizer, template)
    (prompt_ids,) = _tokenize(tokenizer, [render_prompt(example, template, tokenizer)])
    return _prompt_part(prompt_ids, bos, max_prompt_length)[0]


def supervised_positions(example: dict[str, list[int]]) -> int:
    """Loss positions of an encoded example: labels after the shift (position 0 predicts nothing)."""
    return sum(1 for label in example["labels"][1:] if label != -100)


def ensure_pad_token(tokenizer: Any) -> int:
    """The pad id for the collator: the tokenizer's own, else EOS (padding is masked, so any id works)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token is None:
        raise DataError(
            "the tokenizer has neither a pad nor an EOS token",
            "set tokenizer.pad_token (or eos_token) before building batches",
        )
    tokenizer.pad_token = tokenizer.eos_token
    logger.info("tokenizer has no pad token; padding with EOS %r (masked out)", tokenizer.eos_token)
    return tokenizer.pad_token_id


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------


class DataCollator:
    """Right-pad a list of encoded examples to the longest one (optionally to a multiple, for tensor cores).

    Position ids are given explicitly so that padded and packed layouts agree on positions.
    """

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None, label_pad_id: int = -100):
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise UsageError(f"pad_to_multiple_of must be at least 1, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.label_pad_id = label_pad_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("DataCollator got an empty batch")
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        with_labels = all("labels" in f for f in features)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "position_ids": []}
        if with_labels:
            batch["labels"] = []
        for f in features:
            n = len(f["input_ids"])
            pad = width - n
            batch["input_ids"].append([*f["input_ids"], *[self.pad_token_id] * pad])
            batch["attention_mask"].append([1] * n + [0] * pad)
            batch["position_ids"].append([*range(n), *[0] * pad])
            if with_labels:
                if len(f["labels"]) != n:
                    raise ValueError(f"labels ({len(f['labels'])}) and input_ids ({n}) differ in length")
                batch["labels"].append([*f["labels"], *[self.label_pad_id] * pad])
        return {key: torch.tensor(rows, dtype=torch.long) for key, rows in batch.items()}


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, *, seed: int, mode: str = "bucket"
) -> list[list[int]]:
    """Index batches covering every example once, grouped by length to waste less compute on padding.

    ``none``: shuffled batches. ``sort``: all examples sorted by length (longest first), batch order
    shuffled. ``bucket``: shuffle, sort within mega-batches of 50 batches, shuffle batch order (keeps
    randomness while cutting most padding). Deterministic for a given seed.
    """
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    if mode not in ("none", "sort", "bucket"):
        raise UsageError(f"unknown length grouping {mode!r}", "use one of: none, sort, bucket")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)  # also randomises ties in the sorts below
    if mode == "sort":
        order.sort(key=lambda i: -lengths[i])
    elif mode == "bucket":
        mega = 50 * batch_size
        order = [
            i
            for s in range(0, len(order), mega)
            for i in sorted(order[s : s + mega], key=lambda i: -lengths[i])
        ]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if mode != "none":
        rng.shuffle(batches)
    return batches


# --------------------------------------------------------------------------------------------------
# Teacher/student tokenizer compatibility
# --------------------------------------------------------------------------------------------------

_PROBE = "Hello, world! Ünïcödé façade 123 4567\n\tdef f(x):  return x ** 2  # ok?"
_SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def check_tokenizers(teacher_tokenizer: Any, student_tokenizer: Any) -> None:
    """Ensure one tokenisation serves teacher and student (same vocabulary, special ids and splitting).

    Token-level distillation compares distributions id by id, so any difference makes the loss wrong.
    """
    teacher, student = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    problem = None
    if teacher != student:
        t_by_id = {i: t for t, i in teacher.items()}
        s_by_id = {i: t for t, i in student.items()}
        first = min(i for i in t_by_id.keys() | s_by_id.keys() if t_by_id.get(i) != s_by_id.get(i))
        shown = [repr(by_id[first]) if first in by_id else "(none)" for by_id in (t_by_id, s_by_id)]
        problem = (
            f"id {first}: teacher {shown[0]} vs student {shown[1]} "
            f"(teacher has {len(teacher)} tokens, student {len(student)})"
        )
    else:
        for name in _SPECIAL_IDS:
            t, s = getattr(teacher_tokenizer, name, None), getattr(student_tokenizer, name, None)
            if t != s:
                problem = f"{name}: teacher {t} vs student {s}"
                break
        else:
            t_ids, s_ids = teacher_tokenizer(_PROBE)["input_ids"], student_tokenizer(_PROBE)["input_ids"]
            if t_ids != s_ids:
                problem = f"same vocabulary but different tokenisation of {_PROBE!r}: {t_ids} vs {s_ids}"
    if problem:
        raise DataError(
            f"teacher and student tokenizers differ: {problem}; token-level distillation needs one tokenizer",
            "pass --cross-tokenizer hybrid (or uld) to distil across tokenizers (see docs/cross_tokenizer.md), "
            "or pick a student from the teacher's model family (same tokenizer), e.g. GPT-2 XL -> GPT-2",
        )


_logged_heads: set[tuple[int, int]] = set()


def shared_vocab_size(tokenizer: Any, *vocab_sizes: int) -> int:
    """How many logits the loss uses: the tokenizer's size, when every model head has at least that many.

    Heads are often padded past the tokenizer (e.g. 152,064 rows for 151,665 tokens); the extra rows are
    never targets and teacher and student may pad differently, so only the first ``len(tokenizer)`` count.
    """
    size = len(tokenizer)
    for head in vocab_sizes:
        if head < size:
            raise DataError(
                f"model head has {head} logits but the tokenizer has {size} tokens",
                "use the tokenizer that belongs to the model, or resize the model's token embeddings",
            )
        if head > size and (head, size) not in _logged_heads:
            _logged_heads.add((head, size))
            logger.info(
                "model head has %d logits but the tokenizer has %d tokens; the loss uses the first %d",
                head,
                size,
                size,
            )
    return size


def resolve_data_root(explicit: str | None = None) -> Path | None:
    """Where the shared data lives: ``explicit``, else ``$TODI_DATA``, else ``../shared/data`` if present."""
    for given, origin in ((explicit, "the data path given"), (os.environ.get("TODI_DATA"), "TODI_DATA")):
        if given:
            path = Path(given).expanduser()
            if not path.is_dir():
                raise DataError(f"{origin} ({path}) is not a folder", "fix the path, or unset TODI_DATA")
            return path
    default = Path.cwd().parent / "shared" / "data"
    return default if default.is_dir() else None
