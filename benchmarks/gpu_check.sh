#!/usr/bin/env bash
# CUDA correctness tests and loss timings on a GPU machine: under 9 minutes even if every step hangs
# (25 s versions + 200 s tests + 290 s bf16 table, each under `timeout`).
#
# Run from the repository root with $OUT set to a folder for the results:
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
# Wheels in .whl/ (liger-kernel, pytest and its dependencies) are installed into /tmp/site first.
# Tests: tests/test_cuda.py (torch backend eager and compiled, the Triton row kernel in fp32 and bf16, each
# against float64) and tests/test_triton.py (backend choice; its interpreter tests skip on a CUDA machine).
# Table: loss_bench --device cuda --dtype bfloat16 at the SmolLM2 and Llama-3 shapes, N 4096 and 16384:
# floor, Liger FKL (JSD beta 0), our Triton FKL / ToDi, our torch-backend FKL / ToDi, with gradient errors
# against float64 at N = 4096.
# Writes $OUT/test_cuda.log, $OUT/loss_bench_cuda_bfloat16.json and .log (with F32=1 also the float32 table,
# $OUT/loss_bench_cuda_float32.json; it does not fit in the 9 minutes beside the rest).
# BENCH_SHAPES (default smollm2,llama3), BENCH_SIZES (default 4096,16384) and BENCH_CASES (default: the
# loss_bench cuda default) choose the benchmark cases.
set -u
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SHAPES="${BENCH_SHAPES:-smollm2,llama3}"
SIZES="${BENCH_SIZES:-4096,16384}"
BF16_SIZES="${BENCH_BF16_SIZES:-$SIZES}"
CASES="${BENCH_CASES:-floor,liger-fkl,triton-fkl,triton-todi,fused-fkl,fused-todi}"
TEST_LIMIT="${TEST_LIMIT:-200}" F32_LIMIT="${F32_LIMIT:-100}" BF16_LIMIT="${BF16_LIMIT:-290}"
DTYPES=$([ "${F32:-0}" = 1 ] && echo "bfloat16 float32" || echo "bfloat16")

echo "== device"
nvidia-smi -L
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        2>&1 | grep -v -i "warning" | tail -n 5
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
timeout -k 5 25 python3 - <<'EOF'
import importlib, importlib.metadata, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
for module, dist in (("triton", "triton"), ("transformers", "transformers"), ("accelerate", "accelerate"),
                     ("peft", "peft"), ("tokenizers", "tokenizers"), ("liger_kernel", "liger-kernel"),
                     ("pytest", "pytest")):
    try:
        importlib.import_module(module)
        print(f"{module} {importlib.metadata.version(dist)}", end=" | ")
    except Exception as err:
        print(f"{module} MISSING ({type(err).__name__}: {str(err)[:80]})", end=" | ")
print()
EOF

echo "== tests/test_cuda.py tests/test_triton.py"
timeout -k 5 "$TEST_LIMIT" python3 -m pytest -q -x tests/test_cuda.py tests/test_triton.py -p no:cacheprovider \
    --durations=8 2>&1 | tee "$OUT/test_cuda.log" | tail -n 45
echo "pytest exit status: ${PIPESTATUS[0]} (124 = timed out; full log in \$OUT/test_cuda.log)"
echo "elapsed ${SECONDS}s"

# bfloat16 first (the issue's targets); each case a fresh process, written to the JSON as it finishes.
for dtype in $DTYPES; do
    limit=$([ "$dtype" = float32 ] && echo "$F32_LIMIT" || echo "$BF16_LIMIT")
    sizes=$([ "$dtype" = float32 ] && echo "$SIZES" || echo "$BF16_SIZES")
    echo "== loss_bench --device cuda --dtype $dtype (shapes $SHAPES, N $sizes, cases $CASES, at most ${limit}s)"
    timeout -k 5 "$limit" python3 benchmarks/loss_bench.py --device cuda --dtype "$dtype" --shapes "$SHAPES" \
        --sizes "$sizes" --cases "$CASES" --warmup 1 --repeats 3 --case-timeout 60 --errors --errors-max-n 4096 \
        --out "$OUT/loss_bench_cuda_$dtype.json" >"$OUT/loss_bench_cuda_$dtype.log" 2>&1
    status=$?
    [ "$status" -ne 0 ] && echo "loss_bench exit status: $status (124 = timed out; log in \$OUT)"
    grep -E "FAILED|TIMEOUT|Error" "$OUT/loss_bench_cuda_$dtype.log" | sort -u | head -n 8
    echo "elapsed ${SECONDS}s"
done

echo "== tables (from the JSON files: complete up to the last finished case)"
for dtype in $DTYPES; do
    results="$OUT/loss_bench_cuda_$dtype.json"
    if [ -f "$results" ]; then
        echo "$(basename "$results"):"
        python3 benchmarks/loss_bench.py --print "$results"
    else
        echo "$(basename "$results"): missing"
    fi
done
echo "total ${SECONDS}s"
