/* llama.cpp's own greedy continuation of a prompt of token ids, as the expected values of the
   GGUF import tests (tests/bench/make_gguf_data.py builds it against a llama.cpp checkout, with
   llama.cpp's public API only; nothing of llama.cpp is copied here).

   usage: llama_greedy MODEL.gguf STEPS THREADS ID...
   prints one line per step: the chosen id and its lead over the second most likely token
   (top logit minus the next), so that a test can tell a real disagreement from a near tie.
   Ties go to the lowest id, as in run.c. The prompt is fed as given (no BOS added). */
#include <stdio.h>
#include <stdlib.h>

#include "llama.h"

static void fail(const char *what) {
    fprintf(stderr, "llama_greedy: %s\n", what);
    exit(1);
}

int main(int argc, char **argv) {
    if (argc < 5) fail("usage: llama_greedy MODEL.gguf STEPS THREADS ID...");
    int steps = atoi(argv[2]), threads = atoi(argv[3]), n_prompt = argc - 4;
    llama_token *tokens = malloc(sizeof(llama_token) * (size_t)(n_prompt + steps));
    if (!tokens) fail("out of memory");
    for (int i = 0; i < n_prompt; i++) tokens[i] = atoi(argv[4 + i]);

    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) fail("cannot load the model");
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = cp.n_batch = cp.n_ubatch = (uint32_t)(n_prompt + steps + 16);
    cp.n_threads = cp.n_threads_batch = threads;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) fail("cannot make a context");
    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));

    llama_token *next = tokens;
    int n_next = n_prompt;
    for (int s = 0; s < steps; s++) {
        if (llama_decode(ctx, llama_batch_get_one(next, n_next)) != 0) fail("llama_decode failed");
        const float *logits = llama_get_logits_ith(ctx, -1);
        int best = 0, second = -1;
        for (int v = 1; v < n_vocab; v++) {
            if (logits[v] > logits[best]) second = best, best = v;
            else if (second < 0 || logits[v] > logits[second]) second = v;
        }
        printf("%d %.6g\n", best, logits[best] - logits[second]);
        tokens[n_prompt + s] = best;
        next = &tokens[n_prompt + s];
        n_next = 1;
    }
    llama_free(ctx);
    llama_model_free(model);
    free(tokens);
    return 0;
}
