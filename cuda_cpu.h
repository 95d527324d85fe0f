// cuda_cpu.h — run CUDA kernels on a CPU, with the CUDA execution model intact.
//
// Included by tricycle.h only when nvcc is not compiling (no __CUDACC__). The same kernel source is
// then plain C++: every CUDA thread becomes a fiber (Boost.Context), the threads of a block share
// one OS thread and take turns, and the blocks of a grid are spread over the cores with OpenMP.
//
// How a block runs. One fiber starts thread 0 and simply calls the kernel; when that thread
// returns, the same fiber goes on to thread 1, and so on. A thread that never waits therefore costs
// one function call. When a thread must wait (__syncthreads, a warp shuffle), its fiber is parked
// with it and a fresh fiber carries on with the next unstarted thread. Parked threads go back on a
// ready queue as soon as the barrier or warp operation they wait for is complete.
//
// What a GPU silently gets wrong and this emulator reports (naming kernel, block and thread):
//   - barrier divergence: a thread exits, or waits at a different __syncthreads, while others wait;
//   - a warp operation whose mask names a lane that has exited (or does not exist);
//   - an mma.sync (tensor cores) or ldmatrix that not every lane of the warp makes, or in a block
//   of partial warps;
//   - a read of dynamic shared memory that no thread of the block has written;
//   - a cp.async (asynchronous copy into shared memory) whose bytes are read or written before a
//   cp.async.wait_group has let it land, or still in flight when its thread exits;
//   - an ldmatrix or cp.async address that is not 16-byte aligned;
//   - shared memory indexed out of bounds, and deadlock (threads waiting on each other forever).
// The launch then fails: cudaGetLastError() returns cudaErrorLaunchFailure and the message is kept
// in emu::last_error_message().
#pragma once

#include <boost/context/detail/fcontext.hpp>
#include <cxxabi.h>
#include <dlfcn.h>
#include <omp.h>
#include <sys/mman.h>
#include <unistd.h>

#include <math.h>  // (not only <cmath>: as under CUDA, sqrt, exp, tanh... of a float are float)

#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <atomic>
#include <mutex>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// ----------------------------------------------------------------------------------------------------
// CUDA keywords and built-in types

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
// A block-scope thread_local is static: one copy per OS thread, and a block owns its OS thread
// while it runs. (Static shared memory is not checked for uninitialised reads; use
// shared_memory<T>() for that.)
#define __shared__ thread_local

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
        : x(x_), y(y_), z(z_) {}
};

// bfloat16 (for the mixed-precision build): the top 16 bits of a float, rounded to nearest even.
// A NaN stays a (quiet) NaN. Both results are computed and one is selected, with no branch, so
// that loops storing bfloat16 vectorise.
struct __nv_bfloat16 {
    uint16_t bits;
};
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t rounded = uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16),
             quiet = uint16_t((u >> 16) | 0x40);
    return __nv_bfloat16{(u & 0x7fffffff) > 0x7f800000 ? quiet : rounded};
}
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) { return __nv_bfloat16{bits}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }
inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = uint32_t(b.bits) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// The built-in variables. The scheduler rewrites threadIdx every time it switches fibers.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

// ----------------------------------------------------------------------------------------------------
// Device math and atomics (the subset Tricycle's kernels use)

inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, sizeof f);
    return f;
}
inline float __uint_as_float(unsigned int u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    memcpy(&u, &f, sizeof u);
    return u;
}

// Blocks run on several OS threads at once, so atomics must be real atomics.
inline int atomicAdd(int* address, int value) {
    return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}
inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
    return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}
template <typename T>
inline T atomic_add_float(T* address, T value) {
    T old = *address, updated;
    do {
        updated = old + value;
    } while (!__atomic_compare_exchange(address, &old, &updated, true, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED));
    return old;
}
inline float atomicAdd(float* address, float value) { return atomic_add_float(address, value); }
inline double atomicAdd(double* address, double value) { return atomic_add_float(address, value); }

// ----------------------------------------------------------------------------------------------------
// The runtime API on host memory. Kernels run synchronously, so synchronising is a no-op.

enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInsufficientDriver = 35,  // (never returned here; cuda_check names them)
    cudaErrorNoDevice = 100,
    cudaErrorLaunchFailure = 719
};
enum cudaMemcpyKind {
    cudaMemcpyHostToHost,
    cudaMemcpyHostToDevice,
    cudaMemcpyDeviceToHost,
    cudaMemcpyDeviceToDevice,
    cudaMemcpyDefault
};

