"""Distillation losses (pure JAX, jit-able). Every loss returns `(sum, count)` (plus metrics for
the KL losses) so the caller can add sums and counts across micro-batches and devices before
dividing once.

SBDS logit loss (MAR_SPEC.md section 4), per token, with teacher p and student q at temperature T:

    L1 = alpha KL(p || q) + beta KL(q || p)          p = softmax(z_t / T), q = softmax(z_s / T)

No T^2 factor by default (`scale_by_t2=True` multiplies the KL terms by T^2 as in Hinton et al.,
which keeps gradient magnitudes comparable across temperatures). The default T is 1, where the
two agree. The optional hard-label CE term is always at T = 1 on the student's raw logits.

`chunked_kd_loss` computes L1 from the final-normed hidden states and the two head matrices in
sequence chunks: a `lax.scan` over chunks whose body is wrapped in `jax.checkpoint`, so only one
chunk's (b, chunk, V) logits of each model are live at a time, in the forward and in the backward
(the backward recomputes a chunk's logits from its hidden states). `dense_kd_loss` is the oracle.

Gradients flow into every argument; callers that must not train the teacher pass it through
`stop_gradient` (then XLA drops the teacher's backward).
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from marjax.errors import MarjaxError
from marjax.nn.layers import dense

__all__ = ["chunked_kd_loss", "dense_kd_loss", "kd_from_topk", "feature_loss",
           "matrix_orientation_loss", "hidden_alignment_loss"]

_TOPK_TAIL_FLOOR = 1e-6   # smallest teacher mass assumed outside the cached top-k (fp16 rounding)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise MarjaxError(msg)


def _kl_terms(zt: Float[Array, "... v"], zs: Float[Array, "... v"], temperature: float):
    """Per-token forward KL(p||q) and reverse KL(q||p) from raw logits, float32."""
    lp = jax.nn.log_softmax(zt.astype(jnp.float32) / temperature, axis=-1)
    lq = jax.nn.log_softmax(zs.astype(jnp.float32) / temperature, axis=-1)
    d = lp - lq
    fkl = jnp.sum(jnp.exp(lp) * d, axis=-1)
    rkl = -jnp.sum(jnp.exp(lq) * d, axis=-1)
    return fkl, rkl


def _ce(zs: Float[Array, "... v"], targets: Int[Array, "..."]):
    zs = zs.astype(jnp.float32)
    gold = jnp.take_along_axis(zs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jax.nn.logsumexp(zs, axis=-1) - gold


def _combine(fkl_s, rkl_s, ce_s, n, alpha, beta, ce_weight, t2):
    """Total loss sum and metrics {name: (sum, count)} from per-term masked sums."""
    loss = t2 * (alpha * fkl_s + beta * rkl_s)
    metrics = {"fkl": (fkl_s, n), "rkl": (rkl_s, n)}
    if ce_s is not None:
        loss = loss + ce_weight * ce_s
        metrics["ce"] = (ce_s, n)
    return loss, n, metrics


def _validate_kd(alpha, beta, temperature, ce_targets, ce_weight):
    _check(temperature > 0, f"temperature must be > 0, got {temperature}")
    _check(ce_weight >= 0, f"ce_weight must be >= 0, got {ce_weight}")
    _check(not (ce_weight > 0 and ce_targets is None), "ce_weight > 0 needs ce_targets (b, l), got None")


def dense_kd_loss(logits_t: Float[Array, "b l v"], logits_s: Float[Array, "b l v"], mask: Float[Array, "b l"], *,
                  alpha: float, beta: float, temperature: float = 1.0,
                  ce_targets: Optional[Int[Array, "b l"]] = None, ce_weight: float = 0.0,
                  scale_by_t2: bool = False):
    """The oracle: the same loss as `chunked_kd_loss` from full logits. Returns
    (loss_sum, token_count, metrics) with metrics {"fkl", "rkl"[, "ce"]: (sum, count)}."""
    _check(logits_t.shape == logits_s.shape, f"logits_t {logits_t.shape} and logits_s {logits_s.shape} differ")
    _check(mask.shape == logits_s.shape[:-1], f"mask must be {logits_s.shape[:-1]}, got {mask.shape}")
    _validate_kd(alpha, beta, temperature, ce_targets, ce_weight)
    m = mask.astype(jnp.float32)
    fkl, rkl = _kl_terms(logits_t, logits_s, temperature)
    ce_s = jnp.sum(m * _ce(logits_s, ce_targets)) if ce_weight > 0 else None
    t2 = temperature ** 2 if scale_by_t2 else 1.0
    return _combine(jnp.sum(m * fkl), jnp.sum(m * rkl), ce_s, jnp.sum(m), alpha, beta, ce_weight, t2)


def _to_chunks(x, n_chunks: int, chunk: int):
    """(b, l, ...) -> (n_chunks, b, chunk, ...), zero-padding l up to n_chunks * chunk."""
    b, l = x.shape[:2]
    pad = n_chunks * chunk - l
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((b, n_chunks, chunk) + x.shape[2:])
    return jnp.swapaxes(x, 0, 1)


def _scan_chunks(body, xs):
    """Sum a tuple of per-chunk scalars over chunks; `body` rematerialised in the backward when
    there is more than one chunk. With one, remat would recompute both LM heads' logits (the
    teacher's too) in the backward; without it the chunk's (b, c, V) intermediates stay live from
    the forward instead, which is the memory remat saves only when it frees chunk after chunk."""
    if jax.tree.leaves(xs)[0].shape[0] > 1:
        body = jax.checkpoint(body)

    def step(carry, x):
        return tuple(c + o for c, o in zip(carry, body(*x))), None

    n_out = len(jax.eval_shape(body, *jax.tree.map(lambda a: a[0], xs)))
    init = tuple(jnp.zeros((), jnp.float32) for _ in range(n_out))
    out, _ = jax.lax.scan(step, init, xs)
    return out


def chunked_kd_loss(h_teacher: Float[Array, "b l d"], h_student: Float[Array, "b l d"],
                    head_teacher: Float[Array, "d v"], head_student: Float[Array, "d v"],
                    mask: Float[Array, "b l"], *, alpha: float, beta: float, temperature: float = 1.0,
                    chunk: int = 128, ce_targets: Optional[Int[Array, "b l"]] = None,
                    ce_weight: float = 0.0, scale_by_t2: bool = False):
    """alpha KL(p||q) + beta KL(q||p) (+ ce_weight * CE) summed over masked tokens, from FINAL-NORMED
    hidden states: logits = h @ head with float32 accumulation, one sequence chunk at a time.

    Returns (loss_sum, token_count, metrics), metrics {"fkl", "rkl"[, "ce"]: (sum, count)}.
    """
    b, l, d = h_student.shape
    _check(h_teacher.shape[:2] == (b, l), f"h_teacher must be ({b}, {l}, d_teacher), got {h_teacher.shape}")
    _check(head_teacher.shape[0] == h_teacher.shape[2],
           f"head_teacher must be ({h_teacher.shape[2]}, V), got {head_teacher.shape}")
    _check(head_student.shape[0] == d, f"head_student must be ({d}, V), got {head_student.shape}")
    _check(head_teacher.shape[1] == head_student.shape[1],
           f"teacher vocab {head_teacher.shape[1]} != student vocab {head_student.shape[1]}")
    _check(mask.shape == (b, l), f"mask must be ({b}, {l}), got {mask.shape}")
    _check(chunk > 0, f"chunk must be > 0, got {chunk}")
    _validate_kd(alpha, beta, temperature, ce_targets, ce_weight)
    use_ce = ce_weight > 0
    if use_ce:
        _check(ce_targets.shape == (b, l), f"ce_targets must be ({b}, {l}), got {ce_targets.shape}")

    c = min(chunk, l)
    n = -(-l // c)
    m = mask.astype(jnp.float32)
    tg = ce_targets.astype(jnp.int32) if use_ce else jnp.zeros((b, l), jnp.int32)
    xs = (_to_chunks(h_teacher, n, c), _to_chunks(h_student, n, c), _to_chunks(m, n, c), _to_chunks(tg, n, c))

    def body(ht, hs, mc, tc):
        zt = dense(ht, head_teacher, jnp.float32)
        zs = dense(hs, head_student, jnp.float32)
        fkl, rkl = _kl_terms(zt, zs, temperature)
        out = (jnp.sum(mc * fkl), jnp.sum(mc * rkl))
        return out + ((jnp.sum(mc * _ce(zs, tc)),) if use_ce else ())

    sums = _scan_chunks(body, xs)
    t2 = temperature ** 2 if scale_by_t2 else 1.0
    return _combine(sums[0], sums[1], sums[2] if use_ce else None, jnp.sum(m), alpha, beta, ce_weight, t2)


def _topk_terms(lp_k, ids, zs, temperature: float, vocab: int, tail: str):
    """Per-token (fkl, rkl) from cached teacher top-k log-probs and full student logits."""
    k = lp_k.shape[-1]
    lq = jax.nn.log_softmax(zs.astype(jnp.float32) / temperature, axis=-1)       # (b, c, V)
    lq_k = jnp.take_along_axis(lq, ids, axis=-1)                                  # (b, c, k)
    a_k = lp_k.astype(jnp.float32) / temperature
    if tail == "renorm" or k == vocab:
        # teacher renormalised over its top-k; reverse KL with q renormalised over the same set
        lp = jax.nn.log_softmax(a_k, axis=-1)
        fkl = jnp.sum(jnp.exp(lp) * (lp - lq_k), axis=-1)
        lqn = jax.nn.log_softmax(lq_k, axis=-1)
        rkl = jnp.sum(jnp.exp(lqn) * (lqn - lp), axis=-1)
        return fkl, rkl
    # "uniform": teacher = cached top-k + the residual mass spread evenly over the V-k others
    n_tail = vocab - k
    resid = jnp.maximum(1.0 - jnp.sum(jnp.exp(lp_k.astype(jnp.float32)), axis=-1), _TOPK_TAIL_FLOOR)
    a_tail = (jnp.log(resid) - math.log(n_tail)) / temperature                     # (b, c), per token
    log_z = jnp.logaddexp(jax.nn.logsumexp(a_k, axis=-1), a_tail + math.log(n_tail))
    lp = a_k - log_z[..., None]
    lp_tail = a_tail - log_z
    p_tail_total = jnp.exp(lp_tail + math.log(n_tail))
    sum_lq_tail = jnp.sum(lq, axis=-1) - jnp.sum(lq_k, axis=-1)
    fkl = (jnp.sum(jnp.exp(lp) * (lp - lq_k), axis=-1)
           + p_tail_total * lp_tail - jnp.exp(lp_tail) * sum_lq_tail)
    q = jnp.exp(lq)
    q_k = jnp.exp(lq_k)
    qlogq_tail = jnp.sum(q * lq, axis=-1) - jnp.sum(q_k * lq_k, axis=-1)
    q_tail = jnp.maximum(1.0 - jnp.sum(q_k, axis=-1), 0.0)
    rkl = jnp.sum(q_k * (lq_k - lp), axis=-1) + qlogq_tail - q_tail * lp_tail
    return fkl, rkl


def kd_from_topk(topk_logprobs: Float[Array, "b l k"], topk_ids: Int[Array, "b l k"],
                 h_student: Float[Array, "b l d"], head_student: Float[Array, "d v"], mask: Float[Array, "b l"],
                 *, alpha: float, beta: float, temperature: float = 1.0, chunk: int = 128,
                 ce_targets: Optional[Int[Array, "b l"]] = None, ce_weight: float = 0.0,
                 tail: str = "uniform", scale_by_t2: bool = False):
    """Offline SBDS: the teacher is its top-k log-probs (at T = 1, cached to disk); the student's
    logits are computed in sequence chunks from its final-normed hidden states.

    Only k of V teacher probabilities are known, so both KLs use a reconstructed teacher p^:
      tail="uniform" (default): p^ equals the cached probabilities on the top-k and spreads the
        residual mass 1 - sum_k p (floored at 1e-6) evenly over the other V-k tokens; temperature
        is applied to p^ (p^_T proportional to p^^(1/T)). Both KL(p^_T||q) and KL(q||p^_T) are
        then exact for p^_T over the full vocabulary, computed from sums without building a V-long
        teacher vector, so the reverse KL still penalises student mass outside the top-k.
      tail="renorm": forward KL over the top-k with the teacher renormalised on it; reverse KL
        between the student and teacher both renormalised on the top-k (student mass outside
        the top-k is not penalised).
    With k = V both are the exact dense loss. Returns (loss_sum, token_count, metrics).
    """
    b, l, d = h_student.shape
    k = topk_logprobs.shape[-1]
    vocab = head_student.shape[1]
    _check(topk_logprobs.shape == (b, l, k) and topk_ids.shape == (b, l, k),
           f"topk_logprobs and topk_ids must be ({b}, {l}, k), got {topk_logprobs.shape} and {topk_ids.shape}")
    _check(k <= vocab, f"top-k size {k} exceeds the student vocab {vocab}")
    _check(head_student.shape[0] == d, f"head_student must be ({d}, V), got {head_student.shape}")
    _check(mask.shape == (b, l), f"mask must be ({b}, {l}), got {mask.shape}")
    _check(tail in ("uniform", "renorm"), f"tail must be 'uniform' or 'renorm', got {tail!r}")
    _check(chunk > 0, f"chunk must be > 0, got {chunk}")
    _validate_kd(alpha, beta, temperature, ce_targets, ce_weight)
    use_ce = ce_weight > 0

    c = min(chunk, l)
    n = -(-l // c)
    m = mask.astype(jnp.float32)
    tg = ce_targets.astype(jnp.int32) if use_ce else jnp.zeros((b, l), jnp.int32)
    xs = (_to_chunks(topk_logprobs, n, c), _to_chunks(topk_ids.astype(jnp.int32), n, c),
          _to_chunks(h_student, n, c), _to_chunks(m, n, c), _to_chunks(tg, n, c))

    def body(lpk, ids, hs, mc, tc):
        zs = dense(hs, head_student, jnp.float32)
        fkl, rkl = _topk_terms(lpk, ids, zs, temperature, vocab, tail)
        out = (jnp.sum(mc * fkl), jnp.sum(mc * rkl))
        return out + ((jnp.sum(mc * _ce(zs, tc)),) if use_ce else ())

    sums = _scan_chunks(body, xs)
    t2 = temperature ** 2 if scale_by_t2 else 1.0
    return _combine(sums[0], sums[1], sums[2] if use_ce else None, jnp.sum(m), alpha, beta, ce_weight, t2)


def _safe_norm(x, axis):
    """L2 norm with a zero (not NaN) gradient at x = 0 (student == teacher, padding)."""
    sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def _bl_mask(mask, b: int, l: int, name: str):
    if mask is None:
        return jnp.ones((b, l), jnp.float32)
    _check(mask.shape == (b, l), f"{name}: mask must be ({b}, {l}), got {mask.shape}")
    return mask.astype(jnp.float32)


def feature_loss(feats_t: Float[Array, "L b l d"], feats_s: Float[Array, "L b l d"], mask: Float[Array, "b l"],
                 relative: bool = False):
    """SBDS L2: per token and layer ||f_t - f_s||_2 (not squared), averaged over layers per token.
    Returns (sum over masked tokens, token count): sum / count = 1/(T L) sum_t sum_l L2.
    relative=True divides each term by ||f_t||_2 (scale-free: pretrained residual streams carry
    massive activations, e.g. SmolLM2's reach 1e3-1e4, which would otherwise swamp the KL)."""
    _check(feats_t.shape == feats_s.shape, f"feats_t {feats_t.shape} and feats_s {feats_s.shape} differ")
    _check(feats_s.ndim == 4, f"features must be (L, b, l, d), got {feats_s.shape}")
    m = _bl_mask(mask, feats_s.shape[1], feats_s.shape[2], "feature_loss")
    dist = _safe_norm(feats_t - feats_s, axis=-1)                                  # (L, b, l)
    if relative:
        dist = dist / (jax.lax.stop_gradient(_safe_norm(feats_t, axis=-1)) + 1e-6)
    per_token = jnp.mean(dist, axis=0)                                             # (b, l)
    return jnp.sum(m * per_token), jnp.sum(m)


def hidden_alignment_loss(y_student: Float[Array, "*L b l d"], y_teacher: Float[Array, "*L b l d"],
                          mask: Optional[Float[Array, "b l"]]):
    """MOHAWK step 2: ||y_teacher - y_student||_2 per token (and per layer for leading axes).
    Returns (sum, count) with count = masked tokens x number of layers."""
    _check(y_student.shape == y_teacher.shape, f"y_student {y_student.shape} and y_teacher {y_teacher.shape} differ")
    _check(y_student.ndim >= 3, f"hidden states must be (..., b, l, d), got {y_student.shape}")
    b, l = y_student.shape[-3:-1]
    m = _bl_mask(mask, b, l, "hidden_alignment_loss")
    e = _safe_norm(y_teacher - y_student, axis=-1)                                # (..., b, l)
    n_lead = math.prod(y_student.shape[:-3])
    return jnp.sum(e * m), jnp.sum(m) * n_lead


def matrix_orientation_loss(M_student: Float[Array, "*L b h l l"], A_teacher: Float[Array, "*L b h l l"],
                            mask: Optional[Float[Array, "b l"]] = None):
    """MOHAWK step 1: distance between the SSM's materialised mixing matrix and the teacher's
    attention matrix. Per (layer, head, query row i): ||A[i, :] - M[i, :]||_2 over the key
    columns (columns masked out too), so the squares of these row norms sum to the squared
    Frobenius distance; returns (sum over valid rows, count = valid rows x heads x layers)."""
    _check(M_student.shape == A_teacher.shape,
           f"M_student {M_student.shape} and A_teacher {A_teacher.shape} differ")
    _check(M_student.ndim >= 4 and M_student.shape[-1] == M_student.shape[-2],
           f"mixing matrices must be (..., b, h, l, l), got {M_student.shape}")
    b, h, l = M_student.shape[-4:-1]
    m = _bl_mask(mask, b, l, "matrix_orientation_loss")
    diff = (A_teacher.astype(jnp.float32) - M_student.astype(jnp.float32)) * m[:, None, None, :]
    e = _safe_norm(diff, axis=-1)                                                 # (..., b, h, l)
    n_lead = math.prod(M_student.shape[:-4])
    return jnp.sum(e * m[:, None, :]), jnp.sum(m) * h * n_lead
