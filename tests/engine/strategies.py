"""Hypothesis strategies for the Upper Layer PDUs of :mod:`workers.engine.pdu`.

Every strategy draws values that :func:`~workers.engine.pdu.encode` accepts and that
survive ``decode(encode(x)) == x``. With ``conformant=True`` the values also keep to
the standard's repertoires (AE titles of the default character repertoire, UIDs made
of digits and dots, no unknown user-information sub-items, ...), which is what other
implementations such as pynetdicom insist on. The default is wider: any Latin-1 text,
empty UIDs, unknown sub-items, any byte where the wire has a byte.

Use ``pdus()`` for "any PDU"; the per-type strategies (``associate_rqs()`` ...) and
the item strategies (``user_informations()`` ...) are there for targeted tests.
"""

from __future__ import annotations

import string
from typing import TypeVar

from hypothesis import strategies as st

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
    "aborts",
    "ae_titles",
    "associate_acs",
    "associate_rjs",
    "associate_rqs",
    "async_ops_windows",
    "context_ids",
    "p_data_tfs",
    "pdus",
    "pdvs",
    "presentation_contexts_ac",
    "presentation_contexts_rq",
    "release_rps",
    "release_rqs",
    "role_selections",
    "sop_class_common_extendeds",
    "sop_class_extendeds",
    "uids",
    "unknown_sub_items",
    "user_identities_ac",
    "user_identities_rq",
    "user_informations",
    "version_names",
]

T = TypeVar("T")

_BYTE = st.integers(0, 0xFF)
_U16 = st.integers(0, 0xFFFF)
_U32 = st.integers(0, 0xFFFF_FFFF)

# AE title repertoire: default character repertoire without backslash and controls.
_AE_CHARS = "".join(c for c in string.printable if c not in "\\\t\n\r\x0b\x0c")
_LATIN1 = st.characters(min_codepoint=0, max_codepoint=0xFF)


def _edges_not_in(text: st.SearchStrategy[str], edge: str) -> st.SearchStrategy[str]:
    # decode() strips these characters from the edges, so they cannot round-trip there.
    return text.filter(lambda s: not s or (s[0] not in edge and s[-1] not in edge))


def context_ids() -> st.SearchStrategy[int]:
    """Presentation context IDs: odd integers 1..255 (PS3.8 9.3.2.2)."""
    return st.integers(0, 127).map(lambda n: 2 * n + 1)


def ae_titles(conformant: bool = False) -> st.SearchStrategy[str]:
    """AE titles as decode() returns them: no edge spaces, at most 16 characters."""
    if conformant:
        text = st.text(st.sampled_from(_AE_CHARS), min_size=1, max_size=16)
        return _edges_not_in(text, " ")
    return _edges_not_in(st.text(_LATIN1, max_size=16), " \x00")


def _uid_component() -> st.SearchStrategy[str]:
    return st.one_of(st.just("0"), st.integers(1, 10**12).map(str))


def uids(conformant: bool = False) -> st.SearchStrategy[str]:
    """UIDs; conformant ones are 1-64 characters of dotted numeric components."""
    valid = st.lists(_uid_component(), min_size=1, max_size=10).map(".".join)
    valid = valid.filter(lambda s: len(s) <= 64)
    if conformant:
        return valid
    loose = st.text(_LATIN1, max_size=70).filter(lambda s: not s or s[-1] not in " \x00")
    return st.one_of(valid, loose)


def version_names(conformant: bool = False) -> st.SearchStrategy[str]:
    """Implementation version names: 1 to 16 characters (PS3.7 D.3.3.2)."""
    if conformant:
        return _edges_not_in(st.text(st.sampled_from(_AE_CHARS), min_size=1, max_size=16), " ")
    text = st.text(_LATIN1, min_size=1, max_size=16)
    return text.filter(lambda s: s[-1] not in " \x00")


def presentation_contexts_rq(conformant: bool = False) -> st.SearchStrategy[PresentationContextRQ]:
    return st.builds(
        PresentationContextRQ,
        id=context_ids(),
        abstract_syntax=uids(conformant),
        transfer_syntaxes=st.lists(uids(conformant), min_size=1, max_size=4).map(tuple),
    )


def presentation_contexts_ac(conformant: bool = False) -> st.SearchStrategy[PresentationContextAC]:
    # PS3.8 Table 9-18 result values are 0..4; the codec carries any byte.
    result = st.integers(0, 4) if conformant else _BYTE
    transfer_syntax = st.one_of(st.just(""), uids(conformant))
    return st.builds(PresentationContextAC, context_ids(), result, transfer_syntax)


def async_ops_windows() -> st.SearchStrategy[AsyncOpsWindow]:
    return st.builds(AsyncOpsWindow, _U16, _U16)


