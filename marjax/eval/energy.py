"""Analytic inference energy (MAR_SPEC.md section 5): operation counts per token times 45 nm
constants (MAC 4.6 pJ, multiply 3.7 pJ, add/accumulate 0.9 pJ). An estimate, not a measurement.

    rep = energy_report(cfg, firing=aux["spikes"], seq_len=l)       # one model
    reps = compare_reports(cfg, firing=..., seq_len=l)              # teacher, dense SSM, spiking
    print(format_table(reps)); write_report(reps, "out/")           # energy.json, energy.png

Counting conventions (per token, per layer unless said otherwise):
- Linear layer n_in -> n_out: n_in * n_out MAC. Biases: one add per output.
- A spiking projection consumes T ternary spike maps instead of one dense vector and is charged
  one AC (accumulate, at add_pj) per non-zero spike per output unit:
  AC = (sum_t nonzero_t) * n_in * n_out, with nonzero_t the measured (or assumed) fraction of
  non-zero spikes at micro-step t. The MLP gate and up projections share one neuron, so the
  mlp_in spikes feed both (n_out = 2 * d_ff). The per-channel threshold V is folded into the
  weight rows offline; with readout "tau_pow" the T per-step partial sums are combined with
  (T-1) * n_out multiplies and adds.
- The neuron itself, per input element and micro-step: the threshold comparisons (2 for ternary,
  1 for binary) and the soft-reset subtraction are adds; the leak u / tau is one multiply for
  t >= 1 (t = 0 loads the input). So T * (n_cmp + 1) adds and T - 1 muls per element.
- Transcendentals (exp, log1p/softplus, sigmoid, rsqrt, reciprocal) are charged as a piecewise
  linear evaluation: `EnergyConfig.nonlin_mul` muls + `nonlin_add` adds each (default 1 + 1).
  Comparisons (softmax max) count as adds.
- RMSNorm over d: d MAC (sum of squares), 1 mul (mean), 1 add (eps), 1 rsqrt, 2d mul (scale by
  rsqrt and by the weight). Residual adds: d per residual (2 per layer).
- Attention (teacher) at context length l: the token at causal position i (1-based) attends to i
  keys; counts are averaged over the l positions of a sequence, so with c = (l + 1) / 2:
  QK^T H*hd*c MAC, 1/sqrt(hd) scaling H*c mul, softmax per head (c-1 compares, c subtracts, c exp,
  c-1 adds for the sum, 1 reciprocal, c muls), AV H*hd*c MAC. RoPE on q and k heads: per head
  hd/2 rotated pairs of 4 mul + 2 add (cos/sin tables precomputed, not charged).
- SSM mixer (the recurrent form, which is the per-token cost at inference): depthwise conv
  conv_dim * K MAC + conv_dim bias adds; dt = softplus(A_log + bias): H adds + H softplus; decay
  exp(-dt): H exp; state update h = a * h + x B^T: H*P*N mul (decay) + H*P*N MAC (outer product
  accumulated into the state); output y = h C: H*P*N MAC; D skip: d_inner MAC; gate
  y * silu(z + z_bias): d_inner adds, d_inner sigmoids, 2 * d_inner muls.
- MLP: gate and up d -> f MAC each, silu f sigmoid + f mul, product f mul, down f -> d MAC.
- Embedding lookup: a memory read, no arithmetic: 0 ops (weights/activation memory traffic is
  not modelled at all). LM head: d * vocab MAC (also with tied embeddings).
- `mac_only`: every counted operation (MAC, AC, mul, add) charged at mac_pj. Comparing it with
  `totals` separates the saving from doing fewer operations (sparsity) from the saving from doing
  cheaper ones (AC instead of MAC).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import jax
import numpy as np

from marjax.api import load
from marjax.config import PRESETS, ATMNConfig, ModelConfig, preset, ssm_from_attention
from marjax.errors import ConfigError, DataError, MarjaxError
from marjax.models.lm import forward
from marjax.train.corpus import default_text

__all__ = ["EnergyConfig", "Ops", "energy_report", "compare_reports", "related_configs", "uniform_rates",
           "site_dims", "measure_rates", "format_table", "format_sites", "format_ops", "write_report", "main"]


@dataclass(frozen=True)
class EnergyConfig:
    """45 nm energy per operation in pJ (Horowitz 2014, as used by MAR)."""
    mac_pj: float = 4.6
    mul_pj: float = 3.7
    add_pj: float = 0.9            # also the price of an AC
    nonlin_mul: int = 1            # a transcendental = nonlin_mul muls + nonlin_add adds
    nonlin_add: int = 1


@dataclass(frozen=True)
class Ops:
    """Operation counts (floats: averages over tokens and positions)."""
    mac: float = 0.0
    ac: float = 0.0
    mul: float = 0.0
    add: float = 0.0

    def __add__(self, o: "Ops") -> "Ops":
        return Ops(self.mac + o.mac, self.ac + o.ac, self.mul + o.mul, self.add + o.add)

    def __mul__(self, k: float) -> "Ops":
        return Ops(self.mac * k, self.ac * k, self.mul * k, self.add * k)

    __rmul__ = __mul__

    def energy(self, e: EnergyConfig) -> float:
        return self.mac * e.mac_pj + self.mul * e.mul_pj + (self.add + self.ac) * e.add_pj

    def total(self) -> float:
        return self.mac + self.ac + self.mul + self.add

    def to_dict(self, e: EnergyConfig) -> dict:
        return {"mac": self.mac, "ac": self.ac, "mul": self.mul, "add": self.add, "energy_pj": self.energy(e)}


def _nonlin(n: float, e: EnergyConfig) -> Ops:
    return Ops(mul=n * e.nonlin_mul, add=n * e.nonlin_add)


def _linear(n_in: int, n_out: int) -> Ops:
    return Ops(mac=float(n_in) * n_out)


def _rms_norm(d: int, e: EnergyConfig) -> Ops:
    return Ops(mac=d, mul=2 * d + 1, add=1) + _nonlin(1, e)


def _mlp_act(f: int, e: EnergyConfig) -> Ops:
    return Ops(mul=2 * f) + _nonlin(f, e)        # silu = x * sigmoid(x), then gate * up


def site_dims(cfg: ModelConfig) -> dict:
    """(n_in, n_out) of each spiking site's projection (mlp_in: gate + up share the input)."""
    s = cfg.ssm
    return {"in_proj": (cfg.d_model, 2 * s.d_inner + 2 * s.n_heads * s.state_dim + s.n_heads),
            "out_proj": (s.d_inner, cfg.d_model),
            "mlp_in": (cfg.d_model, 2 * cfg.d_ff),
            "mlp_down": (cfg.d_ff, cfg.d_model)}


