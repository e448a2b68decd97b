"""Device mesh and logical-axis sharding rules.

    mesh = make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2))     # axes ("data", "fsdp", "tensor")
    axes = logical_axes(params)        # same structure, a tuple of logical names per leaf
    shardings = param_shardings(params, mesh)                  # NamedSharding per leaf
    params = init_sharded(lambda: init_params(key, cfg), mesh)  # materialised already sharded

Logical names are what each param dataclass declares beside its fields (`marjax.typing.array`,
e.g. `AttnParams.wq` -> ("embed", "heads"), with "layers" in front under `LMParams.blocks`), so
the same walk names the leaves of an optimizer state whose moments mirror the params. An array
that no declaration covers is an error, not a silent replication. `ShardingRules` has one field
per logical name, holding its mesh axes; an unknown name is an error. A dimension that the mesh
axes do not divide stays replicated, so tiny models still run on 8 devices.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from marjax.config import MeshConfig
from marjax.errors import ConfigError
from marjax.typing import ArrayInfo, declarations

__all__ = ["AXES", "make_mesh", "ShardingRules", "DEFAULT_RULES", "logical_axes", "is_axes", "partition_spec",
           "param_shardings", "batch_sharding", "batch_shardings", "replicated", "init_sharded",
           "shard_params"]

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

def _shape(x) -> tuple:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _leaf_axes(x, where: str, lead: tuple, axes: Optional[tuple], trailing: Optional[tuple]) -> tuple:
    """The logical axes of one array: `lead + axes` when declared; `lead` + the last k of
    `trailing` for a leaf of an undeclared type below a subtree declaration; () for a scalar."""
    shape = _shape(x)
    if axes is not None:
        if len(shape) != len(lead) + len(axes):
            raise ConfigError(f"{where}: declared axes {lead + axes} do not fit an array of shape {shape}")
        return lead + axes
    k = len(shape) - len(lead)
    if trailing is not None and 0 <= k <= len(trailing):
        return lead + tuple(trailing[len(trailing) - k:])
    if not shape:
        return ()        # scalars (an optimizer's step count) are never sharded
    raise ConfigError(f"{where}: no logical axes are declared for this array of shape {shape} "
                      "(declare its field with marjax.typing.array / subtree)")


def _walk(node, where: str, lead: tuple, trailing: Optional[tuple], fn: Callable):
    """fn(logical axes, leaf) at every leaf below `node`, rebuilt into its structure."""
    if node is None:
        return None
    decl = declarations(node)
    if decl:
        kw = {}
        for name, info in decl.items():
            v, here = getattr(node, name), f"{where}.{name}"
            if v is None or not jax.tree_util.tree_leaves(v):
                kw[name] = v     # None, or an empty node (optax's MaskedNode for a frozen leaf)
            elif isinstance(info, ArrayInfo):
                kw[name] = fn(_leaf_axes(v, here, lead, info.axes, None), v)
            elif type(v) is tuple and info.lead and declarations(v[0]):
                # a stacked subtree held as a tuple of its slices along the first lead axis
                # (marjax.models.lm.unroll_layers): each slice has the other lead axes
                kw[name] = tuple(_walk(c, f"{here}[{i}]", lead + info.lead[1:], info.leaf_axes, fn)
                                 for i, c in enumerate(v))
            else:
                kw[name] = _walk(v, here, lead + info.lead, info.leaf_axes, fn)
        return type(node)(**kw)
    if hasattr(node, "shape") or isinstance(node, (int, float, complex, np.number)):
        return fn(_leaf_axes(node, where, lead, None, trailing), node)
    children, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    if jax.tree_util.treedef_is_leaf(treedef):
        return fn((), node)      # not an array (a string, an object): nothing to shard
    return jax.tree_util.tree_unflatten(
        treedef, [_walk(c, where + jax.tree_util.keystr(k), lead, trailing, fn) for k, c in children])


def is_axes(x) -> bool:
    """True for one leaf of `logical_axes`: a tuple of axis names (str or None). Unrolled layers
    make tuples of params too, so `type(x) is tuple` alone does not tell them apart."""
    return type(x) is tuple and all(a is None or isinstance(a, str) for a in x)


def logical_axes(tree, lead: tuple = ()) -> Any:
    """Same-structure pytree with a tuple of logical axis names (None: a dim never sharded) per
    array leaf, read from the param declarations. Works on params, on abstract params
    (ShapeDtypeStruct) and on optimizer states; `lead` names leading axes the tree's own
    declarations do not have (("layers",) for one stacked BlockParams). ConfigError for an array
    no declaration covers. (To map it against the params use `is_leaf=is_axes`.)"""
    return _walk(tree, "params", tuple(lead), None, lambda axes, _: axes)


def _map_with_axes(fn: Callable, tree):
    """fn(logical_axes, leaf) for every leaf, rebuilt into the tree's structure."""
    return _walk(tree, "params", (), None, fn)


# ----------------------------------------------------------------------------- rules

MeshAxes = Union[None, str, tuple]


@dataclass(frozen=True)
class ShardingRules:
    """One field per logical axis name: the mesh axis (a name, a tuple of names, or None =
    replicated) that dims of that name are split over. Unknown names raise, at construction
    (`replace`) and at lookup (`mesh_axes`); a rule naming an axis outside AXES, or one mesh axis
    twice, is refused."""
    batch: MeshAxes = ("data", "fsdp")
    embed: MeshAxes = "fsdp"
    vocab: MeshAxes = "tensor"
    heads: MeshAxes = "tensor"
    kv_heads: MeshAxes = "tensor"
    mlp: MeshAxes = "tensor"
    ssm_inner: MeshAxes = "tensor"
    ssm_heads: MeshAxes = "tensor"
    act: MeshAxes = None
    layers: MeshAxes = None
    seq: MeshAxes = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            target = self._targets(getattr(self, f.name))
            bad = [a for a in target if a not in AXES]
            if bad:
                raise ConfigError(f"ShardingRules.{f.name}: mesh axes must be among {AXES}, got {bad}")
            if len(set(target)) != len(target):
                raise ConfigError(f"ShardingRules.{f.name}: maps onto mesh axis {target} more than once")

    @staticmethod
    def _targets(value) -> tuple:
        if value is None:
            return ()
        return (value,) if isinstance(value, str) else tuple(value)

    def mesh_axes(self, logical: Optional[str]) -> tuple:
        """The mesh axes of a logical name (() for None or a replicated name)."""
        if logical is None:
            return ()
        if logical not in self.names():
            raise ConfigError(f"unknown logical axis {logical!r}; ShardingRules knows {self.names()}")
        return self._targets(getattr(self, logical))

    @classmethod
    def names(cls) -> tuple:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **overrides) -> "ShardingRules":
        """Rules with some logical names remapped, e.g. `.replace(embed=None)`."""
        unknown = sorted(set(overrides) - set(self.names()))
        if unknown:
            raise ConfigError(f"ShardingRules.replace: unknown logical axes {unknown}; known {self.names()}")
        return dataclasses.replace(self, **overrides)


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
