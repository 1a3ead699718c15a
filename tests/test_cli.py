"""train.py's command line: every number range-checked under its own name, --help, which flags
--resume honours and which it refuses, --eval's, and errors without tracebacks; --help and argument
errors answer without torch or a build."""

import contextlib
import os
import shutil
import subprocess
import sys

import pytest
import torch
from mnist_support import ROOT, help_blocks, needs_mnist, run_train, short_run

import train
from torchcnn.mnist import checkpoint, cli, engine, model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return short_run(tmp_path_factory)


def error_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


RANGES = [
    ("--epochs", "0", "must be at least 1, got 0"),
    ("--epochs", "two", "expected a whole number, got 'two'"),
    ("--batch-size", "0", "must be at least 1, got 0"),
    ("--test-batch-size", "-3", "must be at least 1, got -3"),
    ("--lr", "-1", "must be positive, got -1"),
    ("--lr", "0", "must be positive, got 0"),
    ("--lr", "nan", "must be positive, got nan"),
    ("--step-size", "0", "must be at least 1, got 0"),
    ("--gamma", "0", "must be in (0, 1], got 0"),
    ("--gamma", "1.5", "must be in (0, 1], got 1.5"),
    ("--weight-decay", "-1", "must be at least 0, got -1"),
    ("--weight-decay", "inf", "must be at least 0, got inf"),
    ("--dropout", "1.5", "must be in [0, 1), got 1.5"),
    ("--dropout", "1", "must be in [0, 1), got 1"),
    ("--shift", "-1", "must be between 0 and 27, got -1"),
    ("--shift", "28", "must be between 0 and 27, got 28"),
    ("--label-smoothing", "1", "must be in [0, 1), got 1"),
    ("--label-smoothing", "-0.1", "must be in [0, 1), got -0.1"),
    ("--betas", "0.9 1", "must be in [0, 1), got 1"),
    ("--seed", "-1", "must be between 0 and 2**63 - 1, got -1"),
    ("--limit-train", "0", "must be at least 1, got 0"),
    ("--limit-test", "-5", "must be at least 1, got -5"),
    ("--device", "tpu", "'tpu' is not a device: use auto, cpu, cuda or cuda:N"),
]


@pytest.mark.parametrize("flag, value, message", RANGES, ids=[f"{f}={v}" for f, v, _ in RANGES])
def test_each_number_is_range_checked_under_its_own_name(flag, value, message, capsys):
    line = error_of([flag, *value.split()], capsys)
    assert line == f"train.py: error: argument {flag}: {message}"


def test_every_numeric_flag_is_range_checked():
    numeric = {a.option_strings[0] for a in cli.parser()._actions if a.type is not None}
    assert numeric == {flag for flag, _, _ in RANGES}


def test_edges_of_the_ranges_are_accepted():
    args, given = cli.parse_args(["--gamma", "1", "--dropout", "0", "--shift", "0", "--weight-decay", "0",
                                    "--seed", "0", "--device", "cuda:1", "--lr", "1e-9"])
    assert (args.gamma, args.dropout, args.shift, args.seed, args.device) == (1.0, 0.0, 0, 0, "cuda:1")
    assert given == {"gamma", "dropout", "shift", "weight_decay", "seed", "device", "lr"}


