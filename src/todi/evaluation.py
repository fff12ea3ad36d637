"""Evaluation as in the ToDi paper: sample answers to instruction-following test sets, score ROUGE-L.

Protocol (MiniLLM / DistiLLM / ToDi): the training prompt template and truncation, pure sampling
(temperature 1, top-p 1, top-k 0) with ``no_repeat_ngram_size=6``, up to 256 new tokens, one run per seed
(10, 20, 30, 40, 50); ROUGE-L F-measure (``rouge_score``, stemmed), best over an example's references,
averaged over examples, x100; reported as mean ± std over seeds.

``todi eval`` writes, under ``--out``::

    predictions/<model>/<dataset>/seed<k>.jsonl   one line per example (the finished "cells")
    predictions/<model>/model.json                the model the cells are of: its path and content key
    predictions/settings.json                     decoding settings the cells were produced with
    results.json, results.md, rougeL.png          summary over seeds and datasets (see todi.report)

A rerun skips cells whose predictions file is complete, so an interrupted evaluation resumes; cells are
reused only for the model they were made with (``model.json``: another model, or the same path after
retraining, is refused rather than given the old answers). ``--out`` is a todi output folder
(:mod:`todi.outputs`): locked while a command writes it, and never a folder of anything else.
The library functions (``generate``, ``evaluate_model``, ``rouge_l``) serve dev-set scoring in training.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from todi import report
from todi.data import (
    DataError,
    Example,
    check_template,
    encode_prompt,
    ensure_pad_token,
    load_examples,
    resolve_data_root,
)
from todi.errors import UsageError
from todi.formats import TABLE_SUFFIXES, parse_columns
from todi.models import load_causal_lm, load_tokenizer, model_identity, resolve_dtype
from todi.options import option
from todi.outputs import OutputFolder

log = logging.getLogger(__name__)

PAPER_SEEDS = "10,20,30,40,50"
PAPER_DATASETS = "dolly,self-inst,vicuna"
MODEL_RECORD = "model.json"


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure x100 of ``prediction``, the best over ``references``."""
    if isinstance(references, str):  # a bare string would be scored character by character
        references = [references]
    if not references:
        raise ValueError("rouge_l needs at least one reference")
    scorer = _scorer()
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def score_predictions(predictions: Sequence[str], examples: Sequence[Example]) -> tuple[float, list[float]]:
    """Mean ROUGE-L x100 over examples (NaN when there are none) and the per-example scores."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    scores = [rouge_l(p, ex.references) for p, ex in zip(predictions, examples)]
    return (math.fsum(scores) / len(scores) if scores else math.nan), scores


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


@dataclass
class GenerationSettings:
    """Decoding settings; the defaults are the paper's. ``do_sample=False`` is greedy decoding."""

    max_new_tokens: int = 256
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    no_repeat_ngram_size: int = 6
    batch_size: int = 8

    def validate(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be at least 1, got {self.batch_size}")
        if self.do_sample and not self.temperature > 0:
            problems.append(f"temperature must be above 0 when sampling, got {self.temperature}")
        if self.do_sample and not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.no_repeat_ngram_size < 0:
            problems.append("top_k and no_repeat_ngram_size must be 0 (off) or positive")
        if problems:
            raise UsageError("; ".join(problems), "the paper's settings are the defaults")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate``; they override ``model.generation_config`` per call."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
            # Neutralise a checkpoint's own repetition penalty (common in instruct configs) so every
            # model is decoded under the same protocol.
            "repetition_penalty": 1.0,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


def _model_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends an answer: the model's generation config may list several (e.g. <|im_end|>)."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def left_pad(
    prompts: Sequence[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding: every row's last prompt token sits in the last column, where generation continues."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def continue_prompts(
    generate: Callable[..., torch.Tensor],
    prompts: Sequence[list[int]],
    eos: Sequence[int] | torch.Tensor,
    *,
    device: torch.device,
    **kwargs: Any,
) -> list[list[int]]:
    """One left-padded ``generate(**kwargs)`` call continuing each prompt (token ids): each row's new ids up
    to and including its first id in ``eos``. ``kwargs`` hold ``pad_token_id``; the caller holds the RNG
    and the grad / inference mode."""
    input_ids, attention_mask = left_pad(prompts, kwargs["pad_token_id"], device)
    output = generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    new = output[:, input_ids.shape[1] :]
    # An answer ends at its first EOS (inclusive); what follows is padding of finished rows.
    is_eos = torch.isin(new, torch.as_tensor(eos, device=new.device))
    lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, new.shape[1]).tolist()
    return [ids[:n] for ids, n in zip(new.tolist(), lengths)]


