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

__all__ = [
    "PLANNERS",
    "ConfigError",
    "make_actor",
    "make_dreamer_world_model",
    "make_planner",
    "make_world_model",
    "resolve_seed_steps",
    "update_arguments",
    "validate_train_config",
    "build_trainer",
]

#: Planner names of the recipes (``planner=<name>``) and their classes.
PLANNERS: dict[str, type] = {"dream_mpc": GradientMPCPlanner, "mppi": MPPIPlanner, "policy": PolicyActor}


class ConfigError(ValueError):
    """An invalid recipe config; the message names the offending key and value."""


def _get(cfg: Mapping, dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if node is None or part not in node:
            return default
        node = node[part]
    return node


def _planner_kwargs(planner_cfg: Mapping) -> dict[str, Any]:
    return {key: value for key, value in dict(planner_cfg).items() if key != "name"}


def make_planner(planner_cfg: Mapping, world_model, *, action_spec=None):
    """Builds the actor named ``planner_cfg["name"]`` (``dream_mpc``, ``mppi`` or ``policy``) over a world model.

    Every other entry of ``planner_cfg`` is passed to the planner's constructor (which validates it).

    Raises:
        ConfigError: for an unknown planner name.
    """
    name = planner_cfg.get("name")
    if name not in PLANNERS:
        raise ConfigError(f"Unknown planner {name!r}; choose one of {sorted(PLANNERS)}.")
    return PLANNERS[name](world_model, action_spec=action_spec, **_planner_kwargs(planner_cfg))


def make_actor(planner_cfg: Mapping, world_model, *, action_spec=None):
    """The module that acts in an env: :func:`make_planner` behind the world model's acting path
    (:meth:`~torchrl_dreammpc.modules.WorldModelBase.acting_module`: the planner itself for TD-MPC2, the RSSM state
    estimator in front of it for DreamerV3)."""
    return world_model.acting_module(make_planner(planner_cfg, world_model, action_spec=action_spec))


def make_dreamer_world_model(dreamer_cfg: Mapping, obs_dim: int, action_dim: int, *,
                             device: str | torch.device = "cpu"):
    """A :class:`~torchrl_dreammpc.modules.DreamerV3WorldModel` from the ``dreamer`` config node (``model_size``,
    ``horizon`` → ``discount = 1 - 1/horizon``, and any :class:`~torchrl_dreammpc.modules.DreamerV3Config` field
    under ``model``)."""
    from torchrl_dreammpc.modules.dreamer import DreamerV3WorldModel

    overrides = {key: value for key, value in dict(dreamer_cfg.get("model") or {}).items() if value is not None}
    overrides.setdefault("discount", 1.0 - 1.0 / float(dreamer_cfg["horizon"]))
    return DreamerV3WorldModel(obs_dim, action_dim, model_size=str(dreamer_cfg["model_size"]), **overrides).to(device)


def make_world_model(model_cfg: Mapping, obs_dim: int, action_dim: int, *, episode_length: int, episodic: bool,
                     discount: float | None = None, device: str | torch.device = "cpu") -> TDMPC2WorldModel:
    """A :class:`TDMPC2WorldModel` from the ``model`` config node (``size`` + any :class:`TDMPC2Config` field).

    The discount follows TD-MPC2's heuristic from the episode length unless given; ``episodic`` turns on the
    termination head (TD-MPC2's ``episodic`` flag, set by the task).
    """
    overrides = {key: value for key, value in dict(model_cfg).items() if key != "size" and value is not None}
    size = int(model_cfg["size"])
    if discount is None:
        discount = discount_from_episode_length(episode_length)
    return TDMPC2WorldModel(obs_dim, action_dim, model_size=size, discount=discount, episodic=episodic,
                            **overrides).to(device)


def resolve_seed_steps(cfg: Mapping, episode_length: int) -> int:
    """``cfg.seed_steps`` if set, else TD-MPC2's ``max(1000, 5 * episode_length)``. With ``algorithm=dreamer_v3``:
    ``dreamer.seed_steps`` if set, else one batch of sequences, ``batch_size * batch_length`` (the warm-up of
    TorchRL's DreamerV3 DMC recipe)."""
    from torchrl_dreammpc.trainers.dream_mpc import seed_steps

    if cfg.get("algorithm") == "dreamer_v3":
        dreamer = cfg["dreamer"]
        value = dreamer.get("seed_steps")
        return int(dreamer["batch_size"]) * int(dreamer["batch_length"]) if value is None else int(value)
    value = cfg.get("seed_steps")
    return seed_steps(episode_length) if value is None else int(value)


def _validate_dreamer(cfg: Mapping) -> None:
    """The ``dreamer`` node of ``algorithm=dreamer_v3`` (the model is checked by building its config)."""
    from torchrl_dreammpc.modules.dreamer import DREAMER_V3_SIZES, DreamerV3Config

    dreamer = cfg.get("dreamer")
    if not isinstance(dreamer, Mapping):
        raise ConfigError("algorithm=dreamer_v3 needs its `dreamer` config node "
                          "(recipes/config/algorithm/dreamer_v3.yaml).")
    if str(dreamer.get("model_size")) not in DREAMER_V3_SIZES:
        raise ConfigError(f"Unknown dreamer.model_size {dreamer.get('model_size')!r}; choose one of "
                          f"{list(DREAMER_V3_SIZES)}.")
    for key in ("batch_size", "batch_length"):
        value = dreamer.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"dreamer.{key} must be a positive integer, got {value!r}.")
    for key in ("train_ratio", "horizon"):
        value = dreamer.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"dreamer.{key} must be a positive number, got {value!r}.")
    if dreamer["horizon"] <= 1:
        raise ConfigError(f"dreamer.horizon must be > 1 (discount = 1 - 1/horizon), got {dreamer['horizon']!r}.")
    pretrain = dreamer.get("pretrain_updates")
    if isinstance(pretrain, bool) or not isinstance(pretrain, int) or pretrain < 0:
        raise ConfigError(f"dreamer.pretrain_updates must be an integer >= 0, got {pretrain!r}.")
    lr = (dreamer.get("optimizer") or {}).get("lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"dreamer.optimizer.lr must be a positive number, got {lr!r}.")
    if cfg.get("compile"):
        raise ConfigError("compile=true is not supported with algorithm=dreamer_v3 (its update runs eagerly).")
    import inspect

    from torchrl_dreammpc.objectives.dreamer_v3 import DreamerV3TrainingLoss
    from torchrl_dreammpc.trainers.dreamer_v3 import OPTIMIZER_DEFAULTS

    known = {"loss": set(inspect.signature(DreamerV3TrainingLoss).parameters) - {"world_model"},
             "optimizer": set(OPTIMIZER_DEFAULTS)}
    for node, names in known.items():
        unknown = sorted(set(dreamer.get(node) or {}) - names)
        if unknown:
            raise ConfigError(f"Unknown dreamer.{node} key(s) {unknown}; known: {sorted(names)}.")
    try:
        overrides = {key: value for key, value in dict(dreamer.get("model") or {}).items() if value is not None}
        DreamerV3Config.from_size(2, 1, str(dreamer["model_size"]), **overrides)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"dreamer.model: {err}") from err


