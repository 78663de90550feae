"""One training step of a run in training (train_state.py holds the state it changes).

Data flow of one step: batch x0 -> assigner(x0, generator) -> (x0', noise) -> t = objective.sample_t
-> per-sample loss = objective.loss(net, x0', noise, t) -> mean -> backward -> clip -> Adam -> EMA.
On CUDA the step has no host synchronisation: loss sums and the non-finite check stay on the device until a tick;
linear assignment's host-side solve runs one step ahead on a worker thread (train_batches.py, bit-identical).
`train.compile` compiles the per-sample loss (network + objective) as one graph. Several processes: every rank
draws the whole global batch's random numbers and keeps its rows; DDP averages the gradients (train_ranks.py).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch

from . import runs, train_ranks
from .config import Config
from .data import ImageSet
from .errors import lowers_on_oom
from .objectives import build_objective
from .train_state import TrainState


def compile_loss(loss: Callable[..., torch.Tensor], *, cuda_graphs: bool = False, backend: str = "inductor",
                 fullgraph: bool = False) -> Callable[..., torch.Tensor]:
    """`loss` (network + objective) through torch.compile with static shapes (every step has the same batch
    shape); with `cuda_graphs`, mode `reduce-overhead`, which replays it as CUDA graphs. `backend`/`fullgraph`
    for tests (e.g. "aot_eager" on the CPU checks that the whole loss traces as one graph)."""
    return torch.compile(loss, dynamic=False, backend=backend, fullgraph=fullgraph,
                         mode="reduce-overhead" if cuda_graphs else None)


class TrainStep(TrainState):
    """The state plus one step: the objective, the (DDP-wrapped) network's forward, the loss (compiled or not),
    Adam, EMA, and the device-side loss sum and first non-finite step a tick reads."""

    def __init__(self, cfg: Config, run: runs.Run, data: ImageSet, device: torch.device):
        super().__init__(cfg, run, data, device)
        t = cfg.train
        self.ddp = train_ranks.wrap(self.net, device)  # the network itself in one process
        self.forward = self.ddp
        self.batch_loss = (compile_loss(self.per_sample_loss, cuda_graphs=self.graphs) if t.compile or self.graphs
                           else self.per_sample_loss)
        self.objective = build_objective(cfg.objective)
        self.params = [p for p in self.net.parameters()]
        self.ema_params = [p for p in self.ema.parameters()]
        halflife = t.ema_halflife_kimg
        self.ema_beta = 0.5 ** (t.batch_size / (halflife * 1000)) if halflife else t.ema_decay
        self.ema_warmup = t.ema_warmup
        self.loss_sum = torch.zeros((), device=device)
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def net_fn(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.forward(x, t, labels).float()

    def per_sample_loss(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                        labels: torch.Tensor | None) -> torch.Tensor:
        """The objective's per-sample loss [b] of the network on paired x0', noise [b, C, H, W] at times t [b]
        (what train.compile compiles: network and objective in one graph)."""
        return self.objective.loss(self.net_fn, x0, noise, t, labels)

    def lr_at(self, nimg: int) -> float:
        warmup = self.cfg.train.warmup_kimg * 1000
        return self.cfg.train.lr * (min(1.0, nimg / warmup) if warmup > 0 else 1.0)

    def ema_decay_at(self, step: int) -> float:
        """The EMA decay of update number `step` (1-based); with warm-up min(decay, (1 + n) / (10 + n)) (tqch)."""
        return min(self.ema_beta, (1 + step) / (10 + step)) if self.ema_warmup else self.ema_beta

    @lowers_on_oom("train.batch_gpu", "in a training step",  # micro-batches: the same step in less memory
                   lambda loop: f"{loop.micro}; a divisor of {loop.share}, the images of a step on each process")
    def train_step(self) -> None:
        cfg, g = self.cfg, self.generators
        rows = self.shard.rows if self.shard else slice(None)  # several processes: draw all B, keep my b rows
        x0, labels, noise = self.batches.next()  # [b, C, H, W], [b], [b, C, H, W]: paired before t is drawn
        self.moments.add(noise)
        t = self.objective.sample_t(self.batch, g["timesteps"], self.device)[rows]  # [b]
        if cfg.model.num_classes is None:
            labels = None
        elif cfg.train.label_dropout > 0:  # classifier-free guidance: the null label is num_classes
            drop = torch.rand((self.batch,), generator=g["labels"], device=self.device)[rows] < cfg.train.label_dropout
            labels = torch.where(drop, torch.full_like(labels, cfg.model.num_classes), labels)
        if self.micro == self.share:
            self.mark_graph_step()
            loss = self.batch_loss(x0, noise, t, labels).mean()  # per-sample -> batch mean
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the gradients over the ranks
        else:
            loss = self.accumulate(x0, noise, t, labels)
        self.nimg += self.batch
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.nimg)
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.train.grad_clip, foreach=True)
        self.optimizer.step()
        self.step += 1
        # The parameters (and so the EMA) stay fp32 under bf16 autocast, which casts op inputs, never parameters.
        torch._foreach_lerp_(self.ema_params, self.params, 1.0 - self.ema_decay_at(self.step))
        loss = loss.detach()
        self.loss_sum += loss
        bad = ~torch.isfinite(loss) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(bad, torch.full_like(self.first_bad_step, self.step), self.first_bad_step)

    def accumulate(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   labels: torch.Tensor | None) -> torch.Tensor:
        """Gradients of this rank's batch mean, from micro-batches of train.batch_gpu images (DDP averages them
        over the ranks once, after the last); returns the batch mean loss."""
        self.optimizer.zero_grad(set_to_none=True)
        total, count = torch.zeros((), device=self.device), x0.shape[0]
        for start in range(0, count, self.micro):
            part = slice(start, start + self.micro)
            last = start + self.micro >= count
            with nullcontext() if last or self.ddp is self.net else self.ddp.no_sync():
                self.mark_graph_step()
                loss = self.batch_loss(x0[part], noise[part], t[part],
                                       None if labels is None else labels[part]).sum() / count
                loss.backward()
            total += loss.detach()
        return total

    def mark_graph_step(self) -> None:
        """With CUDA graphs: a new replay begins (the outputs of the last one may be overwritten from here on)."""
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
