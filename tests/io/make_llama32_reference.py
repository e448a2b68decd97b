"""Make the Llama-3.2-shaped parity data in tests/data/llama32_tiny/ (run once, offline; the
fast test tests/io/test_llama32_parity.py then checks marjax against it without torch).

    python3 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch==2.13.0 transformers==5.23
    /tmp/hfvenv/bin/python tests/io/make_llama32_reference.py      # from the repository root

One tiny random checkpoint shaped like Llama-3.2 (tied embeddings, GQA 4 query / 2 kv heads,
bf16 weights in the hub's tensor names) and three config.json variants in the hub's spelling:
  config.json               rope_scaling {"rope_type": "llama3", ...} with Llama-3.2-1B's values
  config_llama3_short.json  llama3 with original_max_position_embeddings 256 (all three bands of
                            the ramp are crossed well before position 1000)
  config_linear.json        the older {"type": "linear", "factor": 4.0} spelling
For each, transformers' LlamaForCausalLM (float32, eager attention) gives logits on fixed ids
of length 1100; reference_<variant>.npz keeps ids and the logits at positions 0..3 and
1000..1099 (where the scaling matters).
"""
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "llama32_tiny")
SEQ = 1100
KEEP = np.r_[0:4, 1000:SEQ]
V, D, L, H, KV, HD, F = 128, 64, 2, 4, 2, 16, 96

BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": D,
        "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KV,
        "head_dim": HD, "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
VARIANTS = {
    "llama3": BASE,
    "llama3_short": {**BASE, "rope_theta": 10000.0, "max_position_embeddings": 2048,
                     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 256}},
    "linear": {**BASE, "rope_theta": 10000.0, "max_position_embeddings": 4096,
               "rope_scaling": {"type": "linear", "factor": 4.0}},
}


def weights(seed=0):
    """Random weights, larger than an init so attention is peaked and RoPE errors show in logits."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=0.1: (torch.randn(*s, generator=g) * std)  # noqa: E731
    t = {"model.embed_tokens.weight": r(V, D, std=0.5), "model.norm.weight": 1 + r(D)}
    for i in range(L):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": 1 + r(D), p + "post_attention_layernorm.weight": 1 + r(D),
                  p + "self_attn.q_proj.weight": r(H * HD, D, std=0.12), p + "self_attn.k_proj.weight": r(KV * HD, D, std=0.12),
                  p + "self_attn.v_proj.weight": r(KV * HD, D, std=0.3), p + "self_attn.o_proj.weight": r(D, H * HD, std=0.3),
                  p + "mlp.gate_proj.weight": r(F, D, std=0.2), p + "mlp.up_proj.weight": r(F, D, std=0.2),
                  p + "mlp.down_proj.weight": r(D, F, std=0.2)})
    return {k: v.to(torch.bfloat16).contiguous() for k, v in t.items()}


def main():
    os.makedirs(OUT, exist_ok=True)
    w = weights()
    save_file(w, os.path.join(OUT, "model.safetensors"), metadata={"format": "pt"})
    ids = np.random.default_rng(0).integers(0, V, SEQ).astype(np.int64)
    for name, conf in VARIANTS.items():
        fn = "config.json" if name == "llama3" else f"config_{name}.json"
        with open(os.path.join(OUT, fn), "w") as f:
            json.dump(conf, f, indent=2)
        with tempfile.TemporaryDirectory() as d:
            shutil.copy(os.path.join(OUT, "model.safetensors"), d)
            shutil.copy(os.path.join(OUT, fn), os.path.join(d, "config.json"))
            model = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
            with torch.no_grad():
                logits = model(torch.from_numpy(ids)[None]).logits[0].float().numpy()
        print(name, model.model.rotary_emb.inv_freq.tolist()[-4:], file=sys.stderr)
        np.savez(os.path.join(OUT, f"reference_{name}.npz"), ids=ids.astype(np.int32), positions=KEEP,
                 logits=logits[KEEP].astype(np.float32))
        print(f"{name}: logits {logits.shape}, |logits| max {np.abs(logits).max():.2f}", file=sys.stderr)


if __name__ == "__main__":
    main()