namespace emu {
inline cudaError_t pending_error = cudaSuccess;  // what the next cudaGetLastError() returns
inline std::string error_message;                // the detailed report of the last failed launch
inline const std::string& last_error_message() { return error_message; }

// The hardware's limits, enforced at every launch as a GPU would (CUDA programming guide, compute
// capability 8.0, the strictest of the architectures the GPU build targets).
constexpr unsigned max_block_x = 1024, max_block_y = 1024, max_block_z = 64;
constexpr unsigned max_grid_x = 2147483647u, max_grid_yz = 65535;
constexpr size_t default_shared_bytes = 48 << 10;  // dynamic shared memory without an opt-in
constexpr size_t max_shared_bytes = 163 << 10;     // the most an opt-in may allow (sm_80)
// Dynamic shared memory each kernel opted into with cudaFuncSetAttribute.
inline std::mutex opt_in_mutex;
inline std::vector<std::pair<const void*, size_t>> shared_opt_ins;
inline size_t shared_limit(const void* kernel) {
    std::lock_guard<std::mutex> lock(opt_in_mutex);
    for (const auto& [k, bytes] : shared_opt_ins)
        if (k == kernel) return bytes;
    return default_shared_bytes;
}
}  // namespace emu

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
// As on a GPU, a kernel may use more than 48 KB of dynamic shared memory only after this, and never
// more than the architecture allows.
template <typename... Params>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attribute,
                                        int value) {
    if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
        size_t(value) > emu::max_shared_bytes)
        return cudaErrorInvalidValue;
    std::lock_guard<std::mutex> lock(emu::opt_in_mutex);
    for (auto& [k, bytes] : emu::shared_opt_ins)
        if (k == reinterpret_cast<const void*>(kernel)) return bytes = size_t(value), cudaSuccess;
    emu::shared_opt_ins.push_back({reinterpret_cast<const void*>(kernel), size_t(value)});
    return cudaSuccess;
}

inline cudaError_t cudaMalloc(void** pointer, size_t bytes) {
    // 64-byte alignment, like cudaMalloc's 256, keeps vector loads legal; never return nullptr for
    // 0.
    *pointer = aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
    return *pointer ? cudaSuccess : cudaErrorMemoryAllocation;
}
template <typename T>
inline cudaError_t cudaMalloc(T** pointer, size_t bytes) {
    return cudaMalloc(reinterpret_cast<void**>(pointer), bytes);
}
inline cudaError_t cudaFree(void* pointer) {
    free(pointer);
    return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
    if (bytes) memmove(dst, src, bytes);
    return cudaSuccess;
}
inline cudaError_t cudaMemset(void* dst, int value, size_t bytes) {
    if (bytes) memset(dst, value, bytes);
    return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
// One stream, and every kernel has finished when its launch returns: an asynchronous copy is a
// copy, an event has always passed, and pinned host memory is host memory.
using cudaStream_t = void*;
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                                   cudaStream_t = nullptr) {
    return cudaMemcpy(dst, src, bytes, kind);
}
inline cudaError_t cudaMallocHost(void** pointer, size_t bytes) {
    return cudaMalloc(pointer, bytes);
}
template <typename T>
inline cudaError_t cudaMallocHost(T** pointer, size_t bytes) {
    return cudaMalloc(reinterpret_cast<void**>(pointer), bytes);
}
inline cudaError_t cudaFreeHost(void* pointer) { return cudaFree(pointer); }
struct CUevent_st {};
using cudaEvent_t = CUevent_st*;
constexpr unsigned cudaEventDisableTiming = 2;
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned) {
    *event = new CUevent_st;
    return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t event) {
    delete event;
    return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t = nullptr) { return cudaSuccess; }
inline cudaError_t cudaEventSynchronize(cudaEvent_t event) {
    return event ? cudaSuccess : cudaErrorInvalidValue;
}
// "Device" memory is the machine's: free and total are its physical memory.
inline cudaError_t cudaMemGetInfo(size_t* free, size_t* total) {
    *free = *total = size_t(sysconf(_SC_PHYS_PAGES)) * size_t(sysconf(_SC_PAGE_SIZE));
    return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
    cudaError_t error = emu::pending_error;
    emu::pending_error = cudaSuccess;
    return error;
}
inline const char* cudaGetErrorString(cudaError_t error) {
    switch (error) {
        case cudaSuccess:
            return "no error";
        case cudaErrorInvalidValue:
            return "invalid argument";
        case cudaErrorMemoryAllocation:
            return "out of memory";
        case cudaErrorLaunchFailure:
            return "kernel failed under the CPU emulator";
        case cudaErrorInsufficientDriver:
            return "CUDA driver version is insufficient for CUDA runtime version";
        case cudaErrorNoDevice:
            return "no CUDA-capable device is detected";
    }
    return "unknown error";
}

// ----------------------------------------------------------------------------------------------------
// The emulator proper

