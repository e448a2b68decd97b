"""Offline distillation through a teacher top-k cache: the files `cache_teacher_topk` writes, the
`TeacherCache` iterator (shapes, looping, checkpoint state, errors), `make_data` picking it up,
the offline branch of the kd/sbds losses against kd_from_topk and against a dense numpy oracle of
the reconstructed teacher, a full-vocabulary cache against the online loss, and the CLI path."""
import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import marjax
from marjax.cli import main
from marjax.config import ATMNConfig, DistillConfig
from marjax.distill import losses
from marjax.distill.init import init_from_attention
from marjax.app.runner import load_run_config, make_data
from marjax.distill.stages import make_loss
from marjax.app.cache import cache_teacher_topk
from marjax.distill.teacher_cache import TeacherCache, is_teacher_cache
from marjax.errors import DataError
from marjax.models.lm import forward, head_matrix
from marjax.models.spiking import make_spiking_student

K, N_BATCHES, SEQ, MB = 8, 3, 32, 2
OVERRIDES = ["run.teacher=tiny", f"train.seq_len={SEQ}", f"train.micro_batch={MB}", "train.steps=3",
             f"train.batch_tokens={SEQ * MB}", "run.data="]


@pytest.fixture(scope="module")
def teacher():
    with warnings.catch_warnings():        # "tiny" is a preset: random weights, said in a warning
        warnings.simplefilter("ignore", UserWarning)
        return marjax.load("tiny")


@pytest.fixture(scope="module")
def rc():
    return load_run_config(None, OVERRIDES)


@pytest.fixture(scope="module")
def cache_dir(teacher, rc, tmp_path_factory):
    d = tmp_path_factory.mktemp("tcache")
    assert cache_teacher_topk(teacher, rc, str(d), k=K, n_batches=N_BATCHES) == d
    return d


def _with_data(rc, data):
    return dataclasses.replace(rc, run=dataclasses.replace(rc.run, data=str(data)))


def test_cache_files_and_contents(teacher, rc, cache_dir):
    assert sorted(p.name for p in cache_dir.iterdir()) == ["batch_000000.npz", "batch_000001.npz",
                                                           "batch_000002.npz", "index.json"]
    idx = json.loads((cache_dir / "index.json").read_text())
    assert idx == {"k": K, "seq_len": SEQ, "batch": MB, "n_batches": N_BATCHES,
                   "vocab_size": teacher.config.vocab_size, "teacher": "tiny"}
    with np.load(cache_dir / "batch_000000.npz") as z:     # on disk: float16 log-probs, int32 ids
        assert z["topk_logprobs"].dtype == np.float16 and z["topk_ids"].dtype == np.int32
    fresh = iter(make_data(rc, teacher.tokenizer, teacher.config))   # the batches the cache was built from
    cache = TeacherCache(str(cache_dir))
    for _ in range(N_BATCHES):
        b, want = next(cache), next(fresh)
        assert set(b) == {"inputs", "targets", "mask", "topk_logprobs", "topk_ids"}
        for key in ("inputs", "targets", "mask"):
            assert b[key].shape == (MB, SEQ)
            np.testing.assert_array_equal(b[key], want[key])
        assert b["inputs"].dtype == np.int32 and b["mask"].dtype == np.float32
        assert b["topk_logprobs"].shape == b["topk_ids"].shape == (MB, SEQ, K)
        assert b["topk_logprobs"].dtype == np.float32 and b["topk_ids"].dtype == np.int32
        # the oracle: the teacher's full log-softmax on the cached inputs, through the public API
        logp = jax.nn.log_softmax(marjax.logits(teacher, b["inputs"]), -1)
        v, _ = jax.lax.top_k(logp, K)
        np.testing.assert_allclose(b["topk_logprobs"], v, rtol=1e-3, atol=1e-3)
        at_ids = np.take_along_axis(np.asarray(logp), b["topk_ids"], -1)
        np.testing.assert_allclose(b["topk_logprobs"], at_ids, rtol=1e-3, atol=1e-3)
        srt = np.sort(b["topk_ids"], -1)
        assert (np.diff(srt, axis=-1) > 0).all()                   # k distinct tokens per position
        assert (np.diff(b["topk_logprobs"], axis=-1) <= 0).all()   # best first


