// The decoder stack for small steps on a CPU, in one call.
//
// At batch 1 a step must stream every weight from DRAM once (~538 MB for SmolLM2-135M in
// fp32), so its floor is that read; what keeps an op-by-op framework above it are the ~40
// small ops per layer, each paying a dispatch, an OpenMP fork/join and cold caches. Here
// the whole 30-layer stack runs inside ONE OpenMP parallel region: each matmul is a GEMV
// whose small ops ride in its epilogue while the outputs are still in L1 (RoPE and the K/V
// pool write after q|k|v; SiLU(gate) * up after gate|up; the residual add after o and down).
//
// Per layer, five phases for S rows, one token each: a decode, or one token of a prompt
// chunk, whose mask keeps its sequence's slots up to its own position. Every row's K/V is
// in the pool before any row attends (qkv is a phase of its own), so a chunk's later
// tokens see its earlier ones:
//
//   qkv   h = rmsnorm(x) * input_norm (per thread); q|k|v = h @ Wqkv^T;
//         q rotated -> q buffer, k rotated and v -> the pool slots
//   attn  per (row, KV head) and its query heads: softmax(q k^T / sqrt(D)) v over the
//         row's blocks, the slots the row does not own (mask) skipped
//   o     x += attn @ Wo^T
//   mlp   h = rmsnorm(x) * post_norm (per thread); act = silu(h Wgate^T) * (h Wup^T), gate
//         row n and up row n in the same tile
//   down  x += act @ Wdown^T
//
// and a last one, the final norm. Threads share a phase's chunks (a few weight tiles
// each) through a PhaseBoard instead of meeting at barriers; see there why.
//
// Same math and op order as worker_svc/model/llama.py (interleaved RoPE pairs, keys stored
// rotated, the pool layout k[layer, slot, kv_head, head_dim]); only float summation order
// differs. fp32 math; a matrix may be read as the GGUF's quantized blocks of the same fp32
// weights (see "GGUF blocks"). Written with GCC vector extensions, so the same source
// compiles to AVX-512, AVX2 or SSE2 depending on the -m flags the build chose for this CPU.

// Only the headers this file uses: <torch/extension.h> would triple the compile time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

using at::Tensor;

namespace {

#if defined(__AVX512F__)
constexpr int VW = 16;  // floats per vector register
#elif defined(__AVX__)
constexpr int VW = 8;
#else
constexpr int VW = 4;
#endif
typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));  // unaligned loads

inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
// Not `vf{} + a`: 0 + a is not a no-op for a = -0, so that costs an add before the
// broadcast and keeps the broadcast out of the FMA's memory operand.
inline vf splat(float a) {
#if defined(__AVX512F__)
  return _mm512_set1_ps(a);
#elif defined(__AVX__)
  return _mm256_set1_ps(a);
#else
  return vf{a, a, a, a};
#endif
}

inline float hsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(v);
#else
  float s = 0.f;
  for (int i = 0; i < VW; ++i) s += v[i];
  return s;
#endif
}

inline float dot(const float* a, const float* b, int64_t n) {
  vf acc0{}, acc1{};
  int64_t k = 0;
  for (; k + 2 * VW <= n; k += 2 * VW) {
    acc0 += load(a + k) * load(b + k);
    acc1 += load(a + k + VW) * load(b + k + VW);
  }
  for (; k + VW <= n; k += VW) acc0 += load(a + k) * load(b + k);
  float s = hsum(acc0 + acc1);
  for (; k < n; ++k) s += a[k] * b[k];
  return s;
}

// ---------------------------------------------------------------- GEMV tiles

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int kTileRows = 8;    // weight rows per tile: read once from DRAM, used by every x row
constexpr int kMaxTileX = 4;    // x rows per register tile; more rows re-run the tile (weights in L1)
constexpr int kMaxRows = 64;    // x rows per call (the tile output buffers are sized for it)

// Software prefetch distance, in weight rows: each load also asks for the same line of the
// row kPrefetchRows further on (two tiles ahead) into L2. A core has ~16 line-fill buffers;
// with the FMAs of 2-4 x rows between its loads, the out-of-order window no longer keeps
// them busy on its own, and the hardware prefetcher handles these short (one row) streams
// poorly. Measured on one core, GB/s streamed for 1 / 2 / 4 x rows: 11.5 / 8.5 / 6.9
// without, 12.7 / 11.5 / 11.5 with. Past the end of a matrix it is a hint: it cannot fault.
constexpr int kPrefetchRows = 16;
constexpr int kFloatsPerLine = 16;

// ---------------------------------------------------------------- GGUF blocks
//
// A GGUF model's matrices come quantized in blocks of 32 weights along a row (K). The
// converter dequantizes them to fp32 for the rest of the worker, but at batch 1 a step's
// floor is the read of every weight, and the blocks are 4.5-8.5 bits a weight instead of
// 32. So in small steps the stack reads a matrix as its blocks: on AVX2 a block's weights
// are dequantized in registers right into the tile's FMAs (tile_q), elsewhere a tile's
// rows into a scratch buffer of the thread's for the fp32 tiles. The dequantization is
// gguf-py's, op for op (below), and the FMAs are the fp32 tiles', in their order, so every
// weight is the fp32 weight bit for bit and the outputs are those of the fp32 matrices
// bit for bit; checked_blocks checks the first before the stack takes a matrix. (Unless
// the stack quantizes its inputs instead: "int16 activations", AVX2 builds' default.)
//
//   Q4_0 (18 bytes): f16 d, 16 bytes q        w[j] = d * (q_j - 8)
//   Q4_1 (20 bytes): f16 d, f16 m, 16 bytes q  w[j] = d * q_j + m   (the product rounded)
//   Q8_0 (34 bytes): f16 d, 32 int8 q          w[j] = q_j * d
//   4-bit q_j: low nibble of byte j for j < 16, high nibble of byte j - 16 after.

enum GgmlType : int { kF32 = 0, kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8 };  // ggml's numbering
constexpr int64_t kBlockWeights = 32;

constexpr int64_t block_bytes(int type) {
  switch (type) {
    case kQ4_0: return 18;
    case kQ4_1: return 20;
    case kQ8_0: return 34;
  }
  return 0;
}

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in fp32
    const float f = static_cast<float>(man) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  bits = exp == 31 ? (sign | 0x7f800000u | (man << 13)) : (sign | ((exp + 112) << 23) | (man << 13));
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// The product stays rounded before the add: with FMA contraction d * q + m would round
// once, and the weights would differ from gguf-py's in the last bit.
template <typename T>
inline T rounded(T p) {
#if defined(__x86_64__) || defined(__i386__)
  asm("" : "+x"(p));  // p in a vector register, "changed": the add cannot fuse with the multiply
#elif defined(__aarch64__)
  asm("" : "+w"(p));
#else
  volatile T v = p;
  p = v;
#endif
  return p;
}

#if defined(__AVX2__)
// 8 bytes (the low half of b) -> 8 floats.
inline __m256 bytes_to_ps(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }
inline __m256 sbytes_to_ps(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)); }

// One block's 32 weights into w[0..3] (8 each, in order).
template <int kType>
inline void dequant_regs(const uint8_t* b, __m256 w[4]) {
  const __m256 dv = _mm256_set1_ps(half_to_float(b));
  if constexpr (kType == kQ8_0) {
    const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2));
    const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18));
    w[0] = _mm256_mul_ps(sbytes_to_ps(q0), dv);
    w[1] = _mm256_mul_ps(sbytes_to_ps(_mm_unpackhi_epi64(q0, q0)), dv);
    w[2] = _mm256_mul_ps(sbytes_to_ps(q1), dv);
    w[3] = _mm256_mul_ps(sbytes_to_ps(_mm_unpackhi_epi64(q1, q1)), dv);
  } else {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (kType == kQ4_1 ? 4 : 2)));
    const __m128i nib = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(q, nib), hi = _mm_and_si128(_mm_srli_epi16(q, 4), nib);
    const __m128i parts[4] = {lo, _mm_unpackhi_epi64(lo, lo), hi, _mm_unpackhi_epi64(hi, hi)};
    if constexpr (kType == kQ4_0) {
      const __m256 eight = _mm256_set1_ps(8.f);
      for (int i = 0; i < 4; ++i) w[i] = _mm256_mul_ps(_mm256_sub_ps(bytes_to_ps(parts[i]), eight), dv);
    } else {
      const __m256 mv = _mm256_set1_ps(half_to_float(b + 2));
      for (int i = 0; i < 4; ++i) w[i] = _mm256_add_ps(rounded(_mm256_mul_ps(bytes_to_ps(parts[i]), dv)), mv);
    }
  }
}
#endif

void dequant_block(int type, const uint8_t* b, float* out) {
#if defined(__AVX2__)
  __m256 w[4];
  switch (type) {
    case kQ4_0: dequant_regs<kQ4_0>(b, w); break;
    case kQ4_1: dequant_regs<kQ4_1>(b, w); break;
    case kQ8_0: dequant_regs<kQ8_0>(b, w); break;
    default: return;
  }
  for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + 8 * i, w[i]);
#else
  const float d = half_to_float(b);
  if (type == kQ8_0) {
    for (int j = 0; j < 32; ++j) out[j] = static_cast<float>(static_cast<int8_t>(b[2 + j])) * d;
    return;
  }
  const float m = type == kQ4_1 ? half_to_float(b + 2) : 0.f;
  const uint8_t* qs = b + (type == kQ4_1 ? 4 : 2);
  for (int j = 0; j < 32; ++j) {
    const float q = static_cast<float>(j < 16 ? qs[j] & 15 : qs[j - 16] >> 4);
    out[j] = type == kQ4_0 ? (q - 8.f) * d : rounded(q * d) + m;
  }
