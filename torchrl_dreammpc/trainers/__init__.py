"""Online training of latent world models with TorchRL's Trainer (TD-MPC2's, BMPC's or DreamerV3's update)."""
from torchrl_dreammpc.trainers.dream_mpc import (
    ALGORITHMS,
    UPDATE_BUILDERS,
    ConfigMismatchError,
    DreamMPCTrainer,
    UpdateParts,
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
    PlannerDiagnosticsLogger,
    WorldModelSnapshots,
    cap_episode_length,
    read_eval_csv,
)
from torchrl_dreammpc.trainers.preemption import stop_on_signals
from torchrl_dreammpc.trainers.reanalyze import LazyReanalyze
from torchrl_dreammpc.trainers.replay import (
    EXPERT_KEY,
    EXPERT_KEYS,
    REPLAY_KEYS,
    TRAJ_KEY,
    SliceReplayBufferTrainer,
    make_replay_buffer,
)
from torchrl_dreammpc.trainers.stepper import BMPCOptimizationStepper, NonFiniteUpdateError, TDMPC2OptimizationStepper

__all__ = [
    "ALGORITHMS",
    "UPDATE_BUILDERS",
    "BMPCOptimizationStepper",
    "EXPERT_KEY",
    "EXPERT_KEYS",
    "LazyReanalyze",
    "UpdateParts",
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
    "PlannerDiagnosticsLogger",
    "REPLAY_KEYS",
    "SliceReplayBufferTrainer",
    "TDMPC2OptimizationStepper",
    "TRAJ_KEY",
    "WorldModelSnapshots",
    "cap_episode_length",
    "make_replay_buffer",
    "read_eval_csv",
    "read_fingerprint",
    "seed_steps",
    "stop_on_signals",
    "verify_checkpoint_files",
]
