// The XLA FFI handlers of the CPU backend: each checks its call's operands, unpacks them
// into the views of kernels.h and calls the kernel.
//
// They use XLA's C API (c_api.h) rather than the C++ binding of ffi.h. The binding's
// templates made this file take 3.5 to 5 s of the build's 11 to 14 s of compiler time
// on a 2-core Intel Xeon, and the first process on a machine waits for the build.

#include <cstdint>
#include <cstring>
#include <string>

#include "kernels.h"
#include "xla/ffi/api/c_api.h"

namespace {

using specjax::Array;
using specjax::DraftMatrix;
using specjax::Floats;
using specjax::Words;

// Fills in the API version and traits when `frame` is XLA's metadata query, which XLA
// makes when a handler is registered. Returns whether `frame` was that query.
bool FillMetadata(XLA_FFI_CallFrame* frame) {
  XLA_FFI_Extension_Base* extension = frame->extension_start;
  if (extension == nullptr || extension->type != XLA_FFI_Extension_Metadata) return false;
  XLA_FFI_Metadata* metadata = reinterpret_cast<XLA_FFI_Metadata_Extension*>(extension)->metadata;
  metadata->api_version = {XLA_FFI_Api_Version_STRUCT_SIZE, nullptr, XLA_FFI_API_MAJOR,
                           XLA_FFI_API_MINOR};
  metadata->traits = 0;
  metadata->state_type_id = XLA_FFI_TypeId{0};  // the handlers keep no state
  return true;
}

// One call of a handler: reads its operands and keeps the first problem found.
class Call {
 public:
  Call(XLA_FFI_CallFrame* frame, const char* name, int64_t args, int64_t rets, int64_t attrs)
      : frame_(frame), name_(name) {
    if (frame->stage != XLA_FFI_ExecutionStage_EXECUTE) {
      Fail("called outside the execute stage");
    } else if (frame->args.size != args || frame->rets.size != rets || frame->attrs.size != attrs) {
      Fail("expected " + std::to_string(args) + " operands, " + std::to_string(rets) +
           " results and " + std::to_string(attrs) + " attributes, got " +
           std::to_string(frame->args.size) + ", " + std::to_string(frame->rets.size) + " and " +
           std::to_string(frame->attrs.size));
    }
  }

  Floats In(int64_t i) { return View<float>(Arg(i), XLA_FFI_DataType_F32, "operand", i); }
  Words InWords(int64_t i) { return View<int32_t>(Arg(i), XLA_FFI_DataType_S32, "operand", i); }
  Floats Out(int64_t i) { return View<float>(Ret(i), XLA_FFI_DataType_F32, "result", i); }
  Words OutWords(int64_t i) { return View<int32_t>(Ret(i), XLA_FFI_DataType_S32, "result", i); }
  DraftMatrix Matrix(int64_t words, int64_t scales) { return {InWords(words), In(scales)}; }

  int64_t Int(const char* name) {
    const XLA_FFI_Scalar* scalar = Attr(name, XLA_FFI_DataType_S64);
    return scalar == nullptr ? 0 : *static_cast<const int64_t*>(scalar->value);
  }

  float Float(const char* name) {
    const XLA_FFI_Scalar* scalar = Attr(name, XLA_FFI_DataType_F32);
    return scalar == nullptr ? 0.0f : *static_cast<const float*>(scalar->value);
  }

  // The size of XLA's thread pool, at least 1.
  int64_t Threads() {
    int64_t threads = 0;
    XLA_FFI_ThreadPool_NumThreads_Args args{XLA_FFI_ThreadPool_NumThreads_Args_STRUCT_SIZE,
                                            nullptr, frame_->ctx, &threads};
    if (XLA_FFI_Error* error = frame_->api->XLA_FFI_ThreadPool_NumThreads(&args)) {
      XLA_FFI_Error_Destroy_Args destroy{XLA_FFI_Error_Destroy_Args_STRUCT_SIZE, nullptr, error};
      frame_->api->XLA_FFI_Error_Destroy(&destroy);
    }
    return threads < 1 ? 1 : threads;
  }

  // Runs `kernel` unless a problem was found, and returns XLA's error for either's
  // message, or null for success.
  template <typename Kernel>
  XLA_FFI_Error* Finish(Kernel kernel) {
    if (problem_.empty()) problem_ = kernel();
    if (problem_.empty()) return nullptr;
    std::string message = std::string(name_) + ": " + problem_;
    XLA_FFI_Error_Create_Args args{XLA_FFI_Error_Create_Args_STRUCT_SIZE, nullptr,
                                   message.c_str(), XLA_FFI_Error_Code_INVALID_ARGUMENT};
    return frame_->api->XLA_FFI_Error_Create(&args);
  }

 private:
  void Fail(const std::string& problem) {
    if (problem_.empty()) problem_ = problem;
  }

  const XLA_FFI_Buffer* Arg(int64_t i) {
    if (i >= frame_->args.size || frame_->args.types[i] != XLA_FFI_ArgType_BUFFER) return nullptr;
    return static_cast<const XLA_FFI_Buffer*>(frame_->args.args[i]);
  }

  const XLA_FFI_Buffer* Ret(int64_t i) {
    if (i >= frame_->rets.size || frame_->rets.types[i] != XLA_FFI_RetType_BUFFER) return nullptr;
    return static_cast<const XLA_FFI_Buffer*>(frame_->rets.rets[i]);
  }

