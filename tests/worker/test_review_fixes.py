"""Protocol and resource bugs a code review found, each fed its bad input.

Deflate bombs in data sets given to handlers, Message IDs reused while outstanding,
odd-length Deflated response identifiers.
"""

from __future__ import annotations

import struct
import threading
import time
import zlib
from typing import Any

import pytest
from pydicom.dataset import Dataset

from workers.datasets import encode_dataset
from workers.engine import acse, dimse
from workers.engine import events as wevt
from workers.engine.deflate import DatasetTooLarge, deflate, inflate
from workers.scu import codec

from .conftest import (
    CT_IMAGE,
    EXPLICIT_LE,
    VERIFICATION,
    RawPeer,
    WorkerFactory,
    encode_plain,
    make_image,
)

pytestmark = pytest.mark.interop

FIND = "1.2.840.10008.5.1.4.1.2.1.1"  # Patient Root Query/Retrieve - FIND
DEFLATED = acse.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN


def _bomb(inflated: int) -> bytes:
    """A small Deflated identifier whose inflated form is ``inflated`` bytes and valid:
    Query/Retrieve Level, then a private OB element of zeros."""
    head = b"\x08\x00\x52\x00CS\x08\x00PATIENT "
    value = inflated - len(head) - 12
    element = struct.pack("<HH2sHI", 0x0011, 0x1010, b"OB", 0, value)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = c.compress(head + element)
    zeros = bytes(1 << 20)
    for _ in range(value >> 20):
        out += c.compress(zeros)
    out += c.compress(bytes(value & ((1 << 20) - 1))) + c.flush()
    return out + b"\x00" * (len(out) & 1)


# ------------------------------------------------------------------ deflate bomb


def test_inflate_is_bounded() -> None:
    data = _bomb(8 << 20)
    assert len(data) < 64 << 10
    with pytest.raises(DatasetTooLarge):
        inflate(data, 1 << 20)
    assert len(inflate(data, 8 << 20)) == 8 << 20  # the bound is inclusive
    assert inflate(deflate(b"abc" * 7), 21) == b"abc" * 7  # the pad byte is ignored


def test_requestor_codec_bounds_a_deflated_answer() -> None:
    with pytest.raises(DatasetTooLarge):
        codec.decode_dataset(_bomb(8 << 20), DEFLATED, 1 << 20)
    ds = codec.decode_dataset(_bomb(4096), DEFLATED, 1 << 20)
    assert ds.QueryRetrieveLevel == "PATIENT"


def test_deflate_bomb_identifier_gets_the_failure_status(worker_factory: WorkerFactory) -> None:
    """A 16 MiB identifier deflated to a few KiB, to a worker whose in-memory bound is
    1 MiB: the handler that reads it fails (C-FIND's failure status), the worker
    never inflates it whole, and the association goes on."""
    seen: list[str] = []

    def find(event: Any) -> Any:
        seen.append(str(event.identifier.QueryRetrieveLevel))
        yield 0xFF00, event.identifier

    w = worker_factory(evt_handlers=[(wevt.EVT_C_FIND, find)], max_dataset_in_memory=1 << 20)
    peer = RawPeer(w, [acse.Requested(VERIFICATION), acse.Requested(FIND, (DEFLATED,))])
    ctx = peer.context_id(FIND)
    peer.send(ctx, dimse.c_find_rq(1, FIND), _bomb(16 << 20))
    rsp, data = peer.response()
    assert rsp.Status == wevt.DEFAULT_STATUS[wevt.EVT_C_FIND]
    assert data is None and seen == []
    # a small one on the same association is served
    peer.send(ctx, dimse.c_find_rq(2, FIND), _bomb(4096))
    statuses = []
    while True:
        rsp, _ = peer.response()
        statuses.append(rsp.Status)
        if rsp.Status not in (0xFF00, 0xFF01):
            break
    assert statuses == [0xFF00, 0x0000]
    assert seen == ["PATIENT"]
    assert peer.echo() == 0
    peer.release()


# ----------------------------------------------------------- duplicate invocation


