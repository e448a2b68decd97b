"""Log-likelihood scoring, acc/acc_norm, stderr, perplexity and the `marjax eval` CLI, with fake
models whose answers are known in closed form."""
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest

from marjax.errors import DataError, MarjaxError
from marjax.eval import suite as E
from marjax.eval import perplexity as P
from marjax.eval import scoring as S
from marjax.eval.tasks import MCItem

V = 256


class ByteTok:
    """Bytes -> ids (vocab 256), no BOS."""
    add_bos, bos_id, eos_id = False, None, 0

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


class Bigram:
    """logits[b, t] = table[ids[b, t]]; records the shapes it is called with."""

    def __init__(self, seed=0, scale=3.0):
        self.table = np.random.default_rng(seed).normal(size=(V, V)).astype(np.float32) * scale
        self.calls = []

    def __call__(self, ids):
        self.calls.append(ids.copy())
        return self.table[ids]

    def logprob(self, seq):
        """Oracle: sum of log P(seq[t] | seq[t-1]) from the table, no model call."""
        lsm = _log_softmax(self.table)
        return float(sum(lsm[a, b] for a, b in zip(seq[:-1], seq[1:])))


class Cumsum:
    """A model whose prediction depends on the whole prefix (and the position): any padding,
    truncation or window bug changes its scores."""

    def __call__(self, ids):
        c = np.cumsum(ids.astype(np.float64), axis=1)[..., None]
        pos = np.arange(ids.shape[1])[None, :, None]
        v = np.arange(V)[None, None, :]
        return (2.0 * np.sin(0.013 * v * (1 + c % 7) + 0.1 * pos)).astype(np.float32)


def direct_loglik(fn, ctx, cont):
    """Reference: one unpadded, unbatched forward over ctx + cont[:-1]."""
    seq = list(ctx) + list(cont)
    lg = fn(np.asarray([seq[:-1]], np.int32))[0]
    lsm = _log_softmax(lg)
    n = len(cont)
    return float(sum(lsm[len(seq) - 1 - n + i, cont[i]] for i in range(n)))


def uniform(ids):
    return np.zeros(ids.shape + (V,), np.float32)


# ---------------------------------------------------------------- tokenisation


def test_encode_pair_moves_trailing_space_and_splits_whole_string():
    tok = ByteTok()
    ctx, cont = S.encode_pair(tok, "Answer: ", "yes")
    assert ctx == list(b"Answer:") and cont == list(b" yes")


class MergeTok(ByteTok):
    """Merges "ab" into token 300 (greedy, left to right) and adds a BOS itself."""
    add_bos, bos_id, eos_id = True, 1, 2

    def encode(self, text):
        b, out, i = text.encode(), [1], 0
        while i < len(b):
            if b[i:i + 2] == b"ab":
                out.append(300)
                i += 2
            else:
                out.append(b[i])
                i += 1
        return out


def test_encode_pair_single_bos_and_whole_string_split():
    ctx, cont = S.encode_pair(MergeTok(), "xyz", " ab")
    assert ctx == [1] + list(b"xyz") and cont == [32, 300]
    # split at the context's token count: the merged token sits in the continuation
    ctx, cont = S.encode_pair(MergeTok(), "x", "abab")
    assert ctx == [1, ord("x")] and cont == [300, 300]


def test_empty_context_becomes_prefix_token():
    ctx, cont = S.encode_pair(ByteTok(), "", "hi")
    assert ctx == [0] and cont == list(b"hi")


# ---------------------------------------------------------------- log-likelihood


