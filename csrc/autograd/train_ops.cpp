// The training ops (mlp_train_step, mlp_train_epoch, optimizer_step) under the
// Autograd key. They are not differentiable: they update parameters in place, as
// torch.optim does under torch.no_grad(), and return detached results. So their
// Autograd kernel runs the device kernel below autograd whatever the grad mode:
// no graph is recorded, nested ATen calls see no autograd keys, and the caller
// needs no no_grad() around them (its enter and exit cost ~3 us a step from
// Python). The device kernels bump the updated tensors' version counters.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

namespace fastmlp::autograd {
namespace {

void below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace
}  // namespace fastmlp::autograd

TORCH_LIBRARY_IMPL(fastmlp, Autograd, m) {
  for (const char* name : {"mlp_train_step", "mlp_train_epoch", "optimizer_step"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&fastmlp::autograd::below_autograd>());
  }
}
