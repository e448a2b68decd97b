"""Write a teacher top-k cache (`marjax distill --cache-teacher DIR`); marjax.distill.teacher_cache
reads it. Layout in that module's docstring."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from marjax.app.runner import make_data
from marjax.errors import DataError
from marjax.models.lm import forward
from marjax.train.optim import accum_steps

__all__ = ["cache_teacher_topk"]


def _topk_fn(cfg, k):
    @jax.jit
    def f(params, ids):
        lg, _ = forward(params, ids, cfg)
        logp = jax.nn.log_softmax(lg, -1)
        v, i = jax.lax.top_k(logp, k)
        return v, i
    return f


def cache_teacher_topk(teacher, rc, out_dir: str, k: int = 64, n_batches: int | None = None) -> Path:
    """Run the teacher over `n_batches` micro-batches of the run's data (default: what the run
    consumes, train.steps updates x accum_steps micro-batches each, so nothing repeats)."""
    if not 1 <= k <= teacher.config.vocab_size:
        raise DataError(f"top-k must be in [1, vocab_size={teacher.config.vocab_size}], got {k}")
    n = rc.train.steps * accum_steps(rc.train) if n_batches is None else n_batches
    if n < 1:
        raise DataError(f"n_batches must be >= 1, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    it = iter(make_data(rc, teacher.tokenizer, teacher.config))
    f = _topk_fn(teacher.config, k)
    for i in tqdm(range(n), desc="teacher top-k", unit="batch"):
        b = next(it)
        v, idx = f(teacher.params, jnp.asarray(b["inputs"]))
        np.savez(out / f"batch_{i:06d}.npz", inputs=np.asarray(b["inputs"]), targets=np.asarray(b["targets"]),
                 mask=np.asarray(b["mask"]), topk_logprobs=np.asarray(v, np.float16), topk_ids=np.asarray(idx, np.int32))
    (out / "index.json").write_text(json.dumps({"k": k, "seq_len": rc.train.seq_len, "batch": rc.train.micro_batch,
                                                "n_batches": n, "vocab_size": teacher.config.vocab_size,
                                                "teacher": rc.run.teacher}))
    return out
