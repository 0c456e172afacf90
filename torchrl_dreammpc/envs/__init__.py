"""Task suite: DMC, Meta-World and HumanoidBench tasks as TorchRL envs with TD-MPC2's conventions.

:func:`make_env` builds any task by the name TD-MPC2 / Dream-MPC gives it; :func:`task_info` says what a
trainer needs to know about it (episode length, action repeat, ...) without building it.

Every env exposes one float32 ``"observation"`` vector, actions in ``[-1, 1]``, a float32 ``"reward"`` summed
over the repeated simulator steps, ``"done"`` / ``"terminated"`` / ``"truncated"`` (a time limit is
``truncated``), and, from its transforms, ``"is_init"`` (:class:`~torchrl.envs.InitTracker`), ``"step_count"``
(:class:`~torchrl.envs.StepCounter`) and ``"episode_reward"`` (:class:`~torchrl.envs.RewardSum`).

Suites (details, sizes and timings in ``docs/tasks.md``):

- DMC (``walker-walk``, ``cup-catch``, ``dog-run``, ...): action repeat 2, 500 agent steps, no early end.
- Meta-World (``mw-reach``, ``mw-pick-place-wall``, ...): action repeat 2, 100 agent steps, ``"success"`` entry.
- HumanoidBench, optional (``humanoid_h1hand-walk-v0``, ...): no action repeat, 1000 steps (500 for a few
  tasks), early termination (a fall, for most tasks) as ``terminated``.
"""
from __future__ import annotations

import difflib
import functools
import importlib
from typing import Any

import torch
from tensordict import TensorDictBase
from torchrl.envs import Transform

from ._base import SuiteEnv, TaskInfo, TaskNotAvailableError, UnknownTaskError

__all__ = [
    "SuiteEnv",
    "TerminationAsTruncation",
    "TaskInfo",
    "TaskNotAvailableError",
    "UnknownTaskError",
    "available_tasks",
    "check_episodic",
    "make_base_env",
    "make_env",
    "task_info",
    "with_transforms",
]

# suite name -> (module, env class name)
_SUITES = {
    "dmc": ("dmc", "DMControlTaskEnv"),
    "metaworld": ("metaworld", "MetaWorldTaskEnv"),
    "humanoid_bench": ("humanoid", "HumanoidBenchTaskEnv"),
}
_OPTIONS = ("num_envs", "parallel", "episodic")


def _module(suite: str):
    return importlib.import_module(f"{__name__}.{_SUITES[suite][0]}")


def available_tasks(suite: str | None = None) -> list[str]:
    """Lists the task names :func:`make_env` knows, for one suite or all.

    HumanoidBench names are listed for every robot of HumanoidBench's registry; which of them load depends on
    the installed copy (see ``docs/tasks.md``).

    Args:
        suite (str, optional): ``"dmc"``, ``"metaworld"`` or ``"humanoid_bench"``. Defaults to all suites.

    Examples:
        >>> "walker-walk" in available_tasks("dmc")
        True
    """
    if suite is not None and suite not in _SUITES:
        raise ValueError(f"Unknown suite {suite!r}; choose from {sorted(_SUITES)}.")
    suites = [suite] if suite is not None else list(_SUITES)
    return [name for s in suites for name in _module(s).task_names()]


