/* libFuzzer target: tokenizer.c on hostile input.

   The first input byte picks what the rest is:
     0-63    a .tok file: tokenizer_load() must refuse it with a message or load it; a loaded
             one then encodes a fixed text and decodes every id, and encodes a text made of
             pieces of its special tokens with special tokens allowed: the specials found must
             be those a naive search finds (the leftmost first, the longest there).
     64-255  text for the fixed tokenizers (a small built-in one, and the real Llama 3 one when
             LLAMA3C_FUZZ_TOK names its .tok file): encoded with and without special tokens
             (concatenating the pieces must give back the input exactly without them), and
             the same bytes read as int32 ids (any value, negative and out of range too) are
             decoded through the streaming UTF-8 decoder.
   Files reach tokenizer_load through a memfd (/proc/self/fd/N): it takes a path. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../../tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

static Tokenizer *small_tok, *real_tok;

/* Loads bytes as a .tok file. Returns the tokenizer or NULL; a refusal must say why. */
static Tokenizer *load_bytes(const uint8_t *bytes, size_t size) {
    int fd = memfd_create("fuzz.tok", 0);
    if (fd < 0) abort();
    size_t done = 0;
    while (done < size) {
        ssize_t w = write(fd, bytes + done, size - done);
        if (w <= 0) abort();
        done += (size_t)w;
    }
    char path[64], err[256];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    err[0] = '\0';
    Tokenizer *t = tokenizer_load(path, err, sizeof err);
    close(fd);
    if (!t && (err[0] == '\0' || strchr(err, '\n'))) abort();  /* one line naming the problem */
    return t;
}

static void put_u32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); }

/* 256 single bytes, a few merges, the Llama 3 control specials. */
static Tokenizer *make_small_tok(void) {
    static const char *merges[] = { "ab", "abc", " a", "he", "hel", "hell", "hello", " hello",
                                    "\xc3\xa9", "  ", "\n\n", "12", "123" };
    static const char *specials[] = { "<|begin_of_text|>", "<|end_of_text|>",
                                      "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>" };
    size_t n_merges = sizeof merges / sizeof *merges, n_special = sizeof specials / sizeof *specials;
    unsigned char buf[8192];
    size_t at = 16;
    for (int b = 0; b < 256; b++) { put_u32(buf + at, 1); buf[at + 4] = (unsigned char)b; at += 5; }
    for (size_t i = 0; i < n_merges + n_special; i++) {
        const char *s = i < n_merges ? merges[i] : specials[i - n_merges];
        put_u32(buf + at, (uint32_t)strlen(s));
        memcpy(buf + at + 4, s, strlen(s));
        at += 4 + strlen(s);
    }
    memcpy(buf, "L3TK", 4);
    put_u32(buf + 4, 1);
    put_u32(buf + 8, (uint32_t)(256 + n_merges + n_special));
    put_u32(buf + 12, (uint32_t)n_special);
    Tokenizer *t = load_bytes(buf, at);
    if (!t) abort();
    return t;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc; (void)argv;
    small_tok = make_small_tok();
    const char *path = getenv("LLAMA3C_FUZZ_TOK");
    if (path && *path) {
        char err[256];
        real_tok = tokenizer_load(path, err, sizeof err);
        if (!real_tok) { fprintf(stderr, "fuzz_tokenizer: %s\n", err); abort(); }
    }
    return 0;
}

/* Encodes and checks the round trip; decodes ids read from the same bytes. */
static void exercise(const Tokenizer *t, const uint8_t *text, size_t len) {
    TokenList ids = {0};
    if (tokenizer_encode(t, (const char *)text, len, 0, &ids) != 0) abort();
    unsigned char *back = malloc(len + 1);
    size_t at = 0;
    for (size_t i = 0; i < ids.count; i++) {
        size_t n;
        const unsigned char *piece = tokenizer_piece(t, ids.ids[i], &n);
        if (!piece || at + n > len) abort();
        if (tokenizer_is_special(t, ids.ids[i])) abort();  /* no specials without the flag */
        memcpy(back + at, piece, n);
        at += n;
    }
    if (at != len || (len && memcmp(back, text, len) != 0)) abort();  /* pieces give the input */
    free(back);
    ids.count = 0;
    int rc = tokenizer_encode(t, (const char *)text, len,
                              TOKENIZER_ADD_BOS | TOKENIZER_ALLOW_SPECIAL, &ids);
    if (rc != 0 && !(rc == TOKENIZER_ERR_NO_BOS && tokenizer_special_id(t, "<|begin_of_text|>") < 0))
        abort();
    for (size_t i = 0; i < ids.count; i++)
        if (ids.ids[i] < 0 || ids.ids[i] >= tokenizer_vocab_size(t)) abort();
    token_list_free(&ids);

    /* decode: the bytes as ids, including negative and huge ones */
    Utf8Decoder dec = {0};
    size_t produced = 0, fed = 0;
    for (size_t i = 0; i + 4 <= len; i += 4) {
        int32_t id;
        memcpy(&id, text + i, 4);
        if (i % 8 == 0) id = (int32_t)((uint32_t)id % (uint32_t)(tokenizer_vocab_size(t) + 2)) - 1;
        size_t n;
        const unsigned char *piece = tokenizer_piece(t, id, &n);
        if ((id < 0 || id >= tokenizer_vocab_size(t)) != (piece == NULL)) abort();
        if (!piece) continue;
        unsigned char *out = malloc(UTF8_DECODER_OUT_MAX(n));
        produced += utf8_decoder_feed(&dec, piece, n, out);
        fed += n;
        free(out);
    }
    unsigned char tail[4];
    produced += utf8_decoder_flush(&dec, tail);
    if (produced > 3 * fed + 3) abort();  /* at most one U+FFFD per input byte */
    /* the raw bytes straight into the decoder, split at an arbitrary point */
    Utf8Decoder raw = {0};
    unsigned char *out = malloc(UTF8_DECODER_OUT_MAX(len));
    size_t cut = len ? text[0] % (len + 1) : 0;
    utf8_decoder_feed(&raw, text, cut, out);
    utf8_decoder_feed(&raw, text + cut, len - cut, out);
    utf8_decoder_flush(&raw, out);
    free(out);
}

