#!/usr/bin/python3
"""PyTorch baseline for `make bench`: the same GPT and recipe as Tricycle's run, in PyTorch, on CPU.

Reads the same token files (llm.c shard layout) and prints progress lines and, at the end,
    RESULT name=pytorch threads=T steps=N wall_s=... ms_per_step=... tokens_per_s=... val_loss=...
wall_s is the whole training loop with its evaluations; ms_per_step is the median step time without
them. PyTorch's speed depends on its own threads and on those of the BLAS it calls (Debian's build
uses OpenBLAS, threaded by OPENBLAS_NUM_THREADS, read at start-up): --probe times 30 steps with 1 and
with 2 PyTorch threads and prints a PROBE line for each, so that bench/run_bench.sh can try every
combination and run the recipe with the fastest.

    /usr/bin/python3 bench/pytorch_baseline.py --train F --val F --vocab-size 257 [--steps 2000] [--threads 1]
    OPENBLAS_NUM_THREADS=2 /usr/bin/python3 bench/pytorch_baseline.py ... --probe
"""
import argparse
import math
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


def load_tokens(path):
    header = np.fromfile(path, dtype="<i4", count=256)
    if len(header) < 256 or header[0] != 20240520 or header[1] not in (1, 2):
        sys.exit(f"pytorch_baseline: error: token file '{path}': not an llm.c shard (magic 20240520, version 1 or 2)")
    tokens = np.fromfile(path, dtype="<u2" if header[1] == 1 else "<u4", offset=1024)
    if len(tokens) != header[2]:
        sys.exit(f"pytorch_baseline: error: token file '{path}': header says {header[2]} tokens, file has {len(tokens)}")
    return torch.from_numpy(tokens.astype(np.int64))


class Block(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.fc, self.fc_proj = torch.nn.Linear(dim, 4 * dim), torch.nn.Linear(4 * dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.qkv(self.ln1(x)).split(C, dim=2))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // self.heads)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, T, C))
        return x + self.fc_proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(torch.nn.Module):
    """GPT-2 style, as tricycle.cu's: learned positions, pre-LayerNorm, tied output layer."""

    def __init__(self, vocab, context, dim, layers, heads):
        super().__init__()
        self.wte, self.wpe = torch.nn.Embedding(vocab, dim), torch.nn.Embedding(context, dim)
        self.blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = torch.nn.LayerNorm(dim)
        for name, p in self.named_parameters():  # GPT-2 initialisation
            if name.endswith("bias"):
                torch.nn.init.zeros_(p)
            elif p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "fc_proj.weight")) else 0.02
                torch.nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def learning_rate(step, args):  # linear warmup, then cosine decay to min_lr at the last step
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if step >= args.steps - 1:
        return args.min_lr
    progress = (step - args.warmup) / (args.steps - 1 - args.warmup)
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def make_model(args):
    torch.manual_seed(args.seed)
    model = GPT(args.vocab_size, args.context, args.dim, args.layers, args.heads)
    decayed = [p for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("wpe")]
    others = [p for n, p in model.named_parameters() if not (p.dim() == 2 and not n.startswith("wpe"))]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": args.weight_decay}, {"params": others, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, args.beta2), eps=1e-8)
    return model, optimizer


def batch(tokens, generator, args):
    starts = torch.randint(0, len(tokens) - args.context - 1, (args.batch,), generator=generator)
    x = torch.stack([tokens[s:s + args.context] for s in starts])
    y = torch.stack([tokens[s + 1:s + 1 + args.context] for s in starts])
    return x, y


def train_step(model, optimizer, tokens, generator, step, args):
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, args)
    x, y = batch(tokens, generator, args)
    loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    optimizer.step()
    return loss.item()


def evaluate(model, val, args):  # the first eval_steps windows of the validation file, in order
    model.eval()
    with torch.no_grad():
        losses = []
        for i in range(args.eval_steps):
            starts = [(i * args.batch + b) * args.context % (len(val) - args.context - 1) for b in range(args.batch)]
            x = torch.stack([val[s:s + args.context] for s in starts])
            y = torch.stack([val[s + 1:s + 1 + args.context] for s in starts])
            losses.append(model(x, y).item())
    model.train()
    return sum(losses) / len(losses)


def time_threads(threads, train, args):
    torch.set_num_threads(threads)
    model, optimizer = make_model(args)
    generator = torch.Generator().manual_seed(1)
    for step in range(5):
        train_step(model, optimizer, train, generator, step, args)
    start = time.perf_counter()
    for step in range(30):
        train_step(model, optimizer, train, generator, step, args)
    return (time.perf_counter() - start) / 30


def main():
    parser = argparse.ArgumentParser(description="PyTorch baseline of nanoGPT's CPU recipe, for make bench")
    parser.add_argument("--train", required=True)
    parser.add_argument("--val", required=True)
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--min-lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--beta2", type=float, default=0.99)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--eval-interval", type=int, default=250)
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads")
    parser.add_argument("--probe", action="store_true", help="only time 30 steps with 1 and with 2 threads")
    args = parser.parse_args()
    train, val = load_tokens(args.train), load_tokens(args.val)
    torch.set_num_interop_threads(1)

    if args.probe:
        for threads in (1, 2):
            print(f"PROBE threads={threads} ms_per_step={time_threads(threads, train, args) * 1e3:.2f}", flush=True)
        return
    threads = args.threads
    torch.set_num_threads(threads)

    model, optimizer = make_model(args)
    generator = torch.Generator().manual_seed(args.seed)
    step_times, val_loss = [], float("nan")
    start = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.eval_interval == 0 or step == args.steps:
            val_loss = evaluate(model, val, args)
            print(f"pytorch: step {step}: val loss {val_loss:.4f}", flush=True)
        if step == args.steps:
            break
        step_start = time.perf_counter()
        loss = train_step(model, optimizer, train, generator, step, args)
        step_times.append(time.perf_counter() - step_start)
        if (step + 1) % 250 == 0:
            print(f"pytorch: step {step + 1}/{args.steps} | loss {loss:.4f} | {step_times[-1] * 1e3:.1f} ms", flush=True)
    wall = time.perf_counter() - start
    ms = statistics.median(step_times) * 1e3
    print(f"RESULT name=pytorch threads={threads} steps={args.steps} wall_s={wall:.1f} ms_per_step={ms:.2f} "
          f"tokens_per_s={args.batch * args.context / (ms / 1e3):.0f} val_loss={val_loss:.4f}")


if __name__ == "__main__":
    main()
