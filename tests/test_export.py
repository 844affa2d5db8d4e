"""export.py: model files decoded by an independent reader and compared with the Hugging Face
tensors, tokenizer files from both sources, special-token layouts, and bad inputs (each must give
exit status 1, one stderr line naming the problem, and no output file)."""
import base64
import importlib.util
import json
import os
import pty
import re
import shutil
import struct
import subprocess

import numpy as np

from common import DATA, PYTHON, REPO, program, run, scratch
import make_checkpoint
import reference

WORK = scratch("export")
EXPORT = os.path.join(REPO, "export.py")
TOKENIZER = os.path.join(DATA, "tokenizer")
_checkpoints = {}


def checkpoint(preset):
    """A random HF checkpoint of a preset, written once per run (do not modify it)."""
    if preset not in _checkpoints:
        folder = os.path.join(WORK, "hf-" + preset)
        make_checkpoint.make_checkpoint(folder, preset, tokenizer=None)
        _checkpoints[preset] = folder
    return _checkpoints[preset]


def fresh_copy(preset, name):
    """A private copy of a preset's checkpoint that a test may damage."""
    folder = os.path.join(WORK, name)
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(checkpoint(preset), folder)
    return folder


def export(args, check=True):
    return run([PYTHON, EXPORT, *args], check=check)


