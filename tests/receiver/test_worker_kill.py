"""SIGKILL of a worker under load loses nothing that was acknowledged.

Four pynetdicom senders (threads) store small unique instances, one association
each, with a unique Calling AE Title per association; the ``record_association``
hook (EVT_ESTABLISHED) writes which worker process served which title. One worker
is SIGKILLed mid-run. Then:

* only associations served by the killed worker (or handed to it as it died) fail;
  every association of the other worker succeeds;
* every instance answered Success, before or after the kill, is on disk and
  byte-identical to its source; nothing partial is published;
* the supervisor respawns the worker and new associations are served (by the new
  pid, too); the instances that failed go through on a retry.

One C-STORE per association, on purpose: pynetdicom 3.0 can lose the response of a
DIMSE request that follows another on the same association when many threads
compete for the GIL (its reactor pause/resume race: the reactor thread takes the
response off the queue), which would show up here as a stall on a healthy worker.
And pynetdicom waits out its DIMSE timeout when the connection drops under a
request, hence the short timeout.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    ASSOC_FILE_ENV,
    Receiver,
    ReceiverFactory,
    assert_same_instance,
    associate,
    make_files,
    read_pid_records,
    scu_ae,
    sop_uid,
    stored_files,
    wait_for,
)

pytestmark = [pytest.mark.interop, pytest.mark.slow]

ASSOC_HOOK = "EVT_ESTABLISHED=tests.receiver.hooks:record_association"
SENDERS = 4
PER_SENDER = 60
RUN_TIMEOUT = 90.0
SCU_TIMEOUT = 10.0  # how long pynetdicom takes to notice a dropped association


@dataclass(slots=True)
class Outcome:
    ae_title: str
    source: Path
    established: bool = False
    ok: bool = False  # Success, and the release completed
    started: float = 0.0


@dataclass(slots=True)
class Run:
    success: dict[str, Path] = field(default_factory=dict)  # SOP Instance UID -> source
    outcomes: list[Outcome] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def send_one(rx: Receiver, ae_title: str, source: Path | None, run: Run) -> Outcome:
    """One association: C-STORE ``source`` (C-ECHO if None); failures are recorded."""
    outcome = Outcome(ae_title, source or Path(), started=time.monotonic())
    assoc: Any = associate(rx, scu_ae(ae_title, storage=True, timeout=SCU_TIMEOUT))
    outcome.established = assoc.is_established
    if not assoc.is_established:
        return outcome
    try:
        status = assoc.send_c_echo() if source is None else assoc.send_c_store(source)
        success = status.get("Status") == 0x0000
        if success and source is not None:
            with run.lock:
                run.success[sop_uid(source)] = source
        if assoc.is_established:
            assoc.release()
        outcome.ok = success and assoc.is_released
    except Exception as exc:  # a dropped connection may surface as an exception
        with run.lock:
            run.errors.append(repr(exc))
        assoc.abort()
    return outcome


def test_sigkill_worker_under_load_loses_nothing_acknowledged(
    receiver_factory: ReceiverFactory, tmp_path: Path, assoc_file: Path
) -> None:
    rx = receiver_factory(
        "--workers", "2", "--handler", ASSOC_HOOK, env={ASSOC_FILE_ENV: str(assoc_file)}
    )
    before = rx.started_pids()
    assert sorted(before) == [0, 1]
    victim_pid = before[0][0]
    survivor_pid = before[1][0]

    sources = [
        make_files(tmp_path / f"src{s}", PER_SENDER, prefix=f"s{s}-", pixel_bytes=2048)
        for s in range(SENDERS)
    ]
    total = SENDERS * PER_SENDER
    extras = make_files(tmp_path / "extra", 3, prefix="extra")
    extra = extras[2]

    # Two associations held open, one on each worker (least-loaded placement); each
    # stores one instance first, which also warms the workers up (first-store costs
    # on a busy machine must not count against the senders' timeout).
    held = {
        title: associate(rx, scu_ae(title, storage=True, timeout=RUN_TIMEOUT))
        for title in ("HOLDA", "HOLDB")
    }
    assert all(a.is_established for a in held.values())
    for assoc, warm in zip(held.values(), extras, strict=False):
        assert assoc.send_c_store(warm).Status == 0x0000
    holders = {ae: pid for pid, _port, ae in read_pid_records(assoc_file)}
    assert sorted(holders.values()) == sorted([victim_pid, survivor_pid]), holders
    on_victim = next(a for t, a in held.items() if holders[t] == victim_pid)
    on_survivor = next(a for t, a in held.items() if holders[t] == survivor_pid)

    run = Run()
    deadline = time.monotonic() + RUN_TIMEOUT

    def sender(s: int) -> None:
        for i, source in enumerate(sources[s]):
            if time.monotonic() > deadline:
                return
            outcome = send_one(rx, f"S{s}I{i:03d}", source, run)
            with run.lock:
                run.outcomes.append(outcome)

    threads = [threading.Thread(target=sender, args=(s,), daemon=True) for s in range(SENDERS)]
    for t in threads:
        t.start()

    # Mid-run: SIGKILL worker 0 once a quarter of the instances are stored.
    wait_for(lambda: len(run.success) >= total // 4, 60, interval=0.01, what="a quarter stored")
    assert any(t.is_alive() for t in threads), "the run ended before the kill"
    stored_before_kill = len(run.success)
    killed_at = time.monotonic()
    rx.workers()  # remember the pids of the tree
    os.kill(victim_pid, signal.SIGKILL)

    for t in threads:
        t.join(max(1.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "senders did not finish in time"
    assert len(run.success) > stored_before_kill, "nothing was stored after the kill"

    # The killed worker's held association dropped; the other worker's did not notice.
    wait_for(lambda: on_victim.is_aborted, 10, what="the held association to drop")
    assert on_survivor.is_established
    assert on_survivor.send_c_store(extra).Status == 0x0000
    on_survivor.release()
    assert on_survivor.is_released

    # The supervisor noticed, named the exit and respawned worker 0.
    rx.wait_log(r"worker 0 killed by SIGKILL", 10)
    after = wait_for(lambda: len(rx.started_pids().get(0, [])) >= 2 and rx.started_pids(), 15)
    respawned_pid = after[0][1]
    assert respawned_pid != victim_pid
    assert after[1] == [survivor_pid]  # the other worker was left alone
    rx.wait_log(rf"worker 0 ready \(pid {respawned_pid}\)", 30)
    # Whatever the killed worker was writing is gone from the temp directory: the
    # supervisor sweeps dead workers' temp files when it reaps them.
    wait_for(
        lambda: (
            not [
                p
                for p in (rx.storage / ".incoming").iterdir()
                if p.name.startswith(f"{victim_pid}-")
            ]
        ),
        10,
    )
    # Connections that reached the acceptor while the dead worker was not reaped yet
    # went to the live one, not refused.
    assert "cannot hand" not in rx.log()

    # Drops only on the killed worker's associations: each failed association was
    # served by it, or never got as far as being served (handed to it as it died).
    served_by = {ae: pid for pid, _port, ae in read_pid_records(assoc_file)}
    failed = [o for o in run.outcomes if not o.ok]
    for o in failed:
        assert served_by.get(o.ae_title) in (victim_pid, None), (o, served_by.get(o.ae_title))
        assert o.started >= killed_at - SCU_TIMEOUT - 1, o  # nothing failed before the kill
    survivor_outcomes = [o for o in run.outcomes if served_by.get(o.ae_title) == survivor_pid]
    assert survivor_outcomes and all(o.ok for o in survivor_outcomes)
    assert len(run.outcomes) == total

    # Every acknowledged instance is on disk and byte-identical; whatever else is
    # on disk (stored, but the answer was lost with the worker) is intact too.
    stored = stored_files(rx.storage)
    assert set(run.success) <= set(stored)
    by_uid = {sop_uid(f): f for f in [*extras, *(f for files in sources for f in files)]}
    extra_uids = {sop_uid(f) for f in extras}
    assert set(stored) <= set(by_uid)
    for uid, path in stored.items():
        assert_same_instance(by_uid[uid], path)

    # New associations keep being served, the respawned worker's too (least-loaded
    # placement, equal loads taking turns); what did not get Success goes through now.
    missing = [f for uid, f in by_uid.items() if uid not in set(run.success) | extra_uids]
    retry = Run()
    for i, source in enumerate(missing):
        outcome = send_one(rx, f"RETRY{i:03d}", source, retry)
        assert outcome.ok, outcome
    for i in range(4):
        assert send_one(rx, f"ECHO{i}", None, retry).ok
    served_by = {ae: pid for pid, _port, ae in read_pid_records(assoc_file)}
    assert respawned_pid in {served_by[f"ECHO{i}"] for i in range(4)}
    assert set(run.success) | set(retry.success) | extra_uids == set(by_uid)
    stored = stored_files(rx.storage)
    assert set(stored) == set(by_uid)
    for uid in retry.success:
        assert_same_instance(by_uid[uid], stored[uid])

    print(
        f"\n{len(run.outcomes)} associations, {len(failed)} failed (on pid {victim_pid}), "
        f"{stored_before_kill} instances stored before the kill, {len(run.success)} in the "
        f"run, {len(missing)} retried; errors {run.errors[:3]}"
    )
    assert rx.stop() == 0
