"""benchmarks/validate_real.py archive: the files the summary reads survive in reports/, weights do not."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("validate_real", ROOT / "benchmarks" / "validate_real.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_archive_keeps_summary_files_only_and_is_idempotent(tmp_path: Path) -> None:
    vr = _bench()
    case = tmp_path / "runs" / "minilm-sst2"
    files = {
        "analysis_wall.json": '{"seconds": 1}',
        "analysis/analysis.json": "{}",
        "analysis/recommendation.json": "{}",
        "validation/validation.json": "{}",
        "validation/runs/rank-1/metrics.json": "{}",
        "validation/runs/rank-1/adapter/adapter_model.safetensors": "weights",
        "validation/runs/rank-1/checkpoint/state.pt": "weights",
    }
    for rel, text in files.items():
        (case / rel).parent.mkdir(parents=True, exist_ok=True)
        (case / rel).write_text(text)
    dst = tmp_path / "reports"
    written = vr.archive(tmp_path / "runs", dst)
    kept = sorted(str(p.relative_to(dst / "minilm-sst2")) for p in written)
    assert kept == sorted(k for k in files if k.endswith(".json"))
    assert not list(dst.rglob("*.safetensors")) and not list(dst.rglob("*.pt"))
    assert vr.archive(tmp_path / "runs", dst) == []  # unchanged files are not rewritten
    (case / "validation/runs/rank-1/metrics.json").write_text('{"new": 1}')
    assert [p.name for p in vr.archive(tmp_path / "runs", dst)] == ["metrics.json"]
    assert (dst / "minilm-sst2/validation/runs/rank-1/metrics.json").read_text() == '{"new": 1}'