#endif
}

// Steps of up to this many rows read a matrix's blocks where it has them, larger ones
// its fp32 rows. Past a few rows the tiles stop waiting on DRAM and start waiting on the
// FMA units, and dequantizing is more work for them: measured on SmolLM2-135M (2 cores,
// AVX2), decode steps with blocks (in registers) against fp32: 12.7 / 20.9 ms at 1 row,
// 19.6 / 27.8 at 4; with blocks up to 8 rows, 35.7 / 34.3 at 5 and 42.3 / 36.9 at 6
// (docs/performance.md).
constexpr int kMaxBlockRows = 4;

// ... and with int16 activations, up to this many: the integer tiles cost less per x row
// than dequantizing does, so blocks stay ahead of fp32 rows further ("int16 activations";
// against int16 only up to 4 rows: 34.1 -> 26.8 ms at 5 rows, 33.8 -> 28.7 at 6, 35.2 ->
// 30.6 at 7, 41.1 -> 40.5 at 8, docs/performance.md).
#if defined(__AVX2__) && !defined(__AVX512F__)
constexpr int kMaxQ16Rows = 8;
#else
constexpr int kMaxQ16Rows = 0;
#endif

// A weight matrix [N, K] as the GEMV reads it: fp32 rows, or GGUF blocks (row n is
// row_bytes bytes at blocks + n * row_bytes) dequantized a row at a time.
struct Matrix {
  const float* f32 = nullptr;      // always there
  const uint8_t* blocks = nullptr;  // where the matrix has blocks
  int type = kF32;
  int64_t row_bytes = 0;

  bool is_f32() const { return blocks == nullptr; }
  // How a step of S rows reads it.
  Matrix for_rows(int64_t S, bool q16 = false) const {
    return S <= (q16 ? kMaxQ16Rows : kMaxBlockRows) ? *this : Matrix{f32};
  }

  // Row n's K floats: in place, or dequantized into scratch. Also asks for the row
  // kPrefetchRows on (the fp32 tiles do that themselves for fp32 rows).
  const float* row(int64_t n, int64_t K, float* scratch) const {
    if (is_f32()) return f32 + n * K;
    const uint8_t* p = blocks + n * row_bytes;
    for (int64_t i = 0; i < row_bytes; i += 64) __builtin_prefetch(p + kPrefetchRows * row_bytes + i, 0, 2);
    const int64_t bb = block_bytes(type);
    for (int64_t k = 0; k < K; k += kBlockWeights) dequant_block(type, p + (k / kBlockWeights) * bb, scratch + k);
    return scratch;
  }
};

// The fp32 matrix f32 [N, K] read as `blocks` of ggml type `type`, after checking that
// every row dequantizes to f32's row bit for bit (name says which matrix in an error).
Matrix checked_blocks(const Tensor& f32, const Tensor& blocks, int64_t type, const std::string& name) {
  const int64_t bb = block_bytes(static_cast<int>(type));
  TORCH_CHECK(bb > 0, name, ": ggml type ", type, " is not one the stack reads (Q4_0 = 2, Q4_1 = 3, Q8_0 = 8)");
  const int64_t N = f32.size(0), K = f32.size(1);
  TORCH_CHECK(K % kBlockWeights == 0, name, ": K = ", K, " is not a multiple of ", kBlockWeights);
  TORCH_CHECK(blocks.device().is_cpu() && blocks.scalar_type() == at::kByte && blocks.is_contiguous() &&
                  blocks.dim() == 2 && blocks.size(0) == N && blocks.size(1) == K / kBlockWeights * bb,
              name, ": blocks must be a contiguous uint8 CPU tensor [", N, ", ", K / kBlockWeights * bb, "], got ",
              blocks.sizes());
  const Matrix m{f32.data_ptr<float>(), blocks.data_ptr<uint8_t>(), static_cast<int>(type), K / kBlockWeights * bb};
  std::vector<float> row(K);
  const float* w = f32.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    m.row(n, K, row.data());
    TORCH_CHECK(std::memcmp(row.data(), w + n * K, K * sizeof(float)) == 0, name, ": row ", n,
                " of the blocks does not dequantize to the fp32 weights");
  }
  return m;
}

// y[s * R + r] = dot(x[s], rows[r]) for s < S, r < R; rows[r] holds K floats.
// S * R accumulators stay in registers for the whole K loop (at most 16 + R + 1 <= 32).
template <int S, int R, bool kPrefetch>
inline void tile(const float* const* rows, int64_t K, const float* x, int64_t ldx, float* y) {
  vf acc[S][R];
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < R; ++r) acc[s][r] = vf{};
  int64_t k = 0;
  for (; k + VW <= K; k += VW) {
    vf w[R];
    for (int r = 0; r < R; ++r) w[r] = load(rows[r] + k);
    if (kPrefetch && (VW >= kFloatsPerLine || k % kFloatsPerLine == 0))
      for (int r = 0; r < R; ++r) __builtin_prefetch(rows[r] + kPrefetchRows * K + k, 0, 2);
    for (int s = 0; s < S; ++s) {
      const vf xv = load(x + s * ldx + k);
      for (int r = 0; r < R; ++r) acc[s][r] += w[r] * xv;
    }
  }
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < R; ++r) {
      float t = hsum(acc[s][r]);
      for (int64_t j = k; j < K; ++j) t += rows[r][j] * x[s * ldx + j];
      y[s * R + r] = t;
    }
}

// R <= kMaxR: the tile sizes that fit the registers for S x rows.
template <int S, int kMaxR, bool kPrefetch>
inline void tile_s(const float* const* rows, int R, int64_t K, const float* x, int64_t ldx, float* y) {
  switch (R) {
    case 1: return tile<S, 1, kPrefetch>(rows, K, x, ldx, y);
    case 2: return tile<S, 2, kPrefetch>(rows, K, x, ldx, y);
    case 3: return tile<S, 3, kPrefetch>(rows, K, x, ldx, y);
    case 4: return tile<S, 4, kPrefetch>(rows, K, x, ldx, y);
  }
  if constexpr (kMaxR > 4) {
    switch (R) {
      case 5: return tile<S, 5, kPrefetch>(rows, K, x, ldx, y);
      case 6: return tile<S, 6, kPrefetch>(rows, K, x, ldx, y);
      case 7: return tile<S, 7, kPrefetch>(rows, K, x, ldx, y);
      case 8: return tile<S, 8, kPrefetch>(rows, K, x, ldx, y);
    }
  }
}

// part[s * R + r] for sg <= kMaxTileX rows of x against R weight rows (R <= 4 when sg > 2).
template <bool kPrefetch>
inline void group_dot(int sg, const float* const* rows, int R, int64_t K, const float* x, int64_t ldx,
                      float* part) {
  switch (sg) {
    case 1: return tile_s<1, 8, kPrefetch>(rows, R, K, x, ldx, part);
    case 2: return tile_s<2, 8, kPrefetch>(rows, R, K, x, ldx, part);
    case 3: return tile_s<3, 4, kPrefetch>(rows, R, K, x, ldx, part);
    default: return tile_s<4, 4, kPrefetch>(rows, R, K, x, ldx, part);
  }
}

// y[s][r] (row stride R) for all S rows of x against R <= kTileRows weight rows.
void block_dot(const float* const* rows, int R, int64_t K, const float* x, int64_t ldx, int S, bool prefetch,
               float* y) {
  float part[kMaxTileX * kTileRows];
  for (int s0 = 0; s0 < S; s0 += kMaxTileX) {
    const int sg = std::min(kMaxTileX, S - s0);
    const float* xs = x + s0 * ldx;
    // 1-2 x rows: one 8-row tile; 3-4 x rows: two 4-row tiles (register budget).
    const int halves = (sg <= 2 || R <= 4) ? 1 : 2;
    for (int h = 0; h < halves; ++h) {
      const int r0 = h * 4, rn = halves == 1 ? R : (h == 0 ? 4 : R - 4);
      // Only the first group of x rows prefetches: the others find the tile in L1.
      if (s0 == 0 && prefetch)
        group_dot<true>(sg, rows + r0, rn, K, xs, ldx, part);
      else
        group_dot<false>(sg, rows + r0, rn, K, xs, ldx, part);
      for (int s = 0; s < sg; ++s)
        for (int r = 0; r < rn; ++r) y[(s0 + s) * R + r0 + r] = part[s * rn + r];
    }
  }
}

// With many x rows the dot-product tiles above run out of registers to reuse loads
// (4 x 4 accumulators per 8 loads, plus a horizontal sum per output), so from kBcastRows
// rows on x is kept by column and a tile broadcasts one weight at a time against 2
// vectors of x rows: 2 x kBcastTileRows accumulators per 2 loads and kBcastTileRows
// broadcasts, no horizontal sums. AVX-512 (32 registers): 32 x rows against 8 weight
// rows. AVX2 (16 registers): 16 x rows against 4 weight rows, the tile's other 4 rows
// in a second pass from L1 (8 accumulators + 2 x vectors + a broadcast). Without either
// (4-lane vectors) the dot tiles do everything.
constexpr int kBcastRows = VW == 16 ? 16 : VW == 8 ? 5 : kMaxRows + 1;
constexpr int kBcastTileRows = VW == 16 ? kTileRows : 4;

