"""An independent float32 numpy forward pass of a Hugging Face Llama checkpoint.

It shares no code with export.py: it reads config.json and the safetensors files itself and
computes with Hugging Face semantics on the weights as stored:
- RoPE rotates the pairs (i, i + head_dim/2) of each head ("rotate half"), angle pos * inv_freq[i];
- inv_freq (with llama3 rope_scaling from config.json) in float32 arithmetic like Meta's code,
  the power taken in float64 and rounded (glibc powf is correctly rounded nearly always, numpy's
  float32 power is not); angles are float32 products, their cos/sin computed in float64 and rounded;
- query head h reads KV head h // (n_heads / n_kv_heads);
- RMSNorm x * 1/sqrt(mean(x^2) + eps) * weight, SwiGLU MLP down(silu(gate x) * up x);
- causal softmax attention scaled by 1/sqrt(head_dim); classifier lm_head or the embedding (tied).

API:
    ref = Reference(model_dir)
    ref.logits(tokens)        -> float32 [len(tokens), vocab_size], every position
    ref.greedy(tokens, n)     -> n greedy token ids (argmax, lowest id on ties; KV cache)
    ref.generate(tokens, n)   -> (ids, logits [n, vocab]): logits[i] produced ids[i]
    ref.inv_freq              -> float32 [head_dim/2] RoPE frequencies
    load_weights(model_dir)   -> {HF tensor name: float32 array} (widened exactly)
"""
import json
import math
import os
import struct

import numpy as np

