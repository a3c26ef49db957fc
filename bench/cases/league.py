"""``league``: every registered ``gf.sample`` solver x schedule, quality versus NFE on the exact
8-Gaussian ring under EDM and VP: which sampler to use at N model evaluations.

Quality is ``KL(q || p)`` in nats from 2,000 samples to the exact ring density
(``genflow.metrics.kl_to_density``: Kozachenko-Leonenko entropy plus the exact cross-entropy),
with the ring's exact denoiser (``GaussianMixture.model``) as the model, so the only error is the
sampler's. Every cell is the mean KL over the same three seeds. A solver runs at a target NFE with the most steps whose
counted NFE is at most the target (Heun-type solvers take 2 evaluations a step, PNDM a warm-up,
...; a solver whose single step costs more has no entry there); the table shows the NFE actually
counted wherever it differs from the target. The noise floor is the same estimator on
fresh samples of the ring itself (the value a perfect sampler scores, with the spread of a
three-seed mean); the ODE limit is the exact probability-flow ODE (``rk45``, tolerance 1e-6) from
the same starting noise: every deterministic solver converges to it, not to the floor.

``genflow bench --only league`` runs the full league (about 3 minutes on one core) and writes
``bench/LEAGUE.md`` and ``bench/league.png``; ``--quick`` runs a smaller league (500 samples,
NFE 5/10/20) and ``--tiny`` a smoke run, neither writing files. The league has no timing rows.
"""
from __future__ import annotations

import datetime
import inspect
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
DIGITS_MARK = "<!-- league: trained-model section, written by examples/league.py -->"


@dataclass
class LeagueConfig:
    """What the league runs: target NFEs, samples per solve, processes, schedules, the seeds each
    cell averages over, solvers
    (None: every registered fixed-grid solver)."""

    nfes: Sequence[int] = (5, 8, 10, 15, 20, 30)
    samples: int = 2000
    processes: Sequence[str] = ("EDM", "VP")
    schedules: Sequence[str] = ("logsnr", "karras")
    seeds: Sequence[int] = (0, 1, 2)
    solvers: Optional[Sequence[str]] = None
    floor_seeds: int = 9
    ode_tol: float = 1e-6      # rtol = atol of the exact-ODE limit (rk45)

    def __post_init__(self):
        if not self.nfes or any(int(n) < 1 for n in self.nfes):
            raise ValueError(f"nfes must be a non-empty list of integers >= 1, got {self.nfes}")
        if not self.seeds:
            raise ValueError(f"seeds must be a non-empty list of integer seeds, got {self.seeds}")
        if self.samples < 10:
            raise ValueError(f"samples must be >= 10, got {self.samples}")
        unknown = [p for p in self.processes if p not in PROCESSES]
        if unknown:
            raise ValueError(f"processes must be among {list(PROCESSES)}, got {unknown}")


@dataclass
class Entry:
    """One cell: ``score`` (the target's metric, e.g. KL in nats; inf when a solve diverged), the mean
    over the seeds, at ``nfe`` counted evaluations per solve."""

    process: str
    solver: str
    schedule: str
    target: int
    steps: int
    nfe: int
    score: float


@dataclass
class League:
    config: LeagueConfig
    entries: List[Entry]
    floor: Dict[str, Tuple[float, float]]          # process -> (mean, std of a len(seeds) mean) KL of true samples
    ode_limits: Dict[str, float] = field(default_factory=dict)  # process -> KL of the exact ODE's samples
    skipped: Dict[str, str] = field(default_factory=dict)  # solver -> why
    seconds: float = 0.0
    sweeps: List[SweepEntry] = field(default_factory=list)
    metric: str = "KL to the ring (nats)"


@dataclass
class Target:
    """What the league samples and how it scores: one model per process name, the per-sample
    shape, ``score(samples) -> float`` (lower is better), the noise floor ``(mean, spread)`` and
    the metric's name."""

    models: Dict[str, object]
    shape: Tuple[int, ...]
    score: Callable[[torch.Tensor], float]
    floor: Tuple[float, float]
    metric: str


def ring_target(config: LeagueConfig) -> Target:
    """The exact 8-Gaussian ring under each of ``config.processes``, scored by KL to its density."""
    mixture = gf.GaussianMixture.ring()
    floor = noise_floor(mixture, config.samples, config.floor_seeds, len(config.seeds))
    return Target({p: mixture.model(PROCESSES[p]()) for p in config.processes}, (2,),
                  lambda x: kl_to_density(x.double(), mixture.log_prob), floor, "KL to the ring (nats)")