def _attention_layer(cfg: ModelConfig, seq_len: int, e: EnergyConfig) -> dict:
    d, hd, hq, hkv = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    c = (seq_len + 1) / 2.0                       # mean number of keys a causal position sees
    softmax = Ops(mul=c, add=(c - 1) + c + (c - 1)) + _nonlin(c + 1, e)
    return {"q_proj": _linear(d, hq * hd), "k_proj": _linear(d, hkv * hd), "v_proj": _linear(d, hkv * hd),
            "rope": Ops(mul=2 * hd * (hq + hkv), add=hd * (hq + hkv)),
            "attention": Ops(mac=2 * hq * hd * c, mul=hq * c) + hq * softmax,
            "o_proj": _linear(hq * hd, d)}


def _ssm_mixer_core(cfg: ModelConfig, e: EnergyConfig) -> dict:
    s = cfg.ssm
    h, p, n, di = s.n_heads, s.head_dim, s.state_dim, s.d_inner
    return {"conv": Ops(mac=s.conv_dim * s.conv_kernel, add=s.conv_dim),
            "ssd": Ops(add=h) + _nonlin(2 * h, e) + Ops(mul=h * p * n, mac=2 * h * p * n) + Ops(mac=di),
            "gate": Ops(add=di, mul=2 * di) + _nonlin(di, e)}


def _common_layer(cfg: ModelConfig, e: EnergyConfig) -> dict:
    return {"norms": 2 * _rms_norm(cfg.d_model, e), "residual": Ops(add=2 * cfg.d_model),
            "mlp_act": _mlp_act(cfg.d_ff, e)}


