"""Stage 2, visual instruction tuning: conversations; trains the mapper and LoRA with separate learning rates.

    accelerate launch train/instruct.py --config configs/instruct.yaml [--key value ...]
    python train/instruct.py --config configs/instruct.yaml [--key value ...]

Keys: `python train/instruct.py --help` and docs/training.md.
"""

from vlm_chat.training.stages import run

if __name__ == "__main__":
    run("instruct")
