"""lego.checkpoint, --checkpoint-dir / --resume, the non-finite guard and determinism.

References: an uninterrupted run with the same seed (its results JSON, apart from
times, must equal that of a run killed with SIGKILL and resumed, exactly on the CPU);
a second uninterrupted run (determinism); the bytes of a checkpoint that must not be
overwritten.
"""

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lego import LegoModel, ModelConfig, StageConfig, TrainingConfig
from lego.checkpoint import CHECKPOINT_NAME, Checkpointer, CheckpointError, save_atomic
from lego.data import synthetic_corpus
from lego.train import main
from lego.trainer import Trainer
from lego_kernels import ops

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--dataset", "synthetic", "--seq-len", "8", "--dim", "16", "--heads", "2", "--quiet"]
ASHEM_RUN = [*TINY, "--samples", "64", "--batch-size", "8", "--epochs", "3", "--patience", "3"]
ASHEM_RUN += ["--phase1-layers", "1", "--phase2-layers", "2", "--phase2-patience", "3"]
DEEP_RUN = [*TINY, "--samples", "8", "--batch-size", "4", "--epochs", "3", "--patience", "3"]
DEEP_RUN += ["--strategy", "deep-supervision", "--layers", "2", "--exit-layer", "1"]


@pytest.fixture(autouse=True)
def _torch_backend():
    with ops.use_backend("torch"):
        yield


def without_times(results: object) -> object:
    """``results`` without the wall-clock entries (keys ending in ``time_s``, the date), nor the
    checkpoint flags of ``config``."""
    if isinstance(results, dict):
        return {
            k: without_times(v)
            for k, v in results.items()
            if not k.endswith("time_s") and k not in ("resume", "checkpoint_dir", "out", "date")
        }
    if isinstance(results, list):
        return [without_times(v) for v in results]
    return results


def load_results(path: Path) -> object:
    return without_times(json.loads(path.read_text()))


def cli(argv: list[str]) -> subprocess.Popen:
    """``python -m lego.train argv`` in a subprocess (no Triton interpreter, one thread:
    tiny shapes gain nothing from more and CI's two cores run pytest too)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "lego.train", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_when(proc: subprocess.Popen, path: Path, ready) -> dict:
    """SIGKILL ``proc`` as soon as the checkpoint at ``path`` satisfies ``ready(state)``;
    returns that state. Each new checkpoint is a new file (atomic replace), so it is read
    once per inode."""
    seen = None
    while proc.poll() is None:
        try:
            inode = path.stat().st_ino
        except FileNotFoundError:
            inode = None
        if inode is not None and inode != seen:
            seen = inode
            state = torch.load(path, weights_only=True)["state"]
            if ready(state):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return state
        time.sleep(0.005)
    pytest.fail(f"the run ended (status {proc.returncode}) before it could be killed")


def test_sigkill_and_resume_reproduce_the_uninterrupted_run(tmp_path):
    """Kill in phase 1, resume, kill again in phase 2, resume to the end: the results equal
    an uninterrupted run's, and the existing checkpoint was never refused."""
    ckpt_dir = tmp_path / "ckpt"
    path = ckpt_dir / CHECKPOINT_NAME
    reference = tmp_path / "uninterrupted.json"
    # Same process settings (threads) as the killed runs, alongside them.
    uninterrupted = cli([*ASHEM_RUN, "--device", "cpu", "--out", str(reference)])
    argv = [*ASHEM_RUN, "--device", "cpu", "--checkpoint-dir", str(ckpt_dir)]
    out = tmp_path / "resumed.json"
    first = kill_when(cli([*argv, "--out", str(out)]), path, lambda s: True)
    assert first["phase"] == 1 and first["trainer"]["epoch"] < 3
    resumed = cli([*argv, "--resume", "--out", str(out)])
    second = kill_when(resumed, path, lambda s: s["phase"] == 2 and s["trainer"]["epoch"] >= 1)
    assert second["trainer"]["epoch"] < 3 and not out.exists()
    final = cli([*argv, "--resume", "--out", str(out)])
    assert final.wait() == 0, final.stderr.read()
    assert not list(ckpt_dir.glob("*.tmp"))  # no temporary file left behind
    assert uninterrupted.wait() == 0, uninterrupted.stderr.read()
    assert load_results(out) == load_results(reference)


def test_same_seed_same_results(tmp_path):
    runs = [tmp_path / "a.json", tmp_path / "b.json"]
    for out in runs:
        assert main([*DEEP_RUN, "--seed", "5", "--out", str(out)]) == 0
    assert load_results(runs[0]) == load_results(runs[1])
    assert load_results(runs[0])["history"][-1]["epoch"] == 3


