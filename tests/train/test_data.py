"""Data pipeline with a byte-level fake tokenizer: packing, shift, assistant masks, seeds,
shards, checkpointed iterator state, held-out split, readers and their errors."""
import json

import numpy as np
import pytest

from marjax.errors import MarjaxError, DataError
from marjax.train import corpus
from marjax.train.data import heldout_text, load_documents, make_dataset, split_heldout, tokenize_documents

BOS, EOS, IM_START, IM_END = 256, 257, 258, 259
SPECIAL = {"<|im_start|>": IM_START, "<|im_end|>": IM_END}


class ByteTok:
    """UTF-8 bytes + 4 special ids; ChatML template (SmolLM2 form)."""
    eos_id, bos_id = EOS, BOS

    def __init__(self, add_bos=False):
        self.add_bos = add_bos

    def encode(self, text, add_special=True):      # like marjax.io.tokenizer: BOS unless add_special=False
        out, i = ([BOS] if add_special and self.add_bos else []), 0
        while i < len(text):
            for s, t in SPECIAL.items():
                if text.startswith(s, i):
                    out.append(t)
                    i += len(s)
                    break
            else:
                out.extend(text[i].encode("utf-8"))
                i += 1
        return out

    def apply_chat_template(self, messages, add_generation_prompt=False):
        s = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return s + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _collect(it, n=None):
    out = []
    for i, b in enumerate(it):
        if n is not None and i >= n:
            break
        out.append({k: np.asarray(v) for k, v in b.items()})
    return out


def _rows(batches):
    return [tuple(r) for b in batches for r in b["inputs"]]


def test_packing_reproduces_stream_and_shift():
    tok = ByteTok()
    docs = ["a" * 20, "b" * 22]            # 21 + 23 = 44 tokens -> 6 windows of 8 (last has 3 targets)
    stream = [97] * 20 + [EOS] + [98] * 22 + [EOS]
    it = make_dataset(docs, tok, seq_len=8, batch_size=3, seed=0, shuffle=False, num_epochs=1,
                      shard_index=0, shard_count=1)
    bs = _collect(it)
    assert len(bs) == 2 and it.n_tokens == 44 and it.batches_per_epoch == 2
    for b in bs:
        assert b["inputs"].dtype == np.int32 and b["targets"].dtype == np.int32 and b["mask"].dtype == np.float32
        assert b["inputs"].shape == b["targets"].shape == b["mask"].shape == (3, 8)
    inputs = np.concatenate([b["inputs"] for b in bs])
    targets = np.concatenate([b["targets"] for b in bs])
    mask = np.concatenate([b["mask"] for b in bs])
    n = mask.sum(1).astype(int)
    assert list(n) == [8, 8, 8, 8, 8, 3]          # only the tail is padding
    joined = np.concatenate([inputs[r, :n[r]] for r in range(6)] + [targets[5, n[5] - 1:n[5]]])
    np.testing.assert_array_equal(joined, stream)
    for r in range(6):                            # shift inside a row and across rows
        np.testing.assert_array_equal(targets[r, :n[r] - 1], inputs[r, 1:n[r]])
        if r < 5:
            assert targets[r, -1] == inputs[r + 1, 0]
    assert (mask[5, 3:] == 0).all() and (inputs[5, 3:] == EOS).all()


def test_bos_and_document_separators():
    ids, bits = tokenize_documents(["ab", "c"], ByteTok(add_bos=True))
    np.testing.assert_array_equal(ids, [BOS, 97, 98, EOS, BOS, 99, EOS])
    assert bits.all()
    ids, bits = tokenize_documents([CHAT[:3]], ByteTok(add_bos=True), "assistant")   # one BOS per chat
    assert list(ids).count(BOS) == 1 and ids[0] == BOS and bits[0] == 0


def test_real_byte_tokenizer_chat():
    """marjax.io.tokenizer.ByteTokenizer: the assistant-masked stream equals tokenising the
    whole rendered chat, and the mask covers exactly the replies."""
    tokenizer = pytest.importorskip("marjax.io.tokenizer")
    tok = tokenizer.ByteTokenizer(add_bos=True)
    ids, bits = tokenize_documents([CHAT], tok, "assistant")
    whole = tok.encode(tok.apply_chat_template(CHAT)) + [tok.eos_id]
    np.testing.assert_array_equal(ids, whole)
    assert list(ids[bits == 1]) == tok.encode("yo<|im_end|>\nans<|im_end|>\n", add_special=False)
    tok.chat = tokenizer.ChatTemplate(default_system="DEFAULT")   # SmolLM2-style injected system prompt
    ids, bits = tokenize_documents([CHAT[1:]], tok, "assistant")
    np.testing.assert_array_equal(ids, tok.encode(tok.apply_chat_template(CHAT[1:])) + [tok.eos_id])
    assert b"DEFAULT" in bytes(ids[ids < 128].astype(np.uint8))
    assert list(ids[bits == 1]) == tok.encode("yo<|im_end|>\nans<|im_end|>\n", add_special=False)


