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
#   forecast_spiral (ODE-RNN, rk4): adam lr 0.01, ocnopt (the default), ocnopt-gn-fast
#                                  (truncated Gauss-Newton, 10 CG steps, §8)
#   cnf_8gaussians (2-D CNF, dopri5): adam lr 0.01, ocnopt (the default)
# Outputs under $OUT if set, else runs/gpu_issue21/: one run folder each (node-ocp train),
# env.txt, summary.txt (per run: steps, seconds, amortised step time, NFE, val and test).
set -u

DRY=0
DEVICE=cuda
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        --device=*) DEVICE="${arg#--device=}" ;;
        -h | --help)
            sed -n '2,18p' "$0"
            exit 0
            ;;
        *)
            echo "gpu_issue21.sh: unknown argument '$arg' (accepted: --dry-run, --device=cuda|cpu)" >&2
            exit 2
            ;;
    esac
done
case "$DEVICE" in
    cuda | cpu) ;;
    *)
        echo "gpu_issue21.sh: --device=$DEVICE; accepted: cuda or cpu" >&2
        exit 2
        ;;
esac

OUT_DIR="${OUT:-runs/gpu_issue21}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python}"
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
START=$(date +%s)

if ! "$PY" -c "import node_ocp" 2>/dev/null; then
    echo "node_ocp not importable: pip install -e . --no-deps" | tee -a "$SUMMARY"
    [ "$DRY" = 0 ] && "$PY" -m pip install -e . --no-deps -q >"$OUT_DIR/pip.txt" 2>&1
fi
{
    date -u
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" 2>&1
    git rev-parse HEAD 2>/dev/null
} >"$OUT_DIR/env.txt"
cat "$OUT_DIR/env.txt" >>"$SUMMARY"

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
run forecast_spiral ocnopt-gn-fast default
run cnf_8gaussians adam 0.01
run cnf_8gaussians ocnopt default

echo "total $(($(date +%s) - START)) s; outputs in $OUT_DIR" | tee -a "$SUMMARY"
