"""Input checks shared by the losses of this package."""

import torch


def check_labels(labels: torch.Tensor, num_classes: int, loss_name: str) -> None:
    """Raise a clear ValueError when a label is outside [0, num_classes).

    Without this, an out-of-range label surfaces as an index error deep inside one_hot /
    cross_entropy (or a device-side assert on CUDA) that does not say which loss or which labels.
    The check costs one host-device synchronisation per call, like pml's own `len(...)` calls.
    """
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(
            f"{loss_name}: labels must be an integer tensor of class indices, "
            f"got dtype {labels.dtype}"
        )
    if labels.numel() == 0:
        return
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        lo, hi = int(labels.min()), int(labels.max())
        raise ValueError(
            f"{loss_name}: labels must lie in [0, num_classes) = [0, {num_classes}), "
            f"but the batch has labels in [{lo}, {hi}]. Map the data set's class ids to "
            f"0..num_classes-1 and build the loss with num_classes = the number of training "
            f"classes."
        )
