// test_gradients.cu — checks every operation's gradient against central finite differences, kernel
// results against plain CPU loops, the tape and memory, the GPT, the optimizers and model files.
// Built in double precision (-DTRICYCLE_DOUBLE) so finite differences are accurate to ~1e-10.
#include "tricycle.h"
#include "tests/check.h"

#include <cmath>
#include <functional>
#include <vector>

// The build's threads per row (tests that try others restore it).
static int default_lanes = 1;

// ----------------------------------------------------------------------------------------------------
// Finite differences

// A scalar from any tensor, with a different random weight on every element, so that each element's
// gradient is distinct (a plain sum would hide permutation bugs).
static Tensor project(Tensor out) {
    Tensor weights = empty_like(out);
    fill_normal(weights.data, weights.size(), 4242, 0, 1);
    return sum(mul(out, weights));
}

static double scalar_value(Tensor t) { return to_host(t)[0]; }

// Relative error ||analytic - numeric|| / max(||analytic||, ||numeric||) over every input element
// (or an evenly spaced sample of at most max_entries per input).
static double gradient_error(const std::function<Tensor()>& f, const std::vector<Tensor>& inputs,
                             long max_entries = 200) {
    for (const Tensor& t : inputs) zero_grad(t);
    MemoryMark mark = memory_mark();
    backward(project(f()));
    memory_release(mark);
    double diff2 = 0, analytic2 = 0, numeric2 = 0;
    const double eps = 1e-6;
    for (const Tensor& t : inputs) {
        std::vector<real> analytic = to_host(grad(t));
        long n = t.size(), step = n > max_entries ? n / max_entries : 1;
        for (long i = 0; i < n; i += step) {
            real original;
            cuda_check(cudaMemcpy(&original, t.data + i, sizeof(real), cudaMemcpyDeviceToHost));
            double values[2];
            for (int side = 0; side < 2; side++) {
                real shifted = original + (side ? -eps : eps);
                cuda_check(cudaMemcpy(t.data + i, &shifted, sizeof(real), cudaMemcpyHostToDevice));
                NoGrad no_grad;
                values[side] = scalar_value(project(f()));
                memory_release(mark);
            }
            cuda_check(cudaMemcpy(t.data + i, &original, sizeof(real), cudaMemcpyHostToDevice));
            double numeric = (values[0] - values[1]) / (2 * eps);
            diff2 += (analytic[i] - numeric) * (analytic[i] - numeric);
            analytic2 += double(analytic[i]) * analytic[i];
            numeric2 += numeric * numeric;
        }
    }
    double scale = std::sqrt(std::max(analytic2, numeric2));
    return scale > 0 ? std::sqrt(diff2) / scale : std::sqrt(diff2);
}

static void check_gradient(const std::string& what, const std::function<Tensor()>& f,
                           const std::vector<Tensor>& inputs) {
    double error = gradient_error(f, inputs);
    check(error < 1e-6, "gradient of %s: relative error %.2e", what.c_str(), error);
}

static Tensor input(Shape shape, uint64_t seed) { return requires_grad(randn(shape, seed)); }
static Tensor positive_input(Shape shape, uint64_t seed) {
    return requires_grad(rand_uniform(shape, seed, 0.5, 2.0));
}

static std::string describe(const std::vector<Tensor>& inputs) {
    std::string s;
    for (const Tensor& t : inputs) s += (s.empty() ? "" : " and ") + shape_string(t);
    return s;
}

// ----------------------------------------------------------------------------------------------------
// The seed's two examples, exactly

static void test_seed_examples() {
    Tensor x = requires_grad(tensor(2.0));
    Tensor y = x * x + 3 * x + 4;
    check(scalar_value(y) == 14, "seed example: y = x*x + 3*x + 4 at x = 2 is %s",
          to_string(y).c_str());
    backward(y);
    check(scalar_value(grad(x)) == 7, "seed example: dy/dx at x = 2 is %s",
          to_string(grad(x)).c_str());

    Tensor a = requires_grad(randn({6, 5, 4, 3, 2}, 1)),
           b = requires_grad(randn({6, 5, 4, 3, 2}, 2));
    backward(a * b);
    check(to_host(grad(a)) == to_host(b),
          "seed example: c = a*b on (6,5,4,3,2) gives a.grad == b exactly");
    check(to_host(grad(b)) == to_host(a),
          "seed example: c = a*b on (6,5,4,3,2) gives b.grad == a exactly");
}

// ----------------------------------------------------------------------------------------------------
// Gradients of every operation, on several shapes including sizes that divide nothing

static void test_elementwise_gradients() {
    // Broadcasting pairs: same shape, scalar, trailing dims, leading dims with 1s, both sides
    // stretched.
    std::vector<std::pair<std::vector<int>, std::vector<int>>> pairs = {
        {{3, 37}, {3, 37}},     {{2, 3, 5}, {}},   {{2, 3, 5}, {5}},
        {{4, 3, 7}, {4, 1, 1}}, {{5, 1}, {1, 33}}, {{}, {2, 3}}};
    auto make = [](const std::vector<int>& dims, uint64_t seed, bool positive) {
        Tensor t;
        t.ndim = int(dims.size());
        for (int d = 0; d < t.ndim; d++) t.shape[d] = dims[d];
        t.data = device_alloc<real>(t.size());
        if (positive) fill_uniform(t.data, t.size(), seed, 0.5, 2.0);
        else fill_normal(t.data, t.size(), seed, 0, 1);
        return requires_grad(t);
    };
    struct Binary {
        const char* name;
        Tensor (*f)(Tensor, Tensor);
        bool positive_b;
    };
    Binary binaries[] = {{"add", add, false},         {"sub", sub, false},
                         {"mul", mul, false},         {"div", div, true},
                         {"maximum", maximum, false}, {"minimum", minimum, false}};
    for (const Binary& op : binaries) {
        for (auto& [da, db] : pairs) {
            Tensor a = make(da, 10, false), b = make(db, 11, op.positive_b);
            check_gradient(std::string(op.name) + " " + describe({a, b}),
                           [=] { return op.f(a, b); }, {a, b});
        }
    }

    struct Unary {
        const char* name;
        std::function<Tensor(Tensor)> f;
        bool positive;
    };
    Unary unaries[] = {{"neg", neg, false},
                       {"exp", [](Tensor x) { return exp(x); }, false},
                       {"log", [](Tensor x) { return log(x); }, true},
                       {"sqrt", [](Tensor x) { return sqrt(x); }, true},
                       {"sin", [](Tensor x) { return sin(x); }, false},
                       {"cos", [](Tensor x) { return cos(x); }, false},
                       {"tanh", [](Tensor x) { return tanh(x); }, false},
                       {"sigmoid", sigmoid, false},
                       {"relu", relu, false},
                       {"pow 3", [](Tensor x) { return pow_scalar(x, 3); }, false},
                       {"pow -0.5", [](Tensor x) { return pow_scalar(x, -0.5); }, true},
                       {"x * 2.5", [](Tensor x) { return x * 2.5; }, false},
                       {"x + 7", [](Tensor x) { return x + 7; }, false},
                       {"3 - x", [](Tensor x) { return 3 - x; }, false},
                       {"x / 4", [](Tensor x) { return x / 4; }, false}};
    for (const Unary& op : unaries) {
        Tensor x = op.positive ? positive_input({3, 41}, 20) : input({3, 41}, 20);
        check_gradient(std::string(op.name) + " " + describe({x}), [=] { return op.f(x); }, {x});
    }
}

