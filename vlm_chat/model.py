"""The VLM as one ``nn.Module``: vision tower -> mapper -> visual tokens scattered into the LLM's input embeddings."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlm_chat.prompting import IGNORE_INDEX

logger = logging.getLogger(__name__)


@dataclass
class VLMOutput:
    """What a forward pass returns.

    Attributes:
        loss: Mean cross-entropy over supervised tokens (None without labels).
        loss_sum: Summed cross-entropy, for callers that normalise over several batches or processes.
        num_tokens: Number of supervised tokens.
        logps: ``[B]`` summed log-probabilities of each sample's supervised tokens (for DPO).
        logits: ``[B, V]`` next-token logits at the last position (only without labels).
    """

    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None
    logps: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class VLMModel(nn.Module):
    """Frozen vision tower + trainable mapper + (LoRA-adapted) causal LM.

    Args:
        vision: A :class:`~vlm_chat.vision.VisionTower`.
        mapper: Module mapping ``[B, N_patch, d_vis]`` to ``[B, N_vis, d_lm]``.
        lm: The causal LM, usually a ``peft.PeftModel``.
        image_token_id: Id of the placeholder token whose embeddings the visual tokens replace.
    """

    def __init__(self, vision: nn.Module, mapper: nn.Module, lm: nn.Module, image_token_id: int):
        super().__init__()
        self.vision = vision
        self.mapper = mapper
        self.lm = lm
        self.image_token_id = image_token_id

    # The CausalLM under the PEFT wrapper (LoRA layers are injected in place, so calling it uses them).
    @property
    def causal_lm(self) -> nn.Module:
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def configure_trainable(self, mapper: bool = True, lora: bool = True) -> dict[str, int]:
        """The one place that decides what trains. The tower and the LLM's base weights are always frozen.

        Returns:
            Parameter counts per part, as logged.
        """
        self.vision.requires_grad_(False)
        self.mapper.requires_grad_(mapper)
        trained = {id(p) for p in self.lora_parameters()}
        for p in self.lm.parameters():
            p.requires_grad_(lora and id(p) in trained)
        counts = {
            "vision (frozen)": sum(p.numel() for p in self.vision.parameters()),
            "mapper" + ("" if mapper else " (frozen)"): sum(p.numel() for p in self.mapper.parameters()),
            "lora" + ("" if lora else " (frozen)"): sum(p.numel() for p in self.lora_parameters()),
            "lm base (frozen)": sum(p.numel() for n, p in self.lm.named_parameters() if "lora_" not in n),
        }
        logger.info("trainable setup: %s", ", ".join(f"{k}={v:,}" for k, v in counts.items()))
        return counts

    def lora_parameters(self) -> list[nn.Parameter]:
        """The weights of the trained LoRA adapter (PEFT's ``default``; a frozen DPO reference copy is not one)."""
        return [p for n, p in self.lm.named_parameters() if "lora_" in n and ".default." in n]

    def encode_images(self, pixel_values: torch.Tensor | None = None,
                      image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Pixels (or cached tower features) -> visual tokens ``[B_img, N_vis, d_lm]``."""
        if image_features is None:
            image_features = self.vision(pixel_values)  # [B_img, N_patch, d_vis]
        param = next(self.mapper.parameters())
        return self.mapper(image_features.to(param.dtype))  # [B_img, N_vis, d_lm]

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the visual tokens scattered into the image-token positions.

        Raises:
            ValueError: the number of image-token positions differs from the number of visual tokens.
        """
        embeds = self.lm.get_input_embeddings()(input_ids)  # [B, T, d_lm]
        mask = input_ids == self.image_token_id  # [B, T]
        n_text = int(mask.sum())
        if pixel_values is None and image_features is None:
            if n_text:
                raise ValueError(f"the input holds {n_text} image tokens but no image was given")
            return embeds
        visual = self.encode_images(pixel_values, image_features)  # [B_img, N_vis, d_lm]
        n_visual = visual.shape[0] * visual.shape[1]
        if n_text != n_visual:
            raise ValueError(
                f"image features and image tokens do not match: the text holds {n_text} image tokens, the images give "
                f"{visual.shape[0]} x {visual.shape[1]} = {n_visual} visual tokens"
            )
        return embeds.masked_scatter(mask.unsqueeze(-1), visual.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> VLMOutput:
        """Loss (with labels) or last-position logits (without).

        ``attention_mask`` is ``[B, T]`` (1 = token, 0 = padding) or a boolean ``[B, 1, T, T]`` (True = the query may
        see the key) with explicit ``position_ids``, as ``VLMProcessor.pad`` makes for independent turns.
        The LM head, the largest matmul of a small LLM (vocab x hidden per position), runs only where a label exists
        or, without labels, at the last position.
        """
        embeds = self.embed(input_ids, pixel_values, image_features)
        if attention_mask is not None and attention_mask.dim() == 4:
            if position_ids is None:
                raise ValueError("a 4D attention_mask needs position_ids")
            # transformers takes a 4D mask as is; an additive float one suits both the eager and the SDPA kernels.
            blocked = torch.finfo(embeds.dtype).min
            attention_mask = torch.zeros(attention_mask.shape, dtype=embeds.dtype, device=embeds.device).masked_fill(
                ~attention_mask.bool(), blocked
            )
        elif attention_mask is not None and position_ids is None:
            # Right or left padding alike: positions count real tokens only.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        causal_lm = self.causal_lm
        hidden = causal_lm.get_decoder()(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # [B, T, d_lm]
        head = causal_lm.get_output_embeddings()
        if labels is None:
            return VLMOutput(logits=head(hidden[:, -1]).float())  # [B, V]
        targets = labels[:, 1:]  # [B, T-1]: position t predicts token t+1
        selected = targets != IGNORE_INDEX
        logits = head(hidden[:, :-1][selected]).float()  # [n_sup, V]
        token_nll = F.cross_entropy(logits, targets[selected], reduction="none")  # [n_sup]
        rows = selected.nonzero()[:, 0]  # sample of each supervised token
        logps = torch.zeros(input_ids.shape[0], device=logits.device).index_add(0, rows, -token_nll)  # [B]
        num_tokens = selected.sum()
        loss_sum = token_nll.sum()
        return VLMOutput(loss=loss_sum / num_tokens.clamp(min=1), loss_sum=loss_sum, num_tokens=num_tokens, logps=logps)
