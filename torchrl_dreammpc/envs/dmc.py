"""DeepMind Control Suite tasks, named and set up as in TD-MPC2.

Names are ``<domain>-<task>`` with dashes: ``walker-walk``, ``cartpole-swingup-sparse``, ``finger-turn-easy``;
TD-MPC2 spells ``ball_in_cup`` as ``cup`` (``cup-catch``) and ``point_mass`` as ``pointmass``. Underscores are
accepted in place of dashes after the domain (``cartpole-balance_sparse``), as are the suite's own domain
names (``ball_in_cup-catch``). ``humanoid_CMU-stand`` / ``-walk`` / ``-run`` keep their suite name.

Besides the suite's tasks, TD-MPC2's own (``cheetah-jump``, ``cup-spin``, ``reacher-three-easy``,
``walker-run-backwards``, ...) are available, defined in :mod:`~torchrl_dreammpc.envs.dmc_tasks`.

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
from dm_control.suite import quadruped  # noqa: E402

from .dmc_tasks import custom_task_factories  # noqa: E402

__all__ = ["ACTION_REPEAT", "EPISODE_LENGTH", "DMControlTaskEnv", "lookup", "task_names"]

SUITE = "dmc"
ACTION_REPEAT = 2
EPISODE_LENGTH = 500

# TD-MPC2 splits a task name at its first "-"/"_", so domains with an underscore get short names.
_DOMAIN_ALIASES = {"ball_in_cup": "cup", "point_mass": "pointmass"}
# lqr has unbounded actions (no [-1, 1] box to map onto) and episodes that end on convergence only.
_UNSUPPORTED_DOMAINS = ("lqr",)


def _key(name: str) -> str:
    return name.replace("_", "-").lower()


# TD-MPC2's own tasks (backwards walker / cheetah / hopper, cheetah on one foot and jumping, three-link reacher,
# cup-spin, pendulum-spin), defined in dmc_tasks.py.
_CUSTOM_TASKS: dict[str, Callable[..., control.Environment]] = custom_task_factories()


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
    for name in _CUSTOM_TASKS:
        index[_key(name)] = name
    return index


def task_names() -> list[str]:
    """Names of the DMC tasks that :func:`~torchrl_dreammpc.envs.make_env` builds."""
    return sorted([*_suite_tasks(), *_CUSTOM_TASKS])


def lookup(task: str) -> TaskInfo | None:
    """Returns the task's :class:`TaskInfo`, ``None`` if the name is no DMC task.

    Raises:
        TaskNotAvailableError: for ``lqr``.
    """
    name = _index().get(_key(task))
    if name is None:
        if _key(task).split("-", 1)[0] in _UNSUPPORTED_DOMAINS:
            raise TaskNotAvailableError(
                f"DMC task {task!r} is not supported: lqr has unbounded actions (no [-1, 1] box to map onto) "
                "and no time limit."
            )
        return None
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
        # TD-MPC2's video cameras: the suite's camera 0, the quadruped's camera 2 (it follows the robot).
        self.default_camera = 2 if info.task.startswith("quadruped-") else 0

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

    def _sim_model_and_data(self):
        # The same pixels as dm_control's physics.render (tests/test_envs.py checks it), through the renderer
        # the other suites use.
        return self.physics.model.ptr, self.physics.data.ptr
