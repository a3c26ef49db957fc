"""The continuous adjoint of an ODE solve: gradients by a second, backward solve instead of
backpropagation through the steps (Chen, Rubanova, Bettencourt & Duvenaud 2018, "Neural
Ordinary Differential Equations", Algorithm 1; torchdiffeq's ``odeint_adjoint``).

For ``dy/dt = f(t, y; theta)`` and a loss ``L(y(t_1))`` the adjoint ``a(t) = dL/dy(t)`` solves,
backward from ``t_1`` to ``t_0`` together with the state and the parameter gradient::

    dy/dt = f(t, y),   da/dt = -a^T df/dy,   d(g_theta)/dt = -a^T df/dtheta,
    y(t_1) from the forward solve,   a(t_1) = dL/dy(t_1),   g_theta(t_1) = 0,

so that ``a(t_0) = dL/dy_0`` and ``g_theta(t_0) = dL/dtheta``. Each evaluation of the augmented
derivative is one drift call and one vector–Jacobian product. The forward solve keeps no graph,
so memory is O(1) in the number of steps (the states at the save times only); the gradient is
that of the exact flow up to the backward solve's error (not the exact gradient of the
discretisation, which backpropagation through the steps gives).

The augmented state ``[y, a, g_theta]`` is flattened into one system ``[1, N]``; the solves
themselves are the caller's (``gf.solve``: the same engine and tableau, the fixed grid reversed
or adaptive steps with their own tolerances).
"""
from typing import Callable, Sequence, Tuple

import torch

__all__ = ["AdjointSolve", "augmented_drift", "check_params"]


def _reachable_leaves(output: torch.Tensor, stops: Sequence[torch.Tensor]):
    """The leaf tensors requiring grad that ``output``'s graph reaches without passing through
    one of ``stops`` (non-leaf tensors are stopped at their ``grad_fn``)."""
    stop_nodes = {id(s.grad_fn) for s in stops if s.grad_fn is not None}
    stop_leaves = {id(s) for s in stops if s.grad_fn is None}
    leaves, seen, todo = [], set(), [output.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen or id(node) in stop_nodes:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None:
            if id(variable) not in stop_leaves:
                leaves.append(variable)
            continue
        todo.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def check_params(output: torch.Tensor, state: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
    """Raise ``ValueError`` when the drift's output depends on a tensor requiring grad that is
    neither the state nor one of ``params`` (its gradient would silently be missing)."""
    missing = _reachable_leaves(output, [state, *params])
    if missing:
        shapes = [list(m.shape) for m in missing[:4]]
        raise ValueError(f"gf.solve(adjoint=True): the drift uses {len(missing)} tensor(s) requiring grad that are "
                         f"not in adjoint_params (shapes {shapes}); pass adjoint_params=(...) with every tensor the "
                         f"drift should be differentiated for, or make the drift an nn.Module that owns them")


def augmented_drift(drift: Callable, params: Tuple[torch.Tensor, ...], shape: torch.Size) -> Callable:
    """``(t, s) -> ds/dt`` of the augmented state ``s = [y, a, g_theta]`` flattened to ``[1, N]``
    (see the module doc): one drift call and one vector–Jacobian product per evaluation. The
    first call checks that the drift depends on no tensor outside ``params`` (``check_params``)."""
    size = shape.numel()
    checked = []

    def f(t, s):
        flat = s[0]
        y, a = flat[:size].reshape(shape), flat[size:2 * size].reshape(shape)
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            out = drift(t, y)
            if not checked:
                check_params(out, y, params)
                checked.append(True)
            inputs = (y,) + params
            if out.requires_grad:
                grads = torch.autograd.grad(out, inputs, -a, allow_unused=True)
            else:
                grads = (None,) * len(inputs)
        pieces = [out.detach().reshape(-1)]
        for g, x in zip(grads, inputs):
            pieces.append(torch.zeros(x.numel(), dtype=s.dtype, device=s.device) if g is None
                          else g.reshape(-1).to(s.dtype))
        return torch.cat(pieces)[None]

    return f


class AdjointSolve(torch.autograd.Function):
    """``states = AdjointSolve.apply(forward, segment, drift, y0, *params)``: the forward solve
    without a graph, differentiated by the adjoint.

    ``forward(y0) -> states`` (Tensor[K, B, *D]: the state at the K >= 2 nodes ``tau_0 = t_0,
    ..., tau_{K-1} = t_1``, the save times among them); ``segment(aug, s, k) -> s`` integrates the
    flat augmented state ``s`` ([1, N]) with derivative ``aug(t, s)`` from node ``k`` back to node
    ``k - 1``; ``drift(t, y)`` the user's drift; ``params`` the tensors to differentiate. The
    backward restarts ``y`` from the forward's state at every node and adds the incoming
    gradient of that node's state to ``a`` there (torchdiffeq's scheme for several save times).
    """

    @staticmethod
    def forward(ctx, forward, segment, drift, y0, *params):
        states = forward(y0.detach())
        ctx.segment, ctx.drift = segment, drift
        ctx.save_for_backward(states, *params)
        return states

    @staticmethod
    def backward(ctx, grad_states):
        states, *params = ctx.saved_tensors
        params, shape = tuple(params), states.shape[1:]
        aug = augmented_drift(ctx.drift, params, shape)
        a = grad_states[-1]
        g = states.new_zeros(sum(p.numel() for p in params))
        size = shape.numel()
        for k in range(states.shape[0] - 1, 0, -1):
            s = torch.cat([states[k].reshape(-1), a.reshape(-1), g])[None]
            s = ctx.segment(aug, s, k)[0]
            a = s[size:2 * size].reshape(shape) + grad_states[k - 1]
            g = s[2 * size:]
        grads, offset = [], 0
        for p in params:
            grads.append(g[offset:offset + p.numel()].reshape(p.shape).to(p.dtype))
            offset += p.numel()
        return (None, None, None, a, *grads)
