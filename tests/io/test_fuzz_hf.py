"""Hostile HF-style files (seeded fuzz, bounded count and time): config.json, safetensors
headers and files, tokenizer.json and tokenizer_config.json. Truncations at random offsets,
random byte overwrites, oversized header lengths and tensor claims, wrong dtypes, wrongly typed
config fields, random bytes. Every case either loads or raises a marjax error that names the
mutated file, within a time bound, and no case allocates what the file claims."""
import json
import random
import resource
import shutil
import struct
import time
from pathlib import Path

import pytest

from marjax.errors import MarjaxError
from marjax.io.hf import load_hf
from marjax.io.tokenizer import load_tokenizer_dir

DATA = Path(__file__).parents[1] / "data"
SEED, PER_KIND, CASE_SECONDS = 1234, 12, 3.0


def _maxrss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _expect_clean(fn, target: Path):
    """fn() loads, or raises MarjaxError naming target's file; within CASE_SECONDS."""
    t0 = time.perf_counter()
    try:
        fn()
    except MarjaxError as e:
        assert target.name in str(e), f"error does not name {target.name}: {e}"
    dt = time.perf_counter() - t0
    assert dt < CASE_SECONDS, f"{target.name}: {dt:.1f}s"


def _mutations(rng: random.Random, data: bytes):
    """(label, bytes): truncations, overwritten spans, random files."""
    for _ in range(PER_KIND):
        yield "truncate", data[:rng.randrange(0, len(data))]
    for _ in range(PER_KIND):
        b = bytearray(data)
        same_size = rng.random() < 0.5            # else spans are inserted or deleted too
        for _ in range(rng.randint(1, 8)):
            i, k = rng.randrange(len(b)), rng.randint(1, 16)
            b[i:i + k] = bytes(rng.randrange(256) for _ in range(k if same_size else rng.randint(1, 16)))
        yield "overwrite", bytes(b)
    for _ in range(PER_KIND // 3):
        yield "random", bytes(rng.randrange(256) for _ in range(rng.randint(0, 4096)))


@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(DATA / "llama32_tiny" / "model.safetensors", d)
    shutil.copy(DATA / "llama32_tiny" / "config.json", d)
    return d


def _safetensors(header: dict, payload: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + payload


def test_fuzz_safetensors(ckpt):
    rng = random.Random(SEED)
    st = ckpt / "model.safetensors"
    good = st.read_bytes()
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8:8 + n])
    rss0 = _maxrss_mb()
    cases = list(_mutations(rng, good))
    # the header region specifically (offsets, dtypes, shapes live there)
    for _ in range(PER_KIND):
        b = bytearray(good)
        i = rng.randrange(8, 8 + n)
        b[i] = rng.randrange(256)
        cases.append(("header byte", bytes(b)))
    # header lengths claiming far more than the file (never allocated)
    for claim in (n + 1, len(good), 2 ** 31, 2 ** 63 - 1, 2 ** 64 - 1):
        cases.append(("length", struct.pack("<Q", claim) + good[8:]))
    name = next(k for k in header if k != "__metadata__")
    t = header[name]
    hostile = [
        {**t, "shape": [2 ** 40, 2 ** 40]},                       # claims 2^80 elements
        {**t, "data_offsets": [0, 2 ** 62]},                      # past the end
        {**t, "data_offsets": [t["data_offsets"][1], t["data_offsets"][0]]},
        {**t, "dtype": "Q4_K"},                                   # unknown dtype
        {**t, "dtype": "I64"},                                    # wrong dtype, consistent size below
        {**t, "shape": [-1]},
        {**t, "shape": "big"},
    ]
    payload = good[8 + n:]
    for bad in hostile:
        if bad.get("dtype") == "I64":
            k = (t["data_offsets"][1] - t["data_offsets"][0]) // 8
            bad = {**bad, "shape": [k]}
            bad["data_offsets"] = [t["data_offsets"][0], t["data_offsets"][0] + 8 * k]
        cases.append(("hostile header", _safetensors({**header, name: bad}, payload)))
    assert len(cases) >= 50
    for label, data in cases:
        st.write_bytes(data)
        _expect_clean(lambda: load_hf(str(ckpt)), st)
    assert _maxrss_mb() - rss0 < 500, "a hostile header became an allocation"


