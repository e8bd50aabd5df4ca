"""Tests for workers.scu, the requestor API, against real peers.

Peers (tests/worker/peers.py): pynetdicom SCPs in this process (one module-wide for
most services, one as the C-MOVE destination), a pynetdicom SCP in a child process for
the large-file memory test, DCMTK storescp, and an acceptor built on our own engine
for what real SCPs will not do on demand (grant an async ops window, answer out of
order, vanish mid-operation). Everything listens on 127.0.0.1; every test runs under
an asyncio timeout so that nothing can hang.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pydicom
import pytest
import uvloop
from pydicom.dataset import Dataset
from pynetdicom import build_context, evt

import tests.dcmtk as dcmtk_tools
from loadtest import netns
from workers.engine import dimse
from workers.engine import pdu as p
from workers.engine.connection import EngineConfig
from workers.scu import (
    AssociationAborted,
    AssociationRejected,
    AsyncOpsWindow,
    Requested,
    Requestor,
    RoleSelection,
    associate,
    parse_part10_header,
)
from workers.scu.part10 import NeedMoreData

from .peers import (
    ALL_SYNTAXES,
    BASIC_FILM_SESSION,
    DEFLATED,
    DISPLAY_SYSTEM,
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    PATIENT_ROOT_FIND,
    PATIENT_ROOT_GET,
    PATIENT_ROOT_MOVE,
    PRINT_META,
    SC_IMAGE,
    VERIFICATION,
    EngineSCP,
    EngineSCPConnection,
    PynetdicomSCP,
    encode,
    file_meta_bytes,
    hash_scp_process,
    make_dataset,
    storescp,
    write_big_part10,
    write_part10,
)

pytestmark = pytest.mark.interop

T = TypeVar("T")
LOOPS = ["asyncio", "uvloop"]


def run(main: Callable[[], Awaitable[T]], loop: str = "uvloop", timeout: float = 20) -> T:
    """Run ``main()`` on a fresh event loop of the given kind, bounded by ``timeout``."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await main()

    if loop == "uvloop":
        return uvloop.run(bounded())
    return asyncio.run(bounded())


STORE_CONTEXTS = [Requested(SC_IMAGE, (ts,)) for ts in ALL_SYNTAXES]


# ------------------------------------------------------------------- fixtures


class SCPState:
    """What the module's pynetdicom SCP handlers saw, and how they behave."""

    def __init__(self) -> None:
        self.n_requests: list[tuple[str, Any]] = []
        self.echo_gate = threading.Event()
        self.echo_mode = "answer"  # "answer" | "hang" | "abort"


@pytest.fixture(scope="module")
def dest_scp() -> Any:
    with PynetdicomSCP(ae_title="DEST") as scp:
        yield scp


@pytest.fixture(scope="module")
def state() -> SCPState:
    return SCPState()


def _find_result(i: int) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "PATIENT"
    ds.PatientID = f"P{i}"
    ds.PatientName = f"Name^{i}"
    return ds


@pytest.fixture(scope="module")
def scp(dest_scp: PynetdicomSCP, state: SCPState) -> Any:
    def on_echo(event: Any) -> int:
        if state.echo_mode == "hang":
            state.echo_gate.wait(5)
        elif state.echo_mode == "abort":
            event.assoc.abort()
        return 0x0000

    def on_find(event: Any) -> Any:
        many = event.identifier.PatientID == "MANY"
        for i in range(200 if many else 3):
            if event.is_cancelled:
                yield 0xFE00, None
                return
            if many:
                time.sleep(0.01)
            yield 0xFF00, _find_result(i)

    def instances() -> list[Dataset]:
        return [make_dataset(EXPLICIT_LE, n=100 + i, pixel_bytes=256) for i in range(3)]

    def on_get(event: Any) -> Any:
        items = instances()
        yield len(items)
        for ds in items:
            yield 0xFF00, ds

    def on_move(event: Any) -> Any:
        if event.move_destination != "DEST":
            yield None, None
            return
        contexts = [build_context(SC_IMAGE, EXPLICIT_LE)]
        yield "127.0.0.1", dest_scp.port, {"contexts": contexts}
        items = instances()
        yield len(items)
        for ds in items:
            yield 0xFF00, ds

    def n_handler(name: str, reply: Callable[[Any], Dataset | None]) -> Callable[[Any], Any]:
        def handle(event: Any) -> Any:
            state.n_requests.append((name, event))
            if name == "delete":
                return 0x0000  # pynetdicom's N-DELETE handlers return the status only
            return 0x0000, reply(event)

        return handle

    def named(value: str) -> Callable[[Any], Dataset]:
        def build(event: Any) -> Dataset:
            ds = Dataset()
            ds.PatientName = value
            return ds

        return build

    handlers = [
        (evt.EVT_C_ECHO, on_echo),
        (evt.EVT_C_FIND, on_find),
        (evt.EVT_C_GET, on_get),
        (evt.EVT_C_MOVE, on_move),
        (evt.EVT_N_GET, n_handler("get", named("N^Get"))),
        (evt.EVT_N_SET, n_handler("set", lambda e: e.modification_list)),
        (evt.EVT_N_ACTION, n_handler("action", named("N^Action"))),
        (evt.EVT_N_CREATE, n_handler("create", lambda e: e.attribute_list)),
        (evt.EVT_N_DELETE, n_handler("delete", lambda e: None)),
        (evt.EVT_N_EVENT_REPORT, n_handler("event", named("N^Event"))),
    ]
    with PynetdicomSCP(handlers=handlers) as server:
        yield server
    state.echo_gate.set()


async def _associate(port: int, contexts: list[Requested], **kwargs: Any) -> Requestor:
    kwargs.setdefault("called_ae", "PYSCP")
    return await associate("127.0.0.1", port, contexts=contexts, **kwargs)


# ---------------------------------------------------------------- verification


