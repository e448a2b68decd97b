"""Frozen, hashable configs (static under jit) and named presets.

Every config is a frozen dataclass so it can be passed as a static argument and used as a
dict key. `replace(cfg, field=value)` (dataclasses.replace) derives variants.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Optional

from marjax.errors import ConfigError

__all__ = [
    "SSMConfig", "ATMNConfig", "RopeScaling", "ModelConfig", "DistillConfig", "TrainConfig", "MeshConfig",
    "PRESETS", "preset", "replace", "ConfigError",
]


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class SSMConfig:
    """Discrete Mamba-2 mixer (MAR_SPEC.md section 2)."""
    n_heads: int = 4           # H (value heads; B/C are per head too)
    head_dim: int = 16         # P; d_inner = H * P
    state_dim: int = 16        # N
    conv_kernel: int = 4
    chunk_size: int = 64
    impl: str = "auto"         # reference | chunked | chunk_scan | associative | hybrid | pallas | native | auto

    @property
    def d_inner(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def conv_dim(self) -> int:  # channels of xBC that go through the depthwise conv
        return self.d_inner + 2 * self.n_heads * self.state_dim

    def validate(self) -> "SSMConfig":
        for name in ("n_heads", "head_dim", "state_dim", "conv_kernel", "chunk_size"):
            _require(getattr(self, name) > 0, f"SSMConfig.{name} must be > 0, got {getattr(self, name)}")
        _require(self.chunk_size & (self.chunk_size - 1) == 0,
                 f"SSMConfig.chunk_size must be a power of two, got {self.chunk_size}")
        _require(self.impl in ("reference", "chunked", "chunk_scan", "associative", "hybrid", "pallas", "native", "auto"),
                 f"SSMConfig.impl must be one of reference/chunked/chunk_scan/associative/hybrid/pallas/native/auto, "
                 f"got {self.impl!r}")
        return self


SITES = ("in_proj", "out_proj", "mlp_in", "mlp_down")
RESET_GRADS = ("full", "membrane", "detach")


@dataclass(frozen=True)
class ATMNConfig:
    """Adaptive Ternary Multi-step Neuron (MAR_SPEC.md section 3)."""
    T: int = 4
    tau: float = 1.0                 # experiments/results/atmn_sweep.md: tau 1 beat 0.5 and 2 (3 seeds)
    surrogate: str = "rectangular"   # rectangular | triangular | sigmoid | straight_through
    width: float = 1.0               # surrogate support, in units of V
    readout: str = "ones"            # ones | tau_pow  (c_t = 1 or tau^t)
    granularity: str = "channel"     # channel | site | scalar
    init: str = "constant"           # constant | stats
    init_value: float = 0.0          # a = init_value  ->  V = exp(a)
    # gradient path through the membrane between micro-steps (u_{t-1} -> h_t):
    #   full      u = h - s V with the surrogate on s: factors (1 - V ds/dh) compound over steps
    #   membrane  u = h - stop_gradient(s) V: d h_{t+1} / d h_t = 1 / tau, no compounding
    #   detach    stop_gradient(u): only the t = 0 surrogate reaches x
    reset_grad: str = "membrane"
    quantizer: str = "floor"         # floor: fire at h >= V; round: fire at h >= V/2 (round to nearest)
    calib_rate_weight: float = 0.0   # calibration objective nmse + w * spikes per element (rate-aware)
    # largest calibration threshold candidate, in units of the channel's mean |x|. 4 clips the rare
    # massive activations (1e2-1e3x the mean) that a pretrained LM builds on its first tokens; a
    # larger range keeps them but ended worse in every pipeline run measured (experiments/README.md,
    # "The SBDS gradient explosion"), so 4 stays the default
    calib_max_ratio: float = 4.0
    ternary: bool = True             # False: binary {0, 1} spikes (the paper's baseline)
    sites: tuple = SITES             # which projections get a neuron

    @property
    def fire_frac(self) -> float:
        """Firing threshold in units of V (the reset always subtracts V)."""
        return 0.5 if self.quantizer == "round" else 1.0

    def validate(self) -> "ATMNConfig":
        _require(self.T >= 1, f"ATMNConfig.T must be >= 1, got {self.T}")
        _require(self.tau > 0, f"ATMNConfig.tau must be > 0, got {self.tau}")
        _require(self.width > 0, f"ATMNConfig.width must be > 0, got {self.width}")
        _require(self.surrogate in ("rectangular", "triangular", "sigmoid", "straight_through"),
                 f"ATMNConfig.surrogate unknown: {self.surrogate!r}")
        _require(self.readout in ("ones", "tau_pow"), f"ATMNConfig.readout unknown: {self.readout!r}")
        _require(self.granularity in ("channel", "site", "scalar"),
                 f"ATMNConfig.granularity unknown: {self.granularity!r}")
        _require(self.init in ("constant", "stats"), f"ATMNConfig.init unknown: {self.init!r}")
        _require(self.reset_grad in RESET_GRADS,
                 f"ATMNConfig.reset_grad must be one of {RESET_GRADS}, got {self.reset_grad!r}")
        _require(self.quantizer in ("floor", "round"),
                 f"ATMNConfig.quantizer must be 'floor' or 'round', got {self.quantizer!r}")
        _require(self.calib_rate_weight >= 0,
                 f"ATMNConfig.calib_rate_weight must be >= 0, got {self.calib_rate_weight}")
        _require(self.calib_max_ratio >= 1,
                 f"ATMNConfig.calib_max_ratio must be >= 1, got {self.calib_max_ratio}")
        bad = [s for s in self.sites if s not in SITES]
        _require(not bad, f"ATMNConfig.sites has unknown sites {bad}; known: {SITES}")
        return self


ROPE_TYPES = ("llama3", "linear", "freq_factors")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as transformers' `rope_scaling` (marjax.nn.layers.rope_inv_freq):
    llama3 (Llama 3.1/3.2): wavelengths above original_max_position_embeddings / low_freq_factor
    are stretched by `factor`, those below .../high_freq_factor kept, a smooth ramp between;
    linear: every frequency divided by `factor`; freq_factors: per-frequency divisors (GGUF's
    rope_freqs tensor, head_dim // 2 of them) when a GGUF's factors match no named type."""
    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    freq_factors: tuple = ()

    def validate(self, head_dim: Optional[int] = None) -> "RopeScaling":
        _require(self.rope_type in ROPE_TYPES,
                 f"RopeScaling.rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        _require(self.factor > 0, f"RopeScaling.factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3":
            _require(0 < self.low_freq_factor < self.high_freq_factor,
                     f"RopeScaling needs 0 < low_freq_factor < high_freq_factor, got {self.low_freq_factor} "
                     f"and {self.high_freq_factor}")
            _require(self.original_max_position_embeddings > 0, "RopeScaling.original_max_position_embeddings "
                     f"must be > 0, got {self.original_max_position_embeddings}")
        if self.rope_type == "freq_factors":
            _require(isinstance(self.freq_factors, tuple) and all(f > 0 for f in self.freq_factors),
                     f"RopeScaling.freq_factors must be a tuple of positive floats, got {self.freq_factors!r}")
            _require(head_dim is None or len(self.freq_factors) == head_dim // 2,
                     f"RopeScaling.freq_factors needs head_dim // 2 = {None if head_dim is None else head_dim // 2} "
                     f"values, got {len(self.freq_factors)}")
        else:
            _require(self.freq_factors == (), f"RopeScaling.freq_factors is only for rope_type 'freq_factors', "
                     f"got {len(self.freq_factors)} values with rope_type {self.rope_type!r}")
        return self


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-skeleton LM; `mixer` picks attention (the teacher) or the SSM (stage 1)."""
    name: str = "custom"
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    d_ff: int = 128
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_layout: str = "half"        # half: HF rotate-half; pairs: GGUF/llama.cpp adjacent pairs
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    mixer: str = "attention"         # attention | ssm
    ssm: Optional[SSMConfig] = None
    atmn: Optional[ATMNConfig] = None  # set: a spiking student (stage 2)
    dtype: str = "float32"           # activation/param dtype; accumulations stay float32
    rope_scaling: Optional[RopeScaling] = None   # None: plain RoPE

    @property
    def is_ssm(self) -> bool:
        return self.mixer == "ssm"

    @property
    def is_spiking(self) -> bool:
        return self.atmn is not None

    def validate(self) -> "ModelConfig":
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "d_ff", "max_seq_len"):
            _require(getattr(self, name) > 0, f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
        _require(self.n_heads % self.n_kv_heads == 0,
                 f"ModelConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        _require(self.head_dim % 2 == 0, f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        _require(self.rope_layout in ("half", "pairs"),
                 f"ModelConfig.rope_layout must be 'half' or 'pairs', got {self.rope_layout!r}")
        _require(self.mixer in ("attention", "ssm"), f"ModelConfig.mixer must be attention|ssm, got {self.mixer!r}")
        _require(self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling),
                 f"ModelConfig.rope_scaling must be a RopeScaling or None, got {type(self.rope_scaling).__name__}")
        if self.rope_scaling is not None:
            self.rope_scaling.validate(self.head_dim)
        _require(self.dtype in ("float32", "bfloat16"), f"ModelConfig.dtype must be float32|bfloat16, got {self.dtype!r}")
        if self.is_ssm:
            _require(self.ssm is not None, "ModelConfig.mixer='ssm' needs ModelConfig.ssm")
            self.ssm.validate()
        _require(not (self.atmn is not None and not self.is_ssm),
                 "ModelConfig.atmn (spiking) is defined on the SSM model; set mixer='ssm'")
        if self.atmn is not None:
            self.atmn.validate()
        return self


def ssm_from_attention(cfg: ModelConfig, **ssm_overrides) -> ModelConfig:
    """The stage-1 student shape for an attention config: one SSM head per query head,
    head dim and state size = attention head dim (so x <- W_V, B <- W_K, C <- W_Q fit)."""
    ssm = SSMConfig(n_heads=cfg.n_heads, head_dim=cfg.head_dim, state_dim=cfg.head_dim)
    ssm = replace(ssm, **ssm_overrides)
    return replace(cfg, name=cfg.name + "-ssm", mixer="ssm", ssm=ssm).validate()


@dataclass(frozen=True)
class DistillConfig:
    """Loss weights for MOHAWK stages and SBDS (MAR_SPEC.md sections 2 and 4)."""
    stage: str = "sbds"              # orient | align | kd | sbds
    alpha: float = 0.2               # forward KL(p||q) weight
    beta: float = 0.7                # reverse KL(q||p) weight
    temperature: float = 1.0
    feature_weight: float = 1.0      # weight of L2 relative to L1
    feature: str = "prenorm"         # prenorm | postnorm | both | none
    feature_norm: str = "relative"   # relative: ||f_t - f_s|| / ||f_t|| ; absolute: the paper's plain L2
    ce_weight: float = 0.0           # optional hard-label CE
    kl_chunk: int = 128              # sequence chunk for the KL (never full b x l x V twice)
    trainable: str = "all"           # all | mixer (MOHAWK freezes MLPs in steps 1-2) | atmn
    # firing-rate term (sbds): rate_weight * sum_sites w_site * relu(rate_site - rate_target),
    # rate = non-zero spikes per element per micro-step (padding masked), w_site = the site's
    # share of the spiking projections' fan-out (so the term follows the AC energy)
    rate_weight: float = 0.0
    rate_target: float = 0.0
    # sbds: cap each token's gradient at every block input of the student at this many times the
    # median token's (0 = off); experiments/README.md, "The SBDS gradient explosion"
    token_grad_clip: float = 0.0

    def validate(self) -> "DistillConfig":
        _require(self.stage in ("orient", "align", "kd", "sbds"), f"DistillConfig.stage unknown: {self.stage!r}")
        _require(self.alpha >= 0 and self.beta >= 0 and self.alpha + self.beta > 0,
                 f"DistillConfig.alpha/beta must be >= 0 and not both 0, got {self.alpha}/{self.beta}")
        _require(self.temperature > 0, f"DistillConfig.temperature must be > 0, got {self.temperature}")
        _require(self.feature in ("prenorm", "postnorm", "both", "none"),
                 f"DistillConfig.feature unknown: {self.feature!r}")
        _require(self.feature_norm in ("relative", "absolute"),
                 f"DistillConfig.feature_norm must be relative|absolute, got {self.feature_norm!r}")
        _require(self.trainable in ("all", "mixer", "atmn"), f"DistillConfig.trainable unknown: {self.trainable!r}")
        _require(self.rate_weight >= 0, f"DistillConfig.rate_weight must be >= 0, got {self.rate_weight}")
        _require(self.token_grad_clip == 0 or self.token_grad_clip >= 1,
                 f"DistillConfig.token_grad_clip must be 0 (off) or >= 1, got {self.token_grad_clip}")
        _require(0 <= self.rate_target <= 1, f"DistillConfig.rate_target must be in [0, 1], got {self.rate_target}")
        return self


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1                   # -1: all remaining devices
    fsdp: int = 1
    tensor: int = 1


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    seq_len: int = 128
    batch_tokens: int = 2048         # tokens per optimizer update (across accumulation)
    micro_batch: int = 8             # sequences per forward
    lr: float = 1e-3
    warmup: int = 10
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    seed: int = 0
    log_every: int = 10
    save_every: int = 50
    save_interval_s: float = 0.0     # a save_every step saves only when this many seconds of training passed
                                     # since the last save (or the start): a run of short stages is not
                                     # paced by its disk (a SmolLM2 kd state is 1.7 GB, 10-20 s to write
                                     # on the CPU VM). The last step always saves. 0: every save_every step
    final_opt_state: bool = True     # the last step's checkpoint holds the optimizer state (what continuing
                                     # the run past its last step needs); False: params, step, rng and data
                                     # position only (a third of an Adam state's bytes), for a run that ends
                                     # there: the pipeline's stages (each next one starts a fresh optimizer).
                                     # Resuming such a run to a larger steps is refused
    keep: int = 2
    compute_dtype: str = "float32"   # bfloat16: student forward/backward in bf16, f32 master params
    mesh: MeshConfig = field(default_factory=MeshConfig)
    nonfinite: str = "stop"          # a NaN/inf loss, gradient or update: "stop" (raise, last good checkpoint
                                     # kept) or "skip" (drop that update, log it, go on)
    max_skips: int = 10              # "skip": this many non-finite updates in a row stop the run anyway
    optimizer: str = "fused"         # fused: marjax.train.optim.fused_adamw; optax: the optax chain it replaces
                                     # (same formulas, other float rounding: the experiment tables pin it)
    layer_layout: str = "stacked"    # stacked: the student's layers under lax.scan; unrolled:
                                     # trained as a tuple of layers (marjax.models.lm.unroll_layers), no scan
                                     # in the step (faster on CPU, longer compile; returned stacked)
    teacher_layout: str = "auto"     # an LMParams teacher in the step: unrolled (forward only, so the compile
                                     # cost is small; spares XLA:CPU the scan's per-layer weight copies),
                                     # stacked (under lax.scan) or auto (unrolled on CPU, stacked on TPU and
                                     # GPU); the same outputs up to float rounding
    dispatch_ahead: str = "auto"     # on: the loop dispatches update s+1 before reading update s's results (no
                                     # host sync between updates); off: it reads them at once; auto: on for
                                     # TPU and GPU, off on CPU, where XLA:CPU allocates the queued update's
                                     # temporaries while the running one holds its own (1.6-4.7 GB more peak
                                     # RSS in the SmolLM2 kd stage) to save 3 ms of a 3.9 s step. Same results


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(name="tiny", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        head_dim=16, d_ff=128, max_seq_len=512),
    "smollm2-135m": ModelConfig(name="smollm2-135m", vocab_size=49152, d_model=576, n_layers=30, n_heads=9,
                                n_kv_heads=3, head_dim=64, d_ff=1536, rms_eps=1e-5, rope_theta=100000.0,
                                max_seq_len=8192, tie_embeddings=True),
    "llama-3.2-1b": ModelConfig(name="llama-3.2-1b", vocab_size=128256, d_model=2048, n_layers=16, n_heads=32,
                                n_kv_heads=8, head_dim=64, d_ff=8192, rms_eps=1e-5, rope_theta=500000.0,
                                max_seq_len=131072, tie_embeddings=True,
                                rope_scaling=RopeScaling("llama3", factor=32.0, low_freq_factor=1.0,
                                                         high_freq_factor=4.0,
                                                         original_max_position_embeddings=8192)),
    "llamba-1b": ModelConfig(name="llamba-1b", vocab_size=128256, d_model=2048, n_layers=16, n_heads=32,
                             n_kv_heads=32, head_dim=64, d_ff=8192, rms_eps=1e-5, max_seq_len=131072,
                             tie_embeddings=True, mixer="ssm",
                             ssm=SSMConfig(n_heads=32, head_dim=64, state_dim=64, chunk_size=128)),
}
PRESETS["tiny-ssm"] = ssm_from_attention(PRESETS["tiny"])
PRESETS["smollm2-135m-ssm"] = replace(ssm_from_attention(PRESETS["smollm2-135m"], chunk_size=128),
                                      name="smollm2-135m-ssm")
PRESETS["tiny-spiking"] = replace(PRESETS["tiny-ssm"], name="tiny-spiking", atmn=ATMNConfig())


def preset(name: str) -> ModelConfig:
    """A named preset (no weights needed)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name].validate()


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def model_config_from_dict(d: dict) -> ModelConfig:
    d = dict(d)
    if d.get("ssm") is not None:
        d["ssm"] = SSMConfig(**d["ssm"])
    if d.get("atmn") is not None:
        a = dict(d["atmn"])
        a["sites"] = tuple(a.get("sites", SITES))
        if "detach_reset" in a:   # configs written before reset_grad (a bool then)
            a.setdefault("reset_grad", "detach" if a.pop("detach_reset") else "full")
        d["atmn"] = ATMNConfig(**a)
    if d.get("rope_scaling") is not None:
        r = dict(d["rope_scaling"])
        r["freq_factors"] = tuple(float(f) for f in r.get("freq_factors", ()))
        d["rope_scaling"] = RopeScaling(**r)
    return ModelConfig(**d).validate()
