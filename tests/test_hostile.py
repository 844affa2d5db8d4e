"""Hostile input: every damaged model file, tokenizer file, checkpoint, command line and prompt
must end in exit status 1 with one clear first stderr line naming the problem (or, where the
README documents it, a defined outcome), never a crash, hang or half-written file.

The tables are generated: every header field times bad values, truncation at every section
boundary and inside every tensor, every tensor of a checkpoint dropped or reshaped, every numeric
flag with bad values. `make test-sanitize` runs them under ASan + UBSan. Each test prints its
row count; test_row_count checks the total."""
import json
import os
import shutil
import struct
import sys

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
        lines = [l for l in err.splitlines() if not l.startswith(("model:", "prompt:", "seed:", "run: note:"))]
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
            ("tokenizer file as model", GOOD_TOK, "magic"), ("bad magic", b"XXXX" + good[4:], "magic"),
            ("lowercase magic", b"l3cm" + good[4:], "magic"),
            ("llama2.c checkpoint", struct.pack("<7i", 288, 768, 6, 6, 6, 32000, 256) + good[28:], "magic")]
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
    for value in (3, 0xFFFFFFFF):
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
    expect("model", run_model(d), "not a regular file")
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
            ("a model file as tokenizer", model_file(**MODEL_ARGS)[0], "magic"),
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


# ------------------------------------------------------------------------------------------
# The command line


def test_command_line_errors():
    model, tok = good_files()
    cases = [
        ([], "first argument", True), (["-i", "hi"], "first argument", True),
        ([model, "-x", "1"], "unknown option", True), ([model, "--tempo", "1"], "unknown option", True),
        ([model, "-", "1"], "unexpected argument", True), ([model, "hello"], "unexpected argument", True),
        ([model, "-m", "poetry"], "-m", True), ([model, "-o", "xml"], "-o", True),
        ([model, "-a", "lossy"], "-a", True), ([model, "-a", ""], "-a", True),
        ([model, "-w", "mmap"], "-w", True), ([model, "-w", ""], "-w", True),
        ([model, "-i", "a", "-I", "1"], "prompt once", True), ([model, "-f", tok, "-i", "a"], "prompt once", True), ([model, "-m", "chat", "-I", "1"], "-I", True),
        ([model, "-y", "be nice"], "-y", True),
        ([os.path.join(WORK, "missing.bin")], "cannot open", False), ([WORK], "not a regular file", False),
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


def test_wrong_files_name_the_fix():
    """An HF folder, a safetensors file or a GGUF file given as the model, a missing .tok:
    the error names what the file is and the export.py command that makes the right one."""
    model, tok = good_files()
    hf = os.path.join(WORK, "hf-tiny30")
    if not os.path.exists(hf):
        make_checkpoint.make_checkpoint(hf, "tiny30")
    fix = "export.py OUT.bin --hf"
    for path, needle in ((hf, "Hugging Face checkpoint folder"),
                         (os.path.join(hf, "model.safetensors"), "safetensors file"),
                         (write("renamed.bin", open(os.path.join(hf, "model.safetensors"), "rb").read()),
                          "safetensors file"),
                         (write("model.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 0)), "GGUF file")):
        proc = expect("wrong file", [program("run"), path, "-i", "hi"], needle)
        assert fix.encode() in proc.stderr, proc.stderr
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
    proc = subprocess.Popen([program("run"), victim, "-z", tok, "-n", "4", "-t", "0"],
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
    full = dict(status=1, error_word=False)  # the session ends with "run: context full: ..."
    expect("prompt", chat, "context full", stdin=b"x" * (1 << 20) + b"\n", **full)
    expect("prompt", chat, "context full", stdin=b"hello there\n" * 100, **full)
    expect("prompt", chat + ["-i", "y" * 5000], "context full", stdin=b"", **full)


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


def test_row_count():
    print("    rows: " + ", ".join(f"{k} {v}" for k, v in ROWS.items()) + f"; total {sum(ROWS.values())}")
    assert sum(ROWS.values()) >= 60, ROWS
