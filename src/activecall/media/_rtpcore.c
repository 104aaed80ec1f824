/* _rtpcore: the per-packet RTP work of every leg, written in C.
 *
 * Why C: the media clock carries every RTP leg of the daemon in one 20 ms tick
 * (media/rtp_ticker.py).  At 1000 legs that is 50 000 packets a second each way,
 * and in Python the bookkeeping around each packet (header, sequence and
 * timestamp, RFC 3550 receive statistics, the jitter buffer) cost two to three
 * times the kernel's own send and recv (docs/benchmarks.md).  No maintained
 * library does RTP for a Twisted program, so, as with SIP, it is hand-written;
 * codecs stay in numpy / PyAV / g722.
 *
 * What is here, each with the Python API the rest of the package uses:
 *
 *   RtpStream      our outgoing stream's sequence/timestamp/marker bookkeeping and
 *                  12-byte headers (media/rtp.py subclasses it for packets and SRs);
 *   ReceiveStats   RFC 3550 A.1/A.8 statistics of one remote SSRC (ditto);
 *   JitterBuffer   the adaptive jitter buffer (media/jitter.py documents it);
 *   RtpLegCore     the hot state of an RtpLeg (media/rtp_leg.py subclasses it):
 *                  its socket's descriptor, flags, counters, and its stream,
 *                  statistics and jitter buffer;
 *   send_audio, read_ready, pop_inbound
 *                  one tick's loops over many legs (the RtpTicker calls them):
 *                  the steady state (plain RTP on a connected socket, the
 *                  current SSRC, an audio payload type) is done here, anything
 *                  else is handed to the leg's Python methods.
 *
 * A leg's failure inside a loop is reported to the ``failed`` callback with the
 * exception as the one being handled (sys.exc_info()), as an ``except:`` block
 * would, and the loop goes on with the next leg.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#ifdef __linux__
#include <sys/epoll.h>
#endif

#define SEQ_MOD 65536
#define MAX_DROPOUT 3000
#define MAX_MISORDER 100
#define RTP_HEADER 12
#define MAX_DATAGRAM 2048
/* packets one jitter buffer holds; its depth stays under max_depth + shed_slack (18) plus one
   tick's reads (16), so this is only reached by a peer that bursts over a second of audio */
#define JB_CAPACITY 64

static inline uint32_t get32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static inline void put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* An int masked to 32 bits (negative values two's complement, as Python's ``& 0xFFFFFFFF``). */
static int as_u32(PyObject *v, uint32_t *out)
{
    if (!PyLong_Check(v)) {
        PyErr_Format(PyExc_TypeError, "an int is required, not %.100s", Py_TYPE(v)->tp_name);
        return -1;
    }
    unsigned long long x = PyLong_AsUnsignedLongLongMask(v);
    if (x == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = (uint32_t)x;
    return 0;
}

static int as_seq(PyObject *v, int *out)
{
    long x = PyLong_AsLong(v);
    if (x == -1 && PyErr_Occurred())
        return -1;
    if (x < 0 || x > 0xFFFF) {
        PyErr_Format(PyExc_ValueError, "RTP sequence number %ld is not in 0..65535", x);
        return -1;
    }
    *out = (int)x;
    return 0;
}

/* The OSError (or its errno subclass) for ``errno``, as a new reference; nothing is raised. */
static PyObject *errno_error(int err)
{
    PyObject *e = PyObject_CallFunction(PyExc_OSError, "is", err, strerror(err));
    if (e == NULL)
        PyErr_Clear();
    return e;
}

/* ``leg.<method>(error)`` for a socket error the leg reports itself (it counts or logs it).
   0, or -1 with an exception set. */
static int hand_error(PyObject *leg, const char *method, int err)
{
    PyObject *error = errno_error(err);
    if (error == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    PyObject *r = PyObject_CallMethod(leg, method, "N", error);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* Call ``failed(leg)`` with the pending exception as the one being handled. 0, or -1 (with the
   handler's own exception pending) when the handler raised. */
static int report_failure(PyObject *failed, PyObject *leg)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value == NULL) {
        Py_XDECREF(type);
        Py_XDECREF(tb);
        PyErr_SetString(PyExc_SystemError, "_rtpcore: a failure without an exception");
        return -1;
    }
    if (tb != NULL)
        PyException_SetTraceback(value, tb);
    PyObject *saved_type, *saved_value, *saved_tb;
    PyErr_GetExcInfo(&saved_type, &saved_value, &saved_tb);
    PyErr_SetExcInfo(type, value, tb); /* steals all three */
    PyObject *r = PyObject_CallOneArg(failed, leg);
    PyErr_SetExcInfo(saved_type, saved_value, saved_tb);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* ====================================================================================== */
/* RtpStream                                                                              */
/* ====================================================================================== */

typedef struct {
    PyObject_HEAD
    int payload_type;
    int clock_rate;
    uint32_t ssrc;
    uint32_t sequence; /* 0..65535 */
    uint32_t timestamp;
    uint32_t last_timestamp;
    unsigned long long packet_count;
    unsigned long long octet_count;
    char marker_next;
} RtpStreamObject;

static PyTypeObject RtpStreamType;

/* Write the next packet's header to ``h`` and advance the stream (sequence, timestamp by
   ``samples``, counts).  ``pt`` < 0: our payload type; ``ts`` used when ``has_ts``. */
static inline void stream_header(RtpStreamObject *s, unsigned char *h, Py_ssize_t payload_len,
                                 uint32_t samples, int marker, int pt, int has_ts, uint32_t ts)
{
    uint32_t stamp = has_ts ? ts : s->timestamp;
    h[0] = 0x80;
    h[1] = (unsigned char)(((marker || s->marker_next) ? 0x80 : 0) | ((pt < 0 ? s->payload_type : pt) & 0x7F));
    h[2] = (unsigned char)(s->sequence >> 8);
    h[3] = (unsigned char)s->sequence;
    put32(h + 4, stamp);
    put32(h + 8, s->ssrc);
    s->marker_next = 0;
    s->last_timestamp = stamp;
    s->sequence = (s->sequence + 1) & 0xFFFF;
    s->timestamp += samples;
    s->packet_count += 1;
    s->octet_count += (unsigned long long)payload_len;
}

static int RtpStream_init(RtpStreamObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"payload_type", "clock_rate", "ssrc", "sequence", "timestamp", NULL};
    int payload_type, clock_rate;
    PyObject *ssrc, *sequence, *timestamp;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiOOO", kwlist, &payload_type, &clock_rate, &ssrc,
                                     &sequence, &timestamp))
        return -1;
    uint32_t v_ssrc, v_seq, v_ts;
    if (as_u32(ssrc, &v_ssrc) < 0 || as_u32(sequence, &v_seq) < 0 || as_u32(timestamp, &v_ts) < 0)
        return -1;
    self->payload_type = payload_type;
    self->clock_rate = clock_rate;
    self->ssrc = v_ssrc;
    self->sequence = v_seq & 0xFFFF;
    self->timestamp = v_ts;
    self->last_timestamp = 0;
    self->packet_count = 0;
    self->octet_count = 0;
    self->marker_next = 1;
    return 0;
}

static PyObject *RtpStream_next_header(RtpStreamObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"payload_len", "samples", "marker", "payload_type", "timestamp", NULL};
    Py_ssize_t payload_len;
    PyObject *samples_obj, *pt_obj = Py_None, *ts_obj = Py_None;
    int marker = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "nO|$pOO", kwlist, &payload_len, &samples_obj, &marker,
                                     &pt_obj, &ts_obj))
        return NULL;
    if (payload_len < 0) {
        PyErr_SetString(PyExc_ValueError, "payload_len must not be negative");
        return NULL;
    }
    uint32_t samples, ts = 0;
    int pt = -1;
    if (as_u32(samples_obj, &samples) < 0)
        return NULL;
    if (pt_obj != Py_None) {
        long v = PyLong_AsLong(pt_obj);
        if (v == -1 && PyErr_Occurred())
            return NULL;
        pt = (int)(v & 0x7F);
    }
    if (ts_obj != Py_None && as_u32(ts_obj, &ts) < 0)
        return NULL;
    unsigned char h[RTP_HEADER];
    stream_header(self, h, payload_len, samples, marker, pt, ts_obj != Py_None, ts);
    return PyBytes_FromStringAndSize((const char *)h, RTP_HEADER);
}

