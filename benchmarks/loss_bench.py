"""Forward + backward time and peak memory of the distillation loss on the output head.

Cases (float32 on the CPU by default; --device cuda, --dtype bfloat16), each measured in a fresh subprocess
so that peak memory is its own:
  naive-todi   materialised [N, V] logits for both models, then ToDi + CE as the ToDi authors' code does
  fused-todi   todi.losses.fused_linear_distillation_loss(divergence="todi", backend="torch")
  fused-fkl    the same with divergence="fkl" (any registered divergence: fused-<name>)
  triton-todi  the same with backend="triton": the Triton row kernel (CUDA only; also triton-fkl, -js, ...)
  liger-fkl    Liger-Kernel's chunked LigerFusedLinearJSDLoss with beta=0 (forward KL), the peer
               (compiled=False on the CPU; its default compiled path on CUDA; recorded as skipped when
               liger_kernel cannot be imported); liger-rkl: beta=1, liger-js: beta=0.5
  floor        only the four matrix products the loss cannot avoid: student and teacher logits,
               grad of the hidden states and grad of the head weight
Defaults: on the CPU the first five cases above at the SmolLM2 and GPT-2 shapes; on CUDA floor, liger-fkl,
fused-fkl, fused-todi, triton-fkl, triton-todi at the SmolLM2 and Llama-3 shapes.

--errors: after the timed runs, the gradients of the last run against float64 (the materialised objective,
todi.losses.distillation_loss, on the same bf16 / float32 inputs upcast, in chunks of 1024 rows):
max |g - g64| / max |g64| and the norm-relative error, for dX (hidden states) and dW (head weight); only
where N <= --errors-max-n (the float64 reference is slow and large).

Time: median of --repeats runs after --warmup runs. Peak memory: on the CPU the process's peak resident
set size above the resident size just after the inputs were built (ru_maxrss, kB -> MiB); on CUDA
torch.cuda.max_memory_allocated() (peak stats reset once the inputs exist) minus the memory allocated then.
On CUDA every timed run is bracketed by torch.cuda.synchronize(). The JSON is rewritten after every case;
each record names the device, its name, the dtype and the torch version; a case that fails, times out
(--case-timeout) or is skipped is recorded with an "error" or "skipped" reason.

    python benchmarks/loss_bench.py                       # the full table, writes benchmarks/results/loss_bench.json
    python benchmarks/loss_bench.py --sizes 1024 --shapes smollm2 --repeats 3
    python benchmarks/loss_bench.py --device cuda --dtype bfloat16   # N = 4096, 16384; loss_bench_cuda_bfloat16.json
    python benchmarks/loss_bench.py --print benchmarks/results/loss_bench_cuda_float32.json   # table only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {"smollm2": (576, 49152), "gpt2": (768, 50257), "llama3": (4096, 128256)}
CASES = ("naive-todi", "fused-todi", "fused-fkl", "liger-fkl", "floor")
DEFAULT_CASES = {
    "cpu": ",".join(CASES),
    "cuda": "floor,liger-fkl,fused-fkl,fused-todi,triton-fkl,triton-todi",
}
LIGER_BETA = {"fkl": 0.0, "rkl": 1.0, "js": 0.5}  # LigerFusedLinearJSDLoss's beta for our divergences
KD_RATE, TEMPERATURE = 0.5, 2.0
DEFAULT_SIZES = {"cpu": "1024,4096", "cuda": "4096,16384"}
DEFAULT_SHAPES = {"cpu": "smollm2,gpt2", "cuda": "smollm2,llama3"}
RESULTS = Path(__file__).parent / "results"
DEFAULT_OUT = {"cpu": "loss_bench.json", "cuda": "loss_bench_cuda_{dtype}.json"}  # under RESULTS


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


def _case_divergence(case: str) -> str | None:
    """The divergence a case's loss computes (None for the floor)."""
    return None if case == "floor" else case.split("-", 1)[1]


