"""PyTorch eager baseline for `train bench --torch`: the GPT-2 that `train gpt2` trains, step for step.

Same architecture as flash_ops_models::Gpt2: learned positions, pre-LN blocks (LayerNorm eps 1e-5),
fused qkv projection, causal `F.scaled_dot_product_attention`, GELU tanh MLP of width 4·C, final
LayerNorm, LM head tied to the token embedding, no dropout (llm.c's recipe, as `train` uses).
Same initialisation rule: N(0, 0.02), residual projections (`c_proj`) N(0, 0.02/sqrt(2·layers)),
zero biases, unit LayerNorm gains. Same step as `train`'s loop: mean next-token cross-entropy,
backward, global-norm clipping to --grad-clip (1.0), torch.optim.AdamW (betas 0.9/0.95, eps 1e-8,
weight decay 0.1 on matrices only, not on wte/wpe/norms/biases: `optim::decays`), learning rate
with linear warmup then cosine decay to --min-lr-ratio of the peak (`optim::lr_at`).
`torch.set_num_threads(--threads)`.

Tokens: `--tokens FILE` (raw little-endian u32, e.g. the embedded corpus that `train bench`
writes), else uniform random ids from --seed. Timing does not depend on the values.

Standalone: prints one JSON object per step (`{"step", "step_s", "loss", "user_s", "sys_s",
"peak_rss_bytes"}`) and a summary (`tokens_per_s` from the median step). With `--serve` it prints
`{"ready": ..., "params": N}` and then runs one step per `step` line read on stdin, answering
with that step's JSON line, until `quit` or end of input: how `train bench` interleaves it with
its own steps in one run.
"""
import argparse
import json
import math
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, c, n_head, eps):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(c, eps=eps)
        self.c_attn = nn.Linear(c, 3 * c)
        self.c_proj = nn.Linear(c, c)
        self.ln_2 = nn.LayerNorm(c, eps=eps)
        self.c_fc = nn.Linear(c, 4 * c)
        self.mlp_proj = nn.Linear(4 * c, c)

    def forward(self, x):
        b, t, c = x.shape
        h, d = self.n_head, c // self.n_head
        q, k, v = self.c_attn(self.ln_1(x)).view(b, t, 3, h, d).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class Gpt2(nn.Module):
    def __init__(self, vocab, positions, c, n_layer, n_head, eps=1e-5):
        super().__init__()
        self.wte = nn.Embedding(vocab, c)
        self.wpe = nn.Embedding(positions, c)
        self.h = nn.ModuleList(Block(c, n_head, eps) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(c, eps=eps)
        proj_std = 0.02 / math.sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() < 2:
                nn.init.ones_(p)
            else:
                residual = name.endswith("c_proj.weight") or name.endswith("mlp_proj.weight")
                nn.init.normal_(p, 0.0, proj_std if residual else 0.02)

    def loss(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def lr_at(step, peak, warmup, total, min_ratio):
    """`optim::lr_at`: linear warmup to `peak`, cosine to `peak * min_ratio` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    low = peak * min_ratio
    if step >= total:
        return low
    progress = (step - warmup) / max(total - warmup, 1)
    return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * progress))


def peak_rss_reset():
    """Resets VmHWM to the current RSS (Linux), as `train bench` does for itself."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


class Trainer:
    def __init__(self, a):
        torch.manual_seed(a.seed)
        self.a = a
        self.model = Gpt2(a.vocab, a.n_positions, a.n_embd, a.n_layer, a.n_head)
        decay, rest = [], []
        for name, p in self.model.named_parameters():
            (decay if p.dim() >= 2 and not name.startswith(("wte", "wpe")) else rest).append(p)
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": a.weight_decay}, {"params": rest, "weight_decay": 0.0}],
            lr=a.lr, betas=(a.beta1, a.beta2), eps=a.eps,
        )
        self.params = sum(p.numel() for p in self.model.parameters())
        if a.tokens:
            with open(a.tokens, "rb") as f:
                data = torch.frombuffer(bytearray(f.read()), dtype=torch.int32).to(torch.int64)
        else:
            g = torch.Generator().manual_seed(a.seed)
            data = torch.randint(0, a.vocab, (1 << 20,), generator=g)
        need = a.batch * (a.seq + 1)
        if data.numel() < need:
            sys.exit(f"--tokens has {data.numel()} tokens, a batch needs {need}")
        self.data, self.cursor, self.step_no = data, 0, 0

    def batch(self):
        a, n = self.a, self.a.batch * (self.a.seq + 1)
        if self.cursor + n > self.data.numel():
            self.cursor = 0
        w = self.data[self.cursor:self.cursor + n].view(a.batch, a.seq + 1)
        self.cursor += n
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def step(self):
        a = self.a
        x, y = self.batch()
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step_no, a.lr, a.warmup_steps, a.total_steps, a.min_lr_ratio)
        measure = peak_rss_reset()
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = self.model.loss(x, y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), a.grad_clip)
        self.opt.step()
        loss_v = loss.item()
        dt = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        self.step_no += 1
        return {
            "step": self.step_no, "step_s": dt, "loss": loss_v, "grad_norm": float(norm),
            "user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime,
            "peak_rss_bytes": peak_rss() if measure else None,
        }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Model, batch, threads, then `train`'s defaults for the tiny preset (recipe.rs, optim.rs).
    defaults = {
        "n-layer": 4, "n-head": 4, "n-embd": 128, "vocab": 50257, "n-positions": 1024,
        "seq": 128, "batch": 8, "threads": 2,
        "lr": 1.5e-3, "warmup-steps": 20, "total-steps": 300, "min-lr-ratio": 0.1,
        "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight-decay": 0.1, "grad-clip": 1.0,
    }
    for name, value in defaults.items():
        p.add_argument(f"--{name}", type=type(value), default=value)
    p.add_argument("--tokens", help="raw little-endian u32 token ids")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--steps", type=int, default=5, help="timed steps (standalone)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (standalone)")
    p.add_argument("--serve", action="store_true", help="one step per `step` line on stdin")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tr = Trainer(a)
    ready = {"ready": True, "params": tr.params, "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(json.dumps(ready), flush=True)
    if a.serve:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "quit":
                break
            if cmd != "step":
                sys.exit(f"torch baseline: unknown command {cmd!r} (expected `step` or `quit`)")
            print(json.dumps(tr.step()), flush=True)
        return
    times = []
    for i in range(a.warmup + a.steps):
        r = tr.step()
        print(json.dumps(r), flush=True)
        if i >= a.warmup:
            times.append(r["step_s"])
    med = statistics.median(times)
    print(json.dumps({"step_s_median": med, "tokens_per_s": a.batch * a.seq / med, "params": tr.params}))


if __name__ == "__main__":
    main()