  template <typename T>
  Array<T> View(const XLA_FFI_Buffer* buffer, XLA_FFI_DataType dtype, const char* kind, int64_t i) {
    static const int64_t kNoDims[1] = {0};
    if (buffer == nullptr || buffer->dtype != dtype) {
      Fail(std::string(kind) + " " + std::to_string(i) + " is missing or of the wrong dtype");
      return {nullptr, {kNoDims, 0}};
    }
    return {static_cast<T*>(buffer->data), {buffer->dims, static_cast<size_t>(buffer->rank)}};
  }

  const XLA_FFI_Scalar* Attr(const char* name, XLA_FFI_DataType dtype) {
    const XLA_FFI_Attrs& attrs = frame_->attrs;
    for (int64_t i = 0; i < attrs.size; ++i) {
      const XLA_FFI_ByteSpan* key = attrs.names[i];
      if (key->len != std::strlen(name) || std::memcmp(key->ptr, name, key->len) != 0) continue;
      const auto* scalar = static_cast<const XLA_FFI_Scalar*>(attrs.attrs[i]);
      if (attrs.types[i] == XLA_FFI_AttrType_SCALAR && scalar->dtype == dtype) return scalar;
      break;
    }
    Fail(std::string("attribute ") + name + " is missing or of the wrong type");
    return nullptr;
  }

  XLA_FFI_CallFrame* frame_;
  const char* name_;
  std::string problem_;
};

}  // namespace

extern "C" {

XLA_FFI_Error* SpecjaxRowMatmul(XLA_FFI_CallFrame* frame) {
  if (FillMetadata(frame)) return nullptr;
  Call call(frame, "specjax_row_matmul", 2, 1, 0);
  Floats x = call.In(0), w = call.In(1), y = call.Out(0);
  return call.Finish([&] { return specjax::RowMatmul(call.Threads(), x, w, y); });
}

XLA_FFI_Error* SpecjaxPackedMatmul(XLA_FFI_CallFrame* frame) {
  if (FillMetadata(frame)) return nullptr;
  Call call(frame, "specjax_packed_matmul", 2, 1, 0);
  Floats x = call.In(0), w = call.In(1), y = call.Out(0);  // w in the packed layout
  return call.Finish([&] { return specjax::PackedMatmul(call.Threads(), x, w, y); });
}

XLA_FFI_Error* SpecjaxQuantizedRowMatmul(XLA_FFI_CallFrame* frame) {
  if (FillMetadata(frame)) return nullptr;
  Call call(frame, "specjax_quantized_row_matmul", 4, 1, 2);
  Floats x = call.In(0), scales = call.In(2), offsets = call.In(3), y = call.Out(0);
  Words packed = call.InWords(1);
  int64_t bits = call.Int("bits"), group = call.Int("group_size");
  return call.Finish([&] {
    return specjax::QuantizedRowMatmul(call.Threads(), x, packed, scales, offsets, bits, group, y);
  });
}

XLA_FFI_Error* SpecjaxAttention(XLA_FFI_CallFrame* frame) {
  if (FillMetadata(frame)) return nullptr;
  Call call(frame, "specjax_attention", 8, 2, 0);
  Floats q = call.In(0), k = call.In(1), v = call.In(2), k_cache = call.In(3), v_cache = call.In(4);
  Words positions = call.InWords(5);
  Floats cos = call.In(6), sin = call.In(7), out = call.Out(0), k_out = call.Out(1);
  return call.Finish([&] {
    return specjax::Attention(call.Threads(), q, k, v, k_cache, v_cache, positions, cos, sin, out,
                              k_out);
  });
}

XLA_FFI_Error* SpecjaxDraftLayer(XLA_FFI_CallFrame* frame) {
  if (FillMetadata(frame)) return nullptr;
  Call call(frame, "specjax_draft_layer", 22, 3, 1);
  Floats x = call.In(0), cos = call.In(1), sin = call.In(2);
  Words positions = call.InWords(3);
  Floats k_cache = call.In(4), v_cache = call.In(5), input_norm = call.In(6), post_norm = call.In(7);
  // The q, k, v, o, gate, up and down matrices, each as codes then scales.
  DraftMatrix q = call.Matrix(8, 9), k = call.Matrix(10, 11), v = call.Matrix(12, 13);
  DraftMatrix o = call.Matrix(14, 15), gate = call.Matrix(16, 17), up = call.Matrix(18, 19);
  DraftMatrix down = call.Matrix(20, 21);
  float eps = call.Float("eps");
  Floats x_out = call.Out(0), k_new = call.Out(1), v_new = call.Out(2);
  return call.Finish([&] {
    return specjax::DraftLayer(call.Threads(), x, cos, sin, positions, k_cache, v_cache, input_norm,
                               post_norm, q, k, v, o, gate, up, down, eps, x_out, k_new, v_new);
  });
}

XLA_FFI_Error* SpecjaxDraftHead(XLA_FFI_CallFrame* frame) {
  if (FillMetadata(frame)) return nullptr;
  Call call(frame, "specjax_draft_head", 4, 1, 1);
  Floats x = call.In(0), norm = call.In(1), logits = call.Out(0);
  DraftMatrix output = call.Matrix(2, 3);
  float eps = call.Float("eps");
  return call.Finish([&] { return specjax::DraftHead(call.Threads(), x, norm, output, eps, logits); });
}

XLA_FFI_Error* SpecjaxGreedy(XLA_FFI_CallFrame* frame) {
  if (FillMetadata(frame)) return nullptr;
  Call call(frame, "specjax_greedy", 1, 2, 0);
  Floats logits = call.In(0), top = call.Out(1);
  Words tokens = call.OutWords(0);
  return call.Finish([&] { return specjax::Greedy(call.Threads(), logits, tokens, top); });
}

}  // extern "C"
