// tests/test_emulator.cu — the CPU emulator of the CUDA execution model (cuda_cpu.h): warp
// operations, barriers, shared memory and atomics give CUDA's results, and each deliberately broken
// kernel is caught with a message naming the kernel, block and thread. Built in double precision.
#include "tricycle.h"
#include "tests/check.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

// Kernels that must work, and deliberately broken kernels the emulator must catch.
// (On a GPU build these run on the GPU; the broken ones are only run under the emulator.)

__global__ void warp_operations_kernel(int* out) {
    int lane = threadIdx.x % 32, base = 8 * threadIdx.x;
    out[base + 0] = __shfl_down_sync(0xffffffff, lane * 10, 3);
    out[base + 1] = __shfl_up_sync(0xffffffff, lane * 10, 2);
    out[base + 2] = __shfl_xor_sync(0xffffffff, lane * 10, 5);
    out[base + 3] = __shfl_sync(0xffffffff, lane * 10, 7);
    out[base + 4] = __shfl_down_sync(0xffffffff, lane * 10, 1, 8);  // groups of 8 lanes
    out[base + 5] = int(__ballot_sync(0xffffffff, lane % 3 == 0));
    out[base + 6] = __any_sync(0xffffffff, lane == 17) + 2 * __all_sync(0xffffffff, lane < 32) +
                    4 * __all_sync(0xffffffff, lane < 31);
    __syncwarp();
    out[base + 7] = int(__shfl_xor_sync(0xffffffff, double(lane) + 0.5, 1) * 2);
}

// A tree reduction in dynamic shared memory: log2(256) rounds, each ended by a barrier.
__global__ void block_sum_kernel(real* out, const real* x, int n) {
    auto partial = shared_memory<real>();
    real v = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) v += x[long(blockIdx.x) * n + i];
    partial[threadIdx.x] = v;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (int(threadIdx.x) < stride)
            partial[threadIdx.x] = partial[threadIdx.x] + partial[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

__global__ void static_shared_kernel(int* out) {
    __shared__ int tile[64];
    tile[threadIdx.x] = threadIdx.x * 3;
    __syncthreads();
    out[blockIdx.x * 64 + threadIdx.x] = tile[63 - threadIdx.x];
}

__global__ void atomics_kernel(float* f, double* d, int* i) {
    atomicAdd(f, 0.5f);
    atomicAdd(d, 0.25);
    atomicAdd(i, 1);
}

__global__ void thread_exits_before_barrier_kernel(int* out) {
    if (threadIdx.x == 5) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}

__global__ void two_barriers_kernel(int* out) {
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}

__global__ void shuffle_with_exited_lanes_kernel(int* out) {
    if (threadIdx.x >= 20) return;
    out[threadIdx.x] = __shfl_down_sync(0xffffffff, int(threadIdx.x), 1);
}

__global__ void uninitialised_shared_kernel(real* out) {
    auto values = shared_memory<real>();
    if (threadIdx.x < 16) values[threadIdx.x] = 1;
    __syncthreads();
    out[threadIdx.x] = values[threadIdx.x];
}

__global__ void shared_out_of_bounds_kernel(real* out) {
    auto values = shared_memory<real>();
    values[threadIdx.x + 1] = 1;
    __syncthreads();
    out[threadIdx.x] = values[threadIdx.x];
}

__global__ void deadlock_kernel(int* out) {
    if (threadIdx.x == 0) out[0] = __shfl_sync(0xffffffff, 1, 0);
    else __syncthreads();
}

// Launches a GPU refuses: kernels that are fine, with configurations or arguments that are not.
__global__ void count_kernel(int* out) { atomicAdd(out, 1); }

__global__ void fill_shared_kernel(int* out, int n) {
    auto values = shared_memory<int>();
    for (int i = threadIdx.x; i < n; i += blockDim.x) values[i] = i;
    __syncthreads();
    if (threadIdx.x == 0) out[0] = values[n - 1];
}

__global__ void shuffle_width_kernel(int* out, int width) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffff, int(threadIdx.x), 1, width);
}

