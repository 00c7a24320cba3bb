// Paged attention on the CPU: every query row reads its sequence's K/V where it lies in the pool, through the
// block table (no gathered copy). One kernel serves decode rows (one query per sequence) and prefill chunks
// over a cached prefix (many queries per sequence), causal, with an optional sliding window and logit
// soft-capping. fp32 throughout (softmax in fp32 like transformers' eager/sdpa paths).
//
// Layout, head-major within each block so that one kv head's part of a block is one contiguous run:
// K blocks are [kv_heads, head_dim, block_size] (transposed: the scores of a block's keys are head_dim vector
// FMAs, one vector = the block's keys, with no horizontal sums), V blocks [kv_heads, block_size, head_dim].
//
// Work items: (sequence, kv head, tile of up to kTileRows query rows); each keeps the tile's query vectors of
// every query head sharing the kv head (GQA without repeat_kv) and runs an online softmax over chunks of
// kChunk keys, so the rescaling cost is paid once per chunk. Items run on torch's intra-op thread pool.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kTileRows = 16;
constexpr int64_t kChunk = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for x <= 0 as plain arithmetic, so the softmax loop vectorizes (libm's expf call does not): Cephes'
// expf, 2^n * p(r) with |r| <= ln2 / 2, about 1 ulp; exp(x < -87.3) gives ~1e-38 instead of 0
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.3365447504f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  const float y =
      ((((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
         1.6666665459e-1f) * r + 5.0000001201e-1f) * r * r) + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

struct Item {
  int64_t seq, kv_head, row_begin, row_end;  // rows relative to the sequence's first query row
};

// s[m * stride + j] = sum_d q[m * dim + d] * kt[d * BS + j] for MB query vectors and the BS keys of one block
template <int MB, int BS>
inline void block_scores(const float* q, int64_t dim, const float* kt, float* s, int64_t stride) {
  float acc[MB][BS] = {};
  for (int64_t d = 0; d < dim; ++d) {
    const float* row = kt + d * BS;
    for (int m = 0; m < MB; ++m) {
      const float qd = q[m * dim + d];
#pragma omp simd
      for (int j = 0; j < BS; ++j) acc[m][j] += qd * row[j];
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < BS; ++j) s[m * stride + j] = acc[m][j];
}

inline void block_scores_any(const float* q, int64_t m_count, int64_t dim, const float* kt, int64_t bs, float* s,
                             int64_t stride) {
  for (int64_t m = 0; m < m_count; ++m) {
    float* out = s + m * stride;
    for (int64_t j = 0; j < bs; ++j) out[j] = 0.f;
    for (int64_t d = 0; d < dim; ++d) {
      const float qd = q[m * dim + d];
      const float* row = kt + d * bs;
#pragma omp simd
      for (int64_t j = 0; j < bs; ++j) out[j] += qd * row[j];
    }
  }
}

void scores_for_block(const float* q, int64_t m_count, int64_t dim, const float* kt, int64_t bs, float* s,
                      int64_t stride) {
  if (bs != 16) return block_scores_any(q, m_count, dim, kt, bs, s, stride);
  int64_t m = 0;
  for (; m + 4 <= m_count; m += 4) block_scores<4, 16>(q + m * dim, dim, kt, s + m * stride, stride);
  switch (m_count - m) {
    case 3: block_scores<3, 16>(q + m * dim, dim, kt, s + m * stride, stride); break;
    case 2: block_scores<2, 16>(q + m * dim, dim, kt, s + m * stride, stride); break;
    case 1: block_scores<1, 16>(q + m * dim, dim, kt, s + m * stride, stride); break;
    default: break;
  }
}

void paged_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& k_pool, const at::Tensor& v_pool,
                     const at::Tensor& block_tables, const at::Tensor& seq_info, double scale, int64_t window,
                     double softcap) {
  TORCH_CHECK(query.scalar_type() == at::kFloat && k_pool.scalar_type() == at::kFloat, "fp32 only");
  TORCH_CHECK(v_pool.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat, "fp32 only");
  TORCH_CHECK(query.dim() == 3 && out.dim() == 3 && k_pool.dim() == 4 && v_pool.dim() == 4, "bad ranks");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "pools must be contiguous");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "head_dim must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.is_contiguous(), "block_tables: int32");
  TORCH_CHECK(seq_info.scalar_type() == at::kInt && seq_info.is_contiguous() && seq_info.size(1) == 3,
              "seq_info: int32 [seqs, 3] (first row, rows, context)");
  const int64_t heads = query.size(1), dim = query.size(2);
  // k_pool: [blocks, kv_heads, head_dim, block_size]; v_pool: [blocks, kv_heads, block_size, head_dim]
  const int64_t kv_heads = v_pool.size(1), block_size = v_pool.size(2);
  TORCH_CHECK(k_pool.size(1) == kv_heads && k_pool.size(2) == dim && k_pool.size(3) == block_size, "K layout");
  TORCH_CHECK(v_pool.size(3) == dim && heads % kv_heads == 0, "shape mismatch");
  const int64_t group = heads / kv_heads;
  const int64_t q_row_stride = query.stride(0), q_head_stride = query.stride(1);
  const int64_t o_row_stride = out.stride(0), o_head_stride = out.stride(1);
  const float* q_base = query.data_ptr<float>();
  const float* k_base = k_pool.data_ptr<float>();
  const float* v_base = v_pool.data_ptr<float>();
  float* o_base = out.data_ptr<float>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t table_width = block_tables.size(1);
  const int32_t* info = seq_info.data_ptr<int32_t>();
  const int64_t seqs = seq_info.size(0);
  const float fscale = static_cast<float>(scale), cap = static_cast<float>(softcap);
  const int64_t block_numel = kv_heads * dim * block_size;
  const int64_t chunk_keys = std::max<int64_t>(block_size, kChunk / block_size * block_size);

  std::vector<Item> items;
  for (int64_t s = 0; s < seqs; ++s) {
    const int64_t rows = info[s * 3 + 1];
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t r = 0; r < rows; r += kTileRows) items.push_back({s, h, r, std::min(rows, r + kTileRows)});
  }

  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q, acc, scores, row_max, row_sum;
    std::vector<int64_t> lo, hi;
    for (int64_t it = begin; it < end; ++it) {
      const Item item = items[it];
      const int64_t first_row = info[item.seq * 3], rows = info[item.seq * 3 + 1], context = info[item.seq * 3 + 2];
      const int32_t* table = tables + item.seq * table_width;
      const int64_t tile = item.row_end - item.row_begin, m_count = tile * group;
      q.resize(m_count * dim);
      acc.assign(m_count * dim, 0.f);
      scores.resize(m_count * chunk_keys);
      row_max.assign(m_count, kNegInf);
      row_sum.assign(m_count, 0.f);
      lo.resize(m_count);
      hi.resize(m_count);  // attended key range [lo, hi] of each query vector
      for (int64_t r = 0; r < tile; ++r) {
        const int64_t position = context - rows + item.row_begin + r;
        for (int64_t g = 0; g < group; ++g) {
          const int64_t m = r * group + g, head = item.kv_head * group + g;
          const float* src = q_base + (first_row + item.row_begin + r) * q_row_stride + head * q_head_stride;
          for (int64_t d = 0; d < dim; ++d) q[m * dim + d] = src[d] * fscale;
          hi[m] = position;
          lo[m] = window > 0 ? std::max<int64_t>(0, position - window + 1) : 0;
        }
      }
      const int64_t key_begin = lo[0] / block_size * block_size, key_end = hi[m_count - 1] + 1;
      for (int64_t chunk = key_begin; chunk < key_end; chunk += chunk_keys) {
        const int64_t n = std::min(chunk_keys, key_end - chunk);
        // scores of every (query vector, key) of the chunk, a block at a time (the last may be partial)
        for (int64_t b = 0; b < n; b += block_size) {
          const int64_t block = table[(chunk + b) / block_size];
          const float* kt = k_base + block * block_numel + item.kv_head * dim * block_size;
          // blocks lie anywhere in the pool: ask for the next block's keys and this block's values (read by
          // the p . v pass after this chunk) ahead of time, the hardware prefetcher cannot guess them
          if (chunk + b + block_size < key_end) {
            const float* next = k_base + static_cast<int64_t>(table[(chunk + b) / block_size + 1]) * block_numel +
                                item.kv_head * dim * block_size;
            for (int64_t line = 0; line < dim * block_size; line += 16) __builtin_prefetch(next + line);
          }
          const float* v = v_base + block * block_numel + item.kv_head * block_size * dim;
          for (int64_t line = 0; line < dim * block_size; line += 16) __builtin_prefetch(v + line);
          scores_for_block(q.data(), m_count, dim, kt, block_size, scores.data() + b, chunk_keys);
        }
        for (int64_t m = 0; m < m_count; ++m) {
          float* s = scores.data() + m * chunk_keys;
          const int64_t first = std::max<int64_t>(0, lo[m] - chunk), last = std::min(n, hi[m] - chunk + 1);
          if (first >= last) {  // nothing attended in this chunk
            for (int64_t j = 0; j < n; ++j) s[j] = 0.f;
            continue;
          }
          if (cap > 0.f) {
            const float inv_cap = 1.f / cap;
#pragma omp simd
            for (int64_t j = first; j < last; ++j) s[j] = std::tanh(s[j] * inv_cap) * cap;
          }
          float chunk_max = kNegInf;
#pragma omp simd reduction(max : chunk_max)
          for (int64_t j = first; j < last; ++j) chunk_max = std::max(chunk_max, s[j]);
          const float new_max = std::max(row_max[m], chunk_max);
          if (new_max > row_max[m]) {
            const float correction = std::exp(row_max[m] - new_max);  // exp(-inf) = 0 on the first chunk
            float* a = acc.data() + m * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) a[d] *= correction;
            row_sum[m] *= correction;
            row_max[m] = new_max;
          }
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = first; j < last; ++j) {
            const float p = exp_nonpositive(s[j] - new_max);
            s[j] = p;
            sum += p;
          }
          for (int64_t j = 0; j < first; ++j) s[j] = 0.f;
          for (int64_t j = last; j < n; ++j) s[j] = 0.f;
          row_sum[m] += sum;
        }
        // acc += p . v, one query vector at a time over its keys of the chunk
        for (int64_t m = 0; m < m_count; ++m) {
          const float* p = scores.data() + m * chunk_keys;
          float* a = acc.data() + m * dim;
          const int64_t first = std::max<int64_t>(0, lo[m] - chunk), last = std::min(n, hi[m] - chunk + 1);
          for (int64_t j = first; j < last; ++j) {
            const int64_t key = chunk + j;
            const float* v = v_base + static_cast<int64_t>(table[key / block_size]) * block_numel +
                             (item.kv_head * block_size + key % block_size) * dim;
            const float pj = p[j];
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) a[d] += pj * v[d];
          }
        }
      }
      for (int64_t r = 0; r < tile; ++r) {
        for (int64_t g = 0; g < group; ++g) {
          const int64_t m = r * group + g, head = item.kv_head * group + g;
          float* dst = o_base + (first_row + item.row_begin + r) * o_row_stride + head * o_head_stride;
          const float inv = 1.f / row_sum[m];
          for (int64_t d = 0; d < dim; ++d) dst[d] = acc[m * dim + d] * inv;
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(sessionserve, m) {
  m.def(
      "paged_attention(Tensor(a!) out, Tensor query, Tensor k_pool, Tensor v_pool, Tensor block_tables, "
      "Tensor seq_info, float scale, int window, float softcap) -> ()");
}

TORCH_LIBRARY_IMPL(sessionserve, CPU, m) { m.impl("paged_attention", &paged_attention); }
