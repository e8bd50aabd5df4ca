"""Storage Commitment Push Model SCP (PS3.4 Annex J), answered from the instance index.

Theory of operation
-------------------
An N-ACTION-RQ (SOP Class 1.2.840.10008.1.20.1, the well-known SOP Instance
1.2.840.10008.1.20.1.1, Action Type ID 1) asks us to take responsibility for the
instances of its Referenced SOP Sequence. :meth:`Commitment.n_action` checks the
request, records the job as a *pending report* in the index (table
``pending_reports``, :meth:`workers.index.Index.put_pending`: it survives a restart
and, in a shared PostgreSQL index, belongs to this node), and only then answers
Success: a requestor that was told Success is owed a report even if we crash.

Then, off the event loop, each referenced instance is decided (:func:`decide`):
committed when the index has it present, of the SOP class the requestor named, and
its file's data set still hashes to the digest recorded when it was received.
Otherwise it fails with the reason of PS3.4 J.3.3.1.1.2: 0x0112 No such object
instance (not received, marked missing, file gone), 0x0119 Class / Instance
conflict, 0x0110 Processing failure (file altered or unreadable). The decision is
stored with the job, so the report does not change between attempts.

The N-EVENT-REPORT-RQ (Event Type 1 all committed, 2 with failures) goes back on the
requestor's association when it is still open and the requestor accepted the SCP
role for Storage Commitment (SCP/SCU role selection, PS3.7 D.3.3.4); otherwise on a
new association to the requestor's AE title, whose address comes from ``[remote-aes]``
(we propose the SCP role there, PS3.4 J.3.3). An attempt that fails is retried with
back-off (``commitment_retry`` doubling to ``commitment_retry_max``) until delivered
or ``commitment_give_up`` seconds have passed.

Who sends a pending report: whoever holds its lease in the index
(:mod:`workers.index.pending`), first the worker that took the request. It renews
the lease before every attempt, for longer than an attempt can take, and through
the back-off sleeps; a renewal that fails means another claimant has the report, and
this one stops without sending. One worker per receiver (the sweeper) also claims,
at start-up and then periodically, this node's due reports whose lease has run out:
their worker died (or the receiver was restarted). The claim is atomic, so two
workers, or two receivers sharing a node name on one PostgreSQL index, never send
the same report at the same time.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .engine import dimse

if TYPE_CHECKING:
    from collections.abc import Callable

    from .handlers import Step
    from .index import Index
    from .session import AssociationPort, ContextInfo, IndexedPort, Operation

log = logging.getLogger("workers.commitment")

__all__ = ["STORAGE_COMMITMENT", "STORAGE_COMMITMENT_INSTANCE", "Commitment", "Job", "decide"]

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_STORAGE_COMMITMENT = 1  # Action Type ID (PS3.4 J.3.2.1)
EVENT_ALL_SUCCESS = 1  # Event Type IDs (PS3.4 J.3.3.1)
EVENT_FAILURES = 2

# N-ACTION-RSP statuses (PS3.7 10.1.4.1.10, C.5)
SUCCESS = 0x0000
INVALID_ARGUMENT = 0x0115  # missing / empty Transaction UID or Referenced SOP Sequence
NO_SUCH_INSTANCE = 0x0112
NO_SUCH_ACTION = 0x0123
RESOURCE_LIMITATION = 0x0213  # more references than we take in one request
PROCESSING_FAILURE = 0x0110

# Failure Reasons of the Failed SOP Sequence (PS3.4 J.3.3.1.1.2)
REASON_PROCESSING_FAILURE = 0x0110
REASON_NO_SUCH_OBJECT = 0x0112
REASON_CLASS_INSTANCE_CONFLICT = 0x0119

#: one delivery attempt (connect, associate, report, release) takes at most this long
_ATTEMPT_TIMEOUT = 90.0
#: a report being worked on stays leased this long past its next attempt (longer
#: than an attempt can take: the holder renews it before each one)
_LEASE = 120.0
_SWEEP_INTERVAL = 10.0
#: how long after it was acknowledged an instance may still be on its way into the
#: index (the index writers batch; see workers/index/writer.py)
_INDEX_GRACE = 3.0


@dataclass(slots=True)
class Job:
    """A storage commitment request and, once decided, its outcome."""

    key: str
    transaction_uid: str
    calling_ae: str
    #: (SOP Class UID, SOP Instance UID) as the requestor named them
    references: list[tuple[str, str]]
    created: float
    #: decided: the committed references, and the failed ones with their reason
    committed: list[tuple[str, str]] | None = None
    failed: list[tuple[str, str, int]] | None = None
    attempts: int = field(default=0)

    @property
    def decided(self) -> bool:
        return self.committed is not None

    def payload(self) -> bytes:
        return json.dumps(
            {
                "transaction_uid": self.transaction_uid,
                "calling_ae": self.calling_ae,
                "references": self.references,
                "created": self.created,
                "committed": self.committed,
                "failed": self.failed,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_payload(cls, key: str, payload: bytes, attempts: int = 0) -> Job:
        data = json.loads(payload)
        return cls(
            key,
            data["transaction_uid"],
            data["calling_ae"],
            [(str(c), str(i)) for c, i in data["references"]],
            float(data["created"]),
            None if data["committed"] is None else [(c, i) for c, i in data["committed"]],
            None if data["failed"] is None else [(c, i, int(r)) for c, i, r in data["failed"]],
            attempts,
        )

    def event_information(self, retrieve_ae: str) -> Any:
        """The N-EVENT-REPORT's Event Information (PS3.4 J.3.3.1.1)."""
        from pydicom import Dataset

        assert self.committed is not None and self.failed is not None
        ds = Dataset()
        ds.TransactionUID = self.transaction_uid
        ds.RetrieveAETitle = retrieve_ae
        if self.committed:
            items = []
            for sop_class, sop_instance in self.committed:
                item = Dataset()
                item.ReferencedSOPClassUID = sop_class
                item.ReferencedSOPInstanceUID = sop_instance
                items.append(item)
            ds.ReferencedSOPSequence = items
        if self.failed:
            failed = []
            for sop_class, sop_instance, reason in self.failed:
                item = Dataset()
                item.ReferencedSOPClassUID = sop_class
                item.ReferencedSOPInstanceUID = sop_instance
                item.FailureReason = reason
                failed.append(item)
            ds.FailedSOPSequence = failed
        return ds

    @property
    def event_type(self) -> int:
        return EVENT_FAILURES if self.failed else EVENT_ALL_SUCCESS


