#!/usr/bin/env bash
# The GPU check (≤ 8 min) for a GPU machine with no Rust and no network: carry the repository with the binary
# built by scripts/build-cuda.sh (target/cuda/focusdpo) and run
#
#   bash scripts/gpu-check.sh [OUT_DIR]
#
# 1. CPU-vs-CUDA parity: one FocusDPO step of the tiny default (bundled base and data), dumped on each device; the
#    loss, predictions and the fused mask are compared (python3 with torch + safetensors, as the machine has).
# 2. One FocusDPO step at FLUX.1-dev size: random weights of FLUX.1-dev's transformer (random-flux-dev:0, bf16,
#    12 B parameters), block checkpointing, LoRA rank 32, a 512 px item with one 512 px reference; its step time
#    and the peak GPU memory (nvidia-smi, sampled every 100 ms) as one table, beside the memory plan.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-out/gpu-check}}"
mkdir -p "$OUT"
BIN="${FOCUSDPO_BIN:-target/cuda/focusdpo}"
if [ ! -x "$BIN" ] && [ -f "$BIN.xz" ]; then
    # The carried form: xz, unpacked with Python's lzma (no xz tool needed).
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$BIN.xz" "$BIN"
    chmod +x "$BIN"
fi
[ -x "$BIN" ] || { echo "no $BIN(.xz): build it with scripts/build-cuda.sh and carry it" >&2; exit 1; }

# The CUDA libraries the binary links (cuBLAS, cuRAND, NVRTC) from the Python wheels PyTorch installed.
LIBS="$(python3 - <<'EOF'
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
dirs = set()
for root in roots:
    for lib in glob.glob(os.path.join(root, "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(lib))
print(":".join(sorted(dirs)))
EOF
)"
export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
"$BIN" --version

echo "== 1. CPU vs CUDA: one FocusDPO step of the tiny default"
for dev in cpu cuda; do
    rm -rf "$OUT/parity-$dev"
    /usr/bin/time -f "$dev: %e s" "$BIN" train --steps 1 --set model.device=$dev --set log.checkpoint_every=0 \
        --dump-step 1 "$OUT/parity-$dev.safetensors" --out "$OUT/parity-$dev" --plain 2>&1 | tail -2
done
python3 - "$OUT" <<'EOF' | tee "$OUT/parity.txt"
import sys
from safetensors.torch import load_file
out = sys.argv[1]
cpu, gpu = load_file(f"{out}/parity-cpu.safetensors"), load_file(f"{out}/parity-cuda.safetensors")
worst = 0.0
for k in sorted(cpu):
    a, b = cpu[k].double(), gpu[k].double()
    err = ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
    worst = max(worst, err)
    print(f"{k:12s} max relative error {err:.2e}")
print(f"worst {worst:.2e}: {'ok' if worst < 1e-3 else 'DIFFERS'}")
EOF

echo "== 2. one FocusDPO step at FLUX.1-dev size (bf16, checkpointing, 1 reference, 512 px)"
rm -rf "$OUT/d512" "$OUT/flux-run"
"$BIN" dip synth --out "$OUT/d512" --items 1 --subjects 1 --size 512 > /dev/null
"$BIN" plan --base random-flux-dev:0 --dtype bf16 --size 512 --references 1 --reference-px 512 --checkpoint-blocks \
    --rank 32 --device cuda | tee "$OUT/plan.txt"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/memory.csv" &
SMI=$!
start=$(date +%s)
set +e
timeout 420 "$BIN" train --base random-flux-dev:0 --data "$OUT/d512" --steps 2 --set model.device=cuda \
    --set model.dtype=bf16 --set train.checkpoint_blocks=true --set model.reference_px=512 \
    --set lora.rank=32 --set lora.alpha=32 --set log.checkpoint_every=0 --out "$OUT/flux-run" --plain \
    2>&1 | tee "$OUT/flux-step.txt"
status=${PIPESTATUS[0]}
set -e
kill "$SMI" 2>/dev/null || true
peak=$(sort -n "$OUT/memory.csv" | tail -1)
steps=$(grep -E '^step ' "$OUT/flux-step.txt" | sed -E 's/.* ([0-9]+) ms$/\1/' | tr '\n' ' ')
{
    echo "| check | result |"
    echo "|---|---|"
    echo "| GPU | $(cat "$OUT/gpu.txt") |"
    echo "| CPU vs CUDA, tiny FocusDPO step | $(tail -1 "$OUT/parity.txt") |"
    echo "| FLUX.1-dev-size FocusDPO step (bf16, checkpointing, rank 32, 512 px + 1 × 512 px reference) | exit $status; step times ${steps:-none} ms |"
    echo "| peak GPU memory during the step | ${peak:-?} MiB |"
    echo "| memory plan | $(grep -E '^  total' "$OUT/plan.txt" | sed -E 's/ +/ /g') |"
    echo "| wall time of the FLUX step command | $(( $(date +%s) - start )) s |"
} | tee "$OUT/table.md"
