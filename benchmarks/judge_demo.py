"""How far a judge agrees with checkable correctness: `todi judge` on the demo task's students.

The demo's answers are checkable (exact match against the references), so where exactly one of two
students answers correctly the right verdict is known. This script evaluates two students of a `todi demo`
run on the demo's test split (`todi eval`, the demo's decoding settings), judges them pairwise with
`todi judge`, and reports how often the judge picks the correct answer, its position bias and its tie rate:

    python benchmarks/judge_demo.py --demo todi-demo --judge PATH_OR_HUB_ID --limit 50 --out /tmp/judge-demo
    python benchmarks/judge_demo.py ... --judge-url http://localhost:8000/v1 --judge-model NAME

`--demo` is the --out folder of `todi demo` (its runs/<objective>/seed<k>/best students and data/test.jsonl).
Rerunning resumes the evaluation and the judging (both are resumable). The summary is printed and written
as JSON (--json). docs/judge.md reports a run with SmolLM2-135M-Instruct as the judge.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from todi import demo, demo_tasks
from todi.evaluation import resolve_datasets
from todi.judge import ORDERS, outcome, parse_verdict, winner


def _todi(*args: object) -> None:
    subprocess.run([sys.executable, "-m", "todi.cli", *map(str, args)], check=True)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def agreement(judged: Path, a_cell: Path, b_cell: Path) -> dict:
    """Judge outcomes against exact match, over the examples where exactly one side is correct."""
    a_rows, b_rows = _rows(a_cell), _rows(b_cell)
    # Parsed from the stored replies, as todi judge's results are.
    verdicts = {
        (r["index"], r["order"]): winner(parse_verdict(r["output"]), r["order"])
        for r in _rows(judged / "judgments.jsonl")
    }
    results = json.loads((judged / "results.json").read_text(encoding="utf-8"))
    per_example, per_verdict = Counter(), Counter()
    correct = Counter()
    for index, (ra, rb) in enumerate(zip(a_rows, b_rows)):
        if any((index, o) not in verdicts for o in ORDERS):
            continue  # beyond --limit
        a_ok = demo._exact_match(ra["prediction"], tuple(ra["references"])) > 0
        b_ok = demo._exact_match(rb["prediction"], tuple(rb["references"])) > 0
        correct["judged"] += 1
        correct["a"] += a_ok
        correct["b"] += b_ok
        if a_ok == b_ok:
            continue
        right = "a" if a_ok else "b"
        for order in ORDERS:
            won = verdicts[(index, order)]
            per_verdict["unparseable" if won is None else "tie" if won == "tie" else str(won == right)] += 1
        result = outcome(verdicts[(index, "AB")], verdicts[(index, "BA")])
        per_example[
            "unparseable" if result is None else "tie" if result == "tie" else str(result == right)
        ] += 1
    overall = results["groups"]["overall"]
    decisive = lambda c: c["True"] + c["False"]  # noqa: E731
    return {
        "examples_judged": correct["judged"],
        "exact_match": {"a": correct["a"], "b": correct["b"]},
        "exactly_one_correct": sum(per_example.values()),
        "examples": {
            "judge_picks_correct": per_example["True"],
            "judge_picks_wrong": per_example["False"],
            "tie": per_example["tie"],
            "unparseable": per_example["unparseable"],
            "agreement_of_decisive": per_example["True"] / decisive(per_example)
            if decisive(per_example)
            else None,
        },
        "single_verdicts": {
            "correct": per_verdict["True"],
            "wrong": per_verdict["False"],
            "tie": per_verdict["tie"],
            "unparseable": per_verdict["unparseable"],
        },
        "win_rate_a": overall["win_rate"],
        "ci95": overall["ci95"],
        "counts": {k: overall[k] for k in ("wins", "ties", "losses", "inconsistent", "unparseable_pairs")},
        "unparseable_verdicts": overall["unparseable_verdicts"],
        "verdicts": 2 * overall["pairs"],
        "position": overall["position"],
        "orders": overall["orders"],
        "length": overall["length"],
        "tie_verdicts_share": overall["position"]["tie"]
        / (2 * overall["pairs"] - overall["unparseable_verdicts"])
        if 2 * overall["pairs"] > overall["unparseable_verdicts"]
        else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", required=True, help="the --out folder of a `todi demo` run")
    parser.add_argument("--a", default="todi", help="objective of student A (runs/<a>/seed<k>/best)")
    parser.add_argument("--b", default="sft", help="objective of student B")
    parser.add_argument("--student-seed", type=int, default=0, help="training seed of both students")
    parser.add_argument("--judge", help="local judge: model folder, GGUF file or Hub id")
    parser.add_argument("--judge-url", help="OpenAI-compatible server's base URL")
    parser.add_argument("--judge-model", help="model name on the server")
    parser.add_argument(
        "--limit", type=int, default=50, help="evaluate (and judge) the first N test examples"
    )
    parser.add_argument("--judge-limit", type=int, help="judge only the first K of them (default: all N)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest judge reply")
    parser.add_argument("--batch-size", type=int, default=8, help="local judge batch")
    parser.add_argument("--no-reference", action="store_true", help="do not show the judge the reference")
    parser.add_argument("--prompt", help="judge prompt file (default: todi's MT-bench-style prompt)")
    parser.add_argument("--out", required=True, help="working folder: eval/ and judge/ go here")
    parser.add_argument("--json", help="also write the summary to this file")
    args = parser.parse_args()

    demo_dir, out = Path(args.demo), Path(args.out)
    students = [demo_dir / "runs" / o / f"seed{args.student_seed}" / "best" for o in (args.a, args.b)]
    seed = demo.PROFILES["default"].eval_seeds[0]  # the demo's first sampling seed (10)
    _todi(
        "eval", "--model", *students, "--name", args.a, args.b, "--data", demo_dir / "data" / "test.jsonl",
        "--template", demo_tasks.PROMPT_TEMPLATE, "--max-new-tokens", demo.EVAL_MAX_NEW_TOKENS,
        "--seeds", seed, "--max-examples", args.limit, "--batch-size", 64, "--out", out / "eval",
    )  # fmt: skip
    judge = (
        ["--judge", args.judge]
        if args.judge
        else ["--judge-url", args.judge_url, "--judge-model", args.judge_model]
    )
    _todi(
        "judge", "--a", out / "eval" / "predictions" / args.a, "--b", out / "eval" / "predictions" / args.b,
        *judge, "--max-new-tokens", args.max_new_tokens, "--batch-size", args.batch_size,
        "--limit", args.judge_limit or args.limit,
        *(["--no-reference"] if args.no_reference else []), *(["--prompt", args.prompt] if args.prompt else []),
        "--out", out / "judge",
    )  # fmt: skip
    (dataset,) = resolve_datasets(str(demo_dir / "data" / "test.jsonl"))  # the name todi eval gave it
    cells = [out / "eval" / "predictions" / name / dataset / f"seed{seed}.jsonl" for name in (args.a, args.b)]
    summary = {
        "command": " ".join(sys.argv),
        "a": args.a,
        "b": args.b,
        "judge": args.judge or f"{args.judge_url} {args.judge_model}",
        "limit": args.judge_limit or args.limit,
        "max_new_tokens": args.max_new_tokens,
        "reference": not args.no_reference,
        "prompt": args.prompt or "todi/prompts/judge_pairwise.txt",
        **agreement(out / "judge", *cells),
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
