"""ATMN: the Adaptive Ternary Multi-step Neuron (MAR_SPEC.md section 3).

For one activation I and micro-steps t = 0 .. T-1 (the neuron's own time axis, reset per token):

    h_t = I * [t == 0] + u_{t-1} / tau        (u_{-1} = 0)
    s_t = +1 if h_t >= V;  -1 if h_t <= -V (ternary only);  0 otherwise
    u_t = h_t - s_t * V                        (soft reset by subtraction)
    V   = exp(a)

The projection after the neuron is linear, so it can consume the decoded value
y = sum_t c_t V s_t (c_t = 1 for readout "ones", tau^t for "tau_pow") in one matmul, while energy
is charged per micro-step from the firing rates (marjax/eval/energy.py).

`atmn` is a `jax.custom_vjp` around a `lax.scan` over the T micro-steps. The backward recomputes
the membrane trajectory (only x and V are saved, so memory does not grow with T) and runs the
recurrence in reverse, with the configured surrogate for ds/dh and ds/dV:

    g_t    = ct_y * c_t - [reset_grad == "full"] gu_t   (gu_t: cotangent of u_t, 0 at t = T-1)
    gh_t   = gu_t + g_t * V * ds/dh(h_t)
    gV    += s_t (ct_y c_t - gu_t) + g_t * V * ds/dV(h_t)   (readout + reset + threshold shift)
    gu_{t-1} = gh_t / tau                               (0 when reset_grad == "detach")
    gx     = gh_0;   ga = sum-to-shape(gV) * V   (V = exp(a), by JAX's chain rule outside)

reset_grad "membrane" is u_t = h_t - stop_gradient(s_t) V: the gradient reaches large inputs
(which fire on every micro-step, so the t = 0 surrogate alone gives them none) through the
identity path, without the (1 - V ds/dh) factors that compound over micro-steps and layers.
The firing counts from `atmn_with_stats` are differentiable through the same surrogate.
`marjax.spiking.reference.atmn_unrolled` is the independent oracle of all of this.

Granularity of `a`: "channel" -> shape (n_channels,), one threshold per input channel of the
projection; "site" -> shape (), one threshold per site per layer; "scalar" -> shape (), one
threshold meant to be shared by every site and layer. At the level of one neuron (this file) site
and scalar coincide: both are a 0-d `a`. The sharing for "scalar" is the model's business (it
must tie the four sites' and all layers' `a` to one leaf).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from marjax.config import ATMNConfig
from marjax.errors import ConfigError, MarjaxError
from marjax.spiking.surrogates import spike_grads

__all__ = ["ATMNParams", "init_atmn", "calibrate_a", "atmn_spikes", "atmn", "atmn_with_stats",
           "atmn_decode", "readout_coeffs"]


@jax.tree_util.register_dataclass
@dataclass
class ATMNParams:
    """Log threshold: V = exp(a); shape () or (n_channels,) (see the module docstring)."""
    a: Float[Array, "..."]

    @property
    def threshold(self):
        return jnp.exp(self.a)


def readout_coeffs(cfg: ATMNConfig) -> np.ndarray:
    """c_t, t = 0..T-1: ones, or tau^t (which makes y + tau^{T-1} u_{T-1} = I exactly)."""
    if cfg.readout == "ones":
        return np.ones((cfg.T,), np.float32)
    return (float(cfg.tau) ** np.arange(cfg.T)).astype(np.float32)


def _spike(h, V, ternary: bool, fire: float = 1.0):
    s = (h >= fire * V).astype(jnp.float32)
    if ternary:
        s = s - (h <= -fire * V).astype(jnp.float32)
    return s


def _trajectory(x32, V, T: int, tau: float, ternary: bool, fire: float = 1.0):
    """Membranes h_t and spikes s_t, each stacked to (T, *x.shape), float32."""
    def body(h, _):
        s = _spike(h, V, ternary, fire)
        return (h - s * V) / tau, (h, s)

    _, (hs, ss) = jax.lax.scan(body, x32, None, length=T)
    return hs, ss


def atmn_spikes(x, threshold, T: int = 4, tau: float = 2.0, ternary: bool = True, quantizer: str = "floor"):
    """int8 spikes (T, *x.shape) in {-1, 0, 1} ({0, 1} if not ternary); `threshold` = V > 0,
    broadcastable to x; quantizer "round" fires at V/2 (the reset still subtracts V)."""
    if T < 1:
        raise ConfigError(f"atmn_spikes: T must be >= 1, got {T}")
    if tau <= 0:
        raise ConfigError(f"atmn_spikes: tau must be > 0, got {tau}")
    if quantizer not in ("floor", "round"):
        raise ConfigError(f"atmn_spikes: quantizer must be 'floor' or 'round', got {quantizer!r}")
    V = jnp.asarray(threshold, jnp.float32)
    _check_broadcast(jnp.shape(x), V.shape, "threshold")
    fire = 0.5 if quantizer == "round" else 1.0
    return _spikes_jit(jnp.asarray(x), V, int(T), float(tau), bool(ternary), fire)


@partial(jax.jit, static_argnums=(2, 3, 4, 5), inline=True)   # eager calls: one compile per shape (see _atmn_jit)
def _spikes_jit(x, V, T: int, tau: float, ternary: bool, fire: float):
    _, ss = _trajectory(x.astype(jnp.float32), V, T, tau, ternary, fire)
    return ss.astype(jnp.int8)


def atmn_decode(spikes, threshold, cfg: ATMNConfig):
    """sum_t c_t V s_t from spikes (T, ...) (float32): what the projection sees."""
    c = jnp.asarray(readout_coeffs(cfg)).reshape((-1,) + (1,) * (spikes.ndim - 1))
    return jnp.asarray(threshold, jnp.float32) * jnp.sum(c * spikes.astype(jnp.float32), axis=0)


def _sum_to(g, shape):
    """Reduce a broadcast cotangent g back to `shape` (sum over broadcast dims)."""
    lead = g.ndim - len(shape)
    g = g.sum(axis=tuple(range(lead))) if lead else g
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return (g.sum(axis=axes, keepdims=True) if axes else g).reshape(shape)


# ---- the differentiable core: float32 in, float32 out --------------------------------------
@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _core(cfg: ATMNConfig, with_stats: bool, x32, V, w):
    return _core_fwd(cfg, with_stats, x32, V, w)[0]


def _core_fwd(cfg, with_stats, x32, V, w):
    c = jnp.asarray(readout_coeffs(cfg))

    def body(carry, c_t):
        h, acc = carry
        s = _spike(h, V, cfg.ternary, cfg.fire_frac)
        out = (jnp.sum(w * (s > 0)), jnp.sum(w * (s < 0))) if with_stats else None
        return ((h - s * V) / cfg.tau, acc + c_t * s), out

    (_, acc), counts = jax.lax.scan(body, (x32, jnp.zeros_like(x32)), c)
    y = V * acc
    if with_stats:
        return (y, counts[0], counts[1]), (x32, V, w)
    return y, (x32, V, w)


def _core_bwd(cfg, with_stats, res, ct):
    """Reverse recurrence over micro-steps. gu: cotangent of u_t (through h_{t+1} = u_t / tau).
    The spike's cotangent gs_t collects the readout (c_t V ct_y) and, with reset_grad "full"
    only, the reset (-V gu_t); "membrane" keeps the identity path u_t -> h_t but not the reset's
    surrogate, so d h_{t+1}/d h_t = 1/tau; "detach" drops gu altogether. With stats, the +1/-1
    counts per micro-step (cotangents ct_pos, ct_neg of shape (T,)) get surrogate gradients too,
    which is what a firing-rate loss trains through."""
    x32, V, w = res
    T = cfg.T
    if with_stats:
        ct_y, ct_pos, ct_neg = ct
    else:
        ct_y, ct_pos, ct_neg = ct, jnp.zeros((T,), jnp.float32), jnp.zeros((T,), jnp.float32)
    k = cfg.fire_frac
    hs, ss = _trajectory(x32, V, T, cfg.tau, cfg.ternary, k)
    c = jnp.asarray(readout_coeffs(cfg))
    inv_tau = 0.0 if cfg.reset_grad == "detach" else 1.0 / cfg.tau
    reset_through_spike = 1.0 if cfg.reset_grad == "full" else 0.0

    def body(carry, xs):
        gh_next, gV = carry
        h, s, c_t, cp, cn = xs
        gu = gh_next * inv_tau                      # u_t feeds h_{t+1} = u_t / tau
        dsdh, dsdV, up, down = spike_grads(h, V, cfg.surrogate, cfg.width, cfg.ternary, k)
        g = ct_y * c_t - reset_through_spike * gu   # d loss / d (V s_t): readout (+ reset)
        gh = gu + g * V * dsdh
        gV = gV + s * (ct_y * c_t - gu) + g * V * dsdV
        if with_stats:                              # the +1 / -1 counts' surrogate gradients
            gh = gh + w * (cp * up - cn * down)
            gV = gV - k * w * (cp * up + cn * down)
        return (gh, gV), None

    zeros = jnp.zeros(jnp.broadcast_shapes(x32.shape, V.shape), jnp.float32)
    (gh0, gV), _ = jax.lax.scan(body, (zeros, zeros), (hs, ss, c, ct_pos, ct_neg), reverse=True)
    return _sum_to(gh0, x32.shape), _sum_to(gV, V.shape), jnp.zeros_like(w)


_core.defvjp(_core_fwd, _core_bwd)


# ---- public API ------------------------------------------------------------------------------
def _check_broadcast(x_shape, v_shape, name):
    try:
        out = jnp.broadcast_shapes(tuple(x_shape), tuple(v_shape))
    except ValueError:
        out = None
    if out != tuple(x_shape):
        raise MarjaxError(f"ATMN {name} of shape {tuple(v_shape)} does not broadcast to the input shape "
                          f"{tuple(x_shape)}; expected () or (n_channels,) = ({x_shape[-1] if x_shape else ''},)")


def _prepare(x, params: ATMNParams, cfg: ATMNConfig):
    if not isinstance(cfg, ATMNConfig):
        raise ConfigError(f"atmn: cfg must be an ATMNConfig, got {type(cfg).__name__}")
    cfg.validate()
    a = jnp.asarray(params.a if isinstance(params, ATMNParams) else params)
    _check_broadcast(jnp.shape(x), a.shape, "parameter `a`")
    return jnp.asarray(x), a


# The public ops validate in Python, then run a jitted core keyed by the config (static) and the
# input shapes: eager calls (a notebook, an NNX module called outside jit) compile once per shape
# instead of once per call (a fresh lax.scan jaxpr misses JAX's primitive cache). inline=True: under
# an outer trace the core's jaxpr is inlined, so jitted programs are the same as without the wrapper.
@partial(jax.jit, static_argnums=(2,), inline=True)
def _atmn_jit(x, a, cfg: ATMNConfig):
    x32, V = x.astype(jnp.float32), jnp.exp(a.astype(jnp.float32))
    y = _core(cfg, False, x32, V, jnp.ones((), jnp.float32))
    return y.astype(x.dtype)


@partial(jax.jit, static_argnums=(3,), inline=True)
def _atmn_stats_jit(x, a, mask, cfg: ATMNConfig):
    x32, V = x.astype(jnp.float32), jnp.exp(a.astype(jnp.float32))
    if mask is None:
        w = jnp.ones((), jnp.float32)
        count = jnp.float32(max(x32.size, 1))
    else:
        w = mask.astype(jnp.float32).reshape(mask.shape + (1,) * (x32.ndim - mask.ndim))
        per_mask = int(np.prod(x32.shape[mask.ndim:], dtype=np.int64))
        count = jnp.maximum(jnp.sum(w) * per_mask, 1.0)
    y, pos, neg = _core(cfg, True, x32, V, w)
    pos, neg = pos / count, neg / count
    return y.astype(x.dtype), {"nonzero": pos + neg, "pos": pos, "neg": neg}


def atmn(x, params: ATMNParams, cfg: ATMNConfig):
    """Differentiable decoded output y = sum_t c_t V s_t, same shape and dtype as x (computed in
    float32). Gradients reach x and params.a through the configured surrogate."""
    x, a = _prepare(x, params, cfg)
    return _atmn_jit(x, a, cfg)


def atmn_with_stats(x, params: ATMNParams, cfg: ATMNConfig, mask=None):
    """(y, stats): y as `atmn`; stats = {"nonzero", "pos", "neg"}: (T,) float32 fractions of
    elements spiking (any sign, +1, -1) at each micro-step. `mask` (bool/0-1, shape a prefix of
    x.shape, e.g. (b, l) for x (b, l, d)) leaves padding tokens out of the fractions. The stats
    carry the surrogate gradient of the spike counts (for a firing-rate loss); callers that only
    report them lose nothing, as an unused output's cotangent is zero."""
    x, a = _prepare(x, params, cfg)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.ndim > x.ndim or tuple(mask.shape) != tuple(x.shape[:mask.ndim]):
            raise MarjaxError(f"atmn_with_stats: mask shape {tuple(mask.shape)} must be a prefix of the input "
                              f"shape {tuple(x.shape)}")
    return _atmn_stats_jit(x, a, mask, cfg)


