// Test extension: runs the project's CUDA kernels (csrc/cuda/*.cuh), the
// harness self-tests and the deliberately broken kernels on the CPU through
// the emulation harness (csrc/emu/cuda_emu.h), on CPU tensors. Ops live in
// torch.ops.fastmlp_emu_test; built by tests/test_emu.py.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "emu/cuda_emu.h"
// The kernel outside fastmlp::cuda uses its own dynamic shared memory name.
FASTMLP_EMU_DYNAMIC_SMEM(fastmlp_emu_tests, buf)
FASTMLP_EMU_TLS_INIT_STUB(fastmlp_emu_tls_init_tests_buf, "_ZTHN17fastmlp_emu_tests3bufE")

#include "broken_kernels.cuh"
#include "common/bce_ops.h"
#include "common/optim_ops.h"
#include "cuda/kernel_params.h"
#include "cuda/optim.cuh"
#include "selftest_kernels.cuh"

namespace {

using fastmlp_emu::Access;
using fastmlp_emu::BufferSpec;
namespace fc = fastmlp::cuda;
constexpr cudaStream_t kStream = nullptr;

// The memory a (non-negatively strided) tensor's elements span.
BufferSpec buffer(const char* name, const at::Tensor& t, Access access) {
  BufferSpec s;
  s.name = name;
  s.access = access;
  if (!t.defined()) return s;
  s.data = t.data_ptr();
  s.elem_size = t.element_size();
  if (t.numel() > 0) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) {
      TORCH_CHECK(t.stride(d) >= 0, "emu harness: negative strides are not supported");
      last += (t.size(d) - 1) * t.stride(d);
    }
    s.bytes = static_cast<size_t>(last + 1) * s.elem_size;
  }
  return s;
}

// Registers the defined tensors for the memory checks of the launches in scope.
struct Device {
  std::vector<BufferSpec> specs;
  Device& in(const char* name, const at::Tensor& t) { return add(name, t, Access::kReadOnly); }
  Device& inout(const char* name, const at::Tensor& t) { return add(name, t, Access::kReadWrite); }
  Device& out(const char* name, const at::Tensor& t) { return add(name, t, Access::kWriteFirst); }
  Device& add(const char* name, const at::Tensor& t, Access a) {
    if (t.defined()) specs.push_back(buffer(name, t, a));
    return *this;
  }
};

// Outputs start as NaN (or a sentinel for integers) so an element no kernel
// wrote cannot pass for a result.
at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& opts) {
  if (at::isFloatingType(opts.dtype().toScalarType())) {
    return at::full(shape, std::numeric_limits<double>::quiet_NaN(), opts);
  }
  return at::full(shape, -12345, opts);
}


// ---- harness self-tests ------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> block_sum(const at::Tensor& x, int64_t blocks) {
  TORCH_CHECK(x.is_contiguous() && blocks > 0);
  at::Tensor partial = empty_output({blocks}, x.options());
  at::Tensor positives = empty_output({blocks}, x.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "block_sum", [&] {
    fastmlp_emu::BufferScope scope(Device().in("x", x).out("partial", partial).out("positives", positives).specs);
    fc::launch_kernel(fc::selftest_block_sum<scalar_t>, dim3(blocks), dim3(fc::kSelftestThreads), 0, kStream,
                      x.data_ptr<scalar_t>(), x.numel(), partial.data_ptr<scalar_t>(), positives.data_ptr<int>());
  });
  return {partial, positives};
}

at::Tensor warp_row_sum(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous());
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor out = empty_output({rows, 2}, x.options());
  const int64_t blocks = (rows + 3) / 4;
  const unsigned gx = static_cast<unsigned>(blocks < 3 ? blocks : 3);  // a 2-D grid of 4-warp blocks
  const unsigned gy = static_cast<unsigned>((blocks + gx - 1) / gx);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "warp_row_sum", [&] {
    fastmlp_emu::BufferScope scope(Device().in("x", x).out("out", out).specs);
    fc::launch_kernel(fc::selftest_warp_row_sum<scalar_t>, dim3(gx, gy), dim3(128), 0, kStream,
                      x.data_ptr<scalar_t>(), rows, cols, out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor warp_ops(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == at::kInt && x.is_contiguous());
  at::Tensor out = empty_output({x.size(0), fc::kWarpOpsOut}, x.options());
  fastmlp_emu::BufferScope scope(Device().in("x", x).out("out", out).specs);
  fc::launch_kernel(fc::selftest_warp_ops, dim3(1), dim3(static_cast<unsigned>(x.size(0))), 0, kStream,
                    x.data_ptr<int>(), out.data_ptr<int>());
  return out;
}

at::Tensor reverse_chunks(const at::Tensor& x, int64_t block) {
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous());
  at::Tensor y = empty_output({x.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "reverse_chunks", [&] {
    fastmlp_emu::BufferScope scope(Device().in("x", x).out("y", y).specs);
    fc::launch_kernel(fc::selftest_reverse_chunks<scalar_t>, dim3((x.size(0) + block - 1) / block),
                      dim3(static_cast<unsigned>(block)), block * sizeof(scalar_t), kStream, x.data_ptr<scalar_t>(),
                      y.data_ptr<scalar_t>(), x.size(0));
  });
  return y;
}

at::Tensor transpose(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous());
  const int rows = static_cast<int>(x.size(0)), cols = static_cast<int>(x.size(1));
  at::Tensor y = empty_output({cols, rows}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "transpose", [&] {
    fastmlp_emu::BufferScope scope(Device().in("x", x).out("y", y).specs);
    fc::launch_kernel(fc::selftest_transpose<scalar_t>, dim3((cols + fc::kTile - 1) / fc::kTile,
                                                             (rows + fc::kTile - 1) / fc::kTile),
                      dim3(fc::kTile, fc::kTileRows), 0, kStream, x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rows,
                      cols);
  });
  return y;
}

