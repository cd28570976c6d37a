"""PyTorch SDPA (flash backend) on the FlashAttention-2 paper protocol, for gpu-check.sh.

Prints `BENCH {json}` lines in the format of flash-ops' `bench` test: bf16, batch x seq = 16k
tokens, hidden 2048, forward FLOPs 4*b*h*s^2*d (halved when causal), backward 2.5x forward.
"""
import json
import os

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F


def timed(fn, iters):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main():
    seqs = [int(s) for s in os.environ.get("FLASH_BENCH_SEQS", "512,1024,2048,4096,8192,16384").split(",")]
    for d in (64, 128):
        for causal in (False, True):
            for s in seqs:
                b, h = 16384 // s, 2048 // d
                q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
                g = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
                flops = 4 * b * h * s * s * d / (2 if causal else 1)
                iters = 3 if s >= 8192 else 10
                rec = {"impl": "pytorch sdpa (flash)", "seq": s, "d": d, "causal": causal}
                try:
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        f = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), iters)
                        fb = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(g), iters)
                    rec.update(fwd_ms=f, fwdbwd_ms=fb, fwd_tflops=flops / f / 1e9,
                               bwd_tflops=2.5 * flops / max(fb - f, 1e-6) / 1e9, fwdbwd_tflops=3.5 * flops / fb / 1e9)
                except Exception as e:  # noqa: BLE001 - report, keep going
                    rec["error"] = str(e).splitlines()[0][:80]
                print("BENCH " + json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
