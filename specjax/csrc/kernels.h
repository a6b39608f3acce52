// The kernels' entry points, in plain C++ types.
//
// handlers.cc alone uses XLA's FFI: it unpacks XLA's buffers into the views below and
// calls these functions, which the other sources define in plain C++.
//
// Each function checks its operands' shapes and returns an error message when they do
// not match, or an empty string once it has written its results. `threads` is the size
// of XLA's thread pool, the number of threads a call may use.

#ifndef SPECJAX_CSRC_KERNELS_H_
#define SPECJAX_CSRC_KERNELS_H_

#include <cstddef>
#include <cstdint>
#include <string>

namespace specjax {

// The dimensions of an array, outermost first.
struct Dims {
  const int64_t* sizes;
  size_t rank;
  size_t size() const { return rank; }
  int64_t operator[](size_t i) const { return sizes[i]; }
};

// An array that XLA owns: its elements in row-major order and its dimensions.
template <typename T>
struct Array {
  T* data;
  Dims dims;
  T* typed_data() const { return data; }
  Dims dimensions() const { return dims; }
};

using Floats = Array<float>;
using Words = Array<int32_t>;

// y = x @ w for x (rows, k) and a row-major w (k, n) (row_matmul.cc).
std::string RowMatmul(int64_t threads, Floats x, Floats w, Floats y);

// y = x @ w for x (rows, k) and w (k, n) in the packed layout of `pack` (packed_matmul.cc).
std::string PackedMatmul(int64_t threads, Floats x, Floats w, Floats y);

// y = x @ W for an int4 or int8 weight W given as packed codes, scales and offsets
// (quantized_row_matmul.cc).
std::string QuantizedRowMatmul(int64_t threads, Floats x, Words packed, Floats scales,
                               Floats offsets, int64_t bits, int64_t group, Floats y);

// Decode attention of q over the cache and the new keys and values (attention.cc). It
// rotates q and k by the rotary tables cos and sin first, and writes the rotated k to k_out.
std::string Attention(int64_t threads, Floats q, Floats k, Floats v, Floats k_cache,
                      Floats v_cache, Words positions, Floats cos, Floats sin, Floats out,
                      Floats k_out);

// The int8 weights of one matrix in a draft layer: packed codes and scales.
struct DraftMatrix {
  Words words;
  Floats scales;
};

// One decoder layer with int8 weights for a few new tokens per row (draft_layer.cc).
std::string DraftLayer(int64_t threads, Floats x, Floats cos, Floats sin, Words positions,
                       Floats k_cache, Floats v_cache, Floats input_norm, Floats post_norm,
                       DraftMatrix q, DraftMatrix k, DraftMatrix v, DraftMatrix o,
                       DraftMatrix gate, DraftMatrix up, DraftMatrix down, float eps, Floats x_out,
                       Floats k_new, Floats v_new);

// The final norm and an int8 output layer: logits (rows, V) (draft_layer.cc).
std::string DraftHead(int64_t threads, Floats x, Floats norm, DraftMatrix output, float eps,
                      Floats logits);

// For logits (rows, V): the first index of each row's largest logit, and that logit's
// softmax probability (greedy.cc).
std::string Greedy(int64_t threads, Floats logits, Words tokens, Floats top);

}  // namespace specjax

#endif  // SPECJAX_CSRC_KERNELS_H_