at::Tensor scale_by_smem_size(const at::Tensor& x, int64_t smem_floats, bool opt_in) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous());
  at::Tensor y = empty_output(x.sizes(), x.options());
  const size_t bytes = static_cast<size_t>(smem_floats) * sizeof(float);
  if (opt_in) {
    TORCH_CHECK(cudaFuncSetAttribute(fastmlp_emu_tests::scale_by_smem_size,
                                     cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(bytes)) == cudaSuccess,
                "cudaFuncSetAttribute failed");
  }
  fastmlp_emu::BufferScope scope(Device().in("x", x).out("y", y).specs);
  fc::launch_kernel(fastmlp_emu_tests::scale_by_smem_size, dim3(1), dim3(64), bytes, kStream, x.data_ptr<float>(),
                    y.data_ptr<float>(), x.numel(), static_cast<int>(smem_floats));
  return y;
}

// ---- deliberately broken kernels ---------------------------------------------

template <bool kBug> void run_broken(const std::string& name, const at::Tensor& x, at::Tensor& y, at::Tensor& part) {
  const int64_t n = x.numel();
  const unsigned blocks = static_cast<unsigned>((n + fc::kBrokenThreads - 1) / fc::kBrokenThreads);
  const dim3 grid(blocks), block(fc::kBrokenThreads);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (name == "off_by_one_read") {
    fc::launch_kernel(fc::broken_sum_off_by_one<kBug>, grid, block, 0, kStream, xp, n, part.data_ptr<float>());
  } else if (name == "off_by_one_write") {
    fc::launch_kernel(fc::broken_copy_write_past_end<kBug>, grid, block, 0, kStream, xp, yp, n);
  } else if (name == "scan_missing_sync") {
    fc::launch_kernel(fc::broken_scan_missing_sync<kBug>, grid, block, 0, kStream, xp, yp, n);
  } else if (name == "reverse_missing_sync") {
    fc::launch_kernel(fc::broken_reverse_missing_sync<kBug>, grid, block, 0, kStream, xp, yp, n);
  } else if (name == "early_return_barrier") {
    fc::launch_kernel(fc::broken_early_return_barrier<kBug>, grid, block, 0, kStream, xp, yp, n);
  } else if (name == "two_barrier_sites") {
    fc::launch_kernel(fc::broken_two_barrier_sites<kBug>, grid, block, 0, kStream, xp, yp, n);
  } else if (name == "shuffle_exited_lanes") {
    fc::launch_kernel(fc::broken_shuffle_exited_lanes<kBug>, grid, block, 0, kStream, xp, yp, n);
  } else if (name == "partials_same_slot") {
    fc::launch_kernel(fc::broken_partials_same_slot<kBug>, grid, block, 0, kStream, xp, n, part.data_ptr<float>());
  } else if (name == "dynamic_smem_overrun") {
    fc::launch_kernel(fc::broken_dynamic_smem_overrun<kBug>, grid, block, fc::kBrokenThreads * sizeof(float),
                      kStream, xp, yp, n);
  } else if (name == "warp_exchange_missing_syncwarp") {
    fc::launch_kernel(fc::broken_warp_exchange_missing_syncwarp<kBug>, grid, block, 0, kStream, xp, yp, n);
  } else if (name == "shuffle_mask_misses_lanes") {
    fc::launch_kernel(fc::broken_shuffle_mask_misses_lanes<kBug>, grid, block, 0, kStream, xp, yp, n);
  } else if (name == "writes_input") {
    fc::launch_kernel(fc::broken_writes_input<kBug>, grid, block, 0, kStream, x.data_ptr<float>(), yp, n);
  } else {
    TORCH_CHECK(false, "unknown broken kernel ", name);
  }
}

