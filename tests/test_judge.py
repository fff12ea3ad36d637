"""`todi judge`: pairwise verdicts in both orders, ties, win rate with its interval, resumption, and the
local (transformers) and HTTP (OpenAI-compatible) judges.

The expected numbers are worked out by hand from a scripted judge whose verdict follows from the answers
("good" beats "bad"; "pos" makes it pick whichever answer is shown first; "same" is a tie; "junk" and
"both" give replies without exactly one verdict tag), never read back from the code under test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import tiny
from todi import evaluation
from todi.data import Example
from todi.errors import UsageError
from todi.judge import Prompt, VerdictLog, parse_verdict
from todi.stats import bootstrap_mean_ci

# ----------------------------------------------------------------------------------------------------------
# Prediction folders as `todi eval` writes them, and the scripted judge
# ----------------------------------------------------------------------------------------------------------

# (instruction, answer of A, answer of B) per data set, for seed 10.
D1 = [
    ("add 2 and 2", "good one", "bad one"),  # A wins both orders
    ("add 3 and 3", "bad two", "good two"),  # B wins both orders
    ("add 4 and 4", "good three is longer answer", "bad three"),  # A wins, the longer answer
    ("add 5 and 5", "pos four", "pos four b"),  # the first shown wins: a flip, so a tie
    ("add 6 and 6", "same a", "same b"),  # [[C]] both orders
    ("add 7 and 7", "junk", "junk x"),  # no tag: unparseable
]
D2 = [
    ("sort b a", "bad", "good"),  # B wins
    ("sort c a", "both a", "both b"),  # two different tags: unparseable
    ("sort d a", "good", "bad answer here"),  # A wins, the shorter answer
]
# Per-example scores of A (win 1, tie 0.5, loss 0), unparseable left out, worked out from the rules above.
D1_SCORES = [1.0, 0.0, 1.0, 0.5, 0.5]
D2_SCORES = [0.0, 1.0]


def scripted_reply(prompt: str) -> str:
    first = re.search(r"Assistant A's Answer\]\n(.*?)\n\[The End", prompt, re.S)[1]
    second = re.search(r"Assistant B's Answer\]\n(.*?)\n\[The End", prompt, re.S)[1]
    if "good" in first and "bad" in second:
        return "A is correct. [[A]]"
    if "bad" in first and "good" in second:
        return "B is correct. [[B]]"
    if "pos" in first:
        return "The first one. [[A]]"
    if "same" in first and "same" in second:
        return "Equal. [[C]]"
    if "both" in first:
        return "Either [[A]] or [[B]]"
    return "I cannot tell."


def write_eval(root: Path, name: str, cells: dict[tuple[str, int], list[tuple[str, str]]]) -> Path:
    """A `todi eval --out` folder holding one model's cells, written by todi eval's own cell writer."""
    for (dataset, seed), rows in cells.items():
        examples = [Example(instruction, "", (f"ref {instruction}",)) for instruction, _ in rows]
        path = root / "predictions" / name / dataset / f"seed{seed}.jsonl"
        evaluation._write_cell(path, examples, [answer for _, answer in rows], [0.0] * len(rows))
    (root / "predictions" / name / "model.json").write_text(json.dumps({"path": name, "identity": "x"}))
    return root


def eval_pair(tmp_path: Path, seeds=(10,), d1=D1, d2=D2) -> tuple[Path, Path]:
    def cells(side: int) -> dict:
        out = {}
        for seed in seeds:
            out[("d1", seed)] = [(ins, row[side]) for ins, *row in d1]
            out[("d2", seed)] = [(ins, row[side]) for ins, *row in d2]
        return out

    return write_eval(tmp_path / "eval-a", "alpha", cells(0)), write_eval(
        tmp_path / "eval-b", "beta", cells(1)
    )


@pytest.fixture(scope="module")
def judge_model(tmp_path_factory, gpt2) -> Path:
    return tiny.save_llama(tmp_path_factory.mktemp("judge") / "tiny-judge", gpt2, hidden=16, seed=3)


def scripted_generate(tokenizer, calls: list[int], fail_on_call: int | None = None):
    """A stand-in for model.generate that answers each prompt as the scripted judge would, through the
    judge's real tokenizer: the prompt is decoded from the (left-padded) ids it is given."""

    def generate(input_ids, attention_mask, max_new_tokens, pad_token_id, **_):
        calls.append(input_ids.shape[0])
        if fail_on_call is not None and len(calls) == fail_on_call:
            raise RuntimeError("simulated crash")
        replies = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = tokenizer.decode(ids[mask.bool()])
            reply = tokenizer(" " + scripted_reply(prompt))["input_ids"][:max_new_tokens]
            replies.append([*reply, tokenizer.eos_token_id])
        new = torch.full((len(replies), max(map(len, replies))), pad_token_id, dtype=torch.long)
        for row, reply in enumerate(replies):
            new[row, : len(reply)] = torch.tensor(reply)
        return torch.cat([input_ids, new], dim=1)

    return generate


