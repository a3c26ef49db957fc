"""genflow: fast sampling, likelihoods and training for diffusion and flow generative models.

Public API (DESIGN.md §3)::

    import genflow as gf
    process = gf.VP()                                   # or SubVP, VE, CosineVP, EDM, LinearPath, DiscreteVP
    model = gf.Model(net, process, prediction="eps")    # eps | x0 | score | v | velocity
    x = gf.sample(model, shape=(16, 2), solver="dpmpp_2m", steps=20, generator=0)
"""
from genflow import compat, distributed, guidance, metrics, ops, schedules, solvers
from genflow._extension import HAS_EXTENSION, warn_missing_once
from genflow.cnf import CNFNet, cnf_log_likelihood, train_cnf
from genflow.engine import ODE, SDE, Solution, solve
from genflow.errors import NonFiniteError
from genflow.guidance import guided
from genflow.kernel_flows import mmd_flow, svgd
from genflow.likelihood import bits_per_dim, log_likelihood
from genflow.mixtures import GaussianMixture
from genflow.models import KINDS, Model, conversion
from genflow.ops import kernel_weighted_mean
from genflow.processes import EDM, VE, VP, CosineVP, DiscreteVP, LinearPath, Process, SubVP
from genflow.sample import sample
from genflow.schedules import time_grid
from genflow.sdflow import sd_flow, train_sd_generator

__version__ = "0.1.0"

__all__ = [
    "CNFNet", "EDM", "HAS_EXTENSION", "KINDS", "VE", "VP", "CosineVP", "DiscreteVP", "GaussianMixture",
    "LinearPath", "Model", "NonFiniteError", "ODE", "SDE", "Solution", "Process", "SubVP", "bits_per_dim", "cnf_log_likelihood", "compat", "conversion",
    "distributed", "guidance", "guided", "kernel_weighted_mean", "log_likelihood", "metrics", "mmd_flow", "ops", "sample",
    "schedules", "sd_flow", "solve", "solvers", "svgd", "time_grid", "train_cnf", "train_sd_generator",
]

warn_missing_once()