// Returns (y, per-block partials); the tests compare the bug-free runs with torch.
std::tuple<at::Tensor, at::Tensor> broken(const std::string& name, bool bug, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 1 && x.is_contiguous() && x.numel() > 0);
  at::Tensor y = empty_output({x.numel()}, x.options());
  at::Tensor part = empty_output({(x.numel() + fc::kBrokenThreads - 1) / fc::kBrokenThreads}, x.options());
  fastmlp_emu::BufferScope scope(Device().in("x", x).out("y", y).out("partials", part).specs);
  if (bug) {
    run_broken<true>(name, x, y, part);
  } else {
    run_broken<false>(name, x, y, part);
  }
  return {y, part};
}

// ---- the project's kernels ---------------------------------------------------

// c[M, N] = epilogue((a * (mask > 0))[M, K] . b[K, N]), rowsum[M] = row sums of
// the masked a, through launch_gemm with the split-K choice of a device with
// `sm_count` SMs. Returns (c, rowsum, splits); c / rowsum undefined if not wanted.
using MaybeTensor = std::optional<at::Tensor>;
MaybeTensor maybe(const at::Tensor& t) { return t.defined() ? MaybeTensor(t) : std::nullopt; }

std::tuple<MaybeTensor, MaybeTensor, int64_t> gemm(const at::Tensor& a, const at::Tensor& b,
                                                  const std::optional<at::Tensor>& a_mask,
                                                  const std::optional<at::Tensor>& bias, bool relu, bool want_c,
                                                  bool want_rowsum, int64_t sm_count) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0) && a.scalar_type() == b.scalar_type());
  const at::Tensor mask = a_mask.has_value() ? *a_mask : at::Tensor();
  const at::Tensor bias_t = bias.has_value() ? *bias : at::Tensor();
  if (mask.defined()) TORCH_CHECK(mask.sizes() == a.sizes());
  if (bias_t.defined()) TORCH_CHECK(bias_t.dim() == 1 && bias_t.is_contiguous() && bias_t.size(0) == b.size(1));
  at::Tensor c = want_c ? empty_output({a.size(0), b.size(1)}, a.options()) : at::Tensor();
  at::Tensor rowsum = want_rowsum ? empty_output({a.size(0)}, a.options()) : at::Tensor();
  int64_t splits = 0;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "emu_gemm", [&] {
    using acc = fastmlp::acc_t<scalar_t>;
    fc::GemmParams<scalar_t> p;
    p.M = a.size(0);
    p.N = want_c ? b.size(1) : 0;
    p.K = a.size(1);
    p.a = fc::strided<scalar_t>(a);
    if (mask.defined()) p.a_mask = fc::strided<scalar_t>(mask);
    p.b = fc::strided<scalar_t>(b);
    p.bias = bias_t.defined() ? bias_t.const_data_ptr<scalar_t>() : nullptr;
    p.relu = relu;
    p.c = fc::ptr_or_null<scalar_t>(c);
    p.a_rowsum = fc::ptr_or_null<scalar_t>(rowsum);
    fc::choose_splits(p.M, p.N, p.K, static_cast<int>(sm_count), &p.splits, &p.k_chunk);
    splits = p.splits;
    const int64_t ws_elems = fc::gemm_workspace_elems(p);
    at::Tensor ws = ws_elems > 0 ? empty_output({ws_elems}, a.options().dtype(c10::CppTypeToScalarType<acc>::value))
                                 : at::Tensor();
    fastmlp_emu::BufferScope scope(Device()
                                       .in("a", a)
                                       .in("a_mask", mask)
                                       .in("b", b)
                                       .in("bias", bias_t)
                                       .out("c", c)
                                       .out("a_rowsum", rowsum)
                                       .out("workspace", ws)
                                       .specs);
    fc::launch_gemm(p, fc::ptr_or_null<acc>(ws), kStream);
  });
  return {maybe(c), maybe(rowsum), splits};
}

// weight / pos_weight repeat with period numel() along the flattened input,
// as in csrc/cuda/bce_backend.cuh. Returns (loss, grad_input or undefined).
std::tuple<at::Tensor, MaybeTensor> bce_forward(const at::Tensor& x, const at::Tensor& y,
                                               const std::optional<at::Tensor>& weight,
                                               const std::optional<at::Tensor>& pos_weight, int64_t reduction,
                                               bool want_grad) {
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous() && x.sizes() == y.sizes());
  const at::Tensor w = fastmlp::bce_pattern(weight);
  const at::Tensor pw = fastmlp::bce_pattern(pos_weight);
  at::Tensor loss = reduction == 0 ? empty_output(x.sizes(), x.options()) : empty_output({}, x.options());
  at::Tensor grad = want_grad && reduction != 0 ? empty_output(x.sizes(), x.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "emu_bce_fwd", [&] {
    using acc = fastmlp::acc_t<scalar_t>;
    fc::BceParams<scalar_t> p = fc::bce_params_of<scalar_t>(x, y, w, pw, reduction);
    p.loss = loss.data_ptr<scalar_t>();
    p.grad_input = fc::ptr_or_null<scalar_t>(grad);
    at::Tensor ws = empty_output({fc::bce_workspace_elems(p.n)}, x.options().dtype(c10::CppTypeToScalarType<acc>::value));
    fastmlp_emu::BufferScope scope(Device()
                                       .in("input", x)
                                       .in("target", y)
                                       .in("weight", w)
                                       .in("pos_weight", pw)
                                       .out("loss", loss)
                                       .out("grad_input", grad)
                                       .out("workspace", ws)
                                       .specs);
    fc::launch_bce_forward(p, ws.data_ptr<acc>(), kStream);
  });
  return {loss, maybe(grad)};
}

