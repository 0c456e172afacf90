"""The campaign's report: ``docs/results/benchmark.md`` and ``docs/results/benchmark/`` (CSV, JSON, figures).

Written by ``benchmarks/campaign.py`` after every evaluation and training chunk (``--report-only`` rewrites it
alone). Sources, for each run of the campaign YAML: its run directory (``eval.csv``, ``swaps/``,
``campaign.json``) when it exists, otherwise the rows that the committed report already holds for it (the run
directory lived on an earlier machine).

Files:
- ``benchmark/planner_swap.csv``: ``task,suite,step,planner,return_mean,return_std,success_rate,episodes,
  plan_ms_per_step`` (+ ``return_sem,run,algorithm,success_any_rate,mean_episode_length``), one row per run,
  snapshot step and planner;
- ``benchmark/episodes.json``: every episode's return (and success flag) behind those rows (paired: episode i
  of every planner starts from the same initial state);
- ``benchmark/runs.json``: per run: steps trained, wall time, machine, commands, pending swaps, earlier attempts
  that started again from step 0 with the results they had (``restarts``, see :func:`earlier_attempts`);
- ``benchmark/planner_swap_earlier_runs.csv``: those earlier attempts' swap rows (the columns above +
  ``attempt_started,attempt_reached_step``);
- ``benchmark/<run>.png``: the curves (policy and Dream-MPC every snapshot, MPPI where evaluated, the
  published TD-MPC2 and DreamerV3 seeds / BMPC-paper curves);
- ``benchmark/aggregate.json`` and ``aggregate[-<algorithm>].png``: per training algorithm, the mean and IQM
  (rliable) of normalized scores across tasks with 95 % bootstrap CIs over evaluation episodes per planner at the
  final step, and Dream-MPC's paired comparisons with the other planners (see :func:`aggregate`);
- ``benchmark/aggregate_by_step.json`` and ``aggregate[-<algorithm>]-step<N>.png``: the same at the other steps
  at which the YAML has every planner evaluated (:func:`intermediate_full_steps`), a run lost after such a step
  counting with its earlier attempt's snapshot.
The section between ``<!-- conclusion -->`` markers of benchmark.md is written by hand and kept.
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from torchrl_dreammpc.checkpoints import write_text_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT.parent / "shared" / "reference" / "published-results"
SWAP_COLUMNS = ["task", "suite", "step", "planner", "return_mean", "return_std", "success_rate", "episodes",
                "plan_ms_per_step", "return_sem", "run", "algorithm", "success_any_rate", "mean_episode_length"]
PLANNER_STYLE = {"policy": ("tab:blue", "policy prior"), "policy_sample": ("tab:cyan", "policy prior, sampled"),
                 "dream_mpc": ("tab:red", "Dream-MPC"),
                 "mppi": ("tab:green", "MPPI"), "dream_mpc_no_grad": ("tab:purple", "Dream-MPC, no gradient step"),
                 "dream_mpc_no_uncertainty": ("tab:orange", "Dream-MPC, λ = 0")}
CONCLUSION_BEGIN, CONCLUSION_END = "<!-- conclusion -->", "<!-- /conclusion -->"
ALGORITHM_NAMES = {"tdmpc2": "TD-MPC2 (the benchmark set)", "dreamer_v3": "DreamerV3", "bmpc": "BMPC"}
BOOTSTRAP_REPS = 5000


def _data_dir(report: Path) -> Path:
    return report.with_suffix("")




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
                "algorithm": run.train.get("algorithm", "tdmpc2"), "success_any_rate": result.get("success_any_rate"),
                "mean_episode_length": result.get("mean_episode_length"),
            })
            episodes.setdefault(str(step), {})[swap.name] = {
                "returns": result.get("episode_returns"), "successes": result.get("episode_successes"),
                "successes_any": result.get("episode_successes_any")}
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


#: The swap-row columns that hold numbers (a committed CSV gives strings; an earlier attempt keeps them typed).
_INT_COLUMNS, _FLOAT_COLUMNS = ("step", "episodes"), ("return_mean", "return_std", "success_rate", "plan_ms_per_step",
                                                      "return_sem", "success_any_rate", "mean_episode_length")


def _typed_row(row: dict) -> dict:
    """A swap row with numbers for numbers and ``None`` for empty cells (as read back from the CSV)."""
    out = {}
    for key, value in row.items():
        if value in ("", None):
            out[key] = None
        elif key in _INT_COLUMNS:
            out[key] = int(float(value))
        elif key in _FLOAT_COLUMNS:
            out[key] = float(value)
        else:
            out[key] = value
    return out


def earlier_attempts(committed: dict | None, record: dict, rows: list[dict] = (),
                     episodes: dict | None = None) -> list[dict]:
    """The earlier attempts of a run that started again from step 0 (its directory lost with a machine, or a
    ``--rerun``), carried from report to report so that the report keeps saying so: those of the committed record,
    plus the committed run itself when ``record`` does not continue it (another first training chunk, or fewer
    steps). The committed run's evidence goes with it: its swap ``rows`` and ``episodes`` (what the committed
    report held for it), its training-loop evaluation curve and its policy-prior diagnosis, so that a lost run
    directory costs the compute, not the results already measured.

    Examples:
        >>> old = {"trained_step": 7960, "wall_s": 7920.0, "chunks": [{"start": "2026-12-01T17:02:38+00:00"}]}
        >>> earlier_attempts(old, {"trained_step": 8000, "chunks": old["chunks"] + [{"start": "later"}]})
        []
        >>> [attempt] = earlier_attempts(old, {"trained_step": 5170, "chunks": [{"start": "2026-12-01T20:34"}]})
        >>> attempt["started"], attempt["reached_step"], attempt["wall_s"], attempt["swap_rows"]
        ('2026-12-01T17:02:38+00:00', 7960, 7920.0, [])
    """
    if committed is None:
        return []
    attempts = list(committed.get("restarts") or [])
    old_chunks, new_chunks = committed.get("chunks") or [], record.get("chunks") or []
    other_run = bool(old_chunks) and (not new_chunks or new_chunks[0].get("start") != old_chunks[0].get("start"))
    if other_run or committed["trained_step"] > record["trained_step"]:
        attempts.append({"started": old_chunks[0].get("start") if old_chunks else None,
                         "reached_step": committed["trained_step"], "wall_s": committed["wall_s"],
                         "swap_rows": [_typed_row(row) for row in rows], "episodes": episodes or {},
                         "eval_curve": committed.get("eval_curve") or [],
                         "policy_prior": committed.get("policy_prior") or {}})
    return attempts


def _attempt_lines(record: dict) -> list[str]:
    lines = []
    for attempt in record.get("restarts") or []:
        started = f", started {attempt['started'][:16].replace('T', ' ')} UTC," if attempt.get("started") else ""
        kept = (" Its planner swaps are kept: dashed in the figure, and in the table after this run's."
                if attempt.get("swap_rows") else "")
        lines += [f"*An earlier run of it{started} reached {attempt['reached_step']:,} steps in "
                  f"{attempt['wall_s'] / 3600:.1f} h and was not continued (its directory was lost with a machine, "
                  f"or it was rerun): the run below started again from step 0.{kept}*", ""]
    return lines


def collect(campaign: dict[str, Any]) -> tuple[list[dict], dict, dict]:
    """``(rows, episodes, runs)`` for every run of the campaign, from run directories or the committed report."""
    old_rows, old_episodes, old_runs = _read_committed(campaign["report"])
    rows, episodes, runs = [], {}, {}
    for run in campaign["runs"]:
        run_rows, run_episodes = _run_rows(run, campaign["swaps"]) if run.run_dir.exists() else ([], {})
        committed = [row for row in old_rows if row["run"] == run.id]
        if run.run_dir.exists() and (run_rows or not committed):
            record = _run_record(run, campaign, run_rows)
            record["restarts"] = earlier_attempts(old_runs.get(run.id), record, committed,
                                                  old_episodes.get(run.id, {}))
        else:  # the run lived on an earlier machine (its directory here is gone, or new and still without
            # results): keep what was committed until the directory has results of its own
            run_rows, run_episodes = committed, old_episodes.get(run.id, {})
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
#: How the published curves were made (they are references, not the same agent as a campaign run).
PUBLISHED_SETTINGS = {
    "TD-MPC2 (published)": "5M model, MPPI acting (TD-MPC2's results files)",
    "DreamerV3 (published)": "its own setting (TD-MPC2's results files)",
    "TD-MPC2 (BMPC paper, mean)": "BMPC's default model (mlp 512, latent 512; ~5M), 5 Q heads, MPPI acting, "
                                  "falls not terminal",
    "BMPC (BMPC paper, mean)": "BMPC's default model (mlp 512, latent 512; ~5M), 2 V heads, MPPI acting",
}


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
def _success_sem(p: float, n: int) -> float:
    """The binomial standard error of a success rate, sqrt(p (1 - p) / n) (0 at p = 0 or 1: read it with n)."""
    return math.sqrt(p * (1 - p) / n)


def _metric(row: dict, suite: str) -> tuple[float, float]:
    """(value, standard error) plotted for a swap row: success rate on Meta-World, return otherwise."""
    if suite == "metaworld":
        p, n = float(row["success_rate"]), int(row["episodes"])
        return p, _success_sem(p, n)
    return float(row["return_mean"]), float(row["return_sem"])


def plot_run(run_id: str, record: dict, rows: list[dict], path: Path) -> None:
    """The run's curves: its planner swaps (± s.e.) over snapshots, those of its earlier attempts (``restarts``
    with swap rows) dashed and faded, and the published curves of its task."""
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
    for attempt in record.get("restarts") or []:
        earlier = attempt.get("swap_rows") or []
        for planner, (color, label) in PLANNER_STYLE.items():
            mine = sorted((r for r in earlier if r["planner"] == planner), key=lambda r: int(r["step"]))
            if mine:
                values = [_metric(r, suite) for r in mine]
                unlabelled = not any(r["planner"] == planner for r in rows)  # its colour is not in the legend yet
                ax.errorbar([int(r["step"]) for r in mine], [v for v, _ in values], yerr=[e for _, e in values],
                            color=color, capsize=2, fmt="o--", mfc="none", ms=3, lw=1, alpha=0.45,
                            label=f"{label} (earlier run)" if unlabelled else None)
        if earlier:
            ax.plot([], [], "k--", alpha=0.45, lw=1,
                    label=f"dashed: an earlier run of it (lost at {attempt['reached_step']:,} steps)")
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


#: Dream-MPC against: its prior's mean and samples, MPPI, and the ablations (each where both were evaluated).
COMPARISONS = [("dream_mpc", "policy"), ("dream_mpc", "policy_sample"), ("dream_mpc", "mppi"),
               ("dream_mpc", "dream_mpc_no_grad"), ("dream_mpc", "dream_mpc_no_uncertainty")]


def _algorithm(record: dict) -> str:
    return (record.get("train") or {}).get("algorithm", "tdmpc2")


def _percentile_ci(samples: np.ndarray) -> list[float]:
    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]


def _attempt_name(attempt: dict) -> str:
    started = attempt.get("started")
    return (f"earlier run{' started ' + started[:16].replace('T', ' ') + ' UTC' if started else ''}, lost at "
            f"{attempt['reached_step']:,} steps")


def _episodes_at(run_id: str, record: dict, episodes: dict, step: int | None,
                 planners: list[str]) -> tuple[dict | None, str]:
    """The episodes by planner that a run brings to an aggregate, and where they come from (or why none).

    ``step=None``: the final step of a finished run. A given ``step``: this run's snapshot at that step, else the
    most recent earlier attempt (``restarts``) with every planner there: a run lost with a machine after that step
    trained the same configuration and seed to it."""
    final = step is None
    if final:
        if record["trained_step"] < record["steps"]:
            return None, f"in progress, {record['trained_step']} / {record['steps']} steps"
        step = record["steps"]
    candidates = [("this run", episodes.get(run_id, {}).get(str(step), {}))]
    if not final:
        candidates += [(_attempt_name(attempt), (attempt.get("episodes") or {}).get(str(step), {}))
                       for attempt in reversed(record.get("restarts") or [])]
    for source, values in candidates:
        if all(p in values for p in planners):
            return values, source
    missing = [p for p in planners if p not in candidates[0][1]]
    return None, f"no {', '.join(missing)} at step {step}"


def aggregate(episodes: dict, runs: dict, planners: list[str], algorithm: str = "tdmpc2",
              reps: int = BOOTSTRAP_REPS, seed: int = 0, step: int | None = None) -> dict[str, Any] | None:
    """The final-step aggregate over the finished runs of one training ``algorithm`` (a task trained by two
    algorithms is two experiments, not two tasks of one); with ``step``, the aggregate at that snapshot step
    instead, over the runs that have every planner there (this run's, or an earlier attempt's: see
    :func:`_episodes_at`; ``sources`` says which).

    - **Per planner**: each task's score is its mean normalized score over the evaluation episodes; across
      tasks, rliable's ``aggregate_mean`` and ``aggregate_iqm`` of the ``[1, tasks]`` matrix of task scores (with
      one training seed per task, a task score stands where rliable has a run's: the IQM trims tasks, and equals
      the mean below 4 of them). 95 % CIs: percentile bootstrap over evaluation episodes, resampled within each
      task (stratified); evaluation noise only, not seed-to-seed variation.
    - **Paired comparisons** (:data:`COMPARISONS`): on the episodes both planners played (the first ``n`` of each:
      the same initial states), per task the mean difference of normalized scores and ``P(x > y)`` over episode
      pairs (a tie counts half), averaged across tasks; the bootstrap draws the same episode indices for both.

    Why not rliable's bootstrap and ``probability_of_improvement``: they resample runs (one per task here:
    degenerate) independently for the two planners (the pairing by initial state is lost), and its stratified
    bootstrap draws from numpy's global RNG whatever ``random_state`` says; ``seed`` makes these CIs reproducible.
    Runs without every planner at their final step are listed in ``excluded`` with the reason.
    """
    from rliable import metrics

    included, excluded, sources, task_scores = [], {}, {}, {p: [] for p in planners}
    for run_id, record in runs.items():
        if _algorithm(record) != algorithm:
            continue
        values, source = _episodes_at(run_id, record, episodes, step, planners)
        scores = {p: normalized_scores(record, values[p]) for p in planners} if values else {}
        if not values or any(s is None for s in scores.values()):
            excluded[run_id] = source if not values else f"no normalized score of {source}"
            continue
        included.append(run_id)
        sources[run_id] = source
        for p in planners:
            task_scores[p].append(scores[p])
    if not included:
        return None
    rng = np.random.default_rng(seed)

    def resampled_means(values: np.ndarray) -> np.ndarray:  # [reps] means of bootstrap resamples of one task
        return values[rng.integers(0, len(values), size=(reps, len(values)))].mean(axis=1)

    result: dict[str, Any] = {"algorithm": algorithm, "step": step, "runs": included, "sources": sources,
                              "excluded": excluded, "reps": reps, "seed": seed, "planners": {}, "comparisons": {}}
    for p in planners:
        point = np.array([[s.mean() for s in task_scores[p]]])  # [1, tasks]
        boot = np.stack([resampled_means(s) for s in task_scores[p]], axis=1)  # [reps, tasks]
        result["planners"][p] = {
            "episodes_per_task": [int(len(s)) for s in task_scores[p]],
            "task_scores": [float(v) for v in point[0]],
            "mean": float(metrics.aggregate_mean(point)),
            "mean_ci": _percentile_ci(boot.mean(axis=1)),
            "iqm": float(metrics.aggregate_iqm(point)),
            "iqm_ci": _percentile_ci(np.array([metrics.aggregate_iqm(row[None]) for row in boot])),
        }
    for x, y in COMPARISONS:
        if x not in task_scores or y not in task_scores:
            continue
        diffs, wins, boot_diff, boot_win, ns = [], [], [], [], []
        for sx, sy in zip(task_scores[x], task_scores[y]):
            n = min(len(sx), len(sy))
            d = sx[:n] - sy[:n]
            w = (d > 0) + 0.5 * (d == 0)
            idx = rng.integers(0, n, size=(reps, n))  # the same episodes for both planners
            diffs.append(d.mean()), wins.append(w.mean()), ns.append(n)
            boot_diff.append(d[idx].mean(axis=1)), boot_win.append(w[idx].mean(axis=1))
        result["comparisons"][f"{x} vs {y}"] = {
            "episodes_per_task": ns,
            "mean_difference": float(np.mean(diffs)),
            "mean_difference_ci": _percentile_ci(np.mean(boot_diff, axis=0)),
            "p_better": float(np.mean(wins)),
            "p_better_ci": _percentile_ci(np.mean(boot_win, axis=0)),
        }
    return result


def plot_aggregate(result: dict, path: Path) -> None:
    planners = list(result["planners"])
    comparisons = result.get("comparisons", {})
    panels = [("mean", "Mean normalized score"), ("iqm", "IQM across tasks")]
    fig, axes = plt.subplots(1, 4 if comparisons else 2,
                             figsize=(15 if comparisons else 7.5, 0.6 + 0.45 * max(len(planners), len(comparisons))))
    for ax, (key, title) in zip(axes, panels):
        for i, p in enumerate(planners):
            value, (lo, hi) = result["planners"][p][key], result["planners"][p][f"{key}_ci"]
            color = PLANNER_STYLE.get(p, ("k", p))[0]
            ax.errorbar([value], [i], xerr=[[value - lo], [hi - value]], fmt="o", color=color, capsize=4)
        ax.set_yticks(range(len(planners)), [PLANNER_STYLE.get(p, ("k", p))[1] for p in planners] if ax is axes[0]
                      else [""] * len(planners))
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    if comparisons:
        labels = [PLANNER_STYLE.get(k.split(" vs ")[1], ("", k))[1] for k in comparisons]
        for ax, key, title, null in ((axes[2], "mean_difference", "Dream-MPC − other (paired)", 0.0),
                                     (axes[3], "p_better", "P(Dream-MPC better)", 0.5)):
            for i, entry in enumerate(comparisons.values()):
                value, (lo, hi) = entry[key], entry[f"{key}_ci"]
                ax.errorbar([value], [i], xerr=[[value - lo], [hi - value]], fmt="o", color="k", capsize=4)
            ax.axvline(null, color="grey", ls="--", lw=1)
            ax.set_yticks(range(len(comparisons)), labels if ax is axes[2] else [""] * len(comparisons))
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3, axis="x")
    at = "the final step" if result.get("step") is None else f"step {result['step']:,}"
    fig.suptitle(f"{result['algorithm']}: {len(result['runs'])} task(s) at {at}; 95 % bootstrap CIs over "
                 "evaluation episodes (within each task)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# the markdown
# ----------------------------------------------------------------------------------------------------------------
#: Suites whose episodes end early (HumanoidBench: at a fall), whose swap cells show the mean episode length.
EARLY_ENDING_SUITES = ("humanoid_bench",)


def _fmt_cell(row: dict | None, suite: str) -> str:
    if row is None:
        return ""
    mean, sem = float(row["return_mean"]), float(row["return_sem"])
    cell = f"{mean:.1f} ± {sem:.1f}"
    if suite == "metaworld" and row.get("success_rate") not in (None, ""):
        p = float(row["success_rate"])
        any_step = row.get("success_any_rate")
        any_text = f", any {float(any_step):.2f}" if any_step not in (None, "") else ""
        cell = f"{p:.2f} ± {_success_sem(p, int(row['episodes'])):.2f}{any_text} ({cell})"
    length = row.get("mean_episode_length")
    if suite in EARLY_ENDING_SUITES and length not in (None, ""):  # a return is read with how long it ran
        return cell + f" <sub>n={row['episodes']}, {float(length):.0f} steps</sub>"
    return cell + f" <sub>n={row['episodes']}</sub>"


def paired_difference(x: dict | None, y: dict | None, suite: str,
                      key: str | None = None) -> tuple[float, float, int] | None:
    """Mean and standard error of the per-episode difference x − y (``key``; by default returns, and last-step
    successes on Meta-World) over the episodes both played (the first n: the same initial states), and n;
    ``None`` without both."""
    key = key or ("successes" if suite == "metaworld" else "returns")
    if not x or not y or x.get(key) is None or y.get(key) is None:
        return None
    n = min(len(x[key]), len(y[key]))
    d = np.asarray(x[key][:n], dtype=float) - np.asarray(y[key][:n], dtype=float)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"), n


def _paired_cell(at: dict, suite: str, other: str = "policy") -> str:
    """Dream-MPC − ``other`` on the same initial states (``at``: one step's episodes by planner), ± its s.e.;
    on Meta-World the success difference with the return difference in brackets; empty without both."""
    diff = paired_difference(at.get("dream_mpc"), at.get(other), suite)
    if not diff:
        return ""
    digits = 2 if suite == "metaworld" else 1
    cell = f"{diff[0]:+.{digits}f} ± {diff[1]:.{digits}f}"
    returns = paired_difference(at.get("dream_mpc"), at.get(other), suite, key="returns")
    if suite == "metaworld" and returns:  # the return difference beside the success one
        cell += f" (return {returns[0]:+.1f} ± {returns[1]:.1f})"
    return cell


def _across_runs_table(record: dict, rows: list[dict], episodes: dict | None) -> str:
    """Dream-MPC's paired differences with its prior's mean and with the prior's samples at each snapshot, one
    column per training run of the configuration (its earlier attempts with swap rows, then this run): whether a
    lift repeats when the same configuration and seed are trained again. Empty with fewer than two such runs."""
    runs = [(_attempt_name(a), a.get("episodes") or {}) for a in record.get("restarts") or [] if a.get("swap_rows")]
    if rows:
        runs.append(("this run", episodes or {}))
    if len(runs) < 2:
        return ""
    steps = sorted({int(step) for _, eps in runs for step in eps})
    lines = ["| step | " + " | ".join(name for name, _ in runs) + " |", "|---:|" + "---:|" * len(runs)]
    for step in steps:
        cells = []
        for _, eps in runs:
            at = eps.get(str(step), {})
            prior, sampled = _paired_cell(at, record["suite"]), _paired_cell(at, record["suite"], "policy_sample")
            cells.append(prior + (f" <sub>samples {sampled}</sub>" if sampled else ""))
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return ("**Dream-MPC − prior, paired, in each training run of this configuration** (± s.e.; small: Dream-MPC − "
            "the prior's samples, paired; the same initial states in every run, the model of each run's own "
            "training):\n\n" + "\n".join(lines))


def _swap_table(record: dict, rows: list[dict], planners: list[str], episodes: dict | None = None,
                explain: bool = True) -> str:
    """The planner-swap table of one run (a row per snapshot step), after a paragraph that says how to read its
    cells (``explain``)."""
    suite = record["suite"]
    by_key = {(int(r["step"]), r["planner"]): r for r in rows}
    steps = sorted({int(r["step"]) for r in rows})
    present = [p for p in planners if any(r["planner"] == p for r in rows)]
    head = "| step | " + " | ".join(PLANNER_STYLE.get(p, ("", p))[1] for p in present) + " |"
    paired = bool(episodes) and "dream_mpc" in present and "policy" in present
    head += " Dream-MPC − prior, paired |" if paired else ""
    prior = record.get("policy_prior") or {}
    head += " prior: saturated, log σ |" if prior else ""
    lines = [head, "|---:|" + "---:|" * (len(present) + paired + bool(prior))]
    for step in steps:
        cells = [_fmt_cell(by_key.get((step, p)), suite) for p in present]
        if paired:
            cells.append(_paired_cell(episodes.get(str(step), {}), suite))
        if prior:
            state = prior.get(str(step))
            cells.append(f"{state['saturated']:.2f}, {state['mean_log_std']:+.2f}" if state else "")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    ms = []
    for p in present:
        values = [float(r["plan_ms_per_step"]) for r in rows if r["planner"] == p]
        ms.append(f"{np.median(values):.1f}")
    lines.append("| ms per step (median) | " + " | ".join(ms) + " |" + " |" * (paired + bool(prior)))
    what = ("success rate at the episode's last step, as TD-MPC2 counts it, ± binomial s.e., and at any step "
            "(return ± s.e.)" if suite == "metaworld" else "return ± standard error")
    if suite in EARLY_ENDING_SUITES:
        what += " (beside n, the mean episode length in steps: an episode ends at a fall)"
    note = (" *prior*: the policy prior on the states of its own evaluation episode (benchmarks/policy_prior_state.py): "
            "the fraction of action dimensions whose squashed mean is beyond ±0.99, and the mean log-std (TD-MPC2's and "
            "BMPC's range [-10, 2] and [-3, 1]; DreamerV3's std lies in [0.1, 1])."
            if prior else "")
    if not explain:
        return "\n".join(lines)
    return (f"Cells: {what} over n episodes, DETERMINISTIC mode (*policy prior, sampled*: RANDOM mode, the prior's "
            f"samples, which Dream-MPC draws its candidates from), the same initial states for every planner. ms per "
            f"step: the planner's own time, median over snapshots, measured while other jobs shared the 2 cores "
            f"(docs/performance.md has the quiet-machine timings)."
            + (" *Dream-MPC − prior, paired*: the mean per-episode difference on the same initial states ± its "
               "standard error" + (" (success, and return in brackets)." if suite == "metaworld" else ".")
               if paired else "") + f"{note}\n\n" + "\n".join(lines))


def _run_section(run_id: str, record: dict, rows: list[dict], planners: list[str], data_dir: Path,
                 report: Path, episodes: dict | None = None) -> str:
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
    lines += _attempt_lines(record)
    if record.get("swaps_pending"):
        lines += [f"{record['swaps_pending']} planner swap(s) not evaluated yet.", ""]
    attempts = [attempt for attempt in record.get("restarts") or [] if attempt.get("swap_rows")]
    if rows or attempts:
        lines += [f"![{run_id}]({rel})", ""]
    if rows:
        lines += [_swap_table(record, rows, planners, episodes), ""]
    for attempt in attempts:
        how = "; cells as above" if rows else ""
        lines += [f"**The {_attempt_name(attempt)}** (the same configuration "
                  f"and seed; its results as committed before its directory was lost{how}):", "",
                  _swap_table({**record, "policy_prior": attempt.get("policy_prior") or {}}, attempt["swap_rows"],
                              planners, attempt.get("episodes"), explain=not rows), ""]
    across = _across_runs_table(record, rows, episodes)
    if across:
        lines += [across, ""]
    pub = published_points(record["task"], record["suite"], record["steps"])
    notes = []
    for name, points in pub.items():
        if points:
            last = max(points)
            notes.append(f"{name} at {last}: " + ", ".join(f"{v:.3g}" for v in points[last]))
    if notes:
        settings = "; ".join(f"{name.split(' (')[0]}, {PUBLISHED_SETTINGS[name]}" for name in pub
                             if name in PUBLISHED_SETTINGS)
        lines += ["Published: " + "; ".join(notes) + f". Settings: {settings}; this run: "
                  f"{_run_setting(record.get('train') or {})}.", ""]
    if chunks:
        lines += [f"Last training command: `{chunks[-1]['command']}`", ""]
    return "\n".join(lines)


def _run_setting(train: dict) -> str:
    """A run's model and acting planner, in the words of the published settings."""
    if train.get("algorithm") == "dreamer_v3":
        model = f"algorithm=dreamer_v3, preset={train.get('preset', 'none')}"
    else:
        model = f"algorithm={train.get('algorithm', 'tdmpc2')}, model_size={train.get('model_size')}"
    return f"{model}, {train.get('planner')} acting"


def _aggregate_section(result: dict | None, algorithm: str, data_dir: Path, report: Path,
                       step: int | None = None) -> str:
    if result is None:
        at = "its final step" if step is None else f"step {step:,}"
        return (f"No {algorithm} run has every planner at {at} yet: the aggregate (mean and IQM of "
                "normalized scores with 95 % bootstrap CIs, paired comparisons) appears here once one does.\n")
    rel = os.path.relpath(data_dir / _aggregate_png(algorithm, step), report.parent)
    if step is None:
        included = ", ".join(result["runs"])
    else:  # which training run of each task the episodes come from
        included = ", ".join(f"{run} ({result['sources'][run]})" for run in result["runs"])
    lines = [f"Runs included ({len(result['runs'])}): {included}."]
    if result["excluded"]:
        lines[0] += " Not yet: " + "; ".join(f"{run} ({why})" for run, why in result["excluded"].items()) + "."
    lines += ["", f"![aggregate {algorithm}]({rel})", "",
              "| planner | mean [95 % CI] | IQM across tasks [95 % CI] | task scores | episodes per task |",
              "|---|---:|---:|---|---|"]
    for p, entry in result["planners"].items():
        lines.append(f"| {PLANNER_STYLE.get(p, ('', p))[1]} | {entry['mean']:.3f} [{entry['mean_ci'][0]:.3f}, "
                     f"{entry['mean_ci'][1]:.3f}] | {entry['iqm']:.3f} [{entry['iqm_ci'][0]:.3f}, "
                     f"{entry['iqm_ci'][1]:.3f}] | {', '.join(f'{v:.3f}' for v in entry['task_scores'])} | "
                     f"{', '.join(map(str, entry['episodes_per_task']))} |")
    if result["comparisons"]:
        lines += ["", "| Dream-MPC against | mean difference [95 % CI] | P(Dream-MPC better) [95 % CI] | "
                  "paired episodes per task |", "|---|---:|---:|---|"]
        for key, entry in result["comparisons"].items():
            other = PLANNER_STYLE.get(key.split(" vs ")[1], ("", key))[1]
            lines.append(f"| {other} | {entry['mean_difference']:+.3f} [{entry['mean_difference_ci'][0]:+.3f}, "
                         f"{entry['mean_difference_ci'][1]:+.3f}] | {entry['p_better']:.3f} "
                         f"[{entry['p_better_ci'][0]:.3f}, {entry['p_better_ci'][1]:.3f}] | "
                         f"{', '.join(map(str, entry['episodes_per_task']))} |")
    lines += ["", "Normalized score per episode: DMControl return / 1000, Meta-World success at the last step (0/1), "
              "HumanoidBench return / the task's success threshold, capped at 1. A task's score is its mean over "
              "the evaluation episodes; mean and IQM (rliable) are taken across tasks (the IQM equals the mean "
              "below 4 tasks). Paired comparisons use the episodes both planners played (the same initial "
              "states; MPPI played the first 10): per task the mean difference and the fraction of episode pairs "
              "Dream-MPC won (ties half), averaged across tasks. The CIs resample evaluation episodes within each "
              f"task ({result['reps']} reps, seed {result['seed']}; the same episodes for both planners of a "
              "comparison): one training seed per task, so they show evaluation noise only, not seed-to-seed "
              "variation."]
    return "\n".join(lines) + "\n"


def _aggregate_png(algorithm: str, step: int | None = None) -> str:
    name = "aggregate" if algorithm == "tdmpc2" else f"aggregate-{algorithm}"
    return f"{name}.png" if step is None else f"{name}-step{step}.png"


def intermediate_full_steps(campaign: dict[str, Any]) -> list[int]:
    """The snapshot steps at which the campaign's YAML has every planner evaluated (the steps common to the swaps
    that list theirs), but the final step of every run (the final-step aggregate's): the aggregate is also
    computed there, fixed by the configuration, not chosen from results."""
    listed = [set(swap.steps) for swap in campaign["swaps"] if swap.steps is not None]
    if not listed:  # every planner at every snapshot: no step stands out
        return []
    return sorted(step for step in set.intersection(*listed)
                  if not all(run.steps == step for run in campaign["runs"]))


def _kept_conclusion(report: Path) -> str:
    if report.exists():
        text = report.read_text()
        if CONCLUSION_BEGIN in text and CONCLUSION_END in text:
            return text[text.index(CONCLUSION_BEGIN) + len(CONCLUSION_BEGIN):text.index(CONCLUSION_END)].strip("\n")
    return "*Written by hand once the runs have finished.*"


def _write_earlier_runs_csv(runs: dict, path: Path) -> None:
    """The swap rows of the runs' earlier attempts (``restarts``), with the attempt's start and last step."""
    rows = [{**row, "attempt_started": attempt.get("started"), "attempt_reached_step": attempt["reached_step"]}
            for record in runs.values() for attempt in record.get("restarts") or []
            for row in attempt.get("swap_rows") or []]
    write_text_atomic(path, _csv_text(SWAP_COLUMNS + ["attempt_started", "attempt_reached_step"], rows))


def _csv_text(columns: list[str], rows) -> str:
    """``rows`` as CSV text with ``columns`` (``None`` and missing entries written as empty cells)."""
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in columns})
    return table.getvalue()


