// bench/cost_model.h — a cost model of one GPT training step on a GPU, so that the step's speed can
// be argued on paper before it is measured (bench_gpt --estimate a100|h100|h200).
//
// Every kernel and matrix product of a step (forward, backward, gradient norm, AdamW) is listed
// with the bytes it moves through device memory and the FLOPs it does, both derived from the shapes
// (B, T, C, NH, V, layers), as the code runs them today. The bfloat16 build: cuBLAS products with
// float accumulation, the linear biases in the products' cuBLASLt epilogues (bias; bias + GELU
// writing the pre-activation too; the bias gradient beside the weight gradient, then added into
// dbias). The float build: the products in TF32 tensor-op math, a bias copied into the output rows
// before its product, bias + GELU in a pass of their own, bias gradients as two-stage column sums.
// Both: the norm weights' gradients as column sums, the fused classifier, the lm-head products on
// the vocabulary padded to a multiple of 128. Its roofline time is the larger of bytes / bandwidth
// and FLOPs / peak; the adjusted time divides by the fractions of bandwidth and peak that real
// kernels reach (stated per device) and adds a launch overhead per kernel. Attention is modelled
// two ways, as the code runs them: plain (cuBLAS products and a causal softmax, the default) and
// flash: in the bfloat16 build at heads of 64 or 128 the tensor-core kernels (FlashAttention-2's
// scheme on mma.sync), otherwise the scalar kernels (a warp per query on the CUDA cores, timed by
// the instructions they issue).
#pragma once

#include "tricycle.h"

#include <string>
#include <vector>

// A GPU's datasheet figures (dense, no sparsity) and the efficiencies the model assumes on it.
struct DeviceModel {
    const char* key;    // as --estimate names it
    const char* name;   // for the printout
    double bandwidth;   // HBM, bytes/s
    double bf16_flops;  // tensor cores, FLOP/s
    double tf32_flops;  // tensor cores in TF32, FLOP/s
    double fp32_flops;  // CUDA cores, FLOP/s
    int sms;            // streaming multiprocessors
    double clock;       // Hz: the SM clock the bf16 peak implies
    // Fractions of the peaks reached (assumptions, printed with every estimate):
    double gemm;                // cuBLAS on the step's product shapes, of the tensor-core peak
    double attention_forward;   // the tensor-core flash forward, of the bf16 peak
    double attention_backward;  // and its two backward kernels
    double memory;              // the library's memory-bound kernels, of the bandwidth
};
// "a100", "h100" or "h200"; fails naming the known ones.
const DeviceModel& device_model(const std::string& key);

enum class AttentionKind { plain, flash };
const char* attention_name(AttentionKind kind);
// The attention a GPU build with this precision runs for `choice` (what `fastest` picks there: see
// AttentionKernels).
AttentionKind gpu_attention(const GPTConfig& config, AttentionKernels choice, bool bf16);

// What limits a kernel: the tensor cores (cuBLAS products, the tensor-core flash kernels forward
// and backward), the instructions a warp issues (the scalar flash kernels), the CUDA cores and
// bandwidth (the library's elementwise and row kernels), a single warp (kernels of one block that
// add up a short list), or the host (the stream waits for it).
enum class Engine { gemm, tc_forward, tc_backward, warp_issue, kernel, one_warp, host };

// One kernel (or product) of the step, all its launches together.
struct KernelCost {
    const char* phase;  // "forward", "backward", "optimizer"
    std::string name;
    double launches, bytes, flops;  // per step; a host row counts its comparisons as FLOPs
    Engine engine;
    double cycles = 0;       // warp_issue rows: SM clock cycles in all (instructions issued / 4)
    bool attention = false;  // one of attention's own kernels or products
};

// The step of a GPT with layernorm, GELU, learned positions and tied embeddings (what bench_gpt
// builds), with or without dropout on the residual branches, stored in bfloat16 or float. Fails on
// other configs.
std::vector<KernelCost> training_step_costs(const GPTConfig& config, int B, int T,
                                            AttentionKind attention, bool bf16);

// Model FLOPs per token of a training step: 6 per parameter outside the position embedding plus
// 12 L T C for attention's products (the masked half of causal attention counted too). MFU is this
// times tokens/s over the tensor-core peak (bf16; TF32 for the float build), here and in bench_gpt.
double model_flops_per_token(const GPTConfig& config, int T);

// Prints the table of kernels, the step's totals (pure roofline and adjusted), tokens/s and MFU,
// the step with each kind of attention, the device's assumed efficiencies as a line
// `EFFICIENCIES key=value ...`, and a last line `ESTIMATE key=value ...` for scripts.
void print_estimate(const GPTConfig& config, int B, int T, AttentionKind attention, bool bf16,
                    const DeviceModel& device);

// llm.c's own GPT-2 training step (karpathy/llm.c train_gpt2.cu, bf16, cuDNN attention, one GPU)
// through the same device efficiencies: its table of kernels, its modelled tokens/s, and, for the
// shape and GPU of llm.c's published figure (GPT-2 124M, B=64, T=1024, A100), a line
// `CALIBRATION model_tokens_per_s=... published_tokens_per_s=... ratio=...`; then a line
// `COMPARE ...` with the bytes its memory-bound kernels move and its launches beside ours.
void print_llmc_calibration(const GPTConfig& config, int B, int T, const DeviceModel& device);