std::tuple<MaybeTensor, MaybeTensor> bce_backward(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& y,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& pos_weight, int64_t reduction,
                                                bool want_input, bool want_target) {
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous() && grad_loss.is_contiguous() && x.sizes() == y.sizes());
  const at::Tensor w = fastmlp::bce_pattern(weight);
  const at::Tensor pw = fastmlp::bce_pattern(pos_weight);
  at::Tensor gi = want_input ? empty_output(x.sizes(), x.options()) : at::Tensor();
  at::Tensor gt = want_target ? empty_output(x.sizes(), x.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "emu_bce_bwd", [&] {
    fc::BceParams<scalar_t> p = fc::bce_params_of<scalar_t>(x, y, w, pw, reduction);
    p.grad_output = grad_loss.const_data_ptr<scalar_t>();
    p.grad_input = fc::ptr_or_null<scalar_t>(gi);
    p.grad_target = fc::ptr_or_null<scalar_t>(gt);
    fastmlp_emu::BufferScope scope(Device()
                                       .in("grad_output", grad_loss)
                                       .in("input", x)
                                       .in("target", y)
                                       .in("weight", w)
                                       .in("pos_weight", pw)
                                       .out("grad_input", gi)
                                       .out("grad_target", gt)
                                       .specs);
    fc::launch_bce_backward(p, kStream);
  });
  return {maybe(gi), maybe(gt)};
}

// fastmlp::mlp_bce_step's fused kernel (cuda/fused_chain.cuh) as planned for a
// device with `sm_count` SMs and `smem_optin` bytes of shared memory per block.
// Returns (loss, grad_input, grad_weights, grad_biases, blocks, grads_in_smem);
// gradients not asked for are empty; blocks == 0: the chain does not qualify.
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, int64_t, int64_t> fused_step(
    const at::Tensor& input, const at::Tensor& target, at::TensorList weights,
    const c10::List<std::optional<at::Tensor>>& biases, bool last_relu, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& pos_weight, int64_t reduction, bool input_grad,
    const c10::List<bool>& weight_mask, const c10::List<bool>& bias_mask, int64_t sm_count, int64_t smem_optin) {
  TORCH_CHECK(input.dim() == 2 && target.is_contiguous() && weights.size() == biases.size() &&
              weights.size() == weight_mask.size() && weights.size() == bias_mask.size());
  for (const at::Tensor& w : weights) TORCH_CHECK(w.scalar_type() == input.scalar_type());
  const fc::ContiguousChain chain(weights, biases);
  const at::Tensor lw = fastmlp::bce_pattern(weight);
  const at::Tensor pw = fastmlp::bce_pattern(pos_weight);
  std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, int64_t, int64_t> result{
      at::empty({0}, input.options()), at::empty({0}, input.options()), {}, {}, 0, 0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "emu_fused_step", [&] {
    using acc = fastmlp::acc_t<scalar_t>;
    fc::FusedChainParams<scalar_t> p =
        fc::fused_step_params_of<scalar_t>(input, target, chain, last_relu, lw, pw, reduction);
    fc::FusedStepOutputs o = fc::fused_step_outputs(p, input, chain.weights, input_grad, weight_mask, bias_mask,
                                                    [](at::IntArrayRef shape, const at::TensorOptions& opts) {
                                                      return empty_output(shape, opts);
                                                    });
    fc::FusedChainPlan plan;
    if (!fc::plan_fused_step(p, static_cast<int>(sm_count), static_cast<size_t>(smem_optin), &plan)) return;
    at::Tensor ws = empty_output({fc::fused_step_workspace_elems(p, plan.blocks)},
                                 input.options().dtype(c10::CppTypeToScalarType<acc>::value));
    Device dev;
    dev.in("input", input).in("target", target).in("weight", lw).in("pos_weight", pw);
    for (size_t l = 0; l < weights.size(); ++l) {
      dev.in("weights[l]", chain.weights[l]);
      if (chain.biases.get(l).has_value()) dev.in("biases[l]", *chain.biases.get(l));
      if (weight_mask[l]) dev.out("grad_weights[l]", o.grad_weight[l]);
      if (bias_mask[l]) dev.out("grad_biases[l]", o.grad_bias[l]);
    }
    dev.out("loss", o.loss).out("workspace", ws);
    if (input_grad) dev.out("grad_input", o.grad_input);
    fastmlp_emu::BufferScope scope(dev.specs);
    fc::launch_fused_step(p, plan, ws.data_ptr<acc>(), kStream);
    result = {o.loss, o.grad_input, o.grad_weight, o.grad_bias, plan.blocks, p.grads_in_smem ? 1 : 0};
  });
  return result;
}