def export_module():
    spec = importlib.util.spec_from_file_location("export_under_test", EXPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- a reader of the model file (docs/formats.md), independent of export.py but for
# the header's field table, which export.py's MODEL_HEADER gives once for Python and the tests --
HEADER_LAYOUT = export_module().HEADER_LAYOUT

def read_model(path):
    """(header dict, [(label, kind, payload, offset)]) where payload is a float32 array for
    fp32/norms, uint16 bits for bf16, (int8 q, float32 scales) for q8_0, (int8 q in [-8, 7],
    float16 scales) for q4_0."""
    blob = open(path, "rb").read()
    assert blob[:4] == b"L3CM", blob[:4]
    h = {name: struct.unpack_from(fmt, blob, offset) for name, (offset, fmt) in HEADER_LAYOUT.items()}
    h = {name: list(v) if name == "eos_ids" else v[0] for name, v in h.items()}
    end = max(offset + struct.calcsize(fmt) for offset, fmt in HEADER_LAYOUT.values())
    assert blob[end:256] == bytes(256 - end), "the header ends in zeros"
    dim, hd, hidden = h["dim"], h["head_dim"], h["hidden_dim"]
    q_rows, kv_rows = h["n_heads"] * hd, h["n_kv_heads"] * hd
    layout = [("embed", (h["vocab_size"], dim))]
    for i in range(h["n_layers"]):
        layout += [(f"{i}.attn_norm", (dim,)), (f"{i}.wq", (q_rows, dim)), (f"{i}.wk", (kv_rows, dim)),
                   (f"{i}.wv", (kv_rows, dim)), (f"{i}.wo", (dim, q_rows)), (f"{i}.ffn_norm", (dim,)),
                   (f"{i}.w_gate", (hidden, dim)), (f"{i}.w_down", (dim, hidden)),
                   (f"{i}.w_up", (hidden, dim))]
    layout.append(("final_norm", (dim,)))
    if h["tied_classifier"] == 0:
        layout.append(("classifier", (h["vocab_size"], dim)))
    pos, tensors = 256, []

    def take(nbytes, dtype, count):
        nonlocal pos
        pad = -pos % 64
        assert blob[pos:pos + pad] == bytes(pad), "padding must be zero bytes"
        pos += pad
        start = pos
        pos += nbytes
        assert pos <= len(blob), "file too short"
        return np.frombuffer(blob, dtype=dtype, count=count, offset=start), start

    for label, shape in layout:
        n = int(np.prod(shape))
        if len(shape) == 1 or h["weight_type"] == 0:
            arr, off = take(4 * n, "<f4", n)
            tensors.append((label, "fp32", arr.reshape(shape), off))
        elif h["weight_type"] == 1:
            arr, off = take(2 * n, "<u2", n)
            tensors.append((label, "bf16", arr.reshape(shape), off))
        elif h["weight_type"] == 3:  # q4_0: nibbles q + 8, byte j of each 32 values: j | j+16
            packed, off = take(n // 2, "u1", n // 2)
            scales, off2 = take(2 * (n // h["group_size"]), "<f2", n // h["group_size"])
            blocks = packed.reshape(-1, 16)
            nibbles = np.concatenate([blocks & 15, blocks >> 4], axis=1).astype(np.int8) - 8
            tensors.append((label, "q4_0", (nibbles.reshape(shape), scales), off))
            assert off2 % 64 == 0
        else:
            assert h["weight_type"] == 2, h["weight_type"]
            q, off = take(n, "i1", n)
            scales, off2 = take(4 * (n // h["group_size"]), "<f4", n // h["group_size"])
            tensors.append((label, "q8_0", (q.reshape(shape), scales), off))
            assert off2 % 64 == 0
    assert pos == len(blob), f"file has {len(blob) - pos} bytes after the last tensor"
    return h, tensors


def hf_names(cfg):
    """The HF tensor of each label of read_model."""
    names = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
             "classifier": "lm_head.weight"}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names.update({f"{i}.attn_norm": p + "input_layernorm.weight",
                      f"{i}.wq": p + "self_attn.q_proj.weight", f"{i}.wk": p + "self_attn.k_proj.weight",
                      f"{i}.wv": p + "self_attn.v_proj.weight", f"{i}.wo": p + "self_attn.o_proj.weight",
                      f"{i}.ffn_norm": p + "post_attention_layernorm.weight",
                      f"{i}.w_gate": p + "mlp.gate_proj.weight", f"{i}.w_down": p + "mlp.down_proj.weight",
                      f"{i}.w_up": p + "mlp.up_proj.weight"})
    return names


def check_header(h, cfg, weight_type, group_size=0):
    f32 = lambda v: float(np.float32(v))  # noqa: E731
    n_heads = cfg["num_attention_heads"]
    scaling = cfg.get("rope_scaling")
    eos = cfg["eos_token_id"] if isinstance(cfg["eos_token_id"], list) else [cfg["eos_token_id"]]
    want = {
        "version": 1, "dim": cfg["hidden_size"], "hidden_dim": cfg["intermediate_size"],
        "n_layers": cfg["num_hidden_layers"], "n_heads": n_heads,
        "n_kv_heads": cfg.get("num_key_value_heads", n_heads),
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        "vocab_size": cfg["vocab_size"], "max_seq_len": cfg["max_position_embeddings"],
        "rope_theta": f32(cfg["rope_theta"]), "norm_eps": f32(cfg["rms_norm_eps"]),
        "rope_scaling": 1 if scaling else 0,
        "rope_factor": f32(scaling["factor"]) if scaling else 1.0,
        "rope_low_freq_factor": f32(scaling["low_freq_factor"]) if scaling else 1.0,
        "rope_high_freq_factor": f32(scaling["high_freq_factor"]) if scaling else 4.0,
        "rope_original_max_pos": scaling["original_max_position_embeddings"] if scaling else 8192,
        "tied_classifier": 1 if cfg.get("tie_word_embeddings") else 0,
        "weight_type": {"fp32": 0, "bf16": 1, "q8_0": 2, "q4_0": 3}[weight_type],
        "group_size": group_size,
        "bos_id": cfg["bos_token_id"], "n_eos": len(eos), "eos_ids": eos + [-1] * (8 - len(eos)),
    }
    for key, value in want.items():
        assert h[key] == value, f"header {key}: {h[key]!r} != {value!r}"


def export_and_read(preset, dtype, *extra):
    folder = checkpoint(preset)
    out = os.path.join(WORK, f"{preset}-{dtype}{'-'.join(extra)}.bin")
    export([out, "--hf", folder, "--dtype", dtype, *extra])
    cfg = json.load(open(os.path.join(folder, "config.json")))
    weights = reference.load_weights(folder)
    h, tensors = read_model(out)
    return cfg, weights, h, tensors


# -- model files ------------------------------------------------------------------------------

def test_fp32_is_exact():
    for preset in ("tiny30", "tiny31", "tiny32"):
        cfg, weights, h, tensors = export_and_read(preset, "fp32")
        check_header(h, cfg, "fp32")
        names = hf_names(cfg)
        for label, kind, arr, off in tensors:
            assert off % 64 == 0
            assert kind == "fp32"
            assert np.array_equal(arr, weights[names[label]]), f"{preset} {label} differs"
        assert len(tensors) == 2 + 9 * cfg["num_hidden_layers"] + (not cfg.get("tie_word_embeddings"))


def test_bf16_exact_from_bf16_and_rounded_otherwise():
    for preset, source in (("tiny31", "BF16"), ("tiny30", "F32"), ("tiny32", "F16")):
        cfg, weights, h, tensors = export_and_read(preset, "bf16")
        check_header(h, cfg, "bf16")
        names = hf_names(cfg)
        for label, kind, arr, _ in tensors:
            want = weights[names[label]]
            if kind == "fp32":  # norms stay float32, exactly
                assert arr.ndim == 1 and np.array_equal(arr, want), label
                continue
            got = (arr.astype(np.uint32) << 16).view(np.float32)
            if source == "BF16":
                assert np.array_equal(got, want), f"{preset} {label}: bf16 copy not exact"
            else:
                err = np.abs(got - want)
                assert np.all(err <= np.abs(want) * 2.0 ** -8), f"{preset} {label}: error too big"
                # round to nearest: no other bf16 value is closer than the chosen one
                up = ((arr.astype(np.uint32) + 1) << 16).view(np.float32)
                down = ((arr.astype(np.uint32) - 1) << 16).view(np.float32)
                assert np.all(err <= np.abs(up - want)) and np.all(err <= np.abs(down - want)), label


def quantized_matrices(tensors, weights, names):
    """(label, kind, payload, HF tensor) of each matrix of a q8_0 or q4_0 file, once its norms
    are found equal to the HF ones."""
    for label, kind, payload, _ in tensors:
        want = weights[names[label]]
        if kind == "fp32":
            assert np.array_equal(payload, want), label
        else:
            yield label, kind, payload, want


def test_q8_0_within_half_a_step():
    for preset, extra in (("tiny30", ()), ("tiny31", ("--group-size", "32")), ("tiny32", ())):
        cfg, weights, h, tensors = export_and_read(preset, "q8_0", *extra)
        gs = int(extra[1]) if extra else 64
        check_header(h, cfg, "q8_0", gs)
        for label, kind, payload, want in quantized_matrices(tensors, weights, hf_names(cfg)):
            q, scales = payload
            groups = want.reshape(-1, gs)
            assert np.array_equal(scales, (np.abs(groups).max(axis=1) / np.float32(127)).astype(np.float32))
            assert q.min() >= -127
            got = q.reshape(-1, gs).astype(np.float32) * scales[:, None]
            assert np.all(np.abs(got - groups) <= scales[:, None] * (0.5 + 1e-5)), f"{preset} {label}"


def test_ref_checkpoints_export_and_odd_group_size():
    # ref30 (dim 96) cannot use groups of 64: the default falls back to 32, an explicit 64 fails.
    folder = os.path.join(DATA, "reference", "ref30")
    out = os.path.join(WORK, "ref30-q8.bin")
    proc = export([out, "--hf", folder, "--dtype", "q8_0"])
    assert b"group size 32" in proc.stdout
    h, tensors = read_model(out)
    assert h["group_size"] == 32 and h["n_eos"] == 2 and h["eos_ids"][:3] == [2, 3, -1]
    bad = export([out + "x", "--hf", folder, "--dtype", "q8_0", "--group-size", "64"], check=False)
    assert bad.returncode == 1 and b"group-size 64" in bad.stderr
    # ref31: sharded f16 whose layer 0 straddles two files, eos a list
    folder = os.path.join(DATA, "reference", "ref31")
    out = os.path.join(WORK, "ref31.bin")
    export([out, "--hf", folder, "--dtype", "fp32"])
    h, tensors = read_model(out)
    weights = reference.load_weights(folder)
    cfg = json.load(open(os.path.join(folder, "config.json")))
    check_header(h, cfg, "fp32")
    names = hf_names(cfg)
    for label, _, arr, _ in tensors:
        assert np.array_equal(arr, weights[names[label]]), label


def test_default_dtype_and_missing_numpy():
    """Without --dtype the matrices are bf16 (Llama's own type); a python3 without numpy gets
    one line naming the fix, and nothing is written."""
    out = os.path.join(WORK, "default-dtype.bin")
    export([out, "--hf", checkpoint("tiny30")])
    assert read_model(out)[0]["weight_type"] == 1  # bf16
    out = os.path.join(WORK, "no-numpy.bin")
    proc = run([PYTHON, "-S", EXPORT, out, "--hf", checkpoint("tiny30")], check=False)  # -S: no site-packages
    lines = proc.stderr.decode().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "numpy is missing" in lines[0] and \
        "apt-get install python3-numpy" in lines[0], proc.stderr
    assert not os.path.exists(out)


def test_progress_inside_a_large_tensor_on_a_terminal():
    """On a terminal a tensor of several pieces shows how far it is, on the line its progress
    line then replaces; in a pipe, one line per tensor and nothing else."""
    folder = os.path.join(WORK, "hf-demo")
    make_checkpoint.make_checkpoint(folder, "demo", tokenizer=None)  # embedding: 4 pieces
    args = [PYTHON, EXPORT, os.path.join(WORK, "progress.bin"), "--hf", folder, "--dtype", "q4_0"]
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(PYTHON, args)
    shown = b""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child has exited
            break
        if not data:
            break
        shown += data
    os.close(fd)
    assert os.waitpid(pid, 0)[1] == 0, shown
    first = b"[   1/20] model.embed_tokens.weight"
    steps = re.findall(rb"\r" + re.escape(first) + rb" +(\d+)%", shown)
    assert [int(s) for s in steps] == sorted(int(s) for s in steps) and len(steps) >= 2, shown[:800]
    assert all(0 < int(s) < 100 for s in steps), steps
    assert b"\r\x1b[K" + first + b" " in shown, shown[:800]  # then the tensor's own line
    piped = export(args[2:]).stdout
    assert b"%" not in piped and b"\r" not in piped and piped.count(first) == 1


def test_tied_model_ignores_lm_head_and_names_outputs():
    folder = os.path.join(WORK, "tied-with-head")
    make_checkpoint.make_checkpoint(folder, "tiny32", lm_head_when_tied=True, shards=1)
    plain = os.path.join(WORK, "tied-plain")
    make_checkpoint.make_checkpoint(plain, "tiny32", shards=1)
    a, b = os.path.join(WORK, "with-head"), os.path.join(WORK, "plain.bin")
    proc = export([a, "--hf", folder])
    assert b"lm_head.weight ignored" in proc.stdout
    export([b, "--hf", plain])
    assert open(a, "rb").read() == open(b, "rb").read()
    assert read_model(a)[0]["tied_classifier"] == 1
    assert not os.path.exists(a + ".tok")  # no tokenizer in the folder: none written


def test_progress_and_no_leftovers():
    out_dir = os.path.join(WORK, "clean")
    os.makedirs(out_dir, exist_ok=True)
    proc = export([os.path.join(out_dir, "m.bin"), "--hf", checkpoint("tiny30"), "--dtype", "q8_0"])
    lines = [l for l in proc.stdout.decode().splitlines() if l.startswith("[")]
    assert len(lines) == 21 and "rms rel err" in lines[0] and "-> fp32" in lines[1], lines[:2]
    assert proc.stderr == b""
    assert os.listdir(out_dir) == ["m.bin"], os.listdir(out_dir)


def test_output_reaches_the_file_in_aligned_pieces():
    """OutputFile hands the file whole WRITE_PIECE pieces at multiples of it (Linux then
    caches it in 2 MB folios, see export.py), the tail last, and the bytes unchanged."""
    module = export_module()

    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, data):
            self.writes.append(bytes(data))

    piece = module.WRITE_PIECE
    rng = np.random.default_rng(7)
    parts = [b"header" * 40, rng.integers(0, 256, 3 * piece + 12345, dtype=np.uint8),
             np.arange(1000, dtype=np.float32), rng.integers(0, 256, piece - 7, dtype=np.uint8)]
    f = Recorder()
    out = module.OutputFile(f)
    expected = b""
    for part in parts:
        out.write(part)
        expected += bytes(part) if isinstance(part, bytes) else part.tobytes()
        out.align()
        expected += bytes(-len(expected) % module.ALIGN)
    assert out.finish() == len(expected)
    assert b"".join(f.writes) == expected
    assert all(len(w) % piece == 0 and w for w in f.writes[:-1]), [len(w) for w in f.writes]
    assert 0 < len(f.writes[-1]) < piece, len(f.writes[-1])


def test_help_documents_every_option():
    text = export(["--help"]).stdout.decode()
    for option in ("--hf", "--dtype", "--group-size", "--tokenizer-out", "--no-tokenizer",
                   "--tokenizer-only", "--tokenizer", "--specials", "q8_0", "bf16", "fp32"):
        assert option in text, option


# -- tokenizer files --------------------------------------------------------------------------

def read_tok(path):
    blob = open(path, "rb").read()
    magic, version, n_tokens, n_special = struct.unpack_from("<4sIII", blob, 0)
    assert (magic, version) == (b"L3TK", 1)
    pos, tokens = 16, []
    for _ in range(n_tokens):
        (n,) = struct.unpack_from("<I", blob, pos)
        tokens.append(blob[pos + 4:pos + 4 + n])
        pos += 4 + n
    assert pos == len(blob), "bytes after the last record"
    return tokens, n_special


def special_layout(name):
    layouts = json.load(open(os.path.join(TOKENIZER, "special_tokens.json")))["layouts"]
    tokens = layouts[name]["tokens"]
    assert [t["id"] for t in tokens] == list(range(128000, 128256))
    return [t["text"] for t in tokens]


def test_special_layouts_match_special_tokens_json():
    module = export_module()
    for name in ("llama3", "llama3.1", "llama-models"):
        assert module.special_texts(name) == special_layout(name), name


def test_tokenizer_json_and_tiktoken_give_identical_files():
    # The full-vocab model folder carries tokenizer.json (Llama 3 names): exported beside the
    # model by default, named by the model name without .bin.
    folder = os.path.join(WORK, "hf-full-vocab")
    make_checkpoint.make_checkpoint(folder, "full-vocab",
                                    tokenizer=os.path.join(TOKENIZER, "tokenizer.json"))
    model = os.path.join(WORK, "fv.bin")
    export([model, "--hf", folder, "--dtype", "bf16"])
    from_json = open(os.path.join(WORK, "fv.tok"), "rb").read()
    from_model = os.path.join(WORK, "from-model-llama3.tok")
    export(["--tokenizer-only", from_model, "--tokenizer", os.path.join(TOKENIZER, "tokenizer.model"),
            "--specials", "llama3"])
    assert from_json == open(from_model, "rb").read()
    tokens, n_special = read_tok(from_model)
    assert len(tokens) == 128256 and n_special == 256
    lines = open(os.path.join(TOKENIZER, "tokenizer.model"), "rb").read().split(b"\n")
    for rank, line in enumerate(lines[:128000]):
        b64, r = line.split()
        assert int(r) == rank and tokens[rank] == base64.b64decode(b64), rank
    assert [t.decode() for t in tokens[128000:]] == special_layout("llama3")
    # the same for the Llama 3.1 names, which --specials puts over tokenizer.json's own
    a, b = os.path.join(WORK, "j31.tok"), os.path.join(WORK, "m31.tok")
    export(["--tokenizer-only", a, "--tokenizer", os.path.join(TOKENIZER, "tokenizer.json"),
            "--specials", "llama3.1"])
    export(["--tokenizer-only", b, "--tokenizer", os.path.join(TOKENIZER, "tokenizer.model"),
            "--specials", "llama3.1"])
    assert open(a, "rb").read() == open(b, "rb").read()
    assert [t.decode() for t in read_tok(b)[0][128000:]] == special_layout("llama3.1")


def test_tiktoken_special_layout_follows_config():
    # tokenizer.model in original/: Llama 3.1 names for a model with llama3 rope scaling,
    # Llama 3 names without; --tokenizer-out puts the file anywhere; m -> m.tok.
    for changes, layout in (({"rope_scaling": None}, "llama3"), ({}, "llama3.1")):
        folder = os.path.join(WORK, f"tiktoken-{layout}")
        make_checkpoint.make_checkpoint(folder, "full-vocab", tokenizer=None, config=changes)
        os.makedirs(os.path.join(folder, "original"))
        shutil.copyfile(os.path.join(TOKENIZER, "tokenizer.model"),
                        os.path.join(folder, "original", "tokenizer.model"))
        out = os.path.join(WORK, f"tk-{layout}")
        proc = export([out, "--hf", folder, "--dtype", "bf16"])
        assert b"note: tokenizer has" not in proc.stdout
        tokens, _ = read_tok(out + ".tok")
        assert [t.decode() for t in tokens[128000:]] == special_layout(layout), layout
    other = os.path.join(WORK, "elsewhere.tok")
    export([os.path.join(WORK, "tk2.bin"), "--hf", folder, "--dtype", "bf16", "--tokenizer-out", other])
    assert os.path.exists(other) and not os.path.exists(os.path.join(WORK, "tk2.tok"))
    export([os.path.join(WORK, "tk3.bin"), "--hf", folder, "--dtype", "bf16", "--no-tokenizer"])
    assert not os.path.exists(os.path.join(WORK, "tk3.tok"))


# -- bad inputs -------------------------------------------------------------------------------

def expect_failure(args, *words):
    """exit 1, exactly one stderr line containing every word, no output file or temp file."""
    out_dir = os.path.join(WORK, "fail-out")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    out = os.path.join(out_dir, "out.bin")
    proc = export([out if a == "OUT" else a for a in args], check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1, f"{args}: exit {proc.returncode}, stderr {err!r}"
    assert err.count("\n") == 1 and err.endswith("\n"), f"{args}: stderr not one line: {err!r}"
    for word in words:
        assert word.lower() in err.lower(), f"{args}: {word!r} not in {err!r}"
    assert os.listdir(out_dir) == [], os.listdir(out_dir)
    return err


def edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    cfg = json.load(open(path))
    for key, value in changes.items():
        if value is Ellipsis:
            del cfg[key]
        else:
            cfg[key] = value
    json.dump(cfg, open(path, "w"))


def edit_header(path, change):
    """Rewrites a safetensors header through change(header dict), keeping the data bytes."""
    blob = open(path, "rb").read()
    (n,) = struct.unpack_from("<Q", blob, 0)
    header = json.loads(blob[8:8 + n])
    change(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    open(path, "wb").write(struct.pack("<Q", len(raw)) + raw + blob[8 + n:])


def test_bad_config_inputs():
    expect_failure(["OUT", "--hf", os.path.join(WORK, "no-such-folder")], "no-such-folder", "not found")
    f = fresh_copy("tiny30", "bad-noconfig")
    os.remove(os.path.join(f, "config.json"))
    expect_failure(["OUT", "--hf", f], "config.json")
    cases = [
        ({"rms_norm_eps": ...}, ["missing", "rms_norm_eps"]),
        ({"hidden_size": ...}, ["missing", "hidden_size"]),
        ({"bos_token_id": ...}, ["bos_token_id"]),
        ({"rope_theta": "big"}, ["rope_theta"]),
        ({"architectures": ["MistralForCausalLM"]}, ["architecture", "MistralForCausalLM"]),
        ({"model_type": "gemma"}, ["model_type", "gemma"]),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["rope_scaling", "yarn"]),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, ["rope_scaling", "linear"]),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0}}, ["original_max_position_embeddings"]),
        ({"eos_token_id": list(range(9))}, ["eos_token_id"]),
        ({"eos_token_id": 384}, ["384"]),
        ({"num_key_value_heads": 3}, ["num_key_value_heads"]),
        ({"intermediate_size": 256}, ["gate_proj", "shape"]),
        ({"tie_word_embeddings": True, "vocab_size": 400}, ["embed_tokens", "shape"]),
    ]
    f = fresh_copy("tiny30", "bad-config")
    original = open(os.path.join(f, "config.json")).read()
    for changes, words in cases:
        open(os.path.join(f, "config.json"), "w").write(original)
        edit_config(f, **changes)
        expect_failure(["OUT", "--hf", f], *words)
    open(os.path.join(f, "config.json"), "w").write("{\"hidden_size\": 64,")
    expect_failure(["OUT", "--hf", f], "config.json", "JSON")


def test_bad_tensor_inputs():
    up = "model.layers.1.mlp.up_proj.weight"
    gate = "model.layers.0.mlp.gate_proj.weight"

    def drop(name):
        return lambda h: h.pop(name)

    def set_field(name, field, value):
        return lambda h: h[name].__setitem__(field, value)

    def overlap(h):
        # gate_proj moved to start 4 bytes into up_proj's data, keeping its own length
        begin, end = h[gate]["data_offsets"]
        start = h[up]["data_offsets"][0] + 4
        h[gate]["data_offsets"] = [start, start + end - begin]

    cases = [
        (drop(up), [up, "missing"]),
        (drop("lm_head.weight"), ["lm_head.weight", "missing"]),
        (set_field(gate, "shape", [64, 192]), [gate, "shape"]),
        (set_field(gate, "dtype", "I32"), [gate, "I32"]),
        (set_field(gate, "dtype", "F9"), [gate, "F9"]),
        (set_field(gate, "shape", [192, 65]), [gate, "bytes"]),
        (set_field(gate, "data_offsets", [10 ** 9, 10 ** 9 + 192 * 64 * 4]), [gate, "out of range"]),
        (overlap, ["overlap"]),
    ]
    f = fresh_copy("tiny30", "bad-tensors")
    path = os.path.join(f, "model.safetensors")
    original = open(path, "rb").read()
    for change, words in cases:
        open(path, "wb").write(original)
        edit_header(path, change)
        expect_failure(["OUT", "--hf", f], *words)
    # damaged files
    open(path, "wb").write(original[:-100])
    expect_failure(["OUT", "--hf", f], "out of range", "truncated")
    open(path, "wb").write(struct.pack("<Q", 10 ** 12) + original[8:])
    expect_failure(["OUT", "--hf", f], "header length", "past the end")
    (n,) = struct.unpack_from("<Q", original, 0)
    open(path, "wb").write(original[:8] + b"{\"x\": [" + b" " * (n - 7) + original[8 + n:])
    expect_failure(["OUT", "--hf", f], "model.safetensors", "JSON")
    open(path, "wb").write(original[:5])
    expect_failure(["OUT", "--hf", f], "too short")
    os.remove(path)
    expect_failure(["OUT", "--hf", f], "model.safetensors")
    # shards
    f = fresh_copy("tiny32", "bad-shards")
    os.remove(os.path.join(f, "model-00002-of-00002.safetensors"))
    expect_failure(["OUT", "--hf", f], "missing shard", "model-00002-of-00002.safetensors")
    f = fresh_copy("tiny32", "bad-index")
    index_path = os.path.join(f, "model.safetensors.index.json")
    index = json.load(open(index_path))
    name = next(n for n, shard in index["weight_map"].items() if shard.startswith("model-00002"))
    index["weight_map"][name] = "model-00001-of-00002.safetensors"
    json.dump(index, open(index_path, "w"))
    expect_failure(["OUT", "--hf", f], name, "does not contain")
    # options and outputs
    expect_failure(["OUT", "--hf", checkpoint("tiny30"), "--dtype", "q8_0", "--group-size", "48"],
                   "group-size 48")
    expect_failure(["OUT", "--hf", checkpoint("tiny30"), "--dtype", "int4"], "dtype")
    for size in ("48", "16", "0", "-32"):  # q4_0 groups: whole blocks of 32
        expect_failure(["OUT", "--hf", checkpoint("tiny30"), "--dtype", "q4_0", "--group-size", size],
                       "group")
    expect_failure(["OUT", "--hf", os.path.join(DATA, "reference", "ref30"), "--dtype", "q4_0",
                    "--group-size", "64"], "does not divide", "96")
    expect_failure([os.path.join(WORK, "no-dir", "m.bin"), "--hf", checkpoint("tiny30")], "does not exist")


def test_bad_tokenizer_inputs():
    good = [base64.b64encode(bytes([b])).decode() + f" {b}" for b in range(256)]
    cases = [
        (good[:10] + ["!!notbase64 10"] + good[11:], ["bad base64"]),
        (good[:10] + [good[3].split()[0] + " 10"] + good[11:], ["duplicate token"]),
        (good[:10] + good[11:], ["rank 255 is out of range"]),
        (good + [good[5].split()[0] + " 5"], ["duplicate rank"]),
        (good[:3] + ["QQ=="] + good[4:], ["expected"]),
    ]
    for i, (lines, words) in enumerate(cases):
        path = os.path.join(WORK, f"bad{i}.model")
        open(path, "w").write("\n".join(lines) + "\n")
        expect_failure(["--tokenizer-only", "OUT", "--tokenizer", path], os.path.basename(path), *words)
    # a well-formed small file works, with the special names appended
    path = os.path.join(WORK, "good.model")
    open(path, "w").write("\n".join(good) + "\n")
    out = os.path.join(WORK, "good.tok")
    export(["--tokenizer-only", out, "--tokenizer", path, "--specials", "llama3"])
    tokens, n_special = read_tok(out)
    assert tokens[:256] == [bytes([b]) for b in range(256)] and n_special == 256
    # tokenizer.json problems
    tj = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 1}, "merges": ["a b"]},
          "added_tokens": []}
    for i, (change, words) in enumerate([
            (lambda t: None, ["duplicate vocab id 1"]),
            (lambda t: t["model"]["vocab"].update(ab=3), ["vocab ids"]),
            (lambda t: t["model"].update(type="WordPiece"), ["BPE"]),
            (lambda t: (t["model"]["vocab"].update(ab=2, c=3, abc=4),
                        t["model"].update(merges=["ab c", "a b"])), ["merge"]),
            (lambda t: (t["model"]["vocab"].update(ab=2),
                        t.update(added_tokens=[{"id": 0, "content": "a"}, {"id": 4, "content": "<|x|>"}])),
             ["contiguous"]),
            (lambda t: (t["model"]["vocab"].update(ab=2),
                        t.update(added_tokens=[{"id": 5, "content": "<|x|>"}])), ["out of range"])]):
        t = json.loads(json.dumps(tj))
        change(t)
        path = os.path.join(WORK, f"bad{i}.json")
        json.dump(t, open(path, "w"))
        expect_failure(["--tokenizer-only", "OUT", "--tokenizer", path], *words)
    expect_failure(["--tokenizer-only", "OUT", "--tokenizer", os.path.join(WORK, "none.model")], "not found")
    # a bad tokenizer in a model folder fails the export before anything is written
    f = fresh_copy("tiny30", "bad-tok-in-model")
    open(os.path.join(f, "tokenizer.model"), "w").write("\n".join(good[:10] + good[11:]) + "\n")
    expect_failure(["OUT", "--hf", f], "out of range")


