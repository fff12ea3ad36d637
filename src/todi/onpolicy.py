"""Which responses a training step learns from: the data's, the student's own samples, or the teacher's.

Off-policy distillation trains on the data set's fixed responses, so the student never sees its own
mistakes during training but must continue from them at test time (exposure bias). With ``--lmbda``,
a step's responses are replaced, with that probability, by the student's own samples for the same
prompts (on-policy, as TRL's GKD trainer mixes them); with ``--seq-kd`` the teacher's samples replace
the data (sequence-level KD, Kim & Rush 2016); with ``--replay-buffer`` part of a generated batch is
drawn from the last generated examples instead of being generated again (DistiLLM's replay buffer).

Determinism is the design constraint: a step's choice and every sample are functions of
(seed, step, example) only, never of the rank or of the batch a sample shares:

- the choice is made once per optimizer step (all its micro-batches, on all ranks): GKD decides per
  batch, and with accumulation one decision per step keeps the update an average over one kind of
  data, and lets sharded ranks run their generation passes together;
- each sequence is sampled with a generator of its own, seeded by (seed, step, example index), through
  the Gumbel-max trick (argmax of log-probabilities plus Gumbel noise is a sample from the softmax), so
  the samples do not depend on how examples are grouped into micro-batches or ranks;
- the replay buffer is global: every rank holds the same one (new samples are gathered from all ranks
  and appended in micro-batch order), and draws from it are seeded by (seed, step, micro-batch).

So two processes and one process with gradient accumulation make the same choices, draw the same
samples and give the same update, and a resumed run (the buffer is part of the checkpoint) continues
exactly as if it had never stopped.

When the teacher has its own tokenizer (``--cross-tokenizer``), a :class:`Retokenizer` turns each
sample into a training example of both tokenizers (from its text; see docs/cross_tokenizer.md); this
module only passes the samples along.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from todi.data import IGNORE_INDEX, supervised_positions

__all__ = [
    "GeneratedStats",
    "PolicyOptions",
    "ReplayBuffer",
    "ResponseSource",
    "Retokenizer",
    "SamplerTokens",
    "StepBatches",
    "prompt_of",
    "sample_responses",
    "sequence_seed",
]

Kind = Literal["data", "student", "teacher"]
# "input_ids", "labels" (lists of ids); with --cross-tokenizer the teacher's side too (todi.xtok.pairing)
Encoded = dict[str, Any]


@dataclass(frozen=True)
class PolicyOptions:
    """The options of ``todi distill`` that choose a step's responses (see the module docstring)."""

    lmbda: float = 0.0
    seq_kd: bool = False
    on_policy_ce: bool = False
    replay_buffer: int = 0
    replay_ratio: float = 0.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256

    @property
    def generates(self) -> bool:
        return self.lmbda > 0 or self.seq_kd


