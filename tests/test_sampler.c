/* test_sampler.c: run.c's sampler on logits given on stdin, for tests/test_sampler.py, which
   checks what it prints against a plain numpy reference. It includes run.c whole, so that it
   runs exactly the sampler the engine runs (run.c's main is renamed out of the way).

   Input, one case after another, whitespace separated (floats in any strtof format, e.g. hex):
     n temperature top_p top_k min_p repeat_penalty presence_penalty frequency_penalty
     repeat_last_n temperature_last n_history n_coins
     n_history token ids fed before (the penalties' look-back), n logits, n_coins coins
   Output per case: "picks" and the token drawn for each coin (-1: logits not all finite),
   then "weights" and the n weights the draw used for the first coin (hex; nothing for greedy
   or when refused). */

#define main run_main
#include "../run.c"
#undef main

static int read_case(SamplerParams *p, int *n, int *n_history, int *n_coins) {
    return scanf("%d %f %f %d %f %f %f %f %d %d %d %d", n, &p->temperature, &p->top_p,
                 &p->top_k, &p->min_p, &p->repeat_penalty, &p->presence_penalty,
                 &p->frequency_penalty, &p->repeat_last_n, &p->temperature_last, n_history,
                 n_coins) == 12;
}

static void read_floats(float *x, int n) {
    char word[64];
    for (int i = 0; i < n; i++) {
        if (scanf("%63s", word) != 1) die("test_sampler: input ended early");
        x[i] = strtof(word, NULL);
    }
}

int main(void) {
    SamplerParams p;
    int n, n_history, n_coins;
    while (read_case(&p, &n, &n_history, &n_coins)) {
        if (n < 1 || n_history < 0 || n_coins < 1) die("test_sampler: bad case header");
        int *history = checked_calloc((size_t)n_history + 1, sizeof(int), "history");
        for (int i = 0; i < n_history; i++)
            if (scanf("%d", &history[i]) != 1) die("test_sampler: input ended early");
        float *logits = checked_calloc((size_t)n, sizeof(float), "logits");
        float *scratch = checked_calloc((size_t)n, sizeof(float), "scratch");
        float *first_weights = checked_calloc((size_t)n, sizeof(float), "weights");
        float *coins = checked_calloc((size_t)n_coins, sizeof(float), "coins");
        read_floats(logits, n);
        read_floats(coins, n_coins);
        Sampler s;
        sampler_init(&s, &p, n, n_history + 1, 1);
        sampler_accept(&s, history, n_history, 0);
        printf("picks");
        for (int c = 0; c < n_coins; c++) {
            memcpy(scratch, logits, (size_t)n * sizeof(float));
            printf(" %d", sample_with_coin(&s, scratch, coins[c]));
            if (c == 0) memcpy(first_weights, scratch, (size_t)n * sizeof(float));
        }
        printf("\nweights");
        if (p.temperature > 0.0f && all_finite(logits, n))
            for (int i = 0; i < n; i++) printf(" %a", (double)first_weights[i]);
        printf("\n");
        sampler_free(&s);
        free(history);
        free(logits);
        free(scratch);
        free(first_weights);
        free(coins);
    }
    return 0;
}
