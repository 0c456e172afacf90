"""The benchmark campaign: train every run of ``benchmarks/campaign.yaml``, evaluate planner swaps on its
snapshots, and write the report (``docs/results/benchmark.md`` + ``docs/results/benchmark/``).

    python benchmarks/campaign.py                  # continue where the last call stopped (resumable)
    python benchmarks/campaign.py --report-only    # rewrite the report from what the run directories hold
    python benchmarks/campaign.py --status         # one line per run: steps trained, swaps done / owed

Work, in order, for each run of the YAML (one at a time, ``threads`` torch threads per process, so one core
stays free for other work):

1. snapshots: the run's world model at every evaluation point (``snapshot_interval``, train.py). A run started
   before the campaign existed (``recipes/train.py`` by hand, in the same run directory) is adopted: its
   trainer checkpoints at evaluation points are turned into snapshots;
2. planner swaps: every planner of ``swaps`` on every snapshot that lacks its result (``recipes/evaluate.py``
   on the snapshot: the same initial states for every planner, DETERMINISTIC mode), results in
   ``<run dir>/swaps/step_<N>/<swap name>/results.json``; and the policy prior's state on each snapshot
   (``benchmarks/policy_prior_state.py``: saturation and width, ``<run dir>/policy_prior.json``);
3. the report is rewritten;
4. the next ``chunk`` of training (``recipes/train.py ... steps=<next evaluation point> resume=true``).

Re-running the command after an interruption continues: a killed training chunk resumes from its last
checkpoint (train.py), a killed evaluation is redone, nothing finished is redone. Child processes die with the
campaign, and a lock file refuses a second campaign on the same ``runs_root``. SIGTERM or Ctrl-C is a clean stop
(exit code 143 / 130): the training in progress first writes a checkpoint of the step it reached.

A second lane on the other core: ``--only RUN_ID`` (repeatable) works through those runs alone, beside the main
campaign. Every campaign process claims a run (a lock file per run in ``runs_root``) before working on it and
skips a run that another one holds; report rewrites take turns (``runs_root/.report.lock``)::

    python benchmarks/campaign.py --only cartpole-swingup-dream_mpc-1M-s1-dreamer_v3

A swaps lane on the other core: ``--swaps-lane`` evaluates the planner swaps of the runs the main campaign
trains, as their snapshots appear, so that training goes on meanwhile (without it, training waits for every
snapshot's swaps); the main campaign leaves a run's swaps to the lane while the lane holds them::

    python benchmarks/campaign.py --swaps-lane

A run directory that is gone (a new machine) is started again from scratch; the rows that an earlier machine
produced for it stay in the committed report until the new run directory has its own (a run whose committed
record says it finished is not trained again: ``--rerun TASK`` forces it).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _report import machine_info  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().with_suffix(".yaml")
TRAIN = ROOT / "recipes" / "train.py"
EVALUATE = ROOT / "recipes" / "evaluate.py"
PLANNER_DIR = ROOT / "recipes" / "config" / "planner"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
SNAPSHOT_NAME = re.compile(r"step_(\d+)\.pt")


class CampaignError(ValueError):
    """An invalid campaign YAML, or a state the campaign refuses to continue from; the message says which."""


# ----------------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Swap:
    """One planner evaluated on snapshots: a planner file + overrides, episodes, and when."""

    name: str
    planner: str
    episodes: int
    args: dict[str, Any] = field(default_factory=dict)
    steps: tuple[int, ...] | None = None  # None: every snapshot
    exploration: str = "deterministic"  # evaluate.py's mode: "random" plays the stochastic actor (prior samples)

    def due_at(self, step: int) -> bool:
        return self.steps is None or step in self.steps


@dataclass
class Run:
    """One training run of the campaign and its run directory."""

    task: str
    suite: str
    train: dict[str, Any]
    run_dir: Path
    score_scale: float | None = None

    @property
    def id(self) -> str:
        return run_id(self.task, self.train)

    @property
    def steps(self) -> int:
        return int(self.train["steps"])


def run_id(task: str, train: dict[str, Any]) -> str:
    """``<task>-<planner>-<size>M-s<seed>`` (+ ``-<algorithm>`` unless TD-MPC2): the run directory's name."""
    name = f"{task}-{train['planner']}-{train['model_size']}M-s{train['seed']}"
    algorithm = train.get("algorithm", "tdmpc2")
    return name if algorithm == "tdmpc2" else f"{name}-{algorithm}"


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else (ROOT / path).resolve()


