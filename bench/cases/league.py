"""``league``: every registered ``gf.sample`` solver x schedule, quality versus NFE on the exact
8-Gaussian ring under EDM and VP: which sampler to use at N model evaluations.

Quality is ``KL(q || p)`` in nats from 2,000 samples to the exact ring density
(``genflow.metrics.kl_to_density``: Kozachenko-Leonenko entropy plus the exact cross-entropy),
with the ring's exact denoiser (``GaussianMixture.model``) as the model, so the only error is the
sampler's. Every solve uses the same seed. A solver runs at a target NFE with the most steps whose
counted NFE is at most the target (Heun-type solvers take 2 evaluations a step, PNDM a warm-up,
...; a solver whose single step costs more has no entry there); the table shows the NFE actually
counted wherever it differs from the target. The noise floor is the same estimator on
fresh samples of the ring itself (the value a perfect sampler scores).

``genflow bench --only league`` runs the full league (about 3 minutes on one core) and writes
``bench/LEAGUE.md`` and ``bench/league.png``; ``--quick`` runs a smaller league (500 samples,
NFE 5/10/20) and ``--tiny`` a smoke run, neither writing files. The league has no timing rows.
"""
from __future__ import annotations

import datetime
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

import genflow as gf
from genflow.bench import Case, Context, Counted, group, machine_info
from genflow.metrics import kl_to_density

OUT_DIR = Path(__file__).resolve().parents[1]
PROCESSES = {"EDM": gf.EDM, "VP": gf.VP}
DEFAULT_SCHEDULE = "logsnr"   # gf.sample's default
DIVERGED = math.inf


@dataclass
class LeagueConfig:
    """What the league runs: target NFEs, samples per solve, processes, schedules, seed, solvers
    (None: every registered fixed-grid solver)."""

    nfes: Sequence[int] = (5, 8, 10, 15, 20, 30)
    samples: int = 2000
    processes: Sequence[str] = ("EDM", "VP")
    schedules: Sequence[str] = ("logsnr", "karras")
    seed: int = 0
    solvers: Optional[Sequence[str]] = None
    floor_seeds: int = 5

    def __post_init__(self):
        if not self.nfes or any(int(n) < 1 for n in self.nfes):
            raise ValueError(f"nfes must be a non-empty list of integers >= 1, got {self.nfes}")
        if self.samples < 10:
            raise ValueError(f"samples must be >= 10, got {self.samples}")
        unknown = [p for p in self.processes if p not in PROCESSES]
        if unknown:
            raise ValueError(f"processes must be among {list(PROCESSES)}, got {unknown}")


@dataclass
class Entry:
    """One solve: ``kl`` (nats; inf when the solve diverged) at ``nfe`` counted evaluations."""

    process: str
    solver: str
    schedule: str
    target: int
    steps: int
    nfe: int
    kl: float


@dataclass
class League:
    config: LeagueConfig
    entries: List[Entry]
    floor: Dict[str, Tuple[float, float]]          # process -> (mean, std) KL of true samples
    skipped: Dict[str, str] = field(default_factory=dict)  # solver -> why
    seconds: float = 0.0


def _model(mixture, process):
    """The exact denoiser as a ``gf.Model`` whose network counts its calls."""
    net = Counted(lambda x, t: mixture.posterior_mean(x, t, process))
    return gf.Model(net, process, prediction="x0"), net


def nfe_by_steps(mixture, solver: str, most: int) -> Dict[int, int]:
    """``{steps: counted NFE}`` for 1, 2, ... steps until the NFE passes ``most`` (2 samples,
    EDM, ``logsnr``; a solver's NFE depends on its step count only)."""
    counts, steps = {}, 1
    while not counts or max(counts.values()) <= most:
        model, net = _model(mixture, gf.EDM())
        gf.sample(model, (2, 2), solver=solver, steps=steps, schedule=DEFAULT_SCHEDULE, generator=0)
        counts[steps] = net.calls
        steps += 1
    return counts


