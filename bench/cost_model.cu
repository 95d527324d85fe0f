// bench/cost_model.cu — the cost model of bench/cost_model.h. Every kernel's bytes and FLOPs are
// written beside it, from the shapes; the efficiencies and overheads the adjusted figures assume
// are the DeviceModel table and the constants below, and every estimate prints them.
#include "cost_model.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

// The peaks, dense (no sparsity), from NVIDIA's datasheets: A100 80GB SXM (nvidia.com/en-us/data-
// center/a100: 312 TFLOPS bf16, 156 TF32, 19.5 FP32, 2,039 GB/s of HBM2e; 108 SMs at 1.41 GHz);
// H100 SXM (nvidia.com/en-us/data-center/h100: 1,979 bf16 and 989 TF32 "with sparsity", so 989 and
// 495 dense, 67 FP32, 3.35 TB/s; 132 SMs); H200 SXM (nvidia.com/en-us/data-center/h200: the H100's
// compute with 4.8 TB/s of HBM3e). The H100's SM clock here, 1.83 GHz, is the one its bf16 peak
// implies (4096 FLOPs a clock per SM).
//
// The efficiencies, and what each rests on:
// - gemm, A100 0.75: an assumption, bracketed by two published figures. FlashAttention-2 (Dao 2023,
//   arXiv 2307.08691) calls its 73% of the A100's peak (230 TFLOPS/s) "close to the efficiency of
//   GEMM operations", and its GPT-3 1.3B-2.7B training runs on 8 A100s reach 196-225 TFLOPS/s per
//   GPU (63-72% MFU, products and everything else together), so cuBLAS's bf16 products there run
//   at or above ~72%. These products are smaller (K of 768 to 3072, 16k-64k rows), so the model
//   takes a little above that floor rather than the 80-90% of large square products.
// - gemm, H100 0.60: an assumption: FlashAttention-3 (Shah et al. 2024, arXiv 2407.08608) reaches
//   75% of the H100's peak only with Hopper's warpgroup (wgmma) and TMA instructions, and these
//   products are too small to keep its bigger tiles busy; no published cuBLAS figure for these
//   shapes was found.
// - attention_forward, A100 0.50: FlashAttention-2's abstract: "50-73% of the theoretical maximum
//   FLOPs/s on A100" (forward and backward, A100 80GB SXM4, heads of 64 and 128, 512 to 16k keys);
//   heads of 64 at T = 1024 are likely that range's short, narrow end: the model takes its low end.
//   The FLOPs it divides are FlashAttention-2's own count (4 T^2 hs per head, halved for the causal
//   mask; the backward 2.5 times that). Our tensor-core kernels follow FlashAttention-2's scheme on
//   mma.sync, with its ldmatrix loads and cp.async double buffering (a tile's copy overlaps the
//   products on the tile before it), but smaller tiles (64 x 64, 4 warps) and no measurement: the
//   figure is FlashAttention-2's, not theirs, until a GPU times them (bench/gpu_first_run.sh).
// - attention_backward, A100 0.40: an assumption, below that range's low end because the backward
//   is FlashAttention-2's harder pass (it "still requires some synchronization" between warps, and
//   its dq goes through atomic adds), not read off a figure (the paper gives its backward speeds
//   only as plots).
// - attention_forward and _backward, H100 0.35 and 0.30: FlashAttention-2 on an H100 without
//   Hopper's instructions reaches "up to 335 TFLOPs/s" (the paper's Fig. 7, 34% of 989), and
//   FlashAttention-3 puts it at "only 35% utilization on the H100 GPU"; the backward, as on the
//   A100, a step lower (an assumption).
// - memory 0.70: an assumption. The best streaming kernels reach ~88-90% of the A100's HBM peak: a
//   read kernel at 1.80 of 2.04 TB/s, 88% by Nsight Compute too, "around 90%" the best kernel of a
//   GTC talk (NVIDIA developer forum, "Trouble to Reach Peak Bandwidth of A100",
//   forums.developer.nvidia.com/t/339083). The library's kernels load one value per thread at a
//   time, not 128 bits, so fewer bytes are in flight per SM: 70%. llm.c's kernels load 128 bits
//   (its Packed128), so for them 70% is likely low.
static const DeviceModel devices[] = {
    {"a100", "A100 80GB SXM", 2.04e12, 312e12, 156e12, 19.5e12, 108, 1.41e9, 0.75, 0.50, 0.40,
     0.70},
    {"h100", "H100 SXM", 3.35e12, 989e12, 495e12, 67e12, 132, 1.83e9, 0.60, 0.35, 0.30, 0.70},
    {"h200", "H200 SXM", 4.8e12, 989e12, 495e12, 67e12, 132, 1.83e9, 0.60, 0.35, 0.30, 0.70},
};

// A launch: a CPU submits a kernel in "about 4-6 us" of driver and runtime calls (measured in
// "pegainfer (3): From Launch Overhead to CUDA Graph", susun-blog.com, RTX 5070 Ti, CUDA 13); the
// model adds 4 us to every launch and overlaps none of it with the kernels before it, an upper
// bound while the queue runs ahead of the GPU (an assumption: no A100 or H100 figure was found).
constexpr double launch_seconds = 4e-6;
// A kernel run by one warp (or thread) over a short list has a few 128-byte loads in flight at
// about 0.5 us of HBM latency each: some 2 GB/s (an assumption, from the latency; these rows add up
// to under 0.1 ms a step).
constexpr double one_warp_bandwidth = 2e9;
// The host's sort of the token ids (group_tokens), per comparison of N log2 N: measured as 1.3 ms
// for 16384 ids with std::stable_sort on this project's 2-core EPYC machine.
constexpr double host_seconds_per_comparison = 5.6e-9;
// The tensor-core flash kernels (bfloat16 build, heads of 64 or 128): a block of 4 warps takes 64
// queries (keys) and walks tiles of 64 keys (queries) up to (from) the diagonal, each warp 16 rows;
// in the diagonal tile warp w computes only the 16-wide chunks its rows can see (w + 1 of 4).
constexpr int tc_rows = 64, tc_warp_rows = 16;
// The scalar flash kernels (tricycle.cu, GPU launch shapes): a warp per query (or key), 8 of
// them a block, keys (or queries) through shared memory 32 at a time.
constexpr int flash_rows_per_block = 8, flash_key_tile = 32, warp = 32;
// Warp instructions each issues per (query, key) pair it evaluates, counted from the code with P
// values of the head per thread: forward: the dot (P loads, P FMAs), its 5-step shuffle sum (5
// shuffles + 5 adds), ~12 scalar (scale, causal test, running max, 2 exponentials, running sum)
// and the output update (P loads, 2P multiply-adds); dq: two dots and two shuffle sums, ~10
// scalar, the gradient update (P loads, 2P); dk and dv: the same two dots, ~14 scalar, two
// updates (2P loads, 4P).
struct FlashInstructions {
    double per_value, fixed;
};
constexpr FlashInstructions flash_forward_instructions{5, 22}, flash_dq_instructions{7, 30},
    flash_dkdv_instructions{10, 34};
