"""Bad inputs and bad days: failing or hanging handlers, stalled and vanishing peers,
full disks, hostile UIDs, malformed PDUs. The worker answers with the contract's
failure status or aborts the one association, never dies, frees the slot, and never
leaves a partial file in the store.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    Verification,
)

from workers.engine import acse, dimse
from workers.engine import events as wevt
from workers.engine import pdu as p
from workers.engine.primitives import Aborted
from workers.storage import FileOps, StorageConfig

from .conftest import (
    CT_IMAGE,
    EXPLICIT_LE,
    MR_IMAGE,
    VERIFICATION,
    RawPeer,
    WorkerFactory,
    WorkerThread,
    encode_plain,
    incoming_files,
    make_image,
    stored_files,
    wait_for,
)

PRINTER = "1.2.840.10008.5.1.1.16"
PRINTER_INSTANCE = "1.2.840.10008.5.1.1.17"

CT_CONTEXTS = [acse.Requested(VERIFICATION), acse.Requested(CT_IMAGE, (EXPLICIT_LE,))]


def scu(*contexts: str) -> AE:
    ae = AE(ae_title="PYNETSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for uid in contexts:
        ae.add_requested_context(uid)
    return ae


def query() -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "PATIENT"
    ds.PatientID = ""
    return ds


def assert_serves(w: WorkerThread, *, echo: bool = True, store: bool = True) -> None:
    """The worker still accepts associations and answers on them (with the built-in
    C-ECHO / C-STORE unless the test bound its own handlers to them)."""
    peer = RawPeer(w, CT_CONTEXTS)
    assert peer.accepted is not None
    if store:
        ds = make_image()
        assert peer.store(CT_IMAGE, ds.SOPInstanceUID, encode_plain(ds)).Status == 0
    if echo:
        assert peer.echo() == 0
    peer.release()
    peer.close()


# --------------------------------------------------------------- failing handlers


def test_handlers_that_raise_get_the_failure_status(
    worker_factory: WorkerFactory, internal_errors: list[Any]
) -> None:
    def echo(event: Any) -> int:
        raise RuntimeError("echo broke")

    def find(event: Any) -> Iterator[Any]:
        ds = Dataset()
        ds.PatientID = "1"
        yield 0xFF00, ds
        raise RuntimeError("find broke halfway")

    async def get(event: Any) -> AsyncIterator[Any]:
        yield 1
        raise RuntimeError("get broke")

    def n_get(event: Any) -> Any:
        raise KeyError("n-get broke")

    def store(event: Any) -> Any:
        return "not a status"

    w = worker_factory(
        evt_handlers=[
            (wevt.EVT_C_ECHO, echo),
            (wevt.EVT_C_FIND, find),
            (wevt.EVT_C_GET, get),
            (wevt.EVT_N_GET, n_get),
            (wevt.EVT_C_STORE, store),
        ]
    )
    ae = scu(
        Verification,
        PatientRootQueryRetrieveInformationModelFind,
        PatientRootQueryRetrieveInformationModelGet,
        PRINTER,
        CTImageStorage,
    )
    assoc = ae.associate(w.host, w.port)
    try:
        # C-ECHO: the contract's default is Success; a handler that fails is not
        assert assoc.send_c_echo().Status == 0x0110
        find_rsp = list(assoc.send_c_find(query(), PatientRootQueryRetrieveInformationModelFind))
        assert [s.Status for s, _ in find_rsp] == [0xFF00, 0xC311]
        get_rsp = list(assoc.send_c_get(query(), PatientRootQueryRetrieveInformationModelGet))
        assert get_rsp[-1][0].Status == 0xC411
        status, _ = assoc.send_n_get([0x21100010], PRINTER, PRINTER_INSTANCE)
        assert status.Status == 0x0110
        ds = make_image()
        ds.file_meta = Dataset()
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
        assert assoc.send_c_store(ds).Status == 0xC211
        assert assoc.is_established
    finally:
        assoc.release()
    assert_serves(w, echo=False, store=False)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_hanging_handler_times_out(worker_factory: WorkerFactory, kind: str) -> None:
    release = asyncio.Event()

    def hang_sync(event: Any) -> int:
        time.sleep(2.0)  # longer than handler_timeout; the pool thread is lost meanwhile
        return 0

    async def hang_async(event: Any) -> int:
        await asyncio.sleep(30)
        return 0

    def find_hangs_in_next(event: Any) -> Iterator[Any]:
        ds = Dataset()
        ds.PatientID = "1"
        yield 0xFF00, ds
        time.sleep(2.0)
        yield 0xFF00, ds

    async def find_hangs_async(event: Any) -> AsyncIterator[Any]:
        ds = Dataset()
        ds.PatientID = "1"
        yield 0xFF00, ds
        await asyncio.sleep(30)
        yield 0xFF00, ds

    w = worker_factory(
        handler_timeout=0.3,
        evt_handlers=[
            (wevt.EVT_C_ECHO, hang_sync if kind == "sync" else hang_async),
            (wevt.EVT_C_FIND, find_hangs_in_next if kind == "sync" else find_hangs_async),
        ],
    )
    ae = scu(Verification, PatientRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(w.host, w.port)
    try:
        # the handler hangs for 30 s: only its timeout can have answered (the peer's
        # own DIMSE timeout is 10 s)
        assert assoc.send_c_echo().Status == 0x0110
        # meanwhile, other associations are served
        assert_serves(w, echo=False)
        rsp = list(assoc.send_c_find(query(), PatientRootQueryRetrieveInformationModelFind))
        assert [s.Status for s, _ in rsp] == [0xFF00, 0xC311]
    finally:
        assoc.release()
    release.set()
    assert_serves(w, echo=False)


# -------------------------------------------------------------- stalled peers


def test_peer_stalls_mid_pdu(worker_factory: WorkerFactory) -> None:
    """Half a P-DATA-TF, then silence: aborted after network_timeout, slot freed."""
    w = worker_factory(network_timeout=0.5, max_associations=1)
    peer = RawPeer(w, CT_CONTEXTS)
    assert peer.accepted is not None
    ctx = peer.context_id(VERIFICATION)
    # P-DATA-TF of 1000 bytes holding one PDV of 996: a command fragment; 40 bytes sent
    peer.send_raw(struct.pack(">BxLLBB", 0x04, 1000, 996, ctx, 0x03) + b"\x00" * 40)
    # the worker gives up on its own (read_until_closed raises if it does not): with
    # an A-ABORT that says why, the network timeout's
    rest = peer.read_until_closed(timeout=5)
    assert rest[:1] == b"\x07"  # A-ABORT before the close
    w.wait_idle()
    assert_serves(w)  # max_associations=1: the slot really is free


def test_peer_stalls_mid_dataset(worker_factory: WorkerFactory) -> None:
    """A C-STORE whose data set stops halfway: aborted after network_timeout, the
    temp file removed, nothing stored."""
    w = worker_factory(network_timeout=0.5, max_associations=1)
    peer = RawPeer(w, CT_CONTEXTS)
    ds = make_image(rows=128, columns=128)
    data = encode_plain(ds)
    ctx = peer.context_id(CT_IMAGE)
    peer.conn.send_command(ctx, dimse.c_store_rq(1, CT_IMAGE, ds.SOPInstanceUID))
    peer.conn.send_dataset(ctx, data[: len(data) // 2], last=False)
    peer.flush()
    wait_for(lambda: incoming_files(w.root), timeout=2)
    rest = peer.read_until_closed(timeout=5)  # raises unless the worker closes
    assert rest[:1] == b"\x07"
    w.wait_idle()
    assert incoming_files(w.root) == []
    assert stored_files(w.root) == {}
    assert_serves(w)


@pytest.mark.parametrize(
    "prefix",
    [b"", p.encode(acse.build_request("PACSRX", "RAWPEER", CT_CONTEXTS))[:40]],
    ids=["nothing", "half-an-associate-rq"],
)
def test_peer_silent_before_associating(worker_factory: WorkerFactory, prefix: bytes) -> None:
    """Connect and say nothing (or half an A-ASSOCIATE-RQ): ARTIM closes the connection."""
    w = worker_factory(artim_timeout=0.3)
    peer = RawPeer(w, associate=False)
    peer.send_raw(prefix)
    assert peer.read_until_closed(timeout=5) == b""  # raises unless the worker closes
    w.wait_idle()


# ------------------------------------------------------------------- full disks


def _enospc_ops(fail_uid_marker: list[bool]) -> FileOps:
    def write(fd: int, view: memoryview) -> int:
        if fail_uid_marker[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, view)

    return FileOps(write=write)


def test_disk_full_injected(worker_factory: WorkerFactory) -> None:
    full = [False]
    w = worker_factory(store_ops=_enospc_ops(full), fsync="always")
    peer = RawPeer(w, CT_CONTEXTS)
    ok = make_image(seed=1)
    assert peer.store(CT_IMAGE, ok.SOPInstanceUID, encode_plain(ok)).Status == 0
    full[0] = True
    bad = make_image(seed=2)
    rsp = peer.store(CT_IMAGE, bad.SOPInstanceUID, encode_plain(bad))
    assert rsp.Status == 0xA700
    assert rsp.ErrorComment and "ENOSPC" in rsp.ErrorComment
    assert incoming_files(w.root) == []
    full[0] = False
    again = make_image(seed=3)
    assert peer.store(CT_IMAGE, again.SOPInstanceUID, encode_plain(again)).Status == 0
    peer.release()
    assert set(stored_files(w.root)) == {ok.SOPInstanceUID, again.SOPInstanceUID}
    assert_serves(w)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs: {exc}")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=10, check=False)


def test_disk_full_tmpfs(worker_factory: WorkerFactory, small_tmpfs: Path) -> None:
    root = small_tmpfs / "store"
    w = worker_factory(storage=StorageConfig(root=root, fsync="always"))
    peer = RawPeer(w, CT_CONTEXTS)
    big = make_image(rows=800, columns=800)  # 1.25 MiB of pixels on a 1 MiB disk
    rsp = peer.store(CT_IMAGE, big.SOPInstanceUID, encode_plain(big))
    assert rsp.Status == 0xA700
    assert incoming_files(root) == []
    small = make_image()
    assert peer.store(CT_IMAGE, small.SOPInstanceUID, encode_plain(small)).Status == 0
    peer.release()
    peer.close()
    assert_serves(w)  # the next association succeeds too
    assert small.SOPInstanceUID in stored_files(root)
    assert big.SOPInstanceUID not in stored_files(root)


# ---------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    "uid",
    [
        "../../../../tmp/evil",
        "1.2.3/../../../evil",
        "..",
        "1.2.3\\..\\evil",
        "1.2.03",
        "1.2.3.",
        "abc",
    ],
)
def test_unsafe_sop_instance_uid(worker_factory: WorkerFactory, uid: str) -> None:
    w = worker_factory()
    peer = RawPeer(w, CT_CONTEXTS)
    ds = make_image()
    rsp = peer.store(CT_IMAGE, uid, encode_plain(ds))
    assert rsp.Status == 0x0117
    assert peer.echo() == 0  # the association goes on
    peer.release()
    assert stored_files(w.root) == {}
    assert incoming_files(w.root) == []
    parent = w.root.parent
    assert not any("evil" in path.name for path in parent.rglob("*"))
    assert not Path("/tmp/evil").exists()


def test_sop_class_not_matching_the_context(worker_factory: WorkerFactory) -> None:
    w = worker_factory()
    peer = RawPeer(w, CT_CONTEXTS)
    ds = make_image(sop_class=MR_IMAGE)
    ctx = peer.context_id(CT_IMAGE)
    rsp = peer.store(MR_IMAGE, ds.SOPInstanceUID, encode_plain(ds), context_id=ctx)
    assert rsp.Status == 0x0122
    assert peer.echo() == 0
    peer.release()
    assert stored_files(w.root) == {}


def test_unknown_sop_class_context_rejected(worker_factory: WorkerFactory) -> None:
    w = worker_factory(syntaxes={CT_IMAGE: (EXPLICIT_LE,), VERIFICATION: ("*",)})
    peer = RawPeer(
        w,
        [
            acse.Requested(VERIFICATION),
            acse.Requested(MR_IMAGE),
            acse.Requested(CT_IMAGE, ("1.2.840.10008.1.2",)),  # CT, but not this syntax
            acse.Requested(CT_IMAGE, (EXPLICIT_LE,)),
        ],
    )
    assert peer.accepted is not None
    results = {c.id: c.result for c in peer.accepted.response.contexts}
    assert results == {
        1: p.ContextResult.ACCEPTANCE,
        3: p.ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED,
        5: p.ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED,
        7: p.ContextResult.ACCEPTANCE,
    }
    # a message on the rejected context is a protocol error: A-ABORT
    peer.conn.contexts[3] = peer.conn.contexts[1]  # let our engine send it anyway
    ds = make_image(sop_class=MR_IMAGE)
    peer.send(3, dimse.c_store_rq(1, MR_IMAGE, ds.SOPInstanceUID), encode_plain(ds))
    assert isinstance(peer.wait_for(Aborted), Aborted)
    w.wait_idle()
    assert_serves(w)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x09\x00\x00\x00\x00\x02\x00\x00",  # unknown PDU type
        b"\x04\x00\x00\x00\x00\x04\x00\x00\x00\x00",  # P-DATA with a PDV too short
        b"\x04\x00\x00\x00\x00\x08\x00\x00\x00\x04\x01\x03\x00\x00",  # undecodable command
        b"\x01\x00\x00\x00\x00\x04\x00\x01\x00\x00",  # A-ASSOCIATE-RQ when established
    ],
    ids=["unknown-type", "short-pdv", "bad-command", "second-rq"],
)
def test_malformed_pdu_after_association(worker_factory: WorkerFactory, garbage: bytes) -> None:
    """A-ABORT, then the worker closes: at once, or when ARTIM expires if the peer
    does not close first (PS3.8 AA-8, Sta13)."""
    w = worker_factory(artim_timeout=0.5)
    peer = RawPeer(w, CT_CONTEXTS)
    peer.send_raw(garbage)
    rest = peer.read_until_closed(timeout=5)  # raises unless the worker closes
    assert rest[:1] == b"\x07"  # A-ABORT, then the close
    abort = p.decode(0x07, memoryview(rest[6:10]))
    assert abort.source == p.AbortSource.SERVICE_PROVIDER
    w.wait_idle()
    assert_serves(w)


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x01\x00\x00\x00\x00\x10" + b"\xff" * 16,  # A-ASSOCIATE-RQ, nonsense body
        b"\x04\x00\x00\x00\x00\x02\x00\x00",  # P-DATA before any association
    ],
    ids=["http", "bad-rq-body", "pdata-first"],
)
def test_malformed_bytes_before_association(worker_factory: WorkerFactory, garbage: bytes) -> None:
    w = worker_factory(artim_timeout=0.5)
    peer = RawPeer(w, associate=False)
    peer.send_raw(garbage)
    rest = peer.read_until_closed(timeout=5)  # raises unless the worker closes
    assert rest[:1] in (b"\x07", b"\x03", b"")  # A-ABORT or A-ASSOCIATE-RJ, then close
    w.wait_idle()
    assert_serves(w)


# ------------------------------------------------------------ peers that vanish


@pytest.mark.parametrize("mode", ["builtin", "builtin-fsync", "user-handler"])
def test_peer_reset_mid_instance(worker_factory: WorkerFactory, mode: str) -> None:
    handled: list[str] = []
    handlers = []
    if mode == "user-handler":
        handlers = [(wevt.EVT_C_STORE, lambda e: handled.append(e.request.MessageID) or 0)]
    w = worker_factory(
        evt_handlers=handlers, fsync="always" if mode == "builtin-fsync" else "never"
    )
    peer = RawPeer(w, CT_CONTEXTS)
    done = make_image(seed=1)
    assert peer.store(CT_IMAGE, done.SOPInstanceUID, encode_plain(done)).Status == 0
    ds = make_image(rows=256, columns=256, seed=2)
    data = encode_plain(ds)
    ctx = peer.context_id(CT_IMAGE)
    peer.conn.send_command(ctx, dimse.c_store_rq(2, CT_IMAGE, ds.SOPInstanceUID))
    peer.conn.send_dataset(ctx, data[: len(data) // 2], last=False)
    peer.flush()
    wait_for(lambda: incoming_files(w.root), timeout=2)  # the temp/spool file exists
    peer.reset()
    w.wait_idle()
    wait_for(lambda: incoming_files(w.root) == [], timeout=2)
    stored = stored_files(w.root)
    assert ds.SOPInstanceUID not in stored
    if mode == "user-handler":
        assert handled == [1]
        assert stored == {}
    else:
        assert set(stored) == {done.SOPInstanceUID}
    assert_serves(w)


def test_peer_closes_while_handler_runs(worker_factory: WorkerFactory) -> None:
    """The peer leaves while a slow handler works: its late answer goes nowhere."""
    finished: list[int] = []

    async def slow_echo(event: Any) -> int:
        await asyncio.sleep(0.3)
        finished.append(1)
        return 0

    w = worker_factory(evt_handlers=[(wevt.EVT_C_ECHO, slow_echo)])
    peer = RawPeer(w, CT_CONTEXTS)
    peer.send(peer.context_id(VERIFICATION), dimse.c_echo_rq(1))
    peer.reset()
    wait_for(lambda: finished, timeout=3)
    w.wait_idle()
    assert_serves(w)


def test_release_waits_for_outstanding_operation(worker_factory: WorkerFactory) -> None:
    """A-RELEASE-RQ while a request is being served: the response comes first."""

    async def slow_echo(event: Any) -> int:
        await asyncio.sleep(0.2)
        return 0

    w = worker_factory(evt_handlers=[(wevt.EVT_C_ECHO, slow_echo)])
    peer = RawPeer(w, CT_CONTEXTS)
    peer.send(peer.context_id(VERIFICATION), dimse.c_echo_rq(1))
    peer.conn.release(time.monotonic())
    peer.flush()
    rsp, _ = peer.response()
    assert rsp.Status == 0
    from workers.engine.primitives import Released

    peer.wait_for(Released)
    w.wait_idle()


def test_window_overrun_aborts(worker_factory: WorkerFactory) -> None:
    """Two requests outstanding on a window of 1: the peer broke the agreement."""

    async def slow_echo(event: Any) -> int:
        await asyncio.sleep(0.5)
        return 0

    w = worker_factory(evt_handlers=[(wevt.EVT_C_ECHO, slow_echo)])
    peer = RawPeer(w, CT_CONTEXTS)
    ctx = peer.context_id(VERIFICATION)
    peer.send(ctx, dimse.c_echo_rq(1))
    peer.send(ctx, dimse.c_echo_rq(2))
    assert isinstance(peer.wait_for(Aborted), Aborted)
    w.wait_idle()


def test_max_associations_rejects_transiently(worker_factory: WorkerFactory) -> None:
    w = worker_factory(max_associations=1)
    first = RawPeer(w, CT_CONTEXTS)
    assert first.accepted is not None
    second = RawPeer(w, CT_CONTEXTS)
    assert second.rejected is not None
    assert second.rejected.response.result == p.RejectResult.TRANSIENT
    first.release()
    first.close()
    second.close()
    w.wait_idle()
    assert_serves(w)


def test_aborted_association_frees_its_slot_at_once(worker_factory: WorkerFactory) -> None:
    """After an A-ABORT the connection may wait in Sta13 for the peer to close (up to
    ARTIM); the association's slot is free meanwhile."""
    w = worker_factory(max_associations=1, artim_timeout=5.0)
    peer = RawPeer(w, CT_CONTEXTS)
    peer.send_raw(b"\x09\x00\x00\x00\x00\x02\x00\x00")  # unknown PDU type
    pdu_type, _ = peer.read_pdu(timeout=2)
    assert pdu_type == 0x07
    assert w.connections() == 1  # lingering: this peer does not close
    assert_serves(w)  # yet a new association is accepted
    peer.close()
    w.wait_idle()


