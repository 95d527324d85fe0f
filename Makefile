# Tricycle — build with `make`, test with `make test`, train with `make train`.
#
# The GPU build (nvcc + cuBLAS) is chosen when `nvidia-smi -L` finds a GPU, the CPU build (g++ +
# the kernel emulator + OpenBLAS) otherwise. Force one with `make GPU=1` or `make CPU=1`.
# `make test SANITIZE=1` builds the CPU tests with AddressSanitizer and UBSan.

ifeq ($(GPU),1)
  BUILD := gpu
else ifeq ($(CPU),1)
  BUILD := cpu
else
  BUILD := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
endif
ifeq ($(SANITIZE),1)
  ifeq ($(BUILD),gpu)
    $(error SANITIZE=1 is for the CPU build)
  endif
  BUILD := cpu-sanitize
endif
# BF16=1: mixed precision, every tensor stored in bfloat16 (see tricycle.h).
ifeq ($(BF16),1)
  BUILD := $(BUILD)-bf16
  PRECISION := -DTRICYCLE_BF16
endif

# sm_80 (A100) and sm_90 (H100) by default.
CUDA_ARCH ?= 80 90
NVCC ?= $(shell command -v nvcc || echo /usr/local/cuda/bin/nvcc)
CXX ?= g++

ifneq ($(filter gpu%,$(BUILD)),)
  COMPILE := $(NVCC) -std=c++20 -O3 -x cu $(foreach a,$(CUDA_ARCH),-gencode arch=compute_$(a),code=sm_$(a)) \
             -Xcompiler -Wall,-Wextra -Werror all-warnings
  LINKER := $(NVCC)
  LIBS := -lcublas
else
  OPT := -O3 -march=native -fno-math-errno -fno-trapping-math
  ifeq ($(BUILD),cpu-sanitize)
    OPT := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
  endif
  COMPILE := $(CXX) -std=c++20 $(OPT) -fopenmp -Wall -Wextra -x c++
  LINKER := $(CXX) $(OPT) -fopenmp -rdynamic
  LIBS := -ldnnl -lopenblas -lboost_context
endif

OBJ := build/$(BUILD)
HEADERS := tricycle.h cuda_cpu.h
PROGRAMS := train_gpt inference tokenizer
TESTS := test_gradients tests/test_tokenizer

.PHONY: all test test-bf16 clean train bench kernel-report bench-emulator bench-tokenizer
all: $(PROGRAMS) $(TESTS)

# Binaries go to the repository root whatever the build; this stamp relinks them when it changes.
STAMP := build/.selected-$(BUILD)
$(STAMP):
	@mkdir -p build && rm -f build/.selected-* && touch $@

$(OBJ)/%.o: %.cu $(HEADERS) tests/check.h Makefile
	@mkdir -p $(dir $@)
	$(COMPILE) $(PRECISION) -I. -c $< -o $@

# The gradient-check build: everything in double precision.
$(OBJ)/double/%.o: %.cu $(HEADERS) tests/check.h Makefile
	@mkdir -p $(dir $@)
	$(COMPILE) -DTRICYCLE_DOUBLE -I. -c $< -o $@

# The mixed-precision test's bfloat16 half.
$(OBJ)/bf16/%.o: %.cu $(HEADERS) tests/check.h Makefile
	@mkdir -p $(dir $@)
	$(COMPILE) -DTRICYCLE_BF16 -I. -c $< -o $@

$(PROGRAMS): %: $(OBJ)/%.o $(OBJ)/tricycle.o $(STAMP)
	$(LINKER) $(OBJ)/$*.o $(OBJ)/tricycle.o -o $@ $(LIBS)

test_gradients: $(OBJ)/double/test_gradients.o $(OBJ)/double/tricycle.o $(STAMP)
	$(LINKER) $(filter %.o,$^) -o $@ $(LIBS)

tests/test_tokenizer tests/gpt_parity: %: $(OBJ)/%.o $(OBJ)/tricycle.o $(STAMP)
	$(LINKER) $(filter %.o,$^) -o $@ $(LIBS)

tests/mixed_precision_fp32: $(OBJ)/tests/mixed_precision.o $(OBJ)/tricycle.o $(STAMP)
	$(LINKER) $(filter %.o,$^) -o $@ $(LIBS)

tests/mixed_precision_bf16: $(OBJ)/bf16/tests/mixed_precision.o $(OBJ)/bf16/tricycle.o $(STAMP)
	$(LINKER) $(filter %.o,$^) -o $@ $(LIBS)

test: $(TESTS) tests/gpt_parity tests/mixed_precision_fp32 tests/mixed_precision_bf16 $(PROGRAMS)
	@bash tests/run_tests.sh $(TESTS) tests/test_launch_types.sh tests/test_parity.sh tests/test_mixed_precision.sh tests/test_programs.sh

