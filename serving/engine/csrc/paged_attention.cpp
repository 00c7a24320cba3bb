// Paged attention on the CPU: every query row reads its sequence's K/V where it lies in the pool, through the
// block table (no gathered copy). One kernel serves decode rows (one query per sequence) and prefill chunks
// over a cached prefix (many queries per sequence), causal, with an optional sliding window and logit
// soft-capping. Queries, K/V and the output are float32 or bfloat16 (one dtype for all); the arithmetic is fp32
// throughout (softmax in fp32 like transformers' eager/sdpa paths): bf16 is widened as it is loaded, which halves
// the bytes a decode step reads for the same work.
//
// Layout, head-major within each block so that one kv head's part of a block is one contiguous run:
// K blocks are [kv_heads, head_dim, block_size] (transposed: the scores of a block's keys are head_dim vector
// FMAs, one vector = the block's keys, with no horizontal sums), V blocks [kv_heads, block_size, head_dim].
//
// Work items: (sequence, kv heads, tile of up to kTileRows query rows); each keeps the tile's query vectors of
// every query head sharing its kv heads (GQA without repeat_kv), so each K/V block is read from memory once for
// all of them. An item walks its blocks once, with an online softmax per block; items run on torch's intra-op
// thread pool. An item takes all kv heads (a block's K and V parts are then two contiguous runs) unless there
// are too few items for the threads (one kv head each then). Decode is bound by reading the KV, so the per-block work stays in registers: with 16-token
// blocks and head_dim 32, 64, 128 or 256, a template keeps a few query vectors' scores (one 16-float vector each)
// and their output accumulators in vector registers (`block_fast`); other shapes take a plain loop
// (`block_generic`), same arithmetic.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
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
constexpr int kLanes = 16;           // floats per vector: the keys of one block of the fast path
constexpr int64_t kPrefetchAhead = 2;  // blocks lie anywhere in the pool: ask for them before they are needed
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 16 floats (int32s); gcc maps them onto whatever vector registers the target has (one zmm with AVX-512)
typedef float vec __attribute__((vector_size(64)));
typedef int32_t ivec __attribute__((vector_size(64)));
typedef uint32_t uvec __attribute__((vector_size(64)));
typedef uint16_t hvec __attribute__((vector_size(32)));  // 16 bfloat16s

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// 16 bfloat16s widened to floats: a bfloat16 is the top half of a float's bits
inline vec load(const c10::BFloat16* p) {
  hvec h;
  std::memcpy(&h, p, sizeof h);
  const uvec bits = __builtin_convertvector(h, uvec) << 16;
  vec v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

inline float widen(float x) { return x; }
inline float widen(c10::BFloat16 x) { return static_cast<float>(x); }

inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

inline vec splat(float x) { return vec{} + x; }

inline vec vmax(vec a, vec b) { return a > b ? a : b; }

// lane i + 8, + 4, + 2, + 1 (mod 16): a tree reduction over the 16 lanes in four steps
constexpr ivec kHalf8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
constexpr ivec kHalf4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
constexpr ivec kHalf2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
constexpr ivec kHalf1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};

inline float reduce_max(vec v) {
  v = vmax(v, __builtin_shuffle(v, kHalf8));
  v = vmax(v, __builtin_shuffle(v, kHalf4));
  v = vmax(v, __builtin_shuffle(v, kHalf2));
  return vmax(v, __builtin_shuffle(v, kHalf1))[0];
}

inline float reduce_sum(vec v) {
  v += __builtin_shuffle(v, kHalf8);
  v += __builtin_shuffle(v, kHalf4);
  v += __builtin_shuffle(v, kHalf2);
  return (v + __builtin_shuffle(v, kHalf1))[0];
}

