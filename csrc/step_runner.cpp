// torch_fastmlp._C.StepRunner: one planned TrainStep call, from C++.
//
// TrainStep plans a step in Python (torch_fastmlp/train.py): which parameters
// train, the optimizer's state tensors and options, the loss's arguments. Read
// in Python, that takes ~25 us a step, a fifth of a 784 -> 30 -> 1 step at 64
// rows on a CPU and more than the whole step is allowed on a GPU. A StepRunner
// holds a plan and the list of what it was read from, and re-checks that list
// at C speed on every call (a 4-3-1 step at batch 2 took 14 us, its op 9): the
// same objects in the same dicts and lists (by identity), hook dicts still
// empty, the trainable parameters without tensor hooks, the parameters',
// input's and target's metadata; the learning rate is re-read (LR schedulers)
// into the update's hyper-parameters. Objects are compared by identity only
// where they cannot change in place (TrainStep makes no runner otherwise), and
// the runner keeps them alive, so their ids are not reused. Anything else
// changed, or a context the fused op must not run in (grad mode off, autocast,
// torch.func transforms, jit tracing, a TorchFunctionMode), returns None and
// TrainStep plans again in Python.
//
// The step itself is the fastmlp::mlp_train_step op through the dispatcher
// (profilers and dispatch modes see it as from Python), then each trainable
// parameter's .grad, as TrainStep's Python path sets them.
#include "step_runner.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/extension.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/train_ops.h"  // TrainStepResult, kStepLossCrossEntropy

namespace py = pybind11;

namespace fastmlp {
namespace {

using TrainStepFn = TrainStepResult(const at::Tensor&, const at::Tensor&, at::TensorList,
                                    const c10::List<std::optional<at::Tensor>>&, bool, int64_t,
                                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t,
                                    int64_t, double, const c10::List<bool>&, const c10::List<bool>&, at::TensorList,
                                    int64_t, c10::ArrayRef<double>, std::optional<double>);

// What a parameter's plan depends on, beyond its identity (p.data = ... keeps
// the object and may change all of it).
struct TensorMeta {
  at::ScalarType dtype;
  c10::Device device;
  std::vector<int64_t> sizes;
  bool contiguous;
  bool requires_grad;

