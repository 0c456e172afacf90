"""End-to-end tests of recipes/train.py and recipes/evaluate.py (subprocesses, tiny models, a few hundred steps)."""
from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import shutil
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensordict import TensorDict

from torchrl_dreammpc.planners import LatentPlannerBase
from torchrl_dreammpc.trainers import read_eval_csv
from torchrl_dreammpc.trainers.builders import PLANNERS, ConfigError, build_trainer, validate_train_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "recipes" / "train.py"
EVALUATE = ROOT / "recipes" / "evaluate.py"
CONFIG_DIR = ROOT / "recipes" / "config"

# A tiny model and a short run: 100 random steps, 20 pre-training updates, batch of 16 sub-trajectories; each step
# written to the replay buffer as it comes (the seed phase is shorter than an episode).
TINY = ["model_size=1", "model.enc_dim=32", "model.mlp_dim=32", "model.latent_dim=16", "seed_steps=100",
        "replay_whole_episodes=false",
        "pretrain_updates=20", "batch_size=16", "eval_episodes=1", "checkpoint_interval=100", "log_interval=100",
        "eval_at_start=false", "threads=1"]


def run(script: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def compose_train(*overrides: str) -> dict:
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=False)


def test_published_defaults_and_quickstart_preset():
    cfg = compose_train()
    # uncertainty_weight null: the model family's lambda (0.01 with TD-MPC2's, 0.1 with BMPC's; tests/test_bmpc.py)
    assert cfg["planner"] == {"name": "dream_mpc", "num_candidates": 5, "horizon": 3, "iterations": 1, "lr": 0.1,
                              "warm_start_weight": 0.1, "uncertainty_weight": None, "max_grad_norm": 20.0,
                              "uncertainty_grad": False, "exploration_std": 0.0, "diagnostics": False,
                              "check_finite": None, "compile": False,
                              "latent_key": None}
    assert (cfg["batch_size"], cfg["horizon"], cfg["lr"], cfg["enc_lr_scale"], cfg["grad_clip"], cfg["tau"]) == \
        (256, 3, 3e-4, 0.3, 20.0, 0.01)
    assert cfg["seed_steps"] is None and cfg["pretrain_updates"] is None and cfg["utd_ratio"] == 1.0
    mppi = compose_train("planner=mppi")["planner"]
    # iterations: null is TD-MPC2's rule (6, +2 for actions of >= 20 dims), resolved by MPPIPlanner from the task.
    assert (mppi["num_samples"], mppi["num_elites"], mppi["iterations"], mppi["num_pi_trajs"]) == (512, 64, None, 24)
    assert compose_train("model_size='19'")["model"] == {"size": 19, "enc_dim": 1024, "mlp_dim": 1024,
                                                          "latent_dim": 768, "num_enc_layers": 3}
    # num_q is not in TD-MPC2's size table for 5/19/48: its config default, 5, applies (BMPC's: 2)
    from torchrl_dreammpc.modules import BMPCConfig, TDMPC2Config
    assert TDMPC2Config.num_q == 5 and BMPCConfig.num_q == 2
    quick = compose_train("preset=quickstart")
    assert (quick["model"]["size"], quick["task"], quick["steps"]) == (1, "cartpole-swingup", 3000)


def test_mppi_iterations_follow_tdmpc2_large_action_rule(one_thread):
    """TD-MPC2 adds 2 MPPI iterations when the action has >= 20 dims (h1hand: 61); an explicit value wins."""
    import torch
    from torchrl.data import Bounded

    from torchrl_dreammpc.modules import TDMPC2WorldModel
    from torchrl_dreammpc.trainers.builders import make_planner

    def planner(action_dim, *overrides):
        wm = TDMPC2WorldModel(7, action_dim, model_size=1, enc_dim=16, mlp_dim=16, latent_dim=16).eval()
        spec = Bounded(-torch.ones(action_dim), torch.ones(action_dim), (action_dim,))
        cfg = compose_train("planner=mppi", *overrides)["planner"]
        cfg.update(num_samples=16, num_elites=4, num_pi_trajs=2)  # small, for speed; iterations as configured
        return make_planner(cfg, wm, action_spec=spec)

    big = planner(61)  # HumanoidBench h1hand
    assert big.iterations == 8
    calls = []
    original = big.imagine
    big.imagine = lambda *a, **k: calls.append(1) or original(*a, **k)
    action = big(TensorDict({"observation": torch.randn(7)}))["action"]
    assert len(calls) == 8 and action.shape == (61,) and bool(torch.isfinite(action).all())
    assert planner(20).iterations == 8 and planner(19).iterations == 6 and planner(6).iterations == 6
    assert planner(61, "planner.iterations=6").iterations == 6  # explicit overrides the rule
    assert planner(6, "planner.iterations=3").iterations == 3


