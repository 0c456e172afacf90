"""torchrl_dreammpc: TorchRL-native world models, losses and planners for model-based RL (Dream-MPC).

Public names: ``make_env`` (task suite), ``TDMPC2WorldModel``, ``DreamerV3WorldModel``, ``TDMPC2Loss`` /
``TDMPC2PolicyLoss``, BMPC's ``BMPCWorldModel``, ``BMPCLoss`` / ``BMPCPolicyLoss``, ``from_tdmpc2_checkpoint`` /
``save_tdmpc2_checkpoint``, the planners ``GradientMPCPlanner`` / ``MPPIPlanner`` / ``PolicyActor`` and the
``DreamMPCTrainer``.
"""
from torchrl_dreammpc.checkpoints import (from_tdmpc2_checkpoint, load_any, load_world_model, save_tdmpc2_checkpoint,
                                          save_world_model)
from torchrl_dreammpc.envs import make_env, task_info
from torchrl_dreammpc.modules import BMPCWorldModel, DreamerV3WorldModel, TDMPC2WorldModel, WorldModelBase
from torchrl_dreammpc.objectives import BMPCLoss, BMPCPolicyLoss, TDMPC2Loss, TDMPC2PolicyLoss, make_tdmpc2_optimizers
from torchrl_dreammpc.planners import GradientMPCPlanner, LatentPlannerBase, MPPIPlanner, PolicyActor
from torchrl_dreammpc.trainers import BMPCOptimizationStepper, DreamMPCTrainer, TDMPC2OptimizationStepper

__all__ = [
    "make_env",
    "task_info",
    "TDMPC2WorldModel",
    "BMPCWorldModel",
    "BMPCLoss",
    "BMPCPolicyLoss",
    "BMPCOptimizationStepper",
    "DreamerV3WorldModel",
    "WorldModelBase",
    "TDMPC2Loss",
    "TDMPC2PolicyLoss",
    "make_tdmpc2_optimizers",
    "GradientMPCPlanner",
    "MPPIPlanner",
    "PolicyActor",
    "LatentPlannerBase",
    "DreamMPCTrainer",
    "TDMPC2OptimizationStepper",
    "from_tdmpc2_checkpoint",
    "save_tdmpc2_checkpoint",
    "load_any",
    "load_world_model",
    "save_world_model",
]