static void test_reduction_gradients() {
    struct Reduction {
        const char* name;
        Tensor (*axis_f)(Tensor, int);
        Tensor (*all_f)(Tensor);
    };
    Reduction reductions[] = {
        {"sum", sum, sum}, {"mean", mean, mean}, {"max", max, max}, {"min", min, min}};
    for (int lanes : {1, 32, 8}) {
        threads_per_row = lanes;
        for (const Reduction& op : reductions) {
            Tensor x = input({3, 37, 5}, 30 + lanes);
            for (int axis : {0, 1, 2})
                check_gradient(std::string(op.name) + " over axis " + std::to_string(axis) +
                                   " of " + describe({x}) + ", " + std::to_string(lanes) +
                                   " threads per row",
                               [=] { return op.axis_f(x, axis); }, {x});
            check_gradient(std::string(op.name) + " of all " + describe({x}) + ", " +
                               std::to_string(lanes) + " threads per row",
                           [=] { return op.all_f(x); }, {x});
        }
        Tensor x = input({4, 3, 37}, 40);
        check_gradient("softmax over the last axis of " + describe({x}) + ", " +
                           std::to_string(lanes) + " threads per row",
                       [=] { return softmax(x); }, {x});
        Tensor single = input({1, 1}, 41);
        check_gradient("softmax of a row of one " + describe({single}) + ", " +
                           std::to_string(lanes) + " threads per row",
                       [=] { return softmax(single); }, {single});
    }
    threads_per_row = default_lanes;
}

static void test_shape_and_product_gradients() {
    Tensor r = input({2, 3, 5}, 50);
    check_gradient("reshape (2,3,5) -> (5,-1) then a product",
                   [=] {
                       return reshape(r, {5, -1}) * reshape(r, {5, 6});
                   },
                   {r});
    Tensor t = input({2, 3, 5, 7}, 51);
    for (std::pair<int, int> dims :
         std::vector<std::pair<int, int>>{{0, 1}, {1, 3}, {-1, -2}, {0, 3}})
        check_gradient("transpose dims " + std::to_string(dims.first) + "," +
                           std::to_string(dims.second) + " of " + describe({t}),
                       [=] { return transpose(t, dims.first, dims.second); }, {t});

    Tensor a = input({5, 7}, 60), b = input({7, 3}, 61);
    check_gradient("matmul " + describe({a, b}), [=] { return matmul(a, b); }, {a, b});
    Tensor ba = input({2, 3, 5, 7}, 62), shared = input({7, 9}, 63), bb = input({2, 3, 7, 4}, 64);
    check_gradient("matmul with shared right side " + describe({ba, shared}),
                   [=] { return matmul(ba, shared); }, {ba, shared});
    check_gradient("batched matmul " + describe({ba, bb}), [=] { return matmul(ba, bb); },
                   {ba, bb});

    // A composite: the expression graph reuses x, so gradients must accumulate from several uses.
    Tensor x = input({4, 6}, 70), w = input({6, 6}, 71);
    check_gradient("composite softmax(tanh(x @ w) * x) / (1 + exp(x))",
                   [=] { return softmax(tanh(matmul(x, w)) * x) / (1 + exp(x)); }, {x, w});
}

// ----------------------------------------------------------------------------------------------------
// Kernel results against plain CPU loops

// Masked entries (-inf) get probability 0 and leave the rest as the softmax of the others,
// whichever thread of the row meets them first. hx: the values of a (6, 45) tensor.
static void check_masked_softmax(const std::vector<real>& hx, int lanes) {
    std::vector<real> masked = hx, masked_soft(hx.size(), 0);
    for (int r = 0; r < 6; r++) {
        double top = -INFINITY, total = 0;
        for (int c = 0; c < 45; c++)
            if ((c + r) % 3 == 0) masked[r * 45 + c] = -INFINITY;
            else top = std::max(top, double(hx[r * 45 + c]));
        for (int c = 0; c < 45; c++)
            if ((c + r) % 3) total += std::exp(hx[r * 45 + c] - top);
        for (int c = 0; c < 45; c++)
            if ((c + r) % 3) masked_soft[r * 45 + c] = real(std::exp(hx[r * 45 + c] - top) / total);
    }
    Tensor x_masked = randn({6, 45}, 5);
    copy_from_host(x_masked, masked.data());
    check(max_difference(to_host(softmax(x_masked)), masked_soft) < 1e-14,
          "softmax (6,45) with a third of each row -inf matches the CPU loop, %d threads per row",
          lanes);
}

