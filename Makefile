# tide.cpp: build the native library, set up the Python environment, run the demo and the tests.
#   make            build tide_cpp/libtide.so (CUDA backend too when nvcc is found; CUDA=0 to skip)
#   make setup      .venv with the package (editable) and the test dependencies
#   make run        set up, then ask the bundled demo model a question
#   make test       set up, build, run the native tests and the pytest suite
#   make sanitize   native tests under AddressSanitizer + UndefinedBehaviorSanitizer
#   make fuzz       libFuzzer target for the GGUF reader (clang), FUZZ_SECONDS=600

SHELL   := /bin/bash
PYTHON  ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
BUILD_ROOT := build
NVCC    ?= $(shell command -v nvcc 2>/dev/null)
CUDA    ?= $(if $(NVCC),1,0)
# objects of the CUDA and CPU-only builds apart, so switching CUDA= never mixes them
BUILD   := $(BUILD_ROOT)/$(if $(filter 1,$(CUDA)),cuda-on,cuda-off)
# nvcc may be a wrapper script (e.g. /usr/local/bin/nvcc): ask it where its toolkit is.
CUDA_HOME ?= $(realpath $(firstword $(if $(NVCC),$(shell $(NVCC) --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^\#\$$ TOP=//p')) $(patsubst %/bin/nvcc,%,$(realpath $(NVCC)))))
LIB     := tide_cpp/libtide.so

CC      ?= cc
CFLAGS  ?= -O3 -g
CFLAGS  += -std=c11 -fPIC -Wall -Wextra -Wno-unused-parameter -pthread -D_GNU_SOURCE \
           -fvisibility=hidden -Inative/include -Inative/src
LDLIBS  := -lm -lpthread
# Builds that the test targets start themselves run this many jobs at once (the tests then run
# one at a time): on a two-core CI machine the compiles were most of the time.
NPROC   := $(shell nproc 2>/dev/null || echo 1)

C_SRCS  := $(wildcard native/src/*.c native/src/moe/*.c native/src/backend/cpu/*.c native/src/backend/sim/*.c)
C_OBJS  := $(patsubst native/src/%.c,$(BUILD)/%.o,$(C_SRCS))
CU_SRCS := $(wildcard native/src/backend/cuda/*.cu)
CU_OBJS := $(patsubst native/src/%.cu,$(BUILD)/%.o,$(CU_SRCS))
HDRS    := $(wildcard native/include/*.h native/src/*.h native/src/moe/*.h native/src/backend/*.h native/src/backend/cpu/*.h native/src/backend/cuda/*.cuh)

# Hopper first, then the common datacenter and consumer parts, PTX of the newest for the rest.
CUDA_ARCHS ?= -gencode arch=compute_90,code=sm_90 -gencode arch=compute_80,code=sm_80 \
              -gencode arch=compute_86,code=sm_86 -gencode arch=compute_89,code=sm_89 \
              -gencode arch=compute_120,code=sm_120 -gencode arch=compute_90,code=compute_90
# --threads 0: nvcc compiles the architectures of one file in parallel (the CUDA build is most of
# a clean build's time, and one file, experts.cu, is most of that)
NVCCFLAGS ?= -O3 -std=c++17 -Xcompiler -fPIC,-fvisibility=hidden -Inative/include -Inative/src \
             --expt-relaxed-constexpr --threads 0 $(CUDA_ARCHS)

# The native tests link the C sources alone (no CUDA objects), so they keep the base flags.
TEST_CFLAGS := $(CFLAGS)
TEST_LDLIBS := $(LDLIBS)
ifeq ($(CUDA),1)
  CFLAGS += -DTIDE_CUDA=1
  LINK_OBJS := $(C_OBJS) $(CU_OBJS)
  # cudart is linked statically: the library loads on machines without the CUDA runtime and
  # reports "no GPU" there instead of failing to load.
  LDLIBS += -L$(CUDA_HOME)/lib64 -L$(CUDA_HOME)/lib -L$(CUDA_HOME)/targets/$(shell uname -m)-linux/lib \
            -lcudart_static -ldl -lrt -lstdc++
else
  LINK_OBJS := $(C_OBJS)
endif

.PHONY: all lib setup run test test-bins test-native san-bins sanitize fuzz bench clean

all: lib
lib: $(LIB)

# Linked beside and renamed, so a process that has the library loaded never sees it half-written.
# A stamp per configuration: switching CUDA= relinks even when every object is older.
LIB_CONFIG := $(BUILD_ROOT)/lib-config-cuda$(CUDA)
$(LIB_CONFIG):
	@mkdir -p $(BUILD_ROOT) && rm -f $(BUILD_ROOT)/lib-config-* && touch $@

$(LIB): $(LINK_OBJS) $(LIB_CONFIG)
	$(CC) -shared -o $@.tmp $(LINK_OBJS) $(LDLIBS)
	mv -f $@.tmp $@

$(BUILD)/%.o: native/src/%.c $(HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/%.o: native/src/%.cu $(HDRS)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@

# ---- Python environment -------------------------------------------------------------------
$(VENV)/.done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.done lib

# ---- the demo and the tests ---------------------------------------------------------------
DEMO_MODEL  ?= models/tide-demo.gguf
DEMO_PROMPT ?= What is 37 plus 48?
# The best device present: the GPU when one is usable, else the simulated device, so the expert
# traffic of the tide policy is visible on any machine (cpu would show no residency at all).
run: setup
	@dev=$$($(VPY) -c "from tide_cpp import _lib; print('cuda' if _lib.cuda_available()[0] else 'sim')"); \
	echo "tide.cpp demo: $(DEMO_MODEL) on device '$$dev', policy tide, 4 experts per layer resident"; \
	echo ">>> $(DEMO_PROMPT)"; \
	$(VENV)/bin/tide-cli generate -m $(DEMO_MODEL) --chat -p "$(DEMO_PROMPT)" \
	    --device $$dev --policy tide --gpu-experts 4 --refresh-interval 4 --max-tokens 64

NATIVE_TESTS := $(patsubst native/tests/%.c,$(BUILD)/tests/%,$(wildcard native/tests/test_*.c))
$(BUILD)/tests/%: native/tests/%.c native/tests/check.h $(C_SRCS) $(HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(TEST_CFLAGS) -o $@ $< $(C_SRCS) $(TEST_LDLIBS)

# The backend-ops test (native/tests/test_backend_ops.cu, C++): every op of a backend against a
# double-precision host reference. Built over the C backends (cpu, sim), over the CUDA sources
# on the CPU emulator (native/tests/emu), and with nvcc for a real GPU when CUDA=1.
CXX      ?= c++
OPS_TEST := native/tests/test_backend_ops.cu
HOST_BACKEND_SRCS := native/src/common.c native/src/threadpool.c \
                     $(wildcard native/src/backend/cpu/*.c native/src/backend/sim/*.c)
HOST_BACKEND_OBJS = $(patsubst native/src/%.c,$(BUILD)/ops-test/%.o,$(HOST_BACKEND_SRCS))
OPS_CXXFLAGS := -O2 -g -std=c++17 -pthread -D_GNU_SOURCE -Inative/include -Inative/src
$(BUILD)/ops-test/%.o: native/src/%.c $(HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(TEST_CFLAGS) -c $< -o $@
$(BUILD)/tests/test_backend_ops: $(OPS_TEST) native/tests/check.h $(HOST_BACKEND_OBJS) $(HDRS)
	@mkdir -p $(dir $@)
	$(CXX) $(OPS_CXXFLAGS) -x c++ $(OPS_TEST) -x none $(HOST_BACKEND_OBJS) -lm -o $@
$(BUILD)/tests/test_backend_ops_emu: $(OPS_TEST) native/tests/check.h $(CU_SRCS) $(HOST_BACKEND_OBJS) $(HDRS) native/tests/emu/emu_cuda.h
	@mkdir -p $(dir $@)
	$(CXX) $(OPS_CXXFLAGS) -O1 -w -DTIDE_CUDA_EMU -DTIDE_CUDA=1 -Inative/tests/emu \
	    -x c++ $(OPS_TEST) $(CU_SRCS) -x none $(HOST_BACKEND_OBJS) -lm -o $@
$(BUILD)/tests/test_backend_ops_cuda: $(OPS_TEST) native/tests/check.h $(CU_OBJS) $(HOST_BACKEND_OBJS) $(HDRS)
	@mkdir -p $(dir $@)
	$(NVCC) -O2 -std=c++17 -DTIDE_CUDA=1 -Inative/include -Inative/src --threads 0 $(CUDA_ARCHS) \
	    -x cu -c $(OPS_TEST) -o $@.o
	$(NVCC) $(CUDA_ARCHS) $@.o $(CU_OBJS) $(HOST_BACKEND_OBJS) -o $@

OPS_TESTS := $(BUILD)/tests/test_backend_ops $(BUILD)/tests/test_backend_ops_emu \
             $(if $(filter 1,$(CUDA)),$(BUILD)/tests/test_backend_ops_cuda)

test-bins:
	@$(MAKE) --no-print-directory -j$(NPROC) $(NATIVE_TESTS) $(OPS_TESTS)

# Exit 77 is a skip (no GPU here): the test prints why, make goes on.
test-native: test-bins
	@for t in $(NATIVE_TESTS); do echo "== $$t"; $$t || exit 1; done
	@echo "== backend ops: cpu"; $(BUILD)/tests/test_backend_ops cpu | tail -1; test $${PIPESTATUS[0]} -eq 0
	@echo "== backend ops: sim"; $(BUILD)/tests/test_backend_ops sim | tail -1; test $${PIPESTATUS[0]} -eq 0
	@echo "== backend ops: cuda kernels on the CPU emulator"; \
	  $(BUILD)/tests/test_backend_ops_emu cuda --quick | tail -1; test $${PIPESTATUS[0]} -eq 0
	@if [ -x $(BUILD)/tests/test_backend_ops_cuda ]; then echo "== backend ops: cuda"; \
	  $(BUILD)/tests/test_backend_ops_cuda cuda | tail -1; rc=$${PIPESTATUS[0]}; \
	  test $$rc -eq 0 -o $$rc -eq 77; fi

test: setup test-native
	$(VPY) -m pytest -q tests

SAN_FLAGS := -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
SAN_CC    = $(CC) -std=c11 -pthread -D_GNU_SOURCE -Inative/include -Inative/src $(SAN_FLAGS)
SAN_TESTS := $(patsubst native/tests/%.c,$(BUILD)/san/%,$(wildcard native/tests/test_*.c))
SAN_OPS_OBJS := $(patsubst native/src/%.c,$(BUILD)/san/ops/%.o,$(HOST_BACKEND_SRCS))
$(BUILD)/san/ops/%.o: native/src/%.c $(HDRS)
	@mkdir -p $(dir $@)
	$(SAN_CC) -c $< -o $@
$(BUILD)/san/test_backend_ops: $(OPS_TEST) native/tests/check.h $(SAN_OPS_OBJS) $(HDRS)
	$(CXX) -std=c++17 -pthread -D_GNU_SOURCE -Inative/include -Inative/src $(SAN_FLAGS) \
	    -x c++ $(OPS_TEST) -x none $(SAN_OPS_OBJS) -lm -o $@
$(BUILD)/san/%: native/tests/%.c native/tests/check.h $(C_SRCS) $(HDRS)
	@mkdir -p $(dir $@)
	$(SAN_CC) -o $@ $< $(C_SRCS) -lm
san-bins:
	@$(MAKE) --no-print-directory -j$(NPROC) $(SAN_TESTS) $(BUILD)/san/test_backend_ops

sanitize: $(VENV)/.done san-bins
	@for t in $(SAN_TESTS); do \
	  echo "== sanitize $$(basename $$t)"; \
	  PATH=$(VENV)/bin:$$PATH TIDE_PYTHON=$(abspath $(VPY)) $$t || exit 1; \
	done
	@echo "== sanitize test_backend_ops (cpu, sim)"; \
	  $(BUILD)/san/test_backend_ops cpu --quick | tail -1 && test $${PIPESTATUS[0]} -eq 0 && \
	  $(BUILD)/san/test_backend_ops sim --quick | tail -1 && test $${PIPESTATUS[0]} -eq 0

FUZZ_SECONDS ?= 600
fuzz:
	@mkdir -p $(BUILD)/fuzz/corpus
	clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -Inative/include -Inative/src \
	    -o $(BUILD)/fuzz/fuzz_gguf native/fuzz/fuzz_gguf.c native/src/gguf.c native/src/common.c -lm
	$(BUILD)/fuzz/fuzz_gguf -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 $(BUILD)/fuzz/corpus native/fuzz/seeds

clean:
	rm -rf $(BUILD_ROOT) $(LIB)