static PyObject *RtpStream_next_audio_header(RtpStreamObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "next_audio_header(payload_len, samples)");
        return NULL;
    }
    Py_ssize_t payload_len = PyLong_AsSsize_t(args[0]);
    if (payload_len == -1 && PyErr_Occurred())
        return NULL;
    if (payload_len < 0) {
        PyErr_SetString(PyExc_ValueError, "payload_len must not be negative");
        return NULL;
    }
    uint32_t samples;
    if (as_u32(args[1], &samples) < 0)
        return NULL;
    unsigned char h[RTP_HEADER];
    stream_header(self, h, payload_len, samples, 0, -1, 0, 0);
    return PyBytes_FromStringAndSize((const char *)h, RTP_HEADER);
}

static PyObject *RtpStream_skip(RtpStreamObject *self, PyObject *samples_obj)
{
    uint32_t samples;
    if (as_u32(samples_obj, &samples) < 0)
        return NULL;
    self->timestamp += samples;
    self->marker_next = 1;
    Py_RETURN_NONE;
}

static PyObject *RtpStream_richcompare(PyObject *a, PyObject *b, int op)
{
    if ((op != Py_EQ && op != Py_NE) || !PyObject_TypeCheck(b, &RtpStreamType))
        Py_RETURN_NOTIMPLEMENTED;
    RtpStreamObject *x = (RtpStreamObject *)a, *y = (RtpStreamObject *)b;
    int same = x->payload_type == y->payload_type && x->clock_rate == y->clock_rate && x->ssrc == y->ssrc &&
               x->sequence == y->sequence && x->timestamp == y->timestamp &&
               x->last_timestamp == y->last_timestamp && x->packet_count == y->packet_count &&
               x->octet_count == y->octet_count && x->marker_next == y->marker_next;
    return PyBool_FromLong(op == Py_EQ ? same : !same);
}

static PyObject *RtpStream_repr(RtpStreamObject *self)
{
    return PyUnicode_FromFormat("%s(payload_type=%d, clock_rate=%d, ssrc=%lu, sequence=%lu, timestamp=%lu, "
                                "packet_count=%llu)",
                                Py_TYPE(self)->tp_name, self->payload_type, self->clock_rate,
                                (unsigned long)self->ssrc, (unsigned long)self->sequence,
                                (unsigned long)self->timestamp, self->packet_count);
}

static PyObject *get_u32_field(PyObject *self, void *offset)
{
    return PyLong_FromUnsignedLong(*(uint32_t *)((char *)self + (Py_ssize_t)offset));
}

static int set_u32_field(PyObject *self, PyObject *value, void *offset)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete this attribute");
        return -1;
    }
    return as_u32(value, (uint32_t *)((char *)self + (Py_ssize_t)offset));
}

static int set_stream_sequence(RtpStreamObject *self, PyObject *value, void *closure)
{
    uint32_t v;
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete sequence");
        return -1;
    }
    if (as_u32(value, &v) < 0)
        return -1;
    self->sequence = v & 0xFFFF;
    return 0;
}

static PyGetSetDef RtpStream_getset[] = {
    {"ssrc", get_u32_field, set_u32_field, NULL, (void *)offsetof(RtpStreamObject, ssrc)},
    {"sequence", get_u32_field, (setter)set_stream_sequence, "the next packet's sequence number",
     (void *)offsetof(RtpStreamObject, sequence)},
    {"timestamp", get_u32_field, set_u32_field, "the next audio packet's timestamp",
     (void *)offsetof(RtpStreamObject, timestamp)},
    {"last_timestamp", get_u32_field, set_u32_field, "the timestamp of the last packet sent",
     (void *)offsetof(RtpStreamObject, last_timestamp)},
    {NULL},
};

static PyMemberDef RtpStream_members[] = {
    {"payload_type", T_INT, offsetof(RtpStreamObject, payload_type), 0, NULL},
    {"clock_rate", T_INT, offsetof(RtpStreamObject, clock_rate), 0, NULL},
    {"packet_count", T_ULONGLONG, offsetof(RtpStreamObject, packet_count), 0, NULL},
    {"octet_count", T_ULONGLONG, offsetof(RtpStreamObject, octet_count), 0, NULL},
    {"_marker_next", T_BOOL, offsetof(RtpStreamObject, marker_next), 0, "the next packet is marked"},
    {NULL},
};

static PyMethodDef RtpStream_methods[] = {
    {"next_header", (PyCFunction)(void (*)(void))RtpStream_next_header, METH_VARARGS | METH_KEYWORDS,
     "next_header(payload_len, samples, *, marker=False, payload_type=None, timestamp=None) -> bytes\n\n"
     "The next packet's 12-byte header; advances the sequence, the timestamp (by samples) and the counts.\n"
     "``timestamp`` overrides the packet's (RFC 4733 events keep their start timestamp)."},
    {"next_audio_header", (PyCFunction)(void (*)(void))RtpStream_next_audio_header, METH_FASTCALL,
     "next_audio_header(payload_len, samples) -> bytes: next_header for an audio packet, no options."},
    {"skip", (PyCFunction)RtpStream_skip, METH_O,
     "skip(samples): a gap in sending; the timestamp advances and the next packet is marked."},
    {NULL},
};

static PyTypeObject RtpStreamType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "activecall.media._rtpcore.RtpStream",
    .tp_doc = "Our outgoing RTP stream: sequence, timestamp and marker bookkeeping, the counts an SR reports.",
    .tp_basicsize = sizeof(RtpStreamObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)RtpStream_init,
    .tp_repr = (reprfunc)RtpStream_repr,
    .tp_richcompare = RtpStream_richcompare,
    .tp_hash = PyObject_HashNotImplemented,
    .tp_methods = RtpStream_methods,
    .tp_members = RtpStream_members,
    .tp_getset = RtpStream_getset,
};

/* ====================================================================================== */
/* ReceiveStats                                                                           */
/* ====================================================================================== */

typedef struct {
    PyObject_HEAD
    uint32_t ssrc;
    int clock_rate;
    int max_seq; /* -1 until the first packet */
    long long cycles;
    int base_seq;
    int bad_seq;
    long long received;
    long long expected_prior;
    long long received_prior;
    double jitter; /* timestamp units */
    int has_transit;
    double transit;
    uint32_t last_sr;
    int has_last_sr_arrival;
    double last_sr_arrival;
} ReceiveStatsObject;

static PyTypeObject ReceiveStatsType;

static void stats_init_seq(ReceiveStatsObject *s, int seq)
{
    s->base_seq = seq;
    s->max_seq = seq;
    s->bad_seq = SEQ_MOD + 1;
    s->cycles = 0;
    s->received = 0;
    s->received_prior = 0;
    s->expected_prior = 0;
}

/* RFC 3550 A.1 (sequence validity, with the restart after a big jump) and A.8 (jitter).
   0 for a packet A.1 does not count. */
static inline int stats_update(ReceiveStatsObject *s, int seq, uint32_t ts, double arrival)
{
    if (s->max_seq < 0) {
        stats_init_seq(s, seq);
    } else {
        int delta = (seq - s->max_seq) & 0xFFFF;
        if (delta < MAX_DROPOUT) {
            if (seq < s->max_seq)
                s->cycles += SEQ_MOD;
            s->max_seq = seq;
        } else if (delta <= SEQ_MOD - MAX_MISORDER) {
            /* a large jump: restart only if the next packet follows it (the peer restarted) */
            if (seq == s->bad_seq) {
                stats_init_seq(s, seq);
            } else {
                s->bad_seq = (seq + 1) & 0xFFFF;
                return 0;
            }
        } /* else: a duplicate or a reordered packet, counted below */
    }
    s->received += 1;
    double transit = arrival * s->clock_rate - (double)ts;
    if (s->has_transit) {
        double d = fabs(transit - s->transit);
        s->jitter += (d - s->jitter) / 16;
    }
    s->transit = transit;
    s->has_transit = 1;
    return 1;
}

