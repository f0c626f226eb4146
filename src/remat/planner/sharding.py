"""One rank of FSDP2 (``fully_shard`` on each region, then on the model) over N ranks.

What changes against one device, per rank:

- Parameters, fp32 master weights and optimizer state are sharded: 1/N of each. Under
  mixed precision (bf16 parameters, fp32 master weights) FSDP2's ``MixedPrecisionPolicy``
  keeps only the fp32 shard, which is the master, and casts to bf16 as it gathers.
- A region's parameters are gathered in full while it runs: the one running and the one
  prefetched (FSDP2 prefetches one unit ahead, forward and backward), so at most the two
  largest units at once. The root unit (embedding, final norm, head: the parameters in no
  region) stays gathered through the step, as FSDP2 does not reshard the root after forward.
- Gradients: a region's are reduce-scattered right after its backward, so while region i
  runs backward, the regions after it hold 1/N of theirs; the root's, produced first (the
  head) and finished last (the embedding), stay whole until the end.

Activations are unchanged: every rank runs the whole model on its own micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from remat.measure.storage import unique_storage_bytes
from remat.planner.training_state import TrainingState
from remat.profiling.profile_data import Profile, store_all_peak_of
from remat.solver.units import fmt_bytes

__all__ = ["ShardedState", "shard_profile", "sharded_state"]


def _grad_bytes(module: nn.Module) -> int:
    return unique_storage_bytes(p for p in module.parameters() if p.requires_grad)


def _check(world_size: int) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")


def shard_profile(profile: Profile, model: nn.Module, world_size: int) -> Profile:
    """``profile`` as one FSDP rank sees it: the gradients of the regions after the one in
    backward are 1/N of theirs (the profile counts them whole), and so are all regions'
    gradients once the chain's backward is done (``after_chain_peak_bytes``)."""
    _check(world_size)
    if world_size == 1:
        return profile
    modules = dict(model.named_modules())
    own = [_grad_bytes(modules[r.name]) for r in profile.regions]
    regions, later = [], 0
    for region, own_bytes in zip(reversed(profile.regions), reversed(own)):
        freed = later - later // world_size  # reduce-scattered after their backward
        regions.append(region.with_later_gradients(-freed))
        later += own_bytes
    regions.reverse()
    chain_peak = store_all_peak_of(regions, profile.tail_bytes)
    # After the chain's backward every region's gradients are reduce-scattered: 1/N each.
    freed = later - later // world_size
    return replace(
        profile,
        after_chain_peak_bytes=max(0, profile.after_chain_peak_bytes - freed),
        regions=tuple(regions),
        step_peak_bytes=profile.step_peak_for(chain_peak),
        meta={**profile.meta, "world_size": world_size},
    )


@dataclass(frozen=True)
class ShardedState:
    """The training state held by one rank of FSDP over ``world_size`` ranks, in bytes.

    Attributes:
        shards: 1/N of the parameters, master weights and optimizer state (the fp32 master
            shard is the parameter under mixed precision).
        gathered: parameters gathered in full: the root unit's and the two largest regions'.
        world_size: N.
        state: the whole (unsharded) training state it was divided from.
    """

    shards: int
    gathered: int
    world_size: int
    state: TrainingState

    @property
    def total(self) -> int:
        return self.shards + self.gathered

    def describe(self, inputs: int, left: int | None = None) -> str:
        """What each rank holds (two lines of at most 120 columns), and what the step's new
        bytes get (``left``, when given)."""
        s = self.state
        lines = [
            f"training state ({s.optimizer}, FSDP over {self.world_size} ranks): parameters "
            f"{fmt_bytes(s.parameters)}, fp32 master weights "
            f"{fmt_bytes(s.master_weights)}, optimizer state {fmt_bytes(s.optimizer_state)}",
            f"  per rank: shards {fmt_bytes(self.shards)}, gathered parameters (the root unit "
            f"and two regions in flight) {fmt_bytes(self.gathered)}, inputs {fmt_bytes(inputs)}",
        ]
        if left is not None:
            lines.append(f"  the step's activations and gradients get {fmt_bytes(left)}")
        return "\n".join(lines)


def sharded_state(
    state: TrainingState, model: nn.Module, regions: list[str], world_size: int
) -> ShardedState:
    """Divide ``state`` over ``world_size`` FSDP ranks, each region one unit."""
    _check(world_size)
    modules = dict(model.named_modules())
    units = sorted((unique_storage_bytes(modules[r].parameters()) for r in regions), reverse=True)
    inside = {id(p) for r in regions for p in modules[r].parameters()}
    root = unique_storage_bytes(p for p in model.parameters() if id(p) not in inside)
    n = world_size
    # trainable bf16/fp16 parameters (2 bytes, master 4 bytes): their fp32 shard stands for both
    low_precision = state.master_weights // 2
    return ShardedState(
        shards=-(-(state.total - low_precision) // n) if n > 1 else state.total,
        gathered=root + sum(units[:2]) if n > 1 else 0,
        world_size=n,
        state=state,
    )
