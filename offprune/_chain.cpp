// A fused chain's forward pass and backward body in C++ (offprune/native.py builds this file on
// first use). They compute exactly what the Python loops in offprune/sparse.py (`_chain_pass`
// and `_SparseChainFunction.backward`) compute: the same torch operators with the same arguments
// in the same order, except for products of their own with the same bits as torch's: CSR
// products (`gather`, as the embedding bag), weight gradients (`sampled_product`, as
// sparse_sampled_addmm) and dense products' bias (`biased_product`, as addmm). Gained: faster
// products, no interpreter or Python binding cost per operator, the GIL released for the whole
// pass, and large products shared over helper threads (`Helpers`) under sparse_threads(n).
#include <torch/extension.h>
#include <torch/csrc/autograd/custom_function.h>
#include <sched.h>
#include <unistd.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define OFFPRUNE_X86 1
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <numeric>
#include <thread>
#include <utility>
#include <vector>

namespace {

using at::Tensor;

// --- sharing a product's work over threads ------------------------------------------------------
//
// torch's OpenMP threads sleep between parallel ops (OMP_WAIT_POLICY=PASSIVE), and waking one took
// ~150 us on the machines measured, longer than most sparse products take. So the products share
// their work (CSR products by columns, weight gradients by rows) with helper threads of their own
// that keep polling for work for a while after each task (SPIN), so that within a training update
// a hand-off takes well under a microsecond, and sleep when training pauses. Only independent
// columns and rows are split, so the bits do not depend on the split.
std::atomic<int> helper_threads_wanted{1};  // threads a product may use (offprune.sparse.sparse_threads)

// Never more than the CPUs this process may run on: a polling helper without a CPU of its own
// would take time from the thread it is meant to help.
int usable_threads() {
  static const int cpus = [] {
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
      return std::max(1, CPU_COUNT(&set));
    }
#endif
    return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  }();
  return std::min({helper_threads_wanted.load(std::memory_order_relaxed), cpus, 64});
}

void pause() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

// Waiting on another thread: a short spin, then giving the CPU away at each check, so that the
// thread waited for can run where the machine has more runnable threads than CPUs (other jobs):
// spinning on, a wait lasted until the scheduler took the CPU away.
class Backoff {
 public:
  void wait() {
    if (++spins_ < 256) {
      pause();
    } else {
      std::this_thread::yield();
    }
  }
  void reset() { spins_ = 0; }

 private:
  int spins_ = 0;
};

class Helpers {
 public:
  // Runs task(0 .. parts-1), part 0 on the calling thread. Falls back to running all parts here
  // when another thread is using the helpers.
  void run(int parts, const std::function<void(int)>& task) {
    if (parts <= 1 || !acquire()) {
      for (int part = 0; part < parts; ++part) {
        task(part);
      }
      return;
    }
    hand_out(parts, task);
    std::exception_ptr failure;
    try {
      task(0);
    } catch (...) {  // the helpers still use `task`: wait for them before leaving
      failure = std::current_exception();
    }
    wait_and_release(failure);
  }

  // Hands task(1) to the first helper and returns at once; false (nothing handed out) when another
  // thread is using the helpers. `finish` waits for it; until then this thread's products run
  // unshared, as they do while another thread uses the helpers.
  bool start(const std::function<void(int)>& task) {
    if (!acquire()) {
      return false;
    }
    hand_out(2, task);
    return true;
  }

  void finish() { wait_and_release(nullptr); }

  // Parts run by helper threads since the process started (the tests check that sharing happens).
  static int64_t parts_run() { return instance().parts_run_.load(std::memory_order_relaxed); }

  static void run_or_inline(int parts, const std::function<void(int)>& task) {
    if (parts <= 1) {
      task(0);
    } else {
      instance().run(parts, task);
    }
  }

  static Helpers& instance() {
    // A forked child has none of the parent's threads: it starts its own helpers.
    static Helpers* helpers = new Helpers();
    static pid_t owner = getpid();
    if (getpid() != owner) {
      helpers = new Helpers();  // the parent's object is left as it is: its threads are not here
      owner = getpid();
    }
    return *helpers;
  }

 private:
  static constexpr auto SPIN = std::chrono::milliseconds(5);

  bool acquire() {
    bool expected = false;
    return busy_.compare_exchange_strong(expected, true, std::memory_order_acquire);
  }

  void hand_out(int parts, const std::function<void(int)>& task) {
    ensure_threads(parts - 1);
    task_ = &task;
    pending_.store(parts - 1, std::memory_order_relaxed);
    unclaimed_.store((parts >= 64 ? ~0ULL : (1ULL << parts) - 1) & ~1ULL, std::memory_order_release);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // a new job: its number and part count in one word, so a helper never pairs one job's number
      // with another's part count
      job_.store(((job_.load(std::memory_order_relaxed) >> 8) + 1) << 8 | static_cast<uint64_t>(parts),
                 std::memory_order_release);
    }
    wake_.notify_all();
  }

  // Whoever claims a part first runs it: the caller takes the parts no helper has started, so that
  // it waits only for parts under way, never for a helper the scheduler has not run yet.
  bool claim(int part) {
    const uint64_t bit = 1ULL << part;
    return (unclaimed_.fetch_and(~bit, std::memory_order_acq_rel) & bit) != 0;
  }

  // The claimed part of the current task; an exception is handed to the caller (one leaving a
  // helper thread would end the process).
  void run_part(int part) {
    try {
      (*task_)(part);  // the caller waits for this part before it sets another task
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!helper_failure_) {
        helper_failure_ = std::current_exception();
      }
    }
    pending_.fetch_sub(1, std::memory_order_release);
  }

  void wait_and_release(std::exception_ptr failure) {
    for (int part = 1; part < 64; ++part) {
      if (claim(part)) {
        run_part(part);
      }
    }
    Backoff backoff;
    while (pending_.load(std::memory_order_acquire) != 0) {
      backoff.wait();
    }
    if (!failure) {
      failure = helper_failure_;
    }
    helper_failure_ = nullptr;
    busy_.store(false, std::memory_order_release);
    if (failure) {
      std::rethrow_exception(failure);
    }
  }

  void ensure_threads(int count) {
    while (started_ < count) {
      const int index = ++started_;  // helper i runs part i, of jobs after the current one
      const uint64_t current = job_.load(std::memory_order_relaxed);
      std::thread([this, index, current] { work(index, current); }).detach();
    }
  }

  void work(int index, uint64_t seen) {
    for (;;) {
      auto since = std::chrono::steady_clock::now();
      Backoff backoff;
      for (int polls = 0;; ++polls) {
        const uint64_t job = job_.load(std::memory_order_acquire);
        if (job != seen) {
          seen = job;
          if (index < static_cast<int>(job & 0xFF) && claim(index)) {  // the job's part count
            run_part(index);
            parts_run_.fetch_add(1, std::memory_order_relaxed);
          }
          since = std::chrono::steady_clock::now();
          backoff.reset();
          continue;
        }
        backoff.wait();
        // stop polling after SPIN without work, or at once when fewer threads are wanted (a
        // polling helper would take its CPU from whoever else needs it)
        if ((polls & 1023) == 1023 && (std::chrono::steady_clock::now() - since > SPIN || index >= usable_threads())) {
          break;
        }
      }
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return job_.load(std::memory_order_acquire) != seen; });
    }
  }

  std::atomic<bool> busy_{false};
  std::atomic<uint64_t> job_{0};  // (job number << 8) | part count
  std::atomic<int> pending_{0};
  std::atomic<uint64_t> unclaimed_{0};  // the current task's parts not yet started (bit per part)
  std::atomic<int64_t> parts_run_{0};
  const std::function<void(int)>* task_ = nullptr;
  std::exception_ptr helper_failure_;  // written under mutex_ before the part is counted done
  int started_ = 0;
  std::mutex mutex_;
  std::condition_variable wake_;
};

// --- a backward's parameter gradients, off its input-gradient path ------------------------------
//
// A backward walks down its layers: each layer's input gradient is the output gradient of the
// layer below (the path every later step waits for), while its weight and bias gradients feed
// nothing below. Under sparse_threads(n >= 2) those gradients go to this queue, which a helper
// works through while the caller walks down the path; at the end the caller takes what is left,
// then waits for the helper's last task. A layer's product split over two cores ran only 1.1-2x
// faster than on one (each core read what the other had just written); here each core works on
// its own data and the two do different work at once. Every task is computed whole by one thread:
// the bits do not depend on which. Without a free helper a task runs where it is added.
class GradientQueue {
 public:
  GradientQueue() : inference_(c10::InferenceMode::is_enabled()) {
    sharing_ = usable_threads() >= 2 && Helpers::instance().start(help_);
  }
  GradientQueue(const GradientQueue&) = delete;
  GradientQueue& operator=(const GradientQueue&) = delete;