// y[r * ldy + s] = dot(x[s], rows[r]) for s < NV * VW, r < R; x by column, xT[k * ldx + s].
template <int NV, int R, bool kPrefetch>
inline void tile_bc(const float* const* rows, int64_t K, const float* xT, int64_t ldx, float* y, int64_t ldy) {
  vf acc[NV][R];
  for (int v = 0; v < NV; ++v)
    for (int r = 0; r < R; ++r) acc[v][r] = vf{};
  for (int64_t k = 0; k < K; ++k) {
    vf xv[NV];
    for (int v = 0; v < NV; ++v) xv[v] = load(xT + k * ldx + v * VW);
    for (int r = 0; r < R; ++r) {
      const vf w = splat(rows[r][k]);
      for (int v = 0; v < NV; ++v) acc[v][r] += w * xv[v];
    }
    if (kPrefetch && k % kFloatsPerLine == 0)
      for (int r = 0; r < R; ++r) __builtin_prefetch(rows[r] + kPrefetchRows * K + k, 0, 2);
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store(y + r * ldy + v * VW, acc[v][r]);
}

template <int NV, bool kPrefetch>
inline void tile_bc_r(const float* const* rows, int R, int64_t K, const float* xT, int64_t ldx, float* y,
                      int64_t ldy) {
  switch (R) {
    case 1: return tile_bc<NV, 1, kPrefetch>(rows, K, xT, ldx, y, ldy);
    case 2: return tile_bc<NV, 2, kPrefetch>(rows, K, xT, ldx, y, ldy);
    case 3: return tile_bc<NV, 3, kPrefetch>(rows, K, xT, ldx, y, ldy);
  }
  if constexpr (kBcastTileRows > 4) {   // wider tiles only where their accumulators fit
    switch (R) {
      case 4: return tile_bc<NV, 4, kPrefetch>(rows, K, xT, ldx, y, ldy);
      case 5: return tile_bc<NV, 5, kPrefetch>(rows, K, xT, ldx, y, ldy);
      case 6: return tile_bc<NV, 6, kPrefetch>(rows, K, xT, ldx, y, ldy);
      case 7: return tile_bc<NV, 7, kPrefetch>(rows, K, xT, ldx, y, ldy);
      default: return tile_bc<NV, 8, kPrefetch>(rows, K, xT, ldx, y, ldy);
    }
  } else {
    return tile_bc<NV, 4, kPrefetch>(rows, K, xT, ldx, y, ldy);
  }
}

// y[r * ld + s] for every x row (x by column, ld = the padded row count) against R weight
// rows: 2 * VW x rows and kBcastTileRows weight rows per pass, the weights of passes after
// the first from L1.
void block_bc(const float* const* rows, int R, int64_t K, const float* xT, int64_t ld, bool prefetch, float* y) {
  for (int r0 = 0; r0 < R; r0 += kBcastTileRows) {
    const int rn = std::min(kBcastTileRows, R - r0);
    const float* const* rs = rows + r0;
    float* yr = y + r0 * ld;
    for (int64_t s0 = 0; s0 < ld; s0 += 2 * VW) {
      const bool two = ld - s0 > VW;
      if (s0 == 0 && prefetch)
        two ? tile_bc_r<2, true>(rs, rn, K, xT, ld, yr, ld) : tile_bc_r<1, true>(rs, rn, K, xT, ld, yr, ld);
      else
        two ? tile_bc_r<2, false>(rs, rn, K, xT + s0, ld, yr + s0, ld)
            : tile_bc_r<1, false>(rs, rn, K, xT + s0, ld, yr + s0, ld);
    }
  }
}

// A GEMV's input x[s, k] (s < S rows, k < K), by row p[s * ld + k] (dot tiles) or, from
// kBcastRows rows on, by column p[k * ld + s] (broadcast tiles; ld = S rounded up to VW,
// the padding rows zero).
struct QuantRows;

struct Operand {
  float* p;
  int64_t ld;
  bool by_col;
  const QuantRows* q16 = nullptr;  // x quantized (int16 activations), or none: read p

  // q16: x will be quantized (by row) for the int16 tiles, which take every S they serve.
  static Operand make(float* p, int64_t K, int S, bool q16 = false) {
    const bool by_col = S >= kBcastRows && !q16;
    return {p, by_col ? ceil_div(S, VW) * VW : K, by_col};
  }
  float& at(int64_t s, int64_t k) const { return by_col ? p[k * ld + s] : p[s * ld + k]; }
};

// A tile's outputs y(s, r), laid out by the kind of tile that computed them.
struct TileOut {
  const float* y;
  int64_t ys, yr;
  float operator()(int s, int r) const { return y[s * ys + r * yr]; }
};

// The R weight rows' dot products with every row of x, by whichever tile x's layout
// calls for; y has room for kMaxRows * kTileRows outputs. prefetch: the rows are in DRAM
// and the next tiles' rows lie kPrefetchRows * K floats after them (fp32 weights), not
// freshly dequantized into a scratch buffer.
inline TileOut tile_dot(const float* const* rows, int R, int64_t K, const Operand& x, int S, bool prefetch,
                        float* y) {
  if (x.by_col) {
    block_bc(rows, R, K, x.p, x.ld, prefetch, y);
    return {y, 1, x.ld};
  }
  block_dot(rows, R, K, x.p, x.ld, S, prefetch, y);
  return {y, R, 1};
}

// Steps of up to this many rows (x by row) dequantize a block's weights in registers, right
// into the tile's FMAs, instead of through the scratch buffer: no store and reload per
// weight. The FMAs are tile()'s, in tile()'s order (k ascending per accumulator, then
// hsum), so the outputs are still bit for bit those of the fp32 rows. 1-2 x rows take 4
// weight rows a pass, 3-4 take 2 (S x R accumulators beside the 4 weight vectors in
// AVX2's 16 registers). With 8 lanes only (AVX-512 builds take the scratch path).
#if defined(__AVX2__) && !defined(__AVX512F__)
constexpr int kMaxRegTileRows = 4;

// y[s * R + r] = dot(x[s], row r) for the R <= 4 rows whose blocks start at q[r].
template <int S, int R, int kType>
inline void tile_q(const uint8_t* const* q, int64_t num_blocks, const float* x, int64_t ldx, float* y) {
  constexpr int64_t bb = block_bytes(kType);
  vf acc[S][R];
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < R; ++r) acc[s][r] = vf{};
  for (int64_t b = 0; b < num_blocks; ++b) {
    const float* xb = x + b * kBlockWeights;
    for (int r = 0; r < R; ++r) {
      __m256 w[4];
      dequant_regs<kType>(q[r] + b * bb, w);
      for (int i = 0; i < 4; ++i)
        for (int s = 0; s < S; ++s) acc[s][r] += static_cast<vf>(w[i]) * load(xb + s * ldx + VW * i);
    }
  }
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < R; ++r) y[s * R + r] = hsum(acc[s][r]);
}

template <int S, int kType>
inline void tile_q_r(const uint8_t* const* q, int R, int64_t num_blocks, const float* x, int64_t ldx, float* y) {
  switch (R) {
    case 1: return tile_q<S, 1, kType>(q, num_blocks, x, ldx, y);
    case 2: return tile_q<S, 2, kType>(q, num_blocks, x, ldx, y);
    case 3: return tile_q<S, 3, kType>(q, num_blocks, x, ldx, y);
    default: return tile_q<S, 4, kType>(q, num_blocks, x, ldx, y);
  }
}

template <int kType>
inline void tile_q_sr(const uint8_t* const* q, int S, int R, int64_t num_blocks, const float* x, int64_t ldx,
                      float* y) {
  switch (S) {
    case 1: return tile_q_r<1, kType>(q, R, num_blocks, x, ldx, y);
    case 2: return tile_q_r<2, kType>(q, R, num_blocks, x, ldx, y);
    case 3: return R == 1 ? tile_q<3, 1, kType>(q, num_blocks, x, ldx, y) : tile_q<3, 2, kType>(q, num_blocks, x, ldx, y);
    default: return R == 1 ? tile_q<4, 1, kType>(q, num_blocks, x, ldx, y) : tile_q<4, 2, kType>(q, num_blocks, x, ldx, y);
  }
}

// ---------------------------------------------------------------- int16 activations
//
// With int16 activations (DecodeStack::set_int16_activations; the worker's
// --cpu-activations int16, its default) a step of up to kMaxQ16Rows rows quantizes each
// GEMV input row per 32-value block, once per phase and thread (quantize_rows):
//
//   x[j] ~ d q[j], q[j] = round(x[j] / d) in [-32767, 32767], d = max|x| / 32767; sum = d sum_j q[j]
//
// and a weight block's dot product with it runs in integers (tile_q16): the 32 weights
// widen to int16 (4-bit q, Q4_0's less 8, or Q8_0's int8), two vpmaddwd multiply them with
// x's 32 int16 and add pairs into 8 int32 lanes (at most 4 * 128 * 32767 < 2^24 each, so
// the conversion to fp32 is exact), and one FMA by d_w * d_x folds the block into the
// fp32 accumulator:
//
//   Q4_0  sum_j d (q_j - 8) x_j ~ d d_x sum_j (q_j - 8) qx_j
//   Q4_1  sum_j (d q_j + m) x_j ~ d d_x sum_j q_j qx_j + m sum   (m sum / 8 on each lane)
//   Q8_0  sum_j d q_j x_j       ~ d d_x sum_j q_j qx_j
//
// Against dequantizing the weights to fp32 (tile_q: per block and weight row two fp16
// scales and 4 x (convert, multiply, add) before the FMAs) a decode step of SmolLM2-135M
// takes ~0.7x the time at 1 row and ~0.6x at 2-4; at 5-8 rows, where the exact stack reads
// fp32 weights, it reads the blocks 4 x rows at a time, ~0.8-0.9x at 5-7
// (docs/performance.md). The price is x's rounding, 1/65534 of its block's largest value
// at most: the logits move ~2e-4 of their range from the fp32 stack's instead of not at
// all, and the greedy tokens of the parity prompts stay transformers'
// (tests/test_cpu_decode.py and test_model_parity.py check both). int8 (llama.cpp's Q8_1,
// vpmaddubsw) measured ~5% faster and moved the logits ~5%, enough to change greedy tokens
// within 20-25 of 32. --cpu-activations float32 keeps the exact path.
struct QuantRows {
  int16_t* q;   // [S, K]
  float* d;     // [S, K / 32]
  float* sum;   // [S, K / 32]: d * sum(q) of the block
  int64_t K = 0, nb = 0;  // of the last quantize_rows
};

