"""Build genflow and its extension ``genflow._C`` against the installed torch.

C++ CPU kernels are always built. CUDA kernels are added when torch has CUDA and
``GENFLOW_BUILD_CUDA`` is not ``0`` (``0`` | ``1`` | ``auto``, default ``auto``;
``1`` fails naming what is missing: a CUDA torch, an nvcc of the same CUDA major version,
``TORCH_CUDA_ARCH_LIST`` on a machine without a GPU). Sources are globbed, so adding an op
never edits this file (DESIGN.md §4).
"""
import glob
import os
import re
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

try:  # the extension is built against the torch the user installed
    import torch  # noqa: F401
except ImportError:
    # pip's isolated build environment hides site-packages; look there for torch rather
    # than letting pip fetch a second (multi-GB) torch just to compile against.
    sys.path.append(sysconfig.get_paths()["purelib"])
    try:
        import torch  # noqa: F401
    except ImportError as error:
        raise RuntimeError("genflow builds against an installed torch: pip install torch first") from error


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cuda_problem():
    """Why the CUDA kernels cannot be built here, or None when they can: a CPU-only torch, no
    CUDA toolkit, an nvcc of another CUDA major version than torch's, or no target architecture
    (no visible GPU and no ``TORCH_CUDA_ARCH_LIST``)."""
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU-only build: install the CUDA build of torch first "
                "(on Linux the default wheel on PyPI, `pip install torch`)")
    major = torch.version.cuda.split(".")[0]
    if CUDA_HOME is None:
        return (f"no CUDA toolkit found: put nvcc of CUDA {major}.x (the major version torch was built "
                "with) on PATH, or set CUDA_HOME to the toolkit folder")
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    if not (os.path.isfile(nvcc) and os.path.isfile(os.path.join(CUDA_HOME, "include", "cuda_runtime.h"))):
        return (f"CUDA_HOME={CUDA_HOME} has no bin/nvcc and include/cuda_runtime.h (an nvcc on PATH "
                "that is a wrapper script points there): set CUDA_HOME to the toolkit folder, "
                "e.g. CUDA_HOME=/usr/local/cuda")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release (\d+)\.(\d+)", version)
    if release is None:
        return f"`{nvcc} --version` printed no CUDA release: {version.strip()[:200]!r}"
    if release.group(1) != major:
        return (f"{nvcc} is CUDA {release.group(1)}.{release.group(2)} but torch {torch.__version__} was "
                f"built with CUDA {torch.version.cuda}: use an nvcc of CUDA {major}.x (set CUDA_HOME) or "
                f"the torch build for CUDA {release.group(1)}")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        return ("no GPU is visible and TORCH_CUDA_ARCH_LIST is not set: name the GPU architectures to "
                'build for, e.g. TORCH_CUDA_ARCH_LIST="8.0;9.0" (A100, H100)')
    return None


def _want_cuda():
    """Whether to build the CUDA kernels: ``GENFLOW_BUILD_CUDA`` = ``0`` (never), ``1`` (always:
    an error naming what is missing otherwise) or ``auto`` (when everything is there; a CUDA torch
    that cannot build them says why on stderr and gets the CPU kernels only)."""
    choice = os.environ.get("GENFLOW_BUILD_CUDA", "auto").lower()
    if choice not in ("0", "1", "auto"):
        raise ValueError(f"GENFLOW_BUILD_CUDA must be 0, 1 or auto, got {choice!r}")
    if choice == "0":
        return False
    problem = _cuda_problem()
    if problem is None:
        return True
    if choice == "1":
        raise RuntimeError(f"GENFLOW_BUILD_CUDA=1 but genflow's CUDA kernels cannot be built: {problem}")
    if torch.version.cuda is not None:
        print(f"genflow: building the CPU kernels only, without CUDA: {problem} "
              "(GENFLOW_BUILD_CUDA=1 turns this into an error)", file=sys.stderr)
    return False


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = _sources("csrc/ops/*.cpp") + _sources("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp"]  # torch.utils.cpp_extension adds the C++ standard torch needs
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _want_cuda():
        return [
            CUDAExtension(
                "genflow._C",
                sources + _sources("csrc/cuda/*.cu"),
                include_dirs=include_dirs,
                define_macros=[("GENFLOW_WITH_CUDA", "1")],
                # no --use_fast_math: its -ftz=true flushes float32 subnormals that the CPU kernels keep
                # (docs/design/cuda_emulation.md); exp2f is MUFU.EX2 either way
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        CppExtension(
            "genflow._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


setup(
    name="genflow",
    version="0.1.0",
    description="Fast sampling, likelihoods and training for diffusion and flow generative models",
    packages=find_packages(include=["genflow", "genflow.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "scipy", "tqdm", "matplotlib"],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis", "scikit-learn", "diffusers==0.42.1"]},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    entry_points={"console_scripts": ["genflow=genflow.cli:main"]},
)
