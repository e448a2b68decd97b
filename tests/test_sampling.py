"""marjax.sampling.decode's loops: the greedy one (argmax on the device, one step in flight) stops
exactly where the host loop does, streams every token once, and agrees with a plain host-side
argmax loop; the sampling loop honours stop ids too."""
import warnings

import jax.numpy as jnp
import numpy as np

from marjax.api import load
from marjax.models import lm
from marjax.sampling import decode


def _tiny():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # the preset's weights are random
        return load("tiny")


def _host_greedy(m, prompt, n):
    """n greedy tokens by re-running the full forward on the whole prefix (no cache, host argmax)."""
    ids = list(prompt)
    for _ in range(n):
        lg, _ = lm.forward(m.params, jnp.asarray([ids], jnp.int32), m.config)
        ids.append(int(np.argmax(np.asarray(lg[0, -1]))))
    return ids[len(prompt):]


def test_greedy_matches_host_loop_and_stops_at_a_stop_id():
    m = _tiny()
    prompt = [5, 17, 42]
    want = _host_greedy(m, prompt, 12)
    assert decode(m.params, m.config, prompt, 12) == want
    assert decode(m.params, m.config, prompt, 1) == want[:1]
    assert decode(m.params, m.config, prompt, 0) == []
    # a stop id mid-way: returned, then nothing more (the step already in flight is dropped)
    stop = want[4]
    first = want.index(stop)
    seen = []
    got = decode(m.params, m.config, prompt, 12, stop_ids=[stop], on_token=seen.append)
    assert got == want[:first + 1] and seen == got


def test_sampling_loop_stops_and_streams():
    m = _tiny()
    prompt = [5, 17, 42]
    full = decode(m.params, m.config, prompt, 10, temperature=0.8, seed=3)
    assert len(full) == 10
    assert decode(m.params, m.config, prompt, 10, temperature=0.8, seed=3) == full      # seeded
    seen = []
    got = decode(m.params, m.config, prompt, 10, temperature=0.8, seed=3, stop_ids=[full[3]], on_token=seen.append)
    assert got == full[:full.index(full[3]) + 1] and seen == got