// An SM issues 4 warp instructions a clock (one per scheduler); enough warps are resident to hide
// the shuffles' latency (bench/kernel_report.sh states the occupancy).
constexpr double issue_per_clock = 4;
// The lm-head products run on the vocabulary padded to a multiple of 128.
constexpr int vocab_multiple = 128;

const DeviceModel& device_model(const std::string& key) {
    for (const DeviceModel& d : devices)
        if (key == d.key) return d;
    fail("--estimate: unknown device '%s' (expected a100, h100 or h200)", key.c_str());
}

double model_flops_per_token(const GPTConfig& config, int T) {
    double position_embedding = config.rotary ? 0 : double(config.context) * config.dim;
    return 6 * (double(gpt_parameter_count(config)) - position_embedding) +
           12.0 * config.layers * T * config.dim;
}

namespace {

// The sizes the formulas use, as doubles (their products overflow int).
struct Sizes {
    double B, T, C, NH, hs, H, V, Vp, L, P;
    double N;           // B T positions
    double e, f = 4;    // bytes of a stored value (2 in bf16, 4 in float) and of a float
    bool bf16;          // float master weights and bf16 products, or float and TF32
    double heads;       // B NH attention heads of the batch
    double att;         // B NH T T: the elements of a layer's attention matrices
    double below;       // the fraction of a causal (T, T) matrix on or below the diagonal
    bool tensor_cores;  // flash attention runs the tensor-core kernels (bf16, heads of 64 or 128)
    double tc_pairs;    // (query, key) pairs each tensor-core kernel computes per head
    double per_thread;  // P: values of a head per thread of the flash kernels' warps
    double query_pairs, key_pairs;  // (query, key) pairs the flash kernels evaluate per head
    double slabs;                   // the slabs of 32 rows a column sum adds up in (N / 32)
    bool dropout;
};

// The tensor-core kernels' work for one head: the pairs their products compute (whole tiles below
// the diagonal, (1 + 2 + 3 + 4) chunks of 16 x 16 in the diagonal tile).
//
// Their bytes: each block reads again the tiles of its head's other operand (the forward and dq
// blocks every key tile up to the diagonal, the dk/dv blocks every query tile from it), 8.5 times
// a head's K and V at T = 1024. A head's blocks run side by side (tc_block in tricycle.cu), so all
// but the first read of a tile come from L2: device memory is charged one pass over each operand,
// as the llm.c model charges cuDNN's flash attention, and the re-reads are left inside the
// kernels' assumed efficiency (FlashAttention-2's figure, whose kernels re-read the same way).
void tensor_core_counts(Sizes& s) {
    int blocks = (int(s.T) + tc_rows - 1) / tc_rows;
    double diagonal = tc_warp_rows * tc_warp_rows * (1 + 2 + 3 + 4);
    s.tc_pairs = 0;
    for (int block = 0; block < blocks; block++)
        s.tc_pairs += double(block) * tc_rows * tc_rows + diagonal;
}

// The (query, key) pairs the scalar flash kernels evaluate for one head: the forward and dq kernels
// take a block of 8 queries over every key tile up to their last query (the whole tile, the masked
// keys' dots included); the dk/dv kernel takes a block of 8 keys over the query tiles from its own.
void flash_pairs(Sizes& s) {
    int T = int(s.T);
    s.query_pairs = s.key_pairs = 0;
    for (int first = 0; first < T; first += flash_rows_per_block) {
        int last = std::min(first + flash_rows_per_block, T) - 1;
        double key_tiles = (last + flash_key_tile) / flash_key_tile;
        double query_tiles =
            std::ceil(double(T - first / flash_key_tile * flash_key_tile) / flash_key_tile);
        s.query_pairs += double(flash_rows_per_block) * flash_key_tile * key_tiles;
        s.key_pairs += double(flash_rows_per_block) * flash_key_tile * query_tiles;
    }
}

Sizes sizes_of(const GPTConfig& c, int B, int T, bool bf16) {
    Sizes s;
    s.B = B, s.T = T, s.C = c.dim, s.NH = c.heads, s.hs = double(c.dim) / c.heads;
    s.H = double(c.mlp_ratio) * c.dim, s.V = c.vocab_size, s.L = c.layers;
    s.Vp = std::ceil(s.V / vocab_multiple) * vocab_multiple;
    s.P = double(gpt_parameter_count(c));
    s.N = s.B * s.T, s.heads = s.B * s.NH, s.att = s.heads * s.T * s.T;
    s.e = bf16 ? 2 : 4, s.bf16 = bf16;
    s.below = (s.T + 1) / (2 * s.T);
    s.tensor_cores = bf16 && c.dim % c.heads == 0 && is_tensor_core_head_size(c.dim / c.heads);
    tensor_core_counts(s);
    s.per_thread = 1;
    while (s.per_thread * warp < s.hs) s.per_thread *= 2;
    flash_pairs(s);
    s.slabs = std::ceil(s.N / 32);
    s.dropout = c.dropout > 0;
    return s;
}

struct Step {
    Sizes s;
    std::vector<KernelCost> rows;
    const char* phase = "forward";
    bool attention = false;  // the rows added are attention's