# The programs' end-to-end tests again, with the programs built in mixed precision.
test-bf16:
	$(MAKE) BF16=1 $(PROGRAMS)
	@bash tests/run_tests.sh tests/test_programs.sh

clean:
	rm -rf build $(PROGRAMS) $(TESTS) tests/gpt_parity tests/mixed_precision_fp32 tests/mixed_precision_bf16 bench/emulator bench/bench_gpt

# ----------------------------------------------------------------------------------------------------
# Data. The corpus is downloaded, never committed. DATA=path uses a copy you already have.

SHAKESPEARE_URL := https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
DATA ?= data/tinyshakespeare.txt

data/tinyshakespeare.txt:
	@mkdir -p data
	@echo "downloading tinyshakespeare from $(SHAKESPEARE_URL)"
	@curl -fsSL --retry 2 -o $@.tmp $(SHAKESPEARE_URL) && mv $@.tmp $@ || { rm -f $@.tmp; \
	  echo "error: could not download tinyshakespeare (no network?). Download $(SHAKESPEARE_URL)"; \
	  echo "       by hand to data/tinyshakespeare.txt, or pass DATA=/path/to/tinyshakespeare.txt"; exit 1; }

# A ~30 MB corpus of Python code that needs no download: the .py files of the local Python standard
# library (site-packages left out), joined with end-of-text tokens between files.
PYTHON_STDLIB = $(shell python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
data/python_corpus.txt: | tokenizer
	@mkdir -p data
	./tokenizer corpus --dir $(PYTHON_STDLIB) --skip-dir site-packages --output $@

# ----------------------------------------------------------------------------------------------------
# make train: corpus -> BPE tokenizer -> token files -> train_gpt -> a sample from the best checkpoint.
# PRESET=debug|shakespeare|smol, STEPS=N, OUT=dir, TRAIN_FLAGS="--batch 16 ...", VOCAB=N override.
# shakespeare and debug train on tinyshakespeare (vocab 1024); smol on the Python corpus (vocab 8192).

PRESET ?= shakespeare
ifeq ($(PRESET),smol)
  DATASET := python
  CORPUS := data/python_corpus.txt
  VOCAB ?= 8192
else
  DATASET := shakespeare
  CORPUS := $(DATA)
  VOCAB ?= 1024
endif
OUT ?= out/$(PRESET)

data/$(DATASET).tok: $(CORPUS) | tokenizer
	./tokenizer train --input $(CORPUS) --vocab-size $(VOCAB) --output $@

data/$(DATASET)_train.bin: data/$(DATASET).tok
	./tokenizer encode --tokenizer $< --input $(CORPUS) --output data/$(DATASET)

train: train_gpt inference data/$(DATASET)_train.bin
	./train_gpt --preset $(PRESET) --train data/$(DATASET)_train.bin --val data/$(DATASET)_val.bin \
	    --tokenizer data/$(DATASET).tok --out $(OUT) $(if $(STEPS),--steps $(STEPS)) $(TRAIN_FLAGS)
	./inference $(OUT)/best.bin --prompt "$(if $(filter smol,$(PRESET)),def ,ROMEO:)" --tokens 300

# ----------------------------------------------------------------------------------------------------
# Benchmarks (not tests): each prints its figures.

bench/emulator bench/bench_gpt: %: $(OBJ)/%.o $(OBJ)/tricycle.o $(STAMP)
	$(LINKER) $(filter %.o,$^) -o $@ $(LIBS)

# Tricycle against PyTorch on nanoGPT's CPU recipe, a per-kernel profile, the GPT-2 124M shape, and
# the GPU kernels' registers and spills. BENCH_STEPS=N shortens the recipe. On a GPU build: tokens/s,
# MFU and per-kernel times on the GPU for the GPT-2 124M shape and the shakespeare preset.
bench: train_gpt tokenizer bench/bench_gpt $(DATA)
	BUILD=$(BUILD) DATA=$(DATA) bash bench/run_bench.sh

kernel-report:
	bash bench/kernel_report.sh $(CUDA_ARCH)

bench-emulator: bench/emulator
	./bench/emulator

bench-tokenizer: tokenizer $(DATA) data/python_corpus.txt
	./tokenizer train --input $(DATA) --vocab-size 1024 --output data/shakespeare.tok
	./tokenizer encode --tokenizer data/shakespeare.tok --input $(DATA) --output data/shakespeare
	./tokenizer train --input data/python_corpus.txt --vocab-size 8192 --output data/python.tok
	./tokenizer encode --tokenizer data/python.tok --input data/python_corpus.txt --output data/python
