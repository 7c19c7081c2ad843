"""Typed, validated configuration: one trial (:class:`TrialConfig`) and one study (:class:`SearchSpace`).

A trial config is the complete description of one probe-then-finetune job (RoLI, Hua et al., CVPR
2024, Sec. 4). A search space is a complete base trial config plus the parameters to sample,
addressed by dotted path into it (``finetune.lr``, ``attack.eps``, ``finetune.method_params.r``),
with W&B-sweep-like distributions. An exported best config is again a plain trial config.

Every model forbids unknown keys. Loading a YAML file that does not validate raises
:class:`ConfigError` whose message names each bad key, its value and what is allowed.

Perturbation sizes are L-inf radii in [0, 1] pixel units and may be written as fractions
(``"8/255"``), which is how the field writes them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    ValidationError,
    field_validator,
    model_validator,
)

from roli_sweep.messages import shown
from roli_sweep.names import case_key, name_problem
from roli_sweep.yaml_input import YamlInputError, read_yaml_mapping


class ConfigError(ValueError):
    """A config or search space is malformed; the message names the key, the value and what is allowed."""


def _parse_fraction(value: Any) -> Any:
    """Turn ``"8/255"`` into ``8 / 255``; pass anything else through for pydantic to check."""
    if isinstance(value, bool):
        raise ValueError("expected a number in [0, 1] or a fraction like 8/255, got a boolean")
    if isinstance(value, str) and "/" in value:
        num, _, den = value.partition("/")
        try:
            return float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            return value
    return value


def _allowed_name(name: str) -> str:
    problem = name_problem(name)
    if problem:
        raise ValueError(problem)
    return name


Name = Annotated[str, AfterValidator(_allowed_name)]
"""A sweep, study or experiment name: one path component and one shell word (:mod:`roli_sweep.names`)."""


PixelFraction = Annotated[float, BeforeValidator(_parse_fraction), Field(ge=0.0, le=1.0)]
"""An L-inf radius or step in [0, 1] pixel units; accepts ``"8/255"``."""


INT_MAX = 2**31 - 1
"""The largest count a config takes: the int32 range that torch's kernels, PIL and the attacks index with."""

PositiveInt = Annotated[int, Field(ge=1, le=INT_MAX)]
"""A count: epochs, steps, sizes, queries, trials (1 .. :data:`INT_MAX`)."""

MAX_SIDE = 4096
"""The largest image side in pixels (``image_size``, ``input_size``); the paper's models run at 224."""

Side = Annotated[int, Field(ge=1, le=MAX_SIDE)]


class _Strict(BaseModel):
    # strict: YAML's yes/no/true never pass as numbers, "5" never passes as an int
    # and no NaN or infinity passes as a learning rate, weight decay or resource quantity
    model_config = ConfigDict(extra="forbid", validate_default=True, validate_assignment=True, strict=True,
                              allow_inf_nan=False)


class DataConfig(_Strict):
    """Which images a trial trains, validates and tests on. Samples are (C, H, W) floats in [0, 1]."""

    name: str = Field("digits", description="registered dataset name (roli_sweep.data.DATASETS)")
    root: str | None = Field(None, description="local folder with the dataset files; None = the dataset's default places. "
                             "Image-list datasets: the folder their split files' image paths are relative to (required)")
    split_dir: str | None = Field(None, description="image-list datasets (imagefolder, caltech256, cub200, stanford_dogs): "
                                  "folder with train.json, test.json and optionally val.json ({image path: label}); "
                                  "val.json, if there, is the val split; None = root")
    download: bool = Field(False, description="allow a torchvision download when no local copy is found (needs network)")
    classes: list[int] | None = Field(None, description="class subset, relabelled 0..k-1 in the order given")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share of the train split held out for validation (stratified, by seed)")
    train_size: PositiveInt | None = Field(None, description="cap on training images (stratified subsample)")
    val_size: PositiveInt | None = Field(None, description="cap on validation images (stratified subsample)")
    test_size: PositiveInt | None = Field(None, description="cap on test images (stratified subsample, fixed seed 0)")
    image_size: Side | None = Field(None, description="resize images to this square side in pixels; None keeps the native size "
                                           "(image-list datasets need it: their images differ in size)")
    augment: Literal["reference", "none"] = Field(
        "none", description="image-list datasets: 'reference' trains on the RoLI code's RandomCrop(image_size) + "
        "RandomHorizontalFlip of the image resized to image_size / 0.875 (src/data/transforms.py), 'none' on the "
        "centre crop every split is evaluated on")
    num_workers: NonNegativeInt | None = Field(
        None, le=1024, description="image-list datasets: DataLoader worker processes per loader; None = the trial's "
        "CPUs (0: read in the trial's own process)")

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        from roli_sweep.data import DATASETS

        if name not in DATASETS:
            raise ValueError(f"unknown dataset {shown(name)}; allowed: {sorted(DATASETS)}")
        return name

    @field_validator("root", "split_dir")
    @classmethod
    def _absolute(cls, folder: str | None) -> str | None:
        return None if folder is None else str(Path(folder).expanduser().resolve())

    @field_validator("classes")
    @classmethod
    def _distinct(cls, classes: list[int] | None) -> list[int] | None:
        if classes is not None and (len(classes) < 2 or len(set(classes)) != len(classes) or min(classes) < 0):
            raise ValueError("needs at least two distinct non-negative class indices")
        return classes

    @model_validator(mode="after")
    def _image_list_settings(self) -> DataConfig:
        from roli_sweep.data import IMAGE_LIST_DATASETS

        if self.name in IMAGE_LIST_DATASETS:
            missing = [key for key in ("root", "image_size") if getattr(self, key) is None]
            if missing:
                raise ValueError(f"dataset {self.name!r} needs {' and '.join(missing)}: root is the folder the split "
                                 "files' image paths are relative to, image_size the side all images are resized to")
        else:
            for key, unset in (("split_dir", None), ("augment", "none"), ("num_workers", None)):
                if getattr(self, key) != unset:
                    raise ValueError(f"{key} is for the image-list datasets {sorted(IMAGE_LIST_DATASETS)}, not "
                                     f"{self.name!r} (held in memory, without augmentation)")
        return self


