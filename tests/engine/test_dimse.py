"""DIMSE command-set codec, statuses, constructors and P-DATA fragmentation.

pynetdicom and pydicom are the independent peers here: every C-* and N-* message goes
through them both ways, as bytes (pydicom's Implicit VR LE codec) and as P-DATA-TF
PDUs (pynetdicom's PDU decoder and message reassembly).
"""

from __future__ import annotations

import contextlib
import io
import re
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pynetdicom import dimse_messages, dimse_primitives
from pynetdicom.dsutils import encode as pydicom_encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.status import code_to_category

from tests.engine.fragments import (
    CONTROL_COMMAND,
    CONTROL_LAST,
    MAX_PDU_CAP,
    fragment_message,
    iter_fragments,
    max_fragment_length,
    pdata_header,
)
from workers.engine.dimse import (
    DATASET_PRESENT,
    NO_DATASET,
    VERIFICATION_SOP_CLASS,
    Command,
    CommandField,
    DIMSEError,
    Priority,
    Status,
    c_cancel_rq,
    c_echo_rq,
    c_echo_rsp,
    c_find_rq,
    c_get_rq,
    c_move_rq,
    c_store_rq,
    c_store_rsp,
    decode_command,
    encode_command,
    n_action_rq,
    n_create_rq,
    n_delete_rq,
    n_event_report_rq,
    n_get_rq,
    n_set_rq,
    response_for,
    status_category,
    validate_command,
)

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
INSTANCE = "1.2.826.0.1.3680043.8.498.1234567"  # odd length: padded with NUL
PRINTER = "1.2.840.10008.5.1.1.16"

# One plausible value per element; UIDs and AE titles of odd length test the padding.
SAMPLE: dict[str, Any] = {
    "AffectedSOPClassUID": CT_IMAGE,
    "RequestedSOPClassUID": PRINTER,
    "AffectedSOPInstanceUID": INSTANCE,
    "RequestedSOPInstanceUID": "1.2.3.4.5.6",
    "MessageID": 7,
    "MessageIDBeingRespondedTo": 7,
    "MoveDestination": "STORE_SCP",
    "Priority": Priority.HIGH,
    "Status": 0xC000,
    "OffendingElement": (0x00100010, 0x00100020),
    "ErrorComment": "Something odd",
    "ErrorID": 5,
    "EventTypeID": 2,
    "AttributeIdentifierList": (0x00100010, 0x7FE00010),
    "ActionTypeID": 3,
    "NumberOfRemainingSuboperations": 1,
    "NumberOfCompletedSuboperations": 2,
    "NumberOfFailedSuboperations": 3,
    "NumberOfWarningSuboperations": 4,
    "MoveOriginatorApplicationEntityTitle": "MOVER",
    "MoveOriginatorMessageID": 9,
}

# Which elements each message carries, from pynetdicom itself (PS3.7 9.3, 10.3), and
# which primitive attribute holds its data set.
MESSAGE_KEYWORDS: dict[str, tuple[str, ...]] = {
    name.replace("-", "_"): tuple(
        kw
        for kw in keywords
        if kw not in ("CommandGroupLength", "CommandField", "CommandDataSetType")
    )
    for name, keywords in dimse_messages._COMMAND_SET_KEYWORDS.items()
}
DATASET_KEYWORD: dict[str, str] = dict(dimse_messages._DATASET_KEYWORDS)
DATASET = b"\x08\x00\x18\x00\x06\x00\x00\x001.2.3\x00" + bytes(range(256)) * 3
ALL_MESSAGES = sorted(MESSAGE_KEYWORDS)


def test_every_command_field_is_covered() -> None:
    assert {cf.name for cf in CommandField} == set(ALL_MESSAGES)


def _tags(value: Any) -> tuple[int, ...]:
    """pydicom gives one AT value as a tag and several as a MultiValue of tags."""
    if isinstance(value, list | tuple | MultiValue):
        return tuple(int(tag) for tag in value)
    return (int(value),)


def _primitive(message: str, with_dataset: bool) -> Any:
    primitive = getattr(dimse_primitives, message.rsplit("_", 1)[0])()
    for keyword in MESSAGE_KEYWORDS[message]:
        value = SAMPLE[keyword]
        if isinstance(value, tuple):
            value = list(value)
        setattr(primitive, keyword, value)
    if with_dataset:
        setattr(primitive, DATASET_KEYWORD[message], io.BytesIO(DATASET))
    return primitive


def _pynetdicom_message(message: str, with_dataset: bool) -> Any:
    msg = getattr(dimse_messages, message)()
    msg.primitive_to_message(_primitive(message, with_dataset))
    return msg


def _expected(message: str, with_dataset: bool) -> Command:
    fields = {kw: SAMPLE[kw] for kw in MESSAGE_KEYWORDS[message]}
    return Command(
        CommandField=CommandField[message],
        CommandDataSetType=DATASET_PRESENT if with_dataset else NO_DATASET,
        **fields,
    )