def steps_for(target: int, counts: Dict[int, int]) -> Optional[int]:
    """The most steps whose NFE (``counts``: steps -> NFE) is at most ``target``; None when even one
    step costs more."""
    fit = [s for s, n in counts.items() if n <= target]
    return max(fit) if fit else None


def _solve(mixture, process, solver, schedule, steps, config) -> Tuple[int, float]:
    model, net = _model(mixture, process)
    try:
        x = gf.sample(model, (config.samples, 2), solver=solver, steps=steps, schedule=schedule,
                      generator=config.seed)
    except gf.NonFiniteError:
        return net.calls, DIVERGED
    return net.calls, kl_to_density(x.double(), mixture.log_prob)


def noise_floor(mixture, samples: int, seeds: int) -> Tuple[float, float]:
    """Mean and standard deviation of the KL estimate on ``seeds`` fresh true sample sets."""
    values = torch.tensor([kl_to_density(mixture.sample(samples, generator=torch.Generator().manual_seed(1000 + s)),
                                         mixture.log_prob) for s in range(seeds)], dtype=torch.float64)
    return float(values.mean()), float(values.std()) if seeds > 1 else 0.0


def league_solvers(config: LeagueConfig) -> Tuple[List[str], Dict[str, str]]:
    """The solvers to run and those skipped, with why (adaptive ones pick their own NFE)."""
    infos = {info.name: info for info in gf.solvers.available()}
    names = list(infos) if config.solvers is None else list(config.solvers)
    unknown = [n for n in names if n not in infos]
    if unknown:
        raise ValueError(f"solvers must be registered gf.sample names, got {unknown}")
    skipped = {n: "adaptive step size: it sets its own NFE from rtol/atol, no fixed-NFE column"
               for n in names if infos[n].nfe is None}
    return [n for n in names if n not in skipped], skipped


def run_league(config: LeagueConfig, log: Callable[[str], None] = print) -> League:
    """Run every solver x schedule x process x target NFE of ``config``."""
    started = time.perf_counter()
    mixture = gf.GaussianMixture.ring()
    solvers, skipped = league_solvers(config)
    entries, floor = [], {}
    counts = {solver: nfe_by_steps(mixture, solver, max(config.nfes)) for solver in solvers}
    for pname in config.processes:
        process = PROCESSES[pname]()
        floor[pname] = noise_floor(mixture, config.samples, config.floor_seeds)
        for solver in solvers:
            for schedule in config.schedules:
                for target in config.nfes:
                    steps = steps_for(target, counts[solver])
                    if steps is None:
                        continue
                    nfe, kl = _solve(mixture, process, solver, schedule, steps, config)
                    entries.append(Entry(pname, solver, schedule, int(target), steps, nfe, kl))
            row = [e for e in entries if e.process == pname and e.solver == solver]
            log(f"{pname:<4}{solver:<22}" + " ".join(f"{e.kl:8.3f}" for e in row))
    return League(config, entries, floor, skipped, time.perf_counter() - started)


# ---------------------------------------------------------------- reporting

def _cell(entry: Entry, best: bool) -> str:
    text = "diverged" if not math.isfinite(entry.kl) else f"{entry.kl:.3g}"
    if entry.nfe != entry.target:
        text += f" ({entry.nfe})"
    return f"**{text}**" if best else text


def league_table(league: League, process: str) -> str:
    """Markdown table for ``process``: rows solver / schedule, columns target NFE, KL in nats,
    the best of each column in bold, the counted NFE in parentheses where it differs."""
    config = league.config
    rows: Dict[Tuple[str, str], Dict[int, Entry]] = {}
    for e in league.entries:
        if e.process == process:
            rows.setdefault((e.solver, e.schedule), {})[e.target] = e
    best = {t: min((r[t].kl for r in rows.values() if t in r), default=math.inf) for t in config.nfes}
    head = "| solver | schedule | " + " | ".join(f"NFE {t}" for t in config.nfes) + " |"
    lines = [head, "|" + "---|" * (2 + len(config.nfes))]
    for (solver, schedule), cells in rows.items():
        lines.append(f"| {solver} | {schedule} | " + " | ".join(
            _cell(cells[t], cells[t].kl == best[t]) if t in cells else "-" for t in config.nfes) + " |")
    return "\n".join(lines)


