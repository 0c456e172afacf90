"""Online training of latent world models with TorchRL's Trainer: TD-MPC2's or BMPC's update, Dream-MPC's acting."""
from torchrl_dreammpc.trainers.algorithms import ALGORITHM_SPECS, UpdateParts, build_bmpc_update, build_tdmpc2_update
from torchrl_dreammpc.trainers.dream_mpc import (
    ConfigMismatchError,
    DreamMPCTrainer,
    find_trainer_checkpoint,
    load_world_model_from_trainer_checkpoint,
    read_fingerprint,
    seed_steps,
)
from torchrl_dreammpc.trainers.hooks import (
    CollectorCountersState,
    EpisodeReturnLogger,
    EvaluationHook,
    MultiLogger,
    WorldModelSnapshots,
    read_eval_csv,
)
from torchrl_dreammpc.trainers.reanalyze import LazyReanalyze
from torchrl_dreammpc.trainers.replay import (
    EXPERT_KEY,
    EXPERT_KEYS,
    REPLAY_KEYS,
    TRAJ_KEY,
    SliceReplayBufferTrainer,
    make_replay_buffer,
)
from torchrl_dreammpc.trainers.stepper import BMPCOptimizationStepper, TDMPC2OptimizationStepper

__all__ = [
    "ALGORITHM_SPECS",
    "BMPCOptimizationStepper",
    "EXPERT_KEY",
    "EXPERT_KEYS",
    "LazyReanalyze",
    "UpdateParts",
    "build_bmpc_update",
    "build_tdmpc2_update",
    "ConfigMismatchError",
    "CollectorCountersState",
    "DreamMPCTrainer",
    "EpisodeReturnLogger",
    "EvaluationHook",
    "find_trainer_checkpoint",
    "load_world_model_from_trainer_checkpoint",
    "MultiLogger",
    "REPLAY_KEYS",
    "SliceReplayBufferTrainer",
    "TDMPC2OptimizationStepper",
    "TRAJ_KEY",
    "WorldModelSnapshots",
    "make_replay_buffer",
    "read_eval_csv",
    "read_fingerprint",
    "seed_steps",
]
