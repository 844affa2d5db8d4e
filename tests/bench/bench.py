"""Speed of ./runomp on a Llama-3.2-1B-shaped random checkpoint, per weight type.

    /usr/bin/python3 tests/bench/bench.py [--rounds 3] [--threads 2] [--prompt 512] [--decode 128]
                                    [--types fp32,bf16,q8_0,bf16:fast,q8_0:fast,...]
                                    [--parts-seconds 15] [--long 4096 --long-types q8_0
                                     --long-cache-types f32,bf16,q8_0 --long-rounds 1]

Creates the checkpoint once (tests/make_checkpoint.py --preset llama32-1b) and exports it per
weight type, caching both under build/bench/. Then, in rounds that interleave the weight types,
measures for each: decode tok/s (--decode tokens after a 1-token prompt), prompt tok/s (a
--prompt-token prompt), time to first token of that prompt (process start to the first id on
stdout, loading included) and peak RSS (the weights count, read into memory or mapped).
TYPE:fast runs the TYPE model with -a fast (llama.cpp's activation rounding), TYPE:map with
-w map (the weights mapped; by default they are read into memory where they fit), TYPE:read with
-w read, TYPE:fast+map with both.

Decoding reads every weight once per token, so its ceiling is bandwidth / bytes per token. The
machine's read bandwidth drifts by itself (here between ~36 and ~61 GB/s, for seconds to tens of
minutes), so tests/bench/bandwidth.c (compiled here with the engine's flags, same thread count) is run
right before and after every decode timing (retried, up to 3 times, when the two differ by more
than 10%: the state flipped during it), and the table shows decode against the mean of the two.
Medians over the rounds; when the readings span both bandwidth states, a second table gives each
type's decode per state (a median of rounds in different states means little), llama.cpp's too,
with the two engines' ratio where both ran in that state.

Prompt processing reuses each weight across the prompt's tokens, so its ceiling is arithmetic:
tests/bench/peak.c (compiled the same way) times the multiply-add instruction each variant's prompt
kernels are built on, and a table shows prompt multiply-adds per second against it.

tests/bench/decode_parts.c (compiled the same way, with run.c included) then splits each model's
decoding step into parts timed in turn within one process (--parts-seconds each): the memory's
contiguous read rate, the bytes decoding reads read in its order without arithmetic, the
matmuls, and the whole forward pass.

With LLAMA_CPP_DIR naming a llama.cpp build (tests/bench/llama_cpp.py), the same checkpoint is also
converted to GGUF (F32, BF16, Q8_0, and Q4_0 as a reference; once, under build/bench/), each
round also runs llama.cpp's llama-bench on them (same threads, prompt and decode lengths, one
repetition, interleaved with ours), and a table gives our speed as a ratio to llama.cpp's
same type and to its Q4_0.

With --long N, a further table decodes --decode tokens after a prompt that fills the context to N
(-c N): attention then reads a long KV cache on every token. It runs each of --long-types with
each KV cache type of --long-cache-types (--cache-type: f32, bf16, q8_0), interleaved, in
--long-rounds rounds (medians), and shows peak RSS against the model file plus the KV cache
that -c N allocates.
"""
import argparse
import os
import random
import statistics
import struct
import subprocess
import sys
import time

import llama_cpp

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BENCH = os.path.join(ROOT, "build", "bench")
PYTHON = sys.executable


def sh(args, **kw):
    return subprocess.run(args, check=True, cwd=ROOT, **kw)


