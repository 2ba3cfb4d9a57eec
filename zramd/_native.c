/* zramd._native: batch page codec loops, and the allocator's batch copy, with the GIL released.
 *
 * Theory of operation
 * -------------------
 * The device's per-page work on large requests is a loop of small C calls (lz4/zstd on one 4 KiB
 * page each) glued by Python. Called one page at a time from worker threads, every call drops and
 * retakes the GIL, and the hand-offs cost more than the work; so large requests ran on the loop
 * thread alone. These two functions take a whole batch, check every argument and pin every
 * buffer while holding the GIL, run the codec loop with the GIL released (so two workers keep
 * both cores busy while the loop thread serves other requests), then build their results with
 * the GIL again. They never write outside the buffers they were given:
 *
 * decompress_pages(dst, items, kind=0) -> int
 *     items[i] is a bytes object of exactly PAGE bytes (copied as is), a shorter bytes object
 *     (a blob of ``kind``), or a tuple (kind, src); kinds: 1 = lz4 block, 2 = zstd frame (0:
 *     none, a short item is then an error). Page i is decoded into
 *     dst[i*PAGE:(i+1)*PAGE]. A page decodes only if it yields exactly PAGE bytes. Returns -1
 *     when every page decoded, else the index of the first page that did not (the pages
 *     before it are written, the rest of dst is unspecified).
 *
 * prepare_pages(src, kind, level, threshold, same, stored, huge) -> list
 *     src is a whole number of pages. Per page, as zram's write path: a page that is one 8-byte
 *     word repeated gives (same, word, None); else it is compressed (kind 1 = lz4 fast with
 *     acceleration ``level``, 3 = lz4hc at ``level``, 2 = a zstd frame at ``level`` without
 *     content size, checksum or dictionary id, with a context kept per thread; in the lz4 block
 *     of a page that ends in a run of one byte, the matches over runs get offset 1, which
 *     decodes faster: lz4_flatten_runs), and a result of at least ``threshold``
 *     bytes (or one that does not fit below it) gives (huge, PAGE, page bytes), a smaller one
 *     (stored, size, compressed bytes).
 *
 * decode_group(blob, kind, size) -> bytes | None
 *     The blob of a multi-page group (any contiguous buffer) decoded as one lz4 block (kind 1)
 *     or one zstd frame (kind 2) into a new bytes object of ``size`` bytes, the GIL released.
 *     None when it does not decode to exactly ``size`` bytes. zstd uses one decompression
 *     context per thread, kept for the thread's life (a context costs ~100 KiB and
 *     microseconds to set up, more than decoding a small group).
 *
 * decode_groups_into(dst, jobs) -> int
 *     Several such decodes straight into the writable buffer ``dst``, all with the GIL released
 *     once: job i is (offset, size, kind, blob), the blob decoded into dst[offset:offset+size]
 *     (a read that covers whole groups skips the new bytes objects and the copies out of them;
 *     one hand-off of the GIL for all the groups of a read, not one per group: a worker that
 *     retakes the GIL waits for the loop thread). Every job is checked and every blob pinned
 *     first (ValueError for a kind, or a range outside dst). Returns -1 when every blob decoded
 *     to exactly its size, else the index of the first that did not (the jobs after it are not
 *     run).
 *
 * new_buffer(n) -> bytearray
 *     A bytearray of n bytes that is not zeroed (for a destination that is overwritten whole).
 *
 * copy_objects(copies) -> None
 *     The allocator's batch store: for each (dst, dst_offsets, src, src_offsets, lengths) of
 *     the sequence ``copies``, object i, src[src_offsets[i] : + lengths[i]], is copied to
 *     dst[dst_offsets[i] :]. The three index buffers of a copy are int64 arrays of one length;
 *     every range is checked against its buffer before anything is copied (ValueError), and
 *     all the copies run in one stretch with the GIL released (a thread that copies while
 *     another runs Python waits for the GIL once, not once per copy).
 *
 * load_packed(tbl, where, zsizes, arenas, handles, sizes, obj_bits, aid_shift) -> bytes
 *     The allocator's batch load (zramd/allocator/pool.py, ``Pool.load_packed``): the objects of
 *     ``handles`` (uint64) of ``sizes`` (uint16 bytes each) copied out of their mappings end to
 *     end into one new bytes object, each as ``Pool.load`` finds it: from the pool's handle table
 *     ``tbl`` (uint64 entries), the place of each zspage id (``where``, uint64: arena id and
 *     first page, laid out as a huge object's entry) and its class's object size (``zsizes``,
 *     uint16), and the arena list (``mm``), with the entry layout's ``obj_bits`` and
 *     ``aid_shift`` given by the pool. No Python object is looked at per object: each arena's
 *     buffer is taken once per call. KeyError for a handle that is not live, ValueError for an
 *     object outside its mapping.
 *
 * decompress_packed(dst, src, ends, begin, kind) -> int
 *     decompress_pages for blobs laid end to end in ``src``: blob i is src[ends[i-1]:ends[i]]
 *     (int64 offsets; blob 0 starts at ``begin``), a blob of exactly PAGE bytes is copied as
 *     is, an empty blob is a page of zeros, the others are blobs of ``kind`` (1 lz4, 2 zstd).
 *     Every offset is checked before anything is decoded; the loop runs without the GIL.
 *     Returns -1, or the index of the first page that did not decode.
 *
 * crc32(data, value=0) -> int
 *     zlib.crc32(data, value), the same value for every input (zramd/checksum.py): where the
 *     CPU has PCLMULQDQ (``CRC32_CLMUL``, checked at import) the bulk is folded 64 bytes per
 *     step by carry-less multiplication, the GIL released from 16 KiB on; a table does the
 *     tail, and everything on other CPUs (zramd.checksum then uses zlib's own).
 *
 * The libraries are the system's liblz4 and libzstd (declared here, so no -dev package is
 * needed to build). The module is optional: zramd falls back to its Python loops without it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PAGE 4096

int LZ4_decompress_safe(const char *src, char *dst, int compressedSize, int dstCapacity);
int LZ4_compress_fast(const char *src, char *dst, int srcSize, int dstCapacity, int acceleration);
int LZ4_compress_HC(const char *src, char *dst, int srcSize, int dstCapacity, int compressionLevel);
typedef struct ZSTD_DCtx_s ZSTD_DCtx;
ZSTD_DCtx *ZSTD_createDCtx(void);
size_t ZSTD_decompressDCtx(ZSTD_DCtx *dctx, void *dst, size_t dstCapacity, const void *src,
                           size_t srcSize);
unsigned ZSTD_isError(size_t code);
typedef struct ZSTD_CCtx_s ZSTD_CCtx;
ZSTD_CCtx *ZSTD_createCCtx(void);
size_t ZSTD_CCtx_setParameter(ZSTD_CCtx *cctx, int param, int value);
size_t ZSTD_compress2(ZSTD_CCtx *cctx, void *dst, size_t dstCapacity, const void *src,
                      size_t srcSize);
/* zstd.h's values (stable API) */
#define ZSTD_c_compressionLevel 100
#define ZSTD_c_contentSizeFlag 200
#define ZSTD_c_checksumFlag 201
#define ZSTD_c_dictIDFlag 202
/* ZSTD_COMPRESSBOUND(PAGE): no zstd frame of one page is larger */
#define ZSTD_PAGE_BOUND (PAGE + (PAGE >> 8) + ((128 << 10) - PAGE) / (1 << 11))

