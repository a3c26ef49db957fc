"""``ops``: one fused solver step vs eager PyTorch, torch.compile and the bandwidth floor."""
import itertools
import math
import time
from typing import Iterator

import torch

from genflow.bench import Agreement, Baseline, Case, Context, agree, group


C0, C1, C2, S = 0.95, 0.03, -0.01, 0.2


def noise_law(out: torch.Tensor, det: torch.Tensor, scale: float, inputs) -> float:
    """How far ``z = (out - det) / scale`` is from i.i.d. N(0, 1) independent of ``inputs``: the
    largest of |mean|, |std - 1| and |corr(z, input)|, each in units of its standard error."""
    z = ((out.double() - det.double()) / scale).flatten().cpu()
    n = z.numel()
    se = 1.0 / math.sqrt(n)
    worst = max(abs(z.mean().item()) / se, abs(z.std().item() - 1.0) / (se * math.sqrt(0.5)))
    for v in inputs:
        v = v.double().flatten().cpu()
        corr = ((z - z.mean()) * (v - v.mean())).mean().item() / (z.std().item() * v.std().item())
        worst = max(worst, abs(corr) / se)
    return worst


def _op_sizes(ctx):
    if ctx.tiny:
        return [4096]
    if ctx.quick:
        return [100_000, 4_000_000]
    return [1_000, 100_000, 1_000_000, 12_582_912]


@group("ops", "one fused solver step vs eager PyTorch, torch.compile and the bandwidth floor")
def _ops(ctx: Context) -> Iterator[Case]:
    """Euler–Maruyama-like step ``x <- c0 x + c1 d + s z`` (reads x and the model output d, writes x,
    noise made in the kernel: 12 bytes/element in float32) and a DPM-Solver++(2M) step
    ``x <- c0 x + c1 d + c2 d_prev`` (16 bytes/element). genflow runs in place (``out=x``); eager
    and torch.compile evaluate the same expression (a fresh output; ``torch.randn_like`` for z). The
    floor is one device copy moving the same bytes (read + write), timed in the same run. On a CPU
    a copy also reads its destination (write-allocate) while the in-place step writes lines it has
    just read, so an in-place step can come out slightly under that floor (ratio a little > 1)."""
    from genflow.ops import fused_update

    for kind in ("em_step", "dpmpp_2m_step"):
        for n in _op_sizes(ctx):
            yield _op_case(ctx, kind, n, fused_update)
    for n in _op_sizes(ctx):
        yield _langevin_case(ctx, n)