# -- what export accepts, run.c runs ----------------------------------------------------------

def random_config(rng):
    """A config.json within every bound export.py (and run.c) accepts, with odd sizes."""
    kv = int(rng.integers(1, 4))
    heads = kv * int(rng.integers(1, 4))
    head_dim = 2 * int(rng.integers(1, 9))
    vocab = int(rng.integers(1, 300))
    cfg = make_checkpoint.base_config(
        hidden_size=int(rng.integers(1, 48)), intermediate_size=int(rng.integers(1, 64)),
        num_hidden_layers=int(rng.integers(1, 4)), num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=head_dim, vocab_size=vocab,
        max_position_embeddings=int(rng.choice([2, 17, 8192, 1 << 24])),
        rope_theta=float(rng.choice([1.0000002, 10.0, 500000.0, 3.4e38])),
        rms_norm_eps=float(rng.choice([1.4e-45, 1e-5, 0.5, 0.9999999])),
        tie_word_embeddings=bool(rng.integers(0, 2)),
        bos_token_id=int(rng.integers(0, vocab)),
        eos_token_id=[int(e) for e in rng.integers(0, vocab, int(rng.integers(1, 9)))])
    if rng.integers(0, 2):
        low = float(rng.choice([1e-30, 1.0, 2.5]))
        cfg["rope_scaling"] = {
            "rope_type": "llama3", "factor": float(rng.choice([1.0, 8.0, 1e30])),
            "low_freq_factor": low, "high_freq_factor": float(rng.choice([low * 1.5, 4.0 + low, 3.4e38])),
            "original_max_position_embeddings": int(rng.choice([1, 8192, 2 ** 31 - 1]))}
    if rng.integers(0, 2) and cfg["hidden_size"] == heads * head_dim:
        del cfg["head_dim"]
    return cfg


