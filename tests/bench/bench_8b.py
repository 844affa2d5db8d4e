"""Speed and memory of ./runomp at the Llama-3.1-8B shape (make bench-8b).

    /usr/bin/python3 tests/bench/bench_8b.py [--types q4_0,q8_0,bf16,fp32] [--modes map,read]
        [--caches cold,warm] [--rounds 2] [--threads 2] [--prompt 64] [--decode 32]
        [--hf DIR] [--dir build/bench8b] [--plan]

Creates a random checkpoint of the Llama-3.1-8B shape once (tests/make_checkpoint.py --preset
llama31-8b: dim 4096, 32 layers, 32/8 heads, ffn 14336, vocab 128256, untied, llama3 rope
factor 8; about 16 GB of bf16 in 4 shards) and exports it once per type, all under --dir. A
checkpoint or export that is there already is reused: both are written under a temporary name
and renamed when complete, so one that exists is whole. --hf takes an existing checkpoint of
that shape instead (nothing is written into it).

First it checks the free disk space: it prints what each file needs and skips the types (and
llama.cpp files) that do not fit, in --types order. The export's wall time and peak RSS
(ru_maxrss of export.py) are recorded when it runs, in TYPE.export.json beside the export.

Then, in --rounds rounds that interleave everything (reversed every other round), each type is
run with a --prompt-token prompt and --decode generated tokens, for each weight mode (map: -w map,
the memory-mapped file; read: -w read, the default where it fits) and page-cache state:
  cold: the file is dropped from the page cache (posix_fadvise DONTNEED) and the engine loads
        it from the disk itself: the time to first token includes reading it, and decoding
        then runs on the file as the engine's page faults brought it in;
  warm: the file is dropped, then read sequentially into the page cache (as a copy or a
        second run finds it) before the engine starts.
It records decode tok/s (from the arrival times of the generated ids: the engine prints one
decimal), prompt tok/s, time to first token (process start to the first id:
loading and the prompt included) and peak RSS. tests/bench/bandwidth.c runs before and after each
timing (bench.py's machinery), and decode is shown against the bandwidth limit: bandwidth /
weight bytes per token.

-w read holds the whole file in memory besides the page cache; where that cannot fit (a 16 GB
bf16 file twice in 24 GB), the warm case is skipped, and the cold case runs only when the file
plus 4 GiB is available after dropping its cache; skipped cases are said so.

With LLAMA_CPP_DIR (tests/bench/llama_cpp.py), llama.cpp's llama-bench runs in the same rounds on
GGUF files of the same weights (its same type, and its Q4_0), mapped, cold and warm alike, and
a table gives our ratios to it. llama-bench reports no load time, and times its prompt after a
warmup run over the mapped file; our prompt figure includes the first pass's page faults
(the TTFT column holds the whole start).
"""
import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import bench  # noqa: E402
import llama_cpp  # noqa: E402
import make_checkpoint  # noqa: E402

sys.path.insert(0, bench.ROOT)
import export  # noqa: E402  (the format's sizes)

ROOT = bench.ROOT
PYTHON = sys.executable
PRESET = "llama31-8b"
GB = 1e9
MARGIN = 2 * GB  # disk space left free


def checkpoint_bytes(cfg):
    specs = make_checkpoint.tensor_specs(cfg)
    return sum(math.prod(shape) for _, shape, _ in specs) * 2  # bf16


def export_bytes(cfg, wtype):
    """The export's size (docs/formats.md); a type export.py gains later is counted
    at q8_0's size, an upper bound for anything smaller."""
    c = {"dim": cfg["hidden_size"], "head_dim": make_checkpoint.head_dim(cfg),
         "n_heads": cfg["num_attention_heads"], "n_kv_heads": cfg["num_key_value_heads"],
         "hidden_dim": cfg["intermediate_size"], "n_layers": cfg["num_hidden_layers"],
         "vocab_size": cfg["vocab_size"], "tied_classifier": int(cfg["tie_word_embeddings"])}
    known = wtype if wtype in ("fp32", "bf16", "q8_0", "q4_0") else "q8_0"
    group_size = export.Q4_GROUP_SIZE if known == "q4_0" else export.DEFAULT_GROUP_SIZE
    return export.expected_size(export.tensor_plan(c), known, group_size)