def task_info(task: str) -> TaskInfo:
    """Returns what a trainer needs to know about a task, without building it.

    This is the one place that holds episode lengths and action repeats: TD-MPC2 derives its discount from
    ``episode_length`` and sizes its seeding phase with it.

    Args:
        task (str): a task name, e.g. ``"walker-walk"``, ``"mw-reach"`` or ``"humanoid_h1hand-walk-v0"``.

    Returns:
        TaskInfo: canonical name, suite, episode length (agent steps), action repeat, whether episodes can
        end early (``episodic``), and whether a ``"success"`` entry is written.

    Raises:
        UnknownTaskError: (a ``ValueError``) for unknown names; the message lists close matches.
        TaskNotAvailableError: (a ``ValueError``) for known tasks that cannot be built yet.

    Examples:
        >>> info = task_info("walker-walk")
        >>> info.suite, info.episode_length, info.action_repeat, info.episodic
        ('dmc', 500, 2, False)
    """
    if not isinstance(task, str):
        raise TypeError(f"task must be a str, got {type(task).__name__}.")
    # Meta-World and HumanoidBench are told apart by their prefixes; DMC's humanoid_CMU-* also starts with
    # "humanoid_", so DMC is asked before HumanoidBench.
    if task.startswith("mw-"):
        order = ("metaworld",)
    elif task.startswith("humanoid_"):
        order = ("dmc", "humanoid_bench")
    else:
        order = ("dmc",)
    for suite in order:
        info = _module(suite).lookup(task)
        if info is not None:
            return info
    known = available_tasks()
    close = difflib.get_close_matches(task, known, n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise UnknownTaskError(
        f"Unknown task {task!r}.{hint} Tasks are named as in TD-MPC2: DMC 'walker-walk', Meta-World 'mw-reach', "
        "HumanoidBench 'humanoid_h1hand-walk-v0'; see torchrl_dreammpc.envs.available_tasks()."
    )


def make_base_env(task: str, seed: int | None = 0, device: torch.device | str = "cpu") -> SuiteEnv:
    """Builds the task's env without transforms: one simulator, TD-MPC2's action repeat and episode length.

    This is what each worker of a batched env runs; most code wants :func:`make_env`.

    Args:
        task (str): a task name (see :func:`task_info`).
        seed (int, optional): seed of the simulator's randomness. Defaults to ``0``.
        device (torch.device or str, optional): device of the outputs. Defaults to ``"cpu"``.

    Examples:
        >>> env = make_base_env("cartpole-swingup")
        >>> env.rollout(2)["next", "reward"].shape
        torch.Size([2, 1])
    """
    info = task_info(task)
    cls = getattr(_module(info.suite), _SUITES[info.suite][1])
    return cls(info.task, seed=seed, device=device)


def _check_options(options: dict[str, Any]) -> tuple[int, bool]:
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, _OPTIONS, n=1)
            hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
        raise TypeError(
            f"make_env got unknown option(s) {', '.join(hints)}; accepted options: {', '.join(_OPTIONS)}."
        )
    num_envs = options.get("num_envs", 1)
    parallel = options.get("parallel", False)
    if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
        raise ValueError(f"num_envs must be a positive int, got {num_envs!r}.")
    if not isinstance(parallel, bool):
        raise ValueError(f"parallel must be a bool, got {parallel!r}.")
    return num_envs, parallel


def check_episodic(episodic: Any, info: TaskInfo) -> None:
    """Refuses an ``episodic`` override (``make_env``'s option, the recipes' ``episodic`` key) that is neither a
    bool nor ``None`` (the task's own flag), or ``True`` on a task whose episodes never end early.

    Examples:
        >>> check_episodic(False, task_info("humanoid_h1hand-stand-v0"))  # falls end episodes as time limits do
        >>> check_episodic(True, task_info("cartpole-swingup"))
        Traceback (most recent call last):
        ...
        ValueError: episodic=True: episodes of cartpole-swingup never end early (they run to the time limit).
    """
    if episodic is not None and not isinstance(episodic, bool):
        raise ValueError(f"episodic must be a bool or None (the task's own), got {episodic!r}.")
    if episodic and not info.episodic:
        raise ValueError(f"episodic=True: episodes of {info.task} never end early (they run to the time limit).")


class TerminationAsTruncation(Transform):
    """Reports an episode end that the simulator calls terminal (a HumanoidBench robot that fell) as a time limit:
    ``truncated`` instead of ``terminated``; ``done`` is unchanged, the episode still ends there. A learner then
    bootstraps through it, as HumanoidBench's and BMPC's TD-MPC2 runs do (their wrappers return no terminal
    flag). What ``make_env(..., episodic=False)`` appends.

    Examples:
        >>> env = make_env("cartpole-swingup", seed=0).append_transform(TerminationAsTruncation())
        >>> td = env.rollout(2)
        >>> td["next", "terminated"].any().item(), td["next", "truncated"].any().item()
        (False, False)
    """

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        terminated = next_tensordict.get("terminated")
        next_tensordict.set("truncated", next_tensordict.get("truncated") | terminated)
        next_tensordict.set("terminated", torch.zeros_like(terminated))
        return next_tensordict

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        return tensordict_reset


