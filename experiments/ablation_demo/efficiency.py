"""Training-step time and peak memory per objective, online (teacher run every step) and from a teacher
cache (the teacher's top-k rows with sampled tail draws, as `todi cache-teacher` stores them), on CPU.

One step is what `todi distill` does per batch: the student's forward, the fused chunked loss (with the
teacher's forward under no_grad when online), backward, and an AdamW step. Objectives run side by side:
every round runs each objective once, in an order rotated from round to round, after one warm-up step
each; the medians over rounds are reported. Torch runs on one thread and the step's CPU time
(time.process_time) is the main measure: on a machine shared with other jobs the wall time depends on
their load far more than on the objective (it is recorded too).

Peak memory: the process's peak resident set during the step (Linux VmHWM, reset before the step by
writing 5 to /proc/self/clear_refs) minus its resident set just before the step. The process runs with
a fixed glibc mmap threshold (MALLOC_MMAP_THRESHOLD_, set by :func:`measure`), so every tensor above 64
KiB gets its own mapping that is returned on free, and the resident set follows the live tensors. It
counts everything the step allocates (activations, gradients, the loss's chunks; AdamW's state was
allocated by the warm-up step), not the models and the batch that exist before it.

    python experiments/ablation_demo/efficiency.py --config experiments/ablation_demo/config.yaml \
        --teacher ~/.cache/todi/demo/teacher-<key>/final --out OUT/efficiency.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

MMAP_THRESHOLD = 65536


def measure(config: dict[str, Any], demo_teacher: Path) -> dict[str, Any]:
    """Run this file in a fresh process with a fixed glibc mmap threshold (see the module docstring)
    and return what it measured."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        settings, out = Path(tmp) / "settings.json", Path(tmp) / "efficiency.json"
        settings.write_text(json.dumps(config))
        command = [sys.executable, __file__, "--settings", str(settings), "--teacher", str(demo_teacher)]
        subprocess.run([*command, "--out", str(out)], env=env, check=True)
        return json.loads(out.read_text())


def _rss_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
        refs.write("5")


def objective_options(name: str) -> dict[str, Any]:
    """``sft``, a registry divergence, or ``todi-<weight rule>``: the loss options of one step."""
    if name == "sft":
        return {"divergence": "todi", "kd_rate": 0.0}
    if name.startswith("todi-"):
        return {"divergence": "todi", "weight": name.split("-", 1)[1], "kd_rate": 0.5}
    return {"divergence": name, "kd_rate": 0.5}


@dataclasses.dataclass
class Pair:
    """A teacher and student and one batch (labels on the second half of every sequence)."""

    name: str
    shape: str
    teacher: Any
    student: Any
    batch: dict[str, torch.Tensor]
    vocab: int