static int ReceiveStats_init(ReceiveStatsObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"ssrc", "clock_rate", NULL};
    PyObject *ssrc;
    int clock_rate;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Oi", kwlist, &ssrc, &clock_rate))
        return -1;
    if (as_u32(ssrc, &self->ssrc) < 0)
        return -1;
    if (clock_rate <= 0) {
        PyErr_SetString(PyExc_ValueError, "clock_rate must be positive");
        return -1;
    }
    self->clock_rate = clock_rate;
    self->max_seq = -1;
    self->cycles = 0;
    self->base_seq = 0;
    self->bad_seq = SEQ_MOD + 1;
    self->received = self->expected_prior = self->received_prior = 0;
    self->jitter = 0.0;
    self->has_transit = 0;
    self->last_sr = 0;
    self->has_last_sr_arrival = 0;
    return 0;
}

static PyObject *ReceiveStats_update(ReceiveStatsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "update(sequence, timestamp, arrival)");
        return NULL;
    }
    int seq;
    uint32_t ts;
    if (as_seq(args[0], &seq) < 0 || as_u32(args[1], &ts) < 0)
        return NULL;
    double arrival = PyFloat_AsDouble(args[2]);
    if (arrival == -1.0 && PyErr_Occurred())
        return NULL;
    return PyBool_FromLong(stats_update(self, seq, ts, arrival));
}

static PyObject *ReceiveStats_init_seq(ReceiveStatsObject *self, PyObject *arg)
{
    int seq;
    if (as_seq(arg, &seq) < 0)
        return NULL;
    stats_init_seq(self, seq);
    Py_RETURN_NONE;
}

static PyObject *get_optional_seq(ReceiveStatsObject *self, void *closure)
{
    if (self->max_seq < 0)
        Py_RETURN_NONE;
    return PyLong_FromLong(self->max_seq);
}

static int set_optional_seq(ReceiveStatsObject *self, PyObject *value, void *closure)
{
    if (value == NULL || value == Py_None) {
        self->max_seq = -1;
        return 0;
    }
    return as_seq(value, &self->max_seq);
}

/* Optional floats are a flag and a double; the closure is the flag's offset, the double follows it
   at the offset given by the matching *_VALUE macro below. */
typedef struct {
    Py_ssize_t flag;
    Py_ssize_t value;
} OptionalDouble;

static PyObject *get_optional_double(PyObject *self, void *closure)
{
    const OptionalDouble *o = closure;
    if (!*(int *)((char *)self + o->flag))
        Py_RETURN_NONE;
    return PyFloat_FromDouble(*(double *)((char *)self + o->value));
}

static int set_optional_double(PyObject *self, PyObject *value, void *closure)
{
    const OptionalDouble *o = closure;
    if (value == NULL || value == Py_None) {
        *(int *)((char *)self + o->flag) = 0;
        return 0;
    }
    double v = PyFloat_AsDouble(value);
    if (v == -1.0 && PyErr_Occurred())
        return -1;
    *(double *)((char *)self + o->value) = v;
    *(int *)((char *)self + o->flag) = 1;
    return 0;
}

static const OptionalDouble STATS_TRANSIT = {offsetof(ReceiveStatsObject, has_transit),
                                             offsetof(ReceiveStatsObject, transit)};
static const OptionalDouble STATS_SR_ARRIVAL = {offsetof(ReceiveStatsObject, has_last_sr_arrival),
                                                offsetof(ReceiveStatsObject, last_sr_arrival)};

static PyGetSetDef ReceiveStats_getset[] = {
    {"ssrc", get_u32_field, set_u32_field, NULL, (void *)offsetof(ReceiveStatsObject, ssrc)},
    {"max_seq", (getter)get_optional_seq, (setter)set_optional_seq, "highest sequence number seen, or None", NULL},
    {"_transit", get_optional_double, set_optional_double, "the last packet's relative transit time",
     (void *)&STATS_TRANSIT},
    {"last_sr", get_u32_field, set_u32_field, "middle 32 bits of the last SR's NTP timestamp",
     (void *)offsetof(ReceiveStatsObject, last_sr)},
    {"_last_sr_arrival", get_optional_double, set_optional_double, NULL, (void *)&STATS_SR_ARRIVAL},
    {NULL},
};

static PyMemberDef ReceiveStats_members[] = {
    {"clock_rate", T_INT, offsetof(ReceiveStatsObject, clock_rate), READONLY, NULL},
    {"cycles", T_LONGLONG, offsetof(ReceiveStatsObject, cycles), 0, NULL},
    {"base_seq", T_INT, offsetof(ReceiveStatsObject, base_seq), 0, NULL},
    {"bad_seq", T_INT, offsetof(ReceiveStatsObject, bad_seq), 0, NULL},
    {"received", T_LONGLONG, offsetof(ReceiveStatsObject, received), 0, NULL},
    {"expected_prior", T_LONGLONG, offsetof(ReceiveStatsObject, expected_prior), 0, NULL},
    {"received_prior", T_LONGLONG, offsetof(ReceiveStatsObject, received_prior), 0, NULL},
    {"jitter", T_DOUBLE, offsetof(ReceiveStatsObject, jitter), 0, "interarrival jitter, timestamp units"},
    {NULL},
};

static PyMethodDef ReceiveStats_methods[] = {
    {"update", (PyCFunction)(void (*)(void))ReceiveStats_update, METH_FASTCALL,
     "update(sequence, timestamp, arrival) -> bool\n\nAccount one packet (arrival in seconds); False for one "
     "RFC 3550 would not count as valid."},
    {"_init", (PyCFunction)ReceiveStats_init_seq, METH_O, "_init(sequence): start counting from sequence."},
    {NULL},
};

static PyTypeObject ReceiveStatsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "activecall.media._rtpcore.ReceiveStats",
    .tp_doc = "RFC 3550 A.1/A.3/A.8 receive statistics for one remote SSRC.",
    .tp_basicsize = sizeof(ReceiveStatsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ReceiveStats_init,
    .tp_methods = ReceiveStats_methods,
    .tp_members = ReceiveStats_members,
    .tp_getset = ReceiveStats_getset,
};

/* ====================================================================================== */
/* JitterBuffer                                                                           */
/* ====================================================================================== */

typedef struct {
    PyObject_HEAD
    long long received, played, late, duplicates, concealed, shed, resets;
} JitterStatsObject;

static PyMemberDef JitterStats_members[] = {
    {"received", T_LONGLONG, offsetof(JitterStatsObject, received), 0, "packets pushed"},
    {"played", T_LONGLONG, offsetof(JitterStatsObject, played), 0, "frames popped with a payload"},
    {"late", T_LONGLONG, offsetof(JitterStatsObject, late), 0, "packets older than the play-out point"},
    {"duplicates", T_LONGLONG, offsetof(JitterStatsObject, duplicates), 0, NULL},
    {"concealed", T_LONGLONG, offsetof(JitterStatsObject, concealed), 0, "gaps popped as concealed frames"},
    {"shed", T_LONGLONG, offsetof(JitterStatsObject, shed), 0, "frames discarded to shrink latency"},
    {"resets", T_LONGLONG, offsetof(JitterStatsObject, resets), 0, "sequence restarts"},
    {NULL},
};

static PyObject *JitterStats_repr(JitterStatsObject *s)
{
    return PyUnicode_FromFormat("JitterStats(received=%lld, played=%lld, late=%lld, duplicates=%lld, "
                                "concealed=%lld, shed=%lld, resets=%lld)",
                                s->received, s->played, s->late, s->duplicates, s->concealed, s->shed, s->resets);
}

static PyTypeObject JitterStatsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "activecall.media._rtpcore.JitterStats",
    .tp_doc = "A jitter buffer's counters.",
    .tp_basicsize = sizeof(JitterStatsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_repr = (reprfunc)JitterStats_repr,
    .tp_members = JitterStats_members,
};

static PyStructSequence_Field Frame_fields[] = {
    {"seq", "RTP sequence number"},
    {"timestamp", "RTP timestamp"},
    {"payload", "the packet's payload (b'' when concealed)"},
    {"payload_type", "RTP payload type (-1 when concealed)"},
    {"concealed", "True for a gap: the decoder conceals it"},
    {"marker", "the RTP marker bit"},
    {NULL},
};

static PyStructSequence_Desc Frame_desc = {
    "activecall.media.jitter.Frame",
    "One frame handed to the decoder; concealed frames have no payload.",
    Frame_fields,
    6,
};