def test_help_shows_every_default_once(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    blocks = help_blocks(capsys.readouterr().out)
    assert len(blocks) == len(cli.parser()._actions)  # every argument listed, -h included
    for head, text in blocks.items():
        if head.startswith("-h"):
            continue
        assert text.count("default") == 1, (head, text)
    assert "(default: 0.7)" in blocks["--gamma GAMMA"]
    assert "(default: auto, which is cuda if available, else cpu)" in blocks["--device DEVICE"]


def test_the_choices_are_written_once():
    """train.py loads cli.py by path; the package's modules use that same module."""
    assert train.cli is cli
    assert engine.OPTIMIZERS is cli.OPTIMIZERS and engine.SCHEDULES is cli.SCHEDULES
    assert model.BACKENDS is cli.BACKENDS and engine.DEVICE_PATTERN is cli.DEVICE_PATTERN
    assert set(cli.DEFAULT_LR) == set(cli.OPTIMIZERS)


@pytest.mark.parametrize("text", ["cpu:0", "CPU", "cuda:-1", "cuda:x", "meta", "cuda:0:1", ""])
def test_the_package_refuses_the_devices_the_command_line_does(text, capsys):
    assert error_of(["--device", text], capsys).endswith(f"{text!r} is not a device: use auto, cpu, cuda or cuda:N")
    with pytest.raises(ValueError, match="is not a device"):
        engine.parse_device(text)


def test_help_argument_and_data_errors_build_nothing(tmp_path):
    """--help and argument errors answer without torch; missing data is found before the first op
    (which builds the extension) in a process whose extensions folder is empty."""
    # TORCHCNN_JIT=1: a build would go to the empty folder, even where a prebuilt torchcnn._C exists.
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), "TORCHCNN_JIT": "1"}
    (tmp_path / "extensions").mkdir()
    shown = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                           env=env, cwd=tmp_path)
    assert shown.returncode == 0 and "usage: train.py" in shown.stdout, shown.stderr
    refused = subprocess.run([sys.executable, str(ROOT / "train.py"), "--weight-decay", "-1"],
                             capture_output=True, text=True, env=env, cwd=tmp_path)
    assert refused.returncode == 2 and "argument --weight-decay: must be at least 0" in refused.stderr
    assert "Traceback" not in refused.stderr
    imported = subprocess.run([sys.executable, "-c", f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import train
train.cli.parse_args(["--epochs", "3"])
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchcnn", "numpy")))
from torchcnn.mnist import cli, engine  # the package, imported afterwards, takes the module train.py loaded
print(cli is train.cli and engine.OPTIMIZERS is train.cli.OPTIMIZERS)
"""], capture_output=True, text=True, env=env)
    assert imported.stdout.split("\n")[:2] == ["['torchcnn.mnist.cli']", "True"], imported.stderr
    no_data = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data-dir", str(tmp_path / "nowhere"),
                              "--no-download", "--device", "cpu"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert no_data.returncode == 2 and "MNIST not found" in no_data.stderr, no_data.stderr  # data before a build
    assert list((tmp_path / "extensions").iterdir()) == []


def test_the_library_does_not_load_the_application():
    loaded = subprocess.run([sys.executable, "-c", """
import sys, torch
before = set(sys.modules)  # torch itself loads tqdm (torch.hub)
import torchcnn.nn, torchcnn.functional
print(sorted(m for m in set(sys.modules) - before
             if m.split(".")[0] in ("matplotlib", "tqdm", "torchvision", "PIL") or m.startswith("torchcnn.mnist")))
"""], capture_output=True, text=True, cwd=ROOT)
    assert loaded.stdout.strip() == "[]", loaded.stderr


# --resume: the checkpoint's recipe holds; --epochs may change where the schedule allows.
SAVED = {"backend": "torchcnn", "epoch": 2, "recipe": {
    "epochs": 4, "batch_size": 64, "optimizer": "adam", "lr": 0.005, "schedule": "step", "step_size": 1,
    "gamma": 0.7, "weight_decay": 0.0, "dropout": 0.25, "shift": 2, "seed": 1, "limit_train": None,
    "limit_test": None, "world_size": 1}}


def resume(*argv, **recipe):
    args, given = cli.parse_args(["--resume", "run/last.pt", *argv])
    notes = cli.resume_args(args, given, {**SAVED, "recipe": {**SAVED["recipe"], **recipe}})
    return args, notes


def test_resume_takes_the_checkpoints_recipe():
    args, notes = resume("--out", "elsewhere", "--test-batch-size", "500", "--quiet", "--device", "cpu")
    assert notes == []
    assert (args.epochs, args.lr, args.optimizer, args.schedule, args.limit_train) == (4, 0.005, "adam", "step", None)
    assert (args.out, args.test_batch_size, args.quiet, args.device) == ("elsewhere", 500, True, "cpu")
    args, notes = resume("--lr", "0.005", "--batch-size", "64", "--backend", "torchcnn")  # agreeing: fine
    assert notes == [] and args.lr == 0.005


CONTRADICTIONS = [("--lr", "0.01"), ("--optimizer", "sgd"), ("--schedule", "none"), ("--batch-size", "32"),
                  ("--step-size", "2"), ("--gamma", "0.5"), ("--weight-decay", "0.1"), ("--dropout", "0.5"),
                  ("--shift", "0"), ("--label-smoothing", "0.1"), ("--seed", "2"), ("--limit-train", "100"), ("--limit-test", "100"),
                  ("--backend", "torch")]


@pytest.mark.parametrize("flag, value", CONTRADICTIONS, ids=[f for f, _ in CONTRADICTIONS])
def test_resume_refuses_a_contradicting_flag_by_name(flag, value):
    with pytest.raises(ValueError, match=rf"^argument {flag}: {value} contradicts the checkpoint's .*"
                                         "a resumed run keeps its recipe"):
        resume(flag, value)


def test_resume_of_a_checkpoint_from_before_label_smoothing_and_betas_keeps_what_it_trained_with():
    """SAVED has neither: it was trained without smoothing and with Adam's own betas, whatever
    today's recipe of the same name says."""
    args, _ = resume()
    assert (args.label_smoothing, args.betas) == (0.0, None)
    with pytest.raises(ValueError, match=r"^argument --betas: \(0.7, 0.9\) contradicts the checkpoint's "
                                         r"torch's \(β₁ cycled by onecycle\)"):
        resume("--betas", "0.7", "0.9")
    args, _ = resume(label_smoothing=0.1, betas=[0.7, 0.9])  # a newer checkpoint's, as saved
    assert (args.label_smoothing, args.betas) == (0.1, (0.7, 0.9))
    with pytest.raises(ValueError, match=r"^argument --betas: Adam's, not used by the checkpoint's --optimizer "
                                         "momentum"):
        resume("--betas", "0.9", "0.999", optimizer="momentum")


def test_resume_honours_epochs_where_the_schedule_allows():
    args, notes = resume("--epochs", "6")
    assert args.epochs == 6 and notes == ["--epochs 6: the run extends to epoch 6 instead of 4"]
    args, notes = resume("--epochs", "3")
    assert args.epochs == 3 and notes == ["--epochs 3: the run ends at epoch 3 instead of 4"]
    with pytest.raises(ValueError, match="^argument --epochs: the checkpoint has finished 2 epochs already"):
        resume("--epochs", "1")
    args, given = cli.parse_args(["--resume", "run/interrupted.pt", "--epochs", "2"])
    with pytest.raises(ValueError, match="^argument --epochs: 2 would drop the 7 steps of epoch 3 that the "
                                         "checkpoint holds; give --epochs 3 or more"):
        cli.resume_args(args, given, {**SAVED, "step": 7})
    with pytest.raises(ValueError, match="^argument --epochs: 6 contradicts the checkpoint's 4: its onecycle "
                                         "learning rate was laid out for 4 epochs"):
        resume("--epochs", "6", schedule="onecycle")
    args, notes = resume("--epochs", "4", schedule="onecycle")
    assert notes == [] and args.epochs == 4


@needs_mnist
def test_resume_refusal_is_an_error_line(trained, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_train(["--resume", trained / "last.pt", "--lr", "0.1", "--out", trained / "unused"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "train.py: error: argument --lr: 0.1 contradicts the checkpoint's 0.005" in err and "Traceback" not in err
    assert not (trained / "unused").exists()


def test_eval_refuses_training_flags_by_name(capsys):
    assert error_of(["--eval", "best.pt", "--epochs", "3"], capsys) == (
        "train.py: error: argument --epochs: not used with --eval, which only evaluates the checkpoint "
        "on the test set")
    assert "not allowed with argument" in error_of(["--eval", "best.pt", "--resume", "last.pt"], capsys)
    args, given = cli.parse_args(["--eval", "best.pt", "--limit-test", "100", "--backend", "torch"])
    assert args.limit_test == 100 and given == {"eval", "limit_test", "backend"}


def test_an_unavailable_device_is_named(capsys):
    if engine.parse_device("auto").type == "cuda":
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--device", "cuda:99"])
    assert exit_info.value.code == 2
    assert "train.py: error: argument --device: 'cuda:99': CUDA is not available here" in capsys.readouterr().err


def test_a_bad_checkpoint_is_reported_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--eval", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"train.py: error: checkpoint '{bad}' cannot be read" in err and "Traceback" not in err


def test_missing_data_folder_says_where_it_looked(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_train(["--epochs", 1, "--out", tmp_path / "run"], data_dir=tmp_path / "nowhere")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "MNIST not found" in err and str(tmp_path / "nowhere") in err and "TORCHCNN_DATA_DIR" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


@needs_mnist
def test_an_output_folder_that_cannot_be_made_is_named(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        run_train(["--epochs", 1, "--limit-train", 64, "--limit-test", 64, "--out", blocker / "run"])
    assert exit_info.value.code == 2
    assert f"--out {blocker / 'run'}: cannot create the output folder" in capsys.readouterr().err


@needs_mnist
def test_a_new_run_never_replaces_a_saved_one(trained, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in trained.iterdir()}
    with pytest.raises(SystemExit) as exit_info:
        run_train(["--epochs", 1, "--limit-train", 64, "--limit-test", 64, "--out", trained])
    assert exit_info.value.code == 2
    assert (f"train.py: error: --out {trained}: it holds a run already (last.pt, best.pt, metrics.json), which "
            "this one would replace: choose another folder, or continue that run with --resume") in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in trained.iterdir()} == before


@needs_mnist
def test_resuming_an_earlier_checkpoint_never_replaces_a_later_one(trained, tmp_path, capsys):
    """best.pt of epoch 1 beside a last.pt of epoch 2: resuming best.pt there would rewind last.pt."""
    shutil.copy(trained / "last.pt", tmp_path / "best.pt")
    later = checkpoint.load(trained / "last.pt")
    checkpoint.save({**later, "epoch": 2}, tmp_path / "last.pt")
    with pytest.raises(SystemExit) as exit_info:
        run_train(["--resume", tmp_path / "best.pt"])
    assert exit_info.value.code == 2
    assert (f"train.py: error: --out {tmp_path}: its last.pt is further along (after epoch 2) than "
            f"{tmp_path / 'best.pt'} (after epoch 1), and resuming here would replace it: resume into another "
            "folder with --out") in capsys.readouterr().err
    # Into another folder it goes on (here with nothing left to train: it writes the outputs).
    assert run_train(["--resume", tmp_path / "best.pt", "--out", tmp_path / "branch", "--no-plots"]) == 0
    assert sorted(p.name for p in (tmp_path / "branch").iterdir()) == ["metrics.json"]
    assert checkpoint.load(tmp_path / "last.pt")["epoch"] == 2


@needs_mnist
def test_a_checkpoint_of_weights_alone_is_evaluated_not_resumed(trained, tmp_path, capsys):
    net = checkpoint.load_model(checkpoint.load(trained / "last.pt"))
    weights = tmp_path / "weights.pt"
    checkpoint.save({"backend": "torchcnn", "model": net.state_dict()}, weights)  # no model_config either
    with pytest.raises(SystemExit) as exit_info:
        run_train(["--resume", weights])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (f"train.py: error: {weights} holds weights but no training state (recipe, optimizer, scheduler, "
            "epoch, step, data_rng, rng, history missing): it can be evaluated, not resumed") in err
    assert "Traceback" not in err
    assert run_train(["--eval", weights, "--limit-test", 100]) == 0
    assert f"{weights}: test accuracy" in capsys.readouterr().out


def as_processes(monkeypatch, world_size):
    """train.main believes it is one of ``world_size`` processes (rank 0; no process group)."""
    @contextlib.contextmanager
    def process_group(device):
        yield 0, world_size, device

    monkeypatch.setattr(engine, "process_group", process_group)


@needs_mnist
def test_resume_with_another_process_count_is_refused(trained, monkeypatch, capsys):
    as_processes(monkeypatch, 2)
    with pytest.raises(SystemExit) as exit_info:
        run_train(["--resume", trained / "last.pt"])
    assert exit_info.value.code == 2
    assert (f"train.py: error: {trained / 'last.pt'} was trained by 1 process; resume it with as many "
            "(torchrun --nproc_per_node=1)") in capsys.readouterr().err


@needs_mnist
def test_fewer_training_images_than_processes_are_refused(tmp_path, monkeypatch, capsys):
    as_processes(monkeypatch, 4)
    with pytest.raises(SystemExit) as exit_info:
        run_train(["--limit-train", 3, "--out", tmp_path / "run"])
    assert exit_info.value.code == 2
    assert ("train.py: error: argument --limit-train: 3 training images cannot be shared among 4 processes "
            "(each needs one at least)") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_recipe_sets_the_defaults_the_command_line_leaves():
    args, _ = cli.parse_args(["--recipe", "fast"])
    fast = cli.RECIPES["fast"]
    assert {name: getattr(args, name) for name in fast.arguments()} == fast.arguments()
    assert (fast.label_smoothing, fast.betas) == (0.1, (0.7, 0.9))
    args, _ = cli.parse_args(["--recipe", "fast", "--betas", "0.8", "0.95", "--label-smoothing", "0"])
    assert (args.betas, args.label_smoothing) == ((0.8, 0.95), 0.0)
    args, _ = cli.parse_args(["--recipe", "fast", "--epochs", "3", "--lr", "0.02"])
    assert (args.epochs, args.lr, args.batch_size) == (3, 0.02, fast.batch_size)
    args, _ = cli.parse_args(["--recipe", "fast", "--optimizer", "sgd"])
    assert args.lr is None  # sgd's own rate, not the recipe's Adam one
    args, _ = cli.parse_args([])
    assert args.recipe == "standard" and (args.epochs, args.batch_size, args.lr) == (12, 64, 5e-3)
    assert (args.betas, args.label_smoothing) == (None, 0.0)  # torch's betas, β₁ cycled by onecycle


def test_betas_are_refused_with_an_optimizer_other_than_adam(capsys):
    line = error_of(["--optimizer", "sgd", "--betas", "0.5", "0.9"], capsys)
    assert line == "train.py: error: argument --betas: Adam's, not used by --optimizer sgd"
    args, _ = cli.parse_args(["--recipe", "fast", "--optimizer", "momentum"])  # the recipe's betas: Adam's
    assert args.optimizer == "momentum" and args.betas is None


def test_given_betas_hold_through_a_one_cycle_schedule_and_torchs_are_cycled():
    """OneCycleLR moves Adam's β₁ (0.95 → 0.85 → 0.95) unless told not to: betas the recipe or the
    command line gives are held for the whole run; without them β₁ cycles, as torch does."""
    for betas, cycled in [((0.7, 0.9), False), (None, True)]:
        weight = torch.nn.Parameter(torch.zeros(3))
        optimizer = engine.make_optimizer("adam", [weight], 1e-2, betas=betas)
        schedule = engine.make_schedule("onecycle", optimizer, lr=1e-2, epochs=1, steps_per_epoch=10,
                                        cycle_momentum=betas is None)
        seen = set()
        for _ in range(10):
            weight.grad = torch.ones(3)
            optimizer.step()
            schedule.step_batch()
            seen.add(tuple(optimizer.param_groups[0]["betas"]))
        assert (len(seen) > 1) == cycled
        if not cycled:
            assert seen == {(0.7, 0.9)}


def test_the_recipes_are_runs_the_package_can_make():
    for recipe in cli.RECIPES.values():
        assert recipe.optimizer in engine.OPTIMIZERS and recipe.schedule in engine.SCHEDULES
        model.MnistNet("torch", **recipe.model, dropout=recipe.dropout)  # a size MnistNet takes


def test_resume_holds_the_recipe():
    args, given = cli.parse_args(["--recipe", "fast"])
    saved = {"backend": "torchcnn", "epoch": 1, "step": 0, "recipe": {"recipe": "standard", "epochs": 12}}
    with pytest.raises(ValueError, match="argument --recipe: fast contradicts the checkpoint's standard"):
        cli.resume_args(args, given, saved)
    before_recipes = {**saved, "recipe": {"epochs": 12}}  # a checkpoint from before --recipe: standard
    with pytest.raises(ValueError, match="argument --recipe: fast contradicts the checkpoint's standard"):
        cli.resume_args(args, given, before_recipes)


@needs_mnist
@pytest.mark.parametrize("argv, betas, momentum, cycled", [
    (["--betas", "0.8", "0.95"], (0.8, 0.95), None, False),  # given: held through onecycle
    ([], None, None, True),  # torch's betas: β₁ cycled, as before --betas
    (["--optimizer", "sgd"], None, 0, False),  # plain gradient descent keeps no momentum
], ids=["betas", "default", "sgd"])
def test_a_run_trains_with_the_betas_and_momentum_it_says(argv, betas, momentum, cycled, tmp_path):
    """train.py's own wiring, end to end: the checkpoint's optimizer and one-cycle schedule."""
    out = tmp_path / "run"
    assert run_train([*argv, "--epochs", 1, "--limit-train", 64, "--limit-test", 64, "--no-plots", "--out", out]) == 0
    saved = checkpoint.load(out / "last.pt")
    group = saved["optimizer"]["param_groups"][0]
    assert saved["scheduler"]["cycle_momentum"] == cycled
    assert saved["recipe"]["betas"] == betas
    if betas is not None:
        assert tuple(group["betas"]) == betas
    if momentum is not None:
        assert group["momentum"] == momentum