    void add(const std::string& name, double launches, double bytes, double flops, Engine engine,
             double cycles = 0) {
        rows.push_back({phase, name, launches, bytes, flops, engine, cycles, attention});
    }
    // `count` products (M, K) @ (K, N) in `launches` launches: each reads both operands and writes
    // the result (reading it first when accumulating into it); 2 M N K FLOPs each.
    void product(const std::string& name, double launches, double count, double M, double N,
                 double K, bool accumulate) {
        double bytes = s.e * (M * K + K * N + M * N * (accumulate ? 2 : 1));
        add(name, launches, count * bytes, count * 2 * M * N * K, Engine::gemm);
    }
    // A linear layer's forward, `count` of them. bf16: the product's epilogue adds the bias (read
    // once). float: the bias copied into every row of the output (broadcast_rows_kernel writes
    // (N, out)), then the product added to it (beta = 1).
    void linear(const std::string& name, double count, double in, double out) {
        if (s.bf16) {
            add(name + " (bias in the epilogue)", count,
                count * s.e * (s.N * in + in * out + s.N * out + out), count * 2 * s.N * out * in,
                Engine::gemm);
            return;
        }
        add(name + ": bias into rows", count, count * s.e * (s.N * out + out), 0, Engine::kernel);
        product(name, count, count, s.N, out, in, true);
    }
    // dW (out, in) += dout^T x: (out, N) @ (N, in), and the bias gradient, `count` of each. bf16:
    // the product's epilogue sums dout's columns as it reads them into a scratch (out), then a
    // kernel adds it into dbias. float: column_sums: blocks of 32 rows write float partial sums of
    // dout (N, out), then a pass adds the slabs up into dbias.
    void weight_bias_gradient(const std::string& name, double count, double in, double out) {
        if (s.bf16) {
            double bytes = s.e * (out * s.N + s.N * in + 2 * out * in + out);
            add(name + " dW + db sums (epilogue)", count, count * bytes, count * 2 * out * in * s.N,
                Engine::gemm);
            add(name + " db += the sums", count, count * s.e * 3 * out, count * out,
                Engine::kernel);
            return;
        }
        product(name + " dW", count, count, out, in, s.N, true);
        add(name + " db (partial sums)", count, count * (s.e * s.N * out + s.f * s.slabs * out),
            count * s.N * out, Engine::kernel);
        add(name + " db (slabs added)", count, count * (s.f * s.slabs * out + s.e * 2 * out),
            count * s.slabs * out, Engine::kernel);
    }
};

void attention_forward_costs(Step& step, AttentionKind kind) {
    const Sizes& s = step.s;
    double N = s.N, C = s.C, L = s.L, T = s.T, e = s.e;
    if (kind == AttentionKind::flash && s.tensor_cores) {
        // per head, from device memory: reads q, k, v (T, hs) once (see tensor_core_counts),
        // writes out (T, hs) and lse (T floats); S = q k^T and o += p v on the pairs computed, 2
        // products of 2 hs FLOPs per pair
        double bytes = L * s.heads * (e * s.hs * 4 * T + s.f * T);
        step.add("flash attention forward (tensor cores)", L, bytes,
                 L * s.heads * s.tc_pairs * 2 * 2 * s.hs, Engine::tc_forward);
        return;
    }
    if (kind == AttentionKind::flash) {
        // reads q, k, v (N, 3C), writes out (N, C) and lse (B, NH, T) floats; per pair: the dot
        // and the output update, 2 hs FLOPs each
        double flash_bytes = L * (e * 4 * N * C + s.f * s.heads * T);
        FlashInstructions i = flash_forward_instructions;
        double pairs = L * s.heads * s.query_pairs;
        step.add("flash attention forward (scalar)", L, flash_bytes, pairs * 4 * s.hs,
                 Engine::warp_issue,
                 pairs * (i.per_value * s.per_thread + i.fixed) / issue_per_clock);
        return;
    }
    // att = q k^T / sqrt(hs), a launch per sequence: (T, hs) @ (hs, T) per head
    step.product("attention scores q k^T", L * s.B, L * s.heads, T, T, s.hs, false);
    // in place over the keys s <= t: reads a row's part on or below the diagonal once (the row
    // stays in cache between the passes), writes the whole row; ~5 FLOPs per value read
    step.add("causal softmax", L, L * e * s.att * (s.below + 1), L * 5 * s.att * s.below,
             Engine::kernel);
    // out = att v: (T, T) @ (T, hs) per head
    step.product("attention mix att v", L * s.B, L * s.heads, T, s.hs, T, false);
}

// The forward pass as gpt_forward runs it: a row per kernel, its launches over all layers.
void forward_costs(Step& step, AttentionKind attention) {
    const Sizes& s = step.s;
    double N = s.N, C = s.C, H = s.H, L = s.L, e = s.e, f = s.f;
    step.phase = "forward";
    // parameters_zero_grad before the step: a memset writing P gradients
    step.add("zero gradients (memset)", 1, e * s.P, 0, Engine::kernel);
    // The embedding's token groups: gpt_forward queues a copy of the N ids to pinned host memory,
    // gpt_backward sorts them (N log2 N comparisons) and queues 3 lists of N ints back. The host
    // sorts while the device runs the forward, so the row is host time the stream never waits for
    // (unless the sort outlasts the forward, which at ~1 ms for 16384 ids it does not)
    step.add("group tokens (host sort)", 0, 4 * 4 * N, N * std::log2(N), Engine::host);
    // x = wte[tokens] + wpe[t]: reads N ids, N rows of wte and T of wpe, writes (N, C)
    step.add("embedding", 1, 4 * N + e * (2 * N * C + s.T * C), N * C, Engine::kernel);
    // h = layernorm(x): reads x, writes h and 2 floats per row; ~8 FLOPs per value
    step.add("layernorm", 1, e * 2 * N * C + f * 2 * N + e * 2 * C, 8 * N * C, Engine::kernel);
    // qkv = h Wqkv^T + b: (N, C) @ (C, 3C)
    step.linear("qkv linear", L, C, 3 * C);
    step.attention = true;
    attention_forward_costs(step, attention);
    step.attention = false;
    // y Wproj^T + b: (N, C) @ (C, C)
    step.linear("attention projection", L, C, C);
    // r = x + branch, h = layernorm(r), twice a layer (the last is the final norm): reads 2 and
    // writes 2 of (N, C), 2 floats per row; ~9 FLOPs per value
    step.add("residual + layernorm", 2 * L, 2 * L * (e * 4 * N * C + f * 2 * N + e * 2 * C),
             2 * L * 9 * N * C, Engine::kernel);
    if (s.bf16) {
        // pre = h Wfc^T + b, act = gelu(pre) in the epilogue: (N, C) @ (C, H), writes pre and act
        // (N, H); the epilogue's ~15 FLOPs per value are left out of the product's
        step.add("mlp fc linear (bias + GELU in the epilogue)", L,
                 L * e * (N * C + C * H + 2 * N * H + H), L * 2 * N * H * C, Engine::gemm);
    } else {
        // pre = h Wfc^T: (N, C) @ (C, H), written (no bias in the product)
        step.product("mlp fc linear", L, L, N, H, C, false);
        // pre += b, act = gelu(pre): reads pre, writes pre and act (N, H); ~15 FLOPs per value
        step.add("bias + GELU", L, L * e * 3 * N * H, L * 15 * N * H, Engine::kernel);
    }
    // act Wproj2^T + b: (N, H) @ (H, C)
    step.linear("mlp projection", L, H, C);
    // dropout on the embedding and on both branches of every layer: reads and writes (N, C); ~20
    // operations to draw each mask value
    if (s.dropout)
        step.add("dropout", 1 + 2 * L, (1 + 2 * L) * e * 2 * N * C, (1 + 2 * L) * 20 * N * C,
                 Engine::kernel);
    // logits = h wte^T on the padded vocabulary: (N, C) @ (C, Vp)
    step.product("lm head", 1, 1, N, s.Vp, C, false);
}

void attention_backward_costs(Step& step, AttentionKind kind) {
    const Sizes& s = step.s;
    double N = s.N, C = s.C, L = s.L, T = s.T, e = s.e;
    if (kind != AttentionKind::plain) {
        // D = rowsum(dout * out): reads dout and out (N, C), writes (B, NH, T) floats
        step.add("attention backward D = dout.out", L, L * (e * 2 * N * C + s.f * s.heads * T),
                 L * 2 * N * C, Engine::kernel);
    }
    // both flash kinds recompute p from q, k and lse, then dv = p^T dout, dp = dout v^T,
    // ds = p (dp - D), dq = ds k, dk = ds^T q, in a dq kernel and a dk/dv kernel
    if (kind == AttentionKind::flash && s.tensor_cores) {
        // dq, per head, from device memory: reads q, dout, k, v (T, hs), lse and D once, writes
        // dq; S, dP = dout v^T and dq += dS k: 3 products of 2 hs FLOPs per pair
        double heads = L * s.heads, hs = s.hs;
        step.add("flash attention dq (tensor cores)", L, heads * (e * hs * 5 * T + s.f * 2 * T),
                 heads * s.tc_pairs * 3 * 2 * hs, Engine::tc_backward);
        // dk, dv, per head, from device memory: reads k, v, q, dout, lse and D once, writes dk,
        // dv; S^T, dP^T, dv += P^T dout, dk += dS^T q: 4 products of 2 hs per pair. Above heads
        // of 64 two kernels share the work (split_key_grads in tricycle.cu): the dv one reads k,
        // the dk one k and v, both q, dout, lse and D; 5 products (S^T twice).
        double kernels = s.hs > 64 ? 2 : 1;
        step.add("flash attention dk, dv (tensor cores)", L * kernels,
                 heads * (e * hs * (3 + 3 * kernels) * T + s.f * 2 * kernels * T),
                 heads * s.tc_pairs * (3 + kernels) * 2 * hs, Engine::tc_backward);
        return;
    }
    if (kind == AttentionKind::flash) {
        // they read q, k, v, dout (N, 4C), lse and D, and write dq, dk, dv (N, 3C)
        double flash_bytes = L * (e * 7 * N * C + s.f * 2 * s.heads * T);
        // dq: 3 products of 2 hs per pair; dk and dv: 4 (each kernel reads its share of the bytes)
        FlashInstructions q = flash_dq_instructions, k = flash_dkdv_instructions;
        double query_pairs = L * s.heads * s.query_pairs, key_pairs = L * s.heads * s.key_pairs;
        step.add("flash attention dq (scalar)", L, flash_bytes / 2, query_pairs * 6 * s.hs,
                 Engine::warp_issue,
                 query_pairs * (q.per_value * s.per_thread + q.fixed) / issue_per_clock);
        step.add("flash attention dk, dv (scalar)", L, flash_bytes / 2, key_pairs * 8 * s.hs,
                 Engine::warp_issue,
                 key_pairs * (k.per_value * s.per_thread + k.fixed) / issue_per_clock);
        return;
    }
    // datt = dy v^T, a launch per sequence: (T, hs) @ (hs, T) per head
    step.product("attention datt = dy v^T", L * s.B, L * s.heads, T, T, s.hs, false);
    // dv = att^T dy: (T, T) @ (T, hs) per head
    step.product("attention dv = att^T dy", L * s.B, L * s.heads, T, s.hs, T, false);
    // datt = att (datt - sum(datt att)) in place: reads datt and att on or below the diagonal,
    // writes the whole row; ~4 FLOPs per value read
    step.add("causal softmax backward", L, L * e * s.att * (2 * s.below + 1),
             L * 4 * s.att * s.below, Engine::kernel);
    // dq = datt k and dk = datt^T q: (T, T) @ (T, hs) per head each
    step.product("attention dq = datt k", L * s.B, L * s.heads, T, s.hs, T, false);
    step.product("attention dk = datt^T q", L * s.B, L * s.heads, T, s.hs, T, false);
}

// `count` layernorm backwards, of which `adding` add into dx (the rest write it).
void layernorm_backward_costs(Step& step, double count, double adding) {
    const Sizes& s = step.s;
    double N = s.N, C = s.C, e = s.e, f = s.f;
    // one pass: reads dout, x, weight and 2 floats per row (and dx when adding), writes dx and
    // the slabs' partial sums of dw and db (2 floats per (slab, column)); ~16 FLOPs per value
    step.add("layernorm backward (dx + dw, db partials)", count,
             count * (e * 3 * N * C + f * 2 * N + e * C + f * 2 * s.slabs * C) + adding * e * N * C,
             count * 16 * N * C, Engine::kernel);
    // one launch: reads the slabs' sums, reads and adds into dw and db (C each)
    step.add("layernorm backward dw, db (slabs added)", count,
             count * 2 * (f * s.slabs * C + e * 2 * C), count * 2 * s.slabs * C, Engine::kernel);
}

// The MLP's and attention projection's backward, every layer.
void linear_backward_costs(Step& step) {
    const Sizes& s = step.s;
    double N = s.N, C = s.C, H = s.H, L = s.L, e = s.e;
    if (s.bf16) {
        // dfc = (dbranch Wproj2) gelu'(pre): (N, C) @ (C, H), its epilogue reading pre (N, H) and
        // writing dfc and the sums of its columns (H), then a kernel adds them into dbfc
        step.add("mlp projection dx + GELU backward and db sums (epilogue)", L,
                 L * e * (N * C + C * H + 2 * N * H + H), L * 2 * N * H * C, Engine::gemm);
        step.add("mlp fc db += the sums", L, L * e * 3 * H, L * H, Engine::kernel);
        // dWproj2 += dbranch^T act: (C, N) @ (N, H)
        step.weight_bias_gradient("mlp projection", L, H, C);
        // dh = dfc Wfc: (N, H) @ (H, C); dWfc += dfc^T h: (H, N) @ (N, C), no bias sums
        step.product("mlp fc dx", L, L, N, C, H, false);
        step.product("mlp fc dW", L, L, H, C, N, true);
    } else {
        // dact = dbranch Wproj2: (N, C) @ (C, H); dWproj2 += dbranch^T act: (C, N) @ (N, H)
        step.product("mlp projection dx", L, L, N, H, C, false);
        step.weight_bias_gradient("mlp projection", L, H, C);
        // dfc = dact gelu'(pre): reads 2 and writes 1 of (N, H); ~20 FLOPs per value
        step.add("GELU backward", L, L * e * 3 * N * H, L * 20 * N * H, Engine::kernel);
        // dh = dfc Wfc: (N, H) @ (H, C); dWfc += dfc^T h: (H, N) @ (N, C)
        step.product("mlp fc dx", L, L, N, C, H, false);
        step.weight_bias_gradient("mlp fc", L, C, H);
    }
    // dy = dbranch Wproj: (N, C) @ (C, C); dWproj += dbranch^T y: (C, N) @ (N, C)
    step.product("attention projection dx", L, L, N, C, C, false);
    step.weight_bias_gradient("attention projection", L, C, C);
}

// The backward pass as gpt_backward runs it.
void backward_costs(Step& step, AttentionKind attention) {
    const Sizes& s = step.s;
    double N = s.N, C = s.C, L = s.L, V = s.V, Vp = s.Vp, e = s.e;
    step.phase = "backward";
    // count the targets that count: one warp reads N ids
    step.add("count targets (one warp)", 1, 4 * N, N, Engine::one_warp);
    // loss and dlogits written over the logits, the padding included; ids in, losses out; ~6
    // FLOPs per logit. A row of 1 to 32 words (two bfloat16, or a float) per thread of a
    // 1024-thread block is held in registers: read once (classifier_held_kernel). Another is read
    // twice (logsumexp by the online maximum and sum, then the gradient) by a warp.
    double words = Vp / (s.bf16 ? 2 : 1);
    bool held = words >= 1024 && words <= 1024 * 32;
    step.add(held ? "classifier (loss + dlogits, the row held in registers)"
                  : "classifier (loss + dlogits, each row read twice)",
             1, e * (held ? 2 * N * Vp : 2 * N * V + N * Vp) + 8 * N, 6 * N * V, Engine::kernel);
    // the mean loss: one warp reads N losses
    step.add("mean loss (one warp)", 1, 4 * N, N, Engine::one_warp);
    // dh = dlogits wte: (N, Vp) @ (Vp, C); dwte += dlogits^T h: (Vp, N) @ (N, C)
    step.product("lm head dx", 1, 1, N, C, Vp, false);
    step.product("lm head dW", 1, 1, Vp, C, N, true);
    linear_backward_costs(step);
    step.attention = true;
    attention_backward_costs(step, attention);
    step.attention = false;
    // dh = dqkv Wqkv: (N, 3C) @ (3C, C); dWqkv += dqkv^T h: (3C, N) @ (N, C)
    step.product("qkv dx", L, L, N, C, 3 * C, false);
    step.weight_bias_gradient("qkv", L, C, 3 * C);
    // the final norm writes dx; each layer's two norms add into the stream's gradient
    layernorm_backward_costs(step, 1 + 2 * L, 2 * L);
    // dropout's backward at each site: reads and writes (N, C)
    if (s.dropout)
        step.add("dropout backward", 1 + 2 * L, (1 + 2 * L) * e * 2 * N * C,
                 (1 + 2 * L) * 20 * N * C, Engine::kernel);
    // dwte rows += their positions' dout: reads dout (N, C) and 3 lists of N ids, reads and writes
    // the rows of the distinct tokens, V (1 - e^(-N/V)) of them for bench_gpt's random tokens
    double distinct = V * (1 - std::exp(-N / V));
    step.add("embedding backward (tokens)", 1, e * N * C + 4 * 3 * N + e * 2 * distinct * C, N * C,
             Engine::kernel);
    // dwpe += dout summed over the B sequences: reads (N, C), reads and writes (T, C)
    step.add("embedding backward (positions)", 1, e * (N * C + 2 * s.T * C), N * C, Engine::kernel);
}

void optimizer_costs(Step& step) {
    const Sizes& s = step.s;
    double P = s.P, e = s.e, f = s.f;
    // as the GPU build launches it: 256 threads a block, at most 132 * 32 blocks
    double blocks = std::min(std::ceil(P / 256), 132.0 * 32);
    step.phase = "optimizer";
    // each block sums the squares of its tile: reads P gradients, writes a float per block
    step.add("gradient norm (sums of squares)", 1, e * P + f * blocks, 2 * P, Engine::kernel);
    // one thread adds up the block sums
    step.add("gradient norm (square root, one thread)", 1, f * blocks, blocks, Engine::one_warp);
    // reads gradient and 2 float moments, and the parameter (float) or its float master weight
    // (bf16), writes all but the gradient: 3e + 16 bytes per parameter in float, 2e + 24 in bf16
    // (the parameter is then only written), ~20 FLOPs
    step.add("AdamW", 1, P * (s.bf16 ? 2 * e + 6 * f : 3 * e + 4 * f), 20 * P, Engine::kernel);
}

// llm.c's training step (karpathy/llm.c, train_gpt2.cu and llmc/*.cuh, as its GPT-2 124M script
// runs it: bf16, cuDNN attention, -r 0 so nothing recomputed, gelu_fusion 0, the default), on one
// GPU (ZeRO off). Its products are cuBLASLt's with the bias in the epilogue; the rest its own
// kernels, each row below one of them.

// cuDNN's flash attention in FlashAttention-2's FLOP count (the count its efficiency is quoted in):
// 4 T^2 hs per head forward, halved for the causal mask; the backward 2.5 times that.
double llmc_attention_forward_flops(const Sizes& s) {
    return s.L * s.heads * 4 * s.T * s.T * s.hs / 2;
}

// matmul_backward: matmul_backward_bias_kernel9 sums dout's columns (reads (N, out)) into float
// partial sums, reduce_add_sum_kernel adds them into dbias (the partial sums, 2048 SM threads /
// 1024 a block rows of `out` floats, are under 0.1 MB and left out); then the dx and dW products.
void llmc_matmul_backward(Step& step, const std::string& name, double in, double out) {
    const Sizes& s = step.s;
    double N = s.N, L = s.L, e = s.e;
    step.add(name + " db (bias kernel + reduce)", 2 * L, L * e * (N * out + 2 * out), L * N * out,
             Engine::kernel);
    step.product(name + " dx", L, L, N, in, out, false);
    step.product(name + " dW", L, L, out, in, N, true);
}

void llmc_forward_costs(Step& step) {
    const Sizes& s = step.s;
    double N = s.N, C = s.C, H = s.H, L = s.L, e = s.e, f = s.f;
    step.phase = "forward";
    // encoder_forward_kernel3: reads the ids, N rows of wte and T of wpe, writes (N, C)
    step.add("encoder forward", 1, 4 * N + e * (2 * N * C + s.T * C), N * C, Engine::kernel);
    // layernorm_forward_kernel6 (the first norm; the others are fused with the residual)
    step.add("layernorm forward", 1, e * 2 * N * C + f * 2 * N + e * 2 * C, 8 * N * C,
             Engine::kernel);
    step.linear("qkv", L, C, 3 * C);
    // attention_forward_cudnn: reads qkv (N, 3C), writes out (N, C) and the float statistics
    step.attention = true;
    step.add("cuDNN attention forward", L, L * (e * 4 * N * C + f * s.heads * s.T),
             llmc_attention_forward_flops(s), Engine::tc_forward);
    step.attention = false;
    step.linear("attention projection", L, C, C);
    // fused_residual_forward_kernel5, twice a layer (the last one the final norm): reads 2 and
    // writes 2 of (N, C), 2 floats per row
    step.add("fused residual + layernorm", 2 * L, 2 * L * (e * 4 * N * C + f * 2 * N + e * 2 * C),
             2 * L * 9 * N * C, Engine::kernel);
    step.linear("mlp fc", L, C, H);
    // gelu_forward_kernel2 (gelu_fusion 0): reads pre, writes act (N, H)
    step.add("gelu forward", L, L * e * 2 * N * H, L * 15 * N * H, Engine::kernel);
    step.linear("mlp projection", L, H, C);
    step.product("lm head", 1, 1, N, s.Vp, C, false);
}

// layernorm_backward_kernel10, `count` of them: one pass reads dout, x and dx (it adds into dx),
// writes dx, and adds dweight and dbias up through per-block float sums that its last block
// reduces (2 C floats a block, a few MB in all, left out)
void llmc_layernorm_backward(Step& step, double count) {
    const Sizes& s = step.s;
    double N = s.N, C = s.C, e = s.e, f = s.f;
    step.add("layernorm backward (fused dx, dw, db)", count,
             count * (e * 4 * N * C + f * 2 * N + e * 6 * C), count * 16 * N * C, Engine::kernel);
}

void llmc_backward_costs(Step& step) {
    const Sizes& s = step.s;
    double N = s.N, C = s.C, H = s.H, L = s.L, V = s.V, e = s.e, f = s.f;
    step.phase = "backward";
    // cudaMemsetAsync of the losses and the gradients, cudaMemset of dresidual
    step.add("memsets (losses, gradients, dresidual)", 3, f * N + e * s.P + e * N * C, 0,
             Engine::kernel);
    // fused_classifier_kernel5: an online max and sum over a row, then a second read writing
    // dlogits over the logits (the V real columns); ids in, losses read and written
    step.add("fused classifier", 1, e * 3 * N * V + 12 * N, 6 * N * V, Engine::kernel);
    step.product("lm head dx", 1, 1, N, C, s.Vp, false);
    step.product("lm head dW", 1, 1, s.Vp, C, N, true);
    llmc_layernorm_backward(step, 1);
    llmc_matmul_backward(step, "mlp projection", H, C);
    // gelu_backward_inplace_kernel: reads dact and pre, writes dfc (N, H)
    step.add("gelu backward", L, L * e * 3 * N * H, L * 20 * N * H, Engine::kernel);
    llmc_matmul_backward(step, "mlp fc", C, H);
    llmc_matmul_backward(step, "attention projection", C, C);
    // attention_backward_cudnn: reads qkv (N, 3C), out, dout (N, C each) and the statistics,
    // writes dqkv (N, 3C)
    step.attention = true;
    step.add("cuDNN attention backward", L, L * (e * 8 * N * C + f * s.heads * s.T),
             2.5 * llmc_attention_forward_flops(s), Engine::tc_backward);
    step.attention = false;
    llmc_matmul_backward(step, "qkv", C, 3 * C);
    llmc_layernorm_backward(step, 2 * L);
    // wpe_backward_kernel: reads dout (N, C), reads and writes dwpe (T, C); wte_backward_kernel:
    // reads dout again and the bucketed ids, reads and writes the distinct tokens' rows. The host
    // buckets the ids meanwhile, while the GPU still runs the backward queued before it.
    double distinct = V * (1 - std::exp(-N / V));
    step.add("encoder backward (wpe, wte)", 2,
             e * (2 * N * C + 2 * s.T * C + 2 * distinct * C) + 4 * 3 * N, 2 * N * C,
             Engine::kernel);
    // global_sum_deterministic: one block of 1024 threads sums the N losses
    step.add("loss sum (one block)", 1, f * N, N, Engine::kernel);
}

void llmc_optimizer_costs(Step& step) {
    const Sizes& s = step.s;
    double P = s.P, e = s.e, f = s.f;
    step.phase = "optimizer";
    // a memset of the block sums, global_norm_squared_kernel over P gradients, one block adding
    // the block sums up
    step.add("gradient norm", 3, e * P, 2 * P, Engine::kernel);
    // adamw_kernel3, a launch per parameter tensor (16): reads the bf16 gradient and the float
    // master weight and moments, writes them all but the gradient and the bf16 parameter (which it
    // never reads: the master weight is the old value)
    step.add("AdamW (bf16 params, float master)", 16, P * (2 * e + 6 * f), 20 * P, Engine::kernel);
}

std::vector<KernelCost> llmc_step_costs(const GPTConfig& config, int B, int T) {
    Step step;
    step.s = sizes_of(config, B, T, true);
    llmc_forward_costs(step);
    llmc_backward_costs(step);
    llmc_optimizer_costs(step);
    return step.rows;
}

struct RowTime {
    double roofline, adjusted;  // seconds
    bool memory_bound;
};

// Roofline: the larger of bytes / bandwidth and FLOPs / peak (tensor cores: bf16, or TF32 for the
// float build; the scalar flash kernels: the clocks their instructions take to issue; host
// rows: no GPU time, and none on the step's path: they overlap the device's work). Adjusted: the
// same at the assumed efficiencies, plus the launches.
RowTime row_time(const KernelCost& k, const DeviceModel& d, bool bf16) {
    if (k.engine == Engine::host) return {0, 0, false};
    double tensor_peak = bf16 ? d.bf16_flops : d.tf32_flops;
    double memory = k.bytes / d.bandwidth, compute = 0, efficiency = 1;
    switch (k.engine) {
        case Engine::gemm:
            compute = k.flops / tensor_peak, efficiency = d.gemm;
            break;
        case Engine::tc_forward:
            compute = k.flops / tensor_peak, efficiency = d.attention_forward;
            break;
        case Engine::tc_backward:
            compute = k.flops / tensor_peak, efficiency = d.attention_backward;
            break;
        case Engine::warp_issue:
            compute = k.cycles / (d.sms * d.clock);
            break;
        default:
            compute = k.flops / d.fp32_flops, efficiency = d.memory;
    }
    double memory_adjusted =
        k.engine == Engine::one_warp ? k.bytes / one_warp_bandwidth : memory / d.memory;
    double adjusted = std::max(memory_adjusted, compute / efficiency) + k.launches * launch_seconds;
    return {std::max(memory, compute), adjusted, memory >= compute};
}

void print_device(const DeviceModel& d) {
    printf(
        "device: %s: HBM %.2f TB/s, tensor cores %.0f TFLOPS bf16 / %.0f TF32, FP32 %.1f TFLOPS "
        "(dense), %d SMs at %.2f GHz\n",
        d.name, d.bandwidth / 1e12, d.bf16_flops / 1e12, d.tf32_flops / 1e12, d.fp32_flops / 1e12,
        d.sms, d.clock / 1e9);
}

void print_assumptions(const DeviceModel& d, bool bf16, bool tensor_core_flash) {
    print_device(d);
    printf(
        "assumed: cuBLAS products at %.0f%% of the %s peak; the library's kernels at %.0f%% of the "
        "bandwidth; %.0f us per launch; one-warp kernels at %.0f GB/s; the host's token sort at "
        "%.1f ns per comparison (N log2 N), beside the forward: off the step's path; ",
        100 * d.gemm, bf16 ? "bf16" : "TF32", 100 * d.memory, launch_seconds * 1e6,
        one_warp_bandwidth / 1e9, host_seconds_per_comparison * 1e9);
    if (tensor_core_flash)
        printf(
            "the tensor-core flash kernels at %.0f%% (forward) and %.0f%% (backward) of the bf16 "
            "peak, device memory read once per operand (a tile's re-reads come from L2)\n",
            100 * d.attention_forward, 100 * d.attention_backward);
    else
        printf("the scalar flash kernels issue %.0f warp instructions a clock per SM\n",
               issue_per_clock);
}

const char* engine_bound(const KernelCost& k, const RowTime& t) {
    if (k.engine == Engine::host) return "host";
    if (k.engine == Engine::one_warp) return "one warp";
    if (k.engine == Engine::warp_issue) return t.memory_bound ? "memory" : "issue";
    return t.memory_bound ? "memory" : "compute";
}

}  // namespace

