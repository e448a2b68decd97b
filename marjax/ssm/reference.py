"""Token-by-token SSD recurrence: the oracle every other implementation is tested against.

h_t = exp(log_a_t) h_{t-1} + x_t B_t^T   (state (p, n) per head),   y_t = h_t C_t.
Runs in float32 whatever the input dtype; callers cast the output back.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float


def step(state: Float[Array, "b h p n"], x_t: Float[Array, "b h p"], log_a_t: Float[Array, "b h"],
         B_t: Float[Array, "b h n"], C_t: Float[Array, "b h n"]):
    """One recurrence step in float32 -> (y_t (b, h, p), new_state (b, h, p, n))."""
    f32 = jnp.float32
    decay = jnp.exp(log_a_t.astype(f32))[..., None, None]
    new = decay * state.astype(f32) + x_t.astype(f32)[..., :, None] * B_t.astype(f32)[..., None, :]
    y = jnp.einsum("bhpn,bhn->bhp", new, C_t.astype(f32))
    return y, new


def ssd_reference(x: Float[Array, "b l h p"], log_a: Float[Array, "b l h"], B: Float[Array, "b l h n"],
                  C: Float[Array, "b l h n"], h0: Float[Array, "b h p n"], chunk_size: Optional[int] = None,
                  inter_chunk: str = "scan"):
    """lax.scan over time -> (y float32 (b, l, h, p), final state float32 (b, h, p, n)).
    chunk_size and inter_chunk are unused (the impl signature of `marjax.ssm.ssd`).

    Backward through the scan stores one (p, n) state per token: fine for an oracle, which is why
    the chunked form exists for training."""
    def body(state, inp):
        y, state = step(state, *inp)
        return state, y

    xs = (jnp.moveaxis(x, 1, 0), jnp.moveaxis(log_a, 1, 0), jnp.moveaxis(B, 1, 0), jnp.moveaxis(C, 1, 0))
    final, ys = lax.scan(body, h0.astype(jnp.float32), xs)
    return jnp.moveaxis(ys, 0, 1), final
