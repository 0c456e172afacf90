"""HumanoidBench tasks, named and set up as in TD-MPC2 / Dream-MPC.

``humanoid_<robot>-<task>-v0`` is HumanoidBench's gymnasium env ``<robot>-<task>-v0`` (e.g.
``humanoid_h1hand-walk-v0``, ``humanoid_h1-slide-v0``), used as HumanoidBench defines it: no action repeat, its
own episode length (1000 steps for most tasks, 500 for a few manipulation tasks), and its early termination
(a robot that falls) reported as ``terminated``. Actions are HumanoidBench's normalised ``[-1, 1]`` box.

HumanoidBench is optional and not on the package index; see :data:`INSTALL_HINT` and ``docs/tasks.md``.
This module imports without it; building an env needs it.
"""
from __future__ import annotations

import importlib.util
import re

import numpy as np
import torch

from ._base import SimStep, SuiteEnv, TaskInfo, TaskNotAvailableError, default_mujoco_gl, gym_space_dims

__all__ = ["INSTALL_HINT", "HumanoidBenchTaskEnv", "lookup", "task_names"]

SUITE = "humanoid_bench"
ACTION_REPEAT = 1
PREFIX = "humanoid_"
_NAME = re.compile(r"^humanoid_(?P<robot>[A-Za-z0-9]+)-(?P<task>[A-Za-z0-9_]+)-v0$")

INSTALL_HINT = """HumanoidBench is not installed. Install it from its repository:
    git clone https://github.com/carlosferrazza/humanoid-bench
    pip install --no-deps -e humanoid-bench
    pip install "jax[cpu]"
--no-deps keeps its pins (gymnasium 0.29.1, mujoco 3.1.6, torch 2.3.1) from replacing this project's versions;
the install must be editable because its humanoid_bench.dmc_deps folder has no __init__.py. torchrl_dreammpc
adapts HumanoidBench's MuJoCo sizes table to the installed MuJoCo itself."""

# Robots and tasks that HumanoidBench (commit 791405f) registers, with each task's episode length
# (``max_episode_steps``). A humanoid_bench that registers more is asked directly (see :func:`lookup`).
ROBOTS = ("h1", "h1hand", "h1simplehand", "h1strong", "h1touch", "g1")
EPISODE_LENGTHS = {
    "stand": 1000,
    "walk": 1000,
    "run": 1000,
    "kitchen": 500,
    "maze": 1000,
    "hurdle": 1000,
    "cube": 500,
    "bookshelf_simple": 1000,
    "bookshelf_hard": 1000,
    "highbar_simple": 1000,
    "highbar_hard": 1000,
    "crawl": 1000,
    "window": 1000,
    "spoon": 1000,
    "door": 1000,
    "push": 500,
    "reach": 1000,
    "basketball": 500,
    "truck": 1000,
    "package": 1000,
    "cabinet": 1000,
    "sit_simple": 1000,
    "sit_hard": 1000,
    "balance_simple": 1000,
    "balance_hard": 1000,
    "stair": 1000,
    "slide": 1000,
    "pole": 1000,
    "room": 1000,
    "insert_normal": 500,
    "insert_small": 500,
    "powerlift": 1000,
}

_sizes_checked = False


def task_names() -> list[str]:
    """Names of the HumanoidBench tasks known without importing HumanoidBench (all robots x tasks)."""
    return sorted(f"{PREFIX}{robot}-{task}-v0" for robot in ROBOTS for task in EPISODE_LENGTHS)


def is_installed() -> bool:
    """Whether ``humanoid_bench`` can be found (without importing it)."""
    return importlib.util.find_spec("humanoid_bench") is not None


def lookup(task: str) -> TaskInfo | None:
    """Returns the task's :class:`TaskInfo`, ``None`` if the name is no HumanoidBench task.

    Known names need no HumanoidBench install; other well-formed names are looked up in the registry of an
    installed HumanoidBench (a newer one may register more tasks).
    """
    match = _NAME.match(task)
    if match is None:
        return None
    robot, name = match["robot"], match["task"]
    if robot in ROBOTS and name in EPISODE_LENGTHS:
        episode_length = EPISODE_LENGTHS[name]
    elif is_installed():
        import gymnasium as gym

        _import_humanoid_bench()
        env_id = task[len(PREFIX) :]
        if env_id not in gym.registry:
            return None
        episode_length = int(gym.registry[env_id].max_episode_steps or 1000)
    else:
        return None
    return TaskInfo(task=task, suite=SUITE, episode_length=episode_length, action_repeat=ACTION_REPEAT, episodic=True)


