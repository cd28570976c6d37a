#!/usr/bin/env python3
"""Cross-check flash-ops against PyTorch on the very same tensors.

Correctness (default): for a handful of cases (GQA, Lq != Lk, causal, windows, ALiBi, softcap,
V1 and V2), writes q, k, v, do to a safetensors file, runs `flash-ops-check` on it, and compares
o, lse, dq, dk, dv with PyTorch in float64: `scaled_dot_product_attention` (with an additive
mask for windows/ALiBi) and autograd; softcap, which SDPA lacks, is written out in torch ops.

Benchmark (--bench): issue 16's grid in one run. Times PyTorch's CPU SDPA (forward, backward,
forward+backward; B1 H12; N, d, causal, f32 and bf16), torch.matmul's 2048³ ceiling and PyTorch
decoding steps (one query row, B1, 32 query heads, d 128, 32 or 8 k/v heads), then flash-ops V2
through `cargo bench -p flash-ops-bench --bench attention` (its candle-matmul ceiling and memory
read bandwidth measured there); prints one markdown table (GFLOP/s, % of each side's ceiling,
the ratio to torch) and the decode table (time against K+V bytes at the read bandwidth).

Needs: pip install torch numpy safetensors   (the PyPI torch wheel is the CUDA build; it runs on CPU)
Usage: python3 scripts/crosscheck_torch.py [--bin target/release/flash-ops-check]
       python3 scripts/crosscheck_torch.py --bench [--n 512,...,8192] [--d 64,128] [--causal both]
           [--dtypes f32,bf16] [--decode 1024,...,32768] [--decode-kv-heads 32,8] [--reps 3]
           [--cargo-config KEY=VALUE]... [--md FILE] [--json FILE]
"""
import argparse
import json
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


TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
BWD_PER_FWD = 2.5  # flash_ops_bench::BWD_PER_FWD_FLOPS: the FlashAttention-2 paper's count
DECODE_HQ, DECODE_D = 32, 128


