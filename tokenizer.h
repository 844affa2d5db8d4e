/* tokenizer.h: the Llama 3 tokenizer (byte-level BPE, tiktoken semantics).

   Loads a ".tok" file (format "L3TK" v1, see docs/formats.md) and gives exactly
   the ids of Meta's reference tokenizer (tiktoken with Llama 3's split pattern) for any input,
   including bytes that are not valid UTF-8.

   Typical use:

       char err[256];
       Tokenizer *t = tokenizer_load("model.tok", err, sizeof err);
       if (!t) { fprintf(stderr, "%s\n", err); exit(1); }
       TokenList ids = {0};
       if (tokenizer_encode(t, text, strlen(text), TOKENIZER_ADD_BOS, &ids) != 0) ...;
       ... ids.ids[0 .. ids.count-1] ...
       token_list_free(&ids);
       tokenizer_free(t);

   A Tokenizer is read-only after loading: one may be shared by several threads.
   There is no global mutable state. */
#ifndef TOKENIZER_H
#define TOKENIZER_H

#include <stddef.h>

typedef struct Tokenizer Tokenizer;

/* Loads a .tok file. On any error (missing file, bad magic or version, truncated or trailing
   data, empty or duplicate token, missing single-byte token, bad special count, out of memory)
   returns NULL and writes a one-line message (no newline) into err (if err_size > 0). The header
   is checked before the rest of the file is read. Loading reads /dev/urandom for the key of its
   hash tables (so no file can make them slow); without it the key comes from the clock. */
Tokenizer *tokenizer_load(const char *path, char *err, size_t err_size);
void tokenizer_free(Tokenizer *t);

/* Number of ids, special tokens included (128256 for Llama 3). */
int tokenizer_vocab_size(const Tokenizer *t);

/* The id of the special token whose text is `text` (e.g. "<|eot_id|>"), or -1 if none. */
int tokenizer_special_id(const Tokenizer *t, const char *text);

/* 1 if id is a special token (the last n_special ids), 0 otherwise (also for bad ids). */
int tokenizer_is_special(const Tokenizer *t, int id);

/* The bytes of one token (for a special token: its text), not NUL-terminated; *len gets the
   length. NULL (and *len = 0) for an id out of range. The bytes live as long as t. */
const unsigned char *tokenizer_piece(const Tokenizer *t, int id, size_t *len);

/* A growable list of token ids owned by the caller. Start from {0} (or reuse one: set count to
   0); free with token_list_free. */
typedef struct {
    int *ids;
    size_t count;
    size_t capacity;
} TokenList;

/* Appends one id. Returns 0, or TOKENIZER_ERR_NOMEM (the list is unchanged). */
int token_list_push(TokenList *list, int id);
void token_list_free(TokenList *list);

/* Flags for tokenizer_encode. */
enum {
    TOKENIZER_ADD_BOS = 1,        /* prepend <|begin_of_text|> (looked up by its text) */
    TOKENIZER_ALLOW_SPECIAL = 2   /* special-token text in the input becomes the special id;
                                     without this flag "<|eot_id|>" in the text is plain text */
};

/* Return codes. */
enum {
    TOKENIZER_OK = 0,
    TOKENIZER_ERR_NOMEM = -1,     /* out of memory (also: one pre-token of 2 GiB or more) */
    TOKENIZER_ERR_NO_BOS = -2     /* TOKENIZER_ADD_BOS, but no <|begin_of_text|> in the vocab */
};

/* Encodes len bytes of text (may contain NUL bytes and invalid UTF-8) and APPENDS the ids to
   out. Returns TOKENIZER_OK or an error code; on error out->count is restored to its value
   on entry.
   Bytes that are not part of a well-formed UTF-8 sequence (as Python's decoder with
   errors="surrogateescape" would escape them: stray continuation bytes, overlong forms,
   surrogates, values above U+10FFFF, truncated sequences) each count as one character that is
   neither a letter, a number nor white space for the split pattern; they keep their own byte,
   so concatenating the pieces of the ids always gives back the input exactly. */
int tokenizer_encode(const Tokenizer *t, const char *text, size_t len, int flags,
                     TokenList *out);

/* Streaming UTF-8 decoder: feed it the bytes of tokens as they come; it writes out only
   complete, valid UTF-8. A character split across tokens is held back until its last byte
   arrives. Bytes that cannot be part of valid UTF-8 are replaced by U+FFFD (EF BF BD), one per
   maximal ill-formed subpart, which is what Python's bytes.decode("utf-8", "replace") and
   the WHATWG TextDecoder do; so the output of all feeds plus the flush equals that decode of
   the concatenated input. Start from a zeroed Utf8Decoder (= {0}). */
typedef struct {
    unsigned char pending[4];   /* start of an incomplete character */
    int n_pending;
} Utf8Decoder;

/* Room utf8_decoder_feed may need in `out` for `len` input bytes. */
#define UTF8_DECODER_OUT_MAX(len) (3 * (size_t)(len) + 12)

/* Decodes len bytes into out, which must hold UTF8_DECODER_OUT_MAX(len) bytes. Returns the
   number of bytes written (not NUL-terminated). */
size_t utf8_decoder_feed(Utf8Decoder *d, const unsigned char *bytes, size_t len,
                         unsigned char *out);

/* End of stream: writes U+FFFD for an incomplete character still held (out needs 3 bytes),
   resets the decoder, returns the number of bytes written (0 or 3). */
size_t utf8_decoder_flush(Utf8Decoder *d, unsigned char *out);

#endif
