// bench/bench_gpt.cu — times training steps (forward, backward, AdamW) of a GPT of a given shape on
// random tokens: no data files, no tokenizer, just the model's cost. Prints the median ms per step,
// tokens per second, the model FLOPs utilisation (MFU) and the device memory a step holds, and with
// --profile the time of every kernel and matrix product (CUDA events on a GPU). With --estimate it
// runs nothing and prints the cost model's prediction for a GPU instead (bench/cost_model.h).
//
// MFU = model FLOPs per token x tokens per second / the GPU's peak. Per token a training step costs
// 6 N (N parameters outside the position embedding: 2 per multiply-add, forward plus a backward of
// twice the forward) plus 12 L T C for attention's two products of every layer — the usual
// estimate, which counts the masked half of causal attention too. The peak is bf16 dense (H100 and
// H200 SXM 989 TFLOPS, A100 312), looked up from the device name, or --peak-tflops.
//
// Beside the step it measures what the step aims at: the product floor, the step's own matrix
// products (recorded by gemm during the first step) run again alone, back to back, and the product
// peak, a large square product through the same engine and precision. The RESULT line gives both
// (floor_ms, peak_gflops), the step over its floor (floor_ratio) and the step's model FLOPs per
// second over the peak (peak_share: on a CPU, what MFU means on a GPU).
#include "tricycle.h"

#include "cost_model.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

static const char* help_text =
    "usage: bench/bench_gpt [--preset NAME] [--layers N --heads N --dim N --vocab N --context N]\n"
    "                       [--batch B --seq T] [--steps N] [--profile] [--flash | --plain]\n"
    "                       [--tape] [--peak-tflops X] [--lr X] [--no-floor]\n"
    "       bench/bench_gpt --estimate a100|h100|h200 [shape flags] [--flash | --plain]\n"
    "                       [--precision bf16|float] [--llmc]\n"
    "Defaults: the GPT-2 124M shape (12 layers, 12 heads, 768 dim, vocab 50257, context 1024),\n"
    "B=4, T=64 (at most the context), 5 steps, the default attention (flash where it runs on\n"
    "tensor cores: bf16 GPU build, heads of 64 or 128; plain elsewhere; --flash or --plain forces\n"
    "one). --preset starts from a train_gpt preset (debug, mini, shakespeare, smol); later flags\n"
    "override it. --tape trains through the tape (gpt_forward_tape and backward) instead of\n"
    "gpt_forward and gpt_backward.\n"
    "Every step trains on the same random batch at learning rate --lr (default 1e-4) and prints\n"
    "its loss. --no-floor leaves out the product floor and peak (a sanitizer run, a loss check).\n"
    "--estimate runs nothing: it prints the cost model of a training step of this shape on that\n"
    "GPU, kernel by kernel (B=16 and T=1024 unless given), for the GPU build's default attention\n"
    "(--flash: the tensor-core kernels in bf16 at heads of 64 or 128, else the scalar ones),\n"
    "in bf16 unless --precision float (TF32 products, as train_gpt runs them and this bench "
    "does).\n"
    "--llmc (with --estimate) first models llm.c's own step (karpathy/llm.c) through the same\n"
    "efficiencies and, at its published run's shape (B=64 unless given, T=1024, a100), compares\n"
    "it with llm.c's published throughput (a CALIBRATION line); then ours, as above.\n";

// The bf16 dense peak of the GPU in TFLOPS, from its name; 0 when unknown (and on the CPU build).
static double known_peak_tflops() {
#ifdef __CUDACC__
    cudaDeviceProp properties;
    cuda_check(cudaGetDeviceProperties(&properties, 0));
    std::string name = properties.name;
    if (name.find("H100") != std::string::npos || name.find("H200") != std::string::npos)
        return name.find("PCIe") != std::string::npos ? 756 : 989;
    if (name.find("A100") != std::string::npos) return 312;
#endif
    return 0;
}

struct BenchOptions {
    GPTConfig config = gpt_preset("smol");
    int B = 0, T = 0, steps = 5;  // B and T: 0 until given
    bool profile = false, tape = false, floor = true;
    double lr = 1e-4;
    AttentionKernels attention = AttentionKernels::fastest;
    double peak_tflops = 0;
    std::string estimate;  // a device name: print the cost model instead of running
    bool estimate_bf16 = true;
    bool llmc = false;  // --llmc: model llm.c's step too, against its published figure
};