def default_flags(league: League, factor: float = 2.0, margin: float = 0.1) -> List[str]:
    """Solvers whose default schedule (``logsnr``) scores worse than ``factor`` x their best
    schedule and ``margin`` nats above it at most of their NFEs, and solvers that stay ``margin``
    nats above the noise floor at every NFE with every schedule (defaults that do not converge)."""
    flags = []
    by_key: Dict[Tuple[str, str], Dict[Tuple[str, int], float]] = {}
    for e in league.entries:
        by_key.setdefault((e.process, e.solver), {})[(e.schedule, e.target)] = e.kl
    schedules = league.config.schedules
    for (process, solver), kls in by_key.items():
        targets = sorted({t for _, t in kls})
        best_at = {t: min(kls[(s, t)] for s in schedules if (s, t) in kls) for t in targets}
        if DEFAULT_SCHEDULE in schedules:
            worse = [t for t in targets if (DEFAULT_SCHEDULE, t) in kls
                     and kls[(DEFAULT_SCHEDULE, t)] > max(factor * best_at[t], best_at[t] + margin)]
            if len(worse) > len(targets) / 2:
                alt = min(schedules, key=lambda s: sum(min(kls.get((s, t), 1e3), 1e3) for t in targets))
                flags.append(f"{process} `{solver}`: the default schedule `{DEFAULT_SCHEDULE}` is > {factor:g}x "
                             f"worse than `{alt}` at NFE {', '.join(map(str, worse))}")
        best = min(kls.values())
        if best > league.floor[process][0] + margin:
            flags.append(f"{process} `{solver}`: never within {margin} nats of the noise floor "
                         f"at any NFE <= {max(targets)} with any schedule (best {best:.3g} nats): "
                         f"slow to converge with its defaults")
    return flags


def winners(league: League, process: str) -> List[str]:
    """``NFE t: solver/schedule (kl)`` for each target NFE."""
    out = []
    for t in league.config.nfes:
        cands = [e for e in league.entries if e.process == process and e.target == t]
        e = min(cands, key=lambda e: e.kl)
        out.append(f"NFE {t}: `{e.solver}`/{e.schedule} ({e.kl:.3f}, {e.nfe} NFE)")
    return out


def league_markdown(league: League, command: str) -> str:
    """The whole ``bench/LEAGUE.md``: settings, machine, noise floor, winners, flags, tables."""
    c, info = league.config, machine_info("cpu")
    lines = [
        "# Sampler league: quality versus NFE",
        "",
        f"Auto-generated by `{command}` on {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} "
        f"({info['cpu_model']}, {info['torch_threads']} torch thread(s), torch {info['torch']}, genflow "
        f"{info['genflow']}; {league.seconds:.0f} s). Regenerate with the same command; do not edit by hand.",
        "",
        f"**Model**: the exact denoiser of the 8-Gaussian ring (`gf.GaussianMixture.ring()`: radius 4, std 0.5; "
        f"`prediction=\"x0\"`), under {' and '.join(f'`gf.{p}()`' for p in c.processes)}, so every error is the "
        f"sampler's. **Metric**: KL(samples || ring) in nats, `genflow.metrics.kl_to_density` (k = 3) on "
        f"{c.samples} samples, `generator={c.seed}` for every solve; every solver with its defaults "
        f"(`gf.sample(model, ({c.samples}, 2), solver=..., steps=..., schedule=...)`). "
        "**Steps**: each solver runs with the most steps whose counted NFE is at most the column's "
        "(`-`: one step costs more); the counted NFE is in parentheses where it differs. Lower is better; the best of "
        "each column is bold; `diverged`: the solve hit non-finite values.",
        "",
        "**Noise floor** (the same estimate on fresh samples of the ring itself, "
        f"{c.floor_seeds} seeds): " + "; ".join(f"{p} {m:.3f} ± {s:.3f} nats" for p, (m, s) in league.floor.items())
        + ". Differences below about twice the spread are noise.",
        "",
    ]
    if league.skipped:
        lines += ["**Not in the league**: " + "; ".join(f"`{n}` ({why})" for n, why in league.skipped.items())
                  + ". `lcm` and `tcd` are consistency-model samplers run here on an exact (non-distilled) "
                  "denoiser, so their rows are not what they give with a consistency model.", ""]
    lines += ["## Which sampler at N model evaluations", ""]
    for p in c.processes:
        lines.append(f"- **{p}**: " + "; ".join(winners(league, p)) + ".")
    lines += ["", "## Defaults far from the sampler's best (issue 17, item 6)", ""]
    lines += [f"- {f}" for f in default_flags(league)] or ["- none"]
    for p in c.processes:
        lines += ["", f"## {p}", "", league_table(league, p)]
    lines += ["", "![KL versus NFE](league.png)", ""]
    return "\n".join(lines)