// fastmlp::mlp_forward's fused kernel, planned as for fused_step. Returns
// (every layer's activations, blocks); blocks == 0: the chain does not qualify.
std::tuple<std::vector<at::Tensor>, int64_t> fused_forward(const at::Tensor& input, at::TensorList weights,
                                                           const c10::List<std::optional<at::Tensor>>& biases,
                                                           bool last_relu, int64_t sm_count, int64_t smem_optin) {
  TORCH_CHECK(input.dim() == 2 && weights.size() == biases.size());
  const fc::ContiguousChain chain(weights, biases);
  std::tuple<std::vector<at::Tensor>, int64_t> result{std::vector<at::Tensor>{}, 0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "emu_fused_forward", [&] {
    fc::FusedChainParams<scalar_t> p = fc::fused_chain_params_of<scalar_t>(input, chain, last_relu);
    fc::FusedChainPlan plan;
    if (!fc::plan_fused_forward(p, static_cast<int>(sm_count), static_cast<size_t>(smem_optin), &plan)) return;
    Device dev;
    dev.in("input", input);
    std::vector<at::Tensor> acts;
    for (int l = 0; l < p.layers; ++l) {
      dev.in("weights[l]", chain.weights[l]);
      if (chain.biases.get(l).has_value()) dev.in("biases[l]", *chain.biases.get(l));
      acts.push_back(empty_output({p.batch, p.width[l]}, input.options()));
      dev.out("activations[l]", acts.back());
      p.activation[l] = acts.back().data_ptr<scalar_t>();
    }
    fastmlp_emu::BufferScope scope(dev.specs);
    fc::launch_fused_forward(p, plan, kStream);
    result = {acts, plan.blocks};
  });
  return result;
}

// fastmlp::optimizer_step's CUDA kernels (cuda/optim.cuh) behind the same
// OptimOps as the CPU and CUDA backends, on CPU tensors.
template <typename T> BufferSpec span(const char* name, const T* data, int64_t numel, Access access) {
  BufferSpec s;
  s.name = name;
  s.access = access;
  s.data = data;
  s.elem_size = sizeof(T);
  s.bytes = static_cast<size_t>(numel) * sizeof(T);
  return s;
}

// kDeviceSteps: Adam's step counts (CPU tensors here) treated as the CUDA
// backend treats one on the GPU: advanced by the kernels, not the host.
template <bool kDeviceSteps> struct EmuOptimKernels {
  struct Guard {
    explicit Guard(const c10::Device&) {}
  };
  static bool step_on_device(const at::Tensor&, const at::Tensor&) { return kDeviceSteps; }

  template <typename T, class Slot, class Launch>
  static void run(const std::vector<Slot>& slots, std::optional<double> max_grad_norm, const at::Tensor& like,
                  const Launch& launch) {
    using acc = fastmlp::acc_t<T>;
    TORCH_CHECK(slots.size() <= static_cast<size_t>(fc::kOptimMaxSlots));
    fc::SlotBatch<Slot> b;
    for (const Slot& s : slots) fc::add_slot(b, s);
    std::vector<BufferSpec> specs;
    const Access grad_access = max_grad_norm.has_value() ? Access::kReadWrite : Access::kReadOnly;
    for (const Slot& s : slots) {
      specs.push_back(span("param", s.param, s.numel, Access::kReadWrite));
      specs.push_back(span("grad", s.grad, s.numel, grad_access));
      for (T* state : state_of(s)) {
        if (state != nullptr) specs.push_back(span("state", state, s.numel, Access::kReadWrite));
      }
      add_step_spec(specs, s);
    }
    at::Tensor ws;
    if (max_grad_norm.has_value()) {
      ws = empty_output({fc::clip_workspace_elems(b)}, like.options().dtype(c10::CppTypeToScalarType<acc>::value));
      specs.push_back(span("workspace", ws.data_ptr<acc>(), ws.numel(), Access::kWriteFirst));
    }
    fastmlp_emu::BufferScope scope(specs);
    const acc* coef = nullptr;
    if (max_grad_norm.has_value()) {
      fc::launch_clip_coef<T>(b, *max_grad_norm, ws.data_ptr<acc>(), kStream);
      coef = ws.data_ptr<acc>() + b.first_chunk[b.count];
    }
    launch(b, coef);
  }

  template <typename T> static void add_step_spec(std::vector<BufferSpec>&, const fastmlp::SgdSlot<T>&) {}
  template <typename T> static void add_step_spec(std::vector<BufferSpec>& specs, const fastmlp::AdamSlot<T>& s) {
    if (s.step.f32 != nullptr) specs.push_back(span("step", s.step.f32, 1, Access::kReadWrite));
    if (s.step.f64 != nullptr) specs.push_back(span("step", s.step.f64, 1, Access::kReadWrite));
  }

  template <typename T> static std::vector<T*> state_of(const fastmlp::SgdSlot<T>& s) { return {s.momentum_buffer}; }
  template <typename T> static std::vector<T*> state_of(const fastmlp::AdamSlot<T>& s) {
    return {s.exp_avg, s.exp_avg_sq, s.max_exp_avg_sq};
  }

  template <typename T>
  static void sgd(const std::vector<fastmlp::SgdSlot<T>>& slots, std::optional<double> max_grad_norm,
                  const at::Tensor& like) {
    run<T>(slots, max_grad_norm, like, [](const auto& b, const auto* coef) { fc::launch_sgd<T>(b, coef, kStream); });
  }

  template <typename T>
  static void adam(const std::vector<fastmlp::AdamSlot<T>>& slots, std::optional<double> max_grad_norm,
                   const at::Tensor& like) {
    run<T>(slots, max_grad_norm, like, [](const auto& b, const auto* coef) { fc::launch_adam<T>(b, coef, kStream); });
  }
};

