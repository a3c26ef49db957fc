"""Build genflow and its extension ``genflow._C`` against the installed torch.

C++ CPU kernels are always built. CUDA kernels are added when torch has CUDA and
``GENFLOW_BUILD_CUDA`` is not ``0`` (``0`` | ``1`` | ``auto``, default ``auto``;
``1`` fails if torch or nvcc cannot build them). Sources are globbed, so adding an op
never edits this file (DESIGN.md §4).
"""
import glob
import os
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


def _want_cuda():
    choice = os.environ.get("GENFLOW_BUILD_CUDA", "auto").lower()
    if choice not in ("0", "1", "auto"):
        raise ValueError(f"GENFLOW_BUILD_CUDA must be 0, 1 or auto, got {choice!r}")
    if choice == "0":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    available = torch.version.cuda is not None and CUDA_HOME is not None
    if choice == "1" and not available:
        raise RuntimeError("GENFLOW_BUILD_CUDA=1 but torch has no CUDA or nvcc was not found")
    return available


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