static void test_forward_against_loops() {
    NoGrad no_grad;
    Tensor a = randn({4, 3, 7}, 1), b = randn({3, 1}, 2);
    std::vector<real> ha = to_host(a), hb = to_host(b), expected(ha.size());
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 3; j++)
            for (int k = 0; k < 7; k++)
                expected[(i * 3 + j) * 7 + k] = ha[(i * 3 + j) * 7 + k] * hb[j];
    check(max_difference(to_host(a * b), expected) == 0,
          "broadcast mul (4,3,7) * (3,1) equals the CPU loop exactly");

    Tensor m = randn({2, 5, 7}, 3), n = randn({2, 7, 3}, 4);
    std::vector<real> hm = to_host(m), hn = to_host(n), product(2 * 5 * 3, 0);
    for (int p = 0; p < 2; p++)
        for (int i = 0; i < 5; i++)
            for (int j = 0; j < 3; j++)
                for (int k = 0; k < 7; k++)
                    product[(p * 5 + i) * 3 + j] +=
                        hm[(p * 5 + i) * 7 + k] * hn[(p * 7 + k) * 3 + j];
    check(max_difference(to_host(matmul(m, n)), product) < 1e-12,
          "batched matmul (2,5,7) @ (2,7,3) matches the triple loop");

    for (int lanes : {1, 32}) {
        threads_per_row = lanes;
        Tensor x = randn({6, 45}, 5);
        std::vector<real> hx = to_host(x), soft(hx.size()), row_sums(6, 0), col_max(45, -INFINITY);
        for (int r = 0; r < 6; r++) {
            double top = -INFINITY, total = 0;
            for (int c = 0; c < 45; c++) top = std::max(top, double(hx[r * 45 + c]));
            for (int c = 0; c < 45; c++) total += std::exp(hx[r * 45 + c] - top);
            for (int c = 0; c < 45; c++)
                soft[r * 45 + c] = real(std::exp(hx[r * 45 + c] - top) / total);
            for (int c = 0; c < 45; c++)
                row_sums[r] += hx[r * 45 + c], col_max[c] = std::max(col_max[c], hx[r * 45 + c]);
        }
        check(max_difference(to_host(softmax(x)), soft) < 1e-14,
              "softmax (6,45) matches the CPU loop, %d threads per row", lanes);
        check_masked_softmax(hx, lanes);
        check(max_difference(to_host(sum(x, 1)), row_sums) < 1e-12,
              "sum over axis 1 of (6,45) matches the CPU loop, %d threads per row", lanes);
        check(max_difference(to_host(max(x, 0)), col_max) == 0,
              "max over axis 0 of (6,45) matches the CPU loop, %d threads per row", lanes);
    }
    threads_per_row = default_lanes;

    Tensor t = randn({2, 3, 4}, 6);
    std::vector<real> ht = to_host(t), transposed(24);
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 3; j++)
            for (int k = 0; k < 4; k++) transposed[(k * 3 + j) * 2 + i] = ht[(i * 3 + j) * 4 + k];
    check(max_difference(to_host(transpose(t, 0, 2)), transposed) == 0,
          "transpose of dims 0 and 2 of (2,3,4) matches the CPU loop");

    Tensor u = rand_uniform({100000}, 7, -1, 3);
    std::vector<real> hu = to_host(u);
    double total = 0, lowest = INFINITY, highest = -INFINITY;
    for (real v : hu)
        total += v, lowest = std::min(lowest, double(v)), highest = std::max(highest, double(v));
    check(std::fabs(total / hu.size() - 1) < 0.02 && lowest >= -1 && highest < 3,
          "uniform [-1, 3): mean %.4f, min %.4f, max %.4f", total / hu.size(), lowest, highest);
    Tensor g = randn({100000}, 8, 2, 3);
    std::vector<real> hg = to_host(g);
    double m1 = 0, m2 = 0;
    for (real v : hg) m1 += v, m2 += v * v;
    m1 /= hg.size(), m2 = m2 / hg.size() - m1 * m1;
    check(std::fabs(m1 - 2) < 0.05 && std::fabs(std::sqrt(m2) - 3) < 0.05,
          "normal(2, 3): mean %.4f, std %.4f", m1, std::sqrt(m2));
    check(to_host(randn({1000}, 9)) == to_host(randn({1000}, 9)) &&
              to_host(randn({1000}, 9)) != to_host(randn({1000}, 10)),
          "random draws repeat with the same seed and differ with another");
}

// ----------------------------------------------------------------------------------------------------
// The tape, memory and printing

static void test_tape_recording() {
    Tensor x = requires_grad(tensor(3.0));
    size_t before = tape_length();
    {
        NoGrad no_grad;
        Tensor y = x * x;
        check(!y.requires_grad() && tape_length() == before,
              "no-grad scope: nothing recorded and the result has no gradient");
    }
    Tensor y = x * x;
    check(y.requires_grad() && tape_length() == before + 1,
          "with gradients on, x*x is recorded on the tape");
    backward(y);
    check(tape_length() == before + 1, "backward keeps the tape (memory_release drops it)");
    backward(x * x);
    check(scalar_value(grad(x)) == 12,
          "gradients accumulate across two backward passes (6 + 6 = %s)",
          to_string(grad(x)).c_str());
    zero_grad(x);
    check(scalar_value(grad(x)) == 0, "zero_grad clears the gradient");
}

static void test_tape_semantics() {
    // Like PyTorch (and unlike a tape that is run whole and cleared): backward runs only what its
    // tensor depends on, and leaf gradients add up across calls.
    {
        Tensor x = requires_grad(tensor(1.0));
        Tensor y1 = x * 2, y2 = x * 3;
        backward(y1);
        double after_first = scalar_value(grad(x));
        backward(y2);
        check(after_first == 2 && scalar_value(grad(x)) == 5,
              "y1 = 2x, y2 = 3x: backward(y1) gives grad(x) = %g, then backward(y2) %g (2, then 5)",
              after_first, scalar_value(grad(x)));
    }
    {  // a shared subexpression: z = x^2, a = z + 1, b = 2z; da/dx + db/dx = 2x + 4x
        Tensor x = requires_grad(tensor(1.5));
        Tensor z = x * x, a = z + 1, b = z * 2;
        backward(a);
        backward(b);
        double got = scalar_value(grad(x));
        check(std::fabs(got - 9.0) < 1e-12,
              "shared subexpression z = x^2 in a = z + 1 and b = 2z: backward(a), backward(b) give "
              "%g (6x = 9)",
              got);
        backward(b);
        check(std::fabs(scalar_value(grad(x)) - 15.0) < 1e-12 && scalar_value(grad(z)) == 2,
              "backward(b) again adds 4x more (%g), and z's own gradient is b's alone (%g)",
              scalar_value(grad(x)), scalar_value(grad(z)));
    }
    check_fails("backward of a tensor without a gradient", "does not require a gradient",
                [] { backward(tensor(1.0) * 2); });
}

