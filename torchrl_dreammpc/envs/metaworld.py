"""Meta-World tasks, named and set up as in TD-MPC2.

``mw-<name>`` is the goal-observable MT1 task ``<name>-v3`` (``mw-reach``, ``mw-pick-place-wall``, ... all 50
of them). As in TD-MPC2, the goal and object positions are drawn anew at every reset (Meta-World freezes them
after construction; TD-MPC2 unfreezes them), actions are repeated twice with the rewards summed, and an episode
is 100 agent steps (200 of Meta-World's steps, well under its own 500-step limit). The observation is
Meta-World's 39-dim vector (hand, gripper, objects, previous frame, goal); ``"success"`` is Meta-World's
``info["success"]`` after the agent step (its second simulator step), as TD-MPC2's wrapper returns it.

TD-MPC2 also takes one zero-action step right after each reset and returns the observation from before it;
this adapter does not, so an episode starts from the state the reset produced.

Videos (:meth:`MetaWorldTaskEnv.render`) use TD-MPC2's camera, :data:`VIDEO_CAMERA`.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from ._base import SimStep, SuiteEnv, TaskInfo, default_mujoco_gl, gym_space_dims

# MuJoCo picks its GL backend when it is first imported (here, possibly, by metaworld): EGL on a headless Linux.
default_mujoco_gl(headless_only=True)

__all__ = ["ACTION_REPEAT", "EPISODE_LENGTH", "VIDEO_CAMERA", "MetaWorldTaskEnv", "lookup", "task_names"]

SUITE = "metaworld"
ACTION_REPEAT = 2
EPISODE_LENGTH = 100
PREFIX = "mw-"
_SUFFIX = "-v3-goal-observable"
# TD-MPC2 films Meta-World with camera "corner2" moved to (0.75, 0.075, 0.7); Meta-World 3 ships that very
# camera as "corner4" (corner2's orientation at that position).
VIDEO_CAMERA = "corner4"


@functools.cache
def _environments() -> dict[str, type]:
    """Task name (``mw-...``) -> Meta-World goal-observable env class."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

    return {
        PREFIX + key[: -len(_SUFFIX)]: cls
        for key, cls in ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE.items()
        if key.endswith(_SUFFIX)
    }


def task_names() -> list[str]:
    """Names of the Meta-World tasks that :func:`~torchrl_dreammpc.envs.make_env` builds."""
    return sorted(_environments())


def lookup(task: str) -> TaskInfo | None:
    """Returns the task's :class:`TaskInfo`, ``None`` if the name is no Meta-World task."""
    # TD-MPC2 spells Meta-World's dashed names as they are; accept underscores too.
    name = PREFIX + task[len(PREFIX) :].replace("_", "-") if task.startswith(PREFIX) else task
    if name not in _environments():
        return None
    return TaskInfo(
        task=name,
        suite=SUITE,
        episode_length=EPISODE_LENGTH,
        action_repeat=ACTION_REPEAT,
        episodic=False,
        has_success=True,
    )


class MetaWorldTaskEnv(SuiteEnv):
    """A Meta-World MT1 task with TD-MPC2's setup: random goal per episode, action repeat 2, 100 agent steps.

    Args:
        task (str): ``"mw-<name>"``, e.g. ``"mw-reach"``.

    Keyword Args:
        seed (int, optional): seeds the goal / object positions drawn at each reset. Defaults to ``None``.
        device (torch.device or str, optional): device of the outputs. Defaults to ``"cpu"``.

    Examples:
        >>> env = MetaWorldTaskEnv("mw-reach", seed=0)
        >>> td = env.rollout(3)
        >>> td["next", "observation"].shape, td["next", "success"].dtype
        (torch.Size([3, 39]), torch.bool)
    """

    def __init__(self, task: str, *, seed: int | None = None, device: torch.device | str = "cpu"):
        info = lookup(task)
        if info is None:
            raise ValueError(f"{task!r} is not a Meta-World task.")
        sim = _environments()[info.task](seed=seed)
        # Meta-World fixes the goal after construction; TD-MPC2 draws a new one each episode. Drawing it from
        # the env's own generator (seeded_rand_vec) rather than NumPy's global one makes seeds reproducible.
        sim._freeze_rand_vec = False
        sim.seeded_rand_vec = True
        super().__init__(info, *gym_space_dims(sim), device=device, seed=seed, sim=sim)
        self.default_camera = VIDEO_CAMERA

    def _sim_reset(self) -> np.ndarray:
        observation, _ = self.sim.reset()
        return observation

    def _sim_step(self, action: np.ndarray) -> SimStep:
        observation, reward, terminated, truncated, info = self.sim.step(action)
        # Meta-World's own 500-step truncation is never reached (200 steps per episode), so it is not passed on.
        return SimStep(observation, float(reward), bool(terminated), False, bool(info.get("success", 0.0)))

    def _sim_seed(self, seed: int) -> None:
        self.sim.seed(seed)

    def _sim_close(self) -> None:
        self.sim.close()

    def _sim_model_and_data(self):
        return self.sim.model, self.sim.data

    def _postprocess_frame(self, frame: np.ndarray) -> np.ndarray:
        # Meta-World's cameras were set up for mujoco-py, whose frames came out bottom row first; with a
        # renderer that returns them top row first (mujoco.Renderer, gymnasium) its corner views are upside
        # down. Flipping the rows gives the frames TD-MPC2's videos show.
        return np.ascontiguousarray(frame[::-1])
