"""run.c's sampler (through tests/test_sampler.c) against a plain numpy reference of both orders:
Meta's (penalties -> top-k -> temperature -> top-p -> min-p -> draw, the default) and llama.cpp's
chain (penalties -> top-k -> top-p -> min-p -> temperature -> draw). Synthetic logits: random at
several scales, flat (every token tied), few distinct values (many ties), huge, non-finite;
every stage alone and together, greedy included. Built natively and under ASan + UBSan."""
import os
import shutil
from collections import Counter

import numpy as np

np.seterr(over="ignore")  # huge logits overflow to inf on purpose, as in run.c

from common import REPO, run, scratch

WORK = scratch("sampler")
F32 = np.float32
# (temperature, top_p, top_k, min_p, repeat_penalty, presence, frequency, repeat_last_n)
OFF = (1.0, 1.0, 0, 0.0, 1.0, 0.0, 0.0, 64)
MODES = {
    "temperature 1": OFF,
    "temperature 0.6": (0.6,) + OFF[1:],
    "greedy": (0.0,) + OFF[1:],
    "Meta's defaults": (0.6, 0.9) + OFF[2:],
    "top-p 0.5": (1.0, 0.5) + OFF[2:],
    "top-p 0": (0.8, 0.0) + OFF[2:],
    "top-k 1": (1.0, 1.0, 1) + OFF[3:],
    "top-k 5": (0.7, 1.0, 5) + OFF[3:],
    "top-k 40 + top-p 0.9": (1.3, 0.9, 40) + OFF[3:],
    "min-p 0.05": (1.0, 1.0, 0, 0.05) + OFF[4:],
    "min-p 1": (0.5, 1.0, 0, 1.0) + OFF[4:],
    "all filters": (0.9, 0.95, 50, 0.1) + OFF[4:],
    "repeat penalty 1.3": (1.0, 1.0, 0, 0.0, 1.3, 0.0, 0.0, 64),
    "repeat penalty 0.7 (favours repeats)": (1.0, 1.0, 0, 0.0, 0.7, 0.0, 0.0, 16),
    "presence penalty": (1.0, 1.0, 0, 0.0, 1.0, 0.8, 0.0, 64),
    "frequency penalty": (1.0, 1.0, 0, 0.0, 1.0, 0.0, 0.6, 64),
    "negative frequency penalty": (1.0, 1.0, 0, 0.0, 1.0, 0.0, -0.5, 8),
    "penalties, whole context": (0.8, 1.0, 0, 0.0, 1.2, 0.3, 0.2, -1),
    "penalties off by last-n 0": (0.8, 1.0, 0, 0.0, 1.5, 0.5, 0.5, 0),
    "greedy with penalties": (0.0, 0.9, 0, 0.0, 1.5, 0.4, 0.3, 32),
    "everything": (0.7, 0.8, 30, 0.02, 1.1, 0.2, 0.1, 64),
}
# every mode in both orders where the temperature is not 1 and a filter it moves is on
ORDERED_MODES = [(mode, "meta") for mode in MODES.items()] + \
    [(mode, "llama.cpp") for mode in MODES.items()
     if mode[1][0] not in (0.0, 1.0) and (mode[1][1] < 1 or mode[1][3] > 0)]


def build(name, flags):
    out = os.path.join(WORK, "test_sampler-" + name)
    if not os.path.exists(out):
        run([flags[0], "-std=c11", "-Wall", "-Wextra", "-Werror", *flags[1:], "-o", out,
             os.path.join(REPO, "tests", "test_sampler.c"), os.path.join(REPO, "tokenizer.c"),
             "-lm"])
    return out


