"""distributed.py: the global-batch sampler, and train-seg / train-cls under torchrun on 2 CPU processes."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_train import tiny  # noqa: F401  (the tiny training cache)

import cli
from lungseg import train
from lungseg.datasets import EpochSampler
from lungseg.distributed import ShardSampler, World, local_batch_size
from lungseg.errors import TrainingError

ROOT = Path(cli.__file__).parent


@pytest.mark.parametrize("n", [12, 10, 9])
def test_each_global_batch_is_shared_out_whole_and_in_order(n):
    order = list(EpochSampler(n, seed=3))
    shares = [list(ShardSampler(EpochSampler(n, seed=3), 4, World(r, 2))) for r in range(2)]
    assert len(shares[0]) == len(shares[1])                       # every process takes the same number of steps
    assert list(ShardSampler(EpochSampler(n, seed=3), 4, World())) == order
    rebuilt = []
    for k in range(0, len(shares[0]), 2):                          # local batches of 2 make each global batch of 4
        rebuilt += shares[0][k:k + 2] + shares[1][k:k + 2]
    expected = order if n % 4 != 1 else order[:-1]                 # a last batch of 1 cannot feed 2 processes
    assert sorted(rebuilt) == sorted(expected) and rebuilt[:8] == order[:8]


def test_a_global_batch_that_does_not_divide_among_the_processes_is_refused():
    assert local_batch_size(6, World(0, 2)) == 3
    with pytest.raises(TrainingError, match="multiple of 4"):
        local_batch_size(6, World(0, 4))


def _args(kind, path, split, out, epochs, extra=()):
    common = ["--cache", str(path), "--split-file", split, "--out", str(out), "--epochs", str(epochs), "--seed", "5",
              "--device", "cpu", "--precision", "fp32", "--workers", "0", *extra]
    if kind == "seg":
        return ["train-seg", *common, "--widths", "2,4,8,16,32", "--batch-size", "2", "--switch-epoch", "1",
                "--lr-milestones", "2"]
    return ["train-cls", *common, "--arch", "resnet3d50", "--width", "4", "--batch-size", "4", "--lr", "1e-3"]


def _torchrun(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "cli.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kw)


def _losses(out):
    return [r["train_loss"] for r in train.read_log(Path(out) / "log.jsonl")]


@pytest.mark.slow
@pytest.mark.parametrize("kind, extra", [("seg", ()), ("cls", ("--max-batches", "1"))])
def test_two_processes_under_torchrun_give_the_losses_of_one_with_the_same_global_batch(tiny, tmp_path, kind,  # noqa: F811
                                                                                        extra):
    """train-seg over 2 epochs; train-cls (a ResNet50 with batch norm, whose float32 gradients at initialisation
    move with the order of a sum: see ddp_gradients.py) over its first step."""
    path, split = tiny
    one = CliRunner().invoke(cli.main, _args(kind, path, split, tmp_path / "one", 2, extra))
    assert one.exit_code == 0, one.output
    proc = _torchrun(_args(kind, path, split, tmp_path / "two", 2, extra))
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    np.testing.assert_allclose(_losses(tmp_path / "two")[:1 if extra else None],
                               _losses(tmp_path / "one")[:1 if extra else None], rtol=1e-4)
    a = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()                                    # the checkpoint of a plain network
    assert output.count("epoch   1") == 1                          # one progress report: rank 0's


@pytest.mark.slow
def test_ddp_gradients_and_batch_norm_statistics_equal_one_process_on_the_global_batch():
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "tests/ddp_gradients.py"], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the two processes print to one pipe: their lines may run together
    found = re.findall(r"rank (\d): worst relative gradient difference (\S+), running statistics (\d\S*?)(?=rank|\s|$)",
                       proc.stdout)
    assert sorted(rank for rank, _, _ in found) == ["0", "1"], proc.stdout
    for rank, gradient, running in found:
        assert float(gradient) < 1e-9 and float(running) < 1e-9, proc.stdout


@pytest.mark.slow
def test_a_killed_torchrun_run_resumes_exactly(tiny, tmp_path):  # noqa: F811
    path, split = tiny
    whole = _torchrun(_args("cls", path, split, tmp_path / "whole", 3))
    assert whole.communicate(timeout=300)[0] is not None and whole.returncode == 0
    log, last = tmp_path / "cut" / "log.jsonl", tmp_path / "cut" / "last.pt"
    cut = _torchrun(_args("cls", path, split, tmp_path / "cut", 3), start_new_session=True)
    deadline = time.monotonic() + 240
    while not last.exists() and cut.poll() is None:
        assert time.monotonic() < deadline, "the run never finished its first epoch"
        time.sleep(0.05)
    os.killpg(cut.pid, signal.SIGKILL)                             # the launcher and both processes, at once
    cut.communicate(timeout=60)
    done = torch.load(last, weights_only=True)["epoch"]
    assert 1 <= done <= 3 and len(train.read_log(log)) >= done
    resumed = _torchrun(_args("cls", path, split, tmp_path / "cut", 3, ["--resume"]))
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "whole")
