// Copyright MedAttnSlicer contributors. Apache-2.0.
//
// Torch custom ops (namespace medattn) wrapping the fused local self-attention kernels. Registered with
// TORCH_LIBRARY so that TorchScript records them (torch.jit.script / trace) and a saved module runs wherever this
// library is loaded with torch.ops.load_library, without any Python class definitions.
//
//   medattn::local_attention(Tensor q, Tensor k, Tensor v, Tensor rel, int kernel_size, int heads) -> Tensor
//       float32 q, k, v (B, C, *spatial), 2 or 3 spatial dims; rel (K, C) float32; output float32, contiguous.
//   medattn::local_attention_int8(Tensor q, Tensor k, Tensor v, Tensor rel, int kernel_size, int heads,
//                                 Tensor? out_scale=None, Tensor? out_shift=None, bool relu=False) -> Tensor
//       q, k, v quint8 per-tensor affine (any memory format; channels-last, as FBGEMM convs produce, is read
//       without a copy); rel float32; output float32 (B, C, *spatial) in channels-last memory format (what the next
//       quantized projection reads), = relu?(out_scale[c] * attention + out_shift[c]) with the optional
//       per-channel epilogue (float32 (C,)). The three trailing arguments have defaults, so TorchScript files saved
//       with the six-argument form still load and run.
//   medattn::_local_attention_isa(..., str isa) / _local_attention_int8_isa(..., out_scale, out_shift, relu, str isa):
//       the same maths through one named code path ("avx512_vnni", "avx2" or "portable"), for cross-checking and
//       benchmarking every path on one machine; raises if this CPU lacks it.
//   medattn::implementations() -> str[]: "key=value" strings: fp32=<isa>, int8=<isa> (the paths the two ops above
//       run), selected_isa=<isa>, cpu_best_isa=<isa>, available_isas=<comma list, lowest first>.
//
// The public ops run the code path isa.cpp selects once per process: the best one this CPU supports (CPUID), or the
// one MEDATTN_ISA names (avx512_vnni | avx2 | portable); naming one this CPU lacks raises instead of running it.
//
// Inference only: calling with grad mode on and an input that requires grad raises (no backward is registered;
// train with the pure-PyTorch core).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "local_attention.h"

namespace medattn {
namespace {

constexpr int64_t kMaxInt8HeadChannels = 8192;

// Output of the kernels. Large outputs come fresh from mmap, and first-touch page faults of 4 KiB pages cost about
// as much as the attention itself (~1 us per page); asking for transparent huge pages on the untouched buffer
// makes that 2-3 times cheaper (the same as torch's THP_MEM_ALLOC_ENABLE, but for this buffer only). No-op where
// THP is off.
at::Tensor new_output(at::IntArrayRef sizes, at::MemoryFormat layout = at::MemoryFormat::Contiguous) {
  at::Tensor out = at::empty(sizes, at::TensorOptions().dtype(at::kFloat), layout);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(1) << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(out.nbytes());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = end & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return out;
}

void check_no_grad(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& rel) {
  const bool needs_grad = q.requires_grad() || k.requires_grad() || v.requires_grad() || rel.requires_grad();
  TORCH_CHECK(!(at::GradMode::is_enabled() && needs_grad), "medattn::", op,
              " is an inference-only kernel and has no backward, but an input requires grad with grad mode on. "
              "Call it under torch.no_grad() / torch.inference_mode(), or use the differentiable "
              "local_attention_torch core for training.");
}

AttentionGeometry check_geometry(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& rel, int64_t kernel_size, int64_t heads) {
  TORCH_CHECK(q.dim() == 4 || q.dim() == 5, "medattn::", op,
              ": q must be (B, C, *spatial) with 2 or 3 spatial dims, got shape ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "medattn::", op,
              ": q, k and v must have the same shape, got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && rel.device().is_cpu(),
              "medattn::", op, ": all inputs must be CPU tensors");
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1, "medattn::", op,
              ": kernel_size must be a positive odd integer, got ", kernel_size);
  const int64_t channels = q.size(1);
  TORCH_CHECK(heads >= 1 && channels % heads == 0, "medattn::", op, ": heads must be a positive integer dividing the ",
              channels, " channels, got ", heads);
  TORCH_CHECK(rel.scalar_type() == at::kFloat, "medattn::", op, ": rel must be float32, got ", rel.scalar_type());