def league_figure(league: League, path) -> None:
    """KL versus counted NFE (log-log), one panel per process, one line per solver at its default
    schedule, the noise floor dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = league.config
    fig, axes = plt.subplots(1, len(c.processes), figsize=(7 * len(c.processes), 7), squeeze=False)
    solvers = list(dict.fromkeys(e.solver for e in league.entries))
    colors = plt.get_cmap("tab20").colors
    styles = ("-", "--", ":", "-.")
    schedule = DEFAULT_SCHEDULE if DEFAULT_SCHEDULE in c.schedules else c.schedules[0]
    for ax, p in zip(axes[0], c.processes):
        for i, solver in enumerate(solvers):
            pts = sorted((e.nfe, e.kl) for e in league.entries
                         if e.process == p and e.solver == solver and e.schedule == schedule and math.isfinite(e.kl))
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, lw=1.2, color=colors[i % len(colors)],
                        ls=styles[(i // len(colors)) % len(styles)], label=solver)
        ax.axhline(league.floor[p][0], color="k", ls="--", lw=1, label="noise floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE (counted)")
        ax.set_ylabel("KL to the ring (nats)")
        ax.set_title(f"{p}, schedule {schedule}, {c.samples} samples")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def config_for(ctx: Context) -> LeagueConfig:
    """The league ``ctx`` asks for: tiny (tests), quick, or full."""
    if ctx.tiny:
        return LeagueConfig(nfes=(5, 10), samples=200, processes=("EDM",), solvers=("euler", "heun", "dpmpp_2m"),
                            floor_seeds=2)
    if ctx.quick:
        return LeagueConfig(nfes=(5, 10, 20), samples=500)
    return LeagueConfig()


@group("league", "sampler league: KL to the exact 8-Gaussian ring vs NFE, every solver x schedule, EDM and VP "
                 "(no timing rows; the full run writes bench/LEAGUE.md and bench/league.png)")
def _league(ctx: Context) -> Iterator[Case]:
    """Run the league for ``ctx`` (see ``config_for``); a full run writes its table and figure."""
    league = run_league(config_for(ctx), log=lambda line: print(line, flush=True))
    for p in league.config.processes:
        print("\n".join([f"\n{p}:"] + winners(league, p)))
    if not (ctx.tiny or ctx.quick):
        (OUT_DIR / "LEAGUE.md").write_text(league_markdown(league, "OMP_NUM_THREADS=1 genflow bench --only league "
                                                                   "--threads 1 --no-results"))
        league_figure(league, OUT_DIR / "league.png")
        print(f"wrote {OUT_DIR / 'LEAGUE.md'} and {OUT_DIR / 'league.png'}")
    return iter(())
