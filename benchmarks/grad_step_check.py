"""What Dream-MPC's gradient step does in a trained world model: its size, what the action bounds cut off, whether
it changes the action executed.

The campaign's planner swaps (docs/results/benchmark.md) compare Dream-MPC with and without its gradient step
(``iterations=0``) by their returns. This script looks at the mechanism, in any run's world models (TD-MPC2, BMPC,
DreamerV3). It plays one deterministic Dream-MPC episode with the run's final model and keeps the latents it
planned from. Then, for every snapshot of the run (and the final model), it takes each state's candidates as the
planner builds them: the five policy-prior rollouts, with the planner's noise and without a warm start. It applies
one gradient step as the planner does (lr 0.1, the clip of each candidate's gradient norm at 20, the clamp to the
action bounds) and measures:

- ``‖dJ/da‖``: the gradient norm of each candidate (median / p90 / max), and the share of candidates that are
  clipped;
- **the bounds**: the share of candidate action entries already at a bound (within 1e-3), and the share of those
  whose gradient pushes further out, which the clamp cancels. A saturated prior (its squashed mean at ±1) puts
  its samples there;
- **the step**: ``‖Δa‖`` per candidate after the clamp (median), beside the step asked for (``lr · clipped
  gradient``, median);
- ``J(a') − J(a)``: the step's effect on its own objective (same noise): the median, and the share of candidates it
  improves;
- **the pick** (Dream-MPC's step 4: ``argmax J − λu``). How often the candidate picked after the step differs from
  the one picked among the same candidates without the step (what the ``iterations=0`` ablation plays). The median
  ``‖Δ‖`` of the executed first action between the two picks. The candidates' spread in ``J − λu`` (median over
  states of max − min) beside the median best gain of the step, so a step too small to reorder the candidates
  shows as such. And how often the pick without the penalty (``λ = 0``) is the same.

    python benchmarks/grad_step_check.py --run /work/runs/acrobot-swingup-dream_mpc-1M-s1 \\
        --run /work/runs/finger-turn-hard-dream_mpc-1M-s1

A run's task is read from its trainer checkpoint. Writes ``docs/results/grad_step_check.json`` and the
``grad_step_check`` section of docs/performance.md (every run given, one table each).
``benchmarks/dreamer_grad_check.py`` adds the DreamerV3-specific measures (two-hot tails) to the same core.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, machine_info, write_json, write_section  # noqa: E402

from torchrl_dreammpc.checkpoints import load_world_model  # noqa: E402
from torchrl_dreammpc.envs import make_env, with_transforms  # noqa: E402
from torchrl_dreammpc.planners import GradientMPCPlanner  # noqa: E402
from torchrl_dreammpc.trainers import load_world_model_from_trainer_checkpoint  # noqa: E402

#: an action entry this close to a bound counts as at the bound
BOUND_TOL = 1e-3


def episode_latents(wm, task: str, steps: int, seed: int) -> torch.Tensor:
    """The latents Dream-MPC plans from along one deterministic episode of the trained model."""
    env = with_transforms(functools.partial(make_env, task, seed=seed), wm.acting_transforms())()
    with set_exploration_type(ExplorationType.DETERMINISTIC), torch.no_grad():
        td = env.rollout(steps, wm.acting_module(GradientMPCPlanner(wm)))
    env.close()
    if "latent" in td.keys():  # a recurrent model: its acting-time state estimator wrote the latent
        return td["latent"].reshape(-1, wm.latent_dim)
    with torch.no_grad():
        return wm.encode(td["observation"]).reshape(-1, wm.latent_dim)


def quantiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {"median": statistics.median(values), "p90": values[int(0.9 * (len(values) - 1))], "max": values[-1]}


class StepProbe:
    """One state batch's Dream-MPC candidates and one gradient step on them, as :class:`GradientMPCPlanner` takes it.

    Attributes: ``a`` (the candidates ``[H, B*N, A]``), ``eps_H`` (the terminal prior noise), ``J`` (their
    objective ``[B*N, 1]``), ``grad``, ``norm`` (each candidate's gradient norm ``[B*N]``), ``asked`` (the step
    before the clamp), ``a_new`` (after it).
    """

    def __init__(self, wm, latents: torch.Tensor, seed: int, **planner_kwargs) -> None:
        planner = GradientMPCPlanner(wm, generator=torch.Generator().manual_seed(seed), **planner_kwargs)
        self.planner, self.latents = planner, latents
        N, H, A = planner.num_candidates, planner.horizon, planner.action_dim
        B = latents.shape[0]
        planner._step_ops = wm.planning_ops()
        noise = planner.draw_noise(B, latents.device, latents.dtype)
        eps_roll = noise[:, :H * N * A].view(B, H, N, A).transpose(0, 1).reshape(H, B * N, A)
        self.eps_H = noise[:, H * N * A:H * N * A + N * A].reshape(B * N, A)
        with torch.no_grad():
            self.a = planner.clamp_action(planner.rollout_prior(latents, eps_roll))  # [H, B*N, A]
        a_var = self.a.clone().requires_grad_(True)
        J, _ = planner.imagine(latents, a_var, self.eps_H)
        (self.grad,) = torch.autograd.grad(J.sum(), a_var)
        self.J = J.detach()
        self.norm = torch.linalg.vector_norm(self.grad, dim=(0, 2))  # [B*N]
        scale = torch.clamp_max(planner.max_grad_norm / (self.norm + 1e-6), 1.0)
        self.asked = planner.lr * self.grad * scale.view(1, -1, 1)
        self.a_new = planner.clamp_action(self.a + self.asked)

    def imagined(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(J, λu)`` of ``actions`` per state and candidate, ``[B, N]`` each: step 4 ranks by ``J − λu``."""
        planner = self.planner
        with torch.no_grad():
            ret, unc = planner.imagine(self.latents, actions, self.eps_H, uncertainty=True)
        shape = (self.latents.shape[0], planner.num_candidates)
        return ret.view(shape), (planner.uncertainty_weight * unc).view(shape)

    def picks(self) -> dict[str, torch.Tensor]:
        """Step 4 with and without the step: the rankings ``[B, N]`` (before the step also ``J`` alone, λ = 0), the
        picks ``[B]`` and the executed first actions ``[B, A]`` (without the step: what the ``iterations=0``
        ablation executes)."""
        return_before, penalty_before = self.imagined(self.a)
        return_after, penalty_after = self.imagined(self.a_new)
        before, after = return_before - penalty_before, return_after - penalty_after
        B, N = before.shape
        pick_before, pick_after = before.argmax(1), after.argmax(1)
        first = lambda actions, pick: actions[0].view(B, N, -1)[torch.arange(B), pick]  # noqa: E731
        return {"ranked_before": before, "return_before": return_before, "pick_before": pick_before,
                "pick_after": pick_after, "executed_before": first(self.a, pick_before),
                "executed_after": first(self.a_new, pick_after)}

    def measures(self) -> dict:
        planner, a, grad = self.planner, self.a, self.grad
        with torch.no_grad():
            J_new, _ = planner.imagine(self.latents, self.a_new, self.eps_H)
        gain = (J_new - self.J).squeeze(-1)
        at_high, at_low = a >= planner.action_high - BOUND_TOL, a <= planner.action_low + BOUND_TOL
        at_bound = at_high | at_low
        pushed_out = (at_high & (grad > 0)) | (at_low & (grad < 0))
        picks = self.picks()
        before, pick_before, pick_after = picks["ranked_before"], picks["pick_before"], picks["pick_after"]
        B, N = before.shape
        executed_change = torch.linalg.vector_norm(picks["executed_after"] - picks["executed_before"], dim=-1)
        finite = torch.isfinite(self.norm)
        return {
            "control_steps": B,
            "candidates": B * N,
            "grad_norm": quantiles(self.norm[finite].tolist()),
            "non_finite_grads": int((~finite).sum()),
            "clipped_share": float((self.norm > planner.max_grad_norm).float().mean()),
            "at_bound_share": float(at_bound.float().mean()),
            "pushed_out_share_of_at_bound": float(pushed_out.sum() / at_bound.sum().clamp_min(1)),
            "step_norm_median": float(torch.linalg.vector_norm(self.a_new - a, dim=(0, 2)).median()),
            "asked_step_norm_median": float(torch.linalg.vector_norm(self.asked, dim=(0, 2)).median()),
            "J_gain": quantiles(gain.tolist()),
            "J_gain_min": float(gain.min()),
            "improved_share": float((gain > 0).float().mean()),
            "worsened_share": float((gain < 0).float().mean()),
            "J_median": float(self.J.median()),
            "pick_changed_share": float((pick_before != pick_after).float().mean()),
            "executed_change_median": float(executed_change.median()),
            "ranked_spread_median": float((before.max(1).values - before.min(1).values).median()),
            "best_gain_median": float(gain.view(B, N).max(1).values.median()),
            "same_pick_without_penalty": float((pick_before == picks["return_before"].argmax(1)).float().mean()),
        }


