"""C source of the Hamming kernels, kept in a .py file so it ships with the package without
package-data configuration. Compiled and loaded by :mod:`fashionhash.index._kernel`.

Conventions shared with the Python side:

* codes are ``(n, W)`` uint64 words (packed bytes zero-padded to a multiple of 8), rows are
  positions in that array, ids are the caller's int64 labels;
* results are ordered by (distance, id) ascending — the tie order every backend reproduces;
* ``allowed`` is an optional ``(n,)`` uint8 mask (deleted rows and attribute filters);
* every function is reentrant: Python runs one call per thread on disjoint query ranges
  (ctypes drops the GIL during the call).
"""

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

typedef int64_t i64;
typedef int32_t i32;
typedef uint64_t u64;
typedef uint32_t u32;
typedef uint8_t u8;
typedef int8_t i8;

#define POPC(x) ((int)__builtin_popcountll(x))
#define INLINE static inline __attribute__((always_inline))
#define BIG_D 0x7fffffff
#define BIG_I 0x7fffffffffffffffLL
#define MAXM 64
#define PROBE_BATCH 32

int fh_abi_version(void) { return 5; }

INLINE int dist_w(const u64 *a, const u64 *b, int W) {
    int d = 0;
    for (int w = 0; w < W; ++w) d += POPC(a[w] ^ b[w]);
    return d;
}

/* ---- bounded max-heap on (distance, id): the root is the worst item kept ---------------- */

INLINE int worse(i32 da, i64 ia, i32 db, i64 ib) { return da > db || (da == db && ia > ib); }

static void sift_down(i32 *hd, i64 *hi, int n, int pos) {
    i32 d = hd[pos];
    i64 id = hi[pos];
    for (;;) {
        int c = 2 * pos + 1;
        if (c >= n) break;
        if (c + 1 < n && worse(hd[c + 1], hi[c + 1], hd[c], hi[c])) c++;
        if (!worse(hd[c], hi[c], d, id)) break;
        hd[pos] = hd[c];
        hi[pos] = hi[c];
        pos = c;
    }
    hd[pos] = d;
    hi[pos] = id;
}

static void sift_up(i32 *hd, i64 *hi, int pos) {
    i32 d = hd[pos];
    i64 id = hi[pos];
    while (pos > 0) {
        int p = (pos - 1) / 2;
        if (!worse(d, id, hd[p], hi[p])) break;
        hd[pos] = hd[p];
        hi[pos] = hi[p];
        pos = p;
    }
    hd[pos] = d;
    hi[pos] = id;
}

typedef struct {
    i32 *d;
    i64 *i;
    int size, k;
    i32 td; /* admission threshold: root distance once full, +inf before */
    i64 ti;
} heap_t;

INLINE void heap_init(heap_t *h, i32 *d, i64 *i, int k) {
    h->d = d; h->i = i; h->size = 0; h->k = k; h->td = BIG_D; h->ti = BIG_I;
}

/* The caller has checked that (d, id) beats the root (or the heap is not full). */
INLINE void heap_offer(heap_t *h, i32 d, i64 id) {
    if (h->size < h->k) {
        h->d[h->size] = d;
        h->i[h->size] = id;
        sift_up(h->d, h->i, h->size);
        h->size++;
    } else {
        h->d[0] = d;
        h->i[0] = id;
        sift_down(h->d, h->i, h->k, 0);
    }
    if (h->size == h->k) { h->td = h->d[0]; h->ti = h->i[0]; }
}

/* Heap-sort in place to ascending (distance, id), then pad with (fill_d, -1). */
static void heap_finish(heap_t *h, i32 fill_d) {
    for (int n = h->size; n > 1; --n) {
        i32 td = h->d[0]; i64 ti = h->i[0];
        h->d[0] = h->d[n - 1]; h->i[0] = h->i[n - 1];
        h->d[n - 1] = td; h->i[n - 1] = ti;
        sift_down(h->d, h->i, n - 1, 0);
    }
    for (int j = h->size; j < h->k; ++j) { h->d[j] = fill_d; h->i[j] = -1; }
}

#define ADMIT(h, d, r)                                                      \
    do {                                                                    \
        if (!allowed || allowed[r]) {                                       \
            i64 id_ = ids[r];                                               \
            if ((h)->size < (h)->k || (d) < (h)->td || id_ < (h)->ti)       \
                heap_offer((h), (d), id_);                                  \
        }                                                                   \
    } while (0)

/* ---- linear scan ---------------------------------------------------------------------- */

/* One query against rows [r0, r1); W is a literal at the call sites so the loop specialises. */
INLINE void scan_block1(heap_t *h, const u64 *codes, const int W, const i64 *ids,
                        const u8 *allowed, const u64 *q, i64 r0, i64 r1) {
    i32 t = h->td;
    for (i64 r = r0; r < r1; ++r) {
        i32 d = dist_w(q, codes + r * W, W);
        if (d <= t) { ADMIT(h, d, r); t = h->td; }
    }
}

