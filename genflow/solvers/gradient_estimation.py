"""The gradient-estimation sampler of Permenter & Yuan (2024)."""
from genflow._checks import check_real
from genflow.solvers.pndm import NoiseAdams

__all__ = ["GradientEstimation"]


class GradientEstimation(NoiseAdams):
    """Gradient estimation: DDIM with the noise prediction extrapolated from the previous step's.

    Permenter & Yuan (2024), "Interpreting and Improving Diffusion Models from an Optimization
    Perspective", Algorithm 2: ``x' = (alpha'/alpha) x + alpha' (s' - s) e`` with ``s = sigma/alpha``
    and ``e = gamma eps_i + (1 - gamma) eps_{i-1}`` (``gamma = 2``, the paper's choice and ComfyUI's
    ``sample_gradient_estimation`` default); the first step, and a step to ``sigma' = 0`` (which
    returns ``alpha' x0``), use ``e = eps_i``. 1 NFE per step.

    Order 1: the weights ``(gamma, 1 - gamma)`` are consistent but not second order for any
    ``gamma != 3/2`` (``gamma = 3/2`` is Adams–Bashforth 2, order 2; ``expected_order``).
    """

    name = "gradient_estimation"
    order = 1
    max_order = 2
    # The default gamma = 2 is pre-asymptotic at the order test's 10..80 steps on VP (local slopes
    # 0.43, 0.73, 0.87, then 0.93, 0.97 to 320 steps): tests/solvers/test_gradient_estimation.py
    # checks that it settles at 1 between 160 and 320 steps.
    order_test_options = ({"gamma": 1.0}, {"gamma": 1.5})

    @classmethod
    def expected_order(cls, *, gamma=2.0, **options) -> int:
        return 2 if gamma == 1.5 else 1

    def __init__(self, model, ts, *, gamma: float = 2.0, **kwargs):
        super().__init__(model, ts, **kwargs)
        self.gamma = check_real("gamma", gamma)

    def weights(self, i, k):
        q = self.grid[i + 1]
        if k == 1 or (type(q.sigma) is float and q.sigma == 0):
            return [1.0, 0.0][:k]
        return [self.gamma, 1.0 - self.gamma]
