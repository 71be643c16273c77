"""Analytic FLOP counts of one training step, so achieved FLOP/s can be compared with a plain matmul (MFU).

Counting rules (2 FLOPs per multiply-add; norms, activations, softmax, the optimizer and other elementwise work are
left out, as in the usual "model FLOPs" convention):

- a frozen linear layer ``[d_in -> d_out]`` on ``T`` tokens: forward ``2 T d_in d_out`` plus the gradient with respect
  to its input ``2 T d_in d_out`` (no weight gradient): ``4 T d_in d_out``;
- a trained linear layer (LoRA's A and B, the mapper): forward + input gradient + weight gradient, ``6 T d_in d_out``;
- attention scores and the weighted sum, per layer: ``4 B T^2 d`` forward (the full ``T x T`` square, as PaLM's MFU
  counts it, although the causal kernel skips half), twice that backward;
- the LM head only where it runs: our model applies it at supervised positions only, HF Llava at every position;
- the frozen vision tower: forward only (it runs under ``no_grad``).

This is finer than ``6 N T``, which would count weight gradients for frozen base weights that LoRA never computes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LMShape:
    """The sizes of a Llama-style decoder that the count needs (read off a transformers config)."""

    hidden: int
    intermediate: int
    layers: int
    kv_dim: int  # num_key_value_heads * head_dim
    vocab: int

    @classmethod
    def from_config(cls, cfg) -> LMShape:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, kv_heads * head_dim, cfg.vocab_size)

    def linears(self) -> list[tuple[int, int]]:
        """``(d_in, d_out)`` of the adapted projections of one layer: q, k, v, o, gate, up, down."""
        d, f, kv = self.hidden, self.intermediate, self.kv_dim
        return [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]


def lm_train_flops(shape: LMShape, batch: int, seq: int, head_positions: int, lora_r: int) -> float:
    """FLOPs of forward + backward of a LoRA-adapted decoder on ``batch x seq`` positions (padding included).

    Args:
        shape: Decoder sizes.
        batch: Sequences in the batch.
        seq: Padded sequence length.
        head_positions: Positions where the LM head runs (supervised positions, or every position).
        lora_r: LoRA rank on every projection (0: no LoRA).
    """
    tokens = batch * seq
    per_layer = 0.0
    for d_in, d_out in shape.linears():
        per_layer += 4 * tokens * d_in * d_out  # frozen base weight
        per_layer += 6 * tokens * lora_r * (d_in + d_out)  # LoRA A [d_in -> r] and B [r -> d_out], trained
    per_layer += 3 * 4 * batch * seq * seq * shape.hidden  # attention: forward 4 B T^2 d, backward twice that
    head = 4 * head_positions * shape.hidden * shape.vocab  # tied head, frozen: forward + input gradient
    return shape.layers * per_layer + head


def vit_forward_flops(vcfg, images: int) -> float:
    """Forward FLOPs of a CLIP/SigLIP vision transformer on ``images`` images."""
    d, f, layers = vcfg.hidden_size, vcfg.intermediate_size, vcfg.num_hidden_layers
    patches = (vcfg.image_size // vcfg.patch_size) ** 2
    tokens = patches + 1  # CLIP's CLS (SigLIP has none; one token is noise in this count)
    embed = 2 * patches * 3 * vcfg.patch_size**2 * d
    per_layer = 2 * tokens * (4 * d * d + 2 * d * f) + 4 * tokens * tokens * d
    return images * (embed + layers * per_layer)


def mapper_train_flops(num_params: int, images: int, patches: int) -> float:
    """Trained mapper: ``6 x parameters x patch tokens`` per image (exact for the MLP; an estimate for the
    perceiver and Q-Former, whose latents see every patch through attention)."""
    return 6.0 * num_params * images * patches
