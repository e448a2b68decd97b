"""GGUF (llama.cpp) Llama checkpoints: read (F32, F16, BF16, Q8_0, Q4_0, Q4_1 and the other
types `gguf.quants` can dequantise) and write (F32, F16, Q8_0, Q4_0, Q4_1).

Layout facts this file relies on (checked by tests/io/test_gguf.py against written files):
- GGUF lists dims fastest-first (ne0 = input features); the reader's numpy data is row-major
  (out, in), i.e. torch's Linear layout. marjax keeps (in, out), so 2-D weights transpose.
- llama.cpp's converter permutes q/k rows so RoPE rotates adjacent pairs (2i, 2i+1). marjax
  keeps those weights and sets rope_layout="pairs" instead of undoing the permutation.
"""
from __future__ import annotations

import dataclasses
import mmap
import os
import struct
import warnings
from typing import Optional

import numpy as np

from marjax.config import ModelConfig, RopeScaling
from marjax.errors import CheckpointError, ConfigError, MarjaxError
from marjax.io.hf import (build_params, expected_shapes, params_to_numpy, permute_half_to_pairs,
                          unpermute_pairs_to_half)
from marjax.nn.layers import rope_inv_freq
from marjax.io.tokenizer import from_gguf_fields
from marjax.io.tokenizer import ByteTokenizer

__all__ = ["load_gguf", "save_gguf", "read_gguf", "check_gguf_layout", "gguf_config", "QTYPES",
           "permute_half_to_pairs", "unpermute_pairs_to_half"]

QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
_WRITE_QTYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")

_TOP = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}
_LAYER = {"mixer_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight",
          "wv": "attn_v.weight", "wo": "attn_output.weight", "mlp_norm": "ffn_norm.weight",
          "gate": "ffn_gate.weight", "up": "ffn_up.weight", "down": "ffn_down.weight"}
_ARCHS = ("llama",)


def read_gguf(path: str):
    """(metadata dict of plain Python values, {tensor name: ReaderTensor}); errors name the file."""
    import gguf  # late import: the gguf package, only needed for GGUF files
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    check_gguf_layout(path)
    try:
        reader = gguf.GGUFReader(path)
        fields = {}
        for k, fld in reader.fields.items():
            if k.startswith("GGUF."):
                continue
            fields[k] = fld.contents()
        tensors = {t.name: t for t in reader.tensors}
    except Exception as e:  # the reader raises ValueError/IndexError/... on short or garbled files
        raise CheckpointError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None
    size = os.path.getsize(path)
    for t in tensors.values():
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise CheckpointError(f"{path}: truncated GGUF file: tensor {t.name} needs bytes up to {end}, "
                                  f"file has {size}")
    return fields, tensors


# GGUF value types -> byte size (8: string, 9: array, sized while walking)
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_MAX_DIMS = 4                       # GGML_MAX_DIMS


