# tide.cpp: build the native library, set up the Python environment, run the demo and the tests.
#   make            build tide_cpp/libtide.so (CUDA backend too when nvcc is found; CUDA=0 to skip)
#   make setup      .venv with the package (editable) and the test dependencies
#   make run        set up, then ask the bundled demo model a question
#   make test       set up, build, run the native tests and the pytest suite
#   make sanitize   native tests under AddressSanitizer + UndefinedBehaviorSanitizer
#   make fuzz       libFuzzer target for the GGUF reader (clang), FUZZ_SECONDS=600

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

C_SRCS  := $(wildcard native/src/*.c native/src/moe/*.c native/src/backend/cpu/*.c native/src/backend/sim/*.c)
C_OBJS  := $(patsubst native/src/%.c,$(BUILD)/%.o,$(C_SRCS))
CU_SRCS := $(wildcard native/src/backend/cuda/*.cu)
CU_OBJS := $(patsubst native/src/%.cu,$(BUILD)/%.o,$(CU_SRCS))
HDRS    := $(wildcard native/include/*.h native/src/*.h native/src/moe/*.h native/src/backend/*.h native/src/backend/cpu/*.h native/src/backend/cuda/*.cuh)

# Hopper first, then the common datacenter and consumer parts, PTX of the newest for the rest.
CUDA_ARCHS ?= -gencode arch=compute_90,code=sm_90 -gencode arch=compute_80,code=sm_80 \
              -gencode arch=compute_86,code=sm_86 -gencode arch=compute_89,code=sm_89 \
              -gencode arch=compute_120,code=sm_120 -gencode arch=compute_90,code=compute_90
NVCCFLAGS ?= -O3 -std=c++17 -Xcompiler -fPIC,-fvisibility=hidden -Inative/include -Inative/src \
             --expt-relaxed-constexpr $(CUDA_ARCHS)

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

.PHONY: all lib setup run test test-native sanitize fuzz bench clean

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

test-native: $(NATIVE_TESTS)
	@for t in $(NATIVE_TESTS); do echo "== $$t"; $$t || exit 1; done

test: setup test-native
	$(VPY) -m pytest -q tests

SAN_FLAGS := -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
sanitize: $(VENV)/.done
	@mkdir -p $(BUILD)/san
	@for t in $(wildcard native/tests/test_*.c); do \
	  n=$$(basename $$t .c); \
	  echo "== sanitize $$n"; \
	  $(CC) -std=c11 -pthread -D_GNU_SOURCE -Inative/include -Inative/src $(SAN_FLAGS) -o $(BUILD)/san/$$n $$t $(C_SRCS) -lm || exit 1; \
	  PATH=$(VENV)/bin:$$PATH TIDE_PYTHON=$(abspath $(VPY)) $(BUILD)/san/$$n || exit 1; \
	done

FUZZ_SECONDS ?= 600
fuzz:
	@mkdir -p $(BUILD)/fuzz/corpus
	clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -Inative/include -Inative/src \
	    -o $(BUILD)/fuzz/fuzz_gguf native/fuzz/fuzz_gguf.c native/src/gguf.c native/src/common.c -lm
	$(BUILD)/fuzz/fuzz_gguf -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 $(BUILD)/fuzz/corpus native/fuzz/seeds

clean:
	rm -rf $(BUILD_ROOT) $(LIB)