namespace emu {

namespace ctx = boost::context::detail;

constexpr int max_threads_per_block = 1024;
constexpr int max_warps_per_block = max_threads_per_block / 32;
#if defined(__SANITIZE_ADDRESS__)
constexpr size_t fiber_stack_bytes = 1 << 20;  // ASan frames are much larger
#else
constexpr size_t fiber_stack_bytes = 64 << 10;
#endif

enum ThreadState : uint8_t { not_started, running, at_barrier, at_warp_op, ready, exited };
enum WarpOpKind : uint8_t {
    warp_sync,
    warp_shuffle,
    warp_ballot,
    warp_mma,
    warp_ldmatrix,
    warp_ldmatrix_trans
};
inline const char* const warp_op_names[] = {"__syncwarp", "a shuffle",   "a vote",
                                            "mma.sync",   "ldmatrix.x4", "ldmatrix.x4.trans"};

// A fiber stack with a guard page below it, so an overflow faults instead of corrupting memory.
struct Stack {
    char* bottom;
    size_t size;
};

// One collective operation of a warp in flight: lanes post a value and the lane they read from; the
// last lane to arrive computes every lane's result.
struct WarpOp {
    unsigned mask, arrived, exited;  // exited also holds lanes beyond the end of the block
    WarpOpKind kind;
    uint64_t value[32];
    int source[32];
    uint64_t result[32];
    // mma.sync: each lane's fragments of A, B and C, and its fragment of D
    uint32_t a[32][4], b[32][2];
    float c[32][4], d[32][4];
    uint32_t loaded[32][4];  // ldmatrix: each lane's four registers
};

// A cp.async in flight: 16 bytes from `from` (zeros when null) to shared memory at byte `to`, in
// its thread's commit group `group`.
struct AsyncCopy {
    size_t to;
    const void* from;
    int group;
};

// The shadow of dynamic shared memory: one byte per byte.
enum ShadowState : unsigned char { unwritten = 0, written = 1, in_flight = 2 };

// Dynamic shared memory comes in 16-byte words, so any type up to 16 bytes can be laid over it.
struct alignas(16) SharedWord {
    unsigned char bytes[16];
};

// Everything about the block running on this OS thread.
struct Block {
    void (*body)(void*);  // runs the kernel for the current thread
    void* body_arg;
    const void* kernel;  // for error messages
    int n_threads, next_unstarted, exited_count, current;
    dim3 block_dim;

    ThreadState state[max_threads_per_block];
    ctx::fcontext_t context[max_threads_per_block];  // where a parked thread resumes
    int stack_of[max_threads_per_block];             // the stack a parked thread's fiber runs on
    int ready_queue[max_threads_per_block];
    int ready_head, ready_count;

    int barrier_waiting;  // threads parked at __syncthreads
    const char* barrier_file;
    int barrier_line;
    int first_exited;  // -1 until a thread exits

    WarpOp warp[max_warps_per_block];

    // Dynamic shared memory and its shadow (ShadowState).
    std::vector<SharedWord> shared_storage;
    std::vector<unsigned char> shadow;
    size_t shared_bytes;

    // Each thread's cp.async copies not yet landed, and how many groups it has committed.
    std::vector<AsyncCopy> async_copies[max_threads_per_block];
    int groups_committed[max_threads_per_block];

