"""The data formats todi reads besides JSON lines: table files, column names, chat conversations.

Files: ``.parquet``, ``.csv``, ``.tsv`` and ``.arrow`` are read through ``datasets`` (as ``load_dataset``
reads them), each row one record; a bad row is named ``FILE, row N`` (N counts from 1, a CSV header is
not a row). Records, whatever file they come from:

- instruction form (Alpaca): ``instruction``, optional ``input``, ``output``; databricks-dolly-15k's
  ``context`` / ``response`` are read as ``input`` / ``output`` when those are absent;
- a pre-templated ``prompt`` with an ``output`` (todi's verbatim prompt) or a ``completion`` (TRL's
  prompt-completion form): both strings, or both lists of chat messages (conversational
  prompt-completion: the loss covers the completion's assistant messages only);
- ``messages``: a list of ``{"role", "content"}`` chat messages (TRL's conversational form, any number of
  turns, system prompt included): rendered with the tokenizer's chat template, the loss covers every
  assistant message, as TRL's ``assistant_only_loss=True`` does.

``--columns FIELD=COLUMN,...`` reads todi's FIELD from the data's COLUMN (e.g.
``input=context,output=response``, ``messages=conversation``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from todi.errors import DataError, UsageError

__all__ = [
    "FIELDS",
    "TABLE_SUFFIXES",
    "Turn",
    "check_surrogates",
    "conversation",
    "json_type",
    "parse_columns",
    "read_table",
]

TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow"}
"""File suffix -> the ``datasets`` builder that reads it."""

FIELDS = ("instruction", "input", "output", "prompt", "completion", "messages")
"""The record fields todi reads; ``--columns`` may point each at another column."""

DOLLY_NAMES = {"input": "context", "output": "response"}
"""databricks-dolly-15k's names for ``input`` / ``output``, used when a record has ``instruction`` and
``response`` but no ``output``."""

ASSISTANT = "assistant"

_SURROGATE = re.compile(r"[\ud800-\udfff]")


class Turn(NamedTuple):
    """One chat message; ``train``: its tokens carry the loss (an assistant message to learn)."""

    role: str
    content: str
    train: bool


def parse_columns(text: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"input=context,output=response"`` (or a mapping, as YAML gives it) -> {field: column}."""
    if not text:
        return {}
    pairs = list(text.items()) if isinstance(text, Mapping) else []
    if not pairs:
        for item in str(text).split(","):
            field, sep, column = item.partition("=")
            if not sep or not field.strip() or not column.strip():
                raise UsageError(
                    f"--columns: {item.strip()!r} is not FIELD=COLUMN",
                    "e.g. --columns input=context,output=response",
                )
            pairs.append((field.strip(), column.strip()))
    columns: dict[str, str] = {}
    for field, column in pairs:
        if field not in FIELDS:
            raise UsageError(
                f"--columns: unknown field {field!r}", f"the fields todi reads are: {', '.join(FIELDS)}"
            )
        if field in columns:
            raise UsageError(f"--columns: field {field!r} is given twice", "name each field once")
        columns[field] = str(column)
    return columns


def read_table(path: Path, max_examples: int | None = None) -> list[dict[str, Any]]:
    """The rows of a parquet / CSV / TSV / Arrow file as records; an unreadable file names itself."""
    suffix = path.suffix.lower()
    kind = TABLE_SUFFIXES[suffix]
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path}: reading {suffix} files needs the 'datasets' package, which is not installed",
            "pip install datasets, or convert the file to .jsonl",
        ) from None
    options: dict[str, Any] = {}
    try:
        if kind == "csv":
            # Every cell as text: a numeric answer stays "42", an empty cell "" rather than NaN.
            sep = "\t" if suffix == ".tsv" else ","
            header = _csv_header(path, sep)
            features = datasets.Features({name: datasets.Value("string") for name in header})
            options = {"sep": sep, "na_filter": False, "features": features}
        table = datasets.load_dataset(kind, data_files=str(path), split="train", **options)
    except Exception as err:  # pyarrow / pandas parse errors, wrapped by datasets: all mean "bad file"
        cause = err.__cause__ or err
        reason = (f"{type(cause).__name__}: {cause}".strip().splitlines() or [""])[0][:300]
        raise DataError(
            f"{path}: cannot read it as a {suffix} file ({reason})",
            f"check that the file is a valid {suffix[1:]} file (its suffix says which reader todi uses), "
            "or convert it to .jsonl",
        ) from err
    if max_examples is not None:
        table = table.select(range(min(max_examples, len(table))))
    return list(table)


def _csv_header(path: Path, sep: str) -> list[str]:
    import csv

    with path.open(encoding="utf-8-sig", newline="") as file:
        return next(csv.reader(file, delimiter=sep), [])


def json_type(value: Any) -> str:
    """How a value reads in an error message ("a number", "null", ...)."""
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "an object"
    return names.get(type(value), type(value).__name__)


def check_surrogates(text: str, where: str, field: str) -> None:
    """Valid JSON may escape half a UTF-16 surrogate pair ("\\ud800"); no tokenizer can encode that."""
    found = _SURROGATE.search(text)
    if found:
        raise DataError(
            f"{where}: field {field!r} holds a lone surrogate \\u{ord(found.group()):04x} at character "
            f"{found.start() + 1}, which is not valid Unicode text and cannot be encoded as UTF-8",
            "fix or drop that character (half of a \\uXXXX\\uXXXX pair, often from text cut inside an emoji)",
        )


_MESSAGE_HINT = 'each message is an object {"role": "user" | "assistant" | "system" | ..., "content": "text"}'


def conversation(value: Any, where: str, field: str, *, train: bool) -> list[Turn]:
    """Validate a list of chat messages; with ``train`` its assistant messages carry the loss."""
    if not isinstance(value, (list, tuple)):
        raise DataError(
            f"{where}: field {field!r} is {json_type(value)}, expected a list of messages", _MESSAGE_HINT
        )
    if not value:
        raise DataError(f"{where}: field {field!r} is an empty list", "give at least one message")
    turns = []
    for i, message in enumerate(value):
        name = f"{field}[{i}]"
        if not isinstance(message, Mapping):
            raise DataError(
                f"{where}: field {name!r} is {json_type(message)}, expected an object", _MESSAGE_HINT
            )
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role.strip():
            shown = "missing" if "role" not in message else f"{json_type(role)}, expected a role name"
            raise DataError(f"{where}: field '{name}.role' is {shown}", _MESSAGE_HINT)
        if not isinstance(content, str):
            shown = "missing" if "content" not in message else f"{json_type(content)}, expected a string"
            raise DataError(
                f"{where}: field '{name}.content' is {shown}",
                _MESSAGE_HINT + " (todi trains on text messages only)",
            )
        check_surrogates(content, where, f"{name}.content")
        trained = train and role == ASSISTANT
        if trained and not content.strip():
            raise DataError(
                f"{where}: field '{name}.content' is empty",
                "every assistant message is trained on and needs text; fill it in or drop the record",
            )
        turns.append(Turn(role, content, trained))
    return turns
