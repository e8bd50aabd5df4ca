"""The parent of a run: starts the worker processes, shows progress, merges the results.

The parent does no DICOM. It starts one :func:`loadtest.worker.worker_main` per
process (multiprocessing, spawn: a clean interpreter, no inherited threads or loops),
waits until each has built its payload and said "ready", then writes "go" and the
start time into a shared control array. While they run it reads their counters from
a shared array a few times a second for the progress line, and collects each one's
:class:`~loadtest.stats.Stats` from the result queue at the end.

Ctrl-C: the first sets "stop" (no new operations; in-flight ones get ``--grace``
seconds), the second sets "abort" (every association is aborted at once); either way
the workers still report and the summary is printed with what was measured. A third
Ctrl-C, or workers that do not report within their bound, get the processes
terminated. Every wait here is bounded.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue as queue_module
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from types import FrameType
from typing import Any, TextIO

from .config import RunConfig
from .payload import new_run_id
from .stats import Report, Stats
from .units import MB
from .worker import ABORT, GO, PROGRESS_FIELDS, STOP, worker_main

__all__ = ["RunError", "run"]

#: How long the workers get to start (import, build the template) and say "ready".
READY_TIMEOUT = 120.0
#: Beyond the grace period, how long a worker may take to report before termination.
REPORT_SLACK = 15.0
PROGRESS_INTERVAL = 0.25
RATE_WINDOW = 1.0
#: A worker that exited without a result is given up on after this long.
LOST_AFTER = 2.0


class RunError(RuntimeError):
    """A run could not be carried out at all (a worker failed to start, ...)."""


class _Interrupts:
    """SIGINT in the parent: 1st stop, 2nd abort, 3rd KeyboardInterrupt."""

    def __init__(self) -> None:
        self.count = 0
        self.previous: Any = None
        self.installed = False

    def install(self) -> None:
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
            self.installed = True
        except ValueError:  # not the main thread: no Ctrl-C handling, still bounded
            pass

    def restore(self) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, self.previous)
            self.installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.count >= 3:
            raise KeyboardInterrupt


class _Progress:
    """The live line on stderr: instances, instances/s, MB/s, errors.

    Rates are over the last :data:`RATE_WINDOW` seconds of samples: the workers
    publish their counters every 0.1 s, so a shorter window would mostly show aliasing.
    """

    def __init__(self, out: TextIO, scenario: str, tty: bool) -> None:
        self.out = out
        self.scenario = scenario
        self.tty = tty
        self.last_printed = 0.0
        self.samples: deque[tuple[float, list[float]]] = deque()
        self.shown = False

    def update(self, now: float, started: float, totals: list[float], force: bool = False) -> None:
        samples = self.samples
        samples.append((now, totals))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW:
            samples.popleft()
        interval = PROGRESS_INTERVAL if self.tty else 1.0
        if not force and now - self.last_printed < interval:
            return
        self.last_printed = now
        then, old = samples[0]
        dt = now - then

        def rate(i: int) -> float:
            return (totals[i] - old[i]) / dt if dt > 0 else 0.0

        ops, instances, _nbytes, failed, assocs = totals
        if self.scenario == "echo":
            line = f"{now - started:7.1f} s  {ops:.0f} cycles  {rate(0):9.1f} cycles/s"
        else:
            line = (
                f"{now - started:7.1f} s  {instances:.0f} instances  {rate(1):9.1f} inst/s  "
                f"{rate(2) / MB:8.2f} MB/s"
            )
        line += f"  {failed:.0f} errors  {assocs:.0f} assocs"
        if self.tty:
            self.out.write("\r" + line + "\x1b[K")
        else:
            self.out.write(line + "\n")
        self.out.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown and self.tty:
            self.out.write("\n")
            self.out.flush()


def run(
    cfg: RunConfig,
    *,
    progress: bool = False,
    progress_out: TextIO | None = None,
    handle_sigint: bool = True,
    on_started: Callable[[], None] | None = None,
) -> Report:
    """Carry out one run and return its merged :class:`Report`.

    ``on_started`` is called once every worker got "go" (compare uses it to start
    measuring the receiver's CPU).
    """
    if not cfg.run_id:
        cfg = cfg.with_(run_id=new_run_id())
    shares = cfg.shares()
    ctx = multiprocessing.get_context("spawn")
    ctl = ctx.RawArray("d", 3)
    counters = ctx.RawArray("d", len(shares) * PROGRESS_FIELDS)
    results: Any = ctx.Queue()
    procs = [
        ctx.Process(
            target=worker_main,
            args=(cfg, share, ctl, counters, results),
            name=f"pacs-loadtest-{share.index}",
            daemon=True,
        )
        for share in shares
    ]
    interrupts = _Interrupts()
    if handle_sigint:
        interrupts.install()
    out = progress_out or sys.stderr
    display = _Progress(out, cfg.scenario, tty=_isatty(out)) if progress else None
    merged = Stats()
    notes: list[str] = []
    if cfg.processes > len(shares):
        notes.append(f"{len(shares)} process(es): never more than associations")
    size: int | None = None
    try:
        for proc in procs:
            proc.start()
        # ------------------------------------------------------------ ready
        ready: set[int] = set()
        deadline = time.monotonic() + READY_TIMEOUT
        while len(ready) < len(procs):
            if interrupts.count:
                ctl[0] = STOP
                merged.interrupted = True
                break
            try:
                kind, index, payload = results.get(timeout=0.1)
            except queue_module.Empty:
                dead = [p for p in procs if p.exitcode is not None]
                if dead:
                    code = dead[0].exitcode
                    raise RunError(f"worker {dead[0].name} exited ({code}) at start") from None
                if time.monotonic() > deadline:
                    raise RunError(f"workers not ready within {READY_TIMEOUT:g} s") from None
                continue
            if kind == "error":
                raise RunError(f"worker {index} failed to start:\n{payload}")
            ready.add(index)
            size = payload
        # ------------------------------------------------------------ go
        started = time.monotonic()
        ctl[1] = started
        ctl[2] = started + cfg.duration if cfg.duration else 0.0
        if not merged.interrupted:
            ctl[0] = GO
        if on_started is not None:
            on_started()
        # ------------------------------------------------------------ run
        reported: set[int] = set()
        stop_at: float | None = None
        hard_deadline: float | None = None
        dead_since: dict[int, float] = {}
        while len(reported) < len(procs):
            now = time.monotonic()
            if interrupts.count == 1 and ctl[0] < STOP:
                ctl[0] = STOP
            elif interrupts.count >= 2 and ctl[0] < ABORT:
                ctl[0] = ABORT
            if stop_at is None and (ctl[0] >= STOP or (ctl[2] and now >= ctl[2])):
                stop_at = now
                hard_deadline = now + cfg.grace + REPORT_SLACK
            if hard_deadline is not None and now > hard_deadline:
                notes.append("workers did not report in time and were terminated")
                break
            try:
                kind, index, payload = results.get(timeout=0.05)
            except queue_module.Empty:
                kind = ""
            if kind == "result":
                reported.add(index)
                merged.merge(Stats.from_wire(payload))
            elif kind == "error":
                reported.add(index)
                notes.append(f"worker {index} failed: {payload.strip().splitlines()[-1]}")
                merged.fail("worker", "error", payload.strip().splitlines()[-1])
            for i, proc in enumerate(procs):
                if i in reported or proc.exitcode is None:
                    continue
                # a result may still be in the pipe: wait a moment before calling it lost
                since = dead_since.setdefault(i, now)
                if now - since > LOST_AFTER:
                    reported.add(i)
                    notes.append(f"worker {i} died (exit {proc.exitcode}) without a report")
                    merged.fail("worker", "lost", f"exit status {proc.exitcode}")
            if display is not None:
                display.update(time.monotonic(), started, _totals(counters, len(procs)))
        if display is not None:
            display.update(time.monotonic(), started, _totals(counters, len(procs)), force=True)
    except KeyboardInterrupt:
        merged.interrupted = True
        notes.append("terminated by a third Ctrl-C: results of unfinished workers are lost")
    finally:
        if display is not None:
            display.finish()
        interrupts.restore()
        ctl[0] = max(ctl[0], ABORT)
        for proc in procs:
            if proc.pid is not None:
                proc.join(timeout=2.0)
                if proc.exitcode is None:
                    proc.terminate()
                    proc.join(timeout=2.0)
        with contextlib.suppress(Exception):
            results.close()
            results.join_thread()
        if cfg.record_path:
            _merge_records(cfg.record_path, len(procs))
    if interrupts.count:
        merged.interrupted = True
    if not merged.started:
        merged.started = merged.finished = time.monotonic()
    return Report(
        stats=merged,
        scenario=cfg.scenario,
        config=cfg.public(),
        instance_size=size if cfg.scenario != "echo" and not cfg.files else None,
        generator_processes=len(procs),
        notes=notes,
    )


def _totals(counters: Any, processes: int) -> list[float]:
    totals = [0.0] * PROGRESS_FIELDS
    for i in range(processes):
        base = i * PROGRESS_FIELDS
        for f in range(PROGRESS_FIELDS):
            totals[f] += counters[base + f]
    return totals


def _merge_records(path: str, processes: int) -> None:
    with open(path, "w", encoding="ascii") as out:
        out.write("# sop_instance_uid\tstatus\tbytes\tsha256\n")
        for i in range(processes):
            part = f"{path}.{i}"
            try:
                with open(part, encoding="ascii") as f:
                    for line in f:
                        out.write(line)
                os.unlink(part)
            except FileNotFoundError:
                continue


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
