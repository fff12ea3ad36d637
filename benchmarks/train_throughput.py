"""Tokens/s and peak memory of ``todi distill`` steps: fused chunked loss vs ``--no-fused`` (materialised logits).

Teacher: SmolLM2-135M-shaped Llama (30 layers, hidden 576, 9 heads / 3 KV heads, intermediate 1536,
vocabulary 49,152, tied embeddings), random weights. Student: the same widths with 6 layers. Both are
saved once into a work folder, with a word-level tokenizer of exactly 49,152 tokens (so every example has
exactly ``--seq-len`` tokens) and synthetic data: a quarter prompt, the rest response (supervised).

Each mode runs the real command (``python -m todi.cli distill ... --max-steps N --log-every 1``) in its
own subprocess, so the peak memory is its own. Reported from its metrics.jsonl:

  tokens/s   input tokens (prompt + response, all ranks) per second of training steps, mean over the
             steps after the first (the first pays for allocation and, if used, torch.compile)
  s/step     seconds per optimizer step, same steps
  peak MiB   peak GPU memory allocated (CUDA), else the process's peak resident set (models included)

    python benchmarks/train_throughput.py                          # CPU defaults: ~5-8 min on 2 cores
    python benchmarks/train_throughput.py --batch-size 8 --seq-len 512 --steps 6   # on a GPU

Writes benchmarks/results/train_throughput.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB = 49_152
TEACHER = {"num_hidden_layers": 30}
WIDTHS = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 2048,
    "rope_theta": 100_000.0,
    "tie_word_embeddings": True,
}
MODES = {"fused": [], "no-fused": ["--no-fused"]}


def _tokenizer():
    """Word-level tokenizer over "w0" ... "w49150" plus EOS: one word = one token, 49,152 ids in all."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"<eos>": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")


def build_assets(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Save teacher, student, tokenizer and data once; later runs with the same shapes reuse them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer()
    paths = {"teacher": work / "teacher", "student": work / f"student-{args.student_layers}"}
    for name, layers in (("teacher", args.teacher_layers), ("student", args.student_layers)):
        path = paths[name]
        if (path / "model.safetensors").is_file():
            continue
        torch.manual_seed(len(name))
        eos = VOCAB - 1
        config = LlamaConfig(
            vocab_size=VOCAB,
            **{**WIDTHS, "num_hidden_layers": layers},
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=eos,
        )
        model = LlamaForCausalLM(config)
        print(f"built {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    prompt = args.seq_len // 4
    response = args.seq_len - prompt - 1  # + EOS = seq_len tokens per example
    rng = random.Random(0)
    paths["data"] = work / f"data-{args.seq_len}.jsonl"
    with paths["data"].open("w", encoding="utf-8") as file:
        for _ in range(args.batch_size * (args.steps + 1)):
            words = [f"w{rng.randrange(VOCAB - 1)}" for _ in range(prompt + response)]
            record = {"instruction": " ".join(words[:prompt]), "output": " ".join(words[prompt:])}
            file.write(json.dumps(record) + "\n")
    return paths


def run_mode(mode: str, paths: dict[str, Path], work: Path, args: argparse.Namespace) -> dict:
    out = work / f"run-{mode}"
    command = [
        sys.executable, "-m", "todi.cli", "distill",
        "--teacher", paths["teacher"], "--student", paths["student"], "--data", paths["data"],
        "--out", out, "--overwrite", "--template", "none", "--loss", "todi",
        "--max-steps", args.steps, "--batch-size", args.batch_size,
        "--max-length", args.seq_len, "--max-prompt-length", args.seq_len // 4,
        "--log-every", "1", "--save-every", "0", "--report-to", "none", "--lr", "1e-4",
        *MODES[mode],
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=os.environ.copy())
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    measured = records[1:] or records
    tokens_per_s = sum(r["tokens_per_s"] for r in measured) / len(measured)
    tokens_per_step = args.batch_size * args.seq_len
    return {
        "mode": mode,
        "tokens_per_s": tokens_per_s,
        "s_per_step": tokens_per_step / tokens_per_s,
        "first_step_s": tokens_per_step / records[0]["tokens_per_s"],
        "peak_mem_mib": max(r["peak_mem"] for r in records),
        "loss_first_step": records[0]["loss"],
        "loss_last_step": records[-1]["loss"],
        "steps": len(records),
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=2, help="examples per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per example")
    parser.add_argument(
        "--steps", type=int, default=3, help="optimizer steps per mode (the first is not timed)"
    )
    parser.add_argument("--teacher-layers", type=int, default=TEACHER["num_hidden_layers"])
    parser.add_argument("--student-layers", type=int, default=6)
    parser.add_argument("--modes", default="fused,no-fused", help="comma-separated: fused, no-fused")
    parser.add_argument("--work", default=None, help="folder for models, data and runs (default: a temp dir)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_throughput.json"))
    args = parser.parse_args(argv)

    import torch

    with tempfile.TemporaryDirectory(prefix="todi-bench-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        paths = build_assets(work, args)
        results = []
        for mode in args.modes.split(","):
            print(f"running {mode} ...", flush=True)
            results.append(run_mode(mode.strip(), paths, work, args))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    header = (
        f"{'mode':<10} {'tokens/s':>10} {'s/step':>8} {'1st step s':>10} {'peak MiB':>10} {'loss step 1':>12}"
    )
    print(f"\ndistill throughput on {device}: teacher {args.teacher_layers} layers, student "
          f"{args.student_layers} layers, batch {args.batch_size} x {args.seq_len} tokens")  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['mode']:<10} {r['tokens_per_s']:>10.0f} {r['s_per_step']:>8.2f} {r['first_step_s']:>10.2f} "
            f"{r['peak_mem_mib']:>10.0f} {r['loss_first_step']:>12.5f}"
        )
    write_report("train_throughput", device, args, results)
    return 0


def write_report(benchmark: str, device: str, args: argparse.Namespace, results: list[dict]) -> None:
    """``args.out``: the results with the device, versions and settings they were measured with (also
    onpolicy_bench.py's)."""
    import torch

    report = {
        "benchmark": benchmark,
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