def _variants() -> list[tuple[str, bool]]:
    return [(m, False) for m in ALL_MESSAGES] + [(m, True) for m in sorted(DATASET_KEYWORD)]


# --------------------------------------------------------------------------------------
# pynetdicom -> ours
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("message", "with_dataset"), _variants())
def test_decode_what_pynetdicom_encodes(message: str, with_dataset: bool) -> None:
    msg = _pynetdicom_message(message, with_dataset)
    raw = pydicom_encode(msg.command_set, True, True)
    cmd = decode_command(raw)
    expected = _expected(message, with_dataset)
    # pynetdicom sends 0x0001 for "data set present": any value but 0x0101 means it
    assert cmd.CommandDataSetType == (0x0001 if with_dataset else NO_DATASET)
    assert cmd.has_dataset is with_dataset
    cmd.CommandDataSetType = expected.CommandDataSetType
    assert cmd == expected
    assert isinstance(cmd.CommandField, CommandField)
    # and byte for byte what pydicom writes, but for the data set type we send
    ours = encode_command(cmd)
    if with_dataset:
        sent = struct.pack("<HHIH", 0, 0x0800, 2, 0x0001)
        raw = raw.replace(sent, struct.pack("<HHIH", 0, 0x0800, 2, DATASET_PRESENT))
    assert ours == raw


@pytest.mark.parametrize("max_pdu", [0, 16, 31, 16382])
@pytest.mark.parametrize(("message", "with_dataset"), _variants())
def test_decode_pynetdicom_pdata(message: str, with_dataset: bool, max_pdu: int) -> None:
    """pynetdicom's own fragmentation (encode_msg), command fragments reassembled."""
    msg = _pynetdicom_message(message, with_dataset)
    command = b""
    dataset = b""
    controls = []
    for pdata in msg.encode_msg(1, max_pdu):
        ((context_id, pdv),) = pdata.presentation_data_value_list
        assert context_id == 1
        controls.append(pdv[0])
        if pdv[0] & CONTROL_COMMAND:
            command += pdv[1:]
        else:
            dataset += pdv[1:]
    cmd = decode_command(memoryview(command))
    assert cmd.has_dataset is with_dataset
    assert dataset == (DATASET if with_dataset else b"")
    cmd.CommandDataSetType = _expected(message, with_dataset).CommandDataSetType
    assert cmd == _expected(message, with_dataset)
    needs_dataset = message in ("C_STORE_RQ", "C_FIND_RQ", "C_GET_RQ", "C_MOVE_RQ", "N_SET_RQ")
    problem = validate_command(cmd)
    if with_dataset or not needs_dataset:
        assert problem is None
    else:
        assert problem is not None and "needs a data set" in problem


# --------------------------------------------------------------------------------------
# ours -> pydicom / pynetdicom
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("message", "with_dataset"), _variants())
def test_pydicom_reads_what_we_encode(message: str, with_dataset: bool) -> None:
    cmd = _expected(message, with_dataset)
    raw = encode_command(cmd)
    ds = read_dataset(io.BytesIO(raw), is_implicit_VR=True, is_little_endian=True)
    tags = [int(elem.tag) for elem in ds]
    assert tags == sorted(tags) and tags[0] == 0x00000000
    assert ds.CommandGroupLength == len(raw) - 12
    assert ds.CommandField == CommandField[message]
    assert ds.CommandDataSetType == (DATASET_PRESENT if with_dataset else NO_DATASET)
    for keyword in MESSAGE_KEYWORDS[message]:
        value = ds[keyword].value
        if keyword in ("OffendingElement", "AttributeIdentifierList"):
            value = _tags(value)
        assert value == SAMPLE[keyword], keyword
    assert len(ds) == len(MESSAGE_KEYWORDS[message]) + 3


def _pynetdicom_reassemble(pdus: list[bytes]) -> Any:
    """Feed PDUs to pynetdicom's P-DATA-TF decoder and DIMSE message reassembly."""
    msg = dimse_messages.DIMSEMessage()
    done = False
    for n, raw in enumerate(pdus):
        pdu = P_DATA_TF()
        pdu.decode(raw)
        assert pdu.pdu_type == 0x04
        assert pdu.pdu_length == len(raw) - 6
        done = msg.decode_msg(pdu.to_primitive())
        assert done is (n == len(pdus) - 1)
    assert done
    return msg.message_to_primitive()


@pytest.mark.parametrize("max_pdu", [0, 8, 41, 16382])
@pytest.mark.parametrize(("message", "with_dataset"), _variants())
def test_pynetdicom_reads_our_pdata(message: str, with_dataset: bool, max_pdu: int) -> None:
    cmd = _expected(message, with_dataset)
    pdus = fragment_message(3, encode_command(cmd), DATASET if with_dataset else None, max_pdu)
    primitive = _pynetdicom_reassemble(pdus)
    assert type(primitive).__name__ == message.rsplit("_", 1)[0]
    assert primitive._context_id == 3
    for keyword in MESSAGE_KEYWORDS[message]:
        value = getattr(primitive, keyword)
        if keyword in ("OffendingElement", "AttributeIdentifierList"):
            value = _tags(value)
        assert value == SAMPLE[keyword], keyword
    if message in DATASET_KEYWORD:
        dataset = getattr(primitive, DATASET_KEYWORD[message])
        assert dataset.getvalue() == (DATASET if with_dataset else b"")


