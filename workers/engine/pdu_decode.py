"""Decoding Upper Layer PDUs (PS3.8 section 9.3): strict where the standard is strict,
lenient where it asks to be (see :mod:`workers.engine.pdu`)."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import TypeVar

from .pdu_records import (
    _ABORT,
    _ABSTRACT_SYNTAX,
    _APPLICATION_CONTEXT,
    _ASSOCIATE_FIXED,
    _ASYNC_OPS_WINDOW,
    _CONTEXT_FIXED,
    _CONTEXT_ITEM_TYPES,
    _IMPLEMENTATION_CLASS_UID,
    _IMPLEMENTATION_VERSION_NAME,
    _ITEM_HEADER,
    _KNOWN_ITEM_TYPES,
    _MAXIMUM_LENGTH,
    _PDU_HEADER,
    _PDV_HEADER,
    _PRESENTATION_CONTEXT_AC,
    _PRESENTATION_CONTEXT_RQ,
    _REJECT,
    _RELEASE_BODY,
    _ROLE_SELECTION,
    _SOP_CLASS_COMMON_EXTENDED,
    _SOP_CLASS_EXTENDED,
    _TRANSFER_SYNTAX,
    _TWO_U8,
    _TWO_U16,
    _U16,
    _U32,
    _USER_IDENTITY_RQ,
    _USER_INFO_SUB_ITEM_TYPES,
    _USER_INFORMATION,
    PDU,
    PDV,
    Abort,
    AbortReason,
    AssociateAC,
    AssociateRJ,
    AssociateRQ,
    AsyncOpsWindow,
    PDataTF,
    PDUError,
    PDUType,
    PresentationContextAC,
    PresentationContextRQ,
    ReleaseRP,
    ReleaseRQ,
    RoleSelection,
    SOPClassCommonExtended,
    SOPClassExtended,
    UserIdentityAC,
    UserIdentityRQ,
    UserInformation,
)

_C = TypeVar("_C", PresentationContextRQ, PresentationContextAC)


def parse_header(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int]:
    """Return ``(pdu_type, pdu_length)`` from the 6-byte PDU header at ``offset``.

    The caller checks that six bytes are available; the type is not validated here
    (:func:`decode` does that).
    """
    pdu_type, length = _PDU_HEADER.unpack_from(data, offset)
    return pdu_type, length


# --- decoding helpers ----------------------------------------------------------------
#
# The association PDUs are decoded from one ``bytes`` object with (start, end) offsets:
# no slice is made until a value is extracted, and a bytes slice decodes faster than a
# memoryview. Every length is checked before it is used.

_Body = bytes | bytearray | memoryview


def _uid(data: bytes, start: int, end: int) -> str:
    # Latin-1 maps every byte to one character, so decoding never fails; on the ISO 646
    # repertoire the standard prescribes (PS3.8 Annex F) it is identical to ASCII.
    # UIDs are sent unpadded (Annex F), but some implementations pad odd lengths with a
    # NUL (the PS3.5 data set rule) or a space.
    return data[start:end].decode("latin-1").rstrip("\x00 ")


def _ae_title(value: bytes) -> str:
    # PS3.8 Table 9-11: leading and trailing spaces are not significant. NULs are
    # stripped too: C implementations sometimes send a NUL-terminated title.
    return value.decode("latin-1").strip(" \x00")


def _walk(data: bytes, start: int, end: int, where: str) -> list[tuple[int, int, int]]:
    """Split ``data[start:end]`` into items: (item-type, value start, value end)."""
    items: list[tuple[int, int, int]] = []
    offset = start
    while offset < end:
        if end - offset < 4:
            raise PDUError(f"{where}: {end - offset} trailing byte(s), no room for an item")
        item_type, length = _ITEM_HEADER.unpack_from(data, offset)
        offset += 4
        stop = offset + length
        if stop > end:
            raise PDUError(
                f"{where}: item 0x{item_type:02X} of length {length} overruns its "
                f"container by {stop - end} byte(s)"
            )
        items.append((item_type, offset, stop))
        offset = stop
    return items


def _field(data: bytes, offset: int, end: int, where: str) -> tuple[int, int]:
    """Locate a field preceded by a 2-byte length at ``offset``: (start, end)."""
    if end - offset < 2:
        raise PDUError(f"{where}: length field missing")
    (length,) = _U16.unpack_from(data, offset)
    offset += 2
    stop = offset + length
    if stop > end:
        raise PDUError(f"{where}: field length {length} overruns its sub-item")
    return offset, stop


def _no_more(offset: int, end: int, where: str) -> None:
    if offset != end:
        raise PDUError(f"{where}: {end - offset} byte(s) after its last field")


def _unexpected(item_type: int, where: str) -> PDUError:
    # A known item type in the wrong place is "unexpected", anything else
    # "unrecognized" (PS3.8 Table 9-26).
    if item_type in _KNOWN_ITEM_TYPES:
        return PDUError(
            f"unexpected item 0x{item_type:02X} in {where}",
            AbortReason.UNEXPECTED_PDU_PARAMETER,
        )
    return PDUError(
        f"unrecognized item 0x{item_type:02X} in {where}",
        AbortReason.UNRECOGNIZED_PDU_PARAMETER,
    )


def _check_context_id_received(context_id: int, where: str) -> None:
    # PS3.8 9.3.2.2: "odd integers between 1 and 255".
    if not context_id & 1:
        raise PDUError(f"{where}: presentation context ID {context_id} is not odd")


# --- decoding: items -------------------------------------------------------------------


def _decode_context_rq(data: bytes, start: int, end: int) -> PresentationContextRQ:
    """Presentation context item, RQ form (PS3.8 Table 9-13)."""
    where = "presentation context (RQ) item"
    if end - start < 4:
        raise PDUError(f"{where}: {end - start} bytes, shorter than its 4 fixed bytes")
    context_id = data[start]
    _check_context_id_received(context_id, where)
    abstract_syntax: str | None = None
    transfer_syntaxes: list[str] = []
    # The sub-item walk is inlined: a storescu proposes a hundred contexts or more.
    offset = start + 4
    while offset < end:
        if end - offset < 4:
            raise PDUError(f"{where} {context_id}: {end - offset} trailing byte(s)")
        item_type, length = _ITEM_HEADER.unpack_from(data, offset)
        offset += 4
        stop = offset + length
        if stop > end:
            raise PDUError(f"{where} {context_id}: sub-item 0x{item_type:02X} overruns it")
        if item_type == _TRANSFER_SYNTAX:
            transfer_syntaxes.append(data[offset:stop].decode("latin-1").rstrip("\x00 "))
        elif item_type == _ABSTRACT_SYNTAX:
            if abstract_syntax is not None:
                raise PDUError(f"{where} {context_id}: more than one abstract syntax")
            abstract_syntax = data[offset:stop].decode("latin-1").rstrip("\x00 ")
        else:
            raise _unexpected(item_type, f"{where} {context_id}")
        offset = stop
    if abstract_syntax is None:
        raise PDUError(f"{where} {context_id}: no abstract syntax sub-item")
    if not transfer_syntaxes:
        raise PDUError(f"{where} {context_id}: no transfer syntax sub-item")
    return PresentationContextRQ(context_id, abstract_syntax, tuple(transfer_syntaxes))


def _decode_context_ac(data: bytes, start: int, end: int) -> PresentationContextAC:
    """Presentation context item, AC form (PS3.8 Table 9-18).

    A missing transfer syntax sub-item is read as an empty one: some acceptors leave
    it out of rejected contexts, and it is not tested unless the result is acceptance.
    """
    where = "presentation context (AC) item"
    if end - start < 4:
        raise PDUError(f"{where}: {end - start} bytes, shorter than its 4 fixed bytes")
    context_id, result = _CONTEXT_FIXED.unpack_from(data, start)
    _check_context_id_received(context_id, where)
    transfer_syntax: str | None = None
    for item_type, value_start, value_end in _walk(data, start + 4, end, where):
        if item_type != _TRANSFER_SYNTAX:
            raise _unexpected(item_type, f"{where} {context_id}")
        if transfer_syntax is not None:
            raise PDUError(f"{where} {context_id}: more than one transfer syntax")
        transfer_syntax = _uid(data, value_start, value_end)
    return PresentationContextAC(context_id, result, transfer_syntax or "")


def _decode_role(data: bytes, start: int, end: int) -> RoleSelection:
    """SCP/SCU role selection sub-item (PS3.7 Table D.3-9)."""
    where = "role selection sub-item"
    uid_start, uid_end = _field(data, start, end, where)
    if end - uid_end != 2:
        raise PDUError(f"{where}: SCU/SCP role fields malformed")
    scu, scp = _TWO_U8.unpack_from(data, uid_end)
    # Values other than 0 and 1 are invalid; read leniently as "supported".
    return RoleSelection(_uid(data, uid_start, uid_end), bool(scu), bool(scp))


def _decode_sop_extended(data: bytes, start: int, end: int) -> SOPClassExtended:
    """SOP class extended negotiation sub-item (PS3.7 Table D.3-11)."""
    uid_start, uid_end = _field(data, start, end, "SOP class extended negotiation sub-item")
    return SOPClassExtended(_uid(data, uid_start, uid_end), data[uid_end:end])


def _decode_sop_common_extended(data: bytes, start: int, end: int) -> SOPClassCommonExtended:
    """SOP class common extended negotiation sub-item (PS3.7 Table D.3-12).

    The sub-item-version (the item header's second byte) is 0 and not tested.
    """
    where = "SOP class common extended negotiation sub-item"
    sop_start, sop_end = _field(data, start, end, where)
    service_start, service_end = _field(data, sop_end, end, where)
    related_start, related_end = _field(data, service_end, end, where)
    _no_more(related_end, end, where)
    related: list[str] = []
    offset = related_start
    while offset < related_end:
        uid_start, offset = _field(data, offset, related_end, f"{where}, related SOP class")
        related.append(_uid(data, uid_start, offset))
    return SOPClassCommonExtended(
        _uid(data, sop_start, sop_end), _uid(data, service_start, service_end), tuple(related)
    )


def _decode_user_identity_rq(data: bytes, start: int, end: int) -> UserIdentityRQ:
    """User identity negotiation sub-item, RQ form (PS3.7 Table D.3-14)."""
    where = "user identity (RQ) sub-item"
    if end - start < 2:
        raise PDUError(f"{where}: truncated")
    identity_type, response_requested = _TWO_U8.unpack_from(data, start)
    primary_start, primary_end = _field(data, start + 2, end, where)
    secondary_start, secondary_end = _field(data, primary_end, end, where)
    _no_more(secondary_end, end, where)
    return UserIdentityRQ(
        identity_type,
        bool(response_requested),
        data[primary_start:primary_end],
        data[secondary_start:secondary_end],
    )


def _decode_user_identity_ac(data: bytes, start: int, end: int) -> UserIdentityAC:
    """User identity negotiation sub-item, AC form (PS3.7 Table D.3-15)."""
    where = "user identity (AC) sub-item"
    response_start, response_end = _field(data, start, end, where)
    _no_more(response_end, end, where)
    return UserIdentityAC(data[response_start:response_end])


def _decode_user_information(data: bytes, start: int, end: int) -> UserInformation:
    """User information item (PS3.8 9.3.2.3, Annex D; PS3.7 D.3.3).

    Sub-items that may appear once raise PDUError when repeated. The maximum length
    sub-item is mandatory, but its absence is left to the engine (``None``).
    """
    max_length: int | None = None
    implementation_class_uid: str | None = None
    implementation_version_name: str | None = None
    async_ops: AsyncOpsWindow | None = None
    user_identity_rq: UserIdentityRQ | None = None
    user_identity_ac: UserIdentityAC | None = None
    roles: list[RoleSelection] = []
    extended: list[SOPClassExtended] = []
    common_extended: list[SOPClassCommonExtended] = []
    unknown: list[tuple[int, bytes]] = []
    seen: set[int] = set()
    for item_type, value_start, value_end in _walk(data, start, end, "user information item"):
        if item_type == _ROLE_SELECTION:
            roles.append(_decode_role(data, value_start, value_end))
            continue
        if item_type == _SOP_CLASS_EXTENDED:
            extended.append(_decode_sop_extended(data, value_start, value_end))
            continue
        if item_type == _SOP_CLASS_COMMON_EXTENDED:
            common_extended.append(_decode_sop_common_extended(data, value_start, value_end))
            continue
        if item_type not in _USER_INFO_SUB_ITEM_TYPES:
            # PS3.7 D.3.3: unrecognised sub-items are ignored; kept for the handlers.
            unknown.append((item_type, data[value_start:value_end]))
            continue
        if item_type in seen:
            raise PDUError(f"user information item: sub-item 0x{item_type:02X} repeated")
        seen.add(item_type)
        length = value_end - value_start
        if item_type == _MAXIMUM_LENGTH:
            if length != 4:
                raise PDUError(f"maximum length sub-item: length {length}, not 4")
            (max_length,) = _U32.unpack_from(data, value_start)
        elif item_type == _IMPLEMENTATION_CLASS_UID:
            implementation_class_uid = _uid(data, value_start, value_end)
        elif item_type == _ASYNC_OPS_WINDOW:
            if length != 4:
                raise PDUError(f"asynchronous operations window sub-item: length {length}")
            async_ops = AsyncOpsWindow(*_TWO_U16.unpack_from(data, value_start))
        elif item_type == _IMPLEMENTATION_VERSION_NAME:
            # 1 to 16 characters by the standard; longer or empty names are accepted.
            # Trailing NULs and spaces are trimmed as for UIDs.
            implementation_version_name = _uid(data, value_start, value_end)
        elif item_type == _USER_IDENTITY_RQ:
            user_identity_rq = _decode_user_identity_rq(data, value_start, value_end)
        else:  # _USER_IDENTITY_AC
            user_identity_ac = _decode_user_identity_ac(data, value_start, value_end)
    return UserInformation(
        max_length=max_length,
        implementation_class_uid=implementation_class_uid,
        implementation_version_name=implementation_version_name,
        async_ops=async_ops,
        roles=tuple(roles),
        sop_class_extended=tuple(extended),
        sop_class_common_extended=tuple(common_extended),
        user_identity_rq=user_identity_rq,
        user_identity_ac=user_identity_ac,
        unknown=tuple(unknown),
    )


# --- decoding: PDUs ------------------------------------------------------------------


def _decode_associate(
    body: _Body,
    context_type: int,
    decode_context: Callable[[bytes, int, int], _C],
) -> tuple[int, str, str, tuple[_C, ...], UserInformation, str]:
    """Fixed fields and variable items shared by A-ASSOCIATE-RQ and -AC."""
    # One copy at most (none for bytes): a few kilobytes, and no view of the caller's
    # buffer outlives this call.
    data = body if type(body) is bytes else bytes(body)
    end = len(data)
    if end < _ASSOCIATE_FIXED.size:
        raise PDUError(f"body of {end} bytes, shorter than its 68 fixed bytes")
    version, called, calling = _ASSOCIATE_FIXED.unpack_from(data)
    application_context: str | None = None
    user_info: UserInformation | None = None
    contexts: list[_C] = []
    for item_type, start, stop in _walk(data, _ASSOCIATE_FIXED.size, end, "variable items"):
        if item_type == context_type:
            contexts.append(decode_context(data, start, stop))
        elif item_type == _APPLICATION_CONTEXT:
            if application_context is not None:
                raise PDUError("more than one application context item")
            application_context = _uid(data, start, stop)
        elif item_type == _USER_INFORMATION:
            if user_info is not None:
                raise PDUError("more than one user information item")
            user_info = _decode_user_information(data, start, stop)
        elif item_type in _CONTEXT_ITEM_TYPES:
            raise _unexpected(item_type, "the variable items")
        # Any other item type is ignored and skipped (PS3.8 9.3.1).
    if application_context is None:
        raise PDUError("no application context item")
    if user_info is None:
        raise PDUError("no user information item")
    return (
        version,
        _ae_title(called),
        _ae_title(calling),
        tuple(contexts),
        user_info,
        application_context,
    )


#: A-ASSOCIATE-RQs decoded already, by body: a requestor that associates again and
#: again sends the same request, and decoding it is much of the cost of answering it.
#: The PDU classes are frozen, so one object serves every connection that sends those
#: bytes. Bounded (entries and body size: the bytes come from peers); requests with a
#: user identity (passcodes) are not kept.
_RQ_MEMO: dict[bytes, AssociateRQ] = {}
_RQ_MEMO_ENTRIES = 64
_RQ_MEMO_MAX_BODY = 16 * 1024


def _decode_associate_rq(body: _Body) -> AssociateRQ:
    key = bytes(body) if len(body) <= _RQ_MEMO_MAX_BODY else None
    if key is not None:
        known = _RQ_MEMO.get(key)
        if known is not None:
            return known
    version, called, calling, contexts, user_info, application_context = _decode_associate(
        body, _PRESENTATION_CONTEXT_RQ, _decode_context_rq
    )
    rq = AssociateRQ(called, calling, contexts, user_info, application_context, version)
    if key is not None and user_info.user_identity_rq is None:
        if len(_RQ_MEMO) >= _RQ_MEMO_ENTRIES:
            del _RQ_MEMO[next(iter(_RQ_MEMO))]  # the oldest
        _RQ_MEMO[key] = rq
    return rq


def _decode_associate_ac(body: _Body) -> AssociateAC:
    version, called, calling, contexts, user_info, application_context = _decode_associate(
        body, _PRESENTATION_CONTEXT_AC, _decode_context_ac
    )
    return AssociateAC(called, calling, contexts, user_info, application_context, version)


def _check_fixed_length(body: _Body, length: int) -> None:
    if len(body) != length:
        raise PDUError(f"body of {len(body)} bytes, expected {length}")


def _decode_associate_rj(body: _Body) -> AssociateRJ:
    _check_fixed_length(body, _REJECT.size)
    return AssociateRJ(*_REJECT.unpack_from(body))


def iter_pdvs(body: bytes | bytearray | memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """Walk the PDV items of a P-DATA-TF body in place (PS3.8 9.3.5.1, Annex E.2).

    Yields ``(context_id, control, fragment)`` with ``fragment`` a view into ``body``
    (nothing is copied; release the views before resizing a ``bytearray``). Raises
    :class:`PDUError` on reaching a malformed item, after yielding the ones before it,
    and for a body without any PDV ("one or more" per PS3.8 Table 9-22).
    """
    view = memoryview(body)
    if view.format != "B":
        view = view.cast("B")
    end = len(view)
    if not end:
        raise PDUError("P-DATA-TF without any presentation data value item")
    offset = 0
    while offset < end:
        if end - offset < _PDV_HEADER.size:
            raise PDUError(f"{end - offset} trailing byte(s), too short for a PDV item")
        length, context_id, control = _PDV_HEADER.unpack_from(view, offset)
        if length < 2:
            raise PDUError(f"PDV item length {length} leaves no room for its header")
        stop = offset + 4 + length
        if stop > end:
            raise PDUError(f"PDV item of length {length} overruns the PDU by {stop - end}")
        _check_context_id_received(context_id, "PDV item")
        yield context_id, control, view[offset + _PDV_HEADER.size : stop]
        offset = stop


def _decode_p_data_tf(body: _Body) -> PDataTF:
    return PDataTF(tuple(PDV(cid, ctl, bytes(data)) for cid, ctl, data in iter_pdvs(body)))


def _decode_release_rq(body: _Body) -> ReleaseRQ:
    _check_fixed_length(body, len(_RELEASE_BODY))
    return ReleaseRQ()


def _decode_release_rp(body: _Body) -> ReleaseRP:
    _check_fixed_length(body, len(_RELEASE_BODY))
    return ReleaseRP()


def _decode_abort(body: _Body) -> Abort:
    _check_fixed_length(body, _ABORT.size)
    return Abort(*_ABORT.unpack_from(body))


_DECODERS: dict[int, tuple[str, Callable[[_Body], PDU]]] = {
    PDUType.ASSOCIATE_RQ: ("A-ASSOCIATE-RQ", _decode_associate_rq),
    PDUType.ASSOCIATE_AC: ("A-ASSOCIATE-AC", _decode_associate_ac),
    PDUType.ASSOCIATE_RJ: ("A-ASSOCIATE-RJ", _decode_associate_rj),
    PDUType.P_DATA_TF: ("P-DATA-TF", _decode_p_data_tf),
    PDUType.RELEASE_RQ: ("A-RELEASE-RQ", _decode_release_rq),
    PDUType.RELEASE_RP: ("A-RELEASE-RP", _decode_release_rp),
    PDUType.ABORT: ("A-ABORT", _decode_abort),
}


def decode(pdu_type: int, body: bytes | bytearray | memoryview) -> PDU:
    """Decode one PDU from its type and body (the bytes after the 6-byte header).

    Raises :class:`PDUError` for anything malformed; an unknown ``pdu_type`` raises
    with reason UNRECOGNIZED_PDU. The result holds no reference to ``body``, and
    neither does a raised error (so a ``bytearray`` may be resized in the handler).
    """
    entry = _DECODERS.get(pdu_type)
    if entry is None:
        raise PDUError(f"unrecognized PDU type {pdu_type!r}", AbortReason.UNRECOGNIZED_PDU)
    name, decoder = entry
    if isinstance(body, memoryview) and body.format != "B":
        body = body.cast("B")  # so that len() counts bytes
    try:
        return decoder(body)
    except PDUError as exc:
        error = PDUError(f"{name}: {exc}", exc.reason)
    except (struct.error, IndexError, ValueError) as exc:
        # Every length is checked before it is used, so this is a bug here; a peer
        # must still only ever cause a PDUError.
        error = PDUError(f"{name}: malformed ({exc})")
    # Raised outside the except clauses, a fresh error has no traceback into the
    # decoders' frames (which may hold views of ``body``) and no chained context.
    del body
    raise error
