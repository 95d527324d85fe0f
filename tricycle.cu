// tricycle.cu — the library: memory, tensors, the tape, and every kernel with its backward.
// See tricycle.h for the overview; this file follows the same order.
#include "tricycle.h"

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <queue>
#include <stdexcept>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef __CUDACC__
#include <cblas.h>
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
// Launch shapes

#ifdef __CUDACC__
int threads_per_row = 32;
#else
int threads_per_row = 1;
#endif

unsigned grid_size(long n, int threads) {
#ifdef __CUDACC__
    const long max_blocks = 132 * 32;  // enough to fill an H100 several times over
#else
    const long max_blocks = 64;        // the emulator wants few, long-running threads
#endif
    long blocks = (n + threads - 1) / threads;
    return unsigned(blocks < 1 ? 1 : blocks < max_blocks ? blocks : max_blocks);
}

// Row kernels: blocks of (threads_per_row, rows_per_block) threads, 256 in all.
static dim3 row_block() { return dim3(threads_per_row, 256 / threads_per_row); }
static dim3 row_grid(long rows) { return dim3(unsigned((rows + 256 / threads_per_row - 1) / (256 / threads_per_row))); }

// Within a row kernel: which row this thread's group handles. Threads of a row past the end work on
// the last row but must not write (they still take part in the group's shuffles).
__device__ inline long group_row(long rows, bool* active) {
    long row = long(blockIdx.x) * blockDim.y + threadIdx.y;
    *active = row < rows;
    return row < rows ? row : rows - 1;
}

// Sum and max across the threads of a row group, by butterfly shuffles: every thread gets the result.
__device__ inline real group_sum(real value) {
    for (int offset = blockDim.x / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffff, value, offset, blockDim.x);
    return value;
}

__device__ inline real group_max(real value) {
    for (int offset = blockDim.x / 2; offset > 0; offset /= 2) value = fmax(value, __shfl_xor_sync(0xffffffff, value, offset, blockDim.x));
    return value;
}

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

__global__ void fill_kernel(real* out, long n, real value) {
    for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += long(gridDim.x) * blockDim.x) out[i] = value;
}

__global__ void fill_uniform_kernel(real* out, long n, uint64_t seed, real low, real high) {
    for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += long(gridDim.x) * blockDim.x)
        out[i] = low + (high - low) * real(random_uniform(seed, uint64_t(i)));
}

// Box-Muller: element i uses the uniform draws 2i and 2i+1 (u1 is kept away from 0 for the log).
__global__ void fill_normal_kernel(real* out, long n, uint64_t seed, real mean, real std) {
    for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += long(gridDim.x) * blockDim.x) {
        double u1 = (double(random_bits(seed, 2 * uint64_t(i)) >> 11) + 1.0) * (1.0 / 9007199254740992.0);
        double u2 = double(random_bits(seed, 2 * uint64_t(i) + 1) >> 11) * (1.0 / 9007199254740992.0);
        out[i] = mean + std * real(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
    }
}

void fill(real* out, long n, real value) { launch(fill_kernel, grid_size(n, 256), 256, 0, out, n, value); }
void fill_normal(real* out, long n, uint64_t seed, real mean, real std) {
    launch(fill_normal_kernel, grid_size(n, 256), 256, 0, out, n, seed, mean, std);
}
void fill_uniform(real* out, long n, uint64_t seed, real low, real high) {
    launch(fill_uniform_kernel, grid_size(n, 256), 256, 0, out, n, seed, low, high);
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

static Tensor make_tensor(int ndim, const int* shape, bool with_grad) {
    if (ndim > max_dims) fail("tensors have at most %d dims, got %d", max_dims, ndim);
    Tensor t;
    t.ndim = ndim;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0) fail("negative dim %d in a tensor shape", shape[i]);
        t.shape[i] = shape[i];
    }
    t.data = device_alloc<real>(t.size());
    if (with_grad) {
        t.grad = device_alloc<real>(t.size());
        cuda_check(cudaMemset(t.grad, 0, t.size() * sizeof(real)));
    }
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
        t.grad = device_alloc<real>(t.size());
        cuda_check(cudaMemset(t.grad, 0, t.size() * sizeof(real)));
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

