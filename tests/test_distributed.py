#!/usr/bin/env python3
"""tests/test_distributed.py — train_gpt on several processes (mpirun), against one process.

- 2 ranks x 1 micro-batch against 1 rank x 2 micro-batches (the same global batches): every step's
  loss within 1e-5 relative over 20 steps, and the final parameters close;
- ZeRO-1 (the default) against a replicated optimizer: losses within 1e-6 relative, and the moments
  gathered from the shards into the checkpoint equal to the replicated ones;
- a run saved by 2 ranks resumed by 1, and the reverse: the continuation matches the uninterrupted
  run;
- failures: a rank killed mid-run, a token file cut short under a running job, ranks started with
  different flags, --grad-accum that the ranks do not divide. Each ends the job with a non-zero
  status within seconds, naming the rank; after the kill the last checkpoint still loads.

Run by `make test` (`make test BF16=0|1`), with whatever precision the programs were built in. Its
checks are skipped (and counted as such) where mpirun is missing or train_gpt was built without MPI.
OpenMPI refuses to run as root unless told twice that it may; the test tells it. Leak detection is
off for the ranks of the sanitizer build: OpenMPI keeps memory until exit on purpose (its other
checks stay on).
"""
import array
import csv
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER, TRAIN_GPT, INFERENCE = (os.path.join(ROOT, p) for p in ("tokenizer", "train_gpt", "inference"))
STEPS = 20
passed = failed = skipped = 0


def check(ok, what):
    global passed, failed
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    passed, failed = passed + bool(ok), failed + (not ok)


def environment():
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def mpirun(ranks, *commands):
    """mpirun starting `ranks` copies of one command, or one rank of each command given."""
    launch = ["mpirun", "--oversubscribe"]
    if len(commands) == 1:
        return launch + ["-np", str(ranks)] + commands[0]
    for i, command in enumerate(commands):
        launch += ([":"] if i else []) + ["-np", "1"] + command
    return launch


def run(args, timeout=300, env_extra=None):
    """(exit status, stdout, stderr); a timeout is status 'timeout'."""
    env = environment()
    env.update(env_extra or {})
    try:
        r = subprocess.run(args, capture_output=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return "timeout", "", ""
    return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


def make_data(d):
    """The text of tests/test_programs.sh (sentences from a tiny grammar), its tokenizer and tokens."""
    words = [w.split() for w in ("cat dog bird fox horse mouse owl bear wolf deer",
                                 "sees chases finds hears follows helps watches meets calls greets",
                                 "river tree stone house field hill road bridge garden forest",
                                 "slowly quickly quietly loudly early late gladly rarely often twice")]
    x, lines = 42, []
    for _ in range(6000):
        picked = []
        for kind in words:
            x = x * 16807 % 2147483647
            picked.append(kind[x % 10])
        lines.append("the {} {} the {} {}.".format(*picked))
    with open(f"{d}/text.txt", "w") as f:
        f.write("\n".join(lines) + "\n")
    for args in (["train", "--input", f"{d}/text.txt", "--vocab-size", "320", "--output", f"{d}/tok.tok"],
                 ["encode", "--tokenizer", f"{d}/tok.tok", "--input", f"{d}/text.txt", "--output", f"{d}/data"]):
        subprocess.run([TOKENIZER] + args, check=True, capture_output=True)


def metrics(folder):
    """{step: (train loss, val loss)} from metrics.csv, None where empty."""
    rows = {}
    with open(f"{folder}/metrics.csv") as f:
        for row in csv.DictReader(f):
            rows[int(row["step"])] = tuple(float(row[k]) if row[k] else None for k in ("train_loss", "val_loss"))
    return rows


def largest_relative_difference(a, b, steps):
    """The largest relative difference of the train and val losses over the given steps (inf if any is missing)."""
    worst = 0.0
    for s in steps:
        if s not in a or s not in b:
            return float("inf")
        for x, y in zip(a[s], b[s]):
            if (x is None) != (y is None):
                return float("inf")
            if x is not None:
                worst = max(worst, abs(x - y) / max(abs(y), 1e-30))
    return worst


def checkpoint(path):
    """(parameters, {tag: payload}) of a model file, in the README's format."""
    data = open(path, "rb").read()
    header = struct.unpack("<256i", data[:1024])
    tensors, sections, count = header[14], header[15], struct.unpack("<q", data[64:72])[0]
    at = 1024 + 64 * tensors
    parameters = array.array("f", data[at:at + 4 * count])
    at += 4 * count
    parts = {}
    for _ in range(sections):
        tag, length, _crc = struct.unpack("<4sqI", data[at:at + 16])
        parts[tag] = data[at + 16:at + 16 + length]
        at += 16 + length
    return parameters, parts


def largest_difference(a, b):
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0) if len(a) == len(b) else float("inf")


