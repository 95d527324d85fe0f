#!/usr/bin/python3
"""PyTorch baseline for `make bench`: nanoGPT's CPU recipe (a small GPT-2 style model) in plain
PyTorch on the CPU, reading the same token files as Tricycle's train_gpt, so the two can be
compared side by side.

    /usr/bin/python3 bench/pytorch_baseline.py --train TRAIN.bin --val VAL.bin --vocab-size 257

Progress is printed at every evaluation; the last line is machine-readable:

    RESULT name=pytorch threads=1 precision=fp32 steps=2000 wall_s=... ms_per_step=... tokens_per_s=... val_loss=...

wall_s       the whole training loop, evaluations included (the threads probe is not)
ms_per_step  median time of one training step, evaluations excluded
tokens_per_s batch * context / mean step time
val_loss     the last evaluation (after the final step)

--precision bf16 runs the forward pass and the loss under torch.autocast("cpu", dtype=torch.bfloat16)
(matrix products in bfloat16, the master weights and optimizer in float), as a PyTorch user would
turn it on; fp32 is plain float. With --threads auto (the default) a short probe first times
training steps with 1 and with 2 PyTorch threads on a throw-away model and keeps the faster.
--probe only prints the timings of 1 and 2 threads in both precisions as
`PROBE threads=N precision=P ms_per_step=X` lines and exits. The OpenBLAS that Debian's PyTorch
calls has threads of its own, set only by OPENBLAS_NUM_THREADS at start-up and left to the caller
(bench/run_bench.sh probes each setting; unset, OpenBLAS's idle threads spin and cost system time).
"""
import argparse
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PROGRAM = "pytorch_baseline"
SHARD_MAGIC = 20240520
HEADER_INTS = 256  # the header is 256 little-endian int32 values (1024 bytes)
PROBE_WARMUP, PROBE_STEPS = 5, 30


def fail(message):
    """One-line error on stderr, exit status 1."""
    print(f"{PROGRAM}: error: {message}", file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------------------------------------
# Token files (llm.c shard layout)

def load_tokens(path, vocab_size):
    """Reads a token file and returns its tokens as a numpy array (uint16 or uint32)."""
    try:
        size = os.path.getsize(path)
        header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    except OSError as e:
        fail(f"cannot read token file '{path}': {e.strerror}")
    if len(header) < HEADER_INTS:
        fail(f"token file '{path}': too short for a header ({size} bytes, need {HEADER_INTS * 4})")
    if header[0] != SHARD_MAGIC:
        fail(f"token file '{path}': bad magic {header[0]} (expected {SHARD_MAGIC})")
    if header[1] not in (1, 2):
        fail(f"token file '{path}': unsupported version {header[1]} (1 = uint16 tokens, 2 = uint32 tokens)")
    dtype = np.dtype("<u2") if header[1] == 1 else np.dtype("<u4")
    count = int(header[2])
    payload = size - HEADER_INTS * 4
    if count < 0 or payload != count * dtype.itemsize:
        fail(f"token file '{path}': header says {count} tokens of {dtype.itemsize} bytes, "
             f"but the file holds {payload} bytes after the header")
    tokens = np.fromfile(path, dtype=dtype, offset=HEADER_INTS * 4)
    if count and int(tokens.max()) >= vocab_size:
        fail(f"token file '{path}': token {int(tokens.max())} is outside the vocabulary (--vocab-size {vocab_size})")
    return tokens


def windows(tokens, starts, context):
    """Inputs tokens[s : s+T] and targets tokens[s+1 : s+T+1] for each start s, as int64 tensors."""
    index = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(context + 1)
    rows = torch.from_numpy(tokens[index].astype(np.int64))
    return rows[:, :-1], rows[:, 1:]


def random_batch(tokens, generator, args):
    """Training batch: `batch` windows at uniformly random starts 0 .. n-T-1 (seeded generator)."""
    starts = torch.randint(0, len(tokens) - args.context, (args.batch,), generator=generator)
    return windows(tokens, starts.numpy(), args.context)


def sweep_starts(n_tokens, count, context):
    """Validation windows: a deterministic sweep, like train_gpt's validation loader.
    Consecutive non-overlapping windows from the start of the file, wrapping around when the
    next window would run past the end; every evaluation uses the same batches."""
    starts, position = [], 0
    for _ in range(count):
        if position + context + 1 > n_tokens:
            position = 0
        starts.append(position)
        position += context
    return starts


# ---------------------------------------------------------------------------------------------
# The model: GPT-2 style decoder

class SelfAttention(nn.Module):
    """Causal multi-head self-attention, written out by hand."""

    def __init__(self, dim, heads, context):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)   # queries, keys and values in one matrix product
        self.out = nn.Linear(dim, dim)       # output projection (a residual branch's last layer)
        # True where a position may not look (the future): above the diagonal.
        self.register_buffer("future", torch.ones(context, context, dtype=torch.bool).triu(1), persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        hs = C // self.heads
        # (B, T, 3C) -> three tensors of shape (B, heads, T, hs)
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, hs).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
        scores = scores.masked_fill(self.future[:T, :T], float("-inf"))
        y = scores.softmax(dim=-1) @ v                        # (B, heads, T, hs)
        return self.out(y.transpose(1, 2).reshape(B, T, C))   # heads side by side again


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim, heads, context):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, context)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)  # the MLP's residual output projection

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab_size, context, dim, layers, heads):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, context) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        # GPT-2 initialisation: linear and embedding weights N(0, 0.02), biases 0, LayerNorm left
        # at (1, 0); the two residual output projections per block get std 0.02 / sqrt(2 * layers).
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for projection in (block.attn.out, block.out):
                nn.init.normal_(projection.weight, mean=0.0, std=0.02 / math.sqrt(2 * layers))

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.tokens(idx) + self.positions(torch.arange(T))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.tokens.weight)  # output layer tied to the token embedding
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# ---------------------------------------------------------------------------------------------
# Training

