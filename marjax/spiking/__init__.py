"""ATMN spiking neurons (MAR_SPEC.md section 3): ternary multi-step spikes, differentiable
decoded output with surrogate gradients, firing-rate statistics and threshold calibration.

    s = atmn_spikes(x, threshold, T=4, tau=2.0)     # int8 (T, *x.shape) in {-1, 0, 1}
    y = atmn(x, params, cfg)                        # decoded sum_t c_t V s_t, differentiable
    y, stats = atmn_with_stats(x, params, cfg)      # + {"nonzero"|"pos"|"neg": (T,)}
"""
from marjax.spiking.neuron import (ATMNParams, atmn, atmn_decode, atmn_spikes, atmn_with_stats, calibrate_a,
                                   init_atmn, readout_coeffs)
from marjax.spiking.surrogates import SURROGATES, step_grads

__all__ = ["ATMNParams", "atmn", "atmn_spikes", "atmn_with_stats", "atmn_decode", "calibrate_a", "init_atmn",
           "readout_coeffs", "SURROGATES", "step_grads"]
