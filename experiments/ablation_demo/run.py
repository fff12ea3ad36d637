"""The paper's ToDi ablations on the demo task: weight rule, beta, temperature and kd_rate, with FKL, RKL
and SFT as anchors, each trained with the same student seeds and data order and evaluated as `todi demo`
evaluates (the dev-selected checkpoint, sampled ROUGE-L on the held-out tasks); then the efficiency
analysis (experiments/ablation_demo/efficiency.py).

    python experiments/ablation_demo/run.py --out /tmp/ablation            # the full study (config.yaml)
    python experiments/ablation_demo/run.py --out /tmp/ablation-q --quick  # minutes: the test's profile
    python experiments/ablation_demo/report.py /tmp/ablation               # docs/ablation.md + figure

The demo's own functions (src/todi/demo.py) give the data, the cached teacher, the student
initialisations, the training options and the evaluation, so a cell here is one demo student. Every
finished cell writes OUT/results/<variant>/seed<k>.json (atomically); a rerun of the same command skips
the cells that have one, so a killed run continues where it stopped. Cells run seed by seed (every
variant of seed 0, then of seed 1, ...), so a run cut short still holds complete pairs. Several copies
of the same command may run at once (each takes a cell under a lock held while it runs, e.g. two
copies with --threads 1 on two cores); the efficiency analysis runs once, after the last cell.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent

# The options of a variant and what `todi distill` does without them.
DISTILL_DEFAULTS = {"kd_rate": 0.5, "temperature": 2.0, "beta": 1.0, "todi_weight": "sigmoid"}


def load_config(path: Path, quick: bool) -> dict[str, Any]:
    """config.yaml, with its ``quick`` section laid over it for --quick."""
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    overrides = config.pop("quick", {})
    if quick:
        for key, value in overrides.items():
            if key == "efficiency":
                config["efficiency"] = {**config["efficiency"], **value}
            elif key == "variants":  # a subset of the full list, by name
                config["variants"] = {name: config["variants"][name] for name in value}
            else:
                config[key] = value
    return config


def variant_options(spec: dict[str, Any]) -> dict[str, Any]:
    """A variant's objective with every default filled in (what the report prints)."""
    if spec["loss"] == "sft":
        return {"loss": "sft"}
    unknown = set(spec) - {"loss", *DISTILL_DEFAULTS}
    if unknown:
        raise SystemExit(f"config: unknown variant field(s) {', '.join(sorted(unknown))}")
    names = list(DISTILL_DEFAULTS) if spec["loss"] == "todi" else ["kd_rate", "temperature"]
    return {"loss": spec["loss"], **{name: spec.get(name, DISTILL_DEFAULTS[name]) for name in names}}


@contextlib.contextmanager
def claimed(path: Path, wait: bool = False) -> Iterator[bool]:
    """An exclusive lock on ``path`` while the block runs: True if this process holds it, False when
    another process does (``wait``: until it is free). The OS drops a lock when its holder dies, so a
    killed run leaves none behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def write_json_atomic(path: Path, data: Any) -> None:
    from todi.report import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


class Study:
    """The demo's data, teacher and student initialisations for one run folder, and its cells."""

    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        from todi import demo, demo_tasks

        self.out, self.config = out, config
        self.profile = demo.PROFILES[config["profile"]]
        self.tokenizer = demo_tasks.build_tokenizer()
        self.data = out / "data"
        self.splits = demo_tasks.write_splits(
            self.data,
            train=self.profile.teacher_data,
            dev=self.profile.dev_examples,
            test=self.profile.test_examples,
            seed=config["seed"],
        )
        (out / "runs").mkdir(parents=True, exist_ok=True)
        # The demo's cached teacher (trained once per profile and seed, shared with `todi demo`); one copy
        # of this command trains it while the others wait.
        with claimed(out / "runs" / "teacher.lock", wait=True):
            self.teacher, _ = demo._teacher(
                demo.Config(seed=config["seed"]), self.profile, self.tokenizer, self.data, out / "runs"
            )

    def student_init(self, seed: int) -> Path:
        from todi import demo

        folder = self.out / "runs" / f"student-init-seed{seed}"
        with claimed(folder.with_name(folder.name + ".lock"), wait=True):
            if not (folder / "config.json").is_file():
                p = self.profile
                demo._save_init(folder, self.tokenizer, p.student_layers, p.student_hidden, seed)
        return folder

    def result_path(self, variant: str, seed: int) -> Path:
        return self.out / "results" / variant / f"seed{seed}.json"

    def train_and_evaluate(self, variant: str, spec: dict[str, Any], seed: int) -> dict[str, Any]:
        """One cell: a demo student trained with this variant's objective and this seed, scored on test."""
        options = variant_options(spec)
        objective = None if spec["loss"] == "sft" else options
        cell = train_cell(self, variant, seed, self.student_init(seed), objective)
        return {**cell, "objective": options}

    def evaluate(self, name: str, models: list[Path], seed: int | None) -> dict[str, Any]:
        from todi import demo

        folder = self.out / "eval" / name / ("all" if seed is None else f"seed{seed}")
        folder.mkdir(parents=True, exist_ok=True)
        return demo._evaluate_on_test({name: models}, self.splits["test"], self.profile, folder)[name]


