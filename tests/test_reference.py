"""tests/reference.py (the numpy forward the engine tests trust) against Meta's own outputs in
tests/data/reference/: every stored logits row within the README's tolerances (per row,
max|diff| <= rtol * max|row|: 1e-4 up to 200 tokens, 1e-3 at 8300) and the 24 greedy tokens."""
import json
import os

import numpy as np

from common import DATA, scratch
import make_checkpoint
from reference import Reference, rope_inv_freq

REFERENCE = os.path.join(DATA, "reference")


def load(name):
    folder = os.path.join(REFERENCE, name)
    return folder, json.load(open(os.path.join(folder, "reference.json")))


def stored_rows(folder, prompt, vocab):
    return np.fromfile(os.path.join(folder, prompt["logits_file"]), "<f4").reshape(-1, vocab)


def worst_relative(rows, expected):
    diff = np.abs(rows - expected).max(axis=1) / np.abs(expected).max(axis=1)
    return float(diff.max())


def check_checkpoint(name, max_tokens, min_tokens=0):
    """Every prompt of min..max tokens: stored rows, greedy ids and the greedy steps' top-5."""
    folder, ref = load(name)
    model = Reference(folder)
    vocab = ref["config"]["vocab_size"]
    report = []
    for prompt in ref["prompts"]:
        if not min_tokens <= prompt["n_tokens"] <= max_tokens:
            continue
        rtol = 1e-4 if prompt["n_tokens"] <= 200 else 1e-3
        expected = stored_rows(folder, prompt, vocab)
        ids, steps = model.generate(prompt["tokens"], len(prompt["greedy"]))
        if len(prompt["logits_positions"]) > 1:
            rows = model.logits(prompt["tokens"])[prompt["logits_positions"]]
        else:  # only the last position is stored: it is the first greedy step's row
            rows = steps[:1]
        err = worst_relative(rows, expected)
        report.append(f"{name} len{prompt['n_tokens']} {err:.1e}")
        assert err <= rtol, f"{name} {prompt['name']}: {err:.2e} > {rtol}"
        assert ids == prompt["greedy"], f"{name} {prompt['name']}: greedy {ids} != {prompt['greedy']}"
        # the greedy steps' 5 best logits (stored to 7 significant digits)
        best = np.sort(steps, axis=1)[:, ::-1][:, :5]
        want = np.array(prompt["greedy_top5_logits"], dtype=np.float32)
        tol = rtol * np.abs(steps).max(axis=1, keepdims=True) + 1e-6 * np.abs(want)
        assert np.all(np.abs(best - want) <= tol), f"{name} {prompt['name']}: greedy top-5 logits"
    print("    " + "; ".join(report))


def test_rope_frequencies_equal_metas_float32():
    for name in ("ref30", "ref31"):
        folder, ref = load(name)
        want = np.array(ref["reference_impl"]["rope_inv_freq_f32"], dtype=np.float32)
        assert np.array_equal(Reference(folder).inv_freq, want), name


def test_ref30_every_prompt():
    check_checkpoint("ref30", 200)


def test_ref31_prompts_up_to_200():
    check_checkpoint("ref31", 200)


def test_ref31_past_8192():
    # 8300 tokens, positions past the original 8192 context: rope scaling fully at work
    check_checkpoint("ref31", 10 ** 6, min_tokens=201)


def test_tolerance_catches_ignored_rope_scaling():
    # The comparison above is sharp enough: without rope scaling, ref31's len200 row moves
    # well past its tolerance (README sensitivity table: 0.13 absolute).
    folder, ref = load("ref31")
    model = Reference(folder)
    model.inv_freq = rope_inv_freq(dict(model.cfg, rope_scaling=None), model.head_dim)
    prompt = next(p for p in ref["prompts"] if p["name"] == "len200")
    row = model.generate(prompt["tokens"], 1)[1]
    assert worst_relative(row, stored_rows(folder, prompt, 4096)) > 10 * 1e-4


def test_kv_cache_path_equals_full_recompute():
    # generate() (prompt once, then one token at a time) against logits() of the whole
    # sequence, on a preset with GQA 4:1, explicit head_dim and untied classifier.
    folder = os.path.join(scratch("reference"), "tiny31")
    make_checkpoint.make_checkpoint(folder, "tiny31")
    model = Reference(folder)
    prompt = [1, 7, 300, 45, 2, 511, 0, 8]
    ids, steps = model.generate(prompt, 6)
    full = model.logits(prompt + ids[:-1])
    assert np.abs(full[len(prompt) - 1:] - steps).max() <= 1e-5 * np.abs(steps).max()
    assert ids == [int(np.argmax(row)) for row in full[len(prompt) - 1:]]
    assert model.greedy(prompt, 6) == ids
