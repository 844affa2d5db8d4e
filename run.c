/* run.c: inference for the Llama 3 family (3.0, 3.1, 3.2 text models) in one C file.

   Read it top to bottom, in the order the data flows:
     1. the model file: header, validation, memory map
     2. the math: rmsnorm, softmax, the one matmul dispatch (fp32, bf16, q8_0), RoPE
     3. the forward pass: one token through every layer, with a KV cache
     4. the sampler: greedy, temperature, top-p
     5. generation: prompt in, tokens out, timings
     6. chat: Meta's dialog format over one KV cache
     7. the command line

   The model file is written by export.py; its layout is documented in README.md ("File
   formats") and mirrored by the loader below. The tokenizer lives in tokenizer.c. */

#define _POSIX_C_SOURCE 200809L  /* mmap, getline, clock_gettime */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#if defined _OPENMP
#include <omp.h>
#endif

#include "tokenizer.h"

/* One clear line on stderr and a non-zero exit: how every user-facing error ends. */
static void die(const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    fprintf(stderr, "run: error: ");
    vfprintf(stderr, fmt, args);
    fprintf(stderr, "\n");
    va_end(args);
    exit(EXIT_FAILURE);
}

static void *checked_calloc(size_t count, size_t size, const char *what) {
    void *p = calloc(count, size);
    if (!p) die("out of memory allocating %s (%zu x %zu bytes)", what, count, size);
    return p;
}

/* ----------------------------------------------------------------------------------------
   1. The model file

   A 256-byte little-endian header, then the tensors, each at a 64-byte aligned offset, in the
   order the forward pass uses them. Matrices are [rows = out, cols = in], row-major, in the
   file's weight type; norm vectors are float32. */

#define MODEL_MAGIC "L3CM"
#define MODEL_VERSION 1
#define HEADER_BYTES 256
#define TENSOR_ALIGN 64
#define MAX_EOS 8

enum { WEIGHT_FP32 = 0, WEIGHT_BF16 = 1, WEIGHT_Q8_0 = 2 };
static const char *weight_type_name(int type) {
    return type == WEIGHT_FP32 ? "fp32" : type == WEIGHT_BF16 ? "bf16" : "q8_0";
}

typedef struct {
    int dim;          /* width of the residual stream (hidden_size) */
    int hidden_dim;   /* width of the feed-forward layer (intermediate_size) */
    int n_layers;
    int n_heads;      /* query heads */
    int n_kv_heads;   /* key/value heads: fewer than n_heads is grouped-query attention */
    int head_dim;
    int vocab_size;
    int max_seq_len;  /* the context the model was trained for */
    float rope_theta;
    float norm_eps;
    int rope_scaling; /* 0: none, 1: Llama 3.1 "llama3" frequency scaling */
    float rope_factor, rope_low_freq_factor, rope_high_freq_factor;
    int rope_original_max_pos;
    int tied_classifier; /* 1: the classifier is the token embedding matrix */
    int weight_type;     /* WEIGHT_* */
    int group_size;      /* q8_0: values per scale */
    int bos_id;
    int n_eos;
    int eos_ids[MAX_EOS];
} Config;

/* A weight matrix as it lies in the mapped file. */
typedef struct {
    int type;             /* WEIGHT_* */
    int rows, cols;
    int group_size;       /* q8_0 only */
    const void *data;     /* float, uint16_t (bf16) or int8_t (q8_0) values */
    const float *scales;  /* q8_0: one per group_size values, row-major */
} Matrix;

typedef struct {
    const float *attn_norm;
    Matrix wq, wk, wv, wo;
    const float *ffn_norm;
    Matrix w_gate, w_down, w_up;
} Layer;

typedef struct {
    Matrix embedding;
    Layer *layers;
    const float *final_norm;
    Matrix classifier;    /* the embedding itself when the model is tied */
} Weights;

static int32_t read_i32(const unsigned char *p) { int32_t v; memcpy(&v, p, 4); return v; }
static float read_f32(const unsigned char *p) { float v; memcpy(&v, p, 4); return v; }

/* Fills cfg from the header bytes and checks every field on its own and against the others.
   Returns NULL, or a message naming the first problem. Limits are generous (far beyond any
   Llama 3 model) but keep every size product far from 64-bit overflow. */