def _import_humanoid_bench():
    """Imports humanoid_bench (which registers its gymnasium envs), with install hints on failure."""
    # HumanoidBench renders off-screen through MuJoCo, which on a machine without display works through EGL;
    # its README asks for MUJOCO_GL=egl. Users who chose a backend keep theirs.
    default_mujoco_gl(headless_only=False)
    if not is_installed():
        raise ImportError(INSTALL_HINT)
    try:
        import humanoid_bench
    except ModuleNotFoundError as err:
        missing = (err.name or "").split(".")[0]
        if missing == "jax":
            raise ImportError(
                'HumanoidBench imports jax at import time: pip install "jax[cpu]"\n\n' + INSTALL_HINT
            ) from err
        if (err.name or "").startswith("humanoid_bench.dmc_deps"):
            raise ImportError(
                "humanoid_bench is installed without its dmc_deps folder (a non-editable install misses it): "
                "reinstall it with `pip install --no-deps -e <humanoid-bench checkout>`.\n\n" + INSTALL_HINT
            ) from err
        raise
    _use_installed_mujoco_sizes()
    return humanoid_bench


def _use_installed_mujoco_sizes() -> None:
    """Replaces HumanoidBench's MuJoCo array-sizes table with the installed MuJoCo's, once, if they differ.

    HumanoidBench ships ``humanoid_bench/dmc_deps/dmc_sizes.py``, a copy of dm_control's table of MjModel /
    MjData array shapes generated for MuJoCo 3.1.6. With a newer MuJoCo (3.3.0 here) the fields differ and
    building any env fails (``AttributeError: ... 'flex_xvert0'``). dm_control ships the table matching the
    MuJoCo it is pinned to, so the fix is to point HumanoidBench's module at it, in memory, before the first
    env is built; HumanoidBench's files stay untouched.
    """
    global _sizes_checked
    if _sizes_checked:
        return
    from dm_control.mujoco.wrapper.mjbindings import sizes
    from humanoid_bench.dmc_deps import dmc_sizes

    if dmc_sizes.array_sizes != sizes.array_sizes:
        dmc_sizes.array_sizes = sizes.array_sizes
    _sizes_checked = True


_MISSING_FILE = (
    re.compile(r"Error opening file '(?P<path>[^']+)'"),
    re.compile(r"File (?P<path>.+?) does not exist"),
    re.compile(r"No such file or directory: '(?P<path>[^']+)'"),
)


def _make_simulator(task: str):
    import gymnasium as gym

    _import_humanoid_bench()
    env_id = task[len(PREFIX) :]
    try:
        # render_mode=None: no renderer is opened (HumanoidBench defaults to an rgb_array one); the time
        # limit is the adapter's, so the TimeLimit wrapper is dropped with the other gymnasium wrappers.
        return gym.make(env_id, render_mode=None, disable_env_checker=True).unwrapped
    except (OSError, ValueError) as err:
        for pattern in _MISSING_FILE:
            match = pattern.search(str(err))
            if match:
                raise TaskNotAvailableError(
                    f"HumanoidBench task {task!r} cannot be built: the installed humanoid_bench lacks the file "
                    f"{match['path']}. Install the full HumanoidBench from its repository to use it "
                    f"(https://github.com/carlosferrazza/humanoid-bench)."
                ) from None
        raise


class HumanoidBenchTaskEnv(SuiteEnv):
    """A HumanoidBench task: no action repeat, HumanoidBench's episode length and early termination.

    Args:
        task (str): ``"humanoid_<robot>-<task>-v0"``, e.g. ``"humanoid_h1hand-walk-v0"``.

    Keyword Args:
        seed (int, optional): seeds the initial-state noise of the next reset. Defaults to ``None``.
        device (torch.device or str, optional): device of the outputs. Defaults to ``"cpu"``.

    Examples:
        >>> env = HumanoidBenchTaskEnv("humanoid_h1-walk-v0", seed=0)
        >>> env.observation_spec["observation"].shape, env.action_spec.shape
        (torch.Size([51]), torch.Size([19]))
    """

    def __init__(self, task: str, *, seed: int | None = None, device: torch.device | str = "cpu"):
        info = lookup(task)
        if info is None:
            raise ValueError(f"{task!r} is not a HumanoidBench task.")
        sim = _make_simulator(info.task)
        self._pending_seed = None
        # HumanoidBench takes normalised actions in [-1, 1] and rescales them to the actuator ranges itself.
        super().__init__(info, *gym_space_dims(sim), device=device, seed=seed, sim=sim)
        # HumanoidBench's own video camera for the task (e.g. "cam_default", following the robot).
        self.default_camera = sim.camera_name or 0

    def _sim_reset(self) -> np.ndarray:
        # gymnasium seeds through reset(seed=...); a seed given with set_seed applies to the next reset.
        seed, self._pending_seed = self._pending_seed, None
        observation, _ = self.sim.reset(seed=seed)
        return observation

    def _sim_step(self, action: np.ndarray) -> SimStep:
        observation, reward, terminated, truncated, _ = self.sim.step(action.astype(np.float32))
        return SimStep(observation, float(reward), bool(terminated), bool(truncated))

    def _sim_seed(self, seed: int) -> None:
        self._pending_seed = seed

    def _sim_close(self) -> None:
        self.sim.close()

    def _sim_model_and_data(self):
        # HumanoidBench's own render() needs a render_mode chosen at construction and draws goal markers for
        # reach / push through its viewer; frames here come from the shared offscreen renderer, without them.
        return self.sim.model, self.sim.data