@pytest.mark.parametrize("batch_size,max_batch_tokens", [(1, None), (3, None), (8, 64)])
def test_loglikelihood_matches_unbatched_reference(batch_size, max_batch_tokens):
    rng = np.random.default_rng(1)
    fn = Cumsum()
    reqs = []
    for i in range(11):
        ctx = "".join(chr(97 + int(c)) for c in rng.integers(0, 26, size=int(rng.integers(1, 40))))
        for j in range(int(rng.integers(1, 4))):  # several continuations share a context
            reqs.append((ctx, " " + "xyz"[: j + 1] * int(rng.integers(1, 4))))
    got = S.loglikelihood(fn, ByteTok(), reqs, max_len=64, batch_size=batch_size,
                          max_batch_tokens=max_batch_tokens)
    for (c, x), (ll, _) in zip(reqs, got):
        ref = direct_loglik(fn, list(c.encode()), list(x.encode()))
        assert ll == pytest.approx(ref, rel=1e-5, abs=1e-4)


def test_left_truncation_to_max_len():
    fn = Cumsum()
    ctx, cont = list(range(40, 90)), [5, 6, 7]
    (ll, _), = S.loglikelihood_tokens(fn, [(ctx, cont)], max_len=16)
    kept = (ctx + cont)[-17:]
    assert ll == pytest.approx(direct_loglik(fn, kept[:-3], cont), rel=1e-5)
    assert ll != pytest.approx(direct_loglik(fn, ctx, cont), rel=1e-3)
    with pytest.raises(MarjaxError, match="exceeds max_len"):
        S.loglikelihood_tokens(fn, [(ctx, list(range(20)))], max_len=16)


def test_greedy_flag():
    # A bigram table whose argmax after byte b is b + 1.
    table = np.full((V, V), -5.0, np.float32)
    table[np.arange(V), (np.arange(V) + 1) % V] = 5.0
    fn = lambda ids: table[ids]  # noqa: E731
    res = S.loglikelihood_tokens(fn, [([10], [11, 12, 13]), ([10], [11, 12, 14])], max_len=32)
    assert res[0][1] is True and res[1][1] is False


def test_buckets_are_powers_of_two_and_contexts_batched_together():
    fn = Bigram()
    reqs = [("c%d" % i + "q" * (i * 7), " " + ch) for i in range(9) for ch in "abcd"]
    S.loglikelihood(fn, ByteTok(), reqs, max_len=128, batch_size=8)
    shapes = {c.shape for c in fn.calls}
    assert all(r & (r - 1) == 0 and r <= 8 and (l & (l - 1) == 0) and 16 <= l <= 128 for r, l in shapes)
    assert len(shapes) <= 5
    for call in fn.calls:  # each batch holds whole items: 4 continuations of 2 contexts
        rows = [bytes(r[r != 0]).split(b" ")[0] for r in call if r.any()]
        assert all(rows.count(c) == 4 for c in set(rows))


def test_logits_shape_is_checked():
    with pytest.raises(MarjaxError, match="logits_fn returned shape"):
        S.loglikelihood_tokens(lambda ids: np.zeros((1, 3, V), np.float32), [([1, 2], [3])], max_len=32)


# ---------------------------------------------------------------- multiple choice


class Oracle:
    """Puts (almost) all mass on the next byte of the first known string that the row's prefix
    starts; uniform elsewhere. It "knows" a chosen continuation of each context."""

    def __init__(self, texts):
        self.texts = [t.encode() for t in texts]

    def __call__(self, ids):
        out = np.zeros(ids.shape + (V,), np.float32)
        for b in range(ids.shape[0]):
            row = bytes(int(t) for t in ids[b])
            for t in range(ids.shape[1]):
                pre = row[:t + 1]
                for s in self.texts:
                    if s.startswith(pre) and len(s) > t + 1:
                        out[b, t, s[t + 1]] = 30.0
                        break
        return out


