"""TD-MPC2's and BMPC's updates as TorchRL :class:`~torchrl.trainers.OptimizationStepper` s."""
from __future__ import annotations

import math
import warnings
from typing import Any, TYPE_CHECKING

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey
from torch import nn
from torchrl.objectives import SoftUpdate

from torchrl_dreammpc._checks import check_bool, check_compile, check_float
from torchrl_dreammpc.objectives.bmpc import BMPCLoss, BMPCPolicyLoss
from torchrl_dreammpc.objectives.tdmpc2 import TDMPC2Loss, TDMPC2PolicyLoss, make_tdmpc2_optimizers

from torchrl.trainers import OptimizationStepper

if TYPE_CHECKING:
    from torchrl.trainers import Trainer

__all__ = ["TDMPC2OptimizationStepper", "BMPCOptimizationStepper", "NonFiniteUpdateError", "check_update_finite",
           "load_optimizer_keeping_settings"]


#: torch.compile modes that replay CUDA graphs (their outputs are reused memory on a GPU).
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def load_optimizer_keeping_settings(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any], *,
                                    name: str = "optimizer", counters: tuple[str, ...] = ("step",),
                                    warn: bool = True) -> dict:
    """Restores an optimizer's state (moments, step counts) from a checkpoint, keeping this run's settings.

    Why: ``torch.optim.Optimizer.load_state_dict`` also restores each parameter group's hyperparameters (``lr``,
    ``betas``, ``eps``; DreamerV3's ``agc``, ``warmup_steps``), so a run resumed with another ``lr`` (e.g. a lower
    one after a divergence) would silently keep the checkpoint's. The group entries named in ``counters``
    (progress, not settings: DreamerV3's per-group ``step``) do come from the checkpoint. Settings that differ
    from the checkpoint's are reported in one :class:`UserWarning` (``warn=False``: only returned; see
    :func:`warn_settings_changed`).

    Returns:
        ``{"<name> group <i> <key>": (checkpoint value, value used)}`` for every setting that differs.

    Examples:
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> saved = torch.optim.Adam([w], lr=3e-4).state_dict()
        >>> resumed = torch.optim.Adam([w], lr=1e-4)
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     changed = load_optimizer_keeping_settings(resumed, saved)
        >>> resumed.param_groups[0]["lr"], changed
        (0.0001, {'optimizer group 0 lr': (0.0003, 0.0001)})
    """
    configured = [{key: value for key, value in group.items() if key != "params" and key not in counters}
                  for group in optimizer.param_groups]
    optimizer.load_state_dict(state_dict)
    changed = {}
    for i, (group, settings) in enumerate(zip(optimizer.param_groups, configured)):
        for key, value in settings.items():
            if key in group and group[key] != value:
                changed[f"{name} group {i} {key}"] = (group[key], value)
        group.update(settings)
    if warn:
        warn_settings_changed(changed)
    return changed


def warn_settings_changed(changed: dict) -> None:
    """One :class:`UserWarning` listing what :func:`load_optimizer_keeping_settings` found changed (if anything)."""
    def show(value):
        return f"{value:.4g}" if isinstance(value, float) else repr(value)

    if changed:
        warnings.warn("Resumed with other optimizer settings than the checkpoint's; this run's are used: "
                      + ", ".join(f"{key} {show(old)} -> {show(new)}" for key, (old, new) in changed.items()),
                      stacklevel=3)


class NonFiniteUpdateError(FloatingPointError):
    """An update produced a NaN/inf loss or gradient norm. The optimizer step that would have written it into the
    weights was not taken; the message names the update, the loss term(s) and, under a trainer with checkpoints,
    the last checkpoint written.

    Attributes:
        update (int): the 1-based index of the failed update.
        terms (dict): the non-finite entries, name → value.
        checkpoint: the trainer's newest checkpoint at the time (``None`` without one).
    """

    def __init__(self, message: str, *, update: int, terms: dict[str, float], checkpoint=None) -> None:
        super().__init__(message)
        self.update, self.terms, self.checkpoint = update, terms, checkpoint


