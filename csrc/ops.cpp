// The op schemas of the fastmlp library: the contract between C++ and Python.
// Kernels are registered per backend in csrc/cpu/*.cpp and csrc/cuda/*.cu;
// fake (meta) impls for torch.compile live in torch_fastmlp/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "common/autotune.h"
#include "cpu/simd.h"
#include "step_runner.h"

#ifndef FASTMLP_CUDA_ARCHS
#define FASTMLP_CUDA_ARCHS ""
#endif

namespace {

// torch_fastmlp.autotune's controls of common/autotune.h.
PyObject* set_autotune(PyObject*, PyObject* arg) {
  const long mode = PyLong_AsLong(arg);
  if (mode == -1 && PyErr_Occurred()) return nullptr;
  fastmlp::Autotuner::instance().set_mode(static_cast<int>(mode));
  Py_RETURN_NONE;
}

PyObject* autotune_enabled(PyObject*, PyObject*) { return PyBool_FromLong(fastmlp::Autotuner::instance().enabled()); }

PyObject* autotune_decisions(PyObject*, PyObject*) {
  const std::vector<std::string> lines = fastmlp::Autotuner::instance().describe();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(lines.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < lines.size(); ++i) {
    PyObject* line = PyUnicode_FromString(lines[i].c_str());
    if (line == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), line);
  }
  return list;
}

PyObject* clear_autotune(PyObject*, PyObject*) {
  fastmlp::Autotuner::instance().clear();
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"set_autotune", set_autotune, METH_O, "1: time candidates at first use, 0: heuristic, -1: FASTMLP_AUTOTUNE"},
    {"autotune_enabled", autotune_enabled, METH_NOARGS, "whether first-use timing decides now"},
    {"autotune_decisions", autotune_decisions, METH_NOARGS, "the cached decisions, one line each"},
    {"clear_autotune", clear_autotune, METH_NOARGS, "forget the cached decisions"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

// Importing torch_fastmlp._C runs the static registrations below; the module
// itself reports how it was built and holds the autotuner's controls.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
#ifdef FASTMLP_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  PyModule_AddStringConstant(m, "cuda_archs", FASTMLP_CUDA_ARCHS);
  const fastmlp::cpu::Isa isa = fastmlp::cpu::detected_isa();
  PyModule_AddStringConstant(m, "cpu_isa", isa == fastmlp::cpu::Isa::kAvx512 ? "avx512"
                                           : isa == fastmlp::cpu::Isa::kAvx2 ? "avx2"
                                                                              : "baseline");
  if (!fastmlp::add_step_runner(m)) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}

