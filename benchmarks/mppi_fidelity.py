"""Is our ``MPPIPlanner`` TD-MPC2's MPPI? Both planners on the same weights, in closed loop, on the same initial states.

The world model is loaded (a trainer run/checkpoint dir, a ``world_model.pt`` / snapshot, or a TD-MPC2 file),
exported with :func:`~torchrl_dreammpc.checkpoints.to_tdmpc2_state_dict` and loaded into TD-MPC2's own agent
(its public code, run on the CPU by ``../shared/peers/tdmpc2_peer.py``; its config: 512 samples, 64 elites,
6 iterations (+2 for >= 20 action dims), 24 policy trajectories, H 3, temperature 0.5, std in [0.05, 2]). Then:

1. **Closed loop.** Episode ``i`` of every planner starts from the same initial state (the env is reseeded with
   ``seed + i`` before it; the first observations are checked equal). The planners: ``ref_mppi`` (the reference's
   ``act(obs, t0=(t == 0), eval_mode=True)`` each step, as its own evaluation does), ``mppi`` (our
   ``MPPIPlanner`` from ``recipes/config/planner/mppi.yaml``, TorchRL's DETERMINISTIC mode) and, for context,
   ``policy`` and ``dream_mpc`` on the same states. Within an episode index the planners run one after the other,
   in an order that alternates between episodes (load drifts on a shared machine hit both MPPIs alike).
2. **One step's action distribution.** ``--calls`` calls of each MPPI from the first observation of episode 0 at an
   episode's first step (no warm start: a fixed latent), evaluation mode; mean and std of the planned action per
   dimension, with the two-sample Kolmogorov-Smirnov test where scipy is installed.

Agreement: the difference of the mean returns against its standard error (Welch; the paired difference over the
shared initial states too); the action means against their standard errors and the KS p-values.

Every finished episode is saved at once to ``<out>/<label>.json`` (and ``.csv``); rerunning the same command
continues from there. ``--doc`` writes the section ``<label>`` of ``docs/results/mppi_fidelity.md``.

Run (each takes an hour or more on one CPU core: MPPI is ~0.2 s per step, 500 steps per DMC episode)::

    python benchmarks/mppi_fidelity.py --checkpoint runs/cartpole-20k --episodes 20 --label cartpole-swingup --doc
    python benchmarks/mppi_fidelity.py --checkpoint runs/reacher/snapshots/step_00010000.pt --task reacher-easy \\
        --episodes 20 --label reacher-easy-10k --doc
    python benchmarks/mppi_fidelity.py --checkpoint ... --episodes 2 --calls 20 --planners mppi,ref_mppi  # a quick look
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torchrl.envs.utils import ExplorationType, set_exploration_type, step_mdp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, machine_info, write_section  # noqa: E402

from torchrl_dreammpc.checkpoints import load_any, tdmpc2_config_overrides, to_tdmpc2_state_dict  # noqa: E402
from torchrl_dreammpc.envs import make_env, task_info  # noqa: E402
from torchrl_dreammpc.trainers import find_trainer_checkpoint, load_world_model_from_trainer_checkpoint  # noqa: E402
from torchrl_dreammpc.trainers.builders import make_planner  # noqa: E402

PEER = ROOT.parent / "shared" / "peers" / "tdmpc2_peer.py"
RESULTS_MD = ROOT / "docs" / "results" / "mppi_fidelity.md"
PLANNERS = ("ref_mppi", "mppi", "policy", "dream_mpc")


# ---------------------------------------------------------------------------------------------- the two agents
def load_model(checkpoint: str, task: str | None):
    """``(world_model, task, description)`` from a trainer run/checkpoint dir or a model file."""
    path = Path(checkpoint)
    if path.is_dir() and find_trainer_checkpoint(path) is not None:
        model, fingerprint = load_world_model_from_trainer_checkpoint(path)
        if task is not None and task_info(task).task != fingerprint["task"]:
            raise SystemExit(f"--task {task} but the checkpoint was trained on {fingerprint['task']}.")
        return model, fingerprint["task"], f"trainer checkpoint {fingerprint['checkpoint']}"
    if task is None:
        raise SystemExit(f"--task is required for the model file {path}.")
    info = task_info(task)
    try:  # our format (config stored); a TD-MPC2 file needs the episode length for its discount
        model = load_any(str(path))
    except ValueError:
        model = load_any(str(path), episode_length=info.episode_length)
    return model.eval(), info.task, f"model file {path}"


def load_reference(world_model, episode_length: int):
    """TD-MPC2's agent with our model's weights (exported to its format), or None without the peer code."""
    if not PEER.is_file():
        return None
    sys.path.insert(0, str(PEER.parent))
    import tdmpc2_peer  # noqa: E402

    overrides = tdmpc2_config_overrides(world_model)
    size, obs_dim, action_dim = overrides.pop("model_size"), overrides.pop("obs_shape"), overrides.pop("action_dim")
    agent = tdmpc2_peer.make_agent(size, obs_dim["state"][0], action_dim, episode_length=episode_length, **overrides)
    agent.load(to_tdmpc2_state_dict(world_model))
    agent.model.eval()
    if not math.isclose(float(agent.discount), float(world_model.discount), rel_tol=1e-9):
        raise SystemExit(f"The reference derives discount {agent.discount} from episode length {episode_length}; "
                         f"the model plans with {world_model.discount}: they would not plan the same objective.")
    return agent


def planner_config(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(ROOT / "recipes" / "config" / "planner" / f"{name}.yaml"))


def make_actors(names, world_model, action_spec, agent) -> dict:
    """``{name: act(td, t) -> action}`` for every planner of the comparison."""
    actors = {}
    for name in names:
        if name == "ref_mppi":
            if agent is None:
                raise SystemExit(f"ref_mppi needs TD-MPC2's code: {PEER} is missing.")
            actors[name] = lambda td, t: agent.act(td["observation"], t0=(t == 0), eval_mode=True)
        else:
            planner = make_planner(planner_config(name), world_model, action_spec=action_spec)

            def act(td, t, planner=planner):
                with set_exploration_type(ExplorationType.DETERMINISTIC):
                    return planner(td.clone())["action"]
            actors[name] = act
    return actors


def reference_iterations(agent) -> int | None:
    return None if agent is None else int(agent.cfg.iterations)


# ---------------------------------------------------------------------------------------------- closed loop
@torch.no_grad()
def play(env, act, seed: int, torch_seed: int, max_steps: int | None = None) -> dict:
    """One episode from the initial state of ``seed``; returns its return, length, time per step and first obs."""
    env.set_seed(seed)
    torch.manual_seed(torch_seed)
    td = env.reset()
    first = td["observation"].clone()
    ret, steps, acting = 0.0, 0, 0.0
    while True:
        start = time.perf_counter()
        action = act(td, steps)
        acting += time.perf_counter() - start
        td = env.step(td.set("action", action.reshape(env.action_spec.shape)))
        ret += float(td["next", "reward"].sum())
        steps += 1
        if bool(td["next", "done"].any()) or steps == max_steps:
            break
        td = step_mdp(td)
    return {"return": ret, "steps": steps, "ms_per_step": 1000.0 * acting / steps, "first_obs": first}


def closed_loop(env, actors: dict, episodes: int, seed: int, done: dict, save, max_steps=None) -> dict:
    names = list(actors)
    for i in range(episodes):
        order = names if i % 2 == 0 else names[::-1]
        firsts = {}
        for name in order:
            if len(done[name]) > i:
                continue
            result = play(env, actors[name], seed + i, 1000 * seed + i, max_steps)
            firsts[name] = result.pop("first_obs")
            done[name].append({"episode": i, "seed": seed + i, **result})
            print(f"[fidelity] episode {i + 1}/{episodes} {name}: return {result['return']:.1f} "
                  f"({result['ms_per_step']:.0f} ms/step)", flush=True)
            save()
        ref = next(iter(firsts.values()), None)
        if any(not torch.equal(f, ref) for f in firsts.values()):
            raise RuntimeError(f"Episode {i}: the planners did not start from the same initial state.")
    return done


# ---------------------------------------------------------------------------------------------- one step's actions
@torch.no_grad()
def action_samples(env, actors: dict, names, calls: int, seed: int) -> dict:
    """``calls`` actions of each planner from the first observation of episode 0, each at an episode's start."""
    env.set_seed(seed)
    td = env.reset()  # is_init = True: no warm start, every call plans from this latent afresh
    torch.manual_seed(seed)
    out = {}
    for name in names:
        start = time.perf_counter()
        out[name] = torch.stack([actors[name](td, 0).reshape(-1).float() for _ in range(calls)])
        print(f"[fidelity] {calls} first-step actions of {name}: {time.perf_counter() - start:.0f} s", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- statistics
def returns_summary(rows: list[dict]) -> dict:
    values = [r["return"] for r in rows]
    n = len(values)
    std = statistics.stdev(values) if n > 1 else float("nan")
    return {"n": n, "mean": statistics.fmean(values), "std": std, "se": std / math.sqrt(n),
            "ms_per_step": statistics.fmean(r["ms_per_step"] for r in rows)}


def compare_returns(a: list[dict], b: list[dict]) -> dict:
    """``a - b``: Welch's difference of means, and the paired difference over the episodes both played."""
    sa, sb = returns_summary(a), returns_summary(b)
    diff = sa["mean"] - sb["mean"]
    se = math.sqrt(sa["se"] ** 2 + sb["se"] ** 2)
    by_ep = {r["episode"]: r["return"] for r in b}
    paired = [r["return"] - by_ep[r["episode"]] for r in a if r["episode"] in by_ep]
    p_se = statistics.stdev(paired) / math.sqrt(len(paired)) if len(paired) > 1 else float("nan")
    out = {"diff": diff, "se": se, "z": diff / se if se > 0 else float("nan"),
           "paired_diff": statistics.fmean(paired), "paired_se": p_se,
           "paired_z": statistics.fmean(paired) / p_se if p_se > 0 else float("nan")}
    try:
        from scipy import stats

        out["welch_p"] = float(stats.ttest_ind([r["return"] for r in a], [r["return"] for r in b],
                                               equal_var=False).pvalue)
        out["mannwhitney_p"] = float(stats.mannwhitneyu([r["return"] for r in a],
                                                        [r["return"] for r in b]).pvalue)
        # The paired differences are far from normal (many exact ties where both reach the same outcome, a few
        # large ones): the sign test and Wilcoxon's signed-rank test do not lean on the normal approximation.
        nonzero = [d for d in paired if d != 0]
        if nonzero:
            wins = sum(d > 0 for d in nonzero)
            out["paired_wins"], out["paired_losses"] = wins, len(nonzero) - wins
            out["sign_p"] = float(stats.binomtest(wins, len(nonzero)).pvalue)
            out["wilcoxon_p"] = float(stats.wilcoxon(nonzero).pvalue)
    except ImportError:
        pass
    return out


def compare_actions(ours: torch.Tensor, ref: torch.Tensor) -> list[dict]:
    rows = []
    n, m = ours.shape[0], ref.shape[0]
    for d in range(ours.shape[1]):
        x, y = ours[:, d].double(), ref[:, d].double()
        se = math.sqrt(float(x.var()) / n + float(y.var()) / m)
        row = {"dim": d, "mean_mppi": float(x.mean()), "mean_ref": float(y.mean()), "std_mppi": float(x.std()),
               "std_ref": float(y.std()), "z_mean": float(x.mean() - y.mean()) / se if se > 0 else float("nan")}
        try:
            from scipy import stats

            row["ks_p"] = float(stats.ks_2samp(x.numpy(), y.numpy()).pvalue)
        except ImportError:
            pass
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- report
def markdown(payload: dict) -> str:
    lines = [f"### {payload['label']}: {payload['task']}", "",
             f"Model: {payload['source']}. {payload['episodes']} episodes per planner from the same initial states "
             f"(env seeds {payload['seed']}..{payload['seed'] + payload['episodes'] - 1}); "
             f"MPPI iterations: ours {payload['mppi_iterations']}, reference {payload['reference_iterations']}. "
             f"{payload['machine']['cpu']}, {payload['machine']['threads']} thread(s), torch "
             f"{payload['machine']['torch']}.", "",
             "| planner | return (mean ± std) | s.e. | ms/step |", "|---|---|---|---|"]
    for name, s in payload["summary"].items():
        lines.append(f"| {name} | {s['mean']:.1f} ± {s['std']:.1f} | {s['se']:.1f} | {s['ms_per_step']:.0f} |")
    c = payload.get("mppi_vs_ref")
    if c:
        p = "".join(f", {k} {c[k]:.2f}" for k in ("welch_p", "mannwhitney_p") if k in c)
        paired = (f"; ours higher in {c['paired_wins']}, lower in {c['paired_losses']} of {payload['episodes']} "
                  f"(sign test p {c['sign_p']:.2f}, Wilcoxon p {c['wilcoxon_p']:.2f})" if "sign_p" in c else "")
        lines += ["", f"**Ours − reference (MPPI):** {c['diff']:+.1f} ± {c['se']:.1f} (z = {c['z']:+.2f}{p}); paired "
                  f"over the same initial states {c['paired_diff']:+.1f} ± {c['paired_se']:.1f} "
                  f"(z = {c['paired_z']:+.2f}{paired})."]
    if payload.get("actions"):
        lines += ["", f"One step's planned action ({payload['calls']} calls each, first observation of episode 0, "
                  "no warm start, evaluation mode):", "",
                  "| dim | mean (ours) | mean (ref) | z of the difference | std (ours) | std (ref) | KS p |",
                  "|---|---|---|---|---|---|---|"]
        for r in payload["actions"]:
            ks = f"{r['ks_p']:.2f}" if "ks_p" in r else "n/a"
            lines.append(f"| {r['dim']} | {r['mean_mppi']:+.4f} | {r['mean_ref']:+.4f} | {r['z_mean']:+.2f} | "
                         f"{r['std_mppi']:.4f} | {r['std_ref']:.4f} | {ks} |")
    lines += ["", f"Command: `{payload['machine']['command']}`"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="trainer run/checkpoint dir, world_model.pt or TD-MPC2 file")
    parser.add_argument("--task", default=None, help="the task (read from a trainer checkpoint otherwise)")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1, help="episode i starts from the state of env seed seed + i")
    parser.add_argument("--planners", default=",".join(PLANNERS), help=f"comma-separated, from {PLANNERS}")
    parser.add_argument("--calls", type=int, default=1000, help="first-step actions per MPPI (0: skip)")
    parser.add_argument("--label", default=None, help="name of the output files and doc section (default: task)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "mppi_fidelity"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None, help="cut episodes short (smoke tests only)")
    parser.add_argument("--doc", action="store_true", help=f"write the section <label> of {RESULTS_MD.name}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.planners.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PLANNERS))
    if unknown or not names:
        raise SystemExit(f"mppi_fidelity.py: unknown planner(s) {unknown}; choose from {PLANNERS}.")

    world_model, task, source = load_model(args.checkpoint, args.task)
    info = task_info(task)
    agent = load_reference(world_model, info.episode_length) if "ref_mppi" in names else None
    env = make_env(task, seed=args.seed)
    actors = make_actors(names, world_model, env.action_spec, agent)
    label = args.label or task
    out = Path(args.out)
    json_path, csv_path = out / f"{label}.json", out / f"{label}.csv"
    mppi_iterations = make_planner(planner_config("mppi"), world_model, action_spec=env.action_spec).iterations
    payload = {"label": label, "task": task, "source": source, "checkpoint": str(args.checkpoint),
               "episodes": args.episodes, "seed": args.seed, "planners": names, "calls": args.calls,
               "max_steps": args.max_steps,
               "mppi_iterations": mppi_iterations, "reference_iterations": reference_iterations(agent),
               "machine": machine_info(), "per_episode": {n: [] for n in names}}
    if json_path.exists():  # continue an interrupted run of the same comparison
        old = json.loads(json_path.read_text())
        if (old["task"], old["checkpoint"], old["seed"]) != (task, str(args.checkpoint), args.seed):
            raise SystemExit(f"{json_path} holds another comparison ({old['task']}, {old['checkpoint']}, seed "
                             f"{old['seed']}); choose another --label.")
        for n in names:
            payload["per_episode"][n] = old["per_episode"].get(n, [])[:args.episodes]
        if old.get("actions") and old.get("calls") == args.calls:
            payload["actions"], payload["action_samples"] = old["actions"], old.get("action_samples")
        print(f"[fidelity] continuing {json_path}: "
              + ", ".join(f"{n} {len(v)}" for n, v in payload["per_episode"].items()), flush=True)

    def save() -> None:
        per = payload["per_episode"]
        payload["summary"] = {n: returns_summary(per[n]) for n in names if len(per[n]) > 1}
        if len(per.get("mppi", [])) > 1 and len(per.get("ref_mppi", [])) > 1:
            payload["mppi_vs_ref"] = compare_returns(per["mppi"], per["ref_mppi"])
        out.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(payload, indent=2))
        with csv_path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["planner", "episode", "seed", "return", "steps", "ms_per_step"])
            for n in names:
                for r in per[n]:
                    writer.writerow([n, r["episode"], r["seed"], f"{r['return']:.6g}", r["steps"],
                                     f"{r['ms_per_step']:.4g}"])

    print(f"[fidelity] {task}: {source}; planners {names}; {args.episodes} episodes; MPPI iterations ours "
          f"{mppi_iterations}, reference {reference_iterations(agent)}", flush=True)
    closed_loop(env, actors, args.episodes, args.seed, payload["per_episode"], save, args.max_steps)
    if args.calls > 0 and {"mppi", "ref_mppi"} <= set(names) and not payload.get("actions"):
        samples = action_samples(env, actors, ["mppi", "ref_mppi"], args.calls, args.seed)
        payload["actions"] = compare_actions(samples["mppi"], samples["ref_mppi"])
        payload["action_samples"] = {n: s.tolist() for n, s in samples.items()}
    save()
    env.close()
    text = markdown(payload)
    print(text)
    if args.doc:
        if not RESULTS_MD.exists():
            RESULTS_MD.parent.mkdir(parents=True, exist_ok=True)
            RESULTS_MD.write_text("# MPPI fidelity: our MPPIPlanner against TD-MPC2's MPPI in closed loop\n\n"
                                  "Written by `benchmarks/mppi_fidelity.py` (see its docstring for the method).\n")
        write_section(f"mppi_fidelity:{label}", text, path=RESULTS_MD)


if __name__ == "__main__":
    main()
