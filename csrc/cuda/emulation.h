// The CUDA language for a plain C++ compiler, so that csrc/cuda/*.cu run on the CPU in the test
// suite (included by launch.cuh when TORCHCNN_EMULATE_CUDA is defined; never by nvcc). It needs
// only the C++ standard library and POSIX (ucontext, mmap): tests/emulator builds it without torch.
//
// What it gives: the function qualifiers (__global__, __device__, __host__, __forceinline__,
// __launch_bounds__), the built-in indices blockIdx/threadIdx/blockDim/gridDim (x only: every
// launch here is 1-D), a block's dynamic shared memory (shared_memory(), the `extern __shared__`
// array of a launch that asks for bytes of it), __syncthreads(), and run_grid, which runs a grid.
//
// How it runs a grid: every GPU thread is a fiber (a ucontext with a stack of its own), all on the
// calling thread. A scheduler picks a fiber at random among those that can run, and runs it until
// it returns or reaches __syncthreads(); a barrier releases the threads of its block once all of
// them have reached it. So a kernel sees threads that run in no fixed order — blocks and threads
// interleaved, a new order every launch — and whatever a missing barrier would let a GPU do
// (read a tile before another thread wrote it) happens here too, sooner or later. Each block's
// shared memory is an allocation of its own, exactly as large as the launch asked, filled with
// 0xFF bytes (NaN in floating point) before the block starts: reading what no thread wrote shows,
// and AddressSanitizer catches an index past the end.
//
// What it reports as the kernel bugs they are (a std::logic_error out of the launch):
// - a barrier reached by only part of a block (the others returned without reaching it), which
//   hangs or corrupts a GPU run;
// - threads of one block waiting at two different __syncthreads() at once;
// - more shared memory or threads per block than a GPU launch takes without opting in.
// Warp intrinsics (__shfl_*_sync, __ballot_sync, …) and atomics are left undefined, and a static
// `__shared__` declaration stops the build: the kernels here use none of them.
//
// What it lets through that a GPU would not: a fiber runs undisturbed from one barrier to the next,
// so a race inside one barrier interval that needs two threads interleaved at finer grain (a
// read-modify-write of one shared value, warp-synchronous code) does not show; a barrier is known
// by its __FILE__:__LINE__, so one __syncthreads() in a helper reached from two divergent paths
// passes; __launch_bounds__ is not enforced. Under AddressSanitizer, its swapcontext interceptor
// clears a fiber's stack shadow on each switch: overflows of the stack locals of frames that stay
// live across a barrier go unseen (heap and shared memory stay watched).
#pragma once

#ifdef __CUDACC__
#error "emulation.h is for plain C++ builds of csrc/cuda; nvcc has the real CUDA language"
#endif

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TORCHCNN_EMULATION_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define TORCHCNN_EMULATION_ASAN 1
#endif
#ifdef TORCHCNN_EMULATION_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ \
  static_assert(false, "csrc/cuda/emulation.h emulates dynamic shared memory only: use shared_memory<T>()");
#define __syncthreads() ::torchcnn::emulation::sync_threads(__FILE__, __LINE__)

// CUDA's dim3/uint3, reduced to what a 1-D launch needs.
struct dim3 {
  unsigned int x = 0, y = 0, z = 0;
};

// The built-in variables of the GPU thread that is running (thread_local: two Python threads may
// run emulated kernels at once, each with its own grid).
inline thread_local dim3 blockIdx, threadIdx, blockDim, gridDim;