def _reference_grads(hs, ws, ht, wt, labels, divergence: str, rows_per_chunk: int = 1024):
    """float64 dX and dW of the objective (materialised per chunk of rows, normalised by all supervised rows)."""
    import torch

    from todi.losses import distillation_loss

    w64 = ws.detach().double().requires_grad_()
    wt64 = wt.detach().double()
    grad_x = torch.zeros_like(hs, dtype=torch.float64)
    tokens = labels.ne(-100).sum()
    for start in range(0, hs.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        h64 = hs[rows].detach().double().requires_grad_()
        with torch.no_grad():
            teacher = ht[rows].double() @ wt64.t()
        out = distillation_loss(
            h64 @ w64.t(),
            teacher,
            labels[rows],
            divergence=divergence,
            kd_rate=KD_RATE,
            temperature=TEMPERATURE,
            num_items_in_batch=tokens,
        )
        out.loss.backward()
        grad_x[rows] = h64.grad
    return grad_x, w64.grad


def _grad_errors(grads: dict, refs: dict) -> dict:
    errors = {}
    for key, grad in grads.items():
        diff = grad.double() - refs[key]
        errors[key] = {
            "max_rel": float(diff.abs().max() / refs[key].abs().max()),
            "norm_rel": float(diff.norm() / refs[key].norm()),
        }
    return errors


def _run_case(
    case: str,
    n: int,
    hidden: int,
    vocab: int,
    warmup: int,
    repeats: int,
    chunk: int | None,
    device: str = "cpu",
    dtype_name: str = "float32",
    errors: bool = False,
) -> dict:
    import torch

    dtype = getattr(torch, dtype_name)
    cuda = device == "cuda"
    info = {
        "case": case,
        "n": n,
        "hidden": hidden,
        "vocab": vocab,
        "device": device,
        "device_name": torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine()),
        "dtype": dtype_name,
        "torch": torch.__version__,
    }

    def draw(*shape, scale=1.0):
        """Normal values: on the CPU in float32 (then cast); on CUDA drawn there (seconds saved per case at
        the Llama-3 shape, whose two heads hold 525M values each)."""
        if cuda:
            return (torch.randn(*shape, device=device) * scale).to(dtype)
        values = torch.randn(*shape) * scale
        return values if dtype == torch.float32 else values.to(dtype)

    torch.manual_seed(0)
    hs = draw(n, hidden, scale=0.5).requires_grad_()
    ws = draw(vocab, hidden, scale=hidden**-0.5).requires_grad_()
    ht = draw(n, hidden, scale=0.5)
    wt = draw(vocab, hidden, scale=hidden**-0.5)
    labels = torch.randint(0, vocab, (n,))
    labels[: n // 8] = -100  # a prompt share, as in instruction data
    labels = labels.to(device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _peak_rss_mib()

    if case == "naive-todi":

        def step():
            return _naive_todi(hs, ws, ht, wt, labels)

    elif case.startswith(("fused-", "triton-")):
        from todi.losses import fused_linear_distillation_loss

        kind, name = case.split("-", 1)
        backend = "torch" if kind == "fused" else "triton"
        if backend == "triton" and not cuda:
            return {**info, "skipped": "the Triton backend needs CUDA"}

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
                backend=backend,
            )
            out.loss.backward()
            return out.loss

    elif case.startswith("liger-"):
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        except Exception as err:  # not installed, or built for another torch / triton
            return {**info, "skipped": f"liger_kernel not importable: {type(err).__name__}: {err}"}

        # The CPU has no Triton: compiled=False there; on CUDA Liger's default (compiled) path.
        options = {} if cuda else {"compiled": False}
        loss_fn = LigerFusedLinearJSDLoss(
            weight_hard_loss=1 - KD_RATE,
            weight_soft_loss=KD_RATE,
            beta=LIGER_BETA[case.split("-", 1)[1]],
            temperature=TEMPERATURE,
            **options,
        )

        def step():
            loss = loss_fn(hs, ws, ht, wt, labels)
            loss.backward()
            return loss

    elif case == "floor":
        grad_logits = draw(n, vocab)

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
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mib()
    result = {
        **info,
        "median_s": statistics.median(times),
        "times_s": times,
        "peak_mib_above_inputs": peak - base,
        "threads": torch.get_num_threads(),
    }
    if errors and _case_divergence(case) is not None:  # the last timed run's gradients
        grads = {"dX": hs.grad, "dW": ws.grad}
        ref_x, ref_w = _reference_grads(hs, ws, ht, wt, labels, _case_divergence(case))
        result["grad_error"] = _grad_errors(grads, {"dX": ref_x, "dW": ref_w})
    return result


def _print_table(results: list[dict]) -> None:
    """The results as a markdown table: times in ms on a GPU (s on the CPU), each case against the
    floor's time and naive ToDi's peak memory of the same shape and N."""
    gpu = any(r.get("device") == "cuda" for r in results)
    names = sorted({r["device_name"] for r in results if r.get("device_name")})
    torch_versions = sorted({r["torch"] for r in results if r.get("torch")})
    if names:  # files written before these were recorded have neither
        print(f"\n{', '.join(names)} | torch {', '.join(torch_versions)}")
    unit, scale = ("ms", 1000.0) if gpu else ("s", 1.0)
    with_errors = any("grad_error" in r for r in results)
    extra = " dX max rel err | dW max rel err |" if with_errors else ""
    print(
        f"\n| shape | N | case | fwd+bwd median ({unit}) | x floor | peak MiB above inputs | % of naive-todi peak |"
        + extra
    )
    print("|---|---|---|---|---|---|---|" + ("---|---|" if with_errors else ""))
    for r in results:
        if "median_s" not in r:
            reason = r.get("skipped") or r.get("error") or "no result"
            print(
                f"| {r['shape']} | {r['n']} | {r['case']} | {reason} | - | - | - |"
                + (" - | - |" if with_errors else "")
            )
            continue
        same = {
            x["case"]: x for x in results if x["shape"] == r["shape"] and x["n"] == r["n"] and "median_s" in x
        }
        floor = same.get("floor", {}).get("median_s")
        naive_peak = same.get("naive-todi", {}).get("peak_mib_above_inputs")
        ratio = f"{r['median_s'] / floor:.2f}" if floor else "-"
        share = f"{100 * r['peak_mib_above_inputs'] / naive_peak:.1f}%" if naive_peak else "-"
        errors = ""
        if with_errors:
            err = r.get("grad_error")
            errors = f" {err['dX']['max_rel']:.2e} | {err['dW']['max_rel']:.2e} |" if err else " - | - |"
        print(
            f"| {r['shape']} | {r['n']} | {r['case']} | {scale * r['median_s']:.{2 if gpu else 3}f} | {ratio} | "
            f"{r['peak_mib_above_inputs']:.0f} | {share} |" + errors
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--sizes",
        default=None,
        help="comma list of N (positions); default "
        + ", ".join(f"{d}: {s}" for d, s in DEFAULT_SIZES.items()),
    )
    parser.add_argument(
        "--shapes",
        default=None,
        help=f"comma list of {sorted(SHAPES)}; default "
        + ", ".join(f"{d}: {s}" for d, s in DEFAULT_SHAPES.items()),
    )
    parser.add_argument(
        "--cases", default=None, help="default " + "; ".join(f"{d}: {c}" for d, c in DEFAULT_CASES.items())
    )
    parser.add_argument("--errors", action="store_true", help="also gradient errors against float64")
    parser.add_argument("--errors-max-n", type=int, default=4096, help="--errors only up to this N")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=None, help="fused chunk size (default: automatic)")
    parser.add_argument(
        "--case-timeout", type=float, default=None, help="seconds per case subprocess (default: none)"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON file; default " + ", ".join(f"{d}: {RESULTS / p}" for d, p in DEFAULT_OUT.items()),
    )
    parser.add_argument(
        "--print",
        dest="print_only",
        metavar="JSON",
        help="only print the table of a results file written earlier",
    )
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.print_only:
        _print_table(json.loads(Path(args.print_only).read_text()))
        return

    if args._one:  # child process: one case, JSON on stdout
        case, n, hidden, vocab = args._one.split(":")
        result = _run_case(
            case,
            int(n),
            int(hidden),
            int(vocab),
            args.warmup,
            args.repeats,
            args.chunk_size,
            args.device,
            args.dtype,
            args.errors and int(n) <= args.errors_max_n,
        )
        print(json.dumps(result))
        return

    sizes = args.sizes or DEFAULT_SIZES[args.device]
    shapes = args.shapes or DEFAULT_SHAPES[args.device]
    cases = args.cases or DEFAULT_CASES[args.device]
    out = Path(args.out or RESULTS / DEFAULT_OUT[args.device].format(dtype=args.dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for shape in shapes.split(","):
        hidden, vocab = SHAPES[shape]
        for n in map(int, sizes.split(",")):
            for case in cases.split(","):
                cmd = [sys.executable, __file__, "--_one", f"{case}:{n}:{hidden}:{vocab}"]
                cmd += ["--warmup", str(args.warmup), "--repeats", str(args.repeats)]
                cmd += ["--device", args.device, "--dtype", args.dtype]
                if args.chunk_size:
                    cmd += ["--chunk-size", str(args.chunk_size)]
                if args.errors:
                    cmd += ["--errors", "--errors-max-n", str(args.errors_max_n)]
                label = f"{shape:8s} N={n:5d} {case:11s}"
                record = {"case": case, "n": n, "hidden": hidden, "vocab": vocab, "shape": shape}
                record.update(device=args.device, dtype=args.dtype)
                try:
                    proc = subprocess.run(
                        cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=args.case_timeout
                    )
                except subprocess.TimeoutExpired:
                    record["error"] = f"timed out after {args.case_timeout:g} s"
                    print(f"{label} TIMEOUT", file=sys.stderr, flush=True)
                    proc = None
                if proc is not None and proc.returncode != 0:
                    lines = proc.stderr.strip().splitlines()
                    record["error"] = f"exit {proc.returncode}: {lines[-1] if lines else ''}"[:500]
                    print(f"{label} FAILED\n{proc.stderr[-2000:]}", file=sys.stderr, flush=True)
                elif proc is not None:
                    record = {**json.loads(proc.stdout.strip().splitlines()[-1]), "shape": shape}
                results.append(record)
                if "median_s" in record:
                    print(
                        f"{label} {record['median_s']:8.3f} s  {record['peak_mib_above_inputs']:9.1f} MiB",
                        flush=True,
                    )
                elif "skipped" in record:
                    print(f"{label} skipped: {record['skipped']}", flush=True)
                out.write_text(json.dumps(results, indent=2))  # kept up to date: a later hang loses nothing

    _print_table(results)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
