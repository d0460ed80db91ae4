# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Building blocks of the project's networks."""

# local_self_attention.__all__ is the one list of that module's public names: re-export exactly those
from .class_attention import ClassAttention, ClassAttentionBlock
from .local_self_attention import *  # noqa: F403
from .local_self_attention import __all__ as _local_self_attention_names
from .nystrom_attention import NystromAttention
from .performer_attention import PerformerAttention
from .reattention import ReAttention, ReAttentionTransformerBlock
from .token_attention import TokenAttention

__all__ = [
    "ClassAttention",
    "ClassAttentionBlock",
    "NystromAttention",
    "PerformerAttention",
    "ReAttention",
    "ReAttentionTransformerBlock",
    "TokenAttention",
    *_local_self_attention_names,
]