std::vector<real> to_host(Tensor t) {
    std::vector<real> values(t.size());
    cuda_check(cudaMemcpy(values.data(), t.data, values.size() * sizeof(real), cudaMemcpyDeviceToHost));
    return values;
}

void copy_from_host(Tensor t, const real* values) {
    cuda_check(cudaMemcpy(t.data, values, t.size() * sizeof(real), cudaMemcpyHostToDevice));
}

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

void tape_append(TapeEntry entry) { tape.push_back(entry); }
size_t tape_length() { return tape.size(); }

void backward(Tensor t) {
    if (!t.grad) fail("backward: the tensor %s does not require a gradient (no input of it does)", shape_string(t).c_str());
    fill(t.grad, t.size(), 1);
    for (size_t i = tape.size(); i-- > 0;) tape[i].run(tape[i].closure);
    tape.clear();
}

void zero_grad(Tensor t) {
    if (t.grad) cuda_check(cudaMemset(t.grad, 0, t.size() * sizeof(real)));
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
// `derivative` gets both x and out = f(x), since some derivatives are cheaper from the output.

struct Neg {
    __device__ real forward(real x) const { return -x; }
    __device__ real derivative(real, real) const { return -1; }
};
struct AddScalar {
    real c;
    __device__ real forward(real x) const { return x + c; }
    __device__ real derivative(real, real) const { return 1; }
};
struct MulScalar {
    real c;
    __device__ real forward(real x) const { return x * c; }
    __device__ real derivative(real, real) const { return c; }
};
struct PowScalar {
    real p;
    __device__ real forward(real x) const { return pow(x, p); }
    __device__ real derivative(real x, real) const { return p * pow(x, p - 1); }
};
struct Exp {
    __device__ real forward(real x) const { return exp(x); }
    __device__ real derivative(real, real out) const { return out; }
};
struct Log {
    __device__ real forward(real x) const { return log(x); }
    __device__ real derivative(real x, real) const { return 1 / x; }
};
struct Sqrt {
    __device__ real forward(real x) const { return sqrt(x); }
    __device__ real derivative(real, real out) const { return real(0.5) / out; }
};
struct Sin {
    __device__ real forward(real x) const { return sin(x); }
    __device__ real derivative(real x, real) const { return cos(x); }
};
struct Cos {
    __device__ real forward(real x) const { return cos(x); }
    __device__ real derivative(real x, real) const { return -sin(x); }
};
struct Tanh {
    __device__ real forward(real x) const { return tanh(x); }
    __device__ real derivative(real, real out) const { return 1 - out * out; }
};
struct Sigmoid {
    __device__ real forward(real x) const { return 1 / (1 + exp(-x)); }
    __device__ real derivative(real, real out) const { return out * (1 - out); }
};
struct Relu {
    __device__ real forward(real x) const { return x > 0 ? x : 0; }
    __device__ real derivative(real x, real) const { return x > 0 ? 1 : 0; }
};

template <typename F> __global__ void map_forward_kernel(real* out, const real* x, long n, F f) {
    for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += long(gridDim.x) * blockDim.x) out[i] = f.forward(x[i]);
}

template <typename F> __global__ void map_backward_kernel(real* dx, const real* dout, const real* x, const real* out, long n, F f) {
    for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += long(gridDim.x) * blockDim.x)
        dx[i] += dout[i] * f.derivative(x[i], out[i]);
}