def test_reused_message_id_gets_duplicate_invocation(worker_factory: WorkerFactory) -> None:
    """PS3.7 C.5: a request whose Message ID is already outstanding is answered with
    Duplicate Invocation (0210H) and not served; the first one is served once."""
    gate = threading.Event()
    calls: list[int] = []

    def echo(event: Any) -> int:
        calls.append(event.message_id)
        gate.wait(10)
        return 0

    w = worker_factory(evt_handlers=[(wevt.EVT_C_ECHO, echo)], max_async_ops=4)
    peer = RawPeer(w, [acse.Requested(VERIFICATION)], async_ops=(4, 4))
    ctx = peer.context_id(VERIFICATION)
    peer.send(ctx, dimse.c_echo_rq(7))
    peer.send(ctx, dimse.c_echo_rq(7))
    rsp, _ = peer.response()
    assert (rsp.MessageIDBeingRespondedTo, rsp.Status) == (7, dimse.Status.DUPLICATE_INVOCATION)
    gate.set()
    rsp, _ = peer.response()
    assert (rsp.MessageIDBeingRespondedTo, rsp.Status) == (7, 0x0000)
    assert calls == [7]
    peer.release()


def test_reused_message_id_cannot_pass_the_window(worker_factory: WorkerFactory) -> None:
    """The same Message ID sent again and again while the first is outstanding never
    gets a second request served (the window of 2 is not a window of 3 this way); the
    duplicates' data sets are dropped."""
    gate = threading.Event()
    stored: list[str] = []

    def store(event: Any) -> int:
        stored.append(event.request.AffectedSOPInstanceUID)
        gate.wait(10)
        return 0

    w = worker_factory(evt_handlers=[(wevt.EVT_C_STORE, store)], max_async_ops=2)
    peer = RawPeer(w, [acse.Requested(CT_IMAGE, (EXPLICIT_LE,))], async_ops=(2, 2))
    ctx = peer.context_id(CT_IMAGE)
    images = [make_image(seed=i) for i in range(3)]
    for ds in images:
        peer.send(ctx, dimse.c_store_rq(1, CT_IMAGE, ds.SOPInstanceUID), encode_plain(ds))
    duplicates = [peer.response()[0] for _ in images[1:]]
    assert [r.Status for r in duplicates] == [dimse.Status.DUPLICATE_INVOCATION] * 2
    assert [r.AffectedSOPInstanceUID for r in duplicates] == [
        ds.SOPInstanceUID for ds in images[1:]
    ]
    gate.set()
    rsp, _ = peer.response()
    assert (rsp.AffectedSOPInstanceUID, rsp.Status) == (images[0].SOPInstanceUID, 0)
    assert stored == [images[0].SOPInstanceUID]
    peer.release()


# ------------------------------------------------------ odd-length Deflated answers


def _odd_deflated_identifier() -> Dataset:
    for n in range(200):
        ds = Dataset()
        ds.QueryRetrieveLevel = "PATIENT"
        ds.PatientID = "".join(chr(65 + (i * 7 + n) % 26) for i in range(n % 40 + 1))
        raw = encode_dataset(ds, EXPLICIT_LE)
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        if len(c.compress(raw) + c.flush()) & 1:
            return ds
    raise AssertionError("no identifier deflates to an odd length")


def test_deflated_response_identifier_has_even_length(worker_factory: WorkerFactory) -> None:
    """PS3.5 A.5: a deflated data set of odd length gets a trailing pad byte."""
    match = _odd_deflated_identifier()
    assert len(encode_dataset(match, DEFLATED)) % 2 == 0

    def find(event: Any) -> Any:
        yield 0xFF00, match

    w = worker_factory(evt_handlers=[(wevt.EVT_C_FIND, find)])
    peer = RawPeer(w, [acse.Requested(FIND, (DEFLATED,))])
    ctx = peer.context_id(FIND)
    query = Dataset()
    query.QueryRetrieveLevel = "PATIENT"
    peer.send(ctx, dimse.c_find_rq(1, FIND), encode_dataset(query, DEFLATED))
    rsp, data = peer.response()
    assert rsp.Status == 0xFF00 and data is not None
    assert len(data) % 2 == 0
    assert codec.decode_dataset(data, DEFLATED).PatientID == match.PatientID
    assert peer.response()[0].Status == 0x0000
    peer.release()


# ------------------------------------------------------------ ARTIM after release