// Tensor cores: each warp multiplies its own A (16, 16) by B (16, 8) and adds C (16, 8), all
// row-major, loading its fragments by the PTX ISA's layout for mma.m16n8k16 (g = lane / 4, t =
// lane % 4), written out here element by element, independently of the emulator's own code.
// With `lanes` < 32 only that many lanes of each warp take part (a broken kernel).
__global__ void mma_kernel(float* d, const float* a, const float* b, const float* c, int lanes) {
    int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, warp = threadIdx.x / 32;
    const float *A = a + warp * 256, *B = b + warp * 128, *C = c + warp * 128;
    uint32_t a_fragment[4] = {
        pack_bf16x2(A[g * 16 + 2 * t], A[g * 16 + 2 * t + 1]),
        pack_bf16x2(A[(g + 8) * 16 + 2 * t], A[(g + 8) * 16 + 2 * t + 1]),
        pack_bf16x2(A[g * 16 + 2 * t + 8], A[g * 16 + 2 * t + 9]),
        pack_bf16x2(A[(g + 8) * 16 + 2 * t + 8], A[(g + 8) * 16 + 2 * t + 9])};
    uint32_t b_fragment[2] = {pack_bf16x2(B[2 * t * 8 + g], B[(2 * t + 1) * 8 + g]),
                              pack_bf16x2(B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g])};
    float accumulator[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t],
                            C[(g + 8) * 8 + 2 * t + 1]};
    if (lane >= lanes) return;
    mma_bf16_16x8x16(accumulator, a_fragment, b_fragment);
    float* D = d + warp * 128;
    D[g * 8 + 2 * t] = accumulator[0], D[g * 8 + 2 * t + 1] = accumulator[1];
    D[(g + 8) * 8 + 2 * t] = accumulator[2], D[(g + 8) * 8 + 2 * t + 1] = accumulator[3];
}

// ldmatrix.x4 element by element: a shared table of 32 rows of 8 bfloat16 values, row r holding
// 100r + c; lane l gives row (5l + 3) % 32, so matrix j's row i is table row (5(8j + i) + 3) % 32.
// Lane l writes its four registers to out[4l..4l+3].
__global__ void ldmatrix_kernel(uint32_t* out) {
    auto table = shared_memory<uint32_t>();
    auto halves = shared_memory<unsigned short>();
    for (int e = threadIdx.x; e < 32 * 8; e += blockDim.x) halves[e] = (e / 8) * 100 + e % 8;
    __syncthreads();
    int lane = threadIdx.x % 32;
    uint32_t r[4];
    ldmatrix_x4<false>(r, table, (5 * lane + 3) % 32 * 4);
    for (int j = 0; j < 4; j++) out[4 * lane + j] = r[j];
}

// The tensor-core kernels' use of ldmatrix: A (16, 16) and B (16, 16), row-major bfloat16 in shared
// memory, loaded as mma fragments by ldmatrix.x4 (A) and ldmatrix.x4.trans (B, two 8-wide halves),
// then D = A B by two mma.sync. One warp; d is (16, 16) row-major.
__global__ void ldmatrix_mma_kernel(float* d, const float* a, const float* b) {
    auto a_words = shared_memory<uint32_t>(), b_words = shared_memory<uint32_t>(512);
    auto a_halves = shared_memory<unsigned short>(), b_halves = shared_memory<unsigned short>(512);
    for (int e = threadIdx.x; e < 256; e += 32) {
        a_halves[e] = __bfloat16_as_ushort(__float2bfloat16(a[e]));
        b_halves[e] = __bfloat16_as_ushort(__float2bfloat16(b[e]));
    }
    __syncthreads();
    int lane = threadIdx.x, j = lane / 8, row = lane % 8 + 8 * (j % 2), column = 8 * (j / 2);
    uint32_t a_fragment[4], b_fragments[4];
    ldmatrix_x4<false>(a_fragment, a_words, (row * 16 + column) / 2);
    ldmatrix_x4<true>(b_fragments, b_words, (row * 16 + column) / 2);
    int g = lane / 4, t = lane % 4;
    for (int half = 0; half < 2; half++) {
        float accumulator[4] = {};
        const uint32_t b_fragment[2] = {b_fragments[2 * half], b_fragments[2 * half + 1]};
        mma_bf16_16x8x16(accumulator, a_fragment, b_fragment);
        for (int i = 0; i < 4; i++)
            d[(g + 8 * (i / 2)) * 16 + 8 * half + 2 * t + i % 2] = accumulator[i];
    }
}

