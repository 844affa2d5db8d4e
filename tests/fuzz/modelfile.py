"""Builds small llama3.c model files (.bin, docs/formats.md) byte by byte, with every
header field settable, and the offsets of each section, for the hostile-input tests and the
fuzz seed corpus. The header's layout is export.py's MODEL_HEADER table, its one description;
the tensors are laid out here, independently of export.py: damage is easier to aim from here."""
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from export import HEADER_LAYOUT, pack_header  # noqa: E402

DEFAULTS = dict(magic=b"L3CM", version=1, dim=16, hidden_dim=32, n_layers=2, n_heads=4,
                n_kv_heads=2, head_dim=4, vocab_size=300, max_seq_len=64, rope_theta=10000.0,
                norm_eps=1e-5, rope_scaling=0, rope_factor=1.0, rope_low_freq_factor=1.0,
                rope_high_freq_factor=4.0, rope_original_max_pos=8192, tied_classifier=0,
                weight_type=0, group_size=0, bos_id=0, n_eos=1)


def header(cfg, eos_ids):
    return bytearray(pack_header(dict(cfg, eos_ids=list(eos_ids))))


def align(n):
    return (n + 63) // 64 * 64


def tensors(cfg):
    """[(name, kind, rows, cols)] in file order; kind "norm" (f32 vector) or "matrix"."""
    d, q, kv, h = cfg["dim"], cfg["n_heads"] * cfg["head_dim"], cfg["n_kv_heads"] * cfg["head_dim"], cfg["hidden_dim"]
    out = [("embedding", "matrix", cfg["vocab_size"], d)]
    for l in range(cfg["n_layers"]):
        out += [(f"layer{l}.attn_norm", "norm", 1, d), (f"layer{l}.wq", "matrix", q, d),
                (f"layer{l}.wk", "matrix", kv, d), (f"layer{l}.wv", "matrix", kv, d),
                (f"layer{l}.wo", "matrix", d, q), (f"layer{l}.ffn_norm", "norm", 1, d),
                (f"layer{l}.w_gate", "matrix", h, d), (f"layer{l}.w_down", "matrix", d, h),
                (f"layer{l}.w_up", "matrix", h, d)]
    out.append(("final_norm", "norm", 1, d))
    if not cfg["tied_classifier"]:
        out.append(("classifier", "matrix", cfg["vocab_size"], d))
    return out


def model_file(eos_ids=(1,), seed=0, **fields):
    """Returns (file bytes, sections): sections is [(name, start, end)] of every tensor part
    (q8_0 and q4_0 matrices have a ".q" and a ".scales" part), in file order."""
    cfg = dict(DEFAULTS, **fields)
    rng = np.random.default_rng(seed)
    blob = bytearray(header(cfg, eos_ids))
    sections = []

    def put(name, data):
        blob.extend(b"\0" * (align(len(blob)) - len(blob)))
        sections.append((name, len(blob), len(blob) + len(data)))
        blob.extend(data)

    wt, gs = cfg["weight_type"], cfg["group_size"]
    for name, kind, rows, cols in tensors(cfg):
        if kind == "norm":
            put(name, (1 + 0.1 * rng.standard_normal(cols)).astype("<f4").tobytes())
            continue
        x = (0.3 * rng.standard_normal(rows * cols)).astype("<f4")
        if wt == 0:
            put(name, x.tobytes())
        elif wt == 1:
            put(name, (x.view("<u4") >> 16).astype("<u2").tobytes())
        elif wt == 3:  # q4_0: nibbles q + 8, byte j of each 32 holding values j and j + 16
            groups = x.reshape(-1, gs)
            scale = (np.abs(groups).max(axis=1) / 7).astype("<f2")
            safe = np.where(scale > 0, scale.astype("<f4"), 1)[:, None]
            u = (np.clip(np.round(groups / safe), -8, 7) + 8).astype("u1").reshape(-1, 32)
            put(name + ".q", (u[:, :16] | u[:, 16:] << 4).tobytes())
            put(name + ".scales", scale.tobytes())
        else:
            groups = x.reshape(-1, gs)
            scale = (np.abs(groups).max(axis=1) / 127).astype("<f4")
            q = np.clip(np.round(groups / np.where(scale > 0, scale, 1)[:, None]), -127, 127)
            put(name + ".q", q.astype("i1").tobytes())
            put(name + ".scales", scale.tobytes())
    return bytes(blob), sections


def with_field(data, name, value):
    """data with one header field (or "eos0".."eos7") replaced."""
    out = bytearray(data)
    if name.startswith("eos") and name[3:].isdigit():
        offset, _ = HEADER_LAYOUT["eos_ids"]
        struct.pack_into("<i", out, offset + 4 * int(name[3:]), value)
    else:
        offset, fmt = HEADER_LAYOUT[name]
        struct.pack_into(fmt, out, offset, value)
    return bytes(out)
