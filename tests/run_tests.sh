#!/usr/bin/env bash
# Runs each test program given as an argument, shows its output, and ends with the total
# "N passed, M failed" over all of them, after a line "K skipped" when some check could not run
# (e.g. without PyTorch). Exits non-zero if any check failed or a program crashed.
set -u
passed=0 failed=0 skipped=0
for test in "$@"; do
    echo "== $test"
    log=$(mktemp)
    "./$test" 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1)
    rm -f "$log"
    if [ -z "$summary" ]; then
        echo "FAIL $test crashed (exit status $status) before printing its summary"
        failed=$((failed + 1))
        continue
    fi
    read -r n_passed _ n_failed _ n_skipped _ <<< "${summary//,/}"
    passed=$((passed + n_passed)) failed=$((failed + n_failed)) skipped=$((skipped + ${n_skipped:-0}))
done
# The last line is the total alone; skipped checks are counted on the line before it.
[ "$skipped" -eq 0 ] || echo "$skipped skipped (a tool or package they need is not installed)"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
