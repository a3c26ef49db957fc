"""Check, on a machine without a GPU, that genflow's CUDA build registers a CUDA kernel for every op.

Run by .ci/cuda_build.sh with the Python of the CUDA-torch virtual environment. It imports
``genflow._C`` (the CUDA build: it must load on a CPU-only machine) and asks the dispatcher, not
the source text, which dispatch keys have a kernel: every ``genflow::`` op with a CPU kernel must
have a CUDA kernel, except the CPU test hooks ``_*_grouped``, which replay the CUDA kernels'
thread grouping on the CPU and by design exist only there. Exits 1 with the list of ops lacking a
CUDA kernel, 0 otherwise.
"""
import sys

import torch

NAMESPACE = "genflow::"


def is_cpu_test_hook(op: str) -> bool:
    """The ops that replay the CUDA kernels' grouping on the CPU (``genflow::_fused_update_grouped``...)."""
    name = op[len(NAMESPACE):]
    return name.startswith("_") and name.endswith("_grouped")


def kernel_table() -> dict:
    """``{op: (has CPU kernel, has CUDA kernel)}`` for every registered genflow op."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return {op: (has(op, "CPU"), has(op, "CUDA"))
            for op in sorted(torch._C._dispatch_get_all_op_names()) if op.startswith(NAMESPACE)}


def main() -> int:
    import genflow
    import genflow._C  # noqa: F401  (registers the ops)

    print(f"genflow from {genflow.__file__}; torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"CUDA device visible: {torch.cuda.is_available()}")
    if torch.version.cuda is None:
        print("FAIL: this torch has no CUDA: the check needs the CUDA build of torch")
        return 1
    if not torch.ops.genflow.has_cuda():
        print("FAIL: genflow._C was built without its CUDA kernels (genflow::has_cuda() is False)")
        return 1
    table = kernel_table()
    cpu_ops = [op for op, (cpu, _) in table.items() if cpu and not is_cpu_test_hook(op)]
    hooks = [op for op, (cpu, _) in table.items() if cpu and is_cpu_test_hook(op)]
    missing = [op for op in cpu_ops if not table[op][1]]
    for op in cpu_ops:
        print(f"  {op:<42} CPU yes  CUDA {'yes' if table[op][1] else 'NO'}")
    print(f"  (CPU-only test hooks, no CUDA kernel by design: {', '.join(hooks) or 'none'})")
    if not cpu_ops:
        print("FAIL: no genflow op has a CPU kernel: the extension registered nothing")
        return 1
    if missing:
        print(f"FAIL: {len(missing)} of {len(cpu_ops)} ops have no CUDA kernel: {', '.join(missing)} "
              "(add them to the TORCH_LIBRARY_IMPL(genflow, CUDA, m) block of their csrc/ops/*.cpp)")
        return 1
    print(f"OK: all {len(cpu_ops)} genflow ops with a CPU kernel have a CUDA kernel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