def counted(model):
    """``model`` as a new ``gf.Model`` whose network counts its calls, and the counter."""
    net = Counted(model.net)
    return gf.Model(net, model.process, model.prediction), net


def nfe_by_steps(model, solver: str, most: int, shape=(2,), **options) -> Dict[int, int]:
    """``{steps: counted NFE}`` for 1, 2, ... steps until the NFE passes ``most`` (2 samples,
    ``logsnr``; a solver's NFE depends on its step count and ``options`` only)."""
    counts, steps = {}, 1
    while not counts or max(counts.values()) <= most:
        probe, net = counted(model)
        with torch.no_grad():
            gf.sample(probe, (2, *shape), solver=solver, steps=steps, schedule=DEFAULT_SCHEDULE, generator=0, **options)
        counts[steps] = net.calls
        steps += 1
    return counts


def steps_for(target: int, counts: Dict[int, int]) -> Optional[int]:
    """The most steps whose NFE (``counts``: steps -> NFE) is at most ``target``; None when even one
    step costs more."""
    fit = [s for s, n in counts.items() if n <= target]
    return max(fit) if fit else None


def _solve(model, target: Target, solver, schedule, steps, config, **options) -> Tuple[int, float]:
    """``(NFE per solve, mean score over config.seeds)``; the score is inf when a solve diverged."""
    model, net = counted(model)
    scores = []
    for seed in config.seeds:
        try:
            with torch.no_grad():
                x = gf.sample(model, (config.samples, *target.shape), solver=solver, steps=steps, schedule=schedule,
                              generator=seed, **options)
        except gf.NonFiniteError:
            return net.calls // (len(scores) + 1), DIVERGED
        scores.append(target.score(x.reshape(x.shape[0], -1)))
    return net.calls // len(config.seeds), sum(scores) / len(scores)


def noise_floor(mixture, samples: int, seeds: int, averaged: int = 1) -> Tuple[float, float]:
    """Mean of the KL estimate on ``seeds`` fresh true sample sets, and the standard deviation of a
    mean of ``averaged`` such estimates."""
    values = torch.tensor([kl_to_density(mixture.sample(samples, generator=torch.Generator().manual_seed(1000 + s)),
                                         mixture.log_prob) for s in range(seeds)], dtype=torch.float64)
    return float(values.mean()), (float(values.std()) / math.sqrt(averaged) if seeds > 1 else 0.0)


def ode_limit(model, target: Target, config: LeagueConfig) -> float:
    """Mean score over ``config.seeds`` of the exact probability-flow ODE's samples (``rk45``, rtol =
    atol = ``config.ode_tol``): the limit of every deterministic solver from the same starting noise."""
    return _solve(model, target, "rk45", DEFAULT_SCHEDULE, None, config, rtol=config.ode_tol, atol=config.ode_tol)[1]


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


# solver, option, values: the defaults checked against alternatives (issue 17, item 6)
OPTION_SWEEPS = (("ald", "n_steps_each", (1, 2, 5, 10)), ("pc", "snr", (0.05, 0.1, 0.16, 0.3)),
                 ("euler_ancestral", "eta", (0.0, 0.5, 1.0)), ("dpm_2_ancestral", "eta", (0.0, 0.5, 1.0)),
                 ("dpmpp_2m_sde", "eta", (0.0, 0.5, 1.0)), ("dpmpp_3m_sde", "eta", (0.0, 0.5, 1.0)),
                 ("ddim", "eta", (0.0, 0.5, 1.0)))
SWEEP_NFES = (10, 30)


def option_default(solver: str, option: str):
    """The value ``option`` takes when ``gf.sample`` is not given it (``eta``: the solver's ``default_eta``)."""
    cls = gf.solvers.get(solver)
    if option == "eta":
        return cls.default_eta
    return inspect.signature(cls.__init__).parameters[option].default


@dataclass
class SweepEntry:
    """One option value of a solver at one target NFE (``logsnr``): the mean score over the seeds."""

    process: str
    solver: str
    option: str
    value: object
    target: int
    nfe: int
    score: float