/* Four queries share every row load; the admission test is one rarely taken branch. */
INLINE void scan_block4(heap_t *h0, const u64 *codes, const int W, const i64 *ids,
                        const u8 *allowed, const u64 *q, i64 r0, i64 r1) {
    heap_t *h1 = h0 + 1, *h2 = h0 + 2, *h3 = h0 + 3;
    i32 t0 = h0->td, t1 = h1->td, t2 = h2->td, t3 = h3->td;
    for (i64 r = r0; r < r1; ++r) {
        const u64 *c = codes + r * W;
        i32 d0 = dist_w(q, c, W), d1 = dist_w(q + W, c, W);
        i32 d2 = dist_w(q + 2 * W, c, W), d3 = dist_w(q + 3 * W, c, W);
        if ((d0 <= t0) | (d1 <= t1) | (d2 <= t2) | (d3 <= t3)) {
            if (d0 <= t0) { ADMIT(h0, d0, r); t0 = h0->td; }
            if (d1 <= t1) { ADMIT(h1, d1, r); t1 = h1->td; }
            if (d2 <= t2) { ADMIT(h2, d2, r); t2 = h2->td; }
            if (d3 <= t3) { ADMIT(h3, d3, r); t3 = h3->td; }
        }
    }
}

#define QBLOCK 32

/* Exact k-NN by linear scan.  codes (n, W), ids (n,), allowed (n,) or NULL, queries (nq, W)
 * -> out_d, out_i (nq, k) sorted by (distance, id), padded with (fill_d, -1).  A block of
 * queries sweeps row blocks small enough to stay in L1/L2. */
int fh_scan_knn(const u64 *codes, i64 n, int W, const i64 *ids, const u8 *allowed,
                const u64 *queries, i64 nq, int k, i32 fill_d, i32 *out_d, i64 *out_i) {
    if (k <= 0 || nq <= 0) return 0;
    const i64 RB = 8192 / W > 64 ? 8192 / W : 64;
    heap_t hs[QBLOCK];
    for (i64 q0 = 0; q0 < nq; q0 += QBLOCK) {
        i64 q1 = q0 + QBLOCK < nq ? q0 + QBLOCK : nq;
        for (i64 q = q0; q < q1; ++q) heap_init(&hs[q - q0], out_d + q * k, out_i + q * k, k);
        for (i64 r0 = 0; r0 < n; r0 += RB) {
            i64 r1 = r0 + RB < n ? r0 + RB : n;
            i64 q = q0;
            for (; q + 4 <= q1; q += 4) {
                const u64 *qv = queries + q * W;
                heap_t *h = &hs[q - q0];
                switch (W) {
                    case 1: scan_block4(h, codes, 1, ids, allowed, qv, r0, r1); break;
                    case 2: scan_block4(h, codes, 2, ids, allowed, qv, r0, r1); break;
                    case 4: scan_block4(h, codes, 4, ids, allowed, qv, r0, r1); break;
                    default: scan_block4(h, codes, W, ids, allowed, qv, r0, r1); break;
                }
            }
            for (; q < q1; ++q) {
                const u64 *qv = queries + q * W;
                heap_t *h = &hs[q - q0];
                switch (W) {
                    case 1: scan_block1(h, codes, 1, ids, allowed, qv, r0, r1); break;
                    case 2: scan_block1(h, codes, 2, ids, allowed, qv, r0, r1); break;
                    default: scan_block1(h, codes, W, ids, allowed, qv, r0, r1); break;
                }
            }
        }
        for (i64 q = q0; q < q1; ++q) heap_finish(&hs[q - q0], fill_d);
    }
    return 0;
}

static int cmp_i64(const void *a, const void *b) {
    i64 x = *(const i64 *)a, y = *(const i64 *)b;
    return (x > y) - (x < y);
}

/* Exact k-NN of single queries when k is a large part of n (a two-stage shortlist of a
 * quarter of the catalogue): where the heap would pay log k for each of >= k admissions,
 * this takes every distance, a histogram, the k-th distance t, and writes the rows closer
 * than t, then the smallest ids at t, in (distance, id) order by a counting sort (ids are
 * sorted within a level only when the rows are not already in id order).  Arguments as
 * fh_scan_knn.  Returns -1 when out of memory. */
int fh_scan_knn_select(const u64 *codes, i64 n, int W, const i64 *ids, const u8 *allowed,
                       const u64 *queries, i64 nq, int k, i32 fill_d, i32 *out_d, i64 *out_i) {
    const int nbins = 64 * W + 1;
    i32 *dist = malloc(sizeof(i32) * (size_t)(n > 0 ? n : 1));
    i64 *level = malloc(sizeof(i64) * (size_t)(n > 0 ? n : 1));
    i64 *count = malloc(sizeof(i64) * (size_t)(nbins + 1));
    if (!dist || !level || !count) { free(dist); free(level); free(count); return -1; }
    for (i64 q = 0; q < nq; ++q) {
        const u64 *qv = queries + q * W;
        i32 *od = out_d + q * k;
        i64 *oi = out_i + q * k;
        for (int b = 0; b <= nbins; ++b) count[b] = 0;
        for (i64 r = 0; r < n; ++r) {
            i32 d = (!allowed || allowed[r]) ? dist_w(qv, codes + r * W, W) : -1;
            dist[r] = d;
            if (d >= 0) count[d]++;
        }
        i64 below = 0; /* rows closer than level t */
        int t = 0;
        while (t < nbins && below + count[t] < k) below += count[t++];
        if (t == nbins) t = nbins - 1; /* fewer than k rows: all of them */
        /* counting sort of the ids at levels <= t, stable in row order: count[lv] becomes
         * the level's start, then its end as the ids are placed */
        i64 start = 0;
        for (int lv = 0; lv <= t; ++lv) { i64 c = count[lv]; count[lv] = start; start += c; }
        for (i64 r = 0; r < n; ++r)
            if (dist[r] >= 0 && dist[r] <= t) level[count[dist[r]]++] = ids[r];
        int o = 0;
        i64 lo = 0;
        for (int lv = 0; lv <= t && o < k; ++lv) {
            i64 hi = count[lv], sorted = 1;
            for (i64 j = lo + 1; j < hi && sorted; ++j) sorted = level[j - 1] < level[j];
            if (!sorted) qsort(level + lo, (size_t)(hi - lo), sizeof(i64), cmp_i64);
            for (i64 j = lo; j < hi && o < k; ++j, ++o) { od[o] = lv; oi[o] = level[j]; }
            lo = hi;
        }
        for (; o < k; ++o) { od[o] = fill_d; oi[o] = -1; }
    }
    free(dist); free(level); free(count);
    return 0;
}

