"""The benchmark's calibration and option choice (fine_tune.commands.bench_report): bounded in
time whatever the CPU, and bf16 chosen for mode e only where it measured faster."""

import time

from fine_tune.commands import bench_report as R


def test_calibration_takes_about_a_second():
    t = time.perf_counter()
    calibration = R.calibrate()
    # bounded by its own time budget (about a second; 10 s leaves room for a busy machine): a
    # 2048 x 2048 emulated bf16 product alone takes minutes
    assert time.perf_counter() - t < 10.0
    for precision in ("fp32", "bf16"):
        assert calibration[precision]["flops"] > 1e8 and calibration[precision]["n"] >= 256


def test_best_options_follow_the_measurement():
    slow_bf16 = {"fp32": {"flops": 100e9}, "bf16": {"flops": 20e9}}  # emulated: AVX2 only
    fast_bf16 = {"fp32": {"flops": 100e9}, "bf16": {"flops": 600e9}}  # AMX
    assert R.choose_best(slow_bf16, on_gpu=False)[0] == "fused"
    assert "0.20x" in R.choose_best(slow_bf16, on_gpu=False)[1]
    assert R.choose_best(fast_bf16, on_gpu=False)[0] == "bf16,fused"
    assert R.choose_best(None, on_gpu=True)[0] == "bf16,fused"


def test_cpu_features_name_the_kernel_level():
    features = R.cpu_features()
    assert features["torch_cpu_capability"]  # e.g. AVX2, AVX512
    assert set(features["bf16_matrix_units"]) <= set(R.BF16_FLAGS)
