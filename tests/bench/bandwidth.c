/* bandwidth.c: the machine's memory read bandwidth, measured the way a decode step reads its
   weights: each thread reads its own contiguous slice of a buffer far larger than the caches
   with the widest loads the compiler has, into independent accumulators (so that no add chain
   limits the loads). With AVX-512 it times three patterns (one line or four lines per step of
   one stream, or four streams at once) and reports the fastest; its buffer asks for 2 MB
   pages, as run -w read does for the weights. tests/bench.py compiles it
   with the engine's flags and runs it right before and after each timing.

   usage: bandwidth [MiB (default 1024)] [passes (default 5)] [threads]
   prints: the best pass's GB/s (1e9 bytes/s), the median pass's (of the pattern with the best
   median), and the thread count */

#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE  /* madvise */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
#if defined _OPENMP
#include <omp.h>
#endif
#if defined __AVX512F__ || defined __AVX2__
#include <immintrin.h>
#endif

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The read patterns timed: which one the memory system serves fastest varies (measured here:
   one 64-byte load per step beat four per step by 5-8%), and the ceiling is the fastest. */
#if defined __AVX512F__
#define PATTERNS 3
#else
#define PATTERNS 1
#endif

/* Reads n bytes (a multiple of 1024) in the given pattern and returns something that depends
   on all of them. */
static uint64_t read_slice(const unsigned char *p, size_t n, int pattern) {
#if defined __AVX512F__
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    if (pattern == 0) {  /* one stream, four lines per step into four accumulators */
        for (size_t i = 0; i < n; i += 256) {
            a0 = _mm512_xor_si512(a0, _mm512_load_si512((const void *)(p + i)));
            a1 = _mm512_xor_si512(a1, _mm512_load_si512((const void *)(p + i + 64)));
            a2 = _mm512_xor_si512(a2, _mm512_load_si512((const void *)(p + i + 128)));
            a3 = _mm512_xor_si512(a3, _mm512_load_si512((const void *)(p + i + 192)));
        }
    } else if (pattern == 1) {  /* one stream, one line per step */
        for (size_t i = 0; i < n; i += 64)
            a0 = _mm512_xor_si512(a0, _mm512_load_si512((const void *)(p + i)));
    } else {  /* four streams, a quarter of the slice each, one line of each per step */
        size_t q = n / 4;
        for (size_t i = 0; i < q; i += 64) {
            a0 = _mm512_xor_si512(a0, _mm512_load_si512((const void *)(p + i)));
            a1 = _mm512_xor_si512(a1, _mm512_load_si512((const void *)(p + q + i)));
            a2 = _mm512_xor_si512(a2, _mm512_load_si512((const void *)(p + 2 * q + i)));
            a3 = _mm512_xor_si512(a3, _mm512_load_si512((const void *)(p + 3 * q + i)));
        }
    }
    __m512i a = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
    return (uint64_t)_mm512_reduce_add_epi64(a);
#elif defined __AVX2__
    (void)pattern;
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i < n; i += 128) {
        a0 = _mm256_xor_si256(a0, _mm256_load_si256((const __m256i *)(p + i)));
        a1 = _mm256_xor_si256(a1, _mm256_load_si256((const __m256i *)(p + i + 32)));
        a2 = _mm256_xor_si256(a2, _mm256_load_si256((const __m256i *)(p + i + 64)));
        a3 = _mm256_xor_si256(a3, _mm256_load_si256((const __m256i *)(p + i + 96)));
    }
    __m256i a = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
    uint64_t out[4];
    memcpy(out, &a, sizeof out);
    return out[0] ^ out[1] ^ out[2] ^ out[3];
#else
    (void)pattern;
    uint64_t a[4] = {0, 0, 0, 0};
    for (size_t i = 0; i < n; i += 32)
        for (int j = 0; j < 4; j++) { uint64_t v; memcpy(&v, p + i + 8 * j, 8); a[j] ^= v; }
    return a[0] ^ a[1] ^ a[2] ^ a[3];
#endif
}

static int compare_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? (size_t)atol(argv[1]) : 1024;
    int passes = argc > 2 ? atoi(argv[2]) : 5;
    if (mib < 16) mib = 16;
    mib = (mib + 1) / 2 * 2;
    if (passes < 1 || passes > 100) passes = 5;
#if defined _OPENMP
    if (argc > 3) omp_set_num_threads(atoi(argv[3]));
#endif
    size_t bytes = mib << 20;
    unsigned char *buf = aligned_alloc((size_t)2 << 20, bytes);  /* bytes: whole MiB pairs */
    if (!buf) { fprintf(stderr, "bandwidth: out of memory\n"); return 1; }
#if defined MADV_HUGEPAGE
    madvise(buf, bytes, MADV_HUGEPAGE);  /* 2 MB pages read 3-8% faster here than 4 KB ones */
#endif
    int threads = 1;
#if defined _OPENMP
    threads = omp_get_max_threads();
#endif
    size_t slice = bytes / (size_t)threads / 4096 * 4096;  /* a multiple of 1024 */
    /* touch every page from the thread that will read it */
#if defined _OPENMP
#pragma omp parallel for schedule(static, 1)
#endif
    for (int t = 0; t < threads; t++) memset(buf + (size_t)t * slice, t + 1, slice);

    /* the patterns take turns within each pass, so that a drift in the machine's state
       reaches them alike */
    double gbps[PATTERNS][100];
    uint64_t sink = 0;
    for (int pass = 0; pass < passes; pass++) {
        for (int pattern = 0; pattern < PATTERNS; pattern++) {
            double start = now_seconds();
#if defined _OPENMP
#pragma omp parallel for schedule(static, 1) reduction(^ : sink)
#endif
            for (int t = 0; t < threads; t++)
                sink ^= read_slice(buf + (size_t)t * slice, slice, pattern);
            gbps[pattern][pass] = (double)(slice * (size_t)threads) / (now_seconds() - start) / 1e9;
        }
    }
    double best = 0.0, median = 0.0;
    for (int pattern = 0; pattern < PATTERNS; pattern++) {
        qsort(gbps[pattern], (size_t)passes, sizeof(double), compare_double);
        if (gbps[pattern][passes - 1] > best) best = gbps[pattern][passes - 1];
        if (gbps[pattern][passes / 2] > median) median = gbps[pattern][passes / 2];
    }
    if (sink == 42) fprintf(stderr, "(unlikely checksum)\n");  /* keeps the reads alive */
    printf("%.2f %.2f %d\n", best, median, threads);
    free(buf);
    return 0;
}
