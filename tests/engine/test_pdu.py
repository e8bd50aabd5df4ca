"""Tests of the Upper Layer PDU codec (workers.engine.pdu).

1. Golden vectors: bytes written out from the PS3.8/PS3.7 layouts, and pynetdicom as
   an independent peer: for every PDU type and every item and sub-item, our encoding
   equals pynetdicom's, we decode what it encodes and it decodes what we encode.
2. Hypothesis round trips of arbitrary valid PDUs (strategies in strategies.py).
3. Malformed input: truncations, random bytes, mutations only ever raise PDUError,
   with the A-ABORT reason the standard names.
4. Encoding rejects local misuse with ValueError.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.engine import strategies as pst
from tests.engine.pynetdicom_compat import (
    from_pynetdicom,
    pynetdicom_bytes_identical,
    pynetdicom_decode,
    to_pynetdicom,
)
from workers.engine.pdu import (
    APPLICATION_CONTEXT_NAME,
    PDU,
    PDV,
    Abort,
    AbortReason,
    AbortSource,
    AssociateAC,
    AssociateRJ,
    AssociateRQ,
    AsyncOpsWindow,
    ContextResult,
    ItemType,
    PDataTF,
    PDUError,
    PDUType,
    PresentationContextAC,
    PresentationContextRQ,
    RejectReason,
    RejectResult,
    RejectSource,
    ReleaseRP,
    ReleaseRQ,
    RoleSelection,
    SOPClassCommonExtended,
    SOPClassExtended,
    UserIdentityAC,
    UserIdentityRQ,
    UserIdentityType,
    UserInformation,
    decode,
    encode,
    iter_pdvs,
    parse_header,
)

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
STORAGE_SERVICE = "1.2.840.10008.4.2"
IMPL_UID = "1.2.826.0.1.3680043.9.3811.2.1"


def roundtrip(pdu: PDU) -> PDU:
    data = encode(pdu)
    return decode(data[0], data[6:])


def body_of(data: bytes) -> bytes:
    return data[6:]


# --- 1. golden vectors -----------------------------------------------------------------


def item(item_type: int, value: bytes) -> bytes:
    """An item written straight from PS3.8 9.3.1: type, reserved, 2-byte length."""
    return bytes([item_type, 0]) + len(value).to_bytes(2, "big") + value


def pdu_bytes(pdu_type: int, body: bytes) -> bytes:
    return bytes([pdu_type, 0]) + len(body).to_bytes(4, "big") + body


def test_associate_rq_written_from_the_standard() -> None:
    body = (
        b"\x00\x01\x00\x00"  # protocol version 1, reserved
        + b"STORESCP        "  # called AE, space padded to 16
        + b"MODALITY        "  # calling AE
        + bytes(32)
        + item(0x10, b"1.2.840.10008.3.1.1.1")
        + item(
            0x20,
            b"\x01\x00\x00\x00"
            + item(0x30, CT_IMAGE.encode())
            + item(0x40, EXPLICIT_LE.encode())
            + item(0x40, IMPLICIT_LE.encode()),
        )
        + item(
            0x50,
            item(0x51, (16384).to_bytes(4, "big"))
            + item(0x52, IMPL_UID.encode())
            + item(0x53, b"\x00\x05\x00\x01")
            + item(0x55, b"PACS_1"),
        )
    )
    data = pdu_bytes(0x01, body)
    expected = AssociateRQ(
        called_ae="STORESCP",
        calling_ae="MODALITY",
        contexts=(PresentationContextRQ(1, CT_IMAGE, (EXPLICIT_LE, IMPLICIT_LE)),),
        user_info=UserInformation(
            max_length=16384,
            implementation_class_uid=IMPL_UID,
            implementation_version_name="PACS_1",
            async_ops=AsyncOpsWindow(5, 1),
        ),
    )
    assert decode(0x01, body) == expected
    assert encode(expected) == data
    assert parse_header(data) == (0x01, len(body))


def test_associate_ac_written_from_the_standard() -> None:
    body = (
        b"\x00\x01\x00\x00"
        + b"STORESCP        "
        + b"MODALITY        "
        + bytes(32)
        + item(0x10, b"1.2.840.10008.3.1.1.1")
        + item(0x21, b"\x01\x00\x00\x00" + item(0x40, EXPLICIT_LE.encode()))
        + item(0x21, b"\x03\x00\x03\x00" + item(0x40, b""))
        + item(0x50, item(0x51, bytes(4)) + item(0x59, b"\x00\x03tok"))
    )
    expected = AssociateAC(
        "STORESCP",
        "MODALITY",
        (
            PresentationContextAC(1, ContextResult.ACCEPTANCE, EXPLICIT_LE),
            PresentationContextAC(3, ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED, ""),
        ),
        UserInformation(max_length=0, user_identity_ac=UserIdentityAC(b"tok")),
    )
    assert decode(0x02, body) == expected
    assert encode(expected) == pdu_bytes(0x02, body)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("03 00 00000004 00 01 01 07", AssociateRJ(1, 1, 7)),
        ("03 00 00000004 00 02 03 02", AssociateRJ(2, 3, 2)),
        ("04 00 00000008 00000004 01 03 abcd", PDataTF((PDV(1, 3, b"\xab\xcd"),))),
        ("04 00 0000000c 00000002 05 00 00000002 07 02", PDataTF((PDV(5, 0, b""), PDV(7, 2, b"")))),
        ("05 00 00000004 00000000", ReleaseRQ()),
        ("06 00 00000004 00000000", ReleaseRP()),
        ("07 00 00000004 0000 00 00", Abort(0, 0)),
        ("07 00 00000004 0000 02 06", Abort(2, 6)),
    ],
)
def test_small_pdus_written_from_the_standard(data: str, expected: PDU) -> None:
    raw = bytes.fromhex(data)
    assert decode(raw[0], raw[6:]) == expected
    assert encode(expected) == raw


def _rq(**user_info: Any) -> AssociateRQ:
    return AssociateRQ(
        "ANY-SCP",
        "STORESCU",
        (
            PresentationContextRQ(1, VERIFICATION, (IMPLICIT_LE,)),
            PresentationContextRQ(
                3, CT_IMAGE, (EXPLICIT_LE, IMPLICIT_LE, "1.2.840.10008.1.2.4.50")
            ),
        ),
        UserInformation(max_length=16382, implementation_class_uid=IMPL_UID, **user_info),
    )


def _ac(*contexts: PresentationContextAC, **user_info: Any) -> AssociateAC:
    return AssociateAC(
        "ANY-SCP",
        "STORESCU",
        contexts or (PresentationContextAC(1, 0, IMPLICIT_LE),),
        UserInformation(max_length=0, implementation_class_uid=IMPL_UID, **user_info),
    )


# One case per PDU type and per item / sub-item type (and their variants).
GOLDEN: dict[str, PDU] = {
    "rq-minimal": AssociateRQ("A", "B", (), UserInformation()),
    "rq-app-context-10h": AssociateRQ(
        "A", "B", (), UserInformation(max_length=1), application_context="1.2.3.4"
    ),
    "rq-protocol-version": AssociateRQ("A", "B", (), UserInformation(), protocol_version=3),
    "rq-16-char-aes": AssociateRQ("ABCDEFGHIJKLMNOP", "0123456789ABCDEF", (), UserInformation()),
    "rq-contexts-20h-30h-40h": _rq(),
    "rq-max-length-51h": AssociateRQ("A", "B", (), UserInformation(max_length=0xFFFF_FFFF)),
    "rq-impl-class-uid-52h": AssociateRQ("A", "B", (), UserInformation(None, IMPL_UID)),
    "rq-async-ops-53h": _rq(async_ops=AsyncOpsWindow(0, 65535)),
    "rq-roles-54h": _rq(
        roles=(
            RoleSelection(CT_IMAGE, True, False),
            RoleSelection(VERIFICATION, False, True),
            RoleSelection("1.2.3", True, True),
            RoleSelection("1.2.4", False, False),
        )
    ),
    "rq-version-name-55h": _rq(implementation_version_name="PYNETDICOM_304"),
    "rq-version-name-1-char": _rq(implementation_version_name="X"),
    "rq-sop-extended-56h": _rq(
        sop_class_extended=(
            SOPClassExtended(CT_IMAGE, b"\x01\x00\x01"),
            SOPClassExtended(VERIFICATION, b""),
        )
    ),
    "rq-sop-common-extended-57h": _rq(
        sop_class_common_extended=(
            SOPClassCommonExtended(CT_IMAGE, STORAGE_SERVICE, ("1.2.840.10008.5.1.4.1.1.2.1",)),
            SOPClassCommonExtended("1.2.3", "1.2.4", ()),
            SOPClassCommonExtended("1.2.5", "1.2.6", ("1.2.7", "1.2.88", "1.2.999")),
        )
    ),
    "rq-user-identity-58h-username": _rq(
        user_identity_rq=UserIdentityRQ(UserIdentityType.USERNAME, False, b"alice")
    ),
    "rq-user-identity-58h-passcode": _rq(
        user_identity_rq=UserIdentityRQ(
            UserIdentityType.USERNAME_AND_PASSCODE, True, b"alice", b"s3cret"
        )
    ),
    "rq-user-identity-58h-jwt": _rq(
        user_identity_rq=UserIdentityRQ(UserIdentityType.JWT, True, b"eyJ." * 100)
    ),
    "rq-everything": _rq(
        async_ops=AsyncOpsWindow(16, 1),
        roles=(RoleSelection(CT_IMAGE, True, True),),
        implementation_version_name="ALL",
        sop_class_extended=(SOPClassExtended(CT_IMAGE, b"\x01"),),
        sop_class_common_extended=(SOPClassCommonExtended(CT_IMAGE, STORAGE_SERVICE),),
        user_identity_rq=UserIdentityRQ(UserIdentityType.SAML, False, b"<saml/>"),
    ),
    "ac-accepted-21h": _ac(),
    "ac-mixed-results": _ac(
        PresentationContextAC(1, ContextResult.ACCEPTANCE, EXPLICIT_LE),
        PresentationContextAC(3, ContextResult.USER_REJECTION, IMPLICIT_LE),
        PresentationContextAC(5, ContextResult.NO_REASON, IMPLICIT_LE),
        PresentationContextAC(7, ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED, IMPLICIT_LE),
        PresentationContextAC(255, ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED, IMPLICIT_LE),
    ),
    "ac-rejected-empty-transfer-syntax": _ac(
        PresentationContextAC(1, ContextResult.ACCEPTANCE, IMPLICIT_LE),
        PresentationContextAC(3, ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED, ""),
    ),
    "ac-no-contexts": AssociateAC("A", "B", (), UserInformation(max_length=0)),
    "ac-async-ops-53h": _ac(async_ops=AsyncOpsWindow(5, 1)),
    "ac-roles-54h": _ac(roles=(RoleSelection(CT_IMAGE, False, True),)),
    "ac-version-name-55h": _ac(implementation_version_name="PACS_RECEIVER"),
    "ac-sop-extended-56h": _ac(sop_class_extended=(SOPClassExtended(CT_IMAGE, b"\x00\x01"),)),
    "ac-user-identity-59h": _ac(user_identity_ac=UserIdentityAC(b"kerberos-ticket")),
    "ac-user-identity-59h-empty": _ac(user_identity_ac=UserIdentityAC(b"")),
    "rj-user": AssociateRJ(
        RejectResult.PERMANENT, RejectSource.SERVICE_USER, RejectReason.CALLED_AE_NOT_RECOGNIZED
    ),
    "rj-acse": AssociateRJ(
        RejectResult.PERMANENT,
        RejectSource.SERVICE_PROVIDER_ACSE,
        RejectReason.PROTOCOL_VERSION_NOT_SUPPORTED,
    ),
    "rj-presentation": AssociateRJ(
        RejectResult.TRANSIENT,
        RejectSource.SERVICE_PROVIDER_PRESENTATION,
        RejectReason.LOCAL_LIMIT_EXCEEDED,
    ),
    "p-data-one": PDataTF((PDV(1, 0x03, b"\x00\x00\x00\x00\x04\x00\x00\x00"),)),
    "p-data-many": PDataTF(
        (PDV(1, 0x01, b"cmd"), PDV(1, 0x03, b""), PDV(3, 0x00, bytes(1000)), PDV(255, 0x02, b"x"))
    ),
    "release-rq": ReleaseRQ(),
    "release-rp": ReleaseRP(),
    "abort-user": Abort(AbortSource.SERVICE_USER),
    "abort-provider": Abort(AbortSource.SERVICE_PROVIDER, AbortReason.INVALID_PDU_PARAMETER),
}


@pytest.mark.parametrize("pdu", GOLDEN.values(), ids=GOLDEN.keys())
def test_golden_against_pynetdicom(pdu: PDU) -> None:
    ours = encode(pdu)
    theirs = to_pynetdicom(pdu).encode()
    if pynetdicom_bytes_identical(pdu):
        assert ours == theirs
    # Both directions: we read what pynetdicom writes, pynetdicom reads what we write.
    assert decode(theirs[0], theirs[6:]) == pdu
    assert from_pynetdicom(pynetdicom_decode(ours)) == pdu
    assert decode(ours[0], memoryview(ours)[6:]) == pdu


def item_types(data: bytes) -> set[int]:
    """The item and sub-item types in an encoded A-ASSOCIATE-RQ/AC, walked by hand."""
    found: set[int] = set()

    def walk(chunk: bytes) -> None:
        while chunk:
            item_type, length = chunk[0], int.from_bytes(chunk[2:4], "big")
            value, chunk = chunk[4 : 4 + length], chunk[4 + length :]
            found.add(item_type)
            if item_type in (0x20, 0x21):
                walk(value[4:])
            elif item_type == 0x50:
                walk(value)

    if data[0] in (0x01, 0x02):
        walk(data[6 + 68 :])
    return found


def test_golden_cases_cover_every_pdu_and_item_type() -> None:
    assert {pdu.pdu_type for pdu in GOLDEN.values()} == set(PDUType)
    found = set().union(*(item_types(encode(pdu)) for pdu in GOLDEN.values()))
    assert found == set(ItemType)


def test_pynetdicom_rejected_context_without_transfer_syntax() -> None:
    # pynetdicom cannot encode an empty transfer syntax sub-item, so a rejected context
    # built without one goes out with none at all (item length 4): read as "".
    pdu = GOLDEN["ac-rejected-empty-transfer-syntax"]
    theirs = to_pynetdicom(pdu).encode()
    assert bytes.fromhex("21 00 0004 03 00 03 00") in theirs
    assert decode(theirs[0], theirs[6:]) == pdu
    # We always send the sub-item, empty: PS3.8 Table 9-18.
    assert bytes.fromhex("21 00 0008 03 00 03 00 40 00 0000") in encode(pdu)


@FAST
@given(pst.pdus(conformant=True))
def test_golden_against_pynetdicom_generated(pdu: PDU) -> None:
    ours = encode(pdu)
    theirs = to_pynetdicom(pdu).encode()
    if pynetdicom_bytes_identical(pdu):
        assert ours == theirs
    assert decode(theirs[0], theirs[6:]) == pdu
    assert from_pynetdicom(pynetdicom_decode(ours)) == pdu


# --- lenient reading -------------------------------------------------------------------


def _rq_body(*items: bytes, called: bytes = b"A" + b" " * 15, fixed: bytes = b"") -> bytes:
    fixed = fixed or b"\x00\x01\x00\x00" + called + b"B" + b" " * 15 + bytes(32)
    return fixed + b"".join(items)


APP = item(0x10, APPLICATION_CONTEXT_NAME.encode())
USER = item(0x50, item(0x51, b"\x00\x00\x40\x00"))


def test_reserved_fields_are_not_tested() -> None:
    def dirty(item_type: int, value: bytes) -> bytes:
        return bytes([item_type, 0xFF]) + len(value).to_bytes(2, "big") + value

    fixed = b"\x00\x01\xff\xff" + b"A" + b" " * 15 + b"B" + b" " * 15 + b"\xff" * 32
    context = dirty(0x20, b"\x01\xff\xff\xff" + dirty(0x30, b"1.2") + dirty(0x40, b"1"))
    user = dirty(0x50, dirty(0x51, b"\x00\x00\x40\x00"))
    pdu = decode(0x01, _rq_body(dirty(0x10, b"1.2"), context, user, fixed=fixed))
    assert pdu == AssociateRQ(
        "A", "B", (PresentationContextRQ(1, "1.2", ("1",)),), UserInformation(0x4000), "1.2"
    )
    assert decode(0x07, b"\xff\xff\x02\x01") == Abort(2, 1)
    assert decode(0x05, b"\xff\xff\xff\xff") == ReleaseRQ()
    assert decode(0x06, b"\xff\xff\xff\xff") == ReleaseRP()
    assert decode(0x03, b"\xff\x01\x02\x02") == AssociateRJ(1, 2, 2)


def test_ae_titles_and_uids_are_unpadded() -> None:
    body = _rq_body(
        item(0x10, APPLICATION_CONTEXT_NAME.encode() + b"\x00"),  # PS3.5-style NUL pad
        item(0x20, b"\x01\x00\x00\x00" + item(0x30, b"1.2.3\x00") + item(0x40, b"1.2 ")),
        USER,
        called=b"  CALLED\x00\x00\x00\x00\x00\x00\x00\x00",
    )
    pdu = decode(0x01, body)
    assert isinstance(pdu, AssociateRQ)
    assert pdu.called_ae == "CALLED"
    assert pdu.application_context == APPLICATION_CONTEXT_NAME
    assert pdu.contexts == (PresentationContextRQ(1, "1.2.3", ("1.2",)),)


def test_non_ascii_text_never_fails() -> None:
    body = _rq_body(
        item(0x10, b"\xff\xfe"),
        USER,
        called=b"\xe9T\xc9" + b" " * 13,
    )
    pdu = decode(0x01, body)
    assert isinstance(pdu, AssociateRQ)
    assert pdu.called_ae == "éTÉ"
    assert pdu.application_context == "\xff\xfe"
    assert roundtrip(pdu) == pdu  # and whatever was decoded can be sent back


def test_unknown_variable_items_are_skipped() -> None:
    body = _rq_body(item(0x99, b"junk"), APP, item(0x30, b"1.2"), USER, item(0x00, b""))
    pdu = decode(0x01, body)
    assert isinstance(pdu, AssociateRQ)
    assert pdu.contexts == ()
    assert pdu.user_info == UserInformation(max_length=0x4000)


def test_unknown_user_information_sub_items_are_kept_in_order() -> None:
    ud = item(0x50, item(0x7F, b"b") + item(0x51, bytes(4)) + item(0x60, b"") + item(0x10, b"a"))
    pdu = decode(0x01, _rq_body(APP, ud))
    assert isinstance(pdu, AssociateRQ)
    assert pdu.user_info.unknown == ((0x7F, b"b"), (0x60, b""), (0x10, b"a"))
    assert roundtrip(pdu) == pdu


def test_missing_max_length_and_empty_user_information() -> None:
    pdu = decode(0x01, _rq_body(APP, item(0x50, b"")))
    assert isinstance(pdu, AssociateRQ)
    assert pdu.user_info == UserInformation()


def test_protocol_version_is_kept_for_the_engine() -> None:
    fixed = b"\x00\x02\x00\x00" + b"A" + b" " * 15 + b"B" + b" " * 15 + bytes(32)
    pdu = decode(0x01, _rq_body(APP, USER, fixed=fixed))
    assert isinstance(pdu, AssociateRQ)
    assert pdu.protocol_version == 2


def test_ac_context_without_transfer_syntax_sub_item() -> None:
    body = _rq_body(APP, item(0x21, b"\x01\x00\x04\x00"), USER)
    pdu = decode(0x02, body)
    assert isinstance(pdu, AssociateAC)
    assert pdu.contexts == (PresentationContextAC(1, 4, ""),)


def test_lenient_flags_and_version_name() -> None:
    ud = item(
        0x50,
        item(0x54, b"\x00\x031.2\x02\xff")
        + item(0x55, b"A_NAME_LONGER_THAN_16 \x00")
        + item(0x58, b"\x01\x07\x00\x01u\x00\x00"),
    )
    pdu = decode(0x01, _rq_body(APP, ud))
    assert isinstance(pdu, AssociateRQ)
    assert pdu.user_info.roles == (RoleSelection("1.2", True, True),)
    assert pdu.user_info.implementation_version_name == "A_NAME_LONGER_THAN_16"
    assert pdu.user_info.user_identity_rq == UserIdentityRQ(1, True, b"u", b"")


def test_decode_accepts_bytes_bytearray_and_memoryviews() -> None:
    pdu = GOLDEN["rq-everything"]
    data = encode(pdu)
    assert decode(data[0], bytearray(data[6:])) == pdu
    assert decode(data[0], memoryview(data)[6:]) == pdu
    assert decode(data[0], memoryview(data[6:]).cast("c")) == pdu


def test_errors_leave_a_bytearray_resizable() -> None:
    buffer = bytearray(encode(GOLDEN["rq-everything"]))
    buffer[-1:] = b""  # truncated: the user information item overruns
    try:
        decode(buffer[0], memoryview(buffer)[6:])
    except PDUError:
        del buffer[:6]  # BufferError if the raised error kept a view of the buffer
    else:  # pragma: no cover
        pytest.fail("no PDUError")


def test_iter_pdvs_walks_in_place() -> None:
    data = encode(GOLDEN["p-data-many"])
    walked = [(cid, ctl, bytes(view)) for cid, ctl, view in iter_pdvs(memoryview(data)[6:])]
    assert walked == [(p.context_id, p.control, p.data) for p in GOLDEN["p-data-many"].pdvs]  # type: ignore[union-attr]
    first = next(iter_pdvs(data[6:]))[2]
    assert isinstance(first, memoryview)


# --- 2. round trips -----------------------------------------------------------------------


@FAST
@given(pst.pdus())
def test_roundtrip_any_pdu(pdu: PDU) -> None:
    data = encode(pdu)
    pdu_type, length = parse_header(data)
    assert pdu_type == pdu.pdu_type
    assert length == len(data) - 6
    assert decode(pdu_type, data[6:]) == pdu
    assert decode(pdu_type, memoryview(data)[6:]) == pdu


@FAST
@given(pst.associate_rqs())
def test_roundtrip_associate_rq(pdu: AssociateRQ) -> None:
    assert roundtrip(pdu) == pdu


@FAST
@given(pst.associate_acs())
def test_roundtrip_associate_ac(pdu: AssociateAC) -> None:
    assert roundtrip(pdu) == pdu


@FAST
@given(pst.user_informations())
def test_roundtrip_user_information(info: UserInformation) -> None:
    assert roundtrip(AssociateRQ("A", "B", (), info)) == AssociateRQ("A", "B", (), info)
    assert roundtrip(AssociateAC("A", "B", (), info)) == AssociateAC("A", "B", (), info)


@FAST
@given(pst.p_data_tfs())
def test_roundtrip_p_data_tf(pdu: PDataTF) -> None:
    assert roundtrip(pdu) == pdu


# --- 3. malformed input ----------------------------------------------------------------------


def decode_or_pdu_error(pdu_type: int, body: bytes) -> PDU | PDUError:
    """Decode; the only exception allowed out is PDUError, with an A-ABORT reason."""
    try:
        return decode(pdu_type, body)
    except PDUError as exc:
        assert exc.reason in set(AbortReason)
        assert exc.__traceback__ is not None
        assert exc.__context__ is None
        return exc


@pytest.mark.parametrize("pdu", GOLDEN.values(), ids=GOLDEN.keys())
def test_every_truncation_is_a_pdu_error(pdu: PDU) -> None:
    body = body_of(encode(pdu))
    for cut in range(len(body)):
        result = decode_or_pdu_error(pdu.pdu_type, body[:cut])
        if isinstance(pdu, PDataTF) and isinstance(result, PDataTF):
            # Cut on a PDV boundary: the PDVs before it, a valid P-DATA-TF.
            assert result.pdvs == pdu.pdvs[: len(result.pdvs)]
        else:
            assert isinstance(result, PDUError), cut
            assert result.reason == AbortReason.INVALID_PDU_PARAMETER


@FAST
@given(pst.pdus(), st.data())
def test_truncated_generated_pdus(pdu: PDU, data: st.DataObject) -> None:
    body = body_of(encode(pdu))
    cut = data.draw(st.integers(0, max(0, len(body) - 1)))
    result = decode_or_pdu_error(pdu.pdu_type, body[:cut])
    if not isinstance(pdu, PDataTF) and cut < len(body):
        assert isinstance(result, PDUError)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 0xFF), st.binary(max_size=200))
def test_random_bytes(pdu_type: int, body: bytes) -> None:
    result = decode_or_pdu_error(pdu_type, body)
    if pdu_type not in set(PDUType):
        assert isinstance(result, PDUError)
        assert result.reason == AbortReason.UNRECOGNIZED_PDU


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([0x01, 0x02]), st.binary(min_size=68, max_size=68), st.binary(max_size=200))
def test_random_items_after_valid_fixed_fields(pdu_type: int, fixed: bytes, items: bytes) -> None:
    decode_or_pdu_error(pdu_type, fixed + items)


@FAST
@given(pst.pdus(), st.data())
def test_mutated_pdus(pdu: PDU, data: st.DataObject) -> None:
    body = bytearray(body_of(encode(pdu)))
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["set", "insert", "delete", "length"]))
        at = data.draw(st.integers(0, len(body)))
        if action == "set" and at < len(body):
            body[at] = data.draw(st.integers(0, 255))
        elif action == "insert":
            body[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        elif action == "delete":
            del body[at : at + data.draw(st.integers(1, 4))]
        elif at + 2 <= len(body):
            # Mutate a would-be length field: off by a little or by a lot.
            old = int.from_bytes(body[at : at + 2], "big")
            new = data.draw(st.sampled_from([old - 1, old + 1, 0, 1, 0xFFFF])) & 0xFFFF
            body[at : at + 2] = new.to_bytes(2, "big")
    decode_or_pdu_error(pdu.pdu_type, bytes(body))


def _reason(pdu_type: int, body: bytes) -> int:
    with pytest.raises(PDUError) as info:
        decode(pdu_type, body)
    return info.value.reason


AS = item(0x30, b"1.2")
TS = item(0x40, b"1.2")


def ctx_rq(*subs: bytes, context_id: int = 1) -> bytes:
    return item(0x20, bytes([context_id, 0, 0, 0]) + b"".join(subs))


def ctx_ac(*subs: bytes, context_id: int = 1) -> bytes:
    return item(0x21, bytes([context_id, 0, 0, 0]) + b"".join(subs))


def rq(*items: bytes) -> tuple[int, bytes]:
    return 0x01, _rq_body(*items)


def ac(*items: bytes) -> tuple[int, bytes]:
    return 0x02, _rq_body(*items)


def ui(*subs: bytes) -> bytes:
    return item(0x50, b"".join(subs))


INVALID = AbortReason.INVALID_PDU_PARAMETER
UNEXPECTED = AbortReason.UNEXPECTED_PDU_PARAMETER
UNRECOGNIZED = AbortReason.UNRECOGNIZED_PDU_PARAMETER

REASONS: dict[str, tuple[tuple[int, bytes], AbortReason]] = {
    "unknown-pdu-type-00": ((0x00, b""), AbortReason.UNRECOGNIZED_PDU),
    "unknown-pdu-type-08": ((0x08, bytes(4)), AbortReason.UNRECOGNIZED_PDU),
    "unknown-pdu-type-ff": ((0xFF, b""), AbortReason.UNRECOGNIZED_PDU),
    # fixed-size bodies, too short or too long
    "rj-short": ((0x03, bytes(3)), INVALID),
    "rj-long": ((0x03, bytes(5)), INVALID),
    "release-rq-empty": ((0x05, b""), INVALID),
    "release-rp-long": ((0x06, bytes(6)), INVALID),
    "abort-long": ((0x07, bytes(8)), INVALID),
    "rq-shorter-than-fixed-fields": ((0x01, bytes(67)), INVALID),
    # mandatory and single items
    "no-application-context": (rq(USER), INVALID),
    "no-user-information": (rq(APP, ctx_rq(AS, TS)), INVALID),
    "ac-no-user-information": (ac(APP), INVALID),
    "two-application-contexts": (rq(APP, APP, USER), INVALID),
    "two-user-informations": (rq(APP, USER, USER), INVALID),
    # item framing
    "trailing-partial-item-header": (rq(APP, USER, b"\x10\x00\x00"), INVALID),
    "item-overruns-pdu": (rq(APP, USER, b"\x10\x00\x00\x05abcd"), INVALID),
    "context-shorter-than-fixed": (rq(APP, USER, item(0x20, b"\x01\x00\x00")), INVALID),
    "sub-item-overruns-context": (rq(APP, ctx_rq(AS, TS[:-1]), USER), INVALID),
    # a context item of the other PDU
    "ac-context-in-rq": (rq(APP, ctx_ac(TS), USER), UNEXPECTED),
    "rq-context-in-ac": (ac(APP, ctx_rq(AS, TS), USER), UNEXPECTED),
    # presentation context (RQ) contents
    "rq-even-context-id": (rq(APP, ctx_rq(AS, TS, context_id=2), USER), INVALID),
    "rq-context-id-0": (rq(APP, ctx_rq(AS, TS, context_id=0), USER), INVALID),
    "rq-no-abstract-syntax": (rq(APP, ctx_rq(TS), USER), INVALID),
    "rq-no-transfer-syntax": (rq(APP, ctx_rq(AS), USER), INVALID),
    "rq-two-abstract-syntaxes": (rq(APP, ctx_rq(AS, AS, TS), USER), INVALID),
    "rq-unknown-sub-item": (rq(APP, ctx_rq(AS, TS, item(0x77, b"")), USER), UNRECOGNIZED),
    "rq-misplaced-sub-item": (rq(APP, ctx_rq(AS, TS, item(0x51, bytes(4))), USER), UNEXPECTED),
    # presentation context (AC) contents
    "ac-context-id-0": (ac(APP, ctx_ac(TS, context_id=0), USER), INVALID),
    "ac-two-transfer-syntaxes": (ac(APP, ctx_ac(TS, TS), USER), INVALID),
    "ac-unknown-sub-item": (ac(APP, ctx_ac(item(0x42, b"1")), USER), UNRECOGNIZED),
    "ac-abstract-syntax": (ac(APP, ctx_ac(AS, TS), USER), UNEXPECTED),
    # user information sub-items
    "max-length-3-bytes": (rq(APP, ui(item(0x51, bytes(3)))), INVALID),
    "max-length-twice": (rq(APP, ui(item(0x51, bytes(4)), item(0x51, bytes(4)))), INVALID),
    "impl-class-uid-twice": (rq(APP, ui(item(0x52, b"1"), item(0x52, b"1"))), INVALID),
    "async-ops-5-bytes": (rq(APP, ui(item(0x53, bytes(5)))), INVALID),
    "role-missing-scp": (rq(APP, ui(item(0x54, b"\x00\x031.2\x01"))), INVALID),
    "role-uid-overruns": (rq(APP, ui(item(0x54, b"\x00\x091.2\x01\x01"))), INVALID),
    "role-extra-byte": (rq(APP, ui(item(0x54, b"\x00\x031.2\x01\x01\x01"))), INVALID),
    "sop-extended-no-length": (rq(APP, ui(item(0x56, b"\x00"))), INVALID),
    "common-extended-no-related": (rq(APP, ui(item(0x57, b"\x00\x011\x00\x012"))), INVALID),
    "common-extended-related-overruns": (
        rq(APP, ui(item(0x57, b"\x00\x011\x00\x012\x00\x03\x00\x05abc"))),
        INVALID,
    ),
    "common-extended-extra-byte": (
        rq(APP, ui(item(0x57, b"\x00\x011\x00\x012\x00\x00X"))),
        INVALID,
    ),
    "identity-rq-1-byte": (rq(APP, ui(item(0x58, b"\x01"))), INVALID),
    "identity-rq-no-secondary": (rq(APP, ui(item(0x58, b"\x01\x00\x00\x01u"))), INVALID),
    "identity-rq-extra-byte": (rq(APP, ui(item(0x58, b"\x01\x00\x00\x01u\x00\x00!"))), INVALID),
    "identity-ac-overruns": (ac(APP, ui(item(0x59, b"\x00\x05abc"))), INVALID),
    "identity-ac-extra-byte": (ac(APP, ui(item(0x59, b"\x00\x01ab"))), INVALID),
    # P-DATA-TF
    "p-data-empty": ((0x04, b""), INVALID),
    "pdv-header-truncated": ((0x04, b"\x00\x00\x00\x01\x01"), INVALID),
    "pdv-length-0": ((0x04, b"\x00\x00\x00\x00\x01\x00"), INVALID),
    "pdv-length-1": ((0x04, b"\x00\x00\x00\x01\x01\x00"), INVALID),
    "pdv-overruns": ((0x04, b"\x00\x00\x00\x03\x01\x00"), INVALID),
    "pdv-huge-length": ((0x04, b"\xff\xff\xff\xff\x01\x00"), INVALID),
    "pdv-even-context-id": ((0x04, b"\x00\x00\x00\x02\x02\x00"), INVALID),
    "pdv-trailing-byte": ((0x04, b"\x00\x00\x00\x02\x01\x00\x00"), INVALID),
}


@pytest.mark.parametrize(("pdu", "reason"), REASONS.values(), ids=REASONS.keys())
def test_abort_reasons(pdu: tuple[int, bytes], reason: AbortReason) -> None:
    assert _reason(*pdu) == reason


# --- 4. encoding misuse ----------------------------------------------------------------------


_UI = UserInformation()


@pytest.mark.parametrize(
    "pdu",
    [
        AssociateRQ("A" * 17, "B", (), _UI),
        AssociateRQ("A", "\u20ac", (), _UI),
        AssociateRQ("A", "B", (PresentationContextRQ(2, "1", ("1",)),), _UI),
        AssociateRQ("A", "B", (PresentationContextRQ(0, "1", ("1",)),), _UI),
        AssociateRQ("A", "B", (PresentationContextRQ(257, "1", ("1",)),), _UI),
        AssociateRQ("A", "B", (PresentationContextRQ(1, "1", ()),), _UI),
        AssociateRQ("A", "B", (PresentationContextRQ(1, "1" * 70000, ("1",)),), _UI),
        AssociateRQ("A", "B", (), _UI, protocol_version=0x10000),
        AssociateRQ("A", "B", (), UserInformation(max_length=2**32)),
        AssociateRQ("A", "B", (), UserInformation(max_length=-1)),
        AssociateRQ("A", "B", (), UserInformation(implementation_version_name="")),
        AssociateRQ("A", "B", (), UserInformation(implementation_version_name="X" * 17)),
        AssociateRQ("A", "B", (), UserInformation(async_ops=AsyncOpsWindow(70000, 1))),
        AssociateRQ("A", "B", (), UserInformation(unknown=((0x51, b"\x00\x00\x00\x01"),))),
        AssociateRQ("A", "B", (), UserInformation(unknown=((0x100, b""),))),
        AssociateRQ(
            "A", "B", (), UserInformation(user_identity_rq=UserIdentityRQ(256, True, b"u"))
        ),
        AssociateRQ(
            "A", "B", (), UserInformation(user_identity_rq=UserIdentityRQ(1, True, bytes(70000)))
        ),
        AssociateRQ(
            "A",
            "B",
            (),
            UserInformation(sop_class_extended=(SOPClassExtended("1", bytes(65535)),)),
        ),
        AssociateAC("A", "B", (PresentationContextAC(4, 0, "1"),), _UI),
        AssociateAC("A", "B", (PresentationContextAC(1, 256, "1"),), _UI),
        AssociateRJ(1, 1, 256),
        Abort(-1, 0),
        PDataTF(()),
        PDataTF((PDV(2, 0, b""),)),
        PDataTF((PDV(1, 256, b""),)),
    ],
)
def test_encoding_misuse_is_a_value_error(pdu: PDU) -> None:
    with pytest.raises(ValueError):
        encode(pdu)


def test_encode_rejects_non_pdus() -> None:
    with pytest.raises(TypeError):
        encode(object())  # type: ignore[arg-type]


def test_pdu_error_is_a_value_error_with_a_reason() -> None:
    assert issubclass(PDUError, ValueError)
    assert PDUError("x").reason == AbortReason.INVALID_PDU_PARAMETER