def update_arguments(cfg: Mapping, checked: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`DreamMPCTrainer` arguments of the update the config's ``algorithm`` describes.

    ``tdmpc2``: the top-level keys (``batch_size``, ``horizon``, ``utd_ratio``, ``lr``...) and ``loss`` /
    ``policy_loss``. ``dreamer_v3``: the ``dreamer`` node: ``batch_size`` sequences of ``batch_length`` steps,
    ``train_ratio`` replayed steps per env step (so ``train_ratio / (batch_size * batch_length)`` updates per
    step), the optimizer and the loss arguments.
    """
    algorithm = cfg.get("algorithm", "tdmpc2")
    if algorithm == "dreamer_v3":
        dreamer = cfg["dreamer"]
        optimizer = dict(dreamer.get("optimizer") or {})
        batch, length = int(dreamer["batch_size"]), int(dreamer["batch_length"])
        return dict(batch_size=batch, horizon=length, seed_frames=checked["seed_steps"],
                    pretrain_updates=int(dreamer["pretrain_updates"]),
                    utd_ratio=float(dreamer["train_ratio"]) / (batch * length), lr=float(optimizer.pop("lr")),
                    algorithm=algorithm, loss_kwargs={**optimizer, **dict(dreamer.get("loss") or {})})
    return dict(batch_size=int(cfg["batch_size"]), horizon=int(cfg["horizon"]), seed_frames=checked["seed_steps"],
                pretrain_updates=cfg.get("pretrain_updates"), utd_ratio=float(cfg["utd_ratio"]), lr=float(cfg["lr"]),
                enc_lr_scale=float(cfg["enc_lr_scale"]), grad_clip=float(cfg["grad_clip"]), tau=float(cfg["tau"]),
                algorithm=algorithm, compile=cfg.get("compile", False), loss_kwargs=dict(cfg.get("loss") or {}),
                policy_loss_kwargs=dict(cfg.get("policy_loss") or {}))


def validate_train_config(cfg: Mapping) -> dict[str, Any]:
    """Checks a training config before anything is built; returns facts derived on the way.

    Checks, in order: the algorithm (and, for ``dreamer_v3``, its ``dreamer`` node); the planner name; the task
    (through :func:`~torchrl_dreammpc.envs.task_info`, whose ``ValueError`` names the task); the model size;
    positive integers (steps, batch size, horizon, eval episodes, workers, intervals); a positive learning rate;
    that the run is longer than the seed phase; the collector backend; and the planner's own arguments (by building
    it over a tiny throw-away model).

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
    if algorithm == "dreamer_v3":
        _validate_dreamer(cfg)
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
    tiny = TDMPC2WorldModel(2, 1, model_size=1, enc_dim=8, mlp_dim=8, latent_dim=8)
    try:
        make_planner(cfg["planner"], tiny)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"planner={planner}: {err}") from err
    return {"task_info": info, "seed_steps": seed_steps}


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
    if cfg.get("algorithm") == "dreamer_v3":
        world_model = make_dreamer_world_model(cfg["dreamer"], obs_dim, action_dim, device=device)
    else:
        world_model = make_world_model(cfg["model"], obs_dim, action_dim, episode_length=info.episode_length,
                                       episodic=info.episodic, discount=cfg.get("discount"), device=device)
    actor = make_actor(cfg["planner"], world_model, action_spec=action_spec)
    # Evaluation uses a second planner instance over the same model: the training planner's warm start (its
    # previous plan) must not leak into or out of evaluation episodes.
    eval_actors = {cfg["planner"]["name"]: make_actor(cfg["planner"], world_model, action_spec=action_spec)}
    for name, planner_cfg in (cfg.get("eval_planners") or {}).items():
        eval_actors[name] = make_actor(planner_cfg, world_model, action_spec=action_spec)
    run_dir = Path(cfg["run_dir"])
    collector = cfg["collector"]
    trainer = DreamMPCTrainer(
        create_env_fn=create_env,
        world_model=world_model,
        actor=actor,
        total_frames=int(cfg["steps"]),
        **update_arguments(cfg, checked),
        buffer_capacity=cfg.get("buffer_size"),
        seed=seed,
        episode_length=info.episode_length,
        frames_per_batch=int(collector["frames_per_batch"]),
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
