"""The campaign's report: ``docs/results/benchmark.md`` and ``docs/results/benchmark/`` (CSV, JSON, figures).

Written by ``benchmarks/campaign.py`` after every evaluation and training chunk (``--report-only`` rewrites it
alone). Sources, for each run of the campaign YAML: its run directory (``eval.csv``, ``swaps/``,
``campaign.json``) when it exists, otherwise the rows that the committed report already holds for it (the run
directory lived on an earlier machine).

Files:
- ``benchmark/planner_swap.csv``: ``task,suite,step,planner,return_mean,return_std,success_rate,episodes,
  plan_ms_per_step`` (+ ``return_sem,run``), one row per run, snapshot step and planner;
- ``benchmark/episodes.json``: every episode's return (and success flag) behind those rows (paired: episode i
  of every planner starts from the same initial state);
- ``benchmark/runs.json``: per run: steps trained, wall time, machine, commands, pending swaps;
- ``benchmark/<run>.png``: the curves (policy and Dream-MPC every snapshot, MPPI where evaluated, the
  published TD-MPC2 and DreamerV3 seeds / BMPC-paper curves);
- ``benchmark/aggregate.{png,json}``: rliable IQM and mean of normalized scores with 95 % stratified-bootstrap
  confidence intervals per planner at the final step, and probabilities of improvement.
The section between ``<!-- conclusion -->`` markers of benchmark.md is written by hand and kept.
"""
from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT.parent / "shared" / "reference" / "published-results"
SWAP_COLUMNS = ["task", "suite", "step", "planner", "return_mean", "return_std", "success_rate", "episodes",
                "plan_ms_per_step", "return_sem", "run"]
PLANNER_STYLE = {"policy": ("tab:blue", "policy prior"), "policy_sample": ("tab:cyan", "policy prior, sampled"),
                 "dream_mpc": ("tab:red", "Dream-MPC"),
                 "mppi": ("tab:green", "MPPI"), "dream_mpc_no_grad": ("tab:purple", "Dream-MPC, no gradient step"),
                 "dream_mpc_no_uncertainty": ("tab:orange", "Dream-MPC, λ = 0")}
CONCLUSION_BEGIN, CONCLUSION_END = "<!-- conclusion -->", "<!-- /conclusion -->"
BOOTSTRAP_REPS = 5000


def _data_dir(report: Path) -> Path:
    return report.with_suffix("")


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# collecting
# ----------------------------------------------------------------------------------------------------------------
def read_committed_runs(report: Path) -> dict[str, dict[str, Any]]:
    path = _data_dir(report) / "runs.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _read_committed(report: Path) -> tuple[list[dict], dict, dict]:
    data = _data_dir(report)
    rows = []
    if (data / "planner_swap.csv").exists():
        with (data / "planner_swap.csv").open(newline="") as file:
            rows = list(csv.DictReader(file))
    episodes = json.loads((data / "episodes.json").read_text()) if (data / "episodes.json").exists() else {}
    return rows, episodes, read_committed_runs(report)


def _run_rows(run, swaps) -> tuple[list[dict], dict]:
    """Swap rows and per-episode values of one run directory."""
    from campaign import swap_dir

    rows, episodes = [], {}
    for step_dir in sorted((run.run_dir / "swaps").glob("step_*")):
        step = int(step_dir.name.split("_")[1])
        for swap in swaps:
            path = swap_dir(run, step, swap) / "results.json"
            if not path.exists():
                continue
            (result,) = json.loads(path.read_text())["results"]
            n = int(result["episodes"])
            rows.append({
                "task": run.task, "suite": run.suite, "step": step, "planner": swap.name,
                "return_mean": result["return_mean"], "return_std": result["return_std"],
                "success_rate": result.get("success_rate"), "episodes": n,
                "plan_ms_per_step": result["plan_ms_per_step"],
                "return_sem": result["return_std"] / math.sqrt(n) if n > 1 else float("nan"), "run": run.id,
            })
            episodes.setdefault(str(step), {})[swap.name] = {
                "returns": result.get("episode_returns"), "successes": result.get("episode_successes")}
    return rows, episodes


