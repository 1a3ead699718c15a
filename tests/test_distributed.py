"""train.py under torchrun: two processes on the CPU (gloo), each running train.main inside a small
driver that writes, once main has returned or exited, a report of its own (a file per rank, so
that no two processes' output can run together): the exit code, whether the process group is
still up, whether any of gloo's threads still run, where the training loop stopped and how many
checkpoints the rank wrote.

Each way out, an error every rank reaches, a finished run and SIGTERM, is run several times while a
busy process competes for the two cores: a rank that leaves the group in disorder (gloo's threads
left to the interpreter's exit, where their teardown aborts the process now and then) fails every
run through the thread count, not only the unlucky one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from mnist_support import QUICK, ROOT, MNIST_DIR, metrics, needs_mnist
from torchcnn.mnist import data

DRIVER = f"""
import json, os, sys
sys.path.insert(0, {str(ROOT)!r})
import torch.distributed as dist
import train
from torchcnn.mnist import checkpoint, engine

stops, saves = [], []
train_epoch, save = engine.train_epoch, checkpoint.save

def recorded_train_epoch(*args, **kwargs):
    totals, step = train_epoch(*args, **kwargs)
    stops.append(step)
    return totals, step

def recorded_save(state, path):
    saves.append(os.path.basename(path))
    return save(state, path)

engine.train_epoch, checkpoint.save = recorded_train_epoch, recorded_save
argv = sys.argv[1:] + json.loads(os.environ.get(f"ARGV_RANK{{os.environ['RANK']}}", "[]"))  # the last word wins
try:
    code = train.main(argv)
except SystemExit as e:
    code = e.code
threads = []
for t in os.listdir("/proc/self/task"):
    try:
        threads.append(open(f"/proc/self/task/{{t}}/comm").read().strip())
    except OSError:  # a thread that ended meanwhile
        pass
report = {{"exit": code, "group_up": dist.is_initialized(), "gloo_threads": [t for t in threads if "gloo" in t],
          "epochs_entered": len(stops), "stopped_at": stops[-1] if stops else None, "saves": saves}}
with open(os.path.join(os.environ["REPORTS"], f"rank{{os.environ['RANK']}}.json"), "w") as f:
    json.dump(report, f)
"""

# Linux names each thread in /proc: the driver counts gloo's by name.
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")


@pytest.fixture
def busy():
    """A process that keeps a core busy for the length of the test."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield
    proc.kill()
    proc.wait()


def torchrun_command(tmp_path, *argv) -> tuple[list[str], dict]:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    reports = tmp_path / "reports"
    reports.mkdir(exist_ok=True)
    for old in reports.iterdir():
        old.unlink()
    # After a SIGTERM torchrun gives the ranks 30 s to stop before it kills them: on a machine whose
    # load the test cannot know, 10 minutes.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REPORTS": str(reports), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "600"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
               *QUICK, "--data-dir", str(MNIST_DIR), *map(str, argv)]
    return command, env


def torchrun(tmp_path, *argv, env=None) -> subprocess.CompletedProcess:
    command, base_env = torchrun_command(tmp_path, *argv)
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env={**base_env, **(env or {})},
                          cwd=ROOT)


def reports(tmp_path) -> list[dict]:
    """Each rank's report, rank 0 first; a rank that died before writing one is missing."""
    folder = tmp_path / "reports"
    return [json.loads((folder / f"rank{rank}.json").read_text())
            for rank in range(2) if (folder / f"rank{rank}.json").is_file()]


def orderly(report: dict, code: int) -> dict:
    """What a rank that left in order reports, with the fields the exit does not decide taken from
    ``report``."""
    return {**report, "exit": code, "group_up": False, "gloo_threads": []}


