"""Diffusion and flow processes: the marginal law ``x_t = alpha(t) x_0 + sigma(t) eps``.

Conventions (DESIGN.md section 2): ``t = 0`` is data, ``t = T`` is noise.

    log_snr(t) = lambda(t) = log(alpha(t) / sigma(t))
    f(t)       = d log alpha / dt
    g2(t)      = d sigma^2 / dt - 2 f(t) sigma(t)^2

so the forward SDE is ``dx = f(t) x dt + sqrt(g2(t)) dW`` and, for ``s < t``,
``x_t | x_s ~ N(alpha_t/alpha_s x_s, (sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2) I)``
(Lim, "An Introduction to Generative Modeling with Flows and Diffusion Models", section 6.3.2.5, eqs. 6.51-6.54; Kingma et al. 2021).

Every coefficient method accepts a Python number (returns a Python float, computed in float64)
or a Tensor of any shape (returns a Tensor of that shape on the same device). Tensor results
are float64 for float64 input and float32 otherwise; the arithmetic itself is always done in
float64, so float32 results are correctly rounded float64 values.

The families live in ``continuous`` (VP, SubVP, VE, CosineVP, EDM, LinearPath) and
``discrete`` (DiscreteVP) on the base class of ``base``.
"""
from genflow.processes.base import Process
from genflow.processes.continuous import EDM, VE, VP, CosineVP, LinearPath, SubVP
from genflow.processes.discrete import DiscreteVP

__all__ = ["Process", "VP", "SubVP", "VE", "CosineVP", "EDM", "LinearPath", "DiscreteVP"]
