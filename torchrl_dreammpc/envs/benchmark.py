"""Measures env build time and milliseconds per agent step of tasks, as a markdown table.

Usage::

    python -m torchrl_dreammpc.envs.benchmark walker-walk mw-reach humanoid_h1hand-walk-v0 --steps 500

Each task is built with :func:`~torchrl_dreammpc.envs.make_env` (transforms included) and stepped with
uniform random actions through ``env.rollout(steps, break_when_any_done=False)``, so resets after early
terminations are part of the time. Tasks that cannot be built are reported with the error instead.
"""
from __future__ import annotations

import argparse
import time

import torch

from . import make_env, task_info


def measure(task: str, steps: int = 500, seed: int = 0) -> dict:
    """Builds ``task`` and times a random-action rollout of ``steps`` agent steps.

    Args:
        task (str): a task name.
        steps (int, optional): agent steps to time. Defaults to ``500``.
        seed (int, optional): env seed. Defaults to ``0``.

    Returns:
        dict: task, observation / action sizes, episode length, action repeat, build seconds, ms per step.

    Examples:
        >>> measure("cartpole-swingup", steps=50)["observation_size"]
        5
    """
    torch.manual_seed(seed)
    start = time.perf_counter()
    env = make_env(task, seed=seed)
    built = time.perf_counter() - start
    env.rollout(5)  # warm-up
    start = time.perf_counter()
    env.rollout(steps, break_when_any_done=False)
    per_step = (time.perf_counter() - start) / steps
    info = task_info(task)
    result = {
        "task": info.task,
        "observation_size": env.observation_spec["observation"].shape[-1],
        "action_size": env.action_spec.shape[-1],
        "episode_length": info.episode_length,
        "action_repeat": info.action_repeat,
        "build_s": built,
        "ms_per_step": 1000 * per_step,
    }
    env.close()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="+")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| task | obs | action | episode | repeat | build (s) | ms / step |")
    print("|---|---|---|---|---|---|---|")
    for task in args.tasks:
        try:
            r = measure(task, args.steps)
        except Exception as err:  # report and go on: the table is the point
            print(f"| `{task}` | {type(err).__name__}: {str(err).splitlines()[0][:120]} | | | | | |")
            continue
        print(
            f"| `{r['task']}` | {r['observation_size']} | {r['action_size']} | {r['episode_length']} | "
            f"{r['action_repeat']} | {r['build_s']:.2f} | {r['ms_per_step']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
