"""Fault injection with real processes and real signals: does todi keep a user's data?

Each scenario runs ``--trials`` times (default 5); every trial starts real ``python -m todi.cli``
processes, injects one fault and checks the outcome against an independent reference built once at the
start: an uninterrupted run's final weights, a clean cache build's bytes, or a snapshot of a folder.

  kill               SIGKILL a 16-step distill (--save-every 2) at a random moment after its first
                     checkpoint: once step k - 1 is logged (k drawn from 3..15) plus a random part of a
                     step, or, in odd trials, as soon as the next checkpoint's .tmp-step-* folder appears
                     (mid-write); then --resume: final weights equal the reference (atol 1e-6),
                     metrics.jsonl holds steps 1..16 once, segments.jsonl two segments, the second from
                     the newest checkpoint.
  sigterm            SIGTERM at a random step (3..14): exit 143, "checkpoint saved", a checkpoint at the
                     step it stopped at, no traceback; --resume gives the reference weights.
  corrupt            SIGKILL once checkpoint 6 exists, damage the newest checkpoint (by trial: its
                     model.safetensors zeroed at the same size, optimizer.bin cut to a random length, or
                     garbage in trainer_state.json), --resume: it says the checkpoint is unusable, falls
                     back to the previous one and ends at the reference weights.
  full-disk          once the run has written checkpoint 2, 4 or 6, RLIMIT_FSIZE is set on the running
                     process (prlimit(2); SIGXFSZ is ignored, as Python does by default) to a limit below
                     the size of one checkpoint file, measured on the reference: by trial inside
                     optimizer.bin or inside model.safetensors, so the next checkpoint fails partway.
                     Expect exit 1 with one "todi distill: error: could not write checkpoint ..." line and
                     no traceback, every remaining checkpoint verifying (todi.checkpoint.verify_checkpoint),
                     no .tmp-* left; then --resume without the limit reaches the reference weights. (A limit
                     set before the run starts would fail the first checkpoint too: every checkpoint has the
                     same files, so there would be no earlier one to keep.) Without a usable RLIMIT_FSIZE a
                     small tmpfs (mount -t tmpfs, root only) holds --out instead; without either the
                     scenario is reported as not run, with the reason.
  concurrent         two identical distill runs started at the same moment on one new --out: exactly one
                     exits 0; the other exits 1 naming the first's pid ("is in use by todi distill (pid N")
                     or, arriving late, 2 ("already holds a training run"); the finished run has the
                     reference weights, one segment, steps 1..16 once.
  overwrite-foreign  a folder of a user's files (src/main.py, config.yaml, metrics.jsonl, and by trial
                     run_info.json or a checkpoints/ folder, names todi uses) -> distill --overwrite is
                     refused (exit 2) and the folder is byte-identical.
  overwrite-input    a finished run r (a copy of the reference) used as an input of a new run with
                     --out r --overwrite (by trial --teacher r/final, --student r/final or --data
                     r/data.jsonl) -> refused (exit 2), r byte-identical.
  cache-kill         SIGKILL `todi cache-teacher` (12 shards of 8 examples) at a random moment after its
                     first shard (once shard j, j drawn from 1..11, is written, plus a random part of a
                     shard's time), rerun the same command: shards and manifest equal a clean build's.
  cache-truncate     cut one shard of a finished cache (a copy of the clean build) short; `todi distill
                     --teacher-cache` on it fails with a todi error naming the shard (no raw
                     SafetensorError, no traceback, no --out left behind); rerunning the same
                     `todi cache-teacher` command rebuilds it to the clean build's bytes.

"Survived": every expectation above held. "Data lost": a user's file deleted or changed, an earlier
checkpoint destroyed, or a finished output silently wrong (exit 0 with other weights / other bytes, or a
damaged cache served). Models are tiny (2-layer Llama students of hidden 32, teacher hidden 64, the GPT-2
tokenizer from tests/tiny.py); every process runs with OMP_NUM_THREADS=1, TODI_COMPILE=0, HF_HUB_OFFLINE=1.

    python benchmarks/faults.py                            # all scenarios, 5 trials each
    python benchmarks/faults.py --trials 2 --scenarios kill,cache-kill
    python benchmarks/faults.py --print benchmarks/results/faults.json

Writes benchmarks/results/faults.json (or --out; a folder gets faults.json inside). Progress goes to
stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tests/tiny.py: the tests' tiny models and data
sys.path.insert(0, str(REPO / "src"))
RESULTS = Path(__file__).parent / "results"

SCENARIOS = (
    "kill",
    "sigterm",
    "corrupt",
    "full-disk",
    "concurrent",
    "overwrite-foreign",
    "overwrite-input",
    "cache-kill",
    "cache-truncate",
)
STEPS = 16
TINY = ["--batch-size", "4", "--max-length", "64", "--max-prompt-length", "32", "--report-to", "none"]
PROCESS_TIMEOUT = 300.0
ATOL = 1e-6

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
ENV["TODI_COMPILE"] = "0"
ENV["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Processes and files
# --------------------------------------------------------------------------------------------------


class Todi:
    """One ``python -m todi.cli ...`` process; its stdout and stderr go to files in ``folder``."""

    def __init__(self, argv: list[Any], folder: Path, name: str, preexec: Callable[[], None] | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.err_path = folder / f"{name}.stderr"
        self.argv = [str(a) for a in argv]
        with (folder / f"{name}.stdout").open("wb") as out, self.err_path.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "todi.cli", *self.argv],
                env=ENV,
                stdout=out,
                stderr=err,
                preexec_fn=preexec,
                cwd=folder,
            )
        self.pid = self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float = PROCESS_TIMEOUT) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"todi {' '.join(self.argv[:1])} ran past {timeout:.0f} s; killed") from None

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def stderr(self) -> str:
        return self.err_path.read_text(encoding="utf-8", errors="replace")

    def error_lines(self) -> list[str]:
        """The lines todi's CLI prints for an error (``todi CMD: error: ...`` and ``hint: ...``)."""
        lines = [line.strip() for line in re.split(r"[\r\n]", self.stderr())]
        return [line for line in lines if re.match(r"todi [\w-]+: error: ", line)]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def wait_until(condition: Callable[[], bool], process: Todi | None, timeout: float = PROCESS_TIMEOUT) -> bool:
    """Poll ``condition`` every 10 ms; False when ``process`` ends first (or the time runs out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process is not None and process.poll() is not None:
            return condition()
        time.sleep(0.01)
    return False


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``folder``, hidden ones included."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


def tree_diff(before: dict[str, bytes | None], after: dict[str, bytes | None]) -> list[str]:
    gone = sorted(set(before) - set(after))
    new = sorted(set(after) - set(before))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    out = [f"deleted {k}" for k in gone] + [f"changed {k}" for k in changed] + [f"added {k}" for k in new]
    return out


def siblings(path: Path) -> list[str]:
    """Folders --overwrite leaves beside ``path`` (``.NAME.todi-old-*`` and the like)."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.todi-"))


