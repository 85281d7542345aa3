#!/usr/bin/env bash
# GPU check of issue 21: one ODE-RNN and one CNF task of bench_default, both optimizers, one
# seed, on the GPU; reports step times (and the metrics reached) for the closing note. About
# 5-6 minutes on one H100, from the repository root; installs nothing (node_ocp is pip
# installed -e --no-deps only if it cannot be imported). Every run has its own time limit.
#
#   bash experiments/gpu_issue21.sh              # on the GPU machine
#   bash experiments/gpu_issue21.sh --device=cpu # the same runs, shorter, on the CPU
#   bash experiments/gpu_issue21.sh --dry-run    # anywhere: checks every config and table
#
# Runs (seed 0; tuned Adam's rate of bench_issue21.md §11):
#   forecast_spiral (ODE-RNN, rk4): adam lr 0.01, ocnopt (the default: subspace steps, §20),
#                                  ocnopt-held (the held step), ocnopt-gn-fast (truncated
#                                  Gauss-Newton, 10 CG steps, §8)
#   cnf_8gaussians (2-D CNF, dopri5): adam lr 0.01, ocnopt (the default)
# Outputs under $OUT if set, else runs/gpu_issue21/: one run folder each (node-ocp train),
# env.txt, summary.txt (per run: steps, seconds, amortised step time, NFE, val and test).
set -u

SCRIPT_NAME=gpu_issue21
HELP_RANGE=2,19p
# shellcheck source=experiments/gpu_common.sh
source "$(dirname "$0")/gpu_common.sh" "$@"

if [ "$DEVICE" = cuda ]; then
    SECONDS_PER_RUN=45
else
    SECONDS_PER_RUN=8
fi

# run CONFIG OPTIMIZER LR: one seeded run with a time budget, then its figures
run() {
    local cfg="configs/$1.toml" opt="$2" lr="$3"
    local dest="$OUT_DIR/$1-$opt"
    local lr_args=()
    [ "$lr" != default ] && lr_args=(--lr "$lr")
    echo "== $1 $opt (lr $lr, ${SECONDS_PER_RUN} s of training)" | tee -a "$SUMMARY"
    if [ "$DRY" = 1 ]; then
        "$PY" -c "from node_ocp.train import load_config; c = load_config('$cfg'); \
print('   table', '$opt', c.optimizers['$opt'])" 2>&1 | tee -a "$SUMMARY"
        return 0
    fi
    timeout --kill-after=10 $((SECONDS_PER_RUN * 3 + 60)) "$PY" -m node_ocp train "$cfg" \
        --device "$DEVICE" --optimizer "$opt" ${lr_args[@]+"${lr_args[@]}"} --seed 0 \
        --max-steps 100000 --max-time "$SECONDS_PER_RUN" --no-progress --overwrite \
        --out "$dest" >"$dest.txt" 2>&1
    echo "   rc=$?" | tee -a "$SUMMARY"
    "$PY" - "$dest/summary.json" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import json, sys
s = json.load(open(sys.argv[1]))
print(f"   {s['device']}: {s['steps']} steps in {s['train_seconds']:.1f} s, "
      f"amortised step {1e3 * s['amortized_step_s']:.1f} ms, "
      f"NFE fwd/bwd {s['nfe_forward']:.0f}/{s['nfe_backward']:.0f}, "
      f"val {s['metric']} {s['final_val']:.4g} (best {s['best_val']:.4g}), "
      f"test of best-val model {s['best_test_metric']:.4g}")
EOF
}

run forecast_spiral adam 0.01
run forecast_spiral ocnopt default
run forecast_spiral ocnopt-held default
run forecast_spiral ocnopt-gn-fast default
run cnf_8gaussians adam 0.01
run cnf_8gaussians ocnopt default

echo "total $(($(date +%s) - START)) s; outputs in $OUT_DIR" | tee -a "$SUMMARY"
