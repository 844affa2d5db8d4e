#!/usr/bin/env python3
"""Exports a Hugging Face Llama 3 checkpoint to llama3.c's model file ("L3CM" v1) and tokenizer
file ("L3TK" v1); both formats are specified in README.md ("File formats").

Needs only the Python standard library and numpy. Safetensors files are read through memory maps
one tensor (and one bounded chunk of rows) at a time, so the peak memory stays far below the model
size. The output is written under a temporary name and renamed only when complete.

Decisions worth knowing:
- q_proj/k_proj rows are written as Hugging Face stores them (rotate-half RoPE layout); the
  engine rotates pairs (i, i + head_dim/2). No permutation.
- tie_word_embeddings true: the classifier is the embedding; an lm_head.weight in the files is
  then ignored (transformers does the same: it ties the head to the embedding after loading).
  tie_word_embeddings false: lm_head.weight is required.
- Fields with a transformers default that is the only sensible one are optional:
  num_key_value_heads (= num_attention_heads), head_dim (= hidden_size / num_attention_heads),
  tie_word_embeddings (false), rope_scaling (none). Every other number must be in config.json.
- rope_scaling: null, rope_type/type "default" (no scaling) or "llama3" with all four of its
  parameters. Anything else is refused.
- bos/eos ids come from config.json only (generation_config.json is not read).
- Tensors in the files that the format has no place for (e.g. rotary_emb.inv_freq) are ignored.
- q8_0 without --group-size: 64, or gcd(64, every row length) when 64 does not divide them all
  (ref30's hidden_size 96 -> 32). An explicit --group-size that does not divide is an error.
- Tokenizer specials: a tokenizer.json's own added_tokens; for a tiktoken tokenizer.model (or a
  tokenizer.json without added tokens) the --specials layout, by default llama3.1 when
  config.json has llama3 rope_scaling (3.1/3.2) and llama3 otherwise.
"""
import argparse
import base64
import binascii
import json
import math
import mmap
import os
import signal
import struct
import sys

import numpy as np

MAGIC_MODEL = b"L3CM"
MAGIC_TOKENIZER = b"L3TK"
FORMAT_VERSION = 1
HEADER_BYTES = 256
ALIGN = 64
WRITE_PIECE = 2 << 20  # bytes per write(): see OutputFile
WEIGHT_TYPES = {"fp32": 0, "bf16": 1, "q8_0": 2}
MAX_EOS = 8
DEFAULT_GROUP_SIZE = 64
CHUNK_ELEMENTS = 1 << 22  # elements converted at a time: 4M -> about 100 MB of temporaries at most