def test_slow_negotiation_is_bounded_by_acse_timeout(worker_factory: WorkerFactory) -> None:
    async def slow_user_check(event: Any) -> tuple[bool, None]:
        await asyncio.sleep(3)
        return True, None

    w = worker_factory(
        acse_timeout=0.3, handler_timeout=10, evt_handlers=[(wevt.EVT_USER_ID, slow_user_check)]
    )
    ae = scu(Verification)
    from pynetdicom.pdu_primitives import UserIdentityNegotiation

    item = UserIdentityNegotiation()
    item.user_identity_type = 1
    item.primary_field = b"bob"
    assoc = ae.associate(w.host, w.port, ext_neg=[item])
    assert assoc.is_rejected  # the check outlasts the ACSE timeout: nothing else rejects
    assert_serves(w)  # no identity item: no handler, accepted


def test_handler_slower_than_network_timeout_is_not_an_idle_peer(
    worker_factory: WorkerFactory,
) -> None:
    async def slow_echo(event: Any) -> int:
        await asyncio.sleep(1.5)
        return 0

    w = worker_factory(network_timeout=0.5, evt_handlers=[(wevt.EVT_C_ECHO, slow_echo)])
    peer = RawPeer(w, CT_CONTEXTS)
    assert peer.echo() == 0
    peer.release()