def test_iteration_loops_and_state_round_trips(cache_dir):
    ref = [next(TeacherCache(str(cache_dir), loop=False)) for _ in range(1)]
    it = TeacherCache(str(cache_dir))
    seen = [next(it) for _ in range(N_BATCHES + 2)]
    np.testing.assert_array_equal(seen[0]["inputs"], ref[0]["inputs"])
    for i in range(2):                                   # wraps around after n_batches
        np.testing.assert_array_equal(seen[N_BATCHES + i]["topk_ids"], seen[i]["topk_ids"])
    assert not np.array_equal(seen[0]["inputs"], seen[1]["inputs"])

    it = TeacherCache(str(cache_dir))
    next(it), next(it)
    state = it.get_state()
    assert json.loads(json.dumps(state)) == state == {"pos": 2}
    after = next(it)
    other = TeacherCache(str(cache_dir))
    other.set_state(state)
    np.testing.assert_array_equal(next(other)["topk_logprobs"], after["topk_logprobs"])

    finite = TeacherCache(str(cache_dir), loop=False)
    assert len(list(finite)) == N_BATCHES


def test_detection_make_data_and_errors(teacher, rc, cache_dir, tmp_path):
    assert is_teacher_cache(str(cache_dir))
    assert not is_teacher_cache("")
    assert not is_teacher_cache(str(tmp_path))                    # a directory without index.json
    assert not is_teacher_cache(str(tmp_path / "missing"))
    (tmp_path / "corpus.txt").write_text("hello")
    assert not is_teacher_cache(str(tmp_path / "corpus.txt"))

    it = make_data(_with_data(rc, cache_dir), None, teacher.config)   # no tokenizer needed offline
    assert isinstance(it, TeacherCache)
    np.testing.assert_array_equal(next(it)["topk_ids"], next(TeacherCache(str(cache_dir)))["topk_ids"])

    with pytest.raises(DataError, match="index.json"):
        TeacherCache(str(tmp_path))
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in cache_dir.iterdir():
        if f.name != "batch_000001.npz":
            (broken / f.name).write_bytes(f.read_bytes())
    it = TeacherCache(str(broken))
    next(it)
    with pytest.raises(DataError, match="batch_000001.npz"):
        next(it)


def _dense_oracle(b, logits_s, alpha, beta):
    """Loss sum with the 'uniform' reconstructed teacher written out over the whole vocabulary:
    p^ = cached top-k probabilities, the residual mass spread over the other V - k tokens."""
    lp_k = b["topk_logprobs"].astype(np.float64)
    V = logits_s.shape[-1]
    resid = np.maximum(1.0 - np.exp(lp_k).sum(-1), 1e-6)
    p = np.broadcast_to((resid / (V - K))[..., None], logits_s.shape).copy()
    np.put_along_axis(p, b["topk_ids"], np.exp(lp_k), -1)
    p /= p.sum(-1, keepdims=True)
    z = np.asarray(logits_s, np.float64)
    lq = z - z.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    q = np.exp(lq)
    fkl = (p * (np.log(p) - lq)).sum(-1)
    rkl = (q * (lq - np.log(p))).sum(-1)
    m = b["mask"]
    return alpha * (m * fkl).sum() + beta * (m * rkl).sum(), m.sum()


@pytest.fixture(scope="module")
def students(teacher):
    scfg, sp = init_from_attention(teacher.params, teacher.config)
    kcfg, kp = make_spiking_student(sp, scfg, ATMNConfig(init="constant", init_value=-1.0))
    return {"kd": (scfg, sp), "sbds": (kcfg, kp)}


@pytest.mark.parametrize("stage", ["kd", "sbds"])
def test_offline_loss_equals_kd_from_topk_and_dense_oracle(teacher, cache_dir, students, stage):
    scfg, sp = students[stage]
    dcfg = DistillConfig(kl_chunk=8, feature="none")     # 4 sequence chunks; a cache holds no feature taps
    alpha, beta = (1.0, 0.0) if stage == "kd" else (dcfg.alpha, dcfg.beta)
    loss_fn = jax.jit(make_loss(stage, teacher.config, scfg, dcfg))
    b = next(TeacherCache(str(cache_dir)))
    b["mask"] = b["mask"] * (np.arange(SEQ) < SEQ - 5)   # masked tail tokens must not count
    s, n, metrics = loss_fn(sp, None, b, jax.random.PRNGKey(0))   # offline: the teacher is not needed
    assert bool(jnp.isfinite(s)) and float(n) == MB * (SEQ - 5) and float(s) > 0
    assert set(metrics) >= {"fkl", "rkl", "kl"}

    _, aux = forward(sp, jnp.asarray(b["inputs"]), scfg, taps=("hidden",), head=False)
    s_ref, n_ref, _ = losses.kd_from_topk(jnp.asarray(b["topk_logprobs"]), jnp.asarray(b["topk_ids"]), aux["hidden"],
                                          head_matrix(sp), jnp.asarray(b["mask"]), alpha=alpha, beta=beta,
                                          temperature=dcfg.temperature, chunk=dcfg.kl_chunk)
    np.testing.assert_allclose(s, s_ref, rtol=1e-5)
    assert float(n) == float(n_ref)

    logits_s, _ = forward(sp, jnp.asarray(b["inputs"]), scfg)
    s_or, n_or = _dense_oracle(b, logits_s, alpha, beta)
    np.testing.assert_allclose(float(s), s_or, rtol=1e-4)
    assert float(n) == n_or