// cp.async: 64 threads copy 128 chunks of 16 bytes into shared memory in two groups, chunk i from
// in[4i..4i+3], chunks 64 + t zero-filled for t >= valid. After cp.async.wait_group 1 and a barrier
// the first group has landed for every thread; after wait_group 0 the second. Thread t writes
// chunk 63 - t, then chunk 127 - t (as 4 ints each) to out.
__global__ void cp_async_kernel(int* out, const int* in, int valid) {
    auto chunks = shared_memory<uint32_t>();
    int t = threadIdx.x;
    cp_async_16(chunks, 4 * t, in + 4 * t, false);
    cp_async_commit();
    cp_async_16(chunks, 4 * (64 + t), in + 4 * (64 + t), t >= valid);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    for (int k = 0; k < 4; k++) out[4 * t + k] = int(chunks[4 * (63 - t) + k]);
    cp_async_wait<0>();
    __syncthreads();
    for (int k = 0; k < 4; k++) out[4 * (64 + t) + k] = int(chunks[4 * (127 - t) + k]);
}

// Broken: cp.async.wait_group 1 with only one group committed lands nothing, and the read after
// the barrier meets bytes still in flight.
__global__ void cp_async_read_in_flight_kernel(int* out, const int* in) {
    auto chunks = shared_memory<uint32_t>();
    cp_async_16(chunks, 4 * threadIdx.x, in + 4 * threadIdx.x, false);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    out[threadIdx.x] = int(chunks[4 * threadIdx.x]);
}

// Broken: the thread never waits for its copy.
__global__ void cp_async_never_waited_kernel(const int* in) {
    auto chunks = shared_memory<uint32_t>();
    cp_async_16(chunks, 4 * threadIdx.x, in + 4 * threadIdx.x, false);
    cp_async_commit();
}

// Broken: ldmatrix rows must start on 16 bytes; lane 0's starts 4 bytes in.
__global__ void ldmatrix_misaligned_kernel(uint32_t* out) {
    auto table = shared_memory<uint32_t>();
    for (int e = threadIdx.x; e < 33 * 4; e += blockDim.x) table[e] = e;
    __syncthreads();
    uint32_t r[4];
    ldmatrix_x4<false>(r, table, threadIdx.x == 0 ? 1 : 4 * threadIdx.x);
    out[threadIdx.x] = r[0];
}

// Small integers, exact in bfloat16, so the product is exact too: any misplaced fragment element
// shows as a wrong value.
static std::vector<float> small_integers(int n, uint64_t seed) {
    std::vector<float> values(n);
    for (int i = 0; i < n; i++) values[i] = float(int(random_bits(seed, i) % 9) - 4);
    return values;
}

static float* upload_floats(const std::vector<float>& host) {
    float* device = device_alloc<float>(host.size());
    cuda_check(
        cudaMemcpy(device, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice));
    return device;
}

// Two warps, each its own matrices, against a plain loop: the number of elements of D that differ.
static int mma_mismatches() {
    const int warps = 2;
    std::vector<float> a = small_integers(warps * 256, 31), b = small_integers(warps * 128, 32),
                       c = small_integers(warps * 128, 33), d(warps * 128);
    float* device_d = device_alloc<float>(d.size());
    launch(mma_kernel, 1, 32 * warps, 0, device_d, upload_floats(a), upload_floats(b),
           upload_floats(c), 32);
    cuda_check(cudaMemcpy(d.data(), device_d, d.size() * sizeof(float), cudaMemcpyDeviceToHost));
    int wrong = 0;
    for (int w = 0; w < warps; w++)
        for (int i = 0; i < 16; i++)
            for (int j = 0; j < 8; j++) {
                float expected = c[w * 128 + i * 8 + j];
                for (int k = 0; k < 16; k++)
                    expected += a[w * 256 + i * 16 + k] * b[w * 128 + k * 8 + j];
                wrong += d[w * 128 + i * 8 + j] != expected;
            }
    return wrong;
}

