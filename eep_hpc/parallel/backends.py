"""The all-to-all backend an epoch uses, by configuration: one place that knows every backend."""

from __future__ import annotations

from eep_hpc.parallel.all_to_all import AllToAll, TorchAllToAll
from eep_hpc.parallel.groups import EpochGroup


def make_all_to_all(cfg, arch, epoch, group: EpochGroup, expert_map) -> AllToAll:
    """The backend cfg.parallel.backend names, for one epoch (`epoch` is the P.Epoch entered, `arch` the model's
    MoEArch): "torch" (CPU and GPU, the default) or "nixl_ep" (CUDA; a config error elsewhere)."""
    if cfg.parallel.backend == "nixl_ep":
        from eep_hpc.parallel.nixl_ep_all_to_all import NixlEpAllToAll  # CUDA only: imported when chosen

        return NixlEpAllToAll.for_epoch(cfg, arch, epoch, group, expert_map)
    return TorchAllToAll(group)
