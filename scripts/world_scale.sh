#!/usr/bin/env bash
# Trains a model on the built-in world for a given number of seconds on whatever accelerator jax sees, then
# measures what it learned (issue N; docs/world.md: the bars are out of reach within a CPU budget, so this is the
# run to make on a lent GPU). Three steps, each with `emojax train-lm` and the model's own settings:
#   1. calibrate: CALIB_STEPS steps of the same shape on a small document set -> tokens per second (train.json);
#   2. train: as many steps as fit in --seconds at that rate (the learning-rate schedule runs its whole course),
#      on --documents world documents (cycled);
#   3. scripts/world_diagnostics.py on the trained model (reach, name copying, naming by document kind and after
#      the implicit scenarios, each against chance): diagnostics.txt.
# The trained model folder (OUT/world_lm: config.json, model.safetensors, tokenizer, train.json) comes back for the
# CPU side to run the demo's fit on (runs with run.model: OUT/world_lm and the same world settings).
#
#   scripts/world_scale.sh [--seconds 240] [--d-model 256] [--layers 4] [--batch 64] [--documents 100000]
#                          [--lr 2e-3] [--calib-steps 400] [world.key=value ...]
#
# Wall time: --seconds of training, plus writing and tokenizing the documents (about 1 s per 1,300 documents, on
# one CPU core), the calibration (CALIB_STEPS steps and its compilation) and the diagnostics (under a minute).
# Output in $OUT (a temp folder when unset): calib/train.json, world_lm/, diagnostics.txt, world_scale.log.
set -u -o pipefail

SECONDS_BUDGET=240
D_MODEL=256
LAYERS=4
BATCH=64
DOCUMENTS=100000
LR=2e-3
CALIB_STEPS=400
WORLD=()
usage() { sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --*) [ "$1" = --help ] || [ $# -ge 2 ] || { echo "world_scale.sh: $1 needs a value" >&2; exit 2; } ;;
    esac
    case "$1" in
        --seconds) SECONDS_BUDGET=${2:-}; shift 2 ;;
        --d-model) D_MODEL=${2:-}; shift 2 ;;
        --layers) LAYERS=${2:-}; shift 2 ;;
        --batch) BATCH=${2:-}; shift 2 ;;
        --documents) DOCUMENTS=${2:-}; shift 2 ;;
        --lr) LR=${2:-}; shift 2 ;;
        --calib-steps) CALIB_STEPS=${2:-}; shift 2 ;;
        world.*=*) WORLD+=("$1"); shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "world_scale.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
for pair in "seconds:$SECONDS_BUDGET" "d-model:$D_MODEL" "layers:$LAYERS" "batch:$BATCH" "documents:$DOCUMENTS" \
            "calib-steps:$CALIB_STEPS"; do
    case "${pair#*:}" in ''|0?*|*[!0-9]*) echo "world_scale.sh: --${pair%%:*} must be a whole number, got '${pair#*:}'" >&2
                                           exit 2 ;; esac
done

cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/emojax-world-scale.XXXXXX")}
mkdir -p "$OUT" || exit 2
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
D_MLP=$(( (D_MODEL * 8 / 3 + 63) / 64 * 64 ))  # the Llama ratio, rounded up to 64
SHAPE=("d_model=$D_MODEL" "n_layers=$LAYERS" "d_mlp=$D_MLP" "batch_size=$BATCH" "lr=$LR" ${WORLD[@]+"${WORLD[@]}"})
exec > >(tee -a "$OUT/world_scale.log") 2>&1
echo "world_scale.sh: ${SHAPE[*]}, ${SECONDS_BUDGET}s of training, $DOCUMENTS documents, OUT=$OUT"

"$PY" -m emojax.cli train-lm --quiet --out "$OUT/calib" "${SHAPE[@]}" steps="$CALIB_STEPS" n_documents=4000 \
    warmup_steps=10 || { echo "world_scale.sh: FAILED calibration"; exit 1; }
STEPS=$("$PY" - "$OUT/calib/train.json" "$SECONDS_BUDGET" "$BATCH" <<'EOF'
import json
import sys

info = json.load(open(sys.argv[1]))
per_second = info["timing"]["tokens_per_second"]  # includes the first step's compilation: a safe underestimate
rows = int(sys.argv[3]) * info["config"]["seq_len"]
print(max(100, int(float(sys.argv[2]) * per_second / rows)))
EOF
) || { echo "world_scale.sh: FAILED reading the calibration"; exit 1; }
echo "world_scale.sh: calibration $(grep -o '"tokens_per_second": [0-9.]*' "$OUT/calib/train.json"); training $STEPS steps"

"$PY" -m emojax.cli train-lm --quiet --out "$OUT/world_lm" "${SHAPE[@]}" steps="$STEPS" n_documents="$DOCUMENTS" \
    || { echo "world_scale.sh: FAILED training"; exit 1; }
"$PY" scripts/world_diagnostics.py "$OUT/world_lm" | tee "$OUT/diagnostics.txt" \
    || { echo "world_scale.sh: FAILED diagnostics"; exit 1; }
rm -rf "$OUT/calib/checkpoints" "$OUT/calib/model.safetensors"  # the calibration's rate is all that is kept
echo "world_scale.sh: done; the model is $OUT/world_lm"
