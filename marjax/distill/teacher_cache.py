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
import zipfile
from pathlib import Path

import numpy as np

from marjax.errors import DataError

__all__ = ["TeacherCache", "is_teacher_cache"]


_INDEX_INTS = ("k", "seq_len", "batch", "n_batches", "vocab_size")
# per batch file: array name -> (dtype kind, shape in index fields); checked from the .npy
# headers before any data is read, so a hostile header never makes us allocate what it claims
_ARRAYS = {"inputs": ("iu", ("batch", "seq_len")), "targets": ("iu", ("batch", "seq_len")),
           "mask": ("iubf", ("batch", "seq_len")), "topk_logprobs": ("f", ("batch", "seq_len", "k")),
           "topk_ids": ("iu", ("batch", "seq_len", "k"))}


def is_teacher_cache(path: str) -> bool:
    return bool(path) and (Path(path) / "index.json").is_file()


def _read_index(path: Path) -> dict:
    f = path / "index.json"
    try:
        if f.stat().st_size > 1 << 20:
            raise DataError(f"teacher cache {f} is not an index (over 1 MiB)")
        index = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"teacher cache {path} has no readable index.json ({f}): {e}") from e
    if not isinstance(index, dict):
        raise DataError(f"teacher cache index {f} is not a JSON object")
    for key in _INDEX_INTS:
        v = index.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v < 2**31:
            raise DataError(f"teacher cache index {f}: {key!r} must be a positive integer, got {v!r}")
    if index["k"] > index["vocab_size"]:
        raise DataError(f"teacher cache index {f}: k={index['k']} exceeds vocab_size={index['vocab_size']}")
    return index


def _read_batch(f: Path, index: dict) -> dict:
    """The arrays of one batch file, every header checked against the index first."""
    if not f.is_file():
        raise DataError(f"teacher cache file missing: {f}")
    out = {}
    try:
        with zipfile.ZipFile(f) as z:
            names = {n[:-4]: n for n in z.namelist() if n.endswith(".npy")}
            missing = sorted(set(_ARRAYS) - set(names))
            if missing:
                raise DataError(f"teacher cache file {f} lacks arrays {missing}")
            for key, (kinds, dims) in _ARRAYS.items():
                want = tuple(index[d] for d in dims)
                with z.open(names[key]) as fh:
                    version = np.lib.format.read_magic(fh)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read_header(fh)
                    if dtype.hasobject or dtype.kind not in kinds or tuple(shape) != want or fortran:
                        raise DataError(f"teacher cache file {f}: {key} is {dtype} {tuple(shape)}"
                                        f"{' (Fortran order)' if fortran else ''}, expected kind {kinds!r} {want}")
                    nbytes = int(np.prod(want)) * dtype.itemsize
                    data = fh.read(nbytes)
                    if len(data) != nbytes:
                        raise DataError(f"teacher cache file {f}: {key} is truncated")
                    out[key] = np.frombuffer(data, dtype).reshape(want)
    except DataError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError,
            RuntimeError, SyntaxError) as e:
        raise DataError(f"teacher cache file {f} is unreadable: {type(e).__name__}: {e}") from e
    ids = out["topk_ids"]
    if ids.size and (ids.min() < 0 or ids.max() >= index["vocab_size"]):
        raise DataError(f"teacher cache file {f}: topk_ids outside [0, {index['vocab_size']})")
    if not np.all(np.isfinite(out["topk_logprobs"]) | (out["topk_logprobs"] == -np.inf)):
        raise DataError(f"teacher cache file {f}: topk_logprobs hold NaN or +inf")
    out["topk_logprobs"] = out["topk_logprobs"].astype(np.float32)
    return out


class TeacherCache:
    """Iterator over a cache directory; checkpointable like the Grain iterators (get/set_state).
    Every file is validated (index fields, array names, dtypes, shapes, token ids) and a bad one
    raises a DataError naming it."""

    def __init__(self, path: str, loop: bool = True):
        self.path = Path(path)
        self.index = _read_index(self.path)
        self.pos, self.loop = 0, loop

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        n = self.index["n_batches"]
        if self.pos >= n and not self.loop:
            raise StopIteration
        b = _read_batch(self.path / f"batch_{self.pos % n:06d}.npz", self.index)
        self.pos += 1
        return b

    def get_state(self) -> dict:
        return {"pos": self.pos}

    def set_state(self, state: dict) -> None:
        self.pos = int(state["pos"])
