"""What benchmarks/gpu_evidence.sh needs, checked on a CPU so that GPU minutes go to the run.

- configs/accelerate/*.yaml: accelerate 1.x reads each as intended (the launcher it picks, the plugin it
  builds from the launch environment), and no key of theirs is silently ignored;
- tests/sharded_probe.py sees the whole output head in a plain run (the GPU tests rely on it);
- run.py's time guard: a step past its time stops with SIGTERM (so todi can save) and is recorded;
- the gpu-short profile's whole pipeline at toy size (benchmarks/gpu_evidence_tiny.py): init-student,
  teacher cache, training with dev selection, evaluation with 3 seeds, held-out CE, and report.py's
  section, whose CE and paired differences are checked against independent computations.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tiny import ENV, GPT2_DIR, REPO, save_llama, write_data

CONFIGS = REPO / "configs" / "accelerate"
EXPERIMENT = REPO / "experiments" / "dolly_smollm2"


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _launch_env(config: str) -> tuple[object, dict[str, str]]:
    """What ``accelerate launch --config_file CONFIG`` decides and the environment it gives the workers."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    argv = ["--config_file", str(CONFIGS / config), "--num_processes", "2", "-m", "todi.cli", "distill"]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    if args.use_deepspeed:
        # as launch_command does before deepspeed_launcher
        fields = [*defaults.deepspeed_config, "mixed_precision"]
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


def test_ddp_config_launches_plain_data_parallel():
    args, env = _launch_env("ddp.yaml")
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_DEEPSPEED" not in env


