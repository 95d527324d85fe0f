// tricycle.h — a deep-learning library written from scratch in C++ and CUDA.
//
// Tensors with a tape autograd, the CUDA kernels behind every operation, and a GPT. One source for
// both builds: nvcc compiles it for an NVIDIA GPU (cuBLAS for matrix products); g++ compiles the
// same files as C++ and runs every kernel on the CPU through the emulator in cuda_cpu.h (oneDNN for
// matrix products).
//
// Contents, here and in tricycle.cu (Part I, the deep-learning core):
//    1. Numbers, errors and launching kernels
//    2. Memory and random numbers
//    3. Tensors
//    4. The tape (autograd): record() and backward()
//    5. Operations: + - * / with broadcasting, exp, log, ..., sum, mean, max, reshape, transpose,
//    softmax
//    6. Matrix products: gemm, matmul
//    7. Layers, forward and backward side by side: embedding, linear, layernorm / rmsnorm,
//       residual + norm, GELU, linear + GELU, SwiGLU, dropout, residual, rotary positions
//    8. Attention: plain and flash
//    9. Losses: cross-entropy (the classifier), mean squared error
//   10. The GPT: config and presets, parameters, gpt_forward_tape; gpt_forward and gpt_backward
//   11. Generation: the key/value cache, sampling
//   12. Optimizers: gradient norm, AdamW, SGD, learning rate
// Part II, in tricycle_io.h / tricycle_io.cu: profiling reports, model files, the tokenizer, token
// files, the data loader, helpers for the programs.
#pragma once

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#else
#include "cuda_cpu.h"
#endif

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <initializer_list>
#include <new>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <vector>

// ====================================================================================================
// 1. Numbers, errors and launching kernels
// Number types: arithmetic happens in `real`; tensors are stored as `floatX`.
//   default            real = float, floatX = float
//   -DTRICYCLE_DOUBLE  both double: the gradient-check build, where finite differences are precise
//                      enough to check gradients to 1e-6
//   -DTRICYCLE_BF16    real = float, floatX = bfloat16: mixed precision. Every tensor (activations,
//                      parameters as kernels and matrix products read them, gradients) is stored in
//                      bfloat16; kernels load into float, compute and accumulate in float, and
//                      round when they store; matrix products accumulate in float. The GPT keeps a
//                      float master copy of its parameters for the optimizer, whose moments are
//                      float too.
// Statistics kernels save for backward (norm means and rstd, log-sum-exps) are always `real`.

#if defined(TRICYCLE_DOUBLE)
typedef double real;
typedef double floatX;
#elif defined(TRICYCLE_BF16)
// A __nv_bfloat16 with exactly one conversion, to float (CUDA's own also converts to every integer
// type, which makes arithmetic on it ambiguous): expressions compute in float; stores round to
// nearest.
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
// Errors. Library functions report bad input by throwing std::runtime_error with a one-line
// message; the programs catch it in main, print it and exit with status 1.

[[noreturn]] void fail(const char* format, ...) __attribute__((format(printf, 1, 2)));

// Every CUDA runtime call goes through this, so a failure names the file and line of the call.
void cuda_check(cudaError_t error, const char* file = __builtin_FILE(),
                int line = __builtin_LINE());

// ----------------------------------------------------------------------------------------------------
// Launching kernels. `launch(kernel, grid, block, shared_bytes, args...)` is kernel<<<grid, block,
// shared_bytes>>>(args...) on a GPU and the emulator on a CPU; either way the launch is checked.

void check_launch(const void* kernel);

// Profiling (train_gpt --profile; the code is in tricycle_io.cu): while `profiling` is on, every
// kernel launch and matrix product is timed and added up under its name and the phase it belongs
// to, "forward", "backward" or "optimizer" (set for a while by a PhaseScope).
extern bool profiling;
extern const char* profile_phase;
struct PhaseScope {
    const char* saved;
    PhaseScope(const char* phase) : saved(profile_phase) { profile_phase = phase; }
    ~PhaseScope() { profile_phase = saved; }
};
struct ProfileRegion {  // times its own lifetime: CUDA events on a GPU, the clock on the CPU
    int slot, pending;
    double start;
    ProfileRegion(const void* kernel);
    ProfileRegion(const char* name);
    ~ProfileRegion();
};

#ifdef __CUDACC__
// Dynamic shared memory, `byte_offset` bytes into the block's buffer (the emulator's version checks
// every access).
template <typename T>
__device__ T* shared_memory(size_t byte_offset = 0) {
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    return reinterpret_cast<T*>(shared_bytes + byte_offset);
}
#endif