    // Fibers
    ctx::fcontext_t
        scheduler;      // the scheduler's context, updated every time it switches to a fiber
    int running_stack;  // stack of the fiber now running
    std::vector<Stack> stacks;
    std::vector<int> free_stacks;
    bool failed;
#if defined(__SANITIZE_ADDRESS__)
    const void* scheduler_stack_bottom = nullptr;
    size_t scheduler_stack_size = 0;
#endif
};

inline thread_local Block block_state;
inline std::mutex report_mutex;
inline std::atomic<bool> grid_failed{
    false};  // set by the first error; the remaining blocks are skipped

// Signals a fiber sends when it hands control back to the scheduler.
inline char fiber_finished_tag, fiber_failed_tag;

inline std::string kernel_name(const void* kernel) {
    Dl_info info;
    if (!dladdr(kernel, &info) || !info.dli_sname) {
        char address[32];
        snprintf(address, sizeof address, "%p", kernel);
        return address;
    }
    int status = 0;
    char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string name = status == 0 ? demangled : info.dli_sname;
    free(demangled);
    return name;
}

inline uint3 thread_index(const Block& b, int linear) {
    return uint3{linear % b.block_dim.x, linear / b.block_dim.x % b.block_dim.y,
                 linear / (b.block_dim.x * b.block_dim.y)};
}

inline std::string describe_thread(const Block& b, int linear) {
    uint3 t = thread_index(b, linear);
    char text[48];
    snprintf(text, sizeof text, "(%u,%u,%u)", t.x, t.y, t.z);
    return text;
}

// Fiber switches, annotated for AddressSanitizer so it knows which stack is live.
inline ctx::transfer_t switch_to(ctx::fcontext_t to, void* data, const void* to_bottom,
                                 size_t to_size, bool never_back) {
#if defined(__SANITIZE_ADDRESS__)
    void* fake_stack = nullptr;
    __sanitizer_start_switch_fiber(never_back ? nullptr : &fake_stack, to_bottom, to_size);
    ctx::transfer_t t = ctx::jump_fcontext(to, data);
    __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
    return t;
#else
    (void)to_bottom, (void)to_size, (void)never_back;
    return ctx::jump_fcontext(to, data);
#endif
}

inline ctx::transfer_t switch_to_scheduler(Block& b, void* data) {
#if defined(__SANITIZE_ADDRESS__)
    return switch_to(b.scheduler, data, b.scheduler_stack_bottom, b.scheduler_stack_size,
                     data != nullptr);
#else
    return switch_to(b.scheduler, data, nullptr, 0, data != nullptr);
#endif
}

// Reports a bug in the running kernel and abandons the block: the fiber goes back to the scheduler
// and is never resumed.
[[noreturn]] inline void kernel_bug(Block& b, const char* format, ...) {
    char what[512];
    va_list args;
    va_start(args, format);
    vsnprintf(what, sizeof what, format, args);
    va_end(args);
    char message[1024];
    snprintf(message, sizeof message, "CPU emulator: kernel %s, block (%u,%u,%u), thread %s: %s",
             kernel_name(b.kernel).c_str(), blockIdx.x, blockIdx.y, blockIdx.z,
             describe_thread(b, b.current).c_str(), what);
    {
        std::lock_guard<std::mutex> lock(report_mutex);
        if (!grid_failed) {
            grid_failed = true;
            error_message = message;
        }
    }
    b.failed = true;
    switch_to_scheduler(b, &fiber_failed_tag);
    abort();  // unreachable: a failed block's fibers are never resumed
}

inline void park(Block& b) {
    b.stack_of[b.current] = b.running_stack;
    ctx::transfer_t t = switch_to_scheduler(b, nullptr);
    b.scheduler = t.fctx;
}

inline void make_ready(Block& b, int linear) {
    b.state[linear] = ready;
    b.ready_queue[(b.ready_head + b.ready_count++) % max_threads_per_block] = linear;
}

inline void set_current(Block& b, int linear) {
    b.current = linear;
    threadIdx = thread_index(b, linear);
    b.state[linear] = running;
}

// A thread returned from the kernel. Nobody may still be waiting for it.
inline void thread_exit(Block& b, int linear) {
    if (b.barrier_waiting > 0)
        kernel_bug(
            b, "barrier divergence: thread exited while %d thread(s) wait at __syncthreads (%s:%d)",
            b.barrier_waiting, b.barrier_file, b.barrier_line);
    WarpOp& w = b.warp[linear / 32];
    unsigned lane_bit = 1u << (linear % 32);
    if (w.arrived && (w.mask & lane_bit))
        kernel_bug(b, "thread exited while lanes of its warp wait for it in %s (mask 0x%08x)",
                   warp_op_names[w.kind], w.mask);
    if (!b.async_copies[linear].empty())
        kernel_bug(b,
                   "thread exited with %zu cp.async copies in flight (cp.async.wait_group 0 lands "
                   "them)",
                   b.async_copies[linear].size());
    w.exited |= lane_bit;
    b.state[linear] = exited;
    b.exited_count++;
    if (b.first_exited < 0) b.first_exited = linear;
}

inline void run_unstarted_threads(Block& b) {
    while (b.next_unstarted < b.n_threads) {
        int linear = b.next_unstarted++;
        set_current(b, linear);
        b.body(b.body_arg);
        thread_exit(b, linear);
    }
}

inline void fiber_main(ctx::transfer_t t) {
    Block& b = *static_cast<Block*>(t.data);
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(nullptr, &b.scheduler_stack_bottom, &b.scheduler_stack_size);
#endif
    b.scheduler = t.fctx;
    run_unstarted_threads(b);
    switch_to_scheduler(b, &fiber_finished_tag);
}

inline int take_stack(Block& b) {
    if (b.free_stacks.empty()) {
        size_t page = 4096;
        char* memory =
            static_cast<char*>(mmap(nullptr, fiber_stack_bytes + page, PROT_READ | PROT_WRITE,
                                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
        if (memory == MAP_FAILED) {
            fprintf(stderr, "CPU emulator: cannot allocate a fiber stack\n");
            abort();
        }
        mprotect(memory, page, PROT_NONE);  // guard page
        b.stacks.push_back(Stack{memory + page, fiber_stack_bytes});
        b.free_stacks.push_back(int(b.stacks.size()) - 1);
    }
    int s = b.free_stacks.back();
    b.free_stacks.pop_back();
    return s;
}

// Back in the scheduler after running a fiber: the fiber either parked a thread, finished, or
// failed.
inline void fiber_returned(Block& b, ctx::transfer_t t) {
    if (t.data == &fiber_finished_tag) b.free_stacks.push_back(b.running_stack);
    else if (t.data == nullptr) b.context[b.current] = t.fctx;
}

inline void start_fiber(Block& b) {
    b.running_stack = take_stack(b);
    const Stack& s = b.stacks[b.running_stack];
    ctx::fcontext_t fiber = ctx::make_fcontext(s.bottom + s.size, s.size, fiber_main);
    fiber_returned(b, switch_to(fiber, &b, s.bottom, s.size, false));
}

inline void resume(Block& b, int linear) {
    set_current(b, linear);
    b.running_stack = b.stack_of[linear];
    const Stack& s = b.stacks[b.running_stack];
    fiber_returned(b, switch_to(b.context[linear], &b, s.bottom, s.size, false));
}

inline void report_deadlock(Block& b) {
    for (int i = 0; i < b.n_threads; i++) {
        if (b.state[i] == at_barrier || b.state[i] == at_warp_op) {
            b.current = i;
            threadIdx = thread_index(b, i);
            b.failed = true;
            std::lock_guard<std::mutex> lock(report_mutex);
            if (grid_failed) return;
            grid_failed = true;
            char message[1024];
            snprintf(message, sizeof message,
                     "CPU emulator: kernel %s, block (%u,%u,%u), thread %s: deadlock: it waits at "
                     "%s forever (%d of %d threads exited)",
                     kernel_name(b.kernel).c_str(), blockIdx.x, blockIdx.y, blockIdx.z,
                     describe_thread(b, i).c_str(),
                     b.state[i] == at_barrier ? "__syncthreads" : "a warp operation",
                     b.exited_count, b.n_threads);
            error_message = message;
            return;
        }
    }
    b.failed = true;
}

inline void run_block(Block& b) {
    b.next_unstarted = 0, b.exited_count = 0, b.barrier_waiting = 0, b.first_exited = -1;
    b.ready_head = 0, b.ready_count = 0, b.failed = false;
    memset(b.state, not_started, sizeof b.state);
    int n_warps = (b.n_threads + 31) / 32;
    for (int w = 0; w < n_warps; w++) {
        int lanes = b.n_threads - 32 * w;
        b.warp[w].mask = b.warp[w].arrived = 0;
        b.warp[w].exited = lanes >= 32 ? 0u : ~0u << lanes;
    }
    for (int i = 0; i < b.n_threads; i++) b.async_copies[i].clear(), b.groups_committed[i] = 0;
    if (b.shared_bytes) {
        memset(b.shared_storage.data(), 0xff, b.shared_bytes);  // NaN in every float and double
        memset(b.shadow.data(), 0, b.shared_bytes);
    }
    while (b.exited_count < b.n_threads && !b.failed) {
        if (b.ready_count > 0) {
            int linear = b.ready_queue[b.ready_head];
            b.ready_head = (b.ready_head + 1) % max_threads_per_block;
            b.ready_count--;
            resume(b, linear);
        } else if (b.next_unstarted < b.n_threads) {
            start_fiber(b);
        } else {
            report_deadlock(b);
        }
    }
    if (b.failed) {  // abandon the parked fibers; their stacks are free again
        b.free_stacks.clear();
        for (int s = 0; s < int(b.stacks.size()); s++) {
            b.free_stacks.push_back(s);
#if defined(__SANITIZE_ADDRESS__)
            // The abandoned frames' redzones would otherwise stay poisoned for the stack's next
            // fiber.
            __asan_unpoison_memory_region(b.stacks[s].bottom, b.stacks[s].size);
#endif
        }
    }
}

// Runs a whole grid. body(arg) runs the kernel for the thread in threadIdx/blockIdx.
// Why a launch's configuration is one a GPU refuses, or empty.
inline std::string launch_problem(const void* kernel, dim3 grid, dim3 block, size_t shared_bytes) {
    char text[256] = "";
    long threads = long(block.x) * block.y * block.z;
    if (threads < 1 || threads > max_threads_per_block)
        snprintf(text, sizeof text, "%ld threads per block (%ux%ux%u), at most %d", threads,
                 block.x, block.y, block.z, max_threads_per_block);
    else if (block.x > max_block_x || block.y > max_block_y || block.z > max_block_z)
        snprintf(text, sizeof text, "block (%u,%u,%u): at most (%u,%u,%u)", block.x, block.y,
                 block.z, max_block_x, max_block_y, max_block_z);
    else if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.x > max_grid_x ||
             grid.y > max_grid_yz || grid.z > max_grid_yz)
        snprintf(text, sizeof text, "grid (%u,%u,%u): each from 1 to (2^31-1,%u,%u)", grid.x,
                 grid.y, grid.z, max_grid_yz, max_grid_yz);
    else if (shared_bytes > shared_limit(kernel))
        snprintf(text, sizeof text,
                 "%zu bytes of dynamic shared memory, more than the %zu allowed (above 48 KB needs "
                 "cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) "
                 "first)",
                 shared_bytes, shared_limit(kernel));
    return text;
}

inline void run_grid(const void* kernel, dim3 grid, dim3 block, size_t shared_bytes,
                     void (*body)(void*), void* arg) {
    std::string problem = launch_problem(kernel, grid, block, shared_bytes);
    int n_threads = int(block.x * block.y * block.z);
    if (!problem.empty()) {
        std::lock_guard<std::mutex> lock(report_mutex);
        error_message =
            "CPU emulator: kernel " + kernel_name(kernel) + ": invalid launch: " + problem;
        pending_error = cudaErrorInvalidValue;
        return;
    }
    grid_failed = false;
    long n_blocks = long(grid.x) * grid.y * grid.z;
    int n_workers = omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 1 + n_blocks / (8 * n_workers)) if (n_blocks > 1)
    for (long i = 0; i < n_blocks; i++) {
        if (grid_failed) continue;
        Block& b = block_state;
        b.body = body, b.body_arg = arg, b.kernel = kernel;
        b.n_threads = n_threads, b.block_dim = block;
        b.shared_bytes = shared_bytes;
        if (b.shadow.size() < shared_bytes) {
            b.shared_storage.resize((shared_bytes + sizeof(SharedWord) - 1) / sizeof(SharedWord));
            b.shadow.resize(b.shared_storage.size() * sizeof(SharedWord));
        }
        blockDim = block, gridDim = grid;
        blockIdx = uint3{unsigned(i % grid.x), unsigned(i / grid.x % grid.y),
                         unsigned(i / (long(grid.x) * grid.y))};
        run_block(b);
    }
    if (grid_failed) pending_error = cudaErrorLaunchFailure;
}

template <typename F>
void call_body(void* f) {
    (*static_cast<F*>(f))();
}

// --- __syncthreads ---

inline void syncthreads(const char* file, int line) {
    Block& b = block_state;
    if (b.first_exited >= 0)
        kernel_bug(b, "barrier divergence: __syncthreads (%s:%d) reached after thread %s exited",
                   file, line, describe_thread(b, b.first_exited).c_str());
    if (b.barrier_waiting == 0) {
        b.barrier_file = file, b.barrier_line = line;
    } else if (b.barrier_line != line || strcmp(b.barrier_file, file) != 0) {
        kernel_bug(
            b, "barrier divergence: waits at __syncthreads %s:%d while other threads wait at %s:%d",
            file, line, b.barrier_file, b.barrier_line);
    }
    if (++b.barrier_waiting == b.n_threads) {  // last to arrive: release everyone, carry on
        b.barrier_waiting = 0;
        for (int i = 0; i < b.n_threads; i++)
            if (b.state[i] == at_barrier) make_ready(b, i);
        return;
    }
    b.state[b.current] = at_barrier;
    park(b);
}

// --- warp collectives ---

// --- warp-level matrix multiply-accumulate (tensor cores) ---
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: D = A B + C with A (16, 16) and B (16, 8) in
// bfloat16, C and D (16, 8) in float, spread over the 32 lanes of a warp as the PTX ISA lays them
// out ("Matrix Fragments for mma.m16n8k16 with floating point type"). With g = lane / 4 and
// t = lane % 4, a lane holds (a 32-bit register packs two bfloat16, the lower index in the low
// half):
//   A, 4 registers: (row g, columns 2t, 2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)
//   B, 2 registers: (rows 2t, 2t+1, column g), (rows 2t+8, 2t+9, column g)
//   C and D, 4 floats: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
inline float bfloat16_half(uint32_t word, int high) {
    return __bfloat162float(__nv_bfloat16{uint16_t(word >> (16 * high))});
}

// Run by the last lane to arrive: gathers the warp's fragments into whole matrices, multiplies in
// float (a product of two bfloat16 is exact in float) and scatters D back.
inline void multiply_fragments(WarpOp& w) {
    float A[16][16], B[16][8];
    for (int lane = 0; lane < 32; lane++) {
        int g = lane / 4, t = lane % 4;
        for (int r = 0; r < 4; r++)
            for (int half = 0; half < 2; half++)
                A[g + 8 * (r % 2)][2 * t + half + 8 * (r / 2)] = bfloat16_half(w.a[lane][r], half);
        for (int r = 0; r < 2; r++)
            for (int half = 0; half < 2; half++)
                B[2 * t + half + 8 * r][g] = bfloat16_half(w.b[lane][r], half);
    }
    for (int lane = 0; lane < 32; lane++) {
        int g = lane / 4, t = lane % 4;
        for (int i = 0; i < 4; i++) {
            int row = g + 8 * (i / 2), column = 2 * t + i % 2;
            float sum = w.c[lane][i];
            for (int k = 0; k < 16; k++) sum += A[row][k] * B[k][column];
            w.d[lane][i] = sum;
        }
    }
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16, run by the last lane to arrive: lanes 8j..8j+7
// posted the shared-memory byte offsets of rows 0..7 of matrix j (8 elements of 16 bits each). Lane
// l receives in register j the elements (row l/4, columns 2(l%4), 2(l%4)+1) of matrix j, or with
// .trans those of the transposed matrix, (rows 2(l%4), 2(l%4)+1, column l/4): the first in the low
// half. (PTX ISA, "Warp-level matrix load instruction: ldmatrix".)
inline void load_matrices(WarpOp& w, bool trans) {
    const char* shared = reinterpret_cast<const char*>(block_state.shared_storage.data());
    for (int lane = 0; lane < 32; lane++)
        for (int j = 0; j < 4; j++) {
            uint16_t element[2];
            for (int e = 0; e < 2; e++) {
                int row = trans ? 2 * (lane % 4) + e : lane / 4,
                    column = trans ? lane / 4 : 2 * (lane % 4) + e;
                memcpy(&element[e], shared + w.value[8 * j + row] + 2 * column, 2);
            }
            w.loaded[lane][j] = element[0] | uint32_t(element[1]) << 16;
        }
}

inline uint64_t warp_collective(WarpOpKind kind, unsigned mask, uint64_t value, int source_lane) {
    Block& b = block_state;
    int lane = b.current % 32;
    WarpOp& w = b.warp[b.current / 32];
    if (!(mask & (1u << lane)))
        kernel_bug(b, "warp operation with mask 0x%08x that does not include the calling lane %d",
                   mask, lane);
    if (mask & w.exited)
        kernel_bug(
            b,
            "warp operation with mask 0x%08x names lanes that have exited or do not exist (0x%08x)",
            mask, mask & w.exited);
    if (w.arrived == 0) {
        w.mask = mask, w.kind = kind;
    } else if (w.mask != mask || w.kind != kind) {
        kernel_bug(b,
                   "warp divergence: lanes of one warp are in different warp operations (%s with "
                   "mask 0x%08x, %s with mask 0x%08x)",
                   warp_op_names[w.kind], w.mask, warp_op_names[kind], mask);
    }
    if (!(mask & (1u << source_lane)))
        kernel_bug(b, "shuffle reads lane %d, which is not in the mask 0x%08x", source_lane, mask);
    w.value[lane] = value;
    w.source[lane] = source_lane;
    w.arrived |= 1u << lane;
    if (w.arrived == mask) {  // last lane: compute all results and release the others
        if (kind == warp_mma) multiply_fragments(w);
        if (kind == warp_ldmatrix || kind == warp_ldmatrix_trans)
            load_matrices(w, kind == warp_ldmatrix_trans);
        uint64_t ballot = 0;
        for (int l = 0; l < 32; l++)
            if ((mask >> l & 1) && w.value[l]) ballot |= 1u << l;
        int warp_base = b.current - lane;
        for (int l = 0; l < 32; l++) {
            if (!(mask >> l & 1)) continue;
            w.result[l] = kind == warp_ballot ? ballot : w.value[w.source[l]];
            if (l != lane) make_ready(b, warp_base + l);
        }
        w.arrived = 0;
        return w.result[lane];
    }
    b.state[b.current] = at_warp_op;
    park(b);
    return w.result[lane];
}

template <typename T>
inline T shuffle(unsigned mask, T var, int source_lane) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "warp shuffles move at most 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &var, sizeof(T));
    bits = warp_collective(warp_shuffle, mask, bits, source_lane);
    T result;
    memcpy(&result, &bits, sizeof(T));
    return result;
}

inline int lane_id() { return block_state.current % 32; }

// One mma.sync by this lane: the whole warp must make the same call (it is `.aligned`), so the
// block must consist of whole warps.
inline void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2],
                              const float c[4]) {
    Block& block = block_state;
    if (block.n_threads % 32)
        kernel_bug(block,
                   "mma.sync needs whole warps: the block has %d threads, not a multiple of 32",
                   block.n_threads);
    int lane = lane_id();
    WarpOp& w = block.warp[block.current / 32];
    memcpy(w.a[lane], a, sizeof w.a[lane]);
    memcpy(w.b[lane], b, sizeof w.b[lane]);
    memcpy(w.c[lane], c, sizeof w.c[lane]);
    warp_collective(warp_mma, 0xffffffffu, 0, lane);
    memcpy(d, w.d[lane], sizeof w.d[lane]);
}

