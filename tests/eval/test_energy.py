"""Analytic energy model: op counts hand-computed from the preset dims."""
import dataclasses
import json

import numpy as np
import pytest

from marjax.config import ATMNConfig, preset
from marjax.eval import energy as energy_mod
from marjax.errors import ConfigError, MarjaxError
from marjax.eval.energy import (EnergyConfig, compare_reports, energy_report, format_table, main, related_configs,
                                uniform_rates, write_report)

E = EnergyConfig()


def pj(mac=0, mul=0, add=0, ac=0):
    return 4.6 * mac + 3.7 * mul + 0.9 * (add + ac)


# tiny: vocab 256, d 64, 2 layers, 4 q heads, 2 kv heads, head dim 16, d_ff 128.
# tiny-ssm: H 4, P 16, N 16, K 4 -> d_inner 64, conv_dim 192, in_proj width 2*64 + 2*64 + 4 = 260.
def test_tiny_dense_ssm_by_hand():
    r = energy_report(preset("tiny-ssm"), seq_len=100)
    assert r["kind"] == "dense_ssm"
    # per layer: in_proj 64*260, conv 192*4, SSD 2*H*P*N + D skip 64, out_proj 64*64, MLP 3*64*128,
    # two norms 2*64; plus final norm 64 and LM head 64*256.
    mac = 2 * (64 * 260 + 192 * 4 + (2 * 4 * 16 * 16 + 64) + 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64 + 64 * 256
    # muls per layer: decay H*P*N + softplus/exp 2H; gate 2*64 + sigmoid 64; norms 2*(2*64 + 1 + rsqrt 1);
    # MLP act 2*128 + sigmoid 128. Final norm 2*64 + 2.
    mul = 2 * ((1024 + 8) + (128 + 64) + 2 * 130 + (256 + 128)) + 130
    # adds per layer: conv bias 192; a_log bias 4 + softplus/exp 8; gate bias 64 + sigmoid 64; norms 2*2;
    # residuals 2*64; MLP sigmoid 128. Final norm 2.
    add = 2 * (192 + 12 + 128 + 4 + 128 + 128) + 2
    t = r["totals"]
    assert (t["mac"], t["mul"], t["add"], t["ac"]) == (mac, mul, add, 0)
    assert t["energy_pj_per_token"] == pytest.approx(pj(mac, mul, add))
    assert r["per_site"]["in_proj"]["mac"] == 2 * 64 * (2 * 64 + 2 * 4 * 16 + 4)
    assert r["mac_only"]["energy_pj_per_token"] == pytest.approx(4.6 * (mac + mul + add))
    assert len(r["per_layer"]) == 2
    assert sum(l["energy_pj"] for l in r["per_layer"]) == pytest.approx(
        t["energy_pj_per_token"] - r["per_site"]["lm_head"]["energy_pj"] - r["per_site"]["final_norm"]["energy_pj"])


def test_tiny_teacher_by_hand():
    r = energy_report(preset("tiny"), seq_len=7)       # mean causal context c = (7 + 1) / 2 = 4
    c = 4
    attn_mac = 2 * 4 * 16 * c                             # QK^T and AV
    mac = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + attn_mac + 3 * 64 * 128 + 2 * 64) + 64 + 64 * 256
    # rope 2*hd*(hq+hkv); scale hq*c; softmax per head c muls + (c+1) transcendentals
    mul = 2 * (2 * 16 * 6 + 4 * c + 4 * (c + c + 1) + 2 * 130 + 384) + 130
    add = 2 * (16 * 6 + 4 * ((c - 1) + c + (c - 1) + (c + 1)) + 4 + 128 + 128) + 2
    t = r["totals"]
    assert (t["mac"], t["mul"], t["add"]) == (mac, mul, add)
    assert t["energy_pj_per_token"] == pytest.approx(pj(mac, mul, add))
    # attention grows with the context, projections do not
    r2 = energy_report(preset("tiny"), seq_len=15)
    assert r2["per_site"]["attention"]["mac"] == 2 * 2 * 4 * 16 * 8
    assert r2["per_site"]["q_proj"] == r["per_site"]["q_proj"]


