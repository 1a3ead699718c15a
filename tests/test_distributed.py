"""train.py under torchrun: two processes on the CPU (gloo), each running train.main inside a small
driver that reports, after main has returned or exited, whether the process group is still up."""

import os
import subprocess
import sys

from mnist_support import QUICK, ROOT, MNIST_DIR, metrics, needs_mnist

DRIVER = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import torch.distributed as dist
import train
try:
    code = train.main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(f"rank {{os.environ['RANK']}}: exit {{code}}, process group up: {{dist.is_initialized()}}", flush=True)
"""


def torchrun(tmp_path, *argv) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
         *QUICK, "--data-dir", str(MNIST_DIR), *map(str, argv)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def outcomes(result) -> list[str]:
    return sorted(line for line in result.stdout.splitlines() if line.startswith("rank "))


@needs_mnist
def test_torchrun_two_processes_on_cpu(tmp_path):
    result = torchrun(tmp_path, "--epochs", 1, "--limit-train", 1024, "--limit-test", 256, "--batch-size", 32,
                      "--no-plots", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert outcomes(result) == ["rank 0: exit 0, process group up: False", "rank 1: exit 0, process group up: False"]
    m = metrics(tmp_path / "run")
    assert m["world_size"] == 2 and m["history"][0]["train_images"] == 1024
    assert 0 < m["test_accuracy"] <= 1
    assert result.stdout.count("test accuracy") == 1  # rank 0 alone prints the run's lines
    assert "2 processes on cpu" in result.stdout.splitlines()[0]


@needs_mnist
def test_every_rank_refuses_an_output_folder_alike(tmp_path):
    """Rank 0 checks the folder and tells the others: every rank ends with the same error, none in a
    collective that rank 0 left, and the group is torn down."""
    (tmp_path / "a_file").write_text("")
    result = torchrun(tmp_path, "--epochs", 1, "--limit-train", 64, "--limit-test", 64,
                      "--out", tmp_path / "a_file" / "run")
    assert outcomes(result) == ["rank 0: exit 2, process group up: False", "rank 1: exit 2, process group up: False"]
    error = f"train.py: error: --out {tmp_path / 'a_file' / 'run'}: cannot create the output folder"
    assert result.stderr.count(error) == 2, result.stderr
    assert "Traceback" not in result.stderr and "gloo" not in result.stderr.lower(), result.stderr