// ldmatrix.x4 against the PTX ISA's layout: the number of the 128 registers that differ.
static int ldmatrix_mismatches() {
    uint32_t* device_out = device_alloc<uint32_t>(128);
    launch(ldmatrix_kernel, 1, 32, 32 * 16, device_out);
    std::vector<uint32_t> out(128);
    cuda_check(cudaMemcpy(out.data(), device_out, 128 * 4, cudaMemcpyDeviceToHost));
    int wrong = 0;
    for (int lane = 0; lane < 32; lane++)
        for (int j = 0; j < 4; j++) {
            int table_row = (5 * (8 * j + lane / 4) + 3) % 32, column = 2 * (lane % 4);
            uint32_t expected =
                uint32_t(table_row * 100 + column) | uint32_t(table_row * 100 + column + 1) << 16;
            wrong += out[4 * lane + j] != expected;
        }
    return wrong;
}

// ldmatrix fragments into mma against a plain product: the number of the 256 elements that differ.
static int ldmatrix_mma_mismatches() {
    std::vector<float> a = small_integers(256, 34), b = small_integers(256, 35), d(256);
    float* device_d = device_alloc<float>(256);
    launch(ldmatrix_mma_kernel, 1, 32, 1024, device_d, upload_floats(a), upload_floats(b));
    cuda_check(cudaMemcpy(d.data(), device_d, 256 * sizeof(float), cudaMemcpyDeviceToHost));
    int wrong = 0;
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) {
            float expected = 0;
            for (int k = 0; k < 16; k++) expected += a[i * 16 + k] * b[k * 16 + j];
            wrong += d[i * 16 + j] != expected;
        }
    return wrong;
}

// cp.async in two groups, with zero fill: the number of the 512 ints that differ.
static int cp_async_mismatches() {
    const int valid = 40;
    std::vector<int> in(512), out(512);
    for (int i = 0; i < 512; i++) in[i] = 7 * i + 1;
    int* device_in = device_alloc<int>(512);
    int* device_out = device_alloc<int>(512);
    cuda_check(cudaMemcpy(device_in, in.data(), 512 * sizeof(int), cudaMemcpyHostToDevice));
    launch(cp_async_kernel, 1, 64, 128 * 16, device_out, device_in, valid);
    cuda_check(cudaMemcpy(out.data(), device_out, 512 * sizeof(int), cudaMemcpyDeviceToHost));
    int wrong = 0;
    for (int t = 0; t < 64; t++)
        for (int k = 0; k < 4; k++) {
            int first = 63 - t, second = 127 - t;
            wrong += out[4 * t + k] != in[4 * first + k];
            wrong += out[4 * (64 + t) + k] != (second - 64 >= valid ? 0 : in[4 * second + k]);
        }
    return wrong;
}

// The tree reduction over 37 rows of 1000 against a plain loop.
static bool block_sums_right() {
    Tensor x = randn({37, 1000}, 3);
    real* sums = device_alloc<real>(37);
    launch(block_sum_kernel, 37, 256, 256 * sizeof(real), sums, x.data, 1000);
    std::vector<real> hx = to_host(x), hs(37), expected(37, 0);
    cuda_check(cudaMemcpy(hs.data(), sums, 37 * sizeof(real), cudaMemcpyDeviceToHost));
    for (int r = 0; r < 37; r++)
        for (int c = 0; c < 1000; c++) expected[r] += hx[r * 1000 + c];
    return max_difference(hs, expected) < 1e-10;
}

