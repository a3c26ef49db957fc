"""RES multistep: the refined exponential solver's multistep methods (Zhang et al. 2023).

Zhang, Tao, Lu and Chen (2023), "Improved Order Analysis and Design of Exponential Integrator
for Diffusion Models" (RES), §4: in data prediction with ``h = lambda' - lambda`` the step is

    x' = (sigma'/sigma) x + alpha' h sum_j b_j x0_{i-j},     c_j = (lambda_{i-j} - lambda_i)/h

with weights from the refined order conditions ``sum_j b_j = phi_1(-h)``,
``sum_j b_j c_j = phi_2(-h)`` and (3M) ``sum_j b_j c_j^2 = 2 phi_3(-h)``, the exponential-integrator
``phi_k`` of ``-h``. These conditions have one solution, the exact exponential integral of the
interpolant of the past data predictions, which is DPM-Solver++'s multistep update in its
``solver_type="heun"`` second-order form (``b_2 = phi_2(-h)/c_2``, ``b_1 = phi_1(-h) - b_2``) and
its ``variant="taylor"`` third-order form. So ``res_2m`` and ``res_3m`` run those updates
(``genflow/solvers/dpm_solver.py``) with RES's settings: no lowering of the final orders, a
first-order first step and a first-order step to ``sigma' = 0``, as ComfyUI's ``res_multistep``.
"""
from genflow.solvers.dpm_solver import DPMSolverPP2M, DPMSolverPP3M

__all__ = ["RES2M", "RES3M"]


class RES2M(DPMSolverPP2M):
    """RES 2M (Zhang et al. 2023, §4, second-order refined multistep; ComfyUI ``res_multistep``).

    ``x' = (sigma'/sigma) x + alpha' h [phi_1(-h) x0 + phi_2(-h) (x0 - x0_{-1})/r]`` with
    ``r = h_{-1}/h``: DPM-Solver++(2M) with ``solver_type="heun"`` and ``lower_order_final=False``
    by default. Order 2, 1 NFE per step; the options are ``dpmpp_2m``'s.
    """

    name = "res_2m"
    default_solver_type = "heun"
    order_test_options = ({},)

    def __init__(self, model, ts, *, lower_order_final: bool = False, **kwargs):
        super().__init__(model, ts, lower_order_final=lower_order_final, **kwargs)


class RES3M(DPMSolverPP3M):
    """RES 3M (Zhang et al. 2023, §4, third-order refined multistep).

    ``x' = (sigma'/sigma) x + alpha' h (b_1 x0 + b_2 x0_{-1} + b_3 x0_{-2})`` with ``b`` solving
    ``sum b_j = phi_1(-h)``, ``sum b_j c_j = phi_2(-h)``, ``sum b_j c_j^2 = 2 phi_3(-h)``: DPM-Solver++(3M)
    with ``variant="taylor"``, ``solver_type="heun"`` (its second step) and
    ``lower_order_final=False`` by default. The first-order first step bounds the global order by 2
    (``expected_order``; ``warmup="singlestep"`` gives 3). 1 NFE per step; the options are ``dpmpp_3m``'s.
    """

    name = "res_3m"
    default_solver_type = "heun"
    order_test_options = ({},)

    def __init__(self, model, ts, *, lower_order_final: bool = False, **kwargs):
        super().__init__(model, ts, lower_order_final=lower_order_final, **kwargs)