_RAW_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def _read_safetensors(path):
    """{name: float32 array} of one safetensors file (small models: read it whole)."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack_from("<Q", blob, 0)
    header = json.loads(blob[8:8 + n])
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        raw = np.frombuffer(blob[base + begin:base + end], dtype=_RAW_DTYPES[meta["dtype"]])
        if meta["dtype"] == "BF16":
            values = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            values = raw.astype(np.float32)
        out[name] = values.reshape(meta["shape"])
    return out


def load_weights(model_dir):
    """Every tensor of a HF folder (model.safetensors or the shards of its index), as float32."""
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        return _read_safetensors(single)
    with open(os.path.join(model_dir, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    weights = {}
    for shard in shards:
        weights.update(_read_safetensors(os.path.join(model_dir, shard)))
    return weights


def rope_inv_freq(cfg, head_dim):
    """float32 RoPE frequencies, with llama3 scaling when config.json asks for it."""
    theta = np.float32(cfg.get("rope_theta", 10000.0))
    i = np.arange(0, head_dim, 2, dtype=np.float32)
    exponent = (i / np.float32(head_dim)).astype(np.float32)
    power = np.power(np.float64(theta), exponent.astype(np.float64)).astype(np.float32)
    freq = (np.float32(1) / power).astype(np.float32)
    scaling = cfg.get("rope_scaling")
    if not scaling or scaling.get("rope_type", scaling.get("type")) != "llama3":
        return freq
    f32 = np.float32
    factor = f32(scaling["factor"])
    low = f32(scaling["low_freq_factor"])
    high = f32(scaling["high_freq_factor"])
    orig = f32(scaling["original_max_position_embeddings"])
    wavelen = (f32(2 * math.pi) / freq).astype(np.float32)
    low_wavelen, high_wavelen = orig / low, orig / high
    smooth = ((orig / wavelen - low) / (high - low)).astype(np.float32)
    blended = ((f32(1) - smooth) * freq / factor + smooth * freq).astype(np.float32)
    return np.where(wavelen < high_wavelen, freq,
                    np.where(wavelen > low_wavelen, (freq / factor).astype(np.float32),
                             blended)).astype(np.float32)


class Reference:
    def __init__(self, model_dir):
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        self.cfg = cfg
        self.n_layers = cfg["num_hidden_layers"]
        self.n_heads = cfg["num_attention_heads"]
        self.n_kv = cfg.get("num_key_value_heads") or self.n_heads
        self.head_dim = cfg.get("head_dim") or cfg["hidden_size"] // self.n_heads
        self.eps = np.float32(cfg["rms_norm_eps"])
        self.vocab_size = cfg["vocab_size"]
        w = load_weights(model_dir)
        self.embed = w["model.embed_tokens.weight"]
        self.layers = []
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            self.layers.append({k: w[p + name + ".weight"] for k, name in (
                ("attn_norm", "input_layernorm"), ("q", "self_attn.q_proj"),
                ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"), ("o", "self_attn.o_proj"),
                ("ffn_norm", "post_attention_layernorm"), ("gate", "mlp.gate_proj"),
                ("up", "mlp.up_proj"), ("down", "mlp.down_proj"))})
        self.norm = w["model.norm.weight"]
        tied = cfg.get("tie_word_embeddings", False)
        self.classifier = self.embed if tied else w["lm_head.weight"]
        self.inv_freq = rope_inv_freq(cfg, self.head_dim)

    # -- building blocks ------------------------------------------------------------------

    def _rmsnorm(self, x, weight):
        ms = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
        return (x * (np.float32(1) / np.sqrt(ms + self.eps))) * weight

    def _rope(self, x, positions):
        """x [heads, T, head_dim] rotated in place by the angles of `positions`."""
        angles = positions.astype(np.float32)[:, None] * self.inv_freq[None, :]
        cos = np.cos(angles.astype(np.float64)).astype(np.float32)
        sin = np.sin(angles.astype(np.float64)).astype(np.float32)
        half = self.head_dim // 2
        x1, x2 = x[..., :half].copy(), x[..., half:].copy()
        x[..., :half] = x1 * cos - x2 * sin
        x[..., half:] = x1 * sin + x2 * cos
        return x

    def _attention(self, q, k, v, start):
        """q [H, T, d] at positions start..start+T-1; k, v [KV, start+T, d]. Causal. Query
        blocks keep the score matrices small for long prompts."""
        group = self.n_heads // self.n_kv
        t = q.shape[1]
        out = np.empty_like(q)
        scale = np.float32(math.sqrt(self.head_dim))
        block = 512
        for b0 in range(0, t, block):
            b1 = min(t, b0 + block)
            n_keys = start + b1  # keys this block can see at most
            for h in range(self.n_heads):
                kv = h // group
                scores = (q[h, b0:b1] @ k[kv, :n_keys].T) / scale
                # keys before the block's first position are visible to every row: only the
                # block's own diagonal square needs the causal mask
                diag = scores[:, start + b0:]
                diag[np.triu(np.ones(diag.shape, dtype=bool), k=1)] = -np.inf
                scores -= scores.max(axis=1, keepdims=True)
                np.exp(scores, out=scores)
                scores /= scores.sum(axis=1, keepdims=True, dtype=np.float32)
                out[h, b0:b1] = scores @ v[kv, :n_keys]
        return out

    def _forward(self, tokens, cache, start, last_only=False):
        """Logits of `tokens` at positions start.. (only the last one with last_only), appending
        their K/V to cache (a list of per-layer [k, v], arrays [KV, positions, d])."""
        tokens = np.asarray(tokens, dtype=np.int64)
        t, hd = len(tokens), self.head_dim
        positions = np.arange(start, start + t)
        x = self.embed[tokens].astype(np.float32)
        for layer, lw in enumerate(self.layers):
            h = self._rmsnorm(x, lw["attn_norm"])
            q = (h @ lw["q"].T).reshape(t, self.n_heads, hd).transpose(1, 0, 2).copy()
            k = (h @ lw["k"].T).reshape(t, self.n_kv, hd).transpose(1, 0, 2).copy()
            v = (h @ lw["v"].T).reshape(t, self.n_kv, hd).transpose(1, 0, 2).copy()
            self._rope(q, positions)
            self._rope(k, positions)
            if cache[layer] is None:
                cache[layer] = [k, v]
            else:
                cache[layer] = [np.concatenate([cache[layer][0], k], axis=1),
                                np.concatenate([cache[layer][1], v], axis=1)]
            k_all, v_all = cache[layer]
            att = self._attention(q, k_all, v_all, start)
            x = x + att.transpose(1, 0, 2).reshape(t, self.n_heads * hd) @ lw["o"].T
            h = self._rmsnorm(x, lw["ffn_norm"])
            gate = h @ lw["gate"].T
            silu = gate / (np.float32(1) + np.exp(-gate))
            x = x + (silu * (h @ lw["up"].T)) @ lw["down"].T
        if last_only:
            x = x[-1:]
        return self._rmsnorm(x, self.norm) @ self.classifier.T

    # -- public API -------------------------------------------------------------------------

    def logits(self, tokens):
        """float32 [len(tokens), vocab_size]: the logits after each prompt position."""
        return self._forward(tokens, [None] * self.n_layers, 0)

    def generate(self, tokens, n):
        """n greedy steps with a KV cache: (ids, float32 [n, vocab] logits of each step)."""
        cache = [None] * self.n_layers
        last = self._forward(tokens, cache, 0, last_only=True)[-1]
        ids, rows, pos = [], [], len(tokens)
        for step in range(n):
            rows.append(last)
            ids.append(int(np.argmax(last)))  # first maximum: lowest id on an exact tie
            if step + 1 < n:
                last = self._forward([ids[-1]], cache, pos, last_only=True)[-1]
                pos += 1
        return ids, np.array(rows, dtype=np.float32).reshape(n, -1)

    def greedy(self, tokens, n):
        return self.generate(tokens, n)[0]
