/* decode_parts.c: where a decoding step's time goes, part by part. Each round times, one
   after the other in this one process (so that the machine's bandwidth flips, which last
   seconds to minutes, hit every part alike):

     contiguous  every weight byte, each thread reading one half: the memory's own rate
     rows        the bytes decoding reads, in the order it reads them: each product's rows in
                 guided runs, one parallel region per group of products as forward() makes
                 them, plain loads with no arithmetic (q8_0: each row's scales too)
     matmuls     the same products through run.c's matmul
     forward     forward() on one token, the greedy next token fed back

   and prints each as GB/s of weights read per token (forward: its decoding rate in tok/s
   too), medians over the rounds; when the contiguous readings span the machine's two
   bandwidth states (the highest 1.3x the lowest or more), the rounds above and below their
   midpoint separately. tests/bench.py runs it on each model it exports.

   It includes run.c whole, as tests/test_kernels.c does, so that the matmuls and forward pass
   timed are the engine's own.

   usage: decode_parts MODEL.bin [seconds (default 15)] [fast (the matmuls as -a fast)] */

#define main run_main
#include "../../run.c"
#undef main

#define PARTS 4
static const char *part_names[PARTS] = { "contiguous", "rows", "matmuls", "forward" };

static double seconds_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Reads n bytes (a multiple of 64) with 64-byte loads into two accumulators; returns a value
   that depends on every byte, so that no load is optimised away. */
static uint64_t read_bytes(const unsigned char *p, size_t n) {
#if defined __AVX512F__
    __m512i a = _mm512_setzero_si512(), b = a;
    size_t i = 0;
    for (; i + 128 <= n; i += 128) {
        a = _mm512_add_epi64(a, _mm512_loadu_si512((const void *)(p + i)));
        b = _mm512_add_epi64(b, _mm512_loadu_si512((const void *)(p + i + 64)));
    }
    if (i < n) a = _mm512_add_epi64(a, _mm512_loadu_si512((const void *)(p + i)));
    return (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(a, b));
#else
    uint64_t a = 0, b = 0, word;
    for (size_t i = 0; i + 16 <= n; i += 16) {
        memcpy(&word, p + i, 8);
        a += word;
        memcpy(&word, p + i + 8, 8);
        b += word;
    }
    return a + b;
#endif
}

/* Bytes of a matrix's row (q8_0, q4_0: its values, without the scales). */
static size_t row_bytes(const Matrix *w) {
    size_t cols = (size_t)w->cols;
    return w->type == WEIGHT_FP32 ? 4 * cols : w->type == WEIGHT_BF16 ? 2 * cols :
           w->type == WEIGHT_Q8_0 ? cols : cols / 2;
}

/* Bytes of one scale (q8_0: float32, q4_0: fp16; none for the others). */
static size_t scale_bytes(const Matrix *w) {
    return w->type == WEIGHT_Q8_0 ? 4 : w->type == WEIGHT_Q4_0 ? 2 : 0;
}

/* Reads what decoding reads of row r: the row (in whole 64-byte lines), and for q8_0 and
   q4_0 one value of each line of its scales, which lie after the matrix. */
static uint64_t read_row(const Matrix *w, int r) {
    size_t row = row_bytes(w);
    uint64_t sum = read_bytes((const unsigned char *)w->data + (size_t)r * row, row / 64 * 64);
    if (scale_bytes(w)) {
        size_t groups = (size_t)(w->cols / w->group_size), per_line = 64 / scale_bytes(w);
        for (size_t g = 0; g < groups; g += per_line)
            sum += w->type == WEIGHT_Q8_0 ? (uint64_t)w->scales[(size_t)r * groups + g]
                                          : w->fp16_scales[(size_t)r * groups + g];
    }
    return sum;
}

/* The products of one decoding step, grouped as forward() hands them to matmul, with
   the RunState buffers it reads and writes (their placement in memory matters: an input of
   its own, heap-allocated, made the fp32 matmuls 10% slower than forward's). */
typedef struct {
    const Matrix *m[3];
    float *out[3];
    const float *in;
    int count;
} ProductGroup;

static int decoding_groups(const Weights *w, const Config *cfg, RunState *s,
                           ProductGroup *groups) {
    int n = 0;
    for (int l = 0; l < cfg->n_layers; l++) {
        const Layer *layer = &w->layers[l];
        groups[n++] = (ProductGroup){ { &layer->wq, &layer->wk, &layer->wv },
                                      { s->q, s->k, s->v }, s->xb, 3 };
        groups[n++] = (ProductGroup){ { &layer->wo }, { s->xb2 }, s->xb, 1 };
        groups[n++] = (ProductGroup){ { &layer->w_gate, &layer->w_up }, { s->hb, s->hb2 },
                                      s->xb, 2 };
        groups[n++] = (ProductGroup){ { &layer->w_down }, { s->xb2 }, s->hb, 1 };
    }
    groups[n++] = (ProductGroup){ { &w->classifier }, { s->logits }, s->x, 1 };
    return n;
}

static double group_bytes(const ProductGroup *groups, int n) {
    double bytes = 0.0;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < groups[i].count; j++) {
            const Matrix *m = groups[i].m[j];
            double scales = scale_bytes(m) ? (double)scale_bytes(m) / m->group_size : 0.0;
            bytes += (double)m->rows * ((double)row_bytes(m) + m->cols * scales);
        }
    return bytes;
}

static volatile uint64_t sink;  /* where the reads' sums go, so that they stay */

