"""marjax: MAR (Module-aware Architecture Refinement) in JAX.

    import marjax
    m = marjax.load("smollm2-135m-instruct")
    marjax.logits(m, ids); marjax.generate(m, "Once upon a time", max_new_tokens=32)
    marjax.generate(marjax.quantize(m, "int8"), "Once upon a time")   # faster decoding on CPU
    marjax.ssm.ssd(...); marjax.spiking.atmn(...)
    marjax.enable_compile_cache()    # reruns load compiled programs (marjax.app.compile_cache)
"""
from marjax import config
from marjax.api import Model, generate, generate_ids, load, logits, quantize
from marjax.config import PRESETS, ATMNConfig, DistillConfig, ModelConfig, SSMConfig, TrainConfig, preset
from marjax.app.compile_cache import enable as enable_compile_cache   # os/hashlib only until called
from marjax.errors import MarjaxError

__version__ = "0.1.0"


def __getattr__(name):  # submodules with heavier imports load on first use
    import importlib
    if name in ("ssm", "spiking", "io", "distill", "train", "eval", "models", "nn"):
        return importlib.import_module(f"marjax.{name}")
    raise AttributeError(f"module 'marjax' has no attribute {name!r}")
