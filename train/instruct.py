"""Stage 2, visual instruction tuning: conversations; trains the mapper and LoRA with separate learning rates.

    accelerate launch train/instruct.py --config configs/hub/instruct.yaml [--key value ...]
    python train/instruct.py --config configs/hub/instruct.yaml [--key value ...]

Keys: `python train/instruct.py --help` and docs/training.md. The same run from Python:
``vlm_chat.training.run_stage(vlm_chat.training.load_stage_config("instruct", "configs/hub/instruct.yaml"))``.
"""

from vlm_chat.training.stages import main

if __name__ == "__main__":
    main("instruct")
