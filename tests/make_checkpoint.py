#!/usr/bin/env python3
"""Writes small random Hugging Face Llama checkpoints (config.json + safetensors) with numpy.

Command line:  python3 tests/make_checkpoint.py OUTDIR --preset NAME [--seed S] [--dtype D] [--shards N]

Module API:
    make_checkpoint(outdir, preset, seed=None, **overrides) -> config dict
        overrides: dtype ("BF16"/"F16"/"F32"), shards, std, qk_std, config (dict merged into the
        preset's config.json; a value None deletes the key), tokenizer (a tokenizer.json path or
        None), lm_head_when_tied (also write lm_head.weight for a tied model).
    write_checkpoint(outdir, config, dtype, shards=1, seed=0, std=0.02, qk_std=None,
                     tokenizer=None, lm_head_when_tied=False) -> config dict
    write_safetensors(path, tensors)   tensors: [(name, dtype, shape, chunks)] where chunks()
                                       yields the raw bytes of the row-major data in order.
    tensor_specs(config) -> [(name, shape, kind)]   kind: "matrix", "qk" or "norm".
    f32_to_bf16_bits(x) -> uint16 array (round to nearest even).
    PRESETS: name -> dict(config=..., dtype=..., shards=..., std=..., seed=..., tokenizer=...).

Weights follow the reference checkpoints (tests/data/reference/README.md): matrices N(0, std^2),
q_proj/k_proj with std sqrt(2.5 / hidden_size) so that attention is peaked and RoPE or GQA errors
move the logits, norm weights 1 + 0.2 N(0,1). Draws are float32, then rounded to the storage
dtype (round to nearest even); the stored values are the weights. Each tensor has its own
generator seeded by (seed, tensor index), and is generated and written in chunks of rows, so
memory stays low even for the 2.5 GB "llama32-1b" preset.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np

# Every preset's row lengths are multiples of 64, export.py's default q8_0 group size.
TESTS = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_DIR = os.path.join(TESTS, "data", "tokenizer")  # the vendored Llama 3 tokenizer
CHUNK_ELEMENTS = 1 << 22

STORAGE = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
TORCH_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_type": "llama3"}
LLAMA32_ROPE = dict(LLAMA3_ROPE, factor=32.0)


def base_config(**fields):
    """A config.json like transformers 4.45 writes for Llama, with the given fields."""
    cfg = {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "initializer_range": 0.02,
        "max_position_embeddings": 8192, "mlp_bias": False, "model_type": "llama",
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "transformers_version": "4.45.0", "use_cache": True,
    }
    cfg.update(fields)
    return cfg


PRESETS = {
    # Llama 3.0 style: untied classifier, no rope scaling, GQA 2:1, float32 storage, int eos.
    "tiny30": dict(
        config=base_config(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=384,
                           eos_token_id=2),
        dtype="F32", shards=1, std=0.02, seed=30),
    # Llama 3.1 style: llama3 rope scaling (factor 8), explicit head_dim 64 whose heads do not
    # add up to hidden_size (4 * 64 = 256 != 128; transformers allows it), GQA 4:1, bf16.
    "tiny31": dict(
        config=base_config(hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                           vocab_size=512, max_position_embeddings=131072,
                           rope_scaling=dict(LLAMA3_ROPE), eos_token_id=[2, 3]),
        dtype="BF16", shards=1, std=0.04, seed=31),
    # Llama 3.2 style: tied embeddings, rope factor 32, no GQA (1:1), f16, two shards.
    "tiny32": dict(
        config=base_config(hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=4, vocab_size=640,
                           max_position_embeddings=131072, rope_scaling=dict(LLAMA32_ROPE),
                           tie_word_embeddings=True, eos_token_id=[2, 3, 4]),
        dtype="F16", shards=2, std=0.05, seed=32),
    # Llama 3.2 style with every row length a multiple of 256, the super-block of llama.cpp's
    # K-quants (Q4_K, Q5_K, Q6_K), for the GGUF import tests (tests/bench/make_gguf_data.py).
    "tiny-k": dict(
        config=base_config(hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                           max_position_embeddings=131072, rope_scaling=dict(LLAMA32_ROPE),
                           tie_word_embeddings=True, eos_token_id=[2, 3]),
        dtype="BF16", shards=1, std=0.05, seed=256),
    # The real vocabulary size with small dims, and the Llama 3 tokenizer.json beside it.
    "full-vocab": dict(
        config=base_config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=128256,
                           max_position_embeddings=131072, rope_scaling=dict(LLAMA32_ROPE),
                           tie_word_embeddings=True, bos_token_id=128000,
                           eos_token_id=[128001, 128008, 128009]),
        dtype="BF16", shards=1, std=0.05, seed=128, tokenizer="tokenizer.json"),
    # Llama 3.2 1B shapes (about 2.5 GB in bf16): for benchmarks, not for `make test`.
    "llama32-1b": dict(
        config=base_config(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                           vocab_size=128256, max_position_embeddings=131072,
                           rope_scaling=dict(LLAMA32_ROPE), tie_word_embeddings=True,
                           bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
        dtype="BF16", shards=1, std=0.02, seed=1),
    # Llama 3.1 8B shapes (about 16 GB in bf16, 4 shards): for `make bench-8b` only.
    "llama31-8b": dict(
        config=base_config(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                           max_position_embeddings=131072, rope_scaling=dict(LLAMA3_ROPE),
                           bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
        dtype="BF16", shards=4, std=0.02, seed=8),
}

# `make demo`'s model: full-vocab with heads of 64, as every Llama 3 has, so that every run flag
# (the q8_0 cache's groups of 32 included) works on it.
PRESETS["demo"] = dict(PRESETS["full-vocab"], seed=129, config=dict(
    PRESETS["full-vocab"]["config"], hidden_size=128, intermediate_size=256, head_dim=64))


def f32_to_bf16_bits(x):
    """float32 array -> bf16 bit patterns (uint16), round to nearest even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def to_storage(x, dtype):
    if dtype == "BF16":
        return f32_to_bf16_bits(x)
    return x.astype(STORAGE[dtype])