/* Every row within `radius`: appends (query, distance, row) triples.  Returns how many
 * queries are complete (< nq when the output would overflow: call again from there with
 * more room); *out_cnt receives the number of triples written. */
i64 fh_scan_radius(const u64 *codes, i64 n, int W, const u8 *allowed, const u64 *queries,
                   i64 nq, int radius, i32 *out_q, i32 *out_d, i64 *out_row, i64 cap,
                   i64 *out_cnt) {
    i64 cnt = 0;
    const i64 RB = 8192 / W > 64 ? 8192 / W : 64;
#define EMIT(qq, dd, rr)                                                    \
    do {                                                                    \
        if (!allowed || allowed[rr]) {                                      \
            if (cnt >= cap) { *out_cnt = start; return q0; }                \
            out_q[cnt] = (i32)(qq); out_d[cnt] = (dd); out_row[cnt] = (rr); cnt++; \
        }                                                                   \
    } while (0)
    for (i64 q0 = 0; q0 < nq; q0 += QBLOCK) {
        i64 q1 = q0 + QBLOCK < nq ? q0 + QBLOCK : nq;
        i64 start = cnt;
        for (i64 r0 = 0; r0 < n; r0 += RB) {
            i64 r1 = r0 + RB < n ? r0 + RB : n;
            i64 q = q0;
            if (W == 1) {
                for (; q + 4 <= q1; q += 4) {
                    u64 a0 = queries[q], a1 = queries[q + 1], a2 = queries[q + 2], a3 = queries[q + 3];
                    for (i64 r = r0; r < r1; ++r) {
                        u64 c = codes[r];
                        int d0 = POPC(a0 ^ c), d1 = POPC(a1 ^ c), d2 = POPC(a2 ^ c), d3 = POPC(a3 ^ c);
                        if ((d0 <= radius) | (d1 <= radius) | (d2 <= radius) | (d3 <= radius)) {
                            if (d0 <= radius) EMIT(q, d0, r);
                            if (d1 <= radius) EMIT(q + 1, d1, r);
                            if (d2 <= radius) EMIT(q + 2, d2, r);
                            if (d3 <= radius) EMIT(q + 3, d3, r);
                        }
                    }
                }
            }
            for (; q < q1; ++q) {
                const u64 *qv = queries + q * W;
                for (i64 r = r0; r < r1; ++r) {
                    int d = dist_w(qv, codes + r * W, W);
                    if (d <= radius) EMIT(q, d, r);
                }
            }
        }
    }
#undef EMIT
    *out_cnt = cnt;
    return nq;
}

/* ---- multi-index hashing (Norouzi, Punjani & Fleet 2012) over distinct codes ------------ */

/* A trained model maps thousands of items onto one code, so the tables hold each distinct
 * code once and every code keeps its rows (ascending, i.e. by id) in a CSR list: a bucket
 * probe then costs one distance per code, not per item, and a k-NN query stops reading a
 * code's rows at the first one the heap refuses.  Each table stores its codes inline, in
 * bucket order, so checking a bucket's candidates is a sequential read, not one cache miss
 * per candidate (skewed codes make buckets of thousands). */
typedef struct {
    const u64 *codes;     /* (n_total, W) */
    const i64 *ids;       /* (n_total,) */
    const u8 *allowed;    /* (n_total,) or NULL */
    i64 n_indexed;        /* rows [0, n_indexed) are in the tables ... */
    i64 n_total;          /* ... rows [n_indexed, n_total) were added since and are scanned */
    i32 W, m;
    const i32 *start;     /* (m,) first bit of each substring in the flattened words */
    const i32 *len;       /* (m,) substring lengths, <= 32 */
    const u32 *offsets;   /* CSR offsets of all tables, concatenated */
    const i64 *off_base;  /* (m,) where table j's offsets start */
    const u32 *keys;      /* sorted distinct keys of the non-direct tables, concatenated */
    const i64 *key_base;  /* (m,) */
    const i64 *nkeys;     /* (m,) -1: direct table (offsets has 2^len + 1 entries) */
    const i32 *entries;   /* (m, n_codes) code numbers grouped by substring key */
    i64 n_codes;          /* distinct codes among the indexed rows (entries per table) */
    const u64 *tcodes;    /* (m, n_codes, W) the code of each entry, inline */
    const i64 *gstart;    /* (n_codes + 1,) rows of code g are grows[gstart[g] .. gstart[g+1]) */
    const i32 *grows;     /* (n_indexed,) rows sorted by (code, row); with gstart NULL: code g is row g */
    double budget;        /* per-query work limit before falling back to a scan */
    double probe_cost;    /* cost of one bucket lookup, in scanned-row units */
    double cand_cost;     /* cost of checking one candidate code (random access), same units */
} mih_t;

