"""How long ``torch.compile`` takes for the update and for a planner step, with a cold and a warm on-disk cache.

Each measurement runs in a fresh process whose inductor cache (``TORCHINDUCTOR_CACHE_DIR``) is a new empty
directory (*cold*: what the first run on a machine pays), then in a second fresh process on that same directory
(*warm*: every later run). Compile time = the first compiled call minus the steady time of a compiled call.

- ``update``: one :class:`~torchrl_dreammpc.trainers.TDMPC2OptimizationStepper` step with ``compile=True``
  (``max-autotune-no-cudagraphs``, what ``recipes/train.py compile=true`` uses), 1M model, batch 256, horizon 3;
- ``dream_mpc``: one :class:`~torchrl_dreammpc.planners.GradientMPCPlanner` step with ``compile=True``, 1M
  model, one env (``planner.compile=true`` for train.py); every new batch size compiles again.

    python benchmarks/compile_time.py            # writes docs/results/compile_time.json and its performance.md section
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, machine_info, write_json, write_section  # noqa: E402

TARGETS = ("update", "dream_mpc")


def _child(target: str) -> dict:
    import torch
    from tensordict import TensorDict

    from torchrl_dreammpc.modules import TDMPC2WorldModel
    from torchrl_dreammpc.objectives import TDMPC2Loss
    from torchrl_dreammpc.planners import GradientMPCPlanner
    from torchrl_dreammpc.trainers import TDMPC2OptimizationStepper

    torch.set_num_threads(1)
    torch.manual_seed(0)
    obs_dim, action_dim = 5, 1  # cartpole-swingup
    wm = TDMPC2WorldModel(obs_dim, action_dim, model_size=1)
    if target == "update":
        B, H = 256, 3
        batch = TensorDict({"observation": torch.randn(B, H, obs_dim), "action": torch.rand(B, H, action_dim) * 2 - 1,
                            "next": {"observation": torch.randn(B, H, obs_dim), "reward": torch.randn(B, H, 1),
                                     "terminated": torch.zeros(B, H, 1, dtype=torch.bool)}}, [B, H])
        stepper = TDMPC2OptimizationStepper(TDMPC2Loss(wm), compile=True)
        call = lambda: stepper.step(None, batch)  # noqa: E731
    else:
        planner = GradientMPCPlanner(wm.eval(), compile=True)
        obs = TensorDict({"observation": torch.randn(1, obs_dim)}, [1])
        call = lambda: planner(obs.clone())  # noqa: E731
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    for _ in range(3):
        call()
    reps = 10
    start = time.perf_counter()
    for _ in range(reps):
        call()
    steady = (time.perf_counter() - start) / reps
    return {"target": target, "first_call_s": first, "steady_call_s": steady, "compile_s": first - steady}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=TARGETS, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child)), flush=True)
        return
    results = []
    load_before = os.getloadavg()[0]
    for target in TARGETS:
        with tempfile.TemporaryDirectory(prefix="inductor_cache_") as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
            for cache_state in ("cold", "warm"):
                out = subprocess.run([sys.executable, __file__, "--child", target], env=env, capture_output=True,
                                     text=True, check=True)
                row = {**json.loads(out.stdout.strip().splitlines()[-1]), "cache": cache_state}
                print(json.dumps(row), flush=True)
                results.append(row)
    if args.no_write:
        return
    load = (load_before, os.getloadavg()[0])
    write_json(ROOT / "docs" / "results" / "compile_time.json",
               {"machine": machine_info(), "load_average_before_after": load, "results": results})
    names = {"update": "one TD-MPC2 update, `compile=True` (max-autotune-no-cudagraphs), 1M model, batch 256",
             "dream_mpc": "one `GradientMPCPlanner(compile=True)` step, 1M model, 1 env"}
    lines = ["## Compile time", "",
             "`python benchmarks/compile_time.py` (one thread; each row a fresh process; *cold*: an empty inductor "
             "cache, *warm*: the cache the cold run left on disk). Compile time = first compiled call − a steady "
             f"compiled call. Load average {load[0]:.1f} before, {load[1]:.1f} after (the steady times are only "
             "comparable within a run). The only place this number is quoted; the docstrings and configs point "
             "here.", "",
             "| what | cache | compile time | first call | steady call |", "|---|---|---|---|---|"]
    for row in results:
        lines.append(f"| {names[row['target']]} | {row['cache']} | {row['compile_s']:.1f} s | "
                     f"{row['first_call_s']:.1f} s | {1000 * row['steady_call_s']:.1f} ms |")
    write_section("compile_time", "\n".join(lines))


if __name__ == "__main__":
    main()
