"""``torch.distributed`` helpers: rank and world from torchrun, joining the group, and (in the verbs'
own modules) shard claiming and cross-rank merges. Single-process code paths are the world-size-1 case."""

from actlab.dist.env import Rank, barrier, current, init, is_distributed, torchrun_env

__all__ = ["Rank", "barrier", "current", "init", "is_distributed", "torchrun_env"]