def run_sweeps(config: LeagueConfig, sweeps=OPTION_SWEEPS, nfes=SWEEP_NFES,
               target: Optional[Target] = None) -> List[SweepEntry]:
    """Each solver of ``sweeps`` with each option value at each of ``nfes``, on every model of
    ``target`` (default the exact ring under ``config.processes``)."""
    target = ring_target(config) if target is None else target
    any_model, out = next(iter(target.models.values())), []
    for solver, option, values in sweeps:
        for value in values:
            counts = nfe_by_steps(any_model, solver, max(nfes), target.shape, **{option: value})
            for pname, model in target.models.items():
                for nfe_target in nfes:
                    steps = steps_for(nfe_target, counts)
                    if steps is not None:
                        nfe, score = _solve(model, target, solver, DEFAULT_SCHEDULE, steps, config, **{option: value})
                        out.append(SweepEntry(pname, solver, option, value, nfe_target, nfe, score))
    return out


def sweep_table(sweeps: List[SweepEntry], factor: float = 2.0, margin: float = 0.1) -> Tuple[str, List[str]]:
    """Markdown table (rows solver / option / process, one column per value and NFE, the default
    marked ``(default)``) and flags where the default is worse than ``factor`` x the best value and
    ``margin`` nats above it."""
    groups: Dict[Tuple[str, str, str], List[SweepEntry]] = {}
    for e in sweeps:
        groups.setdefault((e.solver, e.option, e.process), []).append(e)
    lines = ["| solver | option | process | NFE | " + " | ".join(["values: KL (nats)"]) + " |", "|---|---|---|---|---|"]
    flags = []
    for (solver, option, process), entries in groups.items():
        default = option_default(solver, option)
        for target in sorted({e.target for e in entries}):
            row = [e for e in entries if e.target == target]
            cells = ", ".join(f"{e.value!r}{' (default)' if e.value == default else ''}: {e.score:.3g}" for e in row)
            lines.append(f"| {solver} | {option} | {process} | {target} | {cells} |")
            best = min(row, key=lambda e: e.score)
            dflt = [e for e in row if e.value == default]
            if dflt and dflt[0].score > max(factor * best.score, best.score + margin):
                flags.append(f"{process} `{solver}` at {target} NFE: the default {option}={default!r} gives "
                             f"{dflt[0].score:.3g} nats, {option}={best.value!r} gives {best.score:.3g}")
    return "\n".join(lines), flags


def run_league(config: LeagueConfig, log: Callable[[str], None] = print, target: Optional[Target] = None) -> League:
    """Run every solver x schedule x process x target NFE of ``config`` on ``target`` (default the
    exact ring, ``ring_target``)."""
    started = time.perf_counter()
    target = ring_target(config) if target is None else target
    solvers, skipped = league_solvers(config)
    any_model = next(iter(target.models.values()))
    counts = {solver: nfe_by_steps(any_model, solver, max(config.nfes), target.shape) for solver in solvers}
    entries, limits = [], {}
    for pname, model in target.models.items():
        limits[pname] = ode_limit(model, target, config)
        for solver in solvers:
            for schedule in config.schedules:
                for nfe_target in config.nfes:
                    steps = steps_for(nfe_target, counts[solver])
                    if steps is None:
                        continue
                    nfe, score = _solve(model, target, solver, schedule, steps, config)
                    entries.append(Entry(pname, solver, schedule, int(nfe_target), steps, nfe, score))
            row = [e for e in entries if e.process == pname and e.solver == solver]
            log(f"{pname:<4}{solver:<22}" + " ".join(f"{e.score:8.3f}" for e in row))
    return League(config, entries, {p: target.floor for p in target.models}, ode_limits=limits, skipped=skipped,
                  seconds=time.perf_counter() - started, metric=target.metric)


# ---------------------------------------------------------------- reporting

def _cell(entry: Entry, best: bool) -> str:
    text = "diverged" if not math.isfinite(entry.score) else f"{entry.score:.3g}"
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
    best = {t: min((r[t].score for r in rows.values() if t in r), default=math.inf) for t in config.nfes}
    head = "| solver | schedule | " + " | ".join(f"NFE {t}" for t in config.nfes) + " |"
    lines = [head, "|" + "---|" * (2 + len(config.nfes))]
    for (solver, schedule), cells in rows.items():
        lines.append(f"| {solver} | {schedule} | " + " | ".join(
            _cell(cells[t], cells[t].score == best[t]) if t in cells else "-" for t in config.nfes) + " |")
    return "\n".join(lines)


