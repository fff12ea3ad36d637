"""Where an on-policy distillation step spends its time: generation, teacher, student forward/backward.

Runs ``todi distill`` (ToDi) for ``--lmbda`` 0, 0.5 and 1, and 1 with a replay buffer (``--replay-buffer
64 --replay-ratio 0.5``), each in its own subprocess with ``--log-every 1``, and reads the per-step split
that training logs (metrics.jsonl: ``gen_s``, ``teacher_s``, ``student_s``; the student part includes both
heads' projections inside the fused loss). Medians over the steps after the first, split by whether the
step trained on generated responses.

Pairs:
  demo      the demo's teacher (4 layers x 192, cached by ``todi demo``, trained here if absent) and a
            fresh 2-layer x 96 student, on the demo's tasks (answers up to 16 tokens)
  smollm2   SmolLM2-135M-shaped teacher (30 layers, hidden 576, vocabulary 49,152, random weights) and a
            6-layer student of the same widths, on synthetic text (see train_throughput.py); random
            models never emit EOS, so every response runs to --gen-max-new-tokens

    python benchmarks/onpolicy_bench.py                 # both pairs, CPU: ~10 min on 2 cores
    python benchmarks/onpolicy_bench.py --pairs demo

Writes benchmarks/results/onpolicy_bench.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIGS = {
    "lambda 0": ["--lmbda", "0"],
    "lambda 0.5": ["--lmbda", "0.5"],
    "lambda 1": ["--lmbda", "1"],
    "lambda 1 + replay": ["--lmbda", "1", "--replay-buffer", "64", "--replay-ratio", "0.5"],
}


def _demo_pair(work: Path) -> dict:
    from todi import demo, demo_tasks

    profile = demo.PROFILES["default"]
    tokenizer = demo_tasks.build_tokenizer()
    data = work / "demo-data"
    demo_tasks.write_splits(data, train=profile.teacher_data, dev=10, test=10, seed=0)
    teacher, _ = demo._teacher(demo.Config(out=str(work)), profile, tokenizer, data, work)
    student = demo._save_init(
        work / "demo-student", tokenizer, profile.student_layers, profile.student_hidden, 0
    )
    options = ["--template", demo_tasks.PROMPT_TEMPLATE, "--max-length", "64", "--max-prompt-length", "48",
               "--batch-size", "32", "--max-examples", "1000"]  # fmt: skip
    return {"teacher": teacher, "student": student, "data": data / "train.jsonl", "options": options}


def _throughput() -> Any:
    """benchmarks/train_throughput.py: its SmolLM2-shaped assets and report writer."""
    sys.path.insert(0, str(Path(__file__).parent))
    import train_throughput

    return train_throughput


def _smollm2_pair(work: Path, seq_len: int, new_tokens: int) -> dict:
    args = argparse.Namespace(teacher_layers=30, student_layers=6, seq_len=seq_len, batch_size=2, steps=8)
    paths = _throughput().build_assets(work / "smollm2", args)
    options = ["--template", "none", "--max-length", str(seq_len), "--max-prompt-length", str(seq_len // 4),
               "--batch-size", "2", "--gen-max-new-tokens", str(new_tokens)]  # fmt: skip
    return {
        "teacher": paths["teacher"],
        "student": paths["student"],
        "data": paths["data"],
        "options": options,
    }


def _run(pair: dict, config: str, steps: int, out: Path) -> list[dict]:
    command = [sys.executable, "-m", "todi.cli", "distill", "--teacher", pair["teacher"], "--student",
               pair["student"], "--data", pair["data"], "--out", out, "--overwrite", "--loss", "todi",
               "--max-steps", steps, "--log-every", 1, "--save-every", 0, "--report-to", "none", "--lr", "1e-4",
               "--seed", "1", *pair["options"], *CONFIGS[config]]  # fmt: skip
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise SystemExit(f"{config} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def _summary(records: list[dict]) -> dict:
    timed = records[1:] or records  # the first step pays for allocation
    out: dict = {"steps": len(records)}
    for kind, rows in (
        ("data", [r for r in timed if not r.get("generated")]),
        ("generated", [r for r in timed if r.get("generated")]),
    ):
        if not rows:
            continue
        med = {
            k: statistics.median(r.get(k) or 0.0 for r in rows) for k in ("gen_s", "teacher_s", "student_s")
        }
        med["step_s"] = sum(med.values())
        med["steps"] = len(rows)
        if kind == "generated":
            med["gen_mean_length"] = statistics.median(r["gen_mean_length"] or 0 for r in rows)
            med["replayed"] = statistics.median(r["replayed"] for r in rows)
        out[kind] = med
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="demo,smollm2", help="comma-separated: demo, smollm2")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per configuration")
    parser.add_argument("--seq-len", type=int, default=128, help="smollm2 pair: tokens per data example")
    parser.add_argument(
        "--new-tokens", type=int, default=32, help="smollm2 pair: tokens per generated response"
    )
    parser.add_argument("--work", default=None, help="folder for models, data and runs (default: a temp dir)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "onpolicy_bench.json"))
    args = parser.parse_args(argv)

    import torch

    results = []
    with tempfile.TemporaryDirectory(prefix="todi-onpolicy-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.pairs.split(","):
            pair = _demo_pair(work) if name == "demo" else _smollm2_pair(work, args.seq_len, args.new_tokens)
            for config in CONFIGS:
                print(f"{name}: {config} ...", flush=True)
                started = time.perf_counter()
                records = _run(pair, config, args.steps, work / f"run-{name}-{config.replace(' ', '_')}")
                results.append(
                    {
                        "pair": name,
                        "config": config,
                        "wall_s": time.perf_counter() - started,
                        **_summary(records),
                    }
                )

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    header = f"{'pair':<8} {'config':<18} {'kind':<10} {'steps':>5} {'gen s':>7} {'teacher s':>9} {'student s':>9} {'step s':>7} {'gen len':>7}"
    print(
        f"\nper-step time split on {device} (medians over steps 2..{args.steps})\n{header}\n{'-' * len(header)}"
    )
    for r in results:
        for kind in ("data", "generated"):
            if kind in r:
                m = r[kind]
                length = f"{m['gen_mean_length']:.1f}" if "gen_mean_length" in m else "-"
                print(f"{r['pair']:<8} {r['config']:<18} {kind:<10} {m['steps']:>5} {m['gen_s']:>7.3f} "
                      f"{m['teacher_s']:>9.3f} {m['student_s']:>9.3f} {m['step_s']:>7.3f} {length:>7}")  # fmt: skip
    _throughput().write_report("onpolicy_bench", device, args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
