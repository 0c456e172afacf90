"""Cost per environment step of BMPC training against TD-MPC2 training, in one process.

A training step of :class:`~torchrl_dreammpc.trainers.DreamMPCTrainer` at UTD 1 is one env step (the acting planner),
one update and, for ``algorithm=bmpc``, every ``interval``-th update a lazy reanalyze (BMPC: MPPI with 512 samples,
6 iterations re-planning 20 x 3 = 60 sampled states). This script builds each (algorithm, acting planner) pair on
the same task and model size, skips a short seed phase, and times ``--steps`` training steps (a multiple of the
reanalyze interval, so each BMPC window holds the same share of reanalyzes), split into

- ``plan``: the acting planner's forward (Dream-MPC N=5, H=3, I=1; or MPPI 512 x 6);
- ``update``: the stepper (world model + policy + target update);
- ``reanalyze``: the :class:`~torchrl_dreammpc.trainers.LazyReanalyze` re-plans (BMPC only; ``states_per_call``
  auto: 6 states per MPPI call on a CPU);
- ``rest``: the env step and the trainer's machinery.

The configurations run in ``--rounds`` interleaved rounds (A B C D, A B C D, ...): on a shared machine the load
drifts, and interleaving spreads it over all of them; the table gives the median and the min over the rounds.

    python benchmarks/bmpc_cost.py                          # cartpole-swingup, 1M model, batch 256, 3 rounds
    python benchmarks/bmpc_cost.py --task humanoid_h1hand-stand-v0   # its own section and JSON
    python benchmarks/bmpc_cost.py --steps 20 --rounds 1 --no-write
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, machine_info, write_json, write_section  # noqa: E402
from trainer_overhead import Stopwatch, timed_window  # noqa: E402

from torchrl_dreammpc.envs import make_env, task_info  # noqa: E402
from torchrl_dreammpc.planners.mppi import tdmpc2_iterations  # noqa: E402
from torchrl_dreammpc.trainers import DreamMPCTrainer  # noqa: E402
from torchrl_dreammpc.trainers.builders import make_planner, make_world_model  # noqa: E402
from torchrl_dreammpc.trainers.replay import EXPERT_KEY  # noqa: E402

#: (algorithm, acting planner, compiled update); compiled: the benchmark campaign's setting (``compile: true``),
#: which with BMPC also compiles the reanalyze planner.
CONFIGS = [("tdmpc2", "dream_mpc", False), ("bmpc", "dream_mpc", False), ("tdmpc2", "mppi", False),
           ("bmpc", "mppi", False), ("tdmpc2", "dream_mpc", True), ("bmpc", "dream_mpc", True)]
PLANNER_CFG = {
    "dream_mpc": {"name": "dream_mpc", "uncertainty_weight": None},  # the family's lambda: 0.01 / 0.1
    "mppi": {"name": "mppi"},  # TD-MPC2's and BMPC's 512 samples, 64 elites, 6 iterations, 24 prior samples
}
#: The task of the section ``bmpc_cost`` and of ``bmpc_cost.json``; another task writes ``bmpc_cost_<task>``.
DEFAULT_TASK = "cartpole-swingup"
SIZES = {1: dict(enc_dim=256, mlp_dim=384, latent_dim=128, num_enc_layers=2, num_q=2), 5: dict()}


def measure(algorithm: str, planner: str, compile: bool, task: str, model_size: int, batch_size: int, steps: int,
            warmup: int) -> dict:
    torch.manual_seed(0)
    info = task_info(task)
    env = make_env(task)
    obs_dim, action_spec = env.observation_spec["observation"].shape[-1], env.action_spec
    env.close()
    model_cfg = {"size": model_size, **SIZES.get(model_size, {})}
    if algorithm == "bmpc":
        # BMPC's V ensemble has its own size (2); make_world_model makes BMPC models non-episodic
        model_cfg = {k: v for k, v in model_cfg.items() if k != "num_q"}
    wm = make_world_model(model_cfg, obs_dim, action_spec.shape[-1], episode_length=info.episode_length,
                          episodic=info.episodic, algorithm=algorithm)
    actor = make_planner(PLANNER_CFG[planner], wm, action_spec=action_spec,
                         expert_key=EXPERT_KEY if algorithm == "bmpc" else None)
    seed_frames, pretrain = 4 * batch_size, 5
    total = seed_frames + warmup + steps
    with tempfile.TemporaryDirectory() as tmp:
        trainer = DreamMPCTrainer(
            create_env_fn=functools.partial(make_env, task, seed=1), world_model=wm, actor=actor, total_frames=total,
            batch_size=batch_size, seed=1, seed_frames=seed_frames, pretrain_updates=pretrain, eval_interval=0,
            log_dir=Path(tmp) / "run", log_interval=1000, checkpoint_dir=None, task=task, planner_name=planner,
            verbose=False, algorithm=algorithm, compile=compile)
        plan, update, reanalyze = Stopwatch(), Stopwatch(), Stopwatch()
        actor.forward = plan.wrap(actor.forward)
        trainer.optimization_stepper.step = update.wrap(trainer.optimization_stepper.step)
        for hook in trainer.algorithm_hooks:
            hook.reanalyze = reanalyze.wrap(hook.reanalyze)
        window = timed_window(trainer, seed_frames + warmup, total, (plan, update, reanalyze))
        trainer.train()
        trainer.collector.shutdown()
    wall = window["stop"] - window["start"]
    n = steps
    return {
        "algorithm": algorithm, "planner": planner, "compile": compile, "params": wm.num_params,
        "wall_ms": 1000 * wall / n, "plan_ms": 1000 * plan.total / n, "update_ms": 1000 * update.total / n,
        "reanalyze_ms": 1000 * reanalyze.total / n, "reanalyzes": reanalyze.calls,
        "rest_ms": 1000 * (wall - plan.total - update.total - reanalyze.total) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default=DEFAULT_TASK)
    parser.add_argument("--model-size", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="measured steps per round (a multiple of 10)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/performance.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    runs = {cfg: [] for cfg in CONFIGS}
    for r in range(args.rounds):
        for cfg in CONFIGS:
            result = measure(*cfg, args.task, args.model_size, args.batch_size, args.steps, args.warmup)
            runs[cfg].append(result)
            print(f"round {r}: {cfg[0]:7s} + {cfg[1]:9s}{' compiled' if cfg[2] else ''}: {result['wall_ms']:8.1f} "
                  f"ms/step (plan "
                  f"{result['plan_ms']:.1f}, update {result['update_ms']:.1f}, reanalyze {result['reanalyze_ms']:.1f}"
                  f" over {result['reanalyzes']} reanalyzes, rest {result['rest_ms']:.1f})", flush=True)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    rows, summary = [], {}
    base = statistics.median(x["wall_ms"] for x in runs[CONFIGS[0]])
    for cfg in CONFIGS:
        med = {k: statistics.median(x[k] for x in runs[cfg]) for k in ("wall_ms", "plan_ms", "update_ms",
                                                                         "reanalyze_ms", "rest_ms")}
        low = min(x["wall_ms"] for x in runs[cfg])
        summary["+".join(cfg[:2]) + ("+compiled" if cfg[2] else "")] = {"median": med, "min_wall_ms": low,
                                                                          "runs": runs[cfg]}
        rows.append(f"| {cfg[0]} | {cfg[1]} | {'yes' if cfg[2] else 'no'} | {med['wall_ms']:.0f} ({low:.0f}) | "
                    f"{med['plan_ms']:.1f} | "
                    f"{med['update_ms']:.1f} | {med['reanalyze_ms']:.1f} | {med['rest_ms']:.1f} | "
                    f"{med['wall_ms'] / base:.1f}x |")
    machine = machine_info()
    env = make_env(args.task)
    iterations = tdmpc2_iterations(env.action_spec.shape[-1])  # BMPC's re-planner: +2 from 20 action dimensions
    env.close()
    name = "bmpc_cost" if args.task == DEFAULT_TASK else f"bmpc_cost_{args.task}"
    md = f"""## BMPC training against TD-MPC2 training (cost per environment step), {args.task}

