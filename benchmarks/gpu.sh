#!/usr/bin/env bash
# The GPU session's benchmark: every row of BENCHMARKS.md in ONE call of the device tool,
# within a time budget, results in $OUT (or ./benchmark-results).
#
# The device machine has torch, transformers, accelerate, peft, einops, safetensors, rich and
# typer, but not diffusers, av or tomli_w: they travel as wheels in .whl/ (ignored by git).
# Fetch them once, here, with the versions of the venv:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl \
#       diffusers==0.42.1 av==18.1.0 tomli_w==1.2.0 importlib_metadata==10.2.0
#
# Then run it as the device tool's command, carrying .whl:
#
#   command: VEDIT_COMMIT=<git rev-parse --short HEAD> bash benchmarks/gpu.sh
#   carry: [".whl"]      timeout_s: 330
#
# (the machine's copy of the tree has no git: VEDIT_COMMIT names the code in the table).
# BUDGET_S (default 250) bounds the timed rows: run.py skips, cleanly, each row that would end
# past it, so the call ends well inside its timeout and 15 minutes of device time leave room
# for a second try. Rows run in the order of FRAMES (default 8,24,16,32,64,128: the targets'
# counts first); extra arguments go to run.py (e.g. `bash benchmarks/gpu.sh --rows edit
# --edit-frames 24` for a second call with the rows the first one had no time for).
#
# Meanwhile flops.py counts every tune and 2D row's FLOPs on the meta device in a second
# process, on another CPU core and never on the GPU (CUDA_VISIBLE_DEVICES is empty for it);
# whatever it counted by the end is merged into the tables (run.py --render).
#
# TINY=1 runs the same script with the tiny shapes on any machine, a GPU or not: the check of
# everything but the figures (e.g. `TINY=1 OUT=/tmp/bench bash benchmarks/gpu.sh`).
# It writes results.md, results.json, log.txt, flops.json, flops.log and gpu.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmark-results}"
BUDGET_S="${BUDGET_S:-250}"
FLOPS_GRACE_S="${FLOPS_GRACE_S:-15}"  # how long to wait for the FLOP counts after the rows
if [ "${TINY:-0}" = 1 ]; then
    SHAPES=(--tiny)
    FRAMES="${FRAMES:-2,4}"
else
    SHAPES=()
    FRAMES="${FRAMES:-8,24,16,32,64,128}"
fi
mkdir -p "$OUT"

if ! python3 -c "import diffusers, av, tomli_w" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # vedit from this tree, not installed
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit \
    --format=csv > "$OUT/gpu.txt" 2>&1 || true

CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1 python3 benchmarks/flops.py ${SHAPES[@]+"${SHAPES[@]}"} \
    --frames "$FRAMES" --json --out "$OUT/flops.json" > "$OUT/flops.log" 2>&1 &
flops_pid=$!

python3 benchmarks/run.py ${SHAPES[@]+"${SHAPES[@]}"} --frames "$FRAMES" --budget-s "$BUDGET_S" \
    --keep-going --flops off --flops-from "$OUT/flops.json" --out "$OUT" "$@" 2>&1 \
    | tee "$OUT/log.txt"
status=${PIPESTATUS[0]}

deadline=$(( $(date +%s) + FLOPS_GRACE_S ))
while kill -0 "$flops_pid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 1; done
kill "$flops_pid" 2>/dev/null && echo "flops.py stopped: the counts it had are merged" \
    >> "$OUT/flops.log"
wait "$flops_pid" 2>/dev/null
if [ -f "$OUT/results.json" ]; then
    python3 benchmarks/run.py --render --out "$OUT" --flops-from "$OUT/flops.json" \
        > /dev/null 2>> "$OUT/log.txt" || status=1
fi
exit "$status"
