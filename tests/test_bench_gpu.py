"""jobs/bench_gpu.py --smoke: the GPU benchmark runs end to end at toy sizes on a CPU and says where it ran."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_gpu_smoke_writes_a_report(tmp_path):
    out = tmp_path / "gpu.md"
    subprocess.run([sys.executable, str(REPO / "jobs" / "bench_gpu.py"), "--smoke", "--device", "cpu", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=900)
    report = out.read_text()
    assert "ran on CPU" in report
    for name in ("tiny base", "tiny tsr", "tiny ssr", "toy UNet3D"):
        assert sum(name in line and "| fp32 |" in line for line in report.splitlines()) == 3  # batch 1, 2, guided
        assert sum(name in line and "| bf16 |" in line for line in report.splitlines()) == 3
    assert "sequential" in report and "SDPA" in report
    assert sum("| tiny, 8 frames" in line for line in report.splitlines()) == 2  # the end-to-end edit, per precision