class BackboneConfig(_Strict):
    """A timm architecture, its kwargs and local pretrained weights. Normalisation happens inside the model."""

    name: str = Field(description="timm model name, e.g. vit_base_patch16_224")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="timm.create_model kwargs (img_size, patch_size, in_chans, embed_dim, depth, num_heads, ...)")
    weights: str | None = Field(None, description="path to a .safetensors / .pth file, or 'shipped:<name>' for a backbone shipped with roli_sweep; None = random init")
    input_size: Side | None = Field(None, description="resize inputs to this square side inside the model "
                                           "(attacks stay at the data's resolution); None = no resize")
    mean: list[float] = Field(default_factory=lambda: [0.5], description="per-channel normalisation mean, applied inside the model")
    std: list[Annotated[float, Field(gt=0)]] = Field(default_factory=lambda: [0.5], description="per-channel normalisation std, applied inside the model")

    @field_validator("name")
    @classmethod
    def _known_to_timm(cls, name: str) -> str:
        from roli_sweep.models.backbone import timm_model_exists

        if not timm_model_exists(name):
            raise ValueError(f"unknown timm model {shown(name)}; see timm.list_models()")
        return name

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, weights: str | None) -> str | None:
        from roli_sweep.models.backbone import resolve_weights

        if weights is None:
            return None
        path = resolve_weights(weights)  # raises ValueError naming the shipped names or the missing file
        # Absolute, so Ray workers (other working directories) and exported configs find the same file.
        return weights if weights.startswith("shipped:") else str(path.resolve())


class AttackConfig(_Strict):
    """The training attack: PGD under L-inf (Madry et al., 2018). The paper trains with PGD-7, 2/255 at eps 8/255."""

    eps: PixelFraction = Field(8 / 255, description="L-inf radius in [0, 1] pixel units")
    steps: int = Field(7, ge=0, le=INT_MAX, description="PGD steps; 0 trains on clean images")
    step_size: PixelFraction | None = Field(None, description="step in [0, 1] pixel units; None = 2.5 * eps / steps (Madry et al., 2018)")
    random_start: bool = Field(True, description="start from a uniform point in the eps ball")


class MaskingConfig(_Strict):
    """Gradient-masking checks run with every final evaluation (roli_sweep.evaluation.masking)."""

    n_examples: PositiveInt = Field(128, description="test examples the checks attack (the first ones)")
    pgd_steps: PositiveInt = Field(20, description="PGD steps of the eps sweep (step 2.5 * eps / steps)")
    more_steps: PositiveInt = Field(100, description="PGD steps of the more-steps check")
    eps_factors: list[Annotated[float, Field(gt=0.0)]] = Field([0.5, 1.0, 2.0, 4.0], description="eps sweep, in multiples of eps")
    large_eps: PixelFraction = Field(0.5, description="an eps at which robust accuracy must be ~0")
    large_eps_max_acc: float = Field(0.05, ge=0.0, le=1.0, description="the most accuracy allowed at large_eps")
    square_queries: PositiveInt = Field(1000, description="queries of the black-box Square attack")
    tolerance: float = Field(0.01, ge=0.0, le=1.0, description="noise allowance: a fraction of the checked examples (at least one)")


class AutoAttackConfig(_Strict):
    """AutoAttack's components (roli_sweep.evaluation.autoattack). The defaults are the published standard version
    (Croce & Hein, ICML 2020; fra31/auto-attack): anything else is reported as ``custom``."""

    enabled: bool = Field(True, description="run AutoAttack in the final evaluation")
    apgd_steps: PositiveInt = Field(100, description="iterations of APGD-CE and APGD-T (published: 100)")
    fab_steps: PositiveInt = Field(100, description="iterations of FAB-T (published: 100)")
    target_classes: PositiveInt = Field(9, description="target classes of APGD-T and FAB-T (published: 9; "
                                        "K - 1 when the task has K <= 10 classes)")
    square_queries: PositiveInt = Field(5000, description="queries of Square (published: 5000)")

    @property
    def version(self) -> str:
        """``standard`` when every setting is the published one, else ``custom``."""
        published = AutoAttackConfig.model_fields
        same = all(getattr(self, k) == published[k].default for k in ("apgd_steps", "fab_steps", "target_classes",
                                                                       "square_queries"))
        return "standard" if same else "custom"