INLINE u32 extract_key(const u64 *v, int start, int len) {
    int w = start >> 6, off = start & 63;
    u64 x = v[w] >> off;
    if (off + len > 64) x |= v[w + 1] << (64 - off);
    return (u32)(x & ((1ULL << len) - 1));
}

INLINE void bucket(const mih_t *t, int j, u32 key, i64 *lo, i64 *hi) {
    const u32 *off = t->offsets + t->off_base[j];
    i64 nk = t->nkeys[j];
    if (nk < 0) { *lo = off[key]; *hi = off[key + 1]; return; }
    const u32 *ks = t->keys + t->key_base[j];
    i64 a = 0, b = nk;
    while (a < b) { i64 mid = (a + b) >> 1; if (ks[mid] < key) a = mid + 1; else b = mid; }
    if (a < nk && ks[a] == key) { *lo = off[a]; *hi = off[a + 1]; } else { *lo = 0; *hi = 0; }
}

INLINE i64 code_size(const mih_t *t, i64 g) { return t->gstart ? t->gstart[g + 1] - t->gstart[g] : 1; }

/* A code is met once per table, in table i at round s = its substring distance there.  It is
 * handled only at its first meeting, i.e. when (s, i) is the smallest (substring distance,
 * table) pair over all tables; no visited set is needed. */
INLINE int first_meeting(const mih_t *t, const u32 *qk, const u64 *c, int i, int s) {
    for (int j = 0; j < t->m; ++j) {
        if (j == i) continue;
        int sd = POPC((u64)(qk[j] ^ extract_key(c, t->start[j], t->len[j])));
        if (sd < s || (sd == s && j < i)) return 0;
    }
    return 1;
}

/* Offer code g's rows, all at distance d, to the k-NN heap (of rows: indexed rows are sorted
 * by id, so row order is id order).  Rows ascend, so once one loses to the root every later
 * one does too: a code shared by thousands of items costs k row reads, not thousands.
 * Returns the rows read (work units). */
INLINE i64 knn_code(const mih_t *t, heap_t *h, i64 g, i32 d) {
    const u8 *allowed = t->allowed;
    if (!t->gstart) {
        if ((!allowed || allowed[g]) && (h->size < h->k || d < h->td || g < h->ti)) heap_offer(h, d, g);
        return 1;
    }
    i64 p0 = t->gstart[g], end = t->gstart[g + 1], p = p0;
    for (; p < end; ++p) {
        i64 r = t->grows[p];
        if (allowed && !allowed[r]) continue;
        if (!(h->size < h->k || d < h->td || r < h->ti)) break;
        heap_offer(h, d, r);
    }
    return p - p0;
}

/* Growable list of (code, distance) hits of one radius query. */
typedef struct { i64 *g; i32 *d; i64 n, cap; } hits_t;

static int hits_push(hits_t *hl, i64 g, i32 d) {
    if (hl->n == hl->cap) {
        i64 cap = hl->cap ? 2 * hl->cap : 256;
        i64 *ng = realloc(hl->g, sizeof(i64) * cap);
        if (ng) hl->g = ng;
        i32 *nd = realloc(hl->d, sizeof(i32) * cap);
        if (nd) hl->d = nd;
        if (!ng || !nd) return 0;
        hl->cap = cap;
    }
    hl->g[hl->n] = g; hl->d[hl->n] = d; hl->n++;
    return 1;
}

static double binom(int n, int k) {
    if (k < 0 || k > n) return 0.0;
    double b = 1.0;
    for (int j = 1; j <= k; ++j) b = b * (double)(n - k + j) / (double)j;
    return b;
}

/* Estimated cost of the rounds from (s, i) on that must run before every code within
 * `target` of the query has been met (bucket sizes as for uniformly spread codes). */
static double cost_to_reach(const mih_t *t, int s, int i, int target) {
    double c = 0.0;
    while (t->m * s + i - 1 < target && s <= 32 && c < 1e300) {
        int L = t->len[i];
        if (s <= L) c += binom(L, s) * (t->probe_cost + ldexp((double)t->n_codes, -L) * t->cand_cost);
        if (++i == t->m) { i = 0; ++s; }
    }
    return c;
}

/* One query over the indexed rows.  k-NN into h when h != NULL, else radius search
 * collecting (code, distance) hits.  Returns 1 when done, 0 when the work budget ran out
 * (the caller scans this query instead), -1 when out of memory. */
