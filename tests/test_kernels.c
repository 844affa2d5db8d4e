/* test_kernels.c: run.c's math kernels against plain loops, on random data: the portable ones
   of sections 2 and 3 in every build, and section 8's SIMD kernels where the build has them.
   tests/test_kernels.py compiles it three times (the Makefile's flags, so the AVX-512 paths;
   an AVX2 build; a portable build), and runs it.

   It includes run.c whole, so that it tests exactly the functions the engine runs (run.c's own
   main is renamed out of the way).

   usage: test_kernels                 kernels on random data; prints one line per check
          test_kernels MODEL.bin N     logits of N prompt tokens fed as batches vs one at a time
          test_kernels MODEL.bin N T   ... with a KV cache of type T (0 f32, 1 bf16, 2 q8_0)

   Every line reads "name: measured error (bound)"; the exit status is the number of failures. */

#define main run_main
#include "../run.c"
#undef main

/* The instruction sets section 8 may hold, 0 where this build has none of its kernels. */
#ifndef HAS_VNNI
#define HAS_VNNI 0
#endif
#ifndef HAS_AVX512_BF16
#define HAS_AVX512_BF16 0
#endif
#ifndef HAS_AMX
#define HAS_AMX 0
#endif
#ifndef HAS_NEON
#define HAS_NEON 0
#endif
#ifndef HAS_AVX2
#define HAS_AVX2 0
#endif

/* The vector dot products of the build: AVX-512's or AVX2's (bf16 against x reordered). */
#if defined __AVX512F__
#define VECTOR_ISA "avx512"
#define VECTOR_PAIRS split_pairs
#define VECTOR_DOT_FP32 dot_fp32_avx512
#define VECTOR_DOT_BF16 dot_bf16_avx512
#elif HAS_AVX2
#define VECTOR_ISA "avx2"
#define VECTOR_PAIRS pairs16
#define VECTOR_DOT_FP32 dot_fp32_avx2
#define VECTOR_DOT_BF16 dot_bf16_avx2
#endif

#include <float.h>

static int failures;

static void check(const char *name, double err, double bound) {
    int ok = err <= bound;
    printf("%-44s %.3e (bound %.2g)%s\n", name, err, bound, ok ? "" : "  FAIL");
    if (!ok) failures++;
}

static unsigned long long rng_state = 42;
static float uniform(void) { return random_f32(&rng_state) * 2.0f - 1.0f; }  /* [-1, 1) */

static void fill(float *x, size_t n) { for (size_t i = 0; i < n; i++) x[i] = uniform(); }

/* The float32 -> bf16 rounding export.py does (round to nearest even). */
static uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* Scalar references, summed in double: what each dot product means. */
static double ref_dot_fp32(const float *w, const float *x, int n) {
    double s = 0.0;
    for (int i = 0; i < n; i++) s += (double)w[i] * x[i];
    return s;
}

static double ref_dot_bf16(const uint16_t *w, const float *x, int n) {
    double s = 0.0;
    for (int i = 0; i < n; i++) s += (double)bf16_to_float(w[i]) * x[i];
    return s;
}

/* q8_0 with float activations: the exact value of the stored row against x. */
static double ref_dot_q8_float(const int8_t *w, const float *ws, const float *x, int n, int gs) {
    double s = 0.0;
    for (int i = 0; i < n; i++) s += (double)w[i] * ws[i / gs] * x[i];
    return s;
}

/* The size against which a dot product's error is judged: sum |w_i x_i|. */
static double magnitude(const float *w, const float *x, int n) {
    double s = 0.0;
    for (int i = 0; i < n; i++) s += fabs((double)w[i] * x[i]);
    return s;
}

/* export.py's q8_0 rule: scale = max|x| / 127 per group, q = round-half-even(x / scale). */
static void quantize_weights(int8_t *q, float *scales, const float *x, size_t n, int gs) {
    for (size_t g = 0; g < n / (size_t)gs; g++) {
        float amax = 0.0f;
        for (int i = 0; i < gs; i++) amax = fmaxf(amax, fabsf(x[g * gs + i]));
        float scale = amax / 127.0f;
        for (int i = 0; i < gs; i++)
            q[g * gs + i] = scale > 0.0f ? (int8_t)nearbyintf(x[g * gs + i] / scale) : 0;
        scales[g] = scale;
    }
}

/* A q8_0 matrix of random values, quantized as export.py does, and its float32 image. */
typedef struct {
    Matrix m;
    int8_t *q;
    float *scales, *image;
} TestQ8;

static TestQ8 make_q8(int rows, int cols, int gs) {
    TestQ8 t;
    size_t n = (size_t)rows * cols;
    t.q = malloc(n);
    t.scales = malloc(n / gs * sizeof(float));
    t.image = malloc(n * sizeof(float));
    float *x = calloc(n, sizeof(float));
    fill(x, n);
    quantize_weights(t.q, t.scales, x, n, gs);
    for (size_t i = 0; i < n; i++) t.image[i] = (float)t.q[i] * t.scales[i / gs];
    free(x);
    t.m = (Matrix){ .type = WEIGHT_Q8_0, .rows = rows, .cols = cols, .group_size = gs,
                    .data = t.q, .scales = t.scales };
    return t;
}

#if HAS_AVX2
/* One row of m against x through the decoding hooks (AVX2's row kernels), exact or -a fast. */
static double avx2_row(const Matrix *m, const float *x, int fast) {
    MatmulScratch s = {0};
    alloc_scratch(&s, m->cols, 1);
    s.simd->fast = fast;
    float out;
    Product p = { &out, m };
    matmul(&p, 1, x, 1, &s);
    free_scratch(&s);
    return out;
}
#endif

/* IEEE binary16 by its definition, in double: (1024 + m) * 2^(e - 25), or m * 2^-24 when e is
   0 (subnormals); e 31 is infinity or NaN. */
