"""``python -m train.evaluate`` on a recognition run, end to end: top-1/top-5 printed and written,
exit code 0 (it used to end in a KeyError on the segmentation metric)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import tiny_cls
from train.trainer import train_and_evaluate

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cli_recognition_exits_zero(tmp_path):
    config = tiny_cls.get_config()
    config.train.num_steps = 2
    config.optim.warmup_steps = 1
    config.train.eval_every = 2
    config.train.sample_predictions = 0
    workdir = tmp_path / "run"
    train_and_evaluate(config, workdir)
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAXENC_NO_PROGRESS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [
        sys.executable,
        "-m",
        "train.evaluate",
        "--config",
        "configs/tiny_cls.py",
        "--checkpoint",
        str(workdir),
        "--outdir",
        str(tmp_path / "eval"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "top-1" in proc.stdout and "Traceback" not in proc.stderr
    out = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert 0.0 <= out["top1"] <= out["top5"] <= 1.0