// --- shared-memory checks shared by every access ---

[[noreturn]] inline void shared_out_of_bounds(size_t offset, size_t bytes) {
    Block& b = block_state;
    kernel_bug(b, "shared memory access at byte %zu is out of bounds (the launch gave %zu bytes)",
               offset, bytes);
}

// A read of `bytes` bytes of shared memory from byte `offset`: every byte written, none in flight.
inline void check_shared_read(size_t offset, size_t bytes) {
    const unsigned char* shadow = block_state.shadow.data() + offset;
    for (size_t i = 0; i < bytes; i++) {
        if (shadow[i] == written) continue;
        if (shadow[i] == in_flight)
            kernel_bug(block_state,
                       "read of shared memory at byte %zu while a cp.async into it is in flight "
                       "(cp.async.wait_group, then __syncthreads, before reading)",
                       offset + i);
        kernel_bug(block_state,
                   "read of shared memory at byte %zu that no thread of the block has written",
                   offset + i);
    }
}
// A write: no byte may be the target of a cp.async in flight.
inline void check_shared_write(size_t offset, size_t bytes) {
    const unsigned char* shadow = block_state.shadow.data() + offset;
    for (size_t i = 0; i < bytes; i++)
        if (shadow[i] == in_flight)
            kernel_bug(block_state,
                       "write to shared memory at byte %zu while a cp.async into it is in flight",
                       offset + i);
}
// The 16 bytes from `offset`, for ldmatrix and cp.async: inside the launch's shared memory and
// 16-byte aligned, as both instructions require.
inline void check_shared_16_bytes(size_t offset, const char* instruction) {
    Block& b = block_state;
    if (offset + 16 > b.shared_bytes) shared_out_of_bounds(offset, b.shared_bytes);
    if (offset % 16)
        kernel_bug(b, "%s at shared byte %zu, which is not 16-byte aligned", instruction, offset);
}

