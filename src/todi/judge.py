"""``todi judge``: compare two models' ``todi eval`` predictions pairwise with an LLM judge.

For every example the judge sees the instruction, its input, optionally the reference answer, and both
models' answers, twice: once with model A's answer shown first (order ``AB``) and once with model B's
first (``BA``). A reply names the better answer as ``[[A]]``, ``[[B]]`` or ``[[C]]`` (a tie); a reply
with none of them, or with two different ones, is *unparseable*: counted and reported, never guessed.
An example's outcome for model A is a win when both orders pick A, a loss when both pick B, and a tie
otherwise (a verdict that flips with the order is a tie, as in MT-bench); ties count 0.5 in the win
rate. Examples with an unparseable reply in either order are left out of the win rate and counted.

Seeds: ``todi eval`` samples every example once per seed. By default the smallest seed both sides hold
for every data set is judged; ``--seeds`` names several, and then an example's score is the mean of its
seeds' outcomes, so the 95% bootstrap interval stays over examples (the unit that varies).

The judge is a local causal LM (``--judge``: transformers, chat template when the tokenizer has one,
greedy, left-padded batches) or an OpenAI-compatible chat-completions server (``--judge-url`` and
``--judge-model``; concurrent requests, retried with exponential backoff and jitter on 429, 5xx,
timeouts and dropped connections, honouring ``Retry-After``; the key comes from an environment variable,
never from the command line, and is never written).

``--out`` holds ``judge.json`` (what is judged, by which judge and prompt), ``judgments.jsonl`` (one
verdict per line, appended as it arrives: a rerun resumes where a killed run stopped and never asks
twice; a line cut short by the kill is dropped), ``results.json``, ``results.md`` and ``win_rate.png``.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import logging
import math
import os
import random
import re
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from todi.errors import TodiError, UsageError
from todi.options import option
from todi.outputs import OutputFolder, read_json
from todi.report import write_text_atomic
from todi.stats import bootstrap_mean_ci

log = logging.getLogger(__name__)

SETTINGS_NAME = "judge.json"
JUDGMENTS_NAME = "judgments.jsonl"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
RESULTS_PNG = "win_rate.png"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
ORDERS = ("AB", "BA")  # which model's answer is shown as Assistant A
OVERALL = "overall"
# A tag followed by "if" is the format line echoed back ('"[[A]]" if assistant A is better'), not a verdict.
_TAG = re.compile(r"\[\[\s*([ABC])\s*\]\](?![\"'”]?\s+if\b)")
_PLACEHOLDERS = ("instruction", "input", "reference", "answer_a", "answer_b")
_SERVER_HINT = (
    "is the server running? pass its base URL, e.g. --judge-url http://localhost:8000/v1 "
    "(vllm serve MODEL) or http://localhost:8080/v1 (llama-server -m FILE.gguf)"
)
Key = tuple[str, int, int, str]  # data set, seed, example index, order


# --------------------------------------------------------------------------------------------------
# The prompt and the verdict parser
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """A judge prompt: system and user message templates (see ``todi/prompts/judge_pairwise.txt``)."""

    system: str
    user: str
    source: str
    sha256: str

    @classmethod
    def load(cls, path: str | None = None) -> Prompt:
        if path:
            try:
                text = Path(path).expanduser().read_text(encoding="utf-8")
            except OSError as err:
                raise UsageError(
                    f"--prompt {path}: {err.strerror or err}", "give a readable text file"
                ) from None
            source = str(path)
        else:
            text = (
                resources.files("todi")
                .joinpath("prompts")
                .joinpath("judge_pairwise.txt")
                .read_text(encoding="utf-8")
            )
            source = "todi/prompts/judge_pairwise.txt"
        sections: dict[str, list[str]] = {}
        current: list[str] | None = None
        for line in text.splitlines():
            header = re.fullmatch(r"==\s*(system|user)\s*==\s*", line)
            if header:
                current = sections.setdefault(header[1], [])
            elif current is not None:
                current.append(line)
        where = f"prompt file {source}"
        if "user" not in sections:
            raise UsageError(f"{where} has no '== user ==' section", "see todi/prompts/judge_pairwise.txt")
        system, user = ("\n".join(sections.get(s, [])).strip() for s in ("system", "user"))
        used = set(re.findall(r"\{(\w+)\}", system + user))
        unknown = sorted(used - set(_PLACEHOLDERS))
        missing = [p for p in ("instruction", "answer_a", "answer_b") if p not in used]
        if unknown or missing:
            what = f"unknown placeholders {unknown}" if unknown else f"no {{{missing[0]}}}"
            raise UsageError(
                f"{where}: {what}", f"use only {', '.join('{' + p + '}' for p in _PLACEHOLDERS)}"
            )
        return cls(system, user, source, hashlib.sha256(text.encode()).hexdigest())

    def render(self, values: Mapping[str, str]) -> tuple[str, str]:
        """The (system, user) messages; a paragraph using an empty {input} or {reference} is left out."""
        return _fill(self.system, values), _fill(self.user, values)


def _fill(template: str, values: Mapping[str, str]) -> str:
    paragraphs = [
        p
        for p in re.split(r"\n\s*\n", template)
        if not any(f"{{{name}}}" in p and not values.get(name) for name in ("input", "reference"))
    ]
    # One pass over the template: text inserted for one placeholder is never read as another.
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m[1], ""), "\n\n".join(paragraphs))


def parse_verdict(text: str) -> str | None:
    """``A``, ``B`` or ``C`` when the reply holds exactly one kind of ``[[X]]`` tag (not counting tags
    followed by "if", an echo of the format line); else None."""
    tags = set(_TAG.findall(text))
    return tags.pop() if len(tags) == 1 else None


def winner(label: str | None, order: str) -> str | None:
    """Which model a label shown in ``order`` picks: ``a``, ``b``, ``tie``, or None (unparseable)."""
    if label is None:
        return None
    if label == "C":
        return "tie"
    first_is_a = order == "AB"
    return "a" if (label == "A") == first_is_a else "b"


# --------------------------------------------------------------------------------------------------
# Reading the predictions `todi eval` wrote
# --------------------------------------------------------------------------------------------------


@dataclass
class Predictions:
    """One model's prediction cells: ``cells[dataset][seed]`` is a ``seed<k>.jsonl`` file."""

    option: str
    name: str
    folder: Path
    cells: dict[str, dict[int, Path]]
    model: dict[str, Any]