// Storage for one QuantRows of up to S rows of up to K values.
struct QuantBuf {
  std::vector<int16_t> q;
  std::vector<float> d, sum;
  QuantRows rows;
  QuantBuf(int S, int64_t K)
      : q(static_cast<size_t>(S) * K), d(static_cast<size_t>(S) * (K / kBlockWeights)), sum(d.size()),
        rows{q.data(), d.data(), sum.data()} {}
};

// Rows x[s * ldx .. + K) for s < S into out (K a multiple of 32).
inline void quantize_rows(const float* x, int64_t ldx, int S, int64_t K, QuantRows& out) {
  const int64_t nb = K / kBlockWeights;
  out.K = K;
  out.nb = nb;
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int s = 0; s < S; ++s)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + s * ldx + b * kBlockWeights;
      __m256 v[4];
      for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(xb + 8 * i);
      __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                  _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float m = _mm_cvtss_f32(m4);
      const float d = m / 32767.f;
      const __m256 id = _mm256_set1_ps(m > 0.f ? 32767.f / m : 0.f);
      __m256i qi[4];
      for (int i = 0; i < 4; ++i) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id));
      const __m256i total = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
      __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
      t4 = _mm_hadd_epi32(t4, t4);
      t4 = _mm_hadd_epi32(t4, t4);
      // packs interleave 128-bit lanes: (0-3, 8-11 | 4-7, 12-15) -> permute 64-bit groups
      for (int h = 0; h < 2; ++h) {
        const __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(qi[2 * h], qi[2 * h + 1]), 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q + s * K + b * kBlockWeights + 16 * h), p);
      }
      out.d[s * nb + b] = d;
      out.sum[s * nb + b] = d * static_cast<float>(_mm_cvtsi128_si32(t4));
    }
}

inline float hsum256(__m256 v) { return hsum(static_cast<vf>(v)); }

// y[s * R + r] = dot(x[s], row r) for the R weight rows whose blocks start at q[r], x
// quantized in xq.
template <int S, int R, int kType>
inline void tile_q16(const uint8_t* const* q, int64_t num_blocks, const QuantRows& xq, float* y) {
  constexpr int64_t bb = block_bytes(kType);
  const __m128i nib = _mm_set1_epi8(15);
  __m256 acc[S][R];
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < R; ++r) acc[s][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < num_blocks; ++b) {
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = q[r] + b * bb;
      __m256i w0, w1;
      __m256 dv, cv = _mm256_setzero_ps();
      if constexpr (kType == kQ8_0) {
        w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)));
        w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18)));
        dv = _mm256_set1_ps(half_to_float(blk));
      } else {
        const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (kType == kQ4_1 ? 4 : 2)));
        w0 = _mm256_cvtepu8_epi16(_mm_and_si128(qs, nib));
        w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(qs, 4), nib));
        if constexpr (kType == kQ4_1) {
          int32_t dm_bits;
          std::memcpy(&dm_bits, blk, 4);
          const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(dm_bits));
          dv = _mm256_broadcastss_ps(dm);
          cv = _mm256_mul_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(dm)), _mm256_set1_ps(0.125f));
        } else {
          const __m256i eight = _mm256_set1_epi16(8);
          w0 = _mm256_sub_epi16(w0, eight);
          w1 = _mm256_sub_epi16(w1, eight);
          dv = _mm256_set1_ps(half_to_float(blk));
        }
      }
      for (int s = 0; s < S; ++s) {
        const int64_t i = s * xq.nb + b;
        const int16_t* xs = xq.q + s * xq.K + b * kBlockWeights;
        const __m256i p = _mm256_add_epi32(
            _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs))),
            _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs + 16))));
        acc[s][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dv, _mm256_set1_ps(xq.d[i])), acc[s][r]);
        if constexpr (kType == kQ4_1) acc[s][r] = _mm256_fmadd_ps(cv, _mm256_set1_ps(xq.sum[i]), acc[s][r]);
      }
    }
  }
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < R; ++r) y[s * R + r] = hsum256(acc[s][r]);
}

// tile_q16 for the shapes reg_tile asks for: R <= 4 weight rows for S <= 2 x rows, R <= 2
// for S = 3-4 (S x R accumulators beside the 2 weight vectors in AVX2's 16 registers).
template <int kType>
inline void tile_q16_sr(const uint8_t* const* q, int S, int R, int64_t num_blocks, const QuantRows& xq, float* y) {
  auto by_r = [&](auto s_const) {
    constexpr int kS = decltype(s_const)::value;
    switch (R) {
      case 1: return tile_q16<kS, 1, kType>(q, num_blocks, xq, y);
      case 2: return tile_q16<kS, 2, kType>(q, num_blocks, xq, y);
      case 3: if constexpr (kS <= 2) return tile_q16<kS, 3, kType>(q, num_blocks, xq, y); else return;
      default: if constexpr (kS <= 2) return tile_q16<kS, 4, kType>(q, num_blocks, xq, y); else return;
    }
  };
  switch (S) {
    case 1: return by_r(std::integral_constant<int, 1>{});
    case 2: return by_r(std::integral_constant<int, 2>{});
    case 3: return by_r(std::integral_constant<int, 3>{});
    default: return by_r(std::integral_constant<int, 4>{});
  }
}

// Rows g0 .. g0 + n of a QuantRows, as one of their own.
inline QuantRows quant_rows_from(const QuantRows& x, int g0) {
  return {x.q + g0 * x.K, x.d + g0 * x.nb, x.sum + g0 * x.nb, x.K, x.nb};
}

// The rows ns[0..R) of a block matrix against S rows of x (by row), in weight-row passes
// of 4 (x rows 1-2) or 2 (3-4); y[s * R + r]. S <= kMaxRegTileRows, or with x quantized up
// to kMaxQ16Rows: 4 x rows at a time, a pass's weight rows from L1 after the first group.
inline TileOut reg_tile(const Matrix& W, const int64_t* ns, int R, int64_t K, const Operand& x, int S, float* y) {
  const uint8_t* q[kTileRows];
  for (int r = 0; r < R; ++r) {
    q[r] = W.blocks + ns[r] * W.row_bytes;
    for (int64_t i = 0; i < W.row_bytes; i += 64) __builtin_prefetch(q[r] + kPrefetchRows * W.row_bytes + i, 0, 2);
  }
  float part[kMaxRegTileRows * 4];
  const int64_t nb = K / kBlockWeights;
  const int step = S <= 2 ? 4 : 2;  // weight rows per pass: at most 4 x rows * step accumulators
  for (int r0 = 0; r0 < R; r0 += step) {
    const int rn = std::min(step, R - r0);
    for (int g0 = 0; g0 < S; g0 += kMaxRegTileRows) {
      const int gn = std::min(kMaxRegTileRows, S - g0);
      if (x.q16 != nullptr) {
        const QuantRows xg = quant_rows_from(*x.q16, g0);
        switch (W.type) {
          case kQ4_0: tile_q16_sr<kQ4_0>(q + r0, gn, rn, nb, xg, part); break;
          case kQ4_1: tile_q16_sr<kQ4_1>(q + r0, gn, rn, nb, xg, part); break;
          default: tile_q16_sr<kQ8_0>(q + r0, gn, rn, nb, xg, part); break;
        }
      } else {
        const float* xg = x.p + g0 * x.ld;
        switch (W.type) {
          case kQ4_0: tile_q_sr<kQ4_0>(q + r0, gn, rn, nb, xg, x.ld, part); break;
          case kQ4_1: tile_q_sr<kQ4_1>(q + r0, gn, rn, nb, xg, x.ld, part); break;
          default: tile_q_sr<kQ8_0>(q + r0, gn, rn, nb, xg, x.ld, part); break;
        }
      }
      for (int s = 0; s < gn; ++s)
        for (int r = 0; r < rn; ++r) y[(g0 + s) * R + r0 + r] = part[s * rn + r];
    }
  }
  return {y, R, 1};
}
#else
constexpr int kMaxRegTileRows = 0;
// No register tiles, so never quantized (DecodeStack and linear_rows check kMaxRegTileRows).
struct QuantRows {
  int64_t K = 0, nb = 0;
};
struct QuantBuf {
  QuantRows rows;
  QuantBuf(int, int64_t) {}
};
inline void quantize_rows(const float*, int64_t, int, int64_t, QuantRows&) {}
inline TileOut reg_tile(const Matrix&, const int64_t*, int R, int64_t, const Operand&, int, float* y) {
  return {y, R, 1};
}
#endif
static_assert(kBcastRows > kMaxRegTileRows, "the register tiles read x by row");

