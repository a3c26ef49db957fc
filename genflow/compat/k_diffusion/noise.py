"""k-diffusion's Brownian-tree noise sampler, the default noise of its SDE samplers."""
import warnings

import torch

from genflow import peers
from genflow.compat.k_diffusion.glue import check_x
from genflow.noise import BrownianTreeNoise

__all__ = ["BrownianTreeNoiseSampler", "sde_noise_sampler"]


class BrownianTreeNoiseSampler:
    """Noise from one Brownian path ``W(t)``: ``(W(t') - W(t)) / sqrt|t' - t|`` with
    ``t = transform(sigma)``, so the noise of every step is an increment of the same path.

    Matches k-diffusion's ``BrownianTreeNoiseSampler`` (same arguments and seeding: ``seed=None``
    draws ``torch.randint(0, 2**63 - 1, [])`` from the global RNG; a list of B seeds gives one
    path per sample). With torchsde installed each path is a torchsde ``BrownianInterval``
    built as ``torchsde.BrownianTree`` builds it (``tol=1e-6``, ``pool_size=24``, halfway tree),
    which reproduces k-diffusion's numbers; without torchsde it is genflow's Philox Brownian
    tree (``genflow.noise.BrownianTreeNoise``), a Brownian path with other numbers. Queries
    outside ``[sigma_min, sigma_max]`` (e.g. ``exp(log sigma)`` rounded) are clamped to it,
    silently (torchsde clamps with a warning).

    Args:
        x (Tensor[B, *D]): shape, dtype and device of the noise.
        sigma_min, sigma_max (float or 0-dim Tensor): the interval of the path.
        seed (int or list of B ints, optional): the path's entropy.
        transform (callable, optional): maps sigma (a 0-dim tensor) to the path's time
            (default: the identity).
    """

    def __init__(self, x, sigma_min, sigma_max, seed=None, transform=None):
        check_x(x)
        self.transform = (lambda v: v) if transform is None else transform
        a = self.transform(torch.as_tensor(sigma_min))
        b = self.transform(torch.as_tensor(sigma_max))
        self.sign = 1 if a < b else -1
        self.lo, self.hi = (float(a), float(b)) if a < b else (float(b), float(a))
        if seed is None:
            seed = torch.randint(0, 2 ** 63 - 1, []).item()
        self.batched = isinstance(seed, (list, tuple)) or (isinstance(seed, torch.Tensor) and seed.dim() == 1)
        if self.batched and len(seed) != x.shape[0]:
            raise ValueError(f"seed must be an int or a list of B = {x.shape[0]} ints, got {len(seed)} seeds")
        torchsde = peers.optional("torchsde")
        if torchsde is not None:
            shape = x.shape[1:] if self.batched else x.shape
            seeds = [int(s) for s in seed] if self.batched else [int(seed)]
            self.paths = [torchsde.BrownianInterval(t0=self.lo, t1=self.hi, size=shape, dtype=x.dtype, device=x.device,
                                                    entropy=s, tol=1e-6, pool_size=24, halfway_tree=True)
                          for s in seeds]
            self.tree = None
        else:
            tree_seed = torch.as_tensor([int(s) for s in seed], dtype=torch.int64) if self.batched else int(seed)
            self.tree = BrownianTreeNoise(tree_seed, self.hi, sigma_min=self.lo)
            self.like = x

    def __call__(self, sigma, sigma_next):
        t0 = self.transform(torch.as_tensor(sigma))
        t1 = self.transform(torch.as_tensor(sigma_next))
        if self.tree is not None:
            a, b = (min(max(float(t), self.lo), self.hi) for t in (t0, t1))
            return self.tree.draw(self.like, a, b)["noise"] * self.sign
        lo, hi, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        with warnings.catch_warnings():  # torchsde warns when it clamps a query rounded just outside
            warnings.filterwarnings("ignore", message="Should have", category=UserWarning)
            w = torch.stack([path(lo, hi) for path in self.paths]) * (self.sign * sign)
        return (w if self.batched else w[0]) / (t1 - t0).abs().sqrt()



def sde_noise_sampler(x, host):
    """k-diffusion's default for the SDE samplers: a Brownian tree over the positive sigmas
    (``host``, the sigmas on the CPU)."""
    return BrownianTreeNoiseSampler(x, host[host > 0].min(), host.max())
