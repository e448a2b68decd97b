"""Version safety: a checkpoint whose saved model_config has a field added, renamed or removed
relative to this version's ModelConfig (nested SSM/ATMN configs included), and a run config with
an unknown key, fail with messages that name the field, before any shape is built."""
import json
import shutil

import jax
import pytest

from marjax.app.runner import load_run_config
from marjax.config import MeshConfig, TrainConfig, preset
from marjax.errors import CheckpointError, ConfigError
from marjax.models.lm import init_params
from marjax.train.checkpoint import Checkpointer, check_compatible, load_model_dir, make_meta
from marjax.train.mesh import make_mesh, shard_params
from marjax.train.optim import make_optimizer
from marjax.train.state import init_state

CFG = preset("tiny-spiking")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    mesh = make_mesh(MeshConfig())
    p = shard_params(init_params(jax.random.PRNGKey(0), CFG), mesh)
    d = tmp_path_factory.mktemp("ver") / "run"
    with Checkpointer(d) as ck:
        ck.save(1, init_state(p, make_optimizer(TrainConfig(), p), 0, mesh), None, make_meta("sbds", CFG))
    assert load_model_dir(d)[0] == CFG
    return d


def _edit(run_dir, tmp_path, edit):
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    for f in (d / "marjax_checkpoint.json", d / "1" / "meta" / "metadata"):
        meta = json.loads(f.read_text())
        edit(meta["model_config"])
        f.write_text(json.dumps(meta))
    return d


def _rename(d, old, new):
    d[new] = d.pop(old)


@pytest.mark.parametrize("edit,field", [
    (lambda m: m.update(n_experts=4), r"model_config\.n_experts: unknown"),                     # added
    (lambda m: _rename(m, "d_ff", "ffn_dim"), r"model_config\.ffn_dim: unknown.*model_config\.d_ff: missing"),
    (lambda m: m.pop("head_dim"), r"model_config\.head_dim: missing"),                          # removed
    (lambda m: m["ssm"].pop("state_dim"), r"model_config\.ssm\.state_dim: missing"),            # nested
    (lambda m: _rename(m["atmn"], "tau", "time_constant"), r"model_config\.atmn\.time_constant: unknown"),
])
def test_checkpoint_from_another_config_version_names_the_field(run_dir, tmp_path, edit, field):
    d = _edit(run_dir, tmp_path, edit)
    with pytest.raises(CheckpointError, match=field):
        load_model_dir(d)
    with Checkpointer(d, read_only=True) as ck:          # resume: the same check, same message
        meta = ck.restore_meta()
    with pytest.raises(CheckpointError, match=field):
        check_compatible(meta, expected_stage="sbds", expected_model=CFG)


def test_run_config_with_an_unknown_or_renamed_key(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text("[train]\nsteps = 3\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'.*'lr'"):
        load_run_config(str(p))
    p.write_text("[train]\nnonfinite = 'skip'\n")
    assert load_run_config(str(p)).train.nonfinite == "skip"