// exp(x) for x <= 0, 16 lanes as plain vector arithmetic (libm's expf is one call per lane): Cephes' expf,
// 2^n * p(r) with |r| <= ln2 / 2, about 1 ulp; exp(x < -87.3) gives ~1e-38 instead of 0, exp(-inf) too
inline vec exp_nonpositive(vec x) {
  x = vmax(x, splat(-87.3365447504f));
  const vec z = x * 1.44269504088896341f + 0.5f;
  vec n = __builtin_convertvector(__builtin_convertvector(z, ivec), vec);  // rounds toward zero...
  n = n > z ? n - 1.f : n;                                                   // ...so step down: floor(z)
  const vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
  const vec y =
      ((((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
         1.6666665459e-1f) * r + 5.0000001201e-1f) * r * r) + r + 1.0f;
  const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  return y * reinterpret_cast<const vec&>(bits);
}

// The running state of one work item's query vectors (m = row in the tile * group + head in the group).
struct Rows {
  const float* q;     // [m, dim], scaled
  const int32_t* lo;  // [m]: first attended key
  const int32_t* hi;  // [m]: last attended key
  float* max;         // [m]: running max of the scores
  float* sum;         // [m]: running sum of exp(score - max)
  float* acc;         // [m, dim]: running sum of exp(score - max) * value
  Rows at(int64_t m, int64_t dim) const {
    return {q + m * dim, lo + m, hi + m, max + m, sum + m, acc + m * dim};
  }
};

// MB query vectors against one block of 16 keys: scores, mask, online-softmax update, acc += p . v.
// `keys` is how many of the block's keys any of them attends (the rest may not hold this sequence's KV).
template <int DV, int MB, typename T>
void block_fast(Rows r, const T* kt, const T* v, int32_t key0, int keys, float cap) {
  constexpr int dim = DV * kLanes;
  constexpr int P = MB <= 2 ? 4 : 2;  // independent partial sums per score vector, to hide the FMA latency
  vec s[MB][P] = {};
  for (int d = 0; d < dim; d += P) {
    for (int p = 0; p < P; ++p) {
      const vec k = load(kt + (d + p) * kLanes);
      for (int m = 0; m < MB; ++m) s[m][p] += r.q[m * dim + d + p] * k;
    }
  }
  ivec key = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  key += key0;
  alignas(64) float prob[MB][kLanes];
  float correction[MB];
  for (int m = 0; m < MB; ++m) {
    vec score = s[m][0];
    for (int p = 1; p < P; ++p) score += s[m][p];
    if (cap > 0.f) {
      alignas(64) float t[kLanes];
      store(t, score);
      for (int j = 0; j < kLanes; ++j) t[j] = std::tanh(t[j] / cap) * cap;
      score = load(t);
    }
    const ivec attended = (key >= r.lo[m]) & (key <= r.hi[m]);
    score = attended ? score : splat(kNegInf);
    const float block_max = reduce_max(score);
    if (block_max == kNegInf) {  // no key of this block for this query vector
      correction[m] = 1.f;
      store(prob[m], vec{});
      continue;
    }
    const float new_max = std::max(r.max[m], block_max);
    correction[m] = std::exp(r.max[m] - new_max);  // exp(-inf) = 0 on the first block
    r.max[m] = new_max;
    const vec p = attended ? exp_nonpositive(score - new_max) : vec{};
    store(prob[m], p);
    r.sum[m] = r.sum[m] * correction[m] + reduce_sum(p);
  }
  vec acc[MB][DV];
  for (int m = 0; m < MB; ++m)
    for (int x = 0; x < DV; ++x) acc[m][x] = load(r.acc + m * dim + x * kLanes) * correction[m];
  for (int j = 0; j < keys; ++j) {
    const T* row = v + j * dim;
    for (int x = 0; x < DV; ++x) {
      const vec value = load(row + x * kLanes);
      for (int m = 0; m < MB; ++m) acc[m][x] += prob[m][j] * value;
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int x = 0; x < DV; ++x) store(r.acc + m * dim + x * kLanes, acc[m][x]);
}

// All of an item's query vectors against one 16-key block, MB at a time (as many as fit in registers).
template <int DV, typename T>
void blocks_fast(Rows r, int64_t m_count, const T* kt, const T* v, int32_t key0, int keys, float cap) {
  constexpr int most = DV <= 4 ? 4 : (DV == 8 ? 2 : 1);
  const int64_t dim = DV * kLanes;
  int64_t m = 0;
  for (; m + most <= m_count; m += most) block_fast<DV, most>(r.at(m, dim), kt, v, key0, keys, cap);
  switch (m_count - m) {
    case 3: block_fast<DV, 3>(r.at(m, dim), kt, v, key0, keys, cap); break;
    case 2: block_fast<DV, 2>(r.at(m, dim), kt, v, key0, keys, cap); break;
    case 1: block_fast<DV, 1>(r.at(m, dim), kt, v, key0, keys, cap); break;
    default: break;
  }
}

// The same for any block size and head_dim, one query vector at a time (`scores`: block_size floats rounded up
// to whole vectors).
template <typename T>
void block_generic(Rows r, int64_t m_count, int64_t dim, const T* kt, const T* v, int64_t block_size,
                   int32_t key0, float cap, float* scores) {
  const int64_t padded = (block_size + kLanes - 1) / kLanes * kLanes;
  for (int64_t m = 0; m < m_count; ++m) {
    const float* q = r.q + m * dim;
    for (int64_t j = 0; j < padded; ++j) scores[j] = 0.f;
    for (int64_t d = 0; d < dim; ++d) {
      const float qd = q[d];
      const T* row = kt + d * block_size;
#pragma omp simd
      for (int64_t j = 0; j < block_size; ++j) scores[j] += qd * widen(row[j]);
    }
    float block_max = kNegInf;
    for (int64_t j = 0; j < padded; ++j) {
      const int64_t key = key0 + j;
      if (cap > 0.f) scores[j] = std::tanh(scores[j] / cap) * cap;
      if (j >= block_size || key < r.lo[m] || key > r.hi[m]) scores[j] = kNegInf;
      block_max = std::max(block_max, scores[j]);
    }
    if (block_max == kNegInf) continue;
    const float new_max = std::max(r.max[m], block_max);
    const float correction = std::exp(r.max[m] - new_max);
    r.max[m] = new_max;
    float sum = 0.f;
    for (int64_t j = 0; j < padded; j += kLanes) {
      const vec s = load(scores + j);
      const vec p = s == splat(kNegInf) ? vec{} : exp_nonpositive(s - new_max);
      store(scores + j, p);
      sum += reduce_sum(p);
    }
    r.sum[m] = r.sum[m] * correction + sum;
    float* acc = r.acc + m * dim;
    for (int64_t d = 0; d < dim; ++d) acc[d] *= correction;
    for (int64_t j = 0; j < block_size; ++j) {
      const float p = scores[j];
      if (p == 0.f) continue;  // not attended: the key may not hold this sequence's KV
      const T* value = v + j * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) acc[d] += p * widen(value[d]);
    }
  }
}

struct Item {
  int64_t seq, kv_head_begin, kv_head_end, row_begin, row_end;  // rows relative to the sequence's first query row
};

template <typename T>
void paged_attention_as(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_pool, const at::Tensor& v_pool,
                        const at::Tensor& block_tables, const at::Tensor& seq_info, double scale, int64_t window,
                        double softcap) {
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
  const T* q_base = query.data_ptr<T>();
  const T* k_base = k_pool.data_ptr<T>();
  const T* v_base = v_pool.data_ptr<T>();
  T* o_base = out.data_ptr<T>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t table_width = block_tables.size(1);
  const int32_t* info = seq_info.data_ptr<int32_t>();
  const int64_t seqs = seq_info.size(0);
  const float fscale = static_cast<float>(scale), cap = static_cast<float>(softcap);
  const int64_t block_numel = kv_heads * dim * block_size, head_numel = dim * block_size;
  const bool fast = block_size == kLanes && (dim == 32 || dim == 64 || dim == 128 || dim == 256);

  // An item takes every kv head of its rows when there are enough items to keep the threads busy: it then
  // streams each block's K and V parts as two contiguous runs (all heads), which the hardware prefetcher follows,
  // instead of one head's slice of every block. With few sequences (batch 1), one item per kv head spreads the
  // work over the threads.
  int64_t tiles = 0;
  for (int64_t s = 0; s < seqs; ++s) tiles += (info[s * 3 + 1] + kTileRows - 1) / kTileRows;
  const int64_t heads_per_item = tiles >= 4 * at::get_num_threads() ? kv_heads : 1;
  std::vector<Item> items;
  for (int64_t s = 0; s < seqs; ++s) {
    const int64_t rows = info[s * 3 + 1];
    for (int64_t h = 0; h < kv_heads; h += heads_per_item)
      for (int64_t r = 0; r < rows; r += kTileRows)
        items.push_back({s, h, h + heads_per_item, r, std::min(rows, r + kTileRows)});
  }

  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q, acc, row_max, row_sum, scores((block_size + kLanes - 1) / kLanes * kLanes);
    std::vector<int32_t> lo, hi;
    for (int64_t it = begin; it < end; ++it) {
      const Item item = items[it];
      const int64_t first_row = info[item.seq * 3], rows = info[item.seq * 3 + 1], context = info[item.seq * 3 + 2];
      const int32_t* table = tables + item.seq * table_width;
      // query vector m = (head in the item * tile + row) * group + head in the group
      const int64_t tile = item.row_end - item.row_begin, per_head = tile * group;
      const int64_t item_heads = item.kv_head_end - item.kv_head_begin, m_count = item_heads * per_head;
      q.resize(m_count * dim);
      acc.assign(m_count * dim, 0.f);
      row_max.assign(m_count, kNegInf);
      row_sum.assign(m_count, 0.f);
      lo.resize(m_count);
      hi.resize(m_count);
      for (int64_t m = 0; m < m_count; ++m) {
        const int64_t r = m / group % tile, head = item.kv_head_begin * group + m / per_head * group + m % group;
        const int64_t position = context - rows + item.row_begin + r;
        const T* src = q_base + (first_row + item.row_begin + r) * q_row_stride + head * q_head_stride;
        for (int64_t d = 0; d < dim; ++d) q[m * dim + d] = widen(src[d]) * fscale;
        hi[m] = static_cast<int32_t>(position);
        lo[m] = static_cast<int32_t>(window > 0 ? std::max<int64_t>(0, position - window + 1) : 0);
      }
      const Rows state{q.data(), lo.data(), hi.data(), row_max.data(), row_sum.data(), acc.data()};
      // the first row attends the earliest keys, the last row the latest: blocks before the first row's
      // window are never read (an all-sliding model may have dropped them)
      const int64_t first_block = lo[0] / block_size, last_key = hi[per_head - 1];
      const int64_t last_block = last_key / block_size;
      const int64_t run = item_heads * head_numel, head0 = item.kv_head_begin * head_numel;
      for (int64_t b = first_block; b <= last_block; ++b) {
        if (b + kPrefetchAhead <= last_block) {
          const int64_t ahead = static_cast<int64_t>(table[b + kPrefetchAhead]) * block_numel + head0;
          for (int64_t line = 0; line < run; line += 64 / sizeof(T)) {  // one 64-byte cache line each
            __builtin_prefetch(k_base + ahead + line);
            __builtin_prefetch(v_base + ahead + line);
          }
        }
        const int32_t key0 = static_cast<int32_t>(b * block_size);
        const int keys = static_cast<int>(std::min<int64_t>(block_size, last_key - key0 + 1));
        for (int64_t h = 0; h < item_heads; ++h) {
          const int64_t offset = static_cast<int64_t>(table[b]) * block_numel + head0 + h * head_numel;
          const T* kt = k_base + offset;
          const T* v = v_base + offset;
          const Rows head_state = state.at(h * per_head, dim);
          if (!fast) {
            block_generic(head_state, per_head, dim, kt, v, block_size, key0, cap, scores.data());
            continue;
          }
          switch (dim) {
            case 32: blocks_fast<2>(head_state, per_head, kt, v, key0, keys, cap); break;
            case 64: blocks_fast<4>(head_state, per_head, kt, v, key0, keys, cap); break;
            case 128: blocks_fast<8>(head_state, per_head, kt, v, key0, keys, cap); break;
            default: blocks_fast<16>(head_state, per_head, kt, v, key0, keys, cap); break;
          }
        }
      }
      for (int64_t m = 0; m < m_count; ++m) {
        const int64_t r = m / group % tile, head = item.kv_head_begin * group + m / per_head * group + m % group;
        T* dst = o_base + (first_row + item.row_begin + r) * o_row_stride + head * o_head_stride;
        const float inv = 1.f / row_sum[m];
        for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<T>(acc[m * dim + d] * inv);
      }
    }
  });
}

void paged_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& k_pool, const at::Tensor& v_pool,
                     const at::Tensor& block_tables, const at::Tensor& seq_info, double scale, int64_t window,
                     double softcap) {
  const auto dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "float32 or bfloat16 only");
  TORCH_CHECK(k_pool.scalar_type() == dtype && v_pool.scalar_type() == dtype && out.scalar_type() == dtype,
              "query, pools and output must share one dtype");
  if (dtype == at::kFloat)
    paged_attention_as<float>(out, query, k_pool, v_pool, block_tables, seq_info, scale, window, softcap);
  else
    paged_attention_as<c10::BFloat16>(out, query, k_pool, v_pool, block_tables, seq_info, scale, window, softcap);
}

}  // namespace

TORCH_LIBRARY(sessionserve, m) {
  m.def(
      "paged_attention(Tensor(a!) out, Tensor query, Tensor k_pool, Tensor v_pool, Tensor block_tables, "
      "Tensor seq_info, float scale, int window, float softcap) -> ()");
}

TORCH_LIBRARY_IMPL(sessionserve, CPU, m) { m.impl("paged_attention", &paged_attention); }
