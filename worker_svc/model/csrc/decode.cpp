// The decoder stack for small decode-only steps on a CPU, in one call.
//
// At batch 1 a step must stream every weight from DRAM once (~538 MB for SmolLM2-135M in
// fp32), so its floor is that read; what keeps an op-by-op framework above it are the ~40
// small ops per layer, each paying a dispatch, an OpenMP fork/join and cold caches. Here
// the whole 30-layer stack runs inside ONE OpenMP parallel region: each matmul is a GEMV
// whose rows are split across the threads and whose small ops ride in its epilogue while
// the outputs are still in L1 (RoPE and the K/V pool write after q|k|v; SiLU(gate) * up
// after gate|up; the residual add after o and down), and the threads meet at a barrier
// only where the next phase needs every thread's output: five per layer.
//
// Per layer, for S rows (one decode token each):
//
//   h    = rmsnorm(x) * input_norm            each thread, privately (x is [S, hidden])
//   qkv  = h @ Wqkv^T   -> q [S, H*D] rotated, k rotated and v written to the pool slots
//   ---- barrier
//   attn = softmax(q k^T / sqrt(D)) v         per (row, query head), over the row's blocks,
//                                             slots the row does not own skipped (mask)
//   ---- barrier
//   x   += attn @ Wo^T
//   ---- barrier
//   h    = rmsnorm(x) * post_norm             each thread, privately
//   act  = silu(h @ Wgate^T) * (h @ Wup^T)    gate row n and up row n in the same tile
//   ---- barrier
//   x   += act @ Wdown^T
//   ---- barrier
//
// Same math and op order as worker_svc/model/llama.py (interleaved RoPE pairs, keys stored
// rotated, the pool layout k[layer, slot, kv_head, head_dim]); only float summation order
// differs. fp32 only. Written with GCC vector extensions, so the same source compiles to
// AVX-512, AVX2 or SSE2 depending on the -m flags the build chose for this CPU.

#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

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
inline vf splat(float a) { return vf{} + a; }

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

constexpr int kTileRows = 8;    // weight rows per tile: read once from DRAM, used by every x row
constexpr int kMaxTileX = 4;    // x rows per register tile; more rows re-run the tile (weights in L1)
constexpr int kMaxRows = 64;    // x rows per call (the tile output buffers are sized for it)

