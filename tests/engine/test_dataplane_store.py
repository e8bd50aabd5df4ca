"""The data plane's per-instance C-STORE functions: both twins against today's Python.

``decode_store_rq``, ``encode_store_rsp``, ``uid_valid`` and ``file_meta`` of each core
are fed the same random and mutated input (valid encodings with bytes flipped,
truncated, inserted, extended) and must give exactly what the engine's and the store's
own functions give (``dimse.decode_command`` + ``validate_command``, the bytes the engine
queues for ``encode_c_store_rsp``, ``uids.is_valid_uid_reference``,
``filemeta.encode_file_meta_reference``: the plain Python statements of the rules),
or ``None`` (SLOW) exactly where the contract says so; the two cores must agree with
each other on every input, ``None`` included.
"""

from __future__ import annotations

import struct
from types import ModuleType, SimpleNamespace

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tests.engine.test_dataplane import _conn, _drive
from tests.fuzz import harness as h
from tests.fuzz import strategies as fz
from workers import dataplane
from workers.dataplane import _pure
from workers.engine import acse, dimse
from workers.engine import pdu as p
from workers.engine.config import EngineConfig
from workers.engine.connection import UNLIMITED_SEND_CAP, Connection, Role
from workers.engine.primitives import NEED_DATA, AssociateIndication, CommandReceived
from workers.storage import filemeta, uids

COMPILED = dataplane.compiled()


def cores() -> list[ModuleType]:
    return [_pure] + ([COMPILED] if COMPILED is not None else [])


def _twins(name: str, *args: object) -> object:
    """The pure twin's answer, after checking that the compiled one gives the same."""
    answer = getattr(_pure, name)(*args)
    if COMPILED is not None:
        assert getattr(COMPILED, name)(*args) == answer, (name, args)
    return answer


core_ids = pytest.mark.parametrize("core", cores(), ids=lambda m: m.__name__.rsplit(".", 1)[-1])

# ------------------------------------------------------------------ strategies

_UID_CHARS = st.sampled_from("0123456789.")
_uids = st.one_of(
    st.text(_UID_CHARS, min_size=1, max_size=70),
    st.sampled_from(["1.2.840.10008.5.1.4.1.1.2", "1.2.3", "0", "0.0", "1.2.3.4.5.6.7.8.9"]),
    st.text(max_size=70),  # anything, non-ASCII included
    st.text(st.characters(max_codepoint=127), max_size=70),
)
_text_values = st.one_of(
    st.none(),
    st.just(""),
    st.text(st.sampled_from(" ABC\\_x\x00\x7f\u00e9"), max_size=20),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20),
)
_us = st.one_of(st.integers(0, 0xFFFF), st.sampled_from([0, 1, 2, 3, 0xFFFF]))


@st.composite
def store_commands(draw: st.DrawFn) -> bytes:
    """Encoded C-STORE-RQ command sets: mostly valid, with optional elements, now and
    then another command, an unusual element or an out-of-rule value."""
    if draw(st.booleans()):  # a valid request, with every kind of value
        ascii_uids = st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=64)
        fields: dict[str, object] = {
            "MessageID": draw(_us),
            "AffectedSOPClassUID": draw(st.one_of(_uids, ascii_uids)),
            "AffectedSOPInstanceUID": draw(st.one_of(_uids, ascii_uids)),
            "Priority": draw(st.sampled_from([0, 1, 2])),
            "CommandDataSetType": draw(st.sampled_from([0, 1, 0xFFFE])),
        }
    else:
        fields = {
            "MessageID": draw(_us),
            "AffectedSOPClassUID": draw(_uids),
            "AffectedSOPInstanceUID": draw(_uids),
            "Priority": draw(st.sampled_from([0, 1, 2, 0, 3, 0xFFFF])),
            "CommandDataSetType": draw(st.sampled_from([0, 0, 1, 0xFFFE, 0x0101])),
        }
    if draw(st.booleans()):
        fields["MoveOriginatorApplicationEntityTitle"] = draw(
            st.text(st.sampled_from(" AB\x00\u00e9"), max_size=20)
        )
    if draw(st.booleans()):
        fields["MoveOriginatorMessageID"] = draw(_us)
    dropped = st.sampled_from(["MessageID", "Priority", "AffectedSOPClassUID"])
    for name in draw(st.lists(dropped, max_size=1)):
        fields[name] = None
    if draw(st.integers(0, 7)) == 0:
        extra = draw(st.sampled_from(["ErrorComment", "Status", "MoveDestination"]))
        fields[extra] = "X" if extra != "Status" else 0
    field = draw(st.sampled_from([1] * 12 + [0x0030, 0x8001, 0x0020]))
    cmd = dimse.Command(field, **fields)  # type: ignore[arg-type]
    if draw(st.integers(0, 7)) == 0:
        cmd.extra = {draw(st.sampled_from([0x0004, 0x1234, 0xFFFF])): b"ab"}
    try:
        raw = dimse.encode_command(cmd)
    except dimse.DIMSEError:
        raw = dimse.encode_command(h.store_rq(1))
    if draw(st.integers(0, 5)) == 0:  # no group length: old senders omit it
        raw = raw[12:]
    return raw