// A launch's arguments must each convert implicitly to the kernel's parameter type: a real* where
// the kernel takes a floatX* (bfloat16 build) is a compile error, not a silent reinterpretation.
template <typename Kernel, typename... Args>
struct LaunchArgumentsFit : std::false_type {};
template <typename... Params, typename... Args>
struct LaunchArgumentsFit<void (*)(Params...), Args...>
    : std::bool_constant<sizeof...(Params) == sizeof...(Args) &&
                         (std::is_convertible<Args, Params>::value && ...)> {};

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, Args... args) {
    static_assert(sizeof...(Params) == sizeof...(Args),
                  "launch: the kernel takes a different number of arguments");
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
// threads, 1 to 32, that combine partial results with warp shuffles. A GPU wants a full warp per
// row; the CPU emulator is fastest with 1, where no shuffle happens at all. Tests run both.
extern int threads_per_row;
bool launching_gpu_shapes();  // true on a GPU, and on the CPU under TRICYCLE_LAUNCH_SHAPES=gpu

// Blocks for a grid-stride loop over n elements with `threads` per block.
unsigned grid_size(long n, int threads);

// ====================================================================================================
// 2. Memory and random numbers
// Memory. Tensors live in an arena: a bump allocator over big chunks of device memory. A training
// step marks the arena, runs, and releases back to the mark in one call, which also drops the tape;
// after the first step no memory is taken from the system at all.

struct MemoryMark {
    int chunk;
    size_t offset;
    size_t tape_length, tape_chunk, tape_offset;
};

void* device_alloc(size_t bytes);  // from the arena, 256-byte aligned
template <typename T>
T* device_alloc(size_t count) {
    return static_cast<T*>(device_alloc(count * sizeof(T)));
}
MemoryMark memory_mark();
void memory_release(MemoryMark mark);
size_t memory_in_use();    // bytes of the arena handed out now
size_t memory_reserved();  // bytes the arena holds from the system

// ----------------------------------------------------------------------------------------------------
// Random numbers: counter-based, so element i of a draw with a given seed is the same number on the
// CPU and the GPU, whatever the launch shape. (SplitMix64 finaliser over seed and index.)

// SplitMix64's output function (Steele, Lea, Flood 2014): a bijection of 64-bit words that mixes
// every input bit into every output bit.
__host__ __device__ inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__host__ __device__ inline uint64_t random_bits(uint64_t seed, uint64_t index) {
    return mix64(seed * 0x9E3779B97F4A7C15ull + index + 0x632BE59BD9B4E019ull);
}

// Uniform in [0, 1) with 24 random bits (exactly representable in float).
__host__ __device__ inline float random_uniform(uint64_t seed, uint64_t index) {
    return float(random_bits(seed, index) >> 40) * (1.0f / 16777216.0f);
}

// A sequential stream (the data loader's windows, sampling): SplitMix64. The whole state is one
// word that advances by a fixed odd constant, so saving it resumes the stream exactly.
inline uint64_t splitmix64_next(uint64_t* state) { return mix64(*state += 0x9E3779B97F4A7C15ull); }
// Uniform in [0, bound), bound > 0, without modulo bias: 2^64 mod bound values at the bottom are
// rejected, so the rest are an exact multiple of bound.
inline uint64_t splitmix64_below(uint64_t* state, uint64_t bound) {
    uint64_t threshold = (0 - bound) % bound;
    for (;;) {
        uint64_t x = splitmix64_next(state);
        if (x >= threshold) return x % bound;
    }
}

// A float's bits as an int32 and back (model files keep float fields in their int32 header).
inline int32_t float_bits(float f) {
    int32_t bits;
    memcpy(&bits, &f, 4);
    return bits;
}
inline float bits_float(int32_t bits) {
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// ====================================================================================================
// 3. Tensors
// The Tensor: a shape of up to max_dims dims, data in device memory, and, when it requires a
// gradient, a grad buffer of the same shape. It is a small value that points into memory it does
// not own.

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
Tensor tensor(real value);  // a scalar, shape ()
Tensor tensor(const std::vector<real>& values, Shape shape);
Tensor randn(Shape shape, uint64_t seed, real mean = 0, real std = 1);
Tensor rand_uniform(Shape shape, uint64_t seed, real low = 0, real high = 1);
Tensor empty_like(Tensor t);
Tensor requires_grad(Tensor t);  // gives t a zeroed gradient buffer
Tensor grad(Tensor t);           // t's gradient as a tensor of its own
std::vector<real> to_host(Tensor t);
void copy_from_host(Tensor t, const real* values);
// Device buffers of T (floatX or real) to and from host values in real, converted one by one.
template <typename T>
std::vector<real> download(const T* device, long n) {
    std::vector<T> stored(n);
    cuda_check(cudaMemcpy(stored.data(), device, n * sizeof(T), cudaMemcpyDeviceToHost));
    return std::vector<real>(stored.begin(), stored.end());
}
template <typename T>
void upload(T* device, const real* values, long n) {
    std::vector<T> stored(values, values + n);
    cuda_check(cudaMemcpy(device, stored.data(), n * sizeof(T), cudaMemcpyHostToDevice));
}
std::string to_string(Tensor t);     // Tensor(14.0), shortened when large
std::string shape_string(Tensor t);  // (6, 5, 4)
void print(Tensor t);

// Kernels that fill device buffers (used by the creators above and by the model's initialisation).
void fill(floatX* out, long n, real value);
void fill_normal(floatX* out, long n, uint64_t seed, real mean, real std);
void fill_uniform(floatX* out, long n, uint64_t seed, real low, real high);

// ----------------------------------------------------------------------------------------------------
// Parameters: the trainable tensors of a model, views into one device buffer, their gradients into
// another, so that an optimizer step and the gradient norm are each one launch over everything.
// When tensors are stored in less than float (the bfloat16 build), `master` holds the float values
// the optimizer updates (and files store); the values the model computes with are their rounding.
// The first num_decayed values are the ones AdamW decays (the GPT puts its weight matrices there).

struct Parameters {
    floatX* data = nullptr;
    floatX* grad = nullptr;
    real* master = nullptr;  // null when floatX is real
    // master[i] is parameter master_offset + i: all of them, or one rank's shard (ZeRO-1)
    long master_offset = 0, master_count = 0;
    long capacity = 0, size = 0;  // allocated, handed out
    long num_decayed = 0;

    Parameters() = default;
    Parameters(const Parameters&) = delete;
    Parameters& operator=(const Parameters&) = delete;
    ~Parameters();
};
void parameters_create(Parameters* p, long capacity);  // gradients zeroed
Tensor parameter(Parameters* p, Shape shape);          // the next values, with their gradient
void parameters_zero_grad(Parameters& p);
void parameters_sync_master(Parameters& p);  // master = data, after filling data
// Keeps the master values of parameters [offset, offset + count) only: under ZeRO-1 a rank's
// optimizer updates just its shard, and the rest of the float copy would be dead weight.
void parameters_shard_master(Parameters& p, long offset, long count);
// Gradients summed in float over a step's micro-batches (the bfloat16 build; train_gpt): each
// micro-batch's gradients are added into sum (n = p.size floats) and zeroed, so that the step's sum
// is the same however the micro-batches are split among processes; then rounded back into grad.
void parameters_add_grad_to(Parameters& p, real* sum);      // sum += grad, grad = 0
void parameters_grad_from(Parameters& p, const real* sum);  // grad = sum, rounded to nearest

// ====================================================================================================
// 4. The tape
// The tape. While gradients are enabled, every operation whose inputs require a gradient appends an
// entry: its output tensors, its input tensors, and a closure that sends the outputs' gradients
// back into the inputs' gradients (adding to them). Closures live in a host arena.
//
// backward(t) works like PyTorch's (with retain_graph): it runs, in reverse order, only the entries
// t depends on; the gradients of their outputs are zeroed first and t's own set to ones, so each
// call computes fresh gradients of t for the intermediate results, and leaf tensors (made with
// requires_grad, e.g. parameters) accumulate: backward(y1); backward(y2) leaves grad(x) = dy1/dx +
// dy2/dx. The tape keeps its entries, so a later backward can use them again, until
// memory_release() drops them with the tensors they point to.

extern bool grad_enabled;

constexpr int tape_max_outputs = 2, tape_max_inputs = 4;
struct TapeEntry {
    void (*run)(void* closure);
    void* closure;
    Tensor
        outputs[tape_max_outputs];   // the gradients the closure reads (empty Tensors past the end)
    Tensor inputs[tape_max_inputs];  // the gradients it adds into
};

void* tape_alloc(size_t bytes);
void tape_append(TapeEntry entry, std::initializer_list<Tensor> outputs,
                 std::initializer_list<Tensor> inputs);

template <typename F>
void record(std::initializer_list<Tensor> outputs, std::initializer_list<Tensor> inputs,
            F backward) {
    static_assert(std::is_trivially_destructible<F>::value,
                  "tape closures capture plain values only");
    void* memory = tape_alloc(sizeof(F));
    new (memory) F(backward);
    tape_append(TapeEntry{[](void* closure) { (*static_cast<F*>(closure))(); }, memory, {}, {}},
                outputs, inputs);
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

// ====================================================================================================
// 5. Operations
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

Tensor reshape(Tensor x, Shape shape);  // a view: shares data and gradient; one dim may be -1
Tensor transpose(Tensor x, int dim0, int dim1);
Tensor softmax(Tensor x);           // over the last axis
Tensor matmul(Tensor a, Tensor b);  // (..., M, K) @ (..., K, N), or @ (K, N) shared by the batch

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

// ====================================================================================================
// 6. Matrix products
// Matrix products on row-major matrices in device buffers (cuBLAS on the GPU, oneDNN on the CPU):
//   C = alpha * op(A) @ op(B) + beta * C,   op(A) is (M, K), op(B) is (K, N), C is (M, N),
// op(X) = X or, with `transpose`, X^T. `ld` is the distance between a matrix's rows, so a matrix
// can sit inside a wider buffer (one head's queries inside the (B, T, 3C) qkv buffer are rows of hs
// values, 3C apart). A batch runs the product for every (o, j), o < outer, j < inner, on the
// matrices at data + o * outer + j * inner. Calls name their fields:
//   gemm({.M = N, .N = out, .K = in}, 1, {.data = x, .ld = in}, {.data = w, .ld = in, .transpose =
//   true}, 0, {.data = y, .ld = out});
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
// GPU float build on sm_80 and later: run float products on the tensor cores in TF32 (inputs
// rounded to 10 mantissa bits, float accumulation; ~8x the FP32 rate on an A100). Off by default
// so the tests compare exact float products; the programs turn it on (--tf32 0 turns it off). The
// CPU and bfloat16 builds ignore it.
extern bool use_tf32;
// GPU bfloat16 build: products whose epilogue also does the next small pass (cuBLASLt), so that
// pass needs no kernel of its own:
//   bias:       C = A B + bias                        (bias (N))
//   gelu_bias:  aux = A B + bias,  C = gelu(aux)      (aux (M, N), the pre-activation, ld N)
//   bias_grad:  C = A B + beta C,  and bias_grad (M) = the sums of op(A)'s rows (over K)
//   gelu_grad_bias_grad:  C = (A B) * gelu'(aux),  and bias_grad (N) = the sums of C's columns
//               (aux (M, N), the pre-activation gelu_bias saved, ld N, only read; beta 0)
// Unbatched products only. Returns false where it does not apply (other builds, or no cuBLASLt
// algorithm for the shape): the caller then runs the plain product and its own pass.
enum class Epilogue { bias, gelu_bias, bias_grad, gelu_grad_bias_grad };
#if defined(__CUDACC__) && defined(TRICYCLE_BF16)
constexpr bool gemm_has_epilogues = true;
#else
constexpr bool gemm_has_epilogues = false;  // callers skip what only an epilogue would need
#endif
bool gemm_epilogue(Epilogue epilogue, GemmShape shape, GemmInput A, GemmInput B, real beta,
                   GemmOutput C, floatX* aux, floatX* bias_grad);
// The epilogues' product layouts so far, by kind: how many cuBLASLt fused, and how many fell back
// to the plain product and a kernel (no algorithm for the layout); other builds say they have none.
std::string gemm_epilogue_report();
long gemm_layouts_made();  // CPU build: oneDNN primitives made so far (one per product layout)
// While gemm_record points at a list, every product (gemm and each gemm_epilogue that ran) is
// appended to it: bench_gpt runs one step's products again on their own, the step's product floor.
struct GemmCall {
    GemmShape shape;
    real alpha;
    GemmInput A, B;
    real beta;
    GemmOutput C;
};
extern std::vector<GemmCall>* gemm_record;
std::string
gemm_engine();  // what runs the products, e.g. "oneDNN, bfloat16 with float accumulation"

// ====================================================================================================
// 7. Layers
// Layers. Each is a pair of functions on raw device pointers, <layer>_forward and <layer>_backward,
// launching its kernels (backward skips null gradients), and a tape version on Tensors. Shapes: B
// batch, T time, C channels, N = B*T rows, NH heads, V vocabulary.
//
// A backward always adds into parameter gradients (they gather over micro-batches); its input's
// gradient it either adds to or writes. The tape adds (a tensor may feed several operations);
// gpt_backward writes wherever a buffer has a single producer, so nothing needs zeroing first.
enum class InputGrad { add, write };

void embedding_forward(floatX* out, const int* tokens, const floatX* wte, const floatX* wpe, int B,
                       int T, int C);
// The backward reads the positions grouped by token (a sort on the host): the groups' tokens,
// where each starts (and n at the end), the positions in group order; n, n + 1 and n ints, one
// after the other in one device buffer of 3n + 1 (token_groups_at).
struct TokenGroups {
    int *token, *start, *positions;
    int count;
};
TokenGroups token_groups_at(int* buffer, long n);
// Sorts the n positions of host_tokens by token, then position, into the host arrays token, start
// and positions laid out as in TokenGroups. Returns the number of groups.
int sort_by_token(const int* host_tokens, long n, int* token, int* start, int* positions);
// The groups of the device's tokens, copied down, sorted and sent back (the host waits for it).
void group_tokens(TokenGroups* groups, const int* tokens, long n);
void embedding_backward(floatX* dwte, floatX* dwpe, const floatX* dout, const TokenGroups& groups,
                        int B, int T, int C);
// wpe may be empty (rotary)
Tensor embedding(const int* tokens, int B, int T, Tensor wte, Tensor wpe);

void linear_forward(floatX* out, const floatX* x, const floatX* weight, const floatX* bias, long N,
                    int in, int out_features);
void linear_backward(floatX* dx, floatX* dweight, floatX* dbias, const floatX* dout,
                     const floatX* x, const floatX* weight, long N, int in, int out_features,
                     InputGrad mode);
// x @ weight^T + bias; weight (out, in); bias may be empty
Tensor linear(Tensor x, Tensor weight, Tensor bias);
// A linear layer's parameters, for models built by hand (the GPT lays out its own): weight drawn
// from normal(0, 1/in), bias zero.
struct Linear {
    Tensor weight, bias;
};
Linear linear_layer(Parameters* p, int in, int out, uint64_t seed, bool bias = true);
inline Tensor linear(Tensor x, const Linear& layer) { return linear(x, layer.weight, layer.bias); }

// LayerNorm or RMSNorm (no centring and no bias: mean, bias and dbias are then unused and may be
// null).
enum class Norm { layernorm, rmsnorm };
void norm_forward(Norm kind, floatX* out, real* mean, real* rstd, const floatX* x,
                  const floatX* weight, const floatX* bias, long rows, int C);
void norm_backward(Norm kind, floatX* dx, floatX* dweight, floatX* dbias, const floatX* dout,
                   const floatX* x, const floatX* weight, const real* mean, const real* rstd,
                   long rows, int C, InputGrad mode);
// sum = a + b and out = norm(sum), in one fused pass (its backward: norm_backward into dsum).
void residual_norm_forward(Norm kind, floatX* sum, floatX* out, real* mean, real* rstd,
                           const floatX* a, const floatX* b, const floatX* weight,
                           const floatX* bias, long rows, int C);
Tensor layernorm(Tensor x, Tensor weight, Tensor bias);
Tensor rmsnorm(Tensor x, Tensor weight);
struct ResidualNorm {
    Tensor sum, normalized;
};
ResidualNorm residual_norm(Tensor a, Tensor b, Tensor weight, Tensor bias, Norm kind);

Tensor gelu(Tensor x);
Tensor silu(Tensor x);
// Linear then GELU in one layer: out = gelu(x @ W^T + b); `pre` (N, out_features) keeps x @ W^T +
// b.
void linear_gelu_forward(floatX* out, floatX* pre, const floatX* x, const floatX* weight,
                         const floatX* bias, long N, int in, int out_features);
// dpre: scratch (N, out_features)
void linear_gelu_backward(floatX* dx, floatX* dweight, floatX* dbias, floatX* dpre,
                          const floatX* dout, const floatX* pre, const floatX* x,
                          const floatX* weight, long N, int in, int out_features, InputGrad mode);
Tensor linear_gelu(Tensor x, Tensor weight, Tensor bias);
// The input gradient of a linear layer whose input is gelu(pre), the MLP's middle: dpre (N, in) =
// (dout (N, out_features) @ weight) * gelu'(pre), written. Where the product's epilogue does it
// (gelu_grad_bias_grad) it also adds dpre's column sums into dpre_bias and returns true; else the
// product goes into dact (scratch, N x in), a kernel applies gelu', and it returns false.
bool linear_backward_through_gelu(floatX* dpre, floatX* dpre_bias, floatX* dact, const floatX* dout,
                                  const floatX* pre, const floatX* weight, long N, int in,
                                  int out_features);
void swiglu_forward(floatX* out, const floatX* x, long N, int H);
void swiglu_backward(floatX* dx, const floatX* dout, const floatX* x, long N, int H,
                     InputGrad mode);
Tensor swiglu(Tensor x);  // (..., 2H) -> (..., H): silu(first half) * second half

void dropout_forward(floatX* out, const floatX* x, long n, real p, uint64_t seed);
void dropout_backward(floatX* dx, const floatX* dout, long n, real p, uint64_t seed,
                      InputGrad mode);
Tensor dropout(Tensor x, real p, uint64_t seed);  // p = 0 returns x itself

void residual_forward(floatX* out, const floatX* a, const floatX* b, long n);
void residual_backward(floatX* da, floatX* db, const floatX* dout, long n);
Tensor residual(Tensor a, Tensor b);

// On `rows` positions (sequences of T) of NH head vectors of hs values, rows ld apart; may work in
// place.
void rotary_forward(floatX* out, int ld_out, const floatX* x, int ld_x, long rows, int T, int NH,
                    int hs, int start);
void rotary_backward(floatX* dx, int ld_dx, const floatX* dout, int ld_dout, long rows, int T,
                     int NH, int hs, InputGrad mode);
Tensor rotary(Tensor x);  // x (B, T, NH, hs)

// ====================================================================================================
// 8. Attention
// Causal self-attention on qkv (B, T, 3C) -> (B, T, C), two ways with the same results:
// - plain: matrix products around a (B, NH, T, T) attention matrix; the forward saves att (and
//   att_dropped when dropout_p > 0);
// - flash: one kernel pair with tiles in shared memory and an online softmax, no (T, T) matrix; the
//   forward saves lse, the log-sum-exp of each query's scores, (B, NH, T).
// With rotary positions both also save the rotated q and k, (B, T, C) each. In the bfloat16 build,
// flash attention without attention dropout runs on tensor cores for the head sizes below, the ones
// the emulator checks those kernels at (the GPU build picks them for no other).
constexpr int tensor_core_head_sizes[] = {64, 128};
constexpr bool is_tensor_core_head_size(int head_size) {
    for (int checked : tensor_core_head_sizes)
        if (head_size == checked) return true;
    return false;
}
// Which kernels the tape version and gpt_forward run. `fastest`, the default, takes flash where it
// runs on tensor cores (the bfloat16 GPU build, a head size above, no attention dropout) and plain
// everywhere else: on the CPU plain's matrix products are faster, and on a GPU the scalar flash
// kernels lose to cuBLAS's products. `plain` and `flash` force one (train_gpt --attention).
enum class AttentionKernels { fastest, plain, flash };
extern AttentionKernels attention_kernels;
// Whether a layer with heads of head_size values and this attention dropout runs flash attention.
bool use_flash_attention(int head_size, real dropout_p);
struct AttentionSaved {
    floatX *q, *k, *att, *att_dropped;
    real* lse;
};
struct AttentionScratch {
    floatX *datt, *datt_kept, *dq, *dk;
    real* D;
};
// The backward's scratch buffers, from the arena.
AttentionScratch attention_scratch(int B, int T, int C, int NH, bool rotary, real dropout_p,
                                   bool flash);
void attention_forward(floatX* out, AttentionSaved saved, const floatX* qkv, int B, int T, int C,
                       int NH, bool rotary, real dropout_p, uint64_t seed);
void attention_backward(floatX* dqkv, const floatX* dout, AttentionSaved saved,
                        AttentionScratch scratch, const floatX* qkv, int B, int T, int C, int NH,
                        bool rotary, real dropout_p, uint64_t seed, InputGrad mode);
void flash_attention_forward(floatX* out, AttentionSaved saved, const floatX* qkv, int B, int T,
                             int C, int NH, bool rotary, real dropout_p, uint64_t seed);
void flash_attention_backward(floatX* dqkv, const floatX* dout, const floatX* out,
                              AttentionSaved saved, AttentionScratch scratch, const floatX* qkv,
                              int B, int T, int C, int NH, bool rotary, real dropout_p,
                              uint64_t seed, InputGrad mode);
Tensor attention(Tensor qkv, int heads, bool rotary, real dropout_p, uint64_t seed);

// Tensor cores, for the flash kernels in the bfloat16 build (and the emulator's test): one warp
// computes d += a b, a (16, 16) and b (16, 8) in bfloat16, d (16, 8) in float, each lane holding
// the fragments the PTX ISA lays out for mma.m16n8k16 (described in cuda_cpu.h, which emulates it).
// On a GPU it is the instruction itself (sm_80 and newer); all 32 lanes of the warp must call it.
__device__ __forceinline__ void mma_bf16_16x8x16(float (&d)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2]) {
#ifdef __CUDACC__
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    emu::mma_m16n8k16_bf16(d, a, b, d);
#endif
}

// The fragments' loads from shared memory (sm_80 and newer, emulated with the PTX ISA's semantics
// in cuda_cpu.h). `tile` is a shared_memory<uint32_t>() array and `word` the index of the 16 bytes
// this lane addresses, which must be 16-byte aligned. ldmatrix.x4: the warp loads four 8x8 matrices
// of bfloat16, lanes 8j..8j+7 giving the rows of matrix j; lane l gets in r[j] matrix j's (row l/4,
// columns 2(l%4), 2(l%4)+1), as an mma fragment wants. With `transpose`, it gets (rows 2(l%4),
// 2(l%4)+1, column l/4): a B fragment from a tile stored the other way round.
template <bool transpose, typename Words>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], Words tile, int word) {
#ifdef __CUDACC__
    unsigned address = unsigned(__cvta_generic_to_shared(tile + word));
    if constexpr (transpose)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(address));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(address));
