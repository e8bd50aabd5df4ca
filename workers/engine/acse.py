"""ACSE negotiation: what an acceptor answers to an A-ASSOCIATE-RQ (PS3.8 7.1, 9.3;
PS3.7 Annex D.3.3), and what a requestor learns from the answer.

The acceptor's side is one pure function, :func:`negotiate`: request plus policy in,
A-ASSOCIATE-AC or -RJ out. Whatever needs a user handler (user identity, asynchronous
operations window, SOP class extended negotiation) is decided by the caller before
and passed in as plain values, so nothing here waits or does I/O.

Rejections (PS3.8 Table 9-21):

============================================  ==========  =======================  ===
situation                                     result      source                   rsn
============================================  ==========  =======================  ===
application context name not DICOM's         permanent   service-user (1)         2
calling AE title not allowed                  permanent   service-user (1)         3
called AE title not ours                      permanent   service-user (1)         7
user identity not verified                    permanent   service-user (1)         1
too many presentation contexts proposed       permanent   provider, presentation   2
association limits (max associations ...)     transient   provider, presentation   2
============================================  ==========  =======================  ===
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from . import pdu as p

#: Transfer syntaxes every receiver understands (PS3.5 10.1, A.2).
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
UNCOMPRESSED_TRANSFER_SYNTAXES = (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
)

#: Wildcard for "any abstract syntax" or "any transfer syntax" in a policy.
ANY = "*"

#: Largest number of presentation contexts one association can carry: the IDs are
#: the odd integers 1..255 (PS3.8 9.3.2.2).
MAX_CONTEXTS = 128


@dataclass(slots=True)
class AcceptorPolicy:
    """What an acceptor accepts.

    ``syntaxes`` maps an abstract syntax (or :data:`ANY`) to the transfer syntaxes
    accepted for it (or ``(ANY,)``); the first proposed transfer syntax that is
    accepted wins, honouring the requestor's order of preference, which is also what
    keeps storage bit-preserving.
    """

    ae_title: str = "PACSRX"
    require_called_ae: bool = False
    allowed_calling_aes: Collection[str] | None = None
    syntaxes: Mapping[str, Sequence[str]] = field(default_factory=lambda: {ANY: (ANY,)})
    max_pdu_length: int = 1024 * 1024
    max_contexts: int = MAX_CONTEXTS
    #: SOP classes for which a proposed SCP/SCU role may be granted; None: all
    role_selection: Collection[str] | None = None
    implementation_class_uid: str = "1.2.826.0.1.3680043.10.1415.1"
    implementation_version_name: str = "PACSRX_010"

    def transfer_syntaxes_for(self, abstract_syntax: str) -> Sequence[str] | None:
        found = self.syntaxes.get(abstract_syntax)
        if found is None:
            found = self.syntaxes.get(ANY)
        return found


@dataclass(slots=True, frozen=True)
class Extended:
    """Answers of the extended-negotiation handlers, decided before :func:`negotiate`.

    ``user_identity_verified`` False rejects the association; ``None`` means the
    request carried no user identity item or it is not checked.
    """

    user_identity_verified: bool | None = None
    user_identity_response: bytes | None = None
    async_ops: p.AsyncOpsWindow | None = None
    sop_class_extended: tuple[p.SOPClassExtended, ...] = ()


def reject(result: int, source: int, reason: int) -> p.AssociateRJ:
    """Build an A-ASSOCIATE-RJ from its three fields."""
    return p.AssociateRJ(result, source, reason)


def reject_local_limit(transient: bool = True) -> p.AssociateRJ:
    """A-ASSOCIATE-RJ for a local limit (associations, contexts) being exceeded."""
    return p.AssociateRJ(
        p.RejectResult.TRANSIENT if transient else p.RejectResult.PERMANENT,
        p.RejectSource.SERVICE_PROVIDER_PRESENTATION,
        p.RejectReason.LOCAL_LIMIT_EXCEEDED,
    )


def check_request(rq: p.AssociateRQ, policy: AcceptorPolicy) -> p.AssociateRJ | None:
    """The association-level checks of :func:`negotiate`; None when all pass."""
    user = p.RejectSource.SERVICE_USER
    if rq.application_context != p.APPLICATION_CONTEXT_NAME:
        return reject(
            p.RejectResult.PERMANENT, user, p.RejectReason.APPLICATION_CONTEXT_NOT_SUPPORTED
        )
    if policy.require_called_ae and rq.called_ae != policy.ae_title:
        return reject(p.RejectResult.PERMANENT, user, p.RejectReason.CALLED_AE_NOT_RECOGNIZED)
    if policy.allowed_calling_aes is not None and rq.calling_ae not in policy.allowed_calling_aes:
        return reject(p.RejectResult.PERMANENT, user, p.RejectReason.CALLING_AE_NOT_RECOGNIZED)
    if len(rq.contexts) > min(policy.max_contexts, MAX_CONTEXTS):
        return reject_local_limit(transient=False)
    return None


def negotiate_contexts(
    rq: p.AssociateRQ, policy: AcceptorPolicy
) -> tuple[p.PresentationContextAC, ...]:
    """One AC item per proposed context, in the order proposed (PS3.8 9.3.3.2)."""
    out = []
    seen: set[int] = set()
    for ctx in rq.contexts:
        if ctx.id in seen or not ctx.id & 1:
            # A repeated or even ID cannot be answered meaningfully; refuse the context
            # (no-reason) rather than the whole association.
            out.append(p.PresentationContextAC(ctx.id, p.ContextResult.NO_REASON, ""))
            continue
        seen.add(ctx.id)
        accepted = policy.transfer_syntaxes_for(ctx.abstract_syntax)
        if not accepted:
            result = p.ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED
            out.append(p.PresentationContextAC(ctx.id, result, ""))
            continue
        chosen = next(
            (ts for ts in ctx.transfer_syntaxes if ts and (ANY in accepted or ts in accepted)),
            None,
        )
        if chosen is None:
            result = p.ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED
            out.append(p.PresentationContextAC(ctx.id, result, ""))
            continue
        out.append(p.PresentationContextAC(ctx.id, p.ContextResult.ACCEPTANCE, chosen))
    return tuple(out)


def negotiate_roles(
    rq: p.AssociateRQ,
    contexts: Sequence[p.PresentationContextAC],
    policy: AcceptorPolicy,
) -> tuple[p.RoleSelection, ...]:
    """Answer each role selection item of an accepted abstract syntax (PS3.7 D.3.3.4).

    A proposed role is granted when the policy allows role selection for the SOP
    class; a role not proposed is never granted. Items for SOP classes with no
    accepted context are not answered.
    """
    accepted_ids = {c.id for c in contexts if c.result == p.ContextResult.ACCEPTANCE}
    accepted_classes = {c.abstract_syntax for c in rq.contexts if c.id in accepted_ids}
    out = []
    answered: set[str] = set()
    for item in rq.user_info.roles:
        # One answer per SOP class (PS3.7 D.3.3.4 allows one item per class): a request
        # repeating an item thousands of times must not make our answer overflow.
        if item.sop_class_uid not in accepted_classes or item.sop_class_uid in answered:
            continue
        answered.add(item.sop_class_uid)
        allowed = policy.role_selection is None or item.sop_class_uid in policy.role_selection
        out.append(
            p.RoleSelection(
                item.sop_class_uid, item.scu_role and allowed, item.scp_role and allowed
            )
        )
    return tuple(out)


def negotiate(
    rq: p.AssociateRQ, policy: AcceptorPolicy, extended: Extended | None = None
) -> p.AssociateAC | p.AssociateRJ:
    """The acceptor's answer to ``rq`` under ``policy``."""
    extended = extended or Extended()
    rj = check_request(rq, policy)
    if rj is not None:
        return rj
    if extended.user_identity_verified is False:
        return reject(
            p.RejectResult.PERMANENT, p.RejectSource.SERVICE_USER, p.RejectReason.NO_REASON
        )
    contexts = negotiate_contexts(rq, policy)
    identity_ac = None
    if (
        rq.user_info.user_identity_rq is not None
        and rq.user_info.user_identity_rq.positive_response_requested
        and extended.user_identity_verified
        and extended.user_identity_response is not None
    ):
        identity_ac = p.UserIdentityAC(extended.user_identity_response)
    user_info = p.UserInformation(
        max_length=policy.max_pdu_length,
        implementation_class_uid=policy.implementation_class_uid,
        implementation_version_name=policy.implementation_version_name,
        async_ops=extended.async_ops if rq.user_info.async_ops is not None else None,
        roles=negotiate_roles(rq, contexts, policy),
        sop_class_extended=extended.sop_class_extended,
        user_identity_ac=identity_ac,
    )
    return p.AssociateAC(
        called_ae=rq.called_ae,
        calling_ae=rq.calling_ae,
        contexts=contexts,
        user_info=user_info,
        application_context=rq.application_context,
    )


