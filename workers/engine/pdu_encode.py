"""Encoding Upper Layer PDUs (PS3.8 section 9.3) to their wire form."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from .pdu_records import (
    _ABORT,
    _ABSTRACT_SYNTAX,
    _AE_TITLE_LENGTH,
    _APPLICATION_CONTEXT,
    _ASSOCIATE_FIXED,
    _ASYNC_OPS_WINDOW,
    _CONTEXT_FIXED,
    _IMPLEMENTATION_CLASS_UID,
    _IMPLEMENTATION_VERSION_NAME,
    _ITEM_HEADER,
    _MAX_ITEM_LENGTH,
    _MAX_VERSION_NAME_LENGTH,
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
    _USER_IDENTITY_AC,
    _USER_IDENTITY_RQ,
    _USER_INFO_SUB_ITEM_TYPES,
    _USER_INFORMATION,
    PDU,
    Abort,
    AssociateAC,
    AssociateRJ,
    AssociateRQ,
    PDataTF,
    PresentationContextAC,
    PresentationContextRQ,
    ReleaseRP,
    ReleaseRQ,
    UserInformation,
)

# --- encoding ----------------------------------------------------------------------------
#
# Encoding is strict: it raises ValueError for local misuse (values that do not fit
# their fields, even context IDs, ...). Text is encoded as Latin-1, a superset of the
# ISO 646 repertoire, so that whatever decode() returned can be sent back unchanged.


def _encode_text(value: str, what: str) -> bytes:
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {value!r} is not ISO 646 / Latin-1 text") from None


def _encode_ae_title(value: str, what: str) -> bytes:
    raw = _encode_text(value, what)
    if len(raw) > _AE_TITLE_LENGTH:
        raise ValueError(f"{what} {value!r} is longer than 16 characters")
    return raw.ljust(_AE_TITLE_LENGTH, b" ")


def _item(item_type: int, value: bytes) -> bytes:
    if len(value) > _MAX_ITEM_LENGTH:
        raise ValueError(f"item 0x{item_type:02X}: {len(value)} bytes do not fit in an item")
    return _ITEM_HEADER.pack(item_type, len(value)) + value


def _prefix(value: bytes, what: str) -> bytes:
    if len(value) > _MAX_ITEM_LENGTH:
        raise ValueError(f"{what}: {len(value)} bytes do not fit a 2-byte length")
    return _U16.pack(len(value)) + value


def _check_context_id(context_id: int, what: str) -> None:
    if not (1 <= context_id <= 255 and context_id & 1):
        raise ValueError(f"{what}: presentation context ID {context_id} is not odd in 1..255")


def _encode_context_rq(context: PresentationContextRQ) -> bytes:
    _check_context_id(context.id, "presentation context (RQ)")
    if not context.transfer_syntaxes:
        raise ValueError(f"presentation context {context.id} proposes no transfer syntax")
    parts = [
        _CONTEXT_FIXED.pack(context.id, 0),
        _item(_ABSTRACT_SYNTAX, _encode_text(context.abstract_syntax, "abstract syntax")),
    ]
    for uid in context.transfer_syntaxes:
        parts.append(_item(_TRANSFER_SYNTAX, _encode_text(uid, "transfer syntax")))
    return _item(_PRESENTATION_CONTEXT_RQ, b"".join(parts))


def _encode_context_ac(context: PresentationContextAC) -> bytes:
    _check_context_id(context.id, "presentation context (AC)")
    # The transfer syntax sub-item is always sent, empty if need be (PS3.8 9.3.3.2).
    transfer_syntax = _encode_text(context.transfer_syntax, "transfer syntax")
    return _item(
        _PRESENTATION_CONTEXT_AC,
        _CONTEXT_FIXED.pack(context.id, context.result) + _item(_TRANSFER_SYNTAX, transfer_syntax),
    )


def _encode_user_information(info: UserInformation) -> bytes:
    """Sub-items in increasing item-type order, then the unknown ones as given."""
    parts: list[bytes] = []
    if info.max_length is not None:
        parts.append(_item(_MAXIMUM_LENGTH, _U32.pack(info.max_length)))
    if info.implementation_class_uid is not None:
        uid = _encode_text(info.implementation_class_uid, "implementation class UID")
        parts.append(_item(_IMPLEMENTATION_CLASS_UID, uid))
    if info.async_ops is not None:
        window = _TWO_U16.pack(info.async_ops.invoked, info.async_ops.performed)
        parts.append(_item(_ASYNC_OPS_WINDOW, window))
    for role in info.roles:
        uid = _prefix(_encode_text(role.sop_class_uid, "role SOP class UID"), "role UID")
        flags = _TWO_U8.pack(bool(role.scu_role), bool(role.scp_role))
        parts.append(_item(_ROLE_SELECTION, uid + flags))
    if info.implementation_version_name is not None:
        name = _encode_text(info.implementation_version_name, "implementation version name")
        if not 1 <= len(name) <= _MAX_VERSION_NAME_LENGTH:
            raise ValueError(
                f"implementation version name {info.implementation_version_name!r} "
                "must be 1 to 16 characters"
            )
        parts.append(_item(_IMPLEMENTATION_VERSION_NAME, name))
    for ext in info.sop_class_extended:
        uid = _prefix(_encode_text(ext.sop_class_uid, "SOP class UID"), "SOP class UID")
        parts.append(_item(_SOP_CLASS_EXTENDED, uid + bytes(ext.info)))
    for common in info.sop_class_common_extended:
        related = b"".join(
            _prefix(_encode_text(uid, "related general SOP class UID"), "related UID")
            for uid in common.related_general_sop_classes
        )
        value = (
            _prefix(_encode_text(common.sop_class_uid, "SOP class UID"), "SOP class UID")
            + _prefix(_encode_text(common.service_class_uid, "service class UID"), "UID")
            + _prefix(related, "related general SOP class identification")
        )
        # The header's second byte is the sub-item-version, 0 (PS3.7 Table D.3-12).
        parts.append(_item(_SOP_CLASS_COMMON_EXTENDED, value))
    if info.user_identity_rq is not None:
        identity = info.user_identity_rq
        value = (
            _TWO_U8.pack(identity.type, bool(identity.positive_response_requested))
            + _prefix(bytes(identity.primary), "user identity primary field")
            + _prefix(bytes(identity.secondary), "user identity secondary field")
        )
        parts.append(_item(_USER_IDENTITY_RQ, value))
    if info.user_identity_ac is not None:
        response = _prefix(bytes(info.user_identity_ac.server_response), "server response")
        parts.append(_item(_USER_IDENTITY_AC, response))
    for item_type, value in info.unknown:
        if item_type in _USER_INFO_SUB_ITEM_TYPES:
            raise ValueError(f"unknown sub-item 0x{item_type:02X} is a known type")
        parts.append(_item(item_type, bytes(value)))
    return _item(_USER_INFORMATION, b"".join(parts))


def _encode_associate(pdu: AssociateRQ | AssociateAC) -> list[bytes]:
    parts = [
        b"",  # the PDU header, filled in by encode()
        _ASSOCIATE_FIXED.pack(
            pdu.protocol_version,
            _encode_ae_title(pdu.called_ae, "called AE title"),
            _encode_ae_title(pdu.calling_ae, "calling AE title"),
        ),
        _item(
            _APPLICATION_CONTEXT,
            _encode_text(pdu.application_context, "application context name"),
        ),
    ]
    if isinstance(pdu, AssociateRQ):
        parts.extend(_encode_context_rq(context) for context in pdu.contexts)
    else:
        parts.extend(_encode_context_ac(context) for context in pdu.contexts)
    parts.append(_encode_user_information(pdu.user_info))
    return parts


def _encode_associate_rj(pdu: AssociateRJ) -> list[bytes]:
    return [b"", _REJECT.pack(pdu.result, pdu.source, pdu.reason)]


def _encode_p_data_tf(pdu: PDataTF) -> list[bytes]:
    if not pdu.pdvs:
        raise ValueError("a P-DATA-TF carries one or more presentation data values")
    parts = [b""]
    for pdv in pdu.pdvs:
        _check_context_id(pdv.context_id, "PDV")
        parts.append(_PDV_HEADER.pack(len(pdv.data) + 2, pdv.context_id, pdv.control))
        parts.append(pdv.data)
    return parts


def _encode_release(pdu: ReleaseRQ | ReleaseRP) -> list[bytes]:
    return [b"", _RELEASE_BODY]


def _encode_abort(pdu: Abort) -> list[bytes]:
    return [b"", _ABORT.pack(pdu.source, pdu.reason)]


_ENCODERS: dict[type, Callable[[Any], list[bytes]]] = {
    AssociateRQ: _encode_associate,
    AssociateAC: _encode_associate,
    AssociateRJ: _encode_associate_rj,
    PDataTF: _encode_p_data_tf,
    ReleaseRQ: _encode_release,
    ReleaseRP: _encode_release,
    Abort: _encode_abort,
}


def encode(pdu: PDU) -> bytes:
    """Encode ``pdu`` to its complete wire form, header included.

    Raises ValueError when a value does not fit its field or breaks a rule of the
    standard this side must keep (AE title over 16 characters, even context ID, ...).
    """
    kind = type(pdu)
    ac = pdu if type(pdu) is AssociateAC else None
    if ac is not None:
        # The same answer again (acse.NegotiationCache gives one object per distinct
        # request): its encoding too. Keyed by value (the hash is computed once per
        # object), so equal answers share one encoding.
        known = _AC_MEMO.get(ac)
        if known is not None:
            return known
    encoder = _ENCODERS.get(kind)
    if encoder is None:
        raise TypeError(f"not a PDU: {pdu!r}")
    try:
        parts = encoder(pdu)
        # parts[0] is the header's place: one copy of every fragment, in join().
        parts[0] = _PDU_HEADER.pack(pdu.pdu_type, sum(map(len, parts)))
    except struct.error as exc:
        raise ValueError(f"{type(pdu).__name__}: a value does not fit its field ({exc})") from None
    raw = b"".join(parts)
    if ac is not None:
        if len(_AC_MEMO) >= _AC_MEMO_ENTRIES:
            del _AC_MEMO[next(iter(_AC_MEMO))]  # the oldest
        _AC_MEMO[ac] = raw
    return raw


#: Encoded A-ASSOCIATE-ACs by value (see encode()).
_AC_MEMO: dict[AssociateAC, bytes] = {}
_AC_MEMO_ENTRIES = 64
