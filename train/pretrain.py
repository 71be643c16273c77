"""Stage 1, alignment: image-caption pairs; trains the mapper only (tower and LLM frozen).

    accelerate launch train/pretrain.py --config configs/hub/pretrain.yaml [--key value ...] [--model.lm.lora_r 8 ...]
    python train/pretrain.py --config configs/hub/pretrain.yaml [--key value ...]

Keys: `python train/pretrain.py --help` and docs/training.md. The same run from Python:
``vlm_chat.training.run_stage(vlm_chat.training.load_stage_config("pretrain", "configs/hub/pretrain.yaml"))``.
"""

from vlm_chat.training.stages import main

if __name__ == "__main__":
    main("pretrain")
