#!/usr/bin/env python3
"""Cross-check flash-ops against PyTorch on the very same tensors.

Correctness (default): for a handful of cases (GQA, Lq != Lk, causal, windows, ALiBi, softcap,
V1 and V2), writes q, k, v, do to a safetensors file, runs `flash-ops-check` on it, and compares
o, lse, dq, dk, dv with PyTorch in float64: `scaled_dot_product_attention` (with an additive
mask for windows/ALiBi) and autograd; softcap, which SDPA lacks, is written out in torch ops.

Benchmark (--bench): times PyTorch's CPU SDPA (f32, B1 H12 d64, forward and forward+backward)
and flash-ops V2 through `cargo bench -p flash-ops-bench` in the same run, and prints the ratios.

Needs: pip install torch numpy safetensors   (the PyPI torch wheel is the CUDA build; it runs on CPU)
Usage: python3 scripts/crosscheck_torch.py [--bin target/release/flash-ops-check] [--bench] [--n 1024,2048]
"""
import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [
    # (b, sq, sk, hq, hk, d, flags)
    (2, 77, 77, 4, 4, 64, {}),
    (1, 130, 257, 8, 2, 32, {"causal": True}),
    (2, 300, 120, 4, 1, 64, {"causal": True, "algorithm": "v1"}),
    (1, 100, 140, 2, 2, 128, {"window_left": 16, "window_right": 8}),
    (2, 64, 96, 6, 3, 40, {"alibi": True, "causal": True}),
    (1, 90, 90, 4, 2, 64, {"softcap": 5.0, "scale": 0.2}),
    (1, 200, 200, 2, 1, 256, {"alibi": True, "window_left": 50, "algorithm": "v1"}),
]


def reference(q, k, v, do, alibi, f):
    """float64 PyTorch attention + autograd; layouts (b, s, h, d) like flash-attn."""
    q, k, v = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v))
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    g = hq // hk
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kh, vh = kh.repeat_interleave(g, dim=1), vh.repeat_interleave(g, dim=1)
    scale = f.get("scale", 1.0 / math.sqrt(d))
    i = torch.arange(sq, dtype=torch.float64)[:, None]
    j = torch.arange(sk, dtype=torch.float64)[None, :]
    diag = sk - sq  # bottom-right alignment (FlashAttention-2)
    visible = torch.ones(sq, sk, dtype=torch.bool)
    right = 0 if f.get("causal") else f.get("window_right")
    if right is not None:
        visible &= j <= i + diag + right
    if f.get("window_left") is not None:
        visible &= j >= i + diag - f["window_left"]
    bias = torch.zeros(1, hq, sq, sk, dtype=torch.float64)
    if alibi is not None:
        slopes = torch.tensor(alibi, dtype=torch.float64)[None, :, None, None]
        bias = bias - slopes * (i + diag - j).abs()
    bias = bias.masked_fill(~visible, float("-inf"))
    if "softcap" in f:
        c = f["softcap"]
        s = (qh @ kh.transpose(-1, -2)) * scale
        s = c * torch.tanh(s / c) + bias
        lse = torch.logsumexp(s, dim=-1)
        p = torch.softmax(s, dim=-1)
        p = torch.nan_to_num(p, nan=0.0)
        o = p @ vh
    else:
        o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, scale=scale)
        s = (qh @ kh.transpose(-1, -2)) * scale + bias
        lse = torch.logsumexp(s, dim=-1)
        o = torch.nan_to_num(o, nan=0.0)
    o = o.transpose(1, 2)
    o.backward(torch.tensor(do, dtype=torch.float64))
    return {"o": o.detach().numpy(), "lse": lse.detach().numpy(), "dq": q.grad.numpy(),
            "dk": k.grad.numpy(), "dv": v.grad.numpy()}


def rel(a, b):
    fin = np.isfinite(b)
    if not np.array_equal(np.isfinite(a), fin):
        return float("inf")
    a, b = a[fin].astype(np.float64), b[fin].astype(np.float64)
    den = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / den) if den > 0 else float(np.linalg.norm(a))