def test_oracle_model_gets_exact_accuracy():
    rng = np.random.default_rng(0)
    items, known = [], []
    for i in range(10):
        choices = tuple(f"choice {i}-{k} {'x' * int(rng.integers(0, 5))}" for k in range(4))
        gold = int(rng.integers(0, 4))
        items.append(MCItem((f"Question {i}?",) * 4, tuple(" " + c for c in choices), gold, choices))
        pick = gold if i < 7 else (gold + 1) % 4  # the model knows the answer to 7 of 10
        known.append(f"Question {i}? " + choices[pick])
    fn = Oracle(known)
    from marjax.eval.tasks import mc_requests
    res = S.loglikelihood(fn, ByteTok(), mc_requests(items), max_len=64, batch_size=4)
    out = E.score_multiple_choice(items, [r[0] for r in res])
    assert out["acc"] == pytest.approx(0.7) and out["acc_norm"] == pytest.approx(0.7)
    assert out["acc_stderr"] == pytest.approx(math.sqrt(0.7 * 0.3 / 9))
    assert out["n"] == 10 and out["predictions"][:7] == [it.gold for it in items[:7]]


def test_acc_norm_differs_from_acc_under_uniform_model():
    # Uniform model: loglik = -(1 + len(choice)) ln 256, so acc picks the shortest choice and
    # acc_norm (divide by len(choice)) the longest.
    items = [MCItem(("Q:",) * 2, (" a", " bbbbbbbb"), 1, ("a", "bbbbbbbb")),
             MCItem(("Q2:",) * 2, (" cccc", " dd"), 0, ("cccc", "dd"))]
    from marjax.eval.tasks import mc_requests
    res = S.loglikelihood(uniform, ByteTok(), mc_requests(items), max_len=32)
    assert [r[0] for r in res] == pytest.approx([-2 * math.log(V), -9 * math.log(V),
                                                 -5 * math.log(V), -3 * math.log(V)])
    out = E.score_multiple_choice(items, [r[0] for r in res])
    assert (out["acc"], out["acc_norm"]) == (0.0, 1.0)
    assert out["predictions"] == [0, 1]


def test_acc_norm_by_character_length():
    item = MCItem(("q",) * 2, (" a", " bbbbbbbb"), 1, ("a", "bbbbbbbb"))
    out = E.score_multiple_choice([item], [-2.0, -4.0])
    assert out["acc"] == 0.0 and out["acc_norm"] == 1.0  # -2/1 < -4/8


def test_sample_stderr():
    assert E.sample_stderr([1, 0, 1, 1]) == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    x = np.random.default_rng(0).normal(size=50)
    assert E.sample_stderr(x) == pytest.approx(np.std(x, ddof=1) / math.sqrt(50))
    assert E.sample_stderr([1.0]) is None


def test_lambada_scores():
    out = E.score_lambada([(-1.0, True), (-3.0, False)])
    assert out["acc"] == 0.5 and out["ppl"] == pytest.approx(math.exp(2.0))
    assert out["ppl_stderr"] == pytest.approx(math.exp(2.0) * 1.0)  # std(ddof=1)=sqrt(2), /sqrt(2)


# ---------------------------------------------------------------- perplexity


def test_rolling_windows_tile_each_target_once():
    for n, w, s in [(1, 4, 4), (2, 4, 4), (10, 4, 4), (10, 4, 1), (37, 8, 3), (8, 16, 5)]:
        wins = P.rolling_windows(n, w, s)
        scored = [j for st, e, k in wins for j in range(e - k + 1, e + 1)]
        assert scored == list(range(1, n))
        for st, e, k in wins:
            assert 0 <= st and e - st <= w
            for j in range(e - k + 1, e + 1):  # context of target j: seq[st:j]
                assert j - st >= min(j, w - s + 1)
    with pytest.raises(MarjaxError):
        P.rolling_windows(10, 4, 5)


def test_uniform_model_ppl_is_vocab_size():
    r = P.text_perplexity(uniform, ByteTok(), "hello world, a small text " * 5, window=16, stride=8)
    assert r["token_ppl"] == pytest.approx(V, rel=1e-6)
    assert r["bits_per_byte"] == pytest.approx(8.0, rel=1e-6)  # one byte a token
    assert r["n"] == r["n_bytes"] == 130


def test_sliding_window_equals_full_context_when_text_fits():
    fn = Cumsum()
    seq = [0] + list(b"The quick brown fox jumps over the lazy dog.")
    full = -direct_loglik(fn, seq[:1], seq[1:])
    for window, stride in [(64, None), (64, 7), (45, 45)]:
        nll, n = P.token_nll(fn, seq, window, stride, batch_size=3)
        assert n == len(seq) - 1 and nll == pytest.approx(full, rel=1e-5)