  // Leaving early (an exception): drop the tasks not started, as their results are no longer
  // wanted, and wait for the helper, which may be using tensors this scope owns.
  ~GradientQueue() {
    if (sharing_) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        tasks_.clear();
        count_.store(0, std::memory_order_relaxed);
      }
      closed_.store(true, std::memory_order_release);
      try {
        Helpers::instance().finish();
      } catch (...) {  // the exception already leaving this scope is the one to report
      }
    }
  }

  // A task that writes what it computes where the caller reads it after `finish`.
  void add(std::function<void()> task) {
    if (!sharing_) {
      task();
      return;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    tasks_.push_back(std::move(task));
    count_.fetch_add(1, std::memory_order_release);
  }

  bool sharing() const { return sharing_; }

  // Runs the tasks left, then waits for the helper's (whose exception, if any, is thrown here).
  void finish() {
    if (!sharing_) {
      return;
    }
    std::function<void()> task;
    while (take(task)) {
      task();
    }
    closed_.store(true, std::memory_order_release);
    sharing_ = false;
    Helpers::instance().finish();
  }

 private:
  bool take(std::function<void()>& task) {
    if (count_.load(std::memory_order_acquire) == 0) {
      return false;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    if (tasks_.empty()) {
      return false;
    }
    task = std::move(tasks_.front());
    tasks_.pop_front();
    count_.fetch_sub(1, std::memory_order_relaxed);
    return true;
  }

  // The helper's part: tasks as they come, until the caller closes the queue and none is left.
  // Without grad and in the caller's inference mode, as the caller computes them.
  void help() {
    c10::InferenceMode inference_mode(inference_);
    at::NoGradGuard no_grad;
    std::function<void()> task;
    Backoff backoff;
    for (;;) {
      if (take(task)) {
        task();
        backoff.reset();
      } else if (closed_.load(std::memory_order_acquire)) {
        return;  // closed only once empty (finish takes what is left first), and nothing added after
      } else {
        backoff.wait();
      }
    }
  }

  const bool inference_;
  bool sharing_ = false;
  std::mutex mutex_;
  std::deque<std::function<void()>> tasks_;
  std::atomic<int> count_{0};
  std::atomic<bool> closed_{false};
  const std::function<void(int)> help_ = [this](int) { help(); };
};

// Multiply-adds from which a product's work is shared out.
constexpr int64_t MIN_SHARED_WORK = 200000;

// Row bounds [0 = b_0, b_1, ..., b_parts = rows] cutting the rows into `parts` ranges of about
// equal kept weights (`crow`, the rows' CSR offsets).
std::vector<int64_t> row_bounds(const int32_t* crow, int64_t rows, int parts) {
  std::vector<int64_t> bounds(parts + 1, rows);
  bounds[0] = 0;
  const int64_t total = crow[rows] - crow[0];
  for (int k = 1; k < parts; ++k) {
    const int32_t target = crow[0] + static_cast<int32_t>(total * k / parts);
    bounds[k] = std::lower_bound(crow, crow + rows + 1, target) - crow;
  }
  return bounds;
}

// fn(begin, end) over row ranges covering [0, rows), split so that each thread gets about the same
// number of kept weights, or all rows at once when work is small.
void for_row_ranges(const int32_t* crow, int64_t rows, int64_t work,
                    const std::function<void(int64_t, int64_t)>& fn) {
  const int parts = work >= MIN_SHARED_WORK ? usable_threads() : 1;
  if (parts == 1 || rows < parts) {
    fn(0, rows);
    return;
  }
  const std::vector<int64_t> bounds = row_bounds(crow, rows, parts);
  Helpers::run_or_inline(parts, [&](int part) {
    if (bounds[part] < bounds[part + 1]) {
      fn(bounds[part], bounds[part + 1]);
    }
  });
}

// Layer kinds, numbered as in offprune/native.py.
constexpr int64_t CSR = 0;     // a CSR product (`gather`) by the kept values
constexpr int64_t MATRIX = 1;  // addmm by a built weight (dense-product, csr-addmm)
constexpr int64_t LINEAR = 2;  // an inference copy's nn.Linear (addmm by its weight)

// Backward kinds: how a layer's weight gradient and input gradient are computed.
constexpr int64_t GRAD_CSR = 0;            // sampled product on the pattern; input grad by bags
constexpr int64_t GRAD_DENSE_PRODUCT = 1;  // dense product, kept positions picked
constexpr int64_t GRAD_LINEAR = 2;         // dense product

constexpr int64_t RELU = 1;
constexpr int64_t ELU = 2;

Tensor bag(const Tensor& x_t, const Tensor& col, const Tensor& crow, const Tensor& values) {
  return std::get<0>(at::embedding_bag(x_t, col, crow, false, 0, false, values, true));
}

// --- the CSR gather: y = W x_t (+ bias) (relu), W in CSR (crow, col, values), x_t [in, batch] ----
//
// Each output element is accumulated exactly as torch's embedding_bag (FBGEMM) accumulates it:
// a chain of fused multiply-adds from 0 over the row's kept weights in CSR order, so the result is
// bit-identical to `embedding_bag`, `add_(bias)` and `relu_()` (the tests compare them). What
// differs is the loop: column blocks of at most 16 * MAX_VECTORS floats (AVX-512; with AVX2 only,
// of at most 8 * MAX_VECTORS_AVX2), each block of a wide batch first copied to a compact buffer
// (gathered rows of a [in, 1000] activation lie 4 KB apart and collide in cache), and the bias and
// ReLU applied while the result is in registers.

// A row-major matrix whose rows may be padded (row stride >= columns), as `gather` leaves
// activations and gradients that only the next product reads.
bool padded_rows(const Tensor& t) {
  return t.dim() == 2 && t.size(1) > 1 && t.stride(1) == 1 && t.stride(0) >= t.size(1);
}

// Applied to each output element while it is in registers, in this order: + bias[row], max(0, .),
// and the ReLU gradient's gate (threshold_backward(y, gate, 0): y where gate > 0 or NaN, else 0).
struct Epilogue {
  const float* bias = nullptr;
  bool relu = false;
  const float* gate = nullptr;  // [rows, batch] with row stride ld_gate
  int64_t ld_gate = 0;
};

#if OFFPRUNE_X86
constexpr int MAX_VECTORS = 8;

template <int NV, bool PERMUTED>
__attribute__((target("avx512f"))) void gather_rows(const int32_t* crow, const int32_t* col, const float* values,
                                                    const int64_t* perm, const float* x, int64_t ldx, float* out,
                                                    int64_t ldo, const Epilogue& epilogue, int64_t rows,
                                                    __mmask16 last) {
  for (int64_t r = 0; r < rows; ++r) {
    __m512 acc[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      acc[v] = _mm512_setzero_ps();
    }
    for (int32_t k = crow[r]; k < crow[r + 1]; ++k) {
      const __m512 w = _mm512_set1_ps(values[PERMUTED ? perm[k] : k]);
      const float* p = x + static_cast<int64_t>(col[k]) * ldx;
#pragma GCC unroll 8
      for (int v = 0; v < NV - 1; ++v) {
        acc[v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(p + 16 * v), acc[v]);
      }
      acc[NV - 1] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(last, p + 16 * (NV - 1)), acc[NV - 1]);
    }
    float* o = out + r * ldo;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      __m512 y = acc[v];
      if (epilogue.bias != nullptr) {
        y = _mm512_add_ps(y, _mm512_set1_ps(epilogue.bias[r]));
      }
      if (epilogue.relu) {
        y = _mm512_max_ps(_mm512_setzero_ps(), y);  // as torch's clamp_min: NaN and -0.0 kept
      }
      if (epilogue.gate != nullptr) {  // threshold_backward(y, gate, 0): 0 where gate <= 0 (not NaN)
        const float* g = epilogue.gate + r * epilogue.ld_gate + 16 * v;
        const __m512 gate = v < NV - 1 ? _mm512_loadu_ps(g) : _mm512_maskz_loadu_ps(last, g);
        y = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(gate, _mm512_setzero_ps(), _CMP_NLE_UQ), y);
      }
      if (v < NV - 1) {
        _mm512_storeu_ps(o + 16 * v, y);
      } else {
        _mm512_mask_storeu_ps(o + 16 * v, last, y);
      }
    }
  }
}

using GatherRows = void (*)(const int32_t*, const int32_t*, const float*, const int64_t*, const float*, int64_t,
                            float*, int64_t, const Epilogue&, int64_t, __mmask16);
constexpr GatherRows GATHER_ROWS[2][MAX_VECTORS] = {
    {gather_rows<1, false>, gather_rows<2, false>, gather_rows<3, false>, gather_rows<4, false>,
     gather_rows<5, false>, gather_rows<6, false>, gather_rows<7, false>, gather_rows<8, false>},
    {gather_rows<1, true>, gather_rows<2, true>, gather_rows<3, true>, gather_rows<4, true>,
     gather_rows<5, true>, gather_rows<6, true>, gather_rows<7, true>, gather_rows<8, true>}};

bool has_avx512() {
  static const bool supported = __builtin_cpu_supports("avx512f");
  return supported;
}

// The same loops on 8-float AVX2 vectors, for CPUs without AVX-512 (AMD EPYC before Zen 4, older
// Xeons): each output element is the same chain of fused multiply-adds, so the same bits. The last
// vector's valid lanes: `tail` (1 to 8).
constexpr int MAX_VECTORS_AVX2 = 13;  // 104 columns per pass: a 100-row batch in one; 13 + 1 of 16 registers

template <int NV, bool PERMUTED>
__attribute__((target("avx2,fma"))) void gather_rows_avx2(const int32_t* crow, const int32_t* col,
                                                          const float* values, const int64_t* perm, const float* x,
                                                          int64_t ldx, float* out, int64_t ldo,
                                                          const Epilogue& epilogue, int64_t rows, int tail) {
  const __m256i last = _mm256_cmpgt_epi32(_mm256_set1_epi32(tail), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  for (int64_t r = 0; r < rows; ++r) {
    __m256 acc[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      acc[v] = _mm256_setzero_ps();
    }
    for (int32_t k = crow[r]; k < crow[r + 1]; ++k) {
      const __m256 w = _mm256_set1_ps(values[PERMUTED ? perm[k] : k]);
      const float* p = x + static_cast<int64_t>(col[k]) * ldx;
#pragma GCC unroll 16
      for (int v = 0; v < NV - 1; ++v) {
        acc[v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(p + 8 * v), acc[v]);
      }
      acc[NV - 1] = _mm256_fmadd_ps(w, _mm256_maskload_ps(p + 8 * (NV - 1), last), acc[NV - 1]);
    }
    float* o = out + r * ldo;
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      __m256 y = acc[v];
      if (epilogue.bias != nullptr) {
        y = _mm256_add_ps(y, _mm256_set1_ps(epilogue.bias[r]));
      }
      if (epilogue.relu) {
        y = _mm256_max_ps(_mm256_setzero_ps(), y);  // as torch's clamp_min: NaN and -0.0 kept
      }
      if (epilogue.gate != nullptr) {  // threshold_backward(y, gate, 0): 0 where gate <= 0 (not NaN)
        const float* g = epilogue.gate + r * epilogue.ld_gate + 8 * v;
        const __m256 gate = v < NV - 1 ? _mm256_loadu_ps(g) : _mm256_maskload_ps(g, last);
        y = _mm256_and_ps(_mm256_cmp_ps(gate, _mm256_setzero_ps(), _CMP_NLE_UQ), y);
      }
      if (v < NV - 1) {
        _mm256_storeu_ps(o + 8 * v, y);
      } else {
        _mm256_maskstore_ps(o + 8 * v, last, y);
      }
    }
  }
}

using GatherRowsAvx2 = void (*)(const int32_t*, const int32_t*, const float*, const int64_t*, const float*, int64_t,
                                float*, int64_t, const Epilogue&, int64_t, int);
template <bool PERMUTED, size_t... N>
constexpr std::array<GatherRowsAvx2, sizeof...(N)> avx2_kernels(std::index_sequence<N...>) {
  return {gather_rows_avx2<static_cast<int>(N) + 1, PERMUTED>...};
}
constexpr std::array<GatherRowsAvx2, MAX_VECTORS_AVX2> GATHER_ROWS_AVX2[2] = {
    avx2_kernels<false>(std::make_index_sequence<MAX_VECTORS_AVX2>()),
    avx2_kernels<true>(std::make_index_sequence<MAX_VECTORS_AVX2>())};

bool has_avx2_fma() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
}
#else
bool has_avx512() { return false; }
bool has_avx2_fma() { return false; }
#endif

// Which loops compute CSR products: 2 the AVX-512 ones, 1 the AVX2 ones, 0 none (torch's embedding
// bag): the best this CPU has, at most `gather_isa_wanted` (set_gather_isa: the tests run the AVX2
// loops on AVX-512 machines too).
std::atomic<int> gather_isa_wanted{2};

int gather_isa() {
  const int wanted = gather_isa_wanted.load(std::memory_order_relaxed);
  return wanted >= 2 && has_avx512() ? 2 : wanted >= 1 && has_avx2_fma() ? 1 : 0;
}

// Column blocks: a batch of more than UNPACKED_MAX columns is copied PACK_WIDTH columns at a time
// to an aligned buffer and multiplied from there, a narrower one whose rows do not start on cache
// lines in one block (both measured best on BCQ's layers at 100 to 1,000 rows; benchmarks/README.md).
constexpr int64_t PACK_WIDTH = 64;
constexpr int64_t UNPACKED_MAX = 128;

#if OFFPRUNE_X86
// One block of `width` columns: all `rows` output rows, from x's columns at `x` (row stride ldx)
// into `out` (row stride ldo).
void gather_block(const int32_t* crow, const int32_t* col, const float* values, const int64_t* perm,
                  const float* x, int64_t ldx, float* out, int64_t ldo, const Epilogue& epilogue, int64_t rows,
                  int64_t width) {
  if (gather_isa() == 1) {  // passes of equal whole vectors (128 columns: two of 64)
    const int64_t passes = (width + 8 * MAX_VECTORS_AVX2 - 1) / (8 * MAX_VECTORS_AVX2);
    const int64_t per_pass = ((width + passes - 1) / passes + 7) / 8 * 8;
    for (int64_t done = 0; done < width; done += per_pass) {
      const int64_t part = std::min(per_pass, width - done);
      const int vectors = static_cast<int>((part + 7) / 8);
      Epilogue shifted = epilogue;
      if (shifted.gate != nullptr) {
        shifted.gate += done;
      }
      GATHER_ROWS_AVX2[perm != nullptr][vectors - 1](crow, col, values, perm, x + done, ldx, out + done, ldo, shifted,
                                                     rows, static_cast<int>(part - 8 * (vectors - 1)));
    }
    return;
  }
  for (int64_t done = 0; done < width; done += 16 * MAX_VECTORS) {
    const int64_t part = std::min<int64_t>(16 * MAX_VECTORS, width - done);
    const int vectors = static_cast<int>((part + 15) / 16);
    const int64_t tail = part - 16 * (vectors - 1);
    const __mmask16 last = tail == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << tail) - 1);
    Epilogue shifted = epilogue;
    if (shifted.gate != nullptr) {
      shifted.gate += done;
    }
    GATHER_ROWS[perm != nullptr][vectors - 1](crow, col, values, perm, x + done, ldx, out + done, ldo, shifted, rows,
                                              last);
  }
}

// `rows` rows of `width` floats from x (row stride ldx) to `packed` (row stride ld_packed).
void copy_rows(const float* x, int64_t ldx, int64_t rows, int64_t width, float* packed, int64_t ld_packed) {
  for (int64_t i = 0; i < rows; ++i) {
    std::memcpy(packed + i * ld_packed, x + i * ldx, width * sizeof(float));
  }
}

