"""One short, prepared check of --device cuda, for a machine with a GPU (not part of CI).

Run: python scripts/cuda_check.py [--out DIR]
Compares inspect on the sample CNN between CPU and CUDA and runs one epoch of PER training on CUDA.
Exits 0 when every check passes, 1 otherwise, and 0 with a note where there is no CUDA device.

What should agree: moments, min/max and zero fractions are accumulated in float64 over the same
values (up to cuDNN's float32 rounding of the convolutions), so they match to ~1e-5 relative.
PER and the distances use a reservoir drawn with the device's generator, a different uniform sample
on CUDA, so they agree within sampling noise (a few W1 floors), not exactly.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_checkpoints" / "digits_cnn.pt"


def perdiag(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "perdiag", *args], check=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="folder for the CSVs and the trained checkpoint")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to check")
        return 0
    out = args.out or Path(tempfile.mkdtemp(prefix="perdiag-cuda-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    t_cpu = perdiag("inspect", str(SAMPLE), "--device", "cpu", "--csv", str(out / "cpu.csv"), "-q")
    t_gpu = perdiag("inspect", str(SAMPLE), "--device", "cuda", "--csv", str(out / "cuda.csv"), "-q")
    cpu, gpu = (pd.read_csv(out / name).set_index("layer") for name in ("cpu.csv", "cuda.csv"))
    failures = []
    if list(cpu.index) != list(gpu.index):
        failures.append(f"layers differ: {list(cpu.index)} vs {list(gpu.index)}")
    for column in ("mean", "std", "min", "max", "frac_zero", "n_samples", "n_units"):
        gap = ((gpu[column] - cpu[column]).abs() / (cpu[column].abs() + 1e-6)).max()
        status = "ok" if gap < 1e-4 else "FAIL"
        print(f"  {column:>10}: max relative gap {gap:.2e} {status}")
        if status == "FAIL":
            failures.append(column)
    for column in ("sw1", "per", "w1"):
        gap = (gpu[column] - cpu[column]).abs().max()
        tolerance = 10 * cpu["w1_floor"].max() + 0.02
        status = "ok" if gap < tolerance else "FAIL"
        print(f"  {column:>10}: max gap {gap:.4f} (sampling tolerance {tolerance:.4f}) {status}")
        if status == "FAIL":
            failures.append(column)
    print(f"inspect wall time: cpu {t_cpu:.1f} s, cuda {t_gpu:.1f} s (process start included)")
    trained = out / "cnn_cuda.pt"
    t_train = perdiag("train", str(SAMPLE), "--per-weight", "0.1", "--epochs", "1", "--device", "cuda",
                      "--out", str(trained), "--metrics", str(out / "metrics.csv"), "-q")
    metrics = pd.read_csv(out / "metrics.csv")
    print(f"train 1 epoch on cuda: {t_train:.1f} s; val SW1 {metrics['val_sw1'].iloc[0]:.3f} -> "
          f"{metrics['val_sw1'].iloc[-1]:.3f}, val accuracy {metrics['val_accuracy'].iloc[-1]:.3f}")
    if not metrics["val_sw1"].iloc[-1] < metrics["val_sw1"].iloc[0]:
        failures.append("training on cuda did not lower val SW1")
    perdiag("inspect", str(trained), "--device", "cpu", "-q")  # a CUDA-trained checkpoint opens on the CPU
    print("CUDA-trained checkpoint inspected on the CPU: ok")
    print("FAILED: " + ", ".join(failures) if failures else "all CUDA checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