def _positive_int(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CampaignError(f"{where} must be a positive integer, got {value!r}.")
    return value


def load_campaign(path: str | Path) -> dict[str, Any]:
    """Reads and checks a campaign YAML; returns ``{"runs": [Run], "swaps": [Swap], ...}``.

    Raises:
        CampaignError: naming the offending entry (unknown task or planner file, a duplicate run, a chunk that
            does not divide the evaluation interval, ...).
    """
    from torchrl_dreammpc.envs import task_info

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise CampaignError(f"cannot read the campaign file {path}: {err}") from err
    if not isinstance(raw, dict):
        raise CampaignError(f"{path}: expected a mapping at the top level.")
    missing = [key for key in ("runs_root", "report", "train", "swaps", "runs", "chunk", "eval_seed") if key not in raw]
    if missing:
        raise CampaignError(f"{path}: missing keys {missing}.")
    threads = _positive_int("threads", raw.get("threads", 1))
    chunk = _positive_int("chunk", raw["chunk"])
    swaps = []
    for name, spec in raw["swaps"].items():
        planner = spec.get("planner")
        if not (PLANNER_DIR / f"{planner}.yaml").exists():
            raise CampaignError(f"swaps.{name}: no planner file recipes/config/planner/{planner}.yaml.")
        steps = spec.get("steps")
        if steps is not None:
            steps = tuple(_positive_int(f"swaps.{name}.steps", int_step) for int_step in steps)
        unknown = set(spec) - {"planner", "episodes", "args", "steps", "exploration"}
        if unknown:
            raise CampaignError(f"swaps.{name}: unknown keys {sorted(unknown)}.")
        exploration = spec.get("exploration", "deterministic")
        if exploration not in ("deterministic", "random"):
            raise CampaignError(f"swaps.{name}.exploration must be deterministic or random, got {exploration!r}.")
        swaps.append(Swap(name, planner, _positive_int(f"swaps.{name}.episodes", spec.get("episodes")),
                          dict(spec.get("args") or {}), steps, exploration))
    runs_root = _resolve(raw["runs_root"])
    runs, seen = [], set()
    for i, entry in enumerate(raw["runs"]):
        entry = dict(entry)
        task = entry.pop("task", None)
        try:
            info = task_info(task)
        except (TypeError, ValueError) as err:
            raise CampaignError(f"runs[{i}]: {err}") from err
        score_scale = entry.pop("score_scale", None)
        if info.suite == "humanoid_bench" and score_scale is None:
            raise CampaignError(f"runs[{i}] ({task}): HumanoidBench runs need score_scale (the task's success "
                                "threshold, HumanoidBench's success_bar) for the normalized score.")
        train = {**raw["train"], **entry}
        for key in ("steps", "seed", "eval_interval", "snapshot_interval"):
            _positive_int(f"runs[{i}].{key}", train.get(key))
        if chunk % train["snapshot_interval"]:
            raise CampaignError(f"runs[{i}]: chunk={chunk} must be a multiple of snapshot_interval "
                                f"({train['snapshot_interval']}) so that every chunk ends at a snapshot.")
        run = Run(info.task, info.suite, train, runs_root / run_id(info.task, train), score_scale)
        if run.id in seen:
            raise CampaignError(f"runs[{i}]: run {run.id} is listed twice.")
        seen.add(run.id)
        runs.append(run)
    return {"runs": runs, "swaps": swaps, "runs_root": runs_root, "report": _resolve(raw["report"]),
            "threads": threads, "chunk": chunk, "eval_seed": int(raw["eval_seed"]), "path": path}


# ----------------------------------------------------------------------------------------------------------------
# state of a run directory
# ----------------------------------------------------------------------------------------------------------------
def checkpoints(run: Run) -> dict[int, Path]:
    """Complete trainer checkpoints of a run, by step."""
    from torchrl.checkpoint import CheckpointRotation

    directory = run.run_dir / "checkpoints"
    if not directory.is_dir():
        return {}
    found = {}
    for path in CheckpointRotation(directory, keep_last=1).checkpoints():
        match = CHECKPOINT_NAME.fullmatch(path.name)
        if match:
            found[int(match[1])] = path
    return found


def trained_step(run: Run) -> int:
    found = checkpoints(run)
    return max(found) if found else 0


def snapshots(run: Run) -> dict[int, Path]:
    directory = run.run_dir / "snapshots"
    found = {}
    for path in directory.glob("step_*.pt") if directory.is_dir() else ():
        match = SNAPSHOT_NAME.fullmatch(path.name)
        if match:
            found[int(match[1])] = path
    return found


def adopt_checkpoints(run: Run, interval: int) -> list[int]:
    """Snapshots from trainer checkpoints at evaluation points that have none (a run started by hand)."""
    from torchrl_dreammpc.checkpoints import save_world_model
    from torchrl_dreammpc.trainers import WorldModelSnapshots, load_world_model_from_trainer_checkpoint

    have, made = snapshots(run), []
    for step, path in sorted(checkpoints(run).items()):
        if step % interval == 0 and step not in have:
            world_model, _ = load_world_model_from_trainer_checkpoint(path)
            save_world_model(world_model, WorldModelSnapshots.path_for(run.run_dir / "snapshots", step))
            made.append(step)
    return made


def swap_dir(run: Run, step: int, swap: Swap) -> Path:
    return run.run_dir / "swaps" / f"step_{step:08d}" / swap.name


def pending_swaps(run: Run, swaps: list[Swap]) -> list[tuple[int, Swap]]:
    return [(step, swap) for step in sorted(snapshots(run)) for swap in swaps
            if swap.due_at(step) and not (swap_dir(run, step, swap) / "results.json").exists()]


# ----------------------------------------------------------------------------------------------------------------
# child processes
# ----------------------------------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM when the campaign dies (Linux), so no orphan keeps training."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _override(key: str, value: Any) -> str:
    if isinstance(value, bool):
        value = str(value).lower()
    elif value is None:
        value = "null"
    return f"{key}={value}"


class CampaignStopped(Exception):
    """The campaign received SIGTERM or SIGINT and stopped after its child process (see :func:`stop_on_signals`)."""

    def __init__(self, signum: signal.Signals) -> None:
        super().__init__(f"stopped by {signum.name}")
        self.signum = signum


#: Signals received under :func:`stop_on_signals`, and the child process running now (at most one).
_received: list[signal.Signals] = []
_running: list[subprocess.Popen] = []


def _forward_stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM / SIGINT stop the campaign cleanly: the running child gets SIGTERM and is waited for (train.py
    writes a checkpoint of the step it reached; an evaluation dies and is redone next time), its training chunk
    is recorded, and :class:`CampaignStopped` is raised instead of starting anything else. Without this, a
    SIGTERM would kill the campaign at once and its child (``PR_SET_PDEATHSIG``) a moment later, losing the steps
    since the child's last periodic checkpoint."""
    def handler(signum, frame):
        _received.append(signal.Signals(signum))
        if len(_received) == 1:
            for proc in _running:
                _forward_stop(proc)

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
        _received.clear()


def raise_if_stopped() -> None:
    if _received:
        raise CampaignStopped(_received[0])


def _run_child(cmd: list[str], log: Path, threads: int) -> int:
    raise_if_stopped()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"), "PYTHONPATH": str(ROOT)}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"\n# {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC: {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                preexec_fn=_die_with_parent)
        _running.append(proc)
        if _received:  # a signal that came while it started
            _forward_stop(proc)
        try:
            return proc.wait()
        finally:
            _running.remove(proc)


def train_command(run: Run, until: int, threads: int) -> list[str]:
    """recipes/train.py up to step ``until`` of ``run`` (the replay capacity of the whole run, so that every chunk
    resumes the same buffer: TD-MPC2's min(steps, 1M))."""
    args = {**run.train, "task": run.task, "steps": until, "run_dir": run.run_dir, "resume": True,
            "threads": threads, "buffer_size": run.train.get("buffer_size") or min(run.steps, 1_000_000)}
    if args.get("algorithm") == "dreamer_v3":
        # the campaign's TD-MPC2 model size names the run (run_id) but is not a DreamerV3 setting (train.py refuses
        # it there: DreamerV3's size is dreamer.model_size, set by its preset)
        args.pop("model_size", None)
    return [sys.executable, str(TRAIN), *(_override(key, value) for key, value in args.items())]


def evaluate_command(run: Run, step: int, swap: Swap, eval_seed: int, threads: int) -> list[str]:
    snapshot = snapshots(run)[step]
    cmd = [sys.executable, str(EVALUATE), f"checkpoint={snapshot}", f"task={run.task}",
           f"planners=[{swap.planner}]", f"episodes={swap.episodes}", f"seed={eval_seed}", f"threads={threads}",
           f"output_dir={swap_dir(run, step, swap)}"]
    if swap.exploration != "deterministic":
        cmd.append(f"exploration={swap.exploration}")
    return cmd + [_override(f"+planner_args.{swap.planner}.{key}", value) for key, value in swap.args.items()]


def _printable(cmd: list[str]) -> str:
    """The command as a user types it from the repository root: ``python recipes/train.py ...``."""
    script = os.path.relpath(cmd[1], ROOT)
    return " ".join(["python", script, *cmd[2:]])


def prior_pending(run: Run) -> bool:
    """Whether a snapshot lacks its policy-prior diagnosis (benchmarks/policy_prior_state.py)."""
    path = run.run_dir / "policy_prior.json"
    done = set(json.loads(path.read_text())["snapshots"]) if path.exists() else set()
    return any(str(step) not in done for step in snapshots(run))


def diagnose_prior(run: Run, eval_seed: int, threads: int) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "policy_prior_state.py"), "--run-dir", str(run.run_dir),
           "--task", run.task, "--seed", str(eval_seed)]
    code = _run_child(cmd, run.run_dir / "swaps" / "policy_prior.log", threads)
    raise_if_stopped()
    if code != 0:
        raise CampaignError(f"{run.id}: the policy-prior diagnosis failed (exit code {code}); see "
                            f"{run.run_dir / 'swaps' / 'policy_prior.log'}.")


