"""genflow's fused primitives: one Python entry each, dispatching by device (DESIGN.md §4).

``fused_update`` (``out = c0 x + sum_k c_k terms[k-1] + s z``), ``randn`` (the Philox normal
stream it uses), ``langevin_update`` (the Langevin corrector step), ``probes``/``probe_dot``
(the Hutchinson trace estimator's probes and per-sample dot products) and
``kernel_weighted_mean`` (the Gaussian-kernel weighted mean of the kernel SD flow) run the
compiled kernels of ``genflow._C`` when built for the tensors' device and the pure-PyTorch
reference (``genflow.ops._reference``, or the op's own module) otherwise.
"""
from genflow.ops.fused_update import MAX_TERMS, fused_update, randn
from genflow.ops.hutchinson import probe_dot, probes
from genflow.ops.kernel_mean import kernel_weighted_mean
from genflow.ops.langevin import langevin_update

__all__ = ["MAX_TERMS", "fused_update", "kernel_weighted_mean", "langevin_update", "probe_dot", "probes", "randn"]
