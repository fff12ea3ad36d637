"""Teacher-forced cross-entropy of the reference answers on held-out Dolly test examples, per model.

    python experiments/dolly_smollm2/heldout.py RUN --examples 200 [--teacher PATH]

Writes RUN/heldout_ce.json: for the teacher, the initial student (``student-init``) and every trained
objective (its dev-selected ``best/``, else ``final/``), the mean cross-entropy per response token (nats)
over the first N examples of ``$TODI_DATA/dolly/test.jsonl``, in the run's template and lengths. This is
the number that says whether a student learned: sampled ROUGE-L of an unconverged student says little.
A model that cannot be loaded (an objective stopped before its first dev checkpoint) is left out with
the reason.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def trained_model(run: Path, objective: str) -> Path | None:
    """The model run.py evaluates for ``objective``: its dev-selected best/, else final/, else None."""
    for name in ("best", "final"):
        folder = run / "runs" / objective / name
        if (folder / "config.json").is_file():
            return folder
    return None


def response_ce(
    model_path: str, examples: list, config: dict, device: torch.device, batch_size: int = 16
) -> dict:
    """Mean cross-entropy per supervised (response) token of ``examples`` under ``model_path``."""
    from todi.data import DataCollator, encode_examples, ensure_pad_token
    from todi.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_path)
    pad = ensure_pad_token(tokenizer)
    encoded, _ = encode_examples(
        examples,
        tokenizer,
        template=config["template"],
        max_length=config["max_length"],
        max_prompt_length=config["max_prompt_length"],
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_causal_lm(model_path, dtype=dtype).to(device).eval()
    collate, total, tokens = DataCollator(pad), 0.0, 0
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = collate(encoded[start : start + batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            keep = labels != -100
            # float32 log-softmax: bf16 would round the CE itself at the 2nd decimal
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1][keep].float(), labels[keep], reduction="sum"
            )
            total += float(nll)
            tokens += int(keep.sum())
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"ce": total / tokens if tokens else math.nan, "tokens": tokens, "examples": len(encoded)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--teacher", default=None, help="default: the teacher recorded in student-init/")
    args = parser.parse_args()
    from todi.data import load_examples

    run = args.run.resolve()
    info = json.loads((run / "run_info.json").read_text())
    config = info["config"]
    root = Path(os.environ.get("TODI_DATA", HERE.parents[2] / "shared" / "data"))
    examples = load_examples(str(root / "dolly" / "test.jsonl"), "test", max_examples=args.examples)
    teacher = (
        args.teacher or json.loads((run / "student-init" / "todi_init.json").read_text())["teacher_path"]
    )
    models = {"teacher": teacher, "student-init": str(run / "student-init")}
    for objective in (o.strip() for o in config["objectives"].split(",")):
        path = trained_model(run, objective)
        models[objective] = str(path) if path else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {"data": str(root / "dolly" / "test.jsonl"), "models": {}}
    for name, path in models.items():
        if path is None:
            out["models"][name] = {"missing": "no best/ or final/ model (the run stopped before one)"}
            continue
        out["models"][name] = {"path": path, **response_ce(path, examples, config, device)}
        print(
            f"{name}: CE {out['models'][name]['ce']:.3f} over {out['models'][name]['tokens']} tokens",
            flush=True,
        )
    (run / "heldout_ce.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