class NegotiationCache:
    """:func:`negotiate` remembering its answers to the last ``size`` requests.

    A requestor that associates again and again sends the same A-ASSOCIATE-RQ, and
    :func:`workers.engine.pdu.decode` then returns the very same (frozen) object: it
    gets the very same answer, found by the request's value (whose hash is computed
    once per object), as long as the policy object and the extended-negotiation
    answers are the same too. The answer is a function of exactly those three, so it
    is the one :func:`negotiate` would compute.
    """

    __slots__ = ("_answers", "size")

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._answers: dict[
            p.AssociateRQ, tuple[AcceptorPolicy, Extended, p.AssociateAC | p.AssociateRJ]
        ] = {}

    def negotiate(
        self, rq: p.AssociateRQ, policy: AcceptorPolicy, extended: Extended
    ) -> p.AssociateAC | p.AssociateRJ:
        known = self._answers.get(rq)
        if (
            known is not None
            and known[0] is policy
            and (known[1] is extended or known[1] == extended)
        ):
            return known[2]
        answer = negotiate(rq, policy, extended)
        answers = self._answers
        answers.pop(rq, None)  # a new answer for it goes last
        if len(answers) >= self.size:
            del answers[next(iter(answers))]  # the oldest
        answers[rq] = (policy, extended, answer)
        return answer