def test_shuffle_is_a_seeded_permutation():
    tok = ByteTok()
    docs = [bytes(range(97, 123)).decode() * 8]
    kw = dict(seq_len=8, batch_size=2, num_epochs=1, shard_index=0, shard_count=1)
    plain = _rows(_collect(make_dataset(docs, tok, seed=0, shuffle=False, **kw)))
    a = _rows(_collect(make_dataset(docs, tok, seed=1, **kw)))
    a2 = _rows(_collect(make_dataset(docs, tok, seed=1, **kw)))
    c = _rows(_collect(make_dataset(docs, tok, seed=2, **kw)))
    assert a == a2                                  # deterministic by seed
    assert a != plain and a != c                    # but shuffled, differently per seed
    assert sorted(a) == sorted(plain) == sorted(c)  # a permutation of the same windows


def test_epochs_are_reshuffled():
    docs = ["x" * 40 + "y" * 40]
    it = make_dataset(docs, ByteTok(), seq_len=8, batch_size=5, seed=3, num_epochs=2, shard_index=0, shard_count=1)
    rows = _rows(_collect(it))
    assert len(rows) == 20
    assert sorted(rows[:10]) == sorted(rows[10:]) and rows[:10] != rows[10:]


def test_shards_are_disjoint_and_equal():
    docs = ["".join(chr(c) for c in np.random.default_rng(0).integers(97, 123, 300))]   # no repeated windows
    kw = dict(seq_len=8, batch_size=2, seed=5, num_epochs=1, shard_count=3)
    shards = [_rows(_collect(make_dataset(docs, ByteTok(), shard_index=s, **kw))) for s in range(3)]
    allrows = set(_rows(_collect(make_dataset(docs, ByteTok(), seed=0, shuffle=False, num_epochs=1, seq_len=8,
                                              batch_size=1, shard_index=0, shard_count=1))))
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) > 0
    sets = [set(s) for s in shards]
    assert all(len(sets[i] & sets[j]) == 0 for i in range(3) for j in range(i + 1, 3))
    assert set().union(*sets) <= allrows


@pytest.mark.parametrize("skip", [3, 11])   # 11 batches crosses an epoch boundary
def test_checkpoint_state_round_trip(skip):
    docs = ["".join(chr(c) for c in np.random.default_rng(1).integers(97, 123, 200))]
    kw = dict(seq_len=8, batch_size=3, seed=7, shard_index=0, shard_count=1)
    it = make_dataset(docs, ByteTok(), **kw)
    _collect(it, skip)
    state = json.loads(json.dumps(it.get_state()))   # must survive JSON (checkpoint files)
    want = _collect(it, 2)
    fresh = make_dataset(docs, ByteTok(), **kw)
    fresh.set_state(state)
    got = _collect(fresh, 2)
    for w, g in zip(want, got):
        for k in w:
            np.testing.assert_array_equal(w[k], g[k])
    assert _rows(_collect(make_dataset(docs, ByteTok(), **kw), 2)) != _rows(want)   # the state mattered
    other = make_dataset(docs, ByteTok(), **dict(kw, seed=8))
    assert _rows(_collect(other, 2)) != _rows(want)
    with pytest.raises(DataError, match="seed"):
        make_dataset(docs, ByteTok(), **dict(kw, seed=8)).set_state(state)


CHAT = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"}, {"role": "user", "content": "q?"},
        {"role": "assistant", "content": "ans"}]


def test_assistant_only_mask():
    tok = ByteTok()
    ids_all, bits_all = tokenize_documents([CHAT], tok, "all")
    ids, bits = tokenize_documents([CHAT], tok, "assistant")
    np.testing.assert_array_equal(ids, ids_all)     # same tokens, only the mask differs
    assert bits_all.all()
    want = tok.encode("yo<|im_end|>\nans<|im_end|>\n")
    assert list(ids[bits == 1]) == want
    # through the dataset: mask marks targets that are assistant-reply tokens
    docs = [CHAT] * 4
    it = make_dataset(docs, tok, seq_len=16, batch_size=2, seed=0, mask="assistant", shuffle=False,
                      num_epochs=1, shard_index=0, shard_count=1)
    bs = _collect(it)
    tg = np.concatenate([b["targets"][b["mask"] == 1] for b in bs])
    assert list(tg) == (want * 4)[:len(tg)] and len(tg) >= len(want)
    with pytest.raises(DataError, match="plain text"):
        tokenize_documents(["just text"], tok, "assistant")