def _langevin_case(ctx, n, batch=16):
    """The Langevin corrector step (Song et al. 2021, Alg. 5) on ``batch`` samples of ``n/batch``
    elements with supplied noise: per-sample ``eps_b = 2 (snr ||z_b|| / ||s_b||)^2`` and
    ``x <- x + eps s + sqrt(2 eps) z`` (s the model output). genflow: ``langevin_update`` (two
    passes); eager and torch.compile: norms then update. Floor: read x, s, z and write x
    (16 bytes/element) — the second pass over x, s, z is what the fused op pays beyond it."""
    from genflow.ops import langevin_update

    shape = (batch, max(1, n // batch))
    x, s, z = (ctx.randn(*shape, seed=10 + i) for i in range(3))
    x0 = x.clone()
    snr = 0.16

    def expr(x, s, z):
        ratio = snr * z.flatten(1).norm(dim=1) / s.flatten(1).norm(dim=1)
        eps = (2 * ratio * ratio).reshape(-1, 1)
        return x + eps * s + torch.sqrt(2 * eps) * z

    def genflow():
        return langevin_update(x, s, snr=snr, noise=z, out=x)

    ref = langevin_update(x0, s, snr=snr, noise=z)
    holder = {}

    def setup_compile():
        started = time.perf_counter()
        holder["fn"] = torch.compile(expr, dynamic=False, fullgraph=True)
        holder["fn"](x0, s, z)
        return f"compile {time.perf_counter() - started:.1f} s"

    src = torch.ones(2 * x.numel(), dtype=ctx.dtype, device=ctx.device)
    dst = torch.empty_like(src)
    bytes_moved = int(2 * src.element_size() * src.numel())
    size = f"{x.numel():.3g}".replace("e+0", "e").replace("e+", "e")
    return Case("langevin_step", f"{size} f32", genflow, [
        Baseline("eager", lambda: expr(x0, s, z), lambda: agree(ref, expr(x0, s, z), 1e-5)),
        Baseline("torch.compile", lambda: holder["fn"](x0, s, z), lambda: agree(ref, holder["fn"](x0, s, z), 1e-5),
                 setup=setup_compile) if ctx.compile else Baseline("torch.compile", None, status="skipped: --no-compile"),
        Baseline("floor (device copy)", lambda: dst.copy_(src), kind="floor", bytes=bytes_moved,
                 note=f"{bytes_moved / x.numel():.0f} B/element"),
    ])


def _op_case(ctx, kind, n, fused_update):
    x, d, dp, z = (ctx.randn(n, seed=i) for i in range(4))
    x0 = x.clone()
    offsets = itertools.count(1)
    elems = 1.5 if kind == "em_step" else 2.0  # bytes moved / (8 bytes per copied element)
    src = torch.ones(int(elems * n), dtype=ctx.dtype, device=ctx.device)
    dst = torch.empty_like(src)
    bytes_moved = int(2 * src.element_size() * src.numel())
    if kind == "em_step":
        def genflow():
            return fused_update(x, [d], [C0, C1], S, seed=1, offset=next(offsets), out=x)

        def expr(x, d):
            return C0 * x + C1 * d + S * torch.randn_like(x)

        det = C0 * x0 + C1 * d

        def check_eager():
            ours = fused_update(x0, [d], [C0, C1], S, noise=z)
            return agree(ours, C0 * x0 + C1 * d + S * z, 1e-5, how="same supplied noise z")

        def check_law(fn):
            def check():
                worst = max(noise_law(fused_update(x0, [d], [C0, C1], S, seed=7, offset=1), det, S, [x0, d]),
                            noise_law(fn(x0, d), det, S, [x0, d]))
                return Agreement(worst, 1.0, 6.0, extra={"law": True}, how="noise law: (out - c0 x - c1 d)/s is N(0,1), uncorrelated "
                                 "with x and d, for both (max |mean|, |std-1|, |corr| in standard errors, tol 6)")
            return check
    else:
        def genflow():
            return fused_update(x, [d, dp], [C0, C1, C2], out=x)

        def expr(x, d, dp):
            return C0 * x + C1 * d + C2 * dp

        ref = fused_update(x0, [d, dp], [C0, C1, C2])
        check_eager = lambda: agree(ref, expr(x0, d, dp), 1e-5)  # noqa: E731
        check_law = None

    args = (x0, d) if kind == "em_step" else (x0, d, dp)
    holder = {}

    def setup_compile():
        started = time.perf_counter()
        holder["fn"] = torch.compile(expr, dynamic=False, fullgraph=True)
        holder["fn"](*args)
        return f"compile {time.perf_counter() - started:.1f} s"

    compiled_fn = lambda: holder["fn"](*args)  # noqa: E731
    if kind == "em_step":
        check_compile = lambda: check_law(holder["fn"])()  # noqa: E731
    else:
        check_compile = lambda: agree(ref, holder["fn"](*args), 1e-5)  # noqa: E731
    size = f"{n:.3g}".replace("e+0", "e").replace("e+", "e")
    note = ""
    if ctx.device == "cuda":
        from genflow._extension import has_cuda_kernels
        if not has_cuda_kernels():
            note = "genflow CUDA kernels not built: PyTorch reference"
    copy = lambda: dst.copy_(src)  # noqa: E731
    return Case(kind, f"{size} f32", genflow, [
        Baseline("eager", lambda: expr(*args), check_eager),
        Baseline("torch.compile", compiled_fn, check_compile, setup=setup_compile) if ctx.compile else
        Baseline("torch.compile", None, status="skipped: --no-compile"),
        Baseline("floor (device copy)", copy, kind="floor", bytes=bytes_moved,
                 note=f"{bytes_moved / n:.0f} B/element"),
    ], note=note)


# ---------------------------------------------------------------- full solves: shared pieces
