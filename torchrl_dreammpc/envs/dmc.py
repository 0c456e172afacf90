"""DeepMind Control Suite tasks, named and set up as in TD-MPC2.

Names are ``<domain>-<task>`` with dashes: ``walker-walk``, ``cartpole-swingup-sparse``, ``finger-turn-easy``;
TD-MPC2 spells ``ball_in_cup`` as ``cup`` (``cup-catch``) and ``point_mass`` as ``pointmass``. Underscores are
accepted in place of dashes after the domain (``cartpole-balance_sparse``), as are the suite's own domain
names (``ball_in_cup-catch``). ``humanoid_CMU-stand`` / ``-walk`` / ``-run`` keep their suite name.

Every task runs with action repeat 2 and 500 agent steps per episode (1000 control steps, the suite's own
length), ending as ``truncated``.
"""
from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import torch

from ._base import SimStep, SuiteEnv, TaskInfo, TaskNotAvailableError, default_mujoco_gl

default_mujoco_gl(headless_only=True)  # before dm_control picks its rendering backend at import

from dm_control import suite  # noqa: E402
from dm_control.rl import control  # noqa: E402
from dm_control.suite import cheetah, hopper, quadruped, walker  # noqa: E402
from dm_control.utils import rewards  # noqa: E402

__all__ = ["ACTION_REPEAT", "EPISODE_LENGTH", "DMControlTaskEnv", "lookup", "task_names"]

SUITE = "dmc"
ACTION_REPEAT = 2
EPISODE_LENGTH = 500

# TD-MPC2 splits a task name at its first "-"/"_", so domains with an underscore get short names.
_DOMAIN_ALIASES = {"ball_in_cup": "cup", "point_mass": "pointmass"}
# lqr has unbounded actions (no [-1, 1] box to map onto) and episodes that end on convergence only.
_UNSUPPORTED_DOMAINS = ("lqr",)

# TD-MPC2's own DMC tasks that are not implemented here yet.
_UNAVAILABLE_CUSTOM_TASKS = (
    "cheetah-run-front",
    "cheetah-run-back",
    "cheetah-jump",
    "reacher-three-easy",
    "reacher-three-hard",
    "cup-spin",
    "pendulum-spin",
)


def _key(name: str) -> str:
    return name.replace("_", "-").lower()


# -- TD-MPC2's custom "backwards" tasks: the suite's reward with the sign of the speed flipped ------------
class BackwardsPlanarWalker(walker.PlanarWalker):
    """``walker.PlanarWalker`` rewarding speed towards ``-x`` instead of ``+x``."""

    def get_reward(self, physics):
        standing = rewards.tolerance(
            physics.torso_height(), bounds=(walker._STAND_HEIGHT, float("inf")), margin=walker._STAND_HEIGHT / 2
        )
        upright = (1 + physics.torso_upright()) / 2
        stand_reward = (3 * standing + upright) / 4
        move_reward = rewards.tolerance(
            -physics.horizontal_velocity(),
            bounds=(self._move_speed, float("inf")),
            margin=self._move_speed / 2,
            value_at_margin=0.5,
            sigmoid="linear",
        )
        return stand_reward * (5 * move_reward + 1) / 6


class BackwardsCheetah(cheetah.Cheetah):
    """``cheetah.Cheetah`` rewarding running towards ``-x``."""

    def get_reward(self, physics):
        return rewards.tolerance(
            -physics.speed(),
            bounds=(cheetah._RUN_SPEED, float("inf")),
            margin=cheetah._RUN_SPEED,
            value_at_margin=0,
            sigmoid="linear",
        )


class BackwardsHopper(hopper.Hopper):
    """``hopper.Hopper(hopping=True)`` rewarding hops towards ``-x``."""

    def get_reward(self, physics):
        standing = rewards.tolerance(physics.height(), (hopper._STAND_HEIGHT, 2))
        hopping = rewards.tolerance(
            -physics.speed(),
            bounds=(hopper._HOP_SPEED, float("inf")),
            margin=hopper._HOP_SPEED / 2,
            value_at_margin=0.5,
            sigmoid="linear",
        )
        return standing * hopping


