"""Interleaved A/B timing of Dream-MPC variants: one 8-env call per variant against 8 single-env calls.

A variant is a planner mode (eager or ``compile=True``) plus optional patches of the planning path's module
constants (``torchrl_dreammpc.modules.planning``: ``_PER_HEAD_ELEMS``, ``_GATHER_PAIR_ROWS``, ``_HOST_PAIR``,
``_SHARED_ROWS_FROM``), applied only while that variant runs. All variants and the 8 eager single-env calls run
in one round-robin loop, so a slow period of the (shared) machine hits all alike; ``--flop-count`` first runs
every variant once under ``FlopCounterMode`` (to show what that does to compiled code afterwards).

This is the tool behind the A/B numbers quoted in docs/performance.md (e.g. the gathered Q pair under compile);
``benchmarks/speed.py`` is the reference-vs-ours table.

Run::

    python benchmarks/planner_ab.py --size 5 --variant eager --variant "compiled:compile" \\
        --variant "all heads:compile,_GATHER_PAIR_ROWS=1000000"
    python benchmarks/planner_ab.py --size 1 --variant eager --variant "compiled:compile" --flop-count
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import ACTION_DIM, DREAM_KW, OBS_DIM, obs_td  # noqa: E402  (the setting of speed.py's batched row)

from torchrl_dreammpc.modules import TDMPC2WorldModel, planning  # noqa: E402
from torchrl_dreammpc.planners import GradientMPCPlanner  # noqa: E402

ENVS = 8


def parse_variant(spec: str) -> tuple[str, bool, dict]:
    """``"name"`` or ``"name:compile,CONST=value,..."`` → (name, compile, {constant: int value})."""
    name, _, rest = spec.partition(":")
    compiled, patch = False, {}
    for item in filter(None, rest.split(",")):
        if item == "compile":
            compiled = True
            continue
        key, _, value = item.partition("=")
        if not hasattr(planning, key):
            raise SystemExit(f"planner_ab.py: unknown planning constant {key!r} in --variant {spec!r}")
        patch[key] = int(value)
    return name, compiled, patch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1, help="TD-MPC2 model size (1, 5, ...)")
    parser.add_argument("--variant", action="append", default=None, help="name[:compile][,CONST=int...]")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--flop-count", action="store_true", help="run each variant once under FlopCounterMode")
    args = parser.parse_args()

    torch.manual_seed(0)
    wm = TDMPC2WorldModel(OBS_DIM, ACTION_DIM, model_size=args.size).eval()
    obs = torch.randn(ENVS, OBS_DIM)
    variants = {}
    for spec in args.variant or ["eager", "compiled:compile"]:
        name, compiled, patch = parse_variant(spec)
        variants[name] = (GradientMPCPlanner(wm, compile=compiled, **DREAM_KW), patch)
    singles = [GradientMPCPlanner(wm, **DREAM_KW) for _ in range(ENVS)]

    def run(name: str, is_init: bool = False) -> float:
        planner, patch = variants[name]
        saved = {key: getattr(planning, key) for key in patch}
        for key, value in patch.items():
            setattr(planning, key, value)
        try:
            start = time.perf_counter()
            planner(obs_td(obs, is_init))
            return time.perf_counter() - start
        finally:
            for key, value in saved.items():
                setattr(planning, key, value)

    def run_singles(is_init: bool = False) -> float:
        start = time.perf_counter()
        for b, planner in enumerate(singles):
            planner(obs_td(obs[b:b + 1], is_init))
        return time.perf_counter() - start

    with set_exploration_type(ExplorationType.RANDOM):
        for name in variants:  # the first step of an episode (compiles), then warm-started steps
            run(name, True)
            for _ in range(3):
                run(name)
        run_singles(True)
        run_singles()
        if args.flop_count:
            from torch.utils.flop_counter import FlopCounterMode

            for name in variants:
                with FlopCounterMode(display=False) as counter:
                    run(name)
                print(f"{name}: {counter.get_total_flops() / 1e6:.1f} MFLOP per call")
                run(name)
        times = {name: [] for name in variants}
        single_times = []
        order = list(variants)
        for r in range(args.rounds):
            single_times.append(run_singles())
            for name in (order if r % 2 else order[::-1]):
                times[name].append(run(name))

    best_singles = min(single_times)
    print(f"{args.size}M model, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds; "
          f"ms per call: best (median)")
    print(f"  {ENVS} single-env calls (eager)  {1e3 * best_singles:8.2f} ({1e3 * statistics.median(single_times):.2f})")
    for name, values in times.items():
        print(f"  {name:30s} {1e3 * min(values):8.2f} ({1e3 * statistics.median(values):.2f})   "
              f"singles / this: {best_singles / min(values):.2f}x")


if __name__ == "__main__":
    main()
