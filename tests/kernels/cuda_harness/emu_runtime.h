// Host emulation runtime for CUDA kernels (shared by the training-op harnesses in this folder):
// each CUDA thread of a 256-thread block is a fiber (own stack, switched in user space) on one OS
// thread; a fiber runs until it waits on a barrier (__syncthreads: the block; a warp shuffle: its
// warp), then the next fiber runs, so a missing __syncthreads shows up as a wrong result. A
// shuffle reached by only part of a warp, or a barrier not reached by every thread (including a
// thread that exited), is reported as a deadlock. __shared__ arrays are statics (blocks run one
// after another). Built with -fsanitize=address it catches out-of-bounds global and shared
// accesses. Shared by emulate_nearest_code.cpp and emulate_training_ops.cpp.
//
// Include it in exactly one translation unit (it defines the emulator's globals), before the .cu
// under test, with that .cu's *_KERNELS_ONLY macro defined. Build with -ffp-contract=off so that
// the kernels and the oracles round every operation the same way.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define LGVQ_START_SWITCH(save, bottom, size) __sanitizer_start_switch_fiber(save, bottom, size)
#define LGVQ_FINISH_SWITCH(save, bottom, size) __sanitizer_finish_switch_fiber(save, bottom, size)
#else
#define LGVQ_START_SWITCH(save, bottom, size) ((void)(save), (void)(bottom), (void)(size))
#define LGVQ_FINISH_SWITCH(save, bottom, size) ((void)(save), (void)(bottom), (void)(size))
#endif

namespace emu {
constexpr int kBlockThreads = 256;
constexpr size_t kStackBytes = 256 * 1024;
uint3 thread_idx;  // of the running fiber
uint3 block_idx;
dim3 grid_dim;

struct Barrier {
  int count;
  int arrived = 0;
  uint64_t generation = 0;
};
Barrier block_barrier{kBlockThreads};
Barrier warp_barriers[kBlockThreads / 32] = {{32}, {32}, {32}, {32}, {32}, {32}, {32}, {32}};
uint64_t shuffle_slots[2][kBlockThreads / 32][32];  // double-buffered: one barrier per shuffle
uint64_t releases = 0;                                // barrier releases + fiber exits

// Context switch. x86-64: a few instructions (ucontext's swapcontext makes a signal-mask system
// call per switch, ~10x slower); elsewhere: ucontext.
#if defined(__x86_64__)
extern "C" void lgvq_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl lgvq_emu_switch
  .type lgvq_emu_switch, @function
lgvq_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size lgvq_emu_switch, .-lgvq_emu_switch
)");
struct Context {
  void* sp = nullptr;
};
inline void switch_context(Context& save, Context& load) { lgvq_emu_switch(&save.sp, load.sp); }
// A fresh context whose first switch "returns" into entry (which must never return).
inline void make_context(Context& context, char* stack, size_t bytes, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15};
  auto* slot = reinterpret_cast<uint64_t*>(top - 16);  // entry sees rsp = top - 8, as if called
  slot[0] = reinterpret_cast<uint64_t>(entry);
  slot -= 6;                                           // rbp rbx r12 r13 r14 r15 = 0
  for (int i = 0; i < 6; ++i) slot[i] = 0;
  slot -= 1;
  const uint32_t control[2] = {0x1f80u, 0x037fu};      // default MXCSR, x87 control word
  std::memcpy(slot, control, sizeof(control));
  context.sp = slot;
}
#else
struct Context {
  ucontext_t uc;
};
inline void switch_context(Context& save, Context& load) { swapcontext(&save.uc, &load.uc); }
inline void make_context(Context& context, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&context.uc);
  context.uc.uc_stack.ss_sp = stack;
  context.uc.uc_stack.ss_size = bytes;
  context.uc.uc_link = nullptr;  // entry never returns
  makecontext(&context.uc, entry, 0);
}
#endif

struct Fiber {
  Context context;
  std::unique_ptr<char[]> stack;
  bool done = false;
  unsigned shuffles = 0;
};
Fiber fibers[kBlockThreads];
Fiber* current = nullptr;
Context scheduler_context;
const void* scheduler_stack = nullptr;
size_t scheduler_stack_size = 0;
const std::function<void()>* body = nullptr;