enum { K_COPY = 0, K_LZ4 = 1, K_ZSTD = 2, K_LZ4HC = 3 };

/* Decode ``len`` bytes at ``src`` of ``kind`` into exactly ``size`` bytes at ``dst`` (K_COPY: a
 * copy of a source of exactly that size; K_ZSTD needs ``dctx``). Whether it did. No GIL needed. */
static int
decode_into(int kind, ZSTD_DCtx *dctx, const char *src, size_t len, char *dst, size_t size)
{
    if (kind == K_COPY) {
        if (len != size)
            return 0;
        memcpy(dst, src, size);
        return 1;
    }
    if (kind == K_LZ4)
        return LZ4_decompress_safe(src, dst, (int)len, (int)size) == (int)size;
    size_t r = ZSTD_decompressDCtx(dctx, dst, size, src, len);
    return !ZSTD_isError(r) && r == size;
}

/* The zstd decompression context of this thread, kept for the thread's life: making one costs
 * more than decoding a page (13 us against 1-8 us here), and every batch of a read needs one.
 * NULL with MemoryError set. Call with the GIL held. */
static _Thread_local ZSTD_DCtx *thread_dctx;

static ZSTD_DCtx *
dctx_of_thread(void)
{
    if (thread_dctx == NULL) {
        thread_dctx = ZSTD_createDCtx();
        if (thread_dctx == NULL)
            PyErr_NoMemory();
    }
    return thread_dctx;
}

typedef struct {
    int kind;
    const char *src;
    Py_ssize_t len;
} job_t;

