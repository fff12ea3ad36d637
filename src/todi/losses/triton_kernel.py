"""The Triton row kernel of the fused loss (imported only when the Triton backend runs; see triton_loss.py).

One program per supervised row of the ``[chunk, V]`` student logits ``z`` and teacher logits ``t`` (held in
the model's dtype; every sum, exp and log in float32 registers):

1. online log-sum-exps of ``z`` (the CE at T = 1) and of ``z / T`` and ``t / T`` over the entries finite in
   both (masked entries leave both distributions, as in :func:`todi.divergences.masked_log_probs`); for
   fkl and rkl also the cross term that gives their value without a second pass;
2. for the other divergences, the value and ``H = sum_v h_v`` with ``h_v = dD / d log q_v`` (log q held
   free); ToDi's FKL share;
3. with gradients, ``dD/ds_v = h_v - q_v H`` (s = z / T), written over ``z`` in place together with CE's
   ``softmax(z) - onehot`` and the factors ``(1 - kd_rate) / N``, ``kd_rate / (N T)``.

A masked entry has p = q = h = 0, so it contributes 0 to the value and gets CE's gradient only; a row with
every entry masked has divergence 0. No libdevice function is used (the CPU interpreter runs it as is).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Divergence codes of the DIV constexpr (0: CE only, no teacher), as triton_loss.KERNEL_DIVERGENCES numbers
# them; globals a kernel reads must be constexpr objects.
CE_ONLY, FKL, RKL, JS, TVD, SKL, SRKL, TODI = (tl.constexpr(code) for code in range(8))


@triton.jit
def _logaddexp(a, b):
    high = tl.maximum(a, b)
    return high + tl.log(1.0 + tl.exp(tl.minimum(a, b) - high))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))  # never overflows
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _online(m, total, x, valid):
    """One block of an online log-sum-exp: the running max ``m`` and sum of exp(x - m) over ``valid``."""
    new_m = tl.maximum(m, tl.max(tl.where(valid, x, float("-inf")), 0))
    safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
    total = total * tl.exp(m - safe_m) + tl.sum(tl.where(valid, tl.exp(x - safe_m), 0.0), 0)
    return new_m, total, safe_m


@triton.jit
def _terms(lq, lp, q, p, beta, log_w_teacher, log_w_student, DIV: tl.constexpr):
    """Per entry: the divergence's summand f, h = df / d log q (ToDi's weight a held constant), and a."""
    a = tl.zeros_like(q)
    if DIV == FKL:
        f = p * (lp - lq)
        h = -p
    elif DIV == RKL:
        f = q * (lq - lp)
        h = q * (lq - lp + 1.0)
    elif DIV == JS:
        log_m = _logaddexp(lp, lq) - 0.6931471805599453
        f = 0.5 * p * (lp - log_m) + 0.5 * q * (lq - log_m)
        h = 0.5 * q * (lq - log_m)
    elif DIV == TVD:
        f = 0.5 * tl.abs(p - q)
        h = 0.5 * q * tl.where(q > p, 1.0, tl.where(q < p, -1.0, 0.0))
    elif DIV == SKL:  # KL(p || skew p + (1 - skew) q)
        log_mix = _logaddexp(lp + log_w_teacher, lq + log_w_student)
        f = p * (lp - log_mix)
        h = -p * tl.exp(lq + log_w_student - log_mix)
    elif DIV == SRKL:  # KL(q || (1 - skew) p + skew q)
        log_mix = _logaddexp(lp + log_w_teacher, lq + log_w_student)
        f = q * (lq - log_mix)
        h = q * (lq - log_mix + 1.0 - tl.exp(lq + log_w_student - log_mix))
    else:  # TODI: (a p - (1 - a) q) d with d = log p - log q, a = sigmoid(beta d)
        d = lp - lq
        a = _sigmoid(beta * d)
        r = (1.0 - a) * q
        f = (a * p - r) * d
        h = r * (1.0 - d) - a * p
    return f, h, a


@triton.jit
def _log_probs(z, t, lse_s, lse_t, inv_t):
    """log q, log p, q, p of one block; 0 at the entries masked in either (non-finite logits)."""
    valid = (z > float("-inf")) & (z < float("inf")) & (t > float("-inf")) & (t < float("inf"))
    lq = tl.where(valid, z * inv_t - lse_s, 0.0)
    lp = tl.where(valid, t * inv_t - lse_t, 0.0)
    q = tl.where(valid, tl.exp(lq), 0.0)
    p = tl.where(valid, tl.exp(lp), 0.0)
    return lq, lp, q, p, valid


@triton.jit
def distill_rows(
    z_ptr,  # [rows, V] student logits; with NEED_GRAD overwritten by d loss / d z
    t_ptr,  # [rows, V] teacher logits (unused when DIV == CE_ONLY)
    target_ptr,  # [rows] int64 target ids
    scale_ptr,  # 0-d float32: 1 / (global supervised tokens)
    out_ptr,  # [3, rows] float32: CE, divergence, ToDi's FKL share per row
    n_rows,
    vocab,
    z_stride,
    t_stride,
    kd_rate,
    inv_t,
    beta,
    log_w_teacher,
    log_w_student,
    DIV: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * z_stride
    t_row = t_ptr + row.to(tl.int64) * t_stride
    target = tl.load(target_ptr + row)
    cols = tl.arange(0, BLOCK)

    # pass 1: log-sum-exps (and fkl's / rkl's cross term)
    m_z = tl.full((), float("-inf"), tl.float32)
    sum_z = tl.zeros((), tl.float32)
    z_target = tl.zeros((), tl.float32)
    m_s = tl.full((), float("-inf"), tl.float32)
    sum_s = tl.zeros((), tl.float32)
    m_t = tl.full((), float("-inf"), tl.float32)
    sum_t = tl.zeros((), tl.float32)
    cross = tl.zeros((), tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + cols
        inside = offs < vocab
        z = tl.load(z_row + offs, mask=inside, other=float("-inf")).to(tl.float32)
        m_z, sum_z, _ = _online(m_z, sum_z, z, inside)
        z_target += tl.sum(tl.where(offs == target, z, 0.0), 0)
        if DIV != CE_ONLY:
            t = tl.load(t_row + offs, mask=inside, other=float("-inf")).to(tl.float32)
            valid = (z > float("-inf")) & (z < float("inf")) & (t > float("-inf")) & (t < float("inf"))
            s = tl.where(valid, z * inv_t, 0.0)
            ts = tl.where(valid, t * inv_t, 0.0)
            old_s, old_t = m_s, m_t
            m_s, sum_s, safe_s = _online(m_s, sum_s, s, valid)
            m_t, sum_t, safe_t = _online(m_t, sum_t, ts, valid)
            if DIV == FKL:  # sum p (t - s) * sum_t, rescaled like sum_t
                cross = cross * tl.exp(old_t - safe_t) + tl.sum(
                    tl.where(valid, tl.exp(ts - safe_t) * (ts - s), 0.0), 0
                )
            if DIV == RKL:  # sum q (s - t) * sum_s
                cross = cross * tl.exp(old_s - safe_s) + tl.sum(
                    tl.where(valid, tl.exp(s - safe_s) * (s - ts), 0.0), 0
                )
    lse_z = m_z + tl.log(sum_z)
    ce = lse_z - z_target

    kd = tl.zeros((), tl.float32)
    share = tl.full((), 0.5, tl.float32)
    h_sum = tl.zeros((), tl.float32)
    lse_s = tl.zeros((), tl.float32)
    lse_t = tl.zeros((), tl.float32)
    if DIV != CE_ONLY:
        any_valid = sum_s > 0.0
        lse_s = tl.where(any_valid, m_s + tl.log(tl.where(any_valid, sum_s, 1.0)), 0.0)
        lse_t = tl.where(any_valid, m_t + tl.log(tl.where(any_valid, sum_t, 1.0)), 0.0)
        if DIV == FKL:
            kd = tl.where(any_valid, cross / tl.where(any_valid, sum_t, 1.0) - lse_t + lse_s, 0.0)
            h_sum = tl.where(any_valid, -1.0, 0.0)
        elif DIV == RKL:
            kd = tl.where(any_valid, cross / tl.where(any_valid, sum_s, 1.0) - lse_s + lse_t, 0.0)
            h_sum = tl.where(any_valid, kd + 1.0, 0.0)
        else:
            # pass 2: the value, H and ToDi's share
            share_num = tl.zeros((), tl.float32)
            share_den = tl.zeros((), tl.float32)
            for start in range(0, vocab, BLOCK):
                offs = start + cols
                inside = offs < vocab
                z = tl.load(z_row + offs, mask=inside, other=float("-inf")).to(tl.float32)
                t = tl.load(t_row + offs, mask=inside, other=float("-inf")).to(tl.float32)
                lq, lp, q, p, valid = _log_probs(z, t, lse_s, lse_t, inv_t)
                f, h, a = _terms(lq, lp, q, p, beta, log_w_teacher, log_w_student, DIV)
                kd += tl.sum(tl.where(valid, f, 0.0), 0)
                h_sum += tl.sum(tl.where(valid, h, 0.0), 0)
                if DIV == TODI:
                    share_num += tl.sum(tl.where(valid, a * f, 0.0), 0)
                    share_den += tl.sum(tl.where(valid, f, 0.0), 0)
            if DIV == TODI:
                share = tl.where(share_den > 0.0, share_num / tl.where(share_den > 0.0, share_den, 1.0), 0.5)
    tl.store(out_ptr + row, ce)
    tl.store(out_ptr + n_rows + row, kd)
    tl.store(out_ptr + 2 * n_rows + row, share)

    if NEED_GRAD:
        # pass 3: d loss / d z over z
        scale = tl.load(scale_ptr)
        ce_coef = (1.0 - kd_rate) * scale
        kd_coef = kd_rate * scale * inv_t
        for start in range(0, vocab, BLOCK):
            offs = start + cols
            inside = offs < vocab
            z = tl.load(z_row + offs, mask=inside, other=float("-inf")).to(tl.float32)
            grad = ce_coef * (tl.exp(z - lse_z) - tl.where(offs == target, 1.0, 0.0))
            if DIV != CE_ONLY:
                t = tl.load(t_row + offs, mask=inside, other=float("-inf")).to(tl.float32)
                lq, lp, q, p, valid = _log_probs(z, t, lse_s, lse_t, inv_t)
                _, h, _ = _terms(lq, lp, q, p, beta, log_w_teacher, log_w_student, DIV)
                grad += kd_coef * tl.where(valid, h - q * h_sum, 0.0)
            tl.store(z_row + offs, grad.to(z_ptr.dtype.element_ty), mask=inside)