def check_update_finite(out: TensorDictBase, grad_norm: torch.Tensor, optimizer: torch.optim.Optimizer, *,
                        update: int, trainer=None, part: str = "world-model",
                        skipped: str = "no weight was changed by this update", on_failure=None,
                        hint: str = "e.g. with a lower lr or grad_clip") -> None:
    """Raises :class:`NonFiniteUpdateError` (after dropping ``optimizer``'s gradients) if a ``loss_*`` term of
    ``out`` or ``grad_norm`` is NaN/inf; call it between the backward pass and the optimizer step. One sum over a
    handful of scalars, one host read; the names are looked up on failure. ``on_failure`` runs before the raise.

    Examples:
        >>> from tensordict import TensorDict
        >>> layer = torch.nn.Linear(2, 1)
        >>> optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        >>> out = TensorDict(loss_a=torch.tensor(1.0), loss_b=torch.tensor(float("nan")))
        >>> try:
        ...     check_update_finite(out, torch.tensor(3.0), optimizer, update=7)
        ... except NonFiniteUpdateError as err:
        ...     print(err.terms)
        {'loss_b': nan}
    """
    names = [key for key in out.keys() if isinstance(key, str) and key.startswith("loss_")]
    values = torch.stack([out.get(key).detach().reshape(()).float() for key in names]
                         + [grad_norm.detach().reshape(()).float()])
    if math.isfinite(values.sum().item()):  # NaN and inf propagate through the sum
        return
    optimizer.zero_grad(set_to_none=True)
    if on_failure is not None:
        on_failure()
    bad = {name: float(value) for name, value in zip([*names, "grad_norm"], values.tolist())
           if not math.isfinite(value)}
    where = f"update {update}"
    checkpoint = None
    if trainer is not None:
        where += f", collected step {trainer.collected_frames}"
        latest = getattr(trainer, "latest_checkpoint", None)
        checkpoint = latest() if callable(latest) else None
    message = (f"Non-finite {part} loss ({where}): " + ", ".join(f"{name} = {value}" for name, value in bad.items())
               + f". The optimizer step was not taken ({skipped}) and training stops.")
    if trainer is not None:
        message += (f" Last checkpoint: {checkpoint} (resume from it, {hint})."
                    if checkpoint is not None else " No checkpoint was written before it.")
    raise NonFiniteUpdateError(message, update=update, terms=bad, checkpoint=checkpoint)