def head_dim(cfg):
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def tensor_specs(cfg, lm_head_when_tied=False):
    """[(name, shape, kind)] in model order."""
    dim, hidden = cfg["hidden_size"], cfg["intermediate_size"]
    hd = head_dim(cfg)
    q_rows = cfg["num_attention_heads"] * hd
    kv_rows = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * hd
    specs = [("model.embed_tokens.weight", (cfg["vocab_size"], dim), "matrix")]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (dim,), "norm"),
            (p + "self_attn.q_proj.weight", (q_rows, dim), "qk"),
            (p + "self_attn.k_proj.weight", (kv_rows, dim), "qk"),
            (p + "self_attn.v_proj.weight", (kv_rows, dim), "matrix"),
            (p + "self_attn.o_proj.weight", (dim, q_rows), "matrix"),
            (p + "post_attention_layernorm.weight", (dim,), "norm"),
            (p + "mlp.gate_proj.weight", (hidden, dim), "matrix"),
            (p + "mlp.up_proj.weight", (hidden, dim), "matrix"),
            (p + "mlp.down_proj.weight", (dim, hidden), "matrix"),
        ]
    specs.append(("model.norm.weight", (dim,), "norm"))
    if not cfg.get("tie_word_embeddings", False) or lm_head_when_tied:
        specs.append(("lm_head.weight", (cfg["vocab_size"], dim), "matrix"))
    return specs


