#!/usr/bin/env bash
# The GPU check (≤ 9 min) for a GPU machine with no Rust and no network: carry the repository with the binary
# built by scripts/build-cuda.sh (target/cuda/focusdpo.xz) and the diffusers wheel (.whl/, for the reference
# step), and run
#
#   bash scripts/gpu-check.sh [OUT_DIR]            # on the GPU machine
#   bash scripts/gpu-check.sh --dry-run [OUT_DIR]  # here: the same stages on the CPU, tiny sizes (tests the script)
#
# 1. CPU-vs-CUDA parity: one FocusDPO step of the tiny default (bundled base and data), dumped on each device; the
#    loss, predictions and the fused mask are compared (python3 with torch + safetensors, as the machine has).
# 2. FocusDPO steps at FLUX.1-dev size: random weights of FLUX.1-dev's transformer (random-flux-dev:0, bf16,
#    12 B parameters), block checkpointing, LoRA rank 32 (attention + MLP), a 512 px item with one 512 px
#    reference; step times and the peak GPU memory (nvidia-smi, sampled every 100 ms) beside the memory plan.
# 3. The same step in diffusers + peft on PyTorch (scripts/reference/diffusers_dpo_step.py): the ratio.
# 4. The paper's hardest setting: 1024 px, 2 references, checkpointing and train.split_pair (the 48 GB target);
#    then the same with bf16 activations (model.activations, autocast), which the plan says fits 48 GB.
# 5. While time is left: 1024 px, 2 references in diffusers + peft, and ours without the split pair.
# 6. A data-parallel world of one GPU (WORLD_SIZE=1: NCCL with the `nccl` build) trains like a plain run.
# Each stage has its own time limit inside one deadline, and everything lands in OUT as it comes: table.md at the
# end sums it up.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then
    DRY=1
    shift
fi
OUT="${1:-${OUT:-out/gpu-check}}"
mkdir -p "$OUT"
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_SECONDS:-530}))
left() { echo $((DEADLINE - $(date +%s))); }
log() { echo "== [$(($(date +%s) - START)) s] $*"; }

if [ "$DRY" = 1 ]; then
    DEV=cpu BASE=random:0 SMALL=64 LARGE=96 REF_SMALL=64 REF_LARGE=48 PY_TINY="--tiny --device cpu"
    BIN="${FOCUSDPO_BIN:-target/release/focusdpo}"
    PYTHON="${PYTHON:-python3}"
else
    DEV=cuda BASE=random-flux-dev:0 SMALL=512 LARGE=1024 REF_SMALL=512 REF_LARGE=512 PY_TINY=""
    BIN="${FOCUSDPO_BIN:-target/cuda/focusdpo}"
    PYTHON=python3
fi
if [ ! -x "$BIN" ] && [ -f "$BIN.xz" ]; then
    # The carried form: xz, unpacked with Python's lzma (no xz tool needed).
    "$PYTHON" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$BIN.xz" "$BIN"
    chmod +x "$BIN"
fi
[ -x "$BIN" ] || { echo "no $BIN(.xz): build it with scripts/build-cuda.sh and carry it" >&2; exit 1; }

if [ "$DRY" = 0 ]; then
    # The CUDA libraries the binary links (cuBLAS, cuRAND, NVRTC) from the Python wheels PyTorch installed.
    LIBS="$(python3 scripts/cuda_lib_path.py)"
    # Only for our binary: PyTorch loads its own, and a path over all of them can hand it mismatched ones.
    OUR_LIBS="${LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    # diffusers for the reference step, from the carried wheel (the machine has torch, peft and transformers).
    if ls .whl/diffusers-*.whl > /dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl && export PYTHONPATH=/tmp/site
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
else
    echo "dry run on the CPU" > "$OUT/gpu.txt"
fi
# Our binary with the CUDA libraries on its path; the reference step with PyTorch's own.
BIN_CMD=(env LD_LIBRARY_PATH="${OUR_LIBS:-${LD_LIBRARY_PATH:-}}" "$BIN")
ours() { "${BIN_CMD[@]}" "$@"; }
ours --version

# measure NAME CAP CMD...: runs CMD under min(CAP, time left) seconds with its output in OUT/NAME.txt, sampling the
# GPU's memory every 100 ms into OUT/NAME.mem; writes OUT/NAME.status (exit code) and OUT/NAME.peak (MiB).
measure() {
    local name=$1 cap=$2
    shift 2
    if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
        log "$name: skipped (GPU_CHECK_SKIP)"
        echo skipped > "$OUT/$name.status"
        return
    fi
    local limit
    limit=$(left)
    [ "$limit" -gt "$cap" ] && limit=$cap
    if [ "$limit" -lt 20 ]; then
        log "$name: skipped, no time left"
        echo skipped > "$OUT/$name.status"
        return
    fi
    log "$name (limit ${limit} s): $*"
    local smi=""
    if [ "$DRY" = 0 ]; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/$name.mem" &
        smi=$!
    fi
    local t0
    t0=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo $? > "$OUT/$name.status"
    echo $(($(date +%s) - t0)) > "$OUT/$name.seconds"
    [ -n "$smi" ] && kill "$smi" 2> /dev/null
    wait 2> /dev/null
    if [ -s "$OUT/$name.mem" ]; then sort -n "$OUT/$name.mem" | tail -1 > "$OUT/$name.peak"; else echo "?" > "$OUT/$name.peak"; fi
    tail -4 "$OUT/$name.txt"
}

