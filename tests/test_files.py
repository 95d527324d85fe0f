#!/usr/bin/env python3
"""tests/test_files.py — the programs against hostile files and flags.

Part 1 crafts one file (or flag) per known way to break a reader: a tokenizer whose merges double a
token's length, checkpoint headers whose sizes overflow or outgrow the file, a section longer than
the file, NaN weights, an impossible training state, a batch too big for memory, two runs in one
folder, corruption that keeps the structure, mismatched tokenizers and token files, a token file
cut short while training. Each must end in a one-line error naming the file or flag, exit status 1.

Part 2 is a seeded fuzz test: a few hundred mutants (bit flips, truncations, field edits, with the
checksums recomputed so that the deeper checks are reached too) of a tokenizer, a token file and a
checkpoint, run through the programs. Every run must end in success or a clean error: never a
signal, a sanitizer report, a hang or an allocation beyond the memory limit.

Runs under a 1 GiB address-space limit, except in the sanitizer build (AddressSanitizer reserves
terabytes of address space; its own checks stand in there). The file formats are the README's.
"""
import os
import random
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER, TRAIN_GPT, INFERENCE = (os.path.join(ROOT, p) for p in ("tokenizer", "train_gpt", "inference"))
SANITIZED = b"libasan" in subprocess.run(["ldd", INFERENCE], capture_output=True).stdout
MEMORY_LIMIT = 1 << 30
passed = failed = 0


def check(ok, what):
    global passed, failed
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    passed, failed = passed + bool(ok), failed + (not ok)


def limit_memory():
    if not SANITIZED:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run(args, timeout=60, cwd=None):
    """(exit status, stderr text); a timeout is status 'timeout'."""
    try:
        r = subprocess.run(args, capture_output=True, timeout=timeout, preexec_fn=limit_memory, cwd=cwd)
    except subprocess.TimeoutExpired:
        return "timeout", ""
    return r.returncode, r.stderr.decode(errors="replace")


def clean_outcome(status, err):
    """Success, or exit status 1 with a one-line 'PROGRAM: error: ...' message; nothing else."""
    if status == 0:
        return "Sanitizer" not in err and "runtime error" not in err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    return status == 1 and len(lines) >= 1 and re.match(r"^\w+: error: ", lines[-1]) is not None \
        and "Sanitizer" not in err and "runtime error" not in err and "bad_alloc" not in err


def expect_error(what, args, expected, **kwargs):
    status, err = run(args, **kwargs)
    last = err.strip().splitlines()[-1] if err.strip() else ""
    ok = status == 1 and clean_outcome(status, err) and all(e in last for e in expected)
    check(ok, f"{what}: exit {status}, \"{last[:160]}\"" + ("" if ok else f" (expected it to mention {expected})"))


# ----------------------------------------------------------------------------------------------------
# The formats, as the README gives them

def model_parts(data):
    """Splits a model file into header ints, directory, parameters and [(tag, payload)]."""
    header = list(struct.unpack("<256i", data[:1024]))
    tensors, sections, count = header[14], header[15], struct.unpack("<q", data[64:72])[0]
    at = 1024 + 64 * tensors
    directory, parameters = data[1024:at], data[at:at + 4 * count]
    at += 4 * count
    parts = []
    for _ in range(sections):
        tag, length, _crc = struct.unpack("<4sqI", data[at:at + 16])
        parts.append((tag, data[at + 16:at + 16 + length]))
        at += 16 + length
    return header, directory, parameters, parts


