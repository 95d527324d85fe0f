// tricycle.cu — the library's core: memory, tensors, the tape, every kernel with its backward, the
// GPT and its optimizers. See tricycle.h for the overview; this file follows the same order:
//
//    1. Errors and launching kernels: launch shapes, loop helpers, fast_exp
//    2. Memory: the arena, filling buffers
//    3. Tensors
//    4. The tape: recording and backward()
//    5. Operations: elementwise, broadcasting, reductions, reshape and transpose, softmax
//    6. Matrix products: gemm (cuBLAS / oneDNN), matmul
//    7. Layers: column sums, embedding, linear, LayerNorm and RMSNorm, GELU and SwiGLU, dropout,
//       residual, rotary positions
//    8. Attention: plain (matrix products around a (T, T) matrix), flash (tiles, online softmax;
//       on tensor cores in the bfloat16 build)
//    9. Losses: the classifier (softmax + cross-entropy, fused with its backward), mean squared
//    error
//   10. The GPT: parameters, as a tape expression, written out (gpt_forward and gpt_backward)
//   11. Generation: the key/value cache, sampling
//   12. Optimizers: gradient norm, AdamW, SGD, the learning-rate schedule
//
// Part II (profiling reports, model files, the tokenizer, token files, the data loader, the
// programs' helpers) is in tricycle_io.cu.
#include "tricycle.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <queue>
#include <unordered_set>
#include <stdexcept>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef __CUDACC__
#include <cblas.h>
#include <oneapi/dnnl/dnnl.hpp>
#endif

// ====================================================================================================
// 1. Errors and launching kernels

void fail(const char* format, ...) {
    char message[2048];
    va_list args;
    va_start(args, format);
    vsnprintf(message, sizeof message, format, args);
    va_end(args);
    throw std::runtime_error(message);
}

void cuda_check(cudaError_t error, const char* file, int line) {
    if (error == cudaSuccess) return;
    // Without a GPU, or without its driver, CUDA's own words ("CUDA driver version is insufficient
    // for CUDA runtime version") do not say what to do.
    bool no_gpu = error == cudaErrorNoDevice || error == cudaErrorInsufficientDriver;
    fail("%s:%d: CUDA error: %s%s", file, line, cudaGetErrorString(error),
         no_gpu ? " (this is the GPU build and no usable GPU or driver was found; make CPU=1 "
                  "builds the CPU programs)"
                : "");
}

// TRICYCLE_SYNC_CHECK=1 waits for every kernel and checks it, so that a fault on a GPU names its
// kernel instead of surfacing at a later copy (slow: for finding bugs).
static const bool sync_check = [] {
    const char* value = getenv("TRICYCLE_SYNC_CHECK");
    return value && !strcmp(value, "1");
}();

void check_launch(const void* kernel) {
    cudaError_t error = cudaGetLastError();
    if (error == cudaSuccess && sync_check) error = cudaDeviceSynchronize();
    if (error == cudaSuccess) return;
#ifdef __CUDACC__
    const char* name = "?";
    cudaFuncGetName(&name, kernel);
    fail("kernel %s failed to launch: %s", name, cudaGetErrorString(error));
#else
    (void)kernel;
    fail("%s", emu::last_error_message().c_str());
#endif
}

#ifdef __CUDACC__
static void cublas_check(cublasStatus_t status, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
    if (status != CUBLAS_STATUS_SUCCESS) fail("%s:%d: cuBLAS error %d", file, line, int(status));
}

static cublasHandle_t cublas_handle() {
    static cublasHandle_t handle = nullptr;
    if (!handle) cublas_check(cublasCreate(&handle));
    return handle;
}
#endif

// ----------------------------------------------------------------------------------------------------
// Launch shapes. Two patterns cover most kernels.
//
// Elementwise kernels cut the data into one contiguous tile per block, and the block's threads
// stride through their tile: neighbouring threads touch neighbouring elements, which a GPU
// coalesces. Under the CPU emulator a block has one thread, which walks its tile with unit stride:
// a plain loop that the compiler vectorises.
//
// Row kernels (softmax, normalisations, cross-entropy) give each row a group of `threads_per_row`
// threads, 1 to 32, that share the row the same way and combine partial results with warp shuffles.
// A GPU wants a warp per row; the emulator is fastest with 1, where no shuffle happens. Tests run
// both.

// The CPU build can launch with the GPU's shapes instead (TRICYCLE_LAUNCH_SHAPES=gpu; the tests run
// so in CI, `make test-gpu-shapes`): what a GPU runs then runs, block for block, under the
// emulator.
#ifdef __CUDACC__
static const bool gpu_launch_shapes = true;
#else
static const bool gpu_launch_shapes = [] {
    const char* shapes = getenv("TRICYCLE_LAUNCH_SHAPES");
    return shapes && !strcmp(shapes, "gpu");
}();
#endif
bool launching_gpu_shapes() { return gpu_launch_shapes; }

int threads_per_row = gpu_launch_shapes ? 32 : 1;
static const int element_threads = gpu_launch_shapes ? 256 : 1;  // threads per elementwise block
// GPU: enough blocks to fill an H100 several times over; CPU: a few per core, to share the work.
static const long max_blocks = gpu_launch_shapes ? 132 * 32 : 64;
static int rows_per_block() {
    return gpu_launch_shapes      ? 256 / threads_per_row
           : threads_per_row < 16 ? 16 / threads_per_row
                                  : 1;
}

static unsigned clamp_blocks(long blocks) {
    return unsigned(blocks < 1 ? 1 : blocks < max_blocks ? blocks : max_blocks);
}

// Blocks of `threads` for a grid-stride loop over n elements (kernels with irregular indexing).
unsigned grid_size(long n, int threads) { return clamp_blocks((n + threads - 1) / threads); }

// Elementwise kernels: blocks of element_threads threads; on the CPU, a block per 2048 elements or
// more.
static unsigned element_blocks(long n) {
    long per_block = element_threads > 1 ? element_threads : 2048;
    return clamp_blocks((n + per_block - 1) / per_block);
}

// Row kernels: blocks of (threads_per_row, rows_per_block) threads.
static dim3 row_block() { return dim3(threads_per_row, rows_per_block()); }
static dim3 row_grid(long rows) {
    return dim3(unsigned((rows + rows_per_block() - 1) / rows_per_block()));
}

// Calls body(i) for the i in [begin, end) that thread `thread` of `threads` handles: begin +
// thread, then every threads-th. A lone thread takes them all in a unit-stride loop, declared a
// SIMD loop: the bodies are independent of each other (with more threads they run at once), which
// the CPU compiler cannot always prove by itself (e.g. through bfloat16 stores and selects).
template <typename F>
__device__ __forceinline__ void for_each_strided(long begin, long end, int thread, int threads,
                                                 F body) {
    if (threads == 1) {
#pragma omp simd
        for (long i = begin; i < end; i++) body(i);
    } else {
        for (long i = begin + thread; i < end; i += threads) body(i);
    }
}

// Elementwise kernels: this block's tile [begin, end) of [0, n). Tiles are multiples of 64
// elements, so they start on cache-line (and vector) boundaries.
struct Tile {
    long begin, end;
};
__device__ __forceinline__ Tile block_tile(long n) {
    long size = ((n + gridDim.x - 1) / gridDim.x + 63) / 64 * 64, begin = blockIdx.x * size;
    return Tile{begin, begin + size < n ? begin + size : n};
}

// Elementwise kernels: this thread's share of its block's tile.
template <typename F>
__device__ __forceinline__ void for_each_element(long n, F body) {
    Tile tile = block_tile(n);
    for_each_strided(tile.begin, tile.end, threadIdx.x, blockDim.x, body);
}

// Row kernels: this thread's share of the `count` elements of its group's row.
template <typename F>
__device__ __forceinline__ void for_each_in_row(int count, F body) {
    for_each_strided(0, count, threadIdx.x, blockDim.x, [&](long i) { body(int(i)); });
}

// N values of T moved by one load or store (N * sizeof(T) bytes, aligned to that): AdamW's four
// parameters at a time, the classifier's row in 32-bit words.
template <typename T, int N>
struct alignas(N * sizeof(T)) Pack {
    T v[N];
};

// An empty instruction that nvcc must assume changes `word` (32 bits), for a kernel that holds
// words of two bfloat16 in registers and reads them in several passes: called between the passes,
// it makes the compiler unpack each word again (a shift) instead of keeping both halves as floats,
// twice the registers (nvcc 13.0 does so for sm_90, and spills). Nothing on the CPU.
template <typename T>
__device__ __forceinline__ void keep_packed([[maybe_unused]] T& word) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "a word of 32 or 64 bits");
#ifdef __CUDACC__
    if constexpr (sizeof(T) == 4) asm volatile("" : "+r"(*reinterpret_cast<uint32_t*>(&word)));
#endif
}

// Sums and maxima of f(i) over this thread's share of [begin, end) (as for_each_strided). A lone
// thread's loop is declared a SIMD reduction, which lets the CPU compiler vectorise it (adding in
// another order than a plain loop would, so the last bits may differ).
template <typename F>
__device__ __forceinline__ real sum_strided(long begin, long end, int thread, int threads, F f) {
    real total = 0;
    if (threads == 1) {
#pragma omp simd reduction(+ : total)
        for (long i = begin; i < end; i++) total += f(i);
    } else {
        for (long i = begin + thread; i < end; i += threads) total += f(i);
    }
    return total;
}

template <typename F>
__device__ __forceinline__ real max_strided(long begin, long end, int thread, int threads, F f) {
    real best = -INFINITY;
    if (threads == 1) {
#pragma omp simd reduction(max : best)
        for (long i = begin; i < end; i++) {
            real value = f(i);
            best = value > best ? value : best;
        }
    } else {
        for (long i = begin + thread; i < end; i += threads) best = fmax(best, f(i));
    }
    return best;
}

// Row kernels: this thread's part of the sum (max) of f over the `count` elements of its row.
template <typename F>
__device__ __forceinline__ real row_sum(int count, F f) {
    return sum_strided(0, count, threadIdx.x, blockDim.x, [&](long i) { return f(int(i)); });
}
template <typename F>
__device__ __forceinline__ real row_max(int count, F f) {
    return max_strided(0, count, threadIdx.x, blockDim.x, [&](long i) { return f(int(i)); });
}

// Within a row kernel: which row this thread's group handles. Threads of a row past the end work on
// the last row but must not write (they still take part in the group's shuffles).
__device__ __forceinline__ long group_row(long rows, bool* active) {
    long row = long(blockIdx.x) * blockDim.y + threadIdx.y;
    *active = row < rows;
    return row < rows ? row : rows - 1;
}

// The lanes of this thread's warp that exist: all 32, unless the block is smaller than a warp.
__device__ __forceinline__ unsigned warp_lanes() {
    unsigned threads = blockDim.x * blockDim.y * blockDim.z;
    return threads >= 32 ? 0xffffffffu : (1u << threads) - 1;
}

// Sum and max across the threads of a row group, by butterfly shuffles: every thread gets the
// result.
__device__ __forceinline__ real group_sum(real value) {
    for (int offset = blockDim.x / 2; offset > 0; offset /= 2)
        value += __shfl_xor_sync(warp_lanes(), value, offset, blockDim.x);
    return value;
}

__device__ __forceinline__ real group_max(real value) {
    for (int offset = blockDim.x / 2; offset > 0; offset /= 2)
        value = fmax(value, __shfl_xor_sync(warp_lanes(), value, offset, blockDim.x));
    return value;
}

// Sum or max across a whole block of whole warps, for a kernel that gives a row a block: each warp
// combines its lanes by shuffles, then every warp combines the warps' results, which wait in the
// first 32 reals of the block's dynamic shared memory (lanes past the last warp take `identity`);
// every thread gets the result. The barrier after the read lets the next reduction reuse them.
template <typename Combine>
__device__ __forceinline__ real block_reduce(real value, real identity, Combine combine) {
    auto partial = shared_memory<real>();
    for (int offset = 16; offset > 0; offset /= 2)
        value = combine(value, __shfl_xor_sync(0xffffffffu, value, offset));
    unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (lane == 0) partial[warp] = value;
    __syncthreads();
    value = lane < warps ? partial[lane] : identity;
    for (int offset = 16; offset > 0; offset /= 2)
        value = combine(value, __shfl_xor_sync(0xffffffffu, value, offset));
    __syncthreads();
    return value;
}

// e^x in float by range reduction and a polynomial: x = k ln2 + r with |r| <= ln2/2, e^x = 2^k e^r.
// About 1 ulp, and only arithmetic, so loops of it vectorise on the CPU (libm's expf does not); a
// GPU runs it as a short chain of FMAs. In double (the gradient-check build) it is exp itself.
__device__ __forceinline__ float fast_exp(float x) {
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;  // (not fminf/fmaxf: NaN must pass through)
    // k = round(x / ln2), read from the low bits of x / ln2 + 1.5 * 2^23 rather than converted
    // from float to int (undefined for NaN): NaN in, NaN out.
    float shifted = fmaf(x, 1.44269504f, 12582912.0f), k = shifted - 12582912.0f;
    float r = fmaf(k, -0.693359375f, x);  // ln2 in two parts, so r keeps its low bits
    r = fmaf(k, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p * r, r, r) + 1.0f;
    unsigned two_to_k = (__float_as_uint(shifted) - 0x4B400000u + 127u) << 23;  // 2^k as float bits
    return p * __uint_as_float(two_to_k);
}
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }

// logsumexp of f over a row, for a row kernel: this thread's largest value and its sum of
// e^(value - largest), then the group's. A GPU thread reads each of its elements once, rescaling
// its sum when its largest value grows (the online softmax): the row is read once, not twice. A
// lone CPU thread reads it twice, largest then sum, since the row stays in its cache and those two
// loops vectorise where the rescaling one does not.
struct LargestAndSum {
    real largest, sum;
};

template <typename F>
__device__ __forceinline__ LargestAndSum row_largest_and_sum(int count, F f) {
    if (blockDim.x == 1) {
        real largest = row_max(count, f);
        return {largest, row_sum(count, [&](int i) { return fast_exp(f(i) - largest); })};
    }
    real largest = -INFINITY, sum = 0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
        real value = f(i);
        if (value == -INFINITY) continue;  // adds 0 (-inf - -inf would make the sum NaN)
        if (value > largest) {
            sum *= fast_exp(largest - value);
            largest = value;
        }
        sum += fast_exp(value - largest);
    }
    return {largest, sum};
}

__device__ __forceinline__ real group_logsumexp(LargestAndSum part) {
    real largest = group_max(part.largest);
    return largest + log(group_sum(part.sum * fast_exp(part.largest - largest)));
}

// ====================================================================================================
// 2. Memory
// Memory: two bump arenas, one of device memory for tensors and one of host memory for tape
// closures.

struct Arena {
    bool on_device;
    size_t first_chunk_bytes;
    std::vector<char*> chunks;
    std::vector<size_t> chunk_bytes;
    int chunk = 0;      // the chunk being filled
    size_t offset = 0;  // bytes used in it

    ~Arena() {  // at exit; errors are moot then (the CUDA runtime may already be shutting down)
        for (char* memory : chunks) on_device ? (void)cudaFree(memory) : free(memory);
    }
};

static Arena device_arena{true, size_t(64) << 20, {}, {}, 0, 0};
static Arena tape_arena{false, size_t(1) << 20, {}, {}, 0, 0};

static void* arena_alloc(Arena& arena, size_t bytes, size_t alignment) {
    for (;;) {
        if (arena.chunk < int(arena.chunks.size())) {
            size_t start = (arena.offset + alignment - 1) / alignment * alignment;
            if (start + bytes <= arena.chunk_bytes[arena.chunk]) {
                arena.offset = start + bytes;
                return arena.chunks[arena.chunk] + start;
            }
            arena.chunk++, arena.offset = 0;
            continue;
        }
        // Out of chunks: take a new one from the system, as large as the request or the first
        // chunk (not doubling: on a GPU every byte asked for is committed).
        size_t size =
            std::max(arena.first_chunk_bytes, (bytes + alignment + (size_t(1) << 20)) >> 20 << 20);
        char* memory = nullptr;
        if (arena.on_device) {
            if (cudaMalloc(&memory, size) != cudaSuccess)
                fail("out of device memory: the arena needs %zu MB more, with %zu MB in use",
                     size >> 20, memory_in_use() >> 20);
        } else {
            memory = static_cast<char*>(malloc(size));
            if (!memory) fail("out of host memory allocating %zu bytes for the tape", size);
        }
        arena.chunks.push_back(memory);
        arena.chunk_bytes.push_back(size);
    }
}

void* device_alloc(size_t bytes) { return arena_alloc(device_arena, bytes, 256); }
void* tape_alloc(size_t bytes) { return arena_alloc(tape_arena, bytes, 16); }

static std::vector<TapeEntry> tape;

MemoryMark memory_mark() {
    return MemoryMark{device_arena.chunk, device_arena.offset, tape.size(),
                      size_t(tape_arena.chunk), tape_arena.offset};
}

void memory_release(MemoryMark mark) {
    device_arena.chunk = mark.chunk, device_arena.offset = mark.offset;
    tape_arena.chunk = int(mark.tape_chunk), tape_arena.offset = mark.tape_offset;
    if (tape.size() > mark.tape_length) tape.resize(mark.tape_length);
}

size_t memory_in_use() {
    size_t bytes = device_arena.offset;
    for (int c = 0; c < device_arena.chunk && c < int(device_arena.chunks.size()); c++)
        bytes += device_arena.chunk_bytes[c];
    return bytes;
}

size_t memory_reserved() {
    size_t bytes = 0;
    for (size_t size : device_arena.chunk_bytes) bytes += size;
    return bytes;
}

// ----------------------------------------------------------------------------------------------------
// Filling buffers: constants and counter-based random draws (see random_bits in tricycle.h).

__global__ void fill_kernel(floatX* out, long n, real value) {
    for_each_element(n, [&](long i) { out[i] = value; });
}

__global__ void fill_uniform_kernel(floatX* out, long n, uint64_t seed, real low, real high) {
    for_each_element(
        n, [&](long i) { out[i] = low + (high - low) * real(random_uniform(seed, uint64_t(i))); });
}

// Box-Muller: element i uses the uniform draws 2i and 2i+1 (u1 is kept away from 0 for the log).
__global__ void fill_normal_kernel(floatX* out, long n, uint64_t seed, real mean, real std) {
    for_each_element(n, [&](long i) {
        double u1 =
            (double(random_bits(seed, 2 * uint64_t(i)) >> 11) + 1.0) * (1.0 / 9007199254740992.0);
        double u2 =
            double(random_bits(seed, 2 * uint64_t(i) + 1) >> 11) * (1.0 / 9007199254740992.0);
        out[i] = mean + std * real(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
    });
}

void fill(floatX* out, long n, real value) {
    launch(fill_kernel, element_blocks(n), element_threads, 0, out, n, value);
}
void fill_normal(floatX* out, long n, uint64_t seed, real mean, real std) {
    launch(fill_normal_kernel, element_blocks(n), element_threads, 0, out, n, seed, mean, std);
}
void fill_uniform(floatX* out, long n, uint64_t seed, real low, real high) {
    launch(fill_uniform_kernel, element_blocks(n), element_threads, 0, out, n, seed, low, high);
}

// ====================================================================================================
// 3. Tensors

long Tensor::size() const {
    long n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    return n;
}

int Tensor::dim(int i) const {
    int d = i < 0 ? ndim + i : i;
    if (d < 0 || d >= ndim) fail("dim %d out of range for a tensor with %d dims", i, ndim);
    return shape[d];
}

// with_grad: the result of an operation on tensors that require a gradient; backward zeroes its
// gradient buffer before use.
static Tensor make_tensor(int ndim, const int* shape, bool with_grad) {
    if (ndim > max_dims) fail("tensors have at most %d dims, got %d", max_dims, ndim);
    Tensor t;
    t.ndim = ndim;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0) fail("negative dim %d in a tensor shape", shape[i]);
        t.shape[i] = shape[i];
    }
    t.data = device_alloc<floatX>(t.size());
    if (with_grad) t.grad = device_alloc<floatX>(t.size());
    return t;
}

static Tensor make_tensor(Shape shape) {
    return make_tensor(int(shape.size()), shape.begin(), false);
}

Tensor empty(Shape shape) { return make_tensor(shape); }
Tensor empty_like(Tensor t) { return make_tensor(t.ndim, t.shape, false); }

Tensor full(Shape shape, real value) {
    Tensor t = make_tensor(shape);
    fill(t.data, t.size(), value);
    return t;
}

Tensor zeros(Shape shape) { return full(shape, 0); }
Tensor ones(Shape shape) { return full(shape, 1); }
Tensor tensor(real value) { return full({}, value); }

Tensor tensor(const std::vector<real>& values, Shape shape) {
    Tensor t = make_tensor(shape);
    if (long(values.size()) != t.size())
        fail("tensor: %zu values given for shape %s", values.size(), shape_string(t).c_str());
    copy_from_host(t, values.data());
    return t;
}

Tensor randn(Shape shape, uint64_t seed, real mean, real std) {
    Tensor t = make_tensor(shape);
    fill_normal(t.data, t.size(), seed, mean, std);
    return t;
}

Tensor rand_uniform(Shape shape, uint64_t seed, real low, real high) {
    Tensor t = make_tensor(shape);
    fill_uniform(t.data, t.size(), seed, low, high);
    return t;
}

Tensor requires_grad(Tensor t) {
    if (!t.grad) {
        t.grad = device_alloc<floatX>(t.size());
        cuda_check(cudaMemset(t.grad, 0, t.size() * sizeof(floatX)));
    }
    return t;
}

Tensor grad(Tensor t) {
    if (!t.grad) fail("grad: the tensor %s does not require a gradient", shape_string(t).c_str());
    Tensor g = t;
    g.data = t.grad;
    g.grad = nullptr;
    return g;
}

std::vector<real> to_host(Tensor t) { return download(t.data, t.size()); }
void copy_from_host(Tensor t, const real* values) { upload(t.data, values, t.size()); }

// Like Python: (), (6,), (6, 5).
std::string shape_string(Tensor t) {
    std::string s = "(";
    for (int i = 0; i < t.ndim; i++) s += (i ? ", " : "") + std::to_string(t.shape[i]);
    return s + (t.ndim == 1 ? ",)" : ")");
}

// Whole numbers print as 14.0, others with 6 significant digits.
static std::string format_number(real v) {
    char text[32];
    if (std::isfinite(v) && v == std::floor(v) && std::fabs(v) < 1e15)
        snprintf(text, sizeof text, "%.1f", double(v));
    else snprintf(text, sizeof text, "%.6g", double(v));
    return text;
}

// Nested brackets like NumPy; with more than 1000 elements, each dim shows its first and last 3.
static void format_dims(std::string& out, const std::vector<real>& values, const Tensor& t, int d,
                        long offset, bool shorten) {
    if (d == t.ndim) {
        out += format_number(values[offset]);
        return;
    }
    long stride = 1;
    for (int i = d + 1; i < t.ndim; i++) stride *= t.shape[i];
    out += "[";
    for (int i = 0; i < t.shape[d]; i++) {
        if (shorten && t.shape[d] > 6 && i == 3) {
            out += "..., ";
            i = t.shape[d] - 3;
        }
        format_dims(out, values, t, d + 1, offset + i * stride, shorten);
        if (i + 1 < t.shape[d]) out += ", ";
    }
    out += "]";
}

std::string to_string(Tensor t) {
    std::vector<real> values = to_host(t);
    std::string out = "Tensor(";
    format_dims(out, values, t, 0, 0, t.size() > 1000);
    if (t.ndim > 1) out += ", shape=" + shape_string(t);
    return out + ")";
}

void print(Tensor t) { printf("%s\n", to_string(t).c_str()); }

// ----------------------------------------------------------------------------------------------------
// Parameters

void parameters_create(Parameters* p, long capacity) {
    if (p->data) fail("parameters_create: these parameters are already allocated");
    cuda_check(cudaMalloc(&p->data, capacity * sizeof(floatX)));
    cuda_check(cudaMalloc(&p->grad, capacity * sizeof(floatX)));
    cuda_check(cudaMemset(p->grad, 0, capacity * sizeof(floatX)));
    if (!std::is_same<floatX, real>::value)
        cuda_check(cudaMalloc(&p->master, capacity * sizeof(real)));
    p->master_offset = 0, p->master_count = capacity;
    p->capacity = capacity, p->size = 0;
}

// Destructors do not throw: a failing cudaFree at exit has nothing left to protect.
Parameters::~Parameters() {
    (void)cudaFree(data);
    (void)cudaFree(grad);
    (void)cudaFree(master);
}

static Tensor parameter(Parameters* p, int ndim, const int* shape) {
    Tensor t;
    t.ndim = ndim;
    std::copy(shape, shape + ndim, t.shape);
    if (p->size + t.size() > p->capacity)
        fail("parameter: %s does not fit, %ld of %ld values are taken", shape_string(t).c_str(),
             p->size, p->capacity);
    t.data = p->data + p->size, t.grad = p->grad + p->size;
    p->size += t.size();
    return t;
}

Tensor parameter(Parameters* p, Shape shape) {
    return parameter(p, int(shape.size()), shape.begin());
}

void parameters_zero_grad(Parameters& p) {
    cuda_check(cudaMemset(p.grad, 0, p.size * sizeof(floatX)));
}

__global__ void add_grad_kernel(real* sum, floatX* grad, long n) {
    for_each_element(n, [&](long i) { sum[i] += real(grad[i]), grad[i] = floatX(0); });
}

__global__ void grad_from_kernel(floatX* grad, const real* sum, long n) {
    for_each_element(n, [&](long i) { grad[i] = floatX(sum[i]); });
}

void parameters_add_grad_to(Parameters& p, real* sum) {
    launch(add_grad_kernel, element_blocks(p.size), element_threads, 0, sum, p.grad, p.size);
}

void parameters_grad_from(Parameters& p, const real* sum) {
    launch(grad_from_kernel, element_blocks(p.size), element_threads, 0, p.grad, sum, p.size);
}

void parameters_sync_master(Parameters& p) {
    if (!p.master) return;
    long count = std::min(p.master_count, p.size - p.master_offset);
    std::vector<real> values = download(p.data + p.master_offset, count);
    upload(p.master, values.data(), count);
}

void parameters_shard_master(Parameters& p, long offset, long count) {
    if (!p.master || (offset == p.master_offset && count == p.master_count)) return;
    if (offset < p.master_offset || count < 0 || offset + count > p.master_offset + p.master_count)
        fail("parameters_shard_master: [%ld, %ld) is not within the master copy's [%ld, %ld)",
             offset, offset + count, p.master_offset, p.master_offset + p.master_count);
    real* shard;
    cuda_check(cudaMalloc(&shard, std::max(count, 1L) * sizeof(real)));
    cuda_check(cudaMemcpy(shard, p.master + (offset - p.master_offset), count * sizeof(real),
                          cudaMemcpyDeviceToDevice));
    cuda_check(cudaFree(p.master));
    p.master = shard, p.master_offset = offset, p.master_count = count;
}

// ====================================================================================================
// 4. The tape

bool grad_enabled = true;

void tape_append(TapeEntry entry, std::initializer_list<Tensor> outputs,
                 std::initializer_list<Tensor> inputs) {
    if (outputs.size() > size_t(tape_max_outputs) || inputs.size() > size_t(tape_max_inputs))
        fail("tape_append: too many tensors for one entry");
    std::copy(outputs.begin(), outputs.end(), entry.outputs);
    std::copy(inputs.begin(), inputs.end(), entry.inputs);
    tape.push_back(entry);
}

size_t tape_length() { return tape.size(); }

void backward(Tensor t) {
    if (!t.grad)
        fail("backward: the tensor %s does not require a gradient (no input of it does)",
             shape_string(t).c_str());
    // Walking back from t: an entry is needed when t depends on one of its outputs; then t depends
    // on its inputs too. (Tensors are told apart by their gradient buffers; a reshape shares its
    // source's.)
    std::vector<bool> needed(tape.size(), false);
    std::unordered_set<const floatX*> depends = {t.grad};
    for (size_t i = tape.size(); i-- > 0;) {
        for (const Tensor& out : tape[i].outputs)
            needed[i] = needed[i] || (out.grad && depends.count(out.grad));
        if (!needed[i]) continue;
        for (const Tensor& in : tape[i].inputs)
            if (in.grad) depends.insert(in.grad);
    }
    // Fresh gradients for the intermediate results: zero, then seed t with ones.
    for (size_t i = 0; i < tape.size(); i++)
        for (const Tensor& out : tape[i].outputs)
            if (needed[i] && out.grad) fill(out.grad, out.size(), 0);
    fill(t.grad, t.size(), 1);
    PhaseScope phase("backward");
    for (size_t i = tape.size(); i-- > 0;)
        if (needed[i]) tape[i].run(tape[i].closure);
}

void zero_grad(Tensor t) {
    if (t.grad) cuda_check(cudaMemset(t.grad, 0, t.size() * sizeof(floatX)));
}

static bool any_requires_grad(std::initializer_list<Tensor> inputs) {
    if (!grad_enabled) return false;
    for (const Tensor& t : inputs)
        if (t.grad) return true;
    return false;
}

Tensor new_result(const Tensor& like, std::initializer_list<Tensor> inputs) {
    return make_tensor(like.ndim, like.shape, any_requires_grad(inputs));
}