def test_what_export_accepts_run_runs():
    """Configs at the edges of what export.py accepts (float32 values just inside run.c's
    bounds, the largest context, one-wide matrices, q8_0 groups of 1) and random ones: every
    exported file loads in run.c and decodes a token."""
    rng = np.random.default_rng(14)
    edges = [dict(vocab_size=1, bos_token_id=0, eos_token_id=0, hidden_size=1, intermediate_size=1,
                  num_attention_heads=1, num_key_value_heads=1, head_dim=2,
                  max_position_embeddings=1 << 24, rope_theta=1.0000002, rms_norm_eps=1.4e-45),
             dict(num_attention_heads=3, num_key_value_heads=3, head_dim=4096, hidden_size=2,
                  rope_theta=3.4e38, rms_norm_eps=0.9999999, eos_token_id=list(range(8)),
                  rope_scaling={"rope_type": "llama3", "factor": 1.0, "low_freq_factor": 1e-30,
                                "high_freq_factor": 3.4e38,
                                "original_max_position_embeddings": 2 ** 31 - 1})]
    base = make_checkpoint.PRESETS["tiny30"]["config"]
    configs = [dict(base, **edge) for edge in edges] + [random_config(rng) for _ in range(12)]
    for k, cfg in enumerate(configs):
        folder = os.path.join(WORK, f"accepted-{k}")
        source = str(rng.choice(["F32", "F16", "BF16"]))
        make_checkpoint.write_checkpoint(folder, cfg, dtype=source, shards=1 + k % 2, seed=k, std=0.5)
        for dtype in ("fp32", "bf16", "q8_0"):
            model = os.path.join(WORK, f"accepted-{k}-{dtype}.bin")
            export([model, "--hf", folder, "--dtype", dtype])
            proc = run([program("run"), model, "-I", "0", "-o", "ids", "-n", "1", "-t", "0", "-e", "0"],
                       check=False)
            assert proc.returncode == 0, f"config {k} {dtype} ({cfg}): {proc.stderr.decode()[-400:]}"
            ids = proc.stdout.split()
            assert len(ids) == 1 and 0 <= int(ids[0]) < cfg["vocab_size"], (k, dtype, proc.stdout)
            os.remove(model)
        shutil.rmtree(folder)


