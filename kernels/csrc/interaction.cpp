// DLRM's pairwise-dot interaction, backward only. Plain C ABI for ctypes, built into the same
// library as cpu_fused.cpp.
#include <cstdint>
#include <vector>

#include "parallel.h"

namespace {

// Backward of DLRM's pairwise-dot interaction (forward: torch's bmm, already efficient):
//   grad_V[b, i] = Σ_j S[i, j] · V[b, j],  S = the symmetric matrix of the pair gradients
// (pairs i < j in row-major triu order, zero diagonal). Four rows at a time so each loaded V
// row feeds four independent accumulators; D is a compile-time width where it can be.
template <int D>
void dots_backward_sample(int64_t n, int64_t dim, const float* v, const float* sym, float* gv) {
    const int64_t d = D > 0 ? D : dim;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        float a0[D > 0 ? D : 1024], a1[D > 0 ? D : 1024], a2[D > 0 ? D : 1024], a3[D > 0 ? D : 1024];
        for (int64_t k = 0; k < d; ++k) a0[k] = a1[k] = a2[k] = a3[k] = 0.0f;
        for (int64_t j = 0; j < n; ++j) {
            const float* vj = v + j * d;
            const float s0 = sym[i * n + j], s1 = sym[(i + 1) * n + j], s2 = sym[(i + 2) * n + j],
                        s3 = sym[(i + 3) * n + j];
#pragma omp simd
            for (int64_t k = 0; k < d; ++k) {
                a0[k] += s0 * vj[k];
                a1[k] += s1 * vj[k];
                a2[k] += s2 * vj[k];
                a3[k] += s3 * vj[k];
            }
        }
        for (int64_t k = 0; k < d; ++k) {
            gv[i * d + k] = a0[k];
            gv[(i + 1) * d + k] = a1[k];
            gv[(i + 2) * d + k] = a2[k];
            gv[(i + 3) * d + k] = a3[k];
        }
    }
    for (; i < n; ++i) {
        float* gi = gv + i * d;
        for (int64_t k = 0; k < d; ++k) gi[k] = 0.0f;
        for (int64_t j = 0; j < n; ++j) {
            const float s = sym[i * n + j];
            const float* vj = v + j * d;
#pragma omp simd
            for (int64_t k = 0; k < d; ++k) gi[k] += s * vj[k];
        }
    }
}

}  // namespace

extern "C" {

// grad_V of the pairwise-dot interaction (see dots_backward_sample). Returns 0, or -1 when
// dim is too wide for the generic path (the caller uses torch then).
int embtables_pairwise_dots_backward(int64_t batch, int64_t n, int64_t dim, const float* vectors,
                                     const float* grad, float* grad_vectors, int n_threads) {
    if (dim > 1024) return -1;
    const int64_t pairs = n * (n - 1) / 2;
    auto sample = dim == 16 ? dots_backward_sample<16> : dim == 32 ? dots_backward_sample<32>
                : dim == 64 ? dots_backward_sample<64> : dim == 8 ? dots_backward_sample<8>
                : dots_backward_sample<0>;
    const int64_t chunk = 64;  // samples per work item
    embtables::run_items((batch + chunk - 1) / chunk, n_threads, [&](int64_t item) {
        std::vector<float> sym(n * n);
        const int64_t end = (item + 1) * chunk < batch ? (item + 1) * chunk : batch;
        for (int64_t b = item * chunk; b < end; ++b) {
            const float* g = grad + b * pairs;
            for (int64_t i = 0; i < n; ++i) {
                sym[i * n + i] = 0.0f;
                for (int64_t j = i + 1; j < n; ++j) sym[i * n + j] = sym[j * n + i] = *g++;
            }
            sample(n, dim, vectors + b * n * dim, sym.data(), grad_vectors + b * n * dim);
        }
    });
    return 0;
}

}  // extern "C"
