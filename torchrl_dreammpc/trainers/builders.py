"""From a recipe config (``recipes/config/train.yaml``) to a :class:`DreamMPCTrainer`: validation and builders.

The recipes stay thin (CleanRL-style: read the config, build, train); the mapping from config values to objects
lives here so that it is tested, and reused by ``recipes/evaluate.py``.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from torchrl_dreammpc.modules.world_model import MODEL_SIZES, TDMPC2WorldModel, discount_from_episode_length
from torchrl_dreammpc.planners import GradientMPCPlanner, MPPIPlanner, PolicyActor
from torchrl_dreammpc.trainers.algorithms import ALGORITHM_SPECS
from torchrl_dreammpc.trainers.replay import EXPERT_KEY

__all__ = [
    "PLANNERS",
    "ConfigError",
    "make_planner",
    "make_world_model",
    "resolve_seed_steps",
    "validate_train_config",
    "build_trainer",
]

#: Planner names of the recipes (``planner=<name>``) and their classes.
PLANNERS: dict[str, type] = {"dream_mpc": GradientMPCPlanner, "mppi": MPPIPlanner, "policy": PolicyActor}

#: Dream-MPC's uncertainty weight λ by the family of the model it plans in, when the config leaves it null
#: [Dream-MPC]: 0.01 with TD-MPC2's world models, 0.1 with BMPC's ("Dream-MPC with a strong policy").
DREAM_MPC_UNCERTAINTY_WEIGHT: dict[str, float] = {"tdmpc2": 0.01, "bmpc": 0.1}


class ConfigError(ValueError):
    """An invalid recipe config; the message names the offending key and value."""


def _get(cfg: Mapping, dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if node is None or part not in node:
            return default
        node = node[part]
    return node


def _planner_kwargs(planner_cfg: Mapping, world_model) -> dict[str, Any]:
    kwargs = {key: value for key, value in dict(planner_cfg).items() if key != "name"}
    if "uncertainty_weight" in kwargs and kwargs["uncertainty_weight"] is None:
        family = getattr(world_model, "family", "tdmpc2")
        if planner_cfg.get("name") == "dream_mpc" and family in DREAM_MPC_UNCERTAINTY_WEIGHT:
            kwargs["uncertainty_weight"] = DREAM_MPC_UNCERTAINTY_WEIGHT[family]
        else:
            del kwargs["uncertainty_weight"]  # the planner's own default
    return kwargs


def make_planner(planner_cfg: Mapping, world_model, *, action_spec=None, expert_key=None):
    """Builds the actor named ``planner_cfg["name"]`` (``dream_mpc``, ``mppi`` or ``policy``) over a world model.

    Every other entry of ``planner_cfg`` is passed to the planner's constructor (which validates it); a null
    ``uncertainty_weight`` of Dream-MPC is the published λ of the model's family
    (:data:`DREAM_MPC_UNCERTAINTY_WEIGHT`). ``expert_key``: the planner also writes its action distribution there
    (BMPC's training).

    Raises:
        ConfigError: for an unknown planner name.
    """
    name = planner_cfg.get("name")
    if name not in PLANNERS:
        raise ConfigError(f"Unknown planner {name!r}; choose one of {sorted(PLANNERS)}.")
    extra = {} if expert_key is None else {"expert_key": expert_key}
    return PLANNERS[name](world_model, action_spec=action_spec, **_planner_kwargs(planner_cfg, world_model), **extra)


def make_world_model(model_cfg: Mapping, obs_dim: int, action_dim: int, *, episode_length: int, episodic: bool,
                     discount: float | None = None, device: str | torch.device = "cpu",
                     algorithm: str = "tdmpc2") -> TDMPC2WorldModel:
    """The world model of ``algorithm`` (a :class:`TDMPC2WorldModel`, or a ``BMPCWorldModel`` for ``"bmpc"``) from
    the ``model`` config node (``size`` + any field of the family's config).

    The discount follows TD-MPC2's heuristic from the episode length unless given; ``episodic`` turns on the
    termination head (TD-MPC2's ``episodic`` flag, set by the task) unless the node sets ``episodic`` itself
    (BMPC's config: false).
    """
    overrides = {key: value for key, value in dict(model_cfg).items() if key != "size" and value is not None}
    episodic = overrides.pop("episodic", episodic)
    size = int(model_cfg["size"])
    if discount is None:
        discount = discount_from_episode_length(episode_length)
    model_class = ALGORITHM_SPECS[algorithm].world_model_class
    return model_class(obs_dim, action_dim, model_size=size, discount=discount, episodic=episodic,
                       **overrides).to(device)


def resolve_seed_steps(cfg: Mapping, episode_length: int) -> int:
    """``cfg.seed_steps`` if set, else TD-MPC2's ``max(1000, 5 * episode_length)``."""
    from torchrl_dreammpc.trainers.dream_mpc import seed_steps

    value = cfg.get("seed_steps")
    return seed_steps(episode_length) if value is None else int(value)


def validate_train_config(cfg: Mapping) -> dict[str, Any]:
    """Checks a training config before anything is built; returns facts derived on the way.

    Checks, in order: the algorithm; the planner name; the task (through :func:`~torchrl_dreammpc.envs.task_info`, whose
    ``ValueError`` names the task); the model size; positive integers (steps, batch size, horizon, eval
    episodes, workers, intervals); a positive learning rate; that the run is longer than the seed phase; the
    collector backend; and the planner's own arguments (by building it over a tiny throw-away model).

    Returns:
        ``{"task_info": TaskInfo, "seed_steps": int}``.

    Raises:
        ConfigError (a ``ValueError``): naming the offending key and value.
    """
    from torchrl_dreammpc.envs import task_info

    from torchrl_dreammpc.trainers.dream_mpc import ALGORITHMS

    algorithm = cfg.get("algorithm", "tdmpc2")
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"Unknown algorithm {algorithm!r} (algorithm=...); choose one of {list(ALGORITHMS)}.")
    planner = _get(cfg, "planner.name")
    if planner not in PLANNERS:
        raise ConfigError(f"Unknown planner {planner!r} (planner=...); choose one of {sorted(PLANNERS)}.")
    try:
        info = task_info(cfg["task"])
    except ValueError as err:  # UnknownTaskError / TaskNotAvailableError name the task
        raise ConfigError(f"task={cfg['task']!r}: {err}") from err
    size = _get(cfg, "model.size")
    if size not in MODEL_SIZES:
        raise ConfigError(f"Unknown model_size {size!r}; choose one of {sorted(MODEL_SIZES)}.")
    for key in ("steps", "batch_size", "horizon", "eval_episodes", "collector.num_workers",
                "collector.frames_per_batch", "checkpoint_interval", "keep_checkpoints", "log_interval"):
        value = _get(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}.")
    for key in ("eval_interval", "snapshot_interval"):
        value = _get(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{key} must be an integer >= 0, got {value!r}.")
    for key in ("lr", "utd_ratio"):
        value = _get(cfg, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{key} must be a positive number, got {value!r}.")
    for key in ("enc_lr_scale", "grad_clip", "tau"):
        value = _get(cfg, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{key} must be a positive number, got {value!r}.")
    seed_steps = resolve_seed_steps(cfg, info.episode_length)
    if seed_steps < 1:
        raise ConfigError(f"seed_steps must be >= 1, got {seed_steps}.")
    if cfg["steps"] <= seed_steps:
        raise ConfigError(
            f"steps={cfg['steps']} must exceed the seed phase of {seed_steps} random-action steps "
            f"(seed_steps; TD-MPC2's max(1000, 5 * episode_length) = {max(1000, 5 * info.episode_length)} for "
            f"{info.task}): the planner would never act."
        )
    pretrain = cfg.get("pretrain_updates")
    if pretrain is not None and (isinstance(pretrain, bool) or not isinstance(pretrain, int) or pretrain < 0):
        raise ConfigError(f"pretrain_updates must be an integer >= 0 (or null), got {pretrain!r}.")
    backend = _get(cfg, "collector.backend")
    if backend not in ("local", "ray"):
        raise ConfigError(f"collector.backend must be 'local' or 'ray', got {backend!r}.")
    # The planner validates its own arguments: build it over a tiny model (milliseconds) before any real work.
    tiny = ALGORITHM_SPECS[algorithm].world_model_class(2, 1, model_size=1, enc_dim=8, mlp_dim=8, latent_dim=8)
    try:
        make_planner(cfg["planner"], tiny)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"planner={planner}: {err}") from err
    _validate_algorithm_options(cfg, algorithm, tiny)
    return {"task_info": info, "seed_steps": seed_steps}


def _algorithm_options(cfg: Mapping) -> tuple[bool, dict[str, Any]]:
    """``(acting_expert, the update builder's extra arguments)`` from ``cfg.algorithm_options``."""
    options = dict(cfg.get("algorithm_options") or {})
    return bool(options.pop("acting_expert", False)), options


def _validate_algorithm_options(cfg: Mapping, algorithm: str, tiny) -> None:
    """The algorithm's own settings (losses, BMPC's reanalyze), by building its update over a tiny model."""
    options = cfg.get("algorithm_options") or {}
    acting_expert = options.get("acting_expert", False)
    if not isinstance(acting_expert, bool):
        raise ConfigError(f"algorithm_options.acting_expert must be true or false, got {acting_expert!r}.")
    if acting_expert and algorithm != "bmpc":
        raise ConfigError(f"algorithm_options.acting_expert only applies to algorithm=bmpc, not {algorithm!r}.")
    reanalyze = dict(options.get("reanalyze") or {})
    for key, low in (("interval", 0), ("num_slices", 1)):
        value = reanalyze.get(key, low)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"algorithm_options.reanalyze.{key} must be an integer >= {low}, got {value!r}.")
    if reanalyze.get("num_slices", 0) > cfg["batch_size"]:
        raise ConfigError(f"algorithm_options.reanalyze.num_slices={reanalyze['num_slices']} exceeds "
                          f"batch_size={cfg['batch_size']}: only sampled sub-trajectories can be reanalyzed.")
    _, extra = _algorithm_options(cfg)
    try:
        ALGORITHM_SPECS[algorithm].build_update(tiny, loss_kwargs=dict(cfg.get("loss") or {}),
                                                policy_loss_kwargs=dict(cfg.get("policy_loss") or {}), **extra)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"algorithm={algorithm} (loss / policy_loss / algorithm_options): {err}") from err


def build_trainer(cfg: Mapping, *, checked: Mapping[str, Any] | None = None):
    """Builds the :class:`DreamMPCTrainer` a training config describes (validating it first).

    Returns:
        ``(trainer, world_model)``.
    """
    from torchrl_dreammpc.envs import make_env
    from torchrl_dreammpc.trainers.dream_mpc import DreamMPCTrainer

    checked = checked or validate_train_config(cfg)
    info = checked["task_info"]
    device = cfg.get("device") or "cpu"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    seed = int(cfg["seed"])
    torch.manual_seed(seed)  # model initialization
    create_env = functools.partial(make_env, info.task, seed=seed)
    probe = create_env()
    obs_dim = int(probe.observation_spec["observation"].shape[-1])
    action_spec = probe.action_spec
    action_dim = int(action_spec.shape[-1])
    probe.close()
    algorithm = cfg.get("algorithm", "tdmpc2")
    acting_expert, algorithm_kwargs = _algorithm_options(cfg)
    world_model = make_world_model(cfg["model"], obs_dim, action_dim, episode_length=info.episode_length,
                                   episodic=info.episodic, discount=cfg.get("discount"), device=device,
                                   algorithm=algorithm)
    actor = make_planner(cfg["planner"], world_model, action_spec=action_spec,
                         expert_key=EXPERT_KEY if acting_expert else None)
    # Evaluation uses a second planner instance over the same model: the training planner's warm start (its
    # previous plan) must not leak into or out of evaluation episodes.
    eval_actors = {cfg["planner"]["name"]: make_planner(cfg["planner"], world_model, action_spec=action_spec)}
    for name, planner_cfg in (cfg.get("eval_planners") or {}).items():
        eval_actors[name] = make_planner(planner_cfg, world_model, action_spec=action_spec)
    run_dir = Path(cfg["run_dir"])
    collector = cfg["collector"]
    trainer = DreamMPCTrainer(
        create_env_fn=create_env,
        world_model=world_model,
        actor=actor,
        total_frames=int(cfg["steps"]),
        batch_size=int(cfg["batch_size"]),
        horizon=int(cfg["horizon"]),
        buffer_capacity=cfg.get("buffer_size"),
        seed=seed,
        episode_length=info.episode_length,
        seed_frames=checked["seed_steps"],
        pretrain_updates=cfg.get("pretrain_updates"),
        utd_ratio=float(cfg["utd_ratio"]),
        frames_per_batch=int(collector["frames_per_batch"]),
        lr=float(cfg["lr"]),
        enc_lr_scale=float(cfg["enc_lr_scale"]),
        grad_clip=float(cfg["grad_clip"]),
        tau=float(cfg["tau"]),
        algorithm=algorithm,
        algorithm_kwargs=algorithm_kwargs,
        compile=cfg.get("compile", False),
        loss_kwargs=dict(cfg.get("loss") or {}),
        policy_loss_kwargs=dict(cfg.get("policy_loss") or {}),
        eval_interval=int(cfg["eval_interval"]),
        eval_episodes=int(cfg["eval_episodes"]),
        eval_actors=eval_actors,
        eval_at_start=bool(cfg.get("eval_at_start", True)),
        log_dir=run_dir,
        log_interval=int(cfg["log_interval"]),
        checkpoint_dir=run_dir / "checkpoints",
        checkpoint_interval=int(cfg["checkpoint_interval"]),
        keep_checkpoints=int(cfg["keep_checkpoints"]),
        snapshot_interval=int(cfg.get("snapshot_interval") or 0),
        num_workers=int(collector["num_workers"]),
        collector_backend=collector["backend"],
        ray_init_config=dict(collector.get("ray_init_config") or {}),
        replay_memmap=bool(cfg.get("replay_memmap", False)),
        device=device,
        task=info.task,
        planner_name=cfg["planner"]["name"],
        progress_bar=bool(cfg.get("progress_bar", False)),
    )
    return trainer, world_model
