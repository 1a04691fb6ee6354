"""bench/gpu_proof.py's plumbing on CPU: its paths run as parallel processes, the SIGKILL path
kills a whole run and resumes it, the accumulation and resume figures are measured, and the
last thing printed is the markdown table. (ZeRO-2 on CPU is also a smoke path, left out here
for time: tests/test_topologies.py covers ZeRO on CPU.)"""

import subprocess
import sys

from conftest import ENV, ROOT


def test_cpu_smoke_paths_run_and_end_with_the_table(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_proof.py"), "--cpu-smoke", "--paths",
                           "fp32,accumulation,sigkill", "--work_dir", str(tmp_path), "--timeout", "300"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-5:-3] == ["| path | result | figure |", "|---|---|---|"]  # the table is the last output
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in lines[-3:]}
    assert set(rows) == {"fp32", "accumulation", "sigkill"}
    assert all(result == "ran" for result, _ in rows.values()), rows
    assert "final/ reloads" in rows["fp32"][1]
    accumulation = float(rows["accumulation"][1].split("differ by ")[1].split()[0])
    assert accumulation < 1e-4
    assert "killed (whole tree) after step" in rows["sigkill"][1]
    assert float(rows["sigkill"][1].split("differ by ")[1].split()[0]) < 1e-4
    # the resumed run finished where the killed one stopped, and wrote final/
    assert (tmp_path / "sigkill" / "final" / "model.safetensors").exists()


def test_unknown_path_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_proof.py"), "--cpu-smoke", "--paths", "fsdp2",
                           "--work_dir", str(tmp_path)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --paths fsdp2")