static void time_contiguous(const unsigned char *start, size_t bytes) {
#if defined _OPENMP
#pragma omp parallel
#endif
    {
#if defined _OPENMP
        int id = omp_get_thread_num(), n = omp_get_num_threads();
#else
        int id = 0, n = 1;
#endif
        size_t share = bytes / (size_t)n / 64 * 64;
        sink += read_bytes(start + (size_t)id * share, share);
    }
}

static void time_rows(const ProductGroup *groups, int n) {
    for (int i = 0; i < n; i++) {
#if defined _OPENMP
#pragma omp parallel
#endif
        {
            uint64_t sum = 0;
            for (int j = 0; j < groups[i].count; j++) {
                const Matrix *m = groups[i].m[j];
#if defined _OPENMP
#pragma omp for schedule(guided) nowait
#endif
                for (int r = 0; r < m->rows; r++) sum += read_row(m, r);
            }
            sink += sum;
        }
    }
}

static void time_matmuls(const ProductGroup *groups, int n, MatmulScratch *s) {
    for (int i = 0; i < n; i++) {
        Product p[3] = { { NULL, NULL } };
        for (int j = 0; j < groups[i].count; j++)
            p[j] = (Product){ groups[i].out[j], groups[i].m[j] };
        matmul(p, groups[i].count, groups[i].in, 1, s);
    }
}

static int greedy(const float *logits, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (logits[i] > logits[best]) best = i;
    return best;
}

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof(double), compare_doubles);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Medians of the rounds whose contiguous rate is (high) or is not (!high) above the cut. */
static void report(double (*rates)[PARTS], int rounds, double cut, int high, const char *what,
                   double bytes) {
    double *column = checked_calloc((size_t)rounds, sizeof(double), "results");
    double medians[PARTS];
    int n = 0;
    for (int p = 0; p < PARTS; p++) {
        n = 0;
        for (int r = 0; r < rounds; r++)
            if ((rates[r][0] > cut) == high) column[n++] = rates[r][p];
        if (n == 0) break;
        medians[p] = median(column, n);
    }
    free(column);
    if (n == 0) return;
    printf("%s, %d rounds:", what, n);
    for (int p = 0; p < PARTS; p++)
        printf("  %s %.1f (%.0f%%)", part_names[p], medians[p], 100.0 * medians[p] / medians[0]);
    printf("  GB/s; forward %.1f tok/s\n", medians[PARTS - 1] * 1e9 / bytes);
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 4 || (argc == 4 && strcmp(argv[3], "fast") != 0)) {
        fprintf(stderr, "usage: decode_parts MODEL.bin [seconds] [fast]\n");
        return 2;
    }
    double duration = argc >= 3 ? atof(argv[2]) : 15.0;
    Transformer tr = {0};
    load_model(argv[1], &tr.model, WEIGHTS_AUTO);  /* as run does by default */
    const Config *cfg = &tr.model.config;
    alloc_state(&tr.state, cfg, 256, CACHE_F32);
    if (argc == 4) (void)simd_set_fast(&tr.state.scratch, cfg->weight_type, cfg->group_size);
    ProductGroup *groups = checked_calloc((size_t)cfg->n_layers * 4 + 1, sizeof(ProductGroup),
                                          "groups");
    int n_groups = decoding_groups(&tr.model.weights, cfg, &tr.state, groups);
    double bytes = group_bytes(groups, n_groups);
    const unsigned char *first = (const unsigned char *)tr.model.weights.embedding.data;
    size_t span = tr.model.mapping_size - (size_t)(first - tr.model.mapping);

    int capacity = 1024, rounds = 0, token = cfg->bos_id, pos = 0;
    double (*rates)[PARTS] = checked_calloc((size_t)capacity, sizeof *rates, "results");
    time_contiguous(first, span);  /* (fault the mapping in before any timing) */
    double start = seconds_now();
    while (rounds < capacity && (rounds == 0 || seconds_now() - start < duration)) {
        for (int p = 0; p < PARTS; p++) {
            double t0 = seconds_now();
            if (p == 0) time_contiguous(first, span);
            else if (p == 1) time_rows(groups, n_groups);
            else if (p == 2) time_matmuls(groups, n_groups, &tr.state.scratch);
            else {
                token = greedy(forward(&tr, &token, 1, pos, LOGITS_LAST), cfg->vocab_size);
                pos = (pos + 1) % 200;
            }
            double seconds = seconds_now() - t0;
            rates[rounds][p] = (p == 0 ? (double)span : bytes) / seconds / 1e9;
        }
        rounds++;
    }
    double low = rates[0][0], high = rates[0][0];
    for (int r = 1; r < rounds; r++) {
        if (rates[r][0] < low) low = rates[r][0];
        if (rates[r][0] > high) high = rates[r][0];
    }
    printf("%s: %s weights%s, %.2f GB per token; contiguous reads %.1f-%.1f GB/s\n", argv[1],
           WEIGHT_TYPE_NAMES[cfg->weight_type], argc == 4 ? " (-a fast)" : "", bytes / 1e9, low,
           high);
    if (high < 1.3 * low) {
        report(rates, rounds, 0.0, 1, "all", bytes);
    } else {
        report(rates, rounds, (low + high) / 2, 1, "higher state", bytes);
        report(rates, rounds, (low + high) / 2, 0, "lower state", bytes);
    }
    free(rates); free(groups);
    free_state(&tr.state);
    free_model(&tr.model);
    return 0;
}
