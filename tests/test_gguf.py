"""tests/bench/gguf_from_hf.py, the GGUF converter of the llama.cpp side-by-side benches: the parts that
decide whether llama.cpp computes the same model, checked without llama.cpp (its gguf-py is
needed only to write the file)."""
import contextlib
import io
import json
import lzma
import os
import shutil
import sys

import numpy as np

import common
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench"))
import gguf_from_hf  # noqa: E402  (puts the repository on sys.path, for export)
import export  # noqa: E402
import make_checkpoint
import reference
import test_export
import test_tokenizer

EXPORT = os.path.join(common.REPO, "export.py")


def test_gguf_rope_freqs_give_the_reference_frequencies():
    """llama.cpp divides each RoPE frequency by rope_freqs: the result must be the llama3-scaled
    frequencies (factor 8 and factor 32 checkpoints)."""
    for preset in ("tiny31", "tiny32"):
        folder = os.path.join(common.scratch("gguf"), preset)
        cfg = make_checkpoint.make_checkpoint(folder, preset)
        c = export.read_config(folder)
        hd = c["head_dim"]
        base = 1.0 / c["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
        want = reference.rope_inv_freq(cfg, hd)
        got = base / gguf_from_hf.rope_freq_divisors(c)
        assert np.allclose(got, want, rtol=1e-5, atol=0), (preset, got, want)
        assert (gguf_from_hf.rope_freq_divisors(c) != 1).any(), "scaling must change something"


def rope_rotate_half(q, freqs, pos):
    """Hugging Face's RoPE on one head: pairs (i, i + head_dim/2)."""
    half = len(q) // 2
    cos, sin = np.cos(pos * freqs), np.sin(pos * freqs)
    return np.concatenate([q[:half] * cos - q[half:] * sin, q[:half] * sin + q[half:] * cos])


def rope_interleaved(q, freqs, pos):
    """Meta's (and llama.cpp's LLAMA) RoPE on one head: pairs (2i, 2i + 1)."""
    cos, sin = np.cos(pos * freqs), np.sin(pos * freqs)
    out = q.copy()
    out[0::2] = q[0::2] * cos - q[1::2] * sin
    out[1::2] = q[0::2] * sin + q[1::2] * cos
    return out


def test_gguf_meta_layout_rotates_like_hugging_face():
    """Projection rows un-permuted to Meta's layout, rotated by adjacent pairs, must give the
    Hugging Face projection rotated by halves, up to the same fixed reordering of each head's
    entries (so every q.k score, the only use of them, is the same)."""
    rng = np.random.default_rng(0)
    heads, hd, cols = 3, 8, 5
    w = rng.standard_normal((heads * hd, cols))
    x = rng.standard_normal(cols)
    freqs = 1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd)
    hf = (w @ x).reshape(heads, hd)
    meta = (gguf_from_hf.to_meta_layout(w, hd) @ x).reshape(heads, hd)
    for h in range(heads):
        for pos in (0, 1, 7):
            a = rope_rotate_half(hf[h], freqs, pos)
            b = rope_interleaved(meta[h], freqs, pos)
            # Meta's entry 2i is HF's entry i, 2i + 1 is HF's i + head_dim/2
            assert np.allclose(b, a.reshape(2, hd // 2).T.reshape(hd)), (h, pos)
    assert not np.allclose(meta, hf), "the layouts differ, so the test can tell them apart"


# ---------------------------------------------------------------------------------------------
# export.py --gguf on files made by llama.cpp's own tools (tests/data/gguf, made by
# tests/bench/make_gguf_data.py; llama_cpp.json holds llama.cpp's greedy ids on them)
# ---------------------------------------------------------------------------------------------

GGUF_DATA = os.path.join(common.DATA, "gguf")
LLAMA_CPP = json.load(open(os.path.join(GGUF_DATA, "llama_cpp.json")))
WORK = common.scratch("gguf-import")
_imports = {}


def import_gguf(path, *flags):
    """export.py OUT --gguf path [flags], once per run: the .bin path (the .tok beside it)."""
    key = (path, flags)
    if key not in _imports:
        out = os.path.join(WORK, f"{os.path.basename(path)}{''.join(flags)}.bin")
        common.run([common.PYTHON, EXPORT, out, "--gguf", path, *flags])
        _imports[key] = out
    return _imports[key]


def greedy_run(model, ids, steps, *extra):
    """Our greedy ids after the prompt ids, and the logits rows of every position."""
    logits = os.path.join(WORK, "logits.f32")
    proc = common.run([common.program("runomp"), model, "-I", " ".join(map(str, ids)), "-o", "ids",
                       "-t", "0", "-n", str(steps), "-e", "0", "-c", "9000", "-L", logits, *extra])
    return [int(t) for t in proc.stdout.split()], np.fromfile(logits, "<f4")


def check_against_meta(model, name):
    """Every stored logits row of Meta's reference within 1e-4 of the row's range, and every
    prompt's greedy ids; returns the report."""
    folder = os.path.join(common.DATA, "reference", name)
    ref = json.load(open(os.path.join(folder, "reference.json")))
    vocab = ref["config"]["vocab_size"]
    report = []
    for prompt in ref["prompts"]:
        ids, rows = greedy_run(model, prompt["tokens"], len(prompt["greedy"]))
        want = np.fromfile(os.path.join(folder, prompt["logits_file"]), "<f4").reshape(-1, vocab)
        got = rows.reshape(-1, vocab)[prompt["logits_positions"]]
        err = float((np.abs(got - want).max(axis=1) / np.abs(want).max(axis=1)).max())
        report.append(f"{name} len{prompt['n_tokens']} {err:.1e}")
        assert err <= 1e-4, f"{name} {prompt['name']}: {err:.2e}"
        assert ids == prompt["greedy"], f"{name} {prompt['name']}: {ids} != {prompt['greedy']}"
    return report


def test_gguf_f16_import_equals_metas_reference():
    """ref31 as an F16 GGUF (exact: its weights are f16): every stored logits row of Meta's
    reference within 1e-4 of the row's range and all 24 greedy ids, up to 8300 positions;
    and every tensor byte for byte the --hf export's (the header differs in eos only: the
    GGUF names one end token where config.json lists two)."""
    folder = os.path.join(common.DATA, "reference", "ref31")
    model = import_gguf(os.path.join(GGUF_DATA, "ref31-f16.gguf"), "--dtype", "fp32")
    report = check_against_meta(model, "ref31")
    hf = os.path.join(WORK, "ref31-hf.bin")
    common.run([common.PYTHON, EXPORT, hf, "--hf", folder, "--no-tokenizer", "--dtype", "fp32"])
    ours, theirs = open(model, "rb").read(), open(hf, "rb").read()
    assert ours[256:] == theirs[256:], "tensors differ from the --hf export"
    eos = export.HEADER_LAYOUT["n_eos"][0]
    assert ours[:eos] == theirs[:eos], "header fields before eos differ"
    print("    " + "; ".join(report))


def test_gguf_q_k_order_checked_against_metas_logits():
    """The q/k rows of a GGUF are in llama.cpp's interleaved RoPE order: imported without
    turning them back, ref31's logits move far outside the tolerance the import meets (so
    the order is verified by Meta's logits, not assumed)."""
    folder = os.path.join(common.DATA, "reference", "ref31")
    ref = json.load(open(os.path.join(folder, "reference.json")))
    prompt = next(p for p in ref["prompts"] if p["name"] == "len33")
    out = os.path.join(WORK, "unpermuted.bin")
    original = export.gguf_row_chunks
    export.gguf_row_chunks = lambda g, name, shape, head_dim, heads: original(g, name, shape, head_dim, 0)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assert export.main([out, "--gguf", os.path.join(GGUF_DATA, "ref31-f16.gguf"),
                                "--dtype", "fp32"]) == 0
    finally:
        export.gguf_row_chunks = original
    rows = greedy_run(out, prompt["tokens"], 1)[1].reshape(-1, 4096)[prompt["logits_positions"]]
    want = np.fromfile(os.path.join(folder, prompt["logits_file"]), "<f4").reshape(-1, 4096)
    err = float((np.abs(rows - want).max(axis=1) / np.abs(want).max(axis=1)).max())
    assert err > 100 * 1e-4, f"un-permuted q/k still within {err:.2e}"
    print(f"    without the q/k reordering: {err:.2e} of the range")


def test_gguf_vocabulary_encodes_gold_cases():
    """llama.cpp's Llama 3 vocabulary (gguf-py's writing of the vendored tokenizer) gives a .tok
    identical to the one made from tokenizer.json, and it encodes every gold case exactly."""
    vocab = os.path.join(WORK, "llama3-vocab.gguf")
    with lzma.open(os.path.join(GGUF_DATA, "llama3-vocab.gguf.xz")) as z, open(vocab, "wb") as f:
        shutil.copyfileobj(z, f)
    g = export.GGUFFile(vocab)
    try:
        regular, specials = export.gguf_tokenizer(g)
    finally:
        g.close()
    tok = os.path.join(WORK, "llama3-vocab.tok")
    with open(tok, "wb") as f:
        f.write(export.pack_tokenizer(regular, specials))
    from_json = os.path.join(WORK, "from-json.tok")
    common.run([common.PYTHON, EXPORT, "--tokenizer-only", from_json, "--tokenizer",
                os.path.join(common.DATA, "tokenizer", "tokenizer.json")])
    assert open(tok, "rb").read() == open(from_json, "rb").read(), ".tok files differ"
    cases = [json.loads(line) for line in open(os.path.join(common.DATA, "tokenizer", "cases.jsonl"))]
    texts = [c["text"].encode("utf-8") for c in cases]
    got = test_tokenizer.encode_many(texts, tok=tok)
    test_tokenizer.check_lists("ids", texts, got, [c["ids"] for c in cases])
    print(f"    {len(cases)} gold cases, {len(regular)} + {len(specials)} tokens")


def llama_cpp_agreement(name, *extra):
    """For each prompt llama.cpp ran on GGUF name: (steps our greedy ids agree from the start,
    the largest gap, relative to the row's range, between our top logit and our logit of
    llama.cpp's choice with llama.cpp's ids fed as the context)."""
    model = import_gguf(os.path.join(GGUF_DATA, name))
    vocab = export.GGUFFile(os.path.join(GGUF_DATA, name))
    n_vocab = vocab.tensors["token_embd.weight"][1][0]
    vocab.close()
    results = {}
    for pname, run in LLAMA_CPP["models"][name]["prompts"].items():
        want, prompt = run["greedy"], run["prompt"]
        ids = greedy_run(model, prompt, len(want), *extra)[0]
        same = next((i for i, (a, b) in enumerate(zip(ids, want)) if a != b), len(want))
        rows = greedy_run(model, prompt + want[:-1], 1, *extra)[1].reshape(-1, n_vocab)
        rows = rows[len(prompt) - 1:len(prompt) - 1 + len(want)]
        top = rows.max(axis=1)
        gap = (top - rows[np.arange(len(want)), want]) / (top - rows.min(axis=1))
        results[pname] = (same, float(gap.max()), len(want))
    return results


# read_model's labels -> GGUF tensor names
GGUF_LABELS = {"embed": "token_embd", "final_norm": "output_norm", "classifier": "output",
               "attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
               "wo": "attn_output", "ffn_norm": "ffn_norm", "w_gate": "ffn_gate",
               "w_down": "ffn_down", "w_up": "ffn_up"}


def gguf_label(label):
    layer, _, what = label.rpartition(".")
    return (f"blk.{layer}." if layer else "") + GGUF_LABELS[what] + ".weight"


def gguf_blocks(path):
    """{GGUF tensor name: (int8 q [rows, cols], fp16 scales [rows, cols/32])} of every Q8_0 or
    Q4_0 tensor, decoded here from the raw blocks (export.py only locates them)."""
    g = export.GGUFFile(path)
    out = {}
    try:
        for name, (kind, shape, _, _) in g.tensors.items():
            if kind not in ("Q8_0", "Q4_0"):
                continue
            raw = g.rows(name, 0, shape[0])
            blocks = raw.reshape(shape[0], -1, 34 if kind == "Q8_0" else 18)
            scales = blocks[:, :, :2].copy().view("<f2")[:, :, 0]
            if kind == "Q8_0":
                q = blocks[:, :, 2:].copy().view(np.int8)
            else:  # byte j: value j in the low nibble, value j + 16 in the high one
                q = np.concatenate([blocks[:, :, 2:] & 15, blocks[:, :, 2:] >> 4], axis=2)
                q = q.astype(np.int8) - 8
            out[name] = (q.reshape(shape), scales)
    finally:
        g.close()
    return out


def ours_in_gguf_order(label, values, head_dim, h):
    """A matrix of ours in the GGUF's row order: q and k back to interleaved RoPE pairs."""
    if label.endswith((".wq", ".wk")):
        return gguf_from_hf.to_meta_layout(values, head_dim)
    return values


def test_gguf_q8_0_and_q4_0_move_exactly():
    """Q8_0 and Q4_0 GGUFs made by llama-quantize: every value of every matrix of the import
    equals the GGUF's (the same int8 / nibble values and the same fp16 scales, as float32 for
    q8_0), and an --hf export of the same checkpoint at groups of 32 stores the same numbers
    wherever it chose the same scale: q8_0 every scale (fp16-rounded) and all but a few
    values at rounding boundaries (llama.cpp multiplies by 1/d and rounds halves away from
    zero), q4_0 the values of every group where its scale search kept
    llama.cpp's scale (its search usually finds a better one)."""
    folder = os.path.join(common.DATA, "reference", "ref30")
    report = []
    for kind in ("q8_0", "q4_0"):
        path = os.path.join(GGUF_DATA, f"ref30-{kind}.gguf")
        want = gguf_blocks(path)
        h, tensors = test_export.read_model(import_gguf(path))
        hf = os.path.join(WORK, f"ref30-hf-{kind}.bin")
        common.run([common.PYTHON, EXPORT, hf, "--hf", folder, "--dtype", kind, "--group-size",
                    "32", "--no-tokenizer"])
        direct = dict((label, payload) for label, _, payload, _ in test_export.read_model(hf)[1])
        matrices = same_scale = same_value = total = 0
        for label, got_kind, payload, _ in tensors:
            if got_kind == "fp32":
                continue
            q, scales = payload
            wq, wscales = want[gguf_label(label)]
            rows = q.shape[0]
            assert got_kind == kind and h["group_size"] == 32, (label, got_kind)
            q = ours_in_gguf_order(label, q, h["head_dim"], h)
            scales = ours_in_gguf_order(label, scales.reshape(rows, -1), h["head_dim"], h)
            assert np.array_equal(q, wq), f"{kind} {label}: values differ"
            assert np.array_equal(scales, wscales.astype(scales.dtype)), f"{kind} {label}: scales"
            dq, dscales = direct[label]
            dq = ours_in_gguf_order(label, dq, h["head_dim"], h).reshape(-1, 32)
            dscales = ours_in_gguf_order(label, dscales.reshape(rows, -1), h["head_dim"], h)
            agree = dscales.astype(np.float16).reshape(-1) == wscales.reshape(-1)
            matrices += 1
            same_scale += int(agree.sum())
            same_value += int((dq[agree] == wq.reshape(-1, 32)[agree]).sum())
            total += agree.size
        assert matrices == 7 * h["n_layers"] + 2 - h["tied_classifier"]
        if kind == "q8_0":
            assert same_scale == total and same_value >= 0.999 * 32 * total, (same_value, total)
        else:
            assert same_scale >= 100 and same_value == 32 * same_scale, (same_scale, same_value)
        report.append(f"{kind}: --hf chose llama.cpp's scale in {same_scale}/{total} groups, "
                      f"values equal there {same_value}/{32 * same_scale}")
    print("    " + "; ".join(report))


def test_gguf_greedy_agrees_with_llama_cpp():
    """Every committed GGUF, imported with its default type, against llama.cpp's greedy ids on
    the same file: fed llama.cpp's ids, each step's llama.cpp choice is our top logit or
    within a small fraction of the row's range of it (llama.cpp rounds the activations of
    quantized matmuls to int8; K-quants also pass through q8_0), and the free-running ids
    agree from the start (to the end for float weights)."""
    bounds = {"ref31-f16.gguf": 1e-6, "ref30-q8_0.gguf": 1e-2, "ref30-q4_0.gguf": 1e-2,
              "tiny-k-q4_k_m.gguf": 4e-2, "tiny-k-q5_k_m.gguf": 4e-2}
    assert set(bounds) == set(LLAMA_CPP["models"])
    for name, bound in bounds.items():
        results = llama_cpp_agreement(name)
        for pname, (same, gap, steps) in results.items():
            assert gap <= bound, f"{name} {pname}: llama.cpp's choice {gap:.2e} of the range below ours"
            assert same >= (steps if bound < 1e-4 else 1), f"{name} {pname}: agree for {same} steps"
        print(f"    {name}: " + ", ".join(f"{p} {s}/{n} (gap {g:.1e})"
                                            for p, (s, g, n) in results.items()))


if os.environ.get("LLAMA_CPP_DIR"):  # the larger cross-check, only with a llama.cpp checkout
    def test_gguf_cross_check_with_llama_cpp():
        """F32 GGUFs of both reference checkpoints, made now with llama.cpp's gguf-py: the
        imports give Meta's logits and greedy ids, and so does llama.cpp on the same files;
        every tensor of every committed GGUF decodes to gguf-py's own dequantization."""
        gguf = gguf_from_hf.import_gguf(os.environ["LLAMA_CPP_DIR"])
        greedy = os.path.join(WORK, "llama_greedy")
        lib = os.path.join(os.environ["LLAMA_CPP_DIR"], "build", "bin")
        common.run(["cc", "-O2", "-I", os.path.join(os.environ["LLAMA_CPP_DIR"], "include"),
                    "-I", os.path.join(os.environ["LLAMA_CPP_DIR"], "ggml", "include"), "-o", greedy,
                    os.path.join(common.TESTS, "bench", "llama_greedy.c"), "-L", lib, "-lllama",
                    f"-Wl,-rpath,{lib}"])
        report = []
        for name in ("ref30", "ref31"):
            folder = os.path.join(common.DATA, "reference", name)
            path = os.path.join(WORK, f"{name}-f32.gguf")
            gguf_from_hf.convert(folder, path, "f32", gguf_from_hf.VENDORED_TOKENIZER,
                                 os.environ["LLAMA_CPP_DIR"])
            report += check_against_meta(import_gguf(path), name)
            ref = json.load(open(os.path.join(folder, "reference.json")))
            for prompt in ref["prompts"][:4]:
                out = common.run([greedy, path, str(len(prompt["greedy"])), "2",
                                  *map(str, prompt["tokens"])]).stdout.decode().split("\n")
                ids = [int(line.split()[0]) for line in out if line]
                assert ids == prompt["greedy"], f"llama.cpp on {name} {prompt['name']}: {ids}"
        for name in sorted(os.listdir(GGUF_DATA)):
            if not name.endswith(".gguf"):
                continue
            g = export.GGUFFile(os.path.join(GGUF_DATA, name))
            try:
                for t in gguf.GGUFReader(os.path.join(GGUF_DATA, name)).tensors:
                    want = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
                    shape = g.tensors[t.name][1]
                    x, dtype, _ = export.gguf_values(g, t.name, g.rows(t.name, 0, shape[0] if len(shape) == 2 else 1))
                    assert np.array_equal(export.to_f32(x, dtype), want), f"{name} {t.name}"
            finally:
                g.close()
            report.append(f"{name} = gguf-py")
        print("    " + "; ".join(report))


def test_gguf_other_types_and_flags():
    """--dtype converts any GGUF type: fp32 of Q8_0 / Q4_0 equals the GGUF's values (q * d) to
    the bit; q8_0 at groups of 64 of an F16 file, q4_0 and bf16 of a Q8_0 one; flags that
    cannot go with --gguf are one line each."""
    for kind in ("q8_0", "q4_0"):
        path = os.path.join(GGUF_DATA, f"ref30-{kind}.gguf")
        want = gguf_blocks(path)
        h, tensors = test_export.read_model(import_gguf(path, "--dtype", "fp32"))
        for label, got_kind, values, _ in tensors:
            if label.endswith("norm"):
                continue
            q, scales = want[gguf_label(label)]
            expected = (q.reshape(-1, 32) * scales.astype(np.float32).reshape(-1, 1)).reshape(q.shape)
            got = ours_in_gguf_order(label, values, h["head_dim"], h)
            assert got_kind == "fp32" and np.array_equal(got, expected), f"{kind} {label}"
    for name, flags, kind, group in (("ref31-f16", ("--dtype", "q8_0", "--group-size", "64"), "q8_0", 64),
                                     ("ref30-q8_0", ("--dtype", "q4_0"), "q4_0", 32),
                                     ("ref30-q8_0", ("--dtype", "bf16"), "bf16", 0)):
        h, tensors = test_export.read_model(import_gguf(os.path.join(GGUF_DATA, name + ".gguf"), *flags))
        assert tensors[0][1] == kind and h["group_size"] == group, (name, flags)
    out = os.path.join(WORK, "flags.bin")
    path = os.path.join(GGUF_DATA, "ref30-q8_0.gguf")
    for flags, needle in ((["--hf", WORK], "--hf"), (["--tokenizer", path], "--tokenizer"),
                          (["--specials", "llama3"], "--specials"),
                          (["--group-size", "48"], "48")):
        proc = common.run([common.PYTHON, EXPORT, out, "--gguf", path, *flags], check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and err.count("\n") == 1 and needle in err, (flags, err)
    assert not os.path.exists(out)
