"""configs/hub/*.yaml (SigLIP-base + SmolLM2-360M, bf16, for GPUs) run end to end with tiny random stand-ins.

Every key of the shipped files is used as written, except the hub ids (replaced by tiny SigLIP/Llama directories that
take the same from_pretrained path), the data files, the output directories and the step/batch/worker counts.
"""

from pathlib import Path

import yaml

from vlm_chat import VLMChat
from vlm_chat.datasets.shapes import write_shapes_dataset
from vlm_chat.training import load_stage_config, run_stage

HUB = Path(__file__).resolve().parents[1] / "configs" / "hub"


def test_hub_configs_name_the_documented_models():
    pre = yaml.safe_load((HUB / "pretrain.yaml").read_text())
    assert pre["model"]["vision"]["name_or_path"] == "google/siglip-base-patch16-224"
    assert pre["model"]["lm"]["name_or_path"] == "HuggingFaceTB/SmolLM2-360M-Instruct"
    for stage in ("pretrain", "instruct", "dpo"):
        assert yaml.safe_load((HUB / f"{stage}.yaml").read_text())["mixed_precision"] == "bf16"


def test_hub_configs_train_all_stages_on_tiny_stand_ins(tmp_path, tiny_siglip_dir, tiny_smollm2_dir):
    data = tmp_path / "data"
    write_shapes_dataset(data, 4, seed=5, image_size=32, pope_per_image=0, max_turns=2)
    small = ["--max_steps", "1", "--per_device_train_batch_size", "2", "--dataloader_num_workers", "0",
             "--save_steps", "0", "--disable_tqdm", "true", "--warmup_steps", "0"]
    files = {"pretrain": "captions.jsonl", "instruct": "conversations.json", "dpo": "preferences.jsonl"}
    previous = None
    for stage in ("pretrain", "instruct", "dpo"):
        argv = ["--output_dir", str(tmp_path / stage), "--train_file", str(data / files[stage]), *small]
        if stage == "pretrain":
            argv += ["--model.vision.name_or_path", str(tiny_siglip_dir), "--model.lm.name_or_path", str(tiny_smollm2_dir)]
        else:
            argv += ["--init_from", str(previous)]
        result = run_stage(load_stage_config(stage, HUB / f"{stage}.yaml", argv=argv))
        assert result.global_step == 1
        previous = result.final_dir
    chat = VLMChat.from_pretrained(previous)
    assert chat.config.system_prompt == "" and chat.config.mapper.pool == 2
    assert isinstance(chat.generate(data / "images" / "shapes_5_0.png", "What color?", max_new_tokens=3), str)