def _commands() -> st.SearchStrategy[bytes]:
    seeds = [
        dimse.encode_command(h.store_rq(7)),
        dimse.encode_command(
            h.store_rq(9, MoveOriginatorApplicationEntityTitle="MOVER", MoveOriginatorMessageID=4)
        ),
        dimse.encode_command(dimse.c_echo_rq(1)),
    ]
    return st.one_of(
        store_commands(),
        fz.mutated(seeds),
        st.builds(lambda a, b: a + b, store_commands(), st.binary(max_size=24)),  # extended
        st.builds(lambda a, n: a[:n], store_commands(), st.integers(0, 200)),  # truncated
        st.binary(max_size=120),
    )


# ------------------------------------------------------------- command decode

_FAST_ELEMENTS = {0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000, 0x1030, 0x1031}


def _elements(raw: bytes) -> set[int]:
    """The element numbers of a command set decode_command accepted."""
    out, offset = set(), 0
    while offset < len(raw):
        _, elem, length = struct.unpack_from("<HHI", raw, offset)
        out.add(elem)
        offset += 8 + length
    return out


def _expected_decode(raw: bytes) -> dimse.Command | None:
    """The command the data plane must give for ``raw``, or None where it must be SLOW:
    anything but a valid C-STORE-RQ of the usual elements in ASCII."""
    try:
        cmd = dimse.decode_command(raw)
    except dimse.DIMSEError:
        return None
    if (
        cmd.CommandField != dimse.CommandField.C_STORE_RQ
        or cmd.extra
        or dimse.validate_command(cmd) is not None
        or not _elements(raw) <= _FAST_ELEMENTS
        or any(
            "\ufffd" in (value or "")
            for value in (
                cmd.AffectedSOPClassUID,
                cmd.AffectedSOPInstanceUID,
                cmd.MoveOriginatorApplicationEntityTitle,
            )
        )
    ):
        return None
    return cmd


def _as_command(fields: _pure.StoreRQ) -> dimse.Command:
    mid, priority, cdst, cls, inst, move_ae, move_mid = fields
    return dimse.Command(
        dimse.CommandField.C_STORE_RQ,
        MessageID=mid,
        Priority=priority,
        CommandDataSetType=cdst,
        AffectedSOPClassUID=cls,
        AffectedSOPInstanceUID=inst,
        MoveOriginatorApplicationEntityTitle=move_ae,
        MoveOriginatorMessageID=move_mid,
    )


@fz.fuzz_settings(1000)
@given(_commands())
def test_decode_store_rq_matches_the_engine(raw: bytes) -> None:
    expected = _expected_decode(raw)
    event("decoded" if expected is not None else "SLOW")
    for data in (raw, bytearray(raw)):
        got = _twins("decode_store_rq", data)
        if expected is None:
            assert got is None
        else:
            assert got is not None and _as_command(got) == expected  # type: ignore[arg-type]


