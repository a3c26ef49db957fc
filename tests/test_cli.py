"""`genflow demo`: prints the solver table and saves the PNG."""
from genflow.cli import DEMO_SOLVERS, main


def test_demo_prints_every_solver_and_saves_the_plot(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--n", "64", "--process", "edm", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name, _ in DEMO_SOLVERS:
        assert f"\n{name} " in printed
    assert "data vs data" in printed
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
