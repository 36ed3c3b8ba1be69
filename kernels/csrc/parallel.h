// run_items(n, threads, body): body(0..n-1) over `threads` threads, items handed out one at a
// time from a shared counter (uneven items balance themselves).
//
// Built with -fopenmp and loaded after torch, the library resolves libgomp.so.1 to the copy torch
// already loaded: the region runs on torch's own OpenMP threads. A private pool would compete for
// the cores with torch's workers, which spin for a while after each of torch's parallel regions
// (the dense network's matrix products run just before and after every lookup).
#pragma once

#include <atomic>
#include <cstdint>

namespace embtables {

template <class Body>
void run_items(int64_t items, int n_threads, const Body& body) {
    if (n_threads <= 1 || items <= 1) {
        for (int64_t i = 0; i < items; ++i) body(i);
        return;
    }
    std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(n_threads)  // without -fopenmp (setup.py's fallback): one thread
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < items;) body(i);
}

}  // namespace embtables
