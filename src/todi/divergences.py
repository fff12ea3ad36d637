"""Divergences between a teacher and a student next-token distribution.

Every divergence is a small pure function with one signature::

    fn(student_logp, teacher_logp, **params) -> Tensor[...]

taking log-probabilities of shape ``[..., V]`` (already divided by the temperature and
normalised, float32 or float64, finite) and returning the divergence per position, summed
over the vocabulary. :func:`divergence` is the public entry point that goes from logits to
that per-position tensor; the fused chunked loss calls the same functions chunk by chunk.

Numerical safety (the reference research code is not safe here):

* logits are upcast to float32 before the softmax (float64 stays float64), so bf16 models
  get float32 probabilities;
* a NaN teacher logit is an error (:class:`todi.errors.NonFiniteError`): a teacher that outputs NaN
  is broken, and treating it as a masked item would silently train on a zero divergence;
* an entry whose student or teacher logit is infinite (a masked vocabulary item) is
  removed from both distributions and contributes exactly 0 to every divergence, with a
  zero gradient; a position where every entry is masked has divergence 0;
* masked log-probabilities are replaced by :data:`LOG_FLOOR`, a finite number whose exp is
  exactly 0, so ``0 * log 0`` never becomes ``0 * -inf = nan`` in forward or backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from todi.errors import NonFiniteError

__all__ = [
    "DIVERGENCES",
    "LOG_FLOOR",
    "TODI_WEIGHTS",
    "Divergence",
    "check_teacher_logits",
    "divergence",
    "get_divergence",
    "log_probs",
    "masked_log_probs",
    "parse_params",
    "register_divergence",
    "register_gradient",
    "registered_names",
    "todi_weight",
]

# exp(-1e4) underflows to exactly 0 in float32 and float64, yet differences of floors are 0, not nan.
LOG_FLOOR = -1.0e4

DivergenceFn = Callable[..., Tensor]

# ToDi's weight rules (the ``weight`` parameter of "todi"); see :func:`token_wise`.
TODI_WEIGHTS: tuple[str, ...] = ("sigmoid", "hard", "constant", "inverse")


@dataclass(frozen=True, eq=False)  # identity equality: entries are singletons, usable as cache keys
class Divergence:
    """A registry entry: the per-position function and its parameters with defaults."""

    name: str
    fn: DivergenceFn
    params: dict[str, float | str] = field(default_factory=dict)
    summary: str = ""
    # The parameters that take a word, not a number, and the words they accept.
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Optional closed form (student_logp, teacher_logp, **params) -> (value [...], d value / d s [..., V]),
    # s being the temperature-scaled student logits; lets the fused loss skip autograd.
    value_and_grad: Callable[..., tuple[Tensor, Tensor]] | None = None
    # The divergence's own check of resolved parameters (a plugin's): raises ValueError naming the problem.
    check: Callable[[dict[str, float]], None] | None = None

    def resolve(self, params: dict[str, Any]) -> dict[str, float | str]:
        """Defaults overlaid with ``params``; unknown names and out-of-range values raise ValueError."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            accepted = ", ".join(self.params) or "none"
            raise ValueError(
                f"divergence {self.name!r} takes no parameter {', '.join(map(repr, unknown))}; "
                f"accepted parameters: {accepted}"
            )
        words = {k: v for k, v in params.items() if k in self.choices}
        for name, value in words.items():
            if value not in self.choices[name]:
                raise ValueError(
                    f"divergence {self.name!r}: {name}={value!r} is not one of {', '.join(self.choices[name])}"
                )
        numbers = {k: float(v) for k, v in params.items() if k not in self.choices}
        resolved = {**self.params, **numbers, **words}
        for name, value in resolved.items():
            if name in self.choices:
                continue
            if name in ("skew", "mu") and not 0.0 <= value <= 1.0:
                raise ValueError(f"divergence {self.name!r}: {name}={value} must lie in [0, 1]")
            if name == "beta" and not value >= 0.0:
                # beta = 0 is the token-blind mix a = 1/2; a negative beta would reverse ToDi's routing.
                raise ValueError(f"divergence {self.name!r}: beta={value} must be >= 0")
            if not math.isfinite(value):
                raise ValueError(f"divergence {self.name!r}: {name}={value} must be finite")
        if self.check is not None:
            try:
                self.check(resolved)
            except ValueError as err:
                raise ValueError(f"divergence {self.name!r}: {err}") from None
        return resolved