// Whether a step of S rows dequantizes W's rows into a scratch buffer (blocks, and too
// many rows for the register tiles); only then does it need one.
inline bool needs_scratch(const Matrix& W, int64_t S) { return !W.is_f32() && S > kMaxRegTileRows; }

// Rows ns[0..R) of W against every row of x: in registers (blocks, few rows), else
// through tile_dot on the rows as floats (dequantized into scratch where W has blocks).
// x is by row whenever S <= kMaxRegTileRows (kBcastRows is larger).
inline TileOut matrix_tile(const Matrix& W, const int64_t* ns, int R, int64_t K, const Operand& x, int S,
                           float* scratch, float* y) {
  if (!W.is_f32() && (x.q16 != nullptr || !needs_scratch(W, S))) return reg_tile(W, ns, R, K, x, S, y);
  const float* rows[kTileRows];
  for (int r = 0; r < R; ++r) rows[r] = W.row(ns[r], K, scratch + r * K);
  return tile_dot(rows, R, K, x, S, W.is_f32(), y);
}

// y = x @ W^T for W [N, K], tiles [t0, t1) of kTileRows rows each; epi(n0, R, TileOut)
// runs while the tile's outputs are in L1. scratch: kTileRows * K floats of this thread's
// (where W's rows are dequantized).
template <typename Epi>
void gemv_tiles(const Matrix& W, int64_t N, int64_t K, const Operand& x, int S, int64_t t0, int64_t t1,
                float* scratch, Epi&& epi) {
  float y[kMaxRows * kTileRows];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * kTileRows;
    const int R = static_cast<int>(std::min<int64_t>(kTileRows, N - n0));
    int64_t ns[kTileRows];
    for (int r = 0; r < R; ++r) ns[r] = n0 + r;
    epi(n0, R, matrix_tile(W, ns, R, K, x, S, scratch, y));
  }
}

// A chunk: the tiles one claim takes, about kChunkBytes of weights. Small enough that a
// thread left without work waits little; large enough that the claim is free.
constexpr int64_t kChunkBytes = 48 * 1024;

inline int64_t tiles_per_chunk(int64_t K) {
  return std::max<int64_t>(1, kChunkBytes / (kTileRows * K * static_cast<int64_t>(sizeof(float))));
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// How the threads of the parallel region share the work of a sequence of phases.
//
// Each phase has num_chunks chunks, cut into one contiguous range per thread. A thread
// claims the chunks of its own range front to back, then those left in the others'
// ranges, and a chunk may run only once every chunk of the phase before it is done.
// With equal threads this is a static split (each streams its own stretch of every
// weight matrix) at the cost of two uncontended atomics per chunk. With a thread the OS
// has descheduled, which on a small shared machine is routine, the others take its
// unclaimed chunks instead of waiting at a barrier for it: the step waits at most for
// the one chunk it holds.
class PhaseBoard {
 public:
  PhaseBoard(int num_phases, int num_ranges)
      : ranges_(num_ranges), claimed_(new Counter[num_phases * num_ranges]),
        done_(new Counter[num_phases * num_ranges]) {}

  // The next chunk of phase p for thread tid, or -1 when all are claimed. *range is the
  // range it came from (finish() needs it).
  int64_t claim(int p, int64_t num_chunks, int tid, int* range) {
    for (int k = 0; k < ranges_; ++k) {
      const int r = (tid + k) % ranges_;
      const int64_t lo = num_chunks * r / ranges_, len = num_chunks * (r + 1) / ranges_ - lo;
      std::atomic<int64_t>& next = claimed_[p * ranges_ + r].n;
      if (next.load(std::memory_order_relaxed) >= len) continue;  // dry: don't write its line
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i < len) {
        *range = r;
        return lo + i;
      }
    }
    return -1;
  }

  // The chunk's writes become visible to whoever waits for phase p.
  void finish(int p, int range) { done_[p * ranges_ + range].n.fetch_add(1, std::memory_order_release); }

  void wait(int p, int64_t num_chunks) const {
    for (int spins = 0;; ++spins) {
      int64_t n = 0;
      for (int r = 0; r < ranges_; ++r) n += done_[p * ranges_ + r].n.load(std::memory_order_acquire);
      if (n == num_chunks) return;
      // The chunk we wait for is a few microseconds of work, unless its thread was
      // descheduled: then give our core to it.
      if (spins < 2000)
        cpu_relax();
      else
        std::this_thread::yield();
    }
  }

 private:
  struct alignas(64) Counter {  // one cache line each: threads write their own
    std::atomic<int64_t> n{0};
  };
  int ranges_;
  std::unique_ptr<Counter[]> claimed_, done_;
};

// Runs every chunk of every phase that this thread claims: run_chunk(p, chunk) after
// enter(p), which runs once per phase and thread, after the phase before p is done.
template <typename NumChunks, typename Enter, typename RunChunk>
void work_phases(PhaseBoard& board, int num_phases, int tid, NumChunks&& num_chunks, Enter&& enter,
                 RunChunk&& run_chunk) {
  for (int p = 0; p < num_phases; ++p) {
    const int64_t n = num_chunks(p);
    bool entered = false;
    int range = 0;
    for (int64_t c; (c = board.claim(p, n, tid, &range)) >= 0;) {
      if (!entered) {
        if (p > 0) board.wait(p - 1, num_chunks(p - 1));
        enter(p);
        entered = true;
      }
      run_chunk(p, c);
      board.finish(p, range);
    }
  }
}

inline float silu(float a) { return a / (1.f + std::exp(-a)); }

typedef int32_t vi __attribute__((vector_size(VW * 4)));

// exp(x), lanewise, within ~2 ulp of expf: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in
// two so that n ln2 is exact), exp(r) by its Taylor series to r^7 (truncation < 1e-8
// relative), times 2^n built in the exponent bits. x is clamped to [-87, 88], where 2^n
// stays a normal float.
inline vf vexp(vf x) {
  x = x < splat(-87.f) ? splat(-87.f) : x;
  x = x > splat(88.f) ? splat(88.f) : x;
  const vf round_bias = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf nf = (x * splat(1.44269504088896341f) + round_bias) - round_bias;
  const vf r = (x - nf * splat(0.693359375f)) + nf * splat(2.12194440e-4f);
  static constexpr float kTaylor[] = {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f};
  vf e = splat(1.f / 5040.f);
  for (float c : kTaylor) e = e * r + splat(c);
  const vi pow2 = (__builtin_convertvector(nf, vi) + 127) << 23;
  return e * (vf)pow2;  // a GCC vector cast: the same bits, read as floats
}

// p[i] = exp(p[i] - m) for i < n; returns their sum (the softmax denominator).
inline float exp_minus_max(float* p, int64_t n, float m) {
  vf sum{};
  int64_t i = 0;
  for (; i + VW <= n; i += VW) {
    const vf e = vexp(load(p + i) - splat(m));
    store(p + i, e);
    sum += e;
  }
  float total = hsum(sum);
  for (; i < n; ++i) total += (p[i] = std::exp(p[i] - m));
  return total;
}

// ---------------------------------------------------------------- row ops

// Attention reads K/V rows slot by slot through the block table, a pattern no hardware
// prefetcher follows across blocks: ask for the row kSlotsAhead slots on.
constexpr int64_t kSlotsAhead = 8;

inline void prefetch_row(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; i += kFloatsPerLine) __builtin_prefetch(p + i, 0, 3);
}

// out = (x * rsqrt(mean(x^2) + eps)) * w, as llama.py's rms_norm.
void rms_norm(const float* x, const float* w, int64_t n, float eps, float* out) {
  const float r = 1.f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
  int64_t k = 0;
  for (; k + VW <= n; k += VW) store(out + k, load(x + k) * splat(r) * load(w + k));
  for (; k < n; ++k) out[k] = x[k] * r * w[k];
}

// Row s of operand out = rms_norm(x) * w.
void rms_norm_into(const float* x, const float* w, int64_t n, float eps, const Operand& out, int64_t s) {
  if (!out.by_col) return rms_norm(x, w, n, eps, out.p + s * out.ld);
  const float r = 1.f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
  for (int64_t k = 0; k < n; ++k) out.p[k * out.ld + s] = x[k] * r * w[k];
}

// (a, b) *= (cos, sin) as one complex multiply: interleaved pairs, as llama.py's apply_rope.
inline void rotate(float* pair, const float* cs) {
  const float a = pair[0], b = pair[1];
  pair[0] = a * cs[0] - b * cs[1];
  pair[1] = a * cs[1] + b * cs[0];
}

struct Step {
  int S;
  const int64_t* positions;     // [S]
  const int64_t* slot_mapping;  // [S]
  const int64_t* blocks;        // [S, nb]
  const bool* mask;             // [S, nb * B] or nullptr: every slot of every block is the row's
  int64_t nb;
};

}  // namespace

// ---------------------------------------------------------------- the stack