static void test_emulator() {
    int* ints = device_alloc<int>(64 * 8);
    launch(warp_operations_kernel, 1, 64, 0, ints);
    std::vector<int> got(64 * 8);
    cuda_check(cudaMemcpy(got.data(), ints, got.size() * sizeof(int), cudaMemcpyDeviceToHost));
    bool shuffles_right = true;
    unsigned ballot = 0;
    for (int l = 0; l < 32; l++) ballot |= (l % 3 == 0 ? 1u : 0u) << l;
    for (int t = 0; t < 64; t++) {
        int lane = t % 32;
        const int* o = &got[8 * t];
        int expected[8] = {(lane + 3 < 32 ? lane + 3 : lane) * 10,
                           (lane >= 2 ? lane - 2 : lane) * 10,
                           (lane ^ 5) * 10,
                           70,
                           (lane % 8 + 1 < 8 ? lane + 1 : lane) * 10,
                           int(ballot),
                           1 + 2,
                           2 * (lane ^ 1) + 1};
        for (int k = 0; k < 8; k++) shuffles_right &= o[k] == expected[k];
    }
    check(shuffles_right,
          "warp shuffles (down, up, xor, indexed, width 8, double), ballot, any, all and syncwarp "
          "give CUDA's results");

    check(block_sums_right(),
          "shared-memory tree reduction with 9 barriers per thread, 37 blocks of 256");

    launch(static_shared_kernel, 3, 64, 0, ints);
    cuda_check(cudaMemcpy(got.data(), ints, 3 * 64 * sizeof(int), cudaMemcpyDeviceToHost));
    bool static_right = true;
    for (int i = 0; i < 3 * 64; i++) static_right &= got[i] == (63 - i % 64) * 3;
    check(static_right, "static __shared__ memory is per block");

    float* f = device_alloc<float>(1);
    double* d = device_alloc<double>(1);
    cuda_check(cudaMemset(f, 0, sizeof(float)));
    cuda_check(cudaMemset(d, 0, sizeof(double)));
    cuda_check(cudaMemset(ints, 0, sizeof(int)));
    launch(atomics_kernel, 500, 128, 0, f, d, ints);
    float hf;
    double hd;
    int hi;
    cuda_check(cudaMemcpy(&hf, f, sizeof hf, cudaMemcpyDeviceToHost));
    cuda_check(cudaMemcpy(&hd, d, sizeof hd, cudaMemcpyDeviceToHost));
    cuda_check(cudaMemcpy(&hi, ints, sizeof hi, cudaMemcpyDeviceToHost));
    check(hf == 32000 && hd == 16000 && hi == 64000,
          "atomicAdd on float, double and int from 64000 threads in 500 blocks: %g %g %d", hf, hd,
          hi);

    int wrong = mma_mismatches();
    check(wrong == 0,
          "mma.sync m16n8k16 bf16 -> f32 in 2 warps, fragments laid out as the PTX ISA documents: "
          "%d of 256 elements differ from a plain matrix product",
          wrong);
    wrong = ldmatrix_mismatches();
    check(wrong == 0,
          "ldmatrix.x4: each lane gets matrix j's row l/4, columns 2(l%%4) and 2(l%%4)+1, from "
          "the rows lanes 8j..8j+7 address: %d of 128 registers differ",
          wrong);
    wrong = ldmatrix_mma_mismatches();
    check(wrong == 0,
          "ldmatrix.x4 (A) and ldmatrix.x4.trans (B) give mma.sync's fragments: %d of 256 "
          "elements of A B differ from a plain matrix product",
          wrong);
    wrong = cp_async_mismatches();
    check(wrong == 0,
          "cp.async in two commit groups, wait_group 1 then 0, with zero fill: %d of 512 values "
          "differ",
          wrong);
}

