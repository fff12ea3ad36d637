#!/usr/bin/env bash
# CUDA correctness tests and loss timings on a GPU machine: under 7 minutes even if every step hangs
# (25 s versions + 175 s tests + 100 s + 85 s benchmarks, each under `timeout`); ~5 minutes when all goes well.
#
# Run from the repository root with $OUT set to a folder for the results:
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
# Wheels in .whl/ (liger-kernel, pytest and its dependencies) are installed into /tmp/site first.
# Writes $OUT/test_cuda.log, $OUT/loss_bench_cuda_{float32,bfloat16}.json and .log.
# BENCH_SHAPES (default smollm2) and BENCH_SIZES (default 4096,16384) choose the benchmark cases.
set -u
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SHAPES="${BENCH_SHAPES:-smollm2}"
SIZES="${BENCH_SIZES:-4096,16384}"
BF16_SIZES="${BENCH_BF16_SIZES:-$SIZES}"
TEST_LIMIT="${TEST_LIMIT:-175}" F32_LIMIT="${F32_LIMIT:-100}" BF16_LIMIT="${BF16_LIMIT:-85}"

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

echo "== tests/test_cuda.py"
timeout -k 5 "$TEST_LIMIT" python3 -m pytest -q -x tests/test_cuda.py -p no:cacheprovider --durations=8 2>&1 \
    | tee "$OUT/test_cuda.log" | tail -n 45
echo "pytest exit status: ${PIPESTATUS[0]} (124 = timed out; full log in \$OUT/test_cuda.log)"
echo "elapsed ${SECONDS}s"

# float32 pays the cold torch.compile of the fused kernel and Liger's; bfloat16 reuses the fused one.
for dtype in float32 bfloat16; do
    limit=$([ "$dtype" = float32 ] && echo "$F32_LIMIT" || echo "$BF16_LIMIT")
    sizes=$([ "$dtype" = float32 ] && echo "$SIZES" || echo "$BF16_SIZES")
    echo "== loss_bench --device cuda --dtype $dtype (shapes $SHAPES, N $sizes, at most ${limit}s)"
    timeout -k 5 "$limit" python3 benchmarks/loss_bench.py --device cuda --dtype "$dtype" --shapes "$SHAPES" \
        --sizes "$sizes" --warmup 1 --repeats 3 --case-timeout 60 \
        --out "$OUT/loss_bench_cuda_$dtype.json" >"$OUT/loss_bench_cuda_$dtype.log" 2>&1
    status=$?
    [ "$status" -ne 0 ] && echo "loss_bench exit status: $status (124 = timed out; log in \$OUT)"
    grep -E "FAILED|TIMEOUT|Error" "$OUT/loss_bench_cuda_$dtype.log" | sort -u | head -n 8
    echo "elapsed ${SECONDS}s"
done

echo "== tables (from the JSON files: complete up to the last finished case)"
for dtype in float32 bfloat16; do
    results="$OUT/loss_bench_cuda_$dtype.json"
    if [ -f "$results" ]; then
        echo "$(basename "$results"):"
        python3 benchmarks/loss_bench.py --print "$results"
    else
        echo "$(basename "$results"): missing"
    fi
done
echo "total ${SECONDS}s"
