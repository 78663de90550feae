"""The fast training path, checked on the CPU: attention layout, bf16 GroupNorm, the compiled loss, no host syncs,
EMA in fp32, linear assignment one step ahead (bit-identical to the serial path, exact resume), CUDA-only settings.
Tests marked `cuda` run the same comparisons on a GPU and skip without one."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F

from immiscible_cli import run_create, runs, train_batches, train_state, train_step, trainer
from immiscible_cli.config import load_config
from immiscible_cli.data import load_images
from immiscible_cli.models.unet import GroupNorm, SelfAttention

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a loaded 2-core machine two OpenMP threads spin against each other (10x slower)."""
    torch.set_num_threads(1)


def make_loop(tmp_path, tiny, *extra: str, device: str = "cpu") -> trainer.TrainingLoop:
    cfg = load_config("quickstart", tiny + list(extra))
    return trainer.TrainingLoop(cfg, run_create.create_run(tmp_path, cfg), load_images(cfg.data), torch.device(device))


def test_attention_equals_the_reference_math_and_hands_sdpa_contiguous_tensors(monkeypatch):
    torch.manual_seed(0)
    attention = SelfAttention(32, head_channels=8)
    torch.nn.init.normal_(attention.proj_out.weight)  # zero-initialised: make the attention visible
    x = torch.randn(3, 32, 4, 4)
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, *args, **kwargs):
        seen.append((q.is_contiguous(), k.is_contiguous(), v.is_contiguous(), tuple(q.shape)))
        return real_sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    out = attention(x)
    # Reference: the layout before the fix, with softmax(q k^T / sqrt(d)) v written out.
    qkv = attention.qkv(attention.norm(x)).reshape(3, 3, 4, 8, 16)  # [B, 3, heads, d, L]
    q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # [B, heads, L, d]
    weights = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1)  # [B, heads, L, L]
    h = (weights @ v).transpose(-1, -2).reshape(3, 32, 4, 4)
    torch.testing.assert_close(out, x + attention.proj_out(h), rtol=1e-5, atol=1e-5)
    assert seen == [(True, True, True, (3, 4, 16, 8))]


