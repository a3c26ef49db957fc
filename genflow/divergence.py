"""The divergence of a velocity field: the drift ``(x, t) -> (v(x, t), div v(x, t))`` of the
instantaneous change of variables.

Along a solution of ``dx/dt = v(x, t)`` the log-density obeys ``d/dt log q_t(x_t) = -div v(x_t, t)``
(Lim, "An Introduction to Generative Modeling with Flows and Diffusion Models" §6.3.1.6; Chen et
al. 2018, "Neural Ordinary Differential Equations", Theorem 1), so likelihoods integrate the
divergence ``div v = tr(dv/dx)`` beside the state (``genflow.likelihood``, ``genflow.cnf``).
``DivergenceDrift`` computes it:

- exactly, ``tr(dv/dx) = sum_i e_i^T (dv/dx) e_i``: one backward pass per dimension (a loop),
  the dimensions batched into one pass, or one ``torch.compile``d ``torch.func`` function;
- by Hutchinson's estimator (Hutchinson 1989; Lim, op. cit., §5.2.3, "Sliced score matching")
  ``div v = E[eps^T (dv/dx) eps]`` with ``E[eps eps^T] = I``: one VJP (``eps^T dv/dx``) or JVP
  (``(dv/dx) eps``) per probe, dotted with the probe by ``genflow.ops.hutchinson.probe_dot``.
  The probes are held fixed over a solve (FFJORD, Grathwohl et al., ICLR 2019, §3.1).

With ``graph=True`` (CNF training) every output keeps its autograd graph (``create_graph``), so
the likelihood can be back-propagated to the network's parameters. ``graphed`` replays the
evaluation from a CUDA graph. Caches are ``genflow._cache.LRU`` keyed by value; a key that
depends on the model holds the model object itself (its identity), never its ``id()``.
"""
from __future__ import annotations

import time
import warnings

import torch

from genflow import cuda_graph
from genflow._cache import LRU
from genflow.ops.hutchinson import probe_dot

__all__ = ["DivergenceDrift", "EXACT_ROUNDS", "GraphedDrift", "graphed"]

EXACT_CHUNK = 1 << 22  # elements per batched exact-divergence pass: dims * B * D
EXACT_ROUNDS = 4  # timed evaluations of each exact scheme (real drift calls) before choosing one
EXACT_CHOICE = LRU(16)  # (model, shape, dtype, device) -> [scheme name or None, timings]
COMPILED = LRU(8)  # (model, shape, dtype, device) -> drift function, or None before the second call
DRIFT_GRAPHS = LRU(8)  # (model, method, mode, shape, dtype, device, probes) -> (replay, x, t, probes, out)


def times_schemes(device: torch.device) -> bool:
    """Whether the exact schemes are timed on ``device`` (not on CPU: there the loop is faster)."""
    return device.type != "cpu"


def _sync(x):
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


