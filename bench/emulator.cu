// bench/emulator.cu — what the CPU emulator costs per CUDA thread: launching a thread that never
// waits, one __syncthreads, one warp shuffle. `make bench-emulator` prints the figures.
#include "tricycle.h"

#include <chrono>
#include <cstdio>

__global__ void store_index_kernel(float* out) {
    out[blockIdx.x * blockDim.x + threadIdx.x] = float(threadIdx.x);
}

__global__ void barriers_kernel(float* out, int rounds) {
    float v = 0;
    for (int r = 0; r < rounds; r++) {
        v += float(threadIdx.x);
        __syncthreads();
    }
    out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

__global__ void shuffles_kernel(float* out, int rounds) {
    float v = float(threadIdx.x);
    for (int r = 0; r < rounds; r++) v += __shfl_xor_sync(0xffffffff, v, 1 + r % 16);
    out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

static double seconds() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

// The best of 5 runs of `run`, in nanoseconds per unit of work.
template <typename F>
static double best_ns(double units, F run) {
    double best = 1e30;
    for (int i = 0; i < 5; i++) {
        double start = seconds();
        run();
        best = std::min(best, seconds() - start);
    }
    return best / units * 1e9;
}

int main() {
    const int threads = 1 << 22, rounds = 8;
    float* out = device_alloc<float>(threads);
    for (int workers : {omp_get_max_threads(), 1}) {
        omp_set_num_threads(workers);
        double launch_ns =
            best_ns(threads, [&] { launch(store_index_kernel, threads / 256, 256, 0, out); });
        double barrier_ns = best_ns(double(threads / 8) * rounds, [&] {
            launch(barriers_kernel, threads / 8 / 256, 256, 0, out, rounds);
        });
        double shuffle_ns = best_ns(double(threads / 8) * rounds, [&] {
            launch(shuffles_kernel, threads / 8 / 256, 256, 0, out, rounds);
        });
        printf(
            "%d core(s): thread that never waits %.1f ns, __syncthreads %.1f ns per thread, warp "
            "shuffle %.1f ns per thread\n",
            workers, launch_ns, barrier_ns, shuffle_ns);
    }
    return 0;
}
