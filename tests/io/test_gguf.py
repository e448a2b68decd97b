"""GGUF: write tiny Llamas the llama.cpp way, read them back, compare logits with the in-memory
params and with a numpy forward that reads the file with llama.cpp's conventions."""
import os

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from marjax.errors import CheckpointError, MarjaxError
from marjax.io.gguf import load_gguf, read_gguf, save_gguf
from marjax.io.tokenizer import ByteTokenizer
from marjax.models.lm import forward

IDS = np.array([[3, 17, 200, 5, 99, 42, 7, 128, 64, 1]], np.int32)


def _file_tensors(path):
    r = gguf.GGUFReader(path)
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in r.tensors}


@pytest.mark.parametrize("tied", [True, False])
def test_f32_round_trip_matches_memory_and_llamacpp_oracle(tmp_path, ref, tied):
    cfg, params = ref.tiny_llama(tied=tied)
    path = str(tmp_path / "tiny.gguf")
    save_gguf(path, cfg, params, ByteTokenizer(), qtype="F32")
    cfg2, params2, tok = load_gguf(path)
    assert cfg2.rope_layout == "pairs" and cfg2.tie_embeddings == tied
    assert (cfg2.d_model, cfg2.n_layers, cfg2.n_heads, cfg2.n_kv_heads, cfg2.d_ff, cfg2.vocab_size) == \
        (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab_size)
    assert (cfg2.rms_eps, cfg2.rope_theta) == (cfg.rms_eps, cfg.rope_theta)
    assert isinstance(tok, ByteTokenizer)
    want, _ = forward(params, jnp.asarray(IDS), cfg)
    got, _ = forward(params2, jnp.asarray(IDS), cfg2)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
    # the file itself, read with llama.cpp semantics (adjacent-pair RoPE on the stored q/k)
    W = _file_tensors(path)
    names = dict(ref.GGUF_NAMES, head=None if tied else "output.weight")
    oracle = ref.llama(W, IDS[0], n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv=cfg.n_kv_heads,
                       head_dim=cfg.head_dim, eps=cfg.rms_eps, theta=cfg.rope_theta, layout="pairs", names=names)
    np.testing.assert_allclose(np.asarray(got[0]), oracle, atol=5e-5, rtol=1e-4)
    assert ("output.weight" in W) == (not tied)


def test_dims_order_of_written_file(tmp_path, ref):
    """GGUF lists ne0 (input features) first; numpy data is (out, in)."""
    cfg, params = ref.tiny_llama()
    path = str(tmp_path / "t.gguf")
    save_gguf(path, cfg, params)
    _, tensors = read_gguf(path)
    t = tensors["blk.0.ffn_gate.weight"]
    assert list(t.shape) == [cfg.d_model, cfg.d_ff] and t.data.shape == (cfg.d_ff, cfg.d_model)
    assert list(tensors["token_embd.weight"].shape) == [cfg.d_model, cfg.vocab_size]
    np.testing.assert_array_equal(t.data, np.asarray(params.blocks.mlp.gate[0]).T)


@pytest.mark.parametrize("qtype,wtol,ltol", [("F16", 2e-3, 0.02), ("Q8_0", 1e-2, 0.15),
                                             ("Q4_0", 0.15, 2.0), ("Q4_1", 0.1, 2.0)])