static const char *parse_header(const unsigned char *h, size_t file_size, Config *cfg) {
    if (file_size < HEADER_BYTES) return "file is shorter than the 256-byte header";
    if (memcmp(h, MODEL_MAGIC, 4) != 0) return "not a llama3.c model file (bad magic)";
    if (read_i32(h + 4) != MODEL_VERSION) return "unsupported model file version";
    cfg->dim = read_i32(h + 8);
    cfg->hidden_dim = read_i32(h + 12);
    cfg->n_layers = read_i32(h + 16);
    cfg->n_heads = read_i32(h + 20);
    cfg->n_kv_heads = read_i32(h + 24);
    cfg->head_dim = read_i32(h + 28);
    cfg->vocab_size = read_i32(h + 32);
    cfg->max_seq_len = read_i32(h + 36);
    cfg->rope_theta = read_f32(h + 40);
    cfg->norm_eps = read_f32(h + 44);
    cfg->rope_scaling = read_i32(h + 48);
    cfg->rope_factor = read_f32(h + 52);
    cfg->rope_low_freq_factor = read_f32(h + 56);
    cfg->rope_high_freq_factor = read_f32(h + 60);
    cfg->rope_original_max_pos = read_i32(h + 64);
    cfg->tied_classifier = read_i32(h + 68);
    cfg->weight_type = read_i32(h + 72);
    cfg->group_size = read_i32(h + 76);
    cfg->bos_id = read_i32(h + 80);
    cfg->n_eos = read_i32(h + 84);
    for (int i = 0; i < MAX_EOS; i++) cfg->eos_ids[i] = read_i32(h + 88 + 4 * i);

    if (cfg->dim <= 0 || cfg->dim > (1 << 20)) return "dim out of range";
    if (cfg->hidden_dim <= 0 || cfg->hidden_dim > (1 << 20)) return "hidden_dim out of range";
    if (cfg->n_layers <= 0 || cfg->n_layers > 1024) return "n_layers out of range";
    if (cfg->n_heads <= 0 || cfg->n_heads > 4096) return "n_heads out of range";
    if (cfg->n_kv_heads <= 0 || cfg->n_kv_heads > cfg->n_heads) return "n_kv_heads out of range";
    if (cfg->n_heads % cfg->n_kv_heads != 0) return "n_kv_heads does not divide n_heads";
    if (cfg->head_dim <= 0 || cfg->head_dim > 4096 || cfg->head_dim % 2 != 0)
        return "head_dim must be even and in range";
    if ((int64_t)cfg->n_heads * cfg->head_dim > (1 << 20)) return "n_heads * head_dim too large";
    if (cfg->vocab_size <= 0 || cfg->vocab_size > (1 << 22)) return "vocab_size out of range";
    if (cfg->max_seq_len <= 0 || cfg->max_seq_len > (1 << 24)) return "max_seq_len out of range";
    if (!(cfg->rope_theta > 1.0f) || !isfinite(cfg->rope_theta)) return "rope_theta must be > 1";
    if (!(cfg->norm_eps > 0.0f) || !(cfg->norm_eps < 1.0f)) return "norm_eps out of range";
    if (cfg->rope_scaling != 0 && cfg->rope_scaling != 1) return "unknown rope_scaling type";
    if (cfg->rope_scaling == 1) {
        if (!(cfg->rope_factor >= 1.0f) || !isfinite(cfg->rope_factor))
            return "rope factor must be >= 1";
        if (!(cfg->rope_low_freq_factor > 0.0f) || !isfinite(cfg->rope_high_freq_factor) ||
            !(cfg->rope_high_freq_factor > cfg->rope_low_freq_factor))
            return "rope low/high frequency factors must satisfy 0 < low < high";
        if (cfg->rope_original_max_pos <= 0) return "rope original context must be positive";
    }
    if (cfg->tied_classifier != 0 && cfg->tied_classifier != 1) return "tied flag is not 0 or 1";
    if (cfg->weight_type < WEIGHT_FP32 || cfg->weight_type > WEIGHT_Q8_0)
        return "unknown weight type";
    if (cfg->weight_type == WEIGHT_Q8_0) {
        int gs = cfg->group_size, q_dim = cfg->n_heads * cfg->head_dim;
        if (gs <= 0 || cfg->dim % gs || cfg->hidden_dim % gs || q_dim % gs)
            return "q8_0 group size must divide dim, hidden_dim and n_heads * head_dim";
    }
    if (cfg->bos_id < 0 || cfg->bos_id >= cfg->vocab_size) return "bos id outside the vocabulary";
    if (cfg->n_eos < 1 || cfg->n_eos > MAX_EOS) return "number of eos ids out of range";
    for (int i = 0; i < cfg->n_eos; i++)
        if (cfg->eos_ids[i] < 0 || cfg->eos_ids[i] >= cfg->vocab_size)
            return "eos id outside the vocabulary";
    return NULL;
}

static uint64_t align_up(uint64_t offset) {
    return (offset + TENSOR_ALIGN - 1) / TENSOR_ALIGN * TENSOR_ALIGN;
}

/* Walks the tensors in file order. With base == NULL it only computes offsets, which is how
   the expected file size is found before any pointer into the file is formed. */
typedef struct {
    const unsigned char *base;
    uint64_t offset;
} FileCursor;

static const float *take_vector(FileCursor *c, int n) {
    c->offset = align_up(c->offset);
    const float *v = c->base ? (const float *)(c->base + c->offset) : NULL;
    c->offset += (uint64_t)n * sizeof(float);
    return v;
}

static Matrix take_matrix(FileCursor *c, const Config *cfg, int rows, int cols) {
    Matrix m = { .type = cfg->weight_type, .rows = rows, .cols = cols,
                 .group_size = cfg->group_size };
    uint64_t count = (uint64_t)rows * (uint64_t)cols;
    uint64_t bytes_per_value = cfg->weight_type == WEIGHT_FP32 ? 4 :
                               cfg->weight_type == WEIGHT_BF16 ? 2 : 1;
    c->offset = align_up(c->offset);
    if (c->base) m.data = c->base + c->offset;
    c->offset += count * bytes_per_value;
    if (cfg->weight_type == WEIGHT_Q8_0) {
        c->offset = align_up(c->offset);
        if (c->base) m.scales = (const float *)(c->base + c->offset);
        c->offset += count / (uint64_t)cfg->group_size * sizeof(float);
    }
    return m;
}

/* Lays the tensors out from base (or, with base NULL, just measures). Returns the end offset. */
static uint64_t map_weights(const Config *cfg, const unsigned char *base, Weights *w) {
    FileCursor c = { base, HEADER_BYTES };
    int q_dim = cfg->n_heads * cfg->head_dim, kv_dim = cfg->n_kv_heads * cfg->head_dim;
    w->embedding = take_matrix(&c, cfg, cfg->vocab_size, cfg->dim);
    for (int l = 0; l < cfg->n_layers; l++) {
        Layer layer;
        layer.attn_norm = take_vector(&c, cfg->dim);
        layer.wq = take_matrix(&c, cfg, q_dim, cfg->dim);
        layer.wk = take_matrix(&c, cfg, kv_dim, cfg->dim);
        layer.wv = take_matrix(&c, cfg, kv_dim, cfg->dim);
        layer.wo = take_matrix(&c, cfg, cfg->dim, q_dim);
        layer.ffn_norm = take_vector(&c, cfg->dim);
        layer.w_gate = take_matrix(&c, cfg, cfg->hidden_dim, cfg->dim);
        layer.w_down = take_matrix(&c, cfg, cfg->dim, cfg->hidden_dim);
        layer.w_up = take_matrix(&c, cfg, cfg->hidden_dim, cfg->dim);
        if (w->layers) w->layers[l] = layer;
    }
    w->final_norm = take_vector(&c, cfg->dim);
    w->classifier = cfg->tied_classifier ? w->embedding
                                         : take_matrix(&c, cfg, cfg->vocab_size, cfg->dim);
    return c.offset;
}

/* Checks a whole model file image; on success fills cfg. Returns NULL or the problem.
   Kept free of side effects so that it can be fuzzed on any byte string. */
static const char *validate_model(const unsigned char *data, size_t size, Config *cfg,
                                  char *msg, size_t msg_size) {
    const char *problem = parse_header(data, size, cfg);
    if (problem) return problem;
    Weights sizes = {0};
    uint64_t expected = map_weights(cfg, NULL, &sizes);
    if ((uint64_t)size != expected) {
        snprintf(msg, msg_size, "file is %llu bytes but its header implies %llu (%s)",
                 (unsigned long long)size, (unsigned long long)expected,
                 size < expected ? "truncated" : "trailing data");
        return msg;
    }
    return NULL;
}

