"""HF-style checkpoints: config.json + safetensors (one file or an index of shards).

Three dialects, told apart by config.json:
  llama    LlamaForCausalLM (model.layers.N.self_attn.q_proj.weight ...); rope layout "half".
  marjax   our SSM / spiking models: the same names for embeddings, norms and MLP, the mixer as
           model.layers.N.mixer.{in_proj,out_proj}.weight, mixer.conv1d.{weight (C,1,K),bias},
           mixer.D, mixer.z_bias, mixer.a_log_bias, ATMN params as model.layers.N.spikes.<site>.<leaf>;
           the exact ModelConfig sits under the "marjax" key (attention models saved by marjax carry
           it too, next to the ordinary Llama fields).
  llamba   cartesia-ai Llamba (cartesia_pytorch LlambaLMHeadModel / DiscreteMamba2):
           backbone.embedding.weight, backbone.layers.N.{input_layernorm, post_attention_layernorm,
           mixer.{in_proj, conv1d, z_bias, D, out_proj}, mlp.{gate,up,down}_proj},
           backbone.final_layernorm.weight, lm_head.weight; config keys d_model, n_layer,
           vocab_size, pad_vocab_size_multiple, tie_embeddings, norm_epsilon, mlp_cfg, ssm_cfg.

All weights are stored torch-style (out, in); marjax keeps (in, out), so 2-D weights transpose.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional

import numpy as np

from marjax.config import ModelConfig, RopeScaling, SSMConfig, model_config_from_dict, replace, to_dict
from marjax.errors import CheckpointError, ConfigError, MarjaxError
import jax.numpy as jnp
from marjax.models.lm import BlockParams, LMParams
from marjax.nn.layers import AttnParams, MLPParams
from marjax.nn.mamba2 import MixerParams
from safetensors import safe_open
import jax
from marjax.models.lm import init_spike_sites
from marjax.io.tokenizer import load_tokenizer_dir
from safetensors.numpy import save_file

__all__ = ["load_hf", "save_hf", "save_llamba", "read_config", "detect_format", "expected_shapes",
           "build_params", "params_to_numpy", "SafetensorsDir", "rope_scaling_from_hf", "rope_scaling_to_hf", "unpermute_pairs_to_half",
           "permute_half_to_pairs"]

ATTN_KEYS = ("mixer_norm", "wq", "wk", "wv", "wo", "mlp_norm", "gate", "up", "down")
SSM_KEYS = ("mixer_norm", "in_proj", "conv_w", "conv_b", "D", "a_log_bias", "z_bias", "out_proj",
            "mlp_norm", "gate", "up", "down")

# key -> (name suffix, transform). T: transpose (out,in) <-> (in,out); conv: (C,1,K) <-> (K,C).
_LLAMA_LAYER = {"mixer_norm": ("input_layernorm.weight", None), "wq": ("self_attn.q_proj.weight", "T"),
                "wk": ("self_attn.k_proj.weight", "T"), "wv": ("self_attn.v_proj.weight", "T"),
                "wo": ("self_attn.o_proj.weight", "T"), "mlp_norm": ("post_attention_layernorm.weight", None),
                "gate": ("mlp.gate_proj.weight", "T"), "up": ("mlp.up_proj.weight", "T"),
                "down": ("mlp.down_proj.weight", "T")}
_SSM_LAYER = {"mixer_norm": ("input_layernorm.weight", None), "in_proj": ("mixer.in_proj.weight", "T"),
              "conv_w": ("mixer.conv1d.weight", "conv"), "conv_b": ("mixer.conv1d.bias", None),
              "D": ("mixer.D", None), "a_log_bias": ("mixer.a_log_bias", None), "z_bias": ("mixer.z_bias", None),
              "out_proj": ("mixer.out_proj.weight", "T"), "mlp_norm": ("post_attention_layernorm.weight", None),
              "gate": ("mlp.gate_proj.weight", "T"), "up": ("mlp.up_proj.weight", "T"),
              "down": ("mlp.down_proj.weight", "T")}
_HF_TOP = {"embed": ("model.embed_tokens.weight", None), "final_norm": ("model.norm.weight", None),
           "lm_head": ("lm_head.weight", "T")}
_LLAMBA_TOP = {"embed": ("backbone.embedding.weight", None), "final_norm": ("backbone.final_layernorm.weight", None),
               "lm_head": ("lm_head.weight", "T")}


# ----------------------------------------------------------------------------- layouts
def permute_half_to_pairs(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """q/k columns (in, heads*hd) from HF rotate-half order to llama.cpp's adjacent pairs: within
    a head, column 2i+j takes column j*hd/2+i (what convert_hf_to_gguf's permute does to rows)."""
    d = w.shape[0]
    return w.reshape(d, n_heads, 2, head_dim // 2).swapaxes(2, 3).reshape(d, n_heads * head_dim)


def unpermute_pairs_to_half(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    d = w.shape[0]
    return w.reshape(d, n_heads, head_dim // 2, 2).swapaxes(2, 3).reshape(d, n_heads * head_dim)


def _to_file(a: np.ndarray, kind) -> np.ndarray:
    if kind == "T":
        return np.ascontiguousarray(a.T)
    if kind == "conv":
        return np.ascontiguousarray(a.T[:, None, :])
    return a


def _from_file(a: np.ndarray, kind) -> np.ndarray:
    if kind == "T":
        return a.T
    if kind == "conv":
        return a[:, 0, :].T
    return a


def _file_shape(shape: tuple, kind) -> tuple:
    if kind == "T":
        return tuple(reversed(shape))
    if kind == "conv":
        return (shape[1], 1, shape[0])
    return tuple(shape)


# ----------------------------------------------------------------------------- params <-> arrays
def expected_shapes(cfg: ModelConfig) -> tuple[dict, dict]:
    """(top-level, per-layer) shapes in marjax's (in, out) layout."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    top = {"embed": (v, d), "final_norm": (d,)}
    if not cfg.tie_embeddings:
        top["lm_head"] = (d, v)
    layer = {"mixer_norm": (d,), "mlp_norm": (d,), "gate": (d, f), "up": (d, f), "down": (f, d)}
    if cfg.is_ssm:
        s = cfg.ssm
        layer.update(in_proj=(d, s.conv_dim + s.d_inner + s.n_heads), conv_w=(s.conv_kernel, s.conv_dim),
                     conv_b=(s.conv_dim,), D=(s.n_heads,), a_log_bias=(s.n_heads,), z_bias=(s.d_inner,),
                     out_proj=(s.d_inner, d))
    else:
        hq, hkv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        layer.update(wq=(d, hq), wk=(d, hkv), wv=(d, hkv), wo=(hq, d))
    return top, layer


def build_params(cfg: ModelConfig, get: Callable[[str, Optional[int], tuple], np.ndarray], spikes=None):
    """LMParams from `get(key, layer_or_None, expected_shape) -> np.ndarray` (marjax layout; the
    getter checks shapes). Layers are stacked along axis 0 and cast to cfg.dtype."""


    dtype = jnp.dtype(cfg.dtype)
    top, layer = expected_shapes(cfg)
    keys = SSM_KEYS if cfg.is_ssm else ATTN_KEYS

    def stacked(k):
        return jnp.asarray(np.stack([np.asarray(get(k, i, layer[k]), np.float32) for i in range(cfg.n_layers)]),
                           dtype)

    L = {k: stacked(k) for k in keys}
    if cfg.is_ssm:
        mixer = MixerParams(in_proj=L["in_proj"], conv_w=L["conv_w"], conv_b=L["conv_b"], D=L["D"],
                            a_log_bias=L["a_log_bias"], z_bias=L["z_bias"], out_proj=L["out_proj"])
    else:
        mixer = AttnParams(wq=L["wq"], wk=L["wk"], wv=L["wv"], wo=L["wo"])
    blocks = BlockParams(mixer_norm=L["mixer_norm"], mixer=mixer, mlp_norm=L["mlp_norm"],
                         mlp=MLPParams(gate=L["gate"], up=L["up"], down=L["down"]), spikes=spikes)
    arr = lambda k: jnp.asarray(np.asarray(get(k, None, top[k]), np.float32), dtype)  # noqa: E731
    return LMParams(embed=arr("embed"), blocks=blocks, final_norm=arr("final_norm"),
                    lm_head=arr("lm_head") if "lm_head" in top else None)


def params_to_numpy(cfg: ModelConfig, params) -> tuple[dict, dict]:
    """(top, per-layer list of dicts) of numpy arrays in marjax layout, keyed like expected_shapes."""
    top_shapes, layer_shapes = expected_shapes(cfg)
    b = params.blocks
    src = {"mixer_norm": b.mixer_norm, "mlp_norm": b.mlp_norm, "gate": b.mlp.gate, "up": b.mlp.up,
           "down": b.mlp.down}
    for k in (SSM_KEYS if cfg.is_ssm else ATTN_KEYS):
        if k not in src:
            src[k] = getattr(b.mixer, k)
    full = {k: np.asarray(v) for k, v in src.items()}
    for k, shape in layer_shapes.items():
        if full[k].shape != (cfg.n_layers,) + shape:
            raise MarjaxError(f"params.blocks {k} has shape {full[k].shape}, config {cfg.name!r} expects "
                              f"{(cfg.n_layers,) + shape}")
    layers = [{k: full[k][i] for k in layer_shapes} for i in range(cfg.n_layers)]
    top = {"embed": np.asarray(params.embed), "final_norm": np.asarray(params.final_norm)}
    if not cfg.tie_embeddings:
        if params.lm_head is None:
            raise MarjaxError(f"config {cfg.name!r} has tie_embeddings=False but params.lm_head is None")
        top["lm_head"] = np.asarray(params.lm_head)
    for k, shape in top_shapes.items():
        if top[k].shape != shape:
            raise MarjaxError(f"params.{k} has shape {top[k].shape}, config {cfg.name!r} expects {shape}")
    return top, layers


# ----------------------------------------------------------------------------- safetensors
class SafetensorsDir:
    """The tensors of model.safetensors or of the shards listed in model.safetensors.index.json."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    wmap = json.load(f)["weight_map"]
                if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
                    raise TypeError("weight_map must map tensor names to shard file names")
            except (ValueError, KeyError, TypeError, RecursionError) as e:   # JSON/Unicode errors are ValueErrors
                raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from None
            files = sorted(set(wmap.values()))
            bad = [fn for fn in files if os.path.basename(fn) != fn or fn in ("", ".", "..")]
            if bad:   # shard names are plain files of this directory, never paths out of it
                raise CheckpointError(f"{index}: shard names must be file names inside {path}, got {bad[:3]}")
        elif os.path.exists(single):
            wmap, files = None, ["model.safetensors"]
        else:
            extra = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth"))]
            hint = f" (found {extra}: only safetensors are supported)" if extra else ""
            raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
        self._handles, self._where = {}, {}
        for fn in files:
            full = os.path.join(path, fn)
            if not os.path.exists(full):
                raise CheckpointError(f"{full}: shard listed in model.safetensors.index.json is missing")
            _check_safetensors_header(full)
            try:
                h = safe_open(full, framework="numpy")
                names = list(h.keys())
            except Exception as e:  # SafetensorError: header/size problems
                raise CheckpointError(f"{full}: corrupt or truncated safetensors file ({e})") from None
            self._handles[fn] = h
            for n in names:
                self._where[n] = fn
        if wmap is not None:
            lost = [n for n, fn in wmap.items() if self._where.get(n) != fn]
            if lost:
                raise CheckpointError(f"{index}: tensors listed but not found in their shard: {lost[:10]}")

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> str:
        return os.path.join(self.path, self._where[name])

    @property
    def source(self) -> str:
        """The file(s) tensors come from, for messages."""
        files = sorted(self._handles)
        return os.path.join(self.path, files[0] if len(files) == 1 else "model.safetensors.index.json")

    def keys(self):
        return self._where.keys()

    def get(self, name: str) -> np.ndarray:
        fn = self._where[name]
        try:
            a = self._handles[fn].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{os.path.join(self.path, fn)}: cannot read tensor {name} ({e})") from None
        if a.dtype.name not in FLOAT_DTYPES:
            raise CheckpointError(f"{os.path.join(self.path, fn)}: tensor {name} has dtype {a.dtype.name}, expected "
                                  f"a float type ({', '.join(FLOAT_DTYPES)})")
        return a

    def slice_of(self, name: str):
        """A lazy view of one tensor: indexing it reads only that block from the file (sharded loads)."""
        try:
            sl = self._handles[self._where[name]].get_slice(name)
            kind = sl.get_dtype()
        except Exception as e:
            raise CheckpointError(f"{self.file_of(name)}: cannot read tensor {name} ({e})") from None
        if kind not in _SLICE_DTYPES:
            raise CheckpointError(f"{self.file_of(name)}: tensor {name} has dtype {kind}, expected a float type "
                                  f"({', '.join(FLOAT_DTYPES)})")
        return sl

    def shape_of(self, name: str) -> tuple:
        return tuple(int(n) for n in self.slice_of(name).get_shape())


FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_SLICE_DTYPES = ("F16", "BF16", "F32", "F64")     # the same, as safetensors headers spell them
_MAX_HEADER = 100 << 20   # safetensors' own limit on the JSON header


def _check_safetensors_header(full: str) -> None:
    """The 8-byte header length must fit the file (and safetensors' 100 MB limit) before anything
    reads it: a hostile length never becomes an allocation."""
    size = os.path.getsize(full)
    with open(full, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{full}: corrupt or truncated safetensors file ({size} bytes, no header length)")
    n = int.from_bytes(head, "little")
    if n > size - 8 or n > _MAX_HEADER:
        raise CheckpointError(f"{full}: corrupt or truncated safetensors file (header length {n} exceeds the "
                              f"file's {size} bytes or the {_MAX_HEADER}-byte limit)")


# ----------------------------------------------------------------------------- config.json
def read_config(path: str) -> dict:
    cp = os.path.join(path, "config.json")
    if not os.path.exists(cp):
        raise CheckpointError(f"{path}: no config.json")
    try:
        with open(cp, encoding="utf-8") as f:
            conf = json.load(f)
    except (ValueError, RecursionError) as e:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{cp}: invalid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(conf, dict):
        raise CheckpointError(f"{cp}: expected a JSON object, got {type(conf).__name__}")
    return conf


def detect_format(conf: dict) -> str:
    """'marjax', 'llamba' or 'llama' for a parsed config.json."""
    if "marjax" in conf:
        return "marjax"
    if conf.get("model_type") == "llamba" or "ssm_cfg" in conf:
        return "llamba"
    archs = conf.get("architectures") or []
    if conf.get("model_type") == "llama" or "LlamaForCausalLM" in archs:
        return "llama"
    raise CheckpointError(f"config.json: unsupported model (model_type={conf.get('model_type')!r}, "
                          f"architectures={archs}); supported: Llama (LlamaForCausalLM), cartesia Llamba, "
                          "marjax-saved models")


def _need(conf: dict, key: str, cp: str):
    if key not in conf:
        raise CheckpointError(f"{cp}: missing field {key!r}")
    return conf[key]


def _llama_config(conf: dict, cp: str, name: str) -> ModelConfig:
    if conf.get("attention_bias") or conf.get("mlp_bias"):
        raise CheckpointError(f"{cp}: attention_bias/mlp_bias=true is not supported (marjax Llama has no biases)")
    act = conf.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{cp}: hidden_act must be 'silu', got {act!r}")
    d, h = int(_need(conf, "hidden_size", cp)), int(_need(conf, "num_attention_heads", cp))
    rope = conf.get("rope_parameters") if isinstance(conf.get("rope_parameters"), dict) else {}
    return ModelConfig(
        name=name, vocab_size=int(_need(conf, "vocab_size", cp)), d_model=d,
        n_layers=int(_need(conf, "num_hidden_layers", cp)), n_heads=h,
        n_kv_heads=int(conf.get("num_key_value_heads") or h), head_dim=int(conf.get("head_dim") or d // h),
        d_ff=int(_need(conf, "intermediate_size", cp)), rms_eps=float(conf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", conf.get("rope_theta", 10000.0))), rope_layout="half",
        max_seq_len=int(conf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(conf.get("tie_word_embeddings", False)), mixer="attention",
        rope_scaling=rope_scaling_from_hf(conf, cp))


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_scaling_from_hf(conf: dict, cp: str = "config.json") -> Optional[RopeScaling]:
    """RopeScaling from config.json: the hub's `rope_scaling` {"rope_type" (or the older "type"):
    ..., ...} or transformers 5's `rope_parameters` (which also holds rope_theta). Only the types
    marjax computes exactly as transformers are accepted; anything else is an error, never a
    silent plain RoPE."""
    rs = conf.get("rope_scaling")
    if rs is None and isinstance(conf.get("rope_parameters"), dict):
        rs = conf["rope_parameters"]
    if rs is None or rs == {}:
        return None
    if not isinstance(rs, dict):
        raise CheckpointError(f"{cp}: rope_scaling must be an object or null, got {type(rs).__name__}")
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default") and not set(rs) - {"rope_type", "type", "rope_theta"}:
        return None
    try:
        if kind == "llama3":
            missing = [k for k in _LLAMA3_KEYS if k not in rs]
            if missing:
                raise CheckpointError(f"{cp}: rope_scaling of rope_type 'llama3' lacks {missing}")
            return RopeScaling("llama3", factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                               high_freq_factor=float(rs["high_freq_factor"]),
                               original_max_position_embeddings=int(rs["original_max_position_embeddings"])
                               ).validate()
        if kind == "linear":
            if "factor" not in rs:
                raise CheckpointError(f"{cp}: rope_scaling of rope_type 'linear' lacks 'factor'")
            return RopeScaling("linear", factor=float(rs["factor"])).validate()
    except (TypeError, ValueError) as e:   # ConfigError is a ValueError
        raise CheckpointError(f"{cp}: bad rope_scaling {rs!r} ({e})") from None
    raise CheckpointError(f"{cp}: rope_scaling rope_type {kind!r} is not supported (supported: 'llama3', "
                          f"'linear', or none); refusing to load with plain RoPE, which would give wrong logits")


def rope_scaling_to_hf(cfg: ModelConfig) -> Optional[dict]:
    """The hub's config.json spelling of cfg.rope_scaling."""
    r = cfg.rope_scaling
    if r is None:
        return None
    if r.rope_type == "linear":
        return {"rope_type": "linear", "factor": r.factor}
    if r.rope_type == "llama3":
        return {"rope_type": "llama3", "factor": r.factor, "low_freq_factor": r.low_freq_factor,
                "high_freq_factor": r.high_freq_factor,
                "original_max_position_embeddings": r.original_max_position_embeddings}
    raise MarjaxError(f"config {cfg.name!r}: rope_scaling of rope_type {r.rope_type!r} (per-frequency factors "
                      "from a GGUF) has no transformers config.json spelling; save it as GGUF instead")


def _llamba_config(conf: dict, cp: str, name: str, embed_rows: Optional[int]) -> tuple[ModelConfig, int]:
    """(config, n_qk_heads). Vocab is padded to pad_vocab_size_multiple like LlambaLMHeadModel."""
    ssm, mlp = dict(conf.get("ssm_cfg") or {}), dict(conf.get("mlp_cfg") or {})
    if conf.get("lm_head_bias") or mlp.get("bias") or ssm.get("bias"):
        raise CheckpointError(f"{cp}: biases in lm_head/mlp/in_proj (lm_head_bias, mlp_cfg.bias, ssm_cfg.bias) "
                              "are not supported")
    if ssm.get("activation", "identity") != "identity":
        raise CheckpointError(f"{cp}: ssm_cfg.activation must be 'identity', got {ssm.get('activation')!r}")
    if mlp.get("act_fn", "silu") != "silu":
        raise CheckpointError(f"{cp}: mlp_cfg.act_fn must be 'silu', got {mlp.get('act_fn')!r}")
    d = int(_need(conf, "d_model", cp))
    v = int(_need(conf, "vocab_size", cp))
    pad = int(conf.get("pad_vocab_size_multiple", 8) or 1)
    v = v + (-v) % pad
    if embed_rows is not None and embed_rows != v:
        raise CheckpointError(f"{cp}: vocab_size {conf['vocab_size']} padded to a multiple of {pad} is {v}, "
                              f"but backbone.embedding.weight has {embed_rows} rows")
    n_v = int(ssm.get("n_v_heads", 32))
    n_qk = int(ssm.get("n_qk_heads", n_v))
    d_inner = int(ssm.get("expand", 1)) * d
    if d_inner % n_v or n_v % n_qk:
        raise CheckpointError(f"{cp}: ssm_cfg needs d_inner ({d_inner}) divisible by n_v_heads ({n_v}) and "
                              f"n_v_heads divisible by n_qk_heads ({n_qk})")
    p = d_inner // n_v
    sc = SSMConfig(n_heads=n_v, head_dim=p, state_dim=int(ssm.get("d_state", 64)),
                   conv_kernel=int(ssm.get("d_conv", 4)), chunk_size=int(ssm.get("chunk_size", 128)))
    cfg = ModelConfig(name=name, vocab_size=v, d_model=d, n_layers=int(_need(conf, "n_layer", cp)),
                      n_heads=n_v, n_kv_heads=n_v, head_dim=p, d_ff=int(_need(mlp, "intermediate_size", cp)),
                      rms_eps=float(conf.get("norm_epsilon", 1e-5)), max_seq_len=int(conf.get("max_seq_len", 131072)),
                      tie_embeddings=bool(conf.get("tie_embeddings", False)), mixer="ssm", ssm=sc)
    return cfg, n_qk


def _validated(cfg: ModelConfig, cp: str) -> ModelConfig:
    try:
        return cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{cp}: {e}") from None


# ----------------------------------------------------------------------------- load
def _make_getter(st: SafetensorsDir, top_names: dict, layer_names: dict, prefix: str, defaults: dict,
                 cfg: ModelConfig, fix: Optional[Callable] = None, cp: str = "config.json"):
    def name_of(key, i):
        tmpl, kind = (top_names if i is None else layer_names)[key]
        return (tmpl if i is None else f"{prefix}{i}.{tmpl}"), kind

    top, layer = expected_shapes(cfg)
    required = [name_of(k, None)[0] for k in top if k not in defaults]
    required += [name_of(k, i)[0] for i in range(cfg.n_layers) for k in layer if k not in defaults]
    missing = [n for n in required if n not in st]
    if missing:
        more = f" (and {len(missing) - 12} more)" if len(missing) > 12 else ""
        raise CheckpointError(f"{st.source}: missing tensors for config {cfg.name!r} ({cp}): {missing[:12]}{more}")

    def get(key, i, shape):
        name, kind = name_of(key, i)
        if name not in st and key in defaults:
            return defaults[key]()
        raw = st.get(name)
        if fix is not None:
            raw = fix(key, raw)
        want = _file_shape(shape, kind)
        if tuple(raw.shape) != want:
            raise CheckpointError(f"{st.file_of(name)}: tensor {name} has shape {tuple(raw.shape)}, expected {want} "
                                  f"for config {cfg.name!r} ({cp})")
        return _from_file(np.asarray(raw, np.float32), kind)
    return get


def _load_spikes(st: SafetensorsDir, cfg: ModelConfig):
    """ATMN params: a template from init_spike_sites gives structure and shapes."""

    template = init_spike_sites(cfg)
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, leaf in paths:
        stack = []
        for i in range(cfg.n_layers):
            name = f"model.layers.{i}.spikes.{_path_name(path)}"
            if name not in st:
                raise CheckpointError(f"{st.source}: missing tensor {name} (spiking config {cfg.name!r})")
            a = st.get(name)
            if tuple(a.shape) != tuple(np.shape(leaf)):
                raise CheckpointError(f"{st.file_of(name)}: tensor {name} has shape {tuple(a.shape)}, expected "
                                      f"{tuple(np.shape(leaf))}")
            stack.append(np.asarray(a, np.float32))
        leaves.append(jnp.asarray(np.stack(stack), jnp.asarray(leaf).dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _path_name(path) -> str:
    parts = []
    for p in path:
        for attr in ("name", "key", "idx"):
            if hasattr(p, attr):
                parts.append(str(getattr(p, attr)))
                break
    return ".".join(parts)


def load_hf(path: str, dtype: Optional[str] = None):
    """(ModelConfig, LMParams, tokenizer or None) from an HF-style model directory: a Llama
    checkpoint, a marjax-saved model, or a cartesia Llamba checkpoint (see module doc)."""

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    conf = read_config(path)
    cp = os.path.join(path, "config.json")
    name = os.path.basename(os.path.normpath(path))
    st = SafetensorsDir(path)
    try:
        fmt, cfg, names, defaults, fix = _config_for(conf, cp, name, st, dtype)
    except MarjaxError:
        raise
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, AttributeError, KeyError) as e:
        # a field of the wrong type or value (a string for a size, 0 heads, ...)
        raise CheckpointError(f"{cp}: malformed config ({type(e).__name__}: {str(e)[:200]})") from None
    top_names, layer_names, prefix = names
    if cfg.n_layers > len(st.keys()):   # before any per-layer work: the count comes from the file
        raise CheckpointError(f"{cp}: {cfg.n_layers} layers, but {st.source} holds only {len(st.keys())} tensors")
    get = _make_getter(st, top_names, layer_names, prefix, defaults, cfg, fix, cp)
    spikes = _load_spikes(st, cfg) if cfg.is_spiking else None
    params = build_params(cfg, get, spikes)
    return cfg, params, load_tokenizer_dir(path)


def _config_for(conf: dict, cp: str, name: str, st: SafetensorsDir, dtype: Optional[str]):
    """(format, ModelConfig, (top names, layer names, layer prefix), default tensors, fix) of a config.json."""
    fmt = detect_format(conf)
    defaults, fix = {}, None
    if fmt == "marjax":
        try:
            cfg = model_config_from_dict(conf["marjax"])
        except (TypeError, ConfigError) as e:
            raise CheckpointError(f"{cp}: bad 'marjax' config ({e})") from None
        top_names, layer_names, prefix = _HF_TOP, (_SSM_LAYER if cfg.is_ssm else _LLAMA_LAYER), "model.layers."
    elif fmt == "llama":
        cfg = _validated(_llama_config(conf, cp, name), cp)
        top_names, layer_names, prefix = _HF_TOP, _LLAMA_LAYER, "model.layers."
    else:
        rows = st.get("backbone.embedding.weight").shape[0] if "backbone.embedding.weight" in st else None
        cfg, n_qk = _llamba_config(conf, cp, name, rows)
        cfg = _validated(cfg, cp)
        top_names, layer_names, prefix = _LLAMBA_TOP, _SSM_LAYER, "backbone.layers."
        sc = cfg.ssm
        defaults = {"a_log_bias": lambda: np.zeros((sc.n_heads,), np.float32)}
        if not (conf.get("ssm_cfg") or {}).get("conv_bias", True):
            defaults["conv_b"] = lambda: np.zeros((sc.conv_dim,), np.float32)
        if n_qk != sc.n_heads:
            fix = _llamba_group_expander(sc, n_qk)
    if dtype is not None:
        cfg = _validated(replace(cfg, dtype=dtype), cp)
    return fmt, cfg, (top_names, layer_names, prefix), defaults, fix


def _llamba_group_expander(sc: SSMConfig, n_qk: int):
    """Llamba with n_qk_heads < n_v_heads shares B/C across groups of value heads (mamba_ssm's
    ngroups: head h reads group h // (H / n_qk)). marjax keeps B/C per head, so each group's
    B/C rows (in_proj) and conv channels are repeated."""
    h, p, n = sc.n_heads, sc.head_dim, sc.state_dim
    r = h // n_qk

    def expand_bc(a, axis):
        a = np.moveaxis(np.asarray(a), axis, 0)
        g = n_qk * n
        x, B, C, rest = a[:h * p], a[h * p:h * p + g], a[h * p + g:h * p + 2 * g], a[h * p + 2 * g:]
        B = np.repeat(B.reshape(n_qk, n, *B.shape[1:]), r, axis=0).reshape(h * n, *B.shape[1:])
        C = np.repeat(C.reshape(n_qk, n, *C.shape[1:]), r, axis=0).reshape(h * n, *C.shape[1:])
        return np.moveaxis(np.concatenate([x, B, C, rest], axis=0), 0, axis)

    def fix(key, raw):
        if key in ("in_proj", "conv_w", "conv_b"):
            return expand_bc(raw, 0)   # torch layouts: rows / channels first
        return raw
    return fix


# ----------------------------------------------------------------------------- save
def _write(path: str, tensors: dict, conf: dict, tokenizer) -> None:
    os.makedirs(path, exist_ok=True)
    for stale in ("model.safetensors.index.json",):
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(conf, f, indent=1)
    if tokenizer is not None:
        tokenizer.save_dir(path)


def _named_tensors(cfg, params, top_names, layer_names, prefix) -> dict:
    top, layers = params_to_numpy(cfg, params)
    out = {}
    for k, a in top.items():
        name, kind = top_names[k]
        out[name] = _to_file(a, kind)
    for i, layer in enumerate(layers):
        for k, a in layer.items():
            name, kind = layer_names[k]
            out[f"{prefix}{i}.{name}"] = _to_file(a, kind)
    return out


def save_hf(path: str, cfg: ModelConfig, params, tokenizer=None) -> None:
    """Write an HF-style directory: a Llama checkpoint for attention models (q/k converted to the
    rotate-half layout when params are in GGUF "pairs" layout), our SSM dialect otherwise, plus
    the tokenizer (tokenizer.json/tokenizer_config.json, or marjax_tokenizer.json for bytes)."""
    cfg.validate()
    path = os.fspath(path)
    if cfg.is_ssm:
        tensors = _named_tensors(cfg, params, _HF_TOP, _SSM_LAYER, "model.layers.")
        if cfg.is_spiking and params.blocks.spikes is not None:
            for p, leaf in jax.tree_util.tree_flatten_with_path(params.blocks.spikes)[0]:
                leaf = np.asarray(leaf)
                for i in range(cfg.n_layers):
                    tensors[f"model.layers.{i}.spikes.{_path_name(p)}"] = leaf[i]
        conf = {"architectures": ["MarjaxSSMForCausalLM"], "model_type": "marjax_ssm", "marjax": to_dict(cfg)}
        _write(path, tensors, conf, tokenizer)
        return
    if cfg.rope_layout == "pairs":
        b = params.blocks
        wq = np.stack([unpermute_pairs_to_half(np.asarray(w), cfg.n_heads, cfg.head_dim) for w in b.mixer.wq])
        wk = np.stack([unpermute_pairs_to_half(np.asarray(w), cfg.n_kv_heads, cfg.head_dim) for w in b.mixer.wk])
        mixer = dataclasses.replace(b.mixer, wq=wq, wk=wk)
        params = dataclasses.replace(params, blocks=dataclasses.replace(b, mixer=mixer))
        cfg = replace(cfg, rope_layout="half")
    tensors = _named_tensors(cfg, params, _HF_TOP, _LLAMA_LAYER, "model.layers.")
    conf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.d_model,
            "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta, "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_seq_len,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "rope_scaling": rope_scaling_to_hf(cfg),
            "torch_dtype": cfg.dtype, "marjax": to_dict(cfg)}
    if tokenizer is not None and getattr(tokenizer, "bos_id", None) is not None:
        conf["bos_token_id"], conf["eos_token_id"] = tokenizer.bos_id, tokenizer.eos_id
    _write(path, tensors, conf, tokenizer)


def save_llamba(path: str, cfg: ModelConfig, params, tokenizer=None) -> None:
    """Export an SSM model in the cartesia Llamba layout (n_qk_heads = n_v_heads). Llamba has no
    A_log bias, so a non-zero `a_log_bias` is an error rather than a silent change of the model."""
    if not cfg.is_ssm or cfg.is_spiking:
        raise MarjaxError(f"save_llamba needs a dense SSM config (mixer='ssm', atmn=None), got {cfg.name!r}")
    sc = cfg.ssm
    if sc.d_inner % cfg.d_model:
        raise MarjaxError(f"Llamba needs d_inner ({sc.d_inner}) to be a multiple of d_model ({cfg.d_model})")
    bias = np.asarray(params.blocks.mixer.a_log_bias)
    if np.any(bias != 0):
        raise MarjaxError(f"Llamba checkpoints have no A_log bias; params.blocks.mixer.a_log_bias is non-zero "
                          f"(max |b| = {float(np.abs(bias).max()):.3g}); fold it first or use save_hf")
    tensors = _named_tensors(cfg, params, _LLAMBA_TOP, _SSM_LAYER, "backbone.layers.")
    for i in range(cfg.n_layers):
        del tensors[f"backbone.layers.{i}.mixer.a_log_bias"]
    conf = {"model_type": "llamba", "d_model": cfg.d_model, "n_layer": cfg.n_layers, "vocab_size": cfg.vocab_size,
            "pad_vocab_size_multiple": 1, "tie_embeddings": cfg.tie_embeddings, "lm_head_bias": False,
            "norm_epsilon": cfg.rms_eps, "resid_dropout": 0.0,
            "mlp_cfg": {"intermediate_size": cfg.d_ff, "bias": False, "act_fn": "silu"},
            "ssm_cfg": {"d_state": sc.state_dim, "n_v_heads": sc.n_heads, "n_qk_heads": sc.n_heads,
                        "expand": sc.d_inner // cfg.d_model, "chunk_size": sc.chunk_size, "d_conv": sc.conv_kernel,
                        "activation": "identity", "bias": False, "conv_bias": True}}
    _write(os.fspath(path), tensors, conf, tokenizer)