  static TensorMeta of(const at::Tensor& t) {
    return {t.scalar_type(), t.device(), t.sizes().vec(), t.is_contiguous(), t.requires_grad()};
  }
  bool matches(const at::Tensor& t) const {
    return t.scalar_type() == dtype && t.device() == device && t.sizes().equals(sizes) &&
           t.is_contiguous() == contiguous && t.requires_grad() == requires_grad;
  }
};

const at::Tensor& tensor_of(py::handle obj) {
  TORCH_CHECK(THPVariable_Check(obj.ptr()), "StepRunner: expected a tensor");
  return THPVariable_Unpack(obj.ptr());
}

class StepRunner {
 public:
  // owner: (model, loss_fn, optimizer, max_grad_norm) as TrainStep holds them.
  // same: (dict, key, object or `missing`): dict[key] is that object (or absent).
  // same_items: (dict, ((key, value), ...)) or (list, (item, ...)): exactly these, in order.
  // empty: dicts that stay empty (hooks).
  // lr: (dict, key, hyper slots): a number, copied into hyper at those slots.
  // tensors: tensors whose metadata must not change.
  // The rest are mlp_train_step's arguments, the trainable weights' and biases'
  // layers (their .grad set from its result), the tensors whose .grad the step
  // clears, and the optimizer to mark as stepped for an LR scheduler (or None).
  // index_target: class indices (int64) for cross-entropy; else the weights' dtype.
  StepRunner(py::tuple owner, py::list same, py::list same_items, py::list empty, py::list lr, py::list tensors,
             py::object missing, int64_t in_features, int64_t out_features, bool index_target,
             py::list weights, py::list biases, bool last_relu, int64_t loss_kind, py::object loss_weight,
             int64_t reduction, int64_t ignore_index, double label_smoothing, std::vector<bool> weight_mask,
             std::vector<bool> bias_mask, py::list state, int64_t optimizer, std::vector<double> hyper,
             std::optional<double> max_grad_norm, std::vector<int64_t> trainable_weights,
             std::vector<int64_t> trainable_biases, py::list cleared, py::object mark_stepped)
      : owner_(std::move(owner)),
        missing_(std::move(missing)),
        in_features_(in_features),
        out_features_(out_features),
        last_relu_(last_relu),
        loss_kind_(loss_kind),
        reduction_(reduction),
        ignore_index_(ignore_index),
        label_smoothing_(label_smoothing),
        optimizer_(optimizer),
        hyper_(std::move(hyper)),
        max_grad_norm_(max_grad_norm),
        trainable_weights_(std::move(trainable_weights)),
        trainable_biases_(std::move(trainable_biases)),
        mark_stepped_(std::move(mark_stepped)),
        op_(c10::Dispatcher::singleton().findSchemaOrThrow("fastmlp::mlp_train_step", "").typed<TrainStepFn>()) {
    TORCH_CHECK(owner_.size() == 4, "StepRunner: owner is (model, loss_fn, optimizer, max_grad_norm)");
    for (const char* name : {"model", "loss_fn", "optimizer", "max_grad_norm"}) owner_keys_.emplace_back(py::str(name));
    for (py::handle probe : same) {
      auto t = probe.cast<py::tuple>();
      TORCH_CHECK(t.size() == 3 && PyDict_Check(t[0].ptr()), "StepRunner: same is (dict, key, object)");
      same_.push_back({t[0], t[1], t[2]});
    }
    for (py::handle probe : same_items) {
      auto t = probe.cast<py::tuple>();
      TORCH_CHECK(t.size() == 2 && (PyDict_Check(t[0].ptr()) || PyList_Check(t[0].ptr())),
                  "StepRunner: same_items is (dict or list, items)");
      std::vector<py::object> items;
      for (py::handle item : t[1].cast<py::tuple>()) {
        if (PyDict_Check(t[0].ptr())) {
          auto pair = item.cast<py::tuple>();
          TORCH_CHECK(pair.size() == 2, "StepRunner: a dict's items are (key, value) pairs");
          items.push_back(pair[0]);
          items.push_back(pair[1]);
        } else {
          items.push_back(py::reinterpret_borrow<py::object>(item));
        }
      }
      same_items_.push_back({t[0], std::move(items)});
    }
    for (py::handle d : empty) {
      TORCH_CHECK(PyDict_Check(d.ptr()), "StepRunner: empty takes dicts");
      empty_.push_back(py::reinterpret_borrow<py::object>(d));
    }
    for (py::handle probe : lr) {
      auto t = probe.cast<py::tuple>();
      TORCH_CHECK(t.size() == 3 && PyDict_Check(t[0].ptr()), "StepRunner: lr is (dict, key, slots)");
      auto slots = t[2].cast<std::vector<int64_t>>();
      for (int64_t s : slots) TORCH_CHECK(s >= 0 && s < static_cast<int64_t>(hyper_.size()), "StepRunner: lr slot");
      lr_.push_back({t[0], t[1], std::move(slots)});
    }
    for (py::handle t : tensors) {
      watched_.push_back(py::reinterpret_borrow<py::object>(t));
      metas_.push_back(TensorMeta::of(tensor_of(t)));
    }
    for (py::handle w : weights) weights_.push_back(tensor_of(w));
    for (py::handle b : biases) {
      bias_tensors_.push_back(b.is_none() ? at::Tensor() : tensor_of(b));
      biases_.push_back(b.is_none() ? std::nullopt : std::optional<at::Tensor>(bias_tensors_.back()));
    }
    TORCH_CHECK(!weights_.empty() && weights_.size() == bias_tensors_.size() &&
                    weights_.size() == weight_mask.size() && weights_.size() == bias_mask.size(),
                "StepRunner: one bias and mask entry per weight");
    for (bool m : weight_mask) weight_mask_.push_back(m);
    for (bool m : bias_mask) bias_mask_.push_back(m);
    // The trainable layers' indices are checked before they index anything.
    for (int64_t l : trainable_weights_) TORCH_CHECK(l >= 0 && l < static_cast<int64_t>(weights_.size()), "layer");
    for (int64_t l : trainable_biases_) {
      TORCH_CHECK(l >= 0 && l < static_cast<int64_t>(weights_.size()) && bias_tensors_[l].defined(), "layer");
    }
    for (int64_t l : trainable_weights_) trainable_.push_back(py::reinterpret_borrow<py::object>(weights[l]));
    for (int64_t l : trainable_biases_) trainable_.push_back(py::reinterpret_borrow<py::object>(biases[l]));
    for (py::handle s : state) state_.push_back(tensor_of(s));
    for (py::handle c : cleared) cleared_.push_back(tensor_of(c));
    if (!loss_weight.is_none()) loss_weight_ = tensor_of(loss_weight);
    const at::Tensor& w0 = weights_.front();
    dtype_ = w0.scalar_type();
    device_ = w0.device();
    target_dtype_ = index_target ? at::kLong : dtype_;
  }

