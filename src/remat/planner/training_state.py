"""What a training job holds besides activations and gradients: the parameters, the
optimizer's state, and fp32 master weights under mixed precision.

``remat.profile`` counts new bytes of a step (activations, gradients in flight); parameters
and inputs exist before it. To ask "does it fit an 80 GB GPU", the state that lives through
the whole job is added on top: :func:`training_state` counts it per trainable parameter
(frozen ones, as in LoRA, have no gradient and no optimizer state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from remat.measure.storage import unique_storage_bytes
from remat.solver.units import fmt_bytes

__all__ = ["OPTIMIZER_STATE_BYTES", "TrainingState", "training_state"]

# Bytes of optimizer state per trainable parameter element: AdamW keeps two fp32 moments
# (exp_avg, exp_avg_sq), SGD with momentum one buffer; plain SGD none.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "sgd-momentum": 4, "sgd": 0, "none": 0}


@dataclass(frozen=True)
class TrainingState:
    """Bytes held through the whole job, per rank.

    Attributes:
        parameters: the model's parameters as they are (trainable and frozen).
        master_weights: fp32 copies of the trainable parameters under bf16/fp16 mixed
            precision (0 in float32).
        optimizer_state: the optimizer's buffers for the trainable parameters.
        optimizer: the optimizer they were counted for.
    """

    parameters: int
    master_weights: int
    optimizer_state: int
    optimizer: str

    @property
    def total(self) -> int:
        return self.parameters + self.master_weights + self.optimizer_state

    def describe(self, inputs: int, left: int | None = None) -> str:
        """What the device holds through the job, and what the step's new bytes get
        (``left``, when given)."""
        text = (
            f"training state ({self.optimizer}): parameters {fmt_bytes(self.parameters)}, fp32 "
            f"master weights {fmt_bytes(self.master_weights)}, optimizer state "
            f"{fmt_bytes(self.optimizer_state)}, inputs {fmt_bytes(inputs)}"
        )
        if left is not None:
            text += f"\n  the step's activations and gradients get {fmt_bytes(left)}"
        return text


def training_state(model: nn.Module, optimizer: str = "adamw") -> TrainingState:
    """The parameters, master weights and optimizer state of ``model`` trained with
    ``optimizer`` (a key of :data:`OPTIMIZER_STATE_BYTES`).

    Raises:
        ValueError: an unknown optimizer (the message lists the known ones).
    """
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(
            f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZER_STATE_BYTES)}"
        )
    params = list({id(p): p for p in model.parameters()}.values())
    trainable = [p for p in params if p.requires_grad]
    low = (torch.bfloat16, torch.float16)
    return TrainingState(
        parameters=unique_storage_bytes(params),
        master_weights=sum(4 * p.numel() for p in trainable if p.dtype in low),
        optimizer_state=sum(OPTIMIZER_STATE_BYTES[optimizer] * p.numel() for p in trainable),
        optimizer=optimizer,
    )