def _autoattack_switch(value: Any) -> Any:
    """``autoattack: false`` / ``true`` is short for ``{enabled: false}`` / the published settings."""
    return {"enabled": value} if isinstance(value, bool) else value


class FinalEvalConfig(_Strict):
    """The reported test evaluation (roli_sweep.evaluation.final_eval): clean, PGD with restarts, standard AutoAttack."""

    n_examples: PositiveInt | None = Field(None, description="evaluate the first n test examples; None = the full test split")
    pgd_steps: PositiveInt = 20
    pgd_step_size: PixelFraction | None = Field(None, description="None = 2.5 * eps / pgd_steps")
    pgd_restarts: PositiveInt = Field(5, description="random restarts; an example is robust only if it survives all")
    autoattack: Annotated[AutoAttackConfig, BeforeValidator(_autoattack_switch)] = Field(
        default_factory=AutoAttackConfig, description="AutoAttack (APGD-CE, APGD-T, FAB-T, Square) from torchattacks' "
        "components, by default as published; 'autoattack: false' turns it off")
    batch_size: PositiveInt = 128
    masking: MaskingConfig = Field(default_factory=MaskingConfig)


class EvalConfig(_Strict):
    """Evaluation attacks: PGD-10 on validation (paper, Sec. 5.1), PGD-20 on test, by default at the training eps."""

    eps: PixelFraction | None = Field(None, description="evaluation L-inf radius; None = the training attack's. "
                                      "Fix it when attack.eps is sampled, so all trials face one threat model")
    step_size: PixelFraction | None = Field(None, description="evaluation PGD step; None = the training attack's "
                                            "step when eps is None, else 2.5 * eps / steps")

    val_steps: PositiveInt = Field(10, description="PGD steps for validation robust accuracy (model selection, ASHA)")
    test_steps: PositiveInt = Field(20, description="PGD steps for test robust accuracy")
    batch_size: PositiveInt = Field(256, description="evaluation batch size")
    final: FinalEvalConfig = Field(default_factory=FinalEvalConfig, description="the reported test evaluation of the "
                                   "best trials (after a sweep, and in train)")


def evaluation_attack(attack: AttackConfig, evaluation: EvalConfig) -> AttackConfig:
    """The threat model of validation and test: ``evaluation.eps`` / ``step_size`` where set, else the training attack's."""
    if evaluation.eps is None and evaluation.step_size is None:
        return attack
    return AttackConfig(eps=attack.eps if evaluation.eps is None else evaluation.eps, steps=attack.steps,
                        step_size=evaluation.step_size, random_start=True)


NO_WEIGHT_DECAY = ["bias", "norm", "pos_embed", "cls_token", "reg_token", "prompts"]
"""Default name fragments of the parameters kept out of weight decay: biases (Swin's
``relative_position_bias_table`` too), norm layers, position embeddings, class / register tokens and
prompt tokens. The RoLI reference exempts names containing ``bias`` only (its ``src/solver/optimizer.py``);
the paper presets say so."""


class StageConfig(_Strict):
    """Optimisation of one stage. The lr schedule is linear warm-up then cosine, stepped per batch."""

    epochs: PositiveInt
    lr: float = Field(gt=0.0, description="peak learning rate")
    weight_decay: NonNegativeFloat = 0.0
    no_weight_decay: list[str] = Field(default_factory=lambda: list(NO_WEIGHT_DECAY),
                                       description="trainable parameters whose name contains one of these fragments "
                                       "get weight decay 0 (a second parameter group); [] = decay everything")
    optimizer: Literal["sgd", "adamw"]
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (ignored by AdamW)")
    warmup_epochs: NonNegativeFloat = Field(0.0, description="linear warm-up length in epochs; the first step already has lr > 0")
    batch_size: PositiveInt = 64

    @model_validator(mode="after")
    def _warmup_within_training(self) -> StageConfig:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be shorter than epochs ({self.epochs})")
        return self


class ProbeConfig(StageConfig):
    """Stage 1, adversarial linear probing: the backbone is frozen, only the head trains (paper: SGD, lr 0.05, wd 0.01)."""

    epochs: PositiveInt = 2
    lr: float = Field(0.05, gt=0.0)
    weight_decay: NonNegativeFloat = 0.01
    optimizer: Literal["sgd", "adamw"] = "sgd"