static PyTypeObject FrameType;

typedef struct {
    int64_t ext; /* extended sequence number */
    PyObject *payload;
    uint32_t ts;
    int pt;
    uint16_t seq;
    char marker;
} Slot;

typedef struct {
    PyObject_HEAD
    int clock_rate;
    double frame_seconds;
    int frame_samples;
    int min_depth, max_depth;
    double jitter_factor;
    int rebuffer_after, shed_slack, reset_gap;
    int target;
    double jitter; /* seconds, RFC 3550 smoothed interarrival jitter */
    JitterStatsObject *stats;
    int has_ref, has_next, has_last_ts, has_last_transit;
    int64_t ref;  /* extended seq of the newest packet pushed */
    int64_t next; /* extended seq to play next */
    uint32_t last_ts;
    double last_transit;
    int empty_pops;
    int count;             /* packets held, in slots[0..count) by ascending ext */
    Slot slots[JB_CAPACITY];
} JitterBufferObject;

static PyTypeObject JitterBufferType;

static void jb_clear_slots(JitterBufferObject *jb)
{
    int n = jb->count;
    jb->count = 0;
    for (int i = 0; i < n; i++)
        Py_CLEAR(jb->slots[i].payload);
}

static void jb_flush(JitterBufferObject *jb)
{
    jb_clear_slots(jb);
    jb->has_next = 0;
    jb->empty_pops = 0;
}

static void jb_reset(JitterBufferObject *jb)
{
    jb_flush(jb);
    jb->has_ref = 0;
    jb->has_last_ts = 0;
    jb->has_last_transit = 0;
}

/* Drop slots[0] (its reference goes to the caller, who must release it). */
static PyObject *jb_take_first(JitterBufferObject *jb)
{
    PyObject *payload = jb->slots[0].payload;
    jb->count -= 1;
    memmove(&jb->slots[0], &jb->slots[1], (size_t)jb->count * sizeof(Slot));
    return payload;
}

/* Queue a packet (``payload`` is borrowed; the buffer takes its own reference).
   1 queued, 0 dropped (late, duplicate, or past a full buffer). */
static int jb_push(JitterBufferObject *jb, int seq, uint32_t ts, PyObject *payload, double arrival, int pt,
                   int marker)
{
    int64_t ext;
    if (!jb->has_ref) {
        ext = seq + SEQ_MOD; /* headroom so a slightly older first packet stays positive */
    } else {
        ext = jb->ref + (((seq - jb->ref + 0x8000) & 0xFFFF) - 0x8000);
        if (llabs(ext - jb->ref) > jb->reset_gap) {
            jb_reset(jb); /* the sender restarted its sequence: start over */
            jb->stats->resets += 1;
            ext = seq + SEQ_MOD;
        }
    }
    jb->stats->received += 1;
    /* RFC 3550 interarrival jitter, in seconds; the target depth follows it */
    double transit = arrival - (double)ts / jb->clock_rate;
    if (jb->has_last_transit) {
        double d = fabs(transit - jb->last_transit);
        if (d < 10.0) { /* a timestamp jump (a new talkspurt after a long pause) is not jitter */
            jb->jitter += (d - jb->jitter) / 16.0;
            double want = ceil(jb->jitter_factor * jb->jitter / jb->frame_seconds - 1e-9) + 1;
            int target = want > jb->max_depth ? jb->max_depth : (int)want;
            jb->target = target < jb->min_depth ? jb->min_depth : target;
        }
    }
    jb->last_transit = transit;
    jb->has_last_transit = 1;
    if (jb->has_next && ext < jb->next) {
        jb->stats->late += 1;
        return 0;
    }
    int at = jb->count; /* usually the end: packets arrive in order */
    while (at > 0 && jb->slots[at - 1].ext > ext)
        at--;
    if (at > 0 && jb->slots[at - 1].ext == ext) {
        jb->stats->duplicates += 1;
        return 0;
    }
    if (jb->count == JB_CAPACITY) {
        /* full: the oldest packet goes, as shedding would have taken it */
        jb->stats->shed += 1;
        if (at == 0)
            return 0; /* this one is the oldest */
        int64_t dropped = jb->slots[0].ext;
        PyObject *old = jb_take_first(jb);
        Py_XDECREF(old);
        at -= 1;
        if (jb->has_next && jb->next <= dropped)
            jb->next = dropped + 1;
    }
    memmove(&jb->slots[at + 1], &jb->slots[at], (size_t)(jb->count - at) * sizeof(Slot));
    Slot *slot = &jb->slots[at];
    slot->ext = ext;
    slot->ts = ts;
    slot->pt = pt;
    slot->seq = (uint16_t)seq;
    slot->marker = (char)(marker != 0);
    Py_INCREF(payload);
    slot->payload = payload;
    jb->count += 1;
    if (!jb->has_ref || ext > jb->ref) {
        jb->ref = ext;
        jb->has_ref = 1;
    }
    return 1;
}

/* The next frame: 0 nothing to play (buffering), 1 a packet (``*out`` filled, ``out->payload`` a new
   reference), 2 a concealed gap (``out->seq`` and ``out->ts`` set). */
static int jb_pop(JitterBufferObject *jb, Slot *out)
{
    if (!jb->has_next) {
        if (jb->count < jb->target)
            return 0;
        jb->next = jb->slots[0].ext; /* count >= target >= 1 */
        jb->has_next = 1;
        jb->empty_pops = 0;
    }
    if (jb->count > jb->target + jb->shed_slack) {
        /* persistently too deep (a sender clock running fast, a burst that never drained):
           shed one frame per pop so latency shrinks without cutting a burst of speech */
        if (jb->slots[0].ext != jb->next) {
            jb->next = jb->slots[0].ext;
        } else {
            jb->last_ts = jb->slots[0].ts;
            jb->has_last_ts = 1;
            PyObject *old = jb_take_first(jb);
            Py_XDECREF(old);
            jb->next += 1;
            jb->stats->shed += 1;
        }
    }
    if (jb->count > 0 && jb->slots[0].ext == jb->next) {
        *out = jb->slots[0];
        jb_take_first(jb); /* the reference moves to out->payload */
        jb->next += 1;
        jb->empty_pops = 0;
        jb->last_ts = out->ts;
        jb->has_last_ts = 1;
        jb->stats->played += 1;
        return 1;
    }
    if (jb->count == 0) {
        jb->empty_pops += 1;
        if (jb->empty_pops >= jb->rebuffer_after) {
            jb->has_next = 0; /* a pause: prime again before playing */
            return 0;
        }
    }
    out->seq = (uint16_t)(jb->next & 0xFFFF);
    out->ts = (jb->has_last_ts ? jb->last_ts : 0) + (uint32_t)jb->frame_samples;
    out->payload = NULL;
    out->pt = -1;
    out->marker = 0;
    jb->last_ts = out->ts;
    jb->has_last_ts = 1;
    jb->next += 1;
    jb->stats->concealed += 1;
    return 2;
}

static PyObject *empty_bytes; /* b"", the concealed frames' payload */

static PyObject *make_frame(int kind, Slot *f)
{
    PyObject *frame = PyStructSequence_New(&FrameType);
    if (frame == NULL) {
        if (kind == 1)
            Py_XDECREF(f->payload);
        return NULL;
    }
    PyObject *seq = PyLong_FromLong(f->seq), *ts = PyLong_FromUnsignedLong(f->ts), *pt = PyLong_FromLong(f->pt);
    if (seq == NULL || ts == NULL || pt == NULL) {
        Py_XDECREF(seq);
        Py_XDECREF(ts);
        Py_XDECREF(pt);
        if (kind == 1)
            Py_XDECREF(f->payload);
        Py_DECREF(frame);
        return NULL;
    }
    PyStructSequence_SET_ITEM(frame, 0, seq);
    PyStructSequence_SET_ITEM(frame, 1, ts);
    if (kind == 1) {
        PyStructSequence_SET_ITEM(frame, 2, f->payload); /* steals */
    } else {
        Py_INCREF(empty_bytes);
        PyStructSequence_SET_ITEM(frame, 2, empty_bytes);
    }
    PyStructSequence_SET_ITEM(frame, 3, pt);
    PyStructSequence_SET_ITEM(frame, 4, PyBool_FromLong(kind == 2));
    PyStructSequence_SET_ITEM(frame, 5, PyBool_FromLong(f->marker));
    return frame;
}