def run_models(run: Path) -> tuple[dict, str, object]:
    """``({name: model}, task, final model)``: every snapshot of the run, and the final model if no snapshot is."""
    final, fingerprint = load_world_model_from_trainer_checkpoint(run)
    models = {}
    for snapshot in sorted((run / "snapshots").glob("step_*.pt")):
        models[f"step {int(snapshot.stem.split('_')[1])}"] = load_world_model(snapshot).eval()
    final_step = int(fingerprint["checkpoint"].rsplit("-", 1)[-1])
    if f"step {final_step}" not in models:
        models[f"final ({final_step})"] = final
    return models, fingerprint["task"], final.eval()


def table(results: dict) -> list[str]:
    rows = ["| model | ‖dJ/da‖ median / p90 / max | clipped (>20) | entries at a bound / pushed out | ‖Δa‖ median "
            "(asked) | J(a') − J(a) median / max | improved | pick changed | executed ‖Δa₀‖ median | J − λu spread "
            "/ best gain (medians) | same pick, λ = 0 |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        g, gain = r["grad_norm"], r["J_gain"]
        rows.append(f"| {name} | {g['median']:.3g} / {g['p90']:.3g} / {g['max']:.3g} | {r['clipped_share']:.0%} | "
                    f"{r['at_bound_share']:.0%} / {r['pushed_out_share_of_at_bound']:.0%} | "
                    f"{r['step_norm_median']:.2g} ({r['asked_step_norm_median']:.2g}) | "
                    f"{gain['median']:.3g} / {gain['max']:.3g} | {r['improved_share']:.0%} | "
                    f"{r['pick_changed_share']:.0%} | {r['executed_change_median']:.2g} | "
                    f"{r['ranked_spread_median']:.3g} / {r['best_gain_median']:.3g} | "
                    f"{r['same_pick_without_penalty']:.0%} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", required=True, help="a trainer run dir (repeatable)")
    parser.add_argument("--steps", type=int, default=200, help="control steps of the episode the latents come from")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    payload = {"machine": machine_info(), "steps": args.steps, "seed": args.seed, "runs": {}}
    sections = []
    for run in map(Path, args.run):
        models, task, final = run_models(run)
        torch.manual_seed(args.seed)  # a recurrent model's acting path samples its posterior from the global RNG
        latents = episode_latents(final, task, args.steps, args.seed)
        results = {name: StepProbe(wm, latents, args.seed).measures() for name, wm in models.items()}
        payload["runs"][run.name] = {"run": str(run), "task": task, "results": results}
        section = [f"**{run.name}** ({task}, {latents.shape[0]} states)", "", *table(results), ""]
        print("\n".join(section), flush=True)
        sections += section
    if args.no_write:
        return
    write_json(ROOT / "docs" / "results" / "grad_step_check.json", payload)
    info = payload["machine"]
    write_section("grad_step_check", "\n".join([
        "## What Dream-MPC's gradient step does in the campaign's models",
        "",
        f"Command: `{info['command']}`. The states of one deterministic {args.steps}-step Dream-MPC episode of each "
        "run's final model. For every snapshot, the planner's 5 prior candidates per state (its noise, no warm "
        "start) and one gradient step as it takes it (lr 0.1, clip 20, clamp to the bounds). *At a bound*: share "
        "of candidate action entries within 1e-3 of ±1; *pushed out*: of those, the share whose gradient points "
        "beyond the bound (the clamp cancels them). *‖Δa‖*: the step after the clamp, *asked*: before it. *Pick "
        "changed*: share of states where step 4 (`argmax J − λu`) picks another candidate than it picks among the "
        "same candidates without the step (the `iterations=0` ablation); *executed ‖Δa₀‖*: how far the executed "
        "action moves. *Spread*: max − min of `J − λu` over a state's candidates; *best gain*: the largest "
        "`J(a') − J(a)` among them.",
        "",
        *sections,
    ]))


if __name__ == "__main__":
    main()
