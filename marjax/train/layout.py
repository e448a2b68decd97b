"""The layer layout a run trains in (TrainConfig.layer_layout).

"stacked" (the default): LMParams.blocks carry a leading L axis and the layers run under
`lax.scan`. "unrolled": the student (and an LMParams teacher) train as a tuple of per-layer
BlockParams (marjax.models.lm.unroll_layers), so the step has no layer scan. On XLA:CPU the
scan's backward costs a zero-filled stacked buffer per gradient, a slice and an update per layer
per residual; at the SmolLM2 pipeline's shapes the train step takes 0.78x (kd) and 0.89x (sbds)
the stacked time (the students' forward+backward 0.87x and 0.84x, the same gradients bit for
bit), for 4-9x the compile time (`python experiments/bench/step_layout_probe.py {kd,sbds}`).

TrainConfig.teacher_layout sets an LMParams teacher's layout in either; its default "auto" is
"unrolled" on CPU and "stacked" on TPU and GPU (teacher_layout_on). The teacher only runs
forward, so unrolling it costs little compile time (+2-7 s at the SmolLM2 pipeline's shapes on
a slow 2-core CPU) and spares XLA:CPU the scan's per-layer copies of its weights: the stacked kd
step takes 0.89-0.94x the time it takes with a stacked teacher, the same losses bit for bit
(`python experiments/bench/step_layout_probe.py kd`); sbds (an SSM teacher) does not move.

Only the step sees the unrolled layout. Checkpoints hold the stacked one (the same files as a
stacked run: `load_model_dir`, resume across layouts and older checkpoints keep working), and
`train` returns stacked params.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import jax

from marjax.errors import ConfigError
from marjax.models.lm import LMParams, is_unrolled, stack_layers, unroll_layers
from marjax.train.mesh import ShardingRules
from marjax.train.state import TrainState, abstract_state, state_shardings

__all__ = ["LAYER_LAYOUTS", "TEACHER_LAYOUTS", "check_layout", "check_teacher_layout", "teacher_layout_on",
           "layout_teacher", "map_lm", "unroll_inputs", "stacked_params", "stacked_state",
           "unrolled_state", "stacked_target", "RunLayout"]

LAYER_LAYOUTS = ("stacked", "unrolled")


def _one_of(field: str, value: str, allowed: tuple) -> str:
    if value not in allowed:
        raise ConfigError(f"TrainConfig.{field} must be one of {allowed}, got {value!r}")
    return value


def check_layout(layout: str) -> str:
    return _one_of("layer_layout", layout, LAYER_LAYOUTS)


TEACHER_LAYOUTS = ("auto",) + LAYER_LAYOUTS


def check_teacher_layout(layout: str) -> str:
    return _one_of("teacher_layout", layout, TEACHER_LAYOUTS)


def teacher_layout_on(layout: str, mesh) -> str:
    """TrainConfig.teacher_layout resolved for the mesh's devices: "auto" is "unrolled" on CPU (XLA:CPU
    copies each layer's weights out of the stacked arrays under a scan) and "stacked" on TPU and GPU
    (the slice feeds the matmul; unrolling would cost compile time and a second copy of the teacher
    in device memory)."""
    if check_teacher_layout(layout) != "auto":
        return layout
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return "unrolled" if platform == "cpu" else "stacked"


def layout_teacher(teacher_params, layout: str, mesh=None):
    """The teacher in `layout` (TrainConfig.teacher_layout, on the mesh's devices). A teacher that
    is not LMParams (None, a cache of teacher outputs) passes as it is."""
    if not _is_lm(teacher_params):
        return teacher_params
    return (unroll_layers if teacher_layout_on(layout, mesh) == "unrolled" else stack_layers)(teacher_params)


def _is_lm(x) -> bool:
    return isinstance(x, LMParams)


def map_lm(fn: Callable, tree):
    """fn on every LMParams inside `tree` (params, an optimizer state's moments, a TrainState)."""
    return jax.tree.map(lambda x: fn(x) if _is_lm(x) else x, tree, is_leaf=_is_lm)


def unroll_inputs(student_params, trainable, teacher_params, teacher_layout: str = "unrolled", mesh=None):
    """(student, trainable mask) in the unrolled layout, the teacher in `teacher_layout`
    (layout_teacher). The student must be LMParams."""
    if not _is_lm(student_params):
        raise ConfigError("TrainConfig.layer_layout='unrolled' trains LMParams (marjax.models.lm); got student "
                          f"params of type {type(student_params).__name__}")
    student = unroll_layers(student_params)
    if trainable is not None and not is_unrolled(trainable):   # one bool per stacked leaf: the same for each layer
        trainable = dataclasses.replace(trainable, blocks=(trainable.blocks,) * len(student.blocks))
    return student, trainable, layout_teacher(teacher_params, teacher_layout, mesh)


def stacked_params(tree):
    """`tree` (params, or anything holding LMParams) with every LMParams' layers stacked."""
    return map_lm(stack_layers, tree)


def _jit_to(fn: Callable, state: TrainState, mesh, rules: Optional[ShardingRules]) -> Callable:
    """jit(fn) with the result sharded by the rules (its layout's shardings)."""
    return jax.jit(fn, out_shardings=state_shardings(jax.eval_shape(fn, state), mesh, rules))


def stacked_state(state: TrainState, mesh, rules: Optional[ShardingRules] = None) -> TrainState:
    """A copy of an unrolled state (params and optimizer moments) with the layers stacked."""
    return _jit_to(stacked_params, state, mesh, rules)(state)


def unrolled_state(state: TrainState, mesh, rules: Optional[ShardingRules] = None) -> TrainState:
    """A copy of a stacked state with the layers unrolled."""
    return _jit_to(lambda s: map_lm(unroll_layers, s), state, mesh, rules)(state)


def stacked_target(state: TrainState, mesh, rules: Optional[ShardingRules] = None) -> Any:
    """The stacked layout of `state` as ShapeDtypeStructs with their shardings (a restore target)."""
    shapes = jax.eval_shape(stacked_params, state)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        state_shardings(shapes, mesh, rules))


@dataclass(frozen=True)
class RunLayout:
    """What `marjax.train.loop.train` converts for a run in `layout`: its inputs into the step's
    layout, the state to and from the stacked one on disk, the params it hands back (identities
    for "stacked"), and the teacher in teacher_layout."""
    layout: str
    mesh: Any
    rules: Optional[ShardingRules] = None
    teacher_layout: str = "auto"

    def __post_init__(self):
        check_layout(self.layout)
        check_teacher_layout(self.teacher_layout)

    @property
    def unrolled(self) -> bool:
        return self.layout == "unrolled"

    def inputs(self, student_params, trainable, teacher_params):
        if self.unrolled:
            return unroll_inputs(student_params, trainable, teacher_params, self.teacher_layout, self.mesh)
        return student_params, trainable, layout_teacher(teacher_params, self.teacher_layout, self.mesh)

    def to_disk(self, state: TrainState) -> TrainState:
        return stacked_state(state, self.mesh, self.rules) if self.unrolled else state

    def disk_target(self, state: TrainState) -> Any:
        return stacked_target(state, self.mesh, self.rules) if self.unrolled else abstract_state(state)

    def from_disk(self, state: TrainState) -> TrainState:
        return unrolled_state(state, self.mesh, self.rules) if self.unrolled else state

    def to_caller(self, params):
        return stacked_params(params) if self.unrolled else params