VALUES = [None, 0, -1, 1.5, 2 ** 62, 1e308, float("nan"), "", "abc", "12", [], [1, 2], {}, {"a": 1}, True]


def test_fuzz_config_json(ckpt):
    rng = random.Random(SEED + 1)
    cj = ckpt / "config.json"
    good = cj.read_text()
    conf = json.loads(good)
    cases = list(_mutations(rng, good.encode()))
    for _ in range(4 * PER_KIND):        # valid JSON, fields of the wrong type or value
        c = dict(conf)
        for key in rng.sample(sorted(c), rng.randint(1, 3)):
            c[key] = rng.choice(VALUES)
        if rng.random() < 0.3:
            c["rope_scaling"] = rng.choice([{"rope_type": "yarn", "factor": 4}, {"type": "dynamic"}, 7, [],
                                            {"rope_type": "llama3", "factor": "x"}, {"rope_type": "llama3"},
                                            {"rope_type": "linear", "factor": -2.0}])
        cases.append(("fields", json.dumps(c).encode()))
    cases += [("nested", b"[" * 100000 + b"]" * 100000), ("array", b"[1, 2]"), ("string", b'"x"'),
              ("layers", json.dumps({**conf, "num_hidden_layers": 10 ** 9}).encode())]
    for label, data in cases:
        cj.write_bytes(data)
        _expect_clean(lambda: load_hf(str(ckpt)), cj)


def test_fuzz_safetensors_index(ckpt):
    """A shard index pointing outside the directory, or not an index at all."""
    idx = ckpt / "model.safetensors.index.json"
    outside = ckpt.parent / "outside.safetensors"
    shutil.copy(ckpt / "model.safetensors", outside)
    for data in [{"weight_map": {"model.norm.weight": "../outside.safetensors"}},
                 {"weight_map": {"model.norm.weight": str(outside)}}, {"weight_map": []}, {"weight_map": {"a": 5}},
                 {}, [1]]:
        idx.write_text(json.dumps(data))
        with pytest.raises(MarjaxError, match=idx.name):
            load_hf(str(ckpt))
    idx.write_bytes(b"\xff\xfe{")
    _expect_clean(lambda: load_hf(str(ckpt)), idx)


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(["hello world, the quick brown fox " * 20],
                           trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d = tmp_path_factory.mktemp("tok")
    tk.save(str(d / "tokenizer.json"))
    tmpl = json.loads((DATA / "chat_templates" / "mistral.json").read_text())["template"]
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"},
                                                         "add_bos_token": True, "chat_template": tmpl}))
    return d


def test_fuzz_tokenizer_files(tmp_path, tokdir):
    rng = random.Random(SEED + 2)
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        d = tmp_path / fname.split(".")[0]
        shutil.copytree(tokdir, d)
        target = d / fname
        good = target.read_bytes()
        cases = list(_mutations(rng, good))
        if fname == "tokenizer_config.json":
            conf = json.loads(good)
            for _ in range(2 * PER_KIND):
                c = dict(conf)
                for key in rng.sample(sorted(c), rng.randint(1, 2)):
                    c[key] = rng.choice(VALUES + ["{% for %}", "{{ raise_exception('x') }}"])
                cases.append(("fields", json.dumps(c).encode()))
        else:   # a wrongly typed model section
            tj = json.loads(good)
            for v in VALUES[:8]:
                cases.append(("model", json.dumps({**tj, "model": {**tj["model"], "vocab": v}}).encode()))
        for label, data in cases:
            target.write_bytes(data)

            def load_and_chat():
                tok = load_tokenizer_dir(str(d))
                try:   # a loaded template that cannot render must say so as a MarjaxError too
                    tok.encode_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
                except MarjaxError as e:
                    assert "tokenizer_config.json" in str(e) and "template" in str(e), e
                    return
            _expect_clean(load_and_chat, target)
