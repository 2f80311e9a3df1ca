"""jobs/bench_gpu.py --smoke: the GPU benchmark runs end to end at toy sizes on a CPU and says where it ran."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECONDS, MIB = r"\d+\.\d+", r"[\d,]+ \(RSS\)"


def rows(report: str, first: str) -> list[list[str]]:
    """The cells of the table rows whose first cell starts with `first`."""
    return [[c.strip() for c in line.split("|")[1:-1]] for line in report.splitlines()
            if line.startswith(f"| {first}")]


def test_bench_gpu_smoke_writes_a_report(tmp_path):
    out = tmp_path / "gpu.md"
    subprocess.run([sys.executable, str(REPO / "jobs" / "bench_gpu.py"), "--smoke", "--device", "cpu", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=900)
    report = out.read_text()
    assert "ran on CPU" in report and "out of memory" not in report and "does not fit" not in report
    for name in ("tiny base", "tiny tsr", "tiny ssr", "toy UNet3D", "toy Wan transformer", "toy LTX transformer"):
        for precision in ("fp32", "bf16"):
            cells = [r for r in rows(report, name) if r[1] == precision]
            assert [r[2] for r in cells] == ["1", "2", "guided, 1 row"], (name, precision)
            assert all(re.fullmatch(SECONDS, r[3]) and re.fullmatch(MIB, r[4]) for r in cells[:2]), cells
            assert re.fullmatch(f"sequential {SECONDS} / batched {SECONDS}", cells[2][3]), cells[2]
            assert re.fullmatch(f"SDPA {SECONDS} / math {SECONDS}", cells[2][6]), cells[2]
    vae = rows(report, "toy Wan VAE")
    assert [r[0].rsplit(", ", 1)[1] for r in vae] == ["plain", "enable_tiling()", "enable_slicing()"]
    assert all(r[1:3] == ["fp32", "2"] and re.fullmatch(SECONDS, r[3]) and re.fullmatch(MIB, r[4]) for r in vae), vae
    e2e = rows(report, "tiny, 8 frames")  # the end-to-end edit, per precision
    assert [r[1] for r in e2e] == ["fp32", "bf16"] and all(re.fullmatch(SECONDS, r[2]) for r in e2e), e2e
    clips = rows(report, "tiny clip of")  # 1x / 2x / 4x the tiny cascade's 8 output frames, SSR chunks of 8
    assert [(r[0].split()[3], r[1]) for r in clips] == [("8", "1"), ("16", "2"), ("32", "4")], clips
    assert all(re.fullmatch(SECONDS, r[2]) and re.fullmatch(MIB, r[3]) for r in clips), clips