def test_ranks_against_one_process(d, train):
    one = run(train + ["--out", f"{d}/one"])
    two = run(mpirun(2, train + ["--out", f"{d}/two"]))
    check(one[0] == 0 and two[0] == 0, f"20 steps on 1 rank x 2 micro-batches and on 2 ranks x 1 (exit {one[0]}, {two[0]})")
    if one[0] != 0 or two[0] != 0:
        print(two[2][-2000:])
        return False
    check("data parallel: 2 ranks" in two[1] and two[1].count("\ndone: ") == 1,
          "rank 0 alone prints: one 'data parallel: 2 ranks' banner, one 'done' line")
    worst = largest_relative_difference(metrics(f"{d}/one"), metrics(f"{d}/two"), range(STEPS + 1))
    check(worst <= 1e-5, f"2 ranks: the 20 steps' train losses and 3 val losses equal 1 rank's to {worst:.1e} relative (<= 1e-5)")
    p1, s1 = checkpoint(f"{d}/one/latest.bin")
    p2, s2 = checkpoint(f"{d}/two/latest.bin")
    scale = max(abs(x) for x in p1)
    difference = largest_difference(p1, p2)
    check(difference <= 1e-4 * scale, f"2 ranks: final parameters within {difference:.1e} of 1 rank's "
                                      f"(<= 1e-4 of the largest, {scale:.2f})")
    return True


def test_zero_against_replicated(d, train):
    status, _, err = run(mpirun(2, train + ["--out", f"{d}/replicated", "--zero", "0"]))
    check(status == 0, f"2 ranks with a replicated optimizer (--zero 0): exit {status}")
    if status != 0:
        return
    worst = largest_relative_difference(metrics(f"{d}/two"), metrics(f"{d}/replicated"), range(STEPS + 1))
    check(worst <= 1e-6, f"ZeRO-1 and replicated AdamW give the same losses to {worst:.1e} relative (<= 1e-6)")
    _, sharded = checkpoint(f"{d}/two/latest.bin")
    _, replicated = checkpoint(f"{d}/replicated/latest.bin")
    tags = [t for t in (b"ADMM", b"ADMV", b"MAST") if t in replicated]
    moments = max(largest_difference(array.array("f", sharded.get(t, b"")), array.array("f", replicated[t])) for t in tags)
    check(moments <= 1e-6, f"the checkpoint's {', '.join(t.decode() for t in tags)} gathered from the 2 shards equal the "
                           f"replicated ones (largest difference {moments:.1e})")


def crash_at_step_10(command, folder):
    """Runs the 20 steps, killed while saving the step-20 checkpoint: OUT/latest.bin stays at step 10."""
    status, _, _ = run(command + ["--out", folder], env_extra={"TRICYCLE_CRASH_BEFORE_RENAME": "latest.bin:3"})
    return status != 0 and os.path.exists(f"{folder}/latest.bin")


def test_resume_across_rank_counts(d, train):
    cases = (("saved by 2 ranks, resumed by 1", mpirun(2, train), train, "two"),
             ("saved by 1 rank, resumed by 2", train, mpirun(2, train), "one"))
    for i, (what, first, second, reference) in enumerate(cases):
        folder = f"{d}/resumed{i}"
        crashed = crash_at_step_10(first, folder)
        status, out, _ = run(second + ["--out", folder, "--resume"])
        resumed = crashed and status == 0 and "resuming from" in out and "at step 10" in out
        worst = largest_relative_difference(metrics(f"{d}/{reference}"), metrics(folder), range(STEPS + 1)) \
            if resumed else float("inf")
        check(resumed and worst <= 1e-5, f"{what} at step 10: steps 11-20 match the uninterrupted run to {worst:.1e} "
                                         f"relative (<= 1e-5; crashed {crashed}, resume exit {status})")


