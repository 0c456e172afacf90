"""Shared pieces of the task suite: task metadata, errors and the base class of the suite adapters."""
from __future__ import annotations

import abc
import ctypes.util
import os
import sys
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

__all__ = [
    "SimStep",
    "default_mujoco_gl",
    "SuiteEnv",
    "TaskInfo",
    "TaskNotAvailableError",
    "UnknownTaskError",
]


def default_mujoco_gl(*, headless_only: bool) -> None:
    """Chooses MuJoCo's EGL rendering backend on Linux when the user has not set ``MUJOCO_GL``.

    Must run before ``dm_control`` (or another MuJoCo renderer) is first imported to take effect.

    Args:
        headless_only (bool): only when no display is set and ``libEGL`` can be found. Without a display,
            dm_control's automatic choice (GLFW first) fails to create the GL context some tasks need at reset
            (``quadruped-escape``), while naming a backend that is not installed breaks the dm_control import.
    """
    if "MUJOCO_GL" in os.environ or not sys.platform.startswith("linux"):
        return
    if headless_only and (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or ctypes.util.find_library("EGL") is None
    ):
        return
    os.environ["MUJOCO_GL"] = "egl"


def gym_space_dims(sim: Any) -> tuple[int, int]:
    """``(observation width, action width)`` of a gymnasium-style simulator (flat Box spaces)."""
    return int(np.prod(sim.observation_space.shape)), int(np.prod(sim.action_space.shape))


class UnknownTaskError(ValueError):
    """Raised for a task name that no suite knows; the message lists the closest known names."""


class TaskNotAvailableError(ValueError):
    """Raised for a known task that cannot be built here (not implemented yet, or files missing)."""


@dataclass(frozen=True)
class TaskInfo:
    """What a trainer needs to know about a task before building it.

    Attributes:
        task (str): the canonical task name (as TD-MPC2 spells it).
        suite (str): ``"dmc"``, ``"metaworld"`` or ``"humanoid_bench"``.
        episode_length (int): agent steps per episode (after action repeat): what TD-MPC2 calls
            ``episode_length`` and feeds to its discount heuristic.
        action_repeat (int): simulator steps per agent step.
        episodic (bool): whether episodes can end early (``terminated``); TD-MPC2's ``episodic`` flag,
            which turns on its termination head.
        has_success (bool): whether the env writes a ``"success"`` entry.

    Examples:
        >>> from torchrl_dreammpc.envs import task_info
        >>> task_info("walker-walk").episode_length
        500
    """

    task: str
    suite: str
    episode_length: int
    action_repeat: int
    episodic: bool
    has_success: bool = False

    @property
    def simulator_steps(self) -> int:
        """Simulator steps in a full episode (``episode_length * action_repeat``)."""
        return self.episode_length * self.action_repeat


class SimStep(NamedTuple):
    """One simulator step as the suite adapters report it to :class:`SuiteEnv`."""

    observation: np.ndarray
    reward: float
    terminated: bool
    truncated: bool = False
    success: bool = False


