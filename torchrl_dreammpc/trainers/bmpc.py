"""BMPC's update for :class:`~torchrl_dreammpc.trainers.DreamMPCTrainer` (``algorithm="bmpc"``).

[BMPC] (Bootstrapped Model Predictive Control, Wang et al., ICLR 2025; public code github.com/wertyuilife2/bmpc,
MIT, ``bmpc/bmpc.py`` and ``config.yaml``): :class:`~torchrl_dreammpc.objectives.BMPCLoss` (state values with a
model-based target), :class:`~torchrl_dreammpc.objectives.BMPCPolicyLoss` (the policy imitates the planner's
action distribution), :class:`~torchrl_dreammpc.trainers.BMPCOptimizationStepper`, and the
:class:`~torchrl_dreammpc.trainers.LazyReanalyze` hook that re-plans sampled states with BMPC's MPPI and writes
the new expert distributions into the replay storage. The trainer also stores the expert distribution with every
transition (:data:`~torchrl_dreammpc.trainers.replay.EXPERT_KEYS`); see ``UPDATE_BUILDERS`` in
:mod:`torchrl_dreammpc.trainers.dream_mpc` for how these parts are wired.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torchrl_dreammpc.modules.bmpc import BMPCWorldModel
from torchrl_dreammpc.objectives.bmpc import BMPCLoss, BMPCPolicyLoss
from torchrl_dreammpc.planners.mppi import MPPIPlanner
from torchrl_dreammpc.trainers.reanalyze import LazyReanalyze
from torchrl_dreammpc.trainers.replay import EXPERT_KEY
from torchrl_dreammpc.trainers.stepper import BMPCOptimizationStepper

__all__ = ["make_bmpc_update", "BMPC_REANALYZE_PLANNER", "REANALYZE_OPTIONS"]

#: BMPC's planner (config.yaml "planning"; the same values act and reanalyze), used by its lazy reanalyze.
BMPC_REANALYZE_PLANNER = dict(num_samples=512, num_elites=64, iterations=6, num_pi_trajs=24, horizon=3,
                              temperature=0.5, min_std=0.05, max_std=2.0)
#: The options of ``reanalyze=`` (:func:`make_bmpc_update`).
REANALYZE_OPTIONS = ("interval", "num_slices", "states_per_call", "planner")


def make_bmpc_update(world_model: BMPCWorldModel, *, lr: float = 3e-4, enc_lr_scale: float = 0.3,
                     grad_clip: float = 20.0, tau: float = 0.01, compile: bool | str = False,
                     loss_kwargs: Mapping[str, Any] | None = None,
                     policy_loss_kwargs: Mapping[str, Any] | None = None,
                     reanalyze: Mapping[str, Any] | None = None
                     ) -> tuple[BMPCLoss, BMPCOptimizationStepper, LazyReanalyze]:
    """The loss module, the optimization stepper and the lazy-reanalyze hook of a BMPC update.

    Args:
        world_model (BMPCWorldModel): the model to train.

    Keyword Args:
        lr, enc_lr_scale, grad_clip, tau: see :class:`~torchrl_dreammpc.trainers.BMPCOptimizationStepper`.
        compile (bool or str): ``torch.compile`` the update (the stepper's ``compile``) and the reanalyze
            planner's model evaluations (its ``compile``; the same plans in less time: on one loaded CPU thread,
            where the reanalyze is ~90% of a BMPC step, 1503 vs 1624 ms per step, median of 3 interleaved rounds,
            docs/performance.md). ``reanalyze["planner"]`` may set the planner's own ``compile``.
        loss_kwargs, policy_loss_kwargs (mapping, optional): :class:`BMPCLoss` / :class:`BMPCPolicyLoss` arguments.
        reanalyze (mapping, optional): ``interval`` (BMPC: 10), ``num_slices`` (20), ``states_per_call`` (see
            :class:`LazyReanalyze`; ``None``: ``"auto"``) and ``planner``: the
            :class:`~torchrl_dreammpc.planners.MPPIPlanner` arguments of the re-planner (default
            :data:`BMPC_REANALYZE_PLANNER`; ``horizon`` is BMPC's ``reanalyze_horizon``). As in BMPC, the re-planner
            runs 2 more iterations for action spaces of 20 dimensions or more (its large-action heuristic).

    Returns:
        ``(loss_module, stepper, reanalyze_hook)``.

    Examples:
        >>> loss, stepper, hook = make_bmpc_update(BMPCWorldModel(5, 1, model_size=1))
        >>> type(stepper).__name__, hook.interval, hook.num_slices
        ('BMPCOptimizationStepper', 10, 20)
    """
    loss_module = BMPCLoss(world_model, **dict(loss_kwargs or {}))  # first: it refuses a model of another family
    options = dict(reanalyze or {})
    unknown = sorted(set(options) - set(REANALYZE_OPTIONS))
    if unknown:
        raise TypeError(f"Unknown reanalyze option(s) {unknown}; known: {', '.join(REANALYZE_OPTIONS)}.")
    planner_kwargs = {**BMPC_REANALYZE_PLANNER, "compile": compile, **dict(options.get("planner") or {})}
    if world_model.action_dim >= 20:
        planner_kwargs["iterations"] = int(planner_kwargs["iterations"]) + 2  # BMPC: iterations += 2*(A >= 20)
    planner = MPPIPlanner(world_model, expert_key=EXPERT_KEY, **planner_kwargs)
    hook = LazyReanalyze(planner, interval=options.get("interval", 10), num_slices=options.get("num_slices", 20),
                         expert_key=EXPERT_KEY, context=world_model.exploration_prior,
                         states_per_call=options.get("states_per_call") or "auto")
    policy_loss = BMPCPolicyLoss(world_model, **dict(policy_loss_kwargs or {}))
    stepper = BMPCOptimizationStepper(loss_module, policy_loss=policy_loss, lr=lr, enc_lr_scale=enc_lr_scale,
                                      grad_clip=grad_clip, tau=tau, compile=compile, expert_key=EXPERT_KEY)
    return loss_module, stepper, hook
