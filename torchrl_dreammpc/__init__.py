"""torchrl_dreammpc: TorchRL-native world models, losses and planners for model-based RL (Dream-MPC)."""
# make_env lands with the task suite

__all__ = ["make_env"]
