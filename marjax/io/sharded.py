"""Load checkpoints straight into their target shardings: each device reads only its slices.

    shardings = lambda shapes: param_shardings(shapes, mesh, rules)      # marjax.train.mesh
    cfg, params, tok = load_sharded("model.gguf", shardings)  # or an HF / Llamba / marjax model dir
    # with a mesh and rules, and marjax run dirs (Orbax) too: marjax.train.checkpoint.load_on_mesh

Every leaf becomes `jax.make_array_from_callback(shape, sharding, read)`: `shardings` maps the
abstract params of the checkpoint's config (ShapeDtypeStructs) to one sharding per leaf (io sits
below train, so the mesh rules come in as that function), and `read(index)` returns only that
device's block, read from the file:
  - safetensors (HF Llama, marjax SSM/spiking, cartesia Llamba): `safe_open(...).get_slice(name)[idx]`,
    the index mapped through the storage layout (transposed (out, in) weights, (C, 1, K) convs);
    Llamba checkpoints with shared B/C groups (n_qk_heads < n_v_heads) read the whole per-layer
    tensor of the expanded projections (the expansion interleaves rows) and slice it on the host;
  - GGUF: the rows of the memory-mapped tensor that hold the block are dequantised (quantised
    GGUF blocks run along a row, so a row range is the smallest unit to dequantise);
  - (Orbax run directories restore onto `ShapeDtypeStruct(..., sharding=...)` targets: see
    marjax.train.checkpoint.load_model_dir / load_on_mesh);
  - a preset name: random params initialised under jit with the target out_shardings.
No full unsharded copy of a sharded leaf is ever put on one device; host memory holds at most
one layer's tensor (or its block) at a time per callback. The layer axis of stacked block params
is read layer by layer, so a "layers" rule that shards it works too.
Values equal the unsharded loaders' (`load_gguf`, `load_hf`, `load_model_dir`) bit for bit.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional, Union

import gguf
import jax
import numpy as np

from marjax.config import PRESETS, preset
from marjax.errors import CheckpointError, MarjaxError, ModelNotFoundError
from marjax.io.gguf import _LAYER, _TOP, read_gguf_model
from marjax.io.hf import (SafetensorsDir, _config_for, _file_shape, _make_getter, _path_name, expected_shapes,
                         read_config)
from marjax.io.tokenizer import ByteTokenizer, from_gguf_fields, load_tokenizer_dir
from marjax.models.lm import init_params, init_spike_sites

__all__ = ["load_sharded", "load_gguf_sharded", "load_hf_sharded", "assemble_sharded", "abstract_params"]

Reader = Callable[[str, Optional[int], tuple], np.ndarray]   # (key, layer or None, index) -> block
Shardings = Union[Callable, object]     # abstract params -> shardings pytree, or that pytree itself


def _names(path) -> list:
    return _path_name(path).split(".")


def abstract_params(cfg):
    """ShapeDtypeStructs of `cfg`'s LMParams (nothing is allocated)."""
    return jax.eval_shape(lambda: init_params(jax.random.PRNGKey(0), cfg))


def _target(shardings: Shardings, shapes):
    sh = shardings(shapes) if callable(shardings) else shardings
    if jax.tree.structure(sh) != jax.tree.structure(shapes):
        raise CheckpointError(f"shardings: expected one sharding per param leaf ({jax.tree.structure(shapes)}), "
                              f"got {jax.tree.structure(sh)}")
    return sh