def write_report(campaign: dict[str, Any]) -> Path:
    """Rewrites the report files from the run directories (and the committed rows of runs without one)."""
    report = campaign["report"]
    data_dir = _data_dir(report)
    planners = [swap.name for swap in campaign["swaps"]]
    rows, episodes, runs = collect(campaign)
    data_dir.mkdir(parents=True, exist_ok=True)
    ordered = sorted(rows, key=lambda r: (r["run"], int(r["step"]), planners.index(r["planner"])
                                          if r["planner"] in planners else 99))
    write_text_atomic(data_dir / "planner_swap.csv", _csv_text(SWAP_COLUMNS, ordered))
    write_text_atomic(data_dir / "episodes.json", json.dumps(episodes))
    write_text_atomic(data_dir / "runs.json", json.dumps(runs, indent=1))
    _write_earlier_runs_csv(runs, data_dir / "planner_swap_earlier_runs.csv")
    for run_id, record in runs.items():
        run_rows = [r for r in rows if r["run"] == run_id]
        if run_rows or any(attempt.get("swap_rows") for attempt in record.get("restarts") or []):
            plot_run(run_id, record, run_rows, data_dir / f"{run_id}.png")
    algorithms = list(dict.fromkeys(run.train.get("algorithm", "tdmpc2") for run in campaign["runs"]))
    results = {algorithm: aggregate(episodes, runs, planners, algorithm) for algorithm in algorithms}
    write_text_atomic(data_dir / "aggregate.json", json.dumps(results, indent=1))
    for algorithm, result in results.items():
        if result is not None:
            plot_aggregate(result, data_dir / _aggregate_png(algorithm))
    aggregate_sections = []
    for algorithm, result in results.items():
        aggregate_sections += [f"### Runs trained with {ALGORITHM_NAMES.get(algorithm, algorithm)}", "",
                               _aggregate_section(result, algorithm, data_dir, report)]
    by_step = {step: {algorithm: aggregate(episodes, runs, planners, algorithm, step=step)
                      for algorithm in algorithms} for step in intermediate_full_steps(campaign)}
    write_text_atomic(data_dir / "aggregate_by_step.json", json.dumps({str(k): v for k, v in by_step.items()},
                                                                       indent=1))
    for step, step_results in by_step.items():
        aggregate_sections += [f"## Aggregate at step {step:,}", "",
                               "A step other than the runs' common final one at which every planner is evaluated "
                               f"({os.path.relpath(campaign['path'], ROOT)}). A run counts with its current training "
                               "run's snapshot; one that lacks a planner there (e.g. a run whose directory was lost "
                               "with a machine and that has not got back to the step) counts with its most recent "
                               "earlier training run that has them all, named beside it. Same normalization and "
                               "statistics as above.", ""]
        for algorithm, result in step_results.items():
            if result is None:
                continue
            plot_aggregate(result, data_dir / _aggregate_png(algorithm, step))
            aggregate_sections += [f"### Runs trained with {ALGORITHM_NAMES.get(algorithm, algorithm)}, step "
                                   f"{step:,}", "", _aggregate_section(result, algorithm, data_dir, report, step)]
        missing = [ALGORITHM_NAMES.get(a, a) for a, result in step_results.items() if result is None]
        if missing:
            aggregate_sections += [f"No run trained with {', '.join(missing)} has every planner at step {step:,}.", ""]

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
        "`benchmark/episodes.json`, runs (commands, wall time, machine): `benchmark/runs.json`; the rows of "
        "earlier runs that started again from step 0 (a run directory lost with a machine): "
        "`benchmark/planner_swap_earlier_runs.csv`.",
        "",
        "## Conclusion",
        "",
        CONCLUSION_BEGIN,
        _kept_conclusion(report),
        CONCLUSION_END,
        "",
        "## Aggregate at the final step",
        "",
        *aggregate_sections,
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
                                  report, episodes.get(run_id)))
    write_text_atomic(report, "\n".join(lines).rstrip() + "\n")
    return report
