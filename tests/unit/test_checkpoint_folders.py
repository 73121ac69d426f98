"""A run's checkpoint folders, in process: one listing for the trainer and for export, `latest`
written atomically, which errors of a strategy's load stop a resume, which set a checkpoint
aside, and which keep their traceback; asynchronous saves completed as soon as they are written,
and finished-but-not-renamed saves completed on resume."""

from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from pijepa.parallel.base import JEPAModels, Strategy
from pijepa.parallel.formats import (
    CheckpointNotFoundError,
    find_checkpoint,
    finished_dir,
    list_checkpoints,
    step_dir_name,
    step_folders,
    step_of,
    unfinished_step_folders,
)
from pijepa.runtime.errors import CheckpointError
from pijepa.train.checkpoint import Checkpointer, rng_state


class FakeStrategy(Strategy):
    """Writes a marker file per save; `load` raises what the test asks of it for some folders."""

    def __init__(self, errors: dict[str, Exception] | None = None) -> None:
        super().__init__()
        self.errors = errors or {}

    def setup(self, models: JEPAModels, accum_steps: int, clip_grad: float,
              optimizer_kwargs: dict[str, Any]) -> JEPAModels:
        return models

    def backward(self, loss):
        pass

    def optimizer_step(self, lr, weight_decay):
        raise NotImplementedError

    def ema_update(self, momentum):
        pass

    def save(self, folder: Path, extra: dict[str, Any]) -> None:
        (folder / "marker").write_text(str(extra["step"]))

    def load(self, folder: Path) -> dict[str, Any]:
        if folder.name in self.errors:
            raise self.errors[folder.name]
        return {"step": int((folder / "marker").read_text()), "rng": rng_state()}


def saved_run(tmp_path: Path, steps=(2, 4, 6)) -> Path:
    checkpointer = Checkpointer(tmp_path, FakeStrategy(), keep=10)
    for step in steps:
        checkpointer.save(step, {"step": step})
    return tmp_path


def test_one_listing_for_the_trainer_and_export(tmp_path):
    run = saved_run(tmp_path)
    root = run / "checkpoints"
    (root / "step_00000008.tmp").mkdir()  # an interrupted save
    (root / "step_00000001.unreadable").mkdir()  # set aside on a resume
    names = ["step_00000002", "step_00000004", "step_00000006"]
    assert [p.name for p in step_folders(root)] == names
    assert [p.name for p in list_checkpoints(run)] == names
    assert Checkpointer(run, FakeStrategy(), keep=10).complete() == step_folders(root)
    assert [p.name for p in unfinished_step_folders(root)] == ["step_00000008.tmp"]
    assert step_dir_name(6) == "step_00000006" and step_of(root / "step_00000006") == 6
    assert (root / "latest").read_text() == "step_00000006\n"
    assert not (root / "latest.tmp").exists()
    assert find_checkpoint(run) == root / "step_00000006"
    assert find_checkpoint(run, step=4) == root / "step_00000004"


def test_missing_checkpoints_are_user_errors_and_file_not_found(tmp_path):
    for call in (lambda: list_checkpoints(tmp_path), lambda: find_checkpoint(saved_run(tmp_path), step=3)):
        with pytest.raises(CheckpointNotFoundError) as e:
            call()
        assert isinstance(e.value, CheckpointError) and isinstance(e.value, FileNotFoundError)
    assert step_folders(tmp_path / "nope") == []


def test_keep_prunes_the_oldest(tmp_path):
    checkpointer = Checkpointer(tmp_path, FakeStrategy(), keep=2)
    for step in (1, 2, 3):
        checkpointer.save(step, {"step": step})
    assert [p.name for p in checkpointer.complete()] == ["step_00000002", "step_00000003"]


def test_resume_sets_an_unreadable_checkpoint_aside(tmp_path):
    run = saved_run(tmp_path)
    strategy = FakeStrategy({"step_00000006": RuntimeError("PytorchStreamReader failed reading zip archive")})
    folder, extra = Checkpointer(run, strategy, keep=10).resume()
    assert folder.name == "step_00000004" and extra["step"] == 4
    assert (run / "checkpoints" / "step_00000006.unreadable").is_dir()


def test_resume_stops_on_a_checkpoint_error_and_on_a_bug(tmp_path):
    run = saved_run(tmp_path)
    for error in (CheckpointError("step_00000006: encoder does not match this run's architecture"),
                  ValueError("a bug in a strategy's load")):
        with pytest.raises(type(error)) as e:
            Checkpointer(run, FakeStrategy({"step_00000006": error}), keep=10).resume()
        assert e.value is error
        assert [p.name for p in step_folders(run / "checkpoints")][-1] == "step_00000006"  # nothing set aside


