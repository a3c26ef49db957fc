"""DPM-Solver coefficient functions: the weights of one exponential-integrator step in log-SNR time.

The solver classes in ``genflow.solvers.dpm_solver`` and the diffusers drop-in schedulers
(``genflow.compat.diffusers.dpm_solver``) build their updates from these (Lu et al. 2022a,
"DPM-Solver", §3.3; Lu et al. 2022b, "DPM-Solver++", eqs. 8-9, §4 and Algorithm 2).
"""
import torch

from genflow.solvers.base import exp, expm1, sqrt

__all__ = ["DPM_VARIANTS", "dpm_weights", "dpm_multistep_coefficients"]

DPM_VARIANTS = ("taylor", "reference", "diffusers")


def dpm_weights(h, alpha, sigma, alpha_next, sigma_next, *, data_prediction: bool = True, eta: float = 0.0,
                variant: str = "taylor"):
    """The weights of one DPM-Solver / DPM-Solver++ step of log-SNR length ``h`` (floats or [B] tensors).

    With ``hh = -(1 + eta) h``, ``R = (sigma'/sigma) e^{-eta h}``, ``M = alpha'`` (data prediction,
    Lu et al. 2022b, "DPM-Solver++", eqs. 8-9 and §4) or ``hh = h``, ``R = alpha'/alpha``,
    ``M = (1 + eta) sigma'`` (noise prediction, Lu et al. 2022a, "DPM-Solver", §3.3; ``eta`` 0 or 1,
    the SDE-DPM-Solver of Lu et al. 2022b), ``phi_1 = expm1(hh)``, ``phi_2 = phi_1/hh - 1``,
    ``phi_3 = phi_2/hh - 1/2``, the step is

        x' = R x - M phi_1 D0 - M c D1 - w M phi_3 D2 + s z

    with ``D0 = m``, ``D1 ~ h m'``, ``D2 ~ h^2 m''/2`` (the caller's divided differences),
    ``c = phi_1/2`` (``solver_type="midpoint"``) or ``phi_2`` (``"heun"``), ``w = 2``
    (``variant="taylor"``, the Taylor coefficient) or ``1`` (``"reference"``: Lu et al.'s code,
    diffusers and k-diffusion), and ``s = sigma' sqrt(1 - e^{-2 eta h})`` (data) or
    ``sigma' sqrt(e^{2h} - 1)`` (noise, ``eta = 1``). ``variant="diffusers"`` is ``"reference"``
    except that with churn (``eta > 0``) the ``D2`` weight is diffusers' ``-M (phi_3 + 1)``
    (its ``sde-dpmsolver++`` third-order update flips the sign of the 1/2 in ``phi_3``).
    A zero-length step (``h = 0``, floats) has ``R = 1`` and zero weights.

    Returns:
        ``(R, w0, w1_midpoint, w1_heun, w2, s)`` with ``x' = R x + w0 D0 + w1 D1 + w2 D2 + s z``.
    """
    if variant not in DPM_VARIANTS:
        raise ValueError(f"variant must be one of {DPM_VARIANTS}, got {variant!r}")
    if not data_prediction and eta not in (0.0, 1.0):
        raise ValueError(f"eta must be 0 or 1 for noise prediction, got {eta}")
    if data_prediction:
        hh = -(1.0 + eta) * h
        R = sigma_next / sigma * (exp(-eta * h) if eta > 0 else 1.0)
        M = alpha_next
        s = sigma_next * sqrt(-expm1(-2.0 * eta * h)) if eta > 0 else 0.0
    else:
        hh = h
        R = alpha_next / alpha
        M = (1.0 + eta) * sigma_next
        s = sigma_next * sqrt(expm1(2.0 * h)) if eta > 0 else 0.0
    phi_1 = expm1(hh)
    if not isinstance(hh, torch.Tensor) and hh == 0.0:
        phi_2 = phi_3 = 0.0
    else:
        phi_2 = phi_1 / hh - 1.0
        phi_3 = phi_2 / hh - 0.5
    w = 2.0 if variant == "taylor" else 1.0
    w2 = -w * M * phi_3
    if variant == "diffusers" and eta > 0:
        w2 = -M * (phi_3 + 1.0)
    return R, -M * phi_1, -0.5 * M * phi_1, -M * phi_2, w2, s


def dpm_multistep_coefficients(h, h_prev, alpha, sigma, alpha_next, sigma_next, *, data_prediction: bool = True,
                               eta: float = 0.0, solver_type: str = "midpoint", variant: str = "taylor"):
    """Coefficients of a multistep DPM-Solver(++) step of order ``k = len(h_prev) + 1`` (1..3).

    ``h_prev`` holds the log-SNR lengths of the previous steps, most recent first; with
    ``r_j = h_prev[j]/h``, ``D1_0 = (m0 - m1)/r_0``, ``D1_1 = (m1 - m2)/r_1`` the step is
    ``dpm_weights``' update with ``D1 = D1_0`` (order 2, midpoint or heun weight) or
    ``D1 = D1_0 + r_0/(r_0 + r_1) (D1_0 - D1_1)``, ``D2 = (D1_0 - D1_1)/(r_0 + r_1)`` (order 3,
    Lu et al. 2022b, Algorithm 2 and the reference code's third-order multistep update).

    Returns:
        ``([c_x, c_m0, c_m1, .., c_m(k-1)], s)``: ``x' = c_x x + sum_j c_mj m_j + s z`` with
        ``m_j`` the prediction (x0 or eps) ``j`` steps back.
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    if len(h_prev) > 2:
        raise ValueError(f"h_prev must hold at most 2 previous steps (order <= 3), got {len(h_prev)}")
    R, w0, w_mid, w_heun, w2, s = dpm_weights(h, alpha, sigma, alpha_next, sigma_next,
                                              data_prediction=data_prediction, eta=eta, variant=variant)
    if not h_prev:
        return [R, w0], s
    if not isinstance(h, torch.Tensor) and h == 0.0:
        return [R] + [0.0] * (len(h_prev) + 1), s
    r0 = h_prev[0] / h
    if len(h_prev) == 1:
        w1 = w_mid if solver_type == "midpoint" else w_heun
        return [R, w0 + w1 / r0, -w1 / r0], s
    r1 = h_prev[1] / h
    d10, d11 = (1.0 / r0, -1.0 / r0, 0.0), (0.0, 1.0 / r1, -1.0 / r1)
    d1 = [a + r0 / (r0 + r1) * (a - b) for a, b in zip(d10, d11)]
    d2 = [(a - b) / (r0 + r1) for a, b in zip(d10, d11)]
    return [R, w0 + w_heun * d1[0] + w2 * d2[0], w_heun * d1[1] + w2 * d2[1], w_heun * d1[2] + w2 * d2[2]], s