#: The extended negotiation of a request that has none of the items a handler answers.
NO_EXTENDED = Extended()


@dataclass(slots=True, frozen=True)
class Requested:
    """What a requestor proposes, in friendlier form than a raw A-ASSOCIATE-RQ."""

    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...] = UNCOMPRESSED_TRANSFER_SYNTAXES


def build_request(
    called_ae: str,
    calling_ae: str,
    contexts: Sequence[Requested],
    *,
    max_pdu_length: int = 1024 * 1024,
    async_ops: p.AsyncOpsWindow | None = None,
    roles: Sequence[p.RoleSelection] = (),
    sop_class_extended: Sequence[p.SOPClassExtended] = (),
    sop_class_common_extended: Sequence[p.SOPClassCommonExtended] = (),
    user_identity: p.UserIdentityRQ | None = None,
    implementation_class_uid: str = "1.2.826.0.1.3680043.10.1415.1",
    implementation_version_name: str = "PACSRX_010",
) -> p.AssociateRQ:
    """An A-ASSOCIATE-RQ proposing ``contexts`` with IDs 1, 3, 5, ... in order."""
    if len(contexts) > MAX_CONTEXTS:
        raise ValueError(f"at most {MAX_CONTEXTS} presentation contexts can be proposed")
    items = tuple(
        p.PresentationContextRQ(2 * i + 1, c.abstract_syntax, tuple(c.transfer_syntaxes))
        for i, c in enumerate(contexts)
    )
    return p.AssociateRQ(
        called_ae=called_ae,
        calling_ae=calling_ae,
        contexts=items,
        user_info=p.UserInformation(
            max_length=max_pdu_length,
            implementation_class_uid=implementation_class_uid,
            implementation_version_name=implementation_version_name,
            async_ops=async_ops,
            roles=tuple(roles),
            sop_class_extended=tuple(sop_class_extended),
            sop_class_common_extended=tuple(sop_class_common_extended),
            user_identity_rq=user_identity,
        ),
    )