static double ref_fp16(uint16_t h) {
    int e = (h >> 10) & 31, m = h & 1023;
    double v = e == 0 ? ldexp(m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexp(1024 + m, e - 25);
    return h & 0x8000 ? -v : v;
}

/* fp16_to_float against the definition, on all 65536 values (NaN to NaN). */
static void test_fp16(void) {
    double worst = 0.0;
    for (uint32_t h = 0; h < 65536; h++) {
        double want = ref_fp16((uint16_t)h), got = fp16_to_float((uint16_t)h);
        if (isnan(want) ? !isnan(got) : got != want || signbit(got) != signbit(want)) worst = 1;
    }
    check("fp16_to_float, every value (mismatches)", worst, 0);
}

/* A q4_0 matrix of random 4-bit values and random fp16 scales (a few subnormal), packed as
   docs/formats.md says (independently of run.c's q4_value), and its float image. */
typedef struct {
    Matrix m;
    uint8_t *packed;
    uint16_t *scales;
    float *image;
} TestQ4;

static TestQ4 make_q4(int rows, int cols, int gs) {
    TestQ4 t;
    size_t n = (size_t)rows * cols;
    t.packed = calloc(n / 2, 1);
    t.scales = malloc(n / gs * sizeof(uint16_t));
    t.image = malloc(n * sizeof(float));
    for (size_t g = 0; g < n / gs; g++) {
        uint32_t r = random_u32(&rng_state);
        int exponent = r % 8 == 0 ? 0 : 9 + (int)(r >> 3) % 6;  /* 2^-6 .. 2^-1, or subnormal */
        t.scales[g] = (uint16_t)((r >> 16 & 0x8000) | exponent << 10 | (r >> 6 & 1023));
    }
    for (size_t i = 0; i < n; i++) {
        int u = (int)(random_u32(&rng_state) % 16);
        t.packed[i / 32 * 16 + i % 16] |= (uint8_t)(i % 32 < 16 ? u : u << 4);
        t.image[i] = (float)((u - 8) * ref_fp16(t.scales[i / gs]));
    }
    t.m = (Matrix){ .type = WEIGHT_Q4_0, .rows = rows, .cols = cols, .group_size = gs,
                    .data = t.packed, .fp16_scales = t.scales };
    return t;
}

static void free_q4(TestQ4 *t) { free(t->packed); free(t->scales); free(t->image); }

/* The exact value of a q4_0 row against activations quantized to qv: per group, the integer
   sum of the stored values times q, times both scales. */
static double exact_q4(const TestQ4 *t, const QuantizedVector *qv) {
    int n = t->m.cols, gs = t->m.group_size;
    double sum = 0.0;
    for (int g = 0; g < n / gs; g++) {
        int64_t isum = 0;
        for (int i = g * gs; i < (g + 1) * gs; i++)
            isum += (int64_t)((t->packed[i / 32 * 16 + i % 16] >> (i % 32 < 16 ? 0 : 4) & 15) - 8) *
                    qv->q[i];
        sum += (double)isum * ref_fp16(t->scales[g]) * qv->scales[g];
    }
    return sum;
}

/* dot_q4 (and section 8's kernel for it) against the exact integer sums of the stored values
   and the activations quantized to int16, and against float activations. */
static void test_dots_q4(int n, int gs) {
    char name[80];
    float *x = malloc((size_t)n * sizeof(float));
    QuantizedVector qv = { malloc((size_t)n * sizeof(int16_t)),
                           malloc((size_t)(n / gs) * sizeof(float)) };
#if HAS_VNNI  /* section 8's form of the same activations, sharing q and scales */
    SimdVector sv = { qv.q, qv.scales, NULL, NULL, malloc((size_t)(n + 128) * sizeof(int16_t)),
                      malloc((size_t)(n / gs) * sizeof(float)), malloc((size_t)n + 128) };
#endif
    double worst_int = 0, worst_float = 0, worst_avx512 = 0, worst_fast_int = 0;
    double worst_fast_float = 0, worst_avx2 = 0;
    int avx512 = 0, avx2 = 0, fast = 0;
    for (int trial = 0; trial < 50; trial++) {
        TestQ4 t = make_q4(1, n, gs);
        fill(x, (size_t)n);
        quantize_vector(&qv, x, n, gs, Q16_MAX);
        double exact_int = exact_q4(&t, &qv), exact_float = 0.0;
        for (int i = 0; i < n; i++) exact_float += (double)t.image[i] * x[i];
        double qmag = magnitude(t.image, x, n) + 1e-30;
        double got = dot_q4(t.packed, t.scales, &qv, n, gs);
        worst_int = fmax(worst_int, fabs(got - exact_int) / qmag);
        worst_float = fmax(worst_float, fabs(got - exact_float) / qmag);
#if HAS_VNNI
        struct SimdScratch settings = { .fast = 0 };
        MatmulScratch fast_scratch = { .simd = &settings };
        int kernel = rows_kernel(&t.m, &fast_scratch);
        avx512 = kernel == ROWS_Q4_32 || kernel == ROWS_Q4;
        if (avx512) {
            prepare_q4(&sv, n, gs);
            got = gs == 32 ? dot_q4_32(t.packed, t.scales, &sv, n)
                           : dot_q4_groups(t.packed, t.scales, &sv, n, gs);
            worst_avx512 = fmax(worst_avx512, fabs(got - exact_int) / qmag);
        }
        settings.fast = 1;
        fast = fast_q4(&t.m, &fast_scratch);
        if (fast) {  /* -a fast: int8 activations against the unsigned nibbles */
            quantize_vector(&qv, x, n, gs, Q8_MAX);
            prepare_q4(&sv, n, gs);
            prepare_q4_int8(&sv, n);
            double exact_int8 = exact_q4(&t, &qv);
            got = dot_q4_fast(t.packed, t.scales, &sv, n, gs);
            worst_fast_int = fmax(worst_fast_int, fabs(got - exact_int8) / qmag);
            worst_fast_float = fmax(worst_fast_float, fabs(got - exact_float) / qmag);
        }
#elif HAS_AVX2
        struct SimdScratch settings = { .fast = 1 };
        MatmulScratch fast_scratch = { .simd = &settings };
        avx2 = int_kernel_applies(&t.m);
        if (avx2) worst_avx2 = fmax(worst_avx2, fabs(avx2_row(&t.m, x, 0) - exact_int) / qmag);
        fast = int8_applies(&t.m, &fast_scratch);
        if (fast) {  /* -a fast: int8 activations against the unsigned nibbles */
            quantize_vector(&qv, x, n, gs, Q8_MAX);
            double exact_int8 = exact_q4(&t, &qv);
            got = avx2_row(&t.m, x, 1);
            worst_fast_int = fmax(worst_fast_int, fabs(got - exact_int8) / qmag);
            worst_fast_float = fmax(worst_fast_float, fabs(got - exact_float) / qmag);
        }
#endif
        free_q4(&t);
    }
    snprintf(name, sizeof name, "dot_q4 vs int4 x int16 n=%d gs=%d", n, gs);
    check(name, worst_int, 1e-6);
    snprintf(name, sizeof name, "dot_q4 vs float activations n=%d gs=%d", n, gs);
    check(name, worst_float, 1e-4);
    if (avx512) {
        snprintf(name, sizeof name, "dot_q4_avx512 vs int4 x int16 n=%d gs=%d", n, gs);
        check(name, worst_avx512, 1e-6);
    }
    if (avx2) {
        snprintf(name, sizeof name, "AVX2 q4_0 row vs int4 x int16 n=%d gs=%d", n, gs);
        check(name, worst_avx2, 1e-6);
    }
    if (fast) {
        snprintf(name, sizeof name, "dot_q4 -a fast vs int4 x int8 n=%d gs=%d", n, gs);
        check(name, worst_fast_int, 1e-6);
        /* 256 times coarser steps than int16, as q8_0's -a fast */
        snprintf(name, sizeof name, "dot_q4 -a fast vs float activations n=%d gs=%d", n, gs);
        check(name, worst_fast_float, 5e-3);
    }
    free(x); free(qv.q); free(qv.scales);
#if HAS_VNNI
    free(sv.q4_pairs); free(sv.q4_offsets); free(sv.q4_int8);
#endif
}

/* dot_q4's int32 runs at their bound: every value -8 against activations all -32767, each
   run summing to 8192 * 8 * 32767 (just under 2^31), in groups of one run and of two. */
static void test_q4_run_bound(void) {
    int n = 32768;
    uint8_t *packed = calloc((size_t)n / 2, 1);  /* nibbles 0: the value -8 */
    uint16_t *scales = malloc((size_t)n / 8192 * sizeof(uint16_t));
    float *x = malloc((size_t)n * sizeof(float));
    QuantizedVector qv = { malloc((size_t)n * sizeof(int16_t)),
                           malloc((size_t)n / 8192 * sizeof(float)) };
    for (int g = 0; g < n / 8192; g++) scales[g] = 0x3c00;  /* 1.0 */
    for (int i = 0; i < n; i++) x[i] = -1.0f;
    for (int gs = 8192; gs <= 16384; gs *= 2) {
        char name[80];
        quantize_vector(&qv, x, n, gs, Q16_MAX);
        double want = 0.0;
        for (int g = 0; g < n / gs; g++) want += 8.0 * 32767.0 * gs * qv.scales[g];
        snprintf(name, sizeof name, "dot_q4 at its int32 bound gs=%d", gs);
        check(name, fabs(dot_q4(packed, scales, &qv, n, gs) - want) / want, 1e-6);
    }
    free(packed); free(scales); free(x); free(qv.q); free(qv.scales);
}

static void test_dots(int n, int gs) {
    char name[80];
    float *w = malloc((size_t)n * sizeof(float)), *x = malloc((size_t)n * sizeof(float));
    uint16_t *wb = malloc((size_t)n * sizeof(uint16_t));
    float *wb_image = malloc((size_t)n * sizeof(float));
    double worst_fp32 = 0, worst_bf16 = 0, worst_q8_int = 0, worst_q8_float = 0, worst_qx = 0;
    double worst_fast_int = 0, worst_fast_float = 0;
#ifdef VECTOR_ISA
    double worst_fp32_vector = 0, worst_bf16_vector = 0;
#endif
#if HAS_VNNI
    double worst_q8_vnni = 0;
#endif
#if HAS_AVX2
    double worst_q8_avx2 = 0;
#endif
    int fast = (HAS_VNNI && gs % 64 == 0) || (HAS_AVX2 && gs % 32 == 0 && gs <= 4096);
    for (int trial = 0; trial < 50; trial++) {
        fill(w, (size_t)n);
        fill(x, (size_t)n);
        for (int i = 0; i < n; i++) {
            wb[i] = float_to_bf16(w[i]);
            wb_image[i] = bf16_to_float(wb[i]);
        }
        double mag = magnitude(w, x, n);
        double mag_bf16 = magnitude(wb_image, x, n);
        worst_fp32 = fmax(worst_fp32, fabs(dot_fp32(w, x, n) - ref_dot_fp32(w, x, n)) / mag);
        worst_bf16 = fmax(worst_bf16, fabs(dot_bf16(wb, x, n) - ref_dot_bf16(wb, x, n)) / mag_bf16);
#ifdef VECTOR_ISA
        float *pairs = malloc((size_t)n * sizeof(float));
        VECTOR_PAIRS(pairs, x, n);
        worst_fp32_vector = fmax(worst_fp32_vector,
                                 fabs(VECTOR_DOT_FP32(w, x, n) - ref_dot_fp32(w, x, n)) / mag);
        worst_bf16_vector = fmax(worst_bf16_vector,
                                 fabs(VECTOR_DOT_BF16(wb, pairs, n) - ref_dot_bf16(wb, x, n)) /
                                     mag_bf16);
        free(pairs);
#endif

        TestQ8 t = make_q8(1, n, gs);
        QuantizedVector qv = { malloc((size_t)n * sizeof(int16_t)),
                               malloc((size_t)(n / gs) * sizeof(float)) };
#if HAS_VNNI  /* section 8's form of the same activations, sharing q and scales */
        SimdVector sv = { qv.q, qv.scales, malloc((size_t)n),
                          malloc((size_t)(n / gs) * sizeof(int32_t)), NULL, NULL, NULL };
#endif
        quantize_vector(&qv, x, n, gs, Q16_MAX);
        const int16_t *xq = qv.q;
        const float *xs = qv.scales;
        for (int i = 0; i < n; i++)  /* quantizing moves no value by more than half a step */
            worst_qx = fmax(worst_qx, fabs((double)xq[i] * xs[i / gs] - x[i]) / xs[i / gs]);
        double exact_int = 0.0;  /* the integer dot products the kernel should compute */
        for (int g = 0; g < n / gs; g++) {
            int64_t isum = 0;
            for (int i = g * gs; i < (g + 1) * gs; i++) isum += (int64_t)t.q[i] * xq[i];
            exact_int += (double)isum * t.scales[g] * xs[g];
        }
        double got = dot_q8(t.q, t.scales, &qv, n, gs);
        double qmag = magnitude(t.image, x, n);
        worst_q8_int = fmax(worst_q8_int, fabs(got - exact_int) / qmag);
#if HAS_VNNI
        if (gs % 32 == 0)  /* its steps are 32 values */
            worst_q8_vnni = fmax(worst_q8_vnni,
                                 fabs(dot_q8_vnni(t.q, t.scales, &sv, n / gs, gs) - exact_int) /
                                     qmag);
#endif
#if HAS_AVX2
        if (int_kernel_applies(&t.m))
            worst_q8_avx2 = fmax(worst_q8_avx2, fabs(avx2_row(&t.m, x, 0) - exact_int) / qmag);
#endif
        worst_q8_float = fmax(worst_q8_float,
                              fabs(got - ref_dot_q8_float(t.q, t.scales, x, n, gs)) / qmag);
#if HAS_VNNI
        if (fast) {  /* -a fast: int8 activations, through vpdpbusd's unsigned operand */
            quantize_int8(&sv, x, n, gs);
            double exact_int8 = 0.0;
            for (int g = 0; g < n / gs; g++) {
                int64_t isum = 0;
                for (int i = g * gs; i < (g + 1) * gs; i++) isum += (int64_t)t.q[i] * sv.int8[i];
                exact_int8 += (double)isum * t.scales[g] * qv.scales[g];
            }
            got = dot_q8_fast(t.q, t.scales, &sv, n / gs, gs);
            worst_fast_int = fmax(worst_fast_int, fabs(got - exact_int8) / qmag);
            worst_fast_float = fmax(worst_fast_float,
                                    fabs(got - ref_dot_q8_float(t.q, t.scales, x, n, gs)) / qmag);
        }
#elif HAS_AVX2
        if (fast) {  /* -a fast: int8 activations, through vpmaddubsw's unsigned operand */
            quantize_vector(&qv, x, n, gs, Q8_MAX);
            double exact_int8 = 0.0;
            for (int g = 0; g < n / gs; g++) {
                int64_t isum = 0;
                for (int i = g * gs; i < (g + 1) * gs; i++) isum += (int64_t)t.q[i] * qv.q[i];
                exact_int8 += (double)isum * t.scales[g] * qv.scales[g];
            }
            got = avx2_row(&t.m, x, 1);
            worst_fast_int = fmax(worst_fast_int, fabs(got - exact_int8) / qmag);
            worst_fast_float = fmax(worst_fast_float,
                                    fabs(got - ref_dot_q8_float(t.q, t.scales, x, n, gs)) / qmag);
        }
#endif
        free(qv.q); free(qv.scales);
#if HAS_VNNI
        free(sv.int8); free(sv.int8_offsets);
#endif
        free(t.q); free(t.scales); free(t.image);
    }
    snprintf(name, sizeof name, "dot_fp32 n=%d", n);
    check(name, worst_fp32, 1e-6);
    snprintf(name, sizeof name, "dot_bf16 n=%d", n);
    check(name, worst_bf16, 1e-6);
#ifdef VECTOR_ISA
    snprintf(name, sizeof name, "dot_fp32_%s n=%d", VECTOR_ISA, n);
    check(name, worst_fp32_vector, 1e-6);
    snprintf(name, sizeof name, "dot_bf16_%s n=%d", VECTOR_ISA, n);
    check(name, worst_bf16_vector, 1e-6);
#endif
    /* half a step, plus float32's rounding of x / scale at up to 32767 steps (~0.002 step) */
    snprintf(name, sizeof name, "quantize_vector n=%d gs=%d (steps)", n, gs);
    check(name, worst_qx, 0.51);
    snprintf(name, sizeof name, "dot_q8 vs int8 x int16 n=%d gs=%d", n, gs);
    check(name, worst_q8_int, 1e-6);
#if HAS_VNNI
    snprintf(name, sizeof name, "dot_q8_vnni vs int8 x int16 n=%d gs=%d", n, gs);
    check(name, worst_q8_vnni, 1e-6);
#endif
#if HAS_AVX2
    snprintf(name, sizeof name, "AVX2 q8_0 row vs int8 x int16 n=%d gs=%d", n, gs);
    check(name, worst_q8_avx2, 1e-6);
#endif
    /* The activations' rounding: each product moves by up to half an activation step. */
    snprintf(name, sizeof name, "dot_q8 vs float activations n=%d gs=%d", n, gs);
    check(name, worst_q8_float, 1e-4);
    if (fast) {
        snprintf(name, sizeof name, "dot_q8 -a fast vs int8 x int8 n=%d gs=%d", n, gs);
        check(name, worst_fast_int, 1e-6);
        /* 256 times coarser steps than int16 */
        snprintf(name, sizeof name, "dot_q8 -a fast vs float activations n=%d gs=%d", n, gs);
        check(name, worst_fast_float, 5e-3);
    }
    free(w); free(x); free(wb); free(wb_image);
}

#if HAS_NEON
/* What a q8_0 or q4_0 row's kernel should compute from activations quantized to q and
   scales: per group, the exact integer sum of the stored values times q, times both scales. */
static double exact_groups(const Matrix *m, const int16_t *q, const float *scales) {
    double sum = 0.0;
    int gs = m->group_size, q8 = m->type == WEIGHT_Q8_0;
    const uint8_t *nibbles = m->data;
    for (int g = 0; g < m->cols / gs; g++) {
        int64_t isum = 0;
        for (int i = g * gs; i < (g + 1) * gs; i++) {
            int v = q8 ? ((const int8_t *)m->data)[i]
                       : (nibbles[i / 32 * 16 + i % 16] >> (i % 32 < 16 ? 0 : 4) & 15) - 8;
            isum += (int64_t)v * q[i];
        }
        sum += (double)isum * (q8 ? m->scales[g] : ref_fp16(m->fp16_scales[g])) * scales[g];
    }
    return sum;
}

/* fp16_to_float_neon against fp16_to_float on all 65536 values (NaN to NaN). */
static void test_fp16_neon(void) {
    int mismatches = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float want = fp16_to_float((uint16_t)h), got = fp16_to_float_neon((uint16_t)h);
        mismatches += isnan(want) ? !isnan(got) : memcmp(&got, &want, sizeof got) != 0;
    }
    check("fp16_to_float_neon, every value (mismatches)", mismatches, 0);
}

