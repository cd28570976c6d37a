#!/usr/bin/env python3
"""Loads the checkpoints written by `cargo run -p flash-ops-models --example export_hf -- DIR`
with Hugging Face transformers (GPT2LMHeadModel, BertForMaskedLM) and compares their logits with
ours. Needs torch and transformers.

Usage: python3 scripts/check_hf_export.py DIR
"""
import json
import sys

import numpy as np
import torch
from transformers import BertForMaskedLM, GPT2LMHeadModel


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else "/tmp/hf-export"
    exp = json.load(open(f"{d}/expected.json"))
    ok = True
    # output_loading_info: missing/unexpected keys as transformers sees them.
    g, info = GPT2LMHeadModel.from_pretrained(f"{d}/gpt2", output_loading_info=True)
    g.eval()
    with torch.no_grad():
        out = g(torch.tensor(exp["gpt2"]["input_ids"])).logits.numpy()
    e = rel(out, np.array(exp["gpt2"]["logits"]))
    print(f"GPT2LMHeadModel: loading info {info}; logits rel err {e:.2e}")
    ok &= e < 1e-5 and not info["missing_keys"] and not info["unexpected_keys"]
    b, info = BertForMaskedLM.from_pretrained(f"{d}/bert", output_loading_info=True)
    b.eval()
    ids = torch.tensor(exp["bert"]["input_ids"])
    lengths = exp["bert"]["lengths"]
    mask = torch.tensor([[1 if j < l else 0 for j in range(ids.shape[1])] for l in lengths])
    with torch.no_grad():
        out = b(ids, attention_mask=mask).logits.numpy()
    e = rel(out, np.array(exp["bert"]["logits"]))
    print(f"BertForMaskedLM: loading info {info}; logits rel err {e:.2e}")
    ok &= e < 1e-5 and not info["missing_keys"] and not info["unexpected_keys"]
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
