// Decode attention of one row and KV head, and the rotation of queries and keys, shared
// by the attention kernel (attention.cc) and the draft layer kernel (draft_layer.cc).

#ifndef SPECJAX_CSRC_ATTENTION_H_
#define SPECJAX_CSRC_ATTENTION_H_

#include <cstdint>

namespace specjax {

// Computes the attention of row b's queries that share KV head g, and writes it into
// `result`, shaped like q. The operands are q (B, T, N, H), the new keys and values k and
// v (B, T, KV, H), the caches kc (B, KV, S, H) and vc (B, KV, H, S), and positions (B, T).
// The new tokens attend to the slots below the row's first position and to the new
// tokens up to their own.
void AttendHead(const float* qs, const float* ks, const float* vs, const float* kc,
                const float* vc, const int32_t* pos, float* result, int64_t b, int64_t g,
                int64_t tokens, int64_t heads, int64_t kv_heads, int64_t slots, int64_t head_dim);

// Rotates `heads` vectors of head_dim floats at x by the rotary tables of their token,
// pairing dimension i with i + head_dim / 2 as specjax.model.apply_rope does.
void Rotate(float* x, int64_t heads, int64_t head_dim, const float* cos, const float* sin);

}  // namespace specjax

#endif  // SPECJAX_CSRC_ATTENTION_H_
