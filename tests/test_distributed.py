"""train.py under torchrun: two processes on the CPU (gloo)."""

import os
import subprocess
import sys

from mnist_support import ROOT, metrics, needs_mnist, train_command


@needs_mnist
def test_torchrun_two_processes_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = train_command("--epochs", "1", "--limit-train", "1024", "--limit-test", "256", "--batch-size", "32",
                            "--out", tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *command[1:]],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    m = metrics(tmp_path)
    assert m["world_size"] == 2 and m["history"][0]["train_images"] == 1024
    assert 0 < m["test_accuracy"] <= 1
    assert result.stdout.count("test accuracy") == 1  # rank 0 alone prints
    assert "2 processes on cpu" in result.stdout.splitlines()[0]
    assert "destroy_process_group" not in result.stderr  # torch warns when a group is left up
