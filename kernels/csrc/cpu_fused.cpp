// Fused pooled embedding lookup for CPU: one call over every table, threads over the work.
//
// Layout (FBGEMM TBE's): `indices` flat, `offsets` of length F*B+1 in feature-major order
// (all bags of feature 0, then feature 1, ...). Feature f reads table feature_table[f] and
// writes columns [out_cols[f], out_cols[f] + dim) of a row-major [B, out_stride] output.
// Several features may read one table (multiplexing); the backward merges their gradients.
//
// Plain C ABI over raw pointers (called through ctypes), so building needs no torch headers.
// The tiny Python module init at the bottom only makes the .so importable by name. Threads:
// run_items (parallel.h), on torch's own OpenMP threads.
#include <Python.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "parallel.h"

namespace {

struct Tables {
    const int64_t* ptrs;   // weight base address per table (float*)
    const int64_t* rows;
    const int64_t* dims;
    float* weight(int64_t t) const { return reinterpret_cast<float*>(ptrs[t]); }
};

constexpr int64_t kPrefetch = 32;   // positions ahead whose row is asked for (measured: 16 → 32 paid)
constexpr int64_t kGradAhead = 16;  // bags ahead whose gradient slice is asked for (8 → 16 paid)

inline void prefetch_row(const float* row, int64_t dim, int write = 0) {
    for (int64_t k = 0; k < dim; k += 16) {  // every 64-byte line of the row
        if (write) __builtin_prefetch(row + k, 1);
        else __builtin_prefetch(row + k, 0);
    }
}

// acc[0:D] (+)= s * row[0:D]; D is a compile-time constant for the common widths so the
// loop fully vectorises, `dim` is used otherwise.
template <int D>
inline void scale(float* __restrict acc, const float* __restrict row, float s, int64_t dim) {
    const int64_t n = D > 0 ? D : dim;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) acc[k] = s * row[k];
}

template <int D>
inline void axpy(float* __restrict acc, const float* __restrict row, float s, int64_t dim) {
    const int64_t n = D > 0 ? D : dim;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) acc[k] += s * row[k];
}

template <int D>
void pool_bags(const int64_t* indices, const int64_t* offsets, const float* psw, const float* weight,
               int64_t rows, int64_t dim, int64_t b0, int64_t b1, float* out, int64_t out_stride,
               int64_t* bad) {
    const int64_t p_end = offsets[b1];
    for (int64_t b = b0; b < b1; ++b) {
        float* acc = out + b * out_stride;
        bool first = true;  // the first row is written, not added: no zeroing pass over the output
        for (int64_t p = offsets[b]; p < offsets[b + 1]; ++p) {
            // Rows are random reads: ask for the one a few positions ahead now.
            if (p + kPrefetch < p_end) {
                const int64_t ahead = indices[p + kPrefetch];
                if (ahead >= 0 && ahead < rows) prefetch_row(weight + ahead * dim, dim);
            }
            const int64_t r = indices[p];
            if (r < 0 || r >= rows) {  // report the first bad position; skip it
                __atomic_store_n(bad, p, __ATOMIC_RELAXED);
                continue;
            }
            if (first) scale<D>(acc, weight + r * dim, psw ? psw[p] : 1.0f, dim);
            else axpy<D>(acc, weight + r * dim, psw ? psw[p] : 1.0f, dim);
            first = false;
        }
        if (first) std::memset(acc, 0, sizeof(float) * dim);  // empty bag, or only bad ids
    }
}

using PoolFn = void (*)(const int64_t*, const int64_t*, const float*, const float*, int64_t, int64_t,
                        int64_t, int64_t, float*, int64_t, int64_t*);

PoolFn pool_for(int64_t dim) {
    switch (dim) {
        case 4: return pool_bags<4>;
        case 8: return pool_bags<8>;
        case 16: return pool_bags<16>;
        case 32: return pool_bags<32>;
        case 64: return pool_bags<64>;
        case 128: return pool_bags<128>;
        default: return pool_bags<0>;
    }
}