// --precision: true for bf16, false for float.
static bool estimate_precision(const std::string& value) {
    if (value != "bf16" && value != "float")
        fail("--precision: expected bf16 or float, got '%s'", value.c_str());
    return value == "bf16";
}

static BenchOptions parse_options(int argc, char** argv) {
    BenchOptions o;
    GPTConfig& config = o.config;
    for (int i = 1; i < argc; i++) {
        std::string flag = argv[i];
        auto integer = [&](long max) {
            return int(parse_int(flag.c_str(), flag_value(argc, argv, &i), 1, max));
        };
        if (flag == "--preset") config = gpt_preset(flag_value(argc, argv, &i));
        else if (flag == "--layers") config.layers = integer(1000);
        else if (flag == "--heads") config.heads = integer(1000);
        else if (flag == "--dim") config.dim = integer(1 << 16);
        else if (flag == "--vocab") config.vocab_size = integer(1 << 24);
        else if (flag == "--context") config.context = integer(1 << 17);
        else if (flag == "--batch") o.B = integer(1 << 20);
        else if (flag == "--seq") o.T = integer(1 << 17);
        else if (flag == "--steps") o.steps = integer(1 << 20);
        else if (flag == "--profile") o.profile = true;
        else if (flag == "--flash") o.attention = AttentionKernels::flash;
        else if (flag == "--plain") o.attention = AttentionKernels::plain;
        else if (flag == "--tape") o.tape = true;
        else if (flag == "--no-floor") o.floor = false;
        else if (flag == "--lr")
            o.lr = parse_number(flag.c_str(), flag_value(argc, argv, &i), 0, 10);
        else if (flag == "--peak-tflops")
            o.peak_tflops = parse_number(flag.c_str(), flag_value(argc, argv, &i), 1e-3, 1e6);
        else if (flag == "--estimate") o.estimate = device_model(flag_value(argc, argv, &i)).key;
        else if (flag == "--llmc") o.llmc = true;
        else if (flag == "--precision")
            o.estimate_bf16 = estimate_precision(flag_value(argc, argv, &i));
        else unknown_flag(argv[i]);
    }
    bool estimate = !o.estimate.empty();
    attention_kernels = o.attention;
    if (o.llmc && !estimate) fail("--llmc models a GPU's step: it needs --estimate");
    if (!o.B) o.B = o.llmc ? 64 : estimate ? 16 : 4;  // llm.c's published run is at B=64
    if (!o.T) o.T = std::min(estimate ? 1024 : 64, config.context);
    gpt_check_config(config);
    if (o.T > config.context)
        fail("--seq %d exceeds the context %d (--context)", o.T, config.context);
    return o;
}

// The device memory a step holds. Nothing is freed during a step and nothing allocated after the
// first, so what is held after the steps is the peak: the library's own allocations (parameters,
// gradients and float master weights, AdamW's two moments, the planned activations, the arena of
// per-step buffers), and on a GPU cudaMemGetInfo's count since the start, which also sees cuBLAS's
// workspace.
static double print_memory(const GPT& model, const AdamW& adam, const GPTActivations& acts,
                           size_t arena_peak, size_t free_at_start) {
    const double GiB = 1024.0 * 1024 * 1024;
    const Parameters& p = model.params;
    double parameters = double(p.capacity) * (2 * sizeof(floatX) + (p.master ? sizeof(real) : 0));
    double moments = 2.0 * double(adam.n) * sizeof(real), activations = double(acts.bytes);
    double arena = double(memory_reserved()), total = parameters + moments + activations + arena;
    printf(
        "memory held by a step: %.3f GiB = parameters and gradients%s %.3f + AdamW moments %.3f + "
        "activations %.3f + arena %.3f (%.3f of it in use at most)\n",
        total / GiB, p.master ? " and master weights" : "", parameters / GiB, moments / GiB,
        activations / GiB, arena / GiB, arena_peak / GiB);
#ifdef __CUDACC__
    size_t free_now = 0, device_total = 0;
    cuda_check(cudaMemGetInfo(&free_now, &device_total));
    double taken = double(free_at_start) - double(free_now);
    printf("device memory taken since the start (cudaMemGetInfo): %.3f GiB of %.1f GiB\n",
           taken / GiB, device_total / GiB);
    total = std::max(total, taken);
#else
    (void)free_at_start;
#endif
    return total / GiB;
}

