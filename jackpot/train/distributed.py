"""Several processes (torchrun / accelerate launch): the one seam through which a step crosses ranks.

One process is the default and nothing here changes it: `Collective()` is the identity. Under a
launcher (WORLD_SIZE > 1 in the environment) `Collective.from_env` joins the process group (NCCL on
CUDA, Gloo on CPU). Row ownership lives here too: `Collective.shard(rows)` is this rank's contiguous
block of a global batch (a `Shard`, which maps a mini-batch's global rows to its own), `padded` gives
every rank as many micro-batches as the busiest one, and `backward` scales a rank's loss share for the
gradient average. The trainer crosses ranks for exactly four things:

    gather_rows   the per-token tensors of a batch, row blocks in rank order (small: sampled-token
                  log-probs, masks, uniforms). Every batch statistic — the budget lambda (a sort of all
                  tokens), kappa, the `z=batch` acceptance, every loss denominator, the logged metrics —
                  is computed from the gathered tensors with the same code as in one process, so it is
                  the same number on every rank and the same as one process would compute.
    sum           metric numerators and denominators of the update (all ranks then agree).
    max_int       the number of micro-batches every rank runs (a sharded model's forward is a
                  collective, so ranks with fewer rows run padding micro-batches: a row with its mask zeroed).
    any           Ctrl-C on any rank: every rank saves and stops after the same step.

Models are distributed with PyTorch's own engines: DDP (replicated) or FSDP2 `fully_shard` (sharded,
each decoder layer a unit), per model (`parallel.policy`, `parallel.rollout_model`). Both wrap
`HiddenStates`, a module whose forward is the trainer's forward (the last hidden states at the response
positions); the output head is applied outside in chunks (jackpot.core.head), its weight reached as an
ordinary parameter (DDP: always; FSDP2: the root unit stays unsharded after its forward).
DDP and FSDP2 average gradients over ranks; each rank's loss is its share of the global loss (global
denominators) times the world size, so the averaged gradient is the global loss's gradient.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from jackpot.core.dtypes import DTYPES
from jackpot.errors import InputError
from jackpot.models.forward import HiddenStates, is_sharded, language_model, unwrap_peft

__all__ = ["PARALLEL_MODES", "Collective", "HiddenStates", "Shard", "gathered_for_generation", "gradient_sync",
           "is_sharded", "language_model", "wrap"]  # the model wrappers live in jackpot.models.forward

PARALLEL_MODES = ("ddp", "fsdp")


class Collective:
    """Rank, world size and the cross-rank operations the trainer uses; the identity in one process."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @classmethod
    def from_env(cls, device: str) -> Collective:
        """Join the process group a launcher describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
        one process when WORLD_SIZE is unset or 1."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            cuda = torch.device(device).type == "cuda"
            if cuda:
                torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        return cls(rank, world, local_rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> torch.device:
        """The device of this rank: 'cuda' becomes cuda:LOCAL_RANK."""
        d = torch.device(device)
        return torch.device("cuda", self.local_rank) if d.type == "cuda" and d.index is None and self.world > 1 else d

    def share(self, n: int, what: str) -> range:
        """This rank's contiguous block of n items (n must divide evenly)."""
        if n % self.world:
            raise InputError(f"{what} ({n}) must be divisible by the number of processes ({self.world})")
        size = n // self.world
        return range(self.rank * size, (self.rank + 1) * size)

    def shard(self, rows: int) -> Shard:
        """This rank's block of a global batch of `rows` rows (the number of processes divides it)."""
        return Shard(self.share(rows, "the batch's rows"), rows)

    def uneven_share(self, n: int) -> range:
        """This rank's contiguous block of n items, the first n % world ranks taking one more."""
        size, extra = divmod(n, self.world)
        start = self.rank * size + min(self.rank, extra)
        return range(start, start + size + (self.rank < extra))

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of this rank's share of a global loss (global denominators): DDP and FSDP2 average
        gradients over ranks, so the share is scaled by the world size (1 in one process)."""
        (loss * self.world).backward()

    def padded(self, items: list, pad) -> list:
        """`items` followed by as many `pad` as make every rank's list as long as the longest: a sharded
        model's forward is a collective, so ranks with fewer micro-batches run padding ones."""
        return items + [pad] * (self.max_int(len(items)) - len(items))

    # ---- collectives (identity in one process)
    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        t = t.detach().clone()
        dist.all_reduce(t)
        return t

    def max_int(self, n: int) -> int:
        if self.world == 1:
            return n
        t = torch.tensor([n], dtype=torch.long, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def any(self, flag: bool) -> bool:
        return self.max_int(int(flag)) > 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather_rows(self, t: torch.Tensor, fill: float = 0.0) -> tuple[torch.Tensor, int]:
        """(b, T, ...) on each rank -> ((sum of b, max T, ...), this rank's first row in it).

        Row blocks are concatenated in rank order; shorter rows are padded with `fill` (masked out by
        the gathered masks). A rank may hold zero rows.
        """
        if self.world == 1:
            return t, 0
        dev = self._comm_device()
        shape = torch.tensor([t.shape[0], t.shape[1] if t.dim() > 1 else 0], device=dev)
        shapes = [torch.zeros_like(shape) for _ in range(self.world)]
        dist.all_gather(shapes, shape)
        rows = [int(s[0]) for s in shapes]
        width = max(int(s[1]) for s in shapes)
        padded = t.new_full((max(rows), *((width,) if t.dim() > 1 else ()), *t.shape[2:]), fill)
        if t.dim() > 1:
            padded[:t.shape[0], :t.shape[1]] = t
        else:
            padded[:t.shape[0]] = t
        parts = [torch.empty_like(padded, device=dev) for _ in range(self.world)]
        dist.all_gather(parts, padded.to(dev))
        out = torch.cat([p[:r] for p, r in zip(parts, rows)]).to(t.device)
        return out, sum(rows[:self.rank])

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")


@dataclass(frozen=True)
class Shard:
    """The rows of a global batch one rank holds: the contiguous block `rows` of `total` rows."""

    rows: range
    total: int

    def local(self, global_rows: torch.Tensor) -> torch.Tensor:
        """The rows among `global_rows` (global indices) this rank holds, as indices into its block, in
        the given order."""
        mine = (global_rows >= self.rows.start) & (global_rows < self.rows.stop)
        return global_rows[mine] - self.rows.start


# ----------------------------------------------------------------------------- wrapping models
def wrap(lm: nn.Module, mode: str, coll: Collective, *, trainable: bool, mixed_precision: str | None) -> nn.Module:
    """`lm` distributed over the ranks of `coll`: 'ddp' (replicated; a frozen model stays a plain
    replica) or 'fsdp' (FSDP2, every decoder layer and the root a unit). One process: `lm` itself."""
    if coll.world == 1:
        return lm
    if mode not in PARALLEL_MODES:
        raise InputError(f"parallel mode must be one of {list(PARALLEL_MODES)}, got {mode!r}")
    body = HiddenStates(lm)
    if mode == "ddp":
        if not trainable:
            return body
        dev = next(lm.parameters()).device
        ddp = nn.parallel.DistributedDataParallel
        # no buffer broadcast at each forward (a causal LM's buffers are constants); the flag's newer name
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters \
            else "broadcast_buffers"
        return ddp(body, device_ids=[dev.index] if dev.type == "cuda" else None, **{no_sync: False})
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy() if mixed_precision is None else MixedPrecisionPolicy(
        param_dtype=DTYPES[mixed_precision], reduce_dtype=torch.float32)
    for layer in _decoder_layers(lm):
        fully_shard(layer, mp_policy=mp)
    fully_shard(body, mp_policy=mp)
    with torch.no_grad():  # FSDP2 initialises its root at the first forward; generation comes first
        ids = torch.zeros(1, 2, dtype=torch.long, device=next(lm.parameters()).device)
        body(ids, torch.ones_like(ids), 1)
    body.reshard()  # the root unit stays gathered after a forward; the optimizer must see the shards
    return body


def _decoder_layers(lm: nn.Module) -> list[nn.Module]:
    base = unwrap_peft(lm)
    layers = getattr(getattr(base, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise InputError(f"{type(base).__name__}: parallel=fsdp shards each decoder layer and needs "
                         "model.model.layers (a ModuleList); use parallel=ddp for this model")
    return list(layers)


@contextlib.contextmanager
def gathered_for_generation(model: nn.Module, engine):
    """While `engine` samples from `model`: an FSDP2 model that the engine runs itself (it holds no weights of its
    own) has its root unit unsharded for the duration (each layer gathers itself in its own forward), and the
    block gets True: generate with `synced=True`, since every forward is a collective. Otherwise nothing, False."""
    if not is_sharded(model) or engine.holds_weights:
        yield False
        return
    model.unshard()
    try:
        yield True
    finally:
        model.reshard()


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool):
    """DDP: skip the gradient all-reduce unless `sync` (micro-batches before the last accumulate locally).
    FSDP2: reduce-scatter only at the last micro-batch."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        with model.no_sync():
            yield
        return
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
    yield
