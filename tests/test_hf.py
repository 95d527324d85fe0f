#!/usr/bin/env python3
"""tests/test_hf.py — GPT-2 and Hugging Face interop (tools/import_hf.py, tools/export_hf.py, the
GPT-2 tokenizer mode, train_gpt --init).

Each check that runs a model runs twice: with the float programs, against its reference at 1e-5,
and with the bfloat16 programs, within a bound derived from bfloat16's precision (see
logits_bound); the check's name says which. The Makefile builds both precisions' programs and
names their folders in TRICYCLE_PROGRAMS_FLOAT and TRICYCLE_PROGRAMS_BF16, whatever its default.

Always (numpy and the `regex` module): safetensors written and read back; GPT-2 checkpoints made
here with random weights imported and checked against a numpy GPT-2 (logits, greedy generation);
a trained Tricycle model exported and imported back bit for bit; bad inputs ending in one-line
errors; a GPT-2-style BPE trained here in Python, loaded by ours, encoding token for token like a
Python reference (GPT-2's regex, then BPE by merge rank) on the corpus, random bytes and
adversarial text; train_gpt --init.
With `transformers` (PyPI; skipped and counted otherwise): a random GPT2LMHeadModel imported,
logits and greedy generation checked; trained Tricycle models (tied and untied) exported and
loaded by from_pretrained, logits checked. With `tokenizers`: a byte-level BPE trained with GPT-2's
pre-tokenizer, loaded by ours, identical ids; the encoding speed is printed.

Run with the Python that has those packages: tests/test_hf.sh picks .venv-hf/bin/python when it
exists (or $HF_PYTHON).
"""
import json
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
from collections import Counter

try:
    import numpy as np
    import regex
except ImportError as missing:
    print(f"skip the GPT-2 interop tests: {missing.name} is not installed (apt-get install python3-numpy "
          f"python3-regex)")
    print("0 passed, 0 failed, 1 skipped")
    sys.exit(0)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import hf_files  # noqa: E402

TOKENIZER = os.path.join(ROOT, "tokenizer")
IMPORT, EXPORT = (os.path.join(ROOT, "tools", p) for p in ("import_hf.py", "export_hf.py"))
CORPUS = os.path.join(ROOT, "data", "tinyshakespeare.txt")
GPT2_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
passed = failed = skipped = 0


def check(ok, what):
    global passed, failed
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    passed, failed = passed + bool(ok), failed + (not ok)


def skip(count, why):
    global skipped
    print(f"skip {count} checks: {why}", flush=True)
    skipped += count


def run(*args):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, errors="replace")


def tool(script, *args):
    return run(sys.executable, script, *args)


def one_line_error(result, words):
    """Exit status 1 and one stderr line holding each of `words`."""
    lines = result.stderr.strip().splitlines()
    return result.returncode == 1 and len(lines) == 1 and all(w in lines[0] for w in words)


# ------------------------------------------------------------------------------------------------
# A numpy GPT-2 and checkpoints made here

def layer_norm(x, weight, bias):
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + 1e-5) * weight + bias


def exact(a):
    return a


def bfloat16(a):
    """a rounded to the nearest bfloat16 (ties to even), as float64."""
    bits = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


