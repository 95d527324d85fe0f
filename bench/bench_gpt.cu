// bench/bench_gpt.cu — times training steps (forward, backward, AdamW) of a GPT of a given shape on
// random tokens: no data files, no tokenizer, just the model's cost. Prints the median ms per step and
// tokens per second, and with --profile the time of every kernel and matrix product.
//
//   bench/bench_gpt [--layers 12 --heads 12 --dim 768 --vocab 50257 --context 1024] [--batch 4 --seq 64]
//                   [--steps 5] [--profile]
#include "tricycle.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

static const char* help_text =
    "usage: bench/bench_gpt [--layers N --heads N --dim N --vocab N --context N] [--batch B --seq T] [--steps N] [--profile] [--flash | --plain]\n"
    "Defaults: the GPT-2 124M shape (12 layers, 12 heads, 768 dim, vocab 50257, context 1024), B=4, T=64, 5 steps.\n";

static int bench(int argc, char** argv) {
    GPTConfig config = gpt_preset("smol");
    int B = 4, T = 64, steps = 5;
    bool profile = false;
    for (int i = 1; i < argc; i++) {
        std::string flag = argv[i];
        auto integer = [&](long max) { return int(parse_int(flag.c_str(), flag_value(argc, argv, &i), 1, max)); };
        if (flag == "--layers") config.layers = integer(1000);
        else if (flag == "--heads") config.heads = integer(1000);
        else if (flag == "--dim") config.dim = integer(1 << 16);
        else if (flag == "--vocab") config.vocab_size = integer(1 << 30);
        else if (flag == "--context") config.context = integer(1 << 20);
        else if (flag == "--batch") B = integer(1 << 20);
        else if (flag == "--seq") T = integer(1 << 20);
        else if (flag == "--steps") steps = integer(1 << 20);
        else if (flag == "--profile") profile = true;
        else if (flag == "--flash") use_flash_attention = true;
        else if (flag == "--plain") use_flash_attention = false;
        else unknown_flag(argv[i]);
    }
    GPT model;
    gpt_create(&model, config);
    gpt_init(&model, 1);
    AdamW adam;
    adamw_create(&adam, model.num_parameters);
    std::vector<int> host(2 * B * T);
    for (size_t i = 0; i < host.size(); i++) host[i] = int(random_bits(7, i) % uint64_t(config.vocab_size));
    int* tokens = device_alloc<int>(host.size());
    cuda_check(cudaMemcpy(tokens, host.data(), host.size() * sizeof(int), cudaMemcpyHostToDevice));
    real* norm = device_alloc<real>(1);
    printf("bench_gpt: %d layers, %d heads, dim %d, vocab %d (%.1fM parameters), B=%d T=%d\n", config.layers, config.heads, config.dim,
           config.vocab_size, model.num_parameters / 1e6, B, T);
    std::vector<double> times;
    for (int step = 0; step <= steps; step++) {  // step 0 warms up and is not counted
        profiling = profile && step > 0;
        double start = seconds_now();
        cuda_check(cudaMemset(model.gradients, 0, model.num_parameters * sizeof(real)));
        MemoryMark mark = memory_mark();
        Tensor loss = cross_entropy(gpt_forward(model, tokens, B, T, true, uint64_t(step)), tokens + B * T);
        backward(loss);
        gradient_norm(norm, model.gradients, model.num_parameters);
        adamw_update(&adam, model.parameters, model.gradients, model.num_decayed, real(1e-4), norm, 1);
        float value = float(to_host(loss)[0]);
        memory_release(mark);
        profiling = false;
        double seconds = seconds_now() - start;
        if (step > 0) times.push_back(seconds);
        printf("step %d: loss %.4f, %.1f ms\n", step, value, seconds * 1e3);
    }
    std::sort(times.begin(), times.end());
    double median = times[times.size() / 2];
    printf("RESULT name=bench_gpt steps=%d ms_per_step=%.1f tokens_per_s=%.0f\n", steps, median * 1e3, B * T / median);
    if (profile) profile_report(stdout, steps);
    return 0;
}

int main(int argc, char** argv) { return run_program("bench_gpt", help_text, argc, argv, bench); }