def decide(
    index: Index,
    storage_root: str,
    references: list[tuple[str, str]],
    object_digest: Callable[[str], tuple[int, str]] | None = None,
) -> tuple[list[tuple[str, str]], list[tuple[str, str, int]]]:
    """(committed, failed with reason) for ``references``; blocking (a thread).

    An instance is committed when the index has it present, of the SOP class named,
    and the data set of its file hashes to the recorded digest. A record without a
    digest (indexed from the file at start-up, no digest computed) is committed when
    its file is a readable Part 10 file.

    A record whose path is an ``s3://`` URL (``--storage s3://``) is checked the same
    way against its object, through ``object_digest`` (the object store's
    :meth:`~workers.storage.objectstore.ObjectStore.object_digest`: streams the object,
    or reads this node's spool while it is not uploaded yet), never against the local
    filesystem. Such a record is not marked missing when its object is absent: in
    ``spool`` mode another node may still be uploading it, and the bucket's own
    reconcile (:mod:`workers.index.reconcile_s3`) never marks either.
    """
    from .index.digest import dataset_digest

    records = index.get_many(uid for _, uid in references)
    committed: list[tuple[str, str]] = []
    failed: list[tuple[str, str, int]] = []
    gone: list[str] = []
    for sop_class, uid in references:
        record = records.get(uid)
        if record is None or record.state != "present":
            failed.append((sop_class, uid, REASON_NO_SUCH_OBJECT))
            continue
        if record.sop_class_uid != sop_class:
            failed.append((sop_class, uid, REASON_CLASS_INSTANCE_CONFLICT))
            continue
        remote = record.path.startswith("s3://")
        path = record.path if remote else os.path.join(storage_root, record.path)
        try:
            if not remote:
                _, digest = dataset_digest(path)
            elif object_digest is None:
                raise ValueError("not stored in an object store here")
            else:
                _, digest = object_digest(path)
        except FileNotFoundError:
            log.warning("commitment: %s is indexed but its file %s is gone", uid, path)
            if not remote:
                gone.append(uid)
            failed.append((sop_class, uid, REASON_NO_SUCH_OBJECT))
            continue
        except (OSError, ValueError) as exc:
            log.warning("commitment: cannot verify %s (%s): %s", uid, path, exc)
            failed.append((sop_class, uid, REASON_PROCESSING_FAILURE))
            continue
        if record.digest and digest != record.digest:
            log.error("commitment: %s was altered on disk (%s): digest differs", uid, path)
            failed.append((sop_class, uid, REASON_PROCESSING_FAILURE))
            continue
        committed.append((sop_class, uid))
    if gone:
        try:
            index.mark_missing(gone)
        except Exception as exc:  # the decision stands; reconcile marks it later
            log.warning("commitment: cannot mark %d record(s) missing: %s", len(gone), exc)
    return committed, failed