#else
    emu::ldmatrix_x4(r, (tile + word).byte_offset, transpose);
#endif
}

// cp.async: 16 bytes from global memory (16-byte aligned) into shared memory without passing
// through registers, landing later; with `zeros` nothing is read and 16 zero bytes land. Copies
// gather into a group until cp_async_commit(); cp_async_wait<N>() lands every committed group but
// the newest N, for this thread only: other threads see the bytes after a __syncthreads.
template <typename Words>
__device__ __forceinline__ void cp_async_16(Words tile, int word, const void* from, bool zeros) {
#ifdef __CUDACC__
    unsigned address = unsigned(__cvta_generic_to_shared(tile + word));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(address), "l"(from),
                 "r"(zeros ? 0 : 16)
                 : "memory");
#else
    emu::cp_async_16((tile + word).byte_offset, from, zeros);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef __CUDACC__
    asm volatile("cp.async.commit_group;" ::: "memory");
#else
    emu::cp_async_commit();
#endif
}
template <int pending>
__device__ __forceinline__ void cp_async_wait() {
#ifdef __CUDACC__
    asm volatile("cp.async.wait_group %0;" ::"n"(pending) : "memory");
#else
    emu::cp_async_wait(pending);
#endif
}

// Two values rounded to bfloat16 in one 32-bit register, `low` in the low half: the element with
// the lower index in an mma fragment.
__device__ __forceinline__ uint32_t pack_bf16x2(float low, float high) {
    return uint32_t(__bfloat16_as_ushort(__float2bfloat16(low))) |
           uint32_t(__bfloat16_as_ushort(__float2bfloat16(high))) << 16;
}
// A causal self-attention layer for models built by hand: x (B, T, dim) -> (B, T, dim), the qkv
// and output projections around attention().
struct MultiHeadAttention {
    Linear qkv, proj;
    int heads;
};
MultiHeadAttention multi_head_attention_layer(Parameters* p, int dim, int heads, uint64_t seed);
Tensor multi_head_attention(Tensor x, const MultiHeadAttention& layer);