static void test_arena_and_printing() {
    {  // a large request grows the arena by about its size (a GPU commits every byte asked for)
        size_t before = memory_reserved();
        MemoryMark mark = memory_mark();
        device_alloc(size_t(100) << 20);
        size_t grown = memory_reserved() - before;
        memory_release(mark);
        check(grown <= (size_t(102) << 20),
              "a 100 MB request grows the arena by %zu MB, not by doubling", grown >> 20);
    }
    // A "training step" run repeatedly: after the first, the arena takes nothing more from the
    // system.
    Tensor w = requires_grad(randn({64, 64}, 1));
    auto step = [&] {
        MemoryMark mark = memory_mark();
        Tensor h = randn({32, 64}, 2);
        for (int i = 0; i < 4; i++) h = tanh(matmul(h, w));
        backward(mean(h));
        memory_release(mark);
    };
    size_t in_use = memory_in_use();
    step();
    size_t reserved = memory_reserved();
    for (int i = 0; i < 5; i++) step();
    size_t tape_before = tape_length();
    step();
    check(
        memory_reserved() == reserved && memory_in_use() == in_use && tape_length() == tape_before,
        "memory_release returns the arena and the tape to the mark; later steps reserve nothing "
        "more (%zu bytes)",
        reserved);

    check(to_string(tensor(14.0)) == "Tensor(14.0)", "printing a scalar: %s",
          to_string(tensor(14.0)).c_str());
    check(to_string(tensor({1, 2.5, -3}, {3})) == "Tensor([1.0, 2.5, -3.0])",
          "printing a vector: %s", to_string(tensor({1, 2.5, -3}, {3})).c_str());
    check(
        to_string(tensor({1, 2, 3, 4}, {2, 2})) == "Tensor([[1.0, 2.0], [3.0, 4.0]], shape=(2, 2))",
        "printing a matrix: %s", to_string(tensor({1, 2, 3, 4}, {2, 2})).c_str());
    std::string big = to_string(zeros({100, 100}));
    check(big.size() < 400 && big.find("...") != std::string::npos &&
              big.find("shape=(100, 100)") != std::string::npos,
          "printing a 100x100 tensor is shortened (%zu characters)", big.size());

    check_fails("broadcasting (2,3) with (4,)", "cannot broadcast", [] {
        add(zeros({2, 3}), zeros({4}));
    });
    check_fails("reshaping 6 elements to (4, -1)", "cannot view", [] {
        reshape(zeros({2, 3}), {4, -1});
    });
    check_fails("matmul (2,3) @ (4,5)", "do not match", [] {
        matmul(zeros({2, 3}), zeros({4, 5}));
    });
    check_fails("a 7-dim tensor", "at most 6 dims", [] { zeros({1, 1, 1, 1, 1, 1, 1}); });
    check(reshape(zeros({2, 3, 4}), {-1, 4}).dim(0) == 6, "reshape infers a -1 dim");
}

// ----------------------------------------------------------------------------------------------------
// Layers

static int* device_ints(const std::vector<int>& values) {
    int* d = device_alloc<int>(values.size());
    cuda_check(cudaMemcpy(d, values.data(), values.size() * sizeof(int), cudaMemcpyHostToDevice));
    return d;
}

static std::string lanes_note() {
    return ", " + std::to_string(threads_per_row) + " threads per row";
}

static void test_layer_gradients() {
    Tensor wte = input({11, 7}, 1), wpe = input({5, 7}, 2);
    int* tokens = device_ints({3, 1, 3, 10, 0, 3, 3, 7, 1, 2});  // (2, 5) with repeats
    check_gradient("embedding, tokens (2,5) with repeats, wte (11,7), wpe (5,7)",
                   [=] { return embedding(tokens, 2, 5, wte, wpe); }, {wte, wpe});
    check_gradient("embedding without positions (rotary models)",
                   [=] { return embedding(tokens, 2, 5, wte, Tensor{}); }, {wte});

    Tensor x = input({3, 5, 7}, 3), w = input({9, 7}, 4), b = input({9}, 5);
    check_gradient("linear (3,5,7) -> 9 with bias", [=] { return linear(x, w, b); }, {x, w, b});
    check_gradient("linear (3,5,7) -> 9 without bias", [=] { return linear(x, w, Tensor{}); },
                   {x, w});
    for (int lanes : {1, 32}) {
        threads_per_row = lanes;
        check_gradient("fused linear + gelu (3,5,7) -> 9" + lanes_note(),
                       [=] { return linear_gelu(x, w, b); }, {x, w, b});
    }
    threads_per_row = default_lanes;

    for (int lanes : {1, 32, 8}) {
        threads_per_row = lanes;
        Tensor h = input({2, 3, 37}, 6), g = input({37}, 7), beta = input({37}, 8);
        check_gradient("layernorm (2,3,37)" + lanes_note(), [=] { return layernorm(h, g, beta); },
                       {h, g, beta});
        check_gradient("rmsnorm (2,3,37)" + lanes_note(), [=] { return rmsnorm(h, g); }, {h, g});
        Tensor branch = input({2, 3, 37}, 9);
        for (Norm kind : {Norm::layernorm, Norm::rmsnorm}) {
            std::string name = kind == Norm::layernorm ? "layernorm" : "rmsnorm";
            check_gradient(
                "fused residual + " + name + " (2,3,37), both outputs used" + lanes_note(),
                [=] {
                    ResidualNorm r = residual_norm(h, branch, g, beta, kind);
                    return r.sum * 0.5 + r.normalized;
                },
                {h, branch, g, beta});
        }
        // 69 rows: the backward's slabs of 32 rows, the last one partial; and a norm whose input
        // needs no gradient (only dw and db are formed)
        Tensor tall = input({3, 23, 11}, 10), g11 = input({11}, 11), beta11 = input({11}, 12);
        check_gradient("layernorm (3,23,11), three slabs of rows" + lanes_note(),
                       [=] { return layernorm(tall, g11, beta11); }, {tall, g11, beta11});
        check_gradient("rmsnorm (3,23,11), three slabs of rows" + lanes_note(),
                       [=] { return rmsnorm(tall, g11); }, {tall, g11});
        Tensor fixed = randn({3, 23, 11}, 13);
        check_gradient("layernorm (3,23,11) of an input without a gradient" + lanes_note(),
                       [=] { return layernorm(fixed, g11, beta11); }, {g11, beta11});
    }
    // Rows whose 2 C sums do not fit in 48 KB of shared memory for even one group of the GPU's
    // launch shape (C > 6144 floats, 3072 doubles): the backward keeps them in its slab's partial
    // row
    threads_per_row = 32;
    int long_row = (48 << 10) / (2 * sizeof(real)) + 3;
    Tensor wide = input({2, 1, long_row}, 14), g_wide = input({long_row}, 15),
           beta_wide = input({long_row}, 16);
    check_gradient(
        "layernorm (2,1," + std::to_string(long_row) + "), sums past shared memory" + lanes_note(),
        [=] { return layernorm(wide, g_wide, beta_wide); }, {wide, g_wide, beta_wide});
    threads_per_row = default_lanes;

    Tensor a = input({3, 41}, 9);
    check_gradient("gelu (tanh approximation) (3,41)", [=] { return gelu(a); }, {a});
    check_gradient("silu (3,41)", [=] { return silu(a); }, {a});
    check_gradient("swiglu (3,41,2*5) -> (3,41,5)",
                   [=] {
                       return swiglu(reshape(a, {3, 41, 1}) * input({10}, 10));
                   },
                   {a});
    Tensor sw = input({4, 6}, 11);
    check_gradient("swiglu (4,6) -> (4,3)", [=] { return swiglu(sw); }, {sw});
    check_gradient("dropout p=0.3 with a fixed seed", [=] { return dropout(a, 0.3, 77); }, {a});
}