def learning_rate(step, args):
    """Linear warmup to lr over `warmup` steps (step s gets lr*(s+1)/warmup, as in Tricycle's
    learning_rate), then cosine decay reaching min_lr at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if step >= args.steps - 1 or args.steps <= args.warmup:
        return args.min_lr
    progress = (step - args.warmup) / (args.steps - 1 - args.warmup)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def build(args):
    """A freshly initialised model (seeded) and its AdamW optimizer."""
    torch.manual_seed(args.seed)
    model = GPT(args.vocab_size, args.context, args.dim, args.layers, args.heads)
    # Weight decay only on 2-D weight matrices: the linear layers' weights and the token
    # embedding (which is also the output layer). Not on biases, LayerNorm or positions.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() == 2 and not name.startswith("positions") else no_decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(args.beta1, args.beta2), eps=1e-8)
    return model, optimizer


def autocast(precision):
    """bfloat16 autocast around the forward pass, or nothing for fp32."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def train_step(model, optimizer, train, generator, step, args):
    """One optimizer step; returns (loss, lr)."""
    lr = learning_rate(step, args)
    for group in optimizer.param_groups:
        group["lr"] = lr
    x, y = random_batch(train, generator, args)
    with autocast(args.precision):
        loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    optimizer.step()
    return loss.item(), lr


@torch.no_grad()
def evaluate(model, val, args):
    """Mean loss over eval_steps batches of the validation sweep (the same batches every time)."""
    model.eval()
    starts = sweep_starts(len(val), args.eval_steps * args.batch, args.context)
    total = 0.0
    for i in range(args.eval_steps):
        x, y = windows(val, starts[i * args.batch:(i + 1) * args.batch], args.context)
        with autocast(args.precision):
            total += model(x, y).item()
    model.train()
    return total / args.eval_steps


def probe(threads, train, args, best_ms=None):
    """Median ms per training step with `threads` PyTorch threads (in args.precision), on a
    throw-away model and a throw-away batch stream (the real run starts afresh). Gives up early when,
    after a few steps, it is already more than 3x slower than best_ms (oversubscribed threads or
    bfloat16 without hardware support can be 30x slower)."""
    torch.set_num_threads(threads)
    model, optimizer = build(args)
    generator = torch.Generator().manual_seed(args.seed + 1)
    times = []
    for step in range(PROBE_WARMUP + PROBE_STEPS):
        start = time.perf_counter()
        train_step(model, optimizer, train, generator, step, args)
        times.append(time.perf_counter() - start)
        if best_ms is not None and len(times) >= 3 and statistics.median(times) * 1e3 > 3 * best_ms:
            break
    timed = times[PROBE_WARMUP:] or times  # the warm-up steps count only when it gave up early
    return statistics.median(timed) * 1e3


# ---------------------------------------------------------------------------------------------

