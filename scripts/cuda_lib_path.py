"""Prints the folders of the CUDA libraries our CUDA build links at run time (cuBLAS, cuRAND, NVRTC, the runtime),
as found in the `nvidia-*` wheels PyTorch installed, joined by ':' for LD_LIBRARY_PATH (empty when there are none).
Used by scripts/gpu-check.sh and scripts/gpu-pretrain.sh on a GPU machine with no CUDA toolkit of its own."""

import glob
import os

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