# Every dtype name safetensors defines, with its size in bytes. Knowing them all lets us check
# the offsets of every tensor in a file, even of tensors we never read.
SAFETENSORS_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8,
}
# The source dtypes we convert from, as numpy dtypes of their raw storage.
SOURCE_DTYPES = {"BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}


class ExportError(Exception):
    """A problem with the input or the options: reported as one line, exit status 1."""


def note(message):
    """Informational lines go to stdout so that stderr carries nothing but errors."""
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------
# Safetensors
# ---------------------------------------------------------------------------------------------

class SafetensorsFile:
    """One .safetensors file: validated header, tensors read as numpy views of a memory map."""

    def __init__(self, path):
        self.path = path
        self.name = os.path.basename(path)
        try:
            self.file = open(path, "rb")
        except OSError as e:
            raise ExportError(f"cannot open {path}: {e.strerror}")
        self.file_size = os.fstat(self.file.fileno()).st_size
        self.tensors = self._read_header()
        self.map = None  # mapped on first use

    def _read_header(self):
        if self.file_size < 8:
            raise ExportError(f"{self.name}: file too short ({self.file_size} bytes) to be safetensors")
        (header_len,) = struct.unpack("<Q", self.file.read(8))
        if header_len > self.file_size - 8:
            raise ExportError(f"{self.name}: header length {header_len} runs past the end of the "
                              f"file ({self.file_size} bytes)")
        raw = self.file.read(header_len)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ExportError(f"{self.name}: malformed JSON header ({e})")
        if not isinstance(header, dict):
            raise ExportError(f"{self.name}: malformed header (not a JSON object)")
        self.data_start = 8 + header_len
        data_len = self.file_size - self.data_start
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            tensors[name] = self._check_entry(name, entry, data_len)
        self._check_overlaps(tensors)
        return tensors

    def _check_entry(self, name, entry, data_len):
        """Returns (dtype, shape, begin, end) with begin/end relative to the data section."""
        where = f"{self.name}: tensor {name}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise ExportError(f"{where}: malformed header entry (needs dtype, shape, data_offsets)")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in SAFETENSORS_DTYPE_SIZES:
            raise ExportError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise ExportError(f"{where}: malformed shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_int(o) for o in offsets)):
            raise ExportError(f"{where}: malformed data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise ExportError(f"{where}: invalid data_offsets {offsets}")
        if end > data_len:
            raise ExportError(f"{where}: data_offsets {offsets} out of range: the data section "
                              f"has {data_len} bytes (file truncated?)")
        expected = math.prod(shape) * SAFETENSORS_DTYPE_SIZES[dtype]
        if end - begin != expected:
            raise ExportError(f"{where}: data_offsets {offsets} span {end - begin} bytes but "
                              f"{dtype} {shape} needs {expected}")
        return dtype, tuple(shape), begin, end

    def _check_overlaps(self, tensors):
        spans = sorted((begin, end, name) for name, (_, _, begin, end) in tensors.items()
                       if end > begin)
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise ExportError(f"{self.name}: tensors {n0} and {n1} overlap "
                                  f"(bytes {b0}..{e0} and {b1}..{e1})")

    def _mapped(self):
        if self.map is None:
            self.map = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ)
        return self.map

    def elements(self, name, start, count):
        """Elements [start, start+count) of a tensor's row-major data, as a read-only numpy view
        of the map in the source's raw storage dtype (BF16 as uint16)."""
        dtype, _, begin, _ = self.tensors[name]
        item = SOURCE_DTYPES[dtype]
        offset = self.data_start + begin + start * item.itemsize
        return np.frombuffer(self._mapped(), dtype=item, count=count, offset=offset)

    def release(self, name, start, count):
        """Drops the pages of elements [start, start+count) from this process (they stay in the
        page cache): without it the resident set would grow to the size of every file read.
        Pages shared with neighbouring data are simply read again if needed."""
        if self.map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        dtype, _, begin, _ = self.tensors[name]
        item = SOURCE_DTYPES[dtype].itemsize
        first = self.data_start + begin + start * item
        stop = first + count * item
        first = first // mmap.PAGESIZE * mmap.PAGESIZE
        if stop > first:
            self.map.madvise(mmap.MADV_DONTNEED, first, stop - first)

    def close(self):
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:
                pass  # a view is still alive (interrupted mid-tensor): freed at exit anyway
        self.file.close()


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Checkpoint:
    """The tensors of a Hugging Face folder: model.safetensors, or the shards listed by
    model.safetensors.index.json (the single file wins when both exist, as in transformers)."""

    def __init__(self, model_dir):
        single = os.path.join(model_dir, "model.safetensors")
        index = os.path.join(model_dir, "model.safetensors.index.json")
        self.files = {}
        self.where = {}  # tensor name -> SafetensorsFile
        if os.path.exists(single):
            f = self._open(single)
            self.where = {name: f for name in f.tensors}
        elif os.path.exists(index):
            self._open_sharded(model_dir, index)
        else:
            raise ExportError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")

    def _open(self, path):
        if path not in self.files:
            self.files[path] = SafetensorsFile(path)
        return self.files[path]

    def _open_sharded(self, model_dir, index_path):
        index = load_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ExportError(f"{os.path.basename(index_path)}: no valid weight_map")
        for shard in sorted(set(weight_map.values())):
            if os.path.basename(shard) != shard:
                raise ExportError(f"{os.path.basename(index_path)}: shard name {shard!r} is not a "
                                  "plain file name")
            path = os.path.join(model_dir, shard)
            if not os.path.exists(path):
                raise ExportError(f"missing shard {shard} (listed in {os.path.basename(index_path)})")
            self._open(path)
        for name, shard in weight_map.items():
            f = self.files[os.path.join(model_dir, shard)]
            if name not in f.tensors:
                raise ExportError(f"tensor {name} is listed in the index for {shard} but {shard} "
                                  "does not contain it")
            self.where[name] = f

    def info(self, name):
        """(dtype, shape) of a tensor."""
        dtype, shape, _, _ = self.where[name].tensors[name]
        return dtype, shape

    def close(self):
        for f in self.files.values():
            f.close()


def load_json(path):
    """Parses a JSON file; duplicate keys are an error (json would silently keep the last)."""
    def no_duplicates(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise ExportError(f"{os.path.basename(path)}: duplicate key {key!r}")
            seen[key] = value
        return seen
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"), object_pairs_hook=no_duplicates)
    except OSError as e:
        raise ExportError(f"cannot read {path}: {e.strerror}")
    except (UnicodeDecodeError, ValueError) as e:
        raise ExportError(f"{os.path.basename(path)}: malformed JSON ({e})")


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------

def read_config(model_dir):
    """Reads and checks config.json; returns a dict with the header's fields."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise ExportError(f"{model_dir}: no config.json")
    cfg = load_json(path)
    if not isinstance(cfg, dict):
        raise ExportError("config.json: not a JSON object")
    check_architecture(cfg)

    def get(key, kind, default=None, optional=False):
        if key not in cfg or cfg[key] is None:
            if optional:
                return default
            raise ExportError(f"config.json: missing field {key}")
        value = cfg[key]
        ok = _is_int(value) if kind is int else _is_number(value)
        if not ok:
            raise ExportError(f"config.json: {key} = {value!r} is not {'an integer' if kind is int else 'a number'}")
        return kind(value)

    c = {}
    c["dim"] = get("hidden_size", int)
    c["hidden_dim"] = get("intermediate_size", int)
    c["n_layers"] = get("num_hidden_layers", int)
    c["n_heads"] = get("num_attention_heads", int)
    c["n_kv_heads"] = get("num_key_value_heads", int, default=c["n_heads"], optional=True)
    c["vocab_size"] = get("vocab_size", int)
    c["max_seq_len"] = get("max_position_embeddings", int)
    c["rope_theta"] = get("rope_theta", float)
    c["norm_eps"] = get("rms_norm_eps", float)
    for key in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len"):
        if not 0 < c[key] < 2**31:
            raise ExportError(f"config.json: {key} = {c[key]} out of range")
    if c["rope_theta"] <= 0 or c["norm_eps"] <= 0:
        raise ExportError("config.json: rope_theta and rms_norm_eps must be positive")
    if c["n_heads"] % c["n_kv_heads"]:
        raise ExportError(f"config.json: num_attention_heads {c['n_heads']} is not a multiple of "
                          f"num_key_value_heads {c['n_kv_heads']}")
    if "head_dim" in cfg and cfg["head_dim"] is not None:
        c["head_dim"] = get("head_dim", int)
    elif c["dim"] % c["n_heads"]:
        raise ExportError("config.json: no head_dim and hidden_size is not a multiple of "
                          "num_attention_heads")
    else:
        c["head_dim"] = c["dim"] // c["n_heads"]
    if c["head_dim"] <= 0 or c["head_dim"] % 2:
        raise ExportError(f"config.json: head_dim {c['head_dim']} must be positive and even (RoPE pairs)")
    tied = cfg.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise ExportError(f"config.json: tie_word_embeddings = {tied!r} is not true/false")
    c["tied"] = tied
    c.update(read_rope_scaling(cfg.get("rope_scaling")))
    c["bos_id"], c["eos_ids"] = read_special_ids(cfg, c["vocab_size"])
    return c


def check_architecture(cfg):
    """Only plain Llama is accepted: options that change the computation are refused."""
    arch = cfg.get("architectures")
    model_type = cfg.get("model_type")
    if arch is None and model_type is None:
        raise ExportError("config.json: no architectures or model_type: cannot tell the architecture")
    if arch is not None and arch != ["LlamaForCausalLM"]:
        raise ExportError(f"config.json: unsupported architecture {arch!r} (need LlamaForCausalLM)")
    if model_type is not None and model_type != "llama":
        raise ExportError(f"config.json: unsupported model_type {model_type!r} (need llama)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ExportError(f"config.json: unsupported hidden_act {cfg['hidden_act']!r} (need silu)")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ExportError(f"config.json: {key} true is not supported")
    if cfg.get("pretraining_tp", 1) != 1:
        raise ExportError("config.json: pretraining_tp other than 1 is not supported")


def read_rope_scaling(scaling):
    """Header fields for rope_scaling: none (null / "default") or llama3 with all four values."""
    none = {"rope_scaling": 0, "rope_factor": 1.0, "rope_low_freq_factor": 1.0,
            "rope_high_freq_factor": 4.0, "rope_original_max_pos": 8192}
    if scaling is None:
        return none
    if not isinstance(scaling, dict):
        raise ExportError(f"config.json: rope_scaling {scaling!r} is not an object")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return none
    if kind != "llama3":
        raise ExportError(f"config.json: unsupported rope_scaling type {kind!r} (supported: null, llama3)")
    values = {}
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        value = scaling.get(key)
        if not _is_number(value) or value <= 0:
            raise ExportError(f"config.json: rope_scaling.{key} missing or not a positive number")
        values[key] = value
    if not _is_int(values["original_max_position_embeddings"]):
        raise ExportError("config.json: rope_scaling.original_max_position_embeddings is not an integer")
    if values["high_freq_factor"] <= values["low_freq_factor"]:
        raise ExportError("config.json: rope_scaling.high_freq_factor must exceed low_freq_factor")
    return {"rope_scaling": 1, "rope_factor": float(values["factor"]),
            "rope_low_freq_factor": float(values["low_freq_factor"]),
            "rope_high_freq_factor": float(values["high_freq_factor"]),
            "rope_original_max_pos": values["original_max_position_embeddings"]}


def read_special_ids(cfg, vocab_size):
    bos = cfg.get("bos_token_id")
    eos = cfg.get("eos_token_id")
    if bos is None:
        raise ExportError("config.json: missing field bos_token_id")
    if eos is None:
        raise ExportError("config.json: missing field eos_token_id")
    eos_list = eos if isinstance(eos, list) else [eos]
    if not 1 <= len(eos_list) <= MAX_EOS:
        raise ExportError(f"config.json: eos_token_id needs 1..{MAX_EOS} ids, has {len(eos_list)}")
    for value in [bos] + eos_list:
        if not _is_int(value) or not 0 <= value < vocab_size:
            raise ExportError(f"config.json: token id {value!r} is not in 0..{vocab_size - 1}")
    return bos, eos_list


# ---------------------------------------------------------------------------------------------
# The model file
# ---------------------------------------------------------------------------------------------

def tensor_plan(c):
    """[(hf name, expected shape, is_matrix)] in file order."""
    dim, hd = c["dim"], c["head_dim"]
    q_rows, kv_rows = c["n_heads"] * hd, c["n_kv_heads"] * hd
    plan = [("model.embed_tokens.weight", (c["vocab_size"], dim), True)]
    for i in range(c["n_layers"]):
        p = f"model.layers.{i}."
        plan += [
            (p + "input_layernorm.weight", (dim,), False),
            (p + "self_attn.q_proj.weight", (q_rows, dim), True),
            (p + "self_attn.k_proj.weight", (kv_rows, dim), True),
            (p + "self_attn.v_proj.weight", (kv_rows, dim), True),
            (p + "self_attn.o_proj.weight", (dim, q_rows), True),
            (p + "post_attention_layernorm.weight", (dim,), False),
            (p + "mlp.gate_proj.weight", (c["hidden_dim"], dim), True),
            (p + "mlp.down_proj.weight", (dim, c["hidden_dim"]), True),
            (p + "mlp.up_proj.weight", (c["hidden_dim"], dim), True),
        ]
    plan.append(("model.norm.weight", (dim,), False))
    if not c["tied"]:
        plan.append(("lm_head.weight", (c["vocab_size"], dim), True))
    return plan


def check_tensors(ckpt, plan, c):
    """Every tensor present, of a supported dtype, with the shape config.json implies."""
    for name, shape, _ in plan:
        if name not in ckpt.where:
            raise ExportError(f"missing tensor {name}")
        dtype, actual = ckpt.info(name)
        if dtype not in SOURCE_DTYPES:
            raise ExportError(f"tensor {name}: unsupported dtype {dtype} (supported: BF16, F16, F32)")
        if actual != shape:
            raise ExportError(f"tensor {name}: shape {list(actual)} disagrees with config.json "
                              f"(expected {list(shape)})")
    known = {name for name, _, _ in plan}
    ignored = sorted(set(ckpt.where) - known)
    if c["tied"] and "lm_head.weight" in ignored:
        note("note: tie_word_embeddings is true: lm_head.weight ignored, the classifier is the embedding")
        ignored.remove("lm_head.weight")
    if ignored:
        note(f"note: {len(ignored)} tensor(s) not used: {', '.join(ignored[:4])}"
             + (" ..." if len(ignored) > 4 else ""))


def pack_header(c, weight_type, group_size):
    eos = c["eos_ids"] + [-1] * (MAX_EOS - len(c["eos_ids"]))
    head = struct.pack(
        "<4sI8iffIfffiIIiii8i", MAGIC_MODEL, FORMAT_VERSION,
        c["dim"], c["hidden_dim"], c["n_layers"], c["n_heads"], c["n_kv_heads"], c["head_dim"],
        c["vocab_size"], c["max_seq_len"], c["rope_theta"], c["norm_eps"],
        c["rope_scaling"], c["rope_factor"], c["rope_low_freq_factor"], c["rope_high_freq_factor"],
        c["rope_original_max_pos"], 1 if c["tied"] else 0, weight_type, group_size,
        c["bos_id"], len(c["eos_ids"]), *eos)
    return head + bytes(HEADER_BYTES - len(head))


def to_f32(raw, dtype):
    """Raw source storage -> float32 (exact for all three source dtypes)."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def f32_to_bf16(x):
    """float32 -> bf16 bits, round to nearest even; NaN stays a (quiet) NaN."""
    bits = x.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | np.uint32(0x40)).astype(np.uint16)
    return rounded


def quantize_q8_0(x, group_size):
    """float32 [n] -> (int8 q [n], float32 scales [n/group_size]) as README.md ("File formats") defines."""
    groups = x.reshape(-1, group_size)
    scale = (np.abs(groups).max(axis=1) / np.float32(127)).astype(np.float32)
    safe = np.where(scale == 0, np.float32(1), scale)
    q = np.rint(groups / safe[:, None])
    np.clip(q, -127, 127, out=q)  # |x| / scale <= 127 already; guards against rounding
    q = q.astype(np.int8)
    return q.reshape(-1), scale


class OutputFile:
    """Writes the model file, padding each tensor to a 64-byte boundary. The bytes reach the
    file in whole pieces of WRITE_PIECE at offsets that are multiples of it: Linux then keeps
    the fresh file in its page cache as 2 MB folios, which run.c's mapping gets as 2 MB pages.
    Writes at odd offsets leave 4 KB folios until the kernel drops the file and reads it back:
    the 1B q8_0 file then decoded 31.5-33.8 tok/s mapped against 36.7-37.6 (70 GB/s)."""

    def __init__(self, f):
        self.f = f
        self.pending = bytearray()
        self.size = 0

    def align(self):
        pad = -self.size % ALIGN
        if pad:
            self.write(bytes(pad))

    def write(self, data):
        if isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data)
        data = memoryview(data).cast("B")  # len() in bytes, whatever the element type
        self.pending += data
        self.size += len(data)
        whole = len(self.pending) // WRITE_PIECE * WRITE_PIECE
        if whole:
            with memoryview(self.pending) as view:
                self.f.write(view[:whole])
            del self.pending[:whole]

    def finish(self):
        self.f.write(self.pending)
        self.pending = bytearray()
        return self.size


def chunks(shape):
    """(first element, element count) pieces of about CHUNK_ELEMENTS covering a tensor; pieces
    hold whole rows, so q8_0 groups (which never cross a row) never straddle two pieces."""
    total = math.prod(shape)
    row = shape[-1] if shape else 1
    step = max(1, CHUNK_ELEMENTS // max(1, row)) * row
    for start in range(0, total, step):
        yield start, min(step, total - start)


def write_tensor(out, ckpt, name, shape, as_matrix, weight_type, group_size):
    """Converts one tensor chunk by chunk; returns a short description for the progress line."""
    f = ckpt.where[name]
    dtype, _ = ckpt.info(name)
    kind = weight_type if as_matrix else "fp32"
    out.align()
    scales = []
    max_err = sq_err = sq_ref = 0.0
    for start, count in chunks(shape):
        raw = f.elements(name, start, count)
        if kind == "bf16" and dtype == "BF16":
            out.write(raw)  # exact copy of the stored bits
        elif kind == "fp32":
            out.write(to_f32(raw, dtype))
        elif kind == "bf16":
            out.write(f32_to_bf16(to_f32(raw, dtype)))
        else:
            x = to_f32(raw, dtype)
            q, scale = quantize_q8_0(x, group_size)
            out.write(q)
            scales.append(scale)
            err = (q.reshape(-1, group_size).astype(np.float32) * scale[:, None]).reshape(-1) - x
            max_err = max(max_err, float(np.abs(err).max(initial=0)))
            sq_err += float(np.einsum("i,i->", err, err, dtype=np.float64))
            sq_ref += float(np.einsum("i,i->", x, x, dtype=np.float64))
        del raw
        f.release(name, start, count)
    if kind != "q8_0":
        return kind
    out.align()
    for scale in scales:
        out.write(scale)
    rel = math.sqrt(sq_err / sq_ref) if sq_ref > 0 else 0.0
    return f"q8_0  max abs err {max_err:.3g}  rms rel err {rel:.3g}"


def expected_size(plan, weight_type, group_size):
    """File size implied by the format (README.md): checked after writing."""
    pos = HEADER_BYTES
    for _, shape, is_matrix in plan:
        n = math.prod(shape)
        pos += -pos % ALIGN
        if not is_matrix or weight_type == "fp32":
            pos += 4 * n
        elif weight_type == "bf16":
            pos += 2 * n
        else:
            pos += n
            pos += -pos % ALIGN
            pos += 4 * (n // group_size)
    return pos


def write_model(path, ckpt, c, plan, weight_type, group_size):
    code = WEIGHT_TYPES[weight_type]
    with open(path, "wb") as f:
        out = OutputFile(f)
        out.write(pack_header(c, code, group_size if weight_type == "q8_0" else 0))
        for i, (name, shape, is_matrix) in enumerate(plan):
            dtype, _ = ckpt.info(name)
            what = write_tensor(out, ckpt, name, shape, is_matrix, weight_type, group_size)
            note(f"[{i + 1:4d}/{len(plan)}] {name:48s} {dtype:4s} {list(shape)} -> {what}")
        size = out.finish()
    if size != expected_size(plan, weight_type, group_size):
        raise ExportError(f"internal error: wrote {size} bytes, expected "
                          f"{expected_size(plan, weight_type, group_size)}")
    return size


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

# Special-token layouts (ids 128000..128255). Every id not named here is a
# <|reserved_special_token_N|>, N counting up from 0 in id order; this rule reproduces each
# layout of tests/data/tokenizer/special_tokens.json exactly (checked by tests/test_export.py).
N_REGULAR_LLAMA3 = 128000
N_SPECIAL_LLAMA3 = 256
_COMMON_SPECIALS = {0: "begin_of_text", 1: "end_of_text", 6: "start_header_id",
                    7: "end_header_id", 9: "eot_id"}
_LLAMA31_SPECIALS = {**_COMMON_SPECIALS, 4: "finetune_right_pad_id", 8: "eom_id", 10: "python_tag"}
SPECIAL_LAYOUTS = {
    "llama3": _COMMON_SPECIALS,              # Meta Llama 3 (April 2024)
    "llama3.1": _LLAMA31_SPECIALS,           # Llama 3.1 / 3.2 Hugging Face files
    "llama-models": {**_LLAMA31_SPECIALS, 5: "step_id", 11: "image"},  # meta-llama/llama-models
}


def special_texts(layout):
    """The 256 special-token texts of a layout, in id order."""
    named = SPECIAL_LAYOUTS[layout]
    texts, reserved = [], 0
    for offset in range(N_SPECIAL_LLAMA3):
        if offset in named:
            texts.append(f"<|{named[offset]}|>")
        else:
            texts.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return texts


def gpt2_unicode_to_byte():
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the other 68
    bytes to the code points 256, 257, ... in byte order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def tokenizer_from_json(path):
    """(regular token bytes in id order, special texts) from a Hugging Face tokenizer.json."""
    name = os.path.basename(path)
    tok = load_json(path)
    model = tok.get("model") if isinstance(tok, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ExportError(f"{name}: not a BPE tokenizer with a vocab")
    vocab = model["vocab"]
    to_byte = gpt2_unicode_to_byte()
    regular = [None] * len(vocab)
    for text, idx in vocab.items():
        if not _is_int(idx) or not 0 <= idx < len(vocab):
            raise ExportError(f"{name}: vocab ids are not 0..{len(vocab) - 1} ({text!r} has id {idx!r})")
        if regular[idx] is not None:
            raise ExportError(f"{name}: duplicate vocab id {idx}")
        try:
            regular[idx] = bytes(to_byte[ch] for ch in text)
        except KeyError as e:
            raise ExportError(f"{name}: vocab entry {text!r} is not byte-level BPE (character {e})")
    check_merge_order(name, model.get("merges", []), vocab)
    if model.get("ignore_merges") is not True:
        note(f"note: {name} lacks ignore_merges: true; llama3.c encodes like tiktoken (as if it were set)")
    specials = {}
    for entry in tok.get("added_tokens") or []:
        idx, text = (entry.get("id"), entry.get("content")) if isinstance(entry, dict) else (None, None)
        if not _is_int(idx) or not isinstance(text, str):
            raise ExportError(f"{name}: malformed added_tokens entry {entry!r}")
        if idx < len(regular):
            if text.encode("utf-8") != regular[idx]:
                raise ExportError(f"{name}: added token {text!r} reuses regular id {idx}")
            continue
        if idx in specials:
            raise ExportError(f"{name}: duplicate added token id {idx}")
        specials[idx] = text
    ids = sorted(specials)
    if ids != list(range(len(regular), len(regular) + len(ids))):
        raise ExportError(f"{name}: special token ids are not contiguous from {len(regular)}")
    if len(set(specials.values())) != len(specials):
        raise ExportError(f"{name}: duplicate special token text")
    return regular, [specials[i] for i in ids]


def check_merge_order(name, merges, vocab):
    """The .tok format takes the id as the merge priority: the merges must agree (each merge's
    result id never smaller than the previous one's), as they do for Llama 3."""
    prev = -1
    for k, merge in enumerate(merges):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(pair, list) or len(pair) != 2 or "".join(pair) not in vocab:
            raise ExportError(f"{name}: malformed merge #{k}: {merge!r}")
        idx = vocab["".join(pair)]
        if idx < prev:
            raise ExportError(f"{name}: merge #{k} {merge!r} is out of id order: llama3.c needs "
                              "merge priority = token id")
        prev = idx


def tokenizer_from_tiktoken(path):
    """Regular token bytes in rank order from a tiktoken file: lines "base64 rank"."""
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ExportError(f"cannot read {path}: {e.strerror}")
    by_rank, seen = {}, {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ExportError(f"{name}:{lineno}: expected 'base64 rank'")
        try:
            token = base64.b64decode(parts[0], validate=True)
        except (binascii.Error, ValueError):
            raise ExportError(f"{name}:{lineno}: bad base64 {parts[0][:40]!r}")
        try:
            rank = int(parts[1])
        except ValueError:
            raise ExportError(f"{name}:{lineno}: bad rank {parts[1][:20]!r}")
        if rank < 0 or rank in by_rank:
            raise ExportError(f"{name}:{lineno}: {'duplicate' if rank >= 0 else 'negative'} rank {rank}")
        if token in seen:
            raise ExportError(f"{name}:{lineno}: duplicate token {token!r} (also rank {seen[token]})")
        if not token:
            raise ExportError(f"{name}:{lineno}: empty token")
        by_rank[rank] = token
        seen[token] = rank
    n = len(by_rank)
    if n == 0:
        raise ExportError(f"{name}: no tokens")
    if max(by_rank) != n - 1:
        missing = next(r for r in range(n) if r not in by_rank)
        raise ExportError(f"{name}: ranks are not 0..{n - 1}: rank {missing} missing")
    return [by_rank[r] for r in range(n)]


def pack_tokenizer(regular, specials):
    parts = [struct.pack("<4sIII", MAGIC_TOKENIZER, FORMAT_VERSION,
                         len(regular) + len(specials), len(specials))]
    for token in regular + [s.encode("utf-8") for s in specials]:
        parts.append(struct.pack("<I", len(token)))
        parts.append(token)
    return b"".join(parts)


def build_tokenizer(path, layout, layout_explicit):
    """The .tok bytes from tokenizer.json (specials from its added_tokens, unless a layout is
    asked for explicitly or it has none) or from a tiktoken tokenizer.model (specials from the
    layout)."""
    if path.endswith(".json"):
        regular, specials = tokenizer_from_json(path)
        if layout_explicit or not specials:  # no added tokens: the layout supplies them
            wanted = special_texts(layout)
            if specials and specials != wanted:
                note(f"note: special tokens replaced by the {layout} layout (--specials)")
            specials = wanted
    else:
        regular = tokenizer_from_tiktoken(path)
        specials = special_texts(layout)
    if (len(regular), len(specials)) != (N_REGULAR_LLAMA3, N_SPECIAL_LLAMA3):
        note(f"note: tokenizer has {len(regular)} regular and {len(specials)} special tokens "
             f"(Llama 3: {N_REGULAR_LLAMA3} and {N_SPECIAL_LLAMA3})")
    note(f"tokenizer: {os.path.basename(path)}: {len(regular)} regular + {len(specials)} special tokens")
    return pack_tokenizer(regular, specials)


def find_tokenizer(model_dir):
    """tokenizer.json first (it carries the model's own special names), then tiktoken files."""
    for rel in ("tokenizer.json", os.path.join("original", "tokenizer.model"), "tokenizer.model"):
        path = os.path.join(model_dir, rel)
        if os.path.isfile(path):
            return path
    return None


def default_tokenizer_path(model_out):
    base = model_out[:-4] if model_out.endswith(".bin") else model_out
    return base + ".tok"


# ---------------------------------------------------------------------------------------------
# Writing outputs atomically
# ---------------------------------------------------------------------------------------------

class AtomicOutputs:
    """Temporary files next to their targets, renamed into place only by commit(); whatever is
    not committed is removed, so an error never leaves a partial output behind."""

    def __init__(self):
        self.pending = []  # (temporary path, final path)

    def temp_for(self, final):
        folder = os.path.dirname(os.path.abspath(final))
        if not os.path.isdir(folder):
            raise ExportError(f"output folder {folder} does not exist")
        temp = os.path.join(folder, f".{os.path.basename(final)}.tmp{os.getpid()}")
        self.pending.append((temp, final))
        return temp

    def commit(self):
        for temp, final in self.pending:
            os.replace(temp, final)
        self.pending = []

    def cleanup(self):
        for temp, _ in self.pending:
            try:
                os.remove(temp)
            except FileNotFoundError:
                pass


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

class OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors like every other error: one line on stderr, exit status 1."""

    def error(self, message):
        print(f"export.py: error: {message} (see --help)", file=sys.stderr)
        sys.exit(1)


def parse_args(argv):
    p = OneLineErrorParser(
        prog="export.py",
        description="Export a Hugging Face Llama 3 / 3.1 / 3.2 checkpoint (LlamaForCausalLM,\n"
                    "safetensors) to a llama3.c model file, and its tokenizer to a llama3.c\n"
                    "tokenizer file (formats: README.md, section 'File formats').",
        epilog="Examples:\n"
               "  python3 export.py llama3.2-1b.bin --hf ~/Llama-3.2-1B-Instruct --dtype bf16\n"
               "  python3 export.py l3-8b-q8.bin --hf ~/Meta-Llama-3-8B --dtype q8_0\n"
               "  python3 export.py --tokenizer-only llama3.tok --tokenizer tokenizer.model --specials llama3\n"
               "Progress goes to stdout. Any error, a bad option included, is one line on stderr\n"
               "and exit status 1; no partial output file is ever left behind.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT",
                   help="output file: the model (.bin), or the tokenizer (.tok) with --tokenizer-only")
    p.add_argument("--hf", metavar="MODEL_DIR",
                   help="Hugging Face model folder: config.json, model.safetensors or shards with "
                        "model.safetensors.index.json, and tokenizer.json and/or "
                        "original/tokenizer.model")
    p.add_argument("--dtype", choices=sorted(WEIGHT_TYPES), default="fp32",
                   help="weight type of the matrices (norms are always fp32): fp32 exact; bf16 "
                        "(exact for bf16 checkpoints, rounded to nearest even otherwise); q8_0 "
                        "int8 with one float32 scale per group (default: fp32)")
    p.add_argument("--group-size", type=int, metavar="N",
                   help="q8_0 group size: elements per scale; must divide every matrix's row "
                        "length (default: 64, or the largest divisor of 64 that divides them all, "
                        "e.g. 32 for hidden_size 96)")
    p.add_argument("--tokenizer-out", metavar="PATH",
                   help="where to write the tokenizer file (default: OUT without a trailing .bin, "
                        "plus .tok)")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="write the model file only")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer source: a tokenizer.json or a tiktoken tokenizer.model (default "
                        "with --hf: MODEL_DIR/tokenizer.json, else MODEL_DIR/original/tokenizer.model, "
                        "else MODEL_DIR/tokenizer.model; no tokenizer is written if none exists)")
    p.add_argument("--tokenizer-only", action="store_true",
                   help="write only a tokenizer file, to OUT, from --tokenizer")
    p.add_argument("--specials", choices=sorted(SPECIAL_LAYOUTS),
                   help="names of the 256 special tokens (ids 128000..) for a tokenizer.model "
                        "source, or to replace those of a tokenizer.json: llama3 (Llama 3), "
                        "llama3.1 (Llama 3.1/3.2: <|eom_id|>, <|python_tag|>, ...), llama-models "
                        "(meta-llama/llama-models naming). Default: a tokenizer.json's own added "
                        "tokens; for tokenizer.model, llama3.1 when config.json has llama3 "
                        "rope_scaling or is not known, else llama3")
    args = p.parse_args(argv)
    if args.group_size is not None and args.group_size <= 0:
        p.error("--group-size must be positive")
    if args.tokenizer_only:
        if not args.tokenizer:
            p.error("--tokenizer-only needs --tokenizer PATH")
        if args.hf:
            p.error("--tokenizer-only and --hf exclude each other")
    elif not args.hf:
        p.error("--hf MODEL_DIR is required (or --tokenizer-only)")
    if args.no_tokenizer and (args.tokenizer_out or args.tokenizer):
        p.error("--no-tokenizer excludes --tokenizer-out and --tokenizer")
    return args


def choose_group_size(args, plan):
    """The q8_0 group size: --group-size if it divides every row length (error otherwise), else
    64 reduced to a common divisor so that small test models with odd sizes still export."""
    if args.dtype != "q8_0":
        return 0
    columns = [shape[1] for _, shape, is_matrix in plan if is_matrix]
    if args.group_size is not None:
        for name, shape, is_matrix in plan:
            if is_matrix and shape[1] % args.group_size:
                raise ExportError(f"--group-size {args.group_size} does not divide the row "
                                  f"length {shape[1]} of {name}")
        return args.group_size
    size = math.gcd(DEFAULT_GROUP_SIZE, *columns)
    if size != DEFAULT_GROUP_SIZE:
        note(f"note: q8_0 group size {size}: {DEFAULT_GROUP_SIZE} does not divide every row length")
    return size


def layout_for(args, config):
    """The special layout for a tiktoken source when --specials is not given."""
    if args.specials:
        return args.specials
    if config is not None and config["rope_scaling"] == 0:
        return "llama3"
    return "llama3.1"


def config_near(tokenizer_path):
    """config.json beside a tokenizer file or one folder up (original/tokenizer.model)."""
    folder = os.path.dirname(os.path.abspath(tokenizer_path))
    for candidate in (folder, os.path.dirname(folder)):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            try:
                return read_config(candidate)
            except ExportError:
                return None
    return None


def export_tokenizer_only(args, outputs):
    if not os.path.isfile(args.tokenizer):
        raise ExportError(f"tokenizer {args.tokenizer} not found")
    data = build_tokenizer(args.tokenizer, layout_for(args, config_near(args.tokenizer)),
                           bool(args.specials))
    temp = outputs.temp_for(args.out)
    with open(temp, "wb") as f:
        f.write(data)
    outputs.commit()
    note(f"wrote {args.out} ({len(data)} bytes)")


def export_model(args, outputs):
    if not os.path.isdir(args.hf):
        raise ExportError(f"model folder {args.hf} not found")
    c = read_config(args.hf)
    ckpt = Checkpoint(args.hf)
    try:
        plan = tensor_plan(c)
        check_tensors(ckpt, plan, c)
        group_size = choose_group_size(args, plan)
        # The tokenizer is built (in memory, ~2 MB) before the long model write so that a bad
        # tokenizer fails fast and both files appear together.
        tok_data = tok_out = None
        if not args.no_tokenizer:
            source = args.tokenizer or find_tokenizer(args.hf)
            if source is None:
                if args.tokenizer_out:
                    raise ExportError(f"{args.hf}: no tokenizer.json or tokenizer.model for --tokenizer-out")
                note(f"note: {args.hf} has no tokenizer.json or tokenizer.model: no tokenizer file written")
            elif not os.path.isfile(source):
                raise ExportError(f"tokenizer {source} not found")
            else:
                tok_data = build_tokenizer(source, layout_for(args, c), bool(args.specials))
                n_tokens = struct.unpack_from("<I", tok_data, 8)[0]
                if n_tokens != c["vocab_size"]:
                    note(f"note: the tokenizer has {n_tokens} tokens, the model's vocab_size is "
                         f"{c['vocab_size']}")
                tok_out = args.tokenizer_out or default_tokenizer_path(args.out)
                if os.path.abspath(tok_out) == os.path.abspath(args.out):
                    raise ExportError("the tokenizer output would overwrite the model output")
        note(f"model: dim {c['dim']}, hidden {c['hidden_dim']}, {c['n_layers']} layers, "
             f"{c['n_heads']}/{c['n_kv_heads']} heads of {c['head_dim']}, vocab {c['vocab_size']}, "
             f"{'tied' if c['tied'] else 'untied'}, rope_scaling {'llama3' if c['rope_scaling'] else 'none'}"
             f" -> {args.dtype}")
        temp = outputs.temp_for(args.out)
        size = write_model(temp, ckpt, c, plan, args.dtype, group_size)
        if tok_data is not None:
            with open(outputs.temp_for(tok_out), "wb") as f:
                f.write(tok_data)
        outputs.commit()
    finally:
        ckpt.close()
    note(f"wrote {args.out} ({size} bytes)")
    if tok_data is not None:
        note(f"wrote {tok_out} ({len(tok_data)} bytes)")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    outputs = AtomicOutputs()
    # a plain `kill` must also remove the temporary files: turn SIGTERM into SystemExit
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        if args.tokenizer_only:
            export_tokenizer_only(args, outputs)
        else:
            export_model(args, outputs)
    except ExportError as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions, ...: still one line, never a traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"export.py: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("export.py: interrupted", file=sys.stderr)
        return 130
    finally:
        outputs.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
