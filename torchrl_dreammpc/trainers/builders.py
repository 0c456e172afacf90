"""From a recipe config (``recipes/config/train.yaml``) to a :class:`DreamMPCTrainer`: validation and builders.

The recipes stay thin (CleanRL-style: read the config, build, train); the mapping from config values to objects
lives here so that it is tested, and reused by ``recipes/evaluate.py``.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from torchrl_dreammpc._checks import check_compile
from torchrl_dreammpc.checkpoints import FAMILIES
from torchrl_dreammpc.modules.world_model import MODEL_SIZES, TDMPC2WorldModel, discount_from_episode_length
from torchrl_dreammpc.planners import GradientMPCPlanner, MPPIPlanner, PolicyActor
from torchrl_dreammpc.trainers.replay import EXPERT_KEY

__all__ = [
    "PLANNERS",
    "ConfigError",
    "check_device",
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
    kwargs = {key: value for key, value in dict(planner_cfg).items() if key != "name"}
    if "uncertainty_weight" in kwargs and kwargs["uncertainty_weight"] is None:
        del kwargs["uncertainty_weight"]  # null: the planner's own default (Dream-MPC's: by the model's family)
    return kwargs


def make_planner(planner_cfg: Mapping, world_model, *, action_spec=None, expert_key=None):
    """Builds the actor named ``planner_cfg["name"]`` (``dream_mpc``, ``mppi`` or ``policy``) over a world model.

    Every other entry of ``planner_cfg`` is passed to the planner's constructor (which validates it; Dream-MPC's
    null ``uncertainty_weight`` is the published λ of the model's family, 0.01 with TD-MPC2's, 0.1 with BMPC's:
    :data:`~torchrl_dreammpc.planners.gradient.UNCERTAINTY_WEIGHT_BY_FAMILY`). ``expert_key``: the planner also
    writes its action distribution there (BMPC's training).

    Raises:
        ConfigError: for an unknown planner name.
    """
    name = planner_cfg.get("name")
    if name not in PLANNERS:
        raise ConfigError(f"Unknown planner {name!r}; choose one of {sorted(PLANNERS)}.")
    extra = {} if expert_key is None else {"expert_key": expert_key}
    return PLANNERS[name](world_model, action_spec=action_spec, **_planner_kwargs(planner_cfg), **extra)


def make_actor(planner_cfg: Mapping, world_model, *, action_spec=None, expert_key=None):
    """The module that acts in an env: :func:`make_planner` behind the world model's acting path
    (:meth:`~torchrl_dreammpc.modules.WorldModelBase.acting_module`: the planner itself for TD-MPC2 and BMPC, the
    RSSM state estimator in front of it for DreamerV3)."""
    planner = make_planner(planner_cfg, world_model, action_spec=action_spec, expert_key=expert_key)
    return world_model.acting_module(planner)


def make_dreamer_world_model(dreamer_cfg: Mapping, obs_dim: int, action_dim: int, *,
                             device: str | torch.device = "cpu"):
    """A :class:`~torchrl_dreammpc.modules.DreamerV3WorldModel` from the ``dreamer`` config node (``model_size``,
    ``horizon`` → ``discount = 1 - 1/horizon``, and any :class:`~torchrl_dreammpc.modules.DreamerV3Config` field
    under ``model``)."""
    from torchrl_dreammpc.modules.dreamer import DreamerV3WorldModel

    overrides = {key: value for key, value in dict(dreamer_cfg.get("model") or {}).items() if value is not None}
    overrides.setdefault("discount", 1.0 - 1.0 / float(dreamer_cfg["horizon"]))
    return DreamerV3WorldModel(obs_dim, action_dim, model_size=str(dreamer_cfg["model_size"]), **overrides).to(device)


def _family_of_model_node(algorithm: str) -> str:
    """The family whose config the ``model`` node describes: BMPC's for ``algorithm=bmpc``, else TD-MPC2's
    (``dreamer_v3`` keeps its model in its ``dreamer`` node; the planners are then checked over a TD-MPC2 model)."""
    return "bmpc" if algorithm == "bmpc" else "tdmpc2"


def _model_episodic(family: str, task_episodic: bool) -> bool:
    """TD-MPC2's ``episodic`` flag (a termination head) comes from the task. BMPC has no termination model (its value
    target is model-based; its code has no ``episodic`` flag and trains tasks whose episodes end early, e.g.
    HumanoidBench, as if they continued): its models are never episodic."""
    return bool(task_episodic) and family != "bmpc"


def make_world_model(model_cfg: Mapping, obs_dim: int, action_dim: int, *, episode_length: int, episodic: bool,
                     discount: float | None = None, device: str | torch.device = "cpu",
                     algorithm: str = "tdmpc2") -> TDMPC2WorldModel:
    """The world model ``algorithm`` trains (a :class:`TDMPC2WorldModel`, or a ``BMPCWorldModel`` for ``"bmpc"``)
    from the ``model`` config node (``size`` + any field of the family's config).

    The discount follows TD-MPC2's heuristic from the episode length unless given; ``episodic`` (the task's flag)
    turns on TD-MPC2's termination head (BMPC's models have none).
    """
    family = _family_of_model_node(algorithm)
    overrides = {key: value for key, value in dict(model_cfg).items() if key != "size" and value is not None}
    size = int(model_cfg["size"])
    if discount is None:
        discount = discount_from_episode_length(episode_length)
    return FAMILIES[family][1](obs_dim, action_dim, model_size=size, discount=discount,
                               episodic=_model_episodic(family, episodic), **overrides).to(device)


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


def resolve_episodic(cfg: Mapping, info) -> bool:
    """``cfg.episodic`` if set, else the task's flag: whether an early episode end (a fall) is a terminal state
    (TD-MPC2's ``episodic``: a termination head, ``(1 − terminated)`` in the TD target) or, with ``false``, ends
    the episode as a time limit would (the target bootstraps through it: HumanoidBench's and BMPC's TD-MPC2 runs)."""
    value = cfg.get("episodic")
    return bool(info.episodic) if value is None else bool(value)


def resolve_replay_whole_episodes(cfg: Mapping) -> bool:
    """``cfg.replay_whole_episodes`` if set, else the algorithm's own replay: whole episodes (written when they
    end) with ``tdmpc2`` and ``bmpc``, as TD-MPC2 and BMPC add an episode to their buffer at its end; each step as
    it comes with ``dreamer_v3``, as DreamerV3 adds every step to its replay."""
    value = cfg.get("replay_whole_episodes")
    if value is None:
        return cfg.get("algorithm", "tdmpc2") != "dreamer_v3"
    return bool(value)


def _positive_int(cfg: Mapping, key: str, minimum: int = 1, nullable: bool = False) -> int | None:
    value = _get(cfg, key)
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}{' (or null)' if nullable else ''}, got {value!r}.")
    return value


def _number(cfg: Mapping, key: str, low: float = 0.0, high: float | None = None,
            nullable: bool = False) -> float | None:
    """A finite number in ``(low, high]``: refuses bools, strings, NaN and ±inf."""
    value = _get(cfg, key)
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= low \
            or (high is not None and value > high):
        where = f"in ({low:g}, {high:g}]" if high is not None else f"> {low:g}"
        raise ConfigError(f"{key} must be a finite number {where}{' (or null)' if nullable else ''}, got {value!r}.")
    return float(value)


def _boolean(cfg: Mapping, key: str) -> bool:
    value = _get(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}.")
    return value


#: TDMPC2Config fields that a run derives itself (from the env, the task, ``model_size=`` and ``discount=``).
_DERIVED_MODEL_FIELDS = {"obs_dim": "the env", "action_dim": "the env", "model_size": "model_size=",
                         "episodic": "the task and episodic=", "discount": "discount="}
#: Eval-planner names become file names (``eval_<name>.csv``) and logger keys.
_PLANNER_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _check_model(cfg: Mapping, info, algorithm: str) -> TDMPC2WorldModel:
    """Checks the ``model`` node as the family's config (:class:`TDMPC2Config`, ``BMPCConfig``) does, without
    allocating the model, and returns a tiny throw-away model of that family with the run's value-ensemble size
    and termination head (planners and losses check against those)."""
    family = _family_of_model_node(algorithm)
    config_class, model_class = FAMILIES[family]
    model = dict(_get(cfg, "model") or {})
    size = model.pop("size", None)
    if size not in MODEL_SIZES:
        raise ConfigError(f"Unknown model_size {size!r}; choose one of {sorted(MODEL_SIZES)}.")
    overrides = {key: value for key, value in model.items() if value is not None}
    for key, source in _DERIVED_MODEL_FIELDS.items():
        if key in overrides:
            raise ConfigError(f"model.{key} cannot be set: it comes from {source}.")
    try:
        config = config_class.from_size(2, 1, size, **overrides)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model (model_size={size}): {err}") from err
    return model_class(2, 1, model_size=size, enc_dim=8, mlp_dim=8, latent_dim=8, num_enc_layers=1,
                       num_q=config.num_q, episodic=_model_episodic(family, resolve_episodic(cfg, info)))


def _check_planner(label: str, planner_cfg, tiny) -> str:
    if not isinstance(planner_cfg, Mapping):
        raise ConfigError(f"{label} must be a planner config with a name (e.g. {{name: policy}}), got {planner_cfg!r}.")
    name = planner_cfg.get("name")
    if name not in PLANNERS:
        raise ConfigError(f"Unknown planner {name!r} ({label}.name); choose one of {sorted(PLANNERS)}.")
    try:  # the planner validates its own arguments: build it over the tiny model (milliseconds)
        make_planner(planner_cfg, tiny)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{label}={name}: {err}") from err
    return name


def _check_dreamer_sequences_fit(cfg: Mapping, info) -> None:
    """Without ``dreamer.replay_across_episodes`` the Dreamer replay samples ``dreamer.batch_length``-step sequences
    within one episode (TorchRL's ``SliceSampler``, strict length): episodes shorter than that are never replayed,
    and none at all would leave the replay buffer without a sequence. With it, sequences run across episode ends
    (DreamerV3's windows), which reads one env's steps in the order they were collected."""
    dreamer = cfg["dreamer"]
    length = int(dreamer["batch_length"])
    if dreamer.get("replay_across_episodes", False):
        workers, backend = _get(cfg, "collector.num_workers", 1), _get(cfg, "collector.backend", "local")
        if workers != 1 or backend != "local" or cfg.get("replay_whole_episodes"):
            raise ConfigError("dreamer.replay_across_episodes=true reads one env's steps in the order they were "
                              f"collected: it needs collector.num_workers=1 (got {workers!r}), collector.backend="
                              f"local (got {backend!r}) and replay_whole_episodes=false.")
        return
    if info.episodic:
        raise ConfigError(
            f"algorithm=dreamer_v3 on {info.task}: its episodes can end early (a terminal state, e.g. a fall), and "
            f"the Dreamer replay samples dreamer.batch_length={length}-step sequences within one episode, so the "
            "shorter episodes, the terminations among them, would never be replayed. Set "
            "dreamer.replay_across_episodes=true (sequences across episode ends, as DreamerV3's replay).")
    if length > info.episode_length:
        raise ConfigError(f"dreamer.batch_length={length} is longer than an episode of {info.task} "
                          f"({info.episode_length} steps): the replay samples sequences within one episode "
                          "(dreamer.replay_across_episodes=true: across episode ends).")


#: The ``dreamer`` node's replay switches, passed to the update as they are (``algorithm_kwargs``).
DREAMER_REPLAY_OPTIONS = ("replay_across_episodes", "replay_context", "replay_online")


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
    for key in DREAMER_REPLAY_OPTIONS:
        if not isinstance(dreamer.get(key, False), bool):
            raise ConfigError(f"dreamer.{key} must be true or false, got {dreamer.get(key)!r}.")
    for key in ("replay_context", "replay_online"):
        if dreamer.get(key, False) and not dreamer.get("replay_across_episodes", False):
            raise ConfigError(f"dreamer.{key}=true needs dreamer.replay_across_episodes=true (DreamerV3's replay: "
                              "windows over the stream of steps, across episode ends).")
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
    from torchrl_dreammpc.trainers.dreamer_v3 import OPTIMIZER_DEFAULTS, REPLAY_LOSS_KEYS

    # The replay's keys (first_key, context_key) follow the dreamer.replay_* switches, which also set what is stored.
    replay_keys = set(REPLAY_LOSS_KEYS) & set(dreamer.get("loss") or {})
    if replay_keys:
        raise ConfigError(f"dreamer.loss.{sorted(replay_keys)[0]} is set by the replay switches "
                          "(dreamer.replay_across_episodes, dreamer.replay_context), not in dreamer.loss.")
    known = {"loss": set(inspect.signature(DreamerV3TrainingLoss).parameters) - {"world_model"}
             - set(REPLAY_LOSS_KEYS), "optimizer": set(OPTIMIZER_DEFAULTS)}
    for node, names in known.items():
        unknown = sorted(set(dreamer.get(node) or {}) - names)
        if unknown:
            raise ConfigError(f"Unknown dreamer.{node} key(s) {unknown}; known: {sorted(names)}.")
    try:
        overrides = {key: value for key, value in dict(dreamer.get("model") or {}).items() if value is not None}
        DreamerV3Config.from_size(2, 1, str(dreamer["model_size"]), **overrides)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"dreamer.model: {err}") from err


#: train.yaml's keys of the TD-MPC2 family's update and model (tdmpc2, bmpc), which ``algorithm=dreamer_v3`` does
#: not read, each with the DreamerV3 setting closest to it (``None``: none).
DREAMER_V3_EQUIVALENTS: dict[str, str | None] = {
    "batch_size": "dreamer.batch_size",
    "horizon": "dreamer.batch_length (the replayed sequence length)",
    "lr": "dreamer.optimizer.lr",
    "enc_lr_scale": None,
    "grad_clip": "dreamer.optimizer.agc (adaptive gradient clipping)",
    "tau": "dreamer.optimizer.slow_critic_rate",
    "utd_ratio": "dreamer.train_ratio (replayed steps per env step)",
    "seed_steps": "dreamer.seed_steps",
    "pretrain_updates": "dreamer.pretrain_updates",
    "discount": "dreamer.horizon (discount = 1 - 1/horizon)",
    "model_size": "dreamer.model_size",
    "model": "dreamer.model.*",
}


def check_keys_apply(algorithm: str, set_keys: Mapping[str, str]) -> None:
    """Refuses keys that were set (``{key: where}``, e.g. ``{"lr": "the command line"}``; dotted keys count by their
    first part) but that ``algorithm`` does not read: with ``algorithm=dreamer_v3`` the TD-MPC2 family's keys,
    which would otherwise be silently ignored. The message names each key and its DreamerV3 counterpart."""
    if algorithm != "dreamer_v3":
        return
    ignored = {}
    for key, where in set_keys.items():
        top = key.split(".")[0]
        if top in DREAMER_V3_EQUIVALENTS:
            ignored.setdefault(top, (key, where))
    if ignored:
        lines = [f"{key} (set by {where}): " + (f"use {DREAMER_V3_EQUIVALENTS[top]}" if DREAMER_V3_EQUIVALENTS[top]
                                                else "DreamerV3 has no such setting")
                 for top, (key, where) in ignored.items()]
        raise ConfigError("algorithm=dreamer_v3 does not read these TD-MPC2 settings: " + "; ".join(lines)
                          + " (recipes/config/algorithm/dreamer_v3.yaml).")


def update_arguments(cfg: Mapping, checked: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`DreamMPCTrainer` arguments of the update the config's ``algorithm`` describes.

    ``tdmpc2``: the top-level keys (``batch_size``, ``horizon``, ``utd_ratio``, ``lr``...) and ``loss`` /
    ``policy_loss``; ``bmpc``: the same, and its ``algorithm_options`` (``reanalyze``). ``dreamer_v3``: the
    ``dreamer`` node: ``batch_size`` sequences of ``batch_length`` steps, ``train_ratio`` replayed steps per env
    step (so ``train_ratio / (batch_size * batch_length)`` updates per step), the optimizer and the loss arguments.
    """
    algorithm = cfg.get("algorithm", "tdmpc2")
    if algorithm == "dreamer_v3":
        dreamer = cfg["dreamer"]
        optimizer = dict(dreamer.get("optimizer") or {})
        batch, length = int(dreamer["batch_size"]), int(dreamer["batch_length"])
        return dict(batch_size=batch, horizon=length, seed_frames=checked["seed_steps"],
                    pretrain_updates=int(dreamer["pretrain_updates"]),
                    utd_ratio=float(dreamer["train_ratio"]) / (batch * length), lr=float(optimizer.pop("lr")),
                    algorithm=algorithm, loss_kwargs={**optimizer, **dict(dreamer.get("loss") or {})},
                    algorithm_kwargs={key: bool(dreamer.get(key, False)) for key in DREAMER_REPLAY_OPTIONS})
    return dict(batch_size=int(cfg["batch_size"]), horizon=int(cfg["horizon"]), seed_frames=checked["seed_steps"],
                pretrain_updates=cfg.get("pretrain_updates"), utd_ratio=float(cfg["utd_ratio"]), lr=float(cfg["lr"]),
                enc_lr_scale=float(cfg["enc_lr_scale"]), grad_clip=float(cfg["grad_clip"]), tau=float(cfg["tau"]),
                algorithm=algorithm, compile=cfg.get("compile", False), loss_kwargs=dict(cfg.get("loss") or {}),
                policy_loss_kwargs=dict(cfg.get("policy_loss") or {}), algorithm_kwargs=_algorithm_options(cfg)[1])


def validate_train_config(cfg: Mapping) -> dict[str, Any]:
    """Checks every value of a training config before anything is built or written; returns facts derived on the way.

    Checks: the algorithm (and, for ``dreamer_v3``, its ``dreamer`` node; for ``bmpc``, its ``algorithm_options``);
    the task (through :func:`~torchrl_dreammpc.envs.task_info`, whose ``ValueError`` names the task); the ``model``
    node (every field of the family's config, :class:`~torchrl_dreammpc.modules.TDMPC2Config` or ``BMPCConfig``,
    e.g. a ``latent_dim`` that is not a multiple of 8, without building the model); positive integers (steps, batch size,
    horizon, eval episodes, workers, intervals, ``threads``, ``seed_steps``, ``buffer_size``); finite positive
    numbers (``lr``, ``utd_ratio``, ``enc_lr_scale``, ``grad_clip``; ``tau`` and ``discount`` in (0, 1]); booleans;
    ``compile`` and ``device``; that the run is longer than the seed phase; the collector backend (and Ray for
    ``backend=ray``); the loss arguments (``loss.*``, ``policy_loss.*``, by building the losses over a tiny model)
    and the planner's and every ``eval_planners`` entry's arguments (by building them over a tiny model).

    Returns:
        ``{"task_info": TaskInfo, "seed_steps": int}``.

    Raises:
        ConfigError (a ``ValueError``): naming the offending key and value.
    """
    from torchrl_dreammpc.envs import check_episodic, task_info
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
    try:
        check_episodic(cfg.get("episodic"), info)
    except ValueError as err:  # make_env's check, in the library's spelling: a YAML bool is true/false, None is null
        raise ConfigError(f"{err} (in the config: episodic=true, false or null)") from err
    tiny = _check_model(cfg, info, algorithm)
    if algorithm == "dreamer_v3":
        _check_dreamer_sequences_fit(cfg, info)
    _check_scalars(cfg)
    seed_steps = resolve_seed_steps(cfg, info.episode_length)
    if cfg["steps"] <= seed_steps:
        raise ConfigError(
            f"steps={cfg['steps']} must exceed the seed phase of {seed_steps} random-action steps "
            f"(seed_steps; TD-MPC2's max(1000, 5 * episode_length) = {max(1000, 5 * info.episode_length)} for "
            f"{info.task}): the planner would never act."
        )
    if resolve_replay_whole_episodes(cfg) and seed_steps < info.episode_length and not info.episodic:
        why = "" if cfg.get("replay_whole_episodes") else f" (the default with algorithm={algorithm}, as TD-MPC2)"
        raise ConfigError(f"replay_whole_episodes=true{why} writes an episode when it ends: seed_steps={seed_steps} "
                          f"must cover one episode of {info.task} ({info.episode_length} steps), or the first update "
                          "would find the replay buffer empty; raise seed_steps, or set replay_whole_episodes=false "
                          "to write each step as it comes.")
    _check_collector(cfg)
    if algorithm != "dreamer_v3":  # dreamer_v3 keeps its loss arguments in its `dreamer` node (checked above)
        _check_losses(cfg, tiny, algorithm)
    _check_algorithm_options(cfg, algorithm, tiny)
    _check_planner("planner", cfg["planner"], tiny)
    _check_eval_planners(cfg, planner, tiny)
    return {"task_info": info, "seed_steps": seed_steps}


def _check_scalars(cfg: Mapping) -> None:
    """Integers, finite numbers, booleans, ``compile``, ``device``, ``run_dir``."""
    for key in ("steps", "batch_size", "horizon", "eval_episodes", "collector.num_workers",
                "collector.frames_per_batch", "checkpoint_interval", "keep_checkpoints", "log_interval"):
        _positive_int(cfg, key)
    for key in ("eval_interval", "snapshot_interval", "seed"):
        _positive_int(cfg, key, minimum=0)
    for key in ("threads", "seed_steps"):
        _positive_int(cfg, key, nullable=True)
    _positive_int(cfg, "pretrain_updates", minimum=0, nullable=True)
    buffer_size = _positive_int(cfg, "buffer_size", nullable=True)
    if cfg.get("algorithm") == "dreamer_v3":
        length, name = _get(cfg, "dreamer.batch_length"), "dreamer.batch_length"
    else:
        length, name = cfg["horizon"], "horizon"
    if buffer_size is not None and buffer_size < length:
        raise ConfigError(f"buffer_size={buffer_size} cannot hold one sub-trajectory of {name}={length}.")
    for key in ("lr", "utd_ratio", "enc_lr_scale", "grad_clip"):
        _number(cfg, key)
    _number(cfg, "tau", high=1.0)
    _number(cfg, "discount", high=1.0, nullable=True)
    for key in ("resume", "eval_at_start", "replay_memmap", "replay_whole_episodes", "progress_bar"):
        if _get(cfg, key, False) is not False:  # optional keys: absent means false
            if key == "replay_whole_episodes" and _get(cfg, key) is None:
                continue  # null: the algorithm's (resolve_replay_whole_episodes)
            _boolean(cfg, key)
    try:
        check_compile("compile", cfg.get("compile", False))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    check_device(cfg.get("device") or "cpu")
    run_dir = cfg.get("run_dir")
    if not isinstance(run_dir, str) or not run_dir:
        raise ConfigError(f"run_dir must be a non-empty path, got {run_dir!r}.")


def _check_collector(cfg: Mapping) -> None:
    backend = _get(cfg, "collector.backend")
    if backend not in ("local", "ray"):
        raise ConfigError(f"collector.backend must be 'local' or 'ray', got {backend!r}.")
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError("collector.backend=ray needs Ray, which is not installed: "
                          "pip install 'torchrl_dreammpc[ray]'.")
    ray_init = _get(cfg, "collector.ray_init_config") or {}
    if not isinstance(ray_init, Mapping):
        raise ConfigError(f"collector.ray_init_config must be a mapping, got {ray_init!r}.")


def _check_losses(cfg: Mapping, tiny, algorithm: str) -> None:
    """``loss.*`` / ``policy_loss.*``: the algorithm's loss constructors (TD-MPC2's or BMPC's) check their
    arguments; build them over ``tiny``."""
    from torchrl_dreammpc.objectives import BMPCLoss, BMPCPolicyLoss, TDMPC2Loss, TDMPC2PolicyLoss

    classes = (BMPCLoss, BMPCPolicyLoss) if algorithm == "bmpc" else (TDMPC2Loss, TDMPC2PolicyLoss)
    for key, cls in zip(("loss", "policy_loss"), classes):
        kwargs = cfg.get(key) or {}
        if not isinstance(kwargs, Mapping):
            raise ConfigError(f"{key} must be a mapping of {cls.__name__} arguments, got {kwargs!r}.")
        try:
            cls(tiny, **kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{key} ({cls.__name__} of algorithm={algorithm}): {err}") from err


def _check_eval_planners(cfg: Mapping, planner: str, tiny) -> None:
    eval_planners = cfg.get("eval_planners") or {}
    if not isinstance(eval_planners, Mapping):
        raise ConfigError(f"eval_planners must be a mapping name -> planner config, got {eval_planners!r}.")
    for label, planner_cfg in eval_planners.items():
        if not isinstance(label, str) or not _PLANNER_LABEL.fullmatch(label):
            raise ConfigError(f"eval_planners key {label!r} must be a name of letters, digits, '_', '.', '-' (it "
                              "names eval_<name>.csv).")
        if label == planner:
            raise ConfigError(f"eval_planners.{label}: the training planner is already evaluated under {label!r} "
                              "(eval.csv); give the extra planner another name.")
        _check_planner(f"eval_planners.{label}", planner_cfg, tiny)


def resolve_device(device) -> str:
    """``"auto"`` (or nothing) → ``"cuda"`` where CUDA is available, else ``"cpu"``; any other value as given."""
    if device in (None, "auto"):
        return "cuda" if device == "auto" and torch.cuda.is_available() else "cpu"
    return str(device)


def check_device(device) -> None:
    """Refuses a device string torch cannot parse, or a CUDA device this machine does not have (ConfigError)."""
    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {device!r}.") from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available here (use device=cpu or device=auto).")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ConfigError(f"device={device!r} but there are only {torch.cuda.device_count()} CUDA device(s).")


def _algorithm_options(cfg: Mapping) -> tuple[bool, dict[str, Any]]:
    """``(acting_expert, the update builder's extra arguments)`` from ``cfg.algorithm_options``."""
    options = dict(cfg.get("algorithm_options") or {})
    return bool(options.pop("acting_expert", False)), options


def _check_algorithm_options(cfg: Mapping, algorithm: str, tiny) -> None:
    """``algorithm_options`` (BMPC's: ``acting_expert`` and ``reanalyze``), by building BMPC's update over the tiny
    model; other algorithms take none."""
    options = cfg.get("algorithm_options") or {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"algorithm_options must be a mapping, got {options!r}.")
    if algorithm != "bmpc":
        if options:
            raise ConfigError(f"algorithm_options {sorted(options)} only apply to algorithm=bmpc, not {algorithm!r}.")
        return
    acting_expert = options.get("acting_expert", False)
    if not isinstance(acting_expert, bool):
        raise ConfigError(f"algorithm_options.acting_expert must be true or false, got {acting_expert!r}.")
    unknown = sorted(set(options) - {"acting_expert", "reanalyze"})
    if unknown:
        raise ConfigError(f"Unknown algorithm_options key(s) {unknown} for algorithm=bmpc; known: acting_expert, "
                          "reanalyze.")
    reanalyze = options.get("reanalyze") or {}
    if not isinstance(reanalyze, Mapping):
        raise ConfigError(f"algorithm_options.reanalyze must be a mapping, got {reanalyze!r}.")
    for key, low in (("interval", 0), ("num_slices", 1)):
        value = reanalyze.get(key, low)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"algorithm_options.reanalyze.{key} must be an integer >= {low}, got {value!r}.")
    if reanalyze.get("num_slices", 0) > cfg["batch_size"]:
        raise ConfigError(f"algorithm_options.reanalyze.num_slices={reanalyze['num_slices']} exceeds "
                          f"batch_size={cfg['batch_size']}: only sampled sub-trajectories can be reanalyzed.")
    from torchrl_dreammpc.trainers.bmpc import make_bmpc_update

    try:
        make_bmpc_update(tiny, reanalyze=dict(reanalyze))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"algorithm_options.reanalyze (algorithm=bmpc): {err}") from err


