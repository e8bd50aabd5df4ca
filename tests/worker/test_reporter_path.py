"""One path from an association's events to the metrics: its ``reporter``.

The association and its parts (storing, trail, negotiation, timers) and the services
report through :class:`workers.session.Reporter`; only the association's constructor
looks at the server's telemetry, to pick the reporter.
"""

from __future__ import annotations

import ast
from pathlib import Path

from workers.session import NULL_REPORTER, Reporter

WORKERS = Path(__file__).resolve().parents[2] / "workers"
REPORTING = ("association", "storing", "trail", "negotiation", "timeouts", "services")


def _telemetry_uses(name: str) -> list[int]:
    tree = ast.parse((WORKERS / f"{name}.py").read_text())
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr == "telemetry"
    ]


def test_only_the_constructor_reads_the_telemetry() -> None:
    uses = {name: _telemetry_uses(name) for name in REPORTING}
    assert len(uses.pop("association")) == 1  # picks the reporter
    assert uses == {name: [] for name in uses}


def test_null_reporter_takes_every_report() -> None:
    reporter: Reporter[object] = NULL_REPORTER
    for method in ("record", "dimse", "stored", "handler_error", "context_rejected"):
        assert callable(getattr(reporter, method))
    reporter.dimse(0, 0x0001, None)
    reporter.handler_error("EVT_C_STORE")
    reporter.context_rejected("abstract-syntax-not-supported")
