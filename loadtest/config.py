"""The settings of one load-generator run, as the command line gives them.

A :class:`RunConfig` is built by :mod:`loadtest.cli` (or by ``compare`` for each
cell), pickled to every worker process, and echoed into the JSON report. :meth:`share`
splits the load over the processes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from workers.engine import acse

from .payload import CT_IMAGE_STORAGE, FileEntry

__all__ = ["SCENARIOS", "RunConfig", "Share"]

SCENARIOS = ("store", "echo", "mixed")


@dataclass(slots=True, frozen=True)
class Share:
    """What one worker process does: its associations, operations and rate."""

    index: int
    associations: int
    count: int | None
    rate: float | None


@dataclass(slots=True)
class RunConfig:
    host: str = "127.0.0.1"
    port: int = 11112
    called_ae: str = "ANY-SCP"
    calling_ae: str = "PACS-LOADTEST"
    scenario: str = "store"
    processes: int = 1
    associations: int = 1
    count: int | None = None
    duration: float | None = None
    rate: float | None = None
    per_association: int | None = None
    async_ops: int | None = None
    max_pdu: int = 1024 * 1024
    size: int = 8 * 1024
    sop_class: str = CT_IMAGE_STORAGE
    transfer_syntax: str = acse.EXPLICIT_VR_LITTLE_ENDIAN
    files: list[FileEntry] = field(default_factory=list)
    echo_every: int = 10  # mixed: every n-th operation is a C-ECHO
    record_path: str | None = None
    connect_timeout: float = 10.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    run_id: str = ""
    #: after a stop (duration over, Ctrl-C), how long operations in flight may take
    grace: float = 30.0

    def shares(self) -> list[Share]:
        """Associations, count and rate per process, as even as whole numbers allow;
        never more processes than associations."""
        processes = max(1, min(self.processes, self.associations))
        out = []
        for i in range(processes):
            assocs = self.associations // processes + (i < self.associations % processes)
            fraction = assocs / self.associations
            count = None
            if self.count is not None:
                # the first processes take the remainder, like the associations
                count = self.count // processes + (i < self.count % processes)
            rate = self.rate * fraction if self.rate else None
            out.append(Share(i, assocs, count, rate))
        return out

    def with_(self, **changes: Any) -> RunConfig:
        return replace(self, **changes)

    def public(self) -> dict[str, Any]:
        """The settings for the report (the file list summarised)."""
        d = asdict(self)
        d["files"] = len(self.files)
        return d
