"""A TodiTrainer run on an instruction file, set up exactly as ``todi distill`` sets up the same options
(the student's tokenizer, the alpaca template, the same lengths, AdamW, the cosine schedule without
warm-up, gradient clipping at 1). Importable by the tests, and a script for torchrun:

    python -m torch.distributed.run --nproc_per_node 2 tests/trainer_run.py SETTINGS.json

SETTINGS.json holds the keyword arguments of :func:`train`; rank 0 writes ``log_history.json`` into
``out``, and the final model goes to ``out/final``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch


def encoded(data: str, tokenizer: Any) -> list[dict]:
    from todi.data import encode_examples, load_examples

    examples = load_examples(data, "train")
    return encode_examples(examples, tokenizer, template="alpaca", max_prompt_length=32, max_length=64)[0]


def make_trainer(
    *,
    student: str,
    data: str,
    out: str,
    teacher: str | None = None,
    teacher_cache: str | None = None,
    grad_accum: int = 1,
    batch_size: int = 4,
    max_steps: int = 3,
    save_steps: int = 0,
    callbacks: list | None = None,
    **extra: Any,
):
    from todi.integrations import TodiDistillationConfig, TodiTrainer
    from todi.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(student)
    args = TodiDistillationConfig(
        output_dir=out,
        teacher=teacher,
        teacher_cache=teacher_cache,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        max_steps=max_steps,
        learning_rate=5e-4,
        lr_scheduler_type="cosine",
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=42,
        **extra,
    )
    model = load_causal_lm(student)
    trainer = TodiTrainer(
        model=model,
        args=args,
        train_dataset=encoded(data, tokenizer),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    return trainer


def train(resume: str | None = None, **settings: Any) -> Any:
    trainer = make_trainer(**settings)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(Path(settings["out"]) / "final"))
    if trainer.is_world_process_zero():
        history = [*trainer.state.log_history, {"world_size": trainer.args.world_size}]
        (Path(settings["out"]) / "log_history.json").write_text(json.dumps(history))
    return trainer


if __name__ == "__main__":
    torch.set_num_threads(1)
    train(**json.loads(Path(sys.argv[1]).read_text()))
