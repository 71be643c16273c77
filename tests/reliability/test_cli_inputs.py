"""The command line on odd and bad input: odd images and unicode questions answer as the API does; bad input and
damaged checkpoints give exit status 2 and exactly one clear line on stderr, never a traceback."""

from __future__ import annotations

import pytest

from reliability.inputs import CHECKPOINT_DAMAGE, damaged_copy, edit_config
from vlm_chat.cli import main as cli_main


def _cli(capsys, *argv):
    code = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_reads_odd_images_and_unicode_questions(capsys, ckpt, chat, files):
    question = "Что это? 🎨 这是什么"
    code, out, err = _cli(capsys, "chat", "--model", ckpt, "--image", files["png16"], question, "--max-new-tokens", 4)
    assert code == 0, err
    assert out == chat.generate(files["png16"], question, max_new_tokens=4, do_sample=False) + "\n"
    code, out, err = _cli(capsys, "caption", files["exif"], "--model", ckpt, "--max-new-tokens", 4)
    assert code == 0 and out == chat.caption(files["exif"], max_new_tokens=4, do_sample=False) + "\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["chat", "--image", "__truncated__", "What?"], "truncated.png: image data is corrupt or truncated"),
        (["caption", "__bomb__"], "over the limit"),
        (["chat", "--image", "__png16__", "<image> and <image>"], "2 '<image>' markers"),
        (["chat", "What is <image>?"], "0 image(s) were given"),
        (["chat", "--model", "__v99__", "Hi"], "format_version 99 is not supported"),
    ],
    ids=["truncated_image", "bomb", "two_markers", "marker_without_image", "checkpoint_version_99"],
)
def test_cli_bad_input_is_one_clear_line(capsys, ckpt, files, tmp_path, argv, message):
    v99 = damaged_copy(ckpt, tmp_path, edit_config(lambda c: c.update(format_version=99)))
    swap = {"__truncated__": files["truncated"], "__bomb__": files["bomb"], "__png16__": files["png16"], "__v99__": v99}
    argv = [swap.get(a, a) for a in argv]
    if "--model" not in argv:
        argv += ["--model", ckpt]
    code, out, err = _cli(capsys, *argv)
    assert (code, out) == (2, "")
    # Loading a model may print library progress bars on stderr; our own report is exactly one line.
    ours = [line for line in err.splitlines() if line.startswith("vlm-chat")]
    assert len(ours) == 1 and ours[0].startswith(f"vlm-chat {argv[0]}: error:") and message in ours[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("case", ["no_vision_weights", "truncated_mapper", "mapper_does_not_match_config"])
def test_cli_damaged_checkpoint_is_one_clear_line(capsys, ckpt, tmp_path, files, case):
    damage, _, message = CHECKPOINT_DAMAGE[case]
    damaged = damaged_copy(ckpt, tmp_path, damage)
    code, out, err = _cli(capsys, "caption", files["png16"], "--model", damaged)
    ours = [line for line in err.splitlines() if line.startswith("vlm-chat")]
    assert (code, out) == (2, "") and "Traceback" not in err
    assert len(ours) == 1 and str(damaged) in ours[0] and message in ours[0]


