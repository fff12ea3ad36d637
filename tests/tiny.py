"""Tiny models and data shared by test modules (the GPT-2 tokenizer from the shared folder, a 2-layer
Llama, random instruction records); importable because pytest puts this folder on sys.path."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TODI_DATA", REPO.parent / "shared" / "data"))
GPT2_DIR = DATA.parent / "tokenizers" / "gpt2"
# Options that keep a training run tiny (in-process runs and subprocesses alike).
TINY = ["--batch-size", "4", "--max-length", "64", "--max-prompt-length", "32", "--report-to", "none"]
# Subprocesses: one thread each (two ranks share two cores; runs compared with each other use the same
# setting, as float sums depend on the thread split), no network, and no torch.compile of the fused loss
# (it costs far more than it saves on these tiny CPU runs).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
ENV["TODI_COMPILE"] = "0"
TEXT = "the a cat dog runs fast slow blue red green tree house river sky sun moon star light dark big"


def gpt2_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(GPT2_DIR)
    tokenizer.eos_token = tokenizer.bos_token = "<|endoftext|>"  # the bare tokenizer.json names none
    return tokenizer


def llama_config(vocab: int, hidden: int, *, max_positions: int, eos: int | None = None, **extra):
    """The tests' 2-layer Llama shape (4 heads, 2 KV heads, MLP 2 x hidden); ``eos`` also sets bos and pad."""
    from transformers import LlamaConfig

    ids = {} if eos is None else {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        **ids,
        **extra,
    )


def save_llama(path: Path, tokenizer, hidden: int, seed: int) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = llama_config(
        len(tokenizer), hidden, max_positions=256, eos=tokenizer.eos_token_id, tie_word_embeddings=False
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_data(path: Path, n: int, seed: int) -> Path:
    rng, words = random.Random(seed), TEXT.split()
    with path.open("w", encoding="utf-8") as file:
        for _ in range(n):
            record = {
                "instruction": " ".join(rng.choices(words, k=rng.randint(3, 10))),
                "input": " ".join(rng.choices(words, k=rng.randint(0, 5))),
                "output": " ".join(rng.choices(words, k=rng.randint(2, 16))),
            }
            file.write(json.dumps(record) + "\n")
    return path


def run_todi(*argv: object) -> int:
    """``todi ...`` in this process; returns the exit status. One thread, as in the subprocesses: on a
    busy 2-core machine, two OpenMP threads per op wait on each other and run many times slower."""
    from todi import cli

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli.main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)
