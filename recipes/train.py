"""Train a TD-MPC2 (or DreamerV3: algorithm=dreamer_v3) world model online, acting with Dream-MPC (or MPPI, or the
policy prior).

    python recipes/train.py                                         # = preset=quickstart: a few minutes on 2 CPUs
    python recipes/train.py preset=quickstart seed=2                # the same, with overrides
    python recipes/train.py task=cartpole-swingup planner=dream_mpc model_size=1 steps=100000 seed=1 \
        run_dir=/data/runs/cartpole-dream-1M-s1 resume=true          # re-run the same command after a crash
    python recipes/train.py preset=dreamer_cpu task=cartpole-swingup steps=100000 run_dir=runs/cartpole-dreamer-s1

Every value is in recipes/config/train.yaml (published TD-MPC2 / Dream-MPC defaults, cited there); override any
of them on the command line. Without any argument the script runs the quickstart preset (the README's command);
with arguments it starts from the published config (``preset=quickstart`` adds the preset).

The run directory gets ``config.yaml``, ``eval.csv`` (the learning curve: ``step,return``), TensorBoard events
(``tb/``), CSV scalars (``csv/``), rotating checkpoints (``checkpoints/``) and, at the end, ``world_model.pt``.
With ``resume=true`` (the default) the run continues from its last complete checkpoint and stops at ``steps``.
SIGTERM or Ctrl-C stops the run at the next step with a checkpoint of that step (exit code 143 / 130; inside the
seed phase's pre-training burst, after the slice of 100 updates in progress, and the resumed run does the rest);
a second Ctrl-C stops it at once, from the last complete checkpoint.
"""
from __future__ import annotations

import fcntl
import os
import re
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torchrl.checkpoint import CheckpointError as TorchRLCheckpointError

from torchrl_dreammpc.checkpoints import CheckpointError
from torchrl_dreammpc.planners import NonFiniteActionError
from torchrl_dreammpc.trainers import ConfigMismatchError, NonFiniteUpdateError, read_eval_csv, stop_on_signals
from torchrl_dreammpc.trainers.builders import ConfigError, build_trainer, check_keys_apply, validate_train_config

CONFIG_DIR = Path(__file__).resolve().parent / "config"


def quote_model_size(argv: list[str]) -> list[str]:
    """``model_size=1`` -> ``model_size='1'``: Hydra parses the bare number as an int and refuses an int as a
    config-group choice; quoting keeps TD-MPC2's CLI spelling (``model_size=1,5`` in sweeps too)."""
    out = []
    for arg in argv:
        match = re.fullmatch(r"(model_size)=(\d+(?:,\d+)*)", arg)
        out.append(f"{match[1]}=" + ",".join(f"'{v}'" for v in match[2].split(",")) if match else arg)
    return out


def keys_set(overrides: list[str]) -> dict[str, str]:
    """The config keys the command line sets, and those its ``preset=`` sets: ``{key: where}`` (for
    :func:`~torchrl_dreammpc.trainers.builders.check_keys_apply`; a group override such as ``model_size=1`` counts
    as its key)."""
    where = {}
    for override in overrides:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        where.setdefault(key, "the command line")
        if key == "preset" and value not in ("", "none"):
            preset = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "preset" / f"{value}.yaml"))
            for entry in preset.pop("defaults", []):  # e.g. {"override /model_size": "1"}
                for group in (entry if isinstance(entry, dict) else {}):
                    where.setdefault(group.split("/")[-1], f"preset={value}")
            for name in preset:
                where.setdefault(name, f"preset={value}")
    return where


def lock_run_dir(run_dir: Path):
    """An exclusive lock on ``run_dir/.lock`` for this process's lifetime (the OS drops it when the process dies):
    two trainings writing one run directory would interleave checkpoints and logs."""
    handle = (run_dir / ".lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        raise SystemExit(f"train.py: {run_dir} is being trained by another process ({handle.read().strip()}); "
                         "wait for it to end or stop it.")
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


@hydra.main(config_path="config", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    cfg = OmegaConf.to_container(cfg, resolve=True)
    # 1. Validate everything before any work (no env, model or file is created on a bad value).
    try:
        if HydraConfig.initialized():  # (not when a test calls main() with a composed config)
            check_keys_apply(cfg["algorithm"], keys_set(list(HydraConfig.get().overrides.task)))
        checked = validate_train_config(cfg)
    except ConfigError as err:
        raise SystemExit(f"train.py: invalid config: {err}")
    run_dir = Path(cfg["run_dir"])
    checkpoints = run_dir / "checkpoints"
    if not cfg["resume"] and checkpoints.is_dir() and any(checkpoints.glob("checkpoint-*")):
        raise SystemExit(f"train.py: {run_dir} already holds checkpoints; pass resume=true to continue that run "
                         f"or choose another run_dir.")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_run_dir(run_dir)  # noqa: F841  (held until the process ends)

    # 2. Build (collector, replay buffer, losses, stepper, evaluator, loggers, checkpoints) and resume.
    trainer, _ = build_trainer(cfg, checked=checked)
    if cfg["resume"]:
        try:
            trainer.resume()
        except (ConfigMismatchError, CheckpointError, TorchRLCheckpointError) as err:
            raise SystemExit(f"train.py: {err}")
    else:
        trainer.start_afresh()  # (a directory without checkpoints: an earlier attempt's log rows are dropped)
    OmegaConf.save(OmegaConf.create(cfg), run_dir / "config.yaml")
    print(f"[train] {checked['task_info'].task}, {trainer.fingerprint['algorithm']}, planner {cfg['planner']['name']}, "
          f"model_size {trainer.fingerprint['model_size']}, "
          f"{cfg['steps']} steps (seed phase {checked['seed_steps']}), run dir {run_dir}", flush=True)

    # 3. Train.
    if trainer.collected_frames >= trainer.total_frames:
        print(f"[train] already complete: {trainer.collected_frames} steps.", flush=True)
    else:
        try:
            with stop_on_signals(trainer) as received:  # SIGTERM / Ctrl-C: checkpoint the step reached, then stop
                trainer.train()
        except (NonFiniteUpdateError, NonFiniteActionError) as err:  # the message names the step and what to do
            raise SystemExit(f"train.py: {err}")
        if received:
            print(f"[train] stopped by {received[0].name} at step {trainer.collected_frames} of {cfg['steps']}, "
                  f"checkpoint written; re-run the same command to continue.", flush=True)
            sys.exit(128 + received[0])  # the shell's code for a run ended by that signal: not complete
    curve = read_eval_csv(run_dir / "eval.csv") if (run_dir / "eval.csv").exists() else []
    if curve:
        print("[train] eval returns: " + ", ".join(f"{step}: {ret:.1f}" for step, ret in curve), flush=True)
        print(f"[train] learning curve: {run_dir / 'eval.csv'}", flush=True)
    return curve[-1][1] if curve else None  # the objective of Hydra sweepers


if __name__ == "__main__":
    if len(sys.argv) == 1:
        # The README's one command: no argument runs the short demo. Any argument means "the published config
        # with my overrides", so that a long run never inherits the demo's reduced settings by accident.
        print("[train] no arguments: running preset=quickstart (pass any override to start from the published "
              "config instead)", flush=True)
        sys.argv.append("preset=quickstart")
    sys.argv = quote_model_size(sys.argv)
    main()