def say(message: str) -> None:
    """One line of the campaign's log, stamped with the UTC time (the log spans sessions and days)."""
    print(f"[campaign {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%SZ}] {message}", flush=True)


def _record_chunk(run: Run, record: dict[str, Any]) -> None:
    from torchrl_dreammpc.checkpoints import write_text_atomic

    path = run.run_dir / "campaign.json"
    state = json.loads(path.read_text()) if path.exists() else {"run": run.id, "chunks": []}
    state["chunks"].append(record)
    write_text_atomic(path, json.dumps(state, indent=2))


def train_chunk(run: Run, until: int, threads: int) -> None:
    start_step, start = trained_step(run), time.time()
    cmd = train_command(run, until, threads)
    say(f"{run.id}: training {start_step} -> {until}")
    code = _run_child(cmd, run.run_dir / "campaign.log", threads)
    end_step = trained_step(run)
    _record_chunk(run, {"from": start_step, "to": end_step, "target": until, "returncode": code,
                        "start": dt.datetime.fromtimestamp(start, dt.timezone.utc).isoformat(timespec="seconds"),
                        "wall_s": round(time.time() - start, 1), "command": _printable(cmd),
                        "machine": machine_info()["cpu"]})
    raise_if_stopped()
    if code != 0 or end_step < until:
        raise CampaignError(f"{run.id}: recipes/train.py stopped with exit code {code} at step {end_step} "
                            f"(wanted {until}); see {run.run_dir / 'campaign.log'}.")