def check_gguf_layout(path: str) -> None:
    """Walk the GGUF header (key/values and tensor infos) over an mmap, checking every count and
    length against the bytes that remain, so a hostile or truncated file is refused before the
    gguf reader loops over (or allocates) a claimed size. Errors are CheckpointErrors naming the
    file, the offset and the field."""
    import gguf  # late import: the gguf package, only needed for GGUF files
    size = os.path.getsize(path)
    if size < 24:
        raise CheckpointError(f"{path}: truncated GGUF file ({size} bytes; the header alone is 24)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        end = "<" if struct.unpack_from("<I", m, 4)[0] & 0xFFFF else ">"      # a byte-swapped version: big-endian
        pos = 4

        def take(fmt: str, what: str):
            nonlocal pos
            n = struct.calcsize(fmt)
            if pos + n > size:
                raise CheckpointError(f"{path}: truncated GGUF file: {what} at byte {pos} runs past the end ({size})")
            v = struct.unpack_from(end + fmt, m, pos)
            pos += n
            return v[0] if len(v) == 1 else v

        def skip(n: int, what: str) -> None:
            nonlocal pos
            if n < 0 or pos + n > size:
                raise CheckpointError(f"{path}: corrupt GGUF file: {what} at byte {pos} claims {n} bytes, only "
                                      f"{size - pos} remain")
            pos += n

        def string(what: str) -> str:
            """A length-prefixed string (a metadata key or tensor name), shown at most 200 bytes."""
            n = take("Q", f"{what} length")
            start = pos
            skip(n, what)
            return bytes(m[start:start + min(n, 200)]).decode("utf-8", "replace")

        def value(vtype: int, what: str, depth: int = 0) -> None:
            if vtype in _SCALAR:
                skip(_SCALAR[vtype], what)
            elif vtype == 8:
                skip(take("Q", what + " length"), what)
            elif vtype == 9 and depth == 0:
                etype, count = take("I", what + " element type"), take("Q", what + " count")
                if etype in _SCALAR:
                    skip(count * _SCALAR[etype], f"{what} ({count} elements)")
                elif etype == 8:
                    if count * 8 > size - pos:
                        raise CheckpointError(f"{path}: corrupt GGUF file: {what} claims {count} strings, more than "
                                              f"the {size - pos} bytes left can hold")
                    for _ in range(count):
                        skip(take("Q", what + " element length"), what)
                else:
                    raise CheckpointError(f"{path}: corrupt GGUF file: {what} has element type {etype}")
            else:
                raise CheckpointError(f"{path}: corrupt GGUF file: {what} has value type {vtype}")

        version = take("I", "version")
        if version not in (2, 3):
            raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = take("Q", "tensor count"), take("Q", "metadata count")
        if n_tensors * 24 + n_kv * 13 > size:       # the smallest tensor info / key-value entry
            raise CheckpointError(f"{path}: corrupt GGUF header: {n_tensors} tensors and {n_kv} metadata entries "
                                  f"cannot fit in {size} bytes")
        alignment = 32
        for i in range(n_kv):
            key = string(f"metadata key {i}")
            vtype = take("I", f"metadata {key!r} type")
            vpos = pos
            value(vtype, f"metadata {key!r}")
            if key == "general.alignment" and vtype == 4:
                alignment = struct.unpack_from(end + "I", m, vpos)[0]
        if alignment < 1 or alignment & (alignment - 1):
            raise CheckpointError(f"{path}: corrupt GGUF file: general.alignment {alignment} is not a power of two")
        infos = []
        for i in range(n_tensors):
            name = string(f"tensor {i} name")
            n_dims = take("I", f"tensor {name!r} n_dims")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise CheckpointError(f"{path}: corrupt GGUF file: tensor {name!r} has {n_dims} dims (1..{_MAX_DIMS})")
            dims = [take("Q", f"tensor {name!r} dim") for _ in range(n_dims)]
            ttype, offset = take("I", f"tensor {name!r} type"), take("Q", f"tensor {name!r} offset")
            try:
                block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                raise CheckpointError(f"{path}: tensor {name!r} has unknown GGML type {ttype}") from None
            n = 1
            for d in dims:
                n *= d
            if n % block:
                raise CheckpointError(f"{path}: corrupt GGUF file: tensor {name!r} has {n} elements, not a multiple "
                                      f"of its type's block size {block}")
            infos.append((name, offset, n // block * nbytes))
        data_start = -(-pos // alignment) * alignment
        for name, offset, nbytes in infos:
            if data_start + offset + nbytes > size:
                raise CheckpointError(f"{path}: truncated GGUF file: tensor {name!r} needs bytes up to "
                                      f"{data_start + offset + nbytes}, file has {size}")


def _field(fields: dict, key: str, path: str, default=None, required: bool = True):
    if key in fields:
        return fields[key]
    if required and default is None:
        raise CheckpointError(f"{path}: GGUF metadata lacks {key!r}")
    return default


def gguf_config(fields: dict, tensors: dict, path: str = "<gguf>") -> ModelConfig:
    """ModelConfig from llama.* metadata; rope_layout 'pairs' (GGUF's permuted q/k)."""
    arch = _field(fields, "general.architecture", path)
    if arch not in _ARCHS:
        raise CheckpointError(f"{path}: architecture {arch!r} is not supported (supported: {list(_ARCHS)})")
    a = lambda k, default=None: _field(fields, f"{arch}.{k}", path, default)  # noqa: E731
    d = int(a("embedding_length"))
    n_heads = int(a("attention.head_count"))
    head_dim = int(fields.get(f"{arch}.attention.key_length", d // n_heads))
    rot = int(fields.get(f"{arch}.rope.dimension_count", head_dim))
    if rot != head_dim:
        raise CheckpointError(f"{path}: partial rotary embeddings (rope.dimension_count={rot} != head_dim "
                              f"{head_dim}) are not supported")
    tokens = fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens else int(a("vocab_size", 0) or 0)
    emb = tensors.get("token_embd.weight")
    if emb is not None:
        rows = int(emb.shape[1]) if len(emb.shape) == 2 else -1  # reader shape is GGUF order (ne0, ne1)
        if rows > vocab:  # a padded embedding: the extra rows are never produced by the tokenizer
            vocab = rows
    if vocab <= 0:
        raise CheckpointError(f"{path}: cannot tell the vocabulary size (no tokenizer.ggml.tokens, "
                              f"{arch}.vocab_size or token_embd.weight)")
    name = fields.get("general.name") or os.path.splitext(os.path.basename(path))[0]
    cfg = ModelConfig(
        name=str(name), vocab_size=vocab, d_model=d, n_layers=int(a("block_count")), n_heads=n_heads,
        n_kv_heads=int(fields.get(f"{arch}.attention.head_count_kv", n_heads)), head_dim=head_dim,
        d_ff=int(a("feed_forward_length")), rms_eps=_f32(a("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(fields.get(f"{arch}.rope.freq_base", 10000.0)), rope_layout="pairs",
        max_seq_len=int(fields.get(f"{arch}.context_length", 2048)),
        tie_embeddings="output.weight" not in tensors, mixer="attention")
    try:
        cfg = dataclasses.replace(cfg, rope_scaling=_rope_scaling(fields, tensors, arch, cfg, path))
        return cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _rope_scaling(fields: dict, tensors: dict, arch: str, cfg: ModelConfig, path: str) -> Optional[RopeScaling]:
    """RoPE scaling as llama.cpp stores it: {arch}.rope.scaling.type 'linear' + factor, or a
    rope_freqs.weight tensor of per-frequency divisors (what convert_hf_to_gguf writes for Llama 3's
    rope_type llama3; recognised as llama3 when it matches, kept as freq_factors otherwise).
    Types marjax does not compute (yarn, longrope, ...) are refused, never silently dropped."""
    kind = str(fields.get(f"{arch}.rope.scaling.type", "none"))
    freqs = tensors.get("rope_freqs.weight")
    if kind not in ("none", "linear"):
        raise CheckpointError(f"{path}: RoPE scaling type {kind!r} is not supported (supported: none, linear, "
                              "rope_freqs factors); refusing to run it as plain RoPE")
    if kind == "linear":
        factor = float(fields.get(f"{arch}.rope.scaling.factor", 0.0))
        if freqs is not None or not factor > 0:
            raise CheckpointError(f"{path}: linear RoPE scaling needs {arch}.rope.scaling.factor > 0 (got {factor}) "
                                  "and no rope_freqs tensor")
        return RopeScaling("linear", factor=_f32(factor))
    if freqs is None:
        return None
    f = _dequant(freqs, path).reshape(-1).astype(np.float64)
    if f.shape != (cfg.head_dim // 2,) or not np.all(np.isfinite(f) & (f > 0)):
        raise CheckpointError(f"{path}: rope_freqs.weight must hold head_dim // 2 = {cfg.head_dim // 2} positive "
                              f"factors, got shape {f.shape}")
    orig = int(fields.get(f"{arch}.rope.scaling.original_context_length", 8192))
    llama3 = RopeScaling("llama3", factor=_f32(f.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                         original_max_position_embeddings=orig)
    plain = np.asarray(rope_inv_freq(cfg.head_dim, cfg.rope_theta), np.float64)
    if np.allclose(f, plain / np.asarray(rope_inv_freq(cfg.head_dim, cfg.rope_theta, llama3), np.float64),
                   rtol=1e-5, atol=0):
        return llama3
    return RopeScaling("freq_factors", factor=1.0, freq_factors=tuple(float(x) for x in f.astype(np.float32)))


def _f32(x) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(f"{float(x):.7g}")


def _dequant(t, path: str) -> np.ndarray:
    import gguf  # late import: the gguf package, only needed for GGUF files
    try:
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    except NotImplementedError:
        raise CheckpointError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which cannot be "
                              f"dequantised (supported: {QTYPES} and the other gguf.quants types)") from None


def read_gguf_model(path, dtype: Optional[str] = None):
    """(fields, tensors, ModelConfig) of a Llama-architecture GGUF file; a malformed metadata value
    is a CheckpointError naming the file. Shared by the whole-array and the sharded loaders."""
    path = os.fspath(path)
    fields, tensors = read_gguf(path)
    try:
        cfg = gguf_config(fields, tensors, path)
    except MarjaxError:
        raise
    except (TypeError, ValueError, OverflowError, AttributeError) as e:   # a metadata value of the wrong type
        raise CheckpointError(f"{path}: malformed GGUF metadata ({type(e).__name__}: {e})") from None
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype).validate()
    return fields, tensors, cfg


def load_gguf(path: str, dtype: Optional[str] = None):
    """(ModelConfig, LMParams, tokenizer or None) from a Llama-architecture GGUF file."""
    path = os.fspath(path)
    fields, tensors, cfg = read_gguf_model(path, dtype)
    top, layer = expected_shapes(cfg)
    required = [_TOP[k] for k in top] + [f"blk.{i}.{_LAYER[k]}" for i in range(cfg.n_layers) for k in layer]
    missing = [n for n in required if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 12} more)" if len(missing) > 12 else ""
        raise CheckpointError(f"{path}: missing tensors for config {cfg.name!r}: {missing[:12]}{more}")

    def get(key, i, shape):
        name = _TOP[key] if i is None else f"blk.{i}.{_LAYER[key]}"
        a = _dequant(tensors[name], path)
        transpose = len(shape) == 2 and key != "embed"   # file rows are (out, in); token_embd is (v, d)
        want = tuple(reversed(shape)) if transpose else tuple(shape)
        if a.shape != want:
            raise CheckpointError(f"{path}: tensor {name} has shape {a.shape} (rows, cols), expected {want} "
                                  f"for config {cfg.name!r}")
        return a.T if transpose else a

    params = build_params(cfg, get)
    return cfg, params, from_gguf_fields(fields, path)


def _qtype(name: str):
    import gguf  # late import: the gguf package, only needed for GGUF files
    if name not in _WRITE_QTYPES:
        raise MarjaxError(f"save_gguf qtype must be one of {_WRITE_QTYPES}, got {name!r}")
    return gguf.GGMLQuantizationType[name]


def save_gguf(path: str, cfg: ModelConfig, params, tokenizer=None, qtype: str = "F32") -> None:
    """Write a Llama GGUF the way llama.cpp's converter does (q/k in "pairs" order, 2-D weights
    quantised to `qtype`, norms F32). 2-D tensors whose input width is not a multiple of the
    quantisation block (32) stay F32."""
    import gguf  # late import: the gguf package, only needed for GGUF files
    if cfg.is_ssm:
        raise MarjaxError(f"save_gguf writes Llama (attention) models; config {cfg.name!r} has mixer='ssm'")
    cfg.validate()
    qt = _qtype(qtype)
    top, layers = params_to_numpy(cfg, params)
    if cfg.rope_layout == "half":
        for lay in layers:
            lay["wq"] = permute_half_to_pairs(lay["wq"], cfg.n_heads, cfg.head_dim)
            lay["wk"] = permute_half_to_pairs(lay["wk"], cfg.n_kv_heads, cfg.head_dim)

    w = gguf.GGUFWriter(os.fspath(path), "llama")
    w.add_name(cfg.name)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim * cfg.n_heads != cfg.d_model:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    rs = cfg.rope_scaling
    if rs is not None and rs.rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rs.factor)
    elif rs is not None:   # llama.cpp divides each frequency by rope_freqs[i]
        w.add_rope_scaling_orig_ctx_len(rs.original_max_position_embeddings)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_vocab_size(cfg.vocab_size)
    ftype = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
             "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
             "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[qtype]
    w.add_file_type(int(ftype))
    if tokenizer is not None:
        _write_tokenizer(w, tokenizer, cfg)

    def add(name, a):
        a = np.asarray(a, np.float32)
        if a.ndim == 1 or qt == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, np.ascontiguousarray(a))
            return
        if qt == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, np.ascontiguousarray(a.astype(np.float16)))
            return
        block = gguf.GGML_QUANT_SIZES[qt][0]
        if a.shape[-1] % block:
            w.add_tensor(name, np.ascontiguousarray(a))
            return
        w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(a), qt), raw_dtype=qt)

    if rs is not None and rs.rope_type != "linear":
        plain = np.asarray(rope_inv_freq(cfg.head_dim, cfg.rope_theta), np.float64)
        w.add_tensor("rope_freqs.weight", (plain / np.asarray(rope_inv_freq(cfg.head_dim, cfg.rope_theta, rs),
                                                                 np.float64)).astype(np.float32))
    for k, a in top.items():
        add(_TOP[k], a.T if a.ndim == 2 and k == "lm_head" else a)   # embed is already (v, d) rows
    for i, lay in enumerate(layers):
        for k, a in lay.items():
            add(f"blk.{i}.{_LAYER[k]}", a.T if a.ndim == 2 else a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_tokenizer(w, tok, cfg: ModelConfig) -> None:
    import gguf  # late import: the gguf package, only needed for GGUF files

    if tok.vocab_size > cfg.vocab_size:
        raise MarjaxError(f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}")
    if isinstance(tok, ByteTokenizer):
        w.add_tokenizer_model("marjax-bytes")
        w.add_token_list([tok.id_to_token(i) for i in range(256)])
    else:
        tokens, merges = tok.bpe_vocab_and_merges()
        special = tok.special_ids()
        w.add_tokenizer_model("gpt2")
        if not tok.pre:
            warnings.warn("the tokenizer's pre-tokenizer has no llama.cpp name; writing 'default' (GPT-2 split), "
                          "which may tokenize differently", stacklevel=3)
        w.add_tokenizer_pre(tok.pre or "default")
        w.add_token_list(tokens)
        w.add_token_types([int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
                           for i in range(len(tokens))])
        w.add_token_merges(merges)
        if tok.chat_template:
            w.add_chat_template(tok.chat_template)
    if tok.bos_id is not None:
        w.add_bos_token_id(tok.bos_id)
    if tok.eos_id is not None:
        w.add_eos_token_id(tok.eos_id)
    w.add_add_bos_token(bool(tok.add_bos))

