"""The SUM model: segment-anything's SAM with a task prompt (spec §2).

Two verbs: `build_sum_model` (the architecture of a `ModelConfig`, randomly initialised) and
`load_model` (the model with its weights, on its device, with the encoder fast path).
"""

from sum.model.build import build_sum_model
from sum.model.checkpoint import load_model
from sum.model.prompt_encoder import TaskPromptEncoder

__all__ = ["build_sum_model", "load_model", "TaskPromptEncoder"]