def read_predictions(path: str, option: str) -> Predictions:
    """The cells under a ``todi eval --out`` folder holding one model, or under its ``predictions/NAME``."""
    hint = f"give {option} the --out folder of a 'todi eval' run, or its predictions/NAME folder"
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UsageError(f"{option} {path} is not a folder", hint)
    if (folder / "predictions").is_dir():
        models = sorted(
            d for d in (folder / "predictions").iterdir() if d.is_dir() and any(d.glob("*/seed*.jsonl"))
        )
        if len(models) > 1:
            names = ", ".join(d.name for d in models)
            raise UsageError(
                f"{option} {path} holds the predictions of {len(models)} models ({names})",
                f"name one: {option} {folder / 'predictions' / models[0].name}",
            )
        folder = models[0] if models else folder
    cells: dict[str, dict[int, Path]] = {}
    for file in sorted(folder.glob("*/seed*.jsonl")):
        seed = re.fullmatch(r"seed(-?\d+)\.jsonl", file.name)
        if seed:
            cells.setdefault(file.parent.name, {})[int(seed[1])] = file
    if not cells:
        raise UsageError(f"{option} {path} holds no predictions (DATASET/seed<k>.jsonl)", hint)
    try:
        model = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        model = {}
    return Predictions(option, folder.name, folder, cells, model if isinstance(model, dict) else {})


def _read_cell(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("prediction"), str):
                raise ValueError
        except ValueError:
            raise UsageError(
                f"{path} line {number} is not a prediction record of 'todi eval'",
                "rerun todi eval for that model (delete the file to have it recomputed)",
            ) from None
        rows.append(row)
    return rows


def same_datasets(a: Predictions, b: Predictions) -> None:
    """Refuse two sides evaluated on different data sets, naming those only one side has."""
    if set(a.cells) != set(b.cells):
        only_a, only_b = sorted(set(a.cells) - set(b.cells)), sorted(set(b.cells) - set(a.cells))
        what = "; ".join(
            f"only {side.option} has {', '.join(names)}"
            for side, names in ((a, only_a), (b, only_b))
            if names
        )
        raise UsageError(
            f"{a.option} and {b.option} hold predictions for different data sets ({what})",
            "evaluate both models with the same todi eval --data",
        )


def choose_seeds(a: Predictions, b: Predictions, seeds: str | None) -> list[int]:
    """The seeds to judge: ``--seeds`` (every one must be held by both sides for every data set), else
    the smallest seed both hold everywhere."""
    from todi.evaluation import parse_seeds

    same_datasets(a, b)
    datasets = sorted(a.cells)
    if seeds:
        wanted = parse_seeds(seeds)
        for side in (a, b):
            for dataset in datasets:
                lacking = [s for s in wanted if s not in side.cells[dataset]]
                if lacking:
                    held = ", ".join(map(str, sorted(side.cells[dataset])))
                    raise UsageError(
                        f"{side.option} has no predictions of {dataset} for seed {lacking[0]} (it holds {held})",
                        "pick --seeds that both models were evaluated with",
                    )
        return wanted
    common = set.intersection(*(set(side.cells[d]) for side in (a, b) for d in datasets))
    if not common:
        held = "; ".join(f"{side.option} {d}: {sorted(side.cells[d])}" for side in (a, b) for d in datasets)
        raise UsageError(
            f"{a.option} and {b.option} share no seed in every data set ({held})",
            "evaluate both models with a common seed (todi eval --seeds)",
        )
    return [min(common)]