/* Section 8's NEON row kernels on one row of n: fp32 and bf16 against double, q8_0 and q4_0
   against exact_groups of int16 activations and (-a fast) of int8 ones. */
static void test_dots_neon(int n, int gs) {
    float *w = malloc((size_t)n * sizeof(float)), *x = malloc((size_t)n * sizeof(float));
    uint16_t *wb = malloc((size_t)n * sizeof(uint16_t));
    SimdVector qv = { malloc((size_t)n * sizeof(int16_t)), malloc((size_t)n * sizeof(float)),
                      malloc((size_t)n) };
    double worst_fp32 = 0, worst_bf16 = 0, worst[2][2] = {{0}};  /* [q4][int8] */
    for (int trial = 0; trial < 20; trial++) {
        fill(w, (size_t)n);
        fill(x, (size_t)n);
        for (int i = 0; i < n; i++) wb[i] = float_to_bf16(w[i]);
        worst_fp32 = fmax(worst_fp32, fabs(dot_fp32_neon(w, x, n) - ref_dot_fp32(w, x, n)) /
                                          magnitude(w, x, n));
        for (int i = 0; i < n; i++) w[i] = bf16_to_float(wb[i]);
        worst_bf16 = fmax(worst_bf16, fabs(dot_bf16_neon(wb, x, n) - ref_dot_bf16(wb, x, n)) /
                                          magnitude(w, x, n));
        for (int q4 = 0; q4 <= 1; q4++) {
            if (q4 && gs % 32) continue;
            TestQ8 t8 = {0};
            TestQ4 t4 = {0};
            if (q4) t4 = make_q4(1, n, gs);
            else t8 = make_q8(1, n, gs);
            const Matrix *m = q4 ? &t4.m : &t8.m;
            const void *scales = q4 ? (const void *)m->fp16_scales : (const void *)m->scales;
            double mag = magnitude(q4 ? t4.image : t8.image, x, n);
            for (int int8 = 0; int8 <= 1; int8++) {
                quantize_input(&qv, x, n, gs, int8 ? Q8_MAX : Q16_MAX);
                narrow_int8(qv.int8, qv.q, n);
                double got = dot_groups_neon(m->data, scales, q4, &qv, n / gs, gs, int8);
                worst[q4][int8] = fmax(worst[q4][int8],
                                       fabs(got - exact_groups(m, qv.q, qv.scales)) / mag);
            }
            free(t8.q); free(t8.scales); free(t8.image);
            free_q4(&t4);
        }
    }
    char name[80];
    snprintf(name, sizeof name, "dot_fp32_neon n=%d", n);
    check(name, worst_fp32, 1e-6);
    snprintf(name, sizeof name, "dot_bf16_neon n=%d", n);
    check(name, worst_bf16, 1e-6);
    for (int q4 = 0; q4 <= 1; q4++)
        for (int int8 = 0; int8 <= 1 && (!q4 || gs % 32 == 0); int8++) {
            snprintf(name, sizeof name, "dot_groups_neon %s%s vs integers n=%d gs=%d",
                     q4 ? "q4_0" : "q8_0", int8 ? " -a fast" : "", n, gs);
            check(name, worst[q4][int8], 1e-6);
        }
    free(w); free(x); free(wb); free(qv.q); free(qv.scales); free(qv.int8);
}
#endif

