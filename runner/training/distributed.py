"""What the processes of a multi-process run agree on: averaged gradients and when to stop."""

from __future__ import annotations


def all_reduce_mean(params, sums, world: int) -> None:
    """Average gradients and loss sums over the processes (one flat buffer, one collective)."""
    import torch
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads] + [sums.to(grads[0].device, grads[0].dtype)])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    sums.copy_(flat[offset:])


def agree(flag: bool, world: int) -> bool:
    """True on every process when any process wants to stop (they must stop at the same step)."""
    if world == 1:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
