"""Hostile input: every damaged model file, tokenizer file, checkpoint, command line and prompt
must end in exit status 1 with one clear first stderr line naming the problem (or, where the
docs/hostile-input.md documents it, a defined outcome), never a crash, hang or half-written file.

The tables are generated: every header field times bad values, truncation at every section
boundary and inside every tensor, every tensor of a checkpoint dropped or reshaped, every numeric
flag with bad values. `make test-sanitize` runs them under ASan + UBSan. Each test prints its
row count; test_row_count checks the total."""
import base64
import fcntl
import hashlib
import json
import os
import resource
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time

import numpy as np

from common import PYTHON, REPO, TESTS, program, run, scratch

sys.path.insert(0, os.path.join(TESTS, "fuzz"))
from modelfile import model_file, with_field, DEFAULTS  # noqa: E402
import make_checkpoint  # noqa: E402

WORK = scratch("hostile")
ROWS = {}
INT_MAX, INT_MIN = 2 ** 31 - 1, -2 ** 31
TIMEOUT = 120  # per row; a hang fails the row instead of the run

# A tokenizer that fits the synthetic models' vocabulary (300): 256 bytes, 36 merges, 8 specials.
MERGES = [s.encode() for s in ("th he in er an re on at en nd ti es or te of ed is it al ar st to "
                               "nt ng se ha as ou io le ve co me de hi ri").split()]
SPECIALS = [s.encode() for s in ("<|begin_of_text|> <|end_of_text|> <|reserved_special_token_0|> "
                                 "<|reserved_special_token_1|> <|start_header_id|> "
                                 "<|end_header_id|> <|eom_id|> <|eot_id|>").split()]
BOS, EOS = 256 + len(MERGES), 257 + len(MERGES)
MODEL_ARGS = dict(bos_id=BOS, eos_ids=(EOS,))


def tok_bytes(regular, specials, n_tokens=None, n_special=None, version=1, magic=b"L3TK"):
    n_tokens = len(regular) + len(specials) if n_tokens is None else n_tokens
    n_special = len(specials) if n_special is None else n_special
    parts = [struct.pack("<4sIII", magic, version, n_tokens, n_special)]
    parts += [struct.pack("<I", len(t)) + t for t in list(regular) + list(specials)]
    return b"".join(parts)


SINGLES = [bytes([b]) for b in range(256)]
GOOD_TOK = tok_bytes(SINGLES + MERGES, SPECIALS)
assert struct.unpack_from("<I", GOOD_TOK, 8)[0] == DEFAULTS["vocab_size"]


