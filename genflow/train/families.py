"""Model families the Trainer drives: diffusion, flow matching, rectified flow, CNF, sliced score.

A ``Family`` owns its trainable modules and knows its loss, how to sample and (when it has
one) its log-likelihood. ``loss`` takes one seed per sample: every random draw of sample ``b``
(its noise, time, label dropout, probes) is Philox stream ``seeds[b]`` at a fixed offset, so the
loss of a global batch does not depend on how it is sharded over processes (the OT couplings
excepted: they couple the global batch by design, ``objectives.gather_coupled``).

``make_family(name, *, data_shape, num_classes=None, **options)`` builds one by name.
"""
from __future__ import annotations

import inspect
from typing import Dict, Optional

import torch
from torch import nn

import genflow.processes as processes
from genflow import cnf
from genflow._checks import check_choice, check_int, check_real, did_you_mean
from genflow.engine.solve import solve
from genflow.engine.terms import SDE
from genflow.likelihood import log_likelihood as _log_likelihood
from genflow.guidance import guided
from genflow.models import Model
from genflow.noise import generator_seed
from genflow.ops import randn
from genflow.sample import sample as _sample
from genflow.solvers import available as _solvers
from genflow.train import objectives as obj

__all__ = ["FAMILIES", "CNFFamily", "DiffusionFamily", "Family", "FlowMatchingFamily", "RectifiedFlowFamily",
           "SlicedScoreFamily", "make_family", "reflow_pairs", "register_family"]

# Philox stream offsets of the per-sample draws
_NOISE, _TIME, _DROPOUT, _COUPLING, _PROBES = 0, 1, 2, 3, 16
PROCESSES = ("VP", "SubVP", "VE", "CosineVP", "EDM", "LinearPath")


def _make_process(process, options: Optional[dict]):
    """A genflow process from a name (case-insensitive) or an instance."""
    if isinstance(process, processes.Process):
        return process
    names = {p.lower(): p for p in PROCESSES}
    key = check_choice("process", str(process).lower(), tuple(names))
    return getattr(processes, names[key])(**(options or {}))


def _default_net(data_shape, num_classes, net_options: Optional[dict]) -> nn.Module:
    """``nets.MLP`` for vectors ``(D,)``, ``nets.UNet`` for square images ``(C, H, H)``."""
    from genflow.train import nets

    opts = dict(net_options or {})
    if len(data_shape) == 1:
        return nets.MLP(data_shape[0], num_classes=num_classes, **opts)
    if len(data_shape) == 3 and data_shape[1] == data_shape[2]:
        return nets.UNet(channels=data_shape[0], image_size=data_shape[1], num_classes=num_classes, **opts)
    raise ValueError(f"no default network for data_shape {tuple(data_shape)}: expected (D,) or (C, H, H); pass net=")


def _labels_or_none(labels, n: int, device):
    if labels is None:
        return None
    labels = torch.as_tensor(labels, device=device)
    if labels.dim() == 0:
        labels = labels.expand(n)
    if labels.dtype.is_floating_point or labels.shape != (n,):
        raise ValueError(f"labels must be an int or integers of shape [{n}], got {labels.dtype} {tuple(labels.shape)}")
    return labels.to(torch.int64)


FAMILIES: Dict[str, type] = {}  # name -> Family subclass, filled as the classes are defined