@pytest.mark.parametrize("loop", LOOPS)
def test_echo_and_association_facts(scp: PynetdicomSCP, loop: str) -> None:
    async def main() -> None:
        contexts = [Requested(VERIFICATION), Requested("1.2.3.4.5.6.7")]
        async with await _associate(scp.port, contexts, max_pdu_length=65536) as assoc:
            assert assoc.is_established
            assert await assoc.send_c_echo() == 0x0000
            assert [c.abstract_syntax for c in assoc.accepted_contexts] == [VERIFICATION]
            assert [c.abstract_syntax for c, _ in assoc.rejected_contexts] == ["1.2.3.4.5.6.7"]
            assert assoc.peer_max_pdu_length == 16382
            assert assoc.max_outstanding == 1  # no async ops proposed
            assert assoc.user_info.implementation_class_uid
            sock = assoc._protocol.transport.get_extra_info("socket")  # type: ignore[union-attr]
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            with pytest.raises(ValueError, match="rejected"):
                assoc.context_for("1.2.3.4.5.6.7")
        assert not assoc.is_established

    run(main, loop)


# -------------------------------------------------------------------- C-STORE


@pytest.mark.parametrize("loop", LOOPS)
def test_store_bytes_in_every_syntax(scp: PynetdicomSCP, loop: str) -> None:
    scp.received.clear()
    sent: dict[str, bytes] = {}

    async def main() -> None:
        async with await _associate(scp.port, STORE_CONTEXTS) as assoc:
            for i, ts in enumerate(ALL_SYNTAXES):
                ds = make_dataset(ts, n=10 + i)
                raw = encode(ds, ts)
                sent[ds.SOPInstanceUID] = raw
                rsp = await assoc.send_c_store(
                    raw,
                    sop_class_uid=SC_IMAGE,
                    sop_instance_uid=ds.SOPInstanceUID,
                    transfer_syntax=ts,
                )
                assert rsp.Status == 0x0000
                assert rsp.AffectedSOPInstanceUID == ds.SOPInstanceUID
                assert rsp.CommandField == dimse.CommandField.C_STORE_RSP

    run(main, loop)
    got = {r.sop_instance: r for r in scp.received}
    assert set(got) == set(sent)
    for uid, raw in sent.items():
        assert got[uid].data == raw
    assert sorted(r.transfer_syntax for r in got.values()) == sorted(ALL_SYNTAXES)


@pytest.mark.parametrize("loop", LOOPS)
def test_store_part10_files_in_every_syntax(scp: PynetdicomSCP, tmp_path: Path, loop: str) -> None:
    scp.received.clear()
    sent: dict[str, tuple[str, bytes]] = {}
    paths = []
    for i, ts in enumerate(ALL_SYNTAXES):
        ds = make_dataset(ts, n=20 + i, pixel_bytes=4096)
        path = tmp_path / f"{i}.dcm"
        sent[ds.SOPInstanceUID] = (ts, write_part10(path, ds, ts))
        paths.append(path)

    async def main() -> None:
        async with await _associate(scp.port, STORE_CONTEXTS) as assoc:
            for i, path in enumerate(paths):
                # str and PathLike both work
                rsp = await assoc.send_c_store(str(path) if i % 2 else path)
                assert rsp.Status == 0x0000

    run(main, loop)
    got = {r.sop_instance: r for r in scp.received}
    assert set(got) == set(sent)
    for uid, (ts, raw) in sent.items():
        assert got[uid].transfer_syntax == ts
        assert got[uid].data == raw


def test_store_dataset_in_every_syntax(scp: PynetdicomSCP) -> None:
    scp.received.clear()
    datasets = {ts: make_dataset(ts, n=30 + i) for i, ts in enumerate(ALL_SYNTAXES)}

    async def main() -> None:
        async with await _associate(scp.port, STORE_CONTEXTS) as assoc:
            for ts, ds in datasets.items():
                # the syntax comes from file_meta; pydicom encodes on this path
                rsp = await assoc.send_c_store(ds)
                assert rsp.Status == 0x0000, ts
            # an uncompressed Dataset without file_meta goes in an accepted native syntax
            bare = make_dataset(EXPLICIT_LE, n=39)
            del bare.file_meta
            assert (await assoc.send_c_store(bare)).Status == 0x0000

    run(main)
    got = {r.sop_instance: r for r in scp.received}
    for ts, ds in datasets.items():
        received = got[ds.SOPInstanceUID]
        assert received.transfer_syntax == ts
        assert received.data == encode(ds, ts)
    assert got[f"{make_dataset(n=39).SOPInstanceUID}"].transfer_syntax in ALL_SYNTAXES[:4]


def test_store_move_originator_and_priority(scp: PynetdicomSCP) -> None:
    scp.received.clear()

    async def main() -> None:
        async with await _associate(scp.port, STORE_CONTEXTS[:1]) as assoc:
            ds = make_dataset(IMPLICIT_LE, n=40)
            rsp = await assoc.send_c_store(
                encode(ds, IMPLICIT_LE),
                sop_class_uid=SC_IMAGE,
                sop_instance_uid=ds.SOPInstanceUID,
                transfer_syntax=IMPLICIT_LE,
                priority=dimse.Priority.HIGH,
                move_originator_ae="MOVER",
                move_originator_message_id=77,
            )
            assert rsp.Status == 0

    run(main)
    (received,) = scp.received
    assert received.move_originator_ae == "MOVER"
    assert received.move_originator_id == 77
    assert received.calling_ae == "PACSRX-SCU"


