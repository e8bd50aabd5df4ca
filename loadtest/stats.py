"""What one run measured: per-operation latencies, statuses, failures; merged and reported.

Each worker process fills a :class:`Stats` (plain counters and :class:`Histogram` s,
nothing shared, nothing locked), ships it to the parent as :meth:`Stats.to_wire` at the
end, and the parent merges them into one :class:`Report`, printed as text and written
as JSON.

Operation names: ``C-STORE``, ``C-ECHO``, ``A-ASSOCIATE`` (set-up: TCP connect to
A-ASSOCIATE-AC), ``A-RELEASE`` (A-RELEASE-RQ to -RP) and, in the echo scenario,
``echo cycle`` (associate + C-ECHO + release: the unit the echo scenario counts).

Failure kinds: ``status`` (a DIMSE response with a Failure, Cancel or unknown status;
the detail is the status code), ``rejected`` (A-ASSOCIATE-RJ), ``aborted`` (A-ABORT or
the connection closed under the association), ``timeout``, ``connection`` (refused,
reset, unreachable...), ``error`` (anything else, e.g. no accepted presentation
context), ``lost`` (a worker process died with operations unaccounted for).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workers.engine import dimse
from workers.scu import AssociationAborted, AssociationRejected

from .histogram import Histogram
from .units import MB

__all__ = ["OPERATIONS", "Report", "Stats", "classify", "status_text"]

OPERATIONS = ("C-STORE", "C-ECHO", "A-ASSOCIATE", "A-RELEASE", "echo cycle")


def status_text(status: int) -> str:
    """``0xA700 (OUT_OF_RESOURCES)`` or ``0xA7F3``."""
    try:
        return f"0x{status:04X} ({dimse.Status(status).name})"
    except ValueError:
        return f"0x{status:04X}"


def classify(exc: BaseException) -> tuple[str, str]:
    """(kind, detail) of an exception that failed an operation."""
    if isinstance(exc, AssociationRejected):
        return "rejected", str(exc).removeprefix("association rejected: ")
    if isinstance(exc, AssociationAborted):
        return "aborted", exc.detail
    if isinstance(exc, TimeoutError):
        return "timeout", str(exc) or "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection", "connection refused"
    if isinstance(exc, ConnectionError | OSError):
        return "connection", f"{type(exc).__name__}: {exc}"
    return "error", f"{type(exc).__name__}: {exc}"


@dataclass(slots=True)
class Stats:
    """One process's measurements."""

    latency: dict[str, Histogram] = field(default_factory=dict)
    #: op -> status code -> count, for every DIMSE response received
    statuses: dict[str, dict[int, int]] = field(default_factory=dict)
    #: (op, kind, detail) -> count; detail is the status text for kind "status"
    failures: dict[tuple[str, str, str], int] = field(default_factory=dict)
    operations: int = 0  # operations attempted and finished (either way)
    failed: int = 0
    instances: int = 0  # C-STOREs answered Success or Warning
    bytes: int = 0  # data-set bytes of those instances
    associations: int = 0  # associations established
    started: float = 0.0  # time.monotonic() when sending started
    finished: float = 0.0  # time.monotonic() of the last operation's end
    cpu_seconds: float = 0.0
    interrupted: bool = False

    def hist(self, op: str) -> Histogram:
        h = self.latency.get(op)
        if h is None:
            h = self.latency[op] = Histogram()
        return h

    def status(self, op: str, status: int) -> None:
        by_op = self.statuses.get(op)
        if by_op is None:
            by_op = self.statuses[op] = {}
        by_op[status] = by_op.get(status, 0) + 1

    def fail(self, op: str, kind: str, detail: str) -> None:
        """Count a failed operation (also counted in ``operations``)."""
        self.operations += 1
        self.failed += 1
        key = (op, kind, _short(detail))
        self.failures[key] = self.failures.get(key, 0) + 1

    # ------------------------------------------------------------ transport

    def to_wire(self) -> dict[str, Any]:
        return {
            "latency": {op: h.to_wire() for op, h in self.latency.items()},
            "statuses": {op: dict(s) for op, s in self.statuses.items()},
            "failures": [[*key, n] for key, n in self.failures.items()],
            "operations": self.operations,
            "failed": self.failed,
            "instances": self.instances,
            "bytes": self.bytes,
            "associations": self.associations,
            "started": self.started,
            "finished": self.finished,
            "cpu_seconds": self.cpu_seconds,
            "interrupted": self.interrupted,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Stats:
        s = cls()
        s.latency = {op: Histogram.from_wire(h) for op, h in data["latency"].items()}
        s.statuses = {
            op: {int(k): int(v) for k, v in st.items()} for op, st in data["statuses"].items()
        }
        s.failures = {(op, kind, detail): int(n) for op, kind, detail, n in data["failures"]}
        for name in ("operations", "failed", "instances", "bytes", "associations"):
            setattr(s, name, int(data[name]))
        s.started = float(data["started"])
        s.finished = float(data["finished"])
        s.cpu_seconds = float(data["cpu_seconds"])
        s.interrupted = bool(data["interrupted"])
        return s

    def merge(self, other: Stats) -> None:
        for op, h in other.latency.items():
            self.hist(op).merge(h)
        for op, statuses in other.statuses.items():
            for status, n in statuses.items():
                by_op = self.statuses.setdefault(op, {})
                by_op[status] = by_op.get(status, 0) + n
        for key, n in other.failures.items():
            self.failures[key] = self.failures.get(key, 0) + n
        self.operations += other.operations
        self.failed += other.failed
        self.instances += other.instances
        self.bytes += other.bytes
        self.associations += other.associations
        if other.started and (not self.started or other.started < self.started):
            self.started = other.started
        self.finished = max(self.finished, other.finished)
        self.cpu_seconds += other.cpu_seconds
        self.interrupted = self.interrupted or other.interrupted


#: Runs shorter than this give no rates (see Report.rate).
MIN_RATE_INTERVAL = 1e-3


def _short(detail: str, limit: int = 160) -> str:
    return detail if len(detail) <= limit else detail[: limit - 3] + "..."


@dataclass(slots=True)
class Report:
    """The merged result of a run, with what is needed to print it."""

    stats: Stats
    scenario: str
    config: dict[str, Any]
    instance_size: int | None
    generator_processes: int
    notes: list[str] = field(default_factory=list)

    @property
    def elapsed(self) -> float:
        s = self.stats
        return max(s.finished - s.started, 0.0) if s.started else 0.0

    def rate(self, n: float) -> float:
        """``n`` per second of the run; 0 when the run was too short to time (every
        operation failed at once, say): a count over no measurable time is no rate."""
        elapsed = self.elapsed
        return n / elapsed if elapsed >= MIN_RATE_INTERVAL else 0.0

    @property
    def ok(self) -> bool:
        return self.stats.failed == 0

    def to_json(self) -> dict[str, Any]:
        s = self.stats
        elapsed = self.elapsed
        rate = self.rate
        by_status: dict[str, int] = {}
        by_reason: dict[str, int] = {}
        for (_op, kind, detail), n in s.failures.items():
            if kind == "status":
                code = detail.split(" ", 1)[0]
                by_status[code] = by_status.get(code, 0) + n
            else:
                by_reason[kind] = by_reason.get(kind, 0) + n
        return {
            "scenario": self.scenario,
            "config": self.config,
            "interrupted": s.interrupted,
            "elapsed_seconds": elapsed,
            "operations": s.operations,
            "operations_per_second": rate(s.operations),
            "failed": s.failed,
            "instances": s.instances,
            "instances_per_second": rate(s.instances),
            "bytes": s.bytes,
            "megabytes_per_second": rate(s.bytes) / MB,
            "instance_size_bytes": self.instance_size,
            "associations": s.associations,
            "latency_seconds": {
                op: s.latency[op].summary() for op in OPERATIONS if op in s.latency
            },
            "statuses": {
                op: {f"0x{code:04X}": n for code, n in sorted(st.items())}
                for op, st in s.statuses.items()
            },
            "failures": {
                "by_status": by_status,
                "by_reason": by_reason,
                "detail": [
                    {"operation": op, "kind": kind, "detail": detail, "count": n}
                    for (op, kind, detail), n in sorted(s.failures.items(), key=lambda kv: -kv[1])
                ],
            },
            "generator": {
                "processes": self.generator_processes,
                "cpu_seconds": s.cpu_seconds,
            },
            "notes": self.notes,
        }

    def text(self) -> str:
        """The human-readable summary printed at the end of a run."""
        s = self.stats
        elapsed = self.elapsed
        out = []
        head = f"pacs-loadtest {self.scenario}"
        if s.interrupted:
            head += " (interrupted)"
        out.append(head)

        per = self.rate

        out.append(
            f"  elapsed {elapsed:.2f} s, {s.operations} operations ({per(s.operations):.1f}/s), "
            f"{s.failed} failed, {s.associations} associations"
        )
        if s.instances or self.scenario != "echo":
            size = f" of {self.instance_size} bytes" if self.instance_size else ""
            out.append(
                f"  {s.instances} instances{size} stored: {per(s.instances):.1f} instances/s, "
                f"{per(s.bytes) / MB:.2f} MB/s"
            )
        out.append(
            f"  generator: {self.generator_processes} process(es), {s.cpu_seconds:.2f} CPU s"
        )
        if s.latency:
            out.append("  latency (ms)      count       p50       p95       p99       max")
            for op in OPERATIONS:
                h = s.latency.get(op)
                if h is None or not h.count:
                    continue
                out.append(
                    f"    {op:<12} {h.count:>10} "
                    + " ".join(
                        f"{v * 1000:>9.3f}"
                        for v in (h.percentile(50), h.percentile(95), h.percentile(99), h.maximum)
                    )
                )
        unusual = {op: st for op, st in s.statuses.items() if any(code != 0 for code in st)}
        for op, st in unusual.items():
            listed = ", ".join(f"{status_text(c)}: {n}" for c, n in sorted(st.items()))
            out.append(f"  {op} statuses: {listed}")
        if s.failures:
            out.append("  failures:")
            for (op, kind, detail), n in sorted(s.failures.items(), key=lambda kv: -kv[1]):
                out.append(f"    {n:>8}  {op} {kind}: {detail}")
        for note in self.notes:
            out.append(f"  note: {note}")
        return "\n".join(out)