static void test_attention_and_small_layer_gradients() {
    Tensor r1 = input({2, 9}, 12), r2 = input({2, 9}, 13);
    check_gradient("residual (2,9) + (2,9)", [=] { return residual(r1, r2); }, {r1, r2});
    Tensor q = input({2, 3, 5, 8}, 14);
    check_gradient("rotary embedding on (B,T,NH,hs) = (2,3,5,8)", [=] { return rotary(q); }, {q});
    Tensor m1 = input({3, 7}, 15), m2 = input({3, 7}, 16);
    check_gradient("mean squared error (3,7)", [=] { return mse(m1, m2); }, {m1, m2});

    for (int lanes : {1, 32, 8}) {
        threads_per_row = lanes;
        for (bool flash : {false, true}) {
            attention_kernels = flash ? AttentionKernels::flash : AttentionKernels::plain;
            std::string kind = std::string(flash ? "flash" : "plain") + " attention";
            Tensor qkv = input({2, 5, 36}, 17);  // C = 12, 3 heads of 4
            check_gradient(kind + " (2,5,3*12), 3 heads" + lanes_note(),
                           [=] { return attention(qkv, 3, false, 0, 0); }, {qkv});
            check_gradient(kind + " with rotary positions" + lanes_note(),
                           [=] { return attention(qkv, 3, true, 0, 0); }, {qkv});
            check_gradient(kind + " with dropout 0.25 on the probabilities" + lanes_note(),
                           [=] { return attention(qkv, 3, false, 0.25, 5); }, {qkv});
            Tensor single = input({3, 1, 18}, 18);
            check_gradient(kind + " with T=1, 2 heads of 3" + lanes_note(),
                           [=] { return attention(single, 2, false, 0, 0); }, {single});
            Tensor longer = input({1, 37, 36}, 19);  // T past one 32-key tile
            check_gradient(kind + " with T=37, 2 heads of 6, rotary, dropout 0.1" + lanes_note(),
                           [=] { return attention(longer, 2, true, 0.1, 6); }, {longer});
        }
        attention_kernels = AttentionKernels::fastest;

        Tensor logits = input({7, 37}, 19);
        int* targets = device_ints({3, 36, ignore_index, 0, 5, 5, 20});
        check_gradient("cross-entropy (7,37) with an ignored row" + lanes_note(),
                       [=] { return cross_entropy(logits, targets); }, {logits});
    }
    threads_per_row = default_lanes;
}

static void test_layer_values() {
    // Cross-entropy value against a plain loop.
    Tensor logits = randn({4, 9}, 20);
    std::vector<int> host_targets = {2, ignore_index, 8, 0};
    std::vector<real> l = to_host(logits);
    double expected = 0;
    for (int n = 0; n < 4; n++) {
        if (host_targets[n] == ignore_index) continue;
        double top = -INFINITY, total = 0;
        for (int v = 0; v < 9; v++) top = std::max(top, double(l[n * 9 + v]));
        for (int v = 0; v < 9; v++) total += std::exp(l[n * 9 + v] - top);
        expected += top + std::log(total) - l[n * 9 + host_targets[n]];
    }
    expected /= 3;
    double got = scalar_value(cross_entropy(logits, device_ints(host_targets)));
    check(
        std::fabs(got - expected) < 1e-12,
        "cross-entropy equals the mean over non-ignored rows of logsumexp - logit[target] (%.12f)",
        got);

    // Dropout masks: same seed, same mask; another seed, another mask; about p dropped.
    Tensor big = ones({10000});
    std::vector<real> m_a = to_host(dropout(big, 0.2, 1)), m_b = to_host(dropout(big, 0.2, 1)),
                      m_c = to_host(dropout(big, 0.2, 2));
    long dropped = 0;
    for (real v : m_a) dropped += v == 0;
    check(m_a == m_b, "dropout: the same seed gives the same mask");
    check(m_a != m_c, "dropout: another seed gives another mask");
    check(dropped > 1800 && dropped < 2200 && (m_a[0] == 0 || std::fabs(m_a[0] - 1.25) < 1e-12),
          "dropout p=0.2: %ld of 10000 dropped, kept ones scaled to 1.25", dropped);

    // Flash and plain attention compute the same thing: outputs and input gradients agree. Small
    // heads with dropout, then GPT-2's head sizes (64, 128) with T = 100 over four key tiles (the
    // 128-value head needs the kernels' shared-memory opt-in above 48 KB).
    struct Case {
        int T, C, heads;
        bool rotary;
        real dropout;
    };
    for (Case c :
         {Case{70, 16, 4, false, 0.2}, Case{100, 128, 2, true, 0}, Case{100, 256, 2, false, 0.1}})
        for (int lanes : {1, 32}) {
            threads_per_row = lanes;
            Tensor qkv = requires_grad(randn({2, c.T, 3 * c.C}, 23));
            std::vector<real> outputs[2], grads[2];
            for (int flash = 0; flash < 2; flash++) {
                attention_kernels = flash ? AttentionKernels::flash : AttentionKernels::plain;
                zero_grad(qkv);
                Tensor out = attention(qkv, c.heads, c.rotary, c.dropout, 9);
                outputs[flash] = to_host(out);
                backward(project(out));
                grads[flash] = to_host(grad(qkv));
            }
            attention_kernels = AttentionKernels::fastest;
            check(max_difference(outputs[0], outputs[1]) < 1e-12 &&
                      max_difference(grads[0], grads[1]) < 1e-12,
                  "flash and plain attention agree on (2,%d,3*%d), %d heads of %d%s, dropout %.1f: "
                  "output diff %.1e, gradient diff %.1e%s",
                  c.T, c.C, c.heads, c.C / c.heads, c.rotary ? ", rotary" : "", double(c.dropout),
                  max_difference(outputs[0], outputs[1]), max_difference(grads[0], grads[1]),
                  lanes_note().c_str());
        }
    threads_per_row = default_lanes;
}

// ----------------------------------------------------------------------------------------------------
// The seed's examples, built from layers (as in the README)

