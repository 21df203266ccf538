"""``python -m jaxenc.models.summary``: parameter counts and FLOPs from XLA's cost analysis."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jaxenc.models.summary import summarize


def test_resnet50_macs_match_the_published_figure():
    row = summarize("resnet50", sizes=(224,))
    assert row["params"] == 25_557_032
    # torchvision / fvcore: 4.09 GMACs (quoted as "4.1 GFLOPs") at 224x224, convolutions and fc.
    assert row["gmacs"][224] == pytest.approx(4.09, rel=0.01)
    # XLA's count: 2 per multiply-add, minus taps on zero padding, plus elementwise work.
    assert 1.8 * row["gmacs"][224] < row["gflops"][224] < 2.2 * row["gmacs"][224]


def test_resnest50_macs_match_the_published_figure():
    # ResNeSt paper, Table: ResNeSt-50 5.4 GFLOPs (multiply-adds) at 224.
    assert summarize("resnest50", sizes=(224,))["gmacs"][224] == pytest.approx(5.39, rel=0.01)


def test_cli_prints_a_table():
    result = subprocess.run(
        [sys.executable, "-m", "jaxenc.models.summary", "resnet18", "--sizes", "64"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "resnet18" in result.stdout and "11,689,512" in result.stdout


def test_cli_without_names_lists_models():
    result = subprocess.run(
        [sys.executable, "-m", "jaxenc.models.summary"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "resnest50" in result.stdout.split()
