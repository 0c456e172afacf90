"""What differs between the training algorithms of :class:`~torchrl_dreammpc.trainers.DreamMPCTrainer`.

An algorithm is a world-model family and its update: the losses, the optimization stepper, what the replay
buffer stores beyond TD-MPC2's entries, and any extra trainer hook. Each has one small builder here, chosen by
``algorithm=`` (:data:`ALGORITHM_SPECS`); the trainer stays the one Trainer for all of them.

- ``"tdmpc2"``: :class:`~torchrl_dreammpc.modules.TDMPC2WorldModel`, :class:`~torchrl_dreammpc.objectives.TDMPC2Loss`
  + :class:`~torchrl_dreammpc.objectives.TDMPC2PolicyLoss`, :class:`TDMPC2OptimizationStepper`.
- ``"bmpc"``: :class:`~torchrl_dreammpc.modules.BMPCWorldModel`, :class:`~torchrl_dreammpc.objectives.BMPCLoss`
  + :class:`~torchrl_dreammpc.objectives.BMPCPolicyLoss`, :class:`BMPCOptimizationStepper`, the expert distribution
  in the replay buffer (:data:`~torchrl_dreammpc.trainers.replay.EXPERT_KEYS`) and the
  :class:`~torchrl_dreammpc.trainers.reanalyze.LazyReanalyze` hook with an MPPI planner.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from torchrl.objectives import LossModule
from torchrl.trainers import OptimizationStepper

from torchrl_dreammpc.modules.bmpc import BMPCWorldModel
from torchrl_dreammpc.modules.world_model import TDMPC2WorldModel
from torchrl_dreammpc.objectives.bmpc import BMPCLoss, BMPCPolicyLoss
from torchrl_dreammpc.objectives.tdmpc2 import TDMPC2Loss, TDMPC2PolicyLoss
from torchrl_dreammpc.planners.mppi import MPPIPlanner
from torchrl_dreammpc.trainers.reanalyze import LazyReanalyze
from torchrl_dreammpc.trainers.replay import EXPERT_KEY, EXPERT_KEYS, mark_missing_experts
from torchrl_dreammpc.trainers.stepper import BMPCOptimizationStepper, TDMPC2OptimizationStepper

__all__ = ["UpdateParts", "AlgorithmSpec", "ALGORITHM_SPECS", "build_tdmpc2_update", "build_bmpc_update",
           "BMPC_REANALYZE_PLANNER"]


@dataclasses.dataclass
class UpdateParts:
    """An algorithm's update, as :class:`~torchrl_dreammpc.trainers.DreamMPCTrainer` wires it.

    Attributes:
        loss_module: the Trainer's ``loss_module`` (checkpointed: it holds the model's weights).
        stepper: the Trainer's ``optimization_stepper``.
        replay_keys: entries the replay buffer stores besides :data:`~torchrl_dreammpc.trainers.replay.REPLAY_KEYS`.
        replay_preprocess: applied to the collected rows before they are stored (see ``SliceReplayBufferTrainer``).
        hooks: trainer hooks registered after the replay hook (each has ``register(trainer)``).
    """

    loss_module: LossModule
    stepper: OptimizationStepper
    replay_keys: tuple = ()
    replay_preprocess: Callable | None = None
    hooks: list = dataclasses.field(default_factory=list)


def build_tdmpc2_update(world_model: TDMPC2WorldModel, *, lr: float = 3e-4, enc_lr_scale: float = 0.3,
                        grad_clip: float = 20.0, tau: float = 0.01, compile: bool | str = False,
                        loss_kwargs: Mapping[str, Any] | None = None,
                        policy_loss_kwargs: Mapping[str, Any] | None = None) -> UpdateParts:
    """TD-MPC2's update: :class:`TDMPC2Loss`, :class:`TDMPC2PolicyLoss`, :class:`TDMPC2OptimizationStepper`."""
    loss_module = TDMPC2Loss(world_model, **dict(loss_kwargs or {}))
    policy_loss = TDMPC2PolicyLoss(world_model, **dict(policy_loss_kwargs or {}))
    stepper = TDMPC2OptimizationStepper(loss_module, policy_loss=policy_loss, lr=lr, enc_lr_scale=enc_lr_scale,
                                        grad_clip=grad_clip, tau=tau, compile=compile)
    return UpdateParts(loss_module, stepper)