// ====================================================================================================
// 5. Operations
// Elementwise functions of one tensor: out = f(x), and backward dx += dout * f'(x).
// Each function is a small struct; the kernels are templates over it, one kernel per function.
// The derivative is computed from x alone, so backward needs nothing saved but the input. The
// structs' functions are forced inline: on the CPU a call per element keeps a loop from
// vectorising.

struct Neg {
    __device__ __forceinline__ real forward(real x) const { return -x; }
    __device__ __forceinline__ real derivative(real) const { return -1; }
};
struct AddScalar {
    real c;
    __device__ __forceinline__ real forward(real x) const { return x + c; }
    __device__ __forceinline__ real derivative(real) const { return 1; }
};
struct MulScalar {
    real c;
    __device__ __forceinline__ real forward(real x) const { return x * c; }
    __device__ __forceinline__ real derivative(real) const { return c; }
};
struct PowScalar {
    real p;
    __device__ __forceinline__ real forward(real x) const { return pow(x, p); }
    __device__ __forceinline__ real derivative(real x) const { return p * pow(x, p - 1); }
};
struct Exp {
    __device__ __forceinline__ real forward(real x) const { return fast_exp(x); }
    __device__ __forceinline__ real derivative(real x) const { return fast_exp(x); }
};
struct Log {
    __device__ __forceinline__ real forward(real x) const { return log(x); }
    __device__ __forceinline__ real derivative(real x) const { return 1 / x; }
};
struct Sqrt {
    __device__ __forceinline__ real forward(real x) const { return sqrt(x); }
    __device__ __forceinline__ real derivative(real x) const { return real(0.5) / sqrt(x); }
};
struct Sin {
    __device__ __forceinline__ real forward(real x) const { return sin(x); }
    __device__ __forceinline__ real derivative(real x) const { return cos(x); }
};
struct Cos {
    __device__ __forceinline__ real forward(real x) const { return cos(x); }
    __device__ __forceinline__ real derivative(real x) const { return -sin(x); }
};
struct Tanh {
    __device__ __forceinline__ real forward(real x) const { return tanh(x); }
    __device__ __forceinline__ real derivative(real x) const { return 1 - tanh(x) * tanh(x); }
};
struct Sigmoid {
    __device__ __forceinline__ real forward(real x) const { return 1 / (1 + fast_exp(-x)); }
    __device__ __forceinline__ real derivative(real x) const {
        return forward(x) * (1 - forward(x));
    }
};
struct Relu {
    __device__ __forceinline__ real forward(real x) const { return x > 0 ? x : 0; }
    __device__ __forceinline__ real derivative(real x) const { return x > 0 ? 1 : 0; }
};

template <typename F>
__global__ void map_forward_kernel(floatX* out, const floatX* x, long n, F f) {
    for_each_element(n, [&](long i) { out[i] = f.forward(x[i]); });
}

template <typename F>
__global__ void map_backward_kernel(floatX* dx, const floatX* dout, const floatX* x, long n, F f) {
    for_each_element(n, [&](long i) { dx[i] += dout[i] * f.derivative(x[i]); });
}

template <typename F>
static void map_forward(floatX* out, const floatX* x, long n, F f) {
    launch(map_forward_kernel<F>, element_blocks(n), element_threads, 0, out, x, n, f);
}

template <typename F>
static void map_backward(floatX* dx, const floatX* dout, const floatX* x, long n, F f) {
    launch(map_backward_kernel<F>, element_blocks(n), element_threads, 0, dx, dout, x, n, f);
}

template <typename F>
static Tensor map(Tensor x, F f) {
    Tensor out = new_result(x, {x});
    long n = x.size();
    map_forward(out.data, x.data, n, f);
    if (out.grad) record({out}, {x}, [=] { map_backward(x.grad, out.grad, x.data, n, f); });
    return out;
}

Tensor neg(Tensor x) { return map(x, Neg{}); }
Tensor add_scalar(Tensor x, real c) { return map(x, AddScalar{c}); }
Tensor mul_scalar(Tensor x, real c) { return map(x, MulScalar{c}); }
Tensor pow_scalar(Tensor x, real p) { return map(x, PowScalar{p}); }
Tensor exp(Tensor x) { return map(x, Exp{}); }
Tensor log(Tensor x) { return map(x, Log{}); }
Tensor sqrt(Tensor x) { return map(x, Sqrt{}); }
Tensor sin(Tensor x) { return map(x, Sin{}); }
Tensor cos(Tensor x) { return map(x, Cos{}); }
Tensor tanh(Tensor x) { return map(x, Tanh{}); }
Tensor sigmoid(Tensor x) { return map(x, Sigmoid{}); }
Tensor relu(Tensor x) { return map(x, Relu{}); }

// ----------------------------------------------------------------------------------------------------
// Elementwise functions of two tensors, with broadcasting: out = f(a, b).
// Both inputs are seen as max_dims-d, aligned on the right; a broadcast dim has stride 0.
// Backward: da += dout * df/da, summed over the positions where a was broadcast (same for b).
// Each backward thread owns one element of the input and loops over its broadcast copies, so no two
// threads ever add into the same gradient element (no atomics).

struct Add {
    __device__ __forceinline__ real forward(real a, real b) const { return a + b; }
    __device__ __forceinline__ real da(real, real) const { return 1; }
    __device__ __forceinline__ real db(real, real) const { return 1; }
};
struct Sub {
    __device__ __forceinline__ real forward(real a, real b) const { return a - b; }
    __device__ __forceinline__ real da(real, real) const { return 1; }
    __device__ __forceinline__ real db(real, real) const { return -1; }
};
struct Mul {
    __device__ __forceinline__ real forward(real a, real b) const { return a * b; }
    __device__ __forceinline__ real da(real, real b) const { return b; }
    __device__ __forceinline__ real db(real a, real) const { return a; }
};
struct Div {
    __device__ __forceinline__ real forward(real a, real b) const { return a / b; }
    __device__ __forceinline__ real da(real, real b) const { return 1 / b; }
    __device__ __forceinline__ real db(real a, real b) const { return -a / (b * b); }
};
struct Maximum {  // ties send the gradient to a
    __device__ __forceinline__ real forward(real a, real b) const { return a >= b ? a : b; }
    __device__ __forceinline__ real da(real a, real b) const { return a >= b ? 1 : 0; }
    __device__ __forceinline__ real db(real a, real b) const { return a >= b ? 0 : 1; }
};
struct Minimum {
    __device__ __forceinline__ real forward(real a, real b) const { return a <= b ? a : b; }
    __device__ __forceinline__ real da(real a, real b) const { return a <= b ? 1 : 0; }
    __device__ __forceinline__ real db(real a, real b) const { return a <= b ? 0 : 1; }
};

struct Broadcast {
    int out[max_dims];  // the output shape, padded on the left with 1s
    int a_dims[max_dims], b_dims[max_dims];
    long a_stride[max_dims], b_stride[max_dims];  // 0 where the input is broadcast
};

static Broadcast broadcast_shapes(const Tensor& a, const Tensor& b, Tensor* out_like) {
    Broadcast s;
    int ndim = a.ndim > b.ndim ? a.ndim : b.ndim;
    for (int d = 0; d < max_dims; d++) {
        int i = d - (max_dims - a.ndim), j = d - (max_dims - b.ndim);
        s.a_dims[d] = i >= 0 ? a.shape[i] : 1;
        s.b_dims[d] = j >= 0 ? b.shape[j] : 1;
        if (s.a_dims[d] != s.b_dims[d] && s.a_dims[d] != 1 && s.b_dims[d] != 1)
            fail("cannot broadcast shapes %s and %s", shape_string(a).c_str(),
                 shape_string(b).c_str());
        s.out[d] = s.a_dims[d] > s.b_dims[d] ? s.a_dims[d] : s.b_dims[d];
    }
    long a_stride = 1, b_stride = 1;
    for (int d = max_dims - 1; d >= 0; d--) {
        s.a_stride[d] = s.a_dims[d] == 1 ? 0 : a_stride;
        s.b_stride[d] = s.b_dims[d] == 1 ? 0 : b_stride;
        a_stride *= s.a_dims[d], b_stride *= s.b_dims[d];
    }
    out_like->ndim = ndim;
    for (int d = 0; d < ndim; d++) out_like->shape[d] = s.out[max_dims - ndim + d];
    return s;
}

template <typename F>
__global__ void broadcast_forward_kernel(floatX* out, const floatX* a, const floatX* b, long n,
                                         Broadcast s, F f) {
    for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += long(gridDim.x) * blockDim.x) {
        long rest = i, ia = 0, ib = 0;
        for (int d = max_dims - 1; d >= 0; d--) {
            long c = rest % s.out[d];
            rest /= s.out[d];
            ia += c * s.a_stride[d], ib += c * s.b_stride[d];
        }
        out[i] = f.forward(a[ia], b[ib]);
    }
}

// Gradient for one input ("mine"; the other is "theirs"): thread per element of mine, summing over
// the output positions that element was broadcast to.
template <typename F, bool FOR_A>
__global__ void broadcast_backward_kernel(floatX* dmine, const floatX* dout, const floatX* a,
                                          const floatX* b, long n_mine, Broadcast s, F f) {
    const int* mine_dims = FOR_A ? s.a_dims : s.b_dims;
    const long* their_stride = FOR_A ? s.b_stride : s.a_stride;
    long copies = 1;
    for (int d = 0; d < max_dims; d++)
        if (mine_dims[d] == 1) copies *= s.out[d];
    for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n_mine;
         i += long(gridDim.x) * blockDim.x) {
        int coord[max_dims];
        long rest = i;
        for (int d = max_dims - 1; d >= 0; d--)
            coord[d] = int(rest % mine_dims[d]), rest /= mine_dims[d];
        real total = 0;
        for (long k = 0; k < copies; k++) {
            long r = k, io = 0, it = 0, out_stride = 1;
            for (int d = max_dims - 1; d >= 0; d--) {  // fill in the broadcast coordinates from k
                int c = coord[d];
                if (mine_dims[d] == 1) c = int(r % s.out[d]), r /= s.out[d];
                io += c * out_stride, it += c * their_stride[d];
                out_stride *= s.out[d];
            }
            real av = FOR_A ? a[i] : a[it], bv = FOR_A ? b[it] : b[i];
            total += dout[io] * (FOR_A ? f.da(av, bv) : f.db(av, bv));
        }
        dmine[i] += total;
    }
}

template <typename F>
static Tensor broadcast(Tensor a, Tensor b, F f) {
    Tensor like;
    Broadcast s = broadcast_shapes(a, b, &like);
    Tensor out = new_result(like, {a, b});
    long n = out.size();
    launch(broadcast_forward_kernel<F>, grid_size(n, 256), 256, 0, out.data, a.data, b.data, n, s,
           f);
    if (out.grad)
        record({out}, {a, b}, [=] {
            if (a.grad)
                launch(broadcast_backward_kernel<F, true>, grid_size(a.size(), 256), 256, 0, a.grad,
                       out.grad, a.data, b.data, a.size(), s, f);
            if (b.grad)
                launch(broadcast_backward_kernel<F, false>, grid_size(b.size(), 256), 256, 0,
                       b.grad, out.grad, a.data, b.data, b.size(), s, f);
        });
    return out;
}

Tensor add(Tensor a, Tensor b) { return broadcast(a, b, Add{}); }
Tensor sub(Tensor a, Tensor b) { return broadcast(a, b, Sub{}); }
Tensor mul(Tensor a, Tensor b) { return broadcast(a, b, Mul{}); }
Tensor div(Tensor a, Tensor b) { return broadcast(a, b, Div{}); }
Tensor maximum(Tensor a, Tensor b) { return broadcast(a, b, Maximum{}); }
Tensor minimum(Tensor a, Tensor b) { return broadcast(a, b, Minimum{}); }

// ----------------------------------------------------------------------------------------------------
// Reductions over one axis. The input is seen as (outer, n, inner) and the axis n is reduced away:
// out[o, i] = reduce_k x[o, k, i]. One row group of threads per output element.
// sum/mean backward: dx[o, k, i] += dout[o, i] (/ n). max/min backward: the gradient goes to the
// element that won (the first one on ties), whose index the forward pass saves.

enum ReduceKind { reduce_sum, reduce_max, reduce_min };

template <ReduceKind KIND>
__global__ void reduce_forward_kernel(floatX* out, int* winner, const floatX* x, long outer, int n,
                                      long inner, real scale) {
    bool active;
    long row = group_row(outer * inner, &active);
    const floatX* base = x + (row / inner) * n * inner + row % inner;
    real best = KIND == reduce_sum ? 0 : real(base[0]);
    int best_k = 0;
    for (int k = threadIdx.x; k < n; k += blockDim.x) {
        real v = base[long(k) * inner];
        if (KIND == reduce_sum) best += v;
        else if (KIND == reduce_max ? v > best : v < best) best = v, best_k = k;
    }
    // Combine across the group. For max/min each thread also learns which k won, smallest k on
    // ties.
    for (int offset = blockDim.x / 2; offset > 0; offset /= 2) {
        real other = __shfl_xor_sync(warp_lanes(), best, offset, blockDim.x);
        int other_k = __shfl_xor_sync(warp_lanes(), best_k, offset, blockDim.x);
        if (KIND == reduce_sum) best += other;
        else if ((KIND == reduce_max ? other > best : other < best) ||
                 (other == best && other_k < best_k))
            best = other, best_k = other_k;
    }
    if (active && threadIdx.x == 0) {
        out[row] = best * scale;
        if (winner) winner[row] = best_k;
    }
}

__global__ void reduce_backward_kernel(floatX* dx, const floatX* dout, const int* winner,
                                       long outer, int n, long inner, real scale) {
    long total = outer * n * inner;
    for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
         i += long(gridDim.x) * blockDim.x) {
        long o = i / (n * inner), k = i / inner % n, j = i % inner;
        long row = o * inner + j;
        if (!winner || winner[row] == k) dx[i] += dout[row] * scale;
    }
}

template <ReduceKind KIND>
static Tensor reduce(Tensor x, int axis, bool is_mean) {
    if (axis < 0) axis += x.ndim;
    if (axis < 0 || axis >= x.ndim)
        fail("reduce: axis out of range for a tensor of shape %s", shape_string(x).c_str());
    long outer = 1, inner = 1;
    int n = x.shape[axis];
    if (n == 0) fail("reduce: cannot reduce an empty axis of shape %s", shape_string(x).c_str());
    for (int d = 0; d < axis; d++) outer *= x.shape[d];
    for (int d = axis + 1; d < x.ndim; d++) inner *= x.shape[d];
    Tensor like;
    like.ndim = x.ndim - 1;
    for (int d = 0, e = 0; d < x.ndim; d++)
        if (d != axis) like.shape[e++] = x.shape[d];
    Tensor out = new_result(like, {x});
    int* winner = KIND == reduce_sum ? nullptr : device_alloc<int>(outer * inner);
    real scale = is_mean ? real(1) / n : real(1);
    launch(reduce_forward_kernel<KIND>, row_grid(outer * inner), row_block(), 0, out.data, winner,
           x.data, outer, n, inner, scale);
    if (out.grad)
        record({out}, {x}, [=] {
            long total = outer * n * inner;
            launch(reduce_backward_kernel, grid_size(total, 256), 256, 0, x.grad, out.grad, winner,
                   outer, n, inner, scale);
        });
    return out;
}

Tensor sum(Tensor x, int axis) { return reduce<reduce_sum>(x, axis, false); }
Tensor mean(Tensor x, int axis) { return reduce<reduce_sum>(x, axis, true); }
Tensor max(Tensor x, int axis) { return reduce<reduce_max>(x, axis, false); }
Tensor min(Tensor x, int axis) { return reduce<reduce_min>(x, axis, false); }

static Tensor flat(Tensor x) { return reshape(x, {int(x.size())}); }
Tensor sum(Tensor x) { return sum(flat(x), 0); }
Tensor mean(Tensor x) { return mean(flat(x), 0); }
Tensor max(Tensor x) { return max(flat(x), 0); }
Tensor min(Tensor x) { return min(flat(x), 0); }

// ----------------------------------------------------------------------------------------------------
// Reshape and transpose

Tensor reshape(Tensor x, Shape shape) {
    if (int(shape.size()) > max_dims)
        fail("reshape: at most %d dims, got %zu", max_dims, shape.size());
    Tensor out = x;
    out.ndim = int(shape.size());
    long known = 1;
    int unknown = -1, d = 0;
    for (int s : shape) {
        if (s == -1) {
            if (unknown >= 0) fail("reshape: only one dim may be -1");
            unknown = d;
        } else {
            known *= s;
        }
        out.shape[d++] = s;
    }
    if (unknown >= 0 && known > 0) out.shape[unknown] = int(x.size() / known);
    if (out.size() != x.size())
        fail("reshape: cannot view %s (%ld elements) with %d dims of %ld elements",
             shape_string(x).c_str(), x.size(), out.ndim, out.size());
    return out;  // same data and the same gradient buffer: nothing to record
}

// A shape padded on the left with 1s to max_dims dims, passed to kernels by value.
struct Dims {
    int d[max_dims];
};

static Dims padded_dims(const Tensor& t) {
    Dims s;
    int pad = max_dims - t.ndim;
    for (int d = 0; d < max_dims; d++) s.d[d] = d < pad ? 1 : t.shape[d - pad];
    return s;
}

// out = x with dims d0 and d1 swapped (x seen as max_dims-d). With `accumulate` it adds instead,
// which is the backward: transposing the output gradient back into dx.
__global__ void transpose_kernel(floatX* out, const floatX* x, Dims x_shape, int d0, int d1, long n,
                                 bool accumulate) {
    Dims out_shape = x_shape;
    out_shape.d[d0] = x_shape.d[d1], out_shape.d[d1] = x_shape.d[d0];
    for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += long(gridDim.x) * blockDim.x) {
        int coord[max_dims];
        long rest = i;
        for (int d = max_dims - 1; d >= 0; d--)
            coord[d] = int(rest % x_shape.d[d]), rest /= x_shape.d[d];
        int swapped = coord[d0];
        coord[d0] = coord[d1], coord[d1] = swapped;
        long o = 0;
        for (int d = 0; d < max_dims; d++) o = o * out_shape.d[d] + coord[d];
        out[o] = accumulate ? out[o] + x[i] : real(x[i]);
    }
}

Tensor transpose(Tensor x, int dim0, int dim1) {
    if (dim0 < 0) dim0 += x.ndim;
    if (dim1 < 0) dim1 += x.ndim;
    if (dim0 < 0 || dim1 < 0 || dim0 >= x.ndim || dim1 >= x.ndim)
        fail("transpose: dims out of range for %s", shape_string(x).c_str());
    Tensor like = x;
    like.shape[dim0] = x.shape[dim1], like.shape[dim1] = x.shape[dim0];
    Tensor out = new_result(like, {x});
    long n = x.size();
    int d0 = dim0 + max_dims - x.ndim, d1 = dim1 + max_dims - x.ndim;
    launch(transpose_kernel, grid_size(n, 256), 256, 0, out.data, x.data, padded_dims(x), d0, d1, n,
           false);
    if (out.grad)
        record({out}, {x}, [=] {
            launch(transpose_kernel, grid_size(n, 256), 256, 0, x.grad, out.grad, padded_dims(out),
                   d0, d1, n, true);
        });
    return out;
}

// ----------------------------------------------------------------------------------------------------
// Softmax over the last axis (rows of n): y = exp(x - max) / sum(exp(x - max)) = exp(x - lse),
// lse = logsumexp(x) found in one read of the row.
// Backward: dx = y * (dy - sum(dy * y)), the sum taken over the row.

__global__ void softmax_forward_kernel(floatX* out, const floatX* x, long rows, int n) {
    bool active;
    long row = group_row(rows, &active);
    const floatX* xr = x + row * n;
    floatX* yr = out + row * n;
    real lse = group_logsumexp(row_largest_and_sum(n, [&](int i) { return xr[i]; }));
    if (active) for_each_in_row(n, [&](int i) { yr[i] = fast_exp(xr[i] - lse); });
}

__global__ void softmax_backward_kernel(floatX* dx, const floatX* dout, const floatX* out,
                                        long rows, int n) {
    bool active;
    long row = group_row(rows, &active);
    const floatX *yr = out + row * n, *dyr = dout + row * n;
    floatX* dxr = dx + row * n;
    real dot = group_sum(row_sum(n, [&](int i) { return dyr[i] * yr[i]; }));
    if (active) for_each_in_row(n, [&](int i) { dxr[i] += yr[i] * (dyr[i] - dot); });
}

Tensor softmax(Tensor x) {
    int n = x.ndim ? x.dim(-1) : 1;
    long rows = x.size() / n;
    Tensor out = new_result(x, {x});
    launch(softmax_forward_kernel, row_grid(rows), row_block(), 0, out.data, x.data, rows, n);
    if (out.grad)
        record({out}, {x}, [=] {
            launch(softmax_backward_kernel, row_grid(rows), row_block(), 0, x.grad, out.grad,
                   out.data, rows, n);
        });
    return out;
}

// ====================================================================================================
// 6. Matrix products
//
// The GPU build calls cuBLAS. The CPU build calls oneDNN's matmul primitive (the library PyTorch
// uses on CPUs), which picks its kernels for the machine at run time: AMX or AVX512-BF16 for
// bfloat16 where the CPU has them. A primitive is made once per layout and kept, so a training step
// after the first makes none. The double build (the gradient checks) uses OpenBLAS: oneDNN has no
// double products.

bool use_tf32 = false;

#ifdef __CUDACC__
// Every row of out (rows, columns) becomes a copy of `row` (a row kernel).
__global__ void broadcast_rows_kernel(floatX* out, const floatX* row, long rows, int columns) {
    bool active;
    long r = group_row(rows, &active);
    if (!active) return;
    floatX* o = out + r * columns;
    for_each_in_row(columns, [&](int c) { o[c] = row[c]; });
}

#ifdef TRICYCLE_BF16
// cuBLASLt, for the epilogues (see gemm_epilogue in tricycle.h). In cuBLAS's column-major view
// (see cublas_gemm) D^T (N, M) = op(B)^T op(A)^T: the bias runs along D^T's N rows, the bias
// gradient is a reduction over K of cuBLAS's second operand (our A), one value per column (our M).
static cublasLtHandle_t cublaslt_handle() {
    static cublasLtHandle_t handle = nullptr;
    if (!handle) cublas_check(cublasLtCreate(&handle));
    return handle;
}

template <typename T>
static void set_attribute(cublasLtMatmulDesc_t description, cublasLtMatmulDescAttributes_t name,
                          const T& value) {
    cublas_check(cublasLtMatmulDescSetAttribute(description, name, &value, sizeof value));
}

static cublasLtMatrixLayout_t cublaslt_layout(int rows, int columns, long ld) {
    cublasLtMatrixLayout_t layout;
    cublas_check(cublasLtMatrixLayoutCreate(&layout, CUDA_R_16BF, rows, columns, ld));
    return layout;
}

// The alignment of a pointer in bytes, up to 256: cuBLASLt's algorithms may need aligned operands,
// so a plan is chosen for each alignment it meets.
static long alignment(const void* pointer) {
    uintptr_t address = uintptr_t(pointer) | 256;
    return long(address & (~address + 1));
}

// One product layout's cuBLASLt plan: the descriptor, the operands' layouts and the algorithm the
// heuristic chose (none: `found` false), made on the layout's first use and kept, as the CPU build
// keeps its oneDNN primitives. A call sets only the epilogue's pointers. Plans live as long as the
// process (one per layout: a training run makes a few dozen).
struct CublasLtPlan {
    cublasLtMatmulDesc_t description;
    cublasLtMatrixLayout_t a, b, c;
    cublasLtMatmulAlgo_t algorithm;
    bool found;
};

static const size_t cublaslt_workspace_bytes = 32 << 20;

// The plans made so far by epilogue and by whether cuBLASLt had an algorithm
// (gemm_epilogue_report).
static int epilogue_plans[4][2];

// The epilogue's pointers, set on the descriptor before each product (and before the heuristic).
static void set_epilogue_pointers(cublasLtMatmulDesc_t description, Epilogue epilogue,
                                  const void* bias, floatX* aux) {
    set_attribute(description, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias);
    if (epilogue == Epilogue::gelu_bias || epilogue == Epilogue::gelu_grad_bias_grad)
        set_attribute(description, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, (void*)aux);
}

