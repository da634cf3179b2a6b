"""Multi-process training and rollout on torch.distributed: FSDP2, expert parallelism, DCP checkpoints.

- :mod:`.mesh`: the process group and a 1-D DeviceMesh from the torchrun environment (None for one process).
- :mod:`.expert_parallel`: routed experts sharded over the ranks; all-to-all token dispatch and combine
  (training), or a replicated-token path with one all-reduce (the Engine's decode).
- :mod:`.parallelize`: :func:`parallelize` (EP + ``fully_shard``) for training,
  :func:`parallelize_for_inference` (EP only) for the Engine.
- :mod:`.checkpoint`: sharded DCP save/load of model and optimizer; conversion to and from the published format.
- :mod:`.trainer`: what ``ringkern train`` calls so the same trainer runs under ``torchrun``.

The same code runs as one process: with no mesh every helper leaves the model as it is.
"""
from .checkpoint import (dcp_to_pretrained, gather_full_copy, gather_full_state, load_pretrained_sharded, load_sharded,
                         pretrained_to_dcp, save_pretrained_sharded, save_sharded)
from .expert_parallel import (ExpertParallelExperts, GlobalCountRouter, apply_expert_parallel, dispatch_plan,
                              expert_parallel_moe, replicated_moe)
from .mesh import current_mesh, init_mesh, is_distributed, is_main_process, rank, shard_for_rank, world_size
from .parallelize import is_parallelized, parallelize, parallelize_for_inference

__all__ = ["ExpertParallelExperts", "GlobalCountRouter", "apply_expert_parallel", "current_mesh", "dcp_to_pretrained",
           "dispatch_plan", "expert_parallel_moe", "gather_full_copy", "gather_full_state", "init_mesh",
           "is_distributed", "is_main_process", "is_parallelized", "load_pretrained_sharded", "load_sharded",
           "parallelize", "parallelize_for_inference", "pretrained_to_dcp", "rank", "replicated_moe",
           "save_pretrained_sharded", "save_sharded", "shard_for_rank", "world_size"]