@pytest.fixture
def scripted(monkeypatch):
    """Make the local judge answer as the scripted judge; returns the list of batch sizes generated and
    a setter for a simulated crash on the n-th generate call."""
    calls: list[int] = []
    state = {"fail_on_call": None}
    real = evaluation.load_model

    def load(*args, **kwargs):
        model, tokenizer = real(*args, **kwargs)
        model.generate = scripted_generate(tokenizer, calls, state["fail_on_call"])
        return model, tokenizer

    monkeypatch.setattr(evaluation, "load_model", load)
    return calls, state


def judge_args(a: Path, b: Path, out: Path, *extra) -> list:
    return ["judge", "--a", a, "--b", b, "--out", out, "--max-new-tokens", "16", *extra]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_hand_results(out: Path) -> None:
    """results.json against the counts worked out by hand for D1 / D2 at one seed."""
    results = json.loads((out / "results.json").read_text())
    d1, d2, overall = (results["groups"][g] for g in ("d1", "d2", "overall"))
    assert (d1["wins"], d1["ties"], d1["losses"], d1["inconsistent"], d1["unparseable_pairs"]) == (
        2,
        2,
        1,
        1,
        1,
    )
    assert (d2["wins"], d2["ties"], d2["losses"], d2["unparseable_pairs"]) == (1, 0, 1, 1)
    assert d1["unparseable_verdicts"] == 2 and overall["unparseable_verdicts"] == 4
    for group, scores in ((d1, D1_SCORES), (d2, D2_SCORES), (overall, D1_SCORES + D2_SCORES)):
        mean, low, high = bootstrap_mean_ci(scores)
        assert group["win_rate"] == pytest.approx(sum(scores) / len(scores)) == pytest.approx(mean)
        assert group["ci95"] == pytest.approx([low, high])
    assert overall["win_rate"] == pytest.approx(4 / 7)
    # Decisive verdicts: the answer shown first won 7 times (ex. 0-2 of d1 and 0, 2 of d2 once each, the
    # "pos" example twice), the second 5 times; 2 [[C]]; 6 of 7 parseable examples agree across orders.
    pos = overall["position"]
    assert (pos["first"], pos["second"], pos["tie"]) == (7, 5, 2)
    assert pos["first_share"] == pytest.approx(7 / 12)
    assert pos["consistent_share"] == pytest.approx(6 / 7)
    assert overall["orders"]["AB"] == {"a": 4, "b": 2, "tie": 1, "unparseable": 2}
    assert overall["orders"]["BA"] == {"a": 3, "b": 3, "tie": 1, "unparseable": 2}
    words_a = [len(r[1].split()) for r in D1 + D2]
    words_b = [len(r[2].split()) for r in D1 + D2]
    assert overall["length"]["a_words"] == pytest.approx(sum(words_a) / len(words_a))
    assert overall["length"]["b_words"] == pytest.approx(sum(words_b) / len(words_b))
    # Decisive outcomes between answers of different length: d1 #2 (longer A won), d2 #2 (shorter A won).
    assert (overall["length"]["decisive"], overall["length"]["longer_won"]) == (2, 1)
    md = (out / "results.md").read_text()
    assert "| overall | 7 | 3 | 2 | 2 | 57.1% |" in md
    assert (out / "win_rate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------------
# Parsing and the prompt
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "label"),
    [
        ("Assistant A is right. [[A]]", "A"),
        ("[[ B ]]", "B"),
        ("tie: [[C]]", "C"),
        ("[[A]] ... so my final verdict: [[A]]", "A"),
        ('"[[A]]" if A is better, "[[B]]" if B is better', None),  # an echoed format line is not a verdict
        ("A is better", None),
        ("[A] if assistant A's answer is better, [[C]] if assistant", None),  # an echo cut short
        ("[[B]] if banana is better", None),
        ("My verdict: [[B]]. If you disagree, ask again.", "B"),
        ("[A]", None),
        ("[[a]]", None),
        ("", None),
    ],
)
def test_parse_verdict(reply, label):
    assert parse_verdict(reply) == label


