// One decoder layer of a Llama-family model with int8 weights, for a few new tokens per
// row, for the CPU backend.
//
// Run as separate XLA operations, such a layer is eight kernel calls and about two dozen
// small fusions, each with a fixed cost of its own. For a draft, whose matrices are
// small, those costs dominate its forward. This kernel computes the whole layer of a
// row in one pass. For each new token, h = norm(x), and q, k and v come from h, rotated
// by the position's tables. Each token attends to the cached slots below the row's first
// position and to the new tokens up to its own, then x += o and
// x += down(silu(gate(norm(x))) * up(norm(x))). It returns x and the new keys and values,
// which the caller writes into the cache.
//
// Its sums run in another order than the separate operations', and with VNNI its products
// round their inputs (see below), so its logits differ from theirs by about 1e-5 of their
// range. It is meant for drafts, whose tokens the target checks, so that they never
// change the output.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "attention.h"
#include "kernels.h"
#include "rows.h"
#include "vector16.h"

namespace {

using namespace specjax::v16;

inline Vec MulAdd(Vec a, Vec b, Vec c) {
#if defined(__AVX512F__)
  return reinterpret_cast<Vec>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b),
                                               reinterpret_cast<__m512>(c)));
#else
  return a * b + c;
#endif
}

// A symmetric int8 weight (k, n) in the packed layout of specjax.kernels.formats: code c
// of word [w, j] sits in bits 8c to 8c + 7 and belongs to input row 4w + c, and
// W[r, j] = (code - 128) * scales[r / group, j].
struct Weight {
  const int32_t* words;
  const float* scales;
  int64_t k, n, group;
};

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
// With VNNI, one instruction multiplies 16 words of 4 unsigned codes by 4 signed bytes and
// adds the 4 products into 16 integer sums. For a 1-row product that is far cheaper than
// the float path below, which decodes each code with a shift, a mask and a conversion.
// So x is written as scale * (high + low / 254) with two int8 parts, high = round(x /
// scale) for scale = max |x| / 127 and low the rounded remainder, and the kernel sums the
// codes against both. Together they are within about 2e-5 of max |x| per input. With
// one part alone, the shipped draft emitted 2 to 4 % fewer tokens per target call at
// K = 6 and 7 on a 2-core AMD EPYC.
constexpr float kLowScale = 254.0f;

// The two int8 parts of a row, packed four to a word, and their sums over each group.
struct Parts {
  std::vector<int32_t> high, low;
  int32_t high_sums[64], low_sums[64];  // the checks in Bind keep k / group within this
  float scale;
};

void Split(const float* x, const Weight& w, Parts* parts) {
  float largest = 0.0f;
  for (int64_t r = 0; r < w.k; ++r) largest = std::max(largest, std::fabs(x[r]));
  parts->scale = largest > 0.0f ? largest / 127.0f : 1.0f;
  parts->high.resize(w.k / 4);
  parts->low.resize(w.k / 4);
  int8_t* high = reinterpret_cast<int8_t*>(parts->high.data());
  int8_t* low = reinterpret_cast<int8_t*>(parts->low.data());
  for (int64_t r = 0; r < w.k; ++r) {
    float scaled = x[r] / parts->scale;
    float rounded = std::nearbyint(scaled);
    high[r] = static_cast<int8_t>(rounded);
    low[r] = static_cast<int8_t>(std::nearbyint((scaled - rounded) * kLowScale));
  }
  for (int64_t g = 0; g * w.group < w.k; ++g) {
    int32_t high_sum = 0, low_sum = 0;
    for (int64_t r = g * w.group; r < (g + 1) * w.group; ++r) high_sum += high[r], low_sum += low[r];
    parts->high_sums[g] = high_sum, parts->low_sums[g] = low_sum;
  }
}

// Returns the float of the integer sums minus 128 times the part's sum over the group,
// which removes the codes' offset of 128.
inline Vec Centered(__m512i acc, int32_t sum) {
  return reinterpret_cast<Vec>(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc, _mm512_set1_epi32(128 * sum))));
}