# --------------------------------------------------------------------------------------
# Hypothesis round trips and fuzzing
# --------------------------------------------------------------------------------------

uids = st.text(alphabet="0123456789.", max_size=64)
ae_titles = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\\"),
    max_size=16,
).filter(lambda s: s == s.strip(" "))
long_strings = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=64
).filter(lambda s: not s.endswith(" "))
us = st.integers(0, 0xFFFF)
at = st.lists(st.integers(0, 0xFFFFFFFF), min_size=1, max_size=6).map(tuple)
KNOWN_UNKNOWN = [0x0001, 0x0010, 0x0200, 0x0850, 0x0860, 0x4000, 0x5010, 0x51B0, 0xFFFE]

STRATEGY_OF_KIND = {
    "AffectedSOPClassUID": uids,
    "RequestedSOPClassUID": uids,
    "AffectedSOPInstanceUID": uids,
    "RequestedSOPInstanceUID": uids,
    "MoveDestination": ae_titles,
    "MoveOriginatorApplicationEntityTitle": ae_titles,
    "ErrorComment": long_strings,
    "OffendingElement": at,
    "AttributeIdentifierList": at,
}


@st.composite
def commands(draw: st.DrawFn, with_extra: bool = True) -> Command:
    fields: dict[str, Any] = {}
    for name in SAMPLE:
        fields[name] = draw(st.none() | STRATEGY_OF_KIND.get(name, us))
    if with_extra:
        fields["extra"] = draw(
            st.dictionaries(st.sampled_from(KNOWN_UNKNOWN), st.binary(max_size=12), max_size=3)
        )
    return Command(
        CommandField=draw(st.sampled_from(CommandField)),
        CommandDataSetType=draw(st.sampled_from([NO_DATASET, DATASET_PRESENT])),
        **fields,
    )


@given(commands())
def test_round_trip(cmd: Command) -> None:
    raw = encode_command(cmd)
    assert decode_command(raw) == cmd
    assert decode_command(memoryview(raw)) == cmd
    assert decode_command(bytearray(raw)) == cmd


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@settings(max_examples=50)
@given(commands(with_extra=False))
def test_pydicom_agrees_on_random_commands(cmd: Command) -> None:
    raw = encode_command(cmd)
    ds = read_dataset(io.BytesIO(raw), is_implicit_VR=True, is_little_endian=True)
    assert ds.CommandGroupLength == len(raw) - 12
    tags = [int(elem.tag) for elem in ds]
    assert tags == sorted(tags)
    assert ds.CommandField == cmd.CommandField
    if cmd.MessageID is not None:
        assert ds.MessageID == cmd.MessageID
    if cmd.AffectedSOPInstanceUID:
        assert ds.AffectedSOPInstanceUID == cmd.AffectedSOPInstanceUID
    if cmd.OffendingElement is not None:
        assert _tags(ds.OffendingElement) == cmd.OffendingElement


@given(commands())
def test_every_prefix_decodes_or_raises_dimse_error(cmd: Command) -> None:
    raw = encode_command(cmd)
    for cut in range(len(raw)):
        with contextlib.suppress(DIMSEError):
            decode_command(raw[:cut])


@given(commands(with_extra=False), st.data())
def test_mutated_input_raises_only_dimse_error(cmd: Command, data: st.DataObject) -> None:
    raw = bytearray(encode_command(cmd))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "flip":
            raw[position] = data.draw(st.integers(0, 255))
        elif action == "insert":
            raw[position:position] = data.draw(st.binary(min_size=1, max_size=4))
        elif len(raw) > 1:
            del raw[position]
    try:
        result = decode_command(bytes(raw))
    except DIMSEError:
        return
    # whatever decodes can be encoded again, unless a string got mangled beyond ASCII
    try:
        encode_command(result)
    except DIMSEError as exc:
        assert "cannot encode" in str(exc)


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_dimse_error(raw: bytes) -> None:
    with contextlib.suppress(DIMSEError):
        decode_command(raw)


# --------------------------------------------------------------------------------------
# Decoder edge cases
# --------------------------------------------------------------------------------------


def _element(elem: int, value: bytes, group: int = 0) -> bytes:
    return struct.pack("<HHI", group, elem, len(value)) + value


def _us(elem: int, value: int) -> bytes:
    return _element(elem, struct.pack("<H", value))


ECHO_BODY = (
    _element(0x0002, b"1.2.840.10008.1.1\x00")
    + _us(0x0100, 0x0030)
    + _us(0x0110, 1)
    + _us(0x0800, 0x0101)
)


