#!/usr/bin/env python3
"""Makes tests/data/gguf/: small GGUF files written by llama.cpp's own tools, and llama.cpp's own
greedy continuations on them, the expected values of tests/test_gguf.py. llama.cpp is a
measuring stick, outside the project: nothing of it is copied here; this calls the tools of a
llama.cpp checkout built with CMake (LLAMA_CPP_DIR: build/bin/llama-quantize, libllama).

    LLAMA_CPP_DIR=/path/to/llama.cpp /usr/bin/python3 tests/bench/make_gguf_data.py [OUT_DIR]

How each file is made (docs/gguf.md says why these):
- F16/F32 GGUFs of the Hugging Face checkpoints: tests/bench/gguf_from_hf.py, which writes the file
  with llama.cpp's gguf-py as llama.cpp's convert_hf_to_gguf.py lays it out (that converter
  needs torch and transformers, which this machine's Debian does not have);
- the quantized GGUFs: llama-quantize from the F32 GGUF (`--pure`: every matrix in the type;
  Q4_K_M and Q5_K_M: llama.cpp's own mixtures, no --pure);
- llama3-vocab.gguf.xz: the vendored Llama 3 tokenizer as gguf-py writes it, without tensors,
  xz-compressed (7 MB -> ~2 MB);
- llama_cpp.json: per GGUF, prompts of token ids and llama.cpp's greedy ids on them, from
  tests/bench/llama_greedy.c (llama.cpp's C API: the prompt decoded as given, then the argmax of each
  step's logits, ties to the lowest id) with the lead of each chosen logit over the next one.
"""
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, TESTS)
import gguf_from_hf  # noqa: E402
import make_checkpoint  # noqa: E402

REFERENCE = os.path.join(TESTS, "data", "reference")
STEPS = 24
THREADS = 2


def tool(llama_dir, name):
    path = os.path.join(llama_dir, "build", "bin", name)
    if not os.access(path, os.X_OK):
        raise SystemExit(f"make_gguf_data: no {path} (cmake --build build --target {name})")
    return path


def build_greedy(llama_dir, work):
    """tests/bench/llama_greedy.c compiled against the checkout's headers and libllama."""
    exe = os.path.join(work, "llama_greedy")
    lib = os.path.join(llama_dir, "build", "bin")
    subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-I", os.path.join(llama_dir, "include"),
                    "-I", os.path.join(llama_dir, "ggml", "include"), "-o", exe,
                    os.path.join(HERE, "llama_greedy.c"), "-L", lib, "-lllama",
                    f"-Wl,-rpath,{lib}"], check=True)
    return exe


def convert(llama_dir, hf_dir, out, kind):
    gguf_from_hf.convert(hf_dir, out, kind, tokenizer_for(hf_dir), llama_dir)


def tokenizer_for(hf_dir):
    own = os.path.join(hf_dir, "tokenizer.json")
    return own if os.path.exists(own) else gguf_from_hf.VENDORED_TOKENIZER


def quantize(llama_dir, source, out, kind, pure):
    args = [tool(llama_dir, "llama-quantize"), *(["--pure"] if pure else []), source, out, kind]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return " ".join(["llama-quantize", *(["--pure"] if pure else []), "F32.gguf", kind])