// y[s * R + r] = dot(x[s], rows[r]) for s < S, r < R; rows[r] holds K floats.
// S * R accumulators stay in registers for the whole K loop (at most 16 + R + 1 <= 32).
template <int S, int R>
inline void tile(const float* const* rows, int64_t K, const float* x, int64_t ldx, float* y) {
  vf acc[S][R];
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < R; ++r) acc[s][r] = vf{};
  int64_t k = 0;
  for (; k + VW <= K; k += VW) {
    vf w[R];
    for (int r = 0; r < R; ++r) w[r] = load(rows[r] + k);
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

template <int S>
inline void tile_s(const float* const* rows, int R, int64_t K, const float* x, int64_t ldx, float* y) {
  switch (R) {
    case 1: return tile<S, 1>(rows, K, x, ldx, y);
    case 2: return tile<S, 2>(rows, K, x, ldx, y);
    case 3: return tile<S, 3>(rows, K, x, ldx, y);
    case 4: return tile<S, 4>(rows, K, x, ldx, y);
    case 5: return tile<S, 5>(rows, K, x, ldx, y);
    case 6: return tile<S, 6>(rows, K, x, ldx, y);
    case 7: return tile<S, 7>(rows, K, x, ldx, y);
    default: return tile<S, 8>(rows, K, x, ldx, y);
  }
}

// y[s][r] (row stride R) for all S rows of x against R <= kTileRows weight rows.
void block_dot(const float* const* rows, int R, int64_t K, const float* x, int64_t ldx, int S, float* y) {
  float part[kMaxTileX * kTileRows];
  for (int s0 = 0; s0 < S; s0 += kMaxTileX) {
    const int sg = std::min(kMaxTileX, S - s0);
    const float* xs = x + s0 * ldx;
    // 1-2 x rows: one 8-row tile; 3-4 x rows: two 4-row tiles (register budget).
    const int halves = (sg <= 2 || R <= 4) ? 1 : 2;
    for (int h = 0; h < halves; ++h) {
      const int r0 = h * 4, rn = halves == 1 ? R : (h == 0 ? 4 : R - 4);
      switch (sg) {
        case 1: tile_s<1>(rows + r0, rn, K, xs, ldx, part); break;
        case 2: tile_s<2>(rows + r0, rn, K, xs, ldx, part); break;
        case 3: tile_s<3>(rows + r0, std::min(rn, 4), K, xs, ldx, part); break;
        default: tile_s<4>(rows + r0, std::min(rn, 4), K, xs, ldx, part); break;
      }
      for (int s = 0; s < sg; ++s)
        for (int r = 0; r < rn; ++r) y[(s0 + s) * R + r0 + r] = part[s * rn + r];
    }
  }
}

// This thread's share [begin, end) of num_units units, in contiguous runs so that each
// thread streams one stretch of every weight matrix.
inline void share(int64_t num_units, int tid, int nt, int64_t* begin, int64_t* end) {
  *begin = num_units * tid / nt;
  *end = num_units * (tid + 1) / nt;
}

// One thread's part of y = x @ W^T for W [N, K]: tiles of kTileRows rows, then
// epi(n0, R, y[S][R]) while the tile's outputs are in L1.
template <typename Epi>
void gemv(const float* W, int64_t N, int64_t K, const float* x, int64_t ldx, int S, int tid, int nt,
          Epi&& epi) {
  const int64_t num_tiles = (N + kTileRows - 1) / kTileRows;
  int64_t t0, t1;
  share(num_tiles, tid, nt, &t0, &t1);
  float y[kMaxRows * kTileRows];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * kTileRows;
    const int R = static_cast<int>(std::min<int64_t>(kTileRows, N - n0));
    const float* rows[kTileRows];
    for (int r = 0; r < R; ++r) rows[r] = W + (n0 + r) * K;
    block_dot(rows, R, K, x, ldx, S, y);
    epi(n0, R, y);
  }
}

inline float silu(float a) { return a / (1.f + std::exp(-a)); }

// ---------------------------------------------------------------- row ops