@core_ids
def test_decode_store_rq_takes_the_usual_requests(core: ModuleType) -> None:
    """What DCMTK, pynetdicom and the engine itself send is decoded, not SLOW."""
    plain = dimse.encode_command(h.store_rq(3))
    assert core.decode_store_rq(plain) == (
        3, 0, 0, h.CT_IMAGE_STORAGE, "1.2.3.4.3", None, None
    )  # fmt: skip
    moved = dimse.encode_command(
        h.store_rq(
            65535,
            Priority=2,
            MoveOriginatorApplicationEntityTitle=" MOVE_SCU ",
            MoveOriginatorMessageID=12,
        )
    )
    # any CommandDataSetType but 0101H says a data set follows (encode_command sends 0)
    cdst = struct.pack("<HHIH", 0, 0x0800, 2, 0)
    moved = moved.replace(cdst, cdst[:-2] + b"\xfe\xff")
    assert core.decode_store_rq(bytearray(moved)) == (
        65535, 2, 0xFFFE, h.CT_IMAGE_STORAGE, "1.2.3.4.65535", "MOVE_SCU", 12
    )  # fmt: skip
    assert core.decode_store_rq(memoryview(plain[12:])) is not None  # no group length
    # and what the Python code would answer differently is SLOW
    assert core.decode_store_rq(plain[:-1]) is None
    assert core.decode_store_rq(dimse.encode_command(dimse.c_echo_rq(1))) is None
    assert core.decode_store_rq(dimse.encode_command(h.store_rq(1, Priority=3))) is None
    assert core.decode_store_rq(dimse.encode_command(h.store_rq(1, Status=0))) is None
    assert core.decode_store_rq(plain.replace(b"1.2.3.4.3", b"1.2.3.4\xe9")) is None


# ------------------------------------------------------------- response encode


def _established(peer_max: int, trace: bool = False) -> Connection:
    conn = Connection(Role.ACCEPTOR, EngineConfig(trace_pdus=trace))
    conn.connection_made(0.0)
    conn.receive_data(p.encode(h.associate_rq()), 0.0)
    ev = conn.next_event()
    while not isinstance(ev, AssociateIndication):  # PDUReceived when tracing
        ev = conn.next_event()
    answer = acse.negotiate(ev.request, acse.AcceptorPolicy())
    assert isinstance(answer, p.AssociateAC)
    conn.accept(answer, 0.0)
    conn.data_to_send()
    while conn.next_event() is not NEED_DATA:
        pass
    conn.peer_max_pdu_length = peer_max
    return conn


def _engine_sends(conn: Connection, context_id: int, raw: bytes) -> bytes:
    conn.send_command(context_id, raw)
    return b"".join(bytes(chunk) for chunk in conn.data_to_send())


def _max_fragment(peer_max: int) -> int:
    # as the engine computes it from the peer's Maximum Length (send_command)
    return max(((peer_max or UNLIMITED_SEND_CAP) - 6) & ~1, 2)


@fz.fuzz_settings(600)
@given(
    st.sampled_from([1, 3, 1, 3, 1, 3, 255, 0, 256, -1]),
    st.one_of(_us, st.sampled_from([-1, 0x10000, 1 << 70])),
    st.one_of(st.just(h.CT_IMAGE_STORAGE), _uids),
    st.one_of(st.text(_UID_CHARS, max_size=64), _uids),
    st.one_of(_us, st.sampled_from([-1, 0x10000])),
    st.sampled_from([0, 0, 16384, 1000, 200, 150, 130, 100, 20, 7]),
)
def test_encode_store_rsp_matches_the_engine(
    context_id: int, message_id: int, cls: str, inst: str, status: int, peer_max: int
) -> None:
    limit = _max_fragment(peer_max)
    got = _twins("encode_store_rsp", context_id, message_id, cls, inst, status, limit)
    try:
        raw: bytes | None = dimse.encode_c_store_rsp(message_id, cls, inst, status)
    except dimse.DIMSEError:
        raw = None
    if (
        raw is None
        or not 0 < context_id < 256
        or not (cls.isascii() and inst.isascii())
        or len(cls) > 64
        or len(inst) > 64
        or len(raw) > limit
    ):
        assert got is None
        event("SLOW")
        return
    event("encoded")
    n = len(raw)
    assert got == struct.pack(">BxLLBB", 4, n + 6, n + 2, context_id, 3) + raw
    if context_id in (1, 3):  # accepted contexts: what the engine itself queues
        assert got == _engine_sends(_established(peer_max), context_id, raw)