const char* attention_name(AttentionKind kind) {
    return kind == AttentionKind::plain ? "plain" : "flash";
}

AttentionKind gpu_attention(const GPTConfig& config, AttentionKernels choice, bool bf16) {
    if (choice != AttentionKernels::fastest)
        return choice == AttentionKernels::flash ? AttentionKind::flash : AttentionKind::plain;
    bool tensor_cores = bf16 && config.dim % config.heads == 0 &&
                        is_tensor_core_head_size(config.dim / config.heads) &&
                        config.attention_dropout == 0;
    return tensor_cores ? AttentionKind::flash : AttentionKind::plain;
}

std::vector<KernelCost> training_step_costs(const GPTConfig& config, int B, int T,
                                            AttentionKind attention, bool bf16) {
    if (config.norm != Norm::layernorm || config.activation != Activation::gelu || config.rotary ||
        !config.tied_embeddings || config.attention_dropout > 0)
        fail(
            "the cost model covers GPTs with layernorm, GELU, learned positions, tied embeddings "
            "and no attention dropout");
    Step step;
    step.s = sizes_of(config, B, T, bf16);
    forward_costs(step, attention);
    backward_costs(step, attention);
    optimizer_costs(step);
    return step.rows;
}

namespace {

// The step's totals, and its adjusted time by kind of work (launch overheads apart).
struct Totals {
    double roofline = 0, adjusted = 0, tensor_flops = 0, launches = 0;
    double products = 0, attention = 0, kernels = 0, one_warp = 0, host = 0;
};

double& time_of_kind(Totals& total, const KernelCost& k) {
    if (k.attention) return total.attention;
    switch (k.engine) {
        case Engine::gemm:
            return total.products;
        case Engine::tc_forward:
        case Engine::tc_backward:
        case Engine::warp_issue:
        case Engine::one_warp:
            return total.one_warp;
        case Engine::host:
            return total.host;
        case Engine::kernel:
            break;
    }
    return total.kernels;
}

Totals step_totals(const std::vector<KernelCost>& rows, const DeviceModel& d, bool bf16) {
    Totals total;
    for (const KernelCost& k : rows) {
        RowTime t = row_time(k, d, bf16);
        total.roofline += t.roofline, total.adjusted += t.adjusted, total.launches += k.launches;
        if (k.engine == Engine::gemm || k.engine == Engine::tc_forward ||
            k.engine == Engine::tc_backward)
            total.tensor_flops += k.flops;
        time_of_kind(total, k) += t.adjusted - k.launches * launch_seconds;
    }
    return total;
}

void print_table(const std::vector<KernelCost>& rows, const DeviceModel& d, bool bf16) {
    printf("%-10s %-44s %8s %10s %11s %-8s %12s %12s\n", "phase", "kernel", "launches", "MB/step",
           "GFLOP/step", "bound", "roofline us", "adjusted us");
    for (const KernelCost& k : rows) {
        RowTime t = row_time(k, d, bf16);
        printf("%-10s %-44s %8.0f %10.1f %11.2f %-8s %12.1f %12.1f\n", k.phase, k.name.c_str(),
               k.launches, k.bytes / 1e6, k.flops / 1e9, engine_bound(k, t), t.roofline * 1e6,
               t.adjusted * 1e6);
    }
}

void print_biggest(const std::vector<KernelCost>& rows, const DeviceModel& d, bool bf16,
                   double adjusted) {
    std::vector<std::pair<double, std::string>> biggest;
    for (const KernelCost& k : rows) biggest.push_back({row_time(k, d, bf16).adjusted, k.name});
    std::sort(biggest.rbegin(), biggest.rend());
    printf("biggest (adjusted):");
    for (size_t i = 0; i < 5 && i < biggest.size(); i++)
        printf("%s %s %.2f ms (%.0f%%)", i ? "," : "", biggest[i].second.c_str(),
               biggest[i].first * 1e3, 100 * biggest[i].first / adjusted);
    printf("\n");
}

}  // namespace

