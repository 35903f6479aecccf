"""SAM's prompt encoder with a task prompt (spec §2.2).

`TaskPromptEncoder` subclasses `segment_anything.modeling.PromptEncoder` and changes one thing:
a learned vector ``E_t`` per task id is added to the dense prompt embedding, so the mask decoder
sees ``image_embedding + dense + E_t`` at every position. All ``E_t`` start at zero, and id 0 is
frozen there by default (``zero_token_no_grad=True``, the fix of the released bug D1), so with
task prompt 0 the model is exactly SAM.
"""

from typing import Optional, Tuple

import torch
from segment_anything.modeling import PromptEncoder
from torch import nn


class TaskPromptEncoder(PromptEncoder):
    def __init__(
        self,
        *args,
        use_task_prompt: bool = True,
        num_task_prompts: int = 4,
        zero_token_no_grad: bool = True,
        **kwargs,
    ) -> None:
        """
        Arguments:
          *args, **kwargs: passed to ``PromptEncoder`` (embed_dim, image_embedding_size,
            input_image_size, mask_in_chans).
          use_task_prompt (bool): if False, every task embedding stays zero and frozen.
          num_task_prompts (int): number of task ids (spec: 4; 0 unspecified, 1 salient object,
            2 entity, 3 part).
          zero_token_no_grad (bool): freeze id 0 at zero, so task 0 is plain SAM (spec §2.2, D1).
        """
        super().__init__(*args, **kwargs)
        self.use_task_prompt = use_task_prompt
        self.zero_token_no_grad = zero_token_no_grad
        self.task_prompt_embedding = nn.ModuleList(
            [nn.Embedding(1, self.embed_dim) for _ in range(num_task_prompts)]
        )
        for emb in self.task_prompt_embedding:
            nn.init.zeros_(emb.weight)
            if not use_task_prompt:
                emb.weight.requires_grad_(False)
        if zero_token_no_grad:
            self.task_prompt_embedding[0].weight.requires_grad_(False)

    @property
    def num_task_prompts(self) -> int:
        return len(self.task_prompt_embedding)

    def task_embedding(self, task_prompt: int | torch.Tensor) -> torch.Tensor:
        """Return ``E_t`` for one id, or for a (B,) tensor of ids, shaped (B or 1, C, 1, 1)."""
        if isinstance(task_prompt, torch.Tensor) and task_prompt.ndim == 1:
            ids = task_prompt.tolist()
            for t in ids:
                self._check_id(int(t))
            weight_tc = torch.cat([self.task_prompt_embedding[int(t)].weight for t in ids], dim=0)
            return weight_tc[:, :, None, None]
        t = int(task_prompt)
        self._check_id(t)
        return self.task_prompt_embedding[t].weight.reshape(1, -1, 1, 1)

    def _check_id(self, t: int) -> None:
        if not 0 <= t < self.num_task_prompts:
            raise ValueError(f"task_prompt={t}: expected an id in 0..{self.num_task_prompts - 1}")

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """``PromptEncoder._embed_points`` without boolean-mask indexing, which waits for the device
        on CUDA (the pseudo-labeling loop calls it once per decoder batch). The same values bit for
        bit: each position takes exactly one of ``not_a_point``, ``pe + point_embeddings[0]``,
        ``pe + point_embeddings[1]`` or ``pe`` (other labels), as the official in-place adds do."""
        points = points + 0.5  # the centre of the pixel
        if pad:
            points = torch.cat([points, points.new_zeros((points.shape[0], 1, 2))], dim=1)
            labels = torch.cat([labels, -labels.new_ones((labels.shape[0], 1))], dim=1)
        pe_bnc = self.pe_layer.forward_with_coords(points, self.input_image_size)
        label_bn1, dtype = labels.unsqueeze(-1), pe_bnc.dtype  # in-place adds keep pe's dtype (bf16 under autocast)
        out_bnc = torch.where(label_bn1 == 1, (pe_bnc + self.point_embeddings[1].weight).to(dtype), pe_bnc)
        out_bnc = torch.where(label_bn1 == 0, (pe_bnc + self.point_embeddings[0].weight).to(dtype), out_bnc)
        return torch.where(label_bn1 == -1, self.not_a_point_embed.weight.to(dtype), out_bnc)

    def forward(
        self,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
        task_prompt: int | torch.Tensor = 0,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts as ``PromptEncoder.forward`` does, then add the task prompt.

        Arguments:
          points, boxes, masks: as in ``PromptEncoder.forward``.
          task_prompt (int or (B,) tensor): task id for all B prompts, or one per prompt.

        Returns:
          sparse embeddings (B, N, C) and dense embeddings (B, C, He, We).
        """
        sparse_bnc, dense_bchw = super().forward(points, boxes, masks)
        # Adding the zero vector of id 0 is exact in floating point, so task 0 is SAM bit for bit.
        return sparse_bnc, dense_bchw + self.task_embedding(task_prompt)