def make_env(task: str, seed: int = 0, device: torch.device | str = "cpu", **options):
    """Builds a task as a TorchRL env with TD-MPC2's conventions.

    The returned :class:`~torchrl.envs.TransformedEnv` wraps the task's env (or a batch of them) with
    :class:`~torchrl.envs.InitTracker` (``"is_init"``, read by the planners to reset their warm start),
    :class:`~torchrl.envs.StepCounter` (``"step_count"``) and :class:`~torchrl.envs.RewardSum`
    (``"episode_reward"``). Observations are one float32 ``"observation"`` vector, actions lie in ``[-1, 1]``.

    Args:
        task (str): the task name as TD-MPC2 / Dream-MPC spell it: DMC ``"walker-walk"``, ``"cup-catch"``,
            ``"cheetah-run-backwards"``; Meta-World ``"mw-reach"``; HumanoidBench ``"humanoid_h1hand-walk-v0"``.
        seed (int, optional): seed of the simulator's randomness (initial states, goals). Batched envs seed
            their workers with :meth:`~torchrl.envs.EnvBase.set_seed`, which gives each a distinct seed.
            Defaults to ``0``.
        device (torch.device or str, optional): device of the env's outputs. Defaults to ``"cpu"``.

    Keyword Args:
        num_envs (int, optional): number of copies of the env run as one batched env. Defaults to ``1`` (an
            unbatched env).
        parallel (bool, optional): run the copies in worker processes (:class:`~torchrl.envs.ParallelEnv`)
            instead of one after the other in this process (:class:`~torchrl.envs.SerialEnv`).
            ``parallel=True`` with ``num_envs=1`` gives a one-worker ``ParallelEnv``. Defaults to ``False``.
        episodic (bool, optional): ``False`` on a task whose episodes end early (``task_info(task).episodic``):
            those ends are reported as ``truncated``, not ``terminated`` (:class:`TerminationAsTruncation`).
            ``True`` only on such a task. Defaults to ``None``: the task's own flags.

    Raises:
        UnknownTaskError: (a ``ValueError``) for unknown names, listing close matches.
        TaskNotAvailableError: (a ``ValueError``) for known tasks that cannot be built (not implemented yet, or
            files missing from the installed simulator).
        ImportError: when an optional simulator (HumanoidBench) is missing; the message says how to install it.
        TypeError: for unknown options.

    Examples:
        >>> env = make_env("walker-walk", seed=0)
        >>> td = env.rollout(3)
        >>> td["next", "observation"].shape, td["next", "episode_reward"].shape
        (torch.Size([3, 24]), torch.Size([3, 1]))
        >>> batched = make_env("walker-walk", seed=0, num_envs=4)
        >>> batched.rollout(3)["next", "observation"].shape
        torch.Size([4, 3, 24])
    """
    from torchrl.envs import Compose, InitTracker, ParallelEnv, RewardSum, SerialEnv, StepCounter, TransformedEnv

    num_envs, parallel = _check_options(options)
    info = task_info(task)  # fail fast on bad names, before any worker starts
    episodic = options.get("episodic")
    check_episodic(episodic, info)
    if info.suite == "humanoid_bench":
        # An ImportError with install instructions here beats one raised inside a worker process.
        _module(info.suite)._import_humanoid_bench()
    if num_envs == 1 and not parallel:
        base = make_base_env(info.task, seed=seed, device=device)
    else:
        create = functools.partial(make_base_env, info.task, seed=None, device=device)
        batched_cls = ParallelEnv if parallel else SerialEnv
        base = batched_cls(num_envs, create, device=device)
        # TorchRL seeds worker i with the i-th seed of a chain started at `seed`, so workers differ.
        base.set_seed(seed)
    transforms = [InitTracker(), StepCounter(), RewardSum()]
    if episodic is False and info.episodic:
        transforms.insert(0, TerminationAsTruncation())
    return TransformedEnv(base, Compose(*transforms))


class _WithTransforms:
    """``create_env_fn`` whose envs get (copies of) ``transforms`` appended; picklable for worker processes."""

    def __init__(self, create_env_fn, transforms):
        self.create_env_fn, self.transforms = create_env_fn, list(transforms)

    def __call__(self):
        from torchrl.envs import TensorDictPrimer

        env = self.create_env_fn()
        for transform in self.transforms:
            if isinstance(transform, TensorDictPrimer):
                keys = list(transform.primers.keys(True, True))
                if all(key in env.observation_spec.keys(True, True) for key in keys):
                    continue  # the env already declares these entries (its caller added the primer)
            env = env.append_transform(transform.clone())
        return env


def with_transforms(create_env_fn, transforms):
    """An env factory that appends ``transforms`` to every env ``create_env_fn`` builds.

    Used for the transforms a world model's acting path needs
    (:meth:`~torchrl_dreammpc.modules.WorldModelBase.acting_transforms`, e.g. the
    :class:`~torchrl.envs.TensorDictPrimer` of a recurrent state). A primer whose entries the env already has is
    not added twice. With no transforms, ``create_env_fn`` itself is returned.

    Examples:
        >>> from torchrl_dreammpc.modules import DreamerV3WorldModel
        >>> wm = DreamerV3WorldModel(5, 1, model_size="cpu")
        >>> create = with_transforms(functools.partial(make_env, "cartpole-swingup"), wm.acting_transforms())
        >>> create().reset()["belief"].shape
        torch.Size([256])
    """
    transforms = list(transforms)
    return _WithTransforms(create_env_fn, transforms) if transforms else create_env_fn
