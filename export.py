#!/usr/bin/env python3
"""Exports a Hugging Face Llama 3 checkpoint to llama3.c's model file ("L3CM" v1) and tokenizer
file ("L3TK" v1); both formats are specified in docs/formats.md.

Needs only the Python standard library and numpy. Tensors are read from the safetensors files
one bounded chunk of rows at a time, so the peak memory stays far below the model size.

What it refuses, so that what it writes runs (each refusal is one line on stderr, exit 1):
- anything run.c would refuse: every header check of run.c's parse_header is made here on the
  config.json values as the header will hold them (float32), and every check of tokenizer.c's
  loader on the tokenizer, whose size must equal vocab_size;
- input files that are not regular files after following symlinks (a FIFO would block),
  JSON with a duplicate key (config.json, the index, a safetensors header, tokenizer.json),
  JSON of the wrong shape or nested too deeply, a safetensors header over 100 MB;
- an output that names an input, or a folder.
Outputs are written under fresh random names in their own folders (O_EXCL: never through a
planted file) and renamed into place together, only once all of them are complete; an error or
SIGINT, SIGTERM, SIGHUP or SIGQUIT removes them.

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
- q4_0: every matrix (embedding and classifier included) is 4-bit, groups of 32 by default
  (--group-size: any multiple of 32 dividing every row length). Each group's fp16 scale is
  searched (quantize_q4_0): its squared error is never above llama.cpp's Q4_0 of the same group,
  which the progress line prints beside ours.
- Tokenizer specials: a tokenizer.json's own added_tokens; for a tiktoken tokenizer.model (or a
  tokenizer.json without added tokens) the --specials layout, by default llama3.1 when
  config.json has llama3 rope_scaling (3.1/3.2) and llama3 otherwise.
"""
import argparse
import base64
import binascii
import contextlib
import json
import math
import os
import secrets
import signal
import stat
import struct
import sys

try:
    import numpy as np
except ImportError:  # one line that names the fix, not a traceback
    sys.exit(f"export.py: error: numpy is missing for {sys.executable}: install it (Debian or "
             "Ubuntu: apt-get install python3-numpy, which serves /usr/bin/python3; then run "
             "/usr/bin/python3 export.py ...)")

MAGIC_MODEL = b"L3CM"
MAGIC_TOKENIZER = b"L3TK"
FORMAT_VERSION = 1
HEADER_BYTES = 256
ALIGN = 64
WRITE_PIECE = 2 << 20  # bytes per write(): see OutputFile
WEIGHT_TYPES = {"fp32": 0, "bf16": 1, "q8_0": 2, "q4_0": 3}
MAX_EOS = 8
DEFAULT_GROUP_SIZE = 64
Q4_GROUP_SIZE = 32  # q4_0's default group size, and its blocks: 32 values in 16 bytes
CHUNK_ELEMENTS = 1 << 22  # elements converted at a time: 4M -> about 100 MB of temporaries at most
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit
MAX_TEXT_INPUT = 64 << 20  # config.json, the index, tokenizer.json/.model (real ones: < 20 MB)
MAX_DIMS = 64  # of a safetensors tensor (real ones have 1 or 2)

# The model file's header, field by field from byte 0, little-endian, then zeros up to
# HEADER_BYTES. This table is the header's one description in Python: pack_header writes it,
# and tests/fuzz/modelfile.py builds and damages test files with it. The names are those of
# run.c's Config, whose parse_header reads the same offsets (docs/formats.md).
MODEL_HEADER = (
    ("magic", "4s"), ("version", "I"),
    ("dim", "i"), ("hidden_dim", "i"), ("n_layers", "i"), ("n_heads", "i"), ("n_kv_heads", "i"),
    ("head_dim", "i"), ("vocab_size", "i"), ("max_seq_len", "i"),
    ("rope_theta", "f"), ("norm_eps", "f"),
    ("rope_scaling", "I"),  # 0 none, 1 Llama 3.1 "llama3"
    ("rope_factor", "f"), ("rope_low_freq_factor", "f"), ("rope_high_freq_factor", "f"),
    ("rope_original_max_pos", "i"),
    ("tied_classifier", "I"),  # 1: the classifier is the token embedding
    ("weight_type", "I"),  # WEIGHT_TYPES
    ("group_size", "i"),  # q8_0 and q4_0: values per scale; 0 otherwise
    ("bos_id", "i"), ("n_eos", "i"), ("eos_ids", f"{MAX_EOS}i"),  # unused eos slots: -1
)


def header_layout():
    """{field: (offset, struct format)} for every field of MODEL_HEADER."""
    layout, offset = {}, 0
    for name, code in MODEL_HEADER:
        layout[name] = (offset, "<" + code)
        offset += struct.calcsize("<" + code)
    assert offset <= HEADER_BYTES
    return layout


HEADER_LAYOUT = header_layout()

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
    """Progress and notes go to stdout so that stderr carries nothing but errors. They are only
    information: when stdout is closed (`| head`) or full, the export goes on without them."""
    try:
        print(message, flush=True)
    except OSError:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())  # what is still buffered drains there at exit
        os.close(null)


def shown(value, limit=60):
    """A JSON value for an error message: its repr, cut short (it may be megabytes long)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # nested too deeply; an int of over 4300 digits
        return f"(a {type(value).__name__})"
    return text if len(text) <= limit else text[:limit] + "..."


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# Input files
# ---------------------------------------------------------------------------------------------

def open_input(path):
    """A file descriptor for reading a regular file. Symlinks are followed (Hugging Face's cache
    is made of them); anything else (a FIFO, a device, a folder) is refused, and O_NONBLOCK
    makes opening a FIFO return at once instead of waiting for a writer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ExportError(f"cannot open {path}: {e.strerror}")
    except ValueError:  # a NUL in the name (from a JSON string)
        raise ExportError(f"cannot open {shown(path)}: invalid file name")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ExportError(f"{path} is not a regular file")
    return fd


def read_exactly(fd, buffer, offset, path):
    """Fills buffer (a writable bytes-like object) from the file at offset."""
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise ExportError(f"{path}: the file ended early (changed while being read?)")
        done += got


