// bench/cost_model.cu — the cost model of bench/cost_model.h. Every kernel's bytes and FLOPs are
// written beside it, from the shapes; the efficiencies and overheads the adjusted figures assume
// are the DeviceModel table and the constants below, and every estimate prints them.
#include "cost_model.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

// Datasheet peaks, dense: A100 80GB SXM, H100 SXM, H200 SXM (the H100's chip with HBM3e memory).
// Efficiencies assumed. Products: cuBLAS reaches about three quarters of the A100's bf16 peak on
// products of this size (B*T rows, inner sizes of 768 to 3072), less of the H100's, whose peak
// needs bigger tiles than these shapes feed it. Flash attention: FlashAttention-2 reports 50-73%
// of the A100's peak forward and less backward, at the low end for heads of 64 at T = 1024; an
// mma.sync kernel without Hopper's warpgroup instructions (FlashAttention-3's) reaches about a
// third of the H100's. The library's kernels: streaming copies reach 80-90% of the bandwidth, and
// these load bfloat16 values one by one, so 70%.
static const DeviceModel devices[] = {
    {"a100", "A100 80GB SXM", 2.0e12, 312e12, 19.5e12, 0.75, 0.50, 0.40, 0.70},
    {"h100", "H100 SXM", 3.35e12, 989e12, 67e12, 0.60, 0.35, 0.30, 0.70},
    {"h200", "H200 SXM", 4.8e12, 989e12, 67e12, 0.60, 0.35, 0.30, 0.70},
};

// A launch costs 3-5 us of host and device time; the model adds the midpoint to every launch
// without overlapping it with the kernels before it (an upper bound while the queue runs ahead).
constexpr double launch_seconds = 4e-6;
// A kernel run by one warp (or thread) over a short list has a few 128-byte loads in flight at
// about 0.5 us each: some 2 GB/s.
constexpr double one_warp_bandwidth = 2e9;
// The host's sort of the token ids (group_tokens), per comparison of N log2 N: measured as 1.3 ms
// for 16384 ids with std::stable_sort on this project's 2-core EPYC machine.
constexpr double host_seconds_per_comparison = 5.6e-9;
// Flash attention works on (query, key) tiles of 64 x 64 and skips the tiles fully above the
// diagonal.
constexpr int flash_tile = 64;
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
    double N;             // B T positions
    double e = 2, f = 4;  // bytes of a stored (bfloat16) value and of a float
    double heads;         // B NH attention heads of the batch
    double att;           // B NH T T: the elements of a layer's attention matrices
    double below;         // the fraction of a causal (T, T) matrix on or below the diagonal
    double tiles;         // the fraction of (T, T) that flash's tiles not fully masked cover
    double slabs;         // the slabs of 32 rows a column sum adds up in (N / 32)
    bool dropout;
};

Sizes sizes_of(const GPTConfig& c, int B, int T) {
    Sizes s;
    s.B = B, s.T = T, s.C = c.dim, s.NH = c.heads, s.hs = double(c.dim) / c.heads;
    s.H = double(c.mlp_ratio) * c.dim, s.V = c.vocab_size, s.L = c.layers;
    s.Vp = std::ceil(s.V / vocab_multiple) * vocab_multiple;
    s.P = double(gpt_parameter_count(c));
    s.N = s.B * s.T, s.heads = s.B * s.NH, s.att = s.heads * s.T * s.T;
    s.below = (s.T + 1) / (2 * s.T);
    double row_tiles = std::ceil(s.T / flash_tile);
    s.tiles =
        std::min(1.0, row_tiles * (row_tiles + 1) / 2 * flash_tile * flash_tile / (s.T * s.T));
    s.slabs = std::ceil(s.N / 32);
    s.dropout = c.dropout > 0;
    return s;
}

struct Step {
    Sizes s;
    std::vector<KernelCost> rows;
    const char* phase = "forward";

