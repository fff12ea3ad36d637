"""todi.integrations: TodiTrainer against `todi distill`, a todi divergence inside TRL's GKDTrainer, and
what LossOutput's fields mean over the micro-batches of a step (against float64 references)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import trainer_run
from helpers import IGNORE, ref_log_softmax, ref_todi_share, sigmoid
from tiny import ENV, GPT2_DIR, REPO, TEXT, TINY, run_todi
from tiny import gpt2_tokenizer as _tokenizer
from tiny import save_llama as _save_llama
from tiny import write_data as _write_data
from todi.losses import LossOutput, distillation_loss, fused_linear_distillation_loss

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
needs_tokenizer = pytest.mark.skipif(not GPT2_DIR.is_dir(), reason=f"GPT-2 tokenizer not found at {GPT2_DIR}")
STEPS = 8  # 48 examples in micro-batches of 4, 2 per step: 6 steps an epoch, so the runs cross into epoch 2


# ---- LossOutput over the micro-batches of a step ---------------------------------------------------


def _ref_step(student: np.ndarray, teacher: np.ndarray, labels: np.ndarray, T: float, beta: float) -> dict:
    """Per-token CE, ToDi divergence and ToDi FKL share over every supervised position of the step,
    in float64 from the formulas."""
    keep = labels != IGNORE
    s, t, y = student[keep], teacher[keep], labels[keep]
    ce = -ref_log_softmax(s)[np.arange(len(y)), y]
    lq, lp = ref_log_softmax(s / T), ref_log_softmax(t / T)
    p, q = np.exp(lp), np.exp(lq)
    a = sigmoid(beta * (lp - lq))
    kd = (a * p * (lp - lq) + (1 - a) * q * (lq - lp)).sum(-1)
    return {"ce": ce.mean(), "kd": kd.mean(), "todi_weight": ref_todi_share(s, t, T, beta).mean()}


@pytest.mark.parametrize("fused", [False, True], ids=["materialised", "fused"])
def test_loss_output_shares_add_up_to_the_step(fused, one_intra_op_thread):
    g = torch.Generator().manual_seed(0)
    hidden, vocab, kd_rate = 8, 23, 0.3
    w_s, w_t = torch.randn(vocab, hidden, generator=g), torch.randn(vocab, hidden, generator=g) * 1.5
    micro = []
    for n, ignored in ((12, 3), (9, 5)):  # unequal micro-batches: shares differ from halves
        h_s, h_t = torch.randn(n, hidden, generator=g), torch.randn(n, hidden, generator=g)
        labels = torch.randint(0, vocab, (n,), generator=g)
        labels[:ignored] = IGNORE
        micro.append((h_s, h_t, labels))
    step_tokens = sum(int((labels != IGNORE).sum()) for _, _, labels in micro)
    options = {"divergence": "todi", "kd_rate": kd_rate, "temperature": 2.0, "beta": 1.0}

    def call(h_s, h_t, labels, num_items):
        if fused:
            return fused_linear_distillation_loss(
                h_s, w_s, h_t, w_t, labels, num_items_in_batch=num_items, compile=False, **options
            )
        return distillation_loss(h_s @ w_s.T, h_t @ w_t.T, labels, num_items_in_batch=num_items, **options)

    outs = [call(*m, num_items=step_tokens) for m in micro]
    student = torch.cat([h @ w_s.T for h, _, _ in micro]).double().numpy()
    teacher = torch.cat([h @ w_t.T for _, h, _ in micro]).double().numpy()
    labels = torch.cat([y for _, _, y in micro]).numpy()
    ref = _ref_step(student, teacher, labels, T=2.0, beta=1.0)
    # One micro-batch holds only its share; the shares sum to the step's per-token value.
    assert float(outs[0].ce) < 0.8 * ref["ce"]
    assert sum(float(o.ce) for o in outs) == pytest.approx(ref["ce"], rel=1e-5)
    assert sum(float(o.kd) for o in outs) == pytest.approx(ref["kd"], rel=1e-4)
    total = LossOutput.total(outs)
    assert float(total.ce) == pytest.approx(ref["ce"], rel=1e-5)
    assert float(total.kd) == pytest.approx(ref["kd"], rel=1e-4)
    assert float(total.loss) == pytest.approx((1 - kd_rate) * ref["ce"] + kd_rate * ref["kd"], rel=1e-5)
    assert float(total.todi_weight) == pytest.approx(ref["todi_weight"], rel=1e-5)
    assert total.num_tokens == step_tokens
    # Without the step's count, each call gives its own per-token means.
    alone = call(*micro[1], num_items=None)
    keep = micro[1][2] != IGNORE
    own = _ref_step(student[-len(keep) :], teacher[-len(keep) :], labels[-len(keep) :], T=2.0, beta=1.0)
    assert float(alone.ce) == pytest.approx(own["ce"], rel=1e-5)
    assert float(alone.kd) == pytest.approx(own["kd"], rel=1e-4)


def test_import_stays_light():
    code = (
        "import sys, todi, todi.integrations, todi.losses\n"
        "heavy = [m for m in ('transformers.trainer', 'trl') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], env=ENV, check=True, timeout=120)


def test_config_checks_itself():
    from todi.integrations import TodiDistillationConfig

    config = TodiDistillationConfig(output_dir="unused", divergence="skl", divergence_params='{"skew": 0.2}')
    assert config.loss_options()["skew"] == 0.2 and config.loss_options()["temperature"] == 2.0
    with pytest.raises(ValueError, match="no parameter 'beta'"):
        TodiDistillationConfig(output_dir="unused", divergence="fkl", divergence_params={"beta": 2.0})
    with pytest.raises(ValueError, match="kd_rate must be in"):
        TodiDistillationConfig(output_dir="unused", kd_rate=1.5)
    with pytest.raises(ValueError, match="unknown divergence"):
        TodiDistillationConfig(output_dir="unused", divergence="nope")


# ---- TodiTrainer == todi distill --------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> SimpleNamespace:
    if not GPT2_DIR.is_dir():
        pytest.skip(f"GPT-2 tokenizer not found at {GPT2_DIR}")
    root = tmp_path_factory.mktemp("integrations")
    tokenizer = _tokenizer()
    return SimpleNamespace(
        root=root,
        teacher=_save_llama(root / "teacher", tokenizer, hidden=64, seed=1),
        student=_save_llama(root / "student", tokenizer, hidden=32, seed=2),
        data=_write_data(root / "train.jsonl", 48, seed=0),
    )


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def reference(assets) -> Path:
    """`todi distill` with 2 micro-batches per step, one process."""
    out = assets.root / "todi-distill"
    argv = ["distill", "--teacher", assets.teacher, "--student", assets.student, "--data", assets.data,
            "--max-steps", STEPS, "--grad-accum", 2, "--log-every", 1, "--save-every", 0, "--out", out, *TINY]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TODI_COMPILE", "0")
        assert run_todi(*argv) == 0
    _reset_accelerate()
    return out


def _settings(assets, out: Path, **extra) -> dict:
    return {"student": str(assets.student), "teacher": str(assets.teacher), "data": str(assets.data),
            "out": str(out), "max_steps": STEPS, **extra}  # fmt: skip


def _train_in_process(monkeypatch, **settings):
    """A run in this process; accelerate's process-wide state is reset before (an earlier run's) and
    kept after it, for the returned trainer (the tests' fresh_accelerate_state fixture resets it last)."""
    monkeypatch.setenv("TODI_COMPILE", "0")
    _reset_accelerate()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as todi distill ran (run_todi), for the same float sums
    try:
        return trainer_run.train(**settings)
    finally:
        torch.set_num_threads(threads)


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def _check_logs(history: list[dict], reference: Path) -> None:
    """Per step: loss, ce, kd, todi_weight and grad norm as `todi distill` logged them."""
    todi = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    logged = [record for record in history if "loss" in record]
    assert [r["step"] for r in logged] == [r["step"] for r in todi] == list(range(1, STEPS + 1))
    for ours, theirs in zip(logged, todi, strict=True):
        for key in ("loss", "ce", "kd", "todi_weight", "grad_norm"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5), (ours["step"], key)


@pytest.mark.slow
@needs_tokenizer
def test_trainer_with_grad_accum_2_equals_todi_distill(assets, reference, tmp_path, monkeypatch):
    trainer = _train_in_process(monkeypatch, **_settings(assets, tmp_path / "hf", grad_accum=2))
    assert _max_diff(reference / "final", assets.student) > 1e-4, "nothing was trained"
    assert _max_diff(tmp_path / "hf" / "final", reference / "final") <= 1e-6
    _check_logs(trainer.state.log_history, reference)

    # evaluate(): one batch of 6 examples; eval_loss against float64 CE and ToDi of the trained student.
    examples = trainer.train_dataset[:6]
    trainer.args.per_device_eval_batch_size = 8
    eval_loss = trainer.evaluate(eval_dataset=examples)["eval_loss"]
    batch = trainer.data_collator(examples)
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        s = trainer.model(**inputs).logits[:, :-1].double()
        t = trainer.teacher_model(**inputs).logits[:, :-1].double()
    vocab = s.shape[-1]
    labels = batch["labels"][:, 1:].reshape(-1).numpy()
    ref = _ref_step(s.reshape(-1, vocab).numpy(), t.reshape(-1, vocab).numpy(), labels, T=2.0, beta=1.0)
    assert eval_loss == pytest.approx(0.5 * ref["ce"] + 0.5 * ref["kd"], rel=1e-5)


@pytest.mark.slow
@needs_tokenizer
def test_trainer_on_two_processes_equals_todi_distill(assets, reference, tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(_settings(assets, tmp_path / "ddp", grad_accum=1)))
    env = {**ENV, "PYTHONPATH": f"{REPO / 'src'}:{REPO / 'tests'}"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests" / "trainer_run.py"), str(settings)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    history = json.loads((tmp_path / "ddp" / "log_history.json").read_text())
    assert history[-1]["world_size"] == 2
    assert _max_diff(tmp_path / "ddp" / "final", reference / "final") <= 1e-6
    _check_logs(history, reference)


@pytest.mark.slow
@needs_tokenizer
def test_trainers_own_sampler_accumulation_equals_one_big_batch(assets, tmp_path, monkeypatch):
    """batch_plan="trainer": Trainer's seeded random order, 2 micro-batches of 4 per step, make the
    updates of 1 batch of the same 8 examples (the loss is normalised by the step's tokens)."""
    runs = {}
    for name, batch_size, accum in (("accum", 4, 2), ("big", 8, 1)):
        settings = _settings(assets, tmp_path / name, batch_size=batch_size, grad_accum=accum, max_steps=3)
        runs[name] = _train_in_process(monkeypatch, **settings, batch_plan="trainer")
    assert _max_diff(tmp_path / "accum" / "final", assets.student) > 1e-4, "nothing was trained"
    assert _max_diff(tmp_path / "accum" / "final", tmp_path / "big" / "final") <= 1e-5
    logs = {name: [r for r in run.state.log_history if "ce" in r] for name, run in runs.items()}
    for a, b in zip(logs["accum"], logs["big"], strict=True):
        for key in ("loss", "ce", "kd", "todi_weight"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)


class _Recorder:
    """A TrainerCallback noting the steps it saw logged and saved."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        recorder = self

        class Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "ce" in logs:
                    recorder.logged.append(state.global_step)

            def on_save(self, args, state, control, **kwargs):
                recorder.saved.append(state.global_step)

        self.callback = Callback()
        self.logged: list[int] = []
        self.saved: list[int] = []


@pytest.mark.slow
@needs_tokenizer
def test_checkpointing_resume_and_callbacks_keep_the_same_run(assets, reference, tmp_path, monkeypatch):
    # Gradient checkpointing recomputes the forward in backward; a stopped run resumes from checkpoint-4.
    out = tmp_path / "hf"
    recorder = _Recorder()
    settings = _settings(assets, out, grad_accum=2, save_steps=4, activation_checkpointing=True)
    first = _train_in_process(monkeypatch, **settings, callbacks=[recorder.callback])
    assert recorder.logged == list(range(1, STEPS + 1)) and recorder.saved == [4, 8]
    assert first.model.is_activation_checkpointing
    assert _max_diff(out / "final", reference / "final") <= 1e-6
    resumed_out = tmp_path / "resumed"
    settings = _settings(assets, resumed_out, grad_accum=2, save_steps=4, activation_checkpointing=True)
    resumed = _train_in_process(monkeypatch, **settings, resume=str(out / "checkpoint-4"))
    assert _max_diff(resumed_out / "final", reference / "final") <= 1e-6
    _check_logs(resumed.state.log_history, reference)  # steps 1-4 come with checkpoint-4
    _check_logs(first.state.log_history, reference)


@pytest.mark.slow
@needs_tokenizer
def test_trainer_from_a_teacher_cache_equals_todi_distill(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("TODI_COMPILE", "0")
    cache = tmp_path / "cache"
    assert run_todi("cache-teacher", "--teacher", assets.teacher, "--data", assets.data, "--out", cache,
                    "--max-length", 64, "--max-prompt-length", 32, "--top-k", 16) == 0  # fmt: skip
    _reset_accelerate()
    steps = 3
    out = tmp_path / "todi"
    assert run_todi("distill", "--teacher-cache", cache, "--student", assets.student, "--data", assets.data,
                    "--max-steps", steps, "--grad-accum", 2, "--log-every", 1, "--save-every", 0,
                    "--out", out, *TINY) == 0  # fmt: skip
    _reset_accelerate()
    settings = _settings(assets, tmp_path / "hf", grad_accum=2, max_steps=steps)
    settings.update(teacher=None, teacher_cache=str(cache))
    trainer = _train_in_process(monkeypatch, **settings)
    assert _max_diff(tmp_path / "hf" / "final", out / "final") <= 1e-6
    todi = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in trainer.state.log_history if "ce" in r]
    assert [r["kd"] for r in logged] == pytest.approx([r["kd"] for r in todi], rel=1e-5)


# ---- TRL: a todi divergence through GKDTrainer's public hook ----------------------------------------


@needs_tokenizer
def test_gkd_trainer_runs_a_todi_divergence(assets, tmp_path, one_intra_op_thread):
    pytest.importorskip("trl", reason="TRL is not installed")
    from datasets import Dataset
    from transformers import LlamaForCausalLM

    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError as err:
        pytest.skip(f"this TRL has no experimental GKDTrainer ({err})")
    from todi.integrations import gkd_divergence

    tokenizer = _tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    words = TEXT.split()
    rng = np.random.default_rng(0)
    records = [
        {"messages": [
            {"role": "user", "content": " ".join(rng.choice(words, 4))},
            {"role": "assistant", "content": " ".join(rng.choice(words, int(rng.integers(2, 7))))},
        ]}
        for _ in range(8)
    ]  # fmt: skip
    student = LlamaForCausalLM.from_pretrained(assets.student)
    teacher = LlamaForCausalLM.from_pretrained(assets.teacher)
    args = GKDConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, lmbda=0.0,
                     report_to="none", use_cpu=True, max_length=64, save_strategy="no")  # fmt: skip
    trainer = GKDTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.generalized_jsd_loss = gkd_divergence("todi", temperature=2.0, beta=1.0)

    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, batch)  # TRL's own compute_loss calls the hook
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:].reshape(-1).numpy()
    vocab = s.shape[-1]
    ref = _ref_step(
        s.reshape(-1, vocab).double().numpy(), t.reshape(-1, vocab).double().numpy(), labels, 2.0, 1.0
    )
    assert (labels != IGNORE).sum() > 8
    assert float(loss.detach()) == pytest.approx(
        ref["kd"], rel=1e-4
    )  # kd_rate 1: the divergence alone, like GKD

    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.train()
    assert all(np.isfinite(r["loss"]) for r in trainer.state.log_history if "loss" in r)
    assert max((student.state_dict()[k] - before[k]).abs().max().item() for k in before) > 0


@pytest.mark.parametrize(("name", "trl_beta"), [("fkl", 0.0), ("rkl", 1.0), ("js", 0.5)])
def test_gkd_hook_matches_trls_own_divergences(name, trl_beta, one_intra_op_thread):
    """TRL's generalised JSD at beta 0 / 1 / 0.5 is forward KL / reverse KL / JS; through the hook, todi's
    fkl / rkl / js give the same value and gradient (temperature 1, as GKD calls its loss)."""
    pytest.importorskip("trl", reason="TRL is not installed")
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError as err:
        pytest.skip(f"this TRL has no experimental GKDTrainer ({err})")
    from todi.integrations import gkd_divergence

    g = torch.Generator().manual_seed(1)
    student = (torch.randn(3, 7, 29, generator=g, dtype=torch.float64) * 2).requires_grad_()
    teacher = torch.randn(3, 7, 29, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 29, (3, 7), generator=g)
    labels[:, :2] = IGNORE
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=trl_beta, num_items_in_batch=17)
    (grad_theirs,) = torch.autograd.grad(theirs, student)
    ours = gkd_divergence(name, temperature=1.0)(student, teacher, labels, beta=0.7, num_items_in_batch=17)
    (grad_ours,) = torch.autograd.grad(ours, student)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
@needs_tokenizer
def test_push_to_hub_uploads_the_student_alone(assets, tmp_path, monkeypatch):
    """Offline up to the upload call: the folder Trainer uploads holds the student (not the teacher, which
    is no part of the model) and its tokenizer."""
    uploads: list[dict] = []

    class FakeHub:
        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            files = {p.name for p in Path(folder_path).iterdir()}
            weights = load_file(str(Path(folder_path) / "model.safetensors"))
            uploads.append({"repo_id": repo_id, "files": files, "weights": weights})

    monkeypatch.setattr("transformers.trainer.hf_api", lambda: FakeHub())
    settings = _settings(assets, tmp_path / "hf", max_steps=1)
    trainer = _train_in_process(monkeypatch, **settings, push_to_hub=True, hub_model_id="someone/tiny-todi")
    trainer.push_to_hub()  # after the push save_model(...) made (args.push_to_hub pushes on every save)
    assert len(uploads) == 2
    upload = uploads[-1]
    assert upload["repo_id"] == "someone/tiny-todi"
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= upload["files"]
    student = load_file(str(assets.student / "model.safetensors"))
    assert {k: v.shape for k, v in upload["weights"].items()} == {k: v.shape for k, v in student.items()}
    trained = trainer.model.state_dict()
    assert all(torch.equal(upload["weights"][k], trained[k]) for k in upload["weights"])