// ====================================================================================================
// 9. Losses
// Softmax + cross-entropy over logits (N, V): the mean over rows whose target is not ignore_index.
// classifier: the losses per row, their mean into loss[0] and the rows counted into count[0], all
// in `real` (float even in the bfloat16 build); with write_gradient it also overwrites the logits
// with d(loss_scale * loss)/dlogits (forward and backward fused). The tape version keeps the
// logits.
constexpr int ignore_index = -1;
// logits (N, padded_V): the first V columns are the classes, the rest padding (the GPT's padded
// vocabulary), left out of the softmax and given a zero gradient.
void classifier(floatX* logits, real* losses, real* loss, real* count, const int* targets, long N,
                int V, int padded_V, real loss_scale, bool write_gradient);
// targets: N ints on the device. classes: how many of the last dim's columns are classes, the
// rest padding (0: all of them).
Tensor cross_entropy(Tensor logits, const int* targets, int classes = 0);
void mse_forward(floatX* loss, const floatX* a, const floatX* b, long n);
void mse_backward(floatX* da, floatX* db, const floatX* dloss, const floatX* a, const floatX* b,
                  long n);
Tensor mse(Tensor a, Tensor b);
// sum[0] += scale * loss[0] on the device: a micro-batch's loss into its step's without the host
// waiting to read it.
void add_loss(real* sum, const real* loss, real scale);

