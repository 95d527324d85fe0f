// tricycle.cu — the library: memory, tensors, the tape, and every kernel with its backward.
// See tricycle.h for the overview; this file follows the same order.
#include "tricycle.h"

#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <stdexcept>

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
