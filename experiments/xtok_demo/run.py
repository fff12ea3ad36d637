"""Cross-tokenizer distillation on the demo task: a teacher and a student with different tokenizers, SFT
against hybrid ToDi, hybrid FKL and ULD (docs/cross_tokenizer.md), each trained with the same student
seeds and data order and evaluated as `todi demo` evaluates (the dev-selected checkpoint, sampled ROUGE-L
on the held-out tasks).

    python experiments/xtok_demo/run.py --out /tmp/xtok                 # the full study (config.yaml)
    python experiments/xtok_demo/run.py --out /tmp/xtok-q --quick       # a minute: the test's profile
    python experiments/xtok_demo/report.py /tmp/xtok                    # the docs section + JSON summary

The data, the model sizes, the training options and the evaluation are the demo's (src/todi/demo.py);
only the tokenizers differ: both are built from the demo's text by config.yaml's patterns, and the teacher
is trained here from scratch with its own tokenizer (the demo's cached teacher has the demo's). Every
finished cell writes OUT/results/<variant>/seed<k>.json atomically; a rerun skips the cells that have one,
so a killed run continues where it stopped. Cells run seed by seed, so a run cut short holds complete
pairs; several copies may run at once (ablation_demo's cell locks). Seeds and variants may be added to a
finished run (the other cells are kept); a change to what an existing cell computes is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent


def _ablation() -> Any:
    """experiments/ablation_demo/run.py: its cell locks and atomic JSON writes are reused as they are."""
    spec = importlib.util.spec_from_file_location("ablation_run", HERE.parent / "ablation_demo" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


ablation = _ablation()
claimed, write_json_atomic = ablation.claimed, ablation.write_json_atomic

# The distill options a variant may set, and what `todi distill` does without them.
DISTILL_FIELDS = {
    "kd_rate": 0.5,
    "temperature": 2.0,
    "beta": 1.0,
    "uld_weight": 1.0,
    "cross_tokenizer": "refuse",
    "unaligned": "ce",
}


def load_config(path: Path, quick: bool) -> dict[str, Any]:
    """config.yaml, with its ``quick`` section laid over it for --quick."""
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    overrides = config.pop("quick", {})
    if quick:
        for key, value in overrides.items():
            if key == "variants":  # a subset of the full list, by name
                config["variants"] = {name: config["variants"][name] for name in value}
            elif key == "report":
                config["report"] = {**config["report"], **value}
            else:
                config[key] = value
    for name, spec in config["variants"].items():
        unknown = set(spec) - {"tokenizer", "loss", *DISTILL_FIELDS}
        if unknown or spec.get("tokenizer") not in config["tokenizers"]:
            raise SystemExit(
                f"config: variant {name}: unknown field(s) {sorted(unknown)} or tokenizer "
                f"{spec.get('tokenizer')!r} not in tokenizers ({', '.join(config['tokenizers'])})"
            )
    return config


def clashes(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """What in ``new`` would change the cells an earlier invocation computed with ``old``, if anything.
    Seeds, variants, tokenizers and comparisons may be added: every cell depends only on its own
    settings."""
    for key in ("profile", "seed", "teacher_tokenizer", "report"):
        if old.get(key) != new.get(key):
            return f"{key} differs"
    for name in set(old["tokenizers"]) & set(new["tokenizers"]):
        if old["tokenizers"][name] != new["tokenizers"][name]:
            return f"tokenizer {name} differs"
    for name in set(old["variants"]) & set(new["variants"]):
        if old["variants"][name] != new["variants"][name]:
            return f"variant {name} differs"
    return None


def profile_of(config: dict[str, Any]) -> Any:
    """A demo profile by name, or given field by field (the test's micro profile)."""
    from todi import demo

    if isinstance(config["profile"], str):
        return demo.PROFILES[config["profile"]]
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config["profile"].items()}
    return demo.Profile(**fields)