class SuiteEnv(EnvBase):
    """Base class of the suite adapters: one simulator seen through TD-MPC2's step conventions.

    The env exposes a single float32 ``"observation"`` vector, a ``[-1, 1]`` action box, a float32
    ``"reward"`` and the ``"done"`` / ``"terminated"`` / ``"truncated"`` flags. One :meth:`step` is one
    agent step: the action is applied ``info.action_repeat`` times and the rewards are summed (the
    repeat stops early if the simulator terminates). After ``info.episode_length`` agent steps the
    episode ends as ``truncated`` (a time limit is no terminal state), while an end signalled by the
    simulator (a robot that fell) is ``terminated``. When ``info.has_success`` is set, a boolean
    ``"success"`` entry says whether success was reached at any simulator step of the episode so far.

    Why not TorchRL's ``DMControlEnv`` / ``GymWrapper`` + ``FrameSkipTransform``: the three suites need the same
    step semantics (repeat that stops on termination, time limit as ``truncated`` counted in agent steps,
    ``success`` latched over the repeated simulator steps, [-1, 1] rescaling), which with the stock wrappers
    would be three different transform stacks with suite-specific info readers; one small adapter keeps the
    convention in one place. Everything above the base env (transforms, batching, collectors) is TorchRL's.

    Subclasses build the simulator and implement :meth:`_sim_reset`, :meth:`_sim_step` and
    :meth:`_sim_seed`; they call ``super().__init__`` once the observation and action sizes are known.

    Args:
        info (TaskInfo): the task's metadata (episode length, action repeat, ...).
        observation_size (int): size of the flat observation vector.
        action_size (int): number of action dimensions.

    Keyword Args:
        device (torch.device or str, optional): where the env's outputs live. Defaults to ``"cpu"``.
        seed (int, optional): seed applied with :meth:`set_seed` once the env is built. Defaults to ``None``
            (the simulator's own default randomness).
        action_low, action_high (np.ndarray, optional): the simulator's native action bounds. When given,
            actions in ``[-1, 1]`` are mapped affinely onto them; otherwise the simulator already takes
            ``[-1, 1]``.
        sim (Any, optional): the simulator object, kept as :attr:`sim` for inspection and rendering.
    """

    def __init__(
        self,
        info: TaskInfo,
        observation_size: int,
        action_size: int,
        *,
        device: torch.device | str = "cpu",
        seed: int | None = None,
        action_low: np.ndarray | None = None,
        action_high: np.ndarray | None = None,
        sim: Any = None,
    ):
        super().__init__(device=device, batch_size=torch.Size([]))
        self.info = info
        self.sim = sim
        self._elapsed = 0
        self._success = False
        if (action_low is None) != (action_high is None):
            raise ValueError("action_low and action_high go together.")
        if action_low is not None:
            low = np.asarray(action_low, dtype=np.float64)
            high = np.asarray(action_high, dtype=np.float64)
            if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high)) and np.all(high > low)):
                raise ValueError(f"{info.task}: cannot map [-1, 1] onto action bounds [{low}, {high}].")
            # a = center + half_range * u maps u in [-1, 1] onto [low, high].
            self._action_center, self._action_half_range = (high + low) / 2, (high - low) / 2
        else:
            self._action_center = self._action_half_range = None

        observation_spec = Composite(
            observation=Unbounded(shape=(observation_size,), dtype=torch.float32, device=self.device),
            shape=(),
            device=self.device,
        )
        if info.has_success:
            observation_spec["success"] = Categorical(2, shape=(1,), dtype=torch.bool, device=self.device)
        self.observation_spec = observation_spec
        self.action_spec = Bounded(
            low=-1.0, high=1.0, shape=(action_size,), dtype=torch.float32, device=self.device
        )
        self.reward_spec = Unbounded(shape=(1,), dtype=torch.float32, device=self.device)
        flag = Categorical(2, shape=(1,), dtype=torch.bool, device=self.device)
        self.done_spec = Composite(
            done=flag.clone(), terminated=flag.clone(), truncated=flag.clone(), shape=(), device=self.device
        )
        self.is_closed = False
        if seed is not None:
            self.set_seed(seed)

    # -- what subclasses implement ---------------------------------------------------------------------
    @abc.abstractmethod
    def _sim_reset(self) -> np.ndarray:
        """Starts a new simulator episode and returns its first flat observation."""

    @abc.abstractmethod
    def _sim_step(self, action: np.ndarray) -> SimStep:
        """Advances the simulator by one of its own steps with an action in its native bounds."""

    @abc.abstractmethod
    def _sim_seed(self, seed: int) -> None:
        """Reseeds the simulator so that the next reset is reproducible."""

    def _sim_close(self) -> None:
        """Frees the simulator's resources (renderers, ...)."""

    # -- EnvBase -------------------------------------------------------------------------------------
    def _flags(self, done: bool, terminated: bool, truncated: bool) -> dict[str, torch.Tensor]:
        return {
            "done": torch.tensor([done], dtype=torch.bool, device=self.device),
            "terminated": torch.tensor([terminated], dtype=torch.bool, device=self.device),
            "truncated": torch.tensor([truncated], dtype=torch.bool, device=self.device),
        }

    def _observation(self, observation: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(observation, dtype=np.float32), device=self.device)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        observation = self._sim_reset()
        self._elapsed = 0
        self._success = False
        out = {"observation": self._observation(observation), **self._flags(False, False, False)}
        if self.info.has_success:
            out["success"] = torch.tensor([False], dtype=torch.bool, device=self.device)
        return TensorDict(out, batch_size=(), device=self.device)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get("action").detach().to(device="cpu", dtype=torch.float64).numpy()
        # Policies may overshoot the box (e.g. Gaussian exploration noise); the simulators either clamp
        # silently or misbehave, so clip here, where the bounds are known.
        action = np.clip(action, -1.0, 1.0)
        if self._action_center is not None:
            action = self._action_center + self._action_half_range * action
        reward, terminated, truncated = 0.0, False, False
        for _ in range(self.info.action_repeat):
            result = self._sim_step(action)
            reward += float(result.reward)
            self._success = self._success or bool(result.success)
            terminated, truncated = bool(result.terminated), bool(result.truncated)
            if terminated or truncated:
                break
        self._elapsed += 1
        # The time limit is the task's, not a terminal state: it ends the episode as truncated, and only
        # when the simulator did not terminate on that very step.
        truncated = not terminated and (truncated or self._elapsed >= self.info.episode_length)
        out = {
            "observation": self._observation(result.observation),
            "reward": torch.tensor([reward], dtype=torch.float32, device=self.device),
            **self._flags(terminated or truncated, terminated, truncated),
        }
        if self.info.has_success:
            out["success"] = torch.tensor([self._success], dtype=torch.bool, device=self.device)
        return TensorDict(out, batch_size=(), device=self.device)

    def _set_seed(self, seed: int | None) -> None:
        if seed is not None:
            self._sim_seed(int(seed))

    def close(self, *, raise_if_closed: bool = True) -> None:
        if not self.is_closed:
            self._sim_close()
        super().close(raise_if_closed=raise_if_closed)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(task={self.info.task!r}, action_repeat={self.info.action_repeat}, "
            f"episode_length={self.info.episode_length}, device={self.device})"
        )
