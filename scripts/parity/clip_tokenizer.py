"""Parity fixture of CLIP's tokenizer built from `vocab.json` + `merges.txt`, the form FLUX.1-dev's `tokenizer/`
folder ships (it has no `tokenizer.json`), against transformers' own `CLIPTokenizer` loaded from the same two files.

Learns a tiny byte-level BPE vocabulary in CLIP's layout (the 256 byte symbols, the same with the `</w>`
end-of-word suffix, the learned merges, then `<|startoftext|>` and `<|endoftext|>`) from a small corpus, writes it to
tests/data/parity/clip_bpe/{vocab.json,merges.txt}, and the ids `CLIPTokenizer` gives a set of awkward prompts (case,
runs of spaces, punctuation, digits, accents, apostrophes, emoji, special tokens typed in the text, and one longer
than CLIP's 77 tokens), padded and truncated to 77 as FLUX's `HFEmbedder` asks for them, to
tests/data/parity/clip_bpe/ids.json. `cargo test --test parity` tokenizes the same prompts with our tokenizer built
from the two files and compares the ids exactly.

Regenerate (any machine):
    .venv-parity/bin/python scripts/parity/clip_tokenizer.py
"""

import collections
import json
import pathlib

import transformers
from transformers import CLIPTokenizer

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests/data/parity/clip_bpe"
MERGES = 120
CORPUS = """a photo of a red cat sitting on the green grass next to a blue dog and a wooden table
the cat and the dog are playing with a ball in the garden while the sun is shining
a portrait of a woman wearing a hat standing in front of a painted wall with flowers
two toys on a shelf, a robot and a teddy bear, photographed in the studio with soft light"""
PROMPTS = [
    "A photo of a red cat",
    "a DOG's toy,   on the\ttable!!",
    "two  cats  and 123 dogs... (maybe 4?)",
    "café naïve façade — déjà vu",
    "it's the robot's hat, isn't it? we'll see; they've gone",
    "a 🐱 next to a 🐶 ✨",
    "<|startoftext|>already wrapped<|endoftext|>",
    "",
    " ".join(["the cat and the dog are playing with a ball in the garden"] * 6),
]


def bytes_to_unicode():
    """GPT-2's / CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def learn_merges(corpus, count):
    """Plain BPE over the corpus words (CLIP's form: byte symbols, the last one with `</w>`)."""
    b2u = bytes_to_unicode()
    words = collections.Counter(corpus.lower().split())
    seqs = {}
    for w, n in words.items():
        sym = [b2u[b] for b in w.encode("utf-8")]
        sym[-1] += "</w>"
        seqs[tuple(sym)] = n
    merges = []
    for _ in range(count):
        pairs = collections.Counter()
        for s, n in seqs.items():
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])
        merges.append(best)
        new = {}
        for s, n in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            new[tuple(out)] = n
        seqs = new
    return merges


def main():
    b2u = bytes_to_unicode()
    merges = learn_merges(CORPUS, MERGES)
    tokens = list(b2u.values()) + [c + "</w>" for c in b2u.values()] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    tok = CLIPTokenizer(vocab=str(OUT / "vocab.json"), merges=str(OUT / "merges.txt"))
    ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    unpadded = [tok(p).input_ids for p in PROMPTS]
    (OUT / "ids.json").write_text(
        json.dumps(
            {
                "generator": "scripts/parity/clip_tokenizer.py",
                "transformers": transformers.__version__,
                "prompts": PROMPTS,
                "ids_77": ids,
                "ids": unpadded,
            },
            ensure_ascii=False,
        )
    )
    print(f"wrote {OUT} ({len(vocab)} tokens, {len(merges)} merges); first ids: {unpadded[0]}")


if __name__ == "__main__":
    main()