def random_chunks(shape, kind, dtype, seed, index, std, qk_std):
    """A function yielding the tensor's stored bytes, chunk by chunk (whole rows)."""
    def gen():
        rng = np.random.default_rng([seed, index])
        total = math.prod(shape)
        row = shape[-1]
        step = max(1, CHUNK_ELEMENTS // row) * row
        for start in range(0, total, step):
            n = min(step, total - start)
            x = rng.standard_normal(n, dtype=np.float32)
            if kind == "norm":
                x = np.float32(1) + np.float32(0.2) * x
            else:
                x *= np.float32(qk_std if kind == "qk" else std)
            yield to_storage(x, dtype).tobytes()
    return gen


def write_safetensors(path, tensors, metadata=None):
    """Writes a safetensors file: 8-byte header length, JSON header (padded with spaces to a
    multiple of 8, as the safetensors library does), data in the given order."""
    header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
    for name, dtype, shape, _ in tensors:
        size = math.prod(shape) * STORAGE[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, dtype, shape, chunks in tensors:
            start = f.tell()
            for data in chunks():
                f.write(data)
            expected = math.prod(shape) * STORAGE[dtype].itemsize
            if f.tell() - start != expected:
                raise ValueError(f"{name}: wrote {f.tell() - start} bytes, expected {expected}")


def split_shards(specs, dtype, shards):
    """Splits the tensors, in model order, into `shards` groups of about equal size."""
    sizes = [math.prod(shape) * STORAGE[dtype].itemsize for _, shape, _ in specs]
    total = sum(sizes)
    groups, current, done = [], [], 0
    for i, size in enumerate(sizes):
        current.append(i)
        done += size
        left_items, left_groups = len(sizes) - i - 1, shards - len(groups) - 1
        if left_groups and (done >= total * (len(groups) + 1) / shards or left_items == left_groups):
            groups.append(current)
            current = []
    groups.append(current)
    return [g for g in groups if g]


def write_checkpoint(outdir, config, dtype="BF16", shards=1, seed=0, std=0.02, qk_std=None,
                     tokenizer=None, lm_head_when_tied=False):
    """Writes config.json, the safetensors file(s) and optionally a tokenizer.json copy."""
    if dtype not in STORAGE:
        raise ValueError(f"dtype {dtype} not one of {sorted(STORAGE)}")
    os.makedirs(outdir, exist_ok=True)
    config = dict(config, torch_dtype=TORCH_DTYPE[dtype])
    if qk_std is None:
        qk_std = round(math.sqrt(2.5 / config["hidden_size"]), 4)
    with open(os.path.join(outdir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    specs = tensor_specs(config, lm_head_when_tied)
    entries = [(name, dtype, shape, random_chunks(shape, kind, dtype, seed, i, std, qk_std))
               for i, (name, shape, kind) in enumerate(specs)]
    groups = split_shards(specs, dtype, shards)
    if len(groups) == 1:
        write_safetensors(os.path.join(outdir, "model.safetensors"),
                          sorted(entries, key=lambda e: e[0]))
    else:
        weight_map, total = {}, 0
        for k, group in enumerate(groups):
            fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            part = sorted((entries[i] for i in group), key=lambda e: e[0])
            write_safetensors(os.path.join(outdir, fname), part)
            for name, dt, shape, _ in part:
                weight_map[name] = fname
                total += math.prod(shape) * STORAGE[dt].itemsize
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(outdir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
    if tokenizer:
        shutil.copyfile(tokenizer, os.path.join(outdir, "tokenizer.json"))
    return config


def find_tokenizer_file(name):
    """tests/data/tokenizer/NAME."""
    path = os.path.join(TOKENIZER_DIR, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    return path


def make_checkpoint(outdir, preset, seed=None, **overrides):
    """Writes preset `preset` to outdir (see the module docstring for the overrides)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    p = dict(PRESETS[preset])
    config = json.loads(json.dumps(p["config"]))  # deep copy
    for key, value in (overrides.pop("config", None) or {}).items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    tokenizer = overrides.pop("tokenizer", "default")
    if tokenizer == "default":
        tokenizer = find_tokenizer_file(p["tokenizer"]) if p.get("tokenizer") else None
    return write_checkpoint(
        outdir, config, dtype=overrides.pop("dtype", p["dtype"]),
        shards=overrides.pop("shards", p["shards"]),
        seed=p["seed"] if seed is None else seed, std=overrides.pop("std", p["std"]),
        qk_std=overrides.pop("qk_std", None), tokenizer=tokenizer,
        lm_head_when_tied=overrides.pop("lm_head_when_tied", False), **overrides)


def main(argv):
    ap = argparse.ArgumentParser(description="Write a small random Hugging Face Llama checkpoint.")
    ap.add_argument("outdir", help="output folder (created if needed)")
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS), help="model shape preset")
    ap.add_argument("--seed", type=int, help="random seed (default: the preset's)")
    ap.add_argument("--dtype", choices=sorted(STORAGE), help="storage dtype (default: the preset's)")
    ap.add_argument("--shards", type=int, help="number of safetensors files (default: the preset's)")
    args = ap.parse_args(argv)
    overrides = {k: v for k, v in (("dtype", args.dtype), ("shards", args.shards)) if v is not None}
    start = time.time()
    cfg = make_checkpoint(args.outdir, args.preset, seed=args.seed, **overrides)
    print(f"wrote {args.preset} to {args.outdir} ({cfg['torch_dtype']}) in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main(sys.argv[1:])