def parse_args():
    p = argparse.ArgumentParser(
        prog="pytorch_baseline.py",
        description="PyTorch (CPU) baseline of nanoGPT's CPU recipe, for make bench.")
    p.error = lambda message: fail(f"{message} (see --help)")  # one line, exit status 1
    p.add_argument("--train", required=True, metavar="FILE", help="training token file (llm.c shard layout)")
    p.add_argument("--val", required=True, metavar="FILE", help="validation token file (llm.c shard layout)")
    p.add_argument("--vocab-size", type=int, required=True, metavar="N", help="vocabulary size of the tokenizer")

    def option(flag, kind, default, text):  # an optional flag whose help shows its default
        p.add_argument(flag, type=kind, default=default, metavar="N" if kind is int else "X",
                       help=f"{text} (default {default})")

    option("--layers", int, 4, "transformer blocks")
    option("--heads", int, 4, "attention heads")
    option("--dim", int, 128, "embedding width")
    option("--context", int, 64, "sequence length")
    option("--batch", int, 12, "sequences per step")
    option("--steps", int, 2000, "training steps")
    option("--lr", float, 1e-3, "peak learning rate")
    option("--min-lr", float, 1e-4, "learning rate at the last step (cosine decay)")
    option("--warmup", int, 100, "linear warmup steps")
    option("--beta1", float, 0.9, "AdamW beta1")
    option("--beta2", float, 0.99, "AdamW beta2")
    option("--weight-decay", float, 0.1, "AdamW weight decay, on 2-D weight matrices only")
    option("--clip", float, 1.0, "gradient clipping by global norm")
    option("--eval-interval", int, 250, "evaluate every N steps and after the last")
    option("--eval-steps", int, 20, "validation batches per evaluation")
    option("--seed", int, 1337, "seed of the initialisation and of the training batches")
    p.add_argument("--threads", default="auto", metavar="N|auto",
                   help="PyTorch threads; auto times 1 and 2 threads first and keeps the faster (default auto)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="fp32, or bf16 autocast around the forward pass (default fp32)")
    p.add_argument("--probe", action="store_true",
                   help="only time training steps with 1 and 2 threads in fp32 and bf16 (PROBE lines), then exit")
    args = p.parse_args()

    for name in ("vocab_size", "layers", "heads", "dim", "context", "batch", "eval_interval", "eval_steps"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1")
    if args.steps < 0 or args.warmup < 0:
        fail("--steps and --warmup must not be negative")
    if args.dim % args.heads:
        fail(f"--dim {args.dim} is not a multiple of --heads {args.heads}")
    if args.min_lr > args.lr:
        fail(f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}")
    if args.threads != "auto":
        if not args.threads.isdigit() or int(args.threads) < 1:
            fail(f"--threads must be a positive number or 'auto', not '{args.threads}'")
        args.threads = int(args.threads)
    return args


def main():
    args = parse_args()
    train = load_tokens(args.train, args.vocab_size)
    val = load_tokens(args.val, args.vocab_size)
    for path, tokens in ((args.train, train), (args.val, val)):
        if len(tokens) < args.context + 1:
            fail(f"token file '{path}': {len(tokens)} tokens, fewer than context + 1 = {args.context + 1}")
    torch.set_num_interop_threads(1)  # must happen before any parallel work

    if args.probe:
        best = None
        for precision in ("fp32", "bf16"):
            args.precision = precision
            for n in (1, 2):
                ms = probe(n, train, args, best_ms=best)
                best = ms if best is None else min(best, ms)
                print(f"PROBE threads={n} precision={precision} ms_per_step={ms:.2f}", flush=True)
        return
    if args.threads == "auto":
        timings = {1: probe(1, train, args)}
        timings[2] = probe(2, train, args, best_ms=timings[1])
        threads = min(timings, key=timings.get)
        print(f"threads: {threads} ({timings[1]:.2f} ms/step with 1 thread, {timings[2]:.2f} with 2)", flush=True)
    else:
        threads = args.threads
    torch.set_num_threads(threads)

    model, optimizer = build(args)  # fresh, seeded: independent of the probe
    generator = torch.Generator().manual_seed(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"pytorch {torch.__version__}: {args.layers} layers, {args.heads} heads, dim {args.dim}, context {args.context}, "
          f"vocab {args.vocab_size}: {n_params / 1e6:.2f}M parameters; {args.steps} steps of batch {args.batch}, "
          f"{threads} thread(s) (OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}), {args.precision}; "
          f"train {len(train)} tokens, val {len(val)} tokens", flush=True)

    step_times = []            # seconds per training step, evaluations excluded
    since_eval = []            # (loss, seconds) of the steps since the last evaluation
    val_loss, lr = float("nan"), None
    start = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.eval_interval == 0 or step == args.steps:
            val_loss = evaluate(model, val, args)
            # train loss: mean over the steps since the last evaluation; lr: the last step's;
            # ms/step: median over the steps since the last evaluation
            if since_eval:
                train_loss = f"{statistics.mean(l for l, _ in since_eval):.4f}"
                ms = f"{statistics.median(s for _, s in since_eval) * 1e3:.2f}"
                lr_text = f"{lr:.2e}"
            else:
                train_loss = ms = lr_text = "-"
            print(f"step {step}/{args.steps} | train loss {train_loss} | val loss {val_loss:.4f} | "
                  f"lr {lr_text} | {ms} ms/step", flush=True)
            since_eval = []
        if step == args.steps:
            break
        t0 = time.perf_counter()
        loss, lr = train_step(model, optimizer, train, generator, step, args)
        seconds = time.perf_counter() - t0
        if not math.isfinite(loss):
            fail(f"step {step}: the loss is {loss}")
        step_times.append(seconds)
        since_eval.append((loss, seconds))
    wall = time.perf_counter() - start

    if step_times:
        ms_per_step = statistics.median(step_times) * 1e3
        tokens_per_s = args.batch * args.context / statistics.mean(step_times)
    else:
        ms_per_step = tokens_per_s = 0.0
    print(f"RESULT name=pytorch threads={threads} precision={args.precision} steps={args.steps} wall_s={wall:.1f} ms_per_step={ms_per_step:.2f} "
          f"tokens_per_s={tokens_per_s:.0f} val_loss={val_loss:.4f}", flush=True)


if __name__ == "__main__":
    main()