// Columns [begin, end) of the product, from x's columns at `x` (row stride ldx) into `out` (row
// stride ldo): a batch of more than UNPACKED_MAX columns, or one whose rows do not start on cache
// lines, is copied to an aligned buffer PACK_WIDTH columns at a time.
void gather_columns(const int32_t* crow, const int32_t* col, const float* values, const int64_t* perm,
                    const float* x, int64_t ldx, float* out, int64_t ldo, const Epilogue& epilogue, int64_t rows,
                    int64_t in_rows, int64_t begin, int64_t end) {
  const int64_t batch = end - begin;
  x += begin;
  out += begin;
  Epilogue shifted = epilogue;
  if (shifted.gate != nullptr) {
    shifted.gate += begin;
  }
  const bool pack = batch > UNPACKED_MAX || ldx % 16 != 0 || reinterpret_cast<uintptr_t>(x) % 64 != 0;
  if (!pack) {
    gather_block(crow, col, values, perm, x, ldx, out, ldo, shifted, rows, batch);
    return;
  }
  const int64_t width = batch <= UNPACKED_MAX ? batch : PACK_WIDTH;
  const int64_t ld_buffer = (width + 15) / 16 * 16;
  Tensor buffer = at::empty({in_rows * ld_buffer}, at::kFloat);
  float* packed = buffer.data_ptr<float>();
  for (int64_t start = 0; start < batch; start += width) {
    const int64_t w = std::min(width, batch - start);
    copy_rows(x + start, ldx, in_rows, w, packed, ld_buffer);
    Epilogue block = shifted;
    if (block.gate != nullptr) {
      block.gate += start;
    }
    gather_block(crow, col, values, perm, packed, ld_buffer, out + start, ldo, block, rows, w);
  }
}

Tensor gather_own(const Tensor& x_t, const Tensor& crow, const Tensor& col, const Tensor& values,
                     const Tensor* perm, const Tensor* bias, bool relu, const Tensor* gate, bool padded) {
  const int64_t batch = x_t.size(1), out_rows = crow.size(0) - 1, in_rows = x_t.size(0);
  Tensor out = padded && batch % 16 != 0 && batch <= UNPACKED_MAX
                   ? at::empty({out_rows, (batch + 15) / 16 * 16}, x_t.options()).narrow(1, 0, batch)
                   : at::empty({out_rows, batch}, x_t.options());
  Tensor bias_c = bias != nullptr ? bias->contiguous() : Tensor();
  Epilogue epilogue;
  epilogue.bias = bias != nullptr ? bias_c.data_ptr<float>() : nullptr;
  epilogue.relu = relu;
  if (gate != nullptr) {
    epilogue.gate = gate->data_ptr<float>();
    epilogue.ld_gate = gate->stride(0);
  }
  const int32_t* crow_p = crow.data_ptr<int32_t>();
  const int32_t* col_p = col.data_ptr<int32_t>();
  const float* values_p = values.data_ptr<float>();
  const int64_t* perm_p = perm != nullptr ? perm->data_ptr<int64_t>() : nullptr;
  const float* x = x_t.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t ldo = out.stride(0);
  const int64_t ldx = x_t.stride(0);
  const int64_t work = static_cast<int64_t>(col.size(0)) * batch;
  // A batch of one block (<= UNPACKED_MAX columns) is shared out by rows, in ranges of about equal
  // kept weights: split by columns, each thread walked all of the CSR structure for a few columns
  // (benchmarks/README.md). Its input, where it must be copied to aligned rows, is copied once.
  if (batch <= UNPACKED_MAX) {
    Tensor buffer;
    // copied only where rows are read more than once on average (a head or a nearly empty layer
    // reads a few of its input rows: copying them all cost more than the misaligned loads)
    if ((ldx % 16 != 0 || reinterpret_cast<uintptr_t>(x) % 64 != 0) && col.size(0) >= in_rows) {
      const int64_t ld_buffer = (batch + 15) / 16 * 16;
      buffer = at::empty({in_rows * ld_buffer}, at::kFloat);
      float* packed = buffer.data_ptr<float>();
      copy_rows(x, ldx, in_rows, batch, packed, ld_buffer);
      x = packed;
    }
    const int64_t ld_in = buffer.defined() ? (batch + 15) / 16 * 16 : ldx;
    for_row_ranges(crow_p, out_rows, work, [&](int64_t begin, int64_t end) {
      Epilogue part = epilogue;
      if (part.bias != nullptr) part.bias += begin;
      if (part.gate != nullptr) part.gate += begin * part.ld_gate;
      gather_block(crow_p + begin, col_p, values_p, perm_p, x, ld_in, o + begin * ldo, ldo, part, end - begin, batch);
    });
    return out;
  }
  // A wider batch is shared out by columns, in runs of whole 16-column vectors: each thread then
  // reads only its own columns of the input (splitting rows, both would read all of it).
  const int64_t vectors = (batch + 15) / 16;
  const int parts = work >= MIN_SHARED_WORK ? static_cast<int>(std::min<int64_t>(usable_threads(), vectors)) : 1;
  const int64_t per_part = (vectors + parts - 1) / parts * 16;
  Helpers::run_or_inline(parts, [&](int part) {
    const int64_t begin = part * per_part, end = std::min(batch, begin + per_part);
    if (begin < end) {
      gather_columns(crow_p, col_p, values_p, perm_p, x, ldx, o, ldo, epilogue, out_rows, in_rows, begin, end);
    }
  });
  return out;
}
#endif

// W x_t for a CSR W (crow, col, and its values, taken through `perm` when given: values[perm[k]]),
// then the epilogue: + bias, relu, the ReLU gradient's gate (a tensor shaped as the output).
// `padded`: an activation or gradient the next product reads (never one handed back to torch's
// ops, whose reductions could then sum in another order): its rows may be padded to whole cache
// lines (`padded_rows`), so that product reads them in place instead of copying them first.
Tensor gather(const Tensor& x_t, const Tensor& crow, const Tensor& col, const Tensor& values, const Tensor* perm,
              const Tensor* bias, bool relu, const Tensor* gate, bool padded) {
  RECORD_FUNCTION("offprune::csr_gather", std::vector<c10::IValue>());
  // As the Python loops hand it to the bag. A one-column input can be "contiguous" with a column
  // stride other than 1; the bag then takes another path with other rounding, so it keeps the bag.
  const Tensor x = x_t.is_contiguous() || padded_rows(x_t) ? x_t : x_t.contiguous();
#if OFFPRUNE_X86
  if (gather_isa() > 0 && x.device().is_cpu() && x.scalar_type() == at::kFloat && x.size(1) > 0 && x.stride(1) == 1 &&
      values.device().is_cpu() && values.scalar_type() == at::kFloat && values.is_contiguous() &&
      crow.scalar_type() == at::kInt && col.scalar_type() == at::kInt &&
      (perm == nullptr || (perm->scalar_type() == at::kLong && perm->is_contiguous())) &&
      (bias == nullptr || bias->scalar_type() == at::kFloat) &&
      (gate == nullptr || (gate->scalar_type() == at::kFloat && gate->stride(1) == 1 &&
                           gate->size(0) == crow.size(0) - 1 && gate->size(1) == x.size(1)))) {
    return gather_own(x, crow, col, values, perm, bias, relu, gate, padded);
  }
#endif
  Tensor y = bag(x.is_contiguous() ? x : x.contiguous(), col, crow, perm != nullptr ? values.index_select(0, *perm) : values);
  if (bias != nullptr) {
    y.add_(bias->unsqueeze(1));
  }
  if (relu) {
    at::relu_(y);
  }
  if (gate != nullptr) {
    y = at::threshold_backward(y, *gate, 0);
  }
  return y;
}

// --- the weight gradient at the kept positions: dot(grad_t[row], h_t[col]) for each (row, col) --
//
// torch's CPU sparse_sampled_addmm computes each dot product with at::vec::map2_reduce_all on
// 8-float vectors (its AVX2 kernel): the first 8 products, then one vector of products added per
// 8 columns, a partial last vector added into its first lanes, and the 8 lanes summed as
// ((0+4)+(2+6)) + ((1+5)+(3+7)); fewer than 8 columns are summed in order. `sampled_dots` does the
// same additions, several dot products at a time. offprune/native.py checks at load that it gives
// torch's bits on this machine and otherwise keeps torch's operator (`use_sampled_dots`).
bool use_own_sampled_dots = false;

#if OFFPRUNE_X86
template <int N>
__attribute__((target("avx2"))) void sampled_dots(const float* a, const float* const* b, int64_t k, float* out) {
  if (k < 8) {
    for (int n = 0; n < N; ++n) {
      float acc = a[0] * b[n][0];
      for (int64_t j = 1; j < k; ++j) {
        acc = acc + a[j] * b[n][j];
      }
      out[n] = acc + 0.0f;  // torch's alpha * dot + beta * 0 (turns -0 into +0)
    }
    return;
  }
  __m256 acc[N];
  const __m256 a0 = _mm256_loadu_ps(a);
  for (int n = 0; n < N; ++n) {
    acc[n] = _mm256_mul_ps(a0, _mm256_loadu_ps(b[n]));
  }
  const int64_t full = k - k % 8;
  for (int64_t d = 8; d < full; d += 8) {
    const __m256 av = _mm256_loadu_ps(a + d);
    for (int n = 0; n < N; ++n) {
      acc[n] = _mm256_add_ps(acc[n], _mm256_mul_ps(av, _mm256_loadu_ps(b[n] + d)));
    }
  }
  const int64_t tail = k - full;
  if (tail > 0) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(tail)), lanes);
    const __m256 av = _mm256_maskload_ps(a + full, mask);
    for (int n = 0; n < N; ++n) {
      const __m256 sum = _mm256_add_ps(acc[n], _mm256_mul_ps(av, _mm256_maskload_ps(b[n] + full, mask)));
      acc[n] = _mm256_blendv_ps(acc[n], sum, _mm256_castsi256_ps(mask));
    }
  }
  for (int n = 0; n < N; ++n) {
    __m256 v = acc[n];
    v = _mm256_add_ps(v, _mm256_permute2f128_ps(v, v, 0x1));
    v = _mm256_add_ps(v, _mm256_shuffle_ps(v, v, 0x4E));
    v = _mm256_add_ps(v, _mm256_shuffle_ps(v, v, 0xB1));
    out[n] = _mm256_cvtss_f32(v) + 0.0f;
  }
}

bool has_avx2() {
  static const bool supported = __builtin_cpu_supports("avx2");
  return supported;
}
#endif

// Whether `sampled_dots` can compute sparse_sampled_addmm(pattern, grad_t, h_t.t()) here: AVX2,
// float CPU tensors, int32 indices, a non-empty batch.
bool own_sampled_applies(const Tensor& grad_t, const Tensor& h_t, const Tensor& crow) {
#if OFFPRUNE_X86
  return has_avx2() && grad_t.device().is_cpu() && grad_t.scalar_type() == at::kFloat &&
         h_t.scalar_type() == at::kFloat && grad_t.size(1) > 0 && crow.scalar_type() == at::kInt;
#else
  return false;
#endif
}

// The dot products of the pattern's rows [begin, end) into out (all of the pattern's positions, in
// CSR order: its crow_indices and col_indices), for g and h as own_sampled_operand returns them.
void sampled_rows(const Tensor& g, const Tensor& h, const int32_t* crow_p, const int32_t* col_p, float* out,
                  int64_t begin, int64_t end) {
#if OFFPRUNE_X86
  const int64_t k = g.size(1), ldg = g.stride(0), ldh = h.stride(0);
  const float* gp = g.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  for (int64_t r = begin; r < end; ++r) {
    const float* a = gp + r * ldg;
    int32_t e = crow_p[r];
    for (; e + 4 <= crow_p[r + 1]; e += 4) {
      const float* b[4] = {hp + col_p[e] * ldh, hp + col_p[e + 1] * ldh, hp + col_p[e + 2] * ldh,
                           hp + col_p[e + 3] * ldh};
      sampled_dots<4>(a, b, k, out + e);
    }
    for (; e < crow_p[r + 1]; ++e) {
      const float* b[1] = {hp + col_p[e] * ldh};
      sampled_dots<1>(a, b, k, out + e);
    }
  }
#endif
}

// An operand as sampled_rows reads it: rows padded to cache lines kept as they are, else contiguous.
Tensor own_sampled_operand(const Tensor& t) { return padded_rows(t) ? t : t.contiguous(); }

// The dot products (`sampled_dots`) at the pattern's positions, in CSR order; an undefined tensor
// where they do not apply (`own_sampled_applies`).
Tensor own_sampled_product(const Tensor& grad_t, const Tensor& h_t, const Tensor& pattern) {
  RECORD_FUNCTION("offprune::sampled_product", std::vector<c10::IValue>());
  const Tensor crow = pattern.crow_indices(), col = pattern.col_indices();
  if (!own_sampled_applies(grad_t, h_t, crow)) {
    return Tensor();
  }
  const Tensor g = own_sampled_operand(grad_t), h = own_sampled_operand(h_t);
  Tensor out = at::empty({col.size(0)}, g.options());
  float* o = out.data_ptr<float>();
  const int32_t* crow_p = crow.data_ptr<int32_t>();
  const int32_t* col_p = col.data_ptr<int32_t>();
  for_row_ranges(crow_p, crow.size(0) - 1, out.size(0) * g.size(1),
                 [&](int64_t begin, int64_t end) { sampled_rows(g, h, crow_p, col_p, o, begin, end); });
  return out;
}