typedef struct {
    Config config;
    Weights weights;
    unsigned char *mapping;
    size_t mapping_size;
} Model;

static void load_model(const char *path, Model *m) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("cannot open model file %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) die("cannot stat model file %s: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode)) die("model file %s is not a regular file", path);
    if (st.st_size < HEADER_BYTES)
        die("model file %s: file is shorter than the 256-byte header", path);
    m->mapping_size = (size_t)st.st_size;
    void *map = mmap(NULL, m->mapping_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) die("cannot map model file %s: %s", path, strerror(errno));
    m->mapping = map;
    char msg[160];
    const char *problem = validate_model(m->mapping, m->mapping_size, &m->config, msg, sizeof msg);
    if (problem) die("model file %s: %s", path, problem);
    m->weights.layers = checked_calloc((size_t)m->config.n_layers, sizeof(Layer), "layers");
    map_weights(&m->config, m->mapping, &m->weights);
}

static void free_model(Model *m) {
    free(m->weights.layers);
    if (m->mapping) munmap(m->mapping, m->mapping_size);
}

/* ----------------------------------------------------------------------------------------
   2. The math

   Every weight type goes through matmul(); the per-type row kernels below are the only place
   that knows how a type's bytes become numbers. */

static float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static float dot_row_fp32(const float *w, const float *x, int n) {
    float sum = 0.0f;
    for (int i = 0; i < n; i++) sum += w[i] * x[i];
    return sum;
}

static float dot_row_bf16(const uint16_t *w, const float *x, int n) {
    float sum = 0.0f;
    for (int i = 0; i < n; i++) sum += bf16_to_float(w[i]) * x[i];
    return sum;
}

/* q8_0: each group of group_size int8 values shares one float scale. */
static float dot_row_q8(const int8_t *w, const float *scales, const float *x, int n, int gs) {
    float sum = 0.0f;
    for (int g = 0; g < n / gs; g++) {
        float group_sum = 0.0f;
        for (int i = 0; i < gs; i++) group_sum += (float)w[g * gs + i] * x[g * gs + i];
        sum += group_sum * scales[g];
    }
    return sum;
}

/* out[rows] = W[rows][cols] @ x[cols]. Rows are independent: split them over threads. */
static void matmul(float *out, const float *x, const Matrix *w) {
    int rows = w->rows, cols = w->cols;
#if defined _OPENMP
#pragma omp parallel for schedule(static)
#endif
    for (int r = 0; r < rows; r++) {
        size_t row_start = (size_t)r * (size_t)cols;
        switch (w->type) {
        case WEIGHT_FP32:
            out[r] = dot_row_fp32((const float *)w->data + row_start, x, cols);
            break;
        case WEIGHT_BF16:
            out[r] = dot_row_bf16((const uint16_t *)w->data + row_start, x, cols);
            break;
        default:
            out[r] = dot_row_q8((const int8_t *)w->data + row_start,
                                w->scales + row_start / (size_t)w->group_size, x, cols,
                                w->group_size);
        }
    }
}

/* Writes row `row` of a matrix as floats: the embedding lookup. */
static void matrix_row(float *out, const Matrix *w, int row) {
    size_t start = (size_t)row * (size_t)w->cols;
    for (int i = 0; i < w->cols; i++) {
        switch (w->type) {
        case WEIGHT_FP32: out[i] = ((const float *)w->data)[start + i]; break;
        case WEIGHT_BF16: out[i] = bf16_to_float(((const uint16_t *)w->data)[start + i]); break;
        default:
            out[i] = (float)((const int8_t *)w->data)[start + i] *
                     w->scales[(start + i) / (size_t)w->group_size];
        }
    }
}

static void rmsnorm(float *out, const float *x, const float *weight, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float scale = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = weight[i] * (x[i] * scale);
}

static void softmax(float *x, int n) {
    float max = x[0];
    for (int i = 1; i < n; i++) if (x[i] > max) max = x[i];
    float sum = 0.0f;
    for (int i = 0; i < n; i++) { x[i] = expf(x[i] - max); sum += x[i]; }
    for (int i = 0; i < n; i++) x[i] /= sum;
}

/* RoPE frequencies, computed with exactly the float32 operations of Meta's reference code
   (one rounding per step, no fused multiply-add), so that long-context logits agree with it
   to float noise: at position ~8300 one ulp of a frequency is ~5e-4 rad of rotation. */
static void rope_frequencies(const Config *cfg, float *freqs) {
    for (int i = 0; i < cfg->head_dim / 2; i++) {
        float exponent = (float)(2 * i) / (float)cfg->head_dim;
        float f = 1.0f / powf(cfg->rope_theta, exponent);
        if (cfg->rope_scaling == 1) {
            float orig = (float)cfg->rope_original_max_pos;
            float low_freq_wavelen = orig / cfg->rope_low_freq_factor;
            float high_freq_wavelen = orig / cfg->rope_high_freq_factor;
            float wavelen = 6.2831855f / f;  /* 2*pi rounded to float */
            if (wavelen > low_freq_wavelen) {
                f = f / cfg->rope_factor;
            } else if (wavelen >= high_freq_wavelen) {
                float ratio = orig / wavelen;
                float smooth = (ratio - cfg->rope_low_freq_factor) /
                               (cfg->rope_high_freq_factor - cfg->rope_low_freq_factor);
                float scaled = (1.0f - smooth) * f;
                scaled = scaled / cfg->rope_factor;
                float kept = smooth * f;
                f = scaled + kept;
            }
        }
        freqs[i] = f;
    }
}

/* Rotates each head's pairs (i, i + head_dim/2) by pos * freq[i]: the "rotate half" form that
   matches Hugging Face's q/k row order, which the file keeps. */
static void rope(float *vec, int n_heads, int head_dim, const float *cos_t, const float *sin_t) {
    int half = head_dim / 2;
    for (int h = 0; h < n_heads; h++) {
        float *v = vec + (size_t)h * head_dim;
        for (int i = 0; i < half; i++) {
            float a = v[i], b = v[i + half];
            float a_cos = a * cos_t[i], b_sin = b * sin_t[i];
            float a_sin = a * sin_t[i], b_cos = b * cos_t[i];
            v[i] = a_cos - b_sin;
            v[i + half] = a_sin + b_cos;
        }
    }
}