def complete_batch(
    model: Any, tokenizer: Any, prompts: Sequence[list[int]], kwargs: dict[str, Any], eos: torch.Tensor
) -> tuple[list[str], int]:
    """:func:`continue_prompts` with ``model.generate``, decoded: each row's text up to its first EOS,
    stripped, and the number of new tokens."""
    answers = continue_prompts(model.generate, prompts, eos, device=_model_device(model), **kwargs)
    texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
    return [text.strip() for text in texts], sum(map(len, answers))


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the sampler without disturbing the caller's RNG streams (a training loop's shuffling)."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _sample(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    settings: GenerationSettings,
    seed: int,
    template: str,
    max_prompt_length: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Answers in the order of ``examples``; ``on_batch(examples_done, new_tokens)`` reports progress."""
    settings.validate()
    if not examples:
        return []
    pad_id = ensure_pad_token(tokenizer)
    eos_ids = eos_token_ids(model, tokenizer)
    if not eos_ids:
        log.warning(
            "neither the model nor the tokenizer names an EOS token: every answer runs to max_new_tokens"
        )
    prompts = [
        encode_prompt(ex, tokenizer, template=template, max_prompt_length=max_prompt_length)
        for ex in examples
    ]
    # Longest prompts first: batches of similar length waste less work on padding, and a batch too big
    # for memory fails at once rather than at the end. Stable, so the order is fixed for a given data set.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    kwargs = settings.generate_kwargs() | {
        "pad_token_id": pad_id,
        "eos_token_id": eos_ids or None,
        "use_cache": True,
    }
    device = _model_device(model)
    eos = torch.tensor(eos_ids or [-1], device=device)
    answers = [""] * len(examples)
    was_training = model.training
    model.eval()  # dropout off; a training loop gets its mode back below
    try:
        with _seeded(seed, device), torch.inference_mode():
            for start in range(0, len(order), settings.batch_size):
                rows = order[start : start + settings.batch_size]
                texts, new_tokens = complete_batch(model, tokenizer, [prompts[i] for i in rows], kwargs, eos)
                for i, text in zip(rows, texts):
                    answers[i] = text
                if on_batch:
                    on_batch(len(rows), new_tokens)
    finally:
        model.train(was_training)
    return answers


@contextmanager
def _progress(total: int, desc: str, disable: bool = False) -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar over examples that shows generated tokens per second; yields its update(examples, tokens).

    Log lines are routed through the bar meanwhile, so they do not break it.
    """
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    start, tokens = time.perf_counter(), 0

    def update(examples: int, new_tokens: int) -> None:
        nonlocal tokens
        tokens += new_tokens
        bar.set_postfix_str(f"{tokens / max(time.perf_counter() - start, 1e-9):.0f} tok/s", refresh=False)
        bar.update(examples)

    with tqdm(total=total, desc=desc, unit="ex", disable=disable, dynamic_ncols=True) as bar:
        if disable:
            yield update
        else:
            with logging_redirect_tqdm():
                yield update