def test_validation_names_the_bad_value():
    def check(*overrides):
        cfg = compose_train("model_size='1'", *overrides)
        cfg["run_dir"] = "unused"
        validate_train_config(cfg)

    check("steps=5000")  # a valid config passes
    with pytest.raises(ConfigError, match="Unknown planner 'cem'"):
        check("planner.name=cem")
    with pytest.raises(ConfigError, match="task='cartpole-swingupp'.*Did you mean 'cartpole-swingup'"):
        check("task=cartpole-swingupp")
    with pytest.raises(ConfigError, match=r"steps=2000 must exceed the seed phase of 2500"):
        check("steps=2000")
    with pytest.raises(ConfigError, match=r"lr must be a finite number > 0, got -0.001"):
        check("lr=-1e-3")
    with pytest.raises(ConfigError, match=r"lr must be a finite number > 0, got 0"):
        check("lr=0")
    with pytest.raises(ConfigError, match=r"batch_size must be an integer >= 1, got 0"):
        check("batch_size=0")
    with pytest.raises(ConfigError, match=r"planner=dream_mpc: .*num_candidates must be an integer >= 1, got 0"):
        check("planner.num_candidates=0")
    with pytest.raises(ConfigError, match="collector.backend must be 'local' or 'ray', got 'mpi'"):
        check("collector.backend=mpi")


#: Constructor arguments that are not settings (objects, keys, bounds from the env's spec).
# expert_key: wired by the trainer (algorithm=bmpc, algorithm_options.acting_expert), not a planner setting
_NOT_SETTINGS = {"self", "world_model", "action_spec", "low", "high", "observation_key", "action_key", "is_init_key",
                 "generator", "kwargs", "expert_key"}


@pytest.mark.parametrize("name", sorted(PLANNERS))
def test_every_planner_argument_is_in_its_yaml_with_the_constructor_default(name):
    # docs/usage.md promises that any planner argument can be set as planner.<name> (no "+"): Hydra only allows
    # that for keys of the file.
    params = {**inspect.signature(LatentPlannerBase.__init__).parameters,
              **inspect.signature(PLANNERS[name].__init__).parameters}
    defaults = {key: p.default for key, p in params.items() if key not in _NOT_SETTINGS}
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "planner" / f"{name}.yaml"))
    assert cfg.pop("name") == name
    assert cfg == defaults
    compose_train(f"planner={name}", "planner.check_finite=false", "planner.diagnostics=true")  # no "+" needed


