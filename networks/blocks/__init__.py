# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Building blocks of the project's networks."""

from .class_attention import ClassAttention, ClassAttentionBlock
from .local_self_attention import (
    ATTENTION_BACKENDS,
    LocalSelfAttention,
    LocalSelfAttentionBlock,
    local_attention_torch,
    register_attention_backend,
    relative_axis_groups,
    scale_query_init,
    window_offsets,
)
from .nystrom_attention import NystromAttention
from .performer_attention import PerformerAttention
from .reattention import ReAttention, ReAttentionTransformerBlock
from .token_attention import TokenAttention

__all__ = [
    "ATTENTION_BACKENDS",
    "ClassAttention",
    "ClassAttentionBlock",
    "NystromAttention",
    "PerformerAttention",
    "ReAttention",
    "ReAttentionTransformerBlock",
    "TokenAttention",
    "LocalSelfAttention",
    "LocalSelfAttentionBlock",
    "local_attention_torch",
    "register_attention_backend",
    "relative_axis_groups",
    "scale_query_init",
    "window_offsets",
]