_REGISTRY: dict[str, Divergence] = {}


def register_divergence(
    name: str,
    params: dict[str, float | str] | None = None,
    summary: str = "",
    choices: dict[str, tuple[str, ...]] | None = None,
    *,
    check: Callable[[dict[str, float]], None] | None = None,
) -> Callable[[DivergenceFn], DivergenceFn]:
    """Decorator adding ``fn(student_logp, teacher_logp, **params)`` to the registry under ``name``;
    ``choices`` names the parameters that take one of a few words (their default is in ``params``).

    ``check(params)`` (optional) validates the resolved parameters and raises ValueError saying what is
    wrong; ``todi distill --loss-params`` reports it as an option error before anything loads."""

    def add(fn: DivergenceFn) -> DivergenceFn:
        if name in _REGISTRY:
            raise ValueError(f"divergence {name!r} is already registered")
        summary_text = summary or (fn.__doc__ or "").strip()
        _REGISTRY[name] = Divergence(
            name, fn, dict(params or {}), summary_text, choices=dict(choices or {}), check=check
        )
        return fn

    return add


def register_gradient(name: str) -> Callable[[Callable], Callable]:
    """Decorator attaching a closed-form ``value_and_grad`` to the registered divergence ``name``."""

    def add(fn: Callable) -> Callable:
        _REGISTRY[name] = replace(get_divergence(name), value_and_grad=fn)
        return fn

    return add


def get_divergence(name: str) -> Divergence:
    """The registry entry ``name``; an unknown name first loads the ``todi.divergences`` entry points."""
    if name not in _REGISTRY:
        from todi.plugins import load_entry_points

        load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown divergence {name!r}; choose one of: {', '.join(_REGISTRY)}") from None


def registered_names() -> tuple[str, ...]:
    """Every registered divergence name, plugins' included (:data:`DIVERGENCES` holds todi's own)."""
    return tuple(_REGISTRY)


def parse_params(text: str | None, option: str = "--loss-params") -> dict[str, float]:
    """``"beta=2,mu=0.3"`` -> ``{"beta": 2.0, "mu": 0.3}``; the divergence checks names and ranges."""
    params: dict[str, float] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not key or number is None:
            raise ValueError(f"{option}: {item.strip()!r} is not NAME=NUMBER (e.g. beta=2.0)")
        if key in params:
            raise ValueError(f"{option}: parameter {key!r} is given twice")
        params[key] = number
    return params


def check_vocab(student_shape: torch.Size, teacher_shape: torch.Size) -> None:
    """Raise a ValueError naming both shapes when the student and teacher logits do not line up."""
    if student_shape != teacher_shape:
        hint = ""
        if student_shape[:-1] == teacher_shape[:-1]:
            hint = (
                " The vocabularies differ in width: if one head is padded beyond the tokenizer "
                "(e.g. 151,936 vs 152,064), slice both to the tokenizer size, logits[..., :len(tokenizer)]; "
                "different tokenizers are not supported."
            )
        raise ValueError(
            f"student logits have shape {tuple(student_shape)} but teacher logits have shape "
            f"{tuple(teacher_shape)}; they must match.{hint}"
        )