def penalised(logits, params, history):
    """llama.cpp's penalties, in float32 as run.c computes them."""
    l = logits.copy()
    _, _, _, _, repeat, presence, frequency, last_n, _ = params
    if last_n == 0 or (repeat == 1 and presence == 0 and frequency == 0):
        return l
    window = history if last_n < 0 else history[-last_n:] if history else []
    big = np.finfo(F32).max
    for token, count in Counter(window).items():
        v = l[token]
        v = v * F32(repeat) if v <= 0 else v / F32(repeat)
        v = F32(v - (F32(count) * F32(frequency) + F32(presence)))
        l[token] = np.clip(v, -big, big) if np.isfinite(v) else np.copysign(big, v)
    return l


def reference(logits, params, history):
    """(weights the draw uses, in id order) or None for greedy; and the greedy pick."""
    temperature, top_p, top_k, min_p = params[:4]
    # top-p and min-p see the tempered probabilities in Meta's order, temperature 1's in llama.cpp's
    filter_t = F32(1.0) if params[-1] == "llama.cpp" else F32(temperature)
    l = penalised(logits, params, history)
    if temperature == 0:
        return None, int(np.argmax(l))  # the first maximum: the lowest id on a tie
    n = len(l)
    m = l.max()
    order = np.lexsort((np.arange(n), -l))  # logit descending, id ascending
    keep = top_k if 0 < top_k < n else n
    if top_p < 1:
        w = np.exp(((l[order[:keep]] - m) / filter_t).astype(np.float64))
        reached = np.nonzero(np.cumsum(w) >= float(F32(top_p)) * w.sum())[0]
        keep = max(1, reached[0] + 1) if len(reached) else keep
    survivors = order[:keep]
    if min_p > 0:
        floor = F32(m + F32(F32(np.log(F32(min_p))) * filter_t))
        survivors = survivors[l[survivors] >= floor]
    weights = np.zeros(n)
    weights[survivors] = np.exp(((l[survivors] - m) / F32(temperature)).astype(np.float64))
    return weights, None


def draw(weights, coin):
    """The first id whose cumulative weight passes coin * total; None when within rounding."""
    cdf = np.cumsum(weights)
    target = coin * cdf[-1]
    if np.min(np.abs(cdf - target)) <= 1e-6 * cdf[-1]:
        return None
    return int(np.searchsorted(cdf, target, side="right"))


def cases():
    """[(name, logits float32, params, history, coins)]"""
    rng = np.random.default_rng(15)
    out = []
    logit_sets = {
        "normal": lambda n: rng.standard_normal(n),
        "wide": lambda n: 10 * rng.standard_normal(n),
        "flat": lambda n: np.zeros(n),
        "few values": lambda n: rng.integers(-3, 3, n).astype(float),
        "ascending": lambda n: np.linspace(-5, 5, n),
        "huge": lambda n: rng.choice([-3e38, 3e38, 0.0, 1.0], n),
    }
    for kind, make in logit_sets.items():
        for n in (1, 2, 7, 300, 5000):
            logits = make(n).astype(F32)
            for (name, params), order in ORDERED_MODES:
                history = [int(t) for t in rng.integers(0, n, rng.integers(0, 100))]
                history += [int(np.argmax(logits))] * 3  # the favourite, repeated
                coins = [float(F32(c)) for c in rng.random(6)] + [0.0, float(F32(1 - 2 ** -24))]
                out.append((f"{kind} n={n} {name} ({order})", logits, params + (order,), history,
                            coins))
    return out


def run_cases(binary, case_list):
    lines = []
    for _, logits, params, history, coins in case_list:
        t, p, k, mp, rp, pp, fp, last_n, order = params
        lines.append(f"{len(logits)} {t} {p} {k} {mp} {rp} {pp} {fp} {last_n} "
                     f"{int(order == 'llama.cpp')} {len(history)} {len(coins)}")
        lines.append(" ".join(map(str, history)))
        lines.append(" ".join(float(x).hex() for x in logits))
        lines.append(" ".join(float(c).hex() for c in coins))
    out = run([binary], input=("\n".join(lines) + "\n").encode()).stdout.decode().splitlines()
    assert len(out) == 2 * len(case_list), (len(out), len(case_list))
    return [(out[2 * i].split()[1:], out[2 * i + 1].split()[1:]) for i in range(len(case_list))]