static PyObject *
decompress_pages(PyObject *self, PyObject *args)
{
    Py_buffer dst;
    PyObject *items;
    int dflt = K_COPY;
    if (!PyArg_ParseTuple(args, "w*O!|i:decompress_pages", &dst, &PyList_Type, &items, &dflt))
        return NULL;
    if (dflt != K_COPY && dflt != K_LZ4 && dflt != K_ZSTD) {
        PyErr_Format(PyExc_ValueError, "unknown kind %d", dflt);
        PyBuffer_Release(&dst);
        return NULL;
    }
    /* pin the list's items: another thread must not free a source while the GIL is released */
    PyObject *pinned = PySequence_Tuple(items);
    if (pinned == NULL) {
        PyBuffer_Release(&dst);
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(pinned);
    job_t *jobs = NULL;
    PyObject *result = NULL;
    if (dst.len < n * (Py_ssize_t)PAGE) {
        PyErr_SetString(PyExc_ValueError, "decompress_pages: dst is shorter than the pages");
        goto out;
    }
    jobs = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(job_t));
    if (jobs == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *it = PyTuple_GET_ITEM(pinned, i);
        PyObject *src = it;
        long kind = K_COPY;
        if (PyTuple_Check(it)) {
            if (PyTuple_GET_SIZE(it) != 2) {
                PyErr_Format(PyExc_TypeError, "item %zd: expected (kind, bytes)", i);
                goto out;
            }
            kind = PyLong_AsLong(PyTuple_GET_ITEM(it, 0));
            if (kind == -1 && PyErr_Occurred())
                goto out;
            src = PyTuple_GET_ITEM(it, 1);
        }
        if (!PyBytes_Check(src)) {
            PyErr_Format(PyExc_TypeError, "item %zd: source must be bytes", i);
            goto out;
        }
        if (src == it && PyBytes_GET_SIZE(src) != PAGE)
            kind = dflt; /* a short bare blob: the default kind (K_COPY then fails the page) */
        if (kind != K_COPY && kind != K_LZ4 && kind != K_ZSTD) {
            PyErr_Format(PyExc_ValueError, "item %zd: unknown kind %ld", i, kind);
            goto out;
        }
        if (PyBytes_GET_SIZE(src) > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "item %zd: source too large", i);
            goto out;
        }
        jobs[i].kind = (int)kind;
        jobs[i].src = PyBytes_AS_STRING(src);
        jobs[i].len = PyBytes_GET_SIZE(src);
    }
    Py_ssize_t bad = -1;
    char *base = dst.buf;
    ZSTD_DCtx *dctx = NULL; /* the thread's (ZSTD_decompress would allocate ~100 KiB a page) */
    for (Py_ssize_t i = 0; i < n; i++) {
        if (jobs[i].kind == K_ZSTD) {
            dctx = dctx_of_thread();
            if (dctx == NULL)
                goto out;
            break;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        char *out = base + i * PAGE;
        const job_t *j = &jobs[i];
        if (!decode_into(j->kind, dctx, j->src, (size_t)j->len, out, PAGE)) {
            bad = i;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(bad);
out:
    PyMem_Free(jobs);
    Py_DECREF(pinned);
    PyBuffer_Release(&dst);
    return result;
}

/* Whether ``page`` ends in a run of one byte of at least FLAT_TAIL bytes: where a long run,
 * and so a slow match, is likely, and worth the walk of lz4_flatten_runs (0.7-1 us a page of
 * real files walked, 20% of compressing it; about 0.15 us a page of the same files with this
 * filter, which keeps the gain: an ext2 image of them decodes 14-30% faster). */
#define FLAT_TAIL 64

static int
ends_in_run(const char *page)
{
    uint64_t run, w;
    memset(&run, page[PAGE - 1], 8);
    for (int k = PAGE - FLAT_TAIL; k < PAGE; k += 8) {
        memcpy(&w, page + k, 8);
        if (w != run)
            return 0;
    }
    return 1;
}

/* Add to ``*n`` the bytes that extend an lz4 length field (one whose nibble is 15) at
 * ``blk[*ip]``, moving ``*ip`` past them; 0 when the block of ``len`` bytes ends among them. */
static int
lz4_more_len(const unsigned char *blk, int len, int *ip, int *n)
{
    unsigned b;
    do {
        if (*ip >= len)
            return 0;
        b = blk[(*ip)++];
        *n += (int)b;
    } while (b == 255);
    return 1;
}

/* Rewrite, in the lz4 block ``blk`` of ``len`` bytes that decodes to ``page``, every match of
 * offset 2..15 whose source is one byte repeated to offset 1. It decodes to the same bytes (the
 * copy repeats that byte either way), and liblz4 then takes its memset path instead of the
 * overlapping 8-byte copies it uses for offsets 3, 5..7 and 9..15 (a run of 2.4 KiB: 2.6 us at
 * those offsets, 0.45 us at offset 1). The compressor picks such offsets for a run that follows
 * other bytes: fio's half-random pages (1.6 KiB of data, then zeros, at offset 7) decode 3.5x
 * faster. The block keeps its length; a block that does not parse is left where it stops (it
 * is the compressor's own output: never). No GIL needed. */
static void
lz4_flatten_runs(unsigned char *blk, int len, const unsigned char *page)
{
    int ip = 0, op = 0;
    while (ip < len) {
        unsigned tok = blk[ip++];
        int lit = (int)(tok >> 4), ml = (int)(tok & 15);
        if (lit == 15 && !lz4_more_len(blk, len, &ip, &lit))
            return;
        ip += lit;
        op += lit;
        if (ip + 2 > len)
            return; /* the last sequence: literals only */
        int at = ip, off = blk[ip] | blk[ip + 1] << 8;
        ip += 2;
        if (ml == 15 && !lz4_more_len(blk, len, &ip, &ml))
            return;
        if (off >= 2 && off <= 15 && off <= op && op <= PAGE) {
            const unsigned char *src = page + op - off;
            int k = 1;
            while (k < off && src[k] == src[0])
                k++;
            if (k == off) {
                blk[at] = 1;
                blk[at + 1] = 0;
            }
        }
        op += ml + 4;
    }
}

/* The zstd compression context of this thread for prepare_pages, kept for the thread's life
 * (setting one up costs more than compressing a page), with the level it is set to. */
static _Thread_local ZSTD_CCtx *page_cctx;
static _Thread_local int page_cctx_level;

static ZSTD_CCtx *
page_cctx_for(int level)
{
    if (page_cctx == NULL) {
        page_cctx = ZSTD_createCCtx();
        if (page_cctx == NULL)
            return NULL;
        /* frames as zramd's zstd codec writes them: no content size, checksum or dict id */
        if (ZSTD_isError(ZSTD_CCtx_setParameter(page_cctx, ZSTD_c_contentSizeFlag, 0)) ||
            ZSTD_isError(ZSTD_CCtx_setParameter(page_cctx, ZSTD_c_checksumFlag, 0)) ||
            ZSTD_isError(ZSTD_CCtx_setParameter(page_cctx, ZSTD_c_dictIDFlag, 0)))
            return NULL;
        page_cctx_level = level + 1; /* not set yet */
    }
    if (page_cctx_level != level) {
        if (ZSTD_isError(ZSTD_CCtx_setParameter(page_cctx, ZSTD_c_compressionLevel, level)))
            return NULL;
        page_cctx_level = level;
    }
    return page_cctx;
}

static PyObject *
prepare_pages(PyObject *self, PyObject *args)
{
    Py_buffer src;
    int kind, level, threshold;
    PyObject *c_same, *c_stored, *c_huge;
    if (!PyArg_ParseTuple(args, "y*iiiOOO:prepare_pages", &src, &kind, &level, &threshold,
                          &c_same, &c_stored, &c_huge))
        return NULL;
    PyObject *result = NULL;
    char *scratch = NULL;
    int *sizes = NULL;
    uint64_t *words = NULL;
    Py_ssize_t n = src.len / PAGE;
    if (src.len % PAGE) {
        PyErr_SetString(PyExc_ValueError, "prepare_pages: src is not a whole number of pages");
        goto out;
    }
    if (kind != K_LZ4 && kind != K_LZ4HC && kind != K_ZSTD) {
        PyErr_Format(PyExc_ValueError, "prepare_pages: unknown kind %d", kind);
        goto out;
    }
    if (kind == K_ZSTD && page_cctx_for(level) == NULL) {
        PyErr_SetString(PyExc_MemoryError, "prepare_pages: no zstd compression context");
        goto out;
    }
    if (threshold < 1 || threshold > PAGE + 1) {
        PyErr_SetString(PyExc_ValueError, "prepare_pages: threshold out of range");
        goto out;
    }
    /* a compressed page is kept only below threshold: lz4 compresses into threshold - 1 bytes
     * (it fails when it does not fit); zstd may fail at a capacity its result would fit, so it
     * gets room for any result (ZSTD_COMPRESSBOUND of a page) and the size is checked after */
    int cap = threshold - 1;
    int slot = kind == K_ZSTD ? ZSTD_PAGE_BOUND : cap;
    size_t slots = (size_t)(n ? n : 1);
    scratch = PyMem_Malloc(slots * (size_t)(slot ? slot : 1));
    sizes = PyMem_Malloc(slots * sizeof(int));
    words = PyMem_Malloc(slots * sizeof(uint64_t));
    if (scratch == NULL || sizes == NULL || words == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    const char *in = src.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *page = in + i * PAGE;
        if (memcmp(page, page + 8, PAGE - 8) == 0) {
            memcpy(&words[i], page, 8);
            sizes[i] = -1; /* same-filled */
            continue;
        }
        char *out = scratch + (size_t)i * (size_t)slot;
        int r = 0;
        if (cap > 0) {
            if (kind == K_LZ4 || kind == K_LZ4HC) {
                r = kind == K_LZ4 ? LZ4_compress_fast(page, out, PAGE, cap, level)
                                  : LZ4_compress_HC(page, out, PAGE, cap, level);
                if (r > 0 && ends_in_run(page))
                    lz4_flatten_runs((unsigned char *)out, r, (const unsigned char *)page);
            } else {
                size_t z = ZSTD_compress2(page_cctx, out, (size_t)slot, page, PAGE);
                r = ZSTD_isError(z) || z > (size_t)cap ? 0 : (int)z;
            }
        }
        sizes[i] = r; /* 0: did not fit below threshold: huge */
    }
    Py_END_ALLOW_THREADS
    result = PyList_New(n);
    if (result == NULL)
        goto out;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t;
        if (sizes[i] < 0) {
            /* the word read little-endian, as int.from_bytes(page[:8], "little") */
            unsigned char *b = (unsigned char *)&words[i];
            uint64_t w = 0;
            for (int k = 7; k >= 0; k--)
                w = (w << 8) | b[k];
            t = Py_BuildValue("(OKO)", c_same, (unsigned long long)w, Py_None);
        } else if (sizes[i] == 0) {
            t = Py_BuildValue("(Oiy#)", c_huge, PAGE, in + i * PAGE, (Py_ssize_t)PAGE);
        } else {
            t = Py_BuildValue("(Oiy#)", c_stored, sizes[i], scratch + (size_t)i * (size_t)slot,
                              (Py_ssize_t)sizes[i]);
        }
        if (t == NULL) {
            Py_CLEAR(result);
            goto out;
        }
        PyList_SET_ITEM(result, i, t);
    }
out:
    PyMem_Free(scratch);
    PyMem_Free(sizes);
    PyMem_Free(words);
    PyBuffer_Release(&src);
    return result;
}

static PyObject *
decode_group(PyObject *self, PyObject *args)
{
    Py_buffer blob;
    int kind;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "y*in:decode_group", &blob, &kind, &size))
        return NULL;
    PyObject *out = NULL;
    ZSTD_DCtx *dctx = NULL;
    if (kind != K_LZ4 && kind != K_ZSTD) {
        PyErr_Format(PyExc_ValueError, "decode_group: unknown kind %d", kind);
        goto out;
    }
    if (size <= 0 || size > INT32_MAX || blob.len > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "decode_group: size out of range");
        goto out;
    }
    if (blob.len == 0) {
        out = Py_NewRef(Py_None);
        goto out;
    }
    if (kind == K_ZSTD && (dctx = dctx_of_thread()) == NULL)
        goto out;
    out = PyBytes_FromStringAndSize(NULL, size);
    if (out == NULL)
        goto out;
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = decode_into(kind, dctx, blob.buf, (size_t)blob.len, PyBytes_AS_STRING(out),
                     (size_t)size);
    Py_END_ALLOW_THREADS
    if (!ok)
        Py_SETREF(out, Py_NewRef(Py_None));