def _head(cfg: ModelConfig, e: EnergyConfig) -> dict:
    return {"embed": Ops(), "final_norm": _rms_norm(cfg.d_model, e), "lm_head": _linear(cfg.d_model, cfg.vocab_size)}


def _spiking_site(n_in: int, n_out: int, rates: np.ndarray, atmn: ATMNConfig, e: EnergyConfig) -> tuple[Ops, Ops]:
    """(projection ops, neuron ops) of one spiking site for one layer; rates (T,) nonzero."""
    T = atmn.T
    proj = Ops(ac=float(np.sum(rates)) * n_in * n_out)
    if atmn.readout == "tau_pow":
        proj = proj + Ops(mul=(T - 1) * n_out, add=(T - 1) * n_out)
    n_cmp = 2 if atmn.ternary else 1
    neuron = Ops(add=n_in * T * (n_cmp + 1), mul=n_in * (T - 1))
    return proj, neuron


def uniform_rates(cfg: ModelConfig, rate: float, atmn: Optional[ATMNConfig] = None) -> dict:
    """An assumed firing-rate dict (the model's format): `rate` non-zero spikes per element per
    micro-step at every site and layer (split evenly between +1 and -1 when ternary)."""
    atmn = atmn or cfg.atmn or ATMNConfig()
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"firing rate must be in [0, 1] (non-zero spikes per element per micro-step), got {rate}")
    shape = (cfg.n_layers, atmn.T)
    pos = rate / 2 if atmn.ternary else rate
    return {s: {"nonzero": np.full(shape, rate), "pos": np.full(shape, pos), "neg": np.full(shape, rate - pos)}
            for s in atmn.sites}


def _check_firing(firing: dict, cfg: ModelConfig, atmn: ATMNConfig) -> dict:
    out = {}
    for s in atmn.sites:
        if s not in firing:
            raise MarjaxError(f"firing rates: site {s!r} is missing; got sites {sorted(firing)}")
        nz = np.asarray(firing[s]["nonzero"], np.float64)
        if nz.shape != (cfg.n_layers, atmn.T):
            raise MarjaxError(f"firing rates for site {s!r}: 'nonzero' must have shape (n_layers, T) = "
                              f"({cfg.n_layers}, {atmn.T}), got {nz.shape}")
        out[s] = nz
    return out


def _kind(cfg: ModelConfig) -> str:
    return "spiking" if cfg.is_spiking else ("dense_ssm" if cfg.is_ssm else "teacher")


def energy_report(cfg: ModelConfig, firing: Optional[dict] = None, seq_len: int = 512,
                  ecfg: EnergyConfig = EnergyConfig(), rate: Optional[float] = None,
                  tokens: Optional[int] = None) -> dict:
    """Per-token energy report of one model. `cfg` decides the kind: attention (teacher), SSM
    (dense), SSM with `atmn` (spiking: needs `firing` {site: {"nonzero": (n_layers, T), ...}} or
    an assumed `rate`). `seq_len` is the context length l (attention cost is averaged over the
    positions of a causal sequence of length l; the SSM cost does not depend on it)."""
    cfg = cfg.validate()
    if seq_len < 1:
        raise ConfigError(f"seq_len must be >= 1, got {seq_len}")
    kind = _kind(cfg)
    layers, per_site = [], {}
    rates = None
    if kind == "spiking":
        if firing is None and rate is None:
            raise ConfigError(f"model {cfg.name!r} is spiking: pass measured firing rates or an assumed rate")
        rates = _check_firing(firing if firing is not None else uniform_rates(cfg, rate), cfg, cfg.atmn)
    for layer in range(cfg.n_layers):
        if kind == "teacher":
            parts = _attention_layer(cfg, seq_len, ecfg)
            parts["mlp_in"], parts["mlp_down"] = _linear(cfg.d_model, 2 * cfg.d_ff), _linear(cfg.d_ff, cfg.d_model)
        else:
            parts = dict(_ssm_mixer_core(cfg, ecfg))
            parts.update({s: _linear(*nm) for s, nm in site_dims(cfg).items()})
            if kind == "spiking":
                neurons = Ops()
                for s in cfg.atmn.sites:
                    parts[s], nops = _spiking_site(*site_dims(cfg)[s], rates[s][layer], cfg.atmn, ecfg)
                    neurons = neurons + nops
                parts["neurons"] = neurons
        parts.update(_common_layer(cfg, ecfg))
        tot = sum(parts.values(), Ops())
        layers.append({"layer": layer, **tot.to_dict(ecfg)})
        for k, v in parts.items():
            per_site[k] = per_site.get(k, Ops()) + v
    per_site.update(_head(cfg, ecfg))
    total = sum(per_site.values(), Ops())
    rep = {"model": cfg.name, "kind": kind, "seq_len": int(seq_len), "constants": dataclasses.asdict(ecfg),
           "per_layer": layers, "per_site": {k: v.to_dict(ecfg) for k, v in per_site.items()},
           "totals": {"energy_pj_per_token": total.energy(ecfg), "mac": total.mac, "ac": total.ac,
                      "mul": total.mul, "add": total.add},
           "mac_only": {"ops": total.total(), "energy_pj_per_token": total.total() * ecfg.mac_pj}}
    if tokens is not None:
        rep["tokens"] = int(tokens)
    if kind == "spiking":
        rep["T"] = cfg.atmn.T
        rep["firing"] = {"source": "measured" if firing is not None else f"assumed rate {rate}",
                         "nonzero_per_step": {s: float(np.mean(r)) for s, r in rates.items()},
                         "spikes_per_element": {s: float(np.mean(np.sum(r, axis=-1))) for s, r in rates.items()}}
    return rep