class FinetuneConfig(StageConfig):
    """Stage 2, adversarial finetuning with a transfer method; the head starts from the probe (RoLI) or at random (RanLI)."""

    method: str = Field("lora", description="registered transfer method (roli_sweep.models.methods.METHODS)")
    method_params: dict[str, Any] = Field(default_factory=dict, description="the method's own parameters, validated by its Params model")
    head_init: Literal["roli", "random"] = Field("roli", description="roli: head from the stage-1 probe; random: RanLI")
    random_head_init: Literal["reference", "timm"] = Field(
        "reference", description="the random head both stage 1 and RanLI start from: 'reference' = the RoLI code's "
        "(src/models/mlp.py: weight kaiming_normal_ fan_out, i.e. std sqrt(2 / classes); bias -ln(99), prior 0.01), "
        "'timm' = the backbone's own head init")
    backbone_mode: Literal["auto", "eval", "train"] = Field(
        "auto", description="module mode of the backbone's own layers during finetuning: 'eval' = frozen layers "
        "without dropout / drop-path / BatchNorm updates (only the method's added modules and the head in train mode), "
        "'train' = the whole model in train mode; 'auto' = the RoLI reference's choice: 'train' for full "
        "finetuning, 'eval' for every method that freezes the backbone")
    epochs: PositiveInt = 6
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: NonNegativeFloat = 0.01
    optimizer: Literal["sgd", "adamw"] = "adamw"

    @model_validator(mode="after")
    def _method_and_params(self) -> FinetuneConfig:
        from roli_sweep.models.methods import METHODS

        if self.method not in METHODS:
            raise ValueError(f"unknown method {shown(self.method)}; allowed: {sorted(METHODS)}")
        try:
            params = METHODS[self.method].Params.model_validate(self.method_params)
        except ValidationError as err:
            raise ValueError(_describe(err, prefix="method_params")) from None
        resolved = params.model_dump()
        if resolved != self.method_params:
            self.method_params = resolved
        return self


SEED_MAX = 2**31 - 1
"""Largest seed: numpy and scikit-learn take seeds in [0, 2**32 - 1], and a trial derives a few more from its
own (``seed + 1`` for stage 2, ``seed + 3 + batch`` in the final evaluation)."""


class TrialConfig(_Strict):
    """One complete probe-then-finetune job. Recorded verbatim with every run."""

    seed: int = Field(0, ge=0, le=SEED_MAX, description="seeds the train/val split, weight init, data order and attacks")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 autocast on CUDA, fp32 elsewhere")
    data: DataConfig = Field(default_factory=DataConfig)
    backbone: BackboneConfig
    attack: AttackConfig = Field(default_factory=AttackConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)


class TrainConfig(StageConfig):
    """Optimisation of source-backbone pretraining (AdamW, warm-up then cosine)."""

    epochs: PositiveInt = 8
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: NonNegativeFloat = 0.05
    optimizer: Literal["sgd", "adamw"] = "adamw"
    warmup_epochs: NonNegativeFloat = 1.0
    batch_size: PositiveInt = 128


class PretrainConfig(_Strict):
    """How a source backbone is made: standard or PGD adversarial training on a source task."""

    seed: int = Field(0, ge=0, le=SEED_MAX)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    out: str = Field(description="output path without suffix: writes <out>.safetensors and <out>.json (the model card)")
    adversarial: bool = Field(description="true: PGD adversarial training (robust backbone); false: standard training")
    data: DataConfig
    backbone: BackboneConfig
    attack: AttackConfig = Field(default_factory=AttackConfig,
                                 description="threat model: used for training when adversarial, and for the model card's PGD accuracy")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("backbone")
    @classmethod
    def _from_scratch(cls, backbone: BackboneConfig) -> BackboneConfig:
        if backbone.weights is not None:
            raise ValueError("pretraining starts from random weights: leave backbone.weights unset")
        return backbone


# ----------------------------------------------------------------------------------------------
# Search spaces