// [memcheck compiled, launches, blocks, fiber switches, checked accesses]
std::vector<int64_t> stats() {
  const auto& s = fastmlp_emu::stats();
  return {fastmlp_emu::memcheck_compiled(), static_cast<int64_t>(s.launches), static_cast<int64_t>(s.blocks),
          static_cast<int64_t>(s.switches), static_cast<int64_t>(s.checked_accesses)};
}

}  // namespace

TORCH_LIBRARY(fastmlp_emu_test, m) {
  m.def("block_sum(Tensor x, int blocks) -> (Tensor, Tensor)", &block_sum);
  m.def("warp_row_sum(Tensor x) -> Tensor", &warp_row_sum);
  m.def("warp_ops(Tensor x) -> Tensor", &warp_ops);
  m.def("reverse_chunks(Tensor x, int block) -> Tensor", &reverse_chunks);
  m.def("transpose(Tensor x) -> Tensor", &transpose);
  m.def("scale_by_smem_size(Tensor x, int smem_floats, bool opt_in) -> Tensor", &scale_by_smem_size);
  m.def("broken(str name, bool bug, Tensor x) -> (Tensor, Tensor)", &broken);
  m.def("gemm(Tensor a, Tensor b, Tensor? a_mask, Tensor? bias, bool relu, bool want_c, bool want_rowsum, "
        "int sm_count) -> (Tensor?, Tensor?, int)",
        &gemm);
  m.def("bce_forward(Tensor x, Tensor y, Tensor? weight, Tensor? pos_weight, int reduction, bool want_grad) "
        "-> (Tensor, Tensor?)",
        &bce_forward);
  m.def("bce_backward(Tensor grad_loss, Tensor x, Tensor y, Tensor? weight, Tensor? pos_weight, int reduction, "
        "bool want_input, bool want_target) -> (Tensor?, Tensor?)",
        &bce_backward);
  m.def("fused_step(Tensor input, Tensor target, Tensor[] weights, Tensor?[] biases, bool last_relu, "
        "Tensor? weight, Tensor? pos_weight, int reduction, bool input_grad, bool[] weight_mask, bool[] bias_mask, "
        "int sm_count, int smem_optin) -> (Tensor, Tensor, Tensor[], Tensor[], int, int)",
        &fused_step);
  m.def("fused_forward(Tensor input, Tensor[] weights, Tensor?[] biases, bool last_relu, int sm_count, "
        "int smem_optin) -> (Tensor[], int)",
        &fused_forward);
  m.def("optimizer_step(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] state, int optimizer, float[] hyper, "
        "float? max_grad_norm) -> ()",
        &fastmlp::OptimOps<EmuOptimKernels<false>>::step);
  m.def("optimizer_step_device_steps(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] state, int optimizer, "
        "float[] hyper, float? max_grad_norm) -> ()",
        &fastmlp::OptimOps<EmuOptimKernels<true>>::step);
  m.def("stats() -> int[]", &stats);
}

// ---- MSE and softmax cross-entropy (csrc/cuda/mse.cuh, cross_entropy.cuh) -----

#include "cuda/loss_params.h"