// y[j0 : j0 + 16 V] = x @ W[:, j0 : j0 + 16 V] for the row x split into `parts`.
template <int V>
void Columns(const Parts& parts, const Weight& w, float* y, int64_t j0) {
  Vec total[V] = {};
  const Vec low_weight = Vec{} + 1.0f / kLowScale;
  for (int64_t g = 0, r0 = 0; r0 < w.k; ++g, r0 += w.group) {
    __m512i high[V], low[V];
    for (int v = 0; v < V; ++v) high[v] = low[v] = _mm512_setzero_si512();
    for (int64_t r = r0; r < r0 + w.group; r += 4) {
      const int32_t* row = w.words + (r / 4) * w.n + j0;
      __m512i x_high = _mm512_set1_epi32(parts.high[r / 4]);
      __m512i x_low = _mm512_set1_epi32(parts.low[r / 4]);
      for (int v = 0; v < V; ++v) {
        __m512i codes = _mm512_loadu_si512(row + v * kLanes);
        high[v] = _mm512_dpbusd_epi32(high[v], codes, x_high);
        low[v] = _mm512_dpbusd_epi32(low[v], codes, x_low);
      }
    }
    for (int v = 0; v < V; ++v) {
      Vec sum = MulAdd(Centered(low[v], parts.low_sums[g]), low_weight, Centered(high[v], parts.high_sums[g]));
      total[v] = MulAdd(Load(w.scales + g * w.n + j0 + v * kLanes), sum, total[v]);
    }
  }
  for (int v = 0; v < V; ++v) Store(y + j0 + v * kLanes, total[v] * parts.scale);
}

// y[j0:j1] = x @ W[:, j0:j1] for one row x of w.k floats; j0 and j1 are multiples of 16.
void Product(const float* x, const Weight& w, float* y, int64_t j0 = 0, int64_t j1 = -1) {
  Parts parts;
  Split(x, w, &parts);
  int64_t j = j0, end = j1 < 0 ? w.n : j1;
  for (; j + 4 * kLanes <= end; j += 4 * kLanes) Columns<4>(parts, w, y, j);
  for (; j < end; j += kLanes) Columns<1>(parts, w, y, j);
}
#else
// y[j0 : j0 + 16 V] = x @ W[:, j0 : j0 + 16 V] for one row x, where sums[g] is the sum of
// x over group g. Each group sums x times the codes, then subtracts 128 times its sum.
template <int V>
void Columns(const float* x, const float* sums, const Weight& w, float* y, int64_t j0) {
  Vec total[V] = {};
  const IntVec mask = IntVec{} + 255;
  for (int64_t g = 0, r0 = 0; r0 < w.k; ++g, r0 += w.group) {
    Vec acc[V] = {};
    for (int64_t r = r0; r < r0 + w.group; r += 4) {
      const int32_t* row = w.words + (r / 4) * w.n + j0;
      IntVec words[V];
      for (int v = 0; v < V; ++v) std::memcpy(&words[v], row + v * kLanes, sizeof(IntVec));
      for (int c = 0; c < 4; ++c) {
        Vec xc = Vec{} + x[r + c];
        for (int v = 0; v < V; ++v)
          acc[v] = MulAdd(xc, __builtin_convertvector((words[v] >> (8 * c)) & mask, Vec), acc[v]);
      }
    }
    for (int v = 0; v < V; ++v)
      total[v] = MulAdd(Load(w.scales + g * w.n + j0 + v * kLanes), acc[v] - 128.0f * sums[g], total[v]);
  }
  for (int v = 0; v < V; ++v) Store(y + j0 + v * kLanes, total[v]);
}

// y[j0:j1] = x @ W[:, j0:j1] for one row x of w.k floats; j0 and j1 are multiples of 16.
void Product(const float* x, const Weight& w, float* y, int64_t j0 = 0, int64_t j1 = -1) {
  float sums[64];  // the checks in Bind keep k / group within this
  for (int64_t g = 0; g * w.group < w.k; ++g) {
    float sum = 0.0f;
    for (int64_t r = g * w.group; r < (g + 1) * w.group; ++r) sum += x[r];
    sums[g] = sum;
  }
  int64_t j = j0, end = j1 < 0 ? w.n : j1;
  for (; j + 4 * kLanes <= end; j += 4 * kLanes) Columns<4>(x, sums, w, y, j);
  for (; j < end; j += kLanes) Columns<1>(x, sums, w, y, j);
}

#endif

// out = weight * x / sqrt(mean(x^2) + eps), as specjax.model.RMSNorm computes it.
void Norm(const float* x, const float* weight, int64_t width, float eps, float* out) {
  Vec squares = Vec{};
  for (int64_t i = 0; i < width; i += kLanes) {
    Vec v = Load(x + i);
    squares = MulAdd(v, v, squares);
  }
  float scale = 1.0f / std::sqrt(specjax::v16::Sum(squares) / static_cast<float>(width) + eps);
  for (int64_t i = 0; i < width; i += kLanes) Store(out + i, Load(weight + i) * (Load(x + i) * scale));
}