def test_quantized(tmp_path, ref, qtype, wtol, ltol):
    cfg, params = ref.tiny_llama(tied=False)
    path = str(tmp_path / f"t_{qtype}.gguf")
    save_gguf(path, cfg, params, qtype=qtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_down.weight"] == qtype and types["blk.0.attn_norm.weight"] == "F32"
    cfg2, params2, _ = load_gguf(path)
    for name, a, b in [("down", params.blocks.mlp.down, params2.blocks.mlp.down),
                       ("embed", params.embed, params2.embed), ("wv", params.blocks.mixer.wv, params2.blocks.mixer.wv)]:
        a, b = np.asarray(a), np.asarray(b)
        err = np.abs(a - b).max() / np.abs(a).max()
        assert 0 < err < wtol, (name, err)   # quantised (not bit-exact) yet close
    want, _ = forward(params, jnp.asarray(IDS), cfg)
    got, _ = forward(params2, jnp.asarray(IDS), cfg2)
    assert float(jnp.abs(got - want).max()) < ltol
    if qtype in ("F16", "Q8_0"):
        assert np.array_equal(np.argmax(got, -1), np.argmax(want, -1))


def test_bad_qtype_and_ssm(tmp_path, ref):
    cfg, params = ref.tiny_llama()
    with pytest.raises(MarjaxError, match="qtype must be one of"):
        save_gguf(str(tmp_path / "x.gguf"), cfg, params, qtype="Q3_K")
    scfg, sparams = ref.tiny_ssm()
    with pytest.raises(MarjaxError, match="mixer='ssm'"):
        save_gguf(str(tmp_path / "y.gguf"), scfg, sparams)


# --------------------------------------------------------------------------- errors
def _write_raw(path, meta, tensors):
    w = gguf.GGUFWriter(path, "llama")
    for k, v in meta.items():
        if isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, v)
    for name, a in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(a, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _raw_model(d=32, f=64, v=40, heads=2, kv=1, layers=1):
    hd = d // heads
    rng = np.random.default_rng(0)
    meta = {"llama.block_count": layers, "llama.embedding_length": d, "llama.feed_forward_length": f,
            "llama.attention.head_count": heads, "llama.attention.head_count_kv": kv,
            "llama.context_length": 64, "llama.rope.freq_base": 10000.0,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": v}
    t = {"token_embd.weight": rng.standard_normal((v, d)), "output_norm.weight": np.ones(d)}
    for i in range(layers):
        t.update({f"blk.{i}.attn_norm.weight": np.ones(d), f"blk.{i}.ffn_norm.weight": np.ones(d),
                  f"blk.{i}.attn_q.weight": rng.standard_normal((heads * hd, d)),
                  f"blk.{i}.attn_k.weight": rng.standard_normal((kv * hd, d)),
                  f"blk.{i}.attn_v.weight": rng.standard_normal((kv * hd, d)),
                  f"blk.{i}.attn_output.weight": rng.standard_normal((d, heads * hd)),
                  f"blk.{i}.ffn_gate.weight": rng.standard_normal((f, d)),
                  f"blk.{i}.ffn_up.weight": rng.standard_normal((f, d)),
                  f"blk.{i}.ffn_down.weight": rng.standard_normal((d, f))})
    return meta, t


def test_raw_file_loads_without_tokenizer(tmp_path):
    meta, t = _raw_model()
    p = str(tmp_path / "raw.gguf")
    _write_raw(p, meta, t)
    cfg, params, tok = load_gguf(p)
    assert tok is None and cfg.vocab_size == 40 and cfg.tie_embeddings and cfg.n_kv_heads == 1
    np.testing.assert_allclose(np.asarray(params.blocks.mlp.down[0]), t["blk.0.ffn_down.weight"].T, rtol=1e-6)


def test_missing_tensor_is_named(tmp_path):
    meta, t = _raw_model(layers=2)
    del t["blk.1.ffn_up.weight"], t["output_norm.weight"]
    p = str(tmp_path / "m.gguf")
    _write_raw(p, meta, t)
    with pytest.raises(CheckpointError) as e:
        load_gguf(p)
    assert "blk.1.ffn_up.weight" in str(e.value) and "output_norm.weight" in str(e.value) and p in str(e.value)


def test_shape_mismatch_is_named(tmp_path):
    meta, t = _raw_model()
    meta["llama.feed_forward_length"] = 48   # tensors are 64 wide
    p = str(tmp_path / "s.gguf")
    _write_raw(p, meta, t)
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_(gate|up|down)\.weight has shape .*expected"):
        load_gguf(p)


def test_missing_metadata(tmp_path):
    meta, t = _raw_model()
    del meta["llama.embedding_length"]
    p = str(tmp_path / "n.gguf")
    _write_raw(p, meta, t)
    with pytest.raises(CheckpointError, match="llama.embedding_length"):
        load_gguf(p)


def test_not_gguf_and_truncated(tmp_path, ref):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04" + os.urandom(100))
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_gguf(str(bad))
    with pytest.raises(CheckpointError, match="no such file"):
        load_gguf(str(tmp_path / "absent.gguf"))
    cfg, params = ref.tiny_llama()
    good = tmp_path / "good.gguf"
    save_gguf(str(good), cfg, params)
    data = good.read_bytes()
    for cut in (len(data) // 2, 40):   # inside tensor data; inside the header
        short = tmp_path / f"short{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as e:
            load_gguf(str(short))
        assert str(short) in str(e.value) and ("truncated" in str(e.value) or "corrupt" in str(e.value))


# --------------------------------------------------------------------------- the real model
def test_smollm2_config_and_greedy_answer(smollm2):
    cfg, params, tok = smollm2
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff) == \
        (49152, 576, 30, 9, 3, 64, 1536)
    assert cfg.rope_theta == 100000.0 and cfg.rms_eps == 1e-5 and cfg.tie_embeddings and cfg.rope_layout == "pairs"
    assert params.lm_head is None and params.blocks.mixer.wk.shape == (30, 576, 192)
    ids = tok.encode("The capital of France is")
    logits, _ = forward(params, jnp.asarray([ids]), cfg)
    top = int(jnp.argmax(logits[0, -1]))
    assert tok.decode([top]) == " Paris"   # a wrong q/k layout or transpose gives noise here
