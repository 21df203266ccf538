"""impl="auto": a Pallas kernel only where kernels/verified.json records it verified and faster."""

from __future__ import annotations

import types

import jax
import pytest

from jaxenc.kernels import _common
from jaxenc.kernels._common import kernel_is_verified, resolve_impl, verified_records

H200 = "NVIDIA H200"
RECORD = {
    "op": "encoding",
    "backend": "triton",
    "device_kind": H200,
    "jax": "0.11.2",
    "verified": True,
    "speedup_fwd": 1.7,
    "speedup_fwd_bwd": 1.3,
}


def test_shipped_record_file_is_well_formed():
    for rec in verified_records():
        assert {
            "op",
            "backend",
            "device_kind",
            "jax",
            "verified",
            "speedup_fwd",
            "speedup_fwd_bwd",
        } <= set(rec)
        assert rec["op"] in ("encoding", "involution")


@pytest.mark.parametrize(
    "change, expected",
    [
        ({}, True),
        ({"device_kind": "NVIDIA A100-SXM4-80GB"}, False),
        ({"jax": "0.12.0"}, False),
        ({"jax": "0.11.0"}, True),
        ({"verified": False}, False),
        ({"speedup_fwd_bwd": 0.9}, False),
        ({"speedup_fwd": 1.0}, False),
        ({"op": "involution"}, False),
    ],
)
def test_kernel_is_verified_needs_a_matching_faster_record(change, expected):
    records = ({**RECORD, **change},)
    assert kernel_is_verified("encoding", H200, "0.11.2", records=records) is expected


def test_no_record_means_xla():
    assert not kernel_is_verified("encoding", H200, "0.11.2", records=())


def _fake_gpu(monkeypatch, records):
    monkeypatch.setattr(_common.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(
        _common.jax, "devices", lambda *a: [types.SimpleNamespace(device_kind=H200)]
    )
    monkeypatch.setattr(_common, "verified_records", lambda: records)


def test_auto_on_an_unrecorded_gpu_is_xla(monkeypatch):
    _fake_gpu(monkeypatch, ())
    assert resolve_impl("auto", False, "t", "encoding") == "xla"
    assert resolve_impl("pallas", False, "t", "encoding") == "pallas"  # still available
    assert (
        resolve_impl("auto", True, "t", "encoding") == "pallas"
    )  # interpreting asks for the kernel


def test_auto_on_a_recorded_gpu_is_pallas(monkeypatch):
    _fake_gpu(monkeypatch, ({**RECORD, "jax": jax.__version__},))
    assert resolve_impl("auto", False, "t", "encoding") == "pallas"
    assert resolve_impl("auto", False, "t", "involution") == "xla"


def test_auto_on_cpu_ignores_records(monkeypatch):
    monkeypatch.setattr(
        _common,
        "verified_records",
        lambda: ({**RECORD, "jax": jax.__version__, "device_kind": "cpu"},),
    )
    assert resolve_impl("auto", False, "t", "encoding") == "xla"
