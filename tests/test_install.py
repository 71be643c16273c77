"""Installed, not only editable: a wheel built from the tracked files ships the demo model, the quickstart's recipe
YAMLs and the example images, and its ``vlm-chat`` answers right from a directory outside the repository.

Slow (a wheel build and one demo-model load, ~1-2 min). The fresh venv reuses this environment's packages through a
``.pth`` line (plain paths: the editable install's own ``.pth`` files there are not processed), so nothing is
downloaded and the wheel is installed with ``--no-deps``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from vlm_chat.datasets import easyvqa

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("vlm_chat/demo_model/", "vlm_chat/recipes/", "vlm_chat/assets/")

pytestmark = pytest.mark.slow


def _tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
    return [p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv with the wheel installed; returns (venv bin dir, env for its commands, the wheel's file names)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # a clean copy of what git tracks: what a fresh clone builds from
    for rel in _tracked_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes((ROOT / rel).read_bytes())
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(src)], check=True, timeout=600)
    (wheel,) = wheels.glob("vlm_chat-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    vpy = venv / "bin" / "python"
    purelib = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # Install first, then reuse this environment's packages: pip would otherwise find the checkout's editable
    # vlm-chat there and call the requirement satisfied.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "--no-deps", "--no-index", "-q",
                    "--ignore-installed", str(wheel)], check=True, timeout=600)
    outer = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    (Path(purelib) / "_outer_env.pth").write_text("\n".join(dict.fromkeys(outer)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    return venv / "bin", env, names, tmp


def test_wheel_ships_the_demo_model_recipes_and_assets(installed):
    _, _, names, _ = installed
    wanted = [p for p in _tracked_files() if p.startswith(SHIPPED)]
    assert len(wanted) >= 15  # the demo model (7 + adapter + vision), 4 recipes, the example images
    assert [p for p in wanted if p not in names] == []


def test_installed_package_is_the_wheel_and_loads_its_recipes(installed):
    bin_dir, env, _, tmp = installed
    code = (
        "import vlm_chat, pathlib\n"
        "from vlm_chat.training.quickstart import CONFIG_DIR\n"
        "from vlm_chat.training.stages import load_stage_config\n"
        "from vlm_chat.training.contrastive import load_contrastive_config\n"
        "print(vlm_chat.__file__)\n"
        "print(sorted(p.name for p in CONFIG_DIR.glob('*.yaml')))\n"
        "for stage in ('pretrain', 'instruct', 'dpo'):\n"
        "    print(stage, load_stage_config(stage, CONFIG_DIR / f'{stage}.yaml').train.max_steps)\n"
        "print('contrastive', load_contrastive_config(CONFIG_DIR / 'contrastive.yaml').train.max_steps)\n"
    )
    proc = subprocess.run([str(bin_dir / "python"), "-c", code], capture_output=True, text=True, env=env, cwd=tmp,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(str(bin_dir.parent)), lines[0]  # the wheel's copy, not the checkout
    assert lines[1] == "['contrastive.yaml', 'dpo.yaml', 'instruct.yaml', 'pretrain.yaml']"
    assert [line.split()[0] for line in lines[2:]] == ["pretrain", "instruct", "dpo", "contrastive"]


def test_installed_vlm_chat_answers_from_outside_the_repo(installed, tmp_path):
    bin_dir, env, _, _ = installed
    # easy-VQA test images and their colour answers, from the data set's own labels.
    samples = [s for s in easyvqa.load_split("test") if s.question.startswith("what is the color of the")][:2]
    assert len(samples) == 2
    for sample in samples:
        proc = subprocess.run([str(bin_dir / "vlm-chat"), "chat", "--image", sample.image, "What color is the shape?"],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""  # a pipe, not a terminal: no progress bars, no library warnings
        assert proc.stdout.strip().lower() == sample.answer, (sample, proc.stdout)