/* The longest special token that starts at text[p], naively: its id and length, or -1. */
static int special_at(const Tokenizer *t, const uint8_t *text, size_t p, size_t len,
                      size_t *length) {
    int best = -1;
    *length = 0;
    for (int id = 0; id < tokenizer_vocab_size(t); id++) {
        size_t n;
        const unsigned char *piece = tokenizer_piece(t, id, &n);
        if (tokenizer_is_special(t, id) && n <= len - p && n > *length &&
            memcmp(piece, text + p, n) == 0) {
            best = id;
            *length = n;
        }
    }
    return best;
}

/* Encodes text with special tokens allowed and checks the ids against a naive search: the
   regular ids between two specials spell the text between them, and each special is the
   leftmost (then longest) one after the previous. */
static void check_specials(const Tokenizer *t, const uint8_t *text, size_t len) {
    TokenList ids = {0};
    if (tokenizer_encode(t, (const char *)text, len, TOKENIZER_ALLOW_SPECIAL, &ids) != 0) abort();
    size_t pos = 0, i = 0;
    while (pos < len) {
        size_t at = pos, length = 0;
        int want = -1;
        for (; at < len && want < 0; at++) want = special_at(t, text, at, len, &length);
        if (want >= 0) at--;
        size_t n;
        for (; pos < at; pos += n) {   /* the regular ids up to the special */
            if (i >= ids.count || tokenizer_is_special(t, ids.ids[i])) abort();
            const unsigned char *piece = tokenizer_piece(t, ids.ids[i++], &n);
            if (n > at - pos || memcmp(piece, text + pos, n) != 0) abort();
        }
        if (want < 0) break;
        if (i >= ids.count || ids.ids[i++] != want) abort();
        pos = at + length;
    }
    if (i != ids.count) abort();
    token_list_free(&ids);
}

/* A text of special tokens, their halves and some regular tokens, overlapping every way. */
static size_t specials_text(const Tokenizer *t, uint8_t *text, size_t room) {
    size_t len = 0;
    for (int id = 0; id < tokenizer_vocab_size(t) && len < room; id++) {
        size_t n;
        const unsigned char *piece = tokenizer_piece(t, id, &n);
        if (!tokenizer_is_special(t, id) && id % 97 != 0) continue;
        size_t parts[3][2] = { {0, n}, {n / 2, n}, {0, (n + 1) / 2} };   /* whole, end, start */
        for (int k = 0; k < 3; k++) {
            size_t m = parts[k][1] - parts[k][0];
            if (m > room - len) return len;
            memcpy(text + len, piece + parts[k][0], m);
            len += m;
        }
    }
    return len;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0) return 0;
    if (data[0] < 64) {
        Tokenizer *t = load_bytes(data + 1, size - 1);
        if (t) {
            static const char text[] = "hello world <|eot_id|> \xff\xc3 12345 ab";
            exercise(t, (const uint8_t *)text, sizeof text - 1);
            static uint8_t mixed[2048];
            if (tokenizer_vocab_size(t) - 256 <= 300)   /* the naive search stays fast */
                check_specials(t, mixed, specials_text(t, mixed, sizeof mixed));
            for (int id = -1; id <= tokenizer_vocab_size(t); id++) {
                size_t n;
                tokenizer_piece(t, id, &n);
                tokenizer_is_special(t, id);
            }
            tokenizer_free(t);
        }
        return 0;
    }
    exercise(small_tok, data + 1, size - 1);
    if (real_tok) exercise(real_tok, data + 1, size - 1);
    return 0;
}
