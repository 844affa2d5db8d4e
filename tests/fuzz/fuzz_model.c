/* libFuzzer target: run.c's model-file loader on any byte string.

   The input is a whole model file image. validate_model() must accept or refuse it without
   reading outside it; when it accepts, the tensors are laid out over a 64-byte aligned copy
   (the alignment mmap gives) and a short forward pass reads every weight: two prompt tokens
   through the block path, then one through the decoding path.

   Build: make fuzz (clang -fsanitize=fuzzer,address,undefined). run.c is included whole with
   its main renamed; only functions that cannot exit() are called (libFuzzer counts an exit as
   a finding). */
#define main run_main
#include "../../run.c"
#undef main

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    unsigned char *image = aligned_alloc(TENSOR_ALIGN, (size + TENSOR_ALIGN) / TENSOR_ALIGN * TENSOR_ALIGN);
    if (!image) return 0;
    memcpy(image, data, size);
    Transformer tr = {0};
    char msg[160];
    const char *problem = validate_model(image, size, &tr.model.config, msg, sizeof msg);
    if (problem) {
        if (!problem[0]) __builtin_trap();  /* every refusal names its problem */
        free(image);
        return 0;
    }
    const Config *cfg = &tr.model.config;
    tr.model.weights.layers = calloc((size_t)cfg->n_layers, sizeof(Layer));
    if (!tr.model.weights.layers) { free(image); return 0; }
    uint64_t end = map_weights(cfg, image, &tr.model.weights);
    if (end != size) __builtin_trap();  /* the layout must be the one validate_model checked */
    int seq_len = cfg->max_seq_len < 3 ? cfg->max_seq_len : 3;
    alloc_state(&tr.state, cfg, seq_len, CACHE_F32);
    int tokens[2] = { 0, cfg->vocab_size - 1 };
    int n = seq_len >= 2 ? 2 : 1;
    float *logits = forward(&tr, tokens, n, 0, LOGITS_ALL);
    volatile float sink = logits[0];
    if (seq_len > n) {
        logits = forward(&tr, &tokens[1], 1, n, LOGITS_LAST);
        sink = logits[cfg->vocab_size - 1];
    }
    (void)sink;
    free_state(&tr.state);
    free(tr.model.weights.layers);
    free(image);
    return 0;
}