# The factories mirror the suite's own (same model, control timestep and task arguments).
def _walker_backwards(move_speed: float) -> Callable[..., control.Environment]:
    def load(time_limit, random):
        physics = walker.Physics.from_xml_string(*walker.get_model_and_assets())
        task = BackwardsPlanarWalker(move_speed=move_speed, random=random)
        return control.Environment(physics, task, time_limit=time_limit, control_timestep=walker._CONTROL_TIMESTEP)

    return load


def _cheetah_run_backwards(time_limit, random) -> control.Environment:
    physics = cheetah.Physics.from_xml_string(*cheetah.get_model_and_assets())
    return control.Environment(physics, BackwardsCheetah(random=random), time_limit=time_limit)


def _hopper_hop_backwards(time_limit, random) -> control.Environment:
    physics = hopper.Physics.from_xml_string(*hopper.get_model_and_assets())
    task = BackwardsHopper(hopping=True, random=random)
    return control.Environment(physics, task, time_limit=time_limit, control_timestep=hopper._CONTROL_TIMESTEP)


_CUSTOM_TASKS: dict[str, Callable[..., control.Environment]] = {
    "walker-walk-backwards": _walker_backwards(walker._WALK_SPEED),
    "walker-run-backwards": _walker_backwards(walker._RUN_SPEED),
    "cheetah-run-backwards": _cheetah_run_backwards,
    "hopper-hop-backwards": _hopper_hop_backwards,
}


class _QuadrupedPhysics(quadruped.Physics):
    # dm_control 1.0.28's quadruped calls np.in1d, which NumPy 2.4 removed; this subclass looks sensors up
    # with np.isin (same result) instead of patching NumPy for everyone.
    def _get_sensor_names(self, *sensor_types):
        try:
            return self._sensor_types_to_names[sensor_types]
        except KeyError:
            [sensor_ids] = np.where(np.isin(self.model.sensor_type, sensor_types))
            names = [self.model.id2name(s_id, "sensor") for s_id in sensor_ids]
            self._sensor_types_to_names[sensor_types] = names
            return names


@functools.cache
def _suite_tasks() -> dict[str, tuple[str, str]]:
    """Canonical name -> (domain, task) for every supported task of the installed dm_control suite."""
    return {
        f"{_DOMAIN_ALIASES.get(domain, domain)}-{task.replace('_', '-')}": (domain, task)
        for domain, task in suite.ALL_TASKS
        if domain not in _UNSUPPORTED_DOMAINS
    }


@functools.cache
def _index() -> dict[str, str]:
    """Accepted spelling (normalised with :func:`_key`) -> canonical name."""
    index = {}
    for name, (domain, task) in _suite_tasks().items():
        index[_key(name)] = name
        index[_key(f"{domain}-{task}")] = name
    for name in (*_CUSTOM_TASKS, *_UNAVAILABLE_CUSTOM_TASKS):
        index[_key(name)] = name
    return index


def task_names() -> list[str]:
    """Names of the DMC tasks that :func:`~torchrl_dreammpc.envs.make_env` builds."""
    return sorted([*_suite_tasks(), *_CUSTOM_TASKS])