  // The step's loss, or None where the plan does not hold (TrainStep then plans in Python).
  py::object call(py::handle input, py::handle target, py::handle owner_dict) {
    HANDLE_TH_ERRORS
    if (cleared_by_gc_ || !holds(input, target, owner_dict)) return py::none();
    const at::Tensor& x = THPVariable_Unpack(input.ptr());
    const at::Tensor& y = THPVariable_Unpack(target.ptr());
    for (const at::Tensor& t : cleared_) {
      if (t.grad().defined()) t.mutable_grad().reset();  // optimizer.zero_grad() for what the step does not train
    }
    TrainStepResult result;
    {
      py::gil_scoped_release no_gil;
      result = op_.call(x, y, weights_, biases_, last_relu_, loss_kind_, loss_weight_, std::nullopt, reduction_,
                        ignore_index_, label_smoothing_, weight_mask_, bias_mask_, state_, optimizer_, hyper_,
                        max_grad_norm_);
    }
    auto& [loss, grad_w, grad_b] = result;
    for (int64_t l : trainable_weights_) weights_[l].mutable_grad() = grad_w[l];
    for (int64_t l : trainable_biases_) bias_tensors_[l].mutable_grad() = grad_b[l];
    if (!mark_stepped_.is_none()) mark_stepped_.attr("_opt_called") = py::bool_(true);
    ++steps_;
    return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(loss)));
    END_HANDLE_TH_ERRORS_PYBIND
  }

  // Steps served so far.
  int64_t steps() const { return steps_; }

  // The garbage collector's view: every Python object held (the runner holds the
  // model and optimizer, which may hold the TrainStep that holds the runner).
  int traverse(visitproc visit, void* arg) const {
    Py_VISIT(owner_.ptr());
    Py_VISIT(missing_.ptr());
    Py_VISIT(mark_stepped_.ptr());
    for (const py::object& o : owner_keys_) Py_VISIT(o.ptr());
    for (const Same& p : same_) {
      Py_VISIT(p.dict.ptr());
      Py_VISIT(p.key.ptr());
      Py_VISIT(p.expected.ptr());
    }
    for (const SameItems& p : same_items_) {
      Py_VISIT(p.container.ptr());
      for (const py::object& o : p.items) Py_VISIT(o.ptr());
    }
    for (const py::object& o : empty_) Py_VISIT(o.ptr());
    for (const Lr& p : lr_) {
      Py_VISIT(p.dict.ptr());
      Py_VISIT(p.key.ptr());
    }
    for (const py::object& o : watched_) Py_VISIT(o.ptr());
    for (const py::object& o : trainable_) Py_VISIT(o.ptr());
    return 0;
  }

  // Breaks a cycle the collector found: drops every Python object; the runner then serves nothing.
  void clear() {
    cleared_by_gc_ = true;
    owner_ = py::tuple();
    missing_ = py::none();
    mark_stepped_ = py::none();
    owner_keys_.clear();
    same_.clear();
    same_items_.clear();
    empty_.clear();
    lr_.clear();
    watched_.clear();
    metas_.clear();
    trainable_.clear();
  }

 private:
  struct Same {
    py::object dict, key, expected;
  };
  struct SameItems {
    py::object container;
    std::vector<py::object> items;  // a dict's as key, value, key, value, ...
  };
  struct Lr {
    py::object dict, key;
    std::vector<int64_t> slots;
  };