/* ----------------------------------------------------------------------------------------
   3. The forward pass */

typedef struct {
    float *x;          /* residual stream [dim] */
    float *xb;         /* normed input / attention output [max(dim, q_dim)] */
    float *xb2;        /* projection output [dim] */
    float *hb, *hb2;   /* feed-forward gate and up [hidden_dim] */
    float *q;          /* query [q_dim] */
    float *att;        /* attention scores [n_heads][seq_len] */
    float *logits;     /* [vocab_size] */
    float *key_cache;  /* [n_layers][seq_len][kv_dim] */
    float *value_cache;
    float *rope_freqs, *rope_cos, *rope_sin;  /* [head_dim / 2] */
    int seq_len;       /* the context length the cache holds (the -c cap) */
} RunState;

typedef struct {
    Model model;
    RunState state;
} Transformer;

static void alloc_state(RunState *s, const Config *cfg, int seq_len) {
    int q_dim = cfg->n_heads * cfg->head_dim, kv_dim = cfg->n_kv_heads * cfg->head_dim;
    size_t cache = (size_t)cfg->n_layers * (size_t)seq_len * (size_t)kv_dim;
    s->seq_len = seq_len;
    s->x = checked_calloc((size_t)cfg->dim, sizeof(float), "activations");
    s->xb = checked_calloc((size_t)(q_dim > cfg->dim ? q_dim : cfg->dim), sizeof(float),
                           "activations");
    s->xb2 = checked_calloc((size_t)cfg->dim, sizeof(float), "activations");
    s->hb = checked_calloc((size_t)cfg->hidden_dim, sizeof(float), "activations");
    s->hb2 = checked_calloc((size_t)cfg->hidden_dim, sizeof(float), "activations");
    s->q = checked_calloc((size_t)q_dim, sizeof(float), "activations");
    s->att = checked_calloc((size_t)cfg->n_heads * (size_t)seq_len, sizeof(float), "scores");
    s->logits = checked_calloc((size_t)cfg->vocab_size, sizeof(float), "logits");
    s->key_cache = checked_calloc(cache, sizeof(float), "the key cache (lower -c)");
    s->value_cache = checked_calloc(cache, sizeof(float), "the value cache (lower -c)");
    s->rope_freqs = checked_calloc((size_t)cfg->head_dim / 2, sizeof(float), "rope");
    s->rope_cos = checked_calloc((size_t)cfg->head_dim / 2, sizeof(float), "rope");
    s->rope_sin = checked_calloc((size_t)cfg->head_dim / 2, sizeof(float), "rope");
    rope_frequencies(cfg, s->rope_freqs);
}

static void free_state(RunState *s) {
    free(s->x); free(s->xb); free(s->xb2); free(s->hb); free(s->hb2); free(s->q);
    free(s->att); free(s->logits); free(s->key_cache); free(s->value_cache);
    free(s->rope_freqs); free(s->rope_cos); free(s->rope_sin);
}

/* Causal grouped-query attention of the query in s->q at position pos over the cached keys
   and values of this layer; writes the heads' outputs side by side into s->xb. */
static void attention(RunState *s, const Config *cfg, size_t layer_offset, int pos) {
    int kv_dim = cfg->n_kv_heads * cfg->head_dim, head_dim = cfg->head_dim;
    int group = cfg->n_heads / cfg->n_kv_heads;
    float scale = 1.0f / sqrtf((float)head_dim);
#if defined _OPENMP
#pragma omp parallel for schedule(static)
#endif
    for (int h = 0; h < cfg->n_heads; h++) {
        const float *q = s->q + (size_t)h * head_dim;
        float *scores = s->att + (size_t)h * s->seq_len;
        size_t kv_head = (size_t)(h / group) * head_dim;
        for (int t = 0; t <= pos; t++) {
            const float *k = s->key_cache + layer_offset + (size_t)t * kv_dim + kv_head;
            scores[t] = dot_row_fp32(k, q, head_dim) * scale;
        }
        softmax(scores, pos + 1);
        float *out = s->xb + (size_t)h * head_dim;
        memset(out, 0, (size_t)head_dim * sizeof(float));
        for (int t = 0; t <= pos; t++) {
            const float *v = s->value_cache + layer_offset + (size_t)t * kv_dim + kv_head;
            for (int i = 0; i < head_dim; i++) out[i] += scores[t] * v[i];
        }
    }
}

/* Runs token at position pos through the model, filling the KV cache at pos. Computes the
   logits only when asked: prompt positions before the last one do not need them. */
static float *forward(Transformer *tr, int token, int pos, int want_logits) {
    const Config *cfg = &tr->model.config;
    const Weights *w = &tr->model.weights;
    RunState *s = &tr->state;
    int dim = cfg->dim, kv_dim = cfg->n_kv_heads * cfg->head_dim;

    matrix_row(s->x, &w->embedding, token);
    for (int i = 0; i < cfg->head_dim / 2; i++) {
        float angle = (float)pos * s->rope_freqs[i];
        s->rope_cos[i] = cosf(angle);
        s->rope_sin[i] = sinf(angle);
    }

    for (int l = 0; l < cfg->n_layers; l++) {
        const Layer *layer = &w->layers[l];
        size_t layer_offset = (size_t)l * (size_t)s->seq_len * (size_t)kv_dim;
        float *k = s->key_cache + layer_offset + (size_t)pos * kv_dim;
        float *v = s->value_cache + layer_offset + (size_t)pos * kv_dim;

        rmsnorm(s->xb, s->x, layer->attn_norm, dim, cfg->norm_eps);
        matmul(s->q, s->xb, &layer->wq);
        matmul(k, s->xb, &layer->wk);
        matmul(v, s->xb, &layer->wv);
        rope(s->q, cfg->n_heads, cfg->head_dim, s->rope_cos, s->rope_sin);
        rope(k, cfg->n_kv_heads, cfg->head_dim, s->rope_cos, s->rope_sin);
        attention(s, cfg, layer_offset, pos);
        matmul(s->xb2, s->xb, &layer->wo);
        for (int i = 0; i < dim; i++) s->x[i] += s->xb2[i];

        rmsnorm(s->xb, s->x, layer->ffn_norm, dim, cfg->norm_eps);
        matmul(s->hb, s->xb, &layer->w_gate);
        matmul(s->hb2, s->xb, &layer->w_up);
        for (int i = 0; i < cfg->hidden_dim; i++) {
            float g = s->hb[i];
            s->hb[i] = g / (1.0f + expf(-g)) * s->hb2[i];  /* SwiGLU: silu(gate) * up */
        }
        matmul(s->xb2, s->hb, &layer->w_down);
        for (int i = 0; i < dim; i++) s->x[i] += s->xb2[i];
    }
    if (!want_logits) return NULL;
    rmsnorm(s->x, s->x, w->final_norm, dim, cfg->norm_eps);
    matmul(s->logits, s->x, &w->classifier);
    return s->logits;
}