def test_full_vocab_cache_matches_online_kd(teacher, rc, students, tmp_path):
    """k = V: the offline loss is the online (teacher in memory) loss up to float16 storage."""
    V = teacher.config.vocab_size
    cache_teacher_topk(teacher, rc, str(tmp_path), k=V, n_batches=1)
    b = next(TeacherCache(str(tmp_path)))
    scfg, sp = students["kd"]
    loss_fn = jax.jit(make_loss("kd", teacher.config, scfg, DistillConfig(kl_chunk=16)))
    s_off, n_off, _ = loss_fn(sp, None, b, jax.random.PRNGKey(0))
    online = {k: b[k] for k in ("inputs", "targets", "mask")}
    s_on, n_on, _ = loss_fn(sp, teacher.params, online, jax.random.PRNGKey(0))
    assert float(n_off) == float(n_on) == MB * SEQ
    np.testing.assert_allclose(float(s_off), float(s_on), rtol=2e-3)


def test_offline_loss_keeps_ce_term(teacher, cache_dir, students):
    scfg, sp = students["kd"]
    dcfg = DistillConfig(ce_weight=0.5, kl_chunk=16)
    b = next(TeacherCache(str(cache_dir)))
    s, _, metrics = make_loss("kd", teacher.config, scfg, dcfg)(sp, None, b, jax.random.PRNGKey(0))
    _, aux = forward(sp, jnp.asarray(b["inputs"]), scfg, taps=("hidden",), head=False)
    s_ref, _, _ = losses.kd_from_topk(jnp.asarray(b["topk_logprobs"]), jnp.asarray(b["topk_ids"]), aux["hidden"],
                                      head_matrix(sp), jnp.asarray(b["mask"]), alpha=1.0, beta=0.0,
                                      chunk=16, ce_targets=jnp.asarray(b["targets"]), ce_weight=0.5)
    assert "ce" in metrics
    np.testing.assert_allclose(s, s_ref, rtol=1e-5)


def test_cli_cache_teacher(tmp_path):
    out = tmp_path / "cli_cache"
    argv = ["distill", "--stage", "kd", "--cache-teacher", str(out), "run.teacher=tiny", f"train.seq_len={SEQ}",
            f"train.micro_batch={MB}", "train.steps=2", f"train.batch_tokens={SEQ * MB}"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert main(argv) == 0
    idx = json.loads((out / "index.json").read_text())
    assert idx["n_batches"] == 2 and idx["k"] == 64 and idx["seq_len"] == SEQ and idx["batch"] == MB
    assert sorted(p.name for p in out.glob("*.npz")) == ["batch_000000.npz", "batch_000001.npz"]
    b = next(TeacherCache(str(out)))
    assert b["topk_ids"].shape == (MB, SEQ, 64)


def test_cache_must_fit_the_run(teacher, rc, cache_dir):
    import dataclasses
    from marjax.app.runner import make_data
    from marjax.errors import DataError
    bad = _with_data(dataclasses.replace(rc, train=dataclasses.replace(rc.train, seq_len=rc.train.seq_len * 2)),
                     str(cache_dir))
    with pytest.raises(DataError, match="does not fit"):
        make_data(bad, None, teacher.config)


def test_cache_holds_every_micro_batch_of_an_accumulating_run(teacher, rc, tmp_path):
    """steps x accum_steps micro-batches, in the order the run consumes them (nothing repeats)."""
    acc = dataclasses.replace(rc, train=dataclasses.replace(rc.train, steps=2, batch_tokens=2 * SEQ * MB))
    cache_teacher_topk(teacher, acc, str(tmp_path), k=K)
    assert json.loads((tmp_path / "index.json").read_text())["n_batches"] == 4
    fresh, cache = iter(make_data(acc, teacher.tokenizer, teacher.config)), TeacherCache(str(tmp_path), loop=False)
    for b in cache:
        np.testing.assert_array_equal(b["inputs"], next(fresh)["inputs"])


def test_sbds_with_features_from_a_cache_is_refused(teacher, rc, cache_dir, students):
    from marjax.app.runner import run_stage
    from marjax.errors import ConfigError
    scfg, sp = students["sbds"]
    bad = _with_data(rc, cache_dir)
    with pytest.raises(ConfigError, match="feature"):
        run_stage("sbds", teacher, scfg, sp, bad, str(cache_dir / "never"))
    b = next(TeacherCache(str(cache_dir)))   # the loss itself refuses too (never a silent drop)
    with pytest.raises(ConfigError, match="feature"):
        make_loss("sbds", teacher.config, scfg, DistillConfig())(sp, None, b, jax.random.PRNGKey(0))