// The elements a matrix operand spans: `count` matrices `stride` apart, of rows x cols stored with
// `ld` between rows (transposed: cols x rows).
static long operand_span(long outer, long outer_stride, long inner, long inner_stride, int rows,
                         int cols, long ld, bool transpose) {
    int stored_rows = transpose ? cols : rows, stored_cols = transpose ? rows : cols;
    return (outer - 1) * outer_stride + (inner - 1) * inner_stride + (stored_rows - 1) * ld +
           stored_cols;
}

// Seconds to run these products once, back to back (the median of 5 runs after one to warm up),
// each on scratch buffers laid out as its own operands were: the same shapes, strides and batches,
// so the same cached primitives (CPU) or algorithms (GPU), with nothing else in between.
static double products_seconds(const std::vector<GemmCall>& calls) {
    long largest = 0;
    for (const GemmCall& c : calls) {
        const GemmShape& s = c.shape;
        long a = operand_span(s.outer, c.A.outer, s.inner, c.A.inner, s.M, s.K, c.A.ld,
                              c.A.transpose),
             b = operand_span(s.outer, c.B.outer, s.inner, c.B.inner, s.K, s.N, c.B.ld,
                              c.B.transpose),
             out = operand_span(s.outer, c.C.outer, s.inner, c.C.inner, s.M, s.N, c.C.ld, false);
        largest = std::max(largest, a + b + out + s.N);
    }
    MemoryMark mark = memory_mark();
    floatX* scratch = device_alloc<floatX>(size_t(largest));
    fill_uniform(scratch, largest, 3, -1, 1);
    std::vector<double> times;
    for (int run = 0; run < 6; run++) {
        cuda_check(cudaDeviceSynchronize());
        double start = seconds_now();
        for (const GemmCall& c : calls) {
            const GemmShape& s = c.shape;
            GemmInput A = c.A, B = c.B;
            GemmOutput C = c.C;
            A.data = scratch;
            B.data = scratch +
                     operand_span(s.outer, A.outer, s.inner, A.inner, s.M, s.K, A.ld, A.transpose);
            C.data = const_cast<floatX*>(B.data) +
                     operand_span(s.outer, B.outer, s.inner, B.inner, s.K, s.N, B.ld, B.transpose);
            if (C.bias)
                C.bias = C.data +
                         operand_span(s.outer, C.outer, s.inner, C.inner, s.M, s.N, C.ld, false);
            gemm(s, c.alpha, A, B, c.beta, C);
        }
        cuda_check(cudaDeviceSynchronize());
        if (run > 0) times.push_back(seconds_now() - start);
    }
    memory_release(mark);
    std::sort(times.begin(), times.end());
    return times[times.size() / 2];
}

// The product peak in FLOPs per second: a large square product (2048 on the CPU, 8192 on a GPU)
// through the same engine and precision as the step's products.
static double product_peak() {
#ifdef __CUDACC__
    const int n = 8192;
#else
    const int n = 2048;
#endif
    GemmCall square{{.M = n, .N = n, .K = n},   1, {.data = nullptr, .ld = n},
                    {.data = nullptr, .ld = n}, 0, {.data = nullptr, .ld = n}};
    return 2.0 * n * n * double(n) / products_seconds({square});
}

// Runs steps + 1 training steps (the first warms up); their times in seconds, the first left out.
// The products of the first are recorded in `products`.
static std::vector<double> run_steps(const BenchOptions& o, GPT& model, AdamW& adam,
                                     GPTActivations& acts, const int* tokens, size_t* arena_peak,
                                     std::vector<GemmCall>* products) {
    int B = o.B, T = o.T;
    real* norm = device_alloc<real>(1);
    std::vector<double> times;
    for (int step = 0; step <= o.steps; step++) {
        profiling = o.profile && step > 0;
        gemm_record = step == 0 ? products : nullptr;
        double start = seconds_now();
        parameters_zero_grad(model.params);
        MemoryMark mark = memory_mark();
        real value;
        if (o.tape) {
            Tensor loss = cross_entropy(gpt_forward_tape(model, tokens, B, T, true, uint64_t(step)),
                                        tokens + long(B) * T, model.config.vocab_size);
            backward(loss);
            value = to_host(loss)[0];
        } else {
            gpt_forward(model, acts, tokens, B, T, true, uint64_t(step));
            gpt_backward(model, acts, tokens + long(B) * T, 1);
            cuda_check(cudaMemcpy(&value, acts.loss, sizeof value, cudaMemcpyDeviceToHost));
        }
        gradient_norm(norm, model.params.grad, model.params.size);
        adamw_update(&adam, model.params, real(o.lr), norm, 1);
        *arena_peak = std::max(*arena_peak, memory_in_use());
        memory_release(mark);
        profiling = false;
        gemm_record = nullptr;
        cuda_check(cudaDeviceSynchronize());  // the optimizer's kernels too are this step's time
        double seconds = seconds_now() - start;
        if (step > 0) times.push_back(seconds);
        printf("step %d: loss %.6f, %.1f ms\n", step, double(value), seconds * 1e3);
    }
    return times;
}

