// The AMX tile configuration shared by the AMX kernels (gemm_int_amx.cc, gemm_f32_bf16.cc): palette
// 1 with all 8 tiles at 16 rows x 64 bytes (A: 16 rows x 64 bytes of k, B: 16 rows of k-groups x 16
// channels, C: 16 x 16 32-bit sums). ldtilecfg is per thread: a kernel loads it in each pool task
// and releases it at the task's end.
#pragma once
#include <cstdint>

namespace finequant {
namespace kernels {

struct alignas(64) TileConfig {  // the 64-byte operand of ldtilecfg
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row of tmm0..15 (palette 1 has 8)
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");

inline TileConfig full_tile_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  return cfg;
}

}  // namespace kernels
}  // namespace finequant