def evaluate_swap(run: Run, step: int, swap: Swap, eval_seed: int, threads: int) -> None:
    say(f"{run.id}: step {step}, {swap.name} ({swap.episodes} episodes)")
    out = swap_dir(run, step, swap)
    code = _run_child(evaluate_command(run, step, swap, eval_seed, threads), out.parent / f"{swap.name}.log",
                      threads)
    raise_if_stopped()
    if code != 0 or not (out / "results.json").exists():
        raise CampaignError(f"{run.id}: evaluation of {swap.name} at step {step} failed (exit code {code}); see "
                            f"{out.parent / (swap.name + '.log')}.")


# ----------------------------------------------------------------------------------------------------------------
# the campaign
# ----------------------------------------------------------------------------------------------------------------
class CampaignLock:
    """An exclusive lock on ``<runs_root>/<name>`` (released by the OS when the process dies): by default the
    whole runs root (the main campaign); :meth:`claim` takes one run's.

    ``wait_s``: how long a held lock is retried. The probes (:meth:`held`, ``--status``, the swaps lane) take a
    free lock for a moment to see that it is free, so a real owner retries briefly rather than mistake a probe for
    another campaign (the main campaign would otherwise skip a run, out of the YAML's order)."""

    MAIN = ".campaign.lock"  # the main campaign's, on the whole runs root

    def __init__(self, runs_root: Path, name: str = MAIN, what: str | None = None,
                 wait_s: float = 0.5) -> None:
        runs_root.mkdir(parents=True, exist_ok=True)
        self.path = runs_root / name
        self.file = self.path.open("a+")
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                self.file.seek(0)
                holder = self.file.read().strip() or "another process"
                self.file.close()
                raise CampaignError(f"{what or runs_root} is in use by another campaign ({holder}); wait for it "
                                    "or stop it.") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}")
        self.file.flush()

    @staticmethod
    def claim_name(run: Run) -> str:
        return f".campaign-{run.id}.lock"

    @staticmethod
    def swaps_name(run: Run) -> str:
        return f".campaign-{run.id}.swaps.lock"

    @classmethod
    def claim(cls, run: Run, wait_s: float = 0.5) -> "CampaignLock":
        """This process's claim on ``run`` (CampaignError if another campaign holds it)."""
        return cls(run.run_dir.parent, cls.claim_name(run), what=run.id, wait_s=wait_s)

    @classmethod
    def swaps_turn(cls, run: Run) -> "CampaignLock | None":
        """This process's turn at evaluating ``run``'s planner swaps (and its policy-prior diagnosis), or ``None``
        while another process has it (a swaps lane, or the lane training the run between two chunks)."""
        try:
            return cls(run.run_dir.parent, cls.swaps_name(run), what=f"{run.id}'s planner swaps")
        except CampaignError:
            return None

    @classmethod
    def held(cls, runs_root: Path, name: str) -> bool:
        """Whether some process holds the lock ``runs_root / name`` now (a probe: the lock taken for a moment when
        it is free), e.g. ``held(run.run_dir.parent, CampaignLock.claim_name(run))``: is the run being trained."""
        try:
            cls(runs_root, name, wait_s=0.0).release()
        except CampaignError:
            return True
        return False

    @classmethod
    def training(cls, run: Run) -> bool:
        """Whether some campaign process holds its claim on ``run`` (is training it) now."""
        return cls.held(run.run_dir.parent, cls.claim_name(run))

    def release(self) -> None:
        self.file.close()  # closing the file drops the flock


