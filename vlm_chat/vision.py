"""The frozen vision tower: a CLIP or SigLIP vision transformer loaded through transformers' own ``from_pretrained``."""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, CLIPVisionModel, SiglipVisionModel
from transformers import logging as hf_logging

from vlm_chat.config import VisionConfig

logger = logging.getLogger(__name__)

# model_type in a checkpoint's config.json -> (vision model class, has a CLS token).
# Full dual-encoder directories and vision-only ones both load: the vision classes read the vision part of either.
_TOWERS = {
    "clip": (CLIPVisionModel, True),
    "clip_vision_model": (CLIPVisionModel, True),
    "siglip": (SiglipVisionModel, False),
    "siglip_vision_model": (SiglipVisionModel, False),
}


class VisionTower(nn.Module):
    """Patch features of one layer of a frozen CLIP/SigLIP vision encoder.

    Args:
        cfg: Which checkpoint, which layer, whether to drop the CLS token.
        dtype: Parameter dtype of the tower.
        trust_remote_code: Passed to transformers.
    """

    def __init__(self, cfg: VisionConfig, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
        super().__init__()
        model_cfg = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=trust_remote_code)
        if model_cfg.model_type not in _TOWERS:
            raise ValueError(
                f"vision tower {cfg.name_or_path!r} has model_type {model_cfg.model_type!r}; "
                f"supported: {', '.join(sorted(_TOWERS))}"
            )
        model_cls, has_cls = _TOWERS[model_cfg.model_type]
        # A full CLIPModel/SiglipModel directory also holds a text tower the vision class does not use; transformers
        # would print every unused key as a warning table. Those keys are expected here.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            self.model = model_cls.from_pretrained(cfg.name_or_path, dtype=dtype, use_safetensors=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        self.image_processor = AutoImageProcessor.from_pretrained(cfg.name_or_path)
        vcfg = self.model.config
        num_layers = vcfg.num_hidden_layers
        if not -(num_layers + 1) <= cfg.feature_layer <= num_layers:
            raise ValueError(
                f"vision.feature_layer={cfg.feature_layer} is out of range for a {num_layers}-layer tower "
                f"(valid: {-(num_layers + 1)}..{num_layers})"
            )
        self.feature_layer = cfg.feature_layer
        self.drop_cls = has_cls if cfg.drop_cls is None else cfg.drop_cls
        self.has_cls = has_cls
        self.hidden_size = vcfg.hidden_size
        self.grid = vcfg.image_size // vcfg.patch_size  # patches per side
        self.num_tokens = self.grid**2 + (1 if has_cls and not self.drop_cls else 0)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VisionTower:
        # Frozen means frozen: dropout and friends stay off even when the surrounding model trains.
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Args: pixel_values ``[B, 3, H, W]``. Returns patch features ``[B, N_patch, d_vis]``."""
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        feats = out.hidden_states[self.feature_layer]  # [B, (1 +) grid^2, d_vis]
        if self.has_cls and self.drop_cls:
            feats = feats[:, 1:]  # [B, grid^2, d_vis]
        return feats