# -- outputs: exclusive, random, all or nothing -------------------------------------------------

def test_temporary_files_are_new_random_files():
    module = export_module()
    folder = os.path.join(WORK, "temporaries")
    os.makedirs(folder)
    victim = os.path.join(folder, "victim")
    open(victim, "wb").write(b"precious")
    final = os.path.join(folder, "m.bin")
    # names a planted symlink cannot guess: two temporaries never share one
    outputs = module.AtomicOutputs()
    with outputs.create(final) as a, outputs.create(final) as b:
        assert a.name != b.name
    outputs.cleanup()
    assert sorted(os.listdir(folder)) == ["victim"]
    # and even a name that was guessed is never written through: the next random one is used
    names = iter(["guessed", "guessed", "fresh"])
    original = module.secrets.token_hex
    module.secrets.token_hex = lambda n: next(names)
    try:
        guessed = module.fresh_name(final, "tmp")
        os.symlink(victim, guessed)
        outputs = module.AtomicOutputs()
        with outputs.create(final) as f:
            f.write(b"model bytes")
    finally:
        module.secrets.token_hex = original
    assert open(victim, "rb").read() == b"precious"
    assert os.readlink(guessed) == victim
    outputs.commit()
    assert open(final, "rb").read() == b"model bytes"
    assert sorted(os.listdir(folder)) == sorted(["victim", "m.bin", os.path.basename(guessed)])


