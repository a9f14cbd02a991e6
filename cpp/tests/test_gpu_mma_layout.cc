// Host checks of the m16n8k32 fragment layouts and gemm_int_blocked's lane -> memory mapping
// (cuda/src/mma_layout.h): a warp's MMAs emulated element by element on the host, no GPU needed.
#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "cuda/src/mma_layout.h"
#include "check.h"

using namespace finequant::cuda::mma;

namespace {

uint8_t byte_of(uint32_t w, int i) { return static_cast<uint8_t>(w >> (8 * i)); }
uint32_t word_from(const int8_t* p) {
  uint32_t w = 0;
  for (int i = 0; i < 4; ++i) w |= static_cast<uint32_t>(static_cast<uint8_t>(p[i])) << (8 * i);
  return w;
}

// D (16 x 8) of one mma.m16n8k32 from the 32 lanes' registers, by the PTX fragment layout.
void emulate_mma(const uint32_t (&a)[32][4], const uint32_t (&b)[32][2], int32_t (&d)[32][4], int* failures) {
  int8_t A[16][32], B[32][8];
  int seen_a[16][32] = {}, seen_b[32][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    for (int r = 0; r < 4; ++r)
      for (int i = 0; i < 4; ++i) {
        const int row = a_row(lane, r), k = a_k(lane, r, i);
        A[row][k] = static_cast<int8_t>(byte_of(a[lane][r], i));
        ++seen_a[row][k];
      }
    for (int r = 0; r < 2; ++r)
      for (int i = 0; i < 4; ++i) {
        const int k = b_k(lane, r, i), col = b_col(lane);
        B[k][col] = static_cast<int8_t>(byte_of(b[lane][r], i));
        ++seen_b[k][col];
      }
  }
  for (int row = 0; row < 16; ++row)
    for (int k = 0; k < 32; ++k) *failures += seen_a[row][k] != 1;
  for (int k = 0; k < 32; ++k)
    for (int col = 0; col < 8; ++col) *failures += seen_b[k][col] != 1;
  for (int lane = 0; lane < 32; ++lane)
    for (int e = 0; e < 4; ++e) {
      int32_t s = 0;
      for (int k = 0; k < 32; ++k) s += int32_t{A[c_row(lane, e)][k]} * int32_t{B[k][c_col(lane, e)]};
      d[lane][e] += s;
    }
}

// Reference signed nibble unpacking: element 2i low nibble of byte i.
int8_t nibble(const std::vector<uint8_t>& packed, int e) {
  const int v = (packed[e / 2] >> (4 * (e & 1))) & 0xF;
  return static_cast<int8_t>(v >= 8 ? v - 16 : v);
}

}  // namespace

TEST(fragments_cover_each_element_once) {
  int a[16][32] = {}, b[32][8] = {}, c[16][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    for (int r = 0; r < 4; ++r)
      for (int i = 0; i < 4; ++i) ++a[a_row(lane, r)][a_k(lane, r, i)];
    for (int r = 0; r < 2; ++r)
      for (int i = 0; i < 4; ++i) ++b[b_k(lane, r, i)][b_col(lane)];
    for (int e = 0; e < 4; ++e) ++c[c_row(lane, e)][c_col(lane, e)];
  }
  int bad = 0;
  for (auto& r : a)
    for (int v : r) bad += v != 1;
  for (auto& r : b)
    for (int v : r) bad += v != 1;
  for (auto& r : c)
    for (int v : r) bad += v != 1;
  CHECK_EQ(bad, 0);
  // Spot values from the PTX ISA tables: lane 5 (g 1, t 1).
  CHECK_EQ(a_row(5, 0), 1);
  CHECK_EQ(a_row(5, 1), 9);
  CHECK_EQ(a_k(5, 0, 0), 4);
  CHECK_EQ(a_k(5, 2, 3), 23);
  CHECK_EQ(b_k(5, 1, 2), 22);
  CHECK_EQ(b_col(5), 1);
  CHECK_EQ(c_row(5, 3), 9);
  CHECK_EQ(c_col(5, 3), 3);
}

TEST(lane_chunks_cover_each_k_once_per_mma_set) {
  for (int kstep : {32, 64}) {
    // Over the MMAs of a step, every k of the step reaches A (for each row) and B (for each
    // column) exactly once, and at the same logical k of the same MMA for both operands.
    std::vector<int> seen(kstep, 0);
    for (int j = 0; j < mmas_per_step(kstep); ++j)
      for (int lane = 0; lane < 32; lane += 4)  // any group: k depends on t only
        for (int t = 0; t < 4; ++t)
          for (int r = 0; r < 4; ++r)
            for (int i = 0; i < 4; ++i) {
              const int l = lane + t;
              const int ka = lane_word_k(kstep, l, a_word(j, r), i);
              // The B register holding the same logical k: logical k = a_k(l, r, i) = b_k(l, r >> 1, i).
              CHECK_EQ(a_k(l, r, i), b_k(l, r >> 1, i));
              CHECK_EQ(ka, lane_word_k(kstep, l, b_word(j, r >> 1), i));
              if (lane == 0 && (r & 1) == 0) ++seen[ka];
            }
    int bad = 0;
    for (int v : seen) bad += v != 1;
    CHECK_EQ(bad, 0);
  }
}

