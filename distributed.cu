// distributed.cu — Part III: the job (MPI, and NCCL on the GPU build), the collectives training
// needs, and ZeRO-1 shards. See distributed.h.
#include "distributed.h"

#include <climits>
#include <cstdlib>
#include <map>

#ifdef TRICYCLE_MPI
#include <mpi.h>
#ifdef __CUDACC__
#include <nccl.h>
#endif
#endif

static Job job;  // this process's place in the job, set by job_start
static const char* program_name = "";

// An MPI launcher sets these in every process it starts: OpenMPI's mpirun OMPI_COMM_WORLD_SIZE,
// MPICH's mpiexec and Slurm's srun PMI_SIZE. A process started by hand joins no job.
static int launched_ranks() {
    for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE"})
        if (const char* value = getenv(name)) return atoi(value) > 0 ? atoi(value) : 1;
    return 0;
}

Shard shard_of(long n, int rank, int ranks) {
    long per_rank = (n + ranks - 1) / ranks;
    per_rank = (per_rank + shard_alignment - 1) / shard_alignment * shard_alignment;
    long begin = std::min(n, per_rank * rank), end = std::min(n, per_rank * (rank + 1));
    return Shard{begin, end - begin};
}

#ifndef TRICYCLE_MPI

// ----------------------------------------------------------------------------------------------------
// Without MPI: one process, collectives that have nothing to do.

Job job_start(const char* program) {
    program_name = program;
    if (launched_ranks() > 1)
        fail(
            "started by an MPI launcher with %d processes, but built without MPI: rebuild with "
            "make MPI=1 (Debian: apt-get install openmpi-bin libopenmpi-dev)",
            launched_ranks());
    return job;
}
void job_end() {}
void job_abort(const char* message) {
    fflush(stdout);
    fprintf(stderr, "%s: error: %s\n", program_name, message);
    exit(1);
}
const char* job_transport() { return "none"; }
void check_same_on_every_rank(const Settings&) {}
void all_reduce_sum(real*, long) {}
double all_reduce_sum(double value) { return value; }
void all_gather_shards(floatX*, long) {}
std::vector<float> gather_shards(const real* device_shard, long n) {
    std::vector<real> values = download(device_shard, n);
    return std::vector<float>(values.begin(), values.end());
}

#else

// ----------------------------------------------------------------------------------------------------
// MPI

// MPI calls return their errors (MPI_ERRORS_RETURN) and fail with MPI's own words, so that the
// rank's error reaches job_abort like any other.
static void mpi_check(int code, const char* call) {
    if (code == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    MPI_Error_string(code, text, &length);
    fail("%s failed: %.*s", call, length, text);
}

// MPI counts are int: buffers beyond that go in pieces (all-reduce) or are refused.
static int mpi_count(long n, const char* what) {
    if (n > INT_MAX) fail("%s: %ld values are more than MPI takes at once (%d)", what, n, INT_MAX);
    return int(n);
}

// Every rank's shard of n values as MPI's counts and offsets.
static void shard_counts(long n, std::vector<int>* counts, std::vector<int>* offsets) {
    for (int rank = 0; rank < job.ranks; rank++) {
        Shard s = shard_of(n, rank, job.ranks);
        counts->push_back(mpi_count(s.count, "a shard"));
        offsets->push_back(mpi_count(s.offset, "a shard"));
    }
}

// Device buffers: sums travel as real (float), parameters as floatX, which MPI only copies
// (bfloat16 as 16-bit words). The GPU build sends them with NCCL.
#ifndef __CUDACC__
static const MPI_Datatype real_type = sizeof(real) == sizeof(double) ? MPI_DOUBLE : MPI_FLOAT;
static const MPI_Datatype floatx_type = sizeof(floatX) == 2 ? MPI_UINT16_T : real_type;
#else
static ncclComm_t nccl = nullptr;
static const ncclDataType_t nccl_real = sizeof(real) == sizeof(double) ? ncclDouble : ncclFloat;
static const ncclDataType_t nccl_floatx = sizeof(floatX) == 2 ? ncclBfloat16 : nccl_real;

static void nccl_check(ncclResult_t result, const char* call) {
    if (result != ncclSuccess) fail("%s failed: %s", call, ncclGetErrorString(result));
}

// One GPU per rank, by its place on its machine; NCCL's id travels from rank 0 over MPI.
static void nccl_start() {
    int devices = 0;
    cuda_check(cudaGetDeviceCount(&devices));
    if (job.local_ranks > devices)
        fail("%d ranks on this machine, which has %d GPUs: start one rank per GPU", job.local_ranks,
             devices);
    cuda_check(cudaSetDevice(job.local_rank));
    ncclUniqueId id;
    if (job.rank == 0) nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    mpi_check(MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD), "MPI_Bcast");
    nccl_check(ncclCommInitRank(&nccl, job.ranks, id, job.rank), "ncclCommInitRank");
}
#endif

// From here on a failure ends every rank (job_abort): the others may be waiting for this one.
static void join_job() {
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    mpi_check(MPI_Comm_rank(MPI_COMM_WORLD, &job.rank), "MPI_Comm_rank");
    mpi_check(MPI_Comm_size(MPI_COMM_WORLD, &job.ranks), "MPI_Comm_size");
    MPI_Comm local;
    mpi_check(
        MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, job.rank, MPI_INFO_NULL, &local),
        "MPI_Comm_split_type");
    mpi_check(MPI_Comm_rank(local, &job.local_rank), "MPI_Comm_rank");
    mpi_check(MPI_Comm_size(local, &job.local_ranks), "MPI_Comm_size");
    MPI_Comm_free(&local);
#ifdef __CUDACC__
    nccl_start();
#endif
}

