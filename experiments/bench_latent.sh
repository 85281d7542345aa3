#!/bin/bash
# The latent ODE on the spiral forecaster (configs/latent_spiral.toml), OCNOpt's default
# against tuned Adam: Adam's lr grid on seed 0 (chosen by the best validation MSE), then
# OCNOpt and the tuned Adam on seeds 0-2, each pair started together, one process per core
# (OMP_NUM_THREADS=1), so both runs of a pair see the same load.
#   bash experiments/bench_latent.sh OUT STEPS "0.003 0.01 0.03 0.1"
#   python experiments/bench_latent_summary.py OUT
set -e
OUT=${1:?OUT folder}; STEPS=${2:-300}; LRS=${3:-"0.003 0.01 0.03 0.1"}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
mkdir -p "$OUT"
CFG="$OUT/latent_spiral.toml"
sed "s/^steps = 150/steps = $STEPS/" "$ROOT/configs/latent_spiral.toml" > "$CFG"
run() {  # optimizer seed lr(or "") dir
  OMP_NUM_THREADS=1 $PY -m node_ocp train "$CFG" --optimizer "$1" ${3:+--lr $3} --seed "$2" \
    --out "$OUT/$4" --no-progress --overwrite > "$OUT/$4.log" 2>&1
}
set -- $LRS
while [ $# -gt 0 ]; do
  run adam 0 "$1" "adam_lr$1_s0" &
  [ $# -gt 1 ] && run adam 0 "$2" "adam_lr$2_s0" &
  wait; shift; [ $# -gt 0 ] && shift
done
BEST=$($PY "$ROOT/experiments/bench_latent_summary.py" "$OUT" --best-lr)
echo "$BEST" > "$OUT/best_lr.txt"
for s in 0 1 2; do
  run ocnopt $s "" "ocnopt_s$s" & run adam $s "$BEST" "adam_best_s$s" & wait
done
