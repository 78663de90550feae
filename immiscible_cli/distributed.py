"""Several processes (torchrun): the process group, this process's rank and device, the few collectives the library
uses, and how an error on one rank reaches the user.

Launch: `torchrun --nproc_per_node N -m immiscible_cli train ...`; torchrun sets WORLD_SIZE, RANK, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. Without them (or with WORLD_SIZE=1) no process group is made and every helper here is
that of one process (rank 0 of 1), so the commands behave exactly as without torchrun.

Backends: gloo for CPU tensors and, where CUDA is present, NCCL for CUDA tensors (one group, "cpu:gloo,cuda:nccl");
rank r trains on cuda:LOCAL_RANK. Every collective has a timeout of IMMISCIBLE_DIST_TIMEOUT seconds (default 600),
so a rank that died or hangs ends the others with one line (`PeerFailure`, exit 4) instead of a wait forever;
torchrun's own agent stops the other ranks as soon as one exits with an error, and the timeout covers launches
without it.

Errors: one raised alike on every rank (a config error, a batch that does not split, a non-finite loss) is marked
`everywhere` and printed by rank 0 alone; any other is printed by the rank that raised it, as `rank R: ...`.
`on_main` runs a step on rank 0 only (writing the run directory, reading a checkpoint) and hands its result, or its
error, to every rank.
"""

from __future__ import annotations

import datetime
import os
import re
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterator, TypeVar

import torch
import torch.distributed as dist

from .errors import EnvironmentFailure, UserError, describe_os_error

TIMEOUT_ENV = "IMMISCIBLE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
T = TypeVar("T")


class PeerFailure(EnvironmentFailure):
    """A collective failed: another process of the run stopped, or did not answer within the timeout."""


class RemoteError(UserError):
    """The error rank 0 met in an `on_main` step, raised on the other ranks (which print nothing)."""


LAUNCHER_VARIABLES = {"WORLD_SIZE": 1, "RANK": 0, "LOCAL_RANK": 0}  # torchrun's integers, with their lowest value


def env_int(name: str, default: int) -> int:
    """A launcher variable (LAUNCHER_VARIABLES) as an integer, `default` when unset or empty; a UserError (marked
    `everywhere`) naming the variable when it is not a whole number at least its lowest value."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < LAUNCHER_VARIABLES.get(name, 0):
        raise everywhere(UserError(f"{name}={text[:40]}: expected a whole number >= {LAUNCHER_VARIABLES.get(name, 0)} "
                                   f"(torchrun sets it); unset it, or launch with torchrun"))
    return value


def launched() -> bool:
    """Whether torchrun (or its variables) started this process as one of several."""
    return env_int("WORLD_SIZE", 1) > 1


def active() -> bool:
    """Whether a process group of several processes is running (this process took part in `session`)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return env_int("LOCAL_RANK", 0) if launched() else 0


def cuda_device() -> torch.device:
    """This process's GPU: cuda:LOCAL_RANK under torchrun (`gpu_index`), else the current one."""
    return torch.device("cuda", gpu_index()) if launched() else torch.device("cuda")


def gpu_index() -> int:
    """LOCAL_RANK, or 0 where each process sees a single GPU (a launcher that sets CUDA_VISIBLE_DEVICES per rank)."""
    count, index = torch.cuda.device_count(), local_rank()
    if index < count or count == 0:
        return index
    if count == 1:
        return 0
    raise EnvironmentFailure(f"LOCAL_RANK {index}: this node shows {count} GPUs; start at most {count} processes "
                             f"per node (torchrun --nproc_per_node)")


