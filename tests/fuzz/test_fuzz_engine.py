"""Fuzzing the association engine (workers.engine.connection.Connection) in both roles:
arbitrary, mutated and structured byte streams, in arbitrary read splits. The
properties are those of :mod:`tests.fuzz.harness` (no exception, bounded memory,
well-formed output, Sta1 at the end)."""

from __future__ import annotations

import struct

from hypothesis import example, given
from hypothesis import strategies as st

from workers.engine import dimse
from workers.engine import pdu as p

from . import harness as h
from . import strategies as fz

ACCEPTOR_SEEDS = h.acceptor_seeds()
REQUESTOR_SEEDS = h.requestor_seeds()
CONFIGS = st.integers(0, 3)
TICKS = st.sampled_from([0.0, 0.0, 0.5, 40.0])


@fz.fuzz_settings(300)
@given(st.binary(max_size=3000), fz.splits, CONFIGS, st.booleans(), TICKS)
def test_acceptor_random_bytes(
    data: bytes, splits: list[int], config: int, in_place: bool, tick: float
) -> None:
    h.run_acceptor(data, splits, config_choice=config, in_place=in_place, tick=tick)


_RQ = p.encode(h.associate_rq())
_STORE = h.command_pdata(3, dimse.encode_command(h.store_rq(1)))
#: Where random bytes continue a valid session: after the A-ASSOCIATE-RQ (a PDU
#: header next), inside a command PDV, after a C-STORE-RQ (a data-set PDV next),
#: inside a data-set PDV of a P-DATA-TF that declares 200 bytes.
PREFIXES = [
    _RQ,
    _RQ + _STORE[:-20],
    _RQ + _STORE,
    _RQ + _STORE + struct.pack(">BxLLBB", 4, 200, 194, 3, 0),
]


@fz.fuzz_settings(300)
@given(st.sampled_from(PREFIXES), st.binary(max_size=2000), fz.splits, CONFIGS, TICKS)
def test_acceptor_random_bytes_after_a_valid_request(
    prefix: bytes, data: bytes, splits: list[int], config: int, tick: float
) -> None:
    # Past the association, where most of the state is.
    h.run_acceptor(prefix + data, splits, config_choice=config, tick=tick)


@fz.fuzz_settings(400)
@given(fz.mutated(ACCEPTOR_SEEDS), fz.splits, CONFIGS, st.booleans(), st.booleans())
@example(ACCEPTOR_SEEDS[1], [1], 1, True, False)
@example(ACCEPTOR_SEEDS[2], [0], 2, False, True)
def test_acceptor_mutated_sessions(
    data: bytes, splits: list[int], config: int, sink: bool, in_place: bool
) -> None:
    h.run_acceptor(data, splits, config_choice=config, use_sink=sink, in_place=in_place)


@fz.fuzz_settings(200)
@given(fz.pdu_stream("acceptor"), fz.splits, CONFIGS, st.booleans())
def test_acceptor_pdu_streams(data: bytes, splits: list[int], config: int, sink: bool) -> None:
    h.run_acceptor(data, splits, config_choice=config, use_sink=sink)


@fz.fuzz_settings(300)
@given(fz.mutated(REQUESTOR_SEEDS), fz.splits, CONFIGS, st.booleans(), TICKS)
def test_requestor_mutated_answers(
    data: bytes, splits: list[int], config: int, echo: bool, tick: float
) -> None:
    h.run_requestor(data, splits, config_choice=config, send_echo=echo, tick=tick)


@fz.fuzz_settings(150)
@given(st.one_of(st.binary(max_size=2000), fz.pdu_stream("requestor")), fz.splits, CONFIGS)
def test_requestor_arbitrary_answers(data: bytes, splits: list[int], config: int) -> None:
    h.run_requestor(data, splits, config_choice=config)


def test_seeds_are_valid_sessions() -> None:
    """The mutation seeds do what they should when left alone (else fuzzing them is
    mostly fuzzing the A-ASSOCIATE-RQ decoder)."""
    from workers.engine.primitives import Aborted, AssociateIndication, CommandReceived

    for seed in ACCEPTOR_SEEDS:
        session = h.run_acceptor(seed, [0])
        kinds = [type(ev) for ev in session.events]
        assert kinds[0] is AssociateIndication and CommandReceived in kinds, kinds
        assert not any(isinstance(ev, Aborted) and not ev.by_peer for ev in session.events)


@fz.fuzz_settings(20)
@given(fz.pdu_stream("acceptor", cheap=False), fz.splits, CONFIGS)
def test_acceptor_generated_pdus(data: bytes, splits: list[int], config: int) -> None:
    # Every PDU shape the codec's strategies know (expensive to draw: few examples).
    h.run_acceptor(data, splits, config_choice=config)


def test_many_role_selections_get_an_answer() -> None:
    session = h.run_acceptor(h.many_role_selections_rq(), [0])
    assert isinstance(session.sent[0], p.AssociateAC | p.AssociateRJ)
