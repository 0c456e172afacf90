"""Shared pieces of the task suite: task metadata, errors and the base class of the suite adapters."""
from __future__ import annotations

import abc
import atexit
import ctypes.util
import os
import sys
import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

__all__ = [
    "OffscreenRenderer",
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


_open_renderers: weakref.WeakSet = weakref.WeakSet()
_close_at_exit_registered = False


def _close_open_renderers() -> None:
    for renderer in list(_open_renderers):
        renderer.close()


class OffscreenRenderer:
    """Renders RGB frames of a MuJoCo model offscreen, through the GL backend ``MUJOCO_GL`` names.

    One rendering path for the three suites (dm_control's ``physics.render`` gives the same pixels for DMC; the
    tests check it): a :class:`mujoco.Renderer` built on first use, rebuilt when the frame size changes. The
    model's offscreen buffer (``<visual><global offwidth offheight>``, 640 x 480 by default) is enlarged when a
    larger frame is asked for; that is a drawing setting, it does not change the simulation.

    Args:
        model (mujoco.MjModel): the simulator's model.

    Examples:
        >>> from torchrl_dreammpc.envs import make_base_env
        >>> env = make_base_env("cartpole-swingup")
        >>> _ = env.reset()
        >>> renderer = OffscreenRenderer(env.physics.model.ptr)
        >>> renderer.render(env.physics.data.ptr, 48, 64, camera=0).shape
        (48, 64, 3)
        >>> renderer.close()
    """

    def __init__(self, model: Any):
        self.model = model
        self._renderer = None

    def camera_names(self) -> list[str]:
        import mujoco

        return [mujoco.mj_id2name(self.model, mujoco.mjtObj.mjOBJ_CAMERA, i) or str(i) for i in range(self.model.ncam)]

    def camera_id(self, camera: int | str) -> int:
        """The id of ``camera`` (a name, or an id; ``-1`` is MuJoCo's free camera), checked against the model."""
        import mujoco

        if isinstance(camera, str):
            camera_id = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_CAMERA, camera)  # -1: no such name
            known = camera_id >= 0
        elif isinstance(camera, (int, np.integer)) and not isinstance(camera, bool):
            camera_id = int(camera)
            known = -1 <= camera_id < self.model.ncam
        else:
            raise TypeError(f"camera must be a camera name or id, got {camera!r}.")
        if not known:
            raise ValueError(f"Unknown camera {camera!r}; this model's cameras are {self.camera_names()} "
                             "(or -1, MuJoCo's free camera).")
        return camera_id

    def render(self, data: Any, height: int, width: int, camera: int | str) -> np.ndarray:
        """Returns the frame of ``data`` seen by ``camera``: a new ``(height, width, 3)`` uint8 array."""
        camera_id = self.camera_id(camera)
        if self._renderer is None or (self._renderer.height, self._renderer.width) != (height, width):
            self.close()
            visual = self.model.vis.global_
            visual.offwidth, visual.offheight = max(visual.offwidth, width), max(visual.offheight, height)
            self._renderer = self._make_renderer(height, width)
        self._renderer.update_scene(data, camera=camera_id)
        return self._renderer.render()

    def _make_renderer(self, height: int, width: int):
        import mujoco

        global _close_at_exit_registered
        try:
            renderer = mujoco.Renderer(self.model, height, width)
        except Exception as err:  # each GL backend fails in its own way without a display / GPU / Mesa
            raise RuntimeError(
                f"MuJoCo could not open an offscreen GL context (MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}): "
                f"{type(err).__name__}: {err}. Offscreen rendering needs EGL (a GPU driver or Mesa's libEGL) "
                "or OSMesa: set MUJOCO_GL=egl or MUJOCO_GL=osmesa before MuJoCo is first imported."
            ) from err
        _open_renderers.add(self)
        if not _close_at_exit_registered:
            # Renderers still open at exit are closed before the GL backend shuts down (MuJoCo's EGL module
            # registers its eglTerminate when the first context opens; atexit runs this, registered later,
            # first). Otherwise their __del__ runs during interpreter teardown and prints EGL errors.
            atexit.register(_close_open_renderers)
            _close_at_exit_registered = True
        return renderer

    def close(self) -> None:
        """Frees the GL context (also done at exit for renderers still open)."""
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        _open_renderers.discard(self)


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
    ``"success"`` entry is the simulator's success flag at the agent step's last simulator step (TD-MPC2's
    Meta-World wrapper returns that step's ``info["success"]``; an evaluation reads it at the episode's last step,
    as TD-MPC2's does, or at any step).

    Why not TorchRL's ``DMControlEnv`` / ``GymWrapper`` + ``FrameSkipTransform``: the three suites need the same
    step semantics (repeat that stops on termination, time limit as ``truncated`` counted in agent steps,
    ``success`` read from the repeat's last simulator step, [-1, 1] rescaling), which with the stock wrappers
    would be three different transform stacks with suite-specific info readers; one small adapter keeps the
    convention in one place. Everything above the base env (transforms, batching, collectors) is TorchRL's.

    :meth:`render` draws the simulator's current state (MuJoCo, offscreen) from the suite's default camera
    (:attr:`default_camera`) or another one; TorchRL's :class:`~torchrl.record.PixelRenderTransform` calls it.

    Subclasses build the simulator and implement :meth:`_sim_reset`, :meth:`_sim_step` and
    :meth:`_sim_seed`; they call ``super().__init__`` once the observation and action sizes are known. For
    :meth:`render` they implement :meth:`_sim_model_and_data` (and may set :attr:`default_camera`).

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
        self._renderer = None
        self._elapsed = 0
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

    def _sim_model_and_data(self) -> tuple[Any, Any]:
        """The simulator's ``mujoco.MjModel`` and ``mujoco.MjData``, for :meth:`render`."""
        raise NotImplementedError(f"{type(self).__name__} does not render.")

    def _postprocess_frame(self, frame: np.ndarray) -> np.ndarray:
        """Adjusts a rendered frame (e.g. its orientation) for the suite's cameras."""
        return frame

    # -- rendering -----------------------------------------------------------------------------------
    #: Camera :meth:`render` uses when none is given: a name or id of the model's cameras.
    default_camera: int | str = 0

    def render(self, height: int = 240, width: int = 320, camera: int | str | None = None) -> np.ndarray:
        """Renders the simulator's current state offscreen with MuJoCo.

        The GL backend is the one ``MUJOCO_GL`` names (``egl`` or ``osmesa`` without a display; the suite
        modules choose ``egl`` on a headless Linux machine when it is unset and libEGL is present).

        Args:
            height (int, optional): frame height in pixels. Defaults to ``240``.
            width (int, optional): frame width in pixels. Defaults to ``320``.
            camera (int or str, optional): a camera name or id of the model (``-1``: MuJoCo's free camera).
                Defaults to :attr:`default_camera`, the suite's video camera (see ``docs/tasks.md``).

        Returns:
            np.ndarray: an RGB frame, ``(height, width, 3)`` uint8 (a new array on every call).

        Raises:
            ValueError: for a size that is not a positive int, or a camera the model does not have.
            RuntimeError: when MuJoCo cannot open an offscreen GL context here (the message says which backend
                was tried and what to set).

        Examples:
            >>> from torchrl_dreammpc.envs import make_env
            >>> env = make_env("cartpole-swingup")
            >>> _ = env.reset()
            >>> env.base_env.render(height=48, width=64).shape
            (48, 64, 3)
        """
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"render: {name} must be a positive int, got {value!r}.")
        model, data = self._sim_model_and_data()
        if self._renderer is None or self._renderer.model is not model:
            if self._renderer is not None:
                self._renderer.close()
            self._renderer = OffscreenRenderer(model)
        camera = self.default_camera if camera is None else camera
        return self._postprocess_frame(self._renderer.render(data, int(height), int(width), camera))

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
            out["success"] = torch.tensor([bool(result.success)], dtype=torch.bool, device=self.device)
        return TensorDict(out, batch_size=(), device=self.device)

    def _set_seed(self, seed: int | None) -> None:
        if seed is not None:
            self._sim_seed(int(seed))

    def close(self, *, raise_if_closed: bool = True) -> None:
        if not self.is_closed:
            if getattr(self, "_renderer", None) is not None:
                self._renderer.close()
                self._renderer = None
            self._sim_close()
        super().close(raise_if_closed=raise_if_closed)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(task={self.info.task!r}, action_repeat={self.info.action_repeat}, "
            f"episode_length={self.info.episode_length}, device={self.device})"
        )
