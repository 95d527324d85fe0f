#!/usr/bin/env bash
# bench/compare_losses.sh — is a run's loss curve the emulator's? Compares the per-step losses that
# bench_gpt printed ("step N: loss X, ...") for a candidate run (the GPU's) with the CPU emulator's
# run of the same shape, seed, batch and attention, and ends with one COMPARE line and exit status
# 0 (within the tolerance) or 1.
#
#   bash bench/compare_losses.sh bf16|float CANDIDATE_LOG EMULATOR_FLOAT_LOG EMULATOR_BF16_LOG
#
# The tolerance comes from the runs themselves. D, the largest difference between the emulator's
# float and bfloat16 losses, is what bfloat16 storage moves this run's losses by. A bfloat16
# candidate is compared with the emulator's bfloat16 run: both are one bfloat16 rounding away from
# the float losses, each by about D, so they may differ by 2 D. A float candidate on a GPU (TF32
# products: 10 mantissa bits against bfloat16's 7, only in the products) with the emulator's float
# run, within 2 D / 8. Both with 1e-4 more, for the case of a tiny D. The two emulator runs must
# also train (the last loss below the first), or the yardstick means nothing.
set -uo pipefail

usage="usage: bash bench/compare_losses.sh bf16|float CANDIDATE_LOG EMULATOR_FLOAT_LOG EMULATOR_BF16_LOG"
[ $# -eq 4 ] || { echo "compare_losses: error: expected 4 arguments; $usage" >&2; exit 2; }
precision=$1 candidate=$2 float_log=$3 bf16_log=$4
case $precision in
    bf16) reference=$bf16_log ;;
    float) reference=$float_log ;;
    *) echo "compare_losses: error: the precision '$precision' is not bf16 or float; $usage" >&2; exit 2 ;;
esac
for log in "$candidate" "$float_log" "$bf16_log"; do
    [ -r "$log" ] || { echo "compare_losses: error: $log: no such log (bench_gpt's output expected)" >&2; exit 2; }
done

# The losses of a log, one per line, in step order, after a first line that names the log (so
# that a log without losses still counts as a file).
losses() {
    echo "$1"
    sed -n 's/^step [0-9]*: loss \([^,]*\),.*/\1/p' "$1"
}

awk -v precision="$precision" -v candidate_name="$candidate" -v reference_name="$reference" '
    FNR == 1 { file++; count[file] = 0; next }
    { value[file, FNR - 1] = $1; count[file] = FNR - 1 }
    function absolute(x) { return x < 0 ? -x : x }
    function finite(x) { return x == x + 0 && x !~ /nan|inf/ }
    END {
        # Files: 1 candidate, 2 reference, 3 emulator float, 4 emulator bf16.
        n = count[1]
        if (n < 2 || count[2] != n || count[3] != n || count[4] != n) {
            printf "COMPARE FAIL precision=%s: step counts differ or are under 2 (candidate %d, reference %d, float %d, bf16 %d)\n",
                precision, count[1], count[2], count[3], count[4]
            exit 1
        }
        yardstick = 0
        for (s = 1; s <= n; s++) {
            for (f = 1; f <= 4; f++)
                if (!finite(value[f, s])) {
                    printf "COMPARE FAIL precision=%s: step %d has loss %s in file %d of 4\n", precision, s - 1, value[f, s], f
                    exit 1
                }
            d = absolute(value[3, s] - value[4, s])
            if (d > yardstick) yardstick = d
        }
        tolerance = (precision == "bf16" ? 2 * yardstick : 2 * yardstick / 8) + 1e-4
        printf "%-5s %12s %12s %10s\n", "step", "candidate", "emulator", "|diff|"
        worst = 0
        for (s = 1; s <= n; s++) {
            d = absolute(value[1, s] - value[2, s])
            if (d > worst) worst = d
            printf "%-5d %12.6f %12.6f %10.2e%s\n", s - 1, value[1, s], value[2, s], d, (d > tolerance ? "  over" : "")
        }
        printf "yardstick: the emulator'\''s float and bf16 losses differ by at most %.2e; tolerance %.2e (%s)\n",
            yardstick, tolerance, precision == "bf16" ? "2 x that + 1e-4" : "2 x that / 8 + 1e-4, TF32"
        trains = value[3, n] < value[3, 1] && value[4, n] < value[4, 1]
        verdict = (worst <= tolerance && trains) ? "ok" : "FAIL"
        printf "COMPARE %s precision=%s steps=%d max_diff=%.2e tolerance=%.2e emulator_trains=%s candidate=%s reference=%s\n",
            verdict, precision, n, worst, tolerance, trains ? "yes" : "no", candidate_name, reference_name
        exit (verdict == "ok" ? 0 : 1)
    }' <(losses "$candidate") <(losses "$reference") <(losses "$float_log") <(losses "$bf16_log")