static int mih_query(const mih_t *t, const u64 *q, heap_t *h, int radius, hits_t *hl, i64 *stats) {
    const int m = t->m, W = t->W;
    u32 qk[MAXM];
    int maxlen = 0;
    for (int j = 0; j < m; ++j) {
        qk[j] = extract_key(q, t->start[j], t->len[j]);
        if (t->len[j] > maxlen) maxlen = t->len[j];
    }
    double cost = (double)(t->n_total - t->n_indexed);
    i64 ncand = 0, nprobe = 0;
    int rc = 1;
    i64 met[MAXM]; /* codes met so far in each table: a table fully met means all were seen */
    for (int j = 0; j < m; ++j) met[j] = 0;
    if (t->n_codes == 0) goto done;
    for (int s = 0; s <= maxlen; ++s) {
        for (int i = 0; i < m; ++i) {
            /* Codes not met yet differ in >= s+1 bits on tables < i and >= s bits on the
             * others, so every code within m*s + i - 1 of q has been met. */
            int complete = m * s + i - 1;
            if (h) {
                if (h->size == h->k && h->td <= complete) goto done;
            } else if (complete >= radius) {
                goto done;
            }
            /* Give up early when finishing is predicted to cost more than the budget:
             * radius search knows its last round up front; k-NN bounds it by the current
             * k-th distance once k candidates are in hand, a loose bound during the
             * first (cheap) rounds, so only trusted from substring radius 2 on. */
            if ((!h && s == 0 && i == 0) || (h && s >= 2 && h->size == h->k)) {
                int target = h ? h->td : radius;
                if (cost + cost_to_reach(t, s, i, target) > t->budget) { rc = 0; goto done; }
            }
            const int L = t->len[i];
            if (s > L) continue;
            double occ = ldexp((double)t->n_codes, -L), probes = binom(L, s);
            /* more buckets than codes: a scan is cheaper whatever the budget says */
            if (probes > (double)t->n_codes + 64.0 ||
                cost + probes * (t->probe_cost + occ * t->cand_cost) > t->budget) {
                rc = 0;
                goto done;
            }
            const i32 *tent = t->entries + (i64)i * t->n_codes;
            const u64 *tcod = t->tcodes + (i64)i * t->n_codes * W;
            const u64 limit = 1ULL << L;
            u64 mask = s == 0 ? 0 : (1ULL << s) - 1;
            int more = 1;
            while (more) {
                /* Batches of buckets, with prefetches issued a stage ahead, so the cache
                 * misses on offsets and on the first codes of each bucket overlap. */
                u32 keys[PROBE_BATCH];
                i64 los[PROBE_BATCH], his[PROBE_BATCH];
                int nb = 0;
                while (nb < PROBE_BATCH && more) {
                    keys[nb++] = qk[i] ^ (u32)mask;
                    if (s == 0) { more = 0; break; }
                    u64 low = mask & (~mask + 1), ripple = mask + low; /* Gosper's hack */
                    mask = (((ripple ^ mask) >> 2) / low) | ripple;
                    if (mask >= limit) more = 0;
                }
                if (t->nkeys[i] < 0)
                    for (int b = 0; b < nb; ++b) __builtin_prefetch(t->offsets + t->off_base[i] + keys[b]);
                i64 batch = 0;
                for (int b = 0; b < nb; ++b) {
                    bucket(t, i, keys[b], &los[b], &his[b]);
                    __builtin_prefetch(tcod + los[b] * W);
                    batch += his[b] - los[b];
                }
                nprobe += nb;
                ncand += batch;
                met[i] += batch;
                cost += nb * t->probe_cost + (double)batch * t->cand_cost;
                for (int b = 0; b < nb; ++b) {
                    i64 lo = los[b], hi = his[b];
                    for (i64 p = lo; p < hi; ++p) {
                        const u64 *c = tcod + p * W;
                        i32 d = dist_w(q, c, W);
                        if (d > (h ? h->td : radius)) continue;
                        if (!first_meeting(t, qk, c, i, s)) continue;
                        i64 g = tent[p];
                        if (h) cost += (double)knn_code(t, h, g, d);
                        else if (!hits_push(hl, g, d)) { rc = -1; goto done; }
                    }
                }
                if (met[i] == t->n_codes) goto done; /* every code has been met */
                if (cost > t->budget) { rc = 0; goto done; }
            }
        }
    }
done:
    if (stats) { stats[0] += ncand; stats[1] += nprobe; stats[2] += (rc == 0); }
    return rc;
}

/* Exact k-NN for queries (nq, W) -> out_d, out_i (nq, k).  fallback[q] = 1 marks queries
 * that ran out of budget; their outputs are garbage and the caller scans them.
 * Requires rows [0, n_indexed) to be sorted by id (the store keeps them so). */