class ParameterSpec(_Strict):
    """How one dotted-path parameter is sampled: ``values`` (categorical), a distribution with ``min``/``max``, or,
    conditional, one of those per value of another categorical parameter: ``given`` names it and ``cases`` maps each
    of its values (as written in YAML, e.g. ``roli``) to the spec used when it takes that value. A conditional range
    is how each arm gets its own learning rate: ``finetune.lr: {given: finetune.head_init, cases: {roli: ...,
    random: ...}}`` (RoLI usually wants a 5-100x lower finetuning lr than RanLI, ``../shared/PAPER.md``)."""

    values: list[Any] | None = None
    distribution: Literal["uniform", "log_uniform_values", "int_uniform"] | None = None
    min: float | None = None
    max: float | None = None
    given: str | None = Field(None, description="the categorical parameter whose value picks the case")
    cases: dict[str, ParameterSpec] | None = Field(None, description="value of 'given' -> the spec used then")

    @field_validator("cases", mode="before")
    @classmethod
    def _keys_as_written(cls, cases: Any) -> Any:
        """YAML reads ``{8: ..., true: ...}`` with int and bool keys; a case is named as YAML writes its value."""
        if isinstance(cases, dict):
            return {key if isinstance(key, str) else case_key(key): case for key, case in cases.items()}
        return cases

    @model_validator(mode="after")
    def _one_kind(self) -> ParameterSpec:
        if (self.given is None) != (self.cases is None):
            raise ValueError("a conditional parameter needs both 'given' (the parameter it depends on) and 'cases'")
        if self.given is not None:
            if self.values is not None or self.distribution is not None or self.min is not None or self.max is not None:
                raise ValueError("a conditional parameter takes 'given' and 'cases' only; put 'values' or "
                                 "'distribution' inside each case")
            if not self.cases:
                raise ValueError("'cases' must not be empty")
            nested = [key for key, case in self.cases.items() if case.given is not None]
            if nested:
                raise ValueError(f"cases {nested}: a case cannot be conditional itself")
            return self
        if (self.values is None) == (self.distribution is None):
            raise ValueError("give either 'values: [...]' or 'distribution' with 'min' and 'max'")
        if self.values is not None:
            if not self.values:
                raise ValueError("'values' must not be empty")
            if self.min is not None or self.max is not None:
                raise ValueError("'min'/'max' go with 'distribution', not with 'values'")
            return self
        if self.min is None or self.max is None:
            raise ValueError(f"distribution {self.distribution!r} needs both 'min' and 'max'")
        if not self.min < self.max:
            raise ValueError(f"'min' ({self.min}) must be smaller than 'max' ({self.max})")
        if self.distribution == "log_uniform_values" and self.min <= 0:
            raise ValueError(f"log_uniform_values needs min > 0, got {self.min}")
        if self.distribution == "int_uniform" and not (float(self.min).is_integer() and float(self.max).is_integer()):
            raise ValueError(f"int_uniform needs integer min and max, got {self.min} and {self.max}")
        return self

    def variants(self) -> list[tuple[dict[str, Any], ParameterSpec]]:
        """``(condition, spec)`` pairs: ``[({}, self)]`` for a plain parameter, ``[({given: value}, case), ...]`` for a
        conditional one (the condition's value as the case key: the search space checks the keys against the
        values of ``given``)."""
        if self.given is None:
            return [({}, self)]
        return [({self.given: key}, case) for key, case in self.cases.items()]

    def resolve(self, chosen: dict[str, Any]) -> ParameterSpec:
        """The plain spec in force when the other parameters took ``chosen``: ``self``, or the case of
        ``chosen[given]``.

        Raises:
            KeyError: ``given`` is missing from ``chosen`` or its value has no case.
        """
        return self if self.given is None else self.cases[case_key(chosen[self.given])]

    def candidates(self) -> list[Any]:
        """Values that must all give a valid trial config: every categorical value, or the bounds and an inner point
        (for a conditional parameter, see :meth:`variants`: each case has its own)."""
        if self.given is not None:
            raise TypeError("a conditional parameter's candidates are its cases' (ParameterSpec.variants)")
        if self.values is not None:
            return list(self.values)
        if self.distribution == "int_uniform":
            return [int(self.min), int(self.max)]
        # an interior, non-integer point too: a continuous distribution on an int setting fails here
        if self.distribution == "log_uniform_values":
            inner = self.min * (self.max / self.min) ** 0.37
        else:
            inner = self.min + 0.37 * (self.max - self.min)
        return [self.min, inner, self.max]


class MetricSpec(_Strict):
    """The metric the sweep optimises and ASHA prunes on."""

    name: Literal["val_robust_acc"] = Field("val_robust_acc", description="ASHA and Optuna use its best value so far")
    goal: Literal["maximize"] = "maximize"
    multi_objective: bool = Field(False, description="Optuna maximises (val_clean_acc, val_robust_acc) together and "
                                  "the sweep reports the Pareto front; ASHA still prunes on val_robust_acc")


RESOURCE_UNIT = 1e-4
"""Ray counts resources in units of 1/10,000 (``ray._raylet.RESOURCE_UNIT_SCALING``); a finer fraction is refused
by Ray when the trial's actor is created ("The precision of the fractional quantity ... cannot go beyond 0.0001",
``ray/_common/ray_option_utils.py``)."""

MAX_RESOURCE = 1e6
"""More CPUs or GPUs per trial than any cluster has (Ray's own cap is 1e14, ``MAX_RESOURCE_QUANTITY``)."""


class Resources(_Strict):
    """Resources per trial, as Ray Tune counts them; fractional GPUs are allowed, in steps of 0.0001."""

    cpu: float = Field(1.0, gt=0.0, le=MAX_RESOURCE)
    gpu: float = Field(0.0, ge=0.0, le=MAX_RESOURCE)

    @field_validator("cpu", "gpu")
    @classmethod
    def _ray_precision(cls, quantity: float) -> float:
        units = quantity / RESOURCE_UNIT
        if abs(units - round(units)) > 1e-6 * max(1.0, units):
            raise ValueError(f"Ray counts resources in steps of {RESOURCE_UNIT:g}; {quantity!r} is not a multiple of it")
        return quantity


class SchedulerConfig(_Strict):
    """ASHA (Li et al., 2020) over finetune epochs: rungs at grace_period * reduction_factor**k."""

    grace_period: PositiveInt = Field(2, description="finetune epochs before a trial can be stopped; keep it after warm-up")
    reduction_factor: float = Field(2.0, gt=1.0)
    max_t: PositiveInt | None = Field(None, description="last epoch ASHA counts; must equal finetune.epochs (None = that)")