// ====================================================================================================
// 10. The GPT

enum class Activation { gelu, swiglu };

struct GPTConfig {
    int vocab_size = 0, context = 0, dim = 0, layers = 0, heads = 0;
    int mlp_ratio = 4;  // MLP hidden size = mlp_ratio * dim
    Norm norm = Norm::layernorm;
    Activation activation = Activation::gelu;
    bool rotary = false;          // rotary position embedding instead of learned positions
    bool tied_embeddings = true;  // the output layer reuses the token embedding
    float dropout = 0;            // on the embeddings and on each residual branch
    float attention_dropout = 0;  // on the attention probabilities
};
// Whether the GPT's attention layers run flash attention (use_flash_attention for its heads).
inline bool use_flash_attention(const GPTConfig& c) {
    return use_flash_attention(c.dim / c.heads, c.attention_dropout);
}

GPTConfig gpt_preset(const std::string& name);  // "debug", "mini", "shakespeare", "smol"
// Every field within its range: sizes positive and at most vocab 2^24, context 2^17, dim 2^16,
// layers 1024, MLP ratio 64 (so no size computed from them overflows), dim divisible by heads.
void gpt_check_config(const GPTConfig& config);
// Inside the model the vocabulary is padded to a multiple of 128 (GPT-2's 50257 becomes 50304), so
// the lm head's products get dimensions the GPU's tensor cores tile evenly. The padding rows of wte
// (and lm_head) are zero and stay zero: their logits are left out of softmax, loss and sampling,
// so their gradients are zero too. Files hold the real vocabulary only.
int padded_vocab(int vocab_size);