out:
    PyBuffer_Release(&blob);
    return out;
}

static PyObject *
decode_groups_into(PyObject *self, PyObject *args)
{
    Py_buffer dst;
    PyObject *jobs;
    if (!PyArg_ParseTuple(args, "w*O!:decode_groups_into", &dst, &PyList_Type, &jobs))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(jobs), pinned = 0, bad = -1;
    PyObject *result = NULL;
    Py_buffer *blobs = PyMem_Calloc((size_t)(n ? n : 1), sizeof(Py_buffer));
    Py_ssize_t *offs = PyMem_Malloc((size_t)(n ? n : 1) * 2 * sizeof(Py_ssize_t));
    int *kinds = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(int));
    ZSTD_DCtx *dctx = NULL;
    if (blobs == NULL || offs == NULL || kinds == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t off, size;
        int kind;
        PyObject *blob, *job = PyList_GET_ITEM(jobs, i);
        if (!PyTuple_Check(job)) {
            PyErr_SetString(PyExc_TypeError, "decode_groups_into: a job is not a tuple");
            goto out;
        }
        if (!PyArg_ParseTuple(job, "nniO:decode_groups_into job", &off, &size, &kind, &blob))
            goto out;
        if (kind != K_LZ4 && kind != K_ZSTD) {
            PyErr_Format(PyExc_ValueError, "decode_groups_into: unknown kind %d", kind);
            goto out;
        }
        if (off < 0 || size <= 0 || size > INT32_MAX || off > dst.len - size) {
            PyErr_SetString(PyExc_ValueError, "decode_groups_into: a job's range is outside dst");
            goto out;
        }
        if (PyObject_GetBuffer(blob, &blobs[i], PyBUF_SIMPLE) < 0)
            goto out;
        pinned = i + 1;
        if (blobs[i].len > INT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "decode_groups_into: a blob is too large");
            goto out;
        }
        if (kind == K_ZSTD && dctx == NULL && (dctx = dctx_of_thread()) == NULL)
            goto out;
        offs[2 * i] = off;
        offs[2 * i + 1] = size;
        kinds[i] = kind;
    }
    char *base = dst.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        const Py_buffer *b = &blobs[i];
        if (b->len == 0 || !decode_into(kinds[i], dctx, b->buf, (size_t)b->len,
                                        base + offs[2 * i], (size_t)offs[2 * i + 1])) {
            bad = i;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(bad);
out:
    for (Py_ssize_t i = 0; i < pinned; i++)
        PyBuffer_Release(&blobs[i]);
    PyMem_Free(blobs);
    PyMem_Free(offs);
    PyMem_Free(kinds);
    PyBuffer_Release(&dst);
    return result;
}

