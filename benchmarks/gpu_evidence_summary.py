"""Merge one phase of benchmarks/gpu_evidence.sh into $OUT/summary.json (written after every phase, so a
run cut short still leaves what it measured).

    python benchmarks/gpu_evidence_summary.py SUMMARY.json PHASE STATUS SECONDS [--reason R] [--junit X.xml]
        [--json FILE]...

STATUS is what the phase ended with (passed, failed, timed out, skipped, ...); ``--junit`` adds pytest's
per-test outcomes (name, outcome, seconds, the failure or skip message); ``--json`` embeds a JSON file
under its stem (e.g. the run's run_info.json, heldout_ce.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def junit_tests(path: Path) -> dict:
    """pytest's JUnit XML as per-test outcomes and counts."""
    if not path.is_file():
        return {"error": f"{path.name} was not written (pytest was stopped or did not start)"}
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or node.text or "")[:2000]
        tests.append(
            {
                "name": f"{case.get('classname', '')}::{case.get('name', '')}",
                "outcome": outcome,
                "seconds": round(float(case.get("time", 0) or 0), 2),
                **({"message": message} if message else {}),
            }
        )
    counts: dict[str, int] = {}
    for test in tests:
        counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
    return {"counts": counts, "tests": tests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary", type=Path)
    parser.add_argument("phase")
    parser.add_argument("status")
    parser.add_argument("seconds", type=float)
    parser.add_argument("--reason", default=None)
    parser.add_argument("--junit", type=Path, default=None)
    parser.add_argument("--json", type=Path, action="append", default=[])
    args = parser.parse_args()
    summary = json.loads(args.summary.read_text()) if args.summary.is_file() else {"phases": {}}
    entry: dict = {"status": args.status, "seconds": round(args.seconds, 1)}
    if args.reason:
        entry["reason"] = args.reason
    if args.junit is not None:
        entry["pytest"] = tests = junit_tests(args.junit)
        counts = tests.get("counts", {})
        if counts and set(counts) == {"skipped"} and args.status == "passed":
            # pytest exits 0 when every test skips: say so, with the reason the tests gave
            entry["status"] = "skipped"
            entry.setdefault("reason", "; ".join(sorted({t.get("message", "") for t in tests["tests"]})))
    for path in args.json:
        entry[path.stem] = json.loads(path.read_text()) if path.is_file() else f"{path.name} missing"
    summary["phases"][args.phase] = entry
    tmp = args.summary.with_name(args.summary.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, args.summary)
    reason = entry.get("reason")
    print(f"== {args.phase}: {entry['status']} ({args.seconds:.0f} s)" + (f": {reason}" if reason else ""))


if __name__ == "__main__":
    sys.exit(main())