def test_tiny_spiking_by_hand():
    cfg = preset("tiny-spiking")                          # T=4, ternary, readout ones, all four sites
    rate = 0.2
    r = energy_report(cfg, rate=rate, seq_len=64)
    proj = 64 * 260 + 64 * 64 + 64 * 256 + 128 * 64      # in_proj, out_proj, gate+up, down
    ac = 2 * rate * 4 * proj
    t = r["totals"]
    assert t["ac"] == pytest.approx(ac)
    dense = energy_report(preset("tiny-ssm"), seq_len=64)["totals"]
    assert t["mac"] == dense["mac"] - 2 * proj
    # neurons: per input element (64 + 64 + 64 + 128 per layer) 4 steps x (2 compares + 1 reset) adds,
    # 3 leak muls
    assert r["per_site"]["neurons"]["add"] == 2 * 320 * 4 * 3
    assert r["per_site"]["neurons"]["mul"] == 2 * 320 * 3
    assert t["mul"] == dense["mul"] + 2 * 320 * 3
    assert t["add"] == dense["add"] + 2 * 320 * 12
    assert t["energy_pj_per_token"] == pytest.approx(pj(t["mac"], t["mul"], t["add"], ac))
    assert r["mac_only"]["energy_pj_per_token"] == pytest.approx(4.6 * (t["mac"] + t["mul"] + t["add"] + ac))


def test_spiking_scales_with_rate_and_T():
    cfg = preset("tiny-spiking")
    acs = [energy_report(cfg, rate=r)["totals"]["ac"] for r in (0.05, 0.1, 0.2)]
    assert acs[1] == pytest.approx(2 * acs[0]) and acs[2] == pytest.approx(4 * acs[0])
    cfg8 = dataclasses.replace(cfg, atmn=ATMNConfig(T=8))
    assert energy_report(cfg8, rate=0.1)["totals"]["ac"] == pytest.approx(2 * acs[1])
    e = [energy_report(cfg, rate=r)["totals"]["energy_pj_per_token"] for r in (0.05, 0.1, 0.2)]
    assert e[0] < e[1] < e[2]


def test_measured_firing_format_and_readout():
    cfg = dataclasses.replace(preset("tiny-spiking"), atmn=ATMNConfig(T=3, readout="tau_pow", ternary=False,
                                                                      sites=("in_proj", "mlp_down")))
    rng = np.random.default_rng(0)
    firing = {s: {"nonzero": rng.uniform(0, 0.3, (2, 3)), "pos": np.zeros((2, 3)), "neg": np.zeros((2, 3))}
              for s in ("in_proj", "mlp_down")}
    r = energy_report(cfg, firing=firing)
    want_ac = firing["in_proj"]["nonzero"].sum() * 64 * 260 + firing["mlp_down"]["nonzero"].sum() * 128 * 64
    assert r["totals"]["ac"] == pytest.approx(want_ac)
    # non-spiking sites stay MAC; readout tau_pow combines T partial sums: (T-1)*n_out mul + add
    assert r["per_site"]["out_proj"]["mac"] == 2 * 64 * 64 and r["per_site"]["mlp_in"]["mac"] == 2 * 64 * 256
    assert r["per_site"]["in_proj"]["mul"] == 2 * 2 * 260
    # binary neuron: 1 compare + 1 reset add per element per step
    assert r["per_site"]["neurons"]["add"] == 2 * (64 + 128) * 3 * 2
    per_layer_ac = [firing["in_proj"]["nonzero"][l].sum() * 64 * 260 + firing["mlp_down"]["nonzero"][l].sum() * 128 * 64
                    for l in range(2)]
    assert [l["ac"] for l in r["per_layer"]] == pytest.approx(per_layer_ac)
    with pytest.raises(MarjaxError, match="missing"):
        energy_report(cfg, firing={"in_proj": firing["in_proj"]})
    with pytest.raises(MarjaxError, match="shape"):
        energy_report(cfg, firing={s: {"nonzero": np.zeros((2, 4))} for s in firing})
    with pytest.raises(ConfigError):
        energy_report(cfg)


