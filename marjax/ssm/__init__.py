"""The SSD scan op: `ssd` (reference | chunked | associative | hybrid | pallas | auto), the decode
step `ssd_step`, the mixing matrix `materialize_mixer` and the chunk-size helper `effective_chunk`."""
from marjax.ssm.api import (AUTO_TABLE, DEFAULT_CHUNK, IMPL_FNS, IMPLS, Impl, auto_choice, effective_chunk,
                            materialize_mixer, resolve_impl, ssd, ssd_step)

__all__ = ["ssd", "ssd_step", "materialize_mixer", "effective_chunk", "resolve_impl", "Impl", "IMPLS", "IMPL_FNS",
           "AUTO_TABLE", "auto_choice", "DEFAULT_CHUNK"]
