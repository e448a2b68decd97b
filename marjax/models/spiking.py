"""Stage 2 student: the dense SSM LM with ATMN neurons before four projections per layer
(mixer in_proj, mixer out_proj, MLP gate/up sharing one neuron, MLP down). Built from a dense
SSM checkpoint plus fresh thresholds `a` (constant, or calibrated from activation statistics)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from marjax.config import ATMNConfig, ModelConfig
from marjax.errors import ConfigError
from marjax.models.lm import LMParams, SpikeSites, forward, init_spike_sites
from marjax.spiking import calibrate_a

__all__ = ["spiking_config", "make_spiking_student"]


def spiking_config(dense: ModelConfig, atmn: ATMNConfig) -> ModelConfig:
    if not dense.is_ssm:
        raise ConfigError(f"the spiking student is built on the dense SSM model; {dense.name!r} has mixer "
                          f"{dense.mixer!r} (run stage 1 first)")
    if atmn.granularity == "scalar":
        raise ConfigError("ATMNConfig.granularity='scalar' (one threshold shared by all sites and layers) is not "
                          "supported by the spiking student, whose thresholds are per site and layer; use 'site' "
                          "(one per site and layer) or 'channel'")
    name = dense.name.replace("-ssm", "") + "-spiking"
    return dataclasses.replace(dense, name=name, atmn=atmn.validate()).validate()


def make_spiking_student(dense_params: LMParams, dense_cfg: ModelConfig, atmn: ATMNConfig,
                         calib_ids=None) -> tuple[ModelConfig, LMParams]:
    """(config, params) of the spiking student. With atmn.init == 'stats', `calib_ids` (b, l)
    is run through the dense model and each site's threshold is set from its input statistics."""
    cfg = spiking_config(dense_cfg, atmn)
    sites = jax.vmap(lambda _: init_spike_sites(cfg))(jnp.arange(cfg.n_layers))
    if atmn.init == "stats":
        if calib_ids is None:
            raise ConfigError("ATMNConfig.init='stats' needs a calibration batch (calib_ids)")
        _, aux = forward(dense_params, jnp.asarray(calib_ids), dense_cfg, taps=("site_inputs",), head=False)
        # one calibration per layer (vmapped over the stacked layer axis of the site inputs)
        sites = SpikeSites(**{s: jax.vmap(lambda x: calibrate_a(x, atmn))(aux["site_inputs"][s])
                              for s in atmn.sites})
    blocks = dataclasses.replace(dense_params.blocks, spikes=sites)
    return cfg, dataclasses.replace(dense_params, blocks=blocks)
