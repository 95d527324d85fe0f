#!/usr/bin/python3
"""The PyTorch half of the parity check (see tests/gpt_parity.cu).

For each directory written by tests/gpt_parity: rebuild the GPT in PyTorch from model.bin, run the
batch in batch.bin, and compare logits, loss and every parameter gradient with what Tricycle wrote
in tricycle.bin; then take the same 10 AdamW steps and compare the losses.
Prints one line per check and ends with "N passed, M failed" (", K skipped" when torch is missing).

    /usr/bin/python3 tests/pytorch_parity.py DIR [DIR ...]
"""
import math
import struct
import sys
import zlib

try:
    import numpy as np
    import torch
    import torch.nn.functional as F
except ImportError as missing:
    print(f"skip PyTorch parity: {missing.name} is not installed (apt-get install python3-torch)")
    print(f"0 passed, 0 failed, {len(sys.argv) - 1} skipped")
    sys.exit(0)

torch.set_num_threads(1)
torch.manual_seed(0)
passed = failed = 0


def check(ok, what):
    global passed, failed
    print(("ok   " if ok else "FAIL ") + what)
    passed, failed = passed + bool(ok), failed + (not ok)


def read_model(path):
    """Config, and the parameters by name, from a Tricycle model file (layout in tricycle.h)."""
    data = open(path, "rb").read()
    header = struct.unpack_from("<256i", data, 0)
    if header[0] != 0x59435254 or header[1] != 2:
        sys.exit(f"{path}: not a version 2 Tricycle model file")
    unsigned = lambda value: value & 0xFFFFFFFF
    zeroed = list(header)
    zeroed[20] = 0
    if unsigned(header[20]) != zlib.crc32(struct.pack("<256i", *zeroed)):
        sys.exit(f"{path}: the header's CRC-32 does not match")
    as_float = lambda bits: struct.unpack("<f", struct.pack("<i", bits))[0]
    config = dict(vocab_size=header[2], context=header[3], dim=header[4], layers=header[5], heads=header[6],
                  mlp_ratio=header[7], rmsnorm=bool(header[8]), swiglu=bool(header[9]), rotary=bool(header[10]),
                  tied=bool(header[11]), dropout=as_float(header[12]), attention_dropout=as_float(header[13]))
    num_tensors = header[14]
    offset = 1024
    directory = []
    for _ in range(num_tensors):
        name = data[offset:offset + 48].split(b"\0")[0].decode()
        ndim, d0, d1, _unused = struct.unpack_from("<4i", data, offset + 48)
        directory.append((name, (d0,) if ndim == 1 else (d0, d1)))
        offset += 64
    count_all = struct.unpack_from("<q", data, 64)[0]
    if unsigned(header[18]) != zlib.crc32(data[1024:offset]) or \
            unsigned(header[19]) != zlib.crc32(data[offset:offset + 4 * count_all]):
        sys.exit(f"{path}: the directory's or the parameters' CRC-32 does not match")
    params = {}
    for name, shape in directory:
        count = math.prod(shape)
        params[name] = torch.tensor(np.frombuffer(data, dtype="<f4", count=count, offset=offset).reshape(shape).copy())
        offset += 4 * count
    return config, params, [name for name, _ in directory]


