"""Hostile files, fuzzed (seeded, bounded count and time): GGUF, text / JSONL / chat JSONL data,
the teacher top-k cache, and marjax checkpoints (marjax_checkpoint.json, the step's meta item and Orbax's metadata files).
Truncations at random offsets, oversized length fields, wrong value types and random bytes each
either load or raise a MarjaxError naming the file, within a time and memory bound; no reader
executes code from a file; paths inside a checkpoint never steer a write."""
import dataclasses
import json
import re
import shutil
import struct
import time
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

from marjax.config import MeshConfig, TrainConfig, preset
from marjax.distill.teacher_cache import TeacherCache
from marjax.errors import MarjaxError
from marjax.io.gguf import load_gguf, save_gguf
from marjax.io.tokenizer import ByteTokenizer
from marjax.models.lm import init_params
from marjax.train.checkpoint import Checkpointer, load_model_dir, make_meta
from marjax.train.data import load_documents
from marjax.train.mesh import make_mesh, shard_params
from marjax.train.optim import make_optimizer
from marjax.train.state import init_state

REPO = Path(__file__).resolve().parents[2]
SEED = 1234
MAX_S, MAX_MB = 5.0, 64          # per hostile file


@pytest.fixture(scope="module", autouse=True)
def _traced():
    """tracemalloc stays on for the whole module (reset_peak per case): stopping it while Orbax's
    background threads allocate crashed CPython 3.11 in our runs (SIGSEGV in a native thread)."""
    tracemalloc.start()
    yield
    tracemalloc.stop()


def _expect_clean(fn, path: Path):
    """fn() either returns or raises a MarjaxError whose message names `path`; bounded time and
    Python-visible memory (numpy allocations are traced too)."""
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
    except MarjaxError as e:
        assert str(path) in str(e) or path.name in str(e), f"error does not name {path}: {e}"
    dt = time.perf_counter() - t0
    peak = (tracemalloc.get_traced_memory()[1] - base) / 2**20
    assert dt < MAX_S, f"{path}: {dt:.1f} s"
    assert peak < MAX_MB, f"{path}: {peak:.0f} MB"


def _mutations(data: bytes, rng, n_trunc: int, n_flip: int, header: int):
    for _ in range(n_trunc):
        yield "trunc", data[:int(rng.integers(0, len(data)))]
    for _ in range(n_flip):
        b = bytearray(data)
        for _ in range(int(rng.integers(1, 8))):
            b[int(rng.integers(0, min(header, len(b))))] = int(rng.integers(0, 256))
        yield "flip", bytes(b)
    yield "random", bytes(rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8))


# ----------------------------------------------------------------------------- GGUF

@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    cfg = dataclasses.replace(preset("tiny"), n_layers=1, d_ff=64)
    p = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    save_gguf(str(p), cfg, init_params(jax.random.PRNGKey(0), cfg), ByteTokenizer())
    load_gguf(str(p))                                       # the unmutated file loads
    return p


def _gguf_header_len(data: bytes) -> int:
    """Bytes before the tensor data (where flips hit counts, lengths and types)."""
    return min(len(data), 24 + 256 * 16 + 4096)


def test_gguf_fuzz(gguf_file, tmp_path):
    data = gguf_file.read_bytes()
    rng = np.random.default_rng(SEED)
    cases = list(_mutations(data, rng, n_trunc=12, n_flip=24, header=_gguf_header_len(data)))
    cases.append(("random+magic", b"GGUF" + bytes(rng.integers(0, 256, 2000, dtype=np.uint8))))
    # oversized length fields: tensor count, metadata count, the first key's length, an array count
    for off, what in ((8, "n_tensors"), (16, "n_kv"), (24, "key0_len")):
        b = bytearray(data)
        b[off:off + 8] = struct.pack("<Q", 2**62)
        cases.append((what, bytes(b)))
    tok = data.find(b"tokenizer.ggml.tokens")
    b = bytearray(data)
    b[tok + len("tokenizer.ggml.tokens") + 8:tok + len("tokenizer.ggml.tokens") + 16] = struct.pack("<Q", 2**50)
    cases.append(("array_count", bytes(b)))
    # wrong value type: block_count stored as a string
    bc = data.find(b"llama.block_count")
    b = bytearray(data)
    b[bc + len("llama.block_count"):bc + len("llama.block_count") + 4] = struct.pack("<I", 8)
    cases.append(("block_count_type", bytes(b)))
    t0 = time.perf_counter()
    for i, (kind, blob) in enumerate(cases):
        p = tmp_path / f"case{i}_{kind}.gguf"
        p.write_bytes(blob)
        _expect_clean(lambda: load_gguf(str(p)), p)
    assert time.perf_counter() - t0 < 60