def test_group_length_may_be_absent_or_wrong() -> None:
    expected = c_echo_rq(1)
    assert decode_command(ECHO_BODY) == expected
    for length in (0, 1, len(ECHO_BODY), 0xFFFFFFFF):
        raw = _element(0x0000, struct.pack("<I", length)) + ECHO_BODY
        assert decode_command(raw) == expected


def test_elements_out_of_order_are_accepted() -> None:
    parts = [_us(0x0800, 0x0101), _us(0x0110, 1), _element(0x0002, b"1.2\x00"), _us(0x0100, 0x30)]
    assert decode_command(b"".join(parts)) == c_echo_rq(1, "1.2")


def test_padding_is_stripped() -> None:
    raw = (
        _element(0x0002, b"1.2 ")  # space-padded UID, seen in the field
        + _us(0x0100, 0x0021)
        + _us(0x0110, 1)
        + _element(0x0600, b" DEST  ")
        + _us(0x0700, 0)
        + _us(0x0800, 0x0001)
        + _element(0x0902, b"oops \x00")
    )
    cmd = decode_command(raw)
    assert cmd.AffectedSOPClassUID == "1.2"
    assert cmd.MoveDestination == "DEST"
    assert cmd.ErrorComment == "oops"
    assert cmd.has_dataset


def test_empty_values() -> None:
    raw = ECHO_BODY + _element(0x1000, b"") + _element(0x0900, b"") + _element(0x0901, b"")
    cmd = decode_command(raw)
    assert cmd.AffectedSOPInstanceUID == ""
    assert cmd.Status is None
    assert cmd.OffendingElement is None


def test_unknown_group_0000_elements_are_kept_in_order() -> None:
    raw = ECHO_BODY + _element(0x0850, b"\x05\x00") + _element(0x4000, b"hi")
    cmd = decode_command(raw)
    assert cmd.extra == {0x0850: b"\x05\x00", 0x4000: b"hi"}
    assert list(cmd.extra) == [0x0850, 0x4000]
    again = encode_command(cmd)
    assert decode_command(again) == cmd
    # the unknown elements are merged in tag order
    tags = [struct.unpack_from("<HH", again, off) for off in _offsets(again)]
    assert tags == sorted(tags)


def _offsets(raw: bytes) -> list[int]:
    offsets, off = [], 0
    while off < len(raw):
        offsets.append(off)
        off += 8 + struct.unpack_from("<I", raw, off + 4)[0]
    return offsets


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (ECHO_BODY[:-1], "overruns"),
        (ECHO_BODY + b"\x00\x00\x00", "truncated"),
        (ECHO_BODY + _element(0x0902, b"abcd")[:-1], "overruns"),
        (ECHO_BODY + _element(0x0010, b"", group=0x0008), "not a command element"),
        (ECHO_BODY + _element(0x0900, b"\x00\x00\x00\x00"), "US but 4"),
        (ECHO_BODY + _element(0x0900, b"\x00"), "US but 1"),
        (ECHO_BODY + _element(0x0901, b"\x10\x00\x10"), "AT but 3"),
        (_element(0x0000, b"\x00\x00") + ECHO_BODY, "UL but 2"),
        (ECHO_BODY + _us(0x0110, 2), "appears twice"),
        (ECHO_BODY + _element(0x4000, b"") + _element(0x4000, b""), "appears twice"),
        (_element(0x0002, b"1.2\x00") + _us(0x0800, 0x0101), "no (0000,0100)"),
        (ECHO_BODY.replace(b"\x30\x00", b"\x31\x00", 1), "unknown CommandField"),
        (ECHO_BODY[: -len(_us(0x0800, 0))], "no (0000,0800)"),
        (b"", "no (0000,0100)"),
    ],
)
def test_structural_errors(raw: bytes, message: str) -> None:
    with pytest.raises(DIMSEError, match=re.escape(message)):
        decode_command(raw)


def test_decode_is_lenient_on_semantics() -> None:
    """A C-STORE-RQ without instance UID decodes; validate_command names the problem."""
    raw = encode_command(Command(CommandField.C_STORE_RQ, MessageID=1, Priority=0))
    cmd = decode_command(raw)
    assert validate_command(cmd) == "C-STORE-RQ lacks (0000,0002) AffectedSOPClassUID"


@pytest.mark.parametrize(
    "bad",
    [
        {"MessageID": 0x10000},
        {"MessageID": -1},
        {"Status": "0"},
        {"ErrorComment": 5},
        {"OffendingElement": (0x1_0000_0000,)},
        {"OffendingElement": 5},
    ],
)
def test_encode_rejects_unencodable_values(bad: dict[str, Any]) -> None:
    with pytest.raises(DIMSEError, match=f"cannot encode {next(iter(bad))}"):
        encode_command(Command(CommandField.C_ECHO_RQ, **bad))


@pytest.mark.parametrize("tag", [0x0000, 0x0110, 0x10000, -1])
def test_encode_rejects_colliding_extra(tag: int) -> None:
    with pytest.raises(DIMSEError, match="extra tag"):
        encode_command(Command(CommandField.C_ECHO_RQ, extra={tag: b""}))


