"""Milliseconds per control step of the planners: policy prior, Dream-MPC and TD-MPC2's MPPI.

Setting: TD-MPC2 world models of 1M and 5M parameters for a walker-sized task (observation 24, action 6), batch of
1 and 8 envs, CPU, exploration mode (data collection), warm start active (every step after the first of an
episode). Each configuration is warmed up, then called repeatedly on the same input; the median wall time of one
call (one control step for all the envs of the batch) is reported.

Writes ``docs/results/planner_latency.json`` and the ``planner_latency`` section of ``docs/performance.md``.

Run::

    python benchmarks/planner_latency.py                # all configurations, 1 and 2 threads (minutes on 2 cores)
    python benchmarks/planner_latency.py --threads 1 --repeats 10 --mppi-seconds 5 --no-docs
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, machine_info, write_json, write_section  # noqa: E402

from torchrl_dreammpc.modules import TDMPC2WorldModel  # noqa: E402
from torchrl_dreammpc.planners import GradientMPCPlanner, MPPIPlanner, PolicyActor  # noqa: E402

OBS_DIM, ACTION_DIM = 24, 6  # walker-walk
PLANNERS = {
    "policy": lambda wm: PolicyActor(wm),
    "dream-mpc": lambda wm: GradientMPCPlanner(wm, num_candidates=5, horizon=3, iterations=1),
    "mppi": lambda wm: MPPIPlanner(wm, num_samples=512, num_elites=64, iterations=6, num_pi_trajs=24, horizon=3),
}


def time_planner(planner, batch: int, warmup: int, repeats: int, max_seconds: float) -> dict:
    obs = torch.randn(batch, OBS_DIM)
    first = TensorDict({"observation": obs, "is_init": torch.ones(batch, 1, dtype=torch.bool)}, [batch])
    td = TensorDict({"observation": obs, "is_init": torch.zeros(batch, 1, dtype=torch.bool)}, [batch])
    with set_exploration_type(ExplorationType.RANDOM):
        planner(first.clone())
        for _ in range(warmup):
            planner(td.clone())
        times = []
        start = time.perf_counter()
        while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < max_seconds):
            inp = td.clone()
            t0 = time.perf_counter()
            planner(inp)
            times.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "repeats": len(times)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 5], help="TD-MPC2 model sizes (M params)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--mppi-seconds", type=float, default=20.0, help="time budget of one MPPI configuration")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch intra-op thread counts")
    parser.add_argument("--no-docs", action="store_true", help="print only, write neither JSON nor Markdown")
    parser.add_argument("--from-json", action="store_true",
                        help="re-render docs/performance.md from docs/results/planner_latency.json without measuring")
    args = parser.parse_args(argv)
    json_path = ROOT / "docs" / "results" / "planner_latency.json"
    if args.from_json:
        payload = json.loads(json_path.read_text())
        md = render(payload["results"], payload["machine"], *payload["load_average_before_after"])
        print(md)
        write_section("planner_latency", md)
        return payload
    default_threads = torch.get_num_threads()
    load_before = os.getloadavg()
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for size in args.sizes:
            torch.manual_seed(0)
            wm = TDMPC2WorldModel(OBS_DIM, ACTION_DIM, model_size=size).eval()
            for batch in args.batches:
                for name, make in PLANNERS.items():
                    budget = args.mppi_seconds if name == "mppi" else 10.0
                    r = time_planner(make(wm), batch, args.warmup, args.repeats, budget)
                    r.update(threads=threads, model_size=size, params=wm.num_params, batch=batch, planner=name)
                    results.append(r)
                    print(f"threads={threads} {size}M B={batch} {name:10s} {r['median_ms']:10.2f} ms "
                          f"(min {r['min_ms']:.2f}, n={r['repeats']})", flush=True)
    torch.set_num_threads(default_threads)
    load_after = os.getloadavg()
    info = machine_info()
    payload = {"machine": info, "load_average_before_after": [load_before, load_after],
               "setting": {"obs_dim": OBS_DIM, "action_dim": ACTION_DIM, "exploration": "RANDOM", "warm_start": True,
                           "dream_mpc": "N=5, H=3, I=1 (defaults: lr 0.1, rho 0.1, lambda 0.01)",
                           "mppi": "512 samples, 64 elites, 6 iterations, 24 policy samples, H=3"},
               "results": results}
    md = render(results, info, load_before, load_after)
    print(md)
    if not args.no_docs:
        write_json(json_path, payload)
        write_section("planner_latency", md)
    return payload


def render(results, info, load_before, load_after) -> str:
    def cell(r, digits=2):
        return f"{r['median_ms']:.{digits}f} ({r['min_ms']:.{digits}f})"

    def get(threads, size, batch, name):
        return next(r for r in results if r["threads"] == threads and r["model_size"] == size and r["batch"] == batch
                    and r["planner"] == name)

    lines = [
        "## Planner latency (ms per control step, CPU)",
        "",
        f"Command: `{info['command']}`  ",
        f"Machine: {info['cpu']} ({os.cpu_count()} cores), torch {info['torch']}, python {info['python']}.  ",
        f"Load average (1/5/15 min) before {tuple(round(x, 2) for x in load_before)}, after "
        f"{tuple(round(x, 2) for x in load_after)}: the cores were shared with other jobs, so single calls were "
        "sometimes slowed down several-fold; each cell is `median (min)` of the repeated calls, compare within a row.",
        "",
        "Observation 24, action 6 (walker), TD-MPC2 models, exploration mode, warm start active. Median wall time of "
        "one call (one step of every env of the batch) after warm-up. Dream-MPC: N=5, H=3, I=1. MPPI (TD-MPC2): "
        "512 samples, 64 elites, 6 iterations, 24 policy samples, H=3.",
        "",
        "| torch threads | model | params | envs | policy | Dream-MPC | MPPI | MPPI / Dream-MPC (of mins) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for threads in sorted({r["threads"] for r in results}):
        for size in sorted({r["model_size"] for r in results}):
            for batch in sorted({r["batch"] for r in results}):
                p, d, m = (get(threads, size, batch, n) for n in ("policy", "dream-mpc", "mppi"))
                lines.append(f"| {threads} | {size}M | {p['params'] / 1e6:.2f}M | {batch} | {cell(p)} | {cell(d)} | "
                             f"{cell(m, 0)} | {m['median_ms'] / d['median_ms']:.0f}x ({m['min_ms'] / d['min_ms']:.0f}x) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
