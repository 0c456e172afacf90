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
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey
from torchrl.trainers import Trainer, TrainerHookBase
from torchrl.trainers.algorithms import DreamerV3OptimizationStepper, DreamerV3Optimizer

from torchrl_dreammpc.objectives.dreamer_v3 import DreamerV3TrainingLoss, SlowCriticUpdate
from torchrl_dreammpc.trainers.replay import write_to_rows
from torchrl_dreammpc.trainers.stepper import check_update_finite, load_optimizer_keeping_settings

__all__ = ["make_dreamer_v3_update", "OPTIMIZER_DEFAULTS", "ReplayContext", "REPLAY_LOSS_KEYS"]

#: ``DreamerV3TrainingLoss`` arguments that name entries the replay must store: set by the replay switches
#: (``replay_across_episodes``, ``replay_context``), never passed by hand.
REPLAY_LOSS_KEYS = ("first_key", "context_key")

#: [DreamerV3] ``opt`` and ``slowvalue.rate``.
OPTIMIZER_DEFAULTS: dict[str, Any] = dict(lr=4e-5, agc=0.3, eps=1e-20, beta1=0.9, beta2=0.999, warmup_steps=1000,
                                          slow_critic_rate=0.02)


class ReplayContext(TrainerHookBase):
    """DreamerV3's replay context (``replay_context: 1`` in its configs.yaml) for a replay whose sequences cross
    episode ends: each stored row keeps the posterior ``[state, belief]`` of its observation, and a replayed
    sequence starts from the one stored with its first row instead of from a reset
    (:class:`~torchrl_dreammpc.modules.dreamer._ReplayRollout`). So training sees beliefs older than one sequence,
    as acting does.

    - :meth:`mark` (the replay hook's ``preprocess``) stores with each collected row the latent the acting path
      filtered for it (``key``: the model's ``latent_key``), as DreamerV3 stores its policy's carry entries; NaN where no policy acted (the seed phase's random steps:
      the collector leaves zeros there), and such rows start from the reset filter until a training pass wrote
      one.
    - :meth:`write_back` (called by the DreamerV3 stepper after each update) stores the posteriors that pass
      computed (TorchRL's :class:`~torchrl.objectives.DreamerV3Loss` returns them under ``"replay_context"``), as
      DreamerV3 writes its training entries back by step id: row ``t``'s next-observation posterior is the
      context of row ``t + 1`` of the sequence, written at that row's storage index (``"index"``). Not written:
      rows that begin an episode (a sequence starting there restarts from its observation, so their context is
      never read) and the row after the sequence's last one (outside the sample; DreamerV3's windows include it).
      No row is added or moved, so the sampler's boundaries stay valid; nothing is collected between a sample and
      its write.

    Args:
        world_model (DreamerV3WorldModel): the model whose latents are stored.

    Keyword Args:
        key (NestedKey): the stored posterior, as the acting path writes it. Default: the model's ``latent_key``.
        first_key (NestedKey): the rows that begin an episode. Default ``"is_init"``.
        index_key (NestedKey): the storage indices of a sample. Default ``"index"``.
        output_key (NestedKey): where the stepper leaves the pass's posteriors (``("next", "state")`` and
            ``("next", "belief")`` of each row, as ``"state"`` / ``"belief"``). Default ``"replay_context"``.

    Examples:
        >>> from torchrl_dreammpc.modules import DreamerV3WorldModel
        >>> wm = DreamerV3WorldModel(5, 1, model_size="cpu")
        >>> rows = TensorDict({"latent": torch.zeros(3, wm.latent_dim)}, [3])
        >>> ReplayContext(wm).mark(rows)["latent"].isnan().all().item()  # zeros: no policy acted
        True
    """

    def __init__(self, world_model, *, key: NestedKey | None = None, first_key: NestedKey = "is_init",
                 index_key: NestedKey = "index", output_key: NestedKey = "replay_context") -> None:
        self.world_model = world_model
        self.key = world_model.latent_key if key is None else key
        self.first_key, self.index_key, self.output_key = first_key, index_key, output_key
        self.replay_buffer = None
        self.written = 0  # contexts written back so far (this process)

    def mark(self, rows: TensorDictBase) -> TensorDictBase:
        latent = rows.get(self.key, None)
        if latent is None:
            rows.set(self.key, torch.full((*rows.shape, self.world_model.latent_dim), float("nan"),
                                          device=rows.device))
        else:
            rows.set(self.key, latent.masked_fill(~self.world_model.is_posterior(latent), float("nan")))
        return rows

    def write_back(self, batch: TensorDictBase) -> None:
        if self.replay_buffer is None:  # training would go on from the acting latents alone, unnoticed
            raise RuntimeError("The ReplayContext has no replay buffer to write to: register it as a trainer hook "
                               "(context.register(trainer)) or set context.replay_buffer.")
        B, T = batch.shape
        features = batch.get(self.output_key)
        latent = torch.cat([features.get("state"), features.get("belief")], -1)[:, :-1].detach()
        index = batch.get(self.index_key).reshape(B, T, -1)[..., 0][:, 1:]
        keep = ~batch.get(self.first_key).reshape(B, T)[:, 1:].bool()
        rows = index[keep]
        if rows.numel():
            write_to_rows(self.replay_buffer, rows, TensorDict({self.key: latent[keep]}, [rows.numel()]))
            self.written += rows.numel()

    def state_dict(self) -> dict[str, Any]:
        return {}  # the contexts are in the replay storage, checkpointed with it

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass

    def register(self, trainer: Trainer, name: str = "replay_context") -> None:
        self.replay_buffer = trainer.replay_buffer