// sparse_sampled_addmm(pattern, grad_t, h_t.t(), beta=0, alpha=1).values()
Tensor sampled_product(const Tensor& grad_t, const Tensor& h_t, const Tensor& pattern) {
  if (use_own_sampled_dots) {
    Tensor own = own_sampled_product(grad_t, h_t, pattern);
    if (own.defined()) {
      return own;
    }
  }
  return at::sparse_sampled_addmm(pattern, grad_t, h_t.t(), 0.0, 1.0).values();
}

// at::addmm(bias.unsqueeze(1), weight, h_t): addmm copies the broadcast bias into its result
// element by element (slow for a stride-0 source) and then runs the same gemm with beta = 1 on
// it; here the rows are filled directly and addmm_ runs that gemm in place.
Tensor biased_product(const Tensor& bias, const Tensor& weight, const Tensor& h_t) {
  if (bias.scalar_type() != at::kFloat || !bias.device().is_cpu() || weight.layout() != at::kStrided ||
      weight.scalar_type() != at::kFloat || h_t.scalar_type() != at::kFloat) {
    return at::addmm(bias.unsqueeze(1), weight, h_t);
  }
  const int64_t rows = weight.size(0), columns = h_t.size(1);
  Tensor out = at::empty({rows, columns}, h_t.options());
  const Tensor b = bias.contiguous();
  const float* bp = b.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    std::fill(o + r * columns, o + (r + 1) * columns, bp[r]);
  }
  return out.addmm_(weight, h_t);
}

void activate_(Tensor& y, int64_t act, double alpha) {
  if (act == RELU) {
    at::relu_(y);
  } else {
    at::elu_(y, alpha);
  }
}

// Returns the output ([batch, out] view) followed by each layer's feature-major input. With
// `relu_output` (the VAE node's encoder) a CSR last layer's output also goes through ReLU and has
// padded rows: only that node's own loops and products read it.
std::vector<Tensor> chain_pass(const Tensor& x, const std::vector<int64_t>& kinds,
                               const std::vector<Tensor>& crows, const std::vector<Tensor>& cols,
                               const std::vector<Tensor>& weights, const std::vector<Tensor>& biases,
                               int64_t act, double alpha, int64_t batch_major_below, bool relu_output = false) {
  const size_t n = kinds.size();
  std::vector<Tensor> result;
  result.reserve(n + 1);
  result.emplace_back();
  Tensor h_t = x.t();
  for (size_t i = 0; i < n; ++i) {
    result.push_back(h_t);
    if (i == 0 && kinds[i] == LINEAR && x.size(0) < batch_major_below) {
      h_t = at::addmm(biases[i], x, weights[i].t()).t();
    } else if (kinds[i] == CSR) {
      const bool fuse_relu = i + 1 < n ? act == RELU : relu_output;
      // padded where only the next layer's CSR products (forward and weight gradient) read it; not
      // under ELU, whose exp rounds differently in torch's vector and scalar loops
      h_t = gather(h_t, crows[i], cols[i], weights[i], nullptr, &biases[i], fuse_relu, nullptr,
                   fuse_relu && (i + 1 == n || kinds[i + 1] == CSR));
      if (i + 1 < n && !fuse_relu) {
        activate_(h_t, act, alpha);
      }
      continue;
    } else {
      h_t = biased_product(biases[i], weights[i], h_t);
    }
    if (i + 1 < n) {
      activate_(h_t, act, alpha);
    }
  }
  result[0] = h_t.t();
  return result;
}

// Runs task(0 .. count-1), side by side on helper threads when there are any (each task whole on
// one thread), else one after another. Grad and inference mode are per thread: every part runs
// without grad (as the caller does inside a node or a graph-free pass) and in the caller's
// inference mode.
void side_by_side(int count, const std::function<void(int)>& task) {
  if (count > 1 && usable_threads() >= 2) {
    const bool inference = c10::InferenceMode::is_enabled();
    Helpers::run_or_inline(count, [&](int part) {
      c10::InferenceMode inference_mode(inference);
      at::NoGradGuard no_grad;
      task(part);
    });
  } else {
    for (int part = 0; part < count; ++part) {
      task(part);
    }
  }
}

// fn(b) for the blocks b = 0 .. blocks - 1 of a wide batch, each whole on one thread: under
// sparse_threads(n), when `work` (multiply-adds) is worth it, in contiguous groups, one per thread
// (their products do not share their work meanwhile: the helpers are busy).
void for_each_block(int64_t blocks, int64_t work, const std::function<void(int64_t)>& fn) {
  const int parts = work >= MIN_SHARED_WORK ? static_cast<int>(std::min<int64_t>(usable_threads(), blocks)) : 1;
  side_by_side(parts, [&](int part) {
    for (int64_t b = blocks * part / parts; b < blocks * (part + 1) / parts; ++b) {
      fn(b);
    }
  });
}

// The graph-free forward of a wide batch: `block_rows` rows at a time through the whole chain, so
// each block's activations stay in cache from layer to layer, the blocks shared out by
// for_each_block. The blocks are the same whatever the thread count, and rows are independent, so
// the bits do not depend on it.
Tensor blocked_chain_pass(const Tensor& x, const std::vector<int64_t>& kinds, const std::vector<Tensor>& crows,
                          const std::vector<Tensor>& cols, const std::vector<Tensor>& weights,
                          const std::vector<Tensor>& biases, int64_t act, double alpha, int64_t batch_major_below,
                          int64_t block_rows, int64_t work) {
  const int64_t rows = x.size(0);
  const int64_t blocks = (rows + block_rows - 1) / block_rows;
  std::vector<Tensor> outputs(blocks);
  for_each_block(blocks, work, [&](int64_t b) {
    const int64_t start = b * block_rows;
    outputs[b] = chain_pass(x.narrow(0, start, std::min(block_rows, rows - start)), kinds, crows, cols, weights,
                            biases, act, alpha, batch_major_below)[0];
  });
  return at::cat(outputs);
}

// Multiply-adds per task when a layer's weight gradient goes to a GradientQueue: a large one is
// cut into row ranges, so that the caller can take some of it when it reaches the end of its path
// while the helper is still busy.
constexpr int64_t QUEUE_PIECE_WORK = 1000000;

// A layer's gradients (values into grads[value], bias into grads[value + 1], each where `needs`)
// as tasks of `queue`.
void queue_parameter_grads(GradientQueue& queue, std::vector<Tensor>& grads, int64_t value, int64_t kind,
                           const Tensor& grad_t, const Tensor& h_t, const Tensor& pattern, const Tensor& flat_index,
                           bool needs_values, bool needs_bias) {
  const Tensor crow = needs_values && kind == GRAD_CSR ? pattern.crow_indices() : Tensor();
  if (crow.defined() && use_own_sampled_dots && own_sampled_applies(grad_t, h_t, crow)) {
    const Tensor col = pattern.col_indices(), g = own_sampled_operand(grad_t), h = own_sampled_operand(h_t);
    const Tensor out = at::empty({col.size(0)}, g.options());
    grads[value] = out;
    const int64_t rows = crow.size(0) - 1;
    const int parts = queue.sharing() ? static_cast<int>(std::clamp<int64_t>(out.size(0) * g.size(1) / QUEUE_PIECE_WORK,
                                                                             1, std::max<int64_t>(rows, 1)))
                                      : 1;
    const std::vector<int64_t> bounds = row_bounds(crow.data_ptr<int32_t>(), rows, parts);
    for (int part = 0; part < parts; ++part) {
      const int64_t begin = bounds[part], end = bounds[part + 1];
      if (begin < end) {
        queue.add([g, h, crow, col, out, begin, end] {
          RECORD_FUNCTION("offprune::sampled_product", std::vector<c10::IValue>());
          sampled_rows(g, h, crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), out.data_ptr<float>(), begin, end);
        });
      }
    }
  } else if (needs_values) {
    queue.add([&grads, value, kind, grad_t, h_t, pattern, flat_index] {
      if (kind == GRAD_LINEAR) {
        grads[value] = at::mm(grad_t, h_t.t());
      } else if (kind == GRAD_DENSE_PRODUCT) {
        grads[value] = at::mm(grad_t, h_t.t()).view(-1).index_select(0, flat_index);
      } else {
        grads[value] = sampled_product(grad_t, h_t, pattern);
      }
    });
  }
  if (needs_bias) {
    queue.add([&grads, value, grad_t] { grads[value + 1] = grad_t.sum(1); });
  }
}

// A chain's backward: its gradients into grads (values_0, bias_0, values_1, ...; undefined where
// not needed; those of the parameters through `queue`, complete after queue.finish()), followed by
// the input's gradient (undefined unless needs_x), complete on return.
void chain_backward_into(const Tensor& grad_out, const std::vector<int64_t>& kinds, const std::vector<Tensor>& inputs,
                         const std::vector<Tensor>& matrices, const std::vector<Tensor>& patterns,
                         const std::vector<Tensor>& flat_indices, const std::vector<Tensor>& crows_t,
                         const std::vector<Tensor>& cols_t, const std::vector<Tensor>& perms_t,
                         const std::vector<bool>& needs, bool needs_x, int64_t lowest, int64_t act, double alpha,
                         std::vector<Tensor>& grads, GradientQueue& queue) {
  const int64_t n = static_cast<int64_t>(kinds.size());
  grads.assign(2 * n + 1, Tensor());
  Tensor grad_t = grad_out.t();
  if (!grad_t.is_contiguous()) {
    grad_t = grad_t.contiguous();
  }
  for (int64_t i = n - 1; i >= lowest; --i) {
    const Tensor& h_t = inputs[i];
    queue_parameter_grads(queue, grads, 2 * i, kinds[i], grad_t, h_t, patterns[i], flat_indices[i], needs[2 * i],
                          needs[2 * i + 1]);
    if (i == 0 && !needs_x) {
      break;
    }
    // the input gradient; below the first layer, through the activation (ReLU's gate applied
    // inside the CSR product, as threshold_backward would apply it)
    const bool gated = i > 0 && act == RELU;
    Tensor below;
    if (kinds[i] == GRAD_CSR) {
      below = gather(grad_t, crows_t[i], cols_t[i], matrices[i], &perms_t[i], nullptr, false, gated ? &h_t : nullptr,
                     gated && kinds[i - 1] == GRAD_CSR);
    } else {
      below = at::mm(matrices[i].t(), grad_t);
      if (gated) {
        below = at::threshold_backward(below, h_t, 0);
      }
    }
    if (i == 0) {
      grads[2 * n] = below.t();
    } else if (act == RELU) {
      grad_t = below;
    } else {
      grad_t = at::elu_backward(below, alpha, 1, 1, true, h_t);
    }
  }
}

// chain_backward_into with a queue of its own: all gradients complete on return.
std::vector<Tensor> chain_backward(const Tensor& grad_out, const std::vector<int64_t>& kinds,
                                   const std::vector<Tensor>& inputs, const std::vector<Tensor>& matrices,
                                   const std::vector<Tensor>& patterns, const std::vector<Tensor>& flat_indices,
                                   const std::vector<Tensor>& crows_t, const std::vector<Tensor>& cols_t,
                                   const std::vector<Tensor>& perms_t, const std::vector<bool>& needs,
                                   bool needs_x, int64_t lowest, int64_t act, double alpha) {
  std::vector<Tensor> grads;
  GradientQueue queue;  // after grads: destroyed (waiting for the helper) before them
  chain_backward_into(grad_out, kinds, inputs, matrices, patterns, flat_indices, crows_t, cols_t, perms_t, needs,
                      needs_x, lowest, act, alpha, grads, queue);
  queue.finish();
  return grads;
}

// --- a training chain as one autograd node of its own ---------------------------------------
//
// The same forward and backward as offprune.sparse._SparseChainFunction (`chain_pass`,
// `chain_backward`, the product weights built as `_product_weights` builds them), without the
// Python autograd.Function around them: its per-call cost was most of what a small network's
// chain took.