@dataclass(frozen=True)
class Pair:
    """One example answered by both models (one seed)."""

    dataset: str
    seed: int
    index: int
    instruction: str
    input: str
    references: tuple[str, ...]
    answer_a: str
    answer_b: str


def pair_predictions(a: Predictions, b: Predictions, seeds: Sequence[int], limit: int | None) -> list[Pair]:
    """Both sides' answers, example by example; refuses sets that differ, naming where."""
    same_datasets(a, b)
    pairs = []
    for dataset in sorted(a.cells):
        for seed in seeds:
            rows_a, rows_b = _read_cell(a.cells[dataset][seed]), _read_cell(b.cells[dataset][seed])
            if len(rows_a) != len(rows_b):
                raise UsageError(
                    f"{dataset} seed {seed}: {a.option} has {len(rows_a)} examples, {b.option} has {len(rows_b)}",
                    "evaluate both models on the same test file with the same --max-examples",
                )
            for index, (ra, rb) in enumerate(zip(rows_a, rows_b)):
                if limit is not None and index >= limit:
                    break
                for field in ("instruction", "input"):
                    if ra.get(field, "") != rb.get(field, ""):
                        raise UsageError(
                            f"{dataset} seed {seed} example {index}: the {field} differs between {a.option} "
                            f"({_clip(str(ra.get(field)), 60)!r}) and {b.option} ({_clip(str(rb.get(field)), 60)!r})",
                            "judge predictions of the same test file, in the same order",
                        )
                refs = ra.get("references") or []
                pairs.append(
                    Pair(
                        dataset,
                        seed,
                        index,
                        str(ra.get("instruction", "")),
                        str(ra.get("input", "")),
                        tuple(refs) if isinstance(refs, list) else (str(refs),),
                        ra["prediction"],
                        rb["prediction"],
                    )
                )
    return pairs


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# --------------------------------------------------------------------------------------------------
# Items: one judge request each
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    pair: Pair
    order: str
    system: str
    user: str

    @property
    def key(self) -> Key:
        return (self.pair.dataset, self.pair.seed, self.pair.index, self.order)

    @property
    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, {"role": "user", "content": self.user}]

    @property
    def digest(self) -> str:
        """Names what the judge was shown, so a verdict is never reused for changed predictions."""
        return hashlib.sha256(f"{self.system}\0{self.user}".encode()).hexdigest()[:16]


def build_items(pairs: Iterable[Pair], prompt: Prompt, reference: bool) -> list[Item]:
    items = []
    for pair in pairs:
        for order in ORDERS:
            first, second = (
                (pair.answer_a, pair.answer_b) if order == "AB" else (pair.answer_b, pair.answer_a)
            )
            values = {
                "instruction": pair.instruction,
                "input": pair.input,
                "reference": pair.references[0] if reference and pair.references else "",
                "answer_a": first,
                "answer_b": second,
            }
            items.append(Item(pair, order, *prompt.render(values)))
    return items


# --------------------------------------------------------------------------------------------------
# The verdict log: append-only JSONL, resumable
# --------------------------------------------------------------------------------------------------


