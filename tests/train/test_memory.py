"""The upfront memory estimate: an out-of-memory configuration is refused before compiling."""
import dataclasses

import pytest

from marjax.config import TrainConfig, preset
from marjax.distill.init import student_config
from marjax.errors import ConfigError
from marjax.train.memory import check_fits, estimate_stage_bytes, param_count


def test_param_count_matches_dims():
    cfg = preset("tiny")
    d, f, v, L = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layers
    attn = d * cfg.n_heads * cfg.head_dim * 2 + d * cfg.n_kv_heads * cfg.head_dim * 2
    assert param_count(cfg) == v * d + d + L * (2 * d + attn + 3 * d * f)


def test_estimate_grows_with_batch_and_refuses_oom():
    t = preset("smollm2-135m")
    s = student_config(t)
    small = TrainConfig(seq_len=64, micro_batch=4, batch_tokens=256)
    huge = dataclasses.replace(small, micro_batch=4096, batch_tokens=4096 * 64)
    e1 = estimate_stage_bytes(s, t, small, "kd")
    e2 = estimate_stage_bytes(s, t, huge, "kd")
    assert e2["total"] > 100 * e1["activations"]
    assert e1["student params + grads + adam"] == 16 * param_count(s)
    check_fits(s, t, small, "kd", available=64 * 2**30)
    with pytest.raises(ConfigError, match="micro_batch"):
        check_fits(s, t, huge, "kd", available=24 * 2**30)


def test_stage_refuses_before_training(tmp_path):
    import marjax
    from marjax.app.runner import RunConfig, run_stage
    m = marjax.load("tiny")
    rc = RunConfig()
    rc = dataclasses.replace(rc, train=dataclasses.replace(rc.train, micro_batch=2**22, seq_len=512,
                                                           batch_tokens=2**22 * 512))
    with pytest.raises(ConfigError, match="GiB"):
        run_stage("pretrain", None, m.config, m.params, rc, str(tmp_path), tokenizer=m.tokenizer)
