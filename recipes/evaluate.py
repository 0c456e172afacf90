"""Evaluate a trained world model with several planners, on the same seeds.

    python recipes/evaluate.py checkpoint=runs/cartpole-swingup/dream_mpc-1M/seed1 planners=[policy,mppi,dream_mpc]
    python recipes/evaluate.py checkpoint=runs/.../world_model.pt task=cartpole-swingup episodes=10
    python recipes/evaluate.py checkpoint=walker-walk-1.pt task=walker-walk model_size=1   # a TD-MPC2 checkpoint
    python recipes/evaluate.py checkpoint=<run dir> video=true                             # + one MP4 per planner

``checkpoint`` is a trainer run dir or checkpoint dir (the world model, TD-MPC2's or DreamerV3's, is rebuilt from
the config stored in it and only its weights are read), a ``world_model.pt`` written by ``save_world_model``, or a
checkpoint of TD-MPC2's public code. A DreamerV3 model acts through its RSSM state estimator (the planners read
its latent), in envs with its acting transforms. Every planner plays ``episodes`` episodes from the same initial
states (the env is
reseeded with ``seed`` before each planner), in TorchRL's DETERMINISTIC exploration mode (``exploration=random``:
RANDOM, e.g. the policy prior's samples instead of its mean). Torch's RNG is seeded with ``seed`` before each
planner too, so what a planner samples (Dream-MPC's candidates, MPPI's samples) repeats on a rerun. The table
(mean ± std return, success rate on Meta-World (at the episode's last step, as TD-MPC2 counts it, and at any step), ms
per step of acting, ms per env step overall) is printed one row per planner
as soon as it is done, and saved as ``results.json`` (with every episode's return and success flag) and
``results.csv`` in ``output_dir`` (after every planner). ``progress=auto`` (the default) shows the progress within
a planner (episodes done, elapsed, estimated time left): a tqdm bar in a terminal, one line per episode otherwise
(a log file); ``progress=false`` turns it off. Every error a user can cause (a missing, truncated, corrupted or
foreign file, another task's checkpoint, an unknown task or planner, a bad value, a missing optional suite) stops
the script with one line, ``evaluate.py: <what>``, and exit status 1.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import os
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from torchrl.envs.utils import ExplorationType

from torchrl_dreammpc.checkpoints import CheckpointError, write_text_atomic
from torchrl_dreammpc.planners import NonFiniteActionError
from torchrl_dreammpc.trainers import (
    ConfigMismatchError,
    EvaluationHook,
    EvaluationProgress,
    cap_episode_length,
    find_trainer_checkpoint,
    load_world_model_from_trainer_checkpoint,
)
from torchrl_dreammpc.trainers.builders import PLANNERS, ConfigError, check_device, make_actor, resolve_device

CONFIG_DIR = Path(__file__).resolve().parent / "config"


class UserError(Exception):
    """An error the user caused (a path, a file, a value): printed as one line, exit status 1, no traceback."""


#: ``exploration=`` values: TorchRL's mode the planners act in.
EXPLORATION_TYPES = {"deterministic": ExplorationType.DETERMINISTIC, "random": ExplorationType.RANDOM}


def _one_line(err: BaseException) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def planner_config(name: str, overrides: dict) -> dict:
    """The published config of planner ``name`` (recipes/config/planner/<name>.yaml) with ``overrides``."""
    if name not in PLANNERS:
        raise ConfigError(f"Unknown planner {name!r} in planners=...; choose from {sorted(PLANNERS)}.")
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "planner" / f"{name}.yaml"))
    cfg.update(overrides.get(name, {}))
    return cfg


def check_config(cfg: dict) -> None:
    """Checks the values that do not need the model (before anything is loaded or written)."""
    for key in ("episodes", "seed"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "episodes" else 0):
            raise ConfigError(f"{key} must be an integer >= {1 if key == 'episodes' else 0}, got {value!r}.")
    threads = cfg.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive integer (or null), got {threads!r}.")
    max_steps = cfg.get("max_steps")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ConfigError(f"max_steps must be a positive integer or null, got {max_steps!r}.")
    try:
        EvaluationProgress(cfg.get("progress", "auto"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.get("exploration", "deterministic") not in EXPLORATION_TYPES:
        raise ConfigError(f"exploration must be one of {sorted(EXPLORATION_TYPES)}, got {cfg['exploration']!r}.")
    if not isinstance(cfg["video"], bool):
        raise ConfigError(f"video must be true or false, got {cfg['video']!r}.")
    if not isinstance(cfg["planners"], list) or not cfg["planners"]:
        raise ConfigError(f"planners must be a non-empty list of planner names, got {cfg['planners']!r}.")
    if len(set(cfg["planners"])) != len(cfg["planners"]):
        raise ConfigError(f"planners lists a planner twice: {cfg['planners']}.")
    unused = sorted(set(cfg["planner_args"] or {}) - set(cfg["planners"]))
    if unused:
        raise ConfigError(f"planner_args names {unused}, which are not in planners={cfg['planners']}.")
    check_device(cfg["device"])


def load_model(cfg: dict, device: str):
    """Returns ``(world_model, task_name, source_description)`` for any supported checkpoint kind."""
    from torchrl_dreammpc.checkpoints import load_any
    from torchrl_dreammpc.envs import make_env, task_info

    path = Path(cfg["checkpoint"])
    if not path.exists():
        raise UserError(f"checkpoint={str(path)!r} does not exist.")
    if path.is_dir():
        if find_trainer_checkpoint(path) is not None:
            try:
                world_model, fingerprint = load_world_model_from_trainer_checkpoint(path, device=device)
            except (CheckpointError, ConfigMismatchError) as err:
                raise UserError(f"cannot load the trainer checkpoint in {path}: {err}") from err
            task = fingerprint["task"]
            if cfg["task"] is not None and task_info(cfg["task"]).task != task:
                raise UserError(f"task={cfg['task']!r} but the checkpoint was trained on {task!r}.")
            return world_model, task, f"trainer checkpoint {fingerprint['checkpoint']}"
        if (path / "world_model.pt").exists():
            path = path / "world_model.pt"
        else:
            raise UserError(f"{path} holds neither a trainer checkpoint nor a world_model.pt.")
    if cfg["task"] is None:
        raise UserError(f"task=... is required to evaluate the model file {path}.")
    info = task_info(cfg["task"])
    env = make_env(info.task)
    obs_spec, action_spec = env.observation_spec["observation"], env.action_spec
    env.close()
    kwargs = {}
    if str(cfg.get("model_size")).isdigit():  # builds a TD-MPC2 checkpoint's model (checked for every kind below)
        kwargs["model_size"] = int(cfg["model_size"])
    try:
        try:
            world_model = load_any(str(path), obs_spec, action_spec, device=device,
                                   episode_length=info.episode_length, **kwargs)
        except CheckpointError as err:
            if "only apply to TD-MPC2 checkpoints" not in str(err):
                raise
            world_model = load_any(str(path), obs_spec, action_spec, device=device)  # ours: config is stored
    except CheckpointError as err:
        raise UserError(f"cannot load {path} for task {info.task!r}: {err}") from err
    return world_model.eval(), info.task, f"model file {path}"


class _Timer:
    """Wall time spent in a module's forward (the planner's own cost per control step)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.total, self.calls, self._start = 0.0, 0, 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, *args) -> None:
        self._start = time.perf_counter()

    def _post(self, *args) -> None:
        self.total += time.perf_counter() - self._start
        self.calls += 1

    @property
    def ms(self) -> float:
        return 1000.0 * self.total / max(self.calls, 1)