// MultiHeadSelfAttention(embedding_dim=32, n_heads=2, context_window=32) on a (4, 32, 32) tensor of
// ones, then backward: the input's gradient has the input's shape and matches finite differences.
static void test_seed_attention_example() {
    Parameters params;
    parameters_create(&params, 4 * 32 * 32 + 4 * 32);
    MultiHeadAttention attention = multi_head_attention_layer(&params, 32, 2, /*seed=*/1);
    Tensor x = requires_grad(ones({4, 32, 32}));
    Tensor y = multi_head_attention(x, attention);
    backward(y);
    check(shape_string(grad(x)) == "(4, 32, 32)" && shape_string(y) == "(4, 32, 32)",
          "seed's attention example: output %s, input gradient %s", shape_string(y).c_str(),
          shape_string(grad(x)).c_str());
    zero_grad(x);
    check_gradient("seed's attention example, the input's gradient",
                   [=] { return multi_head_attention(x, attention); }, {x});
}

// A 2-layer MLP learns XOR with AdamW: tanh hidden layer of 8, mean squared error.
static void test_xor_mlp() {
    Parameters params;
    parameters_create(&params, 64);
    Linear hidden = linear_layer(&params, 2, 8, /*seed=*/1),
           output = linear_layer(&params, 8, 1, 2);
    AdamW adam;
    adam.weight_decay = 0;
    adamw_create(&adam, params.size);
    Tensor x = tensor({0, 0, 0, 1, 1, 0, 1, 1}, {4, 2}), y = tensor({0, 1, 1, 0}, {4, 1});
    std::vector<real> prediction;
    double loss = 0;
    for (int step = 0; step < 300; step++) {
        MemoryMark mark = memory_mark();
        Tensor out = linear(tanh(linear(x, hidden)), output);
        Tensor error = mse(out, y);
        parameters_zero_grad(params);
        backward(error);
        adamw_update(&adam, params, real(0.05));
        loss = to_host(error)[0], prediction = to_host(out);
        memory_release(mark);
    }
    bool right = prediction.size() == 4;
    for (int i = 0; right && i < 4; i++)
        right = std::fabs(prediction[i] - (i == 1 || i == 2)) < 0.1;
    check(right && loss < 1e-3,
          "an MLP learns XOR in 300 AdamW steps: loss %.2e, outputs %.3f %.3f %.3f %.3f", loss,
          prediction[0], prediction[1], prediction[2], prediction[3]);
}

// ----------------------------------------------------------------------------------------------------
// The whole GPT, optimizers and model files

static GPTConfig tiny_config() {
    GPTConfig c;
    c.vocab_size = 37, c.context = 8, c.dim = 12, c.layers = 2, c.heads = 3;
    return c;
}

static void check_gpt_gradients(const std::string& what, GPTConfig config) {
    GPT model;
    gpt_create(&model, config);
    gpt_init(&model, 7);
    int B = 2, T = 5;
    std::vector<int> host_tokens(B * T), host_targets(B * T);
    for (int i = 0; i < B * T; i++)
        host_tokens[i] = int(random_bits(1, i) % 37), host_targets[i] = int(random_bits(2, i) % 37);
    int *tokens = device_ints(host_tokens), *targets = device_ints(host_targets);
    std::vector<Tensor> params;
    for (auto& named : gpt_named_parameters(model)) params.push_back(named.second);
    double error = gradient_error(
        [&] { return cross_entropy(gpt_forward_tape(model, tokens, B, T, true, 3), targets, 37); },
        params, 12);
    check(error < 1e-6,
          "gradient of a whole GPT (%s), %ld parameters, sampled from every tensor: relative error "
          "%.2e",
          what.c_str(), model.params.size, error);
}

// gpt_forward + gpt_backward (the GPT written out) against the tape: same loss, same gradients.
static void check_explicit_backward(const std::string& what, GPTConfig config, int B, int T) {
    GPT model;
    gpt_create(&model, config);
    gpt_init(&model, 9);
    std::vector<int> host(2 * B * T);
    for (int i = 0; i < 2 * B * T; i++) host[i] = int(random_bits(5, i) % config.vocab_size);
    host[B * T + 3] = ignore_index;  // one position left out of the loss
    int* tokens = device_ints(host);
    const int* targets = tokens + B * T;
    real scale = 0.5;  // as with two micro-batches
    Tensor loss =
        cross_entropy(gpt_forward_tape(model, tokens, B, T, true, 21), targets, config.vocab_size) *
        scale;
    backward(loss);
    std::vector<real> tape_grads(model.params.size), explicit_grads(model.params.size);
    cuda_check(cudaMemcpy(tape_grads.data(), model.params.grad, tape_grads.size() * sizeof(real),
                          cudaMemcpyDeviceToHost));
    parameters_zero_grad(model.params);
    GPTActivations acts;
    gpt_forward(model, acts, tokens, B, T, true, 21);
    gpt_backward(model, acts, targets, scale);
    cuda_check(cudaMemcpy(explicit_grads.data(), model.params.grad,
                          explicit_grads.size() * sizeof(real), cudaMemcpyDeviceToHost));
    double largest = 0, loss_explicit;
    for (real g : tape_grads) largest = std::max(largest, std::fabs(double(g)));
    cuda_check(cudaMemcpy(&loss_explicit, acts.loss, sizeof loss_explicit, cudaMemcpyDeviceToHost));
    double relative = max_difference(tape_grads, explicit_grads) / largest,
           loss_tape = scalar_value(loss) / scale;
    check(relative <= 1e-12 && std::fabs(loss_explicit - loss_tape) <= 1e-12 * loss_tape,
          "gpt_backward equals the tape (%s): every gradient within %.1e of the largest, loss "
          "%.12f vs %.12f",
          what.c_str(), relative, loss_explicit, loss_tape);
}

static void test_gpt_backward_equals_tape() {
    {
        GPTConfig modern = tiny_config(), dropped = tiny_config();
        modern.norm = Norm::rmsnorm, modern.activation = Activation::swiglu, modern.rotary = true,
        modern.tied_embeddings = false;
        dropped.dropout = 0.2f, dropped.attention_dropout = 0.1f;
        for (bool flash : {false, true}) {
            attention_kernels = flash ? AttentionKernels::flash : AttentionKernels::plain;
            std::string kind = flash ? "flash attention" : "plain attention";
            check_explicit_backward("layernorm, gelu, tied; " + kind, tiny_config(), 3, 7);
            check_explicit_backward("rmsnorm, swiglu, rotary, untied; " + kind, modern, 2, 8);
            threads_per_row = 32;
            check_explicit_backward(
                "dropout 0.2, attention dropout 0.1, 32 threads per row; " + kind, dropped, 2, 5);
            threads_per_row = default_lanes;
        }
        attention_kernels = AttentionKernels::fastest;
    }
}