def model_file(header, directory, parameters, sections):
    """A model file with every checksum made right for what it holds."""
    header = list(header)
    header[14:16] = [len(directory) // 64, len(sections)]
    header[16:18] = list(struct.unpack("<2i", struct.pack("<q", len(parameters) // 4)))
    header[18] = struct.unpack("<i", struct.pack("<I", zlib.crc32(directory)))[0]
    header[19] = struct.unpack("<i", struct.pack("<I", zlib.crc32(parameters)))[0]
    header[20] = 0
    header[20] = struct.unpack("<i", struct.pack("<I", zlib.crc32(struct.pack("<256i", *header))))[0]
    out = struct.pack("<256i", *header) + directory + parameters
    for tag, payload in sections:
        out += struct.pack("<4sqI", tag, len(payload), zlib.crc32(payload)) + payload
    return out


def tokenizer_file(merges, eot=b"<|endoftext|>"):
    ints = [0x4B544354, 1, 256 + len(merges) + 1, len(merges), 1]
    for left, right in merges:
        ints += [left, right]
    ints += [256 + len(merges), len(eot)]
    return struct.pack(f"<{len(ints)}i", *ints) + eot


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return path


# ----------------------------------------------------------------------------------------------------
# Part 1: the known ways to break a reader

def setup(d):
    """A text, its tokenizer and token files, and a short training run's checkpoint."""
    words = "the cat dog owl sees chases river tree slowly gladly".split()
    rng = random.Random(7)
    text = "\n".join(" ".join(rng.choice(words) for _ in range(8)) + "." for _ in range(3000))
    write(f"{d}/text.txt", text.encode())
    assert run([TOKENIZER, "train", "--input", f"{d}/text.txt", "--vocab-size", "300", "--output", f"{d}/tok.tok"])[0] == 0
    assert run([TOKENIZER, "encode", "--tokenizer", f"{d}/tok.tok", "--input", f"{d}/text.txt", "--output", f"{d}/data"])[0] == 0
    train = [TRAIN_GPT, "--preset", "debug", "--train", f"{d}/data_train.bin", "--val", f"{d}/data_val.bin",
             "--tokenizer", f"{d}/tok.tok", "--steps", "4", "--eval-interval", "2", "--eval-steps", "2"]
    assert run(train + ["--out", f"{d}/run"])[0] == 0
    return train


def test_known_cases(d, train):
    checkpoint = open(f"{d}/run/latest.bin", "rb").read()
    header, directory, parameters, sections = model_parts(checkpoint)

    # 1. Merges (97,97), (256,256), (257,257), ... double a token's length each time.
    chain_bytes = tokenizer_file([(97, 97)] + [(256 + i, 256 + i) for i in range(40)])
    chain = write(f"{d}/chain.tok", chain_bytes)
    expect_error("a tokenizer whose merges double a token 40 times", [TOKENIZER, "decode", "--tokenizer", chain,
                 "--input", f"{d}/data_val.bin"], ["chain.tok", "bytes, more than 65536"])
    tokn = [(t, chain_bytes if t == b"TOKN" else p) for t, p in sections]
    expect_error("a checkpoint carrying that tokenizer", [INFERENCE, write(f"{d}/chain.bin",
                 model_file(header, directory, parameters, tokn)), "--tokens", "3"], ["chain.bin", "more than 65536"])

    # 2. Header sizes whose products overflow: dim 2^30, MLP ratio 2^28 (checksums made right).
    for field, value, name in ((4, 1 << 30, "dim 2^30"), (7, 1 << 28, "MLP ratio 2^28"), (5, -3, "layers -3")):
        bad = list(header)
        bad[field] = value
        expect_error(f"a checkpoint header with {name}", [INFERENCE, write(f"{d}/sizes.bin",
                     model_file(bad, directory, parameters, sections))], ["sizes.bin", "model config"])

    # 3. A config far larger than the file: nothing may be allocated before the check.
    for field, value, name in ((4, 8192, "dim 8192"), (3, 1 << 26, "context 2^26"), (2, 1 << 24, "vocab 2^24")):
        bad = list(header)
        bad[field] = value
        expect_error(f"a 440 KB checkpoint whose header says {name}", [INFERENCE, write(f"{d}/big.bin",
                     model_file(bad, directory, parameters, sections))], ["big.bin"])

    # 4. A section that claims more bytes than the file holds.
    for length in (6 << 30, 1 << 40, 1 << 62):
        at = len(checkpoint) - sum(16 + len(p) for _, p in sections)
        bad = bytearray(checkpoint)
        struct.pack_into("<q", bad, at + 4, length)
        expect_error(f"a TOKN section length of {length}", [INFERENCE, write(f"{d}/long.bin", bytes(bad))],
                     ["long.bin", "truncated: section"])

    # 5. NaN weights (with their checksum made right) are refused at load.
    nan_parameters = bytearray(parameters)
    struct.pack_into("<f", nan_parameters, 40, float("nan"))
    expect_error("NaN weights", [INFERENCE, write(f"{d}/nan.bin", model_file(header, directory, bytes(nan_parameters), sections))],
                 ["nan.bin", "not finite"])

    # 6. Training states that cannot be: step INT64_MIN, step -100.
    for step in (-(1 << 63), -100):
        state = [(t, struct.pack("<qqQdd", step, 1, 5, 2.0, 1.0) if t == b"TRAN" else p) for t, p in sections]
        os.makedirs(f"{d}/state", exist_ok=True)
        write(f"{d}/state/latest.bin", model_file(header, directory, parameters, state))
        expect_error(f"a checkpoint at step {step}", train + ["--out", f"{d}/state", "--resume"],
                     ["state/latest.bin", "out of range"])

    # 7. Section tags holding a newline or a NUL are shown in hex, so the error stays one line.
    for tag, shown in ((b"TO\nN", "0x544f0a4e"), (b"\0\0\0\0", "0x00000000")):
        odd = [(tag if t == b"TOKN" else t, p) for t, p in sections]
        expect_error(f"a section tagged {tag!r}", [INFERENCE, write(f"{d}/tag.bin", model_file(header, directory, parameters, odd + odd[:1]))],
                     ["tag.bin", f"section {shown} appears twice"])

    # 8. A directory checksum (header field 18) that is wrong, the header's own checksum made right.
    bad = bytearray(model_file(header, directory, parameters, sections))
    struct.pack_into("<i", bad, 18 * 4, header[18] ^ 1)
    struct.pack_into("<i", bad, 20 * 4, 0)
    struct.pack_into("<I", bad, 20 * 4, zlib.crc32(bytes(bad[:1024])))
    expect_error("a wrong directory checksum", [INFERENCE, write(f"{d}/dircrc.bin", bytes(bad))],
                 ["dircrc.bin", "directory does not match its checksum"])

    # 9. A training state of the wrong length; and the bfloat16 build's master weights dropped (a
    # float build's file has none: its parameters are the master weights, and it resumes).
    short = [(t, p[:8] if t == b"TRAN" else p) for t, p in sections]
    os.makedirs(f"{d}/state", exist_ok=True)
    write(f"{d}/state/latest.bin", model_file(header, directory, parameters, short))
    expect_error("a TRAN section of 8 bytes", train + ["--out", f"{d}/state", "--resume"],
                 ["state/latest.bin", "section 'TRAN' holds 8 bytes, expected 40"])
    os.makedirs(f"{d}/master", exist_ok=True)
    write(f"{d}/master/latest.bin", model_file(header, directory, parameters, [(t, p) for t, p in sections if t != b"MAST"]))
    if any(t == b"MAST" for t, _ in sections):
        expect_error("a bfloat16 build's checkpoint without its MAST section", train + ["--out", f"{d}/master", "--resume", "--steps", "5"],
                     ["master/latest.bin", "lacks the 'MAST' section"])
    else:
        status, err = run(train + ["--out", f"{d}/master", "--resume", "--steps", "5"])
        check(status == 0, f"a float build's checkpoint (no MAST section) resumes: exit {status}")

    # 10. A batch no machine has memory for.
    expect_error("--batch 1048576", train + ["--out", f"{d}/huge", "--batch", "1048576"], ["--batch 1048576", "lower --batch"])


def test_runs_and_matching(d, train):
    # 8. A second run into a folder in use fails at once, naming it.
    first = subprocess.Popen(train + ["--out", f"{d}/shared", "--steps", "100000"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    for _ in range(200):
        if os.path.exists(f"{d}/shared/metrics.csv"):
            break
        time.sleep(0.05)
    start = time.time()
    expect_error("a second train_gpt into the same --out", train + ["--out", f"{d}/shared"], ["shared", "in use"])
    check(time.time() - start < 10, f"... and it failed at once ({time.time() - start:.1f} s)")

    # 11. The training file cut short under the running first run: an error, not SIGBUS.
    shutil.copy(f"{d}/data_train.bin", f"{d}/shrinking.bin")
    cut = subprocess.Popen(train[:4] + [f"{d}/shrinking.bin"] + train[5:] + ["--out", f"{d}/cut", "--steps", "100000"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=limit_memory)
    time.sleep(1.5)
    os.truncate(f"{d}/shrinking.bin", 2048)
    err = cut.communicate(timeout=60)[1].decode(errors="replace")
    first.kill()
    first.wait()
    last = err.strip().splitlines()[-1] if err.strip() else ""
    check(cut.returncode == 1 and "shrinking.bin" in last and "shorter" in last,
          f"a token file truncated while training: exit {cut.returncode}, \"{last[:150]}\"")

    # 9. Corruption that keeps the structure: each caught by a checksum or a field check.
    data = open(f"{d}/run/latest.bin", "rb").read()
    header, directory, parameters, sections = model_parts(data)
    edits = {"heads changed": lambda b: struct.pack_into("<i", b, 24, 4),
             "dropout changed": lambda b: struct.pack_into("<f", b, 48, 0.5),
             "a reserved field set": lambda b: struct.pack_into("<i", b, 4 * 100, 7),
             "one weight's bit flipped": lambda b: b.__setitem__(1024 + len(directory) + 101, b[1024 + len(directory) + 101] ^ 4)}
    for name, edit in edits.items():
        bad = bytearray(data)
        edit(bad)
        expect_error(f"a checkpoint with {name}", [INFERENCE, write(f"{d}/edited.bin", bytes(bad))], ["edited.bin", "checksum"])
    twice = model_file(header, directory, parameters, sections + sections[:1])
    expect_error("a checkpoint with a section twice", [INFERENCE, write(f"{d}/twice.bin", twice)], ["twice.bin", "appears twice"])
    reserved = list(header)
    reserved[30] = 1
    expect_error("a reserved header field set, checksum made right", [INFERENCE, write(f"{d}/reserved.bin",
                 model_file(reserved, directory, parameters, sections))], ["reserved.bin", "reserved header field 30"])

    # 10. Files that do not belong together.
    assert run([TOKENIZER, "train", "--input", f"{d}/text.txt", "--vocab-size", "280", "--output", f"{d}/other.tok"])[0] == 0
    expect_error("--resume with another --tokenizer", train[:8] + [f"{d}/other.tok"] + train[9:] + ["--out", f"{d}/run", "--resume"],
                 ["--tokenizer", "other.tok", "not the tokenizer"])
    expect_error("--resume with a different --dim", train + ["--out", f"{d}/run", "--resume", "--dim", "64", "--layers", "3"],
                 ["--dim", "--layers", "differ"])
    bigger = f"{d}/bigger.tok"  # a larger vocabulary, learned from other text
    write(f"{d}/other.txt", open(__file__, "rb").read() * 3)
    assert run([TOKENIZER, "train", "--input", f"{d}/other.txt", "--vocab-size", "600", "--output", bigger])[0] == 0
    expect_error("token files made with a smaller tokenizer", train[:8] + [bigger] + train[9:] + ["--out", f"{d}/mixed"],
                 ["data_train.bin", "another tokenizer"])


# ----------------------------------------------------------------------------------------------------
# Part 2: seeded mutants

def mutate(data, rng, fix_model_checksums=False):
    b = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:  # bit flips
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncation
        b = b[:rng.randrange(len(b))]
    elif kind == 2:  # a field near the start set to an interesting value
        at = rng.randrange(0, min(len(b) - 4, 1100)) // 4 * 4
        struct.pack_into("<i", b, at, rng.choice([0, 1, -1, 2, 255, 256, 65536, 1 << 20, 1 << 30, -(1 << 31), (1 << 31) - 1]))
    elif kind == 3:  # bytes inserted or deleted
        i = rng.randrange(len(b))
        b = b[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + b[i:] if rng.random() < 0.5 else b[:i] + b[i + rng.randint(1, 16):]
    else:  # a random int64 (section lengths, the parameter count) in the second half
        at = rng.randrange(len(b) // 2, len(b) - 8)
        struct.pack_into("<q", b, at, rng.choice([-1, 1 << 33, 1 << 62, rng.randrange(1 << 20)]))
    if fix_model_checksums:
        try:
            header, directory, parameters, sections = model_parts(bytes(b))
            return model_file(header, directory, parameters, sections)
        except (struct.error, ValueError):
            pass
    return bytes(b)


def fuzz(d, train, count):
    rng = random.Random(2026)
    tok, tokens, model = (open(p, "rb").read() for p in (f"{d}/tok.tok", f"{d}/data_val.bin", f"{d}/run/latest.bin"))
    bad = []

    def attempt(what, args, cwd=None):
        status, err = run(args, timeout=60, cwd=cwd)
        if not clean_outcome(status, err):
            bad.append(f"{what}: exit {status}: {(err.strip().splitlines() or [''])[-1][:200]}")

    for i in range(count):
        m = write(f"{d}/mutant.tok", mutate(tok, rng))
        attempt(f"tokenizer mutant {i}", [TOKENIZER, "encode", "--tokenizer", m, "--input", f"{d}/text.txt", "--output", f"{d}/m"])
        attempt(f"tokenizer mutant {i} (decode)", [TOKENIZER, "decode", "--tokenizer", m, "--input", f"{d}/data_val.bin"])
        t = write(f"{d}/mutant.bin", mutate(tokens, rng))
        attempt(f"token file mutant {i}", [TOKENIZER, "decode", "--tokenizer", f"{d}/tok.tok", "--input", t])
        c = write(f"{d}/mutant_model.bin", mutate(model, rng, fix_model_checksums=i % 2 == 1))
        attempt(f"checkpoint mutant {i}", [INFERENCE, c, "--tokens", "4", "--prompt", "the cat"])
        if i % 10 == 0:
            os.makedirs(f"{d}/fuzz_run", exist_ok=True)
            shutil.copy(c, f"{d}/fuzz_run/latest.bin")
            attempt(f"checkpoint mutant {i} resumed", train + ["--out", f"{d}/fuzz_run", "--resume", "--steps", "6"])
            attempt(f"token file mutant {i} trained on", train[:4] + [t] + train[5:] + ["--out", f"{d}/fuzz_train", "--steps", "2"])
    for line in bad[:20]:
        print("     " + line)
    check(not bad, f"fuzz: {count} mutants each of a tokenizer, a token file and a checkpoint ({count * 4 + count // 10 * 2} runs, "
                   f"half the checkpoints with their checksums made right): every run succeeded or ended in a clean error"
                   + (f"; {len(bad)} did not" if bad else ""))


def main():
    d = tempfile.mkdtemp(prefix="tricycle_files_")
    try:
        train = setup(d)
        test_known_cases(d, train)
        test_runs_and_matching(d, train)
        fuzz(d, train, 100 if SANITIZED else 300)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