// out = (x * rsqrt(mean(x^2) + eps)) * w, as llama.py's rms_norm.
void rms_norm(const float* x, const float* w, int64_t n, float eps, float* out) {
  const float r = 1.f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
  int64_t k = 0;
  for (; k + VW <= n; k += VW) store(out + k, load(x + k) * splat(r) * load(w + k));
  for (; k < n; ++k) out[k] = x[k] * r * w[k];
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
  DecodeStack(torch::Tensor embed, torch::Tensor rope, torch::Tensor final_norm,
              std::vector<torch::Tensor> input_norms, std::vector<torch::Tensor> qkv,
              std::vector<torch::Tensor> o, std::vector<torch::Tensor> post_norms,
              std::vector<torch::Tensor> gate_up, std::vector<torch::Tensor> down, torch::Tensor k_cache,
              torch::Tensor v_cache, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
              int64_t block_size, double eps)
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
      layers_.push_back({input_norms_[l].data_ptr<float>(), qkv_[l].data_ptr<float>(), o_[l].data_ptr<float>(),
                         post_norms_[l].data_ptr<float>(), gate_up_[l].data_ptr<float>(),
                         down_[l].data_ptr<float>()});
  }

  // input_ids, positions, slot_mapping [S] int64; blocks [S, nb] int64; mask [S, nb * B]
  // bool or None -> final hidden states [S, hidden] (after the last norm).
  torch::Tensor forward(torch::Tensor input_ids, torch::Tensor positions, torch::Tensor slot_mapping,
                        torch::Tensor blocks, c10::optional<torch::Tensor> mask) {
    const int64_t S = input_ids.size(0);
    TORCH_CHECK(S >= 1 && S <= kMaxRows, "input_ids must hold 1 to ", kMaxRows, " rows, got ", S);
    check_i64(input_ids, S, "input_ids");
    check_i64(positions, S, "positions");
    check_i64(slot_mapping, S, "slot_mapping");
    TORCH_CHECK(blocks.dim() == 2 && blocks.size(0) == S && blocks.size(1) > 0 &&
                    blocks.scalar_type() == torch::kLong && blocks.is_contiguous(),
                "blocks must be a contiguous int64 [S, nb] tensor");
    const int64_t nb = blocks.size(1);
    const bool* mask_ptr = nullptr;
    if (mask.has_value() && mask->defined()) {
      TORCH_CHECK(mask->scalar_type() == torch::kBool && mask->is_contiguous() && mask->numel() == S * nb * B_,
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

    torch::NoGradGuard no_grad;
    auto x = torch::empty({S, hidden_}, embed_.options());
    const int64_t* ids = input_ids.data_ptr<int64_t>();
    for (int64_t s = 0; s < S; ++s)
      std::memcpy(x.data_ptr<float>() + s * hidden_, embed_.data_ptr<float>() + ids[s] * hidden_,
                  hidden_ * sizeof(float));
    auto out = torch::empty_like(x);
    Step step{static_cast<int>(S), positions.data_ptr<int64_t>(), slot_mapping.data_ptr<int64_t>(),
              blocks.data_ptr<int64_t>(), mask_ptr, nb};
    {
      pybind11::gil_scoped_release no_gil;
      run(step, x.data_ptr<float>(), out.data_ptr<float>());
    }
    return out;
  }

 private:
  void run(const Step& st, float* x, float* out) {
    const int S = st.S;
    const int nt = std::max(1, std::min<int>(at::get_num_threads(), 64));
    const int64_t q_size = H_ * D_, kv_size = Hkv_ * D_;
    std::vector<float> q(S * q_size), attn(S * q_size), act(S * I_);
    std::vector<float> h(static_cast<size_t>(nt) * S * hidden_);
    std::vector<float> scores(static_cast<size_t>(nt) * st.nb * B_);
    std::vector<int64_t> slots(static_cast<size_t>(nt) * st.nb * B_);

#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num(), team = omp_get_num_threads();
      float* my_h = h.data() + static_cast<size_t>(tid) * S * hidden_;
      float* my_scores = scores.data() + static_cast<size_t>(tid) * st.nb * B_;
      int64_t* my_slots = slots.data() + static_cast<size_t>(tid) * st.nb * B_;
      const float* rope = rope_.data_ptr<float>();
      for (int64_t l = 0; l < L_; ++l) {
        const LayerWeights& w = layers_[l];
        float* kc = k_cache_.data_ptr<float>() + l * k_cache_.stride(0);
        float* vc = v_cache_.data_ptr<float>() + l * v_cache_.stride(0);

        // ---- q|k|v, RoPE, K/V into the pool
        for (int s = 0; s < S; ++s)
          rms_norm(x + s * hidden_, w.input_norm, hidden_, eps_, my_h + s * hidden_);
        gemv(w.qkv, q_size + 2 * kv_size, hidden_, my_h, hidden_, S, tid, team,
             [&](int64_t n0, int R, const float* y) {
               for (int s = 0; s < S; ++s) {
                 const float* cs = rope + st.positions[s] * D_;  // [D/2, 2]
                 const int64_t slot = st.slot_mapping[s];
                 for (int r = 0; r < R; r += 2) {
                   const int64_t n = n0 + r;
                   // A tile starts on an even row and segments on multiples of D, so a
                   // RoPE pair (2i, 2i+1) never straddles two tiles or two segments.
                   float pair[2] = {y[s * R + r], R > r + 1 ? y[s * R + r + 1] : 0.f};
                   const int npair = R > r + 1 ? 2 : 1;
                   if (n < q_size + kv_size) rotate(pair, cs + (n % D_));
                   float* dst = n < q_size             ? q.data() + s * q_size + n
                                : n < q_size + kv_size ? kc + slot * kv_size + (n - q_size)
                                                       : vc + slot * kv_size + (n - q_size - kv_size);
                   for (int j = 0; j < npair; ++j) dst[j] = pair[j];
                 }
               }
             });
#pragma omp barrier

        // ---- attention, one (row, query head) per unit
        {
          int64_t u0, u1;
          share(S * H_, tid, team, &u0, &u1);
          for (int64_t u = u0; u < u1; ++u)
            attend(st, u / H_, u % H_, q.data(), kc, vc, attn.data(), my_scores, my_slots);
        }
#pragma omp barrier

        // ---- x += attn @ Wo^T
        gemv(w.o, hidden_, q_size, attn.data(), q_size, S, tid, team,
             [&](int64_t n0, int R, const float* y) {
               for (int s = 0; s < S; ++s)
                 for (int r = 0; r < R; ++r) x[s * hidden_ + n0 + r] += y[s * R + r];
             });
#pragma omp barrier

        // ---- act = silu(gate) * up: a tile holds gate rows n..n+3 and up rows n..n+3
        for (int s = 0; s < S; ++s)
          rms_norm(x + s * hidden_, w.post_norm, hidden_, eps_, my_h + s * hidden_);
        {
          const float* gu = w.gate_up;
          constexpr int kHalf = kTileRows / 2;
          const int64_t num_tiles = (I_ + kHalf - 1) / kHalf;
          int64_t t0, t1;
          share(num_tiles, tid, team, &t0, &t1);
          float y[kMaxRows * kTileRows];
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t c0 = t * kHalf;
            const int half = static_cast<int>(std::min<int64_t>(kHalf, I_ - c0));
            const float* rows[kTileRows];
            for (int r = 0; r < half; ++r) {
              rows[r] = gu + (c0 + r) * hidden_;
              rows[half + r] = gu + (I_ + c0 + r) * hidden_;
            }
            block_dot(rows, 2 * half, hidden_, my_h, hidden_, S, y);
            for (int s = 0; s < S; ++s)
              for (int r = 0; r < half; ++r)
                act[s * I_ + c0 + r] = silu(y[s * 2 * half + r]) * y[s * 2 * half + half + r];
          }
        }
#pragma omp barrier

        // ---- x += act @ Wdown^T
        gemv(w.down, hidden_, I_, act.data(), I_, S, tid, team,
             [&](int64_t n0, int R, const float* y) {
               for (int s = 0; s < S; ++s)
                 for (int r = 0; r < R; ++r) x[s * hidden_ + n0 + r] += y[s * R + r];
             });
#pragma omp barrier
      }
      int64_t s0, s1;
      share(S, tid, team, &s0, &s1);
      for (int64_t s = s0; s < s1; ++s)
        rms_norm(x + s * hidden_, final_norm_.data_ptr<float>(), hidden_, eps_, out + s * hidden_);
    }
  }

  // attn[s, h] = softmax(q[s, h] . k / sqrt(D)) v over the slots row s owns in its blocks.
  void attend(const Step& st, int64_t s, int64_t h, const float* q, const float* kc, const float* vc,
              float* attn, float* scores, int64_t* slots) const {
    const int64_t g = h / (H_ / Hkv_), kv_size = Hkv_ * D_;
    const float* qh = q + s * H_ * D_ + h * D_;
    const float scale = 1.f / std::sqrt(static_cast<float>(D_));
    const int64_t* row_blocks = st.blocks + s * st.nb;
    const bool* row_mask = st.mask ? st.mask + s * st.nb * B_ : nullptr;
    int64_t n = 0;
    float m = -INFINITY;
    for (int64_t j = 0; j < st.nb; ++j)
      for (int64_t o = 0; o < B_; ++o) {
        if (row_mask && !row_mask[j * B_ + o]) continue;  // not this row's slot: never read
        const int64_t slot = row_blocks[j] * B_ + o;
        const float sc = dot(qh, kc + slot * kv_size + g * D_, D_) * scale;
        scores[n] = sc;
        slots[n++] = slot;
        m = std::max(m, sc);
      }
    float sum = 0.f;
    for (int64_t i = 0; i < n; ++i) sum += (scores[i] = std::exp(scores[i] - m));
    float* oh = attn + s * H_ * D_ + h * D_;
    std::fill(oh, oh + D_, 0.f);
    for (int64_t i = 0; i < n; ++i) {
      const float p = scores[i];
      const float* vr = vc + slots[i] * kv_size + g * D_;
      int64_t d = 0;
      for (; d + VW <= D_; d += VW) store(oh + d, load(oh + d) + splat(p) * load(vr + d));
      for (; d < D_; ++d) oh[d] += p * vr[d];
    }
    const float inv = n ? 1.f / sum : 0.f;
    for (int64_t d = 0; d < D_; ++d) oh[d] *= inv;
  }

  static void check_f32(const torch::Tensor& t, std::vector<int64_t> shape, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous(), name,
                " must be a contiguous float32 CPU tensor");
    TORCH_CHECK(t.dim() == static_cast<int64_t>(shape.size()), name, " has ", t.dim(), " dims, expected ",
                shape.size());
    for (size_t i = 0; i < shape.size(); ++i)
      TORCH_CHECK(shape[i] < 0 || t.size(i) == shape[i], name, " dim ", i, " is ", t.size(i), ", expected ",
                  shape[i]);
  }

  static void check_i64(const torch::Tensor& t, int64_t n, const char* name) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == torch::kLong && t.is_contiguous() &&
                    t.device().is_cpu(),
                name, " must be a contiguous int64 CPU tensor of ", n, " elements");
  }

  static void check_range(const torch::Tensor& t, int64_t limit, const char* name) {
    const int64_t* p = t.data_ptr<int64_t>();
    for (int64_t i = 0; i < t.numel(); ++i)
      TORCH_CHECK(p[i] >= 0 && p[i] < limit, name, "[", i, "] = ", p[i], " is outside [0, ", limit, ")");
  }

  struct LayerWeights {
    const float *input_norm, *qkv, *o, *post_norm, *gate_up, *down;
  };

  // The tensors keep the weights alive; layers_ points into them.
  torch::Tensor embed_, rope_, final_norm_;
  std::vector<torch::Tensor> input_norms_, qkv_, o_, post_norms_, gate_up_, down_;
  std::vector<LayerWeights> layers_;
  torch::Tensor k_cache_, v_cache_;
  int64_t L_, H_, Hkv_, D_, B_, hidden_, I_;
  float eps_;
};