static void test_gpt_gradients() {
    check_gpt_gradients("layernorm, gelu, tied, learned positions", tiny_config());
    GPTConfig modern = tiny_config();
    modern.norm = Norm::rmsnorm, modern.activation = Activation::swiglu, modern.rotary = true,
    modern.tied_embeddings = false;
    check_gpt_gradients("rmsnorm, swiglu, rotary, untied", modern);
    GPTConfig dropped = tiny_config();
    dropped.dropout = 0.2f, dropped.attention_dropout = 0.1f;
    threads_per_row = 32;
    check_gpt_gradients("dropout 0.2 and attention dropout 0.1, 32 threads per row", dropped);
    attention_kernels = AttentionKernels::flash;
    check_gpt_gradients("flash attention with attention dropout 0.1, 32 threads per row", dropped);
    threads_per_row = default_lanes;
    check_gpt_gradients("flash attention, rmsnorm, swiglu, rotary, untied", modern);
    attention_kernels = AttentionKernels::fastest;
}

// The tiny config's vocabulary padding (wte rows 37 to 127, first in the buffer): no gradient,
// and the rows stay zero through AdamW's decay.
static void check_vocabulary_padding(const std::vector<real>& grads,
                                     const std::vector<real>& params) {
    long first_padding = 37L * 12, end_padding = long(padded_vocab(37)) * 12;
    bool padding_zero = end_padding == 128 * 12;
    for (long i = first_padding; i < end_padding; i++)
        padding_zero = padding_zero && grads[i] == 0 && params[i] == 0;
    check(padding_zero,
          "the vocabulary is padded to 128 and its padding rows get no gradient and stay zero");
}

static void test_accumulation_and_optimizers() {
    // Gradient accumulation: two micro-batches at half weight give the gradient of the full batch.
    GPT model;
    gpt_create(&model, tiny_config());
    gpt_init(&model, 8);
    std::vector<int> host_tokens(4 * 6), host_targets(4 * 6);
    for (int i = 0; i < 24; i++)
        host_tokens[i] = int(random_bits(3, i) % 37), host_targets[i] = int(random_bits(4, i) % 37);
    int *tokens = device_ints(host_tokens), *targets = device_ints(host_targets);
    backward(cross_entropy(gpt_forward_tape(model, tokens, 4, 6, false, 0), targets, 37));
    std::vector<real> full(model.params.size), accumulated(model.params.size);
    cuda_check(cudaMemcpy(full.data(), model.params.grad, full.size() * sizeof(real),
                          cudaMemcpyDeviceToHost));
    parameters_zero_grad(model.params);
    for (int half = 0; half < 2; half++)
        backward(cross_entropy(gpt_forward_tape(model, tokens + 12 * half, 2, 6, false, 0),
                               targets + 12 * half, 37) *
                 0.5);
    cuda_check(cudaMemcpy(accumulated.data(), model.params.grad, accumulated.size() * sizeof(real),
                          cudaMemcpyDeviceToHost));
    check(max_difference(full, accumulated) < 1e-12,
          "gradient accumulation over 2 micro-batches equals the full batch (max diff %.1e)",
          max_difference(full, accumulated));

    // Gradient norm and AdamW against plain loops, with clipping active.
    std::vector<real> p0(model.params.size), g(full);
    cuda_check(
        cudaMemcpy(p0.data(), model.params.data, p0.size() * sizeof(real), cudaMemcpyDeviceToHost));
    cuda_check(
        cudaMemcpy(model.params.grad, g.data(), g.size() * sizeof(real), cudaMemcpyHostToDevice));
    real* norm = device_alloc<real>(1);
    gradient_norm(norm, model.params.grad, model.params.size);
    double expected_norm = 0;
    for (real v : g) expected_norm += double(v) * v;
    expected_norm = std::sqrt(expected_norm);
    check(std::fabs(scalar_value(Tensor{0, {}, norm, nullptr}) - expected_norm) < 1e-10,
          "gradient norm on the device equals the loop (%.6f)", expected_norm);
    AdamW adam;
    adamw_create(&adam, model.params.size);
    real max_norm = real(expected_norm / 2), lr = real(0.01);
    adamw_update(&adam, model.params, lr, norm, max_norm);
    adamw_update(&adam, model.params, lr, norm, max_norm);
    std::vector<real> p2(model.params.size);
    cuda_check(
        cudaMemcpy(p2.data(), model.params.data, p2.size() * sizeof(real), cudaMemcpyDeviceToHost));
    double worst = 0, scale = max_norm / (expected_norm + 1e-6);
    for (long i = 0; i < model.params.size; i++) {
        double p = p0[i], m = 0, v = 0, gi = g[i] * scale;
        for (int t = 1; t <= 2; t++) {
            m = 0.9 * m + 0.1 * gi, v = 0.95 * v + 0.05 * gi * gi;
            double update = m / (1 - std::pow(0.9, t)) /
                            (std::sqrt(v / (1 - std::pow(0.95, t))) + double(1e-8f));
            p -= lr * (update + (i < model.params.num_decayed ? 0.1 * p : 0));
        }
        worst = std::max(worst, std::fabs(p - p2[i]));
    }
    check(worst < 1e-10,
          "AdamW, 2 steps with clipping and decay on the %ld weight-matrix entries only, equals "
          "the loop (max diff %.1e)",
          model.params.num_decayed, worst);
    check_vocabulary_padding(full, p2);
    SGD sgd;
    sgd.momentum = 0.5f;
    sgd_create(&sgd, model.params.size);
    sgd_update(&sgd, model.params, lr, nullptr, 0);
    sgd_update(&sgd, model.params, lr, nullptr, 0);
    std::vector<real> p3(model.params.size);
    cuda_check(
        cudaMemcpy(p3.data(), model.params.data, p3.size() * sizeof(real), cudaMemcpyDeviceToHost));
    worst = 0;
    for (long i = 0; i < model.params.size; i++)
        worst = std::max(worst, std::fabs((p2[i] - lr * (g[i] + (0.5 * g[i] + g[i]))) - p3[i]));
    check(worst < 1e-12, "SGD with momentum 0.5, 2 steps, equals the loop (max diff %.1e)", worst);
}