class DecodeStack {
 public:
  // embed [V, hidden]; rope [P, D/2, (cos, sin)]; per layer: norms [hidden], qkv
  // [(H + 2 Hkv) D, hidden] (q and k rows in interleaved RoPE pairs), o [hidden, H D],
  // gate_up [2 I, hidden], down [hidden, I]; k_cache, v_cache [L, slots, Hkv, D]. All
  // fp32, all referenced, not copied.
  DecodeStack(Tensor embed, Tensor rope, Tensor final_norm, std::vector<Tensor> input_norms,
              std::vector<Tensor> qkv, std::vector<Tensor> o, std::vector<Tensor> post_norms,
              std::vector<Tensor> gate_up, std::vector<Tensor> down, Tensor k_cache, Tensor v_cache,
              int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size, double eps)
      : embed_(embed), rope_(rope), final_norm_(final_norm), input_norms_(input_norms), qkv_(qkv), o_(o),
        post_norms_(post_norms), gate_up_(gate_up), down_(down), k_cache_(k_cache), v_cache_(v_cache),
        L_(static_cast<int64_t>(qkv.size())), H_(num_heads), Hkv_(num_kv_heads), D_(head_dim),
        B_(block_size), eps_(static_cast<float>(eps)) {
    hidden_ = embed.size(1);
    I_ = down.empty() ? 0 : down[0].size(1);
    TORCH_CHECK(L_ > 0, "no layers");
    TORCH_CHECK(D_ % 2 == 0, "head_dim must be even (RoPE pairs)");
    TORCH_CHECK(H_ % Hkv_ == 0, "num_heads must be a multiple of num_kv_heads");
    check_f32(embed, {-1, hidden_}, "embed");
    check_f32(rope, {-1, D_ / 2, 2}, "rope");
    check_f32(final_norm, {hidden_}, "final_norm");
    const int64_t nqkv = (H_ + 2 * Hkv_) * D_;
    for (auto* v : {&input_norms_, &o_, &post_norms_, &gate_up_, &down_})
      TORCH_CHECK(static_cast<int64_t>(v->size()) == L_, "every weight list needs one tensor per layer");
    for (int64_t l = 0; l < L_; ++l) {
      check_f32(input_norms_[l], {hidden_}, "input_norm");
      check_f32(post_norms_[l], {hidden_}, "post_norm");
      check_f32(qkv_[l], {nqkv, hidden_}, "qkv");
      check_f32(o_[l], {hidden_, H_ * D_}, "o");
      check_f32(gate_up_[l], {2 * I_, hidden_}, "gate_up");
      check_f32(down_[l], {hidden_, I_}, "down");
    }
    check_f32(k_cache, {L_, -1, Hkv_, D_}, "k_cache");
    check_f32(v_cache, {L_, k_cache.size(1), Hkv_, D_}, "v_cache");
    TORCH_CHECK(k_cache.size(1) % B_ == 0, "pool slots must be whole blocks");
    for (int64_t l = 0; l < L_; ++l)
      layers_.push_back({input_norms_[l].data_ptr<float>(), {qkv_[l].data_ptr<float>()}, {o_[l].data_ptr<float>()},
                         post_norms_[l].data_ptr<float>(), {gate_up_[l].data_ptr<float>()},
                         {down_[l].data_ptr<float>()}});
  }

  // From now on read layer l's matrix `which` (qkv, o, gate_up, down) as GGUF blocks of
  // ggml type `type`: blocks [N, K / 32 * block bytes] uint8, its rows the fp32 matrix's
  // rows in the same order. Every row is dequantized and compared with the fp32 row first:
  // blocks that are not exactly these weights (a wrong row order, another file) are refused.
  void set_blocks(int64_t l, const std::string& which, Tensor blocks, int64_t type) {
    TORCH_CHECK(l >= 0 && l < L_, "layer ", l, " is outside [0, ", L_, ")");
    LayerWeights& w = layers_[l];
    Matrix* m = which == "qkv" ? &w.qkv : which == "o" ? &w.o : which == "gate_up" ? &w.gate_up
                : which == "down" ? &w.down : nullptr;
    TORCH_CHECK(m != nullptr, "which must be qkv, o, gate_up or down, got '", which, "'");
    const Tensor& f32 = which == "qkv" ? qkv_[l] : which == "o" ? o_[l] : which == "gate_up" ? gate_up_[l] : down_[l];
    *m = checked_blocks(f32, blocks, type, which + " of layer " + std::to_string(l));
    kept_blocks_.push_back(blocks);
  }

  // Steps of up to kMaxQ16Rows rows quantize the inputs of the matrices read as blocks
  // to int16 (see "int16 activations"); off: those steps give the fp32 stack's outputs bit
  // for bit. Only AVX2 builds have these tiles: elsewhere a no-op (int16_activations() says).
  void set_int16_activations(bool on) { int16_ = on && kMaxRegTileRows > 0; }
  bool int16_activations() const { return int16_; }

  // How many of the 4 L matrices are read as blocks.
  int64_t num_block_matrices() const {
    int64_t n = 0;
    for (const LayerWeights& w : layers_)
      for (const Matrix* m : {&w.qkv, &w.o, &w.gate_up, &w.down}) n += !m->is_f32();
    return n;
  }

  // input_ids, positions, slot_mapping [S] int64; blocks [S, nb] int64; mask [S, nb * B]
  // bool or None -> final hidden states [S, hidden] (after the last norm).
  Tensor forward(Tensor input_ids, Tensor positions, Tensor slot_mapping, Tensor blocks,
                 c10::optional<Tensor> mask) {
    const int64_t S = input_ids.size(0);
    TORCH_CHECK(S >= 1 && S <= kMaxRows, "input_ids must hold 1 to ", kMaxRows, " rows, got ", S);
    check_i64(input_ids, S, "input_ids");
    check_i64(positions, S, "positions");
    check_i64(slot_mapping, S, "slot_mapping");
    TORCH_CHECK(blocks.dim() == 2 && blocks.size(0) == S && blocks.size(1) > 0 &&
                    blocks.scalar_type() == at::kLong && blocks.is_contiguous(),
                "blocks must be a contiguous int64 [S, nb] tensor");
    const int64_t nb = blocks.size(1);
    const bool* mask_ptr = nullptr;
    if (mask.has_value() && mask->defined()) {
      TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->numel() == S * nb * B_,
                  "mask must be a contiguous bool tensor of S * nb * block_size elements");
      mask_ptr = mask->data_ptr<bool>();
    }
    // Every index is checked here, before the parallel region, which must not throw.
    const int64_t vocab = embed_.size(0), num_positions = rope_.size(0);
    const int64_t num_blocks = k_cache_.size(1) / B_, num_slots = k_cache_.size(1);
    check_range(input_ids, vocab, "input_ids");
    check_range(positions, num_positions, "positions");
    check_range(slot_mapping, num_slots, "slot_mapping");
    check_range(blocks, num_blocks, "blocks");

