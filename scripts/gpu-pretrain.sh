#!/usr/bin/env bash
# Pretraining the embedded base on a lent GPU machine (issue 19), which has no Rust and no network. Carry the CUDA
# binary (scripts/build-cuda.sh → target/cuda/focusdpo.xz) and, to continue a base, its file (e.g. in an ignored
# folder named in the device tool's `carry`), then run
#
#   bash scripts/gpu-pretrain.sh SECONDS OUT_DIR [--set KEY=VALUE ...]            # on the GPU machine
#   bash scripts/gpu-pretrain.sh --dry-run SECONDS OUT_DIR [--set KEY=VALUE ...]  # here: the CPU build, same stages
#
# A new run trains for SECONDS (`focusdpo pretrain --stop-after`; warm-started from `--set init=FILE` when given, any
# other setting by --set), then its EMA weights are exported (f16) and cut into pieces under the device tool's 16 MiB
# a file. What comes back in OUT_DIR: base.safetensors.part-00, -01, … and base.sha256, the run's config.toml and
# metrics.jsonl, the log's last lines, gpu.txt. Here, afterwards:
#
#   cat OUT_DIR/base.safetensors.part-* > base.safetensors && sha256sum -c OUT_DIR/base.sha256
#   focusdpo pretrain --out runs/NAME --steps N --set init=base.safetensors ...   # continue on the CPU
#
# The run folder itself (checkpoints of ~170 MB with the AdamW moments) stays on the machine: too big to come back.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then
    DRY=1
    shift
fi
USAGE="usage: scripts/gpu-pretrain.sh [--dry-run] SECONDS OUT_DIR [--set KEY=VALUE ...]"
SECS="${1:?$USAGE}"
OUT="${2:?$USAGE}"
shift 2
mkdir -p "$OUT"
START=$(date +%s)
log() { echo "== [$(($(date +%s) - START)) s] $*"; }

if [ "$DRY" = 1 ]; then
    DEV=cpu
    BIN="${FOCUSDPO_BIN:-target/release/focusdpo}"
    echo "dry run on the CPU" > "$OUT/gpu.txt"
else
    DEV=cuda
    BIN="${FOCUSDPO_BIN:-target/cuda/focusdpo}"
fi
if [ ! -x "$BIN" ] && [ -f "$BIN.xz" ]; then
    # The carried form: xz, unpacked with Python's lzma (no xz tool needed).
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$BIN.xz" "$BIN"
    chmod +x "$BIN"
fi
[ -x "$BIN" ] || { echo "no $BIN(.xz): build it with scripts/build-cuda.sh and carry it" >&2; exit 1; }
if [ "$DRY" = 0 ]; then
    export LD_LIBRARY_PATH="$(python3 scripts/cuda_lib_path.py)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
fi
"$BIN" --version

RUN="${GPU_PRETRAIN_RUN:-/tmp/focusdpo-gpu-pretrain}"
rm -rf "$RUN"
log "pretraining on $DEV for $SECS s into $RUN: $*"
# A checkpoint every 2 000 steps as well as at the stop, so that an outer kill loses little.
"$BIN" pretrain --out "$RUN" --device "$DEV" --steps 100000000 --stop-after "$SECS" --plain \
    --set checkpoint_every=2000 --set keep_last=1 "$@" > "$OUT/pretrain.log" 2>&1
STATUS=$?
tail -3 "$OUT/pretrain.log"
cp "$RUN/config.toml" "$RUN/metrics.jsonl" "$OUT/" 2> /dev/null
if [ "$STATUS" != 0 ]; then
    log "pretraining failed (exit $STATUS); the log's end is in $OUT/pretrain.log"
fi
# The log has a line a step; what comes back keeps its head (settings) and its end.
{ head -5 "$OUT/pretrain.log"; echo "…"; tail -40 "$OUT/pretrain.log"; } > "$OUT/pretrain-log.txt"
rm -f "$OUT/pretrain.log"

log "export"
"$BIN" pretrain --out "$RUN" --export "$RUN/base.safetensors" || exit 1
split -b 15M -d "$RUN/base.safetensors" "$OUT/base.safetensors.part-"
(cd "$RUN" && sha256sum base.safetensors) > "$OUT/base.sha256"
ls -l "$OUT"
log "done"
exit "$STATUS"