def last_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def metric_steps(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


def segments(run: Path) -> list[dict[str, Any]]:
    path = run / "segments.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def checkpoints(run: Path) -> list[Path]:
    from todi.checkpoint import list_checkpoints

    return list_checkpoints(run)


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    if wa.keys() != wb.keys():
        return float("inf")
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def tmp_leftovers(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob(".tmp-*"))


# --------------------------------------------------------------------------------------------------
# One trial: what it expected (problems), what it lost (lost), what happened (detail)
# --------------------------------------------------------------------------------------------------


class Trial:
    def __init__(self, scenario: str, index: int, folder: Path, rng: random.Random):
        self.scenario, self.index, self.dir, self.rng = scenario, index, folder, rng
        self.problems: list[str] = []
        self.lost: list[str] = []
        self.detail: dict[str, Any] = {}
        self.not_run: str | None = None

    def expect(self, ok: bool, problem: str) -> bool:
        if not ok:
            self.problems.append(problem)
        return ok

    def expect_exit(self, process: Todi, code: int, what: str) -> bool:
        status = process.wait()
        if status == code:
            return True
        tail = " | ".join(process.error_lines()[-2:]) or "".join(process.stderr().strip().splitlines()[-1:])
        self.problems.append(f"{what}: exit {status}, expected {code} ({tail})")
        return False

    def expect_reference_weights(self, run: Path, reference: Path, what: str, *, exit_was_zero: bool) -> None:
        if not (run / "final" / "model.safetensors").is_file():
            self.problems.append(f"{what}: no final/model.safetensors")
            return
        diff = max_weight_diff(run / "final", reference / "final")
        self.detail["max_weight_diff"] = diff
        if diff > ATOL:
            self.problems.append(f"{what}: final weights differ from the reference by {diff:.3g}")
            if exit_was_zero:
                self.lost.append(f"{what} exited 0 with final weights {diff:.3g} away from the reference")

    def expect_steps_once(self, run: Path) -> None:
        steps = metric_steps(run)
        self.expect(
            steps == list(range(1, STEPS + 1)), f"metrics.jsonl steps {steps}, expected 1..{STEPS} once"
        )

    def record(self, seconds: float) -> dict[str, Any]:
        return {
            "trial": self.index,
            "survived": self.not_run is None and not self.problems and not self.lost,
            "data_lost": bool(self.lost),
            "seconds": round(seconds, 2),
            "problems": self.problems,
            "lost": self.lost,
            "not_run": self.not_run,
            "detail": self.detail,
        }


# --------------------------------------------------------------------------------------------------
# Shared inputs and references
# --------------------------------------------------------------------------------------------------


class Context:
    def __init__(self, work: Path, args: argparse.Namespace):
        self.work = work
        self.args = args
        self.reference: dict[str, Any] = {}

    # ---- inputs

    def build_inputs(self) -> None:
        from tiny import gpt2_tokenizer, save_llama, write_data

        started = time.perf_counter()
        inputs = self.work / "inputs"
        tokenizer = gpt2_tokenizer()
        self.teacher = save_llama(inputs / "teacher", tokenizer, hidden=64, seed=1)
        self.student = save_llama(inputs / "student", tokenizer, hidden=32, seed=2)
        self.data = write_data(inputs / "train.jsonl", 24, seed=0)  # 6 steps of 4 per epoch
        self.cache_data = write_data(inputs / "cache.jsonl", 96, seed=3)  # 12 shards of 8 examples
        log(f"inputs built in {time.perf_counter() - started:.1f} s ({inputs})")

    def distill_args(self, out: Path, *extra: Any) -> list[Any]:
        """The reference command: a 16-step distill, checkpoints every 2 steps, metrics every step."""
        return ["distill", "--teacher", self.teacher, "--student", self.student, "--data", self.data,
                "--max-steps", STEPS, "--save-every", 2, "--log-every", 1, "--lr", "2e-3",
                "--warmup-steps", 2, "--out", out, *TINY, *extra]  # fmt: skip

    def short_args(self, out: Path, *extra: Any) -> list[Any]:
        """The probe's B: a 2-step distill."""
        return ["distill", "--teacher", self.teacher, "--student", self.student, "--data", self.data,
                "--max-steps", 2, "--out", out, *TINY, *extra]  # fmt: skip

    def cache_args(self, out: Path) -> list[Any]:
        return ["cache-teacher", "--teacher", self.teacher, "--data", self.cache_data, "--out", out,
                "--max-length", 64, "--max-prompt-length", 32, "--shard-size", 8, "--top-k", 8,
                "--batch-size", 4]  # fmt: skip

    # ---- references

    def build_reference_run(self) -> None:
        """One uninterrupted run; also times its steps (the random kill moments are drawn in step units)."""
        started = time.perf_counter()
        folder = self.work / "reference"
        self.ref_run = folder / "run"
        process = Todi(self.distill_args(self.ref_run), folder, "reference")
        seen: dict[int, float] = {}
        while process.poll() is None:
            step = last_step(self.ref_run)
            if step and step not in seen:
                seen[step] = time.perf_counter()
            time.sleep(0.01)
        if process.wait() != 0:
            raise SystemExit(f"the reference run failed:\n{process.stderr()[-4000:]}")
        gaps = [seen[s] - seen[s - 1] for s in sorted(seen) if s - 1 in seen]
        self.step_s = statistics.median(gaps) if gaps else 0.3
        newest = checkpoints(self.ref_run)[-1]
        self.checkpoint_files = {
            str(p.relative_to(newest)): p.stat().st_size for p in sorted(newest.rglob("*")) if p.is_file()
        }
        self.reference["run"] = {
            "command": "python -m todi.cli " + " ".join(map(str, self.distill_args(Path("OUT")))),
            "seconds": round(time.perf_counter() - started, 2),
            "median_step_s": round(self.step_s, 3),
            "checkpoint_files": self.checkpoint_files,
        }
        log(f"reference run: {time.perf_counter() - started:.1f} s, {self.step_s:.2f} s per step")

    def build_reference_cache(self) -> None:
        started = time.perf_counter()
        folder = self.work / "reference"
        self.ref_cache = folder / "cache"
        process = Todi(self.cache_args(self.ref_cache), folder, "reference-cache")
        first = wait_until(lambda: (self.ref_cache / "shard-00000.safetensors").exists(), process)
        t_first = time.perf_counter()
        complete = wait_until(lambda: cache_complete(self.ref_cache), process)
        self.cache_window_s = max(time.perf_counter() - t_first, 0.2)
        if process.wait() != 0 or not first or not complete:
            raise SystemExit(f"the reference cache build failed:\n{process.stderr()[-4000:]}")
        self.cache_shards = sorted(p.name for p in self.ref_cache.glob("shard-*.safetensors"))
        self.shard_s = self.cache_window_s / max(len(self.cache_shards) - 1, 1)
        self.reference["cache"] = {
            "command": "python -m todi.cli " + " ".join(map(str, self.cache_args(Path("OUT")))),
            "seconds": round(time.perf_counter() - started, 2),
            "shards": len(self.cache_shards),
            "first_shard_to_complete_s": round(self.cache_window_s, 2),
        }
        log(f"reference cache: {time.perf_counter() - started:.1f} s, {len(self.cache_shards)} shards")


def cache_complete(out: Path) -> bool:
    try:
        return bool(json.loads((out / "manifest.json").read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def cache_problems(out: Path, reference: Path) -> list[str]:
    """How the cache in ``out`` differs from the clean build ``reference`` (shard bytes, manifest)."""
    problems = []
    names = sorted(p.name for p in reference.glob("shard-*.safetensors"))
    have = sorted(p.name for p in out.glob("shard-*.safetensors"))
    if have != names:
        problems.append(f"shards {have} instead of {names}")
    for name in names:
        if (out / name).is_file() and (out / name).read_bytes() != (reference / name).read_bytes():
            problems.append(f"{name} differs from the clean build's")
    try:
        mine, theirs = (json.loads((p / "manifest.json").read_text()) for p in (out, reference))
    except (OSError, ValueError) as err:
        return [*problems, f"manifest unreadable: {err}"]
    timing = re.compile(r"time|seconds|elapsed|started|created")
    keys = {k for k in {*mine, *theirs} if not timing.search(k)}
    differing = sorted(k for k in keys if mine.get(k) != theirs.get(k))
    if differing:
        problems.append(f"manifest differs from the clean build's in {differing}")
    leftovers = sorted(p.name for p in out.glob(".tmp-*"))
    if leftovers:
        problems.append(f"left {leftovers}")
    return problems


# --------------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------------


def start_until(
    ctx: Context, t: Trial, run: Path, condition: Callable[[], bool], name: str, extra_sleep: float = 0.0
) -> Todi | None:
    """Start the reference command into ``run`` and return it once ``condition`` holds (and a further
    ``extra_sleep`` s passed) while it still runs; None when it ended first."""
    process = Todi(ctx.distill_args(run), t.dir, name)
    if not wait_until(condition, process) or process.poll() is not None:
        process.kill()
        return None
    time.sleep(extra_sleep)
    if process.poll() is not None:
        return None
    return process


def writing_checkpoint(run: Path) -> bool:
    try:
        return any(name.startswith(".tmp-step-") for name in os.listdir(run / "checkpoints"))
    except OSError:
        return False


def interrupt(
    ctx: Context, t: Trial, signum: int, highest_step: int, mid_checkpoint: bool = False
) -> tuple[Path, Todi] | None:
    """Start the reference command and send ``signum`` at a random moment after its first checkpoint:
    once step k (3..highest_step) is logged, plus a random part of a step, or (``mid_checkpoint``) as
    soon as the next checkpoint after step k - 1 is being written. Retries (up to 3 attempts) when the run
    ended before the signal landed."""
    for attempt in range(3):
        run = t.dir / f"run{attempt}"
        k = t.rng.randint(3, highest_step)
        delay = 0.0 if mid_checkpoint else t.rng.uniform(0, ctx.step_s)

        def due(run: Path = run, k: int = k) -> bool:
            reached = last_step(run) >= k - 1 and bool(checkpoints(run))
            return reached and (not mid_checkpoint or writing_checkpoint(run))

        process = start_until(ctx, t, run, due, f"run{attempt}", delay)
        if process is not None and (run / "final").exists():
            process.kill()
            process = None
        if process is None:
            t.detail.setdefault("retries", []).append(f"attempt {attempt}: the run ended before the signal")
            shutil.rmtree(run, ignore_errors=True)
            continue
        process.signal(signum)
        process.wait()
        t.detail.update(
            target_step=k, delay_s=round(delay, 3), attempts=attempt + 1, aimed_mid_checkpoint=mid_checkpoint
        )
        return run, process
    t.problems.append("could not interrupt the run in 3 attempts (it always finished first)")
    return None


def s_kill(ctx: Context, t: Trial) -> None:
    got = interrupt(ctx, t, signal.SIGKILL, STEPS - 1, mid_checkpoint=t.index % 2 == 1)
    if got is None:
        return
    run, process = got
    saved = checkpoints(run)
    t.detail.update(
        killed_after_step=last_step(run),
        newest_checkpoint=saved[-1].name if saved else None,
        killed_mid_checkpoint=bool(list((run / "checkpoints").glob(".tmp-*"))),
    )
    t.expect(process.wait() == -signal.SIGKILL, f"the run exited {process.wait()} before SIGKILL")
    t.expect(not (run / "final").exists(), "the run finished before SIGKILL")
    resumed = Todi(ctx.distill_args(run, "--resume"), t.dir, "resume")
    ok = t.expect_exit(resumed, 0, "--resume")
    t.expect_reference_weights(run, ctx.ref_run, "--resume", exit_was_zero=ok)
    if ok:
        t.expect_steps_once(run)
        froms = [s["from_step"] for s in segments(run)]
        expected = [0, step_of(saved[-1])] if saved else [0, 0]
        t.expect(froms == expected, f"segments.jsonl from_step {froms}, expected {expected}")
        t.expect(not tmp_leftovers(run), f"left {tmp_leftovers(run)}")


def s_sigterm(ctx: Context, t: Trial) -> None:
    got = interrupt(ctx, t, signal.SIGTERM, STEPS - 2)
    if got is None:
        return
    run, process = got
    status, err = process.wait(), process.stderr()
    stopped_at = last_step(run)
    saved = checkpoints(run)
    t.detail.update(
        exit=status, stopped_after_step=stopped_at, newest_checkpoint=saved[-1].name if saved else None
    )
    t.expect(status == 143, f"SIGTERM: exit {status}, expected 143")
    t.expect("checkpoint saved" in err, "SIGTERM: no 'checkpoint saved' message")
    t.expect("Traceback" not in err, "SIGTERM: a Python traceback")
    t.expect(not (run / "final").exists(), "the run finished despite SIGTERM")
    if t.expect(bool(saved), "SIGTERM: no checkpoint"):
        state = json.loads((saved[-1] / "trainer_state.json").read_text())
        t.expect(
            state["global_step"] == step_of(saved[-1]) == stopped_at,
            f"SIGTERM: newest checkpoint {saved[-1].name} (global_step {state['global_step']}) is not at the "
            f"step it stopped at ({stopped_at})",
        )
    resumed = Todi(ctx.distill_args(run, "--resume"), t.dir, "resume")
    ok = t.expect_exit(resumed, 0, "--resume")
    t.expect_reference_weights(run, ctx.ref_run, "--resume", exit_was_zero=ok)
    if ok:
        t.expect_steps_once(run)


DAMAGE = ("model.safetensors zeroed", "optimizer.bin truncated", "trainer_state.json garbage")


def s_corrupt(ctx: Context, t: Trial) -> None:
    run = t.dir / "run"
    process = start_until(ctx, t, run, lambda: any(step_of(c) >= 6 for c in checkpoints(run)), "run")
    if process is None:
        t.problems.append("the run ended before checkpoint 6")
        return
    process.signal(signal.SIGKILL)
    process.wait()
    saved = checkpoints(run)
    if not t.expect(
        len(saved) >= 2, f"checkpoints {[c.name for c in saved]}: no previous one to fall back on"
    ):
        return
    previous, newest = saved[-2], saved[-1]
    damage = DAMAGE[t.index % len(DAMAGE)]
    if damage.startswith("model"):
        path = newest / "model.safetensors"
        path.write_bytes(b"\0" * path.stat().st_size)
    elif damage.startswith("optimizer"):
        path = newest / "optimizer.bin"
        with path.open("r+b") as file:
            file.truncate(int(path.stat().st_size * t.rng.uniform(0.05, 0.95)))
    else:
        (newest / "trainer_state.json").write_text(t.rng.choice(["[]", '{"global_step": "six"}', "{garbage"]))
    t.detail.update(
        damage=damage, damaged=newest.name, previous=previous.name, killed_after_step=last_step(run)
    )
    resumed = Todi(ctx.distill_args(run, "--resume"), t.dir, "resume")
    ok = t.expect_exit(resumed, 0, "--resume")
    err = resumed.stderr()
    t.expect(f"{newest.name} is unusable" in err, f"--resume did not say {newest.name} is unusable")
    t.expect(f"falling back to {previous.name}" in err, f"--resume did not fall back to {previous.name}")
    t.expect_reference_weights(run, ctx.ref_run, "--resume", exit_was_zero=ok)
    if ok:
        t.expect_steps_once(run)


def rlimit_usable(work: Path) -> str | None:
    """None when RLIMIT_FSIZE set on a running process (prlimit) makes its writes fail with EFBIG."""
    target = work / "rlimit-probe.bin"
    code = (
        "import sys\nsys.stdin.readline()\n"
        f"try:\n    open({str(target)!r}, 'wb').write(b'x' * 200000)\nexcept OSError as e:\n"
        "    print(e.errno)\nelse:\n    print('written')\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        resource.prlimit(child.pid, resource.RLIMIT_FSIZE, (100_000, 100_000))
    except (OSError, AttributeError, ValueError) as err:
        child.kill()
        child.wait()
        return f"prlimit(RLIMIT_FSIZE) failed: {err}"
    out, _ = child.communicate("go\n", timeout=60)
    target.unlink(missing_ok=True)
    return None if out.strip() == "27" else f"a write past RLIMIT_FSIZE gave {out.strip()!r}, not EFBIG"


def tmpfs_usable(work: Path) -> str | None:
    probe = work / "tmpfs-probe"
    probe.mkdir(exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True, text=True
    )
    if done.returncode != 0:
        return f"mount -t tmpfs failed: {done.stderr.strip()}"
    subprocess.run(["umount", str(probe)], check=False)
    return None


def s_full_disk(ctx: Context, t: Trial) -> None:
    mode = ctx.full_disk_mode
    sizes = ctx.checkpoint_files
    model, optimizer = sizes["model.safetensors"], sizes["optimizer.bin"]
    after = t.rng.choice([2, 4, 6])
    run = t.dir / "run"
    mount = None
    if mode == "rlimit":
        inside = ("optimizer.bin", "model.safetensors")[t.index % 2]
        low, high = (
            (model + 65536, optimizer - 65536) if inside == "optimizer.bin" else (1 << 20, model - 65536)
        )
        limit = int(t.rng.uniform(low, high))
        t.detail.update(mode=mode, limit_bytes=limit, fails_inside=inside, limit_after_checkpoint=after)
    else:  # a tmpfs that holds two checkpoints and part of a third (rotation keeps 2; the third fails)
        mount = t.dir / "disk"
        mount.mkdir(parents=True)
        inside = ("optimizer.bin", "model.safetensors")[t.index % 2]
        part = t.rng.uniform(0.1, 0.9) * (optimizer if inside == "optimizer.bin" else model)
        size = int(2 * sum(sizes.values()) + (model if inside == "optimizer.bin" else 0) + part) + (256 << 10)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
        run = mount / "run"
        limit, after = size, 0
        t.detail.update(mode=mode, tmpfs_bytes=size, fails_inside=inside)
    try:
        process = Todi(ctx.distill_args(run), t.dir, "run")
        if mode == "rlimit":
            if not wait_until(lambda: any(step_of(c) >= after for c in checkpoints(run)), process):
                t.problems.append(f"the run ended before checkpoint {after}")
                return
            resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (limit, limit))
            verified_before = [c.name for c in checkpoints(run)]
        else:
            verified_before = []
        status = process.wait()
        err = process.stderr()
        errors = process.error_lines()
        saved = checkpoints(run)
        t.detail.update(
            exit=status, error=errors[-1][:300] if errors else None, checkpoints=[c.name for c in saved]
        )
        t.expect(status == 1, f"exit {status}, expected 1")
        t.expect("Traceback" not in err, "a Python traceback")
        t.expect(
            len(errors) == 1 and "could not write checkpoint" in errors[0],
            f"expected one 'could not write checkpoint' error line, got {errors[-1:] or 'none'}",
        )
        t.expect(not (run / "final").exists(), "final/ written despite the full disk")
        from todi.checkpoint import verify_checkpoint

        broken = {c.name: verify_checkpoint(c) for c in saved if verify_checkpoint(c)}
        t.expect(not broken, f"checkpoints failing verification: {broken}")
        # rotation may delete older ones; the newest one there when the disk filled must survive
        newest_before = max((step_of(Path(n)) for n in verified_before), default=0)
        if broken or max((step_of(c) for c in saved), default=0) < newest_before:
            t.lost.append(f"earlier checkpoints damaged or deleted: {sorted(broken)} (had {verified_before})")
        t.expect(bool(saved), "no checkpoint survived")
        t.expect(not tmp_leftovers(run), f"left {tmp_leftovers(run)}")
        if mount is not None:
            subprocess.run(["mount", "-o", "remount,size=1g", str(mount)], check=True)
        resumed = Todi(ctx.distill_args(run, "--resume"), t.dir, "resume")
        ok = t.expect_exit(resumed, 0, "--resume without the limit")
        t.expect_reference_weights(run, ctx.ref_run, "--resume", exit_was_zero=ok)
        if ok:
            t.expect_steps_once(run)
    finally:
        if mount is not None:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def s_concurrent(ctx: Context, t: Trial) -> None:
    run = t.dir / "run"
    a = Todi(ctx.distill_args(run), t.dir, "a")
    b = Todi(ctx.distill_args(run), t.dir, "b")
    status = {p: p.wait() for p in (a, b)}
    winners = [p for p in (a, b) if status[p] == 0]
    t.detail["exits"] = [status[a], status[b]]
    if len(winners) == 2:
        t.lost.append("both runs exited 0 on one --out")
    if not t.expect(len(winners) == 1, f"exits {[status[a], status[b]]}: expected exactly one 0"):
        return
    winner = winners[0]
    loser = b if winner is a else a
    errors = " ".join(loser.error_lines())
    in_use = status[loser] == 1 and f"is in use by todi distill (pid {winner.pid}" in errors
    late = status[loser] == 2 and "already holds a training run" in errors
    t.detail["loser"] = "in use (exit 1)" if in_use else "already holds (exit 2)" if late else errors[:200]
    t.expect(in_use or late, f"the second run exited {status[loser]}: {errors[:300] or 'no todi error'}")
    t.expect("Traceback" not in loser.stderr(), "a Python traceback")
    t.expect_reference_weights(run, ctx.ref_run, "the finished run", exit_was_zero=True)
    t.expect(len(segments(run)) == 1, f"segments.jsonl holds {len(segments(run))} segments")
    t.expect_steps_once(run)
    t.expect(not siblings(run), f"left {siblings(run)}")


FOREIGN_EXTRA = (
    {},
    {"run_info.json": '{"command": "distill", "mine": true}\n'},
    {"checkpoints/notes.txt": "x\n"},
)


def s_overwrite_foreign(ctx: Context, t: Trial) -> None:
    p = t.dir / "p"
    files = {
        "src/main.py": f"print({t.rng.random()!r})\n",
        "config.yaml": f"a: {t.rng.randint(0, 99)}\n",
        "metrics.jsonl": '{"step": 1, "loss": 2.0}\n',
        **FOREIGN_EXTRA[t.index % len(FOREIGN_EXTRA)],
    }
    for name, text in files.items():
        (p / name).parent.mkdir(parents=True, exist_ok=True)
        (p / name).write_text(text)
    t.detail["files"] = sorted(files)
    before = tree(p)
    process = Todi(ctx.short_args(p, "--overwrite"), t.dir, "overwrite")
    status = process.wait()
    diff = tree_diff(before, tree(p))
    if diff:
        t.lost.append(f"the user's folder changed: {diff}")
    t.expect(status == 2, f"exit {status}, expected 2 (refused)")
    errors = " ".join(process.error_lines())
    t.detail["error"] = errors[:300]
    t.expect(
        "not written by todi" in errors or "written by an older todi" in errors, f"message: {errors[:200]}"
    )
    t.expect(not siblings(p), f"left {siblings(p)}")


INPUT_ROLES = ("--teacher", "--student", "--data")


def s_overwrite_input(ctx: Context, t: Trial) -> None:
    r = t.dir / "r"
    shutil.copytree(ctx.ref_run, r, symlinks=True)
    shutil.copy(ctx.data, r / "data.jsonl")  # a user keeps the data beside the run
    role = INPUT_ROLES[t.index % len(INPUT_ROLES)]
    value = r / "data.jsonl" if role == "--data" else r / "final"
    args = ctx.short_args(r, "--overwrite")
    args[args.index(role) + 1] = value
    t.detail["input"] = f"{role} {value.relative_to(t.dir)}"
    before = tree(r)
    process = Todi(args, t.dir, "overwrite")
    status = process.wait()
    diff = tree_diff(before, tree(r))
    if diff:
        t.lost.append(f"the run folder changed: {diff[:5]}")
    t.expect(status == 2, f"exit {status}, expected 2 (refused)")
    errors = " ".join(process.error_lines())
    t.detail["error"] = errors[:300]
    t.expect(f"contains the input {role}" in errors, f"message does not name {role}: {errors[:200]}")
    t.expect(not siblings(r), f"left {siblings(r)}")


def s_cache_kill(ctx: Context, t: Trial) -> None:
    n = len(ctx.cache_shards)
    for attempt in range(3):
        c = t.dir / f"c{attempt}"
        process = Todi(ctx.cache_args(c), t.dir, f"build{attempt}")
        j = t.rng.randint(1, n - 1)  # kill once shard j (counting from 1) is written, plus up to a shard
        delay = t.rng.uniform(0, ctx.shard_s)
        shard = c / f"shard-{j - 1:05d}.safetensors"
        started = wait_until(shard.exists, process)
        time.sleep(delay)
        if not started or process.poll() is not None or cache_complete(c):
            process.kill()
            t.detail.setdefault("retries", []).append(f"attempt {attempt}: the build ended before the kill")
            shutil.rmtree(c, ignore_errors=True)
            continue
        process.signal(signal.SIGKILL)
        process.wait()
        break
    else:
        t.problems.append("could not kill the build in 3 attempts (it always finished first)")
        return
    shards = sorted(p.name for p in c.glob("shard-*.safetensors"))
    manifest = json.loads((c / "manifest.json").read_text()) if (c / "manifest.json").is_file() else {}
    t.detail.update(
        after_shard=j,
        delay_s=round(delay, 3),
        shards_when_killed=len(shards),
        recorded_when_killed=len(manifest.get("checksums") or {}),
        of=len(ctx.cache_shards),
    )
    t.expect(not manifest.get("complete"), "the build completed before SIGKILL")
    rerun = Todi(ctx.cache_args(c), t.dir, "rerun")
    ok = t.expect_exit(rerun, 0, "rerun")
    problems = cache_problems(c, ctx.ref_cache)
    t.problems.extend(problems)
    if ok and problems:
        t.lost.append(f"the rerun exited 0 with a cache unlike the clean build: {problems[:3]}")


def s_cache_truncate(ctx: Context, t: Trial) -> None:
    c = t.dir / "c"
    shutil.copytree(ctx.ref_cache, c)
    shard = ctx.cache_shards[(t.index * 5 + 2) % len(ctx.cache_shards)]
    size = (c / shard).stat().st_size
    cut = int(size * t.rng.uniform(0.1, 0.9))
    with (c / shard).open("r+b") as file:
        file.truncate(cut)
    t.detail.update(shard=shard, cut_to=cut, of=size)
    x = t.dir / "x"
    distill = ["distill", "--teacher-cache", c, "--student", ctx.student, "--data", ctx.cache_data,
               "--max-steps", 2, "--out", x, *TINY]  # fmt: skip
    process = Todi(distill, t.dir, "distill")
    status = process.wait()
    errors = process.error_lines()
    err = process.stderr()
    t.detail["distill_error"] = errors[-1][:300] if errors else None
    if status == 0:
        t.lost.append("distill exited 0 on a damaged cache")
    t.expect(status == 1, f"distill on the damaged cache: exit {status}, expected 1")
    t.expect(
        any(shard in line and "teacher cache" in line for line in errors), f"the error does not name {shard}"
    )
    t.expect(
        "SafetensorError" not in " ".join(errors) and "Traceback" not in err,
        "a raw SafetensorError/traceback",
    )
    t.expect(not x.exists(), "distill left its --out behind")
    rerun = Todi(ctx.cache_args(c), t.dir, "rerun")
    ok = t.expect_exit(rerun, 0, "rerun of cache-teacher")
    t.expect(
        shard in rerun.stderr() and "rebuilding" in rerun.stderr(),
        f"the rerun did not say it rebuilds {shard}",
    )
    problems = cache_problems(c, ctx.ref_cache)
    t.problems.extend(problems)
    if ok and problems:
        t.lost.append(f"the rerun exited 0 with a cache unlike the clean build: {problems[:3]}")


RUNNERS: dict[str, Callable[[Context, Trial], None]] = {
    "kill": s_kill,
    "sigterm": s_sigterm,
    "corrupt": s_corrupt,
    "full-disk": s_full_disk,
    "concurrent": s_concurrent,
    "overwrite-foreign": s_overwrite_foreign,
    "overwrite-input": s_overwrite_input,
    "cache-kill": s_cache_kill,
    "cache-truncate": s_cache_truncate,
}


def note(name: str, trials: list[dict[str, Any]]) -> str:
    """A few words on what the trials covered."""
    d = [t["detail"] for t in trials]

    def counted(key: str) -> str:
        return ", ".join(
            f"{k} x{n}" for k, n in sorted(Counter(str(x.get(key)) for x in d if key in x).items())
        )

    if name == "kill":
        steps = sorted(x["killed_after_step"] for x in d if "killed_after_step" in x)
        mid = sum(bool(x.get("killed_mid_checkpoint")) for x in d)
        return f"killed after steps {steps} ({mid} mid-checkpoint write)"
    if name == "sigterm":
        return f"stopped at steps {sorted(x['stopped_after_step'] for x in d if 'stopped_after_step' in x)}"
    if name == "corrupt":
        return counted("damage")
    if name == "full-disk":
        return f"write fails inside: {counted('fails_inside') or counted('mode')}"
    if name == "concurrent":
        return f"second run: {counted('loser')}"
    if name == "overwrite-input":
        return counted("input")
    if name == "cache-kill":
        return f"killed with {sorted(x['shards_when_killed'] for x in d if 'shards_when_killed' in x)} of 12 shards written"
    if name == "cache-truncate":
        return f"truncated {sorted({x['shard'].split('-')[1].split('.')[0] for x in d if 'shard' in x})}"
    if name == "overwrite-foreign":
        return "src/main.py, config.yaml, metrics.jsonl (+ run_info.json, checkpoints/ by trial)"
    return ""


# --------------------------------------------------------------------------------------------------
# Table, main
# --------------------------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    lines = [
        "| scenario | trials | survived | data lost | notes (median seconds per trial) |",
        "|---|---|---|---|---|",
    ]
    for name, r in results["scenarios"].items():
        if r.get("not_run"):
            lines.append(f"| {name} | 0 | not run | - | {r['not_run']} |")
            continue
        lines.append(
            f"| {name} | {r['trials_run']} | {r['survived']} | {r['data_lost']} | "
            f"{r['median_s']:.0f} s; {r['note']} |"
        )
    failed = [
        f"- {name} trial {t['trial']}: " + "; ".join(t["lost"] + t["problems"])[:600]
        for name, r in results["scenarios"].items()
        for t in r.get("trials", [])
        if not t["survived"]
    ]
    if failed:
        lines += ["", "Trials that did not survive:", *failed]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = ["git", "status", "--porcelain", "--untracked-files=no"]
        info["git_dirty"] = bool(
            subprocess.run(status, cwd=REPO, capture_output=True, text=True).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5, help="trials per scenario (default 5)")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of: {', '.join(SCENARIOS)}"
    )
    parser.add_argument(
        "--out",
        default=str(RESULTS / "faults.json"),
        help="JSON of the results (a folder: faults.json in it)",
    )
    parser.add_argument(
        "--print", dest="print_file", metavar="FILE", help="print the table of an earlier JSON and exit"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill moments and damage")
    parser.add_argument(
        "--work", default=None, help="folder for models, data and runs (default: a temp folder, deleted)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep every trial's folder (default: delete passing ones)"
    )
    parser.add_argument("--full-disk", choices=("auto", "rlimit", "tmpfs"), default="auto",
                        help="how full-disk fills the disk: RLIMIT_FSIZE, else a small tmpfs (auto)")  # fmt: skip
    args = parser.parse_args(argv)

    if args.print_file:
        print(table(json.loads(Path(args.print_file).read_text())))
        return 0
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in RUNNERS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    out = Path(args.out)
    if out.is_dir() or args.out.endswith("/"):
        out = out / "faults.json"

    started = time.perf_counter()
    command = " ".join(["python benchmarks/faults.py", *(sys.argv[1:] if argv is None else argv)])
    results: dict[str, Any] = {
        "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "trials": args.trials,
        "seed": args.seed,
        "machine": machine(),
        "scenarios": {},
    }
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="todi-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"work folder {work}")
    ctx = Context(work, args)
    try:
        ctx.build_inputs()
        if set(chosen) & {"kill", "sigterm", "corrupt", "full-disk", "concurrent", "overwrite-input"}:
            ctx.build_reference_run()
        if set(chosen) & {"cache-kill", "cache-truncate"}:
            ctx.build_reference_cache()
        results["reference"] = ctx.reference
        for name in chosen:
            summary: dict[str, Any] = {"trials": []}
            results["scenarios"][name] = summary
            if name == "full-disk":
                reasons = []
                if args.full_disk in ("auto", "rlimit"):
                    reasons.append(rlimit_usable(work))
                    ctx.full_disk_mode = "rlimit"
                if (args.full_disk == "tmpfs" or reasons[-1]) and args.full_disk != "rlimit":
                    reasons.append(tmpfs_usable(work))
                    ctx.full_disk_mode = "tmpfs"
                if reasons[-1]:
                    summary["not_run"] = "; ".join(filter(None, reasons))
                    log(f"[{name}] not run: {summary['not_run']}")
                    continue
                summary["mode"] = ctx.full_disk_mode
            for i in range(args.trials):
                folder = work / name / f"trial{i}"
                folder.mkdir(parents=True)
                t = Trial(name, i, folder, random.Random(f"{args.seed}-{name}-{i}"))
                t0 = time.perf_counter()
                try:
                    RUNNERS[name](ctx, t)
                except Exception as err:  # a broken harness or a hung process: recorded, the run goes on
                    t.problems.append(f"harness: {type(err).__name__}: {err}")
                    t.detail["traceback"] = traceback.format_exc()[-2000:]
                record = t.record(time.perf_counter() - t0)
                summary["trials"].append(record)
                state = "survived" if record["survived"] else "DATA LOST" if record["data_lost"] else "FAILED"
                reasons = "; ".join(record["lost"] + record["problems"])
                log(f"[{name} {i + 1}/{args.trials}] {state} in {record['seconds']:.1f} s"
                    + (f": {reasons[:400]}" if reasons else ""))  # fmt: skip
                if record["survived"] and not args.keep:
                    shutil.rmtree(folder, ignore_errors=True)
            trials = summary["trials"]
            summary.update(
                trials_run=len(trials),
                survived=sum(t["survived"] for t in trials),
                data_lost=sum(t["data_lost"] for t in trials),
                median_s=statistics.median(t["seconds"] for t in trials) if trials else 0.0,
                note=note(name, trials),
            )
    finally:
        results["wall_s"] = round(time.perf_counter() - started, 1)
        results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        failed_left = any(
            not t["survived"] for r in results["scenarios"].values() for t in r.get("trials", [])
        )
        if args.work or args.keep or failed_left:
            log(f"kept {work}" + (" (failed trials are in it)" if failed_left else ""))
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    print(f"\n{results['command']}: {results['wall_s']:.0f} s wall; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
