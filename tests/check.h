// tests/check.h — the small harness every test binary shares.
// Each check prints one line, "ok   <what>" or "FAIL <what>", and finish() prints the final
// "N passed, M failed" line and gives the exit status.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

static int checks_passed = 0, checks_failed = 0;

__attribute__((format(printf, 2, 3))) static bool check(bool ok, const char* format, ...) {
    char what[1024];
    va_list args;
    va_start(args, format);
    vsnprintf(what, sizeof what, format, args);
    va_end(args);
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    fflush(stdout);
    (ok ? checks_passed : checks_failed)++;
    return ok;
}

// Runs `body`, which must throw std::runtime_error whose message contains `expected`.
template <typename F>
static bool check_fails(const char* what, const char* expected, F body) {
    try {
        body();
    } catch (const std::runtime_error& error) {
        bool ok = strstr(error.what(), expected) != nullptr;
        return check(ok, "%s: rejected with \"%s\"%s", what, error.what(),
                     ok ? "" : " (expected it to mention that)");
    }
    return check(false, "%s: was accepted, expected an error mentioning \"%s\"", what, expected);
}

// The largest absolute difference between two vectors of numbers: infinite when their sizes
// differ or a value is NaN (std::max would pass over a NaN difference), 0 for equal infinities.
template <typename T>
static double max_difference(const std::vector<T>& a, const std::vector<T>& b) {
    if (a.size() != b.size()) return INFINITY;
    double worst = 0;
    for (size_t i = 0; i < a.size(); i++) {
        if (a[i] == b[i]) continue;
        double difference = std::fabs(double(a[i]) - double(b[i]));
        if (std::isnan(difference)) return INFINITY;
        worst = std::max(worst, difference);
    }
    return worst;
}

static int finish() {
    printf("%d passed, %d failed\n", checks_passed, checks_failed);
    return checks_failed ? 1 : 0;
}