def default_flags(league: League, factor: float = 2.0, margin: float = 0.1) -> List[str]:
    """Solvers whose default schedule (``logsnr``) scores worse than ``factor`` x their best
    schedule and ``margin`` nats above it at most of their NFEs, and solvers that stay ``margin``
    nats above the noise floor at every NFE with every schedule (defaults that do not converge)."""
    flags = []
    by_key: Dict[Tuple[str, str], Dict[Tuple[str, int], float]] = {}
    for e in league.entries:
        by_key.setdefault((e.process, e.solver), {})[(e.schedule, e.target)] = e.score
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
    """``NFE t: solver/schedule (kl)`` for each target NFE, with how many other solvers score within
    twice the noise floor's spread of it (a tie at this sample size)."""
    out, spread = [], 2 * league.floor[process][1]
    for t in league.config.nfes:
        cands = [e for e in league.entries if e.process == process and e.target == t]
        e = min(cands, key=lambda e: e.score)
        ties = {c.solver for c in cands if c.score <= e.score + spread} - {e.solver}
        out.append(f"NFE {t}: `{e.solver}`/{e.schedule} ({e.score:.3g}, {e.nfe} NFE"
                   + (f"; {len(ties)} other solver(s) within noise of it" if ties else "") + ")")
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
        f"{c.samples} samples, the mean over seeds `generator` = {', '.join(map(str, c.seeds))} (the same for "
        "every cell); every solver with its defaults "
        f"(`gf.sample(model, ({c.samples}, 2), solver=..., steps=..., schedule=...)`). "
        "**Steps**: each solver runs with the most steps whose counted NFE is at most the column's "
        "(`-`: one step costs more); the counted NFE is in parentheses where it differs. Lower is better; the best of "
        "each column is bold; `diverged`: the solve hit non-finite values.",
        "",
        "**Noise floor** (the same estimate on fresh samples of the ring itself, "
        f"{c.floor_seeds} sample sets; ± the spread of a {len(c.seeds)}-seed mean): "
        f"{next(iter(league.floor.values()))[0]:.3f} ± {next(iter(league.floor.values()))[1]:.3f} nats. "
        "**ODE limit** (the exact probability-flow ODE, `rk45` at rtol = atol = 1e-6, from the same starting "
        "noise; every deterministic solver converges to it): "
        + "; ".join(f"{p} {v:.3f} nats" for p, v in league.ode_limits.items())
        + ". Differences below about twice the spread are noise: at 20-30 NFE most solvers tie.",
        "",
    ]
    if league.skipped:
        lines += ["**Not in the league**: " + "; ".join(f"`{n}` ({why})" for n, why in league.skipped.items())
                  + ". `lcm` and `tcd` are consistency-model samplers run here on an exact (non-distilled) "
                  "denoiser, so their rows are not what they give with a consistency model.", ""]
    lines += ["## Which sampler at N model evaluations", ""]
    for p in c.processes:
        lines.append(f"- **{p}**: " + "; ".join(winners(league, p)) + ".")
    table, option_flags = sweep_table(league.sweeps) if league.sweeps else ("", [])
    lines += ["", "## Defaults far from the sampler's best (issue 17, item 6)", ""]
    lines += [f"- {f}" for f in default_flags(league) + option_flags] or ["- none"]
    if table:
        lines += ["", f"Option defaults against alternatives (`{DEFAULT_SCHEDULE}`, the same seeds; a value's steps "
                  "are chosen for its own NFE per step):", "", table]
    for p in c.processes:
        lines += ["", f"## {p}", "", league_table(league, p)]
    lines += ["", "![KL versus NFE](league.png)", "",
              "The figure shows, per process, the ten solvers with the lowest mean log KL over the columns (each at "
              "its better schedule) and `euler` and `dpmpp_2m` (gf.sample's default) for reference; estimates "
              "below 0.005 nats are noise and drawn at 0.005.", ""]
    return "\n".join(lines)


def _ranked(league: League, process: str) -> List[Tuple[str, str]]:
    """``(solver, schedule)`` pairs of ``process``, best first by mean log KL over the NFE columns
    (a missing column counts as the pair's worst)."""
    logs: Dict[Tuple[str, str], List[float]] = {}
    for e in league.entries:
        if e.process == process:
            logs.setdefault((e.solver, e.schedule), []).append(math.log(min(max(e.score, 1e-3), 1e6)))
    n = len(league.config.nfes)
    return sorted(logs, key=lambda k: (sum(logs[k]) + (n - len(logs[k])) * max(logs[k])) / n)


