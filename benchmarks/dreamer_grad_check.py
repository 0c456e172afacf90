"""How large are Dream-MPC's action gradients in a DreamerV3 model, and is its step sensible there?

DreamerV3 decodes reward and value as the expectation over 255 two-hot bins in *raw* space (``SymExpTwoHot``: bins
from ``-symexp(20) ≈ -4.9e8`` to ``+4.9e8``). ``dr/da`` passes through ``Σ_j p_j b_j``, so a head that puts even a
small probability on an outer bin has a huge action gradient (|dr/da| ~ 1e8 was measured on an untrained head with
random weights). Dream-MPC clips each candidate's gradient norm (20) before its step of size ``lr`` (0.1), so a
huge gradient becomes a step of length 2 in action space, i.e. a jump to the action bounds. This script measures,
along an episode played by the trained model with Dream-MPC (DETERMINISTIC mode), for every control step's five
policy-prior candidates (the planner's own rollout and noise):

- ``|dJ/da|``: the norm of each candidate's gradient of ``J = Σ_t γ^t r_t + γ^H Q̄`` (the gradient pass objective);
- the share of candidates whose gradient is clipped (norm > 20);
- the gradient step's effect: ``J(a') - J(a)`` with the same noise, and the share of candidates it improves;
- ``|dr/da|`` and ``|dQ̄/da|`` at the policy's mean action, and ``tail``: the share of ``|dr/da|`` that comes from
  bins beyond ``|b| > 100`` (DMC rewards per agent step lie in [0, 2]);
- the selection (Dream-MPC's step 4, with its penalty): how far apart the candidates' ``J`` lie (median over states
  of max - min), and how often the candidate it picks stays the same when the heads are decoded from the bins
  within ``|b| <= 100`` only (renormalized), i.e. whether the ranking follows what the heads say on the task's
  scale or the balance of their outer bins (chance agreement: 1 / 5); and how far apart the penalty ``λ·u`` alone
  lies, and how often the pick stays the same without it (``λ = 0``);

for each world model given: the run's snapshots (step 0: DreamerV3's zero-initialized reward and value output
layers), the final model, and the step-0 model with random output layers (the "untrained head" of the issue).

    python benchmarks/dreamer_grad_check.py --run /work/scratch/i17/smoke --task cartpole-swingup

Writes ``docs/results/dreamer_grad_check.json`` and the ``dreamer_grad_check`` section of docs/performance.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, machine_info, write_json, write_section  # noqa: E402
from grad_step_check import StepProbe, episode_latents, quantiles  # noqa: E402

from torchrl_dreammpc.checkpoints import load_world_model  # noqa: E402
from torchrl_dreammpc.trainers import load_world_model_from_trainer_checkpoint  # noqa: E402


def tail_share(wm, z: torch.Tensor, a: torch.Tensor, limit: float = 100.0) -> torch.Tensor:
    """Share of |dr/da| carried by the bins beyond |b| > limit (per row)."""
    a = a.detach().requires_grad_(True)
    z_next = wm.next(z, a)
    logits = wm.reward_head(z_next).double()
    probs = torch.softmax(logits, -1)
    bins = wm.two_hot.bins.double()
    outer = (bins.abs() > limit).to(probs.dtype)
    total = (probs * bins).sum(-1)
    inner_part = (probs * bins * (1 - outer)).sum(-1)
    (g_total,) = torch.autograd.grad(total.sum(), a, retain_graph=True)
    (g_inner,) = torch.autograd.grad(inner_part.sum(), a)
    return (g_total - g_inner).norm(dim=-1) / g_total.norm(dim=-1).clamp_min(1e-30)


class InnerBinsTwoHot(torch.nn.Module):
    """Decodes two-hot logits from the bins within ``|b| <= limit`` only (their probabilities renormalized)."""

    def __init__(self, two_hot, limit: float = 100.0) -> None:
        super().__init__()
        self.bins = two_hot.bins
        self.inner = (two_hot.bins.abs() <= limit).to(two_hot.bins.dtype)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, -1) * self.inner.to(logits.dtype)
        return ((probs * self.bins.to(logits.dtype)).sum(-1) / probs.sum(-1)).unsqueeze(-1)


def selection(planner, wm, latents, a, eps_H) -> dict:
    """Step 4's ranking of the candidates ``a`` with the heads' full decoding and with their inner bins only."""
    B, N = latents.shape[0], planner.num_candidates
    lam = planner.uncertainty_weight

    def scores():  # (J, λu) per state and candidate
        ret, unc = planner.imagine(latents, a, eps_H, uncertainty=True)
        return ret.view(B, N), (lam * unc).view(B, N)

    with torch.no_grad():
        no_penalty, penalty = scores()
        full = no_penalty - penalty
        two_hot, wm.two_hot = wm.two_hot, InnerBinsTwoHot(wm.two_hot)
        try:
            inner = torch.sub(*scores())
        finally:
            wm.two_hot = two_hot
    spread = lambda J: float((J.max(1).values - J.min(1).values).median())  # noqa: E731
    return {"J_spread_median": spread(full), "J_inner_spread_median": spread(inner),
            "same_pick_inner_bins": float((full.argmax(1) == inner.argmax(1)).float().mean()),
            "penalty_spread_median": spread(penalty),
            "same_pick_without_penalty": float((full.argmax(1) == no_penalty.argmax(1)).float().mean())}


def measure(wm, latents: torch.Tensor, seed: int) -> dict:
    """The generic measures of the step (:class:`grad_step_check.StepProbe`) and the DreamerV3-specific ones."""
    probe = StepProbe(wm, latents, seed)
    mean_action = wm.policy(latents, deterministic=True)[0].detach()
    a0 = mean_action.clone().requires_grad_(True)
    (dr,) = torch.autograd.grad(wm.reward(latents, a0).sum(), a0)
    a1 = mean_action.clone().requires_grad_(True)
    (dq,) = torch.autograd.grad(wm.value(latents, a1).sum(), a1)
    with torch.no_grad():
        reward = wm.reward(latents, mean_action).squeeze(-1)
    return {
        **probe.measures(),
        "abs_dr_da": quantiles(dr.norm(dim=-1).tolist()),
        "abs_dQ_da": quantiles(dq.norm(dim=-1).tolist()),
        "reward_tail_share_median": float(tail_share(wm, latents, mean_action).median()),
        "reward_median": float(reward.median()),
        **selection(probe.planner, wm, latents, probe.a, probe.eps_H),
    }


def random_output_layers(wm, seed: int):
    """The model with its zero-initialized reward and critic output layers given random weights (an untrained head
    as a default-initialized Linear would be)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for head in (wm.reward_head, *wm.critics):
            layer = head.model[-1]
            torch.nn.init.kaiming_uniform_(layer.weight, a=5 ** 0.5)
    return wm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a DreamerV3 trainer run dir (snapshots/ and checkpoints/)")
    parser.add_argument("--task", default="cartpole-swingup")
    parser.add_argument("--steps", type=int, default=200, help="control steps of the episode the latents come from")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    final, fingerprint = load_world_model_from_trainer_checkpoint(run)
    torch.manual_seed(args.seed)  # the acting path samples its posterior from the global RNG
    latents = episode_latents(final, args.task, args.steps, args.seed)
    models = {}
    for snapshot in sorted((run / "snapshots").glob("step_*.pt")):
        models[f"step {int(snapshot.stem.split('_')[1])}"] = load_world_model(snapshot)
    final_step = int(fingerprint["checkpoint"].rsplit("-", 1)[-1])
    if f"step {final_step}" not in models:  # the run's last snapshot is the final model already
        models[f"final ({final_step})"] = final
    if "step 0" in models:
        models["step 0, random output layers"] = random_output_layers(load_world_model(run / "snapshots" /
                                                                                       "step_00000000.pt"), args.seed)
    results = {name: measure(wm, latents, args.seed) for name, wm in models.items()}
    payload = {"machine": machine_info(), "run": str(run), "task": args.task, "steps": args.steps, "results": results}
    write_json(ROOT / "docs" / "results" / "dreamer_grad_check.json", payload)

    rows = ["| model | ‖dJ/da‖ median / p90 / max | clipped (>20) | step ‖Δa‖ median | J(a') − J(a) min / median / "
            "max | improved / worse | ‖dr/da‖ median / max | ‖dQ̄/da‖ median | tail share of dr/da | r̂ median | "
            "J spread: full / inner bins | same pick, inner bins | λ·u spread | same pick, λ = 0 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        g, dr = r["grad_norm"], r["abs_dr_da"]
        gain = r["J_gain"]
        rows.append(f"| {name} | {g['median']:.3g} / {g['p90']:.3g} / {g['max']:.3g} | {r['clipped_share']:.0%} | "
                    f"{r['step_norm_median']:.2g} | {r['J_gain_min']:.3g} / {gain['median']:.3g} / {gain['max']:.3g} | "
                    f"{r['improved_share']:.0%} / {r['worsened_share']:.0%} | {dr['median']:.3g} / {dr['max']:.3g} | "
                    f"{r['abs_dQ_da']['median']:.3g} | {r['reward_tail_share_median']:.2g} | "
                    f"{r['reward_median']:.3g} | {r['J_spread_median']:.3g} / {r['J_inner_spread_median']:.3g} | "
                    f"{r['same_pick_inner_bins']:.0%} | {r['penalty_spread_median']:.3g} | "
                    f"{r['same_pick_without_penalty']:.0%} |")
    info = payload["machine"]
    markdown = "\n".join([
        "## Dream-MPC's action gradients in a DreamerV3 model",
        "",
        f"Command: `{info['command']}`. {args.steps} control steps of one deterministic Dream-MPC episode of the "
        f"final model ({args.task}), 5 candidates each (the planner's prior rollouts and noise); "
        "`J(a')`: after one clipped gradient step (lr 0.1, clip 20) with the same noise; `tail share`: part of "
        "‖dr/da‖ from bins with |b| > 100; `J spread`: median over states of the candidates' max - min `J` (with "
        "the penalty, as ranked), from the heads' full decoding and from their bins within |b| <= 100 only; "
        "`same pick`: share of states where both pick the same candidate (chance: 20 %); `λ·u spread`: the same "
        "spread of the uncertainty penalty alone; `same pick, λ = 0`: the pick without the penalty.",
        "",
        *rows,
    ])
    write_section("dreamer_grad_check", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