static PyObject *
new_buffer(PyObject *self, PyObject *args)
{
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "n:new_buffer", &n))
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "new_buffer: negative size");
        return NULL;
    }
    return PyByteArray_FromStringAndSize(NULL, n);
}

/* The arenas' mappings for load_packed, each one's buffer taken on first use. */
typedef struct {
    PyObject *arenas; /* the pool's list: an arena (with ``mm``) or None per arena id */
    Py_buffer *views;
    char *held;
    Py_ssize_t n;
} ArenaViews;

static void
arena_views_release(ArenaViews *av)
{
    for (Py_ssize_t i = 0; av->held != NULL && i < av->n; i++)
        if (av->held[i])
            PyBuffer_Release(&av->views[i]);
    PyMem_Free(av->views);
    PyMem_Free(av->held);
}

/* The bytes of arena ``aid`` at [off, off + size) for handle ``h``; NULL with an error set. */
static const char *
arena_bytes(ArenaViews *av, uint64_t aid, long long off, Py_ssize_t size, uint64_t h)
{
    if (aid >= (uint64_t)av->n || PyList_GET_ITEM(av->arenas, (Py_ssize_t)aid) == Py_None) {
        PyErr_Format(PyExc_KeyError, "handle %llu: no arena %llu", (unsigned long long)h,
                     (unsigned long long)aid);
        return NULL;
    }
    Py_buffer *view = &av->views[aid];
    if (!av->held[aid]) {
        PyObject *mm = PyObject_GetAttrString(PyList_GET_ITEM(av->arenas, (Py_ssize_t)aid), "mm");
        if (mm == NULL)
            return NULL;
        int rc = PyObject_GetBuffer(mm, view, PyBUF_SIMPLE);
        Py_DECREF(mm); /* the arena keeps it alive, and the view holds its buffer */
        if (rc < 0)
            return NULL;
        av->held[aid] = 1;
    }
    if (off < 0 || size < 0 || off > (long long)view->len - size) {
        PyErr_Format(PyExc_ValueError, "load_packed: handle %llu out of its mapping",
                     (unsigned long long)h);
        return NULL;
    }
    return (const char *)view->buf + off;
}

