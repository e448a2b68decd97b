"""Flax NNX modules over the pure core: the same param pytrees, the same functions.

    from flax import nnx
    from marjax import nnx as mnx
    neuron = mnx.ATMN(64, marjax.ATMNConfig(T=4))              # y = neuron(x): marjax.spiking.atmn
    mixer = mnx.DiscreteMamba2(64, marjax.SSMConfig(), rngs=nnx.Rngs(0))   # marjax.nn.mamba2.mixer
    layer = mnx.SpikingLinear(64, 32, marjax.ATMNConfig(), rngs=nnx.Rngs(0))  # atmn(x) @ kernel
    model = mnx.LM.load("smollm2-135m-instruct")               # or mnx.LM(cfg, rngs=nnx.Rngs(0))
    logits = model(ids)
    params = model.to_params(); mnx.LM.from_params(params, cfg)   # lossless both ways

Every module mirrors one of the core's registered dataclasses field by field (one `nnx.Param`
per array leaf, nested dataclasses as submodules), rebuilds that dataclass in `to_params()` and
calls the core function on it, so there is one implementation of every layer. Each Param carries
its logical axis names (`nnx.with_partitioning`), read by `marjax.train.mesh.logical_axes` from the
param declarations the functional trainer shards with; `shard(module, mesh)` places a module by those rules.

`LM` runs its layers with `nnx.scan` over one stacked `SSMBlock` (params with a leading layer
axis, as in the core), each step calling `marjax.models.lm.block`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from marjax.api import Model, load
from marjax.config import ATMNConfig, ModelConfig, SSMConfig
from marjax.errors import ConfigError, MarjaxError
from marjax.models import lm
from marjax.nn import mamba2
from marjax.nn.layers import MLPParams, rms_norm
from marjax.spiking import ATMNParams, atmn, atmn_spikes, atmn_with_stats, init_atmn
from marjax.train.mesh import DEFAULT_RULES, ShardingRules, logical_axes, partition_spec
from marjax.typing import declarations

__all__ = ["ATMN", "DiscreteMamba2", "SSMBlock", "Block", "SpikingLinear", "SpikingLinearParams", "LM",
           "block_axes", "partition_specs", "shard"]


# ----------------------------------------------------------------------------- logical axes

def block_axes(tree, stacked: bool = False, path: tuple = ()):
    """Logical axis names for a per-block param tree (e.g. `MixerParams`, `BlockParams`), from
    the core's declarations, with "layers" in front when `stacked`. `path=("spikes", site)` names
    an ATMN neuron by its site in `SpikeSites` (the neuron's type declares no axes itself)."""
    lead = ("layers",) if stacked else ()
    if tuple(path[:1]) == ("spikes",):
        # axes in front of a neuron's one channel axis (an ensemble made with nnx.vmap) stay unsharded
        extra = max([jnp.ndim(x) - len(lead) - 1 for x in jax.tree.leaves(tree)] + [0])
        return getattr(logical_axes(lm.SpikeSites(**{path[1]: tree}), lead + (None,) * extra), path[1])
    return logical_axes(tree, lead)


def _param(value, axes) -> nnx.Param:
    # Annotation only (eager_sharding=False): placement goes through the core's rules in `shard`,
    # which also leaves dims replicated when the mesh axis does not divide them.
    return nnx.Param(nnx.with_partitioning(lambda: jnp.asarray(value), tuple(axes), eager_sharding=False)())


# ----------------------------------------------------------------------------- dataclass mirror

class _Mirror(nnx.Module):
    """A module holding one registered param dataclass: one attribute per field (an nnx.Param,
    a nested mirror module, or None)."""

    def _fill(self, params, axes, make=None):
        if not dataclasses.is_dataclass(params):
            raise MarjaxError(f"{type(self).__name__}: params must be a marjax param dataclass, "
                              f"got {type(params).__name__}")
        self._kind = type(params)
        for f in dataclasses.fields(params):
            v, ax = getattr(params, f.name), getattr(axes, f.name)
            if v is None:
                setattr(self, f.name, None)
            elif dataclasses.is_dataclass(v):
                sub = make(f.name, v, ax) if make is not None else None
                setattr(self, f.name, sub if sub is not None else _Node(v, ax, make))
            else:
                setattr(self, f.name, _param(v, ax))

    def to_params(self):
        """The core's param dataclass, holding this module's current values (no copy)."""
        kw = {}
        for f in dataclasses.fields(self._kind):
            v = getattr(self, f.name)
            kw[f.name] = None if v is None else v.to_params() if isinstance(v, _Mirror) else v.get_value()
        return self._kind(**kw)


class _Node(_Mirror):
    """Generic mirror for param dataclasses without a module of their own (AttnParams, MLPParams,
    SpikeSites)."""

    def __init__(self, params, axes, make=None):
        self._fill(params, axes, make)


# ----------------------------------------------------------------------------- ATMN

class ATMN(_Mirror):
    """ATMN neuron (MAR_SPEC.md section 3): `y = ATMN(...)(x)` is `marjax.spiking.atmn(x, params,
    cfg)`, the decoded ternary multi-step spikes with surrogate gradients. One Param `a`
    (log threshold), shape (n_channels,) for granularity "channel", () otherwise."""

    def __init__(self, n_channels: Optional[int] = None, cfg: ATMNConfig = ATMNConfig(), *,
                 params: Optional[ATMNParams] = None, axes=None):
        if not isinstance(cfg, ATMNConfig):
            raise ConfigError(f"ATMN: cfg must be an ATMNConfig, got {type(cfg).__name__}")
        self.cfg = cfg.validate()
        if params is None:
            if n_channels is None:
                raise MarjaxError("ATMN: give n_channels (the input width) or params")
            params = init_atmn(None, n_channels, cfg)
        self._fill(params, axes if axes is not None else block_axes(params, path=("spikes", "in_proj")))

    @classmethod
    def from_params(cls, params: ATMNParams, cfg: ATMNConfig) -> "ATMN":
        return cls(cfg=cfg, params=params)

    def __call__(self, x):
        return atmn(x, self.to_params(), self.cfg)

    def with_stats(self, x, mask=None):
        """(y, {"nonzero"|"pos"|"neg": (T,) firing fractions}) as `marjax.spiking.atmn_with_stats`."""
        return atmn_with_stats(x, self.to_params(), self.cfg, mask)

    def spikes(self, x):
        """int8 spike trains (T, *x.shape) in {-1, 0, 1}."""
        return atmn_spikes(x, self.to_params().threshold, self.cfg.T, self.cfg.tau, self.cfg.ternary)


# ----------------------------------------------------------------------------- Discrete Mamba-2

def _mixer_model_config(d_model: int, cfg: SSMConfig, n_layers: int) -> ModelConfig:
    # the smallest ModelConfig around an SSMConfig, so the core's block init can build the mixer
    return ModelConfig(d_model=d_model, n_layers=n_layers, mixer="ssm", ssm=cfg.validate())


class DiscreteMamba2(_Mirror):
    """Llamba's Discrete Mamba-2 mixer (`marjax.nn.mamba2.mixer`): (b, l, d) -> (b, l, d).
    Random init is the core's block init (identity conv tap, decay bias -4); `n_layers` only sets
    the out_proj scale as in a model of that depth."""

    def __init__(self, d_model: Optional[int] = None, cfg: SSMConfig = SSMConfig(), *,
                 rngs: Optional[nnx.Rngs] = None, n_layers: int = 1,
                 params: Optional[mamba2.MixerParams] = None, axes=None):
        if not isinstance(cfg, SSMConfig):
            raise ConfigError(f"DiscreteMamba2: cfg must be an SSMConfig, got {type(cfg).__name__}")
        self.cfg = cfg.validate()
        if params is None:
            if d_model is None or rngs is None:
                raise MarjaxError("DiscreteMamba2: give d_model and rngs (random init) or params")
            mcfg = _mixer_model_config(d_model, cfg, n_layers)
            params = lm.init_block(rngs.params(), mcfg, jnp.float32).mixer
        self._fill(params, axes if axes is not None else block_axes(params, path=("mixer",)))

    @classmethod
    def from_params(cls, params: mamba2.MixerParams, cfg: SSMConfig) -> "DiscreteMamba2":
        return cls(cfg=cfg, params=params)

    def __call__(self, u):
        return mamba2.mixer(self.to_params(), u, self.cfg)[0]

    def init_cache(self, batch: int, dtype=jnp.float32) -> mamba2.MixerCache:
        return mamba2.init_mixer_cache(batch, self.cfg, dtype)

    def step(self, u, cache: mamba2.MixerCache):
        """Continue from `cache` (prefill or one-token decode). Returns (out, new cache)."""
        return mamba2.mixer(self.to_params(), u, self.cfg, cache)


# ----------------------------------------------------------------------------- blocks

def _typed_children(cfg: ModelConfig):
    """Hook for `_fill`: the mixer as a DiscreteMamba2 and each spiking site as an ATMN module."""
    def make(name, value, axes):
        if isinstance(value, mamba2.MixerParams):
            return DiscreteMamba2(cfg=cfg.ssm, params=value, axes=axes)
        if isinstance(value, ATMNParams):
            return ATMN(cfg=cfg.atmn, params=value, axes=axes)
        return None
    return make


class SSMBlock(_Mirror):
    """One pre-norm residual block of the LM (`marjax.models.lm.block`): the Discrete Mamba-2
    mixer of an SSM config, with ATMN sites when the config is spiking (an attention config gives
    the teacher's block). Params may be stacked over a leading layer axis (`LM.blocks`); then the
    block is run under `nnx.scan`, one layer per step. Submodules: `mixer` (DiscreteMamba2 or the
    attention weights), `mlp`, `mixer_norm`, `mlp_norm`, `spikes` (one ATMN per site or None)."""

    def __init__(self, cfg: ModelConfig, *, rngs: Optional[nnx.Rngs] = None,
                 params: Optional[lm.BlockParams] = None, axes=None):
        if not isinstance(cfg, ModelConfig):
            raise ConfigError(f"SSMBlock: cfg must be a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg.validate()
        if params is None:
            if rngs is None:
                raise MarjaxError("SSMBlock: give rngs (random init) or params")
            params = lm.init_block(rngs.params(), cfg, jnp.dtype(cfg.dtype))
        stacked = jnp.ndim(params.mixer_norm) == 2
        self._fill(params, axes if axes is not None else block_axes(params, stacked=stacked),
                   _typed_children(cfg))

    @classmethod
    def from_params(cls, params: lm.BlockParams, cfg: ModelConfig) -> "SSMBlock":
        return cls(cfg, params=params)

    def forward(self, x, positions=None, taps=()):
        """(x_out, aux) for x (b, l, d); `positions` (b, l) default 0..l-1; taps as in lm.forward."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(x.shape[1])[None], x.shape[:2])
        out, _, aux = lm.block(self.to_params(), x, self.cfg, positions, None, tuple(taps))
        return out, aux

    def __call__(self, x, positions=None):
        return self.forward(x, positions)[0]


Block = SSMBlock   # the same module holds attention (teacher) blocks


# ----------------------------------------------------------------------------- SpikingLinear

@jax.tree_util.register_dataclass
@dataclass
class SpikingLinearParams:
    neuron: ATMNParams
    kernel: Any            # (n_in, n_out)


# which core weight a site's projection is (its logical axes are that weight's)
_SITE_WEIGHT = {"in_proj": (mamba2.MixerParams, "in_proj"), "out_proj": (mamba2.MixerParams, "out_proj"),
                "mlp_in": (MLPParams, "gate"), "mlp_down": (MLPParams, "down")}


class SpikingLinear(_Mirror):
    """A spiking site and its projection, as in the spiking LM: `y = atmn(x) @ kernel`, where the
    ATMN output is the decoded spike trains (the projection is linear, so it consumes them in one
    matmul). `site` names the LM site whose logical axes the kernel takes (in_proj, out_proj,
    mlp_in, mlp_down)."""

    def __init__(self, in_features: Optional[int] = None, out_features: Optional[int] = None,
                 cfg: ATMNConfig = ATMNConfig(), *, rngs: Optional[nnx.Rngs] = None, site: str = "mlp_down",
                 params: Optional[SpikingLinearParams] = None):
        if site not in _SITE_WEIGHT:
            raise ConfigError(f"SpikingLinear: site must be one of {sorted(_SITE_WEIGHT)}, got {site!r}")
        if not isinstance(cfg, ATMNConfig):
            raise ConfigError(f"SpikingLinear: cfg must be an ATMNConfig, got {type(cfg).__name__}")
        self.cfg, self.site = cfg.validate(), site
        if params is None:
            if in_features is None or out_features is None or rngs is None:
                raise MarjaxError("SpikingLinear: give in_features, out_features and rngs, or params")
            kernel = in_features ** -0.5 * jax.random.normal(rngs.params(), (in_features, out_features), jnp.float32)
            params = SpikingLinearParams(neuron=init_atmn(None, in_features, cfg), kernel=kernel)
        owner, weight = _SITE_WEIGHT[site]
        axes = SpikingLinearParams(neuron=block_axes(params.neuron, path=("spikes", site)),
                                   kernel=declarations(owner)[weight].axes)
        self._fill(params, axes, lambda name, v, ax: ATMN(cfg=cfg, params=v, axes=ax))

    @classmethod
    def from_params(cls, params: SpikingLinearParams, cfg: ATMNConfig, site: str = "mlp_down") -> "SpikingLinear":
        return cls(cfg=cfg, site=site, params=params)

    def __call__(self, x):
        return self.neuron(x) @ self.kernel.get_value()

    def with_stats(self, x, mask=None):
        y, stats = self.neuron.with_stats(x, mask)
        return y @ self.kernel.get_value(), stats


# ----------------------------------------------------------------------------- LM

class LM(_Mirror):
    """The teacher, SSM or spiking LM (`marjax.models.lm`) as one module: `embed`, `blocks` (one
    SSMBlock with params stacked over layers, run under nnx.scan), `final_norm`, `lm_head` (None
    when tied). `LM.load(name_or_path)` takes anything `marjax.load` does."""

    def __init__(self, cfg: ModelConfig, *, rngs: Optional[nnx.Rngs] = None,
                 params: Optional[lm.LMParams] = None):
        if not isinstance(cfg, ModelConfig):
            raise ConfigError(f"LM: cfg must be a ModelConfig, got {type(cfg).__name__}")
        self.config = cfg.validate()
        if params is None:
            if rngs is None:
                raise MarjaxError("LM: give rngs (random init) or params")
            params = lm.init_params(rngs.params(), cfg)
        lead = jax.tree.leaves(params.blocks)[0].shape[0]
        if lead != cfg.n_layers:
            raise MarjaxError(f"LM: params.blocks has {lead} stacked layers, config {cfg.name!r} has "
                              f"n_layers={cfg.n_layers}")

        def make(name, value, axes):
            return SSMBlock(cfg, params=value, axes=axes) if name == "blocks" else None
        self._fill(params, logical_axes(params), make)

    @classmethod
    def from_params(cls, params: lm.LMParams, cfg: ModelConfig) -> "LM":
        return cls(cfg, params=params)

    @classmethod
    def from_model(cls, m) -> "LM":
        """From a `marjax.Model` bundle (the tokenizer stays with the bundle)."""
        return cls(m.config, params=m.params)

    @classmethod
    def load(cls, name_or_path: str) -> "LM":
        """Any name or path `marjax.load` resolves (GGUF, HF dir, Llamba, marjax checkpoint, preset)."""
        return cls.from_model(load(name_or_path))

    def as_model(self, tokenizer=None, source: str = "nnx"):
        """A `marjax.Model` over the current params, for marjax.generate / marjax.logits."""
        return Model(config=self.config, params=self.to_params(), tokenizer=tokenizer, source=source)

    def forward(self, ids, *, taps=(), head: bool = True):
        """As `marjax.models.lm.forward`: (logits float32 (b, l, v) or hidden (b, l, d), aux)."""
        lm.check_ids(ids, self.config)
        cfg, taps = self.config, tuple(taps)
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1])[None], ids.shape)
        p = self.to_params()

        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))
        def layers(block: SSMBlock, x):
            return block.forward(x, positions, taps)

        x, aux = layers(self.blocks, lm.embed(p, ids))
        h = rms_norm(p.final_norm, x, cfg.rms_eps)
        if "hidden" in taps:
            aux["hidden"] = h
        return (lm.lm_head(p, h) if head else h), aux

    def __call__(self, ids):
        return self.forward(ids)[0]

    def init_cache(self, batch: int, max_len: int):
        return lm.init_cache(self.config, batch, max_len)

    def forward_cached(self, ids, cache):
        """Prefill / decode step with a KV or SSM cache: (logits (b, n, v), new cache)."""
        return lm.forward_cached(self.to_params(), ids, cache, self.config)


# ----------------------------------------------------------------------------- sharding

def partition_specs(module: nnx.Module, mesh, rules: Optional[ShardingRules] = None) -> nnx.State:
    """PartitionSpec per Param: its logical axes mapped by the core's `partition_spec` (a mesh
    axis that does not divide a dim leaves it replicated). `mesh` may be abstract."""
    rules = rules or DEFAULT_RULES

    def spec(v):
        axes = v.get_metadata().get("out_sharding") or (None,) * jnp.ndim(v.get_value())
        return v.replace(partition_spec(tuple(axes), tuple(jnp.shape(v.get_value())), mesh, rules))
    return jax.tree.map(spec, nnx.state(module, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard(module: nnx.Module, mesh, rules: Optional[ShardingRules] = None) -> nnx.Module:
    """Place the module's Params on `mesh` by the logical-axis rules (in place; returns it)."""
    specs = partition_specs(module, mesh, rules)
    state = nnx.state(module, nnx.Param)
    placed = jax.tree.map(lambda v, s: v.replace(jax.device_put(v.get_value(), NamedSharding(mesh, s.get_value()))),
                          state, specs, is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.update(module, placed)
    return module