static int JitterBuffer_init(JitterBufferObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"clock_rate", "frame_ms", "min_depth", "max_depth", "initial_depth",
                             "jitter_factor", "rebuffer_after", "shed_slack", "reset_gap", NULL};
    int clock_rate = 8000, frame_ms = 20, min_depth = 1, max_depth = 15, initial_depth = 2;
    int rebuffer_after = 5, shed_slack = 3, reset_gap = 500;
    double jitter_factor = 3.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|iiiiidiii", kwlist, &clock_rate, &frame_ms, &min_depth,
                                     &max_depth, &initial_depth, &jitter_factor, &rebuffer_after, &shed_slack,
                                     &reset_gap))
        return -1;
    if (clock_rate <= 0 || frame_ms <= 0 || min_depth < 1 || max_depth < min_depth || jitter_factor <= 0 ||
        rebuffer_after < 1 || shed_slack < 0 || reset_gap < 1) {
        PyErr_SetString(PyExc_ValueError, "JitterBuffer: clock_rate, frame_ms, jitter_factor, rebuffer_after and "
                                          "reset_gap must be positive, 1 <= min_depth <= max_depth, shed_slack >= 0");
        return -1;
    }
    if (max_depth + shed_slack >= JB_CAPACITY) {
        PyErr_Format(PyExc_ValueError, "JitterBuffer: max_depth + shed_slack must stay under %d", JB_CAPACITY);
        return -1;
    }
    jb_reset(self);
    if (self->stats == NULL) {
        self->stats = PyObject_New(JitterStatsObject, &JitterStatsType);
        if (self->stats == NULL)
            return -1;
    }
    memset((char *)self->stats + sizeof(PyObject), 0, sizeof(JitterStatsObject) - sizeof(PyObject));
    self->clock_rate = clock_rate;
    self->frame_seconds = frame_ms / 1000.0;
    self->frame_samples = clock_rate * frame_ms / 1000;
    self->min_depth = min_depth;
    self->max_depth = max_depth;
    self->jitter_factor = jitter_factor;
    self->rebuffer_after = rebuffer_after;
    self->shed_slack = shed_slack;
    self->reset_gap = reset_gap;
    int target = initial_depth > max_depth ? max_depth : initial_depth;
    self->target = target < min_depth ? min_depth : target;
    /* it starts at the value that gives ``initial_depth`` and converges on the measured one */
    self->jitter = (self->target - 1) * self->frame_seconds / jitter_factor;
    return 0;
}

static int JitterBuffer_traverse(JitterBufferObject *self, visitproc visit, void *arg)
{
    for (int i = 0; i < self->count; i++)
        Py_VISIT(self->slots[i].payload);
    Py_VISIT(self->stats);
    return 0;
}

static int JitterBuffer_clear(JitterBufferObject *self)
{
    jb_clear_slots(self);
    Py_CLEAR(self->stats);
    return 0;
}

static void JitterBuffer_dealloc(JitterBufferObject *self)
{
    PyObject_GC_UnTrack(self);
    JitterBuffer_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *JitterBuffer_push(JitterBufferObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"seq", "timestamp", "payload", "arrival", "payload_type", "marker", NULL};
    PyObject *seq_obj, *ts_obj, *payload;
    double arrival;
    int pt = -1, marker = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOd|ip", kwlist, &seq_obj, &ts_obj, &payload, &arrival, &pt,
                                     &marker))
        return NULL;
    int seq;
    uint32_t ts;
    if (as_seq(seq_obj, &seq) < 0 || as_u32(ts_obj, &ts) < 0)
        return NULL;
    if (self->stats == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "JitterBuffer not initialised");
        return NULL;
    }
    return PyBool_FromLong(jb_push(self, seq, ts, payload, arrival, pt, marker));
}

static PyObject *JitterBuffer_pop(JitterBufferObject *self, PyObject *unused)
{
    if (self->stats == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "JitterBuffer not initialised");
        return NULL;
    }
    Slot f;
    int kind = jb_pop(self, &f);
    if (kind == 0)
        Py_RETURN_NONE;
    return make_frame(kind, &f);
}

static PyObject *JitterBuffer_flush(JitterBufferObject *self, PyObject *unused)
{
    jb_flush(self);
    Py_RETURN_NONE;
}

static PyObject *JitterBuffer_reset(JitterBufferObject *self, PyObject *unused)
{
    jb_reset(self);
    Py_RETURN_NONE;
}

static Py_ssize_t JitterBuffer_len(JitterBufferObject *self)
{
    return self->count;
}

static PyObject *JitterBuffer_playing(JitterBufferObject *self, void *closure)
{
    return PyBool_FromLong(self->has_next);
}

static PyMethodDef JitterBuffer_methods[] = {
    {"push", (PyCFunction)(void (*)(void))JitterBuffer_push, METH_VARARGS | METH_KEYWORDS,
     "push(seq, timestamp, payload, arrival, payload_type=-1, marker=False) -> bool\n\n"
     "Queue a packet (arrival in seconds); False when it was dropped (late, duplicate)."},
    {"pop", (PyCFunction)JitterBuffer_pop, METH_NOARGS,
     "pop() -> Frame | None: the next frame, a concealed frame for a gap, or None while (re)buffering."},
    {"flush", (PyCFunction)JitterBuffer_flush, METH_NOARGS,
     "flush(): drop everything queued (barge-in, re-INVITE) and prime again."},
    {"reset", (PyCFunction)JitterBuffer_reset, METH_NOARGS, "reset(): forget the stream entirely (SSRC change)."},
    {NULL},
};

static PyMemberDef JitterBuffer_members[] = {
    {"clock_rate", T_INT, offsetof(JitterBufferObject, clock_rate), READONLY, NULL},
    {"frame_seconds", T_DOUBLE, offsetof(JitterBufferObject, frame_seconds), READONLY, NULL},
    {"frame_samples", T_INT, offsetof(JitterBufferObject, frame_samples), READONLY, NULL},
    {"min_depth", T_INT, offsetof(JitterBufferObject, min_depth), READONLY, NULL},
    {"max_depth", T_INT, offsetof(JitterBufferObject, max_depth), READONLY, NULL},
    {"jitter_factor", T_DOUBLE, offsetof(JitterBufferObject, jitter_factor), READONLY, NULL},
    {"rebuffer_after", T_INT, offsetof(JitterBufferObject, rebuffer_after), READONLY, NULL},
    {"shed_slack", T_INT, offsetof(JitterBufferObject, shed_slack), READONLY, NULL},
    {"reset_gap", T_INT, offsetof(JitterBufferObject, reset_gap), READONLY, NULL},
    {"target", T_INT, offsetof(JitterBufferObject, target), 0, "target depth in frames"},
    {"jitter", T_DOUBLE, offsetof(JitterBufferObject, jitter), 0, "smoothed interarrival jitter, seconds"},
    {"stats", T_OBJECT, offsetof(JitterBufferObject, stats), READONLY, "the buffer's JitterStats"},
    {NULL},
};

static PyGetSetDef JitterBuffer_getset[] = {
    {"playing", (getter)JitterBuffer_playing, NULL, "primed and playing (not buffering)", NULL},
    {NULL},
};

static PySequenceMethods JitterBuffer_as_sequence = {
    .sq_length = (lenfunc)JitterBuffer_len,
};

static PyTypeObject JitterBufferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "activecall.media.jitter.JitterBuffer",
    .tp_doc = "JitterBuffer(clock_rate=8000, frame_ms=20, min_depth=1, max_depth=15, initial_depth=2, "
              "jitter_factor=3.0, rebuffer_after=5, shed_slack=3, reset_gap=500)\n\n"
              "Reorders, drops late packets, signals loss, adapts its depth to jitter (see media/jitter.py).",
    .tp_basicsize = sizeof(JitterBufferObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)JitterBuffer_init,
    .tp_dealloc = (destructor)JitterBuffer_dealloc,
    .tp_traverse = (traverseproc)JitterBuffer_traverse,
    .tp_clear = (inquiry)JitterBuffer_clear,
    .tp_methods = JitterBuffer_methods,
    .tp_members = JitterBuffer_members,
    .tp_getset = JitterBuffer_getset,
    .tp_as_sequence = &JitterBuffer_as_sequence,
};

