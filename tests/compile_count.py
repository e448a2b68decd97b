"""Count XLA backend compiles (jax.monitoring's compile-duration event) inside a `with` block: what
the eager-call tests check (a repeated call must not compile again)."""
import contextlib

import jax.monitoring

_EVENT = "/jax/core/compile/backend_compile_duration"
_active: list = []


def _listener(name, secs, **kw):
    if name == _EVENT:
        for box in _active:
            box[0] += 1


jax.monitoring.register_event_duration_secs_listener(_listener)


@contextlib.contextmanager
def count_compiles():
    """`with count_compiles() as n: ...`, then n[0] is the number of compiles in the block."""
    box = [0]
    _active.append(box)
    try:
        yield box
    finally:
        _active.remove(box)