/* ----------------------------------------------------------------------------------------
   4. The sampler: picks the next token from the logits. Temperature 0 is greedy (argmax,
   lowest id on a tie); otherwise softmax(logits / temperature), then top-p ("nucleus")
   sampling when 0 < top_p < 1. */

typedef struct {
    float prob;
    int index;
} ProbIndex;

typedef struct {
    int vocab_size;
    ProbIndex *candidates;  /* scratch for top-p */
    float temperature;
    float top_p;
    unsigned long long rng_state;
} Sampler;

static unsigned int random_u32(unsigned long long *state) {
    /* xorshift rng: https://en.wikipedia.org/wiki/Xorshift#xorshift.2A */
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (unsigned int)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}

static float random_f32(unsigned long long *state) { /* in [0, 1) */
    return (float)(random_u32(state) >> 8) / 16777216.0f;
}

static int sample_argmax(const float *p, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (p[i] > p[best]) best = i;
    return best;
}

static int sample_from(const float *probs, int n, float coin) {
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        cdf += probs[i];
        if (coin < cdf) return i;
    }
    return n - 1;  /* rounding left the cdf just below 1 */
}

static int compare_prob_desc(const void *a, const void *b) {
    float pa = ((const ProbIndex *)a)->prob, pb = ((const ProbIndex *)b)->prob;
    return (pa < pb) - (pa > pb);
}

/* Samples among the smallest set of tokens whose probabilities add up to more than top_p.
   Tokens below (1 - top_p) / (n - 1) cannot be in that set, so they are dropped before the
   sort: the sort then sees a few hundred candidates instead of 128K. */
static int sample_top_p(const float *probs, int n, float top_p, ProbIndex *cand, float coin) {
    int n_cand = 0;
    float cutoff = (1.0f - top_p) / (float)(n - 1);
    for (int i = 0; i < n; i++) {
        if (probs[i] >= cutoff) {
            cand[n_cand].index = i;
            cand[n_cand].prob = probs[i];
            n_cand++;
        }
    }
    qsort(cand, (size_t)n_cand, sizeof(ProbIndex), compare_prob_desc);
    float cumulative = 0.0f;
    int last = n_cand - 1;
    for (int i = 0; i < n_cand; i++) {
        cumulative += cand[i].prob;
        if (cumulative > top_p) { last = i; break; }
    }
    float r = coin * cumulative, cdf = 0.0f;
    for (int i = 0; i <= last; i++) {
        cdf += cand[i].prob;
        if (r < cdf) return cand[i].index;
    }
    return cand[last].index;
}

static int sample(Sampler *sampler, float *logits) {
    if (sampler->temperature == 0.0f) return sample_argmax(logits, sampler->vocab_size);
    for (int i = 0; i < sampler->vocab_size; i++) logits[i] /= sampler->temperature;
    softmax(logits, sampler->vocab_size);
    float coin = random_f32(&sampler->rng_state);
    if (sampler->top_p <= 0.0f || sampler->top_p >= 1.0f || sampler->vocab_size < 2)
        return sample_from(logits, sampler->vocab_size, coin);
    return sample_top_p(logits, sampler->vocab_size, sampler->top_p, sampler->candidates, coin);
}

/* ----------------------------------------------------------------------------------------
   5. Generation

   A Session is the model plus where its KV cache stands: tokens are fed at `pos`, and every
   generated token is fed back before the next one is sampled. */

#define MAX_STOP_IDS 16

typedef struct {
    Transformer *tr;
    Tokenizer *tokenizer;     /* NULL when the prompt and the output are ids */
    Sampler sampler;
    int pos;                  /* positions already in the KV cache */
    int stop_ids[MAX_STOP_IDS];
    int n_stop_ids;
    FILE *logits_file;        /* -L: every position's logits, float32 rows */
    int print_ids;            /* -o ids: print ids instead of text */
    int ids_on_line;          /* ids printed on the current output line */
    Utf8Decoder utf8;
    double prompt_seconds, generate_seconds;
    long prompt_tokens, generated_tokens;
} Session;

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void write_logits(Session *s, const float *logits) {
    size_t n = (size_t)s->tr->model.config.vocab_size;
    if (fwrite(logits, sizeof(float), n, s->logits_file) != n)
        die("cannot write the logits file: %s", strerror(errno));
}

/* Feeds tokens at the current position and returns the logits after the last one. The caller
   has checked that they fit in the context. */
static float *feed(Session *s, const int *tokens, size_t n) {
    float *logits = NULL;
    for (size_t i = 0; i < n; i++) {
        int want_logits = s->logits_file != NULL || i + 1 == n;
        logits = forward(s->tr, tokens[i], s->pos, want_logits);
        if (logits && s->logits_file) write_logits(s, logits);
        s->pos++;
    }
    return logits;
}

static int is_stop_id(const Session *s, int id) {
    for (int i = 0; i < s->n_stop_ids; i++) if (s->stop_ids[i] == id) return 1;
    return 0;
}

static void add_stop_id(Session *s, int id) {
    if (id < 0 || is_stop_id(s, id) || s->n_stop_ids == MAX_STOP_IDS) return;
    s->stop_ids[s->n_stop_ids++] = id;
}

/* Prints one generated token: its id, or its bytes through the UTF-8 decoder so that a
   character split over several tokens comes out whole. */
static void emit_token(Session *s, int id) {
    if (s->print_ids) {
        printf(s->ids_on_line++ > 0 ? " %d" : "%d", id);
    } else {
        size_t len;
        const unsigned char *piece = tokenizer_piece(s->tokenizer, id, &len);
        unsigned char out[UTF8_DECODER_OUT_MAX(256)];
        while (piece && len > 0) {  /* pieces are short; chunk anyway so `out` always fits */
            size_t chunk = len < 256 ? len : 256;
            fwrite(out, 1, utf8_decoder_feed(&s->utf8, piece, chunk, out), stdout);
            piece += chunk;
            len -= chunk;
        }
    }
    fflush(stdout);
}

