"""Our MPPIPlanner against TD-MPC2's MPPI on the same random numbers, step by step along an episode of a trained model.

TD-MPC2's agent (our weights, exported; ``mppi_fidelity.load_reference``) acts for STATES steps from env seed 1.
At every step both planners plan from the same observation and the same previous mean, and consume the same
randomness: the reference's ``torch.randn`` / ``randn_like`` draws are replaced by the parts of one
standard-normal tensor that ``MPPIPlanner`` uses for the same purpose, its Gumbel elite draw by the inverse-CDF
draw from the same tensor, and ``torch.randperm`` (the random Q-head pair) by a permutation both get
(``tests/data/peer_noise.py``). The episode follows the reference's actions. Printed: the largest difference of
the actions and of the final MPPI means, and how many steps differ by more than 1e-6.

In float64 (default) the two agree step by step; in float32 (``--float32``) their rounding differs by ~1e-5 in the
scores, which reorders elites of nearly equal score (the same uniform then picks another elite) or swaps them at the
top-k boundary: on the cartpole model 77 of 200 steps differ (the same distribution, a different sample).
``tests/test_tdmpc2_mppi_reference.py`` checks the same on a tiny model.

    python benchmarks/mppi_same_noise.py runs/cartpole-10k --states 200             # evaluation mode
    python benchmarks/mppi_same_noise.py runs/cartpole-10k --states 200 --explore   # exploration noise too
    python benchmarks/mppi_same_noise.py runs/reacher/snapshots/step_00020000.pt --task reacher-easy
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "tests" / "data"))
import mppi_fidelity as mf  # noqa: E402
from peer_noise import mppi_draws, pinned_randomness  # noqa: E402
from torchrl.envs.utils import ExplorationType, set_exploration_type, step_mdp  # noqa: E402

from torchrl_dreammpc.envs import make_env, task_info  # noqa: E402
from torchrl_dreammpc.trainers.builders import make_planner  # noqa: E402


def one_step(agent, peer_math, planner, td, obs, t0: bool, explore: bool, num_q: int):
    """Both planners' actions from ``obs`` on the same noise (the reference's ``_prev_mean`` is our ``_prev``)."""
    dtype = obs.dtype
    noise = torch.randn(1, planner.noise_per_env, dtype=dtype)
    perms = [torch.randperm(num_q) for _ in range(planner.iterations)]
    draws = mppi_draws(noise, num_samples=planner.num_samples, num_pi_trajs=planner.num_pi_trajs,
                       iterations=planner.iterations, horizon=planner.horizon, action_dim=planner.action_dim,
                       terminal_prior=True, batched=False)
    prev = agent._prev_mean.clone()
    with pinned_randomness(peer_math, draws, noise, planner.action_dim, list(perms)) as (feeder, randperm):
        a_ref = agent.act(obs, t0=t0, eval_mode=not explore).reshape(-1)
    assert len(feeder.draws) == int(not explore) and not randperm.perms, "the reference drew other numbers"
    planner.draw_noise = lambda batch, device, dtype_: noise
    if not t0:
        planner._prev = prev.unsqueeze(1).clone()  # [H, B=1, A]
    x = td.select("observation", "is_init").clone()
    x["observation"], x["is_init"] = obs, torch.full_like(x["is_init"], t0)
    # Ours takes its noise from draw_noise; the pinning gives it the same Q pairs, and no randn draw (any would fail).
    with pinned_randomness(peer_math, [], noise, planner.action_dim, list(perms)), \
            set_exploration_type(ExplorationType.RANDOM if explore else ExplorationType.DETERMINISTIC):
        a_ours = planner(x)["action"].reshape(-1)
    mean_diff = (planner.last_plan[0] - agent._prev_mean).abs().max().item()
    return a_ours, a_ref, mean_diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a trainer run/checkpoint dir or a model file (mppi_fidelity.load_model)")
    parser.add_argument("--task", help="the task, for a model file (a trainer checkpoint knows its own)")
    parser.add_argument("--states", type=int, default=200, help="steps of the episode compared")
    parser.add_argument("--explore", action="store_true", help="exploration mode (TD-MPC2's eval_mode=False)")
    parser.add_argument("--float32", action="store_true", help="compare in float32 instead of float64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the summary as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    wm, task, _ = mf.load_model(args.checkpoint, args.task)
    agent = mf.load_reference(wm, task_info(task).episode_length)
    if agent is None:
        raise SystemExit(f"TD-MPC2's code is needed for the comparison: {mf.PEER} is missing.")
    from common import math as peer_math  # the reference's module, imported by load_reference

    dtype = torch.float32 if args.float32 else torch.float64
    wm.to(dtype)
    agent.model.to(dtype)
    agent._prev_mean.data = agent._prev_mean.to(dtype)
    env = make_env(task, seed=1)
    planner = make_planner(mf.planner_config("mppi"), wm, action_spec=env.action_spec)
    env.set_seed(1)
    torch.manual_seed(args.seed)
    td = env.reset()
    worst, worst_mean, differing = 0.0, 0.0, 0
    with torch.no_grad():
        for t in range(args.states):
            obs = td["observation"].to(dtype)
            a_ours, a_ref, mean_diff = one_step(agent, peer_math, planner, td, obs, t == 0, args.explore,
                                                int(agent.cfg.num_q))
            diff = (a_ours - a_ref).abs().max().item()
            differing += diff > 1e-6
            worst, worst_mean = max(worst, diff), max(worst_mean, mean_diff)
            td = step_mdp(env.step(td.set("action", a_ref.float().reshape(env.action_spec.shape))))
    summary = {"checkpoint": str(args.checkpoint), "task": task, "states": args.states, "explore": args.explore,
               "dtype": str(dtype), "seed": args.seed, "steps_differing_over_1e-6": differing,
               "max_action_diff": worst, "max_mean_diff": worst_mean, "command": " ".join(["python", *sys.argv])}
    print(json.dumps(summary))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