class _DreamerV3Stepper(DreamerV3OptimizationStepper):
    """TorchRL's stepper, with three changes:

    - a NaN/inf loss term or gradient stops training before the optimizer step writes it into the weights
      (:class:`~torchrl_dreammpc.trainers.stepper.NonFiniteUpdateError`, as with TD-MPC2 and BMPC; TorchRL's
      stepper steps whatever the gradients hold);
    - resumed with this run's optimizer settings (TorchRL's ``load_state_dict`` restores the checkpoint's ``lr``,
      ``agc``, ... with the moments: :func:`load_optimizer_keeping_settings`);
    - with a :class:`ReplayContext`, the posteriors the update computed (which TorchRL's stepper leaves in the
      sample under ``"replay_context"``) are written back into the replay right after the optimizer step.
    """

    _trainer = None
    replay_context: ReplayContext | None = None

    def step(self, trainer, sub_batch):
        self._trainer = trainer  # named in the error message (collected step, last checkpoint)
        metrics = super().step(trainer, sub_batch)
        if self.replay_context is not None:
            self.replay_context.write_back(sub_batch)
        return metrics

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
                           replay_context: ReplayContext | None = None,
                           **loss_kwargs) -> tuple[DreamerV3TrainingLoss, DreamerV3OptimizationStepper]:
    """The loss module and the optimization stepper of a DreamerV3 update.

    Args:
        world_model (DreamerV3WorldModel): the model to train.

    Keyword Args:
        lr, agc, eps, beta1, beta2, warmup_steps: :class:`~torchrl.trainers.algorithms.DreamerV3Optimizer`.
        slow_critic_rate (float): EMA rate of the slow critics.
        compile (bool): not supported yet (the update runs eagerly); ``True`` raises.
        replay_context (ReplayContext, optional): DreamerV3's replay context: the loss starts sequences from the
            posteriors it stores (its ``key``), and the stepper writes the new ones back after each update (needs
            ``first_key``, the same as the context's, in the loss arguments). Register it as a trainer hook.
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
    if replay_context is not None:
        if loss_kwargs.get("first_key") != replay_context.first_key:
            raise ValueError(f"A replay context needs sequences across episode ends with first_key="
                             f"{replay_context.first_key!r} (got first_key={loss_kwargs.get('first_key')!r}).")
        loss_kwargs["context_key"] = replay_context.key
    loss_module = DreamerV3TrainingLoss(world_model, **loss_kwargs)
    optimizer = DreamerV3Optimizer(loss_module.parameters(), lr=lr, agc=agc, eps=eps, beta1=beta1, beta2=beta2,
                                   warmup_steps=int(warmup_steps))
    stepper = _DreamerV3Stepper(
        loss_module, optimizer, SlowCriticUpdate(loss_module.value_loss, tau=slow_critic_rate),
        compile_train_step=False, cudagraph=False)
    stepper.replay_context = replay_context
    return loss_module, stepper