def related_configs(cfg: ModelConfig, teacher: Optional[ModelConfig] = None,
                    atmn: Optional[ATMNConfig] = None) -> dict:
    """{"teacher", "dense_ssm", "spiking"} configs of the same model family. The teacher is
    `teacher`, else the preset named like the model without "-ssm"/"-spiking" (llamba-1b ->
    llama-3.2-1b), else the attention model with the same dims."""
    cfg = cfg.validate()
    if cfg.is_ssm:
        dense = dataclasses.replace(cfg, atmn=None).validate()
    else:
        dense = ssm_from_attention(cfg)
    spiking = dataclasses.replace(dense, atmn=cfg.atmn or atmn or ATMNConfig()).validate()
    if teacher is None:
        if not cfg.is_ssm:
            teacher = cfg
        else:
            base = cfg.name.replace("-spiking", "").replace("-ssm", "")
            base = {"llamba-1b": "llama-3.2-1b"}.get(base, base)
            teacher = PRESETS[base] if base in PRESETS and not PRESETS[base].is_ssm else \
                dataclasses.replace(cfg, name=base + "-attention", mixer="attention", ssm=None, atmn=None)
    if teacher.is_ssm:
        raise ConfigError(f"teacher {teacher.name!r} must be an attention model, got mixer {teacher.mixer!r}")
    return {"teacher": teacher.validate(), "dense_ssm": dense, "spiking": spiking}


def compare_reports(cfg: ModelConfig, firing: Optional[dict] = None, seq_len: int = 512, *,
                    teacher: Optional[ModelConfig] = None, atmn: Optional[ATMNConfig] = None,
                    rate: Optional[float] = None, tokens: Optional[int] = None,
                    ecfg: EnergyConfig = EnergyConfig()) -> dict:
    """Teacher, dense SSM and spiking reports at the same context length and token count."""
    cfgs = related_configs(cfg, teacher, atmn)
    return {k: energy_report(c, firing=firing if k == "spiking" else None, seq_len=seq_len, ecfg=ecfg,
                             rate=rate if k == "spiking" else None, tokens=tokens)
            for k, c in cfgs.items()}