def log_probs(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Temperature-scaled log-softmax of both logit sets, float32 (float64 in, float64 out).

    Non-finite logits are masked out of both distributions (see the module docstring).
    """
    check_vocab(student_logits.shape, teacher_logits.shape)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
    s = student_logits.to(dtype)
    t = teacher_logits.to(dtype)
    if temperature != 1.0:
        s = s / temperature
        t = t / temperature
    if bool(torch.isfinite(s).all()) and bool(torch.isfinite(t).all()):
        return F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    check_teacher_logits(t)
    return masked_log_probs(s, t)


def check_teacher_logits(teacher_logits: Tensor) -> None:
    """Raise :class:`NonFiniteError` when teacher logits hold NaN (a -inf logit is a masked item)."""
    nan_rows = torch.isnan(teacher_logits).reshape(-1, teacher_logits.shape[-1]).any(-1)
    if bool(nan_rows.any()):
        raise NonFiniteError(
            f"the teacher's logits are NaN at {int(nan_rows.sum())} of {nan_rows.numel()} positions "
            "(a masked vocabulary item is -inf, never NaN)",
            "check the teacher: a NaN weight, or float16 overflow (load it in float32 or bfloat16)",
        )


def masked_log_probs(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Log-softmax of both (already scaled) logit sets with every entry that is non-finite in either
    removed from both distributions and set to :data:`LOG_FLOOR` (zero gradient)."""
    masked = ~(torch.isfinite(s) & torch.isfinite(t))
    # A fully masked row is filled with zeros (finite softmax) and then floored entirely: divergence 0.
    fill = torch.where(masked.all(dim=-1, keepdim=True), 0.0, -math.inf).to(s.dtype)
    s = torch.where(masked, fill, s)
    t = torch.where(masked, fill, t)
    return (
        F.log_softmax(s, dim=-1).masked_fill(masked, LOG_FLOOR),
        F.log_softmax(t, dim=-1).masked_fill(masked, LOG_FLOOR),
    )


def divergence(
    name: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    **params: float | str,
) -> Tensor:
    """Divergence ``name`` per position between softmax(teacher/T) and softmax(student/T).

    Args:
        name: one of :data:`DIVERGENCES`.
        student_logits, teacher_logits: ``[..., V]`` logits of any float dtype.
        temperature: divides both logit sets before the softmax (no T^2 factor).
        params: the divergence's parameters (``skew`` for skl/srkl, ``mu`` for akl, ``beta`` and
            ``weight`` for todi).

    Returns:
        ``[...]`` tensor in float32 (float64 for float64 input), differentiable w.r.t. both inputs.
    """
    registered = get_divergence(name)
    resolved = registered.resolve(params)
    ls, lt = log_probs(student_logits, teacher_logits, temperature)
    return registered.fn(ls, lt, **resolved)


def _log_weight(w: float) -> float:
    return math.log(w) if w > 0 else -math.inf


@register_divergence("fkl", summary="forward KL: sum p (log p - log q)")
def forward_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)


@register_divergence("rkl", summary="reverse KL: sum q (log q - log p)")
def reverse_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)


