"""One warm-started MPPI step, ours against TD-MPC2's, on the same state and the same previous mean.

TD-MPC2's agent (our weights, exported) acts for STEPS steps from env seed 1 (evaluation mode); its observation and
shifted-mean state ``_prev_mean`` are then frozen, and CALLS calls of each MPPI plan from them (ours with its
``_prev`` set to the same mean, ``is_init`` False). Prints the action's mean / std per dimension, the KS p-value
and, for the spread, the Brown-Forsythe test (Levene's about the median: robust to the non-normal, often skewed
distribution of a planned action, where the normal-theory standard error of a std is too small) and a bootstrap
95 % interval of the ratio std(ours) / std(ref). SEED (default 0) seeds torch before the run.
It complements ``mppi_fidelity.py``, whose one-step comparison is at an episode start (no warm start).

    python benchmarks/mppi_warm_step.py CHECKPOINT STEPS CALLS [SEED]    # e.g. runs/cartpole-10k 100 300
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mppi_fidelity as mf  # noqa: E402
from scipy.stats import ks_2samp, levene  # noqa: E402
from torchrl.envs.utils import ExplorationType, set_exploration_type, step_mdp  # noqa: E402

from torchrl_dreammpc.envs import make_env, task_info  # noqa: E402
from torchrl_dreammpc.trainers.builders import make_planner  # noqa: E402


def std_ratio_interval(o: torch.Tensor, r: torch.Tensor, draws: int = 4000) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of ``std(o) / std(r)`` (each sample resampled on its own)."""
    g = torch.Generator().manual_seed(1)
    io = torch.randint(len(o), (draws, len(o)), generator=g)
    ir = torch.randint(len(r), (draws, len(r)), generator=g)
    ratio = o[io].std(1) / r[ir].std(1)
    return ratio.quantile(0.025).item(), ratio.quantile(0.975).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a trainer run/checkpoint dir or a model file (mppi_fidelity.load_model)")
    parser.add_argument("steps", type=int, help="reference steps before the frozen state")
    parser.add_argument("calls", type=int, help="calls of each planner from that state")
    parser.add_argument("seed", type=int, nargs="?", default=0, help="torch seed (default 0)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    wm, task, _ = mf.load_model(args.checkpoint, None)
    agent = mf.load_reference(wm, task_info(task).episode_length)
    if agent is None:
        raise SystemExit(f"TD-MPC2's code is needed for the comparison: {mf.PEER} is missing.")
    env = make_env(task, seed=1)
    env.set_seed(1)
    torch.manual_seed(args.seed)
    td = env.reset()
    with torch.no_grad():
        for t in range(args.steps):
            a = agent.act(td["observation"], t0=(t == 0), eval_mode=True)
            td = step_mdp(env.step(td.set("action", a.reshape(env.action_spec.shape))))
    prev = agent._prev_mean.clone()  # [H, A]
    obs = td["observation"].clone()
    planner = make_planner(mf.planner_config("mppi"), wm, action_spec=env.action_spec)
    print("prev_mean", prev.flatten().tolist())
    ref, ours = [], []
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        planner(td.select("observation", "is_init").clone())  # sets the planner's per-env state (B = 1)
    assert bool(planner._has_prev.all()), "our planner would not warm-start"
    with torch.no_grad():
        for i in range(args.calls):
            agent._prev_mean.copy_(prev)
            ref.append(agent.act(obs, t0=False, eval_mode=True).reshape(-1).float())
            planner._prev = prev.unsqueeze(1).clone()  # [H, B=1, A]
            x = td.select("observation", "is_init").clone()
            x["is_init"] = torch.zeros_like(x["is_init"])
            with set_exploration_type(ExplorationType.DETERMINISTIC):
                ours.append(planner(x)["action"].reshape(-1).float())
    ref, ours = torch.stack(ref), torch.stack(ours)
    for d in range(ref.shape[1]):
        r, o = ref[:, d], ours[:, d]
        se = (r.var() / len(r) + o.var() / len(o)).sqrt()
        print(f"dim {d}: mean ours {o.mean():.4f} ref {r.mean():.4f} z {(o.mean() - r.mean()) / se:+.2f}; "
              f"std ours {o.std():.4f} ref {r.std():.4f}; KS p {ks_2samp(o.numpy(), r.numpy()).pvalue:.3f}; "
              f"Brown-Forsythe p {levene(o.numpy(), r.numpy(), center='median').pvalue:.3f}; "
              "std ratio 95 % bootstrap [{:.3f}, {:.3f}]".format(*std_ratio_interval(o, r)))


if __name__ == "__main__":
    main()