class GPT(torch.nn.Module):
    """The same GPT as tricycle.cu's gpt_forward, written with PyTorch ops."""

    def __init__(self, config, params):
        super().__init__()
        self.c = config
        self.p = torch.nn.ParameterDict({name.replace(".", "__"): torch.nn.Parameter(t) for name, t in params.items()})

    def param(self, name):
        return self.p[name.replace(".", "__")]

    def norm(self, x, prefix):
        if self.c["rmsnorm"]:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.param(prefix + ".weight")
        return F.layer_norm(x, (x.shape[-1],), self.param(prefix + ".weight"), self.param(prefix + ".bias"), 1e-5)

    def rotate(self, x):  # x (B, NH, T, hs): pairs (i, i + hs/2) turned by t * 10000^(-2i/hs)
        T, hs = x.shape[2], x.shape[3]
        half = hs // 2
        angle = torch.arange(T, dtype=torch.float64)[:, None] * 10000.0 ** (-2.0 * torch.arange(half, dtype=torch.float64) / hs)
        cos, sin = angle.cos().float(), angle.sin().float()
        x0, x1 = x[..., :half], x[..., half:]
        return torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)

    def forward(self, tokens):
        c = self.c
        B, T = tokens.shape
        C, NH = c["dim"], c["heads"]
        x = self.param("wte")[tokens]
        if not c["rotary"]:
            x = x + self.param("wpe")[:T]
        for layer in range(c["layers"]):
            p = f"layer{layer}."
            h = self.norm(x, p + "norm1")
            qkv = F.linear(h, self.param(p + "attn.qkv.weight"), self.param(p + "attn.qkv.bias"))
            q, k, v = (t.view(B, T, NH, C // NH).transpose(1, 2) for t in qkv.split(C, dim=2))
            if c["rotary"]:
                q, k = self.rotate(q), self.rotate(k)
            att = (q @ k.transpose(-2, -1)) / math.sqrt(C // NH)
            att = att.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")).softmax(-1)
            y = (att @ v).transpose(1, 2).reshape(B, T, C)
            x = x + F.linear(y, self.param(p + "attn.proj.weight"), self.param(p + "attn.proj.bias"))
            h = F.linear(self.norm(x, p + "norm2"), self.param(p + "mlp.fc.weight"), self.param(p + "mlp.fc.bias"))
            if c["swiglu"]:
                a, gate = h.chunk(2, dim=-1)
                h = F.silu(a) * gate
            else:
                h = F.gelu(h, approximate="tanh")
            x = x + F.linear(h, self.param(p + "mlp.proj.weight"), self.param(p + "mlp.proj.bias"))
        x = self.norm(x, "final_norm")
        return F.linear(x, self.param("wte") if c["tied"] else self.param("lm_head"))


def compare(directory):
    config, params, names = read_model(directory + "/model.bin")
    batch = np.fromfile(directory + "/batch.bin", dtype="<i4")
    B, T = int(batch[0]), int(batch[1])
    tokens = torch.tensor(batch[2:2 + B * T].reshape(B, T).astype(np.int64))
    targets = torch.tensor(batch[2 + B * T:2 + 2 * B * T].astype(np.int64))
    ours = np.fromfile(directory + "/tricycle.bin", dtype="<f4")
    V = config["vocab_size"]
    n_logits, n_params = B * T * V, sum(t.numel() for t in params.values())
    our_logits, our_loss = ours[:n_logits], float(ours[n_logits])
    our_grads, our_losses = ours[n_logits + 1:n_logits + 1 + n_params], ours[n_logits + 1 + n_params:]
    kind = ("rmsnorm" if config["rmsnorm"] else "layernorm") + "+" + ("swiglu" if config["swiglu"] else "gelu") + \
        ("+rotary" if config["rotary"] else "") + ("" if config["tied"] else "+untied") + \
        (" (flash attention)" if directory.endswith("flash") else "")

    model = GPT(config, params)
    logits = model(tokens)
    loss = F.cross_entropy(logits.view(-1, V), targets, ignore_index=-1)
    loss.backward()
    diff = np.abs(logits.detach().numpy().ravel() - our_logits).max()
    check(diff <= 1e-4, f"parity {kind}: logits {tuple(logits.shape)} max abs diff {diff:.2e} (<= 1e-4)")
    rel = abs(loss.item() - our_loss) / abs(loss.item())
    check(rel <= 1e-5, f"parity {kind}: loss {loss.item():.6f} vs {our_loss:.6f}, relative diff {rel:.2e} (<= 1e-5)")
    offset, worst, worst_name = 0, 0.0, ""
    for name in names:
        g = model.param(name).grad.numpy().ravel()
        ours_g = our_grads[offset:offset + g.size]
        offset += g.size
        err = np.abs(g - ours_g).max() / max(1e-3, np.abs(g).max())
        if err > worst:
            worst, worst_name = err, name
    check(worst <= 1e-4, f"parity {kind}: all {len(names)} parameter gradients, worst {worst_name} with max abs diff "
                         f"{worst:.2e} of its largest entry (<= 1e-4)")

    # Ten AdamW steps: decay on the weight matrices only (not position embeddings), as Tricycle does.
    model = GPT(config, read_model(directory + "/model.bin")[1])
    is_decayed = lambda n: model.param(n).dim() == 2 and n != "wpe"
    decayed = [model.param(n) for n in names if is_decayed(n)]
    others = [model.param(n) for n in names if not is_decayed(n)]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(tokens).view(-1, V), targets, ignore_index=-1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    diff = np.abs(np.array(losses) - our_losses).max()
    check(len(our_losses) == 10 and diff <= 1e-4, f"parity {kind}: 10 AdamW steps, losses {losses[0]:.4f} -> {losses[-1]:.4f}, "
                                                   f"max abs diff {diff:.2e} (<= 1e-4)")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for directory in sys.argv[1:]:
        compare(directory)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
