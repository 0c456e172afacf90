"""Stopping a training run on SIGTERM / SIGINT with a checkpoint of the step it reached.

A scheduler that preempts a job (SLURM, Kubernetes, a shared machine's session end) sends SIGTERM and kills the
process a grace period later. Without a handler Python dies at once, and the run loses every step since its last
periodic checkpoint (up to ``checkpoint_interval`` steps: ~13 minutes of a 1M-model run on one CPU core at 5k).
"""
from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator, Sequence

from torchrl.trainers import Trainer

__all__ = ["stop_on_signals"]


@contextlib.contextmanager
def stop_on_signals(trainer: Trainer, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[list[int]]:
    """Within the block, a signal makes ``trainer`` stop at its next step boundary and write a checkpoint there.

    The handler only calls TorchRL's :meth:`~torchrl.trainers.Trainer.request_stop`; the Trainer's loop finishes
    the collection step and the updates in progress, saves a checkpoint (``save_trainer(force_save=True)``),
    runs its shutdown hooks and returns from ``train()``. A resumed run continues from that step: the env is reset
    and the collector's trajectory ids stay unique, so no replay slice joins the cut episode to the next one.

    Repeats: further SIGTERMs are ignored (a process group kill and a parent forwarding the same stop both arrive);
    a second SIGINT raises :class:`KeyboardInterrupt` as usual (Ctrl-C twice: stop now). Either way the last
    complete checkpoint is safe: TorchRL publishes a checkpoint by an atomic rename, and ``resume()`` ignores a
    half-written one.

    Only the main thread can install signal handlers; multi-process collectors' workers get a terminal's SIGINT
    themselves and are not covered. The previous handlers are restored when the block ends.

    Args:
        trainer (Trainer): the TorchRL trainer (e.g. :class:`~torchrl_dreammpc.trainers.DreamMPCTrainer`).
        signals (sequence of int): the signals that stop the run. Defaults to ``(SIGTERM, SIGINT)``.

    Yields:
        the list of signal numbers received in the block (empty if training ran to its end).

    Examples:
        >>> import os, signal
        >>> class FakeTrainer:  # anything with TorchRL's request_stop
        ...     def request_stop(self, reason=None):
        ...         self.reason = reason
        >>> trainer = FakeTrainer()
        >>> with stop_on_signals(trainer) as received:
        ...     os.kill(os.getpid(), signal.SIGTERM)
        >>> received, trainer.reason
        ([<Signals.SIGTERM: 15>], 'received SIGTERM')
    """
    received: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in signals}

    def handler(signum, frame):
        received.append(signal.Signals(signum))
        if signum == signal.SIGINT:
            signal.signal(signum, previous[signum])  # the next Ctrl-C acts as before
        if len(received) == 1:
            trainer.request_stop(f"received {signal.Signals(signum).name}")

    for signum in signals:
        signal.signal(signum, handler)
    try:
        yield received
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