def test_readers(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "first"}) + "\n\n" + json.dumps({"body": "second"}) + "\n")
    assert load_documents(tmp_path / "a.jsonl", text_field="body", heldout_fraction=0) == ["first", "second"]
    share = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "hi"},
                               {"from": "gpt", "value": "yo"}, {"from": "human", "value": "q?"},
                               {"from": "gpt", "value": "ans"}]}
    (tmp_path / "c.jsonl").write_text(json.dumps(share) + "\n" + json.dumps({"messages": CHAT}) + "\n")
    assert load_documents(tmp_path / "c.jsonl", heldout_fraction=0) == [CHAT, CHAT]
    (tmp_path / "d.json").write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    assert load_documents(tmp_path / "d.json", heldout_fraction=0) == ["x", "y"]
    (tmp_path / "t.txt").write_text("p1 l1\np1 l2\n\n\np2\n")
    assert load_documents(tmp_path / "t.txt", heldout_fraction=0) == ["p1 l1\np1 l2\n\n\np2\n"]
    assert load_documents(tmp_path / "t.txt", txt_split="blank_lines", heldout_fraction=0) == ["p1 l1\np1 l2", "p2"]
    sub = tmp_path / "dir"
    sub.mkdir()
    (sub / "b.txt").write_text("B")
    (sub / "a.txt").write_text("A")
    (sub / "skip.bin").write_bytes(b"\x00")
    assert load_documents(sub, heldout_fraction=0) == ["A", "B"]


def test_heldout_split(tmp_path):
    text = "".join(f"line {i}\n" for i in range(200))
    (tmp_path / "t.txt").write_text(text)
    train = load_documents(tmp_path / "t.txt", heldout_fraction=0.1)
    held = heldout_text(tmp_path / "t.txt", heldout_fraction=0.1)
    assert train[0] + "\n" + held == text or train[0] + held == text
    assert 0.05 * len(text) < len(held) < 0.15 * len(held + train[0])
    assert held.startswith("line ")                  # cut at a line break
    chat = [{"role": "user", "content": "c" * 10}]
    docs = ["a" * 10, chat, "b" * 10]
    assert split_heldout(docs, 0.0) == (docs, [])
    assert split_heldout(docs, 0.5) == (["a" * 10], [chat, "b" * 10])   # a chat is never cut
    assert split_heldout(docs, 0.1) == (["a" * 10, chat, "b" * 7], ["bbb"])
    assert split_heldout([chat], 0.5) == ([chat], [])                  # train is never emptied


def test_embedded_corpus():
    docs = corpus.default_documents()
    assert corpus.default_text() == "\n\n".join(docs) and len(corpus.default_text()) > 100_000
    assert "pydoc_data" in corpus.default_source()
    train = load_documents(None)
    held = heldout_text(None)
    assert 0 < len(held) < 0.05 * len(corpus.default_text())
    assert sum(map(len, train)) + len(held) <= len(corpus.default_text())
    assert held not in train[-1]


def test_errors(tmp_path):
    tok = ByteTok()
    with pytest.raises(DataError, match="does not exist"):
        load_documents(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        load_documents(tmp_path / "empty.txt")
    (tmp_path / "latin.txt").write_bytes(b"a\nbc\xffdef")
    with pytest.raises(DataError, match=r"0xff at byte offset 4 \(line 2"):
        load_documents(tmp_path / "latin.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: bad JSON"):
        load_documents(tmp_path / "bad.jsonl")
    (tmp_path / "field.jsonl").write_text('{"text": "ok"}\n\n{"content": "x"}\n')
    with pytest.raises(DataError, match=r"field\.jsonl:3: no field 'text'"):
        load_documents(tmp_path / "field.jsonl")
    (tmp_path / "role.jsonl").write_text(json.dumps({"conversations": [{"from": "alien", "value": "x"}]}) + "\n")
    with pytest.raises(DataError, match="unknown role 'alien'"):
        load_documents(tmp_path / "role.jsonl")
    # 2 shards x batch 2 = 4 windows of 11 targets: 3*11 + 2 = 35 tokens; "a"*34 + eos is exactly that
    with pytest.raises(DataError, match=r"34 tokens .* at least 35 tokens"):
        make_dataset(["a" * 33], tok, seq_len=11, batch_size=2, seed=0, shard_index=0, shard_count=2)
    assert next(make_dataset(["a" * 34], tok, seq_len=11, batch_size=2, seed=0, shard_index=1,
                             shard_count=2))["inputs"].shape == (2, 11)
    with pytest.raises(DataError, match="seq_len 64 exceeds max_seq_len 32"):
        make_dataset(["a" * 200], tok, seq_len=64, batch_size=1, seed=0, max_seq_len=32)
    with pytest.raises(MarjaxError, match="mask"):
        make_dataset(["a" * 200], tok, seq_len=8, batch_size=1, seed=0, mask="bogus", shard_index=0, shard_count=1)