static void finish_output(Session *s) {
    if (!s->print_ids) {
        unsigned char out[4];
        fwrite(out, 1, utf8_decoder_flush(&s->utf8, out), stdout);
    }
    fflush(stdout);
}

/* Feeds the prompt, then samples and feeds up to max_new tokens, stopping after a stop token
   (which is printed only as an id) or when the context is full. Returns the last sampled
   token, or -1 if none was. The last sampled token is not fed: the caller decides. */
static int generate(Session *s, const int *prompt, size_t n_prompt, int max_new) {
    int seq_len = s->tr->state.seq_len;
    double start = now_seconds();
    float *logits = feed(s, prompt, n_prompt);
    double prompt_done = now_seconds();
    s->prompt_seconds += prompt_done - start;
    s->prompt_tokens += (long)n_prompt;
    int token = -1;
    for (int produced = 0; max_new <= 0 || produced < max_new; produced++) {
        token = sample(&s->sampler, logits);
        int stop = is_stop_id(s, token);
        if (!stop || s->print_ids) emit_token(s, token);
        s->generated_tokens++;
        if (stop || (max_new > 0 && produced + 1 == max_new)) break;
        if (s->pos >= seq_len) {
            fprintf(stderr, "\n[context full: %d positions (-c); generation stopped]\n", seq_len);
            break;
        }
        logits = feed(s, &token, 1);
    }
    s->generate_seconds += now_seconds() - prompt_done;
    return token;
}

static void print_speed(const Session *s) {
    fprintf(stderr, "prompt: %ld tokens, %.1f tok/s; generated: %ld tokens, %.1f tok/s\n",
            s->prompt_tokens,
            s->prompt_seconds > 0 ? (double)s->prompt_tokens / s->prompt_seconds : 0.0,
            s->generated_tokens,
            s->generate_seconds > 0 ? (double)s->generated_tokens / s->generate_seconds : 0.0);
}

static void encode_or_die(const Tokenizer *t, const char *text, size_t len, int flags,
                          TokenList *out) {
    int rc = tokenizer_encode(t, text, len, flags, out);
    if (rc == TOKENIZER_ERR_NO_BOS) die("the tokenizer has no <|begin_of_text|> token");
    if (rc != TOKENIZER_OK) die("out of memory while encoding the prompt");
}

/* ----------------------------------------------------------------------------------------
   6. Chat: Meta's dialog format for the instruct models, as token ids:
     <|begin_of_text|> once, then per message
     <|start_header_id|> role <|end_header_id|> "\n\n" content <|eot_id|>
   and, for the reply, the assistant header alone. Header and control tokens are inserted as
   ids; the text of a message is encoded with special tokens NOT recognised, so a user typing
   "<|eot_id|>" cannot end their turn or forge another. Each turn feeds only its new tokens
   into the one KV cache. */

/* Length of the UTF-8 character starting at s[0] and its code point; an invalid byte counts
   as a one-byte character that is not white space. */
static int utf8_char_at(const unsigned char *s, size_t len, unsigned int *cp) {
    unsigned char c = s[0];
    int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || (size_t)n > len) { *cp = 0xFFFFFFFF; return 1; }
    unsigned int v = n == 1 ? c : (unsigned int)(c & (0x7F >> n));
    for (int i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80) { *cp = 0xFFFFFFFF; return 1; }
        v = (v << 6) | (s[i] & 0x3F);
    }
    *cp = v;
    return n;
}

