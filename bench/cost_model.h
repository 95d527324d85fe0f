// bench/cost_model.h — a cost model of one GPT training step on a GPU, so that the step's speed can
// be argued on paper before it is measured (bench_gpt --estimate a100|h100|h200).
//
// Every kernel and matrix product of a step (forward, backward, gradient norm, AdamW) is listed
// with the bytes it moves through device memory and the FLOPs it does, both derived from the shapes
// (B, T, C, NH, V, layers). Its roofline time is the larger of bytes / bandwidth and FLOPs / peak;
// the adjusted time divides by the fractions of bandwidth and peak that real kernels reach (stated
// per device in DeviceModel) and adds a launch overhead per kernel. The step modelled is the one
// the GPU build runs with bfloat16 storage: every product through cuBLAS(Lt) in bf16 with float
// accumulation, biases (and the MLP's GELU) in the products' epilogues, bias gradients in the
// weight-gradient products' epilogues, the lm-head products on a vocabulary padded to a multiple of
// 128, and either the plain attention kernels or a tensor-core flash attention.
#pragma once

#include "tricycle.h"

#include <string>
#include <vector>

// A GPU's datasheet peaks (dense, no sparsity) and the efficiencies the model assumes on it.
struct DeviceModel {
    const char* key;    // as --estimate names it
    const char* name;   // for the printout
    double bandwidth;   // HBM, bytes/s
    double bf16_flops;  // tensor cores, FLOP/s
    double fp32_flops;  // CUDA cores, FLOP/s
    // Fractions of the peaks reached (assumptions, printed with every estimate):
    double gemm;                // cuBLAS on the step's product shapes, of the bf16 peak
    double attention_forward;   // flash attention's forward, of the bf16 peak
    double attention_backward;  // and its backward
    double memory;              // the library's memory-bound kernels, of the bandwidth (and FP32)
};
// "a100", "h100" or "h200"; fails naming the known ones.
const DeviceModel& device_model(const std::string& key);

// What limits a kernel: the tensor cores (cuBLAS products, flash attention), the CUDA cores and
// bandwidth (the library's elementwise and row kernels), a single warp (kernels of one block that
// add up a short list), or the host (the stream waits for it).
enum class Engine { gemm, attention_forward, attention_backward, kernel, one_warp, host };

// One kernel (or product) of the step, all its launches together.
struct KernelCost {
    const char* phase;  // "forward", "backward", "optimizer"
    std::string name;
    double launches, bytes, flops;  // per step; a host row counts its comparisons as FLOPs
    Engine engine;
};

// The step of a GPT with layernorm, GELU, learned positions and tied embeddings (what bench_gpt
// builds), with or without dropout on the residual branches. Fails on other configs.
std::vector<KernelCost> training_step_costs(const GPTConfig& config, int B, int T, bool flash);

// Model FLOPs per token of a training step: 6 per parameter outside the position embedding plus
// 12 L T C for attention's products (the masked half of causal attention counted too). MFU is this
// times tokens/s over the bf16 peak, here and in bench_gpt's measurements.
double model_flops_per_token(const GPTConfig& config, int T);

// Prints the table of kernels, the step's totals (pure roofline and adjusted), tokens/s and MFU,
// and a last line `ESTIMATE key=value ...` for scripts.
void print_estimate(const GPTConfig& config, int B, int T, bool flash, const DeviceModel& device);
