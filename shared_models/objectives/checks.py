"""Whether a loss may read tensor values to check its inputs."""
import torch


def values_checkable() -> bool:
    """False inside torch.func transforms (DP-SGD's vmapped per-study gradients), where a check that reads a
    tensor's values cannot run; the batch they see comes from the same collate as the batches the checks read."""
    return not torch._C._are_functorch_transforms_active()
