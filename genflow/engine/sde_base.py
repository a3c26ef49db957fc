"""The base of the SDE schemes: argument checks, the drift/diffusion calls, the noise product
``g dW`` for every noise type and the fused stage combinations.

A scheme's step computes a handful of host float64 scalars (floats for a shared grid, [B]
tensors for per-sample times) and calls ``combine`` (``genflow.ops.fused_update``: ``out = c0 x +
sum_k c_k term_k + s z``, at most 4 terms per pass) for every stage; the only other work is the
drift and diffusion calls and the elementwise products ``g * dW`` that the fused op cannot form.
The fixed-grid protocol is ``genflow.solvers.base.Solver``'s: ``step(i, y)`` advances ``y`` from
``ts[i]`` to ``ts[i+1]`` (in place unless ``y`` requires grad), and the one time loop sets
``nonfinite`` and ``step_index`` and reads ``evaluations``.
"""
import torch

from genflow.engine.brownian import rows
from genflow.engine.terms import NOISE_TYPES, SDE
from genflow.ops.fused_update import MAX_TERMS, fused_update_unchecked, use_kernel
from genflow.ownership import FRESH_OUTPUT_ADVICE, OutputOwnership

__all__ = ["SDESolver", "reciprocal"]


def reciprocal(v):
    """``1/v`` for a float or float64 [B] tensor, 0 where ``v == 0`` (samples with empty steps)."""
    if isinstance(v, torch.Tensor):
        return torch.where(v != 0, 1.0 / torch.where(v != 0, v, 1.0), 0.0)
    return 1.0 / v if v != 0 else 0.0


def _float(c):
    return c if isinstance(c, torch.Tensor) else float(c)


def _is_zero(c) -> bool:
    return not isinstance(c, torch.Tensor) and c == 0