#: BMPC's planner (config.yaml "planning"; the same values act and reanalyze), used by its lazy reanalyze.
BMPC_REANALYZE_PLANNER = dict(num_samples=512, num_elites=64, iterations=6, num_pi_trajs=24, horizon=3,
                              temperature=0.5, min_std=0.05, max_std=2.0)


def build_bmpc_update(world_model: BMPCWorldModel, *, lr: float = 3e-4, enc_lr_scale: float = 0.3,
                      grad_clip: float = 20.0, tau: float = 0.01, compile: bool | str = False,
                      loss_kwargs: Mapping[str, Any] | None = None,
                      policy_loss_kwargs: Mapping[str, Any] | None = None,
                      reanalyze: Mapping[str, Any] | None = None) -> UpdateParts:
    """BMPC's update: :class:`BMPCLoss`, :class:`BMPCPolicyLoss`, :class:`BMPCOptimizationStepper`, the expert
    distribution stored with every transition and BMPC's lazy reanalyze.

    Args:
        reanalyze (mapping, optional): ``interval`` (BMPC: 10), ``num_slices`` (20), ``states_per_call`` (see
            :class:`LazyReanalyze`; ``None``: ``"auto"``) and ``planner``: the
            :class:`~torchrl_dreammpc.planners.MPPIPlanner` arguments of the re-planner (default
            :data:`BMPC_REANALYZE_PLANNER`; ``horizon`` is BMPC's ``reanalyze_horizon``). As in BMPC, the re-planner
            runs 2 more iterations for action spaces of 20 dimensions or more (its large-action heuristic).
    """
    loss_module = BMPCLoss(world_model, **dict(loss_kwargs or {}))  # first: it refuses a model of another family
    options = dict(reanalyze or {})
    planner_kwargs = {**BMPC_REANALYZE_PLANNER, **dict(options.pop("planner", None) or {})}
    if world_model.action_dim >= 20:
        planner_kwargs["iterations"] = int(planner_kwargs["iterations"]) + 2  # BMPC: iterations += 2*(A >= 20)
    planner = MPPIPlanner(world_model, expert_key=EXPERT_KEY, **planner_kwargs)
    hook = LazyReanalyze(planner, interval=int(options.pop("interval", 10)),
                         num_slices=int(options.pop("num_slices", 20)), expert_key=EXPERT_KEY,
                         context=world_model.exploration_prior,
                         states_per_call=options.pop("states_per_call", None) or "auto")
    if options:
        raise TypeError(f"Unknown reanalyze option(s) {sorted(options)}; known: interval, num_slices, "
                        "states_per_call, planner.")
    policy_loss = BMPCPolicyLoss(world_model, **dict(policy_loss_kwargs or {}))
    stepper = BMPCOptimizationStepper(loss_module, policy_loss=policy_loss, lr=lr, enc_lr_scale=enc_lr_scale,
                                      grad_clip=grad_clip, tau=tau, compile=compile, expert_key=EXPERT_KEY)
    return UpdateParts(loss_module, stepper, replay_keys=EXPERT_KEYS, replay_preprocess=mark_missing_experts,
                       hooks=[hook])


@dataclasses.dataclass(frozen=True)
class AlgorithmSpec:
    """A training algorithm: the world-model class it trains, its loss module class (what a trainer checkpoint's
    ``loss_module`` component is loaded into) and its update builder."""

    world_model_class: type
    loss_class: type
    build_update: Callable[..., UpdateParts]


#: The algorithms by name (``algorithm=``).
ALGORITHM_SPECS: dict[str, AlgorithmSpec] = {
    "tdmpc2": AlgorithmSpec(TDMPC2WorldModel, TDMPC2Loss, build_tdmpc2_update),
    "bmpc": AlgorithmSpec(BMPCWorldModel, BMPCLoss, build_bmpc_update),
}