@pytest.mark.parametrize("override, message", [
    ("model.latent_dim=12", "latent_dim must be a multiple of simnorm_dim=8"),
    ("+model.dropout=1.5", "dropout must be < 1.0, got 1.5"),
    ("model.num_q=0", "num_q must be an integer >= 1, got 0"),
    ("+model.foo=1", r"Unknown TDMPC2Config field\(s\) \['foo'\]"),
    ("+model.discount=0.9", "model.discount cannot be set: it comes from discount="),
    ("loss.rho=0", r"loss \(TDMPC2Loss of algorithm=tdmpc2\): rho must be > 0.0, got 0.0"),
    ("loss.reward_coef=inf", "reward_coef must be a finite real number, got inf"),
    ("+loss.foo=1", "unexpected keyword argument 'foo'"),
    ("policy_loss.entropy_coef=-1", "entropy_coef must be >= 0.0"),
    ("discount=1.5", r"discount must be a finite number in \(0, 1\] \(or null\), got 1.5"),
    ("buffer_size=0", "buffer_size must be an integer >= 1 \\(or null\\), got 0"),
    ("buffer_size=2", "buffer_size=2 cannot hold one sub-trajectory of horizon=3"),
    ("tau=2", r"tau must be a finite number in \(0, 1\], got 2"),
    ("grad_clip=inf", "grad_clip must be a finite number > 0, got inf"),
    ("enc_lr_scale=inf", "enc_lr_scale must be a finite number > 0, got inf"),
    ("utd_ratio=nan", "utd_ratio must be a finite number > 0, got nan"),
    ("seed_steps=0", r"seed_steps must be an integer >= 1 \(or null\), got 0"),
    ("replay_whole_episodes=true seed_steps=400", "replay_whole_episodes=true writes an episode when it ends: "
                                                  "seed_steps=400 must cover one episode of cartpole-swingup"),
    ("seed_steps=400", r"replay_whole_episodes=true \(the default with algorithm=tdmpc2, as TD-MPC2\) writes an "
                       "episode when it ends: seed_steps=400 .* or set replay_whole_episodes=false"),
    ("replay_whole_episodes=yes", "replay_whole_episodes must be true or false, got 'yes'"),
    ("episodic=maybe", r"episodic must be a bool or None \(the task's own\), got 'maybe'\. \(in the config: "
                       r"episodic=true, false or null\)"),
    ("episodic=true", r"episodic=True: episodes of cartpole-swingup never end early .*\(in the config"),
    ("threads=0", r"threads must be an integer >= 1 \(or null\), got 0"),
    ("resume=maybe", "resume must be true or false, got 'maybe'"),
    ("compile=fast", "compile must be true, false or a torch.compile mode"),
    ("device=tpu", "device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got 'tpu'"),
    ("planner.uncertainty_grad='false'", "uncertainty_grad must be true or false, got 'false'"),
    ("planner.lr=inf", "planner=dream_mpc: lr must be a finite real number, got inf"),
    ("model.num_q=1", r"planner=dream_mpc: uncertainty_weight=0.01 needs a value ensemble of at least 2"),
    ("+eval_planners.fast.name=cem", r"Unknown planner 'cem' \(eval_planners.fast.name\)"),
    ("+eval_planners.policy.lr=1", r"Unknown planner None \(eval_planners.policy.name\)"),
    ("+eval_planners.dream_mpc.name=policy", "eval_planners.dream_mpc: the training planner is already evaluated"),
    ("+eval_planners.pi.name=policy +eval_planners.pi.lr=1", r"eval_planners.pi=policy: .*unexpected keyword argument 'lr'"),
])
def test_validation_covers_every_value(override, message):
    cfg = compose_train("model_size='1'", "steps=5000", *override.split())
    cfg["run_dir"] = "unused"
    with pytest.raises(ConfigError, match=message):
        validate_train_config(cfg)


@pytest.mark.parametrize("algorithm, overrides, expected", [
    ("tdmpc2", [], True), ("bmpc", [], True), ("dreamer_v3", [], False),  # each algorithm's own replay
    ("tdmpc2", ["replay_whole_episodes=false"], False), ("dreamer_v3", ["replay_whole_episodes=true"], True),
])
def test_replay_whole_episodes_defaults_to_the_algorithms_replay(tmp_path, algorithm, overrides, expected):
    from torchrl_dreammpc.trainers.builders import resolve_replay_whole_episodes

    cfg = compose_train(f"algorithm={algorithm}", *overrides)
    assert resolve_replay_whole_episodes(cfg) is expected
    if algorithm == "tdmpc2":  # and the trainer is built with it
        tiny = ["model_size='1'" if arg == "model_size=1" else arg for arg in TINY if "replay_whole" not in arg]
        cfg = compose_train(*tiny, "seed_steps=500", "steps=600", *overrides, f"run_dir={tmp_path / 'run'}")
        trainer, _ = build_trainer(OmegaConf.to_container(OmegaConf.create(cfg), resolve=True))
        assert trainer.replay_hook.whole_episodes is expected
        trainer.evaluation.shutdown()
        trainer.collector.shutdown()


def test_eval_planners_become_eval_actors_with_their_csv(tmp_path):
    tiny = ["model_size='1'" if arg == "model_size=1" else arg for arg in TINY]  # (the CLI quotes it: train.py)
    cfg = compose_train(*tiny, "steps=200", "+eval_planners.policy.name=policy", f"run_dir={tmp_path / 'run'}")
    cfg = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
    trainer, world_model = build_trainer(cfg)
    hook = trainer.evaluation
    assert hook.names == ["dream_mpc", "policy"]
    assert type(hook.actors["policy"]).__name__ == "PolicyActor" and hook.actors["policy"].world_model is world_model
    assert hook.csv_for("policy") == tmp_path / "run" / "eval_policy.csv"
    hook.shutdown()
    trainer.collector.shutdown()