static int bench(int argc, char** argv) {
    BenchOptions o = parse_options(argc, argv);
    const GPTConfig& config = o.config;
    if (!o.estimate.empty()) {
        if (o.llmc) print_llmc_calibration(config, o.B, o.T, device_model(o.estimate));
        print_estimate(config, o.B, o.T, gpu_attention(config, o.attention, o.estimate_bf16),
                       o.estimate_bf16, device_model(o.estimate));
        return 0;
    }
    use_tf32 = true;  // the float build's products on TF32 tensor cores, as train_gpt runs them
    size_t free_at_start = 0, device_total = 0;
    cuda_check(cudaMemGetInfo(&free_at_start, &device_total));
    GPT model;
    gpt_create(&model, config);
    gpt_init(&model, 1);
    AdamW adam;
    adamw_create(&adam, model.params.size);
    std::vector<int> host(2 * size_t(o.B) * o.T);
    for (size_t i = 0; i < host.size(); i++)
        host[i] = int(random_bits(7, i) % uint64_t(config.vocab_size));
    int* tokens = device_alloc<int>(host.size());
    cuda_check(cudaMemcpy(tokens, host.data(), host.size() * sizeof(int), cudaMemcpyHostToDevice));
    printf(
        "bench_gpt: %d layers, %d heads, dim %d, vocab %d (%.1fM parameters), B=%d T=%d, %s, %s "
        "attention\n",
        config.layers, config.heads, config.dim, config.vocab_size, model.params.size / 1e6, o.B,
        o.T, o.tape ? "through the tape" : "gpt_forward and gpt_backward",
        use_flash_attention(config) ? "flash" : "plain");
    printf("matrix products: %s\n", gemm_engine().c_str());
    GPTActivations acts;
    size_t arena_peak = 0;
    std::vector<GemmCall> products;
    std::vector<double> times = run_steps(o, model, adam, acts, tokens, &arena_peak, &products);
    printf("product epilogues: %s\n", gemm_epilogue_report().c_str());
    std::sort(times.begin(), times.end());
    double median = times[times.size() / 2], tokens_per_second = o.B * o.T / median;
    double flops_per_token = model_flops_per_token(config, o.T);
    double memory_gib = print_memory(model, adam, acts, arena_peak, free_at_start);
    double peak_tflops = o.peak_tflops > 0 ? o.peak_tflops : known_peak_tflops();
    std::string mfu =
        peak_tflops > 0
            ? " mfu=" +
                  std::to_string(100 * flops_per_token * tokens_per_second / (peak_tflops * 1e12)) +
                  "%"
            : "";
    std::string against_floor;
    if (o.floor) {
        double floor = products_seconds(products), peak = product_peak();  // (own scratch)
        double peak_share = flops_per_token * tokens_per_second / peak;
        printf(
            "product floor: the step's %zu matrix products alone take %.2f ms; the step is %.2fx "
            "that\nproduct peak: %.1f GFLOPS (a 2048^3 product on the CPU, 8192^3 on a GPU); the "
            "step runs its model FLOPs at %.1f%% of it\n",
            products.size(), floor * 1e3, median / floor, peak / 1e9, 100 * peak_share);
        char fields[160];
        snprintf(fields, sizeof fields,
                 " peak_gflops=%.1f peak_share=%.3f floor_ms=%.3f floor_ratio=%.2f", peak / 1e9,
                 peak_share, floor * 1e3, median / floor);
        against_floor = fields;
    }
    printf(
        "RESULT name=bench_gpt steps=%d ms_per_step=%.3f tokens_per_s=%.0f model_tflops=%.4f%s%s "
        "peak_memory_gib=%.3f\n",
        o.steps, median * 1e3, tokens_per_second, flops_per_token * tokens_per_second / 1e12,
        mfu.c_str(), against_floor.c_str(), memory_gib);
    if (o.profile) profile_report(stdout, o.steps);
    return 0;
}

int main(int argc, char** argv) { return run_program("bench_gpt", help_text, argc, argv, bench); }