def parse_action(data: bytes | None, transfer_syntax: str, limit: int) -> tuple[int, Any]:
    """(status, (transaction UID, references)) of an N-ACTION's Action Information:
    SUCCESS and the request, or a failure status and a log message."""
    if not data:
        return INVALID_ARGUMENT, "no Action Information"
    from .events import decode_dataset

    try:
        ds = decode_dataset(data, transfer_syntax)
        transaction = str(ds.get("TransactionUID", "") or "").strip()
        sequence = ds.get("ReferencedSOPSequence")
    except Exception as exc:
        return INVALID_ARGUMENT, f"Action Information cannot be decoded: {exc}"
    if not transaction:
        return INVALID_ARGUMENT, "no Transaction UID"
    if sequence is None or len(sequence) == 0:
        # An empty list would be an unbounded question to the index (dcm4chee #3660).
        return INVALID_ARGUMENT, "empty or missing Referenced SOP Sequence"
    if len(sequence) > limit:
        return RESOURCE_LIMITATION, f"{len(sequence)} references, more than {limit}"
    references = []
    for item in sequence:
        sop_class = str(item.get("ReferencedSOPClassUID", "") or "").strip()
        sop_instance = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
        if not sop_class or not sop_instance:
            return INVALID_ARGUMENT, "a Referenced SOP Sequence item without both UIDs"
        references.append((sop_class, sop_instance))
    return SUCCESS, (transaction, references)