TEST(warp_step_matches_direct_dot_products) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> dist(-128, 127), dist4(-8, 7);
  for (int kstep : {32, 64})
    for (int w4 = 0; w4 < 2; ++w4)
      for (int rep = 0; rep < 20; ++rep) {
        // A 16 x kstep row-major, W 8 x kstep (one row per output column, like the weight).
        std::vector<int8_t> A(16 * kstep), W(8 * kstep);
        for (auto& v : A) v = static_cast<int8_t>(dist(rng));
        for (auto& v : W) v = static_cast<int8_t>(w4 ? dist4(rng) : dist(rng));
        // Packed weight: element 2i in the low nibble of byte i.
        std::vector<uint8_t> Wp(8 * kstep / 2);
        for (int n = 0; n < 8; ++n)
          for (int i = 0; i < kstep / 2; ++i)
            Wp[n * kstep / 2 + i] =
                static_cast<uint8_t>((W[n * kstep + 2 * i] & 0xF) | ((W[n * kstep + 2 * i + 1] & 0xF) << 4));

        // Each lane's words, loaded as the kernel does.
        const int nw = lane_words(kstep);
        std::vector<uint32_t> a_lo(32 * nw), a_hi(32 * nw), bw(32 * nw);
        for (int lane = 0; lane < 32; ++lane) {
          const int g = group_of(lane), t = thread_in_group(lane);
          for (int w = 0; w < nw; ++w) {
            a_lo[lane * nw + w] = word_from(&A[g * kstep + t * lane_bytes(kstep) + 4 * w]);
            a_hi[lane * nw + w] = word_from(&A[(g + 8) * kstep + t * lane_bytes(kstep) + 4 * w]);
          }
          if (!w4) {
            for (int w = 0; w < nw; ++w) bw[lane * nw + w] = word_from(&W[g * kstep + t * lane_bytes(kstep) + 4 * w]);
          } else {
            // kstep / 8 packed bytes at t * kstep / 8: raw word r widens to words 2r, 2r + 1.
            for (int r = 0; r < nw / 2; ++r) {
              const uint8_t* p = &Wp[g * kstep / 2 + t * kstep / 8 + 4 * r];
              const uint32_t raw = p[0] | (p[1] << 8) | (p[2] << 16) | (static_cast<uint32_t>(p[3]) << 24);
              widen_int4(raw, bw[lane * nw + 2 * r], bw[lane * nw + 2 * r + 1]);
            }
          }
        }
        int32_t d[32][4] = {};
        int failures = 0;
        for (int j = 0; j < mmas_per_step(kstep); ++j) {
          uint32_t af[32][4], bf[32][2];
          for (int lane = 0; lane < 32; ++lane) {
            for (int r = 0; r < 4; ++r) af[lane][r] = ((r & 1) ? a_hi : a_lo)[lane * nw + a_word(j, r)];
            for (int r = 0; r < 2; ++r) bf[lane][r] = bw[lane * nw + b_word(j, r)];
          }
          emulate_mma(af, bf, d, &failures);
        }
        CHECK_EQ(failures, 0);
        int bad = 0;
        for (int lane = 0; lane < 32; ++lane)
          for (int e = 0; e < 4; ++e) {
            const int m = c_row(lane, e), n = c_col(lane, e);
            int32_t ref = 0;
            for (int k = 0; k < kstep; ++k) ref += int32_t{A[m * kstep + k]} * int32_t{W[n * kstep + k]};
            bad += d[lane][e] != ref;
          }
        CHECK_EQ(bad, 0);
      }
}

TEST(widen_int4_sign_extends_every_nibble) {
  std::mt19937 rng(3);
  int bad = 0;
  for (int pos = 0; pos < 8; ++pos)
    for (int v = 0; v < 16; ++v)
      for (int rep = 0; rep < 64; ++rep) {
        uint32_t packed = static_cast<uint32_t>(rng());
        packed = (packed & ~(0xFu << (4 * pos))) | (static_cast<uint32_t>(v) << (4 * pos));
        std::vector<uint8_t> bytes = {static_cast<uint8_t>(packed), static_cast<uint8_t>(packed >> 8),
                                      static_cast<uint8_t>(packed >> 16), static_cast<uint8_t>(packed >> 24)};
        uint32_t lo, hi;
        widen_int4(packed, lo, hi);
        for (int e = 0; e < 8; ++e) {
          const int8_t got = static_cast<int8_t>(byte_of(e < 4 ? lo : hi, e & 3));
          bad += got != nibble(bytes, e);
        }
      }
  CHECK_EQ(bad, 0);
  CHECK_EQ(byte_perm(0x03020100u, 0x07060504u, 0x5140u), 0x05010400u);
}

TEST(split_k_rounds_cover_each_step_once) {
  const int warps = 8;
  for (int kstep : {32, 64})
    for (int64_t spb = 1; spb <= 70; ++spb)
      for (int64_t nb = 1; nb <= 45; ++nb) {
        const int64_t br = round_blocks(spb, nb, warps, 256 / kstep, 32);
        CHECK(br >= 1 && br <= 32 && br <= nb);
        std::vector<int> seen(static_cast<size_t>(nb * spb), 0);
        int bad = 0;
        for (int64_t b0 = 0; b0 < nb; b0 += br) {
          const int64_t nbr = std::min(br, nb - b0), first = b0 * spb, count = nbr * spb;
          for (int w = 0; w < warps; ++w) {
            const int64_t sa = warp_range_begin(first, count, warps, w);
            const int64_t sb = warp_range_begin(first, count, warps, w + 1);
            bad += sa < first || sb > first + count || sa > sb;
            // The kernel's walk: the block of each step, flushed to slot cur - b0 < nbr.
            int64_t cur = sa / spb, next = (cur + 1) * spb;
            for (int64_t s = sa; s < sb; ++s) {
              if (s >= next) ++cur, next += spb;
              bad += cur != s / spb || cur - b0 < 0 || cur - b0 >= nbr;
              ++seen[static_cast<size_t>(s)];
            }
          }
        }
        for (int v : seen) bad += v != 1;
        CHECK_EQ(bad, 0);
      }
}

int main() { return RUN_ALL_TESTS(); }