def sequence_seed(*parts: object) -> int:
    """A 63-bit seed from its parts (seed, step, example, ...): stable across processes and Python runs,
    unlike ``hash``."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def prompt_of(example: Encoded) -> list[int]:
    """The prompt ids of an encoded example: everything before its first supervised label."""
    labels = example["labels"]
    start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    return list(example["input_ids"][:start])


def _warpers(temperature: float, top_k: int, top_p: float) -> Any:
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


class _PerRowSampling:
    """A logits processor that turns greedy decoding into sampling with one generator per row.

    ``argmax(log softmax(z) + g)`` with ``g`` standard Gumbel noise is distributed as ``softmax(z)``; the
    noise of row r comes from its own generator, so a row's sample does not depend on its neighbours.
    Temperature, top-k and top-p are transformers' own warpers, applied first.
    """

    def __init__(self, seeds: Sequence[int], options: PolicyOptions, device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.warpers = _warpers(options.temperature, options.top_k, options.top_p)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        scores = self.warpers(input_ids, scores.float())
        log_probs = torch.log_softmax(scores, dim=-1)
        uniform = torch.stack(
            [torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.generators]
        )
        # -log(-log(0)) = -inf: a zero draw never wins; filtered tokens stay at -inf.
        return log_probs - torch.log(-torch.log(uniform))


def sample_responses(
    generate: Callable[..., Tensor],
    prompts: Sequence[list[int]],
    seeds: Sequence[int],
    options: PolicyOptions,
    *,
    pad_id: int,
    eos_ids: Sequence[int],
    device: torch.device,
    synced_gpus: bool = False,
) -> list[list[int]]:
    """One sampled response per prompt (up to and including its first EOS), through ``generate`` (a
    model's ``generate``): left-padded batch, KV cache, sampling seeded per row by ``seeds``."""
    from todi.evaluation import continue_prompts

    return continue_prompts(
        generate,
        prompts,
        list(eos_ids) or [-1],  # no EOS: every response runs to max_new_tokens
        device=device,
        max_new_tokens=options.max_new_tokens,
        # Greedy over the processor's Gumbel-perturbed scores is the sampling; the model's own
        # generation config (repetition penalty, n-gram bans, sampling flags) must not change it.
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        temperature=None,
        top_k=None,
        top_p=None,
        logits_processor=[_PerRowSampling(seeds, options, device)],
        pad_token_id=pad_id,
        eos_token_id=list(eos_ids) or None,
        use_cache=True,
        synced_gpus=synced_gpus,
    )


@dataclass(frozen=True)
class SamplerTokens:
    """What one sampler (the student or the teacher) generates with, in its own tokens."""

    pad_id: int
    eos_ids: list[int]
    max_new_tokens: int


class Retokenizer(Protocol):
    """Builds the training examples of generated responses when the sampler's tokens are not the ones
    trained on as they are (``--cross-tokenizer``: :class:`todi.xtok.pairing.GeneratedPairing`).
    ``indices`` are training-example indices, ``responses`` the sampler's ids up to and including EOS."""

    def sampler(self, kind: Kind) -> SamplerTokens: ...

    def prompts(self, indices: Sequence[int], kind: Kind) -> list[list[int]]: ...

    def texts(self, responses: Sequence[list[int]], kind: Kind) -> list[str]: ...

    def pair(self, indices: Sequence[int], responses: Sequence[list[int]], kind: Kind) -> list[Encoded]: ...


def _copied(example: Encoded) -> Encoded:
    return {key: list(value) if isinstance(value, list) else value for key, value in example.items()}


class ReplayBuffer:
    """The last ``capacity`` generated examples (prompt + response ids, labels, and whatever else their
    encoding holds, e.g. the teacher's side), oldest first; a state dict of plain lists so the checkpoint
    stores it as is (accelerate's ``register_for_checkpointing``)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.examples: deque[Encoded] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.examples)

    def add(self, examples: Sequence[Encoded]) -> None:
        self.examples.extend(examples)

    def draw(self, k: int, rng: random.Random) -> list[Encoded]:
        """``k`` distinct examples (fewer if the buffer holds fewer), copied."""
        picked = rng.sample(range(len(self.examples)), min(k, len(self.examples)))
        return [_copied(self.examples[i]) for i in picked]

    def state_dict(self) -> dict[str, Any]:
        """``capacity`` and, per key of the examples, its values in buffer order (a buffer saved before
        the teacher's side was stored has input_ids and labels only: it loads the same way)."""
        keys = list(self.examples[0]) if self.examples else ["input_ids", "labels"]
        if any(set(e) != set(keys) for e in self.examples):
            raise ValueError(
                f"replay buffer examples differ in their fields (expected {keys}); report this bug"
            )
        return {"capacity": self.capacity, **{key: [e[key] for e in self.examples] for key in keys}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = [key for key in state if key != "capacity"]
        if len({len(state[key]) for key in keys}) > 1:
            raise ValueError(
                "the checkpoint's replay buffer holds fields of different lengths; it is damaged"
            )
        rows = zip(*(state[key] for key in keys))
        self.examples = deque((_copied(dict(zip(keys, row))) for row in rows), maxlen=self.capacity)


@dataclass
class GeneratedStats:
    """What this rank's generation did in one step, for the metrics."""

    generated_steps: float = 0.0  # 1 on a step whose responses were sampled (by each rank: summed, / world)
    sequences: float = 0.0  # responses sampled (not counting replayed ones)
    tokens: float = 0.0  # their tokens
    eos: float = 0.0  # those that ended with EOS (not cut by --gen-max-new-tokens)
    replayed: float = 0.0  # examples drawn from the replay buffer
    seconds: float = 0.0


@dataclass
class StepBatches:
    """This rank's micro-batches of one step, ready for the loss."""

    micro_batches: list[list[Encoded]]
    kind: Kind
    num_items: int  # supervised tokens of the whole step, over all ranks: the loss normaliser
    tokens: int  # tokens of this rank's micro-batches
    kd_rate: float | None  # None: the run's objective; else the kd_rate of these batches
    stats: GeneratedStats = field(default_factory=GeneratedStats)
    samples: list[dict[str, Any]] = field(default_factory=list)  # this rank's new samples, for samples.jsonl

    @classmethod
    def of_data(
        cls, micro_batches: Sequence[tuple[int, Sequence[int]]], examples: Sequence[Encoded], num_items: int
    ) -> StepBatches:
        """The data's own examples for (index in the step, example indices) micro-batches."""
        batches = [[examples[i] for i in indices] for _, indices in micro_batches]
        return cls(batches, "data", num_items, sum(len(e["input_ids"]) for b in batches for e in b), None)


class ResponseSource:
    """Builds each step's batches: the data's examples, or responses sampled for their prompts."""

    def __init__(
        self,
        options: PolicyOptions,
        *,
        seed: int,
        pad_id: int,
        eos_ids: Sequence[int],
        buffer: ReplayBuffer | None,
        retokenize: Retokenizer | None = None,
    ) -> None:
        self.options = options
        self.seed = seed
        self.pad_id = pad_id
        self.eos_ids = list(eos_ids)
        self.buffer = buffer
        self.retokenize = retokenize

    def kind(self, step: int) -> Kind:
        """The responses of optimizer step ``step`` (0-based): a function of (seed, step) alone."""
        if (
            self.options.lmbda > 0
            and random.Random(f"todi-lmbda:{self.seed}:{step}").random() < self.options.lmbda
        ):
            return "student"
        return "teacher" if self.options.seq_kd else "data"

    def for_step(
        self,
        step: int,
        micro_batches: Sequence[tuple[int, Sequence[int]]],
        examples: Sequence[Encoded],
        data_num_items: int,
        *,
        generators: dict[str, Callable[..., Tensor]],
        device: torch.device,
        world: Any,
        synced_gpus: bool = False,
    ) -> StepBatches:
        """This rank's micro-batches of step ``step``: ``micro_batches`` are (index in the step, example
        indices) pairs, ``examples`` the encoded training set, ``data_num_items`` the step's supervised
        tokens on the data (the normaliser when nothing is generated). ``generators`` maps "student" /
        "teacher" to a ``generate`` callable; ``world`` gathers objects from every rank (see
        :func:`gather_objects`)."""
        kind = self.kind(step)
        if kind == "data":
            return StepBatches.of_data(micro_batches, examples, data_num_items)
        started = time.perf_counter()
        stats = GeneratedStats(generated_steps=1.0)
        batches, fresh, samples = [], [], []
        for micro, indices in micro_batches:
            replay = self._replay_count(len(indices))
            drawn = (
                self.buffer.draw(replay, random.Random(f"todi-replay:{self.seed}:{step}:{micro}"))
                if replay
                else []
            )
            to_generate = list(indices[: len(indices) - len(drawn)])
            sampler = self._sampler(kind)
            if self.retokenize is None:
                prompts = [prompt_of(examples[i]) for i in to_generate]
            else:
                prompts = self.retokenize.prompts(to_generate, kind)
            seeds = [sequence_seed("todi-sample", self.seed, step, kind, i) for i in to_generate]
            responses = sample_responses(
                generators[kind],
                prompts,
                seeds,
                replace(self.options, max_new_tokens=sampler.max_new_tokens),
                pad_id=sampler.pad_id,
                eos_ids=sampler.eos_ids,
                device=device,
                synced_gpus=synced_gpus,
            )
            if self.retokenize is None:
                made = [
                    {"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r}
                    for p, r in zip(prompts, responses)
                ]
            else:
                made = self.retokenize.pair(to_generate, responses, kind)
            stats.sequences += len(made)
            stats.tokens += sum(len(r) for r in responses)
            stats.eos += sum(bool(r) and r[-1] in sampler.eos_ids for r in responses)
            stats.replayed += len(drawn)
            new_samples = [
                {"step": step + 1, "kind": kind, "example": i, "prompt_ids": p, "response_ids": r}
                for i, p, r in zip(to_generate, prompts, responses)
            ]
            if self.retokenize is not None:  # the text both sides were encoded from
                for sample, text in zip(new_samples, self.retokenize.texts(responses, kind)):
                    sample["text"] = text
            samples += new_samples
            fresh.append((micro, made))
            batches.append(made + drawn)
        stats.seconds = time.perf_counter() - started
        # Every rank needs the step's normaliser and (with a buffer) every rank's new samples, in
        # micro-batch order, so that the update and the buffer do not depend on how ranks split the step.
        mine = [
            (micro, made, sum(map(supervised_positions, batch)))
            for (micro, made), batch in zip(fresh, batches)
        ]
        everyone = sorted((entry for part in world(mine) for entry in part), key=lambda entry: entry[0])
        num_items = sum(entry[2] for entry in everyone)
        if self.buffer is not None:
            for _, made, _ in everyone:
                self.buffer.add(made)
        tokens = sum(len(e["input_ids"]) for b in batches for e in b)
        kd_rate = None if kind == "teacher" or self.options.on_policy_ce else 1.0
        return StepBatches(batches, kind, num_items, tokens, kd_rate, stats, samples)

    def _sampler(self, kind: Kind) -> SamplerTokens:
        if self.retokenize is not None:
            return self.retokenize.sampler(kind)
        return SamplerTokens(self.pad_id, self.eos_ids, self.options.max_new_tokens)

    def _replay_count(self, batch_size: int) -> int:
        if self.buffer is None or not len(self.buffer) or self.options.replay_ratio <= 0:
            return 0
        return min(batch_size, round(self.options.replay_ratio * batch_size))


def gather_objects(accelerator: Any) -> Callable[[Any], list[Any]]:
    """``world(obj)``: the list of every rank's ``obj`` (rank order); the identity list on one process."""

    def world(obj: Any) -> list[Any]:
        if accelerator.num_processes == 1:
            return [obj]
        out: list[Any] = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(out, obj)
        return out

    return world