def test_store_never_transcodes(scp: PynetdicomSCP, tmp_path: Path) -> None:
    be_file = tmp_path / "be.dcm"
    write_part10(be_file, make_dataset(EXPLICIT_BE, n=41), EXPLICIT_BE)
    not_dicom = tmp_path / "plain.bin"
    not_dicom.write_bytes(b"x" * 300)

    async def main() -> None:
        contexts = [Requested(SC_IMAGE, (EXPLICIT_LE,)), Requested(VERIFICATION)]
        async with await _associate(scp.port, contexts) as assoc:
            raw = encode(make_dataset(IMPLICIT_LE), IMPLICIT_LE)
            with pytest.raises(ValueError, match="transcoding is not supported"):
                await assoc.send_c_store(
                    raw,
                    sop_class_uid=SC_IMAGE,
                    sop_instance_uid="1.2.3",
                    transfer_syntax=IMPLICIT_LE,
                )
            with pytest.raises(ValueError, match=EXPLICIT_BE):
                await assoc.send_c_store(be_file)
            with pytest.raises(ValueError, match="required"):
                await assoc.send_c_store(raw, sop_class_uid=SC_IMAGE)
            with pytest.raises(ValueError, match="not a DICOM Part 10 file"):
                await assoc.send_c_store(not_dicom)
            with pytest.raises(ValueError, match="not proposed"):
                await assoc.send_c_store(
                    raw,
                    sop_class_uid="1.2.3.4",
                    sop_instance_uid="1.2",
                    transfer_syntax=IMPLICIT_LE,
                )
            # nothing was sent: the association is still good
            assert await assoc.send_c_echo() == 0

    run(main)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _rss_kib("VmHWM") <= _rss_kib("VmRSS") + 1024


@pytest.mark.slow
@pytest.mark.parametrize("loop", LOOPS)
def test_store_50mb_file_streams_with_bounded_memory(tmp_path: Path, loop: str) -> None:
    size = 50 * 1024 * 1024
    path = tmp_path / "big.dcm"
    uid, digest = write_big_part10(path, size)
    with hash_scp_process() as (port, proc):
        baseline = _rss_kib("VmRSS")
        exact_peak = _reset_peak_rss()
        samples = [baseline]
        stop = threading.Event()

        def sample() -> None:  # fallback when the kernel cannot reset VmHWM
            while not stop.wait(0.002):
                samples.append(_rss_kib("VmRSS"))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        async def main() -> None:
            contexts = [Requested(SC_IMAGE, (EXPLICIT_LE,))]
            async with await associate(
                "127.0.0.1", port, called_ae="HASHSCP", contexts=contexts
            ) as assoc:
                # the child announces no maximum: PDUs are as large as our reads
                assert assoc.peer_max_pdu_length == 0
                rsp = await assoc.send_c_store(path)
                assert rsp.Status == 0

        run(main, loop, timeout=30)
        stop.set()
        sampler.join()
        peak = _rss_kib("VmHWM") if exact_peak else max(samples)
        assert proc.stdout is not None
        report = __import__("json").loads(proc.stdout.readline())
    assert report["sop_instance"] == uid
    assert report["length"] == path.stat().st_size - (
        parse_part10_header(path.read_bytes()[:4096], eof=False).dataset_offset
    )
    assert report["sha256"] == digest
    growth_mib = (peak - baseline) / 1024
    print(f"RSS growth sending 50 MiB ({loop}): {growth_mib:.1f} MiB")
    # 1 MiB reads plus a 2 MiB write buffer: far below the 50 MiB of the file
    assert growth_mib < 16, f"RSS grew by {growth_mib:.1f} MiB sending a 50 MiB file"


def test_store_large_file_in_small_pdus(scp: PynetdicomSCP, tmp_path: Path) -> None:
    """A file above the whole-read threshold streams as many 16 KiB PDUs."""
    scp.received.clear()
    path = tmp_path / "mid.dcm"
    ds = make_dataset(EXPLICIT_LE, n=42, pixel_bytes=5 * 1024 * 1024 + 3 * 8)
    raw = write_part10(path, ds, EXPLICIT_LE)

    async def main() -> None:
        async with await _associate(scp.port, STORE_CONTEXTS) as assoc:
            assert (await assoc.send_c_store(path)).Status == 0

    run(main)
    (received,) = scp.received
    assert received.data == raw


def _buffers(raw: bytes, block: int) -> list[bytes | bytearray | memoryview]:
    """``raw`` as several buffers of every kind: a head copy, an empty buffer, views
    of ``raw`` (one of 16-bit items), a bytearray; all but maybe the last even."""
    view = memoryview(raw)
    head = 1024
    parts: list[bytes | bytearray | memoryview] = [bytes(raw[:head]), b""]
    offset = head
    kinds = 0
    while offset < len(raw):
        end = min(offset + block, len(raw))
        piece = view[offset:end]
        if kinds % 3 == 1 and end < len(raw):
            parts.append(piece.cast("H"))  # len() counts items, nbytes the bytes
        elif kinds % 3 == 2:
            parts.append(bytearray(piece))
        else:
            parts.append(piece)
        offset = end
        kinds += 1
    return parts


@pytest.mark.parametrize("loop", LOOPS)
def test_store_buffers_as_one_data_set(scp: PynetdicomSCP, loop: str) -> None:
    """A data set given as a sequence of buffers arrives as their concatenation, also
    when the transport pauses between them (6 MiB in 16 KiB PDUs); the association
    goes on normally after it."""
    scp.received.clear()
    big = encode(make_dataset(EXPLICIT_LE, n=60, pixel_bytes=6 * 1024 * 1024), EXPLICIT_LE)
    small = encode(make_dataset(IMPLICIT_LE, n=61), IMPLICIT_LE)
    sent: dict[str, tuple[str, Sequence[bytes | bytearray | memoryview]]] = {
        "1.2.826.0.1.60": (EXPLICIT_LE, _buffers(big, 1024 * 1024)),
        "1.2.826.0.1.61": (IMPLICIT_LE, _buffers(small, 100)),
        "1.2.826.0.1.62": (EXPLICIT_LE, (b"\x08\x00" * 8, b"odd")),  # the last may be odd
        "1.2.826.0.1.63": (EXPLICIT_LE, [small]),  # one buffer
        "1.2.826.0.1.64": (EXPLICIT_LE, [b"", memoryview(small), b""]),
    }

    async def main() -> None:
        async with await _associate(scp.port, [*STORE_CONTEXTS, Requested(VERIFICATION)]) as assoc:
            for uid, (ts, parts) in sent.items():
                rsp = await assoc.send_c_store(
                    parts, sop_class_uid=SC_IMAGE, sop_instance_uid=uid, transfer_syntax=ts
                )
                assert rsp.Status == 0x0000
                assert rsp.AffectedSOPInstanceUID == uid
                assert assoc.outstanding == 0
            assert await assoc.send_c_echo() == 0x0000

    run(main, loop)
    got = {r.sop_instance: r for r in scp.received}
    assert set(got) == set(sent)
    for uid, (ts, parts) in sent.items():
        assert got[uid].data == b"".join(bytes(p) for p in parts)
        assert got[uid].transfer_syntax == ts
    assert got["1.2.826.0.1.60"].data == big


