"""Every benchmark script still imports against the library and builds its command line (``--help``).

The benchmarks are run by hand for hours (their numbers are in docs/), so an API change in the library would
otherwise surface only at the next such run. Running them is not a test (see the developers' guide); importing
them and parsing ``--help`` is cheap and catches a renamed import, a moved builder or a broken parser.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
HELPERS = {"_report.py", "campaign_report.py"}  # modules the scripts import, no command line of their own
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name not in HELPERS)


def test_the_benchmark_list_is_complete():
    assert len(SCRIPTS) >= 16 and "campaign.py" in SCRIPTS and "mppi_warm_step.py" in SCRIPTS


@pytest.mark.parametrize("name", sorted(HELPERS))
def test_helper_module_imports(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    _import(name, monkeypatch)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports_and_prints_its_help(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = _import(name, monkeypatch)
    assert callable(getattr(module, "main", None)), f"{name} has no main(): it would run on import"
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 0
    assert out.getvalue().startswith("usage:"), out.getvalue()[:200]


def _import(name: str, monkeypatch):
    spec = importlib.util.spec_from_file_location(f"benchmark_{Path(name).stem}", BENCHMARKS / name)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def test_mppi_fidelity_compares_returns_paired_and_unpaired(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    fidelity = _import("mppi_fidelity.py", monkeypatch)
    ours = [{"episode": i, "return": r, "ms_per_step": 1.0} for i, r in enumerate([10.0, 12.0, 9.0, 30.0, 5.0])]
    ref = [{"episode": i, "return": r, "ms_per_step": 1.0} for i, r in enumerate([10.0, 11.0, 9.0, 20.0, 6.0])]
    c = fidelity.compare_returns(ours, ref)
    assert c["diff"] == pytest.approx(2.0) and c["paired_diff"] == pytest.approx(2.0)
    # differences 0, +1, 0, +10, -1: two ties left out, 2 wins and 1 loss
    assert (c["paired_wins"], c["paired_losses"]) == (2, 1)
    assert c["sign_p"] == pytest.approx(1.0)  # 2 of 3 is what a fair coin gives
    # scipy on these inputs: Wilcoxon on the 3 nonzero differences (1, 10, -1), Welch's unpaired t-test
    assert c["wilcoxon_p"] == pytest.approx(0.75) and c["welch_p"] == pytest.approx(0.69972, abs=1e-5)


def test_dreamer_grad_check_selection_compares_full_and_inner_bin_decoding(monkeypatch, one_thread):
    """The inner-bins decoder equals the full one when every bin is inner and differs when the outer bins hold
    mass; the selection measure restores the model's decoder and, with every bin inner, agrees with itself."""
    from torchrl_dreammpc.modules import DreamerV3WorldModel
    from torchrl_dreammpc.planners import GradientMPCPlanner

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    check = _import("dreamer_grad_check.py", monkeypatch)
    torch.manual_seed(0)
    wm = DreamerV3WorldModel(5, 1, model_size="cpu", deter=32, hidden=16, stoch=4, classes=4, units=16,
                             blocks=4).eval()
    with torch.no_grad():
        for param in wm.parameters():
            param.add_(0.5 * torch.randn_like(param))
    logits = torch.randn(7, wm.two_hot.bins.numel())
    torch.testing.assert_close(check.InnerBinsTwoHot(wm.two_hot, limit=float("inf"))(logits), wm.two_hot(logits))
    assert not torch.allclose(check.InnerBinsTwoHot(wm.two_hot)(logits), wm.two_hot(logits))

    planner = GradientMPCPlanner(wm, generator=torch.Generator().manual_seed(0))
    planner._step_ops = wm.planning_ops()
    B, N, H, A = 16, planner.num_candidates, planner.horizon, planner.action_dim
    latents = torch.randn(B, wm.latent_dim)
    a = torch.rand(H, B * N, A) * 2 - 1
    eps_H = torch.randn(B * N, A)
    result = check.selection(planner, wm, latents, a, eps_H)
    assert set(result) == {"J_spread_median", "J_inner_spread_median", "same_pick_inner_bins",
                           "penalty_spread_median", "same_pick_without_penalty"}
    assert 0.0 <= result["same_pick_without_penalty"] <= 1.0 and result["penalty_spread_median"] >= 0
    assert 0.0 <= result["same_pick_inner_bins"] <= 1.0 and result["J_spread_median"] > 0
    assert wm.two_hot.__class__.__name__ == "SymExpTwoHot"  # the model's own decoder is back
    inner_bins = check.InnerBinsTwoHot
    monkeypatch.setattr(check, "InnerBinsTwoHot", lambda two_hot: inner_bins(two_hot, limit=float("inf")))
    same = check.selection(planner, wm, latents, a, eps_H)
    assert same["same_pick_inner_bins"] == 1.0 and same["J_spread_median"] == same["J_inner_spread_median"]


@pytest.mark.parametrize("saturated", [False, True])
def test_grad_step_check_reproduces_the_planners_step_and_its_ablation(monkeypatch, one_thread, saturated):
    """The probe's candidates, step and pick are Dream-MPC's own: from the same noise, its executed actions are the
    planner's with its gradient step and the ``iterations=0`` planner's without it. A prior squashed to the bound
    puts every candidate entry there, and the clamp then cancels every step that points outward."""
    from tensordict import TensorDict
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    from torchrl_dreammpc.modules import TDMPC2WorldModel
    from torchrl_dreammpc.planners import GradientMPCPlanner

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    check = _import("grad_step_check.py", monkeypatch)
    torch.manual_seed(0)
    wm = TDMPC2WorldModel(5, 2, model_size=1, enc_dim=32, mlp_dim=32, latent_dim=16).eval()
    with torch.no_grad():
        for param in wm.parameters():  # heads away from their zero initialization: a gradient to follow
            param.add_(0.3 * torch.randn_like(param))
        if saturated:
            wm.policy_head.module.net[-1].bias[:2] = 50.0  # the pre-squash mean: tanh(50) = 1 in float32
    obs = torch.randn(12, 5)
    with torch.no_grad():
        latents = wm.encode(obs)
    probe = check.StepProbe(wm, latents, seed=3, lr=2.0)  # a large step, so that it reorders candidates
    picks, result = probe.picks(), probe.measures()
    for iterations, executed in ((1, picks["executed_after"]), (0, picks["executed_before"])):
        planner = GradientMPCPlanner(wm, generator=torch.Generator().manual_seed(3), lr=2.0, iterations=iterations)
        with set_exploration_type(ExplorationType.DETERMINISTIC), torch.no_grad():
            td = planner(TensorDict({"observation": obs, "is_init": torch.ones(12, 1, dtype=torch.bool)}, [12]))
        torch.testing.assert_close(td["action"], executed)
    changed = (picks["pick_before"] != picks["pick_after"]).float().mean()
    assert result["pick_changed_share"] == pytest.approx(float(changed))
    assert result["candidates"] == 12 * 5 and result["step_norm_median"] <= result["asked_step_norm_median"] + 1e-6
    if saturated:
        assert result["at_bound_share"] == 1.0 and result["ranked_spread_median"] == 0.0
        assert 0.0 < result["pushed_out_share_of_at_bound"] < 1.0
        moved = (probe.a_new != probe.a)
        outward = (probe.grad > 0)  # every entry at the upper bound: the clamp keeps each outward step there
        assert not (moved & outward).any() and (moved == (~outward & (probe.grad != 0))).all()
    else:
        assert result["at_bound_share"] < 0.5 and 0.0 < result["pick_changed_share"] < 1.0