@contextlib.contextmanager
def report_turn(runs_root: Path):
    """Waits for, then holds, the report lock: two lanes never rewrite the report at the same time."""
    runs_root.mkdir(parents=True, exist_ok=True)
    with (runs_root / ".report.lock").open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def rewrite_report(campaign: dict[str, Any]) -> Path:
    """The report, from the campaign YAML as it is now: a lane that runs for days keeps the runs added to the
    YAML since it started (their committed rows and records), which the YAML it read at its start lacks."""
    from campaign_report import write_report

    try:
        current = load_campaign(campaign["path"])
    except Exception as err:  # noqa: BLE001 (a YAML being edited must not stop a running lane)
        say(f"report: the campaign file does not load now ({type(err).__name__}: {err}); written for the runs "
            "this process started with")
        current = campaign
    if (current["runs_root"], current["report"]) != (campaign["runs_root"], campaign["report"]):
        say("report: the campaign file names another runs_root or report now; this process keeps its own")
        current = campaign
    with report_turn(campaign["runs_root"]):
        return write_report(current)


def work_through(campaign: dict[str, Any], runs: list[Run], rerun: list[str]) -> None:
    """``continue_run`` on each of ``runs`` in order, skipping (with a line saying so) a run another campaign
    process has claimed."""
    for run in runs:
        try:
            claim = CampaignLock.claim(run)
        except CampaignError as err:
            say(f"{run.id}: skipped: {err}")
            continue
        try:
            continue_run(campaign, run, rerun=run.task in rerun)
        finally:
            claim.release()


