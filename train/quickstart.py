"""Stages 0 -> 3 and the evaluation, offline on CPU.

    python train/quickstart.py                 # SmolLM2-135M + easy-VQA + shapes world (recipe: vlm_chat/recipes/quickstart/)
    python train/quickstart.py --tiny --output /tmp/qs   # tiny random models, seconds
"""

from vlm_chat.training.quickstart import main

if __name__ == "__main__":
    main()