`{machine['command']}` — {machine['cpu']}, torch {machine['torch']}, {args.threads} thread(s); load average
{' '.join(load_before)} before, {' '.join(load_after)} after (a shared machine: compare within the table, whose
configurations ran interleaved, {args.rounds} rounds).

Per training step of `DreamMPCTrainer` (UTD 1: one env step + one update), {args.task}, model_size={args.model_size},
batch {args.batch_size}×H3, mean over {args.steps} steps after the seed phase; median over the rounds (min in
brackets). BMPC reanalyzes every 10 updates (60 states, MPPI 512 samples × {iterations} iterations, 6 states per call on
a CPU), so its column is one tenth of a reanalyze per step. "compiled": `compile=true` (the benchmark campaign's
setting): `torch.compile`d update and, with BMPC, reanalyze planner; the acting planner stays eager in every row.

| algorithm | acting planner | compiled | ms / step | plan | update | reanalyze | env + machinery | vs TD-MPC2 + Dream-MPC |
| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |
{chr(10).join(rows)}

The reanalyze is BMPC's price: ~60 MPPI plans every 10 steps, i.e. about 6 MPPI plans per env step. On a GPU (BMPC's
setting) those 60 states are one batched call; on these CPUs it dominates the step, whatever the acting planner.
"""
    print(md)
    if not args.no_write:
        write_section(name, md)
        write_json(ROOT / "docs" / "results" / f"{name}.json",
                   {"machine": machine, "load_before": load_before, "load_after": load_after, "args": vars(args),
                    "results": summary})


if __name__ == "__main__":
    main()
