#!/usr/bin/env python3
"""Writes the fuzz seed corpora under tests/fuzz/corpus/{model,tokenizer}/ (committed; rerun
only to change them). Model seeds are tiny valid files of every weight type and layout plus a
few damaged ones; tokenizer seeds are .tok files (first byte < 64) and texts (first byte 64+)."""
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from modelfile import model_file  # noqa: E402

SMALL = dict(dim=8, hidden_dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4,
             vocab_size=12, max_seq_len=8, eos_ids=(1, 2))


def tok_file(regular, specials):
    parts = [struct.pack("<4sIII", b"L3TK", 1, len(regular) + len(specials), len(specials))]
    for t in list(regular) + list(specials):
        parts.append(struct.pack("<I", len(t)) + t)
    return b"".join(parts)


def main():
    model_dir = os.path.join(HERE, "corpus", "model")
    tok_dir = os.path.join(HERE, "corpus", "tokenizer")
    os.makedirs(model_dir, exist_ok=True)
    os.makedirs(tok_dir, exist_ok=True)
    seeds = {
        "fp32": model_file(**SMALL)[0],
        "bf16-tied": model_file(weight_type=1, tied_classifier=1, **SMALL)[0],
        "q8_0-gs4": model_file(weight_type=2, group_size=4, **SMALL)[0],
        "fp32-rope-llama3": model_file(rope_scaling=1, rope_factor=8.0, rope_low_freq_factor=1.0,
                                       rope_high_freq_factor=4.0, rope_original_max_pos=4,
                                       **dict(SMALL, n_kv_heads=2))[0],
        "bf16-2layers": model_file(weight_type=1, **dict(SMALL, n_layers=2, max_seq_len=1))[0],
        "q4_0-gs32": model_file(weight_type=3, group_size=32,
                                **dict(SMALL, dim=32, hidden_dim=64, head_dim=16))[0],
    }
    seeds["truncated"] = seeds["fp32"][:-7]
    seeds["header-only"] = seeds["fp32"][:256]
    for name, data in seeds.items():
        open(os.path.join(model_dir, name + ".bin"), "wb").write(data)

    singles = [bytes([b]) for b in range(256)]
    specials = [b"<|begin_of_text|>", b"<|end_of_text|>", b"<|eot_id|>"]
    toks = {
        "small": tok_file(singles + [b"ab", b"abc", b" a", b"\xc3\xa9"], specials),
        "no-specials": tok_file(singles + [b"he", b"hel"], []),
        "only-specials": tok_file([], specials),
        "duplicate": tok_file(singles + [b"ab", b"ab"], []),
        "length-past-end": tok_file(singles, specials)[:-3],
        # specials inside, before and after one another: the automaton's fail links
        "overlapping-specials": tok_file(singles + [b"ab", b"<|"],
                                         [b"ab", b"zabc", b"<", b"<<", b"<|a|>", b"a|>", b"|",
                                          b"bc", b"<<<<x"]),
    }
    for name, data in toks.items():
        open(os.path.join(tok_dir, name + ".tok"), "wb").write(b"\0" + data)
    texts = {
        "ascii": b"Hello, world! It's 2024 and we've 3 cats.\n\n  ok",
        "utf8": "caf\u00e9 \u4e2d\u6587 \U0001F600 \u00e9\u00e9".encode(),
        "invalid-utf8": b"\xff\xfe\xc3(\xe2\x82 \xf0\x9f\x98 \xed\xa0\x80 \xc0\xaf",
        "specials": b"<|begin_of_text|>hi<|eot_id|><|end_of_text|><|eot_id",
        "nul": b"a\0b\0\0 c",
        "digits-spaces": b"1234567890   \t\t\n\r\n  abcabc",
    }
    for name, data in texts.items():
        open(os.path.join(tok_dir, name + ".txt"), "wb").write(b"A" + data)

    # sampler seeds: 12 parameter bytes (fuzz_sampler.c; byte 8 is 2 x history length + order),
    # history bytes, float32 logits
    sampler_dir = os.path.join(HERE, "corpus", "sampler")
    os.makedirs(sampler_dir, exist_ok=True)
    ramp = struct.pack("<16f", *[i / 4 for i in range(16)])
    samplers = {
        "defaults": bytes([15, 230, 0, 0, 0, 128, 128, 65, 0, 0, 0, 128]) + ramp,
        "greedy-penalties": bytes([0, 255, 0, 0, 120, 140, 150, 9, 8, 0, 0, 0, 15, 15, 3, 15]) + ramp,
        "all-stages": bytes([25, 200, 5, 140, 90, 130, 130, 0, 7, 1, 2, 3, 1, 15, 14]) + ramp,
        "flat-small-top-p": bytes([25, 0, 0, 0, 0, 128, 128, 65, 0, 255, 255, 255]) + b"\0" * 64,
        "nan": bytes([25, 230, 0, 0, 0, 128, 128, 65, 0, 9, 9, 9]) + ramp[:8] +
               struct.pack("<f", float("nan")) + ramp[12:],
        "huge": bytes([200, 128, 3, 200, 255, 0, 255, 65, 4, 0, 0, 64, 0, 1]) +
                struct.pack("<4f", 3e38, -3e38, 3e38, 0.0),
    }
    for name, data in samplers.items():
        open(os.path.join(sampler_dir, name + ".bin"), "wb").write(data)


if __name__ == "__main__":
    main()
