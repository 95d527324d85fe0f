// tricycle.h — a deep-learning library written from scratch in C++ and CUDA.
//
// Tensors with a tape autograd, the CUDA kernels behind every operation, and a GPT. One source for
// both builds: nvcc compiles it for an NVIDIA GPU (cuBLAS for matrix products); g++ compiles the same
// files as C++ and runs every kernel on the CPU through the emulator in cuda_cpu.h (OpenBLAS for
// matrix products).
//
// Reading order, here and in tricycle.cu: errors, launching and profiling, memory, random numbers, the
// Tensor, the tape, the operations (each a kernel with its backward kernel), the layers (forward and
// backward kernels side by side), the GPT, generation, optimizers, model files, the tokenizer and the
// data loader, and helpers for the programs.
#pragma once

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#else
#include "cuda_cpu.h"
#endif

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <functional>
#include <initializer_list>
#include <new>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <vector>

// ----------------------------------------------------------------------------------------------------
// Number types: arithmetic happens in `real`; tensors are stored as `floatX`.
//   default            real = float, floatX = float
//   -DTRICYCLE_DOUBLE  both double: the gradient-check build, where finite differences are precise
//                      enough to check gradients to 1e-6
//   -DTRICYCLE_BF16    real = float, floatX = bfloat16: mixed precision. Every tensor (activations,
//                      parameters as kernels and matrix products read them, gradients) is stored in
//                      bfloat16; kernels load into float, compute and accumulate in float, and round
//                      when they store; matrix products accumulate in float. The GPT keeps a float
//                      master copy of its parameters for the optimizer, whose moments are float too.
// Statistics kernels save for backward (norm means and rstd, log-sum-exps) are always `real`.

#if defined(TRICYCLE_DOUBLE)
typedef double real;
typedef double floatX;
#elif defined(TRICYCLE_BF16)
// A __nv_bfloat16 with exactly one conversion, to float (CUDA's own also converts to every integer
// type, which makes arithmetic on it ambiguous): expressions compute in float; stores round to nearest.
struct bf16 {
    __nv_bfloat16 value;
    bf16() = default;
    __host__ __device__ bf16(float f) : value(__float2bfloat16(f)) {}
    __host__ __device__ operator float() const { return __bfloat162float(value); }
    __host__ __device__ bf16& operator+=(float x) { return *this = float(*this) + x; }
    __host__ __device__ bf16& operator-=(float x) { return *this = float(*this) - x; }
    __host__ __device__ bf16& operator*=(float x) { return *this = float(*this) * x; }
};
typedef float real;
typedef bf16 floatX;
#else
typedef float real;
typedef float floatX;
#endif

// ----------------------------------------------------------------------------------------------------
// Errors. Library functions report bad input by throwing std::runtime_error with a one-line message;
// the programs catch it in main, print it and exit with status 1.

[[noreturn]] void fail(const char* format, ...) __attribute__((format(printf, 1, 2)));

// Every CUDA runtime call goes through this, so a failure names the file and line of the call.
void cuda_check(cudaError_t error, const char* file = __builtin_FILE(), int line = __builtin_LINE());

// ----------------------------------------------------------------------------------------------------
// Launching kernels. `launch(kernel, grid, block, shared_bytes, args...)` is kernel<<<grid, block,
// shared_bytes>>>(args...) on a GPU and the emulator on a CPU; either way the launch is checked.

void check_launch(const void* kernel);

// Profiling (train_gpt --profile): while `profiling` is on, every kernel launch and matrix product is
// timed and added up under its name, split into forward and backward (the tape's walk).
extern bool profiling;
struct ProfileRegion {  // times its own lifetime: CUDA events on a GPU, the clock on the CPU
    int slot, pending;
    double start;
    ProfileRegion(const void* kernel);
    ProfileRegion(const char* name);
    ~ProfileRegion();
};
void profile_reset();
void profile_report(FILE* out, long steps);  // a table of time per step by name, slowest first

#ifdef __CUDACC__
// Dynamic shared memory, `byte_offset` bytes into the block's buffer (the emulator's version checks
// every access).
template <typename T> __device__ T* shared_memory(size_t byte_offset = 0) {
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    return reinterpret_cast<T*>(shared_bytes + byte_offset);
}
#endif

// A launch's arguments must each convert implicitly to the kernel's parameter type: a real* where the
// kernel takes a floatX* (bfloat16 build) is a compile error, not a silent reinterpretation.
template <typename Kernel, typename... Args> struct LaunchArgumentsFit : std::false_type {};
template <typename... Params, typename... Args>
struct LaunchArgumentsFit<void (*)(Params...), Args...>
    : std::bool_constant<sizeof...(Params) == sizeof...(Args) && (std::is_convertible<Args, Params>::value && ...)> {};

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, Args... args) {
    static_assert(sizeof...(Params) == sizeof...(Args), "launch: the kernel takes a different number of arguments");
    static_assert(LaunchArgumentsFit<void (*)(Params...), Args...>::value,
                  "launch: an argument does not convert implicitly to the kernel's parameter type");
    if (profiling) {
        ProfileRegion region(reinterpret_cast<const void*>(kernel));
        profiling = false;  // time this launch once, not its nested parts
        launch(kernel, grid, block, shared_bytes, args...);
        profiling = true;
        return;
    }
#ifdef __CUDACC__
    kernel<<<grid, block, shared_bytes>>>(args...);
#else
    launch_kernel(kernel, grid, block, shared_bytes, args...);
#endif
    check_launch(reinterpret_cast<const void*>(kernel));
}

