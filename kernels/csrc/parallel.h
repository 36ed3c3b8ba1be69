// A fork/join that does not wait for helpers that never started.
//
// run_items(n, threads, body) runs body(0..n-1) on the calling thread plus threads-1 helper
// threads sharing one work counter. An OpenMP parallel region makes the caller wait at the
// join for every worker, even one the OS has not scheduled yet: on a busy machine that is
// milliseconds per call. Here the caller only waits for items a helper has taken and not
// finished; a helper that starts late finds the counter exhausted and exits at once.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

namespace embtables {

template <class Body>
void run_items(int64_t items, int n_threads, const Body& body) {
    if (n_threads <= 1 || items <= 1) {
        for (int64_t i = 0; i < items; ++i) body(i);
        return;
    }
    struct Job {
        std::atomic<int64_t> next{0}, done{0};
        int64_t items = 0;
        std::function<void(int64_t)> body;  // only called while the caller waits below
    };
    auto job = std::make_shared<Job>();
    job->items = items;
    job->body = [&body](int64_t i) { body(i); };
    auto work = [](const std::shared_ptr<Job>& j) {
        for (int64_t i; (i = j->next.fetch_add(1, std::memory_order_relaxed)) < j->items;) {
            j->body(i);
            j->done.fetch_add(1, std::memory_order_release);
        }
    };
    for (int t = 1; t < n_threads; ++t) {
        try {
            std::thread([job, work] { work(job); }).detach();
        } catch (...) {  // no thread available: the caller does the rest itself
            break;
        }
    }
    work(job);
    while (job->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

}  // namespace embtables