def league_figure(league: League, path, top: int = 10, clip: float = 5e-3) -> None:
    """KL versus counted NFE (log-log), one panel per process: each solver's best schedule for the
    ``top`` solvers (ranked by mean log KL), plus ``euler`` and gf.sample's default ``dpmpp_2m`` for
    reference, the noise floor dashed and the exact ODE limit dash-dotted. KL estimates below ``clip``
    (noise) are drawn at ``clip``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = league.config
    fig, axes = plt.subplots(1, len(c.processes), figsize=(6.5 * len(c.processes), 5.5), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, p in zip(axes[0], c.processes):
        pairs, seen = [], set()
        for solver, schedule in _ranked(league, p):
            if solver not in seen:
                seen.add(solver)
                pairs.append((solver, schedule))
        shown = pairs[:top] + [q for q in pairs[top:] if q[0] in ("euler", "dpmpp_2m")]
        for i, (solver, schedule) in enumerate(shown):
            pts = sorted((e.nfe, max(e.score, clip)) for e in league.entries
                         if e.process == p and e.solver == solver and e.schedule == schedule and math.isfinite(e.score))
            ax.plot(*zip(*pts), marker="o", ms=3, lw=1.4, color=colors[i % len(colors)],
                    ls="-" if i < top else ":", label=f"{solver} ({schedule})")
        ax.axhline(league.floor[p][0], color="k", ls="--", lw=1, label="noise floor")
        if p in league.ode_limits:
            ax.axhline(league.ode_limits[p], color="0.5", ls="-.", lw=1, label="exact ODE limit")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(clip / 1.5, 30)
        ax.set_xticks(list(c.nfes), [str(n) for n in c.nfes])
        ax.set_xlabel("NFE (counted)")
        ax.set_ylabel(league.metric)
        ax.set_title(f"{p}: the {top} best solvers (best schedule each), {c.samples} samples")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replace_digits_section(path, section: str) -> None:
    """Put ``section`` (starting with ``DIGITS_MARK``) at the end of the markdown file ``path`` in
    place of its previous one; the exact-mixture league above it is kept."""
    if not section.startswith(DIGITS_MARK):
        raise ValueError("section must start with DIGITS_MARK")
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    head = old[:old.index(DIGITS_MARK)] if DIGITS_MARK in old else old
    path.write_text(head.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n")


def config_for(ctx: Context) -> LeagueConfig:
    """The league ``ctx`` asks for: tiny (tests), quick, or full."""
    if ctx.tiny:
        return LeagueConfig(nfes=(5, 10), samples=200, processes=("EDM",), solvers=("euler", "heun", "dpmpp_2m"),
                            seeds=(0,), floor_seeds=2)
    if ctx.quick:
        return LeagueConfig(nfes=(5, 10, 20), samples=500, seeds=(0,))
    return LeagueConfig()


@group("league", "sampler league: KL to the exact 8-Gaussian ring vs NFE, every solver x schedule, EDM and VP "
                 "(no timing rows; the full run writes bench/LEAGUE.md and bench/league.png)")
def _league(ctx: Context) -> Iterator[Case]:
    """Run the league for ``ctx`` (see ``config_for``); a full run writes its table and figure."""
    league = run_league(config_for(ctx), log=lambda line: print(line, flush=True))
    if not ctx.tiny:
        league.sweeps = run_sweeps(league.config)
    for p in league.config.processes:
        print("\n".join([f"\n{p}:"] + winners(league, p)))
    if not (ctx.tiny or ctx.quick):
        path = OUT_DIR / "LEAGUE.md"
        old = path.read_text() if path.exists() else ""
        kept = old[old.index(DIGITS_MARK):] if DIGITS_MARK in old else ""
        path.write_text(league_markdown(league, "OMP_NUM_THREADS=1 genflow bench --only league --threads 1 "
                                                "--no-results") + ("\n" + kept if kept else ""))
        league_figure(league, OUT_DIR / "league.png")
        print(f"wrote {OUT_DIR / 'LEAGUE.md'} and {OUT_DIR / 'league.png'}")
    return iter(())