// x [N, K] @ w[V, K]^T -> [N, V], the GEMV tiles over all threads (the tied LM head at small N).
torch::Tensor linear_small(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat && x.is_contiguous() &&
                  w.is_contiguous() && x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) &&
                  x.device().is_cpu() && w.device().is_cpu(),
              "linear_small needs contiguous float32 CPU x [N, K] and w [V, K]");
  const int64_t N = x.size(0), K = x.size(1), V = w.size(0);
  auto y = torch::empty({N, V}, x.options());
  if (N == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int nt = std::max(1, std::min<int>(at::get_num_threads(), 64));
  pybind11::gil_scoped_release no_gil;
  for (int64_t n0 = 0; n0 < N; n0 += kMaxRows) {
    const int S = static_cast<int>(std::min<int64_t>(kMaxRows, N - n0));
#pragma omp parallel num_threads(nt)
    gemv(wp, V, K, xp + n0 * K, K, S, omp_get_thread_num(), omp_get_num_threads(),
         [&](int64_t v0, int R, const float* t) {
           for (int s = 0; s < S; ++s)
             for (int r = 0; r < R; ++r) yp[(n0 + s) * V + v0 + r] = t[s * R + r];
         });
  }
  return y;
}

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
  pybind11::class_<DecodeStack>(m, "DecodeStack")
      .def(pybind11::init<torch::Tensor, torch::Tensor, torch::Tensor, std::vector<torch::Tensor>,
                          std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                          std::vector<torch::Tensor>, std::vector<torch::Tensor>, torch::Tensor, torch::Tensor,
                          int64_t, int64_t, int64_t, int64_t, double>())
      .def("forward", &DecodeStack::forward);
  m.def("linear_small", &linear_small);
  m.def("isa", &isa);
}