def gguf_bytes(cfg, gtype):
    return checkpoint_bytes(cfg) / 2 * llama_cpp.BYTES_PER_WEIGHT[gtype]


def plan_disk(a, cfg, hf, llama_dir):
    """Which of the wanted files to make, given the free space: prints the plan and returns
    (our types, GGUF types)."""
    free = shutil.disk_usage(a.dir).free - MARGIN
    print(f"disk: {free / GB + MARGIN / GB:.1f} GB free under {a.dir} (keeping "
          f"{MARGIN / GB:.0f} GB free)")

    def take(label, path, size):
        nonlocal free
        if os.path.exists(path):
            print(f"  {label:24s} {size / GB:5.1f} GB  present")
            return True
        if size > free:
            print(f"  {label:24s} {size / GB:5.1f} GB  SKIPPED: does not fit "
                  f"({free / GB:.1f} GB left)")
            return False
        free -= size
        print(f"  {label:24s} {size / GB:5.1f} GB  to make")
        return True

    if not take("checkpoint (bf16)", os.path.join(hf, "config.json"), checkpoint_bytes(cfg)):
        raise SystemExit("bench_8b: not enough disk space for the checkpoint")
    types, made, tried = [], set(), set()
    for t in a.types:  # each type, then llama.cpp's files for it, in --types order
        if not take(f"export {t}", model_path(a, t), export_bytes(cfg, t)):
            continue
        types.append(t)
        if not llama_dir or t not in llama_cpp.OURS_TO_GGUF:
            continue
        g = llama_cpp.OURS_TO_GGUF[t]
        for want in [g] if g == "F32" else ["BF16", g, llama_cpp.REFERENCE]:
            if want in tried:
                continue
            tried.add(want)
            if want in ("Q8_0", "Q4_0") and "BF16" not in made:
                print(f"  {'llama.cpp ' + want:24s}          SKIPPED: the BF16 GGUF it is "
                      "made from does not fit")
            elif take(f"llama.cpp {want}", os.path.join(a.dir, f"llama-{want}.gguf"),
                      gguf_bytes(cfg, want)):
                made.add(want)
    ggufs = [g for g in llama_cpp.gguf_types(types) if g in made]
    return types, ggufs


def model_path(a, wtype):
    return os.path.join(a.dir, wtype + ".bin")


def make_hf(hf):
    """The random checkpoint, written under a temporary name and renamed when complete."""
    part = hf + ".part"
    shutil.rmtree(part, ignore_errors=True)
    print(f"creating the {PRESET} random checkpoint (once, a few minutes) ...", flush=True)
    start = time.perf_counter()
    make_checkpoint.make_checkpoint(part, PRESET)
    os.replace(part, hf)
    print(f"  {time.perf_counter() - start:.0f} s", flush=True)


