"""End-to-end training speed: agent steps per second of whole training steps, ours against TD-MPC2's reference.

One training step at UTD 1 is: plan an action, step the env, store the transition, sample a batch, update. Timed:

- ``ours, dream_mpc`` / ``ours, mppi``: the training recipe's own loop — a :class:`DreamMPCTrainer` built by
  ``build_trainer`` from ``recipes/config/train.yaml`` with ``planner=dream_mpc`` / ``planner=mppi`` (collector,
  replay buffer, TD-MPC2 update, every hook; evaluation and checkpoints out of the timed window);
- ``reference (MPPI)``: TD-MPC2's public code (``../shared/peers/tdmpc2_peer.py``) in its online trainer's order —
  ``agent.act(obs, t0)`` (MPPI, training mode), the env step, the step appended to the episode (episodes go to its
  replay buffer, TorchRL's ``SliceSampler``, when they end), ``agent.update(buffer)``.

All three use the same task env (``make_env``), model size, batch (256 x H 3) and CPU, in one process. After a seed
phase (one episode of random actions), a few pre-training updates and ``--warmup`` steps, the sides take turns of
``--chunk`` steps, ``--rounds`` times, in an order that alternates every round, so a slow period of the (shared)
machine hits all alike. Each trainer runs its unmodified ``train()`` in a thread of its own that a hook parks after
each turn: only one side computes at any time. Steps per second = steps / wall time of the turns.

Writes ``docs/results/train_speed.json`` and the ``train_speed`` section of ``docs/performance.md``.

Run::

    python benchmarks/train_speed.py                         # cartpole-swingup, 1M and 5M, eager (a few minutes)
    python benchmarks/train_speed.py --sizes 1 --rounds 2 --chunk 5 --no-write   # a quick look
    python benchmarks/train_speed.py --compile               # our update compiled (as train.py compile=true)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from tensordict import TensorDict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, machine_info, write_json, write_section  # noqa: E402

from torchrl_dreammpc.envs import make_env, task_info  # noqa: E402

PEER = ROOT.parent / "shared" / "peers" / "tdmpc2_peer.py"
OURS = ("dream_mpc", "mppi")
PRETRAIN = 5  # pre-training updates after the seed phase, on both sides (their time is not measured)


# ---------------------------------------------------------------------------------------------- ours
def train_config(task: str, planner: str, size: int, total: int, seed_steps: int, threads: int, compile: bool,
                 run_dir: Path) -> dict:
    """recipes/config/train.yaml composed as ``train.py`` composes it, with the benchmark's overrides."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    overrides = [f"task={task}", f"planner={planner}", f"model_size='{size}'", f"steps={total}",
                 f"seed_steps={seed_steps}", f"pretrain_updates={PRETRAIN}", "eval_interval=0",
                 f"checkpoint_interval={10 * total}", "keep_checkpoints=1", f"threads={threads}",
                 f"compile={str(compile).lower()}", f"run_dir={run_dir}", "device=cpu"]
    with initialize_config_dir(config_dir=str(ROOT / "recipes" / "config"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


class TurnTaker:
    """Runs a trainer's ``train()`` in a thread, parked by a post-steps hook after every ``chunk`` steps of a turn.

    ``ready`` is set when the trainer has done its seed phase, pre-training and ``warmup`` steps; each ``turn()``
    then lets it run ``chunk`` more steps and returns their wall time.
    """

    def __init__(self, trainer, start_at: int, chunk: int, threads: int) -> None:
        self.trainer, self.start_at, self.chunk, self.threads = trainer, start_at, chunk, threads
        self._go, self._done = threading.Event(), threading.Event()
        self._t0, self._elapsed, self._error = 0.0, 0.0, None
        trainer.register_op("post_steps", self._hook)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        torch.set_num_threads(self.threads)
        try:
            self.trainer.train()
        except BaseException as err:  # reported to the main thread
            self._error = err
        finally:
            self._done.set()

    def _hook(self) -> None:
        frames = self.trainer.collected_frames
        if frames < self.start_at or (frames - self.start_at) % self.chunk:
            return
        if frames > self.start_at:
            self._elapsed = time.perf_counter() - self._t0
        if frames >= self.trainer.total_frames:
            self._done.set()
            return
        self._done.set()  # park: the turn (or the warm-up) is over
        self._go.wait()
        self._go.clear()
        self._t0 = time.perf_counter()

    def start(self) -> None:
        self.thread.start()
        self._wait()

    def turn(self) -> float:
        self._go.set()
        self._wait()
        return self._elapsed

    def _wait(self) -> None:
        self._done.wait()
        self._done.clear()
        if self._error is not None:
            raise RuntimeError(f"the trainer failed: {self._error!r}") from self._error

    def finish(self) -> None:
        self.thread.join()


def make_ours(planner: str, args, size: int, tmp: Path) -> TurnTaker:
    from torchrl_dreammpc.trainers.builders import build_trainer

    info = task_info(args.task)
    seed_steps = info.episode_length
    total = seed_steps + args.warmup + args.rounds * args.chunk
    cfg = train_config(args.task, planner, size, total, seed_steps, args.threads, args.compile, tmp / planner)
    torch.manual_seed(0)
    trainer, _ = build_trainer(cfg)
    trainer.verbose = False
    return TurnTaker(trainer, seed_steps + args.warmup, args.chunk, args.threads)


# ---------------------------------------------------------------------------------------------- the reference
class ReferenceLoop:
    """TD-MPC2's online training loop (its ``OnlineTrainer.train`` order) around its agent and replay buffer."""

    def __init__(self, task: str, size: int, batch_size: int, seed: int = 1) -> None:
        sys.path.insert(0, str(PEER.parent))
        import tdmpc2_peer  # noqa: E402

        info = task_info(task)
        self.env = make_env(task, seed=seed)
        obs_dim = int(self.env.observation_spec["observation"].shape[-1])
        self.action_dim = int(self.env.action_spec.shape[-1])
        torch.manual_seed(0)
        self.agent = tdmpc2_peer.make_agent(size, obs_dim, self.action_dim, episode_length=info.episode_length,
                                            batch_size=batch_size, steps=10 * info.episode_length)
        from common.buffer import Buffer  # the reference's buffer (importable once the peer is unpacked)
        from torchrl.data.replay_buffers import LazyTensorStorage

        self.buffer = Buffer(self.agent.cfg)
        # Its _init sizes the storage with torch.cuda.mem_get_info, which a CPU-only torch lacks: CPU storage.
        self.buffer._init = lambda td: self.buffer._reserve_buffer(LazyTensorStorage(self.buffer.capacity,
                                                                                     device="cpu"))
        self.episode_length = info.episode_length
        self._reset()

    def _to_td(self, obs, action=None, reward=None, terminated=None) -> TensorDict:
        nan = torch.tensor(float("nan"))
        action = torch.full((self.action_dim,), float("nan")) if action is None else action
        return TensorDict(obs=obs.unsqueeze(0), action=action.unsqueeze(0),
                          reward=(nan if reward is None else reward).unsqueeze(0),
                          terminated=(nan if terminated is None else terminated).unsqueeze(0), batch_size=(1,))

    def _reset(self) -> None:
        self.td = self.env.reset()
        self.obs = self.td["observation"]
        self.tds = [self._to_td(self.obs)]

    def step(self, random: bool = False, update: bool = True) -> None:
        if random:
            action = torch.rand(self.action_dim) * 2 - 1
        else:
            action = self.agent.act(self.obs, t0=len(self.tds) == 1)
        out = self.env.step(self.td.set("action", action))["next"]
        reward = out["reward"].reshape(())
        terminated = out["terminated"].reshape(()).float()
        self.tds.append(self._to_td(out["observation"], action, reward, terminated))
        if bool(out["done"].any()):
            self.buffer.add(torch.cat(self.tds))
            self._reset()
        else:
            self.td, self.obs = out, out["observation"]
        if update:
            self.agent.update(self.buffer)

    def prepare(self, warmup: int) -> None:
        for _ in range(self.episode_length):  # seed phase: one episode of random actions
            self.step(random=True, update=False)
        for _ in range(PRETRAIN):
            self.agent.update(self.buffer)
        for _ in range(warmup):
            self.step()

    def turn(self, chunk: int) -> float:
        start = time.perf_counter()
        for _ in range(chunk):
            self.step()
        return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- measuring
def measure(size: int, args) -> dict:
    sides: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for planner in OURS:
            print(f"[train_speed] {size}M: seed phase + warm-up of ours, {planner}", flush=True)
            sides[f"ours, {planner}"] = make_ours(planner, args, size, Path(tmp))
            sides[f"ours, {planner}"].start()
        if PEER.is_file() and not args.no_peer:
            print(f"[train_speed] {size}M: seed phase + warm-up of the reference", flush=True)
            ref = ReferenceLoop(args.task, size, batch_size=256)
            ref.prepare(args.warmup)
            sides["reference (MPPI)"] = ref
        names = list(sides)
        turns = {n: [] for n in names}
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                side = sides[name]
                turns[name].append(side.turn(args.chunk) if isinstance(side, ReferenceLoop) else side.turn())
            print(f"[train_speed] {size}M round {r + 1}/{args.rounds}: "
                  + ", ".join(f"{n} {args.chunk / turns[n][-1]:.2f} steps/s" for n in names), flush=True)
        for name in names:
            if isinstance(sides[name], TurnTaker):
                sides[name].finish()
    rows = {}
    for name in names:
        rates = [args.chunk / t for t in turns[name]]
        rows[name] = {"steps": args.chunk * len(rates), "steps_per_s": args.chunk * len(rates) / sum(turns[name]),
                      "median_turn_steps_per_s": statistics.median(rates),
                      "min_turn_steps_per_s": min(rates), "max_turn_steps_per_s": max(rates),
                      "ms_per_step": 1000 * sum(turns[name]) / (args.chunk * len(rates))}
    return rows


def markdown(results: dict, args, machine: dict, load: dict) -> str:
    lines = ["## End-to-end training speed", "",
             f"`{machine['command']}` — {machine['cpu']}, torch {machine['torch']}, {args.threads} thread(s), "
             f"{'compiled' if args.compile else 'eager'} update (ours); load average {load['before']} before, "
             f"{load['after']} after (a shared 2-core machine: another training process uses the other core).", "",
             f"Agent steps per second of whole training steps at UTD 1 (plan + env step + replay write + sample + "
             f"update, batch 256 x H 3), {args.task}, after the seed phase; {args.rounds} alternating turns of "
             f"{args.chunk} steps per side:", "",
             "| model | side | steps/s | ms/step | turns: min–max steps/s | vs reference |", "|---|---|---:|---:|---|---:|"]
    for size, rows in results.items():
        ref = rows.get("reference (MPPI)")
        for name, r in rows.items():
            ratio = f"{r['steps_per_s'] / ref['steps_per_s']:.2f}x" if ref else "n/a"
            lines.append(f"| {size}M | {name} | {r['steps_per_s']:.2f} | {r['ms_per_step']:.0f} | "
                         f"{r['min_turn_steps_per_s']:.2f}–{r['max_turn_steps_per_s']:.2f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="cartpole-swingup")
    parser.add_argument("--sizes", default="1,5", help="comma-separated TD-MPC2 model sizes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=20, help="steps per turn")
    parser.add_argument("--warmup", type=int, default=10, help="steps per side before the timed turns")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="compile our update (train.py compile=true)")
    parser.add_argument("--no-peer", action="store_true", help="time our side only")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loadavg = Path("/proc/loadavg")
    load = {"before": " ".join(loadavg.read_text().split()[:3]) if loadavg.exists() else "?"}
    results = {}
    for size in [int(s) for s in args.sizes.split(",")]:
        results[size] = measure(size, args)
    load["after"] = " ".join(loadavg.read_text().split()[:3]) if loadavg.exists() else "?"
    machine = machine_info()
    md = markdown(results, args, machine, load)
    print(md)
    if not args.no_write:
        write_section("train_speed", md)
        write_json(ROOT / "docs" / "results" / "train_speed.json",
                   {"machine": machine, "load": load, "args": vars(args),
                    "results": {str(k): v for k, v in results.items()}})


if __name__ == "__main__":
    main()