void print_estimate(const GPTConfig& c, int B, int T, AttentionKind attention, bool bf16,
                    const DeviceModel& d) {
    std::vector<KernelCost> rows = training_step_costs(c, B, T, attention, bf16);
    int padded = (c.vocab_size + vocab_multiple - 1) / vocab_multiple * vocab_multiple;
    printf(
        "cost model of a training step: %d layers, %d heads, dim %d, vocab %d (padded to %d), "
        "B=%d T=%d, %s, %s attention\n",
        c.layers, c.heads, c.dim, c.vocab_size, padded, B, T,
        bf16 ? "bf16 storage, bf16 products" : "float storage, TF32 products",
        attention_name(attention));
    bool tensor_core_flash = sizes_of(c, B, T, bf16).tensor_cores;
    print_assumptions(d, bf16, tensor_core_flash);
    print_table(rows, d, bf16);
    Totals t = step_totals(rows, d, bf16);
    double tokens = double(B) * T, model_flops = model_flops_per_token(c, T) * tokens;
    double peak = bf16 ? d.bf16_flops : d.tf32_flops;
    auto mfu = [&](double seconds) { return 100 * model_flops / seconds / peak; };
    printf("%.0f launches; tensor-core work %.2f TFLOP per step (model FLOPs 6N + 12LTC: %.2f)\n",
           t.launches, t.tensor_flops / 1e12, model_flops / 1e12);
    printf(
        "adjusted time by kind: products %.2f ms, attention (its products and kernels) %.2f, "
        "the library's other kernels %.2f, one-warp kernels %.2f, host %.2f, launches %.2f\n",
        t.products * 1e3, t.attention * 1e3, t.kernels * 1e3, t.one_warp * 1e3, t.host * 1e3,
        t.launches * launch_seconds * 1e3);
    print_biggest(rows, d, bf16, t.adjusted);
    printf("roofline: %.2f ms/step, %.0f tokens/s, MFU %.1f%% (of the %s peak)\n", t.roofline * 1e3,
           tokens / t.roofline, mfu(t.roofline), bf16 ? "bf16" : "TF32");
    printf("with the assumptions: %.2f ms/step, %.0f tokens/s, MFU %.1f%%\n", t.adjusted * 1e3,
           tokens / t.adjusted, mfu(t.adjusted));
    double step_ms[2];
    AttentionKind default_kind = gpu_attention(c, AttentionKernels::fastest, bf16);
    for (AttentionKind kind : {AttentionKind::plain, AttentionKind::flash}) {
        Totals k = step_totals(training_step_costs(c, B, T, kind, bf16), d, bf16);
        step_ms[int(kind)] = k.adjusted * 1e3;
        printf(
            "step with %-5s attention: %8.2f ms, %7.0f tokens/s, MFU %4.1f%% (attention "
            "%.2f ms)%s%s\n",
            attention_name(kind), k.adjusted * 1e3, tokens / k.adjusted, mfu(k.adjusted),
            k.attention * 1e3,
            kind == AttentionKind::plain ? ", the plain kernels (--plain)"
            : tensor_core_flash          ? ", the tensor-core flash kernels (--flash)"
                                : ", the scalar flash kernels (--flash), an issue-bound floor",
            kind == default_kind ? ", the default" : "");
    }
    printf(
        "EFFICIENCIES device=%s gemm=%.2f attention_forward=%.2f attention_backward=%.2f "
        "memory=%.2f launch_us=%.1f\n",
        d.key, d.gemm, d.attention_forward, d.attention_backward, d.memory, launch_seconds * 1e6);
    printf(
        "ESTIMATE device=%s attention=%s precision=%s B=%d T=%d roofline_ms=%.2f ms_per_step=%.2f "
        "tokens_per_s=%.0f mfu=%.1f%% roofline_mfu=%.1f%% plain_ms=%.2f flash_ms=%.2f "
        "flash_kernels=%s tensor_tflop=%.4f\n",
        d.key, attention_name(attention), bf16 ? "bf16" : "float", B, T, t.roofline * 1e3,
        t.adjusted * 1e3, tokens / t.adjusted, mfu(t.adjusted), mfu(t.roofline), step_ms[0],
        step_ms[1], tensor_core_flash ? "tensor_cores" : "scalar", t.tensor_flops / 1e12);
}

