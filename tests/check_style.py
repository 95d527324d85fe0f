#!/usr/bin/env python3
"""Style checks of the sources, run by `make test`:

- every .h and .cu file is formatted as .clang-format says (100 columns), checked with
  `clang-format --dry-run` (skipped, and counted as skipped, where clang-format is not installed);
- no function is longer than 80 lines, except gpt_backward (150), which is written out on purpose.

A function is a line at column 0 that ends in `{` and is not a struct, enum, namespace or
initializer, up to the next `}` at column 0.
"""
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for pattern in ("*.h", "*.cu", "tests/*.h", "tests/*.cu", "bench/*.h", "bench/*.cu") for p in ROOT.glob(pattern))
LIMITS = {"gpt_backward": 150}
DEFAULT_LIMIT = 80
NOT_FUNCTIONS = re.compile(r"^(struct|enum|union|namespace|extern|typedef|static const|constexpr|template <[^>]*> struct)\b|=\s*\{$")

passed = failed = skipped = 0


def check(ok, what):
    global passed, failed
    print(("ok   " if ok else "FAIL ") + what)
    if ok:
        passed += 1
    else:
        failed += 1


def long_functions(path):
    """(name, lines) of each function in the file longer than its limit."""
    found = []
    lines = path.read_text().splitlines()
    start = None
    for number, line in enumerate(lines):
        if start is None and line and not line[0].isspace() and line.rstrip().endswith("{") \
                and not line.startswith(("//", "#", "}")) and not NOT_FUNCTIONS.search(line.strip()):
            start = number
            continue
        if start is not None and line.startswith("}"):
            header = " ".join(l.strip() for l in lines[max(0, start - 3):start + 1])
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_:~]*)\s*\(", lines[start])
            name = names[0] if names else lines[start].strip()
            length = number - start + 1
            if length > LIMITS.get(name.split("::")[-1], DEFAULT_LIMIT):
                found.append((name, length))
            start = None
    return found


clang_format = shutil.which("clang-format")
for path in SOURCES:
    relative = path.relative_to(ROOT)
    if clang_format:
        result = subprocess.run([clang_format, "--dry-run", "--Werror", str(path)], capture_output=True, text=True, cwd=ROOT)
        first = next((l for l in result.stderr.splitlines() if "error" in l), "")
        check(result.returncode == 0, f"{relative} is formatted as .clang-format says{': ' + first if first else ''}")
    else:
        skipped += 1
    long = long_functions(path)
    check(not long, f"{relative}: no function longer than {DEFAULT_LIMIT} lines" +
          ("".join(f"; {name} has {length}" for name, length in long)))
if not clang_format:
    print(f"skip clang-format is not installed: formatting of {len(SOURCES)} files not checked")
print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
sys.exit(1 if failed else 0)