def test_artim_after_release_counts_from_the_release(worker_factory: WorkerFactory) -> None:
    """An association older than the ARTIM timeout: after its A-RELEASE-RP the worker
    waits (ARTIM, PS3.8 Sta13) for the peer to close, instead of closing at once
    because the timer was started from the connection's opening."""
    w = worker_factory(artim_timeout=1.0)
    peer = RawPeer(w, [acse.Requested(VERIFICATION)])
    for _ in range(4):  # older than ARTIM, never idle
        time.sleep(0.35)
        assert peer.echo() == 0
    peer.conn.release(time.monotonic())
    peer.flush()
    pdu_type, _ = peer.read_pdu(5.0)
    assert pdu_type == 0x06  # A-RELEASE-RP
    peer.sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        peer.sock.recv(1)  # not closed by the worker: it waits for us
    peer.close()
    w.wait_idle()


def test_engine_timer_starts_at_the_local_primitive() -> None:
    from workers.engine import pdu as p
    from workers.engine.connection import Connection, EngineConfig, Role

    conn = Connection(Role.ACCEPTOR, EngineConfig(artim_timeout=30.0))
    conn.connection_made(0.0)
    rq = acse.build_request("PACSRX", "PEER", [acse.Requested(VERIFICATION)])
    conn.receive_data(p.encode(rq), 1.0)
    conn.next_event()
    # the answer comes at 100 s (a slow user identity check ...): ARTIM from then
    conn.reject(p.AssociateRJ(p.RejectResult.PERMANENT, 1, 1), 100.0)
    assert conn.get_timer() == 130.0


# ---------------------------------------------------------- handler thread pools


def test_stuck_dimse_handlers_do_not_block_identity_or_later_calls(
    worker_factory: WorkerFactory,
) -> None:
    """One handler thread; a C-ECHO handler that hangs far past its timeout. User
    identity checks still run (they have threads of their own), the hung call gets
    its failure status, and later C-ECHOs are served by a fresh thread instead of
    queueing behind the hung one."""
    from pynetdicom import AE
    from pynetdicom.pdu_primitives import UserIdentityNegotiation

    release_hung = threading.Event()
    checked: list[bytes] = []
    echoes = [0]

    def echo(event: Any) -> int:
        echoes[0] += 1
        if echoes[0] == 1:
            release_hung.wait(30)  # hangs (until the test ends)
        return 0

    def user_id(event: Any) -> tuple[bool, bytes | None]:
        checked.append(event.primary_field)
        return True, None

    w = worker_factory(
        evt_handlers=[(wevt.EVT_C_ECHO, echo), (wevt.EVT_USER_ID, user_id)],
        handler_threads=1,
        handler_timeout=1.0,
        acse_timeout=5.0,
    )
    try:
        hung = RawPeer(w, [acse.Requested(VERIFICATION)], timeout=10.0)
        assert hung.echo() == 0x0110  # timed out: the failure status
        ae = AE(ae_title="IDSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(VERIFICATION)
        item = UserIdentityNegotiation()
        item.user_identity_type = 1
        item.primary_field = b"alice"
        assoc = ae.associate(w.host, w.port, ae_title="PACSRX", ext_neg=[item])
        try:
            assert assoc.is_established
            assert checked == [b"alice"]
            # the only DIMSE thread is still hung: a fresh one answers
            assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
        assert hung.echo() == 0x0000
        hung.release()
    finally:
        release_hung.set()


def test_threads_lost_to_hung_handlers_are_bounded() -> None:
    """Past ``max_stuck`` threads held by hung handlers, calls fail at once (the
    caller answers its failure status) rather than starting more threads."""
    import asyncio

    from workers.handlers import _ThreadPool

    gate = threading.Event()
    pool = _ThreadPool("test", threads=1, max_stuck=2)

    async def scenario() -> list[str]:
        outcomes = []
        for _ in range(3):
            try:
                await pool.run(lambda: gate.wait(30), 0.5)
                outcomes.append("done")
            except TimeoutError:
                outcomes.append("timeout")
            except RuntimeError:
                outcomes.append("refused")
        gate.set()
        await asyncio.sleep(0)
        return outcomes

    try:
        assert asyncio.run(scenario()) == ["timeout", "timeout", "refused"]
    finally:
        gate.set()
        pool.shutdown()