    void add(const std::string& name, double launches, double bytes, double flops, Engine engine) {
        rows.push_back({phase, name, launches, bytes, flops, engine});
    }
    // `count` products (M, K) @ (K, N) in `launches` launches: each reads both operands and writes
    // the result (reading it first when accumulating into it), plus `epilogue` bytes (a bias read
    // or a bias gradient written, a second output); 2 M N K FLOPs each.
    void product(const std::string& name, double launches, double count, double M, double N,
                 double K, bool accumulate, double epilogue) {
        double bytes = s.e * (M * K + K * N + M * N * (accumulate ? 2 : 1)) + epilogue;
        add(name, launches, count * bytes, count * 2 * M * N * K, Engine::gemm);
    }
};

void attention_forward_costs(Step& step, bool flash) {
    const Sizes& s = step.s;
    double N = s.N, C = s.C, L = s.L, T = s.T, e = s.e;
    if (flash) {
        // reads q, k, v (N, 3C), writes out (N, C) and lse (B, NH, T) floats; q k^T and p v per
        // head on the tiles not fully masked: 2 products of 2 T T hs
        step.add("flash attention forward", L, L * (e * 4 * N * C + s.f * s.heads * T),
                 L * 2 * 2 * s.heads * T * T * s.hs * s.tiles, Engine::attention_forward);
        return;
    }
    // att = q k^T / sqrt(hs), a launch per sequence: (T, hs) @ (hs, T) per head
    step.product("attention scores q k^T", L * s.B, L * s.heads, T, T, s.hs, false, 0);
    // in place over the keys s <= t: reads a row's part on or below the diagonal once (the row
    // stays in cache between the passes), writes the whole row; ~5 FLOPs per value read
    step.add("causal softmax", L, L * e * s.att * (s.below + 1), L * 5 * s.att * s.below,
             Engine::kernel);
    // out = att v: (T, T) @ (T, hs) per head
    step.product("attention mix att v", L * s.B, L * s.heads, T, s.hs, T, false, 0);
}

// The forward pass as gpt_forward runs it: a row per kernel, its launches over all layers.
void forward_costs(Step& step, bool flash) {
    const Sizes& s = step.s;
    double N = s.N, C = s.C, H = s.H, L = s.L, e = s.e, f = s.f;
    step.phase = "forward";
    // parameters_zero_grad before the step: a memset writing P gradients
    step.add("zero gradients (memset)", 1, e * s.P, 0, Engine::kernel);
    // group_tokens copies the N ids down, sorts them on the host (N log2 N comparisons) while the
    // stream waits, and copies 3 lists of N ints up
    step.add("group tokens (host sort)", 0, 4 * 4 * N, N * std::log2(N), Engine::host);
    // x = wte[tokens] + wpe[t]: reads N ids, N rows of wte and T of wpe, writes (N, C)
    step.add("embedding", 1, 4 * N + e * (2 * N * C + s.T * C), N * C, Engine::kernel);
    // h = layernorm(x): reads x, writes h and 2 floats per row; ~8 FLOPs per value
    step.add("layernorm", 1, e * 2 * N * C + f * 2 * N + e * 2 * C, 8 * N * C, Engine::kernel);
    // qkv = h Wqkv^T + b, the bias in the epilogue: (N, C) @ (C, 3C)
    step.product("qkv linear", L, L, N, 3 * C, C, false, e * 3 * C);
    attention_forward_costs(step, flash);
    // y Wproj^T + b: (N, C) @ (C, C)
    step.product("attention projection", L, L, N, C, C, false, e * C);
    // r = x + branch, h = layernorm(r), twice a layer (the last is the final norm): reads 2 and
    // writes 2 of (N, C), 2 floats per row; ~9 FLOPs per value
    step.add("residual + layernorm", 2 * L, 2 * L * (e * 4 * N * C + f * 2 * N + e * 2 * C),
             2 * L * 9 * N * C, Engine::kernel);
    // gelu(h Wfc^T + b), bias and GELU in the epilogue, which writes the pre-activation (N, H)
    // too: (N, C) @ (C, H)
    step.product("mlp fc linear + GELU", L, L, N, H, C, false, e * (H + N * H));
    // act Wproj2^T + b: (N, H) @ (H, C)
    step.product("mlp projection", L, L, N, C, H, false, e * C);
    // dropout on the embedding and on both branches of every layer: reads and writes (N, C); ~20
    // operations to draw each mask value
    if (s.dropout)
        step.add("dropout", 1 + 2 * L, (1 + 2 * L) * e * 2 * N * C, (1 + 2 * L) * 20 * N * C,
                 Engine::kernel);
    // logits = h wte^T on the padded vocabulary: (N, C) @ (C, Vp)
    step.product("lm head", 1, 1, N, s.Vp, C, false, 0);
}