/* matmul of one matrix: out[n][rows] = W applied to each of x[n][cols]. */
static void matmul_one(float *out, const float *x, int n, const Matrix *w, MatmulScratch *s) {
    Product p = { out, w };
    matmul(&p, 1, x, n, s);
}

/* matmul on n tokens (the prompt path when n > 1) against the reference row by row. */
static void test_matmul(int type, int rows, int cols, int n, MatmulScratch *s) {
    size_t count = (size_t)rows * cols;
    float *image = malloc(count * sizeof(float));
    uint16_t *bf = NULL;
    TestQ8 q8 = {0};
    TestQ4 q4 = {0};
    Matrix m = { .type = type, .rows = rows, .cols = cols, .group_size = 0 };
    if (type == WEIGHT_Q8_0) {
        q8 = make_q8(rows, cols, 32);
        m = q8.m;
        memcpy(image, q8.image, count * sizeof(float));
    } else if (type == WEIGHT_Q4_0) {
        q4 = make_q4(rows, cols, cols % 64 ? 32 : 64);
        m = q4.m;
        memcpy(image, q4.image, count * sizeof(float));
    } else {
        fill(image, count);
        if (type == WEIGHT_BF16) {
            bf = malloc(count * sizeof(uint16_t));
            for (size_t i = 0; i < count; i++) {
                bf[i] = float_to_bf16(image[i]);
                image[i] = bf16_to_float(bf[i]);
            }
            m.data = bf;
        } else {
            m.data = image;
        }
    }
    float *x = malloc((size_t)n * cols * sizeof(float));
    float *out = malloc((size_t)n * rows * sizeof(float));
    fill(x, (size_t)n * cols);
    matmul_one(out, x, n, &m, s);
    double worst = 0.0;
    for (int t = 0; t < n; t++)
        for (int r = 0; r < rows; r++) {
            const float *wr = image + (size_t)r * cols, *xt = x + (size_t)t * cols;
            double want = ref_dot_fp32(wr, xt, cols);
            worst = fmax(worst, fabs(out[(size_t)t * rows + r] - want) / magnitude(wr, xt, cols));
        }
    char name[80];
    snprintf(name, sizeof name, "matmul %s %dx%d, %d tokens", WEIGHT_TYPE_NAMES[type], rows, cols,
             n);
    /* one token of q8_0 or q4_0 goes through int16 activations (so do their blocks with
       AVX-512 VNNI); everything else is float32 */
    check(name, worst, type == WEIGHT_Q8_0 || type == WEIGHT_Q4_0 ? 1e-4 : 1e-6);
    free(image); free(bf); free(x); free(out); free(q8.q); free(q8.scales); free(q8.image);
    free_q4(&q4);
}

/* -a fast: matmul against the reference on x rounded as that mode rounds it (to bf16 for bf16
   weights, to int8 per group for q8_0), which is all it may change: what is then multiplied
   is exact (two bf16, or two int8 summed in int32). */
#if HAS_AVX512_BF16 || HAS_VNNI || HAS_NEON || HAS_AVX2
static void test_matmul_fast(int type, int rows, int cols, int n, MatmulScratch *s) {
    size_t count = (size_t)rows * cols;
    float *x = malloc((size_t)n * cols * sizeof(float));
    float *x_rounded = malloc((size_t)n * cols * sizeof(float));
    float *out = malloc((size_t)n * rows * sizeof(float));
    float *image = malloc(count * sizeof(float));
    uint16_t *bf = NULL;
    TestQ8 q8 = {0};
    TestQ4 q4 = {0};
    Matrix m;
    fill(x, (size_t)n * cols);
    if (type == WEIGHT_BF16) {
        bf = malloc(count * sizeof(uint16_t));
        fill(image, count);
        for (size_t i = 0; i < count; i++)
            image[i] = bf16_to_float(bf[i] = float_to_bf16(image[i]));
        m = (Matrix){ .type = WEIGHT_BF16, .rows = rows, .cols = cols, .data = bf };
#if HAS_AVX512_BF16
        for (size_t i = 0; i < (size_t)n * cols; i++)
            x_rounded[i] = bf16_to_float(round_to_bf16(x[i]));
#endif
    } else {
        int gs = type == WEIGHT_Q8_0 ? 64 : 32;
        if (type == WEIGHT_Q8_0) {
            q8 = make_q8(rows, cols, gs);
            m = q8.m;
            memcpy(image, q8.image, count * sizeof(float));
        } else {
            q4 = make_q4(rows, cols, gs);
            m = q4.m;
            memcpy(image, q4.image, count * sizeof(float));
        }
        QuantizedVector qv = { malloc((size_t)cols * sizeof(int16_t)),
                               malloc((size_t)cols * sizeof(float)) };
        for (int t = 0; t < n; t++) {
            quantize_vector(&qv, x + (size_t)t * cols, cols, gs, Q8_MAX);
            for (int i = 0; i < cols; i++)
                x_rounded[(size_t)t * cols + i] = (float)qv.q[i] * qv.scales[i / gs];
        }
        free(qv.q); free(qv.scales);
    }
    s->simd->fast = 1;
    matmul_one(out, x, n, &m, s);
    s->simd->fast = 0;
    double worst = 0.0;
    for (int t = 0; t < n; t++)
        for (int r = 0; r < rows; r++) {
            const float *wr = image + (size_t)r * cols, *xt = x_rounded + (size_t)t * cols;
            worst = fmax(worst, fabs(out[(size_t)t * rows + r] - ref_dot_fp32(wr, xt, cols)) /
                                    magnitude(wr, xt, cols));
        }
    char name[80];
    snprintf(name, sizeof name, "matmul %s -a fast %dx%d, %d tokens", WEIGHT_TYPE_NAMES[type],
             rows, cols, n);
    check(name, worst, 1e-6);
    free(x); free(x_rounded); free(out); free(image); free(bf);
    free(q8.q); free(q8.scales); free(q8.image); free_q4(&q4);
}
#endif