def record_video(create_env, actor, path: Path, seed: int, size: tuple[int, int], fps: int = 30,
                 exploration_type: ExplorationType = ExplorationType.DETERMINISTIC,
                 max_steps: int | None = None) -> Path:
    """Plays one episode (in ``exploration_type`` mode, cut after ``max_steps`` agent steps as the evaluation's
    episodes are) and writes it as an MP4 (frames rendered by MuJoCo, encoded by ffmpeg)."""
    from torchrl.envs.utils import set_exploration_type

    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (the ffmpeg binary imageio writes MP4 with)
    except ImportError as err:
        raise UserError(f"video=true needs imageio with its ffmpeg plugin (pip install 'imageio[ffmpeg]'): {err}")
    env = cap_episode_length(create_env(), max_steps)
    base = env.base_env
    height, width = size
    # every suite's env renders its own video camera (SuiteEnv.render: DMC, Meta-World, HumanoidBench)
    render = functools.partial(base.render, height=height, width=width)
    env.set_seed(seed)
    frames = []
    try:
        with set_exploration_type(exploration_type), torch.no_grad():
            td = env.reset()
            frames.append(render())
            while True:
                td = env.step(actor(td))
                frames.append(render())
                if bool(td["next", "done"].any()):
                    break
                td = td["next"]
    except Exception as err:  # MuJoCo's GL backends raise assorted errors without a display / GPU
        raise UserError(
            f"video=true: MuJoCo could not render here (MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}): "
            f"{type(err).__name__}: {err}. Rendering needs EGL (a GPU or Mesa's EGL) or OSMesa.") from err
    finally:
        env.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1) as writer:
        for frame in frames:
            writer.append_data(frame)
    return path