@register_divergence("js", summary="Jensen-Shannon: 1/2 KL(p||m) + 1/2 KL(q||m), m = (p + q) / 2")
def jensen_shannon(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    log_m = torch.logaddexp(student_logp, teacher_logp) - math.log(2.0)
    p, q = teacher_logp.exp(), student_logp.exp()
    return 0.5 * (p * (teacher_logp - log_m)).sum(-1) + 0.5 * (q * (student_logp - log_m)).sum(-1)


@register_divergence("tvd", summary="total variation: 1/2 sum |p - q|")
def total_variation(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)


@register_divergence("skl", params={"skew": 0.1}, summary="skew forward KL: KL(p || skew p + (1 - skew) q)")
def skew_forward_kl(student_logp: Tensor, teacher_logp: Tensor, skew: float = 0.1) -> Tensor:
    # The mixture is built in log space so that a zero probability never meets log(0).
    log_mix = torch.logaddexp(teacher_logp + _log_weight(skew), student_logp + _log_weight(1.0 - skew))
    return (teacher_logp.exp() * (teacher_logp - log_mix)).sum(-1)


@register_divergence("srkl", params={"skew": 0.1}, summary="skew reverse KL: KL(q || (1 - skew) p + skew q)")
def skew_reverse_kl(student_logp: Tensor, teacher_logp: Tensor, skew: float = 0.1) -> Tensor:
    log_mix = torch.logaddexp(teacher_logp + _log_weight(1.0 - skew), student_logp + _log_weight(skew))
    return (student_logp.exp() * (student_logp - log_mix)).sum(-1)


@register_divergence(
    "akl",
    params={"mu": 0.5},
    summary="adaptive KL (Wu et al. 2024): FKL and RKL weighted by the head / tail gaps of p",
)
def adaptive_kl(student_logp: Tensor, teacher_logp: Tensor, mu: float = 0.5) -> Tensor:
    """As in the ToDi authors' baseline: sort p ascending; tail = the items whose cumulative p is <= mu,
    head = the rest. The gaps g = sum |p - q| over head and tail are detached; FKL is weighted by
    g_head and RKL by g_tail, normalised by their sum. Identical distributions give 0 rather than the
    reference's 0/0. (Wu et al.'s own ``get_ratio`` cuts the head from the top instead, which moves
    only the item straddling mu.)"""
    p, q = teacher_logp.exp(), student_logp.exp()
    with torch.no_grad():
        # Stable: tied p (a spread tail) split at mu by vocabulary order on every device, not by chance.
        p_sorted, order = p.sort(dim=-1, stable=True)
        gap = (p_sorted - q.gather(-1, order)).abs()
        tail = p_sorted.cumsum(-1) <= mu
        g_tail = (gap * tail).sum(-1)
        g_head = (gap * ~tail).sum(-1)
        total = g_head + g_tail
        safe_total = torch.where(total > 0, total, torch.ones_like(total))
        w_head = torch.where(total > 0, g_head / safe_total, torch.zeros_like(total))
        w_tail = torch.where(total > 0, g_tail / safe_total, torch.zeros_like(total))
    fkl = (p * (teacher_logp - student_logp)).sum(-1)
    rkl = (q * (student_logp - teacher_logp)).sum(-1)
    return w_head * fkl + w_tail * rkl


@register_divergence(
    "todi",
    params={"beta": 1.0, "weight": "sigmoid"},
    choices={"weight": TODI_WEIGHTS},
    summary="token-wise distillation: sum a p log(p/q) + (1 - a) q log(q/p), a = sg(sigmoid(beta log(p/q)))",
)
def token_wise(
    student_logp: Tensor, teacher_logp: Tensor, beta: float = 1.0, weight: str = "sigmoid"
) -> Tensor:
    """ToDi: sum_v a_v p_v (log p_v - log q_v) + (1 - a_v) q_v (log q_v - log p_v), a detached.

    ``weight`` says how a is formed from d = log p - log q (the paper's ablations):

    * ``sigmoid`` (default, the paper's): a = sigmoid(beta d); beta = 0 gives a = 1/2.
    * ``hard``: a = 1 where p > q, else 0 (a tie p == q goes to RKL; there d = 0, so the tie adds 0 to
      the value, and only its gradient depends on the choice). Beta is ignored.
    * ``constant``: a = 1/2 for every token, the token-blind mix (FKL + RKL) / 2. Beta is ignored.
    * ``inverse``: a = sigmoid(beta (log q - log p)), the routing reversed: a control. Its per-token term
      (a p - (1 - a) q) d is q (e^((1 - beta) d) - 1) d (1 - a): >= 0 for beta < 1, identically 0 at
      beta = 1 (where only the gradient, through the detached a, is left) and <= 0 for beta > 1, so it
      is not a divergence.
    """
    log_ratio = teacher_logp - student_logp
    a = _todi_a(log_ratio, beta, weight)
    p, q = teacher_logp.exp(), student_logp.exp()
    # a p (log p - log q) + (1 - a) q (log q - log p) == (a p - (1 - a) q) (log p - log q)
    return ((a * p - (1.0 - a) * q) * log_ratio).sum(-1)


def _todi_a(log_ratio: Tensor, beta: float, weight: str) -> Tensor:
    """ToDi's detached weight a from d = log p - log q under rule ``weight`` (see :func:`token_wise`)."""
    if weight == "sigmoid":
        return torch.sigmoid(beta * log_ratio).detach()
    if weight == "hard":
        return (log_ratio > 0).to(log_ratio.dtype).detach()
    if weight == "constant":
        return torch.full_like(log_ratio, 0.5).detach()
    if weight == "inverse":
        return torch.sigmoid(-beta * log_ratio).detach()
    raise ValueError(f"unknown ToDi weight rule {weight!r}; choose one of {', '.join(TODI_WEIGHTS)}")


def todi_weight(
    student_logp: Tensor, teacher_logp: Tensor, beta: float = 1.0, weight: str = "sigmoid"
) -> Tensor:
    """Per position, the share of ToDi acting as FKL: sum_v a_v c_v / sum_v c_v (detached).

    c_v = (a_v p_v - (1 - a_v) q_v) log(p_v / q_v) >= 0 is item v's contribution to the ToDi value, so
    this is the weight a averaged where the divergence actually is: 1 = all of it routed to FKL (the
    student underestimates), 0 = all routed to RKL. A plain mean of a over the vocabulary is dominated
    by the near-zero tail, and a mass-weighted mean is identically 1/2 at beta = 1. Positions with
    p == q give 1/2. ``weight`` is the rule forming a (see :func:`token_wise`). Under ``inverse`` every c_v
    has the sign of 1 - beta, so the share is the same ratio of two negative sums for beta > 1; at beta = 1
    every c_v is 0 (rounding aside) and the share is 1/2."""
    with torch.no_grad():
        log_ratio = teacher_logp - student_logp
        p, q = teacher_logp.exp(), student_logp.exp()
        if weight == "inverse" and beta == 1.0:
            return torch.full_like(log_ratio[..., 0], 0.5)
        if (
            weight == "sigmoid" and beta == 1.0
        ):  # a = p / (p + q) needs no exp, and then c = (p - q) log(p / q)
            both = p + q
            a = torch.where(both > 0, p / torch.where(both > 0, both, torch.ones_like(both)), 0.5)
            contribution = (p - q) * log_ratio
        else:
            a = _todi_a(log_ratio, beta, weight)
            contribution = (a * p - (1.0 - a) * q) * log_ratio
        total = contribution.sum(-1)
        some = total != 0 if weight == "inverse" else total > 0
        share = (a * contribution).sum(-1) / torch.where(some, total, torch.ones_like(total))
        return torch.where(some, share, torch.full_like(total, 0.5))


# Closed-form gradients w.r.t. the scaled student logits s (q = softmax(s)); the tests check each one
# against autograd through the value function above.


@register_gradient("fkl")
def _forward_kl_value_and_grad(student_logp: Tensor, teacher_logp: Tensor) -> tuple[Tensor, Tensor]:
    p = teacher_logp.exp()
    return (p * (teacher_logp - student_logp)).sum(-1), student_logp.exp() - p


@register_gradient("rkl")
def _reverse_kl_value_and_grad(student_logp: Tensor, teacher_logp: Tensor) -> tuple[Tensor, Tensor]:
    q = student_logp.exp()
    log_ratio = student_logp - teacher_logp
    value = (q * log_ratio).sum(-1)
    return value, q * (log_ratio - value.unsqueeze(-1))


@register_gradient("todi")
def _token_wise_value_and_grad(
    student_logp: Tensor, teacher_logp: Tensor, beta: float = 1.0, weight: str = "sigmoid"
) -> tuple[Tensor, Tensor]:
    # With d = log p - log q, a held constant (any rule), r = (1 - a) q and w = a p - r:
    # D = sum w d and dD/ds = r (1 - d) - a p + q (sum r d + sum w).
    log_ratio = teacher_logp - student_logp
    p, q = teacher_logp.exp(), student_logp.exp()
    if weight == "sigmoid" and beta == 1.0:
        # a = p / (p + q) needs no exp, and then w = p - q, whose sum is 0: two terms fewer per item.
        ap, r = _ratio_weighted(p, q)
        value = ((p - q) * log_ratio).sum(-1)
        total = (r * log_ratio).sum(-1)
    else:
        a = _todi_a(log_ratio, beta, weight)
        ap, r = a * p, (1.0 - a) * q
        w = ap - r
        value = (w * log_ratio).sum(-1)
        total = (r * log_ratio).sum(-1) + w.sum(-1)
    return value, r * (1.0 - log_ratio) - ap + q * total.unsqueeze(-1)


def _ratio_weighted(p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """(a p, (1 - a) q) for a = sigmoid(log p - log q) = p / (p + q); 0 where both underflow."""
    both = p + q
    inverse = torch.where(both > 0, 1.0 / both, torch.zeros_like(both))
    return p * p * inverse, q * q * inverse


DIVERGENCES: tuple[str, ...] = tuple(_REGISTRY)
