"""Stage 3, preference tuning (DPO): image, prompt, chosen, rejected; the reference is the same model with its adapters disabled.

    accelerate launch train/dpo.py --config configs/dpo.yaml [--key value ...]
    python train/dpo.py --config configs/dpo.yaml [--key value ...]

Keys: `python train/dpo.py --help` and docs/training.md.
"""

from vlm_chat.training.stages import run

if __name__ == "__main__":
    run("dpo")
