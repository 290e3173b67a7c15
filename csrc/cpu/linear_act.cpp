// CPU kernels of the per-layer ops: fastmlp::linear_act and its backward.
#include <torch/library.h>

#include "common/checks.h"
#include "cpu/layer_kernels.h"

namespace fastmlp::cpu {
namespace {

at::Tensor linear_act(const at::Tensor& input, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias, bool relu) {
  check_linear_args(input, weight, bias);
  at::Tensor out = at::empty({input.size(0), weight.size(0)}, input.options());
  linear_act_into(out, input, weight, bias, relu);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& output, bool relu, std::array<bool, 3> output_mask) {
  check_linear_args(input, weight, c10::nullopt);
  check_same(grad_output, input, "grad_output", "input");
  const std::vector<int64_t> out_shape{input.size(0), weight.size(0)};
  TORCH_CHECK(grad_output.sizes() == out_shape, "fastmlp.linear_act_backward: expected grad_output of shape ",
              out_shape, ", got ", grad_output.sizes());
  TORCH_CHECK(!relu || output.sizes() == out_shape, "fastmlp.linear_act_backward: expected output of shape ",
              out_shape, ", got ", output.sizes());
  auto [gx, gw, gb] = layer_backward(grad_output, input, weight, output, relu, output_mask[0],
                                     output_mask[1], output_mask[2]);
  return {or_empty(gx, input), or_empty(gw, input), or_empty(gb, input)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) {
  m.impl("linear_act", &linear_act);
  m.impl("linear_act_backward", &linear_act_backward);
}

}  // namespace fastmlp::cpu