// The deliberately broken kernels: each launch must fail with the emulator's report.
static void test_broken_kernels() {
#ifndef __CUDACC__
    int* ints = device_alloc<int>(64);
    real* out = device_alloc<real>(64);
    check_fails("emulator: a thread exits while the others wait at __syncthreads",
                "barrier divergence",
                [=] { launch(thread_exits_before_barrier_kernel, 2, 64, 0, ints); });
    check(
        emu::last_error_message().find("thread_exits_before_barrier_kernel") != std::string::npos &&
            emu::last_error_message().find("block (") != std::string::npos &&
            emu::last_error_message().find("thread (") != std::string::npos,
        "emulator: the report names the kernel, the block and the thread");
    check_fails("emulator: threads wait at two different __syncthreads", "barrier divergence",
                [=] { launch(two_barriers_kernel, 1, 32, 0, ints); });
    check_fails("emulator: a shuffle whose mask names exited lanes", "exited",
                [=] { launch(shuffle_with_exited_lanes_kernel, 1, 32, 0, ints); });
    check_fails("emulator: a full-mask shuffle in a warp of 16 lanes", "do not exist",
                [=] { launch(warp_operations_kernel, 1, 48, 0, ints); });
    check_fails("emulator: a read of shared memory nobody wrote",
                "no thread of the block has written",
                [=] { launch(uninitialised_shared_kernel, 1, 32, 32 * sizeof(real), out); });
    check_fails("emulator: shared memory indexed past its end", "out of bounds",
                [=] { launch(shared_out_of_bounds_kernel, 1, 32, 32 * sizeof(real), out); });
    check_fails("emulator: a lane waits at a shuffle while the rest wait at a barrier", "deadlock",
                [=] { launch(deadlock_kernel, 1, 32, 0, ints); });
    float* floats = device_alloc<float>(1024);  // room for two warps' matrices
    cuda_check(cudaMemset(floats, 0, 1024 * sizeof(float)));
    check_fails("emulator: an mma.sync that only 16 lanes of the warp make", "mma.sync",
                [=] { launch(mma_kernel, 1, 32, 0, floats, floats, floats, floats, 16); });
    check_fails("emulator: an mma.sync in a block of 48 threads (a warp and a half)",
                "not a multiple of 32",
                [=] { launch(mma_kernel, 1, 48, 0, floats, floats, floats, floats, 32); });
    int* chunks = device_alloc<int>(4 * 32);  // 32 chunks of 16 bytes
    cuda_check(cudaMemset(chunks, 0, 4 * 32 * sizeof(int)));
    check_fails("emulator: a read of shared memory while a cp.async into it is in flight",
                "while a cp.async into it is in flight",
                [=] { launch(cp_async_read_in_flight_kernel, 1, 32, 32 * 16, ints, chunks); });
    check_fails("emulator: a thread exits without waiting for its cp.async",
                "exited with 1 cp.async copies in flight",
                [=] { launch(cp_async_never_waited_kernel, 1, 32, 32 * 16, chunks); });
    uint32_t* words = device_alloc<uint32_t>(32);
    check_fails("emulator: an ldmatrix row address not 16-byte aligned", "not 16-byte aligned",
                [=] { launch(ldmatrix_misaligned_kernel, 1, 32, 33 * 16, words); });
    check(block_sums_right(), "emulator: a correct kernel runs cleanly right after the failures");
#endif
}

// Every hardware limit the emulator enforces, each broken on purpose.
static void test_hardware_limits() {
#ifndef __CUDACC__
    int* ints = device_alloc<int>(64);
    auto refused = [&](const char* what, const char* expected, dim3 grid, dim3 block) {
        check_fails(what, expected, [=] { launch(count_kernel, grid, block, 0, ints); });
    };
    refused("emulator: 1025 threads in a block", "1025 threads per block", 1, 1025);
    refused("emulator: a block 65 deep (z at most 64)", "block (1,1,65)", 1, dim3(1, 1, 65));
    refused("emulator: a block 2048 wide", "2048 threads per block", 1, dim3(2048));
    refused("emulator: 65536 blocks along grid y", "grid (1,65536,1)", dim3(1, 65536), 32);
    refused("emulator: 65536 blocks along grid z", "grid (1,1,65536)", dim3(1, 1, 65536), 32);
    const int n = 16 << 10;  // 64 KB of ints
    check_fails("emulator: 64 KB of dynamic shared memory without an opt-in",
                "cudaFuncSetAttribute",
                [=] { launch(fill_shared_kernel, 1, 256, n * sizeof(int), ints, n); });
    cudaError_t opt_in = cudaFuncSetAttribute(fill_shared_kernel,
                                              cudaFuncAttributeMaxDynamicSharedMemorySize, n * 4);
    cuda_check(cudaMemset(ints, 0, sizeof(int)));
    launch(fill_shared_kernel, 1, 256, n * sizeof(int), ints, n);
    int last = 0;
    cuda_check(cudaMemcpy(&last, ints, sizeof last, cudaMemcpyDeviceToHost));
    check(opt_in == cudaSuccess && last == n - 1,
          "emulator: after the opt-in, 64 KB of dynamic shared memory work");
    check(cudaFuncSetAttribute(fill_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               200 << 10) == cudaErrorInvalidValue,
          "emulator: an opt-in above the architecture's 163 KB is refused");
    check_fails("emulator: a shuffle of width 6", "width 6",
                [=] { launch(shuffle_width_kernel, 1, 32, 0, ints, 6); });
    check_fails("emulator: a shuffle of width 64", "width 64",
                [=] { launch(shuffle_width_kernel, 1, 32, 0, ints, 64); });
#endif
}

int main() {
    test_emulator();
    test_broken_kernels();
    test_hardware_limits();
    return finish();
}