void attention_backward_costs(Step& step, bool flash) {
    const Sizes& s = step.s;
    double N = s.N, C = s.C, L = s.L, T = s.T, e = s.e;
    if (flash) {
        // D = rowsum(dout * out): reads dout and out (N, C), writes (B, NH, T) floats
        step.add("attention backward D = dout.out", L, L * (e * 2 * N * C + s.f * s.heads * T),
                 L * 2 * N * C, Engine::kernel);
        // recomputes p from q, k and lse, then dv = p^T dout, dp = dout v^T, ds = p (dp - D),
        // dq = ds k, dk = ds^T q: reads q, k, v, dout (N, 4C), lse and D, writes dq, dk, dv
        // (N, 3C); 5 products of 2 T T hs per head on the tiles not fully masked
        step.add("flash attention backward", L, L * (e * 7 * N * C + s.f * 2 * s.heads * T),
                 L * 5 * 2 * s.heads * T * T * s.hs * s.tiles, Engine::attention_backward);
        return;
    }
    // datt = dy v^T, a launch per sequence: (T, hs) @ (hs, T) per head
    step.product("attention datt = dy v^T", L * s.B, L * s.heads, T, T, s.hs, false, 0);
    // dv = att^T dy: (T, T) @ (T, hs) per head
    step.product("attention dv = att^T dy", L * s.B, L * s.heads, T, s.hs, T, false, 0);
    // datt = att (datt - sum(datt att)) in place: reads datt and att on or below the diagonal,
    // writes the whole row; ~4 FLOPs per value read
    step.add("causal softmax backward", L, L * e * s.att * (2 * s.below + 1),
             L * 4 * s.att * s.below, Engine::kernel);
    // dq = datt k and dk = datt^T q: (T, T) @ (T, hs) per head each
    step.product("attention dq = datt k", L * s.B, L * s.heads, T, s.hs, T, false, 0);
    step.product("attention dk = datt^T q", L * s.B, L * s.heads, T, s.hs, T, false, 0);
}

// `count` layernorm backwards, of which `adding` add into dx (the rest write it).
void layernorm_backward_costs(Step& step, double count, double adding) {
    const Sizes& s = step.s;
    double N = s.N, C = s.C, e = s.e, f = s.f;
    // dx: reads dout, x, weight and 2 floats per row (and dx when adding), writes dx; ~12 FLOPs
    // per value
    step.add("layernorm backward dx", count,
             count * (e * 3 * N * C + f * 2 * N + e * C) + adding * e * N * C, count * 12 * N * C,
             Engine::kernel);
    // dweight and dbias, stage 1: reads dout and x again, writes 2 floats per (slab, column)
    step.add("layernorm backward dw, db (partial sums)", count,
             count * (e * 2 * N * C + f * 2 * N + f * 2 * s.slabs * C), count * 4 * N * C,
             Engine::kernel);
    // stage 2, a launch each: reads the slabs' sums, reads and adds into (C)
    step.add("layernorm backward dw, db (slabs added)", 2 * count,
             count * 2 * (f * s.slabs * C + e * 2 * C), count * 2 * s.slabs * C, Engine::kernel);
}

