#!/usr/bin/python3
"""Writes a Tricycle model file as a Hugging Face GPT-2 checkpoint directory.

usage: tools/export_hf.py IN.bin DIR

DIR gets config.json and model.safetensors, which transformers' GPT2LMHeadModel.from_pretrained
loads, and, when the model file carries a GPT-2-style tokenizer (one imported by
tools/import_hf.py), vocab.json and merges.txt. GPT-2 is layernorm + GELU (tanh) + learned
positions: a model with RMSNorm, SwiGLU or rotary positions is refused, naming the field (no
architecture in transformers 4.30 has those together with Tricycle's biases). Needs numpy only.
Every error is one line on stderr and exit status 1.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_files import END_OF_TEXT, HfError, command_line, gpt2_from_tok, read_model_file, read_tok, run_tool, \
    safetensors_bytes, write_atomic  # noqa: E402

import numpy as np  # noqa: E402 (after hf_files, which says so when numpy is missing)


def refuse_unrepresentable(config, path):
    for field, value, feature in (("norm", "rmsnorm", "RMSNorm"), ("activation", "swiglu", "SwiGLU"),
                                  ("rotary", "on", "rotary positions")):
        if config[{"norm": "rmsnorm", "activation": "swiglu", "rotary": "rotary"}[field]]:
            raise HfError(f"{path}: {field} is {value}; GPT-2 has layernorm, GELU and learned positions, "
                          f"and no architecture in transformers 4.30 has {feature} with Tricycle's biases")


def gpt2_config(config, eot_id):
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config["vocab_size"],
            "n_positions": config["context"], "n_ctx": config["context"], "n_embd": config["dim"],
            "n_layer": config["layers"], "n_head": config["heads"],
            "n_inner": config["mlp_ratio"] * config["dim"], "activation_function": "gelu_new",
            "resid_pdrop": config["dropout"], "embd_pdrop": config["dropout"],
            "attn_pdrop": config["attention_dropout"], "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
            "scale_attn_weights": True, "use_cache": True, "tie_word_embeddings": config["tied"],
            "bos_token_id": eot_id, "eos_token_id": eot_id, "torch_dtype": "float32"}


def gpt2_tensors(config, params):
    """GPT-2's tensors by name from Tricycle's parameters (linear weights transposed to Conv1D's
    (in, out))."""
    out = {"transformer.wte.weight": params["wte"], "transformer.wpe.weight": params["wpe"],
           "transformer.ln_f.weight": params["final_norm.weight"],
           "transformer.ln_f.bias": params["final_norm.bias"]}
    for layer in range(config["layers"]):
        g, t = f"transformer.h.{layer}.", f"layer{layer}."
        out.update({g + "ln_1.weight": params[t + "norm1.weight"], g + "ln_1.bias": params[t + "norm1.bias"],
                    g + "attn.c_attn.weight": params[t + "attn.qkv.weight"].T,
                    g + "attn.c_attn.bias": params[t + "attn.qkv.bias"],
                    g + "attn.c_proj.weight": params[t + "attn.proj.weight"].T,
                    g + "attn.c_proj.bias": params[t + "attn.proj.bias"],
                    g + "ln_2.weight": params[t + "norm2.weight"], g + "ln_2.bias": params[t + "norm2.bias"],
                    g + "mlp.c_fc.weight": params[t + "mlp.fc.weight"].T,
                    g + "mlp.c_fc.bias": params[t + "mlp.fc.bias"],
                    g + "mlp.c_proj.weight": params[t + "mlp.proj.weight"].T,
                    g + "mlp.c_proj.bias": params[t + "mlp.proj.bias"]})
    if not config["tied"]:
        out["lm_head.weight"] = params["lm_head"]
    return {name: np.ascontiguousarray(value) for name, value in out.items()}


def main(argv):
    (path, directory), _ = command_line(argv, "tools/export_hf.py IN.bin DIR")
    try:
        config, params, sections = read_model_file(path)
    except OSError as error:
        raise HfError(f"{path}: cannot read it ({error.strerror})")
    refuse_unrepresentable(config, path)
    tok = sections.get(b"TOKN")
    eot_id = read_tok(tok, path)[3][-1] if tok else config["vocab_size"] - 1
    os.makedirs(directory, exist_ok=True)
    write_atomic(os.path.join(directory, "config.json"), json.dumps(gpt2_config(config, eot_id), indent=2).encode())
    write_atomic(os.path.join(directory, "model.safetensors"), safetensors_bytes(gpt2_tensors(config, params)))
    written = "config.json, model.safetensors"
    if tok and read_tok(tok, path)[0] == 1:
        vocab, merges = gpt2_from_tok(tok, path)
        write_atomic(os.path.join(directory, "vocab.json"), json.dumps(vocab, ensure_ascii=False).encode())
        write_atomic(os.path.join(directory, "merges.txt"), merges.encode())
        written += ", vocab.json, merges.txt"
    elif tok:
        written += f" (the tokenizer is Tricycle's own, not GPT-2's: no vocab.json; {END_OF_TEXT} is id {eot_id})"
    print(f"export_hf: wrote {written} to {directory}")


if __name__ == "__main__":
    run_tool(main)