# ---- measured firing rates -------------------------------------------------------------------
def measure_rates(params, cfg: ModelConfig, ids: np.ndarray, batch: int = 4) -> dict:
    """Firing rates of a spiking model on token ids (n_seq, seq_len), averaged over sequences
    (every sequence has the same length, so the plain mean is the per-token mean)."""
    if not cfg.is_spiking:
        raise ConfigError(f"model {cfg.name!r} has no spiking sites (ModelConfig.atmn is None)")
    fwd = jax.jit(forward, static_argnames=("cfg", "taps", "head"))
    acc, n = None, 0
    for i in range(0, ids.shape[0], batch):
        chunk = np.asarray(ids[i:i + batch], np.int32)
        _, aux = fwd(params, chunk, cfg=cfg, taps=("spikes",), head=False)
        got = jax.tree.map(lambda a: np.asarray(a, np.float64) * chunk.shape[0], aux["spikes"])
        acc = got if acc is None else jax.tree.map(np.add, acc, got)
        n += chunk.shape[0]
    return jax.tree.map(lambda a: a / n, acc)


# ---- output ----------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _count(x: float) -> str:
    """Exact integer counts print in full (so they can be checked against the dims)."""
    return str(int(round(x))) if abs(x - round(x)) < 1e-6 and abs(x) < 1e15 else f"{x:.6g}"