def test_group_norm_stays_bf16_under_autocast_and_is_plain_group_norm_outside():
    torch.manual_seed(0)
    norm = GroupNorm(4, 16)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 16, 8, 8) * 3 + 1
    reference = torch.nn.GroupNorm(4, 16)
    reference.load_state_dict(norm.state_dict())  # same parameter names
    assert torch.equal(norm(x), reference(x))  # fp32, no autocast: unchanged
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (CUDA's autocast would run nn.GroupNorm in fp32)
        out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16 and norm.weight.dtype == torch.float32
    exact = reference(x.bfloat16().float())  # the same input, normalised in fp32
    torch.testing.assert_close(out.float(), exact, rtol=2e-2, atol=2e-2)  # bf16 rounding of the output only


@pytest.mark.slow  # tracing the UNet takes tens of seconds on a loaded 2-core machine
def test_compiled_loss_is_one_graph_and_equals_eager(tmp_path, tiny):
    """Network and objective trace as one graph (fullgraph: a graph break raises); on the CPU, dynamo's "eager"
    backend runs the traced graph (inductor, as on CUDA, would need minutes here)."""
    loop = make_loop(tmp_path, tiny, "model.dropout=0")  # dropout masks differ between eager and compiled
    torch.manual_seed(1)
    x0, noise = torch.rand(8, 1, 16, 16) * 2 - 1, torch.randn(8, 1, 16, 16)
    t = torch.rand(8)
    eager = loop.per_sample_loss(x0, noise, t, None)
    compiled = train_step.compile_loss(loop.per_sample_loss, backend="eager", fullgraph=True)(x0, noise, t, None)
    assert compiled.shape == (8,)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(compiled.mean(), loop.params[:3])
    expected = torch.autograd.grad(loop.per_sample_loss(x0, noise, t, None).mean(), loop.params[:3])
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("assigner", ["vanilla", "knn"])
def test_a_step_never_waits_for_the_host(tmp_path, tiny, monkeypatch, assigner):
    """No .item(), float(tensor), .tolist(), .cpu() or tensor truth test in our code during a step (linear's solve
    excepted; torch's CPU Adam reads its step count on the host, CUDA's fused Adam does not)."""
    loop = make_loop(tmp_path, tiny, f"assigner.name={assigner}")
    calls = []

    def spy(name, real):
        def call(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "immiscible_cli" in caller:
                calls.append(f"{name} in {caller}")
            return real(self, *args, **kwargs)
        return call

    for name in ("item", "tolist", "cpu", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    loop.train_step()
    loop.train_step()
    monkeypatch.undo()
    assert calls == []
    assert loop.step == 2


def test_ema_is_updated_in_fp32_under_bf16_autocast(tmp_path, tiny):
    loop = make_loop(tmp_path, tiny, "train.precision=bf16")
    assert loop.bf16
    before = {k: v.clone() for k, v in loop.ema.state_dict().items()}
    loop.train_step()
    beta = loop.ema_decay_at(1)
    after, net = loop.ema.state_dict(), loop.net.state_dict()
    for key in ("conv_in.weight", "out.2.weight"):
        assert after[key].dtype == net[key].dtype == torch.float32
        torch.testing.assert_close(after[key], beta * before[key] + (1 - beta) * net[key])


def test_linear_pairing_ahead_is_bit_identical_to_serial_and_resumes_exactly(tmp_path, tiny, monkeypatch):
    linear = ("assigner.name=linear", "model.dropout=0")  # dropout draws from torch's one global stream
    ahead = make_loop(tmp_path / "a", tiny, *linear)
    with monkeypatch.context() as m:
        m.setattr(train_batches, "ahead_of_step", lambda cfg, world: False)
        serial = make_loop(tmp_path / "s", tiny, *linear)
    assert ahead.batches.ahead and not serial.batches.ahead
    for loop in (ahead, serial):
        loop.train_step()
        loop.train_step()
    assert ahead.batches.state_before() is not None  # step 3's batch is being drawn
    saved, reference = copy.deepcopy(ahead.state_dict()), serial.state_dict()  # as if read from a file
    assert saved["data"] == reference["data"]  # the states from before the draw ahead
    assert all(torch.equal(saved["rng"][k], reference["rng"][k]) for k in train_state.STREAMS)
    resumed = make_loop(tmp_path / "r", tiny, *linear)
    resumed.load_state_dict(saved)
    for loop in (ahead, serial, resumed):
        loop.train_step()
        loop.train_step()
    for loop in (ahead, resumed):
        assert all(torch.equal(a, b) for a, b in zip(loop.params + loop.ema_params,
                                                     serial.params + serial.ema_params))
    assert torch.equal(ahead.loss_sum, serial.loss_sum)
    rows = [loop.meter.summary() for loop in (ahead, serial)]
    assert rows[0]["pair_dist"] == rows[1]["pair_dist"] and rows[0]["pair_dist_reduction"] > 0
    assert rows[0]["assign_ms"] > 0


def test_cuda_graphs_are_ignored_on_the_cpu_with_a_note_and_channels_last_trains_the_same(tmp_path, tiny):
    from test_trainer import GOLDEN_LOSSES

    fast = trainer.train(load_config("quickstart", tiny + ["train.cuda_graphs=true", "train.channels_last=true"]),
                         out_root=tmp_path)
    assert "train.cuda_graphs ignored on cpu" in fast.log_path().read_text()
    assert [m["loss"] for m in fast.metrics()] == pytest.approx(GOLDEN_LOSSES, rel=1e-4)


# --- on a GPU ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [["train.compile=true"], ["train.channels_last=true"],
                                   ["train.compile=true", "train.cuda_graphs=true", "train.channels_last=true"]])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.cuda
@needs_cuda
def test_cuda_fast_paths_equal_the_eager_loss(tmp_path, tiny, extra, precision):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    base = ["model.dropout=0", f"train.precision={precision}"]
    eager = make_loop(tmp_path / "e", tiny, *base, device="cuda")
    fast = make_loop(tmp_path / "f", tiny, *base, *extra, device="cuda")
    fast.net.load_state_dict(eager.net.state_dict())
    torch.manual_seed(1)
    x0, noise = torch.rand(8, 1, 16, 16, device="cuda") * 2 - 1, torch.randn(8, 1, 16, 16, device="cuda")
    t = torch.rand(8, device="cuda")
    tolerance = 1e-4 if precision == "fp32" else 3e-2
    for _ in range(3):  # compile, record, replay
        fast.mark_graph_step()
        got = fast.batch_loss(x0, noise, t, None).clone()
        torch.testing.assert_close(got, eager.batch_loss(x0, noise, t, None), rtol=tolerance, atol=tolerance)
    for loop in (eager, fast):
        for _ in range(3):
            loop.train_step()
    torch.cuda.synchronize()
    assert float(fast.loss_sum) == pytest.approx(float(eager.loss_sum), rel=10 * tolerance)