def test_dataset_type_normalised_on_encode() -> None:
    cmd = Command(CommandField.C_FIND_RQ, CommandDataSetType=0x0102)
    assert cmd.has_dataset
    decoded = decode_command(encode_command(cmd))
    assert decoded.CommandDataSetType == DATASET_PRESENT


# --------------------------------------------------------------------------------------
# validate_command
# --------------------------------------------------------------------------------------

VALID_REQUESTS = [
    c_echo_rq(1),
    c_store_rq(2, CT_IMAGE, INSTANCE, Priority.LOW, "MOVER", 9),
    c_find_rq(3, "1.2.840.10008.5.1.4.1.2.1.1"),
    c_get_rq(4, "1.2.840.10008.5.1.4.1.2.1.3"),
    c_move_rq(5, "1.2.840.10008.5.1.4.1.2.1.2", "DEST"),
    c_cancel_rq(3),
    n_event_report_rq(6, PRINTER, "1.2.3", 1, has_dataset=True),
    n_get_rq(7, PRINTER, "1.2.3", (0x00100010,)),
    n_set_rq(8, PRINTER, "1.2.3"),
    n_action_rq(9, PRINTER, "1.2.3", 1),
    n_create_rq(10, PRINTER),
    n_delete_rq(11, PRINTER, "1.2.3"),
]


@pytest.mark.parametrize("rq", VALID_REQUESTS, ids=lambda c: CommandField(c.CommandField).name)
def test_constructed_requests_and_responses_are_valid(rq: Command) -> None:
    assert validate_command(rq) is None
    assert decode_command(encode_command(rq)) == rq
    if rq.CommandField != CommandField.C_CANCEL_RQ:
        rsp = response_for(rq, Status.SUCCESS)
        assert validate_command(rsp) is None
        assert decode_command(encode_command(rsp)) == rsp


@pytest.mark.parametrize(
    ("cmd", "problem"),
    [
        (Command(CommandField.C_ECHO_RQ, MessageID=1), "C-ECHO-RQ lacks (0000,0002)"),
        (
            Command(CommandField.C_ECHO_RQ, MessageID=1, AffectedSOPClassUID="1", Priority=3),
            "Priority 0x0003",
        ),
        (
            Command(
                CommandField.C_ECHO_RQ,
                MessageID=1,
                AffectedSOPClassUID="1.2",
                CommandDataSetType=0,
            ),
            "C-ECHO-RQ has no data set",
        ),
        (
            Command(
                CommandField.C_STORE_RQ,
                MessageID=1,
                AffectedSOPClassUID="1.2",
                AffectedSOPInstanceUID="1.2.3",
                Priority=0,
            ),
            "C-STORE-RQ needs a data set",
        ),
        (
            c_store_rq(1, "1.2", ""),
            "empty (0000,1000) AffectedSOPInstanceUID",
        ),
        (c_store_rq(1, "1.2", "1" * 65), "AffectedSOPInstanceUID is 65 characters"),
        (c_move_rq(1, "1.2", "A" * 17), "MoveDestination is 17 characters"),
        (c_move_rq(1, "1.2", ""), "empty (0000,0600) MoveDestination"),
        (Command(CommandField.C_CANCEL_RQ), "C-CANCEL-RQ lacks (0000,0120)"),
        (
            Command(CommandField.N_ACTION_RQ, MessageID=1, RequestedSOPClassUID="1"),
            "N-ACTION-RQ lacks (0000,1001) RequestedSOPInstanceUID",
        ),
        (
            Command(
                CommandField.N_ACTION_RQ,
                MessageID=1,
                RequestedSOPClassUID="1",
                RequestedSOPInstanceUID="2",
            ),
            "lacks (0000,1008) ActionTypeID",
        ),
        (
            Command(
                CommandField.N_EVENT_REPORT_RQ,
                MessageID=1,
                AffectedSOPClassUID="1",
                AffectedSOPInstanceUID="2",
            ),
            "lacks (0000,1002) EventTypeID",
        ),
        (Command(CommandField.N_SET_RQ, MessageID=1), "lacks (0000,0003)"),
        (Command(CommandField.N_SET_RQ), "N-SET-RQ lacks (0000,0110)"),
        (Command(CommandField.C_STORE_RSP, Status=0), "lacks (0000,0120)"),
        (Command(CommandField.C_STORE_RSP, MessageIDBeingRespondedTo=1), "lacks (0000,0900)"),
        (
            Command(
                CommandField.C_STORE_RSP,
                MessageIDBeingRespondedTo=1,
                Status=0,
                CommandDataSetType=0,
            ),
            "C-STORE-RSP has no data set",
        ),
        (
            Command(
                CommandField.C_ECHO_RSP,
                MessageIDBeingRespondedTo=1,
                Status=0,
                ErrorComment="x" * 65,
            ),
            "ErrorComment is 65",
        ),
        (Command(0x0031), "unknown CommandField 0x0031"),
    ],
)
def test_validate_finds_problems(cmd: Command, problem: str) -> None:
    found = validate_command(cmd)
    assert found is not None and problem in found, found


