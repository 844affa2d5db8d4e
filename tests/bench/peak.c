/* peak.c: the arithmetic ceiling of prompt processing, as bandwidth.c is decoding's. It times
   each multiply-add instruction that run.c's prompt kernels are built on, with nothing else to
   wait for: twelve independent accumulators in registers (more than latency x throughput on
   current cores), no memory operands, every thread at once. tests/bench.py compiles it with the
   engine's flags and divides each prompt speed by its instruction's ceiling.

   usage: peak [threads]
   prints one line per instruction the compiler targets: its name, the multiply-adds one
   instruction makes, and G multiply-adds/s for all threads together (the best of 5 passes) */

#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#if defined _OPENMP
#include <omp.h>
#endif
#if defined __AVX512F__
#include <immintrin.h>
#endif

#define STEPS 40000000L  /* per thread and pass: ~0.13 s at one instruction per cycle */

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

#if defined __AVX512F__
/* Each routine runs STEPS x 12 instructions into twelve chains and returns a value that
   depends on all of them. The operands come from a volatile array: given constants, compilers
   merge chains that start equal, turn an FMA with an exact product into an add, or drop
   chains whose sums they can see never change. */
static volatile float seed[14] = {1.1f, 1e-9f, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};

/* strip_kernel and strip_kernel_bf16: vfmadd231ps; with -a fast, strip_kernel_fast: vdpbf16ps */
static float float_dots(int bf16) {
    __m512 x = _mm512_set1_ps(seed[0]), y = _mm512_set1_ps(seed[1]);
    __m512 a0 = _mm512_set1_ps(seed[2]), a1 = _mm512_set1_ps(seed[3]),
           a2 = _mm512_set1_ps(seed[4]), a3 = _mm512_set1_ps(seed[5]),
           a4 = _mm512_set1_ps(seed[6]), a5 = _mm512_set1_ps(seed[7]),
           a6 = _mm512_set1_ps(seed[8]), a7 = _mm512_set1_ps(seed[9]),
           a8 = _mm512_set1_ps(seed[10]), a9 = _mm512_set1_ps(seed[11]),
           a10 = _mm512_set1_ps(seed[12]), a11 = _mm512_set1_ps(seed[13]);
    if (!bf16) {
        for (long i = 0; i < STEPS; i++) {
            a0 = _mm512_fmadd_ps(x, y, a0); a1 = _mm512_fmadd_ps(x, y, a1);
            a2 = _mm512_fmadd_ps(x, y, a2); a3 = _mm512_fmadd_ps(x, y, a3);
            a4 = _mm512_fmadd_ps(x, y, a4); a5 = _mm512_fmadd_ps(x, y, a5);
            a6 = _mm512_fmadd_ps(x, y, a6); a7 = _mm512_fmadd_ps(x, y, a7);
            a8 = _mm512_fmadd_ps(x, y, a8); a9 = _mm512_fmadd_ps(x, y, a9);
            a10 = _mm512_fmadd_ps(x, y, a10); a11 = _mm512_fmadd_ps(x, y, a11);
        }
    }
#if defined __AVX512BF16__
    __m512bh xb = (__m512bh)x, yb = (__m512bh)y;
    if (bf16) {
        for (long i = 0; i < STEPS; i++) {
            a0 = _mm512_dpbf16_ps(a0, xb, yb); a1 = _mm512_dpbf16_ps(a1, xb, yb);
            a2 = _mm512_dpbf16_ps(a2, xb, yb); a3 = _mm512_dpbf16_ps(a3, xb, yb);
            a4 = _mm512_dpbf16_ps(a4, xb, yb); a5 = _mm512_dpbf16_ps(a5, xb, yb);
            a6 = _mm512_dpbf16_ps(a6, xb, yb); a7 = _mm512_dpbf16_ps(a7, xb, yb);
            a8 = _mm512_dpbf16_ps(a8, xb, yb); a9 = _mm512_dpbf16_ps(a9, xb, yb);
            a10 = _mm512_dpbf16_ps(a10, xb, yb); a11 = _mm512_dpbf16_ps(a11, xb, yb);
        }
    }
#endif
    __m512 sum = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                               _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
    sum = _mm512_add_ps(sum, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)));
    return _mm512_reduce_add_ps(sum);
}
#endif