/* Python's str.isspace(), which Meta's ChatFormat uses through content.strip(). */
static int is_python_space(unsigned int cp) {
    return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 ||
           cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 ||
           cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

/* Trims white space at both ends as str.strip() does: sets *start and returns the length. */
static size_t strip_text(const char *text, size_t len, const char **start) {
    const unsigned char *s = (const unsigned char *)text;
    size_t begin = 0, end = len;
    unsigned int cp;
    while (begin < end) {
        int n = utf8_char_at(s + begin, end - begin, &cp);
        if (!is_python_space(cp)) break;
        begin += (size_t)n;
    }
    while (end > begin) {
        size_t last = end - 1;  /* back up to the start of the last character */
        while (last > begin && (s[last] & 0xC0) == 0x80 && end - last < 4) last--;
        int n = utf8_char_at(s + last, end - last, &cp);
        if ((size_t)n != end - last) { last = end - 1; cp = 0xFFFFFFFF; }
        if (!is_python_space(cp)) break;
        end = last;
    }
    *start = text + begin;
    return end - begin;
}

typedef struct {
    int start_header, end_header, eot;
} DialogIds;

static void push_or_die(TokenList *list, int id) {
    if (token_list_push(list, id) != TOKENIZER_OK) die("out of memory");
}

static void append_header(const Tokenizer *t, const DialogIds *d, const char *role,
                          TokenList *out) {
    push_or_die(out, d->start_header);
    encode_or_die(t, role, strlen(role), 0, out);
    push_or_die(out, d->end_header);
    encode_or_die(t, "\n\n", 2, 0, out);
}

static void append_message(const Tokenizer *t, const DialogIds *d, const char *role,
                           const char *content, size_t len, TokenList *out) {
    const char *stripped;
    size_t stripped_len = strip_text(content, len, &stripped);
    append_header(t, d, role, out);
    encode_or_die(t, stripped, stripped_len, 0, out);
    push_or_die(out, d->eot);
}

static int dialog_special(const Tokenizer *t, const char *text) {
    int id = tokenizer_special_id(t, text);
    if (id < 0) die("the tokenizer has no %s token: not a Llama 3 instruct tokenizer", text);
    return id;
}

static void print_id_line(const char *tag, const TokenList *ids) {
    printf("%s", tag);
    for (size_t i = 0; i < ids->count; i++) printf(" %d", ids->ids[i]);
    printf("\n");
}

/* Reads one line of any length from stdin (without its newline). Returns -1 at end of input. */
static ssize_t read_line(char **line, size_t *capacity) {
    ssize_t n = getline(line, capacity, stdin);
    if (n < 0) {
        if (ferror(stdin)) die("cannot read stdin: %s", strerror(errno));
        return -1;
    }
    if (n > 0 && (*line)[n - 1] == '\n') (*line)[--n] = '\0';
    return n;
}

/* The chat loop. Ends with exit status 0 at end of input. When the context cannot hold the
   next turn (or fills up during a reply) the session ends with a message and status 1. */
static int chat(Session *s, const char *system_prompt, const char *first_message, int max_reply) {
    const Tokenizer *t = s->tokenizer;
    DialogIds d = { dialog_special(t, "<|start_header_id|>"),
                    dialog_special(t, "<|end_header_id|>"), dialog_special(t, "<|eot_id|>") };
    int interactive = isatty(STDIN_FILENO);
    int seq_len = s->tr->state.seq_len;
    TokenList turn = {0};
    char *line = NULL;
    size_t line_capacity = 0;
    int status = 0;

    push_or_die(&turn, s->tr->model.config.bos_id);
    if (system_prompt)
        append_message(t, &d, "system", system_prompt, strlen(system_prompt), &turn);
    for (;;) {
        const char *message;
        size_t message_len;
        if (first_message) {
            message = first_message;
            message_len = strlen(first_message);
            first_message = NULL;
        } else {
            if (interactive) { printf("User: "); fflush(stdout); }
            ssize_t n = read_line(&line, &line_capacity);
            if (n < 0) break;
            message = line;
            message_len = (size_t)n;
        }
        const char *unused;
        if (strip_text(message, message_len, &unused) == 0) continue;  /* blank line */
        append_message(t, &d, "user", message, message_len, &turn);
        append_header(t, &d, "assistant", &turn);
        if ((size_t)s->pos + turn.count >= (size_t)seq_len) {
            fprintf(stderr, "run: context full: the next turn needs %zu positions, %d of %d "
                    "are used (-c); session ended\n", turn.count, s->pos, seq_len);
            status = 1;
            break;
        }
        if (s->print_ids) print_id_line("in:", &turn);
        if (interactive) { printf("Assistant: "); fflush(stdout); }
        if (s->print_ids) printf("out:");
        s->ids_on_line = 1;  /* so that every id after "out:" gets its space */
        int last = generate(s, turn.ids, turn.count, max_reply);
        finish_output(s);
        printf("\n");
        fflush(stdout);
        /* The next turn starts by closing this reply in the cache: its last sampled token
           (unless it ended the turn) and the <|eot_id|> the dialog format puts after it. */
        turn.count = 0;
        if (last >= 0 && !is_stop_id(s, last)) push_or_die(&turn, last);
        push_or_die(&turn, d.eot);
        if (s->pos >= seq_len) {
            fprintf(stderr, "run: context full during the reply (%d positions, -c); "
                    "session ended\n", seq_len);
            status = 1;
            break;
        }
    }
    free(line);
    token_list_free(&turn);
    return status;
}

/* ----------------------------------------------------------------------------------------
   7. The command line */

static void usage(void) {
    fprintf(stderr,
        "usage: run <model.bin> [options]\n"
        "  -i <text>    prompt (generate mode) or first user message (chat mode)\n"
        "  -I <ids>     prompt as token ids, space or comma separated, used exactly as given\n"
        "               (no <|begin_of_text|> added); no tokenizer is needed with -o ids\n"
        "  -m <mode>    generate (default) or chat\n"
        "  -y <text>    system prompt (chat mode)\n"
        "  -t <float>   temperature, 0 = greedy (default 0.6)\n"
        "  -p <float>   top-p in [0, 1], 1 = off (default 0.9)\n"
        "  -s <int>     random seed (default: from the clock)\n"
        "  -n <int>     tokens to generate (per reply in chat); 0 = until a stop token or the\n"
        "               context is full (default 256 in generate mode, 0 in chat mode)\n"
        "  -c <int>     context length: positions in the KV cache (default 4096, at most the\n"
        "               model's maximum)\n"
        "  -z <path>    tokenizer file (default: the model path with .bin replaced by .tok)\n"
        "  -o <format>  text (default) or ids: print generated token ids instead of text\n"
        "  -e <0|1>     stop at end tokens (end_of_text, eot, eom, the model's eos); default 1\n"
        "  -L <path>    write the logits of every position as raw float32 rows\n"
        "  -T <int>     threads (default: OpenMP's choice, OMP_NUM_THREADS)\n");
    exit(EXIT_FAILURE);
}

static long parse_long(const char *flag, const char *text, long min, long max) {
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno || end == text || *end != '\0' || v < min || v > max)
        die("%s wants an integer in [%ld, %ld], got '%s'", flag, min, max, text);
    return v;
}

static float parse_float(const char *flag, const char *text, float min, float max) {
    char *end;
    errno = 0;
    float v = strtof(text, &end);
    if (errno || end == text || *end != '\0' || !(v >= min && v <= max))
        die("%s wants a number in [%g, %g], got '%s'", flag, (double)min, (double)max, text);
    return v;
}

/* Parses "1 2 3" or "1,2,3" into ids, each checked against the vocabulary. */
static void parse_ids(const char *text, int vocab_size, TokenList *out) {
    const char *p = text;
    for (;;) {
        while (*p == ' ' || *p == ',' || *p == '\t' || *p == '\n') p++;
        if (*p == '\0') break;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v >= vocab_size)
            die("-I: '%.20s' is not a token id in [0, %d)", p, vocab_size);
        push_or_die(out, (int)v);
        p = end;
    }
    if (out->count == 0) die("-I: no token ids given");
}

static char *default_tokenizer_path(const char *model_path) {
    size_t len = strlen(model_path);
    if (len >= 4 && strcmp(model_path + len - 4, ".bin") == 0) len -= 4;
    char *path = checked_calloc(len + 5, 1, "a path");
    memcpy(path, model_path, len);
    memcpy(path + len, ".tok", 5);
    return path;
}

typedef struct {
    const char *model_path, *tokenizer_path, *prompt, *prompt_ids, *mode, *system_prompt;
    const char *logits_path;
    float temperature, top_p;
    unsigned long long seed;
    long steps, context, threads;
    int print_ids, stop_at_end;
} Options;