// Row kernels (softmax, reductions, normalisations) give each row a group of `threads_per_row`
// threads, 1 to 32, that combine partial results with warp shuffles. A GPU wants a full warp per row;
// the CPU emulator is fastest with 1, where no shuffle happens at all. Tests run both.
extern int threads_per_row;

// Blocks for a grid-stride loop over n elements with `threads` per block.
unsigned grid_size(long n, int threads);

// ----------------------------------------------------------------------------------------------------
// Memory. Tensors live in an arena: a bump allocator over big chunks of device memory. A training step
// marks the arena, runs, and releases back to the mark in one call, which also drops the tape; after
// the first step no memory is taken from the system at all.

struct MemoryMark {
    int chunk;
    size_t offset;
    size_t tape_length, tape_chunk, tape_offset;
};

void* device_alloc(size_t bytes);  // from the arena, 256-byte aligned
template <typename T> T* device_alloc(size_t count) { return static_cast<T*>(device_alloc(count * sizeof(T))); }
MemoryMark memory_mark();
void memory_release(MemoryMark mark);
size_t memory_in_use();            // bytes of the arena handed out now
size_t memory_reserved();          // bytes the arena holds from the system

// ----------------------------------------------------------------------------------------------------
// Random numbers: counter-based, so element i of a draw with a given seed is the same number on the
// CPU and the GPU, whatever the launch shape. (SplitMix64 finaliser over seed and index.)

