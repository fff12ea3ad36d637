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
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _counts(tests: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for test in tests:
        counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
    return counts


def log_tests(path: Path | None) -> dict:
    """Per-test outcomes from a ``pytest -v`` log: pytest writes its JUnit XML only when the session ends,
    so a run stopped by ``timeout`` leaves only the log."""
    if path is None or not path.is_file():
        return {"error": "pytest wrote neither its JUnit XML nor a log"}
    found = re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", path.read_text(), re.M)
    tests = [{"name": name, "outcome": outcome.lower()} for name, outcome in found]
    return {"counts": _counts(tests), "tests": tests, "note": "from the log: the JUnit XML was not written"}


def junit_tests(path: Path, log: Path | None = None) -> dict:
    """pytest's JUnit XML as per-test outcomes and counts (else what the -v log shows)."""
    if not path.is_file():
        return log_tests(log)
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
    return {"counts": _counts(tests), "tests": tests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary", type=Path)
    parser.add_argument("phase")
    parser.add_argument("status")
    parser.add_argument("seconds", type=float)
    parser.add_argument("--reason", default=None)
    parser.add_argument("--junit", type=Path, default=None)
    parser.add_argument("--log", type=Path, default=None, help="pytest -v log, read when --junit is missing")
    parser.add_argument("--json", type=Path, action="append", default=[])
    args = parser.parse_args()
    summary = json.loads(args.summary.read_text()) if args.summary.is_file() else {"phases": {}}
    entry: dict = {"status": args.status, "seconds": round(args.seconds, 1)}
    if args.reason:
        entry["reason"] = args.reason
    if args.junit is not None:
        entry["pytest"] = tests = junit_tests(args.junit, args.log)
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