def generate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    settings: GenerationSettings,
    seed: int,
    template: str = "alpaca",
    max_prompt_length: int = 256,
    progress: bool = False,
) -> list[str]:
    """Answer each example (prompt as in training, left-padded batches, KV cache); one string per example.

    The seed fixes the sampling: the same model, examples, settings and seed give the same answers.
    The caller's RNG state and the model's train/eval mode are left as they were.
    """
    with _progress(len(examples), f"generate seed {seed}", disable=not progress) as update:
        return _sample(model, tokenizer, examples, settings, seed, template, max_prompt_length, update)


def evaluate_model(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    settings: GenerationSettings,
    seed: int,
    template: str = "alpaca",
    max_prompt_length: int = 256,
) -> tuple[float, list[str]]:
    """Mean ROUGE-L x100 of the model's answers, and the answers."""
    predictions = generate(
        model,
        tokenizer,
        examples,
        settings=settings,
        seed=seed,
        template=template,
        max_prompt_length=max_prompt_length,
    )
    return score_predictions(predictions, examples)[0], predictions


def dev_rouge(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    seeds: Sequence[int],
    settings: GenerationSettings,
    template: str = "alpaca",
    max_prompt_length: int = 256,
) -> float:
    """Mean ROUGE-L x100 over ``seeds`` of the model's sampled answers (the dev score training ranks its
    checkpoints by). The caller's RNG streams and the model's mode are left as they were."""
    score = functools.partial(
        evaluate_model,
        model,
        tokenizer,
        examples,
        settings=settings,
        template=template,
        max_prompt_length=max_prompt_length,
    )
    return math.fsum(score(seed=seed)[0] for seed in seeds) / len(seeds)


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device} requested but CUDA is not available", "use --device cpu (or auto)")
    return resolved


