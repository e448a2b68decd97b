"""Offline distillation: cache the teacher's top-k log-probs to disk once
(`marjax distill --cache-teacher DIR`), then train against the cache without the teacher in
memory (`run.data=DIR`, detected by its index.json).

Layout: DIR/index.json {k, seq_len, batch, n_batches, vocab_size, teacher} and one
DIR/batch_{i:06d}.npz per batch with inputs, targets, mask, topk_logprobs (b,l,k) float16,
topk_ids (b,l,k) int32.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from marjax.errors import DataError

__all__ = ["cache_teacher_topk", "TeacherCache", "is_teacher_cache"]


def _topk_fn(cfg, k):
    from marjax.models.lm import forward

    @jax.jit
    def f(params, ids):
        lg, _ = forward(params, ids, cfg)
        logp = jax.nn.log_softmax(lg, -1)
        v, i = jax.lax.top_k(logp, k)
        return v, i
    return f


def cache_teacher_topk(teacher, rc, out_dir: str, k: int = 64, n_batches: int | None = None) -> Path:
    """Run the teacher over `n_batches` (default train.steps) batches of the run's data."""
    from marjax.distill.run import make_data
    if not 1 <= k <= teacher.config.vocab_size:
        raise DataError(f"top-k must be in [1, vocab_size={teacher.config.vocab_size}], got {k}")
    n = rc.train.steps if n_batches is None else n_batches
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


def is_teacher_cache(path: str) -> bool:
    return bool(path) and (Path(path) / "index.json").is_file()


class TeacherCache:
    """Iterator over a cache directory; checkpointable like the Grain iterators (get/set_state)."""

    def __init__(self, path: str, loop: bool = True):
        self.path = Path(path)
        try:
            self.index = json.loads((self.path / "index.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"teacher cache {self.path} has no readable index.json: {e}") from e
        self.pos, self.loop = 0, loop

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        n = self.index["n_batches"]
        if self.pos >= n and not self.loop:
            raise StopIteration
        f = self.path / f"batch_{self.pos % n:06d}.npz"
        if not f.is_file():
            raise DataError(f"teacher cache file missing: {f}")
        self.pos += 1
        with np.load(f) as z:
            b = {key: z[key] for key in z.files}
        b["topk_logprobs"] = b["topk_logprobs"].astype(np.float32)
        return b

    def get_state(self) -> dict:
        return {"pos": self.pos}

    def set_state(self, state: dict) -> None:
        self.pos = int(state["pos"])
