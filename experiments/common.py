"""Shared machinery for the small-scale MAR experiments (issue 7).

One shared setup, cached on disk: a small Llama teacher pretrained from scratch (byte tokenizer)
-> MOHAWK stage 1 (orient, align, kd) -> a dense SSM. Every experiment variant then runs only the
SBDS stage from that same dense SSM with the same step budget, data and seed, so rows differ only
by the ablated choice. Each (variant, seed) is cached too (checkpoint + metrics.json), keyed by a
hash of everything that defines it, so re-running a script, or another script that shares a
variant (the main table reuses the ladder's rows), costs nothing.

An experiment config is a TOML file:

    seeds = [0, 1, 2]
    [setup]   d_model = 128 ... (SetupConfig: the teacher/SSM, shared by all experiments)
    [sbds]    steps = 60  lr = 1e-3 ... (SBDSConfig)
    [eval]    limit = 100  tasks = [...] ... (EvalConfig)
    [atmn]    base ATMNConfig fields for every variant (default: init = "stats")
    [distill] base DistillConfig fields for every variant
    [[variant]]  name = "..."  atmn = {...}  distill = {...}   (overrides of the bases)

The stage recipe is the library's (marjax.app.recipe: dense_student = init_from_attention +
fit_mixer_scale with the recipe's decay bias, spiking_student = calibrated ATMN sites,
stage_train_config = the per-stage lr multipliers), exactly what `marjax pipeline` runs; the
configs pin every [atmn], [distill] and [recipe] field. What is here: the on-disk stage cache,
teacher-agreement / KL-to-teacher on held-out tokens, and the seed aggregation.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import time
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

import marjax
from marjax.app.recipe import Recipe, dense_student, spiking_student, stage_train_config
from marjax.app.runner import RunConfig, RunSection, run_stage
from marjax.config import ATMNConfig, DistillConfig, ModelConfig, TrainConfig
from marjax.errors import ConfigError, DataError
from marjax.eval.energy import energy_report
from marjax.eval.perplexity import text_perplexity
from marjax.eval.scoring import encode_text
from marjax.eval.suite import evaluate
from marjax.io.tokenizer import ByteTokenizer
from marjax.models.lm import forward, init_params
from marjax.train.data import heldout_text

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
DEFAULT_RUNS = ROOT / "runs"
RESULTS = ROOT / "results"
SHARED_DATA = Path(os.environ.get("MARJAX_SHARED_DATA", str(REPO.parent / "shared" / "data")))  # CI lays shared/ beside the clone
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"
# The six commonsense tasks of the paper's zero-shot average (our reading: the lm-eval
# commonsense suite without the reading-comprehension task BoolQ).
SIX_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "openbookqa")

__all__ = ["SetupConfig", "SBDSConfig", "EvalConfig", "Variant", "ExperimentConfig", "load_experiment",
           "build_setup", "Setup", "run_variant", "evaluate_model", "run_experiment", "aggregate",
           "fmt_pm", "markdown_table", "base_argparser", "config_from_args", "SIX_TASKS", "run_from_cli",
           "ordering_report", "FIDELITY_BARS"]


# ----------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class SetupConfig:
    """The shared teacher -> dense SSM setup (a slightly larger Llama than the `tiny` preset)."""
    d_model: int = 128
    n_layers: int = 2                # 2, not 4: the CPU budget (2 shared cores) of issue 7
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 32
    d_ff: int = 384
    max_seq_len: int = 1024          # room for the multiple-choice prompts (byte tokens)
    data: str = "shakespeare"        # "shakespeare" (shared/data, if present), "" (embedded corpus) or a path
    seq_len: int = 128
    micro_batch: int = 8
    lr: float = 3e-3
    pretrain_steps: int = 300
    orient_steps: int = 20
    align_steps: int = 30
    kd_steps: int = 80
    seed: int = 0                    # teacher init and stage-1 data order

    def data_path(self) -> str:
        if self.data == "shakespeare":
            return str(SHAKESPEARE) if SHAKESPEARE.is_file() else ""
        return self.data


@dataclass(frozen=True)
class SBDSConfig:
    steps: int = 60
    lr: float = 3e-3
    micro_batch: int = 8
    seq_len: int = 128


@dataclass(frozen=True)
class EvalConfig:
    heldout_tokens: int = 4096       # held-out tokens for ppl / agreement / KL
    window: int = 128                # context window of those (= the training seq_len)
    tasks: tuple = SIX_TASKS
    limit: int = 100                 # items per task (0: skip the zero-shot tasks)
    mc_max_len: int = 512            # longest scored prompt (left-truncated beyond)
    data_dir: str = str(SHARED_DATA)


@dataclass(frozen=True)
class Variant:
    name: str
    atmn: Any                        # ATMNConfig
    distill: Any                     # DistillConfig


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    seeds: tuple
    setup: SetupConfig
    sbds: SBDSConfig
    eval: EvalConfig
    variants: tuple
    recipe: Any = None               # marjax.app.recipe.Recipe (pinned in the TOML)
    runs_dir: str = str(DEFAULT_RUNS)


def _replace_checked(cfg, values: dict, where: str):
    known = {f.name: f for f in dataclasses.fields(cfg)}
    bad = [k for k in values if k not in known]
    if bad:
        raise ConfigError(f"{where}: unknown keys {bad}; known: {sorted(known)}")
    conv = {}
    for k, v in values.items():
        cur = getattr(cfg, k)
        conv[k] = tuple(v) if isinstance(cur, tuple) else (float(v) if isinstance(cur, float) else v)
    return dataclasses.replace(cfg, **conv)


def _pinned(cls, values: dict, where: str):
    """cls(**values) where `values` must name every field: a library default change can then never
    rewrite a committed table (an unpinned or unknown field is an error that names it)."""
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in values]
    if missing:
        raise ConfigError(f"{where}: every {cls.__name__} field must be pinned; missing {missing}")
    return _replace_checked(cls(), values, where)


def load_experiment(path: str, name: Optional[str] = None) -> ExperimentConfig:
    """An ExperimentConfig from a TOML file (module docstring). The library configs ([atmn],
    [distill], [recipe]) must pin every field."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"experiment config not found: {p}")
    d = tomllib.loads(p.read_text())
    base_atmn = _pinned(ATMNConfig, d.get("atmn", {}), f"{p} [atmn]").validate()
    base_dist = _pinned(DistillConfig, d.get("distill", {}), f"{p} [distill]").validate()
    recipe = _pinned(Recipe, d.get("recipe", {}), f"{p} [recipe]")
    variants = []
    for v in d.get("variant", []):
        if "name" not in v:
            raise ConfigError(f"{p}: every [[variant]] needs a name, got {v}")
        a = _replace_checked(base_atmn, v.get("atmn", {}), f"{p} variant {v['name']!r} atmn").validate()
        dc = _replace_checked(base_dist, v.get("distill", {}), f"{p} variant {v['name']!r} distill").validate()
        variants.append(Variant(v["name"], a, dc))
    return ExperimentConfig(
        name=name or p.stem, seeds=tuple(int(s) for s in d.get("seeds", [0])),
        setup=_replace_checked(SetupConfig(), d.get("setup", {}), f"{p} [setup]"),
        sbds=_replace_checked(SBDSConfig(), d.get("sbds", {}), f"{p} [sbds]"),
        eval=_replace_checked(EvalConfig(), d.get("eval", {}), f"{p} [eval]"),
        variants=tuple(variants), recipe=recipe)


