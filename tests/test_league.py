"""bench/cases/league.py (``genflow bench --only league``): a tiny league runs and gives a
well-formed table, flags and figure; the step choice per target NFE and bad configurations."""
import importlib
import importlib.util
import math

import pytest

from genflow import bench

bench.load_cases()
league = importlib.import_module("bench.cases.league")


@pytest.fixture(scope="module")
def tiny():
    config = league.LeagueConfig(nfes=(3, 6), samples=120, processes=("EDM",), solvers=("euler", "heun", "rk45"),
                                 seeds=(0, 1), floor_seeds=2)
    return league.run_league(config, log=lambda line: None)


def test_registered_as_a_bench_group():
    assert "league" in bench.GROUPS


def test_tiny_league_entries(tiny):
    assert tiny.skipped.keys() == {"rk45"}  # adaptive: no fixed NFE
    by_key = {(e.solver, e.schedule, e.target): e for e in tiny.entries}
    # every entry within its NFE budget; heun's 2 evaluations a step give it fewer steps than euler
    for e in tiny.entries:
        assert e.nfe <= e.target and e.steps >= 1 and e.score > -0.5 and math.isfinite(e.score)
    assert by_key[("euler", "logsnr", 3)].nfe == 3 and by_key[("euler", "karras", 6)].nfe == 6
    assert by_key[("heun", "logsnr", 6)].steps < by_key[("euler", "logsnr", 6)].steps
    assert len(tiny.entries) == 2 * 2 * 2  # solvers x schedules x NFEs
    mean, std = tiny.floor["EDM"]
    assert math.isfinite(mean) and std >= 0
    # euler at its largest step count is nearer the exact ODE's samples than at its smallest
    limit = tiny.ode_limits["EDM"]
    assert abs(by_key[("euler", "logsnr", 6)].score - limit) < abs(by_key[("euler", "logsnr", 3)].score - limit)


def test_table_is_well_formed(tiny):
    table = league.league_table(tiny, "EDM").splitlines()
    assert table[0] == "| solver | schedule | NFE 3 | NFE 6 |"
    assert table[1] == "|---|---|---|---|"
    assert len(table) == 2 + 4
    assert all(line.count("|") == 5 for line in table)
    for col in (2, 3):  # exactly one best (bold) cell per column, and it is the column's minimum
        cells = [line.split("|")[col + 1].strip() for line in table[2:]]
        bold = [c for c in cells if c.startswith("**")]
        assert len(bold) == 1
        value = lambda c: float(c.strip("*").split(" ")[0])
        assert value(bold[0]) == min(value(c) for c in cells)


def test_markdown_and_figure(tiny, tmp_path):
    text = league.league_markdown(tiny, "genflow bench --only league")
    assert text.startswith("# Sampler league") and "Noise floor" in text and "`rk45`" in text
    assert "| euler | logsnr |" in text and "NFE 6: `" in text
    path = tmp_path / "league.png"
    league.league_figure(tiny, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flags_default_schedule_far_from_best(tiny):
    entries = [league.Entry("EDM", "x", s, t, 1, t, kl) for t in (3, 6)
               for s, kl in (("logsnr", 5.0), ("karras", 0.5))]
    fake = league.League(tiny.config, entries, {"EDM": (0.02, 0.01)})
    flags = league.default_flags(fake)
    assert any("default schedule `logsnr`" in f and "`karras`" in f for f in flags)
    assert any("noise floor" in f for f in flags)  # 0.5 nats never reaches 0.02 + 0.1


def test_steps_for_picks_most_steps_within_budget():
    counts = {1: 4, 2: 13, 3: 14, 4: 15}  # a warm-up (PNDM-like)
    assert league.steps_for(14, counts) == 3
    assert league.steps_for(3, counts) is None


@pytest.mark.parametrize("kwargs, word", [(dict(nfes=()), "nfes"), (dict(nfes=(0,)), "nfes"),
                                          (dict(samples=5), "samples"), (dict(seeds=()), "seeds"),
                                          (dict(processes=("VE2",)), "processes")])
def test_bad_config(kwargs, word):
    with pytest.raises(ValueError, match=word):
        league.LeagueConfig(**kwargs)


def test_unknown_solver():
    with pytest.raises(ValueError, match="solvers"):
        league.league_solvers(league.LeagueConfig(solvers=("nope",)))


def test_option_sweep_table_marks_the_default_and_flags_it():
    config = league.LeagueConfig(samples=100, processes=("EDM",), seeds=(0,))
    sweeps = league.run_sweeps(config, sweeps=(("euler_ancestral", "eta", (0.0, 1.0)),), nfes=(4,))
    assert [(e.value, e.nfe) for e in sweeps] == [(0.0, 4), (1.0, 4)]
    table, _ = league.sweep_table(sweeps)
    assert "| euler_ancestral | eta | EDM | 4 | 0.0: " in table and "1.0 (default): " in table
    fake = [league.SweepEntry("EDM", "ddim", "eta", v, 10, 10, kl) for v, kl in ((0.0, 3.0), (1.0, 0.2))]
    _, flags = league.sweep_table(fake)
    assert flags == ["EDM `ddim` at 10 NFE: the default eta=0.0 gives 3 nats, eta=1.0 gives 0.2"]


def test_digits_section_is_kept_and_replaced(tmp_path):
    path = tmp_path / "LEAGUE.md"
    path.write_text("# Sampler league\n\nring tables\n")
    league.replace_digits_section(path, league.DIGITS_MARK + "\nfirst\n")
    league.replace_digits_section(path, league.DIGITS_MARK + "\nsecond\n")
    text = path.read_text()
    assert text.startswith("# Sampler league\n\nring tables\n") and text.count(league.DIGITS_MARK) == 1
    assert text.endswith("second\n") and "first" not in text
    with pytest.raises(ValueError, match="DIGITS_MARK"):
        league.replace_digits_section(path, "no marker")


def test_digits_example_tiny_run(tmp_path):
    """examples/league.py end to end: a 3-step model, 40 samples, two solvers, one NFE."""
    spec = importlib.util.spec_from_file_location("league_example", f"{league.OUT_DIR.parent}/examples/league.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "LEAGUE.md"
    result = example.main(["--train-steps", "3", "--samples", "40", "--nfes", "4", "--solvers", "euler,heun",
                           "--checkpoint", "", "--ode-tol", "1e-2", "--out", str(out)])
    assert {(e.solver, e.nfe) for e in result.entries} == {("euler", 4), ("heun", 4)}
    assert all(math.isfinite(e.score) for e in result.entries)
    text = out.read_text()
    assert league.DIGITS_MARK in text and "| euler | logsnr | " in text and "| heun | karras | " in text


def test_bench_cli_tiny_league_writes_nothing(capsys):
    before = (league.OUT_DIR / "LEAGUE.md").read_text()
    assert bench.main(["--only", "league", "--tiny", "--rounds", "1", "--no-results"]) == 0
    printed = capsys.readouterr().out
    assert "EDM euler" in printed and "NFE 10: `" in printed
    assert (league.OUT_DIR / "LEAGUE.md").read_text() == before