def test_n_set_rq_needs_modification_list() -> None:
    cmd = n_set_rq(1, PRINTER, "1.2.3")
    cmd.CommandDataSetType = NO_DATASET
    assert validate_command(cmd) == "N-SET-RQ needs a data set but CommandDataSetType is 0x0101"


# --------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------


def test_c_store_rsp() -> None:
    rq = c_store_rq(12, CT_IMAGE, INSTANCE)
    rsp = c_store_rsp(rq, Status.STORE_HANDLER_FAILED, ErrorComment="disk full")
    assert rsp == Command(
        CommandField.C_STORE_RSP,
        MessageIDBeingRespondedTo=12,
        AffectedSOPClassUID=CT_IMAGE,
        AffectedSOPInstanceUID=INSTANCE,
        Status=0xC211,
        ErrorComment="disk full",
    )
    assert not rsp.has_dataset and not rsp.is_request
    with pytest.raises(DIMSEError, match="not a C-STORE-RQ"):
        c_store_rsp(c_echo_rq(1), 0)


def test_c_echo() -> None:
    rq = c_echo_rq(3)
    assert rq.AffectedSOPClassUID == VERIFICATION_SOP_CLASS and not rq.has_dataset
    assert c_echo_rsp(rq) == Command(
        CommandField.C_ECHO_RSP,
        MessageIDBeingRespondedTo=3,
        AffectedSOPClassUID=VERIFICATION_SOP_CLASS,
        Status=0,
    )
    with pytest.raises(DIMSEError, match="not a C-ECHO-RQ"):
        c_echo_rsp(c_cancel_rq(1))


@pytest.mark.parametrize(
    ("rq", "echoed"),
    [
        (c_find_rq(1, "1.2"), {"AffectedSOPClassUID": "1.2"}),
        (c_get_rq(1, "1.2"), {"AffectedSOPClassUID": "1.2"}),
        (c_move_rq(1, "1.2", "X"), {"AffectedSOPClassUID": "1.2"}),
        (
            n_event_report_rq(1, "1.2", "1.3", 4),
            {"AffectedSOPClassUID": "1.2", "AffectedSOPInstanceUID": "1.3", "EventTypeID": 4},
        ),
        (
            n_get_rq(1, "1.2", "1.3"),
            {"AffectedSOPClassUID": "1.2", "AffectedSOPInstanceUID": "1.3"},
        ),
        (
            n_set_rq(1, "1.2", "1.3"),
            {"AffectedSOPClassUID": "1.2", "AffectedSOPInstanceUID": "1.3"},
        ),
        (
            n_action_rq(1, "1.2", "1.3", 5),
            {"AffectedSOPClassUID": "1.2", "AffectedSOPInstanceUID": "1.3", "ActionTypeID": 5},
        ),
        (n_create_rq(1, "1.2"), {"AffectedSOPClassUID": "1.2"}),
        (
            n_create_rq(1, "1.2", "1.3"),
            {"AffectedSOPClassUID": "1.2", "AffectedSOPInstanceUID": "1.3"},
        ),
        (
            n_delete_rq(1, "1.2", "1.3"),
            {"AffectedSOPClassUID": "1.2", "AffectedSOPInstanceUID": "1.3"},
        ),
    ],
)
def test_response_for(rq: Command, echoed: dict[str, Any]) -> None:
    rsp = response_for(rq, Status.PENDING)
    assert rsp == Command(
        CommandField(rq.CommandField | 0x8000),
        MessageIDBeingRespondedTo=1,
        Status=0xFF00,
        **echoed,
    )
    assert isinstance(rsp.CommandField, CommandField)


def test_response_for_fields_override() -> None:
    rq = n_create_rq(4, PRINTER)
    rsp = response_for(
        rq, Status.SUCCESS, AffectedSOPInstanceUID="1.2.3.4", CommandDataSetType=DATASET_PRESENT
    )
    assert rsp.AffectedSOPInstanceUID == "1.2.3.4" and rsp.has_dataset
    with pytest.raises(TypeError):
        response_for(rq, 0, NoSuchField=1)


@pytest.mark.parametrize("rq", [c_cancel_rq(1), response_for(c_echo_rq(1), 0)])
def test_response_for_refuses(rq: Command) -> None:
    with pytest.raises(DIMSEError):
        response_for(rq, 0)


def test_a_request_without_message_id_still_gets_its_failure_answer() -> None:
    rsp = response_for(Command(CommandField.C_ECHO_RQ), 0xC000)
    assert rsp.MessageIDBeingRespondedTo == 0 and rsp.Status == 0xC000
    assert decode_command(encode_command(rsp)).MessageIDBeingRespondedTo == 0


def test_a_peers_non_ascii_uid_is_echoed_as_question_marks() -> None:
    rsp = Command(CommandField.C_STORE_RSP, MessageIDBeingRespondedTo=1, Status=0xC000)
    rsp.AffectedSOPInstanceUID = "1.2.\ufffd"
    assert decode_command(encode_command(rsp)).AffectedSOPInstanceUID == "1.2.?"