def _run_record(run, campaign, rows) -> dict[str, Any]:
    from campaign import pending_swaps, trained_step

    state_path = run.run_dir / "campaign.json"
    chunks = json.loads(state_path.read_text())["chunks"] if state_path.exists() else []
    prior_path = run.run_dir / "policy_prior.json"
    prior = json.loads(prior_path.read_text())["snapshots"] if prior_path.exists() else {}
    eval_csv = run.run_dir / "eval.csv"
    curve = []
    if eval_csv.exists():
        with eval_csv.open(newline="") as file:
            curve = [[int(float(r["step"])), float(r["return"])] for r in csv.DictReader(file)]
    return {
        "task": run.task, "suite": run.suite, "steps": run.steps, "trained_step": trained_step(run),
        "train": {key: value for key, value in run.train.items()},
        "score_scale": run.score_scale,
        "wall_s": round(sum(chunk["wall_s"] for chunk in chunks), 1),
        "chunks": chunks,
        "swaps_pending": len(pending_swaps(run, campaign["swaps"])),
        "swap_rows": len(rows),
        "eval_curve": curve,
        "policy_prior": prior,
    }


def collect(campaign: dict[str, Any]) -> tuple[list[dict], dict, dict]:
    """``(rows, episodes, runs)`` for every run of the campaign, from run directories or the committed report."""
    old_rows, old_episodes, old_runs = _read_committed(campaign["report"])
    rows, episodes, runs = [], {}, {}
    for run in campaign["runs"]:
        if run.run_dir.exists():
            run_rows, run_episodes = _run_rows(run, campaign["swaps"])
            record = _run_record(run, campaign, run_rows)
        else:  # lived on an earlier machine: keep what was committed
            run_rows = [row for row in old_rows if row["run"] == run.id]
            run_episodes = old_episodes.get(run.id, {})
            record = old_runs.get(run.id)
            if record is None:
                continue
            record = {**record, "from_earlier_machine": True}
        rows += run_rows
        episodes[run.id] = run_episodes
        runs[run.id] = record
    return rows, episodes, runs


# ----------------------------------------------------------------------------------------------------------------
# published references
# ----------------------------------------------------------------------------------------------------------------
def published_points(task: str, suite: str, max_step: int) -> dict[str, dict[int, list[float]]]:
    """``{"TD-MPC2": {step: [seed values]}, "DreamerV3": {...}}`` from ../shared (empty where absent).
    Meta-World files hold success rates; HumanoidBench comes from the BMPC paper's curves (means)."""
    out: dict[str, dict[int, list[float]]] = {}
    if suite == "humanoid_bench":
        path = PUBLISHED / "bmpc-paper" / "data_humanoidbench_2M.json"
        if path.exists():
            data = json.loads(path.read_text())
            short = task.split("-")[1]  # humanoid_h1hand-stand-v0 -> stand
            for algo in ("TD-MPC2", "BMPC"):
                curve = data.get(algo, {}).get(short)
                if curve:
                    out[f"{algo} (BMPC paper, mean)"] = {int(s): [float(v)] for s, v in zip(curve["steps"], curve["values"])
                                                        if s <= max_step}
        return out
    column = "success" if suite == "metaworld" else "reward"
    for algo, folder in (("TD-MPC2", "tdmpc2"), ("DreamerV3", "dreamerv3")):
        path = PUBLISHED / folder / f"{task}.csv"
        if not path.exists():
            continue
        points: dict[int, list[float]] = {}
        with path.open(newline="") as file:
            for r in csv.DictReader(file):
                step = int(float(r["step"]))
                if step <= max_step:
                    points.setdefault(step, []).append(float(r[column]))
        out[f"{algo} (published)"] = points
    return out


# ----------------------------------------------------------------------------------------------------------------
# figures and statistics
# ----------------------------------------------------------------------------------------------------------------
def _metric(row: dict, suite: str) -> tuple[float, float]:
    """(value, standard error) plotted for a swap row: success rate on Meta-World, return otherwise."""
    if suite == "metaworld":
        p, n = float(row["success_rate"]), int(row["episodes"])
        return p, math.sqrt(p * (1 - p) / n)
    return float(row["return_mean"]), float(row["return_sem"])


