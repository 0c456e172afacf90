"""Per-step cost of the trainer machinery versus the work it schedules (planning + update).

One training step of :class:`~torchrl_dreammpc.trainers.DreamMPCTrainer` at UTD 1 is: the collector asks the planner
for an action, steps the env, stores the transition; the Trainer runs its hooks (replay write, logging, evaluation
and checkpoint schedules), samples a batch of sub-trajectories and runs one TD-MPC2 update. This script times, over
``--steps`` steps after the seed phase and pre-training:

- ``plan``: the planner's forward (Dream-MPC, published settings);
- ``update``: :meth:`TDMPC2OptimizationStepper.step` (world model + policy + target update);
- ``env``: the simulator step (the task's ``_step``: action repeat included);
- ``machinery``: everything else in the wall time of the loop (collector bookkeeping, Trainer hooks, replay
  write and sampling, logging).

and reports ``overhead = machinery / (plan + update)``. Evaluation is off and checkpoints are timed separately
(one save of the run's state, amortized over the default 10k-step interval).

    python benchmarks/trainer_overhead.py                    # cartpole-swingup, 1M model, batch 256
    python benchmarks/trainer_overhead.py --steps 100 --no-write
"""
from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, machine_info, write_json, write_section  # noqa: E402

from torchrl_dreammpc.envs import make_env, task_info  # noqa: E402
from torchrl_dreammpc.modules import TDMPC2WorldModel, discount_from_episode_length  # noqa: E402
from torchrl_dreammpc.planners import GradientMPCPlanner  # noqa: E402
from torchrl_dreammpc.trainers import DreamMPCTrainer  # noqa: E402


class Stopwatch:
    """Accumulates the wall time of calls while ``active``."""

    def __init__(self) -> None:
        self.total, self.calls, self.active = 0.0, 0, False

    def wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - start
                self.calls += 1

        return timed


def timed_window(trainer, start_frame: int, stop_frame: int, stopwatches) -> dict:
    """Registers a ``post_steps`` op on ``trainer`` that opens a wall-clock window (and activates ``stopwatches``)
    once ``start_frame`` frames are collected and closes it at ``stop_frame``. Returns the dict that receives
    ``"start"`` / ``"stop"`` (``perf_counter`` times) while ``trainer.train()`` runs."""
    window = {}

    def start_stop():
        frames = trainer.collected_frames
        if frames in (start_frame, stop_frame):
            window["start" if frames == start_frame else "stop"] = time.perf_counter()
            for watch in stopwatches:
                watch.active = frames == start_frame

    trainer.register_op("post_steps", start_stop)
    return window


def measure(task: str, model_size: int, batch_size: int, steps: int, warmup: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    info = task_info(task)
    env = make_env(task)
    obs_dim, action_dim = env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1]
    env.close()
    wm = TDMPC2WorldModel(obs_dim, action_dim, model_size=model_size,
                          discount=discount_from_episode_length(info.episode_length))
    actor = GradientMPCPlanner(wm)  # Dream-MPC's published settings: N=5, H=3, I=1, lr 0.1
    seed_frames, pretrain = 4 * batch_size, 5
    total = seed_frames + warmup + steps
    with tempfile.TemporaryDirectory() as tmp:
        trainer = DreamMPCTrainer(
            create_env_fn=functools.partial(make_env, task, seed=1), world_model=wm, actor=actor, total_frames=total,
            batch_size=batch_size, seed=1, seed_frames=seed_frames, pretrain_updates=pretrain, eval_interval=0,
            log_dir=Path(tmp) / "run", log_interval=100, checkpoint_dir=Path(tmp) / "run" / "checkpoints",
            checkpoint_interval=10_000, task=task, planner_name="dream_mpc", verbose=False,
        )
        plan, update, sim, save = Stopwatch(), Stopwatch(), Stopwatch(), Stopwatch()
        # The only save of this short run is the final one (after the timed window): it times one checkpoint.
        save.active = True
        trainer._save_trainer = save.wrap(trainer._save_trainer)
        actor.forward = plan.wrap(actor.forward)
        trainer.optimization_stepper.step = update.wrap(trainer.optimization_stepper.step)
        base_env = trainer.collector.env.base_env
        base_env._step = sim.wrap(base_env._step)
        window = timed_window(trainer, seed_frames + warmup, total, (plan, update, sim))
        trainer.train()
        wall = window["stop"] - window["start"]
        checkpoint_s = save.total / max(save.calls, 1)

    n = steps
    machinery = wall - plan.total - update.total - sim.total
    return {
        "task": task, "model_size": model_size, "params": wm.num_params, "batch_size": batch_size,
        "steps": n, "threads": threads,
        "wall_ms": 1000 * wall / n, "plan_ms": 1000 * plan.total / n, "update_ms": 1000 * update.total / n,
        "env_ms": 1000 * sim.total / n, "machinery_ms": 1000 * machinery / n,
        "overhead_pct": 100 * machinery / (plan.total + update.total),
        "updates": update.calls, "plans": plan.calls,
        "checkpoint_s": checkpoint_s, "checkpoint_ms_per_step_at_10k": 1000 * checkpoint_s / 10_000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="cartpole-swingup")
    parser.add_argument("--model-size", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200, help="measured steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/performance.md alone")
    args = parser.parse_args()
    r = measure(args.task, args.model_size, args.batch_size, args.steps, args.warmup, args.threads)
    machine = machine_info()
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"] * 3
    verdict = "below" if r["overhead_pct"] < 15 else "ABOVE"
    md = f"""## Trainer overhead

`{machine['command']}` — {machine['cpu']}, torch {machine['torch']}, {r['threads']} thread(s), load average
{' '.join(load)} (a shared machine: absolute times vary with the load, the ratio much less).

Per training step of `DreamMPCTrainer` (UTD 1, one env step + one update), {r['task']}, model_size={r['model_size']}
({r['params']:,} parameters), batch {r['batch_size']}×H3, Dream-MPC (N=5, H=3, I=1), mean over {r['steps']} steps
after the seed phase:

| part | ms / step |
| --- | ---: |
| plan (planner forward) | {r['plan_ms']:.2f} |
| update (`TDMPC2OptimizationStepper.step`) | {r['update_ms']:.2f} |
| env (simulator step, action repeat 2) | {r['env_ms']:.2f} |
| **trainer machinery** (collector, hooks, replay write + sample, logging) | **{r['machinery_ms']:.2f}** |
| wall | {r['wall_ms']:.2f} |

Machinery / (plan + update) = **{r['overhead_pct']:.1f} %** ({verdict} the 15 % budget). One checkpoint of the
whole run state (model, optimizers, replay buffer of {r['steps'] + 4 * r['batch_size'] + 20} steps, counters, RNG)
takes {r['checkpoint_s']:.2f} s, i.e. {r['checkpoint_ms_per_step_at_10k']:.3f} ms per step at the default
10k-step interval (it grows with the buffer).
"""
    print(md)
    if not args.no_write:
        write_section("trainer_overhead", md)
        write_json(ROOT / "docs" / "results" / "trainer_overhead.json", {"machine": machine, "load": load, **r})


if __name__ == "__main__":
    main()