def test_store_buffers_odd_length_rule(scp: PynetdicomSCP) -> None:
    """Every buffer but the last must have an even length (fragments stay even; odd
    buffers are not coalesced): otherwise ValueError before anything is sent."""
    scp.received.clear()
    uid = "1.2.826.0.1.70"
    kw: dict[str, Any] = {
        "sop_class_uid": SC_IMAGE,
        "sop_instance_uid": uid,
        "transfer_syntax": EXPLICIT_LE,
    }

    async def main() -> None:
        async with await _associate(scp.port, [*STORE_CONTEXTS, Requested(VERIFICATION)]) as assoc:
            for parts in (
                [b"abc", b"de"],
                (b"ab", memoryview(b"xyz"), b"cd"),
                [b"abc", b"", b"de"],  # empty buffers do not hide an odd one
            ):
                with pytest.raises(ValueError, match="has an odd length"):
                    await assoc.send_c_store_nowait(parts, **kw)
                assert assoc.outstanding == 0
            with pytest.raises(TypeError, match="not bytes-like"):
                await assoc.send_c_store([b"ab", "cd"], **kw)  # type: ignore[list-item]
            with pytest.raises(ValueError, match="required"):
                await assoc.send_c_store([b"ab", b"cd"], sop_class_uid=SC_IMAGE)
            # nothing went out: the association is intact, and an odd last buffer is fine
            assert assoc.is_established
            assert await assoc.send_c_echo() == 0x0000
            assert (await assoc.send_c_store([b"ab", b"cde", b""], **kw)).Status == 0x0000

    run(main)
    (received,) = scp.received
    assert received.data == b"abcde"


def test_store_buffers_are_never_interleaved_with_other_messages() -> None:
    """While a multi-buffer data set waits for the transport to drain, concurrent
    requests (the window allows them) wait for its end: the peer sees each message
    whole, or its engine would abort the association."""
    window = 4
    got: dict[str, bytes] = {}

    def store(conn: EngineSCPConnection, command: dimse.Command, data: Any, ctx: int) -> None:
        got[str(command.AffectedSOPInstanceUID)] = bytes(data)
        conn.send(ctx, dimse.c_store_rsp(command, 0x0000))

    big = os.urandom(16 * 1024 * 1024)
    parts: list[bytes | memoryview] = [
        big[:1000],
        *(memoryview(big)[i : i + (3 << 20)] for i in range(1000, len(big), 3 << 20)),
    ]
    small = encode(make_dataset(), EXPLICIT_LE)

    async def main() -> None:
        async with EngineSCP(store, grant=AsyncOpsWindow(window, 1)) as peer:
            async with await associate(
                "127.0.0.1",
                peer.port,
                contexts=[Requested(SC_IMAGE, (EXPLICIT_LE,))],
                async_ops=AsyncOpsWindow(window, 1),
            ) as assoc:
                kw: dict[str, Any] = {"sop_class_uid": SC_IMAGE, "transfer_syntax": EXPLICIT_LE}
                big_task = asyncio.create_task(
                    assoc.send_c_store(parts, sop_instance_uid="1.2.3.0", **kw)
                )
                await asyncio.sleep(0)  # the big one starts and pauses mid-message
                assert assoc._stream_done is not None
                smalls = [
                    assoc.send_c_store(small, sop_instance_uid=f"1.2.3.{i}", **kw)
                    for i in range(1, 6)
                ]
                statuses = [r.Status for r in await asyncio.gather(big_task, *smalls)]
                assert statuses == [0] * 6

    run(main)
    assert got["1.2.3.0"] == big
    assert all(got[f"1.2.3.{i}"] == small for i in range(1, 6))


# ------------------------------------------------------------ C-FIND/GET/MOVE


@pytest.mark.parametrize("loop", LOOPS)
def test_c_find_pending_results(scp: PynetdicomSCP, loop: str) -> None:
    async def main() -> list[tuple[int, Dataset | None]]:
        query = Dataset()
        query.QueryRetrieveLevel = "PATIENT"
        query.PatientID = "*"
        query.PatientName = ""
        async with await _associate(scp.port, [Requested(PATIENT_ROOT_FIND)]) as assoc:
            return [item async for item in assoc.send_c_find(query, "P")]

    results = run(main, loop)
    assert [status for status, _ in results] == [0xFF00] * 3 + [0x0000]
    assert [str(ds.PatientID) for _, ds in results[:3] if ds is not None] == ["P0", "P1", "P2"]
    assert results[-1][1] is None


def test_c_find_cancel(scp: PynetdicomSCP) -> None:
    async def main() -> tuple[list[int], int | None]:
        query = Dataset()
        query.QueryRetrieveLevel = "PATIENT"
        query.PatientID = "MANY"
        statuses = []
        async with await _associate(scp.port, [Requested(PATIENT_ROOT_FIND)]) as assoc:
            op = assoc.send_c_find(query, PATIENT_ROOT_FIND)
            async for status, _ in op:
                statuses.append(status)
                if len(statuses) == 3:
                    op.cancel()
            assert assoc.outstanding == 0
            return statuses, op.message_id

    statuses, message_id = run(main)
    assert statuses[-1] == 0xFE00  # Cancel
    assert 3 <= len(statuses) < 50
    assert message_id is not None


