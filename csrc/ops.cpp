// The loss ops' schemas, declared once for every backend, their shared argument checks, and the
// Python module minqr._C whose loading registers them. Backends: cpu/ (CPU), cuda/ (CUDA); the
// autograd formula is autograd.cpp, the fake (meta) kernels are in minqr/objectives/ops.py.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "ops.h"

// A module with no functions: importing minqr._C runs the static registrations below.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

namespace minqr {
namespace {

// The name Python prints (torch.float32), so that the C++ and Python messages read alike.
std::string dtype_name(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

void check_outputs(const at::Tensor& h_chosen, const at::Tensor& h_rejected) {
  for (const auto& [name, h] : {std::pair{"h_chosen", &h_chosen}, {"h_rejected", &h_rejected}}) {
    TORCH_CHECK_TYPE(supported_dtype(h->scalar_type()), name,
                     " must be a float16, bfloat16, float32 or float64 tensor, got ",
                     dtype_name(h->scalar_type()));
  }
  TORCH_CHECK_TYPE(h_chosen.scalar_type() == h_rejected.scalar_type(),
                   "h_chosen and h_rejected must have the same dtype, got ",
                   dtype_name(h_chosen.scalar_type()), " and ",
                   dtype_name(h_rejected.scalar_type()));
  for (const auto& [name, h] : {std::pair{"h_chosen", &h_chosen}, {"h_rejected", &h_rejected}}) {
    TORCH_CHECK_VALUE(h->dim() == 2, name, " must have shape [B, N] (2 dimensions), got shape ",
                      h->sizes());
  }
  TORCH_CHECK_VALUE(h_chosen.sizes() == h_rejected.sizes(),
                    "h_chosen and h_rejected must have the same shape, got ", h_chosen.sizes(),
                    " and ", h_rejected.sizes());
  TORCH_CHECK_VALUE(h_chosen.size(1) >= 1,
                    "h_chosen must have N >= 1 outputs (shape [B, N]), got shape ",
                    h_chosen.sizes());
  TORCH_CHECK_VALUE(h_chosen.device() == h_rejected.device(),
                    "h_chosen and h_rejected must be on the same device, got ", h_chosen.device(),
                    " and ", h_rejected.device());
}

// Doubles print as Python's `:g` does (6 significant digits, inf, nan).
void check_paper_hyperparameters(double kappa, double lam, double margin) {
  TORCH_CHECK_VALUE(std::isfinite(kappa) && kappa > 0, "kappa must be finite and > 0, got ",
                    kappa);
  TORCH_CHECK_VALUE(std::isfinite(lam) && lam >= 0, "lam must be finite and >= 0, got ", lam);
  TORCH_CHECK_VALUE(std::isfinite(margin), "margin must be finite, got ", margin);
}

Reduction parse_reduction(c10::string_view reduction) {
  if (reduction == "none") return Reduction::kNone;
  if (reduction == "sum") return Reduction::kSum;
  TORCH_CHECK_VALUE(reduction == "mean", "reduction must be one of 'mean', 'sum', 'none', got '",
                    reduction, "'");
  return Reduction::kMean;
}

Reduction check_reduction(c10::string_view reduction, const at::Tensor& h_chosen) {
  const Reduction reduce = parse_reduction(reduction);
  TORCH_CHECK_VALUE(reduce != Reduction::kMean || h_chosen.size(0) >= 1,
                    "h_chosen must have B >= 1 pairs for reduction='mean' (the mean of no pairs is "
                    "undefined), got shape ", h_chosen.sizes());
  return reduce;
}

at::Tensor reduce_losses(const at::Tensor& losses, Reduction reduction) {
  if (reduction == Reduction::kNone) return losses;
  if (reduction == Reduction::kMean && !losses.is_cpu()) return losses.mean();
  at::Tensor total = losses.sum();
  if (reduction == Reduction::kMean) {
    // ATen's mean on the CPU is this sum divided by B, with the same bits (tests/test_objectives.py
    // holds it to that); dividing the one value here saves the setup of an elementwise op, 8-11 us
    // of a forward + backward at B = 4096 on the project's CPU.
    AT_DISPATCH_FLOATING_TYPES(total.scalar_type(), "minqr mean", [&] {
      *total.mutable_data_ptr<scalar_t>() /= scalar_t(losses.size(0));
    });
  }
  return total;
}

Reduction check_loss_backward(const at::Tensor& grad_loss, const at::Tensor& grad_chosen,
                              const at::Tensor& grad_rejected, c10::string_view reduction) {
  const Reduction reduce = parse_reduction(reduction);
  const auto acc_dtype = grad_chosen.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // [B] without a reduction, [] with one
  const bool per_pair = reduce == Reduction::kNone;
  TORCH_CHECK(grad_loss.dim() == (per_pair ? 1 : 0) && grad_chosen.dim() == 2 &&
                  grad_chosen.sizes() == grad_rejected.sizes() &&
                  (!per_pair || grad_loss.size(0) == grad_chosen.size(0)) &&
                  grad_chosen.scalar_type() == grad_rejected.scalar_type() &&
                  grad_loss.scalar_type() == acc_dtype &&
                  grad_loss.device() == grad_chosen.device() &&
                  grad_chosen.device() == grad_rejected.device(),
              "minqr::loss_backward expects grad_loss ([B] for reduction='none', [] otherwise) in "
              "the accumulation dtype and gradients [B, N] on its device, got ", grad_loss.sizes(),
              " ", grad_loss.scalar_type(), ", ", grad_chosen.sizes(), " ",
              grad_chosen.scalar_type(), ", ", grad_rejected.sizes(), " ",
              grad_rejected.scalar_type(), " and reduction='", reduction, "'");
  return reduce;
}

LossOutputs empty_loss_outputs(const at::Tensor& h_chosen, bool compute_grad) {
  const auto acc_dtype = h_chosen.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto loss = at::empty({h_chosen.size(0)}, h_chosen.options().dtype(acc_dtype));
  const std::vector<int64_t> grad_shape =
      compute_grad ? h_chosen.sizes().vec() : std::vector<int64_t>{0};
  auto grad_chosen = at::empty(grad_shape, h_chosen.options());
  auto grad_rejected = at::empty(grad_shape, h_chosen.options());
  return {loss, grad_chosen, grad_rejected};
}

TORCH_LIBRARY(minqr, m) {
  // One pass computes each pair's loss and, with compute_grad, the gradient of that pair's loss
  // with respect to its own outputs; then the losses are reduced ('none' [B], 'mean' or 'sum' []).
  // The backward (autograd.cpp) only scales those rows by the gradient of the reduced loss,
  // through loss_backward (cpu/objectives_cpu.cpp has the measurement that chose saving over
  // recomputing). The mean is the op's own rather than a torch.mean after it: that saved the mean's
  // autograd node, 0.262 → 0.241 ms of a forward + backward at B = 4096, N = 10
  // (benchmarks/RESULTS.md).
  // The formulas: objectives.h, and minqr/objectives/'s references.
  m.def(
      "paper_loss(Tensor h_chosen, Tensor h_rejected, float kappa, float lam, float margin, "
      "str reduction, bool compute_grad) -> (Tensor loss, Tensor grad_chosen, Tensor grad_rejected)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "mixture_loss(Tensor h_chosen, Tensor h_rejected, str reduction, bool compute_grad) -> "
      "(Tensor loss, Tensor grad_chosen, Tensor grad_rejected)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "independent_loss(Tensor h_chosen, Tensor h_rejected, str reduction, bool compute_grad) -> "
      "(Tensor loss, Tensor grad_chosen, Tensor grad_rejected)",
      {at::Tag::pt2_compliant_tag});
  // grad_chosen[b, :] · s_b and grad_rejected[b, :] · s_b, s_b the gradient of the reduced loss with
  // respect to pair b's loss (grad_loss[b], grad_loss, or grad_loss / B: LossScale in
  // objectives.h), multiplied in grad_loss's dtype (float32, or float64) and rounded once to the
  // gradients' dtype.
  m.def(
      "loss_backward(Tensor grad_loss, Tensor grad_chosen, Tensor grad_rejected, str reduction) -> "
      "(Tensor grad_h_chosen, Tensor grad_h_rejected)",
      {at::Tag::pt2_compliant_tag});
}

}  // namespace minqr