def _batch(vocab: int, batch_size: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch_size, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def demo_pair(settings: dict[str, Any], teacher_path: Path) -> Pair:
    """The demo's cached teacher and a freshly initialised student of the default demo profile's shape."""
    from transformers import LlamaForCausalLM

    from todi import demo, demo_tasks

    tokenizer = demo_tasks.build_tokenizer()
    profile = demo.PROFILES["default"]
    torch.manual_seed(0)
    student = LlamaForCausalLM(demo._llama_config(tokenizer, profile.student_layers, profile.student_hidden))
    teacher = LlamaForCausalLM.from_pretrained(str(teacher_path), dtype=torch.float32)
    vocab = len(tokenizer)
    shape = (
        f"teacher {teacher.config.num_hidden_layers} layers x {teacher.config.hidden_size}, student "
        f"{profile.student_layers} x {profile.student_hidden}, V {vocab}, batch {settings['batch_size']} x "
        f"{settings['length']}"
    )
    return Pair(
        "demo",
        shape,
        teacher.eval(),
        student,
        _batch(vocab, settings["batch_size"], settings["length"], 0),
        vocab,
    )


def smollm2_pair(settings: dict[str, Any]) -> Pair:
    """Randomly initialised Llamas of SmolLM2-135M's width, heads and vocabulary, with fewer layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def model(layers: int) -> Any:
        config = LlamaConfig(
            vocab_size=settings["vocab"],
            hidden_size=settings["hidden"],
            intermediate_size=settings["intermediate"],
            num_hidden_layers=layers,
            num_attention_heads=settings["heads"],
            num_key_value_heads=settings["kv_heads"],
            max_position_embeddings=max(settings["length"], 128),
            tie_word_embeddings=True,
        )
        return LlamaForCausalLM(config)

    torch.manual_seed(0)
    teacher, student = model(settings["teacher_layers"]), model(settings["layers"])
    shape = (
        f"H {settings['hidden']}, V {settings['vocab']}, {settings['heads']} heads ({settings['kv_heads']} KV), "
        f"MLP {settings['intermediate']}; teacher {settings['teacher_layers']} layers, student "
        f"{settings['layers']}; batch {settings['batch_size']} x {settings['length']}"
    )
    batch = _batch(settings["vocab"], settings["batch_size"], settings["length"], 0)
    return Pair("smollm2", shape, teacher.eval(), student, batch, settings["vocab"])


def cached_teacher(pair: Pair, top_k: int, temperature: float) -> Any:
    """The teacher's rows for the batch's supervised positions as a cache stores them (top k, tail, 16
    tail draws per position, sampled tail): built once, outside the timed steps."""
    from todi.losses import SparseTeacher

    with torch.no_grad():
        logits = pair.teacher(input_ids=pair.batch["input_ids"]).logits[:, :-1]
    keep = pair.batch["labels"][:, 1:] != -100
    rows = logits[keep]
    sparse = SparseTeacher.from_logits(
        rows, top_k, (temperature,), tail_samples=16, generator=torch.Generator().manual_seed(0)
    )
    return dataclasses.replace(sparse, tail_mode="sampled")


def time_objectives(
    pair: Pair, teacher: Any, objectives: list[str], repeats: int, temperature: float
) -> dict[str, dict[str, float]]:
    """Median step CPU and wall seconds and peak step memory (MiB) per objective, side by side over
    ``repeats`` rounds."""
    from todi.losses import causal_lm_distillation_loss

    initial = {k: v.clone() for k, v in pair.student.state_dict().items()}
    optimizers = {}

    def step(name: str) -> None:
        options = objective_options(name)
        optimizer = optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        out = causal_lm_distillation_loss(
            pair.student,
            None if options["kd_rate"] == 0 else teacher,
            pair.batch,
            temperature=temperature,
            fused=True,
            **options,
        )
        out.loss.backward()
        optimizer.step()

    for name in objectives:  # warm-up: first-call costs and AdamW's state
        pair.student.load_state_dict(initial)
        optimizers[name] = torch.optim.AdamW(pair.student.parameters(), lr=1e-4)
        step(name)
    seconds: dict[str, list[float]] = {n: [] for n in objectives}
    cpu: dict[str, list[float]] = {n: [] for n in objectives}
    peaks: dict[str, list[float]] = {n: [] for n in objectives}
    for round_ in range(repeats):
        shift = round_ % len(objectives)
        for name in objectives[shift:] + objectives[:shift]:
            pair.student.load_state_dict(initial)
            before = _rss_kib("VmRSS")
            _reset_peak()
            started, cpu_started = time.perf_counter(), time.process_time()
            step(name)
            seconds[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - cpu_started)
            peaks[name].append((_rss_kib("VmHWM") - before) / 1024)
    return {
        n: {
            "cpu_s": statistics.median(cpu[n]),
            "cpu_s_all": cpu[n],
            "step_s": statistics.median(seconds[n]),
            "step_s_all": seconds[n],
            "peak_mib": statistics.median(peaks[n]),
            "peak_mib_all": peaks[n],
        }
        for n in objectives
    }


def run(settings: dict[str, Any], teacher_path: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    objectives = [o.strip() for o in settings["objectives"].split(",")]
    temperature = float(settings.get("temperature", 2.0))
    result: dict[str, Any] = {
        "objectives": objectives,
        "repeats": settings["repeats"],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "memory": "peak resident set during the step minus the resident set before it (VmHWM via clear_refs)",
        "pairs": {},
    }
    for pair in (demo_pair(settings["demo"], teacher_path), smollm2_pair(settings["smollm2"])):
        rows = cached_teacher(pair, settings["cache_top_k"], temperature)
        result["pairs"][pair.name] = {
            "shape": pair.shape,
            "supervised_positions": int((pair.batch["labels"][:, 1:] != -100).sum()),
            "online": time_objectives(pair, pair.teacher, objectives, settings["repeats"], temperature),
            "cache": time_objectives(pair, rows, objectives, settings["repeats"], temperature),
        }
    return result


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != str(MMAP_THRESHOLD):
        # glibc reads it at start-up only: start again with it (see the module docstring)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "TOKENIZERS_PARALLELISM": "false"}
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", help="JSON of the config's efficiency section")
    parser.add_argument("--config", help="or the study's config.yaml (its efficiency section)")
    parser.add_argument(
        "--teacher", required=True, help="the demo teacher's folder (final/ of its cache entry)"
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.settings:
        settings = json.loads(Path(args.settings).read_text())
    else:
        import yaml

        settings = yaml.safe_load(Path(args.config).read_text())["efficiency"]
    result = run(settings, Path(args.teacher))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