def test_c_find_leaving_early_cancels_and_drains(scp: PynetdicomSCP) -> None:
    async def main() -> None:
        query = Dataset()
        query.QueryRetrieveLevel = "PATIENT"
        query.PatientID = "MANY"
        async with await _associate(scp.port, [Requested(PATIENT_ROOT_FIND)]) as assoc:
            async with assoc.send_c_find(query, "P") as op:
                async for status, _ in op:
                    assert status == 0xFF00
                    break
            # release waits for the cancelled operation's final response
        assert not assoc.is_established

    run(main)


def test_c_get_with_store_sub_operations(scp: PynetdicomSCP) -> None:
    stored: list[tuple[dimse.Command, bytes, str]] = []

    async def store_handler(command: dimse.Command, data: bytes, context: Any) -> int:
        await asyncio.sleep(0)
        stored.append((command, data, context.transfer_syntax))
        return 0x0000

    async def main() -> list[tuple[int, Dataset | None]]:
        contexts = [Requested(PATIENT_ROOT_GET), Requested(SC_IMAGE, (EXPLICIT_LE,))]
        query = Dataset()
        query.QueryRetrieveLevel = "PATIENT"
        query.PatientID = "*"
        async with await _associate(
            scp.port,
            contexts,
            roles=[RoleSelection(SC_IMAGE, scu_role=False, scp_role=True)],
            store_handler=store_handler,
        ) as assoc:
            assert assoc.user_info.roles == (RoleSelection(SC_IMAGE, False, True),)
            op = assoc.send_c_get(query, "P")
            results = [item async for item in op]
            assert op.response is not None
            assert op.response.NumberOfCompletedSuboperations == 3
            assert op.response.NumberOfFailedSuboperations == 0
            return results

    results = run(main)
    assert results[-1][0] == 0x0000
    assert all(status == 0xFF00 for status, _ in results[:-1])
    assert len(stored) == 3
    for i, (command, data, ts) in enumerate(stored):
        expected = make_dataset(EXPLICIT_LE, n=100 + i, pixel_bytes=256)
        assert command.AffectedSOPInstanceUID == expected.SOPInstanceUID
        assert ts == EXPLICIT_LE
        assert pydicom.dcmread(
            __import__("io").BytesIO(file_meta_bytes(SC_IMAGE, "1.2", ts) + data)
        ).SOPInstanceUID == (expected.SOPInstanceUID)


def test_c_get_failing_store_handler_is_reported(scp: PynetdicomSCP) -> None:
    def store_handler(command: dimse.Command, data: bytes, context: Any) -> int:
        raise RuntimeError("disk on fire")

    async def main() -> dimse.Command | None:
        contexts = [Requested(PATIENT_ROOT_GET), Requested(SC_IMAGE, (EXPLICIT_LE,))]
        query = Dataset()
        query.PatientID = "*"
        async with await _associate(
            scp.port,
            contexts,
            roles=[RoleSelection(SC_IMAGE, scu_role=False, scp_role=True)],
            store_handler=store_handler,
        ) as assoc:
            op = assoc.send_c_get(query, PATIENT_ROOT_GET)
            async for _ in op:
                pass
            return op.response

    final = run(main)
    assert final is not None
    assert final.NumberOfFailedSuboperations == 3
    assert final.Status != 0x0000


def test_c_move_to_a_second_scp(scp: PynetdicomSCP, dest_scp: PynetdicomSCP) -> None:
    dest_scp.received.clear()

    async def main() -> tuple[list[int], list[int]]:
        query = Dataset()
        query.QueryRetrieveLevel = "PATIENT"
        query.PatientID = "*"
        async with await _associate(scp.port, [Requested(PATIENT_ROOT_MOVE)]) as assoc:
            moved = [status async for status, _ in assoc.send_c_move(query, "DEST", "P")]
            unknown = [status async for status, _ in assoc.send_c_move(query, "NOWHERE", "P")]
            return moved, unknown

    moved, unknown = run(main)
    assert moved[-1] == 0x0000
    assert unknown == [0xA801]  # Move Destination unknown
    assert sorted(r.sop_instance for r in dest_scp.received) == sorted(
        make_dataset(n=100 + i).SOPInstanceUID for i in range(3)
    )
    assert all(r.calling_ae == "PYSCP" for r in dest_scp.received)


# ------------------------------------------------------------------- N-services


def test_n_services(scp: PynetdicomSCP, state: SCPState) -> None:
    state.n_requests.clear()

    async def main() -> None:
        contexts = [Requested(PRINT_META), Requested(DISPLAY_SYSTEM)]
        async with await _associate(scp.port, contexts) as assoc:
            film = "1.2.826.0.1.3680043.10.1415.99.500"
            kw = {"meta_sop_class_uid": PRINT_META}
            attrs = Dataset()
            attrs.NumberOfCopies = 2
            status, ds = await assoc.send_n_create(attrs, BASIC_FILM_SESSION, film, **kw)
            assert status == 0 and ds is not None and ds.NumberOfCopies == 2
            mods = Dataset()
            mods.NumberOfCopies = 3
            status, ds = await assoc.send_n_set(mods, BASIC_FILM_SESSION, film, **kw)
            assert status == 0 and ds is not None and ds.NumberOfCopies == 3
            status, ds = await assoc.send_n_get([0x00100010], BASIC_FILM_SESSION, film, **kw)
            assert status == 0 and ds is not None and ds.PatientName == "N^Get"
            status, ds = await assoc.send_n_action(None, 1, BASIC_FILM_SESSION, film, **kw)
            assert status == 0 and ds is not None and ds.PatientName == "N^Action"
            info = Dataset()
            info.PatientID = "EV"
            status, ds = await assoc.send_n_event_report(info, 2, BASIC_FILM_SESSION, film, **kw)
            assert status == 0 and ds is not None and ds.PatientName == "N^Event"
            status, ds = await assoc.send_n_delete(BASIC_FILM_SESSION, film, **kw)
            assert (status, ds) == (0, None)
            # without a meta SOP class, on its own context
            status, ds = await assoc.send_n_get([], DISPLAY_SYSTEM, "1.2.840.10008.5.1.1.40.1")
            assert status == 0 and ds is not None

    run(main)
    names = [name for name, _ in state.n_requests]
    assert names == ["create", "set", "get", "action", "event", "delete", "get"]
    events = dict(state.n_requests[:6])
    assert events["create"].request.AffectedSOPInstanceUID == "1.2.826.0.1.3680043.10.1415.99.500"
    assert events["set"].request.RequestedSOPClassUID == BASIC_FILM_SESSION
    tags = events["get"].request.AttributeIdentifierList
    assert (tags if isinstance(tags, list) else [tags]) == [0x00100010]
    assert events["action"].request.ActionTypeID == 1
    assert events["event"].request.EventTypeID == 2
    assert events["event"].event_information.PatientID == "EV"
    assert events["delete"].request.RequestedSOPInstanceUID == "1.2.826.0.1.3680043.10.1415.99.500"