def test_commit_is_all_or_nothing():
    """When the second rename fails, the first output is undone: the file it replaced comes back
    (or, where there was none, the new one goes), and no temporary or set-aside file is left."""
    module = export_module()
    folder = os.path.join(WORK, "commit")
    for existed in (True, False):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        model, tok = os.path.join(folder, "m.bin"), os.path.join(folder, "m.tok")
        if existed:
            open(model, "wb").write(b"old model")
            open(tok, "wb").write(b"old tokenizer")
        outputs = module.AtomicOutputs()
        for path in (model, tok):
            with outputs.create(path) as f:
                f.write(b"new " + os.path.basename(path).encode())
        real_replace, calls = module.os.replace, []

        def failing_replace(src, dst):
            calls.append(dst)
            if dst == tok and src.endswith(".tmp"):
                raise OSError(5, "Input/output error", dst)
            return real_replace(src, dst)
        module.os.replace = failing_replace
        try:
            outputs.commit()
            raise AssertionError("commit did not fail")
        except OSError:
            pass
        finally:
            module.os.replace = real_replace
        outputs.cleanup()
        assert model in calls and tok in calls
        left = sorted(os.listdir(folder))
        if existed:
            assert left == ["m.bin", "m.tok"], left
            assert open(model, "rb").read() == b"old model" and open(tok, "rb").read() == b"old tokenizer"
        else:
            assert left == [], left


