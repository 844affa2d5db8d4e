#!/usr/bin/env python3
"""Converts a Hugging Face Llama checkpoint to a GGUF file that llama.cpp runs, for the
side-by-side benchmarks (tests/bench/bench.py). llama.cpp is a measuring stick, not part of the
project: this uses its own gguf-py package from a llama.cpp checkout, never a copy of it.

    LLAMA_CPP_DIR=/path/to/llama.cpp /usr/bin/python3 tests/bench/gguf_from_hf.py HF_DIR OUT.gguf
        [--type f32|bf16|f16] [--tokenizer tokenizer.json]

Needs numpy and gguf-py's own imports (Debian: python3-yaml, python3-sentencepiece).

What it writes, as llama.cpp's convert_hf_to_gguf.py does for Llama:
- the hyperparameters of config.json (the checkpoint is checked by export.py's read_config);
- a GPT-2-style byte-level BPE vocabulary from tokenizer.json (tokens, token types, merges,
  pre-tokenizer "llama-bpe", bos/eos ids from config.json); a checkpoint without one gets the
  vendored Llama 3 tokenizer (tests/data/tokenizer/tokenizer.json);
- q_proj/k_proj rows permuted from the Hugging Face rotate-half layout back to Meta's
  interleaved one (llama.cpp rotates adjacent pairs);
- for llama3 rope scaling, a rope_freqs tensor of per-frequency divisors (llama.cpp's way of
  storing the scaling);
- matrices in --type, norms and rope_freqs in F32, streamed in chunks of rows so that memory
  stays bounded whatever the model size. llama-quantize makes the quantized types from it.
The output is written under a temporary name and renamed when complete.
"""
import argparse
import json
import math
import os
import sys

import numpy as np

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(TESTS))
import export  # noqa: E402  (the checkpoint reader and config checks)

VENDORED_TOKENIZER = os.path.join(TESTS, "data", "tokenizer", "tokenizer.json")
CHUNK_ELEMENTS = 1 << 22


def import_gguf(llama_cpp_dir):
    """llama.cpp's gguf-py package, from the checkout named by LLAMA_CPP_DIR."""
    path = os.path.join(llama_cpp_dir or "", "gguf-py")
    if not llama_cpp_dir or not os.path.isdir(os.path.join(path, "gguf")):
        raise SystemExit(f"gguf_from_hf: no gguf-py under {llama_cpp_dir!r} (set LLAMA_CPP_DIR "
                         "to a llama.cpp checkout)")
    sys.path.insert(0, path)
    try:
        import gguf
    except ImportError as e:
        raise SystemExit(f"gguf_from_hf: cannot import llama.cpp's gguf-py: {e} (Debian: "
                         "apt-get install python3-yaml python3-sentencepiece)")
    return gguf


rope_freq_divisors = export.rope_freq_divisors  # llama.cpp's rope_freqs


def vocabulary(gguf, tokenizer_path, vocab_size):
    """(tokens, token types, merges) of a byte-level BPE tokenizer.json, padded to vocab_size."""
    with open(tokenizer_path, encoding="utf-8") as f:
        tj = json.load(f)
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise SystemExit(f"gguf_from_hf: {tokenizer_path}: not a BPE tokenizer.json")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in tj.get("added_tokens", []):
        i = added["id"]
        if i < vocab_size:
            tokens[i] = added["content"]
            types[i] = gguf.TokenType.CONTROL if added.get("special") else \
                gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    vocab = model["vocab"]  # a vocabulary cut short keeps only the merges that make its tokens
    merges = [m for m in merges if vocab.get(m.replace(" ", "", 1), vocab_size) < vocab_size]
    return tokens, types, merges