# Step times of `focusdpo train` output (`... 1234 ms` lines), and of the reference script's JSON line.
our_steps() { grep -E '^step ' "$OUT/$1.txt" 2> /dev/null | sed -E 's/.* ([0-9]+) ms$/\1/' | tr '\n' ' '; }
ref_field() { grep -E '^\{' "$OUT/$1.txt" 2> /dev/null | tail -1 | python3 -c "import json,sys; print(json.load(sys.stdin)['$2'])" 2> /dev/null || echo "?"; }

# `focusdpo train` at FLUX.1-dev size; each stage adds its data, sizes and step settings. The memory trace
# (FOCUSDPO_MEMORY_TRACE=1) prints the memory in use at each phase of a step, synchronising there.
FLUX=(train --base "$BASE" --set model.device=$DEV --set model.dtype=bf16 --set lora.rank=32 --set lora.alpha=32
    --set log.checkpoint_every=0 --plain)

log "1. CPU vs $DEV: one FocusDPO step of the tiny default"
for dev in cpu $DEV; do
    rm -rf "$OUT/parity-$dev"
    measure "parity-$dev" 60 "${BIN_CMD[@]}" train --steps 1 --set model.device=$dev --set log.checkpoint_every=0 \
        --dump-step 1 "$OUT/parity-$dev.safetensors" --out "$OUT/parity-$dev" --plain
done
"$PYTHON" - "$OUT" "$DEV" << 'EOF' | tee "$OUT/parity.txt"
import sys
from safetensors.torch import load_file
out, dev = sys.argv[1], sys.argv[2]
try:
    cpu, gpu = load_file(f"{out}/parity-cpu.safetensors"), load_file(f"{out}/parity-{dev}.safetensors")
except Exception as e:
    print(f"no dump to compare: {e}")
    sys.exit(0)
worst = 0.0
for k in sorted(cpu):
    a, b = cpu[k].double(), gpu[k].double()
    err = ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
    worst = max(worst, err)
    print(f"{k:12s} max relative error {err:.2e}")
print(f"worst {worst:.2e}: {'ok' if worst < 1e-3 else 'DIFFERS'}")
EOF

log "1b. a world of one ($DEV; NCCL on a GPU) against a plain run, two tiny steps"
for kind in world plain; do
    rm -rf "$OUT/$kind-one-run"
    if [ "$kind" = world ]; then WORLD=(env WORLD_SIZE=1 RANK=0 LOCAL_RANK=0); else WORLD=(env); fi
    measure "$kind-one" 60 "${WORLD[@]}" "${BIN_CMD[@]}" train --steps 2 --set model.device=$DEV \
        --set log.checkpoint_every=0 --out "$OUT/$kind-one-run" --plain
done
"$PYTHON" - "$OUT" << 'EOF' | tee "$OUT/world-one.txt"
import sys
from safetensors.torch import load_file
out = sys.argv[1]
try:
    a = load_file(f"{out}/world-one-run/checkpoints/step-2/lora.safetensors")
    b = load_file(f"{out}/plain-one-run/checkpoints/step-2/lora.safetensors")
except Exception as e:
    print(f"no checkpoints to compare: {e}")
    sys.exit(0)
worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
print(f"world of one vs plain: LoRA max difference {worst:.2e}: {'ok' if worst <= 1e-6 else 'DIFFERS'}")
EOF

log "2. FocusDPO at FLUX.1-dev size: $SMALL px, 1 × $REF_SMALL px reference, bf16, checkpointing"
ours dip synth --out "$OUT/d-small" --items 1 --subjects 1 --size "$SMALL" > /dev/null
ours dip synth --out "$OUT/d-large" --items 1 --subjects 2 --size "$LARGE" > /dev/null
plan() { ours plan --base "$BASE" --dtype bf16 --rank 32 --device $DEV "$@"; }
plan --size "$SMALL" --references 1 --reference-px "$REF_SMALL" --checkpoint-blocks > "$OUT/plan-small.txt"
plan --size "$LARGE" --references 2 --reference-px "$REF_LARGE" --checkpoint-blocks --split-pair \
    > "$OUT/plan-large-split.txt"
plan --size "$LARGE" --references 2 --reference-px "$REF_LARGE" --checkpoint-blocks > "$OUT/plan-large.txt"
plan --size "$LARGE" --references 2 --reference-px "$REF_LARGE" --checkpoint-blocks --split-pair \
    --activations bf16 > "$OUT/plan-large-split-bf16.txt"