def finished_in_report(campaign: dict[str, Any], run: Run) -> bool:
    """Whether the committed report records ``run`` as finished (its run directory may be gone)."""
    from campaign_report import read_committed_runs

    return _finished(read_committed_runs(campaign["report"]).get(run.id), run)


def _finished(record: dict[str, Any] | None, run: Run) -> bool:
    """Whether a committed ``runs.json`` record says ``run`` trained to its end with every swap done."""
    return bool(record and record.get("trained_step", 0) >= run.steps and not record.get("swaps_pending"))


def continue_run(campaign: dict[str, Any], run: Run, rerun: bool) -> None:
    threads = campaign["threads"]
    if not run.run_dir.exists():
        if finished_in_report(campaign, run) and not rerun:
            say(f"{run.id}: finished on an earlier machine (committed report); skipped "
                f"(--rerun {run.task} to train it again)")
            return
        say(f"{run.id}: no run directory at {run.run_dir}: starting it from scratch")
    left_to_lane = False
    while True:
        made = adopt_checkpoints(run, int(run.train["snapshot_interval"]))
        if made:
            say(f"{run.id}: snapshots from trainer checkpoints at steps {made}")
        turn = CampaignLock.swaps_turn(run)
        if turn is None:  # a swaps lane evaluates them while this lane trains on
            if not left_to_lane:
                say(f"{run.id}: planner swaps left to the swaps lane that holds them")
            left_to_lane = True
        else:
            try:
                evaluate_pending(campaign, run)
            finally:
                turn.release()
        step = trained_step(run)
        if step >= run.steps:
            return
        until = min((step // campaign["chunk"] + 1) * campaign["chunk"], run.steps)
        train_chunk(run, until, threads)
        rewrite_report(campaign)


def evaluate_pending(campaign: dict[str, Any], run: Run) -> bool:
    """Every pending planner swap of ``run``'s snapshots, then its policy-prior diagnosis; the report after each.
    Returns whether there was any."""
    pending = pending_swaps(run, campaign["swaps"])
    for step, swap in pending:
        evaluate_swap(run, step, swap, campaign["eval_seed"], campaign["threads"])
        rewrite_report(campaign)
    diagnose = prior_pending(run)
    if diagnose:
        diagnose_prior(run, campaign["eval_seed"], campaign["threads"])
        rewrite_report(campaign)
    return bool(pending) or diagnose


def swaps_lane(campaign: dict[str, Any], runs: list[Run], poll_s: float = 30.0) -> None:
    """The planner swaps of ``runs`` on this core while other lanes train them on the other.

    Every ``poll_s`` seconds, for each run that a campaign process is training (its claim held) or that has
    swaps pending: take its swaps turn (waiting while its training lane evaluates between two chunks), hold it
    while the run trains (its training lane then leaves the swaps to this lane and trains on), and evaluate every
    pending swap as its snapshot appears; a run nobody trains is finished off and its turn released. The lane
    ends when no run is trained and the main campaign is gone (so start it after the main campaign). Training
    and evaluation then overlap instead of taking turns: on humanoid_h1hand-stand-v0 a snapshot's prior,
    sampled-prior and Dream-MPC swaps took ~15 min beside a 10k-step training chunk of 35-60 min, and MPPI's
    (at 50k and 100k) ~0.5 s per agent step."""
    turns: dict[str, CampaignLock] = {}
    waiting = False
    try:
        while True:
            trained = False
            for run in runs:
                training = CampaignLock.training(run)
                trained |= training
                if run.id not in turns and (training or pending_swaps(run, campaign["swaps"]) or prior_pending(run)):
                    turn = CampaignLock.swaps_turn(run)
                    if turn is None:
                        continue  # its training lane is evaluating now, or another swaps lane holds it
                    turns[run.id] = turn
                    say(f"{run.id}: swaps lane holds the run's planner swaps")
                if run.id in turns:
                    if evaluate_pending(campaign, run):
                        waiting = False
                    if not training:  # nobody trains it: everything due is evaluated
                        turns.pop(run.id).release()
            if not trained and not CampaignLock.held(campaign["runs_root"], CampaignLock.MAIN):
                say("swaps lane done: no run is being trained and no main campaign runs")
                return
            if not waiting:
                say("swaps lane waiting for the next snapshot")
                waiting = True
            _sleep(poll_s)
    finally:
        for turn in turns.values():
            turn.release()


def _sleep(seconds: float) -> None:
    """``time.sleep`` that a stop signal (:func:`stop_on_signals`) cuts short."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        raise_if_stopped()
        time.sleep(min(1.0, max(0.0, deadline - time.time())))
    raise_if_stopped()


def select_runs(campaign: dict[str, Any], only: list[str]) -> list[Run]:
    """The runs of ``campaign`` whose ids are in ``only`` (in the YAML's order; all of them for none)."""
    ids = [run.id for run in campaign["runs"]]
    unknown = [run_id for run_id in only if run_id not in ids]
    if unknown:
        raise CampaignError(f"--only {', '.join(unknown)}: no such run (the runs: {', '.join(ids)})")
    return [run for run in campaign["runs"] if not only or run.id in only]


def print_status(campaign: dict[str, Any]) -> None:
    """One line per run: its run directory's progress or, where that is gone (another machine), what the committed
    report says of it, so that a finished run is not shown as untrained."""
    from campaign_report import read_committed_runs

    committed = read_committed_runs(campaign["report"])
    for run in campaign["runs"]:
        if run.run_dir.exists():
            swaps_held = CampaignLock.held(run.run_dir.parent, CampaignLock.swaps_name(run))
            lanes = [name for name, busy in (("training", CampaignLock.training(run)), ("swaps", swaps_held)) if busy]
            print(f"{run.id:<50} trained {trained_step(run):>7}/{run.steps}  snapshots {len(snapshots(run)):>3}  "
                  f"swaps pending {len(pending_swaps(run, campaign['swaps']))}"
                  + (f"  (held now: {', '.join(lanes)})" if lanes else ""))
            continue
        record = committed.get(run.id)
        if record is None:
            print(f"{run.id:<50} not started")
        elif _finished(record, run):  # the report read once above, not once per run
            print(f"{run.id:<50} finished on an earlier machine ({record['trained_step']} steps, committed report)")
        else:
            print(f"{run.id:<50} no run directory; the committed report has it at {record.get('trained_step', 0)} "
                  f"steps: it starts from scratch")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the campaign YAML")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report")
    parser.add_argument("--status", action="store_true", help="print where every run stands, change nothing")
    parser.add_argument("--rerun", action="append", default=[], metavar="TASK",
                        help="train TASK again although the committed report says it finished elsewhere")
    parser.add_argument("--only", action="append", default=[], metavar="RUN_ID",
                        help="a second lane: work through these runs only (ids as --status prints them)")
    parser.add_argument("--swaps-lane", action="store_true",
                        help="a second lane that only evaluates planner swaps (of the --only runs, or all), as "
                             "snapshots appear, while the main campaign trains")
    parser.add_argument("--poll", type=float, default=30.0, metavar="SECONDS",
                        help="how often the swaps lane looks for new snapshots")
    args = parser.parse_args(argv)
    if args.swaps_lane and (args.report_only or args.status or args.rerun):
        parser.error("--swaps-lane evaluates swaps only: it does not combine with --report-only, --status or --rerun")
    try:
        campaign = load_campaign(args.config)
        if args.status:
            print_status(campaign)
            return 0
        runs = select_runs(campaign, args.only)
        # the main campaign holds the runs root; a lane (--only) shares it, claiming run by run; a report rewrite
        # only waits for its turn
        lane = args.only or args.report_only or args.swaps_lane
        lock = None if lane else CampaignLock(campaign["runs_root"])  # noqa: F841
        if args.swaps_lane:
            with stop_on_signals():
                swaps_lane(campaign, runs, args.poll)
        elif not args.report_only:
            with stop_on_signals():
                work_through(campaign, runs, args.rerun)
        path = rewrite_report(campaign)
    except CampaignError as err:
        print(f"campaign.py: {err}", file=sys.stderr)
        return 2
    except CampaignStopped as stop:
        say(f"{stop}: a training chunk in progress wrote a checkpoint of the step it reached, an "
            "evaluation in progress is redone next time; re-run the same command to continue.")
        return 128 + stop.signum
    say(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.modules.setdefault("campaign", sys.modules["__main__"])  # campaign_report imports this module by name
    sys.exit(main())
