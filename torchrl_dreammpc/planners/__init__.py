"""Actors that act through a latent world model: Dream-MPC, TD-MPC2's MPPI and the policy prior alone.

All three share :class:`LatentPlannerBase` and use only the :class:`~torchrl_dreammpc.modules.WorldModelBase`
methods of the model, so any model family implementing them can be planned in. See docs/planners.md.
"""
from torchrl_dreammpc.planners.base import LatentPlannerBase, NonFiniteActionError
from torchrl_dreammpc.planners.gradient import GradientMPCPlanner
from torchrl_dreammpc.planners.mppi import MPPIPlanner
from torchrl_dreammpc.planners.policy import PolicyActor

__all__ = ["LatentPlannerBase", "GradientMPCPlanner", "MPPIPlanner", "PolicyActor", "NonFiniteActionError"]
