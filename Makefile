# llama3.c: `make` builds ./run, ./runomp and ./tokenize; `make test` runs every test; `make demo`
# runs the whole path (random checkpoint -> export -> generate) with nothing downloaded;
# `make bench` and `make bench-8b` measure speed.

CC ?= cc
CFLAGS ?= -O3 -march=native
WARN = -std=c11 -Wall -Wextra
# Debian's numpy installs for /usr/bin/python3; prefer it over any other python3 on PATH.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)

.PHONY: all test test-arm demo bench bench-8b clean test-valgrind

all: run runomp tokenize

# portable: one thread, no OpenMP
run: run.c tokenizer.c tokenizer.h
	$(CC) $(WARN) $(CFLAGS) -o $@ run.c tokenizer.c -lm

# the same program, matmuls and attention heads split over threads (OMP_NUM_THREADS or -T)
runomp: run.c tokenizer.c tokenizer.h
	$(CC) $(WARN) $(CFLAGS) -fopenmp -o $@ run.c tokenizer.c -lm

# text <-> token ids on the command line (see tokenizer.c)
tokenize: tokenizer.c tokenizer.h
	$(CC) $(WARN) $(CFLAGS) -DTOKENIZER_MAIN -o $@ tokenizer.c

test: run runomp tokenize
	$(PYTHON) tests/run_tests.py

# The ARM NEON kernels (run.c section 8c, AArch64) on any host: cross-compiled for armv8-a and
# armv8.2-a+dotprod, run under qemu-aarch64 (kernel checks, then greedy runs against this
# host's portable build). Debian: gcc-aarch64-linux-gnu qemu-user libgomp1-arm64-cross.
test-arm:
	$(PYTHON) tests/check_arm.py

# A small random Llama 3 checkpoint with the real 128K tokenizer, exported and run end to end.
demo: runomp build/demo.bin
	./runomp build/demo.bin -i "The capital of France is" -n 32 -s 42

build/demo.bin: export.py tests/make_checkpoint.py
	$(PYTHON) tests/make_checkpoint.py build/demo-hf --preset demo
	$(PYTHON) export.py build/demo.bin --hf build/demo-hf --dtype bf16

# valgrind memcheck on a short generation and a short chat session (a portable -O1 build:
# valgrind does not know every AVX-512 instruction).
VALGRIND = valgrind -q --leak-check=full --errors-for-leak-kinds=definite,indirect --error-exitcode=9
test-valgrind: build/demo.bin
	mkdir -p build/valgrind
	$(CC) $(WARN) -O1 -g -o build/valgrind/run run.c tokenizer.c -lm
	$(VALGRIND) build/valgrind/run build/demo.bin -i "Hello world" -n 4 -t 0.8 -s 3 >/dev/null
	printf 'Hi there\nSecond <|eot_id|> turn\n' | \
	    $(VALGRIND) build/valgrind/run build/demo.bin -m chat -y "Be brief." -n 3 -t 0 >/dev/null
	@echo "valgrind: generation and chat clean"

bench: runomp tokenize
	$(PYTHON) tests/bench/bench_tokenizer.py
	$(PYTHON) tests/bench/bench.py --long 16384 --long-types q8_0:fast --long-cache-types f32,bf16,q8_0

# Llama-3.1-8B shape: ~16 GB checkpoint + one export per type that fits on the disk, under
# build/bench8b/ (BENCH8B_FLAGS: e.g. --types q8_0 --rounds 1). Both benches run llama.cpp's
# llama-bench side by side when LLAMA_CPP_DIR names a llama.cpp build.
bench-8b: runomp
	$(PYTHON) tests/bench/bench_8b.py $(BENCH8B_FLAGS)

clean:
	rm -rf run runomp tokenize build

# ---- Hostile input: the whole suite under AddressSanitizer + UndefinedBehaviorSanitizer,
# and libFuzzer targets for the model loader and the tokenizer (clang; Debian: clang libclang-rt-14-dev).
SAN_CC ?= $(shell command -v clang >/dev/null 2>&1 && echo clang || echo $(CC))
# -march=native: the sanitizers watch the AVX-512 kernels (masked loads, -a fast); valgrind and
# the fuzzers run the portable ones.
SAN_FLAGS = -g -O1 -march=native -fno-omit-frame-pointer -fsanitize=address,undefined \
            -fno-sanitize-recover=all
SAN_DIR = build/sanitize
FUZZ_DIR = build/fuzz
FUZZ_SECONDS ?= 45
FUZZ_FLAGS = -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all

.PHONY: test-sanitize fuzz fuzz-build

$(SAN_DIR)/run: run.c tokenizer.c tokenizer.h
	mkdir -p $(SAN_DIR)
	$(SAN_CC) $(WARN) $(SAN_FLAGS) -o $@ run.c tokenizer.c -lm
$(SAN_DIR)/runomp: run.c tokenizer.c tokenizer.h
	mkdir -p $(SAN_DIR)
	$(SAN_CC) $(WARN) $(SAN_FLAGS) -o $@ run.c tokenizer.c -lm
$(SAN_DIR)/tokenize: tokenizer.c tokenizer.h
	mkdir -p $(SAN_DIR)
	$(SAN_CC) $(WARN) $(SAN_FLAGS) -DTOKENIZER_MAIN -o $@ tokenizer.c

# runomp is built without OpenMP here: ASan cannot see into libgomp's threads reliably.
test-sanitize: $(SAN_DIR)/run $(SAN_DIR)/runomp $(SAN_DIR)/tokenize
	LLAMA3C_BIN_DIR=$(SAN_DIR) ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:allocator_may_return_null=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 $(PYTHON) tests/run_tests.py

$(FUZZ_DIR)/fuzz_model: tests/fuzz/fuzz_model.c run.c tokenizer.c tokenizer.h
	mkdir -p $(FUZZ_DIR)
	clang $(FUZZ_FLAGS) -o $@ tests/fuzz/fuzz_model.c tokenizer.c -lm
$(FUZZ_DIR)/fuzz_tokenizer: tests/fuzz/fuzz_tokenizer.c tokenizer.c tokenizer.h
	mkdir -p $(FUZZ_DIR)
	clang $(FUZZ_FLAGS) -o $@ tests/fuzz/fuzz_tokenizer.c tokenizer.c
$(FUZZ_DIR)/fuzz_sampler: tests/fuzz/fuzz_sampler.c run.c tokenizer.c tokenizer.h
	mkdir -p $(FUZZ_DIR)
	clang $(FUZZ_FLAGS) -o $@ tests/fuzz/fuzz_sampler.c tokenizer.c -lm
fuzz-build: $(FUZZ_DIR)/fuzz_model $(FUZZ_DIR)/fuzz_tokenizer $(FUZZ_DIR)/fuzz_sampler

# Each target for FUZZ_SECONDS from the committed seeds (new finds go to build/fuzz/work-*).
fuzz: fuzz-build
	FUZZ_SECONDS=$(FUZZ_SECONDS) PYTHON=$(PYTHON) tests/fuzz/run_fuzz.sh