def _decode_values(x32, V, cfg: ATMNConfig):
    """(decoded y, spikes per element summed over the T micro-steps), float32."""
    c = jnp.asarray(readout_coeffs(cfg))

    def body(carry, c_t):
        h, acc, n = carry
        s = _spike(h, V, cfg.ternary, cfg.fire_frac)
        return ((h - s * V) / cfg.tau, acc + c_t * s, n + jnp.abs(s)), None

    zeros = jnp.zeros_like(x32)
    (_, acc, n), _ = jax.lax.scan(body, (x32, zeros, zeros), c)
    return V * acc, n


def calib_grid(max_ratio: float) -> np.ndarray:
    """Exponents j/4 of the calibration candidates V = m * 2^(j/4), m = mean |x|, from m/64 up to
    m * max_ratio (rounded to the grid); ordered by |j| so that ties (e.g. an all-zero channel)
    keep V = m."""
    top = max(0, int(round(4 * np.log2(max_ratio))))
    return np.array(sorted(range(-24, top + 1), key=lambda j: (abs(j), j)), np.float32) / 4.0


def calibrate_a(x_calib, cfg: ATMNConfig) -> ATMNParams:
    """Thresholds from activation statistics. Rule: per channel (granularity "channel", over all
    leading axes of x_calib (..., n_channels)) or over all elements ("site"/"scalar"), V is the
    candidate m * 2^(j/4), j = -24 .. 4 log2(cfg.calib_max_ratio), m = mean |x| (floored at 1e-3 of
    the mean over channels),
    that minimises the mean squared error between the decoded ATMN output and x on x_calib
    (relative to the mean square of x), plus cfg.calib_rate_weight times the spikes per element
    (summed over the T micro-steps): with weight 0 the neuron starts as the best quantiser of the
    activations it will see for this T, tau, readout, quantizer and spike alphabet; a positive
    weight trades reconstruction for fewer spikes (the AC energy). Returns ATMNParams(a=log V)."""
    cfg.validate()
    x = jnp.asarray(x_calib).astype(jnp.float32)
    if x.ndim == 0 or x.size == 0:
        raise MarjaxError(f"calibrate_a: x_calib must be a non-empty array (..., n_channels), got shape {x.shape}")
    x = x.reshape(-1, x.shape[-1]) if cfg.granularity == "channel" else x.reshape(-1, 1)
    m = jnp.mean(jnp.abs(x), axis=0)
    m = jnp.maximum(m, jnp.maximum(1e-3 * jnp.mean(m), 1e-12))

    power = jnp.maximum(jnp.mean(jnp.square(x), axis=0), 1e-30)

    def err(j):
        y, n = _decode_values(x, m * jnp.exp2(j), cfg)
        nmse = jnp.mean(jnp.square(y - x), axis=0) / power
        return nmse + cfg.calib_rate_weight * jnp.mean(n, axis=0) if cfg.calib_rate_weight else nmse

    grid = jnp.asarray(calib_grid(cfg.calib_max_ratio))
    errs = jax.lax.map(err, grid)                                # (G, channels)
    V = m * jnp.exp2(grid[jnp.argmin(errs, axis=0)])
    a = jnp.log(V)
    return ATMNParams(a=a if cfg.granularity == "channel" else a.reshape(()))


def init_atmn(key, n_channels: int, cfg: ATMNConfig, stats=None) -> ATMNParams:
    """Fresh neuron params. `a` has shape (n_channels,) for granularity "channel", () for "site"
    and "scalar". With cfg.init == "stats" and calibration activations `stats` (..., n_channels),
    `a` comes from `calibrate_a`; without `stats` (or with init == "constant") a = init_value (the
    model calibrates stats-initialised sites later). `key` is accepted for a uniform init
    signature; the init is deterministic."""
    del key
    cfg.validate()
    if int(n_channels) < 1:
        raise ConfigError(f"init_atmn: n_channels must be >= 1, got {n_channels}")
    if cfg.init == "stats" and stats is not None:
        stats = jnp.asarray(stats)
        if stats.ndim == 0 or stats.shape[-1] != n_channels:
            raise MarjaxError(f"init_atmn: stats must have shape (..., {n_channels}), got {tuple(stats.shape)}")
        return calibrate_a(stats, cfg)
    shape = (int(n_channels),) if cfg.granularity == "channel" else ()
    return ATMNParams(a=jnp.full(shape, cfg.init_value, jnp.float32))