def test_handler_in_thread_pool_may_abort(
    worker_factory: WorkerFactory, internal_errors: list[Any]
) -> None:
    """A plain-function handler (run in the pool) calling event.assoc.abort()."""

    def abort_on_store(event: Any) -> int:
        event.assoc.abort()
        return 0

    w = worker_factory(evt_handlers=[(wevt.EVT_C_STORE, abort_on_store)])
    peer = RawPeer(w, CT_CONTEXTS)
    ds = make_image()
    peer.send(peer.context_id(CT_IMAGE), dimse.c_store_rq(1, CT_IMAGE, ds.SOPInstanceUID))
    peer.conn.send_dataset(peer.context_id(CT_IMAGE), encode_plain(ds))
    peer.flush()
    assert isinstance(peer.wait_for(Aborted), Aborted)
    w.wait_idle()
    wait_for(lambda: incoming_files(w.root) == [])  # the spool goes when the handler ends
    assert_serves(w, store=False)


def test_slow_reader_holds_c_find_back(worker_factory: WorkerFactory) -> None:
    """A peer that does not read: the C-FIND handler is not run to the end into an
    ever-growing write buffer."""
    produced = [0]

    def find(event: Any) -> Iterator[Any]:
        blob = "X" * 60_000
        for i in range(20_000):  # 1.2 GB if nobody held it back
            ds = Dataset()
            ds.PatientID = str(i)
            ds.TextValue = blob  # UT: no length limit
            produced[0] = i
            yield 0xFF00, ds

    w = worker_factory(evt_handlers=[(wevt.EVT_C_FIND, find)], network_timeout=30)
    peer = RawPeer(
        w, [acse.Requested(PatientRootQueryRetrieveInformationModelFind, (EXPLICIT_LE,))]
    )
    ctx = peer.context_id(PatientRootQueryRetrieveInformationModelFind)
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    rq = dimse.c_find_rq(1, PatientRootQueryRetrieveInformationModelFind)
    peer.send(ctx, rq, encode_plain(query()))
    time.sleep(1.0)  # read nothing
    first = produced[0]
    time.sleep(0.5)
    assert produced[0] == first  # stalled on the unread socket
    assert first < 2_000  # a few MB of socket and transport buffers, not 1.2 GB
    peer.reset()
    w.wait_idle()
    time.sleep(0.3)
    last = produced[0]
    time.sleep(0.3)
    assert produced[0] == last < 2_000  # the peer left: the handler is not run on


def test_user_store_handler_disk_full(worker_factory: WorkerFactory, small_tmpfs: Path) -> None:
    """The spool of a user C-STORE handler hits ENOSPC: 0xA700, handler not called,
    association goes on, nothing left behind."""
    called: list[int] = []
    root = small_tmpfs / "store"
    w = worker_factory(
        storage=StorageConfig(root=root, fsync="never"),
        evt_handlers=[(wevt.EVT_C_STORE, lambda e: called.append(1) or 0)],
    )
    peer = RawPeer(w, CT_CONTEXTS)
    big = make_image(rows=800, columns=800)
    assert peer.store(CT_IMAGE, big.SOPInstanceUID, encode_plain(big)).Status == 0xA700
    assert called == []
    assert incoming_files(root) == []
    small = make_image()
    assert peer.store(CT_IMAGE, small.SOPInstanceUID, encode_plain(small)).Status == 0
    assert called == [1]
    peer.release()
    wait_for(lambda: incoming_files(root) == [])


def test_generate_uid_is_valid() -> None:
    # guards the hostile-UID test above: our good UIDs pass the same validation
    from workers.storage import is_valid_uid

    assert is_valid_uid(generate_uid())