def load_model(
    name_or_path: str, *, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """A causal LM (eval mode, on ``device``) and its tokenizer (left padding, pad token set) for generation.

    ``dtype="auto"``: bfloat16 on GPUs that support it (else float16), float32 on CPU."""
    torch_device = resolve_device(device)
    half = torch.bfloat16 if torch_device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    model = load_causal_lm(
        name_or_path, dtype=resolve_dtype(dtype, torch_device, auto=half), trust_remote_code=trust_remote_code
    )
    model.to(torch_device).eval()
    tokenizer.padding_side = "left"
    ensure_pad_token(tokenizer)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# The `todi eval` command
# --------------------------------------------------------------------------------------------------


class _Repeatable(argparse.Action):
    """``--model A --model B`` and ``--model A B`` both give [A, B]; the first use on the command line
    replaces the default (which may come from --config), later ones add to it."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest, None)
        current = [] if current is None or current is self.default else current
        setattr(namespace, self.dest, [*current, *values])


@dataclass
class Config:
    """Sample answers on instruction-following test sets and score ROUGE-L over several seeds.

    Writes predictions/<model>/<dataset>/seed<k>.jsonl, results.json, results.md and rougeL.png under
    --out; finished (model, dataset, seed) cells are reused on a rerun. With --compare, merges the
    results.json of earlier runs into one table and plot instead.
    """

    # Not required at the parser level, so that it may come from a --config file; run() checks it.
    out: str = option("", "output folder for predictions and results (required)")
    model: list[str] = option(
        text="model folder or Hub id; repeat (or list several) to compare models",
        factory=list,
        action=_Repeatable,
    )
    name: list[str] = option(
        text="display names, one per --model (default: the last two parts of the model path)",
        factory=list,
        action=_Repeatable,
    )
    data: str = option(
        PAPER_DATASETS,
        "comma-separated data set names (<data root>/<name>/test.jsonl) or data files (.jsonl, .json, "
        ".parquet, .csv; records as for `todi distill --data`)",
    )
    columns: str | None = option(
        None, "read fields from other columns, FIELD=COLUMN,... (e.g. input=context,output=response)"
    )
    seeds: str = option(PAPER_SEEDS, "comma-separated sampling seeds, one run each")
    max_examples: int | None = option(None, "use only the first N examples of each set")
    batch_size: int = option(8, "prompts generated together")
    data_root: str | None = option(
        None, "folder of named data sets (default: $TODI_DATA, else ../shared/data)"
    )
    template: str = option("alpaca", "prompt template, as in training")
    max_prompt_length: int = option(256, "prompts are left-truncated to this many tokens")
    max_new_tokens: int = option(256, "longest answer, in tokens")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling threshold (1 = off)")
    top_k: int = option(0, "top-k sampling (0 = off)")
    no_repeat_ngram_size: int = option(6, "forbid repeating n-grams of this size (0 = off)")
    greedy: bool = option(False, "greedy decoding instead of sampling (one seed suffices)")
    dtype: str = option("auto", "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    compare: list[str] | None = option(
        None,
        "merge the results.json of these earlier --out folders instead of evaluating",
        action=_Repeatable,
    )
    trust_remote_code: bool = option(False, "allow model code from the model folder/Hub")
    reference: str | None = option(
        None,
        "with several models: the one every other is compared with, sampling seed by sampling seed "
        "(default: the model named todi if there is one, else the first)",
    )

    def __post_init__(self) -> None:
        # A --config YAML file may give a single model (or folder to compare) as a plain string.
        for name in ("model", "name", "compare"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        self.check()

    def check(self) -> None:
        """Refuse invalid options before anything loads (a config checks itself when built)."""
        if not self.out:
            raise UsageError(
                "--out is required", "give the folder for predictions and results, e.g. --out eval/"
            )
        if self.compare:
            if self.model:
                raise UsageError(
                    "--compare merges earlier results and takes no --model", "drop --model or --compare"
                )
            return
        if not self.model:
            raise UsageError(
                "no model to evaluate",
                "pass --model PATH (repeatable), or --compare DIR ... to merge results",
            )
        self.generation_settings().validate()
        check_template(self.template)
        parse_columns(self.columns)
        parse_seeds(self.seeds)
        names = _model_names(self)
        if self.reference is not None and self.reference not in names:
            raise UsageError(
                f"--reference {self.reference!r} is not one of the evaluated models ({', '.join(names)})",
                "give --reference one of the --name values (or the default names listed)",
            )

    def generation_settings(self) -> GenerationSettings:
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens,
            do_sample=not self.greedy,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            batch_size=self.batch_size,
        )


def parse_seeds(text: str, option: str = "--seeds") -> list[int]:
    """The sampling seeds a comma-separated option names (at least one, no repeats: a repeated seed would
    count one sample twice); one parser for ``todi eval --seeds`` and ``todi sft/distill --eval-seeds``."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(
            f"{option} must be comma-separated integers, got {text!r}", f"e.g. {option} {PAPER_SEEDS}"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(
            f"{option} needs at least one seed and no repeats, got {text!r}", f"e.g. {option} {PAPER_SEEDS}"
        )
    return seeds


def _safe(name: str) -> str:
    """A name usable as one folder name."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._") or "model"


def display_name(name_or_path: str) -> str:
    """Short model name: the last two parts of the path joined, e.g. runs/todi/final -> todi-final."""
    path = Path(name_or_path).expanduser()
    parts = [p for p in (path.resolve() if path.exists() else path).parts if p not in (path.anchor, "", ".")]
    return _safe("-".join(parts[-2:]) or name_or_path)


def _model_names(config: Config) -> list[str]:
    if config.name and len(config.name) != len(config.model):
        raise UsageError(
            f"{len(config.name)} --name for {len(config.model)} --model",
            "give one --name per --model, or none",
        )
    names = [_safe(n) for n in config.name] if config.name else [display_name(m) for m in config.model]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(
            f"several models get the display name {', '.join(duplicates)}",
            "tell them apart with --name, one per --model",
        )
    return names


def _available_datasets(root: Path | None) -> list[str]:
    return sorted(p.parent.name for p in root.glob("*/test.jsonl")) if root else []


def resolve_datasets(data: str, data_root: str | None = None) -> dict[str, Path | str]:
    """Display name -> source for each item of ``data``: a name under the data root, or a path."""
    items = [d.strip() for d in data.split(",") if d.strip()]
    if not items:
        raise UsageError("--data names no data set", f"e.g. --data {PAPER_DATASETS}")
    root = resolve_data_root(data_root)
    found = _available_datasets(root)
    sources: dict[str, Path | str] = {}
    for item in items:
        path = Path(item).expanduser()
        looks_like_path = os.sep in item or "/" in item or item.endswith((".jsonl", ".json", *TABLE_SUFFIXES))
        if not looks_like_path and item in found:
            name, source = item, root / item / "test.jsonl"
        elif looks_like_path or path.exists():
            # A split file names its data set by its folder (data/sni/test.jsonl -> sni).
            stem = path.stem if path.suffix else path.name
            splits = ("test", "dev", "valid", "validation", "train")
            name = path.parent.name if stem in splits and path.parent.name else stem
            source = path if path.exists() else item  # not here: load_examples may find a Hub data set
        elif root is None:
            raise UsageError(
                f"data set {item!r} is a name but no data root was found",
                "pass --data-root, set TODI_DATA, or give the path of a .jsonl file",
            )
        else:
            raise UsageError(
                f"no data set {item!r} under {root} (found: {', '.join(found) or 'none'})",
                "pick one of the names found, or give the path of a .jsonl file",
            )
        name = _safe(name)
        if name in sources:
            raise UsageError(f"two data sets are both named {name!r}", "rename one of the files or folders")
        sources[name] = source
    return sources


def _settings_record(config: Config) -> dict[str, Any]:
    """What decides a cell's answers; cells made otherwise must not be mixed into one table."""
    settings = asdict(config.generation_settings())
    del settings["batch_size"]  # changes which prompts share a batch, not the decoding protocol
    if not settings["do_sample"]:
        for key in ("temperature", "top_p", "top_k"):
            del settings[key]
    return {
        "template": config.template,
        "max_prompt_length": config.max_prompt_length,
        "max_examples": config.max_examples,
        **({"columns": config.columns} if config.columns else {}),  # absent: as before the option existed
        **settings,
    }


def _check_settings(pred_root: Path, settings: dict[str, Any]) -> None:
    """Refuse to add cells made under other settings to an --out that already holds predictions."""
    path = pred_root / "settings.json"
    if path.exists() and any(pred_root.rglob("seed*.jsonl")):
        earlier = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in settings.keys() | earlier.keys() if settings.get(k) != earlier.get(k))
        if changed:
            diff = ", ".join(f"{k} {earlier.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise UsageError(
                f"{pred_root} holds predictions made with other settings ({diff})",
                "use another --out, or delete its predictions folder to start over",
            )