// What a chain is made of, fixed while its layers are (offprune.sparse._ChainStructure).
struct Chain {
  std::vector<int64_t> kinds, grad_kinds;
  std::vector<Tensor> crows, cols, patterns, flat_indices, crows_t, cols_t, perms_t;
  std::vector<int64_t> out_features, in_features;
  std::vector<bool> builds_dense;  // a dense-product layer: its weight built from the kept values
  std::vector<bool> builds_csr;    // a csr-addmm layer: a CSR matrix built from the kept values
  int64_t act = RELU;
  double alpha = 1.0;
  int64_t batch_major_below = 0;
};

// What each layer's forward product multiplies by, as offprune.sparse._product_weights builds it.
std::vector<Tensor> product_weights(const Chain& chain, const std::vector<Tensor>& values) {
  std::vector<Tensor> weights(values.size() / 2);
  for (size_t i = 0; i < weights.size(); ++i) {
    const Tensor& v = values[2 * i];
    if (chain.builds_dense[i]) {
      weights[i] = at::zeros({chain.out_features[i] * chain.in_features[i]}, v.options())
                       .index_copy_(0, chain.flat_indices[i], v)
                       .view({chain.out_features[i], chain.in_features[i]});
    } else if (chain.builds_csr[i]) {
      weights[i] = at::_sparse_csr_tensor_unsafe(chain.crows[i], chain.cols[i], v,
                                                 {chain.out_features[i], chain.in_features[i]},
                                                 v.options().layout(at::kSparseCsr));
    } else {
      weights[i] = v;
    }
  }
  return weights;
}

using Chains = std::vector<std::shared_ptr<const Chain>>;

// A node's chains, kept in its context for the backward (the context holds IValues only).
struct ChainsHolder : torch::CustomClassHolder {
  explicit ChainsHolder(Chains c) : chains(std::move(c)) {}
  Chains chains;
};

void keep_chains(torch::autograd::AutogradContext* ctx, const Chains& chains) {
  ctx->saved_data["chains"] = c10::IValue::make_capsule(c10::make_intrusive<ChainsHolder>(chains));
}

Chains kept_chains(torch::autograd::AutogradContext* ctx) {
  return c10::static_intrusive_pointer_cast<ChainsHolder>(ctx->saved_data["chains"].toCapsule())->chains;
}

// Where each chain's parameters (values_0, bias_0, ...) start in a node's list of all of them,
// chain after chain, and (last) where they end.
std::vector<size_t> param_offsets(const Chains& chains) {
  std::vector<size_t> first(chains.size() + 1, 0);
  for (size_t k = 0; k < chains.size(); ++k) {
    first[k + 1] = first[k] + 2 * chains[k]->kinds.size();
  }
  return first;
}

// A chain's parameters as its passes take them, from a node's list at params[first ..] (values_0,
// bias_0, ...): what each layer's products multiply by (`product_weights`) and the biases.
struct ChainArgs {
  std::vector<Tensor> weights, biases;
};

ChainArgs chain_args(const Chain& chain, at::TensorList params, size_t first) {
  const std::vector<Tensor> all(params.begin() + first, params.begin() + first + 2 * chain.kinds.size());
  ChainArgs args{product_weights(chain, all), {}};
  for (size_t i = 1; i < all.size(); i += 2) {
    args.biases.push_back(all[i]);
  }
  return args;
}

// chain_pass for a chain and its arguments.
std::vector<Tensor> run_chain(const Chain& chain, const ChainArgs& args, const Tensor& x, bool relu_output = false) {
  return chain_pass(x, chain.kinds, chain.crows, chain.cols, args.weights, args.biases, chain.act, chain.alpha,
                    chain.batch_major_below, relu_output);
}

// A chain's forward inside a node, its parameters (values_0, bias_0, ...) at params[first ..]:
// chain_pass's result; `weights` gets what each layer's products multiply by.
std::vector<Tensor> node_chain_pass(const Chain& chain, const Tensor& x, at::TensorList params, size_t first,
                                    std::vector<Tensor>& weights, bool relu_output = false) {
  ChainArgs args = chain_args(chain, params, first);
  std::vector<Tensor> result = run_chain(chain, args, x, relu_output);
  weights = std::move(args.weights);
  return result;
}

// What a chain's backward inside a node needs, appended to `saved`: each layer's input (from
// node_chain_pass's `result`), then what its input gradient multiplies by (the kept values for the
// CSR kinds, else the matrix `weights` built).
void keep_for_backward(torch::autograd::variable_list& saved, const Chain& chain, const std::vector<Tensor>& result,
                       const std::vector<Tensor>& weights, at::TensorList params, size_t first) {
  saved.insert(saved.end(), result.begin() + 1, result.end());
  for (size_t i = 0; i < weights.size(); ++i) {
    saved.push_back(chain.grad_kinds[i] == GRAD_CSR ? params[first + 2 * i] : weights[i]);
  }
}

// A chain's backward inside a node whose edge for the chain's first parameter is `first_edge`, as
// chain_backward_into: its gradients into grads (values_0, bias_0, ...; undefined where the edge
// needs none; complete after queue.finish()), then its input's (undefined unless needs_x).
void node_chain_backward(torch::autograd::AutogradContext* ctx, const Chain& chain, size_t first_edge,
                         const Tensor& grad_out, const std::vector<Tensor>& inputs, const std::vector<Tensor>& matrices,
                         bool needs_x, std::vector<Tensor>& grads, GradientQueue& queue) {
  const int64_t n = static_cast<int64_t>(chain.kinds.size());
  std::vector<bool> needs(2 * n);
  int64_t lowest = needs_x ? 0 : n;  // below the lowest layer with a trainable parameter, nothing
  for (int64_t i = 0; i < 2 * n; ++i) {
    needs[i] = ctx->needs_input_grad(first_edge + i);
    if (needs[i] && !needs_x) {
      lowest = std::min(lowest, i / 2);
    }
  }
  chain_backward_into(grad_out, chain.grad_kinds, inputs, matrices, chain.patterns, chain.flat_indices, chain.crows_t,
                      chain.cols_t, chain.perms_t, needs, needs_x, lowest, chain.act, chain.alpha, grads, queue);
}

// One or more chains as one autograd node: chain k maps x to output k. Twin critics (the same
// input through two networks) are computed side by side, forward and backward, instead of one
// node after the other. Each chain computes exactly what a node of its own computes; the input's
// gradient is the sum of the chains' (two: the same bits in either order, as autograd adds them).
class ChainsFunction : public torch::autograd::Function<ChainsFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& x,
                                                const Chains& chains, at::TensorList params) {
    const int count = static_cast<int>(chains.size());
    const std::vector<size_t> first = param_offsets(chains);
    std::vector<std::vector<Tensor>> results(count), weights(count);
    side_by_side(count, [&](int k) { results[k] = node_chain_pass(*chains[k], x, params, first[k], weights[k]); });
    torch::autograd::variable_list saved, outputs;
    for (int k = 0; k < count; ++k) {
      keep_for_backward(saved, *chains[k], results[k], weights[k], params, first[k]);
      outputs.push_back(results[k][0]);
    }
    ctx->save_for_backward(saved);
    keep_chains(ctx, chains);
    return outputs;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    TORCH_CHECK(!at::GradMode::is_enabled(), "offprune's sparse chains are differentiable once only");
    const Chains chains = kept_chains(ctx);
    const torch::autograd::variable_list saved = ctx->get_saved_variables();
    const int count = static_cast<int>(chains.size());
    const bool needs_x = ctx->needs_input_grad(0);
    std::vector<std::vector<Tensor>> grads(count);
    const std::vector<size_t> first = param_offsets(chains);  // the saved tensors too: 2 per layer
    side_by_side(count, [&](int k) {
      const size_t n = chains[k]->kinds.size();
      const std::vector<Tensor> inputs(saved.begin() + first[k], saved.begin() + first[k] + n),
          matrices(saved.begin() + first[k] + n, saved.begin() + first[k + 1]);
      GradientQueue queue;  // shares nothing while twins run side by side: the helpers are busy
      // edges: x, then the parameters (the chains are no tensors)
      node_chain_backward(ctx, *chains[k], 1 + first[k], grad_outputs[k], inputs, matrices, needs_x, grads[k], queue);
      queue.finish();
    });
    torch::autograd::variable_list result{Tensor(), Tensor()};  // x, the chains
    for (int k = 0; k < count; ++k) {
      const size_t n = chains[k]->kinds.size();
      const Tensor& gx = grads[k][2 * n];
      result[0] = !result[0].defined() ? gx : gx.defined() ? result[0] + gx : result[0];
      result.insert(result.end(), grads[k].begin(), grads[k].begin() + 2 * n);
    }
    return result;
  }
};

// --- BCQ's VAE loss as one autograd node (offprune/sparse_vae.py: the same steps in Python) ----
//
// Encoder (ReLU on its output), mean and log-std heads, the reparameterised latent, decoder, the
// reconstruction MSE and the KL term: forward and backward in one call, where torch's graph had
// ~50 small ops and nodes per update, each slowed by caches the products had just flushed. Every
// step is the one `offprune.sparse_vae` takes with torch's ops, on tensors of the same shapes and
// layouts: exp, log, tanh and the means through torch (their rounding depends on torch's vector
// loops), the rest (exactly rounded +, -, *, /, comparisons) in plain loops below, so compiled and
// Python computations give the same bits (tests). All activations are feature-major [features, batch].

// A batch-major [batch, cols] matrix into the first `cols` rows of a feature-major [.., batch] one.
void transpose_into(const float* src, int64_t batch, int64_t cols, float* dst) {
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = 0; j < cols; ++j) {
      dst[j * batch + b] = src[b * cols + j];
    }
  }
}

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")  // each product rounded on its own, as torch's ops round it

