// What every backend of the loss ops shares: the argument checks (minqr/objectives/ops.py's check_outputs,
// check_paper_hyperparameters and check_reduction say the same things in Python, word for word,
// and the fake kernels call those), the dispatch of a kernel over dtype and compute_grad, and the
// reduction of the pairs' losses.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/string_view.h>

#include <tuple>
#include <type_traits>

#include "objectives.h"

namespace minqr {

// Raise ValueError/TypeError (TORCH_CHECK_VALUE/TYPE) naming the argument, what was expected and
// what came.
void check_outputs(const at::Tensor& h_chosen, const at::Tensor& h_rejected);
void check_paper_hyperparameters(double kappa, double lam, double margin);

// What the op does with the pairs' losses: returns them ([B]), or their mean or sum ([]).
enum class Reduction { kNone, kMean, kSum };
// The reduction named "none", "mean" or "sum".
Reduction parse_reduction(c10::string_view reduction);
// The same, for h_chosen's batch: the mean of no pairs is an error.
Reduction check_reduction(c10::string_view reduction, const at::Tensor& h_chosen);

// loss_backward's arguments, which only autograd.cpp passes: a mismatch is a bug there. Returns
// the reduction.
Reduction check_loss_backward(const at::Tensor& grad_loss, const at::Tensor& grad_chosen,
                              const at::Tensor& grad_rejected, c10::string_view reduction);

using LossOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // loss, grad_chosen, grad_rejected

// (loss [B] in the accumulation dtype, grad_chosen and grad_rejected [B, N] in the input dtype,
// or [0] when compute_grad is false). Always contiguous.
LossOutputs empty_loss_outputs(const at::Tensor& h_chosen, bool compute_grad);

// The pairs' losses [B] reduced: with ATen's own sum, and its mean (on the CPU, that sum divided by
// B), so that the result has the bits of `losses.sum()` and `losses.mean()` in Python, as when
// the reduction came after the op (tests/test_objectives.py,
// test_op_reduction_has_the_bits_of_torch_reductions).
at::Tensor reduce_losses(const at::Tensor& losses, Reduction reduction);

// The body every backend's op shares: checked inputs made contiguous (strided ones are copied
// once; the kernels' work per pair dwarfs an O(N) copy), outputs allocated,
// launch(std::type_identity<scalar_t>, std::bool_constant<compute_grad>, h_chosen, h_rejected,
// outputs) called for the input dtype, unless there are no pairs, and the losses reduced.
template <typename Launch>
LossOutputs run_loss(const at::Tensor& h_chosen, const at::Tensor& h_rejected,
                     c10::string_view reduction, bool compute_grad, const Launch& launch) {
  check_outputs(h_chosen, h_rejected);
  const Reduction reduce = check_reduction(reduction, h_chosen);
  const at::Tensor hc = h_chosen.contiguous();
  const at::Tensor hr = h_rejected.contiguous();
  LossOutputs outputs = empty_loss_outputs(hc, compute_grad);
  if (hc.size(0) > 0) {  // (a CUDA grid of 0 blocks is a launch error)
    // (the name only shows in the error for an unsupported dtype, which check_outputs rules out)
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hc.scalar_type(), "minqr loss", [&] {
      if (compute_grad) {
        launch(std::type_identity<scalar_t>{}, std::true_type{}, hc, hr, outputs);
      } else {
        launch(std::type_identity<scalar_t>{}, std::false_type{}, hc, hr, outputs);
      }
    });
  }
  std::get<0>(outputs) = reduce_losses(std::get<0>(outputs), reduce);
  return outputs;
}

// loss_backward's body on every backend: checked, made contiguous, outputs allocated, and
// launch(std::type_identity<scalar_t>, scale, grad_chosen, grad_rejected, out_chosen,
// out_rejected) called for the gradients' dtype, where pair b's gradients are multiplied by
// scale.value(b) (LossScale, objectives.h).
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> run_loss_backward(const at::Tensor& grad_loss,
                                                     const at::Tensor& grad_chosen,
                                                     const at::Tensor& grad_rejected,
                                                     c10::string_view reduction,
                                                     const Launch& launch) {
  const Reduction reduce = check_loss_backward(grad_loss, grad_chosen, grad_rejected, reduction);
  const at::Tensor gc = grad_chosen.contiguous();
  const at::Tensor gr = grad_rejected.contiguous();
  at::Tensor out_chosen = at::empty_like(gc);
  at::Tensor out_rejected = at::empty_like(gr);
  if (gc.numel() == 0) return {out_chosen, out_rejected};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "minqr loss_backward", [&] {
    using T = at::opmath_type<scalar_t>;
    const LossScale<T> scale{grad_loss.const_data_ptr<T>(),
                             reduce == Reduction::kNone ? grad_loss.stride(0) : 0,
                             reduce == Reduction::kMean ? T(gc.size(0)) : T(1)};
    launch(std::type_identity<scalar_t>{}, scale, gc, gr, out_chosen, out_rejected);
  });
  return {out_chosen, out_rejected};
}

}  // namespace minqr
