"""Mappers: patch features ``[B, N_patch, d_vis]`` -> visual tokens ``[B, N_vis, d_lm]``.

Three families, picked by name: ``mlp`` (LLaVA-1.5), ``perceiver`` (Flamingo / Idefics2 resampler) and ``qformer``
(BLIP-2 learned queries). Written on ``nn.MultiheadAttention`` so each fits on one screen.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlm_chat.config import MapperConfig


class MLPMapper(nn.Module):
    """LLaVA-style projector: optional ``pool x pool`` average pooling of the patch grid, then a GELU MLP."""

    def __init__(self, d_vis: int, d_lm: int, depth: int = 2, pool: int = 1, grid: int | None = None):
        super().__init__()
        if depth < 1:
            raise ValueError(f"mapper.depth must be >= 1, got {depth}")
        if pool < 1:
            raise ValueError(f"mapper.pool must be >= 1, got {pool}")
        if pool > 1 and (grid is None or grid % pool):
            raise ValueError(f"mapper.pool={pool} needs a square patch grid divisible by it (grid side: {grid})")
        self.pool, self.grid = pool, grid
        layers: list[nn.Module] = [nn.Linear(d_vis, d_lm)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(d_lm, d_lm)]
        self.proj = nn.Sequential(*layers)

    def num_tokens(self, num_patches: int) -> int:
        return num_patches // (self.pool**2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool > 1:
            b, n, d = x.shape
            if n != self.grid**2:
                raise ValueError(f"mlp mapper with pooling expects {self.grid ** 2} patch tokens, got {n}")
            x = x.transpose(1, 2).reshape(b, d, self.grid, self.grid)  # [B, d_vis, g, g]
            x = F.avg_pool2d(x, self.pool)  # [B, d_vis, g/p, g/p]
            x = x.flatten(2).transpose(1, 2)  # [B, (g/p)^2, d_vis]
        return self.proj(x)  # [B, N_vis, d_lm]


class _FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))


class PerceiverMapper(nn.Module):
    """Perceiver resampler: learned latents cross-attend to the patches (and to themselves, as in Flamingo)."""

    def __init__(self, d_vis: int, d_lm: int, num_queries: int = 16, num_layers: int = 2, num_heads: int = 4,
                 hidden_size: int | None = None):
        super().__init__()
        dim = hidden_size or d_vis
        _check_heads(dim, num_heads)
        self.input_proj = nn.Linear(d_vis, dim)
        self.latents = nn.Parameter(torch.randn(num_queries, dim) / math.sqrt(dim))
        self.layers = nn.ModuleList()
        for _ in range(num_layers):
            self.layers.append(nn.ModuleDict({
                "norm_media": nn.LayerNorm(dim),
                "norm_latents": nn.LayerNorm(dim),
                "attn": nn.MultiheadAttention(dim, num_heads, batch_first=True),
                "ff": _FeedForward(dim),
            }))
        self.norm = nn.LayerNorm(dim)
        self.output_proj = nn.Linear(dim, d_lm)

    def num_tokens(self, num_patches: int) -> int:
        return self.latents.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x)  # [B, N_patch, dim]
        lat = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)  # [B, Q, dim]
        for layer in self.layers:
            media, q = layer["norm_media"](x), layer["norm_latents"](lat)
            kv = torch.cat([media, q], dim=1)  # [B, N_patch + Q, dim]: latents also attend to themselves
            lat = lat + layer["attn"](q, kv, kv, need_weights=False)[0]
            lat = lat + layer["ff"](lat)
        return self.output_proj(self.norm(lat))  # [B, Q, d_lm]


class QFormerMapper(nn.Module):
    """BLIP-2-style querying transformer: per block, queries self-attend, then cross-attend to the patches."""

    def __init__(self, d_vis: int, d_lm: int, num_queries: int = 16, num_layers: int = 2, num_heads: int = 4,
                 hidden_size: int | None = None):
        super().__init__()
        dim = hidden_size or d_vis
        _check_heads(dim, num_heads)
        self.queries = nn.Parameter(torch.randn(num_queries, dim) / math.sqrt(dim))
        self.media_norm = nn.LayerNorm(d_vis)
        self.media_proj = nn.Linear(d_vis, dim)
        self.layers = nn.ModuleList()
        for _ in range(num_layers):
            self.layers.append(nn.ModuleDict({
                "norm_self": nn.LayerNorm(dim),
                "self_attn": nn.MultiheadAttention(dim, num_heads, batch_first=True),
                "norm_cross": nn.LayerNorm(dim),
                "cross_attn": nn.MultiheadAttention(dim, num_heads, batch_first=True),
                "ff": _FeedForward(dim),
            }))
        self.norm = nn.LayerNorm(dim)
        self.output_proj = nn.Linear(dim, d_lm)

    def num_tokens(self, num_patches: int) -> int:
        return self.queries.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        media = self.media_proj(self.media_norm(x))  # [B, N_patch, dim]
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)  # [B, Q, dim]
        for layer in self.layers:
            h = layer["norm_self"](q)
            q = q + layer["self_attn"](h, h, h, need_weights=False)[0]
            h = layer["norm_cross"](q)
            q = q + layer["cross_attn"](h, media, media, need_weights=False)[0]
            q = q + layer["ff"](q)
        return self.output_proj(self.norm(q))  # [B, Q, d_lm]


class PatchPositions(nn.Module):
    """Any mapper with a learned embedding per input token added to the features first (``position_embedding``).

    Zero at the start, so a mapper begins as it would without it. Each input token (a CLS token kept by the tower
    included) gets its own vector: a linear read of the demo recipe's tower at layer -2 cannot tell a patch token's
    quadrant (chance), so the visual tokens would otherwise not say where in the picture they come from.
    """

    def __init__(self, mapper: nn.Module, num_inputs: int, d_vis: int):
        super().__init__()
        self.mapper = mapper
        self.positions = nn.Parameter(torch.zeros(num_inputs, d_vis))

    def num_tokens(self, num_patches: int) -> int:
        return self.mapper.num_tokens(num_patches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.positions.shape[0]:
            raise ValueError(f"mapper.position_embedding has {self.positions.shape[0]} positions, got {x.shape[1]} tokens")
        return self.mapper(x + self.positions.to(x.dtype))  # [B, N, d_vis] + [N, d_vis]


def _check_heads(dim: int, num_heads: int) -> None:
    if num_heads < 1 or dim % num_heads:
        raise ValueError(f"mapper.num_heads={num_heads} must divide the mapper width {dim}")


MAPPERS = {"mlp": MLPMapper, "perceiver": PerceiverMapper, "qformer": QFormerMapper}


def build_mapper(cfg: MapperConfig, d_vis: int, d_lm: int, grid: int | None = None,
                 num_inputs: int | None = None) -> nn.Module:
    """Build the mapper named by ``cfg.kind``.

    Args:
        cfg: Mapper configuration.
        d_vis: Width of the vision features.
        d_lm: Hidden size of the language model.
        grid: Patches per side of the vision tower (needed for MLP pooling).
        num_inputs: Tokens the tower gives per image (needed for ``cfg.position_embedding``).

    Raises:
        ValueError: unknown ``cfg.kind`` (the message lists the valid names) or inconsistent sizes.
    """
    if cfg.kind not in MAPPERS:
        raise ValueError(f"unknown mapper {cfg.kind!r}; valid mappers: {', '.join(MAPPERS)}")
    if cfg.kind == "mlp":
        mapper = MLPMapper(d_vis, d_lm, depth=cfg.depth, pool=cfg.pool, grid=grid)
    else:
        mapper = MAPPERS[cfg.kind](d_vis, d_lm, num_queries=cfg.num_queries, num_layers=cfg.num_layers,
                                   num_heads=cfg.num_heads, hidden_size=cfg.hidden_size)
    if not cfg.position_embedding:
        return mapper
    if not num_inputs:
        raise ValueError("mapper.position_embedding needs the number of tokens the vision tower gives (num_inputs)")
    return PatchPositions(mapper, num_inputs, d_vis)
