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
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.errno cimport EINTR, errno
from libc.string cimport memcpy, memset


cdef extern from "Python.h":
    bint PyUnicode_Check(object o)
    bint PyUnicode_IS_ASCII(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    void *PyUnicode_DATA(object o)
    long long PyLong_AsLongLongAndOverflow(object o, int *overflow) except? -1


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


# ------------------------------------------------------------------ C-STORE, per instance
#
# The twins of _pure's decode_store_rq, encode_store_rsp, uid_valid and file_meta (read
# their docstrings): None is the SLOW answer. Nothing here keeps state between calls.

cdef enum:
    _SEEN_CLASS = 0x01
    _SEEN_FIELD = 0x02
    _SEEN_MID = 0x04
    _SEEN_PRIORITY = 0x08
    _SEEN_CDST = 0x10
    _SEEN_INSTANCE = 0x20
    _SEEN_MOVE_AE = 0x40
    _SEEN_MOVE_MID = 0x80


cdef inline Py_ssize_t _le32(const unsigned char *p) noexcept:
    return (<Py_ssize_t>p[3] << 24) | (<Py_ssize_t>p[2] << 16) | (<Py_ssize_t>p[1] << 8) | p[0]


cdef inline bint _is_ascii(const unsigned char *p, Py_ssize_t n) noexcept:
    cdef Py_ssize_t i
    for i in range(n):
        if p[i] & 0x80:
            return False
    return True


cdef inline str _ascii_str(const unsigned char *p, Py_ssize_t n):
    return PyUnicode_DecodeASCII(<const char *>p, n, NULL)


def decode_store_rq(data):
    """The checked C-STORE-RQ in the command set ``data``, or None (see ``_pure``)."""
    cdef const unsigned char *p
    cdef Py_ssize_t end
    if type(data) is bytearray:
        p = <const unsigned char *>PyByteArray_AS_STRING(data)
        end = PyByteArray_GET_SIZE(data)
    else:
        if type(data) is not bytes:
            data = bytes(data)
        p = <const unsigned char *>PyBytes_AS_STRING(data)
        end = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t offset = 0, start, length
    cdef unsigned int group, elem, bit, seen = 0
    cdef long command_field = -1, mid = -1, priority = -1, cdst = -1, move_mid = -1, value
    # [start, end) of each string value once stripped, as offsets into p
    cdef Py_ssize_t cls_s = 0, cls_e = 0, inst_s = 0, inst_e = 0, ae_s = 0, ae_e = 0
    cdef Py_ssize_t s, e
    while offset < end:
        if end - offset < 8:
            return None
        group = p[offset] | p[offset + 1] << 8
        elem = p[offset + 2] | p[offset + 3] << 8
        length = _le32(p + offset + 4)
        start = offset + 8
        if length > end - start or group:
            return None
        offset = start + length
        if elem == 0x0100 or elem == 0x0110 or elem == 0x0700 or elem == 0x0800 or elem == 0x1031:
            if length == 0:  # absent, as the decoder counts it: no duplicate either
                continue
            if length != 2:
                return None
            value = p[start] | p[start + 1] << 8
            if elem == 0x0100:
                bit = _SEEN_FIELD
                command_field = value
            elif elem == 0x0110:
                bit = _SEEN_MID
                mid = value
            elif elem == 0x0700:
                bit = _SEEN_PRIORITY
                priority = value
            elif elem == 0x0800:
                bit = _SEEN_CDST
                cdst = value
            else:
                bit = _SEEN_MOVE_MID
                move_mid = value
        elif elem == 0x0002 or elem == 0x1000 or elem == 0x1030:
            if not _is_ascii(p + start, length):
                return None
            s = start
            e = offset
            while e > s and (p[e - 1] == 0 or p[e - 1] == 32):
                e -= 1
            if elem == 0x0002:
                bit = _SEEN_CLASS
                cls_s, cls_e = s, e
            elif elem == 0x1000:
                bit = _SEEN_INSTANCE
                inst_s, inst_e = s, e
            else:
                while s < e and (p[s] == 0 or p[s] == 32):
                    s += 1
                bit = _SEEN_MOVE_AE
                ae_s, ae_e = s, e
        elif elem == 0x0000:  # group length: checked, never counted (nor a duplicate)
            if length != 4:
                return None
            continue
        else:
            return None
        if seen & bit:
            return None
        seen |= bit
    if command_field != 0x0001 or cdst < 0 or cdst == 0x0101:
        return None
    if mid < 0 or priority < 0 or priority > 2:
        return None
    if not (0 < cls_e - cls_s <= 64 and 0 < inst_e - inst_s <= 64):
        return None
    if ae_e - ae_s > 16:
        return None
    return (
        mid,
        priority,
        cdst,
        _ascii_str(p + cls_s, cls_e - cls_s),
        _ascii_str(p + inst_s, inst_e - inst_s),
        _ascii_str(p + ae_s, ae_e - ae_s) if seen & _SEEN_MOVE_AE else None,
        move_mid if move_mid >= 0 else None,
    )


cdef inline long _in_range(object v, long low, long high) except -2:
    """``v`` when it is an int within [low, high], else -1."""
    cdef int overflow = 0
    cdef long long x = PyLong_AsLongLongAndOverflow(v, &overflow)
    if overflow or x < low or x > high:
        return -1
    return <long>x


cdef inline const unsigned char *_ascii_data(object s) except? NULL:
    """The characters of the str ``s`` when it is ASCII (one byte each), else NULL;
    TypeError when it is not a str (a subclass is one)."""
    if not PyUnicode_Check(s):
        raise TypeError(f"expected str, got {type(s).__name__}")
    if not PyUnicode_IS_ASCII(s):
        return NULL
    return <const unsigned char *>PyUnicode_DATA(s)


cdef inline unsigned char *_put16(unsigned char *q, unsigned int v) noexcept:
    q[0] = v & 0xFF
    q[1] = (v >> 8) & 0xFF
    return q + 2


cdef inline unsigned char *_put32(unsigned char *q, size_t v) noexcept:
    q[0] = v & 0xFF
    q[1] = (v >> 8) & 0xFF
    q[2] = (v >> 16) & 0xFF
    q[3] = (v >> 24) & 0xFF
    return q + 4


cdef inline unsigned char *_put_us(unsigned char *q, unsigned int elem, unsigned int v) noexcept:
    """A group-0000 US element, implicit VR little endian."""
    q = _put16(q, 0)
    q = _put16(q, elem)
    q = _put32(q, 2)
    return _put16(q, v)


cdef inline unsigned char *_put_padded(
    unsigned char *q, const unsigned char *value, Py_ssize_t n, unsigned char pad
) noexcept:
    memcpy(q, value, n)
    if n & 1:
        q[n] = pad
        return q + n + 1
    return q + n


def encode_store_rsp(
    context_id, message_id, sop_class_uid, sop_instance_uid, status, Py_ssize_t max_fragment
):
    """The whole P-DATA-TF PDU of a C-STORE-RSP, or None (see ``_pure``)."""
    cdef long ctx = _in_range(context_id, 1, 255)
    cdef long mid = _in_range(message_id, 0, 0xFFFF)
    cdef long st = _in_range(status, 0, 0xFFFF)
    if ctx < 0 or mid < 0 or st < 0:
        return None
    cdef const unsigned char *cls = _ascii_data(sop_class_uid)
    cdef const unsigned char *inst = _ascii_data(sop_instance_uid)
    if cls == NULL or inst == NULL:
        return None
    cdef Py_ssize_t lc = PyUnicode_GET_LENGTH(sop_class_uid)
    cdef Py_ssize_t li = PyUnicode_GET_LENGTH(sop_instance_uid)
    if lc > 64 or li > 64:
        return None
    cdef Py_ssize_t pc = lc + (lc & 1), pi = li + (li & 1)
    cdef Py_ssize_t body = 8 + pc + 40 + 8 + pi
    cdef Py_ssize_t n = 12 + body
    if n > max_fragment:
        return None
    out = PyBytes_FromStringAndSize(NULL, 12 + n)
    cdef unsigned char *q = <unsigned char *>PyBytes_AS_STRING(out)
    # PDU and PDV headers: big endian (PS3.8 9.3.1)
    q[0] = 4
    q[1] = 0
    q[2] = ((n + 6) >> 24) & 0xFF
    q[3] = ((n + 6) >> 16) & 0xFF
    q[4] = ((n + 6) >> 8) & 0xFF
    q[5] = (n + 6) & 0xFF
    q[6] = ((n + 2) >> 24) & 0xFF
    q[7] = ((n + 2) >> 16) & 0xFF
    q[8] = ((n + 2) >> 8) & 0xFF
    q[9] = (n + 2) & 0xFF
    q[10] = ctx
    q[11] = 3
    q = _put16(q + 12, 0)
    q = _put16(q, 0)
    q = _put32(q, 4)
    q = _put32(q, body)
    q = _put16(q, 0)
    q = _put16(q, 0x0002)
    q = _put32(q, pc)
    q = _put_padded(q, cls, lc, 0)
    q = _put_us(q, 0x0100, 0x8001)
    q = _put_us(q, 0x0120, mid)
    q = _put_us(q, 0x0800, 0x0101)
    q = _put_us(q, 0x0900, st)
    q = _put16(q, 0)
    q = _put16(q, 0x1000)
    q = _put32(q, pi)
    _put_padded(q, inst, li, 0)
    return out


cdef bint _uid_ok(const unsigned char *p, Py_ssize_t n) noexcept:
    """PS3.5 9.1 on ``n`` ASCII characters."""
    cdef Py_ssize_t i, digits = 0
    cdef bint leading_zero = False
    cdef unsigned char c
    if n <= 0 or n > 64:
        return False
    for i in range(n):
        c = p[i]
        if c == 46:  # "."
            if not digits:
                return False
            digits = 0
        elif 48 <= c <= 57:
            if digits == 0:
                leading_zero = c == 48
            elif leading_zero:
                return False
            digits += 1
        else:
            return False
    return digits != 0


def uid_valid(s):
    """True when ``s`` is a UID per PS3.5 9.1 (see ``_pure.uid_valid``)."""
    cdef const unsigned char *p = _ascii_data(s)
    if p == NULL:
        return False
    return _uid_ok(p, PyUnicode_GET_LENGTH(s))


cdef bint _text_ok(const unsigned char *p, Py_ssize_t n) noexcept:
    """An SH or AE value of the file meta: 1 to 16 printable ASCII characters but
    backslash."""
    cdef Py_ssize_t i
    if n <= 0 or n > 16:
        return False
    for i in range(n):
        if p[i] < 0x20 or p[i] > 0x7E or p[i] == 0x5C:
            return False
    return True


cdef unsigned char *_put_meta(
    unsigned char *q, unsigned int elem, const char *vr, const unsigned char *value,
    Py_ssize_t n, unsigned char pad,
) noexcept:
    """A group-0002 element with a 16-bit length, explicit VR little endian."""
    q = _put16(q, 2)
    q = _put16(q, elem)
    q[0] = vr[0]
    q[1] = vr[1]
    q = _put16(q + 2, n + (n & 1))
    return _put_padded(q, value, n, pad)


def file_meta(
    sop_class_uid,
    sop_instance_uid,
    transfer_syntax_uid,
    source_ae,
    implementation_class_uid,
    implementation_version_name,
):
    """The Part 10 header, or None (see ``_pure.file_meta``)."""
    cdef const unsigned char *cls = _ascii_data(sop_class_uid)
    cdef const unsigned char *ts = _ascii_data(transfer_syntax_uid)
    cdef const unsigned char *impl = _ascii_data(implementation_class_uid)
    cdef const unsigned char *inst = _ascii_data(sop_instance_uid)
    cdef const unsigned char *ver = NULL
    cdef const unsigned char *ae = NULL
    cdef Py_ssize_t lc, lt, lm, li, lv = 0, la = 0
    if cls == NULL or ts == NULL or impl == NULL or inst == NULL:
        return None
    lc = PyUnicode_GET_LENGTH(sop_class_uid)
    lt = PyUnicode_GET_LENGTH(transfer_syntax_uid)
    lm = PyUnicode_GET_LENGTH(implementation_class_uid)
    li = PyUnicode_GET_LENGTH(sop_instance_uid)
    if not (_uid_ok(cls, lc) and _uid_ok(ts, lt) and _uid_ok(impl, lm)) or li + (li & 1) > 0xFFFF:
        return None
    if implementation_version_name:
        ver = _ascii_data(implementation_version_name)
        lv = PyUnicode_GET_LENGTH(implementation_version_name)
        if ver == NULL or not _text_ok(ver, lv):
            return None
    if source_ae:
        ae = _ascii_data(source_ae)
        la = PyUnicode_GET_LENGTH(source_ae)
        if ae == NULL:
            return None  # a non-space character that no AE title may hold
        while la and ae[la - 1] == 32:
            la -= 1
        while la and ae[0] == 32:
            ae += 1
            la -= 1
        if la and not _text_ok(ae, la):
            return None
    cdef Py_ssize_t body = (
        14
        + 8 + lc + (lc & 1)
        + 8 + li + (li & 1)
        + 8 + lt + (lt & 1)
        + 8 + lm + (lm & 1)
        + (8 + lv + (lv & 1) if lv else 0)
        + (8 + la + (la & 1) if la else 0)
    )
    out = PyBytes_FromStringAndSize(NULL, 144 + body)
    cdef unsigned char *q = <unsigned char *>PyBytes_AS_STRING(out)
    memset(q, 0, 128)
    memcpy(q + 128, b"DICM\x02\x00\x00\x00UL\x04\x00", 12)
    q = _put32(q + 140, body)
    memcpy(q, b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01", 14)
    q = _put_meta(q + 14, 0x0002, b"UI", cls, lc, 0)
    q = _put_meta(q, 0x0003, b"UI", inst, li, 0)
    q = _put_meta(q, 0x0010, b"UI", ts, lt, 0)
    q = _put_meta(q, 0x0012, b"UI", impl, lm, 0)
    if lv:
        q = _put_meta(q, 0x0013, b"SH", ver, lv, 32)
    if la:
        _put_meta(q, 0x0016, b"AE", ae, la, 32)
    return out
