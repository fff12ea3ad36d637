"""The demo's embedded data: a deterministic generator of small instruction tasks, and its tokenizer.

Every task has checkable answers. Some have exactly one (arithmetic, sorting, reversing, spelling),
others several equally right ones ("name a fruit"): there the teacher learns a spread over the right
answers while each training example shows only one, which is exactly the knowledge a distilled student
can pick up from the teacher's distribution and an SFT student cannot. Word-level tokens over a closed
vocabulary keep the models tiny and the softmax cheap, so the whole pipeline runs on a laptop CPU.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruit": ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "fig"),
    "color": ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"),
    "animal": ("cat", "dog", "horse", "tiger", "lion", "mouse", "sheep", "goat", "bear", "wolf"),
    "tool": ("hammer", "saw", "drill", "wrench", "knife", "shovel", "rake", "axe", "chisel", "file"),
}
OPPOSITES: dict[str, str] = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "old": "new",
    "happy": "sad", "early": "late", "hard": "soft", "open": "closed", "full": "empty", "high": "low",
}  # fmt: skip
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
NUMBERS = tuple(str(i) for i in range(200))
_WORDS = sorted({w for ws in CATEGORIES.values() for w in ws})
INSTRUCTION_WORDS = (
    "add", "and", "sort", "these", "words", "reverse", "the", "order", "of", "spell", "which", "is",
    "largest", "smallest", "name", "a", "an", "opposite", "list", "two", "different", "count", "how",
    "many", "are", "there", "in", "plus", "minus", "number", "first", "last", "word", "letter",
)  # fmt: skip
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
PROMPT_TEMPLATE = "question : {instruction} answer :"


def vocabulary() -> list[str]:
    """The closed word list: special tokens first, then every word any task can produce."""
    words = [*INSTRUCTION_WORDS, *CATEGORIES, *_WORDS, *OPPOSITES, *OPPOSITES.values(), *LETTERS, *NUMBERS]
    words += ["question", "answer", ":", ",", "?", "."]
    seen: dict[str, None] = dict.fromkeys(SPECIAL_TOKENS)
    for word in words:
        seen.setdefault(word, None)
    return list(seen)


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over :func:`vocabulary` (no file, no network)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.model_max_length = 128
    return tokenizer


def _pick(rng: random.Random, k: int, pool: tuple[str, ...] | list[str]) -> list[str]:
    return rng.sample(list(pool), k)


def _arithmetic(rng: random.Random) -> tuple[str, list[str]]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        return f"add {a} and {b}", [str(a + b)]
    a, b = max(a, b), min(a, b)
    return f"{a} minus {b}", [str(a - b)]


def _sort(rng: random.Random) -> tuple[str, list[str]]:
    words = _pick(rng, rng.randint(3, 5), _WORDS)
    return f"sort these words : {' '.join(words)}", [" ".join(sorted(words))]


def _reverse(rng: random.Random) -> tuple[str, list[str]]:
    words = _pick(rng, rng.randint(3, 5), _WORDS)
    return f"reverse the order of : {' '.join(words)}", [" ".join(reversed(words))]


def _extreme(rng: random.Random) -> tuple[str, list[str]]:
    numbers = [rng.randint(0, 199) for _ in range(rng.randint(3, 5))]
    which = rng.choice(("largest", "smallest"))
    answer = max(numbers) if which == "largest" else min(numbers)
    return f"which is {which} : {' , '.join(map(str, numbers))}", [str(answer)]


def _spell(rng: random.Random) -> tuple[str, list[str]]:
    word = rng.choice(_WORDS)
    return f"spell {word}", [" ".join(word)]


def _opposite(rng: random.Random) -> tuple[str, list[str]]:
    word = rng.choice(sorted(OPPOSITES))
    return f"opposite of {word}", [OPPOSITES[word]]


def _name_one(rng: random.Random) -> tuple[str, list[str]]:
    category = rng.choice(sorted(CATEGORIES))
    article = "an" if category[0] in "aeiou" else "a"
    return f"name {article} {category}", list(CATEGORIES[category])


def _name_two(rng: random.Random) -> tuple[str, list[str]]:
    category = rng.choice(sorted(CATEGORIES))
    members = CATEGORIES[category]
    # Every ordered pair is right; the references enumerate them so ROUGE-L takes the best match.
    pairs = [f"{a} , {b}" for a in members for b in members if a != b]
    return f"list two different {category} words", pairs


TASKS: dict[str, Callable[[random.Random], tuple[str, list[str]]]] = {
    "arithmetic": _arithmetic,
    "sort": _sort,
    "reverse": _reverse,
    "extreme": _extreme,
    "spell": _spell,
    "opposite": _opposite,
    "name_one": _name_one,
    "name_two": _name_two,
}


def generate(num_examples: int, seed: int) -> list[dict]:
    """``num_examples`` tasks, round-robin over :data:`TASKS`, deterministic for ``seed``.

    Training examples carry one answer, drawn at random among the right ones (as a human-written
    data set would); ``references`` keeps them all for scoring.
    """
    rng = random.Random(seed)
    names = sorted(TASKS)
    rows = []
    for i in range(num_examples):
        task = names[i % len(names)]
        instruction, references = TASKS[task](rng)
        rows.append(
            {"task": task, "instruction": instruction, "input": "", "output": rng.choice(references),
             "references": references}
        )  # fmt: skip
    return rows


def write_splits(folder: Path, *, train: int, dev: int, test: int, seed: int = 0) -> dict[str, Path]:
    """Write train/dev/test JSONL files in the loader's format; held-out splits list all references.

    The three splits are independent draws (different seeds) from the same generator. Tasks with a
    small instruction space ("spell apple", "name a fruit") recur across splits by construction; the
    open-ended ones (arithmetic, sorting, reversing, extremes) are almost always new.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for offset, (name, count) in enumerate((("train", train), ("dev", dev), ("test", test))):
        path = folder / f"{name}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for row in generate(count, seed + offset):
                output = row["output"] if name == "train" else row["references"]
                record = {
                    "instruction": row["instruction"],
                    "input": "",
                    "output": output,
                    "task": row["task"],
                }
                f.write(json.dumps(record) + "\n")
        paths[name] = path
    return paths