// --- ldmatrix: four 8x8 matrices from shared memory into mma fragments (see load_matrices) ---
// `row_offset`: the byte offset of the row this lane gives. The whole warp makes the call.
inline void ldmatrix_x4(uint32_t r[4], size_t row_offset, bool trans) {
    Block& b = block_state;
    const char* name = trans ? "ldmatrix.x4.trans" : "ldmatrix.x4";
    if (b.n_threads % 32)
        kernel_bug(b, "%s needs whole warps: the block has %d threads, not a multiple of 32", name,
                   b.n_threads);
    check_shared_16_bytes(row_offset, name);
    check_shared_read(row_offset, 16);
    int lane = lane_id();
    warp_collective(trans ? warp_ldmatrix_trans : warp_ldmatrix, 0xffffffffu, row_offset, lane);
    memcpy(r, b.warp[b.current / 32].loaded[lane], 4 * sizeof(uint32_t));
}

// --- cp.async: copies from global into shared memory that land later ---
// cp.async.cg.shared.global [to], [from], 16, src_size (16, or 0 to fill zeros): the 16 bytes are
// in flight from here until a cp.async.wait_group of this thread lets their group land; reading or
// writing them before then is a bug. Copies join the thread's next group (cp.async.commit_group
// closes it).
inline void cp_async_16(size_t to, const void* from, bool fill_zeros) {
    Block& b = block_state;
    check_shared_16_bytes(to, "cp.async");
    if (reinterpret_cast<uintptr_t>(from) % 16)
        kernel_bug(b, "cp.async from global address %p, which is not 16-byte aligned", from);
    check_shared_write(to, 16);
    memset(b.shadow.data() + to, in_flight, 16);
    b.async_copies[b.current].push_back(
        AsyncCopy{to, fill_zeros ? nullptr : from, b.groups_committed[b.current]});
}
inline void cp_async_commit() { block_state.groups_committed[block_state.current]++; }
// cp.async.wait_group pending: every committed group but the newest `pending` lands.
inline void cp_async_wait(int pending) {
    Block& b = block_state;
    std::vector<AsyncCopy>& copies = b.async_copies[b.current];
    int landing = b.groups_committed[b.current] - pending;  // groups below this one land
    char* shared = reinterpret_cast<char*>(b.shared_storage.data());
    size_t kept = 0;
    for (const AsyncCopy& c : copies) {
        if (c.group >= landing) {
            copies[kept++] = c;
            continue;
        }
        if (c.from) memcpy(shared + c.to, c.from, 16);
        else memset(shared + c.to, 0, 16);
        memset(b.shadow.data() + c.to, written, 16);
    }
    copies.resize(kept);
}