def test_llamba_1b_counts_match_dims():
    reps = compare_reports(preset("llamba-1b"), seq_len=256, rate=0.1)
    assert reps["teacher"]["model"] == "llama-3.2-1b"
    d = reps["dense_ssm"]["per_site"]
    assert d["in_proj"]["mac"] == 16 * 2048 * (2 * 2048 + 2 * 32 * 64 + 32)
    assert d["out_proj"]["mac"] == 16 * 2048 * 2048
    assert d["mlp_in"]["mac"] == 16 * 2048 * 2 * 8192 and d["mlp_down"]["mac"] == 16 * 8192 * 2048
    assert d["ssd"]["mac"] == 16 * (2 * 32 * 64 * 64 + 2048)
    assert d["conv"]["mac"] == 16 * (2048 + 2 * 32 * 64) * 4
    assert d["lm_head"]["mac"] == 2048 * 128256
    tq = reps["teacher"]["per_site"]
    assert tq["k_proj"]["mac"] == 16 * 2048 * 8 * 64         # GQA: 8 kv heads in Llama-3.2-1B
    s = reps["spiking"]["per_site"]
    assert s["in_proj"]["ac"] == pytest.approx(0.1 * 4 * d["in_proj"]["mac"])
    # the spiking model spends less than the dense one; ACs are cheaper than MACs
    sp, dn = reps["spiking"]["totals"], reps["dense_ssm"]["totals"]
    assert sp["energy_pj_per_token"] < dn["energy_pj_per_token"]
    assert reps["spiking"]["mac_only"]["energy_pj_per_token"] > sp["energy_pj_per_token"]


def test_related_configs_from_attention():
    cfgs = related_configs(preset("tiny"))
    assert cfgs["teacher"].name == "tiny" and cfgs["dense_ssm"].is_ssm and cfgs["spiking"].is_spiking
    assert related_configs(preset("tiny-spiking"))["teacher"].name == "tiny"
    assert uniform_rates(preset("tiny-spiking"), 0.3)["mlp_in"]["pos"][0, 0] == pytest.approx(0.15)
    with pytest.raises(ConfigError):
        uniform_rates(preset("tiny-spiking"), 1.5)


def test_main_preset_and_report_files(tmp_path, capsys):
    assert main(["--model", "llamba-1b", "--rate", "0.05", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"| in_proj | {16 * 2048 * 8224} |" in out
    assert f"| lm_head | {2048 * 128256} |" in out
    data = json.loads((tmp_path / "energy.json").read_text())
    assert set(data) == {"teacher", "dense_ssm", "spiking"}
    assert (tmp_path / "energy.png").stat().st_size > 1000
    assert "| spiking | spiking |" in format_table(data)


def test_measured_rates_through_the_model(tmp_path):
    """Firing rates from the real forward (random tiny spiking model) feed the report."""
    import jax
    from marjax.eval.energy import measure_rates
    from marjax.models.lm import init_params
    cfg = preset("tiny-spiking")
    params = init_params(jax.random.key(0), cfg)
    ids = np.random.default_rng(0).integers(0, 256, (3, 16))
    rates = measure_rates(params, cfg, ids, batch=2)
    assert set(rates) == set(cfg.atmn.sites) and rates["in_proj"]["nonzero"].shape == (2, 4)
    r = energy_report(cfg, firing=rates, seq_len=16)
    assert r["firing"]["source"] == "measured" and r["totals"]["ac"] > 0
    write_report({"spiking": r}, tmp_path)  # also plots a single model


def test_main_measures_rates_of_a_loaded_spiking_model(tmp_path, capsys, monkeypatch):
    """`marjax energy --model X` on a spiking model with weights measures firing rates on --data."""
    import jax
    import marjax
    from marjax.models.lm import init_params

    class Bytes:
        def encode(self, text):
            return list(text.encode("utf-8"))

    cfg = preset("tiny-spiking")
    model = marjax.Model(config=cfg, params=init_params(jax.random.key(0), cfg), tokenizer=Bytes())
    monkeypatch.setattr(energy_mod, "load", lambda name: model)
    data = tmp_path / "data.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    assert main(["--model", "my-spiking", "--data", str(data), "--tokens", "64", "--seq-len", "32",
                 "--out", str(tmp_path / "out")]) == 0
    rep = json.loads((tmp_path / "out" / "energy.json").read_text())["spiking"]
    assert rep["firing"]["source"] == "measured" and rep["tokens"] == 64 and rep["seq_len"] == 32
    assert 0 < rep["totals"]["ac"] < energy_report(cfg, rate=1.0)["totals"]["ac"]
    # without --data: the embedded corpus
    assert main(["--model", "my-spiking", "--tokens", "32", "--seq-len", "32"]) == 0
    assert "measured" in capsys.readouterr().out
    with pytest.raises(MarjaxError, match="no such file"):
        main(["--model", "my-spiking", "--data", str(tmp_path / "missing.txt")])
