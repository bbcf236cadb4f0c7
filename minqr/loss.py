"""The reward-model loss: a pairwise (Bradley-Terry) term on the expected rewards plus a
quantile-Huber term whose targets are the partner's quantiles (../shared/DESIGN.md, "The loss").

For a pair b with quantiles q_c = q_chosen[b], q_r = q_rejected[b] (N each, levels
tau_i = (2i+1)/(2N)):

    d      = mean(q_c) - mean(q_r)                      L_pair = softplus(-d) = -log sigmoid(d)
    u_ij   = (q_r[j] + m) - q_c[i]                      v_ij   = (q_c[j] - m) - q_r[i]
    rho_tau(u) = |tau - 1{u<0}| * H_kappa(u) / kappa    H_kappa(u) = u^2/2 if |u| <= kappa
                                                                     else kappa(|u| - kappa/2)
    L_qr   = 1/2 * sum_i 1/N sum_j [rho_tau_i(u_ij) + rho_tau_i(v_ij)]
    L      = L_pair + lam * L_qr

The targets (q_r[j] + m for the chosen quantiles, q_c[j] - m for the rejected ones) are detached,
as QR-DQN detaches its Bellman target: a quantile moves towards its partner's quantiles, never the
other way round through the same term.

qr_pairwise_loss_reference is that formula in PyTorch, line by line; csrc/qr_loss.h mirrors it in
the fused kernel. Both compute in float32 (float64 for float64 inputs), and the per-pair losses
they return are in that dtype too, also for float16/bfloat16 inputs: a loss averaged in bfloat16
would lose the digits that training curves are read from. Gradients come back in the input dtype.
"""
import warnings

import torch
import torch.nn.functional as F

from minqr import ops
from minqr.ops import check_loss_args

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "fused", "reference")


def quantile_levels(n: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """tau_i = (2i+1)/(2N), i = 0..N-1: the midpoints of N equal probability bins."""
    if isinstance(n, bool) or not isinstance(n, (int, torch.SymInt)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    return (2 * torch.arange(n, dtype=dtype, device=device) + 1) / (2 * n)


def fused_available() -> bool:
    """Whether the compiled op minqr._C is built and loaded (its CPU kernel at least)."""
    return ops._C is not None


def _check_reduction(reduction, q_chosen: torch.Tensor) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'mean', 'sum', 'none', got {reduction!r}")
    if reduction == "mean" and q_chosen.shape[0] == 0:
        raise ValueError(
            "q_chosen must have B >= 1 pairs for reduction='mean' (the mean of no pairs is "
            f"undefined), got shape {list(q_chosen.shape)}"
        )


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _quantile_huber(u: torch.Tensor, tau: torch.Tensor, kappa: float) -> torch.Tensor:
    """rho_tau(u) = |tau - 1{u<0}| * H_kappa(u) / kappa, elementwise (tau broadcasts over u)."""
    weight = (tau - (u < 0).to(u.dtype)).abs()
    huber = torch.where(u.abs() <= kappa, 0.5 * u**2, kappa * (u.abs() - 0.5 * kappa))
    return weight * huber / kappa


def qr_pairwise_loss_reference(
    q_chosen: torch.Tensor,
    q_rejected: torch.Tensor,
    kappa: float = 1.0,
    lam: float = 1.0,
    margin: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """The loss in plain PyTorch, autograd giving the gradients; inputs [B, N] (module doc)."""
    check_loss_args(q_chosen, q_rejected, kappa, lam, margin)
    _check_reduction(reduction, q_chosen)
    dtype = torch.float64 if q_chosen.dtype == torch.float64 else torch.float32
    q_c, q_r = q_chosen.to(dtype), q_rejected.to(dtype)
    n = q_c.shape[1]
    tau = quantile_levels(n, dtype=dtype, device=q_c.device)[:, None]  # [N, 1]: level of row i

    # Pairwise term on the expected rewards.
    d = q_c.mean(dim=1) - q_r.mean(dim=1)
    l_pair = -F.logsigmoid(d)  # softplus(-d)

    # Quantile-Huber term; [B, i, j] = quantile i against the (detached) target j.
    u = (q_r.detach() + margin)[:, None, :] - q_c[:, :, None]
    v = (q_c.detach() - margin)[:, None, :] - q_r[:, :, None]
    rho_c = _quantile_huber(u, tau, kappa).mean(dim=2).sum(dim=1)
    rho_r = _quantile_huber(v, tau, kappa).mean(dim=2).sum(dim=1)
    l_qr = 0.5 * (rho_c + rho_r)

    return _reduce(l_pair + lam * l_qr, reduction)


_warned = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"{reason}; minqr.qr_pairwise_loss uses its PyTorch reference (slower)",
                      stacklevel=3)


def _fused_unavailable_reason(device: torch.device):
    if ops._C is None:
        return (
            f"the fused loss kernel minqr._C is not built ({ops.IMPORT_ERROR}); build it with "
            "`pip install --no-build-isolation -e .`"
        )
    if device.type not in ops.DEVICE_TYPES:
        return f"minqr._C has no kernel for device type '{device.type}'"
    return None


def qr_pairwise_loss(
    q_chosen: torch.Tensor,
    q_rejected: torch.Tensor,
    kappa: float = 1.0,
    lam: float = 1.0,
    margin: float = 1.0,
    reduction: str = "mean",
    impl: str = "auto",
) -> torch.Tensor:
    """The loss of preference pairs with quantile heads: q_chosen, q_rejected [B, N].

    kappa > 0 is the Huber threshold, lam >= 0 the weight of the quantile term, margin the shift
    of the targets. reduction: 'mean' | 'sum' | 'none' (the per-pair losses [B]). impl: 'fused'
    (the compiled op), 'reference' (PyTorch), or 'auto': fused where minqr._C has a kernel for
    the device, else the reference with a warning (once per reason). The scalar head is N=1 with
    lam=0: -logsigmoid(r_c - r_r), bit for bit in the reference, to the last bit of exp/log1p in
    the fused op.

    Returns the loss in float32 (float64 for float64 inputs); gradients flow back in the input
    dtype. The fused op computes each pair's gradient in its forward (when grad is enabled and an
    input requires it); the backward only scales it.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of 'auto', 'fused', 'reference', got {impl!r}")
    check_loss_args(q_chosen, q_rejected, kappa, lam, margin)
    _check_reduction(reduction, q_chosen)
    if impl != "reference":
        reason = _fused_unavailable_reason(q_chosen.device)
        if reason is not None and impl == "fused":
            raise RuntimeError(f"impl='fused': {reason}; or pass impl='reference'")
        if reason is not None:
            _warn_once(reason)
            impl = "reference"
    if impl == "reference":
        return qr_pairwise_loss_reference(q_chosen, q_rejected, kappa, lam, margin, reduction)

    compute_grad = torch.is_grad_enabled() and (q_chosen.requires_grad or q_rejected.requires_grad)
    loss, _, _ = torch.ops.minqr.qr_pairwise_loss(
        q_chosen, q_rejected, float(kappa), float(lam), float(margin), compute_grad
    )
    return _reduce(loss, reduction)