// gate = silu(gate) * up. The sigmoid comes from exp(-|gate|), because Exp takes inputs <= 0 only.
void GatedUnit(float* gate, const float* up, int64_t width) {
  const Vec one = Vec{} + 1.0f;
  for (int64_t i = 0; i < width; i += kLanes) {
    Vec g = Load(gate + i);
    Vec e = Exp(g < 0.0f ? g : -g);
    Vec sigmoid = (g < 0.0f ? e : one) / (one + e);
    Store(gate + i, g * sigmoid * Load(up + i));
  }
}

struct Layer {
  int64_t width, heads, kv_heads, head_dim, slots, ffn;
  float eps;
  const float *input_norm, *post_norm;
  Weight q, k, v, o, gate, up, down;
};

// Computes the layer for the `tokens` new tokens of one row. Each pointer addresses that
// row's part of its operand or result.
void Row(const Layer& l, int64_t tokens, const float* x, const float* cos, const float* sin,
         const int32_t* positions, const float* keys, const float* values, float* out,
         float* k_new, float* v_new) {
  const int64_t qw = l.heads * l.head_dim, kvw = l.kv_heads * l.head_dim;
  std::vector<float> buffer(l.width * 2 + qw * tokens * 2 + l.ffn * 2);
  float *h = buffer.data(), *o = h + l.width, *q = o + l.width, *attended = q + qw * tokens;
  float *gate = attended + qw * tokens, *up = gate + l.ffn;
  for (int64_t t = 0; t < tokens; ++t) {
    Norm(x + t * l.width, l.input_norm, l.width, l.eps, h);
    Product(h, l.q, q + t * qw);
    Product(h, l.k, k_new + t * kvw);
    Product(h, l.v, v_new + t * kvw);
    specjax::Rotate(q + t * qw, l.heads, l.head_dim, cos + t * l.head_dim, sin + t * l.head_dim);
    specjax::Rotate(k_new + t * kvw, l.kv_heads, l.head_dim, cos + t * l.head_dim, sin + t * l.head_dim);
  }
  // The row's attention, as that of a batch of one row.
  for (int64_t g = 0; g < l.kv_heads; ++g)
    specjax::AttendHead(q, k_new, v_new, keys, values, positions, attended, 0, g, tokens, l.heads,
                        l.kv_heads, l.slots, l.head_dim);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* row = x + t * l.width;
    float* result = out + t * l.width;
    Product(attended + t * qw, l.o, o);
    for (int64_t i = 0; i < l.width; i += kLanes) Store(result + i, Load(row + i) + Load(o + i));
    Norm(result, l.post_norm, l.width, l.eps, h);
    Product(h, l.gate, gate);
    Product(h, l.up, up);
    GatedUnit(gate, up, l.ffn);
    Product(gate, l.down, o);
    for (int64_t i = 0; i < l.width; i += kLanes) Store(result + i, Load(result + i) + Load(o + i));
  }
}

// Fills `w` with a weight of `k` rows and `n` columns from its words and scales. Returns
// an error message when their shapes do not fit, and an empty string otherwise.
std::string Bind(const char* name, specjax::DraftMatrix m, int64_t k, int64_t n, Weight* w) {
  auto wd = m.words.dimensions(), sd = m.scales.dimensions();
  if (wd.size() != 2 || sd.size() != 2 || wd[0] * 4 != k || wd[1] != n || sd[1] != n || sd[0] < 1 ||
      sd[0] > 64 || k % sd[0] || (k / sd[0]) % 4 || n % kLanes)
    return std::string("draft_layer: the ") + name + " weight's shapes do not match";
  *w = Weight{m.words.typed_data(), m.scales.typed_data(), k, n, k / sd[0]};
  return "";
}

}  // namespace

