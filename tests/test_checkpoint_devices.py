"""Checkpoints move between devices: a CUDA-made snapshot resumes on the CPU (simulated here: generator states and
optimizer groups as CUDA writes them), the reverse on a real GPU, and fewer GPUs than the snapshot had."""

from __future__ import annotations

import shutil

import pytest
import torch

from immiscible_cli import checkpoint, checkpoint_devices, checkpoint_format, train_state, trainer
from immiscible_cli.config import load_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a loaded 2-core machine two OpenMP threads spin against each other (10x slower)."""
    torch.set_num_threads(1)
CUDA_NOTE = "resumed on cpu from a snapshot made on cuda"


def as_if_made_on_cuda(path, with_device_tag: bool = True) -> None:
    """Rewrite a CPU snapshot the way a 2-GPU CUDA run writes it: 16-byte Philox stream states, two per-GPU dropout
    states, fused Adam groups with float32 step counts."""
    state = checkpoint.load(path)
    rng = state["rng"]
    for i, name in enumerate(train_state.STREAMS):
        rng[name] = torch.tensor([i + 1, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)
    rng["cuda"] = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]
    if with_device_tag:
        rng["device"] = "cuda"
    else:
        rng.pop("device", None)
    optimizer = state["optimizer"]
    for group in optimizer["param_groups"]:
        group.update(fused=True, foreach=None)
    for moments in optimizer["state"].values():
        moments["step"] = moments["step"].to(torch.float32)
    checkpoint.save(path, {k: v for k, v in state.items() if k != "format"})


def test_the_device_of_untagged_snapshots_is_read_off_the_state_size():
    cuda_state = torch.zeros(checkpoint_format.CUDA_STATE_BYTES, dtype=torch.uint8)
    assert checkpoint_devices.rng_device({"noise": cuda_state}) == "cuda"
    assert checkpoint_devices.rng_device({"noise": torch.Generator().get_state()}) == "cpu"
    assert checkpoint_devices.rng_device({"noise": torch.Generator().get_state(), "device": "cuda"}) == "cuda"


def test_a_cuda_made_snapshot_resumes_on_the_cpu_deterministically_with_a_note(tmp_path, tiny):
    half = trainer.train(load_config("quickstart", tiny + ["train.total_kimg=0.016"]), out_root=tmp_path / "a")
    (snapshot,) = checkpoint.list_checkpoints(half)
    as_if_made_on_cuda(snapshot.path, with_device_tag=False)  # as older snapshots: no device tag
    assert checkpoint_devices.rng_device(checkpoint.load(snapshot.path)["rng"]) == "cuda"
    copy = tmp_path / "b"
    shutil.copytree(half.path, copy)
    cfg = load_config("quickstart", tiny)
    runs_ = [trainer.train(cfg, out_root=tmp_path, run_dir=path, resume=True) for path in (half.path, copy)]
    for run in runs_:
        assert CUDA_NOTE in run.log_path().read_text()
        assert [c.kimg for c in checkpoint.list_checkpoints(run)] == [0.016, 0.032]
        assert [m["step"] for m in run.metrics()] == [2, 4]
    a, b = (checkpoint.load(checkpoint.list_checkpoints(r)[-1].path) for r in runs_)
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])  # reseeded from (seed, step): the same
    assert [m["loss"] for m in runs_[0].metrics()] == [m["loss"] for m in runs_[1].metrics()]
    assert a["rng"]["device"] == "cpu" and a["rng"]["noise"].numel() != checkpoint_format.CUDA_STATE_BYTES
    assert all(group["fused"] in (None, False) for group in a["optimizer"]["param_groups"])


def test_fewer_gpus_restore_the_states_that_exist_with_a_note():
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]
    kept, note = checkpoint_devices.cuda_states_to_restore(states, device_count=1)
    assert [index for index, _ in kept] == [0] and torch.equal(kept[0][1], states[0])
    assert "4 GPUs" in note and "has 1" in note
    kept, note = checkpoint_devices.cuda_states_to_restore(states[:1], device_count=2)
    assert [index for index, _ in kept] == [0] and note is None


def test_a_fused_optimizer_state_loads_into_the_cpu_optimizer_and_steps():
    params = [torch.nn.Parameter(torch.ones(3))]
    saved_opt = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    saved_opt.param_groups[0]["params"][0].grad = torch.ones(3)
    saved_opt.step()
    saved = saved_opt.state_dict()
    saved["param_groups"][0]["fused"] = True  # as CUDA's fused Adam writes it
    saved["state"][0]["step"] = saved["state"][0]["step"].float()
    optimizer = torch.optim.Adam(params, lr=0.1)
    optimizer.load_state_dict(checkpoint_devices.portable_optimizer_state(saved, optimizer))
    assert optimizer.param_groups[0]["fused"] in (None, False)
    params[0].grad = torch.ones(3)
    optimizer.step()
    assert int(optimizer.state[params[0]]["step"]) == 2
    torch.testing.assert_close(optimizer.state[params[0]]["exp_avg"], torch.full((3,), 0.19))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("first, then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_real_run_moves_between_cpu_and_gpu(tmp_path, tiny, first, then):
    half = trainer.train(load_config("quickstart", tiny + ["train.total_kimg=0.016", f"train.device={first}"]),
                         out_root=tmp_path)
    run = trainer.train(load_config("quickstart", tiny + [f"train.device={then}"]), out_root=tmp_path,
                        run_dir=half.path, resume=True)
    assert f"resumed on {then} from a snapshot made on {first}" in run.log_path().read_text()
    assert [m["step"] for m in run.metrics()] == [2, 4]
    assert checkpoint.load(checkpoint.list_checkpoints(run)[-1].path)["rng"]["device"] == then