#if defined __AVX512VNNI__
/* strip_kernel_q8: vpdpwssd (int16 pairs) or, with -a fast, vpdpbusd (int8 quads) */
static float int_dots(int bytes) {
    __m512i x = _mm512_castps_si512(_mm512_set1_ps(seed[0]));
    __m512i y = _mm512_castps_si512(_mm512_set1_ps(seed[1]));
    __m512i a0 = _mm512_set1_epi32((int)seed[2]), a1 = _mm512_set1_epi32((int)seed[3]),
            a2 = _mm512_set1_epi32((int)seed[4]), a3 = _mm512_set1_epi32((int)seed[5]),
            a4 = _mm512_set1_epi32((int)seed[6]), a5 = _mm512_set1_epi32((int)seed[7]),
            a6 = _mm512_set1_epi32((int)seed[8]), a7 = _mm512_set1_epi32((int)seed[9]),
            a8 = _mm512_set1_epi32((int)seed[10]), a9 = _mm512_set1_epi32((int)seed[11]),
            a10 = _mm512_set1_epi32((int)seed[12]), a11 = _mm512_set1_epi32((int)seed[13]);
    if (bytes) {
        for (long i = 0; i < STEPS; i++) {
            a0 = _mm512_dpbusd_epi32(a0, x, y); a1 = _mm512_dpbusd_epi32(a1, x, y);
            a2 = _mm512_dpbusd_epi32(a2, x, y); a3 = _mm512_dpbusd_epi32(a3, x, y);
            a4 = _mm512_dpbusd_epi32(a4, x, y); a5 = _mm512_dpbusd_epi32(a5, x, y);
            a6 = _mm512_dpbusd_epi32(a6, x, y); a7 = _mm512_dpbusd_epi32(a7, x, y);
            a8 = _mm512_dpbusd_epi32(a8, x, y); a9 = _mm512_dpbusd_epi32(a9, x, y);
            a10 = _mm512_dpbusd_epi32(a10, x, y); a11 = _mm512_dpbusd_epi32(a11, x, y);
        }
    } else {
        for (long i = 0; i < STEPS; i++) {
            a0 = _mm512_dpwssd_epi32(a0, x, y); a1 = _mm512_dpwssd_epi32(a1, x, y);
            a2 = _mm512_dpwssd_epi32(a2, x, y); a3 = _mm512_dpwssd_epi32(a3, x, y);
            a4 = _mm512_dpwssd_epi32(a4, x, y); a5 = _mm512_dpwssd_epi32(a5, x, y);
            a6 = _mm512_dpwssd_epi32(a6, x, y); a7 = _mm512_dpwssd_epi32(a7, x, y);
            a8 = _mm512_dpwssd_epi32(a8, x, y); a9 = _mm512_dpwssd_epi32(a9, x, y);
            a10 = _mm512_dpwssd_epi32(a10, x, y); a11 = _mm512_dpwssd_epi32(a11, x, y);
        }
    }
    __m512i sum = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1),
                                                    _mm512_add_epi32(a2, a3)),
                                   _mm512_add_epi32(_mm512_add_epi32(a4, a5),
                                                    _mm512_add_epi32(a6, a7)));
    sum = _mm512_add_epi32(sum, _mm512_add_epi32(_mm512_add_epi32(a8, a9),
                                                 _mm512_add_epi32(a10, a11)));
    return (float)_mm512_reduce_add_epi32(sum);
}
#endif

/* Runs one kind on every thread at once, 5 passes; prints the best pass. */
static void time_kind(const char *name, int per_instruction, int kind, int threads) {
    double best = 0.0;
    float results = 0.0f;  /* printed to stderr, so that no thread's work can be dropped */
    for (int pass = 0; pass < 5; pass++) {
        double start = now_seconds();
#if defined _OPENMP
#pragma omp parallel num_threads(threads) reduction(+ : results)
#endif
        {
#if defined __AVX512F__
            if (kind == 0 || kind == 1) results += float_dots(kind == 1);
#endif
#if defined __AVX512VNNI__
            if (kind == 2 || kind == 3) results += int_dots(kind == 3);
#endif
        }
        double seconds = now_seconds() - start;
        double rate = (double)threads * STEPS * 12 * per_instruction / seconds / 1e9;
        if (rate > best) best = rate;
    }
    printf("%s %d %.1f\n", name, per_instruction, best);
    fprintf(stderr, "(%s: %g)\n", name, (double)results);
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    if (threads < 1) {
        fprintf(stderr, "usage: peak [threads]\n");
        return 1;
    }
#if !defined _OPENMP
    threads = 1;
#endif
#if defined __AVX512F__
    time_kind("fp32_fma", 16, 0, threads);
#else
    fprintf(stderr, "peak: these instructions need AVX-512 (-march=native on such a machine)\n");
    return 1;
#endif
#if defined __AVX512BF16__
    time_kind("bf16_pairs", 32, 1, threads);
#endif
#if defined __AVX512VNNI__
    time_kind("int16_pairs", 32, 2, threads);
    time_kind("int8_quads", 64, 3, threads);
#endif
    return 0;
}
