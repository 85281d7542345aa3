#!/usr/bin/env bash
# GPU check of issue 25 (solve loop on CUDA): about 4-5 minutes on one H100, from the repository
# root. Installs nothing (torch must be there; node_ocp is pip-installed -e --no-deps only if
# it cannot be imported). Every stage has its own time limit, so the whole script stays under
# ~5 minutes even when a stage hangs.
#
#   bash experiments/gpu_check.sh              # on the GPU machine
#   bash experiments/gpu_check.sh --dry-run    # anywhere: checks the commands' arguments only
#   bash experiments/gpu_check.sh --device=cpu # a tiny CPU run of the same stages
#
# Outputs under $OUT if set, else runs/gpu_check/:
#   env.txt                versions, the GPU
#   tests_cuda.txt         pytest -m cuda (CUDA graphs: replay == eager, recapture, refusals)
#   solver_loop_b64.*      solver-loop table at batch 64: us per NFE of floor, solvers, own
#   solver_loop_b1024.*    adjoint (torchdiffeq / own loop), torchdiffeq's odeint_adjoint, and
#                          own_graph (rk4 replayed from CUDA graphs) with its capture time
#   compile.*              own_compiled (torch.compile of the field) with its compile time
#   cnf_step_*.{txt,json}  one CNF training step (configs/quickstart.toml, node-ocp bench),
#                          torchdiffeq and own backend, Adam vs Adam on odeint_adjoint
#   summary.txt            the tables and the return code and seconds of every stage
set -u

SCRIPT_NAME=gpu_check
HELP_RANGE=2,22p
# shellcheck source=experiments/gpu_common.sh
source "$(dirname "$0")/gpu_common.sh" "$@"

# stage NAME LIMIT_S CMD...: run CMD with a time limit, output in $OUT_DIR/NAME.txt
stage() {
    local name="$1" limit="$2"
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$SUMMARY"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.txt" 2>&1
    rc=$?
    echo "   rc=$rc after $(($(date +%s) - t0)) s" | tee -a "$SUMMARY"
    tail -n 30 "$OUT_DIR/$name.txt" >>"$SUMMARY"
    return 0
}

if [ "$DEVICE" = cuda ]; then
    BATCHES="64 1024"
    REPEATS=7
    FIELDS="mlp conv"
else
    BATCHES="8"
    REPEATS=1
    FIELDS="mlp"
fi
BENCH_DRY=()
[ "$DRY" = 1 ] && BENCH_DRY=(--dry-run)


# 1. the CUDA tests (skipped cleanly without CUDA; collected only in a dry run)
if [ "$DRY" = 1 ]; then
    stage tests_cuda 40 "$PY" -m pytest -m cuda tests/test_cuda_graph.py -q -p no:warnings --collect-only
else
    stage tests_cuda 40 "$PY" -m pytest -m cuda tests/test_cuda_graph.py -q -p no:warnings -x
fi

# 2. the solve-loop table at each batch: floor, own adjoint, torchdiffeq, own_graph (rk4)
EXTRA=()
[ "$DEVICE" = cuda ] && EXTRA=(--solver-loop-extra own_graph)
for b in $BATCHES; do
    # shellcheck disable=SC2086
    stage "solver_loop_b$b" 55 "$PY" experiments/bench_memory.py --solver-loop-only \
        --device "$DEVICE" --solver-loop-batch "$b" --solver-loop-repeats "$REPEATS" \
        --solver-loop-fields $FIELDS --solver-loop-methods dopri5 rk4 \
        --solver-loop-train-steps 0 ${EXTRA[@]+"${EXTRA[@]}"} \
        --out "$OUT_DIR/solver_loop_b$b.json" ${BENCH_DRY[@]+"${BENCH_DRY[@]}"}
done

# 3. torch.compile of the field: its gain per NFE and its compile time (first step)
stage compile 90 "$PY" experiments/bench_memory.py --solver-loop-only --device "$DEVICE" \
    --solver-loop-batch "${BATCHES##* }" --solver-loop-repeats "$REPEATS" \
    --solver-loop-fields mlp --solver-loop-methods rk4 --solver-loop-train-steps 0 \
    --solver-loop-extra own_compiled --out "$OUT_DIR/compile.json" ${BENCH_DRY[@]+"${BENCH_DRY[@]}"}

# 4. one CNF training step (quickstart: 2-D CNF, dopri5, batch 256), both backends
OWN_CFG="$OUT_DIR/quickstart_own.toml"
sed 's/^\[solver\]$/[solver]\nbackend = "own"/' configs/quickstart.toml >"$OWN_CFG"
for arm in torchdiffeq own; do
    cfg=configs/quickstart.toml
    [ "$arm" = own ] && cfg="$OWN_CFG"
    if [ "$DRY" = 1 ]; then
        stage "cnf_step_$arm" 30 "$PY" -c "from node_ocp.train import load_config; c = load_config('$cfg'); print(c.solver)"
    else
        stage "cnf_step_$arm" 30 "$PY" -m node_ocp bench "$cfg" --device "$DEVICE" \
            --optimizers adam,adam-torchdiffeq --steps 21 --no-memory --solver-loop 0 \
            --out "$OUT_DIR/cnf_step_$arm.json" --force
    fi
done

echo "total $(($(date +%s) - START)) s; outputs in $OUT_DIR" | tee -a "$SUMMARY"
