"""Where the time of one TD-MPC2 update goes: torch.profiler over our update, eager and compiled, by op category.

Profiles :class:`~torchrl_dreammpc.trainers.TDMPC2OptimizationStepper` on the benchmark batch of
``benchmarks/speed.py`` (walker sizes, batch 256, H 3) and groups the ATen / inductor ops by self time:
matrix products (with their achieved GFLOP/s), fused inductor kernels, element-wise ATen ops (Mish, LayerNorm,
softmax, ... in eager), dropout, optimizer, copies, the rest. Also times the Q dropout mask against
``F.dropout`` on the first Q layer's activation.

One torch thread by default: the CPU time of the calling thread is then the whole cost and is barely touched by
other jobs on a shared machine; pass ``--threads 2`` for the default thread count.

Writes the ``update_profile`` section of docs/performance.md and docs/results/update_profile.json.

Run::

    python benchmarks/update_profile.py                 # 1M model, 1 thread, eager and compiled
    python benchmarks/update_profile.py --size 5 --no-compile --no-docs
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, machine_info, write_json, write_section  # noqa: E402
from speed import ACTION_DIM, BATCH, HORIZON, OBS_DIM, our_batch, random_batch  # noqa: E402

from torchrl_dreammpc.modules import TDMPC2WorldModel  # noqa: E402
from torchrl_dreammpc.modules.layers import dropout  # noqa: E402
from torchrl_dreammpc.objectives import TDMPC2Loss  # noqa: E402
from torchrl_dreammpc.trainers import TDMPC2OptimizationStepper  # noqa: E402

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_"}
OPTIM = {"aten::lerp_", "aten::addcdiv_", "aten::addcmul_", "aten::sqrt", "aten::mul_", "aten::add_",
         "aten::linalg_vector_norm", "aten::div", "aten::_foreach_mul_", "aten::_foreach_add_"}
ELEMENTWISE = {"aten::mish", "aten::mish_backward", "aten::native_layer_norm", "aten::native_layer_norm_backward",
               "aten::_softmax", "aten::_softmax_backward_data", "aten::_log_softmax",
               "aten::_log_softmax_backward_data", "aten::mul", "aten::add", "aten::sub", "aten::sum", "aten::exp",
               "aten::where", "aten::clamp", "aten::neg", "aten::sigmoid", "aten::tanh"}


def category(key: str) -> str:
    if key in MATMUL:
        return "matrix products"
    if key.startswith("graph_") and "_cpp_fused_" in key:
        return "fused inductor kernels"
    if "dropout" in key or key in ("aten::bernoulli_", "aten::geometric_", "aten::_index_put_impl_", "aten::fill_"):
        return "dropout"
    if "Optimizer" in key or key in OPTIM:
        return "optimizer + grad clip"
    if key in ELEMENTWISE:
        return "element-wise ATen ops"
    if key in ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::cat"):
        return "copies"
    return "other (dispatch, views, python)"


def matmul_flops(key: str, shapes: list) -> int:
    shapes = [s for s in shapes if s]
    if key in ("aten::mm",):
        a, b = shapes[0], shapes[1]
        return 2 * a[0] * a[1] * b[1]
    if key in ("aten::addmm", "aten::addmm_"):
        a, b = shapes[1], shapes[2]
        return 2 * a[0] * a[1] * b[1]
    if key == "aten::bmm":
        a, b = shapes[0], shapes[1]
        return 2 * a[0] * a[1] * a[2] * b[2]
    a, b = shapes[1], shapes[2]  # baddbmm
    return 2 * a[0] * a[1] * a[2] * b[2]


def profile_update(size: int, compile_mode, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    wm = TDMPC2WorldModel(OBS_DIM, ACTION_DIM, model_size=size)
    stepper = TDMPC2OptimizationStepper(TDMPC2Loss(wm), compile=compile_mode or False)
    batch = our_batch(random_batch(torch.device("cpu")), torch.device("cpu"))
    t0 = time.perf_counter()
    for _ in range(warmup):
        stepper.step(None, batch.clone())
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.thread_time()
        stepper.step(None, batch.clone())
        times.append(time.thread_time() - t)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            stepper.step(None, batch.clone())
    cats: dict[str, float] = {}
    top: dict[str, list] = {}
    mm_flops = mm_time = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        ms = e.self_cpu_time_total / 1e3 / steps
        c = category(e.key)
        cats[c] = cats.get(c, 0.0) + ms
        top.setdefault(c, []).append((ms, e.key))
        if e.key in MATMUL:
            mm_flops += matmul_flops(e.key, e.input_shapes) * e.count / steps
            mm_time += ms
    total = sum(cats.values())
    merged = {}
    for c, items in top.items():
        per_key: dict[str, float] = {}
        for ms, k in items:
            per_key[k] = per_key.get(k, 0.0) + ms
        merged[c] = sorted(((round(v, 2), k) for k, v in per_key.items()), reverse=True)[:4]
    return {"size": size, "compile": compile_mode, "thread_ms_min": 1e3 * min(times),
            "thread_ms_median": 1e3 * sorted(times)[len(times) // 2], "warmup_s": warm_s,
            "profiled_ms": total, "categories": {c: cats[c] for c in sorted(cats, key=lambda c: -cats[c])},
            "top_ops": merged, "matmul_gflop": mm_flops / 1e9,
            "matmul_gflops_per_s": mm_flops / (mm_time * 1e-3) / 1e9 if mm_time else None}


def dropout_timing(size: int) -> dict:
    wm = TDMPC2WorldModel(OBS_DIM, ACTION_DIM, model_size=size)
    k, hidden = wm.config.num_q, wm.config.mlp_dim
    x = torch.randn(k, HORIZON * BATCH, hidden)  # the first Q layer's activation in the value loss
    out = {}
    for name, fn in (("F.dropout (ATen bernoulli_)", lambda: F.dropout(x, 0.01, True)),
                     ("ours (geometric gaps)", lambda: dropout(x, 0.01))):
        best = float("inf")
        for _ in range(20):
            t = time.thread_time()
            fn()
            best = min(best, time.thread_time() - t)
        out[name] = 1e3 * best
    return {"shape": list(x.shape), "p": 0.01, "ms": out}


def render(payload: dict) -> str:
    m = payload["machine"]
    lines = [
        "## Where one update's time goes (torch.profiler)",
        "",
        f"Command: `{m['command']}`  ",
        f"Machine: {m['cpu']}, torch {m['torch']}, {payload['threads']} torch thread(s), python {m['python']}; "
        f"load average before {payload['load'][0]}, after {payload['load'][1]}.  ",
        f"Walker sizes (observation {OBS_DIM}, action {ACTION_DIM}), batch {BATCH}, H {HORIZON}: one full "
        "`TDMPC2OptimizationStepper.step` (world model + Qs + policy + target Qs). `update ms` is the CPU time of "
        "the calling thread (best of the timed updates, unprofiled); the categories are profiled self times per "
        "update (the profiler adds a little).",
        "",
        "| model | update | update ms | matmul GFLOP/s | " + " | ".join(payload["columns"]) + " |",
        "|---|---|---:|---:|" + "---:|" * len(payload["columns"]),
    ]
    for r in payload["runs"]:
        cells = [f"{r['categories'].get(c, 0.0):.1f}" for c in payload["columns"]]
        lines.append(f"| {r['size']}M | {'compiled (' + r['compile'] + ')' if r['compile'] else 'eager'} | "
                     f"{r['thread_ms_min']:.1f} | {r['matmul_gflops_per_s']:.0f} | " + " | ".join(cells) + " |")
    lines += ["", "Top ops per category (ms per update):", ""]
    for r in payload["runs"]:
        tops = "; ".join(f"{c}: " + ", ".join(f"`{k[:48]}` {ms}" for ms, k in r["top_ops"][c][:3])
                         for c in list(r["categories"])[:4])
        lines.append(f"- {r['size']}M {'compiled' if r['compile'] else 'eager'}: {tops}")
    d = payload["dropout"]
    lines += ["", f"Q dropout (p {d['p']}, activation {d['shape']}), best thread time: "
              + ", ".join(f"{k} {v:.2f} ms" for k, v in d["ms"].items()) + "."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True  # each fused kernel under its own name in the profile
    load_before = [round(v, 2) for v in os.getloadavg()]
    runs = [profile_update(args.size, None, args.steps, warmup=3)]
    if not args.no_compile:
        runs.append(profile_update(args.size, args.compile_mode, args.steps, warmup=3))
    columns = []
    for r in runs:
        columns += [c for c in r["categories"] if c not in columns]
    payload = {"machine": machine_info(), "threads": args.threads, "runs": runs, "columns": columns,
               "dropout": dropout_timing(args.size),
               "load": [load_before, [round(v, 2) for v in os.getloadavg()]]}
    text = render(payload)
    print(text)
    if not args.no_docs:
        write_json(ROOT / "docs" / "results" / "update_profile.json", payload)
        write_section("update_profile", text)
    return payload


if __name__ == "__main__":
    main()