# ----------------------------------------------------------------------------- data files

DATA_SAMPLES = {
    "plain.jsonl": "\n".join(json.dumps({"text": f"document {i}: " + "word " * 20}) for i in range(8)),
    "chat.jsonl": "\n".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i} " * 5}]})
                            for i in range(6)),
    "share.json": json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]),
    "notes.txt": "line one\nline two\n\nparagraph two\n",
}
HOSTILE_JSONL = [
    '{"text": 5}', '{"text": null}', '{"messages": "x"}', '{"messages": [{"role": "wizard", "content": "x"}]}',
    '{"messages": [{"role": "user", "content": 7}]}', '{"conversations": [{"from": "gpt"}]}', '[1, 2]', '"text"',
    '{"text": "a"', "[" * 100000, '{"text": ' + "1" * 5000 + "}", "\x00\x01\x02", '{"other": "x"}',
]


def test_data_fuzz(tmp_path):
    rng = np.random.default_rng(SEED)
    n = 0
    t0 = time.perf_counter()
    for name, text in DATA_SAMPLES.items():
        good = tmp_path / name
        good.write_text(text)
        assert load_documents(good, heldout_fraction=0.0)
        for kind, blob in _mutations(text.encode(), rng, n_trunc=8, n_flip=12, header=len(text)):
            p = tmp_path / f"{n}_{kind}_{name}"
            p.write_bytes(blob)
            _expect_clean(lambda: load_documents(p, heldout_fraction=0.0), p)
            n += 1
    for line in HOSTILE_JSONL:
        p = tmp_path / f"{n}_hostile.jsonl"
        p.write_text(DATA_SAMPLES["plain.jsonl"] + "\n" + line + "\n")
        with pytest.raises(MarjaxError, match=re.escape(str(p))):
            load_documents(p, heldout_fraction=0.0)
        n += 1
    assert time.perf_counter() - t0 < 60


# ----------------------------------------------------------------------------- teacher cache

def _write_cache(d: Path, n: int = 2, b: int = 2, seq: int = 8, k: int = 4, vocab: int = 50) -> Path:
    rng = np.random.default_rng(0)
    d.mkdir(parents=True)
    for i in range(n):
        ids = rng.integers(0, vocab, (b, seq)).astype(np.int32)
        np.savez(d / f"batch_{i:06d}.npz", inputs=ids, targets=ids, mask=np.ones((b, seq), np.float32),
                 topk_logprobs=-rng.random((b, seq, k)).astype(np.float16),
                 topk_ids=rng.integers(0, vocab, (b, seq, k)).astype(np.int32))
    (d / "index.json").write_text(json.dumps({"k": k, "seq_len": seq, "batch": b, "n_batches": n,
                                              "vocab_size": vocab, "teacher": "t"}))
    return d


def _read_all(d: Path):
    return list(TeacherCache(str(d), loop=False))