static PyObject *
load_packed(PyObject *self, PyObject *args)
{
    Py_buffer tbl, wb, zb, hb, sb;
    PyObject *arenas;
    int obj_bits, aid_shift;
    if (!PyArg_ParseTuple(args, "y*y*y*O!y*y*ii:load_packed", &tbl, &wb, &zb, &PyList_Type,
                          &arenas, &hb, &sb, &obj_bits, &aid_shift))
        return NULL;
    const uint64_t FREE = 1ULL << 63, HUGE = 1ULL << 62;
    const uint64_t obj_mask = (1ULL << obj_bits) - 1, page_mask = (1ULL << aid_shift) - 1;
    const uint64_t aid_mask = (1ULL << (62 - aid_shift)) - 1;
    const uint64_t *t = (const uint64_t *)tbl.buf;
    const uint64_t *where = (const uint64_t *)wb.buf;
    const uint16_t *zsize = (const uint16_t *)zb.buf;
    const uint64_t *handles = (const uint64_t *)hb.buf;
    const uint16_t *sizes = (const uint16_t *)sb.buf;
    Py_ssize_t ntbl = tbl.len / (Py_ssize_t)sizeof(uint64_t);
    Py_ssize_t nzs = wb.len / (Py_ssize_t)sizeof(uint64_t);
    Py_ssize_t n = hb.len / (Py_ssize_t)sizeof(uint64_t);
    PyObject *out = NULL;
    long long total = 0;
    ArenaViews av = {arenas, NULL, NULL, PyList_GET_SIZE(arenas)};
    if (hb.len % (Py_ssize_t)sizeof(uint64_t) || sb.len != n * (Py_ssize_t)sizeof(uint16_t) ||
        zb.len != nzs * (Py_ssize_t)sizeof(uint16_t)) {
        PyErr_SetString(PyExc_ValueError, "load_packed: handles (uint64) and sizes (uint16), "
                                          "or the zspages' places and sizes, differ in length");
        goto fail;
    }
    av.views = PyMem_Calloc((size_t)av.n + 1, sizeof(Py_buffer));
    av.held = PyMem_Calloc((size_t)av.n + 1, 1);
    if (av.views == NULL || av.held == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        total += sizes[i];
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (out == NULL)
        goto fail;
    char *dst = PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t h = handles[i];
        Py_ssize_t size = sizes[i];
        if (h == 0 || h >= (uint64_t)ntbl || (t[h] & FREE)) {
            PyErr_Format(PyExc_KeyError, "handle %llu is not live", (unsigned long long)h);
            goto fail;
        }
        uint64_t e = t[h], w;
        long long off = 0;
        if (e & HUGE) {
            w = e;
        } else {
            uint64_t zid = e >> obj_bits;
            if (zid == 0 || zid >= (uint64_t)nzs) {
                PyErr_Format(PyExc_KeyError, "handle %llu: no zspage %llu",
                             (unsigned long long)h, (unsigned long long)zid);
                goto fail;
            }
            w = where[zid];
            off = (long long)(e & obj_mask) * zsize[zid];
        }
        const char *src = arena_bytes(&av, (w >> aid_shift) & aid_mask,
                                      (long long)((w & page_mask) * PAGE) + off, size, h);
        if (src == NULL)
            goto fail;
        memcpy(dst, src, (size_t)size);
        dst += size;
    }
    arena_views_release(&av);
    PyBuffer_Release(&tbl);
    PyBuffer_Release(&wb);
    PyBuffer_Release(&zb);
    PyBuffer_Release(&hb);
    PyBuffer_Release(&sb);
    return out;
fail:
    arena_views_release(&av);
    Py_XDECREF(out);
    PyBuffer_Release(&tbl);
    PyBuffer_Release(&wb);
    PyBuffer_Release(&zb);
    PyBuffer_Release(&hb);
    PyBuffer_Release(&sb);
    return NULL;
}

static PyObject *
decompress_packed(PyObject *self, PyObject *args)
{
    Py_buffer dst, src, eb;
    Py_ssize_t begin;
    int kind;
    if (!PyArg_ParseTuple(args, "w*y*y*ni:decompress_packed", &dst, &src, &eb, &begin, &kind))
        return NULL;
    PyObject *result = NULL;
    ZSTD_DCtx *dctx = NULL;
    const int64_t *ends = (const int64_t *)eb.buf;
    Py_ssize_t n = eb.len / (Py_ssize_t)sizeof(int64_t);
    if (kind != K_LZ4 && kind != K_ZSTD) {
        PyErr_Format(PyExc_ValueError, "decompress_packed: unknown kind %d", kind);
        goto out;
    }
    if (eb.len % (Py_ssize_t)sizeof(int64_t) || dst.len < n * (Py_ssize_t)PAGE) {
        PyErr_SetString(PyExc_ValueError, "decompress_packed: ends or dst of the wrong length");
        goto out;
    }
    for (Py_ssize_t i = 0, prev = begin; i < n; prev = (Py_ssize_t)ends[i++]) {
        if (prev < 0 || ends[i] < prev || ends[i] > src.len || ends[i] - prev > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "decompress_packed: blob %zd out of range", i);
            goto out;
        }
    }
    if (kind == K_ZSTD && n && (dctx = dctx_of_thread()) == NULL)
        goto out;
    Py_ssize_t bad = -1;
    Py_BEGIN_ALLOW_THREADS
    const char *s = src.buf;
    Py_ssize_t prev = begin;
    for (Py_ssize_t i = 0; i < n; i++) {
        char *o = (char *)dst.buf + i * PAGE;
        Py_ssize_t len = (Py_ssize_t)ends[i] - prev;
        if (len == 0)
            memset(o, 0, PAGE);
        else if (!decode_into(len == PAGE ? K_COPY : kind, dctx, s + prev, (size_t)len, o, PAGE)) {
            bad = i;
            break;
        }
        prev = (Py_ssize_t)ends[i];
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(bad);
out:
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    PyBuffer_Release(&eb);
    return result;
}

