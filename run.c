/* run.c: inference for the Llama 3 family (3.0, 3.1, 3.2 text models) in one C file.

   Read it top to bottom, in the order the data flows. The model is learned by the end of
   section 5:
     1. the model file: header, validation, memory map
     2. the math: dot products, matmul (fp32, bf16, q8_0, q4_0), rmsnorm, softmax, RoPE
     3. the forward pass: a batch of tokens through every layer, with a KV cache and
        grouped-query attention
     4. the sampler: temperature, top-k, top-p, min-p, and the repetition, presence and
        frequency penalties
     5. generation: prompt in, tokens out, timings
   Then the program around the model:
     6. chat: Meta's dialog format over one KV cache, then a terminal line editor for it
     7. the command line
   And last, speed only:
     8. SIMD kernels, one sub-section per instruction set (x86 AVX-512 with VNNI, BF16 and
        AMX; x86 AVX2; ARM NEON), and 2 MB pages for the weights
   Sections 1-7 are a whole engine in portable C, and all that a portable build (no -march)
   runs. Section 8 only makes it faster, through the hooks named simd_* that sections 2 and 3
   call: each does its part and returns 1 (or how much it did), or 0 where it does not apply,
   and the portable code after it runs. Without SIMD kernels each hook is the constant 0.

   The model file is written by export.py (its layout: docs/formats.md); the
   tokenizer lives in tokenizer.c. */

#define _POSIX_C_SOURCE 200809L  /* mmap, pread, getline, clock_gettime */
#define _DEFAULT_SOURCE          /* madvise, posix_fadvise: Linux hints for the weights' pages */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "tokenizer.h"

/* OpenMP splits loops over threads where the compiler has it (-fopenmp: the runomp build);
   OMP(parallel for) is `#pragma omp parallel for` there and nothing elsewhere. */
#define PRAGMA(...) _Pragma(#__VA_ARGS__)
#if defined _OPENMP
#include <omp.h>
#define OMP(...) PRAGMA(omp __VA_ARGS__)
static int max_threads(void) { return omp_get_max_threads(); }
static int thread_id(void) { return omp_get_thread_num(); }
#else
#define OMP(...)
static int max_threads(void) { return 1; }
static int thread_id(void) { return 0; }
#endif

/* Whether section 8 holds SIMD kernels for this build: the compiler's target (-march)
   decides. */
#if defined __AVX512F__ || (defined __AVX2__ && defined __FMA__ && defined __F16C__) || \
    (defined __aarch64__ && defined __ARM_NEON)
#define HAVE_SIMD 1
#else
#define HAVE_SIMD 0
#endif

/* The one line every user-facing error prints on stderr. */
static void print_error(const char *fmt, va_list args) {
    fprintf(stderr, "run: error: ");
    vfprintf(stderr, fmt, args);
    fprintf(stderr, "\n");
}

/* One clear line on stderr and a non-zero exit: how every user-facing error ends. */
static void die(const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    print_error(fmt, args);
    va_end(args);
    exit(EXIT_FAILURE);
}

static void *checked_calloc(size_t count, size_t size, const char *what) {
    void *p = calloc(count, size);
    if (!p) die("out of memory allocating %s (%zu x %zu bytes)", what, count, size);
    return p;
}

/* checked_calloc's memory at a 64-byte boundary (a cache line), for the buffers the kernels
   stream through: a 64-byte load, or an AMX tile's row, then never straddles two lines.
   Still calloc's, so that large buffers stay the kernel's zero page until written; the pointer
   calloc gave sits just before the buffer, for free_aligned. */
static void *calloc_aligned(size_t count, size_t size, const char *what) {
    size_t extra = 64 + sizeof(void *);
    if (size != 0 && count > (SIZE_MAX - extra) / size)
        die("out of memory allocating %s (%zu x %zu bytes)", what, count, size);
    char *base = checked_calloc(count * size + extra, 1, what);
    char *p = base + sizeof(void *);
    p += (64 - (uintptr_t)p % 64) % 64;
    memcpy(p - sizeof(void *), &base, sizeof base);
    return p;
}

static void free_aligned(void *p) {
    if (!p) return;
    void *base;
    memcpy(&base, (char *)p - sizeof base, sizeof base);
    free(base);
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

enum { WEIGHT_FP32 = 0, WEIGHT_BF16 = 1, WEIGHT_Q8_0 = 2, WEIGHT_Q4_0 = 3 };
static const char *const WEIGHT_TYPE_NAMES[] = { "fp32", "bf16", "q8_0", "q4_0" };

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
    int group_size;      /* q8_0, q4_0: values per scale */
    int bos_id;
    int n_eos;
    int eos_ids[MAX_EOS];
} Config;

/* A weight matrix as it lies in the mapped file. */
typedef struct {
    int type;             /* WEIGHT_* */
    int rows, cols;
    int group_size;       /* q8_0, q4_0 */
    const void *data;     /* float, uint16_t (bf16), int8_t (q8_0) or packed nibbles (q4_0) */
    const float *scales;  /* q8_0: one per group_size values, row-major */
    const uint16_t *fp16_scales;  /* q4_0: the same, as IEEE binary16 */
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
    if (cfg->weight_type < WEIGHT_FP32 || cfg->weight_type > WEIGHT_Q4_0)
        return "unknown weight type";
    int gs = cfg->group_size, q_dim = cfg->n_heads * cfg->head_dim;
    int divides_rows = gs > 0 && cfg->dim % gs == 0 && cfg->hidden_dim % gs == 0 &&
                       q_dim % gs == 0;
    if (cfg->weight_type == WEIGHT_Q8_0 && !divides_rows)
        return "q8_0 group size must divide dim, hidden_dim and n_heads * head_dim";
    if (cfg->weight_type == WEIGHT_Q4_0 && (!divides_rows || gs % 32 != 0))  /* whole blocks */
        return "q4_0 group size must be a multiple of 32 dividing dim, hidden_dim and "
               "n_heads * head_dim";
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

/* (q8_0 and q4_0 keep a matrix's scales after all of its values, a second stream for
   decoding, which reads them in step with the values.) q4_0 values are two to a byte (the
   parser's group size, a multiple of 32, divides every row, so a row is whole bytes and whole
   16-byte blocks). */
static Matrix take_matrix(FileCursor *c, const Config *cfg, int rows, int cols) {
    int type = cfg->weight_type;
    Matrix m = { .type = type, .rows = rows, .cols = cols, .group_size = cfg->group_size };
    uint64_t count = (uint64_t)rows * (uint64_t)cols;
    uint64_t value_bytes = type == WEIGHT_FP32 ? 4 * count : type == WEIGHT_BF16 ? 2 * count :
                           type == WEIGHT_Q8_0 ? count : count / 2;
    c->offset = align_up(c->offset);
    if (c->base) m.data = c->base + c->offset;
    c->offset += value_bytes;
    if (type == WEIGHT_Q8_0 || type == WEIGHT_Q4_0) {
        c->offset = align_up(c->offset);
        const void *scales = c->base ? c->base + c->offset : NULL;
        if (type == WEIGHT_Q8_0) m.scales = scales;
        else m.fp16_scales = scales;
        c->offset += count / (uint64_t)cfg->group_size * (type == WEIGHT_Q8_0 ? 4 : 2);
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
    unsigned char *mapping;  /* the whole file: mapped, or read into memory */
    size_t mapping_size;
    int read_into_memory;
} Model;

/* -w: how the weights reach memory. Decoding reads anonymous memory faster than a mapping of
   the page cache (by 5-50% on the machines measured, docs/performance.md), so by default the
   file is read into memory where the machine has room for it, and mapped elsewhere. */
enum { WEIGHTS_AUTO, WEIGHTS_MAP, WEIGHTS_READ };

/* -w auto: read when at least twice the file's size is available (Linux's MemAvailable: the
   copy, and the page cache's copy that may stay beside it); map where that is not known. */
static int room_to_read(size_t size) {
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return 0;
    char line[128];
    long long available_kb = -1;
    while (available_kb < 0 && fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %lld kB", &available_kb) != 1) available_kb = -1;
    fclose(f);
    return available_kb > 0 && (double)available_kb * 1024.0 >= 2.0 * (double)size;
}

/* The header, read alone and checked against the file's size, before anything is mapped in,
   read or allocated in proportion to the file: a wrong file (a 100 GB archive) is refused at
   once in every -w mode, and the user's page cache is left as it was. */
static void check_header_first(int fd, const char *path, size_t size, Config *cfg) {
    unsigned char header[HEADER_BYTES];
    ssize_t got;
    do got = pread(fd, header, HEADER_BYTES, 0); while (got < 0 && errno == EINTR);
    if (got < 0) die("cannot read model file %s: %s", path, strerror(errno));
    if (got != HEADER_BYTES) die("model file %s: ended before its 256-byte header", path);
    char msg[160];
    const char *problem = validate_model(header, size, cfg, msg, sizeof msg);
    if (problem) die("model file %s: %s", path, problem);
}

/* The weights in 2 MB pages where Linux has them (section 8z): the mapping, or the whole file
   read into memory. */
static void map_large_pages(unsigned char *map, size_t size, int fd);
static unsigned char *read_whole_file(int fd, size_t size, const char *path);

static void load_model(const char *path, Model *m, int how) {
    int fd = open(path, O_RDONLY | O_NONBLOCK);  /* a FIFO must not block: refused below */
    if (fd < 0) die("cannot open model file %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) die("cannot stat model file %s: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode)) die("model file %s is not a regular file", path);
    if (st.st_size < HEADER_BYTES)
        die("model file %s: file is shorter than the 256-byte header", path);
    m->mapping_size = (size_t)st.st_size;
    check_header_first(fd, path, m->mapping_size, &m->config);  /* (it vouches for the layout) */
    m->read_into_memory = how == WEIGHTS_READ ||
                          (how == WEIGHTS_AUTO && room_to_read(m->mapping_size));
    if (m->read_into_memory) {
        m->mapping = read_whole_file(fd, m->mapping_size, path);
    } else {
        void *map = mmap(NULL, m->mapping_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) die("cannot map model file %s: %s", path, strerror(errno));
        map_large_pages(map, m->mapping_size, fd);  /* 2 MB pages where Linux has them */
        m->mapping = map;
    }
    close(fd);
    m->weights.layers = checked_calloc((size_t)m->config.n_layers, sizeof(Layer), "layers");
    map_weights(&m->config, m->mapping, &m->weights);
}

static void free_model(Model *m) {
    free(m->weights.layers);
    if (m->mapping && m->read_into_memory) free(m->mapping);
    else if (m->mapping) munmap(m->mapping, m->mapping_size);
}

/* ----------------------------------------------------------------------------------------
   2. The math

   Every weight type goes through matmul(), the one dispatch; the per-type dot products below
   are the only place that knows how a type's bytes become numbers. Two shapes of work:
   - decoding: one token, out = W @ x, rows split over threads (matmul_vector). Every weight is
     used once, so the speed limit is how fast the weights stream from memory.
   - the prompt: a batch of tokens, out[t] = W @ x[t] (matmul_batch). Each weight is reused by
     every token of the batch, so the rows are widened to float32 a panel at a time and meet
     all the tokens from cache.
   q8_0 and q4_0 decoding quantize the activations too, to int16 per group, so that each
   group's dot product is exact integer arithmetic (dot_q8, dot_q4). Section 8's kernels, where
   the build has them, compute the same sums faster; the calls into it are marked "hook". */

/* float32 -> bf16, rounded to nearest even (a NaN stays a NaN): the KV cache's bf16, and -a
   fast's activations for bf16 weights. */
static uint16_t round_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN */
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

static float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* IEEE binary16 (q4_0's scales) to float32, exact for every value: a normal number moves its
   exponent from bias 15 to bias 127 (the common case, kept short: q4_0 decoding converts a
   scale per 32 weights); subnormals are mantissa * 2^-24. */
static float fp16_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, magnitude = h & 0x7fffu;
    uint32_t bits;
    float f;
    if (magnitude - 0x400u < 0x7800u) {  /* exponent 1..30 */
        bits = sign | ((magnitude << 13) + (112u << 23));
    } else if (magnitude < 0x400u) {  /* zero or subnormal */
        f = ldexpf((float)magnitude, -24);
        return sign ? -f : f;
    } else {  /* infinity or NaN */
        bits = sign | 0x7f800000u | (magnitude & 0x3ffu) << 13;
    }
    memcpy(&f, &bits, 4);
    return f;
}

/* The dot products keep 16 partial sums, so that the compiler may vectorise them without
   reassociating a single sum (which it may not do for floats). */
#define LANES 16

static float sum_lanes(const float *acc) {
    float sum = 0.0f;
    for (int j = 0; j < LANES; j++) sum += acc[j];
    return sum;
}

static float dot_fp32(const float *w, const float *x, int n) {
    float acc[LANES] = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += w[i + j] * x[i + j];
    float sum = sum_lanes(acc);
    for (; i < n; i++) sum += w[i] * x[i];
    return sum;
}

static float dot_bf16(const uint16_t *w, const float *x, int n) {
    float acc[LANES] = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += bf16_to_float(w[i + j]) * x[i + j];
    float sum = sum_lanes(acc);
    for (; i < n; i++) sum += bf16_to_float(w[i]) * x[i];
    return sum;
}

/* q8_0 decoding multiplies the int8 weights by activations quantized on the fly to int16,
   group by group like the weights (scale = max|x| / 32767): each group's dot product is then
   exact integer arithmetic, scaled once. That reads the weights at memory speed where widening
   every weight to float32 could not, and int16 is 256 times finer than int8 activations
   (llama2.c's runq): tests/test_kernels.c measures the kernel's share of the error. */
typedef struct {
    int16_t *q;     /* round(x / scale), in [-q_max, q_max] */
    float *scales;  /* one per group */
} QuantizedVector;

#define Q16_MAX 32767.0f
#define Q8_MAX 127.0f

/* One group of gs values, scaled so that its largest magnitude becomes q_max, rounded. A group
   holding a NaN or an infinity gets the scale NaN (and zeros), so that every dot product it
   enters is NaN: the damage reaches the non-finite logits check, as in fp32, instead of
   becoming a number. (The NaN test is a running OR, not a branch: the loop stays vectorised.) */
static float quantize_group(int16_t *q, const float *x, int gs, float q_max) {
    float amax = 0.0f;
    int nan = 0;
    for (int i = 0; i < gs; i++) {
        float a = fabsf(x[i]);
        amax = a > amax ? a : amax;
        nan |= a != a;
    }
    if (nan || !isfinite(amax)) {
        memset(q, 0, (size_t)gs * sizeof *q);
        return NAN;
    }
    float scale = amax / q_max;
    float inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
    for (int i = 0; i < gs; i++) {
        float r = nearbyintf(x[i] * inverse);
        /* only in-range values are cast: a NaN (a 0 times the inverse of a denormal group's
           scale, overflowed to infinity) becomes 0 rather than undefined */
        int16_t v = 0;
        if (r >= -q_max && r <= q_max) v = (int16_t)r;
        else if (r > 0.0f) v = (int16_t)q_max;
        else if (r < 0.0f) v = (int16_t)-q_max;
        q[i] = v;
    }
    return scale;
}

/* One product of a matmul call: out = W applied to the shared input. */
typedef struct {
    float *out;
    const Matrix *w;
} Product;
typedef struct MatmulScratch MatmulScratch;  /* (below) */

/* The hooks into section 8's SIMD kernels. Each does its part of the work and returns 1, or
   returns 0 where it does not apply: then the portable code after it runs. A build without
   SIMD kernels has none of them: each is the constant 0 (and the scratch hooks do nothing). */
#if HAVE_SIMD
static int simd_prepare_input(const Matrix *w, const float *x, MatmulScratch *s);
static int simd_matmul_rows(float *out, const Matrix *w, const float *x, MatmulScratch *s);
static int simd_matmul_batch(float *out, const float *x, int n_tokens, const Matrix *w,
                             MatmulScratch *s);
static int simd_softmax(float *x, int n);
static int simd_swiglu(float *gate, const float *up, int width);
#else
#define simd_prepare_input(w, x, s) 0
#define simd_matmul_rows(out, w, x, s) 0
#define simd_matmul_batch(out, x, n_tokens, w, s) 0
#define simd_softmax(x, n) 0
#define simd_swiglu(gate, up, width) 0
#endif

/* Groups of gs values, each quantized on its own (quantize_group). */
static void quantize_vector(QuantizedVector *v, const float *x, int n, int gs, float q_max) {
    for (int g = 0; g < n / gs; g++)
        v->scales[g] = quantize_group(v->q + (size_t)g * gs, x + (size_t)g * gs, gs, q_max);
}

/* The integer dot products sum in int32, which the compiler vectorises, and move the sums
   into one int64 every INT_RUN values: INT_RUN products of at most 128 * 32767 stay inside
   int32, whatever the group size. */
#define INT_RUN 512

/* 32 values of a q8_0 row (or an unpacked q4_0 block) against x[0..31]: widened to int16 first,
   then a plain dot product, the shape compilers vectorise (pmaddwd on x86), at -O2 and under
   clang too. */
static int32_t dot_q8_block(const int8_t *w, const int16_t *x) {
    int16_t values[32];
    for (int j = 0; j < 32; j++) values[j] = w[j];
    int32_t sum = 0;
    for (int j = 0; j < 32; j++) sum += values[j] * x[j];
    return sum;
}

/* dot_q8's body, inlined twice by it. */
static inline float dot_q8_inline(const int8_t *w, const float *w_scales,
                                  const QuantizedVector *x, int n, int gs) {
    float sum = 0.0f;
    for (int g = 0; g < n / gs; g++, w += gs) {
        const int16_t *xq = x->q + (size_t)g * gs;
        int64_t isum = 0;
        for (int i0 = 0; i0 < gs; i0 += INT_RUN) {
            int end = gs - i0 > INT_RUN ? i0 + INT_RUN : gs, i = i0;
            int32_t run = 0;
            for (; i + 32 <= end; i += 32) run += dot_q8_block(w + i, xq + i);
            for (; i < end; i++) run += w[i] * xq[i];  /* group sizes not a multiple of 32 */
            isum += run;
        }
        sum += (float)isum * (w_scales[g] * x->scales[g]);
    }
    return sum;
}

/* One q8_0 row against quantized activations: sum over groups of int_dot * w_scale * x_scale.
   export.py's group size, 64, goes in as a constant. */
static float dot_q8(const int8_t *w, const float *w_scales, const QuantizedVector *x, int n,
                    int gs) {
    return gs == 64 ? dot_q8_inline(w, w_scales, x, n, 64) : dot_q8_inline(w, w_scales, x, n, gs);
}

/* Value i (row-major) of a q4_0 matrix, w its packed nibbles: each 32 values of a row are 16
   bytes, byte j holding value j + 8 in its low nibble and value j + 16, + 8, in its high one
   (llama.cpp's Q4_0 order: the two halves of a block unpack with one mask and one shift). */
static int q4_value(const uint8_t *w, size_t i) {
    uint8_t byte = w[i / 32 * 16 + i % 16];
    return (i % 32 < 16 ? byte & 15 : byte >> 4) - 8;
}

/* The 32 values of one q4_0 block (w: its 16 bytes, byte j holding values j and j + 16). */
static inline void unpack_q4_block(int8_t *values, const uint8_t *w) {
    for (int j = 0; j < 16; j++) {
        values[j] = (int8_t)((w[j] & 15) - 8);
        values[j + 16] = (int8_t)((w[j] >> 4) - 8);
    }
}

/* One 32-value q4_0 block against x[0..31]: unpacked, then dot_q8_block's product. */
static int32_t dot_q4_block(const uint8_t *w, const int16_t *x) {
    int8_t values[32];
    unpack_q4_block(values, w);
    return dot_q8_block(values, x);
}

/* dot_q4's blocks sum in int32 runs: Q4_RUN products of at most 8 * 32767 stay inside int32,
   so a group of up to Q4_RUN values (every real one) meets int64 once. */
#define Q4_RUN 8192

/* dot_q4's body, inlined twice by it. */
static inline float dot_q4_inline(const uint8_t *w, const uint16_t *w_scales,
                                  const QuantizedVector *x, int n, int gs) {
    const int16_t *xq = x->q;
    const float *x_scales = x->scales;
    float sum = 0.0f;
    for (int g = 0; g < n / gs; g++, w += gs / 2, xq += gs) {
        int64_t isum = 0;
        int32_t run = 0;
        for (int i = 0; i < gs; i += 32) {
            run += dot_q4_block(w + i / 2, xq + i);
            if ((i + 32) % Q4_RUN == 0) {
                isum += run;
                run = 0;
            }
        }
        isum += run;
        sum += (float)isum * (fp16_to_float(w_scales[g]) * x_scales[g]);
    }
    return sum;
}

/* One q4_0 row (w: its first byte) against quantized activations, as dot_q8, a 32-value block
   (16 bytes) at a time. export.py's group size, 32, goes in as a constant: each group is then
   one block, with no loop around it. */
static float dot_q4(const uint8_t *w, const uint16_t *w_scales, const QuantizedVector *x, int n,
                    int gs) {
    return gs == 32 ? dot_q4_inline(w, w_scales, x, n, 32) : dot_q4_inline(w, w_scales, x, n, gs);
}

/* One 32-value q4_0 block (16 bytes) times scale, as floats in order. */
static void widen_q4_block(float *out, const uint8_t *block, float scale) {
    int8_t values[32];
    unpack_q4_block(values, block);
    for (int j = 0; j < 32; j++) out[j] = (float)values[j] * scale;
}

/* Values start .. start+n-1 of a matrix's row-major data widened to float32: the embedding
   lookup and the prompt paths' widened rows and slabs. */
static void widen_values(float *out, const Matrix *w, size_t start, int n) {
    if (w->type == WEIGHT_FP32) {
        memcpy(out, (const float *)w->data + start, (size_t)n * sizeof(float));
    } else if (w->type == WEIGHT_BF16) {
        const uint16_t *src = (const uint16_t *)w->data + start;
        for (int i = 0; i < n; i++) out[i] = bf16_to_float(src[i]);
    } else {  /* q8_0, q4_0: one group (or the part of it in range) at a time */
        int q8 = w->type == WEIGHT_Q8_0;
        for (int i = 0; i < n;) {
            size_t group = (start + (size_t)i) / (size_t)w->group_size;
            size_t group_end = (group + 1) * (size_t)w->group_size - start;
            int end = group_end < (size_t)n ? (int)group_end : n;
            float scale = q8 ? w->scales[group] : fp16_to_float(w->fp16_scales[group]);
            while (i < end) {
                size_t at = start + (size_t)i;
                if (!q8 && at % 32 == 0 && end - i >= 32) {  /* a whole q4_0 block at once */
                    widen_q4_block(out + i, (const uint8_t *)w->data + at / 2, scale);
                    i += 32;
                } else {
                    int q = q8 ? ((const int8_t *)w->data)[at] : q4_value(w->data, at);
                    out[i++] = (float)q * scale;
                }
            }
        }
    }
}

static void matrix_row(float *out, const Matrix *w, int row) {
    widen_values(out, w, (size_t)row * (size_t)w->cols, w->cols);
}

#define PANEL_ROWS 16   /* rows widened at a time by the prompt path */
#define TILE 4          /* the prompt path's tile: 4 rows x 4 tokens */

/* What matmul needs besides its operands, allocated once (never per token: alloc_scratch,
   with the state, after forward()). */
struct MatmulScratch {
    QuantizedVector xq; /* q8_0, q4_0 decoding: the activations quantized [max_cols] */
    float *panels;      /* prompt path: one [PANEL_ROWS][max_cols] float panel per thread */
    int max_cols, max_tokens;
    int n_threads;
    struct SimdScratch *simd;  /* section 8's own buffers and settings, never read here */
};

/* Row r of w against x (for q8_0 and q4_0, against s->xq: see matmul_vector). */
static float row_dot(const Matrix *w, int r, const float *x, const MatmulScratch *s) {
    size_t start = (size_t)r * (size_t)w->cols;
    switch (w->type) {
    case WEIGHT_FP32: return dot_fp32((const float *)w->data + start, x, w->cols);
    case WEIGHT_BF16: return dot_bf16((const uint16_t *)w->data + start, x, w->cols);
    case WEIGHT_Q4_0:
        return dot_q4((const uint8_t *)w->data + start / 2,
                      w->fp16_scales + start / (size_t)w->group_size, &s->xq, w->cols,
                      w->group_size);
    default:
        return dot_q8((const int8_t *)w->data + start, w->scales + start / (size_t)w->group_size,
                      &s->xq, w->cols, w->group_size);
    }
}

/* Whether the products read x in one form: same type, width and group size. */
static int same_input(const Product *products, int count) {
    const Matrix *a = products[0].w;
    for (int i = 1; i < count; i++) {
        const Matrix *b = products[i].w;
        if (b->type != a->type || b->cols != a->cols || b->group_size != a->group_size)
            return 0;
    }
    return 1;
}

/* Decoding: out[rows] = W[rows][cols] @ x[cols] for each product, all reading x in one form
   (same_input). x is prepared once (q8_0 and q4_0 quantize it). Rows are independent: each
   matrix's rows are split over threads, every matrix inside one parallel region with no
   barrier between them, so that q, k and v (or gate and up) cost the threads one meeting
   instead of three (or two). Each thread takes runs of consecutive rows, long ones first and
   short ones at the end (guided scheduling), so that a thread slowed by its share of memory
   does not leave the others waiting at the end. */
static void matmul_vector(const Product *products, int count, const float *x, MatmulScratch *s) {
    const Matrix *w0 = products[0].w;
    int quantized = w0->type == WEIGHT_Q8_0 || w0->type == WEIGHT_Q4_0;
    if (!simd_prepare_input(w0, x, s) && quantized)  /* hook */
        quantize_vector(&s->xq, x, w0->cols, w0->group_size, Q16_MAX);
    OMP(parallel)
    for (int i = 0; i < count; i++) {
        const Matrix *w = products[i].w;
        float *out = products[i].out;
        if (simd_matmul_rows(out, w, x, s)) continue;  /* hook */
        OMP(for schedule(guided) nowait)
        for (int r = 0; r < w->rows; r++) out[r] = row_dot(w, r, x, s);
    }
}

/* out[t][r] = dot(w row r, x token t) for TILE rows and TILE tokens: the rows and tokens of a
   tile stay in cache while their 16 dot products are taken. */
static void tile_dots(float *out, int out_stride, const float *w, const float *x, int cols) {
    for (int r = 0; r < TILE; r++)
        for (int t = 0; t < TILE; t++)
            out[(size_t)t * out_stride + r] =
                dot_fp32(w + (size_t)r * cols, x + (size_t)t * cols, cols);
}

/* The prompt path: out[n_tokens][rows] = x[n_tokens][cols] @ W^T. Threads take panels of
   PANEL_ROWS rows; a panel is widened to float32 once (fp32 rows are used in place) and then
   meets all the tokens from cache, so each weight is read from memory once per batch. */
static void matmul_batch(float *out, const float *x, int n_tokens, const Matrix *w,
                         MatmulScratch *s) {
    int rows = w->rows, cols = w->cols;
    int n_panels = (rows + PANEL_ROWS - 1) / PANEL_ROWS;
    OMP(parallel for schedule(static))
    for (int p = 0; p < n_panels; p++) {
        int r0 = p * PANEL_ROWS, nr = rows - r0 < PANEL_ROWS ? rows - r0 : PANEL_ROWS;
        const float *panel;
        if (w->type == WEIGHT_FP32) {
            panel = (const float *)w->data + (size_t)r0 * cols;
        } else {
            float *buf = s->panels + (size_t)thread_id() * PANEL_ROWS * (size_t)s->max_cols;
            for (int r = 0; r < nr; r++) matrix_row(buf + (size_t)r * cols, w, r0 + r);
            panel = buf;
        }
        for (int t0 = 0; t0 < n_tokens; t0 += TILE) {  /* a few tokens stay in L1/L2 ... */
            for (int r = 0; r < nr; r += TILE) {       /* ... while the panel's rows go by */
                const float *wr = panel + (size_t)r * cols, *xt = x + (size_t)t0 * cols;
                float *o = out + (size_t)t0 * rows + r0 + r;
                if (t0 + TILE <= n_tokens && r + TILE <= nr) {
                    tile_dots(o, rows, wr, xt, cols);
                    continue;
                }
                for (int t = 0; t < TILE && t0 + t < n_tokens; t++)  /* the ragged edges */
                    for (int rr = 0; rr < TILE && r + rr < nr; rr++)
                        o[(size_t)t * rows + rr] =
                            dot_fp32(wr + (size_t)rr * cols, xt + (size_t)t * cols, cols);
            }
        }
    }
}

/* The one matmul dispatch: for each product, out[n_tokens][rows] = W[rows][cols] applied to
   each of the n_tokens vectors x[n_tokens][cols] that the products share. */
static void matmul(const Product *products, int count, const float *x, int n_tokens,
                   MatmulScratch *s) {
    if (n_tokens == 1 && same_input(products, count)) {
        matmul_vector(products, count, x, s);
        return;
    }
    for (int i = 0; i < count; i++) {
        float *out = products[i].out;
        const Matrix *w = products[i].w;
        if (n_tokens == 1) matmul_vector(products + i, 1, x, s);
        else if (!simd_matmul_batch(out, x, n_tokens, w, s))  /* hook */
            matmul_batch(out, x, n_tokens, w, s);
    }
}

static void rmsnorm(float *out, const float *x, const float *weight, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float scale = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = weight[i] * (x[i] * scale);
}

static void softmax(float *x, int n) {
    if (simd_softmax(x, n)) return;  /* hook */
    float max = x[0];
    for (int i = 1; i < n; i++) if (x[i] > max) max = x[i];
    float sum = 0.0f;
    for (int i = 0; i < n; i++) { x[i] = expf(x[i] - max); sum += x[i]; }
    for (int i = 0; i < n; i++) x[i] /= sum;
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
   3. The forward pass

   forward() runs a batch of n_tokens consecutive tokens (positions pos .. pos+n_tokens-1)
   through every layer together, so that each weight matrix is read once per batch instead of
   once per token. Decoding is the same code with one token. Within a batch, attention is
   causal: token t sees the cached positions up to its own. */

/* Prompt tokens per forward() call: larger batches read the weights fewer times. The buffers
   it sizes are only touched as far as a batch reaches. */
#define MAX_BATCH 256

/* The KV cache. Each KV head's keys lie in tiles of KEY_TILE positions, transposed
   ([head_dim][KEY_TILE]): dimension d of the keys of a tile's positions lies contiguous, so
   that the scores of KEY_TILE positions are taken side by side (a vector of them). Each KV
   head's values lie position after position ([head_dim] each), read in order by the weighted
   sum. The cache holds whole steps of CACHE_STEP positions (cache_positions). */
#define KEY_TILE 16
#define CACHE_STEP (2 * KEY_TILE)
#define ATT_ROWS 16      /* attention: query rows per pass over a KV head (rows of scores) */

/* The cache's element types (--cache-type). Keys and values are rounded to the type when
   stored, and attention widens each one back to float32 as it reads it, so a small cache
   computes exactly what a float32 cache holding the rounded numbers would:
   - f32: float32, exact (the default);
   - bf16: the top half of the float32, rounded to nearest even: half the bytes;
   - q8_0: int8, with one float32 scale per CACHE_GROUP consecutive dimensions of a key or a
     value (max |x| / 127, as for q8_0 weights): 1.125 bytes a number. The scales lie beside
     the numbers in the same layouts, a group standing for CACHE_GROUP dimensions. */
enum { CACHE_F32, CACHE_BF16, CACHE_Q8_0 };
#define CACHE_GROUP 32
static const char *const CACHE_TYPE_NAMES[] = { "f32", "bf16", "q8_0" };
static const size_t CACHE_TYPE_SIZES[] = { sizeof(float), sizeof(uint16_t), sizeof(int8_t) };

/* Where dimension d of the key at position p lies in its KV head's keys. */
static size_t key_index(int p, int d, int head_dim) {
    return (size_t)(p / KEY_TILE) * head_dim * KEY_TILE + (size_t)d * KEY_TILE + p % KEY_TILE;
}

/* One layer's cache for one KV head, as attention reads it. */
typedef struct {
    int type;                 /* CACHE_F32, CACHE_BF16 or CACHE_Q8_0 */
    const void *keys;         /* [cache_len / KEY_TILE][head_dim][KEY_TILE] elements */
    const void *values;       /* [cache_len][head_dim] elements */
    const float *key_scales;  /* q8_0: [cache_len / KEY_TILE][head_dim / CACHE_GROUP][KEY_TILE] */
    const float *value_scales;    /* q8_0: [cache_len][head_dim / CACHE_GROUP] */
} KVHead;

/* Dimension d of the KEY_TILE keys of key tile `tile`, widened to float32. */
static void widen_key_row(float *out, const KVHead *kv, int tile, int d, int head_dim) {
    size_t i = key_index(tile * KEY_TILE, d, head_dim);
    if (kv->type == CACHE_F32) {
        memcpy(out, (const float *)kv->keys + i, KEY_TILE * sizeof(float));
    } else if (kv->type == CACHE_BF16) {
        const uint16_t *k = (const uint16_t *)kv->keys + i;
        for (int j = 0; j < KEY_TILE; j++) out[j] = bf16_to_float(k[j]);
    } else {
        const int8_t *k = (const int8_t *)kv->keys + i;
        const float *scales =
            kv->key_scales + key_index(tile * KEY_TILE, d / CACHE_GROUP, head_dim / CACHE_GROUP);
        for (int j = 0; j < KEY_TILE; j++) out[j] = (float)k[j] * scales[j];
    }
}

/* Dimensions d0 .. d0+n-1 of the value at position p, widened to float32 (for q8_0 they lie
   in one group). */
static void widen_value_run(float *out, const KVHead *kv, int p, int d0, int n, int head_dim) {
    size_t i = (size_t)p * head_dim + d0;
    if (kv->type == CACHE_F32) {
        memcpy(out, (const float *)kv->values + i, (size_t)n * sizeof(float));
    } else if (kv->type == CACHE_BF16) {
        const uint16_t *v = (const uint16_t *)kv->values + i;
        for (int j = 0; j < n; j++) out[j] = bf16_to_float(v[j]);
    } else {
        const int8_t *v = (const int8_t *)kv->values + i;
        float scale = kv->value_scales[i / CACHE_GROUP];
        for (int j = 0; j < n; j++) out[j] = (float)v[j] * scale;
    }
}

typedef struct {
    float *x;          /* residual stream [batch][dim] */
    float *xb;         /* normed input / attention output [batch][max(dim, q_dim)] */
    float *xb2;        /* projection output [batch][dim] */
    float *hb, *hb2;   /* feed-forward gate and up [batch][hidden_dim] */
    float *q;          /* query [batch][q_dim] */
    float *k, *v;      /* the batch's keys and values, before store_kv [batch][kv_dim] */
    float *att;        /* attention scores, per thread [ATT_ROWS][cache_len] */
    float *logits;     /* [batch][vocab_size]; pages untouched unless every row is asked for */
    int cache_type;    /* CACHE_F32, CACHE_BF16 or CACHE_Q8_0: the elements below */
    void *key_cache;   /* [n_layers][n_kv_heads][cache_len / KEY_TILE][head_dim][KEY_TILE] */
    void *value_cache;    /* [n_layers][n_kv_heads][cache_len][head_dim] */
    float *key_scales, *value_scales;  /* q8_0: one per CACHE_GROUP elements (KVHead) */
    float *rope_freqs; /* [head_dim / 2] */
    float *rope_cos, *rope_sin;  /* [batch][head_dim / 2] */
    MatmulScratch scratch;
    int seq_len;       /* the context length the cache holds (the -c cap) */
    int cache_len;     /* ... rounded up (cache_positions) */
} RunState;

typedef struct {
    Model model;
    RunState state;
} Transformer;

/* KV head h of the layer whose cache starts at layer_offset (elements). */
static KVHead kv_head(const RunState *s, size_t layer_offset, int h, int head_dim) {
    size_t start = layer_offset + (size_t)h * s->cache_len * head_dim;
    size_t size = CACHE_TYPE_SIZES[s->cache_type];
    KVHead kv = { s->cache_type, (const char *)s->key_cache + start * size,
                  (const char *)s->value_cache + start * size, NULL, NULL };
    if (s->cache_type == CACHE_Q8_0) {
        kv.key_scales = s->key_scales + start / CACHE_GROUP;
        kv.value_scales = s->value_scales + start / CACHE_GROUP;
    }
    return kv;
}

/* x[0 .. n-1] rounded to the cache's type, element d stored at cache[at + d * stride]; for
   q8_0 the scale of group g at scales[scale_at + g * scale_stride]. */
static void store_vector(void *cache, float *scales, int type, size_t at, size_t stride,
                         size_t scale_at, size_t scale_stride, const float *x, int n) {
    if (type == CACHE_F32) {
        for (int d = 0; d < n; d++) ((float *)cache)[at + d * stride] = x[d];
    } else if (type == CACHE_BF16) {
        for (int d = 0; d < n; d++) ((uint16_t *)cache)[at + d * stride] = round_to_bf16(x[d]);
    } else {
        for (int g = 0; g < n / CACHE_GROUP; g++) {
            int16_t q[CACHE_GROUP];
            scales[scale_at + g * scale_stride] =
                quantize_group(q, x + g * CACHE_GROUP, CACHE_GROUP, Q8_MAX);
            for (int i = 0; i < CACHE_GROUP; i++)
                ((int8_t *)cache)[at + (size_t)(g * CACHE_GROUP + i) * stride] = (int8_t)q[i];
        }
    }
}

/* Stores the batch's keys and values (rows [n_tokens][kv_dim] of s->k and s->v, keys already
   rotated) in this layer's cache at positions pos .. pos+n_tokens-1, rounded to the cache's
   type, in the layouts above. Attention then reads the batch's own keys and values from the
   cache like any others, so a prompt fed as a batch or token by token sees the same numbers. */
static void store_kv(RunState *s, const Config *cfg, size_t layer_offset, int pos,
                     int n_tokens) {
    int head_dim = cfg->head_dim, kv_dim = cfg->n_kv_heads * head_dim;
    int groups = head_dim / CACHE_GROUP;
    for (int t = 0; t < n_tokens; t++) {
        int p = pos + t;
        for (int h = 0; h < cfg->n_kv_heads; h++) {
            size_t start = layer_offset + (size_t)h * s->cache_len * head_dim;
            size_t scale_start = start / CACHE_GROUP;  /* (q8_0 only) */
            const float *k = s->k + (size_t)t * kv_dim + (size_t)h * head_dim;
            const float *v = s->v + (size_t)t * kv_dim + (size_t)h * head_dim;
            store_vector(s->key_cache, s->key_scales, s->cache_type,
                         start + key_index(p, 0, head_dim), KEY_TILE,
                         scale_start + key_index(p, 0, groups), KEY_TILE, k, head_dim);
            store_vector(s->value_cache, s->value_scales, s->cache_type,
                         start + (size_t)p * head_dim, 1,
                         scale_start + (size_t)p * groups, 1, v, head_dim);
        }
    }
}

/* Causal grouped-query attention: query head h reads KV head h / heads_per_kv, and token t of
   the batch sees the cached positions up to its own. At long context attention, not the
   weights, is what decoding streams from memory, so each KV head's keys and values are read
   once for all the query rows that use them (its query heads, and in a prompt batch the next
   tokens' too), ATT_ROWS rows per pass: the scores KEY_TILE positions at a time against the
   transposed key tiles, the softmax, then the values in order, each position's meeting every
   row's weight. Each score and output value is one float32 sum in order. */
#define ATT_TILE_ROWS 8  /* rows that share each key or value as it is read */
#define VALUE_CHUNK 256  /* positions per step of the weighted sum (64 KB of 64-wide values) */

#if HAVE_SIMD  /* the hooks into section 8 */
static int simd_attention_scores(float *const *scores, const float *const *q, int nr,
                                 const KVHead *kv, int n_pos, int head_dim, float scale);
static int simd_attention_values(float *const *out, const float *const *weights, int nr,
                                 const KVHead *kv, int p0, int p1, int head_dim);
#else
#define simd_attention_scores(scores, q, nr, kv, n_pos, head_dim, scale) 0
#define simd_attention_values(out, weights, nr, kv, p0, p1, head_dim) 0
#endif

/* scores[r][p] = scale * dot(q[r], key p) for rows r < nr and positions p < n_pos, a whole
   key tile at a time (the tail past n_pos is written too: rows of scores have room). kv: one
   KV head's cache. */
static void attention_scores(float *const *scores, const float *const *q, int nr,
                             const KVHead *kv, int n_pos, int head_dim, float scale) {
    if (simd_attention_scores(scores, q, nr, kv, n_pos, head_dim, scale)) return;  /* hook */
    for (int tile = 0; tile * KEY_TILE < n_pos; tile++) {
        for (int r0 = 0; r0 < nr; r0 += ATT_TILE_ROWS) {
            int n = nr - r0 < ATT_TILE_ROWS ? nr - r0 : ATT_TILE_ROWS;
            float acc[ATT_TILE_ROWS][KEY_TILE] = {{0}}, k[KEY_TILE];
            for (int d = 0; d < head_dim; d++) {
                widen_key_row(k, kv, tile, d, head_dim);
                for (int r = 0; r < n; r++)
                    for (int j = 0; j < KEY_TILE; j++) acc[r][j] += q[r0 + r][d] * k[j];
            }
            for (int r = 0; r < n; r++)
                for (int j = 0; j < KEY_TILE; j++)
                    scores[r0 + r][(size_t)tile * KEY_TILE + j] = acc[r][j] * scale;
        }
    }
}

/* out[r] += sum over positions p in [p0, p1) of weights[r][p] * value p, for rows r < nr
   (at most ATT_TILE_ROWS), a group of a position's values at a time. kv: one KV head's
   cache. */
static void attention_values(float *const *out, const float *const *weights, int nr,
                             const KVHead *kv, int p0, int p1, int head_dim) {
    /* hook: the SIMD kernel sums the first d0 dimensions, a multiple of CACHE_GROUP */
    int d0 = simd_attention_values(out, weights, nr, kv, p0, p1, head_dim);
    for (int p = p0; p < p1 && d0 < head_dim; p++) {
        for (int g0 = d0; g0 < head_dim; g0 += CACHE_GROUP) {
            float v[CACHE_GROUP];
            int n = head_dim - g0 < CACHE_GROUP ? head_dim - g0 : CACHE_GROUP;
            widen_value_run(v, kv, p, g0, n, head_dim);
            for (int r = 0; r < nr; r++) {
                float wr = weights[r][p];
                for (int d = 0; d < n; d++) out[r][g0 + d] += wr * v[d];
            }
        }
    }
}

/* One pass: rows row0 .. row0+nr-1 of KV head `head`, where row i is query head
   head * heads_per_kv + i % heads_per_kv of token i / heads_per_kv (so the rows' last visible
   positions rise with i). Writes each row's output into s->xb. */
static void attention_rows(RunState *s, const Config *cfg, size_t layer_offset, int pos,
                           int head, int row0, int nr) {
    int head_dim = cfg->head_dim, heads_per_kv = cfg->n_heads / cfg->n_kv_heads;
    int q_dim = cfg->n_heads * head_dim;
    KVHead kv = kv_head(s, layer_offset, head, head_dim);
    const float *q[ATT_ROWS];
    float *scores[ATT_ROWS], *out[ATT_ROWS];
    int last[ATT_ROWS];
    for (int r = 0; r < nr; r++) {
        int row = row0 + r, t = row / heads_per_kv, h = head * heads_per_kv + row % heads_per_kv;
        q[r] = s->q + (size_t)t * q_dim + (size_t)h * head_dim;
        out[r] = s->xb + (size_t)t * q_dim + (size_t)h * head_dim;
        scores[r] = s->att + ((size_t)thread_id() * ATT_ROWS + r) * s->cache_len;
        last[r] = pos + t;
    }
    /* scores = q . k / sqrt(head_dim) for every position the last row sees */
    attention_scores(scores, q, nr, &kv, last[nr - 1] + 1, head_dim,
                     1.0f / sqrtf((float)head_dim));
    for (int r = 0; r < nr; r++) {
        softmax(scores[r], last[r] + 1);
        memset(out[r], 0, (size_t)head_dim * sizeof(float));
    }
    /* out = the values weighted by the scores: the positions every row sees, a chunk at a time
       for all the rows, then each row's own few more */
    int shared = last[0] + 1;
    for (int p0 = 0; p0 < shared; p0 += VALUE_CHUNK) {
        int p1 = shared - p0 < VALUE_CHUNK ? shared : p0 + VALUE_CHUNK;
        for (int g = 0; g < nr; g += ATT_TILE_ROWS)
            attention_values(out + g, (const float *const *)scores + g,
                             nr - g < ATT_TILE_ROWS ? nr - g : ATT_TILE_ROWS, &kv, p0, p1,
                             head_dim);
    }
    for (int r = 1; r < nr; r++)
        attention_values(out + r, (const float *const *)scores + r, 1, &kv, shared,
                         last[r] + 1, head_dim);
}

/* Attention for the batch's n_tokens queries in s->q (positions pos .. pos+n_tokens-1) over
   this layer's cached keys and values, which already hold the batch: each KV head's rows in
   passes of ATT_ROWS, the passes split over threads. Writes each token's heads side by side
   into s->xb. */
static void attention(RunState *s, const Config *cfg, size_t layer_offset, int pos,
                      int n_tokens) {
    int rows = n_tokens * (cfg->n_heads / cfg->n_kv_heads);
    int passes = (rows + ATT_ROWS - 1) / ATT_ROWS;
    OMP(parallel for schedule(static))
    for (int i = 0; i < cfg->n_kv_heads * passes; i++) {
        int row0 = i % passes * ATT_ROWS;
        attention_rows(s, cfg, layer_offset, pos, i / passes, row0,
                       rows - row0 < ATT_ROWS ? rows - row0 : ATT_ROWS);
    }
}

/* The rotation angles of positions pos .. pos+n_tokens-1. */
static void rope_angles(RunState *s, const Config *cfg, int pos, int n_tokens) {
    int half = cfg->head_dim / 2;
    for (int t = 0; t < n_tokens; t++) {
        for (int i = 0; i < half; i++) {
            float angle = (float)(pos + t) * s->rope_freqs[i];
            s->rope_cos[(size_t)t * half + i] = cosf(angle);
            s->rope_sin[(size_t)t * half + i] = sinf(angle);
        }
    }
}

/* SwiGLU: silu(gate) * up for the batch's n_tokens rows of `width`, a row per thread at a
   time: a prompt batch's exponentials would otherwise keep the other threads waiting. */
static void swiglu(float *gate, const float *up, int n_tokens, int width) {
    OMP(parallel for schedule(static) if (n_tokens > 1))
    for (int t = 0; t < n_tokens; t++) {
        float *g = gate + (size_t)t * width;
        const float *u = up + (size_t)t * width;
        if (simd_swiglu(g, u, width)) continue;  /* hook */
        for (int i = 0; i < width; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

static void add_into(float *x, const float *y, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] += y[i];
}

/* Output modes of forward(). */
enum { LOGITS_NONE = 0, LOGITS_LAST = 1, LOGITS_ALL = 2 };

/* Runs n_tokens <= MAX_BATCH tokens at positions pos .. pos+n_tokens-1 through the model,
   filling the KV cache there. Returns the logits of the last token (LOGITS_LAST: only that row
   is computed; LOGITS_ALL: row t of s->logits belongs to token t) or NULL (LOGITS_NONE): prompt
   positions before the last one do not need them. */
static float *forward(Transformer *tr, const int *tokens, int n_tokens, int pos,
                      int logits_mode) {
    const Config *cfg = &tr->model.config;
    const Weights *w = &tr->model.weights;
    RunState *s = &tr->state;
    MatmulScratch *scratch = &s->scratch;
    int dim = cfg->dim, kv_dim = cfg->n_kv_heads * cfg->head_dim, half = cfg->head_dim / 2;
    int q_dim = cfg->n_heads * cfg->head_dim, hidden = cfg->hidden_dim;

    /* the token embeddings: the residual stream x, one row per token */
    for (int t = 0; t < n_tokens; t++)
        matrix_row(s->x + (size_t)t * dim, &w->embedding, tokens[t]);
    rope_angles(s, cfg, pos, n_tokens);

    for (int l = 0; l < cfg->n_layers; l++) {
        const Layer *layer = &w->layers[l];
        size_t layer_offset = (size_t)l * (size_t)s->cache_len * (size_t)kv_dim;
        /* The last layer's outputs feed nothing but the logits. Unless every token's logits
           are asked for, the tokens before `from` need only their keys and values there (for
           the cache): their queries, attention and FFN are skipped, as llama.cpp does. */
        int from = 0;
        if (l == cfg->n_layers - 1 && logits_mode != LOGITS_ALL)
            from = logits_mode == LOGITS_LAST ? n_tokens - 1 : n_tokens;
        int m = n_tokens - from;  /* the tokens that go on through the layer */

        /* attention: rmsnorm, then q, k and v */
        OMP(parallel for if (n_tokens > 1))  /* per token: a prompt batch's rows side by side */
        for (int t = 0; t < n_tokens; t++)
            rmsnorm(s->xb + (size_t)t * dim, s->x + (size_t)t * dim, layer->attn_norm, dim,
                    cfg->norm_eps);
        Product qkv[3] = { { s->q, &layer->wq }, { s->k, &layer->wk }, { s->v, &layer->wv } };
        if (from == 0) {
            matmul(qkv, 3, s->xb, n_tokens, scratch);
        } else {
            matmul(qkv + 1, 2, s->xb, n_tokens, scratch);
            if (m > 0) matmul(qkv, 1, s->xb + (size_t)from * dim, m, scratch);
        }
        /* RoPE on the queries and keys; the keys and values go into the KV cache */
        OMP(parallel for if (n_tokens > 1))
        for (int t = 0; t < n_tokens; t++) {  /* query row t - from belongs to token t */
            const float *c = s->rope_cos + (size_t)t * half, *sn = s->rope_sin + (size_t)t * half;
            if (t >= from)
                rope(s->q + (size_t)(t - from) * q_dim, cfg->n_heads, cfg->head_dim, c, sn);
            rope(s->k + (size_t)t * kv_dim, cfg->n_kv_heads, cfg->head_dim, c, sn);
        }
        store_kv(s, cfg, layer_offset, pos, n_tokens);
        if (m == 0) break;  /* (no logits asked for: the cache was all this layer owed) */
        /* causal attention over the cache, then the output projection */
        attention(s, cfg, layer_offset, pos + from, m);
        float *x = s->x + (size_t)from * dim;  /* the rows of the tokens that go on */
        Product wo = { s->xb2, &layer->wo };
        matmul(&wo, 1, s->xb, m, scratch);
        /* residual */
        add_into(x, s->xb2, (size_t)m * dim);

        /* feed-forward: rmsnorm, then w_down(silu(w_gate x) * w_up x) */
        OMP(parallel for if (m > 1))  /* per token: a prompt batch's rows side by side */
        for (int t = 0; t < m; t++)
            rmsnorm(s->xb + (size_t)t * dim, x + (size_t)t * dim, layer->ffn_norm, dim,
                    cfg->norm_eps);
        Product gate_up[2] = { { s->hb, &layer->w_gate }, { s->hb2, &layer->w_up } };
        matmul(gate_up, 2, s->xb, m, scratch);
        swiglu(s->hb, s->hb2, m, hidden);
        Product down = { s->xb2, &layer->w_down };
        matmul(&down, 1, s->hb, m, scratch);
        /* residual */
        add_into(x, s->xb2, (size_t)m * dim);
    }
    if (logits_mode == LOGITS_NONE) return NULL;
    /* final rmsnorm, then the classifier: logits for token t0 on (the last, or all) */
    int t0 = logits_mode == LOGITS_ALL ? 0 : n_tokens - 1;
    for (int t = t0; t < n_tokens; t++)
        rmsnorm(s->x + (size_t)t * dim, s->x + (size_t)t * dim, w->final_norm, dim, cfg->norm_eps);
    Product classifier = { s->logits, &w->classifier };
    matmul(&classifier, 1, s->x + (size_t)t0 * dim, n_tokens - t0, scratch);
    return s->logits + (size_t)(n_tokens - 1 - t0) * cfg->vocab_size;
}

/* ---- The state forward() works in, allocated once ---- */

#if HAVE_SIMD  /* hooks: section 8's own buffers beside the scratch */
static void simd_alloc_scratch(MatmulScratch *s);
static void simd_free_scratch(MatmulScratch *s);
#else
#define simd_alloc_scratch(s) ((void)(s))
#define simd_free_scratch(s) ((void)(s))
#endif

static void alloc_scratch(MatmulScratch *s, int max_cols, int max_tokens) {
    s->max_cols = max_cols;
    s->max_tokens = max_tokens;
    s->n_threads = max_threads();
    s->xq.q = calloc_aligned((size_t)max_cols, sizeof(int16_t), "matmul scratch");
    s->xq.scales = calloc_aligned((size_t)max_cols, sizeof(float), "matmul scratch");
    s->panels = calloc_aligned((size_t)s->n_threads * PANEL_ROWS * (size_t)max_cols,
                               sizeof(float), "matmul scratch");
    simd_alloc_scratch(s);
}

static void free_scratch(MatmulScratch *s) {
    simd_free_scratch(s);
    free_aligned(s->xq.q); free_aligned(s->xq.scales); free_aligned(s->panels);
}

static float *alloc_batch(int width, const char *what) {
    return calloc_aligned((size_t)MAX_BATCH * (size_t)width, sizeof(float), what);
}

/* Positions the cache holds per KV head: seq_len rounded up to whole pairs of key tiles, so
   that a kernel may take key tiles two at a time with no check for a last lone one (a tile
   past the last position holds zeros or stale keys, and the scores from it go unused). */
static int cache_positions(int seq_len) {
    return (seq_len + CACHE_STEP - 1) / CACHE_STEP * CACHE_STEP;
}

/* Bytes of a cache of `positions` positions per KV head: keys and values, scales included. */
static double cache_bytes(const Config *cfg, int cache_type, int positions) {
    double numbers = 2.0 * cfg->n_layers * cfg->n_kv_heads * cfg->head_dim * (double)positions;
    double scales = cache_type == CACHE_Q8_0 ? numbers / CACHE_GROUP * sizeof(float) : 0.0;
    return numbers * (double)CACHE_TYPE_SIZES[cache_type] + scales;
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

/* The state for contexts of up to seq_len positions, with a KV cache of cache_type (q8_0
   needs head_dim a multiple of CACHE_GROUP: the caller checks). The cache is calloc'ed, so
   its pages are the kernel's zero page until a position is stored in them: memory grows with
   the positions used, not with seq_len. */
static void alloc_state(RunState *s, const Config *cfg, int seq_len, int cache_type) {
    int q_dim = cfg->n_heads * cfg->head_dim, kv_dim = cfg->n_kv_heads * cfg->head_dim;
    int wide = q_dim > cfg->dim ? q_dim : cfg->dim;
    s->seq_len = seq_len;
    s->cache_len = cache_positions(seq_len);
    s->cache_type = cache_type;
    size_t cache = (size_t)cfg->n_layers * (size_t)s->cache_len * (size_t)kv_dim;
    s->x = alloc_batch(cfg->dim, "activations");
    s->xb = alloc_batch(wide, "activations");
    s->xb2 = alloc_batch(cfg->dim, "activations");
    s->hb = alloc_batch(cfg->hidden_dim, "activations");
    s->hb2 = alloc_batch(cfg->hidden_dim, "activations");
    s->q = alloc_batch(q_dim, "activations");
    s->k = alloc_batch(kv_dim, "activations");
    s->v = alloc_batch(kv_dim, "activations");
    s->att = calloc_aligned((size_t)max_threads() * ATT_ROWS * (size_t)s->cache_len,
                            sizeof(float), "scores");
    s->logits = alloc_batch(cfg->vocab_size, "logits");
    size_t size = CACHE_TYPE_SIZES[cache_type];
    s->key_cache = calloc_aligned(cache, size, "the key cache (lower -c)");
    s->value_cache = calloc_aligned(cache, size, "the value cache (lower -c)");
    if (cache_type == CACHE_Q8_0) {
        s->key_scales = calloc_aligned(cache / CACHE_GROUP, sizeof(float),
                                       "the key cache (lower -c)");
        s->value_scales = calloc_aligned(cache / CACHE_GROUP, sizeof(float),
                                         "the value cache (lower -c)");
    }
    s->rope_freqs = checked_calloc((size_t)cfg->head_dim / 2, sizeof(float), "rope");
    s->rope_cos = alloc_batch(cfg->head_dim / 2, "rope");
    s->rope_sin = alloc_batch(cfg->head_dim / 2, "rope");
    rope_frequencies(cfg, s->rope_freqs);
    alloc_scratch(&s->scratch, cfg->hidden_dim > wide ? cfg->hidden_dim : wide, MAX_BATCH);
}

static void free_state(RunState *s) {
    void *buffers[] = { s->x, s->xb, s->xb2, s->hb, s->hb2, s->q, s->k, s->v, s->att,
                        s->logits, s->key_cache, s->value_cache, s->key_scales,
                        s->value_scales, s->rope_cos, s->rope_sin };
    for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++) free_aligned(buffers[i]);
    free(s->rope_freqs);
    free_scratch(&s->scratch);
}
/* ----------------------------------------------------------------------------------------
   4. The sampler: picks the next token from the logits. Its stages, each one off unless asked
   for (Meta's defaults: temperature 0.6, top-p 0.9):

     penalties   a token among the last repeat_last_n tokens fed (prompt included), seen there
                 c times: its logit is divided by repeat_penalty (multiplied when negative),
                 then lowered by c * frequency_penalty + presence_penalty
     top-k       the k highest logits
     top-p       of those, the fewest most likely whose probabilities (softmax over the top-k)
                 add up to at least top_p
     min-p       of those, the tokens at least min_p times as likely as the most likely one
     temperature the survivors' probabilities: softmax(logit / temperature); one is drawn

   Where the temperature acts is the one difference between the two orders on offer. Meta's
   generation.py (and Hugging Face's) divides the logits by it first, so top-p and min-p see the
   tempered probabilities: that is the default. llama.cpp's chain applies it last, so top-p and
   min-p see probabilities at temperature 1 (--sampler-order llama.cpp).

   Temperature 0 is greedy: the penalties, then the highest logit (the lowest id on a tie),
   which no filter can remove. Every filter keeps a prefix of the tokens in one order (logit
   descending, id ascending), so the survivors are known by the last one kept. No stage sorts
   the vocabulary: top-k finds its boundary by quickselect, top-p by buckets of logit and a
   quickselect inside one bucket, min-p is a threshold, and the draw walks the ids in order.
   Logits that are not all finite (a damaged model) are refused before any stage. */

typedef struct {
    float temperature, top_p, min_p;
    int top_k;                 /* 0: off */
    float repeat_penalty;      /* 1: off */
    float presence_penalty, frequency_penalty;  /* 0: off */
    int repeat_last_n;         /* tokens the penalties look back on; -1: the whole context */
    int temperature_last;      /* 1: llama.cpp's order; 0: Meta's (temperature before top-p) */
} SamplerParams;

typedef struct {
    float logit;
    float weight;  /* exp(logit - max logit): probability at temperature 1, unnormalised */
    int index;
} ProbIndex;

typedef struct {
    SamplerParams params;
    int vocab_size;
    ProbIndex *candidates;     /* vocab_size entries */
    int *recent;               /* ring of the last `capacity` tokens fed (penalties only) */
    int *counts;               /* per token: how often it is in the ring */
    int capacity, n_recent, next;
    int position;              /* of the last token fed, whose logits are sampled */
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

static int penalties_on(const SamplerParams *p) {
    return p->repeat_last_n != 0 &&
           (p->repeat_penalty != 1.0f || p->presence_penalty != 0.0f ||
            p->frequency_penalty != 0.0f);
}

/* context: the KV cache's positions, the look-back of repeat_last_n -1 */
static void sampler_init(Sampler *s, const SamplerParams *params, int vocab_size, int context,
                         unsigned long long seed) {
    *s = (Sampler){ .params = *params, .vocab_size = vocab_size,
                    .rng_state = seed * 2654435761ull + 1 };
    s->candidates = checked_calloc((size_t)vocab_size, sizeof(ProbIndex), "the sampler");
    if (penalties_on(params)) {
        s->capacity = params->repeat_last_n < 0 ? context : params->repeat_last_n;
        s->recent = checked_calloc((size_t)s->capacity, sizeof(int), "the penalties' tokens");
        s->counts = checked_calloc((size_t)vocab_size, sizeof(int), "the penalties' counts");
    }
}

static void sampler_free(Sampler *s) {
    free(s->candidates);
    free(s->recent);
    free(s->counts);
}

/* Forgets every token the penalties hold: the context starts again from position 0 (chat's
   slide feeds the kept turns again), and its state is what the kept tokens make it. */
static void sampler_restart(Sampler *s) {
    for (int j = 0; j < s->n_recent; j++) s->counts[s->recent[j]] = 0;
    s->n_recent = s->next = 0;
}

/* Records the tokens fed to the model, the first at position `first`. */
static void sampler_accept(Sampler *s, const int *tokens, int n, int first) {
    if (first == 0) sampler_restart(s);  /* a new context: nothing of the old one counts */
    s->position = first + n - 1;
    for (int i = 0; i < n && s->capacity > 0; i++) {
        int t = tokens[i];
        if (t < 0 || t >= s->vocab_size) continue;
        if (s->n_recent == s->capacity) s->counts[s->recent[s->next]]--;
        else s->n_recent++;
        s->recent[s->next] = t;
        s->counts[t]++;
        s->next = (s->next + 1) % s->capacity;
    }
}

/* A penalised logit that overflowed becomes the largest finite float of its sign. */
static float clamp_finite(float v) {
    return isinf(v) ? copysignf(nextafterf(INFINITY, 0.0f), v) : v;
}

/* The penalties, once per distinct token in the ring (its count is negated while done). */
static void apply_penalties(Sampler *s, float *logits) {
    const SamplerParams *p = &s->params;
    for (int j = 0; j < s->n_recent; j++) {
        int t = s->recent[j], count = s->counts[t];
        if (count <= 0) continue;
        float v = logits[t];
        v = v <= 0.0f ? v * p->repeat_penalty : v / p->repeat_penalty;
        v -= (float)count * p->frequency_penalty + p->presence_penalty;
        logits[t] = clamp_finite(v);
        s->counts[t] = -count;
    }
    for (int j = 0; j < s->n_recent; j++)
        if (s->counts[s->recent[j]] < 0) s->counts[s->recent[j]] = -s->counts[s->recent[j]];
}

static int sample_argmax(const float *p, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (p[i] > p[best]) best = i;
    return best;
}

/* The order every filter keeps a prefix of: logit descending, id ascending. */
static int comes_before(const ProbIndex *a, const ProbIndex *b) {
    return a->logit > b->logit || (a->logit == b->logit && a->index < b->index);
}

static int compare_order(const void *a, const void *b) {
    return comes_before(a, b) ? -1 : comes_before(b, a) ? 1 : 0;
}

static void swap_candidates(ProbIndex *a, ProbIndex *b) {
    ProbIndex t = *a;
    *a = *b;
    *b = t;
}

/* Moves the elements of c[lo, hi) that come before c[pivot] to the front of the range, then
   the pivot; returns the pivot's new place and adds their weights to *mass. */
static int partition(ProbIndex *c, int lo, int hi, int pivot, double *mass) {
    swap_candidates(&c[pivot], &c[hi - 1]);
    int store = lo;
    for (int i = lo; i < hi - 1; i++) {
        if (comes_before(&c[i], &c[hi - 1])) {
            *mass += c[i].weight;
            swap_candidates(&c[i], &c[store++]);
        }
    }
    swap_candidates(&c[store], &c[hi - 1]);
    return store;
}

/* Reorders c[0, n) so that its first `count` elements are the first `count` in the order, and
   returns count: the smallest with count >= min_count whose weights add up to at least `mass`
   (n if rounding keeps the sum below it). Quickselect, O(n) expected; after SELECT_ROUNDS
   rounds it sorts what is left, which bounds the worst case. */
#ifndef SELECT_ROUNDS
#define SELECT_ROUNDS 64  /* tests/test_sampler.py builds with 0 to check the sorting path */
#endif
static int select_prefix(ProbIndex *c, int n, int min_count, double mass) {
    int lo = 0, hi = n;  /* c[0, lo) are in the prefix, and its end lies in (lo, hi] */
    double taken = 0.0;  /* weights of c[0, lo) */
    for (int round = 0; hi - lo > 1; round++) {
        if (round == SELECT_ROUNDS) {
            qsort(c + lo, (size_t)(hi - lo), sizeof(ProbIndex), compare_order);
            for (int i = lo; i < hi; i++) {
                taken += c[i].weight;
                if (i + 1 >= min_count && taken >= mass) return i + 1;
            }
            return hi;
        }
        double before = taken;
        int p = partition(c, lo, hi, lo + (hi - lo) / 2, &before);
        double through = before + c[p].weight;
        if (p + 1 < min_count || through < mass) {
            lo = p + 1;
            taken = through;
        } else if (p > lo && p >= min_count && before >= mass) {
            hi = p;
        } else {
            return p + 1;
        }
    }
    return hi;
}

/* Top-p's boundary: reorders c[0, n) so that its first `count` elements are the fewest first
   ones in the order whose weights add up to `mass`, and returns count. One pass files each
   weight under its logit's distance below the top, in buckets 1/256 wide (the last one open);
   the buckets before the one where the mass is reached are wholly in, and only that bucket's
   tokens go through the quickselect: a few hundred of 128K even for a nearly flat
   distribution. */
#define MASS_BUCKETS 4096

static int mass_bucket(float logit, float max) {
    float distance = (max - logit) * 256.0f;  /* an overflow to inf lands in the last bucket */
    return distance < (float)(MASS_BUCKETS - 1) ? (int)distance : MASS_BUCKETS - 1;
}

static int select_nucleus(ProbIndex *c, int n, float max, double mass) {
    double bucket_mass[MASS_BUCKETS] = {0};
    for (int i = 0; i < n; i++) bucket_mass[mass_bucket(c[i].logit, max)] += c[i].weight;
    double before = 0.0;
    int b = 0;
    while (b < MASS_BUCKETS - 1 && before + bucket_mass[b] < mass) before += bucket_mass[b++];
    int front = 0;  /* the buckets before b, then bucket b */
    for (int i = 0; i < n; i++)
        if (mass_bucket(c[i].logit, max) < b) swap_candidates(&c[front++], &c[i]);
    int end = front;
    for (int i = front; i < n; i++)
        if (mass_bucket(c[i].logit, max) == b) swap_candidates(&c[end++], &c[i]);
    return front + select_prefix(c + front, end - front, front > 0 ? 0 : 1, mass - before);
}

/* Draws among the survivors of top-k, top-p and min-p at the temperature, with coin in [0, 1).
   The logits are overwritten with the survivors' weights (0 for the others). */
static int sample_filtered(Sampler *s, float *logits, float coin) {
    const SamplerParams *p = &s->params;
    int n = s->vocab_size, count = n;
    float max = logits[sample_argmax(logits, n)];
    ProbIndex *c = s->candidates;
    float filter_temperature = p->temperature_last ? 1.0f : p->temperature;  /* top-p's, min-p's */
    for (int i = 0; i < n; i++) c[i] = (ProbIndex){ logits[i], 0.0f, i };
    if (p->top_k > 0 && p->top_k < n) count = select_prefix(c, n, p->top_k, 0.0);
    if (p->top_p < 1.0f) {
        double total = 0.0;
        for (int i = 0; i < count; i++)
            total += c[i].weight = expf((c[i].logit - max) / filter_temperature);
        count = select_nucleus(c, count, max, (double)p->top_p * total);
    }
    if (p->min_p > 0.0f) {  /* the most likely token is always in c[0, count) and kept */
        float floor = max + logf(p->min_p) * filter_temperature;
        int kept = 0;
        for (int i = 0; i < count; i++) if (c[i].logit >= floor) c[kept++] = c[i];
        count = kept;
    }
    ProbIndex last = c[0];
    for (int i = 1; i < count; i++) if (comes_before(&last, &c[i])) last = c[i];

    double total = 0.0;
    for (int i = 0; i < n; i++) {
        ProbIndex t = { logits[i], 0.0f, i };
        logits[i] = comes_before(&last, &t) ? 0.0f : expf((logits[i] - max) / p->temperature);
        total += logits[i];
    }
    double target = coin * total, cdf = 0.0;
    for (int i = 0; i < n; i++) {
        cdf += logits[i];
        if (target < cdf) return i;
    }
    return last.index;  /* rounding left the sum just below the target */
}

static int all_finite(const float *x, int n) {
    for (int i = 0; i < n; i++) if (!isfinite(x[i])) return 0;
    return 1;
}

/* The next token for a given coin in [0, 1), or -1 when the logits are not all finite. The
   logits are scratch. */
static int sample_with_coin(Sampler *s, float *logits, float coin) {
    if (!all_finite(logits, s->vocab_size)) return -1;
    if (s->n_recent > 0) apply_penalties(s, logits);
    if (s->params.temperature == 0.0f) return sample_argmax(logits, s->vocab_size);
    return sample_filtered(s, logits, coin);
}

static int sample(Sampler *s, float *logits) {
    int token = sample_with_coin(s, logits, random_f32(&s->rng_state));
    if (token < 0)
        die("the model produced non-finite logits (NaN or Inf) at position %d", s->position);
    return token;
}

/* ----------------------------------------------------------------------------------------
   5. Generation

   A Session is the model plus where its KV cache stands: tokens are fed at `pos`, and every
   generated token is fed back before the next one is sampled. Ctrl-C (SIGINT) sets a flag
   that generation checks at every token, so a reply stops cleanly instead of the program. */

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
    int json;                 /* -o json: chat prints one JSON object per message */
    int context_shift;        /* chat drops its oldest turns when the context is full */
    int ids_on_line;          /* ids printed on the current output line */
    Utf8Decoder utf8;
    double prompt_seconds, generate_seconds;
    long prompt_tokens, generated_tokens;
    double load_seconds;         /* from the start to a ready model, tokenizer and cache */
    double first_token_seconds;  /* from the first prompt's (or message's) feeding to its
                                    first sampled token; 0: none yet */
} Session;

/* Set by SIGINT; whoever acts on it clears it. The one mutable global of the program, with
   the terminal state of chat's line editor (section 6), which signals must also reach. */
static volatile sig_atomic_t interrupted;

static void restore_terminal(void);

static void on_interrupt(int sig) {
    if (interrupted) {  /* a second Ctrl-C before the first was acted on: quit at once */
        restore_terminal();
        signal(sig, SIG_DFL);
        raise(sig);
    }
    interrupted = 1;
}

/* From now on Ctrl-C stops generation (see `interrupted`) instead of the program. */
static void catch_interrupts(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_interrupt;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART;  /* reads and writes carry on; the flag is polled */
    sigaction(SIGINT, &action, NULL);
}

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

/* Feeds tokens at the current position, MAX_BATCH at a time, and returns the logits after the
   last one. The caller has checked that they fit in the context. */
static float *feed(Session *s, const int *tokens, size_t n) {
    float *logits = NULL;
    size_t vocab = (size_t)s->tr->model.config.vocab_size;
    for (size_t i = 0; i < n; i += MAX_BATCH) {
        int batch = n - i < MAX_BATCH ? (int)(n - i) : MAX_BATCH;
        int last_batch = i + (size_t)batch == n;
        int mode = s->logits_file ? LOGITS_ALL : last_batch ? LOGITS_LAST : LOGITS_NONE;
        logits = forward(s->tr, tokens + i, batch, s->pos, mode);
        sampler_accept(&s->sampler, tokens + i, batch, s->pos);
        if (s->logits_file)
            for (int t = 0; t < batch; t++) write_logits(s, s->tr->state.logits + t * vocab);
        s->pos += batch;
    }
    return logits;
}

static void push_or_die(TokenList *list, int id) {
    if (token_list_push(list, id) != TOKENIZER_OK) die("out of memory");
}

static int is_stop_id(const Session *s, int id) {
    for (int i = 0; i < s->n_stop_ids; i++) if (s->stop_ids[i] == id) return 1;
    return 0;
}

static void add_stop_id(Session *s, int id) {
    if (id < 0 || is_stop_id(s, id) || s->n_stop_ids == MAX_STOP_IDS) return;
    s->stop_ids[s->n_stop_ids++] = id;
}

/* Writes UTF-8 text on f as the inside of a JSON string: quotes, backslashes and control
   characters escaped, everything else (valid UTF-8 by then) as it is. */
static void write_json_chars(FILE *f, const unsigned char *text, size_t len) {
    for (size_t i = 0; i < len; i++) {
        unsigned char c = text[i];
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c == '\n') fputs("\\n", f);
        else if (c == '\r') fputs("\\r", f);
        else if (c == '\t') fputs("\\t", f);
        else if (c < 0x20) fprintf(f, "\\u%04x", c);
        else putc(c, f);
    }
}

/* Text on f through a UTF-8 decoder (so that a character split over several calls comes out
   whole, and invalid bytes as U+FFFD), JSON-escaped when json is set. flush: the end of the
   text, where an incomplete character is given up. */
static void write_utf8(FILE *f, Utf8Decoder *utf8, int json, const unsigned char *text,
                       size_t len, int flush) {
    unsigned char out[UTF8_DECODER_OUT_MAX(256)];
    for (;;) {  /* in chunks, so that `out` always fits */
        size_t chunk = len < 256 ? len : 256;
        size_t n = utf8_decoder_feed(utf8, text, chunk, out);
        if (chunk == len && flush) n += utf8_decoder_flush(utf8, out + n);
        if (json) write_json_chars(f, out, n);
        else fwrite(out, 1, n, f);
        text += chunk;
        len -= chunk;
        if (len == 0) break;
    }
}

/* Text for stdout, through the session's decoder, JSON-escaped with -o json. */
static void write_text(Session *s, const unsigned char *text, size_t len, int flush) {
    write_utf8(stdout, &s->utf8, s->json, text, len, flush);
}

/* Prints one generated token: its id, or its bytes as text. */
static void emit_token(Session *s, int id) {
    if (s->print_ids) {
        printf(s->ids_on_line++ > 0 ? " %d" : "%d", id);
    } else {
        size_t len;
        const unsigned char *piece = tokenizer_piece(s->tokenizer, id, &len);
        if (piece) write_text(s, piece, len, 0);
    }
    fflush(stdout);
}

static void finish_output(Session *s) {
    if (!s->print_ids) write_text(s, (const unsigned char *)"", 0, 1);
    fflush(stdout);
}

/* Feeds the prompt, then samples and feeds up to max_new tokens, stopping after a stop token
   (which is printed only as an id), when the context is full or at Ctrl-C. Returns the last
   sampled token, or -1 if none was. The last sampled token is not fed: the caller decides.
   Every sampled token but a stop token is appended to `reply` when it is not NULL. */
static int generate(Session *s, const int *prompt, size_t n_prompt, int max_new,
                    TokenList *reply) {
    int seq_len = s->tr->state.seq_len;
    double start = now_seconds();
    float *logits = feed(s, prompt, n_prompt);
    double prompt_done = now_seconds();
    s->prompt_seconds += prompt_done - start;
    s->prompt_tokens += (long)n_prompt;
    int token = -1;
    for (int produced = 0; max_new <= 0 || produced < max_new; produced++) {
        if (interrupted) break;  /* here `token` (if any) is not fed yet, as documented */
        if (token >= 0) {
            if (s->pos >= seq_len) {
                fprintf(stderr, "\n[context full: %d positions (-c); generation stopped]\n",
                        seq_len);
                break;
            }
            logits = feed(s, &token, 1);
        }
        token = sample(&s->sampler, logits);
        if (s->first_token_seconds == 0) s->first_token_seconds = now_seconds() - start;
        int stop = is_stop_id(s, token);
        if (!stop || s->print_ids) emit_token(s, token);
        if (!stop && reply) push_or_die(reply, token);
        s->generated_tokens++;
        if (stop) break;
    }
    s->generate_seconds += now_seconds() - prompt_done;
    return token;
}

/* The stats line, after the run: the prompt's and the generation's speed, the load time, the
   time to the first token (the first prompt's latency), the threads and the kernels. Everything
   on stdout is flushed first, so that it comes before the line where stdout and stderr meet
   (a terminal, or `2>&1`). */
static void print_stats(const Session *s, const char *kernels) {
    fflush(stdout);
    long p = s->prompt_tokens, g = s->generated_tokens;
    int threads = max_threads();
    double g_rate = s->generate_seconds > 0 ? (double)g / s->generate_seconds : 0.0;
    char per_token[32] = "-", first[32] = "-";
    if (g_rate > 0) snprintf(per_token, sizeof per_token, "%.1f", 1000.0 / g_rate);
    if (s->first_token_seconds > 0) snprintf(first, sizeof first, "%.2f s", s->first_token_seconds);
    fprintf(stderr, "prompt: %ld token%s, %.1f tok/s; generated: %ld token%s, %.1f tok/s, "
            "%s ms/token; load %.2f s, first token %s; %d thread%s, %s kernels\n",
            p, p == 1 ? "" : "s", s->prompt_seconds > 0 ? (double)p / s->prompt_seconds : 0.0,
            g, g == 1 ? "" : "s", g_rate, per_token, s->load_seconds, first, threads,
            threads == 1 ? "" : "s", kernels);
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
   into the one KV cache; when the next turn does not fit, the oldest turns are dropped and
   what is kept is fed again (a context that slides).

   The section's parts: the dialog format, reading a message (from a pipe), the dialog with
   its sliding context, the commands (/help, /clear, /save, /exit), the chat loop, and (6b)
   the terminal line editor that reads a message when stdin is a terminal. */

/* Length of the UTF-8 character starting at s[0] and its code point, decoded strictly (the
   tokenizer's decoder passes a character through unchanged only if it is well formed: no
   overlong form, surrogate or truncation); anything else is a one-byte character that is not
   white space. */
static int utf8_char_at(const unsigned char *s, size_t len, unsigned int *cp) {
    unsigned char c = s[0];
    int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    unsigned char out[UTF8_DECODER_OUT_MAX(4)];
    Utf8Decoder strict = {0};
    if (n == 0 || (size_t)n > len || utf8_decoder_feed(&strict, s, (size_t)n, out) != (size_t)n ||
        memcmp(out, s, (size_t)n) != 0) {
        *cp = 0xFFFFFFFF;
        return 1;
    }
    unsigned int v = n == 1 ? c : (unsigned int)(c & (0x7F >> n));
    for (int i = 1; i < n; i++) v = (v << 6) | (s[i] & 0x3F);
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

static void append_header(const Tokenizer *t, const DialogIds *d, const char *role,
                          TokenList *out) {
    push_or_die(out, d->start_header);
    encode_or_die(t, role, strlen(role), 0, out);
    push_or_die(out, d->end_header);
    encode_or_die(t, "\n\n", 2, 0, out);
}

/* A message whose content is already stripped. */
static void append_message(const Tokenizer *t, const DialogIds *d, const char *role,
                           const char *content, size_t len, TokenList *out) {
    append_header(t, d, role, out);
    encode_or_die(t, content, len, 0, out);
    push_or_die(out, d->eot);
}

static int dialog_special(const Tokenizer *t, const char *text) {
    int id = tokenizer_special_id(t, text);
    if (id < 0) die("the tokenizer has no %s token: not a Llama 3 instruct tokenizer", text);
    return id;
}

static void print_id_line(const char *tag, const int *ids, size_t n) {
    printf("%s", tag);
    for (size_t i = 0; i < n; i++) printf(" %d", ids[i]);
    printf("\n");
}

/* One message as a JSON object {"role":"...","content":"..."} on f, with "interrupted":true
   for a reply that Ctrl-C stopped. */
static void write_json_message(FILE *f, const char *role, const char *content, size_t len,
                               int interrupted_reply) {
    Utf8Decoder utf8 = {0};
    fprintf(f, "{\"role\":\"%s\",\"content\":\"", role);
    write_utf8(f, &utf8, 1, (const unsigned char *)content, len, 1);
    fputs(interrupted_reply ? "\",\"interrupted\":true}" : "\"}", f);
}

/* -o json: one message as one line. */
static void print_json_message(const char *role, const char *content, size_t len) {
    write_json_message(stdout, role, content, len, 0);
    printf("\n");
    fflush(stdout);
}

/* ---- Reading a message ----------------------------------------------------------------

   A message is read into a Text. From a pipe or a file it is one line of any length; a line
   that ends in a backslash continues on the next one (the backslash becomes a newline). */

typedef struct {
    char *bytes;
    size_t len, capacity;
} Text;

static void text_insert(Text *t, size_t at, const char *bytes, size_t n) {
    if (t->len + n + 1 > t->capacity) {
        size_t capacity = t->capacity ? t->capacity : 256;
        while (capacity < t->len + n + 1) capacity *= 2;
        char *grown = realloc(t->bytes, capacity);
        if (!grown) die("out of memory reading a message of %zu bytes", t->len + n);
        t->bytes = grown;
        t->capacity = capacity;
    }
    memmove(t->bytes + at + n, t->bytes + at, t->len - at);
    memcpy(t->bytes + at, bytes, n);
    t->len += n;
    t->bytes[t->len] = '\0';
}

static void text_delete(Text *t, size_t from, size_t to) {
    if (from == to) return;
    memmove(t->bytes + from, t->bytes + to, t->len - to);
    t->len -= to - from;
    if (t->bytes) t->bytes[t->len] = '\0';
}

static void text_set(Text *t, const Text *from) {
    t->len = 0;
    text_insert(t, 0, from->bytes ? from->bytes : "", from->len);
}

/* Returns 0, or -1 at end of input with nothing read, or after a Ctrl-C between replies
   (noticed once the read returns: reads restart after a signal). */
static int read_piped_message(Text *message, char **line, size_t *capacity) {
    message->len = 0;
    for (int lines = 0;; lines++) {
        ssize_t n = getline(line, capacity, stdin);
        if (interrupted) return -1;
        if (n < 0) {
            if (ferror(stdin)) die("cannot read stdin: %s", strerror(errno));
            return lines > 0 ? 0 : -1;
        }
        if (n > 0 && (*line)[n - 1] == '\n') n--;
        int more = n > 0 && (*line)[n - 1] == '\\';
        if (more) (*line)[n - 1] = '\n';
        text_insert(message, message->len, *line, (size_t)n);
        if (!more) return 0;
    }
}

/* On a terminal, a message is read by a line editor instead (6b, after the chat loop): its
   state, and the three calls the chat loop makes. */
typedef struct {
    Text text;                 /* the message being edited */
    size_t cursor;             /* byte offset in text */
    Text *history;             /* earlier messages; history[n_history] is the one being typed */
    size_t n_history, shown;   /* shown: the history entry on screen */
    int cursor_row;            /* rows between the prompt's first row and the cursor */
    int in_paste;
    int pending_cr;            /* a paste's \r was just turned into \n: a \n after it is dropped */
    int esc_state;             /* 0: no sequence; 1: after ESC; 2: in ESC [ ...; 3: after ESC O */
    char esc_params[16];
    size_t n_esc_params;
    unsigned char input[4096]; /* bytes read but not used yet (typed ahead) */
    size_t input_start, input_len;
} Editor;
static int editor_open(Editor *e);
static int editor_read(Editor *e);
static void editor_show(Editor *e, const Text *message);
static void editor_close(Editor *e);

/* ---- The dialog and its sliding context ------------------------------------------------ */

/* The dialog as the KV cache holds it: ids[0 .. s->pos) are in the cache, and the rest (the
   end of the last reply: its last sampled token, <|eot_id|>) goes in with the next turn. */
typedef struct {
    TokenList ids;
    size_t fixed;        /* <|begin_of_text|> and the system message: never dropped */
    size_t *turn_start;  /* where each user turn starts in ids */
    size_t n_turns, turn_capacity;
} Dialog;

/* An array of `count` items of `size` bytes with room for one more: doubled when full. */
static void *make_room(void *items, size_t count, size_t *capacity, size_t size,
                       const char *what) {
    if (count < *capacity) return items;
    size_t doubled = *capacity ? 2 * *capacity : 16;
    void *grown = realloc(items, doubled * size);
    if (!grown) die("out of memory for %s", what);
    *capacity = doubled;
    return grown;
}

static void dialog_start_turn(Dialog *d) {
    d->turn_start = make_room(d->turn_start, d->n_turns, &d->turn_capacity, sizeof(size_t),
                              "the chat history");
    d->turn_start[d->n_turns++] = d->ids.count;
}

/* How many oldest turns to drop so that the kept dialog plus `incoming` ids leaves `room`
   positions free, and uses at most half the context (so that the next turns need no slide). */
static size_t turns_to_drop(const Dialog *d, size_t incoming, size_t room, size_t seq_len) {
    size_t drop = 0;
    for (; drop < d->n_turns; drop++) {
        size_t kept = d->fixed + (d->ids.count - d->turn_start[drop]) + incoming;
        if (kept + room <= seq_len && kept <= seq_len / 2) break;
    }
    return drop;
}

/* Removes the oldest `drop` turns; the cache must then be fed again from position 0. */
static void dialog_drop_turns(Dialog *d, size_t drop) {
    size_t from = drop < d->n_turns ? d->turn_start[drop] : d->ids.count;
    size_t removed = from - d->fixed;
    memmove(d->ids.ids + d->fixed, d->ids.ids + from, (d->ids.count - from) * sizeof(int));
    d->ids.count -= removed;
    for (size_t i = drop; i < d->n_turns; i++) d->turn_start[i - drop] = d->turn_start[i] - removed;
    d->n_turns -= drop;
}

/* The length in bytes of the longest regular token: a message of more bytes than that many
   times the positions it may use can never fit, and is refused before it is encoded. */
static size_t longest_token(const Tokenizer *t) {
    size_t longest = 1;
    for (int id = 0; id < tokenizer_vocab_size(t); id++) {
        size_t len;
        if (!tokenizer_is_special(t, id) && tokenizer_piece(t, id, &len) && len > longest)
            longest = len;
    }
    return longest;
}

/* A message of the conversation as text (a reply as its tokens' bytes), for /save. */
typedef struct {
    const char *role;
    Text content;
    int interrupted;         /* a reply that Ctrl-C stopped */
} Message;

/* A chat session: the model's session, the dialog, the transcript, and what a turn needs. */
typedef struct {
    Session *s;
    DialogIds d;
    Dialog dialog;
    size_t seq_len;
    size_t room;             /* positions a reply needs at least: a turn must leave them free */
    size_t overhead;         /* the ids of a turn besides its content */
    size_t max_token_bytes;  /* longest_token() */
    TokenList incoming;      /* the ids of the turn being added */
    TokenList reply;
    Message *transcript;     /* every message of the conversation, the dropped turns' too */
    size_t n_messages, message_capacity;
    size_t fixed_messages;   /* the system message, which /clear keeps */
} Chat;

static void transcript_add(Chat *c, const char *role, const char *content, size_t len) {
    c->transcript = make_room(c->transcript, c->n_messages, &c->message_capacity,
                              sizeof(Message), "the transcript");
    Message *m = &c->transcript[c->n_messages++];
    *m = (Message){ .role = role };
    text_insert(&m->content, 0, content, len);
}

/* The reply just generated (c->reply), as the bytes of its tokens. */
static void transcript_add_reply(Chat *c, int interrupted_reply) {
    transcript_add(c, "assistant", "", 0);
    Message *m = &c->transcript[c->n_messages - 1];
    m->interrupted = interrupted_reply;
    for (size_t i = 0; i < c->reply.count; i++) {
        size_t len;
        const unsigned char *piece = tokenizer_piece(c->s->tokenizer, c->reply.ids[i], &len);
        if (piece) text_insert(&m->content, m->content.len, (const char *)piece, len);
    }
}

static void transcript_truncate(Chat *c, size_t keep) {
    for (size_t i = keep; i < c->n_messages; i++) free(c->transcript[i].content.bytes);
    if (keep < c->n_messages) c->n_messages = keep;
}

enum { TURN_FITS, TURN_REFUSED, TURN_ENDS };

/* Encodes the next turn into c->incoming and makes room for it: by dropping the oldest turns
   when the context slides, or not at all (TURN_ENDS) when it does not. A message that could
   not fit even alone is TURN_REFUSED, before it is encoded when its length in bytes says so. */
static int fit_turn(Chat *c, const char *content, size_t len) {
    Session *s = c->s;
    size_t pending = c->dialog.ids.count - (size_t)s->pos;
    /* At least this many ids: no token covers more than max_token_bytes of the text. */
    size_t least = c->overhead + (len + c->max_token_bytes - 1) / c->max_token_bytes;
    size_t used = s->context_shift ? c->dialog.fixed : (size_t)s->pos + pending;
    size_t limit = used < c->seq_len ? c->seq_len - used : 0;  /* positions the turn may use */
    if (least + c->room > limit) {
        if (!s->context_shift) {
            fprintf(stderr, "run: context full: the next turn needs at least %zu positions, %d "
                    "of %zu are used (-c); session ended\n", pending + least, s->pos, c->seq_len);
            return TURN_ENDS;
        }
        fprintf(stderr, "run: message refused: its %zu bytes need at least %zu positions and at "
                "most %zu are free (-c %zu); the session goes on\n", len, least,
                limit - c->room, c->seq_len);
        return TURN_REFUSED;
    }
    c->incoming.count = 0;
    append_message(s->tokenizer, &c->d, "user", content, len, &c->incoming);
    append_header(s->tokenizer, &c->d, "assistant", &c->incoming);
    size_t needed = pending + c->incoming.count;
    if ((size_t)s->pos + needed + c->room <= c->seq_len) return TURN_FITS;
    if (!s->context_shift) {
        fprintf(stderr, "run: context full: the next turn needs %zu positions, %d of %zu are "
                "used (-c); session ended\n", needed, s->pos, c->seq_len);
        return TURN_ENDS;
    }
    if (c->dialog.fixed + c->incoming.count + c->room > c->seq_len) {
        fprintf(stderr, "run: message refused: it needs %zu positions and at most %zu are free "
                "(-c %zu); the session goes on\n", c->incoming.count,
                c->seq_len - c->dialog.fixed - c->room, c->seq_len);
        return TURN_REFUSED;
    }
    size_t drop = turns_to_drop(&c->dialog, c->incoming.count, c->room, c->seq_len);
    size_t before = c->dialog.ids.count;
    dialog_drop_turns(&c->dialog, drop);
    fprintf(stderr, "run: context full: dropped the %zu oldest turn%s (%zu positions); feeding "
            "the %zu kept positions again\n", drop, drop == 1 ? "" : "s",
            before - c->dialog.ids.count, c->dialog.ids.count);
    s->pos = 0;
    return TURN_FITS;
}

/* Adds the fitted turn to the dialog, feeds what the cache lacks and prints the reply. The
   reply goes into the dialog as sampled (its stop token aside), closed by the <|eot_id|> the
   format puts after it; its last token and that <|eot_id|> are fed with the next turn. */
static void answer(Chat *c, int max_reply, int interactive) {
    Session *s = c->s;
    dialog_start_turn(&c->dialog);
    for (size_t i = 0; i < c->incoming.count; i++) push_or_die(&c->dialog.ids, c->incoming.ids[i]);
    const int *fed = c->dialog.ids.ids + s->pos;
    size_t n_fed = c->dialog.ids.count - (size_t)s->pos;
    if (s->print_ids) print_id_line("in:", fed, n_fed);
    if (interactive && !s->json) printf("Assistant: ");
    if (s->print_ids) printf("out:");
    if (s->json) printf("{\"role\":\"assistant\",\"content\":\"");
    s->ids_on_line = 1;  /* so that every id after "out:" gets its space */
    c->reply.count = 0;
    generate(s, fed, n_fed, max_reply, &c->reply);  /* adds to c->reply, not to the dialog */
    finish_output(s);
    if (s->json) printf(interrupted ? "\",\"interrupted\":true}" : "\"}");
    printf("\n");
    fflush(stdout);
    transcript_add_reply(c, interrupted != 0);
    interrupted = 0;
    for (size_t i = 0; i < c->reply.count; i++) push_or_die(&c->dialog.ids, c->reply.ids[i]);
    push_or_die(&c->dialog.ids, c->d.eot);
}

/* Sets up the session's dialog: <|begin_of_text|>, the system message, what a turn needs. */
static void chat_open(Chat *c, Session *s, const char *system_prompt, int max_reply) {
    const Tokenizer *t = s->tokenizer;
    *c = (Chat){ .s = s, .seq_len = (size_t)s->tr->state.seq_len,
                 .max_token_bytes = longest_token(t) };
    c->d = (DialogIds){ dialog_special(t, "<|start_header_id|>"),
                        dialog_special(t, "<|end_header_id|>"), dialog_special(t, "<|eot_id|>") };
    c->room = s->context_shift && max_reply > 0 ? (size_t)max_reply : 1;
    if (c->room > c->seq_len / 2) c->room = c->seq_len / 2 > 0 ? c->seq_len / 2 : 1;
    push_or_die(&c->dialog.ids, s->tr->model.config.bos_id);
    if (system_prompt) {
        const char *content;
        size_t len = strip_text(system_prompt, strlen(system_prompt), &content);
        append_message(t, &c->d, "system", content, len, &c->dialog.ids);
        transcript_add(c, "system", content, len);
        if (s->json) print_json_message("system", content, len);
    }
    c->dialog.fixed = c->dialog.ids.count;
    c->fixed_messages = c->n_messages;
    append_header(t, &c->d, "user", &c->incoming);
    push_or_die(&c->incoming, c->d.eot);
    append_header(t, &c->d, "assistant", &c->incoming);
    c->overhead = c->incoming.count;
    if (c->dialog.fixed + c->overhead + c->room >= c->seq_len) {
        if (system_prompt)
            die("the system prompt takes %zu positions: no turn fits in the context of %zu (-c)",
                c->dialog.fixed, c->seq_len);
        die("no turn fits in the context of %zu (-c): <|begin_of_text|> and a turn's headers "
            "take %zu positions, its reply at least %zu", c->seq_len,
            c->dialog.fixed + c->overhead, c->room);
    }
}

static void chat_close(Chat *c) {
    free(c->dialog.turn_start);
    token_list_free(&c->dialog.ids);
    token_list_free(&c->incoming);
    token_list_free(&c->reply);
    transcript_truncate(c, 0);
    free(c->transcript);
}

/* ---- Commands -------------------------------------------------------------------------

   A message that begins with "/" and a command's name, then white space or its end, is that
   command, typed or piped alike; any other message goes to the model, and one that begins
   with "//" goes without its first "/". Commands write on stderr, so that stdout keeps only
   the conversation. */

enum { CMD_HELP, CMD_CLEAR, CMD_SAVE, CMD_EXIT, N_COMMANDS, CMD_NONE = -1 };
static const char *const COMMAND_NAMES[N_COMMANDS] = { "help", "clear", "save", "exit" };

static void print_chat_help(void) {
    fputs("commands (a message that begins with one; any other message goes to the model, and\n"
          "//text sends the message /text):\n"
          "  /help        this list\n"
          "  /clear       a new conversation, with the same system prompt\n"
          "  /save FILE   the conversation so far as JSON: [{\"role\":...,\"content\":...},...]\n"
          "  /exit        end the session (as Ctrl-D on an empty line, or the end of input)\n"
          "keys: Enter sends; \\ at a line's end continues it; a paste keeps its newlines;\n"
          "Up/Down: earlier messages; Ctrl-C clears the line, ends the session on an empty\n"
          "line, and stops a reply\n", stderr);
}

/* The command a message names, and its argument (stripped); CMD_NONE for a message for the
   model, which loses the first "/" of a leading "//". */
static int parse_command(const char **content, size_t *len, const char **arg, size_t *arg_len) {
    const char *text = *content;
    if (*len >= 2 && text[0] == '/' && text[1] == '/') {
        (*content)++;
        (*len)--;
        return CMD_NONE;
    }
    if (*len < 2 || text[0] != '/') return CMD_NONE;
    size_t end = 1;  /* of the name */
    while (end < *len && text[end] >= 'a' && text[end] <= 'z') end++;
    unsigned int cp = 0;
    if (end < *len) utf8_char_at((const unsigned char *)text + end, *len - end, &cp);
    if (end < *len && !is_python_space(cp)) return CMD_NONE;
    for (int command = 0; command < N_COMMANDS; command++) {
        const char *name = COMMAND_NAMES[command];
        if (strlen(name) == end - 1 && memcmp(text + 1, name, end - 1) == 0) {
            *arg_len = strip_text(text + end, *len - end, arg);
            return command;
        }
    }
    return CMD_NONE;
}

/* /clear: the dialog back to <|begin_of_text|> and the system message, fed again from
   position 0 (where the penalties start afresh too), as in a new session. */
static void chat_clear(Chat *c) {
    c->dialog.ids.count = c->dialog.fixed;
    c->dialog.n_turns = 0;
    c->s->pos = 0;
    transcript_truncate(c, c->fixed_messages);
    fprintf(stderr, "run: a new conversation (the same system prompt)\n");
}

/* The transcript as a JSON array of the objects -o json prints, one a line. */
static void write_transcript(const Chat *c, FILE *f) {
    fputs("[\n", f);
    for (size_t i = 0; i < c->n_messages; i++) {
        const Message *m = &c->transcript[i];
        write_json_message(f, m->role, m->content.bytes, m->content.len, m->interrupted);
        fputs(i + 1 < c->n_messages ? ",\n" : "\n", f);
    }
    fputs("]\n", f);
}

/* Why /save must not write over path, or NULL: it may when nothing is there, or an empty file
   or a JSON array (an earlier transcript). Anything else (a model named by mistake) is kept. */
static const char *save_refusal(const char *path) {
    struct stat st;
    if (stat(path, &st) != 0) return errno == ENOENT ? NULL : strerror(errno);
    if (!S_ISREG(st.st_mode)) return "not a regular file";
    FILE *f = fopen(path, "rb");
    if (!f) return strerror(errno);
    int first;
    do first = getc(f); while (first == ' ' || first == '\t' || first == '\n' || first == '\r');
    fclose(f);
    return first == EOF || first == '[' ? NULL : "it exists and is not a saved transcript";
}

/* Writes the transcript into a new file. Returns 0, or an errno value (and no file is left). */
static int write_transcript_file(const Chat *c, const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0666);
    if (fd < 0) return errno;
    FILE *f = fdopen(fd, "w");
    if (!f) {
        int error = errno;
        close(fd);
        unlink(path);
        return error;
    }
    write_transcript(c, f);
    int error = fflush(f) != 0 || ferror(f) || fsync(fd) != 0 ? (errno ? errno : EIO) : 0;
    if (fclose(f) != 0 && !error) error = errno;
    if (error) unlink(path);
    return error;
}

/* Writes the transcript to a new file beside path, then renames it to path: path is never
   seen half written. Returns NULL, or what went wrong. */
static const char *save_transcript(const Chat *c, const char *path) {
    const char *refusal = save_refusal(path);
    if (refusal) return refusal;
    size_t size = strlen(path) + 32;
    char *temp = checked_calloc(size, 1, "a file name");
    snprintf(temp, size, "%s.%ld.tmp", path, (long)getpid());
    int error = write_transcript_file(c, temp);
    if (!error && rename(temp, path) != 0) {
        error = errno;
        unlink(temp);
    }
    free(temp);
    return error ? strerror(error) : NULL;
}

/* /save's file name as a shell would read it: a leading "~/" is the home folder ($HOME). */
static char *save_path(const char *arg, size_t arg_len) {
    const char *home = getenv("HOME");
    if (arg_len >= 2 && arg[0] == '~' && arg[1] == '/' && home && *home) {
        size_t size = strlen(home) + arg_len;  /* home, then arg less its "~", then NUL */
        char *path = checked_calloc(size, 1, "a file name");
        snprintf(path, size, "%s%.*s", home, (int)(arg_len - 1), arg + 1);
        return path;
    }
    char *path = strndup(arg, arg_len);
    if (!path) die("out of memory");
    return path;
}

static void save_command(const Chat *c, const char *arg, size_t arg_len) {
    char *path = save_path(arg, arg_len);
    const char *problem = save_transcript(c, path);
    if (problem) fprintf(stderr, "run: /save %s: %s; nothing saved, the session goes on\n",
                         path, problem);
    else fprintf(stderr, "run: saved %zu messages to %s\n", c->n_messages, path);
    free(path);
}

/* Runs a command. Returns 1 when it ends the session (/exit), else 0. */
static int run_command(Chat *c, int command, const char *arg, size_t arg_len) {
    const char *name = COMMAND_NAMES[command];
    if (command == CMD_SAVE && arg_len == 0) {
        fprintf(stderr, "run: /save needs a file name: /save FILE\n");
        return 0;
    }
    if (command != CMD_SAVE && arg_len > 0) {
        fprintf(stderr, "run: /%s takes no argument (//%s sends the message /%s)\n", name,
                name, name);
        return 0;
    }
    switch (command) {
    case CMD_HELP: print_chat_help(); break;
    case CMD_CLEAR: chat_clear(c); break;
    case CMD_SAVE: save_command(c, arg, arg_len); break;
    case CMD_EXIT: return 1;
    }
    return 0;
}

/* ---- The chat loop ---------------------------------------------------------------------- */

enum { CHAT_GOES_ON, CHAT_ENDS, CHAT_FAILS };

/* One message (stripped, not blank): a command, or a turn that the model answers. */
static int take_message(Chat *c, const char *content, size_t len, int max_reply,
                        int interactive) {
    const char *arg;
    size_t arg_len;
    int command = parse_command(&content, &len, &arg, &arg_len);
    if (command != CMD_NONE)
        return run_command(c, command, arg, arg_len) ? CHAT_ENDS : CHAT_GOES_ON;
    int fit = fit_turn(c, content, len);
    if (fit == TURN_REFUSED) return CHAT_GOES_ON;
    if (fit == TURN_ENDS) return CHAT_FAILS;
    transcript_add(c, "user", content, len);
    if (c->s->json) print_json_message("user", content, len);
    answer(c, max_reply, interactive);
    if ((size_t)c->s->pos >= c->seq_len && !c->s->context_shift) {
        fprintf(stderr, "run: context full during the reply (%zu positions, -c); "
                "session ended\n", c->seq_len);
        return CHAT_FAILS;
    }
    return CHAT_GOES_ON;
}

/* The chat loop. Ends with exit status 0 at end of input, /exit or Ctrl-C on an empty prompt,
   and with status 1 when the context is full without context_shift. */
static int chat(Session *s, const char *system_prompt, const char *first_message, int max_reply) {
    Chat c;
    chat_open(&c, s, system_prompt, max_reply);
    Editor editor;
    int interactive = editor_open(&editor);
    if (interactive)
        fprintf(stderr, "chat: Enter sends, \\ at a line's end continues it, pastes keep their "
                "newlines; /help for commands, Ctrl-D or /exit ends\n");
    Text message = {0};
    char *line = NULL;
    size_t line_capacity = 0;
    int result = CHAT_GOES_ON;
    while (result == CHAT_GOES_ON) {
        if (first_message) {
            message.len = 0;
            text_insert(&message, 0, first_message, strlen(first_message));
            if (interactive) editor_show(&editor, &message);  /* as if typed */
            first_message = NULL;
        } else if (interactive) {
            if (editor_read(&editor) != 0) break;
            text_set(&message, &editor.text);
        } else if (read_piped_message(&message, &line, &line_capacity) != 0) {
            break;
        }
        const char *content;
        size_t len = strip_text(message.bytes, message.len, &content);
        if (len > 0) result = take_message(&c, content, len, max_reply, interactive);
    }
    if (interactive) editor_close(&editor);
    free(line);
    free(message.bytes);
    chat_close(&c);
    return result == CHAT_FAILS;
}

/* ---- 6b. Chat on a terminal: a line editor (POSIX termios) ----------------------------

   When stdin is a terminal, messages are read in raw mode, byte by byte, by this editor:
     - typing inserts at the cursor; Backspace, Ctrl-U (to the start of the line), Ctrl-K (to
       its end), Left/Right (Ctrl-B/F) by UTF-8 character, Home/End (Ctrl-A/E), Up/Down
       (Ctrl-P/N) for the earlier messages of the session;
     - Enter sends the message, unless it ends in a backslash: that becomes a newline;
     - a paste arrives between ESC[200~ and ESC[201~ (bracketed paste, which the editor turns
       on) and is inserted whole, newlines included, whatever its length: one message;
     - every other escape sequence is read to its end and dropped, so none reaches the model;
     - Ctrl-C clears the message (left on the screen, marked ^C, with a new prompt below, as
       readline does); on an empty message Ctrl-C, and Ctrl-D, end the session;
     - every mode has a way out: a control byte ends an escape sequence and then acts, Ctrl-C
       ends a paste (and clears it), and a paste or a sequence that goes quiet for
       EDITOR_QUIET_MS ends (a terminal sends one whole; a lone ESC[200~ typed does not).
   The terminal has two modes for the session: raw while a message is read, and while a reply
   is generated a mode without echo (so that typing does not mix into the reply) where Ctrl-C
   raises SIGINT, to stop the reply. What is typed there waits in the terminal and is read by
   the editor at the next prompt, as if typed then: a half-typed message shows, a line is
   sent, a Ctrl-D on an empty message ends the session. The terminal is restored on every way
   out: return, exit() (atexit), and the signals that end the program. */

static struct termios saved_termios;   /* the terminal's settings before the session */
enum { TERMINAL_AS_FOUND, TERMINAL_REPLYING, TERMINAL_EDITING };
static volatile sig_atomic_t terminal_mode;
static int editor_fd = -1;             /* where the editor draws: the terminal */

/* write() until done; errors are ignored (a terminal that went away cannot be drawn on).
   Async-signal-safe. */
static void write_all(int fd, const char *bytes, size_t n) {
    while (n > 0) {
        ssize_t done = write(fd, bytes, n);
        if (done < 0 && errno == EINTR) continue;
        if (done <= 0) return;
        bytes += done;
        n -= (size_t)done;
    }
}

static void write_paste_mode(int on) {  /* bracketed paste */
    write_all(editor_fd, on ? "\033[?2004h" : "\033[?2004l", 8);
}

/* Async-signal-safe: called from signal handlers too. */
static void restore_terminal(void) {
    if (terminal_mode == TERMINAL_AS_FOUND) return;
    int saved_errno = errno;
    tcsetattr(STDIN_FILENO, TCSANOW, &saved_termios);
    if (terminal_mode == TERMINAL_EDITING) write_paste_mode(0);
    terminal_mode = TERMINAL_AS_FOUND;
    errno = saved_errno;
}

static void on_fatal_signal(int sig) {
    restore_terminal();
    signal(sig, SIG_DFL);
    raise(sig);
}

/* Both modes read every byte as it is typed, and echo none; editing also takes Ctrl-C and
   Ctrl-S as keys (not SIGINT, not flow control), and Enter as \r. Bracketed paste is on while
   editing. */
static void set_terminal_mode(int mode) {
    struct termios t = saved_termios;
    t.c_lflag &= ~(tcflag_t)(ICANON | ECHO | IEXTEN);
    if (mode == TERMINAL_EDITING) {
        t.c_iflag &= ~(tcflag_t)(ICRNL | INLCR | IGNCR | IXON | ISTRIP);
        t.c_lflag &= ~(tcflag_t)ISIG;
    }
    t.c_cc[VMIN] = 1;
    t.c_cc[VTIME] = 0;
    if (terminal_mode == TERMINAL_EDITING) write_paste_mode(0);
    terminal_mode = mode;  /* first: a signal from here on restores the terminal */
    if (tcsetattr(STDIN_FILENO, TCSANOW, &t) != 0) {
        restore_terminal();
        die("cannot set the terminal's mode: %s", strerror(errno));
    }
    if (mode == TERMINAL_EDITING) write_paste_mode(1);
}

enum { KEY_NONE, KEY_UP, KEY_DOWN, KEY_LEFT, KEY_RIGHT, KEY_HOME, KEY_END, KEY_DELETE,
       KEY_PASTE_START, KEY_PASTE_END };


static const char EDITOR_PROMPT[] = "User: ";

/* Returns 0 (and leaves stdin as it is) when stdin is not a terminal whose settings we can
   read; the caller then reads it as a pipe. */
static int editor_open(Editor *e) {
    memset(e, 0, sizeof *e);
    if (!isatty(STDIN_FILENO) || tcgetattr(STDIN_FILENO, &saved_termios) != 0) return 0;
    editor_fd = isatty(STDOUT_FILENO) ? STDOUT_FILENO
              : isatty(STDERR_FILENO) ? STDERR_FILENO : STDIN_FILENO;
    e->history = checked_calloc(1, sizeof(Text), "the chat history");
    atexit(restore_terminal);
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_fatal_signal;
    sigemptyset(&action.sa_mask);
    int fatal[] = { SIGTERM, SIGHUP, SIGQUIT, SIGPIPE };
    for (size_t i = 0; i < sizeof fatal / sizeof fatal[0]; i++) sigaction(fatal[i], &action, NULL);
    set_terminal_mode(TERMINAL_REPLYING);
    return 1;
}

static void editor_close(Editor *e) {
    restore_terminal();
    for (size_t i = 0; e->history && i <= e->n_history; i++) free(e->history[i].bytes);
    free(e->history);
    free(e->text.bytes);
}

static int terminal_columns(void) {
#ifdef TIOCGWINSZ
    struct winsize size;
    if (ioctl(editor_fd, TIOCGWINSZ, &size) == 0 && size.ws_col > 0) return size.ws_col;
#endif
    return 80;
}

/* Where the terminal's cursor goes after showing byte c: one column per character (UTF-8
   continuation bytes take none), a newline starts a row, a full row wraps before the next
   character. col == columns means "at the end of a full row, not wrapped yet". */
static void advance(int *row, int *col, int columns, unsigned char c) {
    if (c == '\n') { (*row)++; *col = 0; return; }
    if ((c & 0xC0) == 0x80) return;
    if (*col == columns) { (*row)++; *col = 0; }
    (*col)++;
}

/* Redraws the prompt and the message, and puts the cursor in place: back to the prompt's
   row, clear to the end of the screen, write everything, then move up and right. */
static void editor_draw(Editor *e) {
    int columns = terminal_columns(), row = 0, col = 0, cursor_row = 0, cursor_col = 0;
    Text out = {0};
    char move[32];
    if (e->cursor_row > 0) {
        snprintf(move, sizeof move, "\033[%dA", e->cursor_row);
        text_insert(&out, out.len, move, strlen(move));
    }
    text_insert(&out, out.len, "\r\033[J", 4);
    text_insert(&out, out.len, EDITOR_PROMPT, strlen(EDITOR_PROMPT));
    for (const char *p = EDITOR_PROMPT; *p; p++) advance(&row, &col, columns, (unsigned char)*p);
    for (size_t i = 0; i <= e->text.len; i++) {
        if (i == e->cursor) { cursor_row = row; cursor_col = col; }
        if (i == e->text.len) break;
        unsigned char c = (unsigned char)e->text.bytes[i];
        if (c == '\n') text_insert(&out, out.len, "\r\n", 2);
        else text_insert(&out, out.len, c < 0x20 ? " " : (const char *)&c, 1);  /* a tab */
        advance(&row, &col, columns, c);
    }
    if (col == columns) { text_insert(&out, out.len, "\r\n", 2); row++; col = 0; }
    if (cursor_col == columns) { cursor_row++; cursor_col = 0; }
    if (row > cursor_row) {
        snprintf(move, sizeof move, "\033[%dA", row - cursor_row);
        text_insert(&out, out.len, move, strlen(move));
    }
    text_insert(&out, out.len, "\r", 1);
    if (cursor_col > 0) {
        snprintf(move, sizeof move, "\033[%dC", cursor_col);
        text_insert(&out, out.len, move, strlen(move));
    }
    write_all(editor_fd, out.bytes, out.len);
    free(out.bytes);
    e->cursor_row = cursor_row;
}

/* Byte offsets of the characters before and after the cursor, and of its line's ends. */
static size_t char_before(const Editor *e, size_t at) {
    size_t p = at > 0 ? at - 1 : 0;
    while (p > 0 && at - p < 4 && ((unsigned char)e->text.bytes[p] & 0xC0) == 0x80) p--;
    return p;
}

static size_t char_after(const Editor *e, size_t at) {
    size_t p = at < e->text.len ? at + 1 : at;
    while (p < e->text.len && p - at < 4 && ((unsigned char)e->text.bytes[p] & 0xC0) == 0x80) p++;
    return p;
}

static size_t line_start(const Editor *e) {
    size_t p = e->cursor;
    while (p > 0 && e->text.bytes[p - 1] != '\n') p--;
    return p;
}

static size_t line_end(const Editor *e) {
    size_t p = e->cursor;
    while (p < e->text.len && e->text.bytes[p] != '\n') p++;
    return p;
}

static void editor_insert(Editor *e, const char *bytes, size_t n) {
    text_insert(&e->text, e->cursor, bytes, n);
    e->cursor += n;
}

/* Up and Down: the message typed so far is kept as the newest history entry. */
static void editor_browse(Editor *e, int older) {
    if (older ? e->shown == 0 : e->shown == e->n_history) return;
    text_set(&e->history[e->shown], &e->text);
    e->shown = older ? e->shown - 1 : e->shown + 1;
    text_set(&e->text, &e->history[e->shown]);
    e->cursor = e->text.len;
}

static void editor_key(Editor *e, int key) {
    switch (key) {
    case KEY_UP: editor_browse(e, 1); break;
    case KEY_DOWN: editor_browse(e, 0); break;
    case KEY_LEFT: e->cursor = char_before(e, e->cursor); break;
    case KEY_RIGHT: e->cursor = char_after(e, e->cursor); break;
    case KEY_HOME: e->cursor = line_start(e); break;
    case KEY_END: e->cursor = line_end(e); break;
    case KEY_DELETE: text_delete(&e->text, e->cursor, char_after(e, e->cursor)); break;
    case KEY_PASTE_START: e->in_paste = 1; e->pending_cr = 0; break;
    case KEY_PASTE_END: e->in_paste = 0; break;
    }
}

/* The key an escape sequence names, from its parameters and final byte. */
static int sequence_key(const char *params, char final) {
    switch (final) {
    case 'A': return KEY_UP;
    case 'B': return KEY_DOWN;
    case 'C': return KEY_RIGHT;
    case 'D': return KEY_LEFT;
    case 'H': return KEY_HOME;
    case 'F': return KEY_END;
    case '~': {
        int n = atoi(params);
        return n == 1 || n == 7 ? KEY_HOME : n == 4 || n == 8 ? KEY_END : n == 3 ? KEY_DELETE
             : n == 200 ? KEY_PASTE_START : n == 201 ? KEY_PASTE_END : KEY_NONE;
    }
    }
    return KEY_NONE;
}

/* Consumes one byte of an escape sequence (esc_state != 0). */
static void editor_escape_byte(Editor *e, unsigned char c) {
    if (e->esc_state == 1) {  /* after ESC */
        e->esc_state = c == '[' ? 2 : c == 'O' ? 3 : 0;  /* ESC + key (Alt-key): dropped */
        e->n_esc_params = 0;
        return;
    }
    if (e->esc_state == 2 && c >= 0x20 && c <= 0x3F) {  /* parameters, intermediates */
        if (e->n_esc_params + 1 < sizeof e->esc_params) e->esc_params[e->n_esc_params++] = (char)c;
        return;
    }
    e->esc_params[e->n_esc_params] = '\0';
    int key = sequence_key(e->esc_params, (char)c);
    e->esc_state = 0;
    if (!e->in_paste || key == KEY_PASTE_END) editor_key(e, key);
}

enum { EDIT_MORE, EDIT_SEND, EDIT_CANCEL, EDIT_END };

/* A byte inside a paste: text, with \r and \r\n made \n and other control bytes dropped. */
static void editor_paste_byte(Editor *e, unsigned char c) {
    int after_cr = e->pending_cr;
    e->pending_cr = c == '\r';
    if (c == '\n' && after_cr) return;
    if (c == '\r') c = '\n';
    if ((c >= 0x20 && c != 0x7F) || c == '\n' || c == '\t') editor_insert(e, (const char *)&c, 1);
}

/* One byte typed: returns EDIT_SEND at Enter, EDIT_CANCEL at Ctrl-C on a message, EDIT_END
   at Ctrl-C or Ctrl-D on nothing. */
static int editor_byte(Editor *e, unsigned char c) {
    if (e->esc_state && c < 0x20) e->esc_state = 0;  /* a control byte ends it, then acts */
    if (e->esc_state) { editor_escape_byte(e, c); return EDIT_MORE; }
    if (c == 0x1B) { e->esc_state = 1; return EDIT_MORE; }
    if (e->in_paste && c == 0x03) e->in_paste = 0;  /* Ctrl-C: the way out of any paste */
    if (e->in_paste) { editor_paste_byte(e, c); return EDIT_MORE; }
    switch (c) {
    case '\r': case '\n':
        if (e->text.len > 0 && e->text.bytes[e->text.len - 1] == '\\') {  /* continues */
            e->text.bytes[e->text.len - 1] = '\n';
            e->cursor = e->text.len;
            return EDIT_MORE;
        }
        return EDIT_SEND;
    case 0x03: return e->text.len > 0 ? EDIT_CANCEL : EDIT_END;          /* Ctrl-C */
    case 0x04:                                                           /* Ctrl-D */
        if (e->text.len == 0) return EDIT_END;
        editor_key(e, KEY_DELETE);
        break;
    case 0x7F: case 0x08: {                                              /* Backspace */
        size_t from = char_before(e, e->cursor);
        text_delete(&e->text, from, e->cursor);
        e->cursor = from;
        break;
    }
    case 0x15: {                                                         /* Ctrl-U */
        size_t from = line_start(e);
        text_delete(&e->text, from, e->cursor);
        e->cursor = from;
        break;
    }
    case 0x0B: text_delete(&e->text, e->cursor, line_end(e)); break;     /* Ctrl-K */
    case 0x01: editor_key(e, KEY_HOME); break;
    case 0x05: editor_key(e, KEY_END); break;
    case 0x02: editor_key(e, KEY_LEFT); break;
    case 0x06: editor_key(e, KEY_RIGHT); break;
    case 0x10: editor_key(e, KEY_UP); break;
    case 0x0E: editor_key(e, KEY_DOWN); break;
    default:
        if (c >= 0x20 || c == '\t') editor_insert(e, (const char *)&c, 1);
    }
    return EDIT_MORE;
}

#define EDITOR_QUIET_MS 1000  /* a paste or escape sequence idle this long has ended */

/* Waits up to EDITOR_QUIET_MS for input inside a paste or an escape sequence. Returns 1 when
   none came: the paste or sequence is over (as if closed) and is drawn; 0 when input is there. */
static int editor_quiet(Editor *e) {
    struct pollfd p = { .fd = STDIN_FILENO, .events = POLLIN };
    int ready;
    do ready = poll(&p, 1, EDITOR_QUIET_MS); while (ready < 0 && errno == EINTR);
    if (ready != 0) return 0;
    e->in_paste = e->esc_state = 0;
    editor_draw(e);
    return 1;
}

/* What was typed while a reply was generated waits in the terminal, byte for byte: it is
   read into the input, to be taken at this prompt as if typed here. */
static void editor_take_typed_ahead(Editor *e) {
    memmove(e->input, e->input + e->input_start, e->input_len);
    e->input_start = 0;
    struct pollfd p = { .fd = STDIN_FILENO, .events = POLLIN };
    while (e->input_len < sizeof e->input && poll(&p, 1, 0) == 1 && (p.revents & POLLIN)) {
        ssize_t n = read(STDIN_FILENO, e->input + e->input_len, sizeof e->input - e->input_len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return;  /* an error, or the terminal gone: editor_read meets it again */
        e->input_len += (size_t)n;
    }
}

/* An empty message at a new prompt (not drawn yet), after everything printed so far. */
static void editor_start(Editor *e) {
    e->text.len = 0;
    e->cursor = 0;
    e->cursor_row = 0;
    e->shown = e->n_history;
    text_delete(&e->history[e->shown], 0, e->history[e->shown].len);
    e->in_paste = e->esc_state = 0;
    fflush(stdout);
}

/* Ctrl-C on a message: it stays on the screen, marked ^C, and an empty prompt opens below it
   (as readline does). The message goes into no history. */
static void editor_cancel(Editor *e) {
    e->cursor = e->text.len;
    editor_draw(e);
    write_all(editor_fd, "^C\r\n", 4);
    editor_start(e);
}

/* A message sent goes into the history, before the entry of the next message. */
static void editor_remember(Editor *e) {
    if (e->text.len == 0) return;
    Text *grown = realloc(e->history, (e->n_history + 2) * sizeof(Text));
    if (!grown) die("out of memory for the chat history");
    e->history = grown;
    e->history[e->n_history + 1] = (Text){0};
    text_set(&e->history[e->n_history], &e->text);
    e->n_history++;
}

/* Reads one message on the terminal into e->text. Returns 0, or -1 when the session ends. */
static int editor_read(Editor *e) {
    editor_start(e);
    editor_take_typed_ahead(e);
    if (e->input_len > 0 && e->input[e->input_start] == 0x04) return -1;  /* Ctrl-D typed ahead */
    set_terminal_mode(TERMINAL_EDITING);
    editor_draw(e);
    int result = EDIT_MORE, changed = 0;  /* changed: since the last draw */
    while (result == EDIT_MORE) {
        if (e->input_len == 0 && (e->in_paste || e->esc_state) && editor_quiet(e)) continue;
        if (e->input_len == 0) {
            ssize_t n = read(STDIN_FILENO, e->input, sizeof e->input);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) { restore_terminal(); die("cannot read stdin: %s", strerror(errno)); }
            if (n == 0 || interrupted) { result = EDIT_END; break; }
            e->input_start = 0;
            e->input_len = (size_t)n;
        }
        while (e->input_len > 0 && result == EDIT_MORE) {
            result = editor_byte(e, e->input[e->input_start++]);
            e->input_len--;
            if (result == EDIT_CANCEL) { editor_cancel(e); result = EDIT_MORE; }
            if (result == EDIT_MORE) changed = 1;
        }
        if (result == EDIT_MORE && !e->in_paste) {  /* a paste is drawn once, at its end */
            editor_draw(e);
            changed = 0;
        }
    }
    if (result == EDIT_SEND && (changed || e->cursor != e->text.len)) {
        e->cursor = e->text.len;  /* so that the reply starts below the whole message */
        editor_draw(e);
    }
    write_all(editor_fd, "\r\n", 2);
    set_terminal_mode(TERMINAL_REPLYING);
    interrupted = 0;
    if (result == EDIT_END) return -1;
    editor_remember(e);
    return 0;
}

/* A message given on the command line (-i), shown as if typed and sent: after the prompt, and
   in the history. */
static void editor_show(Editor *e, const Text *message) {
    editor_start(e);
    text_set(&e->text, message);
    e->cursor = e->text.len;
    editor_draw(e);
    write_all(editor_fd, "\r\n", 2);
    editor_remember(e);
}

/* ----------------------------------------------------------------------------------------
   7. The command line: llama2.c's short flags, and llama.cpp's long names for the same
   things. A mistake is one error line; -h prints the usage. */

static void print_usage(FILE *out) {
    fprintf(out,
        "usage: run <model.bin> [options]   (options in any order; -m/--model <model.bin> too)\n"
        "  -i, --prompt <text>   prompt (generate mode) or first user message (chat mode);\n"
        "                        generate mode without -i, -I or -f: a piped stdin is the prompt\n"
        "  -f, --file <path>     the prompt, read from a file\n"
        "  -I <ids>              prompt as token ids, space or comma separated, used exactly as\n"
        "                        given (no <|begin_of_text|> added); with -o ids, no tokenizer\n"
        "  -m <mode>             generate (default) or chat (also -cnv, --conversation; -no-cnv:\n"
        "                        generate); any other value is the model file, as --model\n"
        "  -y, --system-prompt <text>  system prompt (chat mode)\n"
        "  -n, --predict <int>   tokens to generate (per reply in chat); 0 or -1 = until a stop\n"
        "                        token or the context is full (default 256 generating, 0 in chat)\n"
        "  -c, --ctx-size <int>  context length: positions in the KV cache (default 4096, at most\n"
        "                        the model's maximum)\n"
        "  --cache-type <type>   the KV cache's numbers: f32 (default, exact), bf16 (half the\n"
        "                        memory) or q8_0 (int8 and a scale per 32: 0.28x); also -ctk,\n"
        "                        -ctv (--cache-type-k, --cache-type-v), which must agree\n"
        "  -z <path>             tokenizer file (default: the model path, .bin replaced by .tok)\n"
        "  -o <format>           text (default) or ids: print generated token ids, not text;\n"
        "                        json (chat): one JSON object per message\n"
        "  --no-context-shift    chat: end the session when the context is full, instead of\n"
        "                        dropping the oldest turns\n"
        "  chat commands         a message /help, /clear (new conversation), /save FILE (as JSON)\n"
        "                        or /exit, typed or piped; //text sends /text to the model\n"
        "  -e <0|1>              stop at end tokens (end_of_text, eot, eom, the model's eos);\n"
        "                        default 1\n"
        "  -L <path>             write the logits of every position as raw float32 rows\n"
        "  -T, --threads <int>   threads (default: OpenMP's choice, OMP_NUM_THREADS; runomp only)\n"
        "  -a <mode>             activations in the matmuls: exact (default: float32, int16 for\n"
        "                        q8_0 and q4_0, two bf16 in AMX prompts) or fast: rounded as\n"
        "                        llama.cpp does, to bf16 for bf16 weights, to int8 for q8_0\n"
        "                        (groups of 64) and q4_0 (groups of 32, 64 or 128): faster\n"
        "                        prompts where the CPU has AVX512-BF16 / VNNI, logits a few\n"
        "                        1e-2 off\n"
        "  -w <how>              the weights: auto (default: read into memory where twice the file\n"
        "                        fits in available memory, else map), map (memory-map the file) or\n"
        "                        read (also --no-mmap, llama.cpp's name; docs/usage.md)\n"
        "  -ngl, -fa, -co/--color, --mlock, -b, -ub: llama.cpp's, accepted and ignored (a note\n"
        "                        says why)\n"
        "  -h, --help            this text;  --version: what this build is\n"
        "sampling: penalties, top-k, then top-p and min-p on the probabilities at the temperature\n"
        "(Meta's order); one token is drawn from what is left\n"
        "  --sampler-order <o>   meta (default) or llama.cpp: top-p and min-p at temperature 1,\n"
        "                        the temperature applied last, as llama.cpp does\n"
        "  -t, --temp <float>    temperature, 0 = greedy (default 0.6); above 2 only as --temp\n"
        "                        (llama.cpp's -t is threads: here -T)\n"
        "  -p, --top-p <float>   keep the fewest most likely tokens adding up to this\n"
        "                        probability; 1 = off (default 0.9)\n"
        "  --top-k <int>         keep the k most likely tokens; 0 = off (default)\n"
        "  --min-p <float>       keep tokens at least this times as likely as the most likely\n"
        "                        one; 0 = off (default)\n"
        "  --repeat-penalty <float>    divide the logit of a token seen in the last\n"
        "                        --repeat-last-n tokens by this (multiply if negative); 1 = off\n"
        "  --presence-penalty <float>  subtract this from the logit of a token seen there;\n"
        "                        0 = off\n"
        "  --frequency-penalty <float> subtract this times its count there; 0 = off\n"
        "  --repeat-last-n <int> tokens the penalties look back on, prompt included (default 64;\n"
        "                        -1 = the whole context)\n"
        "  -s, --seed <int>      random seed in [0, 4294967295] (default or -1: a fresh one,\n"
        "                        printed on stderr)\n");
}

/* A command-line mistake: one error line, pointing at -h, and exit status 1. */
static void usage_error(const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    fprintf(stderr, "run: error: ");
    vfprintf(stderr, fmt, args);
    fprintf(stderr, " (see run -h)\n");
    va_end(args);
    exit(EXIT_FAILURE);
}

static long parse_long(const char *flag, const char *text, long min, long max) {
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno || end == text || *end != '\0' || v < min || v > max)
        usage_error("%s wants an integer in [%ld, %ld], got '%s'", flag, min, max, text);
    return v;
}

static float parse_float(const char *flag, const char *text, float min, float max) {
    char *end;
    errno = 0;
    float v = strtof(text, &end);
    /* ERANGE: an underflow gives the nearest float (a subnormal or 0), kept; an overflow gives
       an infinity, which the range refuses */
    if (end == text || *end != '\0' || !(v >= min && v <= max)) {
        /* llama.cpp's -p is the prompt: a word given to our -p (top-p) is most likely one */
        int prompt_habit = strcmp(flag, "-p") == 0 && end == text;
        usage_error("%s wants a number in [%g, %g], got '%s'%s", flag, (double)min, (double)max,
                    text, prompt_habit ? "; the prompt is given with -i or --prompt" : "");
    }
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
        int word = (int)strcspn(p, " ,\t\n");  /* the whole id as given, named if wrong */
        if (end != p + word || errno || v < 0 || v >= vocab_size)
            die("-I: '%.*s' is not a token id in [0, %d)", word < 20 ? word : 20, p, vocab_size);
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
    const char *model_path, *tokenizer_path, *prompt, *prompt_ids, *prompt_file, *mode;
    const char *model_flag;  /* the flag that named the model (-m, --model), or NULL */
    const char *threads_flag;  /* -T or --threads, as typed */
    const char *system_prompt, *logits_path;
    SamplerParams sampling;
    long long seed;  /* -1: a fresh one */
    long steps, context, threads;
    int context_given;  /* -c: the user's, so capping it is said */
    int print_ids, stop_at_end;
    int json;  /* -o json */
    int no_context_shift;  /* --no-context-shift */
    int fast;  /* -a fast */
    int weights;       /* -w: WEIGHTS_AUTO, _MAP or _READ */
    const char *cache_k, *cache_v;  /* --cache-type, -ctk, -ctv: NULL where not given */
    int cache_type;  /* ... the one type they name (cache_type_option) */
} Options;

/* Every flag: its short and long spellings (either may be NULL), whether it takes a value
(VALUE_ON_OFF: on, off or auto when one follows, as llama.cpp's switches do), and the letter
apply_flag switches on. */
enum { NO_VALUE, VALUE, VALUE_ON_OFF };
typedef struct {
    const char *short_name, *long_name;
    int takes_value;
    char key;
} Flag;

static const Flag FLAGS[] = {
    { "-i", "--prompt", 1, 'i' }, { "-f", "--file", 1, 'f' }, { "-I", NULL, 1, 'I' },
    { "-m", NULL, 1, 'm' }, { NULL, "--model", 1, 'd' }, { "-cnv", "--conversation", 0, 'C' },
    { "-no-cnv", "--no-conversation", 0, 'g' },
    { "-y", "--system-prompt", 1, 'y' }, { "-t", "--temp", 1, 't' },
    { "-p", "--top-p", 1, 'p' }, { NULL, "--top-k", 1, 'k' }, { NULL, "--min-p", 1, 'M' },
    { NULL, "--repeat-penalty", 1, 'r' }, { NULL, "--repeat-last-n", 1, 'R' },
    { NULL, "--presence-penalty", 1, 'P' }, { NULL, "--frequency-penalty", 1, 'F' },
    { "-s", "--seed", 1, 's' }, { "-n", "--predict", 1, 'n' }, { NULL, "--n-predict", 1, 'n' },
    { "-c", "--ctx-size", 1, 'c' }, { "-z", NULL, 1, 'z' }, { "-o", NULL, 1, 'o' },
    { "-e", NULL, 1, 'e' }, { "-L", NULL, 1, 'L' }, { "-T", "--threads", 1, 'T' },
    { "-a", NULL, 1, 'a' }, { "-w", NULL, 1, 'w' }, { NULL, "--no-mmap", 0, 'W' },
    { "-h", "--help", 0, 'h' },
    { NULL, "--version", 0, 'V' }, { NULL, "--no-context-shift", 0, 'S' },
    { NULL, "--sampler-order", 1, 'O' }, { NULL, "--cache-type", 1, 'x' },
    { "-ctk", "--cache-type-k", 1, 'K' }, { "-ctv", "--cache-type-v", 1, 'Y' },
    /* llama.cpp's flags that change nothing on this engine: accepted, with a note (IGNORED) */
    { "-ngl", "--n-gpu-layers", 1, 'N' }, { NULL, "--gpu-layers", 1, 'N' },
    { "-fa", "--flash-attn", VALUE_ON_OFF, 'N' }, { "-co", "--color", VALUE_ON_OFF, 'N' },
    { NULL, "--mlock", 0, 'N' }, { "-b", "--batch-size", 1, 'N' },
    { "-ub", "--ubatch-size", 1, 'N' },
};

/* Why each of llama.cpp's flags above changes nothing here, by its first spelling. */
static const char *const IGNORED[][2] = {
    { "-ngl", "llama3.c runs on the CPU only" },
    { "--gpu-layers", "llama3.c runs on the CPU only" },
    { "-fa", "attention has one implementation here" },
    { "-co", "the output is plain text" },
    { "--mlock", "the weights are read into memory, or mapped from the file (-w)" },
    { "-b", "the engine sizes a prompt's batches itself" },
    { "-ub", "the engine sizes a prompt's batches itself" },
};

static const char *ignored_because(const Flag *f) {
    const char *name = f->short_name ? f->short_name : f->long_name;
    for (size_t i = 0; i < sizeof IGNORED / sizeof IGNORED[0]; i++)
        if (strcmp(IGNORED[i][0], name) == 0) return IGNORED[i][1];
    return "";
}

static const Flag *find_flag(const char *arg) {
    for (size_t i = 0; i < sizeof FLAGS / sizeof FLAGS[0]; i++) {
        const Flag *f = &FLAGS[i];
        if ((f->short_name && strcmp(arg, f->short_name) == 0) ||
            (f->long_name && strcmp(arg, f->long_name) == 0))
            return f;
    }
    return NULL;
}

#if HAVE_SIMD  /* hooks: the kernels this build has (e.g. "avx512+vnni+bf16"), and -a fast */
static const char *simd_kernels(void);
static int simd_set_fast(MatmulScratch *s, int weight_type, int group_size);
#else
#define simd_kernels() "portable"
#define simd_set_fast(s, weight_type, group_size) 0
#endif

static void print_version(void) {
    printf("run (llama3.c): model files version %d, tokenizer files version 1; %s, %s "
           "kernels\n", MODEL_VERSION,
#if defined _OPENMP
           "OpenMP threads",
#else
           "one thread (no OpenMP)",
#endif
           simd_kernels());
}

/* Whether the argument after flag f is its value. */
static int value_follows(const Flag *f, const char *next) {
    if (f->takes_value != VALUE_ON_OFF) return f->takes_value == VALUE;
    return next && (!strcmp(next, "on") || !strcmp(next, "off") || !strcmp(next, "auto"));
}

/* -h / --version anywhere (even before the model): print and exit 0. */
static void handle_info_flags(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const Flag *f = find_flag(argv[i]);
        if (f && f->key == 'h') { print_usage(stdout); exit(EXIT_SUCCESS); }
        if (f && f->key == 'V') { print_version(); exit(EXIT_SUCCESS); }
        if (f && value_follows(f, i + 1 < argc ? argv[i + 1] : NULL))
            i++;  /* a value may look like a flag: -i -h */
    }
}

static void check_choice(const char *flag, const char *v, const char *a, const char *b) {
    if (strcmp(v, a) != 0 && strcmp(v, b) != 0)
        usage_error("%s wants '%s' or '%s', got '%s'", flag, a, b, v);
}

/* A --cache-type (-ctk, -ctv) value: CACHE_F32, CACHE_BF16 or CACHE_Q8_0. */
static int parse_cache_type(const char *flag, const char *v) {
    for (int type = CACHE_F32; type <= CACHE_Q8_0; type++)
        if (strcmp(v, CACHE_TYPE_NAMES[type]) == 0) return type;
    if (strcmp(v, "f16") == 0)
        usage_error("%s f16 is not offered: bf16 is the 2-byte cache type here (%s bf16)",
                    flag, flag);
    usage_error("%s wants 'f32', 'bf16' or 'q8_0', got '%s'", flag, v);
    return CACHE_F32;
}

/* The one cache type that --cache-type, -ctk and -ctv name (f32 if none does): keys and
   values have the same type here, so -ctk and -ctv must agree. */
static int cache_type_option(const Options *o) {
    if (o->cache_k && o->cache_v && strcmp(o->cache_k, o->cache_v) != 0)
        usage_error("the key cache type %s and the value cache type %s differ: keys and "
                    "values share one type here (give --cache-type TYPE)", o->cache_k,
                    o->cache_v);
    const char *v = o->cache_k ? o->cache_k : o->cache_v;
    return v ? parse_cache_type(o->cache_k ? "-ctk" : "-ctv", v) : CACHE_F32;
}

/* The model's path: the one argument that is not a flag or a flag's value, or -m/--model's. */
static void set_model(Options *o, const char *path, const char *flag) {
    if (flag && find_flag(path))
        usage_error("%s wants the model file%s, got the flag %s", flag,
                    strcmp(flag, "-m") == 0 ? " or a mode (generate, chat)" : "", path);
    if (o->model_path && flag)
        usage_error("%s %s: the model is already %s; %s takes %sthe model file", flag, path,
                    o->model_path, flag, strcmp(flag, "-m") == 0 ? "a mode (generate, chat) or " : "");
    if (o->model_path)
        usage_error("'%s' after the model %s: give one model; the prompt is given with -i",
                    path, o->model_path);
    o->model_path = path;
    o->model_flag = flag;
}

/* One flag (as typed) and its value (NULL for a flag without one) into o. */
static void apply_flag(Options *o, const Flag *f, const char *flag, const char *v) {
    SamplerParams *sp = &o->sampling;
    switch (f->key) {
    case 'i': o->prompt = v; break;
    case 'f': o->prompt_file = v; break;
    case 'I': o->prompt_ids = v; break;
    case 'm':  /* llama2.c's mode, or llama.cpp's model */
        if (strcmp(v, "generate") == 0 || strcmp(v, "chat") == 0) o->mode = v;
        else set_model(o, v, flag);
        break;
    case 'd': set_model(o, v, flag); break;
    case 'C': o->mode = "chat"; break;
    case 'g': o->mode = "generate"; break;
    case 'N':
        fprintf(stderr, "run: note: %s%s%s is ignored: %s\n", flag, v ? " " : "", v ? v : "",
                ignored_because(f));
        break;
    case 'y': o->system_prompt = v; break;
    case 't':
        sp->temperature = parse_float(flag, v, 0.0f, 100.0f);
        if (strcmp(flag, "-t") == 0 && sp->temperature > 2.0f)  /* llama.cpp's -t: threads */
            usage_error("-t %s: -t is the temperature here (llama2.c's -t), and above 2 it "
                        "gives noise; threads are -T or --threads (--temp %s if you mean it)",
                        v, v);
        break;
    case 'p': sp->top_p = parse_float(flag, v, 0.0f, 1.0f); break;
    case 'k': sp->top_k = (int)parse_long(flag, v, 0, 1L << 30); break;
    case 'M': sp->min_p = parse_float(flag, v, 0.0f, 1.0f); break;
    case 'r': sp->repeat_penalty = parse_float(flag, v, 0.001f, 100.0f); break;
    case 'R': sp->repeat_last_n = (int)parse_long(flag, v, -1, 1L << 24); break;
    case 'P': sp->presence_penalty = parse_float(flag, v, -100.0f, 100.0f); break;
    case 'F': sp->frequency_penalty = parse_float(flag, v, -100.0f, 100.0f); break;
    case 's': o->seed = parse_long(flag, v, -1, 0xFFFFFFFFL); break;
    case 'n':  /* llama.cpp's -1 is our 0: no limit */
        o->steps = parse_long(flag, v, -1, 1L << 30);
        if (o->steps < 0) o->steps = 0;
        break;
    case 'c': o->context = parse_long(flag, v, 1, 1L << 24); o->context_given = 1; break;
    case 'z': o->tokenizer_path = v; break;
    case 'L': o->logits_path = v; break;
    case 'T': o->threads = parse_long(flag, v, 1, 4096); o->threads_flag = flag; break;
    case 'e': o->stop_at_end = (int)parse_long(flag, v, 0, 1); break;
    case 'a': check_choice(flag, v, "exact", "fast"); o->fast = v[0] == 'f'; break;
    case 'w':
        if (strcmp(v, "auto") && strcmp(v, "map") && strcmp(v, "read"))
            usage_error("%s wants 'auto', 'map' or 'read', got '%s'", flag, v);
        o->weights = v[0] == 'a' ? WEIGHTS_AUTO : v[0] == 'm' ? WEIGHTS_MAP : WEIGHTS_READ;
        break;
    case 'W': o->weights = WEIGHTS_READ; break;
    case 'o':
        if (strcmp(v, "ids") != 0 && strcmp(v, "text") != 0 && strcmp(v, "json") != 0)
            usage_error("%s wants 'text', 'ids' or 'json', got '%s'", flag, v);
        o->print_ids = strcmp(v, "ids") == 0;
        o->json = strcmp(v, "json") == 0;
        break;
    case 'S': o->no_context_shift = 1; break;
    case 'x': parse_cache_type(flag, v); o->cache_k = o->cache_v = v; break;
    case 'K': parse_cache_type(flag, v); o->cache_k = v; break;
    case 'Y': parse_cache_type(flag, v); o->cache_v = v; break;
    case 'O':
        check_choice(flag, v, "meta", "llama.cpp");
        sp->temperature_last = strcmp(v, "llama.cpp") == 0;
        break;
    }
}

/* The flags' combinations that make no sense, once all are read. */
static void check_options(Options *o) {
    int given = (o->prompt != NULL) + (o->prompt_ids != NULL) + (o->prompt_file != NULL);
    if (given > 1) usage_error("give the prompt once: -i text, -f file or -I ids");
    int chat_mode = strcmp(o->mode, "chat") == 0;
    if (o->prompt_ids && chat_mode) usage_error("-I is for generate mode only");
    if (o->prompt_file && chat_mode) usage_error("-f is for generate mode only");
    if (o->system_prompt && !chat_mode) usage_error("-y is for chat mode only");
    if (o->json && !chat_mode) usage_error("-o json is for chat mode only");
    o->cache_type = cache_type_option(o);
}

/* The command line, in any order: the model (first, or anywhere, or after -m/--model) and
   the flags with their values. */
static void parse_options(int argc, char **argv, Options *o) {
    handle_info_flags(argc, argv);
    *o = (Options){ .mode = "generate",
                    .sampling = { .temperature = 0.6f, .top_p = 0.9f, .repeat_penalty = 1.0f,
                                  .repeat_last_n = 64 },
                    .seed = -1, .steps = -1, .context = 4096, .stop_at_end = 1 };
    for (int i = 1; i < argc; i++) {
        const char *flag = argv[i];
        const Flag *f = find_flag(flag);
        if (!f && flag[0] == '-' && flag[1] != '\0') usage_error("unknown option %s", flag);
        if (!f) {
            set_model(o, flag, NULL);
            continue;
        }
        const char *v = NULL;
        /* llama.cpp's -i is interactive mode, without a value: here that is -m chat */
        const char *interactive = f->key == 'i' && flag[1] == 'i' ?
            "; for llama.cpp's interactive -i use -m chat or -cnv" : "";
        if (f->takes_value == VALUE && i + 1 >= argc)
            usage_error("%s needs a value%s", flag, interactive);
        if (value_follows(f, i + 1 < argc ? argv[i + 1] : NULL)) {
            v = argv[++i];
            if (interactive[0] && find_flag(v))
                usage_error("-i wants the prompt, got the flag %s%s", v, interactive);
        }
        apply_flag(o, f, flag, v);
    }
    if (!o->model_path) usage_error("no model file given: run MODEL.bin [options]");
    check_options(o);
}

/* ---- Files given by mistake, and outputs that would overwrite inputs ---- */

static int has_suffix(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* llama2.c's model file: no magic, seven int32 (dim, hidden_dim, layers, heads, kv heads,
   vocab, seq_len), or its versioned export's magic "ak42". */
static int is_llama2c_model(const unsigned char *head, ssize_t got) {
    if (got >= 4 && read_i32(head) == 0x616b3432) return 1;
    if (got < 28) return 0;
    int32_t v[7];
    for (int i = 0; i < 7; i++) v[i] = read_i32(head + 4 * i);
    int32_t vocab = v[5] < 0 ? -v[5] : v[5];  /* negative: an unshared classifier */
    return v[0] > 0 && v[0] <= 65536 && v[1] > 0 && v[1] <= (1 << 20) && v[2] > 0 &&
           v[2] <= 1024 && v[3] > 0 && v[3] <= v[0] && v[0] % v[3] == 0 && v[4] > 0 &&
           v[4] <= v[3] && vocab > 0 && vocab <= (1 << 20) && v[6] > 0 && v[6] <= (1 << 24);
}

/* A folder given as the model: a Hugging Face checkpoint names its conversion. */
static void check_model_folder(const char *path, const char *convert) {
    char *config = checked_calloc(strlen(path) + 16, 1, "a path");
    sprintf(config, "%s/config.json", path);
    int hf = access(config, F_OK) == 0;
    free(config);
    if (hf) die("%s is a Hugging Face checkpoint folder, not a model file: %s %s", path,
                convert, path);
    die("%s is a folder: give the model file in it (the .bin that export.py wrote)", path);
}

/* A file given as the model that is something else: a folder, a Hugging Face checkpoint, a
   GGUF, a tokenizer, llama2.c's model: name it and what to do. Other problems are
   load_model's to report. */
static void check_model_kind(const char *path, const char *flag) {
    static const char *convert =
        "convert it with export.py: /usr/bin/python3 export.py OUT.bin --dtype bf16 --hf";
    struct stat st;
    if (stat(path, &st) != 0) {
        if (flag && strcmp(flag, "-m") == 0 && errno == ENOENT)
            die("-m %s: no such model file, and not a mode (generate or chat)", path);
        return;
    }
    if (S_ISDIR(st.st_mode)) check_model_folder(path, convert);
    unsigned char head[28] = {0};
    int fd = open(path, O_RDONLY | O_NONBLOCK);
    if (fd < 0) return;
    ssize_t got = S_ISREG(st.st_mode) ? read(fd, head, sizeof head) : 0;
    close(fd);
    if (got >= 4 && memcmp(head, MODEL_MAGIC, 4) == 0) return;
    if (got >= 4 && memcmp(head, "L3TK", 4) == 0)
        die("%s is a tokenizer file: the model is the .bin beside it (export.py writes both)",
            path);
    if (is_llama2c_model(head, got))
        die("%s looks like a llama2.c model file: llama3.c reads its own format; convert the "
            "Hugging Face checkpoint: /usr/bin/python3 export.py OUT.bin --dtype bf16 --hf "
            "FOLDER", path);
    if (got >= 4 && memcmp(head, "GGUF", 4) == 0)
        die("%s is a GGUF file (llama.cpp's format), not a llama3.c model file: convert it "
            "with export.py: /usr/bin/python3 export.py OUT.bin --gguf %s", path, path);
    if ((got >= 9 && head[8] == '{') || has_suffix(path, ".safetensors"))
        die("%s is a safetensors file, one part of a Hugging Face checkpoint: %s FOLDER "
            "(the folder holding it and config.json)", path, convert);
}

/* Whether the file at path begins with the 4 bytes of magic. */
static int starts_with_magic(const char *path, const char *magic) {
    char head[4];
    int fd = open(path, O_RDONLY | O_NONBLOCK);
    if (fd < 0) return 0;
    ssize_t got = read(fd, head, 4);
    close(fd);
    return got == 4 && memcmp(head, magic, 4) == 0;
}

static void check_tokenizer_exists(const char *path, int given) {
    struct stat st;
    if (stat(path, &st) == 0 || errno != ENOENT) return;
    die("tokenizer %s not found: export.py writes it beside the model; to make it alone: "
        "/usr/bin/python3 export.py --tokenizer-only %s --tokenizer HF_FOLDER/tokenizer.json%s",
        path, path, given ? "" : " (or give its path with -z)");
}

/* Refuses outputs that are input files (the model, the tokenizer, the prompt file): -L
   would truncate what is being read, and stdout redirected onto one (`>> model.bin`) would
   change it under its mapping. Same device and inode, so links and other spellings count. */
static void refuse_outputs_over_inputs(const char *logits_path, const char *const *inputs,
                                       int n_inputs) {
    struct stat out[2];
    int is_output[2] = { logits_path && stat(logits_path, &out[0]) == 0,
                         fstat(STDOUT_FILENO, &out[1]) == 0 && S_ISREG(out[1].st_mode) };
    const char *names[2] = { logits_path, "stdout" };
    for (int o = 0; o < 2; o++) {
        for (int i = 0; i < n_inputs && is_output[o]; i++) {
            struct stat in;
            if (inputs[i] && stat(inputs[i], &in) == 0 && in.st_dev == out[o].st_dev &&
                in.st_ino == out[o].st_ino)
                die("%s%s is an input of this run (%s): writing it would destroy it",
                    o == 0 ? "-L " : "", names[o], inputs[i]);
        }
    }
}

/* Reads a prompt of at most `limit` bytes (more cannot fit in the context) from fd. */
static char *read_prompt(int fd, const char *what, size_t limit, size_t *len) {
    size_t cap = 4096, n = 0;
    char *text = checked_calloc(cap + 1, 1, "the prompt");
    for (;;) {
        if (n == cap) {
            cap *= 2;
            char *bigger = realloc(text, cap + 1);
            if (!bigger) die("out of memory reading the prompt from %s", what);
            text = bigger;
        }
        ssize_t got = read(fd, text + n, cap - n);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) die("cannot read the prompt from %s: %s", what, strerror(errno));
        if (got == 0) break;
        n += (size_t)got;
        if (n > limit)
            die("the prompt in %s has more than %zu bytes, more than the context can hold (-c)",
                what, limit);
    }
    text[n] = '\0';
    *len = n;
    return text;
}

/* The newline that ends a file or `echo`'s output is not part of the prompt: without it, the
   continuation goes on from the prompt's last line (llama.cpp drops it from -f too). */
static char *drop_final_newline(char *text, size_t *len) {
    if (*len > 0 && text[*len - 1] == '\n') text[--*len] = '\0';
    return text;
}

/* The prompt text: -i, -f, or a piped stdin in generate mode (NULL when there is none).
   A prompt longer than the context's positions times the longest token cannot fit. */
static char *prompt_text(const Options *o, const Tokenizer *t, int context, size_t *len) {
    if (o->prompt) {
        *len = strlen(o->prompt);
        char *copy = checked_calloc(*len + 1, 1, "the prompt");
        memcpy(copy, o->prompt, *len);
        return copy;
    }
    size_t longest = 1, piece_len;
    for (int id = 0; id < tokenizer_vocab_size(t); id++)
        if (tokenizer_piece(t, id, &piece_len) && piece_len > longest) longest = piece_len;
    size_t limit = (size_t)context * longest;
    if (o->prompt_file) {
        int fd = open(o->prompt_file, O_RDONLY | O_NONBLOCK);
        if (fd < 0) die("cannot open the prompt file %s: %s", o->prompt_file, strerror(errno));
        struct stat st;
        if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
            die("the prompt file %s is not a regular file", o->prompt_file);
        char *text = read_prompt(fd, o->prompt_file, limit, len);
        close(fd);
        return drop_final_newline(text, len);
    }
    struct stat st;
    if (fstat(STDIN_FILENO, &st) == 0 && (S_ISFIFO(st.st_mode) || S_ISREG(st.st_mode)))
        return drop_final_newline(read_prompt(STDIN_FILENO, "stdin", limit, len), len);
    return NULL;
}

/* A seed from the kernel's random source, else the clock's nanoseconds mixed with the pid. */
static unsigned long long fresh_seed(void) {
    uint32_t seed = 0;
    int fd = open("/dev/urandom", O_RDONLY);
    if (fd >= 0) {
        ssize_t got = read(fd, &seed, sizeof seed);
        close(fd);
        if (got == (ssize_t)sizeof seed) return seed;
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    unsigned long long x = (unsigned long long)ts.tv_sec * 1000000000ull +
                           (unsigned long long)ts.tv_nsec;
    x ^= (unsigned long long)getpid() << 32;
    x *= 0x9E3779B97F4A7C15ull;
    return (uint32_t)(x >> 32);
}

/* The model file is mapped: if it shrinks while in use, reading a page past its new end
   raises SIGBUS. One line, then exit (only async-signal-safe calls here). */
static void on_sigbus(int sig) {
    (void)sig;
    static const char msg[] = "run: error: the model file changed while in use "
                              "(truncated or rewritten); stopped\n";
    if (write(STDERR_FILENO, msg, sizeof msg - 1) < 0) _exit(EXIT_FAILURE);
    _exit(EXIT_FAILURE);
}

/* "kv cache: bf16, 131072 positions, 16.0 GiB" on stderr (what alloc_state reserved: memory
   is used only as positions fill). */
static void print_cache_size(const Config *cfg, int cache_type, int context) {
    static const char *const units[] = { "KiB", "MiB", "GiB" };
    double size = cache_bytes(cfg, cache_type, cache_positions(context)) / 1024.0;
    int unit = 0;
    for (; unit < 2 && size >= 1024.0; unit++) size /= 1024.0;
    fprintf(stderr, "kv cache: %s, %d positions, %.1f %s\n", CACHE_TYPE_NAMES[cache_type],
            context, size, units[unit]);
}

static void check_stdout(void) {
    if (fflush(stdout) != 0 || ferror(stdout))
        die("cannot write the output: %s", errno ? strerror(errno) : "write error");
}

/* OpenMP's threads wait for the next loop by spinning (GNU OpenMP: 300000 checks, about 3 ms).
   Where another program holds a core, a spinning thread takes turns with it, and every loop
   waits for its turn: two threads then decode slower than one. Waiting asleep at once costs
   the small models' many short loops on a quiet machine; a short spin (1000 checks) then sleep
   holds on both (docs/performance.md has the figures). OpenMP reads these settings once, as
   the program loads, so run sets them (GOMP_SPINCOUNT for GNU OpenMP, OMP_WAIT_POLICY=passive
   for the others) and starts itself again, once; the user's own settings are kept. */
static void prefer_short_spin(char **argv) {
#if defined _OPENMP
    if (getenv("OMP_WAIT_POLICY") || getenv("GOMP_SPINCOUNT")) return;
    if (setenv("OMP_WAIT_POLICY", "passive", 1) != 0 || setenv("GOMP_SPINCOUNT", "1000", 1) != 0)
        return;
    execv("/proc/self/exe", argv);  /* returns only on failure: then go on as we are */
#else
    (void)argv;
#endif
}

/* The number of threads -T asks for (where OpenMP gives them), and the model's context: the
   -c asked for, at most the model's maximum. */
static void apply_threads(const Options *o) {
#if defined _OPENMP
    if (o->threads > 0) omp_set_num_threads((int)o->threads);
#else
    if (o->threads > 0)
        fprintf(stderr, "run: note: %s is ignored: this build has no OpenMP threads (runomp "
                "has)\n", o->threads_flag);
#endif
}

static void cap_context(Options *o, const Config *cfg) {
    if (o->context <= cfg->max_seq_len) return;
    if (o->context_given)
        fprintf(stderr, "run: note: -c %ld is more than the model's maximum context: using %d\n",
                o->context, cfg->max_seq_len);
    o->context = cfg->max_seq_len;
}

/* The tokenizer, unless the run needs none (-I ids printed as ids): -z, or the model's path
   with .tok for .bin (then *default_path holds it, for the caller to free). */
static void open_tokenizer(Session *s, const Options *o, const Config *cfg,
                           const char **path, char **default_path) {
    int chat_mode = strcmp(o->mode, "chat") == 0;
    if (!chat_mode && o->prompt_ids && o->print_ids) return;
    *path = o->tokenizer_path;
    if (!*path) *path = *default_path = default_tokenizer_path(o->model_path);
    check_tokenizer_exists(*path, o->tokenizer_path != NULL);
    char err[256];
    s->tokenizer = tokenizer_load(*path, err, sizeof err);
    if (!s->tokenizer && o->tokenizer_path && starts_with_magic(*path, MODEL_MAGIC))
        die("-z %s is a model file: -z names the tokenizer (the .tok beside it)", *path);
    if (!s->tokenizer)  /* err: "path: why" */
        die("tokenizer %s%s", err, o->tokenizer_path ? "" : " (give its path with -z)");
    if (tokenizer_vocab_size(s->tokenizer) != cfg->vocab_size)
        die("the tokenizer has %d tokens but the model's vocabulary has %d",
            tokenizer_vocab_size(s->tokenizer), cfg->vocab_size);
}

/* -e 1: the model's eos ids, and Llama 3's end tokens where there is a tokenizer. */
static void add_stop_ids(Session *s, const Config *cfg) {
    for (int i = 0; i < cfg->n_eos; i++) add_stop_id(s, cfg->eos_ids[i]);
    if (!s->tokenizer) return;
    add_stop_id(s, tokenizer_special_id(s->tokenizer, "<|end_of_text|>"));
    add_stop_id(s, tokenizer_special_id(s->tokenizer, "<|eot_id|>"));
    add_stop_id(s, tokenizer_special_id(s->tokenizer, "<|eom_id|>"));
}

/* Generate mode's prompt as ids: -I as given, or the text (-i, -f or stdin; *text, to echo)
   encoded after <|begin_of_text|>. */
static void prompt_ids(const Options *o, const Session *s, const Config *cfg, TokenList *prompt,
                       char **text, size_t *text_len) {
    if (o->prompt_ids) {
        parse_ids(o->prompt_ids, cfg->vocab_size, prompt);
    } else {
        *text = prompt_text(o, s->tokenizer, (int)o->context, text_len);
        encode_or_die(s->tokenizer, *text ? *text : "", *text_len, TOKENIZER_ADD_BOS, prompt);
    }
    if (prompt->count > (size_t)o->context)
        die("the prompt has %zu tokens but the context holds %ld (-c)", prompt->count,
            o->context);
}

/* The state for the context, with its KV cache, and -a fast. */
static void start_state(Transformer *tr, const Options *o) {
    const Config *cfg = &tr->model.config;
    if (o->cache_type == CACHE_Q8_0 && cfg->head_dim % CACHE_GROUP != 0)
        die("the q8_0 cache stores groups of %d dimensions, and this model's heads have %d: "
            "use --cache-type bf16", CACHE_GROUP, cfg->head_dim);
    alloc_state(&tr->state, cfg, (int)o->context, o->cache_type);
    if (o->fast && !simd_set_fast(&tr->state.scratch, cfg->weight_type, cfg->group_size))
        fprintf(stderr, "run: note: -a fast changes nothing for %s weights in this build "
                "(%s kernels): the activations stay exact\n", WEIGHT_TYPE_NAMES[cfg->weight_type],
                simd_kernels());
}

/* What is about to run, on stderr. */
static void print_run_header(const Options *o, const Model *m, unsigned long long seed) {
    const Config *cfg = &m->config;
    fprintf(stderr, "model: %d layers, dim %d, %d query / %d kv heads of %d, vocab %d, %s "
            "weights %s; context %ld of %d; %s kernels\n", cfg->n_layers, cfg->dim, cfg->n_heads,
            cfg->n_kv_heads, cfg->head_dim, cfg->vocab_size, WEIGHT_TYPE_NAMES[cfg->weight_type],
            m->read_into_memory ? "read into memory" : "mapped", o->context, cfg->max_seq_len,
            simd_kernels());
    print_cache_size(cfg, o->cache_type, (int)o->context);
    if (o->seed < 0 && o->sampling.temperature > 0.0f)
        fprintf(stderr, "seed: %llu (-s %llu repeats this run)\n", seed, seed);
}

/* Generate mode: the prompt's text echoed, then what follows it. */
static void generate_mode(Session *s, const Options *o, const TokenList *prompt,
                          const char *text, size_t text_len) {
    if (!o->print_ids && text) {
        fwrite(text, 1, text_len, stdout);
        fflush(stdout);
    }
    generate(s, prompt->ids, prompt->count, o->steps < 0 ? 256 : (int)o->steps, NULL);
    finish_output(s);
    printf("\n");
}

int main(int argc, char **argv) {
    prefer_short_spin(argv);
    double started = now_seconds();
    struct sigaction bus = { .sa_handler = on_sigbus };
    sigaction(SIGBUS, &bus, NULL);
    Options o;
    parse_options(argc, argv, &o);
    apply_threads(&o);
    int chat_mode = strcmp(o.mode, "chat") == 0;

    /* the model, the tokenizer, the prompt */
    check_model_kind(o.model_path, o.model_flag);
    Transformer tr = {0};
    load_model(o.model_path, &tr.model, o.weights);
    const Config *cfg = &tr.model.config;
    cap_context(&o, cfg);
    Session s = { .tr = &tr, .print_ids = o.print_ids, .json = o.json,
                  .context_shift = !o.no_context_shift };
    char *default_path = NULL;
    const char *tokenizer_path = NULL;
    open_tokenizer(&s, &o, cfg, &tokenizer_path, &default_path);
    const char *inputs[] = { o.model_path, tokenizer_path, o.prompt_file };
    refuse_outputs_over_inputs(o.logits_path, inputs, 3);
    if (o.stop_at_end) add_stop_ids(&s, cfg);
    TokenList prompt = {0};
    size_t text_len = 0;
    char *text = NULL;
    if (!chat_mode) prompt_ids(&o, &s, cfg, &prompt, &text, &text_len);

    /* the state, the sampler, the outputs */
    start_state(&tr, &o);
    s.load_seconds = now_seconds() - started;
    unsigned long long seed = o.seed >= 0 ? (unsigned long long)o.seed : fresh_seed();
    sampler_init(&s.sampler, &o.sampling, cfg->vocab_size, (int)o.context, seed);
    if (o.logits_path) {
        s.logits_file = fopen(o.logits_path, "wb");
        if (!s.logits_file) die("cannot create %s: %s", o.logits_path, strerror(errno));
    }
    print_run_header(&o, &tr.model, seed);

    /* the run */
    int status = 0;
    catch_interrupts();
    if (chat_mode) status = chat(&s, o.system_prompt, o.prompt, o.steps < 0 ? 0 : (int)o.steps);
    else generate_mode(&s, &o, &prompt, text, text_len);
    check_stdout();
    print_stats(&s, simd_kernels());
    if (s.logits_file && fclose(s.logits_file) != 0)
        die("cannot write %s: %s", o.logits_path, strerror(errno));

    token_list_free(&prompt);
    free(text);
    sampler_free(&s.sampler);
    free(default_path);
    if (s.tokenizer) tokenizer_free(s.tokenizer);
    free_state(&tr.state);
    free_model(&tr.model);
    return status;
}

/* ----------------------------------------------------------------------------------------
   8. SIMD kernels, by instruction set; and the weights in 2 MB pages

   Each kernel here computes what a loop of sections 2 and 3 computes (some sums in another
   order), faster, and is reached only through the hooks those sections call (simd_*, each
   declared where it is called). Which kernels a build has is the compiler's choice (-march):
   one sub-section per instruction set, each defining every hook (8a AVX-512, with VNNI, BF16
   and AMX where the CPU has them; 8b AVX2 with FMA and F16C; 8c ARM NEON, with the int8 dot
   product where the compiler targets it). The map, one row per operation:

   operation        hook                  8a AVX-512         8b AVX2         8c NEON
   decode fp32      simd_matmul_rows      dot_fp32_avx512    dot_fp32_avx2   dot_fp32_neon
     rows 4096+                           wide_rows_fp32
   decode bf16                            dot_bf16_avx512    dot_bf16_avx2   dot_bf16_neon
     rows 4096+                           wide_rows_bf16
   decode q8_0                            dot_q8_vnni        dot_groups_avx2 dot_groups_neon
   decode q4_0                            dot_q4_32, _groups dot_q4_32_avx2  dot_groups_neon
                                                             dot_groups_avx2
     -a fast                              dot_q8_fast,       the same, int8  dot_groups_neon
                                          dot_q4_fast,                       (int8, sdot)
                                          dot_bf16_fast
   decode input     simd_prepare_input    quantize_input     quantize_input  quantize_input
   prompt           simd_matmul_batch     matmul_strips,     strip_kernel8   tile_dots_neon,
                                          matmul_strips_q8,                  tile_int8_neon
                                          matmul_tiles (AMX)
   attention scores simd_attention_scores score_tiles        score_quad      score_tile_neon
   attention values simd_attention_values sum_values         sum_values8     value_tile_neon
   softmax, SwiGLU  simd_softmax, _swiglu exp16              exp8            exp4

   Why each is faster (8a; 8b and 8c say where they differ):
   - decoding: the row dot products as 16-lane FMAs, four chains deep to hide their latency;
     bf16 rows widened by one shift or mask against x reordered once per matmul (split_pairs);
     q8_0 groups as int8 x int16 VNNI dot products (vpdpwssd), 32 per instruction; q4_0
     nibbles the same way, four blocks unpacked per step; rows 4096+ wide taken WIDE_ROWS at a
     time, so that each load of x, which no longer stays in L1, serves 8 rows.
   - the prompt: register-tiled products of a panel of rows against strips of 32 tokens
     transposed so that one vector load is one column of 16 tokens, in slabs that stay in L2
     (matmul_strips), and for q8_0 and q4_0 the same with integer words (matmul_strips_q8):
     the prompt is bound by arithmetic, and a tile makes 16 multiply-adds per 2 loads where a
     dot product makes 1 per load. Where the CPU has AMX (Intel's tile unit), q8_0 and q4_0
     prompts go through its tile products instead (matmul_tiles), thousands of multiply-adds
     per instruction.
   - attention: section 3's score and value loops as register tiles, reading every cache type
     directly.
   - softmax and SwiGLU: with a vectorised exp within 2 ulp of expf, 16 lanes at a time.
   -a fast (fast_bf16, fast_int8, fast_q4) trades exactness for speed as llama.cpp does:
   activations rounded to bf16 for bf16 weights (vdpbf16ps) and to int8 for q8_0 and q4_0
   (vpdpbusd), each twice the multiply-adds per instruction, about 1e-2 of the logits' range
   off instead of 1e-6 (tests/test_engine.py and tests/test_q4.py measure it). Without
   AVX512-BF16 or VNNI it changes nothing; AVX2 (vpmaddubsw) and NEON (sdot, or smull) round
   q8_0 and q4_0 activations to int8 for decoding and leave bf16 exact.
   tests/test_kernels.c checks every kernel here against plain loops (and quantize_group16
   against quantize_group, bit for bit). Section 8 calls back into sections 1-3 only for their
   leaf helpers (conversions, widen_values, quantize_group, calloc_aligned), never for a
   function that calls a hook. */

/* ---- Shared by every instruction set ------------------------------------------------------ */
#if HAVE_SIMD
/* The scale of a group whose largest magnitude is amax, as quantize_group makes it: NaN, with q
   zeroed, for a group holding a NaN (ordered 0) or an infinity. */
static float checked_scale(int16_t *q, int gs, float amax, int ordered, float q_max) {
    if (ordered && isfinite(amax)) return amax / q_max;
    memset(q, 0, (size_t)gs * sizeof *q);
    return NAN;
}

#define VALUES_AHEAD 16  /* attention's weighted sum fetches the values this many positions on */

/* For kernels written once with parameters that each call site makes constants (a group size,
   a weight type): inlined at every call, whatever the compiler's size limits, so that each
   copy's loops unroll for its constants. */
#define SPECIALISED static inline __attribute__((always_inline))
#endif

/* ---- 8a. AVX-512 ------------------------------------------------------------------------ */
#if defined __AVX512F__
#include <immintrin.h>
#if defined __linux__
#include <sys/syscall.h>  /* SYS_arch_prctl: the AMX tiles (amx_granted) */
#endif

/* The lanes of a 16-float step from i that lie before n (a loop's ragged last step). */
static __mmask16 lanes_before(int i, int n) {
    int k = n - i;
    return k >= 16 ? (__mmask16)0xffff : k <= 0 ? 0 : (__mmask16)((1u << k) - 1);
}

/* Asks for the cache lines of bytes [p, p + n) to be loaded ahead of their use; results do not
   change. A decoding kernel streams each row once, and attention a long cache: one thread's
   loads alone keep too few lines in flight, and the hardware prefetcher leaves the kernels
   waiting on memory between their bursts of arithmetic. So the kernels ask for the bytes
   DECODE_AHEAD past the ones they are about to read (docs/performance.md). */
#define DECODE_AHEAD 2048
static inline void prefetch_bytes(const void *p, size_t n) {
    for (size_t b = 0; b < n; b += 64) _mm_prefetch((const char *)p + b, _MM_HINT_T0);
}

/* Sums the four accumulators' 64 lanes. */
static float sum4_avx512(__m512 a, __m512 b, __m512 c, __m512 d) {
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
}

/* dot_fp32, four chains of 16 lanes */
static float dot_fp32_avx512(const float *w, const float *x, int n) {
    int i = 0;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;  /* four chains hide latency */
    for (; i + 64 <= n; i += 64) {
        prefetch_bytes((const char *)(w + i) + DECODE_AHEAD, 256);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 32), _mm512_loadu_ps(x + i + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 48), _mm512_loadu_ps(x + i + 48), a3);
    }
    for (; i + 16 <= n; i += 16)
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
    float sum = sum4_avx512(a0, a1, a2, a3);
    for (; i < n; i++) sum += w[i] * x[i];
    return sum;
}

/* bf16 rows against float32 x. In memory a bf16 pair (w[2j], w[2j+1]) is one 32-bit word whose
   upper half is w[2j+1] as a float and whose lower half, shifted up, is w[2j]. So the AVX-512
   path turns 32 weights into floats with one AND and one shift, and meets them with x_pairs:
   x reordered once per matmul so that each 32 values list the even ones, then the odd ones
   (the values past the last whole 32 stay in place). */
static void split_pairs(float *x_pairs, const float *x, int n) {
    int i = 0;
    for (; i + 32 <= n; i += 32)
        for (int j = 0; j < 16; j++) {
            x_pairs[i + j] = x[i + 2 * j];
            x_pairs[i + 16 + j] = x[i + 2 * j + 1];
        }
    for (; i < n; i++) x_pairs[i] = x[i];
}

static float dot_bf16_avx512(const uint16_t *w, const float *x_pairs, int n) {
    int i = 0;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    for (; i + 64 <= n; i += 64) {
        prefetch_bytes((const char *)(w + i) + DECODE_AHEAD, 128);
        __m512i p0 = _mm512_loadu_si512((const void *)(w + i));
        __m512i p1 = _mm512_loadu_si512((const void *)(w + i + 32));
        __m512 even0 = _mm512_castsi512_ps(_mm512_slli_epi32(p0, 16));
        __m512 odd0 = _mm512_castsi512_ps(_mm512_and_si512(p0, high));
        __m512 even1 = _mm512_castsi512_ps(_mm512_slli_epi32(p1, 16));
        __m512 odd1 = _mm512_castsi512_ps(_mm512_and_si512(p1, high));
        a0 = _mm512_fmadd_ps(even0, _mm512_loadu_ps(x_pairs + i), a0);
        a1 = _mm512_fmadd_ps(odd0, _mm512_loadu_ps(x_pairs + i + 16), a1);
        a2 = _mm512_fmadd_ps(even1, _mm512_loadu_ps(x_pairs + i + 32), a2);
        a3 = _mm512_fmadd_ps(odd1, _mm512_loadu_ps(x_pairs + i + 48), a3);
    }
    for (; i + 32 <= n; i += 32) {
        __m512i p = _mm512_loadu_si512((const void *)(w + i));
        a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(p, 16)),
                             _mm512_loadu_ps(x_pairs + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(p, high)),
                             _mm512_loadu_ps(x_pairs + i + 16), a1);
    }
    float sum = sum4_avx512(a0, a1, a2, a3);
    for (; i < n; i++) sum += bf16_to_float(w[i]) * x_pairs[i];
    return sum;
}

/* dot_bf16_avx512 for WIDE_ROWS rows at once (row stride `stride` values, n a multiple of 32),
   for rows so wide that x_pairs does not stay in L1 beside the streaming weights (8192 floats
   fill it): one row at a time would reload all of x from L2 per row. Each x load here serves
   8 rows. Only the first nr rows are real; the others repeat row nr - 1, and their sums go
   unused. */
#define WIDE_COLS 4096
#define WIDE_ROWS 8
static void wide_rows_bf16(float *out, const uint16_t *w, size_t stride, const float *x_pairs,
                          int n, int nr) {
    const uint16_t *row[WIDE_ROWS];
    for (int r = 0; r < WIDE_ROWS; r++) row[r] = w + (size_t)(r < nr ? r : nr - 1) * stride;
    __m512 even[WIDE_ROWS], odd[WIDE_ROWS];
    for (int r = 0; r < WIDE_ROWS; r++) even[r] = odd[r] = _mm512_setzero_ps();
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    for (int i = 0; i < n; i += 32) {
        __m512 x_even = _mm512_loadu_ps(x_pairs + i), x_odd = _mm512_loadu_ps(x_pairs + i + 16);
        for (int r = 0; r < WIDE_ROWS; r++) {
            __m512i p = _mm512_loadu_si512((const void *)(row[r] + i));
            even[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(p, 16)), x_even,
                                      even[r]);
            odd[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(p, high)), x_odd,
                                     odd[r]);
        }
    }
    for (int r = 0; r < nr; r++) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(even[r], odd[r]));
}

/* The same for fp32 rows (8192-wide: 32 KB of weights and 32 KB of x per row). */
static void wide_rows_fp32(float *out, const float *w, size_t stride, const float *x, int n,
                          int nr) {
    const float *row[WIDE_ROWS];
    for (int r = 0; r < WIDE_ROWS; r++) row[r] = w + (size_t)(r < nr ? r : nr - 1) * stride;
    __m512 a0[WIDE_ROWS], a1[WIDE_ROWS];
    for (int r = 0; r < WIDE_ROWS; r++) a0[r] = a1[r] = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 32) {
        __m512 x0 = _mm512_loadu_ps(x + i), x1 = _mm512_loadu_ps(x + i + 16);
        for (int r = 0; r < WIDE_ROWS; r++) {
            a0[r] = _mm512_fmadd_ps(_mm512_loadu_ps(row[r] + i), x0, a0[r]);
            a1[r] = _mm512_fmadd_ps(_mm512_loadu_ps(row[r] + i + 16), x1, a1[r]);
        }
    }
    for (int r = 0; r < nr; r++) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
}

/* -a fast for bf16 weights, with AVX512-BF16: x is rounded to bf16 as well (round to nearest
   even), so that one vdpbf16ps makes 32 multiply-adds (two exact products per float lane)
   where an FMA makes 16. That rounding, not the products, is the cost. */
#if defined __AVX512BF16__
#define HAS_AVX512_BF16 1
#define HAS_AVX512_BF16_NAME "+bf16"

static void round_vector_bf16(uint16_t *out, const float *x, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(out + i),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
    for (; i < n; i++) out[i] = round_to_bf16(x[i]);
}

static float dot_bf16_fast(const uint16_t *w, const uint16_t *x, int n) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    int i = 0;
    for (; i + 64 <= n; i += 64) {  /* two lines of the row per step */
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512((const void *)(w + i)),
                              (__m512bh)_mm512_loadu_si512((const void *)(x + i)));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512((const void *)(w + i + 32)),
                              (__m512bh)_mm512_loadu_si512((const void *)(x + i + 32)));
    }
    for (; i + 32 <= n; i += 32)
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512((const void *)(w + i)),
                              (__m512bh)_mm512_loadu_si512((const void *)(x + i)));
    float sum = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    for (; i < n; i++) sum += bf16_to_float(w[i]) * bf16_to_float(x[i]);
    return sum;
}
#else
#define HAS_AVX512_BF16 0
#define HAS_AVX512_BF16_NAME ""
#endif

/* acc + the pairwise int16 products of a and b, summed into 16 int32 lanes (vpdpwssd), for
   the prompt kernel: for gcc the one instruction itself, so that its accumulators stay in
   registers (docs/kernels.md, "Compilers"). Decoding calls the intrinsic, which lets the
   compiler read x straight from memory. */
#if defined __AVX512VNNI__ && defined __AVX512BW__ && defined __AVX512VL__
static inline __m512i madd_int16(__m512i acc, __m512i a, __m512i b) {
#if defined __GNUC__ && !defined __clang__
    __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
#else
    return _mm512_dpwssd_epi32(acc, a, b);
#endif
}

/* acc + the products of a's unsigned bytes and b's signed bytes, four summed into each of 16
   int32 lanes (vpdpbusd): -a fast's int8 activations, as madd_int16. */
static inline __m512i madd_int8(__m512i acc, __m512i a, __m512i b) {
#if defined __GNUC__ && !defined __clang__
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
#else
    return _mm512_dpbusd_epi32(acc, a, b);
#endif
}
#define HAS_VNNI 1
#define HAS_VNNI_NAME "+vnni"
#else
#define HAS_VNNI 0
#define HAS_VNNI_NAME ""
#endif

#if HAS_VNNI && defined __AMX_TILE__ && defined __AMX_INT8__ && defined __AMX_BF16__ && \
    defined SYS_arch_prctl
#define HAS_AMX 1
#define HAS_AMX_NAME "+amx"
/* The q8_0 and q4_0 prompt path on CPUs with AMX, Intel's tile unit (matmul_tiles, below).
   Linux hands out the tile registers on request (amx_granted); without them the strips run. */
#define AMX_TOKENS 16  /* tokens per pack: a tile's 16 columns */
#define AMX_ROWS 256   /* most weight rows per panel */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int amx_granted(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}
#else
#define HAS_AMX 0
#define HAS_AMX_NAME ""
#endif

/* quantize_group 16 values at a time (gs a multiple of 16), bit for bit the same: the lanes
   that are NaN are collected in a mask beside the max (a group with a NaN or an infinity gets
   the scale NaN and zeros), roundscale rounds to nearest even like nearbyintf, NaNs become 0
   and the rest is clamped to +-q_max before the exact conversion. */
static float quantize_group16(int16_t *q, const float *x, int gs, float q_max) {
    __m512 amax = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int i = 0; i < gs; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        amax = _mm512_max_ps(_mm512_abs_ps(v), amax);
    }
    float scale = checked_scale(q, gs, _mm512_reduce_max_ps(amax), !nan, q_max);
    if (isnan(scale)) return scale;
    __m512 inverse = _mm512_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
    __m512 high = _mm512_set1_ps(q_max), low = _mm512_set1_ps(-q_max);
    for (int i = 0; i < gs; i += 16) {
        __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), inverse),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(r, r, _CMP_ORD_Q), r);
        r = _mm512_min_ps(_mm512_max_ps(r, low), high);
        _mm256_storeu_si256((__m256i *)(q + i), _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(r)));
    }
    return scale;
}

/* The activations as section 8's decoding kernels read them: quantized per group as section
   2's QuantizedVector holds them (q, scales), and the extra forms some kernels want. */
typedef struct {
    int16_t *q;             /* round(x / scale) per group, in [-q_max, q_max] */
    float *scales;          /* one per group */
    int8_t *int8;           /* -a fast's q8_0: q as int8 (q_max 127) */
    int32_t *int8_offsets;  /* ... and per group -8 * the sum of its int8 (see dot_q8_fast) */
    int16_t *q4_pairs;      /* q4_0: q in the order its nibbles unpack (prepare_q4) */
    float *q4_offsets;      /* ... and per group -8 * the sum of its q */
    int8_t *q4_int8;        /* -a fast's q4_0: q (q_max 127) as the nibbles come */
} SimdVector;

/* quantize_vector into v, 16 lanes at a time where gs allows (the same bits). */
static void quantize_input(SimdVector *v, const float *x, int n, int gs, float q_max) {
    for (int g = 0; g < n / gs; g++) {
        int16_t *q = v->q + (size_t)g * gs;
        const float *xg = x + (size_t)g * gs;
        v->scales[g] = gs % 16 == 0 ? quantize_group16(q, xg, gs, q_max)
                                    : quantize_group(q, xg, gs, q_max);
    }
}

/* -a fast decoding of q8_0: x quantized with q_max 127, as the int8 values and offsets
   dot_q8_fast reads. */
static void quantize_int8(SimdVector *v, const float *x, int n, int gs) {
    quantize_input(v, x, n, gs, Q8_MAX);
    for (int g = 0; g < n / gs; g++) {
        int32_t sum = 0;
        for (int i = g * gs; i < (g + 1) * gs; i++) sum += v->int8[i] = (int8_t)v->q[i];
        v->int8_offsets[g] = -8 * sum;
    }
}

#if HAS_VNNI
/* The scale products w_scale * x_scale of q8_0 groups g0 .. g0+n-1 (n <= 16) into scales,
   and the weights DECODE_AHEAD bytes on asked for. */
static inline void q8_window(float *scales, const int8_t *w, const float *w_scales,
                             const SimdVector *x, int g0, int n, int gs) {
    __mmask16 m = lanes_before(0, n);
    prefetch_bytes(w + (size_t)g0 * gs + DECODE_AHEAD, (size_t)16 * gs);
    prefetch_bytes((const char *)(w_scales + g0) + DECODE_AHEAD / 16, 64);
    _mm512_storeu_ps(scales, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w_scales + g0),
                                           _mm512_maskz_loadu_ps(m, x->scales + g0)));
}

/* dot_q8 with VNNI: each group's products in 16 int32 lanes, 32 int8 x int16 products per
   vpdpwssd (a lane takes gs/16 products of at most 127 * 32767, so groups up to 4096 cannot
   overflow it), then times the group's two scales. The scale products are formed 16 groups at
   a time, and consecutive groups go to two accumulators. Called with a constant gs, so that
   the group loop unrolls and no scalar work is left between the integer products. */
static inline float dot_q8_vnni(const int8_t *w, const float *w_scales, const SimdVector *x,
                                int n_groups, int gs) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
    float scales[16];
    for (int g0 = 0; g0 < n_groups; g0 += 16) {
        int n = n_groups - g0 < 16 ? n_groups - g0 : 16;
        q8_window(scales, w, w_scales, x, g0, n, gs);
        for (int j = 0; j < n; j++) {
            const int8_t *wg = w + (size_t)(g0 + j) * gs;
            const int16_t *xg = x->q + (size_t)(g0 + j) * gs;
            __m512i isum = _mm512_setzero_si512();
            for (int i = 0; i < gs; i += 32) {
                __m512i w16 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wg + i)));
                isum = _mm512_dpwssd_epi32(isum, w16, _mm512_loadu_si512((const void *)(xg + i)));
            }
            __m512 sum = _mm512_cvtepi32_ps(isum), scale = _mm512_set1_ps(scales[j]);
            if (j % 2) acc1 = _mm512_fmadd_ps(sum, scale, acc1);
            else acc0 = _mm512_fmadd_ps(sum, scale, acc0);
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

/* -a fast: dot_q8_vnni against int8 activations (gs a multiple of 64), 64 products per
   vpdpbusd. That instruction takes one side unsigned, so the weights go in with their top bit
   flipped, as w + 128, which adds 128 * (the sum of x) to the group's sum; the lanes start at
   minus that, the group's offset: -8 * sum in each of 16. */
static inline float dot_q8_fast(const int8_t *w, const float *w_scales, const SimdVector *x,
                                int n_groups, int gs) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    float scales[16];
    for (int g0 = 0; g0 < n_groups; g0 += 16) {
        int n = n_groups - g0 < 16 ? n_groups - g0 : 16;
        q8_window(scales, w, w_scales, x, g0, n, gs);
        for (int j = 0; j < n; j++) {
            const int8_t *wg = w + (size_t)(g0 + j) * gs, *xg = x->int8 + (size_t)(g0 + j) * gs;
            __m512i isum = _mm512_set1_epi32(x->int8_offsets[g0 + j]);
            for (int i = 0; i < gs; i += 64) {
                __m512i w_plus_128 = _mm512_xor_si512(_mm512_loadu_si512((const void *)(wg + i)),
                                                      flip);
                isum = _mm512_dpbusd_epi32(isum, w_plus_128,
                                           _mm512_loadu_si512((const void *)(xg + i)));
            }
            __m512 sum = _mm512_cvtepi32_ps(isum), scale = _mm512_set1_ps(scales[j]);
            if (j % 2) acc1 = _mm512_fmadd_ps(sum, scale, acc1);
            else acc0 = _mm512_fmadd_ps(sum, scale, acc0);
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
#endif

/* q4_0 decoding: dot_q4. Groups of 32 (dot_q4_32) take 128 values per step: 64 bytes of
   nibbles are four blocks, and read as 32 16-bit words, each word holds four nibbles (bits
   0-3, 4-7, 8-11, 12-15: the low and high nibble of its first byte, then of its second). One
   shift and one AND give each of the four as 32 int16 lanes, against x in that order
   (prepare_q4), one vpdpwssd each: int32 lane l then holds four bytes' products, all of block
   l / 4, which meets its scales by one permute. Larger groups (dot_q4_groups) take 64 values
   per step: 32 bytes widened to 16-bit lanes, an AND giving their low nibbles and a shift the
   high ones. The nibbles are the values + 8; the -8 comes back once per group, as -8 * the sum
   of its x (q4_offsets) times the group's scales. Each 16 groups' scale products are formed at
   once. -a fast's kernel (dot_q4_fast) is below. */

/* v->q (quantized) reordered for the kernels, and each group's offset, -8 * the sum of its
   values. Groups of 32: per 128 values (four blocks; blocks past n are zeros), the 32 values
   that each of the four nibbles of the 32 words stand for, nibble by nibble. Else per 64
   values: x[0..15], x[32..47] (against the low nibbles), then x[16..31], x[48..63] (the high
   ones); a last lone block pads with zeros. */
static void prepare_q4(SimdVector *v, int n, int gs) {
    for (int i = 0; gs == 32 && i < n; i += 128) {
        int16_t *p = v->q4_pairs + i;
        for (int nibble = 0; nibble < 4; nibble++)
            for (int word = 0; word < 32; word++) {
                int byte = 2 * word + nibble / 2;  /* of the step's 64 */
                int at = i + byte / 16 * 32 + byte % 16 + nibble % 2 * 16;
                p[nibble * 32 + word] = at < n ? v->q[at] : 0;
            }
    }
    for (int i = 0; gs != 32 && i < n; i += 64) {
        int16_t *p = v->q4_pairs + i;
        const int16_t *q = v->q + i;
        int two = i + 64 <= n;
        for (int j = 0; j < 16; j++) {
            p[j] = q[j];
            p[16 + j] = two ? q[32 + j] : 0;
            p[32 + j] = q[16 + j];
            p[48 + j] = two ? q[48 + j] : 0;
        }
    }
    for (int g = 0; g < n / gs; g++) {
        int32_t sum = 0;
        for (int i = g * gs; i < (g + 1) * gs; i++) sum += v->q[i];
        v->q4_offsets[g] = (float)(-8 * sum);
    }
}

/* v->q (int8 values) as dot_q4_fast reads them: per 128 values (zeros past n), values
   0..15 of each of the four blocks, then values 16..31 of each. */
static void prepare_q4_int8(SimdVector *v, int n) {
    for (int i = 0; i < n; i += 128) {
        int8_t *p = v->q4_int8 + i;
        for (int k = 0; k < 64; k++) {  /* block k / 16, value k % 16, and 16 later */
            int at = i + k / 16 * 32 + k % 16;
            p[k] = at < n ? (int8_t)v->q[at] : 0;
            p[64 + k] = at + 16 < n ? (int8_t)v->q[at + 16] : 0;
        }
    }
}

#if HAS_VNNI

/* acc + the products of 64 nibbles (two blocks, `bytes`) with x_pairs (128 bytes). */
static inline __m512i nibble_sums(__m512i acc, __m256i bytes, const int16_t *x_pairs) {
    __m512i w16 = _mm512_cvtepu8_epi16(bytes);
    __m512i low = _mm512_and_si512(w16, _mm512_set1_epi16(15));
    __m512i high = _mm512_srli_epi16(w16, 4);
    acc = _mm512_dpwssd_epi32(acc, low, _mm512_loadu_si512((const void *)x_pairs));
    return _mm512_dpwssd_epi32(acc, high, _mm512_loadu_si512((const void *)(x_pairs + 32)));
}

/* Groups g0 .. g0+n-1 (n <= 16): w_scale * x_scale of each, in lanes 0 .. n-1 (zeros after). */
static inline __m512 q4_scales(const uint16_t *w_scales, const SimdVector *x, int g0, int n) {
    __mmask16 m = lanes_before(0, n);
    __m512 w = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, w_scales + g0));
    return _mm512_mul_ps(w, _mm512_maskz_loadu_ps(m, x->scales + g0));
}

/* The nibbles DECODE_AHEAD bytes ahead of the 256 (16 groups of 32) at w, and their scales. */
static inline void prefetch_q4(const uint8_t *w, const uint16_t *scales) {
    prefetch_bytes(w + DECODE_AHEAD, 256);
    prefetch_bytes((const char *)scales + DECODE_AHEAD / 8, 1);
}

/* The products of the 128 nibbles in words (64 bytes: four blocks) with x_pairs (prepare_q4's
   order for groups of 32), int32 lane l holding four of block l / 4's. */
static inline __m512i nibble_words(__m512i words, const int16_t *x_pairs) {
    const __m512i mask = _mm512_set1_epi16(15);
    __m512i a = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_and_si512(words, mask),
                                    _mm512_loadu_si512((const void *)x_pairs));
    __m512i b = _mm512_dpwssd_epi32(_mm512_setzero_si512(),
                                    _mm512_and_si512(_mm512_srli_epi16(words, 8), mask),
                                    _mm512_loadu_si512((const void *)(x_pairs + 64)));
    a = _mm512_dpwssd_epi32(a, _mm512_and_si512(_mm512_srli_epi16(words, 4), mask),
                            _mm512_loadu_si512((const void *)(x_pairs + 32)));
    b = _mm512_dpwssd_epi32(b, _mm512_srli_epi16(words, 12),
                            _mm512_loadu_si512((const void *)(x_pairs + 96)));
    return _mm512_add_epi32(a, b);
}

/* Groups of 32: each window of 16 groups in four steps, step s's lanes meeting the scales of
   groups 4s .. 4s+3 (pick[s]), alternating between two accumulators. A last window's missing
   blocks load as zeros. */
static float dot_q4_32(const uint8_t *w, const uint16_t *w_scales, const SimdVector *x,
                       int n) {
    int n_groups = n / 32;
    __m512 acc[2] = { _mm512_setzero_ps(), _mm512_setzero_ps() }, offsets = acc[0];
    const __m512i quarters = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512i pick[4];  /* lane l: l / 4 + 4s */
    for (int s = 0; s < 4; s++) pick[s] = _mm512_add_epi32(quarters, _mm512_set1_epi32(4 * s));
    for (int g0 = 0; g0 < n_groups; g0 += 16) {
        int ng = n_groups - g0 < 16 ? n_groups - g0 : 16;
        __m512 scales = q4_scales(w_scales, x, g0, ng);
        offsets = _mm512_fmadd_ps(scales, _mm512_maskz_loadu_ps(lanes_before(0, ng),
                                                                x->q4_offsets + g0), offsets);
        const uint8_t *wg = w + (size_t)g0 * 16;
        const int16_t *xg = x->q4_pairs + (size_t)g0 * 32;
        prefetch_q4(wg, w_scales + g0);
        for (int s = 0; s < 4 && 4 * s < ng; s++) {
            int bytes = ng - 4 * s >= 4 ? 64 : (ng - 4 * s) * 16;  /* of the row, this step */
            __mmask64 in_row = bytes == 64 ? ~(__mmask64)0 : ((__mmask64)1 << bytes) - 1;
            __m512i words = _mm512_maskz_loadu_epi8(in_row, wg + 64 * s);
            __m512 sums = _mm512_cvtepi32_ps(nibble_words(words, xg + 128 * s));
            acc[s % 2] = _mm512_fmadd_ps(sums, _mm512_permutexvar_ps(pick[s], scales),
                                         acc[s % 2]);
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), offsets));
}

/* Groups of a multiple of 64: each group's steps summed in int32, then scaled. */
static float dot_q4_groups(const uint8_t *w, const uint16_t *w_scales, const SimdVector *x,
                           int n, int gs) {
    int n_groups = n / gs;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, offsets = acc0;
    float scales[16];
    for (int g0 = 0; g0 < n_groups; g0 += 16) {
        int ng = n_groups - g0 < 16 ? n_groups - g0 : 16;
        __m512 s = q4_scales(w_scales, x, g0, ng);
        offsets = _mm512_fmadd_ps(s, _mm512_maskz_loadu_ps(lanes_before(0, ng),
                                                           x->q4_offsets + g0), offsets);
        _mm512_storeu_ps(scales, s);
        for (int j = 0; j < ng; j++) {
            size_t start = (size_t)(g0 + j) * gs;
            for (int i = 0; i < gs; i += 512)
                prefetch_q4(w + (start + i) / 2, w_scales + g0 + j + i / 32);
            __m512i isum = _mm512_setzero_si512();
            for (int i = 0; i < gs; i += 64)
                isum = nibble_sums(isum, _mm256_loadu_si256((const __m256i *)(w + (start + i) / 2)),
                                   x->q4_pairs + start + i);
            __m512 sum = _mm512_mul_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(scales[j]));
            if (j % 2) acc1 = _mm512_add_ps(acc1, sum);
            else acc0 = _mm512_add_ps(acc0, sum);
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), offsets));
}

/* -a fast for q4_0: x quantized to int8 (q_max 127), 128 values per step. 64 bytes of
   nibbles are four blocks; an AND gives their low nibbles, a shift and an AND the high ones,
   as unsigned bytes: the unsigned side of vpdpbusd, against x's bytes in the same order
   (prepare_q4_int8). Two instructions make a step's 128 products; int32 lane l holds four of
   block l / 4's, so that with groups of 32, 64 or 128 lane l of a step is group l / 4, l / 8
   or 0 of it, and meets its scales by one permute. */
static float dot_q4_fast(const uint8_t *w, const uint16_t *w_scales, const SimdVector *x,
                         int n, int gs) {
    int n_groups = n / gs, per_step = 128 / gs;  /* groups per step: 4, 2 or 1 */
    int32_t first[16];
    for (int l = 0; l < 16; l++) first[l] = l * per_step / 16;  /* lane l's group in a step */
    const __m512i step = _mm512_set1_epi32(per_step), mask = _mm512_set1_epi8(15);
    __m512 acc = _mm512_setzero_ps();
    for (int g0 = 0; g0 < n_groups; g0 += 16) {
        int ng = n_groups - g0 < 16 ? n_groups - g0 : 16;
        const uint8_t *wg = w + (size_t)g0 * gs / 2;
        for (int ahead = 0; ahead < 8 * gs; ahead += 256)  /* the window's 8 * gs bytes */
            prefetch_q4(wg + ahead, w_scales + g0);
        __m512 scales = q4_scales(w_scales, x, g0, ng);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lanes_before(0, ng), x->q4_offsets + g0),
                              scales, acc);
        __m512i index = _mm512_loadu_si512((const void *)first);
        for (int i = g0 * gs; i < (g0 + ng) * gs; i += 128) {
            int bytes = n - i >= 128 ? 64 : (n - i) / 2;  /* a row's last, partial step */
            __mmask64 in_row = bytes == 64 ? ~(__mmask64)0 : ((__mmask64)1 << bytes) - 1;
            __m512i nibbles = _mm512_maskz_loadu_epi8(in_row, w + i / 2);
            __m512i low = _mm512_and_si512(nibbles, mask);
            __m512i high = _mm512_and_si512(_mm512_srli_epi16(nibbles, 4), mask);
            const int8_t *xi = x->q4_int8 + i;
            __m512i sums = madd_int8(_mm512_setzero_si512(), low,
                                    _mm512_loadu_si512((const void *)xi));
            sums = madd_int8(sums, high, _mm512_loadu_si512((const void *)(xi + 64)));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_permutexvar_ps(index, scales),
                                  acc);
            index = _mm512_add_epi32(index, step);
        }
    }
    return _mm512_reduce_add_ps(acc);
}
#endif

#define STRIP 32        /* prompt path: tokens per packed strip (two vectors) */
#define STRIP_ROWS 8    /* ... and rows per register tile: 8 x 2 accumulators */
#define SLAB_ROWS 64    /* ... rows per panel, and columns per slab of it: a 128 KB slab, */
#define SLAB_COLS 512   /* and a strip's 64 KB slab, sit in L2 while they are reused */

/* Section 8's buffers and settings beside MatmulScratch's, allocated once. */
struct SimdScratch {
    int fast;           /* -a fast: the kernels may round the activations more coarsely */
    SimdVector xq;      /* q8_0, q4_0 decoding: the activations quantized [max_cols] */
    float *x_pairs;     /* bf16 decoding: x in split_pairs order [max_cols] (-a fast: as bf16) */
    float *strips;      /* prompt path: the tokens transposed, [strips][max_cols][STRIP] */
    float *slabs;       /* ... one [SLAB_ROWS][SLAB_COLS] widened weight slab per thread */
    float *strip_sums;  /* ... one [strips][SLAB_ROWS][STRIP] set of running sums per thread */
    int16_t *strips_q;  /* q8_0 prompt path: the tokens quantized, [strips][max_cols][STRIP] */
    float *strip_scales;   /* ... their scales, [strips][max_cols / 2][STRIP] (groups >= 2) */
    int32_t *strip_int8_offsets;  /* ... and for -a fast's int8, laid out like the scales */
    int16_t *panels_q;  /* ... and one [PANEL_ROWS][max_cols] int16 panel per thread */
    SimdVector *token_q;  /* ... and one quantized token [max_cols] per thread */
    float *panel_scales;   /* ... with its scales, [PANEL_ROWS][max_cols / 2] per thread */
    int n_strip_tokens; /* max_tokens rounded up to whole strips */
    int amx;            /* prompt path: the tile registers granted (matmul_tiles) */
    char *amx_panels;   /* ... then one [AMX_ROWS][max_cols] panel of bf16 per thread */
    float *amx_scales;  /* ... and its scales, [AMX_ROWS][max_cols / 32] */
};

static void simd_alloc_scratch(MatmulScratch *s) {
    struct SimdScratch *f = checked_calloc(1, sizeof *f, "matmul scratch");
    int n_strips = (s->max_tokens + STRIP - 1) / STRIP, max_cols = s->max_cols;
    size_t strip_values = (size_t)n_strips * STRIP * (size_t)max_cols;
    size_t panel_values = (size_t)s->n_threads * PANEL_ROWS * (size_t)max_cols;
    f->xq.q = calloc_aligned((size_t)max_cols, sizeof(int16_t), "matmul scratch");
    f->xq.scales = calloc_aligned((size_t)max_cols, sizeof(float), "matmul scratch");
    f->xq.int8 = calloc_aligned((size_t)max_cols, sizeof(int8_t), "matmul scratch");
    f->xq.int8_offsets = calloc_aligned((size_t)max_cols, sizeof(int32_t), "matmul scratch");
    f->xq.q4_pairs = calloc_aligned((size_t)max_cols + 128, sizeof(int16_t), "matmul scratch");
    f->xq.q4_offsets = calloc_aligned((size_t)max_cols, sizeof(float), "matmul scratch");
    f->xq.q4_int8 = calloc_aligned((size_t)max_cols + 128, 1, "matmul scratch");
    f->x_pairs = calloc_aligned((size_t)max_cols, sizeof(float), "matmul scratch");
    f->strips = calloc_aligned(strip_values, sizeof(float), "matmul scratch");
    f->n_strip_tokens = n_strips * STRIP;
    f->slabs = calloc_aligned((size_t)s->n_threads * SLAB_ROWS * SLAB_COLS, sizeof(float),
                              "matmul scratch");
    f->strip_sums = calloc_aligned((size_t)s->n_threads * SLAB_ROWS * (size_t)f->n_strip_tokens,
                                   sizeof(float), "matmul scratch");
    f->strips_q = calloc_aligned(strip_values, sizeof(int16_t), "matmul scratch");
    f->strip_scales = calloc_aligned(strip_values / 2 + 1, sizeof(float), "matmul scratch");
    f->strip_int8_offsets = calloc_aligned(strip_values / 2 + 1, sizeof(int32_t),
                                           "matmul scratch");
    f->panels_q = calloc_aligned(panel_values, sizeof(int16_t), "matmul scratch");
    f->panel_scales = calloc_aligned(panel_values / 2 + 1, sizeof(float), "matmul scratch");
    f->token_q = checked_calloc((size_t)s->n_threads, sizeof(SimdVector), "matmul scratch");
    for (int i = 0; i < s->n_threads; i++) {
        f->token_q[i].q = calloc_aligned((size_t)max_cols, sizeof(int16_t), "matmul scratch");
        f->token_q[i].scales = calloc_aligned((size_t)max_cols, sizeof(float), "matmul scratch");
    }
#if HAS_AMX
    f->amx = amx_granted();
    if (f->amx) {
        f->amx_panels = calloc_aligned((size_t)s->n_threads * AMX_ROWS * max_cols, 2,
                                       "matmul scratch");
        f->amx_scales = calloc_aligned((size_t)s->n_threads * AMX_ROWS * (max_cols / 32 + 1),
                                       sizeof(float), "matmul scratch");
    }
#endif
    s->simd = f;
}

static void simd_free_scratch(MatmulScratch *s) {
    struct SimdScratch *f = s->simd;
    if (!f) return;
    void *buffers[] = { f->xq.q, f->xq.scales, f->xq.int8, f->xq.int8_offsets, f->xq.q4_pairs,
                        f->xq.q4_offsets, f->xq.q4_int8, f->strips, f->x_pairs, f->slabs,
                        f->strip_sums, f->strips_q, f->strip_scales, f->strip_int8_offsets,
                        f->panels_q, f->panel_scales, f->amx_panels, f->amx_scales };
    for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++) free_aligned(buffers[i]);
    for (int i = 0; i < s->n_threads; i++) {
        free_aligned(f->token_q[i].q);
        free_aligned(f->token_q[i].scales);
    }
    free(f->token_q);
    free(f);
}

/* Whether -a fast applies to a q8_0 matrix: int8 activations need AVX-512 VNNI and groups of
   a multiple of 64 (export.py's default is 64). */
static int fast_int8(const Matrix *w, const MatmulScratch *s) {
    return HAS_VNNI && s->simd->fast && w->type == WEIGHT_Q8_0 && w->group_size % 64 == 0;
}

/* Whether -a fast applies to a q4_0 matrix (dot_q4_fast, and int8 prompt strips). */
static int fast_q4(const Matrix *w, const MatmulScratch *s) {
    int gs = w->group_size;
    return HAS_VNNI && s->simd->fast && w->type == WEIGHT_Q4_0 &&
           (gs == 32 || gs == 64 || gs == 128);
}

/* Whether -a fast applies to a bf16 matrix: bf16 activations need AVX512-BF16 (the prompt path
   also wants whole pairs: an even width). */
static int fast_bf16(const Matrix *w, const MatmulScratch *s) {
    return HAS_AVX512_BF16 && s->simd->fast && w->type == WEIGHT_BF16;
}

/* Hook (main): -a fast from now on. Returns whether it changes anything for weights of this
   type and group size. */
static int simd_set_fast(MatmulScratch *s, int weight_type, int group_size) {
    s->simd->fast = 1;
    Matrix w = { .type = weight_type, .group_size = group_size };
    return fast_int8(&w, s) || fast_q4(&w, s) || fast_bf16(&w, s);
}

/* The decoding kernel for a matrix's rows, or ROWS_NONE where section 2's loop must run:
   q4_0 with groups other than 32 or a multiple of 64 up to 4096 (int32 lanes take gs / 16
   products of at most 15 * 32767 each), q8_0 with groups not a multiple of 32, or either
   without VNNI. Rows of 4096+ floats go WIDE_ROWS at a time. */
enum { ROWS_NONE, ROWS_FP32, ROWS_WIDE_FP32, ROWS_BF16, ROWS_WIDE_BF16, ROWS_BF16_FAST,
       ROWS_Q8, ROWS_Q8_32, ROWS_Q8_64, ROWS_Q8_FAST, ROWS_Q8_FAST_64, ROWS_Q4_32, ROWS_Q4,
       ROWS_Q4_FAST };
static int rows_kernel(const Matrix *w, const MatmulScratch *s) {
    int gs = w->group_size, wide = w->cols >= WIDE_COLS && w->cols % 32 == 0;
    switch (w->type) {
    case WEIGHT_FP32: return wide ? ROWS_WIDE_FP32 : ROWS_FP32;
    case WEIGHT_BF16: return fast_bf16(w, s) ? ROWS_BF16_FAST : wide ? ROWS_WIDE_BF16 : ROWS_BF16;
    case WEIGHT_Q8_0:
        if (fast_int8(w, s)) return gs == 64 ? ROWS_Q8_FAST_64 : ROWS_Q8_FAST;
        if (!HAS_VNNI || gs % 32 != 0 || gs > 4096) return ROWS_NONE;
        return gs == 64 ? ROWS_Q8_64 : gs == 32 ? ROWS_Q8_32 : ROWS_Q8;
    default:
        if (fast_q4(w, s)) return ROWS_Q4_FAST;
        if (!HAS_VNNI || (gs != 32 && (gs % 64 != 0 || gs > 4096))) return ROWS_NONE;
        return gs == 32 ? ROWS_Q4_32 : ROWS_Q4;
    }
}

/* Hook (matmul_vector): x in the form the rows' kernel reads. */
static int simd_prepare_input(const Matrix *w, const float *x, MatmulScratch *s) {
    struct SimdScratch *f = s->simd;
    int kernel = rows_kernel(w, s), cols = w->cols, gs = w->group_size;
    switch (kernel) {
    case ROWS_NONE: return 0;
    case ROWS_BF16: case ROWS_WIDE_BF16: split_pairs(f->x_pairs, x, cols); break;
#if HAS_AVX512_BF16
    case ROWS_BF16_FAST: round_vector_bf16((uint16_t *)f->x_pairs, x, cols); break;
#endif
    case ROWS_Q8_FAST: case ROWS_Q8_FAST_64: quantize_int8(&f->xq, x, cols, gs); break;
    case ROWS_Q8: case ROWS_Q8_32: case ROWS_Q8_64:
        quantize_input(&f->xq, x, cols, gs, Q16_MAX);
        break;
    case ROWS_Q4: case ROWS_Q4_32:
        quantize_input(&f->xq, x, cols, gs, Q16_MAX);
        prepare_q4(&f->xq, cols, gs);
        break;
    case ROWS_Q4_FAST:  /* (prepare_q4's offsets are then the int8 values') */
        quantize_input(&f->xq, x, cols, gs, Q8_MAX);
        prepare_q4(&f->xq, cols, gs);
        prepare_q4_int8(&f->xq, cols);
        break;
    }
    return 1;
}

/* Hook (matmul_vector, inside its parallel region): one product's rows against x as
   simd_prepare_input left it, split over the threads as matmul_vector splits them, WIDE_ROWS
   rows per step for the wide kernels. */
static int simd_matmul_rows(float *out, const Matrix *w, const float *x, MatmulScratch *s) {
    const struct SimdScratch *f = s->simd;
    const SimdVector *xq = &f->xq;
    int kernel = rows_kernel(w, s), cols = w->cols, gs = w->group_size;
    int n_groups = gs > 0 ? cols / gs : 0, step = WIDE_ROWS;
    if (kernel == ROWS_NONE) return 0;
    if (kernel != ROWS_WIDE_FP32 && kernel != ROWS_WIDE_BF16) step = 1;
    OMP(for schedule(guided) nowait)
    for (int r = 0; r < w->rows; r += step) {
        size_t start = (size_t)r * (size_t)cols, group = gs > 0 ? start / (size_t)gs : 0;
        const float *fp32 = (const float *)w->data + start;
        const uint16_t *bf16 = (const uint16_t *)w->data + start;
        int nr = w->rows - r < WIDE_ROWS ? w->rows - r : WIDE_ROWS;
        switch (kernel) {
        case ROWS_FP32: out[r] = dot_fp32_avx512(fp32, x, cols); break;
        case ROWS_WIDE_FP32: wide_rows_fp32(out + r, fp32, (size_t)cols, x, cols, nr); break;
        case ROWS_BF16: out[r] = dot_bf16_avx512(bf16, f->x_pairs, cols); break;
        case ROWS_WIDE_BF16:
            wide_rows_bf16(out + r, bf16, (size_t)cols, f->x_pairs, cols, nr);
            break;
#if HAS_AVX512_BF16
        case ROWS_BF16_FAST:
            out[r] = dot_bf16_fast(bf16, (const uint16_t *)f->x_pairs, cols);
            break;
#endif
#if HAS_VNNI  /* (q8_0 rows at data + start, their scales from group on; q4_0 at data + start/2) */
        case ROWS_Q8:
            out[r] = dot_q8_vnni((const int8_t *)w->data + start, w->scales + group, xq,
                                 n_groups, gs);
            break;
        case ROWS_Q8_32:
            out[r] = dot_q8_vnni((const int8_t *)w->data + start, w->scales + group, xq,
                                 n_groups, 32);
            break;
        case ROWS_Q8_64:
            out[r] = dot_q8_vnni((const int8_t *)w->data + start, w->scales + group, xq,
                                 n_groups, 64);
            break;
        case ROWS_Q8_FAST:
            out[r] = dot_q8_fast((const int8_t *)w->data + start, w->scales + group, xq,
                                 n_groups, gs);
            break;
        case ROWS_Q8_FAST_64:
            out[r] = dot_q8_fast((const int8_t *)w->data + start, w->scales + group, xq,
                                 n_groups, 64);
            break;
        case ROWS_Q4_32:
            out[r] = dot_q4_32((const uint8_t *)w->data + start / 2, w->fp16_scales + group, xq,
                               cols);
            break;
        case ROWS_Q4:
            out[r] = dot_q4_groups((const uint8_t *)w->data + start / 2, w->fp16_scales + group,
                                   xq, cols, gs);
            break;
        case ROWS_Q4_FAST:
            out[r] = dot_q4_fast((const uint8_t *)w->data + start / 2, w->fp16_scales + group,
                                 xq, cols, gs);
            break;
#endif
        }
    }
    return 1;
}

/* Transposes the tokens into strips of STRIP: strip[k][j] = x[t0 + j][k], zero past n_tokens.
   A vector load then gives one column for 16 tokens, to meet a broadcast weight. */
static void pack_strip(float *strip, const float *x, int t0, int n_tokens, int cols) {
    /* 16 columns (one cache line of each token) at a time: token rows 2^k floats apart share
       one L1 set, so a column at a time would miss on every load */
    for (int k0 = 0; k0 < cols; k0 += 16) {
        int kn = cols - k0 < 16 ? cols - k0 : 16;
        for (int j = 0; j < STRIP; j++) {
            const float *row = x + (size_t)(t0 + j) * cols + k0;
            for (int k = 0; k < kn; k++)
                strip[(size_t)(k0 + k) * STRIP + j] = t0 + j < n_tokens ? row[k] : 0.0f;
        }
    }
}

/* Columns k0 .. k0+kn-1 of rows r0 .. r0+nr-1 of w, widened to float32 into
   slab[r][0 .. kn-1] (row stride SLAB_COLS); rows nr .. nr_padded-1 are zeroed, so that a
   ragged last register tile multiplies zeros. */
static void widen_slab(float *slab, const Matrix *w, int r0, int nr, int nr_padded, int k0,
                        int kn) {
    for (int r = 0; r < nr; r++)
        widen_values(slab + (size_t)r * SLAB_COLS, w,
                     (size_t)(r0 + r) * (size_t)w->cols + (size_t)k0, kn);
    for (int r = nr; r < nr_padded; r++)
        memset(slab + (size_t)r * SLAB_COLS, 0, (size_t)kn * sizeof(float));
}

/* One register tile, over one slab of columns: sums[r][t] += w[r][k] * strip[k][t] for
   STRIP_ROWS rows (w: row stride w_stride) and the STRIP tokens of a strip, k = 0 .. kn-1
   (from_zero: start from zero instead of sums). Each step of k broadcasts one weight per row and
   multiplies it into two vectors of 16 tokens: 16 multiply-adds per 2 vector loads. Each sum
   runs over k in order (the sums are parked in memory between slabs, exactly), like the plain
   dot product. */
static void strip_kernel(float *sums, const float *w, size_t w_stride, const float *strip, int kn,
                         int from_zero) {
    __m512 acc[STRIP_ROWS][2];
    for (int r = 0; r < STRIP_ROWS; r++) {
        acc[r][0] = from_zero ? _mm512_setzero_ps() : _mm512_loadu_ps(sums + r * STRIP);
        acc[r][1] = from_zero ? _mm512_setzero_ps() : _mm512_loadu_ps(sums + r * STRIP + 16);
    }
    for (int k = 0; k < kn; k++) {
        __m512 x0 = _mm512_loadu_ps(strip + (size_t)k * STRIP);
        __m512 x1 = _mm512_loadu_ps(strip + (size_t)k * STRIP + 16);
        for (int r = 0; r < STRIP_ROWS; r++) {
            __m512 wv = _mm512_set1_ps(w[(size_t)r * w_stride + k]);
            acc[r][0] = _mm512_fmadd_ps(wv, x0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(wv, x1, acc[r][1]);
        }
    }
    for (int r = 0; r < STRIP_ROWS; r++) {
        _mm512_storeu_ps(sums + r * STRIP, acc[r][0]);
        _mm512_storeu_ps(sums + r * STRIP + 16, acc[r][1]);
    }
}

/* strip_kernel for bf16 weights read in place (row stride w_stride values; kn even): each
   32-bit load holds a row's weights k and k+1, and a bf16 is the top half of its float32, so
   a shift gives weight k and a mask gives weight k+1 without a widened copy of the rows. */
static void strip_kernel_bf16(float *sums, const uint16_t *w, size_t w_stride, const float *strip,
                              int kn, int from_zero) {
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512 acc[STRIP_ROWS][2];
    for (int r = 0; r < STRIP_ROWS; r++) {
        acc[r][0] = from_zero ? _mm512_setzero_ps() : _mm512_loadu_ps(sums + r * STRIP);
        acc[r][1] = from_zero ? _mm512_setzero_ps() : _mm512_loadu_ps(sums + r * STRIP + 16);
    }
    for (int k = 0; k < kn; k += 2) {
        const float *x = strip + (size_t)k * STRIP;
        __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
        __m512 y0 = _mm512_loadu_ps(x + STRIP), y1 = _mm512_loadu_ps(x + STRIP + 16);
        for (int r = 0; r < STRIP_ROWS; r++) {
            int32_t pair;
            memcpy(&pair, w + (size_t)r * w_stride + k, sizeof pair);
            __m512i both = _mm512_set1_epi32(pair);
            __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(both, 16));
            __m512 w1 = _mm512_castsi512_ps(_mm512_and_si512(both, high));
            acc[r][0] = _mm512_fmadd_ps(w0, x0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(w0, x1, acc[r][1]);
            acc[r][0] = _mm512_fmadd_ps(w1, y0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(w1, y1, acc[r][1]);
        }
    }
    for (int r = 0; r < STRIP_ROWS; r++) {
        _mm512_storeu_ps(sums + r * STRIP, acc[r][0]);
        _mm512_storeu_ps(sums + r * STRIP + 16, acc[r][1]);
    }
}

#if HAS_AVX512_BF16
/* Fast activations (see dot_bf16_fast): the tokens rounded to bf16 and packed in pairs,
   pairs[(k/2) * STRIP + j] = (x[t0 + j][k], x[t0 + j][k+1]) (cols even). */
static void pack_strip_fast(uint32_t *pairs, const float *x, int t0, int n_tokens, int cols) {
    for (int k0 = 0; k0 < cols; k0 += 32) {  /* two cache lines of each token at a time */
        int n_pairs = cols - k0 < 32 ? (cols - k0) / 2 : 16;
        for (int j = 0; j < STRIP; j++) {
            uint32_t rounded[16] = {0};
            if (t0 + j < n_tokens) {
                const float *row = x + (size_t)(t0 + j) * cols + k0;
                __m512 lo = _mm512_maskz_loadu_ps(lanes_before(0, 2 * n_pairs), row);
                __m512 hi = _mm512_maskz_loadu_ps(lanes_before(16, 2 * n_pairs), row + 16);
                _mm512_storeu_si512((void *)rounded, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
            }
            for (int m = 0; m < n_pairs; m++) pairs[(size_t)(k0 / 2 + m) * STRIP + j] = rounded[m];
        }
    }
}

/* strip_kernel_bf16 against bf16 token pairs: one vdpbf16ps takes weights k and k+1 of a row
   against 16 tokens' pairs, the work of two FMAs. Only the first nr rows are real (a ragged
   last tile): the others repeat row nr - 1, and their sums go unused. */
static void strip_kernel_fast(float *sums, const uint16_t *w, size_t w_stride, int nr,
                              const uint32_t *pairs, int kn, int from_zero) {
    __m512 acc[STRIP_ROWS][2];
    for (int r = 0; r < STRIP_ROWS; r++) {
        acc[r][0] = from_zero ? _mm512_setzero_ps() : _mm512_loadu_ps(sums + r * STRIP);
        acc[r][1] = from_zero ? _mm512_setzero_ps() : _mm512_loadu_ps(sums + r * STRIP + 16);
    }
    for (int k = 0; k < kn; k += 2) {
        const uint32_t *p = pairs + (size_t)(k / 2) * STRIP;
        __m512bh x0 = (__m512bh)_mm512_loadu_si512((const void *)p);
        __m512bh x1 = (__m512bh)_mm512_loadu_si512((const void *)(p + 16));
        for (int r = 0; r < STRIP_ROWS; r++) {
            int32_t pair;
            memcpy(&pair, w + (size_t)(r < nr ? r : nr - 1) * w_stride + k, sizeof pair);
            __m512bh wv = (__m512bh)_mm512_set1_epi32(pair);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], wv, x0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], wv, x1);
        }
    }
    for (int r = 0; r < STRIP_ROWS; r++) {
        _mm512_storeu_ps(sums + r * STRIP, acc[r][0]);
        _mm512_storeu_ps(sums + r * STRIP + 16, acc[r][1]);
    }
}
#endif

/* One slab of a panel: columns k0 .. k0+kn-1 of rows r0 .. r0+nr-1, against the same
   columns of every strip, tile by tile. fp32 and bf16 rows are read in place, where they lie
   contiguous (the slab is small enough to stay in L1/L2 for every strip); a ragged last
   panel (zero rows pad its last tile), odd-width bf16 rows (no whole pairs) and q8_0 rows
   are widened into `slab` first. */
static void strips_slab(float *sums, float *slab, const Matrix *w, int r0, int nr, int k0,
                         int kn, const float *strips, int n_strips, int fast) {
    int cols = w->cols, n_tiles = (nr + STRIP_ROWS - 1) / STRIP_ROWS;
    int whole_tiles = nr % STRIP_ROWS == 0;
    int fp32_in_place = w->type == WEIGHT_FP32 && whole_tiles;
    int bf16_in_place = w->type == WEIGHT_BF16 && whole_tiles && cols % 2 == 0;
    if (!fast && !fp32_in_place && !bf16_in_place)
        widen_slab(slab, w, r0, nr, n_tiles * STRIP_ROWS, k0, kn);
    for (int i = 0; i < n_strips; i++) {
        const float *strip = strips + ((size_t)i * cols + (size_t)k0) * STRIP;
        for (int t = 0; t < n_tiles; t++) {
            float *tile_sums = sums + ((size_t)i * SLAB_ROWS + (size_t)t * STRIP_ROWS) * STRIP;
            size_t start = (size_t)(r0 + t * STRIP_ROWS) * (size_t)cols + (size_t)k0;
#if HAS_AVX512_BF16
            if (fast) {  /* bf16 rows of even width, read in place */
                const uint32_t *pairs = (const uint32_t *)(strips + (size_t)i * cols * STRIP);
                int tile_rows = nr - t * STRIP_ROWS < STRIP_ROWS ? nr - t * STRIP_ROWS : STRIP_ROWS;
                strip_kernel_fast(tile_sums, (const uint16_t *)w->data + start, (size_t)cols,
                                  tile_rows, pairs + (size_t)(k0 / 2) * STRIP, kn, k0 == 0);
                continue;
            }
#endif
            if (fp32_in_place)
                strip_kernel(tile_sums, (const float *)w->data + start, (size_t)cols,
                             strip, kn, k0 == 0);
            else if (bf16_in_place)
                strip_kernel_bf16(tile_sums, (const uint16_t *)w->data + start,
                                  (size_t)cols, strip, kn, k0 == 0);
            else
                strip_kernel(tile_sums, slab + (size_t)t * STRIP_ROWS * SLAB_COLS, SLAB_COLS,
                             strip, kn, k0 == 0);
        }
    }
}

/* A panel's running sums for one strip, sums[r][t] (row stride STRIP), to their places in
   out[t0 + t][r0 + r] (row stride rows), for t < nt and r < nr: a token's rows at a time,
   so that each line of out is written whole, once. */
static void scatter_sums(float *out, int rows, const float *sums, int t0, int nt, int r0,
                         int nr) {
    for (int t = 0; t < nt; t++)
        for (int r = 0; r < nr; r++)
            out[(size_t)(t0 + t) * rows + r0 + r] = sums[r * STRIP + t];
}

/* The prompt path. The threads first pack the tokens into strips, then take panels of
   SLAB_ROWS rows, each walked in slabs of SLAB_COLS columns (strips_slab). A whole strip
   (up to 1 MB at 8192 columns) would not stay in L2 while every tile of the panel reads it; a
   slab of one does. The running sums, sums[strip][row][token], go to out[token][row] after
   the panel's last slab. */
static void matmul_strips(float *out, const float *x, int n_tokens, const Matrix *w,
                          MatmulScratch *s) {
    int rows = w->rows, cols = w->cols, n_strips = (n_tokens + STRIP - 1) / STRIP;
    int n_panels = (rows + SLAB_ROWS - 1) / SLAB_ROWS;
    int fast = fast_bf16(w, s) && cols % 2 == 0;
    struct SimdScratch *f = s->simd;
    OMP(parallel)
    {
        OMP(for schedule(static))
        for (int i = 0; i < n_strips; i++) {
            float *strip = f->strips + (size_t)i * STRIP * cols;
#if HAS_AVX512_BF16
            if (fast) {
                pack_strip_fast((uint32_t *)strip, x, i * STRIP, n_tokens, cols);
                continue;
            }
#endif
            pack_strip(strip, x, i * STRIP, n_tokens, cols);
        }
        /* (the for's implied barrier: every strip is packed before any panel starts) */
        float *slab = f->slabs + (size_t)thread_id() * SLAB_ROWS * SLAB_COLS;
        float *sums = f->strip_sums + (size_t)thread_id() * SLAB_ROWS * (size_t)f->n_strip_tokens;
        OMP(for schedule(static))
        for (int p = 0; p < n_panels; p++) {
            int r0 = p * SLAB_ROWS, nr = rows - r0 < SLAB_ROWS ? rows - r0 : SLAB_ROWS;
            for (int k0 = 0; k0 < cols; k0 += SLAB_COLS)
                strips_slab(sums, slab, w, r0, nr, k0,
                             cols - k0 < SLAB_COLS ? cols - k0 : SLAB_COLS,
                             f->strips, n_strips, fast);
            for (int i = 0; i < n_strips; i++)
                scatter_sums(out, rows, sums + (size_t)i * SLAB_ROWS * STRIP, i * STRIP,
                             n_tokens - i * STRIP < STRIP ? n_tokens - i * STRIP : STRIP, r0, nr);
        }
    }
}

#if HAS_VNNI
/* The q8_0 prompt path: integer dot products, like decoding. Each token's activations are
   quantized per group (quantize_vector, the same rounding decoding does) and packed into
   strips of STRIP tokens whose 32-bit words hold a token's int16 pair (x[k], x[k+1]), or with
   -a fast its four int8 x[k] .. x[k+3]; a panel of rows is widened to the same words. Then one
   instruction, a broadcast weight word against 16 tokens' words, makes 32 (vpdpwssd) or 64
   (vpdpbusd) multiply-adds, where a float32 FMA makes 16. A group's sums are exact in int32
   (gs * 127 * 32767 < 2^31 for gs <= 512) and meet their two scales, the weight row's and the
   token's, once per group. */
#define Q_ROWS 4        /* rows per register tile (strip_kernel_q8 names its four rows) */
#define Q_MAX_GROUP 512

/* q4_0 rows take the same path, widened from their nibbles (|q| <= 8 keeps every sum far
   inside int32 too). */
static int q8_strips_apply(const Matrix *w) {
    return (w->type == WEIGHT_Q8_0 || w->type == WEIGHT_Q4_0) && w->group_size % 2 == 0 &&
           w->group_size <= Q_MAX_GROUP;
}

/* Quantizes tokens t0 .. t0+STRIP-1 of x (zeros past n_tokens) into one strip of words:
   words[m * STRIP + j] = token j's values 2m, 2m+1 as int16 or (int8) 4m .. 4m+3 as int8,
   scales[g * STRIP + j], and for int8 int8_offsets[g * STRIP + j] = -128 * the group's sum
   (dot_q8_fast explains; here a lane is a token, so it takes all of it). */
static void pack_strip_q8(uint32_t *words, float *scales, int32_t *int8_offsets, const float *x,
                          int t0, int n_tokens, int cols, int gs, int int8, SimdVector *tmp) {
    int n_groups = cols / gs, per_word = int8 ? 4 : 2;
    for (int j = 0; j < STRIP; j++) {
        if (t0 + j < n_tokens) {
            quantize_input(tmp, x + (size_t)(t0 + j) * cols, cols, gs,
                            int8 ? Q8_MAX : Q16_MAX);
        } else {
            memset(tmp->q, 0, (size_t)cols * sizeof(int16_t));
            memset(tmp->scales, 0, (size_t)n_groups * sizeof(float));
        }
        for (int m = 0; m < cols / per_word; m++) {
            const int16_t *q = tmp->q + (size_t)m * per_word;
            uint32_t word = int8 ? (uint32_t)(uint8_t)q[0] | (uint32_t)(uint8_t)q[1] << 8 |
                                    (uint32_t)(uint8_t)q[2] << 16 | (uint32_t)(uint8_t)q[3] << 24
                                  : (uint32_t)(uint16_t)q[0] | (uint32_t)(uint16_t)q[1] << 16;
            words[(size_t)m * STRIP + j] = word;
        }
        for (int g = 0; g < n_groups; g++) scales[(size_t)g * STRIP + j] = tmp->scales[g];
        for (int g = 0; int8 && g < n_groups; g++) {
            int32_t sum = 0;
            for (int i = g * gs; i < (g + 1) * gs; i++) sum += tmp->q[i];
            int8_offsets[(size_t)g * STRIP + j] = -128 * sum;
        }
    }
}

/* Memory a kernel prefetches while it runs, evenly over its groups: the next panel's rows. */
typedef struct {
    const char *start;
    size_t bytes;
} Prefetch;

static inline __m512i madd_words(__m512i acc, __m512i w, __m512i x, int int8) {
    return int8 ? madd_int8(acc, w, x) : madd_int16(acc, w, x);
}

/* sums[r][t] (row stride STRIP) for Q_ROWS rows of weight words (row stride row_words, their
   scales row stride n_groups) and the strip's tokens, groups of group_words words.
   int8_offsets: NULL for int16 pairs, else the strip's for int8 quads. The caller scatters a
   panel's sums to the output once its tiles are done (scatter_sums), so that each output line
   is written whole, once, not in 4 partial writes. */
static void strip_kernel_q8(float *sums, const uint32_t *w, size_t row_words,
                            const float *w_scales, const uint32_t *words,
                            const float *x_scales, const int32_t *int8_offsets,
                            int n_groups, int group_words, Prefetch ahead) {
    int int8 = int8_offsets != NULL;
    size_t ahead_lines = (ahead.bytes + 63) / 64;
    const uint32_t *w0 = w, *w1 = w + row_words, *w2 = w + 2 * row_words, *w3 = w + 3 * row_words;
    __m512 acc[Q_ROWS][2];
    for (int r = 0; r < Q_ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int g = 0; g < n_groups; g++) {
        __m512i c0 = _mm512_setzero_si512(), c1 = c0;
        if (int8) {
            c0 = _mm512_loadu_si512((const void *)(int8_offsets + (size_t)g * STRIP));
            c1 = _mm512_loadu_si512((const void *)(int8_offsets + (size_t)g * STRIP + 16));
        }
        /* named accumulators, not an array, so that they stay in registers (docs/kernels.md) */
        __m512i s00 = c0, s01 = c1, s10 = c0, s11 = c1, s20 = c0, s21 = c1, s30 = c0, s31 = c1;
        for (size_t i = g * ahead_lines / n_groups; i < (g + 1) * ahead_lines / n_groups; i++)
            _mm_prefetch(ahead.start + i * 64, _MM_HINT_T0);
        for (int m = g * group_words; m < (g + 1) * group_words; m++) {
            const uint32_t *p = words + (size_t)m * STRIP;
            __m512i x0 = _mm512_loadu_si512((const void *)p);
            __m512i x1 = _mm512_loadu_si512((const void *)(p + 16));
            __m512i wv = _mm512_set1_epi32((int)w0[m]);
            s00 = madd_words(s00, wv, x0, int8);
            s01 = madd_words(s01, wv, x1, int8);
            wv = _mm512_set1_epi32((int)w1[m]);
            s10 = madd_words(s10, wv, x0, int8);
            s11 = madd_words(s11, wv, x1, int8);
            wv = _mm512_set1_epi32((int)w2[m]);
            s20 = madd_words(s20, wv, x0, int8);
            s21 = madd_words(s21, wv, x1, int8);
            wv = _mm512_set1_epi32((int)w3[m]);
            s30 = madd_words(s30, wv, x0, int8);
            s31 = madd_words(s31, wv, x1, int8);
        }
        __m512 xs0 = _mm512_loadu_ps(x_scales + (size_t)g * STRIP);
        __m512 xs1 = _mm512_loadu_ps(x_scales + (size_t)g * STRIP + 16);
        __m512i sums[Q_ROWS][2] = { { s00, s01 }, { s10, s11 }, { s20, s21 }, { s30, s31 } };
        for (int r = 0; r < Q_ROWS; r++) {
            __m512 ws = _mm512_set1_ps(w_scales[(size_t)r * n_groups + g]);
            acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r][0]), _mm512_mul_ps(xs0, ws),
                                        acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r][1]), _mm512_mul_ps(xs1, ws),
                                        acc[r][1]);
        }
    }
    for (int r = 0; r < Q_ROWS; r++) {
        _mm512_storeu_ps(sums + r * STRIP, acc[r][0]);
        _mm512_storeu_ps(sums + r * STRIP + 16, acc[r][1]);
    }
}

/* n q4_0 values (whole 32-value blocks) from their nibbles to int16: per block, one widening
   of its 16 bytes, then the low nibbles are values 0..15 and the high ones 16..31. */
static void widen_nibbles(int16_t *dst, const uint8_t *src, size_t n) {
    const __m256i low = _mm256_set1_epi16(15), eight = _mm256_set1_epi16(8);
    for (size_t i = 0; i < n; i += 32) {
        __m256i w16 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(src + i / 2)));
        _mm256_storeu_si256((__m256i *)(dst + i),
                            _mm256_sub_epi16(_mm256_and_si256(w16, low), eight));
        _mm256_storeu_si256((__m256i *)(dst + i + 16),
                            _mm256_sub_epi16(_mm256_srli_epi16(w16, 4), eight));
    }
}

/* The same for -a fast's int8 words: the values + 128 as unsigned bytes (as widen_panel_q8
   makes of q8_0's). */
static void widen_nibbles_u8(uint8_t *dst, const uint8_t *src, size_t n) {
    const __m128i low = _mm_set1_epi8(15), shift = _mm_set1_epi8(120);  /* (u - 8) + 128 */
    for (size_t i = 0; i < n; i += 32) {
        __m128i v = _mm_loadu_si128((const __m128i *)(src + i / 2));
        _mm_storeu_si128((__m128i *)(dst + i), _mm_add_epi8(_mm_and_si128(v, low), shift));
        _mm_storeu_si128((__m128i *)(dst + i + 16),
                         _mm_add_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), low), shift));
    }
}

/* Like matmul_strips, with strips of integer words and panels of rows widened from int8 to
   the same words: int16, or for int8 uint8 with the top bit flipped (w + 128, the unsigned
   side of vpdpbusd); zero rows and zero scales pad a ragged last panel. The widening waits on
   memory, so while a panel meets the strips, the next panel's rows are prefetched, a share
   per kernel call. */
static void widen_panel_q8(uint32_t *panel, float *scales, const Matrix *w, int r0, int nr,
                           int int8) {
    int cols = w->cols, n_groups = cols / w->group_size;
    size_t n = (size_t)nr * cols, padding = (size_t)(PANEL_ROWS - nr) * cols;
    const int8_t *src = (const int8_t *)w->data + (size_t)r0 * cols;
    if (w->type == WEIGHT_Q4_0) {
        const uint8_t *nibbles = (const uint8_t *)w->data + (size_t)r0 * cols / 2;
        if (int8) {
            widen_nibbles_u8((uint8_t *)panel, nibbles, n);
            memset((uint8_t *)panel + n, 0x80, padding);
        } else {
            widen_nibbles((int16_t *)panel, nibbles, n);
            memset((int16_t *)panel + n, 0, padding * sizeof(int16_t));
        }
        const uint16_t *half = w->fp16_scales + (size_t)r0 * n_groups;
        for (size_t g = 0; g < (size_t)nr * n_groups; g++) scales[g] = fp16_to_float(half[g]);
        memset(scales + (size_t)nr * n_groups, 0,
               (size_t)(PANEL_ROWS - nr) * n_groups * sizeof(float));
        return;
    }
    if (int8) {
        uint8_t *dst = (uint8_t *)panel;
        for (size_t i = 0; i < n; i++) dst[i] = (uint8_t)src[i] ^ 0x80u;
        memset(dst + n, 0x80, padding);
    } else {
        int16_t *dst = (int16_t *)panel;
        for (size_t i = 0; i < n; i++) dst[i] = src[i];
        memset(dst + n, 0, padding * sizeof(int16_t));
    }
    memcpy(scales, w->scales + (size_t)r0 * n_groups, (size_t)nr * n_groups * sizeof(float));
    memset(scales + (size_t)nr * n_groups, 0,
           (size_t)(PANEL_ROWS - nr) * n_groups * sizeof(float));
}

static void matmul_strips_q8(float *out, const float *x, int n_tokens, const Matrix *w,
                             MatmulScratch *s) {
    int rows = w->rows, cols = w->cols, gs = w->group_size, n_groups = cols / gs;
    int n_strips = (n_tokens + STRIP - 1) / STRIP, n_panels = (rows + PANEL_ROWS - 1) / PANEL_ROWS;
    int int8 = fast_int8(w, s) || fast_q4(w, s), per_word = int8 ? 4 : 2;
    size_t row_words = (size_t)cols / per_word;
    int calls = n_strips * (PANEL_ROWS / Q_ROWS);  /* kernel calls per whole panel */
    size_t row_bytes = w->type == WEIGHT_Q4_0 ? (size_t)cols / 2 : (size_t)cols;  /* stored */
    size_t panel_bytes = PANEL_ROWS * row_bytes, share = (panel_bytes / calls + 63) / 64 * 64;
    struct SimdScratch *f = s->simd;
    OMP(parallel)
    {
        int id = thread_id();
        OMP(for schedule(static))
        for (int i = 0; i < n_strips; i++)
            pack_strip_q8((uint32_t *)(f->strips_q + (size_t)i * STRIP * cols),
                          f->strip_scales + (size_t)i * STRIP * (cols / 2),
                          f->strip_int8_offsets + (size_t)i * STRIP * (cols / 2), x, i * STRIP,
                          n_tokens, cols, gs, int8, &f->token_q[id]);
        /* (the for's implied barrier: every strip is packed before any panel starts) */
        uint32_t *panel = (uint32_t *)(f->panels_q + (size_t)id * PANEL_ROWS * (size_t)s->max_cols);
        float *scales = f->panel_scales + (size_t)id * PANEL_ROWS * (s->max_cols / 2);
        float *sums = f->strip_sums + (size_t)id * SLAB_ROWS * (size_t)f->n_strip_tokens;
        OMP(for schedule(static))
        for (int p = 0; p < n_panels; p++) {
            int r0 = p * PANEL_ROWS, nr = rows - r0 < PANEL_ROWS ? rows - r0 : PANEL_ROWS;
            const char *next = (const char *)w->data + (size_t)(r0 + PANEL_ROWS) * row_bytes;
            size_t next_bytes = p + 1 < n_panels ? (size_t)(rows - r0 - nr) * row_bytes : 0;
            if (next_bytes > panel_bytes) next_bytes = panel_bytes;
            widen_panel_q8(panel, scales, w, r0, nr, int8);
            int call = 0;
            for (int i = 0; i < n_strips; i++) {
                int nt = n_tokens - i * STRIP < STRIP ? n_tokens - i * STRIP : STRIP;
                size_t strip_words = (size_t)i * STRIP * cols / 2;  /* strips_q is int16 */
                const int32_t *int8_offsets =
                    int8 ? f->strip_int8_offsets + (size_t)i * STRIP * (cols / 2) : NULL;
                for (int r = 0; r < nr; r += Q_ROWS, call++) {
                    size_t done = (size_t)call * share;
                    Prefetch ahead = { next + done, 0 };
                    if (done < next_bytes)
                        ahead.bytes = next_bytes - done < share ? next_bytes - done : share;
                    strip_kernel_q8(sums + (size_t)r * STRIP, panel + (size_t)r * row_words,
                                    row_words, scales + (size_t)r * n_groups,
                                    (const uint32_t *)f->strips_q + strip_words,
                                    f->strip_scales + (size_t)i * STRIP * (cols / 2),
                                    int8_offsets, n_groups, gs / per_word, ahead);
                }
                scatter_sums(out, rows, sums, i * STRIP, nt, r0, nr);
            }
        }
    }
}
#endif

#if HAS_AMX
/* The q8_0 and q4_0 prompt path from tile products. One instruction multiplies a tile of 16
   weight rows x 32 values by one of 32 values x 16 tokens and adds the 16 x 16 products to a
   tile of sums: 8192 multiply-adds (16384 for int8 steps of 64), where vpdpwssd makes 32.
   - exact: bf16 tiles (TDPBF16PS, float sums). A weight's q (|q| <= 127) is exact in bf16;
     each activation is split in two bf16, hi = bf16(x) and lo = bf16(x - hi), which hold x to
     16 bits of mantissa, so q hi + q lo is q x within about 2^-17 of it, with no quantizing of
     x (the strips round x to int16 per group: about 2^-16 of the group's largest).
   - -a fast: int8 tiles (TDPBSSD) of the strips' own int8 activations: the same integer sums.
   Each group's sums leave their tile and meet its scales as in strip_kernel_q8. */

/* Whether the tile path takes w: as the strips, with whole groups of 32. */
static int amx_applies(const Matrix *w, const MatmulScratch *s) {
    return s->simd->amx && q8_strips_apply(w) && w->group_size % 32 == 0;
}

/* Values per tile product: 32 bf16 pairs, or 64 int8 where the groups hold whole steps. */
static int amx_step(int gs, int int8) { return int8 && gs % 64 == 0 ? 64 : 32; }

/* The tile shapes, one per thread before its first tile instruction. With groups of one
   step (steps == 1), tiles 2 and 3 hold the step's activations for 16 tokens (step / 4 rows
   of 16 tokens x 4 bytes: pairs of bf16 or quads of int8, as amx_pack_tokens lays them out;
   int8 uses tile 2), and three sets of (sums, weights) tiles, (0, 1), (4, 5), (6, 7), take
   turns over the panel's row tiles, so that one row tile's products need not wait for the
   last one's sums to leave their tile. With longer groups, two sets of (sums, weights,
   activations, activations), (0, 1, 2, 3) and (4, 5, 6, 7). */
static void amx_configure(int step, int int8, int steps) {
    struct { uint8_t palette, start_row, reserved[14]; uint16_t bytes[16]; uint8_t rows[16]; }
        cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    int step_bytes = int8 ? step : 2 * step;
    for (int t = 0; t < 8; t++) {
        int tokens = steps == 1 ? t == 2 || t == 3 : t % 4 >= 2;
        int weights = steps == 1 ? t == 1 || t == 5 || t == 7 : t % 4 == 1;
        cfg.rows[t] = tokens ? (uint8_t)(step_bytes / 4) : 16;
        cfg.bytes[t] = weights ? (uint16_t)step_bytes : 64;
    }
    _tile_loadconfig(&cfg);
}

/* Tokens t0 .. t0+15 of x (zeros past n_tokens) in a tile's layout, value k of token j at
   place (k / p) * 16 p + j p + k % p of each plane (p values per 4 bytes). int8: one plane of
   p = 4 values quantized as the strips are (scales[g * 16 + j]); else two planes of p = 2
   bf16, the value rounded (high) and what that left out, rounded (low): high + low is the
   value to 16 bits of mantissa, so that the weights' exact bf16 values against both sum to
   the float products within float rounding. A token's 32 values are 8 (int8) or 16 (bf16)
   4-byte words, one per 64-byte row of the tile: scattered down the token's column. */
static void amx_pack_tokens(void *high, void *low, float *scales, const float *x, int t0,
                            int n_tokens, int cols, int gs, int int8, SimdVector *tmp) {
    const __m512i rows = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32(16));  /* in words */
    for (int j = 0; j < AMX_TOKENS; j++) {
        const float *xj = x + (size_t)(t0 + j) * cols;
        int in = t0 + j < n_tokens;
        if (int8 && in) quantize_input(tmp, xj, cols, gs, Q8_MAX);
        for (int k = 0; k < cols; k += 32) {
            if (int8) {
                __m256i q = in ? _mm512_cvtepi16_epi8(_mm512_loadu_si512(tmp->q + k))
                               : _mm256_setzero_si256();
                _mm512_mask_i32scatter_epi32((int8_t *)high + (size_t)k * 16 + j * 4, 0x00ff,
                                             rows, _mm512_castsi256_si512(q), 4);
                continue;
            }
            __m512 v0 = in ? _mm512_loadu_ps(xj + k) : _mm512_setzero_ps();
            __m512 v1 = in ? _mm512_loadu_ps(xj + k + 16) : _mm512_setzero_ps();
            __m256bh h0 = _mm512_cvtneps_pbh(v0), h1 = _mm512_cvtneps_pbh(v1);
            __m256bh l0 = _mm512_cvtneps_pbh(_mm512_sub_ps(v0, _mm512_cvtpbh_ps(h0)));
            __m256bh l1 = _mm512_cvtneps_pbh(_mm512_sub_ps(v1, _mm512_cvtpbh_ps(h1)));
            size_t at = (size_t)k * 16 + j * 2;  /* in bf16 */
            _mm512_i32scatter_epi32((uint16_t *)high + at, rows,
                                    _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)h0),
                                                       (__m256i)h1, 1), 4);
            _mm512_i32scatter_epi32((uint16_t *)low + at, rows,
                                    _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)l0),
                                                       (__m256i)l1, 1), 4);
        }
        for (int g = 0; int8 && g < cols / gs; g++)
            scales[(size_t)g * AMX_TOKENS + j] = in ? tmp->scales[g] : 0.0f;
    }
}

/* 32 q4_0 values (one block's 16 bytes of nibbles) as 32 int16 lanes, q + 8, in order. */
static inline __m512i q4_block_lanes(const uint8_t *nibbles) {
    __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)nibbles));
    __m256i low = _mm256_and_si256(w, _mm256_set1_epi16(15)), high = _mm256_srli_epi16(w, 4);
    return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
}

/* Rows r0 .. r0+nr-1 of w (zero rows past nr, up to rows_max) as int8 or bf16 values, exact
   either way, and their scales as floats, [row][group]. */
static void amx_panel(void *panel, float *scales, const Matrix *w, int r0, int nr, int rows_max,
                      int int8) {
    int cols = w->cols, n_groups = cols / w->group_size;
    size_t n = (size_t)nr * cols, bytes = int8 ? 1 : 2;
    if (w->type == WEIGHT_Q4_0) {
        const uint8_t *nibbles = (const uint8_t *)w->data + (size_t)r0 * cols / 2;
        uint16_t bf16_of[32];  /* q + 8 -> bf16 of q, as a lane table */
        for (int q = 0; q < 32; q++) bf16_of[q] = round_to_bf16((float)(q % 16 - 8));
        __m512i table = _mm512_loadu_si512((const void *)bf16_of);
        for (size_t i = 0; i < n; i += 32) {
            __m512i lanes = q4_block_lanes(nibbles + i / 2);
            if (int8)
                _mm256_storeu_si256((__m256i *)((int8_t *)panel + i), _mm512_cvtepi16_epi8(
                                        _mm512_sub_epi16(lanes, _mm512_set1_epi16(8))));
            else
                _mm512_storeu_si512((uint16_t *)panel + i, _mm512_permutexvar_epi16(lanes, table));
        }
    } else {
        const int8_t *q = (const int8_t *)w->data + (size_t)r0 * cols;
        if (int8) memcpy(panel, q, n);
        for (size_t i = 0; !int8 && i < n; i += 16)  /* cols is a multiple of 32 */
            _mm256_storeu_si256((__m256i *)((uint16_t *)panel + i), (__m256i)_mm512_cvtneps_pbh(
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + i)))
                )));
    }
    memset((char *)panel + n * bytes, 0, ((size_t)rows_max * cols - n) * bytes);
    for (size_t g = 0; g < (size_t)rows_max * n_groups; g++) {
        size_t at = (size_t)r0 * n_groups + g;
        scales[g] = g >= (size_t)nr * n_groups ? 0.0f
            : w->type == WEIGHT_Q4_0 ? fp16_to_float(w->fp16_scales[at]) : w->scales[at];
    }
}

/* One row tile's product with a one-step group's activations in tiles 2 (and 3), in tile
   set (sums C, weights A), stored to sums: 16 rows x 16 tokens, floats from bf16 (both
   planes' products) or int32 from int8. */
#define AMX_ROW_TILE(C, A)           \
    do {                             \
        _tile_loadd(A, w, w_stride); \
        _tile_zero(C);               \
        if (int8) {                  \
            _tile_dpbssd(C, A, 2);   \
        } else {                     \
            _tile_dpbf16ps(C, A, 2); \
            _tile_dpbf16ps(C, A, 3); \
        }                            \
        _tile_stored(C, sums, 64);   \
    } while (0)

static void amx_row_tile(int set, void *sums, const void *w, size_t w_stride, int int8) {
    if (set == 0) AMX_ROW_TILE(0, 1);
    else if (set == 1) AMX_ROW_TILE(4, 5);
    else AMX_ROW_TILE(6, 7);
}

/* The same for a group of several steps, in tile set (sums C, weights A, activations B and
   B2), the activations loaded step by step, so that the sums stay in their tile for the
   whole group. w and x (high, low) point at the group's first value. */
#define AMX_GROUP_TILE(C, A, B, B2)                                                   \
    do {                                                                              \
        _tile_zero(C);                                                                \
        for (int s = 0; s < steps; s++) {                                             \
            size_t k = (size_t)s * step * bytes;                                      \
            _tile_loadd(B, (const char *)high + k * AMX_TOKENS, 64);                  \
            if (!int8) _tile_loadd(B2, (const char *)low + k * AMX_TOKENS, 64);       \
            _tile_loadd(A, (const char *)w + k, w_stride);                            \
            if (int8) {                                                               \
                _tile_dpbssd(C, A, B);                                                \
            } else {                                                                  \
                _tile_dpbf16ps(C, A, B);                                              \
                _tile_dpbf16ps(C, A, B2);                                             \
            }                                                                         \
        }                                                                             \
        _tile_stored(C, sums, 64);                                                    \
    } while (0)

static void amx_group_tile(int set, void *sums, const void *w, size_t w_stride,
                           const void *high, const void *low, int steps, int step, int int8) {
    int bytes = int8 ? 1 : 2;
    if (set == 0) AMX_GROUP_TILE(0, 1, 2, 3);
    else AMX_GROUP_TILE(4, 5, 6, 7);
}

/* out[t][r] for a panel of nr rows (a multiple of 16) and one pack of 16 tokens into acc[r]
   (16 tokens' lanes), group by group: every row tile's sums, then each scaled by the
   group's scales, as strip_kernel_q8 does. A one-step group's activations are loaded once
   for all row tiles. */
static void amx_panel_pack(float *acc, int32_t (*sums)[256], const void *panel,
                           const float *w_scales, const void *high, const void *low,
                           const float *x_scales, int nr, int cols, int gs, int int8) {
    int n_groups = cols / gs, step = amx_step(gs, int8), bytes = int8 ? 1 : 2;
    int steps = gs / step;
    size_t w_stride = (size_t)cols * bytes;
    for (int r = 0; r < nr; r++) _mm512_storeu_ps(acc + r * 16, _mm512_setzero_ps());
    for (int g = 0; g < n_groups; g++) {
        size_t k = (size_t)g * gs * bytes;
        const char *xh = (const char *)high + k * AMX_TOKENS;
        const char *xl = low ? (const char *)low + k * AMX_TOKENS : NULL;
        const char *w = (const char *)panel + k;
        if (steps == 1) {
            _tile_loadd(2, xh, 64);
            if (!int8) _tile_loadd(3, xl, 64);
        }
        for (int rt = 0; rt < nr / 16; rt++) {
            if (steps == 1)
                amx_row_tile(rt % 3, sums[rt], w + rt * 16 * w_stride, w_stride, int8);
            else
                amx_group_tile(rt % 2, sums[rt], w + rt * 16 * w_stride, w_stride, xh, xl,
                               steps, step, int8);
        }
        __m512 xs = int8 ? _mm512_loadu_ps(x_scales + (size_t)g * AMX_TOKENS)
                         : _mm512_set1_ps(1.0f);
        for (int r = 0; r < nr; r++) {
            const void *t = sums[r / 16] + r % 16 * 16;
            __m512 sum = int8 ? _mm512_cvtepi32_ps(_mm512_loadu_si512(t)) : _mm512_loadu_ps(t);
            __m512 scale = _mm512_mul_ps(xs, _mm512_set1_ps(w_scales[(size_t)r * n_groups + g]));
            _mm512_storeu_ps(acc + r * 16,
                             _mm512_fmadd_ps(sum, scale, _mm512_loadu_ps(acc + r * 16)));
        }
    }
}

/* Rows per panel: as many as keep a panel's values within 1 MB (it is reread for every pack
   of tokens), 16 to AMX_ROWS. */
static int amx_panel_rows(int cols, int int8) {
    int rows = (1 << 20) / (cols * (int8 ? 1 : 2)) / 16 * 16;
    return rows < 16 ? 16 : rows > AMX_ROWS ? AMX_ROWS : rows;
}

/* Like matmul_strips_q8: the threads pack the tokens, 16 at a time (into the float strips'
   buffer: up to 4 bytes per value), then take panels of rows, each widened once and met by
   every pack. */
static void matmul_tiles(float *out, const float *x, int n_tokens, const Matrix *w,
                         MatmulScratch *s) {
    int rows = w->rows, cols = w->cols, gs = w->group_size;
    int int8 = fast_int8(w, s) || fast_q4(w, s), step = amx_step(gs, int8);
    int n_packs = (n_tokens + AMX_TOKENS - 1) / AMX_TOKENS, panel_rows = amx_panel_rows(cols, int8);
    int n_panels = (rows + panel_rows - 1) / panel_rows;
    size_t pack_bytes = (size_t)AMX_TOKENS * cols * 4, pack_scales = (size_t)AMX_TOKENS * cols / 32;
    struct SimdScratch *f = s->simd;
    OMP(parallel)
    {
        int id = thread_id();
        OMP(for schedule(static))
        for (int i = 0; i < n_packs; i++) {
            char *high = (char *)f->strips + (size_t)i * pack_bytes;
            amx_pack_tokens(high, int8 ? NULL : high + pack_bytes / 2,
                            f->strip_scales + (size_t)i * pack_scales, x, i * AMX_TOKENS,
                            n_tokens, cols, gs, int8, &f->token_q[id]);
        }
        void *panel = f->amx_panels + (size_t)id * AMX_ROWS * 2 * (size_t)s->max_cols;
        float *scales = f->amx_scales + (size_t)id * AMX_ROWS * (s->max_cols / 32);
        float acc[AMX_ROWS * AMX_TOKENS];
        int32_t sums[AMX_ROWS / 16][256];
        amx_configure(step, int8, gs / step);
        OMP(for schedule(static))
        for (int p = 0; p < n_panels; p++) {
            int r0 = p * panel_rows, nr = rows - r0 < panel_rows ? rows - r0 : panel_rows;
            int nr16 = (nr + 15) / 16 * 16;
            amx_panel(panel, scales, w, r0, nr, nr16, int8);
            for (int i = 0; i < n_packs; i++) {
                const char *high = (const char *)f->strips + (size_t)i * pack_bytes;
                amx_panel_pack(acc, sums, panel, scales, high, int8 ? NULL : high + pack_bytes / 2,
                               f->strip_scales + (size_t)i * pack_scales, nr16, cols, gs, int8);
                int t0 = i * AMX_TOKENS;
                int nt = n_tokens - t0 < AMX_TOKENS ? n_tokens - t0 : AMX_TOKENS;
                for (int t = 0; t < nt; t++)
                    for (int r = 0; r < nr; r++)
                        out[(size_t)(t0 + t) * rows + r0 + r] = acc[r * AMX_TOKENS + t];
            }
        }
        _tile_release();
    }
}
#endif

/* Hook (matmul): the prompt path, matmul_tiles for q8_0 and q4_0 with AMX,
   matmul_strips_q8 with VNNI, matmul_strips otherwise. */
static int simd_matmul_batch(float *out, const float *x, int n_tokens, const Matrix *w,
                             MatmulScratch *s) {
#if HAS_AMX
    if (amx_applies(w, s)) {
        matmul_tiles(out, x, n_tokens, w, s);
        return 1;
    }
#endif
#if HAS_VNNI
    if (q8_strips_apply(w)) {
        matmul_strips_q8(out, x, n_tokens, w, s);
        return 1;
    }
#endif
    matmul_strips(out, x, n_tokens, w, s);
    return 1;
}

/* e^x for 16 floats, within 2 ulp of expf (tests/test_kernels.c checks): x = n ln2 + r with
   |r| <= ln2/2 (ln2 in two parts, so r is exact), e^r by its Taylor series to r^7 (the rest is
   below 1e-8 of it), times 2^n by vscalefps, which gives inf past the top of the float range
   and 0 past the bottom. At a long context attention takes billions of these. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    const float inverse_factorials[] = { 1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24,
                                         1.0f / 6, 0.5f, 1.0f, 1.0f };
    __m512 p = _mm512_set1_ps(inverse_factorials[0]);
    for (int k = 1; k < 8; k++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(inverse_factorials[k]));
    return _mm512_scalef_ps(p, n);
}

/* Hook (softmax): the same three passes, 16 lanes at a time, with exp16. */
static int simd_softmax(float *x, int n) {
    __m512 vmax = _mm512_set1_ps(x[0]), vsum = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16)
        vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(vmax, lanes_before(i, n), x + i));
    __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = lanes_before(i, n);
        __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), max));
        _mm512_mask_storeu_ps(x + i, m, e);
        vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(m, e));
    }
    __m512 sum = _mm512_set1_ps(_mm512_reduce_add_ps(vsum));
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = lanes_before(i, n);
        _mm512_mask_storeu_ps(x + i, m, _mm512_div_ps(_mm512_maskz_loadu_ps(m, x + i), sum));
    }
    return 1;
}

/* Hook (swiglu): one row, 16 lanes at a time, with exp16. */
static int simd_swiglu(float *g, const float *u, int width) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int i = 0; i < width; i += 16) {
        __mmask16 m = lanes_before(i, width);
        __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
        __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(one, e));
        _mm512_mask_storeu_ps(g + i, m, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(m, u + i)));
    }
    return 1;
}

/* ---- Attention: section 3's scores and weighted sums in registers ----------------------
   The same passes as section 3 (attention_rows), with its two inner loops as register tiles:
   - scores: per dimension, two key tiles (32 positions) are loaded, widened, and meet a
     broadcast of each row's query value: 2 * tile_rows multiply-adds per 2 loads, no
     horizontal sums;
   - values: tile_rows rows by 64 / tile_rows dimensions of accumulators, one position's values
     loaded once for every row's weight.
   bf16 and q8_0 caches are widened 16 numbers at a time in registers as they are loaded
   (widen16), and the next keys and values are fetched ahead (prefetch_bytes): one thread's
   loads alone do not keep enough of a long cache in flight. Each score and output value is
   still one float32 sum in order. The tile's row count is a constant, 4 or ATT_TILE_ROWS
   (decoding has 4 rows per KV head at the 1B shape; prompt passes 16), and so is the cache
   type, so that each kernel is compiled once per case. */
#define SCORE_TILES 2    /* key tiles per step of the score kernel */
_Static_assert(CACHE_STEP % (SCORE_TILES * KEY_TILE) == 0, "the cache holds whole steps");

/* 16 consecutive cache elements from element i, widened to float32: bf16 by a shift, q8_0
   as int8 -> float32 times its scales (16 of them for keys, one broadcast for values). */
static inline __m512 widen16(const void *data, size_t i, int type, __m512 scales) {
    if (type == CACHE_BF16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)data + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    if (type == CACHE_Q8_0) {
        __m128i b = _mm_loadu_si128((const __m128i *)((const int8_t *)data + i));
        return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), scales);
    }
    return _mm512_loadu_ps((const float *)data + i);
}

/* The scales of dimension d's 16 keys from key tile `tile` (q8_0; zeros otherwise). */
static inline __m512 key_scales16(const KVHead *kv, int tile, int d, int head_dim, int type) {
    if (type != CACHE_Q8_0) return _mm512_setzero_ps();
    return _mm512_loadu_ps(kv->key_scales + key_index(tile * KEY_TILE, d / CACHE_GROUP,
                                                      head_dim / CACHE_GROUP));
}

/* scores[r][p] = scale * dot(rows[r], key p) for the SCORE_TILES * KEY_TILE positions from
   key tile `tile` on, rows r < nr <= tile_rows. With `ahead`, the next pair of key tiles is
   fetched meanwhile. */
static inline void score_tiles(float *const *scores, const float *const *rows, int nr,
                               const KVHead *kv, int tile, int head_dim, float scale,
                               int tile_rows, int type, int ahead) {
    __m512 acc[ATT_TILE_ROWS][SCORE_TILES];
    size_t size = CACHE_TYPE_SIZES[type];
    const char *next = (const char *)kv->keys +
                       key_index((tile + SCORE_TILES) * KEY_TILE, 0, head_dim) * size;
    for (int r = 0; r < tile_rows; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int d = 0; d < head_dim; d++) {
        if (ahead) {  /* dimension d of the next two tiles */
            prefetch_bytes(next + (size_t)d * KEY_TILE * size, KEY_TILE * size);
            prefetch_bytes(next + (size_t)(head_dim + d) * KEY_TILE * size, KEY_TILE * size);
        }
        __m512 k0 = widen16(kv->keys, key_index(tile * KEY_TILE, d, head_dim), type,
                            key_scales16(kv, tile, d, head_dim, type));
        __m512 k1 = widen16(kv->keys, key_index((tile + 1) * KEY_TILE, d, head_dim), type,
                            key_scales16(kv, tile + 1, d, head_dim, type));
        for (int r = 0; r < tile_rows; r++) {
            __m512 q = _mm512_set1_ps(rows[r][d]);
            acc[r][0] = _mm512_fmadd_ps(q, k0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(q, k1, acc[r][1]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < SCORE_TILES; j++)
            _mm512_storeu_ps(scores[r] + (size_t)(tile + j) * KEY_TILE,
                             _mm512_mul_ps(acc[r][j], _mm512_set1_ps(scale)));
}

/* The scores for one (constant) cache type: the row tiles take turns on each pair of key
   tiles, which stays in L1 meanwhile. */
static inline void scores_of_type(float *const *scores, const float *const *rows, int nr,
                                  const KVHead *kv, int n_pos, int head_dim, float scale,
                                  int type) {
    for (int i = 0; i * KEY_TILE < n_pos; i += SCORE_TILES) {
        int ahead = (i + SCORE_TILES) * KEY_TILE < n_pos;  /* (the next pair is in use) */
        for (int g = 0; g < nr; g += ATT_TILE_ROWS) {
            if (nr - g <= 4)
                score_tiles(scores + g, rows + g, nr - g, kv, i, head_dim, scale, 4, type,
                            ahead && g == 0);
            else
                score_tiles(scores + g, rows + g,
                            nr - g < ATT_TILE_ROWS ? nr - g : ATT_TILE_ROWS, kv, i, head_dim,
                            scale, ATT_TILE_ROWS, type, ahead && g == 0);
        }
    }
}

/* Hook (attention_scores): rows past nr in the last row tile repeat row 0, so that the tiles
   stay fixed. */
static int simd_attention_scores(float *const *scores, const float *const *q, int nr,
                                 const KVHead *kv, int n_pos, int head_dim, float scale) {
    const float *rows[ATT_ROWS];
    for (int r = 0; r < ATT_ROWS; r++) rows[r] = q[r < nr ? r : 0];
    switch (kv->type) {
    case CACHE_F32:
        scores_of_type(scores, rows, nr, kv, n_pos, head_dim, scale, CACHE_F32);
        break;
    case CACHE_BF16:
        scores_of_type(scores, rows, nr, kv, n_pos, head_dim, scale, CACHE_BF16);
        break;
    default:
        scores_of_type(scores, rows, nr, kv, n_pos, head_dim, scale, CACHE_Q8_0);
        break;
    }
    return 1;
}

/* out[r] += sum over positions p in [p0, p1) of weights[r][p] * value p, for rows
   r < nr <= tile_rows and the dimensions of whole steps of 64 / tile_rows * 4 (decoding's 4
   rows take 64, so that each position's values are read in one pass). Returns the dimensions
   done; section 3 sums the rest. */
static inline int sum_values(float *const *out, const float *const *weights, int nr,
                             const KVHead *kv, int p0, int p1, int head_dim, int tile_rows,
                             int type) {
    int vectors = 16 / tile_rows, width = 16 * vectors, d0 = 0;
    const float *w[ATT_TILE_ROWS];
    for (int r = 0; r < tile_rows; r++) w[r] = weights[r < nr ? r : 0];
    for (; d0 + width <= head_dim; d0 += width) {
        __m512 acc[ATT_TILE_ROWS][4];
        for (int r = 0; r < tile_rows; r++)
            for (int j = 0; j < vectors; j++)
                acc[r][j] = _mm512_loadu_ps(out[r < nr ? r : 0] + d0 + 16 * j);
        for (int p = p0; p < p1; p++) {
            size_t i = (size_t)p * head_dim + d0;
            if (p + VALUES_AHEAD < p1)
                prefetch_bytes((const char *)kv->values +
                               (i + (size_t)VALUES_AHEAD * head_dim) * CACHE_TYPE_SIZES[type],
                               (size_t)width * CACHE_TYPE_SIZES[type]);
            __m512 vv[4];
            for (int j = 0; j < vectors; j++) {
                size_t at = i + 16 * (size_t)j;
                __m512 scale = type == CACHE_Q8_0 ?
                    _mm512_set1_ps(kv->value_scales[at / CACHE_GROUP]) : _mm512_setzero_ps();
                vv[j] = widen16(kv->values, at, type, scale);
            }
            for (int r = 0; r < tile_rows; r++) {
                __m512 wr = _mm512_set1_ps(w[r][p]);
                for (int j = 0; j < vectors; j++) acc[r][j] = _mm512_fmadd_ps(wr, vv[j], acc[r][j]);
            }
        }
        for (int r = 0; r < nr && r < tile_rows; r++)  /* (nr <= tile_rows: for gcc) */
            for (int j = 0; j < vectors; j++) _mm512_storeu_ps(out[r] + d0 + 16 * j, acc[r][j]);
    }
    return d0;
}

/* sum_values for one (constant) cache type, the tile fitting nr. */
static inline int values_of_type(float *const *out, const float *const *weights, int nr,
                                 const KVHead *kv, int p0, int p1, int head_dim, int type) {
    if (nr <= 4) return sum_values(out, weights, nr, kv, p0, p1, head_dim, 4, type);
    return sum_values(out, weights, nr, kv, p0, p1, head_dim, ATT_TILE_ROWS, type);
}

/* Hook (attention_values): returns the dimensions it summed. */
static int simd_attention_values(float *const *out, const float *const *weights, int nr,
                                 const KVHead *kv, int p0, int p1, int head_dim) {
    switch (kv->type) {
    case CACHE_F32: return values_of_type(out, weights, nr, kv, p0, p1, head_dim, CACHE_F32);
    case CACHE_BF16: return values_of_type(out, weights, nr, kv, p0, p1, head_dim, CACHE_BF16);
    default: return values_of_type(out, weights, nr, kv, p0, p1, head_dim, CACHE_Q8_0);
    }
}

/* Hook (--version, the model line): the kernels this build holds. */
static const char *simd_kernels(void) {
    return "avx512" HAS_VNNI_NAME HAS_AVX512_BF16_NAME HAS_AMX_NAME;
}

#endif  /* __AVX512F__ */

/* ---- 8b. AVX2 (with FMA and F16C): every hook, 8 lanes at a time ------------------------
   The x86 CPUs without AVX-512 (AMD before Zen 4, Intel's desktop and laptop chips): each
   kernel computes what its AVX-512 counterpart above computes, the same sums in the same integer or
   float32 arithmetic, with 256-bit vectors:
   - decoding: fp32 rows as four chains of 8-lane FMAs; bf16 rows widened by one shift or mask
     against x reordered once per matmul (pairs16); q8_0 groups as int8 x int16 products
     summed pairwise in int32 (vpmaddwd); q4_0 blocks unpacked by shifts and ANDs into the
     same products, the nibbles' +8 taken back once per group (as dot_q4_32 does), and with
     groups of 32 eight blocks' sums gathered into one vector before they meet their scales;
   - -a fast: q8_0 and q4_0 against int8 activations, 32 products per vpmaddubsw (as llama.cpp
     does on AVX2); bf16 has no such instruction here, so -a fast changes nothing for it.
   - attention: score tiles of 4 rows by one key tile, value sums of 4 rows by 16 dimensions
     or 8 by 8, each cache type widened in registers.
   No instruction reads past a row. */
#if defined __AVX2__ && defined __FMA__ && defined __F16C__ && !defined __AVX512F__
#include <immintrin.h>

#define HAS_AVX2 1

/* The activations as the decoding kernels read them: quantized per group as section 2's
   QuantizedVector holds them (q, scales), and the extra forms some kernels want. */
typedef struct {
    int16_t *q;         /* round(x / scale) per group */
    float *scales;      /* one per group */
    int8_t *int8;       /* -a fast: q as int8 (q_max 127) */
    float *q4_offsets;  /* q4_0: per group -8 * the sum of its q */
    int16_t *q4_pairs;  /* q4_0, groups of 32: q in the order its nibbles unpack (prepare_q4_32) */
    int8_t *q4_int8;    /* ... and -a fast's int8 q in that kernel's order */
} SimdVector;

/* The prompt path's shapes (simd_matmul_batch, below). */
#define STRIP8 16  /* tokens per strip */
#define TILE8 6    /* rows per register tile: 6 x 2 accumulators of the 16 registers */
#define PANEL8 48  /* rows per panel: 8 tiles */
#define COLS8 512  /* columns per slab: a 96 KB slab of rows and a 32 KB one of a strip */

/* Section 8's buffers and settings beside MatmulScratch's, allocated once. */
struct SimdScratch {
    int fast;           /* -a fast: q8_0 and q4_0 activations rounded to int8 */
    SimdVector xq;      /* q8_0, q4_0 decoding: the activations quantized [max_cols] */
    float *x_pairs;     /* bf16 decoding: x in pairs16 order [max_cols] */
    float *strips;      /* prompt path: the tokens transposed, [strips][max_cols][STRIP8] */
    float *slabs;       /* ... one [PANEL8][COLS8] widened slab of rows per thread */
    float *sums;        /* ... one [strips][PANEL8][STRIP8] set of running sums per thread */
    int n_strip_tokens; /* max_tokens rounded up to whole strips */
};

/* Fetches [p, p + n) ahead of its use (see DECODE_AHEAD above: the same reasons). */
#define AVX2_AHEAD 2048
static inline void prefetch_avx2(const void *p, size_t n) {
    for (size_t b = 0; b < n; b += 64) _mm_prefetch((const char *)p + b, _MM_HINT_T0);
}

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float max8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

/* The lanes of an 8-float step from i that lie before n, as a mask of whole lanes. */
static inline __m256i lanes_before8(int i, int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n - i), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* quantize_group 8 values at a time (gs a multiple of 8), bit for bit the same: a group with
   a NaN (an unordered compare) or an infinity gets the scale NaN and zeros; rounding to
   nearest even as nearbyintf, and the rest clamped to +-q_max before the conversion. */
static float quantize_group8(int16_t *q, const float *x, int gs, float q_max) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 amax = _mm256_setzero_ps(), nan = amax;
    for (int i = 0; i < gs; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        amax = _mm256_max_ps(_mm256_and_ps(v, magnitude), amax);
    }
    float scale = checked_scale(q, gs, max8(amax), !_mm256_movemask_ps(nan), q_max);
    if (isnan(scale)) return scale;
    __m256 inverse = _mm256_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
    __m256 high = _mm256_set1_ps(q_max), low = _mm256_set1_ps(-q_max);
    for (int i = 0; i < gs; i += 8) {
        __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), inverse),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm256_and_ps(r, _mm256_cmp_ps(r, r, _CMP_ORD_Q));
        __m256i v = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, low), high));
        _mm_storeu_si128((__m128i *)(q + i), _mm_packs_epi32(_mm256_castsi256_si128(v),
                                                             _mm256_extracti128_si256(v, 1)));
    }
    return scale;
}

/* quantize_vector into v, 8 lanes at a time where gs allows (the same bits). */
static void quantize_input(SimdVector *v, const float *x, int n, int gs, float q_max) {
    for (int g = 0; g < n / gs; g++) {
        int16_t *q = v->q + (size_t)g * gs;
        const float *xg = x + (size_t)g * gs;
        v->scales[g] = gs % 8 == 0 ? quantize_group8(q, xg, gs, q_max)
                                   : quantize_group(q, xg, gs, q_max);
    }
}

/* dot_fp32, four chains of 8 lanes */
static float dot_fp32_avx2(const float *w, const float *x, int n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        prefetch_avx2(w + i + AVX2_AHEAD / 4, 128);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8)
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    float sum = sum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++) sum += w[i] * x[i];
    return sum;
}

/* bf16 rows: as split_pairs above, with a period of 16: x_pairs lists each 16 values' even
   ones, then their odd ones, so that one 256-bit load of 16 weights meets them as 8 floats
   from a shift (the even weights) and 8 from a mask (the odd ones). */
static void pairs16(float *x_pairs, const float *x, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 8; j++) {
            x_pairs[i + j] = x[i + 2 * j];
            x_pairs[i + 8 + j] = x[i + 2 * j + 1];
        }
    for (; i < n; i++) x_pairs[i] = x[i];
}

static float dot_bf16_avx2(const uint16_t *w, const float *x_pairs, int n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    int i = 0;
    for (; i + 32 <= n; i += 32) {  /* (no prefetch: the hardware's alone decodes faster) */
        __m256i p0 = _mm256_loadu_si256((const __m256i *)(w + i));
        __m256i p1 = _mm256_loadu_si256((const __m256i *)(w + i + 16));
        a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(p0, 16)),
                             _mm256_loadu_ps(x_pairs + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(p0, high)),
                             _mm256_loadu_ps(x_pairs + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(p1, 16)),
                             _mm256_loadu_ps(x_pairs + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(p1, high)),
                             _mm256_loadu_ps(x_pairs + i + 24), a3);
    }
    for (; i + 16 <= n; i += 16) {
        __m256i p = _mm256_loadu_si256((const __m256i *)(w + i));
        a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(p, 16)),
                             _mm256_loadu_ps(x_pairs + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(p, high)),
                             _mm256_loadu_ps(x_pairs + i + 8), a1);
    }
    float sum = sum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++) sum += bf16_to_float(w[i]) * x_pairs[i];
    return sum;
}

/* Whether the integer kernels below take a q8_0 or q4_0 matrix: whole steps (16 values for
   q8_0, a 32-value block for q4_0) per group, and groups small enough for int32 lanes (a lane
   takes gs / 8 products of at most 127 * 32767). */
static int int_kernel_applies(const Matrix *w) {
    int gs = w->group_size;
    if (w->type == WEIGHT_Q8_0) return gs % 16 == 0 && gs <= 4096;
    return w->type == WEIGHT_Q4_0 && gs % 32 == 0 && gs <= 4096;
}

/* Whether -a fast's int8 activations apply: groups of whole 32-byte steps. */
static int int8_applies(const Matrix *w, const MatmulScratch *s) {
    return s->simd->fast && int_kernel_applies(w) && w->group_size % 32 == 0;
}

/* The scale products w_scale * x_scale of groups g0 .. g0+n-1 of a row (row_group: its first
   group), q4_0's fp16 scales widened by F16C, and for q4_0 their offsets (SimdVector's
   q4_offsets); lanes n..7 zero. */
static inline void window_scales(__m256 *scales, __m256 *offsets, const Matrix *w,
                                 size_t row_group, const SimdVector *x, int g0, int n) {
    int q4 = w->type == WEIGHT_Q4_0;
    if (n == 8) {
        __m256 ws = q4 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w->fp16_scales +
                                                                             row_group + g0)))
                       : _mm256_loadu_ps(w->scales + row_group + g0);
        *scales = _mm256_mul_ps(ws, _mm256_loadu_ps(x->scales + g0));
        *offsets = q4 ? _mm256_loadu_ps(x->q4_offsets + g0) : _mm256_setzero_ps();
        return;
    }
    float s[8] = {0}, o[8] = {0};  /* a row's last few groups */
    for (int j = 0; j < n; j++) {
        size_t g = row_group + (size_t)(g0 + j);
        s[j] = (q4 ? fp16_to_float(w->fp16_scales[g]) : w->scales[g]) * x->scales[g0 + j];
        o[j] = q4 ? x->q4_offsets[g0 + j] : 0.0f;
    }
    *scales = _mm256_loadu_ps(s);
    *offsets = _mm256_loadu_ps(o);
}

/* One group's integer products in 8 int32 lanes: q8_0 (int8 w, widened) or q4_0 (nibbles:
   the block's values + 8, in order: 16 bytes widened to int16, an AND gives values 0..15 and
   a shift values 16..31) against int16 x, summed pairwise (vpmaddwd); or with int8 x, q8_0
   through vpmaddubsw (|w| against x with w's sign, then pairs of int16 summed into int32) and
   q4_0's nibbles as its unsigned side directly. */
SPECIALISED __m256i group_sum(const char *wg, const int16_t *xq, const int8_t *x8, int gs,
                            int q4, int int8) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i isum = _mm256_setzero_si256();
    for (int i = 0; i < gs; i += int8 || q4 ? 32 : 16) {
        __m256i p;
        if (q4 && int8) {
            __m128i v = _mm_loadu_si128((const __m128i *)(wg + i / 2));
            __m256i nibbles = _mm256_and_si256(
                _mm256_inserti128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 4), 1),
                _mm256_set1_epi8(15));
            p = _mm256_madd_epi16(_mm256_maddubs_epi16(
                    nibbles, _mm256_loadu_si256((const __m256i *)(x8 + i))), ones);
        } else if (int8) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(wg + i));
            __m256i xv = _mm256_loadu_si256((const __m256i *)(x8 + i));
            p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv),
                                                       _mm256_sign_epi8(xv, wv)), ones);
        } else if (q4) {
            __m256i w16 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(wg + i / 2)));
            p = _mm256_add_epi32(
                _mm256_madd_epi16(_mm256_and_si256(w16, _mm256_set1_epi16(15)),
                                  _mm256_loadu_si256((const __m256i *)(xq + i))),
                _mm256_madd_epi16(_mm256_srli_epi16(w16, 4),
                                  _mm256_loadu_si256((const __m256i *)(xq + i + 16))));
        } else {
            __m256i w16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wg + i)));
            p = _mm256_madd_epi16(w16, _mm256_loadu_si256((const __m256i *)(xq + i)));
        }
        isum = _mm256_add_epi32(isum, p);
    }
    return isum;
}

/* One q8_0 or q4_0 row against x as simd_prepare_input left it, 8 groups per window: the
   window's 8 scale products formed at once, and each group's sum (group_sum) times its own,
   picked from them by a permute; for q4_0 the nibbles' +8 comes back as the groups' offsets
   (-8 * the sum of their x) times the same products. Inlined with constant gs, q4 and int8,
   the group loop unrolls. */
SPECIALISED float dot_groups_avx2(const Matrix *w, int r, const SimdVector *x, int gs,
                                int q4, int int8) {
    int n_groups = w->cols / gs;
    size_t row_group = (size_t)r * n_groups, group_bytes = q4 ? (size_t)gs / 2 : (size_t)gs;
    const char *row = (const char *)w->data + row_group * group_bytes;
    __m256 acc = _mm256_setzero_ps(), offsets = acc;
    for (int g0 = 0; g0 < n_groups; g0 += 8) {
        int n = n_groups - g0 < 8 ? n_groups - g0 : 8;
        __m256 scales, group_offsets;
        window_scales(&scales, &group_offsets, w, row_group, x, g0, n);
        offsets = _mm256_fmadd_ps(scales, group_offsets, offsets);
        prefetch_avx2(row + (size_t)g0 * group_bytes + AVX2_AHEAD, 8 * group_bytes);
        for (int j = 0; j < 8; j++) {
            size_t g = (size_t)(j < n ? g0 + j : g0);  /* past n: group g0 again, scaled by 0 */
            __m256i sum = group_sum(row + g * group_bytes, x->q + g * gs, x->int8 + g * gs, gs,
                                    q4, int8);
            __m256 scale = _mm256_permutevar8x32_ps(scales, _mm256_set1_epi32(j));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, acc);
        }
    }
    return sum8(_mm256_add_ps(acc, offsets));
}

/* v->q in the order dot_q4_32_avx2 reads it, per 64 values (a step: two blocks, zeros past
   n). Exact: as prepare_q4 above with 16 words per step, p[nibble * 16 + word] meeting nibble
   `nibble` of the step's 16-bit word `word`. -a fast: the two blocks' values 0..15, then their
   values 16..31, as int8. */
static void prepare_q4_32(SimdVector *v, int n, int int8) {
    for (int i = 0; i < n; i += 64)
        for (int k = 0; k < 64; k++) {
            int at, nibble = k / 16, word = k % 16, byte = 2 * word + nibble / 2;
            if (int8) at = i + k % 32 / 16 * 32 + k % 16 + k / 32 * 16;
            else at = i + byte / 16 * 32 + byte % 16 + nibble % 2 * 16;
            if (int8) v->q4_int8[i + k] = at < n ? (int8_t)v->q[at] : 0;
            else v->q4_pairs[i + k] = at < n ? v->q[at] : 0;
        }
}

/* The products of one step's 64 nibbles (32 bytes: two blocks) with x in prepare_q4_32's order,
   int32 lanes 0..3 holding four of the first block's and lanes 4..7 four of the second's.
   Exact: each 16-bit word's four nibbles come out with a shift and an AND, as int16 against
   int16 x (vpmaddwd). -a fast: the low and the high nibbles as unsigned bytes against int8 x
   (vpmaddubsw; four products of at most 15 * 127 fit an int16 lane), widened by one vpmaddwd. */
static inline __m256i nibble_step(const uint8_t *w, const SimdVector *x, int i, int int8) {
    __m256i words = _mm256_loadu_si256((const __m256i *)w);
    if (int8) {
        const __m256i mask = _mm256_set1_epi8(15);
        const int8_t *xi = x->q4_int8 + i;
        __m256i low = _mm256_and_si256(words, mask);
        __m256i high = _mm256_and_si256(_mm256_srli_epi16(words, 4), mask);
        __m256i p = _mm256_add_epi16(
            _mm256_maddubs_epi16(low, _mm256_loadu_si256((const __m256i *)xi)),
            _mm256_maddubs_epi16(high, _mm256_loadu_si256((const __m256i *)(xi + 32))));
        return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
    }
    const __m256i mask = _mm256_set1_epi16(15);
    const int16_t *xp = x->q4_pairs + i;
    __m256i a = _mm256_madd_epi16(_mm256_and_si256(words, mask),
                                  _mm256_loadu_si256((const __m256i *)xp));
    __m256i b = _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi16(words, 4), mask),
                                  _mm256_loadu_si256((const __m256i *)(xp + 16)));
    __m256i c = _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi16(words, 8), mask),
                                  _mm256_loadu_si256((const __m256i *)(xp + 32)));
    __m256i d = _mm256_madd_epi16(_mm256_srli_epi16(words, 12),
                                  _mm256_loadu_si256((const __m256i *)(xp + 48)));
    return _mm256_add_epi32(_mm256_add_epi32(a, b), _mm256_add_epi32(c, d));
}

/* One q4_0 row with groups of 32 (export.py's default), 8 blocks per window in four steps of
   two. Two rounds of vphaddd leave each block's sum in one lane, in the order
   [0 2 4 6 | 1 3 5 7], so that a window takes one conversion and one multiply-add with its 8
   scale products, permuted to match. A last window's missing blocks are zeros. */
SPECIALISED float dot_q4_32_avx2(const Matrix *w, int r, const SimdVector *x, int int8) {
    int n_groups = w->cols / 32;
    size_t row_group = (size_t)r * n_groups;
    const uint8_t *row = (const uint8_t *)w->data + row_group * 16;
    const __m256i order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    __m256 acc = _mm256_setzero_ps(), offsets = acc;
    uint8_t last[128];
    for (int g0 = 0; g0 < n_groups; g0 += 8) {
        const uint8_t *wg = row + (size_t)g0 * 16;
        int ng = n_groups - g0 < 8 ? n_groups - g0 : 8;
        __m256 scales, group_offsets;
        window_scales(&scales, &group_offsets, w, row_group, x, g0, ng);
        prefetch_avx2(wg + AVX2_AHEAD, 128);
        if (ng < 8) {  /* the last few blocks, copied beside zeros */
            memset(last, 0, sizeof last);
            memcpy(last, wg, (size_t)ng * 16);
            wg = last;
        }
        offsets = _mm256_fmadd_ps(scales, group_offsets, offsets);
        __m256i steps[4];
        for (int k = 0; k < 4; k++)
            steps[k] = 2 * k < ng ? nibble_step(wg + 32 * k, x, (g0 + 2 * k) * 32, int8)
                                  : _mm256_setzero_si256();
        __m256i blocks = _mm256_hadd_epi32(_mm256_hadd_epi32(steps[0], steps[1]),
                                           _mm256_hadd_epi32(steps[2], steps[3]));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(blocks), _mm256_permutevar8x32_ps(scales, order),
                              acc);
    }
    return sum8(_mm256_add_ps(acc, offsets));
}

static void simd_alloc_scratch(MatmulScratch *s) {
    struct SimdScratch *f = checked_calloc(1, sizeof *f, "matmul scratch");
    size_t steps = ((size_t)s->max_cols + 63) / 64 * 64;  /* q4_0's whole steps of 64 */
    f->xq.q4_pairs = calloc_aligned(steps, sizeof(int16_t), "matmul scratch");
    f->xq.q4_int8 = calloc_aligned(steps, sizeof(int8_t), "matmul scratch");
    f->x_pairs = calloc_aligned((size_t)s->max_cols, sizeof(float), "matmul scratch");
    f->n_strip_tokens = (s->max_tokens + STRIP8 - 1) / STRIP8 * STRIP8;
    f->strips = calloc_aligned((size_t)f->n_strip_tokens * (size_t)s->max_cols, sizeof(float),
                               "matmul scratch");
    f->slabs = calloc_aligned((size_t)s->n_threads * PANEL8 * COLS8, sizeof(float),
                              "matmul scratch");
    f->sums = calloc_aligned((size_t)s->n_threads * PANEL8 * (size_t)f->n_strip_tokens,
                             sizeof(float), "matmul scratch");
    f->xq.q = calloc_aligned((size_t)s->max_cols, sizeof(int16_t), "matmul scratch");
    f->xq.scales = calloc_aligned((size_t)s->max_cols, sizeof(float), "matmul scratch");
    f->xq.int8 = calloc_aligned((size_t)s->max_cols, sizeof(int8_t), "matmul scratch");
    f->xq.q4_offsets = calloc_aligned((size_t)s->max_cols, sizeof(float), "matmul scratch");
    s->simd = f;
}

static void simd_free_scratch(MatmulScratch *s) {
    struct SimdScratch *f = s->simd;
    if (!f) return;
    void *buffers[] = { f->x_pairs, f->strips, f->slabs, f->sums, f->xq.q, f->xq.scales,
                        f->xq.int8, f->xq.q4_offsets, f->xq.q4_pairs, f->xq.q4_int8 };
    for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++) free_aligned(buffers[i]);
    free(f);
}

/* Hook (main): -a fast from now on; whether it changes weights of this type and group size. */
static int simd_set_fast(MatmulScratch *s, int weight_type, int group_size) {
    s->simd->fast = 1;
    Matrix w = { .type = weight_type, .group_size = group_size };
    return int8_applies(&w, s);
}

/* Hook (matmul_vector): x in the form the rows read: for bf16 in pairs16 order; for q8_0 and
   q4_0 quantized per group (int16, or with -a fast int8), with q4_0's offsets. */
static int simd_prepare_input(const Matrix *w, const float *x, MatmulScratch *s) {
    SimdVector *v = &s->simd->xq;
    if (w->type == WEIGHT_BF16) {
        pairs16(s->simd->x_pairs, x, w->cols);
        return 1;
    }
    if (!int_kernel_applies(w)) return 0;
    int int8 = int8_applies(w, s), gs = w->group_size;
    quantize_input(v, x, w->cols, gs, int8 ? Q8_MAX : Q16_MAX);
    for (int i = 0; int8 && i < w->cols; i++) v->int8[i] = (int8_t)v->q[i];
    for (int g = 0; w->type == WEIGHT_Q4_0 && g < w->cols / gs; g++) {
        int32_t sum = 0;
        for (int i = g * gs; i < (g + 1) * gs; i++) sum += v->q[i];
        v->q4_offsets[g] = (float)(-8 * sum);
    }
    if (w->type == WEIGHT_Q4_0 && gs == 32) prepare_q4_32(v, w->cols, int8);
    return 1;
}

/* Hook (matmul_vector, inside its parallel region): the rows split over the threads as
   matmul_vector splits them, the common group sizes as constants (export.py's defaults: 64
   for q8_0, 32 for q4_0). */
static int simd_matmul_rows(float *out, const Matrix *w, const float *x, MatmulScratch *s) {
    int quantized = w->type == WEIGHT_Q8_0 || w->type == WEIGHT_Q4_0;
    if (quantized && !int_kernel_applies(w)) return 0;
    int int8 = int8_applies(w, s), gs = w->group_size, q4 = w->type == WEIGHT_Q4_0;
    const SimdVector *xq = &s->simd->xq;
    size_t cols = (size_t)w->cols;
    OMP(for schedule(guided) nowait)
    for (int r = 0; r < w->rows; r++) {
        if (w->type == WEIGHT_FP32)
            out[r] = dot_fp32_avx2((const float *)w->data + r * cols, x, w->cols);
        else if (w->type == WEIGHT_BF16)
            out[r] = dot_bf16_avx2((const uint16_t *)w->data + r * cols, s->simd->x_pairs,
                                   w->cols);
        else if (q4 && gs == 32)
            out[r] = int8 ? dot_q4_32_avx2(w, r, xq, 1) : dot_q4_32_avx2(w, r, xq, 0);
        else if (q4)
            out[r] = int8 ? dot_groups_avx2(w, r, xq, gs, 1, 1)
                          : dot_groups_avx2(w, r, xq, gs, 1, 0);
        else if (gs == 64)
            out[r] = int8 ? dot_groups_avx2(w, r, xq, 64, 0, 1)
                          : dot_groups_avx2(w, r, xq, 64, 0, 0);
        else
            out[r] = int8 ? dot_groups_avx2(w, r, xq, gs, 0, 1)
                          : dot_groups_avx2(w, r, xq, gs, 0, 0);
    }
    return 1;
}

/* The prompt path: as matmul_strips above, in 8-lane vectors. The tokens are transposed into
   strips of STRIP8 (two vectors), rows are taken in panels of PANEL8, each walked in slabs of
   COLS8 columns (fp32 rows read in place, other types widened to float32 into the slab
   first), and a register tile of TILE8 rows by one strip makes 12 multiply-adds per 2 vector
   loads and 6 broadcasts. Each sum runs over the columns in order, parked in memory between
   blocks, exactly. */

/* strip[k][j] = x[t0 + j][k], zero past n_tokens: 16 columns at a time, a cache line of each
   token (token rows 2^k floats apart share one L1 set). */
static void pack_strip8(float *strip, const float *x, int t0, int n_tokens, int cols) {
    for (int k0 = 0; k0 < cols; k0 += 16) {
        int kn = cols - k0 < 16 ? cols - k0 : 16;
        for (int j = 0; j < STRIP8; j++) {
            const float *row = x + (size_t)(t0 + j) * cols + k0;
            for (int k = 0; k < kn; k++)
                strip[(size_t)(k0 + k) * STRIP8 + j] = t0 + j < n_tokens ? row[k] : 0.0f;
        }
    }
}

/* widen_q4_block: 32 q4_0 values (one block's 16 bytes) times their scale, in order. */
static inline void widen_q4_block_avx2(float *out, const uint8_t *nibbles, __m256 scale) {
    __m256i w16 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)nibbles));
    const __m256i eight = _mm256_set1_epi16(8);
    __m256i halves[2] = { _mm256_sub_epi16(_mm256_and_si256(w16, _mm256_set1_epi16(15)), eight),
                          _mm256_sub_epi16(_mm256_srli_epi16(w16, 4), eight) };
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < 2; j++) {
            __m128i part = j ? _mm256_extracti128_si256(halves[h], 1)
                             : _mm256_castsi256_si128(halves[h]);
            _mm256_storeu_ps(out + 16 * h + 8 * j,
                             _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(part)), scale));
        }
}

/* widen_values for n values from `start` of w (a row's columns), 8 at a time where the groups
   hold whole steps: bf16 by a shift, q8_0 through int32, q4_0 a block at a time. */
static void widen_row8(float *out, const Matrix *w, size_t start, int n) {
    int gs = w->group_size, i = 0;
    if (w->type == WEIGHT_BF16) {
        const uint16_t *src = (const uint16_t *)w->data + start;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(
                                 _mm_loadu_si128((const __m128i *)(src + i))), 16)));
    } else if (w->type == WEIGHT_Q8_0 && gs % 8 == 0 && start % 8 == 0) {
        const int8_t *src = (const int8_t *)w->data + start;
        for (; i + 8 <= n; i += 8) {
            __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(src + i)));
            __m256 scale = _mm256_broadcast_ss(w->scales + (start + (size_t)i) / (size_t)gs);
            _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_cvtepi32_ps(v), scale));
        }
    } else if (w->type == WEIGHT_Q4_0 && gs % 32 == 0 && start % 32 == 0) {
        const uint8_t *src = (const uint8_t *)w->data + start / 2;
        for (; i + 32 <= n; i += 32) {
            float scale = fp16_to_float(w->fp16_scales[(start + (size_t)i) / (size_t)gs]);
            widen_q4_block_avx2(out + i, src + i / 2, _mm256_set1_ps(scale));
        }
    }
    if (i < n) widen_values(out + i, w, start + (size_t)i, n - i);
}

/* sums[r][t] (+)= w[r][k] * strip[k][t] for TILE8 rows (row stride w_stride) and a strip's
   tokens, k = 0 .. kn-1 (from_zero: start from zero instead of sums). */
static void strip_kernel8(float *sums, const float *w, size_t w_stride, const float *strip,
                          int kn, int from_zero) {
    __m256 acc[TILE8][2];
    for (int r = 0; r < TILE8; r++)
        for (int j = 0; j < 2; j++)
            acc[r][j] = from_zero ? _mm256_setzero_ps()
                                  : _mm256_loadu_ps(sums + r * STRIP8 + 8 * j);
    for (int k = 0; k < kn; k++) {
        __m256 x0 = _mm256_loadu_ps(strip + (size_t)k * STRIP8);
        __m256 x1 = _mm256_loadu_ps(strip + (size_t)k * STRIP8 + 8);
        for (int r = 0; r < TILE8; r++) {
            __m256 wv = _mm256_broadcast_ss(w + (size_t)r * w_stride + k);
            acc[r][0] = _mm256_fmadd_ps(wv, x0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(wv, x1, acc[r][1]);
        }
    }
    for (int r = 0; r < TILE8; r++)
        for (int j = 0; j < 2; j++) _mm256_storeu_ps(sums + r * STRIP8 + 8 * j, acc[r][j]);
}

/* One slab of a panel (rows r0 .. r0+nr-1, columns k0 .. k0+kn-1) against every strip;
   rows past nr, up to whole tiles, are zeros in `slab`. */
static void strips_slab8(float *sums, float *slab, const Matrix *w, int r0, int nr, int k0,
                          int kn, const float *strips, int n_strips) {
    int cols = w->cols, n_tiles = (nr + TILE8 - 1) / TILE8;
    int in_place = w->type == WEIGHT_FP32 && nr % TILE8 == 0;
    if (!in_place) {
        for (int r = 0; r < nr; r++)
            widen_row8(slab + (size_t)r * COLS8, w, (size_t)(r0 + r) * cols + (size_t)k0, kn);
        for (int r = nr; r < n_tiles * TILE8; r++)
            memset(slab + (size_t)r * COLS8, 0, (size_t)kn * sizeof(float));
    }
    for (int i = 0; i < n_strips; i++) {
        const float *strip = strips + ((size_t)i * cols + (size_t)k0) * STRIP8;
        for (int t = 0; t < n_tiles; t++) {
            float *tile_sums = sums + ((size_t)i * PANEL8 + (size_t)t * TILE8) * STRIP8;
            if (in_place)
                strip_kernel8(tile_sums, (const float *)w->data +
                              (size_t)(r0 + t * TILE8) * cols + k0, (size_t)cols, strip, kn,
                              k0 == 0);
            else
                strip_kernel8(tile_sums, slab + (size_t)t * TILE8 * COLS8, COLS8, strip, kn,
                              k0 == 0);
        }
    }
}

/* Hook (matmul): the threads pack the tokens into strips, then take panels, each walked slab
   by slab against every strip; a panel's sums, [strip][row][token], go to out[token][row]
   after its last slab. */
static int simd_matmul_batch(float *out, const float *x, int n_tokens, const Matrix *w,
                             MatmulScratch *s) {
    int rows = w->rows, cols = w->cols, n_strips = (n_tokens + STRIP8 - 1) / STRIP8;
    int n_panels = (rows + PANEL8 - 1) / PANEL8;
    struct SimdScratch *f = s->simd;
    OMP(parallel)
    {
        OMP(for schedule(static))
        for (int i = 0; i < n_strips; i++)
            pack_strip8(f->strips + (size_t)i * STRIP8 * cols, x, i * STRIP8, n_tokens, cols);
        /* (the for's implied barrier: every strip is packed before any panel starts) */
        float *slab = f->slabs + (size_t)thread_id() * PANEL8 * COLS8;
        float *sums = f->sums + (size_t)thread_id() * PANEL8 * (size_t)f->n_strip_tokens;
        OMP(for schedule(static))
        for (int p = 0; p < n_panels; p++) {
            int r0 = p * PANEL8, nr = rows - r0 < PANEL8 ? rows - r0 : PANEL8;
            for (int k0 = 0; k0 < cols; k0 += COLS8)
                strips_slab8(sums, slab, w, r0, nr, k0, cols - k0 < COLS8 ? cols - k0 : COLS8,
                              f->strips, n_strips);
            for (int i = 0; i < n_strips; i++) {
                const float *strip_sums = sums + (size_t)i * PANEL8 * STRIP8;
                for (int t = 0; t < STRIP8 && i * STRIP8 + t < n_tokens; t++)
                    for (int r = 0; r < nr; r++)
                        out[(size_t)(i * STRIP8 + t) * rows + r0 + r] = strip_sums[r * STRIP8 + t];
            }
        }
    }
    return 1;
}

/* e^x for 8 floats, within 2 ulp of expf: exp16's steps (above), with 2^n applied as two
   exact powers of two 2^(n/2) and 2^(n - n/2), each a normal float, so that a result past the
   top of the float range becomes inf and one below the bottom rounds once into the
   subnormals or to 0, as vscalefps does. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_set1_ps(89.0f), _mm256_max_ps(_mm256_set1_ps(-104.0f), x));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    const float inverse_factorials[] = { 1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24,
                                         1.0f / 6, 0.5f, 1.0f, 1.0f };
    __m256 p = _mm256_set1_ps(inverse_factorials[0]);
    for (int k = 1; k < 8; k++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(inverse_factorials[k]));
    __m256i ni = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(ni, 1);
    const __m256i bias = _mm256_set1_epi32(127);
    __m256 a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
    __m256 b = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, a), b);
}

/* Hook (softmax): the same three passes, 8 lanes at a time, with exp8. */
static int simd_softmax(float *x, int n) {
    __m256 vmax = _mm256_set1_ps(x[0]), vsum = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) {
        __m256 m = _mm256_castsi256_ps(lanes_before8(i, n));
        __m256 v = _mm256_maskload_ps(x + i, _mm256_castps_si256(m));
        vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(vmax, v, m));
    }
    __m256 max = _mm256_set1_ps(max8(vmax));
    for (int i = 0; i < n; i += 8) {
        __m256i m = lanes_before8(i, n);
        __m256 e = exp8(_mm256_sub_ps(_mm256_maskload_ps(x + i, m), max));
        _mm256_maskstore_ps(x + i, m, e);
        vsum = _mm256_add_ps(vsum, _mm256_and_ps(e, _mm256_castsi256_ps(m)));
    }
    __m256 sum = _mm256_set1_ps(sum8(vsum));
    for (int i = 0; i < n; i += 8) {
        __m256i m = lanes_before8(i, n);
        _mm256_maskstore_ps(x + i, m, _mm256_div_ps(_mm256_maskload_ps(x + i, m), sum));
    }
    return 1;
}

/* Hook (swiglu): one row, 8 lanes at a time, with exp8. */
static int simd_swiglu(float *g, const float *u, int width) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int i = 0; i < width; i += 8) {
        __m256i m = lanes_before8(i, width);
        __m256 gv = _mm256_maskload_ps(g + i, m);
        __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(one, e));
        _mm256_maskstore_ps(g + i, m, _mm256_mul_ps(silu, _mm256_maskload_ps(u + i, m)));
    }
    return 1;
}

/* widen16 for AVX2: 8 consecutive cache elements from element i. */
static inline __m256 widen8(const void *data, size_t i, int type, __m256 scales) {
    if (type == CACHE_BF16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)data + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    if (type == CACHE_Q8_0) {
        __m128i b = _mm_loadl_epi64((const __m128i *)((const int8_t *)data + i));
        return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), scales);
    }
    return _mm256_loadu_ps((const float *)data + i);
}

/* The scales of dimension d's keys half .. half+7 of key tile `tile` (q8_0; zeros otherwise). */
static inline __m256 key_scales8(const KVHead *kv, int tile, int half, int d, int head_dim,
                                 int type) {
    if (type != CACHE_Q8_0) return _mm256_setzero_ps();
    return _mm256_loadu_ps(kv->key_scales + key_index(tile * KEY_TILE, d / CACHE_GROUP,
                                                      head_dim / CACHE_GROUP) + half);
}

/* score_tiles for AVX2: one key tile (two vectors of 8 positions) against 4 rows r0 .. r0+3
   at a time, 8 accumulators (16 registers do not hold score_tiles' whole tile). */
static inline void score_quad(float *const *scores, const float *const *rows, int r0, int nr,
                              const KVHead *kv, int tile, int head_dim, float scale, int type,
                              const char *next) {
    size_t size = CACHE_TYPE_SIZES[type];
    __m256 acc[4][2];
    for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int d = 0; d < head_dim; d++) {
        if (next) {  /* dimension d of the next two tiles */
            prefetch_avx2(next + (size_t)d * KEY_TILE * size, KEY_TILE * size);
            prefetch_avx2(next + (size_t)(head_dim + d) * KEY_TILE * size, KEY_TILE * size);
        }
        size_t i = key_index(tile * KEY_TILE, d, head_dim);
        __m256 k0 = widen8(kv->keys, i, type, key_scales8(kv, tile, 0, d, head_dim, type));
        __m256 k1 = widen8(kv->keys, i + 8, type, key_scales8(kv, tile, 8, d, head_dim, type));
        for (int r = 0; r < 4; r++) {
            __m256 q = _mm256_broadcast_ss(rows[r0 + r] + d);
            acc[r][0] = _mm256_fmadd_ps(q, k0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(q, k1, acc[r][1]);
        }
    }
    for (int r = 0; r < 4 && r0 + r < nr; r++)
        for (int j = 0; j < 2; j++)
            _mm256_storeu_ps(scores[r0 + r] + (size_t)tile * KEY_TILE + 8 * j,
                             _mm256_mul_ps(acc[r][j], _mm256_set1_ps(scale)));
}

/* Hook (attention_scores): each key tile against the rows, 4 at a time (rows past nr repeat
   row 0), for a constant cache type; the first row quad of an even tile fetches the next
   pair of tiles. */
static inline void scores8_of_type(float *const *scores, const float *const *rows, int nr,
                                   const KVHead *kv, int n_pos, int head_dim, float scale,
                                   int type) {
    for (int tile = 0; tile * KEY_TILE < n_pos; tile++) {
        const char *next = NULL;
        if (tile % 2 == 0 && (tile + 2) * KEY_TILE < n_pos)
            next = (const char *)kv->keys +
                   key_index((tile + 2) * KEY_TILE, 0, head_dim) * CACHE_TYPE_SIZES[type];
        for (int r0 = 0; r0 < nr; r0 += 4)
            score_quad(scores, rows, r0, nr, kv, tile, head_dim, scale, type,
                       r0 == 0 ? next : NULL);
    }
}

static int simd_attention_scores(float *const *scores, const float *const *q, int nr,
                                 const KVHead *kv, int n_pos, int head_dim, float scale) {
    const float *rows[ATT_ROWS];
    for (int r = 0; r < ATT_ROWS; r++) rows[r] = q[r < nr ? r : 0];
    if (kv->type == CACHE_F32)
        scores8_of_type(scores, rows, nr, kv, n_pos, head_dim, scale, CACHE_F32);
    else if (kv->type == CACHE_BF16)
        scores8_of_type(scores, rows, nr, kv, n_pos, head_dim, scale, CACHE_BF16);
    else
        scores8_of_type(scores, rows, nr, kv, n_pos, head_dim, scale, CACHE_Q8_0);
    return 1;
}

/* out[r] += sum over positions p in [p0, p1) of weights[r][p] * value p, for rows
   r < nr <= tile_rows (a constant, 4 or ATT_TILE_ROWS; the cache type too) and whole steps of
   dimensions; returns the dimensions done. 8 accumulators: 4 rows by 16 dimensions, or 8 rows
   by 8. */
static inline int sum_values8(float *const *out, const float *const *weights, int nr,
                              const KVHead *kv, int p0, int p1, int head_dim, int tile_rows,
                              int type) {
    int d0 = 0;
    /* 8 accumulators: 4 rows by 16 dimensions, or 8 rows by 8 */
    int vectors = 8 / tile_rows, width = 8 * vectors;
    const float *w[ATT_TILE_ROWS];
    for (int r = 0; r < tile_rows; r++) w[r] = weights[r < nr ? r : 0];
    for (; d0 + width <= head_dim; d0 += width) {
        __m256 acc[ATT_TILE_ROWS][2];
        for (int r = 0; r < tile_rows; r++)
            for (int j = 0; j < vectors; j++)
                acc[r][j] = _mm256_loadu_ps(out[r < nr ? r : 0] + d0 + 8 * j);
        for (int p = p0; p < p1; p++) {
            size_t i = (size_t)p * head_dim + d0;
            if (p + VALUES_AHEAD < p1)
                prefetch_avx2((const char *)kv->values +
                              (i + (size_t)VALUES_AHEAD * head_dim) * CACHE_TYPE_SIZES[type],
                              (size_t)width * CACHE_TYPE_SIZES[type]);
            __m256 vv[2];
            for (int j = 0; j < vectors; j++) {
                size_t at = i + 8 * (size_t)j;
                __m256 scale = type == CACHE_Q8_0 ?
                    _mm256_set1_ps(kv->value_scales[at / CACHE_GROUP]) : _mm256_setzero_ps();
                vv[j] = widen8(kv->values, at, type, scale);
            }
            for (int r = 0; r < tile_rows; r++) {
                __m256 wr = _mm256_broadcast_ss(w[r] + p);
                for (int j = 0; j < vectors; j++) acc[r][j] = _mm256_fmadd_ps(wr, vv[j], acc[r][j]);
            }
        }
        for (int r = 0; r < nr && r < tile_rows; r++)
            for (int j = 0; j < vectors; j++) _mm256_storeu_ps(out[r] + d0 + 8 * j, acc[r][j]);
    }
    return d0;
}

/* Hook (attention_values): the tile fitting nr, for a constant cache type. */
static int simd_attention_values(float *const *out, const float *const *weights, int nr,
                                 const KVHead *kv, int p0, int p1, int head_dim) {
    int rows = nr <= 4 ? 4 : ATT_TILE_ROWS;
    if (kv->type == CACHE_F32)
        return rows == 4 ? sum_values8(out, weights, nr, kv, p0, p1, head_dim, 4, CACHE_F32)
                         : sum_values8(out, weights, nr, kv, p0, p1, head_dim, 8, CACHE_F32);
    if (kv->type == CACHE_BF16)
        return rows == 4 ? sum_values8(out, weights, nr, kv, p0, p1, head_dim, 4, CACHE_BF16)
                         : sum_values8(out, weights, nr, kv, p0, p1, head_dim, 8, CACHE_BF16);
    return rows == 4 ? sum_values8(out, weights, nr, kv, p0, p1, head_dim, 4, CACHE_Q8_0)
                     : sum_values8(out, weights, nr, kv, p0, p1, head_dim, 8, CACHE_Q8_0);
}

/* Hook (--version, the model line): the kernels this build holds. */
static const char *simd_kernels(void) {
    return "avx2+fma";
}

#endif  /* AVX2 without AVX-512 */

/* ---- 8c. ARM NEON (AArch64) -----------------------------------------------------------------
   The same hooks for 64-bit ARM, from the baseline armv8-a NEON (128-bit vectors: 4 floats,
   8 int16, 16 int8), with the int8 dot product (sdot) where the compiler targets it
   (__ARM_FEATURE_DOTPROD, armv8.2-a+dotprod and later). No speed of these kernels has been
   measured (this project has no ARM machine); tests/test_kernels.c checks each against plain
   loops under qemu-aarch64 (make test-arm). What each one replaces:
   - decoding (simd_matmul_rows): fp32 rows as FMAs, four chains of 4 lanes; bf16 rows
     widened by one shift (a bf16 is the top half of its float32), against x in its own order;
     q8_0 groups as int8 x int16 multiply-accumulates (smlal), exact in int32 per group, then
     scaled, like dot_q8; q4_0 blocks unpacked from their nibbles with one AND and one shift
     (values 0..15 and 16..31 of a block), the same way.
   - -a fast: q8_0 and q4_0 activations rounded to int8 per group, as llama.cpp
     does, so that one sdot makes 16 multiply-adds (without sdot: smull + sadalp, 8 per pair).
   - the prompt (simd_matmul_batch): 4 rows x 4 tokens per register tile, 16 FMAs per 8 loads,
     rows widened to float32 a panel at a time (exact path), or int8 x int8 group sums (-a fast).
   - attention: score and value tiles of 4 rows, reading each cache type widened in
     registers.
   - quantizing, softmax and SwiGLU: the same loops 4 lanes at a time, with exp4, a vectorised
     exp within 2 ulp of expf (tests/test_kernels.c checks). */
#if defined __aarch64__ && defined __ARM_NEON
#include <arm_neon.h>

#define HAS_NEON 1
#if defined __ARM_FEATURE_DOTPROD
#define HAS_DOTPROD_NAME "+dotprod"
#else
#define HAS_DOTPROD_NAME ""
#endif

/* The activations as the decoding kernels read them: quantized per group (exact: int16;
   -a fast: q_max 127, also narrowed to int8). */
typedef struct {
    int16_t *q;     /* round(x / scale) per group */
    float *scales;  /* one per group */
    int8_t *int8;   /* -a fast: q as int8 */
} SimdVector;

/* Section 8's buffers and settings beside MatmulScratch's, allocated once. */
struct SimdScratch {
    int fast;           /* -a fast: q8_0 and q4_0 activations rounded to int8 */
    SimdVector xq;      /* decoding: the activations quantized [max_cols] */
    int8_t *tokens;     /* -a fast's prompt path: the tokens as int8 [max_tokens][max_cols] */
    float *scales;      /* ... their scales [max_tokens][max_cols / 16] */
    int8_t *panels;     /* one [PANEL_ROWS][max_cols] panel of int8 weights per thread */
    float *panel_scales;    /* ... and its scales [PANEL_ROWS][max_cols / 16] */
    int16_t *token_values;  /* one token quantized by quantize_input, [max_cols] per thread */
    float *token_scales;    /* ... and its scales, [max_cols] per thread */
};

static void simd_alloc_scratch(MatmulScratch *s) {
    struct SimdScratch *f = checked_calloc(1, sizeof *f, "matmul scratch");
    size_t cols = (size_t)s->max_cols, panel = (size_t)s->n_threads * PANEL_ROWS * cols;
    f->xq.q = calloc_aligned(cols, sizeof(int16_t), "matmul scratch");
    f->xq.scales = calloc_aligned(cols, sizeof(float), "matmul scratch");
    f->xq.int8 = calloc_aligned(cols, sizeof(int8_t), "matmul scratch");
    f->tokens = calloc_aligned((size_t)s->max_tokens * cols, sizeof(int8_t), "matmul scratch");
    f->scales = calloc_aligned((size_t)s->max_tokens * cols / 16 + 1, sizeof(float),
                               "matmul scratch");
    f->panels = calloc_aligned(panel, sizeof(int8_t), "matmul scratch");
    f->panel_scales = calloc_aligned(panel / 16 + 1, sizeof(float), "matmul scratch");
    f->token_values = calloc_aligned((size_t)s->n_threads * cols, sizeof(int16_t),
                                     "matmul scratch");
    f->token_scales = calloc_aligned((size_t)s->n_threads * cols, sizeof(float), "matmul scratch");
    s->simd = f;
}

static void simd_free_scratch(MatmulScratch *s) {
    struct SimdScratch *f = s->simd;
    if (!f) return;
    void *buffers[] = { f->xq.q, f->xq.scales, f->xq.int8, f->tokens, f->scales, f->panels,
                        f->panel_scales, f->token_values, f->token_scales };
    for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++) free_aligned(buffers[i]);
    free(f);
}

/* Sums the four accumulators' 16 lanes. */
static inline float sum4_neon(float32x4_t a, float32x4_t b, float32x4_t c, float32x4_t d) {
    return vaddvq_f32(vaddq_f32(vaddq_f32(a, b), vaddq_f32(c, d)));
}

/* dot_fp32, four chains of 4 lanes */
static float dot_fp32_neon(const float *w, const float *x, int n) {
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0;
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = vfmaq_f32(a0, vld1q_f32(w + i), vld1q_f32(x + i));
        a1 = vfmaq_f32(a1, vld1q_f32(w + i + 4), vld1q_f32(x + i + 4));
        a2 = vfmaq_f32(a2, vld1q_f32(w + i + 8), vld1q_f32(x + i + 8));
        a3 = vfmaq_f32(a3, vld1q_f32(w + i + 12), vld1q_f32(x + i + 12));
    }
    for (; i + 4 <= n; i += 4) a0 = vfmaq_f32(a0, vld1q_f32(w + i), vld1q_f32(x + i));
    float sum = sum4_neon(a0, a1, a2, a3);
    for (; i < n; i++) sum += w[i] * x[i];
    return sum;
}

/* 8 bf16 values (a bf16 is the top half of its float32) widened to two float32 vectors. */
static inline float32x4_t bf16_low(uint16x8_t v) {
    return vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(v), 16));
}
static inline float32x4_t bf16_high(uint16x8_t v) {
    return vreinterpretq_f32_u32(vshll_high_n_u16(v, 16));
}

/* dot_bf16: 16 weights per step, widened by shifts, against x as it is. */
static float dot_bf16_neon(const uint16_t *w, const float *x, int n) {
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0;
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        uint16x8_t p0 = vld1q_u16(w + i), p1 = vld1q_u16(w + i + 8);
        a0 = vfmaq_f32(a0, bf16_low(p0), vld1q_f32(x + i));
        a1 = vfmaq_f32(a1, bf16_high(p0), vld1q_f32(x + i + 4));
        a2 = vfmaq_f32(a2, bf16_low(p1), vld1q_f32(x + i + 8));
        a3 = vfmaq_f32(a3, bf16_high(p1), vld1q_f32(x + i + 12));
    }
    float sum = sum4_neon(a0, a1, a2, a3);
    for (; i < n; i++) sum += bf16_to_float(w[i]) * x[i];
    return sum;
}

/* acc[0..3] + the products of 16 int8 weights and 16 int16 activations (smlal), one product
   per lane and accumulator. */
static inline void mla_int16(int32x4_t acc[4], int8x16_t w, const int16_t *x) {
    int16x8_t w0 = vmovl_s8(vget_low_s8(w)), w1 = vmovl_high_s8(w);
    int16x8_t x0 = vld1q_s16(x), x1 = vld1q_s16(x + 8);
    acc[0] = vmlal_s16(acc[0], vget_low_s16(w0), vget_low_s16(x0));
    acc[1] = vmlal_high_s16(acc[1], w0, x0);
    acc[2] = vmlal_s16(acc[2], vget_low_s16(w1), vget_low_s16(x1));
    acc[3] = vmlal_high_s16(acc[3], w1, x1);
}

/* A group's four accumulators as floats. Each lane of a pair holds gs/8 products of at most
   128 * 32767, exact in int32 for groups up to 4096. */
static inline float32x4_t pairs_to_float(const int32x4_t acc[4]) {
    return vaddq_f32(vcvtq_f32_s32(vaddq_s32(acc[0], acc[1])),
                     vcvtq_f32_s32(vaddq_s32(acc[2], acc[3])));
}

/* acc + the products of 16 int8 pairs, four summed into each int32 lane: sdot, or without it
   smull + sadalp (two products per int16 lane: at most 2 * 128 * 127, inside int16, since
   activations are rounded to at most 127). */
static inline int32x4_t madd_int8x16(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if defined __ARM_FEATURE_DOTPROD
    return vdotq_s32(acc, a, b);
#else
    int16x8_t p = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    p = vmlal_high_s8(p, a, b);
    return vpadalq_s16(acc, p);
#endif
}

/* q4_0's 32 values of one block (16 bytes of nibbles) as int8: values 0..15 from the low
   nibbles, 16..31 from the high ones, each minus 8. */
static inline void unpack_q4(int8x16_t *low, int8x16_t *high, const uint8_t *block) {
    uint8x16_t b = vld1q_u8(block);
    const int8x16_t eight = vdupq_n_s8(8);
    *low = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(b, vdupq_n_u8(15))), eight);
    *high = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(b, 4)), eight);
}

/* fp16_to_float by the conversion instruction (fcvtl: exact, subnormals included). */
static inline float fp16_to_float_neon(uint16_t h) {
    return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0);
}

/* dot_q8 and dot_q4 (q4: w is packed nibbles, w_scales fp16): each group's products summed in
   int32 (exact: int16 x against the weights widened to int16, smlal, each lane of a pair
   holding gs/8 products of at most 128 * 32767, exact for groups up to 4096; -a fast: int8 x,
   sdot), then times its two scales, consecutive groups into two accumulators. Inlined with
   constant gs and q4 for the common shapes. */
static inline float dot_groups_neon(const void *w, const void *w_scales, int q4,
                                    const SimdVector *x, int n_groups, int gs, int int8) {
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = acc0;
    size_t group_bytes = q4 ? (size_t)gs / 2 : (size_t)gs;
    for (int g = 0; g < n_groups; g++) {
        const uint8_t *wg = (const uint8_t *)w + (size_t)g * group_bytes;
        size_t at = (size_t)g * gs;
        float32x4_t sums;
        if (int8) {
            int32x4_t acc = vdupq_n_s32(0);
            for (int i = 0; i < gs; i += q4 ? 32 : 16) {
                if (q4) {
                    int8x16_t low, high;
                    unpack_q4(&low, &high, wg + i / 2);
                    acc = madd_int8x16(acc, low, vld1q_s8(x->int8 + at + i));
                    acc = madd_int8x16(acc, high, vld1q_s8(x->int8 + at + i + 16));
                } else {
                    acc = madd_int8x16(acc, vld1q_s8((const int8_t *)wg + i),
                                       vld1q_s8(x->int8 + at + i));
                }
            }
            sums = vcvtq_f32_s32(acc);
        } else {
            int32x4_t acc[4] = { vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0) };
            for (int i = 0; i < gs; i += q4 ? 32 : 16) {
                if (q4) {
                    int8x16_t low, high;
                    unpack_q4(&low, &high, wg + i / 2);
                    mla_int16(acc, low, x->q + at + i);
                    mla_int16(acc, high, x->q + at + i + 16);
                } else {
                    mla_int16(acc, vld1q_s8((const int8_t *)wg + i), x->q + at + i);
                }
            }
            sums = pairs_to_float(acc);
        }
        float ws = q4 ? fp16_to_float_neon(((const uint16_t *)w_scales)[g])
                      : ((const float *)w_scales)[g];
        if (g % 2) acc1 = vfmaq_n_f32(acc1, sums, ws * x->scales[g]);
        else acc0 = vfmaq_n_f32(acc0, sums, ws * x->scales[g]);
    }
    return vaddvq_f32(vaddq_f32(acc0, acc1));
}

/* Whether the kernels above take a q8_0 or q4_0 matrix: q8_0 groups of whole 16-value steps
   (int32 exact up to 4096), q4_0 groups of whole blocks. */
static int neon_groups(const Matrix *w) {
    int gs = w->group_size;
    if (w->type == WEIGHT_Q8_0) return gs % 16 == 0 && gs <= 4096;
    return w->type == WEIGHT_Q4_0 && gs % 32 == 0 && gs <= 4096;
}

/* Whether -a fast rounds w's activations to int8 here (q8_0 and q4_0, with the kernels). */
static int int8_activations(const Matrix *w, const MatmulScratch *s) {
    return s->simd->fast && neon_groups(w);
}

/* Hook (main): -a fast from now on; whether it changes weights of this type and group size. */
static int simd_set_fast(MatmulScratch *s, int weight_type, int group_size) {
    s->simd->fast = 1;
    Matrix w = { .type = weight_type, .group_size = group_size };
    return int8_activations(&w, s);
}

/* quantize_group 4 lanes at a time (gs a multiple of 16), bit for bit the same: a group with
   a NaN (an unordered compare) or an infinity gets the scale NaN and zeros; frintn rounds to
   nearest even like nearbyintf, and the rest is clamped to +-q_max before the exact
   conversion. */
static float quantize_group16(int16_t *q, const float *x, int gs, float q_max) {
    float32x4_t amax = vdupq_n_f32(0.0f);
    uint32x4_t ordered = vdupq_n_u32(~0u);
    for (int i = 0; i < gs; i += 4) {
        float32x4_t v = vld1q_f32(x + i);
        ordered = vandq_u32(ordered, vceqq_f32(v, v));
        amax = vmaxnmq_f32(amax, vabsq_f32(v));
    }
    float scale = checked_scale(q, gs, vmaxnmvq_f32(amax), vminvq_u32(ordered) != 0, q_max);
    if (isnan(scale)) return scale;
    float32x4_t inverse = vdupq_n_f32(scale > 0.0f ? 1.0f / scale : 0.0f);
    float32x4_t high = vdupq_n_f32(q_max), low = vdupq_n_f32(-q_max);
    for (int i = 0; i < gs; i += 4) {
        float32x4_t r = vrndnq_f32(vmulq_f32(vld1q_f32(x + i), inverse));
        r = vreinterpretq_f32_u32(vandq_u32(vceqq_f32(r, r), vreinterpretq_u32_f32(r)));
        r = vminq_f32(vmaxq_f32(r, low), high);
        vst1_s16(q + i, vmovn_s32(vcvtq_s32_f32(r)));
    }
    return scale;
}

/* n int16 values already within +-127 (quantized with Q8_MAX) narrowed to int8. */
static void narrow_int8(int8_t *out, const int16_t *q, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) vst1_s8(out + i, vmovn_s16(vld1q_s16(q + i)));
    for (; i < n; i++) out[i] = (int8_t)q[i];
}

/* quantize_vector into v, 4 lanes at a time where gs allows (the same bits). */
static void quantize_input(SimdVector *v, const float *x, int n, int gs, float q_max) {
    for (int g = 0; g < n / gs; g++) {
        int16_t *q = v->q + (size_t)g * gs;
        const float *xg = x + (size_t)g * gs;
        v->scales[g] = gs % 16 == 0 ? quantize_group16(q, xg, gs, q_max)
                                    : quantize_group(q, xg, gs, q_max);
    }
}

/* Hook (matmul_vector): q8_0 and q4_0 activations quantized per group into the scratch's xq,
   as int16 (exact) or, with -a fast, to q_max 127 and narrowed to int8 too. */
static int simd_prepare_input(const Matrix *w, const float *x, MatmulScratch *s) {
    SimdVector *xq = &s->simd->xq;
    if (!neon_groups(w)) return 0;
    int int8 = int8_activations(w, s);
    quantize_input(xq, x, w->cols, w->group_size, int8 ? Q8_MAX : Q16_MAX);
    if (int8) narrow_int8(xq->int8, xq->q, w->cols);
    return 1;
}

/* Hook (matmul_vector, inside its parallel region): one product's rows, split over the
   threads as matmul_vector splits them. */
static int simd_matmul_rows(float *out, const Matrix *w, const float *x, MatmulScratch *s) {
    int quantized = w->type == WEIGHT_Q8_0 || w->type == WEIGHT_Q4_0;
    if (quantized && !neon_groups(w)) return 0;
    int int8 = int8_activations(w, s), q4 = w->type == WEIGHT_Q4_0, gs = w->group_size;
    int n_groups = gs > 0 ? w->cols / gs : 0;
    const SimdVector *xq = &s->simd->xq;
    OMP(for schedule(guided) nowait)
    for (int r = 0; r < w->rows; r++) {
        size_t start = (size_t)r * (size_t)w->cols;
        if (w->type == WEIGHT_FP32) {
            out[r] = dot_fp32_neon((const float *)w->data + start, x, w->cols);
            continue;
        }
        if (w->type == WEIGHT_BF16) {
            out[r] = dot_bf16_neon((const uint16_t *)w->data + start, x, w->cols);
            continue;
        }
        const void *row = (const char *)w->data + (q4 ? start / 2 : start);
        const void *scales = q4 ? (const void *)(w->fp16_scales + start / (size_t)gs)
                                : (const void *)(w->scales + start / (size_t)gs);
        if (gs == 32 && q4) out[r] = dot_groups_neon(row, scales, 1, xq, n_groups, 32, int8);
        else if (gs == 64 && q4) out[r] = dot_groups_neon(row, scales, 1, xq, n_groups, 64, int8);
        else if (gs == 32) out[r] = dot_groups_neon(row, scales, 0, xq, n_groups, 32, int8);
        else if (gs == 64) out[r] = dot_groups_neon(row, scales, 0, xq, n_groups, 64, int8);
        else out[r] = dot_groups_neon(row, scales, q4, xq, n_groups, gs, int8);
    }
    return 1;
}

/* 16 int8 values widened to float32 in v[0..3], times s[0..3]. */
static inline void widen_int8x16(float32x4_t v[4], int8x16_t b, const float32x4_t s[4]) {
    int16x8_t low = vmovl_s8(vget_low_s8(b)), high = vmovl_high_s8(b);
    v[0] = vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(low))), s[0]);
    v[1] = vmulq_f32(vcvtq_f32_s32(vmovl_high_s16(low)), s[1]);
    v[2] = vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(high))), s[2]);
    v[3] = vmulq_f32(vcvtq_f32_s32(vmovl_high_s16(high)), s[3]);
}

/* Values start .. start+n-1 of w widened to float32, as widen_values does (quantized types:
   whole groups, neon_groups()), 16 at a time. */
static void widen_run_neon(float *out, const Matrix *w, size_t start, int n) {
    if (w->type == WEIGHT_FP32 || (w->type == WEIGHT_BF16 && n % 16 != 0)) {
        widen_values(out, w, start, n);
        return;
    }
    for (int i = 0; i < n; i += 16) {
        size_t at = start + (size_t)i;
        float32x4_t v[4];
        if (w->type == WEIGHT_BF16) {
            const uint16_t *src = (const uint16_t *)w->data + at;
            uint16x8_t a = vld1q_u16(src), b = vld1q_u16(src + 8);
            v[0] = bf16_low(a), v[1] = bf16_high(a), v[2] = bf16_low(b), v[3] = bf16_high(b);
        } else {
            size_t group = at / (size_t)w->group_size;
            float32x4_t s = vdupq_n_f32(w->type == WEIGHT_Q8_0
                                            ? w->scales[group]
                                            : fp16_to_float_neon(w->fp16_scales[group]));
            const float32x4_t scales[4] = { s, s, s, s };
            int8x16_t b;
            if (w->type == WEIGHT_Q4_0) {  /* the block's values 0..15 or 16..31 */
                int8x16_t low, high;
                unpack_q4(&low, &high, (const uint8_t *)w->data + at / 32 * 16);
                b = at % 32 ? high : low;
            } else {
                b = vld1q_s8((const int8_t *)w->data + at);
            }
            widen_int8x16(v, b, scales);
        }
        for (int j = 0; j < 4; j++) vst1q_f32(out + i + 4 * j, v[j]);
    }
}

/* acc[t] += the products of 4 weights of a row and x[t], 4 tokens' same 4 columns. */
static inline void row_fmas(float32x4_t acc[4], const float *w, const float32x4_t x[4]) {
    float32x4_t wv = vld1q_f32(w);
    for (int t = 0; t < 4; t++) acc[t] = vfmaq_f32(acc[t], wv, x[t]);
}

/* sums[t] = the total of acc[t]'s lanes, t < 4 (pairwise sums). */
static inline void row_totals(float *sums, const float32x4_t acc[4]) {
    vst1q_f32(sums, vpaddq_f32(vpaddq_f32(acc[0], acc[1]), vpaddq_f32(acc[2], acc[3])));
}

/* out[t][r] (row stride out_stride) = dot(row r of w, token t of x) for r < nr <= 4 and
   t < nt <= 4: 16 sums in 4-lane accumulators, each step 4 row loads and 4 token loads for 16
   FMAs. Missing rows and tokens repeat the last ones; their sums go unused. (One array of
   accumulators per row: gcc 12 -O3 keeps a [4][4] array in memory, storing it every step.) */
static void tile_dots_neon(float *out, size_t out_stride, const float *w, int nr, const float *x,
                           int nt, int cols) {
    const float *wr[4], *xt[4];
    for (int i = 0; i < 4; i++) {
        wr[i] = w + (size_t)(i < nr ? i : nr - 1) * cols;
        xt[i] = x + (size_t)(i < nt ? i : nt - 1) * cols;
    }
    float32x4_t a0[4], a1[4], a2[4], a3[4];
    for (int t = 0; t < 4; t++) a0[t] = a1[t] = a2[t] = a3[t] = vdupq_n_f32(0.0f);
    int k = 0;
    for (; k + 4 <= cols; k += 4) {
        float32x4_t xv[4];
        for (int t = 0; t < 4; t++) xv[t] = vld1q_f32(xt[t] + k);
        row_fmas(a0, wr[0] + k, xv);
        row_fmas(a1, wr[1] + k, xv);
        row_fmas(a2, wr[2] + k, xv);
        row_fmas(a3, wr[3] + k, xv);
    }
    float sums[4][4];  /* [r][t] */
    row_totals(sums[0], a0);
    row_totals(sums[1], a1);
    row_totals(sums[2], a2);
    row_totals(sums[3], a3);
    for (int t = 0; t < nt; t++)
        for (int r = 0; r < nr; r++) {
            float sum = sums[r][t];
            for (int j = k; j < cols; j++) sum += wr[r][j] * xt[t][j];
            out[(size_t)t * out_stride + r] = sum;
        }
}

/* The prompt path (matmul_batch's panels and loops): a panel of PANEL_ROWS rows is widened to
   float32 once (fp32 rows are read in place) and meets every token, 4 x 4 at a time. */
static void matmul_panels_neon(float *out, const float *x, int n_tokens, const Matrix *w,
                               MatmulScratch *s) {
    int rows = w->rows, cols = w->cols, n_panels = (rows + PANEL_ROWS - 1) / PANEL_ROWS;
    OMP(parallel for schedule(static))
    for (int p = 0; p < n_panels; p++) {
        int r0 = p * PANEL_ROWS, nr = rows - r0 < PANEL_ROWS ? rows - r0 : PANEL_ROWS;
        const float *panel = (const float *)w->data + (size_t)r0 * cols;
        if (w->type != WEIGHT_FP32) {
            float *buf = s->panels + (size_t)thread_id() * PANEL_ROWS * (size_t)s->max_cols;
            widen_run_neon(buf, w, (size_t)r0 * cols, nr * cols);
            panel = buf;
        }
        for (int t0 = 0; t0 < n_tokens; t0 += 4)
            for (int r = 0; r < nr; r += 4)
                tile_dots_neon(out + (size_t)t0 * rows + r0 + r, (size_t)rows,
                               panel + (size_t)r * cols, nr - r < 4 ? nr - r : 4,
                               x + (size_t)t0 * cols, n_tokens - t0 < 4 ? n_tokens - t0 : 4,
                               cols);
    }
}

/* -a fast's tile: as tile_dots_neon, with int8 rows and tokens (their scales: row stride
   n_groups), each group's 16 integer sums exact in int32 and then folded, four at a time,
   into one float32 vector per row (lanes: tokens) times the two scales. */
static void tile_int8_neon(float *out, size_t out_stride, const int8_t *w, const float *w_scales,
                           int nr, const int8_t *x, const float *x_scales, int nt, int cols,
                           int gs) {
    int n_groups = cols / gs;
    const int8_t *wr[4], *xt[4];
    const float *ws[4], *xs[4];
    for (int i = 0; i < 4; i++) {
        int r = i < nr ? i : nr - 1, t = i < nt ? i : nt - 1;
        wr[i] = w + (size_t)r * cols, ws[i] = w_scales + (size_t)r * n_groups;
        xt[i] = x + (size_t)t * cols, xs[i] = x_scales + (size_t)t * n_groups;
    }
    float32x4_t acc[4];
    for (int r = 0; r < 4; r++) acc[r] = vdupq_n_f32(0.0f);
    for (int g = 0; g < n_groups; g++) {
        int32x4_t isum[4][4];
        for (int r = 0; r < 4; r++)
            for (int t = 0; t < 4; t++) isum[r][t] = vdupq_n_s32(0);
        for (int k = g * gs; k < (g + 1) * gs; k += 16) {
            int8x16_t xv[4];
            for (int t = 0; t < 4; t++) xv[t] = vld1q_s8(xt[t] + k);
            for (int r = 0; r < 4; r++) {
                int8x16_t wv = vld1q_s8(wr[r] + k);
                for (int t = 0; t < 4; t++) isum[r][t] = madd_int8x16(isum[r][t], wv, xv[t]);
            }
        }
        const float token_scales[4] = { xs[0][g], xs[1][g], xs[2][g], xs[3][g] };
        float32x4_t x_scale = vld1q_f32(token_scales);
        for (int r = 0; r < 4; r++) {
            int32x4_t sums = vpaddq_s32(vpaddq_s32(isum[r][0], isum[r][1]),
                                        vpaddq_s32(isum[r][2], isum[r][3]));
            acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(sums), vmulq_n_f32(x_scale, ws[r][g]));
        }
    }
    float sums[4][4];  /* (constant indices keep acc in registers through the loop) */
    for (int r = 0; r < 4; r++) vst1q_f32(sums[r], acc[r]);
    for (int t = 0; t < nt; t++)
        for (int r = 0; r < nr; r++) out[(size_t)t * out_stride + r] = sums[r][t];
}

/* -a fast's prompt path for q8_0 and q4_0: the tokens quantized to int8 per group, as
   decoding quantizes one; q8_0 panels read in place, q4_0 panels unpacked to int8 first. */
static void matmul_int8_neon(float *out, const float *x, int n_tokens, const Matrix *w,
                             MatmulScratch *s) {
    int rows = w->rows, cols = w->cols, gs = w->group_size, n_groups = cols / gs;
    int n_panels = (rows + PANEL_ROWS - 1) / PANEL_ROWS;
    struct SimdScratch *f = s->simd;
    OMP(parallel)
    {
        int id = thread_id();
        SimdVector token = { .q = f->token_values + (size_t)id * s->max_cols,
                             .scales = f->token_scales + (size_t)id * s->max_cols };
        OMP(for schedule(static))
        for (int t = 0; t < n_tokens; t++) {
            quantize_input(&token, x + (size_t)t * cols, cols, gs, Q8_MAX);
            narrow_int8(f->tokens + (size_t)t * cols, token.q, cols);
            memcpy(f->scales + (size_t)t * n_groups, token.scales,
                   (size_t)n_groups * sizeof(float));
        }
        /* (the for's implied barrier: every token is quantized before any panel starts) */
        int8_t *buf = f->panels + (size_t)id * PANEL_ROWS * (size_t)s->max_cols;
        float *buf_scales = f->panel_scales + (size_t)id * PANEL_ROWS * (size_t)(s->max_cols / 16);
        OMP(for schedule(static))
        for (int p = 0; p < n_panels; p++) {
            int r0 = p * PANEL_ROWS, nr = rows - r0 < PANEL_ROWS ? rows - r0 : PANEL_ROWS;
            size_t start = (size_t)r0 * cols, values = (size_t)nr * cols;
            const int8_t *panel = (const int8_t *)w->data + start;
            const float *scales = w->scales + (size_t)r0 * n_groups;
            if (w->type == WEIGHT_Q4_0) {
                for (size_t i = 0; i < values; i += 32) {
                    int8x16_t low, high;
                    unpack_q4(&low, &high, (const uint8_t *)w->data + (start + i) / 2);
                    vst1q_s8(buf + i, low);
                    vst1q_s8(buf + i + 16, high);
                }
                for (size_t g = 0; g < (size_t)nr * n_groups; g++)
                    buf_scales[g] = fp16_to_float_neon(w->fp16_scales[(size_t)r0 * n_groups + g]);
                panel = buf, scales = buf_scales;
            }
            for (int t0 = 0; t0 < n_tokens; t0 += 4)
                for (int r = 0; r < nr; r += 4)
                    tile_int8_neon(out + (size_t)t0 * rows + r0 + r, (size_t)rows,
                                   panel + (size_t)r * cols, scales + (size_t)r * n_groups,
                                   nr - r < 4 ? nr - r : 4, f->tokens + (size_t)t0 * cols,
                                   f->scales + (size_t)t0 * n_groups,
                                   n_tokens - t0 < 4 ? n_tokens - t0 : 4, cols, gs);
        }
    }
}

/* Hook (matmul): the prompt path, int8 with -a fast, float32 panels otherwise. */
static int simd_matmul_batch(float *out, const float *x, int n_tokens, const Matrix *w,
                             MatmulScratch *s) {
    int quantized = w->type == WEIGHT_Q8_0 || w->type == WEIGHT_Q4_0;
    if (quantized && !neon_groups(w)) return 0;
    if (int8_activations(w, s)) matmul_int8_neon(out, x, n_tokens, w, s);
    else matmul_panels_neon(out, x, n_tokens, w, s);
    return 1;
}

/* e^x for 4 floats, the algorithm of exp16: x = n ln2 + r (ln2 in two parts), e^r by its
   Taylor series to r^7, times 2^n as two powers of two (each a normal float for n in
   [-150, 128]), so that the result is rounded once: inf past the top of the float range, 0
   or a denormal past the bottom. */
static inline float32x4_t exp4(float32x4_t x) {
    x = vminq_f32(vdupq_n_f32(89.0f), vmaxq_f32(vdupq_n_f32(-104.0f), x));
    float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504f)));
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
    const float inverse_factorials[] = { 1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24,
                                         1.0f / 6, 0.5f, 1.0f, 1.0f };
    float32x4_t p = vdupq_n_f32(inverse_factorials[0]);
    for (int k = 1; k < 8; k++) p = vfmaq_f32(vdupq_n_f32(inverse_factorials[k]), p, r);
    int32x4_t n_int = vcvtq_s32_f32(n), half = vshrq_n_s32(n_int, 1);
    int32x4_t bias = vdupq_n_s32(127);
    float32x4_t a = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(half, bias), 23));
    float32x4_t b = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vsubq_s32(n_int, half), bias), 23));
    return vmulq_f32(vmulq_f32(p, a), b);
}

/* Lanes 0 .. k-1 set (a loop's ragged last step of k < 4). */
static inline uint32x4_t lanes_below(int k) {
    const uint32_t index[4] = { 0, 1, 2, 3 };
    return vcltq_u32(vld1q_u32(index), vdupq_n_u32((uint32_t)k));
}

/* Hook (softmax): the same three passes, 4 lanes at a time, with exp4 (the last 1..3 values
   too, through a padded vector). */
static int simd_softmax(float *x, int n) {
    float32x4_t vmax = vdupq_n_f32(x[0]), vsum = vdupq_n_f32(0.0f);
    int i = 0;
    for (; i + 4 <= n; i += 4) vmax = vmaxq_f32(vmax, vld1q_f32(x + i));
    float max = vmaxvq_f32(vmax);
    for (; i < n; i++) max = x[i] > max ? x[i] : max;
    float32x4_t m = vdupq_n_f32(max);
    for (i = 0; i + 4 <= n; i += 4) {
        float32x4_t e = exp4(vsubq_f32(vld1q_f32(x + i), m));
        vst1q_f32(x + i, e);
        vsum = vaddq_f32(vsum, e);
    }
    if (i < n) {
        float tail[4] = {0};
        memcpy(tail, x + i, (size_t)(n - i) * sizeof(float));
        float32x4_t e = exp4(vsubq_f32(vld1q_f32(tail), m));
        e = vreinterpretq_f32_u32(vandq_u32(lanes_below(n - i), vreinterpretq_u32_f32(e)));
        vst1q_f32(tail, e);
        memcpy(x + i, tail, (size_t)(n - i) * sizeof(float));
        vsum = vaddq_f32(vsum, e);
    }
    float sum = vaddvq_f32(vsum);
    float32x4_t vs = vdupq_n_f32(sum);
    for (i = 0; i + 4 <= n; i += 4) vst1q_f32(x + i, vdivq_f32(vld1q_f32(x + i), vs));
    for (; i < n; i++) x[i] /= sum;
    return 1;
}

static inline float32x4_t swiglu4(float32x4_t g, float32x4_t u) {
    float32x4_t e = exp4(vnegq_f32(g));
    return vmulq_f32(vdivq_f32(g, vaddq_f32(vdupq_n_f32(1.0f), e)), u);
}

/* Hook (swiglu): one row, 4 lanes at a time, with exp4. */
static int simd_swiglu(float *g, const float *u, int width) {
    int i = 0;
    for (; i + 4 <= width; i += 4) vst1q_f32(g + i, swiglu4(vld1q_f32(g + i), vld1q_f32(u + i)));
    if (i < width) {
        float gt[4] = {0}, ut[4] = {0};
        memcpy(gt, g + i, (size_t)(width - i) * sizeof(float));
        memcpy(ut, u + i, (size_t)(width - i) * sizeof(float));
        vst1q_f32(gt, swiglu4(vld1q_f32(gt), vld1q_f32(ut)));
        memcpy(g + i, gt, (size_t)(width - i) * sizeof(float));
    }
    return 1;
}

/* 16 consecutive cache elements from element i, widened to float32 in v[0..3]: bf16 by a
   shift, q8_0 as int8 -> float32 times s[0..3] (16 scales for keys, one for values). Called
   with a constant type, like widen16. */
static inline void widen16_neon(float32x4_t v[4], const void *data, size_t i, int type,
                                const float32x4_t s[4]) {
    if (type == CACHE_BF16) {
        const uint16_t *p = (const uint16_t *)data + i;
        uint16x8_t a = vld1q_u16(p), b = vld1q_u16(p + 8);
        v[0] = bf16_low(a), v[1] = bf16_high(a), v[2] = bf16_low(b), v[3] = bf16_high(b);
    } else if (type == CACHE_Q8_0) {
        widen_int8x16(v, vld1q_s8((const int8_t *)data + i), s);
    } else {
        for (int j = 0; j < 4; j++) v[j] = vld1q_f32((const float *)data + i + 4 * j);
    }
}

/* score_tiles' sums for one key tile and up to 4 rows (the missing ones repeat the last):
   per dimension, the tile's 16 keys widened into 4 vectors meet 4 broadcast query values in 16
   FMAs. Each score is one FMA chain over the dimensions in order, as in score_tiles. */
static inline void score_tile_neon(float *const *scores, const float *const *rows, int nr,
                                   const KVHead *kv, int tile, int head_dim, float scale,
                                   int type) {
    const float *q[4];
    for (int r = 0; r < 4; r++) q[r] = rows[r < nr ? r : nr - 1];
    float32x4_t acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < 4; j++) acc[r][j] = vdupq_n_f32(0.0f);
    for (int d = 0; d < head_dim; d++) {
        float32x4_t k[4], s[4] = { vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f),
                                   vdupq_n_f32(0.0f) };
        if (type == CACHE_Q8_0) {
            const float *ks = kv->key_scales + key_index(tile * KEY_TILE, d / CACHE_GROUP,
                                                         head_dim / CACHE_GROUP);
            for (int j = 0; j < 4; j++) s[j] = vld1q_f32(ks + 4 * j);
        }
        widen16_neon(k, kv->keys, key_index(tile * KEY_TILE, d, head_dim), type, s);
        for (int r = 0; r < 4; r++)
            for (int j = 0; j < 4; j++) acc[r][j] = vfmaq_n_f32(acc[r][j], k[j], q[r][d]);
    }
    for (int r = 0; r < 4; r++)  /* (constant indices keep acc in registers through the loop) */
        for (int j = 0; j < 4; j++)
            if (r < nr)
                vst1q_f32(scores[r] + (size_t)tile * KEY_TILE + 4 * j,
                          vmulq_n_f32(acc[r][j], scale));
}

/* sum_values' sums for dimensions d0 .. d0+15 and up to 4 rows (the missing ones repeat the
   last): per position, 16 values widened into 4 vectors meet 4 broadcast weights in 16 FMAs,
   each output one FMA chain over the positions in order. */
static inline void value_tile_neon(float *const *out, const float *const *weights, int nr,
                                   const KVHead *kv, int p0, int p1, int d0, int head_dim,
                                   int type) {
    const float *w[4];
    float *o[4];
    float32x4_t acc[4][4];
    for (int r = 0; r < 4; r++) {
        w[r] = weights[r < nr ? r : nr - 1], o[r] = out[r < nr ? r : nr - 1];
        for (int j = 0; j < 4; j++) acc[r][j] = vld1q_f32(o[r] + d0 + 4 * j);
    }
    for (int p = p0; p < p1; p++) {
        size_t i = (size_t)p * head_dim + d0;
        float32x4_t v[4], s = vdupq_n_f32(type == CACHE_Q8_0 ? kv->value_scales[i / CACHE_GROUP]
                                                            : 0.0f);
        const float32x4_t scales[4] = { s, s, s, s };
        widen16_neon(v, kv->values, i, type, scales);
        for (int r = 0; r < 4; r++)
            for (int j = 0; j < 4; j++) acc[r][j] = vfmaq_n_f32(acc[r][j], v[j], w[r][p]);
    }
    for (int r = 0; r < 4; r++)  /* (constant indices keep acc in registers through the loop) */
        for (int j = 0; j < 4; j++)
            if (r < nr) vst1q_f32(o[r] + d0 + 4 * j, acc[r][j]);
}

/* Hook (attention_scores): each key tile against the rows, 4 at a time, for a constant cache
   type. */
static int simd_attention_scores(float *const *scores, const float *const *q, int nr,
                                 const KVHead *kv, int n_pos, int head_dim, float scale) {
    for (int tile = 0; tile * KEY_TILE < n_pos; tile++)
        for (int r = 0; r < nr; r += 4) {
            int n = nr - r < 4 ? nr - r : 4;
            if (kv->type == CACHE_F32)
                score_tile_neon(scores + r, q + r, n, kv, tile, head_dim, scale, CACHE_F32);
            else if (kv->type == CACHE_BF16)
                score_tile_neon(scores + r, q + r, n, kv, tile, head_dim, scale, CACHE_BF16);
            else
                score_tile_neon(scores + r, q + r, n, kv, tile, head_dim, scale, CACHE_Q8_0);
        }
    return 1;
}

/* Hook (attention_values): 16 dimensions at a time (all of a q8_0 cache's, whose heads are
   whole groups); returns the dimensions summed. */
static int simd_attention_values(float *const *out, const float *const *weights, int nr,
                                 const KVHead *kv, int p0, int p1, int head_dim) {
    int d0 = 0;
    for (; d0 + 16 <= head_dim; d0 += 16)
        for (int r = 0; r < nr; r += 4) {
            int n = nr - r < 4 ? nr - r : 4;
            if (kv->type == CACHE_F32)
                value_tile_neon(out + r, weights + r, n, kv, p0, p1, d0, head_dim, CACHE_F32);
            else if (kv->type == CACHE_BF16)
                value_tile_neon(out + r, weights + r, n, kv, p0, p1, d0, head_dim, CACHE_BF16);
            else
                value_tile_neon(out + r, weights + r, n, kv, p0, p1, d0, head_dim, CACHE_Q8_0);
        }
    return d0;
}

/* Hook (--version, the model line): the kernels this build holds. */
static const char *simd_kernels(void) {
    return "neon" HAS_DOTPROD_NAME;
}

#endif  /* __aarch64__ && __ARM_NEON */

/* ---- 8z. The weights in 2 MB pages (Linux) ---------------------------------------------------
   Decoding reads every weight once per token, so its loads range over the whole file: in 4 KB
   pages each one costs a TLB miss and a page walk, in 2 MB pages almost none do. A mapping
   gets 2 MB pages where the page cache holds the file in 2 MB folios, which Linux 6.x makes
   when it reads a file ahead (MADV_HUGEPAGE asks for that on this mapping's faults). A file
   written in small pieces (by cp, by most downloaders) or read back under memory pressure
   sits in 4 KB folios until it is evicted. So map_large_pages faults the mapping in and, where
   most of it came in 4 KB pages, evicts the file piece by piece and reads it back: once, since
   later runs find the file as this one left it. It tries one piece first and stops there if
   the kernel keeps 4 KB folios anyway (no large folios for this file system, or no free 2 MB
   blocks). The bytes are the same either way; only the time to the first token changes. */
#if defined __linux__ && defined MADV_HUGEPAGE && defined MADV_POPULATE_READ

#define REFOLD_PIECE ((size_t)64 << 20)

/* kB of the mapping that starts at `start`: resident, and mapped in 2 MB pages; 0 if unknown */
static int mapping_pages(const void *start, long *resident_kb, long *large_kb) {
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f) return 0;
    char line[256], head[32];
    snprintf(head, sizeof head, "%lx-", (unsigned long)(uintptr_t)start);
    int inside = 0, found = 0;
    while (found != 3 && fgets(line, sizeof line, f)) {
        if (strncmp(line, head, strlen(head)) == 0) inside = 1;
        else if (inside && sscanf(line, "Rss: %ld", resident_kb) == 1) found |= 1;
        else if (inside && sscanf(line, "FilePmdMapped: %ld", large_kb) == 1) found |= 2;
    }
    fclose(f);
    return found == 3;
}

/* Evicts [at, at + len) of the file from this mapping and the page cache, and reads it back. */
static void refold(unsigned char *map, size_t at, size_t len, int fd) {
    madvise(map + at, len, MADV_DONTNEED);
    posix_fadvise(fd, (off_t)at, (off_t)len, POSIX_FADV_DONTNEED);
    madvise(map + at, len, MADV_POPULATE_READ);
}

static void map_large_pages(unsigned char *map, size_t size, int fd) {
    madvise(map, size, MADV_HUGEPAGE);
    if (size < 2 * REFOLD_PIECE || madvise(map, size, MADV_POPULATE_READ) != 0) return;
    long resident = 0, large = 0, large_after = 0;
    if (!mapping_pages(map, &resident, &large) || large * 2 >= resident) return;
    refold(map, 0, REFOLD_PIECE, fd);  /* the trial piece */
    if (!mapping_pages(map, &resident, &large_after) ||
        (size_t)(large_after - large) * 1024 < REFOLD_PIECE / 2) {
        fprintf(stderr, "note: the model file is cached in 4 KB pages and the kernel keeps it "
                        "so; -w read may decode faster\n");
        return;
    }
    fprintf(stderr, "note: the model file was cached in 4 KB pages; reading it again in 2 MB "
                    "pages (once)\n");
    for (size_t at = REFOLD_PIECE; at < size; at += REFOLD_PIECE)
        refold(map, at, size - at < REFOLD_PIECE ? size - at : REFOLD_PIECE, fd);
}

#else  /* elsewhere the mapping stays as the system makes it */

static void map_large_pages(unsigned char *map, size_t size, int fd) {
    (void)map; (void)size; (void)fd;
}

#endif

/* -w read, and -w auto where the file fits: the file read into memory instead of mapped,
   into 2 MB pages where Linux has them. Decoding reads such memory faster than a mapping of
   the page cache, even one in 2 MB pages (docs/performance.md has the figures). The cost:
   reading the whole file before the first token, and a second copy beside the page cache's. */
static unsigned char *read_whole_file(int fd, size_t size, const char *path) {
    size_t huge_page = (size_t)2 << 20, rounded = (size + huge_page - 1) / huge_page * huge_page;
    unsigned char *buf = aligned_alloc(huge_page, rounded);
    if (!buf) die("model file %s: no memory to read its %zu bytes into (try -w map)", path, size);
#if defined MADV_HUGEPAGE
    /* a hint (Linux): 2 MB pages where the kernel has them */
    madvise(buf, rounded, MADV_HUGEPAGE);
#endif
    /* 64 MB pieces, read by all threads: the copy out of the page cache and the kernel's
       zeroing of fresh pages both take time per byte */
    size_t piece = (size_t)64 << 20, n_pieces = (size + piece - 1) / piece;
    int error = 0, ended = 0;
    OMP(parallel for schedule(dynamic))
    for (size_t i = 0; i < n_pieces; i++) {
        size_t done = i * piece, end = done + piece < size ? done + piece : size;
        while (done < end) {
            ssize_t got = pread(fd, buf + done, end - done, (off_t)done);
            if (got < 0 && errno == EINTR) continue;
            if (got <= 0) {
                OMP(critical)
                { if (got < 0) error = errno; else ended = 1; }
                break;
            }
            done += (size_t)got;
        }
    }
    if (error) die("cannot read model file %s: %s", path, strerror(error));
    if (ended) die("model file %s: ended before its %zu bytes were read", path, size);
    return buf;
}