def plot_run(run_id: str, record: dict, rows: list[dict], path: Path) -> None:
    suite, steps = record["suite"], record["steps"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, points in published_points(record["task"], suite, steps).items():
        xs = sorted(points)
        means = [float(np.mean(points[s])) for s in xs]
        marker = "ks" if name.startswith("TD-MPC2") else ("k^" if name.startswith("DreamerV3") else "kD")
        lo = [m - min(points[s]) for s, m in zip(xs, means)]
        hi = [max(points[s]) - m for s, m in zip(xs, means)]
        ax.errorbar(xs, means, yerr=[lo, hi], fmt=marker, mfc="none", capsize=3, ms=5, label=name)
    for planner, (color, label) in PLANNER_STYLE.items():
        mine = sorted((r for r in rows if r["planner"] == planner), key=lambda r: int(r["step"]))
        if not mine:
            continue
        xs = [int(r["step"]) for r in mine]
        values = [_metric(r, suite) for r in mine]
        ax.errorbar(xs, [v for v, _ in values], yerr=[e for _, e in values], color=color, capsize=3,
                    fmt="o-" if len(xs) > 2 else "o", ms=4, label=f"{label} (ours, ± s.e.)")
    ax.set_xlabel("agent steps")
    ax.set_ylabel("success rate" if suite == "metaworld" else "episode return")
    ax.set_xlim(-0.03 * steps, 1.05 * steps)
    ax.set_title(run_id, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def normalized_scores(record: dict, values: dict) -> np.ndarray | None:
    """Per-episode normalized scores in [0, 1]: DMControl return / 1000, Meta-World success, HumanoidBench return /
    the task's success threshold; capped at 1."""
    suite = record["suite"]
    if suite == "metaworld":
        if values.get("successes") is None:
            return None
        scores = np.asarray(values["successes"], dtype=float)
    else:
        if values.get("returns") is None:
            return None
        scale = 1000.0 if suite == "dmc" else float(record["score_scale"])
        scores = np.asarray(values["returns"], dtype=float) / scale
    return np.minimum(scores, 1.0)


def aggregate(episodes: dict, runs: dict, planners: list[str]) -> dict[str, Any] | None:
    """rliable IQM / mean with 95 % stratified-bootstrap CIs per planner at each run's final step, and the
    probability that Dream-MPC improves on the policy prior, on MPPI and on the prior's samples.

    The bootstrap resamples evaluation episodes within each task (the "runs" axis of rliable's score matrices
    holds episodes: with one training seed per task there is nothing else to resample), so the intervals cover
    evaluation noise, not seed-to-seed variation. Only runs that have every planner at their final step count.
    """
    from rliable import library as rly
    from rliable import metrics

    included, per_planner = [], {p: [] for p in planners}
    for run_id, record in runs.items():
        final = episodes.get(run_id, {}).get(str(record["steps"]), {})
        scores = {p: normalized_scores(record, final[p]) if p in final else None for p in planners}
        if any(s is None for s in scores.values()):
            continue
        included.append(run_id)
        for p in planners:
            per_planner[p].append(scores[p])
    if not included:
        return None
    # rliable wants a [runs, tasks] matrix per planner: the first n episodes of each task (paired initial states).
    matrices = {}
    for p, columns in per_planner.items():
        n = min(len(c) for c in columns)
        matrices[p] = np.stack([c[:n] for c in columns], axis=1)
    rng = np.random.RandomState(0)
    warnings.filterwarnings("ignore", message="random_state is deprecated", category=FutureWarning)  # arch, via rliable
    point, interval = rly.get_interval_estimates(
        matrices, lambda s: np.array([metrics.aggregate_iqm(s), metrics.aggregate_mean(s)]), reps=BOOTSTRAP_REPS,
        random_state=rng)
    result = {"runs": included, "reps": BOOTSTRAP_REPS, "planners": {}}
    for p in planners:
        result["planners"][p] = {
            "episodes_per_task": int(matrices[p].shape[0]),
            "iqm": float(point[p][0]), "iqm_ci": [float(interval[p][0][0]), float(interval[p][1][0])],
            "mean": float(point[p][1]), "mean_ci": [float(interval[p][0][1]), float(interval[p][1][1])],
        }
    pairs = {f"{x} > {y}": (matrices[x], matrices[y])
             for x, y in (("dream_mpc", "policy"), ("dream_mpc", "mppi"), ("dream_mpc", "policy_sample"))
             if x in matrices and y in matrices}
    if pairs:
        point, interval = rly.get_interval_estimates(pairs, metrics.probability_of_improvement, reps=BOOTSTRAP_REPS,
                                                     random_state=rng)
        result["probability_of_improvement"] = {
            key: {"value": float(point[key]), "ci": [float(interval[key][0][0]), float(interval[key][1][0])]}
            for key in pairs}
    return result


def plot_aggregate(result: dict, path: Path) -> None:
    planners = list(result["planners"])
    poi = result.get("probability_of_improvement", {})
    fig, axes = plt.subplots(1, 3 if poi else 2, figsize=(11 if poi else 7.5, 0.5 + 0.45 * len(planners)))
    for ax, key, title in zip(axes, ("iqm", "mean"), ("IQM", "Mean")):
        for i, p in enumerate(planners):
            value, (lo, hi) = result["planners"][p][key], result["planners"][p][f"{key}_ci"]
            color = PLANNER_STYLE.get(p, ("k", p))[0]
            ax.errorbar([value], [i], xerr=[[value - lo], [hi - value]], fmt="o", color=color, capsize=4)
        ax.set_yticks(range(len(planners)), [PLANNER_STYLE.get(p, ("k", p))[1] for p in planners] if ax is axes[0]
                      else [""] * len(planners))
        ax.set_title(f"{title} normalized score")
        ax.grid(alpha=0.3, axis="x")
    if poi:
        ax = axes[2]
        for i, (key, entry) in enumerate(poi.items()):
            value, (lo, hi) = entry["value"], entry["ci"]
            ax.errorbar([value], [i], xerr=[[value - lo], [hi - value]], fmt="o", color="k", capsize=4)
        ax.axvline(0.5, color="grey", ls="--", lw=1)
        ax.set_yticks(range(len(poi)), [k.replace("dream_mpc", "Dream-MPC").replace("policy", "policy prior")
                                        .replace("mppi", "MPPI").replace(" > ", " > ") for k in poi])
        ax.yaxis.tick_right()
        ax.set_title("P(improvement)")
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"{len(result['runs'])} task(s) at the final step; 95 % stratified-bootstrap CIs over episodes",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# the markdown
# ----------------------------------------------------------------------------------------------------------------
def _fmt_cell(row: dict | None, suite: str) -> str:
    if row is None:
        return ""
    mean, sem = float(row["return_mean"]), float(row["return_sem"])
    cell = f"{mean:.1f} ± {sem:.1f}"
    if suite == "metaworld" and row.get("success_rate") not in (None, ""):
        cell = f"{float(row['success_rate']):.2f} ({cell})"
    return cell + f" <sub>n={row['episodes']}</sub>"


def _swap_table(record: dict, rows: list[dict], planners: list[str]) -> str:
    suite = record["suite"]
    by_key = {(int(r["step"]), r["planner"]): r for r in rows}
    steps = sorted({int(r["step"]) for r in rows})
    present = [p for p in planners if any(r["planner"] == p for r in rows)]
    head = "| step | " + " | ".join(PLANNER_STYLE.get(p, ("", p))[1] for p in present) + " |"
    prior = record.get("policy_prior") or {}
    head += " prior: saturated, log σ |" if prior else ""
    lines = [head, "|---:|" + "---:|" * (len(present) + bool(prior))]
    for step in steps:
        cells = [_fmt_cell(by_key.get((step, p)), suite) for p in present]
        if prior:
            state = prior.get(str(step))
            cells.append(f"{state['saturated']:.2f}, {state['mean_log_std']:+.2f}" if state else "")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    ms = []
    for p in present:
        values = [float(r["plan_ms_per_step"]) for r in rows if r["planner"] == p]
        ms.append(f"{np.median(values):.1f}")
    lines.append("| ms per step (median) | " + " | ".join(ms) + (" | |" if prior else " |"))
    what = ("success rate (return ± s.e.)" if suite == "metaworld" else "return ± standard error")
    note = (" *prior*: the policy prior on the states of its own evaluation episode (benchmarks/policy_prior_state.py): "
            "the fraction of action dimensions whose squashed mean is beyond ±0.99, and the mean log-std (TD-MPC2's and "
            "BMPC's range [-10, 2] and [-3, 1]; DreamerV3's std lies in [0.1, 1])."
            if prior else "")
    return (f"Cells: {what} over n episodes, DETERMINISTIC mode (*policy prior, sampled*: RANDOM mode, the prior's "
            f"samples, which Dream-MPC draws its candidates from), the same initial states for every planner. ms per "
            f"step: the planner's own time, median over snapshots, measured while other jobs shared the 2 cores "
            f"(docs/performance.md has the quiet-machine timings).{note}\n\n" + "\n".join(lines))


def _run_section(run_id: str, record: dict, rows: list[dict], planners: list[str], data_dir: Path,
                 report: Path) -> str:
    png = data_dir / f"{run_id}.png"
    rel = os.path.relpath(png, report.parent)
    hours = record["wall_s"] / 3600
    status = ("finished" if record["trained_step"] >= record["steps"] else
              f"in progress: {record['trained_step']} / {record['steps']} steps")
    chunks = record.get("chunks") or []
    machine = sorted({c.get("machine", "?") for c in chunks}) or ["?"]
    lines = [f"### {run_id}", "",
             f"{record['suite']} · {status} · training wall time {hours:.1f} h in {len(chunks)} chunk(s) recorded "
             f"by the campaign · {', '.join(machine)}"
             + (" · *run directory lived on an earlier machine*" if record.get("from_earlier_machine") else ""), ""]
    if record.get("swaps_pending"):
        lines += [f"{record['swaps_pending']} planner swap(s) not evaluated yet.", ""]
    if rows:
        lines += [f"![{run_id}]({rel})", "", _swap_table(record, rows, planners), ""]
    pub = published_points(record["task"], record["suite"], record["steps"])
    notes = []
    for name, points in pub.items():
        if points:
            last = max(points)
            notes.append(f"{name} at {last}: " + ", ".join(f"{v:.3g}" for v in points[last]))
    if notes:
        lines += ["Published: " + "; ".join(notes) + ".", ""]
    if chunks:
        lines += [f"Last training command: `{chunks[-1]['command']}`", ""]
    return "\n".join(lines)


def _aggregate_section(result: dict | None, data_dir: Path, report: Path, total: int) -> str:
    if result is None:
        return ("No run has every planner at its final step yet: the aggregate (rliable IQM and mean with 95 % "
                "stratified-bootstrap CIs, probability of improvement) appears here once one does.\n")
    rel = os.path.relpath(data_dir / "aggregate.png", report.parent)
    lines = [f"Runs included ({len(result['runs'])} of {total}): " + ", ".join(result["runs"]) + ".", "",
             f"![aggregate]({rel})", "",
             "| planner | IQM [95 % CI] | mean [95 % CI] | episodes per task |", "|---|---:|---:|---:|"]
    for p, entry in result["planners"].items():
        lines.append(f"| {PLANNER_STYLE.get(p, ('', p))[1]} | {entry['iqm']:.3f} [{entry['iqm_ci'][0]:.3f}, "
                     f"{entry['iqm_ci'][1]:.3f}] | {entry['mean']:.3f} [{entry['mean_ci'][0]:.3f}, "
                     f"{entry['mean_ci'][1]:.3f}] | {entry['episodes_per_task']} |")
    for key, entry in result.get("probability_of_improvement", {}).items():
        lines.append(f"\nP({key}) = {entry['value']:.3f} [{entry['ci'][0]:.3f}, {entry['ci'][1]:.3f}]")
    lines += ["", "Normalized score per episode: DMControl return / 1000, Meta-World success (0/1), HumanoidBench "
              "return / the task's success threshold, capped at 1. The bootstrap resamples evaluation episodes "
              "within each task: with one training seed per task the intervals show evaluation noise only, not "
              "seed-to-seed variation."]
    return "\n".join(lines) + "\n"


def _kept_conclusion(report: Path) -> str:
    if report.exists():
        text = report.read_text()
        if CONCLUSION_BEGIN in text and CONCLUSION_END in text:
            return text[text.index(CONCLUSION_BEGIN) + len(CONCLUSION_BEGIN):text.index(CONCLUSION_END)].strip("\n")
    return "*Written by hand once the runs have finished.*"


def write_report(campaign: dict[str, Any]) -> Path:
    """Rewrites the report files from the run directories (and the committed rows of runs without one)."""
    report = campaign["report"]
    data_dir = _data_dir(report)
    planners = [swap.name for swap in campaign["swaps"]]
    rows, episodes, runs = collect(campaign)
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_dir / ".planner_swap.csv.tmp"
    with tmp.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=SWAP_COLUMNS)
        writer.writeheader()
        for row in sorted(rows, key=lambda r: (r["run"], int(r["step"]), planners.index(r["planner"])
                                               if r["planner"] in planners else 99)):
            writer.writerow({key: ("" if row.get(key) is None else row[key]) for key in SWAP_COLUMNS})
    os.replace(tmp, data_dir / "planner_swap.csv")
    _atomic_write(data_dir / "episodes.json", json.dumps(episodes))
    _atomic_write(data_dir / "runs.json", json.dumps(runs, indent=1))
    for run_id, record in runs.items():
        run_rows = [r for r in rows if r["run"] == run_id]
        if run_rows:
            plot_run(run_id, record, run_rows, data_dir / f"{run_id}.png")
    result = aggregate(episodes, runs, planners)
    if result is not None:
        _atomic_write(data_dir / "aggregate.json", json.dumps(result, indent=1))
        plot_aggregate(result, data_dir / "aggregate.png")

    config = os.path.relpath(campaign["path"], ROOT)
    lines = [
        "# Benchmark: Dream-MPC against its own policy prior and MPPI",
        "",
        "Written by `python benchmarks/campaign.py` (configuration: `" + config + "`; rewrite only the report with "
        "`--report-only`), last on "
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC. Every run trains a world model (TD-MPC2's; "
        "DreamerV3's or BMPC's where the run's name ends in `-dreamer_v3` or `-bmpc`) with Dream-MPC acting in the "
        "loop; every snapshot (every evaluation point) is evaluated with each planner on the same initial states. "
        "The MPPI column is our `MPPIPlanner`, which computes TD-MPC2's MPPI step exactly given the same random "
        "numbers (`tests/test_tdmpc2_mppi_reference.py`, `docs/results/mppi_fidelity.md`; BMPC's MPPI on BMPC's "
        "models: `tests/test_bmpc_reference.py`): it stands for TD-MPC2's planner on the same model. Raw rows: `benchmark/planner_swap.csv`, per-episode values: "
        "`benchmark/episodes.json`, runs (commands, wall time, machine): `benchmark/runs.json`.",
        "",
        "## Conclusion",
        "",
        CONCLUSION_BEGIN,
        _kept_conclusion(report),
        CONCLUSION_END,
        "",
        "## Aggregate at the final step",
        "",
        _aggregate_section(result, data_dir, report, len(campaign["runs"])),
        "## Runs",
        "",
        "| run | steps trained | planner swaps | wall time (h) |",
        "|---|---:|---:|---:|",
    ]
    for run in campaign["runs"]:
        record = runs.get(run.id)
        if record is None:
            lines.append(f"| {run.id} | not started | | |")
        else:
            lines.append(f"| {run.id} | {record['trained_step']} / {record['steps']} | {record['swap_rows']} "
                         f"(+{record['swaps_pending']} pending) | {record['wall_s'] / 3600:.1f} |")
    lines.append("")
    for run_id, record in runs.items():
        lines.append(_run_section(run_id, record, [r for r in rows if r["run"] == run_id], planners, data_dir,
                                  report))
    _atomic_write(report, "\n".join(lines).rstrip() + "\n")
    return report