class TDMPC2OptimizationStepper(OptimizationStepper):
    """One TD-MPC2 update: world model, then policy prior, then the soft target update.

    TD-MPC2 steps two optimizers in sequence on every sampled batch, and TorchRL's
    :class:`~torchrl.trainers.DefaultOptimizationStepper` owns a single one, so this stepper owns both (and the
    policy loss with its running Q scale). One :meth:`step` runs exactly TD-MPC2's ``_update``:

    1. ``world_model.train()``; ``out = loss(batch)``; the sum of every ``loss_*`` entry is back-propagated;
       the world-model gradients are clipped to ``grad_clip`` (20); ``wm_optim.step()``; ``zero_grad``;
    2. ``policy_loss(out["latents"])`` on the detached latent rollout (it sees the Qs *after* step 1),
       back-propagated, the policy gradients clipped separately to ``grad_clip``; ``pi_optim.step()``;
       ``zero_grad``;
    3. the soft target-Q update (TorchRL's :class:`~torchrl.objectives.SoftUpdate`, ``tau=0.01``), after the
       policy update as in TD-MPC2. It is stepped here rather than registered as the Trainer's
       ``target_net_updater`` hook so that the order cannot be changed by hook registration;
    4. ``world_model.eval()`` (planning runs with Q dropout off).

    The returned tensordict holds detached scalars only (the ``[H+1, B, L]`` latents are dropped), ready for
    the Trainer's logging.

    Non-finite updates (``check_finite=True``, the default): before each optimizer step, the loss terms and the
    clipped gradient norm of that step are checked (one fused reduction: two host syncs per update, ~20 µs on a
    CPU against an update of 50-300 ms). A NaN/inf raises :class:`NonFiniteUpdateError` naming the update, the
    loss term(s) and, under a trainer, the collected step and the last checkpoint; the optimizer step is not
    taken, so the weights keep their last finite values. The update *stops* training rather than skipping the
    batch: a NaN loss comes from NaN/overflowing weights or data, and a skipped step would fail again on the next
    batch (or, worse, on some batches only, silently training on the rest); resume from the named checkpoint with
    a lower ``lr`` / ``grad_clip`` instead.

    Its state (both optimizers, the policy loss's running Q scale, the target updater's progress and the
    update count) is what :meth:`state_dict` returns; registered on a Trainer (:meth:`register`), it is saved
    with the Trainer's checkpoint under ``trainer_module.optimization_stepper``. The model weights are not part
    of it: the Trainer checkpoints them through its ``loss_module``.

    Args:
        loss_module (TDMPC2Loss): the world-model loss (its ``world_model`` is trained).

    Keyword Args:
        policy_loss (TDMPC2PolicyLoss, optional): the policy-prior loss. Defaults to
            ``TDMPC2PolicyLoss(loss_module.world_model)`` with TD-MPC2's coefficients.
        lr (float): learning rate of both optimizers (TD-MPC2: 3e-4). Ignored if ``optimizers`` is given.
        enc_lr_scale (float): encoder learning-rate factor (TD-MPC2: 0.3). Ignored if ``optimizers`` is given.
        optimizers (tuple, optional): ``(world_model_optimizer, policy_optimizer)``; defaults to
            :func:`~torchrl_dreammpc.objectives.make_tdmpc2_optimizers`.
        grad_clip (float): max gradient norm, applied separately to the world-model and the policy parameters
            (TD-MPC2: 20).
        tau (float): soft target update rate (TD-MPC2: 0.01).
        compile (bool or str): ``torch.compile`` the two loss computations (forward and, through AOTAutograd,
            backward); a string picks the compile mode (``True`` means ``"max-autotune-no-cudagraphs"``, the
            fastest mode measured on CPU, see docs/performance.md, on a CPU model and ``"default"`` on another
            device). The optimizer steps, clipping and the
            target update stay eager. Batch validation (widths, NaN/inf) then runs eagerly before the compiled
            call, so bad input still raises the same error. Default ``False`` (eager). Compile time: see
            docs/performance.md, *Compile time*.
        check_finite (bool): refuse non-finite losses / gradient norms (see above). Default ``True``.

    Examples:
        >>> from torchrl_dreammpc.modules import TDMPC2WorldModel
        >>> from torchrl_dreammpc.objectives import TDMPC2Loss
        >>> wm = TDMPC2WorldModel(5, 1, model_size=1, enc_dim=32, mlp_dim=32, latent_dim=16)
        >>> stepper = TDMPC2OptimizationStepper(TDMPC2Loss(wm))
        >>> B, H = 8, 3
        >>> batch = TensorDict({"observation": torch.randn(B, H, 5), "action": torch.rand(B, H, 1) * 2 - 1,
        ...     "next": {"observation": torch.randn(B, H, 5), "reward": torch.randn(B, H, 1),
        ...              "terminated": torch.zeros(B, H, 1, dtype=torch.bool)}}, [B, H])
        >>> metrics = stepper.step(None, batch)
        >>> sorted(metrics.keys())[:3]
        ['consistency', 'grad_norm', 'loss_consistency']
    """

    loss_class, policy_loss_class = TDMPC2Loss, TDMPC2PolicyLoss

    def __init__(
        self,
        loss_module: TDMPC2Loss,
        *,
        policy_loss: TDMPC2PolicyLoss | None = None,
        lr: float = 3e-4,
        enc_lr_scale: float = 0.3,
        optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer] | None = None,
        grad_clip: float = 20.0,
        tau: float = 0.01,
        compile: bool | str = False,
        check_finite: bool = True,
    ) -> None:
        if not isinstance(loss_module, self.loss_class):
            raise TypeError(f"loss_module must be a {self.loss_class.__name__}, got {type(loss_module).__name__}.")
        grad_clip = check_float("grad_clip", grad_clip, low=0.0, low_open=True)
        tau = check_float("tau", tau, low=0.0, high=1.0, low_open=True)
        compile = check_compile("compile", compile)
        self.check_finite = check_bool("check_finite", check_finite)
        self.loss_module = loss_module
        self.world_model = loss_module.world_model
        if policy_loss is None:
            policy_loss = self.policy_loss_class(self.world_model)
        elif policy_loss.world_model is not self.world_model:
            raise ValueError("policy_loss and loss_module must train the same world model.")
        self.policy_loss = policy_loss
        if optimizers is None:
            optimizers = make_tdmpc2_optimizers(self.world_model, lr=lr, enc_lr_scale=enc_lr_scale)
        self.wm_optim, self.pi_optim = optimizers
        self.grad_clip = float(grad_clip)
        # Built once, before any checkpoint is restored: SoftUpdate.init_() copies the online Qs into the targets.
        self.target_updater = SoftUpdate(loss_module, tau=tau)
        # Flat parameter lists for the two clips (TD-MPC2 clips the world model and the policy separately).
        self._wm_params = [p for group in self.wm_optim.param_groups for p in group["params"]]
        self._pi_params = [p for group in self.pi_optim.param_groups for p in group["params"]]
        self.num_updates = 0
        # The optimizers' state and the target updater hold this device's tensors: a model moved afterwards is
        # refused at the next step (build the stepper after moving the model).
        self.device = next(self.world_model.parameters()).device
        # compile=True: the mode measured fastest on CPUs (docs/performance.md); on a GPU inductor's default
        # (max-autotune would first spend minutes benchmarking kernels)
        if compile is True:
            compile = "max-autotune-no-cudagraphs" if self.device.type == "cpu" else "default"
        self.compile_mode = compile or None
        if self.compile_mode is not None:
            self._world_model_losses = torch.compile(self._world_model_losses, mode=self.compile_mode)
            self._policy_losses = torch.compile(self._policy_losses, mode=self.compile_mode)

    def _world_model_losses(self, batch: TensorDictBase) -> tuple[torch.Tensor, TensorDictBase]:
        out = self.loss_module(batch)
        loss = sum(value for key, value in out.items() if isinstance(key, str) and key.startswith("loss_"))
        return loss, out

    def _policy_losses(self, latents: torch.Tensor) -> TensorDictBase:
        return self.policy_loss(TensorDict({self.policy_loss.tensor_keys.latents: latents}, batch_size=[]))

    @property
    def optimizer_step_count(self) -> int:
        """Completed updates (read by TorchRL hooks that act on an optimizer-step cadence)."""
        return self.num_updates

    def step(self, trainer: Trainer | None, sub_batch: TensorDictBase) -> TensorDictBase:
        """Runs one TD-MPC2 update on a ``[B, H]`` batch of sub-trajectories and returns detached scalars.

        Args:
            trainer (Trainer or None): the owning trainer (must share this stepper's loss), or ``None`` in a
                hand-written loop.
            sub_batch (TensorDictBase): ``[B, H]`` sub-trajectories (see :class:`TDMPC2Loss`).
        """
        if trainer is not None and trainer.loss_module is not self.loss_module:
            raise ValueError("The trainer and the stepper must share the same loss module.")
        wm = self.world_model
        device = next(wm.parameters()).device
        if device != self.device:
            raise RuntimeError(f"The world model is on {device}, but this stepper was built for it on {self.device}: "
                               "its optimizers and target updater hold tensors of that device. Move the model first, "
                               "then build the losses and the stepper.")
        if self.compile_mode is not None and self.loss_module.validate:
            self.loss_module.check_batch(sub_batch)
        wm.train()
        loss, out = self._world_model_losses(sub_batch)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self._wm_params, self.grad_clip)
        if self.check_finite:
            self._check_finite(trainer, "world-model", out, grad_norm, self.wm_optim)
        self.wm_optim.step()
        self.wm_optim.zero_grad(set_to_none=True)

        pi_out = None
        if self._trains_policy(trainer):
            pi_out = self._policy_losses(*self._policy_inputs(out, sub_batch))
            pi_out["loss_pi"].backward()
            pi_grad_norm = nn.utils.clip_grad_norm_(self._pi_params, self.grad_clip)
            if self.check_finite:
                self._check_finite(trainer, "policy", pi_out, pi_grad_norm, self.pi_optim)
            self.pi_optim.step()
            self.pi_optim.zero_grad(set_to_none=True)

        self.target_updater.step()
        wm.eval()
        self.num_updates += 1

        metrics = out.exclude(self.loss_module.tensor_keys.latents).detach()
        metrics.set("grad_norm", grad_norm.detach())
        if pi_out is not None:
            metrics.update(pi_out.detach())
            metrics.set("pi_grad_norm", pi_grad_norm.detach())
        if self.compile_mode in _CUDA_GRAPH_MODES:
            # CUDA-graph outputs are overwritten by the next replay; the trainer reads these after later steps
            metrics = metrics.clone()
        return metrics

    def _trains_policy(self, trainer: Trainer | None) -> bool:
        """Whether this update steps the policy too (TD-MPC2: always)."""
        return True

    def _policy_inputs(self, out: TensorDictBase, sub_batch: TensorDictBase) -> tuple:
        """The arguments of :meth:`_policy_losses` (TD-MPC2: the detached latent rollout)."""
        return (out.get(self.loss_module.tensor_keys.latents),)

    def _check_finite(self, trainer, part: str, out: TensorDictBase, grad_norm: torch.Tensor,
                      optimizer: torch.optim.Optimizer) -> None:
        skipped = ("no weight was changed by this update" if part == "world-model" else
                   "its world-model step was applied, its policy step was not")
        check_update_finite(out, grad_norm, optimizer, update=self.num_updates + 1, trainer=trainer, part=part,
                            skipped=skipped, on_failure=self.world_model.eval)

    def state_dict(self) -> dict[str, Any]:
        # The policy loss's only own state is its running Q scale: its world-model weights are checkpointed by
        # the Trainer's loss_module, so they are not stored a second time here.
        return {
            "wm_optim": self.wm_optim.state_dict(),
            "pi_optim": self.pi_optim.state_dict(),
            "q_scale": self.policy_loss.scale.state_dict(),
            "target_updater": self.target_updater.state_dict(),
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the moments from the checkpoint, the learning rates (e.g. lowered for a resume) from this run
        warn_settings_changed({
            **load_optimizer_keeping_settings(self.wm_optim, state_dict["wm_optim"], name="world-model optimizer",
                                              warn=False),
            **load_optimizer_keeping_settings(self.pi_optim, state_dict["pi_optim"], name="policy optimizer",
                                              warn=False)})
        self.policy_loss.scale.load_state_dict(state_dict["q_scale"])
        self.target_updater.load_state_dict(state_dict["target_updater"])
        self.num_updates = int(state_dict["num_updates"])


class BMPCOptimizationStepper(TDMPC2OptimizationStepper):
    """One BMPC update (``BMPC._update`` of its public code): world model, then the policy, then the soft target
    update of the V ensemble; the world model back to ``eval()``.

    The same order, optimizers (BMPC's are TD-MPC2's: Adam 3e-4 with the encoder at 0.3x, a separate Adam with
    ``eps=1e-5`` on the policy), separate gradient clipping at 20 and target update (``tau=0.01``) as
    :class:`TDMPC2OptimizationStepper`, with BMPC's two differences:

    - the policy loss is :class:`~torchrl_dreammpc.objectives.BMPCPolicyLoss`, which imitates the planner's
      action distribution stored with each transition (``(expert_key, "loc")`` / ``(expert_key, "scale")`` of the
      ``[B, H]`` batch, NaN where there is none) along the first H latents of the rollout;
    - during the seed-phase pre-training the policy is not trained (BMPC's ``pretrain``): :meth:`step` skips it
      when the trainer says it is pre-training (``trainer.pretraining``, set by
      :class:`~torchrl_dreammpc.trainers.DreamMPCTrainer`) or when called with ``pretrain=True``.

    Args:
        loss_module (BMPCLoss): the world-model loss.

    Keyword Args:
        policy_loss (BMPCPolicyLoss, optional): defaults to ``BMPCPolicyLoss(loss_module.world_model)``.
        expert_key (NestedKey): where the batch holds the expert distribution. Default ``"expert"``.
        lr, enc_lr_scale, optimizers, grad_clip, tau, compile: see :class:`TDMPC2OptimizationStepper`.

    Examples:
        >>> from torchrl_dreammpc.modules import BMPCWorldModel
        >>> from torchrl_dreammpc.objectives import BMPCLoss
        >>> wm = BMPCWorldModel(5, 1, model_size=1, enc_dim=32, mlp_dim=32, latent_dim=16)
        >>> stepper = BMPCOptimizationStepper(BMPCLoss(wm))
        >>> B, H = 8, 3
        >>> batch = TensorDict({"observation": torch.randn(B, H, 5), "action": torch.rand(B, H, 1) * 2 - 1,
        ...     "expert": {"loc": torch.zeros(B, H, 1), "scale": torch.ones(B, H, 1)},
        ...     "next": {"observation": torch.randn(B, H, 5), "reward": torch.randn(B, H, 1),
        ...              "terminated": torch.zeros(B, H, 1, dtype=torch.bool)}}, [B, H])
        >>> "loss_pi" in stepper.step(None, batch).keys(), "loss_pi" in stepper.step(None, batch, pretrain=True).keys()
        (True, False)
    """

    loss_class, policy_loss_class = BMPCLoss, BMPCPolicyLoss

    def __init__(self, loss_module: BMPCLoss, *, policy_loss: BMPCPolicyLoss | None = None,
                 expert_key: NestedKey = "expert", **kwargs) -> None:
        super().__init__(loss_module, policy_loss=policy_loss, **kwargs)
        self.expert_key = expert_key
        self._pretrain: bool | None = None

    def step(self, trainer: Trainer | None, sub_batch: TensorDictBase, *, pretrain: bool | None = None
             ) -> TensorDictBase:
        """One BMPC update; ``pretrain`` (default: ``trainer.pretraining``, else ``False``) skips the policy."""
        self._pretrain = pretrain
        try:
            return super().step(trainer, sub_batch)
        finally:
            self._pretrain = None

    def _trains_policy(self, trainer: Trainer | None) -> bool:
        pretrain = self._pretrain
        if pretrain is None:
            pretrain = bool(getattr(trainer, "pretraining", False))
        return not pretrain

    def _policy_inputs(self, out: TensorDictBase, sub_batch: TensorDictBase) -> tuple:
        key = self.expert_key
        entries = [(*key, n) if isinstance(key, tuple) else (key, n) for n in ("loc", "scale")]
        missing = [k for k in entries if k not in sub_batch.keys(True)]
        if missing:
            raise KeyError(f"BMPC's policy loss needs the planner's action distribution of each transition, "
                           f"{entries} in the [B, H] batch; missing {missing}. Store it in the replay buffer "
                           "(a planner with expert_key, NaN where there is none).")
        loc, scale = (sub_batch.get(k).transpose(0, 1) for k in entries)  # time-major [H, B, A]
        return out.get(self.loss_module.tensor_keys.latents), loc, scale

    def _policy_losses(self, latents: torch.Tensor, loc: torch.Tensor | None = None,
                       scale: torch.Tensor | None = None) -> TensorDictBase:
        k = self.policy_loss.tensor_keys
        return self.policy_loss(TensorDict({k.latents: latents, k.expert_loc: loc, k.expert_scale: scale},
                                           batch_size=[]))