int fh_mih_knn(const mih_t *t, const u64 *queries, i64 nq, int k, i32 fill_d, i32 *out_d,
               i64 *out_i, u8 *fallback, i64 *stats) {
    if (t->m > MAXM) return -2;
    if (k <= 0) return 0;
    const int W = t->W;
    const i64 *ids = t->ids;
    const u8 *allowed = t->allowed;
    const int has_delta = t->n_total > t->n_indexed;
    i32 *dd = NULL, *md = NULL;
    i64 *di = NULL, *mi = NULL;
    if (has_delta) {
        dd = malloc(sizeof(i32) * k); di = malloc(sizeof(i64) * k);
        md = malloc(sizeof(i32) * k); mi = malloc(sizeof(i64) * k);
        if (!dd || !di || !md || !mi) { free(dd); free(di); free(md); free(mi); return -1; }
    }
    for (i64 q = 0; q < nq; ++q) {
        const u64 *qv = queries + q * W;
        i32 *od = out_d + q * k;
        i64 *oi = out_i + q * k;
        heap_t h;
        heap_init(&h, has_delta ? md : od, has_delta ? mi : oi, k);
        int rc = mih_query(t, qv, &h, 0, NULL, stats);
        fallback[q] = rc == 0;
        if (rc != 1) continue;
        heap_finish(&h, fill_d);
        for (int j = 0; j < h.size; ++j) h.i[j] = ids[h.i[j]]; /* rows -> ids */
        if (!has_delta) continue;
        /* rows added since the build: scan them, then merge the two sorted lists */
        heap_t g;
        heap_init(&g, dd, di, k);
        for (i64 r = t->n_indexed; r < t->n_total; ++r) {
            i32 d = dist_w(qv, t->codes + r * W, W);
            if (d <= g.td) ADMIT(&g, d, r);
        }
        heap_finish(&g, fill_d);
        int a = 0, b = 0;
        for (int j = 0; j < k; ++j) {
            int take_a = b >= g.size || (a < h.size && !worse(md[a], mi[a], dd[b], di[b]));
            if (a >= h.size && b >= g.size) { od[j] = fill_d; oi[j] = -1; }
            else if (take_a) { od[j] = md[a]; oi[j] = mi[a]; a++; }
            else { od[j] = dd[b]; oi[j] = di[b]; b++; }
        }
    }
    free(dd); free(di); free(md); free(mi);
    return 0;
}

typedef struct { i32 d; i64 id; } did_t;

static int cmp_i32(const void *a, const void *b) {
    i32 x = *(const i32 *)a, y = *(const i32 *)b;
    return (x > y) - (x < y);
}

static int cmp_did(const void *a, const void *b) {
    const did_t *x = a, *y = b;
    if (x->d != y->d) return (x->d > y->d) - (x->d < y->d);
    return (x->id > y->id) - (x->id < y->id);
}

/* Scratch of one fh_mih_radius call (one thread), grown on demand. */
typedef struct {
    hits_t hits;
    i64 *order; i64 order_cap;      /* hit codes sorted by distance */
    i32 *lrows; i64 lrows_cap;      /* the rows of one distance level */
    u64 *bits;                      /* (n_indexed / 64 + 1) bitmap, kept all-zero between uses */
    did_t *tail;                    /* hits among rows added since the build */
} rscratch_t;

static int grow(void **p, i64 *cap, i64 need, size_t elem) {
    if (need <= *cap) return 1;
    i64 c = need > 2 * *cap ? need : 2 * *cap;
    void *np_ = realloc(*p, elem * (size_t)c);
    if (!np_) return 0;
    *p = np_; *cap = c;
    return 1;
}

/* Sort one level's rows ascending: a bitmap pass when they are dense in their span (the
 * usual case for the big shared codes: no comparisons at all), qsort otherwise. */
static int sort_rows(rscratch_t *sc, i64 n_bits_needed, i32 *rows, i64 n) {
    if (n < 2) return 1;
    i32 lo = rows[0], hi = rows[0];
    for (i64 j = 1; j < n; ++j) { if (rows[j] < lo) lo = rows[j]; if (rows[j] > hi) hi = rows[j]; }
    i64 w0 = lo >> 6, w1 = hi >> 6;
    if (w1 - w0 + 1 > 4 * n) { qsort(rows, (size_t)n, sizeof(i32), cmp_i32); return 1; }
    if (!sc->bits) {
        sc->bits = calloc((size_t)(n_bits_needed / 64 + 1), sizeof(u64));
        if (!sc->bits) return 0;
    }
    u64 *bits = sc->bits;
    for (i64 j = 0; j < n; ++j) bits[rows[j] >> 6] |= 1ULL << (rows[j] & 63);
    i64 o = 0;
    for (i64 w = w0; w <= w1; ++w) {
        u64 x = bits[w];
        if (!x) continue;
        bits[w] = 0;
        while (x) { rows[o++] = (i32)((w << 6) + __builtin_ctzll(x)); x &= x - 1; }
    }
    return 1;
}

/* Radius search with sorted output: for each query, its hits in (distance, id) order are
 * appended to out_d / out_id and their number written to out_n[q].  Returns how many
 * queries were completed: fewer than nq when the next query's hits (at most *need) do not
 * fit in cap (call again from there with more room), -1 when out of memory.  fallback[q] = 1
 * marks queries that ran out of budget (no hits written; the caller scans them). */
