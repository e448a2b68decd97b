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
    "SSMConfig", "ATMNConfig", "ModelConfig", "DistillConfig", "TrainConfig", "MeshConfig",
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
    impl: str = "auto"         # reference | chunked | associative | pallas | auto

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
        _require(self.impl in ("reference", "chunked", "associative", "pallas", "auto"),
                 f"SSMConfig.impl must be one of reference/chunked/associative/pallas/auto, got {self.impl!r}")
        return self


SITES = ("in_proj", "out_proj", "mlp_in", "mlp_down")


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
    detach_reset: bool = False       # stop gradients through u_{t-1}
    ternary: bool = True             # False: binary {0, 1} spikes (the paper's baseline)
    sites: tuple = SITES             # which projections get a neuron

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
        bad = [s for s in self.sites if s not in SITES]
        _require(not bad, f"ATMNConfig.sites has unknown sites {bad}; known: {SITES}")
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
    keep: int = 2
    compute_dtype: str = "float32"   # bfloat16: student forward/backward in bf16, f32 master params
    mesh: MeshConfig = field(default_factory=MeshConfig)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(name="tiny", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        head_dim=16, d_ff=128, max_seq_len=512),
    "smollm2-135m": ModelConfig(name="smollm2-135m", vocab_size=49152, d_model=576, n_layers=30, n_heads=9,
                                n_kv_heads=3, head_dim=64, d_ff=1536, rms_eps=1e-5, rope_theta=100000.0,
                                max_seq_len=8192, tie_embeddings=True),
    "llama-3.2-1b": ModelConfig(name="llama-3.2-1b", vocab_size=128256, d_model=2048, n_layers=16, n_heads=32,
                                n_kv_heads=8, head_dim=64, d_ff=8192, rms_eps=1e-5, rope_theta=500000.0,
                                max_seq_len=131072, tie_embeddings=True),
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
        d["atmn"] = ATMNConfig(**a)
    return ModelConfig(**d).validate()
