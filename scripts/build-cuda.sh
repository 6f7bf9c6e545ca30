#!/usr/bin/env bash
# Builds the headless focusdpo CLI with the `cuda` feature on a machine without a GPU or a CUDA install, for a GPU
# machine with CUDA 13.0 (driver ≥ 580) and compute capability 9.0 (H100/H200) by default:
#
#   scripts/build-cuda.sh                 # → target/cuda/focusdpo (stripped) and focusdpo.xz (to carry)
#   CUDA_COMPUTE_CAP=80 scripts/build-cuda.sh   # A100
#
# * The CUDA compiler and headers come from the Python registry (nvidia-cuda-nvcc==13.0.* and friends, in a venv
#   under target/cuda-toolkit): candle's kernels are compiled to PTX by that nvcc.
# * candle links cudarc with `dynamic-linking`: the binary needs libcuda.so.1 (the driver), libcublas.so.13,
#   libcublasLt.so.13, libcurand.so.10 and libnvrtc.so.13 at run time. To link here, without those libraries,
#   stub libraries with the same sonames are generated from cudarc's own bindings (every function it may call,
#   as an empty symbol); the real ones are found at run time on the GPU machine (the driver's libcuda, and e.g.
#   PyTorch's nvidia-* wheels: scripts/gpu-check.sh sets LD_LIBRARY_PATH to them).
# * The build is headless (--no-default-features): no eframe/wgpu, a small binary to carry.
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_MAJOR_MINOR=13.0
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
TOOLKIT="$PWD/target/cuda-toolkit"
ROOT="$PWD/target/cuda-root"
OUT="$PWD/target/cuda"

echo "== CUDA ${CUDA_MAJOR_MINOR} compiler and headers (pip) into ${TOOLKIT}"
if [ ! -x "$TOOLKIT/bin/python" ]; then
    python3 -m venv "$TOOLKIT"
fi
"$TOOLKIT/bin/pip" install -q --disable-pip-version-check \
    "nvidia-cuda-nvcc==${CUDA_MAJOR_MINOR}.*" "nvidia-cuda-runtime==${CUDA_MAJOR_MINOR}.*" \
    "nvidia-cuda-crt==${CUDA_MAJOR_MINOR}.*" "nvidia-cuda-cccl==${CUDA_MAJOR_MINOR}.*" \
    "nvidia-nvvm==${CUDA_MAJOR_MINOR}.*"
CU="$("$TOOLKIT/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
"$CU/bin/nvcc" --version | tail -2

echo "== a toolkit root: the pip layout plus link stubs (${ROOT})"
rm -rf "$ROOT"
mkdir -p "$ROOT/lib64"
for d in bin include nvvm; do ln -s "$CU/$d" "$ROOT/$d"; done
ln -s "$CU/lib/libcudart.so.13" "$ROOT/lib64/libcudart.so"
cargo fetch --locked -q
CUDARC="$(cargo metadata --locked --format-version 1 --features cuda --no-default-features 2>/dev/null |
    python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc").rsplit("/",1)[0])')"
stub() { # stub LIB SONAME SYS_MODULE
    local src="$ROOT/lib64/$1.c"
    grep -ohE '^\s+fn [A-Za-z_0-9]+\(' "$CUDARC/src/$3/sys/mod.rs" | sed -E 's/^\s+fn ([A-Za-z_0-9]+)\(/\1/' | sort -u |
        sed 's/.*/void &(void) {}/' > "$src"
    cc -shared -fPIC -Wl,-soname,"$2" -o "$ROOT/lib64/lib$1.so" "$src"
    echo "   lib$1.so ($2): $(wc -l < "$src") symbols"
}
stub cuda libcuda.so.1 driver
stub nvrtc libnvrtc.so.13 nvrtc
stub curand libcurand.so.10 curand
stub cublas libcublas.so.13 cublas
stub cublasLt libcublasLt.so.13 cublaslt
# NCCL for data-parallel training between GPUs (the `nccl` feature); at run time PyTorch's nvidia-nccl wheel or
# the cluster's NCCL provides libnccl.so.2.
stub nccl libnccl.so.2 nccl

FEATURES="${FEATURES:-nccl}"
echo "== cargo build --release --no-default-features --features $FEATURES (sm_${CUDA_COMPUTE_CAP})"
export CUDA_ROOT="$ROOT" CUDA_HOME="$ROOT" CUDA_PATH="$ROOT" NVCC="$ROOT/bin/nvcc" PATH="$ROOT/bin:$PATH"
export CUDARC_CUDA_VERSION=13000
start=$(date +%s)
cargo build --locked --release --no-default-features --features "$FEATURES" --bin focusdpo --target-dir target/cuda-build
mkdir -p "$OUT"
cp target/cuda-build/release/focusdpo "$OUT/focusdpo"
strip "$OUT/focusdpo"
# Most of the binary is candle-kernels' quantized-matmul fatbin (unused here, always built): carry the xz.
xz -T0 -9 -c "$OUT/focusdpo" > "$OUT/focusdpo.xz"
echo "== $OUT/focusdpo: $(du -h "$OUT/focusdpo" | cut -f1) ($OUT/focusdpo.xz $(du -h "$OUT/focusdpo.xz" | cut -f1) to carry), built in $(( $(date +%s) - start )) s"
echo "   needs at run time: $(readelf -d "$OUT/focusdpo" | grep NEEDED | sed -E 's/.*\[(.*)\]/\1/' | tr '\n' ' ')"