/* ====================================================================================== */
/* RtpLegCore                                                                             */
/* ====================================================================================== */

typedef struct {
    PyObject_HEAD
    int rtp_fd; /* the RTP socket's descriptor while the leg owns it, else -1 */
    char running, connected, source_filtered;
    int has_remote_ssrc;
    uint32_t remote_ssrc;
    int has_heard;
    double heard_remote_at;
    uint64_t plain_pts[2]; /* bit per payload type: audio PTs the short receive path takes */
    long long packets_in, packets_out, send_errors;
    long step; /* the encoder's timestamp units per frame */
    PyObject *plain_pts_obj;
    PyObject *stream, *stats, *jitter, *srtp, *remote_rtp, *decoders, *silence;
} RtpLegCoreObject;

static PyTypeObject RtpLegCoreType;

static PyObject *RtpLegCore_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    RtpLegCoreObject *self = (RtpLegCoreObject *)type->tp_alloc(type, 0);
    if (self != NULL)
        self->rtp_fd = -1;
    return (PyObject *)self;
}

static int RtpLegCore_traverse(RtpLegCoreObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->plain_pts_obj);
    Py_VISIT(self->stream);
    Py_VISIT(self->stats);
    Py_VISIT(self->jitter);
    Py_VISIT(self->srtp);
    Py_VISIT(self->remote_rtp);
    Py_VISIT(self->decoders);
    Py_VISIT(self->silence);
    return 0; /* a heap subtype's traverse (RtpLeg's) visits the type itself */
}

static int RtpLegCore_clear(RtpLegCoreObject *self)
{
    Py_CLEAR(self->plain_pts_obj);
    Py_CLEAR(self->stream);
    Py_CLEAR(self->stats);
    Py_CLEAR(self->jitter);
    Py_CLEAR(self->srtp);
    Py_CLEAR(self->remote_rtp);
    Py_CLEAR(self->decoders);
    Py_CLEAR(self->silence);
    return 0;
}

static void RtpLegCore_dealloc(RtpLegCoreObject *self)
{
    /* a heap subtype's dealloc (RtpLeg's) calls this, then releases the type itself */
    PyObject_GC_UnTrack(self);
    RtpLegCore_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *RtpLegCore_get_pts(RtpLegCoreObject *self, void *closure)
{
    if (self->plain_pts_obj == NULL)
        return PyFrozenSet_New(NULL);
    Py_INCREF(self->plain_pts_obj);
    return self->plain_pts_obj;
}

static int RtpLegCore_set_pts(RtpLegCoreObject *self, PyObject *value, void *closure)
{
    uint64_t bits[2] = {0, 0};
    PyObject *pts = value == NULL || value == Py_None ? PyFrozenSet_New(NULL) : PyFrozenSet_New(value);
    if (pts == NULL)
        return -1;
    PyObject *it = PyObject_GetIter(pts), *item;
    if (it == NULL) {
        Py_DECREF(pts);
        return -1;
    }
    while ((item = PyIter_Next(it)) != NULL) {
        long pt = PyLong_AsLong(item);
        Py_DECREF(item);
        if (pt == -1 && PyErr_Occurred()) {
            Py_DECREF(it);
            Py_DECREF(pts);
            return -1;
        }
        if (pt >= 0 && pt < 128)
            bits[pt >> 6] |= (uint64_t)1 << (pt & 63);
    }
    Py_DECREF(it);
    if (PyErr_Occurred()) {
        Py_DECREF(pts);
        return -1;
    }
    self->plain_pts[0] = bits[0];
    self->plain_pts[1] = bits[1];
    Py_XSETREF(self->plain_pts_obj, pts);
    return 0;
}

static PyObject *RtpLegCore_get_remote_ssrc(RtpLegCoreObject *self, void *closure)
{
    if (!self->has_remote_ssrc)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLong(self->remote_ssrc);
}

static int RtpLegCore_set_remote_ssrc(RtpLegCoreObject *self, PyObject *value, void *closure)
{
    if (value == NULL || value == Py_None) {
        self->has_remote_ssrc = 0;
        return 0;
    }
    if (as_u32(value, &self->remote_ssrc) < 0)
        return -1;
    self->has_remote_ssrc = 1;
    return 0;
}

static const OptionalDouble LEG_HEARD = {offsetof(RtpLegCoreObject, has_heard),
                                         offsetof(RtpLegCoreObject, heard_remote_at)};

static PyGetSetDef RtpLegCore_getset[] = {
    {"_plain_audio_pts", (getter)RtpLegCore_get_pts, (setter)RtpLegCore_set_pts,
     "audio payload types the short receive path may take (a frozenset)", NULL},
    {"remote_ssrc", (getter)RtpLegCore_get_remote_ssrc, (setter)RtpLegCore_set_remote_ssrc,
     "the SSRC of the stream being received, or None", NULL},
    {"_heard_remote_at", get_optional_double, set_optional_double,
     "when the remote's last RTP packet was taken (reactor seconds), or None", (void *)&LEG_HEARD},
    {NULL},
};

static PyMemberDef RtpLegCore_members[] = {
    {"_rtp_fd", T_INT, offsetof(RtpLegCoreObject, rtp_fd), 0,
     "the RTP socket's descriptor while the leg owns the socket, else -1"},
    {"running", T_BOOL, offsetof(RtpLegCoreObject, running), 0, NULL},
    {"connected", T_BOOL, offsetof(RtpLegCoreObject, connected), 0,
     "the RTP socket is connected to remote_rtp"},
    {"source_filtered", T_BOOL, offsetof(RtpLegCoreObject, source_filtered), 0,
     "connected, and what queued before the connect has been read: recv needs no address check"},
    {"packets_in", T_LONGLONG, offsetof(RtpLegCoreObject, packets_in), 0, NULL},
    {"packets_out", T_LONGLONG, offsetof(RtpLegCoreObject, packets_out), 0, NULL},
    {"send_errors", T_LONGLONG, offsetof(RtpLegCoreObject, send_errors), 0, NULL},
    {"_step", T_LONG, offsetof(RtpLegCoreObject, step), 0, "the encoder's RTP timestamp units per frame"},
    {"stream", T_OBJECT, offsetof(RtpLegCoreObject, stream), 0, "our RtpStream"},
    {"stats", T_OBJECT, offsetof(RtpLegCoreObject, stats), 0, "the remote SSRC's ReceiveStats"},
    {"jitter", T_OBJECT, offsetof(RtpLegCoreObject, jitter), 0, "the inbound JitterBuffer"},
    {"srtp", T_OBJECT, offsetof(RtpLegCoreObject, srtp), 0, "the SrtpContext, or None"},
    {"remote_rtp", T_OBJECT, offsetof(RtpLegCoreObject, remote_rtp), 0, "(host, port) we send RTP to"},
    {"_decoders", T_OBJECT, offsetof(RtpLegCoreObject, decoders), 0, "payload type -> decoder"},
    {"_silence", T_OBJECT, offsetof(RtpLegCoreObject, silence), 0, "the frame played for a concealed gap"},
    {NULL},
};

static inline int is_set(PyObject *o)
{
    return o != NULL && o != Py_None;
}

/* The inbound frame of one leg, as RtpLeg.pop_inbound documents it: 0 nothing; 1 ``*decoder``
   and ``*payload`` (new references) to decode; 2 ``*payload`` (new reference) is PCM to play as is.
   -1 with an exception set. */
static int leg_pop(RtpLegCoreObject *leg, PyObject **decoder, PyObject **payload)
{
    if (!is_set(leg->jitter))
        return 0;
    if (!PyObject_TypeCheck(leg->jitter, &JitterBufferType)) {
        PyErr_SetString(PyExc_TypeError, "RtpLeg.jitter must be a JitterBuffer");
        return -1;
    }
    JitterBufferObject *jb = (JitterBufferObject *)leg->jitter;
    if (jb->stats == NULL)
        return 0;
    Slot f;
    int kind = jb_pop(jb, &f);
    if (kind == 0)
        return 0;
    if (kind == 2) {
        PyObject *silence = is_set(leg->silence) ? leg->silence : Py_None;
        Py_INCREF(silence);
        *payload = silence;
        return 2;
    }
    PyObject *found = NULL;
    if (is_set(leg->decoders) && PyDict_Check(leg->decoders)) {
        PyObject *key = PyLong_FromLong(f.pt);
        if (key == NULL) {
            Py_DECREF(f.payload);
            return -1;
        }
        found = PyDict_GetItemWithError(leg->decoders, key); /* borrowed */
        Py_DECREF(key);
        if (found == NULL && PyErr_Occurred()) {
            Py_DECREF(f.payload);
            return -1;
        }
        Py_XINCREF(found);
    }
    if (found == NULL) { /* the first packet of this payload type: the leg makes its decoder */
        found = PyObject_CallMethod((PyObject *)leg, "_decoder", "i", f.pt);
        if (found == NULL) {
            Py_DECREF(f.payload);
            return -1;
        }
    }
    if (found == Py_None) {
        Py_DECREF(found);
        Py_DECREF(f.payload);
        return 0;
    }
    *decoder = found;
    *payload = f.payload;
    return 1;
}

static PyObject *RtpLegCore_pop_inbound(RtpLegCoreObject *self, PyObject *unused)
{
    PyObject *decoder = NULL, *payload = NULL;
    int kind = leg_pop(self, &decoder, &payload);
    if (kind < 0)
        return NULL;
    if (kind == 0)
        Py_RETURN_NONE;
    if (kind == 2)
        return Py_BuildValue("(ON)", Py_None, payload);
    return Py_BuildValue("(NN)", decoder, payload);
}

static PyMethodDef RtpLegCore_methods[] = {
    {"pop_inbound", (PyCFunction)RtpLegCore_pop_inbound, METH_NOARGS,
     "pop_inbound() -> (decoder, payload) | (None, pcm) | None\n\n"
     "This tick's inbound frame: a payload to decode, a concealed frame's PCM to play as is, or None\n"
     "(nothing to play: buffering, no stream yet, or a payload type without a decoder)."},
    {NULL},
};

static PyTypeObject RtpLegCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "activecall.media._rtpcore.RtpLegCore",
    .tp_doc = "The hot state of an RTP leg, shared by its Python methods and the ticker's loops.",
    .tp_basicsize = sizeof(RtpLegCoreObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = RtpLegCore_new,
    .tp_dealloc = (destructor)RtpLegCore_dealloc,
    .tp_traverse = (traverseproc)RtpLegCore_traverse,
    .tp_clear = (inquiry)RtpLegCore_clear,
    .tp_methods = RtpLegCore_methods,
    .tp_members = RtpLegCore_members,
    .tp_getset = RtpLegCore_getset,
};

/* ====================================================================================== */
/* The ticker's loops                                                                     */
/* ====================================================================================== */

static RtpLegCoreObject *as_leg(PyObject *o)
{
    if (!PyObject_TypeCheck(o, &RtpLegCoreType)) {
        PyErr_Format(PyExc_TypeError, "an RtpLeg is required, not %.100s", Py_TYPE(o)->tp_name);
        return NULL;
    }
    return (RtpLegCoreObject *)o;
}

/* Send one leg's audio payload on the short path; 1 sent, 0 not sent (the error handed to the
   leg's _send_failed), -1 with an exception set. */
static int send_plain(RtpLegCoreObject *leg, const char *payload, Py_ssize_t len)
{
    unsigned char packet[RTP_HEADER + MAX_DATAGRAM];
    stream_header((RtpStreamObject *)leg->stream, packet, len, (uint32_t)leg->step, 0, -1, 0, 0);
    memcpy(packet + RTP_HEADER, payload, (size_t)len);
    ssize_t n;
    do {
        n = send(leg->rtp_fd, packet, (size_t)(RTP_HEADER + len), MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n >= 0) {
        leg->packets_out += 1;
        return 1;
    }
    return hand_error((PyObject *)leg, "_send_failed", errno);
}

static PyObject *core_send_audio(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyList_Check(args[0]) || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "send_audio(legs: list, payloads: list, failed)");
        return NULL;
    }
    PyObject *legs = args[0], *payloads = args[1], *failed = args[2];
    if (PyList_GET_SIZE(payloads) != PyList_GET_SIZE(legs)) {
        PyErr_SetString(PyExc_ValueError, "send_audio: as many payloads as legs");
        return NULL;
    }
    long long sent = 0;
    /* the sizes are read on every round: a leg's Python code runs in between */
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(legs) && i < PyList_GET_SIZE(payloads); i++) {
        PyObject *obj = PyList_GET_ITEM(legs, i), *payload = PyList_GET_ITEM(payloads, i);
        if (payload == Py_None)
            continue;
        RtpLegCoreObject *leg = as_leg(obj);
        if (leg == NULL)
            return NULL;
        Py_INCREF(obj);
        Py_INCREF(payload);
        int ok;
        if (leg->connected && leg->rtp_fd >= 0 && !is_set(leg->srtp) && is_set(leg->stream) &&
            PyObject_TypeCheck(leg->stream, &RtpStreamType) && PyBytes_CheckExact(payload) &&
            PyBytes_GET_SIZE(payload) <= MAX_DATAGRAM) {
            /* the steady state: plain RTP on a connected socket */
            ok = send_plain(leg, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload));
        } else {
            PyObject *r = PyObject_CallMethod(obj, "send_audio", "O", payload);
            ok = r == NULL ? -1 : PyObject_IsTrue(r);
            Py_XDECREF(r);
        }
        if (ok > 0)
            sent += 1;
        else if (ok < 0 && report_failure(failed, obj) < 0) {
            Py_DECREF(obj);
            Py_DECREF(payload);
            return NULL;
        }
        Py_DECREF(obj);
        Py_DECREF(payload);
    }
    return PyLong_FromLongLong(sent);
}