#if HAS_AMX
/* The AMX prompt path (matmul_tiles) against the strips it stands in for, on the same
   matrix and tokens: -a fast's int8 tiles sum the same integers, so the same bits where a
   group is one tile step (else the steps' floats add up in another order: within 1e-6); the
   exact path's bf16 halves of x against the reference, closer than the strips' int16 x. */
static void test_matmul_tiles(int type, int rows, int cols, int gs, int n, MatmulScratch *s) {
    TestQ8 q8 = {0};
    TestQ4 q4 = {0};
    Matrix m;
    const float *image;
    if (type == WEIGHT_Q8_0) {
        q8 = make_q8(rows, cols, gs);
        m = q8.m;
        image = q8.image;
    } else {
        q4 = make_q4(rows, cols, gs);
        m = q4.m;
        image = q4.image;
    }
    float *x = malloc((size_t)n * cols * sizeof(float));
    float *tiles = malloc((size_t)n * rows * sizeof(float));
    float *strips = malloc((size_t)n * rows * sizeof(float));
    fill(x, (size_t)n * cols);
    char name[96];
    for (int fast = 0; fast <= 1; fast++) {
        s->simd->fast = fast;
        matmul_one(tiles, x, n, &m, s);
        s->simd->amx = 0;
        matmul_one(strips, x, n, &m, s);
        s->simd->amx = 1;
        int int8 = fast_int8(&m, s) || fast_q4(&m, s);
        double worst = 0.0;
        for (int t = 0; t < n; t++)
            for (int r = 0; r < rows; r++) {
                const float *wr = image + (size_t)r * cols, *xt = x + (size_t)t * cols;
                float got = tiles[(size_t)t * rows + r], want = strips[(size_t)t * rows + r];
                double scale = gs == amx_step(gs, 1) ? 1.0 : magnitude(wr, xt, cols);
                worst = fmax(worst, int8 ? fabs(got - want) / scale
                                         : fabs(got - ref_dot_fp32(wr, xt, cols)) /
                                               magnitude(wr, xt, cols));
            }
        snprintf(name, sizeof name, "matmul tiles %s%s %dx%d/%d, %d tokens",
                 WEIGHT_TYPE_NAMES[type], int8 ? " -a fast (vs strips)" : "", rows, cols, gs, n);
        check(name, worst, !int8 ? 1e-5 : gs == amx_step(gs, 1) ? 0.0 : 1e-6);
    }
    s->simd->fast = 0;
    free(x); free(tiles); free(strips);
    free(q8.q); free(q8.scales); free(q8.image); free_q4(&q4);
}
#endif

/* matmul on products sharing x (decoding's q/k/v form, mixed widths) against one
   matmul per matrix: the same kernels, so the same bits. */
static void test_matmul_shared(MatmulScratch *s) {
    int rows[3] = { 64, 16, 40 }, cols = 256;
    Matrix m[3];
    float *data[3], *want[3], *got[3];
    Product p[3];
    float *x = malloc((size_t)cols * sizeof(float));
    fill(x, (size_t)cols);
    for (int i = 0; i < 3; i++) {
        data[i] = malloc((size_t)rows[i] * cols * sizeof(float));
        fill(data[i], (size_t)rows[i] * cols);
        m[i] = (Matrix){ .type = WEIGHT_FP32, .rows = rows[i], .cols = cols, .data = data[i] };
        want[i] = malloc((size_t)rows[i] * sizeof(float));
        got[i] = malloc((size_t)rows[i] * sizeof(float));
        matmul_one(want[i], x, 1, &m[i], s);
        p[i] = (Product){ got[i], &m[i] };
    }
    matmul(p, 3, x, 1, s);
    double worst = 0.0;
    for (int i = 0; i < 3; i++) {
        for (int r = 0; r < rows[i]; r++) worst = fmax(worst, fabs(got[i][r] - want[i][r]));
        free(data[i]); free(want[i]); free(got[i]);
    }
    free(x);
    check("matmul of three vs one matrix at a time", worst, 0.0);
}

/* What a cache of cache_type holds for x[0 .. head_dim-1] (one key or value), widened back to
   float: bf16 rounded to nearest even; q8_0 per group of CACHE_GROUP, int8 times its scale. */
static void cache_rounding(float *x, int head_dim, int cache_type) {
    for (int g = 0; g < head_dim; g += CACHE_GROUP) {
        int n = head_dim - g < CACHE_GROUP ? head_dim - g : CACHE_GROUP;
        if (cache_type == CACHE_BF16) {
            for (int i = 0; i < n; i++) x[g + i] = bf16_to_float(float_to_bf16(x[g + i]));
        } else if (cache_type == CACHE_Q8_0) {
            int16_t q[CACHE_GROUP];
            float scale = quantize_group(q, x + g, CACHE_GROUP, Q8_MAX);
            for (int i = 0; i < CACHE_GROUP; i++) x[g + i] = (float)q[i] * scale;
        }
    }
}

/* Keys and values for seq_len positions ([seq_len][kv_dim], in [-1, 1)), stored in s's cache
   as blocks fill it (positions from `from` on only), and rounded as the cache rounds them. */
static void fill_cache(RunState *s, const Config *cfg, float *keys, float *values, int from,
                       int seq_len) {
    int kv_dim = cfg->n_kv_heads * cfg->head_dim;
    for (int p0 = from; p0 < seq_len; p0 += MAX_BATCH) {
        int block = seq_len - p0 < MAX_BATCH ? seq_len - p0 : MAX_BATCH;
        memcpy(s->k, keys + (size_t)p0 * kv_dim, (size_t)block * kv_dim * sizeof(float));
        memcpy(s->v, values + (size_t)p0 * kv_dim, (size_t)block * kv_dim * sizeof(float));
        store_kv(s, cfg, 0, p0, block);
    }
    for (size_t i = (size_t)from * kv_dim; i < (size_t)seq_len * kv_dim; i += cfg->head_dim) {
        cache_rounding(keys + i, cfg->head_dim, s->cache_type);
        cache_rounding(values + i, cfg->head_dim, s->cache_type);
    }
}

static Config attention_config(int n_heads, int n_kv_heads, int head_dim, int seq_len) {
    return (Config){ .dim = 64, .hidden_dim = 64, .n_layers = 1, .n_heads = n_heads,
                     .n_kv_heads = n_kv_heads, .head_dim = head_dim, .vocab_size = 8,
                     .max_seq_len = seq_len, .rope_theta = 10000.0f, .norm_eps = 1e-5f };
}

/* attention() (section 3's passes, with section 8's kernels where the build has them) over
   the tiled KV cache of cache_type against plain causal grouped-query attention in double
   over the numbers the cache holds, for a prompt batch of n tokens after pos cached
   positions. */
static void test_attention(int n_heads, int n_kv_heads, int head_dim, int pos, int n,
                           int cache_type) {
    int seq_len = pos + n, kv_dim = n_kv_heads * head_dim, q_dim = n_heads * head_dim;
    int heads_per_kv = n_heads / n_kv_heads;
    Config cfg = attention_config(n_heads, n_kv_heads, head_dim, seq_len);
    RunState s = {0};
    alloc_state(&s, &cfg, seq_len, cache_type);
    float *keys = malloc((size_t)seq_len * kv_dim * sizeof(float));
    float *values = malloc((size_t)seq_len * kv_dim * sizeof(float));
    fill(keys, (size_t)seq_len * kv_dim);
    fill(values, (size_t)seq_len * kv_dim);
    fill_cache(&s, &cfg, keys, values, 0, seq_len);
    for (size_t i = 0; i < (size_t)n * q_dim; i++) s.q[i] = 4.0f * uniform();  /* peaked */
    double *scores = malloc((size_t)seq_len * sizeof(double));
    attention(&s, &cfg, 0, pos, n);
    double worst = 0.0;
    for (int t = 0; t < n; t++)
        for (int h = 0; h < n_heads; h++) {
            const float *q = s.q + (size_t)t * q_dim + (size_t)h * head_dim;
            size_t kv = (size_t)(h / heads_per_kv) * head_dim;
            double max = -INFINITY, sum = 0.0;
            for (int p = 0; p <= pos + t; p++) {
                double d = 0.0;
                for (int i = 0; i < head_dim; i++)
                    d += (double)q[i] * keys[p * kv_dim + kv + i];
                scores[p] = d / sqrt((double)head_dim);
                max = fmax(max, scores[p]);
            }
            for (int p = 0; p <= pos + t; p++) sum += scores[p] = exp(scores[p] - max);
            for (int i = 0; i < head_dim; i++) {
                double want = 0.0;
                for (int p = 0; p <= pos + t; p++)
                    want += scores[p] / sum * values[p * kv_dim + kv + i];
                double got = s.xb[(size_t)t * q_dim + (size_t)h * head_dim + i];
                worst = fmax(worst, fabs(got - want));
            }
        }
    char name[96];
    snprintf(name, sizeof name, "attention %d/%d heads of %d, %d after %d, %s", n_heads,
             n_kv_heads, head_dim, n, pos, CACHE_TYPE_NAMES[cache_type]);
    check(name, worst, 1e-5);  /* values in [-1, 1): absolute error */
    free(scores); free(keys); free(values);
    free_state(&s);
}

