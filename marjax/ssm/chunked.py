"""SSD block (chunked) form: matmuls inside chunks of Q tokens, a pass over chunk states between.

Within a chunk the output is attention-like, y = (C B^T * L) x with L[t, s] = exp(sum_{s<r<=t} a_r)
(causal), plus the contribution of the state entering the chunk. Each chunk also produces its own
end state; the pass across chunks (lax.scan, or lax.associative_scan with log depth) combines them.
Only chunk-level states (l / Q of them) are ever materialised, never per-token (p, n) states.
Memory is O(b h l Q) for the in-chunk matrices plus O(b h (l/Q) p n) for the chunk states: linear
in l. Everything runs in float32; callers cast the output back.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

INTER_CHUNK = ("scan", "associative")
CHUNK_SCAN_UNROLL = 4     # chunks per lax.scan iteration in ssd_chunk_scan (experiments/bench/RESULTS.md)


def segsum(a: Float[Array, "... t"]) -> Float[Array, "... t t"]:
    """out[..., t, s] = sum_{s<r<=t} a_r for s <= t, -inf above the diagonal.

    Built by a masked cumsum rather than cumsum differences, which cancel badly when the decays
    are large (a difference of two big cumulative sums loses the small segment in between)."""
    t = a.shape[-1]
    rep = jnp.broadcast_to(a[..., :, None], a.shape + (t,))          # rep[..., i, s] = a_i
    strictly_below = jnp.tril(jnp.ones((t, t), bool), -1)
    cs = jnp.cumsum(jnp.where(strictly_below, rep, 0.0), axis=-2)    # sum_{s<i<=t} a_i
    return jnp.where(jnp.tril(jnp.ones((t, t), bool)), cs, -jnp.inf)


def pad_time(length: int, multiple: int, *arrays):
    """Zero-pad axis 1 of each array up to a multiple of `multiple`. Zero x and zero log decay
    (decay 1) leave the state unchanged, so outputs at real positions and the final state are
    exactly those of the unpadded sequence."""
    pad = (-length) % multiple
    if pad == 0:
        return arrays
    return tuple(jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in arrays)


def exclusive_reverse_cumsum(a: Float[Array, "... t"]) -> Float[Array, "... t"]:
    """out[..., s] = sum_{r>s} a_r, summed directly (no total-minus-prefix cancellation)."""
    rev = jnp.cumsum(a[..., ::-1], axis=-1)[..., ::-1]
    return jnp.concatenate([rev[..., 1:], jnp.zeros_like(a[..., :1])], axis=-1)


def _combine(left, right):
    """Associative composition of two affine state maps h -> exp(la) h + s (left applied first)."""
    la1, s1 = left
    la2, s2 = right
    return la1 + la2, jnp.exp(la2)[..., None, None] * s1 + s2


def chunk_decays(a: Float[Array, "... q"]) -> Float[Array, "... q q"]:
    """exp(segsum) inside one chunk, from differences of the chunk-local cumulative sum. Within a
    chunk the cumulative sums stay small (at most Q terms), so the cancellation that `segsum`
    avoids costs little here, and the difference is twice as fast as the masked cumsum."""
    q = a.shape[-1]
    cs = jnp.cumsum(a, axis=-1)
    causal = jnp.tril(jnp.ones((q, q), bool))
    return jnp.exp(jnp.where(causal, cs[..., :, None] - cs[..., None, :], -jnp.inf))


def ssd_chunked(x: Float[Array, "b l h p"], log_a: Float[Array, "b l h"], B: Float[Array, "b l h n"],
                C: Float[Array, "b l h n"], h0: Float[Array, "b h p n"], chunk_size: int,
                inter_chunk: str = "scan"):
    """-> (y float32 (b, l, h, p), final state float32 (b, h, p, n))."""
    f32 = jnp.float32
    b, l, h, p = x.shape
    q = chunk_size
    x, log_a, B, C = pad_time(l, q, x.astype(f32), log_a.astype(f32), B.astype(f32), C.astype(f32))
    c = x.shape[1] // q
    # head-major chunk layout (b, h, c, q, .) once, so every product below is a plain batched matmul
    to_chunks = lambda t: jnp.moveaxis(t.reshape(b, c, q, h, t.shape[-1]), 3, 1)
    x, B, C = to_chunks(x), to_chunks(B), to_chunks(C)
    a = jnp.moveaxis(log_a.reshape(b, c, q, h), 3, 1)                 # (b, h, c, q)
    a_cs = jnp.cumsum(a, axis=-1)                                      # decay from chunk start

    # 1. within chunks: (C B^T * L) x
    scores = jnp.einsum("bhctn,bhcsn->bhcts", C, B) * chunk_decays(a)   # (b, h, c, q, q)
    y = jnp.einsum("bhcts,bhcsp->bhctp", scores, x)

    # 2. each chunk's own end state (starting from zero)
    to_end = jnp.exp(exclusive_reverse_cumsum(a))                      # (b, h, c, q)
    states = jnp.einsum("bhcsp,bhcsn->bhcpn", x * to_end[..., None], B)

    # 3. across chunks: h_end[c] = exp(total[c]) h_end[c-1] + states[c], h_end[-1] = h0
    total = a_cs[..., -1]                                              # (b, h, c)
    h0 = h0.astype(f32)
    if inter_chunk == "scan":
        def body(carry, inp):
            tot, st = inp
            return jnp.exp(tot)[..., None, None] * carry + st, carry
        final, prev = lax.scan(body, h0, (jnp.moveaxis(total, 2, 0), jnp.moveaxis(states, 2, 0)))
        prev = jnp.moveaxis(prev, 0, 2)                                # (b, h, c, p, n): state entering chunk
    elif inter_chunk == "associative":
        states = states.at[:, :, 0].add(jnp.exp(total[..., 0])[..., None, None] * h0)
        _, ends = lax.associative_scan(_combine, (total, states), axis=2)
        final = ends[:, :, -1]
        prev = jnp.concatenate([h0[:, :, None], ends[:, :, :-1]], axis=2)
    else:
        raise ValueError(f"inter_chunk must be one of {INTER_CHUNK}, got {inter_chunk!r}")

    # 4. contribution of the state entering each chunk
    y = y + jnp.einsum("bhctn,bhcpn->bhctp", C, prev) * jnp.exp(a_cs)[..., None]
    y = jnp.moveaxis(y, 1, 3).reshape(b, c * q, h, p)[:, :l]
    return y, final


def ssd_chunk_scan(x: Float[Array, "b l h p"], log_a: Float[Array, "b l h"], B: Float[Array, "b l h n"],
                   C: Float[Array, "b l h n"], h0: Float[Array, "b h p n"], chunk_size: int,
                   inter_chunk: str = "scan", unroll: int = CHUNK_SCAN_UNROLL):
    """The block form with the chunks walked by one lax.scan: each step does one chunk's in-chunk
    matmuls and its state passing (C h_prev, x^T B) for all batch elements and heads at once.

    Same flops as `ssd_chunked`, but the (p, n) chunk states never go to memory as a
    (b, h, l / Q, p, n) array (p n / Q floats per token and head: twice the size of x at Q = 32),
    and one chunk's working set stays in cache: on a CPU it beats the fully parallel form
    (experiments/bench/RESULTS.md). The chunks are laid out head-major, (c, b, h, q, .), once
    before the scan, so every product inside is a plain batched matmul over (b, h); `unroll`
    chunks per scan iteration (measured on CPU: 1.5-2x faster forward than unroll 1 in this
    layout). inter_chunk is unused. -> (y float32, final state float32)."""
    f32 = jnp.float32
    b, l, h, p = x.shape
    q = chunk_size
    x, log_a, B, C = pad_time(l, q, x.astype(f32), log_a.astype(f32), B.astype(f32), C.astype(f32))
    c = x.shape[1] // q
    to_chunks = lambda t: t.reshape(b, c, q, h, t.shape[-1]).transpose(1, 0, 3, 2, 4)   # (c, b, h, q, .)
    a_cs = jnp.cumsum(log_a.reshape(b, c, q, h).transpose(1, 0, 3, 2), axis=-1)     # (c, b, h, q), per chunk
    causal = jnp.tril(jnp.ones((q, q), bool))

    def body(state, inp):
        xq, Bq, Cq, a = inp
        decay = jnp.exp(jnp.where(causal, a[..., :, None] - a[..., None, :], -jnp.inf))
        scores = jnp.einsum("bhtn,bhsn->bhts", Cq, Bq) * decay
        y = jnp.einsum("bhts,bhsp->bhtp", scores, xq) + \
            jnp.exp(a)[..., None] * jnp.einsum("bhtn,bhpn->bhtp", Cq, state)
        to_end = jnp.exp(a[..., -1:] - a)                                            # (b, h, q)
        state = jnp.exp(a[..., -1])[..., None, None] * state + \
            jnp.einsum("bhsp,bhsn->bhpn", xq * to_end[..., None], Bq)
        return state, y

    final, ys = lax.scan(body, h0.astype(f32), (to_chunks(x), to_chunks(B), to_chunks(C), a_cs),
                         unroll=max(1, min(int(unroll), c)))
    return ys.transpose(1, 0, 3, 2, 4).reshape(b, c * q, h, p)[:, :l], final
