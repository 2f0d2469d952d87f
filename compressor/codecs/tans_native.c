/* tANS lane codec, compiled at first use by compressor.codecs.native.
 * Geometry and bit order are those of lanes.py (the reference): a stream of `count`
 * symbols in chunks of lanes*steps; symbol p of a chunk is lane p % lanes, step p / lanes;
 * each lane = final encoder state (table_log bits) then each symbol's bits, MSB first;
 * lanes back to back, each chunk starting on a 32-bit word.
 * Decode table entries: value (16 bits) | nbits << 16 | next-state base << 20. */
#include <stdint.h>
#include <string.h>
#include <stdlib.h>

static inline uint64_t window_at(const uint32_t *w, int64_t nwords, int64_t word) {
    uint64_t a = word < nwords ? w[word] : 0, b = word + 1 < nwords ? w[word + 1] : 0;
    return (a << 32) | b;
}

/* 64 bits starting at bit `pos`, MSB first (bits past the stream read as zero). */
static inline uint64_t window64(const uint32_t *w, int64_t nwords, int64_t pos) {
    int64_t word = pos >> 5;
    uint64_t win;
    if (word + 1 < nwords) { uint64_t x; memcpy(&x, w + word, 8); win = (x << 32) | (x >> 32); }
    else win = window_at(w, nwords, word);
    return win << (pos & 31);
}

static inline uint32_t read_bits(const uint32_t *w, int64_t nwords, int64_t pos, uint32_t nb) {
    int64_t word = pos >> 5;
    uint64_t win;
    if (word + 1 < nwords) { uint64_t x; memcpy(&x, w + word, 8); win = (x << 32) | (x >> 32); }
    else win = window_at(w, nwords, word);
    return (uint32_t)(((win << (pos & 31)) >> 1) >> (63 - nb));
}

/* Decode the steps of one chunk into 16-bit values (raw planes are merged afterwards). Lanes are
 * visited in turn, four steps per visit: the lanes' independent chains overlap, and each visit
 * loads and stores a lane's state and position once for four values. */
static inline void decode_steps(const uint32_t *restrict words, int64_t nwords, const uint32_t *restrict table,
                                int64_t n, int64_t lanes, int64_t base, uint16_t *restrict out,
                                uint32_t *restrict state, int64_t *restrict pos) {
    int64_t full = n / lanes;  /* steps that every lane of the chunk has */
    int64_t t = 0;
    for (; t + 4 <= full; t += 4) {
        uint16_t *o = out + base + t * lanes;
        for (int64_t l = 0; l < lanes; l++) {
            uint32_t st = state[l];
            int64_t p = pos[l];
            uint64_t win = window64(words, nwords, p);  /* >= 33 valid bits, a value takes <= 15 */
            int avail = 64 - (int)(p & 31);
            for (int k = 0; k < 4; k++) {
                if (avail < 16) { win = window64(words, nwords, p); avail = 64 - (int)(p & 31); }
                uint32_t e = table[st];
                uint32_t nb = (e >> 16) & 15;
                st = (e >> 20) + (uint32_t)((win >> 1) >> (63 - nb));
                win <<= nb;
                avail -= (int)nb;
                p += nb;
                o[k * lanes + l] = (uint16_t)e;
            }
            state[l] = st;
            pos[l] = p;
        }
    }
    int64_t nsteps = (n + lanes - 1) / lanes;
    for (; t < nsteps; t++) {
        int64_t lim = n - t * lanes < lanes ? n - t * lanes : lanes;
        uint16_t *o = out + base + t * lanes;
        for (int64_t l = 0; l < lim; l++) {
            uint32_t e = table[state[l]];
            uint32_t nb = (e >> 16) & 15;
            state[l] = (e >> 20) + read_bits(words, nwords, pos[l], nb);
            pos[l] += nb;
            o[l] = (uint16_t)e;
        }
    }
}

/* Add the raw planes to a decoded chunk in a separate, vectorizable pass. */
static void merge_planes(uint16_t *restrict out, int64_t n, int64_t base, int64_t mode,
                         const uint8_t *restrict raw, const uint8_t *restrict signs) {
    if (mode == 1) {
        const uint8_t *r = raw + base;
        for (int64_t i = 0; i < n; i++) out[i] |= (uint16_t)(((r[i] & 0x80) << 8) | (r[i] & 0x7F));
    } else if (mode == 2 && base % 8 == 0) {  /* chunks start on whole bytes of both planes */
        const uint8_t *r = raw + base / 2, *s = signs + base / 8;
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            uint32_t sg = s[i >> 3];
            for (int k = 0; k < 8; k++)
                out[i + k] |= (uint16_t)((((sg >> k) & 1) << 15) | ((r[(i + k) >> 1] >> ((k & 1) * 4)) & 15));
        }
        for (; i < n; i++)
            out[i] |= (uint16_t)((((s[i >> 3] >> (i & 7)) & 1) << 15) | ((r[i >> 1] >> ((i & 1) * 4)) & 15));
    } else if (mode == 2) {
        for (int64_t j = 0; j < n; j++) {
            int64_t i = base + j;
            out[j] |= (uint16_t)((((signs[i >> 3] >> (i & 7)) & 1) << 15) | ((raw[i >> 1] >> ((i & 1) * 4)) & 15));
        }
    }
}

/* mode 0: out = value; 1: raw byte plane (sign<<7 | 7 low bits); 2: sign bit plane + nibble plane.
 * Returns 0, or 1 + the index of the first lane that did not end where recorded. */