def format_table(reports: dict) -> str:
    """Markdown table: ops and energy per token of each report, ratios to the first one."""
    names = list(reports)
    base = reports[names[0]]["totals"]["energy_pj_per_token"] if names else 1.0
    lines = ["| model | kind | MAC | AC | mul | add | energy/token (pJ) | vs " + (names[0] if names else "") +
             " | MAC-only (pJ) |", "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        r = reports[name]
        t = r["totals"]
        lines.append(f"| {name} | {r['kind']} | {_fmt(t['mac'])} | {_fmt(t['ac'])} | {_fmt(t['mul'])} | "
                     f"{_fmt(t['add'])} | {_fmt(t['energy_pj_per_token'])} | "
                     f"{t['energy_pj_per_token'] / base:.3f} | {_fmt(r['mac_only']['energy_pj_per_token'])} |")
    return "\n".join(lines)


def format_sites(reports: dict) -> str:
    """Markdown table of energy per site (pJ per token), one column per report."""
    names = list(reports)
    sites = []
    for r in reports.values():
        sites += [s for s in r["per_site"] if s not in sites]
    lines = ["| site | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for s in sites:
        cells = [_fmt(reports[n]["per_site"][s]["energy_pj"]) if s in reports[n]["per_site"] else "-" for n in names]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_ops(report: dict) -> str:
    """Markdown table of one report's op counts per site (per token, summed over layers)."""
    lines = [f"| {report['model']} site | MAC | AC | mul | add | energy (pJ) |", "|---|---|---|---|---|---|"]
    for s, v in report["per_site"].items():
        lines.append(f"| {s} | {_count(v['mac'])} | {_count(v['ac'])} | {_count(v['mul'])} | {_count(v['add'])} | "
                     f"{_fmt(v['energy_pj'])} |")
    return "\n".join(lines)


def write_report(reports: dict, out_dir) -> dict:
    """energy.json (all reports) and energy.png (per-site energy per model, stacked bars)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "energy.json").write_text(json.dumps(reports, indent=1, default=float))
    import matplotlib  # late import: matplotlib is heavy and only the report file needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # late import: after matplotlib.use("Agg") (no display)
    names = list(reports)
    sites = []
    for r in reports.values():
        sites += [s for s in r["per_site"] if s not in sites]
    fig, ax = plt.subplots(figsize=(1.6 * max(len(names), 2) + 3.0, 4.0))
    bottom = np.zeros(len(names))
    cmap = plt.get_cmap("tab20")
    for i, s in enumerate(sites):
        vals = np.array([reports[n]["per_site"].get(s, {}).get("energy_pj", 0.0) for n in names]) / 1e6
        if not vals.any():
            continue
        ax.bar(names, vals, bottom=bottom, label=s, color=cmap(i % 20))
        bottom += vals
    ax.set_ylim(0, max(float(bottom.max()), 1e-12) * 1.08)
    ax.set_ylabel("energy per token (uJ)")
    ax.set_title("Analytic energy per token by site (45 nm)")
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1.0), loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "energy.png", dpi=110)
    plt.close(fig)
    return {"json": str(out / "energy.json"), "png": str(out / "energy.png")}


# ---- CLI -------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="marjax energy", description=(
        "Analytic energy per token (45 nm: MAC 4.6 pJ, mul 3.7 pJ, add/AC 0.9 pJ) of the attention teacher, "
        "the dense SSM and the spiking model. With a trained spiking model, firing rates are measured on "
        "--tokens tokens of --data (default: the embedded corpus); with a preset name (no weights) the op "
        "counts come from the dims and the firing rate is the --rate assumption."))
    p.add_argument("--model", required=True, help="model name/path, or a preset name (dims only)")
    p.add_argument("--teacher", default=None, help="teacher name/path or preset (default: derived from --model)")
    p.add_argument("--data", default=None, help="text file for measuring firing rates (default: embedded corpus)")
    p.add_argument("--tokens", type=int, default=512, help="tokens to measure firing rates on (default 512)")
    p.add_argument("--seq-len", type=int, default=256,
                   help="sequence length: measurement windows and the attention context l (default 256)")
    p.add_argument("--rate", type=float, default=None,
                   help="assumed non-zero spikes per element per micro-step (default 0.1 without weights)")
    p.add_argument("--T", type=int, default=None, help="micro-steps for the spiking variant of a non-spiking model")
    p.add_argument("--out", default=None, help="folder for energy.json and energy.png")
    return p


def _config_of(name: str) -> tuple[ModelConfig, object]:
    """(config, loaded model or None): presets give dims only; anything else is loaded."""
    if name in PRESETS:
        return preset(name), None
    m = load(name)
    return m.config, m


def _token_ids(m, data: Optional[str], tokens: int, seq_len: int) -> np.ndarray:
    if data is not None:
        if not os.path.isfile(data):
            raise DataError(f"--data: no such file {data!r}")
        try:
            text = Path(data).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"--data {data!r} is not UTF-8 text: {e}") from None
    else:
        text = default_text()
    ids = list(m.tokenizer.encode(text))
    if not ids:
        raise DataError(f"--data {data!r}: the text encodes to no tokens")
    seq_len = min(seq_len, len(ids), tokens)
    n_seq = max(1, min(tokens, len(ids)) // seq_len)
    return np.asarray(ids[:n_seq * seq_len], np.int32).reshape(n_seq, seq_len)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.tokens < 1 or args.seq_len < 1:
        raise ConfigError(f"--tokens and --seq-len must be >= 1, got {args.tokens} and {args.seq_len}")
    cfg, m = _config_of(args.model)
    teacher = _config_of(args.teacher)[0] if args.teacher else None
    atmn = ATMNConfig(T=args.T) if args.T else None
    if args.T and cfg.atmn is not None and cfg.atmn.T != args.T:
        raise ConfigError(f"--T {args.T} differs from the model's ATMN T={cfg.atmn.T}; leave --T out")
    seq_len = min(args.seq_len, args.tokens, cfg.max_seq_len)
    firing, rate, tokens = None, args.rate, args.tokens
    if m is not None and cfg.is_spiking and rate is None:
        ids = _token_ids(m, args.data, args.tokens, seq_len)
        seq_len, tokens = ids.shape[1], ids.size
        print(f"measuring firing rates on {tokens} tokens ({ids.shape[0]} x {seq_len})", file=sys.stderr)
        firing = measure_rates(m.params, cfg, ids)
    elif rate is None:
        rate = 0.1
        print(f"no measured firing rates ({'preset: dims only' if m is None else 'model is not spiking'}); "
              f"assuming rate {rate} (set --rate)", file=sys.stderr)
    reports = compare_reports(cfg, firing=firing, seq_len=seq_len, teacher=teacher, atmn=atmn, rate=rate,
                              tokens=tokens)
    sp = reports["spiking"]
    print(f"# energy per token, context l = {seq_len}, spiking T = {sp['T']} "
          f"({sp['firing']['source']})\n")
    print(format_table(reports))
    print("\nenergy per site (pJ per token):\n")
    print(format_sites(reports))
    for r in reports.values():
        print(f"\nop counts per token ({r['kind']}, summed over {len(r['per_layer'])} layers):\n")
        print(format_ops(r))
    if args.out:
        paths = write_report(reports, args.out)
        print(f"\nwrote {paths['json']} and {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
