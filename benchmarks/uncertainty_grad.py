"""Dream-MPC with and without the gradient of the uncertainty penalty (``uncertainty_grad``).

The authors' code evaluates the penalty ``λ Σ_t mean_k(Q_k)·std_k(Q_k)`` without gradient: it only ranks the
candidates. ``uncertainty_grad=True`` also ascends its gradient, which needs every Q head at every step inside
the differentiated pass. This script reports what that costs per control step (ms, median of repeated calls) and
how far one gradient step moves the objective J of the executed candidate (on models with perturbed weights) (``objective_after -
objective_before`` from the planner's diagnostics), on the same untrained TD-MPC2 models and inputs. Returns on a
trained model are compared with ``recipes/evaluate.py +planner_args.dream_mpc.uncertainty_grad=true``.

    python benchmarks/uncertainty_grad.py

Writes ``docs/results/uncertainty_grad.json`` and the ``uncertainty_grad`` section of docs/performance.md.
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
from torchrl.envs.utils import ExplorationType, set_exploration_type

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, machine_info, write_json, write_section  # noqa: E402

from torchrl_dreammpc.modules import TDMPC2WorldModel  # noqa: E402
from torchrl_dreammpc.planners import GradientMPCPlanner  # noqa: E402

OBS_DIM, ACTION_DIM, REPEATS = 24, 6, 30


def measure(wm, batch: int) -> dict:
    """Both variants called alternately on the same inputs, so a drifting load on the shared cores hits both."""
    planners = {flag: GradientMPCPlanner(wm, num_candidates=5, horizon=3, iterations=1, lr=0.1,
                                         uncertainty_grad=flag, diagnostics=True) for flag in (False, True)}
    obs = torch.randn(batch, OBS_DIM, generator=torch.Generator().manual_seed(1))
    first = TensorDict({"observation": obs, "is_init": torch.ones(batch, 1, dtype=torch.bool)}, [batch])
    td = TensorDict({"observation": obs, "is_init": torch.zeros(batch, 1, dtype=torch.bool)}, [batch])
    times = {False: [], True: []}
    gains = {False: [], True: []}
    with set_exploration_type(ExplorationType.RANDOM):
        for planner in planners.values():
            planner(first.clone())
        for i in range(REPEATS + 3):
            for flag, planner in planners.items():
                t0 = time.perf_counter()
                out = planner(td.clone())
                if i >= 3:
                    times[flag].append(time.perf_counter() - t0)
                    gain = out["planner", "objective_after"] - out["planner", "objective_before"]
                    gains[flag].append(float(gain.mean()))
    return {("on" if flag else "off"): {"median_ms": 1e3 * statistics.median(times[flag]),
                                        "mean_J_gain": sum(gains[flag]) / len(gains[flag])}
            for flag in planners}


def perturbed_model(size: int) -> TDMPC2WorldModel:
    """An untrained model has zero-initialized reward and Q output layers (TD-MPC2's init), hence zero action
    gradients; perturbing every weight gives the objective a slope, as a trained model has."""
    torch.manual_seed(0)
    wm = TDMPC2WorldModel(OBS_DIM, ACTION_DIM, model_size=size).eval()
    with torch.no_grad():
        for p in wm.parameters():
            p.add_(0.05 * torch.randn_like(p))
        wm.target_q_ensemble.load_state_dict(wm.q_ensemble.state_dict())
    return wm


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()  # no options; --help describes it
    rows = []
    for size in (1, 5):
        wm = perturbed_model(size)
        for batch in (1, 8):
            rows.append({"model_size": size, "envs": batch, **measure(wm, batch)})
            print(rows[-1], flush=True)
    info = machine_info()
    info["load_average"] = os.getloadavg()
    write_json(ROOT / "docs" / "results" / "uncertainty_grad.json", {"machine": info, "rows": rows})
    lines = [
        "## Dream-MPC: `uncertainty_grad` off (authors' code) vs on",
        "",
        f"Command: `python benchmarks/uncertainty_grad.py`. {info['cpu']}, torch {info['torch']}, "
        f"{info['threads']} threads, load average {tuple(round(x, 2) for x in info['load_average'])} (shared machine).",
        "TD-MPC2 models with randomly perturbed weights (obs 24, action 6), N=5, H=3, I=1, lr 0.1, λ=0.01; median over "
        f"{REPEATS} calls. *J gain*: mean `objective_after - objective_before` of the executed candidate.",
        "",
        "| model | envs | ms/step off | ms/step on | cost of the gradient | J gain off | J gain on |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model_size']}M | {r['envs']} | {r['off']['median_ms']:.2f} | {r['on']['median_ms']:.2f} | "
                     f"{r['on']['median_ms'] / r['off']['median_ms']:.2f}x | {r['off']['mean_J_gain']:.2e} | "
                     f"{r['on']['mean_J_gain']:.2e} |")
    lines.append("")
    lines.append("The returns of the two variants on a trained model are left to `recipes/evaluate.py` once the "
                 "learning run has a checkpoint (see docs/results/).")
    write_section("uncertainty_grad", "\n".join(lines))


if __name__ == "__main__":
    main()