TORCH_LIBRARY(fastmlp, m) {
  // y = act(input @ weight.T + bias); act is ReLU when relu, else identity.
  m.def("linear_act(Tensor input, Tensor weight, Tensor? bias, bool relu) -> Tensor");
  // Gradients of linear_act from its saved output (the ReLU mask is output > 0).
  // Outputs not asked for by output_mask are returned as empty tensors.
  m.def(
      "linear_act_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor output, "
      "bool relu, bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  // A whole Linear(+ReLU) chain in one op. ReLU after every layer but the last, and
  // after the last too when last_relu. `hidden` packs every hidden activation
  // (layer l is a contiguous [B, N_l] block) in one allocation, for backward.
  m.def(
      "mlp_forward(Tensor input, Tensor[] weights, Tensor?[] biases, bool last_relu) "
      "-> (Tensor output, Tensor hidden)");
  // Gradients of mlp_forward. `output` is only read when last_relu. Gradients not
  // asked for (input_grad, weight_mask[l], bias_mask[l]) come back as empty tensors.
  m.def(
      "mlp_backward(Tensor grad_output, Tensor input, Tensor[] weights, Tensor hidden, "
      "Tensor? output, bool last_relu, bool input_grad, bool[] weight_mask, bool[] bias_mask) "
      "-> (Tensor grad_input, Tensor[] grad_weights, Tensor[] grad_biases)");

  // Binary cross-entropy with logits. weight / pos_weight are either empty-broadcast
  // patterns of P elements repeating along the flattened input (index i % P) or None.
  // reduction: 0 none, 1 mean, 2 sum (at::Reduction). With input_grad and a reduced
  // loss, grad_input (d loss / d input, same shape as input) is computed in the same
  // pass; otherwise it is an empty tensor.
  m.def(
      "bce_with_logits(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, "
      "int reduction, bool input_grad) -> (Tensor loss, Tensor grad_input)");
  // Elementwise backward: grad_output has the loss's shape (a scalar when reduced).
  m.def(
      "bce_with_logits_backward(Tensor grad_output, Tensor input, Tensor target, Tensor? weight, "
      "Tensor? pos_weight, int reduction, bool[2] output_mask) -> (Tensor grad_input, Tensor grad_target)");

  // A whole training step's math for an MLP classifier: the chain forward, the
  // reduced (mean / sum) BCE-with-logits loss, and every gradient of the loss,
  // in one op. `target` has the logits' shape [B, N_out]. Gradients not asked for
  // come back as empty tensors; backward only scales these by grad_output.
  m.def(
      "mlp_bce_step(Tensor input, Tensor target, Tensor[] weights, Tensor?[] biases, bool last_relu, "
      "Tensor? weight, Tensor? pos_weight, int reduction, bool input_grad, bool[] weight_mask, bool[] bias_mask) "
      "-> (Tensor loss, Tensor grad_input, Tensor[] grad_weights, Tensor[] grad_biases)");

  // mlp_bce_step generalised to a loss kind: 0 BCE with logits (weight and
  // pos_weight: BCE's), 1 MSE (no weights; target [B, N_out]), 2 softmax
  // cross-entropy (weight: class weights [N_out]; target int64 class indices
  // [B] or probabilities [B, N_out]; ignore_index and label_smoothing as
  // torch's). ignore_index and label_smoothing are read for cross-entropy only.
  m.def(
      "mlp_loss_step(Tensor input, Tensor target, Tensor[] weights, Tensor?[] biases, bool last_relu, int loss, "
      "Tensor? weight, Tensor? pos_weight, int reduction, int ignore_index, float label_smoothing, bool input_grad, "
      "bool[] weight_mask, bool[] bias_mask) "
      "-> (Tensor loss, Tensor grad_input, Tensor[] grad_weights, Tensor[] grad_biases)");

  // Training (torch_fastmlp.TrainStep). Parameters are updated in place, with
  // torch.optim's own state tensors. The trainable parameters are listed in
  // layer order, weight then bias; `state` holds per trainable parameter
  // [step, exp_avg, exp_avg_sq, max_exp_avg_sq or empty] for Adam (optimizer 1)
  // or [momentum_buffer or empty] for SGD (optimizer 0), and `hyper` 8 values
  // per trainable parameter (csrc/common/optim_math.h). With max_grad_norm, the
  // gradients are first clipped as torch.nn.utils.clip_grad_norm_ does.
  // One optimizer update of `params` from `grads` (the gradients as clipped).
  m.def(
      "optimizer_step(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] state, int optimizer, float[] hyper, "
      "float? max_grad_norm) -> ()");
  // A whole training step: mlp_loss_step's gradients, clipping, the update.
  // Returns the loss and the gradients (empty where a mask is off).
  m.def(
      "mlp_train_step(Tensor input, Tensor target, Tensor(a!)[] weights, Tensor(b!)?[] biases, bool last_relu, "
      "int loss, Tensor? weight, Tensor? pos_weight, int reduction, int ignore_index, float label_smoothing, "
      "bool[] weight_mask, bool[] bias_mask, Tensor(c!)[] state, int optimizer, float[] hyper, "
      "float? max_grad_norm) -> (Tensor loss, Tensor[] grad_weights, Tensor[] grad_biases)");
  // A whole epoch of training steps: the rows of inputs / targets in batches of
  // batch_size in the order of `order` (a permutation, or None), the last batch
  // short unless drop_last. Returns each batch's loss and the last gradients.
  m.def(
      "mlp_train_epoch(Tensor inputs, Tensor targets, Tensor? order, int batch_size, bool drop_last, "
      "Tensor(a!)[] weights, Tensor(b!)?[] biases, bool last_relu, int loss, Tensor? weight, Tensor? pos_weight, "
      "int reduction, int ignore_index, float label_smoothing, bool[] weight_mask, bool[] bias_mask, "
      "Tensor(c!)[] state, int optimizer, float[] hyper, float? max_grad_norm) "
      "-> (Tensor losses, Tensor[] grad_weights, Tensor[] grad_biases)");

  // Differentiable ops with their autograd in C++ (csrc/autograd/): what the
  // modules call, so a small batch pays one op call forward and no Python in
  // backward. Each has the same math as the Python Function named with it.
  // A Linear(+ReLU) chain (torch_fastmlp.MLPFunction): mlp_forward / mlp_backward.
  m.def("mlp(Tensor input, Tensor[] weights, Tensor?[] biases, bool last_relu) -> Tensor");
  // BCE with logits (torch_fastmlp.BCEWithLogitsFunction): bce_with_logits and its backward.
  m.def("bce_loss(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, int reduction) -> Tensor");
  // The reduced loss of an MLP classifier (torch_fastmlp.MLPBCEFunction): its
  // forward runs mlp_bce_step, its backward scales the stored gradients.
  m.def(
      "mlp_bce_loss(Tensor input, Tensor target, Tensor[] weights, Tensor?[] biases, bool last_relu, "
      "Tensor? weight, Tensor? pos_weight, int reduction) -> Tensor");
  // The reduced loss of an MLP for a loss kind (mlp_loss_step's arguments;
  // torch_fastmlp.FusedLoss): forward runs mlp_loss_step, backward scales the
  // stored gradients.
  m.def(
      "mlp_loss(Tensor input, Tensor target, Tensor[] weights, Tensor?[] biases, bool last_relu, int loss, "
      "Tensor? weight, Tensor? pos_weight, int reduction, int ignore_index, float label_smoothing) -> Tensor");
}

// ---- MSE and softmax cross-entropy (issue 20) ----------------------------------
TORCH_LIBRARY_FRAGMENT(fastmlp, m) {
  // Mean squared error of same-shape input and target. reduction: 0 none, 1 mean,
  // 2 sum. With input_grad and a reduced loss, grad_input (d loss / d input; the
  // target's gradient is its negative) is computed in the same pass; otherwise
  // it is an empty tensor.
  m.def("mse_forward(Tensor input, Tensor target, int reduction, bool input_grad) -> (Tensor loss, Tensor grad_input)");
  // Elementwise backward: grad_output has the loss's shape (a scalar when reduced).
  m.def(
      "mse_backward(Tensor grad_output, Tensor input, Tensor target, int reduction, bool[2] output_mask) "
      "-> (Tensor grad_input, Tensor grad_target)");
  // Softmax cross-entropy of logits input [B, C] (log-softmax and NLL in one
  // pass) with class indices (int64 [B]) or class probabilities (input's dtype,
  // [B, C]) as target, torch's ignore_index, class weight [C] and
  // label_smoothing; loss [] (mean / sum) or [B] (none). With input_grad and a
  // reduced loss, grad_input [B, C] is computed in the same pass.
  m.def(
      "cross_entropy_forward(Tensor input, Tensor target, Tensor? weight, int reduction, int ignore_index, "
      "float label_smoothing, bool input_grad) -> (Tensor loss, Tensor grad_input)");
  // d loss / d input for grad_output of the loss's shape.
  m.def(
      "cross_entropy_backward(Tensor grad_output, Tensor input, Tensor target, Tensor? weight, int reduction, "
      "int ignore_index, float label_smoothing) -> Tensor");
  // Differentiable forms with their autograd in C++ (csrc/autograd/mse_loss.cpp,
  // cross_entropy_loss.cpp): what torch_fastmlp.functional calls.
  m.def("mse_loss(Tensor input, Tensor target, int reduction) -> Tensor");
  m.def(
      "cross_entropy_loss(Tensor input, Tensor target, Tensor? weight, int reduction, int ignore_index, "
      "float label_smoothing) -> Tensor");
}