def median_ms(fn, reps):
    """Median wall time of `reps` calls after one warm-up (as flash_ops_bench::measure)."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def torch_gemm_ceiling(reps, n=2048):
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / median_ms(lambda: torch.matmul(a, b), reps) / 1e6


def torch_attention(dtype, d, causal, n, h, reps):
    """PyTorch SDPA (B1, h heads, (b, h, n, d) layout) forward and forward+backward, ms."""
    t = TORCH_DTYPES[dtype]
    q, k, v = (torch.randn(1, h, n, d, dtype=t, requires_grad=True) for _ in range(3))
    do = torch.randn(1, h, n, d, dtype=t)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fwd():
        with torch.no_grad():
            sdpa(q, k, v, is_causal=causal)

    def fwdbwd():
        sdpa(q, k, v, is_causal=causal).backward(do)

    return median_ms(fwd, reps), median_ms(fwdbwd, reps)


def torch_decode(dtype, sk, hk, reps):
    """One PyTorch SDPA decoding step: one query row, 32 query heads, d 128, hk k/v heads."""
    t = TORCH_DTYPES[dtype]
    q = torch.randn(1, DECODE_HQ, 1, DECODE_D, dtype=t)
    k, v = (torch.randn(1, hk, sk, DECODE_D, dtype=t) for _ in range(2))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def step():
        with torch.no_grad():
            sdpa(q, k, v, enable_gqa=hk != DECODE_HQ)

    return median_ms(step, reps)


def fmt(x, spec=".1f"):
    return "–" if x is None else format(x, spec)


def bench(a):
    """The issue's grid in one run: PyTorch first, then `cargo bench` (not concurrently)."""
    torch.set_num_threads(int(os.environ.get("THREADS", os.cpu_count())))
    ns, ds = [int(x) for x in a.n.split(",")], [int(x) for x in a.d.split(",")]
    dtypes, reps = a.dtypes.split(","), a.reps
    causals = {"no": [False], "yes": [True], "both": [False, True]}[a.causal]
    decode_sk = [int(x) for x in a.decode.split(",")] if a.decode else []
    decode_hk = [int(x) for x in a.decode_kv_heads.split(",")]
    h = a.heads
    torch_ceiling = torch_gemm_ceiling(reps)
    grid = [(t, d, c, n) for t in dtypes for d in ds for c in causals for n in ns]
    torch_ms = {key: torch_attention(*key, h, reps) for key in grid}
    torch_dec = {(t, hk, sk): torch_decode(t, sk, hk, reps)
                 for t in dtypes for hk in decode_hk for sk in decode_sk}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = ["cargo", "bench", "-q", "-p", "flash-ops-bench", "--bench", "attention"]
        for c in a.cargo_config:
            cmd += ["--config", c]
        cmd += ["--", "--n", a.n, "--d", a.d, "--causal", a.causal, "--dtype", a.dtypes,
                "--variants", "v2", "--reps", str(reps), "--heads", str(h), "--json", out]
        if decode_sk:
            cmd += ["--decode", a.decode, "--decode-kv-heads", a.decode_kv_heads]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            ours = json.load(f)
    m = ours["machine"]
    ceiling = m["gemm_ceiling_gflops"]
    lines = [
        f"# flash-ops V2 vs PyTorch SDPA on CPU: B1 H{h}, {m['threads']} threads, median of {reps}",
        "",
        f"- CPU: {m['cpu']}; flash-ops: gemm micro-kernels {m['gemm_path']}, fused kernels "
        f"{m['kernel_path']}; PyTorch {torch.__version__}, ISA {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads",
        f"- GEMM ceiling (f32 {m['gemm_ceiling_n']}³): candle matmul {ceiling:.1f} GFLOP/s, "
        f"torch.matmul {torch_ceiling:.1f} GFLOP/s; each side's % below is of its own ceiling",
        f"- FLOPs: 4·N²·d·H forward (half when causal), backward {BWD_PER_FWD}× forward",
        f"- measured in the cargo bench run (best of 200 short runs): clock {fmt(m['clock_ghz'], '.2f')} GHz, one core's "
        f"f32 FMA peak {fmt(m['core_fma_peak_gflops'])} GFLOP/s",
    ]
    if decode_sk:
        lines.append(f"- memory read bandwidth (parallel read of 256 MiB, in the cargo bench run): "
                     f"{m['read_gbps']:.1f} GB/s")
    lines += ["", "| dtype | d | causal | N | V2 fwd ms | GFLOP/s | % ceil | torch fwd ms | GFLOP/s | % ceil "
              "| V2 bwd ms | GFLOP/s | torch bwd ms | GFLOP/s | V2 fwd+bwd ms | GFLOP/s | % ceil "
              "| torch fwd+bwd ms | GFLOP/s | % ceil | fwd+bwd torch/V2 |",
              "|" + "---|" * 21]
    rows = []
    for r in ours["rows"]:
        key = (r["dtype"], r["d"], r["causal"], r["n"])
        if key not in torch_ms:
            continue
        f = r["fwd_flops"]
        g = lambda flops, ms: flops / ms / 1e6 if ms else None
        tf, tfb = torch_ms[key]
        vf, vfb = r["fwd_ms"], r["fwd_bwd_ms"]
        row = {"dtype": r["dtype"], "d": r["d"], "causal": r["causal"], "n": r["n"], "heads": h,
               "v2_fwd_ms": vf, "v2_bwd_ms": vfb - vf, "v2_fwd_bwd_ms": vfb,
               "torch_fwd_ms": tf, "torch_bwd_ms": tfb - tf, "torch_fwd_bwd_ms": tfb}
        row.update({
            "v2_fwd_gflops": g(f, vf), "v2_bwd_gflops": g(BWD_PER_FWD * f, vfb - vf),
            "v2_fwd_bwd_gflops": g((1 + BWD_PER_FWD) * f, vfb),
            "torch_fwd_gflops": g(f, tf), "torch_bwd_gflops": g(BWD_PER_FWD * f, tfb - tf),
            "torch_fwd_bwd_gflops": g((1 + BWD_PER_FWD) * f, tfb),
            "speedup_fwd_bwd": tfb / vfb,
        })
        rows.append(row)
        pc = lambda x, c: fmt(100 * x / c, ".0f") + "%"
        lines.append(
            f"| {r['dtype']} | {r['d']} | {'yes' if r['causal'] else 'no'} | {r['n']} "
            f"| {vf:.1f} | {row['v2_fwd_gflops']:.1f} | {pc(row['v2_fwd_gflops'], ceiling)} "
            f"| {tf:.1f} | {row['torch_fwd_gflops']:.1f} | {pc(row['torch_fwd_gflops'], torch_ceiling)} "
            f"| {vfb - vf:.1f} | {fmt(row['v2_bwd_gflops'])} | {tfb - tf:.1f} | {fmt(row['torch_bwd_gflops'])} "
            f"| {vfb:.1f} | {row['v2_fwd_bwd_gflops']:.1f} | {pc(row['v2_fwd_bwd_gflops'], ceiling)} "
            f"| {tfb:.1f} | {row['torch_fwd_bwd_gflops']:.1f} | {pc(row['torch_fwd_bwd_gflops'], torch_ceiling)} "
            f"| {row['speedup_fwd_bwd']:.2f}× |")
    decode = []
    if decode_sk:
        lines += ["", f"## Decoding: one query row, B1, {DECODE_HQ} query heads, d {DECODE_D}, forward", "",
                  "| dtype | kv heads | sk | K+V MB | read-bandwidth time ms | V2 ms | GB/s | × bw time "
                  "| torch ms | GB/s | × bw time | torch/V2 |", "|" + "---|" * 12]
        for r in ours["decode"]:
            tms = torch_dec[(r["dtype"], r["heads_k"], r["sk"])]
            mb, roof = r["kv_bytes"] / 1e6, r["roof_ms"]
            decode.append(dict(r, torch_ms=tms))
            lines.append(
                f"| {r['dtype']} | {r['heads_k']} | {r['sk']} | {mb:.1f} | {roof:.3f} | {r['ms']:.3f} "
                f"| {mb / r['ms']:.1f} | {r['ms'] / roof:.2f} | {tms:.3f} | {mb / tms:.1f} | {tms / roof:.2f} "
                f"| {tms / r['ms']:.2f}× |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    result = {"machine": dict(m, torch=torch.__version__, torch_isa=torch.backends.cpu.get_cpu_capability(),
                              torch_threads=torch.get_num_threads(), torch_gemm_ceiling_gflops=torch_ceiling),
              "rows": rows, "decode": decode}
    for path, body in [(a.md, text), (a.json, json.dumps(result, indent=1) + "\n")]:
        if path:
            with open(path, "w") as f:
                f.write(body)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "flash-ops-check"))
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--n", default="512,1024,2048,4096,8192")
    ap.add_argument("--d", default="64,128")
    ap.add_argument("--causal", default="both", choices=["no", "yes", "both"])
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--decode", default="1024,2048,4096,8192,16384,32768",
                    help="decode rows' key counts; empty for none")
    ap.add_argument("--decode-kv-heads", default="32,8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cargo-config", action="append", default=[],
                    help="passed to cargo bench as --config (repeatable)")
    ap.add_argument("--md", help="also write the markdown here")
    ap.add_argument("--json", help="also write the JSON here")
    a = ap.parse_args()
    if a.bench:
        bench(a)
        return 0
    return 0 if crosscheck(ensure_binary(a.bin)) else 1


if __name__ == "__main__":
    sys.exit(main())
