"""Transfer methods, one file each, registered by name in :data:`METHODS`."""
from roli_sweep.models.methods import adapter, bias, full, linear, lora, peft_tuner, prompt  # noqa: F401  (registers them)
from roli_sweep.models.methods.base import (
    METHODS,
    TransferMethod,
    apply_method,
    freeze_all_but_head,
    register_method,
    trainable_parameter_count,
)

__all__ = ["METHODS", "TransferMethod", "apply_method", "freeze_all_but_head", "register_method",
           "trainable_parameter_count"]
