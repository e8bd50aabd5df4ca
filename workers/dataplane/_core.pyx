# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled data plane: the twin of ``_pure.py`` (read its module doc); the two
must behave identically, byte for byte, and ``tests/engine/test_dataplane.py`` holds
them to it.

Data-set fragments go to the instance file with write(2) on the receive buffer itself
and command fragments are memcpy'd onto the command buffer: no Python object is built
per PDU or per fragment, and the GIL is kept (a write to the page cache is short, and
the engine is single-threaded per association anyway). The index digest is fed from
the same receive buffer through a :class:`_Window` reused by the connection, so
hashing builds no object per fragment either.
"""

from cpython.buffer cimport PyBUF_FORMAT, PyBUF_ND, PyBUF_SIMPLE, PyBUF_STRIDES, PyBUF_WRITABLE
from cpython.buffer cimport PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from libc.errno cimport EINTR, errno
from libc.string cimport memcpy


cdef extern from "unistd.h" nogil:
    ssize_t c_write "write"(int fd, const void *buf, size_t count)

cdef extern from "time.h" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec *tp)
    int CLOCK_MONOTONIC


cdef inline long long _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000000000 + ts.tv_nsec


NEED_DATA = 0
MESSAGE_END = 1
SLOW = 2
COMMAND = 0x01
LAST = 0x02
HAVE_COMMAND = 0x04

cdef enum:
    _NEED_DATA = 0
    _MESSAGE_END = 1
    _SLOW = 2
    _COMMAND = 0x01
    _LAST = 0x02
    _HAVE_COMMAND = 0x04
    _P_DATA_TF = 4


cdef char *_FORMAT_B = "B"


cdef class _Window:
    """A read-only buffer over ``base[start:start + length]`` (a bytearray), aimed anew
    before each use: what the data plane hands the digest's ``update`` instead of a
    fresh memoryview per fragment. While exported it holds an export of ``base``, so
    ``base`` cannot be resized under a hash that runs without the GIL."""

    cdef object base
    cdef Py_ssize_t start
    cdef Py_ssize_t length
    cdef Py_buffer held
    cdef bint holding

    def __getbuffer__(self, Py_buffer *view, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("read-only window")
        if self.holding:
            raise BufferError("window already exported")
        PyObject_GetBuffer(self.base, &self.held, PyBUF_SIMPLE)
        self.holding = True
        view.buf = <char *>self.held.buf + self.start
        view.obj = self
        view.len = self.length
        view.readonly = 1
        view.itemsize = 1
        view.format = _FORMAT_B if flags & PyBUF_FORMAT else NULL
        view.ndim = 1
        view.shape = &view.len if flags & PyBUF_ND else NULL
        view.strides = &view.itemsize if (flags & PyBUF_STRIDES) == PyBUF_STRIDES else NULL
        view.suboffsets = NULL
        view.internal = NULL

    def __releasebuffer__(self, Py_buffer *view):
        if self.holding:
            self.holding = False
            PyBuffer_Release(&self.held)


cdef class Framing:
    """The framing state of one connection, in and out of :func:`walk_pdata`
    (see ``_pure.Framing``)."""

    cdef public Py_ssize_t start
    cdef public Py_ssize_t pdata_left
    cdef public Py_ssize_t pdv_left
    cdef public int flags
    cdef public int msg_context
    cdef public Py_ssize_t pdus
    cdef public Py_ssize_t written
    cdef public long long write_ns
    cdef _Window window

    def __init__(self):
        self.window = _Window()
        self.start = 0
        self.pdata_left = 0
        self.pdv_left = 0
        self.flags = 0
        self.msg_context = 0
        self.pdus = 0
        self.written = 0
        self.write_ns = 0


cdef inline Py_ssize_t _be32(const unsigned char *p) noexcept:
    return (<Py_ssize_t>p[0] << 24) | (<Py_ssize_t>p[1] << 16) | (<Py_ssize_t>p[2] << 8) | p[3]


def walk_pdata(
    Framing fr,
    bytearray buf,
    Py_ssize_t end,
    const unsigned char[::1] contexts,
    Py_ssize_t max_pdu_length,
    bytearray command_buf,
    Py_ssize_t max_command_length,
    int fd,
    object digest=None,
):
    """Walk ``buf[fr.start:end]`` (see ``_pure.walk_pdata``); returns the code."""
    if contexts.shape[0] < 256:
        raise ValueError("contexts must have 256 entries")
    if end < fr.start or end > PyByteArray_GET_SIZE(buf):
        raise ValueError("end is outside the buffer")
    cdef const unsigned char *data = <const unsigned char *>PyByteArray_AS_STRING(buf)
    cdef Py_ssize_t start = fr.start
    cdef Py_ssize_t pdata_left = fr.pdata_left
    cdef Py_ssize_t pdv_left = fr.pdv_left
    cdef int flags = fr.flags
    cdef int msg_context = fr.msg_context
    cdef Py_ssize_t pdus = 0
    cdef Py_ssize_t written = 0
    cdef long long write_ns = 0, t0
    cdef int code = _NEED_DATA
    cdef Py_ssize_t avail, n, done, old, item_length, length
    cdef ssize_t k
    cdef int context_id, control, is_command, failed
    cdef _Window window
    while True:
        avail = end - start
        if pdv_left:
            if not avail:
                break
            n = avail if avail < pdv_left else pdv_left
            if flags & _COMMAND:
                old = PyByteArray_GET_SIZE(command_buf)
                if old + n > max_command_length:
                    code = _SLOW
                    break
                PyByteArray_Resize(command_buf, old + n)
                memcpy(PyByteArray_AS_STRING(command_buf) + old, data + start, n)
            else:
                if fd < 0:
                    code = _SLOW
                    break
                done = 0
                failed = 0
                t0 = _now_ns()
                while done < n:
                    k = c_write(fd, data + start + done, <size_t>(n - done))
                    if k < 0 and errno == EINTR:
                        continue
                    if k <= 0:
                        failed = 1
                        break
                    done += k
                write_ns += _now_ns() - t0
                if digest is not None and done:
                    # the bytes that reached the file, from where they were written
                    window = fr.window
                    window.base = buf
                    window.start = start
                    window.length = done
                    try:
                        digest.update(window)
                    finally:
                        window.base = None
                written += done
                if failed:
                    start += done
                    pdv_left -= done
                    pdata_left -= done
                    code = _SLOW
                    break
            start += n
            pdv_left -= n
            pdata_left -= n
            if not pdv_left and flags & _LAST:
                code = _MESSAGE_END
                break
            continue
        if pdata_left:
            if avail < 6:
                break
            if pdata_left < 6:
                code = _SLOW
                break
            item_length = _be32(data + start)
            context_id = data[start + 4]
            control = data[start + 5]
            if item_length < 2 or item_length - 2 > pdata_left - 6 or not contexts[context_id]:
                code = _SLOW
                break
            is_command = control & 0x01
            if msg_context == 0:
                if not is_command:
                    code = _SLOW
                    break
            elif context_id != msg_context or (is_command != 0) == ((flags & _HAVE_COMMAND) != 0):
                code = _SLOW
                break
            msg_context = context_id
            flags = (flags & _HAVE_COMMAND) | (control & (_COMMAND | _LAST))
            start += 6
            pdata_left -= 6
            pdv_left = item_length - 2
            if not pdv_left and flags & _LAST:
                code = _MESSAGE_END
                break
            continue
        if avail < 6:
            break
        length = _be32(data + start + 2)
        if data[start] != _P_DATA_TF or length < 6 or (max_pdu_length and length > max_pdu_length):
            code = _SLOW
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