// Open-addressing map row -> slot for merging duplicate rows; sized ≥ 2x the positions.
struct RowSlots {
    std::vector<int64_t> keys;
    std::vector<int32_t> slots;
    std::vector<int64_t> rows;  // slot -> row, in first-seen order
    uint64_t mask = 0;
    int shift = 0;

    explicit RowSlots(int64_t capacity_hint) {
        uint64_t cap = 16;
        int bits = 4;
        while (cap < static_cast<uint64_t>(2 * capacity_hint)) { cap <<= 1; ++bits; }
        keys.assign(cap, -1);
        slots.resize(cap);
        mask = cap - 1;
        shift = 64 - bits;
        rows.reserve(capacity_hint);
    }

    // Slot of `row`; a new slot is appended (and `fresh` set) the first time a row is seen.
    int32_t find(int64_t row, bool* fresh) {
        uint64_t h = (static_cast<uint64_t>(row) * 0x9E3779B97F4A7C15ull) >> shift;
        while (true) {
            const int64_t k = keys[h];
            if (k == row) { *fresh = false; return slots[h]; }
            if (k < 0) {
                keys[h] = row;
                slots[h] = static_cast<int32_t>(rows.size());
                rows.push_back(row);
                *fresh = true;
                return slots[h];
            }
            h = (h + 1) & mask;
        }
    }
};

// Which of `parts` partitions a row belongs to: mixed bits, so hot low ids spread out.
inline int64_t part_of(int64_t row, int64_t parts) {
    return parts == 1 ? 0 : static_cast<int64_t>(((static_cast<uint64_t>(row) * 0xBF58476D1CE4E5B9ull) >> 40) % parts);
}

}  // namespace