__host__ __device__ inline uint64_t random_bits(uint64_t seed, uint64_t index) {
    uint64_t z = seed * 0x9E3779B97F4A7C15ull + index + 0x632BE59BD9B4E019ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Uniform in [0, 1) with 24 random bits (exactly representable in float).
__host__ __device__ inline float random_uniform(uint64_t seed, uint64_t index) {
    return float(random_bits(seed, index) >> 40) * (1.0f / 16777216.0f);
}

// ----------------------------------------------------------------------------------------------------
// The Tensor: a shape of up to max_dims dims, data in device memory, and, when it requires a gradient, a grad
// buffer of the same shape. It is a small value that points into memory it does not own.

constexpr int max_dims = 6;

struct Tensor {
    int ndim = 0;
    int shape[max_dims] = {1, 1, 1, 1, 1, 1};
    floatX* data = nullptr;
    floatX* grad = nullptr;  // null unless the tensor requires a gradient

    long size() const;
    int dim(int i) const;  // negative counts from the end, like Python
    bool requires_grad() const { return grad != nullptr; }
};

typedef std::initializer_list<int> Shape;

Tensor empty(Shape shape);
Tensor zeros(Shape shape);
Tensor ones(Shape shape);
Tensor full(Shape shape, real value);
Tensor tensor(real value);                              // a scalar, shape ()
Tensor tensor(const std::vector<real>& values, Shape shape);
Tensor randn(Shape shape, uint64_t seed, real mean = 0, real std = 1);
Tensor rand_uniform(Shape shape, uint64_t seed, real low = 0, real high = 1);
Tensor empty_like(Tensor t);
Tensor requires_grad(Tensor t);                         // gives t a zeroed gradient buffer
Tensor grad(Tensor t);                                  // t's gradient as a tensor of its own
std::vector<real> to_host(Tensor t);
void copy_from_host(Tensor t, const real* values);
std::string to_string(Tensor t);                        // Tensor(14.0), shortened when large
std::string shape_string(Tensor t);                     // (6, 5, 4)
void print(Tensor t);

// Kernels that fill device buffers (used by the creators above and by the model's initialisation).
void fill(floatX* out, long n, real value);
void fill_normal(floatX* out, long n, uint64_t seed, real mean, real std);
void fill_uniform(floatX* out, long n, uint64_t seed, real low, real high);

// ----------------------------------------------------------------------------------------------------
// The tape. While gradients are enabled, every operation whose inputs require a gradient appends an
// entry: its output tensors, its input tensors, and a closure that sends the outputs' gradients back
// into the inputs' gradients (adding to them). Closures live in a host arena.
//
// backward(t) works like PyTorch's (with retain_graph): it runs, in reverse order, only the entries t
// depends on; the gradients of their outputs are zeroed first and t's own set to ones, so each call
// computes fresh gradients of t for the intermediate results, and leaf tensors (made with
// requires_grad, e.g. parameters) accumulate: backward(y1); backward(y2) leaves grad(x) = dy1/dx +
// dy2/dx. The tape keeps its entries, so a later backward can use them again, until memory_release()
// drops them with the tensors they point to.

extern bool grad_enabled;

constexpr int tape_max_outputs = 2, tape_max_inputs = 4;
struct TapeEntry {
    void (*run)(void* closure);
    void* closure;
    Tensor outputs[tape_max_outputs];  // the gradients the closure reads (empty Tensors past the end)
    Tensor inputs[tape_max_inputs];    // the gradients it adds into
};

void* tape_alloc(size_t bytes);
void tape_append(TapeEntry entry, std::initializer_list<Tensor> outputs, std::initializer_list<Tensor> inputs);

template <typename F> void record(std::initializer_list<Tensor> outputs, std::initializer_list<Tensor> inputs, F backward) {
    static_assert(std::is_trivially_destructible<F>::value, "tape closures capture plain values only");
    void* memory = tape_alloc(sizeof(F));
    new (memory) F(backward);
    tape_append(TapeEntry{[](void* closure) { (*static_cast<F*>(closure))(); }, memory, {}, {}}, outputs, inputs);
}

void backward(Tensor t);
void zero_grad(Tensor t);
size_t tape_length();

// Within a NoGrad scope nothing is recorded and results carry no gradient (inference).
struct NoGrad {
    bool saved;
    NoGrad() : saved(grad_enabled) { grad_enabled = false; }
    ~NoGrad() { grad_enabled = saved; }
};

// The output of an operation: shaped like `like`, with a gradient buffer when gradients are enabled
// and any of `inputs` requires one.
Tensor new_result(const Tensor& like, std::initializer_list<Tensor> inputs);

// ----------------------------------------------------------------------------------------------------
// Operations. Each is a CUDA kernel with its own backward kernel, recorded on the tape.
// Binary operations broadcast like NumPy: shapes align on the right and dims of size 1 stretch.

Tensor add(Tensor a, Tensor b);
Tensor sub(Tensor a, Tensor b);
Tensor mul(Tensor a, Tensor b);
Tensor div(Tensor a, Tensor b);
Tensor maximum(Tensor a, Tensor b);
Tensor minimum(Tensor a, Tensor b);

Tensor add_scalar(Tensor x, real c);
Tensor mul_scalar(Tensor x, real c);
Tensor pow_scalar(Tensor x, real p);
Tensor neg(Tensor x);
Tensor exp(Tensor x);
Tensor log(Tensor x);
Tensor sqrt(Tensor x);
Tensor sin(Tensor x);
Tensor cos(Tensor x);
Tensor tanh(Tensor x);
Tensor sigmoid(Tensor x);
Tensor relu(Tensor x);

// Reductions over one axis (the axis is removed), or over everything (a scalar).
Tensor sum(Tensor x, int axis);
Tensor mean(Tensor x, int axis);
Tensor max(Tensor x, int axis);
Tensor min(Tensor x, int axis);
Tensor sum(Tensor x);
Tensor mean(Tensor x);
Tensor max(Tensor x);
Tensor min(Tensor x);

Tensor reshape(Tensor x, Shape shape);      // a view: shares data and gradient; one dim may be -1
Tensor transpose(Tensor x, int dim0, int dim1);
Tensor softmax(Tensor x);                   // over the last axis
Tensor matmul(Tensor a, Tensor b);          // (..., M, K) @ (..., K, N), or @ (K, N) shared by the batch

// So that expressions read like maths: y = x*x + 3*x + 4.
inline Tensor operator+(Tensor a, Tensor b) { return add(a, b); }
inline Tensor operator-(Tensor a, Tensor b) { return sub(a, b); }
inline Tensor operator*(Tensor a, Tensor b) { return mul(a, b); }
inline Tensor operator/(Tensor a, Tensor b) { return div(a, b); }
inline Tensor operator-(Tensor x) { return neg(x); }
inline Tensor operator+(Tensor x, real c) { return add_scalar(x, c); }
inline Tensor operator+(real c, Tensor x) { return add_scalar(x, c); }
inline Tensor operator-(Tensor x, real c) { return add_scalar(x, -c); }
inline Tensor operator-(real c, Tensor x) { return add_scalar(neg(x), c); }
inline Tensor operator*(Tensor x, real c) { return mul_scalar(x, c); }
inline Tensor operator*(real c, Tensor x) { return mul_scalar(x, c); }
inline Tensor operator/(Tensor x, real c) { return mul_scalar(x, 1 / c); }

// Matrix products on row-major matrices in device buffers (cuBLAS on the GPU, oneDNN on the CPU):
//   C = alpha * op(A) @ op(B) + beta * C,   op(A) is (M, K), op(B) is (K, N), C is (M, N),
// op(X) = X or, with `transpose`, X^T. `ld` is the distance between a matrix's rows, so a matrix can
// sit inside a wider buffer (one head's queries inside the (B, T, 3C) qkv buffer are rows of hs values,
// 3C apart). A batch runs the product for every (o, j), o < outer, j < inner, on the matrices at
// data + o * outer + j * inner. Calls name their fields:
//   gemm({.M = N, .N = out, .K = in}, 1, {.data = x, .ld = in}, {.data = w, .ld = in, .transpose = true}, 0, {.data = y, .ld = out});
struct GemmShape {
    int M, N, K;
    int outer = 1, inner = 1;
};
struct GemmInput {
    const floatX* data;
    long ld;
    bool transpose = false;
    long outer = 0, inner = 0;
};
struct GemmOutput {
    floatX* data;
    long ld;
    long outer = 0, inner = 0;
    const floatX* bias = nullptr;  // (N) added to every row (with beta = 0, alpha = 1, no batch)
};
void gemm(GemmShape shape, real alpha, GemmInput A, GemmInput B, real beta, GemmOutput C);
long gemm_layouts_made();  // CPU build: oneDNN primitives made so far (one per product layout)
std::string gemm_engine();  // what runs the products, e.g. "oneDNN, bfloat16 with float accumulation"

// ====================================================================================================
// Layers. Each is a pair of functions on raw device pointers, <layer>_forward and <layer>_backward,
// launching its kernels (backward skips null gradients), and a tape version on Tensors. Shapes: B
// batch, T time, C channels, N = B*T rows, NH heads, V vocabulary.
//
// A backward always adds into parameter gradients (they gather over micro-batches); its input's
// gradient it either adds to or writes. The tape adds (a tensor may feed several operations);
// gpt_backward writes wherever a buffer has a single producer, so nothing needs zeroing first.
enum class InputGrad { add, write };

void embedding_forward(floatX* out, const int* tokens, const floatX* wte, const floatX* wpe, int B, int T, int C);
// The backward reads the positions grouped by token, made from the tokens by group_tokens (device
// buffers of n, n + 1 and n ints).
struct TokenGroups {
    int *token, *start, *positions;
    int count;
};
int group_tokens(TokenGroups* groups, const int* tokens, long n);
void embedding_backward(floatX* dwte, floatX* dwpe, const floatX* dout, const TokenGroups& groups, int B, int T, int C);
Tensor embedding(const int* tokens, int B, int T, Tensor wte, Tensor wpe);  // wpe may be empty (rotary)

void linear_forward(floatX* out, const floatX* x, const floatX* weight, const floatX* bias, long N, int in, int out_features);
void linear_backward(floatX* dx, floatX* dweight, floatX* dbias, const floatX* dout, const floatX* x, const floatX* weight, long N, int in, int out_features,
                     InputGrad mode);
Tensor linear(Tensor x, Tensor weight, Tensor bias);  // x @ weight^T + bias; weight (out, in); bias may be empty

// LayerNorm or RMSNorm (no centring and no bias: mean, bias and dbias are then unused and may be null).
enum class Norm { layernorm, rmsnorm };
void norm_forward(Norm kind, floatX* out, real* mean, real* rstd, const floatX* x, const floatX* weight, const floatX* bias, long rows, int C);
void norm_backward(Norm kind, floatX* dx, floatX* dweight, floatX* dbias, const floatX* dout, const floatX* x, const floatX* weight,
                   const real* mean, const real* rstd, long rows, int C, InputGrad mode);
// sum = a + b and out = norm(sum), in one fused pass (its backward: norm_backward into dsum).
void residual_norm_forward(Norm kind, floatX* sum, floatX* out, real* mean, real* rstd, const floatX* a, const floatX* b, const floatX* weight,
                           const floatX* bias, long rows, int C);
Tensor layernorm(Tensor x, Tensor weight, Tensor bias);
Tensor rmsnorm(Tensor x, Tensor weight);
struct ResidualNorm {
    Tensor sum, normalized;
};
ResidualNorm residual_norm(Tensor a, Tensor b, Tensor weight, Tensor bias, Norm kind);

Tensor gelu(Tensor x);
Tensor silu(Tensor x);
// Linear then GELU in one layer: out = gelu(x @ W^T + b); `pre` (N, out_features) keeps x @ W^T + b.
void linear_gelu_forward(floatX* out, floatX* pre, const floatX* x, const floatX* weight, const floatX* bias, long N, int in, int out_features);
void linear_gelu_backward(floatX* dx, floatX* dweight, floatX* dbias, floatX* dpre, const floatX* dout, const floatX* pre, const floatX* x,
                          const floatX* weight, long N, int in, int out_features, InputGrad mode);  // dpre: scratch (N, out_features)
Tensor linear_gelu(Tensor x, Tensor weight, Tensor bias);
void swiglu_forward(floatX* out, const floatX* x, long N, int H);
void swiglu_backward(floatX* dx, const floatX* dout, const floatX* x, long N, int H, InputGrad mode);
Tensor swiglu(Tensor x);  // (..., 2H) -> (..., H): silu(first half) * second half

void dropout_forward(floatX* out, const floatX* x, long n, real p, uint64_t seed);
void dropout_backward(floatX* dx, const floatX* dout, long n, real p, uint64_t seed, InputGrad mode);
Tensor dropout(Tensor x, real p, uint64_t seed);  // p = 0 returns x itself

void residual_forward(floatX* out, const floatX* a, const floatX* b, long n);
void residual_backward(floatX* da, floatX* db, const floatX* dout, long n);
Tensor residual(Tensor a, Tensor b);

// On `rows` positions (sequences of T) of NH head vectors of hs values, rows ld apart; may work in place.
void rotary_forward(floatX* out, int ld_out, const floatX* x, int ld_x, long rows, int T, int NH, int hs, int start);
void rotary_backward(floatX* dx, int ld_dx, const floatX* dout, int ld_dout, long rows, int T, int NH, int hs, InputGrad mode);
Tensor rotary(Tensor x);  // x (B, T, NH, hs)

// Causal self-attention on qkv (B, T, 3C) -> (B, T, C), two ways with the same results:
// - plain: matrix products around a (B, NH, T, T) attention matrix; the forward saves att (and
//   att_dropped when dropout_p > 0);
// - flash: one kernel pair with tiles in shared memory and an online softmax, no (T, T) matrix; the
//   forward saves lse, the log-sum-exp of each query's scores, (B, NH, T).
// With rotary positions both also save the rotated q and k, (B, T, C) each. The tape version uses
// flash when use_flash_attention (the default on a GPU; on the CPU the plain kernels are faster).
struct AttentionSaved {
    floatX *q, *k, *att, *att_dropped;
    real* lse;
};
struct AttentionScratch {
    floatX *datt, *datt_kept, *dq, *dk;
    real* D;
};
AttentionScratch attention_scratch(int B, int T, int C, int NH, bool rotary, real dropout_p, bool flash);  // from the arena
extern bool use_flash_attention;
void attention_forward(floatX* out, AttentionSaved saved, const floatX* qkv, int B, int T, int C, int NH, bool rotary, real dropout_p, uint64_t seed);
void attention_backward(floatX* dqkv, const floatX* dout, AttentionSaved saved, AttentionScratch scratch, const floatX* qkv, int B, int T, int C,
                        int NH, bool rotary, real dropout_p, uint64_t seed, InputGrad mode);
void flash_attention_forward(floatX* out, AttentionSaved saved, const floatX* qkv, int B, int T, int C, int NH, bool rotary, real dropout_p,
                             uint64_t seed);
void flash_attention_backward(floatX* dqkv, const floatX* dout, const floatX* out, AttentionSaved saved, AttentionScratch scratch,
                              const floatX* qkv, int B, int T, int C, int NH, bool rotary, real dropout_p, uint64_t seed, InputGrad mode);
Tensor attention(Tensor qkv, int heads, bool rotary, real dropout_p, uint64_t seed);
// The whole layer: linear to qkv, attention, linear out.
Tensor multi_head_attention(Tensor x, Tensor qkv_weight, Tensor qkv_bias, Tensor proj_weight, Tensor proj_bias, int heads);

// Softmax + cross-entropy over logits (N, V): the mean over rows whose target is not ignore_index.
// classifier: the losses per row, their mean into loss[0] and the rows counted into count[0], all in
// `real` (float even in the bfloat16 build); with write_gradient it also overwrites the logits with
// d(loss_scale * loss)/dlogits (forward and backward fused). The tape version keeps the logits.
constexpr int ignore_index = -1;
void classifier(floatX* logits, real* losses, real* loss, real* count, const int* targets, long N, int V, real loss_scale, bool write_gradient);
Tensor cross_entropy(Tensor logits, const int* targets);  // targets: N ints on the device
void mse_forward(floatX* loss, const floatX* a, const floatX* b, long n);
void mse_backward(floatX* da, floatX* db, const floatX* dloss, const floatX* a, const floatX* b, long n);
Tensor mse(Tensor a, Tensor b);

// ====================================================================================================
// The GPT

enum class Activation { gelu, swiglu };

struct GPTConfig {
    int vocab_size = 0, context = 0, dim = 0, layers = 0, heads = 0;
    int mlp_ratio = 4;                 // MLP hidden size = mlp_ratio * dim
    Norm norm = Norm::layernorm;
    Activation activation = Activation::gelu;
    bool rotary = false;               // rotary position embedding instead of learned positions
    bool tied_embeddings = true;       // the output layer reuses the token embedding
    float dropout = 0;                 // on the embeddings and on each residual branch
    float attention_dropout = 0;       // on the attention probabilities
};

GPTConfig gpt_preset(const std::string& name);  // "debug", "shakespeare", "smol"
void gpt_check_config(const GPTConfig& config);

struct GPTLayer {
    Tensor norm1_weight, norm1_bias, qkv_weight, qkv_bias, attn_proj_weight, attn_proj_bias;
    Tensor norm2_weight, norm2_bias, fc_weight, fc_bias, mlp_proj_weight, mlp_proj_bias;
};

// Parameters and gradients each live in one contiguous device buffer; the Tensors are views into
// them. The first num_decayed entries (the weight matrices) are the ones AdamW decays. When tensors
// are stored in less than float (the bfloat16 build), `master` holds the float parameters the
// optimizer updates and the files store; otherwise it is null and the parameters are their own master.
// The buffers are freed when the GPT goes out of scope (it cannot be copied).
struct GPT {
    GPTConfig config;
    floatX* parameters = nullptr;
    floatX* gradients = nullptr;
    real* master = nullptr;
    long num_parameters = 0, num_decayed = 0;
    Tensor wte, wpe, lm_head, final_norm_weight, final_norm_bias;  // wpe empty if rotary, lm_head if tied
    std::vector<GPTLayer> layers;

    GPT() = default;
    GPT(const GPT&) = delete;
    GPT& operator=(const GPT&) = delete;
    ~GPT();
};

void gpt_create(GPT* model, const GPTConfig& config);  // allocates and lays out; gradients zeroed
void gpt_init(GPT* model, uint64_t seed);              // GPT-2 initialisation
void gpt_zero_grad(GPT& model);
std::vector<std::pair<std::string, Tensor>> gpt_named_parameters(GPT& model);
// The GPT as a tape expression: logits (B, T, V); train with backward(cross_entropy(logits, targets)).
Tensor gpt_forward_tape(GPT& model, const int* tokens, int B, int T, bool training, uint64_t seed);

// The GPT written out (llm.c style): the activations of one (B, T) forward pass, planned on first use
// and reused while B, T and the attention kind stay the same. Shapes (B, T, ...) as noted; C = dim,
// H = the MLP's hidden size, F = its first product's width (H, or 2H for SwiGLU).
struct GPTLayerActivations {
    floatX* qkv;           // (B, T, 3C)
    floatX* attention;     // (B, T, C)  the heads' outputs, before the projection
    AttentionSaved saved;  // what the attention backward needs
    floatX* residual;      // (B, T, C)  the stream between the attention and MLP blocks
    floatX* normalized;    // (B, T, C)  norm2 of it
    real *mean, *rstd;     // (B, T)     norm2's statistics
    floatX* fc;            // (B, T, F)  the first MLP product, before the activation
    floatX* activation;    // (B, T, H)
};
struct GPTActivations {
    int B = 0, T = 0;
    bool flash = false;
    // Set by the last gpt_forward, for gpt_backward:
    TokenGroups token_groups{};
    uint64_t seed = 0;
    real dropout = 0, attention_dropout = 0;
    // stream[l] (B, T, C) is layer l's input and stream[layers] the last layer's output;
    // normalized[l] = norm1 of layer l (normalized[layers]: the final norm), with mean[l] and rstd[l].
    std::vector<floatX*> stream, normalized;
    std::vector<real*> mean, rstd;
    std::vector<GPTLayerActivations> layers;
    floatX* logits = nullptr;  // (B, T, V); gpt_backward overwrites them with their gradient
    real *losses = nullptr, *loss = nullptr, *count = nullptr;  // (B, T), the mean, the positions counted
    // Scratch shared by the layers: a branch before and after dropout, and the backward's gradients.
    floatX *branch = nullptr, *dropped = nullptr;
    floatX *dstream = nullptr, *dnormalized = nullptr, *dqkv = nullptr, *dattention = nullptr, *dfc = nullptr, *dactivation = nullptr, *dbranch = nullptr;
    AttentionScratch scratch{};
    void* memory = nullptr;  // all of the above, one allocation of `bytes`
    size_t bytes = 0;

    GPTActivations() = default;
    GPTActivations(const GPTActivations&) = delete;
    GPTActivations& operator=(const GPTActivations&) = delete;
    ~GPTActivations();
};
// tokens (B, T) on the device -> acts.logits. Dropout only when training, drawn from `seed`.
void gpt_forward(GPT& model, GPTActivations& acts, const int* tokens, int B, int T, bool training, uint64_t seed);
// The mean loss of the last forward against targets (B, T) (host value; no gradient).
real gpt_loss(GPTActivations& acts, const int* targets, int vocab_size);
// The loss (into acts.loss, on the device) and the gradients of loss_scale * loss, added into
// model.gradients (loss_scale = 1 / micro-batches when accumulating).
void gpt_backward(GPT& model, GPTActivations& acts, const int* targets, real loss_scale);

// ====================================================================================================
// Generation

// Keys and values of every layer for the positions seen so far, (layers, NH, context, hs) each.
struct KVCache {
    GPTConfig config;
    floatX *keys = nullptr, *values = nullptr;
    int length = 0;  // positions filled

    KVCache() = default;
    KVCache(const KVCache&) = delete;
    KVCache& operator=(const KVCache&) = delete;
    ~KVCache();
};
void kv_cache_create(KVCache* cache, const GPTConfig& config);
// Runs n more positions of one sequence (tokens on the device), adding them to the cache; returns the
// last position's logits (vocab_size values on the device, in the arena).
floatX* gpt_forward_cached(GPT& model, KVCache& cache, const int* tokens, int n);

struct Sampler {
    float temperature = 1;  // 0: greedy
    int top_k = 0;          // 0: no limit
    float top_p = 1;        // nucleus: the smallest set of tokens reaching this probability
    uint64_t rng_state = 0; // splitmix64
};
int sample_token(const std::vector<real>& logits, Sampler& sampler);
// Appends `count` sampled tokens to `tokens` (the prompt, not empty), calling on_token for each as it
// comes. With use_cache, each token costs one position of work; without, a full forward pass.
void generate(GPT& model, std::vector<int>& tokens, int count, Sampler& sampler, bool use_cache, const std::function<void(int)>& on_token);

// ====================================================================================================
// Optimizers and training maths

void gradient_norm(real* norm, const floatX* gradients, long n);  // sqrt(sum g^2) into norm[0], on the device

// Both optimizers clip by global norm themselves when given the device norm and max_norm > 0:
// gradients are scaled by max_norm / (norm + 1e-6) when that is below 1 (as torch's clip_grad_norm_).
// Optimizer state is freed when the optimizer goes out of scope.
struct AdamW {
    float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.1f;
    long step = 0, n = 0;
    real *m = nullptr, *v = nullptr;

    AdamW() = default;
    AdamW(const AdamW&) = delete;
    AdamW& operator=(const AdamW&) = delete;
    ~AdamW();
};
void adamw_create(AdamW* opt, long n);
// params are updated through their float master copy when there is one (GPT::master), else directly.
void adamw_update(AdamW* opt, floatX* params, real* master, const floatX* grads, long num_decayed, real lr, const real* norm, real max_norm);

struct SGD {
    float momentum = 0.9f;
    long step = 0, n = 0;
    real* velocity = nullptr;

    SGD() = default;
    SGD(const SGD&) = delete;
    SGD& operator=(const SGD&) = delete;
    ~SGD();
};
void sgd_create(SGD* opt, long n);
void sgd_update(SGD* opt, floatX* params, real* master, const floatX* grads, real lr, const real* norm, real max_norm);

// Linear warmup over `warmup` steps, then cosine decay to min_lr at the last step.
float learning_rate(long step, long warmup, long total_steps, float max_lr, float min_lr);

// ====================================================================================================
// Model files. Little-endian:
//   header: 256 int32: magic 0x59435254 ("TRCY"), version 1, vocab_size, context, dim, layers, heads,
//           mlp_ratio, norm (0 layernorm, 1 rmsnorm), activation (0 gelu, 1 swiglu), rotary, tied,
//           dropout and attention_dropout (float32 bits), number of tensors, number of sections,
//           [16..17] number of parameters (int64); the rest zero
//   directory: per tensor, in buffer order: name (48 bytes, NUL-padded), ndim, dims[0], dims[1], 0 (int32)
//   parameters: float32, in buffer order
//   sections: tag (4 bytes), length (int64), payload — e.g. optimizer state, training state, tokenizer
// Written to a temporary file and renamed into place.

struct FileSection {
    char tag[4];
    std::string bytes;
};
void gpt_save(GPT& model, const char* path, const std::vector<FileSection>& sections = {});
void gpt_load(GPT* model, const char* path, std::vector<FileSection>* sections = nullptr);  // creates the model
std::string floats_section(const real* device, long n);                                     // device -> float32 bytes
void floats_from_section(real* device, long n, const FileSection& section, const char* path);

// ====================================================================================================
// Tokenizer, token files and the data loader (host code)
//
// Three pieces, used in this order by a training run:
//
//   1. Tokenizer  - turns bytes into token ids and back. The 256 byte values are
//                   the base vocabulary, so every byte string can be encoded.
//                   Training learns "merges": merge i says "the adjacent pair
//                   (left, right) becomes the new token 256 + i". The last id is
//                   the end-of-text token.
//   2. Token file - an encoded text on disk (llm.c's shard layout), written once
//                   by `tokenizer encode` and memory-mapped by the loader.
//   3. DataLoader - cuts (B, T) windows of inputs and next-token targets out of
//                   a token file: random windows for training, an in-order sweep
//                   for validation.
//
// All files are little-endian (big-endian hosts are not supported).
//
// Tokenizer file (.tok), all integers int32:
//   magic = tokenizer_magic, version = 1, vocab_size, num_merges, num_special
//   num_merges x (left, right)            merge i defines token 256 + i
//   num_special x (id, name_length, name bytes)
// Version 1 has exactly one special token, the end-of-text token, with
// id = vocab_size - 1 = 256 + num_merges. Nothing may follow the last name.
//
// Token file (.bin): 256 int32 header (magic 20240520, version, token count,
// the rest zero), then the tokens: uint16 for version 1, uint32 for version 2
// (used when the vocabulary has more than 65536 ids).

// Whole-file helpers. `kind` names the file in error messages, e.g. "token file".
std::string read_whole_file(const char* path, const char* kind);
// Writes to "<path>.tmp" and renames it over `path`: readers see the old file or
// the complete new one, never a partial write.
void write_file_atomic(const char* path, const void* data, size_t size, const char* kind);

// ----------------------------------------------------------------------------------------------------
// Tokenizer

constexpr uint32_t tokenizer_magic = 0x4B544354;  // the bytes "TCTK" read as a little-endian int
constexpr int tokenizer_version = 1;
constexpr int byte_tokens = 256;        // ids 0..255 are the raw byte values
// The end-of-text token's name. It is also its text: the corpus builder puts this
// string between files, encoding turns each occurrence into the end-of-text token
// and decoding turns the token back into the string, so decode(encode(x)) == x
// for every byte string x.
constexpr const char* end_of_text_name = "<|endoftext|>";

struct TokenPair {
    int32_t left;
    int32_t right;
};

// Where a cached chunk encoding lives inside Tokenizer::cache_tokens.
struct CachedChunk {
    uint32_t offset;
    uint32_t count;
};

// One entry of the encoder's priority queue: "the pair starting at `position`
// has merge rank `rank`".
struct MergeCandidate {
    int32_t rank;
    int32_t position;
};

struct Tokenizer {
    int vocab_size = 0;              // 256 + merges.size() + 1
    std::vector<TokenPair> merges;   // merges[i] creates token 256 + i
    int eot_token = -1;              // end-of-text id, always vocab_size - 1
    std::string eot_name;            // end_of_text_name

    // Derived tables, rebuilt from the merges by train and load.
    std::string token_bytes;                      // all tokens' bytes, back to back
    std::vector<size_t> token_start;              // token id's bytes begin here; vocab_size + 1 entries
    std::unordered_map<uint64_t, int32_t> merge_rank;  // pair key -> merge index

    // Encoder state. Real text repeats the same chunks ("the", " return", "    ")
    // over and over, so each distinct chunk is encoded once and remembered.
    std::unordered_map<std::string_view, CachedChunk> cache;  // views into cache_keys
    std::deque<std::string> cache_keys;          // deque: elements never move
    std::vector<int32_t> cache_tokens;
    // Scratch buffers of the chunk encoder, kept to avoid reallocating.
    std::vector<int32_t> work_ids, work_next, work_prev;
    std::vector<MergeCandidate> work_heap;

    Tokenizer() = default;
    Tokenizer(const Tokenizer&) = delete;             // the cache holds views into itself
    Tokenizer& operator=(const Tokenizer&) = delete;
};

// Length of the chunk that starts at text[0] (length > 0). Text is cut into
// chunks before BPE so that merges never cross a chunk boundary:
//   - a run of letters (bytes >= 0x80 count as letters, so UTF-8 stays whole),
//   - a run of digits,
//   - a run of other bytes (punctuation, control bytes, NUL),
//   each optionally with one leading ' ' (so " the" is one chunk),
//   - a run of whitespace; if a run of two or more ends in ' ' right before a
//     non-whitespace byte, that last ' ' is left to start the next chunk.
size_t tokenizer_chunk_length(const char* text, size_t length);

// Learn merges from `text` until the vocabulary (256 bytes + merges + end-of-text)
// has `vocab_size` ids, or until no adjacent pair is left (then it is smaller).
// Ties in pair frequency go to the smallest (left, right).
// vocab_size == 257 gives the plain byte tokenizer (no merges).
void tokenizer_train(Tokenizer* tok, const char* text, size_t length, int vocab_size);
void tokenizer_save(const Tokenizer* tok, const char* path);
void tokenizer_load(Tokenizer* tok, const char* path);   // validates everything
// The file's bytes, and back (a checkpoint carries its tokenizer this way); `path` names it in errors.
std::string tokenizer_serialize(const Tokenizer* tok);
void tokenizer_parse(Tokenizer* tok, const std::string& data, const char* path);

// Appends the tokens of `text` to *tokens. Not thread-safe (uses the cache).
void tokenizer_encode(Tokenizer* tok, const char* text, size_t length, std::vector<int32_t>* tokens);
// Appends the bytes of `tokens` to *text. Fails on ids outside the vocabulary.
void tokenizer_decode(const Tokenizer* tok, const int32_t* tokens, size_t count, std::string* text);
// The bytes of one token (for streaming output while sampling).
std::string_view tokenizer_token_bytes(const Tokenizer* tok, int token);

// ----------------------------------------------------------------------------------------------------
// Token files

constexpr int token_file_magic = 20240520;
constexpr int token_file_version_u16 = 1;      // tokens stored as uint16
constexpr int token_file_version_u32 = 2;      // tokens stored as uint32
constexpr int token_file_header_ints = 256;

// Writes `tokens` (each in [0, vocab_size)) to `path` via a temporary file and a
// rename, so a reader never sees a half-written file. uint16 when vocab_size <= 65536.
void write_token_file(const char* path, const int32_t* tokens, size_t count, int vocab_size);

// A memory-mapped, validated token file.
struct TokenFile {
    std::string path;
    int version = 0;
    size_t num_tokens = 0;
    void* map = nullptr;           // the whole file
    size_t map_size = 0;
    const uint16_t* tokens16 = nullptr;  // set for version 1
    const uint32_t* tokens32 = nullptr;  // set for version 2

    TokenFile() = default;
    TokenFile(const TokenFile&) = delete;
    TokenFile& operator=(const TokenFile&) = delete;
    ~TokenFile();
};

// Maps `path` and checks the header, that the size matches the count, and that
// every token is < vocab_size. On failure it throws; the destructor still unmaps.
void token_file_open(TokenFile* file, const char* path, int vocab_size);
void token_file_close(TokenFile* file);
inline int32_t token_file_at(const TokenFile* file, size_t index) {
    return file->tokens16 ? (int32_t)file->tokens16[index] : (int32_t)file->tokens32[index];
}
// Convenience: open, copy all tokens out, close.
std::vector<int32_t> read_token_file(const char* path, int vocab_size);

// ----------------------------------------------------------------------------------------------------
// Random numbers: splitmix64 (Steele, Lea, Flood 2014). The whole state is one
// uint64 that advances by a fixed odd constant; the output is a bit-mixed copy
// of it. Plain 64-bit integer arithmetic, so the same seed gives the same
// sequence on every platform, and saving the one word resumes the stream.

uint64_t splitmix64_next(uint64_t* state);
// Uniform in [0, bound), bound > 0, without modulo bias (rejects the top sliver).
uint64_t splitmix64_below(uint64_t* state, uint64_t bound);

// ----------------------------------------------------------------------------------------------------
// Data loader

enum class DataLoaderMode {
    random,  // training: each row is a window at a random position
    sweep,   // validation: consecutive non-overlapping windows, in order, wrapping
};

struct DataLoader {
    TokenFile file;
    int B = 0;                 // rows per batch
    int T = 0;                 // tokens per row
    DataLoaderMode mode = DataLoaderMode::random;
    uint64_t seed = 0;
    uint64_t rng_state = 0;    // random mode: splitmix64 state
    size_t sweep_next = 0;     // sweep mode: where the next window starts
    size_t sweep_windows = 0;  // windows in one full pass: (num_tokens - 1) / T
    std::vector<int32_t> inputs;   // (B, T) row-major: the window's tokens 0..T-1
    std::vector<int32_t> targets;  // (B, T): tokens 1..T, i.e. inputs shifted by one
};

// Opens and validates `path`; the file must hold at least T + 1 tokens.
void dataloader_open(DataLoader* loader, const char* path, int B, int T, int vocab_size,
                     DataLoaderMode mode, uint64_t seed);
// Fills loader->inputs and loader->targets with the next batch.
void dataloader_next_batch(DataLoader* loader);
// Back to the state right after open: the sweep restarts at token 0, the RNG at the seed.
void dataloader_reset(DataLoader* loader);
// Save / restore the random-window stream, to resume a training run exactly.
uint64_t dataloader_get_rng_state(const DataLoader* loader);
void dataloader_set_rng_state(DataLoader* loader, uint64_t state);

// ====================================================================================================
// Command-line programs: flag parsing shared by train_gpt, inference and tokenizer, so every bad flag
// gets the same kind of one-line error (the program's main adds its name in front).

bool wants_help(int argc, char** argv);                       // any --help or -h
const char* flag_value(int argc, char** argv, int* i);        // the value after the flag argv[*i]
long parse_int(const char* flag, const char* text, long min, long max);
double parse_number(const char* flag, const char* text, double min, double max);
[[noreturn]] void unknown_flag(const char* arg);
double seconds_now();                                                    // a steady clock

// A program's main: --help prints `help`; otherwise it runs body(argc, argv), and an error becomes one
// line "NAME: error: MESSAGE" on stderr and exit status 1.
int run_program(const char* name, const char* help, int argc, char** argv, int (*body)(int argc, char** argv));
