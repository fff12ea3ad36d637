"""Forward + backward time and peak memory of the distillation loss on the output head.

Cases (float32, CPU by default), each measured in a fresh subprocess so that peak memory is its own:
  naive-todi   materialised [N, V] logits for both models, then ToDi + CE as the ToDi authors' code does
  fused-todi   todi.losses.fused_linear_distillation_loss(divergence="todi")
  fused-fkl    the same with divergence="fkl"
  liger-fkl    Liger-Kernel's chunked LigerFusedLinearJSDLoss with beta=0 (forward KL), the peer
  floor        only the four matrix products the loss cannot avoid: student and teacher logits,
               grad of the hidden states and grad of the head weight

Time: median of --repeats runs after --warmup runs. Peak memory: the process's peak resident set size
above the resident size just after the inputs were built (ru_maxrss, kB -> MiB).

    python benchmarks/loss_bench.py                       # the full table, writes benchmarks/results/loss_bench.json
    python benchmarks/loss_bench.py --sizes 1024 --shapes smollm2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {"smollm2": (576, 49152), "gpt2": (768, 50257)}
CASES = ("naive-todi", "fused-todi", "fused-fkl", "liger-fkl", "floor")
KD_RATE, TEMPERATURE = 0.5, 2.0


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _naive_todi(hs, ws, ht, wt, labels):
    """The ToDi authors' way: full logits, softmax/log_softmax over [N, V], masks, autograd backward."""
    import torch
    import torch.nn.functional as F

    logits = hs @ ws.t()
    with torch.no_grad():
        teacher_logits = ht @ wt.t()
    ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    s, t = logits / TEMPERATURE, teacher_logits / TEMPERATURE
    q = torch.softmax(s, -1, dtype=torch.float32)
    p = torch.softmax(t, -1, dtype=torch.float32)
    ls = torch.log_softmax(s, -1, dtype=torch.float32)
    lt = torch.log_softmax(t, -1, dtype=torch.float32)
    weight_p = torch.sigmoid(lt - ls).detach()
    weight_q = torch.sigmoid(ls - lt).detach()
    div = weight_p * p * (lt - ls) + weight_q * q * (ls - lt)
    div = div.masked_fill_(s.isinf() | t.isinf(), 0.0).sum(-1)
    div = div.masked_fill_(labels.eq(-100), 0.0).sum()
    n = labels.ne(-100).sum()
    loss = ((1 - KD_RATE) * ce + KD_RATE * div) / n
    loss.backward()
    return loss


def _run_case(
    case: str, n: int, hidden: int, vocab: int, warmup: int, repeats: int, chunk: int | None
) -> dict:
    import torch

    torch.manual_seed(0)
    hs = (torch.randn(n, hidden) * 0.5).requires_grad_()
    ws = (torch.randn(vocab, hidden) * hidden**-0.5).requires_grad_()
    ht = torch.randn(n, hidden) * 0.5
    wt = torch.randn(vocab, hidden) * hidden**-0.5
    labels = torch.randint(0, vocab, (n,))
    labels[: n // 8] = -100  # a prompt share, as in instruction data
    base = _peak_rss_mib()

    if case == "naive-todi":

        def step():
            return _naive_todi(hs, ws, ht, wt, labels)

    elif case in ("fused-todi", "fused-fkl"):
        from todi.losses import fused_linear_distillation_loss

        name = case.split("-")[1]

        def step():
            out = fused_linear_distillation_loss(
                hs,
                ws,
                ht,
                wt,
                labels,
                divergence=name,
                kd_rate=KD_RATE,
                temperature=TEMPERATURE,
                chunk_size=chunk,
            )
            out.loss.backward()
            return out.loss

    elif case == "liger-fkl":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss_fn = LigerFusedLinearJSDLoss(
            weight_hard_loss=1 - KD_RATE,
            weight_soft_loss=KD_RATE,
            beta=0.0,
            temperature=TEMPERATURE,
            compiled=False,
        )

        def step():
            loss = loss_fn(hs, ws, ht, wt, labels)
            loss.backward()
            return loss

    elif case == "floor":
        grad_logits = torch.randn(n, vocab)

        def step():
            with torch.no_grad():
                hs @ ws.t()
                ht @ wt.t()
                grad_logits @ ws
                grad_logits.t() @ hs

    else:
        raise ValueError(case)

    times = []
    for i in range(warmup + repeats):
        hs.grad = ws.grad = None
        start = time.perf_counter()
        step()
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
    return {
        "case": case,
        "n": n,
        "hidden": hidden,
        "vocab": vocab,
        "median_s": statistics.median(times),
        "times_s": times,
        "peak_mib_above_inputs": _peak_rss_mib() - base,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1024,4096", help="comma list of N (positions)")
    parser.add_argument("--shapes", default="smollm2,gpt2", help=f"comma list of {sorted(SHAPES)}")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=None, help="fused chunk size (default: automatic)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "loss_bench.json"))
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._one:  # child process: one case, JSON on stdout
        case, n, hidden, vocab = args._one.split(":")
        result = _run_case(case, int(n), int(hidden), int(vocab), args.warmup, args.repeats, args.chunk_size)
        print(json.dumps(result))
        return

    results = []
    for shape in args.shapes.split(","):
        hidden, vocab = SHAPES[shape]
        for n in map(int, args.sizes.split(",")):
            for case in args.cases.split(","):
                cmd = [sys.executable, __file__, "--_one", f"{case}:{n}:{hidden}:{vocab}"]
                cmd += ["--warmup", str(args.warmup), "--repeats", str(args.repeats)]
                if args.chunk_size:
                    cmd += ["--chunk-size", str(args.chunk_size)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
                if proc.returncode != 0:
                    print(f"{case} N={n} {shape}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                result["shape"] = shape
                results.append(result)
                print(
                    f"{shape:8s} N={n:5d} {case:11s} {result['median_s']:8.3f} s  "
                    f"{result['peak_mib_above_inputs']:9.1f} MiB",
                    flush=True,
                )

    print(
        "\n| shape | N | case | fwd+bwd median (s) | x floor | peak MiB above inputs | % of naive-todi peak |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        same = {x["case"]: x for x in results if x["shape"] == r["shape"] and x["n"] == r["n"]}
        floor = same.get("floor", {}).get("median_s")
        naive_peak = same.get("naive-todi", {}).get("peak_mib_above_inputs")
        ratio = f"{r['median_s'] / floor:.2f}" if floor else "-"
        share = f"{100 * r['peak_mib_above_inputs'] / naive_peak:.1f}%" if naive_peak else "-"
        print(
            f"| {r['shape']} | {r['n']} | {r['case']} | {r['median_s']:.3f} | {ratio} | "
            f"{r['peak_mib_above_inputs']:.0f} | {share} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