static void parse_options(int argc, char **argv, Options *o) {
    if (argc < 2 || argv[1][0] == '-') {
        fprintf(stderr, "run: error: the first argument must be the model file\n");
        usage();
    }
    *o = (Options){ .model_path = argv[1], .mode = "generate", .temperature = 0.6f,
                    .top_p = 0.9f, .seed = (unsigned long long)time(NULL), .steps = -1,
                    .context = 4096, .stop_at_end = 1 };
    for (int i = 2; i < argc; i += 2) {
        const char *flag = argv[i];
        if (flag[0] != '-' || strlen(flag) != 2) {
            fprintf(stderr, "run: error: unexpected argument '%s'\n", flag);
            usage();
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "run: error: %s needs a value\n", flag);
            usage();
        }
        const char *v = argv[i + 1];
        switch (flag[1]) {
        case 'i': o->prompt = v; break;
        case 'I': o->prompt_ids = v; break;
        case 'm': o->mode = v; break;
        case 'y': o->system_prompt = v; break;
        case 't': o->temperature = parse_float(flag, v, 0.0f, 100.0f); break;
        case 'p': o->top_p = parse_float(flag, v, 0.0f, 1.0f); break;
        case 's': o->seed = (unsigned long long)parse_long(flag, v, 0, 0x7fffffffL); break;
        case 'n': o->steps = parse_long(flag, v, 0, 1L << 30); break;
        case 'c': o->context = parse_long(flag, v, 1, 1L << 24); break;
        case 'z': o->tokenizer_path = v; break;
        case 'L': o->logits_path = v; break;
        case 'T': o->threads = parse_long(flag, v, 1, 4096); break;
        case 'e': o->stop_at_end = (int)parse_long(flag, v, 0, 1); break;
        case 'o':
            if (strcmp(v, "ids") != 0 && strcmp(v, "text") != 0)
                die("-o wants 'text' or 'ids', got '%s'", v);
            o->print_ids = strcmp(v, "ids") == 0;
            break;
        default:
            fprintf(stderr, "run: error: unknown option %s\n", flag);
            usage();
        }
    }
    if (strcmp(o->mode, "generate") != 0 && strcmp(o->mode, "chat") != 0)
        die("-m wants 'generate' or 'chat', got '%s'", o->mode);
    if (o->prompt && o->prompt_ids) die("give the prompt as -i text or -I ids, not both");
    if (o->prompt_ids && strcmp(o->mode, "chat") == 0) die("-I is for generate mode only");
    if (o->system_prompt && strcmp(o->mode, "chat") != 0) die("-y is for chat mode only");
}

int main(int argc, char **argv) {
    Options o;
    parse_options(argc, argv, &o);
#if defined _OPENMP
    if (o.threads > 0) omp_set_num_threads((int)o.threads);
#endif
    int chat_mode = strcmp(o.mode, "chat") == 0;

    Transformer tr = {0};
    load_model(o.model_path, &tr.model);
    const Config *cfg = &tr.model.config;
    if (o.context > cfg->max_seq_len) o.context = cfg->max_seq_len;

    Session s = { .tr = &tr, .print_ids = o.print_ids };
    int need_tokenizer = chat_mode || !o.prompt_ids || !o.print_ids;
    char *default_path = NULL;
    if (need_tokenizer) {
        const char *path = o.tokenizer_path;
        if (!path) path = default_path = default_tokenizer_path(o.model_path);
        char err[256];
        s.tokenizer = tokenizer_load(path, err, sizeof err);
        if (!s.tokenizer) die("tokenizer %s: %s (give its path with -z)", path, err);
        if (tokenizer_vocab_size(s.tokenizer) != cfg->vocab_size)
            die("the tokenizer has %d tokens but the model's vocabulary has %d",
                tokenizer_vocab_size(s.tokenizer), cfg->vocab_size);
    }
    if (o.stop_at_end) {
        for (int i = 0; i < cfg->n_eos; i++) add_stop_id(&s, cfg->eos_ids[i]);
        if (s.tokenizer) {
            add_stop_id(&s, tokenizer_special_id(s.tokenizer, "<|end_of_text|>"));
            add_stop_id(&s, tokenizer_special_id(s.tokenizer, "<|eot_id|>"));
            add_stop_id(&s, tokenizer_special_id(s.tokenizer, "<|eom_id|>"));
        }
    }

    TokenList prompt = {0};
    if (o.prompt_ids) {
        parse_ids(o.prompt_ids, cfg->vocab_size, &prompt);
    } else if (!chat_mode) {
        const char *text = o.prompt ? o.prompt : "";
        encode_or_die(s.tokenizer, text, strlen(text), TOKENIZER_ADD_BOS, &prompt);
    }
    if (prompt.count > (size_t)o.context)
        die("the prompt has %zu tokens but the context holds %ld (-c)", prompt.count,
            o.context);

    alloc_state(&tr.state, cfg, (int)o.context);
    s.sampler = (Sampler){ .vocab_size = cfg->vocab_size, .temperature = o.temperature,
                           .top_p = o.top_p, .rng_state = o.seed * 2654435761ull + 1 };
    s.sampler.candidates = checked_calloc((size_t)cfg->vocab_size, sizeof(ProbIndex), "sampler");
    if (o.logits_path) {
        s.logits_file = fopen(o.logits_path, "wb");
        if (!s.logits_file) die("cannot create %s: %s", o.logits_path, strerror(errno));
    }

    fprintf(stderr, "model: %d layers, dim %d, %d query / %d kv heads of %d, vocab %d, %s "
            "weights; context %ld of %d\n", cfg->n_layers, cfg->dim, cfg->n_heads,
            cfg->n_kv_heads, cfg->head_dim, cfg->vocab_size, weight_type_name(cfg->weight_type),
            o.context, cfg->max_seq_len);
    int status = 0;
    if (chat_mode) {
        status = chat(&s, o.system_prompt, o.prompt, o.steps < 0 ? 0 : (int)o.steps);
    } else {
        if (!o.print_ids && o.prompt) { fputs(o.prompt, stdout); fflush(stdout); }
        generate(&s, prompt.ids, prompt.count, o.steps < 0 ? 256 : (int)o.steps);
        finish_output(&s);
        printf("\n");
    }
    print_speed(&s);
    if (s.logits_file && fclose(s.logits_file) != 0)
        die("cannot write %s: %s", o.logits_path, strerror(errno));

    token_list_free(&prompt);
    free(s.sampler.candidates);
    free(default_path);
    if (s.tokenizer) tokenizer_free(s.tokenizer);
    free_state(&tr.state);
    free_model(&tr.model);
    return status;
}