  bool holds(py::handle input, py::handle target, py::handle owner_dict) {
    if (!context_ok() || !PyDict_Check(owner_dict.ptr())) return false;
    for (size_t i = 0; i < owner_keys_.size(); ++i) {
      PyObject* v = PyDict_GetItemWithError(owner_dict.ptr(), owner_keys_[i].ptr());
      if (v != owner_[i].ptr()) return fail();
    }
    if (!inputs_ok(input, target)) return false;
    for (const Same& s : same_) {
      PyObject* v = PyDict_GetItemWithError(s.dict.ptr(), s.key.ptr());
      if (v == nullptr && PyErr_Occurred()) return fail();
      if ((v == nullptr ? missing_.ptr() : v) != s.expected.ptr()) return false;
    }
    for (const SameItems& s : same_items_) {
      if (!items_unchanged(s)) return false;
    }
    for (const py::object& d : empty_) {
      if (PyDict_GET_SIZE(d.ptr()) != 0) return false;
    }
    for (size_t i = 0; i < watched_.size(); ++i) {
      if (!metas_[i].matches(THPVariable_Unpack(watched_[i].ptr()))) return false;
    }
    // A trainable parameter's tensor hooks (register_hook, register_post_accumulate_grad_hook)
    // fire in the autograd engine: the eager lines.
    for (const py::object& p : trainable_) {
      const auto* v = reinterpret_cast<const THPVariable*>(p.ptr());
      if (!no_hooks(v->backward_hooks) || !no_hooks(v->post_accumulate_grad_hooks)) return false;
    }
    return read_lr();
  }

  static bool no_hooks(PyObject* hooks) {
    return hooks == nullptr || hooks == Py_None || (PyDict_Check(hooks) && PyDict_GET_SIZE(hooks) == 0);
  }

  bool fail() {
    PyErr_Clear();  // a lookup that raised (e.g. an unhashable key): not the plan's objects
    return false;
  }

  // What TrainStep._plan asks of the context (torch_fastmlp.functional._fast_path_ok, grad mode).
  bool context_ok() const {
    if (!c10::GradMode::is_enabled() || torch::jit::tracer::isTracing()) return false;
    // torch.func transforms include their front key while any is active (functorch's DynamicLayer.cpp).
    if (c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
        at::impl::torch_function_mode_enabled()) {
      return false;
    }
    return !at::autocast::is_autocast_enabled(device_.type());  // TrainStep makes runners for CPU and CUDA only
  }

  bool inputs_ok(py::handle input, py::handle target) const {
    if (!THPVariable_CheckExact(input.ptr()) || !THPVariable_CheckExact(target.ptr())) return false;
    const at::Tensor& x = THPVariable_Unpack(input.ptr());
    const at::Tensor& y = THPVariable_Unpack(target.ptr());
    if (x.layout() != at::kStrided || x.dim() != 2 || x.size(0) == 0 || x.size(1) != in_features_ ||
        x.scalar_type() != dtype_ || x.device() != device_ || x.requires_grad()) {
      return false;
    }
    if (y.layout() != at::kStrided || y.scalar_type() != target_dtype_ || y.device() != device_ ||
        y.requires_grad()) {
      return false;
    }
    if (loss_kind_ == kStepLossCrossEntropy && target_dtype_ == at::kLong) return y.dim() == 1 && y.size(0) == x.size(0);
    return y.dim() == 2 && y.size(0) == x.size(0) && y.size(1) == out_features_;
  }

  bool items_unchanged(const SameItems& s) const {
    PyObject* c = s.container.ptr();
    if (PyList_Check(c)) {
      if (PyList_GET_SIZE(c) != static_cast<Py_ssize_t>(s.items.size())) return false;
      for (size_t i = 0; i < s.items.size(); ++i) {
        if (PyList_GET_ITEM(c, i) != s.items[i].ptr()) return false;
      }
      return true;
    }
    if (PyDict_GET_SIZE(c) * 2 != static_cast<Py_ssize_t>(s.items.size())) return false;
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    size_t i = 0;
    while (PyDict_Next(c, &pos, &key, &value)) {
      if (key != s.items[i].ptr() || value != s.items[i + 1].ptr()) return false;
      i += 2;
    }
    return true;
  }