@needs_mnist
@pytest.mark.parametrize("run", range(2))
def test_torchrun_two_processes_on_cpu(run, built, busy, tmp_path):
    result = torchrun(tmp_path, "--epochs", 1, "--limit-train", 1024, "--limit-test", 256, "--batch-size", 32,
                      "--no-plots", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = reports(tmp_path)
    assert ranks == [orderly(r, 0) for r in ranks] and len(ranks) == 2, ranks
    assert [(r["epochs_entered"], r["stopped_at"]) for r in ranks] == [(1, 16)] * 2  # 1024 / (2 × 32) steps
    assert ranks[0]["saves"] == ["last.pt", "best.pt"] and ranks[1]["saves"] == []
    m = metrics(tmp_path / "run")
    assert m["world_size"] == 2 and m["history"][0]["train_images"] == 1024
    assert 0 < m["test_accuracy"] <= 1
    assert result.stdout.count("test accuracy") == 1  # rank 0 alone prints the run's lines
    assert "2 processes on cpu" in result.stdout.splitlines()[0]


@needs_mnist
def test_every_rank_refuses_an_output_folder_alike(busy, tmp_path):
    """Rank 0 checks the folder and tells the others: every rank ends with the same error and exit
    code 2, none in a collective that rank 0 left, and the group torn down, gloo's threads joined,
    before the interpreter exits. Twenty times over, under load."""
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "run"
    error = f"train.py: error: --out {out}: cannot create the output folder"
    for run in range(20):
        result = torchrun(tmp_path, "--epochs", 1, "--limit-train", 64, "--limit-test", 64, "--out", out)
        ranks = reports(tmp_path)
        context = f"run {run + 1}: {ranks}\n{result.stderr}"
        assert result.returncode == 0 and len(ranks) == 2, context  # the drivers exit 0 once they report
        assert ranks == [orderly(r, 2) for r in ranks] and all(r["saves"] == [] for r in ranks), context
        assert result.stderr.count(error) == 2, context
        assert "Traceback" not in result.stderr and "terminate called" not in result.stderr, context


@needs_mnist
def test_an_error_of_one_rank_ends_every_rank(busy, tmp_path):
    """Rank 1 alone cannot find the data: both ranks end with its error and exit 2, neither waits in
    a collective the other never reaches (rank 0 would otherwise go on to DistributedDataParallel's
    broadcasts, and rank 1 to the barrier at the end)."""
    nowhere = tmp_path / "nowhere"
    result = torchrun(tmp_path, "--epochs", 1, "--limit-train", 64, "--limit-test", 64, "--out", tmp_path / "run",
                      env={"ARGV_RANK1": json.dumps(["--data-dir", str(nowhere)])})
    ranks = reports(tmp_path)
    context = f"{ranks}\n{result.stderr}"
    assert len(ranks) == 2 and ranks == [orderly(r, 2) for r in ranks], context
    # Counted, not split into lines: the ranks share stderr, and neither owns a line of it.
    error = f"train.py: error: MNIST not found: looked for {', '.join(data.FILES)} (plain or .gz) in {nowhere},"
    assert result.stderr.count(error) == 2, context
    assert not (tmp_path / "run").exists()


@needs_mnist
@pytest.mark.parametrize("run", range(2))
def test_sigterm_stops_every_rank_at_the_same_step(run, built, busy, tmp_path):
    """SIGTERM to torchrun, which passes it on to every rank: the ranks agree on where to stop,
    rank 0 alone saves, once, and every rank exits 143 with the group torn down. The signal is sent
    once the first epoch is reported, so that the run has something to save."""
    command, env = torchrun_command(tmp_path, "--epochs", 50, "--schedule", "step", "--limit-train", 1280,
                                    "--limit-test", 64, "--batch-size", 32, "--no-plots", "--out", tmp_path / "run")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch  1/50"):
            break
    else:
        proc.wait()
        pytest.fail("no epoch was reported:\n" + "".join(lines) + proc.stderr.read())
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    out = "".join(lines) + out
    ranks = reports(tmp_path)
    context = f"{ranks}\n{out}\n{err}"
    assert len(ranks) == 2 and ranks == [orderly(r, 143) for r in ranks], context
    stop = {(r["epochs_entered"], r["stopped_at"]) for r in ranks}
    assert len(stop) == 1, context
    (epoch, step), = stop
    assert step in (10, 20), context  # ranks compare notes every 10 steps and at each epoch's end
    assert ranks[1]["saves"] == [], context
    finished, saved = (epoch - 1, "interrupted.pt") if step < 20 else (epoch, "last.pt")
    saves = ranks[0]["saves"]
    assert saves.count("last.pt") == finished and saves.count("interrupted.pt") == (saved == "interrupted.pt"), context
    assert f"continue with: python train.py --resume {tmp_path / 'run' / saved}" in out, context
    assert "terminate called" not in err, context
