# Shared start of the GPU check scripts (gpu_check.sh, gpu_issue21.sh): sourced, not run.
# The caller sets SCRIPT_NAME (its name without .sh) and HELP_RANGE (the sed range of its
# header comment) and sources this file with its own arguments. It parses --dry-run and
# --device=cuda|cpu, makes the output folder ($OUT, else runs/$SCRIPT_NAME), installs
# node_ocp with --no-deps only if it cannot be imported, and writes env.txt (versions, the
# GPU, the commit) into it and into summary.txt. It sets DRY, DEVICE, OUT_DIR, PY, SUMMARY
# and START.

DRY=0
DEVICE=cuda
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        --device=*) DEVICE="${arg#--device=}" ;;
        -h | --help)
            sed -n "$HELP_RANGE" "$0"
            exit 0
            ;;
        *)
            echo "$SCRIPT_NAME.sh: unknown argument '$arg' (accepted: --dry-run, --device=cuda|cpu)" >&2
            exit 2
            ;;
    esac
done
case "$DEVICE" in
    cuda | cpu) ;;
    *)
        echo "$SCRIPT_NAME.sh: --device=$DEVICE; accepted: cuda or cpu" >&2
        exit 2
        ;;
esac

OUT_DIR="${OUT:-runs/$SCRIPT_NAME}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python}"
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
START=$(date +%s)

if ! "$PY" -c "import node_ocp" 2>/dev/null; then
    echo "node_ocp not importable: pip install -e . --no-deps" | tee -a "$SUMMARY"
    if [ "$DRY" = 0 ]; then
        "$PY" -m pip install -e . --no-deps -q >"$OUT_DIR/pip.txt" 2>&1 || true
    fi
fi

{
    date -u
    "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" 2>&1
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    git rev-parse HEAD 2>/dev/null
} >"$OUT_DIR/env.txt"
cat "$OUT_DIR/env.txt" >>"$SUMMARY"
