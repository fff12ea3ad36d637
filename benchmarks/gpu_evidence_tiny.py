"""Tiny stand-ins for the gpu-short run, so its pipeline can be run end to end on a CPU in a minute.

    python benchmarks/gpu_evidence_tiny.py FOLDER [--objectives sft,todi]

Writes FOLDER/teacher (a 2-layer Llama with the GPT-2 tokenizer and a chat template, as SmolLM2-Instruct
has one), FOLDER/data (dolly/{train,dev,test}.jsonl, self-inst/test.jsonl, vicuna/test.jsonl in the
shared data's layout) and FOLDER/gpu-short-tiny.yaml: experiments/dolly_smollm2/gpu-short.yaml with
only the sizes changed (layers, examples, lengths, steps, tokens, reserves). Then run, exactly as on the
GPU but with ``--teacher FOLDER/teacher`` and ``TODI_DATA=FOLDER/data``::

    TODI_DATA=FOLDER/data python experiments/dolly_smollm2/run.py --profile FOLDER/gpu-short-tiny.yaml \\
        --teacher FOLDER/teacher --out FOLDER/run --time-limit 600
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "experiments" / "dolly_smollm2" / "gpu-short.yaml"
WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "runs",
    "fast",
    "slow",
    "blue",
    "red",
    "green",
    "tree",
    "house",
    "river",
    "sky",
    "sun",
    "moon",
    "star",
    "light",
    "dark",
    "big",
]
# SmolLM2-Instruct's chat format; the GPT-2 tokenizer has none of its own.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Only sizes differ from the real profile: the same steps, options and code paths run.
TINY_SIZES = {
    "student_layers": "0,",  # one given layer (a bare 0 would mean "0 evenly spaced layers")
    "train_examples": 0,
    "max_length": 64,
    "max_prompt_length": 32,
    "top_k": 8,
    "cache_batch_size": 4,
    "epochs": 1,
    "batch_size": 4,
    "warmup_steps": 1,
    "dev_examples": 4,
    "eval_every": 3,
    "eval_examples": 4,
    "max_new_tokens": 4,
    "eval_batch_size": 4,
    "heldout_examples": 6,
    "eval_reserve_s": 0,
    "final_reserve_s": 0,
    "jobs": 2,
}


def gpt2_dir() -> Path:
    data = Path(os.environ.get("TODI_DATA", REPO.parent / "shared" / "data"))
    return data.parent / "tokenizers" / "gpt2"


def write_records(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as file:
        for _ in range(n):
            record = {
                "instruction": " ".join(rng.choices(WORDS, k=rng.randint(3, 10))),
                "input": " ".join(rng.choices(WORDS, k=rng.randint(0, 5))),
                "output": " ".join(rng.choices(WORDS, k=rng.randint(2, 12))),
            }
            file.write(json.dumps(record) + "\n")


def build(folder: Path, objectives: str | None = None) -> dict[str, Path]:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir())
    tokenizer.eos_token = tokenizer.bos_token = "<|endoftext|>"  # the bare tokenizer.json names none
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=True,
    )  # fmt: skip
    teacher = folder / "teacher"
    LlamaForCausalLM(config).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    data = folder / "data"
    for i, (name, n) in enumerate(
        [("dolly/train", 24), ("dolly/dev", 6), ("dolly/test", 8), ("self-inst/test", 4), ("vicuna/test", 4)]
    ):
        write_records(data / f"{name}.jsonl", n, seed=i)
    profile = yaml.safe_load(PROFILE.read_text())
    unknown = set(TINY_SIZES) - set(profile)
    if unknown:
        raise SystemExit(f"{PROFILE} lacks {sorted(unknown)}: keep TINY_SIZES in step with it")
    profile.update(TINY_SIZES)
    if objectives:
        profile["objectives"] = objectives
    path = folder / "gpu-short-tiny.yaml"
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    return {"teacher": teacher, "data": data, "profile": path}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--objectives", default=None, help="default: the profile's")
    args = parser.parse_args()
    paths = build(args.folder, args.objectives)
    print(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    main()
