#!/usr/bin/env bash
# Runs each test binary given as an argument, shows its output, and ends with the total
# "N passed, M failed" over all of them. Exits non-zero if any check failed or a binary crashed.
set -u
passed=0 failed=0 crashed=0
for test in "$@"; do
    echo "== $test"
    log=$(mktemp)
    "./$test" 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1)
    rm -f "$log"
    if [ -z "$summary" ]; then
        echo "FAIL $test crashed (exit status $status) before printing its summary"
        crashed=$((crashed + 1))
        continue
    fi
    read -r n_passed _ n_failed _ <<< "$summary"
    passed=$((passed + n_passed)) failed=$((failed + n_failed))
done
failed=$((failed + crashed))
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