template <typename F> static Tensor map(Tensor x, F f) {
    Tensor out = new_result(x, {x});
    long n = x.size();
    launch(map_forward_kernel<F>, grid_size(n, 256), 256, 0, out.data, x.data, n, f);
    if (out.grad)
        record([=] { launch(map_backward_kernel<F>, grid_size(n, 256), 256, 0, x.grad, out.grad, x.data, out.data, n, f); });
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

template <typename F> __global__ void broadcast_forward_kernel(real* out, const real* a, const real* b, long n, Broadcast s, F f) {
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
__global__ void broadcast_backward_kernel(real* dmine, const real* dout, const real* a, const real* b, long n_mine, Broadcast s, F f) {
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
    if (out.grad) record([=] {
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
__global__ void reduce_forward_kernel(real* out, int* winner, const real* x, long outer, int n, long inner, real scale) {
    bool active;
    long row = group_row(outer * inner, &active);
    const real* base = x + (row / inner) * n * inner + row % inner;
    real best = KIND == reduce_sum ? 0 : base[0];
    int best_k = 0;
    for (int k = threadIdx.x; k < n; k += blockDim.x) {
        real v = base[long(k) * inner];
        if (KIND == reduce_sum) best += v;
        else if (KIND == reduce_max ? v > best : v < best) best = v, best_k = k;
    }
    // Combine across the group. For max/min each thread also learns which k won, smallest k on ties.
    for (int offset = blockDim.x / 2; offset > 0; offset /= 2) {
        real other = __shfl_xor_sync(0xffffffff, best, offset, blockDim.x);
        int other_k = __shfl_xor_sync(0xffffffff, best_k, offset, blockDim.x);
        if (KIND == reduce_sum) best += other;
        else if ((KIND == reduce_max ? other > best : other < best) || (other == best && other_k < best_k)) best = other, best_k = other_k;
    }
    if (active && threadIdx.x == 0) {
        out[row] = best * scale;
        if (winner) winner[row] = best_k;
    }
}

__global__ void reduce_backward_kernel(real* dx, const real* dout, const int* winner, long outer, int n, long inner, real scale) {
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
    if (out.grad) record([=] {
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
__global__ void transpose_kernel(real* out, const real* x, Dims x_shape, int d0, int d1, long n, bool accumulate) {
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
        out[o] = accumulate ? out[o] + x[i] : x[i];
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
    if (out.grad) record([=] { launch(transpose_kernel, grid_size(n, 256), 256, 0, x.grad, out.grad, padded_dims(out), d0, d1, n, true); });
    return out;
}

// ----------------------------------------------------------------------------------------------------
// Softmax over the last axis (rows of n): y = exp(x - max) / sum(exp(x - max)).
// Backward: dx = y * (dy - sum(dy * y)), the sum taken over the row.

__global__ void softmax_forward_kernel(real* out, const real* x, long rows, int n) {
    bool active;
    long row = group_row(rows, &active);
    const real* xr = x + row * n;
    real row_max = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) row_max = fmax(row_max, xr[i]);
    row_max = group_max(row_max);
    real total = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) total += exp(xr[i] - row_max);
    total = group_sum(total);
    if (active)
        for (int i = threadIdx.x; i < n; i += blockDim.x) out[row * n + i] = exp(xr[i] - row_max) / total;
}

__global__ void softmax_backward_kernel(real* dx, const real* dout, const real* out, long rows, int n) {
    bool active;
    long row = group_row(rows, &active);
    const real* yr = out + row * n;
    const real* dyr = dout + row * n;
    real dot = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) dot += dyr[i] * yr[i];
    dot = group_sum(dot);
    if (active)
        for (int i = threadIdx.x; i < n; i += blockDim.x) dx[row * n + i] += yr[i] * (dyr[i] - dot);
}

Tensor softmax(Tensor x) {
    int n = x.ndim ? x.dim(-1) : 1;
    long rows = x.size() / n;
    Tensor out = new_result(x, {x});
    launch(softmax_forward_kernel, row_grid(rows), row_block(), 0, out.data, x.data, rows, n);
    if (out.grad) record([=] { launch(softmax_backward_kernel, row_grid(rows), row_block(), 0, x.grad, out.grad, out.data, rows, n); });
    return out;
}

// ----------------------------------------------------------------------------------------------------
// Matrix products

void gemm(bool transpose_a, bool transpose_b, int M, int N, int K, real alpha, const real* A, const real* B, real beta, real* C,
          int batch, long stride_a, long stride_b, long stride_c) {
    int lda = transpose_a ? M : K, ldb = transpose_b ? K : N;
#ifdef __CUDACC__
    // cuBLAS is column-major: compute C^T = op(B)^T op(A)^T, which is C in row-major.
    cublasOperation_t op_a = transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N;
#ifdef TRICYCLE_DOUBLE
    cublas_check(cublasDgemmStridedBatched(cublas_handle(), op_b, op_a, N, M, K, &alpha, B, ldb, stride_b, A, lda, stride_a, &beta, C, N, stride_c, batch));
#else
    cublas_check(cublasSgemmStridedBatched(cublas_handle(), op_b, op_a, N, M, K, &alpha, B, ldb, stride_b, A, lda, stride_a, &beta, C, N, stride_c, batch));
#endif
#else
    CBLAS_TRANSPOSE op_a = transpose_a ? CblasTrans : CblasNoTrans, op_b = transpose_b ? CblasTrans : CblasNoTrans;
    for (int i = 0; i < batch; i++) {
#ifdef TRICYCLE_DOUBLE
        cblas_dgemm(CblasRowMajor, op_a, op_b, M, N, K, alpha, A + i * stride_a, lda, B + i * stride_b, ldb, beta, C + i * stride_c, N);
#else
        cblas_sgemm(CblasRowMajor, op_a, op_b, M, N, K, alpha, A + i * stride_a, lda, B + i * stride_b, ldb, beta, C + i * stride_c, N);
#endif
    }
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
    if (shared_b) {
        gemm(false, false, batch * M, N, K, 1, a.data, b.data, 0, out.data);
    } else {
        gemm(false, false, M, N, K, 1, a.data, b.data, 0, out.data, batch, long(M) * K, long(K) * N, long(M) * N);
    }
    if (out.grad) record([=] {
        if (shared_b) {
            if (a.grad) gemm(false, true, batch * M, K, N, 1, out.grad, b.data, 1, a.grad);
            if (b.grad) gemm(true, false, K, N, batch * M, 1, a.data, out.grad, 1, b.grad);
        } else {
            if (a.grad) gemm(false, true, M, K, N, 1, out.grad, b.data, 1, a.grad, batch, long(M) * N, long(K) * N, long(M) * K);
            if (b.grad) gemm(true, false, K, N, M, 1, a.data, out.grad, 1, b.grad, batch, long(M) * K, long(M) * N, long(K) * N);
        }
    });
    return out;
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

void write_file_atomic(const char* path, const void* data, size_t size, const char* kind) {
    std::string temp_path = std::string(path) + ".tmp";
    FILE* f = fopen(temp_path.c_str(), "wb");
    if (!f) fail("%s '%s': cannot create '%s': %s", kind, path, temp_path.c_str(), strerror(errno));
    bool ok = fwrite(data, 1, size, f) == size;
    if (fclose(f) != 0) ok = false;  // fclose flushes, so a full disk shows up here
    if (!ok) {
        int error = errno;
        remove(temp_path.c_str());
        fail("%s '%s': write failed: %s", kind, path, strerror(error));
    }
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
    tok->vocab_size = TOKENIZER_BYTE_TOKENS + num_merges + 1;
    tok->eot_token = tok->vocab_size - 1;

    // token_start[id] is where token id's bytes begin, and so where token id-1's end.
    tok->token_bytes.clear();
    tok->token_start.assign(tok->vocab_size + 1, 0);
    for (int id = 0; id < TOKENIZER_BYTE_TOKENS; id++) {
        tok->token_start[id] = tok->token_bytes.size();
        tok->token_bytes.push_back((char)id);
    }
    for (int i = 0; i < num_merges; i++) {
        // A merged token's bytes are its left part's bytes then its right part's.
        // Both parts are older tokens, so their ends are already recorded. The
        // piece is built in a copy because appending to token_bytes may move it.
        int id = TOKENIZER_BYTE_TOKENS + i;
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
    int min_vocab = TOKENIZER_BYTE_TOKENS + 1;
    if (vocab_size < min_vocab)
        fail("vocab size %d is too small: need at least %d (256 bytes + end-of-text)", vocab_size, min_vocab);
    std::string separator = TOKENIZER_EOT_NAME;

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
        int32_t c = TOKENIZER_BYTE_TOKENS + merge_index;
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

void tokenizer_save(const Tokenizer* tok, const char* path) {
    std::vector<int32_t> ints;
    ints.push_back((int32_t)TOKENIZER_MAGIC);
    ints.push_back(TOKENIZER_VERSION);
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
    data += tok->eot_name;
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

void tokenizer_load(Tokenizer* tok, const char* path) {
    std::string data = read_whole_file(path, "tokenizer file");
    ByteReader r = {&data, 0, path};

    uint32_t magic = (uint32_t)read_int32(&r, "the magic number");
    if (magic != TOKENIZER_MAGIC)
        fail("tokenizer file '%s': bad magic 0x%08x, expected 0x%08x", path, magic, TOKENIZER_MAGIC);
    int version = read_int32(&r, "the version");
    if (version != TOKENIZER_VERSION)
        fail("tokenizer file '%s': unsupported version %d, expected %d", path, version, TOKENIZER_VERSION);
    int vocab_size = read_int32(&r, "the vocab size");
    int num_merges = read_int32(&r, "the merge count");
    int num_special = read_int32(&r, "the special token count");
    if (num_merges < 0) fail("tokenizer file '%s': negative merge count %d", path, num_merges);
    if (num_special != 1)
        fail("tokenizer file '%s': has %d special tokens, expected 1 (end-of-text)", path, num_special);
    int64_t expected_vocab = (int64_t)TOKENIZER_BYTE_TOKENS + num_merges + num_special;
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
        int defined = TOKENIZER_BYTE_TOKENS + i;
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
static const size_t MAX_CACHED_CHUNK = 64;
static const size_t MAX_CACHE_ENTRIES = 1u << 20;

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
        ids[i] = TOKENIZER_BYTE_TOKENS + candidate.rank;
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
        if (n > MAX_CACHED_CHUNK) {
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
        if (tok->cache.size() < MAX_CACHE_ENTRIES) {
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
    size_t header_bytes = TOKEN_FILE_HEADER_INTS * sizeof(int32_t);
    std::vector<unsigned char> data(header_bytes + count * width, 0);

    int32_t header[TOKEN_FILE_HEADER_INTS] = {0};
    header[0] = TOKEN_FILE_MAGIC;
    header[1] = wide ? TOKEN_FILE_VERSION_U32 : TOKEN_FILE_VERSION_U16;
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
    size_t header_bytes = TOKEN_FILE_HEADER_INTS * sizeof(int32_t);
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
    if (header[0] != TOKEN_FILE_MAGIC)
        fail("token file '%s': bad magic %d, expected %d", path, header[0], TOKEN_FILE_MAGIC);
    int version = header[1];
    if (version != TOKEN_FILE_VERSION_U16 && version != TOKEN_FILE_VERSION_U32)
        fail("token file '%s': unsupported version %d, expected 1 (uint16 tokens) or 2 (uint32 tokens)", path,
             version);
    if (header[2] < 0) fail("token file '%s': negative token count %d", path, header[2]);
    size_t count = (size_t)header[2];
    size_t width = version == TOKEN_FILE_VERSION_U16 ? 2 : 4;
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
        if (loader->mode == DATALOADER_RANDOM) {
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

void dataloader_close(DataLoader* loader) {
    token_file_close(&loader->file);
    loader->inputs.clear();
    loader->targets.clear();
}