namespace {

// llm.c's published speed: scripts/run_gpt2_124M.sh (karpathy/llm.c, commit a0d5dbb, 2024-05-30):
// "on 8X A100 80GB SXM ($14/hr) steps in ~300ms/iter" with -b 64 -t 1024 -d 524288, so each GPU
// runs B=64, T=1024 a step with no gradient accumulation: 65,536 tokens in 300 ms. (Its discussion
// #481, "Reproducing GPT-2 (124M) in llm.c in 90 minutes for $20", gives the same run as ~90
// minutes for 10B tokens.) That run shards AdamW 8 ways (-z 1) and reduces the gradients over
// NVLink; the model runs one GPU with all of AdamW and no communication, each ~1% of the step.
constexpr double llmc_published_seconds = 0.300;
constexpr int llmc_published_B = 64, llmc_published_T = 1024;

bool is_llmc_published_run(const GPTConfig& c, int B, int T, const DeviceModel& d) {
    return std::string(d.key) == "a100" && c.layers == 12 && c.heads == 12 && c.dim == 768 &&
           c.vocab_size == 50257 && B == llmc_published_B && T == llmc_published_T;
}

// Bytes per step of the kernels that are neither products nor attention's tensor-core kernels:
// the passes over memory a step makes.
double kernel_bytes(const std::vector<KernelCost>& rows) {
    double bytes = 0;
    for (const KernelCost& k : rows)
        if (k.engine == Engine::kernel) bytes += k.bytes;
    return bytes;
}

}  // namespace