    auto x = at::empty({S, hidden_}, embed_.options());
    const int64_t* ids = input_ids.data_ptr<int64_t>();
    for (int64_t s = 0; s < S; ++s)
      std::memcpy(x.data_ptr<float>() + s * hidden_, embed_.data_ptr<float>() + ids[s] * hidden_,
                  hidden_ * sizeof(float));
    auto out = at::empty_like(x);
    Step step{static_cast<int>(S), positions.data_ptr<int64_t>(), slot_mapping.data_ptr<int64_t>(),
              blocks.data_ptr<int64_t>(), mask_ptr, nb};
    {
      pybind11::gil_scoped_release no_gil;
      run(step, x.data_ptr<float>(), out.data_ptr<float>());
    }
    return out;
  }

 private:
  enum Phase { kQkv, kAttn, kO, kMlp, kDown, kPhasesPerLayer };

  void run(const Step& st, float* x, float* out) {
    const int S = st.S;
    const int nt = std::max(1, std::min<int>(at::get_num_threads(), 64));
    const int64_t q_size = H_ * D_, kv_size = Hkv_ * D_, nqkv = q_size + 2 * kv_size;
    constexpr int kHalf = kTileRows / 2;  // an mlp tile: kHalf gate rows, then the kHalf up rows
    // GEMV inputs (h, attn, act) by row or by column (Operand), zero-filled so that the
    // padding rows of the column layout are zero.
    const int64_t rows_pad = ceil_div(S, VW) * VW;
    std::vector<float> q(S * q_size), attn(rows_pad * q_size), act(rows_pad * I_);
    std::vector<float> h(static_cast<size_t>(nt) * rows_pad * hidden_);
    std::vector<float> scores(static_cast<size_t>(nt) * st.nb * B_), head_out(static_cast<size_t>(nt) * D_);
    std::vector<int64_t> slots(static_cast<size_t>(nt) * st.nb * B_);
    // Each thread quantizes a GEMV phase's input for itself as it enters the phase (one
    // buffer, reused by each phase in turn: a thread never goes back to a phase).
    bool any_blocks = false;
    for (const LayerWeights& w : layers_)
      for (const Matrix* m : {&w.qkv, &w.o, &w.gate_up, &w.down}) any_blocks |= !m->is_f32();
    const bool q16 = int16_ && any_blocks && S <= kMaxQ16Rows;
    const Operand attn_in = Operand::make(attn.data(), q_size, S, q16), act_in = Operand::make(act.data(), I_, S, q16);

    // Chunks per phase; a GEMV chunk is `tpc` tiles.
    const int64_t tpc_h = tiles_per_chunk(hidden_), tpc_q = tiles_per_chunk(q_size), tpc_i = tiles_per_chunk(I_);
    const int64_t chunks[kPhasesPerLayer] = {
        ceil_div(ceil_div(nqkv, kTileRows), tpc_h), S * Hkv_, ceil_div(ceil_div(hidden_, kTileRows), tpc_q),
        ceil_div(ceil_div(I_, kHalf), tpc_h), ceil_div(ceil_div(hidden_, kTileRows), tpc_i)};
    const int num_phases = static_cast<int>(L_ * kPhasesPerLayer + 1);  // + the final norm
    auto num_chunks = [&](int p) { return p == num_phases - 1 ? int64_t{S} : chunks[p % kPhasesPerLayer]; };
    PhaseBoard board(num_phases, nt);
    std::vector<LayerWeights> weights;  // the matrices as this step reads them (blocks or fp32)
    bool any_scratch = false;
    for (const LayerWeights& w : layers_) {
      weights.push_back({w.input_norm, w.qkv.for_rows(S, q16), w.o.for_rows(S, q16), w.post_norm,
                         w.gate_up.for_rows(S, q16), w.down.for_rows(S, q16)});
      for (const Matrix* m : {&weights.back().qkv, &weights.back().o, &weights.back().gate_up, &weights.back().down}) {
        any_scratch |= needs_scratch(*m, S) && !q16;
      }
    }
    // A tile's weight rows dequantized (GGUF blocks, scratch path), per thread.
    const int64_t max_k = std::max({hidden_, q_size, I_});
    std::vector<float> scratch(any_scratch ? static_cast<size_t>(nt) * kTileRows * max_k : 0);

#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num();
      const Operand h_in = Operand::make(h.data() + static_cast<size_t>(tid) * rows_pad * hidden_, hidden_, S, q16);
      float* my_scores = scores.data() + static_cast<size_t>(tid) * st.nb * B_;
      float* my_head_out = head_out.data() + static_cast<size_t>(tid) * D_;
      int64_t* my_slots = slots.data() + static_cast<size_t>(tid) * st.nb * B_;
      float* my_scratch = any_scratch ? scratch.data() + static_cast<size_t>(tid) * kTileRows * max_k : nullptr;
      const float* rope = rope_.data_ptr<float>();
      QuantBuf my_q(q16 ? S : 0, q16 ? max_k : 0);
      // The GEMV inputs as this thread reads them: with its quantized copy when q16.
      Operand h_x = h_in, attn_x = attn_in, act_x = act_in;
      if (q16) h_x.q16 = attn_x.q16 = act_x.q16 = &my_q.rows;

      auto enter = [&](int p) {
        if (p == num_phases - 1) return;
        const LayerWeights& w = weights[p / kPhasesPerLayer];
        const int phase = p % kPhasesPerLayer;
        if (phase == kQkv || phase == kMlp) {
          for (int s = 0; s < S; ++s)
            rms_norm_into(x + s * hidden_, phase == kQkv ? w.input_norm : w.post_norm, hidden_, eps_, h_in, s);
          if (q16) quantize_rows(h_in.p, h_in.ld, S, hidden_, my_q.rows);
        } else if (q16 && phase == kO) {
          quantize_rows(attn_in.p, attn_in.ld, S, q_size, my_q.rows);
        } else if (q16 && phase == kDown) {
          quantize_rows(act_in.p, act_in.ld, S, I_, my_q.rows);
        }
      };

      auto run_chunk = [&](int p, int64_t c) {
        if (p == num_phases - 1) {
          rms_norm(x + c * hidden_, final_norm_.data_ptr<float>(), hidden_, eps_, out + c * hidden_);
          return;
        }
        const int64_t l = p / kPhasesPerLayer;
        const LayerWeights& w = weights[l];
        float* kc = k_cache_.data_ptr<float>() + l * k_cache_.stride(0);
        float* vc = v_cache_.data_ptr<float>() + l * v_cache_.stride(0);
        switch (p % kPhasesPerLayer) {
          case kQkv:
            gemv_tiles(w.qkv, nqkv, hidden_, h_x, S, c * tpc_h, std::min(ceil_div(nqkv, kTileRows), (c + 1) * tpc_h),
                       my_scratch, [&](int64_t n0, int R, const TileOut& y) {
                         for (int s = 0; s < S; ++s) {
                           const float* cs = rope + st.positions[s] * D_;  // [D/2, 2]
                           const int64_t slot = st.slot_mapping[s];
                           for (int r = 0; r < R; r += 2) {
                             const int64_t n = n0 + r;
                             // A tile starts on an even row and segments on multiples of D,
                             // so a RoPE pair (2i, 2i+1) never straddles tiles or segments.
                             float pair[2] = {y(s, r), R > r + 1 ? y(s, r + 1) : 0.f};
                             const int npair = R > r + 1 ? 2 : 1;
                             if (n < q_size + kv_size) rotate(pair, cs + (n % D_));
                             float* dst = n < q_size             ? q.data() + s * q_size + n
                                          : n < q_size + kv_size ? kc + slot * kv_size + (n - q_size)
                                                                 : vc + slot * kv_size + (n - q_size - kv_size);
                             for (int j = 0; j < npair; ++j) dst[j] = pair[j];
                           }
                         }
                       });
            return;
          case kAttn:
            attend(st, c / Hkv_, c % Hkv_, q.data(), kc, vc, attn_in, my_scores, my_slots, my_head_out);
            return;
          case kO:
            gemv_tiles(w.o, hidden_, q_size, attn_x, S, c * tpc_q,
                       std::min(ceil_div(hidden_, kTileRows), (c + 1) * tpc_q), my_scratch,
                       [&](int64_t n0, int R, const TileOut& y) {
                         for (int s = 0; s < S; ++s)
                           for (int r = 0; r < R; ++r) x[s * hidden_ + n0 + r] += y(s, r);
                       });
            return;
          case kMlp:
            mlp_tiles(w.gate_up, h_x, S, c * tpc_h, std::min(ceil_div(I_, kHalf), (c + 1) * tpc_h), act_in,
                      my_scratch);
            return;
          case kDown:
            gemv_tiles(w.down, hidden_, I_, act_x, S, c * tpc_i, std::min(ceil_div(hidden_, kTileRows), (c + 1) * tpc_i),
                       my_scratch, [&](int64_t n0, int R, const TileOut& y) {
                         for (int s = 0; s < S; ++s)
                           for (int r = 0; r < R; ++r) x[s * hidden_ + n0 + r] += y(s, r);
                       });
            return;
        }
      };

      work_phases(board, num_phases, tid, num_chunks, enter, run_chunk);
    }
  }

  // act[:, c0 : c0 + kHalf] = silu(h @ Wgate^T) * (h @ Wup^T) for mlp tiles [t0, t1): a tile
  // holds gate rows c0.. and up rows c0.. (gate_up is [gate; up], each [I, hidden]).
  void mlp_tiles(const Matrix& gu, const Operand& h, int S, int64_t t0, int64_t t1, const Operand& act,
                 float* scratch) const {
    constexpr int kHalf = kTileRows / 2;
    float buf[kMaxRows * kTileRows];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c0 = t * kHalf;
      const int half = static_cast<int>(std::min<int64_t>(kHalf, I_ - c0));
      int64_t ns[kTileRows];
      for (int r = 0; r < half; ++r) {
        ns[r] = c0 + r;
        ns[half + r] = I_ + c0 + r;
      }
      const TileOut y = matrix_tile(gu, ns, 2 * half, hidden_, h, S, scratch, buf);
      for (int s = 0; s < S; ++s)
        for (int r = 0; r < half; ++r) act.at(s, c0 + r) = silu(y(s, r)) * y(s, half + r);
    }
  }

  // attn[s, h] = softmax(q[s, h] . k / sqrt(D)) v over the slots row s owns in its blocks,
  // for the G query heads h of KV head g at once: one pass over the row's blocks finds its
  // slots, and each K/V row comes from DRAM once for all G heads (then from L1).
  void attend(const Step& st, int64_t s, int64_t g, const float* q, const float* kc, const float* vc,
              const Operand& attn, float* scores, int64_t* slots, float* head_out) const {
    const int64_t G = H_ / Hkv_, kv_size = Hkv_ * D_;
    const float scale = 1.f / std::sqrt(static_cast<float>(D_));
    const int64_t* row_blocks = st.blocks + s * st.nb;
    const bool* row_mask = st.mask ? st.mask + s * st.nb * B_ : nullptr;
    int64_t n = 0;
    for (int64_t j = 0; j < st.nb; ++j)
      for (int64_t o = 0; o < B_; ++o)
        if (!row_mask || row_mask[j * B_ + o]) slots[n++] = row_blocks[j] * B_ + o;  // else never read
    const float* k0 = kc + g * D_;
    const float* v0 = vc + g * D_;
    for (int64_t h = g * G; h < (g + 1) * G; ++h) {
      const float* qh = q + (s * H_ + h) * D_;
      const bool first = h == g * G;  // the pass that brings K and V in from DRAM
      float m = -INFINITY;
      for (int64_t i = 0; i < n; ++i) {
        if (first && i + kSlotsAhead < n) prefetch_row(k0 + slots[i + kSlotsAhead] * kv_size, D_);
        scores[i] = dot(qh, k0 + slots[i] * kv_size, D_) * scale;
        m = std::max(m, scores[i]);
      }
      if (first)
        for (int64_t i = 0; i < std::min(n, kSlotsAhead); ++i) prefetch_row(v0 + slots[i] * kv_size, D_);
      const float sum = exp_minus_max(scores, n, m);
      const float inv = n ? 1.f / sum : 0.f;
      // Into the operand directly by row; by column through head_out.
      float* oh = attn.by_col ? head_out : attn.p + s * attn.ld + h * D_;
      if (D_ == 4 * VW) {
        weighted_sum<4>(scores, slots, n, v0, kv_size, inv, oh);
      } else if (D_ == 8 * VW) {
        weighted_sum<8>(scores, slots, n, v0, kv_size, inv, oh);
      } else {
        std::fill(oh, oh + D_, 0.f);
        for (int64_t i = 0; i < n; ++i)
          for (int64_t d = 0; d < D_; ++d) oh[d] += scores[i] * v0[slots[i] * kv_size + d];
        for (int64_t d = 0; d < D_; ++d) oh[d] *= inv;
      }
      if (attn.by_col)
        for (int64_t d = 0; d < D_; ++d) attn.at(s, h * D_ + d) = oh[d];
    }
  }

  // out = inv * sum_i p[i] v[slots[i]], D = kVecs * VW floats kept in registers (a running
  // sum in memory would chain every slot's update through a store and a reload).
  template <int kVecs>
  static void weighted_sum(const float* p, const int64_t* slots, int64_t n, const float* v0, int64_t kv_size,
                           float inv, float* out) {
    vf acc[kVecs];
    for (int d = 0; d < kVecs; ++d) acc[d] = vf{};
    for (int64_t i = 0; i < n; ++i) {
      if (i + kSlotsAhead < n) prefetch_row(v0 + slots[i + kSlotsAhead] * kv_size, kVecs * VW);
      const vf pi = splat(p[i]);
      const float* vr = v0 + slots[i] * kv_size;
      for (int d = 0; d < kVecs; ++d) acc[d] += pi * load(vr + d * VW);
    }
    for (int d = 0; d < kVecs; ++d) store(out + d * VW, acc[d] * splat(inv));
  }

  static void check_f32(const Tensor& t, std::vector<int64_t> shape, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), name,
                " must be a contiguous float32 CPU tensor");
    TORCH_CHECK(t.dim() == static_cast<int64_t>(shape.size()), name, " has ", t.dim(), " dims, expected ",
                shape.size());
    for (size_t i = 0; i < shape.size(); ++i)
      TORCH_CHECK(shape[i] < 0 || t.size(i) == shape[i], name, " dim ", i, " is ", t.size(i), ", expected ",
                  shape[i]);
  }

  static void check_i64(const Tensor& t, int64_t n, const char* name) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == at::kLong && t.is_contiguous() &&
                    t.device().is_cpu(),
                name, " must be a contiguous int64 CPU tensor of ", n, " elements");
  }

  static void check_range(const Tensor& t, int64_t limit, const char* name) {
    const int64_t* p = t.data_ptr<int64_t>();
    for (int64_t i = 0; i < t.numel(); ++i)
      TORCH_CHECK(p[i] >= 0 && p[i] < limit, name, "[", i, "] = ", p[i], " is outside [0, ", limit, ")");
  }

  struct LayerWeights {
    const float* input_norm;
    Matrix qkv, o;
    const float* post_norm;
    Matrix gate_up, down;
  };

  // The tensors keep the weights alive; layers_ points into them.
  Tensor embed_, rope_, final_norm_;
  std::vector<Tensor> input_norms_, qkv_, o_, post_norms_, gate_up_, down_;
  std::vector<LayerWeights> layers_;
  std::vector<Tensor> kept_blocks_;  // the blocks layers_ points into
  Tensor k_cache_, v_cache_;
  int64_t L_, H_, Hkv_, D_, B_, hidden_, I_;
  float eps_;
  bool int16_ = false;
};