def test_trainer_state_dict_resumes_fit_exactly():
    corpus = synthetic_corpus(8, vocab_size=32, num_hard=8, train_windows=16, valid_windows=4)
    config = TrainingConfig(stages=[StageConfig((1, 1), loss_weight=0.5), StageConfig((2, 2))])

    def trainer() -> Trainer:
        torch.manual_seed(1)
        model = LegoModel(ModelConfig(vocab_size=32, dim=16, num_layers=2, num_heads=2))
        return Trainer(model, config, batch_size=4, lr=1e-2, seed=3, quiet=True)

    whole = trainer()
    expected = whole.fit(corpus.train, corpus.valid, epochs=3, patience=3)
    saved = []
    first = trainer()
    first.fit(
        corpus.train,
        corpus.valid,
        epochs=3,
        patience=3,
        on_epoch=lambda: saved.append(copy.deepcopy(first.state_dict())),
    )
    second = trainer()
    second.load_state_dict(saved[0])  # after epoch 1
    result = second.fit(corpus.train, corpus.valid, epochs=3, patience=3)
    assert without_times(result.history) == without_times(expected.history)
    assert (result.best_epoch, result.best_val_ppl) == (expected.best_epoch, expected.best_val_ppl)
    for name, value in whole.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], value), name


def test_checkpointer_refuses_existing_corrupt_and_other_settings(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    Checkpointer(str(tmp_path), {"--lr": 1e-3}).save({"epoch": 1, "weights": torch.ones(3)})
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # temp file renamed
    with pytest.raises(CheckpointError, match="pass --resume"):
        Checkpointer(str(tmp_path), {"--lr": 1e-3})
    with pytest.raises(CheckpointError, match=r"--lr: checkpoint 0\.001, now 0\.01"):
        Checkpointer(str(tmp_path), {"--lr": 1e-2}, resume=True)
    loaded = Checkpointer(str(tmp_path), {"--lr": 1e-3}, resume=True)
    assert loaded.state["epoch"] == 1 and torch.equal(loaded.state["weights"], torch.ones(3))
    assert Checkpointer(str(tmp_path / "new"), {}, resume=True).state is None  # start afresh
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a torn file, as a non-atomic write would leave
    with pytest.raises(CheckpointError, match="corrupt"):
        Checkpointer(str(tmp_path), {"--lr": 1e-3}, resume=True)
    save_atomic({"format": 99}, str(path))
    with pytest.raises(CheckpointError, match="corrupt"):  # no fingerprint: not ours
        Checkpointer(str(tmp_path), {"--lr": 1e-3}, resume=True)


def test_cli_refuses_to_overwrite_or_resume_other_settings(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    args = [*DEEP_RUN, "--epochs", "1", "--checkpoint-dir", str(ckpt)]
    assert main([*args, "--out", str(tmp_path / "a.json")]) == 0
    before = (ckpt / CHECKPOINT_NAME).read_bytes()
    capsys.readouterr()
    for extra, expected in (
        ([], "pass --resume"),
        (["--resume", "--lr", "0.01"], "--lr: checkpoint 0.001, now 0.01"),
        (["--resume", "--seed", "1"], "--seed: checkpoint 0, now 1"),
    ):
        assert main([*args, *extra, "--out", str(tmp_path / "b.json")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
    assert (ckpt / CHECKPOINT_NAME).read_bytes() == before
    assert not (tmp_path / "b.json").exists()
    with pytest.raises(SystemExit):
        main([*DEEP_RUN, "--resume"])
    assert "--resume needs --checkpoint-dir" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    """The deep exit's loss turns NaN in epoch 2: exit status 1, one line naming the epoch,
    the step and the stage; the checkpoint still holds epoch 1 with finite weights."""
    calls = []
    exit_loss = LegoModel.exit_loss

    def failing_exit_loss(self, h, targets, **kwargs):
        loss = exit_loss(self, h, targets, **kwargs)
        if torch.is_grad_enabled() and kwargs.get("exit_layer") == 2:
            calls.append(1)
            if len(calls) > 2:  # 2 steps per epoch: from epoch 2 on
                return loss * math.nan
        return loss

    monkeypatch.setattr(LegoModel, "exit_loss", failing_exit_loss)
    ckpt = tmp_path / "ckpt"
    out = tmp_path / "r.json"
    status = main([*DEEP_RUN, "--checkpoint-dir", str(ckpt), "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1, err
    assert "non-finite training loss (nan)" in err and "epoch 2, step 1 of 2" in err
    assert "stage layers (2, 2) (exit layer 2)" in err and "(1, 1)" not in err
    assert not out.exists()
    state = torch.load(ckpt / CHECKPOINT_NAME, weights_only=True)["state"]["trainer"]
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_elapsed_time_carries_over_a_resume(tmp_path):
    first = Checkpointer(str(tmp_path), {"--seed": 0})
    time.sleep(0.2)
    first.save({"step": 1})
    resumed = Checkpointer(str(tmp_path), {"--seed": 0}, resume=True)
    assert resumed.elapsed() >= 0.2  # the first process's time, though this one just began
    assert resumed.elapsed() < first.elapsed() + 0.1
