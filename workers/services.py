"""DIMSE services of the acceptor: how each request is answered (PS3.4, PS3.7).

Each service is a step (:mod:`workers.handlers`): a generator that yields awaitables
only when it has something to wait for, and sends its responses itself. The handler
shapes are those of pynetdicom's event handler contract:

* C-ECHO, C-STORE, N-DELETE: the handler returns a status (an ``int``, or a Dataset
  with ``Status`` and optionally ``ErrorComment``, ``OffendingElement`` ...);
* N-GET, N-SET, N-ACTION, N-CREATE, N-EVENT-REPORT: it returns ``(status, dataset)``;
* C-FIND: it yields ``(status, identifier)`` pairs;
* C-GET: it yields the number of sub-operations, then ``(status, dataset)`` pairs;
* C-MOVE: it yields ``(address, port)`` (or ``(address, port, kwargs)``), the number
  of sub-operations, then ``(status, dataset)`` pairs.

A handler that raises, times out or returns something unusable gets the contract's
failure status (:data:`workers.events.DEFAULT_STATUS`) and a log line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from . import events as evt
from .datasets import encode_dataset
from .engine import dimse
from .engine.dimse import CommandField as CF
from .handlers import DONE, Binding, Step, resolve

if TYPE_CHECKING:
    from .session import AssociationPort, ContextInfo, Operation
    from .storage.store import StoreResult

log = logging.getLogger("workers.services")

PENDING = (0xFF00, 0xFF01)
CANCEL = 0xFE00
#: Sub-operations complete, one or more failures or warnings (PS3.4 C.4.2.1.4, C.4.3)
SUBOPS_WARNING = 0xB000
#: Refused: Out of Resources - Unable to perform sub-operations (PS3.4 C.4.2.1.4)
SUBOPS_FAILED = 0xA702
MOVE_DESTINATION_UNKNOWN = 0xA801
#: Response fields a handler's status Dataset may carry into the response.
_STATUS_FIELDS = ("ErrorComment", "ErrorID", "OffendingElement", "AttributeIdentifierList")

_EVENTS = {
    CF.C_ECHO_RQ: evt.EVT_C_ECHO,
    CF.C_STORE_RQ: evt.EVT_C_STORE,
    CF.C_FIND_RQ: evt.EVT_C_FIND,
    CF.C_GET_RQ: evt.EVT_C_GET,
    CF.C_MOVE_RQ: evt.EVT_C_MOVE,
    CF.N_EVENT_REPORT_RQ: evt.EVT_N_EVENT_REPORT,
    CF.N_GET_RQ: evt.EVT_N_GET,
    CF.N_SET_RQ: evt.EVT_N_SET,
    CF.N_ACTION_RQ: evt.EVT_N_ACTION,
    CF.N_CREATE_RQ: evt.EVT_N_CREATE,
    CF.N_DELETE_RQ: evt.EVT_N_DELETE,
}


def serve(proto: AssociationPort, op: Operation) -> Step[None]:
    """Answer one request."""
    cf = op.command.CommandField
    if cf == CF.C_STORE_RQ and op.writer is not None:
        return (yield from builtin_store(proto, op))
    event = _EVENTS.get(cf)  # type: ignore[call-overload]
    if event is None:
        # PS3.7 C.5.14: an operation this SCP does not know.
        log.warning("%s: unrecognised request 0x%04x", proto.assoc.name, cf)
        _respond(proto, op, 0x0211)
        return None
    problem = dimse.validate_command(op.command) if cf != CF.C_STORE_RQ else None
    if problem is not None:
        log.warning("%s: invalid request: %s", proto.assoc.name, problem)
        _respond(proto, op, 0xC000 if cf & 0x0F00 == 0 else 0x0115, ErrorComment=problem[:64])
        return None
    if op.status is not None:
        _respond(proto, op, op.status)
        if cf == CF.C_STORE_RQ:
            proto.store_done(op, StoreOutcome(op.status, 0))
        return None
    service = _SERVICES[event]
    return (yield from service(proto, op, event))


def answer_echo(proto: AssociationPort, op: Operation) -> bool:
    """A valid C-ECHO with no EVT_C_ECHO handler bound: answer Success at once, as
    :func:`serve` would, without a step (the association set-up benchmark's whole
    work). False, and nothing sent, when :func:`serve` has to decide."""
    if (
        op.status is not None
        or proto.registry.intervention_handler(evt.EVT_C_ECHO) is not None
        or dimse.validate_command(op.command) is not None
    ):
        return False
    _respond(proto, op, 0x0000)
    return True


# --------------------------------------------------------------------- helpers


def _respond(
    proto: AssociationPort,
    op: Operation,
    status: int,
    dataset: bytes | None = None,
    /,
    **fields: Any,
) -> None:
    rsp = dimse.response_for(op.command, status, **fields)
    if dataset is not None:
        rsp.CommandDataSetType = dimse.DATASET_PRESENT
    try:
        proto.send(op.context_id, rsp, dataset)
    except ConnectionError:
        log.info(
            "%s: response to message %d not sent: association gone", proto.assoc.name, op.message_id
        )


def _event(
    proto: AssociationPort, op: Operation, event: evt.InterventionEvent, **attrs: Any
) -> evt.Event:
    ctx = proto.context_info(op.context_id)
    loader: Callable[[], bytes] | None = None
    if op.spool is not None:
        loader = op.spool.read
    elif op.data is not None:
        data = op.data
        loader = lambda: data  # noqa: E731
    return evt.Event(
        proto.assoc,
        event,
        {"request": op.command, "context": ctx, **attrs},
        dataset_loader=loader,
        transfer_syntax=ctx.transfer_syntax,
        cancel_check=lambda: proto.is_cancelled(op.message_id),
        max_dataset_length=proto.server.config.max_dataset_in_memory,
    )


def status_of(value: Any, default: int) -> tuple[int, dict[str, Any]]:
    """A handler's status: an int, or a Dataset with Status (+ response fields)."""
    if isinstance(value, bool):
        return default, {}
    if isinstance(value, int):
        return value, {}
    status = getattr(value, "Status", None)
    if isinstance(status, int):
        fields = {}
        for name in _STATUS_FIELDS:
            field = getattr(value, name, None)
            if field is not None:
                fields[name] = (
                    tuple(field)
                    if name in ("OffendingElement", "AttributeIdentifierList")
                    else field
                )
        return status, fields
    log.error("handler returned %r, which is not a status: answering 0x%04x", value, default)
    return default, {}


