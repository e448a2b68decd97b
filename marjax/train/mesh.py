"""Device mesh and logical-axis sharding rules.

    mesh = make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2))     # axes ("data", "fsdp", "tensor")
    axes = logical_axes(params)        # same structure, a tuple of logical names per leaf
    shardings = param_shardings(params, mesh)                  # NamedSharding per leaf
    params = init_sharded(lambda: init_params(key, cfg), mesh)  # materialised already sharded

Logical names come from the dataclass field path of each leaf (`blocks.mixer.wq` ->
("layers", "embed", "heads")), so the same function names the leaves of an optimizer state
whose moments mirror the params (`...mu.blocks.mixer.wq`). `ShardingRules` maps each logical
name to mesh axes; a dimension that the mesh axes do not divide stays replicated, so tiny models
still run on 8 devices. Unknown leaves are replicated (with the `layers` axis named when they
sit under `blocks`), never an error: new param fields shard conservatively until named here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from marjax.config import MeshConfig
from marjax.errors import ConfigError

__all__ = ["AXES", "make_mesh", "ShardingRules", "DEFAULT_RULES", "logical_axes", "partition_spec",
           "param_shardings", "batch_sharding", "batch_shardings", "replicated", "init_sharded",
           "shard_params", "tree_names"]

AXES = ("data", "fsdp", "tensor")


def make_mesh(mcfg: MeshConfig = MeshConfig(), devices: Optional[Sequence] = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh. `data=-1` takes all devices left after fsdp x tensor.
    An explicit product smaller than the device count uses the first `product` devices."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    for name in ("fsdp", "tensor"):
        v = getattr(mcfg, name)
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"MeshConfig.{name} must be an integer >= 1, got {v!r}")
    if not isinstance(mcfg.data, int) or (mcfg.data < 1 and mcfg.data != -1):
        raise ConfigError(f"MeshConfig.data must be -1 (all remaining devices) or >= 1, got {mcfg.data!r}")
    inner = mcfg.fsdp * mcfg.tensor
    if mcfg.data == -1:
        if n % inner:
            raise ConfigError(f"MeshConfig fsdp x tensor = {mcfg.fsdp} x {mcfg.tensor} = {inner} does not divide "
                              f"the device count {n}")
        data = n // inner
    else:
        data = mcfg.data
        if n % (data * inner):
            raise ConfigError(f"MeshConfig data x fsdp x tensor = {data} x {mcfg.fsdp} x {mcfg.tensor} = "
                              f"{data * inner} does not divide the device count {n}")
    shape = (data, mcfg.fsdp, mcfg.tensor)
    # An explicit Mesh has Auto axis types: shardings flow through NamedSharding + jit in/out.
    return Mesh(np.array(devices[:math.prod(shape)], dtype=object).reshape(shape), AXES)


# ----------------------------------------------------------------------------- logical axes

# field name -> logical names, leading "layers" included for per-block leaves
_BLOCK_AXES = {
    "mixer_norm": ("layers", "embed"),
    "mlp_norm": ("layers", "embed"),
    # attention
    "wq": ("layers", "embed", "heads"),
    "wk": ("layers", "embed", "kv_heads"),
    "wv": ("layers", "embed", "kv_heads"),
    "wo": ("layers", "heads", "embed"),
    # SwiGLU MLP
    "gate": ("layers", "embed", "mlp"),
    "up": ("layers", "embed", "mlp"),
    "down": ("layers", "mlp", "embed"),
    # Discrete Mamba-2 mixer
    "in_proj": ("layers", "embed", "ssm_inner"),
    "out_proj": ("layers", "ssm_inner", "embed"),
    "conv_w": ("layers", None, "ssm_inner"),
    "conv_b": ("layers", "ssm_inner"),
    "z_bias": ("layers", "ssm_inner"),
    "D": ("layers", "ssm_heads"),
    "a_log_bias": ("layers", "ssm_heads"),
}
_TOP_AXES = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": ("embed",),
}


def tree_names(path) -> list:
    """The attribute / dict-key names along a key path (sequence indices skipped)."""
    out = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey):
            out.append(k.name)
        elif isinstance(k, jax.tree_util.DictKey):
            out.append(str(k.key))
    return out


def _axes_for(names: list, ndim: int) -> tuple:
    in_blocks = "blocks" in names
    last = names[-1] if names else None
    if in_blocks and "spikes" in names:
        # ATMN thresholds: (layers,) per site, or (layers, channels)
        axes = ("layers",) + ("act",) * (ndim - 1) if ndim >= 1 else ()
    elif in_blocks and last in _BLOCK_AXES:
        axes = _BLOCK_AXES[last]
    elif not in_blocks and last in _TOP_AXES:
        axes = _TOP_AXES[last]
    elif in_blocks and ndim >= 1:
        axes = ("layers",) + (None,) * (ndim - 1)
    else:
        axes = (None,) * ndim
    if len(axes) == ndim:
        return axes
    if axes and axes[0] == "layers" and len(axes) == ndim + 1:   # one block, no stacked axis
        return axes[1:]
    return (None,) * ndim


def _shape(x) -> tuple:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _map_with_axes(fn: Callable, tree):
    """fn(logical_axes, leaf) for every leaf, rebuilt into the tree's structure."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return jax.tree_util.tree_unflatten(
        treedef, [fn(_axes_for(tree_names(path), len(_shape(leaf))), leaf) for path, leaf in flat])


