"""Offline distillation: cache the teacher's top-k log-probs to disk once
(`marjax distill --cache-teacher DIR`, written by marjax.app.cache), then train against the
cache without the teacher in memory (`run.data=DIR`, detected by its index.json). This module
reads a cache.

Layout: DIR/index.json {k, seq_len, batch, n_batches, vocab_size, teacher} and one
DIR/batch_{i:06d}.npz per batch with inputs, targets, mask, topk_logprobs (b,l,k) float16,
topk_ids (b,l,k) int32.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from marjax.errors import DataError

__all__ = ["TeacherCache", "is_teacher_cache"]


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