def _call(proto: AssociationPort, event: evt.Event, binding: Binding | None = None) -> Step[Any]:
    """Call the handler bound to ``event.event`` (or ``binding``): ``yield from``
    gives its result."""
    if binding is None:
        binding = proto.registry.intervention_handler(event.event)  # type: ignore[arg-type]
    assert binding is not None
    return (yield from resolve(proto.server.caller.call(binding, event, proto.inline(binding))))


def _iterate(proto: AssociationPort, iterator: Any, inline: bool) -> Step[Any]:
    return (yield from resolve(proto.server.caller.next_item(iterator, inline)))


def _encode(proto: AssociationPort, op: Operation, ds: Any) -> bytes | None:
    if ds is None:
        return None
    return encode_dataset(ds, proto.context_info(op.context_id).transfer_syntax)


def _simple(proto: AssociationPort, op: Operation, event: evt.InterventionEvent) -> Step[None]:
    """C-ECHO, user C-STORE, N-DELETE: the handler returns a status."""
    default = evt.DEFAULT_STATUS[event]  # C-ECHO's is Success
    if proto.registry.intervention_handler(event) is None:
        _respond(proto, op, default)
        return None
    failure = 0x0110 if event is evt.EVT_C_ECHO else default
    try:
        result = yield from _call(proto, _event(proto, op, event))
        status, fields = status_of(result, failure)
    except Exception as exc:
        log.error("%s: %s handler failed: %r", proto.assoc.name, event.name, exc)
        proto.handler_failed(event)
        status, fields = failure, {}
    _respond(proto, op, status, **fields)
    if event is evt.EVT_C_STORE:
        proto.store_done(op, StoreOutcome(status, op.spool.size if op.spool else 0))
    return None


def _n_service(proto: AssociationPort, op: Operation, event: evt.InterventionEvent) -> Step[None]:
    """N-GET, N-SET, N-ACTION, N-CREATE, N-EVENT-REPORT: (status, dataset)."""
    failure = evt.DEFAULT_STATUS[event]
    if proto.registry.intervention_handler(event) is None:
        indexed = proto.server.indexed
        if event is evt.EVT_N_ACTION and indexed is not None:
            # Storage Commitment, when no user handler took EVT_N_ACTION.
            step = indexed.n_action_step(proto, op)
            if step is not None:
                return (yield from step)
        _respond(proto, op, failure)
        return None
    fields: dict[str, Any] = {}
    try:
        status_value, ds = yield from _call(proto, _event(proto, op, event))
        status, fields = status_of(status_value, failure)
        data = (
            _encode(proto, op, ds)
            if dimse.status_category(status) in ("Success", "Warning")
            else None
        )
    except Exception as exc:
        log.error("%s: %s handler failed: %r", proto.assoc.name, event.name, exc)
        proto.handler_failed(event)
        status, data, ds = failure, None, None
    if event is evt.EVT_N_CREATE and op.command.AffectedSOPInstanceUID is None and ds is not None:
        created = getattr(ds, "SOPInstanceUID", None)
        if created:
            fields["AffectedSOPInstanceUID"] = str(created)
    _respond(proto, op, status, data, **fields)
    return None


