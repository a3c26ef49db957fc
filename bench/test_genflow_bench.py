"""pytest-benchmark suite over the same cases as ``genflow bench`` (genflow/bench.py's registry):
one benchmark per (case, engine), engine = genflow or one of its baselines. Each baseline's
agreement check runs first, as in the runner.

    python -m pytest bench -q --benchmark-only                        # the --quick sizes, CPU
    GENFLOW_BENCH_FULL=1 python -m pytest bench -q --benchmark-only   # the full sizes
    GENFLOW_BENCH_DEVICE=cuda GENFLOW_BENCH_ONLY=ops,k-diffusion python -m pytest bench -q --benchmark-only

``python -m pytest tests`` does not collect this directory (pyproject's testpaths = tests).
"""
import itertools
import os

import pytest
import torch

from genflow import bench

DEVICE = os.environ.get("GENFLOW_BENCH_DEVICE", "cpu")
CTX = bench.Context(device=DEVICE, quick=not os.environ.get("GENFLOW_BENCH_FULL"))
ONLY = [g for g in os.environ.get("GENFLOW_BENCH_ONLY", "").split(",") if g] or list(bench.GROUPS)


def _params():
    if DEVICE == "cuda" and not torch.cuda.is_available():
        return [pytest.param(None, None, None, marks=pytest.mark.skip(reason="CUDA is not available"), id="no-cuda")]
    params = []
    for name in ONLY:
        for index, case in enumerate(bench.GROUPS[name].build(CTX)):
            stem = f"{name}-{case.name}-{case.size}".replace(" ", "_").replace(",", "x")
            params.append(pytest.param(name, index, "genflow", id=f"{stem}-genflow"))
            for b in case.baselines:
                marks = [pytest.mark.skip(reason=b.status)] if b.fn is None else []
                params.append(pytest.param(name, index, b.name, id=f"{stem}-{b.name.replace(' ', '_')}", marks=marks))
    return params


@pytest.mark.parametrize("group, index, engine", _params())
def test_case(benchmark, group, index, engine):
    case = next(itertools.islice(bench.GROUPS[group].build(CTX), index, None))
    if engine == "genflow":
        fn = case.genflow
    else:
        baseline = next(b for b in case.baselines if b.name == engine)
        if baseline.setup is not None:
            baseline.setup()
        if baseline.check is not None:
            agreement = baseline.check()
            assert agreement.ok, f"{engine} disagrees with genflow: {agreement}"
        fn = baseline.fn
    benchmark.group = f"{group}: {case.name} {case.size}"

    def call():
        fn()
        CTX.sync()

    benchmark(call)