def gpt2_logits(w, hf, tokens, store=exact):
    """GPT-2's forward pass in float64 over HF-named tensors ('transformer.' prefix; lm_head.weight
    when untied). `store` is applied to every weight and to every tensor a step produces:
    `bfloat16` makes it a GPT-2 that stores its tensors in bfloat16, as the bfloat16 build does."""
    w = {k.removeprefix("transformer."): store(v.astype(np.float64)) for k, v in w.items()}
    T, C, NH = len(tokens), hf["n_embd"], hf["n_head"]
    norm = lambda x, name: store(layer_norm(x, w[name + ".weight"], w[name + ".bias"]))
    linear = lambda x, name: store(x @ w[name + ".weight"] + w[name + ".bias"])
    x = store(w["wte.weight"][tokens] + w["wpe.weight"][:T])
    mask = np.triu(np.ones((T, T), bool), 1)
    for layer in range(hf["n_layer"]):
        p = f"h.{layer}."
        qkv = linear(norm(x, p + "ln_1"), p + "attn.c_attn")
        q, k, v = (qkv[:, i * C:(i + 1) * C].reshape(T, NH, C // NH).transpose(1, 0, 2) for i in range(3))
        scores = np.where(mask, -np.inf, store(q @ k.transpose(0, 2, 1) / np.sqrt(C // NH)))
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs = store(probs / probs.sum(-1, keepdims=True))
        y = store((probs @ v).transpose(1, 0, 2).reshape(T, C))
        x = store(x + linear(y, p + "attn.c_proj"))
        h = linear(norm(x, p + "ln_2"), p + "mlp.c_fc")
        h = store(0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3))))
        x = store(x + linear(h, p + "mlp.c_proj"))
    return store(norm(x, "ln_f") @ w.get("lm_head.weight", w["wte.weight"]).T)


class Build:
    """train_gpt and inference of one precision, and how their logits are judged. Float: within
    1e-5 of the reference. bfloat16: within twice the error that storing every tensor in bfloat16
    causes in that very model and prompt, measured by running the numpy GPT-2 both ways (the
    bfloat16 build rounds the same tensors, in its own order, so its error is of that size; a real
    bug is off by the logits' own scale)."""

    def __init__(self, precision):
        self.precision, self.exact = precision, precision == "float"
        self.name = "float build" if self.exact else "bfloat16 build"
        folder = os.environ.get("TRICYCLE_PROGRAMS_" + precision.upper())
        if not folder:
            sys.exit(f"error: TRICYCLE_PROGRAMS_{precision.upper()} is not set: run this through `make test`, "
                     f"which builds each precision's programs and names their folders")
        self.train_gpt, self.inference = (os.path.join(ROOT, folder, p) for p in ("train_gpt", "inference"))

    def logits_bound(self, weights, hf, tokens):
        """(bound, how it was chosen) for the largest difference of a logit from the reference."""
        if self.exact:
            return 1e-5, "1e-5"
        error = np.abs(gpt2_logits(weights, hf, tokens, bfloat16) - gpt2_logits(weights, hf, tokens)).max()
        return 2 * error, f"2x the {error:.2e} of a numpy GPT-2 storing its tensors in bfloat16"

    def check_logits(self, what, ours, theirs, weights, hf, tokens):
        bound, why = self.logits_bound(weights, hf, tokens)
        diff = np.abs(theirs - ours).max()
        check(diff <= bound, f"{self.name}: {what}, logits {ours.shape} max abs diff {diff:.2e} (<= {why})")
        return bound

    def check_greedy(self, what, ours, theirs, bound, reference_logits):
        """Greedy tokens equal the reference's; in bfloat16, up to the first position where the
        reference's best two logits are within 2 x bound of each other (a tie bfloat16 cannot
        break), said in the check's name. reference_logits(n): the reference's logits for the
        next token after the prompt and its first n greedy tokens."""
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        if first is None or self.exact:
            check(ours == theirs, f"{self.name}: {what}: greedy tokens identical ({theirs[:6]}...)")
            return
        best_two = np.sort(reference_logits(first))[-2:]
        gap = best_two[1] - best_two[0]
        check(gap <= 2 * bound, f"{self.name}: {what}: greedy tokens identical up to token {first} of {len(theirs)}, "
                                f"where the reference's best two logits are {gap:.2e} apart (<= 2 x {bound:.2e}: "
                                f"a tie in bfloat16)")


def gpt2_checkpoint(directory, hf, seed, scale=0.2):
    """A GPT-2 checkpoint with random weights: config.json and model.safetensors (our writer)."""
    rng = np.random.default_rng(seed)
    C, V, H = hf["n_embd"], hf["vocab_size"], 4 * hf["n_embd"]
    shapes = {"wte.weight": (V, C), "wpe.weight": (hf["n_positions"], C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for layer in range(hf["n_layer"]):
        p = f"h.{layer}."
        shapes.update({p + "ln_1.weight": (C,), p + "ln_1.bias": (C,), p + "attn.c_attn.weight": (C, 3 * C),
                       p + "attn.c_attn.bias": (3 * C,), p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
                       p + "ln_2.weight": (C,), p + "ln_2.bias": (C,), p + "mlp.c_fc.weight": (C, H),
                       p + "mlp.c_fc.bias": (H,), p + "mlp.c_proj.weight": (H, C), p + "mlp.c_proj.bias": (C,)})
    weights = {"transformer." + name: (rng.standard_normal(shape) * scale + (name.endswith("ln_1.weight") or
               name.endswith("ln_2.weight") or name == "ln_f.weight")).astype(np.float32)
               for name, shape in shapes.items()}
    os.makedirs(directory, exist_ok=True)
    json.dump(hf, open(os.path.join(directory, "config.json"), "w"))
    open(os.path.join(directory, "model.safetensors"), "wb").write(hf_files.safetensors_bytes(weights))
    return weights


def small_config(vocab_size):
    return {"model_type": "gpt2", "vocab_size": vocab_size, "n_positions": 32, "n_embd": 32, "n_layer": 2,
            "n_head": 4, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}


def our_logits(build, model, prompt, work):
    """(tokens, logits (T, V)) of inference --logits-out over `prompt`."""
    path = os.path.join(work, "logits.bin")
    result = run(build.inference, model, "--prompt", prompt, "--tokens", 1, "--temperature", 0, "--logits-out", path)
    if result.returncode != 0:
        print(result.stderr)
        return None, None
    data = open(path, "rb").read()
    T, V = struct.unpack_from("<2i", data)
    tokens = np.frombuffer(data, "<i4", T, 8)
    return tokens, np.frombuffer(data, "<f4", T * V, 8 + 4 * T).reshape(T, V)


def our_greedy(build, model, prompt, count, work):
    path = os.path.join(work, "greedy.txt")
    run(build.inference, model, "--prompt", prompt, "--tokens", count, "--temperature", 0, "--tokens-out", path)
    return [int(line) for line in open(path)] if os.path.exists(path) else []


# ------------------------------------------------------------------------------------------------
# Part 1: files and models, numpy only

def test_safetensors(work):
    rng = np.random.default_rng(1)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b.c": np.arange(7, dtype=np.float32),
               "scalar_row": np.array([np.pi], np.float32)}
    path = os.path.join(work, "t.safetensors")
    open(path, "wb").write(hf_files.safetensors_bytes(tensors))
    back = hf_files.read_safetensors(path)
    check(back.keys() == tensors.keys() and all(np.array_equal(back[k], tensors[k]) for k in tensors),
          "safetensors: our writer -> our reader gives the same tensors bit for bit")
    # bfloat16 and float16 tensors, as other writers make them, come back as float32.
    values = np.array([1.5, -2.25, 3e-3], np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    header = json.dumps({"x": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]},
                         "y": {"dtype": "F16", "shape": [3], "data_offsets": [6, 12]}}).encode()
    open(path, "wb").write(struct.pack("<Q", len(header)) + header + bf16 + values.astype("<f2").tobytes())
    back = hf_files.read_safetensors(path)
    check(np.array_equal(back["x"], (np.frombuffer(bf16, "<u2").astype(np.uint32) << 16).view(np.float32)) and
          np.array_equal(back["y"], values.astype(np.float16).astype(np.float32)),
          "safetensors: bfloat16 and float16 tensors are read as float32")


def test_import_numpy(work, byte_tok, build):
    hf = small_config(257)
    directory = os.path.join(work, "gpt2_random")
    weights = gpt2_checkpoint(directory, hf, seed=2)
    model = os.path.join(work, "imported.bin")
    result = tool(IMPORT, directory, model, "--tokenizer", byte_tok)
    check(result.returncode == 0, f"import_hf: a GPT-2 checkpoint (safetensors) imports {result.stderr.strip()}")
    tokens, logits = our_logits(build, model, "To be, or not", work)
    if tokens is None:
        check(False, f"{build.name}: inference --logits-out on the imported model")
        return directory, model
    bound = build.check_logits("imported GPT-2 against a numpy GPT-2", logits, gpt2_logits(weights, hf, tokens),
                               weights, hf, tokens)
    greedy, sequence = our_greedy(build, model, "To be, or not", 12, work), list(tokens)
    for _ in range(12):
        sequence.append(int(gpt2_logits(weights, hf, np.array(sequence))[-1].argmax()))
    build.check_greedy("imported GPT-2 against a numpy GPT-2", greedy, sequence[len(tokens):], bound,
                       lambda n: gpt2_logits(weights, hf, np.array(sequence[:len(tokens) + n]))[-1])
    return directory, model


def test_bad_inputs(work, byte_tok, source):
    """Each broken checkpoint gives a one-line error naming the file and what was expected."""
    def broken(name, edit_config=None, edit_weights=None, truncate=None):
        directory = os.path.join(work, "bad_" + name)
        shutil.copytree(source, directory)
        config_path, weights_path = os.path.join(directory, "config.json"), os.path.join(directory, "model.safetensors")
        if edit_config:
            hf = json.load(open(config_path))
            edit_config(hf)
            json.dump(hf, open(config_path, "w"))
        if edit_weights:
            weights = hf_files.read_safetensors(weights_path)
            edit_weights(weights)
            open(weights_path, "wb").write(hf_files.safetensors_bytes(weights))
        if truncate:
            data = open(weights_path, "rb").read()
            open(weights_path, "wb").write(data[:truncate(len(data))])
        return tool(IMPORT, directory, os.path.join(work, "bad.bin"), "--tokenizer", byte_tok)

    cases = [
        ("missing key", broken("missing", edit_weights=lambda w: w.pop("transformer.h.1.mlp.c_fc.bias")),
         ["model.safetensors", "missing tensor h.1.mlp.c_fc.bias"]),
        ("wrong shape", broken("shape", edit_weights=lambda w: w.update({"transformer.h.0.attn.c_attn.weight":
                                                                           np.zeros((32, 95), np.float32)})),
         ["h.0.attn.c_attn.weight", "(32, 95)", "expected (32, 96)"]),
        ("unexpected tensor", broken("extra", edit_weights=lambda w: w.update({"transformer.h.9.x": np.zeros(2)})),
         ["unexpected tensor h.9.x"]),
        ("unsupported activation", broken("activation", edit_config=lambda c: c.update(activation_function="relu")),
         ["config.json", "activation_function is 'relu'", "gelu_new"]),
        ("exact GELU", broken("gelu", edit_config=lambda c: c.update(activation_function="gelu")),
         ["activation_function is 'gelu'"]),
        ("other layer norm epsilon", broken("eps", edit_config=lambda c: c.update(layer_norm_epsilon=1e-6)),
         ["layer_norm_epsilon"]),
        ("missing config field", broken("field", edit_config=lambda c: c.pop("n_head")), ["missing field 'n_head'"]),
        ("truncated safetensors (data)", broken("cut", truncate=lambda n: n - 100),
         ["truncated safetensors", "model.safetensors"]),
        ("truncated safetensors (header)", broken("cut_header", truncate=lambda n: 20),
         ["truncated safetensors", "header"]),
        ("truncated safetensors (length)", broken("cut_length", truncate=lambda n: 5), ["truncated safetensors"]),
        ("vocabulary mismatch", broken("vocab", edit_config=lambda c: c.update(vocab_size=300),
                                       edit_weights=lambda w: w.update({"transformer.wte.weight":
                                                                        np.zeros((300, 32), np.float32)})),
         ["the tokenizer has 257 tokens", "vocab_size is 300"]),
    ]
    for what, result, words in cases:
        check(one_line_error(result, words), f"import_hf, {what}: one-line error ({result.stderr.strip()})")
    result = tool(IMPORT, os.path.join(work, "nowhere"), os.path.join(work, "bad.bin"))
    check(one_line_error(result, ["nowhere", "config.json"]), f"import_hf, missing directory: {result.stderr.strip()}")
    result = tool(IMPORT, source, os.path.join(work, "bad.bin"))
    check(one_line_error(result, ["no vocab.json and merges.txt", "--tokenizer"]),
          f"import_hf without a tokenizer: {result.stderr.strip()}")
    result = tool(IMPORT, source, os.path.join(work, "bad.bin"), "--frobnicate")
    check(one_line_error(result, ["unknown flag --frobnicate"]), f"import_hf, bad flag: {result.stderr.strip()}")


def train_tiny(build, work, byte_tok, name, *flags):
    """A few training steps of a tiny Tricycle model on the characters of the corpus."""
    prefix = os.path.join(work, "char")
    if not os.path.exists(prefix + "_train.bin"):
        run(TOKENIZER, "encode", "--tokenizer", byte_tok, "--input", CORPUS, "--output", prefix)
    out = os.path.join(work, name)
    result = run(build.train_gpt, "--train", prefix + "_train.bin", "--val", prefix + "_val.bin", "--tokenizer", byte_tok,
                 "--out", out, "--preset", "debug", "--steps", 20, "--eval-interval", 20, "--eval-steps", 2, *flags)
    if result.returncode != 0:
        print(result.stderr)
    return os.path.join(out, "latest.bin")


def test_round_trip(work, byte_tok, build):
    """A trained Tricycle model -> export -> import: the same parameters bit for bit (in the
    bfloat16 build too: its model files hold float32 values that are exactly bfloat16)."""
    trained = train_tiny(build, work, byte_tok, "trained")
    exported = os.path.join(work, "exported")
    result = tool(EXPORT, trained, exported)
    check(result.returncode == 0 and os.path.exists(os.path.join(exported, "model.safetensors")),
          f"{build.name}: export_hf: a trained model exports ({result.stdout.strip()}{result.stderr.strip()})")
    back = os.path.join(work, "back.bin")
    result = tool(IMPORT, exported, back, "--tokenizer", byte_tok)
    config_a, params_a, _ = hf_files.read_model_file(trained)
    config_b, params_b, sections = hf_files.read_model_file(back)
    same = config_a == config_b and all(np.array_equal(params_a[k].view(np.uint32), params_b[k].view(np.uint32))
                                        for k in params_a)
    check(result.returncode == 0 and same, f"{build.name}: round trip: export then import gives the same config and "
                                           f"bit-identical parameters ({len(params_a)} tensors)")
    if not build.exact:
        rounded = all(np.all(v.view(np.uint32) & 0xFFFF == 0) for v in params_a.values())
        check(rounded, f"{build.name}: a trained model's parameter block holds float32 values that are exactly bfloat16")
    hf = json.load(open(os.path.join(exported, "config.json")))
    weights = hf_files.read_safetensors(os.path.join(exported, "model.safetensors"))
    tokens, logits = our_logits(build, trained, "ROMEO:", work)
    if tokens is None:
        check(False, f"{build.name}: inference --logits-out on the trained model")
    else:
        build.check_logits("round trip: the exported GPT-2 (numpy) against the trained model", logits,
                           gpt2_logits(weights, hf, tokens), weights, hf, tokens)
    return trained, exported


def test_export_refusals(work, trained):
    """Models GPT-2 cannot hold are refused, naming the field; so is a corrupt model file."""
    config_a, _, _ = hf_files.read_model_file(trained)
    for flag, words in (("--norm=rmsnorm", ["norm is rmsnorm"]), ("--activation=swiglu", ["activation is swiglu"]),
                        ("--rotary", ["rotary is on"])):
        config = dict(config_a, rmsnorm=flag == "--norm=rmsnorm", swiglu=flag == "--activation=swiglu",
                      rotary=flag == "--rotary")
        rng = np.random.default_rng(3)
        params = {n: rng.standard_normal(s).astype(np.float32) for n, s in hf_files.parameter_layout(config)}
        path = os.path.join(work, "unexportable.bin")
        open(path, "wb").write(hf_files.model_file_bytes(config, params, []))
        result = tool(EXPORT, path, os.path.join(work, "unexportable"))
        check(one_line_error(result, ["unexportable.bin"] + words), f"export_hf refuses {flag}: {result.stderr.strip()}")
    data = bytearray(open(trained, "rb").read())
    data[2000] ^= 1
    open(os.path.join(work, "corrupt.bin"), "wb").write(data)
    result = tool(EXPORT, os.path.join(work, "corrupt.bin"), os.path.join(work, "corrupt"))
    check(one_line_error(result, ["corrupt.bin", "CRC-32"]), f"export_hf, a corrupt model file: {result.stderr.strip()}")


def init_flags(work):
    prefix = os.path.join(work, "char")
    return ["--train", prefix + "_train.bin", "--val", prefix + "_val.bin", "--batch", 2, "--steps", 1,
            "--eval-interval", 1, "--eval-steps", 1]


def test_init(work, byte_tok, build, imported):
    """train_gpt --init, one step at lr 0: the imported parameters are kept. In float, bit for bit.
    In bfloat16 the optimizer updates the float master weights (the checkpoint's MAST section),
    which stay the imported values bit for bit, and stores each in bfloat16 by stochastic
    rounding: the parameter block holds, for each imported value, itself when it is exactly
    bfloat16, else one of the two bfloat16 values around it."""
    out = os.path.join(work, "init")
    result = run(build.train_gpt, "--init", imported, "--tokenizer", byte_tok, "--out", out, "--lr", 0, "--min-lr", 0,
                 "--dropout", 0, *init_flags(work))
    kept, said = False, "bit for bit" if build.exact else "master weights bit for bit, stored bfloat16 a neighbour"
    if result.returncode == 0:
        _, before, _ = hf_files.read_model_file(imported)
        config, after, sections = hf_files.read_model_file(os.path.join(out, "latest.bin"))
        imported_bits = np.concatenate([before[k].ravel() for k in before]).view(np.uint32)
        stored_bits = np.concatenate([after[k].ravel() for k in before]).view(np.uint32)
        if build.exact:
            kept = np.array_equal(stored_bits, imported_bits)
        else:
            master = np.frombuffer(sections.get(b"MAST", b""), "<u4")
            below = imported_bits & 0xFFFF0000  # the bfloat16 value toward zero; + 0x10000 the one away
            neighbour = (stored_bits == below) | ((stored_bits == below + 0x10000) & (below != imported_bits))
            kept = np.array_equal(master, imported_bits) and bool(neighbour.all())
        kept = kept and config["dim"] == 32 and config["dropout"] == 0
    check(kept, f"{build.name}: train_gpt --init, one step at lr 0 keeps the imported parameters ({said}), dropout "
                f"set to 0 {result.stderr[-200:]}")


def test_init_refusals(work, byte_tok, build, imported):
    out, common = os.path.join(work, "init"), init_flags(work)
    other = os.path.join(work, "other.tok")
    run(TOKENIZER, "train", "--input", CORPUS, "--vocab-size", 300, "--output", other)
    result = run(build.train_gpt, "--init", imported, "--tokenizer", other, "--out", out + "2", *common)
    check(one_line_error(result, ["--init", "vocab size 257", "300 tokens"]), f"train_gpt --init, other vocabulary: "
                                                                                f"{result.stderr.strip()}")
    result = run(build.train_gpt, "--init", imported, "--tokenizer", byte_tok, "--out", out + "3", "--layers", 3, *common)
    check(one_line_error(result, ["--init", "--layers differ"]), f"train_gpt --init --layers 3: {result.stderr.strip()}")
    result = run(build.train_gpt, "--init", os.path.join(work, "missing.bin"), "--tokenizer", byte_tok, "--out",
                 out + "4", *common)
    check(one_line_error(result, ["missing.bin"]), f"train_gpt --init, a missing file: {result.stderr.strip()}")


# ------------------------------------------------------------------------------------------------
# Part 2: the GPT-2 tokenizer

def reference_encode(data, vocab, ranks, cache):
    """GPT-2's encoder: the text split by its regex (invalid UTF-8 bytes kept as lone surrogates,
    one character each), then BPE in each piece, merging the lowest-ranked pair first."""
    to_text = hf_files.bytes_to_unicode()
    ids = []
    pieces = data.decode("utf-8", "surrogateescape").split(hf_files.END_OF_TEXT)
    for number, piece in enumerate(pieces):
        if number:
            ids.append(vocab[hf_files.END_OF_TEXT])
        for word in GPT2_PATTERN.findall(piece):
            if word not in cache:
                parts = [to_text[b] for b in word.encode("utf-8", "surrogateescape")]
                while len(parts) > 1:
                    pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
                    rank, _ = min(pairs)
                    if rank == 1 << 30:
                        break
                    merged, i = [], 0
                    while i < len(parts):
                        if i + 1 < len(parts) and ranks.get((parts[i], parts[i + 1])) == rank:
                            merged.append(parts[i] + parts[i + 1])
                            i += 2
                        else:
                            merged.append(parts[i])
                            i += 1
                    parts = merged
                cache[word] = [vocab[p] for p in parts]
            ids += cache[word]
    return ids


def train_reference_bpe(text, merges_wanted):
    """A GPT-2-style byte-level BPE trained the plain way (for vocab.json and merges.txt without
    the `tokenizers` package). Ids are numbered as `tokenizers` numbers them: end-of-text 0, the
    256 byte characters in character order, then the merges."""
    to_text = hf_files.bytes_to_unicode()
    words = Counter(tuple(to_text[b] for b in w.encode()) for w in GPT2_PATTERN.findall(text))
    merges = []
    for _ in range(merges_wanted):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        rewritten = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            rewritten[tuple(out)] += count
        words = rewritten
    vocab = {hf_files.END_OF_TEXT: 0}
    for character in sorted(to_text.values()):
        vocab[character] = len(vocab)
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return vocab, merges


def adversarial_text():
    return ("1234567890" * 300 + " 3.14159 1,000,000 ９８７ ٣٤٥ Ⅻ ½ " +
            "Hello мир 世界 مرحبا שלום नमस्ते 안녕하세요 こんにちは ελληνικά " +
            "👍🏽 👨‍👩‍👧 🇫🇷 ❤️ 🤖🤖🤖 " +
            "I'm you'll he's they've we'd it'd 'S 'LL 'tis ''s '' 're've don't can't " +
            "a  b   c    \n\n\n   d\t\t \r\n  \n \u3000 x\u00a0y \u2028 z\u0085w \x1c\x1d\x1e\x1f " +
            "<|endoftext|>after<|endoftext|><|endoftext|>  <|endo " + "!!!???... ---- ____ \"quoted\" (paren) " +
            " " * 50 + "\n" * 30 + "end  ")


def our_encode(tok_path, data, work):
    """Our ids for `data`, through `tokenizer encode`, and its speed in MB/s: the bytes over the
    CPU time of the whole process (reading, encoding, writing), which a busy machine's other
    processes do not inflate as they do the wall-clock time it reports."""
    text_path, prefix = os.path.join(work, "text.txt"), os.path.join(work, "encoded")
    open(text_path, "wb").write(data)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run(TOKENIZER, "encode", "--tokenizer", tok_path, "--input", text_path, "--output", prefix,
                 "--val-fraction", 0)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if result.returncode != 0:
        print(result.stderr)
        return [], 0.0
    raw = open(prefix + "_train.bin", "rb").read()
    version = struct.unpack_from("<i", raw, 4)[0]
    ids = np.frombuffer(raw, "<u2" if version == 1 else "<u4", offset=1024).tolist()
    return ids, len(data) / 1e6 / max(seconds, 1e-3)


def compare_encodings(name, tok_path, vocab, merges, texts, work, other=None):
    ranks = {pair: rank for rank, pair in enumerate(merges or [])}
    cache = {}
    for what, data in texts:
        ours, _ = our_encode(tok_path, data, work)
        theirs = other(data) if other else reference_encode(data, vocab, ranks, cache)
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        check(ours == theirs, f"{name}: {what} ({len(data)} bytes, {len(theirs)} tokens) encodes to the same ids"
                              + ("" if ours == theirs else f"; first difference at token {first}: "
                                 f"{ours[first:first + 5]} vs {theirs[first:first + 5]}"))


def test_tokenizer_reference(work, corpus):
    vocab, merges = train_reference_bpe(corpus[:60000].decode(), 150)
    directory = os.path.join(work, "gpt2_tok")
    os.makedirs(directory, exist_ok=True)
    json.dump(vocab, open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8"), ensure_ascii=False)
    open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8").write(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok_data = hf_files.tok_from_gpt2(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"))
    tok_path = os.path.join(work, "gpt2.tok")
    open(tok_path, "wb").write(tok_data)
    back_vocab, back_merges = hf_files.gpt2_from_tok(tok_data, tok_path)
    check(back_vocab == vocab and back_merges == "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
          f"GPT-2 tokenizer: vocab.json + merges.txt -> .tok -> vocab.json + merges.txt is the identity "
          f"({len(vocab)} tokens, end-of-text id 0)")
    rng = random.Random(5)
    random_bytes = bytes(rng.randrange(256) for _ in range(100000))
    mixed = "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0x800), rng.randrange(0x3000, 0xA000),
                                    rng.randrange(0x1F300, 0x1FA00), rng.choice([32, 10, 9, 0x2019, 39])]))
                    for _ in range(30000))
    invalid = b"ab\xed\xa0\x80cd \xc0\x80 \xf4\x90\x80\x80 x\xe2\x82 \xf0\x9f\x98 caf\xc3\xa9\xff\xfe 's\xe2\x82"
    texts = [("the corpus", corpus), ("random bytes", random_bytes), ("random code points", mixed.encode()),
             ("adversarial text", adversarial_text().encode()), ("invalid UTF-8", invalid), ("empty text", b"")]
    compare_encodings("GPT-2 tokenizer vs Python reference (regex + BPE)", tok_path, vocab, merges, texts, work)
    decoded = run(TOKENIZER, "decode", "--tokenizer", tok_path, "--input", os.path.join(work, "encoded_train.bin"))
    check(decoded.returncode == 0, "GPT-2 tokenizer: token files made with it decode")
    for what, edit, words in (
            ("an id table that is not a permutation", lambda d: d[:-8] + d[-4:] + d[-4:], ["not a permutation"]),
            ("an unknown pretokenizer", lambda d: d[:20] + struct.pack("<i", 7) + d[24:], ["pretokenizer 7"]),
            ("a truncated id table", lambda d: d[:-10], ["truncated", "token ids"])):
        bad = os.path.join(work, "bad.tok")
        open(bad, "wb").write(edit(tok_data))
        result = run(TOKENIZER, "encode", "--tokenizer", bad, "--input", CORPUS, "--output", os.path.join(work, "bad"))
        check(one_line_error(result, ["bad.tok"] + words), f"GPT-2 tokenizer file with {what}: {result.stderr.strip()}")
    # Speed is a benchmark's figure, not a test's: reported here, asserted nowhere.
    speeds = [our_encode(tok_path, corpus * 4, work)[1] for _ in range(3)]
    print(f"note GPT-2 tokenizer: encoding speed {max(speeds):.1f} MB/s on 4.5 MB of text "
          f"(CPU time of the whole `tokenizer encode`, best of 3)")
    return tok_path, directory