class Commitment:
    """The Storage Commitment SCP of one worker."""

    def __init__(self, services: IndexedPort) -> None:
        self.services = services
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False
        # Unique to this Commitment (node, process, instance): the lease holder's name.
        self.claimant = f"{services.index.node if services.index else ''}:{os.getpid()}:"
        self.claimant += uuid.uuid4().hex[:12]

    @property
    def settings(self) -> Any:
        return self.services.settings

    @property
    def index(self) -> Index:
        assert self.services.index is not None
        return self.services.index

    def _owner(self) -> str:
        return self.index.node

    # -------------------------------------------------------------- life cycle

    def start(self) -> None:
        if self.settings.sweeper:
            self._sweeper = asyncio.ensure_future(self._sweep_forever())

    async def close(self) -> None:
        """Stop; reports not yet delivered stay pending in the index."""
        self._closing = True
        keys = list(self._tasks)
        tasks = [t for t in (self._sweeper, *self._tasks.values()) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        self._tasks.clear()
        if keys and self.services.index is not None:
            # Give the leases back: whoever starts next takes the reports up at once.
            index, claimant = self.services.index, self.claimant
            try:
                await asyncio.get_running_loop().run_in_executor(
                    self.services.pool,
                    lambda: index.release_pending(keys, claimant, due=time.time()),
                )
            except Exception as exc:
                log.warning("pending storage commitment reports: leases kept: %r", exc)

    # --------------------------------------------------------------- N-ACTION

    def n_action(self, proto: AssociationPort, op: Operation) -> Step[None] | None:
        """The step answering ``op``, or None when it is not a Storage Commitment
        N-ACTION (then the caller answers as it would without us)."""
        if op.command.RequestedSOPClassUID != STORAGE_COMMITMENT:
            return None
        return self._n_action(proto, op)

    def _n_action(self, proto: AssociationPort, op: Operation) -> Step[None]:
        from .services import _respond

        cmd = op.command
        services = self.services
        loop = asyncio.get_running_loop()
        if cmd.RequestedSOPInstanceUID != STORAGE_COMMITMENT_INSTANCE:
            services.count("commitment_request", "refused")
            _respond(proto, op, NO_SUCH_INSTANCE)
            return None
        if cmd.ActionTypeID != REQUEST_STORAGE_COMMITMENT:
            services.count("commitment_request", "refused")
            _respond(proto, op, NO_SUCH_ACTION)
            return None
        ctx = proto.context_info(op.context_id)
        status, parsed = yield loop.run_in_executor(
            services.pool,
            parse_action,
            op.data,
            ctx.transfer_syntax,
            self.settings.commitment_max_references,
        )
        if status != SUCCESS:
            log.info(
                "%s: storage commitment request refused (0x%04x): %s",
                proto.assoc.name,
                status,
                parsed,
            )
            services.count("commitment_request", "refused")
            _respond(proto, op, status)
            return None
        transaction, references = parsed
        if not proto.can_send:
            return None  # the requestor left: nobody to tell Success, nothing owed
        job = Job(
            uuid.uuid4().hex,
            transaction,
            proto.assoc.requestor.ae_title,
            references,
            time.time(),
        )
        try:
            # Recorded before Success is answered: a requestor told Success is owed
            # the report, whatever happens to this worker next.
            yield loop.run_in_executor(services.pool, self._put, job)
        except Exception as exc:
            log.error("%s: cannot record storage commitment request: %r", proto.assoc.name, exc)
            services.count("commitment_request", "failed")
            _respond(proto, op, PROCESSING_FAILURE)
            return None
        services.count("commitment_request", "accepted")
        log.info(
            "%s: storage commitment %s: %d reference(s)",
            proto.assoc.name,
            transaction,
            len(references),
        )
        _respond(proto, op, SUCCESS)
        self._run(job, proto)
        return None

    # ------------------------------------------------------------- delivery

    def _run(self, job: Job, proto: AssociationPort | None) -> None:
        if self._closing or job.key in self._tasks:
            return
        task = asyncio.ensure_future(self._deliver(job, proto))
        self._tasks[job.key] = task
        task.add_done_callback(lambda _t: self._tasks.pop(job.key, None))

    async def _deliver(self, job: Job, proto: AssociationPort | None) -> None:
        services = self.services
        loop = asyncio.get_running_loop()
        delay = self.settings.commitment_retry
        try:
            if not job.decided:
                # --storage s3://: records name objects, checked through the store.
                reader = getattr(services, "object_digest", None)
                committed, failed = await loop.run_in_executor(
                    services.pool,
                    decide,
                    self.index,
                    services.storage_root,
                    job.references,
                    reader,
                )
                unknown = [(c, i) for c, i, r in failed if r == REASON_NO_SUCH_OBJECT]
                wait = job.created + _INDEX_GRACE - time.time()
                if unknown and wait > 0:
                    # Instances are indexed in batches a moment after they are stored
                    # (by whichever worker took them): one acknowledged a moment ago may
                    # not be in the index yet. Ask again once that moment has passed.
                    await asyncio.sleep(wait)
                    again, still = await loop.run_in_executor(
                        services.pool,
                        decide,
                        self.index,
                        services.storage_root,
                        unknown,
                        reader,
                    )
                    committed += again
                    failed = [f for f in failed if f[2] != REASON_NO_SUCH_OBJECT] + still
                job.committed, job.failed = committed, failed
                await loop.run_in_executor(services.pool, self._put, job)
                assert job.failed is not None and job.committed is not None
                services.count("commitment_instance", "committed", len(job.committed))
                services.count("commitment_instance", "failed", len(job.failed))
            while True:
                # Renewed before each attempt: if it cannot be, the report is another
                # claimant's now (ours ran out), and sending it too would duplicate it.
                if not await loop.run_in_executor(
                    services.pool, self.index.claim_pending, job.key, self.claimant, _LEASE
                ):
                    log.warning(
                        "storage commitment %s: report taken over by another sender",
                        job.transaction_uid,
                    )
                    return
                try:
                    how = await asyncio.wait_for(self._send(job, proto), _ATTEMPT_TIMEOUT)
                except Exception as exc:
                    job.attempts += 1
                    proto = None  # the requestor's association is no use any more
                    if time.time() - job.created > self.settings.commitment_give_up:
                        log.error(
                            "storage commitment %s to %s: giving up after %d attempts: %s",
                            job.transaction_uid,
                            job.calling_ae,
                            job.attempts,
                            exc,
                        )
                        services.count("commitment_report", "given_up")
                        await loop.run_in_executor(
                            services.pool, self.index.delete_pending, job.key
                        )
                        return
                    log.warning(
                        "storage commitment %s to %s: report not delivered (%s); again in %g s",
                        job.transaction_uid,
                        job.calling_ae,
                        exc,
                        delay,
                    )
                    services.count("commitment_report", "retry")
                    await loop.run_in_executor(services.pool, self._retry_later, job, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.settings.commitment_retry_max)
                    continue
                log.info(
                    "storage commitment %s to %s: report delivered (%s, %d committed, %d failed)",
                    job.transaction_uid,
                    job.calling_ae,
                    how,
                    len(job.committed or ()),
                    len(job.failed or ()),
                )
                services.count("commitment_report", how)
                await loop.run_in_executor(services.pool, self.index.delete_pending, job.key)
                return
        except asyncio.CancelledError:
            raise
        except Exception:
            # The report stays pending: the sweeper takes it up again.
            log.exception("storage commitment %s: internal error", job.transaction_uid)

    def _put(self, job: Job) -> None:
        """Record the job (due now), its lease held by us (runs in the pool)."""
        self.index.put_pending(
            job.key,
            job.payload(),
            time.time(),
            owner=self._owner(),
            claimant=self.claimant,
            lease=_LEASE,
        )

    def _retry_later(self, job: Job, delay: float) -> None:
        """An attempt failed: due again in ``delay`` s, leased through the wait."""
        self.index.reschedule_pending(job.key, time.time() + delay)
        self.index.claim_pending(job.key, self.claimant, delay + _LEASE)

    async def _send(self, job: Job, proto: AssociationPort | None) -> str:
        """Send the report once; returns how ("same_association" / "new_association").
        Raises when it was not delivered."""
        ctx = _reverse_context(proto) if proto is not None else None
        if proto is not None and ctx is not None and proto.can_send:
            try:
                await self._send_on(proto, ctx, job)
                return "same_association"
            except Exception as exc:
                log.info(
                    "storage commitment %s: not sent on the requestor's association (%s); "
                    "opening one",
                    job.transaction_uid,
                    exc,
                )
        await self._send_new(job)
        return "new_association"

    async def _send_on(self, proto: AssociationPort, ctx: ContextInfo, job: Job) -> None:
        from .datasets import encode_dataset

        data = encode_dataset(job.event_information(self.services.ae_title), ctx.transfer_syntax)
        request = dimse.n_event_report_rq(
            0, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, job.event_type, True
        )
        timeout = proto.config.handler_timeout or 60.0
        rsp, _ = await asyncio.wait_for(proto.request(ctx.context_id, request, data), timeout)
        _check_reply(rsp.Status)

    async def _send_new(self, job: Job) -> None:
        from .engine import acse
        from .engine import pdu as p
        from .scu import associate

        remote = self.settings.remote_aes.get(job.calling_ae)
        if remote is None:
            raise LookupError(f"{job.calling_ae!r} is not in [remote-aes]")
        config = self.services.server.config
        assoc = await associate(
            remote.host,
            remote.port,
            called_ae=job.calling_ae,
            calling_ae=config.ae_title,
            contexts=[acse.Requested(STORAGE_COMMITMENT)],
            # We are the association requestor and the Storage Commitment SCP:
            # PS3.4 J.3.3 has us propose the SCP role for the SOP class.
            roles=[p.RoleSelection(STORAGE_COMMITMENT, False, True)],
            acse_timeout=config.acse_timeout,
            dimse_timeout=config.handler_timeout,
            network_timeout=config.network_timeout,
        )
        try:
            status, _ = await assoc.send_n_event_report(
                job.event_information(config.ae_title),
                job.event_type,
                STORAGE_COMMITMENT,
                STORAGE_COMMITMENT_INSTANCE,
            )
            _check_reply(status)
        finally:
            try:
                await assoc.release()
            except Exception:
                assoc.abort()

    # -------------------------------------------------------------- sweeper

    async def _sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                # Claimed (leased to us) in one step: another worker's sweep, or another
                # receiver's, cannot take the same report.
                claim = functools.partial(
                    self.index.claim_due,
                    time.time(),
                    owner=self._owner(),
                    claimant=self.claimant,
                    lease=_LEASE,
                )
                reports = await loop.run_in_executor(self.services.pool, claim)
                for report in reports:
                    if report.key in self._tasks:
                        continue
                    try:
                        job = Job.from_payload(report.key, report.payload, report.attempts)
                    except (ValueError, KeyError, TypeError) as exc:
                        log.error("pending report %s cannot be read (%s): dropped", report.key, exc)
                        await loop.run_in_executor(
                            self.services.pool, self.index.delete_pending, report.key
                        )
                        continue
                    log.info(
                        "storage commitment %s to %s: taking over the pending report",
                        job.transaction_uid,
                        job.calling_ae,
                    )
                    self._run(job, None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("pending storage commitment reports: sweep failed: %r", exc)
            await asyncio.sleep(_SWEEP_INTERVAL)


def _reverse_context(proto: AssociationPort) -> ContextInfo | None:
    """The Storage Commitment context on which we may send the requestor an
    N-EVENT-REPORT: one where it accepted the SCP role (so ours is SCU)."""
    for ctx in proto.assoc.accepted_contexts:
        if ctx.abstract_syntax == STORAGE_COMMITMENT and ctx.as_scu:
            return ctx
    return None


def _check_reply(status: int | None) -> None:
    """The N-EVENT-REPORT-RSP: anything but Success or a Warning is not delivered."""
    if status is None or dimse.status_category(status) not in ("Success", "Warning"):
        raise RuntimeError(f"N-EVENT-REPORT answered 0x{(status or 0):04x}")
