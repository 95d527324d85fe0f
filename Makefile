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

# sm_80 (A100) and sm_90 (H100) by default.
CUDA_ARCH ?= 80 90
NVCC ?= $(shell command -v nvcc || echo /usr/local/cuda/bin/nvcc)
CXX ?= g++

ifeq ($(BUILD),gpu)
  COMPILE := $(NVCC) -std=c++17 -O3 -x cu $(foreach a,$(CUDA_ARCH),-gencode arch=compute_$(a),code=sm_$(a)) \
             -Xcompiler -Wall,-Wextra -Werror all-warnings
  LINKER := $(NVCC)
  LIBS := -lcublas
else
  OPT := -O3 -march=native
  ifeq ($(BUILD),cpu-sanitize)
    OPT := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
  endif
  COMPILE := $(CXX) -std=c++17 $(OPT) -fopenmp -Wall -Wextra -x c++
  LINKER := $(CXX) $(OPT) -fopenmp -rdynamic
  LIBS := -lopenblas -lboost_context
endif

OBJ := build/$(BUILD)
HEADERS := tricycle.h cuda_cpu.h
PROGRAMS := train_gpt inference
TESTS := test_gradients

.PHONY: all test clean
all: $(PROGRAMS) $(TESTS)

# Binaries go to the repository root whatever the build; this stamp relinks them when it changes.
STAMP := build/.selected-$(BUILD)
$(STAMP):
	@mkdir -p build && rm -f build/.selected-* && touch $@

$(OBJ)/%.o: %.cu $(HEADERS) tests/check.h
	@mkdir -p $(dir $@)
	$(COMPILE) -I. -c $< -o $@

# The gradient-check build: everything in double precision.
$(OBJ)/double/%.o: %.cu $(HEADERS) tests/check.h
	@mkdir -p $(dir $@)
	$(COMPILE) -DTRICYCLE_DOUBLE -I. -c $< -o $@

$(PROGRAMS): %: $(OBJ)/%.o $(OBJ)/tricycle.o $(STAMP)
	$(LINKER) $(OBJ)/$*.o $(OBJ)/tricycle.o -o $@ $(LIBS)

test_gradients: $(OBJ)/double/test_gradients.o $(OBJ)/double/tricycle.o $(STAMP)
	$(LINKER) $(filter %.o,$^) -o $@ $(LIBS)

test: $(TESTS)
	@bash tests/run_tests.sh $(TESTS)

clean:
	rm -rf build $(PROGRAMS) $(TESTS)