Job job_start(const char* program) {
    program_name = program;
    if (launched_ranks() == 0) return job;
    int provided = 0;  // only the main thread calls MPI; OpenMP's threads never do
    mpi_check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "MPI_Init");
    job.mpi = true;
    try {
        join_job();
    } catch (const std::exception& error) {
        job_abort(error.what());
    }
    return job;
}

void job_end() {
    if (!job.mpi) return;
#ifdef __CUDACC__
    ncclCommDestroy(nccl);
#endif
    MPI_Finalize();
}

void job_abort(const char* message) {
    fflush(stdout);
    fprintf(stderr, "%s: error: rank %d of %d: %s\n", program_name, job.rank, job.ranks, message);
    fflush(stderr);
    if (job.mpi) MPI_Abort(MPI_COMM_WORLD, 1);
    exit(1);
}

#ifdef __CUDACC__
const char* job_transport() { return "NCCL"; }
#else
const char* job_transport() { return "MPI"; }
#endif

// A settings list as a map: a name given twice counts with its last value, as flags do.
static std::map<std::string, std::string> settings_map(const Settings& settings) {
    std::map<std::string, std::string> map;
    for (const auto& [name, value] : settings) map[name] = value;
    return map;
}

// Rank 0's settings, one "name\tvalue" line each, go to every rank, which compares them with its
// own.
void check_same_on_every_rank(const Settings& settings) {
    if (job.ranks == 1) return;
    std::string text;
    for (const auto& [name, value] : settings) text += name + "\t" + value + "\n";
    long length = long(text.size());
    mpi_check(MPI_Bcast(&length, 1, MPI_LONG, 0, MPI_COMM_WORLD), "MPI_Bcast");
    text.resize(size_t(length));
    mpi_check(MPI_Bcast(text.data(), mpi_count(length, "settings"), MPI_CHAR, 0, MPI_COMM_WORLD),
              "MPI_Bcast");
    Settings first;
    for (size_t line = 0, tab, end; (end = text.find('\n', line)) != std::string::npos;
         line = end + 1)
        if ((tab = text.find('\t', line)) < end)
            first.push_back({text.substr(line, tab - line), text.substr(tab + 1, end - tab - 1)});
    std::map<std::string, std::string> theirs = settings_map(first), mine = settings_map(settings);
    for (const auto& [name, value] : mine)
        if (!theirs.count(name) || theirs[name] != value)
            fail("runs with %s %s, rank 0 %s%s %s: every rank must be given the same settings",
                 name.c_str(), value.c_str(), theirs.count(name) ? "with " : "without ",
                 name.c_str(), theirs.count(name) ? theirs[name].c_str() : "");
    for (const auto& [name, value] : theirs)
        if (!mine.count(name))
            fail("runs without %s, rank 0 with %s %s: every rank must be given the same settings",
                 name.c_str(), name.c_str(), value.c_str());
}

// ----------------------------------------------------------------------------------------------------
// Collectives

// train_gpt --profile times the collectives on device buffers like kernels, under their own phase.
template <typename Body>
static void timed(const char* name, Body body) {
    if (!profiling) return body();
    PhaseScope phase("communication");
    ProfileRegion region(name);
    body();
}

void all_reduce_sum(real* device, long n) {
    if (job.ranks == 1) return;
    timed("all-reduce", [&] {
#ifdef __CUDACC__
        nccl_check(ncclAllReduce(device, device, size_t(n), nccl_real, ncclSum, nccl, 0),
                   "ncclAllReduce");
#else
        const long piece = 1L << 30;
        for (long first = 0; first < n; first += piece)
            mpi_check(MPI_Allreduce(MPI_IN_PLACE, device + first, int(std::min(piece, n - first)),
                                    real_type, MPI_SUM, MPI_COMM_WORLD),
                      "MPI_Allreduce");
#endif
    });
}

double all_reduce_sum(double value) {
    if (job.ranks == 1) return value;
    mpi_check(MPI_Allreduce(MPI_IN_PLACE, &value, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD),
              "MPI_Allreduce");
    return value;
}

// NCCL's all-gather wants equal pieces; shards may differ, so each rank broadcasts its own, the
// broadcasts grouped into one operation.
void all_gather_shards(floatX* device, long n) {
    if (job.ranks == 1) return;
    timed("all-gather", [&] {
#ifdef __CUDACC__
        nccl_check(ncclGroupStart(), "ncclGroupStart");
        for (int rank = 0; rank < job.ranks; rank++) {
            Shard s = shard_of(n, rank, job.ranks);
            if (s.count > 0)
                nccl_check(ncclBroadcast(device + s.offset, device + s.offset, size_t(s.count),
                                         nccl_floatx, rank, nccl, 0),
                           "ncclBroadcast");
        }
        nccl_check(ncclGroupEnd(), "ncclGroupEnd");
#else
        std::vector<int> counts, offsets;
        shard_counts(n, &counts, &offsets);
        mpi_check(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, device, counts.data(),
                                 offsets.data(), floatx_type, MPI_COMM_WORLD),
                  "MPI_Allgatherv");
#endif
    });
}

// Through the host on both builds: checkpoints are rare, and rank 0 writes them from host memory.
std::vector<float> gather_shards(const real* device_shard, long n) {
    Shard mine = shard_of(n, job.rank, job.ranks);
    std::vector<real> values = download(device_shard, mine.count);
    std::vector<float> shard(values.begin(), values.end()), all(job.rank == 0 ? n : 0);
    std::vector<int> counts, offsets;
    shard_counts(n, &counts, &offsets);
    mpi_check(MPI_Gatherv(shard.data(), counts[job.rank], MPI_FLOAT, all.data(), counts.data(),
                          offsets.data(), MPI_FLOAT, 0, MPI_COMM_WORLD),
              "MPI_Gatherv");
    return all;
}

#endif
