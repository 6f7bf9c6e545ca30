"""Regenerates tests/data/skimage_entropy.json: reference outputs of skimage.filters.rank.entropy (square
footprints, uint8) that tests/entropy_vs_skimage.rs compares Eq. 7 against.

Usage: pip install scikit-image && python3 scripts/skimage_entropy_fixture.py
"""
import json

import numpy as np
import skimage
from skimage.filters.rank import entropy

rng = np.random.default_rng(0)
cases = []
for h, w, levels, step in [(10, 13, 12, 20), (7, 5, 256, 1), (16, 16, 4, 60)]:
    img = (rng.integers(0, levels, size=(h, w)) * step).astype(np.uint8)
    for win in (1, 3, 5, 9):
        out = entropy(img, np.ones((win, win), dtype=np.uint8))
        cases.append({"height": h, "width": w, "window": win, "pixels": img.ravel().tolist(),
                      "entropy_bits": [float(v) for v in out.ravel()]})
with open("tests/data/skimage_entropy.json", "w") as f:
    json.dump({"skimage_version": skimage.__version__, "cases": cases}, f)
print(f"{len(cases)} cases written")