# Fields added to the library configs after runs were cached, with the value that reproduces the
# code before them: at that value they stay out of the cache key, so a cached run is still found
# (its code path is unchanged); any other value is a new key.
_KEY_LEGACY = {"calib_max_ratio": 4.0, "token_grad_clip": 0.0}


def _key_fields(o) -> dict:
    d = dataclasses.asdict(o)
    return {k: v for k, v in d.items() if not (k in _KEY_LEGACY and v == _KEY_LEGACY[k])}


def _key(*objs) -> str:
    blob = json.dumps([_key_fields(o) if dataclasses.is_dataclass(o) else o for o in objs],
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def _enable_compile_cache(runs_dir: Path) -> None:
    """Persistent XLA cache: variants that share a config (seeds, reruns) skip recompiling."""
    jax.config.update("jax_compilation_cache_dir", str(runs_dir / ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# ----------------------------------------------------------------------------- the shared setup

@dataclass
class Setup:
    cfg: SetupConfig
    dir: Path
    teacher: Any                     # marjax.Model (attention)
    ssm: Any                         # marjax.Model (dense SSM)
    heldout: str                     # held-out text (never trained on)
    timings: dict


def _train_cfg(steps: int, seq_len: int, micro_batch: int, lr: float, seed: int):
    # optimizer "optax": the tables were made before the trainer's fused AdamW (same formulas,
    # other rounding, which can move a small run's results)
    return TrainConfig(steps=steps, seq_len=seq_len, micro_batch=micro_batch, batch_tokens=seq_len * micro_batch,
                       lr=lr, warmup=max(1, steps // 10), seed=seed, log_every=max(1, steps // 10),
                       save_every=steps, keep=1, optimizer="optax")


def _stage(stage: str, teacher, scfg, sparams, tc, dcfg, atmn, data: str, out: Path, tok):
    """run_stage with resume=True: a finished stage directory is restored, not retrained."""
    rc = _run_cfg(tc, dcfg, atmn, data, out)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="resume=True but")
        return run_stage(stage, teacher, scfg, sparams, rc, str(out), tokenizer=tok, progress=False)


def _run_cfg(tc, dcfg, atmn, data: str, out: Path):
    return RunConfig(run=RunSection(teacher="tiny", data=data, out=str(out), resume=True), train=tc,
                     distill=dcfg, atmn=atmn)


def build_setup(cfg: SetupConfig, recipe, runs_dir: Path = DEFAULT_RUNS, log: Callable = print) -> Setup:
    """Pretrain the teacher and distil the dense SSM with the library's stage recipe (the one
    `marjax pipeline` runs), or restore them from runs_dir."""

    runs_dir = Path(runs_dir)
    _enable_compile_cache(runs_dir)
    d = runs_dir / f"setup-{_key(cfg, recipe)}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "setup.json").write_text(json.dumps({"setup": dataclasses.asdict(cfg), "recipe": dataclasses.asdict(recipe)},
                                             indent=1))
    tok = ByteTokenizer()
    data = cfg.data_path()
    mcfg = ModelConfig(name="exp-teacher", vocab_size=tok.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers,
                       n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, d_ff=cfg.d_ff,
                       max_seq_len=cfg.max_seq_len).validate()
    timings = {}
    tpath = d / "timings.json"
    old = json.loads(tpath.read_text()) if tpath.is_file() else {}
    atmn, dcfg = ATMNConfig(), DistillConfig()   # unused by stage 1 (its losses take no ATMN/SBDS field)
    base = _train_cfg(1, cfg.seq_len, cfg.micro_batch, cfg.lr, cfg.seed)

    def tc(stage, steps):
        return dataclasses.replace(stage_train_config(base, stage, steps, recipe), log_every=max(1, steps // 10),
                                   save_every=steps)

    t = time.time()
    params, _ = _stage("pretrain", None, mcfg, init_params(jax.random.PRNGKey(cfg.seed), mcfg),
                       tc("pretrain", cfg.pretrain_steps), dcfg, atmn, data, d / "pretrain", tok)
    timings["pretrain"] = time.time() - t
    teacher = marjax.Model(mcfg, params, tok, str(d / "pretrain"))
    scfg, sparams = dense_student(teacher, _run_cfg(tc("orient", cfg.orient_steps), dcfg, atmn, data, d), recipe)
    for stage, steps in (("orient", cfg.orient_steps), ("align", cfg.align_steps), ("kd", cfg.kd_steps)):
        t = time.time()
        sparams, _ = _stage(stage, teacher, scfg, sparams, tc(stage, steps), dcfg, atmn, data, d / stage, tok)
        timings[stage] = time.time() - t
    ssm = marjax.Model(scfg, sparams, tok, str(d / "kd"))
    # a restored stage takes ~0 s: keep the time of the run that actually trained it
    timings = {k: (old[k] if k in old and v < 0.5 * old[k] else v) for k, v in timings.items()}
    tpath.write_text(json.dumps(timings, indent=1))
    log(f"setup {d.name}: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return Setup(cfg, d, teacher, ssm, heldout_text(data or None, tokenizer=tok), timings)


# ----------------------------------------------------------------------------- one variant

def run_variant(setup: Setup, v: Variant, seed: int, sb: SBDSConfig, ev: EvalConfig, recipe,
                log: Callable = print) -> dict:
    """SBDS from the shared dense SSM for one variant and seed (the library recipe's calibrated
    spiking student); evaluated; cached on disk."""
    # keyed by content, not by name: experiments that share a variant share its run
    out = setup.dir / "sbds" / f"{_key(v.atmn, _effective(v.distill), sb, recipe)}-s{seed}"
    mpath = out / f"metrics-{_key(ev)}.json"
    if mpath.is_file():
        res = dict(json.loads(mpath.read_text()), variant=v.name)
        return dict(res, train_s=_train_seconds(out, res["train_s"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "variant.json").write_text(json.dumps({"name": v.name, "atmn": dataclasses.asdict(v.atmn),
                                                  "distill": dataclasses.asdict(v.distill), "seed": seed}, indent=1))
    tc = dataclasses.replace(stage_train_config(_train_cfg(sb.steps, sb.seq_len, sb.micro_batch, sb.lr, seed), "sbds",
                                                sb.steps, recipe), log_every=max(1, sb.steps // 10), save_every=sb.steps)
    data = setup.cfg.data_path()
    # calibration batch: depends on the seed (like the data order), never the training batches
    pcfg, pparams = spiking_student(setup.ssm, _run_cfg(tc, v.distill, v.atmn, data, out), recipe)
    t = time.time()
    pparams, hist = _stage("sbds", setup.ssm, pcfg, pparams, tc, v.distill, v.atmn, data, out, setup.ssm.tokenizer)
    t_train = time.time() - t
    student = marjax.Model(pcfg, pparams, setup.ssm.tokenizer, str(out))
    t = time.time()
    res = evaluate_model(student, setup, ev, reference=setup.ssm)
    res.update(variant=v.name, seed=seed, steps=sb.steps, train_s=_train_seconds(out, t_train), eval_s=time.time() - t,
               atmn=dataclasses.asdict(v.atmn), distill=dataclasses.asdict(v.distill),
               final_loss=hist[-1]["loss"] if hist else None)
    mpath.write_text(json.dumps(res, indent=1, default=float))
    log(f"  {v.name:<28} seed {seed}: ppl {res['ppl']:.3f}  agree {res['agreement']:.3f}  kl {res['kl']:.4f}  "
        f"fr {res.get('firing_rate', float('nan')):.3f}  acc {res.get('acc_avg', float('nan')):.3f}  "
        f"({t_train:.0f}s train, {res['eval_s']:.0f}s eval)")
    return res


def _train_seconds(out: Path, default: float) -> float:
    """Wall time of the SBDS run that trained this checkpoint (its log's last record, compile
    included), not of a later restore."""
    try:
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        return float(recs[-1]["time"])
    except (OSError, ValueError, KeyError, IndexError):
        return default


def _effective(d) -> dict:
    """The DistillConfig fields that change an SBDS run (the cache key): without a feature loss,
    its weight and norm do nothing."""
    out = _key_fields(d)
    if d.feature == "none":
        out.pop("feature_weight")
        out.pop("feature_norm", None)
    return out


# ----------------------------------------------------------------------------- evaluation

def _heldout_windows(text: str, tok, ev: EvalConfig) -> np.ndarray:
    ids = np.asarray(encode_text(tok, text), np.int32)
    n = min(len(ids) - 1, ev.heldout_tokens) // ev.window
    if n < 1:
        raise DataError(f"held-out text has {len(ids)} tokens, fewer than one window of {ev.window}")
    return ids[:n * ev.window].reshape(n, ev.window)


def _logits(m, ids: np.ndarray, bs: int = 8) -> np.ndarray:
    return np.concatenate([np.asarray(marjax.logits(m, ids[i:i + bs])) for i in range(0, len(ids), bs)])


def agreement_and_kl(student_logits: np.ndarray, teacher_logits: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean KL(p_teacher || q_student) in nats) over all positions."""
    def logsm(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = logsm(teacher_logits), logsm(student_logits)
    agree = float(np.mean(teacher_logits.argmax(-1) == student_logits.argmax(-1)))
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))
    return agree, kl


def measure_firing(m, ids: np.ndarray):
    """{site: {"nonzero": (n_layers, T), ...}} on held-out windows (None for a dense model)."""

    if not m.config.is_spiking:
        return None
    _, aux = jax.jit(forward, static_argnames=("cfg", "taps", "head"))(m.params, jax.numpy.asarray(ids), cfg=m.config,
                                                                     taps=("spikes",), head=False)
    return jax.tree.map(np.asarray, aux["spikes"])


def evaluate_model(m, setup: Setup, ev: EvalConfig, reference=None) -> dict:
    """Held-out ppl (text_perplexity), agreement and KL vs `reference` (a marjax Model), firing
    rate, energy per token (measured firing) and the zero-shot tasks."""
    logits_fn = lambda x: np.asarray(marjax.logits(m, x))  # noqa: E731
    ppl = text_perplexity(logits_fn, m.tokenizer, setup.heldout, window=ev.window, max_tokens=ev.heldout_tokens)
    res: dict = {"ppl": ppl["token_ppl"], "bits_per_byte": ppl["bits_per_byte"]}
    ids = _heldout_windows(setup.heldout, m.tokenizer, ev)
    if reference is not None:
        ref = _reference_logits(reference, ids, setup.dir)
        res["agreement"], res["kl"] = agreement_and_kl(_logits(m, ids), ref)
    firing = measure_firing(m, ids[:8])
    if firing is not None:
        res["firing_rate"] = float(np.mean([np.mean(v["nonzero"]) for v in firing.values()]))
        res["firing_per_site"] = {s: float(np.mean(v["nonzero"])) for s, v in firing.items()}
    rep = energy_report(m.config, firing=firing, seq_len=ev.window)
    res["energy_pj_per_token"] = rep["totals"]["energy_pj_per_token"]
    if ev.limit > 0 and ev.tasks:
        tasks = evaluate(tuple(ev.tasks), logits_fn, m.tokenizer, ev.mc_max_len, ev.data_dir, limit=ev.limit)
        res["tasks"] = {k: {"acc": t["acc"], "acc_stderr": t["acc_stderr"], "n": t["n"]} for k, t in tasks.items()}
        accs = [t["acc"] for t in tasks.values()]
        res["acc_avg"] = float(np.mean(accs))
        # stderr of an average of independent task means
        res["acc_avg_stderr"] = float(math.sqrt(sum((t["acc_stderr"] or 0.0) ** 2 for t in tasks.values()))
                                      / len(accs))
    return res


_REF_CACHE: dict = {}


def _reference_logits(ref, ids: np.ndarray, d: Path) -> np.ndarray:
    key = (ref.source, ids.shape, int(ids.sum()))
    if key not in _REF_CACHE:
        _REF_CACHE[key] = _logits(ref, ids)
    return _REF_CACHE[key]


# ----------------------------------------------------------------------------- driving a grid

def run_experiment(exp: ExperimentConfig, log: Callable = print) -> tuple[Setup, dict]:
    """All variants x seeds; returns (setup, {variant name: [per-seed result dicts]})."""
    t0 = time.time()
    setup = build_setup(exp.setup, exp.recipe, Path(exp.runs_dir), log)
    log(f"{exp.name}: {len(exp.variants)} variants x seeds {list(exp.seeds)}, SBDS {exp.sbds.steps} steps")
    out = {}
    for v in exp.variants:
        out[v.name] = [run_variant(setup, v, s, exp.sbds, exp.eval, exp.recipe, log) for s in exp.seeds]
    log(f"{exp.name}: done in {time.time() - t0:.0f}s")
    return setup, out


def aggregate(rows: Sequence[dict], key: str) -> tuple[float, float, int]:
    """(mean, sample std (0 for one seed), n) of a metric over seeds (missing values skipped)."""
    v = np.asarray([r[key] for r in rows if r.get(key) is not None], np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def fmt_pm(rows: Sequence[dict], key: str, digits: int = 3, scale: float = 1.0) -> str:
    m, s, n = aggregate(rows, key)
    if n == 0:
        return "-"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}" if n > 1 else f"{m * scale:.{digits}f}"


STD_COLUMNS = [("held-out ppl", "ppl", 3, 1.0), ("agree w/ SSM", "agreement", 3, 1.0),
               ("KL to SSM", "kl", 4, 1.0), ("firing rate", "firing_rate", 3, 1.0),
               ("energy / token (nJ)", "energy_pj_per_token", 2, 1e-3), ("zero-shot acc (%)", "acc_avg", 1, 100.0)]


def markdown_table(results: dict, columns=STD_COLUMNS, first: str = "variant", extra: Optional[dict] = None) -> str:
    """One row per variant: mean ± std over seeds of each metric column."""
    extra = extra or {}
    head = [first] + list(extra) + [c[0] for c in columns] + ["seeds", "SBDS s/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in results.items():
        cells = [name] + [str(f(name, rows)) for f in extra.values()]
        cells += [fmt_pm(rows, k, dg, sc) for _, k, dg, sc in columns]
        cells += [",".join(str(r["seed"]) for r in rows), f"{np.mean([r['train_s'] for r in rows]):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def provenance(exp: ExperimentConfig, setup: Setup, wall_s: float, cfg_path: str) -> str:
    s = exp.setup
    sb = exp.sbds
    data = setup.cfg.data_path() or "embedded corpus"
    return (f"Setup `{setup.dir.name}` (shared by every row): Llama teacher d_model {s.d_model}, {s.n_layers} layers, "
            f"{s.n_heads} q / {s.n_kv_heads} kv heads x {s.head_dim}, d_ff {s.d_ff}, byte tokenizer (vocab 256), "
            f"pretrained {s.pretrain_steps} steps on `{Path(data).name}` (seq {s.seq_len} x batch {s.micro_batch}, "
            f"seed {s.seed}); stage 1 orient/align/kd {s.orient_steps}/{s.align_steps}/{s.kd_steps} steps. "
            f"SBDS per row: {sb.steps} steps, lr {sb.lr}, batch {sb.micro_batch} x {sb.seq_len}; "
            f"seeds {list(exp.seeds)} "
            f"(a seed sets the SBDS data order and the ATMN calibration batch; the teacher/SSM are shared). "
            f"Eval: {exp.eval.heldout_tokens} held-out tokens (window {exp.eval.window}); "
            + (f"zero-shot {', '.join(exp.eval.tasks)} at {exp.eval.limit} items each (acc, dev subsets). "
               if exp.eval.limit > 0 and exp.eval.tasks else "zero-shot tasks skipped. ") +
            f"Config `{_rel(cfg_path)}`; wall time of this invocation {wall_s / 60:.1f} min (cached runs are restored, "
            f"not retrained: see the SBDS s/run column and experiments/README.md for the first-run times) "
            f"(setup when first built: {sum(setup.timings.values()):.0f}s).")


def _rel(path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


# ----------------------------------------------------------------------------- CLI helpers

def base_argparser(prog: str, default_cfg: str, doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=doc)
    ap.add_argument("--config", default=str(ROOT / "configs" / default_cfg), help="experiment TOML")
    ap.add_argument("--seeds", default="", help="comma-separated seeds (override the config)")
    ap.add_argument("--steps", type=int, default=0, help="SBDS steps per run (override)")
    ap.add_argument("--limit", type=int, default=-1, help="zero-shot items per task (override; 0 skips)")
    ap.add_argument("--max-variants", type=int, default=0, help="run only the first N variants (smoke tests)")
    ap.add_argument("--only", default="", help="run only these variants (names, separated by ';')")
    ap.add_argument("--runs-dir", default=str(DEFAULT_RUNS), help="cache of setups and runs")
    ap.add_argument("--results-dir", default=str(RESULTS), help="where the table (.md/.json) and plot go")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny everything (a 2-layer d64 teacher, a few steps, 2 items of one task): tests only")
    return ap


def config_from_args(a: argparse.Namespace) -> ExperimentConfig:
    exp = load_experiment(a.config)
    if a.smoke:
        exp = dataclasses.replace(
            exp, setup=dataclasses.replace(exp.setup, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                                           d_ff=64, max_seq_len=256, data="", seq_len=32, micro_batch=2,
                                           pretrain_steps=2, orient_steps=1, align_steps=1, kd_steps=1),
            sbds=dataclasses.replace(exp.sbds, steps=1, micro_batch=2, seq_len=32),
            eval=dataclasses.replace(exp.eval, heldout_tokens=64, window=32, tasks=("piqa",), limit=2, mc_max_len=256),
            seeds=exp.seeds[:1])
    if a.seeds:
        exp = dataclasses.replace(exp, seeds=tuple(int(s) for s in a.seeds.split(",")))
    if a.steps > 0:
        exp = dataclasses.replace(exp, sbds=dataclasses.replace(exp.sbds, steps=a.steps))
    if a.limit >= 0:
        exp = dataclasses.replace(exp, eval=dataclasses.replace(exp.eval, limit=a.limit))
    if a.only:
        names = [n.strip() for n in a.only.split(";") if n.strip()]
        known = [v.name for v in exp.variants]
        if any(n not in known for n in names):
            raise ConfigError(f"--only: unknown variants {[n for n in names if n not in known]}; known: {known}")
        exp = dataclasses.replace(exp, variants=tuple(v for v in exp.variants if v.name in names))
    if a.max_variants > 0:
        exp = dataclasses.replace(exp, variants=exp.variants[:a.max_variants])
    return dataclasses.replace(exp, runs_dir=a.runs_dir)


def run_from_cli(name: str, doc: str, argv=None):
    """experiments/<name>.py's standard flags parsed and its variants run (cached runs restored):
    (args, experiment config, setup, results, wall seconds)."""
    a = base_argparser(name, f"{name}.toml", doc.split("\n\n")[0]).parse_args(argv)
    exp = config_from_args(a)
    t0 = time.time()
    setup, res = run_experiment(exp)
    return a, exp, setup, res, time.time() - t0


FIDELITY_BARS = [("agreement w/ SSM", "agreement", 1.0), ("KL to SSM", "kl", 1.0), ("held-out ppl", "ppl", 1.0),
                 ("zero-shot acc (%)", "acc_avg", 100.0)]


def ordering_report(a, exp, setup, res: dict, wall: float, *, stem: str, title: str, intro: str, table: str,
                    orderings: str, pairs: list, paper: dict, bars: Sequence[tuple], plot_title: str) -> str:
    """The markdown of an experiment that compares rows pairwise with the paper (table, orderings,
    provenance), written with its JSON and bar plot into a.results_dir; returns the markdown."""
    md = "\n".join([f"# {title}", "", intro, "", table, "", f"## {orderings}", "",
                     ordering_section(res, pairs, paper), "", provenance(exp, setup, wall, a.config), ""])
    d = write_outputs(a.results_dir, stem, md, {"results": res, "paper": paper, "wall_s": wall})
    bar_plot(res, bars, d / f"{stem}.png", plot_title)
    return md


def write_outputs(results_dir: str, stem: str, md: str, payload: dict) -> Path:
    d = Path(results_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{stem}.md").write_text(md)
    (d / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=float))
    return d


def bar_plot(results: dict, metrics: Sequence[tuple], path: Path, title: str, labels: Optional[list] = None) -> None:
    """One panel per (label, key, scale) metric: mean over seeds with ±std error bars."""
    import matplotlib  # late import: matplotlib is slow to import and only needed for the plots
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # late import: matplotlib is slow to import and only needed for the plots
    names = list(results)
    labels = labels or names
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.3 * len(metrics), 3.6), squeeze=False)
    for ax, (lab, key, scale) in zip(axes[0], metrics):
        ms = [aggregate(results[n], key) for n in names]
        ax.bar(range(len(names)), [m[0] * scale for m in ms], yerr=[m[1] * scale for m in ms], capsize=3,
               color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(lab, fontsize=9)
        ok = [m for m in ms if not math.isnan(m[0])]
        if ok and key != "acc_avg":  # zoom on the differences (acc keeps its zero baseline)
            lo, hi = min(m[0] for m in ok) * scale, max(m[0] for m in ok) * scale
            err = max(m[1] for m in ok) * scale
            pad = 0.15 * (hi - lo) + 1e-9 + err
            ax.set_ylim(max(0.0, lo - pad), hi + pad)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_dense(setup: Setup, ev: EvalConfig, log: Callable = print) -> dict:
    """{"teacher": ..., "dense SSM": ...} metrics (the SSM's agreement/KL are vs the teacher); cached."""
    path = setup.dir / f"dense-metrics-{_key(ev)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    out = {}
    for name, m, ref in (("teacher", setup.teacher, None), ("dense SSM", setup.ssm, setup.teacher)):
        t = time.time()
        out[name] = dict(evaluate_model(m, setup, ev, reference=ref), seed=setup.cfg.seed, train_s=0.0,
                         eval_s=time.time() - t)
        log(f"  {name}: ppl {out[name]['ppl']:.3f}  acc {out[name].get('acc_avg', float('nan')):.3f}")
    path.write_text(json.dumps(out, indent=1, default=float))
    return out


def compare(results: dict, a: str, b: str, key: str, higher_is_better: bool, digits: int = 3) -> tuple[str, bool, bool]:
    """(text, b better than a, difference beyond the seed spread) for one metric: the mean change
    from row a to row b against sqrt(std_a^2 + std_b^2)."""
    ma, sa, _ = aggregate(results[a], key)
    mb, sb, _ = aggregate(results[b], key)
    d = mb - ma
    spread = math.sqrt(sa ** 2 + sb ** 2)
    if key == "acc_avg":
        # every seed scores the same few items: add their sampling stderr, which the seed std misses
        se = [aggregate(results[n], "acc_avg_stderr")[0] for n in (a, b)]
        spread = math.sqrt(spread ** 2 + sum(x ** 2 for x in se if not math.isnan(x)))
    better = (d > 0) == higher_is_better and d != 0
    beyond = abs(d) > spread
    txt = (f"{key}: {ma:.{digits}f} -> {mb:.{digits}f} ({'better' if better else 'worse'}, "
           f"|diff| {abs(d):.{digits}f} {'>' if beyond else '<='} spread {spread:.{digits}f})")
    return txt, better, beyond


KEY_METRICS = (("agreement", True, 3), ("kl", False, 4), ("ppl", False, 3), ("acc_avg", True, 3))


def ordering_section(results: dict, pairs: Sequence[tuple], paper: dict) -> str:
    """Markdown: for each (a, b) step, does b beat a on each key metric (and beyond the spread),
    next to what the paper reports (its zero-shot avg)."""
    lines = []
    for a, b in pairs:
        pa, pb = paper.get(a), paper.get(b)
        p = (f"paper {pa} -> {pb} ({'better' if pb > pa else 'worse'})" if pa is not None and pb is not None
             else "paper: -")
        lines.append(f"- **{a} -> {b}** ({p}):")
        for key, hib, dg in KEY_METRICS:
            if aggregate(results[a], key)[2] and aggregate(results[b], key)[2]:
                txt, better, beyond = compare(results, a, b, key, hib, dg)
                lines.append(f"  - {txt}{' **reproduces**' if better and beyond else ''}")
    return "\n".join(lines)