def assemble_sharded(cfg, read: Reader, shardings: Shardings, read_spike: Optional[Callable] = None):
    """LMParams of `cfg`, every leaf built by `jax.make_array_from_callback` in its sharding.
    `read(key, layer, index)` returns block `index` (a tuple of slices over the marjax-layout
    shape of one layer's tensor, or of the top-level tensor when layer is None) as numpy;
    `read_spike(site_path, layer, index)` does the same for ATMN params."""
    shapes = abstract_params(cfg)
    target = _target(shardings, shapes)
    spike_dtypes = {}
    if cfg.is_spiking:   # the unsharded loader keeps the template's dtype for ATMN params
        flat = jax.tree_util.tree_flatten_with_path(init_spike_sites(cfg))[0]
        spike_dtypes = {".".join(_names(p)): np.asarray(x).dtype for p, x in flat}

    def leaf(path, s, sh):
        names = _names(path)
        if names[:2] == ["blocks", "spikes"]:
            site = ".".join(names[2:])
            if read_spike is None:
                raise CheckpointError(f"no reader for the ATMN params of spiking config {cfg.name!r}")
            dtype, src, key = spike_dtypes.get(site, s.dtype), read_spike, site
        else:
            dtype, src, key = s.dtype, read, names[-1]

        def cb(index):
            idx = tuple(index)
            if names[0] != "blocks":
                return np.asarray(src(key, None, idx)).astype(dtype)
            # stacked block params: the layer axis is read layer by layer
            return np.stack([np.asarray(src(key, i, idx[1:])) for i in range(cfg.n_layers)[idx[0]]]).astype(dtype)
        return jax.make_array_from_callback(tuple(s.shape), sh, cb, dtype=dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes, target)


# ----------------------------------------------------------------------------- safetensors
def _st_reader(st: SafetensorsDir, cfg, names, defaults, fix, cp) -> Reader:
    top_names, layer_names, prefix = names
    get = _make_getter(st, top_names, layer_names, prefix, defaults, cfg, fix, cp)   # checks missing names
    top, layer = expected_shapes(cfg)
    fixed = ("in_proj", "conv_w", "conv_b") if fix is not None else ()

    def name_of(key, i):
        tmpl, kind = (top_names if i is None else layer_names)[key]
        return (tmpl if i is None else f"{prefix}{i}.{tmpl}"), kind

    # shapes from the headers before any data is read: a wrong file fails here, not in a callback
    for key, shape in list(top.items()) + list(layer.items()):
        for i in ([None] if key in top else range(cfg.n_layers)):
            name, kind = name_of(key, i)
            if key in fixed or name not in st:
                continue
            got = st.shape_of(name)
            if got != _file_shape(shape, kind):
                raise CheckpointError(f"{st.file_of(name)}: tensor {name} has shape {got}, expected "
                                      f"{_file_shape(shape, kind)} for config {cfg.name!r} ({cp})")

    def read(key, i, idx):
        name, kind = name_of(key, i)
        if key in fixed or name not in st:     # expanded B/C groups, absent defaults: whole layer, then slice
            return get(key, i, top[key] if i is None else layer[key])[idx]
        sl = st.slice_of(name)
        if kind == "T":                        # file (out, in) -> marjax (in, out)
            return np.asarray(sl[idx[1], idx[0]], np.float32).T
        if kind == "conv":                     # file (C, 1, K) -> marjax (K, C)
            return np.asarray(sl[idx[1], :, idx[0]], np.float32)[:, 0, :].T
        return np.asarray(sl[idx], np.float32)
    return read


def _st_spike_reader(st: SafetensorsDir, cfg):
    shapes = {".".join(_names(p)): tuple(np.shape(x))
              for p, x in jax.tree_util.tree_flatten_with_path(init_spike_sites(cfg))[0]}
    for site, shape in shapes.items():
        for i in range(cfg.n_layers):
            name = f"model.layers.{i}.spikes.{site}"
            if name not in st:
                raise CheckpointError(f"{st.source}: missing tensor {name} (spiking config {cfg.name!r})")
            if st.shape_of(name) != shape:
                raise CheckpointError(f"{st.file_of(name)}: tensor {name} has shape {st.shape_of(name)}, "
                                      f"expected {shape}")

    def read(site, i, idx):
        return np.asarray(st.slice_of(f"model.layers.{i}.spikes.{site}")[idx], np.float32)
    return read