  AttentionGeometry g;
  g.batch = q.size(0);
  g.channels = channels;
  g.heads = heads;
  g.volumetric = q.dim() == 5;
  g.depth = g.volumetric ? q.size(2) : 1;
  g.height = q.size(q.dim() - 2);
  g.width = q.size(q.dim() - 1);
  g.kernel_size = kernel_size;
  TORCH_CHECK(rel.dim() == 2 && rel.size(0) == g.neighbours() && rel.size(1) == channels, "medattn::", op,
              ": rel must have shape (kernel_size**spatial_dims, C) = (", g.neighbours(), ", ", channels,
              "), got ", rel.sizes());
  return g;
}

at::Tensor fp32_op(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& rel, int64_t kernel_size, int64_t heads, Isa isa) {
  TORCH_CHECK(!q.is_quantized() && !k.is_quantized() && !v.is_quantized(), "medattn::", op,
              ": got quantized q/k/v; use medattn::local_attention_int8 for quint8 inputs");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "medattn::", op, ": q, k and v must be float32, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  const AttentionGeometry g = check_geometry(op, q, k, v, rel, kernel_size, heads);
  check_no_grad(op, q, k, v, rel);
  if (kernel_size == 1) return v.contiguous().clone();  // softmax over one neighbour is 1: y = v
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), relc = rel.contiguous();
  at::Tensor out = new_output(q.sizes());
  if (out.numel() == 0) return out;
  local_attention_fp32(qc.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(), relc.data_ptr<float>(),
                       out.data_ptr<float>(), g, isa);
  return out;
}

QuantizedOperand quantized_operand(const at::Tensor& t) {
  QuantizedOperand o;
  o.data = reinterpret_cast<const uint8_t*>(t.data_ptr());
  o.scale = static_cast<float>(t.q_scale());
  o.zero_point = static_cast<int32_t>(t.q_zero_point());
  return o;
}

// A per-channel epilogue operand: float32 (C,), contiguous copy.
at::Tensor epilogue_operand(const char* op, const char* name, const std::optional<at::Tensor>& t, int64_t channels) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(!t->is_quantized() && t->scalar_type() == at::kFloat, "medattn::", op, ": ", name,
              " must be a float32 tensor, got ", t->scalar_type());
  TORCH_CHECK(t->numel() == channels, "medattn::", op, ": ", name, " must hold one value per channel (", channels,
              "), got shape ", t->sizes());
  TORCH_CHECK(t->device().is_cpu(), "medattn::", op, ": ", name, " must be a CPU tensor");
  return t->reshape({channels}).contiguous();
}

at::Tensor int8_op(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& rel, int64_t kernel_size, int64_t heads, const std::optional<at::Tensor>& out_scale,
                   const std::optional<at::Tensor>& out_shift, bool relu, Isa isa) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->is_quantized() && t->scalar_type() == at::kQUInt8, "medattn::", op,
                ": q, k and v must be quint8 quantized tensors (e.g. FBGEMM/x86 quantized conv outputs), got ",
                t->scalar_type(), "; use medattn::local_attention for float32 inputs");
    TORCH_CHECK(t->qscheme() == at::kPerTensorAffine, "medattn::", op,
                ": q, k and v must be quantized per tensor (affine), got qscheme ", toString(t->qscheme()));
  }
  const AttentionGeometry g = check_geometry(op, q, k, v, rel, kernel_size, heads);
  // int32 accumulation of the integer dot products and their zero-point corrections stays exact up to here
  TORCH_CHECK(g.head_channels() <= kMaxInt8HeadChannels, "medattn::", op, ": at most ", kMaxInt8HeadChannels,
              " channels per head are supported (int32 accumulation), got ", g.head_channels());
  check_no_grad(op, q, k, v, rel);
  const at::Tensor scale = epilogue_operand(op, "out_scale", out_scale, g.channels);
  const at::Tensor shift = epilogue_operand(op, "out_shift", out_shift, g.channels);
  // Channels-last is the layout FBGEMM's quantized convolutions produce: then this is a no-op.
  const auto layout = g.volumetric ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
  if (kernel_size == 1) {  // softmax over one neighbour is 1: y = v
    at::Tensor y = v.dequantize();
    std::vector<int64_t> channel_shape(q.dim(), 1);
    channel_shape[1] = g.channels;
    if (scale.defined()) y = y * scale.view(channel_shape);
    if (shift.defined()) y = y + shift.view(channel_shape);
    if (relu) y = at::relu(y);
    return y.contiguous(layout);
  }
  const at::Tensor qc = q.contiguous(layout), kc = k.contiguous(layout), vc = v.contiguous(layout);
  const at::Tensor relc = rel.contiguous();
  at::Tensor out = new_output(q.sizes(), layout);
  if (out.numel() == 0) return out;
  OutputEpilogue epilogue;
  epilogue.scale = scale.defined() ? scale.data_ptr<float>() : nullptr;
  epilogue.shift = shift.defined() ? shift.data_ptr<float>() : nullptr;
  epilogue.relu = relu;
  local_attention_int8(quantized_operand(qc), quantized_operand(kc), quantized_operand(vc), relc.data_ptr<float>(),
                       out.data_ptr<float>(), g, epilogue, isa);
  return out;
}