def register_family(name: str, cls) -> None:
    """Add a family class (constructed as ``cls(data_shape=..., num_classes=..., **options)``);
    a ``Family`` subclass that declares ``name`` is registered by this when it is defined."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Family)):
        raise TypeError(f"cls must be a Family subclass, got {cls!r}")
    taken = FAMILIES.get(name)
    if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"family name {name!r} is already taken by {taken.__module__}.{taken.__qualname__}")
    FAMILIES[name] = cls


class Family:
    """Base class: trainable ``modules`` plus ``loss``/``sample``/``log_likelihood``.

    Subclasses set ``name`` and build ``self.modules`` (an ``nn.ModuleDict``); the default
    ``parameters``, ``state_dict`` and ``load_state_dict`` cover every module in it. Declaring
    ``name`` in a subclass's body registers it in ``FAMILIES`` (``make_family(name, ...)``,
    ``genflow train --family name``), as declaring a solver's ``name`` registers the solver.
    """

    name: str = "family"
    phases: tuple = ("main",)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            register_family(cls.name, cls)

    def __init__(self, modules: Dict[str, nn.Module], data_shape, num_classes: Optional[int] = None):
        self.modules = nn.ModuleDict(modules)
        self.data_shape = tuple(int(s) for s in data_shape)
        self.num_classes = num_classes

    def __repr__(self) -> str:
        return f"{type(self).__name__}(data_shape={self.data_shape}, num_classes={self.num_classes})"

    @property
    def device(self) -> torch.device:
        """The device of the first parameter (CPU when there is none)."""
        return next(self.modules.parameters(), torch.empty(0)).device

    def parameters(self, phase: str) -> list:
        """The parameters the optimiser of ``phase`` updates (all of them, by default)."""
        check_choice("phase", phase, self.phases)
        return list(self.modules.parameters())

    def state_dict(self) -> dict:
        """The modules' state dict."""
        return self.modules.state_dict()

    def load_state_dict(self, sd: dict):
        """Load the modules' state dict."""
        return self.modules.load_state_dict(sd)

    def log_likelihood(self, x: torch.Tensor):
        """Nats per sample, or None for a family without a likelihood."""
        return None

    def _check(self, phase: str, batch: torch.Tensor, seeds: torch.Tensor, data_shapes=None):
        check_choice("phase", phase, self.phases)
        shapes = data_shapes or (self.data_shape,)
        if not isinstance(batch, torch.Tensor) or tuple(batch.shape[1:]) not in shapes:
            got = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise ValueError(f"batch must have shape [B, *{shapes[0]}], got {got}")
        if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or seeds.shape != batch.shape[:1]:
            got = f"{seeds.dtype} {tuple(seeds.shape)}" if isinstance(seeds, torch.Tensor) else type(seeds).__name__
            raise ValueError(f"seeds must be an int64 Tensor[{batch.shape[0]}] (one per sample), got {got}")
        return seeds.to(batch.device)

    def _drop_labels(self, labels, seeds, p: float):
        """Labels with each replaced by -1 ("no label") with probability p (its seed's draw)."""
        if labels is None:
            return {}
        labels = labels.to(seeds.device)
        if p > 0:
            keep = obj.draw_uniform(seeds, _DROPOUT, device=seeds.device) >= p
            labels = torch.where(keep, labels, torch.full_like(labels, -1))
        return {"labels": labels}


