#!/usr/bin/env bash
# The GPU session's benchmark: every row of BENCHMARKS.md in ONE call of the device tool,
# within a time budget, results in $OUT (or ./benchmark-results).
#
# The device machine (one NVIDIA H200) has torch 2.11, transformers, accelerate, peft, einops,
# safetensors, huggingface_hub, rich and typer, but not diffusers, av or tomli_w: they travel as
# wheels in .whl/ (ignored by git), at the versions of the venv. Fetch them once, here, in the
# repository's root (/work/.library/device/README.md, "nvidia-h200"):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       --platform manylinux1_x86_64 -d .whl \
#       diffusers==0.42.1 av==18.1.0 tomli_w==1.2.0 importlib_metadata==10.2.0
#
# (about 41 MB, of the 64 MiB a call may carry with the tree). Commit, then run it as the
# device tool's command, carrying .whl:
#
#   command: VEDIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu.sh
#            (write the commit out: the machine's copy of the tree has no git, and
#            VEDIT_COMMIT names the code in the table)
#   carry: [".whl"]      timeout_s: 330
#
# BUDGET_S (default 250) bounds the timed rows: run.py skips, cleanly, each row that would end
# past it, so the call ends well inside its timeout and 15 minutes of device time leave room
# for a second call. Rows run in the order of FRAMES (default 8,24,16,32,64,128: the targets'
# counts first); extra arguments go to run.py. A second call takes the rows the first had no
# time for, e.g. `FRAMES=32,64,128 bash benchmarks/gpu.sh --rows tune,unet2d` or
# `FRAMES=24 bash benchmarks/gpu.sh --rows tune-run,edit --edit-frames 24`.
#
# Meanwhile flops.py counts every tune and 2D row's FLOPs on the meta device in a second
# process, on another CPU core and never on the GPU (CUDA_VISIBLE_DEVICES is empty for it);
# whatever it counted by the end is merged into the tables (run.py --render). A third process
# predicts each tune, 2D and edit row's peak memory with vedit's traced predictor (run.py
# --predict, on the CPU, for this machine's GPU); the tables show predicted next to measured.
#
# TINY=1 runs the same script with the tiny shapes on any machine, a GPU or not: the check of
# everything but the figures (e.g. `TINY=1 OUT=/tmp/bench bash benchmarks/gpu.sh`).
# It writes results.md, results.json, log.txt, flops.json, flops.log, predicted.json,
# predict.log and gpu.txt.
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

# The carried wheels, installed as the device README says, into a folder of this call's own.
if compgen -G ".whl/*.whl" > /dev/null; then
    site="$(mktemp -d /tmp/vedit-site.XXXXXX)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl || exit 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import diffusers, av, tomli_w" || {
    echo "diffusers, av or tomli_w is missing: carry their wheels in .whl (see above)" >&2
    exit 1
}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # vedit from this tree, not installed
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit \
    --format=csv > "$OUT/gpu.txt" 2>&1 || true

CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1 python3 benchmarks/flops.py ${SHAPES[@]+"${SHAPES[@]}"} \
    --frames "$FRAMES" --json --out "$OUT/flops.json" > "$OUT/flops.log" 2>&1 &
flops_pid=$!
OMP_NUM_THREADS=1 python3 benchmarks/run.py ${SHAPES[@]+"${SHAPES[@]}"} --frames "$FRAMES" \
    --predict --out "$OUT" "$@" > "$OUT/predict.log" 2>&1 &
predict_pid=$!

python3 benchmarks/run.py ${SHAPES[@]+"${SHAPES[@]}"} --frames "$FRAMES" --budget-s "$BUDGET_S" \
    --keep-going --flops off --flops-from "$OUT/flops.json" \
    --predicted-from "$OUT/predicted.json" --out "$OUT" "$@" 2>&1 \
    | tee "$OUT/log.txt"
status=${PIPESTATUS[0]}

deadline=$(( $(date +%s) + FLOPS_GRACE_S ))
while { kill -0 "$flops_pid" || kill -0 "$predict_pid"; } 2>/dev/null \
        && [ "$(date +%s)" -lt "$deadline" ]; do sleep 1; done
kill "$flops_pid" 2>/dev/null && echo "flops.py stopped: the counts it had are merged" \
    >> "$OUT/flops.log"
kill "$predict_pid" 2>/dev/null && echo "--predict stopped: the peaks it had are merged" \
    >> "$OUT/predict.log"
wait "$flops_pid" "$predict_pid" 2>/dev/null
if [ -f "$OUT/results.json" ]; then
    python3 benchmarks/run.py --render --out "$OUT" --flops-from "$OUT/flops.json" \
        --predicted-from "$OUT/predicted.json" > /dev/null 2>> "$OUT/log.txt" || status=1
fi
exit "$status"