def corpus(data: Path) -> list[str]:
    """Every text a model reads or writes in the study: the rendered prompts and all references."""
    from todi import demo_tasks

    texts = []
    for split in ("train", "dev", "test"):
        for line in (data / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            outputs = row["output"] if isinstance(row["output"], list) else [row["output"]]
            texts += [demo_tasks.PROMPT_TEMPLATE.format(instruction=row["instruction"]), *outputs]
    return texts


def regex_tokenizer(pattern: str, texts: list[str]) -> Any:
    """A fast word-level tokenizer whose tokens are the matches of ``pattern`` in ``texts`` (closed
    vocabulary, sorted, after the demo's special tokens); offsets cover every character, so the alignment
    can find boundaries inside a response, and decoding joins tokens as they are."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from todi import demo_tasks

    pieces = sorted({m for text in texts for m in re.findall(pattern, text)})
    ids = {t: i for i, t in enumerate(dict.fromkeys([*demo_tasks.SPECIAL_TOKENS, *pieces]))}
    backend = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.model_max_length = 128
    return tokenizer


class Study:
    """The demo's data, this study's tokenizers and teacher, the student initialisations, and the cells."""

    def __init__(self, out: Path, config: dict[str, Any], log: logging.Logger) -> None:
        from todi import demo_tasks

        self.out, self.config, self.log = out, config, log
        self.profile = profile_of(config)
        self.data = out / "data"
        self.splits = demo_tasks.write_splits(
            self.data,
            train=self.profile.teacher_data,
            dev=self.profile.dev_examples,
            test=self.profile.test_examples,
            seed=config["seed"],
        )
        texts = corpus(self.data)
        self.tokenizers = {name: regex_tokenizer(p, texts) for name, p in config["tokenizers"].items()}
        (out / "runs").mkdir(parents=True, exist_ok=True)
        with claimed(out / "runs" / "teacher.lock", wait=True):
            self.teacher = self._teacher()

    def _teacher(self) -> Path:
        """The teacher, trained once with its own tokenizer by the demo's teacher recipe."""
        from todi import demo
        from todi.training import SFTConfig, train

        final = self.out / "runs" / "teacher" / "final"
        if (final / "config.json").is_file():
            return final
        p, seed = self.profile, self.config["seed"]
        tokenizer = self.tokenizers[self.config["teacher_tokenizer"]]
        init = demo._save_init(
            self.out / "runs" / "teacher-init", tokenizer, p.teacher_layers, p.teacher_hidden, seed
        )
        self.log.info("teacher: training %d layers x %d from scratch", p.teacher_layers, p.teacher_hidden)
        started = time.perf_counter()
        options = demo._train_options(
            p, self.data, final.parent, p.teacher_steps, p.teacher_lr, seed, p.teacher_data
        )
        train(SFTConfig(model=str(init), **options))
        write_json_atomic(
            self.out / "results" / "teacher_train.json", {"train_s": time.perf_counter() - started}
        )
        return final

    def student_init(self, tokenizer: str, seed: int) -> Path:
        from todi import demo

        folder = self.out / "runs" / f"student-init-{tokenizer}-seed{seed}"
        with claimed(folder.with_name(folder.name + ".lock"), wait=True):
            if not (folder / "config.json").is_file():
                p = self.profile
                demo._save_init(folder, self.tokenizers[tokenizer], p.student_layers, p.student_hidden, seed)
        return folder

    def result_path(self, variant: str, seed: int) -> Path:
        return self.out / "results" / variant / f"seed{seed}.json"

    def train_and_evaluate(self, variant: str, spec: dict[str, Any], seed: int) -> dict[str, Any]:
        """One cell: a demo student with this variant's tokenizer and objective, scored on test."""
        objective = None
        if spec["loss"] != "sft":
            objective = {"loss": spec["loss"], **{k: v for k, v in spec.items() if k in DISTILL_FIELDS}}
        cell = ablation.train_cell(self, variant, seed, self.student_init(spec["tokenizer"], seed), objective)
        return {**cell, "spec": spec}

    def evaluate(self, name: str, models: list[Path], seed: int | None) -> dict[str, Any]:
        from todi import demo

        folder = self.out / "eval" / name / ("all" if seed is None else f"seed{seed}")
        folder.mkdir(parents=True, exist_ok=True)
        return demo._evaluate_on_test({name: models}, self.splits["test"], self.profile, folder)[name]

    def pair_figures(self, figures: dict[str, Any]) -> dict[str, Any]:
        """``figures`` completed with xtok-report's figures for the teacher and each other tokenizer
        (matched mass: the trained teacher). Lengths that cut no demo example in any of the tokenizers:
        the figures describe the text, not the training's --max-length."""
        from todi import demo_tasks
        from todi.xtok.report import Config, xtok_figures

        figures = dict(figures)
        for name in self.config["tokenizers"]:
            if name == self.config["teacher_tokenizer"] or name in figures:
                continue
            student = self.student_init(name, 0)
            report = Config(
                teacher=str(self.teacher),
                student=str(student),
                data=str(self.data),
                template=demo_tasks.PROMPT_TEMPLATE,
                max_length=256,
                max_prompt_length=128,
                **self.config["report"],
            )
            figures[name], figures[f"{name}_examples"] = xtok_figures(report)
        return figures


def run_cells(study: Study, config: dict[str, Any], log: logging.Logger) -> None:
    """Every cell without a result that no other copy is running."""
    seeds = range(config["student_seeds"])
    cells = [(variant, spec, seed) for seed in seeds for variant, spec in config["variants"].items()]
    todo = [c for c in cells if not study.result_path(c[0], c[2]).is_file()]
    log.info("%d cells, %d finished earlier, %d to run", len(cells), len(cells) - len(todo), len(todo))
    for variant, spec, seed in todo:
        path = study.result_path(variant, seed)
        with claimed(path.with_suffix(".lock")) as mine:
            if not mine or path.is_file():  # another copy runs it, or has finished it
                continue
            result = study.train_and_evaluate(variant, spec, seed)
            write_json_atomic(path, result)
        left = sum(not study.result_path(v, s).is_file() for v, _, s in cells)
        log.info(
            "%s seed %d: ROUGE-L %.1f (%.0f s); %d cells left",
            variant, seed, result["rougeL"], result["train_s"] + result["eval_s"], left,
        )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run folder (keep it outside the git tree)")
    parser.add_argument("--config", default=str(HERE / "config.yaml"))
    parser.add_argument("--quick", action="store_true", help="the config's quick section: for tests")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 on a machine shared with other jobs)"
    )
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = load_config(Path(args.config), args.quick)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    log = logging.getLogger("xtok_demo")
    log.setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    info_path = out / "run_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if "config" in info and (clash := clashes(info["config"], config)):
        sys.exit(f"{out} holds a run of another configuration ({clash}; {info_path}); choose another --out")
    info |= {
        "config": config,
        "quick": args.quick,
        "profile": dataclasses.asdict(profile_of(config)),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    write_json_atomic(info_path, info)
    started = time.perf_counter()
    study = Study(out, config, log)
    with claimed(out / "results" / "teacher.lock") as mine:
        if mine and not (out / "results" / "teacher.json").is_file():
            scores = study.evaluate("teacher", [study.teacher], None)
            write_json_atomic(
                out / "results" / "teacher.json",
                {"rougeL": scores["rougeL"], "rougeL_std": scores["rougeL_std"], "exact": scores["exact"]},
            )
            log.info("teacher: ROUGE-L %.1f", scores["rougeL"])
        pair = out / "results" / "pair.json"
        if mine:  # computed once per tokenizer (one added later is computed then)
            before = json.loads(pair.read_text()) if pair.is_file() else {}
            if (after := study.pair_figures(before)) != before:
                write_json_atomic(pair, after)
    run_cells(study, config, log)
    info = json.loads(info_path.read_text())
    info["wall_s"] = info.get("wall_s", 0.0) + time.perf_counter() - started
    write_json_atomic(info_path, info)
    log.info(
        "finished in %.1f min; write the report with report.py %s", (time.perf_counter() - started) / 60, out
    )


if __name__ == "__main__":
    main()
