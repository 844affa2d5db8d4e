"""tests/bench/gguf_from_hf.py, the GGUF converter of the llama.cpp side-by-side benches: the parts that
decide whether llama.cpp computes the same model, checked without llama.cpp (its gguf-py is
needed only to write the file)."""
import os
import sys

import numpy as np

import common
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench"))
import gguf_from_hf  # noqa: E402  (puts the repository on sys.path, for export)
import export  # noqa: E402
import make_checkpoint
import reference


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