namespace {

// Returns (loss, grad_input or undefined), as fastmlp::mse_forward.
std::tuple<at::Tensor, MaybeTensor> mse_forward(const at::Tensor& x, const at::Tensor& y, int64_t reduction,
                                                bool want_grad) {
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous() && x.sizes() == y.sizes());
  at::Tensor loss = reduction == 0 ? empty_output(x.sizes(), x.options()) : empty_output({}, x.options());
  at::Tensor grad = want_grad && reduction != 0 ? empty_output(x.sizes(), x.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "emu_mse_fwd", [&] {
    using acc = fastmlp::acc_t<scalar_t>;
    fc::MseParams<scalar_t> p = fc::mse_params_of<scalar_t>(x, y, reduction);
    p.loss = loss.data_ptr<scalar_t>();
    p.grad_input = fc::loss_ptr_or_null<scalar_t>(grad);
    at::Tensor ws = empty_output({fc::mse_workspace_elems(p.n)}, x.options().dtype(c10::CppTypeToScalarType<acc>::value));
    fastmlp_emu::BufferScope scope(
        Device().in("input", x).in("target", y).out("loss", loss).out("grad_input", grad).out("workspace", ws).specs);
    fc::launch_mse_forward(p, ws.data_ptr<acc>(), kStream);
  });
  return {loss, maybe(grad)};
}

std::tuple<MaybeTensor, MaybeTensor> mse_backward(const at::Tensor& grad_loss, const at::Tensor& x,
                                                  const at::Tensor& y, int64_t reduction, bool want_input,
                                                  bool want_target) {
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous() && grad_loss.is_contiguous() && x.sizes() == y.sizes());
  at::Tensor gi = want_input ? empty_output(x.sizes(), x.options()) : at::Tensor();
  at::Tensor gt = want_target ? empty_output(x.sizes(), x.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "emu_mse_bwd", [&] {
    fc::MseParams<scalar_t> p = fc::mse_params_of<scalar_t>(x, y, reduction);
    p.grad_output = grad_loss.const_data_ptr<scalar_t>();
    p.grad_input = fc::loss_ptr_or_null<scalar_t>(gi);
    p.grad_target = fc::loss_ptr_or_null<scalar_t>(gt);
    fastmlp_emu::BufferScope scope(Device()
                                       .in("grad_output", grad_loss)
                                       .in("input", x)
                                       .in("target", y)
                                       .out("grad_input", gi)
                                       .out("grad_target", gt)
                                       .specs);
    fc::launch_mse_backward(p, kStream);
  });
  return {maybe(gi), maybe(gt)};
}

// Forward (grad_output undefined): (loss, grad_input of the reduced loss or
// undefined); backward (grad_output given): (undefined, grad_input).
std::tuple<MaybeTensor, MaybeTensor> cross_entropy(const std::optional<at::Tensor>& grad_output, const at::Tensor& x,
                                                   const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                                   int64_t reduction, int64_t ignore_index, double smoothing,
                                                   bool want_grad) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && target.is_contiguous());
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor go = grad_output.has_value() ? grad_output->contiguous() : at::Tensor();
  const bool forward = !go.defined();
  at::Tensor loss = forward ? (reduction == 0 ? empty_output({x.size(0)}, x.options()) : empty_output({}, x.options()))
                            : at::Tensor();
  at::Tensor grad = (forward ? want_grad && reduction != 0 : true) ? empty_output(x.sizes(), x.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "emu_cross_entropy", [&] {
    using acc = fastmlp::acc_t<scalar_t>;
    fc::CeParams<scalar_t> p = fc::ce_params_of<scalar_t>(x, target, w, reduction, ignore_index, smoothing);
    p.loss = fc::loss_ptr_or_null<scalar_t>(loss);
    p.grad_input = fc::loss_ptr_or_null<scalar_t>(grad);
    p.grad_output = go.defined() ? go.const_data_ptr<scalar_t>() : nullptr;
    at::Tensor ws = empty_output({fc::ce_workspace_elems(p.rows, p.classes)},
                                 x.options().dtype(c10::CppTypeToScalarType<acc>::value));
    fastmlp_emu::BufferScope scope(Device()
                                       .in("grad_output", go)
                                       .in("input", x)
                                       .in("target", target)
                                       .in("weight", w)
                                       .out("loss", loss)
                                       .out("grad_input", grad)
                                       .out("workspace", ws)
                                       .specs);
    fc::launch_cross_entropy(p, ws.data_ptr<acc>(), kStream);
  });
  return {maybe(loss), maybe(grad)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastmlp_emu_test, m) {
  m.def("mse_forward(Tensor x, Tensor y, int reduction, bool want_grad) -> (Tensor, Tensor?)", &mse_forward);
  m.def("mse_backward(Tensor grad_loss, Tensor x, Tensor y, int reduction, bool want_input, bool want_target) "
        "-> (Tensor?, Tensor?)",
        &mse_backward);
  m.def("cross_entropy(Tensor? grad_output, Tensor x, Tensor target, Tensor? weight, int reduction, "
        "int ignore_index, float smoothing, bool want_grad) -> (Tensor?, Tensor?)",
        &cross_entropy);
}