def train_cell(
    study: Any, variant: str, seed: int, init: Path, objective: dict[str, Any] | None
) -> dict[str, Any]:
    """Train one demo student from ``init`` (SFT when ``objective`` is None, else `todi distill` from
    ``study.teacher`` with these options, ``loss`` included) and score its dev-selected checkpoint on the
    held-out tasks. ``study`` gives profile, out, data, teacher and evaluate (experiments/xtok_demo reuses
    this with its own teacher and tokenizers)."""
    from todi import demo
    from todi.training import DistillConfig, SFTConfig, train

    p = study.profile
    run = study.out / "runs" / variant / f"seed{seed}"
    options = demo._train_options(
        p, study.data, run, p.student_steps, p.student_lr, seed, p.train_examples
    ) | demo._dev_options(p, study.data)
    started = time.perf_counter()
    if objective is None:
        train(SFTConfig(model=str(init), **options))
    else:
        train(DistillConfig(teacher=str(study.teacher), student=str(init), **objective, **options))
    trained = time.perf_counter()
    scores = study.evaluate(variant, [run / "best"], seed)
    return {
        "variant": variant,
        "seed": seed,
        "rougeL": scores["rougeL_per_run"][0],
        "exact": scores["exact_per_run"][0],
        "best_step": demo.chosen_step(run / "best"),
        "train_s": trained - started,
        "eval_s": time.perf_counter() - trained,
    }


def run_cells(study: Study, config: dict[str, Any], log: logging.Logger) -> bool:
    """Every cell without a result that no other copy is running; True when all cells have results."""
    seeds = range(config["student_seeds"])
    cells = [(variant, spec, seed) for seed in seeds for variant, spec in config["variants"].items()]
    todo = [c for c in cells if not study.result_path(c[0], c[2]).is_file()]
    log.info("%d cells, %d finished earlier, %d to run", len(cells), len(cells) - len(todo), len(todo))
    took: list[float] = []
    for variant, spec, seed in todo:
        path = study.result_path(variant, seed)
        with claimed(path.with_suffix(".lock")) as mine:
            if not mine or path.is_file():  # another copy runs it, or has finished it
                continue
            started = time.perf_counter()
            result = study.train_and_evaluate(variant, spec, seed)
            write_json_atomic(path, result)
        took.append(time.perf_counter() - started)
        left = sum(not study.result_path(v, s).is_file() for v, _, s in cells)
        log.info(
            "%s seed %d: ROUGE-L %.1f (%.0f s); %d cells left, about %.0f min for one process",
            variant, seed, result["rougeL"], took[-1], left, statistics.median(took) * left / 60,
        )  # fmt: skip
    return all(study.result_path(v, s).is_file() for v, _, s in cells)


def run_teacher(study: Study, log: logging.Logger) -> None:
    path = study.out / "results" / "teacher.json"
    if path.is_file():
        return
    scores = study.evaluate("teacher", [study.teacher], None)
    write_json_atomic(
        path, {"rougeL": scores["rougeL"], "rougeL_std": scores["rougeL_std"], "exact": scores["exact"]}
    )
    log.info("teacher: ROUGE-L %.1f", scores["rougeL"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run folder (keep it outside the git tree)")
    parser.add_argument("--config", default=str(HERE / "config.yaml"))
    parser.add_argument("--quick", action="store_true", help="the config's quick section: minutes, for tests")
    parser.add_argument("--skip-efficiency", action="store_true", help="only the training cells")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default torch's; 1 on a machine shared with other jobs)",
    )
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = load_config(Path(args.config), args.quick)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    log = logging.getLogger("ablation")
    log.setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    info_path = out / "run_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if info.get("config", config) != config:
        sys.exit(f"{out} holds a run of another configuration ({info_path}); choose another --out")
    info |= {
        "config": config,
        "quick": args.quick,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    write_json_atomic(info_path, info)
    started = time.perf_counter()
    study = Study(out, config)
    with claimed(out / "results" / "teacher.lock") as mine:
        if mine:
            run_teacher(study, log)
    complete = run_cells(study, config, log)
    if not complete:
        log.info("another copy is still running cells; it runs the efficiency analysis when they are done")
    elif not args.skip_efficiency and not (out / "efficiency.json").is_file():
        with claimed(out / "efficiency.lock") as mine:
            if mine and not (out / "efficiency.json").is_file():
                sys.path.insert(0, str(HERE))
                import efficiency

                log.info("efficiency analysis")
                measured = efficiency.measure(config["efficiency"], study.teacher)
                write_json_atomic(out / "efficiency.json", measured)
    info = json.loads(info_path.read_text())
    info["wall_s"] = info.get("wall_s", 0.0) + time.perf_counter() - started
    write_json_atomic(info_path, info)
    log.info(
        "finished in %.1f min; write the report with report.py %s", (time.perf_counter() - started) / 60, out
    )


if __name__ == "__main__":
    main()