int64_t tans_decode(const uint32_t *words, int64_t nwords, const uint16_t *lane_bits, int64_t count,
                    int64_t lanes, int64_t steps, int64_t table_log, const uint32_t *table,
                    int64_t mode, const uint8_t *raw, const uint8_t *signs, uint16_t *out) {
    int64_t chunk = lanes * steps, nchunks = count ? (count + chunk - 1) / chunk : 1;
    int64_t *pos = malloc(sizeof(int64_t) * lanes), *end = malloc(sizeof(int64_t) * lanes);
    uint32_t *state = malloc(sizeof(uint32_t) * lanes);
    int64_t word_base = 0, bad = 0;
    for (int64_t c = 0; c < nchunks && !bad; c++) {
        int64_t base = c * chunk, n = count - base < chunk ? count - base : chunk, bits = 0;
        const uint16_t *lb = lane_bits + c * lanes;
        for (int64_t l = 0; l < lanes; l++) {
            pos[l] = word_base * 32 + bits;
            bits += lb[l];
            end[l] = word_base * 32 + bits;
            state[l] = read_bits(words, nwords, pos[l], (uint32_t)table_log);
            pos[l] += table_log;
        }
        decode_steps(words, nwords, table, n, lanes, base, out, state, pos);
        merge_planes(out + base, n, base, mode, raw, signs);
        for (int64_t l = 0; l < lanes; l++)
            if (state[l] != 0 || pos[l] != end[l]) { bad = 1 + c * lanes + l; break; }
        word_base += (bits + 31) / 32;
    }
    free(pos); free(end); free(state);
    return bad;
}

/* Encode one stream. slots/first/shift/norm: encoder tables (tans.encode_tables).
 * Writes lane_bits (one per lane) and words; returns the number of words written. */
int64_t tans_encode(const uint8_t *sym, int64_t count, int64_t lanes, int64_t steps, int64_t table_log,
                    const int64_t *slots, const int64_t *first, const int64_t *shift, const int64_t *norm,
                    uint16_t *lane_bits, uint32_t *words) {
    int64_t chunk = lanes * steps, nchunks = count ? (count + chunk - 1) / chunk : 1, size = 1 << table_log;
    uint8_t *ks = malloc(steps);
    uint16_t *vs = malloc(sizeof(uint16_t) * steps);
    int64_t nwords = 0;
    for (int64_t c = 0; c < nchunks; c++) {
        int64_t base = c * chunk, n = count - base < chunk ? count - base : chunk;
        uint64_t acc = 0; int accbits = 0;  /* bit writer for this chunk, MSB first */
#define PUT(value, nb) do { acc = (acc << (nb)) | (uint64_t)(value); accbits += (nb); \
            while (accbits >= 32) { accbits -= 32; words[nwords++] = (uint32_t)(acc >> accbits); } } while (0)
        for (int64_t l = 0; l < lanes; l++) {
            int64_t nl = n > l ? (n - l + lanes - 1) / lanes : 0;
            uint64_t x = size; int64_t total = table_log;
            for (int64_t t = nl - 1; t >= 0; t--) {
                int64_t s = sym[base + t * lanes + l], sh = shift[s], ns = norm[s];
                int64_t k = sh - ((int64_t)(x >> sh) < ns);
                ks[t] = (uint8_t)k; vs[t] = (uint16_t)(x & ((1u << k) - 1));
                x = size + slots[first[s] + (int64_t)(x >> k) - ns];
                total += k;
            }
            lane_bits[c * lanes + l] = (uint16_t)total;
            PUT(x - size, table_log);
            for (int64_t t = 0; t < nl; t++) PUT(vs[t], ks[t]);
            acc &= (accbits ? ((1ull << accbits) - 1) : 0);
        }
        if (accbits) { words[nwords++] = (uint32_t)(acc << (32 - accbits)); accbits = 0; acc = 0; }
#undef PUT
    }
    free(ks); free(vs);
    return nwords;
}

/* Histogram of bits 4..14 of 16-bit words (2048 bins), for choosing the split. */
void split16_hist(const uint16_t *u, int64_t n, int64_t *hist) {
    memset(hist, 0, sizeof(int64_t) * 2048);
    for (int64_t i = 0; i < n; i++) hist[(u[i] >> 4) & 0x7FF]++;
}

/* Symbols (lut of the coded high bits) and raw planes of 16-bit words.
 * low == 7: raw[i] = sign << 7 | bits 0..6.  low == 4: raw nibble pairs and a sign bit plane. */
void split16(const uint16_t *u, int64_t n, int64_t low, const uint8_t *lut, uint8_t *sym, uint8_t *raw,
             uint8_t *signs) {
    if (low == 7) {
        for (int64_t i = 0; i < n; i++) {
            uint16_t x = u[i];
            sym[i] = lut[(x >> 7) & 0xFF];
            raw[i] = (uint8_t)(((x >> 8) & 0x80) | (x & 0x7F));
        }
        return;
    }
    for (int64_t i = 0; i < n; i++) sym[i] = lut[(u[i] >> 4) & 0x7FF];
    for (int64_t i = 0; i + 1 < n; i += 2) raw[i >> 1] = (uint8_t)((u[i] & 15) | ((u[i + 1] & 15) << 4));
    if (n & 1) raw[n >> 1] = (uint8_t)(u[n - 1] & 15);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint8_t b = 0;
        for (int k = 0; k < 8; k++) b |= (uint8_t)((u[i + k] >> 15) << k);
        signs[i >> 3] = b;
    }
    if (i < n) {
        uint8_t b = 0;
        for (int k = 0; i + k < n; k++) b |= (uint8_t)((u[i + k] >> 15) << k);
        signs[i >> 3] = b;
    }
}