// ---- the cuBLAS layer path (common/aten_layers.h, cuda/layer_backend.cuh) ------
// The CUDA backend runs a wide layer through these ATen calls; LayerOps over them
// here is the same composition on CPU tensors (BLAS instead of cuBLAS).

#include "common/aten_layers.h"
#include "common/layer_ops.h"

namespace {

struct AtenLayerKernels {
  struct Guard {
    explicit Guard(const c10::Device&) {}
  };
  static void linear_act_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                              const c10::optional<at::Tensor>& bias, bool relu) {
    fastmlp::aten_linear_act_into(out, x, w, bias, relu);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_backward(const at::Tensor& g, const at::Tensor& x,
                                                                       const at::Tensor& w, const at::Tensor& y,
                                                                       bool relu, bool want_x, bool want_w,
                                                                       bool want_b) {
    return fastmlp::aten_layer_backward(g, x, w, y, relu, want_x, want_w, want_b);
  }
};

using AtenLayers = fastmlp::LayerOps<AtenLayerKernels>;

bool gemm_on_cublas(int64_t M, int64_t N, int64_t K, bool half_type) {
  return fc::gemm_on_cublas(M, N, K, half_type);
}

int64_t gemm_grid_tiles(int64_t M, int64_t N) { return fc::gemm_grid_tiles(M, N); }

// The fused step's and forward's plans (cuda/fused_chain.cuh) for a chain of
// `widths` on `in_features` inputs, every gradient asked for, on a device with
// `sm_count` SMs and `smem_optin` bytes of shared memory per block, without
// running anything. Returns (tile_rows, blocks, grads_in_smem, smem_bytes,
// fused_preferred: the heuristic against the layer path); blocks == 0: the
// chain does not qualify.
template <typename scalar_t>
std::vector<int64_t> plan_of(int64_t batch, int64_t in_features, c10::IntArrayRef widths, bool forward,
                             int64_t sm_count, int64_t smem_optin) {
  fc::FusedChainParams<scalar_t> p;
  p.batch = batch;
  p.in_features = in_features;
  p.layers = static_cast<int>(widths.size());
  if (widths.empty() || widths.size() > static_cast<size_t>(fc::kChainMaxLayers)) return {0, 0, 0, 0, 0};
  // Planning only tests the gradient pointers for null; it never dereferences them.
  static scalar_t slot;
  for (int l = 0; l < p.layers; ++l) {
    p.width[l] = static_cast<int>(widths[l]);
    p.grad_weight[l] = &slot;
    p.grad_bias[l] = &slot;
  }
  fc::FusedChainPlan plan;
  const bool ok = forward ? fc::plan_fused_forward(p, static_cast<int>(sm_count), static_cast<size_t>(smem_optin), &plan)
                          : fc::plan_fused_step(p, static_cast<int>(sm_count), static_cast<size_t>(smem_optin), &plan);
  if (!ok) return {0, 0, 0, 0, 0};
  return {p.tile_rows, plan.blocks, p.grads_in_smem ? 1 : 0, static_cast<int64_t>(plan.smem_bytes),
          fc::fused_chain_preferred(p, plan) ? 1 : 0};
}

std::vector<int64_t> fused_plan(int64_t batch, int64_t in_features, c10::IntArrayRef widths, bool double_type,
                                bool forward, int64_t sm_count, int64_t smem_optin) {
  return double_type ? plan_of<double>(batch, in_features, widths, forward, sm_count, smem_optin)
                     : plan_of<float>(batch, in_features, widths, forward, sm_count, smem_optin);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastmlp_emu_test, m) {
  m.def("aten_mlp_forward(Tensor input, Tensor[] weights, Tensor?[] biases, bool last_relu) -> (Tensor, Tensor)",
        &AtenLayers::mlp_forward);
  m.def("aten_mlp_backward(Tensor grad_output, Tensor input, Tensor[] weights, Tensor hidden, Tensor? output, "
        "bool last_relu, bool input_grad, bool[] weight_mask, bool[] bias_mask) -> (Tensor, Tensor[], Tensor[])",
        &AtenLayers::mlp_backward);
  m.def("gemm_on_cublas(int M, int N, int K, bool half_type) -> bool", &gemm_on_cublas);
  m.def("gemm_grid_tiles(int M, int N) -> int", &gemm_grid_tiles);
  m.def("fused_plan(int batch, int in_features, int[] widths, bool double_type, bool forward, int sm_count, "
        "int smem_optin) -> int[]",
        &fused_plan);
}