def test_default_prompt_renders_and_drops_empty_paragraphs():
    prompt = Prompt.load()
    values = {"instruction": "Q", "input": "", "reference": "R", "answer_a": "x {answer_b}", "answer_b": "y"}
    system, user = prompt.render(values)
    assert "[[A]]" in system and "[[C]]" in system
    assert "[Input]" not in user and "[The Start of Reference Answer]\nR\n" in user
    # Text inserted for one placeholder is never substituted again.
    assert "Assistant A's Answer]\nx {answer_b}\n" in user and "Assistant B's Answer]\ny\n" in user
    _, user = prompt.render({**values, "input": "ctx", "reference": ""})
    assert "[Input]\nctx" in user and "Reference" not in user


def test_prompt_file_errors(tmp_path):
    bad = tmp_path / "p.txt"
    bad.write_text("== user ==\n{instruction} {answer_a} {answer_b} {answr}\n")
    with pytest.raises(UsageError, match=r"unknown placeholders \['answr'\]"):
        Prompt.load(str(bad))
    bad.write_text("just text {instruction}")
    with pytest.raises(UsageError, match="no '== user ==' section"):
        Prompt.load(str(bad))


def test_chat_template_is_used_when_the_tokenizer_has_one(gpt2):
    from todi.judge import Item, Pair, encode_judge_prompt

    item = Item(Pair("d", 1, 0, "i", "", (), "a", "b"), "AB", "SYS", "USER")
    tokenizer = gpt2.__class__.from_pretrained(tiny.GPT2_DIR)
    assert gpt2.decode(encode_judge_prompt(gpt2, item)) == "SYS\n\nUSER\n\n"
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert tokenizer.decode(encode_judge_prompt(tokenizer, item)) == "<system>SYS\n<user>USER\n<assistant>"
    # A template that refuses the system role gets the system text folded into the user message.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
        "<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    )
    assert tokenizer.decode(encode_judge_prompt(tokenizer, item)) == "<user>SYS\n\nUSER"


def test_retry_after_header_in_seconds_or_as_a_date():
    import email.utils

    from todi.judge import _retry_after

    assert _retry_after("5") == 5.0 and _retry_after("0") == 0.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: go now
    in_30s = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 27.0 <= _retry_after(in_30s) <= 30.0


def test_verdict_log_drops_an_unfinished_last_line_and_refuses_a_broken_one(tmp_path):
    path = tmp_path / "judgments.jsonl"
    record = {"dataset": "d", "seed": 1, "index": 0, "order": "AB", "winner": "a"}
    path.write_text(json.dumps(record) + "\n" + '{"dataset": "d", "se')
    assert list(VerdictLog(path).load()) == [("d", 1, 0, "AB")]
    assert path.read_text() == json.dumps(record) + "\n"  # cut, so the next append starts a fresh line
    path.write_text("not json\n" + json.dumps(record) + "\n")
    with pytest.raises(Exception, match="line 1 is not a verdict record"):
        VerdictLog(path).load()


# ----------------------------------------------------------------------------------------------------------
# The local judge
# ----------------------------------------------------------------------------------------------------------