def test_tokenizers_package(work, corpus):
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        skip(4, "the `tokenizers` package is not installed (pip install tokenizers==0.13.3)")
        return
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=[hf_files.END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([corpus.decode()], trainer)
    directory = os.path.join(work, "hf_tok")
    os.makedirs(directory, exist_ok=True)
    hf.model.save(directory)
    tok_path = os.path.join(work, "hf.tok")
    open(tok_path, "wb").write(hf_files.tok_from_gpt2(os.path.join(directory, "vocab.json"),
                                                      os.path.join(directory, "merges.txt")))
    rng = random.Random(6)
    random_text = bytes(rng.randrange(256) for _ in range(100000)).decode("utf-8", "replace").encode()
    mixed = "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0x800), rng.randrange(0x3000, 0xA000),
                                    rng.randrange(0x1F300, 0x1FA00), rng.choice([32, 10, 9, 39])]))
                    for _ in range(30000)).encode()
    texts = [("the corpus", corpus), ("random bytes (as UTF-8 with replacements)", random_text),
             ("random code points", mixed), ("adversarial text", adversarial_text().encode())]
    compare_encodings("GPT-2 tokenizer vs `tokenizers`' byte-level BPE", tok_path, None, None, texts, work,
                      other=lambda data: hf.encode(data.decode()).ids)


