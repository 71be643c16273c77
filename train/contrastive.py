"""Stage 0, contrastive: train a CLIP or SigLIP dual encoder on image-caption pairs (clip | siglip | triplet loss).

    accelerate launch train/contrastive.py --config configs/contrastive.yaml [--key value ...]
    python train/contrastive.py --config configs/contrastive_tiny.yaml [--key value ...]

Writes a standard transformers CLIPModel/SiglipModel directory (with processor and tokenizer) to OUTPUT_DIR/final.
Keys: `python train/contrastive.py --help` and docs/training.md.
"""

from vlm_chat.training.contrastive import main

if __name__ == "__main__":
    main()
