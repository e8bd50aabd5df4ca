"""Convert between :mod:`workers.engine.pdu` dataclasses and pynetdicom's PDU objects.

pynetdicom is an independent implementation of the same wire format; tests use it
as the other side of golden-vector checks: ``to_pynetdicom(x).encode()`` is what a
peer would send for ``x``, and ``from_pynetdicom(pynetdicom_decode(data))`` is what a
peer understood from ``data``.

The user-information sub-items are given to pynetdicom in the order this codec
encodes them (increasing item type), so both encodings of the same PDU are meant to
be byte-identical. The one known exception is an empty transfer syntax in an AC
presentation context: pynetdicom cannot encode an empty transfer syntax sub-item, so
the context goes without one (``pynetdicom_bytes_identical`` says when).
"""

from __future__ import annotations

from typing import Any

from pynetdicom import pdu as pn
from pynetdicom import pdu_items as pi

from workers.engine.pdu import (
    PDU,
    PDV,
    Abort,
    AssociateAC,
    AssociateRJ,
    AssociateRQ,
    AsyncOpsWindow,
    PDataTF,
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

__all__ = [
    "from_pynetdicom",
    "pynetdicom_bytes_identical",
    "pynetdicom_decode",
    "to_pynetdicom",
    "user_information_from_pynetdicom",
    "user_information_to_pynetdicom",
]

_PDU_CLASSES: dict[int, type[Any]] = {
    0x01: pn.A_ASSOCIATE_RQ,
    0x02: pn.A_ASSOCIATE_AC,
    0x03: pn.A_ASSOCIATE_RJ,
    0x04: pn.P_DATA_TF,
    0x05: pn.A_RELEASE_RQ,
    0x06: pn.A_RELEASE_RP,
    0x07: pn.A_ABORT_RQ,
}


def pynetdicom_decode(data: bytes) -> Any:
    """Decode a complete PDU (header included) with pynetdicom."""
    pdu = _PDU_CLASSES[data[0]]()
    pdu.decode(data)
    return pdu


def pynetdicom_bytes_identical(pdu: PDU) -> bool:
    """Whether pynetdicom's encoding of ``pdu`` is expected to equal ours byte for byte."""
    if isinstance(pdu, AssociateAC):
        return all(context.transfer_syntax for context in pdu.contexts)
    return True


# --- to pynetdicom -------------------------------------------------------------------


def user_information_to_pynetdicom(info: UserInformation) -> pi.UserInformationItem:
    if info.unknown:
        raise ValueError("pynetdicom cannot carry unknown user information sub-items")
    item = pi.UserInformationItem()
    data: list[Any] = []
    if info.max_length is not None:
        sub = pi.MaximumLengthSubItem()
        sub.maximum_length_received = info.max_length
        data.append(sub)
    if info.implementation_class_uid is not None:
        sub = pi.ImplementationClassUIDSubItem()
        sub.implementation_class_uid = info.implementation_class_uid
        data.append(sub)
    if info.async_ops is not None:
        sub = pi.AsynchronousOperationsWindowSubItem()
        sub.maximum_number_operations_invoked = info.async_ops.invoked
        sub.maximum_number_operations_performed = info.async_ops.performed
        data.append(sub)
    for role in info.roles:
        sub = pi.SCP_SCU_RoleSelectionSubItem()
        sub.sop_class_uid = role.sop_class_uid
        sub.scu_role = int(role.scu_role)
        sub.scp_role = int(role.scp_role)
        data.append(sub)
    if info.implementation_version_name is not None:
        sub = pi.ImplementationVersionNameSubItem()
        sub.implementation_version_name = info.implementation_version_name
        data.append(sub)
    for ext in info.sop_class_extended:
        sub = pi.SOPClassExtendedNegotiationSubItem()
        sub.sop_class_uid = ext.sop_class_uid
        sub.service_class_application_information = ext.info
        data.append(sub)
    for common in info.sop_class_common_extended:
        sub = pi.SOPClassCommonExtendedNegotiationSubItem()
        sub.sop_class_uid = common.sop_class_uid
        sub.service_class_uid = common.service_class_uid
        sub.related_general_sop_class_identification = list(common.related_general_sop_classes)
        data.append(sub)
    if info.user_identity_rq is not None:
        identity = info.user_identity_rq
        sub = pi.UserIdentitySubItemRQ()
        sub.user_identity_type = identity.type
        sub.positive_response_requested = int(identity.positive_response_requested)
        sub.primary_field = identity.primary
        sub.secondary_field = identity.secondary
        data.append(sub)
    if info.user_identity_ac is not None:
        sub = pi.UserIdentitySubItemAC()
        sub.server_response = info.user_identity_ac.server_response
        data.append(sub)
    item.user_data = data
    return item


def _application_context(uid: str) -> pi.ApplicationContextItem:
    item = pi.ApplicationContextItem()
    item.application_context_name = uid
    return item


def _context_rq(context: PresentationContextRQ) -> pi.PresentationContextItemRQ:
    item = pi.PresentationContextItemRQ()
    item.presentation_context_id = context.id
    abstract = pi.AbstractSyntaxSubItem()
    abstract.abstract_syntax_name = context.abstract_syntax
    subs: list[Any] = [abstract]
    for uid in context.transfer_syntaxes:
        sub = pi.TransferSyntaxSubItem()
        sub.transfer_syntax_name = uid
        subs.append(sub)
    item.abstract_transfer_syntax_sub_items = subs
    return item


def _context_ac(context: PresentationContextAC) -> pi.PresentationContextItemAC:
    item = pi.PresentationContextItemAC()
    item.presentation_context_id = context.id
    item.result_reason = context.result
    item.transfer_syntax_sub_item = []
    if context.transfer_syntax:
        sub = pi.TransferSyntaxSubItem()
        sub._skip_validation = context.result != 0
        sub.transfer_syntax_name = context.transfer_syntax
        item.transfer_syntax_sub_item = [sub]
    return item


def to_pynetdicom(pdu: PDU) -> Any:
    """The pynetdicom PDU object equivalent to ``pdu``."""
    if isinstance(pdu, AssociateRQ | AssociateAC):
        out: Any
        if isinstance(pdu, AssociateRQ):
            out = pn.A_ASSOCIATE_RQ()
            out.called_ae_title = pdu.called_ae
            out.calling_ae_title = pdu.calling_ae
            contexts: list[Any] = [_context_rq(c) for c in pdu.contexts]
        else:
            out = pn.A_ASSOCIATE_AC()
            out.reserved_aet = pdu.called_ae
            out.reserved_aec = pdu.calling_ae
            contexts = [_context_ac(c) for c in pdu.contexts]
        out.protocol_version = pdu.protocol_version
        out.variable_items = [
            _application_context(pdu.application_context),
            *contexts,
            user_information_to_pynetdicom(pdu.user_info),
        ]
        return out
    if isinstance(pdu, AssociateRJ):
        rj = pn.A_ASSOCIATE_RJ()
        rj.result, rj.source, rj.reason_diagnostic = pdu.result, pdu.source, pdu.reason
        return rj
    if isinstance(pdu, PDataTF):
        p_data = pn.P_DATA_TF()
        for pdv in pdu.pdvs:
            item = pi.PresentationDataValueItem()
            item.presentation_context_id = pdv.context_id
            # pynetdicom keeps the message control header as the value's first byte.
            item.presentation_data_value = bytes([pdv.control]) + pdv.data
            p_data.presentation_data_value_items.append(item)
        return p_data
    if isinstance(pdu, ReleaseRQ):
        return pn.A_RELEASE_RQ()
    if isinstance(pdu, ReleaseRP):
        return pn.A_RELEASE_RP()
    abort = pn.A_ABORT_RQ()
    abort.source, abort.reason_diagnostic = pdu.source, pdu.reason
    return abort


# --- from pynetdicom -----------------------------------------------------------------


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def user_information_from_pynetdicom(item: pi.UserInformationItem) -> UserInformation:
    fields: dict[str, Any] = {}
    roles: list[RoleSelection] = []
    extended: list[SOPClassExtended] = []
    common: list[SOPClassCommonExtended] = []
    for sub in item.user_data:
        if isinstance(sub, pi.MaximumLengthSubItem):
            fields["max_length"] = sub.maximum_length_received
        elif isinstance(sub, pi.ImplementationClassUIDSubItem):
            fields["implementation_class_uid"] = _text(sub.implementation_class_uid)
        elif isinstance(sub, pi.ImplementationVersionNameSubItem):
            fields["implementation_version_name"] = _text(sub.implementation_version_name)
        elif isinstance(sub, pi.AsynchronousOperationsWindowSubItem):
            fields["async_ops"] = AsyncOpsWindow(
                sub.maximum_number_operations_invoked, sub.maximum_number_operations_performed
            )
        elif isinstance(sub, pi.SCP_SCU_RoleSelectionSubItem):
            roles.append(
                RoleSelection(_text(sub.sop_class_uid), bool(sub.scu_role), bool(sub.scp_role))
            )
        elif isinstance(sub, pi.SOPClassExtendedNegotiationSubItem):
            info = sub.service_class_application_information or b""
            extended.append(SOPClassExtended(_text(sub.sop_class_uid), bytes(info)))
        elif isinstance(sub, pi.SOPClassCommonExtendedNegotiationSubItem):
            related = tuple(str(uid) for uid in sub.related_general_sop_class_identification)
            common.append(
                SOPClassCommonExtended(
                    _text(sub.sop_class_uid), _text(sub.service_class_uid), related
                )
            )
        elif isinstance(sub, pi.UserIdentitySubItemRQ):
            fields["user_identity_rq"] = UserIdentityRQ(
                sub.user_identity_type,
                bool(sub.positive_response_requested),
                sub.primary_field or b"",
                sub.secondary_field or b"",
            )
        elif isinstance(sub, pi.UserIdentitySubItemAC):
            fields["user_identity_ac"] = UserIdentityAC(sub.server_response or b"")
        else:  # pragma: no cover - pynetdicom rejects unknown types while decoding
            raise TypeError(f"unexpected user information sub-item {sub!r}")
    return UserInformation(
        roles=tuple(roles),
        sop_class_extended=tuple(extended),
        sop_class_common_extended=tuple(common),
        **fields,
    )


def from_pynetdicom(pdu: Any) -> PDU:
    """The dataclass equivalent to a pynetdicom PDU object."""
    if isinstance(pdu, pn.A_ASSOCIATE_RQ | pn.A_ASSOCIATE_AC):
        application_context = ""
        user_info = UserInformation()
        contexts: list[Any] = []
        for item in pdu.variable_items:
            if isinstance(item, pi.ApplicationContextItem):
                application_context = _text(item.application_context_name)
            elif isinstance(item, pi.UserInformationItem):
                user_info = user_information_from_pynetdicom(item)
            elif isinstance(item, pi.PresentationContextItemRQ):
                contexts.append(
                    PresentationContextRQ(
                        item.presentation_context_id,
                        _text(item.abstract_syntax),
                        tuple(_text(uid) for uid in item.transfer_syntax),
                    )
                )
            else:
                contexts.append(
                    PresentationContextAC(
                        item.presentation_context_id,
                        item.result_reason,
                        _text(item.transfer_syntax),
                    )
                )
        if isinstance(pdu, pn.A_ASSOCIATE_RQ):
            return AssociateRQ(
                pdu.called_ae_title,
                pdu.calling_ae_title,
                tuple(contexts),
                user_info,
                application_context,
                pdu.protocol_version,
            )
        return AssociateAC(
            pdu.reserved_aet,
            pdu.reserved_aec,
            tuple(contexts),
            user_info,
            application_context,
            pdu.protocol_version,
        )
    if isinstance(pdu, pn.A_ASSOCIATE_RJ):
        return AssociateRJ(pdu.result, pdu.source, pdu.reason_diagnostic)
    if isinstance(pdu, pn.P_DATA_TF):
        return PDataTF(
            tuple(
                PDV(item.presentation_context_id, item.presentation_data_value[0], item.data[1:])
                for item in pdu.presentation_data_value_items
            )
        )
    if isinstance(pdu, pn.A_RELEASE_RQ):
        return ReleaseRQ()
    if isinstance(pdu, pn.A_RELEASE_RP):
        return ReleaseRP()
    if isinstance(pdu, pn.A_ABORT_RQ):
        return Abort(pdu.source, pdu.reason_diagnostic)
    raise TypeError(f"not a pynetdicom PDU: {pdu!r}")