def start_long_run(d, train, name, train_file=None):
    """A 2-rank run with no end, once it has saved a checkpoint after step 10."""
    command = train + ["--out", f"{d}/{name}", "--steps", "100000"]
    if train_file:
        command[command.index("--train") + 1] = train_file
    job = subprocess.Popen(mpirun(2, command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment())
    for _ in range(1200):
        if job.poll() is not None or (os.path.exists(f"{d}/{name}/metrics.csv") and
                                      len(open(f"{d}/{name}/metrics.csv").readlines()) > 13):
            break
        time.sleep(0.1)
    return job


def rank_process(job, rank):
    """The pid of one rank that mpirun started (its environment names its rank)."""
    for pid in os.listdir("/proc"):
        try:
            if not pid.isdigit() or int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) != job.pid:
                continue
            if f"OMPI_COMM_WORLD_RANK={rank}".encode() in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
                return int(pid)
        except (OSError, IndexError, ValueError):
            continue
    return None


def finish(job):
    """(exit status, stderr, seconds until it ended); a job still running after 60 s is killed."""
    start = time.time()
    try:
        _, err = job.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        job.kill()
        _, err = job.communicate()
        return "hung", err.decode(errors="replace"), time.time() - start
    return job.returncode, err.decode(errors="replace"), time.time() - start


def test_failures(d, train):
    job = start_long_run(d, train, "killed")
    victim = rank_process(job, 1)
    check(victim is not None and job.poll() is None, "a 2-rank job is running past step 10; rank 1 is found")
    if victim is not None:
        os.kill(victim, signal.SIGKILL)
    status, err, seconds = finish(job)
    check(status not in (0, "hung") and "rank 1" in err,
          f"rank 1 killed by SIGKILL: the job ends with status {status} after {seconds:.1f} s, naming rank 1")
    loads = run([INFERENCE, f"{d}/killed/latest.bin", "--tokens", "3"])[0]
    check(loads == 0, f"after the kill, the last checkpoint loads (inference exit {loads})")

    shutil.copy(f"{d}/data_train.bin", f"{d}/shrinking.bin")
    job = start_long_run(d, train, "cut", f"{d}/shrinking.bin")
    os.truncate(f"{d}/shrinking.bin", 2048)
    status, err, seconds = finish(job)
    lines = [l for l in err.splitlines() if "train_gpt: error: rank" in l]
    check(status not in (0, "hung") and lines and "shrinking.bin" in lines[0],
          f"a token file cut short under a 2-rank job: status {status} after {seconds:.1f} s, "
          f"\"{lines[0][:120] if lines else err.strip()[-120:]}\"")

    different = mpirun(2, train + ["--out", f"{d}/mismatch"], train + ["--out", f"{d}/mismatch", "--lr", "2e-2"])
    status, _, err = run(different, timeout=120)
    line = next((l for l in err.splitlines() if "train_gpt: error: rank" in l), err.strip()[-150:])
    check(status not in (0, "timeout") and "rank 1 of 2" in line and "--lr" in line,
          f"ranks given different flags: exit {status} at start, \"{line[:150]}\"")

    status, _, err = run(mpirun(2, train + ["--out", f"{d}/uneven", "--grad-accum", "3"]), timeout=120)
    check(status not in (0, "timeout") and "--grad-accum 3 is not a multiple of the 2 ranks" in err,
          f"--grad-accum 3 on 2 ranks is refused (exit {status})")


def main():
    global skipped
    linked = subprocess.run(["ldd", TRAIN_GPT], capture_output=True).stdout
    if shutil.which("mpirun") is None or b"libmpi" not in linked:
        skipped = 15
        print("skip mpirun is not installed, or train_gpt was built without MPI (make MPI=1): "
              f"{skipped} checks of training on several processes not run")
        print(f"{passed} passed, {failed} failed, {skipped} skipped")
        return
    d = tempfile.mkdtemp(prefix="tricycle_distributed_")
    try:
        make_data(d)
        train = [TRAIN_GPT, "--preset", "debug", "--train", f"{d}/data_train.bin", "--val", f"{d}/data_val.bin",
                 "--tokenizer", f"{d}/tok.tok", "--steps", str(STEPS), "--eval-interval", "10", "--eval-steps", "4",
                 "--lr", "1e-2", "--warmup", "5", "--dropout", "0.1", "--batch", "4", "--grad-accum", "2",
                 "--threads", "1"]
        if test_ranks_against_one_process(d, train):
            test_zero_against_replicated(d, train)
            test_resume_across_rank_counts(d, train)
        test_failures(d, train)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
