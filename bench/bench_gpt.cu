// bench/bench_gpt.cu — times training steps (forward, backward, AdamW) of a GPT of a given shape on
// random tokens: no data files, no tokenizer, just the model's cost. Prints the median ms per step,
// tokens per second and the model FLOPs utilisation (MFU), and with --profile the time of every
// kernel and matrix product (CUDA events on a GPU).
//
// MFU = model FLOPs per token x tokens per second / the GPU's peak. Per token a training step costs
// 6 N (N parameters outside the position embedding: 2 per multiply-add, forward plus a backward of
// twice the forward) plus 12 L T C for attention's two products of every layer — the usual
// estimate, which counts the masked half of causal attention too. The peak is bf16 dense (H100 SXM
// 989 TFLOPS, A100 312), looked up from the device name, or --peak-tflops.
//
//   bench/bench_gpt [--layers 12 --heads 12 --dim 768 --vocab 50257 --context 1024] [--batch 4
//   --seq 64]
//                   [--steps 5] [--profile]
#include "tricycle.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

static const char* help_text =
    "usage: bench/bench_gpt [--layers N --heads N --dim N --vocab N --context N] [--batch B --seq "
    "T] [--steps N]\n"
    "                       [--profile] [--flash | --plain] [--tape] [--peak-tflops X]\n"
    "Defaults: the GPT-2 124M shape (12 layers, 12 heads, 768 dim, vocab 50257, context 1024), "
    "B=4, T=64, 5 steps.\n"
    "--tape trains through the tape (gpt_forward_tape and backward) instead of gpt_forward and "
    "gpt_backward.\n";

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
    int B = 4, T = 64, steps = 5;
    bool profile = false, tape = false;
    double peak_tflops = 0;
};

static BenchOptions parse_options(int argc, char** argv) {
    BenchOptions o;
    GPTConfig& config = o.config;
    for (int i = 1; i < argc; i++) {
        std::string flag = argv[i];
        auto integer = [&](long max) {
            return int(parse_int(flag.c_str(), flag_value(argc, argv, &i), 1, max));
        };
        if (flag == "--layers") config.layers = integer(1000);
        else if (flag == "--heads") config.heads = integer(1000);
        else if (flag == "--dim") config.dim = integer(1 << 16);
        else if (flag == "--vocab") config.vocab_size = integer(1 << 30);
        else if (flag == "--context") config.context = integer(1 << 20);
        else if (flag == "--batch") o.B = integer(1 << 20);
        else if (flag == "--seq") o.T = integer(1 << 20);
        else if (flag == "--steps") o.steps = integer(1 << 20);
        else if (flag == "--profile") o.profile = true;
        else if (flag == "--flash") use_flash_attention = true;
        else if (flag == "--plain") use_flash_attention = false;
        else if (flag == "--tape") o.tape = true;
        else if (flag == "--peak-tflops")
            o.peak_tflops = parse_number(flag.c_str(), flag_value(argc, argv, &i), 1e-3, 1e6);
        else unknown_flag(argv[i]);
    }
    return o;
}

static int bench(int argc, char** argv) {
    BenchOptions o = parse_options(argc, argv);
    const GPTConfig& config = o.config;
    int B = o.B, T = o.T, steps = o.steps;
    bool profile = o.profile, tape = o.tape;
    double peak_tflops = o.peak_tflops;
    GPT model;
    gpt_create(&model, config);
    gpt_init(&model, 1);
    AdamW adam;
    adamw_create(&adam, model.params.size);
    std::vector<int> host(2 * B * T);
    for (size_t i = 0; i < host.size(); i++)
        host[i] = int(random_bits(7, i) % uint64_t(config.vocab_size));
    int* tokens = device_alloc<int>(host.size());
    cuda_check(cudaMemcpy(tokens, host.data(), host.size() * sizeof(int), cudaMemcpyHostToDevice));
    real* norm = device_alloc<real>(1);
    printf("bench_gpt: %d layers, %d heads, dim %d, vocab %d (%.1fM parameters), B=%d T=%d, %s\n",
           config.layers, config.heads, config.dim, config.vocab_size, model.params.size / 1e6, B,
           T, tape ? "through the tape" : "gpt_forward and gpt_backward");
    printf("matrix products: %s\n", gemm_engine().c_str());
    GPTActivations acts;
    std::vector<double> times;
    for (int step = 0; step <= steps; step++) {  // step 0 warms up and is not counted
        profiling = profile && step > 0;
        double start = seconds_now();
        parameters_zero_grad(model.params);
        MemoryMark mark = memory_mark();
        real value;
        if (tape) {
            Tensor loss = cross_entropy(gpt_forward_tape(model, tokens, B, T, true, uint64_t(step)),
                                        tokens + B * T, model.config.vocab_size);
            backward(loss);
            value = to_host(loss)[0];
        } else {
            gpt_forward(model, acts, tokens, B, T, true, uint64_t(step));
            gpt_backward(model, acts, tokens + B * T, 1);
            cuda_check(cudaMemcpy(&value, acts.loss, sizeof value, cudaMemcpyDeviceToHost));
        }
        gradient_norm(norm, model.params.grad, model.params.size);
        adamw_update(&adam, model.params, real(1e-4), norm, 1);
        memory_release(mark);
        profiling = false;
        double seconds = seconds_now() - start;
        if (step > 0) times.push_back(seconds);
        printf("step %d: loss %.4f, %.1f ms\n", step, double(value), seconds * 1e3);
    }
    std::sort(times.begin(), times.end());
    double median = times[times.size() / 2], tokens_per_second = B * T / median;
    double flops_per_token =
        6.0 * (model.params.size - model.wpe.size()) + 12.0 * config.layers * T * config.dim;
    if (peak_tflops == 0) peak_tflops = known_peak_tflops();
    std::string mfu =
        peak_tflops > 0
            ? " mfu=" +
                  std::to_string(100 * flops_per_token * tokens_per_second / (peak_tflops * 1e12)) +
                  "%"
            : "";
    printf(
        "RESULT name=bench_gpt steps=%d ms_per_step=%.1f tokens_per_s=%.0f model_tflops=%.3f%s\n",
        steps, median * 1e3, tokens_per_second, flops_per_token * tokens_per_second / 1e12,
        mfu.c_str());
    if (profile) profile_report(stdout, steps);
    return 0;
}

int main(int argc, char** argv) { return run_program("bench_gpt", help_text, argc, argv, bench); }