def test_local_judge_both_orders_ties_and_win_rate(tmp_path, judge_model, scripted, capsys):
    calls, _ = scripted
    a, b = eval_pair(tmp_path)
    out = tmp_path / "judged"
    assert tiny.run_todi(*judge_args(a, b, out, "--judge", judge_model, "--batch-size", "4")) == 0
    records = lines(out / "judgments.jsonl")
    assert len(records) == 2 * (len(D1) + len(D2)) == sum(calls)
    assert {(r["dataset"], r["index"], r["order"]) for r in records} == {
        (d, i, o) for d, rows in (("d1", D1), ("d2", D2)) for i in range(len(rows)) for o in ("AB", "BA")
    }
    check_hand_results(out)
    settings = json.loads((out / "judge.json").read_text())
    assert settings["judge"]["kind"] == "local" and settings["a"]["name"] == "alpha"
    assert "57.1%" in capsys.readouterr().out

    # A rerun resumes: nothing is asked again.
    calls.clear()
    assert tiny.run_todi(*judge_args(a, b, out, "--judge", judge_model)) == 0
    assert calls == [] and len(lines(out / "judgments.jsonl")) == len(records)
    # --limit 2 judges a subset of what is already there; --overwrite asks everything again.
    assert tiny.run_todi(*judge_args(a, b, out, "--judge", judge_model, "--limit", "2")) == 0
    assert calls == [] and json.loads((out / "results.json").read_text())["groups"]["overall"]["pairs"] == 4
    assert tiny.run_todi(*judge_args(a, b, out, "--judge", judge_model, "--overwrite")) == 0
    assert sum(calls) == len(records) and len(lines(out / "judgments.jsonl")) == len(records)
    check_hand_results(out)


def test_local_judge_resumes_after_a_crash_without_double_counting(tmp_path, judge_model, scripted):
    calls, state = scripted
    a, b = eval_pair(tmp_path)
    out = tmp_path / "judged"
    state["fail_on_call"] = 3
    assert tiny.run_todi(*judge_args(a, b, out, "--judge", judge_model, "--batch-size", "4")) == 1
    done = lines(out / "judgments.jsonl")
    assert len(done) == 8  # the two batches before the crash
    # A kill while writing leaves a line cut short: it is dropped and judged again.
    with (out / "judgments.jsonl").open("a") as file:
        file.write('{"dataset": "d2", "seed": 10, "ind')
    state["fail_on_call"] = None
    calls.clear()
    assert tiny.run_todi(*judge_args(a, b, out, "--judge", judge_model, "--batch-size", "4")) == 0
    assert sum(calls) == 18 - 8
    records = lines(out / "judgments.jsonl")
    assert records[:8] == done and len(records) == 18
    assert len({(r["dataset"], r["seed"], r["index"], r["order"]) for r in records}) == 18
    check_hand_results(out)


def test_several_seeds_average_per_example(tmp_path, judge_model, scripted):
    a, b = eval_pair(tmp_path, seeds=(10, 20))
    # At seed 20 the first d1 example goes the other way: A loses it there.
    flipped = [(D1[0][0], "bad one", "good one"), *D1[1:]]
    write_eval(tmp_path / "eval-a", "alpha", {("d1", 20): [(r[0], r[1]) for r in flipped]})
    write_eval(tmp_path / "eval-b", "beta", {("d1", 20): [(r[0], r[2]) for r in flipped]})
    out = tmp_path / "judged"
    assert tiny.run_todi(*judge_args(a, b, out, "--judge", judge_model, "--seeds", "10,20")) == 0
    d1 = json.loads((out / "results.json").read_text())["groups"]["d1"]
    scores = [0.5, *D1_SCORES[1:]]  # example 0: mean of a win (seed 10) and a loss (seed 20)
    assert (d1["pairs"], d1["examples"], d1["wins"], d1["losses"]) == (12, 5, 3, 3)
    mean, low, high = bootstrap_mean_ci(scores)
    assert d1["win_rate"] == pytest.approx(mean) and d1["ci95"] == pytest.approx([low, high])
    # By default only the smallest common seed is judged.
    out2 = tmp_path / "judged-default"
    assert tiny.run_todi(*judge_args(a, b, out2, "--judge", judge_model)) == 0
    assert json.loads((out2 / "results.json").read_text())["seeds"] == [10]


