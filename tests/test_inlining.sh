#!/usr/bin/env bash
# The CPU kernels vectorise only once g++ has inlined their loop bodies (lambdas) into the loops. In
# a unit as large as tricycle.cu, g++'s default budget for growth by inlining (40%) runs out before
# the last kernels, which then call a function per element (AdamW ran 6x slower that way), so the
# Makefile raises it. This reads the notes g++ wrote beside each object of the CPU builds (the
# calls it did not inline, and why) and checks that none was refused for that budget.
set -u
source "$(dirname "$0")/checks.sh"
shopt -s nullglob
notes=(build/cpu*/*/tricycle.o.inline-missed)
check "g++ wrote its inlining notes for tricycle.cu (${#notes[@]} builds)" test ${#notes[@]} -gt 0
for file in "${notes[@]}"; do
    refused=$(grep -c 'inline-unit-growth limit reached' "$file")
    check "$file: g++ noted its missed inlines ($(wc -l < "$file") lines)" test -s "$file"
    check "$file: no call left out of line for the unit's growth budget ($refused)" test "$refused" -eq 0
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