class _ODEFamily(Family):
    """Shared sampling and likelihood for families whose ``model()`` is a ``genflow.Model``."""

    solver: str
    steps: int
    schedule = "logsnr"

    def sample(self, n: int, *, generator=None, labels=None, guidance_scale: float = 1.0, solver: Optional[str] = None,
               steps: Optional[int] = None, **kwargs) -> torch.Tensor:
        """``n`` samples with ``genflow.sample`` (the family's solver and steps unless given).

        With ``labels`` (an int or Tensor[n]) and ``guidance_scale != 1``, classifier-free
        guidance ``uncond + scale (cond - uncond)`` (``genflow.guided``; label -1 is "no label").
        Other keyword arguments go to ``genflow.sample``.
        """
        check_int("n", n, low=1)
        labels = _labels_or_none(labels, n, self.device)
        model = self.model()
        if labels is not None:
            uncond = torch.full_like(labels, -1)
            model = guided(model, cond={"labels": labels}, uncond={"labels": uncond}, scale=float(guidance_scale))
        kwargs.setdefault("schedule", self.schedule)
        with torch.no_grad():
            return _sample(model, (n,) + self.data_shape, solver=solver or self.solver, steps=steps or self.steps,
                           generator=generator, device=self.device, **kwargs)

    def log_likelihood(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """``genflow.log_likelihood`` of the model at its ``t_min`` (nats per sample, float64 [B])."""
        kwargs.setdefault("generator", 0)
        return _log_likelihood(self.model(), x.to(self.device), **kwargs)


class DiffusionFamily(_ODEFamily):
    """Diffusion model trained by denoising score matching (``objectives.dsm_loss``).

    Per sample: ``eps ~ N(0, I)``, ``t`` uniform on ``[t_min, T]`` (or importance-sampled, or
    log-normal EDM noise levels for the EDM process), ``x_t = alpha x0 + sigma eps`` and the
    weighted squared error of the network's prediction. With ``preconditioning="edm"`` (the
    default for the EDM process) the network is wrapped in ``objectives.EDMPrecond`` and the
    model predicts x0 (Karras et al. 2022). Classes: ``label_dropout`` replaces labels with
    -1 during training (Ho & Salimans 2022), ``sample(guidance_scale=...)`` guides.

    Options:
        process: a name from ``PROCESSES`` or a genflow process (``process_options`` for the name).
        prediction: ``eps`` | ``x0`` | ``v`` (``x0`` under EDM preconditioning).
        weighting: ``uniform`` | ``snr`` | ``min_snr`` | ``likelihood`` | ``edm`` (``objectives.dsm_weight``;
            default ``edm`` under EDM preconditioning, else ``uniform``). min_snr_gamma (5).
        importance_sampling (bool): sample ``t`` with density ∝ the weighting's eps-space weight
            (``g^2/sigma^2`` for ``likelihood``, Song et al. 2021) and reweight (unbiased).
        preconditioning: ``"auto"`` (EDM for the EDM process) | ``"edm"`` | None.
        sigma_data (0.5), P_mean (-1.2), P_std (1.2): EDM's constants (Karras et al. 2022, Table 1).
        t_min: smallest training time (default the process's ``t_min``).
        label_dropout: probability of dropping a label (default 0.1 with classes).
        solver, steps: sampling defaults (``dpmpp_2m``, ``heun`` for EDM; 20 steps).
        net, net_options: a network ``net(x, t, labels=None)``, or options of the default one.
    """

    name = "diffusion"

    def __init__(self, *, data_shape, num_classes=None, process="VP", process_options=None, prediction="eps",
                 weighting=None, min_snr_gamma=5.0, importance_sampling=False, preconditioning="auto",
                 sigma_data=0.5, P_mean=-1.2, P_std=1.2, t_min=None, label_dropout=None, solver=None, steps=None,
                 net=None, net_options=None):
        self.process = _make_process(process, process_options)
        edm_process = isinstance(self.process, processes.EDM)
        preconditioning = check_choice("preconditioning", preconditioning, ("auto", "edm", None))
        use_edm = preconditioning == "edm" or (preconditioning == "auto" and edm_process)
        self.preconditioning = "edm" if use_edm else None
        self.prediction = check_choice("prediction", prediction, ("eps", "x0", "v"))
        if self.preconditioning == "edm":
            self.prediction = "x0"
        self.weighting = check_choice("weighting", weighting or ("edm" if self.preconditioning else "uniform"),
                                 obj.WEIGHTINGS)
        self.gamma = check_real("min_snr_gamma", min_snr_gamma, low=0.0, low_open=True)
        self.sigma_data = check_real("sigma_data", sigma_data, low=0.0, low_open=True)
        self.P_mean, self.P_std = check_real("P_mean", P_mean), check_real("P_std", P_std, low=0.0, low_open=True)
        self.lognormal = edm_process and self.preconditioning == "edm" and not importance_sampling
        self.t_lo = self.process.t_min if t_min is None else check_real("t_min", t_min, low=0.0)
        if not self.t_lo < self.process.T:
            raise ValueError(f"t_min must be < the process's T = {self.process.T}, got {self.t_lo}")
        self.importance = None
        if importance_sampling:
            def density(t):
                return obj.dsm_weight(self.process, t, "eps", self.weighting, gamma=self.gamma,
                                      sigma_data=self.sigma_data)
            self.importance = obj.ImportanceSampler(density, self.t_lo, self.process.T)
        self.label_dropout = check_real("label_dropout", 0.1 if label_dropout is None and num_classes else
                                        (label_dropout or 0.0), low=0.0)
        self.solver = solver or ("heun" if edm_process else "dpmpp_2m")
        self.steps = check_int("steps", steps or 20, low=1)
        self.schedule = "karras" if edm_process else "logsnr"
        net = net if net is not None else _default_net(data_shape, num_classes, net_options)
        super().__init__({"net": net}, data_shape, num_classes)

    def model(self, **cond) -> Model:
        net = self.modules["net"]
        if self.preconditioning == "edm":
            net = obj.EDMPrecond(net, self.process, self.sigma_data)
        return Model(net, self.process, self.prediction, **cond)

    def times(self, seeds: torch.Tensor):
        """Per-sample training times (float64 [B]) and importance factors (or None)."""
        u = obj.draw_uniform(seeds, _TIME, device=seeds.device)
        if self.lognormal:
            return obj.edm_sigmas(u, P_mean=self.P_mean, P_std=self.P_std), None
        if self.importance is not None:
            return self.importance(u)
        return obj.uniform_times(u, self.t_lo, self.process.T), None

    def loss(self, phase: str, batch: torch.Tensor, *, labels=None, seeds: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of ``objectives.dsm_loss`` (times importance factors)."""
        seeds = self._check(phase, batch, seeds)
        eps = obj.draw_normal(batch.shape, seeds, _NOISE, dtype=batch.dtype, device=batch.device)
        t, factor = self.times(seeds)
        cond = self._drop_labels(labels, seeds, self.label_dropout)
        per = obj.dsm_loss(self.model(), batch, t, eps, weighting=self.weighting, gamma=self.gamma,
                           sigma_data=self.sigma_data, **cond)
        if factor is not None:
            per = per * factor.to(per.dtype)
        return per.mean()


class FlowMatchingFamily(_ODEFamily):
    """Conditional flow matching (``objectives.cfm_loss``) with a minibatch coupling.

    The network predicts the velocity of ``genflow.LinearPath(sigma_min)``: data at ``t = 0``,
    noise at ``t = 1``, ``x_t = (1 - t) x0 + (sigma_min + (1 - sigma_min) t) eps``, target
    ``(1 - sigma_min) eps - x0``, ``t`` uniform on [0, 1] (Bogensperger, "Introduction to Generative Modeling" §7; Lipman et al. 2023).

    Options:
        coupling: ``independent`` | ``ot`` (exact minibatch OT, ``linear_sum_assignment``) |
            ``sinkhorn`` (entropic OT on the kernel engine; Tong et al. 2024). Under
            ``torch.distributed`` the OT couplings pair the GLOBAL batch.
        sigma_min (0.0). sinkhorn_eps (0.05): the entropic regularisation relative to the
            batch's mean squared distance. sinkhorn_iters (1000).
        label_dropout, solver (``heun``), steps (20), net, net_options: as for diffusion.
    """

    name = "flow-matching"
    schedule = "uniform"

    def __init__(self, *, data_shape, num_classes=None, coupling="independent", sigma_min=0.0, sinkhorn_eps=0.05,
                 sinkhorn_iters=1000, label_dropout=None, solver="heun", steps=20, net=None, net_options=None):
        self.coupling = check_choice("coupling", coupling, ("independent", "ot", "sinkhorn"))
        self.sigma_min = check_real("sigma_min", sigma_min, low=0.0)
        self.process = processes.LinearPath(sigma_min=self.sigma_min)
        self.sinkhorn_eps = check_real("sinkhorn_eps", sinkhorn_eps, low=0.0, low_open=True)
        self.sinkhorn_iters = check_int("sinkhorn_iters", sinkhorn_iters, low=1)
        self.label_dropout = check_real("label_dropout", 0.1 if label_dropout is None and num_classes else
                                        (label_dropout or 0.0), low=0.0)
        self.solver, self.steps = solver, check_int("steps", steps, low=1)
        net = net if net is not None else _default_net(data_shape, num_classes, net_options)
        super().__init__({"net": net}, data_shape, num_classes)

    def model(self, **cond) -> Model:
        return Model(self.modules["net"], self.process, "velocity", **cond)

    def _couple(self, x, y, u):
        if self.coupling == "ot":
            return obj.exact_ot_coupling(x, y)
        xf, yf = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
        mean_cost = xf.square().sum(1).mean() + yf.square().sum(1).mean() - 2 * xf.mean(0).dot(yf.mean(0))
        eps = self.sinkhorn_eps * float(mean_cost)
        return obj.sinkhorn_coupling(x, y, u, eps=eps, iters=self.sinkhorn_iters)

    def pair(self, batch: torch.Tensor, seeds: torch.Tensor):
        """``(x0, noise)`` for a data batch: per-sample noise, coupled as configured."""
        noise = obj.draw_normal(batch.shape, seeds, _NOISE, dtype=batch.dtype, device=batch.device)
        if self.coupling != "independent":
            u = obj.draw_uniform(seeds, _COUPLING, device=batch.device)
            noise = obj.gather_coupled(batch, noise, u, self._couple)
        return batch, noise

    def loss(self, phase: str, batch: torch.Tensor, *, labels=None, seeds: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of ``objectives.cfm_loss``."""
        seeds = self._check(phase, batch, seeds, self._shapes())
        x0, noise = self.pair(batch, seeds)
        t = obj.draw_uniform(seeds, _TIME, device=batch.device)
        cond = self._drop_labels(labels, seeds, self.label_dropout)
        return obj.cfm_loss(self.modules["net"], x0, noise, t, sigma_min=self.sigma_min, **cond).mean()

    def _shapes(self):
        return (self.data_shape,)


class RectifiedFlowFamily(FlowMatchingFamily):
    """Rectified flow (the lecture slides "Generative Modeling"; Liu et al. 2023, "Flow Straight and Fast").

    1-rectified flow is flow matching with the independent coupling and ``sigma_min = 0``.
    Reflow: ``reflow_pairs(family, n)`` integrates the trained flow from noise ``z`` to
    ``x = ODE(z)`` and returns the pairs as Tensor[n, 2, *D] (``[:, 0] = x``, ``[:, 1] = z``);
    a batch of that shape trains on the given pairs instead of fresh noise (the (k+1)-rectified
    flow, Liu et al. 2023, Algorithm 1). Options: solver (``euler``), steps (20), label_dropout,
    net, net_options.
    """

    name = "rectified-flow"

    def __init__(self, *, data_shape, num_classes=None, label_dropout=None, solver="euler", steps=20, net=None,
                 net_options=None):
        super().__init__(data_shape=data_shape, num_classes=num_classes, coupling="independent", sigma_min=0.0,
                         label_dropout=label_dropout, solver=solver, steps=steps, net=net, net_options=net_options)

    def _shapes(self):
        return (self.data_shape, (2,) + self.data_shape)

    def pair(self, batch: torch.Tensor, seeds: torch.Tensor):
        """Fresh independent noise for data, or the given ``(x, z)`` of reflow pairs."""
        if tuple(batch.shape[1:]) == (2,) + self.data_shape:
            return batch[:, 0], batch[:, 1]
        return super().pair(batch, seeds)


def reflow_pairs(family: FlowMatchingFamily, n: int, *, steps: int = 20, solver: str = "euler", generator=None,
                 batch_size: int = 4096) -> torch.Tensor:
    """Reflow training pairs: ``z ~ N(0, I)`` and ``x = ODE_family(z)``, as Tensor[n, 2, *D].

    ``x`` is ``genflow.sample`` of the family's velocity model started at ``x_T = z`` with a
    deterministic ``solver`` (Liu et al. 2023, Algorithm 1, "Reflow"; the lecture slides "Generative Modeling"). ``[:, 0]`` holds
    ``x`` and ``[:, 1]`` holds ``z``. ``generator``: an int seed, None or a torch.Generator.
    """
    if not isinstance(family, FlowMatchingFamily):
        raise TypeError(f"family must be a flow-matching or rectified-flow family, got {type(family).__name__}")
    n, steps = check_int("n", n, low=1), check_int("steps", steps, low=1)
    batch_size = check_int("batch_size", batch_size, low=1)
    info = {s.name: s for s in _solvers()}
    check_choice("solver", solver, tuple(info))
    if info[solver].stochastic:
        raise ValueError(f"solver must be deterministic (an ODE solver) for reflow, got stochastic {solver!r}")
    seed = generator_seed(generator, n)
    z = randn((n,) + family.data_shape, seed=seed, device=family.device)
    model = family.model()
    with torch.no_grad():
        x = torch.cat([_sample(model, x_T=z[i:i + batch_size], solver=solver, steps=steps, schedule="uniform")
                       for i in range(0, n, batch_size)])
    return torch.stack([x, z], dim=1)


class CNFFamily(_ODEFamily):
    """Continuous normalizing flow trained by maximum likelihood (FFJORD) via ``genflow.cnf``.

    Loss: ``-mean_b log p(x_b)`` from ``genflow.cnf_log_likelihood`` (instantaneous change of
    variables with a Hutchinson divergence whose probes come from each sample's seed; Chen et al.
    2018; Grathwohl et al. 2019). The velocity network (default ``genflow.CNFNet``) is sampled
    and evaluated as ``genflow.Model(net, LinearPath(), "velocity")``.

    Options: hidden (64), depth (3), solve_steps (8), probes (1), noise (``rademacher``),
    method (``hutchinson`` | ``exact``), cnf_solver (``rk4``), solver/steps for sampling
    (``rk4``/8), net.
    """

    name = "cnf"
    schedule = "uniform"

    def __init__(self, *, data_shape, num_classes=None, hidden=64, depth=3, solve_steps=8, probes=1,
                 noise="rademacher", method="hutchinson", cnf_solver="rk4", solver="rk4", steps=8, net=None):
        if num_classes is not None:
            raise ValueError(f"the cnf family is unconditional: num_classes must be None, got {num_classes!r}")
        if net is None:
            if len(data_shape) != 1:
                raise ValueError(f"the default CNFNet needs vector data_shape (D,), got {tuple(data_shape)}; pass net=")
            net = cnf.CNFNet(data_shape[0], hidden=hidden, depth=depth)
        self.options = dict(steps=check_int("solve_steps", solve_steps, low=1),
                            probes=check_int("probes", probes, low=1), noise=noise, method=method, solver=cnf_solver)
        self.process = processes.LinearPath()
        self.solver, self.steps = solver, check_int("steps", steps, low=1)
        super().__init__({"net": net}, data_shape, None)

    def model(self, **cond) -> Model:
        return Model(self.modules["net"], self.process, "velocity", **cond)

    def loss(self, phase: str, batch: torch.Tensor, *, labels=None, seeds: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood (nats per sample) of the batch."""
        seeds = self._check(phase, batch, seeds)
        if labels is not None:
            raise ValueError("the cnf family is unconditional: labels must be None")
        return -cnf.cnf_log_likelihood(self.modules["net"], batch, generator=seeds, **self.options).mean()


class SlicedScoreFamily(_ODEFamily):
    """Score model trained by sliced score matching (``objectives.sliced_score_loss``).

    Noise-conditional (default): ``x_t = x0 + sigma(t) eps`` under ``genflow.VE(sigma_min,
    sigma_max)``, ``t`` uniform on [0, 1], the score ``s = -net(x_t, t)/sigma`` and the loss
    ``sigma^2 SSM(s; x_t)`` (the ``lambda(sigma) = sigma^2`` weighting of Song & Ermon 2019);
    sampled with annealed Langevin dynamics (``ald``) or a probability-flow ODE solver.
    Single noise level (``sigma=`` a float): ``x = x0 + sigma eps``, the network at ``t = 1``
    and Langevin dynamics at that level for sampling (Lim, "An Introduction to Generative Modeling with Flows and Diffusion Models" §5.2.3; Song et al. 2020).

    Options: sigma_min (0.01), sigma_max (10.0), sigma (None), projections (1), projection
    (``rademacher`` | ``gaussian``), variance_reduction (True), solver (``ald``), steps (50),
    langevin_step (0.2: the step ``eta = langevin_step sigma^2`` at a single level), net, net_options.
    """

    name = "sliced-score"

    def __init__(self, *, data_shape, num_classes=None, sigma_min=0.01, sigma_max=10.0, sigma=None, projections=1,
                 projection="rademacher", variance_reduction=True, solver="ald", steps=50, langevin_step=0.2,
                 net=None, net_options=None):
        self.process = processes.VE(sigma_min=sigma_min, sigma_max=sigma_max)
        self.single = None if sigma is None else check_real("sigma", sigma, low=0.0, low_open=True)
        self.projections = check_int("projections", projections, low=1)
        self.projection = check_choice("projection", projection, ("rademacher", "gaussian"))
        self.variance_reduction = bool(variance_reduction)
        self.solver, self.steps = solver, check_int("steps", steps, low=1)
        self.langevin_step = check_real("langevin_step", langevin_step, low=0.0, low_open=True)
        net = net if net is not None else _default_net(data_shape, num_classes, net_options)
        super().__init__({"net": net}, data_shape, num_classes)

    def model(self, **cond) -> Model:
        return Model(self.modules["net"], self.process, "eps", **cond)

    def loss(self, phase: str, batch: torch.Tensor, *, labels=None, seeds: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of ``sigma^2`` times the sliced score matching loss at ``x_t``."""
        seeds = self._check(phase, batch, seeds)
        eps = obj.draw_normal(batch.shape, seeds, _NOISE, dtype=batch.dtype, device=batch.device)
        if self.single is None:
            t = obj.uniform_times(obj.draw_uniform(seeds, _TIME, device=batch.device), 0.0, self.process.T)
            sigma = self.process.sigma(t)
        else:
            t = torch.ones(batch.shape[0], dtype=torch.float64, device=batch.device)
            sigma = torch.full_like(t, self.single)
        x_t = batch + obj.per_sample_coefficient(sigma, batch) * eps
        v = torch.stack([obj.draw_normal(batch.shape, seeds, _PROBES + k, dtype=batch.dtype, device=batch.device)
                         for k in range(self.projections)])
        if self.projection == "rademacher":
            v = torch.where(v >= 0, 1.0, -1.0).to(batch.dtype)
        cond = self._drop_labels(labels, seeds, 0.0)
        net_t = t.to(batch.dtype)

        def score(x):
            return -self.modules["net"](x, net_t, **cond) / obj.per_sample_coefficient(sigma, x)

        per = obj.sliced_score_loss(score, x_t, v, variance_reduction=self.variance_reduction)
        return (sigma.to(per.dtype) ** 2 * per).mean()

    def log_likelihood(self, x: torch.Tensor, **kwargs):
        """``genflow.log_likelihood`` of the noise-conditional model (None for a single level: no flow)."""
        return None if self.single is not None else super().log_likelihood(x, **kwargs)

    def sample(self, n: int, *, generator=None, labels=None, guidance_scale: float = 1.0, solver=None, steps=None,
               **kwargs) -> torch.Tensor:
        """Annealed Langevin / PF-ODE sampling (noise-conditional), or Langevin at the single level.

        Single level: ``x <- x + (eta/2) s(x) + sqrt(eta) z`` for ``steps`` steps with
        ``eta = langevin_step sigma^2``, from ``x ~ N(0, I)`` (Song & Ermon 2019, eq. 4): the
        unadjusted Langevin algorithm, i.e. Euler–Maruyama on ``dx = s(x)/2 dt + dW`` with step
        ``eta`` (``gf.solve``, per-sample Philox noise).
        """
        if self.single is None:
            return super().sample(n, generator=generator, labels=labels, guidance_scale=guidance_scale,
                                  solver=solver, steps=steps, **kwargs)
        check_int("n", n, low=1)
        cond = {} if labels is None else {"labels": _labels_or_none(labels, n, self.device)}
        seed = generator_seed(generator, n)
        shape = (n,) + self.data_shape
        eta = self.langevin_step * self.single ** 2
        steps = steps or self.steps
        x = randn(shape, seed=seed, offset=0, device=self.device)
        level, one = torch.ones(n, device=self.device), torch.ones((), device=self.device)

        def half_score(t, x):  # the net predicts -sigma * score at the single level sigma
            return self.modules["net"](x, level, **cond) * (-0.5 / self.single)

        with torch.no_grad():
            return solve(SDE(half_score, lambda t, x: one, noise="additive"), x, 0.0, eta * steps,
                         solver="euler_maruyama", steps=steps, generator=seed)




def make_family(name: str, *, data_shape, num_classes: Optional[int] = None, **options) -> Family:
    """Build the family ``name`` (see ``FAMILIES``) for samples of shape ``data_shape``.

    Names are case-insensitive, ``_`` and ``-`` alike; unknown names and unknown options raise
    ``ValueError`` with the closest valid one.
    """
    key = str(name).lower().replace("_", "-")
    check_choice("family name", key, tuple(FAMILIES))
    cls = FAMILIES[key]
    if not isinstance(data_shape, (tuple, list, torch.Size)):
        data_shape = (data_shape,)  # one number: vector data
    if not data_shape:
        raise ValueError(f"data_shape must be a non-empty sequence of positive ints, got {data_shape!r}")
    data_shape = tuple(check_int(f"data_shape[{i}]", s, low=1) for i, s in enumerate(data_shape))
    if num_classes is not None:
        num_classes = check_int("num_classes", num_classes, low=1)
    accepted = [p for p in inspect.signature(cls.__init__).parameters
                if p not in ("self", "data_shape", "num_classes")]
    for option in options:
        if option not in accepted:
            hint = did_you_mean(option, accepted)
            raise ValueError(f"unknown option {option!r} for family {key!r}{hint}; accepted: {accepted}")
    return cls(data_shape=data_shape, num_classes=num_classes, **options)