# ------------------------------------------------------------------- failures


def test_rejection_carries_result_source_reason() -> None:
    with PynetdicomSCP(ae_title="RIGHT", require_called_aet=True) as scp:

        async def main() -> None:
            with pytest.raises(AssociationRejected) as info:
                await associate(
                    "127.0.0.1", scp.port, called_ae="WRONG", contexts=[Requested(VERIFICATION)]
                )
            rejected = info.value
            assert rejected.result == p.RejectResult.PERMANENT
            assert rejected.source == p.RejectSource.SERVICE_USER
            assert rejected.reason == p.RejectReason.CALLED_AE_NOT_RECOGNIZED
            assert "CALLED_AE_NOT_RECOGNIZED" in str(rejected)

        run(main)


def test_connection_refused() -> None:
    from .peers import free_port

    async def main() -> None:
        with pytest.raises(ConnectionRefusedError):
            await associate("127.0.0.1", free_port(), contexts=[Requested(VERIFICATION)])

    run(main)


def test_silent_scp_times_out_within_dimse_timeout(scp: PynetdicomSCP, state: SCPState) -> None:
    state.echo_mode = "hang"
    state.echo_gate.clear()

    async def main() -> None:
        assoc = await _associate(scp.port, [Requested(VERIFICATION)], dimse_timeout=0.3)
        # the SCP never answers: the DIMSE timeout (not the SCP) ends the call
        with pytest.raises(TimeoutError, match="DIMSE"):
            await assoc.send_c_echo()
        assert not assoc.is_established
        with pytest.raises(TimeoutError):  # the association is gone: fail fast, no hang
            await assoc.send_c_echo()

    try:
        run(main)
    finally:
        state.echo_mode = "answer"
        state.echo_gate.set()


@pytest.mark.parametrize("loop", LOOPS)
def test_peer_abort_mid_call(scp: PynetdicomSCP, state: SCPState, loop: str) -> None:
    state.echo_mode = "abort"

    async def main() -> None:
        assoc = await _associate(scp.port, [Requested(VERIFICATION)])
        with pytest.raises(AssociationAborted) as info:
            await assoc.send_c_echo()
        assert info.value.by_peer or info.value.source is None
        assert isinstance(info.value, ConnectionError)
        with pytest.raises(AssociationAborted):
            await assoc.send_c_echo()
        await assoc.release()  # over already: a no-op, not a hang

    try:
        run(main, loop, timeout=10)
    finally:
        state.echo_mode = "answer"


def test_peer_closing_transport_fails_pending_and_window_waiters() -> None:
    def vanish(conn: EngineSCPConnection, command: dimse.Command, data: Any, ctx: int) -> None:
        conn.writer.transport.abort()  # no A-ABORT, no A-RELEASE: the socket just goes

    async def main() -> None:
        async with EngineSCP(vanish, grant=AsyncOpsWindow(2, 1)) as peer:
            assoc = await associate(
                "127.0.0.1",
                peer.port,
                contexts=[Requested(SC_IMAGE, (EXPLICIT_LE,))],
                async_ops=AsyncOpsWindow(2, 1),
            )
            assert assoc.max_outstanding == 2
            raw = encode(make_dataset(), EXPLICIT_LE)
            kw: dict[str, Any] = {"sop_class_uid": SC_IMAGE, "transfer_syntax": EXPLICIT_LE}
            futures: list[Any] = [
                await assoc.send_c_store_nowait(raw, sop_instance_uid=f"1.2.{i}", **kw)
                for i in range(2)
            ]
            # a third sender waits for a window slot; it must fail, not hang
            third = asyncio.ensure_future(
                assoc.send_c_store_nowait(raw, sop_instance_uid="1.2.3", **kw)
            )
            for fut in [*futures, third]:
                with pytest.raises(ConnectionError):
                    result = await fut
                    if isinstance(result, asyncio.Future):
                        await result

    run(main, timeout=10)