class DivergenceDrift:
    """``(x, t) -> (v, div)``: ``v = model.velocity(x, t)`` in x's dtype and ``div = tr(dv/dx)``
    (exact or Hutchinson's mean over the probes ``eps``) as float64 [B]; ``nfe`` counts calls.

    Args:
        model: anything with ``velocity(x, t)`` treating samples independently.
        method: ``"exact"`` or ``"hutchinson"``.
        eps: the Hutchinson probes (Tensors like x), fixed for the solve; ``()`` for exact.
        mode: hutchinson ``"vjp"`` or ``"jvp"`` (falls back to ``"vjp"`` when the model is not
            forward-mode differentiable); exact None (timed on GPUs), ``"loop"``, ``"batched"``
            or ``"compile"``.
        graph: keep the autograd graph of both outputs (the divergence by double backward).
    """

    def __init__(self, model, method: str, eps, mode, *, graph: bool = False):
        self.model, self.method, self.eps, self.mode, self.graph = model, method, eps, mode, graph
        self.nfe = 0
        self._basis_key = self._basis_list = None

    def __call__(self, x, t):
        self.nfe += 1
        return self.evaluate(x, t)

    def evaluate(self, x, t):
        """``(v, div)`` without counting (the body a CUDA graph captures)."""
        if self.method == "exact":
            return self._exact(x, t)
        if self.mode == "jvp":
            try:
                return self._jvp(x, t)
            except (RuntimeError, NotImplementedError):  # not forward-mode differentiable
                self.mode = "vjp"
        return self._vjp(x, t)

    def _leaf(self, x):
        """x as the input the divergence is taken with respect to (x itself when it carries the
        graph of a differentiable solve, else a detached leaf)."""
        if self.graph and x.requires_grad:
            return x
        return x.detach().requires_grad_(True)

    def _out(self, v, div):
        return (v, div) if self.graph else (v.detach(), div.detach())

    def _vjp(self, x, t):
        """``mean_k eps_k^T (dv/dx) eps_k``: one forward pass, one VJP per probe."""
        with torch.enable_grad():
            xg = self._leaf(x)
            v = self.model.velocity(xg, t)
            if self.graph:  # differentiable dot products (probe_dot keeps no graph)
                dots = [(torch.autograd.grad(v, xg, e, create_graph=True, retain_graph=True)[0] * e)
                        .reshape(x.shape[0], -1).to(torch.float64).sum(1) for e in self.eps]
                return v, sum(dots) / len(self.eps)
            div = None
            for k, eps in enumerate(self.eps):
                (g,) = torch.autograd.grad(v, xg, eps, retain_graph=k + 1 < len(self.eps))
                div = probe_dot(eps, g, scale=1.0 / len(self.eps), accumulate=div)
        return v.detach(), div

    def _jvp(self, x, t):
        """``mean_k eps_k^T (dv/dx) eps_k`` by forward mode (``torch.func.jvp``), one per probe."""
        div = v = None
        for eps in self.eps:
            v, jv = torch.func.jvp(lambda y: self.model.velocity(y, t), (x,), (eps,))
            div = probe_dot(eps, jv, scale=1.0 / len(self.eps), accumulate=div)
        return v, div

    def _exact(self, x, t):
        """tr(dv/dx) by ``_exact_loop`` (one forward, one backward per dimension: the least
        arithmetic; always on CPU, where each pass is compute-bound, and under ``graph``) or
        ``_exact_batched`` (the dimensions batched into one forward and one backward: the fewest
        kernel launches). On other devices the faster of the two is timed on the first
        ``EXACT_ROUNDS`` evaluations of each and remembered per model, shape, dtype and device."""
        if self.mode == "compile":
            fn = compiled_exact(self.model, x)
            return self._exact_loop(x, t) if fn is None else fn(x, t)
        if self.mode == "batched":
            return self._exact_batched(x, t)
        if self.mode == "loop" or self.graph or x.numel() == x.shape[0] or not times_schemes(x.device):
            return self._exact_loop(x, t)
        entry = EXACT_CHOICE.get_or_compute((self.model, tuple(x.shape), x.dtype, str(x.device)), lambda: [None, []])
        if entry[0] is not None:
            return getattr(self, entry[0])(x, t)
        timings = entry[1]
        scheme = EXACT_SCHEMES[len(timings) % 2]  # alternate the two
        _sync(x)
        start = time.perf_counter()
        out = getattr(self, scheme)(x, t)
        _sync(x)
        timings.append(time.perf_counter() - start)
        if len(timings) == 2 * EXACT_ROUNDS:  # the best time of each, past the warm-up round
            entry[0] = min(EXACT_SCHEMES, key=lambda name: min(timings[2 + EXACT_SCHEMES.index(name)::2]))
        return out

    def _exact_loop(self, x, t):
        """One forward pass, then one backward pass per dimension i (output gradient ``e_i``
        summed over the batch: row i of every sample's Jacobian; samples must not interact)."""
        batch = x.shape[0]
        with torch.enable_grad():
            xg = self._leaf(x)
            v = self.model.velocity(xg, t)
            vf = v.reshape(batch, -1)
            dim = vf.shape[1]
            div = torch.zeros(batch, dtype=torch.float64, device=x.device)
            for i in range(dim):
                (g,) = torch.autograd.grad(vf[:, i].sum(), xg, create_graph=self.graph,
                                           retain_graph=self.graph or i + 1 < dim)
                div = div + g.reshape(batch, -1)[:, i] if self.graph else div.add_(g.reshape(batch, -1)[:, i])
        return self._out(v, div)

    def _exact_batched(self, x, t):
        """The batch replicated over a chunk of c dimensions, one backward pass per chunk with
        the one-hot rows ``e_i`` as output gradients (replica i gives row i of the Jacobian)."""
        batch, dim = x.shape[0], x[0].numel()
        div = v = None
        for basis in self._bases(x):
            c = basis.shape[0] // batch
            with torch.enable_grad():
                xr = x.detach().repeat((c,) + (1,) * (x.dim() - 1)).requires_grad_(True)
                vr = self.model.velocity(xr, t.repeat(c))
                (g,) = torch.autograd.grad(vr, xr, basis)
            part = (g * basis).reshape(c, batch, dim).sum((0, 2), dtype=torch.float64)
            div = part if div is None else div + part
            if v is None:
                v = vr[:batch].detach()
        return v, div

    def _bases(self, x):
        """One Tensor[c B, *D] per chunk of dimensions holding in replica i the unit vector of
        the chunk's dimension i; kept for the solve (x's shape is fixed)."""
        key = (x.shape, x.dtype, x.device)
        if self._basis_key != key:
            batch, dim = x.shape[0], x[0].numel()
            chunk = max(1, min(dim, EXACT_CHUNK // max(1, batch * dim)))
            self._basis_list = []
            for start in range(0, dim, chunk):
                c = min(dim, start + chunk) - start
                e = torch.zeros(c, batch, dim, dtype=x.dtype, device=x.device)
                e[torch.arange(c, device=x.device), :, torch.arange(start, start + c, device=x.device)] = 1
                self._basis_list.append(e.reshape((c * batch,) + tuple(x.shape[1:])))
            self._basis_key = key
        return self._basis_list


EXACT_SCHEMES = ("_exact_batched", "_exact_loop")


def compiled_exact(model, x):
    """The exact drift ``(x, t) -> (v, tr dv/dx)`` of ``model`` as one ``torch.compile``d function
    (``torch.func.vjp``, its pullback vmapped over the D unit vectors: the forward once, the D
    backward rows as one batched pass, fused by inductor), kept per model, shape, dtype and
    device in ``COMPILED``. None on the first call for a key (evaluate eagerly with plain autograd
    then, so state a model builds lazily is made outside any trace or transform); compiled on the
    second, which keeps the eager ``torch.func`` function, with a warning, where compiling fails."""
    key = (model, tuple(x.shape), x.dtype, str(x.device))
    missing = object()
    fn = COMPILED.get(key, missing)
    if fn is missing:
        COMPILED.put(key, None)
        return None
    if fn is not None:
        return fn
    batch, dim = x.shape[0], x[0].numel()

    def drift(x, t):
        v, pullback = torch.func.vjp(lambda y: model.velocity(y, t), x)
        basis = torch.eye(dim, dtype=x.dtype, device=x.device).reshape((dim, 1) + tuple(x.shape[1:]))
        (rows,) = torch.func.vmap(pullback)(basis.expand((dim,) + tuple(x.shape)))
        div = rows.reshape(dim, batch, dim).diagonal(dim1=0, dim2=2).sum(1, dtype=torch.float64)
        return v, div

    compiled = torch.compile(drift, dynamic=False)

    def first(x, t):
        try:
            out = compiled(x, t)
            chosen = compiled
        except Exception as error:  # noqa: BLE001 - any compiler failure: fall back to eager
            warnings.warn(f"log_likelihood(compile=True): torch.compile failed on the drift ({type(error).__name__}: "
                          f"{str(error).splitlines()[0][:200] if str(error) else ''}); evaluating it eagerly",
                          RuntimeWarning, stacklevel=4)
            out, chosen = drift(x, t), drift
        COMPILED.put(key, chosen)
        return out

    return first


class GraphedDrift:
    """A ``DivergenceDrift`` replayed from a CUDA graph (``log_likelihood(..., cuda_graph=True)``).

    One evaluation (the forward pass, the VJP/JVP or exact-trace backward passes and
    ``probe_dot``) is a few dozen small kernels, so at moderate batch its cost is launch latency
    (DESIGN.md §6: torch.func VJP 8x a forward on H100). Captured once per model, method, mode,
    shape and dtype (``genflow.cuda_graph.record``: warm-up on a side stream, then capture) and
    kept in ``DRIFT_GRAPHS``; each evaluation copies x, t (and, per solve, the probes) into the
    graph's static inputs and replays it."""

    def __init__(self, drift: DivergenceDrift, x, t):
        self.drift, self.nfe = drift, 0
        key = (drift.model, drift.method, drift.mode, tuple(x.shape), x.dtype, str(x.device), len(drift.eps))
        entry = DRIFT_GRAPHS.get(key)
        if entry is None:
            entry = DRIFT_GRAPHS.put(key, self._capture(drift, x, t))
        self.replay, self.x, self.t, self.eps, self.out = entry
        for static, eps in zip(self.eps, drift.eps):
            static.copy_(eps)

    @staticmethod
    def _capture(drift, x, t):
        static_x, static_t = x.detach().clone(), t.clone()
        static_eps = [e.clone() for e in drift.eps]
        mode = "batched" if drift.method == "exact" else drift.mode  # no timing inside a capture
        body = DivergenceDrift(drift.model, drift.method, static_eps, mode)
        replay, out = cuda_graph.record(lambda: body.evaluate(static_x, static_t), x.device)
        return replay, static_x, static_t, static_eps, out

    def __call__(self, x, t):
        self.nfe += 1
        self.x.copy_(x)
        self.t.copy_(t)
        self.replay()
        return self.out[0].clone(), self.out[1].clone()


def graphed(drift: DivergenceDrift, x, t):
    """``GraphedDrift`` of ``drift``, or ``drift`` itself (with a warning) if capture fails."""
    try:
        return GraphedDrift(drift, x, t)
    except RuntimeError as error:  # a host sync or an op that cannot be captured
        _sync(x)
        warnings.warn(f"cuda_graph=True: the likelihood drift could not be captured as a CUDA graph ({error}); "
                      "evaluating it eagerly", RuntimeWarning, stacklevel=3)
        return drift
