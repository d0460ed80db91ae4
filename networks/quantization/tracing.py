# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Trace-friendly twins of torch modules whose Python wrappers break ``torch.jit.trace``.

``nn.MaxUnpool2d/3d`` validate ``output_size`` in Python; under tracing the sizes are traced values and the check
fails ("cond must be a bool, but got a Tensor"). The twins call the op directly with the unpooled size computed
from the input's traced shape, so a traced U-net with unpooling still runs at other input sizes.
"""

from __future__ import annotations

import copy
from typing import List, Optional

import torch
from torch import nn

from networks.arguments import check_spatial_dims

__all__ = ["TraceableMaxUnpool", "traceable_copy"]


class TraceableMaxUnpool(nn.Module):
    """Max-unpooling with the semantics of ``nn.MaxUnpool2d/3d`` (same kernel, stride, padding).

    Shapes:
        ``forward(x: (B, C, *spatial), indices like x, output_size: spatial or full size or None)``.
    """

    def __init__(self, spatial_dims: int, kernel_size, stride, padding) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)

        def expand(value) -> List[int]:
            return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * spatial_dims

        self.spatial_dims = spatial_dims
        self.kernel_size = expand(kernel_size)
        self.stride = expand(stride if stride is not None else kernel_size)
        self.padding = expand(padding)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, output_size: Optional[List[int]] = None) -> torch.Tensor:
        # The default size, computed from x inside this module, is what a trace records dynamically; an explicit
        # output_size reaches a traced submodule as a constant, so it is only accepted when it equals the default.
        size = [
            (x.shape[2 + d] - 1) * self.stride[d] - 2 * self.padding[d] + self.kernel_size[d]
            for d in range(self.spatial_dims)
        ]
        if output_size is not None:
            requested = [int(s) for s in list(output_size)[-self.spatial_dims :]]
            if requested != [int(s) for s in size]:
                raise ValueError(
                    f"TraceableMaxUnpool: output_size {requested} differs from the default unpooled size "
                    f"{[int(s) for s in size]}; such a network cannot be traced for other input sizes"
                )
        # torch._C._nn (what F.max_unpool2d calls) records traced sizes; torch.ops.aten would freeze them
        if self.spatial_dims == 2:
            return torch._C._nn.max_unpool2d(x, indices, size)
        return torch._C._nn.max_unpool3d(x, indices, size, self.stride, self.padding)


_TWINS = {
    nn.MaxUnpool2d: lambda m: TraceableMaxUnpool(2, m.kernel_size, m.stride, m.padding),
    nn.MaxUnpool3d: lambda m: TraceableMaxUnpool(3, m.kernel_size, m.stride, m.padding),
}


def _scripted_types() -> tuple[type, ...]:
    from networks.quantization.modules import QuantizedLeaf, QuantizedLocalSelfAttention

    return (QuantizedLeaf, QuantizedLocalSelfAttention)


def traceable_copy(model: nn.Module) -> nn.Module:
    """Deep copy of ``model`` ready for ``torch.jit.trace``.

    - modules in ``_TWINS`` are swapped for their trace-friendly twins;
    - the INT8 layers (:class:`QuantizedLeaf`, :class:`QuantizedLocalSelfAttention`) are scripted first, so the trace
      calls them instead of inlining a private copy of their code per instance (the artifact then stores one
      code file per layer type instead of one per layer: about 2/3 of the code size of a traced SaDNN-seg).
    """
    work = copy.deepcopy(model)
    scripted_types = _scripted_types()
    if isinstance(work, scripted_types):
        return torch.jit.script(work)
    for parent in list(work.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in _TWINS:
                setattr(parent, name, _TWINS[type(child)](child))
            elif isinstance(child, scripted_types):
                setattr(parent, name, torch.jit.script(child))
    return work