# --------------------------------------------------------------------------------------
# Statuses
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "category"),
    [
        (0x0000, "Success"),
        (0x0001, "Warning"),
        (0x0107, "Warning"),
        (0x0116, "Warning"),
        (0xB000, "Warning"),
        (0xB006, "Warning"),
        (0xB007, "Warning"),
        (0xBFFF, "Warning"),
        (0xFF00, "Pending"),
        (0xFF01, "Pending"),
        (0xFE00, "Cancel"),
        (0xA700, "Failure"),
        (0xA801, "Failure"),
        (0xA900, "Failure"),
        (0xC000, "Failure"),
        (0xC211, "Failure"),
        (0x0110, "Failure"),
        (0x0122, "Failure"),
        (0x0210, "Failure"),
        (0x0213, "Failure"),
        (0x0002, "Failure"),  # unknown: not a success
        (0xFFFF, "Failure"),
        (0xFE01, "Failure"),
    ],
)
def test_status_category(status: int, category: str) -> None:
    assert status_category(status) == category


def test_status_category_agrees_with_pynetdicom() -> None:
    for status in range(0x10000):
        theirs = code_to_category(status)
        if theirs != "Unknown":
            assert status_category(status) == theirs, hex(status)
        else:
            assert status_category(status) == "Failure", hex(status)


def test_status_constants() -> None:
    assert Status.SUCCESS == 0 and Status.PENDING_WARNING == 0xFF01
    assert Status.DATASET_DOES_NOT_MATCH_SOP_CLASS == 0xA900
    assert Status.CANNOT_UNDERSTAND == 0xC000 and Status.OUT_OF_RESOURCES == 0xA700
    assert Status.CLASS_INSTANCE_CONFLICT == 0x0119 and Status.RESOURCE_LIMITATION == 0x0213
    for status in Status:
        category = status_category(status)
        if "WARNING" in status.name or status in (0x0001, 0x0107, 0x0116, 0xB000, 0xB006):
            expected = "Pending" if status == Status.PENDING_WARNING else "Warning"
            assert category == expected, status
        elif status.name in ("SUCCESS", "CANCEL", "PENDING"):
            assert category == status.name.title()
        else:
            assert category == "Failure", status


# --------------------------------------------------------------------------------------
# P-DATA-TF fragmentation
# --------------------------------------------------------------------------------------


def _parse(pdu: bytes | bytearray) -> tuple[int, int, bytes]:
    """Check the framing of a single-PDV P-DATA-TF; return (context, control, data)."""
    pdu_type, reserved, pdu_length, item_length, context_id, control = struct.unpack_from(
        ">BBIIBB", pdu
    )
    assert (pdu_type, reserved) == (0x04, 0)
    assert pdu_length == len(pdu) - 6
    assert item_length == pdu_length - 4
    return context_id, control, bytes(pdu[12:])


def _check_message(
    pdus: list[bytes] | list[bytes | bytearray],
    command: bytes,
    dataset: bytes | None,
    max_pdu: int,
    context_id: int,
    cap: int = MAX_PDU_CAP,
) -> None:
    limit = min(max_pdu, cap) if max_pdu else cap
    parsed = [_parse(pdu) for pdu in pdus]
    for pdu in pdus:
        assert len(pdu) - 6 <= limit
    assert all(cid == context_id for cid, _, _ in parsed)
    commands = [(c, d) for _, c, d in parsed if c & CONTROL_COMMAND]
    datas = [(c, d) for _, c, d in parsed if not c & CONTROL_COMMAND]
    # command fragments first, then the data set's
    assert [c & CONTROL_COMMAND for _, c, _ in parsed] == [1] * len(commands) + [0] * len(datas)
    assert all(c in (0, 1, 2, 3) for _, c, _ in parsed)
    assert [c & CONTROL_LAST for c, _ in commands] == [0] * (len(commands) - 1) + [2]
    assert b"".join(d for _, d in commands) == command
    if dataset is None:
        assert datas == []
    else:
        assert [c for c, _ in datas] == [0] * (len(datas) - 1) + [2]
        assert b"".join(d for _, d in datas) == dataset
    # nothing wasted: every fragment but the last of each kind is as large as allowed
    for group in (commands, datas):
        assert all(len(d) == (limit - 6) & ~1 for _, d in group[:-1])


