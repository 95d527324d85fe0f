# Tricycle — build with `make`, test with `make test`, train with `make train`.
#
# The GPU build (nvcc + cuBLAS) is chosen when `nvidia-smi -L` finds a GPU, the CPU build (g++ +
# the kernel emulator + oneDNN) otherwise. Force one with `make GPU=1` or `make CPU=1`.
# `make test SANITIZE=1` builds the CPU tests with AddressSanitizer and UBSan.
#
# Training across processes (distributed.h): with MPI, `mpirun -np N ./train_gpt ...` trains on N
# ranks. MPI is used when OpenMPI's mpicxx is found (on the GPU build, and NCCL's nccl.h), or forced
# with MPI=1 / MPI=0; the GPU build with MPI links NCCL too. Without MPI everything builds and runs
# as one process.
#
# Precision of the programs: BF16=1 stores every tensor in bfloat16 (mixed precision, see tricycle.h),
# BF16=0 in float. The CPU build picks bfloat16 by itself where the CPU multiplies bfloat16 matrices
# natively (amx_bf16 or avx512_bf16 among the flags of /proc/cpuinfo: there its products are several
# times faster), float elsewhere; the GPU build picks float. CPU_FLAGS="..." replaces the flags read
# from /proc/cpuinfo, to see the choice another CPU would get (`make config CPU_FLAGS=avx2`). The
# tests build the precisions they test whatever is picked. `make config` prints what was picked.

ifeq ($(GPU),1)
  BACKEND := gpu
else ifeq ($(CPU),1)
  BACKEND := cpu
else
  BACKEND := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
endif
ifeq ($(SANITIZE),1)
  ifeq ($(BACKEND),gpu)
    $(error SANITIZE=1 is for the CPU build)
  endif
  BACKEND := cpu-sanitize
endif
CPU_FLAGS ?= $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
BF16_PRODUCTS := $(filter amx_bf16 avx512_bf16,$(CPU_FLAGS))
ifeq ($(BACKEND),gpu)
  BF16 ?= 0
else
  BF16 ?= $(if $(BF16_PRODUCTS),1,0)
endif
PRECISION := $(if $(filter 1,$(BF16)),bf16,float)

# sm_80 (A100) and sm_90 (H100) by default, and the first one's PTX as well, which the driver
# compiles for any newer GPU (an RTX 4090's sm_89, Blackwell) that has no machine code here.
CUDA_ARCH ?= 80 90
NVCC ?= $(shell command -v nvcc || echo /usr/local/cuda/bin/nvcc)

HAS_MPICXX := $(shell command -v mpicxx >/dev/null 2>&1 && echo 1 || echo 0)
NCCL_HEADER := $(wildcard $(dir $(NVCC))../include/nccl.h /usr/local/include/nccl.h /usr/include/nccl.h)
ifeq ($(BACKEND),gpu)
  MPI ?= $(if $(NCCL_HEADER),$(HAS_MPICXX),0)
  ifeq ($(MPI)$(NCCL_HEADER),1)
    $(error MPI=1 on the GPU build needs NCCL (nccl.h, with the CUDA Toolkit or apt-get install libnccl-dev))
  endif
else
  MPI ?= $(HAS_MPICXX)
endif
BUILD := $(BACKEND)$(if $(filter bf16,$(PRECISION)),-bf16)$(if $(filter 1,$(MPI)),-mpi)
CXX ?= g++

ifeq ($(BACKEND),gpu)
  COMPILE := $(NVCC) -std=c++20 -O3 -x cu $(foreach a,$(CUDA_ARCH),-gencode arch=compute_$(a),code=sm_$(a)) \
             -gencode arch=compute_$(firstword $(CUDA_ARCH)),code=compute_$(firstword $(CUDA_ARCH)) \
             -Xcompiler -Wall,-Wextra -Werror all-warnings
  LINKER := $(NVCC)
  LIBS := -lcublas -lcublasLt