def lookup(task: str) -> TaskInfo | None:
    """Returns the task's :class:`TaskInfo`, ``None`` if the name is no DMC task.

    Raises:
        TaskNotAvailableError: for TD-MPC2 custom tasks not implemented here, and for ``lqr``.
    """
    name = _index().get(_key(task))
    if name is None:
        if _key(task).split("-", 1)[0] in _UNSUPPORTED_DOMAINS:
            raise TaskNotAvailableError(
                f"DMC task {task!r} is not supported: lqr has unbounded actions (no [-1, 1] box to map onto) "
                "and no time limit."
            )
        return None
    if name in _UNAVAILABLE_CUSTOM_TASKS:
        raise TaskNotAvailableError(
            f"{task!r} is one of TD-MPC2's custom DMC tasks and is not available yet in torchrl_dreammpc "
            f"(available custom tasks: {', '.join(sorted(_CUSTOM_TASKS))})."
        )
    return TaskInfo(
        task=name, suite=SUITE, episode_length=EPISODE_LENGTH, action_repeat=ACTION_REPEAT, episodic=False
    )


def _load(name: str, seed: int | None):
    """Builds the dm_control environment with no time limit of its own (the adapter owns the limit)."""
    # The suite's limit (1000 control steps for every supported task) would coincide with ours; disabling
    # it keeps one source of truth and makes any dm_control LAST step a real termination.
    time_limit = float("inf")
    random = np.random.RandomState(seed) if seed is not None else None
    if name in _CUSTOM_TASKS:
        return _CUSTOM_TASKS[name](time_limit=time_limit, random=random)
    domain, task = _suite_tasks()[name]
    env = suite.load(domain, task, task_kwargs={"time_limit": time_limit, "random": random})
    if domain == "quadruped" and not hasattr(np, "in1d"):
        env.physics.__class__ = _QuadrupedPhysics
    return env


class DMControlTaskEnv(SuiteEnv):
    """A DeepMind Control Suite task with TD-MPC2's setup: action repeat 2, 500 agent steps.

    The dict observation is flattened into one float32 vector in the order the task defines it.

    Args:
        task (str): a DMC task name, e.g. ``"walker-walk"`` or ``"cup-catch"``.

    Keyword Args:
        seed (int, optional): seeds the task's random initial states. Defaults to ``None``.
        device (torch.device or str, optional): device of the outputs. Defaults to ``"cpu"``.

    Examples:
        >>> env = DMControlTaskEnv("cartpole-swingup", seed=0)
        >>> env.rollout(3)["next", "observation"].shape
        torch.Size([3, 5])
    """

    def __init__(self, task: str, *, seed: int | None = None, device: torch.device | str = "cpu"):
        info = lookup(task)
        if info is None:
            raise ValueError(f"{task!r} is not a DMC task.")
        env = _load(info.task, seed)
        action_spec = env.action_spec()
        low, high = np.broadcast_to(action_spec.minimum, action_spec.shape), np.broadcast_to(
            action_spec.maximum, action_spec.shape
        )
        native_unit_box = np.allclose(low, -1.0) and np.allclose(high, 1.0)
        observation_size = sum(int(np.prod(spec.shape)) for spec in env.observation_spec().values())
        super().__init__(
            info,
            observation_size,
            int(np.prod(action_spec.shape)),
            device=device,
            seed=seed,
            action_low=None if native_unit_box else low,
            action_high=None if native_unit_box else high,
            sim=env,
        )

    @property
    def physics(self):
        """The dm_control physics (``physics.data.time`` is the simulated time)."""
        return self.sim.physics

    @staticmethod
    def _flatten(observation) -> np.ndarray:
        return np.concatenate([np.asarray(value, dtype=np.float64).ravel() for value in observation.values()])

    def _sim_reset(self) -> np.ndarray:
        return self._flatten(self.sim.reset().observation)

    def _sim_step(self, action: np.ndarray) -> SimStep:
        time_step = self.sim.step(action)
        # Without a time limit of its own, dm_control ends an episode only at a terminal state (discount 0).
        terminated = bool(time_step.last()) and float(time_step.discount) < 1.0
        truncated = bool(time_step.last()) and not terminated
        return SimStep(self._flatten(time_step.observation), float(time_step.reward or 0.0), terminated, truncated)

    def _sim_seed(self, seed: int) -> None:
        # dm_control draws initial states from the task's RandomState.
        self.sim.task._random = np.random.RandomState(seed)