def write_results(out_dir: Path, header: dict, rows: list[dict]) -> None:
    """``results.json`` (``header`` + the rows) and ``results.csv`` (the rows without the per-episode lists)."""
    # atomic: another process (the benchmark campaign's report) may read them while they are written
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=[key for key in dict.fromkeys(k for row in rows for k in row)
                                               if not key.startswith("episode_")], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out_dir / "results.csv", table.getvalue())
    write_text_atomic(out_dir / "results.json", json.dumps({**header, "results": rows}, indent=2))


def table_header(with_success: bool) -> str:
    return f"{'planner':<12} {'return':>18} " + (f"{'success':>8} {'any step':>8} " if with_success else "") + \
        f"{'plan ms/step':>13} {'ms/step':>9}"


def table_row(row: dict, with_success: bool) -> str:
    line = f"{row['planner']:<12} {row['return_mean']:>9.1f} ± {row['return_std']:<6.1f} "
    if with_success:
        line += f"{row['success_rate']:>8.2f} {row['success_any_rate']:>8.2f} "
    return line + f"{row['plan_ms_per_step']:>13.1f} {row['ms_per_step']:>9.1f}"


@hydra.main(config_path="config", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from torchrl_dreammpc.envs import TaskNotAvailableError, UnknownTaskError

    try:
        cfg = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise SystemExit(f"evaluate.py: {err.full_key}=... is required (e.g. checkpoint=<run dir or .pt file>).")
    try:
        evaluate(cfg)
    except (UserError, ConfigError, UnknownTaskError, TaskNotAvailableError, NonFiniteActionError) as err:
        raise SystemExit(f"evaluate.py: {_one_line(err)}")
    except ImportError as err:  # an optional suite (HumanoidBench, Meta-World) or imageio-ffmpeg missing
        raise SystemExit(f"evaluate.py: a package this task needs is missing: {_one_line(err)}")


def evaluate(cfg: dict) -> None:
    from torchrl_dreammpc.envs import make_env, task_info, with_transforms

    check_config(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    names = list(cfg["planners"])
    planner_cfgs = {name: planner_config(name, cfg["planner_args"] or {}) for name in names}

    world_model, task, source = load_model(cfg, resolve_device(cfg["device"]))
    if cfg.get("model_size") is not None and str(cfg["model_size"]) != str(world_model.config.model_size):
        raise UserError(f"model_size={cfg['model_size']!r} but {source} holds a model of size "
                        f"{world_model.config.model_size!r}.")
    # A recurrent model (DreamerV3) carries its state in the env: its acting transforms are appended.
    create_env = with_transforms(functools.partial(make_env, task, seed=int(cfg["seed"])),
                                 world_model.acting_transforms())
    probe = create_env()
    action_spec = probe.action_spec
    probe.close()
    actors = {}
    for name in names:
        try:
            actors[name] = make_actor(planner_cfgs[name], world_model, action_spec=action_spec)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"planner {name} (recipes/config/planner/{name}.yaml + planner_args.{name}): {err}")
    timers = {name: _Timer(actor) for name, actor in actors.items()}

    if cfg["output_dir"]:
        out_dir = Path(cfg["output_dir"])
    elif Path(cfg["checkpoint"]).is_dir():
        out_dir = Path(cfg["checkpoint"]) / "eval_planners"
    else:
        out_dir = Path("eval_planners")
    exploration = cfg.get("exploration", "deterministic")
    header = {"task": task, "source": source, "episodes": int(cfg["episodes"]), "seed": int(cfg["seed"]),
              "exploration": exploration}
    print(f"[evaluate] {task}: {source}; {cfg['episodes']} episodes per planner, seed {cfg['seed']}, "
          f"{exploration} mode", flush=True)
    hook = EvaluationHook(actors, create_env, interval=0, episodes=int(cfg["episodes"]), seed=int(cfg["seed"]),
                          max_steps=cfg.get("max_steps"), verbose=False, progress=cfg.get("progress", "auto"),
                          exploration_type=EXPLORATION_TYPES[exploration], torch_seed=int(cfg["seed"]))
    with_success = task_info(task).has_success
    rows = []

    def add_row(name: str, metrics: dict) -> None:  # each planner's row as soon as it is done
        rows.append({
            "planner": name,
            "return_mean": metrics["return"],
            "return_std": metrics["return_std"],
            "success_rate": metrics.get("success"),  # the last step's flag, as TD-MPC2 counts it
            "success_any_rate": metrics.get("success_any"),
            "plan_ms_per_step": timers[name].ms,
            "ms_per_step": metrics["ms_per_step"],
            "episodes": int(metrics["episodes"]),
            "mean_episode_length": metrics["episode_length"],
            **{key: value for key, value in metrics.items() if key.startswith("planner/")},  # diagnostics=true
            "episode_returns": metrics.get("episode_returns"),  # results.json only (paired comparisons)
            "episode_successes": metrics.get("episode_successes"),
            "episode_successes_any": metrics.get("episode_successes_any"),
        })
        if len(rows) == 1:
            print(table_header(with_success), flush=True)
        print(table_row(rows[-1], with_success), flush=True)
        write_results(out_dir, header, rows)  # after every planner: a stopped evaluation keeps the finished ones

    try:
        hook.evaluate(step=0, on_result=add_row)
    finally:
        hook.shutdown()

    if cfg["video"]:
        for row in rows:
            row["video"] = str(record_video(create_env, actors[row["planner"]], out_dir / f"{row['planner']}.mp4",
                                            int(cfg["seed"]), tuple(cfg["video_size"]),
                                            exploration_type=EXPLORATION_TYPES[exploration],
                                            max_steps=cfg.get("max_steps")))
        write_results(out_dir, header, rows)

    if hook.progress.mode == "lines" and len(rows) > 1:  # the rows were interleaved with progress lines: again
        print("\n".join([table_header(with_success)] + [table_row(row, with_success) for row in rows]))
    print(f"[evaluate] saved {out_dir / 'results.json'} and {out_dir / 'results.csv'}", flush=True)


if __name__ == "__main__":
    main()
