#!/usr/bin/env python3
"""Cross-checks a `train bert-classify` run with Hugging Face transformers: loads OUT/best with
BertForSequenceClassification.from_pretrained (no missing or unexpected weights allowed),
encodes the run's --validation JSONL the way `train` does ([CLS] text [SEP], at most max_len
tokens, padded with an attention mask), and compares the validation loss and accuracy with
the ones `train` recorded in OUT/best/best.json. Needs torch, transformers and tokenizers.

Usage: python3 crates/train/scripts/check_classifier.py OUT VALIDATION.jsonl
"""
import json
import sys

import torch
from tokenizers import Tokenizer
from transformers import BertForSequenceClassification


def main():
    out, val_path = sys.argv[1], sys.argv[2]
    run = json.load(open(f"{out}/run.json"))
    best = json.load(open(f"{out}/best/best.json"))
    model, info = BertForSequenceClassification.from_pretrained(
        f"{out}/best", output_loading_info=True
    )
    if info["missing_keys"] or info["unexpected_keys"]:
        sys.exit(f"transformers does not load every weight: {info}")
    model.eval()
    tok = Tokenizer.from_file(f"{out}/best/tokenizer.json")
    tok.no_truncation()
    tok.no_padding()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    label2id = model.config.label2id
    rows = [json.loads(line) for line in open(val_path) if line.strip()]
    max_len = run["max_len"]
    ids = [
        [cls] + tok.encode(r["text"], add_special_tokens=False).ids[: max_len - 2] + [sep]
        for r in rows
    ]
    labels = torch.tensor([label2id[str(r["label"])] for r in rows])
    t = max(len(x) for x in ids)
    input_ids = torch.tensor([x + [0] * (t - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (t - len(x)) for x in ids])
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    acc = (logits.argmax(-1) == labels).float().mean().item()
    want = best["scores"]
    print(
        f"transformers: loss {loss:.6f} accuracy {acc:.4f} | train: loss {want['loss']:.6f} "
        f"accuracy {want['accuracy']:.4f} (step {best['step']})"
    )
    if abs(loss - want["loss"]) > 1e-4 * max(1.0, abs(loss)) or abs(acc - want["accuracy"]) * len(rows) > 0.5:
        sys.exit("MISMATCH")
    print("OK")


if __name__ == "__main__":
    main()