def test_fsdp2_config_builds_an_fsdp2_plugin_wrapping_decoder_layers(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    args, env = _launch_env("fsdp2.yaml")
    assert args.use_fsdp and not args.use_deepspeed
    keys = yaml.safe_load((CONFIGS / "fsdp2.yaml").read_text())["fsdp_config"]
    ignored = [k for k in keys if k.upper() not in env]
    assert not ignored, f"fsdp2.yaml keys accelerate does not pass on: {ignored}"
    for name, value in env.items():
        if name.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(name, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert not plugin.cpu_ram_efficient_loading and not plugin.activation_checkpointing


def test_zero3_config_builds_a_stage_3_plugin_that_gathers_the_final_model(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    args, env = _launch_env("zero3.yaml")
    assert args.use_deepspeed and args.zero_stage == 3
    for name, value in env.items():
        if name.startswith("ACCELERATE_"):
            monkeypatch.setenv(name, value)
    plugin = DeepSpeedPlugin()
    zero = plugin.deepspeed_config["zero_optimization"]
    assert plugin.zero_stage == 3 and zero["stage"] == 3
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == "none"
    assert plugin.zero3_init_flag is True
    # todi fills these from its own options (parallel.make_accelerator): the config must leave them open
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == "auto"
    assert plugin.deepspeed_config["gradient_clipping"] == "auto"


@pytest.mark.slow
def test_sharded_probe_records_the_whole_head_of_a_plain_run(
    tmp_path, gpt2, fresh_accelerate_state, monkeypatch
):
    probe = _module(Path(__file__).resolve().parent / "sharded_probe.py", "sharded_probe")
    teacher = save_llama(tmp_path / "teacher", gpt2, hidden=64, seed=1)
    student = save_llama(tmp_path / "student", gpt2, hidden=32, seed=2)
    data = write_data(tmp_path / "train.jsonl", 16, seed=0)
    record = tmp_path / "record.json"
    argv = ["probe", str(record), "distill", "--teacher", str(teacher), "--student", str(student),
            "--data", str(data), "--max-steps", "2", "--batch-size", "4", "--max-length", "64",
            "--max-prompt-length", "32", "--report-to", "none", "--out", str(tmp_path / "run")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    assert probe.main() == 0
    seen = json.loads(record.read_text())
    assert seen["calls"] == 2  # one fused-loss call per step (one micro-batch each)
    assert seen["weight_shape"] == [len(gpt2), 32] and seen["weight_numel"] == len(gpt2) * 32
    assert not seen["weight_is_dtensor"]


def test_a_step_past_its_time_is_stopped_with_sigterm_and_recorded(tmp_path):
    run = _module(EXPERIMENT / "run.py", "dolly_run")
    runner = run.Runner(tmp_path, threads=1, keep_going=True)
    marker = tmp_path / "got-sigterm"
    child = (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *_: (open({str(marker)!r}, 'w').close(), sys.exit(143)))\n"
        "time.sleep(60)\n"
    )
    started = time.monotonic()
    assert runner("slow", ["-c", child], timeout=3, todi=False) == "timed out"
    assert time.monotonic() - started < 30 and marker.exists(), "the step must get SIGTERM at its limit"
    assert runner("late", ["-c", "pass"], timeout=0, todi=False) == "skipped"
    assert runner("quick", ["-c", "pass"], timeout=30, todi=False) == "done"
    steps = json.loads((tmp_path / "run_info.json").read_text())["steps"]
    assert steps["slow"]["status"] == "timed out" and "exit 143" in steps["slow"]["reason"]
    assert steps["late"] == {"status": "skipped", "seconds": 0.0, "reason": "no time left in the budget"}
    assert steps["quick"]["status"] == "done"
    strict = run.Runner(tmp_path, threads=1)  # without a time limit a failed step ends the run, as before
    with pytest.raises(SystemExit, match="failed"):
        strict("broken", ["-c", "raise SystemExit(3)"], todi=False)


def _independent_ce(model_dir: Path, run_dir: Path, data: Path, n: int) -> float:
    """Cross-entropy of the reference answers in float64, from the logits up (the encoding is the
    pipeline's: what is checked is the loss arithmetic, the masking and the averaging over tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from todi.data import encode_examples, load_examples

    config = json.loads((run_dir / "run_info.json").read_text())["config"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = load_examples(str(data / "dolly" / "test.jsonl"), "test", max_examples=n)
    encoded, _ = encode_examples(examples, tokenizer, template=config["template"],
                                 max_length=config["max_length"], max_prompt_length=config["max_prompt_length"])  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    total, count = 0.0, 0
    for example in encoded:  # one at a time: no padding at all
        ids = torch.tensor([example["input_ids"]])
        labels = torch.tensor(example["labels"])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0].log_softmax(-1)
        for t in range(1, len(labels)):
            if labels[t] != -100:
                total -= float(logp[t - 1, labels[t]])
                count += 1
    return total / count


@pytest.mark.slow
def test_gpu_short_pipeline_end_to_end_at_toy_size(tmp_path):
    if not (GPT2_DIR / "tokenizer.json").is_file():
        pytest.skip(f"GPT-2 tokenizer not found at {GPT2_DIR} (set TODI_DATA)")
    tiny = _module(REPO / "benchmarks" / "gpu_evidence_tiny.py", "gpu_evidence_tiny")
    paths = tiny.build(tmp_path, objectives="sft,todi")
    run_dir = tmp_path / "run"
    env = {**ENV, "TODI_DATA": str(paths["data"]), "TODI_CACHE": str(tmp_path / "cache")}
    env["PYTHONPATH"] = str(REPO / "src")
    command = [sys.executable, str(EXPERIMENT / "run.py"), "--profile", str(paths["profile"]),
               "--teacher", str(paths["teacher"]), "--out", str(run_dir), "--time-limit", "900"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1000)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    info = json.loads((run_dir / "run_info.json").read_text())
    assert {s["status"] for s in info["steps"].values()} == {"done"}, info["steps"]
    expected = {"init-student", "cache-teacher", "train-sft", "train-todi", "eval-teacher", "eval-sft",
                "eval-todi", "eval-compare", "heldout-ce"}  # fmt: skip
    assert set(info["steps"]) == expected
    results = json.loads((run_dir / "eval" / "all" / "results.json").read_text())
    assert set(results["models"]) == {"teacher", "sft", "todi"}
    assert results["datasets"] == ["dolly", "self-inst", "vicuna"] and results["seeds"] == [10, 20, 30]
    for objective in ("sft", "todi"):  # dev ROUGE-L every 3 of 6 steps picked best/, which was evaluated
        dev = [
            r
            for r in map(json.loads, (run_dir / "runs" / objective / "metrics.jsonl").open())
            if "dev_rougeL" in r
        ]
        assert [r["step"] for r in dev] == [3, 6]
        assert results["models"][objective]["path"].endswith(f"{objective}/best")

    ce = json.loads((run_dir / "heldout_ce.json").read_text())["models"]
    assert set(ce) == {"teacher", "student-init", "sft", "todi"}
    n = tiny.TINY_SIZES["heldout_examples"]
    want = _independent_ce(run_dir / "student-init", run_dir, paths["data"], n)
    assert math.isclose(ce["student-init"]["ce"], want, rel_tol=1e-5), (ce["student-init"], want)

    # report.py writes its section and leaves the rest of the doc alone; run twice, the section is replaced.
    # Per-example scores are replaced by known values first: the table must show their paired mean.
    seeds = results["seeds"]
    for model, bias in (("sft", 0.0), ("todi", 0.1)):
        for dataset in results["datasets"]:
            for k, seed in enumerate(seeds):
                path = run_dir / "eval" / model / "predictions" / model / dataset / f"seed{seed}.jsonl"
                rows = [json.loads(x) for x in path.read_text().splitlines()]
                for i, row in enumerate(rows):
                    row["rougeL"] = 0.01 * ((7 * i + 3 * k + len(dataset)) % 11) + bias * (i % 3)
                path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected_diff = []
    for dataset in results["datasets"]:
        count = results["models"]["todi"]["datasets"][dataset]["n_examples"]
        expected_diff += [0.1 * (i % 3) for i in range(count)]  # the seed-dependent part cancels in the pair
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nThe CPU run, untouched.\n")
    report = [
        sys.executable,
        str(EXPERIMENT / "report.py"),
        str(run_dir),
        "--section",
        "gpu-short",
        "--doc",
        str(doc),
    ]
    for _ in range(2):
        done = subprocess.run(report, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    text = doc.read_text()
    assert text.startswith("# Results\n\nThe CPU run, untouched.\n")
    assert text.count("<!-- section:gpu-short -->") == 1 and text.count("<!-- /section:gpu-short -->") == 1
    mean = sum(expected_diff) / len(expected_diff)
    row = next(line for line in text.splitlines() if line.startswith("| ToDi − SFT |"))
    assert f"| {mean:+.2f} |" in row, (row, mean)
    assert f"paired by example over all {len(expected_diff)} examples" in text
    teacher_row = next(line for line in text.splitlines() if line.startswith("| Teacher"))
    assert f"{ce['teacher']['ce']:.3f}" in teacher_row
    todi_row = next(line for line in text.splitlines() if line.startswith("| ToDi |"))
    assert f"{ce['todi']['ce']:.3f} | {ce['todi']['ce'] - ce['teacher']['ce']:+.3f}" in todi_row


def test_summary_keeps_each_phase_and_reads_pytest_outcomes(tmp_path):
    summary = _module(REPO / "benchmarks" / "gpu_evidence_summary.py", "gpu_evidence_summary")
    xml = tmp_path / "cuda.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_cuda" name="test_a" time="1.5"/>'
        '<testcase classname="tests.test_cuda" name="test_b" time="0.1"><failure message="off by 2e-3"/></testcase>'
        '<testcase classname="tests.test_cuda" name="test_c" time="0"><skipped message="needs a CUDA device"/></testcase>'
        "</testsuite></testsuites>"
    )
    parsed = summary.junit_tests(xml)
    assert parsed["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert parsed["tests"][1] == {"name": "tests.test_cuda::test_b", "outcome": "failed", "seconds": 0.1,
                                  "message": "off by 2e-3"}  # fmt: skip
    log = tmp_path / "cuda.log"  # a pytest stopped by `timeout` leaves only its -v log
    log.write_text("tests/test_cuda.py::test_a PASSED [ 50%]\ntests/test_cuda.py::test_b[x] FAILED [100%]\n")
    parsed = summary.junit_tests(tmp_path / "missing.xml", log)
    assert parsed["counts"] == {"passed": 1, "failed": 1} and "JUnit XML was not written" in parsed["note"]
    skipped = tmp_path / "skipped.xml"
    skipped.write_text(
        '<testsuite><testcase classname="t" name="a"><skipped message="no GPU"/></testcase></testsuite>'
    )
    out = tmp_path / "summary.json"
    script = str(REPO / "benchmarks" / "gpu_evidence_summary.py")
    for argv in (["setup", "done", "3"], ["cuda", "passed", "7", "--junit", str(skipped)]):
        subprocess.run([sys.executable, script, str(out), *argv], check=True, capture_output=True)
    phases = json.loads(out.read_text())["phases"]
    assert phases["setup"] == {"status": "done", "seconds": 3.0}  # earlier phases stay
    assert phases["cuda"]["status"] == "skipped" and phases["cuda"]["reason"] == "no GPU"