def logical_axes(tree) -> Any:
    """Same-structure pytree with a tuple of logical axis names (or None) per array leaf.
    Works on params, on abstract params (ShapeDtypeStruct) and on optimizer states. (To map
    it against the params use `is_leaf=lambda x: type(x) is tuple`.)"""
    return _map_with_axes(lambda axes, _: axes, tree)


# ----------------------------------------------------------------------------- rules

@dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axis (a name, a tuple of names, or None = replicated)."""
    rules: tuple = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("vocab", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("ssm_inner", "tensor"),
        ("ssm_heads", "tensor"),
        ("act", None),
        ("layers", None),
        ("seq", None),
    )

    def mesh_axes(self, logical: Optional[str]) -> tuple:
        if logical is None:
            return ()
        for name, target in self.rules:
            if name == logical:
                if target is None:
                    return ()
                return (target,) if isinstance(target, str) else tuple(target)
        return ()

    def replace(self, **overrides) -> "ShardingRules":
        """Rules with some logical names remapped, e.g. `.replace(embed=None)`."""
        known = dict(self.rules)
        known.update(overrides)
        return ShardingRules(tuple(known.items()))


DEFAULT_RULES = ShardingRules()


def partition_spec(axes: tuple, shape: tuple, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> P:
    """PartitionSpec for one array: each dim takes its rule's mesh axes when their product divides
    the dim (else it is replicated); a mesh axis is used at most once per array."""
    used, spec = set(), []
    for name, size in zip(axes, shape):
        target = [a for a in rules.mesh_axes(name) if a in mesh.shape and a not in used]
        n = math.prod(mesh.shape[a] for a in target)
        if not target or n == 1 or size % n:
            spec.append(None)
            continue
        used.update(target)
        spec.append(target[0] if len(target) == 1 else tuple(target))
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def param_shardings(params_or_shapes, mesh: Mesh, rules: Optional[ShardingRules] = None):
    """NamedSharding per leaf of params / abstract params / optimizer state."""
    rules = rules or DEFAULT_RULES
    return _map_with_axes(lambda a, x: NamedSharding(mesh, partition_spec(a, _shape(x), mesh, rules)),
                          params_or_shapes)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules: Optional[ShardingRules] = None, *, leading: int = 0) -> NamedSharding:
    """The batch dim (after `leading` unsharded dims, e.g. a micro-batch axis) over the batch
    mesh axes (default data x fsdp); the other dims replicated."""
    rules = rules or DEFAULT_RULES
    target = tuple(a for a in rules.mesh_axes("batch") if a in mesh.shape)
    return NamedSharding(mesh, P(*([None] * leading), target or None))


def batch_shardings(batch, mesh: Mesh, rules: Optional[ShardingRules] = None, *, leading: int = 0):
    """Per-leaf batch shardings for a concrete (or abstract) batch: the batch dim is split over
    as many of the batch mesh axes as divide it (all, then a prefix), else replicated."""
    rules = rules or DEFAULT_RULES
    target = [a for a in rules.mesh_axes("batch") if a in mesh.shape]

    def one(x):
        shape = _shape(x)
        if len(shape) <= leading:
            return replicated(mesh)
        for k in range(len(target), 0, -1):
            n = math.prod(mesh.shape[a] for a in target[:k])
            if shape[leading] % n == 0:
                return NamedSharding(mesh, P(*([None] * leading), tuple(target[:k])))
        return replicated(mesh)
    return jax.tree.map(one, batch)


def shard_params(params, mesh: Mesh, rules: Optional[ShardingRules] = None, *, copy: bool = False):
    """Place params by the rules. `copy=True` never aliases the input buffers (so donating the
    result cannot delete the caller's arrays)."""
    sh = param_shardings(params, mesh, rules)
    return jax.device_put(params, sh, may_alias=False if copy else None)


def init_sharded(init_fn: Callable, mesh: Mesh, rules: Optional[ShardingRules] = None, *args):
    """Run `init_fn(*args)` under jit with out_shardings from the rules, so each device only
    materialises its own shards."""
    shapes = jax.eval_shape(init_fn, *args)
    return jax.jit(init_fn, out_shardings=param_shardings(shapes, mesh, rules))(*args)
