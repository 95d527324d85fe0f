// distributed.h — Part III: one training run over several processes (data parallel). A launcher
// (mpirun) starts the processes, the ranks; MPI carries host values between them, and device
// buffers go through MPI on the CPU build and through NCCL on the GPU build (one GPU per rank,
// NCCL set up through MPI). ZeRO-1 gives each rank the optimizer state of one shard of the
// parameter buffer.
//
// Built without MPI (MPI=0, or no MPI installed), a process is always rank 0 of 1 and every
// collective returns at once; so does a process of an MPI build that no launcher started.
#pragma once

#include "tricycle.h"

#include <string>
#include <utility>
#include <vector>

struct Job {
    int rank = 0, ranks = 1;  // this process, and how many there are
    int local_rank = 0;       // among the ranks on this machine: its GPU on the GPU build
    int local_ranks = 1;      // ranks on this machine
    bool mpi = false;         // MPI is initialised: a launcher started this process
};

// Joins the job when an MPI launcher started this process, else runs alone. On the GPU build it
// picks the GPU (local_rank) and sets up NCCL. Call it before anything is allocated; `program`
// names the process in errors.
Job job_start(const char* program);
void job_end();  // after success: NCCL and MPI shut down
// A failure on one rank: prints "PROGRAM: error: rank R of N: MESSAGE" and ends every rank with
// exit status 1 (MPI_Abort), so that no rank is left waiting in a collective.
[[noreturn]] void job_abort(const char* message);
// What carries the device buffers: "MPI" or "NCCL" (or "none" in a build without MPI).
const char* job_transport();

// Every rank must run with the same settings: each rank compares rank 0's (name, value) list with
// its own (a name given twice counts with its last value), and one that differs fails naming the
// setting and both values.
typedef std::vector<std::pair<std::string, std::string>> Settings;
void check_same_on_every_rank(const Settings& settings);

// Collectives. Every rank calls the same ones in the same order.
// In place. Gradients are summed as real: the bfloat16 build sums them in a float buffer
// (parameters_add_grad_to), so that R ranks give the sum one process gives.
void all_reduce_sum(real* device, long n);
double all_reduce_sum(double value);

// ZeRO-1 shards of a buffer of n values: rank r owns [offset, offset + count), the shards
// contiguous in rank order, each starting at a multiple of shard_alignment values (whole 4-value
// packs for AdamW, 256-byte boundaries for the GPU). Late ranks may get fewer values, or none.
struct Shard {
    long offset = 0, count = 0;
};
constexpr long shard_alignment = 64;
Shard shard_of(long n, int rank, int ranks);
// Each rank's shard of the device buffer (n values in all) to every rank, in place.
void all_gather_shards(floatX* device, long n);
// Every rank's shard of an n-value buffer (its count values on the device) to rank 0, which gets
// all n in order (for checkpoints: AdamW's moments, the master weights); the others get nothing.
std::vector<float> gather_shards(const real* device_shard, long n);