def timeout_s() -> float:
    """IMMISCIBLE_DIST_TIMEOUT (seconds > 0), or DEFAULT_TIMEOUT_S."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise everywhere(UserError(f"{TIMEOUT_ENV}={text}: expected a number of seconds > 0 (default "
                                   f"{DEFAULT_TIMEOUT_S:g})"))
    return value


# ------------------------------------------------------------------------------------------------------------------
# the process group


@contextmanager
def session() -> Iterator[None]:
    """Join the process group for the block when torchrun launched several processes (no-op otherwise); a failed
    collective inside becomes a `PeerFailure` line, and the group is left on the way out."""
    if not launched() or active():
        yield
        return
    for name, lowest in LAUNCHER_VARIABLES.items():  # a garbage RANK is one line here, not a rendezvous error
        env_int(name, lowest)
    timeout = timeout_s()
    if torch.cuda.is_available():
        torch.cuda.set_device(gpu_index())
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:
        raise EnvironmentFailure(f"could not join the process group of {os.environ.get('WORLD_SIZE')} processes "
                                 f"({type(e).__name__}: {_first_line(e)}); check the torchrun options "
                                 f"(--nnodes, --rdzv-endpoint) and that every node can reach the others") from None
    failed = False
    try:
        yield
    except RuntimeError as e:
        failed = True
        if _is_comm_failure(e):
            raise PeerFailure(f"another process of this run stopped or did not answer within {timeout:g} s "
                              f"({TIMEOUT_ENV}); its own error line, if any, says why ({_first_line(e)[:120]})") \
                from None
        raise
    except BaseException:
        failed = True
        raise
    finally:
        if not failed:  # after an error the peers may be gone: leave without the goodbye handshake
            dist.destroy_process_group()


def _first_line(e: BaseException) -> str:
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return re.sub(r"^\[[^\]]*\]\s*", "", line)  # without gloo's "[.../pair.cc:561]" source location


def _is_comm_failure(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        marker in text for marker in ("gloo", "Gloo", "NCCL", "Connection closed by peer", "Connection reset",
                                      "Timed out", "timed out", "Broken pipe"))


# ------------------------------------------------------------------------------------------------------------------
# collectives (the identity in one process)


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce `tensor` in place over the ranks: "sum", "mean", "min" or "max"; returns it."""
    if active():
        ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
               "max": dist.ReduceOp.MAX}
        dist.all_reduce(tensor, ops[op])
        if op == "mean":
            tensor /= world()
    return tensor


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor (all the same shape), in rank order."""
    if not active():
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(world())]
    dist.all_gather(out, tensor.contiguous())
    return out


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank src's values into `tensor` on every rank (in place); returns it."""
    if active():
        dist.broadcast(tensor, src)
    return tensor


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank src's (picklable, CPU) object on every rank."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's (picklable, CPU) object, in rank order."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        dist.barrier()


# ------------------------------------------------------------------------------------------------------------------
# rank 0's steps and errors


def everywhere(error: UserError) -> UserError:
    """Mark an error raised alike on every rank, so that rank 0 alone prints it."""
    error.everywhere = True  # type: ignore[attr-defined]
    return error


def on_main(step: Callable[[], T]) -> T:
    """Run `step` on rank 0 and return its result on every rank (pickled to the others). When it raises, every rank
    raises: rank 0 its own error, the others a quiet `RemoteError` with the same exit code."""
    if not active():
        return step()
    payload: tuple[str, Any, int] = ("ok", None, 0)
    failure: BaseException | None = None
    if is_main():
        try:
            payload = ("ok", step(), 0)
        except UserError as e:
            failure, payload = e, ("error", str(e), e.exit_code)
        except OSError as e:
            failure = describe_os_error(e)
            payload = ("error", str(failure), failure.exit_code)
        except BaseException as e:  # a bug or an interrupt on rank 0: the others stop too, quietly
            failure, payload = e, ("error", f"rank 0 failed ({type(e).__name__})", 1)
    kind, value, code = broadcast_object(payload)
    if failure is not None:
        raise failure
    if kind == "error":
        error = everywhere(RemoteError(value))
        error.exit_code = code
        raise error
    return value


def main_context(make: Callable[[], ContextManager[Any]]) -> ContextManager[Any]:
    """A context held by rank 0 alone (a run's lock); when rank 0 cannot enter it, every rank raises its error."""
    if not active():
        return make()
    context = make() if is_main() else nullcontext()
    on_main(lambda: context.__enter__() and None)
    return _Entered(context)


class _Entered:
    """A context entered already: `with` only exits it."""

    def __init__(self, context: ContextManager[Any]):
        self.context = context

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> Any:
        return self.context.__exit__(*exc)


def error_line(error: BaseException) -> str | None:
    """How this rank reports `error`: the message (prefixed `rank R:` off rank 0), or None when rank 0 reports it."""
    try:
        if not launched():
            return str(error)
        this = env_int("RANK", 0)
    except UserError:  # the error is about a launcher variable itself: report it here, once
        return str(error)
    if this == 0:
        return str(error)
    return None if getattr(error, "everywhere", False) else f"rank {this}: {error}"