// Every parameter of a config, in buffer order (the decayed weight matrices first): its name in
// model files, its shape there, whether AdamW decays it, its initialisation (> 0: normal(0,
// init_std); 0: zeros; -1: ones), and the values it takes in the model's buffer (more than in the
// file for wte and lm_head: the vocabulary's padding rows). Computed without allocating anything.
struct GPTParameter {
    std::string name;
    std::vector<int> shape;
    bool decay;
    float init_std;
    long buffer_size;
};
std::vector<GPTParameter> gpt_parameter_layout(const GPTConfig& config);
long gpt_parameter_count(const GPTConfig& config);  // as in files: the real vocabulary
// A buffer in the model's parameter order (params, gradients, optimizer moments) to the files'
// order (padding rows dropped), and back (padding rows zero).
std::vector<float> gpt_file_order(const GPTConfig& config, const std::vector<real>& buffer);
std::vector<real> gpt_buffer_order(const GPTConfig& config, const std::vector<float>& file);

struct GPTLayer {
    Tensor norm1_weight, norm1_bias, qkv_weight, qkv_bias, attn_proj_weight, attn_proj_bias;
    Tensor norm2_weight, norm2_bias, fc_weight, fc_bias, mlp_proj_weight, mlp_proj_bias;
};

// Parameters and gradients each live in one contiguous device buffer; the Tensors are views into
// them. The first num_decayed entries (the weight matrices) are the ones AdamW decays. When tensors
// are stored in less than float (the bfloat16 build), `master` holds the float parameters the
// optimizer updates and the files store; otherwise it is null and the parameters are their own
// master. The buffers are freed when the GPT goes out of scope (it cannot be copied).
struct GPT {
    GPTConfig config;
    Parameters params;  // the weight matrices first: AdamW decays exactly those
    // wpe empty if rotary, lm_head if tied
    Tensor wte, wpe, lm_head, final_norm_weight, final_norm_bias;
    std::vector<GPTLayer> layers;
};