@core_ids
def test_encode_store_rsp_is_the_response_of_the_request(core: ModuleType) -> None:
    """The PDU carries encode_command(response_for(rq, status)), one PDV, control 03H."""
    rq = h.store_rq(41, AffectedSOPInstanceUID="1.2.3.45")
    for status in (0x0000, 0xA700, 0xB000, 0xC000):
        pdu = core.encode_store_rsp(3, 41, rq.AffectedSOPClassUID, "1.2.3.45", status, 16372)
        (pdv,) = p.decode(pdu[0], pdu[6:]).pdvs  # type: ignore[attr-defined]
        assert (pdv.context_id, pdv.control) == (3, 3)
        assert pdv.data == dimse.encode_command(dimse.response_for(rq, status))
    # too large for the peer's PDUs, or not encodable: the general path answers
    assert core.encode_store_rsp(3, 41, rq.AffectedSOPClassUID, "1.2.3", 0, 60) is None
    assert core.encode_store_rsp(3, 65536, rq.AffectedSOPClassUID, "1.2.3", 0, 16372) is None
    assert core.encode_store_rsp(3, 1, rq.AffectedSOPClassUID, "1.2.\u00e9", 0, 16372) is None


# ------------------------------------------------------------- UIDs


@st.composite
def mutated_uids(draw: st.DrawFn) -> str:
    uid = list(draw(st.sampled_from(["1.2.840.10008.1.2.1", "1.2.3.0.10", "0.1", "1" * 64])))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(uid)))
        op = draw(st.integers(0, 2))
        if op == 0:
            uid[at:at] = [draw(st.sampled_from(list("0.9a \n\x00\u0660")))]
        elif op == 1:
            del uid[at : at + 1]
        else:
            del uid[at:]
    return "".join(uid)


@fz.fuzz_settings(2000)
@given(st.one_of(_uids, mutated_uids()))
def test_uid_valid_matches_is_valid_uid(uid: str) -> None:
    valid = uids.is_valid_uid_reference(uid)
    event(f"valid: {valid}")
    assert _twins("uid_valid", uid) is valid


@core_ids
def test_uid_valid_known_answers(core: ModuleType) -> None:
    for uid in ("0", "0.0", "1.2.840.10008.1.2", "9" * 64, "1.20.300"):
        assert core.uid_valid(uid) is True, uid
    for uid in ("", "1.", ".1", "1..2", "01", "1.02", "9" * 65, "1.2\n", "1.a", "\u0661"):
        assert core.uid_valid(uid) is False, uid

    class Text(str):
        pass

    assert core.uid_valid(Text("1.2")) is True  # a str subclass is a str
    with pytest.raises(TypeError):
        core.uid_valid(b"1.2")


# ------------------------------------------------------------- file meta


def _expected_meta(*args: str | None) -> bytes | None:
    cls, inst, ts, ae, impl, version = args
    try:
        return filemeta.encode_file_meta_reference(
            cls,  # type: ignore[arg-type]
            inst,  # type: ignore[arg-type]
            ts,  # type: ignore[arg-type]
            source_ae=ae,
            implementation_class_uid=impl,  # type: ignore[arg-type]
            implementation_version_name=version,
        )
    except (ValueError, struct.error):
        return None


@fz.fuzz_settings(1000)
@given(
    st.one_of(st.just("1.2.840.10008.5.1.4.1.1.2"), _uids),
    st.one_of(st.just("1.2.3.4.5"), _uids, st.text(max_size=80)),
    st.one_of(st.just("1.2.840.10008.1.2.1"), mutated_uids()),
    _text_values,
    st.one_of(st.just(filemeta.IMPLEMENTATION_CLASS_UID), _uids),
    st.one_of(st.just(filemeta.IMPLEMENTATION_VERSION_NAME), _text_values),
)
def test_file_meta_matches_encode_file_meta(
    cls: str, inst: str, ts: str, ae: str | None, impl: str, version: str | None
) -> None:
    args = (cls, inst, ts, ae, impl, version)
    expected = _expected_meta(*args)
    event("encoded" if expected is not None else "SLOW")
    assert _twins("file_meta", *args) == expected


@core_ids
def test_file_meta_is_a_part10_header(core: ModuleType) -> None:
    """The header pydicom reads back, and None where the store's encoder raises."""
    from io import BytesIO

    from pydicom import dcmread

    args = ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.45", "1.2.840.10008.1.2.1", " STORESCU ")
    meta = core.file_meta(*args, filemeta.IMPLEMENTATION_CLASS_UID, "PACSRX_010")
    assert meta == filemeta.encode_file_meta_reference(*args[:3], source_ae=args[3])
    ds = dcmread(BytesIO(meta + b"\x08\x00\x16\x00UI\x02\x001\x00"), force=False)
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.45"
    assert ds.file_meta.SourceApplicationEntityTitle == "STORESCU"
    for bad in (("1.02", *args[1:]), (*args[:3], "A\\B"), (args[0], "1.\u00e9", *args[2:])):
        assert core.file_meta(*bad, filemeta.IMPLEMENTATION_CLASS_UID, None) is None