// A shuffle's width must be a power of two from 1 to 32.
inline void check_width(int width) {
    if (width < 1 || width > 32 || (width & (width - 1)))
        kernel_bug(block_state,
                   "warp shuffle with width %d: it must be a power of two from 1 to 32", width);
}

// --- dynamic shared memory with an initialisation check ---

// A reference to one element of shared memory: reading checks the shadow, writing sets it.
template <typename T>
struct SharedRef {
    T* pointer;
    unsigned char* shadow;
    size_t offset() const { return size_t(shadow - block_state.shadow.data()); }
    operator T() const {
        for (size_t i = 0; i < sizeof(T); i++)
            if (shadow[i] != written) check_shared_read(offset(), sizeof(T));
        return *pointer;
    }
    SharedRef& operator=(T value) {
        for (size_t i = 0; i < sizeof(T); i++)
            if (shadow[i] == in_flight) check_shared_write(offset(), sizeof(T));
        *pointer = value;
        memset(shadow, written, sizeof(T));
        return *this;
    }
    SharedRef& operator=(const SharedRef& other) { return *this = T(other); }
    SharedRef& operator+=(T value) { return *this = T(*this) + value; }
    SharedRef& operator-=(T value) { return *this = T(*this) - value; }
    SharedRef& operator*=(T value) { return *this = T(*this) * value; }
    SharedRef& operator/=(T value) { return *this = T(*this) / value; }
};

