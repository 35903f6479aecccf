"""The SUM model: segment-anything's SAM with a task prompt (spec §2)."""

from sum.model.build import build_sum_model
from sum.model.prompt_encoder import TaskPromptEncoder

__all__ = ["build_sum_model", "TaskPromptEncoder"]