def _npy_with_header(shape, dtype="<f2", payload=b"") -> bytes:
    """A .npy whose header claims `shape` (no data of that size behind it)."""
    header = repr({"descr": dtype, "fortran_order": False, "shape": tuple(shape)}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + payload


def test_teacher_cache_fuzz(tmp_path):
    good = _write_cache(tmp_path / "good")
    assert len(_read_all(good)) == 2                     # the unmutated cache reads
    rng = np.random.default_rng(SEED)
    n, t0 = 0, time.perf_counter()
    cases = []
    for name in ("index.json", "batch_000001.npz"):
        data = (good / name).read_bytes()
        cases += [(name, blob) for _, blob in _mutations(data, rng, n_trunc=8, n_flip=12, header=len(data))]
    cases += [("index.json", json.dumps(v).encode()) for v in
              ([1, 2], {"k": 4}, {"k": 4, "seq_len": 8, "batch": 2, "n_batches": 0, "vocab_size": 50},
               {"k": 99, "seq_len": 8, "batch": 2, "n_batches": 2, "vocab_size": 50},
               {"k": "4", "seq_len": 8, "batch": 2, "n_batches": 2, "vocab_size": 50})]
    cases.append(("index.json", b"[" * 100000))
    # oversized shape in a .npy header, an object (pickle) array, a wrong dtype, ids out of range
    for member, blob in [("topk_logprobs", _npy_with_header((2, 8, 2**40))),
                         ("topk_logprobs", _npy_with_header((2, 8, 4), "|O", b"\x80\x04N.")),
                         ("inputs", _npy_with_header((2, 8), "<c8", bytes(128))),
                         ("topk_ids", _npy_with_header((2, 8, 4), "<i4", np.full(64, 10**6, np.int32).tobytes()))]:
        p = tmp_path / f"z{len(cases)}.npz"
        with zipfile.ZipFile(good / "batch_000001.npz") as src, zipfile.ZipFile(p, "w") as dst:
            for item in src.namelist():
                dst.writestr(item, blob if item == member + ".npy" else src.read(item))
        cases.append(("batch_000001.npz", p.read_bytes()))
    for name, blob in cases:
        d = tmp_path / f"c{n}"
        shutil.copytree(good, d)
        (d / name).write_bytes(blob)
        _expect_clean(lambda: _read_all(d), d)
        n += 1
    with pytest.raises(MarjaxError, match="missing"):
        d = tmp_path / "gone"
        shutil.copytree(good, d)
        (d / "batch_000001.npz").unlink()
        _read_all(d)
    assert n >= 50 and time.perf_counter() - t0 < 60


# ----------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    cfg = dataclasses.replace(preset("tiny"), n_layers=1, d_ff=64)
    mesh = make_mesh(MeshConfig())
    p = shard_params(init_params(jax.random.PRNGKey(0), cfg), mesh)
    st = init_state(p, make_optimizer(TrainConfig(), p), 0, mesh)
    d = tmp_path_factory.mktemp("ckpt") / "run"
    with Checkpointer(d) as ck:
        ck.save(3, st, {"pos": 1}, make_meta("kd", cfg))
    load_model_dir(d)
    return d


def test_checkpoint_metadata_fuzz(ckpt_dir, tmp_path):
    rng = np.random.default_rng(SEED)
    targets = ["marjax_checkpoint.json", "3/meta/metadata", "3/_CHECKPOINT_METADATA", "3/params/_METADATA",
               "3/params/manifest.ocdbt", "3/data/metadata"]
    targets = [t for t in targets if (ckpt_dir / t).is_file()]
    assert len(targets) >= 5, sorted(str(p.relative_to(ckpt_dir)) for p in ckpt_dir.rglob("*"))
    n = 0
    t0 = time.perf_counter()
    for t in targets:
        data = (ckpt_dir / t).read_bytes()
        extra = [("type", json.dumps([1, 2]).encode()), ("deep", b"[" * 100000)]
        for kind, blob in list(_mutations(data, rng, n_trunc=3, n_flip=3, header=len(data))) + extra:
            d = tmp_path / f"c{n}" / "run"
            shutil.copytree(ckpt_dir, d)
            (d / t).write_bytes(blob)
            _expect_clean(lambda: load_model_dir(d), d)
            n += 1
    assert time.perf_counter() - t0 < 120


def test_no_reader_executes_code_from_a_file():
    """No unpickling, eval or exec anywhere a file is read (a static check of the readers)."""
    bad = re.compile(r"\bpickle\b|allow_pickle\s*=\s*True|\beval\(|\bexec\(|yaml\.load\(|torch\.load\(")
    hits = [f"{p.relative_to(REPO)}:{i}" for p in (REPO / "marjax").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line.split("#")[0])]
    assert hits == []


def test_paths_in_a_checkpoint_never_steer_writes(ckpt_dir, tmp_path):
    """A checkpoint whose metadata points run.out / tokenizer_source elsewhere: loading it and
    resuming training from it write only inside the run directory."""
    root = tmp_path / "root"
    d = root / "runs" / "run"
    shutil.copytree(ckpt_dir, d)
    for f in (d / "marjax_checkpoint.json", d / "3" / "meta" / "metadata"):
        meta = json.loads(f.read_text())
        meta["tokenizer_source"] = str(root / "evil_tokenizer")
        meta["run_config"] = {"run": {"out": str(root / "escaped"), "data": "../../x"}}
        f.write_text(json.dumps(meta))
    before = {p for p in root.rglob("*") if d not in p.parents and p != d}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_model_dir(d)
    after = {p for p in root.rglob("*") if d not in p.parents and p != d}
    assert after == before
