"""What the policy prior looks like on each world-model snapshot of a run: how saturated its mean is and how
wide its distribution, on the states its own deterministic evaluation episodes visit.

    python benchmarks/policy_prior_state.py --run-dir ../runs/acrobot-swingup-dream_mpc-1M-s1 --task acrobot-swingup

For every ``snapshots/step_<N>.pt``: one DETERMINISTIC episode of the policy prior (seed ``--seed``, the campaign's
evaluation seed), then on the visited states: the fraction of action dimensions whose squashed mean is within
0.01 of ±1 (``saturated``), the mean |squashed mean|, the mean log-std (TD-MPC2's range is [-10, 2]), and the
fraction of steps whose action equals the previous one in every dimension (``repeated``: a policy that plays one
constant action has 1.0). Writes ``--json`` (default ``<run dir>/policy_prior.json``; snapshots already in it are
kept, not redone) and prints a table. ``benchmarks/campaign.py`` runs it on every run; the report shows it beside
the planner-swap table (Dream-MPC's candidates are sampled from this prior). Every model family acts through its
own acting path (DreamerV3: its RSSM state estimator), and the prior is read on the latents it acted from.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from campaign import SNAPSHOT_NAME  # noqa: E402


@torch.no_grad()
def prior_state(world_model, task: str, seed: int) -> dict[str, float]:
    import functools

    from torchrl.envs.utils import ExplorationType, set_exploration_type

    from torchrl_dreammpc.envs import make_env, with_transforms
    from torchrl_dreammpc.planners import PolicyActor

    # The model's acting path (DreamerV3: its RSSM state estimator in front of the actor, with the env transforms
    # that carry its state); the prior is then read on the latents it acted from.
    env = with_transforms(functools.partial(make_env, task, seed=seed), world_model.acting_transforms())()
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        episode = env.rollout(10_000, world_model.acting_module(PolicyActor(world_model)), break_when_any_done=True)
    env.close()
    key = world_model.latent_key
    z = episode[key] if key is not None else world_model.encode(episode["observation"])
    # WorldModelBase.policy: (action, squashed mean, log-std) in every family (policy_params is not: TD-MPC2's
    # mean is pre-squash, BMPC's already squashed, DreamerV3's second entry a std).
    _, squashed, log_std = world_model.policy(z, deterministic=True)
    action = episode["action"]
    return {
        "steps": int(episode.shape[0]),
        "return": float(episode["next", "reward"].sum()),
        "saturated": float((squashed.abs() > 0.99).float().mean()),
        "mean_abs_tanh_mean": float(squashed.abs().mean()),
        "mean_log_std": float(log_std.mean()),
        "repeated": float((action[1:] == action[:-1]).all(-1).float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--seed", type=int, default=1001, help="the campaign's evaluation seed")
    parser.add_argument("--json", type=Path, default=None, help="default: <run dir>/policy_prior.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from torchrl_dreammpc.checkpoints import load_world_model, write_text_atomic

    out = args.json or args.run_dir / "policy_prior.json"
    rows = json.loads(out.read_text())["snapshots"] if out.exists() else {}
    for path in sorted((args.run_dir / "snapshots").glob("step_*.pt")):
        step = str(int(SNAPSHOT_NAME.fullmatch(path.name)[1]))
        if step in rows:
            continue
        world_model = load_world_model(path)
        rows[step] = prior_state(world_model, args.task, args.seed)
        r = rows[step]
        print(f"step {int(step):>7}: return {r['return']:8.1f}  saturated {r['saturated']:.2f}  |mean| "
              f"{r['mean_abs_tanh_mean']:.3f}  log_std {r['mean_log_std']:+.2f}  repeated {r['repeated']:.2f}",
              flush=True)
    if not rows:
        raise SystemExit(f"no snapshots in {args.run_dir / 'snapshots'}")
    write_text_atomic(out, json.dumps({"task": args.task, "seed": args.seed,  # atomic: the campaign report reads it
                                       "command": " ".join(["python", *sys.argv]), "snapshots": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
