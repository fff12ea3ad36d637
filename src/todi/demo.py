"""``todi demo``: the whole pipeline on an embedded task set, in minutes on a laptop CPU.

Phases: write the embedded data (:mod:`todi.demo_tasks`); train a teacher from scratch (cached under
the user cache folder, so a second run skips it); train one student per objective (SFT only, then
FKL, RKL and ToDi; every registry objective with ``--all``) with the same steps, data order and seed;
evaluate teacher and students on the held-out split (sampled ROUGE-L over several seeds, as the paper
evaluates, and exact match); write ``report.md`` with the table and three figures.

``--out`` is a todi output folder (:mod:`todi.outputs`): a rerun works in its own demo folder again, and
``--overwrite`` replaces a demo folder afresh; a folder that is not a demo is never written into.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from todi import demo_tasks
from todi.errors import UsageError
from todi.options import option
from todi.outputs import OutputFolder

logger = logging.getLogger(__name__)

# The sampling seed of the dev ROUGE-L that picks each student's checkpoint.
DEV_SEED = 10

# Every demo answer fits in far fewer tokens; generation stops at EOS anyway.
EVAL_MAX_NEW_TOKENS = 24

# Bump when the generator, the architectures or the teacher recipe change: it keys the teacher cache.
DEMO_VERSION = 2


@dataclass
class Config:
    """Distil a teacher into students with SFT, FKL, RKL and ToDi (off-policy, and FKL and ToDi on the
    students' own samples) on embedded data, then compare them."""

    out: str = option("todi-demo", "output folder: data/, runs/, eval/, report.md and figures")
    quick: bool = option(
        False, "a smaller, faster profile (one training seed; about an eighth of the default time)"
    )
    all: bool = option(False, "train a student for every objective in the registry, not only FKL/RKL/ToDi")
    seed: int = option(0, "seed of the data generator, initialisation and data order")
    cache_dir: str | None = option(
        None, "where the trained teacher is cached (default: $TODI_CACHE or ~/.cache/todi)"
    )
    overwrite: bool = option(False, "start afresh: replace the demo already in --out (never another folder)")


@dataclass(frozen=True)
class Profile:
    """Sizes of one demo run. The teacher learns from ``teacher_examples`` generated tasks; every student
    gets only the first ``train_examples`` of them (default: all), the same for each objective."""

    train_examples: int
    test_examples: int
    eval_seeds: tuple[int, ...]
    teacher_layers: int
    teacher_hidden: int
    teacher_steps: int
    student_layers: int
    student_hidden: int
    student_steps: int
    batch_size: int = 32
    teacher_lr: float = 3e-3
    student_lr: float = 3e-3
    teacher_examples: int | None = None
    # Each objective is trained once per seed and scored as the mean over them: one training run per
    # objective leaves differences of several ROUGE-L points to chance at this size.
    student_seeds: tuple[int, ...] = (0,)
    # As in the paper, each student's checkpoint is chosen by dev ROUGE-L (one sampling seed), scored this
    # many times over training (evenly spaced, the last at the final step).
    dev_evals: int = 4
    dev_examples: int = 50

    def __post_init__(self) -> None:
        if self.dev_evals < 1 or self.dev_examples < 1:
            raise UsageError(
                f"a demo profile needs dev_evals >= 1 and dev_examples >= 1, got {self.dev_evals} and "
                f"{self.dev_examples}",
                "students are chosen by dev ROUGE-L, so score them at least once on at least one dev task",
            )

    @property
    def teacher_data(self) -> int:
        return self.teacher_examples or self.train_examples

    @property
    def dev_every(self) -> int:
        """Steps between two dev ROUGE-L scores of a student."""
        return max(self.student_steps // self.dev_evals, 1)


# The students' labelled budget is a small share of the teacher's data: the regime where a teacher's
# distributions carry information the labels alone do not (and where distillation is used in practice,
# a teacher trained on far more data than the student's budget allows).
PROFILES = {
    "default": Profile(
        teacher_examples=16000, train_examples=1000, test_examples=200, eval_seeds=(10, 20, 30),
        student_seeds=(0, 1, 2, 3, 4),
        teacher_layers=4, teacher_hidden=192, teacher_steps=1000,
        student_layers=2, student_hidden=96, student_steps=400,
    ),
    "quick": Profile(
        teacher_examples=8000, train_examples=500, test_examples=100, eval_seeds=(10,),
        teacher_layers=3, teacher_hidden=128, teacher_steps=500,
        student_layers=2, student_hidden=64, student_steps=200,
    ),
}  # fmt: skip


def _llama_config(tokenizer: Any, layers: int, hidden: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 32, 1),
        num_key_value_heads=max(hidden // 32, 1),
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _save_init(folder: Path, tokenizer: Any, layers: int, hidden: int, seed: int) -> Path:
    """A randomly initialised model folder (model + tokenizer) that ``from_pretrained`` loads."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(tokenizer, layers, hidden))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _cache_root(config: Config) -> Path:
    if config.cache_dir:
        return Path(config.cache_dir)
    if os.environ.get("TODI_CACHE"):
        return Path(os.environ["TODI_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "todi"


def _train_options(
    profile: Profile, data: Path, out: Path, steps: int, lr: float, seed: int, examples: int
) -> dict[str, Any]:
    return dict(
        data=str(data),
        max_examples=examples,
        out=str(out),
        template=demo_tasks.PROMPT_TEMPLATE,
        max_length=64,
        max_prompt_length=48,
        max_steps=steps,
        batch_size=profile.batch_size,
        lr=lr,
        min_lr=lr / 10,
        warmup_steps=steps // 20,
        seed=seed,
        log_every=10,
        save_every=0,
        report_to="none",
        overwrite=True,
    )


def _dev_options(profile: Profile, data: Path) -> dict[str, Any]:
    """Score dev ROUGE-L during a student's training and keep the best checkpoint in ``out/best``."""
    return dict(
        dev=str(data),
        dev_max_examples=profile.dev_examples,
        eval_every=profile.dev_every,
        eval_seeds=str(DEV_SEED),
        eval_max_new_tokens=EVAL_MAX_NEW_TOKENS,
        eval_batch_size=64,
        save_best=1,
    )


def _teacher(config: Config, profile: Profile, tokenizer: Any, data: Path, work: Path) -> tuple[Path, float]:
    """The cached teacher's final folder, training it first when the cache lacks it; and the seconds spent."""
    from todi.training import SFTConfig, train

    # Only what shapes the teacher keys its cache, so profiles that differ in their students share it.
    teacher_fields = (
        "teacher_data",
        "teacher_layers",
        "teacher_hidden",
        "teacher_steps",
        "batch_size",
        "teacher_lr",
    )
    recipe = {
        "version": DEMO_VERSION,
        "seed": config.seed,
        **{f: getattr(profile, f) for f in teacher_fields},
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    cached = _cache_root(config) / "demo" / f"teacher-{key}"
    if (cached / "final" / "config.json").exists():
        logger.info("teacher: using the cached one in %s", cached)
        return cached / "final", 0.0
    start = time.perf_counter()
    init = _save_init(
        work / "teacher-init", tokenizer, profile.teacher_layers, profile.teacher_hidden, config.seed
    )
    staging = cached.with_name(f"{cached.name}.tmp-{os.getpid()}")
    logger.info(
        "teacher: training %d layers x %d from scratch", profile.teacher_layers, profile.teacher_hidden
    )
    options = _train_options(
        profile, data, staging, profile.teacher_steps, profile.teacher_lr, config.seed, profile.teacher_data
    )
    train(SFTConfig(model=str(init), **options))
    shutil.copy(staging / "metrics.jsonl", work / "teacher-metrics.jsonl")
    # The rename makes the cache entry appear whole or not at all.
    staging.rename(cached)
    return cached / "final", time.perf_counter() - start


# Students trained on their own samples (todi.onpolicy): name -> (divergence, --lmbda). The plain names
# are off-policy (lambda 0); the mixed ones run with --all.
ON_POLICY = {"fkl-on": ("fkl", 1.0), "todi-on": ("todi", 1.0)}
MIXED_POLICY = {"fkl-mix": ("fkl", 0.5), "todi-mix": ("todi", 0.5)}


def _objectives(config: Config) -> list[str]:
    from todi.divergences import DIVERGENCES

    off_policy = ["sft", *(DIVERGENCES if config.all else ("fkl", "rkl", "todi"))]
    return off_policy + list(ON_POLICY) + (list(MIXED_POLICY) if config.all else [])


def loss_and_lmbda(objective: str) -> tuple[str, float]:
    """The divergence and the on-policy probability of a demo student's name."""
    return (ON_POLICY | MIXED_POLICY).get(objective, (objective, 0.0))


def _student_run(runs: Path, objective: str, seed: int) -> Path:
    return runs / objective / f"seed{seed}"


def _check_student_runs(config: Config, profile: Profile, runs: Path) -> None:
    """Refuse at once, not after the teacher has trained, when a student run folder the demo is to
    (re)write is one its training run may not replace: a run of an older todi, or not a run at all."""
    for offset in profile.student_seeds:
        for objective in _objectives(config):
            command = "sft" if objective == "sft" else "distill"
            path = _student_run(runs, objective, config.seed + offset)
            OutputFolder(path, command, overwrite=True).check(option="student run")


def _students(
    config: Config, profile: Profile, tokenizer: Any, data: Path, teacher: Path, runs: Path
) -> dict[str, list[Path]]:
    """Every objective's students (their best dev ROUGE-L checkpoints), one per seed in
    ``profile.student_seeds``; the seed sets initialisation and data order, shared by all objectives."""
    from todi.training import DistillConfig, SFTConfig, train

    objectives = _objectives(config)
    chosen: dict[str, list[Path]] = {objective: [] for objective in objectives}
    for offset in profile.student_seeds:
        seed = config.seed + offset
        init = _save_init(
            runs / f"student-init-seed{seed}", tokenizer, profile.student_layers, profile.student_hidden, seed
        )
        for objective in objectives:
            logger.info("student: %s, seed %d", objective, seed)
            options = _train_options(
                profile,
                data,
                _student_run(runs, objective, seed),
                profile.student_steps,
                profile.student_lr,
                seed,
                profile.train_examples,
            )
            options |= _dev_options(profile, data)
            if objective == "sft":
                train(SFTConfig(model=str(init), **options))
            else:
                loss, lmbda = loss_and_lmbda(objective)
                train(
                    DistillConfig(teacher=str(teacher), student=str(init), loss=loss, lmbda=lmbda, **options)
                )
            # Profile guarantees at least one dev score, and the first always exports best/.
            chosen[objective].append(Path(options["out"]) / "best")
    return chosen


def chosen_step(best: Path) -> int | None:
    """The training step a run's ``best/`` folder holds, as the run's newest checkpoint records it; None
    when the run kept no checkpoint."""
    from todi.checkpoint import STATE_NAME, TrainerState, list_checkpoints

    checkpoints = list_checkpoints(best.parent)
    if not checkpoints:
        return None
    return TrainerState.from_file(checkpoints[-1] / STATE_NAME).best_step


def _exact_match(prediction: str, references: tuple[str, ...]) -> float:
    normalised = " ".join(prediction.split())
    return 100.0 * any(normalised == " ".join(r.split()) for r in references)


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for a single value) of per-seed scores."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _evaluate_on_test(
    models: dict[str, list[Path]], test: Path, profile: Profile, out: Path
) -> dict[str, dict[str, Any]]:
    """ROUGE-L and exact match per model: the mean over its training seeds (each the mean over the
    sampling seeds), with the std over training seeds (over sampling seeds when there is one)."""
    from tqdm.auto import tqdm

    from todi.data import load_examples
    from todi.evaluation import GenerationSettings, evaluate_model, load_model

    examples = load_examples(test, max_examples=profile.test_examples)
    settings = GenerationSettings(max_new_tokens=EVAL_MAX_NEW_TOKENS, batch_size=64)
    results = {}
    jobs = [(name, i, path) for name, paths in models.items() for i, path in enumerate(paths)]
    per_run: dict[str, list[tuple[list[float], list[float]]]] = {name: [] for name in models}
    for name, i, path in tqdm(jobs, desc="evaluate", unit="model"):
        model, tokenizer = load_model(str(path), dtype="float32")
        rouge, exact = [], []
        for seed in profile.eval_seeds:
            score, predictions = evaluate_model(
                model, tokenizer, examples, settings=settings, seed=seed, template=demo_tasks.PROMPT_TEMPLATE
            )
            rouge.append(score)
            exact.append(
                statistics.fmean(_exact_match(p, e.references) for p, e in zip(predictions, examples))
            )
            with (out / f"{name}.run{i}.seed{seed}.jsonl").open("w", encoding="utf-8") as f:
                for p, e in zip(predictions, examples):
                    f.write(
                        json.dumps(
                            {"instruction": e.instruction, "prediction": p, "references": e.references[:5]}
                        )
                        + "\n"
                    )
        per_run[name].append((rouge, exact))
    for name, runs in per_run.items():
        summary: dict[str, Any] = {"runs": len(runs)}
        for key, column in (("rougeL", 0), ("exact", 1)):
            means = [statistics.fmean(r[column]) for r in runs]
            summary[key], _ = _mean_std(means)
            _, summary[f"{key}_std"] = _mean_std(means if len(means) > 1 else runs[0][column])
            summary[f"{key}_per_run"] = means
        results[name] = summary
        logger.info("%s: ROUGE-L %.1f, exact match %.1f", name, summary["rougeL"], summary["exact"])
    return results


def run(config: Config) -> None:
    profile = PROFILES["quick" if config.quick else "default"]
    out = Path(config.out)
    folder = OutputFolder(out, "demo", overwrite=config.overwrite)
    if folder.status() == "foreign":
        raise UsageError(
            f"{out} exists and is not a todi demo folder; refusing to write into it"
            + (" or delete it" if config.overwrite else ""),
            "choose another --out (a new or empty folder, or a demo folder of an earlier run)",
        )
    # A rerun reuses its own demo folder (its student runs are retrained in place), as before markers.
    with folder.claim(reuse=True):
        if not config.overwrite:
            _check_student_runs(config, profile, out / "runs")
        # No inputs to load: the old demo (--overwrite) is set aside now, deleted when this one succeeds.
        folder.replace_old()
        _run(config, profile, out)


def _run(config: Config, profile: Profile, out: Path) -> None:
    from todi import demo_report

    start = time.perf_counter()
    tokenizer = demo_tasks.build_tokenizer()
    data = out / "data"
    paths = demo_tasks.write_splits(
        data,
        train=profile.teacher_data,
        dev=profile.dev_examples,
        test=profile.test_examples,
        seed=config.seed,
    )
    runs = out / "runs"
    runs.mkdir(exist_ok=True)
    teacher, teacher_seconds = _teacher(config, profile, tokenizer, data, runs)
    students = _students(config, profile, tokenizer, data, teacher, runs)
    evaluation = out / "eval"
    evaluation.mkdir(exist_ok=True)
    results = _evaluate_on_test({"teacher": [teacher], **students}, paths["test"], profile, evaluation)
    runs_by_key = {
        f"{name}/{i}": folder for name, folders in students.items() for i, folder in enumerate(folders)
    }
    fits = demo_report.heldout_fit(teacher, runs_by_key, paths["test"], max_examples=profile.test_examples)
    for name, folders in students.items():
        results[name]["steps"] = [chosen_step(folder) for folder in folders]
        per_run = [fits[f"{name}/{i}"] for i in range(len(folders))]
        results[name]["fit"] = {
            key: dict(zip(("mean", "std"), _mean_std([r[key] for r in per_run]))) for key in per_run[0]
        }
    elapsed = time.perf_counter() - start
    report = demo_report.write_report(
        out, results=results, runs=runs, teacher=teacher, student=students["todi"][0] if "todi" in students else None, test=paths["test"],
        profile={**dataclasses.asdict(profile), "teacher_data": profile.teacher_data, "dev_every": profile.dev_every, "dev_seed": DEV_SEED}, elapsed=elapsed, teacher_seconds=teacher_seconds, quick=config.quick,
    )  # fmt: skip
    print(report.read_text(encoding="utf-8"))
    print(f"total time {elapsed / 60:.1f} min; report in {out / 'report.md'}")