def load_hf_sharded(path, shardings: Shardings, dtype: Optional[str] = None):
    """`load_hf` with every leaf created in its target sharding: (ModelConfig, LMParams,
    tokenizer or None) from an HF Llama, marjax SSM/spiking or cartesia Llamba directory."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    conf = read_config(path)
    cp = os.path.join(path, "config.json")
    st = SafetensorsDir(path)
    try:
        _, cfg, names, defaults, fix = _config_for(conf, cp, os.path.basename(os.path.normpath(path)), st, dtype)
    except MarjaxError:
        raise
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, AttributeError, KeyError) as e:
        raise CheckpointError(f"{cp}: malformed config ({type(e).__name__}: {str(e)[:200]})") from None
    read = _st_reader(st, cfg, names, defaults, fix, cp)
    spike = _st_spike_reader(st, cfg) if cfg.is_spiking else None
    return cfg, assemble_sharded(cfg, read, shardings, spike), load_tokenizer_dir(path)


# ----------------------------------------------------------------------------- gguf
def load_gguf_sharded(path, shardings: Shardings, dtype: Optional[str] = None):
    """`load_gguf` with every leaf created in its target sharding: each device dequantises only
    the rows of its blocks."""
    path = os.fspath(path)
    fields, tensors, cfg = read_gguf_model(path, dtype)
    top, layer = expected_shapes(cfg)

    def name_of(key, i):
        return _TOP[key] if i is None else f"blk.{i}.{_LAYER[key]}"

    def transposed(key, shape) -> bool:
        return len(shape) == 2 and key != "embed"      # file rows are (out, in); token_embd is (v, d)

    missing = []
    for key, shape in list(top.items()) + list(layer.items()):
        want = tuple(reversed(shape)) if transposed(key, shape) else tuple(shape)
        for i in ([None] if key in top else range(cfg.n_layers)):
            name = name_of(key, i)
            if name not in tensors:
                missing.append(name)
                continue
            got = tuple(int(n) for n in reversed(tensors[name].shape))   # ggml ne order -> numpy order
            if got != want:
                raise CheckpointError(f"{path}: tensor {name} has shape {got} (rows, cols), expected {want} "
                                      f"for config {cfg.name!r}")
    if missing:
        more = f" (and {len(missing) - 12} more)" if len(missing) > 12 else ""
        raise CheckpointError(f"{path}: missing tensors for config {cfg.name!r}: {missing[:12]}{more}")

    def rows(t, sl):
        try:
            return np.asarray(gguf.quants.dequantize(t.data[sl], t.tensor_type), np.float32)
        except NotImplementedError:
            raise CheckpointError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which cannot be "
                                  "dequantised") from None

    def read(key, i, idx):
        t = tensors[name_of(key, i)]
        shape = top[key] if i is None else layer[key]
        if len(shape) == 1:
            return rows(t, slice(None))[idx]
        if transposed(key, shape):             # marjax (in, out) block = file rows `out`, columns `in`
            return rows(t, idx[1])[:, idx[0]].T
        return rows(t, idx[0])[:, idx[1]]
    return cfg, assemble_sharded(cfg, read, shardings), from_gguf_fields(fields, path)


# ----------------------------------------------------------------------------- dispatch
def load_sharded(name_or_path, shardings: Shardings, *, dtype: Optional[str] = None):
    """(cfg, params, tokenizer) like `marjax.io.resolve_model`, every param leaf created in the
    sharding `shardings(abstract params)` gives it: a .gguf file, an HF / Llamba / marjax model
    directory, or a preset name (random params, initialised under jit with those out_shardings).
    Known model names and marjax run directories (Orbax): marjax.train.checkpoint.load_on_mesh."""
    name = os.fspath(name_or_path)
    if name.lower().endswith(".gguf"):
        if not os.path.isfile(name):
            raise ModelNotFoundError(f"GGUF file not found: {name}")
        return load_gguf_sharded(name, shardings, dtype)
    if os.path.isdir(name):
        if os.path.exists(os.path.join(name, "config.json")):
            return load_hf_sharded(name, shardings, dtype)
        raise ModelNotFoundError(f"directory {name} has no config.json (HF/Llamba/marjax model); a marjax run "
                                 "directory loads with marjax.train.checkpoint.load_on_mesh")
    if name in PRESETS:
        cfg = preset(name) if dtype is None else dataclasses.replace(preset(name), dtype=dtype).validate()
        init = lambda: init_params(jax.random.PRNGKey(0), cfg)   # noqa: E731
        params = jax.jit(init, out_shardings=_target(shardings, jax.eval_shape(init)))()
        return cfg, params, (ByteTokenizer() if cfg.vocab_size >= ByteTokenizer.vocab_size else None)
    raise ModelNotFoundError(f"unknown model {name!r}: pass a preset name, a .gguf file or a model directory")
