"""Stage 1, alignment: image-caption pairs; trains the mapper only (tower and LLM frozen).

    accelerate launch train/pretrain.py --config configs/pretrain.yaml [--key value ...]
    python train/pretrain.py --config configs/pretrain.yaml [--key value ...]

Keys: `python train/pretrain.py --help` and docs/training.md.
"""

from vlm_chat.training.stages import run

if __name__ == "__main__":
    run("pretrain")