class ConfirmConfig(_Strict):
    """After the search, each arm's best configurations rerun as whole trials over more seeds and tested, so the
    reported difference between arms is a mean over seeds with a paired interval, not one seed's draw."""

    seeds: int = Field(3, ge=0, le=1000, description="S: the seeds base.seed + 1 .. base.seed + S, each a whole "
                       "trial per confirmed configuration, paired across arms; the search's own seed is never one "
                       "of them; 0 = no confirmation")
    top_k: PositiveInt = Field(1, le=100, description="each arm's best k completed trials by val robust accuracy "
                               "are confirmed")


class SearchSpace(_Strict):
    """A study: a base trial config, the parameters to sample, the metric, the budget and the scheduler; optionally
    the categorical parameter whose values are its arms (each searched on its own, with an equal budget) and the
    confirmation of each arm's best over more seeds."""

    name: Name = Field(description="study name; the MLflow experiment and the default sweep name's start "
                      "(roli_sweep.names: letters, digits, '_', '.', '-')")
    metric: MetricSpec = Field(default_factory=MetricSpec)
    num_samples: PositiveInt = 8
    max_concurrent: PositiveInt = 2
    seed: int = Field(0, ge=0, le=SEED_MAX, description="seeds the Optuna TPE sampler")
    resources: Resources = Field(default_factory=Resources)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    final_top_k: int = Field(1, ge=0, le=INT_MAX, description="after the sweep, the best k completed trials by val robust "
                             "accuracy get the final evaluation (base.eval.final) and masking checks; 0 = none")
    arms: str | None = Field(None, description="a categorical parameter (e.g. finetune.head_init): each of its "
                             "values is an arm with its own Optuna study, num_samples / arms trials and its own ASHA "
                             "brackets; the sweep reports each arm's best and compares the arms")
    confirm: ConfirmConfig = Field(default_factory=ConfirmConfig)
    base: TrialConfig
    parameters: dict[str, ParameterSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> SearchSpace:
        self._check_conditions()
        self._check_arms()
        epochs = self.base.finetune.epochs
        max_t = self.scheduler.max_t or epochs
        if max_t != epochs:
            raise ValueError(
                f"scheduler.max_t ({max_t}) must equal base.finetune.epochs ({epochs}): ASHA stops every trial "
                "at max_t, so a smaller one would end all trials before their test evaluation")
        if self.scheduler.grace_period > max_t:
            raise ValueError(f"scheduler.grace_period ({self.scheduler.grace_period}) exceeds max_t ({max_t})")
        if "finetune.epochs" in self.parameters:
            raise ValueError("finetune.epochs cannot be sampled: ASHA counts finetune epochs up to a fixed max_t")
        if self.scheduler.grace_period <= self.base.finetune.warmup_epochs:
            raise ValueError(
                f"scheduler.grace_period ({self.scheduler.grace_period}) must come after the warm-up "
                f"(base.finetune.warmup_epochs = {self.base.finetune.warmup_epochs}): "
                "ASHA would compare trials before they train (../shared/PAPER.md)"
            )
        if self.confirm.seeds and "seed" in self.parameters:
            raise ValueError("parameters.seed: the confirmation reruns the best trials over new seeds, so the seed "
                             "cannot be sampled too; drop it or set confirm.seeds: 0")
        if self.base.seed + self.confirm.seeds > SEED_MAX:
            raise ValueError(f"confirm.seeds ({self.confirm.seeds}): base.seed + seeds exceeds the largest seed "
                             f"{SEED_MAX}")
        return self

    def _check_conditions(self) -> None:
        for key, spec in self.parameters.items():
            if spec.given is None:
                continue
            where = f"parameters.{key}.given"
            given = self.parameters.get(spec.given)
            if given is None or spec.given == key:
                raise ValueError(f"{where}: {shown(spec.given)} is not another sampled parameter; allowed: "
                                 f"{sorted(k for k in self.parameters if k != key)}")
            if given.values is None:
                raise ValueError(f"{where}: {spec.given} must be categorical ('values: [...]') to pick a case")
            wanted = [case_key(v) for v in given.values]
            missing = [k for k in wanted if k not in spec.cases]
            extra = [k for k in spec.cases if k not in wanted]
            if missing or extra:
                raise ValueError(f"parameters.{key}.cases: keys {sorted(spec.cases)} must be the values of "
                                 f"{spec.given}, {wanted}" + (f"; missing {missing}" if missing else "")
                                 + (f"; not values of it {extra}" if extra else ""))

    def _check_arms(self) -> None:
        if self.arms is None:
            return
        spec = self.parameters.get(self.arms)
        if spec is None or spec.values is None:
            raise ValueError(f"arms: {shown(self.arms)} must be a categorical sampled parameter "
                             f"('values: [...]'); categorical here: "
                             f"{sorted(k for k, v in self.parameters.items() if v.values is not None)}")
        if len({case_key(v) for v in spec.values}) != len(spec.values) or len(spec.values) < 2:
            raise ValueError(f"arms: {self.arms} needs at least two distinct values, got {spec.values}")
        if self.num_samples % len(spec.values):
            raise ValueError(f"num_samples ({self.num_samples}) must be a multiple of the {len(spec.values)} arms "
                             f"of {self.arms}, so that each arm gets the same number of trials")

    def arm_values(self) -> list[Any]:
        """The arms' values in the order written (``[None]``: no arms, one search over everything)."""
        return list(self.parameters[self.arms].values) if self.arms else [None]

    def in_arm(self, sampled: dict[str, Any], value: Any) -> bool:
        """Whether a trial that sampled ``sampled`` ran in the arm ``value`` (every trial is in arm None)."""
        return value is None or case_key(sampled.get(self.arms)) == case_key(value)

    def conditions(self, key: str) -> list[tuple[dict[str, Any], ParameterSpec]]:
        """``(condition, plain spec)`` of parameter ``key``: ``[({}, spec)]``, or per case of a conditional one
        ``({given: the value itself}, case)`` (e.g. ``({"finetune.head_init": "roli"}, ...)``)."""
        spec = self.parameters[key]
        if spec.given is None:
            return [({}, spec)]
        values = {case_key(v): v for v in self.parameters[spec.given].values}
        return [({spec.given: values[k]}, case) for k, case in spec.cases.items()]

    def trial_config(self, sampled: dict[str, Any]) -> TrialConfig:
        """The base config with ``sampled`` ({dotted path: value}) filled in, validated.

        Raises:
            ConfigError: a path does not exist in the trial config, or a value is not allowed there.
        """
        return apply_overrides(self.base, sampled)


LrGrid = Annotated[list[Annotated[float, Field(gt=0.0)]], Field(min_length=1)]


class StudyMethod(_Strict):
    """One transfer method of a study: its parameters and the finetuning learning rates to try.

    ``lrs`` is one grid shared by the head inits, or one grid per head init (``{random: [...], roli:
    [...]}``): RoLI usually wants a 5-100x lower finetuning lr than RanLI (../shared/PAPER.md, the
    paper's CIFAR-10 configs), so a shared grid wide enough for both wastes runs on each.
    """

    params: dict[str, Any] = Field(default_factory=dict, description="the method's method_params")
    lrs: LrGrid | dict[Literal["random", "roli"], LrGrid] = Field(
        description="peak finetuning lr grid: a list shared by the head inits, or one list per head init")

    def grid(self, head_init: str) -> list[float]:
        """The lr grid of ``head_init``."""
        return self.lrs if isinstance(self.lrs, list) else self.lrs[head_init]

    @property
    def shared(self) -> bool:
        """One grid for every head init: the inits can then also be compared at a matched lr."""
        return isinstance(self.lrs, list)


class StudyConfig(_Strict):
    """A grid study of the paper's findings F1-F3: source backbones x methods x {RanLI, RoLI} x targets.

    Every cell (backbone, target, method, head_init) tries each lr of its grid (the method's, or the
    method's for that head init) with the first seed and keeps the one with the best val robust
    accuracy; the other seeds then run at that lr and, where the method has one grid for both inits,
    at the lr matched between RoLI and RanLI (best mean val robust over both).
    """

    name: Name = Field(description="study name: the MLflow experiment and the state folder's name")
    base: TrialConfig = Field(description="what every run shares: threat model, probe, epochs, eval sizes")
    backbones: dict[str, str] = Field(min_length=1, description="label -> weights (a file or shipped:<name>)")
    targets: dict[str, DataConfig] = Field(min_length=1, description="label -> target dataset")
    methods: dict[str, StudyMethod] = Field(min_length=1, description="method name -> params and lr grid")
    head_inits: list[Literal["random", "roli"]] = Field(["random", "roli"], min_length=1)
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="the first one also selects the lr")
    resources: Resources = Field(default_factory=Resources)
    max_concurrent: PositiveInt = 2

    @field_validator("backbones", "targets", "methods")
    @classmethod
    def _labels(cls, mapping: dict[str, Any]) -> dict[str, Any]:
        import re

        for label in mapping:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.]*", label):
                raise ValueError(f"label {shown(label)} not allowed: letters, digits, '_' and '.' only")
        return mapping

    @model_validator(mode="after")
    def _every_run_valid(self) -> StudyConfig:
        for method, spec in self.methods.items():
            if not spec.shared and set(spec.lrs) != set(self.head_inits):
                raise ValueError(f"methods.{method}.lrs: one grid per head init needs exactly the keys "
                                 f"{sorted(self.head_inits)} (head_inits), got {sorted(spec.lrs)}")
        for backbone in self.backbones:
            for target in self.targets:
                for method, spec in self.methods.items():
                    for init in self.head_inits:
                        self.run_config(backbone, target, method, init, spec.grid(init)[0], self.seeds[0])
        return self

    def run_config(self, backbone: str, target: str, method: str, head_init: str, lr: float, seed: int) -> TrialConfig:
        """The complete trial config of one run of the grid.

        Raises:
            ConfigError: the combination does not validate (e.g. a method parameter it does not take).
        """
        return apply_overrides(self.base, {
            "seed": seed, "data": self.targets[target].model_dump(), "backbone.weights": self.backbones[backbone],
            "finetune.method": method, "finetune.method_params": self.methods[method].params,
            "finetune.head_init": head_init, "finetune.lr": lr})


