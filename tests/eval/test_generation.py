"""Generation metrics on constructed sequences and generation_eval with fake student/teacher."""
import math

import numpy as np
import pytest

from marjax.errors import MarjaxError
from marjax.eval import generation as G

V = 256


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_distinct_n():
    seqs = [[1, 2, 3, 1, 2]]
    assert G.distinct_n(seqs, 1) == pytest.approx(3 / 5)
    assert G.distinct_n(seqs, 2) == pytest.approx(3 / 4)  # (1,2) twice
    assert G.distinct_n(seqs, 3) == pytest.approx(1.0)
    # pooled over sequences: n-grams never cross a sequence boundary
    assert G.distinct_n([[1, 2], [1, 2], [3]], 1) == pytest.approx(3 / 5)
    assert G.distinct_n([[1, 2], [2, 1]], 2) == pytest.approx(1.0)
    assert G.distinct_n([[1]], 2) is None


def test_repetition_rate():
    assert G.repetition_rate([[1, 2, 1, 2, 1, 2]], n=2) == pytest.approx(3 / 5)
    assert G.repetition_rate([[1, 2, 3, 4, 5]], n=2) == 0.0
    assert G.repetition_rate([[7] * 10], n=4) == pytest.approx(6 / 7)
    # repeats are counted within a sequence, not across
    assert G.repetition_rate([[1, 2, 3, 4], [1, 2, 3, 4]], n=4) == 0.0
    assert G.repetition_rate([[1, 2]], n=4) is None


def test_prefix_agreement():
    assert G.prefix_agreement([1, 2, 3, 4], [1, 2, 9, 4], k=4) == {
        "prefix_match_len": 2, "prefix_match_frac": 0.5, "token_agreement": 0.75}
    assert G.prefix_agreement([1, 2, 3, 4], [1, 2, 9, 4], k=2)["prefix_match_frac"] == 1.0
    assert G.prefix_agreement([5, 6], [5, 6], k=8) == {  # both stopped early, identically
        "prefix_match_len": 2, "prefix_match_frac": 1.0, "token_agreement": 1.0}
    short = G.prefix_agreement([5], [5, 6, 7, 8], k=4)  # the student stopped early
    assert short["prefix_match_len"] == 1 and short["prefix_match_frac"] == 0.25
    with pytest.raises(MarjaxError):
        G.prefix_agreement([1], [1], k=0)


class BigramLM:
    """A bigram teacher: logits and greedy/sampled generation from one table."""

    def __init__(self, seed):
        self.table = np.random.default_rng(seed).normal(size=(V, V)).astype(np.float32) * 4

    def logits(self, ids):
        return self.table[ids]

    def generate(self, prompt, n, temperature, top_p, seed):
        rng, out, last = np.random.default_rng(seed), [], prompt[-1]
        for _ in range(n):
            if temperature == 0:
                last = int(np.argmax(self.table[last]))
            else:
                p = np.exp(_log_softmax(self.table[last] / temperature))
                last = int(rng.choice(V, p=p / p.sum()))
            out.append(last)
        return out

    def logprob(self, prompt, cont):
        lsm = _log_softmax(self.table)
        seq = list(prompt) + list(cont)
        return sum(lsm[seq[i - 1], seq[i]] for i in range(len(prompt), len(seq)))


def test_generation_eval_student_equals_teacher():
    t = BigramLM(0)
    prompts = [[10, 20], [30], [40, 50, 60]]
    r = G.generation_eval(prompts, t.generate, t.generate, t.logits, max_len=64, max_new_tokens=6,
                          samples_per_prompt=2, temperature=1.0, top_p=1.0, seed=3)
    assert r["agreement"]["prefix_match_frac"] == 1.0 and r["agreement"]["prefix_match_len"] == 6
    greedy = [t.generate(p, 6, 0.0, 1.0, 0) for p in prompts]
    ref = sum(t.logprob(p, c) for p, c in zip(prompts, greedy)) / 18
    assert r["greedy"]["teacher_logprob"] == pytest.approx(ref, rel=1e-5)
    assert r["greedy"]["teacher_ppl"] == pytest.approx(math.exp(-ref), rel=1e-5)
    assert r["greedy"]["distinct_1"] == pytest.approx(G.distinct_n(greedy, 1))
    assert r["sampled"]["n"] == 6 and r["sampled"]["mean_len"] == 6.0
    assert r["greedy"]["teacher_logprob"] > r["sampled"]["teacher_logprob"]  # greedy is the likelier path


def test_generation_eval_constructed_student():
    t = BigramLM(1)
    loop = lambda p, n, temp, tp, s: [7, 8] * (n // 2)  # noqa: E731  a degenerate student
    prompts = [[1, 2], [3, 4]]
    r = G.generation_eval(prompts, loop, t.generate, t.logits, max_len=32, max_new_tokens=8, k=4,
                          samples_per_prompt=1, decode=lambda ids: ",".join(map(str, ids)))
    assert r["greedy"]["distinct_1"] == pytest.approx(2 / 16)
    assert r["greedy"]["distinct_2"] == pytest.approx(2 / 14)
    assert r["greedy"]["repetition_rate"] == pytest.approx((5 - 2) / 5)  # 4-grams: 2 distinct of 5
    ref = sum(t.logprob(p, [7, 8] * 4) for p in prompts) / 16
    assert r["greedy"]["teacher_logprob"] == pytest.approx(ref, rel=1e-5)
    tg = [t.generate(p, 8, 0.0, 1.0, 0) for p in prompts]
    want = np.mean([G.prefix_agreement([7, 8] * 4, g, 4)["token_agreement"] for g in tg])
    assert r["agreement"]["token_agreement"] == pytest.approx(want) and r["agreement"]["k"] == 4
    assert r["examples"][0]["student_greedy"] == "7,8,7,8,7,8,7,8" and len(r["examples"]) == 2


def test_generation_eval_truncates_long_prompts_and_validates():
    t = BigramLM(2)
    seen = []

    def gen(p, n, *a):
        seen.append(len(p))
        return t.generate(p, n, *a)

    G.generation_eval([list(range(100))], gen, gen, t.logits, max_len=16, max_new_tokens=4,
                      samples_per_prompt=0)
    assert seen == [12, 12]
    with pytest.raises(MarjaxError, match="max_new_tokens"):
        G.generation_eval([[1]], gen, gen, t.logits, max_len=16, max_new_tokens=16)
    with pytest.raises(MarjaxError, match="at least one prompt"):
        G.generation_eval([], gen, gen, t.logits, max_len=16)


def test_teacher_logprobs_skip_empty():
    t = BigramLM(3)
    out = G.teacher_logprobs(t.logits, [[1], [2]], [[], [5, 6]], max_len=16)
    assert out[0] == (0.0, 0) and out[1][1] == 2
    assert out[1][0] == pytest.approx(t.logprob([2], [5, 6]), rel=1e-5)