void gpt_create(GPT* model, const GPTConfig& config);  // allocates and lays out; gradients zeroed
void gpt_init(GPT* model, uint64_t seed);              // GPT-2 initialisation
std::vector<std::pair<std::string, Tensor>> gpt_named_parameters(
    GPT& model);  // in buffer order, as model files list them (wte, lm_head with padding rows)
// The GPT as a tape expression: logits (B, T, padded vocab); train with
// backward(cross_entropy(logits, targets, config.vocab_size)).
Tensor gpt_forward_tape(GPT& model, const int* tokens, int B, int T, bool training, uint64_t seed);

// The GPT written out (llm.c style): the activations of one (B, T) forward pass, planned on first
// use and reused while B, T and the attention kind stay the same. Shapes (B, T, ...) as noted; C =
// dim, H = the MLP's hidden size, F = its first product's width (H, or 2H for SwiGLU).
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
    // Set by the last gpt_forward, for gpt_backward: the tokens on their way to host_tokens
    // (pinned) until the event tokens_copied, sorted there into host_groups and sent to
    // token_groups with an asynchronous copy (neither pass stalls the stream).
    TokenGroups token_groups{};
    int *host_tokens = nullptr, *host_groups = nullptr;  // n, then 3n + 1 ints
    cudaEvent_t tokens_copied = nullptr;
    uint64_t seed = 0;
    real dropout = 0, attention_dropout = 0;
    // stream[l] (B, T, C) is layer l's input and stream[layers] the last layer's output;
    // normalized[l] = norm1 of layer l (normalized[layers]: the final norm), with mean[l] and
    // rstd[l].
    std::vector<floatX*> stream, normalized;
    std::vector<real*> mean, rstd;
    std::vector<GPTLayerActivations> layers;
    floatX* logits = nullptr;  // (B, T, padded V); gpt_backward overwrites them with their gradient
    // (B, T), the mean, the positions counted
    real *losses = nullptr, *loss = nullptr, *count = nullptr;
    // Scratch shared by the layers: a branch before and after dropout, and the backward's
    // gradients.
    floatX *branch = nullptr, *dropped = nullptr;
    floatX *dstream = nullptr, *dnormalized = nullptr, *dqkv = nullptr, *dattention = nullptr,
           *dfc = nullptr, *dactivation = nullptr, *dbranch = nullptr;
    AttentionScratch scratch{};
    void* memory = nullptr;  // all of the above, one allocation of `bytes`
    size_t bytes = 0;

    GPTActivations() = default;
    GPTActivations(const GPTActivations&) = delete;
    GPTActivations& operator=(const GPTActivations&) = delete;
    ~GPTActivations();
};
// The bytes gpt_forward plans for (B, T) with this config (a memory estimate: nothing allocated).
double gpt_activations_bytes(const GPTConfig& config, int B, int T);
// tokens (B, T) on the device -> acts.logits. Dropout only when training, drawn from `seed`.
void gpt_forward(GPT& model, GPTActivations& acts, const int* tokens, int B, int T, bool training,
                 uint64_t seed);