class VAELossFunction : public torch::autograd::Function<VAELossFunction> {
 public:
  // chains: encoder, mean head, log-std head, decoder
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& obs,
                                                const Tensor& action, const Tensor& noise, const Chains& chains,
                                                at::TensorList params, double max_action) {
    const int64_t batch = obs.size(0), obs_dim = obs.size(1), act_dim = action.size(1), latent = noise.size(1);
    for (const auto& chain : chains) {
      TORCH_CHECK(std::all_of(chain->kinds.begin(), chain->kinds.end(), [](int64_t kind) { return kind == CSR; }),
                  "the VAE node takes csr layers only");
    }
    const std::vector<size_t> first = param_offsets(chains);
    auto pass = [&](int k, const Tensor& x_t, bool relu_output) {
      std::vector<Tensor> weights;  // the kept values: csr layers multiply by them as they are
      return node_chain_pass(*chains[k], x_t.t(), params, first[k], weights, relu_output);
    };
    const Tensor obs_c = obs.contiguous(), action_c = action.contiguous(), noise_c = noise.contiguous();
    const float* o = obs_c.data_ptr<float>();
    const float* a = action_c.data_ptr<float>();
    const float* nz = noise_c.data_ptr<float>();
    // encoder input [obs; action], feature-major
    Tensor x_t = at::empty({obs_dim + act_dim, batch}, obs.options());
    transpose_into(o, batch, obs_dim, x_t.data_ptr<float>());
    transpose_into(a, batch, act_dim, x_t.data_ptr<float>() + obs_dim * batch);
    std::vector<Tensor> enc = pass(0, x_t, true);
    const Tensor h_t = enc[0].t();  // ReLU applied, rows padded
    std::vector<Tensor> mean_r = pass(1, h_t, false), log_std_r = pass(2, h_t, false);
    const Tensor mean_t = mean_r[0].t(), raw_t = log_std_r[0].t();  // contiguous [latent, batch]
    const int64_t m_count = latent * batch;
    Tensor ls_t = at::empty_like(raw_t);
    const float* raw = raw_t.data_ptr<float>();
    float* ls = ls_t.data_ptr<float>();
    for (int64_t i = 0; i < m_count; ++i) ls[i] = std::min(std::max(raw[i], -4.0f), 15.0f);
    const Tensor std_t = at::exp(ls_t);
    const float* sd = std_t.data_ptr<float>();
    const float* m = mean_t.data_ptr<float>();
    // decoder input [obs; z], z = mean + std * noise
    Tensor x2_t = at::empty({obs_dim + latent, batch}, obs.options());
    float* x2 = x2_t.data_ptr<float>();
    transpose_into(o, batch, obs_dim, x2);
    float* z = x2 + obs_dim * batch;
    for (int64_t j = 0; j < latent; ++j) {
      for (int64_t b = 0; b < batch; ++b) {
        const int64_t i = j * batch + b;
        const float p = sd[i] * nz[b * latent + j];  // the noise is batch-major
        z[i] = m[i] + p;
      }
    }
    std::vector<Tensor> dec = pass(3, x2_t, false);
    const Tensor t_t = at::tanh(dec[0].t());  // contiguous [act, batch]
    const float* t = t_t.data_ptr<float>();
    const float ma = static_cast<float>(max_action);
    Tensor d_t = at::empty_like(t_t), sq_t = at::empty_like(t_t);
    float* d = d_t.data_ptr<float>();
    float* sq = sq_t.data_ptr<float>();
    for (int64_t j = 0; j < act_dim; ++j) {
      for (int64_t b = 0; b < batch; ++b) {
        const int64_t i = j * batch + b;
        const float recon = t[i] * ma;
        d[i] = recon - a[b * act_dim + j];
        sq[i] = d[i] * d[i];
      }
    }
    const float recon_loss = at::mean(sq_t).item<float>();
    Tensor s2_t = at::empty_like(std_t);
    float* s2 = s2_t.data_ptr<float>();
    for (int64_t i = 0; i < m_count; ++i) s2[i] = sd[i] * sd[i];
    Tensor inner_t = at::log(s2_t);
    float* inner = inner_t.data_ptr<float>();
    for (int64_t i = 0; i < m_count; ++i) {
      const float mm = m[i] * m[i];
      inner[i] = ((inner[i] + 1.0f) - mm) - s2[i];
    }
    const float kl = at::mean(inner_t).item<float>() * -0.5f;
    const float loss = recon_loss + kl * 0.5f;

    torch::autograd::variable_list saved;
    auto keep = [&](const std::vector<Tensor>& inputs) { saved.insert(saved.end(), inputs.begin() + 1, inputs.end()); };
    keep(enc), keep(mean_r), keep(log_std_r), keep(dec);
    saved.insert(saved.end(), {h_t, raw_t, mean_t, std_t, s2_t, t_t, d_t, noise_c});
    saved.insert(saved.end(), params.begin(), params.end());
    ctx->save_for_backward(saved);
    keep_chains(ctx, chains);
    ctx->saved_data["max_action"] = max_action;
    ctx->saved_data["obs_dim"] = obs_dim;
    Tensor loss_t = at::scalar_tensor(loss, obs.options()), recon_t = at::scalar_tensor(recon_loss, obs.options()),
           kl_t = at::scalar_tensor(kl, obs.options());
    ctx->mark_non_differentiable({recon_t, kl_t});
    return {loss_t, recon_t, kl_t};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    TORCH_CHECK(!at::GradMode::is_enabled(), "offprune's VAE node is differentiable once only");
    const Chains chains = kept_chains(ctx);
    const float ma = static_cast<float>(ctx->saved_data["max_action"].toDouble());
    const int64_t obs_dim = ctx->saved_data["obs_dim"].toInt();
    const torch::autograd::variable_list saved = ctx->get_saved_variables();
    size_t at_ = 0;
    auto take = [&](size_t count) {
      std::vector<Tensor> part(saved.begin() + at_, saved.begin() + at_ + count);
      at_ += count;
      return part;
    };
    std::vector<std::vector<Tensor>> inputs(4);
    for (int k = 0; k < 4; ++k) inputs[k] = take(chains[k]->kinds.size());
    const std::vector<Tensor> kept = take(8);
    const Tensor &h_t = kept[0], &raw_t = kept[1], &mean_t = kept[2], &std_t = kept[3], &s2_t = kept[4],
                 &t_t = kept[5], &d_t = kept[6], &noise = kept[7];
    const std::vector<Tensor> params(saved.begin() + at_, saved.end());
    const int64_t act_dim = t_t.size(0), batch = t_t.size(1), latent = mean_t.size(0);
    const int64_t m_count = latent * batch, n_count = act_dim * batch;

    const float g = grad_outputs[0].item<float>();
    const float g_kl = g * 0.5f;
    const float c1 = g * static_cast<float>(2.0 / static_cast<double>(n_count));
    Tensor du_t = at::empty_like(t_t);
    const float* d = d_t.data_ptr<float>();
    const float* t = t_t.data_ptr<float>();
    float* du = du_t.data_ptr<float>();
    for (int64_t i = 0; i < n_count; ++i) {
      const float dd = d[i] * c1;
      du[i] = (dd * ma) * (1.0f - t[i] * t[i]);
    }
    const std::vector<size_t> first = param_offsets(chains);
    // each chain's gradients; the parameters' come through one queue for the whole node, so the
    // decoder's are still being computed while the caller goes on through the heads and encoder
    std::vector<std::vector<Tensor>> chain_grads(4);
    GradientQueue queue;
    auto backward_of = [&](int k, const Tensor& grad_t, bool needs_x) {
      const size_t n = chains[k]->kinds.size();
      std::vector<Tensor> matrices;  // the kept values
      for (size_t i = 0; i < n; ++i) matrices.push_back(params[first[k] + 2 * i]);
      // edges: obs, action, noise, then the parameters
      node_chain_backward(ctx, *chains[k], 3 + first[k], grad_t.t(), inputs[k], matrices, needs_x, chain_grads[k],
                          queue);
      return chain_grads[k][2 * n];  // the input's gradient, [batch, in] view of a feature-major tensor
    };
    const Tensor dz_t = backward_of(3, du_t, true).t().narrow(0, obs_dim, latent);  // rows of [obs + latent, batch]
    const float c2 = g_kl * static_cast<float>(-0.5 / static_cast<double>(m_count));
    const float k2 = c2 * -2.0f, k3 = c2 * 2.0f;
    Tensor dm_t = at::empty_like(mean_t), dls_t = at::empty_like(mean_t);
    const float* dz = dz_t.data_ptr<float>();
    const int64_t ld_dz = dz_t.stride(0);
    const float* m = mean_t.data_ptr<float>();
    const float* sd = std_t.data_ptr<float>();
    const float* s2 = s2_t.data_ptr<float>();
    const float* raw = raw_t.data_ptr<float>();
    const float* nz = noise.data_ptr<float>();
    float* dm = dm_t.data_ptr<float>();
    float* dls = dls_t.data_ptr<float>();
    for (int64_t j = 0; j < latent; ++j) {
      for (int64_t b = 0; b < batch; ++b) {
        const int64_t i = j * batch + b;
        const float gz = dz[j * ld_dz + b];
        dm[i] = gz + m[i] * k2;
        const float e = 1.0f / s2[i] - 1.0f;
        const float ds = gz * nz[b * latent + j] + (e * sd[i]) * k3;
        dls[i] = raw[i] >= -4.0f && raw[i] <= 15.0f ? ds * sd[i] : 0.0f;
      }
    }
    const Tensor dh1_t = backward_of(1, dm_t, true).t(), dh2_t = backward_of(2, dls_t, true).t();
    // through the encoder's ReLU, as threshold_backward(dh1 + dh2, h, 0)
    const int64_t hidden = h_t.size(0);
    Tensor dh_t = at::empty({hidden, batch}, h_t.options());
    const float* h = h_t.data_ptr<float>();
    const float* g1 = dh1_t.data_ptr<float>();
    const float* g2 = dh2_t.data_ptr<float>();
    float* dh = dh_t.data_ptr<float>();
    const int64_t ld_h = h_t.stride(0), ld1 = dh1_t.stride(0), ld2 = dh2_t.stride(0);
    for (int64_t r = 0; r < hidden; ++r) {
      for (int64_t b = 0; b < batch; ++b) {
        const float sum = g1[r * ld1 + b] + g2[r * ld2 + b];
        dh[r * batch + b] = h[r * ld_h + b] <= 0.0f ? 0.0f : sum;
      }
    }
    backward_of(0, dh_t, false);
    queue.finish();
    torch::autograd::variable_list result{Tensor(), Tensor(), Tensor(), Tensor()};  // obs, action, noise, chains
    for (int k = 0; k < 4; ++k) {
      result.insert(result.end(), chain_grads[k].begin(), chain_grads[k].begin() + 2 * chains[k]->kinds.size());
    }
    result.emplace_back();  // max_action
    return result;
  }
};

// --- BCQ's actor loss as one autograd node (offprune/algos/bcq.py: the same ops) ---------------
//
// loss = -mean(Q1([s; a'])), a' = clamp(a + perturb_scale * tanh(actor([s; a])), -max_action,
// max_action), for decoded actions a (no gradient). torch's graph had ten nodes around the two
// chains; here one, whose forward takes each op torch's graph takes, on tensors of the same
// layouts, and whose backward takes the ops torch's autograd formulas take (neg, mean's expand and
// divide, cat's narrow, clamp's mask, mul's scalar, tanh_backward), so it gives autograd's bits
// (tests). Both chains' parameter gradients go through one queue (the critic's, when it is not
// frozen, beside the actor's input-gradient path).
class PerturbedQLossFunction : public torch::autograd::Function<PerturbedQLossFunction> {
 public:
  // chains: actor, Q1
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& obs, const Tensor& sampled,
                        const Chains& chains, at::TensorList params, double perturb_scale, double max_action) {
    const std::vector<size_t> first = param_offsets(chains);
    std::vector<Tensor> actor_weights, q_weights;
    const std::vector<Tensor> actor = node_chain_pass(*chains[0], at::cat({obs, sampled}, 1), params, first[0],
                                                      actor_weights);
    const Tensor t = at::tanh(actor[0]);
    const Tensor pre = at::add(sampled, at::mul(t, perturb_scale));
    const Tensor action = at::clamp(pre, -max_action, max_action);
    const std::vector<Tensor> q = node_chain_pass(*chains[1], at::cat({obs, action}, 1), params, first[1], q_weights);
    const Tensor loss = at::neg(at::mean(q[0]));
    torch::autograd::variable_list saved;
    keep_for_backward(saved, *chains[0], actor, actor_weights, params, first[0]);
    keep_for_backward(saved, *chains[1], q, q_weights, params, first[1]);
    saved.insert(saved.end(), {t, pre});
    ctx->save_for_backward(saved);
    keep_chains(ctx, chains);
    ctx->saved_data["perturb_scale"] = perturb_scale;
    ctx->saved_data["max_action"] = max_action;
    ctx->saved_data["obs_dim"] = obs.size(1);
    ctx->saved_data["rows"] = q[0].size(0);
    return loss;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    TORCH_CHECK(!at::GradMode::is_enabled(), "offprune's actor-loss node is differentiable once only");
    const Chains chains = kept_chains(ctx);
    const torch::autograd::variable_list saved = ctx->get_saved_variables();
    const std::vector<size_t> first = param_offsets(chains);  // the saved tensors too: 2 per layer
    auto part = [&](int k, size_t from, size_t to) {
      return std::vector<Tensor>(saved.begin() + first[k] + from, saved.begin() + first[k] + to);
    };
    const size_t na = chains[0]->kinds.size(), nq = chains[1]->kinds.size();
    const Tensor &t = saved[first[2]], &pre = saved[first[2] + 1];
    const double max_action = ctx->saved_data["max_action"].toDouble();
    const int64_t obs_dim = ctx->saved_data["obs_dim"].toInt(), rows = ctx->saved_data["rows"].toInt();
    // edges: obs, sampled, then the parameters
    bool needs_q_x = false;  // the critic's input gradient: only the actor's parameters want it
    for (size_t i = 0; i < 2 * na; ++i) {
      needs_q_x = needs_q_x || ctx->needs_input_grad(2 + first[0] + i);
    }
    std::vector<std::vector<Tensor>> grads(2);
    GradientQueue queue;  // after grads: destroyed (waiting for the helper) before them
    const Tensor dq = at::div(at::neg(grad_outputs[0]).expand({rows, 1}), rows);  // neg's, then mean's
    node_chain_backward(ctx, *chains[1], 2 + first[1], dq, part(1, 0, nq), part(1, nq, 2 * nq), needs_q_x, grads[1],
                        queue);
    if (needs_q_x) {
      const Tensor da = grads[1][2 * nq].narrow(1, obs_dim, pre.size(1));  // cat's
      const Tensor dpre = at::where(at::logical_and(at::ge(pre, -max_action), at::le(pre, max_action)), da,
                                    at::scalar_tensor(0.0, da.options()));  // clamp's
      const Tensor du = at::tanh_backward(at::mul(dpre, ctx->saved_data["perturb_scale"].toDouble()), t);
      node_chain_backward(ctx, *chains[0], 2 + first[0], du, part(0, 0, na), part(0, na, 2 * na), false, grads[0],
                          queue);
    }
    queue.finish();
    torch::autograd::variable_list result{Tensor(), Tensor(), Tensor()};  // obs, sampled, chains
    for (int k = 0; k < 2; ++k) {
      const size_t n = chains[k]->kinds.size();
      if (grads[k].empty()) {
        grads[k].resize(2 * n);
      }
      result.insert(result.end(), grads[k].begin(), grads[k].begin() + 2 * n);
    }
    result.insert(result.end(), {Tensor(), Tensor()});  // perturb_scale, max_action
    return result;
  }
};