// x [N, K] @ W[V, K]^T -> [N, V], the GEMV tiles over all threads (the tied LM head at
// small N, the eager model's matmuls up to MAX_EAGER_LINEAR_ROWS rows: cpu_decode.py).
Tensor linear_rows(const Tensor& x, const Matrix& W, int64_t V, bool int16 = false) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 && x.device().is_cpu(),
              "x must be a contiguous float32 CPU tensor [N, K]");
  const int64_t N = x.size(0), K = x.size(1);
  auto y = at::empty({N, V}, x.options());
  if (N == 0) return y;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int nt = std::max(1, std::min<int>(at::get_num_threads(), 64));
  pybind11::gil_scoped_release no_gil;
  // int16 activations (blocks, few rows): x quantized once, read by every thread.
  const bool q16 = int16 && !W.is_f32() && N <= kMaxQ16Rows;
  // One phase per kMaxRows rows of x, each an operand of its own (by column from
  // kBcastRows rows on, unless quantized); each chunk streams a stretch of W once for the
  // phase's rows.
  const int num_phases = static_cast<int>(ceil_div(N, kMaxRows));
  std::vector<std::vector<float>> by_col(num_phases);  // zero-padded copies for column operands
  std::vector<Operand> in;
  for (int p = 0; p < num_phases; ++p) {
    const int64_t n0 = p * kMaxRows;
    const int S = static_cast<int>(std::min<int64_t>(kMaxRows, N - n0));
    in.push_back(Operand::make(const_cast<float*>(xp) + n0 * K, K, S, q16));  // by row: x itself, read only
    if (!in.back().by_col) continue;
    by_col[p].resize(K * in.back().ld);
    in.back().p = by_col[p].data();
    for (int s = 0; s < S; ++s)
      for (int64_t k = 0; k < K; ++k) in.back().at(s, k) = xp[(n0 + s) * K + k];
  }
  QuantBuf xq(q16 ? static_cast<int>(N) : 0, q16 ? K : 0);
  if (q16) {
    quantize_rows(xp, K, static_cast<int>(N), K, xq.rows);
    in[0].q16 = &xq.rows;
  }
  const int64_t tpc = tiles_per_chunk(K), num_tiles = ceil_div(V, kTileRows);
  const bool any_scratch = needs_scratch(W, std::min<int64_t>(N, kMaxRows));
  std::vector<float> scratch(any_scratch ? static_cast<size_t>(nt) * kTileRows * K : 0);
  PhaseBoard board(num_phases, nt);
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    float* my_scratch = any_scratch ? scratch.data() + static_cast<size_t>(tid) * kTileRows * K : nullptr;
    work_phases(
        board, num_phases, tid, [&](int) { return ceil_div(num_tiles, tpc); }, [](int) {},
        [&](int p, int64_t c) {
          const int64_t n0 = p * kMaxRows;
          const int S = static_cast<int>(std::min<int64_t>(kMaxRows, N - n0));
          gemv_tiles(W, V, K, in[p], S, c * tpc, std::min(num_tiles, (c + 1) * tpc), my_scratch,
                     [&](int64_t v0, int R, const TileOut& t) {
                       for (int s = 0; s < S; ++s)
                         for (int r = 0; r < R; ++r) yp[(n0 + s) * V + v0 + r] = t(s, r);
                     });
        });
  }
  return y;
}

Tensor linear_small(Tensor x, Tensor w) {
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 2 && w.device().is_cpu() &&
                  x.dim() == 2 && x.size(1) == w.size(1),
              "linear_small needs contiguous float32 CPU x [N, K] and w [V, K]");
  return linear_rows(x, Matrix{w.data_ptr<float>()}, w.size(0));
}

// A matrix read as GGUF blocks (the LM head): checked against its fp32 weights once, at
// construction, then x @ W^T through the same tiles as linear_small, bit for bit its result.
class BlockLinear {
 public:
  BlockLinear(Tensor w, Tensor blocks, int64_t type, std::string name)
      : w_(w), blocks_(blocks), V_(w.size(0)), K_(w.size(1)) {
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 2 && w.device().is_cpu(),
                name, ": w must be a contiguous float32 CPU tensor [V, K]");
    m_ = checked_blocks(w, blocks, type, name);
  }
  Tensor forward(Tensor x) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == K_, "x must be [N, ", K_, "]");
    return linear_rows(x, m_.for_rows(x.size(0), int16_), V_, int16_);
  }
  // As DecodeStack::set_int16_activations.
  void set_int16_activations(bool on) { int16_ = on && kMaxRegTileRows > 0; }
  bool int16_activations() const { return int16_; }

 private:
  Tensor w_, blocks_;  // m_ points into both (fp32 rows for larger steps)
  Matrix m_;
  int64_t V_, K_;
  bool int16_ = false;
};

std::string isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__AVX__)
  return "avx";
#else
  return "generic";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<DecodeStack>(m, "DecodeStack", pybind11::module_local())
      .def(pybind11::init<Tensor, Tensor, Tensor, std::vector<Tensor>,
                          std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                          std::vector<Tensor>, std::vector<Tensor>, Tensor, Tensor,
                          int64_t, int64_t, int64_t, int64_t, double>())
      .def("forward", &DecodeStack::forward)
      .def("set_blocks", &DecodeStack::set_blocks)
      .def("num_block_matrices", &DecodeStack::num_block_matrices)
      .def("set_int16_activations", &DecodeStack::set_int16_activations)
      .def("int16_activations", &DecodeStack::int16_activations);
  pybind11::class_<BlockLinear>(m, "BlockLinear", pybind11::module_local())
      .def(pybind11::init<Tensor, Tensor, int64_t, std::string>())
      .def("forward", &BlockLinear::forward)
      .def("set_int16_activations", &BlockLinear::set_int16_activations)
      .def("int16_activations", &BlockLinear::int16_activations);
  m.def("linear_small", &linear_small);
  m.def("isa", &isa);
  m.attr("MAX_BLOCK_ROWS") = kMaxBlockRows;
  m.attr("MAX_INT16_ROWS") = kMaxQ16Rows;
}