def prepare(types):
    hf = os.path.join(BENCH, "hf")
    if not os.path.exists(os.path.join(hf, "config.json")):
        print("creating the llama32-1b random checkpoint (once) ...", flush=True)
        sh([PYTHON, "tests/make_checkpoint.py", hf, "--preset", "llama32-1b"],
           stdout=subprocess.DEVNULL)
    models = {}
    for t in types:
        path = os.path.join(BENCH, t + ".bin")
        if not os.path.exists(path):
            print(f"exporting {t} (once) ...", flush=True)
            sh([PYTHON, "export.py", path + ".part", "--hf", hf, "--dtype", t],
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            os.replace(path + ".part", path)
        drop_cached(path)
        models[t] = path
    parts = build_tool("decode_parts", ["run.c", "tokenizer.c", "tokenizer.h"],
                       ["tokenizer.c", "-lm"])
    return models, build_tool("bandwidth"), build_tool("peak"), parts


def build_tool(name, depends=(), link=()):
    """Compiles tests/bench/NAME.c with the engine's flags into build/bench/NAME (when it or one of
    the files it depends on changed)."""
    exe = os.path.join(BENCH, name)
    src = os.path.join(HERE, name + ".c")
    newest = max(os.path.getmtime(f) for f in [src] + [os.path.join(ROOT, d) for d in depends])
    if not os.path.exists(exe) or os.path.getmtime(exe) < newest:
        sh(["cc", "-std=c11", "-O3", "-march=native", "-fopenmp", "-o", exe, src]
           + [os.path.join(ROOT, f) if f.endswith(".c") else f for f in link])
    return exe


def header(path):
    """The model file's header fields that the bench needs (docs/formats.md)."""
    with open(path, "rb") as f:
        h = f.read(256)
    names = ("dim", "hidden", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab")
    c = dict(zip(names, struct.unpack_from("<7i", h, 8)))
    c["tied"], c["weight_type"], c["group_size"] = struct.unpack_from("<IIi", h, 68)
    return c


def bytes_per_token(path):
    """Weight bytes one decode step reads: the whole file but the embedding when untied (the
    embedding lookup reads one row); tied, the embedding is read whole as the classifier."""
    c = header(path)
    gs = c["group_size"]
    per_value = {0: 4.0, 1: 2.0, 2: 1.0 + 4.0 / gs if gs else 1.0,
                 3: 0.5 + 2.0 / gs if gs else 0.5}[c["weight_type"]]
    size = os.path.getsize(path)
    return size if c["tied"] else size - c["vocab"] * c["dim"] * per_value


def prompt_macs(path, n_prompt):
    """Multiply-adds per prompt token, as the engine does them: every layer's matrices and
    attention over (n_prompt + 1) / 2 positions on average (scores and values), except that the
    last layer takes only keys and values for all but the last token, whose classifier row is
    the only one computed."""
    c = header(path)
    q, kv = c["n_heads"] * c["head_dim"], c["n_kv_heads"] * c["head_dim"]
    layer = 2 * c["dim"] * q + 2 * c["dim"] * kv + 3 * c["dim"] * c["hidden"]
    attention = 2 * q * (n_prompt + 1) / 2
    keys_values = 2 * c["dim"] * kv
    last_token = layer - keys_values + 2 * q * n_prompt + c["dim"] * c["vocab"]
    return (c["n_layers"] - 1) * (layer + attention) + keys_values + last_token / n_prompt


def instruction(variant):
    """The multiply-add instruction that a variant's prompt kernels are built on (tests/bench/peak.c
    names): exact fp32 and bf16 widen to float32 FMAs, -a fast bf16 takes bf16 pairs, q8_0 int16
    pairs and -a fast q8_0 int8 quads; q4_0 the same as q8_0 (its rows widened from nibbles)."""
    fast = "-a" in flags(variant)
    return {"fp32": "fp32_fma", "bf16": "bf16_pairs" if fast else "fp32_fma",
            "q8_0": "int8_quads" if fast else "int16_pairs",
            "q4_0": "int8_quads" if fast else "int16_pairs"}[variant.split(":")[0]]


def peaks(peak, threads):
    """G multiply-adds/s that each instruction reaches with nothing else to do (tests/bench/peak.c;
    none without AVX-512, and the ceiling table is then left out)."""
    out = subprocess.run([peak, str(threads)], capture_output=True, text=True).stdout
    return {line.split()[0]: float(line.split()[2]) for line in out.splitlines()}


def bandwidth(bw, threads):
    out = subprocess.run([bw, "1024", "5", str(threads)], check=True, capture_output=True,
                         text=True).stdout.split()
    return float(out[0])  # best pass: the bandwidth available right now


def drop_cached(path):
    """Drops the file's pages from the page cache (once per bench run), so that warm() reads
    them back as the kernel lays out a file it reads ahead: 2 MB folios on Linux 6.x, which
    the engine's mapping gets as 2 MB pages. A file left cached as an older exporter or a
    download wrote it can sit in 4 KB folios, and decode ~10% slower mapped."""
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def warm(path):
    """Reads the model file so that it sits in the page cache: the timings are of the engine,
    not of the disk (other work on the machine can evict it between runs)."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(1 << 24)
        while f.readinto(buf):
            pass


def set_cache(path, cache):
    if cache == "warm":
        warm(path)
    elif cache == "cold":
        drop_cached(path)


CACHE_BYTES = {"f32": 4.0, "bf16": 2.0, "q8_0": 1.0 + 4.0 / 32}  # q8_0: a scale per 32


def kv_cache_bytes(path, context, cache_type="f32"):
    c = header(path)
    held = (context + 31) // 32 * 32  # run.c's cache_positions: whole pairs of key tiles
    return 2 * c["n_layers"] * held * c["n_kv_heads"] * c["head_dim"] * CACHE_BYTES[cache_type]


def flags(variant):
    """The engine flags of a variant: "q8_0:fast+map" -> -a fast -w map."""
    table = {"fast": ("-a", "fast"), "read": ("-w", "read"), "map": ("-w", "map")}
    options = variant.split(":")[1].split("+") if ":" in variant else []
    for o in options:
        if o not in table:
            raise SystemExit(f"bench: unknown option {o!r} in {variant!r} (fast, read, map)")
    return sum((table[o] for o in options), ())


def label_of(variant):
    return " ".join([variant.split(":")[0], *flags(variant)])


def run_engine(binary, model, ids, n_new, threads, context=None, extra=(), cache="warm",
               decode_from_output=False):
    """Runs runomp; returns (prompt tok/s, decode tok/s, seconds to first id, peak RSS MiB).
    cache: "warm" reads the model file into the page cache first, "cold" drops it from there
    (the engine then faults it in from the disk itself), "as is" leaves it.
    decode tok/s is the engine's own figure (one decimal; generated ids over the time after the
    prompt, which holds one step fewer), or with decode_from_output the steps between the first
    and the last id over the time between their arrivals: precise at a few tok/s."""
    set_cache(model, cache)
    args = [binary, model, *extra, "-I", " ".join(map(str, ids)), "-o", "ids",
            "-n", str(n_new), "-t", "0", "-e", "0", "-T", str(threads),
            "-c", str(context or len(ids) + n_new + 8)]
    start = time.perf_counter()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = bytearray(os.read(p.stdout.fileno(), 1 << 16))  # the engine flushes every id
    first = last = time.perf_counter()
    while True:
        chunk = os.read(p.stdout.fileno(), 1 << 16)
        if not chunk:
            break
        out += chunk
        last = time.perf_counter()
    err = p.stderr.read().decode()
    _, status, usage = os.wait4(p.pid, 0)
    if status != 0 or not out:
        raise SystemExit(f"runomp failed ({status}):\n{err}\n{bytes(out[:200])}")
    line = [l for l in err.splitlines() if l.startswith("prompt:")][-1]
    # "prompt: N tokens, X tok/s; generated: M tokens, Y tok/s"
    parts = line.replace(",", " ").replace(";", " ").split()
    decode = float(parts[8])
    if decode_from_output and n_new > 1 and last > first:
        decode = (n_new - 1) / (last - first)
    return float(parts[3]), decode, first - start, usage.ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--types",
                    default="fp32,bf16,q8_0,q4_0,bf16:fast,q8_0:fast,q4_0:fast,bf16:map,q8_0:map,"
                            "q4_0:map",
                    help="weight types; TYPE:fast runs that model with -a fast, TYPE:map with "
                         "-w map, TYPE:read with -w read, TYPE:fast+map with both")
    ap.add_argument("--binary", default=os.path.join(ROOT, "runomp"), help="engine to time")
    ap.add_argument("--parts-seconds", type=float, default=15,
                    help="seconds of tests/bench/decode_parts.c per model (0: skip)")
    ap.add_argument("--long", type=int, default=0, help="also decode at this context length")
    ap.add_argument("--long-types", default="q8_0", help="weight types of the --long table")
    ap.add_argument("--long-cache-types", default="f32",
                    help="KV cache types of the --long table (f32, bf16, q8_0: --cache-type)")
    ap.add_argument("--long-rounds", type=int, default=1, help="rounds of the --long table")
    a = ap.parse_args()
    for cache_type in a.long_cache_types.split(","):
        if cache_type not in CACHE_BYTES:
            raise SystemExit(f"bench: unknown cache type {cache_type!r} (f32, bf16, q8_0)")
    types = a.types.split(",")
    long_types = a.long_types.split(",") if a.long else []
    base = {t: t.split(":")[0] for t in types + long_types}
    extra = {t: flags(t) for t in types + long_types}
    models, bw, peak, parts = prepare(sorted(set(base.values())))
    llama_dir = llama_cpp.find()
    ggufs = {}
    if llama_dir:
        ggufs = llama_cpp.make(llama_dir, os.path.join(BENCH, "hf"), BENCH,
                               llama_cpp.gguf_types(sorted(set(base[t] for t in types))))
        for path in ggufs.values():
            drop_cached(path)  # as for ours: read back in the kernel's own folios
    ceilings = peaks(peak, a.threads)
    rng = random.Random(0)
    prompt = [rng.randrange(128000) for _ in range(a.prompt)]
    res = {t: new_result() for t in types}
    lres = {g: new_result() for g in ggufs}
    for r in range(a.rounds):
        order = types + list(ggufs)
        for t in order if r % 2 == 0 else order[::-1]:
            if t in ggufs:
                (pp, tg), before, after = with_bandwidth(bw, a.threads, lambda: llama_cpp.bench(
                    llama_dir, ggufs[t], a.prompt, a.decode, a.threads, warm))
                gbps = (before + after) / 2
                frac = tg / (gbps * 1e9 / llama_cpp.bytes_per_token(llama_dir, ggufs[t]))
                add(lres[t], pp=pp, tg=tg, bw=gbps, frac=frac)
                print(f"round {r + 1} llama.cpp {t:4s}: bw {before:5.1f}/{after:5.1f} GB/s  "
                      f"decode {tg:6.1f} tok/s ({100 * frac:4.0f}% of bw)  prompt {pp:6.1f} "
                      "tok/s", flush=True)
                continue
            model = models[base[t]]
            (_, tg, _, rss1), before, after = with_bandwidth(bw, a.threads, lambda: run_engine(
                a.binary, model, prompt[:1], a.decode, a.threads, extra=extra[t]))
            pp, _, ttft, rss2 = run_engine(a.binary, model, prompt, 1, a.threads,
                                           extra=extra[t])
            gbps = (before + after) / 2
            frac = tg / (gbps * 1e9 / bytes_per_token(model))
            add(res[t], pp=pp, tg=tg, ttft=ttft, rss=max(rss1, rss2), bw=gbps, frac=frac)
            print(f"round {r + 1} {t:9s}: bw {before:5.1f}/{after:5.1f} GB/s  decode "
                  f"{tg:6.1f} tok/s ({100 * frac:4.0f}% of bw)  prompt {pp:6.1f} tok/s  "
                  f"ttft {ttft:5.2f} s", flush=True)
    med = statistics.median
    kernels = subprocess.run([a.binary, "--version"], capture_output=True, text=True).stdout
    print(f"\n{host()}; {kernels.strip().rsplit(', ', 1)[-1]}; {a.threads} threads, prompt "
          f"{a.prompt}, decode {a.decode}, medians of {a.rounds}")
    print("| type | GB/token | bandwidth GB/s | decode tok/s | bw limit tok/s | decode/limit "
          "| prompt tok/s | TTFT s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in types:
        d = res[t]
        bpt = bytes_per_token(models[base[t]])
        label = label_of(t)
        print(f"| {label} | {bpt / 1e9:.2f} | {med(d['bw']):.1f} | {med(d['tg']):.1f} | "
              f"{med(d['bw']) * 1e9 / bpt:.1f} | {100 * med(d['frac']):.0f}% | {med(d['pp']):.1f} "
              f"| {med(d['ttft']):.2f} | {med(d['rss']):.0f} |")
    if ggufs:
        against_llama_cpp({label_of(t): res[t] for t in types},
                          {label_of(t): base[t] for t in types}, lres)
    by_state(res, types, base, lres)
    against_peak(res, types, models, base, ceilings, a.prompt)
    if a.parts_seconds > 0:
        decode_parts(parts, [(models[base[t]], extra[t]) for t in types if "-w" not in extra[t]],
                     a)
    if a.long:
        long_context(a, models, bw, rng, base, extra)


def host():
    """The CPU model and how many CPUs this machine shows, for the table's heading."""
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{names[0] if names else 'unknown CPU'}, {len(names)} CPUs"


def new_result():
    return {"pp": [], "tg": [], "ttft": [], "rss": [], "bw": [], "frac": []}


def add(result, **values):
    for key, value in values.items():
        result[key].append(value)


def with_bandwidth(bw, threads, timed):
    """Runs timed() between two bandwidth readings; again (up to 3 more times) when they differ
    by more than 10%: the bandwidth state flipped during it. Returns (its result, before, after)."""
    for attempt in range(4):
        before = bandwidth(bw, threads)
        result = timed()
        after = bandwidth(bw, threads)
        if abs(before - after) <= 0.1 * max(before, after):
            break
    return result, before, after


def rate(tok_s):
    """tok/s with 3 significant digits or more: 8B decodes at a few tok/s."""
    return f"{tok_s:.2f}" if tok_s < 10 else f"{tok_s:.1f}"


def against_llama_cpp(ours, base, lres, condition="mapped"):
    """llama.cpp's figures of the same run and our ratios to them. ours: {label: result},
    base: {label: our weight type}, lres: {GGUF type: result}. Ratios are medians of the
    per-round ratios, against the same type and against llama.cpp's Q4_0 (the type most people
    run). A round's two runs can meet different bandwidth states: by_state pairs them by state."""
    med = statistics.median
    print(f"\nllama.cpp llama-bench, same run, interleaved ({condition}, medians)")
    print("| llama.cpp type | bandwidth GB/s | decode tok/s | decode/limit | prompt tok/s |")
    print("|---|---|---|---|---|")
    for g, d in lres.items():
        print(f"| {g} | {med(d['bw']):.1f} | {rate(med(d['tg']))} | {100 * med(d['frac']):.0f}% "
              f"| {rate(med(d['pp']))} |")

    def ratio(d, g, key):
        if g not in lres or not lres[g][key]:
            return "-"
        pairs = [x / y for x, y in zip(d[key], lres[g][key]) if y > 0]
        return f"{med(pairs):.2f}x" if pairs else "-"

    q4 = llama_cpp.REFERENCE
    print(f"\nllama3.c against llama.cpp (decode and prompt, same type and {q4})")
    print(f"| llama3.c | llama.cpp type | decode | decode vs {q4} | prompt | prompt vs {q4} |")
    print("|---|---|---|---|---|---|")
    for label, d in ours.items():
        g = llama_cpp.OURS_TO_GGUF.get(base[label], "-")
        print(f"| {label} | {g} | {ratio(d, g, 'tg')} | {ratio(d, q4, 'tg')} "
              f"| {ratio(d, g, 'pp')} | {ratio(d, q4, 'pp')} |")


def by_state(res, types, base, lres):
    """Decode per bandwidth state: medians of rounds taken in different states mix them, so
    when the readings span two (the highest 1.3x the lowest or more), the rounds are split at
    the midpoint and each side shown as a range, llama.cpp's rounds too; "vs llama.cpp" is the
    ratio of the two engines' medians on the same side, same type (a round's pair need not
    share its state: each run waits for a steady one, and the state can flip between them)."""
    readings = [g for d in [res[t] for t in types] + list(lres.values()) for g in d["bw"]]
    low, high = min(readings), max(readings)
    if high < 1.3 * low:
        return
    cut = (low + high) / 2
    sides = (lambda g: g >= cut, lambda g: g < cut)
    print(f"\ndecode by bandwidth state (readings {low:.1f}-{high:.1f} GB/s, split at {cut:.1f})")
    print("| type | high: GB/s | decode tok/s | of limit | vs llama.cpp | low: GB/s | decode tok/s "
          "| of limit | vs llama.cpp |")
    print("|---|---|---|---|---|---|---|---|---|")

    def span(values, scale=1.0, digits=1):
        if not values:
            return "-"
        lo, hi = min(values) * scale, max(values) * scale
        return f"{lo:.{digits}f}" if round(lo, digits) == round(hi, digits) else \
            f"{lo:.{digits}f}-{hi:.{digits}f}"

    def decodes(d, side):
        return [tg for tg, g in zip(d["tg"], d["bw"]) if side(g)]

    rows = [(label_of(t), res[t], lres.get(llama_cpp.OURS_TO_GGUF.get(base[t]))) for t in types]
    rows += [(f"llama.cpp {g}", d, None) for g, d in lres.items()]
    for label, d, theirs in rows:
        cells = []
        for side in sides:
            rounds = [i for i, g in enumerate(d["bw"]) if side(g)]
            tg, their_tg = decodes(d, side), decodes(theirs, side) if theirs else []
            versus = f"{statistics.median(tg) / statistics.median(their_tg):.2f}x" \
                if tg and their_tg else "-"
            cells += [span([d["bw"][i] for i in rounds]), span(tg),
                      span([d["frac"][i] for i in rounds], 100, 0) + ("%" if rounds else ""),
                      versus]
        print(f"| {label} | " + " | ".join(cells) + " |")


def against_peak(res, types, models, base, ceilings, n_prompt):
    """Prompt speed against the arithmetic ceiling, as decode is shown against bandwidth."""
    if not ceilings:
        return
    print("\nprompt against the multiply-add ceiling (tests/bench/peak.c, measured at the start)")
    print("| type | instruction | ceiling G MAC/s | M MAC/token | prompt tok/s | G MAC/s "
          "| of ceiling |")
    print("|---|---|---|---|---|---|---|")
    for t in types:
        name, macs = instruction(t), prompt_macs(models[base[t]], n_prompt)
        pp = statistics.median(res[t]["pp"])
        if name not in ceilings:
            continue
        print(f"| {label_of(t)} | {name} | {ceilings[name]:.1f} | {macs / 1e6:.0f} | {pp:.1f} | "
              f"{pp * macs / 1e9:.1f} | {100 * pp * macs / 1e9 / ceilings[name]:.0f}% |")
    if has_amx():
        print("(this CPU has AMX: q8_0 and q4_0 prompts run on its tiles where Linux grants them,"
              " beyond the VNNI ceilings above)")


def has_amx():
    """Whether the CPU has AMX (run.c's matmul_tiles then takes q8_0 and q4_0 prompts)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return False


def decode_parts(parts, variants, a):
    """Where a decoding step's time goes (tests/bench/decode_parts.c): the memory's contiguous rate,
    the same bytes read as decoding reads them, the matmuls, the whole forward pass, timed in
    turn within one process so that bandwidth flips hit all four alike."""
    print(f"\nwhere decoding's time goes (tests/bench/decode_parts.c, {a.parts_seconds:g} s each, "
          "medians; % of contiguous)")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    for path, extra in variants:
        fast = ["fast"] if "-a" in extra else []
        out = subprocess.run([parts, path, str(a.parts_seconds)] + fast, check=True, env=env,
                             capture_output=True, text=True).stdout
        print(out.rstrip(), flush=True)


def long_context(a, models, bw, rng, base, extra):
    """Decode speed with the context nearly full, per weight type and KV cache type, and memory
    against file + KV cache."""
    ids = [rng.randrange(128000) for _ in range(a.long - a.decode - 8)]
    print(f"\ncontext {a.long}: decode {a.decode} tokens after a {len(ids)}-token prompt")
    runs = [(t, c) for t in a.long_types.split(",") for c in a.long_cache_types.split(",")]
    res = {run: new_result() for run in runs}
    for r in range(a.long_rounds):
        for t, cache_type in runs if r % 2 == 0 else runs[::-1]:
            model = models[base[t]]
            before = bandwidth(bw, a.threads)
            pp, tg, _, rss = run_engine(a.binary, model, ids, a.decode, a.threads, a.long,
                                        extra[t] + ("--cache-type", cache_type))
            after = bandwidth(bw, a.threads)
            add(res[t, cache_type], pp=pp, tg=tg, rss=rss, bw=(before + after) / 2)
            print(f"round {r + 1} {label_of(t)}, {cache_type} cache: decode {tg:.1f} tok/s, "
                  f"prompt {pp:.1f} tok/s", flush=True)
    med = statistics.median
    print(f"\n{host()}; {a.threads} threads, context {a.long}, medians of {a.long_rounds}")
    print("| type | KV cache | bandwidth GB/s | decode tok/s | prompt tok/s | peak RSS MiB "
          "| file + KV cache MiB |")
    print("|---|---|---|---|---|---|---|")
    for t, cache_type in runs:
        d = res[t, cache_type]
        model = models[base[t]]
        expected = (os.path.getsize(model) + kv_cache_bytes(model, a.long, cache_type)) / 2**20
        print(f"| {label_of(t)} | {cache_type} | {med(d['bw']):.1f} | {med(d['tg']):.1f} | "
              f"{med(d['pp']):.1f} | {med(d['rss']):.0f} | {expected:.0f} |", flush=True)


if __name__ == "__main__":
    main()
