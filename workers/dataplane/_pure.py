"""The pure-Python data plane: the twin of ``_core.pyx``, byte for byte the same.

:func:`walk_pdata` is the steady state of a receiving association in Sta6: it walks
P-DATA-TF PDUs and their PDV items in the engine's receive buffer, appends command
fragments to the command buffer and writes data-set fragments straight to the
instance file, and comes back only when the engine's own (Python) code must act:

``NEED_DATA``
    every complete unit in the buffer is consumed; more bytes are needed.
``MESSAGE_END``
    a PDV with the last-fragment bit is complete (command set or data set): the engine
    decodes the command or reports the data set.
``SLOW``
    anything unusual: a PDU other than P-DATA-TF, a length out of bounds, a PDV the
    engine would refuse, a command set over its bound, a data-set fragment with no
    file to write to, a failed write. Nothing of that unit was consumed (a failed
    write consumed exactly the bytes that reached the file), so the engine's own code
    takes that one step and produces the answer it always did.

When a ``digest`` (a hashlib object: the index's content digest) is given, every byte
written to the file is also fed to its ``update``, right after the write and from the
same receive buffer (no copy): the hash covers exactly the bytes that reached the
file, so the sink can go on hashing the fragments it is handed itself after a
``SLOW`` return, and the data plane still takes the fast path while the digest is on.

The caller's framing state goes in and comes out through a :class:`Framing`, reused
for every call, so that a call builds no object per PDU or fragment.
"""

from __future__ import annotations

import os
from time import perf_counter_ns
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hashlib import _Hash

__all__ = ["MESSAGE_END", "NEED_DATA", "SLOW", "Framing", "walk_pdata"]

NEED_DATA = 0
MESSAGE_END = 1
SLOW = 2

#: Framing.flags bits
COMMAND = 0x01  # the current PDV is a command fragment (control header bit 0)
LAST = 0x02  # the current PDV is the last fragment of its message (bit 1)
HAVE_COMMAND = 0x04  # the message's command set is complete; data-set fragments follow

_P_DATA_TF = 4


class Framing:
    """The framing state of one connection, in and out of :func:`walk_pdata`.

    ``start`` is the offset of the first unparsed byte, ``pdata_left`` the bytes of the
    current P-DATA-TF body not yet parsed, ``pdv_left`` those of the current PDV
    fragment, ``flags`` the bits above, ``msg_context`` the presentation context of
    the message being received (0: none). The outputs ``pdus`` (P-DATA-TF PDUs whose
    header was consumed), ``written`` (data-set bytes written to ``fd``) and
    ``write_ns`` (monotonic nanoseconds spent in those writes, for the storage write
    histogram) count from 0 at each call.
    """

    __slots__ = (
        "flags",
        "msg_context",
        "pdata_left",
        "pdus",
        "pdv_left",
        "start",
        "write_ns",
        "written",
    )

    def __init__(self) -> None:
        self.start = 0
        self.pdata_left = 0
        self.pdv_left = 0
        self.flags = 0
        self.msg_context = 0
        self.pdus = 0
        self.written = 0
        self.write_ns = 0


def walk_pdata(
    fr: Framing,
    buf: bytearray,
    end: int,
    contexts: bytes,
    max_pdu_length: int,
    command_buf: bytearray,
    max_command_length: int,
    fd: int,
    digest: _Hash | None = None,
) -> int:
    """Walk ``buf[fr.start:end]`` as described in the module doc; returns the code.

    ``contexts`` has 256 bytes, non-zero for each accepted presentation context id;
    ``max_pdu_length`` bounds a P-DATA-TF body (0: no bound); ``fd`` is the instance
    file for data-set fragments (-1: none, every data-set fragment is ``SLOW``);
    ``digest``, if not None, is updated with every byte written to ``fd``.
    """
    start = fr.start
    pdata_left = fr.pdata_left
    pdv_left = fr.pdv_left
    flags = fr.flags
    msg_context = fr.msg_context
    pdus = 0
    written = 0
    write_ns = 0
    code = NEED_DATA
    while True:
        avail = end - start
        if pdv_left:
            if not avail:
                break
            n = avail if avail < pdv_left else pdv_left
            if flags & COMMAND:
                if len(command_buf) + n > max_command_length:
                    code = SLOW
                    break
                command_buf += memoryview(buf)[start : start + n]
            else:
                if fd < 0:
                    code = SLOW
                    break
                done = 0
                failed = False
                t0 = perf_counter_ns()
                with memoryview(buf) as view:
                    while done < n:
                        try:
                            k = os.write(fd, view[start + done : start + n])
                        except OSError:
                            failed = True
                            break
                        if k <= 0:
                            failed = True
                            break
                        done += k
                    write_ns += perf_counter_ns() - t0
                    if digest is not None and done:
                        # after the timing: write_ns is the storage write histogram's
                        digest.update(view[start : start + done])
                written += done
                if failed:
                    start += done
                    pdv_left -= done
                    pdata_left -= done
                    code = SLOW
                    break
            start += n
            pdv_left -= n
            pdata_left -= n
            if not pdv_left and flags & LAST:
                code = MESSAGE_END
                break
            continue
        if pdata_left:
            # a PDV item header: length (4), context id, message control header
            if avail < 6:
                break
            if pdata_left < 6:
                code = SLOW
                break
            item_length = int.from_bytes(buf[start : start + 4], "big")
            context_id = buf[start + 4]
            control = buf[start + 5]
            if item_length < 2 or item_length - 2 > pdata_left - 6 or not contexts[context_id]:
                code = SLOW
                break
            is_command = control & 0x01
            if msg_context == 0:
                if not is_command:
                    code = SLOW
                    break
            elif context_id != msg_context or bool(is_command) == bool(flags & HAVE_COMMAND):
                # another context inside a message; a command fragment after the
                # command set, or a data-set fragment before it was complete
                code = SLOW
                break
            msg_context = context_id
            flags = (flags & HAVE_COMMAND) | (control & (COMMAND | LAST))
            start += 6
            pdata_left -= 6
            pdv_left = item_length - 2
            if not pdv_left and flags & LAST:
                code = MESSAGE_END
                break
            continue
        # a PDU header: only a P-DATA-TF of acceptable length is ours
        if avail < 6:
            break
        length = int.from_bytes(buf[start + 2 : start + 6], "big")
        if buf[start] != _P_DATA_TF or length < 6 or (max_pdu_length and length > max_pdu_length):
            code = SLOW
            break
        start += 6
        pdata_left = length
        pdus += 1
    fr.start = start
    fr.pdata_left = pdata_left
    fr.pdv_left = pdv_left
    fr.flags = flags
    fr.msg_context = msg_context
    fr.pdus = pdus
    fr.written = written
    fr.write_ns = write_ns
    return code
