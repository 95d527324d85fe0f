// tests/gpt_parity.cu — the Tricycle half of the PyTorch parity check (tests/pytorch_parity.py is
// the other half), the way llm.c's test_gpt2 works: build a small GPT, write its weights and a
// batch, and write what Tricycle computes for them — logits, loss, every parameter gradient, and
// the losses of 10 AdamW steps. The Python script rebuilds the model in PyTorch from the same files
// and compares.
//
//   tests/gpt_parity DIR [--rmsnorm] [--swiglu] [--rotary] [--untied] [--flash]
#include "tricycle.h"

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

static void write_floats(FILE* file, const std::vector<float>& values) {
    fwrite(values.data(), sizeof(float), values.size(), file);
}

static void write_floats(FILE* file, const real* device, long n) {
    std::vector<real> host = download(device, n);
    write_floats(file, std::vector<float>(host.begin(), host.end()));
}

static int write_parity_files(int argc, char** argv) {
    if (argc < 2) fail("no output folder given (usage: tests/gpt_parity DIR [flags])");
    std::string dir = argv[1];
    GPTConfig config;
    config.vocab_size = 61, config.context = 16, config.dim = 48, config.layers = 2,
    config.heads = 4;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--rmsnorm")) config.norm = Norm::rmsnorm;
        else if (!strcmp(argv[i], "--swiglu")) config.activation = Activation::swiglu;
        else if (!strcmp(argv[i], "--rotary")) config.rotary = true;
        else if (!strcmp(argv[i], "--untied")) config.tied_embeddings = false;
        else if (!strcmp(argv[i], "--flash")) attention_kernels = AttentionKernels::flash;
        else unknown_flag(argv[i]);
    }
    GPT model;
    gpt_create(&model, config);
    gpt_init(&model, 1234);
    gpt_save(model, (dir + "/model.bin").c_str());

    const int B = 4, T = 16, V = config.vocab_size;
    std::vector<int> batch(2 + 2 * B * T);
    batch[0] = B, batch[1] = T;
    for (int i = 0; i < B * T; i++) {
        batch[2 + i] = int(random_bits(11, i) % V);
        batch[2 + B * T + i] = int(random_bits(12, i) % V);
    }
    batch[2 + B * T + 5] = ignore_index;  // one padded position
    FILE* file = fopen((dir + "/batch.bin").c_str(), "wb");
    if (!file) fail("cannot write %s/batch.bin", dir.c_str());
    fwrite(batch.data(), sizeof(int), batch.size(), file);
    fclose(file);
    int* tokens = device_alloc<int>(2 * B * T);
    cuda_check(
        cudaMemcpy(tokens, batch.data() + 2, 2 * B * T * sizeof(int), cudaMemcpyHostToDevice));
    int* targets = tokens + B * T;

    // One forward and backward: logits, loss, gradients.
    file = fopen((dir + "/tricycle.bin").c_str(), "wb");
    if (!file) fail("cannot write %s/tricycle.bin", dir.c_str());
    MemoryMark mark = memory_mark();
    Tensor logits = gpt_forward_tape(model, tokens, B, T, true, 0);  // (B, T, padded V)
    Tensor loss = cross_entropy(logits, targets, V);
    backward(loss);
    std::vector<real> padded = download(logits.data, logits.size());
    std::vector<float> real_logits;
    for (long row = 0; row < B * T; row++)
        real_logits.insert(real_logits.end(), padded.begin() + row * padded_vocab(V),
                           padded.begin() + row * padded_vocab(V) + V);
    write_floats(file, real_logits);
    write_floats(file, loss.data, 1);
    write_floats(file, gpt_file_order(config, download(model.params.grad, model.params.size)));
    memory_release(mark);

    // Ten AdamW steps, lr 1e-3, betas (0.9, 0.95), weight decay 0.1, clipping at norm 1.
    AdamW adam;
    adamw_create(&adam, model.params.size);
    real* norm = device_alloc<real>(1);
    for (int step = 0; step < 10; step++) {
        parameters_zero_grad(model.params);
        mark = memory_mark();
        loss = cross_entropy(gpt_forward_tape(model, tokens, B, T, true, 0), targets, V);
        backward(loss);
        write_floats(file, loss.data, 1);
        gradient_norm(norm, model.params.grad, model.params.size);
        adamw_update(&adam, model.params, real(1e-3), norm, 1);
        memory_release(mark);
    }
    fclose(file);
    return 0;
}

int main(int argc, char** argv) {
    return run_program(
        "gpt_parity",
        "usage: tests/gpt_parity DIR [--rmsnorm] [--swiglu] [--rotary] [--untied] [--flash]\n",
        argc, argv, write_parity_files);
}