def export_once(a, cfg, hf, wtype):
    """Exports hf to TYPE.bin unless there, recording wall time and peak RSS of export.py."""
    path, record = model_path(a, wtype), model_path(a, wtype)[:-4] + ".export.json"
    if os.path.exists(path):
        if wtype in ("fp32", "bf16", "q8_0", "q4_0") and \
                os.path.getsize(path) != export_bytes(cfg, wtype):
            raise SystemExit(f"bench_8b: {path} is not an export of this checkpoint's shape "
                             "(its size differs): delete it")
        if not os.path.exists(record):
            return None
        with open(record) as f:
            return json.load(f)
    print(f"exporting {wtype} (once) ...", flush=True)
    start = time.perf_counter()
    p = subprocess.Popen([PYTHON, os.path.join(ROOT, "export.py"), path, "--hf", hf,
                          "--dtype", wtype], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = p.stderr.read().decode()
    _, status, usage = os.wait4(p.pid, 0)
    if status != 0:
        raise SystemExit(f"bench_8b: export.py --dtype {wtype} failed:\n{err}")
    stats = {"seconds": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024}
    with open(record, "w") as f:
        json.dump(stats, f)
    print(f"  {stats['seconds']:.0f} s, peak RSS {stats['peak_rss_mib']:.0f} MiB", flush=True)
    return stats


def mem_available():
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024, int(fields["MemTotal"].split()[0]) * 1024


def read_fits(path, cache):
    """Whether -w read can hold the file in memory in this cache state; the reason if not."""
    size = os.path.getsize(path)
    bench.drop_cached(path)
    available, total = mem_available()
    if cache == "warm" and 2 * size + 4 * 2**30 > total:
        return f"the file ({size / GB:.1f} GB) twice, cached and read, exceeds RAM " \
               f"({total / GB:.1f} GB)"
    if size + 4 * 2**30 > available:
        return f"the file ({size / GB:.1f} GB) + 4 GiB exceeds the available memory " \
               f"({available / GB:.1f} GB)"
    return None


def prepare_cache(path, cache):
    """cold: dropped; warm: dropped, then read sequentially (see the module docstring)."""
    bench.drop_cached(path)
    if cache == "warm":
        bench.warm(path)


def run_rounds(a, models, ggufs, llama_dir, bw):
    cells = [("ours", t, m, c) for t in models for m in a.modes for c in a.caches]
    cells += [("llama.cpp", g, "map", c) for g in ggufs for c in a.caches]
    res = {cell: bench.new_result() for cell in cells}
    skipped = {}
    ids = [random.Random(0).randrange(128000) for _ in range(a.prompt)]
    for r in range(a.rounds):
        for cell in cells if r % 2 == 0 else cells[::-1]:
            engine, t, mode, cache = cell
            path = models[t] if engine == "ours" else ggufs[t]
            if mode == "read":
                reason = read_fits(path, cache)
                if reason:
                    skipped[cell] = reason
                    continue

            def timed():
                prepare_cache(path, cache)
                if engine == "ours":
                    return bench.run_engine(a.binary, path, ids, a.decode, a.threads,
                                            extra=("-w", mode),
                                            cache="as is", decode_from_output=True)
                pp, tg = llama_cpp.bench(llama_dir, path, a.prompt, a.decode, a.threads)
                return pp, tg, None, None

            (pp, tg, ttft, rss), before, after = bench.with_bandwidth(bw, a.threads, timed)
            gbps = (before + after) / 2
            bpt = bench.bytes_per_token(path) if engine == "ours" else \
                llama_cpp.bytes_per_token(llama_dir, path)
            frac = tg / (gbps * GB / bpt)
            bench.add(res[cell], pp=pp, tg=tg, ttft=ttft, rss=rss, bw=gbps, frac=frac)
            extra = f"  ttft {ttft:6.2f} s  rss {rss / 1024:5.1f} GiB" if ttft else ""
            print(f"round {r + 1} {engine:9s} {t:5s} {mode:4s} {cache}: bw {before:5.1f}/"
                  f"{after:5.1f} GB/s  decode {tg:5.2f} tok/s ({100 * frac:3.0f}% of bw)  "
                  f"prompt {pp:6.2f} tok/s{extra}", flush=True)
    for cell, reason in skipped.items():
        print(f"skipped {' '.join(cell)}: {reason}")
    return res


def report(a, res, exports, models, ggufs, llama_dir):
    med = statistics.median

    def cell_text(values, fmt):
        values = [v for v in values if v is not None]
        return fmt.format(med(values)) if values else "-"

    print(f"\n{bench.host()}; 8B shape, {a.threads} threads, prompt {a.prompt}, decode {a.decode}, medians of "
          f"{a.rounds} rounds")
    print("| engine | type | weights | page cache | GB/token | bandwidth GB/s | decode tok/s "
          "| decode/limit | map/read | prompt tok/s | TTFT s | peak RSS GiB | export s "
          "| export peak RSS MiB |")
    print("|" + "---|" * 14)
    for (engine, t, mode, cache), d in res.items():
        if not d["tg"]:
            continue
        path = models[t] if engine == "ours" else ggufs[t]
        bpt = bench.bytes_per_token(path) if engine == "ours" else \
            llama_cpp.bytes_per_token(llama_dir, path)
        read = res.get((engine, t, "read", cache))
        vs_read = "-"
        if mode == "map" and read and read["tg"]:
            vs_read = f"{med([x / y for x, y in zip(d['tg'], read['tg'])]):.2f}x"
        ex = exports.get(t) if engine == "ours" else None
        print(f"| {engine} | {t} | {mode} | {cache} | {bpt / GB:.2f} | {med(d['bw']):.1f} | "
              f"{med(d['tg']):.2f} | {100 * med(d['frac']):.0f}% | {vs_read} | "
              f"{med(d['pp']):.2f} | {cell_text(d['ttft'], '{:.1f}')} | "
              f"{cell_text([r and r / 1024 for r in d['rss']], '{:.1f}')} | "
              f"{ex and round(ex['seconds']) or '-'} | "
              f"{ex and round(ex['peak_rss_mib']) or '-'} |")
    if ggufs:
        for cache in a.caches:
            ours = {f"{t} {m} ({cache})": res[("ours", t, m, cache)] for t in models
                    for m in a.modes if res[("ours", t, m, cache)]["tg"]}
            base = {f"{t} {m} ({cache})": t for t in models for m in a.modes}
            lres = {g: res[("llama.cpp", g, "map", cache)] for g in ggufs}
            bench.against_llama_cpp(ours, base, lres, f"page cache {cache}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="q4_0,q8_0,bf16,fp32",
                    help="export.py --dtype values, in order of priority for the disk space")
    ap.add_argument("--modes", default="map,read", help="weights: map (default) and/or read")
    ap.add_argument("--caches", default="cold,warm", help="page-cache states: cold, warm")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--hf", help="an existing checkpoint of the 8B shape (default: DIR/hf, "
                                 "created once)")
    ap.add_argument("--dir", default=os.path.join(ROOT, "build", "bench8b"),
                    help="where the checkpoint, exports and GGUF files live")
    ap.add_argument("--binary", default=os.path.join(ROOT, "runomp"), help="engine to time")
    ap.add_argument("--plan", action="store_true", help="print the disk plan and stop")
    a = ap.parse_args()
    for name in ("types", "modes", "caches"):
        setattr(a, name, getattr(a, name).split(","))
    if set(a.modes) - {"map", "read"} or set(a.caches) - {"cold", "warm"}:
        raise SystemExit("bench_8b: --modes takes map,read and --caches cold,warm")
    os.makedirs(a.dir, exist_ok=True)
    os.makedirs(bench.BENCH, exist_ok=True)
    hf = a.hf or os.path.join(a.dir, "hf")
    cfg = dict(make_checkpoint.PRESETS[PRESET]["config"])
    if a.hf and not os.path.exists(os.path.join(a.hf, "config.json")):
        raise SystemExit(f"bench_8b: --hf {a.hf}: no config.json")
    if os.path.exists(os.path.join(hf, "config.json")):
        with open(os.path.join(hf, "config.json")) as f:
            found = json.load(f)
        if not a.hf and any(found.get(k) != v for k, v in cfg.items()):
            raise SystemExit(f"bench_8b: {hf} is not the {PRESET} checkpoint: delete it")
        cfg = found
    llama_dir = llama_cpp.find()
    types, gtypes = plan_disk(a, cfg, hf, llama_dir)
    print(f"comparing: ours {', '.join(types)}" + (f"; llama.cpp {', '.join(gtypes)}" if gtypes
                                                    else ""))
    if a.plan:
        return
    if not types:
        raise SystemExit("bench_8b: no weight type fits on the disk beside the checkpoint")
    if not os.path.exists(os.path.join(hf, "config.json")):
        make_hf(hf)
    exports = {t: export_once(a, cfg, hf, t) for t in types}
    models = {t: model_path(a, t) for t in types}
    ggufs = llama_cpp.make(llama_dir, hf, a.dir, gtypes) if gtypes else {}
    bw = bench.build_tool("bandwidth")
    res = run_rounds(a, models, ggufs, llama_dir, bw)
    report(a, res, exports, models, ggufs, llama_dir)


if __name__ == "__main__":
    main()