/* A block of n tokens after pos cached positions, stored and attended to at once, against
   the same tokens one at a time (each stored, then attending): the same outputs to the bit,
   since either way attention reads the block's keys and values from the cache, rounded. */
static void test_attention_block_vs_tokens(int n_heads, int n_kv_heads, int head_dim, int pos,
                                           int n, int cache_type) {
    int seq_len = pos + n, kv_dim = n_kv_heads * head_dim, q_dim = n_heads * head_dim;
    Config cfg = attention_config(n_heads, n_kv_heads, head_dim, seq_len);
    RunState s = {0};
    alloc_state(&s, &cfg, seq_len, cache_type);
    float *keys = malloc((size_t)seq_len * kv_dim * sizeof(float));
    float *values = malloc((size_t)seq_len * kv_dim * sizeof(float));
    float *q = malloc((size_t)n * q_dim * sizeof(float));
    float *block = malloc((size_t)n * q_dim * sizeof(float));
    fill(keys, (size_t)seq_len * kv_dim);
    fill(values, (size_t)seq_len * kv_dim);
    for (size_t i = 0; i < (size_t)n * q_dim; i++) q[i] = 4.0f * uniform();
    fill_cache(&s, &cfg, keys, values, 0, pos);
    memcpy(s.k, keys + (size_t)pos * kv_dim, (size_t)n * kv_dim * sizeof(float));
    memcpy(s.v, values + (size_t)pos * kv_dim, (size_t)n * kv_dim * sizeof(float));
    memcpy(s.q, q, (size_t)n * q_dim * sizeof(float));
    store_kv(&s, &cfg, 0, pos, n);
    attention(&s, &cfg, 0, pos, n);
    memcpy(block, s.xb, (size_t)n * q_dim * sizeof(float));
    double worst = 0.0;
    for (int t = 0; t < n; t++) {
        memcpy(s.k, keys + (size_t)(pos + t) * kv_dim, (size_t)kv_dim * sizeof(float));
        memcpy(s.v, values + (size_t)(pos + t) * kv_dim, (size_t)kv_dim * sizeof(float));
        memcpy(s.q, q + (size_t)t * q_dim, (size_t)q_dim * sizeof(float));
        store_kv(&s, &cfg, 0, pos + t, 1);
        attention(&s, &cfg, 0, pos + t, 1);
        for (int i = 0; i < q_dim; i++)
            worst = fmax(worst, fabs((double)s.xb[i] - block[(size_t)t * q_dim + i]));
    }
    char name[96];
    snprintf(name, sizeof name, "attention block = tokens, %d/%d of %d, %d after %d, %s",
             n_heads, n_kv_heads, head_dim, n, pos, CACHE_TYPE_NAMES[cache_type]);
    check(name, worst, 0.0);
    free(keys); free(values); free(q); free(block);
    free_state(&s);
}

/* softmax and swiglu (exp16 with AVX-512, exp4 with NEON, expf otherwise) against double
   loops, with ragged lengths; the vectorised exp itself over its whole range in ulps of the
   true value. */
#if defined __AVX512F__ || HAS_NEON || HAS_AVX2
static double ulps(float got, double want) {
    if (want == 0.0) return got == 0.0f ? 0.0 : INFINITY;
    int exponent;
    frexp(want, &exponent);
    double ulp = ldexp(1.0, exponent - 24 < -149 ? -149 : exponent - 24);
    return fabs((double)got - want) / ulp;
}
#endif

/* quantize_group16 (AVX-512) against quantize_group (scalar), which must agree bit for bit:
   ordinary groups at both q_max, and groups holding NaN, infinities, denormals, zeros, huge
   values and exact halfway steps. Counts the groups whose scale or any value differ. */
static void test_quantize_group(void) {
#if defined __AVX512F__ || HAS_NEON || HAS_AVX2
    int mismatches = 0, groups = 0;
    const float specials[] = { NAN, INFINITY, -INFINITY, 1e-40f, -3e-39f, 0.0f, -0.0f, 3e38f,
                               -3e38f, 0.5f, -2.5f, 127.5f };
    for (int trial = 0; trial < 2000; trial++) {
        int gs = trial % 3 == 0 ? 16 : trial % 3 == 1 ? 64 : 256;
        float x[256], q_max = trial % 2 ? Q16_MAX : Q8_MAX;
        float spread = trial % 7 == 0 ? 1e-39f : trial % 7 == 1 ? 1e30f : 1.0f;
        for (int i = 0; i < gs; i++) x[i] = uniform() * spread;
        if (trial % 5 == 0) x[trial % gs] = specials[trial % 12];
        if (trial % 11 == 0) for (int i = 0; i < gs; i++) x[i] = (float)(i % 9) - 4.0f;
        int16_t a[256], b[256];
#if HAS_AVX2
        float sa = quantize_group(a, x, gs, q_max), sb = quantize_group8(b, x, gs, q_max);
#else
        float sa = quantize_group(a, x, gs, q_max), sb = quantize_group16(b, x, gs, q_max);
#endif
        groups++;
        if (memcmp(&sa, &sb, sizeof sa) != 0 || memcmp(a, b, (size_t)gs * sizeof(int16_t)) != 0)
            mismatches++;
    }
    char name[80];
    snprintf(name, sizeof name, "vector quantize_group = scalar, %d groups (mismatches)", groups);
    check(name, mismatches, 0.0);
#endif
}

/* A group holding a NaN or an infinity quantizes to the scale NaN and zeros, not to an
   ordinary scale with the bad value as 0 (which would launder the damage into a number):
   through quantize_vector here, and section 8's quantize_group16 is held to the same bits by
   test_quantize_group. */
static void test_quantize_nonfinite(void) {
    const float bad[] = { NAN, -NAN, INFINITY, -INFINITY };
    int wrong = 0, cases = 0;
    for (int k = 0; k < 4; k++) {
        for (int gs = 16; gs <= 256; gs *= 4) {
            for (int at = 0; at < gs; at += gs / 4 + 3) {
                float x[256], scales[1];
                int16_t q[256];
                for (int i = 0; i < gs; i++) x[i] = uniform();
                x[at] = bad[k];
                QuantizedVector v = { .q = q, .scales = scales };
                quantize_vector(&v, x, gs, gs, k % 2 ? Q8_MAX : Q16_MAX);
                int zeros = 1;
                for (int i = 0; i < gs; i++) zeros &= q[i] == 0;
                wrong += !isnan(scales[0]) || !zeros;
                cases++;
            }
        }
    }
    char name[80];
    snprintf(name, sizeof name, "quantize NaN/inf group -> NaN scale, %d (wrong)", cases);
    check(name, wrong, 0.0);
}

/* Section 8's vectorised exp on 16 floats. */
#if defined __AVX512F__
#define VECTOR_EXP "exp16"
static void vector_exp(float *out, const float *in) {
    _mm512_storeu_ps(out, exp16(_mm512_loadu_ps(in)));
}
#elif HAS_AVX2
#define VECTOR_EXP "exp8"
static void vector_exp(float *out, const float *in) {
    _mm256_storeu_ps(out, exp8(_mm256_loadu_ps(in)));
    _mm256_storeu_ps(out + 8, exp8(_mm256_loadu_ps(in + 8)));
}
#elif HAS_NEON
#define VECTOR_EXP "exp4"
static void vector_exp(float *out, const float *in) {
    for (int j = 0; j < 16; j += 4) vst1q_f32(out + j, exp4(vld1q_f32(in + j)));
}
#endif