def _builtin(proto: AssociationPort, event: evt.InterventionEvent) -> Binding | None:
    """The user's handler for ``event``, else the built-in one over the index
    (``--query-retrieve``: workers/indexed.py), else None."""
    binding = proto.registry.intervention_handler(event)
    if binding is None and proto.server.indexed is not None:
        binding = proto.server.indexed.builtin_binding(event)
    return binding


def _c_find(proto: AssociationPort, op: Operation, event: evt.InterventionEvent) -> Step[None]:
    failure = evt.DEFAULT_STATUS[event]
    binding = _builtin(proto, event)
    if binding is None:
        _respond(proto, op, failure)
        return None
    inline = proto.inline(binding)
    try:
        iterator = yield from _call(proto, _event(proto, op, event), binding)
        while True:
            if not proto.can_send:
                return None  # the association is gone: stop pulling matches
            if proto.is_cancelled(op.message_id):
                _respond(proto, op, CANCEL)
                return None
            item = yield from _iterate(proto, iterator, inline)
            if item is DONE:
                # A handler that stops because it saw event.is_cancelled ends with the
                # Cancel status (PS3.4 C.4.1.3.1), not Success.
                if proto.is_cancelled(op.message_id):
                    _respond(proto, op, CANCEL)
                    return None
                break
            status, fields = status_of(item[0], failure)
            if status in PENDING:
                _respond(proto, op, status, _encode(proto, op, item[1]), **fields)
                # A peer that reads slowly holds the handler back instead of letting
                # its matches pile up in our write buffer.
                yield from resolve(proto.drain())
                continue
            _respond(proto, op, status, **fields)  # a final status ends it
            return None
    except Exception as exc:
        log.error("%s: C-FIND handler failed: %r", proto.assoc.name, exc)
        proto.handler_failed(event)
        _respond(proto, op, failure)
        return None
    _respond(proto, op, 0x0000)
    return None


class _SubOps:
    """Counts of C-GET / C-MOVE sub-operations (PS3.4 C.4.2.3, C.4.3.3)."""

    def __init__(self, total: int) -> None:
        self.remaining = total
        self.completed = 0
        self.failed = 0
        self.warning = 0
        self.failed_uids: list[str] = []

    def record(self, status: int, uid: str) -> None:
        self.remaining = max(0, self.remaining - 1)
        category = dimse.status_category(status)
        if category == "Success":
            self.completed += 1
        elif category == "Warning":
            self.warning += 1
        else:
            self.failed += 1
            self.failed_uids.append(uid)

    def fields(self, final: bool = False) -> dict[str, int]:
        fields = {
            "NumberOfCompletedSuboperations": self.completed,
            "NumberOfFailedSuboperations": self.failed,
            "NumberOfWarningSuboperations": self.warning,
        }
        if not final:
            fields["NumberOfRemainingSuboperations"] = self.remaining
        return fields

    def final(self, proto: AssociationPort, op: Operation, status: int | None = None) -> None:
        if status is None:
            if self.failed and not (self.completed or self.warning):
                # Every sub-operation failed: a failure, not "complete with failures"
                # (PS3.4 C.4.2.3.1, C.4.3.3.1; the contract's 0xA702 too).
                status = SUBOPS_FAILED
            elif self.failed or self.warning:
                status = SUBOPS_WARNING
            else:
                status = 0x0000
        data = None
        if self.failed_uids and status != 0x0000:
            from pydicom import Dataset

            ds = Dataset()
            ds.FailedSOPInstanceUIDList = self.failed_uids
            data = _encode(proto, op, ds)
        _respond(proto, op, status, data, **self.fields(final=status != CANCEL))


