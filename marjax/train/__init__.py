"""Training: mesh + sharding rules, optimizer, train state, jitted step, loop, Orbax
checkpoints, the Grain data pipeline and the embedded corpus."""
from marjax.train.checkpoint import Checkpointer, check_compatible, load_model_dir
from marjax.train.loop import TrainingDiverged, read_metrics, train
from marjax.train.mesh import (ShardingRules, batch_sharding, init_sharded, logical_axes, make_mesh,
                               param_shardings, shard_params)
from marjax.train.optim import accum_steps, make_optimizer
from marjax.train.state import TrainState
from marjax.train.step import make_train_step

__all__ = ["train", "TrainingDiverged", "read_metrics", "make_mesh", "ShardingRules", "logical_axes",
           "param_shardings", "batch_sharding", "init_sharded", "shard_params", "make_optimizer",
           "accum_steps", "TrainState", "make_train_step", "Checkpointer", "load_model_dir",
           "check_compatible"]