static void test_exp(void) {
#ifdef VECTOR_EXP
    double worst = 0.0;
    int special = 0;
    for (float x = -110.0f; x < 90.0f; x += 0.0123f) {
        float in[16], out[16];
        for (int j = 0; j < 16; j++) in[j] = nextafterf(x, 100.0f) * (1.0f - (float)j * 1e-7f);
        vector_exp(out, in);
        for (int j = 0; j < 16; j++) {
            double want = exp((double)in[j]);
            if (want > FLT_MAX) special += !isinf(out[j]);
            else if (want >= FLT_MIN) worst = fmax(worst, ulps(out[j], want));
            else special += !(out[j] >= 0.0f && out[j] <= FLT_MIN);  /* flushed or denormal */
        }
    }
    float edge[16] = { -INFINITY, INFINITY, NAN, 0.0f, -0.0f, -200.0f, 200.0f };
    float got[16];
    vector_exp(got, edge);
    special += got[0] != 0.0f || !isinf(got[1]) || !isnan(got[2]) || got[3] != 1.0f ||
               got[4] != 1.0f || got[5] != 0.0f || !isinf(got[6]);
    check(VECTOR_EXP " vs exp() in ulps, normal results", worst, 2.0);
    check(VECTOR_EXP " overflow, underflow, inf, NaN, 0", special, 0);
#endif
    for (int n = 1; n <= 100; n += 33) {
        float x[100], gate[100], up[100];
        double want[100], sum = 0.0, max = -INFINITY;
        for (int i = 0; i < n; i++) {
            x[i] = uniform() * 30.0f;
            max = fmax(max, x[i]);
            gate[i] = uniform() * 20.0f;
            up[i] = uniform();
        }
        for (int i = 0; i < n; i++) sum += want[i] = exp(x[i] - max);
        softmax(x, n);
        double worst = 0.0;
        for (int i = 0; i < n; i++) worst = fmax(worst, fabs(x[i] - want[i] / sum));
        char name[80];
        snprintf(name, sizeof name, "softmax of %d vs double", n);
        check(name, worst, 1e-6);
        float g[100];
        memcpy(g, gate, sizeof g);
        swiglu(g, up, 1, n);
        worst = 0.0;
        for (int i = 0; i < n; i++) {
            double silu = gate[i] / (1.0 + exp(-(double)gate[i]));
            worst = fmax(worst, fabs(g[i] - silu * up[i]) / (fabs(silu * up[i]) + 1e-30));
        }
        snprintf(name, sizeof name, "swiglu of %d vs double (relative)", n);
        check(name, worst, 1e-6);
    }
}

static void test_kernels(void) {
    int sizes[] = { 64, 128, 2048, 8192 };
    for (int i = 0; i < 4; i++) test_dots(sizes[i], 64);
    test_dots(96, 32);
    test_dots(96, 48);        /* not whole 32-value blocks: dot_q8's tail loop */
    test_dots(2048, 128);
    test_dots(16384, 8192);   /* groups longer than dot_q8's int32 runs */
    MatmulScratch s = {0};
    alloc_scratch(&s, 1536, 64);
    test_fp16();
    test_dots_q4(128, 32);
    test_dots_q4(2048, 32);
    test_dots_q4(2048, 64);
    test_dots_q4(8192, 32);
    test_dots_q4(96, 96);     /* groups the kernels leave to dot_q4 */
    test_dots_q4(96, 32);     /* a lone last block */
    test_dots_q4(1056, 32);   /* 33 groups: two whole windows of 16 and a lone block */
    test_dots_q4(2048, 128);
    test_dots_q4(4096, 4096);
    test_dots_q4(16384, 8192);  /* a group of one whole int32 run of dot_q4 */
    test_dots_q4(32768, 16384); /* groups longer than dot_q4's int32 runs */
    test_q4_run_bound();
#if HAS_NEON
    test_fp16_neon();
    test_dots_neon(2048, 64);
    test_dots_neon(8192, 32);
    test_dots_neon(96, 16);     /* q8_0 only: groups of 16 */
    test_dots_neon(1056, 96);   /* three blocks a group, a ragged tail for fp32 and bf16 */
    test_dots_neon(4096, 4096); /* the largest group int32 lanes hold exactly */
#endif
    int types[] = { WEIGHT_FP32, WEIGHT_BF16, WEIGHT_Q8_0, WEIGHT_Q4_0 };
    for (int i = 0; i < 4; i++) {
        test_matmul(types[i], 64, 256, 1, &s);
        test_matmul(types[i], 70, 256, 7, &s);     /* ragged row and token edges */
        test_matmul(types[i], 128, 1024, 64, &s);
        test_matmul(types[i], 37, 96, 5, &s);      /* cols not a multiple of 64 */
    }
    for (int i = 0; i < 2; i++) {  /* widths q8_0's groups of 32 cannot take */
        test_matmul(types[i], 128, 1100, 40, &s);  /* column blocks of 512 with a ragged last */
        test_matmul(types[i], 64, 515, 33, &s);    /* odd width: bf16 rows widened, not paired */
    }
    test_matmul_shared(&s);
    {   /* rows wide enough for section 8's wide_rows_fp32 / wide_rows_bf16: whole steps of 8,
           a ragged one */
        MatmulScratch wide = {0};
        alloc_scratch(&wide, 8192, 1);
        for (int type = WEIGHT_FP32; type <= WEIGHT_BF16; type++) {
            test_matmul(type, 16, 8192, 1, &wide);
            test_matmul(type, 21, 4128, 1, &wide);
        }
        free_scratch(&wide);
    }
#if HAS_AVX512_BF16
    test_matmul_fast(WEIGHT_BF16, 64, 256, 1, &s);
    test_matmul_fast(WEIGHT_BF16, 40, 100, 1, &s);     /* a ragged tail of 4 */
    test_matmul_fast(WEIGHT_BF16, 128, 1024, 64, &s);
    test_matmul_fast(WEIGHT_BF16, 72, 1100, 33, &s);   /* ragged column block and strip */
    test_matmul_fast(WEIGHT_BF16, 70, 256, 7, &s);     /* a ragged row tile */
#endif
#if HAS_VNNI
    test_matmul_fast(WEIGHT_Q8_0, 64, 256, 1, &s);
    test_matmul_fast(WEIGHT_Q8_0, 70, 256, 7, &s);     /* ragged panel and strip */
    test_matmul_fast(WEIGHT_Q8_0, 128, 1024, 64, &s);
    test_matmul_fast(WEIGHT_Q8_0, 40, 1536, 33, &s);
#endif
#if HAS_VNNI
    test_matmul_fast(WEIGHT_Q4_0, 64, 256, 1, &s);
    test_matmul_fast(WEIGHT_Q4_0, 70, 96, 1, &s);       /* a partial last step */
    test_matmul_fast(WEIGHT_Q4_0, 70, 256, 7, &s);      /* ragged panel and strip */
    test_matmul_fast(WEIGHT_Q4_0, 40, 1536, 33, &s);
#endif
#if HAS_AVX2  /* decoding rows (prompt batches stay exact with AVX2) */
    test_matmul_fast(WEIGHT_Q8_0, 64, 256, 1, &s);
    test_matmul_fast(WEIGHT_Q4_0, 64, 256, 1, &s);
    test_matmul_fast(WEIGHT_Q4_0, 70, 96, 1, &s);
#endif
#if HAS_NEON
    test_matmul_fast(WEIGHT_Q8_0, 64, 256, 1, &s);
    test_matmul_fast(WEIGHT_Q8_0, 70, 256, 7, &s);     /* ragged panel and tile */
    test_matmul_fast(WEIGHT_Q8_0, 128, 1024, 64, &s);
    test_matmul_fast(WEIGHT_Q8_0, 40, 1536, 33, &s);
    test_matmul_fast(WEIGHT_Q4_0, 64, 256, 1, &s);
    test_matmul_fast(WEIGHT_Q4_0, 70, 96, 1, &s);
    test_matmul_fast(WEIGHT_Q4_0, 70, 256, 7, &s);
    test_matmul_fast(WEIGHT_Q4_0, 40, 1536, 33, &s);
#endif
#if HAS_AMX
    if (s.simd->amx) {
        test_matmul_tiles(WEIGHT_Q8_0, 64, 256, 64, 2, &s);
        test_matmul_tiles(WEIGHT_Q8_0, 70, 256, 64, 7, &s);    /* ragged panel and pack */
        test_matmul_tiles(WEIGHT_Q8_0, 40, 1536, 64, 33, &s);
        test_matmul_tiles(WEIGHT_Q8_0, 48, 96, 32, 17, &s);    /* bf16 only: -a fast wants 64 */
        test_matmul_tiles(WEIGHT_Q4_0, 64, 256, 32, 16, &s);
        test_matmul_tiles(WEIGHT_Q4_0, 70, 96, 32, 5, &s);
        test_matmul_tiles(WEIGHT_Q4_0, 300, 1024, 64, 40, &s); /* two panels, ragged */
        test_matmul_tiles(WEIGHT_Q4_0, 40, 1536, 128, 33, &s);
    } else {
        printf("matmul tiles: AMX built in, but not granted here\n");
    }
#endif
    free_scratch(&s);
    for (int type = CACHE_F32; type <= CACHE_Q8_0; type++) {
        test_attention(32, 8, 64, 0, 1, type);    /* Llama 3.2 1B: one token */
        test_attention(32, 8, 64, 300, 1, type);  /* ... decoding with a ragged last key tile */
        test_attention(32, 8, 64, 37, 64, type);  /* ... a prompt block: four tokens per pass */
        test_attention(32, 8, 64, 290, 3, type);  /* ... 12 rows (tiles of 8 and 4), chunks */
        test_attention(6, 1, 64, 270, 2, type);   /* GQA 6:1: a tile of 8 rows spans 2 tokens */
        test_attention(4, 1, 128, 20, 7, type);   /* 128 dimensions: passes over the values */
        test_attention(3, 3, 96, 17, 5, type);    /* no GQA, 96 dimensions: 3 rows of 3 tokens */
        /* the heads of every Llama 3 (64, 128 dimensions), decoding's 4 rows and prompt
           blocks' 16, ragged tiles */
        test_attention_block_vs_tokens(32, 8, 64, 0, 40, type);
        test_attention_block_vs_tokens(32, 8, 64, 290, 7, type);
        test_attention_block_vs_tokens(32, 8, 128, 33, 19, type);
        test_attention_block_vs_tokens(6, 1, 64, 10, 9, type);
#if !defined __AVX512F__
        /* plain loops: any width (AVX-512 takes a width not a multiple of 64 partly one
           value at a time, with a mul and an add where its vectors fuse them) */
        test_attention_block_vs_tokens(3, 3, 96, 17, 5, type);
        test_attention_block_vs_tokens(4, 4, 32, 20, 6, type);
#endif
    }
    for (int type = CACHE_F32; type <= CACHE_BF16; type++) {  /* not whole q8_0 groups: */
        test_attention(4, 2, 16, 50, 9, type);    /* narrow heads, GQA 2:1: the plain loops */
        test_attention(3, 3, 40, 17, 5, type);    /* no GQA, 40 dimensions: 3 rows of 3 tokens */
    }
    test_exp();
    test_quantize_group();
    test_quantize_nonfinite();
}