def test_load_of_a_given_checkpoint(tmp_path):
    run = saved_run(tmp_path)
    folder = run / "checkpoints" / "step_00000004"
    assert Checkpointer(run, FakeStrategy(), keep=10).load(folder)["step"] == 4
    with pytest.raises(CheckpointError, match="no such folder"):
        Checkpointer(run, FakeStrategy(), keep=10).load(run / "nope")
    broken = FakeStrategy({folder.name: EOFError("Ran out of input")})
    with pytest.raises(CheckpointError, match="not a readable checkpoint .EOFError: Ran out of input"):
        Checkpointer(run, broken, keep=10).load(folder)
    bug = ValueError("a bug in a strategy's load")
    with pytest.raises(ValueError) as e:
        Checkpointer(run, FakeStrategy({folder.name: bug}), keep=10).load(folder)
    assert e.value is bug


def test_a_strategy_names_the_strategy_that_wrote_a_folder(tmp_path):
    from pijepa.parallel import deepspeed_checkpoint, fsdp, single

    written = {"single": "state.pt", "fsdp": ".metadata", "deepspeed": "ds_state.pt"}
    readers = {"single": single.read_full_state, "fsdp": fsdp.read_head, "deepspeed": deepspeed_checkpoint.read_head}
    for writer, marker in written.items():
        folder = tmp_path / writer
        folder.mkdir()
        (folder / marker).write_bytes(b"")
        for reader_name, read in readers.items():
            if reader_name == writer:
                continue
            with pytest.raises(CheckpointError, match=f"it holds {marker}: written by dist.strategy {writer}"):
                read(folder)


class AsyncFakeStrategy(FakeStrategy):
    """Saves "in the background": the marker is written when the test completes the handle, and
    a folder holding the marker is a finished save (as DCP's `.metadata` is for FSDP)."""

    def __init__(self) -> None:
        super().__init__()
        self.handles: list[Future] = []

    def save(self, folder: Path, extra: dict[str, Any]) -> Future:
        handle: Future = Future()
        handle.add_done_callback(lambda _: (folder / "marker").write_text(str(extra["step"])))
        self.handles.append(handle)
        return handle

    def finished_save(self, folder: Path) -> bool:
        return (folder / "marker").is_file()


def test_poll_completes_an_async_save_as_soon_as_it_is_written(tmp_path):
    strategy = AsyncFakeStrategy()
    checkpointer = Checkpointer(tmp_path, strategy, keep=10)
    root = tmp_path / "checkpoints"
    final = checkpointer.save(4, {"step": 4})
    checkpointer.poll()  # still being written: nothing is renamed
    assert [p.name for p in unfinished_step_folders(root)] == ["step_00000004.tmp"] and not final.exists()
    strategy.handles[-1].set_result(None)
    checkpointer.poll()  # written: completed at this step boundary, not at the next save
    assert final.is_dir() and unfinished_step_folders(root) == []
    assert (root / "latest").read_text() == "step_00000004\n"
    checkpointer.poll()  # nothing in flight: a no-op
    assert step_folders(root) == [final]


def test_resume_completes_a_finished_save_and_removes_an_interrupted_one(tmp_path):
    run = saved_run(tmp_path, steps=(2, 4))
    root = run / "checkpoints"
    strategy = AsyncFakeStrategy()
    # A run that died after its async save of step 6 was written, before the rename...
    Checkpointer(run, strategy, keep=2).save(6, {"step": 6})
    strategy.handles[-1].set_result(None)
    (root / "step_00000008.tmp").mkdir()  # ...and one whose save of step 8 never finished
    folder, extra = Checkpointer(run, strategy, keep=2).resume()
    assert folder == root / "step_00000006" and extra["step"] == 6
    assert [p.name for p in step_folders(root)] == ["step_00000004", "step_00000006"]  # keep=2 pruned step 2
    assert unfinished_step_folders(root) == [] and (root / "latest").read_text() == "step_00000006\n"
    assert find_checkpoint(run) == folder
    # A strategy that cannot tell (the default) loses an unrenamed save, as before.
    (root / "step_00000010.tmp").mkdir()
    (root / "step_00000010.tmp" / "marker").write_text("10")
    assert Checkpointer(run, FakeStrategy(), keep=2).resume()[0] == folder
    assert not (root / "step_00000010.tmp").exists()
    assert finished_dir(root / "step_00000010.tmp") == root / "step_00000010"