  // The learning rates, as TrainStep reads them (an int or a float; anything else: plan again).
  bool read_lr() {
    for (const Lr& l : lr_) {
      PyObject* v = PyDict_GetItemWithError(l.dict.ptr(), l.key.ptr());
      if (v == nullptr) return fail();
      double value;
      if (PyFloat_CheckExact(v)) {
        value = PyFloat_AS_DOUBLE(v);
      } else if (PyLong_CheckExact(v)) {
        value = PyLong_AsDouble(v);
        if (value == -1.0 && PyErr_Occurred()) return fail();
      } else {
        return false;
      }
      for (int64_t s : l.slots) hyper_[s] = value;
    }
    return true;
  }

  py::tuple owner_;
  std::vector<py::object> owner_keys_;
  std::vector<Same> same_;
  std::vector<SameItems> same_items_;
  std::vector<py::object> empty_;
  std::vector<Lr> lr_;
  std::vector<py::object> watched_;
  std::vector<TensorMeta> metas_;
  std::vector<py::object> trainable_;  // the trainable parameters, for their tensor hooks
  py::object missing_;
  int64_t in_features_, out_features_;
  at::ScalarType dtype_ = at::kFloat, target_dtype_ = at::kFloat;
  c10::Device device_ = c10::Device(c10::kCPU);
  // mlp_train_step's arguments
  std::vector<at::Tensor> weights_;
  c10::List<std::optional<at::Tensor>> biases_;
  std::vector<at::Tensor> bias_tensors_;  // undefined for a layer without bias
  bool last_relu_;
  int64_t loss_kind_;
  std::optional<at::Tensor> loss_weight_;
  int64_t reduction_, ignore_index_;
  double label_smoothing_;
  c10::List<bool> weight_mask_, bias_mask_;
  std::vector<at::Tensor> state_;
  int64_t optimizer_;
  std::vector<double> hyper_;
  std::optional<double> max_grad_norm_;
  std::vector<int64_t> trainable_weights_, trainable_biases_;
  std::vector<at::Tensor> cleared_;
  py::object mark_stepped_;
  c10::TypedOperatorHandle<TrainStepFn> op_;
  int64_t steps_ = 0;
  bool cleared_by_gc_ = false;
};

StepRunner& runner_of(PyObject* self) { return py::cast<StepRunner&>(py::handle(self)); }

// GC support for the class (pybind11's custom_type_setup): traverse and clear.
void setup_gc(PyHeapTypeObject* heap_type) {
  PyTypeObject* type = &heap_type->ht_type;
  type->tp_flags |= Py_TPFLAGS_HAVE_GC;
  type->tp_traverse = [](PyObject* self, visitproc visit, void* arg) {
    Py_VISIT(Py_TYPE(self));
    if (!py::detail::is_holder_constructed(self)) return 0;
    return runner_of(self).traverse(visit, arg);
  };
  type->tp_clear = [](PyObject* self) {
    if (py::detail::is_holder_constructed(self)) runner_of(self).clear();
    return 0;
  };
}

}  // namespace

bool add_step_runner(PyObject* module) {
  try {
    auto m = py::reinterpret_borrow<py::module_>(module);
    py::class_<StepRunner>(m, "StepRunner", "TrainStep's planned step, re-checked and run from C++ (train.py).",
                           py::custom_type_setup(&setup_gc))
        .def(py::init<py::tuple, py::list, py::list, py::list, py::list, py::list, py::object, int64_t, int64_t,
                      bool, py::list, py::list, bool, int64_t, py::object, int64_t, int64_t, double,
                      std::vector<bool>, std::vector<bool>, py::list, int64_t, std::vector<double>,
                      std::optional<double>, std::vector<int64_t>, std::vector<int64_t>, py::list, py::object>())
        .def("__call__", &StepRunner::call, py::arg("input"), py::arg("target"), py::arg("owner_dict"))
        .def_property_readonly("steps", &StepRunner::steps);
    return true;
  } catch (py::error_already_set& e) {
    e.restore();
    return false;
  }
}

}  // namespace fastmlp