// The backward pass as gpt_backward runs it.
void backward_costs(Step& step, bool flash) {
    const Sizes& s = step.s;
    double N = s.N, C = s.C, H = s.H, L = s.L, Vp = s.Vp, e = s.e;
    step.phase = "backward";
    // count the targets that count: one warp reads N ids
    step.add("count targets (one warp)", 1, 4 * N, N, Engine::one_warp);
    // loss and dlogits written over the logits: today's kernel reads each row 3 times (maximum,
    // sum of exponentials, gradient) and writes it once; ids in, losses out; ~6 FLOPs per logit
    step.add("classifier (loss + dlogits)", 1, e * 4 * N * Vp + 8 * N, 6 * N * Vp, Engine::kernel);
    // the mean loss: one warp reads N losses
    step.add("mean loss (one warp)", 1, 4 * N, N, Engine::one_warp);
    // dh = dlogits wte: (N, Vp) @ (Vp, C)
    step.product("lm head dx", 1, 1, N, C, Vp, false, 0);
    // dwte += dlogits^T h: (Vp, N) @ (N, C)
    step.product("lm head dW", 1, 1, Vp, C, N, true, 0);
    // dact = dbranch Wproj2: (N, C) @ (C, H)
    step.product("mlp projection dx", L, L, N, H, C, false, 0);
    // dWproj2 += dbranch^T act, dbias (C) in the epilogue: (C, N) @ (N, H)
    step.product("mlp projection dW + db", L, L, C, H, N, true, e * C);
    // dfc = dact gelu'(fc): reads 2 and writes 1 of (N, H); ~20 FLOPs per value
    step.add("GELU backward", L, L * e * 3 * N * H, L * 20 * N * H, Engine::kernel);
    // dh = dfc Wfc: (N, H) @ (H, C)
    step.product("mlp fc dx", L, L, N, C, H, false, 0);
    // dWfc += dfc^T h, dbias (H) in the epilogue: (H, N) @ (N, C)
    step.product("mlp fc dW + db", L, L, H, C, N, true, e * H);
    // dy = dbranch Wproj: (N, C) @ (C, C); dWproj += dbranch^T y: (C, N) @ (N, C)
    step.product("attention projection dx", L, L, N, C, C, false, 0);
    step.product("attention projection dW + db", L, L, C, C, N, true, e * C);
    attention_backward_costs(step, flash);
    // dh = dqkv Wqkv: (N, 3C) @ (3C, C); dWqkv += dqkv^T h, dbias (3C): (3C, N) @ (N, C)
    step.product("qkv dx", L, L, N, C, 3 * C, false, 0);
    step.product("qkv dW + db", L, L, 3 * C, C, N, true, e * 3 * C);
    // the final norm writes dx; each layer's two norms add into the stream's gradient
    layernorm_backward_costs(step, 1 + 2 * L, 2 * L);
    // dropout's backward at each site: reads and writes (N, C)
    if (s.dropout)
        step.add("dropout backward", 1 + 2 * L, (1 + 2 * L) * e * 2 * N * C,
                 (1 + 2 * L) * 20 * N * C, Engine::kernel);
    // dwte rows += their positions' dout: reads dout (N, C) and 3 lists of N ids, reads and writes
    // the rows of the distinct tokens, V (1 - e^(-N/V)) of them for bench_gpt's random tokens
    double distinct = s.V * (1 - std::exp(-N / s.V));
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
    // reads parameter, gradient, float master weight and 2 float moments, writes all but the
    // gradient: 3e + 24 bytes and ~20 FLOPs per parameter
    step.add("AdamW", 1, P * (3 * e + 6 * f), 20 * P, Engine::kernel);
}

struct RowTime {
    double roofline, adjusted;  // seconds
    bool memory_bound;
};