class SDESolver:
    """Base of the SDE schemes of ``gf.solve``.

    Class attributes: ``name`` (registry name), ``strong_order``, ``weak_order`` (floats, for
    diagonal noise; ``strong_order_for(noise)`` where they depend on the noise type),
    ``nfe_per_step`` (drift plus diffusion calls), ``noise_types`` and ``sde_types`` (the
    ``gf.SDE`` noise types and interpretations the scheme integrates), ``needs_area`` (the
    scheme needs ``I_(1,0)`` from the Brownian source), ``adaptive`` (False: fixed grid).

    Args:
        term: the ``gf.SDE``.
        ts: the grid, float64 [N+1] (shared) or [N+1, B] (per-sample), increasing or decreasing.
        brownian: the Brownian source (``genflow.engine.brownian.make_brownian``).
        backend: as for ``genflow.ops.fused_update``.
    """

    name = ""
    strong_order = 0.5
    weak_order = 1.0
    nfe_per_step = 2
    noise_types = NOISE_TYPES
    sde_types = ("ito",)
    needs_area = False
    adaptive = False

    def __init__(self, term: SDE, ts: torch.Tensor, *, brownian, backend: str = "auto"):
        if not isinstance(term, SDE):
            raise TypeError(f"solver {self.name!r} integrates a gf.SDE, got term={type(term).__name__}")
        if term.noise not in self.noise_types:
            raise ValueError(f"solver {self.name!r} takes noise in {self.noise_types}, "
                             f"got gf.SDE(noise={term.noise!r})")
        if term.sde_type not in self.sde_types and term.noise != "additive":  # additive: Itô = Stratonovich
            raise ValueError(f"solver {self.name!r} integrates {' or '.join(self.sde_types)} SDEs, got "
                             f"gf.SDE(sde_type={term.sde_type!r}); convert the drift or pick another solver")
        if self.needs_area and not getattr(brownian, "has_area", False):
            raise ValueError(f"solver {self.name!r} needs the time integral I_(1,0) of the Brownian motion: use "
                             f"brownian=None (Philox) or torchsde's BrownianInterval(levy_area_approximation="
                             f"'space-time'), not {brownian!r}")
        if not isinstance(ts, torch.Tensor) or ts.dim() not in (1, 2) or ts.shape[0] < 2:
            raise ValueError(f"ts must be a tensor of shape [N+1] or [N+1, B] with N >= 1, got "
                             f"{list(ts.shape) if isinstance(ts, torch.Tensor) else type(ts).__name__}")
        self.term, self.brownian, self.backend = term, brownian, backend
        self.ts = ts.detach().to("cpu", torch.float64)
        self.grid = self.ts.tolist() if self.ts.dim() == 1 else list(self.ts)
        self.evaluations = 0
        # the solver owns its stages: drift and diffusion outputs that share memory are copied (genflow.ownership)
        self.ownership = {kind: OutputOwnership(advice=FRESH_OUTPUT_ADVICE) for kind in ("drift", "diffusion")}
        self.nonfinite = None  # int32 [1] divergence flag, set by the loop (check_finite)
        self.step_index = 0
        self._kernel = None
        self._stage_times = {}  # c -> t_i + c (t_{i+1} - t_i) for every i, on y's device and dtype

    @classmethod
    def strong_order_for(cls, noise: str) -> float:
        """The strong order on SDEs with this noise type."""
        return cls.strong_order

    @classmethod
    def nfe(cls, steps: int) -> int:
        """Drift and diffusion calls of a solve with ``steps`` steps."""
        return cls.nfe_per_step * steps

    def interval(self, i: int):
        """``(t_i, t_{i+1})``: floats, or float64 [B] tensors for a per-sample grid."""
        return self.grid[i], self.grid[i + 1]

    def time(self, i: int, c: float, like: torch.Tensor) -> torch.Tensor:
        """``t_i + c (t_{i+1} - t_i)`` as the drift/diffusion argument: 0-d or [B], ``like``'s dtype/device."""
        table = self._stage_times.get(c)
        if table is None or table.dtype != like.dtype or table.device != like.device:
            ts = self.ts
            table = ts[:-1] if c == 0 else ts[1:] if c == 1 else ts[:-1] + c * (ts[1:] - ts[:-1])
            table = table.to(dtype=like.dtype, device=like.device)
            self._stage_times[c] = table
        return table[i]

    def f(self, i: int, c: float, y: torch.Tensor) -> torch.Tensor:
        """The drift at ``(t_i + c dt, y)``."""
        return self.drift(self.time(i, c, y), y)

    def g(self, i: int, c: float, y: torch.Tensor) -> torch.Tensor:
        """The diffusion at ``(t_i + c dt, y)``."""
        return self.diffusion(self.time(i, c, y), y)

    def drift(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``term.drift(t, y)`` (one evaluation), checked against ``y``."""
        self.evaluations += 1
        out = self.ownership["drift"].call(self.term.drift, y, t, y, where=lambda: self.where("drift"))
        if not isinstance(out, torch.Tensor) or out.shape != y.shape or out.dtype != y.dtype:
            got = f"{out.dtype} {list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"drift(t, y) must return a tensor like y ({y.dtype} {list(y.shape)}), got {got}")
        return out

    def diffusion(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``term.diffusion(t, y)`` (one evaluation), checked for the noise type."""
        self.evaluations += 1
        out = self.ownership["diffusion"].call(self.term.diffusion, y, t, y, where=lambda: self.where("diffusion"))
        return self.check_diffusion(out, y)

    def where(self, call: str) -> str:
        """Names the current call in error messages: solver, step and evaluation."""
        return f"gf.solve: solver {self.name!r}, step {self.step_index + 1}, {call} call (evaluation {self.evaluations})"

    def check_diffusion(self, g, y: torch.Tensor) -> torch.Tensor:
        """``g`` when its shape fits the noise type: ``y``'s shape (diagonal, additive, scalar; a
        per-sample ``[B]`` or 0-d ``g`` means ``g I`` for diagonal/additive) or ``[B, D, m]``
        (general, ``y = [B, D]``); a ``ValueError`` naming the expected shape otherwise."""
        noise = self.term.noise
        if noise == "general":
            expected = [(*y.shape, self.term.brownian_size)]
        elif noise == "scalar":
            expected = [tuple(y.shape)]
        else:
            expected = [tuple(y.shape), (y.shape[0],), ()]
        if not isinstance(g, torch.Tensor) or tuple(g.shape) not in expected:
            got = list(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(f"diffusion(t, y) must return a tensor of shape {list(expected[0])} for noise={noise!r} "
                             f"(y has shape {list(y.shape)}), got {got}")
        if g.dtype != y.dtype:
            raise TypeError(f"diffusion(t, y) must return y's dtype {y.dtype}, got {g.dtype}")
        return g

    def isotropic(self, g: torch.Tensor, y: torch.Tensor) -> bool:
        """Whether ``g`` is one value per sample (``g I``): its noise can be drawn in the kernel."""
        return self.term.noise in ("diagonal", "additive") and g.dim() <= 1

    def prod(self, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``g dW`` for ``v`` shaped like ``dW``: ``g * v`` (diagonal, additive), ``g * v[:, None..]``
        (scalar), ``g @ v`` (general)."""
        noise = self.term.noise
        if noise == "general":
            return torch.bmm(g, v.unsqueeze(-1)).squeeze(-1)
        if noise == "scalar":
            return g * rows(v, g)
        if g.dim() <= 1:  # g I, one value per sample
            return rows(g, v) * v
        return g * v

    def target(self, i: int, y: torch.Tensor):
        """Where step ``i`` writes: ``y`` itself, except at the first step (the caller's ``y0``)."""
        return y if i > 0 else None

    def full(self, g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``g`` expanded to ``y``'s shape where it is one value per sample (``g I``)."""
        return rows(g, y).expand_as(y) if g.dim() < y.dim() else g

    def combine(self, x, terms, coefs, noise_scale=0.0, *, seed=None, offset: int = 0, out=None):
        """``out = coefs[0] x + sum_k coefs[k] terms[k-1] + noise_scale N(seed, offset)`` in
        ``ceil(K / 4)`` fused passes (terms with an exact 0 coefficient skipped). ``out`` (usually
        the state) is ignored while autograd records the inputs: the functional form is used."""
        kept = [(t, _float(c)) for t, c in zip(terms, coefs[1:]) if not _is_zero(c)]
        recording = torch.is_grad_enabled() and any(
            isinstance(v, torch.Tensor) and v.requires_grad for v in (x, noise_scale, *coefs, *terms))
        if recording:
            out = None
        if self._kernel is None:
            self._kernel = use_kernel(self.backend, x.device)
        c0 = _float(coefs[0])
        while True:
            head, kept = kept[:MAX_TERMS], kept[MAX_TERMS:]
            last = not kept
            x = fused_update_unchecked(x, [t for t, _ in head], [c0] + [c for _, c in head] +
                                       [_float(noise_scale) if last else 0.0], kernel=self._kernel,
                                       seed=seed if last else None, offset=offset, out=out,
                                       nonfinite=self.nonfinite, step=self.step_index)
            if last:
                return x
            c0, out = 1.0, x if out is None and not recording else out