/* One datagram from a source-filtered leg's socket. The RTP packets taken (0 or 1), -1 with an
   exception set. */
static int read_filtered(RtpLegCoreObject *leg, double now)
{
    unsigned char buf[MAX_DATAGRAM];
    ssize_t n;
    do {
        n = recv(leg->rtp_fd, buf, sizeof(buf), MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNREFUSED)
            return 0; /* nothing (a spurious wake-up), or the peer's ICMP port-unreachable */
        return hand_error((PyObject *)leg, "_read_failed", errno) < 0 ? -1 : 0;
    }
    if (n > RTP_HEADER && buf[0] == 0x80 && !(buf[1] >= 192 && buf[1] <= 223) && leg->has_remote_ssrc) {
        /* plain RTP, a 12-byte header, not RTCP (RFC 5761) */
        int pt = buf[1] & 0x7F;
        uint32_t ssrc = get32(buf + 8);
        if ((leg->plain_pts[pt >> 6] >> (pt & 63) & 1) && ssrc == leg->remote_ssrc && is_set(leg->stats) &&
            PyObject_TypeCheck(leg->stats, &ReceiveStatsType) && is_set(leg->jitter) &&
            PyObject_TypeCheck(leg->jitter, &JitterBufferType) && ((JitterBufferObject *)leg->jitter)->stats) {
            /* the steady state: an audio packet of the current stream from the trusted source */
            int seq = (buf[2] << 8) | buf[3];
            uint32_t ts = get32(buf + 4);
            PyObject *payload = PyBytes_FromStringAndSize((const char *)buf + RTP_HEADER, n - RTP_HEADER);
            if (payload == NULL)
                return -1;
            leg->heard_remote_at = now;
            leg->has_heard = 1;
            leg->packets_in += 1;
            stats_update((ReceiveStatsObject *)leg->stats, seq, ts, now);
            jb_push((JitterBufferObject *)leg->jitter, seq, ts, payload, now, pt, buf[1] >> 7);
            Py_DECREF(payload);
            return 1;
        }
    }
    PyObject *data = PyBytes_FromStringAndSize((const char *)buf, n);
    if (data == NULL)
        return -1;
    PyObject *r = PyObject_CallMethod((PyObject *)leg, "_received_from_remote", "Nd", data, now);
    if (r == NULL)
        return -1;
    long taken = PyLong_AsLong(r);
    Py_DECREF(r);
    if (taken == -1 && PyErr_Occurred())
        return -1;
    return (int)taken;
}