static CublasLtPlan make_cublaslt_plan(Epilogue epilogue, const GemmShape& s, const GemmInput& A,
                                       const GemmInput& B, const GemmOutput& C, const void* bias,
                                       floatX* aux) {
    CublasLtPlan plan;
    cublas_check(cublasLtMatmulDescCreate(&plan.description, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t op_a = A.transpose ? CUBLAS_OP_T : CUBLAS_OP_N,
                      op_b = B.transpose ? CUBLAS_OP_T : CUBLAS_OP_N;
    set_attribute(plan.description, CUBLASLT_MATMUL_DESC_TRANSA, op_b);  // cuBLAS's first: B
    set_attribute(plan.description, CUBLASLT_MATMUL_DESC_TRANSB, op_a);
    cublasLtEpilogue_t kind = epilogue == Epilogue::bias        ? CUBLASLT_EPILOGUE_BIAS
                              : epilogue == Epilogue::gelu_bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS
                              : epilogue == Epilogue::bias_grad ? CUBLASLT_EPILOGUE_BGRADB
                                                                : CUBLASLT_EPILOGUE_DGELU_BGRAD;
    set_attribute(plan.description, CUBLASLT_MATMUL_DESC_EPILOGUE, kind);
    if (epilogue == Epilogue::gelu_bias || epilogue == Epilogue::gelu_grad_bias_grad)
        set_attribute(plan.description, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, int64_t(s.N));
    set_epilogue_pointers(plan.description, epilogue, bias, aux);
    plan.b = B.transpose ? cublaslt_layout(s.K, s.N, B.ld) : cublaslt_layout(s.N, s.K, B.ld);
    plan.a = A.transpose ? cublaslt_layout(s.M, s.K, A.ld) : cublaslt_layout(s.K, s.M, A.ld);
    plan.c = cublaslt_layout(s.N, s.M, C.ld);
    cublasLtMatmulPreference_t preference;
    cublas_check(cublasLtMatmulPreferenceCreate(&preference));
    cublas_check(cublasLtMatmulPreferenceSetAttribute(
        preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &cublaslt_workspace_bytes,
        sizeof cublaslt_workspace_bytes));
    // The heuristic assumes 256-byte aligned operands unless told; parameters are packed, so a
    // weight may be aligned to as little as its row's bytes.
    const void* operands[4] = {B.data, A.data, C.data, C.data};  // cuBLAS's A, B, C, D
    cublasLtMatmulPreferenceAttributes_t alignments[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 4; i++) {
        uint32_t bytes = uint32_t(alignment(operands[i]));
        cublas_check(
            cublasLtMatmulPreferenceSetAttribute(preference, alignments[i], &bytes, sizeof bytes));
    }
    cublasLtMatmulHeuristicResult_t result;
    int count = 0;
    // No algorithm for this layout is either a count of 0 or CUBLAS_STATUS_NOT_SUPPORTED; both
    // leave the product to the plain path.
    cublasStatus_t status =
        cublasLtMatmulAlgoGetHeuristic(cublaslt_handle(), plan.description, plan.b, plan.a, plan.c,
                                       plan.c, preference, 1, &result, &count);
    if (status == CUBLAS_STATUS_NOT_SUPPORTED) count = 0;
    else cublas_check(status);
    cublas_check(cublasLtMatmulPreferenceDestroy(preference));
    plan.found = count > 0;
    if (plan.found) plan.algorithm = result.algo;
    epilogue_plans[int(epilogue)][plan.found]++;
    return plan;
}

static bool cublaslt_epilogue(Epilogue epilogue, GemmShape s, GemmInput A, GemmInput B, real beta,
                              GemmOutput C, floatX* aux, floatX* bias_grad) {
    if (s.outer * s.inner != 1) return false;
    static void* workspace = nullptr;
    if (!workspace) cuda_check(cudaMalloc(&workspace, cublaslt_workspace_bytes));
    if (epilogue == Epilogue::gelu_grad_bias_grad && beta != 0) return false;  // gelu' of A B only
    bool gradient = epilogue == Epilogue::bias_grad || epilogue == Epilogue::gelu_grad_bias_grad;
    const void* bias = gradient ? bias_grad : C.bias;
    // The epilogue reads and writes the bias vector (and GELU's input) in 16-byte pieces.
    if (alignment(bias) < 16 || (aux && alignment(aux) < 16)) return false;
    static std::map<std::vector<long>, CublasLtPlan> plans;
    std::vector<long> key = {long(epilogue), s.M,  s.N,         s.K, A.ld,
                             A.transpose,    B.ld, B.transpose, C.ld};
    for (const void* pointer :
         {(const void*)A.data, (const void*)B.data, (const void*)C.data, bias, (const void*)aux})
        key.push_back(alignment(pointer));
    auto known = plans.find(key);
    if (known == plans.end())
        known = plans.emplace(key, make_cublaslt_plan(epilogue, s, A, B, C, bias, aux)).first;
    CublasLtPlan& plan = known->second;
    if (!plan.found) return false;
    set_epilogue_pointers(plan.description, epilogue, bias, aux);
    float alpha = 1, beta_value = float(beta);
    cublas_check(cublasLtMatmul(cublaslt_handle(), plan.description, &alpha, B.data, plan.b, A.data,
                                plan.a, &beta_value, C.data, plan.c, C.data, plan.c,
                                &plan.algorithm, workspace, cublaslt_workspace_bytes, 0));
    return true;
}

#else
static bool cublaslt_epilogue(Epilogue, GemmShape, GemmInput, GemmInput, real, GemmOutput, floatX*,
                              floatX*) {
    return false;
}
#endif

bool gemm_epilogue(Epilogue epilogue, GemmShape s, GemmInput A, GemmInput B, real beta,
                   GemmOutput C, floatX* aux, floatX* bias_grad) {
    bool ran = cublaslt_epilogue(epilogue, s, A, B, beta, C, aux, bias_grad);
    if (ran && gemm_record) gemm_record->push_back(GemmCall{s, 1, A, B, beta, C});
    return ran;
}

// cuBLAS is column-major: it computes C^T = op(B)^T op(A)^T, which is C in row-major. A bias is
// added by the product's epilogue (bfloat16 build), else copied into every row of C first and the
// product added to it.
static void cublas_gemm(const GemmShape& s, real alpha, GemmInput A, GemmInput B, real beta,
                        GemmOutput C) {
    if (C.bias && alpha == 1 && cublaslt_epilogue(Epilogue::bias, s, A, B, 0, C, nullptr, nullptr))
        return;
    if (C.bias) {
        launch(broadcast_rows_kernel, row_grid(s.M), row_block(), 0, C.data, C.bias, long(s.M),
               s.N);
        beta = 1;
    }
    cublasOperation_t op_a = A.transpose ? CUBLAS_OP_T : CUBLAS_OP_N,
                      op_b = B.transpose ? CUBLAS_OP_T : CUBLAS_OP_N;
    for (int o = 0; o < s.outer; o++) {
        const floatX *a = A.data + o * A.outer, *b = B.data + o * B.outer;
        floatX* c = C.data + o * C.outer;
#if defined(TRICYCLE_DOUBLE)
        cublas_check(cublasDgemmStridedBatched(cublas_handle(), op_b, op_a, s.N, s.M, s.K, &alpha,
                                               b, int(B.ld), B.inner, a, int(A.ld), A.inner, &beta,
                                               c, int(C.ld), C.inner, s.inner));
#else
        bool is_float = std::is_same<floatX, float>::value;
        cudaDataType type = is_float ? CUDA_R_32F : CUDA_R_16BF;  // bfloat16: float accumulation
        cublasComputeType_t compute =
            is_float && use_tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
        cublas_check(cublasGemmStridedBatchedEx(cublas_handle(), op_b, op_a, s.N, s.M, s.K, &alpha,
                                                b, type, int(B.ld), B.inner, a, type, int(A.ld),
                                                A.inner, &beta, c, type, int(C.ld), C.inner,
                                                s.inner, compute, CUBLAS_GEMM_DEFAULT));
#endif
    }
}
#else
static long cpu_matmuls_made = 0;

// One operand in memory of any element type: as GemmInput, without the type.
struct CpuMatrix {
    const void* data;
    long ld;
    bool transpose;
    long outer, inner;
};
template <typename T>
static CpuMatrix cpu_matrix(const T* data, long ld, bool transpose, long outer, long inner) {
    return CpuMatrix{data, ld, transpose, outer, inner};
}

#ifndef TRICYCLE_DOUBLE
// An operand of oneDNN's matmul as a 4-D (outer, inner, rows, cols) view, rows x cols after the
// transpose. A batch dimension of size 1 gets a dense stride (oneDNN checks every stride).
static dnnl::memory::desc onednn_view(dnnl::memory::data_type type, const GemmShape& s, int rows,
                                      int cols, const CpuMatrix& m) {
    long matrix = m.transpose ? m.ld * cols : m.ld * rows;
    dnnl::memory::dims strides = {s.outer > 1 ? m.outer : s.inner * matrix,
                                  s.inner > 1 ? m.inner : matrix, m.transpose ? 1 : m.ld,
                                  m.transpose ? m.ld : 1};
    return dnnl::memory::desc({s.outer, s.inner, rows, cols}, type, strides);
}

struct CpuMatmul {
    dnnl::matmul primitive;
    dnnl::memory a, b, c, bias;
};

static dnnl::engine& cpu_engine() {
    static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
    return engine;
}

// The primitive for a product's layout, made on its first use and kept (at most 4096: generation
// makes one per length).
static CpuMatmul& onednn_matmul(dnnl::memory::data_type type, const GemmShape& s, real alpha,
                                const CpuMatrix& A, const CpuMatrix& B, real beta,
                                const CpuMatrix& C, bool bias) {
    dnnl::engine& engine = cpu_engine();
    static std::map<std::vector<long>, CpuMatmul> made;
    std::vector<long> key = {long(type),
                             s.M,
                             s.N,
                             s.K,
                             s.outer,
                             s.inner,
                             long(float_bits(alpha)),
                             long(float_bits(beta)),
                             bias};
    for (const CpuMatrix* m : {&A, &B, &C})
        key.insert(key.end(), {m->ld, m->transpose, m->outer, m->inner});
    auto found = made.find(key);
    if (found != made.end()) return found->second;
    if (made.size() >= 4096) made.clear();
    dnnl::memory::desc a = onednn_view(type, s, s.M, s.K, A), b = onednn_view(type, s, s.K, s.N, B);
    dnnl::memory::desc c = onednn_view(type, s, s.M, s.N, C);
    dnnl::memory::desc row =
        bias ? dnnl::memory::desc({1, 1, 1, s.N}, type, dnnl::memory::format_tag::abcd)
             : dnnl::memory::desc();
    dnnl::primitive_attr attributes;
    if (alpha != 1) attributes.set_output_scales(0, {float(alpha)});
    if (beta != 0) {
        dnnl::post_ops accumulate;
        accumulate.append_sum(float(beta));
        attributes.set_post_ops(accumulate);
    }
    dnnl::matmul::primitive_desc description(
        bias ? dnnl::matmul::desc(a, b, row, c) : dnnl::matmul::desc(a, b, c), attributes, engine);
    cpu_matmuls_made++;
    CpuMatmul product{dnnl::matmul(description), dnnl::memory(a, engine, DNNL_MEMORY_NONE),
                      dnnl::memory(b, engine, DNNL_MEMORY_NONE),
                      dnnl::memory(c, engine, DNNL_MEMORY_NONE),
                      dnnl::memory(row, engine, DNNL_MEMORY_NONE)};
    return made.emplace(key, product).first->second;
}

static void onednn_gemm(dnnl::memory::data_type type, const GemmShape& s, real alpha,
                        const CpuMatrix& A, const CpuMatrix& B, real beta, const CpuMatrix& C,
                        const void* bias) {
    static dnnl::stream stream(cpu_engine());
    CpuMatmul& product = onednn_matmul(type, s, alpha, A, B, beta, C, bias != nullptr);
    product.a.set_data_handle(const_cast<void*>(A.data));
    product.b.set_data_handle(const_cast<void*>(B.data));
    product.c.set_data_handle(const_cast<void*>(C.data));
    std::unordered_map<int, dnnl::memory> arguments = {
        {DNNL_ARG_SRC, product.a}, {DNNL_ARG_WEIGHTS, product.b}, {DNNL_ARG_DST, product.c}};
    if (bias) {
        product.bias.set_data_handle(const_cast<void*>(bias));
        arguments[DNNL_ARG_BIAS] = product.bias;
    }
    product.primitive.execute(stream, arguments);
    stream.wait();
}
#endif

// OpenBLAS, single-threaded, with the work split over the cores here: by matrix in a batch, by rows
// of C otherwise. (OpenBLAS's own threads would compete with OpenMP's.)
template <typename T>
static void openblas_gemm(const GemmShape& s, real alpha, const T* A, const CpuMatrix& a,
                          const T* B, const CpuMatrix& b, real beta, T* C, const CpuMatrix& c,
                          const T* bias) {
    static bool single_threaded = (openblas_set_num_threads(1), true);
    (void)single_threaded;
    if (bias) {  // the bias into every row, the product added to it (a bias comes with one matrix)
        for (int r = 0; r < s.M; r++) memcpy(C + r * c.ld, bias, s.N * sizeof(T));
        beta = 1;
    }
    CBLAS_TRANSPOSE ta = a.transpose ? CblasTrans : CblasNoTrans,
                    tb = b.transpose ? CblasTrans : CblasNoTrans;
    int count = s.outer * s.inner, parts = count > 1 ? count : omp_get_max_threads();
#pragma omp parallel for schedule(static)
    for (int part = 0; part < parts; part++) {
        long o = count > 1 ? part / s.inner : 0, j = count > 1 ? part % s.inner : 0;
        int m0 = count > 1 ? 0 : int(long(s.M) * part / parts),
            m1 = count > 1 ? s.M : int(long(s.M) * (part + 1) / parts);
        const T* first_a = A + o * a.outer + j * a.inner + (a.transpose ? m0 : long(m0) * a.ld);
        const T* first_b = B + o * b.outer + j * b.inner;
        T* out = C + o * c.outer + j * c.inner + long(m0) * c.ld;
        if (m1 <= m0) continue;
        if constexpr (std::is_same<T, float>::value)
            cblas_sgemm(CblasRowMajor, ta, tb, m1 - m0, s.N, s.K, float(alpha), first_a, int(a.ld),
                        first_b, int(b.ld), float(beta), out, int(c.ld));
        else
            cblas_dgemm(CblasRowMajor, ta, tb, m1 - m0, s.N, s.K, alpha, first_a, int(a.ld),
                        first_b, int(b.ld), beta, out, int(c.ld));
    }
}

// Float products: oneDNN, except single weight-gradient products (A transposed, dW = dout^T x),
// which OpenBLAS with the rows split over the cores runs faster on the machines measured (e.g.
// 512x128x768: 0.81 ms against oneDNN's 1.14 ms on two AVX2 cores). The choice is by layout alone,
// so runs are deterministic.
#ifndef TRICYCLE_DOUBLE
static void float_gemm(const GemmShape& s, real alpha, const float* A, const CpuMatrix& a,
                       const float* B, const CpuMatrix& b, real beta, float* C, const CpuMatrix& c,
                       const float* bias) {
    if (s.outer * s.inner == 1 && a.transpose && !b.transpose && !bias)
        openblas_gemm(s, alpha, A, a, B, b, beta, C, c, bias);
    else onednn_gemm(dnnl::memory::data_type::f32, s, alpha, a, b, beta, c, bias);
}
#endif

#ifdef TRICYCLE_BF16
// Whether this CPU multiplies bfloat16 matrices natively (oneDNN refuses the primitive otherwise).
static bool cpu_has_bfloat16_products() {
    static int known = -1;
    if (known < 0) {
        try {
            dnnl::engine engine(dnnl::engine::kind::cpu, 0);
            dnnl::memory::desc m({16, 16}, dnnl::memory::data_type::bf16,
                                 dnnl::memory::format_tag::ab);
            dnnl::matmul::primitive_desc(dnnl::matmul::desc(m, m, m), engine);
            known = 1;
        } catch (const dnnl::error&) {
            known = 0;
        }
    }
    return known == 1;
}

// Without it, the bfloat16 operands are widened to dense float copies, multiplied, and rounded
// back.
static std::vector<float> widen(const GemmShape& s, const bf16* x, int rows, int cols,
                                const CpuMatrix& m) {
    int stored_rows = m.transpose ? cols : rows, stored_cols = m.transpose ? rows : cols;
    std::vector<float> wide(size_t(s.outer) * s.inner * stored_rows * stored_cols);
    float* w = wide.data();
    for (int o = 0; o < s.outer; o++)
        for (int j = 0; j < s.inner; j++)
            for (int r = 0; r < stored_rows; r++)
                for (int c = 0; c < stored_cols; c++)
                    *w++ = x[o * m.outer + j * m.inner + r * m.ld + c];
    return wide;
}

static void widened_gemm(const GemmShape& s, real alpha, GemmInput A, GemmInput B, real beta,
                         GemmOutput C) {
    CpuMatrix ma = cpu_matrix(A.data, A.ld, A.transpose, A.outer, A.inner),
              mb = cpu_matrix(B.data, B.ld, B.transpose, B.outer, B.inner),
              mc = cpu_matrix(C.data, C.ld, false, C.outer, C.inner);
    std::vector<float> a = widen(s, A.data, s.M, s.K, ma), b = widen(s, B.data, s.K, s.N, mb);
    std::vector<float> c = beta != 0 ? widen(s, C.data, s.M, s.N, mc)
                                     : std::vector<float>(size_t(s.outer) * s.inner * s.M * s.N);
    std::vector<float> bias =
        C.bias ? std::vector<float>(C.bias, C.bias + s.N) : std::vector<float>();
    long a_size = long(s.M) * s.K, b_size = long(s.K) * s.N, c_size = long(s.M) * s.N;
    float_gemm(s, alpha, a.data(),
               cpu_matrix(a.data(), A.transpose ? s.M : s.K, A.transpose, s.inner * a_size, a_size),
               b.data(),
               cpu_matrix(b.data(), B.transpose ? s.K : s.N, B.transpose, s.inner * b_size, b_size),
               beta, c.data(), cpu_matrix(c.data(), s.N, false, s.inner * c_size, c_size),
               C.bias ? bias.data() : nullptr);
    const float* wide = c.data();
    for (int o = 0; o < s.outer; o++)
        for (int j = 0; j < s.inner; j++)
            for (int r = 0; r < s.M; r++)
                for (int col = 0; col < s.N; col++)
                    C.data[o * C.outer + j * C.inner + r * C.ld + col] = *wide++;
}
#endif

static void cpu_gemm(const GemmShape& s, real alpha, GemmInput A, GemmInput B, real beta,
                     GemmOutput C) {
    CpuMatrix a = cpu_matrix(A.data, A.ld, A.transpose, A.outer, A.inner),
              b = cpu_matrix(B.data, B.ld, B.transpose, B.outer, B.inner),
              c = cpu_matrix(C.data, C.ld, false, C.outer, C.inner);
#if defined(TRICYCLE_DOUBLE)
    openblas_gemm(s, alpha, A.data, a, B.data, b, beta, C.data, c, C.bias);
#elif defined(TRICYCLE_BF16)
    if (cpu_has_bfloat16_products())
        onednn_gemm(dnnl::memory::data_type::bf16, s, alpha, a, b, beta, c, C.bias);
    else widened_gemm(s, alpha, A, B, beta, C);
#else
    float_gemm(s, alpha, A.data, a, B.data, b, beta, C.data, c, C.bias);
#endif
}
#endif

std::string gemm_engine() {
#if defined(__CUDACC__)
    return sizeof(floatX) == 2 ? "cuBLAS, bfloat16 with float accumulation"
           : use_tf32          ? "cuBLAS, TF32 tensor cores with float accumulation"
                               : "cuBLAS, float";
#elif defined(TRICYCLE_DOUBLE)
    return "OpenBLAS, double";
#elif defined(TRICYCLE_BF16)
    return cpu_has_bfloat16_products() ? "oneDNN, bfloat16 with float accumulation"
                                       : "oneDNN, float (bfloat16 operands widened: this CPU has "
                                         "no bfloat16 matrix instructions)";
#else
    return "oneDNN, float";
#endif
}

#if defined(__CUDACC__) && defined(TRICYCLE_BF16)
std::string gemm_epilogue_report() {
    const char* names[] = {"bias", "gelu_bias", "bias_grad", "gelu_grad_bias_grad"};
    std::string report;
    for (int kind = 0; kind < 4; kind++)
        report += std::string(kind ? "; " : "") + names[kind] + " " +
                  std::to_string(epilogue_plans[kind][1]) + " fused, " +
                  std::to_string(epilogue_plans[kind][0]) + " fell back";
    return report + " (product layouts)";
}
#else
std::string gemm_epilogue_report() { return "none in this build (their passes run as kernels)"; }
#endif

#ifndef __CUDACC__
bool gemm_epilogue(Epilogue, GemmShape, GemmInput, GemmInput, real, GemmOutput, floatX*, floatX*) {
    return false;  // oneDNN's bias is applied by gemm itself; the other passes stay kernels here
}
#endif

long gemm_layouts_made() {
#ifdef __CUDACC__
    return 0;
#else
    return cpu_matmuls_made;
#endif
}

std::vector<GemmCall>* gemm_record = nullptr;

void gemm(GemmShape shape, real alpha, GemmInput A, GemmInput B, real beta, GemmOutput C) {
    if (profiling) {
        char name[96];
        int count = shape.outer * shape.inner;
        snprintf(name, sizeof name, "gemm %s%s %dx%dx%d%s", A.transpose ? "T" : "N",
                 B.transpose ? "T" : "N", shape.M, shape.N, shape.K,
                 count > 1 ? (" x" + std::to_string(count)).c_str() : "");
        ProfileRegion region(name);
        profiling = false;
        gemm(shape, alpha, A, B, beta, C);
        profiling = true;
        return;
    }
#ifdef __CUDACC__
    cublas_gemm(shape, alpha, A, B, beta, C);
#else
    cpu_gemm(shape, alpha, A, B, beta, C);
#endif
    if (gemm_record) gemm_record->push_back(GemmCall{shape, alpha, A, B, beta, C});
}

// out = a @ b. a is (..., M, K); b is (K, N), shared by every matrix of a, or (..., K, N) with the
// same batch dims as a. Backward: da += dout @ b^T, db += a^T @ dout (summed over the batch when b
// is shared: then the batch simply joins M, one big product).
Tensor matmul(Tensor a, Tensor b) {
    if (a.ndim < 2 || b.ndim < 2)
        fail("matmul: both operands need at least 2 dims, got %s and %s", shape_string(a).c_str(),
             shape_string(b).c_str());
    int M = a.dim(-2), K = a.dim(-1), N = b.dim(-1);
    bool shared_b = b.ndim == 2;
    bool same_batch = b.ndim == a.ndim;
    for (int d = 0; same_batch && d < a.ndim - 2; d++) same_batch = a.shape[d] == b.shape[d];
    if (b.dim(-2) != K || (!shared_b && !same_batch))
        fail("matmul: shapes %s and %s do not match", shape_string(a).c_str(),
             shape_string(b).c_str());
    int batch = int(a.size() / (long(M) * K));
    Tensor like = a;
    like.shape[a.ndim - 1] = N;
    Tensor out = new_result(like, {a, b});
    long a_size = long(M) * K, b_size = shared_b ? 0 : long(K) * N, c_size = long(M) * N;
    if (shared_b)
        gemm({.M = batch * M, .N = N, .K = K}, 1, {.data = a.data, .ld = K},
             {.data = b.data, .ld = N}, 0, {.data = out.data, .ld = N});
    else
        gemm({.M = M, .N = N, .K = K, .inner = batch}, 1,
             {.data = a.data, .ld = K, .inner = a_size}, {.data = b.data, .ld = N, .inner = b_size},
             0, {.data = out.data, .ld = N, .inner = c_size});
    if (out.grad)
        record({out}, {a, b}, [=] {
            if (shared_b) {
                if (a.grad)
                    gemm({.M = batch * M, .N = K, .K = N}, 1, {.data = out.grad, .ld = N},
                         {.data = b.data, .ld = N, .transpose = true}, 1,
                         {.data = a.grad, .ld = K});
                if (b.grad)
                    gemm({.M = K, .N = N, .K = batch * M}, 1,
                         {.data = a.data, .ld = K, .transpose = true}, {.data = out.grad, .ld = N},
                         1, {.data = b.grad, .ld = N});
                return;
            }
            if (a.grad)  // da (M, K) = dout (M, N) @ b^T, per matrix
                gemm({.M = M, .N = K, .K = N, .inner = batch}, 1,
                     {.data = out.grad, .ld = N, .inner = c_size},
                     {.data = b.data, .ld = N, .transpose = true, .inner = b_size}, 1,
                     {.data = a.grad, .ld = K, .inner = a_size});
            if (b.grad)  // db (K, N) = a^T @ dout
                gemm({.M = K, .N = N, .K = M, .inner = batch}, 1,
                     {.data = a.data, .ld = K, .transpose = true, .inner = a_size},
                     {.data = out.grad, .ld = N, .inner = c_size}, 1,
                     {.data = b.grad, .ld = N, .inner = b_size});
        });
    return out;
}

// ====================================================================================================
// 7. Layers
// Layers. Each layer is a pair of functions on raw device pointers, <layer>_forward and
// <layer>_backward, that launch its kernels, plus a tape version on Tensors that runs the forward
// and records the backward. Backward functions add into gradients (+=) and skip null gradient
// pointers.

// ----------------------------------------------------------------------------------------------------
// Column sums, the backward of a bias broadcast over rows: dbias[c] += sum_r dout[r, c]. Two
// stages, each adding in a fixed order (deterministic, no atomics): blocks of (column tile, slab of
// rows) write partial sums, then one pass adds the slabs up. Each thread owns whole columns, so
// neighbouring threads read neighbouring addresses. The norms' backward (below) writes slabs of
// partial sums the same way and shares the second stage.

constexpr int column_slab_rows = 32;
static int column_slabs(long rows) { return int((rows + column_slab_rows - 1) / column_slab_rows); }

__global__ void column_partial_sums_kernel(real* partial, const floatX* dout, long rows, int C) {
    long r0 = long(blockIdx.x) * column_slab_rows,
         r1 = r0 + column_slab_rows < rows ? r0 + column_slab_rows : rows;
    long tile = (C + gridDim.y - 1) / gridDim.y, c0 = blockIdx.y * tile,
         c1 = c0 + tile < C ? c0 + tile : C;
    real* sums = partial + long(blockIdx.x) * C;
    if (blockDim.x ==
        1) {  // a lone thread adds row after row into the sums: unit stride, vectorised
        for (long c = c0; c < c1; c++) sums[c] = 0;
        for (long r = r0; r < r1; r++)
            for (long c = c0; c < c1; c++) sums[c] += dout[r * C + c];
        return;
    }
    for_each_strided(c0, c1, threadIdx.x, blockDim.x, [&](long c) {  // a column in a register
        real sum = 0;
        for (long r = r0; r < r1; r++) sum += dout[r * C + c];
        sums[c] = sum;
    });
}

// dfirst[c] += the sum over slabs s of partial[s * width + c], and, when there is a dsecond,
// dsecond[c] += that of partial[s * width + C + c] (the slabs then hold 2 C sums each). A null
// dfirst is skipped.
__global__ void add_partial_sums_kernel(floatX* dfirst, floatX* dsecond, const real* partial,
                                        int slabs, long width, int C) {
    for_each_element(dsecond ? 2 * C : C, [&](long c) {
        real total = 0;
        for (int s = 0; s < slabs; s++) total += partial[s * width + c];
        floatX* column = c < C ? dfirst : dsecond;
        if (column) column[c < C ? c : c - C] += total;
    });
}

static void add_partial_sums(floatX* dfirst, floatX* dsecond, const real* partial, int slabs,
                             long width, int C) {
    launch(add_partial_sums_kernel, element_blocks(dsecond ? 2L * C : C), element_threads, 0,
           dfirst, dsecond, partial, slabs, width, C);
}

// dbias[c] += sum_r dout[r, c], dout (rows, C).
static void column_sums(floatX* dbias, const floatX* dout, long rows, int C) {
    int slabs = column_slabs(rows);
    unsigned column_tiles = element_threads > 1 ? (C + element_threads - 1) / element_threads : 1;
    real* partial = device_alloc<real>(long(slabs) * C);
    launch(column_partial_sums_kernel, dim3(slabs, column_tiles), element_threads, 0, partial, dout,
           rows, C);
    add_partial_sums(dbias, nullptr, partial, slabs, C, C);
}

// ----------------------------------------------------------------------------------------------------
// Embedding: tokens (B,T) -> out (B,T,C),  out[b,t,:] = wte[tokens[b,t], :] + wpe[t, :]
// (no wpe in rotary models). Backward: dwte[v, :] += the sum of dout[b,t,:] over the positions
// holding token v, dwpe[t, :] += the sum of dout[b,t,:] over b.
// Deterministic and parallel without atomics: the positions are grouped by token first (a sort of
// the B*T token ids on the host, done during the forward pass), then a block per (group, channel
// tile) adds its group's rows in position order, in a float register, and adds the total to dwte
// once.

// A row kernel: one row per position.
__global__ void embedding_forward_kernel(floatX* out, const int* tokens, const floatX* wte,
                                         const floatX* wpe, int B, int T, int C) {
    bool active;
    long position = group_row(long(B) * T, &active);
    if (!active) return;
    const floatX* token_row = wte + long(tokens[position]) * C;
    const floatX* position_row = wpe ? wpe + (position % T) * C : nullptr;
    floatX* o = out + position * C;
    for_each_in_row(
        C, [&](int c) { o[c] = token_row[c] + (position_row ? real(position_row[c]) : 0); });
}

// Group g: token group_token[g], positions[group_start[g] .. group_start[g + 1]).
__global__ void embedding_token_backward_kernel(floatX* dwte, const floatX* dout,
                                                const int* group_token, const int* group_start,
                                                const int* positions, int C) {
    int g = blockIdx.x, first = group_start[g], end = group_start[g + 1];
    long tile = (C + gridDim.y - 1) / gridDim.y, c0 = blockIdx.y * tile,
         c1 = c0 + tile < C ? c0 + tile : C;
    floatX* row = dwte + long(group_token[g]) * C;
    for_each_strided(c0, c1, threadIdx.x, blockDim.x, [&](long c) {
        real total = 0;
        for (int i = first; i < end; i++) total += dout[long(positions[i]) * C + c];
        row[c] += total;
    });
}

// dwpe (T, C): element (t, c) sums the B sequences.
__global__ void embedding_position_backward_kernel(floatX* dwpe, const floatX* dout, int B, int T,
                                                   int C) {
    long n = long(T) * C;
    for_each_element(n, [&](long i) {
        real total = 0;
        for (int b = 0; b < B; b++) total += dout[b * n + i];
        dwpe[i] += total;
    });
}

void embedding_forward(floatX* out, const int* tokens, const floatX* wte, const floatX* wpe, int B,
                       int T, int C) {
    launch(embedding_forward_kernel, row_grid(long(B) * T), row_block(), 0, out, tokens, wte, wpe,
           B, T, C);
}

TokenGroups token_groups_at(int* buffer, long n) {
    return {buffer, buffer + n, buffer + 2 * n + 1, 0};
}

int sort_by_token(const int* host_tokens, long n, int* token, int* start, int* positions) {
    for (long i = 0; i < n; i++) positions[i] = int(i);
    std::stable_sort(positions, positions + n,
                     [&](int a, int b) { return host_tokens[a] < host_tokens[b]; });
    int count = 0;
    for (long i = 0; i < n; i++)
        if (i == 0 || host_tokens[positions[i]] != host_tokens[positions[i - 1]])
            token[count] = host_tokens[positions[i]], start[count++] = int(i);
    start[count] = int(n);
    return count;
}

void group_tokens(TokenGroups* groups, const int* tokens, long n) {
    std::vector<int> host(n), sorted(3 * n + 1);
    cuda_check(cudaMemcpy(host.data(), tokens, n * sizeof(int), cudaMemcpyDeviceToHost));
    groups->count =
        sort_by_token(host.data(), n, sorted.data(), sorted.data() + n, sorted.data() + 2 * n + 1);
    cuda_check(cudaMemcpy(groups->token, sorted.data(), sorted.size() * sizeof(int),
                          cudaMemcpyHostToDevice));
}

void embedding_backward(floatX* dwte, floatX* dwpe, const floatX* dout, const TokenGroups& groups,
                        int B, int T, int C) {
    if (dwte) {
        unsigned channel_tiles =
            element_threads > 1 ? (C + element_threads - 1) / element_threads : 1;
        launch(embedding_token_backward_kernel, dim3(groups.count, channel_tiles), element_threads,
               0, dwte, dout, groups.token, groups.start, groups.positions, C);
    }
    if (dwpe)
        launch(embedding_position_backward_kernel, element_blocks(long(T) * C), element_threads, 0,
               dwpe, dout, B, T, C);
}

Tensor embedding(const int* tokens, int B, int T, Tensor wte, Tensor wpe) {
    int C = wte.dim(-1);
    Tensor like;
    like.ndim = 3, like.shape[0] = B, like.shape[1] = T, like.shape[2] = C;
    Tensor out = new_result(like, {wte, wpe});
    embedding_forward(out.data, tokens, wte.data, wpe.data, B, T, C);
    if (out.grad) {
        long n = long(B) * T;
        TokenGroups groups = token_groups_at(device_alloc<int>(3 * n + 1), n);
        group_tokens(&groups, tokens, n);
        record({out}, {wte, wpe},
               [=] { embedding_backward(wte.grad, wpe.grad, out.grad, groups, B, T, C); });
    }
    return out;
}

// ----------------------------------------------------------------------------------------------------
// Linear: x (N, in) -> out (N, out_features),  out = x @ W^T + b,  W (out_features, in), b
// optional. Backward: dx += dout @ W,  dW += dout^T @ x,  db += column sums of dout.

void linear_forward(floatX* out, const floatX* x, const floatX* weight, const floatX* bias, long N,
                    int in, int out_features) {
    gemm({.M = int(N), .N = out_features, .K = in}, 1, {.data = x, .ld = in},
         {.data = weight, .ld = in, .transpose = true}, 0,
         {.data = out, .ld = out_features, .bias = bias});
}

// gemm_epilogue for the epilogues that sum a bias gradient (bias_grad, gelu_grad_bias_grad):
// cuBLASLt writes the n sums, so they go to scratch and are then added into dbias, as a backward
// adds into parameter gradients. False, with nothing done, where the epilogue does not apply.
static bool gemm_epilogue_adding_bias_grad(Epilogue epilogue, GemmShape s, GemmInput A, GemmInput B,
                                           real beta, GemmOutput C, floatX* aux, floatX* dbias,
                                           int n) {
    MemoryMark mark = memory_mark();
    floatX* sums = device_alloc<floatX>(n);
    bool fused = gemm_epilogue(epilogue, s, A, B, beta, C, aux, sums);
    if (fused) residual_forward(dbias, dbias, sums, n);
    memory_release(mark);
    return fused;
}

void linear_backward(floatX* dx, floatX* dweight, floatX* dbias, const floatX* dout,
                     const floatX* x, const floatX* weight, long N, int in, int out_features,
                     InputGrad mode) {
    if (dx)  // dx (N, in) = dout (N, out) @ W (out, in)
        gemm({.M = int(N), .N = in, .K = out_features}, 1, {.data = dout, .ld = out_features},
             {.data = weight, .ld = in}, mode == InputGrad::add ? 1 : 0, {.data = dx, .ld = in});
    // dW (out, in) += dout^T (out, N) @ x (N, in); db += column sums of dout, by the product's
    // epilogue when the build has one (it writes the sums into scratch, we add them), else by
    // column_sums.
    GemmShape shape{.M = out_features, .N = in, .K = int(N)};
    GemmInput dout_t{.data = dout, .ld = out_features, .transpose = true},
        x_rows{.data = x, .ld = in};
    if (gemm_has_epilogues && dweight && dbias &&
        gemm_epilogue_adding_bias_grad(Epilogue::bias_grad, shape, dout_t, x_rows, 1,
                                       {.data = dweight, .ld = in}, nullptr, dbias, out_features))
        return;
    if (dweight) gemm(shape, 1, dout_t, x_rows, 1, {.data = dweight, .ld = in});
    if (dbias) column_sums(dbias, dout, N, out_features);
}

Tensor linear(Tensor x, Tensor weight, Tensor bias) {
    int in = x.dim(-1), out_features = weight.dim(0);
    if (weight.ndim != 2 || weight.dim(1) != in || (bias.data && bias.size() != out_features))
        fail("linear: input %s does not fit weight %s and bias %s", shape_string(x).c_str(),
             shape_string(weight).c_str(), shape_string(bias).c_str());
    long N = x.size() / in;
    Tensor like = x;
    like.shape[x.ndim - 1] = out_features;
    Tensor out = new_result(like, {x, weight, bias});
    linear_forward(out.data, x.data, weight.data, bias.data, N, in, out_features);
    if (out.grad)
        record({out}, {x, weight, bias}, [=] {
            linear_backward(x.grad, weight.grad, bias.grad, out.grad, x.data, weight.data, N, in,
                            out_features, InputGrad::add);
        });
    return out;
}

Linear linear_layer(Parameters* p, int in, int out, uint64_t seed, bool bias) {
    Linear layer{parameter(p, {out, in}), bias ? parameter(p, {out}) : Tensor{}};
    fill_normal(layer.weight.data, layer.weight.size(), seed, 0, real(1 / std::sqrt(double(in))));
    if (bias) fill(layer.bias.data, out, 0);
    parameters_sync_master(*p);
    return layer;
}

// ----------------------------------------------------------------------------------------------------
// LayerNorm and RMSNorm over the last dim C, per row. LayerNorm:  mean = sum(x)/C,
// rstd = 1/sqrt(sum((x-mean)^2)/C + eps),  xhat = (x - mean) * rstd,  out = xhat * w + b.
// RMSNorm is the same without centring or bias (mean = 0, b = 0; its mean and bias pointers are
// unused). Forward saves mean and rstd per row. Backward, with g = dout * w:  dx = rstd * (g -
// mean(g) - xhat * mean(g * xhat))  (RMSNorm: no mean(g)), dw += sum over rows of dout * xhat,  db
// += sum over rows of dout. The forward kernel can also form x = input + residual first and write
// that sum out: the residual connection and the norm after it in one pass over memory (the fused
// kernel of a pre-norm transformer).

constexpr real norm_eps = real(1e-5);

__global__ void norm_forward_kernel(Norm kind, floatX* out, real* mean_out, real* rstd_out,
                                    floatX* sum_out, const floatX* x, const floatX* residual,
                                    const floatX* weight, const floatX* bias, long rows, int C) {
    bool centred = kind == Norm::layernorm;
    bool active;
    long row = group_row(rows, &active);
    const floatX* xr = x + row * C;
    if (residual &&
        active) {  // x + residual into sum_out, each thread reading back only its own elements
        floatX* s = sum_out + row * C;
        const floatX* rr = residual + row * C;
        for_each_in_row(C, [&](int c) { s[c] = xr[c] + rr[c]; });
        xr = s;
    }
    floatX* o = out + row * C;
    real mean = centred ? group_sum(row_sum(C, [&](int c) { return xr[c]; })) / C : 0;
    real variance =
        group_sum(row_sum(C, [&](int c) { return (xr[c] - mean) * (xr[c] - mean); })) / C;
    real rstd = 1 / sqrt(variance + norm_eps);
    if (!active) return;
    for_each_in_row(C, [&](int c) {
        o[c] = (xr[c] - mean) * rstd * weight[c] + (centred ? real(bias[c]) : 0);
    });
    if (threadIdx.x == 0) {
        if (centred) mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

// The backward, dx and the partial sums of dw and db in one pass over dout and x: a block takes a
// slab of column_slab_rows rows, its row groups take every (groups)-th row of it, and each group
// adds its rows' dout * xhat and dout into running sums of its own, 2 C of them. A lone group (the
// CPU's one thread, or a GPU group whose sums do not fit in shared memory) keeps those sums in its
// slab's row of `partial`, which stays in its cache; a GPU block of several groups keeps a pair of
// rows per group in shared memory and adds them up, in group order, into the slab's row at the end.
// add_partial_sums then adds the slabs up (dw, then db: partial holds 2 C sums per slab). Every
// group goes round the same number of times (rows past the slab's end compute but write nothing),
// so the shuffles of a warp's groups stay together.
template <typename Sums>  // real*, or shared memory (the CPU's checked version differs in type)
__device__ void norm_backward_rows(Sums sums, bool centred, floatX* dx, const floatX* dout,
                                   const floatX* x, const floatX* weight, const real* mean,
                                   const real* rstd, long first, long end, int C, bool accumulate) {
    for_each_in_row(C, [&](int c) { sums[c] = 0, sums[C + c] = 0; });
    for (int step = 0; step < column_slab_rows; step += blockDim.y) {
        long r = first + step + threadIdx.y;
        bool active = r < end;
        long row = active ? r : end - 1;
        const floatX *xr = x + row * C, *dr = dout + row * C;
        floatX* dxr = dx ? dx + row * C : nullptr;
        real row_mean = centred ? mean[row] : 0, row_rstd = rstd[row];
        real g_mean =
            centred ? group_sum(row_sum(C, [&](int c) { return dr[c] * weight[c]; })) / C : 0;
        real g_xhat_mean =
            group_sum(row_sum(
                C, [&](int c) { return dr[c] * weight[c] * (xr[c] - row_mean) * row_rstd; })) /
            C;
        if (!active) continue;
        for_each_in_row(C, [&](int c) {
            real d = dr[c], xhat = (xr[c] - row_mean) * row_rstd;
            if (dxr)
                dxr[c] = (accumulate ? real(dxr[c]) : 0) +
                         row_rstd * (d * weight[c] - g_mean - xhat * g_xhat_mean);
            sums[c] += d * xhat;
            sums[C + c] += d;
        });
    }
}

__global__ void norm_backward_kernel(Norm kind, floatX* dx, real* partial, const floatX* dout,
                                     const floatX* x, const floatX* weight, const real* mean,
                                     const real* rstd, long rows, int C, bool accumulate) {
    bool centred = kind == Norm::layernorm;
    long first = long(blockIdx.x) * column_slab_rows,
         end = first + column_slab_rows < rows ? first + column_slab_rows : rows;
    real* slab_sums = partial + long(blockIdx.x) * 2 * C;  // dw sums (C), then db sums (C)
    if (blockDim.y == 1) {
        norm_backward_rows(slab_sums, centred, dx, dout, x, weight, mean, rstd, first, end, C,
                           accumulate);
        return;
    }
    auto group_sums = shared_memory<real>();
    norm_backward_rows(group_sums + threadIdx.y * 2 * C, centred, dx, dout, x, weight, mean, rstd,
                       first, end, C, accumulate);
    __syncthreads();
    int thread = threadIdx.y * blockDim.x + threadIdx.x, threads = blockDim.x * blockDim.y;
    for_each_strided(0, 2 * C, thread, threads, [&](long c) {
        real total = 0;
        for (unsigned group = 0; group < blockDim.y; group++)
            total += group_sums[group * 2 * C + c];
        slab_sums[c] = total;
    });
}

void norm_forward(Norm kind, floatX* out, real* mean, real* rstd, const floatX* x,
                  const floatX* weight, const floatX* bias, long rows, int C) {
    launch(norm_forward_kernel, row_grid(rows), row_block(), 0, kind, out, mean, rstd, nullptr, x,
           nullptr, weight, bias, rows, C);
}

void residual_norm_forward(Norm kind, floatX* sum, floatX* out, real* mean, real* rstd,
                           const floatX* a, const floatX* b, const floatX* weight,
                           const floatX* bias, long rows, int C) {
    launch(norm_forward_kernel, row_grid(rows), row_block(), 0, kind, out, mean, rstd, sum, a, b,
           weight, bias, rows, C);
}

// A block of the backward: groups of threads_per_row threads, as many as fit their sums (2 C each)
// in 48 KB of shared memory (more would need the kernel's opt-in), up to rows_per_block() and the
// slab's rows. On the CPU, one thread. A lone group's sums need no shared memory: so does a row too
// long for even one group's sums (C > 6144 floats), whose sums then live in `partial` (in L2).
static dim3 norm_backward_block(int C) {
    if (!gpu_launch_shapes && threads_per_row == 1) return dim3(1, 1);
    long groups = (48 << 10) / (2 * long(C) * sizeof(real));
    if (groups < 1) groups = 1;
    if (groups > rows_per_block()) groups = rows_per_block();
    if (groups > column_slab_rows) groups = column_slab_rows;
    return dim3(threads_per_row, unsigned(groups));
}

void norm_backward(Norm kind, floatX* dx, floatX* dweight, floatX* dbias, const floatX* dout,
                   const floatX* x, const floatX* weight, const real* mean, const real* rstd,
                   long rows, int C, InputGrad mode) {
    bool centred = kind == Norm::layernorm;
    int slabs = column_slabs(rows);
    real* partial = device_alloc<real>(long(slabs) * 2 * C);
    dim3 block = norm_backward_block(C);
    size_t shared = block.y == 1 ? 0 : block.y * 2 * size_t(C) * sizeof(real);
    launch(norm_backward_kernel, slabs, block, shared, kind, dx, partial, dout, x, weight, mean,
           rstd, rows, C, dx && mode == InputGrad::add);
    if (dweight || (centred && dbias))
        add_partial_sums(dweight, centred ? dbias : nullptr, partial, slabs, 2L * C, C);
}

// The tape versions. bias is empty for RMSNorm.
static Tensor normalization(Tensor x, Tensor weight, Tensor bias, Norm kind) {
    int C = x.dim(-1);
    long rows = x.size() / C;
    Tensor out = new_result(x, {x, weight, bias});
    real* mean = kind == Norm::layernorm ? device_alloc<real>(rows) : nullptr;
    real* rstd = device_alloc<real>(rows);
    norm_forward(kind, out.data, mean, rstd, x.data, weight.data, bias.data, rows, C);
    if (out.grad)
        record({out}, {x, weight, bias}, [=] {
            norm_backward(kind, x.grad, weight.grad, bias.grad, out.grad, x.data, weight.data, mean,
                          rstd, rows, C, InputGrad::add);
        });
    return out;
}

Tensor layernorm(Tensor x, Tensor weight, Tensor bias) {
    return normalization(x, weight, bias, Norm::layernorm);
}
Tensor rmsnorm(Tensor x, Tensor weight) {
    return normalization(x, weight, Tensor{}, Norm::rmsnorm);
}

// sum = a + b and normalized = norm(sum), fused. Backward: sum.grad (from sum's later users) gains
// the norm's backward, then flows to a and b like a residual's.
ResidualNorm residual_norm(Tensor a, Tensor b, Tensor weight, Tensor bias, Norm kind) {
    if (a.size() != b.size())
        fail("residual_norm: shapes %s and %s differ", shape_string(a).c_str(),
             shape_string(b).c_str());
    int C = a.dim(-1);
    long rows = a.size() / C;
    Tensor sum = new_result(a, {a, b}), out = new_result(a, {a, b, weight, bias});
    real* mean = kind == Norm::layernorm ? device_alloc<real>(rows) : nullptr;
    real* rstd = device_alloc<real>(rows);
    residual_norm_forward(kind, sum.data, out.data, mean, rstd, a.data, b.data, weight.data,
                          bias.data, rows, C);
    if (out.grad)
        record({sum, out}, {a, b, weight, bias}, [=] {
            norm_backward(kind, sum.grad, weight.grad, bias.grad, out.grad, sum.data, weight.data,
                          mean, rstd, rows, C, InputGrad::add);
            residual_backward(a.grad, b.grad, sum.grad, a.size());
        });
    return ResidualNorm{sum, out};
}

// ----------------------------------------------------------------------------------------------------
// Activations, elementwise (see map above).
// GELU, tanh approximation as in GPT-2:  gelu(x) = x/2 * (1 + tanh(u)),  u = sqrt(2/pi) (x +
// 0.044715 x^3). Since (1 + tanh(u))/2 = sigmoid(2u), gelu(x) = x * s with s = sigmoid(2u): one
// exponential.
//   gelu'(x) = s + x * s (1 - s) * 2 du/dx,  du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
// SiLU (Swish):  silu(x) = x * sigmoid(x),  silu'(x) = s (1 + x (1 - s)),  s = sigmoid(x)

struct Gelu {
    __device__ __forceinline__ real forward(real x) const { return x * gate(x); }
    __device__ __forceinline__ real derivative(real x) const {
        real s = gate(x), du = real(0.7978845608028654) * (1 + 3 * real(0.044715) * x * x);
        return s + x * s * (1 - s) * 2 * du;
    }
    __device__ __forceinline__ real gate(real x) const {  // sigmoid(2u)
        real u = real(0.7978845608028654) * (x + real(0.044715) * x * x * x);
        return 1 / (1 + fast_exp(-2 * u));
    }
};
struct Silu {
    __device__ __forceinline__ real forward(real x) const { return x / (1 + fast_exp(-x)); }
    __device__ __forceinline__ real derivative(real x) const {
        real s = 1 / (1 + fast_exp(-x));
        return s * (1 + x * (1 - s));
    }
};

Tensor gelu(Tensor x) { return map(x, Gelu{}); }
Tensor silu(Tensor x) { return map(x, Silu{}); }

// Linear + GELU fused, the MLP's first half: out = gelu(x @ W^T + b). The product goes straight
// into the pre-activation buffer (saved for backward, not a tensor of its own), and one pass adds
// the bias and applies GELU; the separate bias broadcast and the pre-activation's own gradient
// buffer disappear. Backward: dpre = dout * gelu'(pre), then the linear backward with dpre.

__global__ void bias_gelu_forward_kernel(floatX* out, floatX* pre, const floatX* bias, long rows,
                                         int columns) {
    bool active;
    long r = group_row(rows, &active);
    if (!active) return;
    floatX *p = pre + r * columns, *o = out + r * columns;
    for_each_in_row(columns, [&](int c) {
        real value = p[c] + bias[c];
        p[c] = value;
        o[c] = Gelu{}.forward(value);
    });
}

__global__ void gelu_gradient_kernel(floatX* dpre, const floatX* dout, const floatX* pre, long n) {
    for_each_element(n, [&](long i) { dpre[i] = dout[i] * Gelu{}.derivative(pre[i]); });
}

void linear_gelu_forward(floatX* out, floatX* pre, const floatX* x, const floatX* weight,
                         const floatX* bias, long N, int in, int out_features) {
    GemmShape shape{.M = int(N), .N = out_features, .K = in};
    GemmInput x_rows{.data = x, .ld = in}, weight_t{.data = weight, .ld = in, .transpose = true};
    if (gemm_epilogue(Epilogue::gelu_bias, shape, x_rows, weight_t, 0,
                      {.data = out, .ld = out_features, .bias = bias}, pre, nullptr))
        return;
    gemm(shape, 1, x_rows, weight_t, 0, {.data = pre, .ld = out_features});
    launch(bias_gelu_forward_kernel, row_grid(N), row_block(), 0, out, pre, bias, N, out_features);
}

// dpre (N, out_features) is scratch for the pre-activation's gradient.
void linear_gelu_backward(floatX* dx, floatX* dweight, floatX* dbias, floatX* dpre,
                          const floatX* dout, const floatX* pre, const floatX* x,
                          const floatX* weight, long N, int in, int out_features, InputGrad mode) {
    launch(gelu_gradient_kernel, element_blocks(N * out_features), element_threads, 0, dpre, dout,
           pre, N * out_features);
    linear_backward(dx, dweight, dbias, dpre, x, weight, N, in, out_features, mode);
}

bool linear_backward_through_gelu(floatX* dpre, floatX* dpre_bias, floatX* dact, const floatX* dout,
                                  const floatX* pre, const floatX* weight, long N, int in,
                                  int out_features) {
    GemmShape shape{.M = int(N), .N = in, .K = out_features};
    GemmInput dout_rows{.data = dout, .ld = out_features}, weight_rows{.data = weight, .ld = in};
    if (gemm_has_epilogues && dpre_bias &&
        gemm_epilogue_adding_bias_grad(Epilogue::gelu_grad_bias_grad, shape, dout_rows, weight_rows,
                                       0, {.data = dpre, .ld = in}, const_cast<floatX*>(pre),
                                       dpre_bias, in))
        return true;
    gemm(shape, 1, dout_rows, weight_rows, 0, {.data = dact, .ld = in});
    launch(gelu_gradient_kernel, element_blocks(N * in), element_threads, 0, dpre, dact, pre,
           N * in);
    return false;
}

Tensor linear_gelu(Tensor x, Tensor weight, Tensor bias) {
    int in = x.dim(-1), out_features = weight.dim(0);
    if (weight.ndim != 2 || weight.dim(1) != in || bias.size() != out_features)
        fail("linear_gelu: input %s does not fit weight %s and bias %s", shape_string(x).c_str(),
             shape_string(weight).c_str(), shape_string(bias).c_str());
    long N = x.size() / in;
    Tensor like = x;
    like.shape[x.ndim - 1] = out_features;
    Tensor out = new_result(like, {x, weight, bias});
    floatX* pre = device_alloc<floatX>(N * out_features);
    linear_gelu_forward(out.data, pre, x.data, weight.data, bias.data, N, in, out_features);
    if (out.grad)
        record({out}, {x, weight, bias}, [=] {
            floatX* dpre = device_alloc<floatX>(N * out_features);
            linear_gelu_backward(x.grad, weight.grad, bias.grad, dpre, out.grad, pre, x.data,
                                 weight.data, N, in, out_features, InputGrad::add);
        });
    return out;
}

// SwiGLU, the gated MLP activation: x (N, 2H) holds a = x[:, :H] and gate = x[:, H:];
// out (N, H) = silu(a) * gate.  Backward: da += dout * gate * silu'(a),  dgate += dout * silu(a).

__global__ void swiglu_forward_kernel(floatX* out, const floatX* x, long N, int H) {
    bool active;
    long row = group_row(N, &active);
    if (!active) return;
    const floatX *a = x + row * 2 * H, *gate = a + H;
    floatX* o = out + row * H;
    for_each_in_row(H, [&](int h) { o[h] = Silu{}.forward(a[h]) * gate[h]; });
}

__global__ void swiglu_backward_kernel(floatX* dx, const floatX* dout, const floatX* x, long N,
                                       int H, bool accumulate) {
    bool active;
    long row = group_row(N, &active);
    if (!active) return;
    const floatX *a = x + row * 2 * H, *gate = a + H, *d = dout + row * H;
    floatX *da = dx + row * 2 * H, *dgate = da + H;
    for_each_in_row(H, [&](int h) {
        real before_a = accumulate ? real(da[h]) : 0, before_gate = accumulate ? real(dgate[h]) : 0;
        da[h] = before_a + d[h] * gate[h] * Silu{}.derivative(a[h]);
        dgate[h] = before_gate + d[h] * Silu{}.forward(a[h]);
    });
}

void swiglu_forward(floatX* out, const floatX* x, long N, int H) {
    launch(swiglu_forward_kernel, row_grid(N), row_block(), 0, out, x, N, H);
}
void swiglu_backward(floatX* dx, const floatX* dout, const floatX* x, long N, int H,
                     InputGrad mode) {
    launch(swiglu_backward_kernel, row_grid(N), row_block(), 0, dx, dout, x, N, H,
           mode == InputGrad::add);
}

Tensor swiglu(Tensor x) {
    int H = x.dim(-1) / 2;
    if (x.dim(-1) != 2 * H)
        fail("swiglu: the last dim of %s must be even", shape_string(x).c_str());
    long N = x.size() / (2 * H);
    Tensor like = x;
    like.shape[x.ndim - 1] = H;
    Tensor out = new_result(like, {x});
    swiglu_forward(out.data, x.data, N, H);
    if (out.grad)
        record({out}, {x},
               [=] { swiglu_backward(x.grad, out.grad, x.data, N, H, InputGrad::add); });
    return out;
}

// ----------------------------------------------------------------------------------------------------
// Dropout: out = x * keep / (1 - p), keep = (uniform(seed, i) >= p). The mask is never stored: the
// counter-based generator redraws it in backward, identically on the CPU and the GPU.
// Backward: dx += dout * keep / (1 - p).

__global__ void dropout_kernel(floatX* out, const floatX* x, long n, real p, uint64_t seed,
                               bool accumulate) {
    real scale = 1 / (1 - p);
    for_each_element(n, [&](long i) {
        real kept = random_uniform(seed, uint64_t(i)) >= p ? x[i] * scale : 0;
        out[i] = accumulate ? out[i] + kept : kept;
    });
}

void dropout_forward(floatX* out, const floatX* x, long n, real p, uint64_t seed) {
    launch(dropout_kernel, element_blocks(n), element_threads, 0, out, x, n, p, seed, false);
}

void dropout_backward(floatX* dx, const floatX* dout, long n, real p, uint64_t seed,
                      InputGrad mode) {
    launch(dropout_kernel, element_blocks(n), element_threads, 0, dx, dout, n, p, seed,
           mode == InputGrad::add);
}

Tensor dropout(Tensor x, real p, uint64_t seed) {
    if (p <= 0) return x;
    if (p >= 1) fail("dropout: probability %g must be below 1", double(p));
    Tensor out = new_result(x, {x});
    long n = x.size();
    dropout_forward(out.data, x.data, n, p, seed);
    if (out.grad)
        record({out}, {x}, [=] { dropout_backward(x.grad, out.grad, n, p, seed, InputGrad::add); });
    return out;
}

// ----------------------------------------------------------------------------------------------------
// Residual connection: out = a + b (same shapes).  Backward: da += dout, db += dout.

__global__ void residual_forward_kernel(floatX* out, const floatX* a, const floatX* b, long n) {
    for_each_element(n, [&](long i) { out[i] = a[i] + b[i]; });
}

__global__ void residual_backward_kernel(floatX* da, floatX* db, const floatX* dout, long n) {
    if (da) for_each_element(n, [&](long i) { da[i] += dout[i]; });
    if (db) for_each_element(n, [&](long i) { db[i] += dout[i]; });
}

void residual_forward(floatX* out, const floatX* a, const floatX* b, long n) {
    launch(residual_forward_kernel, element_blocks(n), element_threads, 0, out, a, b, n);
}
void residual_backward(floatX* da, floatX* db, const floatX* dout, long n) {
    launch(residual_backward_kernel, element_blocks(n), element_threads, 0, da, db, dout, n);
}

Tensor residual(Tensor a, Tensor b) {
    if (a.size() != b.size())
        fail("residual: shapes %s and %s differ", shape_string(a).c_str(), shape_string(b).c_str());
    Tensor out = new_result(a, {a, b});
    long n = a.size();
    residual_forward(out.data, a.data, b.data, n);
    if (out.grad) record({out}, {a, b}, [=] { residual_backward(a.grad, b.grad, out.grad, n); });
    return out;
}

// ----------------------------------------------------------------------------------------------------
// Rotary position embedding (RoPE), on one head's vector x (hs values) at position t: each pair
// (x[i], x[i + hs/2]) is rotated by the angle t * base^(-2i/hs). A rotation is undone by the
// opposite angle, so the backward is the same kernel with `inverse`. A row kernel over head
// vectors: rows p = b*T + t of a (B, T, NH*hs) layout whose rows are ld_x (ld_out) apart, NH
// vectors per row.

constexpr double rotary_base = 10000.0;

__global__ void rotary_kernel(floatX* out, int ld_out, const floatX* x, int ld_x, long rows, int T,
                              int NH, int hs, int start, bool inverse, bool accumulate) {
    bool active;
    long r = group_row(rows * NH, &active);
    if (!active) return;
    long p = r / NH;
    int half = hs / 2, t = start + int(p % T);
    const floatX* source = x + p * ld_x + (r % NH) * hs;
    floatX* target = out + p * ld_out + (r % NH) * hs;
    for_each_in_row(half, [&](int i) {
        double angle = t * pow(rotary_base, -2.0 * i / hs);
        real c = real(cos(angle)), s = real(inverse ? -sin(angle) : sin(angle));
        // both read before either is written: in place is fine
        real x0 = source[i], x1 = source[i + half];
        target[i] = (accumulate ? real(target[i]) : 0) + x0 * c - x1 * s;
        target[i + half] = (accumulate ? real(target[i + half]) : 0) + x0 * s + x1 * c;
    });
}

// out = x rotated, at positions start, start+1, ... along each of the rows / T sequences. The
// backward adds the gradient, turned back, into dx.
void rotary_forward(floatX* out, int ld_out, const floatX* x, int ld_x, long rows, int T, int NH,
                    int hs, int start) {
    launch(rotary_kernel, row_grid(rows * NH), row_block(), 0, out, ld_out, x, ld_x, rows, T, NH,
           hs, start, false, false);
}
void rotary_backward(floatX* dx, int ld_dx, const floatX* dout, int ld_dout, long rows, int T,
                     int NH, int hs, InputGrad mode) {
    launch(rotary_kernel, row_grid(rows * NH), row_block(), 0, dx, ld_dx, dout, ld_dout, rows, T,
           NH, hs, 0, true, mode == InputGrad::add);
}

// The tape version: x (B, T, NH, hs) -> a rotated copy.
Tensor rotary(Tensor x) {
    if (x.ndim != 4 || x.dim(-1) % 2)
        fail("rotary: expects (B, T, NH, hs) with hs even, got %s", shape_string(x).c_str());
    Tensor out = new_result(x, {x});
    int T = x.shape[1], NH = x.shape[2], hs = x.shape[3];
    long rows = long(x.shape[0]) * T;
    rotary_forward(out.data, NH * hs, x.data, NH * hs, rows, T, NH, hs, 0);
    if (out.grad)
        record({out}, {x}, [=] {
            rotary_backward(x.grad, NH * hs, out.grad, NH * hs, rows, T, NH, hs, InputGrad::add);
        });
    return out;
}

// ====================================================================================================
// 8. Attention
// Causal multi-head self-attention, the core: qkv (B, T, 3C) -> out (B, T, C), NH heads of hs =
// C/NH. Each head reads its queries, keys and values straight out of qkv (rows of hs values, 3C
// apart) and writes into its hs columns of out, so nothing is rearranged; with rotary positions, q
// and k are first rotated into (B, T, C) buffers of their own.
//   att = softmax(q @ k^T / sqrt(hs)) over the keys s <= t (causal)        (B, NH, T, T)
//   att' = dropout(att);  out[:, :, head] = att' @ v
// Backward, per head, with dy = the head's columns of dout:
//   datt' = dy @ v^T,  dv += att'^T @ dy,  datt = dropout backward of datt',
//   dpre = att * (datt - sum_s(datt * att)) (softmax backward),
//   dq += dpre @ k / sqrt(hs),  dk += dpre^T @ q / sqrt(hs)  (turned back first, with rotary).
// The forward saves att (and att' with dropout), and the rotated q and k.

// Rows of att are (b, h, t): query t against `keys` keys. Query t sits at position start + t and
// sees keys s <= start + t; the rest of its row is zeroed. (Training: keys = T, start = 0.
// Generation with a cache: the new queries come after `start` cached positions.)
__global__ void causal_softmax_forward_kernel(floatX* att, long rows, int T, int keys, int start) {
    bool active;
    long row = group_row(rows, &active);
    int last = start + int(row % T);
    floatX* a = att + row * keys;
    real largest = group_max(row_max(last + 1, [&](int s) { return a[s]; })), total = 0;
    if (active) {  // exponentials in place, then their sum (threads past the end only join the
                   // shuffles)
        for_each_in_row(last + 1, [&](int s) { a[s] = fast_exp(a[s] - largest); });
        total = row_sum(last + 1, [&](int s) { return a[s]; });
    }
    real inverse = 1 / group_sum(total);
    if (!active) return;
    for_each_in_row(keys, [&](int s) { a[s] = s <= last ? a[s] * inverse : 0; });
}

// In place: datt becomes dpre = att * (datt - sum_s(datt * att)).
__global__ void causal_softmax_backward_kernel(floatX* datt, const floatX* att, long rows, int T) {
    bool active;
    long row = group_row(rows, &active);
    int t = int(row % T);
    const floatX* a = att + row * T;
    floatX* d = datt + row * T;
    real dot = group_sum(row_sum(t + 1, [&](int s) { return d[s] * a[s]; }));
    if (!active) return;
    for_each_in_row(T, [&](int s) { d[s] = s <= t ? a[s] * (d[s] - dot) : 0; });
}

// Where both attention kernels read q and k, and where their backward writes dq and dk: inside qkv
// (rows 3C apart), or, with rotary positions, in (B, T, C) buffers of their own: the rotated q and
// k the forward saves, and scratch gradients that are turned back into dqkv at the end.
struct QueryKey {
    const floatX *q, *k;
    int ld;
};
struct QueryKeyGrads {
    floatX *dq, *dk;
    int ld;
};

static QueryKey queries_keys(AttentionSaved saved, const floatX* qkv, int C, bool rotary) {
    return rotary ? QueryKey{saved.q, saved.k, C} : QueryKey{qkv, qkv + C, 3 * C};
}

static QueryKey rotate_queries_keys(AttentionSaved saved, const floatX* qkv, int B, int T, int C,
                                    int NH, bool rotary) {
    if (rotary) {
        rotary_forward(saved.q, C, qkv, 3 * C, long(B) * T, T, NH, C / NH, 0);
        rotary_forward(saved.k, C, qkv + C, 3 * C, long(B) * T, T, NH, C / NH, 0);
    }
    return queries_keys(saved, qkv, C, rotary);
}

static QueryKeyGrads query_key_grads(floatX* dqkv, AttentionScratch scratch, int C, bool rotary) {
    return rotary ? QueryKeyGrads{scratch.dq, scratch.dk, C} : QueryKeyGrads{dqkv, dqkv + C, 3 * C};
}

static void rotary_gradients_back(floatX* dqkv, AttentionScratch scratch, int B, int T, int C,
                                  int NH, InputGrad mode) {
    rotary_backward(dqkv, 3 * C, scratch.dq, C, long(B) * T, T, NH, C / NH, mode);
    rotary_backward(dqkv + C, 3 * C, scratch.dk, C, long(B) * T, T, NH, C / NH, mode);
}

// The products run per head: a batch over the B sequences (outer) and the NH heads (inner). A
// head's q, k, v or output is a (T, hs) matrix inside a (B, T, width) buffer: rows `width` apart,
// sequences T * width apart, heads hs apart. Its attention matrix is (T, T), heads T * T apart.

void attention_forward(floatX* out, AttentionSaved saved, const floatX* qkv, int B, int T, int C,
                       int NH, bool rotary, real dropout_p, uint64_t seed) {
    int hs = C / NH;
    long heads = long(B) * NH, att_size = long(T) * T;
    auto [q, k, ld] = rotate_queries_keys(saved, qkv, B, T, C, NH, rotary);
    const floatX* v = qkv + 2 * C;
    real scale = real(1 / std::sqrt(double(hs)));
    GemmShape scores{.M = T, .N = T, .K = hs, .outer = B, .inner = NH},
        mix{.M = T, .N = hs, .K = T, .outer = B, .inner = NH};
    // att = q @ k^T * scale                                                 (T, T) per head
    gemm(scores, scale, {.data = q, .ld = ld, .outer = long(T) * ld, .inner = hs},
         {.data = k, .ld = ld, .transpose = true, .outer = long(T) * ld, .inner = hs}, 0,
         {.data = saved.att, .ld = T, .outer = NH * att_size, .inner = att_size});
    launch(causal_softmax_forward_kernel, row_grid(heads * T), row_block(), 0, saved.att, heads * T,
           T, T, 0);
    const floatX* att = saved.att;
    if (dropout_p > 0) {
        dropout_forward(saved.att_dropped, saved.att, heads * att_size, dropout_p, seed);
        att = saved.att_dropped;
    }
    // out = att @ v                                                         (T, hs) per head
    gemm(mix, 1, {.data = att, .ld = T, .outer = NH * att_size, .inner = att_size},
         {.data = v, .ld = 3 * C, .outer = long(T) * 3 * C, .inner = hs}, 0,
         {.data = out, .ld = C, .outer = long(T) * C, .inner = hs});
}

// Scratch buffers of the backward, (B, T, C) unless noted: datt (B, NH, T, T) and, with dropout,
// datt_kept (plain); D (B, NH, T) of real (flash); the rotated dq and dk (rotary).
AttentionScratch attention_scratch(int B, int T, int C, int NH, bool rotary, real dropout_p,
                                   bool flash) {
    long att_size = long(B) * NH * T * T, n = long(B) * T * C;
    AttentionScratch scratch{};
    if (!flash) scratch.datt = device_alloc<floatX>(att_size);
    if (!flash && dropout_p > 0) scratch.datt_kept = device_alloc<floatX>(att_size);
    if (flash) scratch.D = device_alloc<real>(long(B) * NH * T);
    if (rotary) scratch.dq = device_alloc<floatX>(n), scratch.dk = device_alloc<floatX>(n);
    return scratch;
}

void attention_backward(floatX* dqkv, const floatX* dout, AttentionSaved saved,
                        AttentionScratch scratch, const floatX* qkv, int B, int T, int C, int NH,
                        bool rotary, real dropout_p, uint64_t seed, InputGrad mode) {
    int hs = C / NH;
    long heads = long(B) * NH, att_size = long(T) * T;
    auto [q, k, ld] = queries_keys(saved, qkv, C, rotary);
    const floatX* v = qkv + 2 * C;
    const floatX* att = dropout_p > 0 ? saved.att_dropped : saved.att;
    real beta = mode == InputGrad::add ? 1 : 0;
    floatX* datt = scratch.datt;
    GemmShape scores{.M = T, .N = T, .K = hs, .outer = B, .inner = NH},
        mix{.M = T, .N = hs, .K = T, .outer = B, .inner = NH};
    GemmInput dy{.data = dout, .ld = C, .outer = long(T) * C, .inner = hs};
    // datt' = dy @ v^T                                                      (T, T) per head
    gemm(scores, 1, dy,
         {.data = v, .ld = 3 * C, .transpose = true, .outer = long(T) * 3 * C, .inner = hs}, 0,
         {.data = datt, .ld = T, .outer = NH * att_size, .inner = att_size});
    // dv = att'^T @ dy                                                      (T, hs) per head
    gemm(mix, 1,
         {.data = att, .ld = T, .transpose = true, .outer = NH * att_size, .inner = att_size}, dy,
         beta, {.data = dqkv + 2 * C, .ld = 3 * C, .outer = long(T) * 3 * C, .inner = hs});
    if (dropout_p > 0) {  // datt' -> datt: the dropout backward
        dropout_backward(scratch.datt_kept, datt, heads * att_size, dropout_p, seed,
                         InputGrad::write);
        datt = scratch.datt_kept;
    }
    launch(causal_softmax_backward_kernel, row_grid(heads * T), row_block(), 0, datt, saved.att,
           heads * T, T);
    real scale = real(1 / std::sqrt(double(hs)));
    auto [dq, dk, ld_grad] = query_key_grads(dqkv, scratch, C, rotary);
    real beta_qk = rotary ? 0 : beta;
    // dq = dpre @ k * scale,  dk = dpre^T @ q * scale                        (T, hs) per head
    gemm(mix, scale, {.data = datt, .ld = T, .outer = NH * att_size, .inner = att_size},
         {.data = k, .ld = ld, .outer = long(T) * ld, .inner = hs}, beta_qk,
         {.data = dq, .ld = ld_grad, .outer = long(T) * ld_grad, .inner = hs});
    gemm(mix, scale,
         {.data = datt, .ld = T, .transpose = true, .outer = NH * att_size, .inner = att_size},
         {.data = q, .ld = ld, .outer = long(T) * ld, .inner = hs}, beta_qk,
         {.data = dk, .ld = ld_grad, .outer = long(T) * ld_grad, .inner = hs});
    if (rotary) rotary_gradients_back(dqkv, scratch, B, T, C, NH, mode);
}

// ----------------------------------------------------------------------------------------------------
// Flash-style attention: the same maths without the (T, T) matrix in memory. A block takes a tile
// of query rows, a row group per query; keys and values pass through shared memory a tile at a
// time, and each query keeps a running maximum m, the running sum l of exp(score - m) and its
// output accumulator o, rescaled whenever m grows (the online softmax):
//   m' = max(m, s),  l = l e^(m - m') + e^(s - m'),  o = o e^(m - m') + e^(s - m') v;  out = o / l.
// The forward saves only lse = m + log l per query. The backward recomputes p = exp(q.k / sqrt(hs)
// - lse):
//   D_t = dout_t . out_t,  dp = dout_t . v_s,  ds = p (dp - D_t),
//   dq_t += ds k_s / sqrt(hs)                   (one kernel: a query per row group, looping over
//   keys) dk_s += ds q_t / sqrt(hs),  dv_s += p dout_t  (another: a key per row group, looping over
//   queries)
// so every gradient row has one owner and nothing is added atomically. Attention dropout uses the
// same mask as the plain kernels (element (b, h, t, s) of the counter-based stream).
//
// Each thread keeps its share of a head vector, the elements d = threadIdx.x + i * blockDim.x for
// i < PER_THREAD, in registers; PER_THREAD is a template parameter so the arrays stay in registers.

// These scalar kernels (one warp per query, no tensor cores) are never the default (see
// AttentionKernels): on a GPU cuBLAS's products beat them; the tensor-core ones further down do.
AttentionKernels attention_kernels = AttentionKernels::fastest;

constexpr int flash_tile = 32;  // keys (or queries) per shared-memory tile

struct FlashShape {
    // q and k rows are ld_qk apart (3C inside qkv, C when rotated); v's are 3C
    int B, T, C, NH, ld_qk;
    real scale, dropout_p;
    uint64_t seed;
};

// The dropout factor of probability (b, h, t, s): 0 or 1 / (1 - p), as dropout_kernel draws it.
__device__ inline real attention_keep(const FlashShape& s, int b, int h, int t, int key) {
    if (s.dropout_p <= 0) return 1;
    uint64_t index = ((uint64_t(b) * s.NH + h) * s.T + t) * s.T + key;
    return random_uniform(s.seed, index) >= s.dropout_p ? 1 / (1 - s.dropout_p) : 0;
}

// Loads rows first..first+flash_tile-1 (zeros past T) of two (B, T, *) buffers, head h of sequence
// b, into shared tiles a and b: all the block's threads share the copying.
template <typename Shared>
__device__ inline void load_tiles(Shared a, Shared b_tile, const floatX* x, int ld_x,
                                  const floatX* y, int ld_y, const FlashShape& s, int b, int h,
                                  int first) {
    int hs = s.C / s.NH, threads = blockDim.x * blockDim.y,
        me = threadIdx.y * blockDim.x + threadIdx.x;
    for (int e = me; e < flash_tile * hs; e += threads) {
        int j = e / hs, row = first + j;
        long column = long(h) * hs + e % hs;
        a[e] = row < s.T ? real(x[(long(b) * s.T + row) * ld_x + column]) : 0;
        b_tile[e] = row < s.T ? real(y[(long(b) * s.T + row) * ld_y + column]) : 0;
    }
}

// The dot products of this thread's shares of two head vectors, u and w, with row j of two shared
// tiles, x and y, summed over the row group: every thread of the group gets both.
template <int PER_THREAD, typename Shared>
__device__ __forceinline__ void group_dots(const real (&u)[PER_THREAD], const real (&w)[PER_THREAD],
                                           Shared x, Shared y, int j, int hs, real& ux, real& wy) {
    ux = 0, wy = 0;
    for (int i = 0; i < PER_THREAD; i++) {
        int d = threadIdx.x + i * blockDim.x;
        if (d < hs) ux += u[i] * x[j * hs + d], wy += w[i] * y[j * hs + d];
    }
    ux = group_sum(ux), wy = group_sum(wy);
}

template <int PER_THREAD>
__global__ void flash_attention_forward_kernel(floatX* out, real* lse, const floatX* q,
                                               const floatX* k, const floatX* v, FlashShape s) {
    int hs = s.C / s.NH, b = blockIdx.x / s.NH, h = blockIdx.x % s.NH;
    int first = blockIdx.y * blockDim.y, t = first + threadIdx.y,
        last = (first + int(blockDim.y) < s.T ? first + int(blockDim.y) : s.T) - 1;
    bool active = t < s.T;
    if (!active) t = s.T - 1;  // past the end: work on the last query, write nothing
    auto keys = shared_memory<real>();
    auto values = shared_memory<real>(flash_tile * hs * sizeof(real));
    real query[PER_THREAD], o[PER_THREAD], m = -INFINITY, l = 0;
    for (int i = 0; i < PER_THREAD; i++) {
        int d = threadIdx.x + i * blockDim.x;
        query[i] = d < hs ? real(q[(long(b) * s.T + t) * s.ld_qk + h * hs + d]) : 0;
        o[i] = 0;
    }
    for (int first_key = 0; first_key <= last;
         first_key += flash_tile) {  // keys past the block's last query never count
        __syncthreads();             // everyone is done with the previous tile
        load_tiles(keys, values, k, s.ld_qk, v, 3 * s.C, s, b, h, first_key);
        __syncthreads();
        for (int j = 0; j < flash_tile; j++) {
            real partial = 0;
            for (int i = 0; i < PER_THREAD; i++) {
                int d = threadIdx.x + i * blockDim.x;
                if (d < hs) partial += query[i] * keys[j * hs + d];
            }
            real score = group_sum(partial) *
                         s.scale;  // every group takes part: the shuffles need the whole warp
            int key = first_key + j;
            if (key > t) continue;  // causal
            real m_new = fmax(m, score), rescale = fast_exp(m - m_new), p = fast_exp(score - m_new);
            real weight = p * attention_keep(s, b, h, t, key);
            l = l * rescale + p;
            for (int i = 0; i < PER_THREAD; i++) {
                int d = threadIdx.x + i * blockDim.x;
                if (d < hs) o[i] = o[i] * rescale + weight * values[j * hs + d];
            }
            m = m_new;
        }
    }
    if (!active) return;
    for (int i = 0; i < PER_THREAD; i++) {
        int d = threadIdx.x + i * blockDim.x;
        if (d < hs) out[(long(b) * s.T + t) * s.C + h * hs + d] = o[i] / l;
    }
    if (threadIdx.x == 0) lse[(long(b) * s.NH + h) * s.T + t] = m + log(l);
}

// D = dout . out for every (b, h, t): a row kernel over the head vectors, rows (b, h, t).
__global__ void attention_row_dot_kernel(real* D, const floatX* dout, const floatX* out,
                                         FlashShape s) {
    bool active;
    int hs = s.C / s.NH;
    long r = group_row(long(s.B) * s.NH * s.T, &active);
    long b = r / (long(s.NH) * s.T), h = r / s.T % s.NH, t = r % s.T;
    const floatX *x = dout + (b * s.T + t) * s.C + h * hs, *y = out + (b * s.T + t) * s.C + h * hs;
    real dot = group_sum(row_sum(hs, [&](int d) { return x[d] * y[d]; }));
    if (active && threadIdx.x == 0) D[r] = dot;
}

// dq for a tile of queries per block (layout as the forward); written to dq (rows ld_dq apart),
// added when `accumulate`.
template <int PER_THREAD>
__global__ void flash_attention_dq_kernel(floatX* dq, int ld_dq, bool accumulate,
                                          const floatX* dout, const real* lse, const real* D,
                                          const floatX* q, const floatX* k, const floatX* v,
                                          FlashShape s) {
    int hs = s.C / s.NH, b = blockIdx.x / s.NH, h = blockIdx.x % s.NH;
    int first = blockIdx.y * blockDim.y, t = first + threadIdx.y,
        last = (first + int(blockDim.y) < s.T ? first + int(blockDim.y) : s.T) - 1;
    bool active = t < s.T;
    if (!active) t = s.T - 1;
    auto keys = shared_memory<real>();
    auto values = shared_memory<real>(flash_tile * hs * sizeof(real));
    long row = (long(b) * s.NH + h) * s.T + t;
    real query[PER_THREAD], dy[PER_THREAD], grad[PER_THREAD], row_lse = lse[row], row_D = D[row];
    for (int i = 0; i < PER_THREAD; i++) {
        int d = threadIdx.x + i * blockDim.x;
        query[i] = d < hs ? real(q[(long(b) * s.T + t) * s.ld_qk + h * hs + d]) : 0;
        dy[i] = d < hs ? real(dout[(long(b) * s.T + t) * s.C + h * hs + d]) : 0;
        grad[i] = 0;
    }
    for (int first_key = 0; first_key <= last; first_key += flash_tile) {
        __syncthreads();
        load_tiles(keys, values, k, s.ld_qk, v, 3 * s.C, s, b, h, first_key);
        __syncthreads();
        for (int j = 0; j < flash_tile; j++) {
            real qk, dp;
            group_dots(query, dy, keys, values, j, hs, qk, dp);
            qk *= s.scale;
            int key = first_key + j;
            if (key > t) continue;
            real ds = fast_exp(qk - row_lse) * (dp * attention_keep(s, b, h, t, key) - row_D);
            for (int i = 0; i < PER_THREAD; i++) {
                int d = threadIdx.x + i * blockDim.x;
                if (d < hs) grad[i] += ds * keys[j * hs + d] * s.scale;
            }
        }
    }
    if (!active) return;
    for (int i = 0; i < PER_THREAD; i++) {
        int d = threadIdx.x + i * blockDim.x;
        floatX* target = dq + (long(b) * s.T + t) * ld_dq + h * hs + d;
        if (d < hs) *target = (accumulate ? real(*target) : 0) + grad[i];
    }
}

// dk and dv for a tile of keys per block: a key per row group, looping over the queries t >= s,
// whose q and dout rows (and lse and D) pass through shared memory.
template <int PER_THREAD>
__global__ void flash_attention_dkdv_kernel(floatX* dk, int ld_dk, bool accumulate, floatX* dv,
                                            bool accumulate_v, const floatX* dout, const real* lse,
                                            const real* D, const floatX* q, const floatX* k,
                                            const floatX* v, FlashShape s) {
    int hs = s.C / s.NH, b = blockIdx.x / s.NH, h = blockIdx.x % s.NH;
    int first = blockIdx.y * blockDim.y, key = first + threadIdx.y;
    bool active = key < s.T;
    if (!active) key = s.T - 1;
    auto queries = shared_memory<real>();
    auto dys = shared_memory<real>(flash_tile * hs * sizeof(real));
    auto stats =
        shared_memory<real>(2 * flash_tile * hs * sizeof(real));  // lse and D of the tile's queries
    real key_row[PER_THREAD], value_row[PER_THREAD], grad_k[PER_THREAD], grad_v[PER_THREAD];
    for (int i = 0; i < PER_THREAD; i++) {
        int d = threadIdx.x + i * blockDim.x;
        key_row[i] = d < hs ? real(k[(long(b) * s.T + key) * s.ld_qk + h * hs + d]) : 0;
        value_row[i] = d < hs ? real(v[(long(b) * s.T + key) * 3 * s.C + h * hs + d]) : 0;
        grad_k[i] = grad_v[i] = 0;
    }
    for (int first_query = first / flash_tile * flash_tile; first_query < s.T;
         first_query += flash_tile) {
        __syncthreads();
        load_tiles(queries, dys, q, s.ld_qk, dout, s.C, s, b, h, first_query);
        int me = threadIdx.y * blockDim.x + threadIdx.x;
        for (int j = me; j < flash_tile; j += blockDim.x * blockDim.y) {
            int t = first_query + j;
            stats[j] = t < s.T ? lse[(long(b) * s.NH + h) * s.T + t] : 0;
            stats[flash_tile + j] = t < s.T ? D[(long(b) * s.NH + h) * s.T + t] : 0;
        }
        __syncthreads();
        for (int j = 0; j < flash_tile; j++) {
            real qk, dp;
            group_dots(key_row, value_row, queries, dys, j, hs, qk, dp);
            qk *= s.scale;
            int t = first_query + j;
            if (t < key || t >= s.T) continue;  // causal: only later queries see this key
            real p = fast_exp(qk - stats[j]), keep = attention_keep(s, b, h, t, key),
                 ds = p * (dp * keep - stats[flash_tile + j]);
            for (int i = 0; i < PER_THREAD; i++) {
                int d = threadIdx.x + i * blockDim.x;
                if (d < hs)
                    grad_v[i] += p * keep * dys[j * hs + d],
                        grad_k[i] += ds * queries[j * hs + d] * s.scale;
            }
        }
    }
    if (!active) return;
    for (int i = 0; i < PER_THREAD; i++) {
        int d = threadIdx.x + i * blockDim.x;
        if (d >= hs) continue;
        floatX* target_k = dk + (long(b) * s.T + key) * ld_dk + h * hs + d;
        *target_k = (accumulate ? real(*target_k) : 0) + grad_k[i];
        floatX* target_v = dv + (long(b) * s.T + key) * 3 * s.C + h * hs + d;
        *target_v = (accumulate_v ? real(*target_v) : 0) + grad_v[i];
    }
}

// Each thread holds its share of a head vector in register arrays of PER_THREAD values, a power of
// two at least hs / threads_per_row, so each kernel is built for a few sizes. A GPU runs a warp per
// row, so 16 values cover heads of up to 512; the larger sizes (for one thread per row, on the CPU)
// would spill registers on a GPU and are not built for it.
#ifdef __CUDACC__
using FlashSizes = std::integer_sequence<int, 1, 2, 4, 8, 16>;
#else
using FlashSizes = std::integer_sequence<int, 1, 2, 4, 8, 16, 32, 64, 128>;
#endif

// Calls f(std::integral_constant<int, N>()) for the smallest N of the sizes that fits the head.
template <typename F, int... N>
static void with_values_per_thread(int hs, F f, std::integer_sequence<int, N...>) {
    int needed = (hs + threads_per_row - 1) / threads_per_row;
    bool called = ((needed <= N && (f(std::integral_constant<int, N>()), true)) || ...);
    if (!called)
        fail(
            "flash attention: a head of %d values needs more than %d values per thread (raise "
            "threads_per_row)",
            hs, std::max({N...}));
}

// The launch shape of all three flash kernels: a row group per query (or key), rows_per_block of
// them per block; blocks over the B * NH heads (x: up to 2^31 - 1) and the T positions (y: tiles
// of rows_per_block, at most 65,535 of them).
static FlashShape flash_shape(int B, int T, int C, int NH, bool rotary, real dropout_p,
                              uint64_t seed) {
    return FlashShape{
        B, T, C, NH, rotary ? C : 3 * C, real(1 / std::sqrt(double(C / NH))), dropout_p, seed};
}
static dim3 flash_grid(const FlashShape& s) {
    return dim3(unsigned(s.B * s.NH), unsigned((s.T + rows_per_block() - 1) / rows_per_block()));
}

// More than 48 KB of dynamic shared memory needs the kernel's opt-in, on a GPU and under the
// emulator alike, and no GPU the build targets gives a block more than 163 KB.
template <typename... Params>
static void allow_shared_memory(void (*kernel)(Params...), size_t bytes, int hs) {
    if (bytes > size_t(163 << 10))
        fail(
            "flash attention: a head of %d values needs %zu bytes of shared memory per block, "
            "more than a GPU allows (163 KB): use --attention plain",
            hs, bytes);
    if (bytes > size_t(48 << 10))
        cuda_check(
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

// ----------------------------------------------------------------------------------------------------
// Flash attention on tensor cores (FlashAttention-2's scheme): the bfloat16 build's flash attention
// for heads of 64 or 128 values without attention dropout, with or without rotary positions (they
// only change where q and k are read); the scalar kernels above take every other case. A block of 4
// warps takes 64 queries (keys, in the dk/dv pass), 16 rows per warp; tiles of 64 keys (queries)
// pass through shared memory in bfloat16, and every product is a run of warp-wide mma_bf16_16x8x16
// calls (16 rows by 8 columns, 16 deep, accumulated in float). Per warp:
//   forward:  S = Q K^T (16, 64) per key tile; the online softmax on S in registers (float); P
//             rounded to bfloat16; O += P V. Saves lse per query, as the scalar kernels do.
//   dq:       over key tiles, 16 keys at a time: S, P = exp(S scale - lse), dP = dO V^T,
//             dS = P (dP - D), dQ += dS K scale                      (one owner per dq row)
//   dk, dv:   over query tiles, 16 queries at a time: S^T = K Q^T, P^T, dP^T = V dO^T, dS^T,
//             dV += P^T dO, dK += dS^T Q scale                        (one owner per dk, dv row)
// so, as with the scalar kernels, nothing is added atomically and the results are deterministic.
// Causal: tiles past a block's last query are never loaded; in the diagonal tile a warp skips the
// 16-key (16-query) chunks wholly outside its triangle; the rest is masked element by element.
//
// Memory: the tiles come in by cp.async into two stages of shared memory, so that the next tile's
// copy overlaps this tile's products (tc_pipeline), and leave shared memory as mma fragments by
// ldmatrix, four 8x8 matrices per instruction (.trans for the operands stored the other way round).
//
// Fragments (see mma_bf16_16x8x16, with g = lane / 4, t = lane % 4): an accumulator of 16 rows by 8
// columns holds (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1). The two accumulators of columns
// 16c..16c+15, rounded to bfloat16, are exactly the A fragment of those 16 columns: that is how P
// and dS feed the next product without leaving registers.

constexpr int tc_rows = 64;  // queries (keys) per block and rows per shared tile: 4 warps of 16
constexpr int tc_threads = 128;

// The head (b, h) and the block of 64 rows a block takes. The grid is one line of blocks with a
// head's blocks next to each other, so they run side by side and the tiles each of them reads
// again (K and V, or q and dout) come from L2 rather than device memory. With `longest_first` a
// head's blocks are taken from its last: the forward's and dq's last query block reads every key
// tile, and starting the long blocks first leaves the short ones to fill the launch's tail.
struct TcBlock {
    int b, h, block;
};

__host__ __device__ inline int tc_blocks_per_head(int T) { return (T + tc_rows - 1) / tc_rows; }

__device__ inline TcBlock tc_block(const FlashShape& s, bool longest_first) {
    int blocks = tc_blocks_per_head(s.T), head = blockIdx.x / blocks, i = blockIdx.x % blocks;
    return {head / s.NH, head % s.NH, longest_first ? blocks - 1 - i : i};
}

// A shared tile holds tc_rows rows of a head, HS bfloat16 each, then 8 of padding: rows stay
// 16-byte aligned (for cp.async and ldmatrix) and row r starts 4 banks after row r - 1, so the 8
// rows of 16 bytes each phase of an ldmatrix reads hit all 32 banks once.
template <int HS>
constexpr int tc_stride = HS + 8;
template <int HS>
constexpr size_t tc_tile_bytes = size_t(tc_rows) * tc_stride<HS> * 2;

// Tile `which` (0 or 1) of stage `stage` (0 or 1): each stage holds the two tiles a step uses.
template <int HS>
__device__ inline auto tc_tile(int stage, int which) {
    return shared_memory<uint32_t>((2 * stage + which) * tc_tile_bytes<HS>);
}

// Starts copying rows first..first+63 of head h of sequence b (zeros past T) from x (rows ld apart)
// into a shared tile, 16 bytes (8 values) per cp.async, the block's threads sharing the rows; the
// copies join each thread's open cp.async group.
template <int HS, typename Words>
__device__ inline void start_tile_copy(Words tile, const floatX* x, int ld, const FlashShape& s,
                                       int b, int h, int first) {
    static_assert(sizeof(floatX) == 2 && HS % 8 == 0, "rows are copied as stored: bfloat16");
    for (int e = threadIdx.x; e < tc_rows * HS / 8; e += blockDim.x) {
        int r = e / (HS / 8), d = 8 * (e % (HS / 8)), row = first + r;
        bool past_end = row >= s.T;  // zeros land; the address only has to be valid
        const floatX* from = x + (long(b) * s.T + (past_end ? 0 : row)) * ld + h * HS + d;
        cp_async_16(tile, (r * tc_stride<HS> + d) / 2, from, past_end);
    }
}

// The tile loop of all three kernels, over `tiles` tiles: start(i, stage) starts the copies of
// tile i into `stage`; use(i, stage) runs once tile i has landed there for the whole block. Tile
// i + 1 is on its way while tile i is used.
template <typename Start, typename Use>
__device__ inline void tc_pipeline(int tiles, Start start, Use use) {
    start(0, 0);
    cp_async_commit();
    for (int i = 0; i < tiles; i++) {
        if (i + 1 < tiles) start(i + 1, (i + 1) % 2);
        cp_async_commit();   // (empty after the last tile: wait_group counts groups, not copies)
        cp_async_wait<1>();  // this thread's copies of tile i have landed,
        __syncthreads();     // and everyone's
        use(i, i % 2);
        __syncthreads();  // everyone is done with the stage before tile i + 2 is copied into it
    }
}

// The A fragments of 16 rows of a head (rows first.., zeros past T), straight from global memory:
// a[kk] holds columns 16kk..16kk+15.
template <int HS>
__device__ inline void load_a_fragments(uint32_t (&a)[HS / 16][4], const floatX* x, int ld,
                                        const FlashShape& s, int b, int h, int first) {
    int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    for (int half = 0; half < 2; half++) {  // rows g and g + 8
        int row = first + g + 8 * half;
        const floatX* from = x + (long(b) * s.T + row) * ld + h * HS + 2 * t;
        for (int kk = 0; kk < HS / 16; kk++)
            for (int c = 0; c < 2; c++)  // columns 2t, 2t+1 and 2t+8, 2t+9
                a[kk][half + 2 * c] =
                    row < s.T ? pack_bf16x2(from[16 * kk + 8 * c], from[16 * kk + 8 * c + 1]) : 0u;
    }
}

// Two B fragments, 16 deep from k0 and 8 wide from n0 (bf[0]) and from n0 + 8 (bf[1]), whose
// element (k, n) is tile[n][k]: K^T from the rows of K. One ldmatrix: matrix j covers rows
// n0 + 8(j/2).. and columns k0 + 8(j%2)..
template <int HS, typename Words>
__device__ __forceinline__ void b_pair_from_rows(uint32_t (&bf)[2][2], Words tile, int n0, int k0) {
    int lane = threadIdx.x % 32, j = lane / 8;
    uint32_t r[4];
    ldmatrix_x4<false>(r, tile,
                       ((n0 + 8 * (j / 2) + lane % 8) * tc_stride<HS> + k0 + 8 * (j % 2)) / 2);
    bf[0][0] = r[0], bf[0][1] = r[1], bf[1][0] = r[2], bf[1][1] = r[3];
}

// Two B fragments as above whose element (k, n) is tile[k][n]: V from the rows of V. One
// ldmatrix.trans: matrix j covers rows k0 + 8(j%2).. and columns n0 + 8(j/2)..
template <int HS, typename Words>
__device__ __forceinline__ void b_pair_from_columns(uint32_t (&bf)[2][2], Words tile, int k0,
                                                    int n0) {
    int lane = threadIdx.x % 32, j = lane / 8;
    uint32_t r[4];
    ldmatrix_x4<true>(r, tile,
                      ((k0 + 8 * (j % 2) + lane % 8) * tc_stride<HS> + n0 + 8 * (j / 2)) / 2);
    bf[0][0] = r[0], bf[0][1] = r[1], bf[1][0] = r[2], bf[1][1] = r[3];
}

// acc[n] += a B for the HS / 8 accumulators of 8 columns each, B taken by b_pair_from_columns from
// the 16 tile rows from k0: the P V, dS K, P^T dO and dS^T Q products.
template <int HS, typename Words>
__device__ __forceinline__ void accumulate_times_columns(float (&acc)[HS / 8][4],
                                                         const uint32_t (&a)[4], Words tile,
                                                         int k0) {
    for (int n = 0; n < HS / 8; n += 2) {
        uint32_t bf[2][2];
        b_pair_from_columns<HS>(bf, tile, k0, 8 * n);
        mma_bf16_16x8x16(acc[n], a, bf[0]);
        mma_bf16_16x8x16(acc[n + 1], a, bf[1]);
    }
}

// The accumulators of columns 16c..16c+7 (left) and 16c+8..16c+15 (right), rounded to bfloat16, as
// the A fragment of those 16 columns.
__device__ __forceinline__ void a_from_accumulators(uint32_t (&a)[4], const float (&left)[4],
                                                    const float (&right)[4]) {
    a[0] = pack_bf16x2(left[0], left[1]), a[1] = pack_bf16x2(left[2], left[3]);
    a[2] = pack_bf16x2(right[0], right[1]), a[3] = pack_bf16x2(right[2], right[3]);
}

// The maximum (sum) of a row's values over the 4 lanes of a quad, which hold the row between them.
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// One key tile of the forward for one warp: S = Q K^T for the `chunks` 16-key chunks any of its
// queries see, scaled and masked; the running max m and sum l of each of the lane's two rows (g,
// g+8) move on and rescale O; then O += P V.
template <int HS, typename Words>
__device__ inline void tc_forward_tile(float (&o)[HS / 8][4], float (&m)[2], float (&l)[2],
                                       const uint32_t (&query)[HS / 16][4], Words keys,
                                       Words values, int first_key, int chunks, int row0,
                                       const FlashShape& s) {
    int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    float score[8][4] = {}, tile_max[2] = {-INFINITY, -INFINITY};  // (16, 64): 8 accumulators
    for (int c = 0; c < 4; c++) {
        if (c >= chunks) break;
        for (int kk = 0; kk < HS / 16; kk++) {
            uint32_t bf[2][2];
            b_pair_from_rows<HS>(bf, keys, 16 * c, 16 * kk);
            mma_bf16_16x8x16(score[2 * c], query[kk], bf[0]);
            mma_bf16_16x8x16(score[2 * c + 1], query[kk], bf[1]);
        }
        for (int n = 2 * c; n < 2 * c + 2; n++)
            for (int i = 0; i < 4; i++) {
                int row = row0 + g + 8 * (i / 2), key = first_key + 8 * n + 2 * t + i % 2;
                score[n][i] = key <= row && key < s.T ? score[n][i] * s.scale : -INFINITY;
                tile_max[i / 2] = fmaxf(tile_max[i / 2], score[n][i]);
            }
    }
    float rescale[2];
    for (int r = 0; r < 2; r++) {  // every row sees key first_key, so the new maximum is finite
        float m_new = fmaxf(m[r], quad_max(tile_max[r]));
        rescale[r] = fast_exp(m[r] - m_new), l[r] *= rescale[r], m[r] = m_new;
    }
    for (int n = 0; n < HS / 8; n++)
        for (int i = 0; i < 4; i++) o[n][i] *= rescale[i / 2];
    for (int c = 0; c < 4; c++) {
        if (c >= chunks) break;
        for (int j = 2 * c; j < 2 * c + 2; j++)
            for (int i = 0; i < 4; i++) {
                float p = score[j][i] == -INFINITY ? 0 : fast_exp(score[j][i] - m[i / 2]);
                score[j][i] = p, l[i / 2] += p;  // this lane's part of the row sum
            }
        uint32_t p_fragment[4];
        a_from_accumulators(p_fragment, score[2 * c], score[2 * c + 1]);
        accumulate_times_columns<HS>(o, p_fragment, values, 16 * c);
    }
}

// (At least 1 block per SM: without it ptxas holds the kernel to 168 registers at heads of 128 and
// spills on sm_80; it takes under 185, and shared memory fits only two blocks per SM either way.)
template <int HS>
__global__ void __launch_bounds__(tc_threads, 1)
    tc_attention_forward_kernel(floatX* out, real* lse, const floatX* q, const floatX* k,
                                const floatX* v, FlashShape s) {
    TcBlock at = tc_block(s, true);
    int b = at.b, h = at.h, diagonal = at.block;
    int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    int row0 = diagonal * tc_rows + 16 * warp;  // the warp's rows
    uint32_t query[HS / 16][4];
    load_a_fragments<HS>(query, q, s.ld_qk, s, b, h, row0);
    float o[HS / 8][4] = {}, m[2] = {-INFINITY, -INFINITY}, l[2] = {0, 0};
    tc_pipeline(  // key tiles up to the diagonal
        diagonal + 1,
        [&](int i, int stage) {
            start_tile_copy<HS>(tc_tile<HS>(stage, 0), k, s.ld_qk, s, b, h, i * tc_rows);
            start_tile_copy<HS>(tc_tile<HS>(stage, 1), v, 3 * s.C, s, b, h, i * tc_rows);
        },
        [&](int i, int stage) {
            int chunks = i == diagonal ? warp + 1 : 4;  // the diagonal: keys up to row0 + 15
            tc_forward_tile<HS>(o, m, l, query, tc_tile<HS>(stage, 0), tc_tile<HS>(stage, 1),
                                i * tc_rows, chunks, row0, s);
        });
    for (int r = 0; r < 2; r++) {
        float total = quad_sum(l[r]);  // (all lanes: the shuffle needs the whole warp)
        int row = row0 + g + 8 * r;
        if (row >= s.T) continue;
        floatX* to = out + (long(b) * s.T + row) * s.C + h * HS + 2 * t;
        for (int n = 0; n < HS / 8; n++)
            to[8 * n] = o[n][2 * r] / total, to[8 * n + 1] = o[n][2 * r + 1] / total;
        if (t == 0) lse[(long(b) * s.NH + h) * s.T + row] = m[r] + logf(total);
    }
}

// D = dout . out and lse of the lane's two rows (zero past T).
__device__ inline void row_statistics(float (&lse_rows)[2], float (&D_rows)[2], const real* lse,
                                      const real* D, const FlashShape& s, int b, int h, int row0) {
    for (int r = 0; r < 2; r++) {
        int row = row0 + threadIdx.x % 32 / 4 + 8 * r;
        long at = (long(b) * s.NH + h) * s.T + row;
        lse_rows[r] = row < s.T ? lse[at] : 0, D_rows[r] = row < s.T ? D[at] : 0;
    }
}

// Writes (or adds, when `accumulate`) this lane's part of 16 rows of a head gradient, times
// `scale`.
template <int HS>
__device__ inline void store_rows(floatX* x, int ld, bool accumulate,
                                  const float (&grad)[HS / 8][4], real scale, const FlashShape& s,
                                  int b, int h, int row0) {
    int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    for (int r = 0; r < 2; r++) {
        int row = row0 + g + 8 * r;
        if (row >= s.T) continue;
        floatX* to = x + (long(b) * s.T + row) * ld + h * HS + 2 * t;
        for (int n = 0; n < HS / 8; n++)
            for (int e = 0; e < 2; e++)
                to[8 * n + e] = (accumulate ? real(to[8 * n + e]) : 0) + grad[n][2 * r + e] * scale;
    }
}

// Both backward passes need, for a 16 x 16 chunk, the scores and their gradients before softmax,
// each a product acc += A rows^T of A fragments in the warp's registers and the 16 rows from 16c of
// a shared tile (dq: S = Q K^T and dP = dO V^T; dk/dv: their transposes).
template <int HS, typename Words>
__device__ inline void add_times_rows(float (&acc)[2][4], const uint32_t (&a)[HS / 16][4],
                                      Words rows, int c) {
    for (int kk = 0; kk < HS / 16; kk++) {
        uint32_t bf[2][2];
        b_pair_from_rows<HS>(bf, rows, 16 * c, 16 * kk);
        mma_bf16_16x8x16(acc[0], a[kk], bf[0]);
        mma_bf16_16x8x16(acc[1], a[kk], bf[1]);
    }
}

// dq for 64 queries per block, over the key tiles up to the diagonal, 16 keys at a time.
template <int HS>
__global__ void __launch_bounds__(tc_threads)
    tc_attention_dq_kernel(floatX* dq, int ld_dq, bool accumulate, const floatX* dout,
                           const real* lse, const real* D, const floatX* q, const floatX* k,
                           const floatX* v, FlashShape s) {
    TcBlock at = tc_block(s, true);
    int b = at.b, h = at.h, diagonal = at.block;
    int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    int row0 = diagonal * tc_rows + 16 * warp;
    uint32_t query[HS / 16][4], dy[HS / 16][4];
    load_a_fragments<HS>(query, q, s.ld_qk, s, b, h, row0);
    load_a_fragments<HS>(dy, dout, s.C, s, b, h, row0);
    float lse_rows[2], D_rows[2], grad[HS / 8][4] = {};
    row_statistics(lse_rows, D_rows, lse, D, s, b, h, row0);
    tc_pipeline(
        diagonal + 1,
        [&](int i, int stage) {
            start_tile_copy<HS>(tc_tile<HS>(stage, 0), k, s.ld_qk, s, b, h, i * tc_rows);
            start_tile_copy<HS>(tc_tile<HS>(stage, 1), v, 3 * s.C, s, b, h, i * tc_rows);
        },
        [&](int i, int stage) {
            auto keys = tc_tile<HS>(stage, 0), values = tc_tile<HS>(stage, 1);
            int chunks = i == diagonal ? warp + 1 : 4;
            for (int c = 0; c < chunks; c++) {
                float score[2][4] = {}, dp[2][4] = {};  // S and dP of 16 queries x 16 keys
                add_times_rows<HS>(score, query, keys, c);
                add_times_rows<HS>(dp, dy, values, c);
                for (int j = 0; j < 2; j++)
                    for (int e = 0; e < 4; e++) {
                        int row = row0 + g + 8 * (e / 2),
                            key = i * tc_rows + 16 * c + 8 * j + 2 * t + e % 2;
                        float p = key <= row && key < s.T
                                      ? fast_exp(score[j][e] * s.scale - lse_rows[e / 2])
                                      : 0;
                        score[j][e] = p * (dp[j][e] - D_rows[e / 2]);  // dS
                    }
                uint32_t ds[4];
                a_from_accumulators(ds, score[0], score[1]);
                accumulate_times_columns<HS>(grad, ds, keys, 16 * c);
            }
        });
    store_rows<HS>(dq, ld_dq, accumulate, grad, s.scale, s, b, h, row0);
}

// What a dk/dv kernel computes. At heads of 64 one kernel makes both. At heads of 128, dK and dV
// (128 floats a lane) with the K and V fragments (64 registers) leave too few of the 255 registers
// for the rest, so two kernels split the work: the dV one recomputes S^T, and the dK one makes five
// products a chunk where one kernel made four, with no spills.
enum class KeyGrads { both, values, keys };
template <int HS>
constexpr bool split_key_grads = HS > 64;

// One 16-query chunk of the dk/dv pass for one warp (16 keys): S^T, dP^T, then dV += P^T dO and
// dK += dS^T Q (unscaled), or what `part` of that needs. stats holds the tile's lse values, then
// its D values.
template <int HS, KeyGrads part, typename Words, typename Stats>
__device__ inline void tc_dkdv_chunk(float (&grad_k)[HS / 8][4], float (&grad_v)[HS / 8][4],
                                     const uint32_t (&key)[HS / 16][4],
                                     const uint32_t (&value)[HS / 16][4], Words queries, Words dys,
                                     Stats stats, int first_query, int c, int key0,
                                     const FlashShape& s) {
    constexpr bool keys = part != KeyGrads::values, values = part != KeyGrads::keys;
    int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    float score[2][4] = {}, dp[2][4] = {};  // S^T and dP^T of 16 keys x 16 queries
    add_times_rows<HS>(score, key, queries, c);
    if constexpr (keys) add_times_rows<HS>(dp, value, dys, c);
    for (int j = 0; j < 2; j++)
        for (int i = 0; i < 4; i++) {
            int column = 16 * c + 8 * j + 2 * t + i % 2, query = first_query + column;
            int key_row = key0 + g + 8 * (i / 2);
            float p = query >= key_row && query < s.T
                          ? fast_exp(score[j][i] * s.scale - stats[column])
                          : 0;
            score[j][i] = p;
            if constexpr (keys) dp[j][i] = p * (dp[j][i] - stats[tc_rows + column]);
        }
    uint32_t fragment[4];
    if constexpr (values) {
        a_from_accumulators(fragment, score[0], score[1]);  // P^T
        accumulate_times_columns<HS>(grad_v, fragment, dys, 16 * c);
    }
    if constexpr (keys) {
        a_from_accumulators(fragment, dp[0], dp[1]);  // dS^T
        accumulate_times_columns<HS>(grad_k, fragment, queries, 16 * c);
    }
}

// The dk/dv kernel's lse and D values of one query tile (2 * tc_rows reals) in `stage`, after the
// four tiles.
template <int HS>
__device__ inline auto tc_stats(int stage) {
    return shared_memory<real>(4 * tc_tile_bytes<HS> + stage * 2 * tc_rows * sizeof(real));
}

// dk and dv (or one of them: `part`) for 64 keys per block, over the query tiles from the diagonal
// on.
template <int HS, KeyGrads part>
__global__ void __launch_bounds__(tc_threads)
    tc_attention_dkdv_kernel(floatX* dk, int ld_dk, bool accumulate, floatX* dv, bool accumulate_v,
                             const floatX* dout, const real* lse, const real* D, const floatX* q,
                             const floatX* k, const floatX* v, FlashShape s) {
    TcBlock at = tc_block(s, false);  // the first key block reads every query tile
    int b = at.b, h = at.h, warp = threadIdx.x / 32;
    int first = at.block * tc_rows, key0 = first + 16 * warp;  // the warp's keys
    uint32_t key[HS / 16][4], value[HS / 16][4];
    load_a_fragments<HS>(key, k, s.ld_qk, s, b, h, key0);
    if constexpr (part != KeyGrads::values) load_a_fragments<HS>(value, v, 3 * s.C, s, b, h, key0);
    float grad_k[HS / 8][4] = {}, grad_v[HS / 8][4] = {};
    tc_pipeline(
        (s.T - first + tc_rows - 1) / tc_rows,
        [&](int i, int stage) {
            int first_query = first + i * tc_rows;
            start_tile_copy<HS>(tc_tile<HS>(stage, 0), q, s.ld_qk, s, b, h, first_query);
            start_tile_copy<HS>(tc_tile<HS>(stage, 1), dout, s.C, s, b, h, first_query);
            auto stats = tc_stats<HS>(stage);  // plain stores: the barrier before use shows them
            for (int j = threadIdx.x; j < tc_rows; j += blockDim.x) {
                int row = first_query + j;
                long at = (long(b) * s.NH + h) * s.T + row;
                stats[j] = row < s.T ? lse[at] : 0, stats[tc_rows + j] = row < s.T ? D[at] : 0;
            }
        },
        [&](int i, int stage) {
            // the diagonal tile: queries before key0 see none of the warp's keys
            for (int c = i == 0 ? warp : 0; c < 4; c++)
                tc_dkdv_chunk<HS, part>(grad_k, grad_v, key, value, tc_tile<HS>(stage, 0),
                                        tc_tile<HS>(stage, 1), tc_stats<HS>(stage),
                                        first + i * tc_rows, c, key0, s);
        });
    if constexpr (part != KeyGrads::values)
        store_rows<HS>(dk, ld_dk, accumulate, grad_k, s.scale, s, b, h, key0);
    if constexpr (part != KeyGrads::keys)
        store_rows<HS>(dv, 3 * s.C, accumulate_v, grad_v, 1, s, b, h, key0);
}

// The tensor-core kernels take a flash attention when the build stores bfloat16 (floatX is 2
// bytes), the head size is one of tensor_core_head_sizes (the ones tests/mixed_precision.cu checks
// them at under the emulator, in both launch shapes) and there is no attention dropout.
static bool tensor_core_attention(int hs, real dropout_p) {
    return sizeof(floatX) == 2 && is_tensor_core_head_size(hs) && dropout_p == 0;
}

// Calls f(std::integral_constant<int, HS>()) for the head size, one of tensor_core_head_sizes;
// nothing in the float build, which has no tensor-core kernels.
template <typename F>
static void with_tc_head_size(int hs, F f) {
    if constexpr (sizeof(floatX) == 2) {
        static_assert(sizeof tensor_core_head_sizes / sizeof(int) == 2 &&
                          tensor_core_head_sizes[0] == 64 && tensor_core_head_sizes[1] == 128,
                      "with_tc_head_size instantiates the kernels for each checked head size");
        if (hs == 64) f(std::integral_constant<int, 64>());
        else f(std::integral_constant<int, 128>());
    } else {
        (void)hs, (void)f;
    }
}

bool use_flash_attention(int head_size, real dropout_p) {
    if (attention_kernels != AttentionKernels::fastest)
        return attention_kernels == AttentionKernels::flash;
#ifdef __CUDACC__
    return tensor_core_attention(head_size, dropout_p);
#else
    return (void)head_size, (void)dropout_p, false;
#endif
}

static dim3 tc_grid(const FlashShape& s) {  // see tc_block
    return dim3(unsigned(s.B * s.NH) * unsigned(tc_blocks_per_head(s.T)));
}

static void tc_attention_forward(floatX* out, real* lse, const floatX* q, const floatX* k,
                                 const floatX* v, const FlashShape& s) {
    with_tc_head_size(s.C / s.NH, [&](auto hs) {
        constexpr int HS = decltype(hs)::value;
        size_t tiles = 4 * tc_tile_bytes<HS>;  // two stages of two
        allow_shared_memory(tc_attention_forward_kernel<HS>, tiles, HS);
        launch(tc_attention_forward_kernel<HS>, tc_grid(s), tc_threads, tiles, out, lse, q, k, v,
               s);
    });
}

static void tc_attention_backward(floatX* dq, floatX* dk, int ld_grad, bool accumulate_qk,
                                  floatX* dv, bool accumulate_v, const floatX* dout,
                                  const real* lse, const real* D, const floatX* q, const floatX* k,
                                  const floatX* v, const FlashShape& s) {
    with_tc_head_size(s.C / s.NH, [&](auto hs) {
        constexpr int HS = decltype(hs)::value;
        size_t tiles = 4 * tc_tile_bytes<HS>, stats = 2 * 2 * tc_rows * sizeof(real);
        allow_shared_memory(tc_attention_dq_kernel<HS>, tiles, HS);
        launch(tc_attention_dq_kernel<HS>, tc_grid(s), tc_threads, tiles, dq, ld_grad,
               accumulate_qk, dout, lse, D, q, k, v, s);
        auto key_grads = [&](auto kernel) {
            allow_shared_memory(kernel, tiles + stats, HS);
            launch(kernel, tc_grid(s), tc_threads, tiles + stats, dk, ld_grad, accumulate_qk, dv,
                   accumulate_v, dout, lse, D, q, k, v, s);
        };
        if constexpr (split_key_grads<HS>) {
            key_grads(tc_attention_dkdv_kernel<HS, KeyGrads::values>);
            key_grads(tc_attention_dkdv_kernel<HS, KeyGrads::keys>);
        } else {
            key_grads(tc_attention_dkdv_kernel<HS, KeyGrads::both>);
        }
    });
}

void flash_attention_forward(floatX* out, AttentionSaved saved, const floatX* qkv, int B, int T,
                             int C, int NH, bool rotary, real dropout_p, uint64_t seed) {
    int hs = C / NH;
    auto [q, k, ld] = rotate_queries_keys(saved, qkv, B, T, C, NH, rotary);
    FlashShape s = flash_shape(B, T, C, NH, rotary, dropout_p, seed);
    if (tensor_core_attention(hs, dropout_p))
        return tc_attention_forward(out, saved.lse, q, k, qkv + 2 * C, s);
    with_values_per_thread(
        hs,
        [&](auto per_thread) {
            auto kernel = flash_attention_forward_kernel<decltype(per_thread)::value>;
            size_t shared = 2 * flash_tile * hs * sizeof(real);
            allow_shared_memory(kernel, shared, hs);
            launch(kernel, flash_grid(s), row_block(), shared, out, saved.lse, q, k, qkv + 2 * C,
                   s);
        },
        FlashSizes());
}

void flash_attention_backward(floatX* dqkv, const floatX* dout, const floatX* out,
                              AttentionSaved saved, AttentionScratch scratch, const floatX* qkv,
                              int B, int T, int C, int NH, bool rotary, real dropout_p,
                              uint64_t seed, InputGrad mode) {
    int hs = C / NH;
    auto [q, k, ld] = queries_keys(saved, qkv, C, rotary);
    auto [dq, dk, ld_grad] = query_key_grads(dqkv, scratch, C, rotary);
    const floatX* v = qkv + 2 * C;
    FlashShape s = flash_shape(B, T, C, NH, rotary, dropout_p, seed);
    launch(attention_row_dot_kernel, row_grid(long(B) * NH * T), row_block(), 0, scratch.D, dout,
           out, s);
    bool accumulate = mode == InputGrad::add;
    if (tensor_core_attention(hs, dropout_p))
        tc_attention_backward(dq, dk, ld_grad, accumulate && !rotary, dqkv + 2 * C, accumulate,
                              dout, saved.lse, scratch.D, q, k, v, s);
    else
        with_values_per_thread(
            hs,
            [&](auto per_thread) {
                constexpr int n = decltype(per_thread)::value;
                size_t tiles = 2 * flash_tile * hs * sizeof(real),
                       stats = 2 * flash_tile * sizeof(real);
                allow_shared_memory(flash_attention_dq_kernel<n>, tiles, hs);
                allow_shared_memory(flash_attention_dkdv_kernel<n>, tiles + stats, hs);
                launch(flash_attention_dq_kernel<n>, flash_grid(s), row_block(), tiles, dq, ld_grad,
                       accumulate && !rotary, dout, saved.lse, scratch.D, q, k, v, s);
                launch(flash_attention_dkdv_kernel<n>, flash_grid(s), row_block(), tiles + stats,
                       dk, ld_grad, accumulate && !rotary, dqkv + 2 * C, accumulate, dout,
                       saved.lse, scratch.D, q, k, v, s);
            },
            FlashSizes());
    if (rotary) rotary_gradients_back(dqkv, scratch, B, T, C, NH, mode);
}

Tensor attention(Tensor qkv, int heads, bool rotary, real dropout_p, uint64_t seed) {
    if (qkv.ndim != 3 || qkv.dim(-1) % (3 * heads) || (rotary && (qkv.dim(-1) / 3 / heads) % 2))
        fail(
            "attention: qkv %s must be (B, T, 3C) with C divisible by %d heads (and an even head "
            "size for rotary)",
            shape_string(qkv).c_str(), heads);
    int B = qkv.shape[0], T = qkv.shape[1], C = qkv.shape[2] / 3;
    Tensor like = qkv;
    like.shape[2] = C;
    Tensor out = new_result(like, {qkv});
    long n = long(B) * T * C, att_size = long(B) * heads * T * T;
    bool flash = use_flash_attention(C / heads, dropout_p);
    AttentionSaved saved{rotary ? device_alloc<floatX>(n) : nullptr,
                         rotary ? device_alloc<floatX>(n) : nullptr,
                         flash ? nullptr : device_alloc<floatX>(att_size),
                         !flash && dropout_p > 0 ? device_alloc<floatX>(att_size) : nullptr,
                         flash ? device_alloc<real>(long(B) * heads * T) : nullptr};
    if (flash)
        flash_attention_forward(out.data, saved, qkv.data, B, T, C, heads, rotary, dropout_p, seed);
    else attention_forward(out.data, saved, qkv.data, B, T, C, heads, rotary, dropout_p, seed);
    if (out.grad)
        record({out}, {qkv}, [=] {
            AttentionScratch scratch = attention_scratch(B, T, C, heads, rotary, dropout_p, flash);
            if (flash)
                flash_attention_backward(qkv.grad, out.grad, out.data, saved, scratch, qkv.data, B,
                                         T, C, heads, rotary, dropout_p, seed, InputGrad::add);
            else
                attention_backward(qkv.grad, out.grad, saved, scratch, qkv.data, B, T, C, heads,
                                   rotary, dropout_p, seed, InputGrad::add);
        });
    return out;
}

MultiHeadAttention multi_head_attention_layer(Parameters* p, int dim, int heads, uint64_t seed) {
    if (heads < 1 || dim % heads)
        fail("multi_head_attention_layer: dim %d is not divisible by %d heads", dim, heads);
    return MultiHeadAttention{linear_layer(p, dim, 3 * dim, random_bits(seed, 0)),
                              linear_layer(p, dim, dim, random_bits(seed, 1)), heads};
}

Tensor multi_head_attention(Tensor x, const MultiHeadAttention& layer) {
    return linear(attention(linear(x, layer.qkv), layer.heads, false, 0, 0), layer.proj);
}

// ====================================================================================================
// 9. Losses
// Softmax + cross-entropy over the vocabulary: logits (N, V), targets (N) -> the mean loss over
// rows whose target is not ignore_index:  loss_n = logsumexp(logits_n) - logits_n[target_n].
// Backward: dlogits_n = (softmax(logits_n) - onehot(target_n)) * dloss / count, 0 for ignored rows.
// The classifier computes both in one kernel and writes the gradient over the logits: on the CPU,
// and for rows too long to hold, three passes over the (N, V) logits in all (a read for logsumexp,
// a read and a write for the gradient); on a GPU a block holds its row in registers, and two passes
// (a read, a write) remain. The tape version saves logsumexp per row and its backward recomputes
// the softmax from it.

// The positions whose target counts (is not ignore_index), added up by one row group.
__global__ void count_targets_kernel(real* count, const int* targets, long N) {
    real total = 0;
    for (long n = threadIdx.x; n < N; n += blockDim.x) total += targets[n] != ignore_index;
    total = group_sum(total);
    if (threadIdx.x == 0) count[0] = total;
}

// A row per position: loss_n, logsumexp_n when asked, and with write_gradient the gradient written
// over the logits, (softmax - onehot(target)) * scale / count: the forward and backward fused
// (llm.c's classifier), so no (N, V) gradient buffer is zeroed, written and read again. A target
// outside the vocabulary makes the loss NaN, which training reports, rather than a wild read.
__global__ void classifier_kernel(floatX* logits, real* losses, real* logsumexp, const int* targets,
                                  const real* count, real scale, long N, int V, int padded_V,
                                  bool write_gradient) {
    bool active;
    long row = group_row(N, &active);
    floatX* l = logits + row * padded_V;
    int target = targets[row];
    bool counted = target != ignore_index, valid = target >= 0 && target < V;
    real target_logit =
        valid ? real(l[target]) : 0;  // read before any thread of the group overwrites it
    real lse = group_logsumexp(row_largest_and_sum(V, [&](int v) { return l[v]; }));
    if (!active) return;
    if (write_gradient) {
        real factor = counted ? scale / count[0] : 0;
        for_each_in_row(
            V, [&](int v) { l[v] = (fast_exp(l[v] - lse) - (v == target ? 1 : 0)) * factor; });
        for_each_in_row(padded_V - V, [&](int v) { l[V + v] = 0; });  // padding: no gradient
    }
    if (threadIdx.x != 0) return;
    if (logsumexp) logsumexp[row] = lse;
    losses[row] = !counted ? 0 : valid ? lse - target_logit : NAN;
}

// The same on a GPU for a long row (GPT-2's vocabulary: 100 KB of bfloat16 logits), read once. A
// warp per row would read its row again from device memory: an SM's 64 warps read 6 MB of other
// rows between a row's two reads, and an A100's 108 SMs share 40 MB of L2. So a long row gets a
// block of 1024 threads, which hold it in registers: each thread loads its 32-bit words (two
// bfloat16 or one float) once, then the logsumexp and the gradient come from the registers, and
// the logits are read once and written once. 32 registers of logits a thread fit the 64 a thread of
// a 1024-thread block may use (nvcc keeps a word of two bfloat16 in one register; the block's size
// a constant, the words' addresses are offsets from one register): rows of up to 65,536 bfloat16
// logits, 32,768 floats, 16,384 doubles (a double takes two registers, so 16 a thread). Rows
// shorter than the block (whose second read comes from cache), longer than it can hold, or not
// whole words, and the CPU (a lone thread, its row in its cache), take classifier_kernel.
constexpr int logits_per_word = sizeof(floatX) < 4 ? 4 / sizeof(floatX) : 1;
typedef Pack<floatX, logits_per_word> LogitWord;
constexpr int held_threads = 1024, held_words = 32 * 4 / int(sizeof(LogitWord));

static bool classifier_holds_rows(int padded_V) {
    int words = padded_V / logits_per_word;
    return gpu_launch_shapes && padded_V % logits_per_word == 0 && words >= held_threads &&
           words <= held_threads * held_words;
}

__global__ void __launch_bounds__(held_threads)
    classifier_held_kernel(floatX* logits, real* losses, const int* targets, const real* count,
                           real scale, int V, int padded_V) {
    long row = blockIdx.x;
    floatX* l = logits + row * padded_V;
    LogitWord* words = reinterpret_cast<LogitWord*>(l);
    int word_count = padded_V / logits_per_word, target = targets[row];
    bool counted = target != ignore_index, valid = target >= 0 && target < V;
    // Thread 0 writes the loss: it reads the target's logit before the barriers, the writes after.
    real target_logit = threadIdx.x == 0 && valid ? real(l[target]) : 0;
    LogitWord held[held_words];  // this thread's words: threadIdx.x, + held_threads, ...
    for (int k = 0; k < held_words; k++) {
        int word = threadIdx.x + k * held_threads;
        if (word < word_count) held[k] = words[word];
    }
    // Calls body(logit, v) for each of this thread's logits in the vocabulary (v < V). The loops'
    // counts are constants, which nvcc unrolls: held[] is indexed by constants and stays in
    // registers (ptxas reports no stack frame for the kernel).
    auto each_held = [&](auto body) {
        for (int k = 0; k < held_words; k++)
            for (int j = 0; j < logits_per_word; j++) {
                int v = (threadIdx.x + k * held_threads) * logits_per_word + j;
                if (v < V) body(held[k].v[j], v);
            }
    };
    real largest = -INFINITY, sum = 0;
    each_held([&](real logit, int) { largest = fmax(largest, logit); });
    largest = block_reduce(largest, -INFINITY, [](real a, real b) { return fmax(a, b); });
    for (LogitWord& word : held) keep_packed(word);
    each_held([&](real logit, int) { sum += fast_exp(logit - largest); });
    real lse = largest + log(block_reduce(sum, 0, [](real a, real b) { return a + b; }));
    for (LogitWord& word : held) keep_packed(word);
    real factor = counted ? scale / count[0] : 0;
    for (int k = 0; k < held_words; k++) {
        int word = threadIdx.x + k * held_threads;
        if (word >= word_count) continue;
        LogitWord gradient;
        for (int j = 0; j < logits_per_word; j++) {
            int v = word * logits_per_word + j;  // the padding (v >= V) gets no gradient
            gradient.v[j] =
                v < V ? (fast_exp(held[k].v[j] - lse) - (v == target ? 1 : 0)) * factor : 0;
        }
        words[word] = gradient;
    }
    if (threadIdx.x == 0) losses[row] = !counted ? 0 : valid ? lse - target_logit : NAN;
}

// The mean over the counted positions (ignored ones have loss 0), in a fixed order. It stays in
// `real` (float even when tensors are bfloat16: a loss rounded to 8 bits would log as 5.5625 and
// blur the choice of the best checkpoint); `stored` gets a copy as a tensor when not null.
__global__ void mean_loss_kernel(real* loss, floatX* stored, const real* count, const real* losses,
                                 long N) {
    real total =
        group_sum(sum_strided(0, N, threadIdx.x, blockDim.x, [&](long n) { return losses[n]; }));
    if (threadIdx.x != 0) return;
    loss[0] = count[0] > 0 ? total / count[0] : 0;
    if (stored) stored[0] = loss[0];
}

__global__ void cross_entropy_backward_kernel(floatX* dlogits, const floatX* dloss,
                                              const real* count, const floatX* logits,
                                              const real* logsumexp, const int* targets, long N,
                                              int V, int padded_V) {
    bool active;
    long row = group_row(N, &active);
    if (!active || targets[row] < 0 || targets[row] >= V) return;
    real scale = dloss[0] / count[0], lse = logsumexp[row];
    int target = targets[row];
    const floatX* l = logits + row * padded_V;
    floatX* d = dlogits + row * padded_V;
    for_each_in_row(V,
                    [&](int v) { d[v] += (fast_exp(l[v] - lse) - (v == target ? 1 : 0)) * scale; });
}

void classifier(floatX* logits, real* losses, real* loss, real* count, const int* targets, long N,
                int V, int padded_V, real loss_scale, bool write_gradient) {
    launch(count_targets_kernel, 1, dim3(threads_per_row), 0, count, targets, N);
    if (write_gradient && classifier_holds_rows(padded_V)) {
        launch(classifier_held_kernel, unsigned(N), held_threads, 32 * sizeof(real), logits, losses,
               targets, count, loss_scale, V, padded_V);
    } else {
        launch(classifier_kernel, row_grid(N), row_block(), 0, logits, losses, nullptr, targets,
               count, loss_scale, N, V, padded_V, write_gradient);
    }
    launch(mean_loss_kernel, 1, dim3(threads_per_row), 0, loss, nullptr, count, losses, N);
}

Tensor cross_entropy(Tensor logits, const int* targets, int classes) {
    int padded_V = logits.dim(-1), V = classes > 0 ? classes : padded_V;
    long N = logits.size() / padded_V;
    if (V > padded_V)
        fail("cross_entropy: %d classes, but the logits %s have only %d columns", V,
             shape_string(logits).c_str(), padded_V);
    Tensor out = new_result(Tensor{}, {logits});
    real *loss = device_alloc<real>(1), *count = device_alloc<real>(1);
    real *losses = device_alloc<real>(N), *logsumexp = device_alloc<real>(N);
    launch(count_targets_kernel, 1, dim3(threads_per_row), 0, count, targets, N);
    launch(classifier_kernel, row_grid(N), row_block(), 0, logits.data, losses, logsumexp, targets,
           count, real(0), N, V, padded_V, false);
    launch(mean_loss_kernel, 1, dim3(threads_per_row), 0, loss, out.data, count, losses, N);
    if (out.grad)
        record({out}, {logits}, [=] {
            launch(cross_entropy_backward_kernel, row_grid(N), row_block(), 0, logits.grad,
                   out.grad, count, logits.data, logsumexp, targets, N, V, padded_V);
        });
    return out;
}

// Mean squared error: loss = mean((a - b)^2).  Backward: da += 2 (a - b) / n * dloss,  db -= the
// same.

__global__ void mse_forward_kernel(floatX* loss, const floatX* a, const floatX* b, long n) {
    real total = 0;
    for (long i = threadIdx.x; i < n; i += blockDim.x) total += (a[i] - b[i]) * (a[i] - b[i]);
    total = group_sum(total);
    if (threadIdx.x == 0) loss[0] = total / n;
}

__global__ void mse_backward_kernel(floatX* da, floatX* db, const floatX* dloss, const floatX* a,
                                    const floatX* b, long n) {
    for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += long(gridDim.x) * blockDim.x) {
        real g = 2 * (a[i] - b[i]) / n * dloss[0];
        if (da) da[i] += g;
        if (db) db[i] -= g;
    }
}

void mse_forward(floatX* loss, const floatX* a, const floatX* b, long n) {
    launch(mse_forward_kernel, 1, dim3(threads_per_row), 0, loss, a, b, n);
}
void mse_backward(floatX* da, floatX* db, const floatX* dloss, const floatX* a, const floatX* b,
                  long n) {
    launch(mse_backward_kernel, grid_size(n, 256), 256, 0, da, db, dloss, a, b, n);
}

Tensor mse(Tensor a, Tensor b) {
    if (a.size() != b.size())
        fail("mse: shapes %s and %s differ", shape_string(a).c_str(), shape_string(b).c_str());
    Tensor out = new_result(Tensor{}, {a, b});
    long n = a.size();
    mse_forward(out.data, a.data, b.data, n);
    if (out.grad)
        record({out}, {a, b}, [=] { mse_backward(a.grad, b.grad, out.grad, a.data, b.data, n); });
    return out;
}

__global__ void add_loss_kernel(real* sum, const real* loss, real scale) {
    sum[0] += scale * loss[0];
}

void add_loss(real* sum, const real* loss, real scale) {
    launch(add_loss_kernel, 1, 1, 0, sum, loss, scale);
}

// ====================================================================================================
// 10. The GPT

GPTConfig gpt_preset(const std::string& name) {
    GPTConfig c;
    if (name == "debug") {
        c.vocab_size = 257, c.context = 32, c.dim = 32, c.layers = 2, c.heads = 2;
    } else if (name == "mini") {  // CPU-sized: trains on tinyshakespeare in minutes on two cores
        c.vocab_size = 1024, c.context = 128, c.dim = 128, c.layers = 4, c.heads = 4;
    } else if (name == "shakespeare") {
        c.vocab_size = 1024, c.context = 256, c.dim = 384, c.layers = 6, c.heads = 6,
        c.dropout = 0.2f;
    } else if (name == "smol") {
        c.vocab_size = 50257, c.context = 1024, c.dim = 768, c.layers = 12, c.heads = 12;
    } else {
        fail("unknown preset '%s' (expected debug, mini, shakespeare or smol)", name.c_str());
    }
    return c;
}

void gpt_check_config(const GPTConfig& c) {
    auto within = [](int value, int max) { return value >= 1 && value <= max; };
    if (!within(c.vocab_size, 1 << 24) || !within(c.context, 1 << 17) || !within(c.dim, 1 << 16) ||
        !within(c.layers, 1024) || !within(c.heads, c.dim) || !within(c.mlp_ratio, 64))
        fail(
            "model config: vocab size %d, context %d, dim %d, layers %d, heads %d, MLP ratio %d: "
            "each must be "
            "from 1 to 2^24, 2^17, 2^16, 1024, dim and 64",
            c.vocab_size, c.context, c.dim, c.layers, c.heads, c.mlp_ratio);
    if (c.dim % c.heads) fail("model config: dim %d is not divisible by %d heads", c.dim, c.heads);
    if (c.rotary && (c.dim / c.heads) % 2)
        fail("model config: rotary embedding needs an even head size, got %d", c.dim / c.heads);
    if (!(c.dropout >= 0 && c.dropout < 1) ||
        !(c.attention_dropout >= 0 && c.attention_dropout < 1))
        fail("model config: dropout must be in [0, 1)");
}

// Every parameter of the model, in the canonical order, with its shape, whether AdamW decays it,
// and its initialisation. This one table lays out the parameter buffer, initialises it and names
// the tensors in weight files.
struct Parameter {
    std::string name;
    Tensor* tensor;
    std::vector<int> shape;
    bool decay;
    float init_std;  // > 0: normal(0, init_std); 0: zeros; -1: ones
};

static std::vector<Parameter> parameter_table(GPT& model) {
    const GPTConfig& c = model.config;
    int C = c.dim, hidden = c.mlp_ratio * c.dim,
        fc_out = c.activation == Activation::swiglu ? 2 * hidden : hidden;
    float std = 0.02f,
          residual_std =
              0.02f / std::sqrt(2.0f * c.layers);  // GPT-2: residual projections scaled down
    bool layernorm = c.norm == Norm::layernorm;
    std::vector<Parameter> table;
    int V = padded_vocab(c.vocab_size);
    table.push_back({"wte", &model.wte, {V, C}, true, std});
    if (!c.rotary) table.push_back({"wpe", &model.wpe, {c.context, C}, false, std});
    model.layers.resize(c.layers);
    for (int l = 0; l < c.layers; l++) {
        GPTLayer& L = model.layers[l];
        std::string p = "layer" + std::to_string(l) + ".";
        table.push_back({p + "norm1.weight", &L.norm1_weight, {C}, false, -1});
        if (layernorm) table.push_back({p + "norm1.bias", &L.norm1_bias, {C}, false, 0});
        table.push_back({p + "attn.qkv.weight", &L.qkv_weight, {3 * C, C}, true, std});
        table.push_back({p + "attn.qkv.bias", &L.qkv_bias, {3 * C}, false, 0});
        table.push_back({p + "attn.proj.weight", &L.attn_proj_weight, {C, C}, true, residual_std});
        table.push_back({p + "attn.proj.bias", &L.attn_proj_bias, {C}, false, 0});
        table.push_back({p + "norm2.weight", &L.norm2_weight, {C}, false, -1});
        if (layernorm) table.push_back({p + "norm2.bias", &L.norm2_bias, {C}, false, 0});
        table.push_back({p + "mlp.fc.weight", &L.fc_weight, {fc_out, C}, true, std});
        table.push_back({p + "mlp.fc.bias", &L.fc_bias, {fc_out}, false, 0});
        table.push_back(
            {p + "mlp.proj.weight", &L.mlp_proj_weight, {C, hidden}, true, residual_std});
        table.push_back({p + "mlp.proj.bias", &L.mlp_proj_bias, {C}, false, 0});
    }
    table.push_back({"final_norm.weight", &model.final_norm_weight, {C}, false, -1});
    if (layernorm) table.push_back({"final_norm.bias", &model.final_norm_bias, {C}, false, 0});
    if (!c.tied_embeddings) table.push_back({"lm_head", &model.lm_head, {V, C}, true, std});
    return table;
}

static long shape_size(const std::vector<int>& shape) {
    long size = 1;
    for (int d : shape) size *= d;
    return size;
}

int padded_vocab(int vocab_size) { return (vocab_size + 127) / 128 * 128; }

std::vector<GPTParameter> gpt_parameter_layout(const GPTConfig& config) {
    GPT shapes_only;  // parameter_table needs a GPT to point into; nothing is allocated
    shapes_only.config = config;
    std::vector<GPTParameter> layout;
    for (bool decayed : {true, false})
        for (const Parameter& p : parameter_table(shapes_only)) {
            if (p.decay != decayed) continue;
            std::vector<int> in_file = p.shape;
            if (p.tensor == &shapes_only.wte || p.tensor == &shapes_only.lm_head)
                in_file[0] = config.vocab_size;
            layout.push_back({p.name, in_file, p.decay, p.init_std, shape_size(p.shape)});
        }
    return layout;
}

long gpt_parameter_count(const GPTConfig& config) {
    long total = 0;
    for (const GPTParameter& p : gpt_parameter_layout(config)) total += shape_size(p.shape);
    return total;
}

// Each parameter's file values are the first ones of its buffer values (padding rows come last).
std::vector<float> gpt_file_order(const GPTConfig& config, const std::vector<real>& buffer) {
    std::vector<float> file;
    const real* from = buffer.data();
    for (const GPTParameter& p : gpt_parameter_layout(config)) {
        file.insert(file.end(), from, from + shape_size(p.shape));
        from += p.buffer_size;
    }
    return file;
}

std::vector<real> gpt_buffer_order(const GPTConfig& config, const std::vector<float>& file) {
    std::vector<real> buffer;
    const float* from = file.data();
    for (const GPTParameter& p : gpt_parameter_layout(config)) {
        long n = shape_size(p.shape);
        buffer.insert(buffer.end(), from, from + n);
        buffer.resize(buffer.size() + p.buffer_size - n, 0);
        from += n;
    }
    return buffer;
}

// One buffer holds all parameters and one all gradients: the decayed ones (weight matrices) first,
// in table order, then the rest. So AdamW and the gradient norm are each one launch over one
// buffer.
void gpt_create(GPT* model, const GPTConfig& config) {
    if (model->params.data) fail("gpt_create: this GPT already holds a model");
    gpt_check_config(config);
    model->config = config;
    std::vector<Parameter> table = parameter_table(*model);
    long total = 0, decayed_total = 0;
    for (const Parameter& p : table) {
        total += shape_size(p.shape);
        if (p.decay) decayed_total += shape_size(p.shape);
    }
    parameters_create(&model->params, total);
    model->params.num_decayed = decayed_total;
    for (bool decayed : {true, false})
        for (Parameter& p : table)
            if (p.decay == decayed)
                *p.tensor = parameter(&model->params, int(p.shape.size()), p.shape.data());
}

void gpt_init(GPT* model, uint64_t seed) {
    std::vector<Parameter> table = parameter_table(*model);
    for (size_t i = 0; i < table.size(); i++) {
        Tensor& t = *table[i].tensor;
        if (table[i].init_std > 0)
            fill_normal(t.data, t.size(), random_bits(seed, i), 0, table[i].init_std);
        else fill(t.data, t.size(), table[i].init_std < 0 ? 1 : 0);
    }
    const GPTConfig& c = model->config;
    long padding = long(padded_vocab(c.vocab_size) - c.vocab_size) * c.dim;
    for (Tensor* t : {&model->wte, &model->lm_head})  // the vocabulary's padding rows: zero
        if (t->data) fill(t->data + t->size() - padding, padding, 0);
    parameters_sync_master(model->params);  // the master copy starts from the (rounded) values
}

std::vector<std::pair<std::string, Tensor>> gpt_named_parameters(GPT& model) {
    std::vector<std::pair<std::string, Tensor>> named;
    for (bool decayed : {true, false})
        for (const Parameter& p : parameter_table(model))
            if (p.decay == decayed) named.push_back({p.name, *p.tensor});
    return named;
}

// tokens (B, T) on the device -> logits (B, T, vocab). A pre-norm transformer:
//   x = embed(tokens);  per layer: x = x + attn(norm1(x)),  x = x + mlp(norm2(x));  logits =
//   head(norm(x))
// Each residual add is fused with the norm that follows it (residual_norm), so h, the normalized
// stream, is always at hand for the next branch. Dropout only when `training`; each dropout call
// draws from its own stream of `seed`.
Tensor gpt_forward_tape(GPT& model, const int* tokens, int B, int T, bool training, uint64_t seed) {
    const GPTConfig& c = model.config;
    if (T > c.context)
        fail("gpt_forward_tape: sequence length %d exceeds the context window %d", T, c.context);
    real p = training ? c.dropout : 0, p_attention = training ? c.attention_dropout : 0;
    uint64_t stream = 0;
    Tensor x =
        dropout(embedding(tokens, B, T, model.wte, model.wpe), p, random_bits(seed, stream++));
    Tensor h = normalization(x, model.layers[0].norm1_weight, model.layers[0].norm1_bias, c.norm);
    for (size_t l = 0; l < model.layers.size(); l++) {
        GPTLayer& L = model.layers[l];
        Tensor branch = attention(linear(h, L.qkv_weight, L.qkv_bias), c.heads, c.rotary,
                                  p_attention, random_bits(seed, stream++));
        branch = dropout(linear(branch, L.attn_proj_weight, L.attn_proj_bias), p,
                         random_bits(seed, stream++));
        ResidualNorm r = residual_norm(x, branch, L.norm2_weight, L.norm2_bias, c.norm);
        branch = c.activation == Activation::swiglu
                     ? swiglu(linear(r.normalized, L.fc_weight, L.fc_bias))
                     : linear_gelu(r.normalized, L.fc_weight, L.fc_bias);
        branch = dropout(linear(branch, L.mlp_proj_weight, L.mlp_proj_bias), p,
                         random_bits(seed, stream++));
        bool last = l + 1 ==
                    model.layers.size();  // the next norm: the next layer's first, or the final one
        r = residual_norm(r.sum, branch,
                          last ? model.final_norm_weight : model.layers[l + 1].norm1_weight,
                          last ? model.final_norm_bias : model.layers[l + 1].norm1_bias, c.norm);
        x = r.sum, h = r.normalized;
    }
    return linear(h, c.tied_embeddings ? model.wte : model.lm_head, Tensor{});  // (B,T,padded V)
}

// ----------------------------------------------------------------------------------------------------
// The GPT written out, llm.c style: gpt_forward calls the layers' forward functions in order on
// activation buffers planned once for a (B, T), and gpt_backward calls their backward functions in
// reverse. The same maths as gpt_forward_tape (the tests check both give the same gradients),
// without the tape: no closures, no tensors made per step, and every activation gradient with a
// single producer is written rather than zeroed and then added to.
//
// Dropout sites draw from streams of the seed in a fixed order (embedding 0; layer l: attention
// 3l + 1, attention projection 3l + 2, MLP 3l + 3), the same streams as the tape version.

// Lays out every buffer of the activations in one allocation: run once with base = null to measure,
// then with the memory.
// `total` also adds the sizes up in double, so that a measure of absurd sizes cannot overflow.
struct BufferCarver {
    char* base;
    size_t bytes = 0;
    double total = 0;
    template <typename T>
    T* take(long count) {
        size_t start = (bytes + 255) / 256 * 256;
        bytes = start + size_t(count) * sizeof(T);
        total += double(count) * sizeof(T) + 256;
        return base ? reinterpret_cast<T*>(base + start) : nullptr;
    }
};

static void carve_activations(GPTActivations& a, const GPTConfig& c, BufferCarver& carve) {
    long N = long(a.B) * a.T, C = c.dim, H = long(c.mlp_ratio) * C,
         F = c.activation == Activation::swiglu ? 2 * H : H;
    long att_size = long(a.B) * c.heads * a.T * a.T;
    bool rotary = c.rotary, dropout = c.dropout > 0, attention_dropout = c.attention_dropout > 0,
         flash = a.flash;
    a.stream.resize(c.layers + 1), a.normalized.resize(c.layers + 1), a.mean.resize(c.layers + 1),
        a.rstd.resize(c.layers + 1);
    a.layers.resize(c.layers);
    for (int l = 0; l <= c.layers; l++) {
        a.stream[l] = carve.take<floatX>(N * C), a.normalized[l] = carve.take<floatX>(N * C);
        a.mean[l] = carve.take<real>(N), a.rstd[l] = carve.take<real>(N);
    }
    for (GPTLayerActivations& s : a.layers) {
        s.qkv = carve.take<floatX>(N * 3 * C), s.attention = carve.take<floatX>(N * C);
        s.saved.q = rotary ? carve.take<floatX>(N * C) : nullptr,
        s.saved.k = rotary ? carve.take<floatX>(N * C) : nullptr;
        s.saved.att = flash ? nullptr : carve.take<floatX>(att_size);
        s.saved.att_dropped = !flash && attention_dropout ? carve.take<floatX>(att_size) : nullptr;
        s.saved.lse = flash ? carve.take<real>(long(a.B) * c.heads * a.T) : nullptr;
        s.residual = carve.take<floatX>(N * C), s.normalized = carve.take<floatX>(N * C);
        s.mean = carve.take<real>(N), s.rstd = carve.take<real>(N);
        s.fc = carve.take<floatX>(N * F), s.activation = carve.take<floatX>(N * H);
    }
    a.logits = carve.take<floatX>(N * padded_vocab(c.vocab_size));
    a.token_groups = token_groups_at(carve.take<int>(3 * N + 1), N);
    a.losses = carve.take<real>(N), a.loss = carve.take<real>(1), a.count = carve.take<real>(1);
    a.branch = carve.take<floatX>(N * C), a.dropped = dropout ? carve.take<floatX>(N * C) : nullptr;
    a.dstream = carve.take<floatX>(N * C), a.dnormalized = carve.take<floatX>(N * C),
    a.dqkv = carve.take<floatX>(N * 3 * C);
    a.dattention = carve.take<floatX>(N * C), a.dfc = carve.take<floatX>(N * F),
    a.dactivation = carve.take<floatX>(N * H);
    a.dbranch = dropout ? carve.take<floatX>(N * C) : nullptr;
    a.scratch.datt = flash ? nullptr : carve.take<floatX>(att_size);
    a.scratch.datt_kept = !flash && attention_dropout ? carve.take<floatX>(att_size) : nullptr;
    a.scratch.D = flash ? carve.take<real>(long(a.B) * c.heads * a.T) : nullptr;
    a.scratch.dq = rotary ? carve.take<floatX>(N * C) : nullptr,
    a.scratch.dk = rotary ? carve.take<floatX>(N * C) : nullptr;
}

// (Re)plans the buffers when the shape or the attention kind changes; otherwise they are reused.
static void plan_activations(GPTActivations& a, const GPTConfig& c, int B, int T) {
    bool flash = use_flash_attention(c);
    if (a.memory && a.B == B && a.T == T && a.flash == flash) return;
    cuda_check(cudaFree(a.memory));
    a.memory = nullptr, a.B = B, a.T = T, a.flash = flash;
    BufferCarver measure{nullptr};
    carve_activations(a, c, measure);
    cuda_check(cudaMalloc(&a.memory, measure.bytes));
    a.bytes = measure.bytes;
    BufferCarver carve{static_cast<char*>(a.memory)};
    carve_activations(a, c, carve);
    long N = long(B) * T;
    cuda_check(cudaFreeHost(a.host_tokens));
    cuda_check(cudaMallocHost(&a.host_tokens, (4 * N + 1) * sizeof(int)));
    a.host_groups = a.host_tokens + N;
    if (!a.tokens_copied)
        cuda_check(cudaEventCreateWithFlags(&a.tokens_copied, cudaEventDisableTiming));
}

GPTActivations::~GPTActivations() {
    (void)cudaFree(memory);
    (void)cudaFreeHost(host_tokens);
    if (tokens_copied) (void)cudaEventDestroy(tokens_copied);
}

double gpt_activations_bytes(const GPTConfig& config, int B, int T) {
    GPTActivations measured;
    measured.B = B, measured.T = T;
    measured.flash = use_flash_attention(config);
    BufferCarver measure{nullptr};
    carve_activations(measured, config, measure);
    return measure.total;
}

// x with dropout p into `dropped` (x itself when p is 0), and its backward.
static const floatX* dropout_site(const floatX* x, floatX* dropped, long n, real p, uint64_t seed) {
    if (p <= 0) return x;
    dropout_forward(dropped, x, n, p, seed);
    return dropped;
}
static const floatX* dropout_site_backward(const floatX* dout, floatX* dx, long n, real p,
                                           uint64_t seed) {
    if (p <= 0) return dout;
    dropout_backward(dx, dout, n, p, seed, InputGrad::write);
    return dx;
}

void gpt_forward(GPT& model, GPTActivations& a, const int* tokens, int B, int T, bool training,
                 uint64_t seed) {
    const GPTConfig& c = model.config;
    if (T > c.context)
        fail("gpt_forward: sequence length %d exceeds the context window %d", T, c.context);
    plan_activations(a, c, B, T);
    int C = c.dim, NH = c.heads, L = c.layers, H = c.mlp_ratio * C;
    int F = c.activation == Activation::swiglu ? 2 * H : H;
    long N = long(B) * T;
    // The tokens to the host for the embedding's backward, behind the stream's work (gpt_backward
    // sorts them).
    cuda_check(cudaMemcpyAsync(a.host_tokens, tokens, N * sizeof(int), cudaMemcpyDeviceToHost));
    cuda_check(cudaEventRecord(a.tokens_copied));
    a.seed = seed;
    a.dropout = training ? c.dropout : 0;
    a.attention_dropout = training ? c.attention_dropout : 0;
    const Tensor& head = c.tied_embeddings ? model.wte : model.lm_head;

    // x = dropout(wte[tokens] + wpe[t])                                               (B,T,C)
    floatX* embedded = a.dropout > 0 ? a.branch : a.stream[0];
    embedding_forward(embedded, tokens, model.wte.data, model.wpe.data, B, T, C);
    if (a.dropout > 0)
        dropout_forward(a.stream[0], embedded, N * C, a.dropout, random_bits(seed, 0));
    // h = norm1(x)                                                                    (B,T,C)
    GPTLayer& first = model.layers[0];
    norm_forward(c.norm, a.normalized[0], a.mean[0], a.rstd[0], a.stream[0],
                 first.norm1_weight.data, first.norm1_bias.data, N, C);
    for (int l = 0; l < L; l++) {
        GPTLayer& w = model.layers[l];
        GPTLayerActivations& s = a.layers[l];
        // qkv = h @ Wqkv^T + b                                                        (B,T,3C)
        linear_forward(s.qkv, a.normalized[l], w.qkv_weight.data, w.qkv_bias.data, N, C, 3 * C);
        // y = attention(qkv)                                                          (B,T,C)
        uint64_t attention_seed = random_bits(seed, 3 * l + 1);
        if (a.flash)
            flash_attention_forward(s.attention, s.saved, s.qkv, B, T, C, NH, c.rotary,
                                    a.attention_dropout, attention_seed);
        else
            attention_forward(s.attention, s.saved, s.qkv, B, T, C, NH, c.rotary,
                              a.attention_dropout, attention_seed);
        // branch = dropout(y @ Wproj^T + b)                                           (B,T,C)
        linear_forward(a.branch, s.attention, w.attn_proj_weight.data, w.attn_proj_bias.data, N, C,
                       C);
        const floatX* branch =
            dropout_site(a.branch, a.dropped, N * C, a.dropout, random_bits(seed, 3 * l + 2));
        // r = x + branch,  h2 = norm2(r)                                              (B,T,C)
        residual_norm_forward(c.norm, s.residual, s.normalized, s.mean, s.rstd, a.stream[l], branch,
                              w.norm2_weight.data, w.norm2_bias.data, N, C);
        // act = gelu(h2 @ Wfc^T + b)  or  swiglu(h2 @ Wfc^T + b)                     (B,T,H)
        if (c.activation == Activation::gelu) {
            linear_gelu_forward(s.activation, s.fc, s.normalized, w.fc_weight.data, w.fc_bias.data,
                                N, C, F);
        } else {
            linear_forward(s.fc, s.normalized, w.fc_weight.data, w.fc_bias.data, N, C, F);
            swiglu_forward(s.activation, s.fc, N, H);
        }
        // branch = dropout(act @ Wproj2^T + b)                                        (B,T,C)
        linear_forward(a.branch, s.activation, w.mlp_proj_weight.data, w.mlp_proj_bias.data, N, H,
                       C);
        branch = dropout_site(a.branch, a.dropped, N * C, a.dropout, random_bits(seed, 3 * l + 3));
        // x' = r + branch,  h' = the next norm (the next layer's norm1, or the final)   (B,T,C)
        bool last = l + 1 == L;
        const Tensor& norm_weight =
            last ? model.final_norm_weight : model.layers[l + 1].norm1_weight;
        const Tensor& norm_bias = last ? model.final_norm_bias : model.layers[l + 1].norm1_bias;
        residual_norm_forward(c.norm, a.stream[l + 1], a.normalized[l + 1], a.mean[l + 1],
                              a.rstd[l + 1], s.residual, branch, norm_weight.data, norm_bias.data,
                              N, C);
    }
    // logits = h @ Wout^T (the padding columns come out zero)                  (B,T,padded V)
    linear_forward(a.logits, a.normalized[L], head.data, nullptr, N, C, padded_vocab(c.vocab_size));
}

real gpt_loss(GPTActivations& a, const int* targets, int vocab_size) {
    classifier(a.logits, a.losses, a.loss, a.count, targets, long(a.B) * a.T, vocab_size,
               padded_vocab(vocab_size), 0, false);
    real loss;
    cuda_check(cudaMemcpy(&loss, a.loss, sizeof loss, cudaMemcpyDeviceToHost));
    return loss;
}

void gpt_backward(GPT& model, GPTActivations& a, const int* targets, real loss_scale) {
    PhaseScope phase("backward");
    const GPTConfig& c = model.config;
    int B = a.B, T = a.T, C = c.dim, NH = c.heads, L = c.layers, H = c.mlp_ratio * C;
    int F = c.activation == Activation::swiglu ? 2 * H : H;
    long N = long(B) * T;
    const Tensor& head = c.tied_embeddings ? model.wte : model.lm_head;
    const InputGrad write = InputGrad::write, add = InputGrad::add;
    // The embedding's token groups, from the tokens the forward sent to the host: the copy was the
    // forward's first work, so the host seldom waits; the groups go back behind the work queued.
    cuda_check(cudaEventSynchronize(a.tokens_copied));
    a.token_groups.count = sort_by_token(a.host_tokens, N, a.host_groups, a.host_groups + N,
                                         a.host_groups + 2 * N + 1);
    cuda_check(cudaMemcpyAsync(a.token_groups.token, a.host_groups, (3 * N + 1) * sizeof(int),
                               cudaMemcpyHostToDevice));

    // The loss; dlogits = (softmax(logits) - onehot(targets)) * loss_scale / count, written over
    // the logits (zero in the padding columns)                                 (B,T,padded V)
    int V = c.vocab_size, padded_V = padded_vocab(V);
    classifier(a.logits, a.losses, a.loss, a.count, targets, N, V, padded_V, loss_scale, true);
    const floatX* dlogits = a.logits;
    // dh = dlogits @ Wout,  dWout += dlogits^T @ h                                    (B,T,C)
    linear_backward(a.dnormalized, head.grad, nullptr, dlogits, a.normalized[L], head.data, N, C,
                    padded_V, write);
    // dx = the final norm's backward                                                  (B,T,C)
    norm_backward(c.norm, a.dstream, model.final_norm_weight.grad, model.final_norm_bias.grad,
                  a.dnormalized, a.stream[L], model.final_norm_weight.data, a.mean[L], a.rstd[L], N,
                  C, write);
    for (int l = L - 1; l >= 0; l--) {
        GPTLayer& w = model.layers[l];
        GPTLayerActivations& s = a.layers[l];
        // The MLP branch gets the stream's gradient, through its dropout              (B,T,C)
        const floatX* dbranch = dropout_site_backward(a.dstream, a.dbranch, N * C, a.dropout,
                                                      random_bits(a.seed, 3 * l + 3));
        if (c.activation == Activation::gelu) {
            // dfc = (dbranch @ Wproj2) * gelu'(fc), in the product's epilogue where it can
            // be, which then also gives the fc bias's gradient; dWproj2, dbproj2        (B,T,H)
            bool fc_bias_done =
                linear_backward_through_gelu(a.dfc, w.fc_bias.grad, a.dactivation, dbranch, s.fc,
                                             w.mlp_proj_weight.data, N, H, C);
            linear_backward(nullptr, w.mlp_proj_weight.grad, w.mlp_proj_bias.grad, dbranch,
                            s.activation, w.mlp_proj_weight.data, N, H, C, write);
            // dh2 = dfc @ Wfc, dWfc, dbfc (unless done above)                            (B,T,C)
            linear_backward(a.dnormalized, w.fc_weight.grad,
                            fc_bias_done ? nullptr : w.fc_bias.grad, a.dfc, s.normalized,
                            w.fc_weight.data, N, C, F, write);
        } else {
            // dact = dbranch @ Wproj2, then SwiGLU's backward, dh2 = dfc @ Wfc          (B,T,C)
            linear_backward(a.dactivation, w.mlp_proj_weight.grad, w.mlp_proj_bias.grad, dbranch,
                            s.activation, w.mlp_proj_weight.data, N, H, C, write);
            swiglu_backward(a.dfc, a.dactivation, s.fc, N, H, write);
            linear_backward(a.dnormalized, w.fc_weight.grad, w.fc_bias.grad, a.dfc, s.normalized,
                            w.fc_weight.data, N, C, F, write);
        }
        // dr = dx + norm2's backward of dh2 (the residual passes dx through)          (B,T,C)
        norm_backward(c.norm, a.dstream, w.norm2_weight.grad, w.norm2_bias.grad, a.dnormalized,
                      s.residual, w.norm2_weight.data, s.mean, s.rstd, N, C, add);
        // The attention branch gets dr, through its dropout                           (B,T,C)
        dbranch = dropout_site_backward(a.dstream, a.dbranch, N * C, a.dropout,
                                        random_bits(a.seed, 3 * l + 2));
        // dy = dbranch @ Wproj                                                        (B,T,C)
        linear_backward(a.dattention, w.attn_proj_weight.grad, w.attn_proj_bias.grad, dbranch,
                        s.attention, w.attn_proj_weight.data, N, C, C, write);
        // dqkv = attention's backward                                                 (B,T,3C)
        uint64_t attention_seed = random_bits(a.seed, 3 * l + 1);
        if (a.flash)
            flash_attention_backward(a.dqkv, a.dattention, s.attention, s.saved, a.scratch, s.qkv,
                                     B, T, C, NH, c.rotary, a.attention_dropout, attention_seed,
                                     write);
        else
            attention_backward(a.dqkv, a.dattention, s.saved, a.scratch, s.qkv, B, T, C, NH,
                               c.rotary, a.attention_dropout, attention_seed, write);
        // dh = dqkv @ Wqkv                                                            (B,T,C)
        linear_backward(a.dnormalized, w.qkv_weight.grad, w.qkv_bias.grad, a.dqkv, a.normalized[l],
                        w.qkv_weight.data, N, C, 3 * C, write);
        // dx = dr + norm1's backward of dh                                            (B,T,C)
        norm_backward(c.norm, a.dstream, w.norm1_weight.grad, w.norm1_bias.grad, a.dnormalized,
                      a.stream[l], w.norm1_weight.data, a.mean[l], a.rstd[l], N, C, add);
    }
    // The embedding gets dx, through its dropout: dwte, dwpe                          (V,C), (T,C)
    const floatX* dembedded =
        dropout_site_backward(a.dstream, a.dbranch, N * C, a.dropout, random_bits(a.seed, 0));
    embedding_backward(model.wte.grad, model.wpe.grad, dembedded, a.token_groups, B, T, C);
}

// ====================================================================================================
// 11. Generation
// Generation: one sequence, token by token, with a key/value cache so each new token costs one
// position's work (O(context) attention) instead of a forward pass over the whole window.

void kv_cache_create(KVCache* cache, const GPTConfig& config, int positions) {
    cache->config = config;
    cache->length = 0;
    cache->positions = positions;
    size_t bytes = size_t(config.layers) * positions * config.dim * sizeof(floatX);
    cuda_check(cudaMalloc(&cache->keys, bytes));
    cuda_check(cudaMalloc(&cache->values, bytes));
}

KVCache::~KVCache() {
    (void)cudaFree(keys);
    (void)cudaFree(values);
}

// k, v (NH, n, hs) -> the cache's rows [start, start + n) of each head; cache layout (NH, context,
// hs). The keys and values of n new positions (rows ld_k and ld_v apart, NH head vectors each) into
// the cache's slots start..start+n of every head. A row kernel over the n*NH head vectors.
__global__ void kv_cache_append_kernel(floatX* cache_keys, floatX* cache_values, const floatX* k,
                                       int ld_k, const floatX* v, int ld_v, int n, int NH, int hs,
                                       int context, int start) {
    bool active;
    long r = group_row(long(n) * NH, &active);
    if (!active) return;
    long p = r / NH, h = r % NH, slot = (h * context + start + p) * hs;
    for_each_in_row(hs, [&](int d) {
        cache_keys[slot + d] = k[p * ld_k + h * hs + d];
        cache_values[slot + d] = v[p * ld_v + h * hs + d];
    });
}

// Positions [cache.length, cache.length + n) of one sequence: their keys and values join the cache,
// and the logits of the last one (V values on the device) come back. The same maths as gpt_forward,
// through the raw forward functions (nothing is recorded).
floatX* gpt_forward_cached(GPT& model, KVCache& cache, const int* tokens, int n) {
    const GPTConfig& c = model.config;
    int start = cache.length, C = c.dim, NH = c.heads, hs = C / NH, L = start + n;
    if (L > cache.positions)
        fail("gpt_forward_cached: %d positions exceed the cache's %d", L, cache.positions);
    int hidden = c.mlp_ratio * C, fc_out = c.activation == Activation::swiglu ? 2 * hidden : hidden;
    floatX *x = device_alloc<floatX>(long(n) * C), *h = device_alloc<floatX>(long(n) * C),
           *qkv = device_alloc<floatX>(long(n) * 3 * C);
    floatX *q_rotated = device_alloc<floatX>(long(n) * C),
           *k_rotated = device_alloc<floatX>(long(n) * C);
    floatX *att = device_alloc<floatX>(long(NH) * n * L), *y = device_alloc<floatX>(long(n) * C),
           *branch = device_alloc<floatX>(long(n) * C);
    floatX *fc = device_alloc<floatX>(long(n) * fc_out),
           *act = device_alloc<floatX>(long(n) * hidden);
    real *mean = device_alloc<real>(n), *rstd = device_alloc<real>(n);
    auto normalize_into = [&](floatX* out, const floatX* in, const Tensor& weight,
                              const Tensor& bias) {
        norm_forward(c.norm, out, mean, rstd, in, weight.data, bias.data, n, C);
    };
    embedding_forward(x, tokens, model.wte.data,
                      c.rotary ? nullptr : model.wpe.data + long(start) * C, 1, n, C);
    for (int l = 0; l < c.layers; l++) {
        GPTLayer& layer = model.layers[l];
        floatX* cache_keys = cache.keys + long(l) * cache.positions * C;
        floatX* cache_values = cache.values + long(l) * cache.positions * C;
        normalize_into(h, x, layer.norm1_weight, layer.norm1_bias);
        linear_forward(qkv, h, layer.qkv_weight.data, layer.qkv_bias.data, n, C, 3 * C);
        const floatX *q = qkv, *k = qkv + C;
        int ld = 3 * C;
        if (c.rotary) {
            rotary_forward(q_rotated, C, qkv, 3 * C, n, n, NH, hs, start);
            rotary_forward(k_rotated, C, qkv + C, 3 * C, n, n, NH, hs, start);
            q = q_rotated, k = k_rotated, ld = C;
        }
        launch(kv_cache_append_kernel, row_grid(long(n) * NH), row_block(), 0, cache_keys,
               cache_values, k, ld, qkv + 2 * C, 3 * C, n, NH, hs, cache.positions, start);
        // Each new query against every cached key up to its own position, head by head.
        gemm({.M = n, .N = L, .K = hs, .inner = NH}, real(1 / std::sqrt(double(hs))),
             {.data = q, .ld = ld, .inner = hs},
             {.data = cache_keys, .ld = hs, .transpose = true, .inner = long(cache.positions) * hs},
             0, {.data = att, .ld = L, .inner = long(n) * L});
        launch(causal_softmax_forward_kernel, row_grid(long(NH) * n), row_block(), 0, att,
               long(NH) * n, n, L, start);
        gemm({.M = n, .N = hs, .K = L, .inner = NH}, 1,
             {.data = att, .ld = L, .inner = long(n) * L},
             {.data = cache_values, .ld = hs, .inner = long(cache.positions) * hs}, 0,
             {.data = y, .ld = C, .inner = hs});
        linear_forward(branch, y, layer.attn_proj_weight.data, layer.attn_proj_bias.data, n, C, C);
        residual_forward(x, x, branch, long(n) * C);
        normalize_into(h, x, layer.norm2_weight, layer.norm2_bias);
        if (c.activation == Activation::swiglu) {
            linear_forward(fc, h, layer.fc_weight.data, layer.fc_bias.data, n, C, fc_out);
            swiglu_forward(act, fc, n, hidden);
        } else {
            linear_gelu_forward(act, fc, h, layer.fc_weight.data, layer.fc_bias.data, n, C, fc_out);
        }
        linear_forward(branch, act, layer.mlp_proj_weight.data, layer.mlp_proj_bias.data, n, hidden,
                       C);
        residual_forward(x, x, branch, long(n) * C);
    }
    cache.length = L;
    floatX* last = x + long(n - 1) * C;
    normalize_into(h, last, model.final_norm_weight, model.final_norm_bias);
    floatX* logits = device_alloc<floatX>(padded_vocab(c.vocab_size));
    linear_forward(logits, h, (c.tied_embeddings ? model.wte : model.lm_head).data, nullptr, 1, C,
                   padded_vocab(c.vocab_size));
    return logits;
}

// Picks the next token from logits on the host: greedy at temperature 0, otherwise a draw from
// softmax(logits / temperature), keeping only the top_k most likely (0: all) and then the smallest
// set whose probability reaches top_p.
int sample_token(const std::vector<real>& logits, Sampler& sampler) {
    int V = int(logits.size());
    if (sampler.temperature <= 0)
        return int(std::max_element(logits.begin(), logits.end()) - logits.begin());
    std::vector<std::pair<double, int>> candidates(V);
    double top = *std::max_element(logits.begin(), logits.end());
    for (int v = 0; v < V; v++)
        candidates[v] = {std::exp((logits[v] - top) / sampler.temperature), v};
    std::sort(candidates.begin(), candidates.end(),
              [](const std::pair<double, int>& a, const std::pair<double, int>& b) {
                  return a.first > b.first || (a.first == b.first && a.second < b.second);
              });
    int keep = sampler.top_k > 0 && sampler.top_k < V ? sampler.top_k : V;
    double mass = 0, kept = 0;
    for (int i = 0; i < keep; i++) mass += candidates[i].first;
    for (int i = 0; i < keep; i++) {
        kept += candidates[i].first;
        if (kept >= sampler.top_p * mass) {
            keep = i + 1;
            break;
        }
    }
    double draw =
        double(splitmix64_next(&sampler.rng_state) >> 11) * (1.0 / 9007199254740992.0) * kept;
    for (int i = 0; i < keep; i++) {
        draw -= candidates[i].first;
        if (draw < 0) return candidates[i].second;
    }
    return candidates[keep - 1].second;
}

// The model sees the tokens from `window_start` on. When they fill the context, the window jumps
// forward by half a context and (with the cache) the cache is rebuilt from the tokens kept.
void generate(GPT& model, std::vector<int>& tokens, int count, Sampler& sampler, bool use_cache,
              const std::function<void(int)>& on_token) {
    NoGrad no_grad;
    const GPTConfig& c = model.config;
    if (tokens.empty()) fail("generate: the prompt is empty");
    KVCache cache;
    if (use_cache)
        kv_cache_create(&cache, c, int(std::min(size_t(c.context), tokens.size() + size_t(count))));
    MemoryMark start = memory_mark();
    int* device_tokens = device_alloc<int>(c.context);
    size_t window_start = tokens.size() > size_t(c.context) ? tokens.size() - c.context : 0;
    for (int produced = 0; produced < count; produced++) {
        if (tokens.size() - window_start > size_t(c.context))
            window_start += std::max(1, c.context / 2), cache.length = 0;
        int n = int(tokens.size() - window_start);
        MemoryMark mark = memory_mark();
        floatX* logits;
        if (use_cache) {
            int fresh =
                n - cache.length;  // all of the window after a reset, else just the newest token
            cuda_check(cudaMemcpy(device_tokens, tokens.data() + window_start + cache.length,
                                  fresh * sizeof(int), cudaMemcpyHostToDevice));
            logits = gpt_forward_cached(model, cache, device_tokens, fresh);
        } else {
            cuda_check(cudaMemcpy(device_tokens, tokens.data() + window_start, n * sizeof(int),
                                  cudaMemcpyHostToDevice));
            logits = gpt_forward_tape(model, device_tokens, 1, n, false, 0).data +
                     long(n - 1) * padded_vocab(c.vocab_size);
        }
        std::vector<real> host = download(logits, c.vocab_size);
        for (real value : host)
            if (!std::isfinite(value))
                fail("generation: the model's logits are not finite at token %d (broken weights?)",
                     produced + 1);
        memory_release(mark);
        int next = sample_token(host, sampler);
        tokens.push_back(next);
        on_token(next);
    }
    memory_release(start);
}

// ====================================================================================================
// 12. Optimizers
// Optimizers and training maths. All on the device, over the whole parameter buffer at once.

// Global gradient norm, sqrt(sum g^2), deterministic: each block sums its tile, its threads
// combining through shared memory in a tree; then one thread adds the block sums in order.
__global__ void sum_of_squares_kernel(real* block_sums, const floatX* x, long n) {
    auto partial = shared_memory<real>();
    Tile tile = block_tile(n);
    partial[threadIdx.x] = sum_strided(tile.begin, tile.end, threadIdx.x, blockDim.x,
                                       [&](long i) { return x[i] * x[i]; });
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (int(threadIdx.x) < stride)
            partial[threadIdx.x] = partial[threadIdx.x] + partial[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) block_sums[blockIdx.x] = partial[0];
}

__global__ void square_root_of_sum_kernel(real* out, const real* values, int n) {
    real total = 0;
    for (int i = 0; i < n; i++) total += values[i];
    out[0] = sqrt(total);
}

void gradient_norm(real* norm, const floatX* gradients, long n) {
    PhaseScope phase("optimizer");
    unsigned blocks = element_blocks(n);
    real* block_sums = device_alloc<real>(blocks);
    launch(sum_of_squares_kernel, blocks, element_threads, element_threads * sizeof(real),
           block_sums, gradients, n);
    launch(square_root_of_sum_kernel, 1, 1, 0, norm, block_sums, int(blocks));
}

// Clipping by global norm happens inside the optimizer kernels: the gradient is scaled by
// max_norm / (norm + 1e-6) when that is below 1 (max_norm <= 0: no clipping). The norm is read on
// the device, so the host never waits for it.
__device__ __forceinline__ real clip_scale(const real* norm, real max_norm) {
    if (max_norm <= 0 || !norm) return 1;
    real scale = max_norm / (norm[0] + real(1e-6));
    return scale < 1 ? scale : 1;
}

// AdamW (decoupled weight decay):  g = clip * grad,  m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2)
// g^2,
//   w -= lr * (m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd * w),  wd only on the first
//   num_decayed.
// w is the float master weight when there is one (mixed precision: the stored parameter is then w
// rounded), else the parameter itself. Memory-bound, so it moves four parameters per load and
// store: a Pack<float, 4> is one 128-bit access. The buffers come from cudaMalloc, aligned for
// that; the last block takes the n % 4 left over.

struct AdamWStep {
    real lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2;
    uint64_t seed;  // for rounding parameters from their master weights
    long first;     // the buffer index of element 0 (a shard's offset): decay and rounding use it
};

// Storing an updated master weight as a (bfloat16) parameter rounds it up or down at random, up
// with probability equal to its distance from the value below, so that the stored parameter is the
// master weight on average: with round-to-nearest, updates smaller than half a bfloat16 step
// (weights near 1 move in steps of 2^-8) would never show in the parameters the model computes
// with.
__device__ __forceinline__ floatX round_stochastic(real w, uint64_t seed, long i) {
#ifdef TRICYCLE_BF16
    unsigned int bits = __float_as_uint(w);
    if ((bits & 0x7fffffff) < 0x7f7f0000)
        bits += unsigned(random_bits(seed, uint64_t(i)) & 0xffff);  // finite, not overflowing
    bf16 stored;
    stored.value = __ushort_as_bfloat16((unsigned short)(bits >> 16));
    return stored;
#else
    (void)seed, (void)i;
    return w;
#endif
}

__device__ __forceinline__ real adamw_weight(real w, real g, real& m, real& v, bool decayed,
                                             const AdamWStep& s) {
    m = s.beta1 * m + (1 - s.beta1) * g;
    v = s.beta2 * v + (1 - s.beta2) * g * g;
    real update = m / s.bias_correction1 / (sqrt(v / s.bias_correction2) + s.eps);
    return w - s.lr * (update + (decayed ? s.weight_decay * w : 0));
}

// Four parameters: loaded and stored as packs, updated one by one. With a master copy (HAS_MASTER),
// the float weight comes from it and the parameter is its rounding. A template, so that each kernel
// body is one straight loop (a runtime branch per element keeps the CPU compiler from vectorising
// it).
template <bool HAS_MASTER>
__device__ __forceinline__ void adamw_pack(long i, floatX* params, real* master,
                                           const floatX* grads, real* m, real* v, real scale,
                                           long num_decayed, const AdamWStep& s) {
    Pack<floatX, 4> p, g = reinterpret_cast<const Pack<floatX, 4>*>(grads)[i];
    Pack<real, 4> first = reinterpret_cast<Pack<real, 4>*>(m)[i],
                  second = reinterpret_cast<Pack<real, 4>*>(v)[i];
    Pack<real, 4> w;  // with a master weight, the parameter is only written
    if (HAS_MASTER) w = reinterpret_cast<Pack<real, 4>*>(master)[i];
    else p = reinterpret_cast<Pack<floatX, 4>*>(params)[i];
    for (int k = 0; k < 4; k++) {
        long index = s.first + 4 * i + k;
        real weight = adamw_weight(HAS_MASTER ? w.v[k] : real(p.v[k]), g.v[k] * scale, first.v[k],
                                   second.v[k], index < num_decayed, s);
        if (HAS_MASTER) w.v[k] = weight, p.v[k] = round_stochastic(weight, s.seed, index);
        else p.v[k] = weight;
    }
    reinterpret_cast<Pack<floatX, 4>*>(params)[i] = p;
    reinterpret_cast<Pack<real, 4>*>(m)[i] = first, reinterpret_cast<Pack<real, 4>*>(v)[i] = second;
    if (HAS_MASTER) reinterpret_cast<Pack<real, 4>*>(master)[i] = w;
}

__global__ void adamw_kernel(floatX* params, real* master, const floatX* grads, real* m, real* v,
                             long n, long num_decayed, AdamWStep s, const real* norm,
                             real max_norm) {
    // A non-finite gradient norm leaves everything as it was: the host, which reads the norm only
    // at the end of the step, then stops with the parameters of the last good step.
    if (norm && !isfinite(norm[0])) return;
    real scale = clip_scale(norm, max_norm);
    if (master)
        for_each_element(n / 4, [&](long i) {
            adamw_pack<true>(i, params, master, grads, m, v, scale, num_decayed, s);
        });
    else
        for_each_element(n / 4, [&](long i) {
            adamw_pack<false>(i, params, master, grads, m, v, scale, num_decayed, s);
        });
    if (blockIdx.x == gridDim.x - 1)
        for_each_strided(n / 4 * 4, n, threadIdx.x, blockDim.x, [&](long i) {
            real w = adamw_weight(master ? master[i] : real(params[i]), grads[i] * scale, m[i],
                                  v[i], s.first + i < num_decayed, s);
            params[i] = master ? round_stochastic(w, s.seed, s.first + i) : floatX(w);
            if (master) master[i] = w;
        });
}

void adamw_create(AdamW* opt, long n, long offset) {
    cuda_check(cudaMalloc(&opt->m, n * sizeof(real)));
    cuda_check(cudaMalloc(&opt->v, n * sizeof(real)));
    cuda_check(cudaMemset(opt->m, 0, n * sizeof(real)));
    cuda_check(cudaMemset(opt->v, 0, n * sizeof(real)));
    opt->n = n, opt->offset = offset;
    opt->step = 0;
}

AdamW::~AdamW() {
    (void)cudaFree(m);
    (void)cudaFree(v);
}

// A shard (ZeRO-1) starts at a multiple of 4, so that its packs stay aligned.
void adamw_update(AdamW* opt, Parameters& p, real lr, const real* norm, real max_norm) {
    PhaseScope phase("optimizer");
    long end = opt->offset + opt->n;
    if (opt->offset < 0 || opt->offset % 4 != 0 || end > p.size)
        fail("adamw_update: the optimizer holds moments for [%ld, %ld) of %ld parameters",
             opt->offset, end, p.size);
    if (p.master && (opt->offset < p.master_offset || end > p.master_offset + p.master_count))
        fail("adamw_update: the master copy holds [%ld, %ld), the optimizer updates [%ld, %ld)",
             p.master_offset, p.master_offset + p.master_count, opt->offset, end);
    opt->step++;
    AdamWStep s{lr,
                real(opt->beta1),
                real(opt->beta2),
                real(opt->eps),
                real(opt->weight_decay),
                real(1 - std::pow(double(opt->beta1), double(opt->step))),
                real(1 - std::pow(double(opt->beta2), double(opt->step))),
                random_bits(0x5eed, uint64_t(opt->step)),
                opt->offset};
    if (opt->n == 0) return;  // an empty shard
    real* master = p.master ? p.master + (opt->offset - p.master_offset) : nullptr;
    launch(adamw_kernel, element_blocks(opt->n / 4), element_threads, 0, p.data + opt->offset,
           master, p.grad + opt->offset, opt->m, opt->v, opt->n, p.num_decayed, s, norm, max_norm);
}

// SGD with momentum:  u = momentum * u + clip * grad,  w -= lr * u  (w: the master weight, as in
// AdamW).
__global__ void sgd_kernel(floatX* params, real* master, const floatX* grads, real* velocity,
                           long n, real lr, real momentum, uint64_t seed, const real* norm,
                           real max_norm) {
    real scale = clip_scale(norm, max_norm);
    for_each_element(n, [&](long i) {
        velocity[i] = momentum * velocity[i] + grads[i] * scale;
        real w = (master ? master[i] : real(params[i])) - lr * velocity[i];
        params[i] = master ? round_stochastic(w, seed, i) : floatX(w);
        if (master) master[i] = w;
    });
}

void sgd_create(SGD* opt, long n) {
    cuda_check(cudaMalloc(&opt->velocity, n * sizeof(real)));
    cuda_check(cudaMemset(opt->velocity, 0, n * sizeof(real)));
    opt->n = n;
}

SGD::~SGD() { (void)cudaFree(velocity); }

void sgd_update(SGD* opt, Parameters& p, real lr, const real* norm, real max_norm) {
    PhaseScope phase("optimizer");
    if (opt->n != p.size)
        fail("sgd_update: the optimizer holds %ld velocities for %ld parameters", opt->n, p.size);
    if (p.master && (p.master_offset != 0 || p.master_count < p.size))
        fail("sgd_update: the master copy holds a shard, SGD updates every parameter");
    opt->step++;
    launch(sgd_kernel, element_blocks(opt->n), element_threads, 0, p.data, p.master, p.grad,
           opt->velocity, opt->n, lr, real(opt->momentum), random_bits(0x5eed, uint64_t(opt->step)),
           norm, max_norm);
}

// Linear warmup from 0 to max_lr over `warmup` steps, then cosine decay to min_lr at the last step.
// (A host function: one number per step, computed where the step is launched.)
float learning_rate(long step, long warmup, long total_steps, float max_lr, float min_lr) {
    if (step < warmup) return max_lr * float(step + 1) / float(warmup);
    if (step >= total_steps - 1 || total_steps <= warmup) return min_lr;
    double progress = double(step - warmup) / double(total_steps - 1 - warmup);
    return min_lr + float(0.5 * (1 + std::cos(3.141592653589793 * progress))) * (max_lr - min_lr);
}
