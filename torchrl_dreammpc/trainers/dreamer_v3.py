"""DreamerV3's update for :class:`~torchrl_dreammpc.trainers.DreamMPCTrainer` (``algorithm="dreamer_v3"``).

TorchRL's own pieces, wired: :class:`~torchrl_dreammpc.objectives.DreamerV3TrainingLoss` (TorchRL's
:class:`~torchrl.objectives.DreamerV3Loss`), one :class:`~torchrl.trainers.algorithms.DreamerV3Optimizer` over every
learned weight (world model, actor, critics: DreamerV3 sums its losses and steps one optimizer), the slow critics'
EMA, and :class:`~torchrl.trainers.algorithms.DreamerV3OptimizationStepper` running forward, backward, optimizer and
EMA steps. Defaults are [DreamerV3]'s (Hafner et al., arXiv:2301.04104; ``dreamerv3/configs.yaml``: ``opt: {lr:
4e-5, agc: 0.3, eps: 1e-20, beta1: 0.9, beta2: 0.999, warmup: 1000}``, ``slowvalue: {rate: 0.02, every: 1}``).
"""
from __future__ import annotations

from typing import Any

import torch
from torchrl.trainers.algorithms import DreamerV3OptimizationStepper, DreamerV3Optimizer

from torchrl_dreammpc.objectives.dreamer_v3 import DreamerV3TrainingLoss, SlowCriticUpdate
from torchrl_dreammpc.trainers.stepper import check_update_finite, load_optimizer_keeping_settings

__all__ = ["make_dreamer_v3_update", "OPTIMIZER_DEFAULTS"]

#: [DreamerV3] ``opt`` and ``slowvalue.rate``.
OPTIMIZER_DEFAULTS: dict[str, Any] = dict(lr=4e-5, agc=0.3, eps=1e-20, beta1=0.9, beta2=0.999, warmup_steps=1000,
                                          slow_critic_rate=0.02)


class _DreamerV3Stepper(DreamerV3OptimizationStepper):
    """TorchRL's stepper, with two changes:

    - a NaN/inf loss term or gradient stops training before the optimizer step writes it into the weights
      (:class:`~torchrl_dreammpc.trainers.stepper.NonFiniteUpdateError`, as with TD-MPC2 and BMPC; TorchRL's
      stepper steps whatever the gradients hold);
    - resumed with this run's optimizer settings (TorchRL's ``load_state_dict`` restores the checkpoint's ``lr``,
      ``agc``, ... with the moments: :func:`load_optimizer_keeping_settings`).
    """

    _trainer = None

    def step(self, trainer, sub_batch):
        self._trainer = trainer  # named in the error message (collected step, last checkpoint)
        return super().step(trainer, sub_batch)

    def _forward_backward(self, sample):
        losses = super()._forward_backward(sample)  # backward done, optimizer step not yet taken
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        check_update_finite(losses, grad_norm, self.optimizer, trainer=self._trainer,
                            update=int(self.optimizer.param_groups[0]["step"]) + 1,  # checkpointed with the optimizer
                            part="DreamerV3", hint="e.g. with a lower dreamer.lr")
        return losses

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load_optimizer_keeping_settings(self.optimizer, state_dict["optimizer"], name="DreamerV3 optimizer")
        if self.target_updater is not None:
            self.target_updater.load_state_dict(state_dict["target_updater"])


def make_dreamer_v3_update(world_model, *, lr: float = 4e-5, agc: float = 0.3, eps: float = 1e-20,
                           beta1: float = 0.9, beta2: float = 0.999, warmup_steps: int = 1000,
                           slow_critic_rate: float = 0.02, compile: bool | str = False,
                           **loss_kwargs) -> tuple[DreamerV3TrainingLoss, DreamerV3OptimizationStepper]:
    """The loss module and the optimization stepper of a DreamerV3 update.

    Args:
        world_model (DreamerV3WorldModel): the model to train.

    Keyword Args:
        lr, agc, eps, beta1, beta2, warmup_steps: :class:`~torchrl.trainers.algorithms.DreamerV3Optimizer`.
        slow_critic_rate (float): EMA rate of the slow critics.
        compile (bool): not supported yet (the update runs eagerly); ``True`` raises.
        **loss_kwargs: :class:`~torchrl_dreammpc.objectives.DreamerV3TrainingLoss` arguments.

    Returns:
        ``(loss_module, stepper)``.

    Examples:
        >>> from torchrl_dreammpc.modules import DreamerV3WorldModel
        >>> loss, stepper = make_dreamer_v3_update(DreamerV3WorldModel(5, 1, model_size="cpu"))
        >>> isinstance(stepper, DreamerV3OptimizationStepper)
        True
    """
    if compile:
        # DreamerV3OptimizationStepper compiles only after a warmup(sample) call, which the trainer's schedule does
        # not make; an eager update is what runs on CPU anyway.
        raise NotImplementedError("compile=True is not supported for algorithm='dreamer_v3' (eager updates only).")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}.")
    loss_module = DreamerV3TrainingLoss(world_model, **loss_kwargs)
    optimizer = DreamerV3Optimizer(loss_module.parameters(), lr=lr, agc=agc, eps=eps, beta1=beta1, beta2=beta2,
                                   warmup_steps=int(warmup_steps))
    stepper = _DreamerV3Stepper(
        loss_module, optimizer, SlowCriticUpdate(loss_module.value_loss, tau=slow_critic_rate),
        compile_train_step=False, cudagraph=False)
    return loss_module, stepper
