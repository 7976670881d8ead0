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
# BUDGET_S (default 270) bounds the rows: run.py skips, cleanly, each row that would end past
# it, so the call ends well inside its timeout and 15 minutes of device time leave room for a
# second try. Rows run in the order of --frames (8 and 24 first: the targets); extra
# arguments go to run.py (e.g. `bash benchmarks/gpu.sh --rows tune --frames 8,24`).
# It writes results.md, results.json, log.txt, gpu.txt and memory_points.txt (the measured
# peaks, as entries for MEASURED in benchmarks/memory_model.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmark-results}"
BUDGET_S="${BUDGET_S:-270}"
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
python3 benchmarks/run.py --budget-s "$BUDGET_S" --keep-going --steps 4 --warmup 2 \
    --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
status=${PIPESTATUS[0]}
python3 benchmarks/memory_model.py fit "$OUT/results.json" > "$OUT/memory_points.txt" 2>&1
exit "$status"
