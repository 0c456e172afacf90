"""Plot a run's evaluation curve beside TD-MPC2's published curve and copy it into docs/results/.

    python benchmarks/learning_curve.py --run-dir /work/runs/cartpole-swingup-dream_mpc-1M-s1 \
        --name cartpole-swingup-dream_mpc-1M --command "python recipes/train.py task=cartpole-swingup ..."

Writes ``docs/results/<name>.csv`` (columns ``step,return``: the run's ``eval.csv``), ``<name>.png`` and
``<name>.md`` (the command, the machine, the last point, and where TD-MPC2 is at the same step).
The reference is ``../shared/reference/tdmpc2-cartpole-swingup.csv`` (3 seeds, columns step,reward,seed); it is
plotted only when the run's task is cartpole-swingup and the file exists.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "tdmpc2-cartpole-swingup.csv"


def read_curve(path: Path) -> list[tuple[int, float]]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return [(int(float(r["step"])), float(r["return"])) for r in rows]


def read_reference(path: Path, max_step: int) -> dict[int, list[float]]:
    by_step: dict[int, list[float]] = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            step = int(float(r["step"]))
            if step <= max_step:
                by_step.setdefault(step, []).append(float(r["reward"]))
    return by_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--command", required=True, help="the exact training command, recorded beside the curve")
    p.add_argument("--reference", type=Path, default=REFERENCE)
    p.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--xmax", type=int, default=100_000, help="x-axis limit (agent steps)")
    args = p.parse_args()

    curve = read_curve(args.run_dir / "eval.csv")
    if not curve:
        raise SystemExit(f"{args.run_dir / 'eval.csv'} has no evaluation rows yet")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / f"{args.name}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "return"])
        w.writerows(curve)

    fig, ax = plt.subplots(figsize=(6, 4))
    ref_note = "no reference curve for this task"
    if args.reference.exists() and "cartpole-swingup" in args.name:
        ref = read_reference(args.reference, args.xmax)
        steps = sorted(ref)
        means = [sum(ref[s]) / len(ref[s]) for s in steps]
        # The published file has points every 100k steps only: markers (mean, and min-max of the seeds), no line,
        # so the plot does not suggest a linear rise in between.
        lo = [m - min(ref[s]) for s, m in zip(steps, means)]
        hi = [max(ref[s]) - m for s, m in zip(steps, means)]
        ax.errorbar(steps, means, yerr=[lo, hi], fmt="ks", capsize=4, ms=5,
                    label="TD-MPC2 (published: mean, min-max of 3 seeds)")
        last = curve[-1][0]
        near = min(steps, key=lambda s: abs(s - last))
        ref_note = (f"TD-MPC2 at step {near}: " + ", ".join(f"{v:.1f}" for v in ref[near]) + " (3 seeds)")
    ax.plot([s for s, _ in curve], [r for _, r in curve], "o-", label="ours (eval return)")
    ax.set_xlabel("agent steps")
    ax.set_ylabel("episode return")
    ax.set_xlim(-0.02 * args.xmax, 1.04 * args.xmax)  # room for the markers at 0 and at xmax
    ax.set_title(args.name)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out_dir / f"{args.name}.png", dpi=120)

    last_step, last_ret = curve[-1]
    (args.out_dir / f"{args.name}.md").write_text(
        f"# {args.name}\n\n"
        f"![curve]({args.name}.png)\n\n"
        f"- command: `{args.command}`\n"
        f"- plotted with: `python benchmarks/learning_curve.py --run-dir {args.run_dir} --name {args.name} "
        f"--command \"...\"`\n"
        f"- points: {len(curve)}; last: step {last_step}, return {last_ret:.1f}\n"
        f"- {ref_note}\n"
        f"- written {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
    )
    print(f"wrote {args.out_dir / args.name}.{{csv,png,md}}; last point: step {last_step}, return {last_ret:.1f}")


if __name__ == "__main__":
    main()
