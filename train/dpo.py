"""Stage 3, preference tuning (DPO): image, prompt, chosen, rejected; the reference is a frozen copy of the
starting adapter (dpo_reference: init) or the LLM with its adapters disabled (base).

    accelerate launch train/dpo.py --config configs/hub/dpo.yaml [--key value ...]
    python train/dpo.py --config configs/hub/dpo.yaml [--key value ...]

Keys: `python train/dpo.py --help` and docs/training.md. The same run from Python:
``vlm_chat.training.run_stage(vlm_chat.training.load_stage_config("dpo", "configs/hub/dpo.yaml"))``.
"""

from vlm_chat.training.stages import main

if __name__ == "__main__":
    main("dpo")