def role_selections(conformant: bool = False) -> st.SearchStrategy[RoleSelection]:
    return st.builds(RoleSelection, uids(conformant), st.booleans(), st.booleans())


def sop_class_extendeds(conformant: bool = False) -> st.SearchStrategy[SOPClassExtended]:
    return st.builds(SOPClassExtended, uids(conformant), st.binary(max_size=32))


def sop_class_common_extendeds(
    conformant: bool = False,
) -> st.SearchStrategy[SOPClassCommonExtended]:
    return st.builds(
        SOPClassCommonExtended,
        uids(conformant),
        uids(conformant),
        st.lists(uids(conformant), max_size=3).map(tuple),
    )


def user_identities_rq(conformant: bool = False) -> st.SearchStrategy[UserIdentityRQ]:
    identity_type = st.integers(1, 5) if conformant else _BYTE
    # pynetdicom's item treats an empty primary field as absent; the standard wants one.
    primary = st.binary(min_size=1 if conformant else 0, max_size=40)
    return st.builds(UserIdentityRQ, identity_type, st.booleans(), primary, st.binary(max_size=40))


def user_identities_ac() -> st.SearchStrategy[UserIdentityAC]:
    return st.builds(UserIdentityAC, st.binary(max_size=40))


def unknown_sub_items() -> st.SearchStrategy[tuple[int, bytes]]:
    """Sub-items of types the codec does not know (anything but 51H..59H)."""
    item_type = _BYTE.filter(lambda t: not 0x51 <= t <= 0x59)
    return st.tuples(item_type, st.binary(max_size=24))


def _optional(strategy: st.SearchStrategy[T]) -> st.SearchStrategy[T | None]:
    return st.none() | strategy


def _few(strategy: st.SearchStrategy[T]) -> st.SearchStrategy[tuple[T, ...]]:
    return st.lists(strategy, max_size=3).map(tuple)


def user_informations(conformant: bool = False) -> st.SearchStrategy[UserInformation]:
    return st.builds(
        UserInformation,
        max_length=_optional(_U32),
        implementation_class_uid=_optional(uids(conformant)),
        implementation_version_name=_optional(version_names(conformant)),
        async_ops=_optional(async_ops_windows()),
        roles=_few(role_selections(conformant)),
        sop_class_extended=_few(sop_class_extendeds(conformant)),
        sop_class_common_extended=_few(sop_class_common_extendeds(conformant)),
        user_identity_rq=_optional(user_identities_rq(conformant)),
        user_identity_ac=_optional(user_identities_ac()),
        unknown=st.just(()) if conformant else _few(unknown_sub_items()),
    )


def associate_rqs(conformant: bool = False) -> st.SearchStrategy[AssociateRQ]:
    return st.builds(
        AssociateRQ,
        called_ae=ae_titles(conformant),
        calling_ae=ae_titles(conformant),
        contexts=st.lists(presentation_contexts_rq(conformant), max_size=4).map(tuple),
        user_info=user_informations(conformant),
        application_context=uids(conformant),
        protocol_version=_U16,
    )


def associate_acs(conformant: bool = False) -> st.SearchStrategy[AssociateAC]:
    return st.builds(
        AssociateAC,
        called_ae=ae_titles(conformant),
        calling_ae=ae_titles(conformant),
        contexts=st.lists(presentation_contexts_ac(conformant), max_size=4).map(tuple),
        user_info=user_informations(conformant),
        application_context=uids(conformant),
        protocol_version=_U16,
    )


def associate_rjs() -> st.SearchStrategy[AssociateRJ]:
    return st.builds(AssociateRJ, _BYTE, _BYTE, _BYTE)


def pdvs(conformant: bool = False) -> st.SearchStrategy[PDV]:
    control = st.integers(0, 3) if conformant else _BYTE
    return st.builds(PDV, context_ids(), control, st.binary(max_size=64))


def p_data_tfs(conformant: bool = False) -> st.SearchStrategy[PDataTF]:
    return st.builds(PDataTF, st.lists(pdvs(conformant), min_size=1, max_size=4).map(tuple))


def release_rqs() -> st.SearchStrategy[ReleaseRQ]:
    return st.just(ReleaseRQ())


def release_rps() -> st.SearchStrategy[ReleaseRP]:
    return st.just(ReleaseRP())


def aborts() -> st.SearchStrategy[Abort]:
    return st.builds(Abort, _BYTE, _BYTE)


def pdus(conformant: bool = False) -> st.SearchStrategy[PDU]:
    """Any PDU of any type."""
    return st.one_of(
        associate_rqs(conformant),
        associate_acs(conformant),
        associate_rjs(),
        p_data_tfs(conformant),
        release_rqs(),
        release_rps(),
        aborts(),
    )
