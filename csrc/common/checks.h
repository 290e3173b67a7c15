// Argument checks shared by the CPU and CUDA entry points, with messages in
// PyTorch's style (name the argument, the shapes and the dtypes involved).
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace fastmlp {

// Kernels call ATen ops on tensors that may require grad (the parameters); the
// autograd.Functions own differentiation, so those nested calls must dispatch
// below autograd (this also holds on worker threads, which do not inherit the
// caller's grad mode).
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fastmlp: expected ", name,
              " to be a floating point tensor, but got ", t.scalar_type());
}

inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* name,
                       const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastmlp: expected ", name,
              " and ", ref_name, " to have the same dtype, but got ", name, ".dtype = ",
              t.scalar_type(), " and ", ref_name, ".dtype = ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "fastmlp: expected ", name, " and ", ref_name,
              " to be on the same device, but got ", t.device(), " and ", ref.device());
}

// input [B, K], weight [N, K], bias [N] or undefined.
inline void check_linear_args(const at::Tensor& input, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() == 2, "fastmlp.linear_act: expected input to be 2-D [batch, in_features], got ",
              input.dim(), "-D with shape ", input.sizes());
  TORCH_CHECK(weight.dim() == 2, "fastmlp.linear_act: expected weight to be 2-D [out_features, in_features], got ",
              weight.dim(), "-D with shape ", weight.sizes());
  check_floating(input, "input");
  check_same(weight, input, "weight", "input");
  TORCH_CHECK(input.size(1) == weight.size(1),
              "fastmlp.linear_act: mat1 and mat2 shapes cannot be multiplied (", input.size(0), "x",
              input.size(1), " and ", weight.size(1), "x", weight.size(0), "): input has ",
              input.size(1), " features but weight expects in_features=", weight.size(1));
  if (bias.has_value() && bias->defined()) {
    check_same(*bias, input, "bias", "input");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "fastmlp.linear_act: expected bias of shape [", weight.size(0),
                "] (out_features), got ", bias->sizes());
  }
}

inline void check_mlp_args(const at::Tensor& input, at::TensorList weights,
                           const c10::List<c10::optional<at::Tensor>>& biases) {
  TORCH_CHECK(!weights.empty(), "fastmlp.mlp_forward: expected at least one layer");
  TORCH_CHECK(biases.size() == weights.size(), "fastmlp.mlp_forward: got ", weights.size(),
              " weights but ", biases.size(), " biases");
  TORCH_CHECK(input.dim() == 2, "fastmlp.mlp_forward: expected input to be 2-D, got shape ",
              input.sizes());
  check_floating(input, "input");
  int64_t features = input.size(1);
  for (size_t l = 0; l < weights.size(); ++l) {
    const at::Tensor& w = weights[l];
    TORCH_CHECK(w.dim() == 2, "fastmlp.mlp_forward: expected weights[", l, "] to be 2-D, got shape ",
                w.sizes());
    check_same(w, input, "weight", "input");
    TORCH_CHECK(w.size(1) == features, "fastmlp.mlp_forward: layer ", l, " expects ", w.size(1),
                " input features but gets ", features, " (weights[", l, "] has shape ", w.sizes(), ")");
    c10::optional<at::Tensor> b = biases.get(l);
    if (b.has_value() && b->defined()) {
      check_same(*b, input, "bias", "input");
      TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(0), "fastmlp.mlp_forward: expected biases[", l,
                  "] of shape [", w.size(0), "], got ", b->sizes());
    }
    features = w.size(0);
  }
}

// Offsets of each hidden layer's [B, N_l] block in the packed `hidden` buffer.
inline std::vector<int64_t> hidden_offsets(int64_t batch, at::TensorList weights) {
  std::vector<int64_t> offsets(weights.size(), 0);
  int64_t at = 0;
  for (size_t l = 0; l + 1 < weights.size(); ++l) {
    offsets[l] = at;
    at += batch * weights[l].size(0);
  }
  offsets.back() = at;  // one past the last hidden block: the total size
  return offsets;
}

inline void check_reduction(int64_t reduction) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "fastmlp.bce_with_logits: reduction must be 0 (none), ",
              "1 (mean) or 2 (sum), got ", reduction);
}

// weight / pos_weight for BCE: P elements repeating along the flattened input.
inline void check_bce_pattern(const c10::optional<at::Tensor>& t, const at::Tensor& input,
                              const char* name) {
  if (!t.has_value() || !t->defined()) return;
  check_same(*t, input, name, "input");
  const int64_t p = t->numel();
  TORCH_CHECK(input.numel() == 0 || (p > 0 && input.numel() % p == 0), "fastmlp.bce_with_logits: ", name,
              " with ", p, " elements does not tile an input of ", input.numel(), " elements");
}

inline void check_bce_args(const at::Tensor& input, const at::Tensor& target,
                           const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& pos_weight, int64_t reduction) {
  check_floating(input, "input");
  check_same(target, input, "target", "input");
  TORCH_CHECK(target.sizes() == input.sizes(), "fastmlp.bce_with_logits: Target size (", target.sizes(),
              ") must be the same as input size (", input.sizes(), ")");
  check_bce_pattern(weight, input, "weight");
  check_bce_pattern(pos_weight, input, "pos_weight");
  check_reduction(reduction);
}

}  // namespace fastmlp