@pytest.mark.parametrize("override, message", [
    ("planner=cem", "cem"),                      # Hydra: no planner/cem.yaml (lists the available ones)
    ("task=no-such-task", "'no-such-task'"),
    ("steps=100", "steps=100 must exceed the seed phase of 2500"),
    ("lr=-1", "lr must be a finite number > 0, got -1"),
])
def test_cli_rejects_bad_values_before_any_work(tmp_path, override, message):
    run_dir = tmp_path / "run"
    result = run(TRAIN, "model_size=1", override, f"run_dir={run_dir}", timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    assert not run_dir.exists()  # nothing was created


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"train.py exited early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.2)


def _signal_after_checkpoint(args: list[str], checkpoint: Path, sig: int) -> tuple[int, str, str]:
    """Starts train.py with ``args``, sends ``sig`` once ``checkpoint`` is complete; returns (exit code, stdout,
    stderr)."""
    proc = subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(checkpoint / "manifest.json", proc, timeout=300)
        os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


def test_sigkill_during_training_resumes_from_last_complete_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, "steps=500", "eval_interval=250", f"run_dir={run_dir}"]
    code, _, _ = _signal_after_checkpoint(args, run_dir / "checkpoints" / "checkpoint-000000000100", signal.SIGKILL)
    assert code == -signal.SIGKILL
    complete = sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")
                      if (p / "manifest.json").exists())
    assert complete, "no complete checkpoint before the kill"
    # Whatever else the kill left (a staging directory of a save in progress) is hidden and ignored; add one to
    # make sure a half-written checkpoint is never picked.
    (run_dir / "checkpoints" / ".checkpoint-000000000450.stage-deadbeef" / "components").mkdir(parents=True)

    result = run(TRAIN, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / complete[-1]}" in result.stdout
    final = run_dir / "checkpoints" / "checkpoint-000000000500"
    assert json.loads((final / "manifest.json").read_text())["metadata"]["collected_frames"] == 500
    assert not list((run_dir / "checkpoints").glob(".checkpoint-*"))
    steps = [step for step, _ in read_eval_csv(run_dir / "eval.csv")]
    assert steps == [250, 500]  # each evaluation once, even if one was written before the kill


