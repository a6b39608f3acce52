// The XLA FFI handlers of the CPU backend: each unpacks its buffers and calls the kernel
// declared in kernels.h. The library's only source that includes XLA's FFI header.

#include <algorithm>
#include <cstdint>
#include <string>

#include "kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using In = ffi::Buffer<ffi::F32>;
using InWords = ffi::Buffer<ffi::S32>;
using Out = ffi::ResultBuffer<ffi::F32>;

template <ffi::DataType T>
specjax::Array<ffi::NativeType<T>> View(ffi::Buffer<T> buffer) {
  auto dims = buffer.dimensions();
  return {buffer.typed_data(), {dims.begin(), dims.size()}};
}

template <ffi::DataType T>
specjax::Array<ffi::NativeType<T>> View(ffi::Result<ffi::Buffer<T>> buffer) {
  return View(*buffer);
}

specjax::DraftMatrix Matrix(InWords words, In scales) { return {View(words), View(scales)}; }

int64_t Threads(ffi::ThreadPool& pool) { return std::max<int64_t>(1, pool.num_threads()); }

ffi::Error ToError(const std::string& message) {
  return message.empty() ? ffi::Error::Success() : ffi::Error::InvalidArgument(message);
}

ffi::Error RowMatmul(ffi::ThreadPool pool, In x, In w, Out y) {
  return ToError(specjax::RowMatmul(Threads(pool), View(x), View(w), View(y)));
}

ffi::Error PackedMatmul(ffi::ThreadPool pool, In x, In w, Out y) {
  return ToError(specjax::PackedMatmul(Threads(pool), View(x), View(w), View(y)));
}

ffi::Error QuantizedRowMatmul(ffi::ThreadPool pool, In x, InWords packed, In scales, In offsets,
                              int64_t bits, int64_t group, Out y) {
  return ToError(specjax::QuantizedRowMatmul(Threads(pool), View(x), View(packed), View(scales),
                                            View(offsets), bits, group, View(y)));
}

ffi::Error Attention(ffi::ThreadPool pool, In q, In k, In v, In k_cache, In v_cache,
                     InWords positions, In cos, In sin, Out out, Out k_out) {
  return ToError(specjax::Attention(Threads(pool), View(q), View(k), View(v), View(k_cache),
                                   View(v_cache), View(positions), View(cos), View(sin), View(out),
                                   View(k_out)));
}

ffi::Error DraftLayer(ffi::ThreadPool pool, In x, In cos, In sin, InWords positions, In k_cache,
                      In v_cache, In input_norm, In post_norm, InWords qw, In qs, InWords kw, In ks,
                      InWords vw, In vs, InWords ow, In os, InWords gw, In gs, InWords uw, In us,
                      InWords dw, In ds, float eps, Out x_out, Out k_new, Out v_new) {
  return ToError(specjax::DraftLayer(
      Threads(pool), View(x), View(cos), View(sin), View(positions), View(k_cache), View(v_cache),
      View(input_norm), View(post_norm), Matrix(qw, qs), Matrix(kw, ks), Matrix(vw, vs),
      Matrix(ow, os), Matrix(gw, gs), Matrix(uw, us), Matrix(dw, ds), eps, View(x_out),
      View(k_new), View(v_new)));
}

ffi::Error DraftHead(ffi::ThreadPool pool, In x, In norm, InWords words, In scales, float eps,
                     Out logits) {
  return ToError(specjax::DraftHead(Threads(pool), View(x), View(norm), Matrix(words, scales), eps,
                                   View(logits)));
}

ffi::Error Greedy(ffi::ThreadPool pool, In logits, ffi::ResultBuffer<ffi::S32> tokens, Out top) {
  return ToError(specjax::Greedy(Threads(pool), View(logits), View(tokens), View(top)));
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpecjaxRowMatmul, RowMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<In>()  // x
                                  .Arg<In>()  // w
                                  .Ret<In>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpecjaxPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<In>()  // x
                                  .Arg<In>()  // w, packed
                                  .Ret<In>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpecjaxQuantizedRowMatmul, QuantizedRowMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<In>()  // x
                                  .Arg<InWords>()  // packed codes
                                  .Arg<In>()  // scales
                                  .Arg<In>()  // offsets
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Ret<In>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpecjaxAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<In>()  // q
                                  .Arg<In>()  // k
                                  .Arg<In>()  // v
                                  .Arg<In>()  // k_cache
                                  .Arg<In>()  // v_cache
                                  .Arg<InWords>()  // positions
                                  .Arg<In>()  // cos
                                  .Arg<In>()  // sin
                                  .Ret<In>()  // out
                                  .Ret<In>());  // rotated k

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpecjaxDraftLayer, DraftLayer,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<In>()  // x
                                  .Arg<In>()  // cos
                                  .Arg<In>()  // sin
                                  .Arg<InWords>()  // positions
                                  .Arg<In>()  // k_cache
                                  .Arg<In>()  // v_cache
                                  .Arg<In>()  // input norm
                                  .Arg<In>()  // post-attention norm
                                  .Arg<InWords>().Arg<In>()  // q
                                  .Arg<InWords>().Arg<In>()  // k
                                  .Arg<InWords>().Arg<In>()  // v
                                  .Arg<InWords>().Arg<In>()  // o
                                  .Arg<InWords>().Arg<In>()  // gate
                                  .Arg<InWords>().Arg<In>()  // up
                                  .Arg<InWords>().Arg<In>()  // down
                                  .Attr<float>("eps")
                                  .Ret<In>()
                                  .Ret<In>()
                                  .Ret<In>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpecjaxDraftHead, DraftHead,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<In>()  // x
                                  .Arg<In>()  // norm
                                  .Arg<InWords>()  // output codes
                                  .Arg<In>()  // output scales
                                  .Attr<float>("eps")
                                  .Ret<In>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpecjaxGreedy, Greedy,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<In>()  // logits
                                  .Ret<ffi::Buffer<ffi::S32>>()  // tokens
                                  .Ret<In>());  // top probability