# ------------------------------------------------------------------------------------------------
# Part 3: transformers

def transformers_logits(model, tokens):
    import torch
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens, np.int64)[None])).logits[0].double().numpy()


def numpy_weights(model):
    """A transformers GPT-2's tensors as the numpy GPT-2 takes them."""
    return {name: value.detach().numpy() for name, value in model.state_dict().items()}


def test_transformers(work, byte_tok, build, trained, exported):
    try:
        import torch
        import transformers
    except ImportError:
        skip(5, "the `transformers` package is not installed (pip install transformers==4.30.2 safetensors==0.3.1)")
        return
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(vocab_size=257, n_positions=32, n_embd=48, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # larger weights than GPT-2's initialisation, so that logits differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf, weights = config.to_dict(), numpy_weights(model)
    for safe in (True, False):
        directory = os.path.join(work, "hf_model_" + ("safetensors" if safe else "bin"))
        model.save_pretrained(directory, safe_serialization=safe)
        imported = os.path.join(work, "hf_imported.bin")
        result = tool(IMPORT, directory, imported, "--tokenizer", byte_tok)
        tokens, logits = our_logits(build, imported, "Now is the winter", work)
        source = "model.safetensors" if safe else "pytorch_model.bin"
        if result.returncode != 0 or tokens is None:
            check(False, f"{build.name}: transformers: import of save_pretrained's {source} {result.stderr.strip()}")
            continue
        bound = build.check_logits(f"transformers: GPT2LMHeadModel from {source} imported", logits,
                                   transformers_logits(model, tokens), weights, hf, tokens)
    if tokens is None:
        return
    greedy = our_greedy(build, imported, "Now is the winter", 16, work)
    with torch.no_grad():
        sequence = model.generate(torch.tensor(tokens[None].astype(np.int64)), max_new_tokens=16, do_sample=False,
                                  pad_token_id=0)[0].tolist()
    build.check_greedy("transformers: GPT2LMHeadModel.generate", greedy, sequence[len(tokens):], bound,
                       lambda n: transformers_logits(model, sequence[:len(tokens) + n])[-1])
    untied = train_tiny(build, work, byte_tok, "untied", "--untied")
    tool(EXPORT, untied, os.path.join(work, "untied_hf"))
    for what, ours, directory in (("an exported Tricycle model", trained, exported),
                                  ("an untied Tricycle model, exported with lm_head.weight", untied,
                                   os.path.join(work, "untied_hf"))):
        loaded = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
        tokens, logits = our_logits(build, ours, "ROMEO:", work)
        if tokens is None:
            check(False, f"{build.name}: transformers: {what}: inference --logits-out")
            continue
        build.check_logits(f"transformers: {what} loads with from_pretrained", logits,
                           transformers_logits(loaded, tokens), numpy_weights(loaded), loaded.config.to_dict(), tokens)


def main():
    work = tempfile.mkdtemp(prefix="tricycle_hf_")
    try:
        corpus = open(CORPUS, "rb").read()
        byte_tok = os.path.join(work, "bytes.tok")
        run(TOKENIZER, "train", "--bytes", "--output", byte_tok)
        test_safetensors(work)
        for tool in ("import_hf.py", "export_hf.py"):  # python3 -S: no site packages, so no numpy
            r = subprocess.run([sys.executable, "-S", os.path.join(ROOT, "tools", tool), "--help"], capture_output=True)
            check(r.returncode == 0 and b"usage:" in r.stdout, f"tools/{tool} --help answers without numpy")
        for build in (Build("float"), Build("bf16")):
            folder = os.path.join(work, build.precision)
            os.makedirs(folder)
            source, imported = test_import_numpy(folder, byte_tok, build)
            trained, exported = test_round_trip(folder, byte_tok, build)
            test_init(folder, byte_tok, build, imported)
            test_transformers(folder, byte_tok, build, trained, exported)
            if build.exact:  # the refusals do not depend on the precision
                test_bad_inputs(folder, byte_tok, source)
                test_export_refusals(folder, trained)
                test_init_refusals(folder, byte_tok, build, imported)
        test_tokenizer_reference(work, corpus)
        test_tokenizers_package(work, corpus)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