def test_changed_predictions_are_refused_on_resume(tmp_path, judge_model, scripted, capsys):
    a, b = eval_pair(tmp_path)
    out = tmp_path / "judged"
    assert tiny.run_todi(*judge_args(a, b, out, "--judge", judge_model)) == 0
    write_eval(tmp_path / "eval-b", "beta", {("d2", 10): [(r[0], r[2] + " edited") for r in D2]})
    before = (out / "judgments.jsonl").read_bytes()
    assert tiny.run_todi(*judge_args(a, b, out, "--judge", judge_model)) == 2
    err = capsys.readouterr().err
    assert "holds a verdict on d2 seed 10 example 0 (AB) for other answers" in err and "--overwrite" in err
    assert (out / "judgments.jsonl").read_bytes() == before
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(Prompt.load().system + "\n" + "== user ==\n{instruction}\n{answer_a}\n{answer_b}\n")
    assert tiny.run_todi(*judge_args(a, a, out, "--judge", judge_model, "--prompt", prompt)) == 2
    assert "verdicts made with another prompt" in capsys.readouterr().err


def test_real_path_end_to_end_on_a_tiny_random_judge(tmp_path, judge_model, gpt2):
    """`todi eval` of two tiny models, then `todi judge` with a tiny random judge: no scripting anywhere."""
    data = tiny.write_data(tmp_path / "tinyset.jsonl", 3, seed=5)
    models = [tiny.save_llama(tmp_path / f"m{i}", gpt2, hidden=16, seed=i) for i in (1, 2)]
    evaluated = tmp_path / "eval"
    args = ["eval", "--model", *models, "--name", "one", "two", "--data", data, "--seeds", "10"]
    args += ["--max-new-tokens", "4", "--device", "cpu", "--out", evaluated]
    assert tiny.run_todi(*args) == 0
    out = tmp_path / "judged"
    # An eval folder of two models must say which one.
    assert tiny.run_todi(*judge_args(evaluated, evaluated, out, "--judge", judge_model)) == 2
    a, b = evaluated / "predictions" / "one", evaluated / "predictions" / "two"
    assert tiny.run_todi(*judge_args(a, b, out, "--judge", judge_model, "--device", "cpu")) == 0
    records = lines(out / "judgments.jsonl")
    assert len(records) == 6 and all(isinstance(r["output"], str) for r in records)
    # Unparseable = replies without exactly one kind of tag, counted here with plain string search.
    unparseable = sum(sum(f"[[{t}]]" in r["output"] for t in "ABC") != 1 for r in records)
    results = json.loads((out / "results.json").read_text())
    assert results["groups"]["overall"]["unparseable_verdicts"] == unparseable
    assert results["groups"]["tinyset"]["pairs"] == 3


# ----------------------------------------------------------------------------------------------------------
# Refusals: one line and a hint, nothing written
# ----------------------------------------------------------------------------------------------------------


def assert_one_line_error(capsys, *fragments) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    text = err.splitlines()  # progress bars and log lines may surround the error
    at = [i for i, line in enumerate(text) if line.startswith("todi judge: error: ")]
    assert len(at) == 1 and text[at[0] + 1].startswith("hint: "), err
    assert all(f in text[at[0]] for f in fragments), text[at[0]]
    return text[at[0]]


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ("dataset", ("different data sets", "only --a has d3")),
        ("count", ("d2 seed 10: --a has 2 examples, --b has 3",)),
        ("instruction", ("d1 seed 10 example 1: the instruction differs",)),
        ("seed", ("share no seed",)),
        ("wanted-seed", ("--b has no predictions of d1 for seed 20",)),
    ],
)
def test_mismatched_prediction_sets_are_refused(tmp_path, capsys, change, fragments):
    a, b = eval_pair(tmp_path)
    extra = []
    if change == "dataset":
        write_eval(a, "alpha", {("d3", 10): [("q", "x")]})
    elif change == "count":
        write_eval(a, "alpha", {("d2", 10): [(r[0], r[1]) for r in D2[:2]]})
    elif change == "instruction":
        rows = [(r[0], r[1]) for r in D1]
        rows[1] = ("another question", rows[1][1])
        write_eval(a, "alpha", {("d1", 10): rows})
    elif change == "seed":
        for cell in (a / "predictions" / "alpha").glob("*/seed10.jsonl"):
            cell.rename(cell.with_name("seed30.jsonl"))
    else:
        write_eval(
            a, "alpha", {(d, 20): [(r[0], r[1]) for r in rows] for d, rows in (("d1", D1), ("d2", D2))}
        )
        extra = ["--seeds", "10,20"]
    out = tmp_path / "judged"
    assert tiny.run_todi(*judge_args(a, b, out, "--judge", "unused-model", *extra)) == 2
    assert_one_line_error(capsys, *fragments)
    assert not out.exists()


