"""The shape legend and the param declarations (floor 0 of the layout).

Shape legend: the dimension names of the jaxtyping annotations in marjax's signatures

    b batch        l length (tokens)     h heads        p head dim      n SSM state dim
    d model width  v vocab               t micro-step   L layers (params stacked for lax.scan)

and, for weights, names built from them or the config: f MLP hidden width; hp = h * p (query
heads x head dim, or the SSM inner width); gp = KV heads x head dim; c conv channels
(hp + 2 h n); k conv kernel; w in_proj width (c + hp + h).

A param dataclass declares each leaf beside its field, as jax-llm-examples' `ArrayInfo` does:
its shape in legend names, its logical axes (the names `marjax.train.mesh.ShardingRules` maps to
mesh axes) and its init:

    @param_dataclass
    class MLPParams:
        gate: Float[Array, "d f"] = array(("d", "f"), ("embed", "mlp"), fan_in_normal)

    mlp = init_dataclass(MLPParams, {"d": 576, "f": 1536, "L": 30}, jnp.float32, keys)

A field holding nested params declares `subtree(...)`: its leaves take their own declarations,
with `lead` axes in front (the stacked "layers" of `LMParams.blocks`); params of a type that
declares nothing (an ATMN neuron) take `leaf_axes`, the trailing axes of each of their leaves.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

__all__ = ["LEGEND", "ArrayInfo", "SubtreeInfo", "array", "subtree", "param_dataclass", "declarations",
           "resolve_shape", "init_dataclass", "ones", "zeros", "constant", "normal", "fan_in_normal",
           "depth_scaled_normal", "identity_tap"]

LEGEND = {"b": "batch", "l": "length (tokens)", "h": "heads", "p": "head dim", "n": "SSM state dim",
          "d": "model width", "v": "vocab", "t": "micro-step", "L": "layers"}

PARAM_KEY = "marjax_param"     # the dataclass field metadata key holding an ArrayInfo / SubtreeInfo

Init = Callable[[Any, tuple, Any, dict], jax.Array]     # init(key, shape, dtype, dims) -> array


@dataclass(frozen=True)
class ArrayInfo:
    """One array leaf: shape (legend names), logical axes (one per dim, None = never sharded),
    init (None: the field is only ever filled by a loader)."""
    shape: tuple
    axes: tuple
    init: Optional[Init] = None

    def __post_init__(self):
        if len(self.shape) != len(self.axes):
            raise ValueError(f"ArrayInfo: shape {self.shape} and axes {self.axes} differ in length")


@dataclass(frozen=True)
class SubtreeInfo:
    """Nested params: `lead` logical axes prepended to every leaf below; `leaf_axes` the trailing
    axes of leaves of undeclared types (each leaf has between 0 and len(leaf_axes) of them)."""
    lead: tuple = ()
    leaf_axes: Optional[tuple] = None


def array(shape: tuple, axes: tuple, init: Optional[Init] = None, **field_kw):
    """A dataclass field declaring one array leaf (see ArrayInfo)."""
    return dataclasses.field(metadata={PARAM_KEY: ArrayInfo(tuple(shape), tuple(axes), init)}, **field_kw)


def subtree(lead: tuple = (), leaf_axes: Optional[tuple] = None, **field_kw):
    """A dataclass field declaring nested params (see SubtreeInfo)."""
    return dataclasses.field(metadata={PARAM_KEY: SubtreeInfo(tuple(lead), leaf_axes)}, **field_kw)


def param_dataclass(cls):
    """A registered pytree dataclass whose fields are declared with `array` / `subtree`. Its
    instances also hold non-array leaves (ShapeDtypeStructs, shardings, axis tuples from
    tree maps), so runtime type checkers (jaxtyping's import hook) skip its __init__: the
    declared shapes are checked against a config by `resolve_shape` users instead."""
    cls = jax.tree_util.register_dataclass(dataclass(cls))
    cls.__no_type_check__ = True
    undeclared = [f.name for f in dataclasses.fields(cls) if PARAM_KEY not in f.metadata]
    if undeclared:
        raise TypeError(f"{cls.__name__}: fields {undeclared} declare no shape/axes (use array() or subtree())")
    return cls


def declarations(cls_or_obj) -> dict:
    """{field name: ArrayInfo | SubtreeInfo} of a param dataclass; {} for any other type."""
    if not dataclasses.is_dataclass(cls_or_obj):
        return {}
    fields = dataclasses.fields(cls_or_obj)
    if not fields or any(PARAM_KEY not in f.metadata for f in fields):
        return {}
    return {f.name: f.metadata[PARAM_KEY] for f in fields}


def resolve_shape(info: ArrayInfo, dims: dict) -> tuple:
    """The concrete shape of a declared leaf, e.g. ("d", "f") with dims {"d": 64, "f": 128}."""
    missing = [n for n in info.shape if n not in dims]
    if missing:
        raise KeyError(f"dims {sorted(dims)} lack {missing} for a leaf of shape {info.shape}")
    return tuple(int(dims[n]) for n in info.shape)


def init_dataclass(cls, dims: dict, dtype, keys: Optional[dict] = None, **given):
    """An instance of param dataclass `cls`: each ArrayInfo field from its init (with keys[name]
    for random ones), subtree fields and any field in `given` taken as passed."""
    keys = keys or {}
    kw = {}
    for name, info in declarations(cls).items():
        if name in given:
            kw[name] = given[name]
        elif isinstance(info, SubtreeInfo) or info.init is None:
            raise TypeError(f"init_dataclass({cls.__name__}): field {name!r} has no init; pass it")
        else:
            kw[name] = info.init(keys.get(name), resolve_shape(info, dims), dtype, dims)
    return cls(**kw)


# ----------------------------------------------------------------------------- inits

def ones(key, shape, dtype, dims):
    return jnp.ones(shape, dtype)


def zeros(key, shape, dtype, dims):
    return jnp.zeros(shape, dtype)


def constant(value: float) -> Init:
    def init(key, shape, dtype, dims):
        return jnp.full(shape, value, dtype)
    return init


def normal(scale: float) -> Init:
    """scale * N(0, 1), drawn in float32 then cast (the same values for every dtype)."""
    def init(key, shape, dtype, dims):
        return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return init


def fan_in_normal(key, shape, dtype, dims):
    """N(0, 1 / fan_in), fan_in = shape[0] (an input projection)."""
    return normal(shape[0] ** -0.5)(key, shape, dtype, dims)


def depth_scaled_normal(key, shape, dtype, dims):
    """N(0, 1 / (fan_in * 2 L)): an output projection into the residual stream, scaled down with
    depth so the stream's variance does not grow with the layer count."""
    return normal(shape[0] ** -0.5 / (2 * dims["L"]) ** 0.5)(key, shape, dtype, dims)


def identity_tap(key, shape, dtype, dims):
    """A (k, c) causal conv kernel that passes its input through (tap 1 on the current token)."""
    return jnp.zeros(shape, dtype).at[-1].set(1.0)