def _retrieve(proto: AssociationPort, op: Operation, event: evt.InterventionEvent) -> Step[None]:
    """C-GET (sub-operations on this association) and C-MOVE (to the destination)."""
    failure = evt.DEFAULT_STATUS[event]
    binding = _builtin(proto, event)
    if binding is None:
        _respond(proto, op, failure)
        return None
    inline = proto.inline(binding)
    sender: _MoveSender | None = None
    counts: _SubOps | None = None
    try:
        iterator = yield from _call(proto, _event(proto, op, event), binding)
        if event is evt.EVT_C_MOVE:
            destination = yield from _iterate(proto, iterator, inline)
            if destination is DONE or destination is None or destination[0] is None:
                _respond(proto, op, MOVE_DESTINATION_UNKNOWN)
                return None
            kwargs = destination[2] if len(destination) > 2 else {}
            sender = _MoveSender(proto, op, str(destination[0]), int(destination[1]), kwargs)
        total = yield from _iterate(proto, iterator, inline)
        if total is DONE or not isinstance(total, int):
            raise ValueError(
                f"the handler's first yield must be the number of sub-operations, not {total!r}"
            )
        counts = _SubOps(total)
        while True:
            if not proto.can_send:
                return None  # the association is gone: no more sub-operations
            if proto.is_cancelled(op.message_id):
                counts.final(proto, op, CANCEL)
                return None
            item = yield from _iterate(proto, iterator, inline)
            if item is DONE:
                if proto.is_cancelled(op.message_id):  # as for C-FIND (PS3.4 C.4.2.3.1)
                    counts.final(proto, op, CANCEL)
                    return None
                break
            status, _ = status_of(item[0], failure)
            if status not in PENDING:
                counts.final(proto, op, status)
                return None
            ds = item[1]
            uid = str(getattr(ds, "SOPInstanceUID", ""))
            if sender is not None:
                sub_status = yield from sender.store(ds)
            else:
                sub_status = yield from _get_substore(proto, op, ds)
            counts.record(sub_status, uid)
            _respond(proto, op, 0xFF00, **counts.fields())
            yield from resolve(proto.drain())
    except _DestinationUnreachable:
        _respond(proto, op, MOVE_DESTINATION_UNKNOWN)
        return None
    except Exception as exc:
        log.error("%s: %s failed: %r", proto.assoc.name, event.name, exc)
        proto.handler_failed(event)
        if counts is not None:
            counts.final(proto, op, failure)
        else:
            _respond(proto, op, failure)
        return None
    finally:
        if sender is not None:
            yield from sender.close()
    counts.final(proto, op)
    return None


def _get_substore(proto: AssociationPort, op: Operation, ds: Any) -> Step[int]:
    """One C-GET sub-operation: a C-STORE on this association (PS3.4 C.4.3.3)."""
    ctx = _context_for_substore(proto, str(getattr(ds, "SOPClassUID", "")))
    if ctx is None:
        log.warning(
            "%s: no context to send %s back on", proto.assoc.name, getattr(ds, "SOPClassUID", "?")
        )
        return 0xA702  # Refused: Out of resources - unable to perform sub-operations
    request = dimse.c_store_rq(
        0,
        ctx.abstract_syntax,
        str(ds.SOPInstanceUID),
        priority=op.command.Priority or 0,
        move_originator_ae=None,
    )
    data = encode_dataset(ds, ctx.transfer_syntax)
    rsp, _ = yield proto.request(ctx.context_id, request, data)
    return int(rsp.Status if rsp.Status is not None else 0xC000)


def _context_for_substore(proto: AssociationPort, sop_class_uid: str) -> ContextInfo | None:
    for ctx in proto.assoc.accepted_contexts:
        if ctx.abstract_syntax == sop_class_uid and ctx.as_scu:
            return ctx
    return None


#: pynetdicom ``AE.associate`` keyword -> ``workers.scu.associate`` keyword
_ASSOCIATE_KWARGS = {"ae_title": "called_ae", "max_pdu": "max_pdu_length"}


class _DestinationUnreachable(Exception):
    """No association with the C-MOVE destination could be opened."""