std::string specjax::DraftLayer(int64_t threads, Floats x, Floats cos, Floats sin, Words positions,
                                Floats k_cache, Floats v_cache, Floats input_norm, Floats post_norm,
                                DraftMatrix q, DraftMatrix k, DraftMatrix v, DraftMatrix o,
                                DraftMatrix gate, DraftMatrix up, DraftMatrix down, float eps,
                                Floats x_out, Floats k_new, Floats v_new) {
  auto xd = x.dimensions(), cd = k_cache.dimensions(), vd = v_cache.dimensions();
  if (xd.size() != 3 || cd.size() != 4 || vd.size() != 4 || cos.dimensions().size() != 3 ||
      positions.dimensions().size() != 2)
    return "draft_layer expects x (B, T, D), tables (B, T, H), positions (B, T) and 4-D caches";
  Layer l;
  int64_t batch = xd[0], tokens = xd[1];
  l.width = xd[2], l.kv_heads = cd[1], l.slots = cd[2], l.head_dim = cd[3], l.eps = eps;
  auto qd = q.words.dimensions(), gd = gate.words.dimensions();
  l.heads = qd.size() == 2 ? qd[1] / std::max<int64_t>(l.head_dim, 1) : 0;
  l.ffn = gd.size() == 2 ? gd[1] : 0;
  if (cd[0] != batch || vd[0] != batch || vd[1] != l.kv_heads || vd[2] != l.head_dim ||
      vd[3] != l.slots || l.head_dim % kLanes || l.width % kLanes || l.ffn % kLanes ||
      l.heads % std::max<int64_t>(l.kv_heads, 1) || l.heads == 0 || cos.dimensions()[0] != batch ||
      cos.dimensions()[1] != tokens || cos.dimensions()[2] != l.head_dim ||
      positions.dimensions()[0] != batch || positions.dimensions()[1] != tokens ||
      input_norm.dimensions()[0] != l.width)
    return "draft_layer: operand shapes do not match";
  const int64_t qwidth = l.heads * l.head_dim, kvwidth = l.kv_heads * l.head_dim;
  std::string error = Bind("q", q, l.width, qwidth, &l.q);
  if (error.empty()) error = Bind("k", k, l.width, kvwidth, &l.k);
  if (error.empty()) error = Bind("v", v, l.width, kvwidth, &l.v);
  if (error.empty()) error = Bind("o", o, qwidth, l.width, &l.o);
  if (error.empty()) error = Bind("gate", gate, l.width, l.ffn, &l.gate);
  if (error.empty()) error = Bind("up", up, l.width, l.ffn, &l.up);
  if (error.empty()) error = Bind("down", down, l.ffn, l.width, &l.down);
  if (!error.empty()) return error;
  l.input_norm = input_norm.typed_data(), l.post_norm = post_norm.typed_data();
  const float *xs = x.typed_data(), *cs = cos.typed_data(), *ss = sin.typed_data();
  const float *kc = k_cache.typed_data(), *vc = v_cache.typed_data();
  const int32_t* pos = positions.typed_data();
  float *xo = x_out.typed_data(), *kn = k_new.typed_data(), *vn = v_new.typed_data();
  // One part per row, computed whole by one thread.
  auto compute_row = [&](int64_t b) {
    int64_t first = b * tokens, table = first * l.head_dim, entries = first * kvwidth;
    Row(l, tokens, xs + first * l.width, cs + table, ss + table, pos + first,
        kc + b * kvwidth * l.slots, vc + b * kvwidth * l.slots, xo + first * l.width, kn + entries,
        vn + entries);
  };
  RunParts(threads, batch, compute_row);
  return "";
}

// The final norm and the output layer for rows of x: logits (rows, V). Wide
// vocabularies are split by columns over the helper threads.
std::string specjax::DraftHead(int64_t threads, Floats x, Floats norm, DraftMatrix output, float eps,
                               Floats logits) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || norm.dimensions()[0] != xd[1] || xd[1] % kLanes)
    return "draft_head expects x (rows, D) and a norm of D";
  int64_t batch = xd[0], width = xd[1];
  auto od = output.words.dimensions();
  Weight w;
  std::string error = Bind("output", output, width, od.size() == 2 ? od[1] : 0, &w);
  if (!error.empty()) return error;
  int64_t chunks = w.n >= 1024 ? threads : 1;
  int64_t step = (w.n / kLanes + chunks - 1) / chunks * kLanes;
  const float *xs = x.typed_data(), *weight = norm.typed_data();
  float* out = logits.typed_data();
  auto part = [&](int64_t index) {
    int64_t b = index / chunks, c = index % chunks;
    std::vector<float> h(width);
    Norm(xs + b * width, weight, width, eps, h.data());
    Product(h.data(), w, out + b * w.n, std::min(w.n, c * step), std::min(w.n, (c + 1) * step));
  };
  RunParts(threads, batch * chunks, part);
  return "";
}
