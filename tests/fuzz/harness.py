"""The fuzz targets, shared by the Hypothesis tests and the atheris entry points.

Each ``run_*`` function takes peer bytes (plus a few knobs a fuzzer chooses), drives
the code under test the way the worker does, and checks the properties of issue 8
("What they may send") as it goes:

* no exception escapes: a peer fault becomes an A-ABORT / A-ASSOCIATE-RJ plus an
  indication, never a raise (the driver below uses the engine correctly, so even a
  ``LocalProtocolError`` would be a bug here);
* memory stays bounded: after every read is parsed, the engine holds at most one
  control PDU (``max_control_pdu_length`` + 6) plus one read of unparsed bytes, its
  receive buffer's capacity at most twice that (it grows by doubling), the command
  buffer at most ``max_command_length`` and the data-set buffer at most
  ``max_dataset_in_memory`` bytes;
* everything the engine writes is a well-formed PDU that our own decoder reads back,
  and an A-ABORT it sends names a legal source/reason (PS3.8 Table 9-26);
* once the transport is closed the engine is idle (Sta1).

A violated property raises ``AssertionError`` (Hypothesis shrinks it; atheris
reports it as a crash), anything else escaping is the bug itself.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from workers.engine import acse, dimse
from workers.engine import pdu as p
from workers.engine.connection import Connection, EngineConfig, MemoryBudget, Role
from workers.engine.fsm import State
from workers.engine.primitives import (
    NEED_DATA,
    Aborted,
    AssociateAccepted,
    AssociateIndication,
    AssociateRejected,
    CommandReceived,
    DataSetReceived,
    Indication,
    Released,
    ReleaseRequested,
)
from workers.storage.scanner import (
    DEFLATED_TRANSFER_SYNTAXES,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    MAX_VALUE_LENGTH,
    TagScanner,
)

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

#: Every transfer syntax class the scanner distinguishes, plus an encapsulated one.
SCANNER_TRANSFER_SYNTAXES = (
    IMPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    *sorted(DEFLATED_TRANSFER_SYNTAXES),
    "1.2.840.10008.1.2.4.50",  # JPEG baseline: encapsulated, Explicit VR LE
    "1.2.840.10008.1.2.5",  # RLE
)

#: Legal A-ABORT (source, reason) pairs an engine may send (PS3.8 Table 9-26): the
#: service user always says reason 0; the provider one of 0, 1, 2, 4, 5, 6.
_PROVIDER_REASONS = frozenset(int(r) for r in p.AbortReason)

_HEADER = struct.Struct(">BxL")


# --------------------------------------------------------------------- engine configs


def small_config(choice: int = 0, read_buffer_size: int = 64) -> EngineConfig:
    """Engine configurations with small limits, so that fuzzing reaches every one."""
    configs = (
        EngineConfig(),  # the defaults
        EngineConfig(
            max_pdu_length=64,
            max_control_pdu_length=2048,
            max_command_length=256,
            max_dataset_in_memory=512,
            read_buffer_size=read_buffer_size,
            memory_budget=MemoryBudget(300),  # the process-wide bound, tighter here
        ),
        EngineConfig(
            max_pdu_length=0,  # "no limit" announced: P-DATA is streamed anyway
            max_control_pdu_length=4096,
            max_command_length=128,
            max_dataset_in_memory=1024,
            read_buffer_size=read_buffer_size,
            memory_budget=MemoryBudget(4096),
        ),
        EngineConfig(
            max_pdu_length=16 * 1024,
            max_control_pdu_length=70_000,
            max_command_length=64 * 1024,
            max_dataset_in_memory=4096,
            read_buffer_size=max(read_buffer_size, 4),
        ),
    )
    return configs[choice % len(configs)]


# ------------------------------------------------------------------ seeds (valid wire)


def command_pdata(context_id: int, raw: bytes, *, max_fragment: int = 0) -> bytes:
    """P-DATA-TF PDU(s) carrying a command set."""
    return _pdata(context_id, raw, control=0x01, max_fragment=max_fragment)


def dataset_pdata(context_id: int, raw: bytes, *, max_fragment: int = 0) -> bytes:
    """P-DATA-TF PDU(s) carrying a data set."""
    return _pdata(context_id, raw, control=0x00, max_fragment=max_fragment)


def _pdata(context_id: int, raw: bytes, *, control: int, max_fragment: int) -> bytes:
    step = max_fragment or max(len(raw), 1)
    out = []
    chunks = [raw[i : i + step] for i in range(0, len(raw), step)] or [b""]
    for n, chunk in enumerate(chunks):
        last = 0x02 if n == len(chunks) - 1 else 0
        pdv = p.PDV(context_id, control | last, chunk)
        out.append(p.encode(p.PDataTF((pdv,))))
    return b"".join(out)


def minimal_dataset(uid_suffix: str = "1") -> bytes:
    """A tiny Explicit VR LE data set with the tags the storage layout wants."""

    def el(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
        if len(value) & 1:
            value += b"\0" if vr == b"UI" else b" "
        return struct.pack("<HH2sH", group, elem, vr, len(value)) + value

    return b"".join(
        [
            el(0x0008, 0x0016, b"UI", CT_IMAGE_STORAGE.encode()),
            el(0x0008, 0x0018, b"UI", f"1.2.3.4.{uid_suffix}".encode()),
            el(0x0008, 0x0060, b"CS", b"CT"),
            el(0x0010, 0x0020, b"LO", b"PID1"),
            el(0x0020, 0x000D, b"UI", b"1.2.3.5"),
            el(0x0020, 0x000E, b"UI", b"1.2.3.6"),
            el(0x0028, 0x0010, b"US", b"\x01\x00"),
        ]
    )


def store_rq(message_id: int = 1, **overrides: object) -> dimse.Command:
    fields: dict[str, object] = {
        "MessageID": message_id,
        "AffectedSOPClassUID": CT_IMAGE_STORAGE,
        "AffectedSOPInstanceUID": f"1.2.3.4.{message_id}",
        "Priority": 0,
        "CommandDataSetType": dimse.DATASET_PRESENT,
    }
    fields.update(overrides)
    return dimse.Command(dimse.CommandField.C_STORE_RQ, **fields)  # type: ignore[arg-type]


def associate_rq(
    contexts: Sequence[tuple[str, tuple[str, ...]]] = (
        (VERIFICATION, (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN)),
        (CT_IMAGE_STORAGE, (EXPLICIT_VR_LITTLE_ENDIAN,)),
    ),
    **kwargs: object,
) -> p.AssociateRQ:
    requested = [acse.Requested(a, ts) for a, ts in contexts]
    return acse.build_request("PACSRX", "FUZZ", requested, **kwargs)  # type: ignore[arg-type]


def many_role_selections_rq(count: int = 1985) -> bytes:
    """An A-ASSOCIATE-RQ whose user information item is nearly full (64 KiB) of
    role selection sub-items, repeated for one SOP class, and nothing else."""
    roles = tuple(p.RoleSelection(CT_IMAGE_STORAGE, True, True) for _ in range(count))
    context = p.PresentationContextRQ(1, CT_IMAGE_STORAGE, ("1.2.840.10008.1.2",))
    user_info = p.UserInformation(max_length=16384, roles=roles)
    return p.encode(p.AssociateRQ("PACSRX", "ROLES", (context,), user_info))


def acceptor_seeds() -> list[bytes]:
    """Valid acceptor-side sessions: the starting points of mutation."""
    rq = p.encode(associate_rq())
    echo = dimse.encode_command(dimse.c_echo_rq(1))
    store = dimse.encode_command(store_rq(2))
    ds = minimal_dataset("2")
    release = p.encode(p.ReleaseRQ())
    return [
        rq + command_pdata(1, echo) + release,
        rq + command_pdata(3, store) + dataset_pdata(3, ds) + release,
        rq
        + command_pdata(3, store, max_fragment=7)
        + dataset_pdata(3, ds, max_fragment=10)
        + command_pdata(1, echo)
        + release,
        # two PDVs in one P-DATA-TF, then an abort
        rq
        + p.encode(
            p.PDataTF((p.PDV(3, 0x03, store), p.PDV(3, 0x02, ds)))  # command, data set
        )
        + p.encode(p.Abort(0, 0)),
        p.encode(
            associate_rq(
                async_ops=p.AsyncOpsWindow(2, 2),
                roles=(p.RoleSelection(CT_IMAGE_STORAGE, True, True),),
                user_identity=p.UserIdentityRQ(2, True, b"user", b"pass"),
                sop_class_extended=(p.SOPClassExtended(CT_IMAGE_STORAGE, b"\x01"),),
                sop_class_common_extended=(
                    p.SOPClassCommonExtended(CT_IMAGE_STORAGE, "1.2.840.10008.4.2", ("1.2",)),
                ),
            )
        )
        + command_pdata(1, echo)
        + release,
    ]


def requestor_seeds() -> list[bytes]:
    """Valid answers an acceptor could send to :func:`associate_rq`."""
    rq = associate_rq()
    ac = acse.negotiate(rq, acse.AcceptorPolicy())
    echo_rsp = dimse.encode_command(dimse.c_echo_rsp(dimse.c_echo_rq(1)))
    return [
        p.encode(ac) + command_pdata(1, echo_rsp) + p.encode(p.ReleaseRP()),
        p.encode(ac) + p.encode(p.ReleaseRQ()) + p.encode(p.ReleaseRP()),
        p.encode(p.AssociateRJ(1, 1, 3)),
        p.encode(p.Abort(2, 6)),
        p.encode(ac) + command_pdata(1, echo_rsp, max_fragment=3) + p.encode(p.Abort(0, 0)),
    ]


# ---------------------------------------------------------------- checking the engine


@dataclass(slots=True)
class Limits:
    """The bounds the engine promises, from its configuration and the read size."""

    config: EngineConfig
    max_read: int

    @property
    def pending(self) -> int:
        """Unparsed bytes after a read is parsed: one control PDU plus one read."""
        return self.config.max_control_pdu_length + 6 + self.max_read

    @property
    def capacity(self) -> int:
        """Receive-buffer capacity: twice that (it doubles), or the initial size."""
        return max(self.config.read_buffer_size, 2 * self.pending)


def check_bounds(conn: Connection, limits: Limits) -> None:
    """The memory properties, checked after a read has been parsed."""
    cfg = conn.config
    assert conn.buffered <= limits.pending, (
        f"{conn.buffered} unparsed bytes held (bound {limits.pending})"
    )
    assert len(conn._buf) <= limits.capacity, (
        f"receive buffer of {len(conn._buf)} bytes (bound {limits.capacity})"
    )
    assert 0 <= conn._start <= conn._end <= len(conn._buf)
    assert len(conn._command_buf) <= cfg.max_command_length, len(conn._command_buf)
    if conn._dataset_buf is not None:
        assert len(conn._dataset_buf) <= cfg.max_dataset_in_memory, len(conn._dataset_buf)
    budget = cfg.memory_budget
    if budget is not None:
        assert budget.used <= budget.limit, (budget.used, budget.limit)
        # one connection holds it all: exactly what its data set buffer holds
        assert budget.used == len(conn._dataset_buf or b""), budget.used
    assert not conn._events, "events left after NEED_DATA"


def check_output(chunks: Iterable[bytes | memoryview], sent: list[p.PDU]) -> None:
    """Everything the engine sends must be well-formed PDUs our decoder reads back."""
    wire = b"".join(bytes(c) for c in chunks)
    offset = 0
    while offset < len(wire):
        assert len(wire) - offset >= 6, f"engine sent a truncated PDU header: {wire[offset:]!r}"
        pdu_type, length = _HEADER.unpack_from(wire, offset)
        body = wire[offset + 6 : offset + 6 + length]
        assert len(body) == length, f"engine sent a truncated PDU of type {pdu_type:#x}"
        pdu = p.decode(pdu_type, body)  # raises PDUError if we sent garbage
        if isinstance(pdu, p.Abort):
            assert pdu.source in (0, 2), f"A-ABORT with source {pdu.source}"
            if pdu.source == 0:
                assert pdu.reason == 0, f"service-user A-ABORT with reason {pdu.reason}"
            else:
                assert pdu.reason in _PROVIDER_REASONS, f"A-ABORT reason {pdu.reason}"
        sent.append(pdu)
        offset += 6 + length


def check_aborted(ev: Aborted) -> None:
    if not ev.by_peer and ev.source is not None:
        assert ev.source in (0, 2), ev
        if ev.source == 2:
            assert ev.reason in _PROVIDER_REASONS, ev


# ------------------------------------------------------------------- engine drivers


@dataclass(slots=True)
class Session:
    """What one fuzzed session produced (for targeted assertions in tests)."""

    conn: Connection
    events: list[Indication] = field(default_factory=list)
    sent: list[p.PDU] = field(default_factory=list)


def _chunks(data: bytes, splits: Sequence[int]) -> Iterable[bytes]:
    """``data`` cut into reads whose sizes cycle through ``splits`` (0: the rest)."""
    i = 0
    k = 0
    while i < len(data):
        step = splits[k % len(splits)] if splits else 0
        k += 1
        step = step if step > 0 else len(data) - i
        yield data[i : i + step]
        i += step


def run_acceptor(
    data: bytes,
    splits: Sequence[int] = (0,),
    *,
    config_choice: int = 0,
    use_sink: bool = False,
    in_place: bool = False,
    policy: acse.AcceptorPolicy | None = None,
    tick: float = 0.0,
) -> Session:
    """Feed ``data`` to an acceptor in reads of ``splits`` bytes; a driver accepts (or
    rejects) associations with :func:`acse.negotiate`, sinks data sets if asked, and
    answers releases. ``tick`` seconds pass between reads (ARTIM)."""
    max_read = max([*splits, 1]) if all(s > 0 for s in splits) else len(data)
    cfg = small_config(config_choice)
    conn = Connection(Role.ACCEPTOR, cfg)
    session = Session(conn)
    limits = Limits(cfg, max(max_read, 1))
    policy = policy or acse.AcceptorPolicy(max_pdu_length=cfg.max_pdu_length)
    sunk = [0]

    def sink(view: memoryview) -> None:
        sunk[0] += len(view)

    now = 0.0
    conn.connection_made(now)
    check_output(conn.data_to_send(), session.sent)
    for chunk in _chunks(data, splits):
        if in_place:
            view = conn.get_buffer(len(chunk))
            assert len(view) >= len(chunk)
            view[: len(chunk)] = chunk
            view.release()
            conn.buffer_updated(len(chunk), 0.0)
        else:
            conn.receive_data(chunk, 0.0)
        _drive_acceptor(conn, session, policy, sink if use_sink else None)
        check_output(conn.data_to_send(), session.sent)
        check_bounds(conn, limits)
        if tick:
            now += tick
            conn.handle_timer(now)
            _drive_acceptor(conn, session, policy, sink if use_sink else None)
            check_output(conn.data_to_send(), session.sent)
    conn.handle_timer(now + 10_000.0)
    _drive_acceptor(conn, session, policy, None)
    check_output(conn.data_to_send(), session.sent)
    conn.connection_lost(now + 10_001.0)
    _drive_acceptor(conn, session, policy, None)
    check_output(conn.data_to_send(), session.sent)
    assert conn.state is State.STA1, conn.state
    if cfg.memory_budget is not None:
        assert cfg.memory_budget.used == 0, "data-set memory not given back at the end"
    return session


def _drive_acceptor(
    conn: Connection,
    session: Session,
    policy: acse.AcceptorPolicy,
    sink: object,
) -> None:
    for _ in range(100_000):
        ev = conn.next_event()
        if ev is NEED_DATA:
            return
        assert not isinstance(ev, type(NEED_DATA))
        session.events.append(ev)
        if isinstance(ev, AssociateIndication):
            answer = acse.negotiate(ev.request, policy)
            if isinstance(answer, p.AssociateAC):
                conn.accept(answer, 0.0)
            else:
                conn.reject(answer, 0.0)
        elif isinstance(ev, ReleaseRequested):
            conn.release_response(0.0)
        elif isinstance(ev, CommandReceived):
            if ev.command.has_dataset and sink is not None:
                conn.set_dataset_sink(sink)  # type: ignore[arg-type]
        elif isinstance(ev, Aborted):
            check_aborted(ev)
        elif isinstance(ev, DataSetReceived) and ev.data is not None:
            assert len(ev.data) <= conn.config.max_dataset_in_memory
    raise AssertionError("the engine produced 100000 indications from one read")


def run_requestor(
    data: bytes,
    splits: Sequence[int] = (0,),
    *,
    config_choice: int = 0,
    send_echo: bool = True,
    tick: float = 0.0,
) -> Session:
    """A requestor that proposes :func:`associate_rq` and is fed ``data`` as the
    acceptor's answer. On acceptance it sends a C-ECHO on an accepted context (if
    asked) and releases; it answers a release collision."""
    max_read = max([*splits, 1]) if all(s > 0 for s in splits) else len(data)
    cfg = small_config(config_choice)
    conn = Connection(Role.REQUESTOR, cfg)
    session = Session(conn)
    limits = Limits(cfg, max(max_read, 1))
    now = 0.0
    conn.request_association(associate_rq(max_pdu_length=cfg.max_pdu_length), now=now)
    conn.connection_made(now)
    check_output(conn.data_to_send(), session.sent)
    for chunk in _chunks(data, splits):
        conn.receive_data(chunk, 0.0)
        _drive_requestor(conn, session, send_echo)
        check_output(conn.data_to_send(), session.sent)
        check_bounds(conn, limits)
        if tick:
            now += tick
            conn.handle_timer(now)
            _drive_requestor(conn, session, send_echo)
            check_output(conn.data_to_send(), session.sent)
    conn.handle_timer(now + 10_000.0)
    _drive_requestor(conn, session, send_echo)
    conn.connection_lost(now + 10_001.0)
    _drive_requestor(conn, session, send_echo)
    check_output(conn.data_to_send(), session.sent)
    assert conn.state is State.STA1, conn.state
    return session


def _drive_requestor(conn: Connection, session: Session, send_echo: bool) -> None:
    for _ in range(100_000):
        ev = conn.next_event()
        if ev is NEED_DATA:
            return
        session.events.append(ev)
        if isinstance(ev, AssociateAccepted):
            if send_echo and conn.contexts:
                context_id = min(conn.contexts)
                conn.send_message(context_id, dimse.c_echo_rq(1))
                # a data set bigger than the peer's maximum: fragmentation to its size
                conn.send_dataset(context_id, b"\0\0" * 40)
            conn.release(0.0)
        elif isinstance(ev, ReleaseRequested):
            conn.release_response(0.0)
        elif isinstance(ev, Aborted):
            check_aborted(ev)
        elif isinstance(ev, AssociateRejected | Released):
            pass
    raise AssertionError("the engine produced 100000 indications from one read")


# ------------------------------------------------------------------- codec targets


def run_pdu_decode(pdu_type: int, body: bytes) -> p.PDU | None:
    """pdu.decode raises PDUError only, never keeps ``body``, and what it returns
    for an association-control PDU re-encodes to a body it decodes the same way."""
    for form in (body, bytearray(body), memoryview(body)):
        try:
            pdu = p.decode(pdu_type, form)
        except p.PDUError as exc:
            assert isinstance(exc.reason, int) and exc.reason in _PROVIDER_REASONS
            pdu = None
        if isinstance(form, bytearray):
            form.extend(b"x")  # decode must not have kept a view of it (BufferError)
    return pdu


def run_pdu_roundtrip(pdu: p.PDU) -> None:
    """A decoded PDU, when it can be encoded again, decodes to itself."""
    try:
        wire = p.encode(pdu)
    except ValueError:
        return  # decode is lenient where encode is strict (e.g. 17-char version names)
    pdu_type, length = _HEADER.unpack_from(wire)
    assert length == len(wire) - 6
    again = p.decode(pdu_type, wire[6:])
    assert again == pdu, (pdu, again)


def run_dimse_decode(raw: bytes) -> dimse.Command | None:
    """decode_command raises DIMSEError only; a decoded command validates without
    raising; and the response the worker would build for it can be encoded."""
    try:
        cmd = dimse.decode_command(raw)
    except dimse.DIMSEError:
        return None
    problem = dimse.validate_command(cmd)
    assert problem is None or isinstance(problem, str)
    try:
        again = dimse.encode_command(cmd)
    except dimse.DIMSEError:
        return cmd
    strings = [v for v in dataclasses.astuple(cmd) if isinstance(v, str)]
    if not all(v.isascii() for v in strings):
        return cmd  # a stray byte is encoded as "?" on purpose (lossy, but answerable)
    # The encoder normalises "a data set follows" to 0x0000 (any value but 0x0101).
    expected = dataclasses.replace(
        cmd, CommandDataSetType=dimse.DATASET_PRESENT if cmd.has_dataset else dimse.NO_DATASET
    )
    assert dimse.decode_command(again) == expected
    return cmd


def run_dimse_response(cmd: dimse.Command) -> bytes:
    """The worker answers every request with ``response_for(rq, status)`` (a failure
    status when the request is bad); that response must always be encodable, or the
    peer never gets an answer."""
    rsp = dimse.response_for(cmd, 0xC000)
    return dimse.encode_command(rsp)


# ------------------------------------------------------------------- scanner target


def run_scanner(
    transfer_syntax: str, data: bytes, splits: Sequence[int] = (0,), *, budget: int = 4096
) -> None:
    """TagScanner.feed never raises, stops within its budget, and keeps no more than
    one header, one wanted value and ``budget``-bounded state."""
    scanner = TagScanner(transfer_syntax, budget=budget)
    for chunk in _chunks(data, splits):
        done = scanner.feed(chunk)
        _check_scanner(scanner, budget)
        if done:
            assert scanner.done
            break
    result = scanner.close()
    assert result.stop_reason in ("complete", "budget", "malformed", "end"), result
    assert result.bytes_scanned <= budget, (result.bytes_scanned, budget)
    for value in (
        result.study_instance_uid,
        result.series_instance_uid,
        result.sop_instance_uid,
        result.patient_id,
        result.modality,
        result.patient_name,
        result.study_date,
        result.study_time,
        result.accession_number,
    ):
        assert value is None or (value and len(value) <= MAX_VALUE_LENGTH)
    # done: buffers dropped
    assert scanner._header == b"" and len(scanner._value) == 0 and len(scanner._stack) == 1
    assert scanner.feed(b"\0" * 16) is True


def _check_scanner(scanner: TagScanner, budget: int) -> None:
    assert scanner._pos <= budget, (scanner._pos, budget)
    assert len(scanner._header) < 12, scanner._header
    assert len(scanner._value) <= MAX_VALUE_LENGTH, len(scanner._value)
    # one stack entry per at least 8 walked bytes
    assert len(scanner._stack) <= 1 + scanner._pos // 8 + 1, len(scanner._stack)