i64 fh_mih_radius(const mih_t *t, const u64 *queries, i64 nq, int radius, i64 *out_n, i32 *out_d,
                  i64 *out_id, i64 cap, i64 *need, u8 *fallback, i64 *stats) {
    if (t->m > MAXM) return -2;
    const int W = t->W;
    const i64 *ids = t->ids;
    const u8 *allowed = t->allowed;
    const i64 n_tail = t->n_total - t->n_indexed;
    rscratch_t sc;
    memset(&sc, 0, sizeof sc);
    i64 *level = malloc(sizeof(i64) * (size_t)(radius + 2));
    if (n_tail) sc.tail = malloc(sizeof(did_t) * (size_t)n_tail);
    i64 used = 0, q = 0, ret = -1;
    *need = 0;
    if (!level || (n_tail && !sc.tail)) goto out;
    for (; q < nq; ++q) {
        const u64 *qv = queries + q * W;
        sc.hits.n = 0;
        i64 qstats[3] = {0, 0, 0}; /* added to stats once this query's hits are written */
        int rc = mih_query(t, qv, NULL, radius, &sc.hits, qstats);
        if (rc < 0) goto out;
        fallback[q] = rc == 0;
        out_n[q] = 0;
        if (rc == 0) { for (int j = 0; j < 3; ++j) stats[j] += qstats[j]; continue; }
        i64 nt = 0;
        for (i64 r = t->n_indexed; r < t->n_total; ++r) {
            i32 d = dist_w(qv, t->codes + r * W, W);
            if (d <= radius && (!allowed || allowed[r])) { sc.tail[nt].d = d; sc.tail[nt].id = ids[r]; nt++; }
        }
        if (nt > 1) qsort(sc.tail, (size_t)nt, sizeof(did_t), cmp_did);
        const i64 nh = sc.hits.n;
        i64 bound = nt;
        for (i64 j = 0; j < nh; ++j) bound += code_size(t, sc.hits.g[j]);
        if (used + bound > cap) { *need = bound; break; }
        /* counting sort of the hit codes by distance */
        if (!grow((void **)&sc.order, &sc.order_cap, nh, sizeof(i64))) goto out;
        for (int lv = 0; lv <= radius + 1; ++lv) level[lv] = 0;
        for (i64 j = 0; j < nh; ++j) level[sc.hits.d[j] + 1]++;
        for (int lv = 0; lv <= radius; ++lv) level[lv + 1] += level[lv];
        for (i64 j = 0; j < nh; ++j) sc.order[level[sc.hits.d[j]]++] = sc.hits.g[j];
        /* level[lv] is now the end of level lv, so level lv spans [lv ? level[lv-1] : 0, level[lv]) */
        i64 pos = used, ti = 0, h0 = 0;
        for (int lv = 0; lv <= radius; ++lv) {
            i64 h1 = level[lv], nr = 0;
            i64 rows_here = 0;
            for (i64 j = h0; j < h1; ++j) rows_here += code_size(t, sc.order[j]);
            if (!grow((void **)&sc.lrows, &sc.lrows_cap, rows_here, sizeof(i32))) goto out;
            for (i64 j = h0; j < h1; ++j) {
                i64 g = sc.order[j];
                if (!t->gstart) { if (!allowed || allowed[g]) sc.lrows[nr++] = (i32)g; continue; }
                for (i64 p = t->gstart[g]; p < t->gstart[g + 1]; ++p) {
                    i32 r = t->grows[p];
                    if (!allowed || allowed[r]) sc.lrows[nr++] = r;
                }
            }
            if (h1 - h0 > 1 && !sort_rows(&sc, t->n_indexed, sc.lrows, nr)) goto out;
            h0 = h1;
            /* merge the level's indexed rows (row order = id order) with its tail hits */
            i64 a = 0;
            while (a < nr || (ti < nt && sc.tail[ti].d == lv)) {
                i64 id;
                if (a < nr && !(ti < nt && sc.tail[ti].d == lv && sc.tail[ti].id < ids[sc.lrows[a]])) id = ids[sc.lrows[a++]];
                else id = sc.tail[ti++].id;
                out_d[pos] = lv; out_id[pos] = id; pos++;
            }
        }
        out_n[q] = pos - used;
        used = pos;
        for (int j = 0; j < 3; ++j) stats[j] += qstats[j];
    }
    ret = q;
out:
    free(level); free(sc.hits.g); free(sc.hits.d); free(sc.order); free(sc.lrows); free(sc.bits); free(sc.tail);
    return ret;
}

/* ---- second stage: cosine re-rank of a shortlist by int8 descriptors ------------------- */

/* q . r for a double query and an int8 row in 16 accumulator lanes (lane t sums the
 * elements j = t mod 16), combined in a fixed order: a row's score depends only on its values
 * (identical rows tie exactly, whatever their address), and the AVX2 and portable paths give
 * the same bits.  Every product is exact in double (24-bit x 8-bit mantissas).  Explicit
 * vectors because the compiler may not reorder a floating-point sum by itself. */
#if defined(__AVX2__)
#include <immintrin.h>
INLINE double dot_q8(const double *q, const i8 *r, int d) {
    __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
    int j = 0;
    for (; j + 16 <= d; j += 16) {
        __m128i b = _mm_loadu_si128((const __m128i *)(r + j));
        __m256i lo = _mm256_cvtepi8_epi32(b), hi = _mm256_cvtepi8_epi32(_mm_srli_si128(b, 8));
        a0 = _mm256_add_pd(a0, _mm256_mul_pd(_mm256_loadu_pd(q + j), _mm256_cvtepi32_pd(_mm256_castsi256_si128(lo))));
        a1 = _mm256_add_pd(a1, _mm256_mul_pd(_mm256_loadu_pd(q + j + 4), _mm256_cvtepi32_pd(_mm256_extracti128_si256(lo, 1))));
        a2 = _mm256_add_pd(a2, _mm256_mul_pd(_mm256_loadu_pd(q + j + 8), _mm256_cvtepi32_pd(_mm256_castsi256_si128(hi))));
        a3 = _mm256_add_pd(a3, _mm256_mul_pd(_mm256_loadu_pd(q + j + 12), _mm256_cvtepi32_pd(_mm256_extracti128_si256(hi, 1))));
    }
    double v[4];
    _mm256_storeu_pd(v, _mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3)));
    double tail = 0.0;
    for (; j < d; ++j) tail += q[j] * (double)r[j];
    return ((v[0] + v[1]) + (v[2] + v[3])) + tail;
}
#else
INLINE double dot_q8(const double *q, const i8 *r, int d) {
    double a[16] = {0};
    int j = 0;
    for (; j + 16 <= d; j += 16)
        for (int t = 0; t < 16; ++t) a[t] += q[j + t] * (double)r[j + t];
    double v[4];
    for (int t = 0; t < 4; ++t) v[t] = (a[t] + a[t + 4]) + (a[t + 8] + a[t + 12]);
    double tail = 0.0;
    for (; j < d; ++j) tail += q[j] * (double)r[j];
    return ((v[0] + v[1]) + (v[2] + v[3])) + tail;
}
#endif

