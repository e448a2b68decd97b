"""An independent numpy dequantiser for marjax.models.quant.QWeight: the oracle of the quantiser
tests (tests/models/test_quant.py) and of the CPU kernels (tests/models/test_cpu_kernels.py)."""
import numpy as np


def np_dequantize(x, dtype=np.float32) -> np.ndarray:
    """data (..., out, in) times its group's scale (q4: byte j of a group = q_j | q_(j+16) << 4,
    times scale plus zero), computed in `dtype`, transposed back to the model's (..., in, out)
    when `transposed`."""
    w = np.asarray(x.data, dtype)
    if x.zero is not None:
        b = np.asarray(x.data).astype(np.int32)
        *lead, o, half = b.shape
        g = b.reshape(*lead, o, half // 16, 16)
        q = np.concatenate([g % 16, g // 16], axis=-1).reshape(*lead, o, 2 * half).astype(dtype)
        rep = lambda a: np.repeat(np.asarray(a, dtype)[..., 0], 32, axis=-1)   # noqa: E731
        w = q * rep(x.scale) + rep(x.zero)
    elif x.scale is not None:
        sc = np.asarray(x.scale, dtype)                      # (..., out, n_groups, 1)
        w = w * np.repeat(sc[..., 0], w.shape[-1] // sc.shape[-2], axis=-1)
    return np.swapaxes(w, -1, -2) if x.transposed else w