namespace torchcnn {
namespace emulation {

// What a GPU launch takes without opting in to more (cudaFuncAttributeMaxDynamicSharedMemorySize).
constexpr unsigned int kMaxThreadsPerBlock = 1024;
constexpr std::size_t kMaxSharedBytes = 48 * 1024;

// Grids launched in this process (benchmarks/gpu_model.py counts a training step's).
inline std::atomic<uint64_t>& launches() {
  static std::atomic<uint64_t> count{0};
  return count;
}

// A different, reproducible order for every launch in a process (splitmix64 of the launch count).
inline uint64_t next_launch_seed() {
  uint64_t z = (launches().fetch_add(1) + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// A fiber's stack: mapped memory with an inaccessible lowest page, so that a kernel overflowing
// its stack faults instead of writing over another fiber's.
class Stack {
 public:
  static constexpr std::size_t kBytes = std::size_t{256} << 10;

  Stack() {
    guard_ = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    void* memory = mmap(nullptr, guard_ + kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) {
      throw std::bad_alloc();
    }
    if (mprotect(memory, guard_, PROT_NONE) != 0) {
      munmap(memory, guard_ + kBytes);
      throw std::bad_alloc();
    }
    base_ = static_cast<char*>(memory);
  }
  ~Stack() { munmap(base_, guard_ + kBytes); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;

  char* bottom() const { return base_ + guard_; }

 private:
  char* base_ = nullptr;
  std::size_t guard_ = 0;
};

enum class FiberState { kNew, kReady, kWaiting, kDone };

struct Fiber {
  unsigned int block = 0, thread = 0;
  FiberState state = FiberState::kNew;
  ucontext_t context{};
  std::unique_ptr<Stack> stack;  // from the first run to the return
  void* fake_stack = nullptr;    // AddressSanitizer's, while the fiber is switched out
};

struct Block {
  std::unique_ptr<unsigned char[]> shared;
  unsigned int waiting = 0, returned = 0;
  std::vector<uint64_t> waiters;  // fiber ids
  const char* barrier_file = nullptr;
  int barrier_line = 0;
};

// One launch, running on the calling thread.
class Grid {
 public:
  Grid(unsigned int blocks, unsigned int threads, std::size_t shared_bytes, std::function<void()> body)
      : blocks_(blocks), threads_(threads), shared_bytes_(shared_bytes), body_(std::move(body)) {}

  void run() {
    const uint64_t total = uint64_t{blocks_} * threads_;
    fibers_.resize(total);
    blocks_state_.resize(blocks_);
    for (uint64_t i = 0; i < total; ++i) {
      fibers_[i].block = static_cast<unsigned int>(i / threads_);
      fibers_[i].thread = static_cast<unsigned int>(i % threads_);
    }
    for (Block& block : blocks_state_) {
      if (shared_bytes_ > 0) {
        block.shared.reset(new unsigned char[shared_bytes_]);
        std::memset(block.shared.get(), 0xFF, shared_bytes_);
      }
    }
    Grid* const outer = active_;
    active_ = this;
    try {
      schedule();
    } catch (...) {  // the scheduler's own failure (no memory for a stack)
      error_ = error_ ? error_ : std::current_exception();
    }
    if (error_) {
      abandon_suspended();
    }
    active_ = outer;
    release_stacks();
    if (error_) {
      std::rethrow_exception(error_);
    }
  }

  // Runs fibers picked at random until every one has returned, or one failed.
  void schedule() {
    const uint64_t total = fibers_.size();
    std::vector<uint64_t> runnable(total);
    for (uint64_t i = 0; i < total; ++i) {
      runnable[i] = i;
    }
    uint64_t state = next_launch_seed() | 1;
    while (!runnable.empty() && !error_) {
      state ^= state << 13;  // xorshift64
      state ^= state >> 7;
      state ^= state << 17;
      const uint64_t pick = state % runnable.size();
      const uint64_t id = runnable[pick];
      runnable[pick] = runnable.back();
      runnable.pop_back();
      switch_to(id);
      if (!error_) {
        after_switch(id, runnable);
      }
    }
  }

  // After an error, each fiber still waiting at a barrier is resumed once to unwind its stack
  // (sync_threads throws Abandon there), so that nothing it holds — AddressSanitizer's fake stack
  // frames among them — outlives the launch.
  void abandon_suspended() {
    abandoning_ = true;
    for (uint64_t id = 0; id < fibers_.size(); ++id) {
      if (fibers_[id].stack && fibers_[id].state != FiberState::kDone) {
        switch_to(id);
      }
    }
  }

  // __syncthreads() on the running fiber.
  static void sync_threads(const char* file, int line) {
    Grid* grid = active_;
    if (grid == nullptr) {
      throw std::logic_error("__syncthreads() called outside a kernel launch");
    }
    if (grid->abandoning_) {  // a kernel that swallowed Abandon must not wait again
      throw Abandon{};
    }
    Fiber& fiber = grid->fibers_[grid->running_];
    Block& block = grid->blocks_state_[fiber.block];
    if (block.waiting > 0 && (block.barrier_line != line || std::strcmp(block.barrier_file, file) != 0)) {
      throw std::logic_error("threads of block " + std::to_string(fiber.block) +
                             " wait at two different __syncthreads(): " + block.barrier_file + ":" +
                             std::to_string(block.barrier_line) + " and " + file + ":" + std::to_string(line) +
                             " (a barrier in code that not every thread of the block runs alike)");
    }
    block.barrier_file = file;
    block.barrier_line = line;
    fiber.state = FiberState::kWaiting;
    grid->yield(fiber);
    if (grid->abandoning_) {
      throw Abandon{};
    }
  }

  static unsigned char* shared() {
    Grid* grid = active_;
    if (grid == nullptr || grid->shared_bytes_ == 0) {
      throw std::logic_error("shared_memory() used in a kernel launched without shared memory bytes");
    }
    return grid->blocks_state_[grid->fibers_[grid->running_].block].shared.get();
  }

 private:
  // The scheduler's side: run fiber `id` until it yields.
  void switch_to(uint64_t id) {
    Fiber& fiber = fibers_[id];
    running_ = id;
    blockIdx = dim3{fiber.block, 0, 0};
    threadIdx = dim3{fiber.thread, 0, 0};
    if (fiber.state == FiberState::kNew) {
      fiber.stack = take_stack();
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = fiber.stack->bottom();
      fiber.context.uc_stack.ss_size = Stack::kBytes;
      fiber.context.uc_link = nullptr;
      makecontext(&fiber.context, &Grid::fiber_main, 0);
    }
    fiber.state = FiberState::kReady;
#ifdef TORCHCNN_EMULATION_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, fiber.stack->bottom(), Stack::kBytes);
    swapcontext(&scheduler_, &fiber.context);
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
    swapcontext(&scheduler_, &fiber.context);
#endif
  }

  // After fiber `id` yielded: a barrier it completed, or its return.
  void after_switch(uint64_t id, std::vector<uint64_t>& runnable) {
    Fiber& fiber = fibers_[id];
    Block& block = blocks_state_[fiber.block];
    if (fiber.state == FiberState::kDone) {
      ++block.returned;
      stack_pool().push_back(std::move(fiber.stack));
    } else {
      ++block.waiting;
      block.waiters.push_back(id);
    }
    if (block.waiting > 0 && block.waiting + block.returned == threads_) {
      if (block.returned > 0) {
        error_ = std::make_exception_ptr(std::logic_error(partial_barrier_message(fiber.block, block)));
        return;
      }
      for (const uint64_t waiter : block.waiters) {
        fibers_[waiter].state = FiberState::kReady;
        runnable.push_back(waiter);
      }
      block.waiters.clear();
      block.waiting = 0;
    }
  }

  std::string partial_barrier_message(unsigned int b, const Block& block) const {
    return "__syncthreads() at " + std::string(block.barrier_file) + ":" + std::to_string(block.barrier_line) +
        " was reached by " + std::to_string(block.waiting) + " of the " + std::to_string(threads_) +
        " threads of block " + std::to_string(b) + "; the other " + std::to_string(block.returned) +
        " returned without reaching it (a barrier every thread of a block must reach)";
  }

  // The fiber's side: hand control back to the scheduler.
  void yield(Fiber& fiber) {
#ifdef TORCHCNN_EMULATION_ASAN
    const bool last = fiber.state == FiberState::kDone;
    __sanitizer_start_switch_fiber(last ? nullptr : &fiber.fake_stack, scheduler_stack_, scheduler_stack_size_);
    swapcontext(&fiber.context, &scheduler_);
    __sanitizer_finish_switch_fiber(fiber.fake_stack, nullptr, nullptr);
#else
    swapcontext(&fiber.context, &scheduler_);
#endif
  }

  static void fiber_main() {
    Grid* grid = active_;
#ifdef TORCHCNN_EMULATION_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &grid->scheduler_stack_, &grid->scheduler_stack_size_);
#endif
    try {
      grid->body_();
    } catch (const Abandon&) {
    } catch (...) {
      grid->error_ = grid->error_ ? grid->error_ : std::current_exception();
    }
    Fiber& fiber = grid->fibers_[grid->running_];
    fiber.state = FiberState::kDone;
    grid->yield(fiber);  // never returns: the scheduler does not resume a fiber that is done
  }

  // Stacks are kept for the next fiber, and the next launch on this thread (a fiber abandoned by
  // an error gives its stack back too).
  static std::vector<std::unique_ptr<Stack>>& stack_pool() {
    static thread_local std::vector<std::unique_ptr<Stack>> pool;
    return pool;
  }

  static std::unique_ptr<Stack> take_stack() {
    auto& pool = stack_pool();
    if (pool.empty()) {
      return std::make_unique<Stack>();
    }
    auto stack = std::move(pool.back());
    pool.pop_back();
    return stack;
  }

  void release_stacks() {
    for (Fiber& fiber : fibers_) {
      if (fiber.stack) {
        stack_pool().push_back(std::move(fiber.stack));
      }
    }
  }

  // Thrown at a barrier to unwind a fiber that an error abandoned; not a std::exception, so no
  // kernel code catches it.
  struct Abandon {};

  unsigned int blocks_, threads_;
  std::size_t shared_bytes_;
  std::function<void()> body_;
  std::vector<Fiber> fibers_;
  std::vector<Block> blocks_state_;
  uint64_t running_ = 0;
  ucontext_t scheduler_{};
  const void* scheduler_stack_ = nullptr;
  std::size_t scheduler_stack_size_ = 0;
  std::exception_ptr error_;  // the first failure: a kernel's exception, or a barrier misused
  bool abandoning_ = false;
  static inline thread_local Grid* active_ = nullptr;
};

inline void sync_threads(const char* file, int line) { Grid::sync_threads(file, line); }

// Runs kernel(args...) once for each of the blocks × threads (block, thread) pairs, each a fiber,
// with `shared_bytes` of shared memory per block.
template <typename... Params, typename... Args>
void run_grid(void (*kernel)(Params...), unsigned int blocks, unsigned int threads, std::size_t shared_bytes,
              Args&&... args) {
  if (threads == 0 || threads > kMaxThreadsPerBlock) {
    throw std::logic_error("a launch takes 1 to " + std::to_string(kMaxThreadsPerBlock) + " threads per block, not " +
                           std::to_string(threads));
  }
  if (shared_bytes > kMaxSharedBytes) {
    throw std::logic_error("a launch takes at most " + std::to_string(kMaxSharedBytes) +
                           " bytes of shared memory per block without opting in, not " + std::to_string(shared_bytes));
  }
  if (blocks == 0) {
    return;
  }
  gridDim = dim3{blocks, 1, 1};
  blockDim = dim3{threads, 1, 1};
  Grid grid(blocks, threads, shared_bytes, [&] { kernel(args...); });
  grid.run();
}

}  // namespace emulation
}  // namespace torchcnn
