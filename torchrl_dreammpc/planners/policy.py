"""The policy prior of a world model as an actor (no planning)."""
from __future__ import annotations

import torch

from torchrl_dreammpc.planners.base import LatentPlannerBase, _policy_action

__all__ = ["PolicyActor"]


class PolicyActor(LatentPlannerBase):
    """Acts with the world model's policy prior alone: ``a = π(encode(obs))``.

    Exploration mode (RANDOM, or no mode set): a sample of the squashed-Gaussian prior. Evaluation mode
    (DETERMINISTIC / MODE / MEAN): its squashed mean (what TD-MPC2 executes with ``mpc=False, eval_mode=True``).
    The action is clamped to the bounds. It is the baseline the planners improve on and shares their interface
    (keys, bounds, batching, noise), so it can be swapped in anywhere a planner is used. It keeps no warm start.

    Args:
        world_model (WorldModelBase): the model whose ``policy`` acts.

    Keyword Args:
        see :class:`~torchrl_dreammpc.planners.LatentPlannerBase`. ``diagnostics`` writes nothing extra.

    Noise layout per env: ``[A]`` (drawn in exploration mode only).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.envs.utils import ExplorationType, set_exploration_type
        >>> from torchrl_dreammpc.modules import TDMPC2WorldModel
        >>> wm = TDMPC2WorldModel(5, 2, model_size=1, enc_dim=32, mlp_dim=32, latent_dim=16)
        >>> actor = PolicyActor(wm)
        >>> with set_exploration_type(ExplorationType.DETERMINISTIC):
        ...     a = actor(TensorDict({"observation": torch.randn(3, 5)}, [3]))["action"]
        >>> a.shape
        torch.Size([3, 2])
    """

    writes_expert = False  # no planner: BMPC stores no expert (NaN) for the prior's own actions

    @property
    def noise_per_env(self) -> int:
        return self.action_dim

    def plan(self, z0: torch.Tensor, warm: torch.Tensor | None, explore: bool):
        with torch.no_grad():
            ops = self._ops()
            eps = self.draw_noise(z0.shape[0], z0.device, z0.dtype) if explore else None
            action = _policy_action(ops, z0, eps)
            return self.clamp_action(action), {}
