"""Online training of latent world models with TorchRL's Trainer: TD-MPC2's update, Dream-MPC's acting."""
from torchrl_dreammpc.trainers.dream_mpc import (
    ConfigMismatchError,
    DreamMPCTrainer,
    find_trainer_checkpoint,
    load_world_model_from_trainer_checkpoint,
    read_fingerprint,
    seed_steps,
    verify_checkpoint_files,
)
from torchrl_dreammpc.trainers.hooks import (
    CollectorCountersState,
    EpisodeReturnLogger,
    EvaluationHook,
    EvaluationProgress,
    MultiLogger,
    WorldModelSnapshots,
    read_eval_csv,
)
from torchrl_dreammpc.trainers.replay import REPLAY_KEYS, TRAJ_KEY, SliceReplayBufferTrainer, make_replay_buffer
from torchrl_dreammpc.trainers.stepper import NonFiniteUpdateError, TDMPC2OptimizationStepper

__all__ = [
    "ConfigMismatchError",
    "CollectorCountersState",
    "DreamMPCTrainer",
    "EpisodeReturnLogger",
    "EvaluationHook",
    "EvaluationProgress",
    "find_trainer_checkpoint",
    "load_world_model_from_trainer_checkpoint",
    "MultiLogger",
    "NonFiniteUpdateError",
    "REPLAY_KEYS",
    "SliceReplayBufferTrainer",
    "TDMPC2OptimizationStepper",
    "TRAJ_KEY",
    "WorldModelSnapshots",
    "make_replay_buffer",
    "read_eval_csv",
    "read_fingerprint",
    "seed_steps",
    "verify_checkpoint_files",
]