def greedy(exe, model, prompt):
    """llama.cpp's greedy ids on model after prompt, and each step's lead (top - second)."""
    out = subprocess.run([exe, model, str(STEPS), str(THREADS), *map(str, prompt)],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    steps = [line.split() for line in out if line]
    return [int(i) for i, _ in steps], [float(m) for _, m in steps]


def reference_prompts(name):
    ref = json.load(open(os.path.join(REFERENCE, name, "reference.json")))
    return {p["name"]: p["tokens"] for p in ref["prompts"] if p["n_tokens"] <= 200}


def random_prompts(vocab, seed):
    rng = np.random.default_rng(seed)
    return {f"random{n}": [int(t) for t in rng.integers(0, vocab, n)] for n in (1, 7, 40)}


def vocab_only(llama_dir, out):
    """The Llama 3 vocabulary in a GGUF with no tensors (gguf_from_hf's metadata), xz'd."""
    gguf = gguf_from_hf.import_gguf(llama_dir)
    c = {"n_layers": 1, "max_seq_len": 131072, "dim": 64, "hidden_dim": 64, "n_heads": 1,
         "n_kv_heads": 1, "rope_theta": 500000.0, "norm_eps": 1e-5, "head_dim": 64,
         "vocab_size": 128256, "bos_id": 128000, "eos_ids": [128009]}
    plain = out[:-3]
    w = gguf.GGUFWriter(plain, "llama")
    gguf_from_hf.write_metadata(gguf, w, c, gguf.LlamaFileType.ALL_F32,
                                gguf_from_hf.VENDORED_TOKENIZER)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with open(plain, "rb") as f, lzma.open(out, "wb", preset=9) as z:
        shutil.copyfileobj(f, z)
    os.remove(plain)


def main(argv):
    llama_dir = os.environ.get("LLAMA_CPP_DIR")
    if not llama_dir:
        raise SystemExit("make_gguf_data: set LLAMA_CPP_DIR to a llama.cpp checkout built with CMake")
    out_dir = argv[0] if argv else os.path.join(TESTS, "data", "gguf")
    os.makedirs(out_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="llama3c-gguf-data-")
    exe = build_greedy(llama_dir, work)
    commit = subprocess.run(["git", "-C", llama_dir, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    made = {}  # file name -> (how it was made, prompts)

    ref30_f32 = os.path.join(work, "ref30-f32.gguf")
    convert(llama_dir, os.path.join(REFERENCE, "ref30"), ref30_f32, "f32")
    convert(llama_dir, os.path.join(REFERENCE, "ref31"), os.path.join(out_dir, "ref31-f16.gguf"), "f16")
    made["ref31-f16.gguf"] = ("tests/bench/gguf_from_hf.py tests/data/reference/ref31 --type f16",
                              reference_prompts("ref31"))
    for kind in ("Q8_0", "Q4_0"):
        name = f"ref30-{kind.lower()}.gguf"
        how = quantize(llama_dir, ref30_f32, os.path.join(out_dir, name), kind, pure=True)
        made[name] = (f"tests/bench/gguf_from_hf.py tests/data/reference/ref30 --type f32, then {how}",
                      reference_prompts("ref30"))
    hf_k = os.path.join(work, "hf-tiny-k")
    make_checkpoint.make_checkpoint(hf_k, "tiny-k")
    tiny_k_f32 = os.path.join(work, "tiny-k-f32.gguf")
    convert(llama_dir, hf_k, tiny_k_f32, "f32")
    for kind in ("Q4_K_M", "Q5_K_M"):
        name = f"tiny-k-{kind.lower()}.gguf"
        how = quantize(llama_dir, tiny_k_f32, os.path.join(out_dir, name), kind, pure=False)
        made[name] = (f"tests/make_checkpoint.py --preset tiny-k, tests/bench/gguf_from_hf.py --type "
                      f"f32, then {how}", random_prompts(512, 256))
    vocab_only(llama_dir, os.path.join(out_dir, "llama3-vocab.gguf.xz"))

    expected = {"llama.cpp": commit, "steps": STEPS, "threads": THREADS,
                "greedy": "tests/bench/llama_greedy.c (llama.cpp's C API, argmax, ties to the lowest id)",
                "models": {}}
    for name, (how, prompts) in made.items():
        runs = {}
        for pname, prompt in prompts.items():
            ids, leads = greedy(exe, os.path.join(out_dir, name), prompt)
            runs[pname] = {"prompt": prompt, "greedy": ids, "lead": leads}
        expected["models"][name] = {"made": how, "prompts": runs}
        print(f"{name}: {os.path.getsize(os.path.join(out_dir, name))} bytes")
    with open(os.path.join(out_dir, "llama_cpp.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")
    shutil.rmtree(work)


if __name__ == "__main__":
    main(sys.argv[1:])
