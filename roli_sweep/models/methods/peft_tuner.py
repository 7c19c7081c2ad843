"""Any peft tuner by name, for sweeping the method itself (e.g. LoRA with DoRA, LoHa, IA3).

``tuner`` is a peft ``PeftType`` name (``LORA``, ``LOHA``, ``LOKR``, ``IA3``, ...) and ``config``
the keyword arguments of its config class (``peft.LoraConfig(**config)`` and so on, see the peft
docs); the adapter is injected into the timm model with ``peft.inject_adapter_in_model``, which
freezes everything else, and the head trains too. Target module names for timm ViTs: ``qkv``,
``proj`` (attention), ``fc1``, ``fc2`` (MLP).
"""
from __future__ import annotations

from typing import Any

from peft import PeftConfig, inject_adapter_in_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from pydantic import BaseModel, ConfigDict, Field, model_validator

from roli_sweep.models.backbone import NormalizedModel
from roli_sweep.models.methods.base import TransferMethod, register_method


def peft_config(tuner: str, config: dict[str, Any]) -> PeftConfig:
    """Build peft's config object for ``tuner``.

    Raises:
        ValueError: unknown tuner (the message lists peft's), arguments its config rejects, or a
            prompt-learning tuner (those need a language model's embeddings).
    """
    if tuner not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(f"unknown peft tuner {tuner!r}; peft has: {sorted(PEFT_TYPE_TO_CONFIG_MAPPING)}")
    try:
        built = PEFT_TYPE_TO_CONFIG_MAPPING[tuner](**config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"peft {tuner} config {config}: {err}") from None
    if built.is_prompt_learning:
        raise ValueError(f"peft {tuner} is a prompt-learning method for language models; use method 'prompt' for ViTs")
    return built


class PeftParams(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    tuner: str = Field("LOHA", description="peft PeftType name, e.g. LORA, LOHA, LOKR, IA3")
    config: dict[str, Any] = Field(default_factory=lambda: {"target_modules": ["qkv"], "r": 8},
                                   description="keyword arguments of the tuner's peft config class")

    @model_validator(mode="after")
    def _peft_accepts(self) -> PeftParams:
        peft_config(self.tuner, self.config)
        return self


@register_method
class PeftTuner(TransferMethod):
    name = "peft"
    Params = PeftParams

    def apply(self, model: NormalizedModel, params: PeftParams) -> None:
        inject_adapter_in_model(peft_config(params.tuner, params.config), model.net)
        model.head.requires_grad_(True)