# -- paths, hints and stdout ----------------------------------------------------------------------

def test_hf_may_name_a_file_in_the_folder():
    folder = checkpoint("tiny30")
    reference_out = os.path.join(WORK, "by-folder.bin")
    export([reference_out, "--hf", folder])
    for name in ("config.json", "model.safetensors"):
        out = os.path.join(WORK, f"by-{name}.bin")
        proc = export([out, "--hf", os.path.join(folder, name)])
        assert b"exporting the folder" in proc.stdout
        assert open(out, "rb").read() == open(reference_out, "rb").read()
    lone = os.path.join(WORK, "lone-dir")
    os.makedirs(lone, exist_ok=True)
    open(os.path.join(lone, "weights.gguf"), "wb").write(b"GGUF")
    expect_failure(["OUT", "--hf", os.path.join(lone, "weights.gguf")], "not a folder", "config.json",
                   "--gguf")


def test_missing_tokenizer_names_the_fix():
    folder = checkpoint("tiny30")  # no tokenizer in the folder
    out = os.path.join(WORK, "no-tok.bin")
    proc = export([out, "--hf", folder])
    text = proc.stdout.decode()
    assert "no tokenizer file written" in text and f"--tokenizer-only {WORK}/no-tok.tok" in text, text
    expect_failure(["OUT", "--hf", folder, "--tokenizer-out", os.path.join(WORK, "x.tok")], "--tokenizer PATH")