class _MoveSender:
    """The associations a C-MOVE opens to its destination, one per SOP class seen,
    opened lazily so the handler's data sets are never all held at once."""

    def __init__(
        self,
        proto: AssociationPort,
        op: Operation,
        host: str,
        port: int,
        kwargs: dict[str, Any],
    ) -> None:
        self.proto = proto
        self.op = op
        self.host = host
        self.port = port
        self.kwargs = kwargs
        self.open: dict[tuple[str, str], Any] = {}
        self.ever_opened = False

    def store(self, ds: Any) -> Step[int]:
        from .engine import acse
        from .scu import associate

        sop_class = str(ds.SOPClassUID)
        transfer_syntax = str(
            getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or ""
        )
        # Uncompressed data can be encoded in whichever uncompressed syntax the
        # destination accepts; compressed (encapsulated) pixel data cannot be
        # transcoded here, so it needs a context with its own transfer syntax.
        compressed = bool(transfer_syntax) and transfer_syntax not in (
            *acse.UNCOMPRESSED_TRANSFER_SYNTAXES,
            acse.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
        )
        key = (sop_class, transfer_syntax if compressed else "")
        assoc = self.open.get(key)
        if assoc is None:
            proposals = [transfer_syntax] if transfer_syntax else []
            if not compressed:
                proposals += [
                    ts for ts in acse.UNCOMPRESSED_TRANSFER_SYNTAXES if ts not in proposals
                ]
            config = self.proto.config
            options: dict[str, Any] = {
                "called_ae": self.op.command.MoveDestination or "ANY-SCP",
                "calling_ae": config.ae_title,
                "acse_timeout": config.acse_timeout,
                "network_timeout": config.network_timeout,
            }
            # The handler's third item holds keyword arguments for the association;
            # the contract's names (pynetdicom's AE.associate) are translated.
            for name, value in self.kwargs.items():
                options[_ASSOCIATE_KWARGS.get(name, name)] = value
            try:
                assoc = yield associate(
                    self.host,
                    self.port,
                    contexts=[acse.Requested(sop_class, tuple(proposals))],
                    **options,
                )
            except Exception as exc:
                log.warning(
                    "%s: C-MOVE destination %s:%d refused: %r",
                    self.proto.assoc.name,
                    self.host,
                    self.port,
                    exc,
                )
                if not self.ever_opened:
                    # The destination cannot be reached at all: the whole C-MOVE is
                    # refused (0xA801), as the contract does, rather than every
                    # sub-operation failing one by one.
                    raise _DestinationUnreachable(str(exc)) from exc
                return 0xA801 if isinstance(exc, OSError) else 0xA702
            self.open[key] = assoc
            self.ever_opened = True
        try:
            ctx = assoc.context_for(sop_class, transfer_syntax if compressed else None)
        except ValueError as exc:  # the destination did not accept this SOP class / syntax
            log.warning("%s: C-MOVE sub-operation not possible: %s", self.proto.assoc.name, exc)
            return 0x0122  # Refused: SOP Class not supported
        data = encode_dataset(ds, ctx.transfer_syntax)
        rsp = yield assoc.send_c_store(
            data,
            sop_class_uid=sop_class,
            sop_instance_uid=str(ds.SOPInstanceUID),
            transfer_syntax=ctx.transfer_syntax,
            move_originator_ae=self.proto.assoc.requestor.ae_title,
            move_originator_message_id=self.op.message_id,
        )
        return int(rsp.Status if rsp.Status is not None else 0xC000)

    def close(self) -> Generator[Any, Any, None]:
        for assoc in self.open.values():
            try:
                yield assoc.release()
            except Exception as exc:
                log.info("C-MOVE sub-association release failed: %r", exc)
        self.open.clear()


# ------------------------------------------------------------------- C-STORE


class StoreOutcome:
    """How a C-STORE not stored by the built-in store was answered (for metrics)."""

    __slots__ = ("bytes_written", "status")

    def __init__(self, status: int, bytes_written: int) -> None:
        self.status = status
        self.bytes_written = bytes_written


def builtin_store(proto: AssociationPort, op: Operation) -> Step[None]:
    """The default C-STORE: commit the streamed temp file, then answer."""
    assert op.writer is not None
    result = yield from proto.commit_store(op)
    answer_store(proto, op, result)
    return None


def answer_store(proto: AssociationPort, op: Operation, result: StoreResult) -> None:
    """Answer a committed built-in C-STORE (the last part of :func:`builtin_store`;
    called directly when the commit is synchronous, see ``AssociationProtocol``)."""
    if result.comment and not result.ok:
        _respond(proto, op, result.status, ErrorComment=result.comment[:64])
    else:
        try:
            proto.send_store_response(op, result.status)
        except ConnectionError:
            log.info(
                "%s: response to message %d not sent: association gone",
                proto.assoc.name,
                op.message_id,
            )
    proto.store_done(op, result)


_SERVICES: dict[evt.InterventionEvent, Callable[..., Step[None]]] = {
    evt.EVT_C_ECHO: _simple,
    evt.EVT_C_STORE: _simple,
    evt.EVT_N_DELETE: _simple,
    evt.EVT_C_FIND: _c_find,
    evt.EVT_C_GET: _retrieve,
    evt.EVT_C_MOVE: _retrieve,
    evt.EVT_N_GET: _n_service,
    evt.EVT_N_SET: _n_service,
    evt.EVT_N_ACTION: _n_service,
    evt.EVT_N_CREATE: _n_service,
    evt.EVT_N_EVENT_REPORT: _n_service,
}
