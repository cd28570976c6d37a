#!/usr/bin/env python3
"""PyTorch CPU scaled_dot_product_attention timings for `repro run --torch PYTHON` (Table 2).

Reads a JSON list of workloads {batch, heads, n, d, causal, reps} on stdin and prints a JSON list
of {fwd_ms, fwd_bwd_ms} (median of reps after one warm-up; f32; the same protocol as
flash_ops::bench::measure: forward without grad, forward+backward of sum(o * do)).
Needs torch (the PyPI wheel runs on CPU). Not run by CI.
"""
import json
import sys
import time

import torch
import torch.nn.functional as F


def timed(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)[len(ts) // 2]  # the same median as flash_ops::bench


def main():
    torch.manual_seed(0)
    out = []
    for w in json.load(sys.stdin):
        shape = (w["batch"], w["heads"], w["n"], w["d"])
        q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
        do = torch.randn(shape)
        c = w["causal"]

        def fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=c)

        def fwd_bwd():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=c)
            q.grad = k.grad = v.grad = None
            (o * do).sum().backward()

        out.append({"fwd_ms": timed(fwd, w["reps"]), "fwd_bwd_ms": timed(fwd_bwd, w["reps"])})
        print(f"  torch SDPA {w}: {out[-1]}", file=sys.stderr)
    json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": out}, sys.stdout)


if __name__ == "__main__":
    main()