// What shared_memory<T>() returns on the CPU: indexes like a T*, checks every access.
template <typename T>
struct SharedArray {
    size_t byte_offset;
    SharedRef<T> operator[](size_t i) const {
        Block& b = block_state;
        size_t offset = byte_offset + i * sizeof(T);
        if (offset + sizeof(T) > b.shared_bytes) shared_out_of_bounds(offset, b.shared_bytes);
        return SharedRef<T>{
            reinterpret_cast<T*>(reinterpret_cast<char*>(b.shared_storage.data()) + offset),
            b.shadow.data() + offset};
    }
    SharedArray operator+(size_t i) const { return SharedArray{byte_offset + i * sizeof(T)}; }
};

}  // namespace emu

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    emu::syncthreads(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    emu::warp_collective(emu::warp_sync, mask, 0, emu::lane_id());
}

// Lanes whose source falls outside their group of `width` lanes read their own value, as on a GPU.
template <typename T>
inline T __shfl_sync(unsigned mask, T var, int source_lane, int width = 32) {
    emu::check_width(width);
    int lane = emu::lane_id();
    return emu::shuffle(mask, var, (lane & ~(width - 1)) + (source_lane & (width - 1)));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    emu::check_width(width);
    int lane = emu::lane_id();
    return emu::shuffle(mask, var, (lane % width) + int(delta) < width ? lane + int(delta) : lane);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    emu::check_width(width);
    int lane = emu::lane_id();
    return emu::shuffle(mask, var, (lane % width) >= int(delta) ? lane - int(delta) : lane);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
    emu::check_width(width);
    int lane = emu::lane_id();
    int source = lane ^ lane_mask;
    return emu::shuffle(mask, var, source / width == lane / width ? source : lane);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
    return unsigned(emu::warp_collective(emu::warp_ballot, mask, predicate != 0, emu::lane_id()));
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) {
    return __ballot_sync(mask, predicate) == mask;
}

// Dynamic shared memory (the CUDA `extern __shared__` array), `byte_offset` bytes into the block's
// buffer.
template <typename T>
inline emu::SharedArray<T> shared_memory(size_t byte_offset = 0) {
    return emu::SharedArray<T>{byte_offset};
}

// The launch: kernel<<<grid, block, shared_bytes>>>(args...) on a GPU.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                   Args... args) {
    auto body = [&]() { kernel(args...); };
    emu::run_grid(reinterpret_cast<const void*>(kernel), grid, block, shared_bytes,
                  emu::call_body<decltype(body)>, &body);
}
