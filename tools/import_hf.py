#!/usr/bin/python3
"""Turns a Hugging Face GPT-2 checkpoint directory into a Tricycle model file.

usage: tools/import_hf.py DIR OUT.bin [--tokenizer FILE.tok]

DIR holds config.json and model.safetensors (read with numpy alone) or pytorch_model.bin (read
with torch). GPT-2 maps onto Tricycle's layernorm + GELU (tanh) + learned positions preset; its
Conv1D weights are stored (in, out) and are transposed to Tricycle's (out, in). A config field
Tricycle cannot represent is refused, naming it.

The model file carries a tokenizer (inference and train_gpt --init need it): with vocab.json and
merges.txt in DIR, they become a GPT-2-style tokenizer, written also to OUT.tok (OUT.bin's name
with .tok); --tokenizer FILE.tok takes that tokenizer instead. Every error is one line on stderr
and exit status 1.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_files import HfError, command_line, model_file_bytes, read_safetensors, run_tool, tok_from_gpt2, \
    write_atomic  # noqa: E402

import numpy as np  # noqa: E402 (after hf_files, which says so when numpy is missing)

# GPT-2 config fields whose only value Tricycle can represent, with that value (None: absent).
REQUIRED = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "layer_norm_epsilon": (1e-5,),
            "scale_attn_weights": (True, None), "scale_attn_by_inverse_layer_idx": (False, None),
            "add_cross_attention": (False, None)}


def tricycle_config(hf, path):
    """Tricycle's config from GPT-2's config.json, or an error naming the field."""
    if hf.get("model_type") != "gpt2":
        raise HfError(f"{path}: model_type is {hf.get('model_type')!r}; only 'gpt2' can be imported")
    for field, allowed in REQUIRED.items():
        if hf.get(field) not in allowed:
            raise HfError(f"{path}: {field} is {hf.get(field)!r}; Tricycle supports "
                          f"{' or '.join(repr(a) for a in allowed if a is not None)} only")
    dim = hf["n_embd"]
    inner = hf.get("n_inner") or 4 * dim
    if inner % dim:
        raise HfError(f"{path}: n_inner {inner} is not a multiple of n_embd {dim} (Tricycle's MLP is "
                      f"mlp_ratio * dim)")
    if hf.get("embd_pdrop", 0.1) != hf.get("resid_pdrop", 0.1):
        raise HfError(f"{path}: embd_pdrop {hf.get('embd_pdrop')} differs from resid_pdrop "
                      f"{hf.get('resid_pdrop')}; Tricycle has one dropout for both")
    return dict(vocab_size=hf["vocab_size"], context=hf["n_positions"], dim=dim, layers=hf["n_layer"],
                heads=hf["n_head"], mlp_ratio=inner // dim, rmsnorm=False, swiglu=False, rotary=False,
                tied=hf.get("tie_word_embeddings", True), dropout=float(hf.get("resid_pdrop", 0.1)),
                attention_dropout=float(hf.get("attn_pdrop", 0.1)))


def read_weights(directory):
    """{name: float32 array} from DIR/model.safetensors or DIR/pytorch_model.bin."""
    path = os.path.join(directory, "model.safetensors")
    if os.path.exists(path):
        return read_safetensors(path), path
    path = os.path.join(directory, "pytorch_model.bin")
    if not os.path.exists(path):
        raise HfError(f"{directory}: has neither model.safetensors nor pytorch_model.bin")
    try:
        import torch
    except ImportError:
        raise HfError(f"{path}: reading pytorch_model.bin needs torch (apt-get install python3-torch); "
                      f"model.safetensors needs only numpy")
    try:
        state = torch.load(path, map_location="cpu")
    except Exception as error:
        raise HfError(f"{path}: torch.load failed: {str(error).splitlines()[0]}")
    return {name: t.float().numpy() for name, t in state.items()}, path


def tricycle_parameters(weights, config, path):
    """Tricycle's parameters by name from GPT-2's tensors (names with or without 'transformer.')."""
    weights = {name.removeprefix("transformer."): w for name, w in weights.items()
               if not name.endswith((".attn.bias", ".attn.masked_bias"))}  # causal-mask buffers
    C, V, H = config["dim"], config["vocab_size"], config["mlp_ratio"] * config["dim"]
    used = set()

    def take(name, shape, transpose=False):
        if name not in weights:
            raise HfError(f"{path}: missing tensor {name}")
        value = weights[name]
        if tuple(value.shape) != shape:
            raise HfError(f"{path}: tensor {name} has shape {tuple(value.shape)}, expected {shape}")
        used.add(name)
        return np.ascontiguousarray(value.T if transpose else value, dtype=np.float32)

    params = {"wte": take("wte.weight", (V, C)), "wpe": take("wpe.weight", (config["context"], C)),
              "final_norm.weight": take("ln_f.weight", (C,)), "final_norm.bias": take("ln_f.bias", (C,))}
    for layer in range(config["layers"]):
        g, t = f"h.{layer}.", f"layer{layer}."
        params.update({t + "norm1.weight": take(g + "ln_1.weight", (C,)), t + "norm1.bias": take(g + "ln_1.bias", (C,)),
                       t + "attn.qkv.weight": take(g + "attn.c_attn.weight", (C, 3 * C), True),
                       t + "attn.qkv.bias": take(g + "attn.c_attn.bias", (3 * C,)),
                       t + "attn.proj.weight": take(g + "attn.c_proj.weight", (C, C), True),
                       t + "attn.proj.bias": take(g + "attn.c_proj.bias", (C,)),
                       t + "norm2.weight": take(g + "ln_2.weight", (C,)), t + "norm2.bias": take(g + "ln_2.bias", (C,)),
                       t + "mlp.fc.weight": take(g + "mlp.c_fc.weight", (C, H), True),
                       t + "mlp.fc.bias": take(g + "mlp.c_fc.bias", (H,)),
                       t + "mlp.proj.weight": take(g + "mlp.c_proj.weight", (H, C), True),
                       t + "mlp.proj.bias": take(g + "mlp.c_proj.bias", (C,))})
    if "lm_head.weight" in weights:
        head = take("lm_head.weight", (V, C))
        if not config["tied"]:
            params["lm_head"] = head
        elif not np.array_equal(head, params["wte"]):
            raise HfError(f"{path}: tie_word_embeddings is true but lm_head.weight differs from wte.weight")
    elif not config["tied"]:
        raise HfError(f"{path}: missing tensor lm_head.weight (tie_word_embeddings is false)")
    extra = sorted(set(weights) - used)
    if extra:
        raise HfError(f"{path}: unexpected tensor {extra[0]} (and {len(extra) - 1} more)")
    for name, value in params.items():
        if not np.isfinite(value).all():
            raise HfError(f"{path}: tensor for {name} holds values that are not finite")
    return params


def tokenizer_bytes(directory, out, tokenizer):
    """The tokenizer file to embed: --tokenizer's, or DIR's vocab.json + merges.txt (also written
    to OUT.tok)."""
    if tokenizer:
        try:
            return open(tokenizer, "rb").read()
        except OSError as error:
            raise HfError(f"{tokenizer}: cannot read the tokenizer file ({error.strerror})")
    vocab, merges = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    if not (os.path.exists(vocab) and os.path.exists(merges)):
        raise HfError(f"{directory}: has no vocab.json and merges.txt; give --tokenizer FILE.tok")
    data = tok_from_gpt2(vocab, merges)
    tok_path = os.path.splitext(out)[0] + ".tok"
    write_atomic(tok_path, data)
    print(f"import_hf: wrote the GPT-2 tokenizer to {tok_path}")
    return data


def main(argv):
    (directory, out), options = command_line(argv, "tools/import_hf.py DIR OUT.bin [--tokenizer FILE.tok]",
                                             ["--tokenizer"])
    tokenizer = options.get("--tokenizer")
    config_path = os.path.join(directory, "config.json")
    try:
        hf = json.load(open(config_path))
    except OSError as error:
        raise HfError(f"{config_path}: cannot read it ({error.strerror})")
    except ValueError as error:
        raise HfError(f"{config_path}: not JSON ({error})")
    try:
        config = tricycle_config(hf, config_path)
    except KeyError as error:
        raise HfError(f"{config_path}: missing field {error}")
    weights, weights_path = read_weights(directory)
    params = tricycle_parameters(weights, config, weights_path)
    tok = tokenizer_bytes(directory, out, tokenizer)
    vocab_size = int.from_bytes(tok[8:12], "little")
    if vocab_size != config["vocab_size"]:
        raise HfError(f"{tokenizer or directory}: the tokenizer has {vocab_size} tokens, the model's "
                      f"vocab_size is {config['vocab_size']}")
    write_atomic(out, model_file_bytes(config, params, [(b"TOKN", tok)]))
    print(f"import_hf: wrote {out}: {config['layers']} layers, dim {config['dim']}, {config['heads']} heads, "
          f"context {config['context']}, vocab {config['vocab_size']}")


if __name__ == "__main__":
    run_tool(main)