def ensure_binary(path):
    if not os.path.exists(path):
        subprocess.run(["cargo", "build", "--release", "-p", "flash-ops", "--bin", "flash-ops-check"],
                       cwd=ROOT, check=True)
    return path


def crosscheck(binary):
    rng = np.random.default_rng(0)
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for (b, sq, sk, hq, hk, d, f) in CASES:
            t = {n: rng.standard_normal(s).astype(np.float32) for n, s in
                 [("q", (b, sq, hq, d)), ("k", (b, sk, hk, d)), ("v", (b, sk, hk, d)), ("do", (b, sq, hq, d))]}
            alibi = None
            if f.get("alibi"):
                alibi = (0.5 ** np.arange(1, hq + 1)).astype(np.float32)
                t["alibi_slopes"] = alibi
            inp, out = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.safetensors")
            save_file(t, inp)
            cmd = [binary, "--input", inp, "--output", out, "--algorithm", f.get("algorithm", "v2")]
            if f.get("causal"):
                cmd.append("--causal")
            for key, flag in [("scale", "--scale"), ("window_left", "--window-left"),
                              ("window_right", "--window-right"), ("softcap", "--softcap")]:
                if key in f:
                    cmd += [flag, str(f[key])]
            subprocess.run(cmd, check=True)
            got = load_file(out)
            want = reference(t["q"], t["k"], t["v"], t["do"], alibi, f)
            errs = {n: rel(got[n], want[n]) for n in ["o", "lse", "dq", "dk", "dv"]}
            worst = max(worst, *errs.values())
            print(f"b{b} sq{sq} sk{sk} hq{hq} hk{hk} d{d} {f}: " +
                  " ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    print(f"worst relative error vs PyTorch float64: {worst:.2e}")
    return worst < 1e-5


def bench(ns, reps=3):
    torch.set_num_threads(int(os.environ.get("THREADS", os.cpu_count())))
    h, d = 12, 64
    print(f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads, f32, B1 H{h} d{d}")
    torch_ms = {}
    for n in ns:
        for causal in (False, True):
            q, k, v = (torch.randn(1, h, n, d, requires_grad=True) for _ in range(3))
            do = torch.randn(1, h, n, d)
            def fwd():
                with torch.no_grad():
                    torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
            def fwdbwd():
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
                o.backward(do)
            res = []
            for fn in (fwd, fwdbwd):
                fn()
                ts = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn()
                    ts.append((time.perf_counter() - t0) * 1e3)
                res.append(statistics.median(ts))  # as flash_ops_bench::median
            torch_ms[(n, causal)] = res
            print(f"torch SDPA N={n} causal={causal}: fwd {res[0]:.1f} ms, fwd+bwd {res[1]:.1f} ms")
    cmd = ["cargo", "bench", "-q", "-p", "flash-ops-bench", "--bench", "attention", "--",
           "--n", ",".join(map(str, ns)), "--d", str(d), "--variants", "v2", "--reps", str(reps)]
    text = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    print("| N | causal | torch fwd ms | V2 fwd ms | torch fwd+bwd ms | V2 fwd+bwd ms | V2 speed vs torch fwd+bwd |")
    print("|---|---|---|---|---|---|---|")
    for line in text.splitlines():
        m = re.match(r"\| (\d+) \| \d+ \| (yes|no) \| flash V2 \| ([\d.]+) \| [\d.]+ \| [\d.–]+ \| ([\d.]+) \|", line)
        if m:
            n, causal = int(m.group(1)), m.group(2) == "yes"
            fwd, fb = float(m.group(3)), float(m.group(4))
            tf, tfb = torch_ms[(n, causal)]
            print(f"| {n} | {'yes' if causal else 'no'} | {tf:.1f} | {fwd:.1f} | {tfb:.1f} | {fb:.1f} | {tfb / fb:.2f}× |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "flash-ops-check"))
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--n", default="1024,2048")
    a = ap.parse_args()
    if a.bench:
        bench([int(x) for x in a.n.split(",")])
        return 0
    return 0 if crosscheck(ensure_binary(a.bin)) else 1


if __name__ == "__main__":
    sys.exit(main())