def _write_settings(pred_root: Path, settings: dict[str, Any]) -> None:
    pred_root.mkdir(parents=True, exist_ok=True)
    report.write_text_atomic(pred_root / "settings.json", json.dumps(settings, indent=2) + "\n")


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError:
        raise UsageError(
            f"{path} is not valid JSON", f"delete {path.parent} to recompute its predictions"
        ) from None
    return record if isinstance(record, dict) else {}


def _same_path(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return a == b or (pa.exists() and pb.exists() and pa.resolve() == pb.resolve())


def _check_model(folder: Path, model_path: str) -> str:
    """The content key of ``model_path``; refuses when ``folder`` holds cells of another model.

    Cells are keyed by the model's name, which two models may share (``a/todi/final`` and
    ``b/todi/final`` are both ``todi-final``) and which a retrained model keeps: ``model.json`` records
    what they were made with. Cells written before it existed are taken as the current model's.
    """
    identity = model_identity(model_path)
    earlier = _read_record(folder / MODEL_RECORD)
    if not earlier.get("identity") or earlier["identity"] == identity:
        return identity
    if not any(folder.rglob("seed*.jsonl")):
        return identity  # a record without cells: nothing to mix up, it is rewritten
    before = str(earlier.get("path", "?"))
    if _same_path(before, model_path):
        what = f"--model {model_path} has changed since (other weights or config)"
    else:
        what = f"--model {model_path} is another model with the same name"
    raise UsageError(
        f"{folder} holds predictions of {before}, but {what}; its cells would be reused for the wrong model",
        f"pass --name to tell them apart, or delete {folder} to recompute",
    )


def _record_model(folder: Path, model_path: str, identity: str) -> None:
    """Write ``model.json`` unless it already names this model (checked by :func:`_check_model`)."""
    if _read_record(folder / MODEL_RECORD).get("identity") == identity:
        return
    folder.mkdir(parents=True, exist_ok=True)
    record = {"path": str(model_path), "identity": identity}
    report.write_text_atomic(folder / MODEL_RECORD, json.dumps(record, indent=2) + "\n")


def _read_cell(path: Path, examples: Sequence[Example]) -> list[float] | None:
    """Per-example scores of a finished cell, or None when it is still to be computed.

    A file only ever appears complete (written under a temporary name, then renamed). One that does not
    match the examples (the data file was edited) is an error rather than silently overwritten: it may
    be hours of generation.
    """
    if not path.exists():
        return None
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        scores = [float(r["rougeL"]) for r in rows]
        same = len(rows) == len(examples) and all(
            r["instruction"] == ex.instruction and r["input"] == ex.input for r, ex in zip(rows, examples)
        )
    except (ValueError, KeyError, TypeError):
        same = False
    if not same:
        raise UsageError(
            f"{path} does not hold predictions for the current examples (was the data changed?)",
            "delete that file (or the whole predictions folder) to recompute it, or use another --out",
        )
    return scores


def _write_cell(
    path: Path, examples: Sequence[Example], predictions: Sequence[str], scores: Sequence[float]
) -> None:
    lines = [
        json.dumps(
            {
                "instruction": ex.instruction,
                "input": ex.input,
                "references": list(ex.references),
                "prediction": pred,
                "rougeL": score,
            },
            ensure_ascii=False,
        )
        for ex, pred, score in zip(examples, predictions, scores)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    report.write_text_atomic(path, "\n".join(lines) + "\n")


def _load_datasets(
    sources: dict[str, Path | str], max_examples: int | None, columns: str | None = None
) -> dict[str, list[Example]]:
    datasets = {}
    for name, source in sources.items():
        examples = load_examples(source, split="test", max_examples=max_examples, columns=columns)
        if any(not ex.references for ex in examples):
            raise DataError(
                f"{source}: some examples have no reference output", "ROUGE-L needs an 'output' per example"
            )
        datasets[name] = examples
    return datasets


def _evaluate_one(
    config: Config,
    name: str,
    model_path: str,
    identity: str,
    datasets: dict[str, list[Example]],
    seeds: list[int],
    folder: Path,
) -> dict[str, dict[int, float]]:
    """Mean ROUGE-L per dataset and seed for one model, generating only the cells not yet on disk
    (``identity``: the model's content key, already checked against the cells' ``model.json``)."""
    scores: dict[str, dict[int, float]] = {d: {} for d in datasets}
    todo: dict[str, list[int]] = {d: [] for d in datasets}
    for dataset, examples in datasets.items():
        for seed in seeds:
            cell_scores = _read_cell(folder / dataset / f"seed{seed}.jsonl", examples)
            if cell_scores is None:
                todo[dataset].append(seed)
            else:
                scores[dataset][seed] = math.fsum(cell_scores) / len(cell_scores)
    remaining = sum(map(len, todo.values()))
    if remaining < len(datasets) * len(seeds):
        _record_model(folder, model_path, identity)  # cells from before model.json get one
        log.info(
            "%s: %d of %d cells already done",
            name,
            len(datasets) * len(seeds) - remaining,
            len(datasets) * len(seeds),
        )
    if not remaining:
        return scores  # nothing to generate: do not even load the model

    log.info("loading %s", model_path)
    model, tokenizer = load_model(
        model_path, dtype=config.dtype, device=config.device, trust_remote_code=config.trust_remote_code
    )
    _record_model(folder, model_path, identity)  # before its first cell
    settings = config.generation_settings()
    for dataset, examples in datasets.items():
        if not todo[dataset]:
            continue
        with _progress(len(examples) * len(todo[dataset]), f"{name} {dataset}") as update:
            for seed in todo[dataset]:
                predictions = _sample(
                    model,
                    tokenizer,
                    examples,
                    settings,
                    seed,
                    config.template,
                    config.max_prompt_length,
                    update,
                )
                mean, per_example = score_predictions(predictions, examples)
                _write_cell(folder / dataset / f"seed{seed}.jsonl", examples, predictions, per_example)
                scores[dataset][seed] = mean
                log.info(
                    "%s %s seed %d: ROUGE-L %.2f (%d examples)", name, dataset, seed, mean, len(examples)
                )
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next model gets the memory
    return scores


def _evaluate_models(config: Config) -> None:
    seeds = parse_seeds(config.seeds)
    if config.greedy and len(seeds) > 1:
        log.warning("greedy decoding does not depend on the seed: evaluating seed %d only", seeds[0])
        seeds = seeds[:1]
    names = _model_names(config)
    # Everything a user can get wrong is checked before the first (slow) model load.
    sources = resolve_datasets(config.data, config.data_root)
    datasets = _load_datasets(sources, config.max_examples, config.columns)
    out = Path(config.out)
    pred_root = out / "predictions"
    inputs = _numbered("--model", config.model) | _numbered("--data", [str(s) for s in sources.values()])
    # No --overwrite: finished cells are reused, and a folder that is not an evaluation is refused.
    with OutputFolder(out, "eval", inputs=inputs).claim(reuse=True) as folder:
        _check_settings(pred_root, _settings_record(config))
        identities = [_check_model(pred_root / name, path) for name, path in zip(names, config.model)]
        folder.replace_old()
        _write_settings(pred_root, _settings_record(config))
        scores = {
            name: _evaluate_one(config, name, path, identity, datasets, seeds, pred_root / name)
            for name, path, identity in zip(names, config.model, identities)
        }
        n_examples = {name: {d: len(ex) for d, ex in datasets.items()} for name in names}
        results = {
            "metric": "rougeL",
            "datasets": list(datasets),
            "seeds": seeds,
            "settings": _settings_record(config),
            "models": report.summarize(
                scores, list(datasets), n_examples=n_examples, paths=dict(zip(names, config.model))
            ),
        }
        results["paired"] = report.paired_comparisons(results, config.reference)
        report.write_report(results, out)
    print(report.markdown_table(results))


def _numbered(option: str, values: Sequence[str]) -> dict[str, str]:
    """Inputs of a repeated option for OutputFolder: ``--model``, ``--model (2)``, ..."""
    return {option if i == 0 else f"{option} ({i + 1})": value for i, value in enumerate(values)}


def run(config: Config) -> None:
    """``todi eval``: evaluate models, or with --compare merge earlier results."""
    if config.compare:
        # OutputFolder refuses an --out that is (or holds) one of the --compare folders, or is not an
        # evaluation folder; an earlier merged table in it is replaced (it is made from the inputs alone).
        inputs = _numbered("--compare", config.compare)
        with OutputFolder(config.out, "eval", inputs=inputs).claim(reuse=True) as folder:
            results = report.merge_results(config.compare)
            results["paired"] = report.paired_comparisons(results, config.reference)
            folder.replace_old()
            report.write_report(results, Path(config.out))
        print(report.markdown_table(results))
        return
    _evaluate_models(config)
