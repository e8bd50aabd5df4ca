"""The association set-up caches: a repeated A-ASSOCIATE-RQ is decoded once, answered
once (acse.NegotiationCache) and its A-ASSOCIATE-AC encoded once, and each answer is
still exactly what decoding, negotiating and encoding afresh would give."""

from __future__ import annotations

import dataclasses

from workers.engine import acse, dimse
from workers.engine import pdu as p

CT = "1.2.840.10008.5.1.4.1.1.2"


def _rq(calling: str = "MODALITY", identity: p.UserIdentityRQ | None = None) -> p.AssociateRQ:
    return acse.build_request(
        "PACSRX",
        calling,
        [acse.Requested(dimse.VERIFICATION_SOP_CLASS), acse.Requested(CT)],
        user_identity=identity,
    )


def _body(rq: p.AssociateRQ) -> bytes:
    return p.encode(rq)[6:]


def _decode(body: bytes | memoryview) -> p.AssociateRQ:
    rq = p.decode(p.PDUType.ASSOCIATE_RQ, body)
    assert isinstance(rq, p.AssociateRQ)
    return rq


def test_same_bytes_decode_to_the_same_object() -> None:
    body = _body(_rq())
    first = _decode(body)
    again = _decode(memoryview(bytearray(body)))
    assert again is first
    assert first == _rq()
    other = _decode(_body(_rq("OTHER")))
    assert other is not first and other.calling_ae == "OTHER"


def test_requests_with_a_user_identity_are_not_kept() -> None:
    body = _body(_rq(identity=p.UserIdentityRQ(2, True, b"alice", b"secret")))
    first = _decode(body)
    assert _decode(body) is not first
    assert all(known.user_info.user_identity_rq is None for known in p._RQ_MEMO.values())


def test_the_memo_is_bounded() -> None:
    for i in range(p._RQ_MEMO_ENTRIES + 10):
        _decode(_body(_rq(f"AE{i}")))
    assert len(p._RQ_MEMO) <= p._RQ_MEMO_ENTRIES
    for i in range(p._AC_MEMO_ENTRIES + 10):
        p.encode(acse.negotiate(_rq(f"AE{i}"), acse.AcceptorPolicy()))
    assert len(p._AC_MEMO) <= p._AC_MEMO_ENTRIES


def test_cached_answer_is_the_fresh_answer() -> None:
    cache = acse.NegotiationCache()
    policy = acse.AcceptorPolicy(syntaxes={dimse.VERIFICATION_SOP_CLASS: ("*",)})
    rq = _decode(_body(_rq()))
    first = cache.negotiate(rq, policy, acse.NO_EXTENDED)
    assert first == acse.negotiate(rq, policy)
    assert cache.negotiate(rq, policy, acse.NO_EXTENDED) is first
    assert p.encode(first) is p.encode(first)  # encoded once
    assert p.encode(first) == p.encode(dataclasses.replace(first))
    # CT refused under this policy, accepted under another: a new answer.
    other = acse.AcceptorPolicy()
    second = cache.negotiate(rq, other, acse.NO_EXTENDED)
    assert second is not first and second == acse.negotiate(rq, other)
    # Other extended-negotiation answers: a new answer too.
    window = acse.Extended(async_ops=p.AsyncOpsWindow(2, 2))
    assert cache.negotiate(rq, policy, window) == acse.negotiate(rq, policy, window)


def test_the_cache_is_bounded() -> None:
    cache = acse.NegotiationCache(size=4)
    policy = acse.AcceptorPolicy()
    for i in range(10):
        cache.negotiate(_rq(f"AE{i}"), policy, acse.NO_EXTENDED)
    assert len(cache._answers) == 4


def test_read_buffers_are_recycled_only_when_unreferenced() -> None:
    from workers.engine import connection as c

    size = c.UNASSOCIATED_READ_SIZE  # the buffer of a connection not yet associated
    pool = c.ReadBufferPool()
    config = c.EngineConfig(buffer_pool=pool)
    first = c.Connection(c.Role.ACCEPTOR, config)
    view = first.get_buffer(10)  # a view still held: not recycled
    first.recycle()
    assert pool.spare(size) == []
    view.release()
    second = c.Connection(c.Role.ACCEPTOR, config)
    kept = id(second._buf)
    second.recycle()
    assert [id(b) for b in pool.spare(size)] == [kept]
    third = c.Connection(c.Role.ACCEPTOR, config)
    assert id(third._buf) == kept and not pool.spare(size)
    # A recycled buffer's old bytes are never seen: only what is received anew.
    rq = _rq()
    third.connection_made(0.0)
    third.receive_data(p.encode(rq), 0.0)
    event = third.next_event()
    assert getattr(event, "request", None) == rq
