# tests/checks.sh — the check helpers of the shell tests, sourced by each (not run by itself). They
# count into passed and failed; a test ends with `echo "$passed passed, $failed failed"`.
passed=0 failed=0
check() {  # check "what" command...: passes when the command succeeds
    local what=$1
    shift
    if "$@" >/dev/null 2>&1; then
        echo "ok   $what"
        passed=$((passed + 1))
    else
        echo "FAIL $what"
        failed=$((failed + 1))
    fi
}
fails_with() {  # fails_with "what" "expected message" command...: must exit non-zero mentioning it
    local what=$1 expected=$2
    shift 2
    local output
    output=$("$@" 2>&1)
    local status=$?
    if [ $status -ne 0 ] && grep -qF -- "$expected" <<< "$output"; then
        echo "ok   $what: exit $status, \"$(tail -n 1 <<< "$output")\""
        passed=$((passed + 1))
    else
        echo "FAIL $what: exit $status, expected an error mentioning \"$expected\", got: $(tail -n 1 <<< "$output")"
        failed=$((failed + 1))
    fi
}