def test_sliding_window_bigram_any_window():
    fn = Bigram(seed=3)
    seq = list(np.random.default_rng(0).integers(0, V, size=300))
    ref = -fn.logprob(seq)
    for window, stride in [(16, None), (16, 5), (64, 64), (7, 1)]:
        nll, n = P.token_nll(fn, seq, window, stride, batch_size=4)
        assert n == 299 and nll == pytest.approx(ref, rel=1e-6)


def test_short_windows_see_only_their_window():
    fn = Cumsum()
    seq = list(range(1, 60))
    window, stride = 16, 4
    ref = 0.0
    for st, e, k in P.rolling_windows(len(seq), window, stride):  # unbatched reference per window
        lsm = _log_softmax(fn(np.asarray([seq[st:e]], np.int32))[0])
        ref -= sum(lsm[j - 1 - st, seq[j]] for j in range(e - k + 1, e + 1))
    nll, _ = P.token_nll(fn, seq, window, stride, batch_size=8)
    assert nll == pytest.approx(ref, rel=1e-5)


def test_ppl_file_errors(tmp_path):
    with pytest.raises(DataError, match="wikitext2_valid.txt"):
        P.default_ppl_file(str(tmp_path), None)
    with pytest.raises(DataError, match="nope.txt"):
        P.default_ppl_file(str(tmp_path), str(tmp_path / "nope.txt"))


# ---------------------------------------------------------------- CLI


def _fake_data(d):
    (d / "piqa").mkdir()
    (d / "piqa" / "valid.jsonl").write_text(
        "\n".join(json.dumps({"goal": f"g{i}", "sol1": "s" * (i + 1), "sol2": "t"}) for i in range(6)) + "\n")
    (d / "piqa" / "valid-labels.lst").write_text("0\n1\n0\n1\n1\n1\n")
    (d / "wikitext2_valid.txt").write_text(" = Title = \n some words here .\n" * 4)


def test_cli_end_to_end(tmp_path, monkeypatch, capsys):
    from marjax.eval import cli
    _fake_data(tmp_path)
    fake = SimpleNamespace(config=SimpleNamespace(max_seq_len=32), tokenizer=ByteTok())
    monkeypatch.setattr(cli, "load", lambda name: fake)
    monkeypatch.setattr(cli, "_model_fns", lambda m: (uniform, None))
    out = tmp_path / "res" / "r.json"
    rc = cli.main(["--model", "fake", "--tasks", "ppl,piqa", "--data-dir", str(tmp_path), "--limit", "5",
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| piqa | acc |" in table and "| ppl | token_ppl | 256.0000 |" in table
    res = json.loads(out.read_text())["results"]
    # uniform model: the shorter solution ("t" = sol2), except item 0 (a tie: sol1); labels 0 1 0 1 1
    assert res["piqa"]["n"] == 5 and res["piqa"]["acc"] == pytest.approx(4 / 5)
    assert res["ppl"]["token_ppl"] == pytest.approx(256.0, rel=1e-6)


def test_cli_errors(tmp_path):
    from marjax.eval import cli
    with pytest.raises(MarjaxError, match="known tasks: ppl, piqa"):
        cli.main(["--tasks", "piqa,mmlu", "--data-dir", str(tmp_path)])
    with pytest.raises(DataError, match=os.path.join(str(tmp_path), "hellaswag", "hellaswag_val_full.txt")):
        cli.main(["--tasks", "hellaswag", "--data-dir", str(tmp_path)])
    with pytest.raises(MarjaxError, match="--teacher"):
        cli.main(["--tasks", "gen", "--data-dir", str(tmp_path)])
    with pytest.raises(MarjaxError, match="--batch-size must be >= 1"):
        cli.main(["--tasks", "ppl", "--batch-size", "0"])