static PyObject *
copy_objects(PyObject *self, PyObject *args)
{
    PyObject *seq_in;
    if (!PyArg_ParseTuple(args, "O:copy_objects", &seq_in))
        return NULL;
    PyObject *seq = PySequence_Fast(seq_in, "copy_objects: a sequence of copies");
    if (seq == NULL)
        return NULL;
    Py_ssize_t nb = PySequence_Fast_GET_SIZE(seq), held = 0;
    Py_buffer *bufs = PyMem_Calloc(nb ? (size_t)nb * 5 : 1, sizeof(Py_buffer));
    PyObject *ret = NULL;
    if (bufs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; held < nb; held++) {
        Py_buffer *b = bufs + 5 * held;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, held), "w*y*y*y*y*:copy_objects",
                              &b[0], &b[1], &b[2], &b[3], &b[4]))
            goto done; /* it released what it had taken */
        Py_ssize_t len = b[4].len;
        if (b[1].len != len || b[3].len != len || len % (Py_ssize_t)sizeof(int64_t)) {
            held++;
            PyErr_SetString(PyExc_ValueError, "copy_objects: index arrays of different lengths");
            goto done;
        }
        const int64_t *d = b[1].buf, *s = b[3].buf, *l = b[4].buf;
        for (Py_ssize_t i = 0; i < len / (Py_ssize_t)sizeof(int64_t); i++) {
            if (l[i] < 0 || d[i] < 0 || s[i] < 0 || d[i] > b[0].len - l[i] ||
                s[i] > b[2].len - l[i]) {
                held++;
                PyErr_Format(PyExc_ValueError, "copy_objects: object %zd out of range", i);
                goto done;
            }
        }
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t j = 0; j < nb; j++) {
        Py_buffer *b = bufs + 5 * j;
        const int64_t *d = b[1].buf, *s = b[3].buf, *l = b[4].buf;
        for (Py_ssize_t i = 0; i < b[4].len / (Py_ssize_t)sizeof(int64_t); i++)
            memcpy((char *)b[0].buf + d[i], (const char *)b[2].buf + s[i], (size_t)l[i]);
    }
    Py_END_ALLOW_THREADS
    ret = Py_None;
    Py_INCREF(ret);
done:
    for (Py_ssize_t j = 0; bufs != NULL && j < held; j++)
        for (int k = 0; k < 5; k++)
            PyBuffer_Release(&bufs[5 * j + k]);
    PyMem_Free(bufs);
    Py_DECREF(seq);
    return ret;
}

/* ---- CRC-32 (zlib's: IEEE polynomial, reflected, inverted in and out) -------------------- */
/* a CRC of at least this many bytes runs with the GIL released */
#define CRC_NOGIL_BYTES (16 << 10)
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define CRC_CLMUL 1
#endif

static uint32_t crc_table[256];

static void
crc_table_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ 0xEDB88320u : c >> 1;
        crc_table[i] = c;
    }
}

/* the plain reflected CRC register update (no inversion) over n bytes */
static uint32_t
crc_bytes(uint32_t c, const unsigned char *p, size_t n)
{
    while (n--)
        c = crc_table[(c ^ *p++) & 0xff] ^ (c >> 8);
    return c;
}

#ifdef CRC_CLMUL
/* The register update over n bytes (n >= 64, a multiple of 16) by carry-less multiplication:
 * four 128-bit lanes folded 64 bytes at a time, then into one lane, then reduced to 32 bits
 * (Barrett). The folding constants are x^k mod P(x) for the reflected polynomial: fold by 4
 * lanes (x^(4*128+32), x^(4*128-32)), by 1 lane (x^(128+32), x^(128-32)), 64 -> 32 bits
 * (x^64), and Barrett's P(x) and floor(x^64 / P(x)). */