def write_metadata(gguf, w, c, ftype, tokenizer_path):
    w.add_block_count(c["n_layers"])
    w.add_context_length(c["max_seq_len"])
    w.add_embedding_length(c["dim"])
    w.add_feed_forward_length(c["hidden_dim"])
    w.add_head_count(c["n_heads"])
    w.add_head_count_kv(c["n_kv_heads"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["norm_eps"])
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    w.add_rope_dimension_count(c["head_dim"])
    w.add_vocab_size(c["vocab_size"])
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges = vocabulary(gguf, tokenizer_path, c["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(c["bos_id"])
    w.add_eos_token_id(c["eos_ids"][0])
    w.add_add_bos_token(True)


def tensor_plan(gguf, c):
    """[(gguf name, HF name or None for rope_freqs, shape, kind)]; kind: "matrix", "q", "k"
    (matrices to un-permute) or "f32" (norms, rope_freqs)."""
    name = lambda t, **kw: gguf.TENSOR_NAMES[t].format(**kw) + ".weight"  # noqa: E731
    T = gguf.MODEL_TENSOR
    dim, hd, hidden = c["dim"], c["head_dim"], c["hidden_dim"]
    q, kv = c["n_heads"] * hd, c["n_kv_heads"] * hd
    plan = []
    if c["rope_scaling"]:
        plan.append((name(T.ROPE_FREQS), None, (hd // 2,), "f32"))
    plan.append((name(T.TOKEN_EMBD), "model.embed_tokens.weight", (c["vocab_size"], dim), "matrix"))
    for i in range(c["n_layers"]):
        p = f"model.layers.{i}."
        plan += [
            (name(T.ATTN_NORM, bid=i), p + "input_layernorm.weight", (dim,), "f32"),
            (name(T.ATTN_Q, bid=i), p + "self_attn.q_proj.weight", (q, dim), "q"),
            (name(T.ATTN_K, bid=i), p + "self_attn.k_proj.weight", (kv, dim), "k"),
            (name(T.ATTN_V, bid=i), p + "self_attn.v_proj.weight", (kv, dim), "matrix"),
            (name(T.ATTN_OUT, bid=i), p + "self_attn.o_proj.weight", (dim, q), "matrix"),
            (name(T.FFN_NORM, bid=i), p + "post_attention_layernorm.weight", (dim,), "f32"),
            (name(T.FFN_GATE, bid=i), p + "mlp.gate_proj.weight", (hidden, dim), "matrix"),
            (name(T.FFN_UP, bid=i), p + "mlp.up_proj.weight", (hidden, dim), "matrix"),
            (name(T.FFN_DOWN, bid=i), p + "mlp.down_proj.weight", (dim, hidden), "matrix"),
        ]
    plan.append((name(T.OUTPUT_NORM), "model.norm.weight", (dim,), "f32"))
    if not c["tied_classifier"]:
        plan.append((name(T.OUTPUT), "lm_head.weight", (c["vocab_size"], dim), "matrix"))
    return plan


def to_meta_layout(rows, head_dim):
    """Rows of whole heads, Hugging Face's rotate-half order (pair (i, i + head_dim/2)) ->
    Meta's interleaved order (pair (2i, 2i + 1))."""
    n, cols = rows.shape
    return rows.reshape(n // head_dim, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(n, cols)


def converted(x, out_type):
    """float32 rows -> the output storage: F32, F16, or BF16 bits (round to nearest even)."""
    if out_type == "f32":
        return x
    if out_type == "f16":
        return x.astype(np.float16)
    return export.f32_to_bf16(x)


def tensor_chunks(ckpt, hf_name, shape, kind, out_type, head_dim):
    """The output bytes of one tensor, in chunks of whole rows (whole heads for q/k)."""
    f = ckpt.where[hf_name]
    dtype = f.tensors[hf_name][0]
    rows, cols = shape if len(shape) == 2 else (1, shape[0])
    step = max(head_dim, CHUNK_ELEMENTS // cols // head_dim * head_dim)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        x = export.to_f32(f.elements(hf_name, r0 * cols, n * cols), dtype).reshape(n, cols)
        if kind in ("q", "k"):
            x = to_meta_layout(x, head_dim)
        yield converted(x, "f32" if kind == "f32" else out_type).tobytes()


def convert(hf_dir, out_path, out_type, tokenizer_path, llama_cpp_dir):
    gguf = import_gguf(llama_cpp_dir)
    try:
        c = export.read_config(hf_dir)
        ckpt = export.Checkpoint(hf_dir)
    except export.ExportError as e:
        raise SystemExit(f"gguf_from_hf: {e}")
    plan = tensor_plan(gguf, c)
    for _, hf_name, shape, _ in plan:
        if hf_name is not None and (hf_name not in ckpt.where
                                    or tuple(ckpt.info(hf_name)[1]) != shape):
            raise SystemExit(f"gguf_from_hf: {hf_name} missing or not of shape {shape}")
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16}[out_type]
    part = out_path + ".part"
    w = gguf.GGUFWriter(part, "llama")
    write_metadata(gguf, w, c, ftype, tokenizer_path)
    try:
        write_tensors(gguf, w, ckpt, c, plan, out_type)
    except BaseException:
        w.close()
        os.remove(part)  # never a half-written file
        raise
    ckpt.close()
    os.replace(part, out_path)


def write_tensors(gguf, w, ckpt, c, plan, out_type):
    """The tensor table, then each tensor's data streamed chunk by chunk (gguf-py's own
    write_tensor_data would need each tensor whole in memory)."""
    Q = gguf.GGMLQuantizationType
    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}[out_type]
    sizes = []
    for gname, _, shape, kind in plan:
        t = Q.F32 if kind == "f32" else qtype
        size = math.prod(shape) * {Q.F32: 4, Q.F16: 2, Q.BF16: 2}[t]
        # gguf-py takes the shape in numpy order and writes it reversed (ggml order)
        w.add_tensor_info(gname, shape, np.dtype(np.float32), size, raw_dtype=t)
        sizes.append(size)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    out = w.fout[0]
    w.write_padding(out, out.tell())
    for (gname, hf_name, shape, kind), size in zip(plan, sizes):
        start = out.tell()
        if hf_name is None:
            out.write(rope_freq_divisors(c).astype(np.float32).tobytes())
        else:
            for data in tensor_chunks(ckpt, hf_name, shape, kind, out_type, c["head_dim"]):
                out.write(data)
        if out.tell() - start != size:
            raise SystemExit(f"gguf_from_hf: {gname}: wrote {out.tell() - start} bytes, "
                             f"expected {size}")
        w.write_padding(out, size)
    w.close()

def main(argv):
    ap = argparse.ArgumentParser(description="Convert a Hugging Face Llama checkpoint to GGUF "
                                 "with llama.cpp's gguf-py (LLAMA_CPP_DIR).")
    ap.add_argument("hf_dir", help="checkpoint folder (config.json + safetensors)")
    ap.add_argument("out", help="output .gguf file")
    ap.add_argument("--type", choices=("f32", "bf16", "f16"), default="bf16",
                    help="storage of the matrices (norms are always F32); default bf16")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's, else the "
                    "vendored Llama 3 one)")
    ap.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR"),
                    help="llama.cpp checkout whose gguf-py is used (default: $LLAMA_CPP_DIR)")
    a = ap.parse_args(argv)
    tokenizer = a.tokenizer or os.path.join(a.hf_dir, "tokenizer.json")
    if not os.path.exists(tokenizer):
        if a.tokenizer:
            raise SystemExit(f"gguf_from_hf: {tokenizer}: no such file")
        tokenizer = VENDORED_TOKENIZER
    convert(a.hf_dir, a.out, a.type, tokenizer, a.llama_cpp)


if __name__ == "__main__":
    main(sys.argv[1:])