// Roofline: the larger of bytes / bandwidth and FLOPs / peak (host rows: no GPU time). Adjusted:
// the same at the assumed efficiencies, plus the launches.
RowTime row_time(const KernelCost& k, const DeviceModel& d) {
    if (k.engine == Engine::host) return {0, k.flops * host_seconds_per_comparison, false};
    bool tensor_cores = k.engine == Engine::gemm || k.engine == Engine::attention_forward ||
                        k.engine == Engine::attention_backward;
    double memory = k.bytes / d.bandwidth,
           compute = k.flops / (tensor_cores ? d.bf16_flops : d.fp32_flops);
    double efficiency = k.engine == Engine::gemm                 ? d.gemm
                        : k.engine == Engine::attention_forward  ? d.attention_forward
                        : k.engine == Engine::attention_backward ? d.attention_backward
                                                                 : d.memory;
    double memory_adjusted =
        k.engine == Engine::one_warp ? k.bytes / one_warp_bandwidth : memory / d.memory;
    double adjusted = std::max(memory_adjusted, compute / efficiency) + k.launches * launch_seconds;
    return {std::max(memory, compute), adjusted, memory >= compute};
}

void print_assumptions(const DeviceModel& d) {
    printf("device: %s: HBM %.2f TB/s, bf16 tensor cores %.0f TFLOPS, FP32 %.1f TFLOPS (dense)\n",
           d.name, d.bandwidth / 1e12, d.bf16_flops / 1e12, d.fp32_flops / 1e12);
    printf(
        "assumed: cuBLAS products at %.0f%% of the bf16 peak; flash attention at %.0f%% "
        "(forward) and %.0f%% (backward); the library's kernels at %.0f%% of the bandwidth; "
        "%.0f us per launch; one-warp kernels at %.0f GB/s; the host's token sort at %.1f ns per "
        "comparison (N log2 N); classifier: 3 reads + 1 write of the logits; flash tiles "
        "%dx%d\n",
        100 * d.gemm, 100 * d.attention_forward, 100 * d.attention_backward, 100 * d.memory,
        launch_seconds * 1e6, one_warp_bandwidth / 1e9, host_seconds_per_comparison * 1e9,
        flash_tile, flash_tile);
}

const char* engine_bound(const KernelCost& k, const RowTime& t) {
    if (k.engine == Engine::host) return "host";
    if (k.engine == Engine::one_warp) return "one warp";
    return t.memory_bound ? "memory" : "compute";
}

}  // namespace

std::vector<KernelCost> training_step_costs(const GPTConfig& config, int B, int T, bool flash) {
    if (config.norm != Norm::layernorm || config.activation != Activation::gelu || config.rotary ||
        !config.tied_embeddings || config.attention_dropout > 0)
        fail(
            "the cost model covers GPTs with layernorm, GELU, learned positions, tied embeddings "
            "and no attention dropout");
    Step step;
    step.s = sizes_of(config, B, T);
    forward_costs(step, flash);
    backward_costs(step, flash);
    optimizer_costs(step);
    return step.rows;
}