def test_pipelining_out_of_order_responses() -> None:
    window = 4
    held: list[tuple[EngineSCPConnection, dimse.Command, int]] = []
    peak = [0]

    def answer_in_reverse(
        conn: EngineSCPConnection, command: dimse.Command, data: Any, ctx: int
    ) -> None:
        held.append((conn, command, ctx))
        peak[0] = max(peak[0], len(held))
        if len(held) == window:
            for c, rq, cid in reversed(held):
                c.send(cid, dimse.c_store_rsp(rq, 0x0000))
            held.clear()

    async def main() -> None:
        async with EngineSCP(answer_in_reverse, grant=AsyncOpsWindow(window, 1)) as peer:
            async with await associate(
                "127.0.0.1",
                peer.port,
                contexts=[Requested(SC_IMAGE, (EXPLICIT_LE,))],
                async_ops=AsyncOpsWindow(16, 1),
            ) as assoc:
                assert assoc.max_outstanding == window
                raw = encode(make_dataset(), EXPLICIT_LE)
                futures = []
                for i in range(4 * window):
                    futures.append(
                        await assoc.send_c_store_nowait(
                            raw,
                            sop_class_uid=SC_IMAGE,
                            sop_instance_uid=f"1.2.3.{i}",
                            transfer_syntax=EXPLICIT_LE,
                        )
                    )
                    assert assoc.outstanding <= window
                responses = await asyncio.gather(*futures)
                assert [r.AffectedSOPInstanceUID for r in responses] == [
                    f"1.2.3.{i}" for i in range(4 * window)
                ]
                ids = [r.MessageIDBeingRespondedTo for r in responses]
                assert len(set(ids)) == len(ids)

    run(main)
    assert peak[0] == window


def test_message_ids_wrap_and_stay_unique() -> None:
    def echo(conn: EngineSCPConnection, command: dimse.Command, data: Any, ctx: int) -> None:
        conn.send(ctx, dimse.c_echo_rsp(command))

    async def main() -> list[int | None]:
        async with EngineSCP(echo) as peer:
            async with await associate(
                "127.0.0.1", peer.port, contexts=[Requested(VERIFICATION)]
            ) as assoc:
                assoc._last_message_id = 65533  # white-box: start near the top
                for _ in range(4):
                    assert await assoc.send_c_echo() == 0
            return peer.message_ids

    assert run(main) == [65534, 65535, 1, 2]


def test_context_manager_aborts_on_exception_and_releases_otherwise() -> None:
    def echo(conn: EngineSCPConnection, command: dimse.Command, data: Any, ctx: int) -> None:
        conn.send(ctx, dimse.c_echo_rsp(command))

    async def main() -> list[str]:
        async with EngineSCP(echo) as peer:
            contexts = [Requested(VERIFICATION)]
            async with await associate("127.0.0.1", peer.port, contexts=contexts) as assoc:
                await assoc.send_c_echo()
            with pytest.raises(KeyError):
                async with await associate("127.0.0.1", peer.port, contexts=contexts) as assoc:
                    raise KeyError("boom")
            for _ in range(100):  # the acceptor sees the abort asynchronously
                if len(peer.ended) == 2:
                    break
                await asyncio.sleep(0.01)
            return [type(e).__name__ for e in peer.ended]

    assert run(main) == ["ReleaseRequested", "Aborted"]


def test_peer_abort_while_streaming_a_file(tmp_path: Path) -> None:
    """The acceptor's engine refuses a data set over 1 MiB mid-stream: A-ABORT."""
    path = tmp_path / "six.dcm"
    write_part10(path, make_dataset(EXPLICIT_LE, n=43, pixel_bytes=6 * 1024 * 1024), EXPLICIT_LE)

    def never(conn: EngineSCPConnection, command: dimse.Command, data: Any, ctx: int) -> None:
        raise AssertionError("the data set cannot complete")

    async def main() -> None:
        config = EngineConfig(max_pdu_length=0, max_dataset_in_memory=1024 * 1024)
        async with EngineSCP(never, config=config) as peer:
            assoc = await associate(
                "127.0.0.1", peer.port, contexts=[Requested(SC_IMAGE, (EXPLICIT_LE,))]
            )
            with pytest.raises(AssociationAborted) as info:
                await assoc.send_c_store(path)
            assert info.value.by_peer
            assert info.value.source == p.AbortSource.SERVICE_PROVIDER

    run(main, timeout=10)


def test_peer_that_stops_reading_times_out_the_sender(tmp_path: Path) -> None:
    path = tmp_path / "big.dcm"
    write_big_part10(path, 48 * 1024 * 1024)

    def never(conn: EngineSCPConnection, command: dimse.Command, data: Any, ctx: int) -> None:
        raise AssertionError("stalled peers read nothing")

    async def main() -> float:
        async with EngineSCP(never, stall=True) as peer:
            assoc = await associate(
                "127.0.0.1",
                peer.port,
                contexts=[Requested(SC_IMAGE, (EXPLICIT_LE,))],
                network_timeout=0.5,
            )
            start = time.monotonic()
            with pytest.raises(TimeoutError, match="took no data"):
                await assoc.send_c_store(path)
            assert not assoc.is_established
            return time.monotonic() - start

    assert run(main, timeout=10) < 5


def test_peer_initiated_release_fails_the_waiting_call() -> None:
    def release(conn: EngineSCPConnection, command: dimse.Command, data: Any, ctx: int) -> None:
        conn.conn.release(time.monotonic())  # instead of answering the C-ECHO
        conn.flush()

    async def main() -> None:
        async with EngineSCP(release) as peer:
            assoc = await associate("127.0.0.1", peer.port, contexts=[Requested(VERIFICATION)])
            with pytest.raises(ConnectionError, match="released"):
                await assoc.send_c_echo()
            assert not assoc.is_established
            for _ in range(100):
                if peer.ended:
                    break
                await asyncio.sleep(0.01)
            assert [type(e).__name__ for e in peer.ended] == ["Released"]

    run(main, timeout=10)


