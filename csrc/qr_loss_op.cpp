// The op's schema, declared once for every backend, and the Python module minqr._C that
// loading registers it. Backends: qr_loss_cpu.cpp (CPU), qr_loss_cuda.cu (CUDA); the fake
// (meta) kernel and autograd live in minqr/ops.py.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "qr_loss_op.h"

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

void check_loss_args(const at::Tensor& q_chosen, const at::Tensor& q_rejected, double kappa,
                     double lam, double margin) {
  for (const auto& [name, q] : {std::pair{"q_chosen", &q_chosen}, {"q_rejected", &q_rejected}}) {
    TORCH_CHECK_TYPE(supported_dtype(q->scalar_type()), name,
                     " must be a float16, bfloat16, float32 or float64 tensor, got ",
                     dtype_name(q->scalar_type()));
  }
  TORCH_CHECK_TYPE(q_chosen.scalar_type() == q_rejected.scalar_type(),
                   "q_chosen and q_rejected must have the same dtype, got ",
                   dtype_name(q_chosen.scalar_type()), " and ",
                   dtype_name(q_rejected.scalar_type()));
  for (const auto& [name, q] : {std::pair{"q_chosen", &q_chosen}, {"q_rejected", &q_rejected}}) {
    TORCH_CHECK_VALUE(q->dim() == 2, name, " must have shape [B, N] (2 dimensions), got shape ",
                      q->sizes());
  }
  TORCH_CHECK_VALUE(q_chosen.sizes() == q_rejected.sizes(),
                    "q_chosen and q_rejected must have the same shape, got ", q_chosen.sizes(),
                    " and ", q_rejected.sizes());
  TORCH_CHECK_VALUE(q_chosen.size(1) >= 1,
                    "q_chosen must have N >= 1 quantiles (shape [B, N]), got shape ",
                    q_chosen.sizes());
  TORCH_CHECK_VALUE(q_chosen.device() == q_rejected.device(),
                    "q_chosen and q_rejected must be on the same device, got ", q_chosen.device(),
                    " and ", q_rejected.device());
  TORCH_CHECK_VALUE(std::isfinite(kappa) && kappa > 0, "kappa must be finite and > 0, got ",
                    kappa);
  TORCH_CHECK_VALUE(std::isfinite(lam) && lam >= 0, "lam must be finite and >= 0, got ", lam);
  TORCH_CHECK_VALUE(std::isfinite(margin), "margin must be finite, got ", margin);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_loss_outputs(const at::Tensor& q_chosen,
                                                                  bool compute_grad) {
  const auto acc_dtype = q_chosen.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto loss = at::empty({q_chosen.size(0)}, q_chosen.options().dtype(acc_dtype));
  const std::vector<int64_t> grad_shape =
      compute_grad ? q_chosen.sizes().vec() : std::vector<int64_t>{0};
  auto grad_chosen = at::empty(grad_shape, q_chosen.options());
  auto grad_rejected = at::empty(grad_shape, q_chosen.options());
  return {loss, grad_chosen, grad_rejected};
}

TORCH_LIBRARY(minqr, m) {
  // One pass computes the per-pair loss and, with compute_grad, ∂loss_b/∂q of every pair; the
  // backward registered in minqr/ops.py only scales those rows by grad_output (see
  // qr_loss_cpu.cpp for the measurement that chose saving over recomputing).
  m.def(
      "paper_loss(Tensor h_chosen, Tensor h_rejected, float kappa, float lam, "
      "float margin, bool compute_grad) -> (Tensor loss, Tensor grad_chosen, "
      "Tensor grad_rejected)",
      {at::Tag::pt2_compliant_tag});
}

}  // namespace minqr
