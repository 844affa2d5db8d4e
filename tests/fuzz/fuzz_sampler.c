/* libFuzzer target: run.c's sampler on arbitrary logits and parameters.

   Input: 12 bytes of parameters, each mapped onto its flag's range as parse_options allows it
   (temperature, top-p, top-k, min-p, repeat penalty, presence and frequency penalties,
   repeat-last-n, the number of history tokens, a 3-byte coin), then that many history bytes
   (token ids modulo the vocabulary), then the logits as float32 (1 to 4096 of them; NaN and
   Inf included). Checks: -1 exactly when a logit is not finite, otherwise an id in range
   that the draw gave weight (for greedy: no id with a higher penalised logit).

   Build: make fuzz (clang -fsanitize=fuzzer,address,undefined). run.c is included whole with
   its main renamed; only functions that cannot exit() are called. */
#define main run_main
#include "../../run.c"
#undef main

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 12) return 0;
    const uint8_t *b = data;
    SamplerParams p = {
        .temperature = b[0] < 16 ? 0.0f : (float)b[0] / 25.0f,
        .top_p = (float)b[1] / 255.0f,
        .top_k = b[2],
        .min_p = b[3] < 128 ? 0.0f : (float)(b[3] - 128) / 127.0f,
        .repeat_penalty = b[4] < 64 ? 1.0f : 0.001f + (float)(b[4] - 64) / 40.0f,
        .presence_penalty = ((float)b[5] - 128.0f) / 4.0f,
        .frequency_penalty = ((float)b[6] - 128.0f) / 4.0f,
        .repeat_last_n = (int)b[7] - 1,
        .temperature_last = b[8] & 1,
    };
    size_t n_history = b[8] >> 1;
    float coin = (float)(b[9] | b[10] << 8 | b[11] << 16) / 16777216.0f;
    if (size < 12 + n_history + 4) return 0;
    size_t n = (size - 12 - n_history) / 4;
    if (n > 4096) n = 4096;
    float *logits = malloc(n * sizeof(float)), *copy = malloc(n * sizeof(float));
    int *history = malloc((n_history + 1) * sizeof(int));
    if (!logits || !copy || !history) { free(logits); free(copy); free(history); return 0; }
    memcpy(logits, data + 12 + n_history, n * sizeof(float));
    memcpy(copy, logits, n * sizeof(float));
    for (size_t i = 0; i < n_history; i++) history[i] = data[12 + i] % (int)n;

    Sampler s;
    sampler_init(&s, &p, (int)n, (int)n_history + 1, 7);
    sampler_accept(&s, history, (int)n_history, 0);
    int token = sample_with_coin(&s, logits, coin);
    if (!all_finite(copy, (int)n)) {
        if (token != -1) __builtin_trap();
    } else {
        if (token < 0 || token >= (int)n) __builtin_trap();
        if (p.temperature > 0.0f && !(logits[token] > 0.0f)) __builtin_trap();
        if (p.temperature == 0.0f)
            for (size_t i = 0; i < n; i++) if (logits[i] > logits[token]) __builtin_trap();
    }
    sampler_free(&s);
    free(logits);
    free(copy);
    free(history);
    return 0;
}
