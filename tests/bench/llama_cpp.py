"""llama.cpp as a measuring stick for the benches (tests/bench/bench.py, tests/bench/bench_8b.py): GGUF
files of the bench's own checkpoints, and timings of llama.cpp's llama-bench on them.

LLAMA_CPP_DIR names a llama.cpp checkout built with its CMake build in build/ (targets
llama-bench and llama-quantize). Nothing of llama.cpp is copied into this project: the GGUF
conversion (tests/bench/gguf_from_hf.py) imports the checkout's own gguf-py.

Types compared: our fp32, bf16, q8_0 and q4_0 against llama.cpp's F32, BF16, Q8_0 and Q4_0
of the same weights, and llama.cpp's Q4_0 as a reference for all of them. F32 and BF16 are converted from the checkpoint;
Q8_0 and Q4_0 are made from the BF16 (else F32) file by llama-quantize --pure (every matrix
in that type, no mixtures).
"""
import functools
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OURS_TO_GGUF = {"fp32": "F32", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}
REFERENCE = "Q4_0"
# bytes per weight of each GGUF type (Q8_0: 32 int8 + an f16 scale; Q4_0: 32 nibbles + f16)
BYTES_PER_WEIGHT = {"F32": 4.0, "BF16": 2.0, "Q8_0": 34 / 32, "Q4_0": 18 / 32}


def find():
    """The llama.cpp checkout named by LLAMA_CPP_DIR, or None when unset."""
    d = os.environ.get("LLAMA_CPP_DIR")
    if not d:
        return None
    for tool in ("llama-bench", "llama-quantize"):
        if not os.access(os.path.join(d, "build", "bin", tool), os.X_OK):
            raise SystemExit(f"bench: LLAMA_CPP_DIR={d}: no build/bin/{tool} (build it with "
                             f"cmake --build build --target llama-bench llama-quantize)")
    return d


def gguf_types(our_types):
    """The GGUF types to compare with our base types, the Q4_0 reference last."""
    same = [OURS_TO_GGUF[t] for t in our_types if t in OURS_TO_GGUF]
    return list(dict.fromkeys(same + [REFERENCE]))  # each once, in order


def make(llama_dir, hf, dest, types, log=print):
    """GGUF files of checkpoint hf, one per type, made once under dest: {type: path}."""
    models = {}
    for t in types:
        path = os.path.join(dest, f"llama-{t}.gguf")
        if not os.path.exists(path):
            if t in ("F32", "BF16"):
                log(f"converting to GGUF {t} (once) ...")
                subprocess.run([sys.executable, os.path.join(HERE, "gguf_from_hf.py"), hf, path,
                                "--type", t.lower(), "--llama-cpp", llama_dir],
                               check=True, stdout=subprocess.DEVNULL)
            else:
                source = models.get("BF16") or make(llama_dir, hf, dest, ["BF16"], log)["BF16"]
                log(f"llama-quantize --pure {t} (once) ...")
                quantize = os.path.join(llama_dir, "build", "bin", "llama-quantize")
                subprocess.run([quantize, "--pure", source, path + ".part", t],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                os.replace(path + ".part", path)
        models[t] = path
    return models


def bench(llama_dir, model, n_prompt, n_gen, threads, before=None):
    """One llama-bench run (one repetition; the caller interleaves): (prompt tok/s, decode
    tok/s). Default settings otherwise: the file is memory-mapped. before(model), when given,
    runs first (bench.py's warm: the file read into the page cache, as for ours)."""
    if before:
        before(model)
    exe = os.path.join(llama_dir, "build", "bin", "llama-bench")
    p = subprocess.run([exe, "-m", model, "-p", str(n_prompt), "-n", str(n_gen),
                        "-t", str(threads), "-r", "1", "-o", "json"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"llama-bench failed ({p.returncode}) on {model}:\n{p.stderr[-2000:]}")
    pp = tg = 0.0
    for test in json.loads(p.stdout):
        if test["n_gen"] == 0:
            pp = float(test["avg_ts"])
        else:
            tg = float(test["avg_ts"])
    return pp, tg


@functools.lru_cache(maxsize=None)  # reading a GGUF's 128K-token vocabulary takes seconds
def bytes_per_token(llama_dir, path):
    """Weight bytes one decode step reads: every tensor but the embedding, which is read whole
    only when it is also the classifier (no output tensor)."""
    sys.path.insert(0, os.path.join(llama_dir, "gguf-py"))
    import gguf
    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    total = sum(tensors.values())
    return total - tensors["token_embd.weight"] if "output.weight" in tensors else total