// --- BCQ's critic target, graph-free, in one call (offprune/algos/bcq.py: the same steps) -------
//
// For each next state, `candidates` decoded actions a = decoder_scale * tanh(decoder([s; z])),
// perturbed a' = clamp(a + perturb_scale * tanh(actor([s; a])), -max_action, max_action), scored
// by the target critics, q = lmbda * min(q1, q2) + (1 - lmbda) * max(q1, q2); the target is
// reward + (not_done * discount) * max over the candidates of q. In Python these were ~20 small
// ops and four chain passes; here each block of `block_rows` candidates goes through all three
// networks at once (its activations stay in cache), and under sparse_threads(n) the blocks are
// shared out as a graph-free chain pass shares them. The blocks are those the Python steps' chain
// passes use, torch's tanh gives each element the same bits wherever it sits (tests), the rest is
// exactly rounded: the same bits as the Python steps on any thread count (a NaN stays NaN).

// NaN-propagating, as torch's min, max and clamp (a NaN's sign and payload may differ: torch's own
// differ between its vector and scalar loops)
float nan_min(float a, float b) { return std::isnan(a) || std::isnan(b) ? NAN : std::min(a, b); }
float nan_max(float a, float b) { return std::isnan(a) || std::isnan(b) ? NAN : std::max(a, b); }

struct TargetSettings {
  int64_t candidates;
  float decoder_scale, perturb_scale, max_action, lmbda, other, discount;
};

// decoder_scale * t for the decoder's tanh output t [act_dim, rows] (feature-major), batch-major
// [rows, act_dim] into `out`: the decoded actions.
void decoded_actions(const Tensor& t, float decoder_scale, float* out) {
  const int64_t act_dim = t.size(0), rows = t.size(1);
  const float* tp = t.data_ptr<float>();
  for (int64_t j = 0; j < act_dim; ++j) {
    for (int64_t r = 0; r < rows; ++r) out[r * act_dim + j] = decoder_scale * tp[j * rows + r];
  }
}

// Rows [start, start + rows) of [repeat_interleave(next_obs, candidates); extra], batch-major.
Tensor candidate_input(const Tensor& next_obs, int64_t candidates, int64_t start, int64_t rows, const float* extra,
                       int64_t extra_dim) {
  const int64_t obs_dim = next_obs.size(1);
  Tensor x = at::empty({rows, obs_dim + extra_dim}, next_obs.options());
  const float* s = next_obs.data_ptr<float>();
  float* out = x.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    std::copy_n(s + (start + r) / candidates * obs_dim, obs_dim, out + r * (obs_dim + extra_dim));
    std::copy_n(extra + r * extra_dim, extra_dim, out + r * (obs_dim + extra_dim) + obs_dim);
  }
  return x;
}


// With `decode_obs` defined, also the decoded actions decoder_scale * tanh(decoder([decode_obs;
// decode_z])) [rows, act_dim] (BCQ's actor loss's candidates), one more piece shared out with the
// blocks; {target, decoded (undefined without decode_obs)}.
std::vector<Tensor> bcq_target(const Tensor& next_obs, const Tensor& z, const Tensor& rewards, const Tensor& not_done,
                               const Tensor& decode_obs, const Tensor& decode_z, const Chains& chains,
                               at::TensorList params, const TargetSettings& settings, int64_t block_rows, int64_t work) {
  TORCH_CHECK(chains.size() == 4, "the BCQ target takes decoder, actor, Q1 and Q2 chains");
  const Tensor s_c = next_obs.contiguous(), z_c = z.contiguous();
  const int64_t rows = z_c.size(0), latent = z_c.size(1), act_dim = chains[0]->out_features.back();
  const int64_t states = s_c.size(0), n = settings.candidates;
  TORCH_CHECK(rows == states * n, "the BCQ target needs one latent row per candidate");
  const std::vector<size_t> first = param_offsets(chains);
  std::vector<ChainArgs> args;
  for (int k = 0; k < 4; ++k) {
    args.push_back(chain_args(*chains[k], params, first[k]));
  }
  // chain k's output on x, [out, rows] feature-major
  auto output = [&](int k, const Tensor& x) { return run_chain(*chains[k], args[k], x)[0].t().contiguous(); };
  std::vector<float> q1(rows), q2(rows);
  const int64_t blocks = (rows + block_rows - 1) / block_rows;
  Tensor decoded;
  for_each_block(blocks + (decode_obs.defined() ? 1 : 0), work, [&](int64_t b) {
    if (b == blocks) {  // the decoded actions: chain_pass on [decode_obs; decode_z], as VAE.decode
      const Tensor t = at::tanh(output(0, at::cat({decode_obs, decode_z}, 1)));
      decoded = at::empty({t.size(1), act_dim}, next_obs.options());
      decoded_actions(t, settings.decoder_scale, decoded.data_ptr<float>());
      return;
    }
    const int64_t start = b * block_rows, count = std::min(block_rows, rows - start);
    const Tensor t = at::tanh(output(0, candidate_input(s_c, n, start, count, z_c.data_ptr<float>() + start * latent,
                                                        latent)));
    std::vector<float> action(count * act_dim);  // batch-major
    decoded_actions(t, settings.decoder_scale, action.data());
    const Tensor u = at::tanh(output(1, candidate_input(s_c, n, start, count, action.data(), act_dim)));
    const float* up = u.data_ptr<float>();
    for (int64_t j = 0; j < act_dim; ++j) {
      for (int64_t r = 0; r < count; ++r) {
        const float delta = settings.perturb_scale * up[j * count + r];
        float& a = action[r * act_dim + j];
        a = nan_min(nan_max(a + delta, -settings.max_action), settings.max_action);
      }
    }
    const Tensor x = candidate_input(s_c, n, start, count, action.data(), act_dim);
    const Tensor v1 = output(2, x), v2 = output(3, x);
    std::copy_n(v1.data_ptr<float>(), count, q1.data() + start);
    std::copy_n(v2.data_ptr<float>(), count, q2.data() + start);
  });
  Tensor target = at::empty({states, 1}, next_obs.options());
  const Tensor r_c = rewards.contiguous(), d_c = not_done.contiguous();
  const float* rw = r_c.data_ptr<float>();
  const float* nd = d_c.data_ptr<float>();
  float* out = target.data_ptr<float>();
  for (int64_t s = 0; s < states; ++s) {
    float best = 0.0f;
    for (int64_t c = 0; c < n; ++c) {
      const int64_t i = s * n + c;
      const float low = settings.lmbda * nan_min(q1[i], q2[i]), high = settings.other * nan_max(q1[i], q2[i]);
      const float q = low + high;
      best = c == 0 ? q : nan_max(best, q);
    }
    const float kept = nd[s] * settings.discount;
    out[s] = rw[s] + kept * best;
  }
  return {target, decoded};
}

#pragma GCC pop_options

// torch's fused Adam step (at::_fused_adam_: the same kernel with the same arguments), after
// raising each step count (a float32 scalar) by one, as torch's Adam does before the kernel. Under
// sparse_threads(n >= 2) the parameters are cut into two lists of about equal size (the largest
// in the helper's, whose queue computed most large gradients) stepped side by side. The kernel
// updates each parameter on its own, so the bits are those of one call over all.
void fused_adam(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                const std::vector<Tensor>& exp_avgs, const std::vector<Tensor>& exp_avg_sqs,
                const std::vector<Tensor>& steps, double lr, double beta1, double beta2, double weight_decay,
                double eps) {
  for (const Tensor& count : steps) {  // one op per tensor (add_ and its scalar's conversion) cost more than the step
    TORCH_CHECK(count.device().is_cpu() && count.scalar_type() == at::kFloat && count.numel() == 1,
                "offprune's fused Adam takes float32 step counts on the CPU");
    *count.data_ptr<float>() += 1.0f;
  }
  auto step = [&](const std::vector<size_t>& which) {
    std::vector<Tensor> p, g, m, v, s;
    for (size_t i : which) {
      p.push_back(params[i]), g.push_back(grads[i]), m.push_back(exp_avgs[i]), v.push_back(exp_avg_sqs[i]);
      s.push_back(steps[i]);
    }
    at::_fused_adam_(p, g, m, v, {}, s, lr, beta1, beta2, weight_decay, eps, false, false);
  };
  std::vector<size_t> order(params.size());
  std::iota(order.begin(), order.end(), 0);
  if (params.size() < 2 || usable_threads() < 2) {
    step(order);
    return;
  }
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return params[a].numel() > params[b].numel(); });
  std::vector<size_t> groups[2];  // 0: this thread's, 1: the helper's
  int64_t sizes[2] = {0, 0};
  for (size_t i : order) {
    const int g = sizes[1] <= sizes[0] ? 1 : 0;
    groups[g].push_back(i);
    sizes[g] += params[i].numel();
  }
  side_by_side(2, [&](int part) {
    if (!groups[part].empty()) {
      step(groups[part]);
    }
  });
}

// --- BCQ's whole update in one call (offprune/algos/bcq.py `Agent.update`: the same steps) ------
//
// The VAE's step, the critic target with the actor loss's decoded actions, the critic's step, the
// actor's step with the critic frozen and the soft target updates, each piece the node or call the
// Python update takes (VAELossFunction, bcq_target, ChainsFunction, PerturbedQLossFunction,
// fused_adam) and the small ops between them the ones it takes, in the same order on the same
// random stream: the same bits. What goes is the Python between the pieces, which at 98 % was a
// fifth of the update and all of it serial on any thread count.

// An optimizer step as FusedAdam's plan holds it (offprune/nets.py).
struct AdamPlan {
  std::vector<Tensor> params, exp_avgs, exp_avg_sqs, steps;
  double lr, beta1, beta2, weight_decay, eps;
};

// zero_grad(set_to_none), loss.backward(), step: torch's Adam steps only the parameters that got a
// gradient (their step counts alone raised).
void adam_update(const AdamPlan& plan, const Tensor& loss) {
  for (const Tensor& p : plan.params) {
    p.mutable_grad().reset();
  }
  torch::autograd::backward({loss});
  std::vector<Tensor> params, grads, exp_avgs, exp_avg_sqs, steps;
  for (size_t i = 0; i < plan.params.size(); ++i) {
    const Tensor& g = plan.params[i].grad();
    if (g.defined()) {
      params.push_back(plan.params[i]), grads.push_back(g), exp_avgs.push_back(plan.exp_avgs[i]);
      exp_avg_sqs.push_back(plan.exp_avg_sqs[i]), steps.push_back(plan.steps[i]);
    }
  }
  at::NoGradGuard no_grad;
  fused_adam(params, grads, exp_avgs, exp_avg_sqs, steps, plan.lr, plan.beta1, plan.beta2, plan.weight_decay,
             plan.eps);
}

// Parameters that take no gradient while this lives (offprune.nets.frozen): those that wanted one.
class Frozen {
 public:
  explicit Frozen(const std::vector<Tensor>& params) {
    for (const Tensor& p : params) {
      if (p.requires_grad()) {
        params_.push_back(p);
        p.set_requires_grad(false);
      }
    }
  }
  Frozen(const Frozen&) = delete;
  Frozen& operator=(const Frozen&) = delete;
  ~Frozen() {
    for (const Tensor& p : params_) {
      p.set_requires_grad(true);
    }
  }

 private:
  std::vector<Tensor> params_;
};

// The pieces of a BCQ agent as the update takes them (offprune.sparse.fused_bcq_update).
struct BCQUpdate {
  Chains vae, target, critic, actor;  // VAE (encoder, heads, decoder); decoder, target actor, Q1', Q2'; Q1, Q2; actor, Q1
  std::vector<Tensor> vae_params, target_params, critic_params, actor_params;
  double vae_max_action, prior_clip, perturb_scale, actor_max_action, tau;
  int64_t latent, block_rows, target_work;
  TargetSettings settings;
  AdamPlan vae_adam, critic_adam, actor_adam;
  std::vector<Tensor> critic_targets, critic_sources, actor_targets, actor_sources;  // the soft updates' pairs
};