cat "$OUT/plan-small.txt"
measure ours-small 150 env FOCUSDPO_MEMORY_TRACE=1 "${BIN_CMD[@]}" "${FLUX[@]}" --data "$OUT/d-small" --set model.reference_px="$REF_SMALL" --steps 3 \
    --out "$OUT/ours-small-run" --set train.checkpoint_blocks=true

log "3. the same step in diffusers + peft"
measure torch-small 100 "$PYTHON" scripts/reference/diffusers_dpo_step.py $PY_TINY --size "$SMALL" --references 1 \
    --reference-px "$REF_SMALL" --checkpoint --steps 2

log "4. $LARGE px, 2 × $REF_LARGE px references, checkpointing + split pair"
measure ours-large-split 160 env FOCUSDPO_MEMORY_TRACE=1 "${BIN_CMD[@]}" "${FLUX[@]}" --data "$OUT/d-large" --set model.reference_px="$REF_LARGE" \
    --steps 2 --out "$OUT/ours-large-split-run" --set train.checkpoint_blocks=true --set train.split_pair=true

log "4b. the same with bf16 activations (model.activations = bf16)"
measure ours-large-split-bf16 160 env FOCUSDPO_MEMORY_TRACE=1 "${BIN_CMD[@]}" "${FLUX[@]}" --data "$OUT/d-large" \
    --set model.reference_px="$REF_LARGE" --steps 2 --out "$OUT/ours-large-split-bf16-run" \
    --set train.checkpoint_blocks=true --set train.split_pair=true --set model.activations=bf16

log "5. while time is left: $LARGE px in diffusers + peft, ours without the split pair"
measure torch-large 100 "$PYTHON" scripts/reference/diffusers_dpo_step.py $PY_TINY --size "$LARGE" --references 2 \
    --reference-px "$REF_LARGE" --checkpoint --steps 1
measure ours-large 160 env FOCUSDPO_MEMORY_TRACE=1 "${BIN_CMD[@]}" "${FLUX[@]}" --data "$OUT/d-large" --set model.reference_px="$REF_LARGE" --steps 2 \
    --out "$OUT/ours-large-run" --set train.checkpoint_blocks=true

total() { grep -E '^  total' "$OUT/$1" 2> /dev/null | sed -E 's/^ +total +([0-9.]+) GB.*/\1 GB/'; }
row() { # LABEL NAME PLAN STEPS_MS
    echo "| $1 | $(cat "$OUT/$2.status" 2> /dev/null) | $4 | $(cat "$OUT/$2.peak" 2> /dev/null) | $3 |"
}
{
    echo "GPU: $(cat "$OUT/gpu.txt"); binary: $(ours --version); CPU vs $DEV, tiny FocusDPO step: $(tail -1 "$OUT/parity.txt"); $(tail -1 "$OUT/world-one.txt" 2> /dev/null)"
    echo
    echo "| step (bf16 base, LoRA rank 32, checkpointing) | exit | step times (ms) | peak GPU memory (MiB, nvidia-smi) | memory plan |"
    echo "|---|---|---|---|---|"
    row "ours, FocusDPO, $SMALL px + 1 × $REF_SMALL px" ours-small "$(total plan-small.txt)" "$(our_steps ours-small)"
    row "diffusers + peft, DPO, $SMALL px + 1 × $REF_SMALL px" torch-small "–" \
        "median $(ref_field torch-small median_step_ms) (allocator peak $(ref_field torch-small peak_reserved_gb) GB)"
    row "ours, FocusDPO, $LARGE px + 2 × $REF_LARGE px, split pair" ours-large-split "$(total plan-large-split.txt)" \
        "$(our_steps ours-large-split)"
    row "ours, FocusDPO, $LARGE px + 2 × $REF_LARGE px, split pair, bf16 activations" ours-large-split-bf16 \
        "$(total plan-large-split-bf16.txt)" "$(our_steps ours-large-split-bf16)"
    row "diffusers + peft, DPO, $LARGE px + 2 × $REF_LARGE px" torch-large "–" \
        "median $(ref_field torch-large median_step_ms) (allocator peak $(ref_field torch-large peak_reserved_gb) GB)"
    row "ours, FocusDPO, $LARGE px + 2 × $REF_LARGE px" ours-large "$(total plan-large.txt)" "$(our_steps ours-large)"
    echo
    echo "Memory in use at the phases of the last step (FOCUSDPO_MEMORY_TRACE=1; after a synchronisation):"
    for name in ours-small ours-large-split ours-large; do
        last=$(grep -E '^memory: step [0-9]+' "$OUT/$name.txt" 2> /dev/null | tail -1 | sed -E 's/^memory: step ([0-9]+),.*/\1/')
        [ -n "$last" ] || continue
        echo
        echo "$name:"
        grep -E "^memory: step $last," "$OUT/$name.txt" | sed -E 's/^memory: /    /'
    done
    echo
    echo "whole check: $(($(date +%s) - START)) s"
} | tee "$OUT/table.md"