static int read_leg(PyObject *obj, double now)
{
    RtpLegCoreObject *leg = as_leg(obj);
    if (leg == NULL)
        return -1;
    if (leg->source_filtered && leg->rtp_fd >= 0)
        return read_filtered(leg, now);
    /* not yet trusted (the source is checked), or no descriptor: the leg's own read */
    PyObject *r = PyObject_CallMethod(obj, "read_one", "d", now);
    if (r == NULL)
        return -1;
    long taken = PyLong_AsLong(r);
    Py_DECREF(r);
    if (taken == -1 && PyErr_Occurred())
        return -1;
    return (int)taken;
}

#ifdef __linux__
static PyObject *core_read_ready(PyObject *module, PyObject *args)
{
    int epfd, max_rounds;
    PyObject *by_fd, *stop_at_obj, *seconds, *failed;
    double now;
    if (!PyArg_ParseTuple(args, "iO!dOOiO:read_ready", &epfd, &PyDict_Type, &by_fd, &now, &stop_at_obj, &seconds,
                          &max_rounds, &failed))
        return NULL;
    double stop_at = 0;
    int has_stop = stop_at_obj != Py_None;
    if (has_stop) {
        stop_at = PyFloat_AsDouble(stop_at_obj);
        if (stop_at == -1.0 && PyErr_Occurred())
            return NULL;
    }
    int capacity = (int)PyDict_GET_SIZE(by_fd) + 1;
    struct epoll_event *events = PyMem_Malloc((size_t)capacity * sizeof(struct epoll_event));
    if (events == NULL)
        return PyErr_NoMemory();
    long long received = 0;
    int saw_empty = 0;
    PyObject *result = NULL;
    for (int round = 0; round < max_rounds; round++) {
        if (round && has_stop) {
            PyObject *t = PyObject_CallNoArgs(seconds);
            if (t == NULL)
                goto done;
            double s = PyFloat_AsDouble(t);
            Py_DECREF(t);
            if (s == -1.0 && PyErr_Occurred())
                goto done;
            if (s >= stop_at)
                break;
        }
        int ready;
        do {
            ready = epoll_wait(epfd, events, capacity, 0);
        } while (ready < 0 && errno == EINTR);
        if (ready < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto done;
        }
        if (ready == 0) {
            saw_empty = 1;
            break;
        }
        for (int k = 0; k < ready; k++) {
            int fd = events[k].data.fd;
            PyObject *key = PyLong_FromLong(fd);
            if (key == NULL)
                goto done;
            PyObject *leg = PyDict_GetItemWithError(by_fd, key);
            Py_DECREF(key);
            if (leg == NULL) {
                if (PyErr_Occurred())
                    goto done;
                /* cannot happen while the ticker's _watch/_unwatch pair up; never spin on it */
                epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
                continue;
            }
            Py_INCREF(leg);
            int taken = read_leg(leg, now);
            if (taken > 0)
                received += taken;
            else if (taken < 0 && report_failure(failed, leg) < 0) {
                Py_DECREF(leg);
                goto done;
            }
            Py_DECREF(leg);
        }
    }
    result = Py_BuildValue("(LO)", received, saw_empty ? Py_True : Py_False);
done:
    PyMem_Free(events);
    return result;
}
#endif

static PyObject *core_pop_inbound(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "pop_inbound(legs: list, failed)");
        return NULL;
    }
    PyObject *legs = args[0], *failed = args[1];
    PyObject *decoders = PyList_New(0), *payloads = PyList_New(0), *decode_legs = PyList_New(0);
    if (decoders == NULL || payloads == NULL || decode_legs == NULL)
        goto error;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(legs); i++) { /* (a leg's Python code runs in between) */
        PyObject *obj = PyList_GET_ITEM(legs, i);
        RtpLegCoreObject *leg = as_leg(obj);
        if (leg == NULL)
            goto error;
        if (!leg->running)
            continue; /* hung up during this tick */
        Py_INCREF(obj);
        PyObject *decoder = NULL, *payload = NULL;
        int kind = leg_pop(leg, &decoder, &payload);
        int failed_now = kind < 0;
        if (kind == 1) {
            failed_now = PyList_Append(decoders, decoder) < 0 || PyList_Append(payloads, payload) < 0 ||
                         PyList_Append(decode_legs, obj) < 0;
        } else if (kind == 2) { /* a concealed gap: its frame is played at once */
            PyObject *r = PyObject_CallMethod(obj, "play_inbound", "O", payload);
            failed_now = r == NULL;
            Py_XDECREF(r);
        }
        Py_XDECREF(decoder);
        Py_XDECREF(payload);
        if (failed_now && report_failure(failed, obj) < 0) {
            Py_DECREF(obj);
            goto error;
        }
        Py_DECREF(obj);
    }
    return Py_BuildValue("(NNN)", decoders, payloads, decode_legs);
error:
    Py_XDECREF(decoders);
    Py_XDECREF(payloads);
    Py_XDECREF(decode_legs);
    return NULL;
}

#ifdef __linux__
static PyObject *core_disconnect_udp(PyObject *module, PyObject *arg)
{
    int fd = PyObject_AsFileDescriptor(arg);
    if (fd < 0)
        return NULL;
    struct sockaddr unspec;
    memset(&unspec, 0, sizeof(unspec));
    unspec.sa_family = AF_UNSPEC;
    if (connect(fd, &unspec, sizeof(unspec)) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}
#endif

static PyMethodDef module_methods[] = {
    {"send_audio", (PyCFunction)(void (*)(void))core_send_audio, METH_FASTCALL,
     "send_audio(legs, payloads, failed) -> int\n\n"
     "Send each leg its encoded payload (None: nothing) and return how many packets went. A leg in the\n"
     "steady state (plain RTP, connected socket) is sent here; any other through its send_audio()."},
#ifdef __linux__
    {"read_ready", (PyCFunction)core_read_ready, METH_VARARGS,
     "read_ready(epoll_fd, by_fd, now, stop_at, seconds, max_rounds, failed) -> (received, saw_empty)\n\n"
     "Read every leg whose socket the epoll reports readable, one datagram per leg and round, rounds\n"
     "until none is ready (saw_empty) or max_rounds; past stop_at (seconds()) no new round starts.\n"
     "A source-filtered leg's steady audio goes straight to its statistics and jitter buffer; every other\n"
     "datagram through the leg's _received_from_remote(), and an unfiltered leg reads with read_one()."},
    {"disconnect_udp", (PyCFunction)core_disconnect_udp, METH_O,
     "disconnect_udp(sock): dissolve a UDP socket's association (connect with AF_UNSPEC)."},
#endif
    {"pop_inbound", (PyCFunction)(void (*)(void))core_pop_inbound, METH_FASTCALL,
     "pop_inbound(legs, failed) -> (decoders, payloads, decode_legs)\n\n"
     "Pop each running leg's jitter buffer: payloads to decode with their decoders and legs; a concealed\n"
     "gap's frame is played at once (play_inbound)."},
    {NULL},
};

static struct PyModuleDef rtpcore_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "activecall.media._rtpcore",
    .m_doc = "The per-packet RTP work of every leg (see the comment at the top of _rtpcore.c).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__rtpcore(void)
{
    if (PyType_Ready(&RtpStreamType) < 0 || PyType_Ready(&ReceiveStatsType) < 0 ||
        PyType_Ready(&JitterStatsType) < 0 || PyType_Ready(&JitterBufferType) < 0 ||
        PyType_Ready(&RtpLegCoreType) < 0)
        return NULL;
    if (FrameType.tp_name == NULL && PyStructSequence_InitType2(&FrameType, &Frame_desc) < 0)
        return NULL;
    empty_bytes = PyBytes_FromStringAndSize(NULL, 0);
    if (empty_bytes == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&rtpcore_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddType(m, &RtpStreamType) < 0 || PyModule_AddType(m, &ReceiveStatsType) < 0 ||
        PyModule_AddType(m, &JitterStatsType) < 0 || PyModule_AddType(m, &JitterBufferType) < 0 ||
        PyModule_AddType(m, &RtpLegCoreType) < 0 || PyModule_AddType(m, &FrameType) < 0 ||
        PyModule_AddIntConstant(m, "JB_CAPACITY", JB_CAPACITY) < 0 ||
        PyModule_AddIntConstant(m, "MAX_DATAGRAM", MAX_DATAGRAM) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