def test_config_beside_a_tokenizer_is_read_not_swallowed():
    # --tokenizer-only with a tiktoken file: the layout comes from a config.json beside it (or
    # one folder up); a broken one is an error that names the way round (--specials)
    folder = os.path.join(WORK, "tok-with-config")
    os.makedirs(os.path.join(folder, "original"), exist_ok=True)
    source = os.path.join(folder, "original", "tokenizer.model")
    shutil.copyfile(os.path.join(TOKENIZER, "tokenizer.model"), source)
    cfg = os.path.join(folder, "config.json")
    out = os.path.join(WORK, "near.tok")
    for text, layout in (('{"rope_scaling": null}', "llama3"),
                         (json.dumps({"rope_scaling": make_checkpoint.LLAMA3_ROPE}), "llama3.1")):
        open(cfg, "w").write(text)
        export(["--tokenizer-only", out, "--tokenizer", source])
        assert [t.decode() for t in read_tok(out)[0][128000:]] == special_layout(layout), layout
    for text in ('{"rope_scaling": ', "[]", '{"rope_scaling": {"rope_type": "yarn"}}'):
        open(cfg, "w").write(text)
        expect_failure(["--tokenizer-only", "OUT", "--tokenizer", source], "config.json", "--specials")
        export(["--tokenizer-only", out, "--tokenizer", source, "--specials", "llama3"])
    # a tokenizer.json with its own added tokens does not need it
    shutil.copyfile(os.path.join(TOKENIZER, "tokenizer.json"), os.path.join(folder, "tokenizer.json"))
    export(["--tokenizer-only", out, "--tokenizer", os.path.join(folder, "tokenizer.json")])


def test_closed_stdout_does_not_stop_the_export():
    # `export.py ... | head -1`: progress lines are information; the export goes on without them
    out = os.path.join(WORK, "closed-stdout.bin")
    proc = subprocess.Popen([PYTHON, EXPORT, out, "--hf", checkpoint("tiny30")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait() == 0 and err == b"", err
    assert read_model(out)[0]["dim"] == 64