void yield() {
  void* fake_stack = nullptr;
  LGVQ_START_SWITCH(&fake_stack, scheduler_stack, scheduler_stack_size);
  switch_context(current->context, scheduler_context);
  LGVQ_FINISH_SWITCH(fake_stack, nullptr, nullptr);
}

void wait(Barrier& barrier) {
  const uint64_t generation = barrier.generation;
  if (++barrier.arrived == barrier.count) {
    barrier.arrived = 0;
    ++barrier.generation;
    ++releases;
    return;
  }
  while (barrier.generation == generation) yield();
}

[[noreturn]] void fiber_entry() {
  LGVQ_FINISH_SWITCH(nullptr, &scheduler_stack, &scheduler_stack_size);
  (*body)();
  current->done = true;
  ++releases;
  LGVQ_START_SWITCH(nullptr, scheduler_stack, scheduler_stack_size);  // this stack is finished
  switch_context(current->context, scheduler_context);
  std::abort();  // a finished fiber is never resumed
}

template <typename V>
V shuffle_from(V value, int source_lane) {
  static_assert(sizeof(V) <= sizeof(uint64_t), "shuffle of at most 8 bytes");
  const int lane = thread_idx.x % 32, warp = thread_idx.x / 32;
  const int parity = current->shuffles++ & 1;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(V));
  shuffle_slots[parity][warp][lane] = bits;
  wait(warp_barriers[warp]);
  const uint64_t other = shuffle_slots[parity][warp][source_lane & 31];
  V out;
  std::memcpy(&out, &other, sizeof(V));
  return out;
}

// Runs body() as every thread (blockDim = 256) of every block of `grid`, block after block.
void launch(dim3 grid, const std::function<void()>& kernel_body) {
  grid_dim = grid;
  body = &kernel_body;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      block_idx = make_uint3(bx, by, 0);
      for (Fiber& fiber : fibers) {
        if (!fiber.stack) fiber.stack.reset(new char[kStackBytes]);
        fiber.done = false;
        fiber.shuffles = 0;
        make_context(fiber.context, fiber.stack.get(), kStackBytes, fiber_entry);
      }
      int alive = kBlockThreads;
      while (alive > 0) {
        const uint64_t before = releases;
        for (unsigned t = 0; t < kBlockThreads; ++t) {
          Fiber& fiber = fibers[t];
          if (fiber.done) continue;
          current = &fiber;
          thread_idx = make_uint3(t, 0, 0);
          void* fake_stack = nullptr;
          LGVQ_START_SWITCH(&fake_stack, fiber.stack.get(), kStackBytes);
          switch_context(scheduler_context, fiber.context);
          LGVQ_FINISH_SWITCH(fake_stack, nullptr, nullptr);
          if (fiber.done) --alive;
        }
        if (alive > 0 && releases == before) {
          std::fprintf(stderr, "deadlock in block (%u, %u): %d threads wait on a barrier or "
                       "shuffle that the others never reach\n", bx, by, alive);
          std::abort();
        }
      }
    }
  }
}
}  // namespace emu

// ---- the CUDA device API the kernels use, on the host ------------------------------------
#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define gridDim (emu::grid_dim)
#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

inline void __syncthreads() { emu::wait(emu::block_barrier); }
template <typename V>
V __shfl_xor_sync(unsigned, V value, int lane_mask) {
  return emu::shuffle_from(value, static_cast<int>(emu::thread_idx.x % 32) ^ lane_mask);
}
template <typename V>
V __shfl_sync(unsigned, V value, int source_lane) {
  return emu::shuffle_from(value, source_lane);
}
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  const unsigned long long old = *address;  // one OS thread: no other writer in between
  *address = old + value;
  return old;
}
inline unsigned long long atomicMin(unsigned long long* address, unsigned long long value) {
  const unsigned long long old = *address;  // one OS thread: no other writer in between
  if (value < old) *address = value;
  return old;
}
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
// Round-to-nearest arithmetic without contraction (the harness is built with
// -ffp-contract=off, so plain operators round each step too).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