namespace {

// The step's totals, and its adjusted time by kind of work (launch overheads apart).
struct Totals {
    double roofline = 0, adjusted = 0, tensor_flops = 0, launches = 0;
    double products = 0, attention = 0, kernels = 0, one_warp = 0, host = 0;
};

bool on_tensor_cores(Engine engine) {
    return engine == Engine::gemm || engine == Engine::attention_forward ||
           engine == Engine::attention_backward;
}

double& time_of_kind(Totals& total, Engine engine) {
    switch (engine) {
        case Engine::gemm:
            return total.products;
        case Engine::attention_forward:
        case Engine::attention_backward:
            return total.attention;
        case Engine::one_warp:
            return total.one_warp;
        case Engine::host:
            return total.host;
        case Engine::kernel:
            break;
    }
    return total.kernels;
}

Totals print_table(const std::vector<KernelCost>& rows, const DeviceModel& d) {
    printf("%-10s %-42s %8s %10s %11s %-9s %12s %12s\n", "phase", "kernel", "launches", "MB/step",
           "GFLOP/step", "bound", "roofline us", "adjusted us");
    Totals total;
    for (const KernelCost& k : rows) {
        RowTime t = row_time(k, d);
        printf("%-10s %-42s %8.0f %10.1f %11.2f %-9s %12.1f %12.1f\n", k.phase, k.name.c_str(),
               k.launches, k.bytes / 1e6, k.flops / 1e9, engine_bound(k, t), t.roofline * 1e6,
               t.adjusted * 1e6);
        total.roofline += t.roofline, total.adjusted += t.adjusted, total.launches += k.launches;
        if (on_tensor_cores(k.engine)) total.tensor_flops += k.flops;
        time_of_kind(total, k.engine) += t.adjusted - k.launches * launch_seconds;
    }
    return total;
}

void print_biggest(const std::vector<KernelCost>& rows, const DeviceModel& d, double adjusted) {
    std::vector<std::pair<double, std::string>> biggest;
    for (const KernelCost& k : rows) biggest.push_back({row_time(k, d).adjusted, k.name});
    std::sort(biggest.rbegin(), biggest.rend());
    printf("biggest (adjusted):");
    for (size_t i = 0; i < 5 && i < biggest.size(); i++)
        printf("%s %s %.2f ms (%.0f%%)", i ? "," : "", biggest[i].second.c_str(),
               biggest[i].first * 1e3, 100 * biggest[i].first / adjusted);
    printf("\n");
}

}  // namespace

void print_estimate(const GPTConfig& c, int B, int T, bool flash, const DeviceModel& d) {
    std::vector<KernelCost> rows = training_step_costs(c, B, T, flash);
    int padded = (c.vocab_size + vocab_multiple - 1) / vocab_multiple * vocab_multiple;
    printf(
        "cost model of a training step: %d layers, %d heads, dim %d, vocab %d (padded to %d), "
        "B=%d T=%d, bf16, %s attention\n",
        c.layers, c.heads, c.dim, c.vocab_size, padded, B, T, flash ? "flash" : "plain");
    print_assumptions(d);
    Totals t = print_table(rows, d);
    double tokens = double(B) * T, model_flops = model_flops_per_token(c, T) * tokens;
    auto mfu = [&](double seconds) { return 100 * model_flops / seconds / d.bf16_flops; };
    printf("%.0f launches; tensor-core work %.2f TFLOP per step (model FLOPs 6N + 12LTC: %.2f)\n",
           t.launches, t.tensor_flops / 1e12, model_flops / 1e12);
    printf(
        "adjusted time by kind: products %.2f ms, flash attention %.2f, the library's kernels "
        "%.2f, one-warp kernels %.2f, host %.2f, launches %.2f\n",
        t.products * 1e3, t.attention * 1e3, t.kernels * 1e3, t.one_warp * 1e3, t.host * 1e3,
        t.launches * launch_seconds * 1e3);
    print_biggest(rows, d, t.adjusted);
    printf("roofline: %.2f ms/step, %.0f tokens/s, MFU %.1f%%\n", t.roofline * 1e3,
           tokens / t.roofline, mfu(t.roofline));
    printf("with the assumptions: %.2f ms/step, %.0f tokens/s, MFU %.1f%%\n", t.adjusted * 1e3,
           tokens / t.adjusted, mfu(t.adjusted));
    printf(
        "ESTIMATE device=%s attention=%s B=%d T=%d roofline_ms=%.2f ms_per_step=%.2f "
        "tokens_per_s=%.0f mfu=%.1f%% roofline_mfu=%.1f%% tensor_tflop=%.4f\n",
        d.key, flash ? "flash" : "plain", B, T, t.roofline * 1e3, t.adjusted * 1e3,
        tokens / t.adjusted, mfu(t.adjusted), mfu(t.roofline), t.tensor_flops / 1e12);
}
