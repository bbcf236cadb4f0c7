// What the op's backends share: the argument checks (minqr/loss.py:check_loss_args says the
// same things in Python, and minqr/ops.py's fake kernel calls that) and the output allocation.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace minqr {

// Raises ValueError/TypeError (TORCH_CHECK_VALUE/TYPE) naming the argument, what was expected
// and what came.
void check_loss_args(const at::Tensor& q_chosen, const at::Tensor& q_rejected, double kappa,
                     double lam, double margin);

// (loss [B] in the accumulation dtype, grad_chosen and grad_rejected [B, N] in the input dtype,
// or [0] when compute_grad is false). Always contiguous.
std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_loss_outputs(const at::Tensor& q_chosen,
                                                                  bool compute_grad);

}  // namespace minqr
