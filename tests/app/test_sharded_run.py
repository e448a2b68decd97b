"""`marjax distill` on a mesh of 8 simulated CPU devices loads the teacher (a GGUF file) and the
previous stage's student (a marjax run directory) straight into the train step's shardings:
each leaf is created in its target sharding, no full array of a split leaf is ever handed to
jax.device_put, and the stage runs. On one device the plain loader is used."""
import json
from pathlib import Path

from simulated_devices import run_on_devices

_SCRIPT = r'''
import json, sys
import jax, numpy as np
from marjax.app import commands, runner
import optax
from marjax.config import MeshConfig, TrainConfig, preset
from marjax.io import save_gguf
from marjax.io.tokenizer import ByteTokenizer
from marjax.models.lm import init_params
from marjax.train.checkpoint import Checkpointer, make_meta
from marjax.train.mesh import make_mesh, param_shardings
from marjax.train.state import TrainState

tmp = sys.argv[1]
assert len(jax.devices()) == 8
tiny = preset("tiny")
save_gguf(f"{tmp}/teacher.gguf", tiny, init_params(jax.random.PRNGKey(1), tiny), ByteTokenizer(), qtype="F32")
# the previous stage's output: a marjax run directory holding a tiny dense SSM
tssm = preset("tiny-ssm")
p_ssm = init_params(jax.random.PRNGKey(2), tssm)
with Checkpointer(f"{tmp}/orient", keep=1, async_save=False) as ck:
    ck.save(1, TrainState(step=jax.numpy.int32(1), params=p_ssm, opt_state=optax.adam(1e-3).init(p_ssm),
                          rng=jax.random.PRNGKey(0)), {}, make_meta("orient", tssm, tokenizer_source="tiny"))

loads, puts = [], []
orig_load, orig_put = runner.load_on_mesh, jax.device_put
def load_spy(path, mesh, *a, **k):
    puts.clear()
    cfg, params, tok = orig_load(path, mesh, *a, **k)
    target = param_shardings(params, mesh)
    wrong, split, full_shapes = [], 0, set()
    for (p, x), t in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(target)):
        if not x.sharding.is_equivalent_to(t, x.ndim):
            wrong.append(jax.tree_util.keystr(p))
        if t.shard_shape(x.shape) != x.shape:
            split += 1
            full_shapes.add(x.shape)
    loads.append({"path": str(path), "mesh": dict(mesh.shape), "wrong": wrong, "split": split,
                  "full_puts": sorted(set(puts) & full_shapes)})
    return cfg, params, tok
def put_spy(x, *a, **k):
    puts.extend(tuple(np.shape(v)) for v in jax.tree.leaves(x) if hasattr(v, "shape"))
    return orig_put(x, *a, **k)
runner.load_on_mesh, jax.device_put = load_spy, put_spy

common = [f"run.teacher={tmp}/teacher.gguf", "train.steps=1", "train.seq_len=16", "train.micro_batch=8",
          "train.batch_tokens=128", "train.mesh.fsdp=2", "train.mesh.tensor=2", "train.log_every=1"]
assert commands.distill_main(["--stage", "align", f"run.out={tmp}/align", f"run.student={tmp}/orient", *common]) == 0
# one device: the plain loader
runner.load_on_mesh = lambda *a, **k: (_ for _ in ()).throw(AssertionError("load_on_mesh on one device"))
one = runner.load_for_run(f"{tmp}/teacher.gguf", TrainConfig(mesh=MeshConfig(data=1)))
assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(one.params))
print("RESULT" + json.dumps(loads))
'''


def test_distill_loads_teacher_and_student_sharded_on_8_devices(tmp_path):
    r = run_on_devices(["-c", _SCRIPT, tmp_path], tmp_path)
    loads = json.loads(r.stdout.split("RESULT", 1)[1])
    # align: the teacher (GGUF) and the student (the orient run dir, Orbax)
    assert [Path(x["path"]).name for x in loads] == ["teacher.gguf", "orient"], loads
    for rec in loads:
        assert rec["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}, rec
        assert rec["wrong"] == [], rec                 # every leaf in the train step's sharding
        assert rec["split"] >= 5, rec                  # most weights really are split, not replicated
        assert rec["full_puts"] == [], rec             # no full copy of a split leaf was put on a device
