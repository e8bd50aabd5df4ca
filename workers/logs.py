"""Log lines on stderr, text or JSON, the same for every process of the receiver.

Lines written with :func:`workers.activity.log_fields` carry their fields in the
record's ``fields`` attribute: as text they are already in the message
(``association peer=... outcome=...``); as JSON each is a key of the object, next to
``time``, ``process``, ``pid``, ``level``, ``logger`` and ``message``, so a log
shipper needs no parsing.
"""

from __future__ import annotations

import json
import logging
import sys

__all__ = ["JsonFormatter", "setup_logging"]

#: keys the formatter writes itself: a field of that name is written as ``field_<name>``
_RESERVED = frozenset(("time", "process", "pid", "level", "logger", "message", "exception"))


def setup_logging(level: str, fmt: str, process_name: str) -> None:
    """Route the root logger to stderr as text (default) or one JSON object a line."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(process_name))
    else:
        handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s {process_name}[%(process)d] %(levelname)s %(name)s: %(message)s"
            )
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class JsonFormatter(logging.Formatter):
    """One JSON object per record; a record's ``fields`` become keys."""

    def __init__(self, process_name: str) -> None:
        super().__init__()
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record),
            "process": self.process_name,
            "pid": record.process,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                out[f"field_{key}" if key in _RESERVED else str(key)] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)