def test_event_reports_from_the_peer_go_to_the_handler() -> None:
    """Storage commitment style: N-ACTION, then the SCP's N-EVENT-REPORT on the same
    association, answered by ``event_report_handler``."""
    answers: list[dimse.Command] = []
    reports: list[tuple[int | None, bytes | None]] = []
    info = encode(make_dataset(IMPLICIT_LE, n=44), IMPLICIT_LE)

    def commit(conn: EngineSCPConnection, command: dimse.Command, data: Any, ctx: int) -> None:
        if command.CommandField == dimse.CommandField.N_ACTION_RQ:
            conn.send(ctx, dimse.response_for(command, 0x0000))
            report = dimse.n_event_report_rq(
                9, command.RequestedSOPClassUID or "", "1.2.840.10008.1.20.1.1", 1, True
            )
            conn.send(ctx, report, info)
        else:
            answers.append(command)

    async def on_report(command: dimse.Command, data: bytes | None, context: Any) -> int:
        reports.append((command.EventTypeID, data))
        return 0x0000

    async def main() -> None:
        commitment = "1.2.840.10008.1.20.1"
        async with EngineSCP(commit) as peer:
            async with await associate(
                "127.0.0.1",
                peer.port,
                contexts=[Requested(commitment, (IMPLICIT_LE,))],
                event_report_handler=on_report,
            ) as assoc:
                status, _ = await assoc.send_n_action(None, 1, commitment, "1.2.840.10008.1.20.1.1")
                assert status == 0
                for _ in range(100):
                    if answers:
                        break
                    await asyncio.sleep(0.01)

    run(main, timeout=10)
    assert reports == [(1, info)]
    (answer,) = answers
    assert answer.CommandField == dimse.CommandField.N_EVENT_REPORT_RSP
    assert (answer.MessageIDBeingRespondedTo, answer.Status) == (9, 0x0000)


def test_operations_on_a_dead_association_fail_fast(scp: PynetdicomSCP) -> None:
    async def main() -> None:
        contexts = [Requested(PATIENT_ROOT_FIND), Requested(VERIFICATION)]
        assoc = await _associate(scp.port, contexts)
        assoc.abort()
        query = Dataset()
        query.PatientID = "*"
        op = assoc.send_c_find(query, "P")
        for _ in range(2):  # the second try must not hang on the failed first
            with pytest.raises(AssociationAborted):
                await op.__anext__()
        with pytest.raises(AssociationAborted):
            await assoc.send_c_echo()
        with pytest.raises(AssociationAborted):
            await assoc.send_n_delete(VERIFICATION, "1.2")
        await assoc.release()  # no-op

    run(main, timeout=5)


# ---------------------------------------------------------------- Part 10 parse


def test_part10_header_parsing_incrementally() -> None:
    raw = file_meta_bytes(SC_IMAGE, "1.2.3.4", DEFLATED) + b"\x08\x00\x05\x00CS\x00\x00"
    header = parse_part10_header(raw, eof=True)
    assert (header.sop_class_uid, header.sop_instance_uid, header.transfer_syntax) == (
        SC_IMAGE,
        "1.2.3.4",
        DEFLATED,
    )
    assert raw[header.dataset_offset :] == b"\x08\x00\x05\x00CS\x00\x00"
    # every prefix either asks for more or parses to the same answer
    for cut in range(len(raw)):
        try:
            partial = parse_part10_header(raw[:cut], eof=False)
        except NeedMoreData as more:
            assert more.needed > cut
        else:
            assert partial == header
    # a file of meta information only has an empty data set
    meta_only = file_meta_bytes(SC_IMAGE, "1.2.3.4", DEFLATED)
    assert parse_part10_header(meta_only, eof=True).dataset_offset == len(meta_only)


def test_part10_header_tolerates_implicit_vr_meta_and_rejects_junk() -> None:
    def implicit(elem: int, value: bytes) -> bytes:
        if len(value) % 2:
            value += b"\x00"
        return b"\x02\x00" + elem.to_bytes(2, "little") + len(value).to_bytes(4, "little") + value

    raw = (
        bytes(128)
        + b"DICM"
        + implicit(0x0002, SC_IMAGE.encode())
        + implicit(0x0003, b"1.2.3")
        + implicit(0x0010, IMPLICIT_LE.encode())
        + b"\x08\x00\x18\x00"
    )
    header = parse_part10_header(raw, eof=True)
    assert header.sop_instance_uid == "1.2.3"
    assert header.transfer_syntax == IMPLICIT_LE
    with pytest.raises(ValueError, match="DICM"):
        parse_part10_header(bytes(200), eof=True)
    with pytest.raises(ValueError, match="lacks TransferSyntaxUID"):
        parse_part10_header(
            bytes(128) + b"DICM" + implicit(0x0002, b"1.2") + implicit(3, b"1"), True
        )


# ---------------------------------------------------------------------- DCMTK


needs_storescp = dcmtk_tools.needs("storescp")


@needs_storescp
def test_dcmtk_storescp_receives_identical_data_sets(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    sources = tmp_path / "src"
    sources.mkdir()
    sent: dict[str, bytes] = {}
    files = []
    for i, ts in enumerate(ALL_SYNTAXES):
        ds = make_dataset(ts, n=60 + i, pixel_bytes=20000)
        path = sources / f"{i}.dcm"
        sent[ds.SOPInstanceUID] = write_part10(path, ds, ts)
        files.append(path)
    raw_ds = make_dataset(IMPLICIT_LE, n=70)
    raw = encode(raw_ds, IMPLICIT_LE)
    sent[raw_ds.SOPInstanceUID] = raw

    with storescp(out) as port:
        assert netns.interfaces() == ["lo"]  # storescp, and we, only have loopback

        async def main() -> None:
            async with await associate(
                "127.0.0.1", port, called_ae="STORESCP", contexts=STORE_CONTEXTS
            ) as assoc:
                for path in files:
                    assert (await assoc.send_c_store(path)).Status == 0
                rsp = await assoc.send_c_store(
                    raw,
                    sop_class_uid=SC_IMAGE,
                    sop_instance_uid=raw_ds.SOPInstanceUID,
                    transfer_syntax=IMPLICIT_LE,
                )
                assert rsp.Status == 0

        run(main)
        deadline = time.monotonic() + 5
        while len(os.listdir(out)) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.05)
    received = {}
    for name in os.listdir(out):
        data = (out / name).read_bytes()
        header = parse_part10_header(data, eof=True)
        received[header.sop_instance_uid] = data[header.dataset_offset :]
    assert set(received) == set(sent)
    for uid, raw_sent in sent.items():
        assert received[uid] == raw_sent, uid