def build_trainer(cfg: Mapping, *, checked: Mapping[str, Any] | None = None):
    """Builds the :class:`DreamMPCTrainer` a training config describes (validating it first).

    Returns:
        ``(trainer, world_model)``.
    """
    from torchrl_dreammpc.envs import make_env
    from torchrl_dreammpc.trainers.dream_mpc import DreamMPCTrainer

    checked = checked or validate_train_config(cfg)
    info = checked["task_info"]
    device = resolve_device(cfg.get("device"))
    seed = int(cfg["seed"])
    torch.manual_seed(seed)  # model initialization
    episodic = resolve_episodic(cfg, info)
    # episodic=false on a task whose episodes end early: those ends reach the learner as time limits
    create_env = functools.partial(make_env, info.task, seed=seed, episodic=episodic)
    probe = create_env()
    obs_dim = int(probe.observation_spec["observation"].shape[-1])
    action_spec = probe.action_spec
    action_dim = int(action_spec.shape[-1])
    probe.close()
    algorithm = cfg.get("algorithm", "tdmpc2")
    acting_expert, _ = _algorithm_options(cfg)
    if algorithm == "dreamer_v3":
        world_model = make_dreamer_world_model(cfg["dreamer"], obs_dim, action_dim, device=device)
    else:
        world_model = make_world_model(cfg["model"], obs_dim, action_dim, episode_length=info.episode_length,
                                       episodic=episodic, discount=cfg.get("discount"), device=device,
                                       algorithm=algorithm)
    # BMPC with algorithm_options.acting_expert: the acting planner also stores its action distribution.
    actor = make_actor(cfg["planner"], world_model, action_spec=action_spec,
                       expert_key=EXPERT_KEY if acting_expert else None)
    # Evaluation uses a second planner instance over the same model, one that stores no expert distribution.
    # (The evaluation hook keeps warm starts and torch's RNG apart from the training's either way.)
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
        replay_whole_episodes=resolve_replay_whole_episodes(cfg),
        device=device,
        task=info.task,
        planner_name=cfg["planner"]["name"],
        progress_bar=bool(cfg.get("progress_bar", False)),
    )
    return trainer, world_model