// {vae_loss, vae_recon, vae_kl, critic_loss, q1_mean, actor_loss}, as Agent.update's info.
std::vector<double> bcq_update(const BCQUpdate& u, const Tensor& obs, const Tensor& action, const Tensor& reward,
                               const Tensor& next_obs, const Tensor& not_done) {
  TORCH_CHECK(at::GradMode::is_enabled(), "BCQ's fused update builds graphs: grad must be enabled");
  std::vector<double> info;
  // the VAE (VAE.loss: its latent noise drawn as the forward draws it)
  const Tensor noise = at::randn({obs.size(0), u.latent}, obs.options());
  const torch::autograd::variable_list vae = VAELossFunction::apply(obs, action, noise, u.vae,
                                                                    at::TensorList(u.vae_params), u.vae_max_action);
  const double recon = vae[1].item<float>(), kl = vae[2].item<float>();
  adam_update(u.vae_adam, vae[0]);
  info.insert(info.end(), {vae[0].item<float>(), recon, kl});
  // the target and the actor's candidates (Agent.target_and_candidates: the prior's clipped draws)
  Tensor target, decoded;
  {
    at::NoGradGuard no_grad;
    const at::TensorOptions options = at::TensorOptions().dtype(at::kFloat);
    const Tensor z = at::randn({next_obs.size(0) * u.settings.candidates, u.latent}, options)
                         .clamp(-u.prior_clip, u.prior_clip);
    const Tensor decode_z = at::randn({obs.size(0), u.latent}, options).clamp(-u.prior_clip, u.prior_clip);
    const std::vector<Tensor> result = bcq_target(next_obs, z, reward, not_done, obs, decode_z, u.target,
                                                  at::TensorList(u.target_params), u.settings, u.block_rows,
                                                  u.target_work);
    target = result[0], decoded = result[1];
  }
  // the critic (Agent.critic_loss)
  const torch::autograd::variable_list q =
      ChainsFunction::apply(at::cat({obs, action}, 1), u.critic, at::TensorList(u.critic_params));
  const Tensor critic_loss = at::add(at::mse_loss(q[0], target), at::mse_loss(q[1], target));
  info.insert(info.end(), {critic_loss.item<float>(), q[0].mean().item<float>()});
  adam_update(u.critic_adam, critic_loss);
  {  // the actor, the critic frozen (Agent.update_actor)
    const Frozen critic(u.critic_adam.params);
    const Tensor actor_loss = PerturbedQLossFunction::apply(obs, decoded, u.actor, at::TensorList(u.actor_params),
                                                            u.perturb_scale, u.actor_max_action);
    info.push_back(actor_loss.item<float>());
    adam_update(u.actor_adam, actor_loss);
  }
  // the soft target updates
  at::NoGradGuard no_grad;
  at::_foreach_lerp_(u.critic_targets, u.critic_sources, u.tau);
  at::_foreach_lerp_(u.actor_targets, u.actor_sources, u.tau);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("chain_pass", [](const Tensor& x, const std::vector<int64_t>& kinds, const std::vector<Tensor>& crows,
                         const std::vector<Tensor>& cols, const std::vector<Tensor>& weights,
                         const std::vector<Tensor>& biases, int64_t act, double alpha, int64_t batch_major_below) {
    pybind11::gil_scoped_release no_gil;
    return chain_pass(x, kinds, crows, cols, weights, biases, act, alpha, batch_major_below);
  });
  m.def("blocked_chain_pass", [](const Tensor& x, const std::vector<int64_t>& kinds, const std::vector<Tensor>& crows,
                                 const std::vector<Tensor>& cols, const std::vector<Tensor>& weights,
                                 const std::vector<Tensor>& biases, int64_t act, double alpha,
                                 int64_t batch_major_below, int64_t block_rows, int64_t work) {
    pybind11::gil_scoped_release no_gil;
    return blocked_chain_pass(x, kinds, crows, cols, weights, biases, act, alpha, batch_major_below, block_rows, work);
  });
  m.def("chain_backward", [](const Tensor& grad_out, const std::vector<int64_t>& kinds,
                             const std::vector<Tensor>& inputs, const std::vector<Tensor>& matrices,
                             const std::vector<Tensor>& patterns, const std::vector<Tensor>& flat_indices,
                             const std::vector<Tensor>& crows_t, const std::vector<Tensor>& cols_t,
                             const std::vector<Tensor>& perms_t, const std::vector<bool>& needs, bool needs_x,
                             int64_t lowest, int64_t act, double alpha) {
    pybind11::gil_scoped_release no_gil;
    return chain_backward(grad_out, kinds, inputs, matrices, patterns, flat_indices, crows_t, cols_t, perms_t, needs,
                          needs_x, lowest, act, alpha);
  });
  pybind11::class_<Chain, std::shared_ptr<Chain>>(m, "Chain")
      .def(pybind11::init([](std::vector<int64_t> kinds, std::vector<int64_t> grad_kinds, std::vector<Tensor> crows,
                             std::vector<Tensor> cols, std::vector<Tensor> patterns, std::vector<Tensor> flat_indices,
                             std::vector<Tensor> crows_t, std::vector<Tensor> cols_t, std::vector<Tensor> perms_t,
                             std::vector<int64_t> out_features, std::vector<int64_t> in_features,
                             std::vector<bool> builds_dense, std::vector<bool> builds_csr, int64_t act, double alpha,
                             int64_t batch_major_below) {
        return std::make_shared<Chain>(Chain{
            std::move(kinds), std::move(grad_kinds), std::move(crows), std::move(cols), std::move(patterns),
            std::move(flat_indices), std::move(crows_t), std::move(cols_t), std::move(perms_t),
            std::move(out_features), std::move(in_features), std::move(builds_dense), std::move(builds_csr), act,
            alpha, batch_major_below});
      }));
  // The chains' outputs for x [rows, in] as one autograd node (the parameters: chain 0's values_0,
  // bias_0, ..., then chain 1's, ...).
  m.def("chains_apply", [](const Tensor& x, const std::vector<std::shared_ptr<Chain>>& chains,
                           const std::vector<Tensor>& params) {
    pybind11::gil_scoped_release no_gil;
    return ChainsFunction::apply(x, Chains(chains.begin(), chains.end()), at::TensorList(params));
  });
  // BCQ's VAE loss (loss, reconstruction MSE, KL) as one autograd node (offprune/sparse_vae.py);
  // the parameters: encoder values_0, bias_0, ..., mean head, log-std head, decoder.
  m.def("vae_loss", [](const Tensor& obs, const Tensor& action, const Tensor& noise,
                       const std::vector<std::shared_ptr<Chain>>& chains, const std::vector<Tensor>& params,
                       double max_action) {
    pybind11::gil_scoped_release no_gil;
    return VAELossFunction::apply(obs, action, noise, Chains(chains.begin(), chains.end()),
                                  at::TensorList(params), max_action);
  });
  // BCQ's critic target [states, 1] from the chains decoder, actor, Q1, Q2 (their parameters one
  // chain after the other) and the prior's latent draw z [states * candidates, latent], clipped;
  // with decode_obs and decode_z (or None), also the actor loss's decoded actions.
  m.def("bcq_target", [](const Tensor& next_obs, const Tensor& z, const Tensor& rewards, const Tensor& not_done,
                         const c10::optional<Tensor>& decode_obs, const c10::optional<Tensor>& decode_z,
                         const std::vector<std::shared_ptr<Chain>>& chains, const std::vector<Tensor>& params,
                         int64_t candidates, double decoder_scale, double perturb_scale, double max_action,
                         double lmbda, double discount, int64_t block_rows, int64_t work) {
    pybind11::gil_scoped_release no_gil;
    // the scalars as torch multiplies a float tensor by a Python number: rounded to float first
    const TargetSettings settings{candidates, static_cast<float>(decoder_scale), static_cast<float>(perturb_scale),
                                  static_cast<float>(max_action), static_cast<float>(lmbda),
                                  static_cast<float>(1.0 - lmbda), static_cast<float>(discount)};
    return bcq_target(next_obs, z, rewards, not_done, decode_obs.value_or(Tensor()), decode_z.value_or(Tensor()),
                      Chains(chains.begin(), chains.end()), at::TensorList(params), settings, block_rows, work);
  });
  // BCQ's actor loss as one autograd node (the parameters: the actor's values_0, bias_0, ..., then
  // Q1's); obs and the decoded actions take no gradient.
  m.def("perturbed_q_loss", [](const Tensor& obs, const Tensor& sampled,
                               const std::vector<std::shared_ptr<Chain>>& chains, const std::vector<Tensor>& params,
                               double perturb_scale, double max_action) {
    pybind11::gil_scoped_release no_gil;
    return PerturbedQLossFunction::apply(obs, sampled, Chains(chains.begin(), chains.end()), at::TensorList(params),
                                         perturb_scale, max_action);
  });
  m.def("own_sampled_product", [](const Tensor& grad_t, const Tensor& h_t, const Tensor& pattern) {
    pybind11::gil_scoped_release no_gil;
    return own_sampled_product(grad_t, h_t, pattern);
  });
  m.def("fused_adam", [](const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                         const std::vector<Tensor>& exp_avgs, const std::vector<Tensor>& exp_avg_sqs,
                         const std::vector<Tensor>& steps, double lr, double beta1, double beta2, double weight_decay,
                         double eps) {
    pybind11::gil_scoped_release no_gil;
    fused_adam(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, weight_decay, eps);
  });
  pybind11::class_<AdamPlan, std::shared_ptr<AdamPlan>>(m, "AdamPlan")
      .def(pybind11::init([](std::vector<Tensor> params, std::vector<Tensor> exp_avgs, std::vector<Tensor> exp_avg_sqs,
                             std::vector<Tensor> steps, double lr, double beta1, double beta2, double weight_decay,
                             double eps) {
        return std::make_shared<AdamPlan>(AdamPlan{std::move(params), std::move(exp_avgs), std::move(exp_avg_sqs),
                                                   std::move(steps), lr, beta1, beta2, weight_decay, eps});
      }));
  // BCQ's whole update (offprune.sparse.fused_bcq_update); returns its info's six numbers.
  m.def("bcq_update", [](const Tensor& obs, const Tensor& action, const Tensor& reward, const Tensor& next_obs,
                         const Tensor& not_done, const std::vector<std::shared_ptr<Chain>>& vae,
                         const std::vector<Tensor>& vae_params, double vae_max_action, int64_t latent,
                         double prior_clip, const std::vector<std::shared_ptr<Chain>>& target,
                         const std::vector<Tensor>& target_params,
                         int64_t candidates, double decoder_scale, double perturb_scale, double max_action,
                         double lmbda, double discount, int64_t block_rows, int64_t target_work,
                         const std::vector<std::shared_ptr<Chain>>& critic, const std::vector<Tensor>& critic_params,
                         const std::vector<std::shared_ptr<Chain>>& actor, const std::vector<Tensor>& actor_params,
                         double actor_perturb_scale, double actor_max_action, const AdamPlan& vae_adam,
                         const AdamPlan& critic_adam, const AdamPlan& actor_adam,
                         const std::vector<Tensor>& critic_targets, const std::vector<Tensor>& critic_sources,
                         const std::vector<Tensor>& actor_targets, const std::vector<Tensor>& actor_sources,
                         double tau) {
    pybind11::gil_scoped_release no_gil;
    const TargetSettings settings{candidates, static_cast<float>(decoder_scale), static_cast<float>(perturb_scale),
                                  static_cast<float>(max_action), static_cast<float>(lmbda),
                                  static_cast<float>(1.0 - lmbda), static_cast<float>(discount)};
    BCQUpdate u{Chains(vae.begin(), vae.end()), Chains(target.begin(), target.end()),
                Chains(critic.begin(), critic.end()), Chains(actor.begin(), actor.end()),
                vae_params, target_params, critic_params, actor_params,
                vae_max_action, prior_clip, actor_perturb_scale, actor_max_action, tau, latent, block_rows,
                target_work, settings,
                vae_adam, critic_adam, actor_adam, critic_targets, critic_sources, actor_targets, actor_sources};
    return bcq_update(u, obs, action, reward, next_obs, not_done);
  });
  m.def("use_sampled_dots", [](bool use) { use_own_sampled_dots = use; });
  // The CSR products' loops: 2 AVX-512, 1 AVX2, 0 the embedding bag, capped at `isa`; returns the
  // cap before.
  m.def("set_gather_isa", [](int isa) { return gather_isa_wanted.exchange(isa); });
  m.def("gather_isa", &gather_isa);
  m.def("set_threads", [](int threads) { helper_threads_wanted.store(std::max(1, threads)); });
  m.def("helper_parts_run", &Helpers::parts_run);
  m.def("gather", [](const Tensor& x_t, const Tensor& crow, const Tensor& col, const Tensor& values,
                     const c10::optional<Tensor>& bias, bool relu) {
    pybind11::gil_scoped_release no_gil;
    return gather(x_t, crow, col, values, nullptr, bias ? &*bias : nullptr, relu, nullptr, false);
  });
}