def test_missing_key_variable_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TODI_TEST_NO_SUCH_KEY", raising=False)
    a, b = eval_pair(tmp_path)
    out = tmp_path / "judged"
    args = [
        "--judge-url",
        "http://127.0.0.1:9/v1",
        "--judge-model",
        "m",
        "--judge-key-env",
        "TODI_TEST_NO_SUCH_KEY",
    ]
    assert tiny.run_todi(*judge_args(a, b, out, *args)) == 2
    line = assert_one_line_error(capsys, "--judge-key-env names $TODI_TEST_NO_SUCH_KEY, which is not set")
    assert not out.exists() and "export" not in line


def test_unreachable_url_fails_after_the_retries(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    a, b = eval_pair(tmp_path)
    args = ["--judge-url", f"http://127.0.0.1:{port}/v1", "--judge-model", "m", "--retries", "2"]
    args += ["--retry-wait", "0.01"]
    assert tiny.run_todi(*judge_args(a, b, tmp_path / "judged", *args)) == 1
    assert_one_line_error(capsys, f"127.0.0.1:{port}/v1/chat/completions failed 3 times", "cannot connect")


# ----------------------------------------------------------------------------------------------------------
# The HTTP judge against a real local server
# ----------------------------------------------------------------------------------------------------------


class JudgeServer:
    """An OpenAI chat-completions endpoint on a free local port that answers as the scripted judge; the
    first requests get the listed faults: 429 (with Retry-After), 500, a dropped connection, a slow
    reply past the client's timeout, or 401."""

    def __init__(self, faults=(), delay: float = 0.0) -> None:
        self.faults, self.delay = list(faults), delay
        self.log: list[dict] = []  # one entry per request: prompt, fault, time, authorization
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = body["messages"][-1]["content"]
                with server.lock:
                    fault = server.faults.pop(0) if server.faults else "ok"
                    server.log.append(
                        {
                            "prompt": user,
                            "fault": fault,
                            "time": time.monotonic(),
                            "auth": self.headers.get("Authorization"),
                        }
                    )
                if fault == "drop":
                    self.close_connection = True
                    return
                if fault in ("429", "500", "401"):
                    payload = b'{"error": {"message": "injected"}}'
                    self.send_response(int(fault))
                    if fault == "429":
                        self.send_header("Retry-After", "1")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                time.sleep(1.0 if fault == "slow" else server.delay)
                reply = {"choices": [{"message": {"role": "assistant", "content": scripted_reply(user)}}]}
                payload = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def served(self) -> dict[str, int]:
        """Prompts answered in full (a slow reply the client gave up on does not count), with counts."""
        counts: dict[str, int] = {}
        for entry in self.log:
            if entry["fault"] == "ok":
                counts[entry["prompt"]] = counts.get(entry["prompt"], 0) + 1
        return counts

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_factory():
    servers = []

    def make(*args, **kwargs):
        servers.append(JudgeServer(*args, **kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def http_args(server: JudgeServer, *extra) -> list:
    return ["--judge-url", server.url, "--judge-model", "scripted", "--retry-wait", "0.01", *extra]


def test_http_judge_retries_429_500_drops_and_timeouts(tmp_path, server_factory, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    secret = "sk-todi-test-9f8e7d6c5b4a"
    monkeypatch.setenv("TODI_TEST_JUDGE_KEY", secret)
    server = server_factory(["429", "500", "drop", "slow", "500"])
    a, b = eval_pair(tmp_path)
    out = tmp_path / "judged"
    args = http_args(
        server, "--judge-key-env", "TODI_TEST_JUDGE_KEY", "--concurrency", "3", "--timeout", "0.5"
    )
    assert tiny.run_todi(*judge_args(a, b, out, *args)) == 0
    assert server.faults == []  # every fault was served, and retried
    served = server.served()
    assert len(served) == 18 and set(served.values()) == {1}  # every prompt answered exactly once
    assert len(lines(out / "judgments.jsonl")) == 18
    check_hand_results(out)
    # The 429 said Retry-After: 1, and the same prompt came back no sooner.
    first = server.log[0]
    again = next(e for e in server.log[1:] if e["prompt"] == first["prompt"])
    assert first["fault"] == "429" and again["time"] - first["time"] >= 0.95
    # The key went to the server and nowhere else.
    assert {e["auth"] for e in server.log} == {f"Bearer {secret}"}
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in capsys.readouterr().err
    assert json.loads((out / "judge.json").read_text())["key_env"] == "TODI_TEST_JUDGE_KEY"


@pytest.mark.slow  # a subprocess start (imports) and a kill: ~20 s on 2 busy cores
def test_http_judge_resumes_after_a_kill(tmp_path, server_factory, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-default-variable")
    server = server_factory(delay=0.2)
    a, b = eval_pair(tmp_path)
    out = tmp_path / "judged"
    argv = [str(x) for x in judge_args(a, b, out, *http_args(server, "--concurrency", "1"))]
    env = {**tiny.ENV, "PYTHONPATH": str(tiny.REPO / "src"), "OPENAI_API_KEY": "sk-default-variable"}
    proc = subprocess.Popen([sys.executable, "-m", "todi.cli", *argv], env=env, stderr=subprocess.DEVNULL)
    verdicts = out / "judgments.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if verdicts.exists() and verdicts.read_text().count("\n") >= 5:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = verdicts.read_text().count("\n")
    assert 5 <= done < 18
    server.delay = 0.0
    assert tiny.run_todi(*argv) == 0
    records = lines(verdicts)
    assert len(records) == 18 and len({(r["dataset"], r["index"], r["order"]) for r in records}) == 18
    served = server.served()
    # Paid at most once per prompt, except the one request in flight when the process was killed.
    assert len(served) == 18 and sum(served.values()) <= 19
    assert {e["auth"] for e in server.log} == {"Bearer sk-default-variable"}
    check_hand_results(out)


def test_http_client_errors_are_not_retried(tmp_path, server_factory, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server = server_factory(["401"] * 50)
    a, b = eval_pair(tmp_path)
    assert (
        tiny.run_todi(*judge_args(a, b, tmp_path / "judged", *http_args(server, "--concurrency", "1"))) == 1
    )
    assert_one_line_error(capsys, "answered HTTP 401")
    assert len(server.log) <= 2  # no retries; one more may have started before the first failed


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "give exactly one judge"),
        ({"judge": "m", "judge_url": "http://x/v1", "judge_model": "m"}, "give exactly one judge"),
        ({"judge_url": "http://x/v1"}, "--judge-url needs --judge-model"),
        ({"judge_url": "localhost:8000", "judge_model": "m"}, "is not an http(s) URL"),
        ({"judge": "m", "limit": 0}, "--limit must be at least 1"),
    ],
)
def test_judge_options_are_checked_when_built(options, message):
    from todi.judge import Config

    with pytest.raises(UsageError, match=re.escape(message)):
        Config(a="x", b="y", out="z", **options)


def test_results_follow_the_stored_replies_not_the_stored_labels(tmp_path, judge_model, scripted):
    """Verdicts are parsed again from each stored reply on every run, so a parser fix applies to old
    judgments: labels tampered with on disk change nothing."""
    calls, _ = scripted
    a, b = eval_pair(tmp_path)
    out = tmp_path / "judged"
    assert tiny.run_todi(*judge_args(a, b, out, "--judge", judge_model)) == 0
    path = out / "judgments.jsonl"
    path.write_text("".join(json.dumps({**r, "label": "A", "winner": "a"}) + "\n" for r in lines(path)))
    calls.clear()
    assert tiny.run_todi(*judge_args(a, b, out, "--judge", judge_model)) == 0
    assert calls == []
    check_hand_results(out)