def test_the_store_functions_are_exported() -> None:
    for name in ("decode_store_rq", "encode_store_rsp", "uid_valid", "file_meta"):
        assert getattr(dataplane, name) is getattr(dataplane.core, name)


# ------------------------------------------------------------- in the engine

#: a core whose C-STORE-RQ decode always says SLOW: the engine as it was before
_NO_FAST_DECODE = SimpleNamespace(
    Framing=_pure.Framing,
    walk_pdata=_pure.walk_pdata,
    decode_store_rq=lambda data: None,
    encode_store_rsp=lambda *args: None,
)


def _store_session(cmd: bytes, fragment: int = 0) -> bytes:
    return (
        p.encode(h.associate_rq())
        + h.command_pdata(3, cmd, max_fragment=fragment)
        + h.dataset_pdata(3, h.minimal_dataset("5"))
        + p.encode(p.ReleaseRQ())
    )


_STORE_SESSIONS = [
    _store_session(dimse.encode_command(h.store_rq(5))),
    _store_session(dimse.encode_command(h.store_rq(6, Priority=2)), fragment=9),
    _store_session(dimse.encode_command(h.store_rq(7, Status=0))),  # an unusual element
    _store_session(
        dimse.encode_command(
            h.store_rq(8, MoveOriginatorApplicationEntityTitle="M", MoveOriginatorMessageID=1)
        )
    ),
]


@fz.fuzz_settings(300)
@given(
    st.one_of(st.sampled_from(_STORE_SESSIONS), fz.mutated(_STORE_SESSIONS)),
    fz.splits,
    st.integers(0, 3),
)
def test_engine_decodes_as_before(data: bytes, splits: list[int], config: int) -> None:
    """The same session on an engine with each core and on one whose data plane
    never decodes a command: identical indications, bytes sent, states, files."""
    before = _drive(_NO_FAST_DECODE, data, splits, config, 0)  # type: ignore[arg-type]
    for core in cores():
        assert _drive(core, data, splits, config, 0) == before


@core_ids
def test_engine_takes_the_usual_store_request_from_the_data_plane(core: ModuleType) -> None:
    for session, fast in zip(_STORE_SESSIONS, (True, True, False, True), strict=True):
        conn = _conn(core)
        conn.connection_made(0.0)
        conn.receive_data(session, 0.0)
        ev = conn.next_event()
        assert isinstance(ev, AssociateIndication)
        answer = acse.negotiate(ev.request, acse.AcceptorPolicy())
        conn.accept(answer, 0.0)  # type: ignore[arg-type]
        ev = conn.next_event()
        assert isinstance(ev, CommandReceived)
        assert ev.command == dimse.decode_command(ev.raw)
        assert (conn.checked_command is ev.command) is fast
        assert dimse.validate_command(ev.command) is None


@core_ids
@pytest.mark.parametrize("peer_max", [0, 16384, 100, 30])
@pytest.mark.parametrize("trace", [False, True])
def test_engine_sends_the_store_response_as_before(
    core: ModuleType, peer_max: int, trace: bool
) -> None:
    """send_store_response puts on the wire what send_command(encode_c_store_rsp)
    does: one PDU from the data plane, or the general path (several PDUs for a small
    peer maximum, PDU tracing), and counts the PDUs and bytes alike."""
    rq = h.store_rq(12)
    args = (12, rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID, 0xB000)
    sent = []
    for fast in (True, False):
        conn = _established(peer_max, trace)
        if fast:
            conn._dp_store_rsp = core.encode_store_rsp
            conn.send_store_response(3, *args)  # type: ignore[arg-type]
        else:
            conn.send_command(3, dimse.encode_c_store_rsp(*args))  # type: ignore[arg-type]
        wire = b"".join(bytes(c) for c in conn.data_to_send())
        events = []
        while (ev := conn.next_event()) is not NEED_DATA:
            events.append(repr(ev))
        sent.append((wire, conn.pdus_sent, conn.bytes_sent, conn.state, events))
    assert sent[0] == sent[1]
    n = len(dimse.encode_c_store_rsp(*args))  # type: ignore[arg-type]
    assert sent[0][1][4] == -(-n // _max_fragment(peer_max))  # PDUs sent