at::Tensor local_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rel,
                           int64_t kernel_size, int64_t heads) {
  return fp32_op("local_attention", q, k, v, rel, kernel_size, heads, selected_isa());
}

at::Tensor local_attention_isa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rel,
                               int64_t kernel_size, int64_t heads, const std::string& isa) {
  return fp32_op("_local_attention_isa", q, k, v, rel, kernel_size, heads, require_isa(isa, "medattn::_local_attention_isa"));
}

at::Tensor local_attention_int8_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& rel, int64_t kernel_size, int64_t heads,
                                   const std::optional<at::Tensor>& out_scale,
                                   const std::optional<at::Tensor>& out_shift, bool relu) {
  return int8_op("local_attention_int8", q, k, v, rel, kernel_size, heads, out_scale, out_shift, relu,
                 selected_isa());
}

at::Tensor local_attention_int8_isa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& rel, int64_t kernel_size, int64_t heads,
                                    const std::optional<at::Tensor>& out_scale,
                                    const std::optional<at::Tensor>& out_shift, bool relu, const std::string& isa) {
  return int8_op("_local_attention_int8_isa", q, k, v, rel, kernel_size, heads, out_scale, out_shift, relu,
                 require_isa(isa, "medattn::_local_attention_int8_isa"));
}

std::vector<std::string> implementations() {
  const std::string selected = isa_name(selected_isa());  // raises for a bad MEDATTN_ISA
  std::string available;
  for (Isa isa : {Isa::kPortable, Isa::kAvx2, Isa::kAvx512Vnni}) {
    if (!cpu_supports(isa)) continue;
    if (!available.empty()) available += ",";
    available += isa_name(isa);
  }
  // both cores run the same path: the avx512_vnni path's FP32 core uses AVX-512F only
  return {"fp32=" + selected, "int8=" + selected, "selected_isa=" + selected,
          std::string("cpu_best_isa=") + isa_name(cpu_best_isa()), "available_isas=" + available};
}

}  // namespace
}  // namespace medattn

// Catch-all kernels: the same function serves float (CPU) and quantized (QuantizedCPU) inputs and checks dtypes
// itself, so a wrong dtype gets a message naming the right op instead of a dispatcher error.
TORCH_LIBRARY(medattn, m) {
  m.def("local_attention(Tensor q, Tensor k, Tensor v, Tensor rel, int kernel_size, int heads) -> Tensor",
        &medattn::local_attention);
  m.def(
      "local_attention_int8(Tensor q, Tensor k, Tensor v, Tensor rel, int kernel_size, int heads, "
      "Tensor? out_scale=None, Tensor? out_shift=None, bool relu=False) -> Tensor",
      &medattn::local_attention_int8_op);
  m.def(
      "_local_attention_isa(Tensor q, Tensor k, Tensor v, Tensor rel, int kernel_size, int heads, str isa) -> Tensor",
      &medattn::local_attention_isa);
  m.def(
      "_local_attention_int8_isa(Tensor q, Tensor k, Tensor v, Tensor rel, int kernel_size, int heads, "
      "Tensor? out_scale, Tensor? out_shift, bool relu, str isa) -> Tensor",
      &medattn::local_attention_int8_isa);
  m.def("implementations() -> str[]", &medattn::implementations);
}
