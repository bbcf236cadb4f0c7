// The autograd formula of every loss op, in C++: the forward saves the per-pair gradients that the
// kernel computed (with compute_grad), and the backward scales them by the gradient of the reduced
// loss through minqr::loss_backward, one kernel for both sides.
//
// Registered for the Autograd key rather than from Python (torch.library.register_autograd): the
// Python formula doing the same cost 40-50 us more per forward+backward, as much as the whole
// mixture kernel at B = 4096, N = 10 (measured when the mean was still a torch.mean after the op:
// op, mean, torch.autograd.grad, one thread, best of rounds: 62 against 99 us at B = 16, N = 1;
// 163 against 210 us at B = 4096, N = 10).
// torch.compile traces through it as it does through ATen's own formulas: the forward and
// loss_backward have fake kernels (minqr/objectives/ops.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "ops.h"

namespace minqr {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> loss_backward(const at::Tensor& grad_loss,
                                                 const at::Tensor& grad_chosen,
                                                 const at::Tensor& grad_rejected,
                                                 c10::string_view reduction) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("minqr::loss_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, c10::string_view)>();
  return op.call(grad_loss, grad_chosen, grad_rejected, reduction);
}

// The op `kName` with schema (h_chosen, h_rejected, Hyper... hyperparameters, reduction,
// compute_grad).
template <const char* kName, typename... Hyper>
class LossFunction : public torch::autograd::Function<LossFunction<kName, Hyper...>> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h_chosen,
                               const at::Tensor& h_rejected, Hyper... hyper,
                               c10::string_view reduction, bool compute_grad) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow(kName, "")
                               .template typed<LossOutputs(const at::Tensor&, const at::Tensor&,
                                                           Hyper..., c10::string_view, bool)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, grad_chosen, grad_rejected] =
        op.call(h_chosen, h_rejected, hyper..., reduction, compute_grad);
    ctx->saved_data["compute_grad"] = compute_grad;
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->save_for_backward({grad_chosen, grad_rejected});
    ctx->mark_non_differentiable({grad_chosen, grad_rejected});
    // Autograd gives no gradient to the two gradient outputs; materialising zeros [B, N] for
    // them would cost two allocations and fills per backward.
    ctx->set_materialize_grads(false);
    return {loss, grad_chosen, grad_rejected};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    TORCH_CHECK(ctx->saved_data["compute_grad"].toBool(), kName,
                " ran with compute_grad=False, so it has no gradient to give backward; call it "
                "with compute_grad=True when the inputs require grad (minqr.pair_loss does)");
    // backward(create_graph=True): the saved gradients are constants here, so a second
    // derivative through them would come out as zero instead of failing. Refuse instead.
    TORCH_CHECK(!at::GradMode::is_enabled(), kName,
                " has no second derivative (its backward scales gradients saved by the forward); "
                "for create_graph=True use pair_loss(..., impl='reference')");
    // h_chosen, h_rejected, the hyper-parameters, reduction and compute_grad: gradients for the
    // first two
    variable_list grads(4 + sizeof...(Hyper));
    const at::Tensor& grad_loss = grad_outputs[0];
    if (grad_loss.defined()) {
      const variable_list saved = ctx->get_saved_variables();
      std::tie(grads[0], grads[1]) = loss_backward(grad_loss, saved[0], saved[1],
                                                   ctx->saved_data["reduction"].toStringView());
    }
    return grads;
  }

  // The Autograd kernel, with the op's own signature.
  static LossOutputs apply_op(const at::Tensor& h_chosen, const at::Tensor& h_rejected,
                              Hyper... hyper, c10::string_view reduction, bool compute_grad) {
    const variable_list out =
        LossFunction::apply(h_chosen, h_rejected, hyper..., reduction, compute_grad);
    return {out[0], out[1], out[2]};
  }
};

constexpr char kPaperLoss[] = "minqr::paper_loss";
constexpr char kMixtureLoss[] = "minqr::mixture_loss";
constexpr char kIndependentLoss[] = "minqr::independent_loss";

}  // namespace

TORCH_LIBRARY_IMPL(minqr, Autograd, m) {
  m.impl("paper_loss", &LossFunction<kPaperLoss, double, double, double>::apply_op);
  m.impl("mixture_loss", &LossFunction<kMixtureLoss>::apply_op);
  m.impl("independent_loss", &LossFunction<kIndependentLoss>::apply_op);
}

}  // namespace minqr