extern "C" {

// out[b, out_cols[f] : +dim_f] = Σ_{p in bag (f, b)} psw[p] · W_{table(f)}[indices[p]].
// Returns -1 when every index is in range, else one offending position (those rows read as 0).
int64_t embtables_pooled_forward(int64_t n_features, int64_t batch, const int64_t* indices,
                                 const int64_t* offsets, const float* psw, const int64_t* feature_table,
                                 const int64_t* table_ptrs, const int64_t* table_rows,
                                 const int64_t* table_dims, const int64_t* out_cols, int64_t out_stride,
                                 float* out, int n_threads) {
    const Tables tables{table_ptrs, table_rows, table_dims};
    // Work items: (feature, chunk of bags), about 8 per thread to balance them; no smaller than
    // 64 bags, as each item starts its row prefetching afresh.
    const int64_t per_feature = std::max<int64_t>(1, (8 * n_threads + n_features - 1) / n_features);
    const int64_t chunk = std::max<int64_t>({1, std::min<int64_t>(batch, 64), (batch + per_feature - 1) / per_feature});
    const int64_t chunks = (batch + chunk - 1) / chunk;
    const int64_t items = n_features * chunks;
    int64_t bad = -1;
    embtables::run_items(items, n_threads, [&](int64_t it) {
        const int64_t f = it / chunks, c = it % chunks;
        const int64_t t = feature_table[f];
        const int64_t dim = tables.dims[t];
        const int64_t b0 = c * chunk, b1 = (b0 + chunk < batch) ? b0 + chunk : batch;
        pool_for(dim)(indices, offsets + f * batch, psw, tables.weight(t), tables.rows[t], dim, b0, b1,
                      out + out_cols[f], out_stride, &bad);
    });
    return bad;
}

// Backward of the forward above fused with row-wise Adagrad, in place:
//   g_r = Σ over every occurrence of row r (all features reading its table) of psw · grad_out[b, cols]
//   state[r] += mean(g_r²);   W[r] -= lr · g_r / (sqrt(state[r]) + eps)
// Duplicates are merged before the update (exact row-wise Adagrad, as FBGEMM's EXACT_ variant).
// Work items are (table, row partition): threads never touch the same row.
void embtables_backward_adagrad(int64_t n_features, int64_t batch, const int64_t* indices,
                                const int64_t* offsets, const float* psw, const int64_t* feature_table,
                                int64_t n_tables, const int64_t* table_ptrs, const int64_t* state_ptrs,
                                const int64_t* table_rows, const int64_t* table_dims, const int64_t* out_cols,
                                int64_t grad_stride, const float* grad, float lr, float eps, int n_threads) {
    const Tables tables{table_ptrs, table_rows, table_dims};
    // Few tables: split each one's rows into partitions so every thread has work.
    int64_t parts = 1;
    while (n_tables * parts < 2 * n_threads && parts < 64) parts *= 2;
    const int64_t items = n_tables * parts;
    embtables::run_items(items, n_threads, [&](int64_t it) {
        const int64_t t = it / parts, part = it % parts;
        const int64_t dim = tables.dims[t];
        // Positions this item merges: a bound on its distinct rows, so the map and the sums are
        // sized once (and the sums need no zeroing: a row's first gradient is written, not added).
        int64_t positions = 0;
        for (int64_t f = 0; f < n_features; ++f) {
            if (feature_table[f] != t) continue;
            const int64_t p0 = offsets[f * batch], p1 = offsets[(f + 1) * batch];
            if (parts == 1) positions += p1 - p0;
            else for (int64_t p = p0; p < p1; ++p) positions += part_of(indices[p], parts) == part;
        }
        if (positions == 0) return;
        RowSlots map(positions);
        std::unique_ptr<float[]> acc(new float[positions * dim]);
        for (int64_t f = 0; f < n_features; ++f) {
            if (feature_table[f] != t) continue;
            const int64_t* off = offsets + f * batch;
            for (int64_t b = 0; b < batch; ++b) {
                const float* g = grad + b * grad_stride + out_cols[f];
                // One feature's columns of the gradient are a strided walk (a row apart, beyond
                // what the hardware prefetcher follows): ask for the slice a few bags ahead.
                if (b + kGradAhead < batch) prefetch_row(g + kGradAhead * grad_stride, dim);
                for (int64_t p = off[b]; p < off[b + 1]; ++p) {
                    const int64_t r = indices[p];
                    if (part_of(r, parts) != part) continue;
                    bool fresh;
                    const int32_t s = map.find(r, &fresh);
                    float* a = acc.get() + static_cast<int64_t>(s) * dim;
                    const float w = psw ? psw[p] : 1.0f;
                    if (fresh) {
#pragma omp simd
                        for (int64_t k = 0; k < dim; ++k) a[k] = w * g[k];
                    } else {
#pragma omp simd
                        for (int64_t k = 0; k < dim; ++k) a[k] += w * g[k];
                    }
                }
            }
        }
        float* weight = tables.weight(t);
        float* state = reinterpret_cast<float*>(state_ptrs[t]);
        const size_t n_rows = map.rows.size();
        for (size_t s = 0; s < n_rows; ++s) {
            if (s + kPrefetch < n_rows) {
                const int64_t ahead = map.rows[s + kPrefetch];
                prefetch_row(weight + ahead * dim, dim, 1);
                __builtin_prefetch(state + ahead, 1);
            }
            const int64_t r = map.rows[s];
            const float* a = acc.get() + s * dim;
            float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
            for (int64_t k = 0; k < dim; ++k) sq += a[k] * a[k];
            const float st = state[r] + sq / static_cast<float>(dim);
            state[r] = st;
            const float step = lr / (std::sqrt(st) + eps);
            float* w = weight + r * dim;
#pragma omp simd
            for (int64_t k = 0; k < dim; ++k) w[k] -= step * a[k];
        }
    });
}

}  // extern "C"

static struct PyModuleDef cpu_fused_module = {PyModuleDef_HEAD_INIT, "_cpu_fused",
                                              "C kernels for embtables.kernels.cpu_fused (loaded via ctypes)",
                                              -1, nullptr};

PyMODINIT_FUNC PyInit__cpu_fused(void) { return PyModule_Create(&cpu_fused_module); }
