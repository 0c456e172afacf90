"""Cost of the NaN/inf checks that are on by default: the planners' ``check_finite`` and the stepper's.

- planner: :meth:`LatentPlannerBase._check_finite_step` (one fused reduction over the observation, the action and
  the executed plan's score, then one host read), timed alone over many calls, and a whole Dream-MPC / MPPI step
  with ``check_finite=True`` vs ``False`` (interleaved, median of the repetitions);
- update: :meth:`TDMPC2OptimizationStepper._check_finite` (the loss terms and the gradient norm, twice per
  update), timed alone, and a whole update with ``check_finite=True`` vs ``False``.

CPU only (what the default checks); on CUDA each check is one host synchronization, see docs/planners.md.

    python benchmarks/finite_checks.py     # 1M model: docs/results/finite_checks.json + its performance.md section
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tensordict import TensorDict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, machine_info, write_json, write_section  # noqa: E402

from torchrl_dreammpc.modules import TDMPC2WorldModel  # noqa: E402
from torchrl_dreammpc.objectives import TDMPC2Loss  # noqa: E402
from torchrl_dreammpc.planners import GradientMPCPlanner, MPPIPlanner  # noqa: E402
from torchrl_dreammpc.trainers import TDMPC2OptimizationStepper  # noqa: E402

OBS, ACT = 5, 1  # cartpole-swingup


def _per_call_us(fn, calls: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def _check_us(fn, reps: int) -> float:
    """Median over ``reps`` repetitions of 20,000 calls (after 1,000 warm-up calls), µs per call."""
    return statistics.median(_per_call_us(fn, 20000, warmup=1000) for _ in range(reps))


def _paired_ms(make, calls: int, reps: int) -> tuple[float, float]:
    """Median ms per call of ``make(True)()`` and ``make(False)()``, interleaved repetition by repetition."""
    on, off = make(True), make(False)
    times = {True: [], False: []}
    for _ in range(reps):
        for flag, fn in ((True, on), (False, off)):
            times[flag].append(_per_call_us(fn, calls) / 1000)
    return statistics.median(times[True]), statistics.median(times[False])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    wm = TDMPC2WorldModel(OBS, ACT, model_size=args.size).eval()
    rows = []

    # ---- planner: the check alone, then whole steps with / without it
    for name, cls, kwargs in (("GradientMPCPlanner", GradientMPCPlanner, {}),
                              ("MPPIPlanner", MPPIPlanner, {})):
        for envs in ((1, 8) if cls is GradientMPCPlanner else (1,)):
            obs = TensorDict({"observation": torch.randn(envs, OBS)}, [envs])
            planner = cls(wm, **kwargs)
            planner(obs.clone())
            action, objective = torch.zeros(envs, ACT), torch.zeros(envs, 1)
            check_us = _check_us(lambda: planner._check_finite_step(obs["observation"], action, objective), args.reps)

            def make(flag, cls=cls, obs=obs):
                p = cls(wm, check_finite=flag, **kwargs)
                return lambda: p(obs.clone())

            calls = 20 if cls is GradientMPCPlanner else 3
            on, off = _paired_ms(make, calls, args.reps)
            rows.append({"what": f"{name} step", "envs": envs, "check_us": check_us, "with_ms": on, "without_ms": off})
            print(rows[-1], flush=True)

    # ---- update: the check alone (one of its two calls), then whole updates with / without it
    B, H = 256, 3
    batch = TensorDict({"observation": torch.randn(B, H, OBS), "action": torch.rand(B, H, ACT) * 2 - 1,
                        "next": {"observation": torch.randn(B, H, OBS), "reward": torch.randn(B, H, 1),
                                 "terminated": torch.zeros(B, H, 1, dtype=torch.bool)}}, [B, H])
    stepper = TDMPC2OptimizationStepper(TDMPC2Loss(TDMPC2WorldModel(OBS, ACT, model_size=args.size)))
    out = stepper.loss_module(batch).detach()
    norm = torch.tensor(1.0)
    check_us = 2 * _check_us(lambda: stepper._check_finite(None, "world-model", out, norm, stepper.wm_optim),
                             args.reps)

    def make_update(flag):
        s = TDMPC2OptimizationStepper(TDMPC2Loss(TDMPC2WorldModel(OBS, ACT, model_size=args.size)),
                                      check_finite=flag)
        return lambda: s.step(None, batch)

    on, off = _paired_ms(make_update, 3, args.reps)
    rows.append({"what": "TD-MPC2 update (batch 256)", "envs": None, "check_us": check_us, "with_ms": on,
                 "without_ms": off})
    print(rows[-1], flush=True)
    load = (load_before, os.getloadavg()[0])
    if args.no_write:
        return
    write_json(ROOT / "docs" / "results" / "finite_checks.json",
               {"machine": machine_info(), "model_size": args.size, "reps": args.reps,
                "load_average_before_after": load, "results": rows})
    lines = ["## Cost of the default NaN/inf checks", "",
             f"`python benchmarks/finite_checks.py` ({args.size}M model, cartpole-swingup sizes, one thread, "
             f"median of {args.reps} interleaved repetitions). *check alone*: the check's own call, median of "
             f"{args.reps} timings of 20,000 calls (for the update: its two calls); *step*: a whole planner step "
             "or update with the check on / off (the difference is within the timing noise of a step). Load "
             f"average {load[0]:.1f} before, "
             f"{load[1]:.1f} after: on a quiet machine every time is smaller.", "",
             "| what | envs | check alone | with check | without | check / step |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['envs'] or ''} | {r['check_us']:.1f} µs | {r['with_ms']:.2f} ms | "
                     f"{r['without_ms']:.2f} ms | {100 * r['check_us'] / 1000 / r['without_ms']:.2f}% |")
    write_section("finite_checks", "\n".join(lines))


if __name__ == "__main__":
    main()