def test_resume_false_in_a_used_directory_without_checkpoints_starts_a_new_curve(tmp_path):
    """resume=false where an earlier attempt left logs but no checkpoint: the new run's curve replaces the old one
    (kept beside it), instead of being appended to it."""
    run_dir = tmp_path / "run"
    args = [*TINY, "steps=150", "eval_interval=150", "checkpoint_interval=1000", f"run_dir={run_dir}"]
    assert run(TRAIN, *args).returncode == 0
    shutil.rmtree(run_dir / "checkpoints")
    result = run(TRAIN, *args, "resume=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [step for step, _ in read_eval_csv(run_dir / "eval.csv")] == [150]
    assert [step for step, _ in read_eval_csv(run_dir / "eval.csv.before-restart")] == [150]


def test_sigterm_during_training_checkpoints_the_step_and_the_same_command_continues(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, "steps=500", "eval_interval=250", f"run_dir={run_dir}"]
    code, out, err = _signal_after_checkpoint(args, run_dir / "checkpoints" / "checkpoint-000000000100",
                                              signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    stopped = re.search(r"stopped by SIGTERM at step (\d+) of 500, checkpoint written", out)
    assert stopped, out[-2000:]
    step = int(stopped[1])
    assert 100 <= step < 500
    checkpoint = run_dir / "checkpoints" / f"checkpoint-{step:012d}"
    assert json.loads((checkpoint / "manifest.json").read_text())["metadata"]["collected_frames"] == step

    result = run(TRAIN, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {checkpoint} at step {step}" in result.stdout
    assert [s for s, _ in read_eval_csv(run_dir / "eval.csv")] == [250, 500]


def test_train_checkpoint_resume_evaluate_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    first = run(TRAIN, *TINY, "steps=300", "eval_interval=300", "buffer_size=400", f"run_dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "[eval] dream_mpc step 300" in first.stdout
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "checkpoint-000000000100", "checkpoint-000000000200", "checkpoint-000000000300"]
    for name in ("config.yaml", "eval.csv", "world_model.pt", "tb", "csv"):
        assert (run_dir / name).exists(), name

    # a changed model is refused, naming the field, before anything is loaded
    refused = run(TRAIN, *TINY, "model.latent_dim=24", "steps=400", "buffer_size=400", f"run_dir={run_dir}")
    assert refused.returncode != 0
    assert "world_model.latent_dim: checkpoint has 16, this run has 24" in refused.stderr

    # extend the run: resume at 300, end at 400
    second = run(TRAIN, *TINY, "steps=400", "eval_interval=300", "buffer_size=400", f"run_dir={run_dir}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "at step 300" in second.stdout
    assert [step for step, _ in read_eval_csv(run_dir / "eval.csv")] == [300, 400]

    # evaluate the trainer checkpoint with three planners on the same seeds
    out = tmp_path / "eval"
    evaluated = run(EVALUATE, f"checkpoint={run_dir}", "planners=[policy,mppi,dream_mpc]", "episodes=2",
                    "max_steps=100", "threads=1", f"output_dir={out}", "+planner_args.mppi.num_samples=32",
                    "+planner_args.mppi.num_elites=4", "+planner_args.mppi.iterations=1",
                    "+planner_args.mppi.num_pi_trajs=4")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "cartpole-swingup" and "checkpoint-000000000400" in results["source"]
    assert [row["planner"] for row in results["results"]] == ["policy", "mppi", "dream_mpc"]
    for row in results["results"]:
        assert row["episodes"] == 2 and row["plan_ms_per_step"] > 0 and row["mean_episode_length"] == 100
        # every episode's return is kept (paired comparisons) and agrees with TorchRL's mean and std
        returns = torch.tensor(row["episode_returns"])
        assert len(returns) == 2 and returns[0] != returns[1]
        assert returns.mean().item() == pytest.approx(row["return_mean"], rel=1e-5, abs=1e-4)
        assert returns.std().item() == pytest.approx(row["return_std"], rel=1e-4, abs=1e-4)
    assert (out / "results.csv").read_text().splitlines()[0].startswith("planner,return_mean,return_std")
    # progress: not a terminal here, so one line per episode; each planner's row printed as soon as it is done
    lines = evaluated.stdout.splitlines()
    first = {key: next(i for i, line in enumerate(lines) if line.startswith(key))
             for key in ("[eval] policy: episode 2/2, return", "policy ", "[eval] mppi: episode 2/2", "mppi ",
                         "[eval] dream_mpc: episode 2/2", "dream_mpc ")}
    assert list(first.values()) == sorted(first.values()), evaluated.stdout
    # ... and the world-model file the run wrote at its end
    from_file = run(EVALUATE, f"checkpoint={run_dir / 'world_model.pt'}", "task=cartpole-swingup",
                    "planners=[policy]", "episodes=2", "max_steps=100", "threads=1",
                    f"output_dir={tmp_path / 'eval2'}")
    assert from_file.returncode == 0, from_file.stderr[-3000:]
    again = json.loads((tmp_path / "eval2" / "results.json").read_text())["results"][0]
    assert again["planner"] == "policy"
    # The same weights (the last checkpoint and world_model.pt are the same model), the deterministic prior and the
    # same initial states (seed): exactly the same return. A different episode start would change it.
    assert again["episode_returns"] == results["results"][0]["episode_returns"]


# ---------------------------------------------------------------------------------------------------- evaluate.py
def _load_evaluate_module():
    spec = importlib.util.spec_from_file_location("evaluate_recipe", EVALUATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def evaluate_inputs(tmp_path_factory):
    """A trainer run (60 steps, tiny model), its world_model.pt, and broken files."""
    from torchrl_dreammpc.checkpoints import save_world_model
    from torchrl_dreammpc.envs import make_env
    from torchrl_dreammpc.modules import TDMPC2WorldModel
    from torchrl_dreammpc.planners import PolicyActor
    from torchrl_dreammpc.trainers import DreamMPCTrainer

    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    wm = TDMPC2WorldModel(5, 1, model_size=1, enc_dim=32, mlp_dim=32, latent_dim=16)
    DreamMPCTrainer(create_env_fn=functools.partial(make_env, "cartpole-swingup", seed=1), world_model=wm,
                    actor=PolicyActor(wm), total_frames=60, batch_size=8, seed_frames=50, pretrain_updates=2,
                    buffer_capacity=100, eval_interval=0, eval_at_start=False, log_dir=root / "run",
                    checkpoint_dir=root / "run" / "checkpoints", checkpoint_interval=50, task="cartpole-swingup",
                    planner_name="policy", verbose=False).train()
    model_file = root / "run" / "world_model.pt"
    raw = model_file.read_bytes()
    (root / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (root / "garbage.pt").write_bytes(b"not a checkpoint " * 50)
    torch.save({"weights": torch.zeros(3)}, root / "foreign.pt")
    with torch.no_grad():
        wm.encoder.module[0].weight[0, 0] = float("nan")
    save_world_model(wm, root / "nan.pt")
    return root


def _evaluate_error(module, root, monkeypatch=None, **overrides) -> str:
    cfg = OmegaConf.load(CONFIG_DIR / "evaluate.yaml")
    for key in ("defaults", "hydra"):
        cfg.pop(key)
    cfg.merge_with({"planners": ["policy"], "episodes": 1, "output_dir": str(root / "out"), **overrides})
    with pytest.raises(SystemExit) as info:
        module.main(cfg)  # hydra.main passes a given config straight to the function
    message = str(info.value.code)
    assert message.startswith("evaluate.py: ") and "\n" not in message, message
    return message


def test_evaluate_reports_each_user_error_in_one_line(evaluate_inputs, monkeypatch):
    module, root = _load_evaluate_module(), evaluate_inputs
    run, model = root / "run", root / "run" / "world_model.pt"
    cases = [
        (dict(checkpoint=str(root / "nope")), "does not exist"),
        (dict(checkpoint=str(root / "garbage.pt"), task="cartpole-swingup"),
         f"cannot load {root / 'garbage.pt'} .*truncated/corrupted or not a checkpoint"),
        (dict(checkpoint=str(root / "truncated.pt"), task="cartpole-swingup"),
         f"cannot load {root / 'truncated.pt'} .*truncated/corrupted"),
        (dict(checkpoint=str(root / "foreign.pt"), task="cartpole-swingup"),
         f"cannot load {root / 'foreign.pt'} .*does not look like a TD-MPC2 world-model checkpoint"),
        (dict(checkpoint=str(root / "nan.pt"), task="cartpole-swingup"),
         r"holds NaN/inf values in 1 tensor\(s\) .*encoder.module.0.weight"),
        (dict(checkpoint=str(model), task="walker-walk"), "Checkpoint expects observation width 5, the task gives 24"),
        (dict(checkpoint=str(run), task="walker-walk"), "task='walker-walk' but the checkpoint was trained on"),
        (dict(checkpoint=str(model), task="walker-wlak"), "Unknown task 'walker-wlak'. Did you mean 'walker-walk'"),
        (dict(checkpoint=str(model)), r"task=\.\.\. is required"),
        (dict(checkpoint=str(model), task="cartpole-swingup", planners=["cem"]), "Unknown planner 'cem'"),
        (dict(checkpoint=str(model), task="cartpole-swingup", episodes=0), "episodes must be an integer >= 1"),
        (dict(checkpoint=str(model), task="cartpole-swingup", planner_args={"dreammpc": {"lr": 1}}),
         r"planner_args names \['dreammpc'\]"),
        (dict(checkpoint=str(model), task="cartpole-swingup", planners=["dream_mpc"],
              planner_args={"dream_mpc": {"lr": -1}}), "planner dream_mpc .*lr must be > 0.0, got -1"),
        (dict(checkpoint=str(model), task="cartpole-swingup", model_size=5),
         f"model_size=5 but model file {model} holds a model of size 1"),
        (dict(checkpoint=str(model), task="cartpole-swingup", model_size="cpu"), "model_size='cpu' but model file"),
        (dict(checkpoint=str(run), model_size=5), "model_size=5 but trainer checkpoint .* holds a model of size 1"),
        (dict(checkpoint=str(model), task="cartpole-swingup", exploration="sample"),
         r"exploration must be one of \['deterministic', 'random'\], got 'sample'"),
    ]
    for overrides, pattern in cases:
        message = _evaluate_error(module, root, **overrides)
        assert re.search(pattern, message), (overrides, message)
    # a missing optional suite (HumanoidBench here): the install hint, on one line
    from torchrl_dreammpc.envs import humanoid

    monkeypatch.setattr(humanoid, "is_installed", lambda: False)
    message = _evaluate_error(module, root, checkpoint=str(model), task="humanoid_h1-walk-v0")
    assert "a package this task needs is missing: HumanoidBench is not installed" in message
    # a trainer checkpoint whose weight file was cut short
    victim = sorted(run.glob("checkpoints/checkpoint-000000000060/components/*-loss_module/state/*.memmap"))[0]
    victim.write_bytes(victim.read_bytes()[:4])
    assert "(a truncated copy?)" in _evaluate_error(module, root, checkpoint=str(run))


def test_evaluate_in_random_mode_plays_the_prior_s_samples(evaluate_inputs):
    """``exploration=random``: the policy prior acts with samples (another return than its mean's on the same
    initial states, and again the same return on a rerun: the samples are seeded); the mode is recorded."""
    module, root = _load_evaluate_module(), evaluate_inputs
    cfg = OmegaConf.load(CONFIG_DIR / "evaluate.yaml")
    for key in ("defaults", "hydra"):
        cfg.pop(key)
    returns = {}
    for run, mode in enumerate(["deterministic", "random", "random"]):
        out = root / f"mode-{run}"
        cfg.merge_with({"checkpoint": str(root / "run" / "world_model.pt"), "task": "cartpole-swingup",
                        "planners": ["policy"], "episodes": 1, "max_steps": 50,
                        "output_dir": str(out), "progress": False, "exploration": mode})
        module.main(cfg)
        results = json.loads((out / "results.json").read_text())
        assert results["exploration"] == mode
        returns[run] = results["results"][0]["episode_returns"][0]
    assert returns[1] != returns[0]
    assert returns[2] == returns[1]


def test_evaluate_max_steps_cuts_the_episodes_and_video_records_each_planner(evaluate_inputs, gl):
    """``max_steps`` cuts the evaluated episodes (cartpole's are 500 steps) and ``video=true``'s: one MP4 per
    planner, its path in the results; the returns are those of the evaluation without video."""
    import imageio.v2 as imageio

    module, root = _load_evaluate_module(), evaluate_inputs
    results = {}
    for video in (False, True):
        cfg = OmegaConf.load(CONFIG_DIR / "evaluate.yaml")
        for key in ("defaults", "hydra"):
            cfg.pop(key)
        out = root / f"video-{video}"
        cfg.merge_with({"checkpoint": str(root / "run" / "world_model.pt"), "task": "cartpole-swingup",
                        "planners": ["policy", "dream_mpc"], "episodes": 1, "max_steps": 8, "video": video,
                        "video_size": [32, 48], "output_dir": str(out), "progress": False})
        module.main(cfg)
        results[video] = json.loads((out / "results.json").read_text())["results"]
    for row, plain in zip(results[True], results[False]):
        assert row["episode_returns"] == plain["episode_returns"]
        assert row["mean_episode_length"] == plain["mean_episode_length"] == 8
        assert "video" not in plain
        frames = imageio.mimread(row["video"])
        assert Path(row["video"]).name == f"{row['planner']}.mp4"
        assert len(frames) == 9 and frames[0].shape == (32, 48, 3)  # the reset and 8 agent steps


def test_evaluate_reports_the_diagnostics_of_planners_that_write_them(evaluate_inputs):
    module, root = _load_evaluate_module(), evaluate_inputs
    cfg = OmegaConf.load(CONFIG_DIR / "evaluate.yaml")
    for key in ("defaults", "hydra"):
        cfg.pop(key)
    out = root / "diagnostics"
    cfg.merge_with({"checkpoint": str(root / "run" / "world_model.pt"), "task": "cartpole-swingup",
                    "planners": ["policy", "dream_mpc"], "episodes": 1, "max_steps": 5, "output_dir": str(out),
                    "progress": False, "planner_args": {"dream_mpc": {"diagnostics": True}},
                    "device": "auto"})  # (resolved: cuda where there is one, cpu here)
    module.main(cfg)
    policy, dream_mpc = json.loads((out / "results.json").read_text())["results"]
    assert not any(key.startswith("planner/") for key in policy)
    assert {"planner/objective_before", "planner/objective_after", "planner/uncertainty"} <= set(dream_mpc)
    assert "planner/objective_after" in (out / "results.csv").read_text().splitlines()[0]


def test_evaluate_cli_exits_with_one_line(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"junk")
    result = run(EVALUATE, f"checkpoint={tmp_path / 'bad.pt'}", "task=cartpole-swingup", timeout=120)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[0].startswith(f"evaluate.py: cannot load {tmp_path / 'bad.pt'}"), lines


# ---------------------------------------------------------------------------------------------------------------
# algorithm=bmpc
# ---------------------------------------------------------------------------------------------------------------
BMPC_TINY = ["algorithm=bmpc", "algorithm_options.reanalyze.num_slices=4", "algorithm_options.reanalyze.interval=5",
             "algorithm_options.reanalyze.planner.num_samples=32", "algorithm_options.reanalyze.planner.num_elites=4",
             "algorithm_options.reanalyze.planner.num_pi_trajs=4", "algorithm_options.reanalyze.planner.iterations=2"]


def test_bmpc_config_is_bmpcs_and_is_validated():
    cfg = compose_train("algorithm=bmpc", "model_size='5'")
    # no model.episodic: a run derives it (BMPC's models never have a termination head, see make_world_model)
    assert cfg["algorithm"] == "bmpc" and "episodic" not in cfg["model"]
    assert cfg["loss"] == {"consistency_coef": 20.0, "reward_coef": 0.1, "value_coef": 0.1, "rho": 0.5}
    assert cfg["policy_loss"] == {"entropy_coef": 1e-4, "rho": 0.5}
    options = cfg["algorithm_options"]
    assert options["acting_expert"] is True
    assert (options["reanalyze"]["interval"], options["reanalyze"]["num_slices"]) == (10, 20)
    assert options["reanalyze"]["planner"] == {"num_samples": 512, "num_elites": 64, "iterations": 6,
                                               "num_pi_trajs": 24, "horizon": 3, "temperature": 0.5, "min_std": 0.05,
                                               "max_std": 2.0}
    assert "num_q" not in cfg["model"]  # BMPCConfig's default, 2 (BMPC's config.yaml)
    assert compose_train("algorithm=bmpc", "model_size='317'")["model"]["num_q"] == 8  # BMPC's size table too

    def check(*overrides, algorithm="bmpc"):
        cfg = compose_train(f"algorithm={algorithm}", "model_size='1'", "steps=5000", *overrides)
        cfg["run_dir"] = "unused"
        return validate_train_config(cfg)

    check()
    check("planner=mppi")
    with pytest.raises(ConfigError, match="reanalyze.num_slices=300 exceeds batch_size=256"):
        check("algorithm_options.reanalyze.num_slices=300")
    with pytest.raises(ConfigError, match="reanalyze.interval must be an integer >= 0, got -1"):
        check("algorithm_options.reanalyze.interval=-1")
    with pytest.raises(ConfigError, match=r"Unknown reanalyze option\(s\) \['intervall'\]"):
        check("+algorithm_options.reanalyze.intervall=3")
    with pytest.raises(ConfigError, match="num_elites .* must be <= num_samples"):
        check("algorithm_options.reanalyze.planner.num_elites=1000")
    with pytest.raises(ConfigError, match="entropy_coef must be >= 0"):
        check("policy_loss.entropy_coef=-1")
    with pytest.raises(ConfigError, match=r"algorithm_options \['acting_expert'\] only apply to algorithm=bmpc"):
        check("+algorithm_options.acting_expert=true", algorithm="tdmpc2")


def test_bmpc_sigkill_during_training_resumes_and_evaluates(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, *BMPC_TINY, "steps=300", "eval_interval=300", f"run_dir={run_dir}"]
    code, _, _ = _signal_after_checkpoint(args, run_dir / "checkpoints" / "checkpoint-000000000200", signal.SIGKILL)
    assert code == -signal.SIGKILL
    result = run(TRAIN, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    final = run_dir / "checkpoints" / "checkpoint-000000000300"
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["metadata"]["collected_frames"] == 300 and manifest["metadata"]["fingerprint"]["algorithm"] == "bmpc"
    assert "trainer_module.reanalyze" in manifest["components"]
    assert [step for step, _ in read_eval_csv(run_dir / "eval.csv")] == [300]
    from torchrl_dreammpc.trainers import load_world_model_from_trainer_checkpoint

    model, fingerprint = load_world_model_from_trainer_checkpoint(run_dir)
    assert type(model).__name__ == "BMPCWorldModel" and fingerprint["world_model"]["num_q"] == 2
    evaluated = run(EVALUATE, f"checkpoint={run_dir}", "planners=[dream_mpc]", "episodes=1", "threads=1",
                    f"output_dir={tmp_path / 'eval'}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    assert [row["planner"] for row in rows] == ["dream_mpc"] and "checkpoint-000000000300" in evaluated.stdout