else
  # The kernels vectorise on the CPU only once their loop bodies (lambdas) are inlined into the loops.
  # tricycle.cu is one large unit, and g++'s default budget for its growth by inlining (40%) runs out
  # long before the last kernels: AdamW and the classifier then called a function per element.
  OPT := -O3 -march=native -fno-math-errno -fno-trapping-math --param inline-unit-growth=400
  ifeq ($(BACKEND),cpu-sanitize)
    OPT := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
  endif
  COMPILE := $(CXX) -std=c++20 $(OPT) -fopenmp -Wall -Wextra -x c++
  # g++'s notes of the calls it did not inline go beside each object (tests/test_inlining.sh reads
  # them; g++ appends to the file, so each compile starts it afresh).
  INLINING_NOTES := -fopt-info-inline-missed=
  LINKER := $(CXX) $(OPT) -fopenmp -rdynamic
  LIBS := -ldnnl -lopenblas -lboost_context
endif

# Only distributed.cu includes mpi.h (its include folders as system headers: no warnings from them).
ifeq ($(MPI),1)
  MPI_INCLUDES := $(shell mpicxx --showme:incdirs 2>/dev/null)
  ifeq ($(MPI_INCLUDES),)
    $(error MPI=1 needs OpenMPI's mpicxx: apt-get install openmpi-bin libopenmpi-dev)
  endif
  MPI_FLAGS := -DTRICYCLE_MPI -DOMPI_SKIP_MPICXX $(addprefix -isystem ,$(MPI_INCLUDES))
  MPI_LIBS := $(addprefix -L,$(shell mpicxx --showme:libdirs)) -lmpi $(if $(filter gpu,$(BACKEND)),-lnccl)
endif
DISTRIBUTED = $(OBJ)/$(1)/distributed$(if $(filter 1,$(MPI)),-mpi).o

# Objects by backend and precision: build/cpu/float/..., build/cpu/bf16/..., build/cpu/double/...
OBJ := build/$(BACKEND)
FLAGS_float :=
FLAGS_bf16 := -DTRICYCLE_BF16
FLAGS_double := -DTRICYCLE_DOUBLE
HEADERS := tricycle.h tricycle_io.h cuda_cpu.h distributed.h tests/check.h
LIBRARY = $(OBJ)/$(1)/tricycle.o $(OBJ)/$(1)/tricycle_io.o
PROGRAMS := train_gpt inference tokenizer
TESTS := test_gradients tests/test_emulator tests/test_tokenizer tests/gpt_parity tests/mixed_precision_fp32 tests/mixed_precision_bf16

.PHONY: all config test test-gpu-shapes clean train bench kernel-report bench-emulator bench-tokenizer
all: $(PROGRAMS) $(TESTS)

PRECISION_WHY := $(if $(filter command line environment,$(origin BF16)),given as BF16=$(BF16),$(if \
  $(filter gpu,$(BACKEND)),the GPU build's default,$(if $(BF16_PRODUCTS),the CPU multiplies bfloat16 \
  natively: $(BF16_PRODUCTS),the CPU has neither amx_bf16 nor avx512_bf16)))
config:
	@echo "build $(BUILD): backend $(BACKEND), precision $(PRECISION) ($(PRECISION_WHY)), MPI $(MPI)"


# Binaries go to the repository root whatever the build; this stamp relinks them when it changes.
STAMP := build/.selected-$(BUILD)
$(STAMP):
	@mkdir -p build && rm -f build/.selected-* && touch $@

define precision_rule
$(OBJ)/$(1)/%.o: %.cu $(HEADERS) Makefile
	@mkdir -p $$(dir $$@) && rm -f $$@.inline-missed
	$(COMPILE) $(FLAGS_$(1)) $(if $(INLINING_NOTES),$(INLINING_NOTES)$$@.inline-missed) -I. -c $$< -o $$@
endef
$(foreach p,float bf16 double,$(eval $(call precision_rule,$(p))))

$(OBJ)/%/distributed-mpi.o: distributed.cu $(HEADERS) Makefile
	@mkdir -p $(dir $@)
	$(COMPILE) $(FLAGS_$*) $(MPI_FLAGS) -I. -c $< -o $@

# Each precision's programs in a folder of their own, so that a test can run the precision it checks
# whatever the default is; the programs at the repository root are copies of the default's.
PROGRAM_DIR = $(OBJ)/$(1)/programs$(if $(filter 1,$(MPI)),-mpi)
define programs_rule
$(call PROGRAM_DIR,$(1))/train_gpt: $(OBJ)/$(1)/train_gpt.o $(call LIBRARY,$(1)) $(call DISTRIBUTED,$(1))
	@mkdir -p $$(dir $$@)
	$(LINKER) $$(filter %.o,$$^) -o $$@ $(LIBS) $(MPI_LIBS)
$(call PROGRAM_DIR,$(1))/inference $(call PROGRAM_DIR,$(1))/tokenizer: $(call PROGRAM_DIR,$(1))/%: $(OBJ)/$(1)/%.o $(call LIBRARY,$(1))
	@mkdir -p $$(dir $$@)
	$(LINKER) $$(filter %.o,$$^) -o $$@ $(LIBS)
$(call PROGRAM_DIR,$(1))/bench_gpt: $(OBJ)/$(1)/bench/bench_gpt.o $(OBJ)/$(1)/bench/cost_model.o $(call LIBRARY,$(1))
	@mkdir -p $$(dir $$@)
	$(LINKER) $$(filter %.o,$$^) -o $$@ $(LIBS)
$(OBJ)/$(1)/bench/bench_gpt.o $(OBJ)/$(1)/bench/cost_model.o: bench/cost_model.h
endef
$(foreach p,float bf16,$(eval $(call programs_rule,$(p))))

$(PROGRAMS): %: $(call PROGRAM_DIR,$(PRECISION))/% $(STAMP)
	cp $< $@

bench/emulator bench/bench_gpt: %: $(OBJ)/$(PRECISION)/%.o $(call LIBRARY,$(PRECISION)) $(STAMP)
	$(LINKER) $(filter %.o,$^) -o $@ $(LIBS)

# bench_gpt links in the cost model of a GPU training step (bench/cost_model.cu).
bench/bench_gpt: $(OBJ)/$(PRECISION)/bench/cost_model.o

# The tests build the precision they check: gradients in double, parity in float, mixed precision both.
test_gradients tests/test_emulator: %: $(OBJ)/double/%.o $(call LIBRARY,double) $(STAMP)
	$(LINKER) $(filter %.o,$^) -o $@ $(LIBS)

tests/test_tokenizer tests/gpt_parity: %: $(OBJ)/float/%.o $(call LIBRARY,float) $(STAMP)
	$(LINKER) $(filter %.o,$^) -o $@ $(LIBS)

tests/mixed_precision_fp32: $(OBJ)/float/tests/mixed_precision.o $(call LIBRARY,float) $(STAMP)
	$(LINKER) $(filter %.o,$^) -o $@ $(LIBS)

tests/mixed_precision_bf16: $(OBJ)/bf16/tests/mixed_precision.o $(call LIBRARY,bf16) $(STAMP)
	$(LINKER) $(filter %.o,$^) -o $@ $(LIBS)

# The programs of both precisions, for the tests that check each (tests/test_hf.py, the loss
# comparison of tests/test_programs.sh) whatever the default is.
PRECISION_PROGRAMS := $(foreach p,float bf16,$(addprefix $(call PROGRAM_DIR,$(p))/,train_gpt inference bench_gpt))
export TRICYCLE_PROGRAMS_FLOAT := $(call PROGRAM_DIR,float)
export TRICYCLE_PROGRAMS_BF16 := $(call PROGRAM_DIR,bf16)

test: $(TESTS) $(PROGRAMS) $(PRECISION_PROGRAMS) bench/bench_gpt
	@bash tests/run_tests.sh test_gradients tests/test_emulator tests/test_tokenizer tests/test_launch_types.sh tests/test_parity.sh \
	    tests/test_mixed_precision.sh tests/test_programs.sh tests/test_cost_model.sh tests/test_distributed.py tests/test_files.py tests/test_hf.sh \
	    tests/test_inlining.sh tests/check_style.py

# The tests again with the GPU build's launch shapes under the emulator (32 threads per row,
# 256-thread element blocks, the GPU's grids), so the kernels' GPU configuration runs in CI too.
test-gpu-shapes: $(TESTS) $(PROGRAMS) $(PRECISION_PROGRAMS) bench/bench_gpt
	@TRICYCLE_LAUNCH_SHAPES=gpu bash tests/run_tests.sh test_gradients tests/test_emulator \
	    tests/test_parity.sh tests/test_mixed_precision.sh tests/test_programs.sh

clean:
	rm -rf build $(PROGRAMS) $(TESTS) bench/emulator bench/bench_gpt

# ----------------------------------------------------------------------------------------------------
# Data. The corpus is never committed: data/tinyshakespeare.txt is copied from DATA=path when given
# (for any target, the README's recipes included), else downloaded with curl, and only when missing.

SHAKESPEARE_URL := https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
SHAKESPEARE := data/tinyshakespeare.txt

$(SHAKESPEARE):
	@mkdir -p data
	@if [ -n "$(DATA)" ] && [ "$(DATA)" != "$@" ]; then \
	  [ -f "$(DATA)" ] || { echo "error: DATA=$(DATA): no such file (the tinyshakespeare text expected)"; exit 1; }; \
	  echo "copying $(DATA) to $@"; cp "$(DATA)" $@.tmp && mv $@.tmp $@; \
	else \
	  echo "downloading tinyshakespeare from $(SHAKESPEARE_URL)"; \
	  curl -fsSL --retry 2 -o $@.tmp $(SHAKESPEARE_URL) && mv $@.tmp $@ || { rm -f $@.tmp; \
	    echo "error: could not download tinyshakespeare (no network?). Download $(SHAKESPEARE_URL)"; \
	    echo "       by hand to $@, or pass DATA=/path/to/tinyshakespeare.txt"; exit 1; }; \
	fi

# A ~30 MB corpus of Python code that needs no download: the .py files of the local Python standard
# library (site-packages left out), joined with end-of-text tokens between files.
PYTHON_STDLIB = $(shell python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
data/python_corpus.txt: | tokenizer
	@mkdir -p data
	./tokenizer corpus --dir $(PYTHON_STDLIB) --skip-dir site-packages --output $@

# ----------------------------------------------------------------------------------------------------
# make train: corpus -> BPE tokenizer -> token files -> train_gpt -> a sample from the best checkpoint.
# PRESET=debug|mini|shakespeare|smol, STEPS=N, OUT=dir, TRAIN_FLAGS="--resume ...", VOCAB=N.
# RANKS=N trains on N processes of this machine (mpirun, an MPI build; --grad-accum must be a
# multiple of N); as root, OpenMPI's allow-run-as-root variables are set here.
# On a CPU the default is mini (minutes on two cores), on a GPU shakespeare. Shakespeare presets use
# tinyshakespeare (vocab 1024), smol the Python corpus (vocab 8192). The tokenizer and token files
# are named by their vocabulary, so changing VOCAB makes new ones.

ifeq ($(BACKEND),gpu)
  PRESET ?= shakespeare
else
  PRESET ?= mini
endif
ifeq ($(PRESET),smol)
  DATASET := python
  CORPUS := data/python_corpus.txt
  VOCAB ?= 8192
else
  DATASET := shakespeare
  CORPUS := $(SHAKESPEARE)
  VOCAB ?= 1024
endif
OUT ?= out/$(PRESET)
ROOT_MPI := $(if $(filter 0,$(shell id -u)),OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 )
LAUNCH := $(if $(RANKS),$(ROOT_MPI)mpirun -np $(RANKS) )
TOKENS := data/$(DATASET)_$(VOCAB)

$(TOKENS).tok: | $(CORPUS) tokenizer
	./tokenizer train --input $(CORPUS) --vocab-size $(VOCAB) --output $@

$(TOKENS)_train.bin: $(TOKENS).tok
	./tokenizer encode --tokenizer $< --input $(CORPUS) --output $(TOKENS)

# The corpus first (a missing download fails before anything is built), then the programs.
train: $(if $(filter smol,$(PRESET)),,$(SHAKESPEARE))
	@echo "== make train: the $(PRESET) preset on $(DATASET) (BPE vocab $(VOCAB)), checkpoints in $(OUT)"
	@echo "   $(PRESET_NOTE_$(PRESET))"
	@$(MAKE) --no-print-directory train_gpt inference tokenizer
	@$(MAKE) --no-print-directory $(TOKENS)_train.bin
	$(LAUNCH)./train_gpt --preset $(PRESET) --train $(TOKENS)_train.bin --val $(TOKENS)_val.bin \
	    --tokenizer $(TOKENS).tok --out $(OUT) $(if $(STEPS),--steps $(STEPS)) $(TRAIN_FLAGS)
	./inference $(OUT)/best.bin --prompt "$(if $(filter smol,$(PRESET)),def ,ROMEO:)" --tokens 300

PRESET_NOTE_mini := 4 layers, dim 128, context 128, 1500 steps: 1.5 to 4 minutes on two CPU cores (faster with AVX512-BF16). \
  The full model: make train PRESET=shakespeare (hours on a CPU, minutes on a GPU).
PRESET_NOTE_shakespeare := 6 layers, dim 384, context 256, 5000 steps of 64 sequences: minutes on a \
  GPU, many hours on a CPU (train_gpt prints its estimate after 3 steps). Continue a run: \
  make train TRAIN_FLAGS=--resume
PRESET_NOTE_smol := 12 layers, dim 768, context 1024, 10000 steps of 512 sequences: a multi-day \
  GPU job. Continue a run: make train PRESET=smol TRAIN_FLAGS=--resume
PRESET_NOTE_debug := 2 layers, dim 32: a quick check that everything runs.

# ----------------------------------------------------------------------------------------------------
# Benchmarks (not tests): each prints its figures.

# Tricycle against PyTorch on nanoGPT's CPU recipe, the step against its product floor and the
# product peak in both precisions, a per-kernel profile, the GPT-2 124M shape, and the GPU kernels'
# registers and spills. BENCH_STEPS=N shortens the recipe. On a GPU build: tokens/s,
# MFU and per-kernel times on the GPU for the GPT-2 124M shape and the shakespeare preset.
bench: $(SHAKESPEARE) train_gpt tokenizer bench/bench_gpt $(PRECISION_PROGRAMS)
	BUILD=$(BUILD) DATA=$(SHAKESPEARE) bash bench/run_bench.sh

kernel-report:
	bash bench/kernel_report.sh $(CUDA_ARCH)

bench-emulator: bench/emulator
	./bench/emulator

bench-tokenizer: tokenizer $(SHAKESPEARE) data/python_corpus.txt
	./tokenizer train --input $(SHAKESPEARE) --vocab-size 1024 --output data/shakespeare_1024.tok
	./tokenizer encode --tokenizer data/shakespeare_1024.tok --input $(SHAKESPEARE) --output data/shakespeare_1024
	./tokenizer train --input data/python_corpus.txt --vocab-size 8192 --output data/python_8192.tok
	./tokenizer encode --tokenizer data/python_8192.tok --input data/python_corpus.txt --output data/python_8192
