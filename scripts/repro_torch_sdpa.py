#!/usr/bin/env python3
"""PyTorch scaled_dot_product_attention timings for `repro run --torch PYTHON` (Table 2).

Reads a JSON list of workloads {batch, heads, n, d, causal, reps, device, dtype} on stdin and
prints a JSON list of {fwd_ms, fwd_bwd_ms} (median of reps after one warm-up; the same protocol as
flash_ops_bench::measure: forward without grad, forward+backward of sum(o * do)). On CUDA the
flash backend is forced (the FlashAttention-2 kernels PyTorch ships), on the CPU torch chooses.
Needs torch. Not run by CI.
"""
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F


DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def timed(fn, reps, device):
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    fn()
    ts = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)  # the same median as flash_ops_bench::median


def main():
    torch.manual_seed(0)
    out = []
    backend = f"{torch.get_num_threads()} threads"
    for w in json.load(sys.stdin):
        device, dtype = w.get("device", "cpu"), DTYPES[w.get("dtype", "f32")]
        # Our layout is (batch, seq, heads, d); SDPA takes (batch, heads, seq, d).
        shape = (w["batch"], w["heads"], w["n"], w["d"])
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        do = torch.randn(shape, device=device, dtype=dtype)
        c = w["causal"]
        if device == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            ctx = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)  # noqa: E731
            backend = f"flash backend, {torch.cuda.get_device_name()}"
        else:
            import contextlib

            ctx = contextlib.nullcontext

        def fwd():
            with torch.no_grad(), ctx():
                F.scaled_dot_product_attention(q, k, v, is_causal=c)

        def fwd_bwd():
            with ctx():
                o = F.scaled_dot_product_attention(q, k, v, is_causal=c)
            q.grad = k.grad = v.grad = None
            (o * do).sum().backward()

        out.append({"fwd_ms": timed(fwd, w["reps"], device), "fwd_bwd_ms": timed(fwd_bwd, w["reps"], device)})
        print(f"  torch SDPA {w}: {out[-1]}", file=sys.stderr)
    json.dump({"torch": torch.__version__, "backend": backend, "rows": out}, sys.stdout)


if __name__ == "__main__":
    main()