__attribute__((target("pclmul,sse2"))) static uint32_t
crc_clmul(uint32_t c, const unsigned char *p, size_t n)
{
    const __m128i k1k2 = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL);
    const __m128i k3k4 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);
    const __m128i k5 = _mm_set_epi64x(0, 0x163cd6124LL);
    const __m128i poly = _mm_set_epi64x(0x1F7011641LL, 0x1DB710641LL);
    const __m128i mask32 = _mm_set_epi32(0, 0, 0, -1);
    __m128i x1 = _mm_loadu_si128((const __m128i *)p);
    __m128i x2 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i x3 = _mm_loadu_si128((const __m128i *)(p + 32));
    __m128i x4 = _mm_loadu_si128((const __m128i *)(p + 48));
    x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128((int)c));
    p += 64;
    n -= 64;
    while (n >= 64) {
#define FOLD4(x, off)                                                                      \
    do {                                                                                   \
        __m128i h = _mm_clmulepi64_si128(x, k1k2, 0x11);                                   \
        x = _mm_clmulepi64_si128(x, k1k2, 0x00);                                           \
        x = _mm_xor_si128(_mm_xor_si128(x, h), _mm_loadu_si128((const __m128i *)(p + off))); \
    } while (0)
        FOLD4(x1, 0);
        FOLD4(x2, 16);
        FOLD4(x3, 32);
        FOLD4(x4, 48);
#undef FOLD4
        p += 64;
        n -= 64;
    }
#define FOLD1(x, next)                                                                     \
    do {                                                                                   \
        __m128i h = _mm_clmulepi64_si128(x, k3k4, 0x11);                                   \
        x = _mm_clmulepi64_si128(x, k3k4, 0x00);                                           \
        x = _mm_xor_si128(_mm_xor_si128(x, h), next);                                      \
    } while (0)
    FOLD1(x1, x2);
    FOLD1(x1, x3);
    FOLD1(x1, x4);
    while (n >= 16) {
        FOLD1(x1, _mm_loadu_si128((const __m128i *)p));
        p += 16;
        n -= 16;
    }
#undef FOLD1
    /* 128 -> 64 bits: the low half times x^(128-32), into the high half (32 zero bits added) */
    __m128i t = _mm_clmulepi64_si128(k3k4, x1, 0x01);
    x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), t);
    /* 64 -> 32 bits */
    t = _mm_clmulepi64_si128(_mm_and_si128(x1, mask32), k5, 0x00);
    x1 = _mm_xor_si128(_mm_srli_si128(x1, 4), t);
    /* Barrett reduction */
    t = _mm_and_si128(_mm_clmulepi64_si128(_mm_and_si128(x1, mask32), poly, 0x10), mask32);
    t = _mm_clmulepi64_si128(t, poly, 0x00);
    x1 = _mm_xor_si128(x1, t);
    return (uint32_t)_mm_cvtsi128_si32(_mm_srli_si128(x1, 4));
}
#endif

/* whether this CPU has PCLMULQDQ (checked once, at import) */
static int crc_clmul_ok;

static PyObject *
crc32_fast(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    unsigned int value = 0;
    if (!PyArg_ParseTuple(args, "y*|I:crc32", &buf, &value))
        return NULL;
    const unsigned char *p = buf.buf;
    size_t n = (size_t)buf.len;
    uint32_t c = ~(uint32_t)value;
#ifdef CRC_CLMUL
    if (crc_clmul_ok && n >= 64) {
        size_t m = n & ~(size_t)15;
        if (m >= CRC_NOGIL_BYTES) {
            Py_BEGIN_ALLOW_THREADS
            c = crc_clmul(c, p, m);
            Py_END_ALLOW_THREADS
        } else {
            c = crc_clmul(c, p, m);
        }
        p += m;
        n -= m;
    }
#endif
    c = crc_bytes(c, p, n);
    PyBuffer_Release(&buf);
    return PyLong_FromUnsignedLong(~c);
}

static PyMethodDef methods[] = {
    {"crc32", crc32_fast, METH_VARARGS,
     "crc32(data, value=0) -> zlib.crc32(data, value), by carry-less multiplication"},
    {"load_packed", load_packed, METH_VARARGS,
     "load_packed(tbl, where, zsizes, arenas, handles, sizes, obj_bits, aid_shift) -> bytes"},
    {"decompress_packed", decompress_packed, METH_VARARGS,
     "decompress_packed(dst, src, ends, begin, kind) -> -1, or the first page that did not decode"},
    {"copy_objects", copy_objects, METH_VARARGS,
     "copy_objects(copies): each (dst, dst_offsets, src, src_offsets, lengths) scattered into dst"},
    {"new_buffer", new_buffer, METH_VARARGS, "new_buffer(n) -> bytearray of n bytes, not zeroed"},
    {"decompress_pages", decompress_pages, METH_VARARGS,
     "decompress_pages(dst, items) -> -1, or the index of the first page that did not decode"},
    {"decode_group", decode_group, METH_VARARGS,
     "decode_group(blob, kind, size) -> the group's pages, or None when it does not decode"},
    {"decode_groups_into", decode_groups_into, METH_VARARGS,
     "decode_groups_into(dst, [(offset, size, kind, blob), ...]) -> -1, or the first bad job"},
    {"prepare_pages", prepare_pages, METH_VARARGS,
     "prepare_pages(src, kind, level, threshold, same, stored, huge) -> list of prepared pages"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "zramd._native", "Batch page codec loops without the GIL.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "PAGE", PAGE) < 0 || PyModule_AddIntConstant(m, "LZ4", K_LZ4) < 0 ||
        PyModule_AddIntConstant(m, "ZSTD", K_ZSTD) < 0 ||
        PyModule_AddIntConstant(m, "LZ4HC", K_LZ4HC) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    crc_table_init();
#ifdef CRC_CLMUL
    __builtin_cpu_init();
    crc_clmul_ok = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse2");
#endif
    if (PyModule_AddIntConstant(m, "CRC32_CLMUL", crc_clmul_ok) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