class VerdictLog:
    """``judgments.jsonl``: one verdict per line, keyed by (data set, seed, example, order)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def load(self) -> dict[Key, dict[str, Any]]:
        """The verdicts on disk; a last line without its newline (a kill mid-write) is cut off the file."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            log.warning(
                "%s: dropping an unfinished last line (an interrupted run); it is judged again", self.path
            )
            with self.path.open("r+b") as file:
                file.truncate(complete)
        records: dict[Key, dict[str, Any]] = {}
        for number, line in enumerate(data[:complete].decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = (
                    str(record["dataset"]),
                    int(record["seed"]),
                    int(record["index"]),
                    str(record["order"]),
                )
            except (ValueError, KeyError, TypeError):
                raise TodiError(
                    f"{self.path} line {number} is not a verdict record",
                    "delete that line (it is judged again) or rerun with --overwrite",
                ) from None
            records.setdefault(key, record)
        return records

    def append(self, record: Mapping[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock, self.path.open("ab") as file:
            file.write(line)  # one write per line: a kill leaves at most one unfinished line


def _parsed(output: str, order: str) -> dict[str, str | None]:
    label = parse_verdict(output)
    return {"label": label, "winner": winner(label, order)}


def verdict_record(item: Item, output: str) -> dict[str, Any]:
    dataset, seed, index, order = item.key
    return {
        "dataset": dataset,
        "seed": seed,
        "index": index,
        "order": order,
        "shown": item.digest,
        **_parsed(output, order),
        "output": output,
    }


# --------------------------------------------------------------------------------------------------
# Judges
# --------------------------------------------------------------------------------------------------

Emit = Callable[[Item, str], None]


class LocalJudge:
    """A causal LM through transformers: chat template when the tokenizer has one, greedy decoding."""

    def __init__(self, path: str, *, config: Config) -> None:
        self.path = path
        self.config = config

    def describe(self) -> dict[str, Any]:
        from todi.models import model_identity

        return {"kind": "local", "model": self.path, "identity": model_identity(self.path)}

    def run(self, items: Sequence[Item], emit: Emit) -> None:
        import torch

        from todi.evaluation import GenerationSettings, complete_batch, eos_token_ids, load_model

        c = self.config
        model, tokenizer = load_model(
            self.path, dtype=c.dtype, device=c.device, trust_remote_code=c.trust_remote_code
        )
        prompts = [encode_judge_prompt(tokenizer, item) for item in items]
        eos_ids = eos_token_ids(model, tokenizer)
        greedy = GenerationSettings(max_new_tokens=c.max_new_tokens, do_sample=False, no_repeat_ngram_size=0)
        kwargs = greedy.generate_kwargs() | {
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": eos_ids or None,
            "use_cache": True,
        }
        eos = torch.tensor(eos_ids or [-1], device=next(model.parameters()).device)
        # Longest first, so that batches share a length and an out-of-memory batch fails at once.
        order = sorted(range(len(items)), key=lambda i: -len(prompts[i]))
        with _bar(len(items), "judge") as bar, torch.inference_mode():
            for start in range(0, len(order), c.batch_size):
                rows = order[start : start + c.batch_size]
                texts, _ = complete_batch(model, tokenizer, [prompts[i] for i in rows], kwargs, eos)
                for i, text in zip(rows, texts):
                    emit(items[i], text)
                bar.update(len(rows))


def encode_judge_prompt(tokenizer: Any, item: Item) -> list[int]:
    """The judge's input ids: its chat template with a generation prompt, else system and user as text."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(item.messages, add_generation_prompt=True, tokenize=False)
        except Exception:  # a template without a system role (Gemma's) raises; fold the system text in
            merged = [{"role": "user", "content": "\n\n".join(m["content"] for m in item.messages)}]
            text = tokenizer.apply_chat_template(merged, add_generation_prompt=True, tokenize=False)
        # The template spells BOS itself; the tokenizer must not add another.
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "\n\n".join(m["content"] for m in item.messages) + "\n\n"
    return tokenizer(text)["input_ids"]


class _Retry(Exception):
    """A failure worth another attempt; ``wait``: the server's Retry-After, if it sent one."""

    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.wait = reason, wait


class HttpJudge:
    """An OpenAI-compatible chat-completions server (vLLM, llama.cpp's llama-server, a hosted API)."""

    MAX_WAIT = 120.0  # longest pause between two attempts, Retry-After included

    def __init__(self, url: str, model: str, *, key: str | None, config: Config) -> None:
        base = url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model = model
        self._key = key  # held only here, sent only in the Authorization header
        self.config = config

    def describe(self) -> dict[str, Any]:
        return {"kind": "http", "model": self.model, "url": self.url}

    def run(self, items: Sequence[Item], emit: Emit) -> None:
        pool = ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="judge")
        first_error: BaseException | None = None
        try:
            futures = {pool.submit(self.complete, item.messages): item for item in items}
            with _bar(len(items), "judge") as bar:
                for future in as_completed(futures):
                    if future.cancelled():
                        continue
                    try:
                        text = future.result()
                    except Exception as err:
                        # Stop asking, but keep every reply already paid for (those still in flight too).
                        if first_error is None:
                            first_error = err
                            for other in futures:
                                other.cancel()
                        continue
                    emit(futures[future], text)
                    bar.update(1)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if first_error is not None:
            raise first_error

    def complete(self, messages: list[dict[str, str]]) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": messages,
                "temperature": 0,
                "max_tokens": self.config.max_new_tokens,
            }
        ).encode("utf-8")
        attempts = self.config.retries + 1
        for attempt in range(attempts):
            try:
                return self._post(body)
            except _Retry as retry:
                if attempt == attempts - 1:
                    raise TodiError(
                        f"the judge at {self.url} failed {attempts} times, last: {retry.reason}",
                        _SERVER_HINT
                        if "HTTP" not in retry.reason
                        else "try again later, or lower --concurrency",
                    ) from None
                backoff = self.config.retry_wait * 2**attempt
                wait = retry.wait if retry.wait is not None else backoff / 2 + random.uniform(0, backoff / 2)
                log.debug("judge request: %s; retrying in %.2f s", retry.reason, wait)
                time.sleep(min(wait, self.MAX_WAIT))
        raise AssertionError("unreachable")

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json", "User-Agent": "todi-judge"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            if err.code == 429 or err.code >= 500:
                raise _Retry(f"HTTP {err.code}", _retry_after(err.headers.get("Retry-After"))) from None
            detail = _clip(err.read().decode("utf-8", "replace").replace("\n", " "), 160)
            hint = {
                401: f"set the key in ${DEFAULT_KEY_ENV} or the variable --judge-key-env names",
                403: "the key is not allowed to use this model",
                404: "check --judge-url (the base URL, e.g. http://localhost:8000/v1) and --judge-model",
            }.get(err.code, "check --judge-url, --judge-model and the server's log")
            raise TodiError(f"the judge at {self.url} answered HTTP {err.code}: {detail}", hint) from None
        except urllib.error.URLError as err:
            raise _Retry(f"cannot connect ({getattr(err.reason, 'strerror', None) or err.reason})") from None
        except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as err:
            raise _Retry(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__) from None
        try:
            payload = json.loads(raw)
        except ValueError:
            raise _Retry("the reply is not JSON (cut short?)") from None
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise TodiError(
                f"the judge at {self.url} replied without choices[0].message.content: "
                f"{_clip(raw.decode('utf-8', 'replace'), 160)}",
                "--judge-url must serve the OpenAI chat-completions API",
            ) from None
        return content or ""


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (a number of seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _bar(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="verdict", dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------

_SCORE = {"a": 1.0, "tie": 0.5, "b": 0.0}


def outcome(first: str | None, second: str | None) -> str | None:
    """An example's outcome for model A from its two verdicts: agreement wins, a flip is a tie."""
    if first is None or second is None:
        return None
    return first if first == second else "tie"


def _words(text: str) -> int:
    return len(text.split())


def summarize(pairs: Sequence[Pair], records: Mapping[Key, Mapping[str, Any]]) -> dict[str, Any]:
    """Win/tie/loss counts, win rate with its 95% bootstrap interval over examples, position and
    length statistics for a group of pairs (every verdict of ``pairs`` must be in ``records``)."""
    counts = dict.fromkeys(("wins", "ties", "losses", "inconsistent", "unparseable_pairs"), 0)
    orders = {o: dict.fromkeys(("a", "b", "tie", "unparseable"), 0) for o in ORDERS}
    position = dict.fromkeys(("first", "second", "tie"), 0)
    per_example: dict[tuple[str, int], list[float]] = {}
    longer = {"decisive": 0, "longer_won": 0}
    for pair in pairs:
        verdicts = {o: records[(pair.dataset, pair.seed, pair.index, o)]["winner"] for o in ORDERS}
        for order, won in verdicts.items():
            orders[order][won or "unparseable"] += 1
            if won == "tie":
                position["tie"] += 1
            elif won is not None:
                shown_first = "a" if order == "AB" else "b"
                position["first" if won == shown_first else "second"] += 1
        result = outcome(verdicts["AB"], verdicts["BA"])
        if result is None:
            counts["unparseable_pairs"] += 1
            continue
        counts[{"a": "wins", "b": "losses", "tie": "ties"}[result]] += 1
        counts["inconsistent"] += verdicts["AB"] != verdicts["BA"]
        per_example.setdefault((pair.dataset, pair.index), []).append(_SCORE[result])
        len_a, len_b = _words(pair.answer_a), _words(pair.answer_b)
        if result != "tie" and len_a != len_b:
            longer["decisive"] += 1
            longer["longer_won"] += (result == "a") == (len_a > len_b)
    scores = [statistics.fmean(s) for s in per_example.values()]
    win_rate, low, high = bootstrap_mean_ci(scores) if scores else (None, None, None)
    decisive = position["first"] + position["second"]
    judged = len(pairs) - counts["unparseable_pairs"]
    return {
        "pairs": len(pairs),
        "examples": len(scores),
        **counts,
        "win_rate": win_rate,
        "ci95": [low, high],
        "unparseable_verdicts": sum(o["unparseable"] for o in orders.values()),
        "position": {
            **position,
            "first_share": position["first"] / decisive if decisive else None,
            "consistent_share": (judged - counts["inconsistent"]) / judged if judged else None,
        },
        "orders": orders,
        "length": {
            "a_words": statistics.fmean(_words(p.answer_a) for p in pairs) if pairs else None,
            "b_words": statistics.fmean(_words(p.answer_b) for p in pairs) if pairs else None,
            **longer,
            "longer_won_share": longer["longer_won"] / longer["decisive"] if longer["decisive"] else None,
        },
    }


def example_verdicts(
    pairs: Sequence[Pair], records: Mapping[Key, Mapping[str, Any]], n: int = 4
) -> list[dict]:
    """A few judged examples to read: parseable ones first, so the reader sees the judge reasoning."""
    chosen = sorted(
        pairs, key=lambda p: sum(records[(p.dataset, p.seed, p.index, o)]["label"] is None for o in ORDERS)
    )[:n]
    return [
        {
            "dataset": p.dataset,
            "seed": p.seed,
            "index": p.index,
            "instruction": _clip(p.instruction, 200),
            "answer_a": _clip(p.answer_a, 200),
            "answer_b": _clip(p.answer_b, 200),
            "verdicts": {
                o: {
                    "winner": records[(p.dataset, p.seed, p.index, o)]["winner"],
                    "output": _clip(records[(p.dataset, p.seed, p.index, o)]["output"], 300),
                }
                for o in ORDERS
            },
        }
        for p in chosen
    ]


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def markdown(results: Mapping[str, Any]) -> str:
    a, b = results["a"]["name"], results["b"]["name"]
    judge = results["judge"]
    lines = [
        f"# Pairwise judge: {a} (A) vs {b} (B)",
        "",
        f"Judge: {judge['model']} ({judge['kind']}); prompt {results['prompt']['source']}; "
        f"seeds {', '.join(map(str, results['seeds']))}; both orders per example.",
        "",
        "| data set | examples | A wins | ties | A losses | win rate of A | 95% CI | flips | unparseable "
        "| mean words A / B |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, g in results["groups"].items():
        low, high = g["ci95"]
        ci = "–" if low is None else f"{100 * low:.1f}–{100 * high:.1f}%"
        words = g["length"]
        lines.append(
            f"| {name} | {g['examples']} | {g['wins']} | {g['ties']} | {g['losses']} | {_pct(g['win_rate'])} "
            f"| {ci} | {g['inconsistent']} | {g['unparseable_verdicts']} of {2 * g['pairs']} verdicts "
            f"| {_num(words['a_words'])} / {_num(words['b_words'])} |"
        )
    g = results["groups"][OVERALL]
    pos, length = g["position"], g["length"]
    lines += [
        "",
        "Win rate: ties (either a [[C]] verdict or a verdict that flips with the order) count 0.5; examples "
        "with an unparseable verdict in either order are left out (counted under unparseable). "
        "CI: percentile bootstrap over examples (todi.stats).",
        "",
        "## Position bias",
        "",
        f"Of {pos['first'] + pos['second']} decisive verdicts, the answer shown first won "
        f"{_pct(pos['first_share'])} (unbiased: 50%); {pos['tie']} verdicts were [[C]]. "
        f"Both orders agreed on {_pct(pos['consistent_share'])} of the parseable examples.",
        "",
        "| order | A wins | B wins | tie | unparseable |",
        "|---|---|---|---|---|",
        *(
            f"| {'A shown first' if o == 'AB' else 'B shown first'} | {c['a']} | {c['b']} | {c['tie']} "
            f"| {c['unparseable']} |"
            for o, c in g["orders"].items()
        ),
        "",
        "## Length",
        "",
        f"Mean answer length: A {_num(length['a_words'])} words, B {_num(length['b_words'])} words. Of "
        f"{length['decisive']} decisive outcomes between answers of different length, the longer answer won "
        f"{_pct(length['longer_won_share'])}.",
        "",
        "## Examples",
        "",
    ]
    for ex in results["examples"]:
        lines += [
            f"**{ex['dataset']} #{ex['index']} (seed {ex['seed']})**: {ex['instruction']!r}",
            f"- A: {ex['answer_a']!r}",
            f"- B: {ex['answer_b']!r}",
            *(
                f"- judge, {'A' if o == 'AB' else 'B'} shown first -> {v['winner'] or 'unparseable'}: "
                f"{v['output']!r}"
                for o, v in ex["verdicts"].items()
            ),
            "",
        ]
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def plot(results: Mapping[str, Any], path: Path) -> None:
    """Win rate of A per data set and overall, with the 95% interval; the line marks a draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = list(results["groups"])
    rates = [results["groups"][g]["win_rate"] for g in groups]
    means = [math.nan if r is None else r for r in rates]
    errors = [
        [0.0, 0.0]
        if r is None
        else [r - results["groups"][g]["ci95"][0], results["groups"][g]["ci95"][1] - r]
        for g, r in zip(groups, rates)
    ]
    fig = Figure(figsize=(max(4.0, 1.3 * len(groups) + 2), 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(groups)), means, 0.6, yerr=list(zip(*errors)), capsize=4, color="tab:blue")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"win rate of {results['a']['name']}")
    ax.set_title(
        f"{results['a']['name']} vs {results['b']['name']} (judge {results['judge']['model']})",
        fontsize="small",
    )
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# The `todi judge` command
# --------------------------------------------------------------------------------------------------


@dataclass
class Config:
    """Compare two models' `todi eval` predictions with an LLM judge, in both orders; win rate with a CI.

    Writes judge.json, judgments.jsonl (resumable), results.json, results.md and win_rate.png in --out.
    """

    a: str = option(
        "", "model A's predictions: a 'todi eval' --out folder (one model) or its predictions/NAME"
    )
    b: str = option("", "model B's predictions, as --a")
    out: str = option("", "output folder for the verdicts and results (required)")
    judge: str | None = option(None, "local judge: a causal LM folder, GGUF file or Hub id (transformers)")
    judge_url: str | None = option(
        None, "OpenAI-compatible server: its base URL (http://localhost:8000/v1) or /chat/completions URL"
    )
    judge_model: str | None = option(None, "the model name to ask the --judge-url server for")
    judge_key_env: str | None = option(
        None,
        f"environment variable holding the API key (default: ${DEFAULT_KEY_ENV} when set; local servers need none)",
    )
    prompt: str | None = option(
        None, "judge prompt file (default: todi's MT-bench-style prompt; docs/judge.md)"
    )
    reference: bool = option(
        True, "show the judge the first reference answer (--no-reference to leave it out)"
    )
    seeds: str | None = option(
        None, "eval sampling seeds to judge (default: the smallest seed both sides hold)"
    )
    limit: int | None = option(None, "judge only the first N examples of each data set")
    max_new_tokens: int = option(512, "longest judge reply, in tokens")
    batch_size: int = option(8, "local judge: prompts generated together")
    dtype: str = option("auto", "local judge: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    device: str = option("auto", "local judge: auto, cpu, cuda or cuda:N")
    trust_remote_code: bool = option(False, "local judge: allow model code from the model folder/Hub")
    concurrency: int = option(8, "HTTP judge: requests in flight at once")
    timeout: float = option(120.0, "HTTP judge: seconds to wait for one reply")
    retries: int = option(6, "HTTP judge: retries after a 429, a 5xx, a timeout or a dropped connection")
    retry_wait: float = option(1.0, "HTTP judge: first backoff in seconds, doubled per retry, with jitter")
    overwrite: bool = option(False, "judge afresh, replacing the verdicts in --out (default: resume them)")

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse invalid options before anything is read or loaded."""
        if not self.out:
            raise UsageError("--out is required", "give the folder for the verdicts, e.g. --out judge/a-vs-b")
        if not self.a or not self.b:
            raise UsageError("--a and --b are required", "give the --out folders of two 'todi eval' runs")
        if bool(self.judge) == bool(self.judge_url):
            raise UsageError(
                "give exactly one judge: --judge (a local model) or --judge-url (a server)",
                "e.g. --judge HuggingFaceTB/SmolLM2-1.7B-Instruct, or --judge-url http://localhost:8000/v1 "
                "--judge-model NAME",
            )
        if self.judge_url:
            if not self.judge_model:
                raise UsageError("--judge-url needs --judge-model", "name the model the server serves")
            if not re.match(r"https?://", self.judge_url):
                raise UsageError(f"--judge-url {self.judge_url} is not an http(s) URL", _SERVER_HINT)
        if self.judge_key_env and not os.environ.get(self.judge_key_env):
            raise UsageError(
                f"--judge-key-env names ${self.judge_key_env}, which is not set",
                f"export {self.judge_key_env}=... (the key is never taken from the command line)",
            )
        problems = [
            f"{name} must be at least 1, got {value}"
            for name, value in (
                ("--limit", self.limit if self.limit is not None else 1),
                ("--max-new-tokens", self.max_new_tokens),
                ("--batch-size", self.batch_size),
                ("--concurrency", self.concurrency),
            )
            if value < 1
        ]
        if self.retries < 0 or self.retry_wait < 0 or not self.timeout > 0:
            problems.append("--retries and --retry-wait must not be negative, --timeout must be positive")
        if problems:
            raise UsageError("; ".join(problems))
        if self.seeds:
            from todi.evaluation import parse_seeds

            parse_seeds(self.seeds)
        Prompt.load(self.prompt)

    def api_key(self) -> str | None:
        return os.environ.get(self.judge_key_env or DEFAULT_KEY_ENV) or None


def _settings(config: Config, judge: dict[str, Any], prompt: Prompt, a: Predictions, b: Predictions) -> dict:
    return {
        "judge": judge,
        "prompt": {"source": prompt.source, "sha256": prompt.sha256},
        "reference": config.reference,
        "max_new_tokens": config.max_new_tokens,
        "a": {"name": a.name, "predictions": str(a.folder), "model": a.model},
        "b": {"name": b.name, "predictions": str(b.folder), "model": b.model},
        # The key's variable, never its value.
        "key_env": (config.judge_key_env or DEFAULT_KEY_ENV) if config.judge_url else None,
    }


# What must not change between a run and its resumption: the verdicts would mix two judges or prompts.
_LOCKED = {
    "judge kind": lambda s: s["judge"]["kind"],
    "judge model": lambda s: s["judge"]["model"],
    "judge weights": lambda s: s["judge"].get("identity"),
    "prompt": lambda s: s["prompt"]["sha256"],
    "--reference": lambda s: s["reference"],
    "--max-new-tokens": lambda s: s["max_new_tokens"],
}


def _check_resume(folder: Path, settings: Mapping[str, Any]) -> None:
    path = folder / SETTINGS_NAME
    if not path.exists() or not (folder / JUDGMENTS_NAME).exists():
        return
    earlier = read_json(path)
    try:
        changed = [name for name, get in _LOCKED.items() if get(earlier) != get(settings)]
    except (KeyError, TypeError):
        raise UsageError(
            f"{path} is not a judge settings file this todi can read", "--overwrite to judge afresh"
        ) from None
    if changed:
        raise UsageError(
            f"{folder} holds verdicts made with another {', '.join(changed)}",
            "--overwrite to judge afresh, or choose another --out",
        )


def _known(records: Mapping[Key, Mapping[str, Any]], items: Sequence[Item], path: Path) -> list[Item]:
    """The items still to judge; refuses a verdict on disk for a prompt other than the one built now."""
    todo = []
    for item in items:
        record = records.get(item.key)
        if record is None:
            todo.append(item)
        elif record.get("shown") != item.digest:
            dataset, seed, index, order = item.key
            raise UsageError(
                f"{path} holds a verdict on {dataset} seed {seed} example {index} ({order}) for other answers "
                "than the predictions now hold",
                "--overwrite to judge the new predictions afresh, or choose another --out",
            )
    return todo


def run(config: Config) -> None:
    prompt = Prompt.load(config.prompt)
    a, b = read_predictions(config.a, "--a"), read_predictions(config.b, "--b")
    seeds = choose_seeds(a, b, config.seeds)
    pairs = pair_predictions(a, b, seeds, config.limit)
    items = build_items(pairs, prompt, config.reference)
    if config.judge_url:
        judge: LocalJudge | HttpJudge = HttpJudge(
            config.judge_url, config.judge_model or "", key=config.api_key(), config=config
        )
    else:
        judge = LocalJudge(config.judge or "", config=config)
    settings = _settings(config, judge.describe(), prompt, a, b)
    inputs = {"--a": config.a, "--b": config.b, "--judge": config.judge, "--prompt": config.prompt}
    folder = OutputFolder(config.out, "judge", inputs=inputs, overwrite=config.overwrite)
    with folder.claim(reuse=True):
        out = folder.path
        if not config.overwrite:
            _check_resume(out, settings)
        folder.replace_old()
        write_text_atomic(out / SETTINGS_NAME, json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
        verdicts = VerdictLog(out / JUDGMENTS_NAME)
        # Verdicts are parsed again from the judge's stored replies, so results always follow this parser.
        records = {k: {**r, **_parsed(r.get("output", ""), k[3])} for k, r in verdicts.load().items()}
        todo = _known(records, items, verdicts.path)
        log.info(
            "%d examples x %d seed(s) x 2 orders = %d verdicts; %d already in %s",
            len({(p.dataset, p.index) for p in pairs}),
            len(seeds),
            len(items),
            len(items) - len(todo),
            verdicts.path,
        )

        def emit(item: Item, output: str) -> None:
            record = verdict_record(item, output)
            verdicts.append(record)
            records[item.key] = record

        if todo:
            judge.run(todo, emit)
        results = {
            "a": settings["a"],
            "b": settings["b"],
            "judge": settings["judge"],
            "prompt": settings["prompt"],
            "reference": config.reference,
            "seeds": seeds,
            "limit": config.limit,
            "groups": {
                **{d: summarize([p for p in pairs if p.dataset == d], records) for d in sorted(a.cells)},
                OVERALL: summarize(pairs, records),
            },
            "examples": example_verdicts(pairs, records),
        }
        write_text_atomic(out / RESULTS_JSON, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        text = markdown(results)
        write_text_atomic(out / RESULTS_MD, text)
        plot(results, out / RESULTS_PNG)
    print(text.split("\n## ")[0].rstrip())