static void test_adamw_tail_and_schedule() {
    real lr = real(0.01);
    {  // a size that is not a multiple of the 4-wide packs: the tail must be updated too
        const long n = 1027, decayed = 500;
        Parameters params;
        parameters_create(&params, n);
        params.num_decayed = decayed;
        Tensor p = parameter(&params, {int(n)});
        fill_normal(p.data, n, 30, 0, 1), fill_normal(p.grad, n, 31, 0, 1);
        std::vector<real> hp = to_host(p), hg = to_host(grad(p));
        AdamW odd;
        adamw_create(&odd, n);
        adamw_update(&odd, params, lr);
        std::vector<real> after = to_host(p);
        double worst_odd = 0;
        double b1 = double(0.9f), b2 = double(0.95f),
               wd = double(0.1f);  // AdamW keeps its settings as float
        for (long i = 0; i < n; i++) {
            double m = (1 - b1) * hg[i], v = (1 - b2) * hg[i] * hg[i];
            double expected =
                hp[i] - lr * (m / (1 - b1) / (std::sqrt(v / (1 - b2)) + double(1e-8f)) +
                              (i < decayed ? wd * hp[i] : 0));
            worst_odd = std::max(worst_odd, std::fabs(expected - after[i]));
        }
        check(worst_odd < 1e-12,
              "AdamW on 1027 parameters (a tail past the 4-wide packs) equals the loop (max diff "
              "%.1e)",
              worst_odd);
    }

    float warm = learning_rate(0, 10, 100, 1e-3f, 1e-4f),
          peak = learning_rate(9, 10, 100, 1e-3f, 1e-4f);
    float middle = learning_rate(54, 10, 100, 1e-3f, 1e-4f),
          last = learning_rate(99, 10, 100, 1e-3f, 1e-4f);
    check(
        std::fabs(warm - 1e-4f) < 1e-9f && std::fabs(peak - 1e-3f) < 1e-9f &&
            std::fabs(middle - 5.5e-4f) < 1e-5f && last == 1e-4f,
        "learning rate: warmup 1e-4 -> 1e-3, cosine through %.2e at the middle to 1e-4 at the end",
        middle);
}

// ZeRO-1: two optimizers over shards [0, 496) and [496, 1027) of one buffer (the decay boundary,
// 500, inside the second; a tail past the packs at its end) step it as one optimizer over all of
// it.
static void test_adamw_shards() {
    const long n = 1027, split = 496;
    Parameters whole, sharded;
    std::vector<real> values(n), gradients(n);
    for (long i = 0; i < n; i++)
        values[i] = real(std::sin(0.1 * i)), gradients[i] = real(std::cos(0.37 * i));
    for (Parameters* p : {&whole, &sharded}) {
        parameters_create(p, n);
        p->num_decayed = 500;
        Tensor t = parameter(p, {int(n)});
        copy_from_host(t, values.data());
        upload(t.grad, gradients.data(), n);
    }
    AdamW all, first, second;
    adamw_create(&all, n);
    adamw_create(&first, split, 0);
    adamw_create(&second, n - split, split);
    for (int step = 0; step < 2; step++) {
        adamw_update(&all, whole, real(0.01));
        adamw_update(&first, sharded, real(0.01));
        adamw_update(&second, sharded, real(0.01));
    }
    std::vector<real> moments = download(first.m, split), rest = download(second.m, n - split);
    moments.insert(moments.end(), rest.begin(), rest.end());
    double parameters_apart = max_difference(download(whole.data, n), download(sharded.data, n));
    double moments_apart = max_difference(download(all.m, n), moments);
    check(parameters_apart == 0 && moments_apart == 0,
          "AdamW over two shards of 1027 parameters (ZeRO-1) equals one over all of them: "
          "parameters %.1e and first moments %.1e apart",
          parameters_apart, moments_apart);
}

static void test_model_files() {
    // Model files: a round trip, then corrupt files rejected.
    GPT model;
    gpt_create(&model, tiny_config());
    gpt_init(&model, 8);
    std::string path = "/tmp/tricycle_test_model.bin";
    gpt_save(model, path.c_str(), {FileSection{{'N', 'O', 'T', 'E'}, "hello"}});
    GPT loaded;
    std::vector<FileSection> sections;
    gpt_load(&loaded, path.c_str(), &sections);
    std::vector<real> original(model.params.size), reloaded(model.params.size);
    cuda_check(cudaMemcpy(original.data(), model.params.data, original.size() * sizeof(real),
                          cudaMemcpyDeviceToHost));
    cuda_check(cudaMemcpy(reloaded.data(), loaded.params.data, reloaded.size() * sizeof(real),
                          cudaMemcpyDeviceToHost));
    bool same = sections.size() == 1 && sections[0].bytes == "hello";
    for (long i = 0; i < model.params.size; i++) same &= reloaded[i] == real(float(original[i]));
    check(same && loaded.config.layers == 2 && loaded.config.heads == 3,
          "model file round trip: config, every parameter (as float32) and a section");
    GPTConfig xl;  // GPT-2 1.5B: its checkpoints (16 bytes a parameter in bfloat16) load
    xl.vocab_size = 50257, xl.context = 1024, xl.dim = 1600, xl.layers = 48, xl.heads = 25;
    check(16.0 * double(gpt_parameter_count(xl)) < double(model_file_max_bytes),
          "GPT-2 1.5B's checkpoint (%.1f GB) is within the model file cap (%.1f GB)",
          16e-9 * double(gpt_parameter_count(xl)), 1e-9 * double(model_file_max_bytes));
    std::string image = read_whole_file(path.c_str(), "model file");
    auto corrupt = [&](const char* what, const char* expected, std::string bytes) {
        write_file_atomic(path.c_str(), bytes.data(), bytes.size(), "test file");
        check_fails(what, expected, [&] {
            GPT broken;
            gpt_load(&broken, path.c_str());
        });
    };
    std::string bad_magic = image, bad_version = image;
    bad_magic[0] = 'X', bad_version[4] = 9;
    corrupt("model file with a bad magic", "bad magic", bad_magic);
    corrupt("model file with a future version", "version 9", bad_version);
    corrupt("model file cut short in the parameters", "truncated",
            image.substr(0, image.size() / 2));
    corrupt("model file with bytes after the last section", "unexpected bytes", image + "junk");
    corrupt("an empty model file", "truncated", "");
    std::remove(path.c_str());
}

int main() {
    default_lanes = threads_per_row;
    printf("launch shapes: %s (%d threads per row)\n",
           launching_gpu_shapes() ? "the GPU's" : "the CPU's", threads_per_row);
    test_seed_examples();
    test_seed_attention_example();
    test_xor_mlp();
    test_elementwise_gradients();
    test_reduction_gradients();
    test_shape_and_product_gradients();
    test_forward_against_loops();
    test_tape_recording();
    test_tape_semantics();
    test_arena_and_printing();
    test_layer_gradients();
    test_attention_and_small_layer_gradients();
    test_layer_values();
    test_gpt_backward_equals_tape();
    test_gpt_gradients();
    test_accumulation_and_optimizers();
    test_adamw_tail_and_schedule();
    test_adamw_shards();
    test_model_files();
    return finish();
}