void print_llmc_calibration(const GPTConfig& c, int B, int T, const DeviceModel& d) {
    std::vector<KernelCost> rows = llmc_step_costs(c, B, T);
    printf(
        "llm.c's training step (karpathy/llm.c train_gpt2.cu: bf16, cuDNN attention, fused "
        "residual + layernorm, biases in cuBLASLt epilogues, GELU in kernels of its own "
        "(gelu_fusion 0, its default), fused classifier, AdamW with float master weights, one "
        "GPU), B=%d T=%d\n",
        B, T);
    print_device(d);
    printf(
        "assumed, as for ours: cuBLASLt products at %.0f%% of the bf16 peak; cuDNN attention at "
        "%.0f%% (forward) and %.0f%% (backward) of it, in FlashAttention-2's FLOP count; llm.c's "
        "kernels at %.0f%% of the bandwidth; %.0f us per launch\n",
        100 * d.gemm, 100 * d.attention_forward, 100 * d.attention_backward, 100 * d.memory,
        launch_seconds * 1e6);
    print_table(rows, d, true);
    Totals t = step_totals(rows, d, true);
    double tokens = double(B) * T, model_flops = model_flops_per_token(c, T) * tokens;
    double model_tokens = tokens / t.adjusted;
    printf(
        "llm.c modelled: %.2f ms/step, %.0f tokens/s, MFU %.1f%% (roofline %.2f ms); adjusted time "
        "by kind: products %.2f ms, attention %.2f, other kernels %.2f, launches %.2f\n",
        t.adjusted * 1e3, model_tokens, 100 * model_flops / t.adjusted / d.bf16_flops,
        t.roofline * 1e3, t.products * 1e3, t.attention * 1e3, t.kernels * 1e3,
        t.launches * launch_seconds * 1e3);
    if (is_llmc_published_run(c, B, T, d)) {
        double published = tokens / llmc_published_seconds;
        printf(
            "published (scripts/run_gpt2_124M.sh: ~300 ms a step of 64 x 1024 tokens per A100 80GB "
            "SXM, 8 of them): %.0f tokens/s per GPU; the model is %+.1f%% off it\n",
            published, 100 * (model_tokens / published - 1));
        printf("CALIBRATION model_tokens_per_s=%.0f published_tokens_per_s=%.0f ratio=%.3f\n",
               model_tokens, published, model_tokens / published);
    } else {
        printf(
            "no CALIBRATION: llm.c's published figure is for GPT-2 124M at B=%d T=%d on an A100 "
            "(--estimate a100 --llmc with the default shape)\n",
            llmc_published_B, llmc_published_T);
    }
    std::vector<KernelCost> plain = training_step_costs(c, B, T, AttentionKind::plain, true),
                            flash = training_step_costs(c, B, T, AttentionKind::flash, true);
    printf(
        "COMPARE llmc_kernel_gb=%.2f ours_plain_kernel_gb=%.2f ours_flash_kernel_gb=%.2f "
        "llmc_launches=%.0f ours_plain_launches=%.0f ours_flash_launches=%.0f\n",
        kernel_bytes(rows) / 1e9, kernel_bytes(plain) / 1e9, kernel_bytes(flash) / 1e9, t.launches,
        step_totals(plain, d, true).launches, step_totals(flash, d, true).launches);
}
