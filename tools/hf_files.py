"""Readers and writers shared by tools/import_hf.py and tools/export_hf.py: safetensors, Tricycle
model files and .tok files (formats in README.md), and GPT-2's vocab.json/merges.txt.

Needs only numpy. Every error is a HfError whose text is one line naming the file.
"""
import json
import math
import os
import re
import signal
import struct
import sys
import zlib

signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # output into `| head` ends the tool quietly
if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:  # before numpy: the help needs none
    print(sys.modules["__main__"].__doc__.strip())
    sys.exit(0)
try:
    import numpy as np
except ImportError:  # e.g. a python3 of its own (pyenv, conda) that lacks what apt installed
    sys.exit(f"{os.path.splitext(os.path.basename(sys.argv[0]))[0]}: error: needs numpy, which "
             f"{sys.executable} cannot import (apt-get install python3-numpy; run it with /usr/bin/python3)")


class HfError(Exception):
    pass


def command_line(argv, usage, options=()):
    """(the positional arguments, {option: value}) of a tool's command line: `options` are the
    flags that take a value; any other flag, or a count of positional arguments other than
    `usage` names, is a HfError. usage: e.g. "tools/export_hf.py IN.bin DIR"."""
    argv, values = list(argv), {}
    for option in options:
        if option in argv:
            i = argv.index(option)
            if i + 1 >= len(argv):
                raise HfError(f"{option} needs a value (see --help)")
            values[option] = argv.pop(i + 1)
            argv.pop(i)
    unknown = [a for a in argv if a.startswith("-")]
    if unknown:
        raise HfError(f"unknown flag {unknown[0]} (see --help)")
    if len(argv) != len(re.sub(r"\[.*?\]", "", usage).split()) - 1:
        raise HfError(f"usage: {usage} (see --help)")
    return argv, values


def run_tool(main):
    """Runs main(argv) for a tool (its --help was answered on import); a HfError is one line on
    stderr, exit 1."""
    name = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    try:
        main(sys.argv[1:])
    except HfError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        sys.exit(1)


def write_atomic(path, data):
    """Writes to a temporary file next to `path` and renames it over `path`."""
    temporary = f"{path}.tmp.{os.getpid()}"
    with open(temporary, "wb") as out:
        out.write(data)
    os.replace(temporary, path)


# ------------------------------------------------------------------------------------------------
# safetensors: 8-byte little-endian header length, a JSON header (name -> dtype, shape and
# data_offsets into the bytes after the header; "__metadata__" optional), then the raw tensors.

SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def read_safetensors(path):
    """{name: float32 array} from a .safetensors file."""
    data = open(path, "rb").read()
    if len(data) < 8:
        raise HfError(f"{path}: truncated safetensors file: {len(data)} bytes, no header length")
    (header_length,) = struct.unpack_from("<Q", data, 0)
    if header_length > len(data) - 8:
        raise HfError(f"{path}: truncated safetensors file: the header needs {header_length} bytes, "
                      f"{len(data) - 8} follow")
    try:
        header = json.loads(data[8:8 + header_length])
    except ValueError as error:
        raise HfError(f"{path}: the safetensors header is not JSON ({error})")
    if not isinstance(header, dict):
        raise HfError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    body = memoryview(data)[8 + header_length:]
    tensors = {}
    for name, info in header.items():
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if dtype not in SAFETENSORS_DTYPES:
            raise HfError(f"{path}: tensor {name} has dtype {dtype}, expected one of "
                          f"{', '.join(SAFETENSORS_DTYPES)}")
        shape, (begin, end) = info["shape"], info["data_offsets"]
        itemsize = np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
        if end - begin != math.prod(shape) * itemsize or begin < 0:
            raise HfError(f"{path}: tensor {name}: offsets {begin}..{end} do not fit shape {shape}")
        if end > len(body):
            raise HfError(f"{path}: truncated safetensors file: tensor {name} ends at byte {end} "
                          f"of the data, which has {len(body)}")
        values = np.frombuffer(body[begin:end], dtype=SAFETENSORS_DTYPES[dtype]).reshape(shape)
        if dtype == "BF16":  # bfloat16 is the top half of a float32
            values = (values.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = values.astype(np.float32)
    return tensors


def safetensors_bytes(tensors):
    """{name: array} -> the bytes of a .safetensors file (float32 tensors, in name order)."""
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        values = np.ascontiguousarray(tensors[name], dtype="<f4")
        header[name] = {"dtype": "F32", "shape": list(values.shape),
                        "data_offsets": [offset, offset + values.nbytes]}
        chunks.append(values.tobytes())
        offset += values.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


# ------------------------------------------------------------------------------------------------
# Tricycle model files, version 2

MODEL_MAGIC, MODEL_VERSION = 0x59435254, 2


def parameter_layout(config):
    """[(name, shape)] in buffer order: the decayed weight matrices first, each group in model
    order (the order of gpt_parameter_layout in tricycle.cu)."""
    C, V, hidden = config["dim"], config["vocab_size"], config["mlp_ratio"] * config["dim"]
    layernorm = not config["rmsnorm"]
    fc_out = 2 * hidden if config["swiglu"] else hidden
    table = [("wte", (V, C), True)]
    if not config["rotary"]:
        table.append(("wpe", (config["context"], C), False))
    for layer in range(config["layers"]):
        p = f"layer{layer}."
        table += [(p + "norm1.weight", (C,), False)]
        table += [(p + "norm1.bias", (C,), False)] if layernorm else []
        table += [(p + "attn.qkv.weight", (3 * C, C), True), (p + "attn.qkv.bias", (3 * C,), False),
                  (p + "attn.proj.weight", (C, C), True), (p + "attn.proj.bias", (C,), False),
                  (p + "norm2.weight", (C,), False)]
        table += [(p + "norm2.bias", (C,), False)] if layernorm else []
        table += [(p + "mlp.fc.weight", (fc_out, C), True), (p + "mlp.fc.bias", (fc_out,), False),
                  (p + "mlp.proj.weight", (C, hidden), True), (p + "mlp.proj.bias", (C,), False)]
    table += [("final_norm.weight", (C,), False)]
    table += [("final_norm.bias", (C,), False)] if layernorm else []
    table += [] if config["tied"] else [("lm_head", (V, C), True)]
    return [(n, s) for n, s, d in table if d] + [(n, s) for n, s, d in table if not d]


def float_bits(value):
    return struct.unpack("<i", struct.pack("<f", value))[0]


def model_file_bytes(config, params, sections):
    """config dict, {name: array} and [(tag, bytes)] -> a model file's bytes."""
    directory, values = b"", []
    for name, shape in parameter_layout(config):
        array = np.asarray(params[name], dtype="<f4")
        assert array.shape == shape, (name, array.shape, shape)
        directory += name.encode().ljust(48, b"\0") + struct.pack("<4i", len(shape), shape[0],
                                                                  shape[1] if len(shape) > 1 else 0, 0)
        values.append(array.tobytes())
    parameters = b"".join(values)
    header = [0] * 256
    header[:16] = [MODEL_MAGIC, MODEL_VERSION, config["vocab_size"], config["context"], config["dim"],
                   config["layers"], config["heads"], config["mlp_ratio"], int(config["rmsnorm"]),
                   int(config["swiglu"]), int(config["rotary"]), int(config["tied"]),
                   float_bits(config["dropout"]), float_bits(config["attention_dropout"]),
                   len(parameter_layout(config)), len(sections)]
    header[16:18] = struct.unpack("<2i", struct.pack("<q", len(parameters) // 4))
    signed = lambda crc: struct.unpack("<i", struct.pack("<I", crc))[0]
    header[18], header[19] = signed(zlib.crc32(directory)), signed(zlib.crc32(parameters))
    header[20] = signed(zlib.crc32(struct.pack("<256i", *header)))
    out = struct.pack("<256i", *header) + directory + parameters
    for tag, payload in sections:
        out += tag + struct.pack("<qI", len(payload), zlib.crc32(payload)) + payload
    return out


def read_model_file(path):
    """(config, {name: float32 array}, {tag: bytes}) from a Tricycle model file, checksums checked."""
    data = open(path, "rb").read()
    if len(data) < 1024:
        raise HfError(f"{path}: truncated model file: {len(data)} bytes, the header alone is 1024")
    header = struct.unpack_from("<256i", data, 0)
    if header[0] != MODEL_MAGIC or header[1] != MODEL_VERSION:
        raise HfError(f"{path}: not a version 2 Tricycle model file (magic 0x{header[0] & 0xFFFFFFFF:08x}, "
                      f"version {header[1]})")
    zeroed = list(header)
    zeroed[20] = 0
    if header[20] & 0xFFFFFFFF != zlib.crc32(struct.pack("<256i", *zeroed)):
        raise HfError(f"{path}: the header's CRC-32 does not match")
    as_float = lambda bits: struct.unpack("<f", struct.pack("<i", bits))[0]
    config = dict(vocab_size=header[2], context=header[3], dim=header[4], layers=header[5], heads=header[6],
                  mlp_ratio=header[7], rmsnorm=bool(header[8]), swiglu=bool(header[9]),
                  rotary=bool(header[10]), tied=bool(header[11]), dropout=as_float(header[12]),
                  attention_dropout=as_float(header[13]))
    layout = parameter_layout(config)
    offset = 1024 + 64 * len(layout)
    count = sum(math.prod(shape) for _, shape in layout)
    if len(data) < offset + 4 * count:
        raise HfError(f"{path}: truncated model file: {len(data)} bytes, its parameters end at byte "
                      f"{offset + 4 * count}")
    if header[18] & 0xFFFFFFFF != zlib.crc32(data[1024:offset]) or \
            header[19] & 0xFFFFFFFF != zlib.crc32(data[offset:offset + 4 * count]):
        raise HfError(f"{path}: the directory's or the parameters' CRC-32 does not match")
    params = {}
    for name, shape in layout:
        size = math.prod(shape)
        params[name] = np.frombuffer(data, dtype="<f4", count=size, offset=offset).reshape(shape)
        offset += 4 * size
    sections = {}
    for _ in range(header[15]):
        tag = data[offset:offset + 4]
        length, crc = struct.unpack_from("<qI", data, offset + 4)
        payload = data[offset + 16:offset + 16 + length]
        if len(payload) != length or zlib.crc32(payload) != crc:
            raise HfError(f"{path}: section {tag!r} is truncated or its CRC-32 does not match")
        sections[tag] = payload
        offset += 16 + length
    return config, params, sections


# ------------------------------------------------------------------------------------------------
# Tokenizer files (.tok) and GPT-2's vocab.json / merges.txt

TOKENIZER_MAGIC, END_OF_TEXT = 0x4B544354, "<|endoftext|>"
PRETOKENIZER_TRICYCLE, PRETOKENIZER_GPT2 = 0, 1


def bytes_to_unicode():
    """GPT-2's map from each byte to a printable character: printable Latin-1 bytes stand for
    themselves, the other 68 take the characters from U+0100 up, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    characters, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            characters[byte] = chr(byte)
        else:
            characters[byte] = chr(256 + extra)
            extra += 1
    return characters


def tok_from_gpt2(vocab_path, merges_path):
    """The .tok (version 2, GPT-2 pretokenizer) bytes of a vocab.json + merges.txt pair."""
    byte_of = {character: byte for byte, character in bytes_to_unicode().items()}
    try:
        vocab = json.load(open(vocab_path, encoding="utf-8"))
    except ValueError as error:
        raise HfError(f"{vocab_path}: not JSON ({error})")
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise HfError(f"{vocab_path}: expected a JSON object of token -> integer id")
    lines = open(merges_path, encoding="utf-8").read().split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    slot_of = {bytes([b]): b for b in range(256)}  # token bytes -> place in merge order
    merges = []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise HfError(f"{merges_path}: line {number} is not two tokens separated by a space")
        try:
            left, right = (bytes(byte_of[c] for c in part) for part in parts)
        except KeyError as error:
            raise HfError(f"{merges_path}: merge '{line}' has {error} outside GPT-2's byte alphabet")
        if left not in slot_of or right not in slot_of:
            raise HfError(f"{merges_path}: merge '{line}' is not two tokens made by earlier merges")
        if left + right in slot_of:
            raise HfError(f"{merges_path}: merge '{line}' makes a token an earlier merge made")
        slot_of[left + right] = 256 + len(merges)
        merges.append((slot_of[left], slot_of[right]))
    to_text = bytes_to_unicode()
    ids = []
    for token in sorted(slot_of, key=slot_of.get):
        text = "".join(to_text[b] for b in token)
        if text not in vocab:
            raise HfError(f"{vocab_path}: has no token '{text}' (made by {merges_path})")
        ids.append(vocab[text])
    if END_OF_TEXT not in vocab:
        raise HfError(f"{vocab_path}: has no {END_OF_TEXT} token")
    ids.append(vocab[END_OF_TEXT])
    if sorted(ids) != list(range(len(vocab))):
        raise HfError(f"{vocab_path}: {len(vocab)} tokens with ids that are not 0..{len(vocab) - 1}, "
                      f"or more tokens than the 256 bytes, {len(merges)} merges and {END_OF_TEXT}")
    name = END_OF_TEXT.encode()
    ints = [TOKENIZER_MAGIC, 2, len(ids), len(merges), 1, PRETOKENIZER_GPT2]
    ints += [i for pair in merges for i in pair] + [ids[-1], len(name)]
    return struct.pack(f"<{len(ints)}i", *ints) + name + struct.pack(f"<{len(ids)}i", *ids)


def read_tok(data, path):
    """(pretokenizer, merges [(left, right)], end-of-text name, ids by slot) from .tok bytes."""
    try:
        magic, version, vocab_size, num_merges, num_special = struct.unpack_from("<5i", data, 0)
        offset, pretokenizer = 20, PRETOKENIZER_TRICYCLE
        if version == 2:
            (pretokenizer,) = struct.unpack_from("<i", data, offset)
            offset += 4
        pairs = struct.unpack_from(f"<{2 * num_merges}i", data, offset)
        offset += 8 * num_merges
        eot_id, name_length = struct.unpack_from("<2i", data, offset)
        name = data[offset + 8:offset + 8 + name_length].decode()
        offset += 8 + name_length
        ids = list(struct.unpack_from(f"<{vocab_size}i", data, offset)) if version == 2 else \
            list(range(vocab_size))
    except (struct.error, UnicodeDecodeError, ValueError):
        raise HfError(f"{path}: not a valid tokenizer file")
    if magic != TOKENIZER_MAGIC or version not in (1, 2) or num_special != 1:
        raise HfError(f"{path}: not a valid tokenizer file (magic, version or special tokens)")
    return pretokenizer, list(zip(pairs[::2], pairs[1::2])), name, ids


def gpt2_from_tok(data, path):
    """(vocab dict, merges.txt text) of a GPT-2-style tokenizer's .tok bytes."""
    pretokenizer, merges, name, ids = read_tok(data, path)
    if pretokenizer != PRETOKENIZER_GPT2:
        raise HfError(f"{path}: not a GPT-2-style tokenizer")
    to_text = bytes_to_unicode()
    texts = [to_text[b] for b in range(256)]
    lines = ["#version: 0.2"]
    for left, right in merges:
        lines.append(texts[left] + " " + texts[right])
        texts.append(texts[left] + texts[right])
    texts.append(name)
    vocab = {text: ids[slot] for slot, text in sorted(enumerate(texts), key=lambda x: ids[x[0]])}
    return vocab, "\n".join(lines) + "\n"