def read_input(path, limit=MAX_TEXT_INPUT):
    """The bytes of a small input file (config.json, an index, a tokenizer)."""
    fd = open_input(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise ExportError(f"{path}: {size} bytes is too large (at most {limit} are read)")
        data = bytearray(size)
        read_exactly(fd, data, 0, path)
        return bytes(data)
    finally:
        os.close(fd)


def parse_json(raw, name):
    """Parses JSON bytes; a duplicate key anywhere is an error (json would keep the last one)."""
    def no_duplicates(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise ExportError(f"{name}: duplicate key {shown(key)}")
            seen[key] = value
        return seen
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise ExportError(f"{name}: malformed JSON ({e})")
    except RecursionError:
        raise ExportError(f"{name}: malformed JSON (nested too deeply)")


def load_json(path):
    return parse_json(read_input(path), os.path.basename(path))


# ---------------------------------------------------------------------------------------------
# Safetensors
# ---------------------------------------------------------------------------------------------

class SafetensorsFile:
    """One .safetensors file: validated header; tensor data read a chunk at a time."""

    def __init__(self, path):
        self.path = path
        self.name = os.path.basename(path)
        self.fd = open_input(path)
        try:
            self.file_size = os.fstat(self.fd).st_size
            self.tensors = self._read_header()
        except BaseException:
            os.close(self.fd)
            raise

    def _read_header(self):
        if self.file_size < 8:
            raise ExportError(f"{self.name}: file too short ({self.file_size} bytes) to be safetensors")
        length = bytearray(8)
        read_exactly(self.fd, length, 0, self.path)
        (header_len,) = struct.unpack("<Q", length)
        if header_len > self.file_size - 8:
            raise ExportError(f"{self.name}: header length {header_len} runs past the end of the "
                              f"file ({self.file_size} bytes)")
        if header_len > MAX_SAFETENSORS_HEADER:
            raise ExportError(f"{self.name}: header length {header_len} is over the limit of "
                              f"{MAX_SAFETENSORS_HEADER} bytes")
        raw = bytearray(header_len)
        read_exactly(self.fd, raw, 8, self.path)
        header = parse_json(bytes(raw), f"{self.name} header")
        if not isinstance(header, dict):
            raise ExportError(f"{self.name}: malformed header (not a JSON object)")
        self.data_start = 8 + header_len
        data_len = self.file_size - self.data_start
        tensors = {}  # parse_json refused duplicate names
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            tensors[name] = self._check_entry(name, entry, data_len)
        self._check_overlaps(tensors)
        return tensors

    def _check_entry(self, name, entry, data_len):
        """Returns (dtype, shape, begin, end) with begin/end relative to the data section."""
        where = f"{self.name}: tensor {shown(name)}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise ExportError(f"{where}: malformed header entry (needs dtype, shape, data_offsets)")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_SIZES:
            raise ExportError(f"{where}: unknown dtype {shown(dtype)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise ExportError(f"{where}: malformed shape {shown(shape)}")
        if len(shape) > MAX_DIMS:  # the product of a million dimensions would take minutes
            raise ExportError(f"{where}: shape has {len(shape)} dimensions (at most {MAX_DIMS})")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_int(o) for o in offsets)):
            raise ExportError(f"{where}: malformed data_offsets {shown(offsets)}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise ExportError(f"{where}: invalid data_offsets {offsets}")
        if end > data_len:
            raise ExportError(f"{where}: data_offsets {offsets} out of range: the data section "
                              f"has {data_len} bytes (file truncated?)")
        expected = math.prod(shape) * SAFETENSORS_DTYPE_SIZES[dtype]
        if end - begin != expected:
            raise ExportError(f"{where}: data_offsets {offsets} span {end - begin} bytes but "
                              f"{dtype} {shown(shape)} needs {expected}")
        return dtype, tuple(shape), begin, end

    def _check_overlaps(self, tensors):
        spans = sorted((begin, end, name) for name, (_, _, begin, end) in tensors.items()
                       if end > begin)
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise ExportError(f"{self.name}: tensors {shown(n0)} and {shown(n1)} overlap "
                                  f"(bytes {b0}..{e0} and {b1}..{e1})")

    def elements(self, name, start, count):
        """Elements [start, start+count) of a tensor's row-major data, as a numpy array in the
        source's raw storage dtype (BF16 as uint16). Read, not mapped: a file that shrinks while
        we read it is then an error, not a SIGBUS."""
        dtype, _, begin, _ = self.tensors[name]
        item = SOURCE_DTYPES[dtype]
        out = np.empty(count, dtype=item)
        read_exactly(self.fd, out.view(np.uint8), self.data_start + begin + start * item.itemsize, self.path)
        return out

    def close(self):
        os.close(self.fd)


class Checkpoint:
    """The tensors of a Hugging Face folder: model.safetensors, or the shards listed by
    model.safetensors.index.json (the single file wins when both exist, as in transformers)."""

    def __init__(self, model_dir):
        single = os.path.join(model_dir, "model.safetensors")
        index = os.path.join(model_dir, "model.safetensors.index.json")
        self.files = {}
        self.where = {}  # tensor name -> SafetensorsFile
        self.index = None
        try:
            if os.path.lexists(single):
                f = self._open(single)
                self.where = {name: f for name in f.tensors}
            elif os.path.lexists(index):
                self.index = index
                self._open_sharded(model_dir, index)
            else:
                raise ExportError(f"{model_dir}: no model.safetensors or model.safetensors.index.json"
                                  " (export.py reads Hugging Face safetensors checkpoints)")
        except BaseException:
            self.close()
            raise

    def _open(self, path):
        if path not in self.files:
            self.files[path] = SafetensorsFile(path)
        return self.files[path]

    def _open_sharded(self, model_dir, index_path):
        index_name = os.path.basename(index_path)
        index = load_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ExportError(f"{index_name}: no valid weight_map")
        for shard in sorted(set(weight_map.values())):
            if os.path.basename(shard) != shard or shard in ("", ".", ".."):
                raise ExportError(f"{index_name}: shard name {shown(shard)} is not a plain file name")
            path = os.path.join(model_dir, shard)
            if not os.path.lexists(path):
                raise ExportError(f"missing shard {shard} (listed in {index_name})")
            self._open(path)
        holder = {}  # a tensor in two shards is a duplicate name, as within one header
        for f in self.files.values():
            for name in f.tensors:
                if name in holder:
                    raise ExportError(f"tensor {shown(name)} is in both {holder[name]} and {f.name}")
                holder[name] = f.name
        for name, shard in weight_map.items():
            f = self.files[os.path.join(model_dir, shard)]
            if name not in f.tensors:
                raise ExportError(f"tensor {shown(name)} is listed in the index for {shard} but "
                                  f"{shard} does not contain it")
            self.where[name] = f

    def paths(self):
        """Every file read: the safetensors files and the index."""
        return list(self.files) + ([self.index] if self.index else [])

    def info(self, name):
        """(dtype, shape) of a tensor."""
        dtype, shape, _, _ = self.where[name].tensors[name]
        return dtype, shape

    def close(self):
        for f in self.files.values():
            f.close()
        self.files = {}


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------

# The bounds of run.c's parse_header on each integer field (far beyond any Llama 3 model; they
# keep every size product far from overflow), with the config.json key that gives it.
HEADER_INTS = (  # (field, config.json key, smallest, largest)
    ("dim", "hidden_size", 1, 1 << 20),
    ("hidden_dim", "intermediate_size", 1, 1 << 20),
    ("n_layers", "num_hidden_layers", 1, 1024),
    ("n_heads", "num_attention_heads", 1, 4096),
    ("n_kv_heads", "num_key_value_heads", 1, 4096),
    ("head_dim", "head_dim", 1, 4096),
    ("vocab_size", "vocab_size", 1, 1 << 22),
    ("max_seq_len", "max_position_embeddings", 1, 1 << 24),
)
MAX_Q_DIM = 1 << 20  # run.c: n_heads * head_dim


def config_int(source, key, low, high, where="config.json"):
    """An integer field of config.json within run.c's bounds [low, high]."""
    value = source.get(key)
    if value is None:
        raise ExportError(f"{where}: missing field {key}")
    if not _is_int(value):
        raise ExportError(f"{where}: {key} = {shown(value)} is not an integer")
    if not low <= value <= high:
        raise ExportError(f"{where}: {key} = {shown(value)} is out of range (llama3.c accepts "
                          f"{low}..{high})")
    return value


def config_float32(source, key, accept, rule, where="config.json"):
    """A number field of config.json as the header stores it (float32), which must satisfy
    accept(); rule says in words what run.c requires."""
    value = source.get(key)
    if value is None:
        raise ExportError(f"{where}: missing field {key}")
    if not _is_number(value):
        raise ExportError(f"{where}: {key} = {shown(value)} is not a number")
    try:
        stored = struct.unpack("<f", struct.pack("<f", float(value)))[0]
    except OverflowError:
        raise ExportError(f"{where}: {key} = {shown(value)} does not fit a float32")
    if not accept(stored):
        raise ExportError(f"{where}: {key} = {shown(value)}: {rule}"
                          + (f" (it is {stored!r} as a float32)" if stored != float(value)
                             and not math.isnan(stored) else ""))
    return stored


def read_config(model_dir):
    """Reads config.json and checks it as run.c will check the header made from it; returns
    the header's fields (MODEL_HEADER's names) but the weight type and group size."""
    cfg = load_json(os.path.join(model_dir, "config.json"))
    if not isinstance(cfg, dict):
        raise ExportError("config.json: not a JSON object")
    check_architecture(cfg)
    cfg = dict(cfg)
    if cfg.get("num_key_value_heads") is None:
        cfg["num_key_value_heads"] = cfg.get("num_attention_heads")
    heads, size = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    if cfg.get("head_dim") is None and _is_int(heads) and _is_int(size) and heads > 0:
        if size % heads:
            raise ExportError("config.json: no head_dim and hidden_size is not a multiple of "
                              "num_attention_heads")
        cfg["head_dim"] = size // heads
    c = {field: config_int(cfg, key, low, high) for field, key, low, high in HEADER_INTS}
    if c["n_kv_heads"] > c["n_heads"] or c["n_heads"] % c["n_kv_heads"]:
        raise ExportError(f"config.json: num_attention_heads {c['n_heads']} is not a multiple of "
                          f"num_key_value_heads {c['n_kv_heads']}")
    if c["head_dim"] % 2:
        raise ExportError(f"config.json: head_dim {c['head_dim']} must be even (RoPE pairs)")
    if c["n_heads"] * c["head_dim"] > MAX_Q_DIM:
        raise ExportError(f"config.json: num_attention_heads * head_dim = "
                          f"{c['n_heads'] * c['head_dim']} is over llama3.c's limit {MAX_Q_DIM}")
    c["rope_theta"] = config_float32(cfg, "rope_theta", lambda x: 1 < x < math.inf,
                                     "must be finite and above 1")
    c["norm_eps"] = config_float32(cfg, "rms_norm_eps", lambda x: 0 < x < 1,
                                   "must be above 0 and below 1")
    tied = cfg.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise ExportError(f"config.json: tie_word_embeddings = {shown(tied)} is not true/false")
    c["tied_classifier"] = int(tied)
    c.update(read_rope_scaling(cfg.get("rope_scaling")))
    c["bos_id"], c["eos_ids"] = read_special_ids(cfg, c["vocab_size"])
    c["n_eos"] = len(c["eos_ids"])
    return c


def check_architecture(cfg):
    """Only plain Llama is accepted: options that change the computation are refused."""
    arch = cfg.get("architectures")
    model_type = cfg.get("model_type")
    if arch is None and model_type is None:
        raise ExportError("config.json: no architectures or model_type: cannot tell the architecture")
    if arch is not None and arch != ["LlamaForCausalLM"]:
        raise ExportError(f"config.json: unsupported architectures {shown(arch)} (need [\"LlamaForCausalLM\"])")
    if model_type is not None and model_type != "llama":
        raise ExportError(f"config.json: unsupported model_type {shown(model_type)} (need llama)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ExportError(f"config.json: unsupported hidden_act {shown(cfg['hidden_act'])} (need silu)")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key) not in (None, False):
            raise ExportError(f"config.json: {key} = {shown(cfg[key])} is not supported (need false)")
    if cfg.get("pretraining_tp", 1) != 1:
        raise ExportError("config.json: pretraining_tp other than 1 is not supported")


def read_rope_scaling(scaling):
    """Header fields for rope_scaling: none (null / "default") or llama3 with all four values,
    as run.c accepts them: factor >= 1, 0 < low_freq_factor < high_freq_factor, all finite."""
    none = {"rope_scaling": 0, "rope_factor": 1.0, "rope_low_freq_factor": 1.0,
            "rope_high_freq_factor": 4.0, "rope_original_max_pos": 8192}
    if scaling is None:
        return none
    if not isinstance(scaling, dict):
        raise ExportError(f"config.json: rope_scaling {shown(scaling)} is not an object")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return none
    if kind != "llama3":
        raise ExportError(f"config.json: unsupported rope_scaling type {shown(kind)} "
                          "(supported: null, llama3)")
    where = "config.json: rope_scaling"

    def number(key, accept, rule):
        return config_float32(scaling, key, accept, rule, where)
    factor = number("factor", lambda x: 1 <= x < math.inf, "must be finite and at least 1")
    low = number("low_freq_factor", lambda x: 0 < x < math.inf, "must be finite and above 0")
    high = number("high_freq_factor", lambda x: low < x < math.inf,
                  f"must be finite and above low_freq_factor {low}")
    original = config_int(scaling, "original_max_position_embeddings", 1, 2**31 - 1, where)
    return {"rope_scaling": 1, "rope_factor": factor, "rope_low_freq_factor": low,
            "rope_high_freq_factor": high, "rope_original_max_pos": original}


def read_special_ids(cfg, vocab_size):
    """bos_token_id and eos_token_id (one id or a list of 1..MAX_EOS), ids in the vocabulary."""
    def token_id(key, value):
        if not _is_int(value) or not 0 <= value < vocab_size:
            raise ExportError(f"config.json: {key} {shown(value)} is not a token id in 0..{vocab_size - 1}")
        return value
    bos = cfg.get("bos_token_id")
    eos = cfg.get("eos_token_id")
    if bos is None:
        raise ExportError("config.json: missing field bos_token_id")
    if eos is None:
        raise ExportError("config.json: missing field eos_token_id")
    eos_list = eos if isinstance(eos, list) else [eos]
    if not 1 <= len(eos_list) <= MAX_EOS:
        raise ExportError(f"config.json: eos_token_id needs 1..{MAX_EOS} ids, has {len(eos_list)}")
    return token_id("bos_token_id", bos), [token_id("eos_token_id", v) for v in eos_list]


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
    if not c["tied_classifier"]:
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
    if c["tied_classifier"] and "lm_head.weight" in ignored:
        note("note: tie_word_embeddings is true: lm_head.weight ignored, the classifier is the embedding")
        ignored.remove("lm_head.weight")
    if ignored:
        note(f"note: {len(ignored)} tensor(s) not used: {', '.join(ignored[:4])}"
             + (" ..." if len(ignored) > 4 else ""))


def pack_header(fields):
    """The 256-byte header from {MODEL_HEADER field: value}; eos_ids may be short (the unused
    slots are -1), magic and version may be left out."""
    fields = dict({"magic": MAGIC_MODEL, "version": FORMAT_VERSION}, **fields)
    fields["eos_ids"] = list(fields["eos_ids"]) + [-1] * (MAX_EOS - len(fields["eos_ids"]))
    head = bytearray(HEADER_BYTES)
    for name, (offset, fmt) in HEADER_LAYOUT.items():
        value = fields[name]
        struct.pack_into(fmt, head, offset, *(value if isinstance(value, list) else [value]))
    return bytes(head)


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


def refuse_nonfinite(name, shape, start, x, bad=None, why="is not finite"):
    """The one policy for weights that are not finite, whatever --dtype: the export is refused,
    naming the tensor and its first bad element. x: float32 elements start.. of the tensor;
    bad: where they are bad (default: not finite)."""
    bad = ~np.isfinite(x) if bad is None else bad
    if bad.any():
        i = int(np.argmax(bad))
        where = ", ".join(str(int(k)) for k in np.unravel_index(start + i, shape))
        raise ExportError(f"tensor {name}: weight [{where}] = {float(x[i])} {why}: every --dtype "
                          f"refuses weights that are not finite")


def quantize_q8_0(x, group_size):
    """float32 [n] -> (int8 q [n], float32 scales [n/group_size]) as docs/formats.md defines."""
    groups = x.reshape(-1, group_size)
    scale = (np.abs(groups).max(axis=1) / np.float32(127)).astype(np.float32)
    safe = np.where(scale == 0, np.float32(1), scale)
    q = np.rint(groups / safe[:, None])
    np.clip(q, -127, 127, out=q)  # |x| / scale <= 127 already; guards against rounding
    q = q.astype(np.int8)
    return q.reshape(-1), scale


# q4_0's scale search (quantize_q4_0): for each group, scales that put the value of largest
# magnitude at -t (the wide side of [-8, 7]) or +t for these t, besides llama.cpp's Q4_0 choice.
Q4_SEARCH_NEGATIVE = np.arange(6.0, 8.01, 0.25)
Q4_SEARCH_POSITIVE = np.arange(5.5, 7.01, 0.25)
FP16_MAX = 65504.0
Q4_BLOCK_GROUPS = 8192  # groups searched at a time: 1 MB of float32, so each pass stays in L2


def q4_0_like_llama_cpp(groups):
    """llama.cpp's Q4_0 of float32 groups [G, gs]: d = (the value of largest magnitude) / -8,
    stored as fp16; q = min(15, trunc(x / d + 8.5)) - 8 with 1/d from the float32 d. Returns
    (q int8 [G, gs], fp16 scales [G])."""
    rows = np.arange(len(groups))
    extreme = groups[rows, np.abs(groups).argmax(axis=1)]
    d = (extreme / np.float32(-8)).astype(np.float32)
    with np.errstate(over="ignore"):  # an infinite scale: quantize_q4_0 refuses it
        d16 = d.astype(np.float16)
    # q = 0 where the fp16 scale is 0 (subnormal groups, whose 1 / d would overflow)
    inverse = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d16 != 0)
    shifted = groups * inverse[:, None] + np.float32(8.5)
    q = np.minimum(15, shifted.astype(np.int8)) - 8
    return q.astype(np.int8), d16


def rounded_q(groups, scale, out):
    """q = clip(round(x / scale), -8, 7) of groups [G, gs] for fp16 scales [G], as float32 in
    out (0 where x / scale is 0 / 0)."""
    wide = scale.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(groups, wide, out=out)
    np.rint(out, out=out)
    np.minimum(np.maximum(out, -8, out=out), 7, out=out)  # clip, which is slower
    if not wide.all():
        np.nan_to_num(out, copy=False, nan=0.0)
    return out


def group_errors(groups, q, scales, work):
    """Squared error [G] of each group of q (float32 [G, gs]) * scales (fp16, widened exactly)
    against groups; work: a float32 buffer like groups."""
    with np.errstate(invalid="ignore", over="ignore"):
        np.multiply(q, scales.astype(np.float32)[:, None], out=work)
    np.subtract(work, groups, out=work)
    return np.einsum("gi,gi->g", work, work, dtype=np.float64)


def search_q4_0(groups):
    """quantize_q4_0 on groups [G, gs]: (q int8 [G, gs], fp16 scales [G], Q4_0's errors [G])."""
    q4_0_q, best_scale = q4_0_like_llama_cpp(groups)
    if np.isinf(best_scale).any():
        raise ExportError(f"a weight's magnitude exceeds q4_0's range (fp16 scales: at most "
                          f"{8 * FP16_MAX:g})")
    q, work = np.empty_like(groups), np.empty_like(groups)
    q4_0_err = best_err = group_errors(groups, q4_0_q.astype(np.float32), best_scale, work)
    from_q4_0 = np.ones(len(groups), dtype=bool)  # the best is still Q4_0's choice
    rows = np.arange(len(groups))
    extreme = groups[rows, np.abs(groups).argmax(axis=1)]

    def consider(scale):
        nonlocal best_scale, best_err, from_q4_0
        with np.errstate(over="ignore"):
            scale = scale.astype(np.float16)  # inf where it overflows: never chosen
        err = group_errors(groups, rounded_q(groups, scale, q), scale, work)
        better = err < best_err
        best_scale = np.where(better, scale, best_scale)
        best_err = np.where(better, err, best_err)
        from_q4_0 &= ~better

    def best_q():
        rounded_q(groups, best_scale, q)
        q[from_q4_0] = q4_0_q[from_q4_0]
        return q

    for t in Q4_SEARCH_NEGATIVE:
        consider(extreme / np.float32(-t))
    for t in Q4_SEARCH_POSITIVE:
        consider(extreme / np.float32(t))
    qf = best_q().astype(np.float64)
    norm = np.einsum("gi,gi->g", qf, qf)
    with np.errstate(divide="ignore", invalid="ignore"):
        least_squares = np.einsum("gi,gi->g", qf, groups) / norm
    consider(np.where(norm > 0, least_squares, 0).astype(np.float32))
    return best_q().astype(np.int8), best_scale, q4_0_err


def quantize_q4_0(x, group_size):
    """float32 [n] -> (int8 q [n] in [-8, 7], fp16 scales [n/group_size], and llama.cpp's Q4_0
    squared error of x) as docs/formats.md defines: per group the
    candidate (scale, q) of least squared error, q = clip(round(x / scale), -8, 7), among
    llama.cpp's Q4_0 choice, the Q4_SEARCH scales and the least-squares scale of the best q.
    Every group's error, hence every matrix's, is thus at most Q4_0's. Searched Q4_BLOCK_GROUPS
    groups at a time."""
    groups = x.reshape(-1, group_size)  # finite: write_tensor refuses the rest
    q, scales = np.empty(groups.shape, dtype=np.int8), np.empty(len(groups), dtype=np.float16)
    q4_0_err = 0.0
    block = max(1, Q4_BLOCK_GROUPS * 32 // group_size)
    for g in range(0, len(groups), block):
        q[g:g + block], scales[g:g + block], err = search_q4_0(groups[g:g + block])
        q4_0_err += float(err.sum())
    return q.reshape(-1), scales, q4_0_err


def pack_q4_0(q):
    """int8 q [n] in [-8, 7] -> the nibbles q + 8, each 32 values as 16 bytes: byte j holds
    value j in its low nibble and value j + 16 in its high one."""
    u = (q.reshape(-1, 32) + 8).astype(np.uint8)
    return (u[:, :16] | (u[:, 16:] << 4)).reshape(-1)


class OutputFile:
    """Writes the model file, padding each tensor to a 64-byte boundary. The bytes reach the
    file in whole pieces of WRITE_PIECE at offsets that are multiples of it: Linux then keeps
    the fresh file in its page cache as 2 MB folios, which run.c's mapping gets as 2 MB pages
    (writes at odd offsets leave 4 KB folios, and a slower first run; docs/performance.md)."""

    def __init__(self, f):
        self.f = f
        self.pending = bytearray()
        self.size = 0
        self.progress = None  # called with the fraction of the tensor written (TensorProgress)

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
    """Converts one checkpoint tensor chunk by chunk; returns a short description for the
    progress line."""
    f = ckpt.where[name]
    dtype, _ = ckpt.info(name)
    pieces = ((f.elements(name, start, count), dtype) for start, count in chunks(shape))
    return write_values(out, pieces, as_matrix, weight_type, group_size, name, shape)


def write_values(out, pieces, as_matrix, weight_type, group_size, name, shape):
    """Writes one tensor of `shape` from pieces (raw source values, their SOURCE_DTYPES name)
    of whole rows, in order; returns a short description for the progress line."""
    kind = weight_type if as_matrix else "fp32"
    out.align()
    scales = []
    max_err = sq_err = sq_ref = sq_err_q4_0 = 0.0
    start, total = 0, math.prod(shape)  # start: the tensor's first element in this piece
    for raw, dtype in pieces:
        here, start = start, start + raw.size
        if out.progress and here:
            out.progress(here / total)  # the pieces before this one
        if kind == "bf16" and dtype == "BF16":
            if ((raw & np.uint16(0x7F80)) == np.uint16(0x7F80)).any():  # infinity or NaN
                refuse_nonfinite(name, shape, here, to_f32(raw, dtype))
            out.write(raw)  # exact copy of the stored bits
            continue
        x = to_f32(raw, dtype)
        refuse_nonfinite(name, shape, here, x)
        if kind == "fp32":
            out.write(x)
        elif kind == "bf16":
            bits = f32_to_bf16(x)
            refuse_nonfinite(name, shape, here, x, (bits & np.uint16(0x7F80)) == np.uint16(0x7F80),
                             "rounds to infinity in bf16")
            out.write(bits)
        else:
            if kind == "q8_0":
                q, scale = quantize_q8_0(x, group_size)
                out.write(q)
            else:
                try:
                    q, scale, q4_0_err = quantize_q4_0(x, group_size)
                except ExportError as e:
                    raise ExportError(f"tensor {name}: {e}") from None
                out.write(pack_q4_0(q))
                sq_err_q4_0 += q4_0_err
            scales.append(scale)
            err = (q.reshape(-1, group_size).astype(np.float32) *
                   scale.astype(np.float32)[:, None]).reshape(-1) - x
            max_err = max(max_err, float(np.abs(err).max(initial=0)))
            sq_err += float(np.einsum("i,i->", err, err, dtype=np.float64))
            sq_ref += float(np.einsum("i,i->", x, x, dtype=np.float64))
        del raw
    if kind not in ("q8_0", "q4_0"):
        return kind
    out.align()
    for scale in scales:
        out.write(scale)
    rel = math.sqrt(sq_err / sq_ref) if sq_ref > 0 else 0.0
    what = f"{kind}  max abs err {max_err:.3g}  rms rel err {rel:.3g}"
    if kind == "q4_0":  # beside llama.cpp's Q4_0 of the same tensor, never smaller
        rel_q4_0 = math.sqrt(sq_err_q4_0 / sq_ref) if sq_ref > 0 else 0.0
        what += f"  (llama.cpp Q4_0: {rel_q4_0:.3g})"
    return what


def expected_size(plan, weight_type, group_size):
    """File size implied by the format (docs/formats.md): checked after writing."""
    pos = HEADER_BYTES
    for _, shape, is_matrix in plan:
        n = math.prod(shape)
        pos += -pos % ALIGN
        if not is_matrix or weight_type == "fp32":
            pos += 4 * n
        elif weight_type == "bf16":
            pos += 2 * n
        elif weight_type == "q8_0":
            pos += n
            pos += -pos % ALIGN
            pos += 4 * (n // group_size)
        else:
            pos += n // 2
            pos += -pos % ALIGN
            pos += 2 * (n // group_size)
    return pos


class TensorProgress:
    """On a terminal, how much of a tensor is written, on the line its progress line then
    replaces: a large tensor (the embedding in q4_0: about 40 s at 1B) is not a silent
    stretch. Elsewhere (a log, a pipe) nothing: one line per tensor."""

    def __init__(self, label):
        self.label = label
        self.shown = False
        try:
            self.terminal = sys.stdout.isatty()
        except (OSError, ValueError):
            self.terminal = False

    def __call__(self, fraction):
        if self.terminal and fraction < 1:
            self.shown = self._write(f"\r{self.label}{100 * fraction:3.0f}%")

    def clear(self):
        if self.shown:
            self._write("\r\033[K")

    @staticmethod
    def _write(text):
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
            return True
        except OSError:  # progress is only information (see note)
            return False


def write_model(f, c, plan, weight_type, group_size, write_one):
    """Writes the model file to the open binary file f; returns its size. write_one(out, name,
    shape, is_matrix) writes a tensor and returns (its source type, a description)."""
    out = OutputFile(f)
    out.write(pack_header(dict(c, weight_type=WEIGHT_TYPES[weight_type], group_size=group_size)))
    for i, (name, shape, is_matrix) in enumerate(plan):
        out.progress = TensorProgress(f"[{i + 1:4d}/{len(plan)}] {name:48s} ")
        dtype, what = write_one(out, name, shape, is_matrix)
        out.progress.clear()
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
            raise ExportError(f"{name}: vocab ids are not 0..{len(vocab) - 1} "
                              f"({shown(text)} has id {shown(idx)})")
        if regular[idx] is not None:
            raise ExportError(f"{name}: duplicate vocab id {idx}")
        try:
            regular[idx] = bytes(to_byte[ch] for ch in text)
        except KeyError as e:
            raise ExportError(f"{name}: vocab entry {shown(text)} is not byte-level BPE (character {e})")
    merges = model.get("merges", [])
    if not isinstance(merges, list):
        raise ExportError(f"{name}: merges {shown(merges)} is not a list")
    check_merge_order(name, merges, vocab)
    if model.get("ignore_merges") is not True:
        note(f"note: {name} lacks ignore_merges: true; llama3.c encodes like tiktoken (as if it were set)")
    return regular, added_specials(name, tok.get("added_tokens"), regular)


def added_specials(name, added, regular):
    """The special texts in id order from tokenizer.json's added_tokens, whose ids must follow
    the regular ones without a gap (added tokens that repeat a regular token are skipped)."""
    if added is None:
        added = []
    if not isinstance(added, list):
        raise ExportError(f"{name}: added_tokens {shown(added)} is not a list")
    specials = {}  # keyed by ids checked to be below len(regular) + len(added): no hash flooding
    for entry in added:
        idx, text = (entry.get("id"), entry.get("content")) if isinstance(entry, dict) else (None, None)
        if not _is_int(idx) or not isinstance(text, str):
            raise ExportError(f"{name}: malformed added_tokens entry {shown(entry)}")
        if not 0 <= idx < len(regular) + len(added):
            raise ExportError(f"{name}: added token id {shown(idx, 20)} is out of range "
                              f"(ids are 0..{len(regular) + len(added) - 1})")
        if 0 <= idx < len(regular):
            if text.encode("utf-8") != regular[idx]:
                raise ExportError(f"{name}: added token {shown(text)} reuses regular id {idx}")
            continue
        if idx in specials:
            raise ExportError(f"{name}: duplicate added token id {idx}")
        specials[idx] = text
    ids = sorted(specials)
    if ids != list(range(len(regular), len(regular) + len(ids))):
        raise ExportError(f"{name}: special token ids are not contiguous from {len(regular)}")
    return [specials[i] for i in ids]


def check_merge_order(name, merges, vocab):
    """The .tok format takes the id as the merge priority: the merges must agree (each merge's
    result id never smaller than the previous one's), as they do for Llama 3. A merge is
    "left right" or ["left", "right"]."""
    prev = -1
    for k, merge in enumerate(merges):
        if isinstance(merge, str):
            pair = merge.split(" ")
        else:
            pair = merge if isinstance(merge, list) and all(isinstance(s, str) for s in merge) else []
        if len(pair) != 2 or "".join(pair) not in vocab:
            raise ExportError(f"{name}: malformed merge #{k}: {shown(merge)}")
        idx = vocab["".join(pair)]
        if idx < prev:
            raise ExportError(f"{name}: merge #{k} {shown(merge)} is out of id order: llama3.c "
                              "needs merge priority = token id")
        prev = idx


def tokenizer_from_tiktoken(path):
    """Regular token bytes in rank order from a tiktoken file: lines "base64 rank", the ranks
    0..n-1 for n lines. (Ranks index a list, never a dict: integers that collide in Python's
    hash would make a dict quadratic.)"""
    name = os.path.basename(path)
    lines = [(lineno, line) for lineno, line in enumerate(read_input(path).splitlines(), 1)
             if line.strip()]
    if not lines:
        raise ExportError(f"{name}: no tokens")
    by_rank, seen = [None] * len(lines), {}
    for lineno, line in lines:
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
        if not 0 <= rank < len(lines):
            raise ExportError(f"{name}:{lineno}: rank {shown(rank, 20)} is out of range: "
                              f"{len(lines)} tokens have the ranks 0..{len(lines) - 1}")
        if by_rank[rank] is not None:
            raise ExportError(f"{name}:{lineno}: duplicate rank {rank}")
        if token in seen:
            raise ExportError(f"{name}:{lineno}: duplicate token {token!r} (also rank {seen[token]})")
        if not token:
            raise ExportError(f"{name}:{lineno}: empty token")
        by_rank[rank] = token
        seen[token] = rank
    return by_rank  # n distinct ranks in 0..n-1: every one is there


def check_tokenizer(name, regular, specials):
    """tokenizer.c's checks on loading a .tok, so that every file written loads: no empty
    token, no two regular (or two special) tokens alike, a regular token for every single
    byte, and at most 4 GiB."""
    special_bytes = [s.encode("utf-8") for s in specials]
    for kind, tokens, first_id in (("regular", regular, 0), ("special", special_bytes, len(regular))):
        if not all(tokens):
            raise ExportError(f"{name}: {kind} token {first_id + tokens.index(b'')} is empty")
        if len(set(tokens)) != len(tokens):
            raise ExportError(f"{name}: two {kind} tokens are the same bytes")
    singles = {t for t in regular if len(t) == 1}
    missing = [b for b in range(256) if bytes([b]) not in singles]
    if missing:
        raise ExportError(f"{name}: no regular token for the single byte 0x{missing[0]:02X} "
                          f"({len(missing)} byte(s) missing): llama3.c needs all 256")
    if 16 + sum(4 + len(t) for t in regular + special_bytes) > 0xFFFFFFFF:
        raise ExportError(f"{name}: the tokenizer file would exceed 4 GiB")


def pack_tokenizer(regular, specials):
    parts = [struct.pack("<4sIII", MAGIC_TOKENIZER, FORMAT_VERSION,
                         len(regular) + len(specials), len(specials))]
    for token in regular + [s.encode("utf-8") for s in specials]:
        parts.append(struct.pack("<I", len(token)))
        parts.append(token)
    return b"".join(parts)


def build_tokenizer(path, layout, default_layout):
    """The .tok bytes from tokenizer.json (specials from its added_tokens, unless --specials
    names a layout or it has none) or from a tiktoken tokenizer.model (specials from a layout).
    layout: --specials or None; default_layout(): the layout when one is needed and not given."""
    name = os.path.basename(path)
    if path.endswith(".json"):
        regular, specials = tokenizer_from_json(path)
        if layout or not specials:  # no added tokens: a layout supplies them
            wanted = special_texts(layout or default_layout())
            if specials and specials != wanted:
                note(f"note: special tokens replaced by the {layout} layout (--specials)")
            specials = wanted
    else:
        regular = tokenizer_from_tiktoken(path)
        specials = special_texts(layout or default_layout())
    check_tokenizer(name, regular, specials)
    if "<|begin_of_text|>" not in specials:
        note(f"note: {name} has no <|begin_of_text|>: run can take prompts only as token ids (-I)")
    if (len(regular), len(specials)) != (N_REGULAR_LLAMA3, N_SPECIAL_LLAMA3):
        note(f"note: tokenizer has {len(regular)} regular and {len(specials)} special tokens "
             f"(Llama 3: {N_REGULAR_LLAMA3} and {N_SPECIAL_LLAMA3})")
    note(f"tokenizer: {name}: {len(regular)} regular + {len(specials)} special tokens")
    return pack_tokenizer(regular, specials)


def tokenizer_candidates(model_dir):
    """The tokenizer files of a model folder, in order of preference: tokenizer.json first (it
    carries the model's own special names), then tiktoken files."""
    paths = [os.path.join(model_dir, rel) for rel in
             ("tokenizer.json", os.path.join("original", "tokenizer.model"), "tokenizer.model")]
    return [path for path in paths if os.path.lexists(path)]


def find_tokenizer(model_dir):
    """The preferred tokenizer file of a model folder, or None. A name that exists but is not a
    regular file is returned too, to be refused when read."""
    candidates = tokenizer_candidates(model_dir)
    return candidates[0] if candidates else None


def default_tokenizer_path(model_out):
    base = model_out[:-4] if model_out.endswith(".bin") else model_out
    return base + ".tok"


# ---------------------------------------------------------------------------------------------
# GGUF (llama.cpp's format): --gguf
# ---------------------------------------------------------------------------------------------

# A GGUF file, little-endian: magic "GGUF", u32 version (2 or 3), u64 tensor count, u64
# metadata count; the metadata (key string, u32 value type, value); the tensor infos (name
# string, u32 n_dims, u64 dims innermost first, u32 ggml type, u64 offset into the data); then,
# at the next multiple of general.alignment (32 by default), the tensor data. Strings are a u64
# length and UTF-8 bytes. Every count and length is checked against the bytes left in the file
# before anything is allocated for it.
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
GGUF_DEFAULT_ALIGNMENT = 32
GGUF_MAX_DIMS = 4  # ggml's
GGUF_MAX_TENSORS = 1 << 16  # an 8B model has 292; a 405B 1138
GGUF_MAX_KEYS = 1 << 16
GGUF_MAX_STRING = MAX_TEXT_INPUT
GGUF_MAX_STRINGS = 1 << 22  # strings in one array: Llama 3 has 280147 merges
GGUF_READ_AHEAD = 1 << 20  # bytes read at a time while parsing the metadata
GGUF_STRING, GGUF_ARRAY = 8, 9
GGUF_SCALARS = {0: np.dtype("<u1"), 1: np.dtype("<i1"), 2: np.dtype("<u2"), 3: np.dtype("<i2"),
                4: np.dtype("<u4"), 5: np.dtype("<i4"), 6: np.dtype("<f4"), 7: np.dtype("<u1"),
                10: np.dtype("<u8"), 11: np.dtype("<i8"), 12: np.dtype("<f8")}
GGUF_BOOL = 7
# ggml tensor types: code -> (name, values per block, bytes per block). Every type is listed so
# that the offsets of every tensor can be checked, and a type we cannot convert be named.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
}
GGML_BY_NAME = {name: (block, block_bytes) for name, block, block_bytes in GGML_TYPES.values()}
# tokenizer.ggml.token_type values
GGUF_TOKEN_NORMAL, GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED = 1, 3, 4
# tokenizer.ggml.pre names llama.cpp gives Llama 3's pre-tokenizer (split pattern)
GGUF_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")


class GGUFCursor:
    """Reads the metadata and tensor infos front to back through a read-ahead buffer; every
    read is checked against the file's size first."""

    def __init__(self, fd, size, name, path):
        self.fd, self.size, self.name, self.path = fd, size, name, path
        self.pos = 0
        self.buffer, self.buffer_start = b"", 0

    def take(self, n, what):
        """The next n bytes; what names them in the error when the file has fewer left."""
        if n > self.size - self.pos:
            raise ExportError(f"{self.name}: {what} at byte {self.pos} needs {n} bytes but the "
                              f"file has {self.size - self.pos} left (truncated?)")
        start = self.pos - self.buffer_start
        if start + n > len(self.buffer):
            length = min(max(n, GGUF_READ_AHEAD), self.size - self.pos)
            buffer = bytearray(length)
            read_exactly(self.fd, buffer, self.pos, self.path)
            self.buffer, self.buffer_start, start = bytes(buffer), self.pos, 0
        self.pos += n
        return self.buffer[start:start + n]

    def u32(self, what):
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what):
        return struct.unpack("<Q", self.take(8, what))[0]

    def count(self, what, least_bytes, limit):
        """A u64 count of items of at least least_bytes each: within limit and the file."""
        n = self.u64(what)
        if n > limit:
            raise ExportError(f"{self.name}: {what} {n} is over the limit of {limit}")
        if n * least_bytes > self.size - self.pos:
            raise ExportError(f"{self.name}: {what} {n} runs past the end of the file "
                              f"({self.size - self.pos} bytes left; truncated?)")
        return n

    def string(self, what):
        n = self.u64(f"the length of {what}")
        if n > self.size - self.pos:
            raise ExportError(f"{self.name}: {what}: string length {n} runs past the end of the "
                              f"file ({self.size - self.pos} bytes left; truncated?)")
        if n > GGUF_MAX_STRING:
            raise ExportError(f"{self.name}: {what}: string length {n} is over the limit of "
                              f"{GGUF_MAX_STRING} bytes")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ExportError(f"{self.name}: {what} is not UTF-8: {shown(raw, 40)}")

    def value(self, kind, key):
        """A metadata value of type kind: int, float or bool scalars as Python values, strings
        as str, arrays of numbers as numpy arrays, arrays of strings as lists."""
        if kind == GGUF_STRING:
            return self.string(f"the value of {shown(key)}")
        if kind == GGUF_ARRAY:
            item = self.u32(f"the array type of {shown(key)}")
            if item == GGUF_ARRAY:
                raise ExportError(f"{self.name}: {shown(key)} is an array of arrays (not supported)")
            if item == GGUF_STRING:
                n = self.count(f"the string count of {shown(key)}", 8, GGUF_MAX_STRINGS)
                return [self.string(f"string {i} of {shown(key)}") for i in range(n)]
            if item not in GGUF_SCALARS:
                raise ExportError(f"{self.name}: {shown(key)} is an array of unknown type {item}")
            dtype = GGUF_SCALARS[item]
            n = self.count(f"the element count of {shown(key)}", dtype.itemsize, 1 << 40)
            return np.frombuffer(self.take(n * dtype.itemsize, f"the array {shown(key)}"), dtype)
        if kind not in GGUF_SCALARS:
            raise ExportError(f"{self.name}: {shown(key)} has unknown value type {kind}")
        raw = np.frombuffer(self.take(GGUF_SCALARS[kind].itemsize, f"the value of {shown(key)}"),
                            GGUF_SCALARS[kind])[0]
        return bool(raw) if kind == GGUF_BOOL else raw.item()


class GGUFFile:
    """One GGUF file: its metadata {key: value}, its tensors {name: (type, shape, offset,
    bytes)} with shape in numpy order ([rows, row length]), and their data read by rows."""

    def __init__(self, path):
        self.path, self.name = path, os.path.basename(path)
        self.fd = open_input(path)
        try:
            self.file_size = os.fstat(self.fd).st_size
            cursor = GGUFCursor(self.fd, self.file_size, self.name, path)
            n_tensors, n_keys = self._read_start(cursor)
            self.meta = self._read_metadata(cursor, n_keys)
            self.alignment = self._alignment()
            infos = [self._read_tensor_info(cursor, i) for i in range(n_tensors)]
            self.data_start = cursor.pos + -cursor.pos % self.alignment
            if not infos:  # a vocabulary-only file may end before the padding
                self.data_start = min(self.data_start, self.file_size)
            if self.data_start > self.file_size:
                raise ExportError(f"{self.name}: the tensor data would start at byte "
                                  f"{self.data_start}, past the end of the file (truncated?)")
            self.tensors = self._check_tensors(infos)
        except BaseException:
            os.close(self.fd)
            raise

    def _read_start(self, cursor):
        if self.file_size < 4 or cursor.take(4, "the magic") != GGUF_MAGIC:
            raise ExportError(f"{self.name}: not a GGUF file (no GGUF magic)")
        version = cursor.u32("the version")
        if version == 1:
            raise ExportError(f"{self.name}: GGUF version 1 (llama.cpp before August 2023) is "
                              "not supported: convert it again with a newer llama.cpp")
        if version not in GGUF_VERSIONS:
            hint = " (a big-endian GGUF?)" if version > 0xFFFF else ""
            raise ExportError(f"{self.name}: unsupported GGUF version {version}{hint}: "
                              "export.py reads versions 2 and 3")
        # a tensor info takes at least 28 bytes, a metadata entry at least 12
        n_tensors = cursor.count("the tensor count", 28, GGUF_MAX_TENSORS)
        n_keys = cursor.count("the metadata count", 12, GGUF_MAX_KEYS)
        return n_tensors, n_keys

    def _read_metadata(self, cursor, n_keys):
        meta = {}
        for i in range(n_keys):
            key = cursor.string(f"metadata key {i}")
            kind = cursor.u32(f"the value type of {shown(key)}")
            if key in meta:
                raise ExportError(f"{self.name}: duplicate metadata key {shown(key)}")
            meta[key] = cursor.value(kind, key)
        return meta

    def _alignment(self):
        alignment = self.meta.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if not _is_int(alignment) or alignment <= 0 or alignment & (alignment - 1):
            raise ExportError(f"{self.name}: general.alignment {shown(alignment)} is not a "
                              "power of two")
        return alignment

    def _read_tensor_info(self, cursor, i):
        name = cursor.string(f"the name of tensor {i}")
        where = f"tensor {shown(name)}"
        n_dims = cursor.u32(f"the dimension count of {where}")
        if not 1 <= n_dims <= GGUF_MAX_DIMS:
            raise ExportError(f"{self.name}: {where} has {n_dims} dimensions (1..{GGUF_MAX_DIMS})")
        dims = [cursor.u64(f"the dimensions of {where}") for _ in range(n_dims)]
        kind = cursor.u32(f"the type of {where}")
        offset = cursor.u64(f"the offset of {where}")
        return name, dims, kind, offset

    def _check_tensors(self, infos):
        """{name: (type name, numpy shape, offset, bytes)}: known types, whole blocks per row,
        sizes that fit, offsets aligned, inside the data and not overlapping."""
        data_len = self.file_size - self.data_start
        tensors = {}
        for name, dims, kind, offset in infos:
            where = f"{self.name}: tensor {shown(name)}"
            if name in tensors:
                raise ExportError(f"{self.name}: duplicate tensor name {shown(name)}")
            if kind not in GGML_TYPES:
                raise ExportError(f"{where}: unknown ggml type {kind}")
            type_name, block, block_bytes = GGML_TYPES[kind]
            if math.prod(dims) >= 1 << 63:
                raise ExportError(f"{where}: shape {dims} overflows (its product is over 2^63)")
            if dims[0] % block:
                raise ExportError(f"{where}: row length {dims[0]} is not a multiple of "
                                  f"{type_name}'s block of {block}")
            size = math.prod(dims) // block * block_bytes
            if offset % self.alignment:
                raise ExportError(f"{where}: offset {offset} is not a multiple of the "
                                  f"alignment {self.alignment}")
            if offset + size > data_len:
                raise ExportError(f"{where}: bytes {offset}..{offset + size} lie outside the "
                                  f"data ({data_len} bytes; truncated?)")
            tensors[name] = (type_name, tuple(reversed(dims)), offset, size)
        spans = sorted((offset, offset + size, name)
                       for name, (_, _, offset, size) in tensors.items() if size)
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise ExportError(f"{self.name}: tensors {shown(n0)} and {shown(n1)} overlap "
                                  f"(bytes {b0}..{e0} and {b1}..{e1})")
        return tensors

    def row_bytes(self, name):
        type_name, shape, _, _ = self.tensors[name]
        block, block_bytes = GGML_BY_NAME[type_name]
        return shape[-1] // block * block_bytes

    def rows(self, name, first, count):
        """The raw bytes of rows [first, first + count) of a tensor, as uint8 [count, row bytes].
        Read, not mapped: a file that shrinks meanwhile is an error, not a SIGBUS."""
        _, _, offset, _ = self.tensors[name]
        width = self.row_bytes(name)
        out = np.empty((count, width), dtype=np.uint8)
        read_exactly(self.fd, out, self.data_start + offset + first * width, self.path)
        return out

    def close(self):
        os.close(self.fd)


# The GGUF tensor names of this format's tensors (tensor_plan's Hugging Face names)
GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
              "output_norm.weight", "lm_head.weight": "output.weight"}
GGUF_LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
                    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                    "mlp.gate_proj": "ffn_gate", "mlp.down_proj": "ffn_down",
                    "mlp.up_proj": "ffn_up"}
# The header's integer fields from the llama.* metadata (HEADER_INTS gives the bounds)
GGUF_HEADER_INTS = (("dim", "embedding_length"), ("hidden_dim", "feed_forward_length"),
                    ("n_layers", "block_count"), ("n_heads", "attention.head_count"),
                    ("n_kv_heads", "attention.head_count_kv"),
                    ("head_dim", "attention.key_length"), ("max_seq_len", "context_length"))


def gguf_name(hf_name):
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{GGUF_LAYER_NAMES[rest.rsplit('.', 1)[0]]}.weight"


def gguf_config(g):
    """The header fields (read_config's) from a GGUF's llama.* metadata, its tokenizer's size
    and special ids, and its tensors (tied: no output.weight; rope_freqs: gguf_rope_scaling)."""
    meta, where = g.meta, g.name
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ExportError(f"{where}: general.architecture is {shown(arch)}: llama3.c runs "
                          "Llama 3 models (llama) only")
    if meta.get("llama.expert_count", 0) not in (0, 1):
        raise ExportError(f"{where}: llama.expert_count {shown(meta['llama.expert_count'])}: "
                          "mixture-of-experts models are not supported")
    fields = {k: meta.get("llama." + k) for _, k in GGUF_HEADER_INTS}
    fields.setdefault("attention.head_count_kv", None)
    if fields["attention.head_count_kv"] is None:
        fields["attention.head_count_kv"] = fields["attention.head_count"]
    dim, heads = fields["embedding_length"], fields["attention.head_count"]
    if fields["attention.key_length"] is None and _is_int(dim) and _is_int(heads) and heads > 0:
        fields["attention.key_length"] = dim // heads
    bounds = {field: (low, high) for field, _, low, high in HEADER_INTS}
    c = {field: config_int(fields, key, *bounds[field], where=f"{where}: llama.")
         for field, key in GGUF_HEADER_INTS}
    if c["n_kv_heads"] > c["n_heads"] or c["n_heads"] % c["n_kv_heads"] or c["head_dim"] % 2:
        raise ExportError(f"{where}: {c['n_heads']} heads, {c['n_kv_heads']} key/value heads "
                          f"and head dimension {c['head_dim']}: llama3.c needs a multiple and an "
                          "even dimension")
    for key in ("attention.value_length", "rope.dimension_count"):
        if meta.get("llama." + key, c["head_dim"]) != c["head_dim"]:
            raise ExportError(f"{where}: llama.{key} {shown(meta['llama.' + key])} differs from "
                              f"the head dimension {c['head_dim']} (not supported)")
    c["rope_theta"] = config_float32(dict(theta=meta.get("llama.rope.freq_base", 10000.0)),
                                     "theta", lambda x: 1 < x < math.inf,
                                     "must be finite and above 1", f"{where}: llama.rope.freq_base")
    c["norm_eps"] = config_float32(meta, "llama.attention.layer_norm_rms_epsilon",
                                   lambda x: 0 < x < 1, "must be above 0 and below 1", where)
    embedding = g.tensors.get("token_embd.weight")
    if embedding is None or len(embedding[1]) != 2:
        raise ExportError(f"{where}: no token_embd.weight matrix")
    c["vocab_size"] = config_int({"rows": embedding[1][0]}, "rows", 1, 1 << 22,
                                 f"{where}: token_embd.weight's")
    if meta.get("llama.vocab_size", c["vocab_size"]) != c["vocab_size"]:
        raise ExportError(f"{where}: llama.vocab_size {shown(meta['llama.vocab_size'])} is not "
                          f"token_embd's {c['vocab_size']} rows")
    c["tied_classifier"] = int("output.weight" not in g.tensors)
    c["bos_id"], c["eos_ids"] = gguf_special_ids(g, c["vocab_size"])
    c["n_eos"] = len(c["eos_ids"])
    c.update(gguf_rope_scaling(g, c))
    return c


def rope_freq_divisors(c):
    """Llama 3.1's rope scaling as one divisor per rotated frequency (llama.cpp's rope_freqs):
    1 for high frequencies, the factor for low ones, a smooth blend between (docs/gguf.md)."""
    hd = c["head_dim"]
    freqs = 1.0 / float(c["rope_theta"]) ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    factor, low, high = c["rope_factor"], c["rope_low_freq_factor"], c["rope_high_freq_factor"]
    original = c["rope_original_max_pos"]
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    out = 1.0 / ((1 - smooth) / factor + smooth)
    out[wavelen < original / high] = 1.0
    out[wavelen > original / low] = factor
    return out


def gguf_rope_scaling(g, c):
    """The header's rope scaling fields from rope_freqs: none without it (or all ones), else
    llama3 with the factor of the lowest frequency, low/high_freq_factor 1/4 and 8192 original
    positions (every Meta release), or failing those, the two fitted to the blended
    frequencies; the divisors they give must equal the stored ones."""
    kind = g.meta.get("llama.rope.scaling.type", "none")
    if kind != "none" and g.meta.get("llama.rope.scaling.factor", 1.0) != 1.0:
        raise ExportError(f"{g.name}: llama.rope.scaling.type {shown(kind)} is not supported "
                          "(Llama 3.1's scaling is stored as the rope_freqs tensor)")
    none = read_rope_scaling(None)
    if "rope_freqs.weight" not in g.tensors:
        return none
    type_name, shape, _, _ = g.tensors["rope_freqs.weight"]
    if type_name != "F32" or shape != (c["head_dim"] // 2,):
        raise ExportError(f"{g.name}: rope_freqs is {type_name} {list(shape)}, not F32 "
                          f"[{c['head_dim'] // 2}]")
    stored = g.rows("rope_freqs.weight", 0, 1).view("<f4")[0].astype(np.float64)
    if (stored == 1).all():
        return none
    if not (np.isfinite(stored).all() and 1 <= stored[-1] and (stored >= 1).all()):
        raise ExportError(f"{g.name}: rope_freqs holds divisors that are not finite numbers of "
                          f"at least 1 (the last: {stored[-1]:g}): not Llama 3.1's rope scaling")
    fields = dict(rope_scaling=1, rope_factor=float(np.float32(stored[-1])),
                  rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_pos=8192)
    candidates = [fields]
    blended = (stored > 1) & (stored < stored[-1])
    if blended.sum() >= 2:  # smooth = (8192 / wavelen - low) / (high - low): a line
        hd = c["head_dim"]
        freqs = 1.0 / float(c["rope_theta"]) ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
        inverse_factor = 1 / fields["rope_factor"]
        smooth = (1 / stored[blended] - inverse_factor) / (1 - inverse_factor)
        slope, intercept = np.polyfit(8192 * freqs[blended] / (2 * math.pi), smooth, 1)
        if slope > 0:
            low = float(np.float32(-intercept / slope))
            candidates.append(dict(fields, rope_low_freq_factor=low,
                                   rope_high_freq_factor=float(np.float32(low + 1 / slope))))
    for fields in candidates:
        if 0 < fields["rope_low_freq_factor"] < fields["rope_high_freq_factor"] and np.allclose(
                rope_freq_divisors(dict(c, **fields)), stored, rtol=1e-5, atol=0):
            return fields
    want = rope_freq_divisors(dict(c, **candidates[-1]))
    i = int(np.abs(want - stored).argmax())
    raise ExportError(f"{g.name}: rope_freqs do not follow Llama 3.1's rope scaling (factor "
                      f"{fields['rope_factor']:g}, low/high_freq_factor "
                      f"{candidates[-1]['rope_low_freq_factor']:g}/"
                      f"{candidates[-1]['rope_high_freq_factor']:g}, 8192 original positions): "
                      f"frequency {i} is divided by {stored[i]:.7g}, not {want[i]:.7g}")


def gguf_special_ids(g, vocab_size):
    """bos and the end tokens (eos, eot, eom; each once) from tokenizer.ggml.*_token_id."""
    ids = {}
    for key in ("bos", "eos", "eot", "eom"):
        value = g.meta.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None and (not _is_int(value) or not 0 <= value < vocab_size):
            raise ExportError(f"{g.name}: tokenizer.ggml.{key}_token_id {shown(value)} is not "
                              f"a token id in 0..{vocab_size - 1}")
        ids[key] = value
    if ids["bos"] is None or ids["eos"] is None:
        raise ExportError(f"{g.name}: no tokenizer.ggml.bos_token_id or eos_token_id")
    eos = list(dict.fromkeys(i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None))
    return ids["bos"], eos


def gguf_tokenizer(g):
    """(regular token bytes in id order, special texts) of a GGUF's vocabulary, which must be
    Llama 3's kind: byte-level BPE (gpt2) with Llama 3's pre-tokenizer, regular (NORMAL)
    tokens first, then the specials (CONTROL or USER_DEFINED), merges in id order."""
    meta, name = g.meta, g.name
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if model != "gpt2":
        raise ExportError(f"{name}: tokenizer.ggml.model is {shown(model)}, not byte-level BPE "
                          "(gpt2) with Llama 3's vocabulary: llama3.c runs Llama 3 models only")
    if pre is None:
        note(f"note: {name} has no tokenizer.ggml.pre (GGUFs from before May 2024): "
             "llama3.c splits text with Llama 3's pattern")
    elif pre not in GGUF_LLAMA3_PRE:
        raise ExportError(f"{name}: tokenizer.ggml.pre is {shown(pre)}, not Llama 3's "
                          "llama-bpe: llama3.c runs Llama 3 models only")
    tokens, types = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type")
    if not isinstance(tokens, list) or not tokens:
        raise ExportError(f"{name}: tokenizer.ggml.tokens is missing or not a list of strings")
    if (not isinstance(types, np.ndarray) or types.dtype.kind not in "iu"
            or len(types) != len(tokens)):
        raise ExportError(f"{name}: tokenizer.ggml.token_type is missing or not one integer "
                          f"per token ({len(tokens)})")
    n_regular = int(np.argmax(types != GGUF_TOKEN_NORMAL)) if (types != GGUF_TOKEN_NORMAL).any() \
        else len(tokens)
    odd = [i for i in range(n_regular, len(tokens))
           if types[i] not in (GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED)]
    if odd:
        raise ExportError(f"{name}: token {odd[0]} has type {types[odd[0]]}: llama3.c needs the "
                          "regular tokens first, then only special ones (control, user-defined)")
    to_byte = gpt2_unicode_to_byte()
    regular = []
    for i, text in enumerate(tokens[:n_regular]):
        try:
            regular.append(bytes(to_byte[ch] for ch in text))
        except KeyError as e:
            raise ExportError(f"{name}: token {i} {shown(text)} is not byte-level BPE "
                              f"(character {e})")
    check_gguf_merges(name, meta.get("tokenizer.ggml.merges", []), tokens[:n_regular])
    return regular, tokens[n_regular:]


def check_gguf_merges(name, merges, regular):
    """As check_merge_order: the .tok takes the id as the merge priority, so the merges that
    make regular tokens must come in id order (merges of tokens beyond a cut-down vocabulary
    are skipped)."""
    if not isinstance(merges, list):
        raise ExportError(f"{name}: tokenizer.ggml.merges is not a list of strings")
    ids = {text: i for i, text in enumerate(regular)}
    prev = -1
    for k, merge in enumerate(merges):
        pair = merge.split(" ")
        if len(pair) != 2:
            raise ExportError(f"{name}: malformed merge #{k}: {shown(merge)}")
        idx = ids.get(pair[0] + pair[1])
        if idx is not None and idx < prev:
            raise ExportError(f"{name}: merge #{k} {shown(merge)} is out of id order: llama3.c "
                              "needs merge priority = token id")
        prev = max(prev, -1 if idx is None else idx)


def gguf_plan(g, c):
    """tensor_plan's entries with GGUF names: every tensor there, of the shape the metadata
    implies and a float type for the norms."""
    plan = [(gguf_name(hf), shape, is_matrix) for hf, shape, is_matrix in tensor_plan(c)]
    for name, shape, is_matrix in plan:
        if name not in g.tensors:
            raise ExportError(f"{g.name}: missing tensor {name}")
        type_name, actual, _, _ = g.tensors[name]
        if actual != shape:
            raise ExportError(f"{g.name}: tensor {name}: shape {list(actual)} disagrees with "
                              f"the metadata (expected {list(shape)})")
        if not is_matrix and type_name not in ("F32", "F16", "BF16"):
            raise ExportError(f"{g.name}: tensor {name} is {type_name}, not a float type")
        if type_name not in GGUF_CONVERTIBLE:
            raise ExportError(f"{g.name}: tensor {name} is {type_name}, which export.py cannot "
                              "convert (it reads F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K and "
                              "Q6_K): take that model's Q8_0, Q4_0 or Q4_K_M file, or make one "
                              "with llama-quantize from its F16 or BF16 GGUF")
    return plan


def f16_scales(blocks, at):
    """The fp16 at byte at of each block (uint8 [n, block bytes]) as float32 [n, 1]."""
    return blocks[:, at:at + 2].copy().view("<f2").astype(np.float32)


def k_scales_mins(packed):
    """Q4_K's and Q5_K's 8 six-bit scales and mins of each super-block, from its 12 bytes:
    sub-blocks 0..3 in the low 6 bits of bytes 0..3 (scales) and 4..7 (mins); 4..7 in the
    nibbles of bytes 8..11, their top two bits in the top bits of bytes 0..7."""
    s = packed.astype(np.uint8)
    scales = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mins = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def k_nibbles(qs):
    """Q4_K's and Q5_K's 128 nibble bytes -> the 256 low parts in value order: each 32 bytes
    hold 64 values, the low nibbles first, then the high ones."""
    q = qs.reshape(len(qs), 4, 1, 32)
    return np.concatenate([q & 15, q >> 4], axis=2).reshape(len(qs), 256)


def dequantize_q8_0(b):
    return b[:, 2:].view(np.int8).astype(np.float32) * f16_scales(b, 0), f16_scales(b, 0)


def dequantize_q4_0(b):
    q = np.concatenate([b[:, 2:] & 15, b[:, 2:] >> 4], axis=1).astype(np.float32) - 8
    return q * f16_scales(b, 0), f16_scales(b, 0)


def dequantize_q4_k(b):
    """Super-blocks of 256: fp16 d and dmin, 12 bytes of scales and mins, 128 nibble bytes;
    value = d * scale * q - dmin * min, one scale and min per 32."""
    scales, mins = k_scales_mins(b[:, 4:16])
    step, offset = f16_scales(b, 0) * scales, f16_scales(b, 2) * mins
    q = k_nibbles(b[:, 16:144]).astype(np.float32).reshape(-1, 8, 32)
    return (q * step[:, :, None] - offset[:, :, None]).reshape(-1, 256), step


def dequantize_q5_k(b):
    """As Q4_K with a fifth bit per value: 32 bytes of high bits (before the nibbles), bit j
    of byte l for value l of the j-th 32."""
    scales, mins = k_scales_mins(b[:, 4:16])
    step, offset = f16_scales(b, 0) * scales, f16_scales(b, 2) * mins
    high = (b[:, 16:48, None] >> np.arange(8, dtype=np.uint8)) & 1  # [n, value l, sub j]
    q = k_nibbles(b[:, 48:176]).reshape(-1, 8, 32) + 16 * high.transpose(0, 2, 1)
    return (q.astype(np.float32) * step[:, :, None] - offset[:, :, None]).reshape(-1, 256), step


def dequantize_q6_k(b):
    """Super-blocks of 256: 128 bytes of low nibbles, 64 of 2-bit high parts, 16 int8 scales
    (one per 16 values), fp16 d; value = d * scale * (q - 32). Each half of 128 values takes
    64 low bytes (l: values l and l + 64, l + 32: l + 32 and l + 96) and 32 high bytes (bits
    0-1, 2-3, 4-5, 6-7 for values l, l + 32, l + 64, l + 96)."""
    halves = []
    for h in range(2):
        low = b[:, 64 * h:64 * h + 64]
        high = b[:, 128 + 32 * h:160 + 32 * h]
        parts = [(low[:, :32] & 15), (low[:, 32:] & 15), (low[:, :32] >> 4), (low[:, 32:] >> 4)]
        halves += [p | (((high >> (2 * i)) & 3) << 4) for i, p in enumerate(parts)]
    q = np.concatenate(halves, axis=1).astype(np.float32) - 32
    step = f16_scales(b, 208) * b[:, 192:208].view(np.int8).astype(np.float32)
    return (q.reshape(-1, 16, 16) * step[:, :, None]).reshape(-1, 256), step


# ggml types export.py converts: (dequantizer of blocks, or None for float types)
GGUF_CONVERTIBLE = {"F32": None, "F16": None, "BF16": None, "Q8_0": dequantize_q8_0,
                    "Q4_0": dequantize_q4_0, "Q4_K": dequantize_q4_k, "Q5_K": dequantize_q5_k,
                    "Q6_K": dequantize_q6_k}
GGUF_FLOAT_STORAGE = {"F32": "F32", "F16": "F16", "BF16": "BF16"}  # as SOURCE_DTYPES names
# The weight type each GGUF type converts to without --dtype (K-quants: see docs/gguf.md)
GGUF_DEFAULT_DTYPE = {"F32": "fp32", "F16": "fp32", "BF16": "bf16", "Q8_0": "q8_0",
                      "Q4_0": "q4_0", "Q4_K": "q8_0", "Q5_K": "q8_0", "Q6_K": "q8_0"}


def gguf_row_chunks(g, name, shape, head_dim, heads):
    """The rows of a tensor as raw bytes [rows, row bytes], about CHUNK_ELEMENTS values at a
    time, in this format's row order: q and k (heads given) are turned from GGUF's
    interleaved RoPE layout (pairs 2i, 2i + 1) back into Hugging Face's rotate-half one
    (pairs i, i + head_dim/2), whole heads at a time; moving whole rows is exact for every
    type, since no block crosses a row."""
    rows = shape[0] if len(shape) == 2 else 1
    step = max(1, CHUNK_ELEMENTS // shape[-1])
    if heads:
        step = max(head_dim, step // head_dim * head_dim)
    for first in range(0, rows, step):
        raw = g.rows(name, first, min(step, rows - first))
        if heads:
            n, width = raw.shape
            raw = raw.reshape(n // head_dim, head_dim // 2, 2, width).swapaxes(1, 2).reshape(n, width)
        yield raw


def gguf_values(g, name, raw):
    """Raw rows of a tensor -> (values as write_values reads them, their SOURCE_DTYPES name,
    the squared rounding step of the GGUF's quantization summed over them / 12: the
    expected squared error of its own rounding, 0 for float types)."""
    type_name = g.tensors[name][0]
    if GGUF_CONVERTIBLE[type_name] is None:
        return raw.view(SOURCE_DTYPES[type_name]).reshape(-1), type_name, 0.0
    x, step = GGUF_CONVERTIBLE[type_name](raw.reshape(-1, GGML_BY_NAME[type_name][1]))
    per_step = x.size // step.size
    own = float(np.einsum("i,i->", step.reshape(-1), step.reshape(-1), dtype=np.float64)) * per_step / 12
    return x.reshape(-1), "F32", own


def write_gguf_tensor(out, g, name, shape, as_matrix, weight_type, group_size, c):
    """One tensor of the model file from the GGUF: Q8_0 to q8_0 and Q4_0 to q4_0 at groups of
    32 by moving their bytes (exact), every other pair through write_values. Returns the
    progress line's description."""
    type_name = g.tensors[name][0]
    heads = 0
    if name.endswith((".attn_q.weight", ".attn_k.weight")):
        heads = c["n_heads"] if ".attn_q." in name else c["n_kv_heads"]
    pieces = gguf_row_chunks(g, name, shape, c["head_dim"], heads)
    kind = weight_type if as_matrix else "fp32"
    if (type_name, kind, group_size) in (("Q8_0", "q8_0", 32), ("Q4_0", "q4_0", 32)):
        return copy_gguf_blocks(out, pieces, kind)
    own = [0.0, 0.0]  # the GGUF's own squared rounding error, the values' squared sum

    def values():
        for raw in pieces:
            x, dtype, own_sq = gguf_values(g, name, raw)
            own[0] += own_sq
            if own_sq:
                own[1] += float(np.einsum("i,i->", x, x, dtype=np.float64))
            yield x, dtype
    what = write_values(out, values(), as_matrix, weight_type, group_size, name, shape)
    if kind == "fp32" or (kind == "bf16" and type_name == "BF16"):
        return f"{what} (exact)"
    if "err" not in what:
        return f"{what} (rounded)"
    if not own[0]:
        return what
    own_rel = math.sqrt(own[0] / own[1]) if own[1] > 0 else 0.0
    return what.replace("rms rel err", "added rms rel err") + f"  ({type_name}'s own: ~{own_rel:.3g})"


def copy_gguf_blocks(out, pieces, kind):
    """Q8_0 blocks (fp16 d, 32 int8) -> q8_0's int8 values then float32 scales (an fp16 is
    exact in float32); Q4_0 blocks (fp16 d, 16 bytes of nibbles in llama.cpp's order, which
    is q4_0's) -> the nibbles then the fp16 scales. Both exact."""
    width = 34 if kind == "q8_0" else 18
    out.align()
    scales = []
    for raw in pieces:
        blocks = raw.reshape(-1, width)
        out.write(blocks[:, 2:])
        d = blocks[:, :2].copy().view("<f2").reshape(-1)
        scales.append(d.astype(np.float32) if kind == "q8_0" else d)
    out.align()
    for scale in scales:
        out.write(scale)
    return f"{kind} (exact: the GGUF's blocks, moved)"


def gguf_weight_type(g, plan, args):
    """--dtype, or the type matching the GGUF's most common matrix type (GGUF_DEFAULT_DTYPE)."""
    counts = {}
    for name, shape, is_matrix in plan:
        if is_matrix:
            type_name = g.tensors[name][0]
            counts[type_name] = counts.get(type_name, 0) + math.prod(shape)
    if args.dtype:
        return args.dtype
    main = max(counts, key=counts.get)
    chosen = GGUF_DEFAULT_DTYPE[main]
    mixed = ", ".join(f"{t} {n / sum(counts.values()):.0%}" for t, n in
                      sorted(counts.items(), key=lambda item: -item[1]))
    note(f"weights: {mixed} -> {chosen} (--dtype chooses another)")
    return chosen


def export_gguf(args, outputs):
    g = GGUFFile(args.gguf)
    try:
        c = gguf_config(g)
        plan = gguf_plan(g, c)
        weight_type = gguf_weight_type(g, plan, args)
        group_size = gguf_group_size(args, plan, weight_type)
        tok_out = None if args.no_tokenizer else (args.tokenizer_out or default_tokenizer_path(args.out))
        check_outputs([args.out, *([tok_out] if tok_out else [])], [args.gguf])
        tok_data = None
        if tok_out:
            regular, specials = gguf_tokenizer(g)
            check_tokenizer(g.name, regular, specials)
            if len(regular) + len(specials) != c["vocab_size"]:
                raise ExportError(f"{g.name}: {len(regular) + len(specials)} tokens but "
                                  f"token_embd has {c['vocab_size']} rows")
            tok_data = pack_tokenizer(regular, specials)
            note(f"tokenizer: {len(regular)} regular + {len(specials)} special tokens")
        note(f"model: dim {c['dim']}, hidden {c['hidden_dim']}, {c['n_layers']} layers, "
             f"{c['n_heads']}/{c['n_kv_heads']} heads of {c['head_dim']}, vocab {c['vocab_size']}, "
             f"{'tied' if c['tied_classifier'] else 'untied'}, rope_scaling "
             f"{'llama3 factor %g' % c['rope_factor'] if c['rope_scaling'] else 'none'} -> {weight_type}")

        def write_one(out, name, shape, is_matrix):
            return g.tensors[name][0], write_gguf_tensor(out, g, name, shape, is_matrix,
                                                         weight_type, group_size, c)
        write_outputs(outputs, args.out,
                      lambda f: write_model(f, c, plan, weight_type, group_size, write_one),
                      tok_out, tok_data)
    finally:
        g.close()


def gguf_group_size(args, plan, weight_type):
    """32 for q8_0 and q4_0 unless --group-size says otherwise: GGUF's blocks, so that Q8_0
    and Q4_0 move across exactly."""
    if weight_type in ("q8_0", "q4_0") and args.group_size is None:
        args = argparse.Namespace(**dict(vars(args), group_size=32))
    return choose_group_size(argparse.Namespace(**dict(vars(args), dtype=weight_type)), plan)


# ---------------------------------------------------------------------------------------------
# Writing outputs: all of them or none
# ---------------------------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class Interrupted(BaseException):
    """A stop signal arrived. A BaseException, like KeyboardInterrupt: nothing catches it on
    the way out but the cleanup."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def on_stop_signal(signum, frame):
    """The first stop signal becomes an exception, which removes the temporary files on its
    way out; later ones are ignored so that nothing interrupts that cleanup."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_held():
    """Defers the stop signals while files are created, renamed or removed, so that none falls
    between making a temporary file and recording it, or between two renames of a commit."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def same_file(a, b):
    """Whether two paths name one file: the same resolved path, or the same device and inode
    (a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except (OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def check_outputs(outputs, inputs):
    """Before anything is written: refuses an output that cannot be a file name (too long, a
    path through a file), that is a folder or another special file (/dev/null: the rename
    would replace it), or that names an input (the file it is made from) or another output."""
    for i, out in enumerate(outputs):
        folder = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(folder):
            raise ExportError(f"output folder {folder} does not exist")
        try:
            mode = os.stat(out).st_mode
        except FileNotFoundError:
            mode = None
        except OSError as e:
            raise ExportError(f"output {out}: {e.strerror}")
        if mode is not None and stat.S_ISDIR(mode):
            raise ExportError(f"output {out} is a folder")
        if mode is not None and not stat.S_ISREG(mode):
            raise ExportError(f"output {out} exists and is not a regular file")
        for source in inputs:
            if same_file(out, source):
                raise ExportError(f"output {out} would replace the input {source}: choose another name")
        for other in outputs[:i]:
            if same_file(out, other):
                raise ExportError(f"the outputs {other} and {out} are the same file")


def fresh_name(final, kind):
    """A hidden random name beside final."""
    folder, stem = os.path.split(os.path.abspath(final))
    return os.path.join(folder, f".{stem[:200]}.{secrets.token_hex(8)}.{kind}")


class AtomicOutputs:
    """Each output is written to a temporary file beside its target; commit() renames them all
    into place, or none; cleanup() removes whatever was not committed."""

    def __init__(self):
        self.pending = []  # (temporary path, final path)

    def create(self, final):
        """A new temporary file for final, open for writing. Created with O_EXCL under a random
        name, so that nothing planted under that name (a symlink) is ever written through."""
        with signals_held():
            for _ in range(16):
                temp = fresh_name(final, "tmp")
                try:
                    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
                except FileExistsError:
                    continue
                self.pending.append((temp, final))
                return os.fdopen(fd, "wb")
        raise ExportError(f"cannot create a temporary file beside {final}")

    def commit(self):
        """Renames every temporary file into place. check_outputs made sure that no target is
        a folder; should a rename fail all the same, the ones done are undone: each file an
        output replaces is first given a second name, to be put back from."""
        with signals_held():
            done = []  # (final, the second name of the file it replaced, or None)
            try:
                for temp, final in self.pending:
                    aside = self._put_aside(final)
                    try:
                        os.replace(temp, final)
                    except OSError:
                        if aside and os.path.lexists(final):  # untouched: drop its second name
                            os.remove(aside)
                        elif aside:  # it was renamed aside: put it back
                            os.replace(aside, final)
                        raise
                    done.append((final, aside))
            except OSError:
                for final, aside in reversed(done):
                    if aside:
                        os.replace(aside, final)
                    else:
                        os.remove(final)
                raise
            for _, aside in done:
                if aside:
                    with contextlib.suppress(OSError):
                        os.remove(aside)
            self.pending = []

    @staticmethod
    def _put_aside(final):
        """A second name for the file at final (a hard link, or where the filesystem has none,
        the file renamed); None when there is no file there."""
        if not os.path.lexists(final):
            return None
        aside = fresh_name(final, "old")
        try:
            os.link(final, aside, follow_symlinks=False)
        except OSError:
            os.rename(final, aside)
        return aside

    def cleanup(self):
        with signals_held():
            for temp, _ in self.pending:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(temp)
            self.pending = []


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
                    "tokenizer file (formats: docs/formats.md).",
        epilog="Examples:\n"
               "  python3 export.py llama3.2-1b.bin --hf ~/Llama-3.2-1B-Instruct --dtype bf16\n"
               "  python3 export.py l3-8b-q8.bin --hf ~/Meta-Llama-3-8B --dtype q8_0\n"
               "  python3 export.py --tokenizer-only llama3.tok --tokenizer tokenizer.model --specials llama3\n"
               "  python3 export.py llama3.2-1b.bin --gguf Llama-3.2-1B-Instruct-Q8_0.gguf\n"
               "Progress goes to stdout. Any error, a bad option included, is one line on stderr\n"
               "and exit status 1; no partial output file is ever left behind, and the outputs\n"
               "(model and tokenizer) appear together or not at all. SIGINT, SIGTERM, SIGHUP or\n"
               "SIGQUIT stop the export the same way, with exit status 128 + the signal number.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT",
                   help="output file: the model (.bin), or the tokenizer (.tok) with --tokenizer-only")
    p.add_argument("--hf", metavar="MODEL_DIR",
                   help="Hugging Face model folder: config.json, model.safetensors or shards with "
                        "model.safetensors.index.json, and tokenizer.json and/or "
                        "original/tokenizer.model (symlinks, as in Hugging Face's cache, are "
                        "followed; a file inside the folder, e.g. its config.json, stands for it)")
    p.add_argument("--gguf", metavar="FILE",
                   help="a llama.cpp GGUF file of a Llama 3 / 3.1 / 3.2 model (versions 2 and 3; "
                        "F32, F16, BF16, Q8_0, Q4_0 exactly; Q4_K, Q5_K, Q6_K converted): the "
                        "configuration, tokenizer and weights all come from it (docs/gguf.md)")
    p.add_argument("--dtype", choices=sorted(WEIGHT_TYPES),
                   help="weight type of the matrices (norms are always fp32): fp32 exact; bf16 "
                        "(exact for bf16 checkpoints, rounded to nearest even otherwise); q8_0 "
                        "int8 with one float32 scale per group; q4_0 4-bit integers in [-8, 7] "
                        "with one fp16 scale per group, chosen per group for the least squared "
                        "error, never more than llama.cpp's Q4_0 (default: bf16; with --gguf "
                        "the type its weights have: F32/F16 fp32, BF16 bf16, Q8_0 q8_0, Q4_0 "
                        "q4_0, K-quants q8_0). Every type refuses a weight that is NaN or "
                        "infinite (or becomes so: bf16 past its range), naming the tensor and "
                        "the first bad element")
    p.add_argument("--group-size", type=int, metavar="N",
                   help="q8_0 and q4_0 group size: elements per scale; must divide every "
                        "matrix's row length. q8_0 default: 64, or the largest divisor of 64 that "
                        "divides them all, e.g. 32 for hidden_size 96; q4_0: a multiple of 32, "
                        "default 32")
    p.add_argument("--tokenizer-out", metavar="PATH",
                   help="where to write the tokenizer file (default: OUT without a trailing .bin, "
                        "plus .tok)")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="write the model file only")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer source: a tokenizer.json or a tiktoken tokenizer.model (default "
                        "with --hf: MODEL_DIR/tokenizer.json, else MODEL_DIR/original/tokenizer.model, "
                        "else MODEL_DIR/tokenizer.model; no tokenizer is written if none exists). "
                        "Its token count must equal config.json's vocab_size")
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
    if args.gguf:
        for flag, given in (("--hf", args.hf), ("--tokenizer-only", args.tokenizer_only),
                            ("--tokenizer", args.tokenizer), ("--specials", args.specials)):
            if given:
                p.error(f"--gguf and {flag} exclude each other (the GGUF holds its tokenizer)")
    elif args.tokenizer_only:
        if not args.tokenizer:
            p.error("--tokenizer-only needs --tokenizer PATH")
        if args.hf:
            p.error("--tokenizer-only and --hf exclude each other")
    elif not args.hf:
        p.error("--hf MODEL_DIR or --gguf FILE is required (or --tokenizer-only)")
    if args.dtype is None and not args.gguf:
        args.dtype = "bf16"
    if args.no_tokenizer and (args.tokenizer_out or args.tokenizer):
        p.error("--no-tokenizer excludes --tokenizer-out and --tokenizer")
    return args


def choose_group_size(args, plan):
    """The q8_0 group size: --group-size if it divides every row length (error otherwise), else
    64 reduced to a common divisor so that small test models with odd sizes still export. The
    q4_0 group size: --group-size or 32, a multiple of 32 (whole 16-byte blocks) dividing every
    row length (error otherwise)."""
    if args.dtype not in ("q8_0", "q4_0"):
        return 0
    columns = [shape[1] for _, shape, is_matrix in plan if is_matrix]
    if args.dtype == "q4_0":
        size = Q4_GROUP_SIZE if args.group_size is None else args.group_size
        if size % Q4_GROUP_SIZE:
            raise ExportError(f"--group-size {size}: q4_0 groups must be a multiple of 32")
        for name, shape, is_matrix in plan:
            if is_matrix and shape[1] % size:
                raise ExportError(f"q4_0 group size {size} does not divide the row length "
                                  f"{shape[1]} of {name}")
        return size
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


def layout_for(config):
    """The special layout for a tiktoken source when --specials is not given: Llama 3.1's names
    for a model with llama3 rope scaling (3.1/3.2), Llama 3's otherwise."""
    return "llama3.1" if config["rope_scaling"] else "llama3"


def config_near(tokenizer_path):
    """config.json beside a tokenizer file or one folder up (original/tokenizer.model), or None."""
    folder = os.path.dirname(os.path.abspath(tokenizer_path))
    for candidate in (folder, os.path.dirname(folder)):
        path = os.path.join(candidate, "config.json")
        if os.path.lexists(path):
            return path
    return None


def layout_near(config_path):
    """layout_for the config.json at config_path; its errors are errors, with the way round."""
    try:
        cfg = load_json(config_path)
        if not isinstance(cfg, dict):
            raise ExportError("config.json: not a JSON object")
        return layout_for(read_rope_scaling(cfg.get("rope_scaling")))
    except ExportError as e:
        raise ExportError(f"{e} (in {config_path}, read to choose the special-token names; "
                          "--specials skips it)")


def export_tokenizer_only(args, outputs):
    if not os.path.lexists(args.tokenizer):
        raise ExportError(f"tokenizer {args.tokenizer} not found")
    config = None if args.specials else config_near(args.tokenizer)
    check_outputs([args.out], [args.tokenizer, *([config] if config else [])])
    data = build_tokenizer(args.tokenizer, args.specials,
                           lambda: layout_near(config) if config else "llama3.1")
    with outputs.create(args.out) as f:
        f.write(data)
    outputs.commit()
    note(f"wrote {args.out} ({len(data)} bytes)")


def model_folder(path):
    """--hf's folder; a file inside one (its config.json, say) stands for it."""
    if os.path.isdir(path):
        return path
    if not os.path.lexists(path):
        raise ExportError(f"model folder {path} not found")
    folder = os.path.dirname(path) or "."
    if os.path.lexists(os.path.join(folder, "config.json")):
        note(f"note: --hf {path} is a file: exporting the folder {folder}")
        return folder
    hint = ""
    with contextlib.suppress(ExportError, OSError):
        fd = open_input(path)
        try:
            if os.pread(fd, 4, 0) == GGUF_MAGIC:
                hint = f"; for a GGUF file: export.py OUT.bin --gguf {path}"
        finally:
            os.close(fd)
    raise ExportError(f"--hf {path} is not a folder: give the Hugging Face model folder "
                      f"(config.json and *.safetensors){hint}")


def tokenizer_paths(args, folder):
    """(source, output) of the tokenizer written with the model, or (None, None)."""
    if args.no_tokenizer:
        return None, None
    source = args.tokenizer or find_tokenizer(folder)
    tok_out = args.tokenizer_out or default_tokenizer_path(args.out)
    if source is None:
        if args.tokenizer_out:
            raise ExportError(f"{folder} has no tokenizer.json or tokenizer.model for "
                              "--tokenizer-out: give its source with --tokenizer PATH")
        note(f"note: {folder} has no tokenizer.json or tokenizer.model: no tokenizer file written; "
             f"run needs one: write one with: python3 export.py --tokenizer-only {tok_out} "
             "--tokenizer PATH/tokenizer.json (or a tiktoken tokenizer.model)")
        return None, None
    if not os.path.lexists(source):
        raise ExportError(f"tokenizer {source} not found")
    return source, tok_out


def model_tokenizer(source, c, specials):
    """The .tok bytes for the model; their token count must be its vocab_size, as run.c checks."""
    data = build_tokenizer(source, specials, lambda: layout_for(c))
    n_tokens = struct.unpack_from("<I", data, 8)[0]
    if n_tokens != c["vocab_size"]:
        raise ExportError(f"{source} has {n_tokens} tokens but config.json's vocab_size is "
                          f"{c['vocab_size']}; run needs them equal (--no-tokenizer writes the "
                          "model alone)")
    return data


def export_model(args, outputs):
    folder = model_folder(args.hf)
    c = read_config(folder)
    ckpt = Checkpoint(folder)
    try:
        plan = tensor_plan(c)
        check_tensors(ckpt, plan, c)
        group_size = choose_group_size(args, plan)
        tok_source, tok_out = tokenizer_paths(args, folder)
        # the checkpoint's tokenizer files are protected even when not read (--no-tokenizer)
        inputs = [os.path.join(folder, "config.json"), *ckpt.paths(), *tokenizer_candidates(folder),
                  *([tok_source] if tok_source else [])]
        check_outputs([args.out, *([tok_out] if tok_source else [])], inputs)
        # built (in memory, ~2 MB) before the long model write, so that a bad tokenizer fails fast
        tok_data = model_tokenizer(tok_source, c, args.specials) if tok_source else None
        note(f"model: dim {c['dim']}, hidden {c['hidden_dim']}, {c['n_layers']} layers, "
             f"{c['n_heads']}/{c['n_kv_heads']} heads of {c['head_dim']}, vocab {c['vocab_size']}, "
             f"{'tied' if c['tied_classifier'] else 'untied'}, "
             f"rope_scaling {'llama3' if c['rope_scaling'] else 'none'} -> {args.dtype}")
        write_outputs(outputs, args.out, lambda f: write_model(
            f, c, plan, args.dtype, group_size,
            lambda out, name, shape, is_matrix: (ckpt.info(name)[0], write_tensor(
                out, ckpt, name, shape, is_matrix, args.dtype, group_size))), tok_out, tok_data)
    finally:
        ckpt.close()


def write_outputs(outputs, out, write, tok_out, tok_data):
    """Writes the model (write(f) returns its size) and the tokenizer bytes (or None), then
    renames both into place together."""
    with outputs.create(out) as f:
        size = write(f)
    if tok_data is not None:
        with outputs.create(tok_out) as f:
            f.write(tok_data)
    outputs.commit()
    note(f"wrote {out} ({size} bytes)")
    if tok_data is not None:
        note(f"wrote {tok_out} ({len(tok_data)} bytes)")


def report(error):
    """One line on stderr for whatever stopped the export; returns the exit status."""
    status = 1
    if isinstance(error, Interrupted):
        message, status = f"interrupted by {error}", 128 + error.signum
    elif isinstance(error, ExportError):
        message = str(error)
    elif isinstance(error, OSError):  # disk full, permissions, ...
        message = (f"{error.filename}: " if error.filename else "") + (error.strerror or str(error))
    elif isinstance(error, MemoryError):
        message = "out of memory"
    else:  # the last line of defence: every known problem is an ExportError
        message = f"internal error ({type(error).__name__}: {error}); please report it"
    with signals_held():
        print("export.py: error: " + " ".join(message.split()), file=sys.stderr, flush=True)
    return status


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for signum in STOP_SIGNALS:
        signal.signal(signum, on_stop_signal)
    outputs = AtomicOutputs()
    try:
        try:
            if args.tokenizer_only:
                export_tokenizer_only(args, outputs)
            elif args.gguf:
                export_gguf(args, outputs)
            else:
                export_model(args, outputs)
        finally:
            outputs.cleanup()
    except (Exception, Interrupted) as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