def apply_overrides(base: TrialConfig, overrides: dict[str, Any]) -> TrialConfig:
    """Return ``base`` with ``{dotted.path: value}`` overrides applied and the result validated.

    Raises:
        ConfigError: unknown path, or a value the trial config does not allow.
    """
    tree = base.model_dump()
    for path, value in overrides.items():
        node = tree
        *parents, leaf = path.split(".")
        for i, key in enumerate(parents):
            if not isinstance(node, dict) or key not in node or not isinstance(node[key], dict):
                raise ConfigError(f"key {shown(path)}: {shown('.'.join(parents[: i + 1]))} is not a section of the trial config")
            node = node[key]
        if leaf not in node:
            raise ConfigError(f"key {shown(path)}: no such setting; allowed here: {sorted(node)}")
        node[leaf] = value
    try:
        return TrialConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_describe(err, values=overrides)) from None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, prefix=f"{path}."))
        else:
            flat[path] = value
    return flat


def _describe(err: ValidationError, prefix: str = "", values: dict[str, Any] | None = None) -> str:
    """One line per pydantic error: the dotted key, the value given and what is allowed."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"key {shown(key)}: unknown key (value {shown(e['input'])})")
        elif e["type"] == "missing":
            lines.append(f"key {shown(key)}: required but missing")
        elif e["type"] in ("value_error", "assertion_error") and isinstance(e["input"], dict):
            lines.append(f"key {shown(key or '<top level>')}: {msg}")
        else:
            lines.append(f"key {shown(key)}: value {shown(e['input'])} not allowed: {msg}")
    if values:
        lines.append(f"(while applying {shown(values)})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# YAML


def _read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        return read_yaml_mapping(Path(path))
    except YamlInputError as err:
        raise ConfigError(str(err)) from None


def _load(model: type[BaseModel], path: str | Path) -> Any:
    try:
        return model.model_validate(_read_yaml(path))
    except ValidationError as err:
        raise ConfigError(f"{path}:\n{_describe(err)}") from None


def load_trial_config(path: str | Path) -> TrialConfig:
    """Read and validate a trial config YAML.

    Raises:
        ConfigError: missing file, invalid YAML, or any invalid key (all named in the message).
    """
    return _load(TrialConfig, path)


def load_pretrain_config(path: str | Path) -> PretrainConfig:
    """Read and validate a pretraining config YAML.

    Raises:
        ConfigError: missing file, invalid YAML, or any invalid key (all named in the message).
    """
    return _load(PretrainConfig, path)


def load_study_config(path: str | Path) -> StudyConfig:
    """Read and validate a study YAML (every backbone x target x method combination is checked).

    Raises:
        ConfigError: missing file, invalid YAML, or any invalid key (all named in the message).
    """
    tree = _read_yaml(path)
    tree.setdefault("name", Path(path).stem)
    try:
        return StudyConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"{path}:\n{_describe(err)}") from None
    except ConfigError as err:
        raise ConfigError(f"{path}:\n{err}") from None


def load_search_space(path: str | Path) -> SearchSpace:
    """Read and fully validate a search space YAML, including every sampled value against the trial config.

    ``name`` defaults to the file's stem. Each categorical value and both bounds of each
    distribution are applied to the base config and validated, so a sweep never starts trials
    that would fail on their config.

    Raises:
        ConfigError: naming the key, the value given and what is allowed.
    """
    tree = _read_yaml(path)
    tree.setdefault("name", Path(path).stem)
    return parse_search_space(tree, str(path))


def parse_search_space(tree: dict[str, Any], source: str) -> SearchSpace:
    """Validate a search space given as a YAML tree; ``source`` names it in error messages.

    Raises:
        ConfigError: naming the key, the value given and what is allowed.
    """
    try:
        space = SearchSpace.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"{source}:\n{_describe(err)}") from None
    problems = []
    for dotted in space.parameters:
        threat_models = set()
        for condition, spec in space.conditions(dotted):
            for value in spec.candidates():
                try:
                    cfg = space.trial_config({**condition, dotted: value})
                except ConfigError as err:
                    when = "".join(f" (when {k} is {shown(v)})" for k, v in condition.items())
                    problems.append(f"parameters.{dotted}{when}: value {shown(value)}: {err}".split("\n(while")[0])
                    continue
                threat = evaluation_attack(cfg.attack, cfg.eval).model_dump_json()
                threat_models.add((threat, cfg.eval.val_steps, cfg.eval.test_steps))
        if len(threat_models) > 1:
            problems.append(
                f"parameters.{dotted}: sampling it changes the evaluation threat model, so trials would be "
                f"validated under different attacks and the weakest would win; fix it with base.eval.eps "
                f"(and base.eval.step_size), which is {space.base.eval.eps!r}, and do not sample eval settings")
    if problems:
        raise ConfigError(f"{source}:\n" + "\n".join(problems))
    return space


def dump_yaml(config: BaseModel) -> str:
    """A config as YAML, keys in declaration order."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)

