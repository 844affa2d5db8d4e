# llama3.c: `make` builds ./run; `make test` runs every test; `make demo` runs the whole path
# (random checkpoint -> export -> generate) with nothing downloaded; `make bench` measures speed.

CC ?= cc
CFLAGS ?= -O3 -march=native
WARN = -std=c11 -Wall -Wextra
# Debian's numpy installs for /usr/bin/python3; prefer it over any other python3 on PATH.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)

.PHONY: all test demo bench clean

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

# A small random Llama 3 checkpoint with the real 128K tokenizer, exported and run end to end.
demo: runomp
	$(PYTHON) tests/make_checkpoint.py build/demo-hf --preset full-vocab
	$(PYTHON) export.py build/demo.bin --hf build/demo-hf --dtype bf16
	./runomp build/demo.bin -i "The capital of France is" -n 32 -s 42

bench: runomp tokenize
	$(PYTHON) tests/bench_tokenizer.py

clean:
	rm -rf run runomp tokenize build