def check(binary, case_list):
    checked_picks = 0
    for (name, logits, params, history, coins), (picks, weights) in zip(case_list,
                                                                         run_cases(binary, case_list)):
        picks = [int(p) for p in picks]
        if not np.isfinite(logits).all():
            assert picks == [-1] * len(coins), (name, picks)
            continue
        want, greedy = reference(logits, params, history)
        if want is None:
            assert picks == [greedy] * len(coins), (name, picks, greedy)
            checked_picks += len(coins)
            continue
        # The survivors and their probabilities. run.c's float32 weights underflow to 0 where
        # the reference's float64 ones are below ~1e-45, hence the absolute tolerance.
        got = np.array([float.fromhex(w) for w in weights])
        assert np.allclose(got / got.sum(), want / want.sum(), rtol=1e-5, atol=1e-9), \
            (name, np.nonzero(got)[0][:20], np.nonzero(want)[0][:20])
        assert not np.any((got > 0) & (want == 0)), name  # nothing filtered was drawable
        for coin, pick in zip(coins, picks):
            assert want[pick] > 0, (name, coin, pick)  # never a filtered token
            expected = draw(want, coin)
            if expected is not None:
                assert pick == expected, (name, coin, pick, expected)
                checked_picks += 1
    return checked_picks


def test_sampler_against_numpy_reference():
    case_list = cases()
    picks = check(build("native", ["cc", "-O2"]), case_list)
    print(f"    {len(case_list)} cases ({len(ORDERED_MODES)} modes and orders); "
          f"{picks} draws match the reference")


def test_sorting_fallback_of_quickselect():
    """select_prefix sorts what is left after SELECT_ROUNDS rounds (the worst-case bound);
    built with 0 rounds, that path alone must give the same results."""
    case_list = [c for i, c in enumerate(cases()) if i % 2 == 0]
    check(build("sort", ["cc", "-O2", "-DSELECT_ROUNDS=0"]), case_list)


def test_nonfinite_logits_refused_in_every_mode():
    rng = np.random.default_rng(14)
    case_list = []
    for bad in (np.nan, np.inf, -np.inf):
        for (name, params), order in ORDERED_MODES:
            logits = rng.standard_normal(50).astype(F32)
            logits[rng.integers(0, 50)] = bad
            case_list.append((f"{bad} {name}", logits, params + (order,), [1, 2, 2], [0.5]))
    check(build("native", ["cc", "-O2"]), case_list)


def test_flat_vocabulary_without_sorting_it():
    """128K tied logits under top-p (the case that sorted the vocabulary): the draw is the
    coin's share of the 90% nucleus, ids in order."""
    n = 128256
    case_list = [("flat 128K top-p 0.9", np.zeros(n, F32), (0.6, 0.9) + OFF[2:] + ("meta",), [],
                  [0.5, 0.25]),
                 ("flat 128K top-k 40", np.zeros(n, F32), (0.6, 1.0, 40) + OFF[3:] + ("meta",), [],
                  [0.99])]
    (p1, w1), (p2, w2) = run_cases(build("native", ["cc", "-O2"]), case_list)
    nucleus = int(np.ceil(0.9 * n))
    assert [int(p) for p in p1] == [nucleus // 2, nucleus // 4], p1
    assert sum(float.fromhex(w) > 0 for w in w1) == nucleus
    assert [int(p) for p in p2] == [39], p2


def test_sampler_under_sanitizers():
    clang = shutil.which("clang")
    assert clang, "clang is needed for the sanitizer build (Debian: apt-get install clang)"
    binary = build("sanitize", [clang, "-g", "-O1", "-fsanitize=address,undefined",
                                "-fno-sanitize-recover=all"])
    case_list = [c for i, c in enumerate(cases()) if i % 3 == 0]
    picks = check(binary, case_list)
    print(f"    {len(case_list)} cases under ASan + UBSan, {picks} draws match")
