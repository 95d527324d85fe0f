// tricycle.cu — the library: memory, tensors, the tape, and every kernel with its backward.
// See tricycle.h for the overview; this file follows the same order.
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

// ----------------------------------------------------------------------------------------------------
// Errors

void fail(const char* format, ...) {
    char message[2048];
    va_list args;
    va_start(args, format);
    vsnprintf(message, sizeof message, format, args);
    va_end(args);
    throw std::runtime_error(message);
}

// A float's bits as an int32 and back (model files store floats in their int32 header this way).
static int32_t float_bits(float f) {
    int32_t bits;
    memcpy(&bits, &f, 4);
    return bits;
}

static float bits_float(int32_t bits) {
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

void cuda_check(cudaError_t error, const char* file, int line) {
    if (error != cudaSuccess) fail("%s:%d: CUDA error: %s", file, line, cudaGetErrorString(error));
}

void check_launch(const void* kernel) {
    cudaError_t error = cudaGetLastError();
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
static void cublas_check(cublasStatus_t status, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    if (status != CUBLAS_STATUS_SUCCESS) fail("%s:%d: cuBLAS error %d", file, line, int(status));
}

static cublasHandle_t cublas_handle() {
    static cublasHandle_t handle = nullptr;
    if (!handle) cublas_check(cublasCreate(&handle));
    return handle;
}
#endif

// ----------------------------------------------------------------------------------------------------
// Profiling. Regions are recorded as they start and end; on a GPU their CUDA events are read only in
// profile_report, so timing never stalls the stream.

bool profiling = false;
// What the launches belong to: "forward", "backward" or "optimizer" (set for a while by PhaseScope).
static const char* profile_phase = "forward";
struct PhaseScope {
    const char* saved;
    PhaseScope(const char* phase) : saved(profile_phase) { profile_phase = phase; }
    ~PhaseScope() { profile_phase = saved; }
};

struct ProfileTotal {
    std::string name;
    const char* phase;
    long calls = 0;
    double seconds = 0;
};

static std::vector<ProfileTotal> profile_totals;
#ifdef __CUDACC__
struct PendingRegion {
    int slot;
    cudaEvent_t start, stop;
};
static std::vector<PendingRegion> pending_regions;
static std::vector<cudaEvent_t> spare_events;
static cudaEvent_t profile_event() {
    cudaEvent_t event;
    if (spare_events.empty()) cuda_check(cudaEventCreate(&event));
    else event = spare_events.back(), spare_events.pop_back();
    return event;
}
#endif

static int profile_slot(const std::string& name) {
    for (size_t i = 0; i < profile_totals.size(); i++)
        if (profile_totals[i].name == name && !strcmp(profile_totals[i].phase, profile_phase)) return int(i);
    profile_totals.push_back(ProfileTotal{name, profile_phase});
    return int(profile_totals.size()) - 1;
}

static std::string kernel_display_name(const void* kernel) {
    static std::unordered_map<const void*, std::string> names;
    auto known = names.find(kernel);
    if (known != names.end()) return known->second;
#ifdef __CUDACC__
    const char* raw = "?";
    cudaFuncGetName(&raw, kernel);
    std::string name = raw;
#else
    std::string name = emu::kernel_name(kernel);
#endif
    std::string shortened = name.substr(0, name.find('('));  // drop the parameter list
    return names[kernel] = shortened;
}

ProfileRegion::ProfileRegion(const void* kernel) : ProfileRegion(kernel_display_name(kernel).c_str()) {}

ProfileRegion::ProfileRegion(const char* name) : slot(profile_slot(name)), pending(-1), start(seconds_now()) {
#ifdef __CUDACC__
    pending = int(pending_regions.size());
    pending_regions.push_back({slot, profile_event(), profile_event()});
    cuda_check(cudaEventRecord(pending_regions.back().start));
#endif
}

ProfileRegion::~ProfileRegion() {
    profile_totals[slot].calls++;
#ifdef __CUDACC__
    (void)cudaEventRecord(pending_regions[pending].stop);
#else
    profile_totals[slot].seconds += seconds_now() - start;
#endif
}

void profile_reset() {
    profile_totals.clear();
}

void profile_report(FILE* out, long steps) {
#ifdef __CUDACC__
    cuda_check(cudaDeviceSynchronize());
    for (PendingRegion& r : pending_regions) {
        float ms = 0;
        cuda_check(cudaEventElapsedTime(&ms, r.start, r.stop));
        profile_totals[r.slot].seconds += ms / 1e3;
        spare_events.push_back(r.start), spare_events.push_back(r.stop);
    }
    pending_regions.clear();
#endif
    std::vector<ProfileTotal> rows = profile_totals;
    std::sort(rows.begin(), rows.end(), [](const ProfileTotal& a, const ProfileTotal& b) { return a.seconds > b.seconds; });
    double total = 0;
    for (const ProfileTotal& r : rows) total += r.seconds;
    fprintf(out, "%-44s %-9s %9s %11s %7s\n", "kernel or matrix product", "pass", "calls", "ms/step", "share");
    for (const ProfileTotal& r : rows)
        fprintf(out, "%-44s %-9s %9.1f %11.3f %6.1f%%\n", r.name.c_str(), r.phase, double(r.calls) / steps,
                r.seconds / steps * 1e3, 100 * r.seconds / std::max(total, 1e-30));
    fprintf(out, "%-44s %-9s %9s %11.3f\n", "total", "", "", total / steps * 1e3);
}

// ----------------------------------------------------------------------------------------------------
// Launch shapes. Two patterns cover most kernels.
//
// Elementwise kernels cut the data into one contiguous tile per block, and the block's threads stride
// through their tile: neighbouring threads touch neighbouring elements, which a GPU coalesces. Under the
// CPU emulator a block has one thread, which walks its tile with unit stride: a plain loop that the
// compiler vectorises.
//
// Row kernels (softmax, normalisations, cross-entropy) give each row a group of `threads_per_row`
// threads, 1 to 32, that share the row the same way and combine partial results with warp shuffles.
// A GPU wants a warp per row; the emulator is fastest with 1, where no shuffle happens. Tests run both.

#ifdef __CUDACC__
int threads_per_row = 32;
static const int element_threads = 256;      // threads per block of an elementwise kernel
static const long max_blocks = 132 * 32;     // enough to fill an H100 several times over
static int rows_per_block() { return 256 / threads_per_row; }
#else
int threads_per_row = 1;
static const int element_threads = 1;
static const long max_blocks = 64;           // a few per core, so the cores share the work evenly
static int rows_per_block() { return threads_per_row < 16 ? 16 / threads_per_row : 1; }
#endif

static unsigned clamp_blocks(long blocks) { return unsigned(blocks < 1 ? 1 : blocks < max_blocks ? blocks : max_blocks); }

// Blocks of `threads` for a grid-stride loop over n elements (kernels with irregular indexing).
unsigned grid_size(long n, int threads) { return clamp_blocks((n + threads - 1) / threads); }

// Elementwise kernels: blocks of element_threads threads; on the CPU, a block per 2048 elements or more.
static unsigned element_blocks(long n) {
    long per_block = element_threads > 1 ? element_threads : 2048;
    return clamp_blocks((n + per_block - 1) / per_block);
}

// Row kernels: blocks of (threads_per_row, rows_per_block) threads.
static dim3 row_block() { return dim3(threads_per_row, rows_per_block()); }
static dim3 row_grid(long rows) { return dim3(unsigned((rows + rows_per_block() - 1) / rows_per_block())); }

// Calls body(i) for the i in [begin, end) that thread `thread` of `threads` handles: begin + thread,
// then every threads-th. A lone thread takes them all in a unit-stride loop (vectorisable).
template <typename F> __device__ __forceinline__ void for_each_strided(long begin, long end, int thread, int threads, F body) {
    if (threads == 1) {
        for (long i = begin; i < end; i++) body(i);
    } else {
        for (long i = begin + thread; i < end; i += threads) body(i);
    }
}

// Elementwise kernels: this block's tile [begin, end) of [0, n). Tiles are multiples of 64 elements,
// so they start on cache-line (and vector) boundaries.
struct Tile {
    long begin, end;
};
__device__ __forceinline__ Tile block_tile(long n) {
    long size = ((n + gridDim.x - 1) / gridDim.x + 63) / 64 * 64, begin = blockIdx.x * size;
    return Tile{begin, begin + size < n ? begin + size : n};
}

// Elementwise kernels: this thread's share of its block's tile.
template <typename F> __device__ __forceinline__ void for_each_element(long n, F body) {
    Tile tile = block_tile(n);
    for_each_strided(tile.begin, tile.end, threadIdx.x, blockDim.x, body);
}

// Row kernels: this thread's share of the `count` elements of its group's row.
template <typename F> __device__ __forceinline__ void for_each_in_row(int count, F body) {
    for_each_strided(0, count, threadIdx.x, blockDim.x, [&](long i) { body(int(i)); });
}

// Sums and maxima of f(i) over this thread's share of [begin, end) (as for_each_strided). A lone thread's
// loop is declared a SIMD reduction, which lets the CPU compiler vectorise it (adding in another order
// than a plain loop would, so the last bits may differ).
template <typename F> __device__ __forceinline__ real sum_strided(long begin, long end, int thread, int threads, F f) {
    real total = 0;
    if (threads == 1) {
#pragma omp simd reduction(+ : total)
        for (long i = begin; i < end; i++) total += f(i);
    } else {
        for (long i = begin + thread; i < end; i += threads) total += f(i);
    }
    return total;
}

template <typename F> __device__ __forceinline__ real max_strided(long begin, long end, int thread, int threads, F f) {
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
template <typename F> __device__ __forceinline__ real row_sum(int count, F f) {
    return sum_strided(0, count, threadIdx.x, blockDim.x, [&](long i) { return f(int(i)); });
}
template <typename F> __device__ __forceinline__ real row_max(int count, F f) {
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

// Sum and max across the threads of a row group, by butterfly shuffles: every thread gets the result.
__device__ __forceinline__ real group_sum(real value) {
    for (int offset = blockDim.x / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(warp_lanes(), value, offset, blockDim.x);
    return value;
}

__device__ __forceinline__ real group_max(real value) {
    for (int offset = blockDim.x / 2; offset > 0; offset /= 2) value = fmax(value, __shfl_xor_sync(warp_lanes(), value, offset, blockDim.x));
    return value;
}

// e^x in float by range reduction and a polynomial: x = k ln2 + r with |r| <= ln2/2, e^x = 2^k e^r.
// About 1 ulp, and only arithmetic, so loops of it vectorise on the CPU (libm's expf does not); a GPU
// runs it as a short chain of FMAs. In double (the gradient-check build) it is exp itself.
__device__ __forceinline__ float fast_exp(float x) {
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;  // (not fminf/fmaxf: their NaN rules block vectorising)
    float k = rintf(x * 1.44269504f);
    float r = fmaf(k, -0.693359375f, x);  // ln2 in two parts, so r keeps its low bits
    r = fmaf(k, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p * r, r, r) + 1.0f;
    return p * __int_as_float((int(k) + 127) << 23);
}
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }

// ----------------------------------------------------------------------------------------------------
// Memory: two bump arenas, one of device memory for tensors and one of host memory for tape closures.

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
        // Out of chunks: take a new one from the system, at least double the last.
        size_t size = arena.chunks.empty() ? arena.first_chunk_bytes : 2 * arena.chunk_bytes.back();
        while (size < bytes) size *= 2;
        char* memory = nullptr;
        if (arena.on_device) {
            cuda_check(cudaMalloc(&memory, size));
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
    return MemoryMark{device_arena.chunk, device_arena.offset, tape.size(), size_t(tape_arena.chunk), tape_arena.offset};
}

void memory_release(MemoryMark mark) {
    device_arena.chunk = mark.chunk, device_arena.offset = mark.offset;
    tape_arena.chunk = int(mark.tape_chunk), tape_arena.offset = mark.tape_offset;
    if (tape.size() > mark.tape_length) tape.resize(mark.tape_length);
}

size_t memory_in_use() {
    size_t bytes = device_arena.offset;
    for (int c = 0; c < device_arena.chunk && c < int(device_arena.chunks.size()); c++) bytes += device_arena.chunk_bytes[c];
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
    for_each_element(n, [&](long i) { out[i] = low + (high - low) * real(random_uniform(seed, uint64_t(i))); });
}

// Box-Muller: element i uses the uniform draws 2i and 2i+1 (u1 is kept away from 0 for the log).
__global__ void fill_normal_kernel(floatX* out, long n, uint64_t seed, real mean, real std) {
    for_each_element(n, [&](long i) {
        double u1 = (double(random_bits(seed, 2 * uint64_t(i)) >> 11) + 1.0) * (1.0 / 9007199254740992.0);
        double u2 = double(random_bits(seed, 2 * uint64_t(i) + 1) >> 11) * (1.0 / 9007199254740992.0);
        out[i] = mean + std * real(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
    });
}

void fill(floatX* out, long n, real value) { launch(fill_kernel, element_blocks(n), element_threads, 0, out, n, value); }
void fill_normal(floatX* out, long n, uint64_t seed, real mean, real std) {
    launch(fill_normal_kernel, element_blocks(n), element_threads, 0, out, n, seed, mean, std);
}
void fill_uniform(floatX* out, long n, uint64_t seed, real low, real high) {
    launch(fill_uniform_kernel, element_blocks(n), element_threads, 0, out, n, seed, low, high);
}

// ----------------------------------------------------------------------------------------------------
// Tensors

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

static Tensor make_tensor(Shape shape) { return make_tensor(int(shape.size()), shape.begin(), false); }

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
    if (long(values.size()) != t.size()) fail("tensor: %zu values given for shape %s", values.size(), shape_string(t).c_str());
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

// Device buffers of T (floatX or real) to and from host values in real, converted one by one.
template <typename T> static std::vector<real> download(const T* device, long n) {
    std::vector<T> stored(n);
    cuda_check(cudaMemcpy(stored.data(), device, n * sizeof(T), cudaMemcpyDeviceToHost));
    return std::vector<real>(stored.begin(), stored.end());
}

template <typename T> static void upload(T* device, const real* values, long n) {
    std::vector<T> stored(values, values + n);
    cuda_check(cudaMemcpy(device, stored.data(), n * sizeof(T), cudaMemcpyHostToDevice));
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
    else
        snprintf(text, sizeof text, "%.6g", double(v));
    return text;
}

// Nested brackets like NumPy; with more than 1000 elements, each dim shows its first and last 3.
static void format_dims(std::string& out, const std::vector<real>& values, const Tensor& t, int d, long offset, bool shorten) {
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
// The tape

bool grad_enabled = true;

void tape_append(TapeEntry entry, std::initializer_list<Tensor> outputs, std::initializer_list<Tensor> inputs) {
    if (outputs.size() > size_t(tape_max_outputs) || inputs.size() > size_t(tape_max_inputs)) fail("tape_append: too many tensors for one entry");
    std::copy(outputs.begin(), outputs.end(), entry.outputs);
    std::copy(inputs.begin(), inputs.end(), entry.inputs);
    tape.push_back(entry);
}

size_t tape_length() { return tape.size(); }

void backward(Tensor t) {
    if (!t.grad) fail("backward: the tensor %s does not require a gradient (no input of it does)", shape_string(t).c_str());
    // Walking back from t: an entry is needed when t depends on one of its outputs; then t depends on
    // its inputs too. (Tensors are told apart by their gradient buffers; a reshape shares its source's.)
    std::vector<bool> needed(tape.size(), false);
    std::unordered_set<const floatX*> depends = {t.grad};
    for (size_t i = tape.size(); i-- > 0;) {
        for (const Tensor& out : tape[i].outputs) needed[i] = needed[i] || (out.grad && depends.count(out.grad));
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

// ----------------------------------------------------------------------------------------------------
// Elementwise functions of one tensor: out = f(x), and backward dx += dout * f'(x).
// Each function is a small struct; the kernels are templates over it, one kernel per function.
// The derivative is computed from x alone, so backward needs nothing saved but the input.

struct Neg {
    __device__ real forward(real x) const { return -x; }
    __device__ real derivative(real) const { return -1; }
};
struct AddScalar {
    real c;
    __device__ real forward(real x) const { return x + c; }
    __device__ real derivative(real) const { return 1; }
};
struct MulScalar {
    real c;
    __device__ real forward(real x) const { return x * c; }
    __device__ real derivative(real) const { return c; }
};
struct PowScalar {
    real p;
    __device__ real forward(real x) const { return pow(x, p); }
    __device__ real derivative(real x) const { return p * pow(x, p - 1); }
};
struct Exp {
    __device__ real forward(real x) const { return fast_exp(x); }
    __device__ real derivative(real x) const { return fast_exp(x); }
};
struct Log {
    __device__ real forward(real x) const { return log(x); }
    __device__ real derivative(real x) const { return 1 / x; }
};
struct Sqrt {
    __device__ real forward(real x) const { return sqrt(x); }
    __device__ real derivative(real x) const { return real(0.5) / sqrt(x); }
};
struct Sin {
    __device__ real forward(real x) const { return sin(x); }
    __device__ real derivative(real x) const { return cos(x); }
};
struct Cos {
    __device__ real forward(real x) const { return cos(x); }
    __device__ real derivative(real x) const { return -sin(x); }
};
struct Tanh {
    __device__ real forward(real x) const { return tanh(x); }
    __device__ real derivative(real x) const { return 1 - tanh(x) * tanh(x); }
};
struct Sigmoid {
    __device__ real forward(real x) const { return 1 / (1 + fast_exp(-x)); }
    __device__ real derivative(real x) const { return forward(x) * (1 - forward(x)); }
};
struct Relu {
    __device__ real forward(real x) const { return x > 0 ? x : 0; }
    __device__ real derivative(real x) const { return x > 0 ? 1 : 0; }
};

template <typename F> __global__ void map_forward_kernel(floatX* out, const floatX* x, long n, F f) {
    for_each_element(n, [&](long i) { out[i] = f.forward(x[i]); });
}

template <typename F> __global__ void map_backward_kernel(floatX* dx, const floatX* dout, const floatX* x, long n, F f) {
    for_each_element(n, [&](long i) { dx[i] += dout[i] * f.derivative(x[i]); });
}

template <typename F> static void map_forward(floatX* out, const floatX* x, long n, F f) {
    launch(map_forward_kernel<F>, element_blocks(n), element_threads, 0, out, x, n, f);
}

template <typename F> static void map_backward(floatX* dx, const floatX* dout, const floatX* x, long n, F f) {
    launch(map_backward_kernel<F>, element_blocks(n), element_threads, 0, dx, dout, x, n, f);
}

template <typename F> static Tensor map(Tensor x, F f) {
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
    __device__ real forward(real a, real b) const { return a + b; }
    __device__ real da(real, real) const { return 1; }
    __device__ real db(real, real) const { return 1; }
};
struct Sub {
    __device__ real forward(real a, real b) const { return a - b; }
    __device__ real da(real, real) const { return 1; }
    __device__ real db(real, real) const { return -1; }
};
struct Mul {
    __device__ real forward(real a, real b) const { return a * b; }
    __device__ real da(real, real b) const { return b; }
    __device__ real db(real a, real) const { return a; }
};
struct Div {
    __device__ real forward(real a, real b) const { return a / b; }
    __device__ real da(real, real b) const { return 1 / b; }
    __device__ real db(real a, real b) const { return -a / (b * b); }
};
struct Maximum {  // ties send the gradient to a
    __device__ real forward(real a, real b) const { return a >= b ? a : b; }
    __device__ real da(real a, real b) const { return a >= b ? 1 : 0; }
    __device__ real db(real a, real b) const { return a >= b ? 0 : 1; }
};
struct Minimum {
    __device__ real forward(real a, real b) const { return a <= b ? a : b; }
    __device__ real da(real a, real b) const { return a <= b ? 1 : 0; }
    __device__ real db(real a, real b) const { return a <= b ? 0 : 1; }
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
            fail("cannot broadcast shapes %s and %s", shape_string(a).c_str(), shape_string(b).c_str());
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

template <typename F> __global__ void broadcast_forward_kernel(floatX* out, const floatX* a, const floatX* b, long n, Broadcast s, F f) {
    for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += long(gridDim.x) * blockDim.x) {
        long rest = i, ia = 0, ib = 0;
        for (int d = max_dims - 1; d >= 0; d--) {
            long c = rest % s.out[d];
            rest /= s.out[d];
            ia += c * s.a_stride[d], ib += c * s.b_stride[d];
        }
        out[i] = f.forward(a[ia], b[ib]);
    }
}

// Gradient for one input ("mine"; the other is "theirs"): thread per element of mine, summing over the
// output positions that element was broadcast to.
template <typename F, bool FOR_A>
__global__ void broadcast_backward_kernel(floatX* dmine, const floatX* dout, const floatX* a, const floatX* b, long n_mine, Broadcast s, F f) {
    const int* mine_dims = FOR_A ? s.a_dims : s.b_dims;
    const long* their_stride = FOR_A ? s.b_stride : s.a_stride;
    long copies = 1;
    for (int d = 0; d < max_dims; d++)
        if (mine_dims[d] == 1) copies *= s.out[d];
    for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n_mine; i += long(gridDim.x) * blockDim.x) {
        int coord[max_dims];
        long rest = i;
        for (int d = max_dims - 1; d >= 0; d--) coord[d] = int(rest % mine_dims[d]), rest /= mine_dims[d];
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

template <typename F> static Tensor broadcast(Tensor a, Tensor b, F f) {
    Tensor like;
    Broadcast s = broadcast_shapes(a, b, &like);
    Tensor out = new_result(like, {a, b});
    long n = out.size();
    launch(broadcast_forward_kernel<F>, grid_size(n, 256), 256, 0, out.data, a.data, b.data, n, s, f);
    if (out.grad) record({out}, {a, b}, [=] {
        if (a.grad) launch(broadcast_backward_kernel<F, true>, grid_size(a.size(), 256), 256, 0, a.grad, out.grad, a.data, b.data, a.size(), s, f);
        if (b.grad) launch(broadcast_backward_kernel<F, false>, grid_size(b.size(), 256), 256, 0, b.grad, out.grad, a.data, b.data, b.size(), s, f);
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
__global__ void reduce_forward_kernel(floatX* out, int* winner, const floatX* x, long outer, int n, long inner, real scale) {
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
    // Combine across the group. For max/min each thread also learns which k won, smallest k on ties.
    for (int offset = blockDim.x / 2; offset > 0; offset /= 2) {
        real other = __shfl_xor_sync(warp_lanes(), best, offset, blockDim.x);
        int other_k = __shfl_xor_sync(warp_lanes(), best_k, offset, blockDim.x);
        if (KIND == reduce_sum) best += other;
        else if ((KIND == reduce_max ? other > best : other < best) || (other == best && other_k < best_k)) best = other, best_k = other_k;
    }
    if (active && threadIdx.x == 0) {
        out[row] = best * scale;
        if (winner) winner[row] = best_k;
    }
}

__global__ void reduce_backward_kernel(floatX* dx, const floatX* dout, const int* winner, long outer, int n, long inner, real scale) {
    long total = outer * n * inner;
    for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += long(gridDim.x) * blockDim.x) {
        long o = i / (n * inner), k = i / inner % n, j = i % inner;
        long row = o * inner + j;
        if (!winner || winner[row] == k) dx[i] += dout[row] * scale;
    }
}

template <ReduceKind KIND> static Tensor reduce(Tensor x, int axis, bool is_mean) {
    if (axis < 0) axis += x.ndim;
    if (axis < 0 || axis >= x.ndim) fail("reduce: axis out of range for a tensor of shape %s", shape_string(x).c_str());
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
    launch(reduce_forward_kernel<KIND>, row_grid(outer * inner), row_block(), 0, out.data, winner, x.data, outer, n, inner, scale);
    if (out.grad) record({out}, {x}, [=] {
        long total = outer * n * inner;
        launch(reduce_backward_kernel, grid_size(total, 256), 256, 0, x.grad, out.grad, winner, outer, n, inner, scale);
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
    if (int(shape.size()) > max_dims) fail("reshape: at most %d dims, got %zu", max_dims, shape.size());
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
    if (out.size() != x.size()) fail("reshape: cannot view %s (%ld elements) with %d dims of %ld elements", shape_string(x).c_str(), x.size(), out.ndim, out.size());
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

// out = x with dims d0 and d1 swapped (x seen as max_dims-d). With `accumulate` it adds instead, which is the
// backward: transposing the output gradient back into dx.
__global__ void transpose_kernel(floatX* out, const floatX* x, Dims x_shape, int d0, int d1, long n, bool accumulate) {
    Dims out_shape = x_shape;
    out_shape.d[d0] = x_shape.d[d1], out_shape.d[d1] = x_shape.d[d0];
    for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += long(gridDim.x) * blockDim.x) {
        int coord[max_dims];
        long rest = i;
        for (int d = max_dims - 1; d >= 0; d--) coord[d] = int(rest % x_shape.d[d]), rest /= x_shape.d[d];
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
    if (dim0 < 0 || dim1 < 0 || dim0 >= x.ndim || dim1 >= x.ndim) fail("transpose: dims out of range for %s", shape_string(x).c_str());
    Tensor like = x;
    like.shape[dim0] = x.shape[dim1], like.shape[dim1] = x.shape[dim0];
    Tensor out = new_result(like, {x});
    long n = x.size();
    int d0 = dim0 + max_dims - x.ndim, d1 = dim1 + max_dims - x.ndim;
    launch(transpose_kernel, grid_size(n, 256), 256, 0, out.data, x.data, padded_dims(x), d0, d1, n, false);
    if (out.grad) record({out}, {x}, [=] { launch(transpose_kernel, grid_size(n, 256), 256, 0, x.grad, out.grad, padded_dims(out), d0, d1, n, true); });
    return out;
}

// ----------------------------------------------------------------------------------------------------
// Softmax over the last axis (rows of n): y = exp(x - max) / sum(exp(x - max)).
// Backward: dx = y * (dy - sum(dy * y)), the sum taken over the row.

__global__ void softmax_forward_kernel(floatX* out, const floatX* x, long rows, int n) {
    bool active;
    long row = group_row(rows, &active);
    const floatX* xr = x + row * n;
    floatX* yr = out + row * n;
    real largest = group_max(row_max(n, [&](int i) { return xr[i]; }));
    real total = group_sum(row_sum(n, [&](int i) { return fast_exp(xr[i] - largest); }));
    if (active) for_each_in_row(n, [&](int i) { yr[i] = fast_exp(xr[i] - largest) / total; });
}

__global__ void softmax_backward_kernel(floatX* dx, const floatX* dout, const floatX* out, long rows, int n) {
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
    if (out.grad) record({out}, {x}, [=] { launch(softmax_backward_kernel, row_grid(rows), row_block(), 0, x.grad, out.grad, out.data, rows, n); });
    return out;
}

// ----------------------------------------------------------------------------------------------------
// Matrix products
//
// The GPU build calls cuBLAS. The CPU build calls oneDNN's matmul primitive (the library PyTorch uses
// on CPUs), which picks its kernels for the machine at run time: AMX or AVX512-BF16 for bfloat16 where
// the CPU has them. A primitive is made once per layout and kept, so a training step after the first
// makes none. The double build (the gradient checks) uses OpenBLAS: oneDNN has no double products.

#ifdef __CUDACC__
// Every row of out (rows, columns) becomes a copy of `row` (a row kernel).
__global__ void broadcast_rows_kernel(floatX* out, const floatX* row, long rows, int columns) {
    bool active;
    long r = group_row(rows, &active);
    if (!active) return;
    floatX* o = out + r * columns;
    for_each_in_row(columns, [&](int c) { o[c] = row[c]; });
}

// cuBLAS is column-major: it computes C^T = op(B)^T op(A)^T, which is C in row-major. A bias is copied
// into every row of C first, and the product added to it.
static void cublas_gemm(const GemmShape& s, real alpha, GemmInput A, GemmInput B, real beta, GemmOutput C) {
    if (C.bias) {
        launch(broadcast_rows_kernel, row_grid(s.M), row_block(), 0, C.data, C.bias, long(s.M), s.N);
        beta = 1;
    }
    cublasOperation_t op_a = A.transpose ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = B.transpose ? CUBLAS_OP_T : CUBLAS_OP_N;
    for (int o = 0; o < s.outer; o++) {
        const floatX *a = A.data + o * A.outer, *b = B.data + o * B.outer;
        floatX* c = C.data + o * C.outer;
#if defined(TRICYCLE_DOUBLE)
        cublas_check(cublasDgemmStridedBatched(cublas_handle(), op_b, op_a, s.N, s.M, s.K, &alpha, b, int(B.ld), B.inner, a, int(A.ld), A.inner,
                                               &beta, c, int(C.ld), C.inner, s.inner));
#else
        cudaDataType type = std::is_same<floatX, float>::value ? CUDA_R_32F : CUDA_R_16BF;  // bfloat16: float accumulation
        cublas_check(cublasGemmStridedBatchedEx(cublas_handle(), op_b, op_a, s.N, s.M, s.K, &alpha, b, type, int(B.ld), B.inner, a, type,
                                                int(A.ld), A.inner, &beta, c, type, int(C.ld), C.inner, s.inner, CUBLAS_COMPUTE_32F,
                                                CUBLAS_GEMM_DEFAULT));
#endif
    }
}
#else
static long cpu_matmuls_made = 0;

#ifndef TRICYCLE_DOUBLE
// One operand of oneDNN's matmul as a 4-D (outer, inner, rows, cols) view, rows x cols after the
// transpose. A batch dimension of size 1 gets a dense stride (oneDNN checks every stride).
static dnnl::memory::desc onednn_view(dnnl::memory::data_type type, const GemmShape& s, int rows, int cols, long ld, bool transpose, long outer,
                                    long inner) {
    long matrix = transpose ? ld * cols : ld * rows;
    dnnl::memory::dims strides = {s.outer > 1 ? outer : s.inner * matrix, s.inner > 1 ? inner : matrix, transpose ? 1 : ld, transpose ? ld : 1};
    return dnnl::memory::desc({s.outer, s.inner, rows, cols}, type, strides);
}

struct CpuMatmul {
    dnnl::matmul primitive;
    dnnl::memory a, b, c, bias;
};

// C = alpha op(A) op(B) + beta C on oneDNN, with a primitive made on first use of the layout.
static void onednn_gemm(dnnl::memory::data_type type, const GemmShape& s, real alpha, const void* A, long lda, bool ta, long a_outer, long a_inner,
                      const void* B, long ldb, bool tb, long b_outer, long b_inner, real beta, void* C, long ldc, long c_outer, long c_inner,
                      const void* bias) {
    static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
    static dnnl::stream stream(engine);
    static std::map<std::vector<long>, CpuMatmul> made;
    std::vector<long> key = {long(type), s.M, s.N, s.K, s.outer, s.inner, lda, ta, a_outer, a_inner, ldb, tb, b_outer, b_inner,
                             ldc, c_outer, c_inner, long(float_bits(alpha)), long(float_bits(beta)), bias != nullptr};
    auto found = made.find(key);
    if (found == made.end()) {
        if (made.size() >= 4096) made.clear();  // generation makes a layout per length; keep the cache bounded
        dnnl::memory::desc a = onednn_view(type, s, s.M, s.K, lda, ta, a_outer, a_inner), b = onednn_view(type, s, s.K, s.N, ldb, tb, b_outer, b_inner);
        dnnl::memory::desc c = onednn_view(type, s, s.M, s.N, ldc, false, c_outer, c_inner);
        dnnl::memory::desc row = bias ? dnnl::memory::desc({1, 1, 1, s.N}, type, dnnl::memory::format_tag::abcd) : dnnl::memory::desc();
        dnnl::primitive_attr attributes;
        if (alpha != 1) attributes.set_output_scales(0, {float(alpha)});
        if (beta != 0) {
            dnnl::post_ops accumulate;
            accumulate.append_sum(float(beta));
            attributes.set_post_ops(accumulate);
        }
        dnnl::matmul::primitive_desc description(bias ? dnnl::matmul::desc(a, b, row, c) : dnnl::matmul::desc(a, b, c), attributes, engine);
        CpuMatmul product{dnnl::matmul(description), dnnl::memory(a, engine, DNNL_MEMORY_NONE), dnnl::memory(b, engine, DNNL_MEMORY_NONE),
                          dnnl::memory(c, engine, DNNL_MEMORY_NONE), dnnl::memory(row, engine, DNNL_MEMORY_NONE)};
        found = made.emplace(key, product).first;
        cpu_matmuls_made++;
    }
    CpuMatmul& product = found->second;
    product.a.set_data_handle(const_cast<void*>(A));
    product.b.set_data_handle(const_cast<void*>(B));
    product.c.set_data_handle(C);
    std::unordered_map<int, dnnl::memory> arguments = {{DNNL_ARG_SRC, product.a}, {DNNL_ARG_WEIGHTS, product.b}, {DNNL_ARG_DST, product.c}};
    if (bias) {
        product.bias.set_data_handle(const_cast<void*>(bias));
        arguments[DNNL_ARG_BIAS] = product.bias;
    }
    product.primitive.execute(stream, arguments);
    stream.wait();
}
#endif

#ifdef TRICYCLE_BF16
// Whether this CPU multiplies bfloat16 matrices natively (oneDNN refuses the primitive otherwise).
static bool cpu_has_bfloat16_products() {
    static int known = -1;
    if (known < 0) {
        try {
            dnnl::engine engine(dnnl::engine::kind::cpu, 0);
            dnnl::memory::desc m({16, 16}, dnnl::memory::data_type::bf16, dnnl::memory::format_tag::ab);
            dnnl::matmul::primitive_desc(dnnl::matmul::desc(m, m, m), engine);
            known = 1;
        } catch (const dnnl::error&) {
            known = 0;
        }
    }
    return known == 1;
}

// Without it, the bfloat16 operands are widened to dense float copies, multiplied, and rounded back.
static std::vector<float> widen(const GemmShape& s, const bf16* x, int rows, int cols, long ld, bool transpose, long outer, long inner) {
    int stored_rows = transpose ? cols : rows, stored_cols = transpose ? rows : cols;
    std::vector<float> wide(size_t(s.outer) * s.inner * stored_rows * stored_cols);
    float* w = wide.data();
    for (int o = 0; o < s.outer; o++)
        for (int j = 0; j < s.inner; j++)
            for (int r = 0; r < stored_rows; r++)
                for (int c = 0; c < stored_cols; c++) *w++ = x[o * outer + j * inner + r * ld + c];
    return wide;
}
#endif

static void cpu_gemm(const GemmShape& s, real alpha, GemmInput A, GemmInput B, real beta, GemmOutput C) {
#if defined(TRICYCLE_DOUBLE)
    static bool blas_single_threaded = (openblas_set_num_threads(1), true);  // the split below runs the cores
    (void)blas_single_threaded;
    if (C.bias) {  // the bias into every row, the product added to it (a bias comes with one matrix)
        for (int r = 0; r < s.M; r++) memcpy(C.data + r * C.ld, C.bias, s.N * sizeof(double));
        beta = 1;
    }
    int count = s.outer * s.inner;
#pragma omp parallel for schedule(static) if (count > 1)
    for (int i = 0; i < count; i++) {
        long o = i / s.inner, j = i % s.inner;
        cblas_dgemm(CblasRowMajor, A.transpose ? CblasTrans : CblasNoTrans, B.transpose ? CblasTrans : CblasNoTrans, s.M, s.N, s.K, alpha,
                    A.data + o * A.outer + j * A.inner, int(A.ld), B.data + o * B.outer + j * B.inner, int(B.ld), beta,
                    C.data + o * C.outer + j * C.inner, int(C.ld));
    }
#elif defined(TRICYCLE_BF16)
    using dt = dnnl::memory::data_type;
    if (cpu_has_bfloat16_products()) {
        onednn_gemm(dt::bf16, s, alpha, A.data, A.ld, A.transpose, A.outer, A.inner, B.data, B.ld, B.transpose, B.outer, B.inner, beta, C.data, C.ld,
                    C.outer, C.inner, C.bias);
        return;
    }
    std::vector<float> a = widen(s, A.data, s.M, s.K, A.ld, A.transpose, A.outer, A.inner), b = widen(s, B.data, s.K, s.N, B.ld, B.transpose, B.outer, B.inner);
    std::vector<float> c = beta != 0 ? widen(s, C.data, s.M, s.N, C.ld, false, C.outer, C.inner) : std::vector<float>(size_t(s.outer) * s.inner * s.M * s.N);
    long a_ld = A.transpose ? s.M : s.K, b_ld = B.transpose ? s.K : s.N, a_size = long(s.M) * s.K, b_size = long(s.K) * s.N, c_size = long(s.M) * s.N;
    GemmShape row{.M = 1, .N = s.N, .K = 1};
    std::vector<float> bias = C.bias ? widen(row, C.bias, 1, s.N, s.N, false, 0, 0) : std::vector<float>();
    onednn_gemm(dt::f32, s, alpha, a.data(), a_ld, A.transpose, s.inner * a_size, a_size, b.data(), b_ld, B.transpose, s.inner * b_size, b_size, beta,
                c.data(), s.N, s.inner * c_size, c_size, C.bias ? bias.data() : nullptr);
    const float* wide = c.data();
    for (int o = 0; o < s.outer; o++)
        for (int j = 0; j < s.inner; j++)
            for (int r = 0; r < s.M; r++)
                for (int col = 0; col < s.N; col++) C.data[o * C.outer + j * C.inner + r * C.ld + col] = *wide++;
#else
    onednn_gemm(dnnl::memory::data_type::f32, s, alpha, A.data, A.ld, A.transpose, A.outer, A.inner, B.data, B.ld, B.transpose, B.outer, B.inner,
                beta, C.data, C.ld, C.outer, C.inner, C.bias);
#endif
}
#endif

std::string gemm_engine() {
#if defined(__CUDACC__)
    return std::is_same<floatX, bf16>::value ? "cuBLAS, bfloat16 with float accumulation" : "cuBLAS";
#elif defined(TRICYCLE_DOUBLE)
    return "OpenBLAS, double";
#elif defined(TRICYCLE_BF16)
    return cpu_has_bfloat16_products() ? "oneDNN, bfloat16 with float accumulation"
                                       : "oneDNN, float (bfloat16 operands widened: this CPU has no bfloat16 matrix instructions)";
#else
    return "oneDNN, float";
#endif
}

long gemm_layouts_made() {
#ifdef __CUDACC__
    return 0;
#else
    return cpu_matmuls_made;
#endif
}

void gemm(GemmShape shape, real alpha, GemmInput A, GemmInput B, real beta, GemmOutput C) {
    if (profiling) {
        char name[96];
        int count = shape.outer * shape.inner;
        snprintf(name, sizeof name, "gemm %s%s %dx%dx%d%s", A.transpose ? "T" : "N", B.transpose ? "T" : "N", shape.M, shape.N, shape.K,
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
}

// out = a @ b. a is (..., M, K); b is (K, N), shared by every matrix of a, or (..., K, N) with the
// same batch dims as a. Backward: da += dout @ b^T, db += a^T @ dout (summed over the batch when b is
// shared: then the batch simply joins M, one big product).
Tensor matmul(Tensor a, Tensor b) {
    if (a.ndim < 2 || b.ndim < 2) fail("matmul: both operands need at least 2 dims, got %s and %s", shape_string(a).c_str(), shape_string(b).c_str());
    int M = a.dim(-2), K = a.dim(-1), N = b.dim(-1);
    bool shared_b = b.ndim == 2;
    bool same_batch = b.ndim == a.ndim;
    for (int d = 0; same_batch && d < a.ndim - 2; d++) same_batch = a.shape[d] == b.shape[d];
    if (b.dim(-2) != K || (!shared_b && !same_batch))
        fail("matmul: shapes %s and %s do not match", shape_string(a).c_str(), shape_string(b).c_str());
    int batch = int(a.size() / (long(M) * K));
    Tensor like = a;
    like.shape[a.ndim - 1] = N;
    Tensor out = new_result(like, {a, b});
    long a_size = long(M) * K, b_size = shared_b ? 0 : long(K) * N, c_size = long(M) * N;
    if (shared_b) gemm({.M = batch * M, .N = N, .K = K}, 1, {.data = a.data, .ld = K}, {.data = b.data, .ld = N}, 0, {.data = out.data, .ld = N});
    else
        gemm({.M = M, .N = N, .K = K, .inner = batch}, 1, {.data = a.data, .ld = K, .inner = a_size}, {.data = b.data, .ld = N, .inner = b_size}, 0,
             {.data = out.data, .ld = N, .inner = c_size});
    if (out.grad) record({out}, {a, b}, [=] {
        if (shared_b) {
            if (a.grad)
                gemm({.M = batch * M, .N = K, .K = N}, 1, {.data = out.grad, .ld = N}, {.data = b.data, .ld = N, .transpose = true}, 1,
                     {.data = a.grad, .ld = K});
            if (b.grad)
                gemm({.M = K, .N = N, .K = batch * M}, 1, {.data = a.data, .ld = K, .transpose = true}, {.data = out.grad, .ld = N}, 1,
                     {.data = b.grad, .ld = N});
            return;
        }
        if (a.grad)  // da (M, K) = dout (M, N) @ b^T, per matrix
            gemm({.M = M, .N = K, .K = N, .inner = batch}, 1, {.data = out.grad, .ld = N, .inner = c_size},
                 {.data = b.data, .ld = N, .transpose = true, .inner = b_size}, 1, {.data = a.grad, .ld = K, .inner = a_size});
        if (b.grad)  // db (K, N) = a^T @ dout
            gemm({.M = K, .N = N, .K = M, .inner = batch}, 1, {.data = a.data, .ld = K, .transpose = true, .inner = a_size},
                 {.data = out.grad, .ld = N, .inner = c_size}, 1, {.data = b.grad, .ld = N, .inner = b_size});
    });
    return out;
}

// ====================================================================================================
// Layers. Each layer is a pair of functions on raw device pointers, <layer>_forward and
// <layer>_backward, that launch its kernels, plus a tape version on Tensors that runs the forward and
// records the backward. Backward functions add into gradients (+=) and skip null gradient pointers.

// ----------------------------------------------------------------------------------------------------
// Column sums, the backward of whatever is broadcast over rows. For a bias: dbias[c] += sum_r dout[r, c].
// For a norm's weight: dweight[c] += sum_r dout[r, c] * xhat[r, c], with xhat = (x - mean) * rstd
// recomputed from the saved statistics (mean is null for RMSNorm). Two stages, each adding in a fixed
// order (deterministic, no atomics): blocks of (column tile, slab of rows) write partial sums, then one
// pass adds the slabs up. Each thread owns whole columns, so neighbouring threads read neighbouring
// addresses.

constexpr int column_slab_rows = 32;

__global__ void column_partial_sums_kernel(real* partial, real* partial_weighted, const floatX* dout, const floatX* x, const real* mean,
                                           const real* rstd, long rows, int C) {
    long r0 = long(blockIdx.y) * column_slab_rows, r1 = r0 + column_slab_rows < rows ? r0 + column_slab_rows : rows;
    long tile = (C + gridDim.x - 1) / gridDim.x, c0 = blockIdx.x * tile, c1 = c0 + tile < C ? c0 + tile : C;
    real* sums = partial ? partial + long(blockIdx.y) * C : nullptr;
    real* weighted_sums = partial_weighted ? partial_weighted + long(blockIdx.y) * C : nullptr;
    auto xhat = [&](long r, long c) { return (x[r * C + c] - (mean ? mean[r] : 0)) * rstd[r]; };
    if (blockDim.x == 1) {  // a lone thread adds row after row into the sums: unit stride, vectorised
        for (long c = c0; c < c1; c++) {
            if (sums) sums[c] = 0;
            if (weighted_sums) weighted_sums[c] = 0;
        }
        for (long r = r0; r < r1; r++) {
            if (sums)
                for (long c = c0; c < c1; c++) sums[c] += dout[r * C + c];
            if (weighted_sums)
                for (long c = c0; c < c1; c++) weighted_sums[c] += dout[r * C + c] * xhat(r, c);
        }
        return;
    }
    for_each_strided(c0, c1, threadIdx.x, blockDim.x, [&](long c) {  // each thread sums its columns in registers
        real sum = 0, weighted = 0;
        for (long r = r0; r < r1; r++) {
            sum += dout[r * C + c];
            if (weighted_sums) weighted += dout[r * C + c] * xhat(r, c);
        }
        if (sums) sums[c] = sum;
        if (weighted_sums) weighted_sums[c] = weighted;
    });
}

__global__ void add_partial_sums_kernel(floatX* dcolumn, const real* partial, int slabs, int C) {
    for_each_element(C, [&](long c) {
        real total = 0;
        for (int s = 0; s < slabs; s++) total += partial[long(s) * C + c];
        dcolumn[c] += total;
    });
}

// dsum[c] += sum_r dout[r, c] and dweighted[c] += sum_r dout[r, c] * xhat[r, c]; either may be null.
static void column_sums(floatX* dsum, floatX* dweighted, const floatX* dout, const floatX* x, const real* mean, const real* rstd, long rows, int C) {
    int slabs = int((rows + column_slab_rows - 1) / column_slab_rows);
    unsigned column_tiles = element_threads > 1 ? (C + element_threads - 1) / element_threads : 1;
    real* partial = dsum ? device_alloc<real>(long(slabs) * C) : nullptr;
    real* partial_weighted = dweighted ? device_alloc<real>(long(slabs) * C) : nullptr;
    launch(column_partial_sums_kernel, dim3(column_tiles, slabs), element_threads, 0, partial, partial_weighted, dout, x, mean, rstd, rows, C);
    if (dsum) launch(add_partial_sums_kernel, element_blocks(C), element_threads, 0, dsum, partial, slabs, C);
    if (dweighted) launch(add_partial_sums_kernel, element_blocks(C), element_threads, 0, dweighted, partial_weighted, slabs, C);
}

// ----------------------------------------------------------------------------------------------------
// Embedding: tokens (B,T) -> out (B,T,C),  out[b,t,:] = wte[tokens[b,t], :] + wpe[t, :]
// (no wpe in rotary models). Backward: dwte[v, :] += the sum of dout[b,t,:] over the positions
// holding token v, dwpe[t, :] += the sum of dout[b,t,:] over b.
// Deterministic and parallel without atomics: the positions are grouped by token first (a sort of the
// B*T token ids on the host, done during the forward pass), then a block per (group, channel tile) adds
// its group's rows in position order, in a float register, and adds the total to dwte once.

// A row kernel: one row per position.
__global__ void embedding_forward_kernel(floatX* out, const int* tokens, const floatX* wte, const floatX* wpe, int B, int T, int C) {
    bool active;
    long position = group_row(long(B) * T, &active);
    if (!active) return;
    const floatX* token_row = wte + long(tokens[position]) * C;
    const floatX* position_row = wpe ? wpe + (position % T) * C : nullptr;
    floatX* o = out + position * C;
    for_each_in_row(C, [&](int c) { o[c] = token_row[c] + (position_row ? real(position_row[c]) : 0); });
}

// Group g: token group_token[g], positions[group_start[g] .. group_start[g + 1]).
__global__ void embedding_token_backward_kernel(floatX* dwte, const floatX* dout, const int* group_token, const int* group_start,
                                                const int* positions, int C) {
    int g = blockIdx.x, first = group_start[g], end = group_start[g + 1];
    long tile = (C + gridDim.y - 1) / gridDim.y, c0 = blockIdx.y * tile, c1 = c0 + tile < C ? c0 + tile : C;
    floatX* row = dwte + long(group_token[g]) * C;
    for_each_strided(c0, c1, threadIdx.x, blockDim.x, [&](long c) {
        real total = 0;
        for (int i = first; i < end; i++) total += dout[long(positions[i]) * C + c];
        row[c] += total;
    });
}

// dwpe (T, C): element (t, c) sums the B sequences.
__global__ void embedding_position_backward_kernel(floatX* dwpe, const floatX* dout, int B, int T, int C) {
    long n = long(T) * C;
    for_each_element(n, [&](long i) {
        real total = 0;
        for (int b = 0; b < B; b++) total += dout[b * n + i];
        dwpe[i] += total;
    });
}

void embedding_forward(floatX* out, const int* tokens, const floatX* wte, const floatX* wpe, int B, int T, int C) {
    launch(embedding_forward_kernel, row_grid(long(B) * T), row_block(), 0, out, tokens, wte, wpe, B, T, C);
}

// Sorts the n positions by token (then position) and writes the groups into buffers of the caller's:
// group_token (n), group_start (n + 1), positions (n). Returns the number of groups.
int group_tokens(TokenGroups* groups, const int* tokens, long n) {
    std::vector<int> host(n), order(n);
    cuda_check(cudaMemcpy(host.data(), tokens, n * sizeof(int), cudaMemcpyDeviceToHost));
    for (long i = 0; i < n; i++) order[i] = int(i);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return host[a] < host[b]; });
    std::vector<int> token, start;
    for (long i = 0; i < n; i++)
        if (i == 0 || host[order[i]] != host[order[i - 1]]) token.push_back(host[order[i]]), start.push_back(int(i));
    start.push_back(int(n));
    cuda_check(cudaMemcpy(groups->token, token.data(), token.size() * sizeof(int), cudaMemcpyHostToDevice));
    cuda_check(cudaMemcpy(groups->start, start.data(), start.size() * sizeof(int), cudaMemcpyHostToDevice));
    cuda_check(cudaMemcpy(groups->positions, order.data(), n * sizeof(int), cudaMemcpyHostToDevice));
    return groups->count = int(token.size());
}

void embedding_backward(floatX* dwte, floatX* dwpe, const floatX* dout, const TokenGroups& groups, int B, int T, int C) {
    if (dwte) {
        unsigned channel_tiles = element_threads > 1 ? (C + element_threads - 1) / element_threads : 1;
        launch(embedding_token_backward_kernel, dim3(groups.count, channel_tiles), element_threads, 0, dwte, dout, groups.token, groups.start,
               groups.positions, C);
    }
    if (dwpe) launch(embedding_position_backward_kernel, element_blocks(long(T) * C), element_threads, 0, dwpe, dout, B, T, C);
}

Tensor embedding(const int* tokens, int B, int T, Tensor wte, Tensor wpe) {
    int C = wte.dim(-1);
    Tensor like;
    like.ndim = 3, like.shape[0] = B, like.shape[1] = T, like.shape[2] = C;
    Tensor out = new_result(like, {wte, wpe});
    embedding_forward(out.data, tokens, wte.data, wpe.data, B, T, C);
    if (out.grad) {
        long n = long(B) * T;
        TokenGroups groups{device_alloc<int>(n), device_alloc<int>(n + 1), device_alloc<int>(n), 0};
        group_tokens(&groups, tokens, n);
        record({out}, {wte, wpe}, [=] { embedding_backward(wte.grad, wpe.grad, out.grad, groups, B, T, C); });
    }
    return out;
}

// ----------------------------------------------------------------------------------------------------
// Linear: x (N, in) -> out (N, out_features),  out = x @ W^T + b,  W (out_features, in), b optional.
// Backward: dx += dout @ W,  dW += dout^T @ x,  db += column sums of dout.

void linear_forward(floatX* out, const floatX* x, const floatX* weight, const floatX* bias, long N, int in, int out_features) {
    gemm({.M = int(N), .N = out_features, .K = in}, 1, {.data = x, .ld = in}, {.data = weight, .ld = in, .transpose = true}, 0,
         {.data = out, .ld = out_features, .bias = bias});
}

void linear_backward(floatX* dx, floatX* dweight, floatX* dbias, const floatX* dout, const floatX* x, const floatX* weight, long N, int in,
                     int out_features, InputGrad mode) {
    if (dx)  // dx (N, in) = dout (N, out) @ W (out, in)
        gemm({.M = int(N), .N = in, .K = out_features}, 1, {.data = dout, .ld = out_features}, {.data = weight, .ld = in},
             mode == InputGrad::add ? 1 : 0, {.data = dx, .ld = in});
    if (dweight)  // dW (out, in) += dout^T (out, N) @ x (N, in)
        gemm({.M = out_features, .N = in, .K = int(N)}, 1, {.data = dout, .ld = out_features, .transpose = true}, {.data = x, .ld = in}, 1,
             {.data = dweight, .ld = in});
    if (dbias) column_sums(dbias, nullptr, dout, nullptr, nullptr, nullptr, N, out_features);
}

Tensor linear(Tensor x, Tensor weight, Tensor bias) {
    int in = x.dim(-1), out_features = weight.dim(0);
    if (weight.ndim != 2 || weight.dim(1) != in || (bias.data && bias.size() != out_features))
        fail("linear: input %s does not fit weight %s and bias %s", shape_string(x).c_str(), shape_string(weight).c_str(), shape_string(bias).c_str());
    long N = x.size() / in;
    Tensor like = x;
    like.shape[x.ndim - 1] = out_features;
    Tensor out = new_result(like, {x, weight, bias});
    linear_forward(out.data, x.data, weight.data, bias.data, N, in, out_features);
    if (out.grad)
        record({out}, {x, weight, bias},
               [=] { linear_backward(x.grad, weight.grad, bias.grad, out.grad, x.data, weight.data, N, in, out_features, InputGrad::add); });
    return out;
}

// ----------------------------------------------------------------------------------------------------
// LayerNorm and RMSNorm over the last dim C, per row. LayerNorm:  mean = sum(x)/C,
// rstd = 1/sqrt(sum((x-mean)^2)/C + eps),  xhat = (x - mean) * rstd,  out = xhat * w + b.
// RMSNorm is the same without centring or bias (mean = 0, b = 0; its mean and bias pointers are unused).
// Forward saves mean and rstd per row.
// Backward, with g = dout * w:  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))  (RMSNorm: no mean(g)),
// dw += sum over rows of dout * xhat,  db += sum over rows of dout.
// The forward kernel can also form x = input + residual first and write that sum out: the residual
// connection and the norm after it in one pass over memory (the fused kernel of a pre-norm transformer).

constexpr real norm_eps = real(1e-5);

__global__ void norm_forward_kernel(Norm kind, floatX* out, real* mean_out, real* rstd_out, floatX* sum_out, const floatX* x,
                                    const floatX* residual, const floatX* weight, const floatX* bias, long rows, int C) {
    bool centred = kind == Norm::layernorm;
    bool active;
    long row = group_row(rows, &active);
    const floatX* xr = x + row * C;
    if (residual && active) {  // x + residual into sum_out, each thread reading back only its own elements
        floatX* s = sum_out + row * C;
        const floatX* rr = residual + row * C;
        for_each_in_row(C, [&](int c) { s[c] = xr[c] + rr[c]; });
        xr = s;
    }
    floatX* o = out + row * C;
    real mean = centred ? group_sum(row_sum(C, [&](int c) { return xr[c]; })) / C : 0;
    real variance = group_sum(row_sum(C, [&](int c) { return (xr[c] - mean) * (xr[c] - mean); })) / C;
    real rstd = 1 / sqrt(variance + norm_eps);
    if (!active) return;
    for_each_in_row(C, [&](int c) { o[c] = (xr[c] - mean) * rstd * weight[c] + (centred ? real(bias[c]) : 0); });
    if (threadIdx.x == 0) {
        if (centred) mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

__global__ void norm_backward_kernel(Norm kind, floatX* dx, const floatX* dout, const floatX* x, const floatX* weight, const real* mean,
                                     const real* rstd, long rows, int C, bool accumulate) {
    bool active, centred = kind == Norm::layernorm;
    long row = group_row(rows, &active);
    const floatX *xr = x + row * C, *dr = dout + row * C;
    floatX* dxr = dx + row * C;
    real row_mean = centred ? mean[row] : 0, row_rstd = rstd[row];
    real g_mean = centred ? group_sum(row_sum(C, [&](int c) { return dr[c] * weight[c]; })) / C : 0;
    real g_xhat_mean = group_sum(row_sum(C, [&](int c) { return dr[c] * weight[c] * (xr[c] - row_mean) * row_rstd; })) / C;
    if (!active) return;
    for_each_in_row(C, [&](int c) {
        real before = accumulate ? real(dxr[c]) : 0;
        dxr[c] = before + row_rstd * (dr[c] * weight[c] - g_mean - (xr[c] - row_mean) * row_rstd * g_xhat_mean);
    });
}

void norm_forward(Norm kind, floatX* out, real* mean, real* rstd, const floatX* x, const floatX* weight, const floatX* bias, long rows, int C) {
    launch(norm_forward_kernel, row_grid(rows), row_block(), 0, kind, out, mean, rstd, nullptr, x, nullptr, weight, bias, rows, C);
}

void residual_norm_forward(Norm kind, floatX* sum, floatX* out, real* mean, real* rstd, const floatX* a, const floatX* b, const floatX* weight,
                           const floatX* bias, long rows, int C) {
    launch(norm_forward_kernel, row_grid(rows), row_block(), 0, kind, out, mean, rstd, sum, a, b, weight, bias, rows, C);
}

void norm_backward(Norm kind, floatX* dx, floatX* dweight, floatX* dbias, const floatX* dout, const floatX* x, const floatX* weight,
                   const real* mean, const real* rstd, long rows, int C, InputGrad mode) {
    bool centred = kind == Norm::layernorm;
    if (dx) launch(norm_backward_kernel, row_grid(rows), row_block(), 0, kind, dx, dout, x, weight, mean, rstd, rows, C, mode == InputGrad::add);
    if (dweight || (centred && dbias)) column_sums(centred ? dbias : nullptr, dweight, dout, x, centred ? mean : nullptr, rstd, rows, C);
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
        record({out}, {x, weight, bias},
               [=] { norm_backward(kind, x.grad, weight.grad, bias.grad, out.grad, x.data, weight.data, mean, rstd, rows, C, InputGrad::add); });
    return out;
}

Tensor layernorm(Tensor x, Tensor weight, Tensor bias) { return normalization(x, weight, bias, Norm::layernorm); }
Tensor rmsnorm(Tensor x, Tensor weight) { return normalization(x, weight, Tensor{}, Norm::rmsnorm); }

// sum = a + b and normalized = norm(sum), fused. Backward: sum.grad (from sum's later users) gains
// the norm's backward, then flows to a and b like a residual's.
ResidualNorm residual_norm(Tensor a, Tensor b, Tensor weight, Tensor bias, Norm kind) {
    if (a.size() != b.size()) fail("residual_norm: shapes %s and %s differ", shape_string(a).c_str(), shape_string(b).c_str());
    int C = a.dim(-1);
    long rows = a.size() / C;
    Tensor sum = new_result(a, {a, b}), out = new_result(a, {a, b, weight, bias});
    real* mean = kind == Norm::layernorm ? device_alloc<real>(rows) : nullptr;
    real* rstd = device_alloc<real>(rows);
    residual_norm_forward(kind, sum.data, out.data, mean, rstd, a.data, b.data, weight.data, bias.data, rows, C);
    if (out.grad) record({sum, out}, {a, b, weight, bias}, [=] {
        norm_backward(kind, sum.grad, weight.grad, bias.grad, out.grad, sum.data, weight.data, mean, rstd, rows, C, InputGrad::add);
        residual_backward(a.grad, b.grad, sum.grad, a.size());
    });
    return ResidualNorm{sum, out};
}

// ----------------------------------------------------------------------------------------------------
// Activations, elementwise (see map above).
// GELU, tanh approximation as in GPT-2:  gelu(x) = x/2 * (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3).
// Since (1 + tanh(u))/2 = sigmoid(2u), gelu(x) = x * s with s = sigmoid(2u): one exponential.
//   gelu'(x) = s + x * s (1 - s) * 2 du/dx,  du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
// SiLU (Swish):  silu(x) = x * sigmoid(x),  silu'(x) = s (1 + x (1 - s)),  s = sigmoid(x)

struct Gelu {
    __device__ real forward(real x) const { return x * gate(x); }
    __device__ real derivative(real x) const {
        real s = gate(x), du = real(0.7978845608028654) * (1 + 3 * real(0.044715) * x * x);
        return s + x * s * (1 - s) * 2 * du;
    }
    __device__ real gate(real x) const {  // sigmoid(2u)
        real u = real(0.7978845608028654) * (x + real(0.044715) * x * x * x);
        return 1 / (1 + fast_exp(-2 * u));
    }
};
struct Silu {
    __device__ real forward(real x) const { return x / (1 + fast_exp(-x)); }
    __device__ real derivative(real x) const {
        real s = 1 / (1 + fast_exp(-x));
        return s * (1 + x * (1 - s));
    }
};

Tensor gelu(Tensor x) { return map(x, Gelu{}); }
Tensor silu(Tensor x) { return map(x, Silu{}); }

// Linear + GELU fused, the MLP's first half: out = gelu(x @ W^T + b). The product goes straight into the
// pre-activation buffer (saved for backward, not a tensor of its own), and one pass adds the bias and
// applies GELU; the separate bias broadcast and the pre-activation's own gradient buffer disappear.
// Backward: dpre = dout * gelu'(pre), then the linear backward with dpre.

__global__ void bias_gelu_forward_kernel(floatX* out, floatX* pre, const floatX* bias, long rows, int columns) {
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

void linear_gelu_forward(floatX* out, floatX* pre, const floatX* x, const floatX* weight, const floatX* bias, long N, int in, int out_features) {
    gemm({.M = int(N), .N = out_features, .K = in}, 1, {.data = x, .ld = in}, {.data = weight, .ld = in, .transpose = true}, 0,
         {.data = pre, .ld = out_features});
    launch(bias_gelu_forward_kernel, row_grid(N), row_block(), 0, out, pre, bias, N, out_features);
}

// dpre (N, out_features) is scratch for the pre-activation's gradient.
void linear_gelu_backward(floatX* dx, floatX* dweight, floatX* dbias, floatX* dpre, const floatX* dout, const floatX* pre, const floatX* x,
                          const floatX* weight, long N, int in, int out_features, InputGrad mode) {
    launch(gelu_gradient_kernel, element_blocks(N * out_features), element_threads, 0, dpre, dout, pre, N * out_features);
    linear_backward(dx, dweight, dbias, dpre, x, weight, N, in, out_features, mode);
}

Tensor linear_gelu(Tensor x, Tensor weight, Tensor bias) {
    int in = x.dim(-1), out_features = weight.dim(0);
    if (weight.ndim != 2 || weight.dim(1) != in || bias.size() != out_features)
        fail("linear_gelu: input %s does not fit weight %s and bias %s", shape_string(x).c_str(), shape_string(weight).c_str(), shape_string(bias).c_str());
    long N = x.size() / in;
    Tensor like = x;
    like.shape[x.ndim - 1] = out_features;
    Tensor out = new_result(like, {x, weight, bias});
    floatX* pre = device_alloc<floatX>(N * out_features);
    linear_gelu_forward(out.data, pre, x.data, weight.data, bias.data, N, in, out_features);
    if (out.grad) record({out}, {x, weight, bias}, [=] {
        floatX* dpre = device_alloc<floatX>(N * out_features);
        linear_gelu_backward(x.grad, weight.grad, bias.grad, dpre, out.grad, pre, x.data, weight.data, N, in, out_features, InputGrad::add);
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

__global__ void swiglu_backward_kernel(floatX* dx, const floatX* dout, const floatX* x, long N, int H, bool accumulate) {
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

void swiglu_forward(floatX* out, const floatX* x, long N, int H) { launch(swiglu_forward_kernel, row_grid(N), row_block(), 0, out, x, N, H); }
void swiglu_backward(floatX* dx, const floatX* dout, const floatX* x, long N, int H, InputGrad mode) {
    launch(swiglu_backward_kernel, row_grid(N), row_block(), 0, dx, dout, x, N, H, mode == InputGrad::add);
}

Tensor swiglu(Tensor x) {
    int H = x.dim(-1) / 2;
    if (x.dim(-1) != 2 * H) fail("swiglu: the last dim of %s must be even", shape_string(x).c_str());
    long N = x.size() / (2 * H);
    Tensor like = x;
    like.shape[x.ndim - 1] = H;
    Tensor out = new_result(like, {x});
    swiglu_forward(out.data, x.data, N, H);
    if (out.grad) record({out}, {x}, [=] { swiglu_backward(x.grad, out.grad, x.data, N, H, InputGrad::add); });
    return out;
}

// ----------------------------------------------------------------------------------------------------
// Dropout: out = x * keep / (1 - p), keep = (uniform(seed, i) >= p). The mask is never stored: the
// counter-based generator redraws it in backward, identically on the CPU and the GPU.
// Backward: dx += dout * keep / (1 - p).

__global__ void dropout_kernel(floatX* out, const floatX* x, long n, real p, uint64_t seed, bool accumulate) {
    real scale = 1 / (1 - p);
    for_each_element(n, [&](long i) {
        real kept = random_uniform(seed, uint64_t(i)) >= p ? x[i] * scale : 0;
        out[i] = accumulate ? out[i] + kept : kept;
    });
}

void dropout_forward(floatX* out, const floatX* x, long n, real p, uint64_t seed) {
    launch(dropout_kernel, element_blocks(n), element_threads, 0, out, x, n, p, seed, false);
}

void dropout_backward(floatX* dx, const floatX* dout, long n, real p, uint64_t seed, InputGrad mode) {
    launch(dropout_kernel, element_blocks(n), element_threads, 0, dx, dout, n, p, seed, mode == InputGrad::add);
}

Tensor dropout(Tensor x, real p, uint64_t seed) {
    if (p <= 0) return x;
    if (p >= 1) fail("dropout: probability %g must be below 1", double(p));
    Tensor out = new_result(x, {x});
    long n = x.size();
    dropout_forward(out.data, x.data, n, p, seed);
    if (out.grad) record({out}, {x}, [=] { dropout_backward(x.grad, out.grad, n, p, seed, InputGrad::add); });
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
    if (a.size() != b.size()) fail("residual: shapes %s and %s differ", shape_string(a).c_str(), shape_string(b).c_str());
    Tensor out = new_result(a, {a, b});
    long n = a.size();
    residual_forward(out.data, a.data, b.data, n);
    if (out.grad) record({out}, {a, b}, [=] { residual_backward(a.grad, b.grad, out.grad, n); });
    return out;
}

// ----------------------------------------------------------------------------------------------------
// Rotary position embedding (RoPE), on one head's vector x (hs values) at position t: each pair
// (x[i], x[i + hs/2]) is rotated by the angle t * base^(-2i/hs). A rotation is undone by the opposite
// angle, so the backward is the same kernel with `inverse`. A row kernel over head vectors: rows
// p = b*T + t of a (B, T, NH*hs) layout whose rows are ld_x (ld_out) apart, NH vectors per row.

constexpr double rotary_base = 10000.0;

__global__ void rotary_kernel(floatX* out, int ld_out, const floatX* x, int ld_x, long rows, int T, int NH, int hs, int start, bool inverse,
                              bool accumulate) {
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
        real x0 = source[i], x1 = source[i + half];  // both read before either is written: in place is fine
        target[i] = (accumulate ? real(target[i]) : 0) + x0 * c - x1 * s;
        target[i + half] = (accumulate ? real(target[i + half]) : 0) + x0 * s + x1 * c;
    });
}

// out = x rotated, at positions start, start+1, ... along each of the rows / T sequences. The backward
// adds the gradient, turned back, into dx.
void rotary_forward(floatX* out, int ld_out, const floatX* x, int ld_x, long rows, int T, int NH, int hs, int start) {
    launch(rotary_kernel, row_grid(rows * NH), row_block(), 0, out, ld_out, x, ld_x, rows, T, NH, hs, start, false, false);
}
void rotary_backward(floatX* dx, int ld_dx, const floatX* dout, int ld_dout, long rows, int T, int NH, int hs, InputGrad mode) {
    launch(rotary_kernel, row_grid(rows * NH), row_block(), 0, dx, ld_dx, dout, ld_dout, rows, T, NH, hs, 0, true, mode == InputGrad::add);
}

// The tape version: x (B, T, NH, hs) -> a rotated copy.
Tensor rotary(Tensor x) {
    if (x.ndim != 4 || x.dim(-1) % 2) fail("rotary: expects (B, T, NH, hs) with hs even, got %s", shape_string(x).c_str());
    Tensor out = new_result(x, {x});
    int T = x.shape[1], NH = x.shape[2], hs = x.shape[3];
    long rows = long(x.shape[0]) * T;
    rotary_forward(out.data, NH * hs, x.data, NH * hs, rows, T, NH, hs, 0);
    if (out.grad) record({out}, {x}, [=] { rotary_backward(x.grad, NH * hs, out.grad, NH * hs, rows, T, NH, hs, InputGrad::add); });
    return out;
}

// ----------------------------------------------------------------------------------------------------
// Causal multi-head self-attention, the core: qkv (B, T, 3C) -> out (B, T, C), NH heads of hs = C/NH.
// Each head reads its queries, keys and values straight out of qkv (rows of hs values, 3C apart) and
// writes into its hs columns of out, so nothing is rearranged; with rotary positions, q and k are first
// rotated into (B, T, C) buffers of their own.
//   att = softmax(q @ k^T / sqrt(hs)) over the keys s <= t (causal)        (B, NH, T, T)
//   att' = dropout(att);  out[:, :, head] = att' @ v
// Backward, per head, with dy = the head's columns of dout:
//   datt' = dy @ v^T,  dv += att'^T @ dy,  datt = dropout backward of datt',
//   dpre = att * (datt - sum_s(datt * att)) (softmax backward),
//   dq += dpre @ k / sqrt(hs),  dk += dpre^T @ q / sqrt(hs)  (turned back first, with rotary).
// The forward saves att (and att' with dropout), and the rotated q and k.

// Rows of att are (b, h, t): query t against `keys` keys. Query t sits at position start + t and sees
// keys s <= start + t; the rest of its row is zeroed. (Training: keys = T, start = 0. Generation with a
// cache: the new queries come after `start` cached positions.)
__global__ void causal_softmax_forward_kernel(floatX* att, long rows, int T, int keys, int start) {
    bool active;
    long row = group_row(rows, &active);
    int last = start + int(row % T);
    floatX* a = att + row * keys;
    real largest = group_max(row_max(last + 1, [&](int s) { return a[s]; })), total = 0;
    if (active) {  // exponentials in place, then their sum (threads past the end only join the shuffles)
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

// The products run per head: a batch over the B sequences (outer) and the NH heads (inner). A head's
// q, k, v or output is a (T, hs) matrix inside a (B, T, width) buffer: rows `width` apart, sequences
// T * width apart, heads hs apart. Its attention matrix is (T, T), heads T * T apart.

void attention_forward(floatX* out, AttentionSaved saved, const floatX* qkv, int B, int T, int C, int NH, bool rotary, real dropout_p, uint64_t seed) {
    int hs = C / NH, ld = rotary ? C : 3 * C;  // the row stride of q and k
    long heads = long(B) * NH, att_size = long(T) * T;
    const floatX *q = qkv, *k = qkv + C, *v = qkv + 2 * C;
    if (rotary) {
        rotary_forward(saved.q, C, qkv, 3 * C, long(B) * T, T, NH, hs, 0);
        rotary_forward(saved.k, C, qkv + C, 3 * C, long(B) * T, T, NH, hs, 0);
        q = saved.q, k = saved.k;
    }
    real scale = real(1 / std::sqrt(double(hs)));
    GemmShape scores{.M = T, .N = T, .K = hs, .outer = B, .inner = NH}, mix{.M = T, .N = hs, .K = T, .outer = B, .inner = NH};
    // att = q @ k^T * scale                                                 (T, T) per head
    gemm(scores, scale, {.data = q, .ld = ld, .outer = T * ld, .inner = hs}, {.data = k, .ld = ld, .transpose = true, .outer = T * ld, .inner = hs},
         0, {.data = saved.att, .ld = T, .outer = NH * att_size, .inner = att_size});
    launch(causal_softmax_forward_kernel, row_grid(heads * T), row_block(), 0, saved.att, heads * T, T, T, 0);
    const floatX* att = saved.att;
    if (dropout_p > 0) {
        dropout_forward(saved.att_dropped, saved.att, heads * att_size, dropout_p, seed);
        att = saved.att_dropped;
    }
    // out = att @ v                                                         (T, hs) per head
    gemm(mix, 1, {.data = att, .ld = T, .outer = NH * att_size, .inner = att_size}, {.data = v, .ld = 3 * C, .outer = T * 3 * C, .inner = hs}, 0,
         {.data = out, .ld = C, .outer = T * C, .inner = hs});
}

// Scratch buffers of the backward, (B, T, C) unless noted: datt (B, NH, T, T) and, with dropout,
// datt_kept (plain); D (B, NH, T) of real (flash); the rotated dq and dk (rotary).
AttentionScratch attention_scratch(int B, int T, int C, int NH, bool rotary, real dropout_p, bool flash) {
    long att_size = long(B) * NH * T * T, n = long(B) * T * C;
    AttentionScratch scratch{};
    if (!flash) scratch.datt = device_alloc<floatX>(att_size);
    if (!flash && dropout_p > 0) scratch.datt_kept = device_alloc<floatX>(att_size);
    if (flash) scratch.D = device_alloc<real>(long(B) * NH * T);
    if (rotary) scratch.dq = device_alloc<floatX>(n), scratch.dk = device_alloc<floatX>(n);
    return scratch;
}

// With rotary positions dq and dk were computed for the rotated q and k: turn them back into dqkv.
static void rotary_gradients_back(floatX* dqkv, AttentionScratch scratch, int B, int T, int C, int NH, InputGrad mode) {
    rotary_backward(dqkv, 3 * C, scratch.dq, C, long(B) * T, T, NH, C / NH, mode);
    rotary_backward(dqkv + C, 3 * C, scratch.dk, C, long(B) * T, T, NH, C / NH, mode);
}

void attention_backward(floatX* dqkv, const floatX* dout, AttentionSaved saved, AttentionScratch scratch, const floatX* qkv, int B, int T, int C,
                        int NH, bool rotary, real dropout_p, uint64_t seed, InputGrad mode) {
    int hs = C / NH, ld = rotary ? C : 3 * C;
    long heads = long(B) * NH, att_size = long(T) * T;
    const floatX *q = rotary ? saved.q : qkv, *k = rotary ? saved.k : qkv + C, *v = qkv + 2 * C;
    const floatX* att = dropout_p > 0 ? saved.att_dropped : saved.att;
    real beta = mode == InputGrad::add ? 1 : 0;
    floatX* datt = scratch.datt;
    GemmShape scores{.M = T, .N = T, .K = hs, .outer = B, .inner = NH}, mix{.M = T, .N = hs, .K = T, .outer = B, .inner = NH};
    GemmInput dy{.data = dout, .ld = C, .outer = T * C, .inner = hs};
    // datt' = dy @ v^T                                                      (T, T) per head
    gemm(scores, 1, dy, {.data = v, .ld = 3 * C, .transpose = true, .outer = T * 3 * C, .inner = hs}, 0,
         {.data = datt, .ld = T, .outer = NH * att_size, .inner = att_size});
    // dv = att'^T @ dy                                                      (T, hs) per head
    gemm(mix, 1, {.data = att, .ld = T, .transpose = true, .outer = NH * att_size, .inner = att_size}, dy, beta,
         {.data = dqkv + 2 * C, .ld = 3 * C, .outer = T * 3 * C, .inner = hs});
    if (dropout_p > 0) {  // datt' -> datt: the dropout backward
        dropout_backward(scratch.datt_kept, datt, heads * att_size, dropout_p, seed, InputGrad::write);
        datt = scratch.datt_kept;
    }
    launch(causal_softmax_backward_kernel, row_grid(heads * T), row_block(), 0, datt, saved.att, heads * T, T);
    real scale = real(1 / std::sqrt(double(hs)));
    // Without rotary, dq and dk go straight into dqkv; with it, to scratch first, to be turned back.
    floatX* dq = rotary ? scratch.dq : dqkv;
    floatX* dk = rotary ? scratch.dk : dqkv + C;
    int ld_grad = rotary ? C : 3 * C;
    real beta_qk = rotary ? 0 : beta;
    // dq = dpre @ k * scale,  dk = dpre^T @ q * scale                        (T, hs) per head
    gemm(mix, scale, {.data = datt, .ld = T, .outer = NH * att_size, .inner = att_size}, {.data = k, .ld = ld, .outer = T * ld, .inner = hs}, beta_qk,
         {.data = dq, .ld = ld_grad, .outer = T * ld_grad, .inner = hs});
    gemm(mix, scale, {.data = datt, .ld = T, .transpose = true, .outer = NH * att_size, .inner = att_size},
         {.data = q, .ld = ld, .outer = T * ld, .inner = hs}, beta_qk, {.data = dk, .ld = ld_grad, .outer = T * ld_grad, .inner = hs});
    if (rotary) rotary_gradients_back(dqkv, scratch, B, T, C, NH, mode);
}

// ----------------------------------------------------------------------------------------------------
// Flash-style attention: the same maths without the (T, T) matrix in memory. A block takes a tile of
// query rows, a row group per query; keys and values pass through shared memory a tile at a time, and
// each query keeps a running maximum m, the running sum l of exp(score - m) and its output accumulator
// o, rescaled whenever m grows (the online softmax):
//   m' = max(m, s),  l = l e^(m - m') + e^(s - m'),  o = o e^(m - m') + e^(s - m') v;  out = o / l.
// The forward saves only lse = m + log l per query. The backward recomputes p = exp(q.k / sqrt(hs) - lse):
//   D_t = dout_t . out_t,  dp = dout_t . v_s,  ds = p (dp - D_t),
//   dq_t += ds k_s / sqrt(hs)                   (one kernel: a query per row group, looping over keys)
//   dk_s += ds q_t / sqrt(hs),  dv_s += p dout_t  (another: a key per row group, looping over queries)
// so every gradient row has one owner and nothing is added atomically. Attention dropout uses the same
// mask as the plain kernels (element (b, h, t, s) of the counter-based stream).
//
// Each thread keeps its share of a head vector, the elements d = threadIdx.x + i * blockDim.x for
// i < PER_THREAD, in registers; PER_THREAD is a template parameter so the arrays stay in registers.

bool use_flash_attention =
#ifdef __CUDACC__
    true;
#else
    false;  // on the CPU the plain kernels' matrix products are faster
#endif

constexpr int flash_tile = 32;  // keys (or queries) per shared-memory tile

struct FlashShape {
    int B, T, C, NH, ld_qk;  // q and k rows are ld_qk apart (3C inside qkv, C when rotated); v's are 3C
    real scale, dropout_p;
    uint64_t seed;
};

// The dropout factor of probability (b, h, t, s): 0 or 1 / (1 - p), as dropout_kernel draws it.
__device__ inline real attention_keep(const FlashShape& s, int b, int h, int t, int key) {
    if (s.dropout_p <= 0) return 1;
    uint64_t index = ((uint64_t(b) * s.NH + h) * s.T + t) * s.T + key;
    return random_uniform(s.seed, index) >= s.dropout_p ? 1 / (1 - s.dropout_p) : 0;
}

// Loads rows first..first+flash_tile-1 (zeros past T) of two (B, T, *) buffers, head h of sequence b,
// into shared tiles a and b: all the block's threads share the copying.
template <typename Shared>
__device__ inline void load_tiles(Shared a, Shared b_tile, const floatX* x, int ld_x, const floatX* y, int ld_y, const FlashShape& s, int b, int h,
                                  int first) {
    int hs = s.C / s.NH, threads = blockDim.x * blockDim.y, me = threadIdx.y * blockDim.x + threadIdx.x;
    for (int e = me; e < flash_tile * hs; e += threads) {
        int j = e / hs, row = first + j;
        long column = long(h) * hs + e % hs;
        a[e] = row < s.T ? real(x[(long(b) * s.T + row) * ld_x + column]) : 0;
        b_tile[e] = row < s.T ? real(y[(long(b) * s.T + row) * ld_y + column]) : 0;
    }
}

// The dot products of this thread's shares of two head vectors, u and w, with row j of two shared tiles,
// x and y, summed over the row group: every thread of the group gets both.
template <int PER_THREAD, typename Shared>
__device__ __forceinline__ void group_dots(const real (&u)[PER_THREAD], const real (&w)[PER_THREAD], Shared x, Shared y, int j, int hs, real& ux,
                                           real& wy) {
    ux = 0, wy = 0;
    for (int i = 0; i < PER_THREAD; i++) {
        int d = threadIdx.x + i * blockDim.x;
        if (d < hs) ux += u[i] * x[j * hs + d], wy += w[i] * y[j * hs + d];
    }
    ux = group_sum(ux), wy = group_sum(wy);
}

template <int PER_THREAD>
__global__ void flash_attention_forward_kernel(floatX* out, real* lse, const floatX* q, const floatX* k, const floatX* v, FlashShape s) {
    int hs = s.C / s.NH, b = blockIdx.y / s.NH, h = blockIdx.y % s.NH;
    int first = blockIdx.x * blockDim.y, t = first + threadIdx.y, last = (first + int(blockDim.y) < s.T ? first + int(blockDim.y) : s.T) - 1;
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
    for (int first_key = 0; first_key <= last; first_key += flash_tile) {  // keys past the block's last query never count
        __syncthreads();  // everyone is done with the previous tile
        load_tiles(keys, values, k, s.ld_qk, v, 3 * s.C, s, b, h, first_key);
        __syncthreads();
        for (int j = 0; j < flash_tile; j++) {
            real partial = 0;
            for (int i = 0; i < PER_THREAD; i++) {
                int d = threadIdx.x + i * blockDim.x;
                if (d < hs) partial += query[i] * keys[j * hs + d];
            }
            real score = group_sum(partial) * s.scale;  // every group takes part: the shuffles need the whole warp
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
__global__ void attention_row_dot_kernel(real* D, const floatX* dout, const floatX* out, FlashShape s) {
    bool active;
    int hs = s.C / s.NH;
    long r = group_row(long(s.B) * s.NH * s.T, &active);
    long b = r / (long(s.NH) * s.T), h = r / s.T % s.NH, t = r % s.T;
    const floatX *x = dout + (b * s.T + t) * s.C + h * hs, *y = out + (b * s.T + t) * s.C + h * hs;
    real dot = group_sum(row_sum(hs, [&](int d) { return x[d] * y[d]; }));
    if (active && threadIdx.x == 0) D[r] = dot;
}

// dq for a tile of queries per block (layout as the forward); written to dq (rows ld_dq apart), added
// when `accumulate`.
template <int PER_THREAD>
__global__ void flash_attention_dq_kernel(floatX* dq, int ld_dq, bool accumulate, const floatX* dout, const real* lse, const real* D, const floatX* q,
                                          const floatX* k, const floatX* v, FlashShape s) {
    int hs = s.C / s.NH, b = blockIdx.y / s.NH, h = blockIdx.y % s.NH;
    int first = blockIdx.x * blockDim.y, t = first + threadIdx.y, last = (first + int(blockDim.y) < s.T ? first + int(blockDim.y) : s.T) - 1;
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

// dk and dv for a tile of keys per block: a key per row group, looping over the queries t >= s, whose
// q and dout rows (and lse and D) pass through shared memory.
template <int PER_THREAD>
__global__ void flash_attention_dkdv_kernel(floatX* dk, int ld_dk, bool accumulate, floatX* dv, bool accumulate_v, const floatX* dout, const real* lse, const real* D,
                                            const floatX* q, const floatX* k, const floatX* v, FlashShape s) {
    int hs = s.C / s.NH, b = blockIdx.y / s.NH, h = blockIdx.y % s.NH;
    int first = blockIdx.x * blockDim.y, key = first + threadIdx.y;
    bool active = key < s.T;
    if (!active) key = s.T - 1;
    auto queries = shared_memory<real>();
    auto dys = shared_memory<real>(flash_tile * hs * sizeof(real));
    auto stats = shared_memory<real>(2 * flash_tile * hs * sizeof(real));  // lse and D of the tile's queries
    real key_row[PER_THREAD], value_row[PER_THREAD], grad_k[PER_THREAD], grad_v[PER_THREAD];
    for (int i = 0; i < PER_THREAD; i++) {
        int d = threadIdx.x + i * blockDim.x;
        key_row[i] = d < hs ? real(k[(long(b) * s.T + key) * s.ld_qk + h * hs + d]) : 0;
        value_row[i] = d < hs ? real(v[(long(b) * s.T + key) * 3 * s.C + h * hs + d]) : 0;
        grad_k[i] = grad_v[i] = 0;
    }
    for (int first_query = first / flash_tile * flash_tile; first_query < s.T; first_query += flash_tile) {
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
            real p = fast_exp(qk - stats[j]), keep = attention_keep(s, b, h, t, key), ds = p * (dp * keep - stats[flash_tile + j]);
            for (int i = 0; i < PER_THREAD; i++) {
                int d = threadIdx.x + i * blockDim.x;
                if (d < hs) grad_v[i] += p * keep * dys[j * hs + d], grad_k[i] += ds * queries[j * hs + d] * s.scale;
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

// Calls f with std::integral_constant<int, N>, N the power of two at least hs / threads_per_row: the
// instance of a flash kernel whose register arrays fit a head. A GPU runs a warp per row, so 16 values
// per thread cover heads of up to 512; the larger instances (for one thread per row, on the CPU)
// would spill registers and are not built for it.
#ifdef __CUDACC__
constexpr int max_values_per_thread = 16;
#else
constexpr int max_values_per_thread = 128;
#endif

template <int N, typename F> static void with_values_per_thread_from(int needed, int hs, F f) {
    if constexpr (N <= max_values_per_thread) {
        if (needed <= N) return f(std::integral_constant<int, N>());
        return with_values_per_thread_from<2 * N>(needed, hs, f);
    } else {
        fail("flash attention: a head of %d values needs more than %d values per thread (raise threads_per_row)", hs, max_values_per_thread);
    }
}

template <typename F> static void with_values_per_thread(int hs, F f) {
    with_values_per_thread_from<1>((hs + threads_per_row - 1) / threads_per_row, hs, f);
}

void flash_attention_forward(floatX* out, AttentionSaved saved, const floatX* qkv, int B, int T, int C, int NH, bool rotary, real dropout_p, uint64_t seed) {
    int hs = C / NH;
    const floatX *q = qkv, *k = qkv + C;
    if (rotary) {
        rotary_forward(saved.q, C, qkv, 3 * C, long(B) * T, T, NH, hs, 0);
        rotary_forward(saved.k, C, qkv + C, 3 * C, long(B) * T, T, NH, hs, 0);
        q = saved.q, k = saved.k;
    }
    FlashShape s{B, T, C, NH, rotary ? C : 3 * C, real(1 / std::sqrt(double(hs))), dropout_p, seed};
    dim3 grid(unsigned((T + rows_per_block() - 1) / rows_per_block()), unsigned(B * NH));
    with_values_per_thread(hs, [&](auto per_thread) {
        launch(flash_attention_forward_kernel<decltype(per_thread)::value>, grid, row_block(), 2 * flash_tile * hs * sizeof(real), out, saved.lse,
               q, k, qkv + 2 * C, s);
    });
}

void flash_attention_backward(floatX* dqkv, const floatX* dout, const floatX* out, AttentionSaved saved, AttentionScratch scratch,
                              const floatX* qkv, int B, int T, int C, int NH, bool rotary, real dropout_p, uint64_t seed, InputGrad mode) {
    int hs = C / NH;
    const floatX *q = rotary ? saved.q : qkv, *k = rotary ? saved.k : qkv + C, *v = qkv + 2 * C;
    FlashShape s{B, T, C, NH, rotary ? C : 3 * C, real(1 / std::sqrt(double(hs))), dropout_p, seed};
    launch(attention_row_dot_kernel, row_grid(long(B) * NH * T), row_block(), 0, scratch.D, dout, out, s);
    // Without rotary, dq and dk go straight into dqkv; with it, to scratch first, to be turned back.
    floatX* dq = rotary ? scratch.dq : dqkv;
    floatX* dk = rotary ? scratch.dk : dqkv + C;
    int ld = rotary ? C : 3 * C;
    bool accumulate = mode == InputGrad::add;
    dim3 grid(unsigned((T + rows_per_block() - 1) / rows_per_block()), unsigned(B * NH));
    with_values_per_thread(hs, [&](auto per_thread) {
        constexpr int n = decltype(per_thread)::value;
        launch(flash_attention_dq_kernel<n>, grid, row_block(), 2 * flash_tile * hs * sizeof(real), dq, ld, accumulate && !rotary, dout, saved.lse,
               scratch.D, q, k, v, s);
        launch(flash_attention_dkdv_kernel<n>, grid, row_block(), (2 * flash_tile * hs + 2 * flash_tile) * sizeof(real), dk, ld,
               accumulate && !rotary, dqkv + 2 * C, accumulate, dout, saved.lse, scratch.D, q, k, v, s);
    });
    if (rotary) rotary_gradients_back(dqkv, scratch, B, T, C, NH, mode);
}

Tensor attention(Tensor qkv, int heads, bool rotary, real dropout_p, uint64_t seed) {
    if (qkv.ndim != 3 || qkv.dim(-1) % (3 * heads) || (rotary && (qkv.dim(-1) / 3 / heads) % 2))
        fail("attention: qkv %s must be (B, T, 3C) with C divisible by %d heads (and an even head size for rotary)", shape_string(qkv).c_str(), heads);
    int B = qkv.shape[0], T = qkv.shape[1], C = qkv.shape[2] / 3;
    Tensor like = qkv;
    like.shape[2] = C;
    Tensor out = new_result(like, {qkv});
    long n = long(B) * T * C, att_size = long(B) * heads * T * T;
    bool flash = use_flash_attention;
    AttentionSaved saved{rotary ? device_alloc<floatX>(n) : nullptr, rotary ? device_alloc<floatX>(n) : nullptr,
                         flash ? nullptr : device_alloc<floatX>(att_size), !flash && dropout_p > 0 ? device_alloc<floatX>(att_size) : nullptr,
                         flash ? device_alloc<real>(long(B) * heads * T) : nullptr};
    if (flash) flash_attention_forward(out.data, saved, qkv.data, B, T, C, heads, rotary, dropout_p, seed);
    else attention_forward(out.data, saved, qkv.data, B, T, C, heads, rotary, dropout_p, seed);
    if (out.grad) record({out}, {qkv}, [=] {
        AttentionScratch scratch = attention_scratch(B, T, C, heads, rotary, dropout_p, flash);
        if (flash) flash_attention_backward(qkv.grad, out.grad, out.data, saved, scratch, qkv.data, B, T, C, heads, rotary, dropout_p, seed, InputGrad::add);
        else attention_backward(qkv.grad, out.grad, saved, scratch, qkv.data, B, T, C, heads, rotary, dropout_p, seed, InputGrad::add);
    });
    return out;
}

Tensor multi_head_attention(Tensor x, Tensor qkv_weight, Tensor qkv_bias, Tensor proj_weight, Tensor proj_bias, int heads) {
    return linear(attention(linear(x, qkv_weight, qkv_bias), heads, false, 0, 0), proj_weight, proj_bias);
}

// ----------------------------------------------------------------------------------------------------
// Softmax + cross-entropy, fused, over the vocabulary: logits (N, V), targets (N) -> the mean loss
// over rows whose target is not ignore_index:  loss_n = logsumexp(logits_n) - logits_n[target_n].
// The forward saves logsumexp per row, not the (N, V) probabilities.
// Backward: dlogits_n += (softmax(logits_n) - onehot(target_n)) * dloss / count, 0 for ignored rows.

// The positions whose target counts (is not ignore_index), added up by one row group.
__global__ void count_targets_kernel(real* count, const int* targets, long N) {
    real total = 0;
    for (long n = threadIdx.x; n < N; n += blockDim.x) total += targets[n] != ignore_index;
    total = group_sum(total);
    if (threadIdx.x == 0) count[0] = total;
}

// A row per position: loss_n, logsumexp_n when asked, and with write_gradient the gradient written over
// the logits, (softmax - onehot(target)) * scale / count: the forward and backward fused (llm.c's
// classifier), so no (N, V) gradient buffer is zeroed, written and read again. A target outside the
// vocabulary makes the loss NaN, which training reports, rather than a wild read.
__global__ void classifier_kernel(floatX* logits, real* losses, real* logsumexp, const int* targets, const real* count, real scale, long N, int V,
                                  bool write_gradient) {
    bool active;
    long row = group_row(N, &active);
    floatX* l = logits + row * V;
    int target = targets[row];
    bool counted = target != ignore_index, valid = target >= 0 && target < V;
    real target_logit = valid ? real(l[target]) : 0;  // read before any thread of the group overwrites it
    real largest = group_max(row_max(V, [&](int v) { return l[v]; }));
    real lse = largest + log(group_sum(row_sum(V, [&](int v) { return fast_exp(l[v] - largest); })));
    if (!active) return;
    if (write_gradient) {
        real factor = counted ? scale / count[0] : 0;
        for_each_in_row(V, [&](int v) { l[v] = (fast_exp(l[v] - lse) - (v == target ? 1 : 0)) * factor; });
    }
    if (threadIdx.x != 0) return;
    if (logsumexp) logsumexp[row] = lse;
    losses[row] = !counted ? 0 : valid ? lse - target_logit : NAN;
}

// The mean over the counted positions (ignored ones have loss 0), in a fixed order. It stays in `real`
// (float even when tensors are bfloat16: a loss rounded to 8 bits would log as 5.5625 and blur the
// choice of the best checkpoint); `stored` gets a copy as a tensor when not null.
__global__ void mean_loss_kernel(real* loss, floatX* stored, const real* count, const real* losses, long N) {
    real total = group_sum(sum_strided(0, N, threadIdx.x, blockDim.x, [&](long n) { return losses[n]; }));
    if (threadIdx.x != 0) return;
    loss[0] = count[0] > 0 ? total / count[0] : 0;
    if (stored) stored[0] = loss[0];
}

__global__ void cross_entropy_backward_kernel(floatX* dlogits, const floatX* dloss, const real* count, const floatX* logits, const real* logsumexp,
                                              const int* targets, long N, int V) {
    bool active;
    long row = group_row(N, &active);
    if (!active || targets[row] < 0 || targets[row] >= V) return;
    real scale = dloss[0] / count[0], lse = logsumexp[row];
    int target = targets[row];
    const floatX* l = logits + row * V;
    floatX* d = dlogits + row * V;
    for_each_in_row(V, [&](int v) { d[v] += (fast_exp(l[v] - lse) - (v == target ? 1 : 0)) * scale; });
}

void classifier(floatX* logits, real* losses, real* loss, real* count, const int* targets, long N, int V, real loss_scale, bool write_gradient) {
    launch(count_targets_kernel, 1, dim3(threads_per_row), 0, count, targets, N);
    launch(classifier_kernel, row_grid(N), row_block(), 0, logits, losses, nullptr, targets, count, loss_scale, N, V, write_gradient);
    launch(mean_loss_kernel, 1, dim3(threads_per_row), 0, loss, nullptr, count, losses, N);
}

Tensor cross_entropy(Tensor logits, const int* targets) {
    int V = logits.dim(-1);
    long N = logits.size() / V;
    Tensor out = new_result(Tensor{}, {logits});
    real *loss = device_alloc<real>(1), *count = device_alloc<real>(1);
    real *losses = device_alloc<real>(N), *logsumexp = device_alloc<real>(N);
    launch(count_targets_kernel, 1, dim3(threads_per_row), 0, count, targets, N);
    launch(classifier_kernel, row_grid(N), row_block(), 0, logits.data, losses, logsumexp, targets, count, real(0), N, V, false);
    launch(mean_loss_kernel, 1, dim3(threads_per_row), 0, loss, out.data, count, losses, N);
    if (out.grad)
        record({out}, {logits}, [=] {
            launch(cross_entropy_backward_kernel, row_grid(N), row_block(), 0, logits.grad, out.grad, count, logits.data, logsumexp, targets, N, V);
        });
    return out;
}

// Mean squared error: loss = mean((a - b)^2).  Backward: da += 2 (a - b) / n * dloss,  db -= the same.

__global__ void mse_forward_kernel(floatX* loss, const floatX* a, const floatX* b, long n) {
    real total = 0;
    for (long i = threadIdx.x; i < n; i += blockDim.x) total += (a[i] - b[i]) * (a[i] - b[i]);
    total = group_sum(total);
    if (threadIdx.x == 0) loss[0] = total / n;
}

__global__ void mse_backward_kernel(floatX* da, floatX* db, const floatX* dloss, const floatX* a, const floatX* b, long n) {
    for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += long(gridDim.x) * blockDim.x) {
        real g = 2 * (a[i] - b[i]) / n * dloss[0];
        if (da) da[i] += g;
        if (db) db[i] -= g;
    }
}

void mse_forward(floatX* loss, const floatX* a, const floatX* b, long n) { launch(mse_forward_kernel, 1, dim3(threads_per_row), 0, loss, a, b, n); }
void mse_backward(floatX* da, floatX* db, const floatX* dloss, const floatX* a, const floatX* b, long n) {
    launch(mse_backward_kernel, grid_size(n, 256), 256, 0, da, db, dloss, a, b, n);
}

Tensor mse(Tensor a, Tensor b) {
    if (a.size() != b.size()) fail("mse: shapes %s and %s differ", shape_string(a).c_str(), shape_string(b).c_str());
    Tensor out = new_result(Tensor{}, {a, b});
    long n = a.size();
    mse_forward(out.data, a.data, b.data, n);
    if (out.grad) record({out}, {a, b}, [=] { mse_backward(a.grad, b.grad, out.grad, a.data, b.data, n); });
    return out;
}

// ====================================================================================================
// The GPT

GPTConfig gpt_preset(const std::string& name) {
    GPTConfig c;
    if (name == "debug") {
        c.vocab_size = 257, c.context = 32, c.dim = 32, c.layers = 2, c.heads = 2;
    } else if (name == "shakespeare") {
        c.vocab_size = 1024, c.context = 256, c.dim = 384, c.layers = 6, c.heads = 6, c.dropout = 0.2f;
    } else if (name == "smol") {
        c.vocab_size = 50257, c.context = 1024, c.dim = 768, c.layers = 12, c.heads = 12;
    } else {
        fail("unknown preset '%s' (expected debug, shakespeare or smol)", name.c_str());
    }
    return c;
}

void gpt_check_config(const GPTConfig& c) {
    if (c.vocab_size < 1 || c.context < 1 || c.dim < 1 || c.layers < 1 || c.heads < 1 || c.mlp_ratio < 1)
        fail("model config: vocab size, context, dim, layers, heads and MLP ratio must be positive");
    if (c.dim % c.heads) fail("model config: dim %d is not divisible by %d heads", c.dim, c.heads);
    if (c.rotary && (c.dim / c.heads) % 2) fail("model config: rotary embedding needs an even head size, got %d", c.dim / c.heads);
    if (!(c.dropout >= 0 && c.dropout < 1) || !(c.attention_dropout >= 0 && c.attention_dropout < 1))
        fail("model config: dropout must be in [0, 1)");
}

// Every parameter of the model, in the canonical order, with its shape, whether AdamW decays it, and
// its initialisation. This one table lays out the parameter buffer, initialises it and names the
// tensors in weight files.
struct Parameter {
    std::string name;
    Tensor* tensor;
    std::vector<int> shape;
    bool decay;
    float init_std;  // > 0: normal(0, init_std); 0: zeros; -1: ones
};

static std::vector<Parameter> parameter_table(GPT& model) {
    const GPTConfig& c = model.config;
    int C = c.dim, hidden = c.mlp_ratio * c.dim, fc_out = c.activation == Activation::swiglu ? 2 * hidden : hidden;
    float std = 0.02f, residual_std = 0.02f / std::sqrt(2.0f * c.layers);  // GPT-2: residual projections scaled down
    bool layernorm = c.norm == Norm::layernorm;
    std::vector<Parameter> table;
    table.push_back({"wte", &model.wte, {c.vocab_size, C}, true, std});
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
        table.push_back({p + "mlp.proj.weight", &L.mlp_proj_weight, {C, hidden}, true, residual_std});
        table.push_back({p + "mlp.proj.bias", &L.mlp_proj_bias, {C}, false, 0});
    }
    table.push_back({"final_norm.weight", &model.final_norm_weight, {C}, false, -1});
    if (layernorm) table.push_back({"final_norm.bias", &model.final_norm_bias, {C}, false, 0});
    if (!c.tied_embeddings) table.push_back({"lm_head", &model.lm_head, {c.vocab_size, C}, true, std});
    return table;
}

// One buffer holds all parameters and one all gradients: the decayed ones (weight matrices) first, in
// table order, then the rest. So AdamW and the gradient norm are each one launch over one buffer.
void gpt_create(GPT* model, const GPTConfig& config) {
    if (model->parameters) fail("gpt_create: this GPT already holds a model");
    gpt_check_config(config);
    model->config = config;
    std::vector<Parameter> table = parameter_table(*model);
    model->num_parameters = model->num_decayed = 0;
    for (const Parameter& p : table) {
        long size = 1;
        for (int d : p.shape) size *= d;
        model->num_parameters += size;
        if (p.decay) model->num_decayed += size;
    }
    cuda_check(cudaMalloc(&model->parameters, model->num_parameters * sizeof(floatX)));
    cuda_check(cudaMalloc(&model->gradients, model->num_parameters * sizeof(floatX)));
    cuda_check(cudaMemset(model->gradients, 0, model->num_parameters * sizeof(floatX)));
    if (!std::is_same<floatX, real>::value) cuda_check(cudaMalloc(&model->master, model->num_parameters * sizeof(real)));
    long offset = 0;
    for (bool decayed : {true, false}) {
        for (Parameter& p : table) {
            if (p.decay != decayed) continue;
            Tensor& t = *p.tensor;
            t.ndim = int(p.shape.size());
            for (int d = 0; d < t.ndim; d++) t.shape[d] = p.shape[d];
            t.data = model->parameters + offset;
            t.grad = model->gradients + offset;
            offset += t.size();
        }
    }
}

// Destructors do not throw: a failing cudaFree at exit has nothing left to protect.
GPT::~GPT() {
    (void)cudaFree(parameters);
    (void)cudaFree(gradients);
    (void)cudaFree(master);
}

void gpt_zero_grad(GPT& model) { cuda_check(cudaMemset(model.gradients, 0, model.num_parameters * sizeof(floatX))); }

void gpt_init(GPT* model, uint64_t seed) {
    std::vector<Parameter> table = parameter_table(*model);
    for (size_t i = 0; i < table.size(); i++) {
        Tensor& t = *table[i].tensor;
        if (table[i].init_std > 0) fill_normal(t.data, t.size(), random_bits(seed, i), 0, table[i].init_std);
        else fill(t.data, t.size(), table[i].init_std < 0 ? 1 : 0);
    }
    if (model->master) {  // the master copy starts from the (rounded) parameters
        std::vector<real> values = download(model->parameters, model->num_parameters);
        upload(model->master, values.data(), model->num_parameters);
    }
}

std::vector<std::pair<std::string, Tensor>> gpt_named_parameters(GPT& model) {
    std::vector<std::pair<std::string, Tensor>> named;
    for (const Parameter& p : parameter_table(model)) named.push_back({p.name, *p.tensor});
    return named;
}

// tokens (B, T) on the device -> logits (B, T, vocab). A pre-norm transformer:
//   x = embed(tokens);  per layer: x = x + attn(norm1(x)),  x = x + mlp(norm2(x));  logits = head(norm(x))
// Each residual add is fused with the norm that follows it (residual_norm), so h, the normalized
// stream, is always at hand for the next branch. Dropout only when `training`; each dropout call draws
// from its own stream of `seed`.
Tensor gpt_forward_tape(GPT& model, const int* tokens, int B, int T, bool training, uint64_t seed) {
    const GPTConfig& c = model.config;
    if (T > c.context) fail("gpt_forward_tape: sequence length %d exceeds the context window %d", T, c.context);
    real p = training ? c.dropout : 0, p_attention = training ? c.attention_dropout : 0;
    uint64_t stream = 0;
    Tensor x = dropout(embedding(tokens, B, T, model.wte, model.wpe), p, random_bits(seed, stream++));
    Tensor h = normalization(x, model.layers[0].norm1_weight, model.layers[0].norm1_bias, c.norm);
    for (size_t l = 0; l < model.layers.size(); l++) {
        GPTLayer& L = model.layers[l];
        Tensor branch = attention(linear(h, L.qkv_weight, L.qkv_bias), c.heads, c.rotary, p_attention, random_bits(seed, stream++));
        branch = dropout(linear(branch, L.attn_proj_weight, L.attn_proj_bias), p, random_bits(seed, stream++));
        ResidualNorm r = residual_norm(x, branch, L.norm2_weight, L.norm2_bias, c.norm);
        branch = c.activation == Activation::swiglu ? swiglu(linear(r.normalized, L.fc_weight, L.fc_bias))
                                                    : linear_gelu(r.normalized, L.fc_weight, L.fc_bias);
        branch = dropout(linear(branch, L.mlp_proj_weight, L.mlp_proj_bias), p, random_bits(seed, stream++));
        bool last = l + 1 == model.layers.size();  // the next norm: the next layer's first, or the final one
        r = residual_norm(r.sum, branch, last ? model.final_norm_weight : model.layers[l + 1].norm1_weight,
                          last ? model.final_norm_bias : model.layers[l + 1].norm1_bias, c.norm);
        x = r.sum, h = r.normalized;
    }
    return linear(h, c.tied_embeddings ? model.wte : model.lm_head, Tensor{});
}

// ----------------------------------------------------------------------------------------------------
// The GPT written out, llm.c style: gpt_forward calls the layers' forward functions in order on
// activation buffers planned once for a (B, T), and gpt_backward calls their backward functions in
// reverse. The same maths as gpt_forward_tape (the tests check both give the same gradients), without
// the tape: no closures, no tensors made per step, and every activation gradient with a single
// producer is written rather than zeroed and then added to.
//
// Dropout sites draw from streams of the seed in a fixed order (embedding 0; layer l: attention
// 3l + 1, attention projection 3l + 2, MLP 3l + 3), the same streams as the tape version.

// Lays out every buffer of the activations in one allocation: run once with base = null to measure,
// then with the memory.
struct BufferCarver {
    char* base;
    size_t bytes = 0;
    template <typename T> T* take(long count) {
        size_t start = (bytes + 255) / 256 * 256;
        bytes = start + size_t(count) * sizeof(T);
        return base ? reinterpret_cast<T*>(base + start) : nullptr;
    }
};

static void carve_activations(GPTActivations& a, const GPTConfig& c, BufferCarver& carve) {
    long N = long(a.B) * a.T, C = c.dim, H = long(c.mlp_ratio) * C, F = c.activation == Activation::swiglu ? 2 * H : H;
    long att_size = long(a.B) * c.heads * a.T * a.T;
    bool rotary = c.rotary, dropout = c.dropout > 0, attention_dropout = c.attention_dropout > 0, flash = a.flash;
    a.stream.resize(c.layers + 1), a.normalized.resize(c.layers + 1), a.mean.resize(c.layers + 1), a.rstd.resize(c.layers + 1);
    a.layers.resize(c.layers);
    for (int l = 0; l <= c.layers; l++) {
        a.stream[l] = carve.take<floatX>(N * C), a.normalized[l] = carve.take<floatX>(N * C);
        a.mean[l] = carve.take<real>(N), a.rstd[l] = carve.take<real>(N);
    }
    for (GPTLayerActivations& s : a.layers) {
        s.qkv = carve.take<floatX>(N * 3 * C), s.attention = carve.take<floatX>(N * C);
        s.saved.q = rotary ? carve.take<floatX>(N * C) : nullptr, s.saved.k = rotary ? carve.take<floatX>(N * C) : nullptr;
        s.saved.att = flash ? nullptr : carve.take<floatX>(att_size);
        s.saved.att_dropped = !flash && attention_dropout ? carve.take<floatX>(att_size) : nullptr;
        s.saved.lse = flash ? carve.take<real>(long(a.B) * c.heads * a.T) : nullptr;
        s.residual = carve.take<floatX>(N * C), s.normalized = carve.take<floatX>(N * C);
        s.mean = carve.take<real>(N), s.rstd = carve.take<real>(N);
        s.fc = carve.take<floatX>(N * F), s.activation = carve.take<floatX>(N * H);
    }
    a.logits = carve.take<floatX>(N * c.vocab_size);
    a.token_groups.token = carve.take<int>(N), a.token_groups.start = carve.take<int>(N + 1), a.token_groups.positions = carve.take<int>(N);
    a.losses = carve.take<real>(N), a.loss = carve.take<real>(1), a.count = carve.take<real>(1);
    a.branch = carve.take<floatX>(N * C), a.dropped = dropout ? carve.take<floatX>(N * C) : nullptr;
    a.dstream = carve.take<floatX>(N * C), a.dnormalized = carve.take<floatX>(N * C), a.dqkv = carve.take<floatX>(N * 3 * C);
    a.dattention = carve.take<floatX>(N * C), a.dfc = carve.take<floatX>(N * F), a.dactivation = carve.take<floatX>(N * H);
    a.dbranch = dropout ? carve.take<floatX>(N * C) : nullptr;
    a.scratch.datt = flash ? nullptr : carve.take<floatX>(att_size);
    a.scratch.datt_kept = !flash && attention_dropout ? carve.take<floatX>(att_size) : nullptr;
    a.scratch.D = flash ? carve.take<real>(long(a.B) * c.heads * a.T) : nullptr;
    a.scratch.dq = rotary ? carve.take<floatX>(N * C) : nullptr, a.scratch.dk = rotary ? carve.take<floatX>(N * C) : nullptr;
}

// (Re)plans the buffers when the shape or the attention kind changes; otherwise they are reused.
static void plan_activations(GPTActivations& a, const GPTConfig& c, int B, int T) {
    if (a.memory && a.B == B && a.T == T && a.flash == use_flash_attention) return;
    cuda_check(cudaFree(a.memory));
    a.memory = nullptr, a.B = B, a.T = T, a.flash = use_flash_attention;
    BufferCarver measure{nullptr};
    carve_activations(a, c, measure);
    cuda_check(cudaMalloc(&a.memory, measure.bytes));
    a.bytes = measure.bytes;
    BufferCarver carve{static_cast<char*>(a.memory)};
    carve_activations(a, c, carve);
}

GPTActivations::~GPTActivations() { (void)cudaFree(memory); }

// x with dropout p into `dropped` (x itself when p is 0), and its backward.
static const floatX* dropout_site(const floatX* x, floatX* dropped, long n, real p, uint64_t seed) {
    if (p <= 0) return x;
    dropout_forward(dropped, x, n, p, seed);
    return dropped;
}
static const floatX* dropout_site_backward(const floatX* dout, floatX* dx, long n, real p, uint64_t seed) {
    if (p <= 0) return dout;
    dropout_backward(dx, dout, n, p, seed, InputGrad::write);
    return dx;
}

void gpt_forward(GPT& model, GPTActivations& a, const int* tokens, int B, int T, bool training, uint64_t seed) {
    const GPTConfig& c = model.config;
    if (T > c.context) fail("gpt_forward: sequence length %d exceeds the context window %d", T, c.context);
    plan_activations(a, c, B, T);
    int C = c.dim, NH = c.heads, L = c.layers, H = c.mlp_ratio * C, F = c.activation == Activation::swiglu ? 2 * H : H;
    long N = long(B) * T;
    group_tokens(&a.token_groups, tokens, N);  // for the embedding's backward
    a.seed = seed, a.dropout = training ? c.dropout : 0, a.attention_dropout = training ? c.attention_dropout : 0;
    const Tensor& head = c.tied_embeddings ? model.wte : model.lm_head;
    floatX* embedded = a.dropout > 0 ? a.branch : a.stream[0];
    embedding_forward(embedded, tokens, model.wte.data, model.wpe.data, B, T, C);                             // (B,T,C)
    if (a.dropout > 0) dropout_forward(a.stream[0], embedded, N * C, a.dropout, random_bits(seed, 0));      // x = dropout(embed)
    norm_forward(c.norm, a.normalized[0], a.mean[0], a.rstd[0], a.stream[0], model.layers[0].norm1_weight.data, model.layers[0].norm1_bias.data,
                 N, C);                                                                                       // h = norm1(x)
    for (int l = 0; l < L; l++) {
        GPTLayer& w = model.layers[l];
        GPTLayerActivations& s = a.layers[l];
        linear_forward(s.qkv, a.normalized[l], w.qkv_weight.data, w.qkv_bias.data, N, C, 3 * C);             // (B,T,3C)
        uint64_t attention_seed = random_bits(seed, 3 * l + 1);
        if (a.flash) flash_attention_forward(s.attention, s.saved, s.qkv, B, T, C, NH, c.rotary, a.attention_dropout, attention_seed);
        else attention_forward(s.attention, s.saved, s.qkv, B, T, C, NH, c.rotary, a.attention_dropout, attention_seed);  // (B,T,C)
        linear_forward(a.branch, s.attention, w.attn_proj_weight.data, w.attn_proj_bias.data, N, C, C);      // (B,T,C)
        const floatX* branch = dropout_site(a.branch, a.dropped, N * C, a.dropout, random_bits(seed, 3 * l + 2));
        residual_norm_forward(c.norm, s.residual, s.normalized, s.mean, s.rstd, a.stream[l], branch, w.norm2_weight.data, w.norm2_bias.data,
                              N, C);                                                                          // r = x + branch, h2 = norm2(r)
        if (c.activation == Activation::gelu) {
            linear_gelu_forward(s.activation, s.fc, s.normalized, w.fc_weight.data, w.fc_bias.data, N, C, F);  // (B,T,4C)
        } else {
            linear_forward(s.fc, s.normalized, w.fc_weight.data, w.fc_bias.data, N, C, F);                   // (B,T,2H)
            swiglu_forward(s.activation, s.fc, N, H);                                                         // (B,T,H)
        }
        linear_forward(a.branch, s.activation, w.mlp_proj_weight.data, w.mlp_proj_bias.data, N, H, C);       // (B,T,C)
        branch = dropout_site(a.branch, a.dropped, N * C, a.dropout, random_bits(seed, 3 * l + 3));
        bool last = l + 1 == L;  // the next norm: the next layer's first, or the final one
        const Tensor& norm_weight = last ? model.final_norm_weight : model.layers[l + 1].norm1_weight;
        const Tensor& norm_bias = last ? model.final_norm_bias : model.layers[l + 1].norm1_bias;
        residual_norm_forward(c.norm, a.stream[l + 1], a.normalized[l + 1], a.mean[l + 1], a.rstd[l + 1], s.residual, branch,
                              norm_weight.data, norm_bias.data, N, C);                                        // x' = r + branch, h = norm(x')
    }
    linear_forward(a.logits, a.normalized[L], head.data, nullptr, N, C, c.vocab_size);                        // (B,T,V)
}

real gpt_loss(GPTActivations& a, const int* targets, int vocab_size) {
    classifier(a.logits, a.losses, a.loss, a.count, targets, long(a.B) * a.T, vocab_size, 0, false);
    real loss;
    cuda_check(cudaMemcpy(&loss, a.loss, sizeof loss, cudaMemcpyDeviceToHost));
    return loss;
}

void gpt_backward(GPT& model, GPTActivations& a, const int* targets, real loss_scale) {
    PhaseScope phase("backward");
    const GPTConfig& c = model.config;
    int B = a.B, T = a.T, C = c.dim, NH = c.heads, L = c.layers, H = c.mlp_ratio * C, F = c.activation == Activation::swiglu ? 2 * H : H;
    long N = long(B) * T;
    const Tensor& head = c.tied_embeddings ? model.wte : model.lm_head;
    const InputGrad write = InputGrad::write, add = InputGrad::add;
    // The loss, and dlogits = (softmax(logits) - onehot(targets)) * loss_scale / count over the logits  (B,T,V)
    classifier(a.logits, a.losses, a.loss, a.count, targets, N, c.vocab_size, loss_scale, true);
    floatX* dlogits = a.logits;
    linear_backward(a.dnormalized, head.grad, nullptr, dlogits, a.normalized[L], head.data, N, C, c.vocab_size, write);  // dh (B,T,C)
    norm_backward(c.norm, a.dstream, model.final_norm_weight.grad, model.final_norm_bias.grad, a.dnormalized, a.stream[L],
                  model.final_norm_weight.data, a.mean[L], a.rstd[L], N, C, write);                          // dx (B,T,C)
    for (int l = L - 1; l >= 0; l--) {
        GPTLayer& w = model.layers[l];
        GPTLayerActivations& s = a.layers[l];
        // The MLP branch: its output's gradient is the stream's, through dropout.
        const floatX* dbranch = dropout_site_backward(a.dstream, a.dbranch, N * C, a.dropout, random_bits(a.seed, 3 * l + 3));
        linear_backward(a.dactivation, w.mlp_proj_weight.grad, w.mlp_proj_bias.grad, dbranch, s.activation, w.mlp_proj_weight.data, N, H, C,
                        write);                                                                               // (B,T,H)
        if (c.activation == Activation::gelu) {
            linear_gelu_backward(a.dnormalized, w.fc_weight.grad, w.fc_bias.grad, a.dfc, a.dactivation, s.fc, s.normalized, w.fc_weight.data, N,
                                 C, F, write);                                                                // dh2 (B,T,C)
        } else {
            swiglu_backward(a.dfc, a.dactivation, s.fc, N, H, write);                                          // (B,T,2H)
            linear_backward(a.dnormalized, w.fc_weight.grad, w.fc_bias.grad, a.dfc, s.normalized, w.fc_weight.data, N, C, F, write);
        }
        norm_backward(c.norm, a.dstream, w.norm2_weight.grad, w.norm2_bias.grad, a.dnormalized, s.residual, w.norm2_weight.data, s.mean,
                      s.rstd, N, C, add);                                                                     // dr = dx + norm2's
        // The attention branch.
        dbranch = dropout_site_backward(a.dstream, a.dbranch, N * C, a.dropout, random_bits(a.seed, 3 * l + 2));
        linear_backward(a.dattention, w.attn_proj_weight.grad, w.attn_proj_bias.grad, dbranch, s.attention, w.attn_proj_weight.data, N, C, C,
                        write);                                                                               // (B,T,C)
        uint64_t attention_seed = random_bits(a.seed, 3 * l + 1);
        if (a.flash)
            flash_attention_backward(a.dqkv, a.dattention, s.attention, s.saved, a.scratch, s.qkv, B, T, C, NH, c.rotary, a.attention_dropout,
                                     attention_seed, write);
        else
            attention_backward(a.dqkv, a.dattention, s.saved, a.scratch, s.qkv, B, T, C, NH, c.rotary, a.attention_dropout, attention_seed,
                               write);                                                                        // (B,T,3C)
        linear_backward(a.dnormalized, w.qkv_weight.grad, w.qkv_bias.grad, a.dqkv, a.normalized[l], w.qkv_weight.data, N, C, 3 * C, write);
        norm_backward(c.norm, a.dstream, w.norm1_weight.grad, w.norm1_bias.grad, a.dnormalized, a.stream[l], w.norm1_weight.data, a.mean[l],
                      a.rstd[l], N, C, add);                                                                  // dx (B,T,C)
    }
    const floatX* dembedded = dropout_site_backward(a.dstream, a.dbranch, N * C, a.dropout, random_bits(a.seed, 0));
    embedding_backward(model.wte.grad, model.wpe.grad, dembedded, a.token_groups, B, T, C);
}

// ====================================================================================================
// Generation: one sequence, token by token, with a key/value cache so each new token costs one
// position's work (O(context) attention) instead of a forward pass over the whole window.

void kv_cache_create(KVCache* cache, const GPTConfig& config) {
    cache->config = config;
    cache->length = 0;
    size_t bytes = size_t(config.layers) * config.context * config.dim * sizeof(floatX);
    cuda_check(cudaMalloc(&cache->keys, bytes));
    cuda_check(cudaMalloc(&cache->values, bytes));
}

KVCache::~KVCache() {
    (void)cudaFree(keys);
    (void)cudaFree(values);
}

// k, v (NH, n, hs) -> the cache's rows [start, start + n) of each head; cache layout (NH, context, hs).
// The keys and values of n new positions (rows ld_k and ld_v apart, NH head vectors each) into the
// cache's slots start..start+n of every head. A row kernel over the n*NH head vectors.
__global__ void kv_cache_append_kernel(floatX* cache_keys, floatX* cache_values, const floatX* k, int ld_k, const floatX* v, int ld_v, int n, int NH,
                                       int hs, int context, int start) {
    bool active;
    long r = group_row(long(n) * NH, &active);
    if (!active) return;
    long p = r / NH, h = r % NH, slot = (h * context + start + p) * hs;
    for_each_in_row(hs, [&](int d) { cache_keys[slot + d] = k[p * ld_k + h * hs + d], cache_values[slot + d] = v[p * ld_v + h * hs + d]; });
}

// Positions [cache.length, cache.length + n) of one sequence: their keys and values join the cache,
// and the logits of the last one (V values on the device) come back. The same maths as gpt_forward,
// through the raw forward functions (nothing is recorded).
floatX* gpt_forward_cached(GPT& model, KVCache& cache, const int* tokens, int n) {
    const GPTConfig& c = model.config;
    int start = cache.length, C = c.dim, NH = c.heads, hs = C / NH, L = start + n;
    if (L > c.context) fail("gpt_forward_cached: %d positions exceed the context window %d", L, c.context);
    int hidden = c.mlp_ratio * C, fc_out = c.activation == Activation::swiglu ? 2 * hidden : hidden;
    floatX *x = device_alloc<floatX>(long(n) * C), *h = device_alloc<floatX>(long(n) * C), *qkv = device_alloc<floatX>(long(n) * 3 * C);
    floatX *q_rotated = device_alloc<floatX>(long(n) * C), *k_rotated = device_alloc<floatX>(long(n) * C);
    floatX *att = device_alloc<floatX>(long(NH) * n * L), *y = device_alloc<floatX>(long(n) * C), *branch = device_alloc<floatX>(long(n) * C);
    floatX *fc = device_alloc<floatX>(long(n) * fc_out), *act = device_alloc<floatX>(long(n) * hidden);
    real *mean = device_alloc<real>(n), *rstd = device_alloc<real>(n);
    auto normalize_into = [&](floatX* out, const floatX* in, const Tensor& weight, const Tensor& bias) {
        norm_forward(c.norm, out, mean, rstd, in, weight.data, bias.data, n, C);
    };
    embedding_forward(x, tokens, model.wte.data, c.rotary ? nullptr : model.wpe.data + long(start) * C, 1, n, C);
    for (int l = 0; l < c.layers; l++) {
        GPTLayer& layer = model.layers[l];
        floatX* cache_keys = cache.keys + long(l) * c.context * C;
        floatX* cache_values = cache.values + long(l) * c.context * C;
        normalize_into(h, x, layer.norm1_weight, layer.norm1_bias);
        linear_forward(qkv, h, layer.qkv_weight.data, layer.qkv_bias.data, n, C, 3 * C);
        const floatX *q = qkv, *k = qkv + C;
        int ld = 3 * C;
        if (c.rotary) {
            rotary_forward(q_rotated, C, qkv, 3 * C, n, n, NH, hs, start);
            rotary_forward(k_rotated, C, qkv + C, 3 * C, n, n, NH, hs, start);
            q = q_rotated, k = k_rotated, ld = C;
        }
        launch(kv_cache_append_kernel, row_grid(long(n) * NH), row_block(), 0, cache_keys, cache_values, k, ld, qkv + 2 * C, 3 * C, n, NH, hs,
               c.context, start);
        // Each new query against every cached key up to its own position, head by head.
        gemm({.M = n, .N = L, .K = hs, .inner = NH}, real(1 / std::sqrt(double(hs))), {.data = q, .ld = ld, .inner = hs},
             {.data = cache_keys, .ld = hs, .transpose = true, .inner = long(c.context) * hs}, 0, {.data = att, .ld = L, .inner = long(n) * L});
        launch(causal_softmax_forward_kernel, row_grid(long(NH) * n), row_block(), 0, att, long(NH) * n, n, L, start);
        gemm({.M = n, .N = hs, .K = L, .inner = NH}, 1, {.data = att, .ld = L, .inner = long(n) * L},
             {.data = cache_values, .ld = hs, .inner = long(c.context) * hs}, 0, {.data = y, .ld = C, .inner = hs});
        linear_forward(branch, y, layer.attn_proj_weight.data, layer.attn_proj_bias.data, n, C, C);
        residual_forward(x, x, branch, long(n) * C);
        normalize_into(h, x, layer.norm2_weight, layer.norm2_bias);
        if (c.activation == Activation::swiglu) {
            linear_forward(fc, h, layer.fc_weight.data, layer.fc_bias.data, n, C, fc_out);
            swiglu_forward(act, fc, n, hidden);
        } else {
            linear_gelu_forward(act, fc, h, layer.fc_weight.data, layer.fc_bias.data, n, C, fc_out);
        }
        linear_forward(branch, act, layer.mlp_proj_weight.data, layer.mlp_proj_bias.data, n, hidden, C);
        residual_forward(x, x, branch, long(n) * C);
    }
    cache.length = L;
    floatX* last = x + long(n - 1) * C;
    normalize_into(h, last, model.final_norm_weight, model.final_norm_bias);
    floatX* logits = device_alloc<floatX>(c.vocab_size);
    linear_forward(logits, h, (c.tied_embeddings ? model.wte : model.lm_head).data, nullptr, 1, C, c.vocab_size);
    return logits;
}

// Picks the next token from logits on the host: greedy at temperature 0, otherwise a draw from
// softmax(logits / temperature), keeping only the top_k most likely (0: all) and then the smallest
// set whose probability reaches top_p.
int sample_token(const std::vector<real>& logits, Sampler& sampler) {
    int V = int(logits.size());
    if (sampler.temperature <= 0) return int(std::max_element(logits.begin(), logits.end()) - logits.begin());
    std::vector<std::pair<double, int>> candidates(V);
    double top = *std::max_element(logits.begin(), logits.end());
    for (int v = 0; v < V; v++) candidates[v] = {std::exp((logits[v] - top) / sampler.temperature), v};
    std::sort(candidates.begin(), candidates.end(), [](const std::pair<double, int>& a, const std::pair<double, int>& b) {
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
    double draw = double(splitmix64_next(&sampler.rng_state) >> 11) * (1.0 / 9007199254740992.0) * kept;
    for (int i = 0; i < keep; i++) {
        draw -= candidates[i].first;
        if (draw < 0) return candidates[i].second;
    }
    return candidates[keep - 1].second;
}

// The model sees the tokens from `window_start` on. When they fill the context, the window jumps
// forward by half a context and (with the cache) the cache is rebuilt from the tokens kept.
void generate(GPT& model, std::vector<int>& tokens, int count, Sampler& sampler, bool use_cache, const std::function<void(int)>& on_token) {
    NoGrad no_grad;
    const GPTConfig& c = model.config;
    if (tokens.empty()) fail("generate: the prompt is empty");
    KVCache cache;
    if (use_cache) kv_cache_create(&cache, c);
    MemoryMark start = memory_mark();
    int* device_tokens = device_alloc<int>(c.context);
    size_t window_start = tokens.size() > size_t(c.context) ? tokens.size() - c.context : 0;
    for (int produced = 0; produced < count; produced++) {
        if (tokens.size() - window_start > size_t(c.context)) window_start += std::max(1, c.context / 2), cache.length = 0;
        int n = int(tokens.size() - window_start);
        MemoryMark mark = memory_mark();
        floatX* logits;
        if (use_cache) {
            int fresh = n - cache.length;  // all of the window after a reset, else just the newest token
            cuda_check(cudaMemcpy(device_tokens, tokens.data() + window_start + cache.length, fresh * sizeof(int), cudaMemcpyHostToDevice));
            logits = gpt_forward_cached(model, cache, device_tokens, fresh);
        } else {
            cuda_check(cudaMemcpy(device_tokens, tokens.data() + window_start, n * sizeof(int), cudaMemcpyHostToDevice));
            logits = gpt_forward_tape(model, device_tokens, 1, n, false, 0).data + long(n - 1) * c.vocab_size;
        }
        std::vector<real> host = download(logits, c.vocab_size);
        memory_release(mark);
        int next = sample_token(host, sampler);
        tokens.push_back(next);
        on_token(next);
    }
    memory_release(start);
}

// ====================================================================================================
// Optimizers and training maths. All on the device, over the whole parameter buffer at once.

// Global gradient norm, sqrt(sum g^2), deterministic: each block sums its tile, its threads combining
// through shared memory in a tree; then one thread adds the block sums in order.
__global__ void sum_of_squares_kernel(real* block_sums, const floatX* x, long n) {
    auto partial = shared_memory<real>();
    Tile tile = block_tile(n);
    partial[threadIdx.x] = sum_strided(tile.begin, tile.end, threadIdx.x, blockDim.x, [&](long i) { return x[i] * x[i]; });
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (int(threadIdx.x) < stride) partial[threadIdx.x] = partial[threadIdx.x] + partial[threadIdx.x + stride];
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
    launch(sum_of_squares_kernel, blocks, element_threads, element_threads * sizeof(real), block_sums, gradients, n);
    launch(square_root_of_sum_kernel, 1, 1, 0, norm, block_sums, int(blocks));
}

// Clipping by global norm happens inside the optimizer kernels: the gradient is scaled by
// max_norm / (norm + 1e-6) when that is below 1 (max_norm <= 0: no clipping). The norm is read on the
// device, so the host never waits for it.
__device__ __forceinline__ real clip_scale(const real* norm, real max_norm) {
    if (max_norm <= 0 || !norm) return 1;
    real scale = max_norm / (norm[0] + real(1e-6));
    return scale < 1 ? scale : 1;
}

// AdamW (decoupled weight decay):  g = clip * grad,  m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2,
//   w -= lr * (m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd * w),  wd only on the first num_decayed.
// w is the float master weight when there is one (mixed precision: the stored parameter is then w
// rounded), else the parameter itself. Memory-bound, so it moves four parameters per load and store:
// a Pack4 of floats is one 128-bit access. The buffers come from cudaMalloc, aligned for that; the last
// block takes the n % 4 left over.
template <typename T> struct alignas(4 * sizeof(T)) Pack4 {
    T v[4];
};

struct AdamWStep {
    real lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2;
    uint64_t seed;  // for rounding parameters from their master weights
};

// Storing an updated master weight as a (bfloat16) parameter rounds it up or down at random, up with
// probability equal to its distance from the value below, so that the stored parameter is the master
// weight on average: with round-to-nearest, updates smaller than half a bfloat16 step (weights near 1
// move in steps of 2^-8) would never show in the parameters the model computes with.
__device__ __forceinline__ floatX round_stochastic(real w, uint64_t seed, long i) {
#ifdef TRICYCLE_BF16
    unsigned int bits = __float_as_uint(w);
    if ((bits & 0x7fffffff) < 0x7f7f0000) bits += unsigned(random_bits(seed, uint64_t(i)) & 0xffff);  // finite, not overflowing
    bf16 stored;
    stored.value = __ushort_as_bfloat16((unsigned short)(bits >> 16));
    return stored;
#else
    (void)seed, (void)i;
    return w;
#endif
}

__device__ __forceinline__ real adamw_weight(real w, real g, real& m, real& v, bool decayed, const AdamWStep& s) {
    m = s.beta1 * m + (1 - s.beta1) * g;
    v = s.beta2 * v + (1 - s.beta2) * g * g;
    real update = m / s.bias_correction1 / (sqrt(v / s.bias_correction2) + s.eps);
    return w - s.lr * (update + (decayed ? s.weight_decay * w : 0));
}

// Four parameters: loaded and stored as packs, updated one by one. With a master copy (HAS_MASTER),
// the float weight comes from it and the parameter is its rounding. A template, so that each kernel
// body is one straight loop (a runtime branch per element keeps the CPU compiler from vectorising it).
template <bool HAS_MASTER>
__device__ __forceinline__ void adamw_pack(long i, floatX* params, real* master, const floatX* grads, real* m, real* v, real scale, long num_decayed,
                                           const AdamWStep& s) {
    Pack4<floatX> p = reinterpret_cast<Pack4<floatX>*>(params)[i];
    Pack4<floatX> g = reinterpret_cast<const Pack4<floatX>*>(grads)[i];
    Pack4<real> first = reinterpret_cast<Pack4<real>*>(m)[i], second = reinterpret_cast<Pack4<real>*>(v)[i];
    Pack4<real> w;
    if (HAS_MASTER) w = reinterpret_cast<Pack4<real>*>(master)[i];
    for (int k = 0; k < 4; k++) {
        real weight = adamw_weight(HAS_MASTER ? w.v[k] : real(p.v[k]), g.v[k] * scale, first.v[k], second.v[k], 4 * i + k < num_decayed, s);
        if (HAS_MASTER) w.v[k] = weight, p.v[k] = round_stochastic(weight, s.seed, 4 * i + k);
        else p.v[k] = weight;
    }
    reinterpret_cast<Pack4<floatX>*>(params)[i] = p;
    reinterpret_cast<Pack4<real>*>(m)[i] = first, reinterpret_cast<Pack4<real>*>(v)[i] = second;
    if (HAS_MASTER) reinterpret_cast<Pack4<real>*>(master)[i] = w;
}

__global__ void adamw_kernel(floatX* params, real* master, const floatX* grads, real* m, real* v, long n, long num_decayed, AdamWStep s,
                             const real* norm, real max_norm) {
    real scale = clip_scale(norm, max_norm);
    if (master) for_each_element(n / 4, [&](long i) { adamw_pack<true>(i, params, master, grads, m, v, scale, num_decayed, s); });
    else for_each_element(n / 4, [&](long i) { adamw_pack<false>(i, params, master, grads, m, v, scale, num_decayed, s); });
    if (blockIdx.x == gridDim.x - 1)
        for_each_strided(n / 4 * 4, n, threadIdx.x, blockDim.x, [&](long i) {
            real w = adamw_weight(master ? master[i] : real(params[i]), grads[i] * scale, m[i], v[i], i < num_decayed, s);
            params[i] = master ? round_stochastic(w, s.seed, i) : floatX(w);
            if (master) master[i] = w;
        });
}

void adamw_create(AdamW* opt, long n) {
    cuda_check(cudaMalloc(&opt->m, n * sizeof(real)));
    cuda_check(cudaMalloc(&opt->v, n * sizeof(real)));
    cuda_check(cudaMemset(opt->m, 0, n * sizeof(real)));
    cuda_check(cudaMemset(opt->v, 0, n * sizeof(real)));
    opt->n = n;
    opt->step = 0;
}

AdamW::~AdamW() {
    (void)cudaFree(m);
    (void)cudaFree(v);
}

void adamw_update(AdamW* opt, floatX* params, real* master, const floatX* grads, long num_decayed, real lr, const real* norm, real max_norm) {
    PhaseScope phase("optimizer");
    opt->step++;
    AdamWStep s{lr, real(opt->beta1), real(opt->beta2), real(opt->eps), real(opt->weight_decay),
                real(1 - std::pow(double(opt->beta1), double(opt->step))), real(1 - std::pow(double(opt->beta2), double(opt->step))),
                random_bits(0x5eed, uint64_t(opt->step))};
    launch(adamw_kernel, element_blocks(opt->n / 4), element_threads, 0, params, master, grads, opt->m, opt->v, opt->n, num_decayed, s, norm,
           max_norm);
}

// SGD with momentum:  u = momentum * u + clip * grad,  w -= lr * u  (w: the master weight, as in AdamW).
__global__ void sgd_kernel(floatX* params, real* master, const floatX* grads, real* velocity, long n, real lr, real momentum, uint64_t seed,
                           const real* norm, real max_norm) {
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

void sgd_update(SGD* opt, floatX* params, real* master, const floatX* grads, real lr, const real* norm, real max_norm) {
    PhaseScope phase("optimizer");
    opt->step++;
    launch(sgd_kernel, element_blocks(opt->n), element_threads, 0, params, master, grads, opt->velocity, opt->n, lr, real(opt->momentum),
           random_bits(0x5eed, uint64_t(opt->step)), norm, max_norm);
}

// Linear warmup from 0 to max_lr over `warmup` steps, then cosine decay to min_lr at the last step.
// (A host function: one number per step, computed where the step is launched.)
float learning_rate(long step, long warmup, long total_steps, float max_lr, float min_lr) {
    if (step < warmup) return max_lr * float(step + 1) / float(warmup);
    if (step >= total_steps - 1 || total_steps <= warmup) return min_lr;
    double progress = double(step - warmup) / double(total_steps - 1 - warmup);
    return min_lr + float(0.5 * (1 + std::cos(3.141592653589793 * progress))) * (max_lr - min_lr);
}

// ====================================================================================================
// Weight and checkpoint files (the format is described in tricycle.h and the README)

constexpr int32_t model_file_magic = 0x59435254;  // the bytes "TRCY"
constexpr int32_t model_file_version = 1;
constexpr int directory_name_bytes = 48;

// Tensors in buffer order (decayed first), as the file lists them.
static std::vector<Parameter> parameters_in_buffer_order(GPT& model) {
    std::vector<Parameter> table = parameter_table(model), ordered;
    for (bool decayed : {true, false})
        for (const Parameter& p : table)
            if (p.decay == decayed) ordered.push_back(p);
    return ordered;
}

static void append(std::string& out, const void* data, size_t bytes) { out.append(static_cast<const char*>(data), bytes); }

// Device buffer of floatX or real -> float32 bytes.
template <typename T> static void append_floats(std::string& out, const T* device, long n) {
    std::vector<real> host = download(device, n);
    std::vector<float> values(host.begin(), host.end());
    append(out, values.data(), n * sizeof(float));
}

std::string floats_section(const real* device, long n) {
    std::string bytes;
    append_floats(bytes, device, n);
    return bytes;
}

void gpt_save(GPT& model, const char* path, const std::vector<FileSection>& sections) {
    const GPTConfig& c = model.config;
    std::vector<Parameter> ordered = parameters_in_buffer_order(model);
    int32_t header[256] = {model_file_magic, model_file_version, c.vocab_size, c.context, c.dim, c.layers, c.heads, c.mlp_ratio,
                           c.norm == Norm::rmsnorm, c.activation == Activation::swiglu, c.rotary, c.tied_embeddings,
                           float_bits(c.dropout), float_bits(c.attention_dropout), int32_t(ordered.size()), int32_t(sections.size())};
    int64_t count = model.num_parameters;
    memcpy(&header[16], &count, 8);
    std::string out;
    append(out, header, sizeof header);
    for (const Parameter& p : ordered) {
        char name[directory_name_bytes] = {};
        snprintf(name, sizeof name, "%s", p.name.c_str());
        int32_t dims[4] = {int32_t(p.shape.size()), p.shape[0], p.shape.size() > 1 ? p.shape[1] : 0, 0};
        append(out, name, sizeof name);
        append(out, dims, sizeof dims);
    }
    append_floats(out, model.parameters, model.num_parameters);  // the model as it computes (a trainer saves its master copy apart)
    for (const FileSection& s : sections) {
        int64_t length = int64_t(s.bytes.size());
        append(out, s.tag, 4);
        append(out, &length, 8);
        out += s.bytes;
    }
    write_file_atomic(path, out.data(), out.size(), "model file");
}

// Reads bytes from a file image, failing cleanly at the end.
struct FileReader {
    const std::string& data;
    size_t position;
    const char* path;
    void read(void* out, size_t bytes, const char* what) {
        if (data.size() - position < bytes)
            fail("model file '%s': truncated: %s needs %zu bytes at offset %zu, the file has %zu", path, what, bytes, position, data.size());
        memcpy(out, data.data() + position, bytes);
        position += bytes;
    }
};

void gpt_load(GPT* model, const char* path, std::vector<FileSection>* sections) {
    std::string data = read_whole_file(path, "model file");
    FileReader reader{data, 0, path};
    int32_t header[256];
    reader.read(header, sizeof header, "the header");
    if (header[0] != model_file_magic) fail("model file '%s': bad magic 0x%08x, expected 0x%08x (not a Tricycle model)", path, header[0], model_file_magic);
    if (header[1] != model_file_version) fail("model file '%s': version %d, this build reads version %d", path, header[1], model_file_version);
    GPTConfig c;
    c.vocab_size = header[2], c.context = header[3], c.dim = header[4], c.layers = header[5], c.heads = header[6], c.mlp_ratio = header[7];
    c.norm = header[8] ? Norm::rmsnorm : Norm::layernorm;
    c.activation = header[9] ? Activation::swiglu : Activation::gelu;
    c.rotary = header[10] != 0, c.tied_embeddings = header[11] != 0;
    c.dropout = bits_float(header[12]), c.attention_dropout = bits_float(header[13]);
    try {
        gpt_check_config(c);
    } catch (const std::runtime_error& error) {
        fail("model file '%s': %s", path, error.what());
    }
    int64_t count;
    memcpy(&count, &header[16], 8);
    if (count < 0 || uint64_t(count) > (data.size() - reader.position) / sizeof(float))  // before allocating anything
        fail("model file '%s': truncated: the header promises %lld parameters, the file has room for fewer", path, (long long)count);
    gpt_create(model, c);
    {
        std::vector<Parameter> ordered = parameters_in_buffer_order(*model);
        if (header[14] != int32_t(ordered.size()) || count != model->num_parameters)
            fail("model file '%s': lists %d tensors and %lld parameters, its config needs %zu and %ld", path, header[14], (long long)count,
                 ordered.size(), model->num_parameters);
        for (const Parameter& p : ordered) {
            char name[directory_name_bytes];
            int32_t dims[4];
            reader.read(name, sizeof name, "the tensor directory");
            reader.read(dims, sizeof dims, "the tensor directory");
            name[directory_name_bytes - 1] = 0;
            bool same = p.name == name && dims[0] == int32_t(p.shape.size()) && dims[1] == p.shape[0] && (p.shape.size() < 2 || dims[2] == p.shape[1]);
            if (!same) fail("model file '%s': tensor '%s' is not the '%s' its config expects here", path, name, p.name.c_str());
        }
        std::vector<float> values(model->num_parameters);
        reader.read(values.data(), values.size() * sizeof(float), "the parameters");
        std::vector<real> host(values.begin(), values.end());
        upload(model->parameters, host.data(), model->num_parameters);
        if (model->master) upload(model->master, host.data(), model->num_parameters);
        for (int32_t s = 0; s < header[15]; s++) {
            FileSection section;
            int64_t length;
            reader.read(section.tag, 4, "a section header");
            reader.read(&length, 8, "a section header");
            if (length < 0) fail("model file '%s': section '%.4s' has a negative length", path, section.tag);
            section.bytes.resize(size_t(length));
            reader.read(&section.bytes[0], size_t(length), "a section");
            if (sections) sections->push_back(section);
        }
        if (reader.position != data.size()) fail("model file '%s': %zu unexpected bytes after the last section", path, data.size() - reader.position);
    }
}

void floats_from_section(real* device, long n, const FileSection& section, const char* path) {
    if (long(section.bytes.size()) != n * long(sizeof(float)))
        fail("model file '%s': section '%.4s' holds %zu bytes, expected %ld", path, section.tag, section.bytes.size(), n * long(sizeof(float)));
    std::vector<float> values(n);
    memcpy(values.data(), section.bytes.data(), n * sizeof(float));
    std::vector<real> host(values.begin(), values.end());
    upload(device, host.data(), n);
}

// ====================================================================================================
// Tokenizer, token files and the data loader (host code)

// Whole-file helpers

std::string read_whole_file(const char* path, const char* kind) {
    FILE* f = fopen(path, "rb");
    if (!f) fail("%s '%s': cannot open: %s", kind, path, strerror(errno));
    std::string data;
    char buffer[1 << 16];
    size_t n;
    while ((n = fread(buffer, 1, sizeof(buffer), f)) > 0) data.append(buffer, n);
    bool read_error = ferror(f) != 0;
    fclose(f);
    if (read_error) fail("%s '%s': read error", kind, path);
    return data;
}

// For the crash tests: TRICYCLE_CRASH_BEFORE_RENAME=SUFFIX:N kills the process on the N-th write of a
// file whose path ends in SUFFIX, after the temporary file is complete and before the rename.
static void crash_here_if_asked(const char* path) {
    static int writes_seen = 0;
    const char* spec = getenv("TRICYCLE_CRASH_BEFORE_RENAME");
    const char* colon = spec ? strrchr(spec, ':') : nullptr;
    if (!colon) return;
    std::string suffix(spec, colon), name(path);
    bool matches = name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
    if (matches && ++writes_seen == atoi(colon + 1)) {
        fprintf(stderr, "TRICYCLE_CRASH_BEFORE_RENAME: aborting before renaming '%s'\n", path);
        abort();
    }
}

void write_file_atomic(const char* path, const void* data, size_t size, const char* kind) {
    std::string temp_path = std::string(path) + ".tmp";
    FILE* f = fopen(temp_path.c_str(), "wb");
    if (!f) fail("%s '%s': cannot create '%s': %s", kind, path, temp_path.c_str(), strerror(errno));
    bool ok = fwrite(data, 1, size, f) == size;
    ok = fflush(f) == 0 && ok;
    ok = fsync(fileno(f)) == 0 && ok;  // on disk before the rename makes it the file
    if (fclose(f) != 0) ok = false;
    if (!ok) {
        int error = errno;
        remove(temp_path.c_str());
        fail("%s '%s': write failed: %s", kind, path, strerror(error));
    }
    crash_here_if_asked(path);
    if (rename(temp_path.c_str(), path) != 0) {
        int error = errno;
        remove(temp_path.c_str());
        fail("%s '%s': cannot rename '%s' into place: %s", kind, path, temp_path.c_str(), strerror(error));
    }
}

// ----------------------------------------------------------------------------------------------------
// Chunking: the hand-written scanner that cuts text into pieces before BPE.

enum ByteClass { BYTE_LETTER, BYTE_DIGIT, BYTE_SPACE, BYTE_OTHER };

static ByteClass byte_class(unsigned char c) {
    // Bytes >= 0x80 are the parts of multi-byte UTF-8 characters; calling them
    // letters keeps words like "café" or "naïve" in one chunk.
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c >= 0x80) return BYTE_LETTER;
    if (c >= '0' && c <= '9') return BYTE_DIGIT;
    if (c == ' ' || c == '\n' || c == '\t' || c == '\r' || c == '\v' || c == '\f') return BYTE_SPACE;
    return BYTE_OTHER;
}

size_t tokenizer_chunk_length(const char* text, size_t length) {
    if (length == 0) return 0;
    const unsigned char* s = (const unsigned char*)text;
    // One leading space joins the run after it: " world" is a chunk, so the
    // space-before-a-word (the most common pattern in text) can merge with it.
    size_t begin = 0;
    if (length >= 2 && s[0] == ' ' && byte_class(s[1]) != BYTE_SPACE) begin = 1;
    ByteClass kind = byte_class(s[begin]);
    size_t end = begin + 1;
    while (end < length && byte_class(s[end]) == kind) end++;
    // "\n    return": the indentation run gives up its last space to " return".
    if (kind == BYTE_SPACE && end < length && end >= 2 && s[end - 1] == ' ') end--;
    return end;
}

// Finds the next end-of-text separator in [text, end); returns end if none.
static const char* find_separator(const char* text, const char* end, const std::string& separator) {
    size_t n = separator.size();
    if (n == 0) return end;
    const char* p = text;
    while ((size_t)(end - p) >= n) {
        const char* hit = (const char*)memchr(p, separator[0], (size_t)(end - p) - n + 1);
        if (!hit) break;
        if (memcmp(hit, separator.data(), n) == 0) return hit;
        p = hit + 1;
    }
    return end;
}

// A pair of token ids packed into one integer, for hash maps. Comparing keys
// compares (left, right) lexicographically, which the tie-break relies on.
static uint64_t pair_key(int32_t left, int32_t right) {
    return ((uint64_t)(uint32_t)left << 32) | (uint32_t)right;
}

// ----------------------------------------------------------------------------------------------------
// Tokenizer tables

// Rebuilds what follows from the merges: each token's bytes, the pair -> rank
// lookup, and an empty encoder cache.
static void tokenizer_build_tables(Tokenizer* tok) {
    int num_merges = (int)tok->merges.size();
    tok->vocab_size = byte_tokens + num_merges + 1;
    tok->eot_token = tok->vocab_size - 1;

    // token_start[id] is where token id's bytes begin, and so where token id-1's end.
    tok->token_bytes.clear();
    tok->token_start.assign(tok->vocab_size + 1, 0);
    for (int id = 0; id < byte_tokens; id++) {
        tok->token_start[id] = tok->token_bytes.size();
        tok->token_bytes.push_back((char)id);
    }
    for (int i = 0; i < num_merges; i++) {
        // A merged token's bytes are its left part's bytes then its right part's.
        // Both parts are older tokens, so their ends are already recorded. The
        // piece is built in a copy because appending to token_bytes may move it.
        int id = byte_tokens + i;
        tok->token_start[id] = tok->token_bytes.size();
        std::string piece = std::string(tokenizer_token_bytes(tok, tok->merges[i].left));
        piece += tokenizer_token_bytes(tok, tok->merges[i].right);
        tok->token_bytes += piece;
    }
    tok->token_start[tok->eot_token] = tok->token_bytes.size();
    tok->token_bytes += tok->eot_name;
    tok->token_start[tok->vocab_size] = tok->token_bytes.size();

    tok->merge_rank.clear();
    tok->merge_rank.reserve(num_merges);
    for (int i = 0; i < num_merges; i++) tok->merge_rank[pair_key(tok->merges[i].left, tok->merges[i].right)] = i;

    tok->cache.clear();
    tok->cache_keys.clear();
    tok->cache_tokens.clear();
}

std::string_view tokenizer_token_bytes(const Tokenizer* tok, int token) {
    if (token < 0 || token >= tok->vocab_size)
        fail("token %d is outside the vocabulary [0, %d)", token, tok->vocab_size);
    size_t start = tok->token_start[token];
    return std::string_view(tok->token_bytes.data() + start, tok->token_start[token + 1] - start);
}

// ----------------------------------------------------------------------------------------------------
// Training
//
// The text is cut into chunks, and identical chunks are counted once: the
// "words" below are the distinct chunks with their frequencies, each held as its
// current sequence of symbols (token ids). A pair's count is the number of times
// it occurs adjacently, summed over words weighted by word frequency.
//
// A full recount after every merge would cost O(text) per merge. Instead we
// keep, for every pair, its count and the list of words it occurs in. Merging
// (a, b) -> c only visits the words in the list of (a, b), and in each changes
// the counts of the pairs around every occurrence: (x, a) and (b, y) lose an
// occurrence, (x, c) and (c, y) gain one. The best pair comes from a max-heap
// with lazy invalidation: entries are never removed when a count changes;
// instead a popped entry whose count is out of date is re-pushed with the
// current count. Counts of existing pairs only ever go down (only pairs that
// contain the new token c go up, and those are pushed fresh), so a heap entry
// never under-states its pair, and the first up-to-date entry popped is the
// true best.

struct TrainWord {
    int64_t count;   // how often this chunk occurs in the text
    size_t start;    // its symbols are symbols[start, start + length)
    size_t length;   // shrinks as merges join symbols
};

struct PairInfo {
    int64_t count = 0;
    std::vector<int32_t> words;  // words that contain the pair (may hold stale entries)
};

struct HeapEntry {
    int64_t count;
    uint64_t key;
};

// std::priority_queue pops the "largest": the highest count, and among equal
// counts the smallest (left, right).
struct HeapOrder {
    bool operator()(const HeapEntry& a, const HeapEntry& b) const {
        if (a.count != b.count) return a.count < b.count;
        return a.key > b.key;
    }
};

struct BpeTrainer {
    std::vector<TrainWord> words;
    std::vector<int32_t> symbols;
    std::unordered_map<uint64_t, PairInfo> pairs;
    std::priority_queue<HeapEntry, std::vector<HeapEntry>, HeapOrder> heap;
    std::vector<uint64_t> new_pairs;  // pairs that gained occurrences in the current merge
    std::vector<int> word_visited;    // the merge that last visited each word
};

static void change_pair_count(BpeTrainer* tr, uint64_t key, int64_t delta, int32_t word) {
    PairInfo& info = tr->pairs[key];
    info.count += delta;
    if (delta > 0) {
        // Words are visited one at a time, so checking the last entry avoids duplicates.
        if (info.words.empty() || info.words.back() != word) info.words.push_back(word);
        tr->new_pairs.push_back(key);
    } else if (info.count == 0) {
        tr->pairs.erase(key);  // stale heap entries for it will find no pair and be dropped
    }
}

// Replaces every (a, b) in word w by c, left to right, and updates the
// neighbouring pair counts. Changes to (a, b) itself are skipped: every
// occurrence disappears, so its count is simply dropped by the caller.
static void merge_in_word(BpeTrainer* tr, int32_t w, int32_t a, int32_t b, int32_t c) {
    uint64_t merged_key = pair_key(a, b);
    TrainWord& word = tr->words[w];
    int32_t* sym = &tr->symbols[word.start];
    int64_t count = word.count;
    size_t n = word.length;
    size_t out = 0;  // symbols [0, out) are final; the rest still to be scanned
    size_t i = 0;
    while (i < n) {
        if (i + 1 < n && sym[i] == a && sym[i + 1] == b) {
            if (out > 0) {  // the left neighbour x (possibly a c made just before)
                int32_t x = sym[out - 1];
                if (pair_key(x, a) != merged_key) change_pair_count(tr, pair_key(x, a), -count, w);
                change_pair_count(tr, pair_key(x, c), count, w);
            }
            if (i + 2 < n) {  // the right neighbour y (not yet scanned)
                int32_t y = sym[i + 2];
                if (pair_key(b, y) != merged_key) change_pair_count(tr, pair_key(b, y), -count, w);
                change_pair_count(tr, pair_key(c, y), count, w);
            }
            sym[out++] = c;
            i += 2;
        } else {
            sym[out++] = sym[i++];
        }
    }
    word.length = out;
}

void tokenizer_train(Tokenizer* tok, const char* text, size_t length, int vocab_size) {
    int min_vocab = byte_tokens + 1;
    if (vocab_size < min_vocab)
        fail("vocab size %d is too small: need at least %d (256 bytes + end-of-text)", vocab_size, min_vocab);
    std::string separator = end_of_text_name;

    // 1. Count distinct chunks. The separators between documents are not text:
    //    they are skipped, and chunks never span them.
    std::unordered_map<std::string_view, int64_t> chunk_counts;
    const char* end = text + length;
    const char* p = text;
    while (p < end) {
        const char* piece_end = find_separator(p, end, separator);
        while (p < piece_end) {
            size_t n = tokenizer_chunk_length(p, (size_t)(piece_end - p));
            if (n >= 2) chunk_counts[std::string_view(p, n)]++;  // 1-byte chunks can never merge
            p += n;
        }
        if (piece_end < end) p = piece_end + separator.size();
    }

    // 2. Turn each distinct chunk into a word of byte symbols, and count pairs.
    BpeTrainer tr;
    tr.words.reserve(chunk_counts.size());
    for (const auto& entry : chunk_counts) {
        TrainWord word;
        word.count = entry.second;
        word.start = tr.symbols.size();
        word.length = entry.first.size();
        for (char byte : entry.first) tr.symbols.push_back((unsigned char)byte);
        tr.words.push_back(word);
    }
    chunk_counts.clear();
    for (size_t w = 0; w < tr.words.size(); w++) {
        const TrainWord& word = tr.words[w];
        const int32_t* sym = &tr.symbols[word.start];
        for (size_t i = 0; i + 1 < word.length; i++)
            change_pair_count(&tr, pair_key(sym[i], sym[i + 1]), word.count, (int32_t)w);
    }
    for (const auto& entry : tr.pairs) tr.heap.push(HeapEntry{entry.second.count, entry.first});
    tr.new_pairs.clear();  // every pair is new here, and already in the heap
    tr.word_visited.assign(tr.words.size(), -1);

    // 3. Merge the best pair until the vocabulary is full or no pair is left.
    std::vector<TokenPair> merges;
    int wanted_merges = vocab_size - min_vocab;
    while ((int)merges.size() < wanted_merges) {
        bool found = false;
        HeapEntry best = {0, 0};
        while (!tr.heap.empty()) {
            best = tr.heap.top();
            tr.heap.pop();
            auto it = tr.pairs.find(best.key);
            int64_t current = (it == tr.pairs.end()) ? 0 : it->second.count;
            if (current == best.count) {
                found = true;
                break;
            }
            if (current > 0) tr.heap.push(HeapEntry{current, best.key});  // out of date: retry later
        }
        if (!found) break;

        int32_t a = (int32_t)(best.key >> 32);
        int32_t b = (int32_t)(best.key & 0xFFFFFFFFu);
        int merge_index = (int)merges.size();
        int32_t c = byte_tokens + merge_index;
        merges.push_back(TokenPair{a, b});

        std::vector<int32_t> affected = std::move(tr.pairs[best.key].words);
        tr.pairs.erase(best.key);
        tr.new_pairs.clear();
        for (int32_t w : affected) {
            if (tr.word_visited[w] == merge_index) continue;
            tr.word_visited[w] = merge_index;
            merge_in_word(&tr, w, a, b, c);
        }
        // Push each pair that gained occurrences once, with its final count.
        std::sort(tr.new_pairs.begin(), tr.new_pairs.end());
        tr.new_pairs.erase(std::unique(tr.new_pairs.begin(), tr.new_pairs.end()), tr.new_pairs.end());
        for (uint64_t key : tr.new_pairs) {
            auto it = tr.pairs.find(key);
            if (it != tr.pairs.end()) tr.heap.push(HeapEntry{it->second.count, key});
        }
    }

    tok->merges = merges;
    tok->eot_name = separator;
    tokenizer_build_tables(tok);
}

// ----------------------------------------------------------------------------------------------------
// Saving and loading

std::string tokenizer_serialize(const Tokenizer* tok) {
    std::vector<int32_t> ints;
    ints.push_back((int32_t)tokenizer_magic);
    ints.push_back(tokenizer_version);
    ints.push_back(tok->vocab_size);
    ints.push_back((int32_t)tok->merges.size());
    ints.push_back(1);  // one special token: end-of-text
    for (const TokenPair& merge : tok->merges) {
        ints.push_back(merge.left);
        ints.push_back(merge.right);
    }
    ints.push_back(tok->eot_token);
    ints.push_back((int32_t)tok->eot_name.size());
    std::string data((const char*)ints.data(), ints.size() * sizeof(int32_t));
    return data + tok->eot_name;
}

void tokenizer_save(const Tokenizer* tok, const char* path) {
    std::string data = tokenizer_serialize(tok);
    write_file_atomic(path, data.data(), data.size(), "tokenizer file");
}

// Reads little-endian int32s from a file held in memory, failing on truncation.
struct ByteReader {
    const std::string* data;
    size_t pos;
    const char* path;
};

static int32_t read_int32(ByteReader* r, const char* what) {
    if (r->data->size() - r->pos < 4)
        fail("tokenizer file '%s': truncated: %zu bytes, ends while reading %s at byte %zu", r->path,
             r->data->size(), what, r->pos);
    int32_t value;
    memcpy(&value, r->data->data() + r->pos, 4);
    r->pos += 4;
    return value;
}

void tokenizer_load(Tokenizer* tok, const char* path) { tokenizer_parse(tok, read_whole_file(path, "tokenizer file"), path); }

void tokenizer_parse(Tokenizer* tok, const std::string& data, const char* path) {
    ByteReader r = {&data, 0, path};

    uint32_t magic = (uint32_t)read_int32(&r, "the magic number");
    if (magic != tokenizer_magic)
        fail("tokenizer file '%s': bad magic 0x%08x, expected 0x%08x", path, magic, tokenizer_magic);
    int version = read_int32(&r, "the version");
    if (version != tokenizer_version)
        fail("tokenizer file '%s': unsupported version %d, expected %d", path, version, tokenizer_version);
    int vocab_size = read_int32(&r, "the vocab size");
    int num_merges = read_int32(&r, "the merge count");
    int num_special = read_int32(&r, "the special token count");
    if (num_merges < 0) fail("tokenizer file '%s': negative merge count %d", path, num_merges);
    if (num_special != 1)
        fail("tokenizer file '%s': has %d special tokens, expected 1 (end-of-text)", path, num_special);
    int64_t expected_vocab = (int64_t)byte_tokens + num_merges + num_special;
    if (vocab_size != expected_vocab)
        fail("tokenizer file '%s': vocab size %d, but 256 bytes + %d merges + %d special = %lld", path,
             vocab_size, num_merges, num_special, (long long)expected_vocab);
    // Check the length before allocating, so a corrupt count cannot ask for gigabytes.
    if ((data.size() - r.pos) / 8 < (size_t)num_merges)
        fail("tokenizer file '%s': truncated: %zu bytes, too short for %d merges", path, data.size(), num_merges);

    std::vector<TokenPair> merges(num_merges);
    std::unordered_map<uint64_t, int> seen;  // pair -> first merge index, to catch repeats
    for (int i = 0; i < num_merges; i++) {
        merges[i].left = read_int32(&r, "a merge");
        merges[i].right = read_int32(&r, "a merge");
        // Merge i may only combine tokens that already exist: bytes and earlier merges.
        int defined = byte_tokens + i;
        if (merges[i].left < 0 || merges[i].left >= defined || merges[i].right < 0 || merges[i].right >= defined)
            fail("tokenizer file '%s': merge %d (%d, %d) uses a token not defined before it (ids must be < %d)",
                 path, i, merges[i].left, merges[i].right, defined);
        // A repeated pair would have two ranks; training never produces one.
        auto inserted = seen.emplace(pair_key(merges[i].left, merges[i].right), i);
        if (!inserted.second)
            fail("tokenizer file '%s': merge %d (%d, %d) repeats merge %d", path, i, merges[i].left, merges[i].right,
                 inserted.first->second);
    }

    int eot_id = read_int32(&r, "the end-of-text id");
    if (eot_id != vocab_size - 1)
        fail("tokenizer file '%s': end-of-text id %d, expected %d (the last id)", path, eot_id, vocab_size - 1);
    int name_length = read_int32(&r, "the end-of-text name length");
    if (name_length < 1 || name_length > 256)
        fail("tokenizer file '%s': end-of-text name length %d, expected 1..256", path, name_length);
    if (data.size() - r.pos < (size_t)name_length)
        fail("tokenizer file '%s': truncated: %zu bytes, ends inside the end-of-text name", path, data.size());
    std::string eot_name = data.substr(r.pos, name_length);
    r.pos += name_length;
    if (r.pos != data.size())
        fail("tokenizer file '%s': %zu bytes of trailing data after the end-of-text name", path, data.size() - r.pos);

    tok->merges = merges;
    tok->eot_name = eot_name;
    tokenizer_build_tables(tok);
}

// ----------------------------------------------------------------------------------------------------
// Encoding
//
// Each chunk is encoded on its own: start from its bytes and apply merges in
// the order they were learned (lowest rank first; among equal ranks, left to
// right). A min-heap holds candidate merges (rank, position) over a linked list
// of symbols. A merge of rank r only creates pairs containing the new token
// 256 + r, and those have ranks > r (a merge can only use earlier tokens), so
// ranks come off the heap in non-decreasing order: the same result as the
// textbook loop "find the lowest-rank pair, merge all its occurrences, repeat",
// in O(n log n) instead of O(n^2).

// Limits on the chunk cache. Long chunks are rare and seldom repeat; the entry
// cap bounds memory on inputs that never repeat (random bytes) - real text
// needs far fewer (31 MB of Python source: about 95k distinct chunks).
static const size_t max_cached_chunk = 64;
static const size_t max_cache_entries = 1u << 20;

static bool candidate_after(const MergeCandidate& x, const MergeCandidate& y) {
    // "x comes after y": used as the heap's less-than, so the front is the lowest rank.
    if (x.rank != y.rank) return x.rank > y.rank;
    return x.position > y.position;
}

static void push_candidate(Tokenizer* tok, int32_t position, int32_t right_position) {
    uint64_t key = pair_key(tok->work_ids[position], tok->work_ids[right_position]);
    auto it = tok->merge_rank.find(key);
    if (it == tok->merge_rank.end()) return;
    tok->work_heap.push_back(MergeCandidate{it->second, position});
    std::push_heap(tok->work_heap.begin(), tok->work_heap.end(), candidate_after);
}

static void encode_chunk(Tokenizer* tok, const char* chunk, size_t length, std::vector<int32_t>* out) {
    if (length > (size_t)INT32_MAX) fail("encode: a single chunk of %zu bytes is too long", length);
    int32_t n = (int32_t)length;
    std::vector<int32_t>& ids = tok->work_ids;    // ids[i] == -1: merged into its left neighbour
    std::vector<int32_t>& next = tok->work_next;  // linked list of live symbols; n means none
    std::vector<int32_t>& prev = tok->work_prev;  // -1 means none
    ids.resize(n);
    next.resize(n);
    prev.resize(n);
    for (int32_t i = 0; i < n; i++) {
        ids[i] = (unsigned char)chunk[i];
        next[i] = i + 1;
        prev[i] = i - 1;
    }
    tok->work_heap.clear();
    for (int32_t i = 0; i + 1 < n; i++) push_candidate(tok, i, i + 1);

    while (!tok->work_heap.empty()) {
        std::pop_heap(tok->work_heap.begin(), tok->work_heap.end(), candidate_after);
        MergeCandidate candidate = tok->work_heap.back();
        tok->work_heap.pop_back();
        int32_t i = candidate.position;
        if (ids[i] < 0) continue;  // this symbol was merged away
        int32_t j = next[i];
        if (j >= n) continue;
        const TokenPair& merge = tok->merges[candidate.rank];
        if (ids[i] != merge.left || ids[j] != merge.right) continue;  // the pair has changed since
        // Join i and j into the new token, unlink j, and look at the two new pairs.
        ids[i] = byte_tokens + candidate.rank;
        ids[j] = -1;
        next[i] = next[j];
        if (next[j] < n) prev[next[j]] = i;
        if (prev[i] >= 0) push_candidate(tok, prev[i], i);
        if (next[i] < n) push_candidate(tok, i, next[i]);
    }
    for (int32_t i = 0; i < n; i = next[i]) out->push_back(ids[i]);
}

// Encodes text that contains no separator, chunk by chunk, through the cache.
static void encode_piece(Tokenizer* tok, const char* text, size_t length, std::vector<int32_t>* out) {
    size_t pos = 0;
    while (pos < length) {
        const char* chunk = text + pos;
        size_t n = tokenizer_chunk_length(chunk, length - pos);
        pos += n;
        if (n == 1) {
            out->push_back((unsigned char)chunk[0]);
            continue;
        }
        if (n > max_cached_chunk) {
            encode_chunk(tok, chunk, n, out);
            continue;
        }
        auto it = tok->cache.find(std::string_view(chunk, n));
        if (it != tok->cache.end()) {
            const int32_t* cached = tok->cache_tokens.data() + it->second.offset;
            out->insert(out->end(), cached, cached + it->second.count);
            continue;
        }
        size_t first = out->size();
        encode_chunk(tok, chunk, n, out);
        if (tok->cache.size() < max_cache_entries) {
            CachedChunk entry = {(uint32_t)tok->cache_tokens.size(), (uint32_t)(out->size() - first)};
            tok->cache_tokens.insert(tok->cache_tokens.end(), out->begin() + first, out->end());
            tok->cache_keys.emplace_back(chunk, n);
            tok->cache.emplace(std::string_view(tok->cache_keys.back()), entry);
        }
    }
}

void tokenizer_encode(Tokenizer* tok, const char* text, size_t length, std::vector<int32_t>* tokens) {
    if (tok->vocab_size == 0) fail("encode: the tokenizer has not been trained or loaded");
    const char* end = text + length;
    const char* p = text;
    while (p < end) {
        const char* piece_end = find_separator(p, end, tok->eot_name);
        encode_piece(tok, p, (size_t)(piece_end - p), tokens);
        if (piece_end == end) break;
        tokens->push_back(tok->eot_token);
        p = piece_end + tok->eot_name.size();
    }
}

void tokenizer_decode(const Tokenizer* tok, const int32_t* tokens, size_t count, std::string* text) {
    for (size_t i = 0; i < count; i++) {
        int32_t id = tokens[i];
        if (id < 0 || id >= tok->vocab_size)
            fail("decode: token %d at index %zu is outside the vocabulary [0, %d)", id, i, tok->vocab_size);
        size_t start = tok->token_start[id];
        text->append(tok->token_bytes, start, tok->token_start[id + 1] - start);
    }
}

// ----------------------------------------------------------------------------------------------------
// Token files

void write_token_file(const char* path, const int32_t* tokens, size_t count, int vocab_size) {
    if (vocab_size <= 0) fail("token file '%s': vocab size %d must be positive", path, vocab_size);
    if (count > (size_t)INT32_MAX)
        fail("token file '%s': %zu tokens, more than the header can count (%d)", path, count, INT32_MAX);
    bool wide = vocab_size > 65536;
    size_t width = wide ? 4 : 2;
    size_t header_bytes = token_file_header_ints * sizeof(int32_t);
    std::vector<unsigned char> data(header_bytes + count * width, 0);

    int32_t header[token_file_header_ints] = {0};
    header[0] = token_file_magic;
    header[1] = wide ? token_file_version_u32 : token_file_version_u16;
    header[2] = (int32_t)count;
    memcpy(data.data(), header, header_bytes);

    unsigned char* body = data.data() + header_bytes;
    for (size_t i = 0; i < count; i++) {
        int32_t token = tokens[i];
        if (token < 0 || token >= vocab_size)
            fail("token file '%s': token %d at index %zu is outside the vocabulary [0, %d)", path, token, i,
                 vocab_size);
        if (wide) {
            uint32_t value = (uint32_t)token;
            memcpy(body + 4 * i, &value, 4);
        } else {
            uint16_t value = (uint16_t)token;
            memcpy(body + 2 * i, &value, 2);
        }
    }
    write_file_atomic(path, data.data(), data.size(), "token file");
}

TokenFile::~TokenFile() { token_file_close(this); }

void token_file_close(TokenFile* file) {
    if (file->map) munmap(file->map, file->map_size);
    file->map = nullptr;
    file->map_size = 0;
    file->tokens16 = nullptr;
    file->tokens32 = nullptr;
    file->num_tokens = 0;
    file->version = 0;
}

void token_file_open(TokenFile* file, const char* path, int vocab_size) {
    if (vocab_size <= 0) fail("token file '%s': vocab size %d must be positive", path, vocab_size);
    token_file_close(file);
    file->path = path;
    int fd = open(path, O_RDONLY);
    if (fd < 0) fail("token file '%s': cannot open: %s", path, strerror(errno));
    struct stat info;
    if (fstat(fd, &info) != 0) {
        int error = errno;
        close(fd);
        fail("token file '%s': cannot stat: %s", path, strerror(error));
    }
    size_t size = (size_t)info.st_size;
    size_t header_bytes = token_file_header_ints * sizeof(int32_t);
    if (size < header_bytes) {
        close(fd);
        fail("token file '%s': truncated: %zu bytes, smaller than the %zu-byte header", path, size, header_bytes);
    }
    void* map = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    int map_error = errno;
    close(fd);  // the mapping stays valid without the descriptor
    if (map == MAP_FAILED) fail("token file '%s': cannot mmap: %s", path, strerror(map_error));
    // From here the mapping belongs to *file: a failure below leaves it to be
    // unmapped by token_file_close or the destructor.
    file->map = map;
    file->map_size = size;

    const int32_t* header = (const int32_t*)map;
    if (header[0] != token_file_magic)
        fail("token file '%s': bad magic %d, expected %d", path, header[0], token_file_magic);
    int version = header[1];
    if (version != token_file_version_u16 && version != token_file_version_u32)
        fail("token file '%s': unsupported version %d, expected 1 (uint16 tokens) or 2 (uint32 tokens)", path,
             version);
    if (header[2] < 0) fail("token file '%s': negative token count %d", path, header[2]);
    size_t count = (size_t)header[2];
    size_t width = version == token_file_version_u16 ? 2 : 4;
    size_t expected = header_bytes + count * width;
    if (size < expected)
        fail("token file '%s': truncated: header says %zu tokens (%zu bytes), file has %zu bytes", path, count,
             expected, size);
    if (size > expected)
        fail("token file '%s': %zu bytes of trailing data after the %zu tokens the header announces", path,
             size - expected, count);

    file->version = version;
    file->num_tokens = count;
    const char* body = (const char*)map + header_bytes;
    if (width == 2) file->tokens16 = (const uint16_t*)body;
    else file->tokens32 = (const uint32_t*)body;

    // Validate every token once here, so nothing downstream (the embedding
    // lookup on the GPU) ever sees an out-of-range id.
    for (size_t i = 0; i < count; i++) {
        int64_t token = width == 2 ? (int64_t)file->tokens16[i] : (int64_t)file->tokens32[i];
        if (token >= vocab_size)
            fail("token file '%s': token %lld at index %zu >= vocab size %d", path, (long long)token, i, vocab_size);
    }
}

std::vector<int32_t> read_token_file(const char* path, int vocab_size) {
    TokenFile file;
    token_file_open(&file, path, vocab_size);
    std::vector<int32_t> tokens(file.num_tokens);
    for (size_t i = 0; i < file.num_tokens; i++) tokens[i] = token_file_at(&file, i);
    return tokens;
}

// ----------------------------------------------------------------------------------------------------
// splitmix64

uint64_t splitmix64_next(uint64_t* state) {
    *state += 0x9E3779B97F4A7C15ull;  // 2^64 / golden ratio: visits all 2^64 states
    uint64_t z = *state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

uint64_t splitmix64_below(uint64_t* state, uint64_t bound) {
    // 2^64 is not a multiple of bound, so x % bound would favour small values a
    // little. threshold = 2^64 mod bound; the values in [threshold, 2^64) are an
    // exact multiple of bound, so rejecting x < threshold makes x % bound uniform.
    uint64_t threshold = (0 - bound) % bound;
    while (true) {
        uint64_t x = splitmix64_next(state);
        if (x >= threshold) return x % bound;
    }
}

// ----------------------------------------------------------------------------------------------------
// Data loader

void dataloader_open(DataLoader* loader, const char* path, int B, int T, int vocab_size, DataLoaderMode mode,
                     uint64_t seed) {
    if (B < 1 || T < 1) fail("data loader for '%s': B and T must be >= 1, got B = %d, T = %d", path, B, T);
    token_file_open(&loader->file, path, vocab_size);
    size_t count = loader->file.num_tokens;
    // A window is T inputs plus one more token for the last target.
    if (count < (size_t)T + 1)
        fail("token file '%s': has %zu tokens, need at least T+1 = %d", path, count, T + 1);
    loader->B = B;
    loader->T = T;
    loader->mode = mode;
    loader->seed = seed;
    loader->sweep_windows = (count - 1) / (size_t)T;
    loader->inputs.assign((size_t)B * T, 0);
    loader->targets.assign((size_t)B * T, 0);
    dataloader_reset(loader);
}

void dataloader_reset(DataLoader* loader) {
    loader->rng_state = loader->seed;
    loader->sweep_next = 0;
}

void dataloader_next_batch(DataLoader* loader) {
    size_t count = loader->file.num_tokens;
    size_t T = (size_t)loader->T;
    for (int b = 0; b < loader->B; b++) {
        size_t start;
        if (loader->mode == DataLoaderMode::random) {
            start = (size_t)splitmix64_below(&loader->rng_state, count - T);  // starts 0 .. count-T-1
        } else {
            if (loader->sweep_next + T + 1 > count) loader->sweep_next = 0;  // wrap around
            start = loader->sweep_next;
            loader->sweep_next += T;
        }
        int32_t* inputs = &loader->inputs[b * T];
        int32_t* targets = &loader->targets[b * T];
        for (size_t t = 0; t < T; t++) {
            inputs[t] = token_file_at(&loader->file, start + t);
            targets[t] = token_file_at(&loader->file, start + t + 1);
        }
    }
}

uint64_t dataloader_get_rng_state(const DataLoader* loader) { return loader->rng_state; }

void dataloader_set_rng_state(DataLoader* loader, uint64_t state) { loader->rng_state = state; }


// ====================================================================================================
// Command-line programs

bool wants_help(int argc, char** argv) {
    for (int i = 0; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) return true;
    return false;
}

const char* flag_value(int argc, char** argv, int* i) {
    const char* flag = argv[*i];
    if (*i + 1 >= argc) fail("flag %s needs a value", flag);
    const char* value = argv[*i + 1];
    if (strncmp(value, "--", 2) == 0) fail("flag %s needs a value, got '%s'", flag, value);
    *i += 1;
    return value;
}

long parse_int(const char* flag, const char* text, long min, long max) {
    char* end = nullptr;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (end == text || *end != '\0' || errno == ERANGE || value < min || value > max)
        fail("flag %s expects an integer from %ld to %ld, got '%s'", flag, min, max, text);
    return value;
}

double parse_number(const char* flag, const char* text, double min, double max) {
    char* end = nullptr;
    double value = strtod(text, &end);
    if (end == text || *end != '\0' || !(value >= min && value <= max))
        fail("flag %s expects a number from %g to %g, got '%s'", flag, min, max, text);
    return value;
}

void unknown_flag(const char* arg) {
    if (arg[0] == '-') fail("unknown flag '%s' (see --help)", arg);
    fail("unexpected argument '%s' (see --help)", arg);
}

double seconds_now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

int run_program(const char* name, const char* help, int argc, char** argv, int (*body)(int argc, char** argv)) {
    if (wants_help(argc, argv)) {
        fputs(help, stdout);
        return 0;
    }
    try {
        return body(argc, argv);
    } catch (const std::exception& error) {
        fflush(stdout);
        fprintf(stderr, "%s: error: %s\n", name, error.what());
        return 1;
    }
}
