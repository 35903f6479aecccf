"""A stage's loop: one progress bar for every stage (tqdm on a terminal, silent in logs and on ranks
other than 0), and one way to stop on SIGINT / SIGTERM (`StopSignals`, `StageStopped`)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator, Optional

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def progress_bar(total: int | None, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True,
                 **options) -> tqdm:
    """A tqdm bar over ``total`` units named ``desc``.

    Arguments:
      total: the number of units (None: unknown).
      desc: the label, usually the stage and what it counts over ("embed world", "finetune").
      unit: the unit's name ("img", "step", "B").
      initial: units already done (a resumed run).
      enabled: False turns the bar off whatever the terminal (e.g. every rank but 0 under torchrun);
        True shows it only where tqdm sees a terminal (``disable=None``).
      options: passed to tqdm (``unit_scale``, ``leave`` ...).
    """
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=None if enabled else True, **options)


class StageStopped(KeyboardInterrupt):
    """A stage stopped by SIGINT or SIGTERM, its finished work kept for the next run to resume.

    A `KeyboardInterrupt`, not an ``Exception``: ``except Exception`` handlers let it through, and
    an MLflow run it ends is recorded KILLED. The CLI prints its message as one line and exits
    with `exit_code`, 128 + the signal number (130 for SIGINT, 143 for SIGTERM), as a shell
    reports a process a signal ended, never 2 (bad input).
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


def signal_name(signum: int) -> str:
    """``SIGINT`` for 2, ``SIGTERM`` for 15 (``signal <n>`` for one Python does not name)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopSignals:
    """SIGTERM and SIGINT ask the running stage to stop (finetune, embed, pseudolabel).

    With ``at_once=False`` a signal sets `signum` and logs one warning: the loop finishes the unit
    in flight (a training step, an image), saves and calls `stop`. A second SIGINT stops at once.
    With ``at_once=True`` (units too long to wait for: a pseudo-label shard on Dask) the handler
    raises `StageStopped` where the stage is; its writes are atomic, so nothing is torn.
    Installed only in the main thread (elsewhere it does nothing); `restore` (or leaving the
    ``with`` block) puts the previous handlers back.

    Arguments:
      stage: the stage's name, for the messages.
      resume: what the next run does with the work done, for the stop message ("run it again to
        resume").
      at_once: raise in the handler instead of setting the flag.
      unit: what the loop finishes before it stops ("step", "image"), for the warning.
    """

    def __init__(self, stage: str, resume: str = "run it again to resume", at_once: bool = False,
                 unit: str = "step") -> None:
        self.stage, self.resume, self.at_once, self.unit = stage, resume, at_once, unit
        self.signum: Optional[int] = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        again = signum == signal.SIGINT and self.signum == signal.SIGINT
        self.signum = signum
        if self.at_once or again:
            self.stop()
        log.warning("%s: %s, stopping after this %s", self.stage, signal_name(signum), self.unit)

    def stop(self, done: str = "") -> None:
        """Raise `StageStopped` for the signal that arrived: "<stage> stopped by SIGTERM[ after
        ``done``]; ``resume``"."""
        after = f" after {done}" if done else ""
        raise StageStopped(f"stopped by {signal_name(self.signum or signal.SIGTERM)}{after}; {self.resume}",
                           self.signum or signal.SIGTERM)

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

    def __enter__(self) -> "StopSignals":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


@contextlib.contextmanager
def children_ignore_sigint() -> Iterator[None]:
    """SIGINT ignored while the block starts worker processes (a Dask LocalCluster's): they inherit
    the ignored signal, across ``exec`` too, so a terminal's Ctrl-C, which reaches the whole
    process group, stops the stage through this process alone (`StopSignals`), without a
    traceback from every worker. A SIGINT during the block itself is lost. Outside the main thread
    it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
