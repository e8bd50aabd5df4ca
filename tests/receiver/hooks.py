"""Handlers the receiver tests bind with ``--handler`` (imported by the workers).

Each appends one line ``"<worker pid> <peer port> <calling AE>"`` to a file named by
an environment variable given to the receiver, so that a test can tell which worker
process served which association (the peer port is the SCU's local port):

* :func:`record_pid` (EVT_C_ECHO) answers C-ECHO with Success and writes to
  ``$PACSRX_TEST_PID_FILE``;
* :func:`record_association` (EVT_ESTABLISHED, a notification) writes to
  ``$PACSRX_TEST_ASSOC_FILE``.
"""

from __future__ import annotations

import os
from typing import Any

PID_FILE_ENV = "PACSRX_TEST_PID_FILE"
ASSOC_FILE_ENV = "PACSRX_TEST_ASSOC_FILE"


def _append(env: str, event: Any) -> None:
    path = os.environ.get(env)
    if not path:
        return
    requestor = event.assoc.requestor
    line = f"{os.getpid()} {requestor.port} {requestor.ae_title}\n".encode()
    # O_APPEND and one write per line: lines from several processes never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def record_pid(event: Any) -> int:
    """EVT_C_ECHO: record who served it; Success."""
    _append(PID_FILE_ENV, event)
    return 0x0000


def record_association(event: Any) -> None:
    """EVT_ESTABLISHED: record who serves the association."""
    _append(ASSOC_FILE_ENV, event)