max_pdus = st.sampled_from([0, 8, 9, 13, 64, 1000, 16383, 16384, 16390]) | st.integers(8, 5000)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(min_size=1, max_size=300),
    st.none() | st.binary(max_size=6000),
    max_pdus,
    st.sampled_from([1, 3, 127, 255]),
)
def test_fragment_message(
    command: bytes, dataset: bytes | None, max_pdu: int, context_id: int
) -> None:
    pdus = fragment_message(context_id, command, dataset, max_pdu)
    assert all(type(pdu) is bytes for pdu in pdus)
    _check_message(pdus, command, dataset, max_pdu, context_id)
    # pynetdicom's decoder sees the same PDVs
    for pdu, (cid, control, data) in zip(pdus, map(_parse, pdus), strict=True):
        theirs = P_DATA_TF()
        theirs.decode(pdu)
        ((their_cid, their_pdv),) = theirs.to_primitive().presentation_data_value_list
        assert their_cid == cid and their_pdv == bytes([control]) + data
    # a reader, seekable or not, with or without the length, gives the same PDUs
    if dataset is not None:
        for source, length in (
            (io.BytesIO(dataset), None),
            (ShortReader(dataset), None),
            (ShortReader(dataset), len(dataset)),
        ):
            lazily = list(
                iter_fragments(context_id, command, source, max_pdu, dataset_length=length)
            )
            assert [bytes(p) for p in lazily] == pdus


class ShortReader:
    """A non-seekable reader that returns at most 5 bytes per readinto call."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0

    def readinto(self, buffer: memoryview) -> int:
        chunk = self._data[self._offset : self._offset + min(5, len(buffer))]
        buffer[: len(chunk)] = chunk
        self._offset += len(chunk)
        return len(chunk)


@pytest.mark.parametrize("max_pdu", [8, 101, 1006, 0])
@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 5000])
def test_reader_edges(max_pdu: int, size: int) -> None:
    """Exact multiples of the fragment size, empty data sets, unlimited with a cap."""
    dataset = bytes(i % 251 for i in range(size))
    command = encode_command(c_store_rq(1, CT_IMAGE, INSTANCE))
    expected = fragment_message(5, command, dataset, max_pdu, pdu_cap=1006)
    _check_message(expected, command, dataset, max_pdu, 5, cap=1006)
    for source in (io.BytesIO(dataset), ShortReader(dataset)):
        got = list(iter_fragments(5, command, source, max_pdu, pdu_cap=1006))
        assert [bytes(p) for p in got] == expected


def test_reader_from_current_position() -> None:
    source = io.BytesIO(b"preamble" + b"x" * 50)
    source.seek(8)
    pdus = list(iter_fragments(1, b"cmd!", source, 30))
    assert b"".join(_parse(p)[2] for p in pdus[1:]) == b"x" * 50


def test_reader_shorter_than_promised() -> None:
    with pytest.raises(ValueError, match="ended 5 bytes early"):
        list(iter_fragments(1, b"cmd!", ShortReader(b"x" * 10), 0, dataset_length=15))


def test_non_blocking_reader_is_refused() -> None:
    class NotReady:
        def readinto(self, buffer: memoryview) -> None:
            return None

    with pytest.raises(ValueError, match="no data ready"):
        list(iter_fragments(1, b"cmd!", NotReady(), 0))


def test_empty_dataset_is_one_empty_last_fragment() -> None:
    pdus = fragment_message(1, b"cmd!", b"", 100)
    assert [_parse(p) for p in pdus] == [(1, 3, b"cmd!"), (1, 2, b"")]


def test_unlimited_is_capped() -> None:
    dataset = bytes(MAX_PDU_CAP - 6 + 10)
    pdus = fragment_message(1, b"cmd!", dataset, 0)
    assert [len(p) for p in pdus] == [16, MAX_PDU_CAP + 6, 10 + 12]
    one = fragment_message(1, b"cmd!", dataset, 0, pdu_cap=MAX_PDU_CAP + 10)
    assert len(one) == 2


def test_memoryview_datasets_of_any_format() -> None:
    words = memoryview(bytearray(b"abcdefgh")).cast("H")
    pdus = fragment_message(1, b"cmd!", words, 9)
    assert b"".join(_parse(p)[2] for p in pdus[2:]) == b"abcdefgh"


def test_pdata_header() -> None:
    header = pdata_header(7, CONTROL_COMMAND | CONTROL_LAST, 100)
    assert header == b"\x04\x00" + struct.pack(">I", 106) + struct.pack(">I", 102) + b"\x07\x03"
    assert fragment_message(7, b"x" * 100, None, 0) == [header + b"x" * 100]


@pytest.mark.parametrize("max_pdu", [-1, 1, 6])
def test_max_pdu_too_small(max_pdu: int) -> None:
    with pytest.raises(ValueError):
        fragment_message(1, b"cmd", None, max_pdu)


def test_max_fragment_length() -> None:
    assert max_fragment_length(8) == 2
    assert max_fragment_length(9) == 2  # fragments stay even for an odd maximum
    assert max_fragment_length(16383) == 16376
    assert max_fragment_length(16384) == 16378
    with pytest.raises(ValueError, match="even PDV fragment"):
        max_fragment_length(7)
    assert max_fragment_length(0) == MAX_PDU_CAP - 6
    assert max_fragment_length(2**32 - 1) == MAX_PDU_CAP - 6
    assert max_fragment_length(0, pdu_cap=100) == 94


@pytest.mark.parametrize("context_id", [0, 2, 256, -1])
def test_bad_context_id(context_id: int) -> None:
    with pytest.raises(ValueError, match="context ID"):
        fragment_message(context_id, b"cmd", None, 0)
