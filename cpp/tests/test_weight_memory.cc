// The packed-weight allocator (kernels/cpu/weight_memory.cc): cache-line aligned blocks that never
// overlap and keep their bytes, small and large (a region's worth and more), freed in any order and
// allocated again (a region goes back to the heap when its last block is freed).
#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "kernels/cpu/aligned_vector.h"

using namespace finequant;

TEST(weight_blocks_are_aligned_distinct_and_keep_their_bytes) {
  std::mt19937 rng(3);
  const size_t sizes[] = {1, 63, 4096, 65535, 65536, 100000, 1 << 20, (1 << 20) + 17, 5 << 20, 33 << 20};
  for (int round = 0; round < 3; ++round) {
    struct Block {
      uint8_t* p;
      size_t n;
      uint8_t tag;
    };
    std::vector<Block> blocks;
    for (int i = 0; i < 40; ++i) {
      const size_t n = sizes[rng() % (sizeof(sizes) / sizeof(sizes[0]))];
      auto* p = static_cast<uint8_t*>(kernels::weight_allocate(n));
      CHECK(reinterpret_cast<uintptr_t>(p) % 64 == 0);
      const auto tag = static_cast<uint8_t>(i + 1);
      std::fill(p, p + n, tag);
      blocks.push_back({p, n, tag});
    }
    std::shuffle(blocks.begin(), blocks.end(), rng);
    for (const Block& b : blocks) {  // no block overwrote another
      CHECK(b.p[0] == b.tag && b.p[b.n / 2] == b.tag && b.p[b.n - 1] == b.tag);
      kernels::weight_deallocate(b.p, b.n);
    }
  }
  kernels::WeightVector<float> w(300000, 1.5f);
  CHECK(reinterpret_cast<uintptr_t>(w.data()) % 64 == 0);
  CHECK(w[299999] == 1.5f);
}

// After fork() the child allocates and frees weights too (the arena's lock is taken around the fork).
TEST(weights_allocate_in_a_fork_child) {
  void* kept = kernels::weight_allocate(1 << 20);
  const pid_t pid = fork();
  if (pid == 0) {
    void* p = kernels::weight_allocate(3 << 20);
    static_cast<uint8_t*>(p)[0] = 1;
    kernels::weight_deallocate(p, 3 << 20);
    _exit(0);
  }
  CHECK(pid > 0);
  int status = -1;
  CHECK(waitpid(pid, &status, 0) == pid);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  kernels::weight_deallocate(kept, 1 << 20);
}

int main() { return RUN_ALL_TESTS(); }