// The mean loss of the last forward against targets (B, T) (host value; no gradient).
real gpt_loss(GPTActivations& acts, const int* targets, int vocab_size);
// The loss (into acts.loss, on the device) and the gradients of loss_scale * loss, added into
// model.gradients (loss_scale = 1 / micro-batches when accumulating).
void gpt_backward(GPT& model, GPTActivations& acts, const int* targets, real loss_scale);

// ====================================================================================================
// 11. Generation

// Keys and values of every layer for the positions seen so far, (layers, NH, positions, hs) each,
// room for `positions` (at most the context).
struct KVCache {
    GPTConfig config;
    floatX *keys = nullptr, *values = nullptr;
    int positions = 0;
    int length = 0;  // positions filled

    KVCache() = default;
    KVCache(const KVCache&) = delete;
    KVCache& operator=(const KVCache&) = delete;
    ~KVCache();
};
void kv_cache_create(KVCache* cache, const GPTConfig& config, int positions);
// Runs n more positions of one sequence (tokens on the device), adding them to the cache; returns
// the last position's logits (padded_vocab values on the device, in the arena; the first
// vocab_size are the real ones).
floatX* gpt_forward_cached(GPT& model, KVCache& cache, const int* tokens, int n);

struct Sampler {
    float temperature = 1;   // 0: greedy
    int top_k = 0;           // 0: no limit
    float top_p = 1;         // nucleus: the smallest set of tokens reaching this probability
    uint64_t rng_state = 0;  // splitmix64
};
int sample_token(const std::vector<real>& logits, Sampler& sampler);
// Appends `count` sampled tokens to `tokens` (the prompt, not empty), calling on_token for each as
// it comes. With use_cache, each token costs one position of work; without, a full forward pass.
void generate(GPT& model, std::vector<int>& tokens, int count, Sampler& sampler, bool use_cache,
              const std::function<void(int)>& on_token);

// ====================================================================================================
// 12. Optimizers and training maths

// sqrt(sum g^2) into norm[0], on the device
void gradient_norm(real* norm, const floatX* gradients, long n);

// Both optimizers clip by global norm themselves when given the device norm and max_norm > 0:
// gradients are scaled by max_norm / (norm + 1e-6) when that is below 1 (as torch's
// clip_grad_norm_). Optimizer state is freed when the optimizer goes out of scope.
struct AdamW {
    float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.1f;
    long step = 0, n = 0;
    long offset = 0;  // m and v belong to parameters [offset, offset + n): all, or a shard (ZeRO-1)
    real *m = nullptr, *v = nullptr;

    AdamW() = default;
    AdamW(const AdamW&) = delete;
    AdamW& operator=(const AdamW&) = delete;
    ~AdamW();
};
void adamw_create(AdamW* opt, long n, long offset = 0);
// One step over the optimizer's n parameters of p, through their float master copy when there is
// one. A shard's update is the same, value for value, as that part of a whole-buffer update. Given
// a norm that is not finite, it leaves the parameters, master copy and moments as they were (only
// opt->step advances), so that a program may read the norm after the step and stop on it.
void adamw_update(AdamW* opt, Parameters& p, real lr, const real* norm = nullptr,
                  real max_norm = 0);

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
void sgd_update(SGD* opt, Parameters& p, real lr, const real* norm = nullptr, real max_norm = 0);

// Linear warmup over `warmup` steps, then cosine decay to min_lr at the last step.
float learning_rate(long step, long warmup, long total_steps, float max_lr, float min_lr);

#include "tricycle_io.h"  // Part II: profiling reports, model files, the tokenizer, data, programs