/* Feeds tokens[0 .. n-1] in blocks as generation does: no logits before the last block, then
   only the last token's (the last layer then skips the other tokens' queries, attention and
   FFN). Returns those logits. */
static const float *feed_prompt(Transformer *tr, const int *tokens, int n) {
    const float *logits = NULL;
    for (int i = 0; i < n; i += MAX_BATCH) {
        int block = n - i < MAX_BATCH ? n - i : MAX_BATCH;
        logits = forward(tr, tokens + i, block, i, i + block < n ? LOGITS_NONE : LOGITS_LAST);
    }
    return logits;
}

/* The largest difference between two rows of logits (NaN once any is NaN: fmax would drop
   it), and the largest magnitude seen. */
static void compare_logits(const float *a, const float *b, int vocab, double *worst,
                           double *range) {
    for (int v = 0; v < vocab; v++) {
        double d = fabs(a[v] - b[v]);
        if (isnan(d) || d > *worst) *worst = d;
        *range = fmax(*range, fabs(a[v]));
    }
}

/* The prompt path against decoding: n tokens as blocks (all logits) vs one at a time; then
   the prompt fed as generation feeds it (last logits only), and one more token decoded after
   it, which reads every layer's cache that the prompt left. */
static void test_model(const char *path, int n, int cache_type) {
    Transformer tr = {0};
    load_model(path, &tr.model, WEIGHTS_AUTO);
    const Config *cfg = &tr.model.config;
    int vocab = cfg->vocab_size;
    alloc_state(&tr.state, cfg, n + 1, cache_type);
    int *tokens = malloc((size_t)(n + 1) * sizeof(int));
    for (int i = 0; i <= n; i++) tokens[i] = (int)(random_u32(&rng_state) % (unsigned)vocab);
    float *blocked = malloc((size_t)(n + 1) * vocab * sizeof(float));
    for (int i = 0; i < n; i += MAX_BATCH) {
        int block = n - i < MAX_BATCH ? n - i : MAX_BATCH;
        forward(&tr, tokens + i, block, i, LOGITS_ALL);
        memcpy(blocked + (size_t)i * vocab, tr.state.logits, (size_t)block * vocab * sizeof(float));
    }
    double worst = 0.0, range = 0.0;
    for (int i = 0; i <= n; i++) {  /* token n: the decoding reference for the check below */
        const float *one = forward(&tr, tokens + i, 1, i, LOGITS_LAST);
        if (i < n) compare_logits(one, blocked + (size_t)i * vocab, vocab, &worst, &range);
        else memcpy(blocked + (size_t)n * vocab, one, (size_t)vocab * sizeof(float));
    }
    char name[120];
    snprintf(name, sizeof name, "blocks vs one at a time, %s, %s cache, %d tokens",
             WEIGHT_TYPE_NAMES[cfg->weight_type], CACHE_TYPE_NAMES[cache_type], n);
    /* q8_0 (and q4_0) decoding rounds activations to int16; blocks do too with AVX-512 VNNI (then only
       the order of the group sums differs, 1.8e-4 measured) and keep them float32 otherwise
       (2.4e-4): of the logits' range on tiny32, a peaked random model that amplifies any
       rounding */
    int quantized = cfg->weight_type == WEIGHT_Q8_0 || cfg->weight_type == WEIGHT_Q4_0;
    double bound = quantized ? 1e-3 : 1e-5;
    /* A bf16 or q8_0 cache rounds keys and values: where the two feedings' keys differ in
       their last bits, one may round a step the other way (a bf16 ulp, an int8 step), which
       the peaked tiny models amplify: 3.6e-3 (bf16) and 1.4e-2 (q8_0) measured on tiny31 and
       tiny32, every weight type */
    if (cache_type == CACHE_BF16) bound = 2e-2;
    if (cache_type == CACHE_Q8_0) bound = 5e-2;
#if !HAVE_SIMD
    /* in a portable build, fp32 and bf16 weights take the same sums for a batch as for one
       token, and attention reads the batch's keys and values from the cache: identical */
    if (cfg->weight_type == WEIGHT_FP32 || cfg->weight_type == WEIGHT_BF16) bound = 0.0;
#endif
    check(name, worst / range, bound);

    /* NaN in the cache: a key or value the fed prompt failed to store would show */
    size_t cache_values = (size_t)cfg->n_layers * tr.state.cache_len * cfg->n_kv_heads *
                          cfg->head_dim;
    size_t cache_size = cache_values * CACHE_TYPE_SIZES[cache_type];
    memset(tr.state.key_cache, 0xff, cache_size);  /* NaN in f32 and bf16; q8_0: NaN scales */
    memset(tr.state.value_cache, 0xff, cache_size);
    if (cache_type == CACHE_Q8_0) {
        memset(tr.state.key_scales, 0xff, cache_values / CACHE_GROUP * sizeof(float));
        memset(tr.state.value_scales, 0xff, cache_values / CACHE_GROUP * sizeof(float));
    }
    double fed_worst = 0.0, fed_range = 0.0;
    compare_logits(feed_prompt(&tr, tokens, n), blocked + (size_t)(n - 1) * vocab, vocab,
                   &fed_worst, &fed_range);
    compare_logits(forward(&tr, tokens + n, 1, n, LOGITS_LAST), blocked + (size_t)n * vocab,
                   vocab, &fed_worst, &fed_range);
    snprintf(name, sizeof name, "prompt fed for its last logits, one more token, %s, %s",
             WEIGHT_TYPE_NAMES[cfg->weight_type], CACHE_TYPE_NAMES[cache_type]);
    check(name, fed_worst / fed_range, bound);
    free(tokens); free(blocked);
    free_state(&tr.state);
    free_model(&tr.model);
}

int main(int argc, char **argv) {
    if (argc == 3 || argc == 4)
        test_model(argv[1], atoi(argv[2]), argc == 4 ? atoi(argv[3]) : CACHE_F32);
    else test_kernels();
    return failures;
}