def write(name, data):
    path = os.path.join(WORK, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


_paths = {}


def good_files():
    """(model path, tokenizer path) of a valid synthetic model and its tokenizer."""
    if not _paths:
        _paths["model"] = write("good.bin", model_file(**MODEL_ARGS)[0])
        _paths["tok"] = write("good.tok", GOOD_TOK)
    return _paths["model"], _paths["tok"]


def expect(kind, args, needle, status=1, stdin=None, usage=False, error_word=True):
    """One table row: exit status, and (for errors) a first stderr line naming the problem."""
    proc = run(args, input=stdin, check=False, timeout=TIMEOUT)
    err = proc.stderr.decode(errors="replace")
    shown = [a if isinstance(a, str) else repr(a) for a in args]
    assert proc.returncode == status, f"{kind} {shown}: exit {proc.returncode}, stderr {err[-600:]!r}"
    assert "runtime error" not in err and "Sanitizer" not in err, f"{kind} {shown}: {err[-2000:]}"
    if status == 1:
        # the first line that is not the model summary printed once loading is done
        lines = [l for l in err.splitlines() if not l.startswith(("model:", "kv cache:", "prompt:", "seed:", "run: note:"))]
        first = lines[0] if lines else ""
        assert ("error" in first or not error_word) and needle.lower() in first.lower(), \
            f"{kind} {shown}: {needle!r} not in first line {first!r}"
        if usage:  # a flag mistake: one line pointing at -h, not the whole usage text
            assert "see run -h" in first and "usage:" not in err, f"{kind} {shown}: {err!r}"
    elif needle:
        assert needle.encode() in proc.stdout + proc.stderr, f"{kind} {shown}: {needle!r} missing"
    ROWS[kind] = ROWS.get(kind, 0) + 1
    return proc


def run_model(path, *extra):
    return [program("run"), path, "-I", "1 2", "-o", "ids", "-n", "2", "-t", "0", *extra]


# ------------------------------------------------------------------------------------------
# Model files


def model_rows():
    """[(name, bytes, needle)]: every kind of damage to a valid synthetic model."""
    good, sections = model_file(**MODEL_ARGS)
    rows = [("empty", b"", "shorter than"), ("one byte", b"L", "shorter than"),
            ("255 bytes", good[:255], "shorter than"), ("header only", good[:256], "truncated"),
            ("tokenizer file as model", GOOD_TOK, "is a tokenizer file"), ("bad magic", b"XXXX" + good[4:], "magic"),
            ("lowercase magic", b"l3cm" + good[4:], "magic"),
            ("llama2.c checkpoint", struct.pack("<7i", 288, 768, 6, 6, 6, 32000, 256) + good[28:], "llama2.c model file"),
            ("llama2.c checkpoint, unshared classifier", struct.pack("<7i", 4096, 11008, 32, 32, 32, -32000, 2048) + good[28:], "llama2.c model file"),
            ("llama2.c version 2 export", struct.pack("<Ii", 0x616b3432, 2) + good[8:], "llama2.c model file")]
    for version in (0, 2, 0xFFFFFFFF):
        rows.append((f"version {version}", with_field(good, "version", version), "version"))
    # every integer shape field: zero, negative, absurd
    for field in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                  "vocab_size", "max_seq_len"):
        for value in (0, -1, INT_MIN, INT_MAX):
            rows.append((f"{field}={value}", with_field(good, field, value), field))
    # in range one by one, but the sizes they imply are absurd (and products far past 2^32)
    for field, value in (("dim", 1 << 20), ("hidden_dim", 1 << 20), ("n_layers", 1024),
                         ("vocab_size", 1 << 22)):
        rows.append((f"{field}={value}", with_field(good, field, value), "truncated"))
    big = good
    for field, value in (("dim", 1 << 20), ("hidden_dim", 1 << 20), ("n_layers", 1024),
                         ("n_heads", 256), ("n_kv_heads", 256), ("head_dim", 4096),
                         ("vocab_size", 1 << 22)):
        big = with_field(big, field, value)
    rows.append(("every size maximal", big, "truncated"))
    rows.append(("n_heads*head_dim > 2^20", with_field(with_field(good, "n_heads", 4096), "head_dim", 4096),
                 "n_heads * head_dim"))
    # relations between fields
    rows += [("n_kv_heads does not divide n_heads", with_field(good, "n_kv_heads", 3), "divide"),
             ("n_kv_heads > n_heads", with_field(good, "n_kv_heads", 8), "n_kv_heads"),
             ("odd head_dim", with_field(good, "head_dim", 3), "head_dim"),
             ("head_dim larger than the tensors", with_field(good, "head_dim", 8), "truncated"),
             ("head_dim smaller than the tensors", with_field(good, "head_dim", 2), "trailing"),
             ("hidden_dim mismatch", with_field(good, "hidden_dim", 31), "trailing"),
             ("layer count mismatch", with_field(good, "n_layers", 3), "truncated"),
             ("tied flag on an untied file", with_field(good, "tied_classifier", 1), "trailing"),
             ("tied flag 2", with_field(good, "tied_classifier", 2), "tied"),
             ("fp32 file marked bf16", with_field(good, "weight_type", 1), "trailing")]
    for value in (4, 0xFFFFFFFF):
        rows.append((f"weight_type={value}", with_field(good, "weight_type", value), "weight type"))
    for value in (0.0, 1.0, -5.0, float("nan"), float("inf")):
        rows.append((f"rope_theta={value}", with_field(good, "rope_theta", value), "rope_theta"))
    for value in (0.0, -1e-5, 1.0, float("nan")):
        rows.append((f"norm_eps={value}", with_field(good, "norm_eps", value), "norm_eps"))
    rows.append(("rope_scaling=2", with_field(good, "rope_scaling", 2), "rope_scaling"))
    scaled = with_field(good, "rope_scaling", 1)
    rows += [("rope factor 0.5", with_field(scaled, "rope_factor", 0.5), "rope factor"),
             ("rope factor nan", with_field(scaled, "rope_factor", float("nan")), "rope factor"),
             ("rope low = high", with_field(scaled, "rope_low_freq_factor", 4.0), "low/high"),
             ("rope low 0", with_field(scaled, "rope_low_freq_factor", 0.0), "low/high"),
             ("rope high inf", with_field(scaled, "rope_high_freq_factor", float("inf")), "low/high"),
             ("rope original context 0", with_field(scaled, "rope_original_max_pos", 0), "original context")]
    for value in (-1, 300, INT_MAX):
        rows.append((f"bos_id={value}", with_field(good, "bos_id", value), "bos"))
    for value in (0, 9, -1):
        rows.append((f"n_eos={value}", with_field(good, "n_eos", value), "eos"))
    for value in (-1, 300):
        rows.append((f"eos id {value}", with_field(good, "eos0", value), "eos id"))
    # truncation at every section boundary and inside every tensor; trailing data
    for name, start, end in sections:
        rows.append((f"cut at the start of {name}", good[:start], "truncated"))
        rows.append((f"cut inside {name}", good[:(start + end) // 2], "truncated"))
    rows += [("one byte short", good[:-1], "truncated"), ("one trailing byte", good + b"\0", "trailing"),
             ("a trailing tensor", good + good[256:4096], "trailing")]
    # q8_0: group size not dividing the rows, zero, negative; scales cut
    q8, q8_sections = model_file(weight_type=2, group_size=8, **MODEL_ARGS)
    for value in (0, -8, 3, 12, 64, INT_MAX):
        rows.append((f"q8_0 group_size={value}", with_field(q8, "group_size", value), "group size"))
    rows.append(("q8_0 group 4 on a group-8 file", with_field(q8, "group_size", 4), "truncated"))
    for name, start, end in q8_sections:
        if name.endswith(".scales"):
            rows.append((f"q8_0 cut inside {name}", q8[:(start + end) // 2], "truncated"))
    # q4_0: group size not a multiple of 32, or not dividing the rows; nibbles or scales cut
    q4, q4_sections = model_file(weight_type=3, group_size=32, dim=64, hidden_dim=128,
                                 head_dim=16, **MODEL_ARGS)
    for value in (0, -32, 16, 48, 96, 128, INT_MAX):
        rows.append((f"q4_0 group_size={value}", with_field(q4, "group_size", value), "group size"))
    rows.append(("q4_0 group 64 on a group-32 file", with_field(q4, "group_size", 64), "trailing"))
    rows.append(("q8_0 file marked q4_0", with_field(q8, "weight_type", 3), "group size"))
    rows.append(("q4_0 file marked q8_0", with_field(q4, "weight_type", 2), "truncated"))
    for name, start, end in q4_sections:
        if name.endswith((".scales", ".q")) and name.startswith(("embedding", "layer1.w_down")):
            rows.append((f"q4_0 cut inside {name}", q4[:(start + end) // 2], "truncated"))
    rows.append(("q4_0 one scale short", q4[:-2], "truncated"))
    return rows


def test_malformed_model_files():
    rows = model_rows()
    for i, (name, data, needle) in enumerate(rows):
        path = write(f"bad-model-{i}.bin", data)
        expect("model", run_model(path), needle)
        expect("model", run_model(path, "-w", "read"), needle)  # read into memory, not mapped
    print(f"    {len(rows)} damaged model files, mapped and read")


def test_model_paths_and_vocab():
    model, tok = good_files()
    expect("model", run_model(model), "", status=0)  # the undamaged file runs
    d = os.path.join(WORK, "a-directory.bin")
    os.makedirs(d, exist_ok=True)
    expect("model", run_model(d), "is a folder: give the model file in it")
    expect("model", run_model(os.path.join(WORK, "missing.bin")), "cannot open")
    expect("model", run_model(model + "/"), "cannot open")  # a file used as a folder
    link = os.path.join(WORK, "dangling.bin")
    if not os.path.lexists(link):
        os.symlink(os.path.join(WORK, "nowhere"), link)
    expect("model", run_model(link), "cannot open")
    fifo = os.path.join(WORK, "fifo.bin")
    if not os.path.exists(fifo):
        os.mkfifo(fifo)
    expect("model", run_model(fifo), "not a regular file")  # used to block in open()
    expect("model", run_model("/dev/zero"), "not a regular file")
    if os.geteuid() != 0:  # root reads anything
        locked = write("locked.bin", open(model, "rb").read())
        os.chmod(locked, 0)
        expect("model", run_model(locked), "cannot open")
    # the tokenizer must agree with the model's vocabulary
    small = write("small.tok", tok_bytes(SINGLES + MERGES[:4], SPECIALS))
    expect("model", [program("run"), model, "-z", small, "-i", "hi"], "vocabulary")
    big = write("big-vocab.bin", model_file(vocab_size=400, **MODEL_ARGS)[0])
    expect("model", [program("run"), big, "-z", tok, "-i", "hi"], "vocabulary")
    # n_heads need not divide dim: head_dim is explicit (Llama 3.1 style); such a file runs
    odd = write("odd-dim.bin", model_file(dim=18, **MODEL_ARGS)[0])
    expect("model", run_model(odd), "", status=0)


def test_nonfinite_weights():
    """Weights of NaN / inf (a hostile file can hold any float): the run ends normally, and
    under UBSan with no undefined behaviour (found by fuzz_model: quantize_q8 cast NaN to int8)."""
    for wt, gs in ((0, 0), (1, 0), (2, 8)):
        data = bytearray(model_file(weight_type=wt, group_size=gs, **MODEL_ARGS)[0])
        for name, start, end in model_file(weight_type=wt, group_size=gs, **MODEL_ARGS)[1]:
            if "wq" in name or "scales" in name or name == "embedding":
                for off in range(start, min(end, start + 64) - 3, 8):
                    struct.pack_into("<f" if wt != 1 else "<H", data, off,
                                     float("nan") if wt != 1 else 0x7FC0)
        path = write(f"nan-{wt}.bin", bytes(data))
        # NaN reaches the logits: an error in every sampling mode (test_nonfinite_logits)
        expect("model", run_model(path), "non-finite logits")


def tensor_filled(name, tensor, value, **fields):
    """A valid synthetic model (fp32) whose tensor `tensor` holds `value` everywhere."""
    data = bytearray(model_file(**MODEL_ARGS, **fields)[0])
    for section, start, end in model_file(**MODEL_ARGS, **fields)[1]:
        if section == tensor:
            data[start:end] = struct.pack("<f", value) * ((end - start) // 4)
    return write(name, bytes(data))


# every sampling mode, as flags (defaults: temperature 0.6, top-p 0.9)
SAMPLING_MODES = [["-t", "0"], ["-t", "1", "-p", "1"], [], ["-t", "0.8", "-p", "0.5"],
                  ["--top-k", "5"], ["--top-k", "1", "-p", "1"], ["--min-p", "0.1"],
                  ["--min-p", "1", "-p", "1"], ["--repeat-penalty", "1.3"],
                  ["--presence-penalty", "0.5", "-t", "0"], ["--frequency-penalty", "0.5"],
                  ["--repeat-penalty", "0.5", "--repeat-last-n", "-1", "--top-k", "40",
                   "--min-p", "0.05", "-p", "0.95", "-t", "1.2"]]


def test_nonfinite_logits():
    """Logits of NaN (one NaN weight) or Inf (a norm weight of 3e38) are an error in every
    sampling mode, never a token read from outside the candidates (issue 14: top-p returned
    cand[-1] when no token qualified)."""
    nan = tensor_filled("nan-classifier.bin", "classifier", float("nan"))
    inf = tensor_filled("inf-norm.bin", "final_norm", 3e38)
    for path in (nan, inf):
        for mode in SAMPLING_MODES:
            expect("sampler", [program("run"), path, "-I", "1 2", "-o", "ids", "-n", "3",
                               "-s", "1", *mode], "non-finite logits (NaN or Inf) at position 1")
    # the logits of the prompt's last position are checked too, whatever -n
    expect("sampler", [program("run"), nan, "-I", "5 6 7", "-o", "ids", "-n", "1", "-t", "0"],
           "at position 2")


QUANT_SHAPE = dict(dim=64, hidden_dim=128, n_heads=4, n_kv_heads=2, head_dim=32)  # q8_0 cache


def damaged_scale(wt, gs, tensor, value):
    """A q8_0 (wt 2) or q4_0 (wt 3) model with one scale of `tensor` set to value: the first
    group, or for the embedding token 1's (the token the rows feed)."""
    name = f"scale-{wt}-{gs}-{tensor}-{value}.bin"
    data, sections = model_file(weight_type=wt, group_size=gs, **QUANT_SHAPE, **MODEL_ARGS)
    data = bytearray(data)
    start = dict((name, s) for name, s, _ in sections)[tensor + ".scales"]
    group = QUANT_SHAPE["dim"] // gs if tensor == "embedding" else 0
    struct.pack_into("<f" if wt == 2 else "<e", data, start + group * (4 if wt == 2 else 2), value)
    return write(name, bytes(data))


def test_nonfinite_quantized():
    """Issue 24: a NaN or Inf that meets a quantizer (q8_0 and q4_0 decoding's activations,
    -a fast's int8 ones, the q8_0 KV cache) reaches the same "non-finite logits" error as fp32,
    never a 0 that prints tokens and exits 0. Every matrix's scales in both quantized types,
    NaN and Inf, in every cache type and arithmetic, decoding and prompt blocks alike."""
    want = "non-finite logits (NaN or Inf)"
    matrices = ["embedding", "layer0.wq", "layer0.wk", "layer0.wv", "layer0.wo",
                "layer0.w_gate", "layer0.w_down", "layer1.w_up", "classifier"]
    for wt, gs in ((2, 32), (2, 64), (3, 32), (3, 64)):  # (-a fast takes q8_0 groups of 64)
        for value in (float("nan"), float("inf"), float("-inf")):
            for tensor in matrices:
                path = damaged_scale(wt, gs, tensor, value)
                expect("non-finite", run_model(path), want)
            path = damaged_scale(wt, gs, "layer0.wq", value)
            for cache in ("f32", "bf16", "q8_0"):
                for arith in ("exact", "fast"):
                    for prompt in ("1 2", " ".join(str(i) for i in range(1, 21))):  # a block
                        expect("non-finite", [program("run"), path, "-I", prompt, "-o", "ids",
                                              "-n", "2", "-t", "0", "-a", arith,
                                              "--cache-type", cache], want)
    # activations gone bad before any weight scale: a norm weight (fp32 in every type), and
    # keys that are NaN or Inf when they are stored (wk, fp32 model) into each cache type
    for wt, gs in ((0, 0), (1, 0), (2, 32), (3, 32)):
        for value in (float("nan"), float("inf")):
            data, sections = model_file(weight_type=wt, group_size=gs, **QUANT_SHAPE, **MODEL_ARGS)
            data = bytearray(data)
            start = dict((name, s) for name, s, _ in sections)["layer0.ffn_norm"]
            struct.pack_into("<f", data, start + 8, value)
            path = write(f"norm-{wt}-{value}.bin", bytes(data))
            for arith in ("exact", "fast"):
                expect("non-finite", run_model(path, "-a", arith), want)
    for value in (float("nan"), float("inf")):
        data, sections = model_file(**QUANT_SHAPE, **MODEL_ARGS)
        data = bytearray(data)
        start = dict((name, s) for name, s, _ in sections)["layer1.wk"]
        struct.pack_into("<f", data, start, value)
        path = write(f"key-{value}.bin", bytes(data))
        for cache in ("f32", "bf16", "q8_0"):
            for prompt in ("1 2", "1 2 3 4 5 6 7 8 9"):
                expect("non-finite", [program("run"), path, "-I", prompt, "-o", "ids", "-n", "2",
                                      "-t", "0", "--cache-type", cache], want)


def chat_turns(model, lines, *extra):
    """A chat session with -o ids: [(in ids, out ids)] per turn, and the process."""
    proc = expect("chat", [program("run"), model, "-m", "chat", "-o", "ids", *extra],
                  "", status=0, stdin="".join(l + "\n" for l in lines).encode())
    turns = []
    for line in proc.stdout.decode().splitlines():
        tag, _, ids = line.partition(":")
        ids = [int(t) for t in ids.split()]
        if tag == "in":
            turns.append((ids, None))
        else:
            turns[-1] = (turns[-1][0], ids)
    return turns, proc


def test_penalties_follow_the_slide():
    """Issue 24: after chat's context slides, every penalty counts the kept context only: each
    reply is what a fresh run fed the same ids (-I) samples, greedy, for each penalty and
    look-back (they used to count the dropped turns and the re-fed ones twice)."""
    model, _ = good_files()
    lines = [f"question {i}: the other one is here and there" for i in range(7)]
    penalties = [["--repeat-penalty", "3"], ["--presence-penalty", "4"],
                 ["--frequency-penalty", "2"],
                 ["--repeat-penalty", "1.5", "--presence-penalty", "1", "--frequency-penalty", "1"]]
    slid = 0
    for penalty in penalties:
        for last_n in ("64", "-1", "8"):
            flags = ["-c", "64", "-n", "6", "-t", "0", *penalty, "--repeat-last-n", last_n]
            turns, proc = chat_turns(model, lines, *flags)
            assert b"dropped the" in proc.stderr, proc.stderr
            context = []
            for fed, reply in turns:
                if fed[0] == BOS:  # the session's start, or a slide: fed again from 0
                    slid += context != []
                    context = []
                context += fed
                fresh = expect("chat", [program("run"), model, "-I", " ".join(map(str, context)),
                                        "-o", "ids", *flags[:2], "-n", str(len(reply)), "-t", "0",
                                        *flags[6:]], "", status=0)
                assert [int(t) for t in fresh.stdout.split()] == reply, (flags, context, reply)
                context += reply[:-1]  # the last reply token is fed with the next turn
    assert slid >= 12, slid


def test_flat_logits_with_small_top_p():
    """All logits equal (a zero classifier) with -p below 1/vocab: no token reaches top-p's
    cutoff; the most likely one (the lowest id on a tie) is the set, in every mode."""
    flat = tensor_filled("flat.bin", "classifier", 0.0)
    for mode in SAMPLING_MODES + [["-p", "0.001"], ["-p", "0.0001", "-t", "2"], ["-p", "0"]]:
        proc = expect("sampler", [program("run"), flat, "-I", "1 2", "-o", "ids", "-n", "4",
                                  "-e", "0", "-s", "3", *mode], "", status=0)
        ids = [int(t) for t in proc.stdout.split()]
        assert len(ids) == 4 and all(0 <= t < 300 for t in ids), (mode, ids)
        if mode and mode[0] == "-p" and float(mode[1]) < 1 / 300:  # -p 0 keeps one token
            assert ids == [0] * 4, (mode, ids)


# ------------------------------------------------------------------------------------------
# Tokenizer files (through run -z: the error names the tokenizer file)


def tokenizer_rows():
    good = GOOD_TOK
    n = struct.unpack_from("<I", good, 8)[0]
    offsets = [16]
    for t in SINGLES + MERGES + SPECIALS:
        offsets.append(offsets[-1] + 4 + len(t))
    rows = [("empty", b"", "too short"), ("ten bytes", good[:10], "too short"),
            ("bad magic", b"L3TX" + good[4:], "magic"),
            ("a model file as tokenizer", model_file(**MODEL_ARGS)[0], "is a model file: -z names the tokenizer"),
            ("version 0", tok_bytes(SINGLES + MERGES, SPECIALS, version=0), "version"),
            ("version 2", tok_bytes(SINGLES + MERGES, SPECIALS, version=2), "version"),
            ("n_special > n_tokens", tok_bytes(SINGLES + MERGES, SPECIALS, n_special=n + 1), "n_special"),
            ("n_tokens 2^32-1", tok_bytes(SINGLES + MERGES, SPECIALS, n_tokens=0xFFFFFFFF), "truncated"),
            ("one token too few", tok_bytes(SINGLES + MERGES, SPECIALS, n_tokens=n - 1), "trailing"),
            ("one token too many", tok_bytes(SINGLES + MERGES, SPECIALS, n_tokens=n + 1), "truncated"),
            ("no tokens", tok_bytes([], []), "single byte"),
            ("trailing byte", good + b"\0", "trailing"),
            ("empty regular token", tok_bytes(SINGLES + MERGES[:-1] + [b""], SPECIALS), "empty"),
            ("empty special token", tok_bytes(SINGLES + MERGES, SPECIALS[:-1] + [b""]), "empty"),
            ("duplicate merge", tok_bytes(SINGLES + MERGES[:-1] + [MERGES[0]], SPECIALS), "same bytes"),
            ("duplicate single byte", tok_bytes(SINGLES + MERGES[:-1] + [b"a"], SPECIALS), "same bytes"),
            ("duplicate special", tok_bytes(SINGLES + MERGES, SPECIALS[:-1] + [SPECIALS[0]]), "same bytes"),
            ("missing single byte", tok_bytes(SINGLES[:65] + SINGLES[66:] + MERGES + [b"zz"], SPECIALS), "0x41")]
    # a length running past the end, in the first, a middle and the last record
    for index in (0, 200, 280, n - 1):
        for length in (1 << 20, 0xFFFFFFFF):
            data = bytearray(good)
            struct.pack_into("<I", data, offsets[index], length)
            rows.append((f"record {index} length {length:#x}", bytes(data), "truncated"))
    # cut at a record boundary and inside a record, across the file
    for index in (1, 100, 256, 290, 295, n - 1):
        rows.append((f"cut before record {index}", good[:offsets[index]], "truncated"))
        rows.append((f"cut inside record {index}'s length", good[:offsets[index] + 2], "truncated"))
    rows.append(("last byte missing", good[:-1], "truncated"))
    return rows


def test_malformed_tokenizer_files():
    model, _ = good_files()
    rows = tokenizer_rows()
    for i, (name, data, needle) in enumerate(rows):
        path = write(f"bad-tok-{i}.tok", data)
        proc = expect("tokenizer", [program("run"), model, "-z", path, "-i", "hi"], needle)
        assert path.encode() in proc.stderr, (name, proc.stderr)
    proc = expect("tokenizer", [program("run"), model, "-z", os.path.join(WORK, "none.tok"), "-i", "x"],
                  "not found")
    assert b"export.py --tokenizer-only" in proc.stderr, proc.stderr  # how to make one
    fifo = os.path.join(WORK, "fifo.tok")
    if not os.path.exists(fifo):
        os.mkfifo(fifo)
    for special in (fifo, "/dev/zero", WORK):  # used to block in fopen() / read 4 GiB of zeros
        expect("tokenizer", [program("run"), model, "-z", special, "-i", "x"], "not a regular file")
    # a tokenizer without the specials a mode needs
    plain = write("no-specials.tok", tok_bytes(SINGLES + MERGES + [b"x%d" % i for i in range(8)], []))
    expect("tokenizer", [program("run"), model, "-z", plain, "-i", "hi"], "begin_of_text")
    expect("tokenizer", [program("run"), model, "-z", plain, "-m", "chat"], "instruct", stdin=b"hi\n")
    print(f"    {len(rows)} damaged tokenizer files")


# Tokenizer work (issue 14): a hostile .tok file or text must not make loading or encoding
# superlinear. Work is counted (tokenize --stats: hash-table probes), not timed; the timeout
# only turns a hang into a failure.

FNV_OFFSET, FNV_PRIME = 2166136261, 16777619


def fnv1a(data, h=FNV_OFFSET):
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & 0xFFFFFFFF
    return h


def fnv_colliding_blocks(h, rng):
    """Two different 4-byte blocks that take FNV-1a from state h to one same state, and that
    state: two random 3-byte prefixes whose states differ only in the low byte, then a fourth
    byte that cancels the difference."""
    seen = {}
    while True:
        prefix = rng.getrandbits(24).to_bytes(3, "little")
        state = fnv1a(prefix, h)
        other, other_state = seen.setdefault(state >> 8, (prefix, state))
        if other != prefix:
            a, b = prefix + b"\0", other + bytes([state ^ other_state])
            assert fnv1a(a, h) == fnv1a(b, h)
            return a, b, fnv1a(a, h)


def fnv_flood_tokens(bits, seed=14):
    """2^bits different tokens with one FNV-1a hash: a choice of block at each of `bits` links
    of a chain of colliding blocks."""
    import itertools
    import random
    rng, h, links = random.Random(seed), FNV_OFFSET, []
    for _ in range(bits):
        a, b, h = fnv_colliding_blocks(h, rng)
        links.append((a, b))
    return [b"".join(choice) for choice in itertools.product(*links)]


def table_stats(tok):
    """(tokens, probes, longest probe) of the regular table, from tokenize --stats."""
    proc = run([program("tokenize"), tok, "--stats", "x"], check=False, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-600:]
    words = proc.stderr.decode().split()
    stats = dict(zip(words[::2], words[1::2]))
    return int(stats["regular_tokens"]), int(stats["probes"]), int(stats["longest_probe"])


def test_tokenizer_hash_flooding():
    """2^17 tokens with one 32-bit FNV-1a hash (the hash the table used) load with as few probes
    as 2^17 random tokens of the same length: about one per token, none long. With the old hash
    they formed one probe chain and loading took ~10 s (2^18: 261 s). The 68-byte tokens go
    through the table's hash for long strings, and 2^16 tokens of 64 bytes through the one for
    short strings."""
    import random
    rng = random.Random(5)
    for bits in (16, 17):
        flood = fnv_flood_tokens(bits)
        assert len(set(flood)) == 1 << bits and len({fnv1a(t) for t in flood[::997]}) == 1
        normal = [rng.randbytes(len(flood[0])) for _ in flood]
        stats = {}
        for name, tokens in (("normal", normal), ("flood", flood)):
            path = write(f"{name}-hash-{bits}.tok", tok_bytes(SINGLES + tokens, []))
            stats[name] = entries, probes, longest = table_stats(path)
            assert entries == 256 + len(tokens), stats
            # at the table's load (at most 1/2) a random hash gives ~1.2 probes per token
            assert probes < 2 * entries and longest < 100, f"{name}: {stats[name]}"
            ROWS["tokenizer work"] = ROWS.get("tokenizer work", 0) + 1
        assert stats["flood"][1] < 1.5 * stats["normal"][1], stats
        # encoding text made of the colliding tokens: lookups of them and of their pieces
        text = b" ".join(flood[::64])
        tok = os.path.join(WORK, f"flood-hash-{bits}.tok")
        ids = run([program("tokenize"), tok], input=text, timeout=TIMEOUT).stdout
        back = run([program("tokenize"), tok, "--decode"], input=ids, timeout=TIMEOUT).stdout
        assert back == text
        print(f"    2^{bits} tokens of {len(flood[0])} bytes: (tokens, probes, longest) {stats}")


def test_special_token_flooding():
    """--special with thousands of specials that share their first bytes, on 200 KB of '<':
    each position used to cost a hash per distinct special length (past 120 s); the automaton
    reads each byte about once."""
    n, size = 3000, 200_000
    cases = {
        # distinct lengths, one first byte: the case found
        "one first byte": [b"<" + b"%d" % i + b"x" * i + b">" for i in range(n)],
        # each a prefix of the text at every position: walking the specials from each
        # position would go 3000 bytes deep
        "nested": [b"<" * (i + 1) + b">" for i in range(n)],
    }
    lt = ord("<")
    wants = {  # ids of 200 KB of '<', and of the same with a '>' after
        "one first byte": ([lt] * size, [lt] * size + [ord(">")]),
        # the leftmost special: the longest, 3000 '<' and a '>'
        "nested": ([lt] * size, [lt] * (size - n) + [256 + n - 1]),
    }
    for name, specials in cases.items():
        path = write(f"specials-{name.replace(' ', '-')}.tok", tok_bytes(SINGLES, specials))
        for text, want in zip((b"<" * size, b"<" * size + b">"), wants[name]):
            proc = run([program("tokenize"), path, "--special"], input=text, check=False,
                       timeout=TIMEOUT)
            assert proc.returncode == 0, (name, proc.stderr[-600:])
            ids = [int(x) for x in proc.stdout.split()]
            assert ids == want, (name, len(ids), ids[-3:], want[-3:])
            ROWS["tokenizer work"] = ROWS.get("tokenizer work", 0) + 1


def test_huge_tokenizer_file_header_first():
    """A huge file that is not a tokenizer is refused from its header, before it is read: a
    sparse 5 GiB file with a bad magic says "magic" (it used to say "too large", and a 3 GiB
    one was read whole first); with a good header, "too large"."""
    model, _ = good_files()
    for i, (header, size, needle) in enumerate(((b"GGUF" + bytes(12), 5 << 30, "magic"),
                                                (b"\0" * 16, 3 << 30, "magic"),
                                                (GOOD_TOK[:16], 5 << 30, "too large"))):
        path = os.path.join(WORK, f"huge-{i}.tok")  # no needle in the name
        with open(path, "wb") as f:
            f.write(header)
            f.truncate(size)
        expect("tokenizer", [program("run"), model, "-z", path, "-i", "hi"], needle)
        proc = run([program("tokenize"), path, "hi"], check=False, timeout=TIMEOUT)
        assert proc.returncode == 1 and needle.encode() in proc.stderr, (i, proc.stderr)
        os.remove(path)


def test_huge_model_file_header_first():
    """Issue 24: a 100 GiB sparse file that is not a model (or whose header does not vouch for
    its size) is refused from its header in every -w mode, before anything is mapped in, read
    or allocated in proportion to it: it took 12-19 s (MADV_POPULATE_READ faulted in the whole
    mapping, evicting the page cache). Well under 0.1 s here; the bound is loose for slow hosts
    and the sanitizer build."""
    model, _ = good_files()
    good = open(model, "rb").read(256)
    big = with_field(with_field(good, "n_layers", 1024), "dim", 1 << 20)
    rows = [(b"PK\x03\x04" + bytes(26), "magic"), (bytes(256), "magic"),
            (b"\x7fELF\x02\x01\x01", "magic"), (GOOD_TOK[:16], "is a tokenizer file"),
            (b"GGUF\x03\0\0\0", "GGUF file"), (struct.pack("<Q", 200) + b'{"a":', "safetensors"),
            (with_field(good, "version", 2), "version"), (with_field(good, "dim", -1), "dim"),
            (good, "trailing data"), (big, "truncated")]
    for i, (header, needle) in enumerate(rows):
        path = os.path.join(WORK, f"huge-{i}.bin")  # no needle in the name
        with open(path, "wb") as f:
            f.write(header)
            f.truncate(100 << 30)
        try:  # (removed even when the row fails: a kept scratch folder must not hold it)
            for mode in ("auto", "map", "read"):
                start = time.monotonic()
                expect("model", run_model(path, "-w", mode), needle)
                took = time.monotonic() - start
                assert took < 2.0, (i, mode, took)
        finally:
            os.remove(path)
    print(f"    {len(rows)} headers on a 100 GiB sparse file, every -w mode")


# ------------------------------------------------------------------------------------------
# The command line


def test_cache_type_errors():
    """--cache-type and llama.cpp's -ctk/-ctv: one setting for keys and values."""
    model, tok = good_files()
    for args, needle in ((["--cache-type", "q4_0"], "--cache-type wants 'f32', 'bf16' or 'q8_0'"),
                         (["--cache-type", ""], "--cache-type wants"),
                         (["--cache-type", "F32"], "--cache-type wants"),
                         (["--cache-type", "f16"], "bf16 is the 2-byte cache type"),
                         (["-ctk", "f16"], "-ctk f16 is not offered"),
                         (["-ctv", "q8"], "-ctv wants"),
                         (["-ctk", "bf16", "-ctv", "q8_0"],
                          "key cache type bf16 and the value cache type q8_0 differ"),
                         (["--cache-type-k", "q8_0", "--cache-type-v", "f32"], "differ"),
                         (["--cache-type", "bf16", "-ctv", "f32"], "differ"),
                         (["--cache-type"], "needs a value"), (["-ctk"], "needs a value"),
                         (["--cache-type-v"], "needs a value")):
        expect("cli", [program("run"), model, *args], needle, usage=True)
    # q8_0 groups 32 dimensions of a head: this model's heads have 4
    expect("cli", run_model(model, "--cache-type", "q8_0"), "groups of 32")
    wide = write("heads32.bin", model_file(head_dim=32, **MODEL_ARGS)[0])
    for args in (["-ctk", "q8_0"], ["-ctv", "bf16", "--cache-type", "bf16"], ["-ctk", "f32"]):
        proc = expect("cli", run_model(wide, *args), "kv cache: " + args[1], status=0)
        assert proc.stderr.count(b"kv cache:") == 1, proc.stderr


def test_command_line_errors():
    model, tok = good_files()
    cases = [
        ([], "no model file given", True), (["-i", "hi"], "no model file given", True),
        ([model, "-x", "1"], "unknown option", True), ([model, "--tempo", "1"], "unknown option", True),
        ([model, "-", "1"], "after the model", True), ([model, "hello"], "give one model", True),
        ([model, "-m", "poetry"], "-m poetry: the model is already", True),
        (["-m", "poetry"], "-m poetry: no such model file, and not a mode", False),
        ([model, "--model", model], "the model is already", True), (["-m", "-i", "x"], "got the flag -i", True),
        ([model, "-o", "xml"], "-o", True),
        ([model, "-a", "lossy"], "-a", True), ([model, "-a", ""], "-a", True),
        ([model, "-w", "mmap"], "-w", True), ([model, "-w", ""], "-w", True),
        ([model, "-i", "a", "-I", "1"], "prompt once", True), ([model, "-f", tok, "-i", "a"], "prompt once", True), ([model, "-m", "chat", "-I", "1"], "-I", True),
        ([model, "-y", "be nice"], "-y", True),
        ([os.path.join(WORK, "missing.bin")], "cannot open", False), ([WORK], "is a folder", False),
        ([model, "-i", "hi", "-L", os.path.join(WORK, "no-dir", "x.f32")], "cannot create", False),
    ]
    for flag in "iImytpsnczLTeoawf":  # every flag given without its value
        cases.append(([model, "-" + flag], "needs a value", True))
    for flag in ("--temp", "--top-p", "--top-k", "--min-p", "--repeat-penalty", "--repeat-last-n",
                 "--presence-penalty", "--frequency-penalty", "--seed", "--ctx-size", "--threads",
                 "--predict", "--file", "--prompt", "--system-prompt"):
        cases.append(([model, flag], "needs a value", True))
    bad_numbers = {"-t": ["-1", "-0.001", "nan", "inf", "abc", "", "1x", "101"],
                   "-p": ["-0.1", "1.01", "nan", "2", "x"],
                   "-n": ["-2", "abc", "1.5", "99999999999999999999", "3 "],
                   "-c": ["0", "-5", "abc", str(1 << 25)],
                   "-s": ["-2", "x", "1e3", str(1 << 32)], "-T": ["0", "-2", "many"],
                   "-e": ["2", "-1", "yes"], "--top-k": ["-1", "x", "2.5"],
                   "--min-p": ["-0.1", "1.5", "nan"], "--repeat-penalty": ["0", "-1", "inf"],
                   "--repeat-last-n": ["-2", "x"], "--presence-penalty": ["nan", "1e9"],
                   "--frequency-penalty": ["-inf", "x"], "--temp": ["-1", "nan"]}
    for flag, values in bad_numbers.items():
        for value in values:
            cases.append(([model, flag, value], flag, True))  # a flag mistake shows the usage
    for args, needle, usage in cases:
        expect("cli", [program("run"), *args], needle, usage=usage)
    # documented edges that are not errors: -n 0 runs to the context end, -c past the model's
    # maximum is capped to it, -p 0 and 1 and -t 0 are allowed
    expect("cli", run_model(model, "-n", "0", "-c", "8"), "context full", status=0)
    proc = expect("cli", run_model(model, "-c", "100000"), "context 64 of 64", status=0)
    assert b"-c 100000 is more than the model's maximum context: using 64" in proc.stderr
    for extra in (["-p", "0"], ["-p", "1"], ["-t", "0"], ["-t", "1.5", "-s", "7"]):
        expect("cli", run_model(model, *extra), "", status=0)


def test_messages_say_what_is_wrong():
    """Issue 24: a float flag in range but below float's normal range was "out of [0, 100]"
    (strtof's underflow); an -I id is named whole ('0x10', not 'x10'); a tokenizer error names
    its path once; a chat without -y that cannot fit a turn does not blame a system prompt."""
    model, tok = good_files()
    for flag in ("-t", "--temp", "-p", "--top-p", "--min-p", "--presence-penalty",
                 "--frequency-penalty"):
        for value in ("1e-38", "1e-45", "1e-50", "-1e-50", "1.17549435e-38"):
            expect("cli", run_model(model, flag, value, "-s", "3"), "", status=0)
    for flag, value in (("-t", "-1e-45"), ("-p", "-1e-40"), ("--repeat-penalty", "1e-38"),
                        ("--repeat-penalty", "1e-50"), ("-t", "1e39"), ("--min-p", "3e38")):
        expect("cli", [program("run"), model, flag, value], f"got '{value}'", usage=True)
    for ids, word in (("0x10", "0x10"), ("1 2 0x1f", "0x1f"), ("1.5", "1.5"), ("12abc", "12abc"),
                      ("1e3", "1e3"), ("5,-3", "-3"), ("7 300", "300"), ("1 2-3", "2-3")):
        expect("cli", [program("run"), model, "-I", ids, "-o", "ids", "-n", "1"],
               f"-I: '{word}' is not a token id")
    for name, data in (("magic.tok", b"XXXX" + bytes(20)), ("short.tok", GOOD_TOK[:10]),
                       ("cut.tok", GOOD_TOK[:-7]), ("version.tok", GOOD_TOK[:4] + b"\2" + GOOD_TOK[5:])):
        path = write("msg-" + name, data)
        proc = expect("tokenizer", [program("run"), model, "-z", path, "-i", "hi"], "tokenizer")
        assert proc.stderr.count(path.encode()) == 1, proc.stderr
        proc = run([program("tokenize"), path, "hi"], check=False, timeout=TIMEOUT)
        assert proc.returncode == 1 and proc.stderr.count(path.encode()) == 1, proc.stderr
    for extra, needle in (([], "no turn fits in the context of 16"),
                          (["-n", "4"], "no turn fits in the context of 16"),
                          (["-y", "Be brief."], "the system prompt takes")):
        proc = expect("chat", [program("run"), model, "-m", "chat", "-c", "16", *extra], needle,
                      stdin=b"hi\n")
        assert extra or b"system prompt" not in proc.stderr, proc.stderr


def test_wrong_files_name_the_fix():
    """An HF folder, a safetensors file or a GGUF file given as the model, a missing .tok:
    the error names what the file is and the export.py command that makes the right one."""
    model, tok = good_files()
    hf = os.path.join(WORK, "hf-tiny30")
    if not os.path.exists(hf):
        make_checkpoint.make_checkpoint(hf, "tiny30")
    fix = "export.py OUT.bin --dtype bf16 --hf"
    gguf = write("model.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    for path, needle, fix in ((hf, "Hugging Face checkpoint folder", fix),
                              (os.path.join(hf, "model.safetensors"), "safetensors file", fix),
                              (write("renamed.bin", open(os.path.join(hf, "model.safetensors"), "rb").read()),
                               "safetensors file", fix),
                              (gguf, "GGUF file", f"export.py OUT.bin --gguf {gguf}")):
        proc = expect("wrong file", [program("run"), path, "-i", "hi"], needle)
        assert fix.encode() in proc.stderr, proc.stderr
    # a tokenizer, a plain folder, llama2.c's model: what it is; -z naming the model
    for path, needle in ((tok, "is a tokenizer file: the model is the .bin beside it"),
                         (os.path.dirname(tok), "is a folder: give the model file in it")):
        expect("wrong file", [program("run"), path, "-i", "hi"], needle)
    proc = expect("wrong file", [program("run"), model, "-z", model, "-i", "hi"],
                  "is a model file: -z names the tokenizer")
    assert proc.stderr.count(model.encode()) == 1, proc.stderr  # the path once
    bad_tok = write("x.tok", b"L3TX" + bytes(60))
    proc = expect("wrong file", [program("run"), model, "-z", bad_tok, "-i", "hi"], "magic")
    assert proc.stderr.count(bad_tok.encode()) == 1 and b"with -z" not in proc.stderr, proc.stderr
    lonely = write("lonely.bin", open(model, "rb").read())  # no lonely.tok beside it
    proc = expect("wrong file", [program("run"), lonely, "-i", "hi"], "not found")
    assert b"--tokenizer-only" in proc.stderr and b"-z" in proc.stderr, proc.stderr


def test_outputs_never_overwrite_inputs():
    """-L naming the model, the tokenizer or the prompt file is refused before anything is
    written (-L over the model used to truncate it under its own mapping: SIGBUS), and so is
    stdout appended to one of them."""
    model, tok = good_files()
    prompt = write("prompt.txt", b"the prompt")
    before = {p: open(p, "rb").read() for p in (model, tok, prompt)}
    link = os.path.join(WORK, "model-link.bin")
    if not os.path.lexists(link):
        os.symlink(model, link)
    gen = [program("run"), model, "-z", tok, "-n", "2", "-t", "0"]
    for target, extra in ((model, ["-i", "x"]), (tok, ["-i", "x"]), (prompt, ["-f", prompt]),
                          (link, ["-i", "x"]), (model, ["-I", "1 2", "-o", "ids"])):
        expect("outputs", gen + extra + ["-L", target], "is an input of this run")
    for target in (model, prompt):  # stdout appended to an input
        with open(target, "ab") as out:
            proc = subprocess_run(gen + ["-f", prompt], None, out)
        assert proc.returncode == 1 and b"stdout is an input of this run" in proc.stderr, proc.stderr
        ROWS["outputs"] = ROWS.get("outputs", 0) + 1
    for path, data in before.items():
        assert open(path, "rb").read() == data, f"{path} was changed"


def test_model_file_changed_while_in_use():
    """The mapped model truncated while run uses it: one line and status 1, not "Bus error".
    Deterministic: run reads its prompt from a pipe after mapping the model; the file is
    truncated once /proc shows the mapping, and only then is the prompt sent."""
    import subprocess
    import time
    model, tok = good_files()
    victim = write("victim.bin", open(model, "rb").read())
    proc = subprocess.Popen([program("run"), victim, "-w", "map", "-z", tok, "-n", "4", "-t", "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + TIMEOUT
    while victim not in open(f"/proc/{proc.pid}/maps").read():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.01)
    os.truncate(victim, 0)
    out, err = proc.communicate(b"Once upon a time", timeout=TIMEOUT)
    assert proc.returncode == 1, (proc.returncode, err)
    assert err.decode().splitlines()[-1] == \
        "run: error: the model file changed while in use (truncated or rewritten); stopped", err
    ROWS["sigbus"] = ROWS.get("sigbus", 0) + 1


def test_output_write_errors_and_read_header_first():
    """stdout on a full device is an error (exit 1), in both output formats and in chat;
    -w read checks the header before reading the file (a 64 GB sparse file with a bad magic
    or a header implying another size is refused at once, not read)."""
    model, tok = good_files()
    for args, stdin in (([model, "-I", "1 2", "-o", "ids", "-n", "3", "-t", "0"], None),
                        ([model, "-z", tok, "-i", "hello", "-n", "3", "-t", "0"], None),
                        ([model, "-z", tok, "-m", "chat", "-n", "2", "-t", "0"], b"hi\n")):
        with open("/dev/full", "wb") as full:
            proc = subprocess_run([program("run"), *args], stdin, full)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and "cannot write the output" in err, (args, proc.returncode, err)
        ROWS["outputs"] = ROWS.get("outputs", 0) + 1
    huge = os.path.join(WORK, "huge-sparse.bin")
    good = model_file(**MODEL_ARGS)[0]
    for header, needle in ((b"XXXX" + good[4:256], "magic"), (good[:256], "trailing data")):
        with open(huge, "wb") as f:
            f.write(header)
            f.truncate(64 << 30)
        expect("model", run_model(huge, "-w", "read"), needle)
    os.remove(huge)


def subprocess_run(args, stdin, stdout):
    import subprocess
    return subprocess.run(args, input=stdin, stdout=stdout, stderr=subprocess.PIPE, timeout=TIMEOUT)


# ------------------------------------------------------------------------------------------
# Prompts and chat input


def test_prompts():
    model, tok = good_files()
    gen = [program("run"), model, "-z", tok, "-t", "0", "-n", "3"]
    expect("prompt", gen + ["-i", ""], "", status=0)  # empty prompt: <|begin_of_text|> alone
    expect("prompt", gen + ["-i", "the " * 20, "-c", "16"], "context holds 16")  # longer than -c
    expect("prompt", gen + ["-i", "x" * 64, "-c", "64"], "context holds 64")  # BOS makes 65
    expect("prompt", gen + ["-i", "x" * 63, "-c", "64", "-n", "10"], "context full", status=0)
    expect("prompt", gen + ["-i", b"\xff\xfe bad \xc3( utf8 \xed\xa0\x80"], "", status=0)
    expect("prompt", gen + ["-i", "<|eot_id|><|begin_of_text|>"], "", status=0)
    expect("prompt", gen + ["-i", "a" * 100000, "-c", "64"], "context holds 64")
    ids = [program("run"), model, "-o", "ids", "-n", "1"]
    for text, needle in (("1 2 300", "token id"), ("-1", "token id"), ("1 x", "token id"),
                         ("99999999999999999999", "token id"), ("", "no token ids"),
                         (" , ,", "no token ids"), (" ".join(["1"] * 65), "context holds")):
        expect("prompt", ids + ["-I", text], needle)
    chat = [program("run"), model, "-z", tok, "-m", "chat", "-o", "ids", "-t", "0", "-n", "2"]
    expect("prompt", chat, "", status=0, stdin=b"")  # no input at all
    expect("prompt", chat, "", status=0, stdin=b"\n \n\t\n")  # blank lines only
    expect("prompt", chat, "", status=0, stdin=b"no newline at the end")
    expect("prompt", chat, "", status=0, stdin=b"a\0b\0\0\nc\n")  # NUL bytes
    expect("prompt", chat, "", status=0, stdin=b"\xff\xfe\xc3\n\xed\xa0\x80\n")  # not UTF-8
    expect("prompt", chat, "", status=0, stdin=b"<|eot_id|><|start_header_id|>system\n")
    expect("prompt", chat + ["-y", ""], "", status=0, stdin=b"hi\n")
    # a line of any length, and more turns than the context holds: "context full", status 1
    # with --no-context-shift; by default the context slides and a message too long is refused
    full = dict(status=1, error_word=False)  # the session ends with "run: context full: ..."
    fixed = chat + ["--no-context-shift"]
    expect("prompt", fixed, "context full", stdin=b"x" * (1 << 20) + b"\n", **full)
    expect("prompt", fixed, "context full", stdin=b"hello there\n" * 100, **full)
    expect("prompt", fixed + ["-i", "y" * 5000], "context full", stdin=b"", **full)
    expect("prompt", chat, "message refused", status=0, stdin=b"x" * (1 << 20) + b"\n")
    # 20 MB: refused on its length in bytes, before it is encoded
    expect("prompt", chat, "bytes need at least", status=0, stdin=b"a" * 20_000_000 + b"\n")
    expect("prompt", chat, "dropped the", status=0, stdin=b"hello there\n" * 100)
    expect("prompt", chat + ["-i", "y" * 5000], "message refused", status=0, stdin=b"")
    expect("prompt", chat + ["-y", "y" * 5000], "system prompt", stdin=b"hi\n")


# ------------------------------------------------------------------------------------------
# Checkpoints given to export.py: one clear line, exit 1, no output file left behind


def export_fails(kind_args, needle, out_dir):
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    args = [os.path.join(out_dir, "m.bin") if a == "OUT" else a for a in kind_args]
    proc = run([PYTHON, os.path.join(REPO, "export.py"), *args], check=False, timeout=TIMEOUT)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1, f"export {args}: exit {proc.returncode}: {err[-800:]!r}"
    needles = needle if isinstance(needle, tuple) else (needle,)
    assert err.count("\n") == 1 and any(n.lower() in err.lower() for n in needles), \
        f"export {args}: {needle!r} not in {err!r}"
    assert os.listdir(out_dir) == [], f"export {args} left {os.listdir(out_dir)}"
    ROWS["export"] = ROWS.get("export", 0) + 1


def read_safetensors(path):
    blob = open(path, "rb").read()
    (n,) = struct.unpack_from("<Q", blob, 0)
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def write_safetensors(path, header, data):
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    open(path, "wb").write(struct.pack("<Q", len(raw)) + raw + data)


def test_damaged_checkpoints():
    src = os.path.join(WORK, "hf-tiny30")
    if not os.path.exists(src):
        make_checkpoint.make_checkpoint(src, "tiny30")
    f = os.path.join(WORK, "hf-damaged")
    out_dir = os.path.join(WORK, "export-out")
    shutil.rmtree(f, ignore_errors=True)
    shutil.copytree(src, f)
    st = os.path.join(f, "model.safetensors")
    original = open(st, "rb").read()
    header, data = read_safetensors(st)
    names = sorted(k for k in header if k != "__metadata__")
    cases = []  # (header change, needle)
    for name in names:  # every tensor missing
        cases.append((lambda h, name=name: h.pop(name), name))
    for name in names:  # every tensor with a shape disagreeing with config.json
        cases.append((lambda h, name=name: h[name].update(shape=h[name]["shape"][::-1] + [1]), name))
    layer0 = [n for n in names if ".layers.0." in n] + [n for n in names if "layers" not in n]
    for name in layer0:  # dtype disagreeing
        cases.append((lambda h, name=name: h[name].update(dtype="I32"), name))
    for name in layer0[:4]:  # offsets past the data, reversed, overlapping the next tensor
        cases.append((lambda h, name=name: h[name].update(data_offsets=[len(data), len(data) + 4]), name))
        cases.append((lambda h, name=name: h[name].update(data_offsets=h[name]["data_offsets"][::-1]), name))
    cases.append((lambda h: h[names[1]].update(data_offsets=h[names[0]]["data_offsets"]), "overlap"))
    for change, needle in cases:
        h = json.loads(json.dumps(header))
        change(h)
        write_safetensors(st, h, data)
        export_fails(["OUT", "--hf", f], needle, out_dir)
    (n,) = struct.unpack_from("<Q", original, 0)
    for blob, needle in ((original[:-100], "truncated"), (original[:4], "too short"), (b"", "too short"),
                         (struct.pack("<Q", 1 << 40) + original[8:], "past the end"),
                         (struct.pack("<Q", n + 1000) + original[8:8 + n], "past the end"),
                         (original[:8] + b"{\"a\": " + b" " * (n - 6) + original[8 + n:], "JSON"),
                         (original[:8] + b"[1, 2]" + b" " * (n - 6) + original[8 + n:], "model.safetensors"),
                         (original[:8] + b"\xff" * n + original[8 + n:], "model.safetensors")):
        open(st, "wb").write(blob)
        export_fails(["OUT", "--hf", f], needle, out_dir)
    open(st, "wb").write(original)
    # config.json: every field export needs, missing; wrong types
    cfg_path = os.path.join(f, "config.json")
    cfg_text = open(cfg_path).read()
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "vocab_size", "rms_norm_eps", "rope_theta", "max_position_embeddings"):
        cfg = json.loads(cfg_text)
        del cfg[field]
        json.dump(cfg, open(cfg_path, "w"))
        export_fails(["OUT", "--hf", f], field, out_dir)
    for field, value, short in (("hidden_size", "64", "dim"), ("num_hidden_layers", -2, "layers"),
                                ("vocab_size", 0, "vocab"), ("num_attention_heads", 0, "heads"),
                                ("rms_norm_eps", None, "eps"), ("rope_theta", -1.0, "theta")):
        cfg = json.loads(cfg_text)
        cfg[field] = value
        json.dump(cfg, open(cfg_path, "w"))
        export_fails(["OUT", "--hf", f], (field, short), out_dir)
    for text in ("", "{", "[]", "null"):
        open(cfg_path, "w").write(text)
        export_fails(["OUT", "--hf", f], "config.json", out_dir)
    open(cfg_path, "w").write(cfg_text)
    # shards: one missing, the index pointing at a missing file, the index not JSON
    src32 = os.path.join(WORK, "hf-tiny32")
    if not os.path.exists(src32):
        make_checkpoint.make_checkpoint(src32, "tiny32")
    g = os.path.join(WORK, "hf-shards")
    shutil.rmtree(g, ignore_errors=True)
    shutil.copytree(src32, g)
    index_path = os.path.join(g, "model.safetensors.index.json")
    index_text = open(index_path).read()
    index = json.loads(index_text)
    some = sorted(index["weight_map"])[0]
    index["weight_map"][some] = "model-00009-of-00002.safetensors"
    json.dump(index, open(index_path, "w"))
    export_fails(["OUT", "--hf", g], "model-00009-of-00002", out_dir)
    open(index_path, "w").write("{\"weight_map\": ")
    export_fails(["OUT", "--hf", g], "index", out_dir)
    open(index_path, "w").write(index_text)
    os.remove(os.path.join(g, "model-00002-of-00002.safetensors"))
    export_fails(["OUT", "--hf", g], "model-00002-of-00002", out_dir)
    print(f"    {ROWS['export']} damaged checkpoints")


# ------------------------------------------------------------------------------------------
# export.py, round 2: special files, outputs against inputs, signals, JSON of every wrong
# shape, and every config run.c would refuse


def tiny_checkpoint(name, preset="tiny30", **overrides):
    """A fresh random checkpoint folder under WORK that a row may damage."""
    folder = os.path.join(WORK, name)
    shutil.rmtree(folder, ignore_errors=True)
    make_checkpoint.make_checkpoint(folder, preset, **overrides)
    return folder


def checkpoints_and_output(name):
    """(single-file checkpoint, sharded checkpoint, empty output folder, OUT in it)."""
    out_dir = os.path.join(WORK, name + "-out")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    return (tiny_checkpoint(name + "-single"), tiny_checkpoint(name + "-sharded", "tiny32"),
            out_dir, os.path.join(out_dir, "m.bin"))


def tree_state(folders):
    """{path: content digest, link target or file type} of everything under the folders."""
    state = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in dirs + files:
                path = os.path.join(root, name)
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode):
                    state[path] = hashlib.sha256(open(path, "rb").read()).hexdigest()
                elif stat.S_ISLNK(st.st_mode):
                    state[path] = "-> " + os.readlink(path)
                else:
                    state[path] = stat.S_IFMT(st.st_mode)
    return state


def export_refused(args, needles, watch, timeout=60):
    """export.py with args: exit 1 within timeout, one stderr line holding one of needles and
    no sign of a traceback, and nothing under the watched folders created, changed or removed."""
    needles = needles if isinstance(needles, tuple) else (needles,)
    before = tree_state(watch)
    proc = run([PYTHON, os.path.join(REPO, "export.py"), *args], check=False, timeout=timeout)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1, f"export {args}: exit {proc.returncode}: {err[-800:]!r} {needles}"
    assert err.count("\n") == 1 and err.startswith("export.py: error: "), f"export {args}: {err[-800:]!r}"
    assert "internal error" not in err and "Traceback" not in err, f"export {args}: {err!r}"
    assert any(n.lower() in err.lower() for n in needles), f"export {args}: {needles} not in {err!r}"
    after = tree_state(watch)
    assert after == before, f"export {args} changed {sorted(set(after.items()) ^ set(before.items()))[:4]}"
    ROWS["export"] = ROWS.get("export", 0) + 1
    return err


def test_export_refuses_special_files():
    # A FIFO (or a folder, a device) where a file is read: refused at once, never a hang.
    full_tok = os.path.join(TESTS, "data", "tokenizer", "tokenizer.json")
    single, sharded, out_dir, out = checkpoints_and_output("special")
    shard = os.path.join(sharded, "model-00001-of-00002.safetensors")
    targets = [(single, "config.json"), (single, "model.safetensors"),
               (sharded, "model.safetensors.index.json"), (sharded, os.path.basename(shard)),
               (single, "tokenizer.json"), (single, os.path.join("original", "tokenizer.model"))]
    specials = {"fifo": lambda p: os.mkfifo(p), "folder": lambda p: os.mkdir(p),
                "/dev/zero": lambda p: os.symlink("/dev/zero", p),
                "symlink to a fifo": lambda p: (os.mkfifo(p + ".fifo"), os.symlink(p + ".fifo", p))}
    for folder, rel in targets:
        path = os.path.join(folder, rel)
        for kind, make in specials.items():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            saved = path + ".saved"
            if os.path.exists(path):
                os.rename(path, saved)
            make(path)
            try:
                export_refused([out, "--hf", folder], ("not a regular file", os.path.basename(rel)),
                               [folder, out_dir], timeout=30)
            finally:
                shutil.rmtree(path) if kind == "folder" else os.remove(path)
                if os.path.exists(path + ".fifo"):
                    os.remove(path + ".fifo")
                if os.path.exists(saved):
                    os.rename(saved, path)
    fifo = os.path.join(WORK, "tokenizer-fifo.json")
    if not os.path.exists(fifo):
        os.mkfifo(fifo)
    for args in (["--tokenizer-only", out, "--tokenizer", fifo],
                 [out, "--hf", single, "--tokenizer", fifo], [out, "--hf", fifo]):
        export_refused(args, ("not a regular file", "not found", "not a folder"), [out_dir], timeout=30)
    # a dangling symlink (an unfinished Hugging Face download): named, not "no safetensors"
    os.rename(os.path.join(single, "model.safetensors"), os.path.join(single, "blob"))
    os.symlink(os.path.join(single, "missing-blob"), os.path.join(single, "model.safetensors"))
    export_refused([out, "--hf", single], "model.safetensors", [single, out_dir])
    os.remove(os.path.join(single, "model.safetensors"))
    # symlinks to regular files, as in Hugging Face's cache, are followed
    os.symlink(os.path.join(single, "blob"), os.path.join(single, "model.safetensors"))
    os.symlink(full_tok, os.path.join(single, "tokenizer.json"))
    proc = run([PYTHON, os.path.join(REPO, "export.py"), out, "--hf", single, "--no-tokenizer"],
               check=False, timeout=TIMEOUT)
    assert proc.returncode == 0 and os.path.getsize(out) > 256, proc.stderr
    print(f"    {ROWS['export']} export rows so far")


def test_export_outputs_never_replace_inputs():
    single = tiny_checkpoint("outputs-single", "full-vocab", dtype="BF16")
    sharded = tiny_checkpoint("outputs-sharded", "tiny32")
    out_dir = os.path.join(WORK, "outputs-out")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    watch = [single, sharded, out_dir]
    inputs = {single: ["config.json", "model.safetensors", "tokenizer.json"],
              sharded: ["config.json", "model.safetensors.index.json",
                        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]}
    model_out = os.path.join(out_dir, "m.bin")
    for folder, names in inputs.items():
        for name in names:
            path = os.path.join(folder, name)
            dotted = os.path.join(folder, "..", os.path.basename(folder), name)
            link = os.path.join(out_dir, "hard-" + name)
            sym = os.path.join(out_dir, "sym-" + name)
            os.link(path, link)
            os.symlink(path, sym)
            for out in (path, dotted, link, sym):
                export_refused([out, "--hf", folder, "--no-tokenizer"], "input", watch)
                if folder == single:
                    export_refused([model_out, "--hf", folder, "--tokenizer-out", out], "input", watch)
            os.remove(link)
            os.remove(sym)
    # the tokenizer's output naming the model's, or a folder (by default OUT.tok): nothing is
    # written, and a good file already at OUT stays as it was
    open(model_out, "wb").write(b"a good file from before")
    os.mkdir(os.path.join(out_dir, "m.tok"))
    for extra in ([], ["--tokenizer-out", out_dir], ["--tokenizer-out", model_out]):
        export_refused([model_out, "--hf", single, *extra], ("folder", "same file"), watch)
    os.rmdir(os.path.join(out_dir, "m.tok"))
    export_refused([out_dir, "--hf", single], "folder", watch)
    # outputs that cannot be written as files: caught before the model is written
    fifo = os.path.join(out_dir, "fifo.bin")
    os.mkfifo(fifo)
    loop = os.path.join(out_dir, "loop.bin")
    os.symlink(loop, loop)
    for out in (fifo, loop, os.path.join(out_dir, "x" * 300 + ".bin"),
                os.path.join(model_out, "m.bin"), os.path.join(out_dir, "no-folder", "m.bin")):
        export_refused([out, "--hf", single], ("regular file", "symbolic links", "too long",
                                               "not a directory", "does not exist"), watch)
        export_refused([model_out, "--hf", single, "--tokenizer-out", out],
                       ("regular file", "symbolic links", "too long", "not a directory",
                        "does not exist"), watch)
    # --tokenizer-only: OUT naming its source, or the config.json read beside it
    tok_dir = os.path.join(WORK, "outputs-tok")
    shutil.rmtree(tok_dir, ignore_errors=True)
    os.makedirs(os.path.join(tok_dir, "original"))
    tok = os.path.join(tok_dir, "original", "tokenizer.model")
    shutil.copyfile(os.path.join(TESTS, "data", "tokenizer", "tokenizer.model"), tok)
    shutil.copyfile(os.path.join(single, "config.json"), os.path.join(tok_dir, "config.json"))
    for out in (tok, os.path.join(tok_dir, "config.json")):
        export_refused(["--tokenizer-only", out, "--tokenizer", tok], "input", [tok_dir])


def set_weight(folder, name, index, value):
    """Sets element `index` (row-major) of tensor `name` in the folder's model.safetensors."""
    st = os.path.join(folder, "model.safetensors")
    header, data = read_safetensors(st)
    entry, data = header[name], bytearray(data)
    if entry["dtype"] == "BF16":
        packed = struct.pack("<f", value)[2:] if value == value else b"\xc0\x7f"
    else:
        packed = struct.pack("<e" if entry["dtype"] == "F16" else "<f", value)
    at = entry["data_offsets"][0] + index * len(packed)
    data[at:at + len(packed)] = packed
    write_safetensors(st, header, bytes(data))


def test_export_refuses_nonfinite_weights_in_every_dtype():
    """Issue 24: one policy for NaN and Inf weights whatever --dtype (q8_0 used to write a
    NaN scale with numpy warnings and exit 0, q4_0 refused in one line): refused, in one line
    naming the tensor and the first bad element, no numpy warning, no file left. In F32, BF16
    and F16 checkpoints, matrices and norms alike; and a finite fp32 weight that rounds to
    infinity in bf16."""
    nan, inf = float("nan"), float("inf")
    out_dir = os.path.join(WORK, "nonfinite-out")
    rows = (("F32", "model.embed_tokens.weight", 0, (0, 0), (nan, inf, -inf)),
            ("F32", "model.layers.1.self_attn.q_proj.weight", 64 * 5 + 7, (5, 7), (nan, -inf)),
            ("F32", "model.norm.weight", 63, (63,), (inf,)),
            ("BF16", "model.layers.0.mlp.down_proj.weight", 192 * 3 + 100, (3, 100), (nan, inf)),
            ("F16", "lm_head.weight", 64 * 383 + 63, (383, 63), (-inf, nan)))
    for source, tensor, index, where, values in rows:
        folder = tiny_checkpoint(f"nonfinite-{source}", dtype=source)
        if "q_proj" in tensor:  # a second bad weight, after the first: the first is named
            set_weight(folder, tensor, index + 1000, nan)
        for value in values:
            set_weight(folder, tensor, index, value)
            for dtype in ("fp32", "bf16", "q8_0", "q4_0"):
                needle = f"tensor {tensor}: weight [{', '.join(map(str, where))}] = {value}"
                export_fails(["OUT", "--hf", folder, "--dtype", dtype], needle, out_dir)
    folder = tiny_checkpoint("nonfinite-bf16-range", dtype="F32")
    set_weight(folder, "model.layers.0.mlp.up_proj.weight", 9, 3.4e38)
    export_fails(["OUT", "--hf", folder, "--dtype", "bf16"],
                 "weight [0, 9] = 3.3999999521443642e+38 rounds to infinity in bf16", out_dir)


def test_export_subnormal_weights_without_warnings():
    """Issue 24: subnormal weights (whole matrices, and single groups among normal ones)
    export in every --dtype with nothing on stderr: q4_0's scale search printed numpy's
    overflow and cast warnings. Their q4_0 values are 0 (fp16 scales cannot hold them)."""
    folder = tiny_checkpoint("subnormal", dtype="F32")
    st = os.path.join(folder, "model.safetensors")
    header, data = read_safetensors(st)
    data = bytearray(data)
    for i, name in enumerate(sorted(k for k in header if k.endswith("proj.weight"))):
        start, end = header[name]["data_offsets"]
        x = np.frombuffer(bytes(data[start:end]), "<f4").copy()
        scale = (1e-45, 1e-41, 1e-39, 2e-38)[i % 4]
        if i % 2:
            x[:64] *= scale  # a row of subnormal groups among normal ones
        else:
            x *= scale
        data[start:end] = x.astype("<f4").tobytes()
    write_safetensors(st, header, bytes(data))
    for dtype in ("fp32", "bf16", "q8_0", "q4_0"):
        out = os.path.join(WORK, f"subnormal-{dtype}.bin")
        proc = run([PYTHON, "-W", "error", os.path.join(REPO, "export.py"), out, "--hf", folder,
                    "--dtype", dtype], check=False, timeout=TIMEOUT)
        assert proc.returncode == 0 and proc.stderr == b"", (dtype, proc.stderr[-800:])
        assert b"Warning" not in proc.stdout, (dtype, proc.stdout[-800:])
        expect("export", run_model(out), "", status=0)


def export_interrupted(folder, out_dir, act):
    """Runs an export of folder into out_dir and calls act(process) in the middle of the model's
    write; returns (exit status, stderr). A progress line is printed per tensor, and stdout is a
    4 KB pipe left unread until act is done: the export blocks there, its temporary file made."""
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    proc = subprocess.Popen([PYTHON, os.path.join(REPO, "export.py"), os.path.join(out_dir, "m.bin"),
                             "--hf", folder], stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    try:
        for _ in range(6000):  # until the temporary file exists (at most 60 s)
            if os.listdir(out_dir) or proc.poll() is not None:
                break
            time.sleep(0.01)
        assert os.listdir(out_dir) and proc.poll() is None, "export did not start writing"
        act(proc)
        with os.fdopen(read_end, "rb") as stdout:
            stdout.read()  # unblocks it
        err = proc.communicate(timeout=TIMEOUT)[1].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ROWS["export"] = ROWS.get("export", 0) + 1
    return proc.returncode, err


def test_export_signals_leave_nothing():
    # SIGINT, SIGTERM, SIGHUP (a closed terminal), SIGQUIT while the model is being written:
    # exit 128 + the signal, one line, no temporary file.
    folder = tiny_checkpoint("signals", config={"num_hidden_layers": 12})
    out_dir = os.path.join(WORK, "signals-out")
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        status, err = export_interrupted(folder, out_dir, lambda proc: proc.send_signal(signum))
        name = signal.Signals(signum).name
        assert status == 128 + signum, f"{name}: exit {status}, {err!r}"
        assert err.count("\n") == 1 and name in err, f"{name}: {err!r}"
        assert os.listdir(out_dir) == [], f"{name} left {os.listdir(out_dir)}"


def test_export_inputs_shrinking_and_writes_failing():
    # A safetensors file truncated while export reads it (a SIGBUS when it was mapped), and a
    # write that fails (the file-size limit stands in for a full disk): one line, nothing left.
    for preset, name in (("tiny30", "model.safetensors"), ("tiny32", "model-00002-of-00002.safetensors")):
        folder = tiny_checkpoint("shrinking-" + preset, preset, config={"num_hidden_layers": 12})
        out_dir = os.path.join(WORK, "shrinking-out")
        status, err = export_interrupted(folder, out_dir,
                                         lambda proc: os.truncate(os.path.join(folder, name), 4096))
        assert status == 1 and err.count("\n") == 1 and "ended early" in err, (status, err)
        assert os.listdir(out_dir) == [], os.listdir(out_dir)
    folder = tiny_checkpoint("write-fails")
    out_dir = os.path.join(WORK, "write-fails-out")
    os.makedirs(out_dir, exist_ok=True)

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
    proc = subprocess.run([PYTHON, os.path.join(REPO, "export.py"), os.path.join(out_dir, "m.bin"),
                           "--hf", folder], capture_output=True, timeout=TIMEOUT, preexec_fn=small_files)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.count("\n") == 1 and "too large" in err, (proc.returncode, err)
    assert os.listdir(out_dir) == [], os.listdir(out_dir)
    ROWS["export"] = ROWS.get("export", 0) + 1


NESTED = "@nested@"  # dumps() puts arrays nested `depth` deep in its place


def deep(depth):
    return "[" * depth + "1" + "]" * depth


def dumps(value, depth=900):
    return json.dumps(value).replace(json.dumps(NESTED), deep(depth))


def test_export_json_of_every_wrong_shape():
    folder, sharded, out_dir, out = checkpoints_and_output("json")
    cfg_path = os.path.join(folder, "config.json")
    cfg_text = open(cfg_path).read()
    base = json.loads(cfg_text)
    rope = dict(make_checkpoint.LLAMA3_ROPE)

    def config_rows():
        """(config.json text, needle)"""
        for depth in (100000, 5000, 900):
            yield deep(depth), "config.json"
            yield dumps(dict(base, rope_scaling=NESTED), depth), "config.json"
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                    "rope_theta", "rms_norm_eps", "bos_token_id", "eos_token_id"):
            for value in ([64], {"a": 64}, "64", True, 64.5, [[[]]], NESTED):
                valid = (isinstance(value, float) and key in ("rope_theta", "rms_norm_eps")
                         or value == [64] and key == "eos_token_id")
                if not valid:
                    yield dumps(dict(base, **{key: value})), key
        for key, value in (("architectures", 5), ("architectures", [["LlamaForCausalLM"]]),
                           ("architectures", NESTED), ("model_type", ["llama"]),
                           ("hidden_act", {"silu": 1}), ("attention_bias", "false"),
                           ("mlp_bias", [False]), ("pretraining_tp", "1"),
                           ("tie_word_embeddings", "false"), ("tie_word_embeddings", 1),
                           ("rope_scaling", [1]), ("rope_scaling", "llama3"),
                           ("rope_scaling", dict(rope, rope_type=["llama3"])),
                           ("rope_scaling", dict(rope, rope_type=NESTED)),
                           ("rope_scaling", dict(rope, factor="8")),
                           ("rope_scaling", dict(rope, factor=NESTED)),
                           ("rope_scaling", dict(rope, original_max_position_embeddings=8192.0)),
                           ("eos_token_id", [2, [3]]), ("eos_token_id", []),
                           ("rope_theta", 10 ** 400), ("hidden_size", 10 ** 400),
                           ("rope_theta", 1e39), ("rms_norm_eps", 1e300),
                           ("rope_scaling", dict(rope, factor=1e39)),
                           ("rope_scaling", dict(rope, high_freq_factor=10 ** 400)),
                           ("rope_scaling", dict(rope, original_max_position_embeddings=2 ** 40))):
            yield dumps(dict(base, **{key: value})), key
        yield "[" + cfg_text + "]", "config.json"
        yield cfg_text[:-2] + ', "vocab_size": 384}', "duplicate"
        yield dumps(dict(base, rope_scaling=NESTED)).replace(deep(900), '{"factor": 8, "factor": 8}'), "duplicate"
        yield cfg_text.replace("384", "1" * 5000), "config.json"  # Python's 4300-digit limit

    for text, needle in config_rows():
        open(cfg_path, "w").write(text)
        export_refused([out, "--hf", folder], needle, [folder, out_dir])
    with open(cfg_path, "w") as f:  # 300 MB (sparse): refused before it is read
        f.write(cfg_text)
        f.truncate(300 << 20)
    export_refused([out, "--hf", folder], "too large", [out_dir])
    open(cfg_path, "w").write(cfg_text)

    # safetensors headers: the raw JSON text replaced, the data kept
    st = os.path.join(folder, "model.safetensors")
    original = open(st, "rb").read()
    header, data = read_safetensors(st)
    name = "model.layers.0.mlp.up_proj.weight"
    entry = header[name]

    def raw_header(text):
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw + data

    def with_entry(**fields):
        return dumps(dict(header, **{name: dict(entry, **fields)}))

    full = json.dumps(header)
    header_rows = [(deep(100000), "JSON"), (deep(900), "model.safetensors"),
                   ("{" + f'"{name}": {json.dumps(entry)}, ' + full[1:], "duplicate"),
                   (full[:-1] + ', "__metadata__": {}}', "duplicate"),
                   (dumps(dict(header, **{name: NESTED})), name),
                   (json.dumps(dict(header, **{name: None})), name),
                   (json.dumps(dict(header, **{name: [entry]})), name)]
    for field, values in (("dtype", (["F32"], {"F32": 1}, 5, None, NESTED)),
                          ("shape", ("[64, 192]", [64.0, 192], [True, 192], [[64], 192], None, {},
                                     NESTED, [2 ** 62, 2 ** 62], [3] * 3_000_000)),
                          ("data_offsets", ({"a": 1}, [0], [0.0, 4], ["0", "4"], None, [0, 2 ** 70]))):
        for value in values:
            header_rows.append((with_entry(**{field: value}), name))
    for text, needle in header_rows:
        open(st, "wb").write(raw_header(text))
        export_refused([out, "--hf", folder], needle, [out_dir])
    # a header length over the 100 MB cap, in a (sparse) file long enough to hold it: refused
    # before any of it is read
    with open(st, "wb") as f:
        f.write(struct.pack("<Q", 2_000_000_000) + b"{")
        f.truncate(2_000_000_100)
    export_refused([out, "--hf", folder], "limit", [out_dir])
    open(st, "wb").write(original)

    # the index of a sharded checkpoint
    index_path = os.path.join(sharded, "model.safetensors.index.json")
    index_text = open(index_path).read()
    index = json.loads(index_text)
    first = sorted(index["weight_map"])[0]
    index_rows = [(deep(100000), "index"), (deep(900), "index"), ("[]", "weight_map"),
                  (json.dumps({"weight_map": None}), "weight_map"),
                  (json.dumps({"weight_map": list(index["weight_map"])}), "weight_map"),
                  (json.dumps({"weight_map": dict(index["weight_map"], **{first: 1})}), "weight_map"),
                  (dumps({"weight_map": dict(index["weight_map"], **{first: NESTED})}), "weight_map"),
                  (dumps({"weight_map": NESTED}), "weight_map"),
                  (index_text.replace('"weight_map": {', '"weight_map": {' + f'"{first}": "x", '), "duplicate")]
    for shard in ("", ".", "..", "../config.json", "a\u0000b", "/etc/passwd"):
        index_rows.append((json.dumps({"weight_map": dict(index["weight_map"], **{first: shard})}),
                           ("shard", "regular file", "not a plain file name")))
    for text, needle in index_rows:
        open(index_path, "w").write(text)
        export_refused([out, "--hf", sharded], needle, [sharded, out_dir])
    open(index_path, "w").write(index_text)
    # one tensor name in two shards: a duplicate too, whichever the index names
    shards = [os.path.join(sharded, f"model-0000{k}-of-00002.safetensors") for k in (1, 2)]
    kept = open(shards[1], "rb").read()
    first_header, _ = read_safetensors(shards[0])
    second_header, second_data = read_safetensors(shards[1])
    some = next(n for n in first_header if n != "__metadata__")
    write_safetensors(shards[1], dict(second_header, **{some: dict(first_header[some], data_offsets=[0, 0],
                                                                    shape=[0])}), second_data)
    export_refused([out, "--hf", sharded], ("both", some), [out_dir])
    open(shards[1], "wb").write(kept)

    # tokenizer.json, with --tokenizer-only
    vocab = export_table()  # the 256 single bytes
    good = {"model": {"type": "BPE", "vocab": vocab, "merges": [], "ignore_merges": True},
            "added_tokens": [{"id": 256, "content": "<|begin_of_text|>"}]}
    good_text = json.dumps(good)

    def tok(**changes):
        t = json.loads(good_text)
        for key, value in changes.items():
            (t["model"] if key in ("type", "vocab", "merges") else t)[key] = value
        return dumps(t)

    tok_rows = [(deep(100000), "JSON"), (deep(900), ("JSON", "BPE")), ("[]", "BPE"),
                (tok(model=None), "BPE"), (tok(model=NESTED), "BPE"), (tok(type=5), "BPE"),
                (tok(vocab=list(vocab)), "BPE"), (tok(vocab=dict(vocab, x="1")), "vocab"),
                (tok(vocab=dict(vocab, x=NESTED)), "vocab"),
                (good_text.replace('"vocab": {', '"vocab": {"!": 5, '), "duplicate"),
                (good_text.replace('"id": 256', '"id": 256, "id": 257'), "duplicate")]
    for merges in (None, 5, "a b", [[1, 2]], [["a"]], [["a", "b", "c"]], [5], [None], [NESTED], NESTED):
        tok_rows.append((tok(merges=merges), "merge"))
    for added in (5, "x", {"id": 256}, [5], [None], [{"id": "256", "content": "x"}], [{"id": 256}],
                  [{"id": 256, "content": 5}], [{"id": 2.5, "content": "x"}], NESTED, [NESTED]):
        tok_rows.append((tok(added_tokens=added), "added_tokens"))
    tok_path = os.path.join(WORK, "json-tokenizer.json")
    tok_out = os.path.join(out_dir, "t.tok")
    for text, needle in tok_rows:
        open(tok_path, "w").write(text)
        export_refused(["--tokenizer-only", tok_out, "--tokenizer", tok_path], needle, [out_dir])
    open(tok_path, "w").write(good_text)
    run([PYTHON, os.path.join(REPO, "export.py"), "--tokenizer-only", tok_out, "--tokenizer", tok_path])
    os.remove(tok_out)


def test_export_refuses_what_run_refuses():
    # Every header check of run.c's parse_header, made by export.py on config.json (in float32,
    # as the header holds the values), and every check of tokenizer.c's loader: export refuses
    # what run.c would refuse. (tests/test_export.py: what export accepts, run.c runs.)
    folder, _, out_dir, out = checkpoints_and_output("run-checks")
    cfg_path = os.path.join(folder, "config.json")
    cfg_text = open(cfg_path).read()
    base = json.loads(cfg_text)
    nan, inf = float("nan"), float("inf")
    rows = []  # (config.json changes, needle)
    for value in (nan, inf, -inf, 0.5, 1.0, 1e-50, 1.00000001, 0, -1.0, 3.5e38):
        rows.append(({"rope_theta": value}, "rope_theta"))
    for value in (nan, inf, 5.0, 1.0, 1e-50, 0.99999999, 0, -1e-5):
        rows.append(({"rms_norm_eps": value}, "rms_norm_eps"))
    for key, limit in (("hidden_size", 1 << 20), ("intermediate_size", 1 << 20),
                       ("num_hidden_layers", 1024), ("num_attention_heads", 4096),
                       ("num_key_value_heads", 4096), ("head_dim", 4096), ("vocab_size", 1 << 22),
                       ("max_position_embeddings", 1 << 24)):
        for value in (limit + 1, 2 ** 31 - 1, 0, -1):
            rows.append(({key: value}, key))
    rows += [({"head_dim": 3}, "head_dim"), ({"head_dim": 34}, "shape"),
             ({"num_attention_heads": 4096, "num_key_value_heads": 4096, "head_dim": 258},
              "num_attention_heads * head_dim"),
             ({"num_key_value_heads": 8}, "num_key_value_heads"),
             ({"num_key_value_heads": 3}, "num_key_value_heads"),
             ({"num_attention_heads": 5, "head_dim": None}, "hidden_size is not a multiple")]
    rope = dict(make_checkpoint.LLAMA3_ROPE)
    for key, values in (("factor", (nan, inf, 0.5, 0.99999, 0, -8.0)),
                        ("low_freq_factor", (nan, inf, 0, -1.0, 4.0, 5.0)),
                        ("high_freq_factor", (nan, inf, 1.0, 0.5, 1e39)),
                        ("original_max_position_embeddings", (0, -1, 2 ** 31, 8192.5))):
        for value in values:
            rows.append(({"rope_scaling": dict(rope, **{key: value})}, key))
    for key, value in (("bos_token_id", 384), ("bos_token_id", -1), ("eos_token_id", [384]),
                       ("eos_token_id", [2, -1]), ("eos_token_id", list(range(9))), ("eos_token_id", [])):
        rows.append(({key: value}, key))
    for changes, needle in rows:
        cfg = {k: v for k, v in dict(base, **changes).items() if v is not None}
        open(cfg_path, "w").write(json.dumps(cfg))  # NaN and Infinity as Python writes them
        export_refused([out, "--hf", folder], needle, [folder, out_dir])
    open(cfg_path, "w").write(cfg_text)

    # tokenizers: a byte without a token, an empty token, two specials alike, a size that is
    # not the model's vocab_size
    chars = {byte: char for char, byte in export_table().items()}
    vocab = {chars[b]: b for b in range(256)}
    specials = [{"id": 256 + i, "content": f"<|special_{i}|>"} for i in range(128)]
    specials[0]["content"] = "<|begin_of_text|>"
    good = {"model": {"type": "BPE", "vocab": vocab, "merges": [], "ignore_merges": True},
            "added_tokens": specials}
    no_a = {c: (i if i < 65 else i - 1) for c, i in vocab.items() if c != "A"}
    tok_rows = [(dict(good, model=dict(good["model"], vocab=no_a),
                      added_tokens=[dict(s, id=s["id"] - 1) for s in specials]), "0x41"),
                (dict(good, model=dict(good["model"], vocab=dict(vocab, **{"": 256})),
                      added_tokens=[dict(s, id=s["id"] + 1) for s in specials]), "empty"),
                (dict(good, added_tokens=specials[:-1] + [dict(specials[-1], content="")]), "empty"),
                (dict(good, added_tokens=specials[:-1] + [dict(specials[-1], content="<|special_1|>")]),
                 "same bytes"),
                (dict(good, added_tokens=specials[:-1]), "vocab_size")]
    for tokenizer, needle in tok_rows:
        json.dump(tokenizer, open(os.path.join(folder, "tokenizer.json"), "w"))
        export_refused([out, "--hf", folder], needle, [folder, out_dir])
        export_refused([out, "--hf", folder, "--tokenizer", os.path.join(folder, "tokenizer.json")],
                       needle, [folder, out_dir])
    lines = [base64.b64encode(bytes([b])).decode() + f" {b - (b > 65)}" for b in range(256) if b != 65]
    open(os.path.join(folder, "tokenizer.model"), "w").write("\n".join(lines) + "\n")
    os.remove(os.path.join(folder, "tokenizer.json"))
    export_refused([out, "--hf", folder], "0x41", [folder, out_dir])
    export_refused(["--tokenizer-only", out, "--tokenizer", os.path.join(folder, "tokenizer.model")],
                   "0x41", [folder, out_dir])
    # integers chosen to collide in Python's hash (k * (2^61 - 1)): as tiktoken ranks or added
    # token ids they would make dict insertion quadratic (minutes for 100,000); refused at once
    colliding = [k * (2 ** 61 - 1) for k in range(1, 100_001)]
    tiktoken = os.path.join(WORK, "colliding.model")
    open(tiktoken, "w").write("".join(f"{base64.b64encode(b'x%d' % k).decode()} {rank}\n"
                                      for k, rank in enumerate(colliding)))
    export_refused(["--tokenizer-only", out, "--tokenizer", tiktoken], "out of range", [out_dir])
    flood = dict(good, added_tokens=[{"id": i, "content": f"<|{i}|>"} for i in colliding])
    json.dump(flood, open(os.path.join(WORK, "colliding.json"), "w"))
    export_refused(["--tokenizer-only", out, "--tokenizer", os.path.join(WORK, "colliding.json")],
                   "out of range", [out_dir])
    # the good tokenizer (384 tokens) exports with the model, and both load in run.c
    json.dump(good, open(os.path.join(folder, "tokenizer.json"), "w"))
    run([PYTHON, os.path.join(REPO, "export.py"), out, "--hf", folder])
    proc = run([program("run"), out, "-i", "hello", "-n", "2", "-t", "0"], timeout=TIMEOUT)
    assert proc.returncode == 0


def export_table():
    """GPT-2's byte-level BPE characters: {character: byte}, as export.py reads them."""
    sys.path.insert(0, REPO)
    import export
    return export.gpt2_unicode_to_byte()


# ------------------------------------------------------------------------------------------
# GGUF files given to export.py --gguf: a file made by llama.cpp (tests/data/gguf), taken
# apart here and put back together with one thing damaged

GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_string(text):
    raw = text if isinstance(text, bytes) else text.encode()
    return struct.pack("<Q", len(raw)) + raw


def gguf_value_end(blob, pos, kind):
    """Where a metadata value of type kind starting at pos ends."""
    if kind == 8:
        return pos + 8 + struct.unpack_from("<Q", blob, pos)[0]
    if kind == 9:
        item, n = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        for _ in range(n):
            pos = gguf_value_end(blob, pos, item)
        return pos
    return pos + GGUF_SCALAR_SIZES[kind]


def gguf_parts(path):
    """(version, [(key, type, raw value)], [(name, dims, type, offset)], data, alignment) of a
    GGUF, read here without export.py."""
    blob = open(path, "rb").read()
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", blob, 4)
    pos, kvs, infos = 24, [], []
    for _ in range(n_kv):
        n = struct.unpack_from("<Q", blob, pos)[0]
        key = blob[pos + 8:pos + 8 + n].decode()
        kind = struct.unpack_from("<I", blob, pos + 8 + n)[0]
        start = pos + 12 + n
        pos = gguf_value_end(blob, start, kind)
        kvs.append((key, kind, blob[start:pos]))
    for _ in range(n_tensors):
        n = struct.unpack_from("<Q", blob, pos)[0]
        name = blob[pos + 8:pos + 8 + n].decode()
        pos += 8 + n
        n_dims = struct.unpack_from("<I", blob, pos)[0]
        dims = list(struct.unpack_from(f"<{n_dims}Q", blob, pos + 4))
        kind, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * n_dims)
        pos += 16 + 8 * n_dims
        infos.append((name, dims, kind, offset))
    alignment = 32
    for key, kind, raw in kvs:
        if key == "general.alignment":
            alignment = struct.unpack("<I", raw)[0]
    pos += -pos % alignment
    return version, kvs, infos, blob[pos:], alignment


def gguf_file(version, kvs, infos, data, alignment=32, n_tensors=None, n_kv=None):
    """A GGUF from its parts (counts as given, or the true ones)."""
    out = [b"GGUF", struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                len(kvs) if n_kv is None else n_kv)]
    for key, kind, raw in kvs:
        out += [gguf_string(key), struct.pack("<I", kind), raw]
    for name, dims, kind, offset in infos:
        out += [gguf_string(name), struct.pack("<I", len(dims)),
                struct.pack(f"<{len(dims)}Q", *dims), struct.pack("<IQ", kind, offset)]
    head = b"".join(out)
    return head + bytes(-len(head) % alignment) + data


def gguf_rows():
    """[(description, file bytes, needle)]: damage of every kind to a Q4_0 GGUF of ref30."""
    source = os.path.join(TESTS, "data", "gguf", "ref30-q4_0.gguf")
    good = open(source, "rb").read()
    version, kvs, infos, data, align = gguf_parts(source)
    assert gguf_file(version, kvs, infos, data, align) == good, "taken apart and put back"
    u32, u64, q = (lambda v: struct.pack("<I", v)), (lambda v: struct.pack("<Q", v)), 2 ** 63

    def with_kv(key, kind, raw):  # replaced, or added at the end
        kept = [kv for kv in kvs if kv[0] != key]
        return gguf_file(version, kept + [(key, kind, raw)], infos, data, align)

    def with_info(i, **change):
        changed = list(infos)
        name, dims, kind, offset = changed[i]
        changed[i] = (change.get("name", name), change.get("dims", dims),
                      change.get("kind", kind), change.get("offset", offset))
        return gguf_file(version, kvs, changed, data, align)

    rows = [("empty", b"", "not a GGUF"), ("3 bytes", good[:3], "not a GGUF"),
            ("bad magic", b"GGUF"[::-1] + good[4:], "not a GGUF")]
    # truncated at every boundary of the header, the metadata and the tensor infos, inside
    # every tensor, and one byte short
    ends, pos = [4, 8, 16, 24], 24
    for key, kind, raw in kvs:
        pos += 8 + len(key.encode())
        ends += [pos, pos + 4]
        pos += 4 + len(raw)
        ends.append(pos)
    for name, dims, kind, offset in infos:
        pos += 8 + len(name) + 4 + 8 * len(dims) + 12
        ends.append(pos)
    head = len(good) - len(data)
    ends += [head + offset + 7 for _, _, _, offset in infos] + [len(good) - 1]
    rows += [(f"cut at {n}", good[:n], ("truncated", "outside the data", "past the end"))
             for n in sorted(set(ends))]
    # versions
    for v, needle in ((1, "version 1"), (4, "version 4"), (0x03000000, "big-endian"), (0, "version 0")):
        rows.append((f"version {v}", gguf_file(v, kvs, infos, data, align), needle))
    # counts and lengths past the end of the file
    rows += [("tensor count 2^63", gguf_file(version, kvs, infos, data, align, n_tensors=q), "tensor count"),
             ("tensor count 2^16+1", gguf_file(version, kvs, infos, data, align, n_tensors=65537), "tensor count"),
             ("metadata count 2^63", gguf_file(version, kvs, infos, data, align, n_kv=q), "metadata count"),
             ("metadata count + 1", gguf_file(version, kvs, infos, data, align, n_kv=len(kvs) + 1),
              ("value type", "past the end", "truncated", "metadata key", "length")),
             ("tensor count + 1", gguf_file(version, kvs, infos, data, align, n_tensors=len(infos) + 1),
              ("past the end", "truncated", "tensor"))]
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        kind, raw = next((k, r) for name, k, r in kvs if name == key)
        item = raw[:4]
        for count in (q, 2 ** 64 - 1, 1 << 40, struct.unpack_from("<Q", raw, 4)[0] * 1000):
            rows.append((f"{key} count {count}", with_kv(key, kind, item + u64(count) + raw[12:]),
                         ("past the end", "over the limit")))
    # string lengths of 2^63 (and 2^64 - 1) in a key, a value, an array and a tensor name
    for n in (q, 2 ** 64 - 1):
        long = u64(n) + b"x"
        rows += [(f"key length {n}", good[:24] + long + good[24 + 8 + len(kvs[0][0]):], "length"),
                 (f"string value length {n}", with_kv("general.architecture", 8, long), "length"),
                 (f"token length {n}", with_kv("tokenizer.ggml.tokens", 9, u32(8) + u64(1) + long), "length"),
                 (f"tensor name length {n}", with_info(0, name="x").replace(gguf_string("x"), long, 1), "length")]
    # value types unknown, arrays of arrays and of unknown types, a bool array, duplicates
    for kind in (13, 255, 2 ** 32 - 1):
        rows.append((f"value type {kind}", with_kv("general.name", kind, b"\0" * 8), "unknown value type"))
        rows.append((f"array of type {kind}", with_kv("general.tags", 9, u32(kind) + u64(1) + b"\0" * 8),
                     "unknown type"))
    rows += [("array of arrays", with_kv("general.tags", 9, u32(9) + u64(1) + u32(4) + u64(1) + u32(7)), "arrays"),
             ("array of arrays of arrays", with_kv("general.tags", 9, u32(9) + u64(1) + u32(9) + u64(0)), "arrays"),
             ("duplicate key", gguf_file(version, kvs + [kvs[0]], infos, data, align), "duplicate metadata key"),
             ("duplicate tensor", gguf_file(version, kvs, infos + [infos[0]], data, align), "duplicate tensor"),
             ("key not UTF-8", good[:24] + gguf_string(b"\xff\xfe") + good[24 + 8 + len(kvs[0][0]):],
              "UTF-8")]
    # tensor offsets overlapping, misaligned, outside the data; shapes that overflow or lie
    last = len(infos) - 1
    qi = next(i for i, info in enumerate(infos) if info[2] == 2)  # a Q4_0 matrix
    rows += [("overlap", with_info(1, offset=infos[0][3]), "overlap"),
             ("overlap by 32", with_info(2, offset=infos[1][3] + 32), "overlap"),
             ("misaligned by 1", with_info(1, offset=infos[1][3] + 1), "not a multiple of the alignment"),
             ("misaligned by 16", with_info(1, offset=infos[1][3] + 16), "not a multiple of the alignment"),
             ("offset at the end", with_info(last, offset=len(data)), "outside the data"),
             ("offset 2^64 - 32", with_info(last, offset=2 ** 64 - 32), "outside the data"),
             ("offset past by 32", with_info(last, offset=infos[last][3] + 32 * (len(data) // 32)), "outside the data"),
             ("shape 2^32 cubed", with_info(1, dims=[2 ** 32] * 3), "overflows"),
             ("shape 2^63", with_info(1, dims=[2 ** 63]), "overflows"),
             ("shape 2^64 - 1 x 2", with_info(1, dims=[2 ** 64 - 1, 2]), ("overflows", "block")),
             ("shape (32, 2^50)", with_info(1, dims=[32, 2 ** 50]), "outside the data"),
             ("0 dimensions", with_info(1, dims=[]), "dimensions"),
             ("5 dimensions", with_info(1, dims=[1, 1, 1, 1, 1]), "dimensions"),
             ("unknown ggml type", with_info(1, kind=99), "unknown ggml type 99"),
             ("removed ggml type", with_info(1, kind=31), "unknown ggml type 31"),
             ("row not whole blocks", with_info(qi, dims=[33, 1]), "block")]
    # alignment 0, not a power of two, of the wrong type
    for value, kind in ((0, 4), (3, 4), (48, 4), (2 ** 31 + 1, 4)):
        rows.append((f"alignment {value}", with_kv("general.alignment", kind, u32(value)), "alignment"))
    rows.append(("alignment as a string", with_kv("general.alignment", 8, gguf_string("32")), "alignment"))
    # well-formed files of what llama3.c cannot run: named, with the way out
    rows += [("architecture qwen2", with_kv("general.architecture", 8, gguf_string("qwen2")), "qwen2"),
             ("experts", with_kv("llama.expert_count", 4, u32(8)), "expert"),
             ("SentencePiece tokenizer", with_kv("tokenizer.ggml.model", 8, gguf_string("llama")), "'llama'"),
             ("pre-tokenizer qwen2", with_kv("tokenizer.ggml.pre", 8, gguf_string("qwen2")), "'qwen2'"),
             ("IQ4_NL tensor", with_info(qi, kind=20), "IQ4_NL"),
             ("norm as I32", with_info(next(i for i, t in enumerate(infos) if t[0].endswith("norm.weight")),
                                       kind=26), "not a float type"),
             ("missing tensor", with_info(1, name="blk.9.attn_q.weight"), "missing tensor"),
             ("block count 3", with_kv("llama.block_count", 4, u32(3)), "missing tensor"),
             ("no head count", gguf_file(version, [kv for kv in kvs if kv[0] != "llama.attention.head_count"],
                                        infos, data, align), "head_count"),
             ("rms eps as a string", with_kv("llama.attention.layer_norm_rms_epsilon", 8, gguf_string("1e-5")),
              "layer_norm_rms_epsilon"),
             ("rope scaling yarn", gguf_file(version, kvs + [
                 ("llama.rope.scaling.type", 8, gguf_string("yarn")),
                 ("llama.rope.scaling.factor", 6, struct.pack("<f", 4.0))], infos, data, align), "yarn"),
             ("bos out of range", with_kv("tokenizer.ggml.bos_token_id", 4, u32(4096)), "bos_token_id")]
    return rows


def gguf_rope_rows():
    """[(description, file bytes, needle)]: ref31's rope_freqs (Llama 3.1 scaling) damaged."""
    source = os.path.join(TESTS, "data", "gguf", "ref31-f16.gguf")
    version, kvs, infos, data, align = gguf_parts(source)
    i = next(i for i, info in enumerate(infos) if info[0] == "rope_freqs.weight")
    name, dims, kind, offset = infos[i]
    freqs = list(struct.unpack_from(f"<{dims[0]}f", data, offset))
    rows = []
    for what, values in (("one divisor off", freqs[:10] + [freqs[10] * 1.01] + freqs[11:]),
                         ("factor 16 at the end only", freqs[:-1] + [16.0]),
                         ("reversed", freqs[::-1]), ("zeros", [0.0] * len(freqs)),
                         ("NaN", [float("nan")] * len(freqs))):
        damaged = data[:offset] + struct.pack(f"<{len(values)}f", *values) + data[offset + 4 * len(values):]
        rows.append((f"rope_freqs {what}", gguf_file(version, kvs, infos, damaged, align), "rope_freqs"))
    for what, change in (("as F16", dict(kind=1)), ("shorter", dict(dims=[dims[0] - 4]))):
        changed = list(infos)
        changed[i] = (name, change.get("dims", dims), change.get("kind", kind), offset)
        rows.append((f"rope_freqs {what}", gguf_file(version, kvs, changed, data, align), "rope_freqs"))
    return rows


def test_damaged_gguf_files():
    out_dir = os.path.join(WORK, "gguf-out")
    src_dir = os.path.join(WORK, "gguf-in")
    for folder in (out_dir, src_dir):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
    path = os.path.join(src_dir, "damaged.gguf")
    rows = gguf_rows() + gguf_rope_rows()
    for what, blob, needle in rows:
        open(path, "wb").write(blob)
        try:
            export_refused([os.path.join(out_dir, "m.bin"), "--gguf", path], needle, [out_dir, src_dir])
        except AssertionError as e:
            raise AssertionError(f"{what}: {e}")
    print(f"    {len(rows)} damaged GGUF files")


def test_row_count():
    print("    rows: " + ", ".join(f"{k} {v}" for k, v in ROWS.items()) + f"; total {sum(ROWS.values())}")
    assert sum(ROWS.values()) >= 60, ROWS