/* Top-k min-heap on (score, position): the root is the worst kept, i.e. the lowest score,
 * and among equal scores the latest shortlist position. */
INLINE int rworse(double sa, i64 pa, double sb, i64 pb) { return sa < sb || (sa == sb && pa > pb); }

static void rsift_down(double *hs, i64 *hp, int n, int pos) {
    double s = hs[pos];
    i64 p = hp[pos];
    for (;;) {
        int c = 2 * pos + 1;
        if (c >= n) break;
        if (c + 1 < n && rworse(hs[c + 1], hp[c + 1], hs[c], hp[c])) c++;
        if (!rworse(hs[c], hp[c], s, p)) break;
        hs[pos] = hs[c]; hp[pos] = hp[c]; pos = c;
    }
    hs[pos] = s; hp[pos] = p;
}

static void rsift_up(double *hs, i64 *hp, int pos) {
    double s = hs[pos];
    i64 p = hp[pos];
    while (pos > 0) {
        int par = (pos - 1) / 2;
        if (!rworse(s, p, hs[par], hp[par])) break;
        hs[pos] = hs[par]; hp[pos] = hp[par]; pos = par;
    }
    hs[pos] = s; hp[pos] = p;
}

/* Re-rank shortlists by cosine.  rows (n, d) int8 descriptors with sqnorms (n,) their exact
 * squared norms; queries (nq, d) double; cand (nq, R) the store row of each shortlist entry,
 * -1 for none.  Writes the k best per query, by (cosine desc, shortlist position asc), to
 * out_s (nq, k) float32 and out_p (nq, k) shortlist positions, padded with (0, -1).
 * cos = q.r / (|q| |r| + 1e-300), as descriptors.rerank_reference.  Returns -1 when out of memory. */
int fh_rerank(const i8 *rows, int d, const i64 *sqnorms, const double *queries, i64 nq,
              const i64 *cand, int R, int k, float *out_s, i64 *out_p) {
    if (k <= 0 || nq <= 0) return 0;
    double *hs = malloc(sizeof(double) * (size_t)k);
    i64 *hp = malloc(sizeof(i64) * (size_t)k);
    if (!hs || !hp) { free(hs); free(hp); return -1; }
    for (i64 q = 0; q < nq; ++q) {
        const double *qv = queries + q * d;
        const i64 *c = cand + q * R;
        double qn = 0.0;
        for (int j = 0; j < d; ++j) qn += qv[j] * qv[j];
        qn = sqrt(qn);
        int size = 0;
        for (int j = 0; j < R; ++j) {
            /* rows are scattered over the store: fetch a few candidates ahead */
            if (j + 8 < R && c[j + 8] >= 0) {
                const i8 *ahead = rows + c[j + 8] * d;
                for (int b = 0; b < d; b += 64) __builtin_prefetch(ahead + b);
            }
            i64 r = c[j];
            if (r < 0) continue;
            double s = dot_q8(qv, rows + r * d, d) / (qn * sqrt((double)sqnorms[r]) + 1e-300);
            if (size < k) { hs[size] = s; hp[size] = j; rsift_up(hs, hp, size); size++; }
            else if (s > hs[0]) { hs[0] = s; hp[0] = j; rsift_down(hs, hp, k, 0); }
        }
        for (int n = size; n > 1; --n) { /* heap-sort: worst to the back, i.e. best first */
            double ts = hs[0]; i64 tp = hp[0];
            hs[0] = hs[n - 1]; hp[0] = hp[n - 1]; hs[n - 1] = ts; hp[n - 1] = tp;
            rsift_down(hs, hp, n - 1, 0);
        }
        for (int j = 0; j < k; ++j) {
            out_s[q * k + j] = j < size ? (float)hs[j] : 0.0f;
            out_p[q * k + j] = j < size ? hp[j] : -1;
        }
    }
    free(hs); free(hp);
    return 0;
}

/* Counting sort of one table: keys (n,) < 2^len -> offsets (2^len + 1), rows (n).
 * counts must be zeroed, (2^len + 1) long; it becomes the offsets. */
void fh_mih_build_direct(const u32 *keys, i64 n, int len, u32 *offsets, i32 *rows) {
    i64 nb = (i64)1 << len;
    for (i64 r = 0; r < n; ++r) offsets[keys[r] + 1]++;
    for (i64 b = 0; b < nb; ++b) offsets[b + 1] += offsets[b];
    /* fill using a moving cursor per bucket, then shift the cursors back into offsets */
    for (i64 r = 0; r < n; ++r) rows[offsets[keys[r]]++] = (i32)r;
    for (i64 b = nb; b > 0; --b) offsets[b] = offsets[b - 1];
    offsets[0] = 0;
}
"""
