"""The one typed schema of params.yaml, and the one place where defaults live.

Every stage calls `load()` before it does any work. Unknown keys are an error, so a typo in
`dvc exp run -S train.lrr=0.1` stops the run instead of silently adding a key that nothing reads.
Numbers that arrive as strings are accepted when they are numbers: `dvc exp run -S train.l1=1e-06`
writes `1e-06`, which YAML 1.1 reads back as the string '1e-06' (a float needs a dot there).
Infinity and NaN (`.inf`, 'inf', 'nan') and true/false where a number belongs are errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from stages.errors import ParamsError
from stages.networks import registry

PARAMS_FILE = Path("params.yaml")


class Section(BaseModel):
    # extra="forbid": unknown keys are errors; lax mode (the default) turns "1e-06" into 1e-06;
    # allow_inf_nan=False: .inf, 'inf', 'nan', 'Infinity' are no number of any field.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """Lax mode reads `epochs: true` as 1 and `lr: false` as 0.0: refuse true/false there."""
        annotation = cls.model_fields[info.field_name].annotation  # int, float, int | None, ...
        if isinstance(value, bool) and {int, float} & {annotation, *get_args(annotation)}:
            raise PydanticCustomError("number_not_bool", "Input should be a number, not a boolean")
        return value


# The real CIFAR-10, re-encoded as JPEG, committed with the repository (datasets/README.md): the
# default source, so a fresh clone runs without a download.
BUNDLED = "datasets/cifar10-jpg.tar.gz"
BUNDLED_SHA256 = "097287809041e0a666355dfce11470ba1b3f2631fe910d8793c716253f10b297"
OFFICIAL_SOURCES = ("cifar10", "cifar100")  # downloaded and checked against their published MD5


class Data(Section):
    # "cifar10" | "cifar100" (official archives, MD5-checked) | a local path, file:// or
    # http(s):// URL to a CIFAR-pickle .tar.gz, an image-folder .tar.gz/.zip, or a folder.
    source: str = Field(BUNDLED, min_length=1)
    # Checked when given: the archive's sha256, or a folder's tree hash (stages/download.py).
    sha256: str | None = Field(BUNDLED_SHA256, pattern=r"^[0-9a-fA-F]{64}$")
    image_size: int = Field(32, ge=8, le=512)  # pixels; images are resized to a square of this
    # Share of each class held out for validation. Small by default: the source recipe trains on
    # all 50,000 images, and holding out 10% cost it 3 points of test accuracy (seed 0: 35.5% vs 38.4%).
    val_fraction: float = Field(0.02, gt=0, lt=1)
    train_size: int | None = Field(None, ge=1)  # stratified training subset; null = all images
    # Long-tailed training set: largest class / smallest class, counts falling off exponentially
    # with the class index. 1 = balanced.
    imbalance_ratio: float = Field(1.0, ge=1)
    normalize: Literal["none", "dataset"] = (
        "none"  # dataset: per-channel mean/std of the training set
    )


class Augment(Section):
    flip: bool = False  # random horizontal flip, p = 0.5
    crop_padding: int = Field(
        0, ge=0, le=16
    )  # pixels of zero padding before a random crop; 0 = off
    trivial_augment: bool = False  # TrivialAugmentWide: one random op of random strength per image
    color_jitter: float = Field(
        0.0, ge=0, le=1
    )  # brightness/contrast/saturation factors in [1-s, 1+s]
    erasing: float = Field(0.0, ge=0, le=1)  # probability of erasing a random rectangle (cutout)
    # RandomResizedCrop: [lo, hi] share of the image's area kept, resized back; null = off
    resized_crop_scale: list[float] | None = Field(None, min_length=2, max_length=2)
    # [lo, hi] of the crop's aspect ratio (width / height), drawn log-uniformly
    resized_crop_ratio: list[float] = Field([0.75, 1.333], min_length=2, max_length=2)
    mixup_alpha: float = Field(0.0, ge=0)  # Beta(a, a) mixing of image pairs and labels; 0 = off
    cutmix_alpha: float = Field(0.0, ge=0)  # Beta(a, a) area pasted between pairs; 0 = off
    online: bool = False  # apply the image policy to every training batch, anew each epoch
    copies: int = Field(0, ge=0, le=20)  # augmented copies of each training image, made offline

    @field_validator("resized_crop_scale")
    @classmethod
    def _scale(cls, scale: list[float] | None) -> list[float] | None:
        if scale is not None and not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError("needs 0 < lo <= hi <= 1 (shares of the image's area)")
        return scale

    @field_validator("resized_crop_ratio")
    @classmethod
    def _ratio(cls, ratio: list[float]) -> list[float]:
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError("needs 0 < lo <= hi (aspect ratios, width / height)")
        return ratio


def backbones() -> list[str]:
    """The networks with ImageNet weights (model.pretrained = imagenet): registry entries that name
    their weights, and timm's family."""
    return [n for n, e in registry.NETWORKS.items() if e.weights] + [f"{registry.TIMM}<arch>"]


class Model(Section):
    # a registry entry (stages/networks/registry.py: net, cnn, resnet9, resnet18,
    # mobilenet_v3_small, efficientnet_b0, efficientnet_lite0) or timm/<architecture>
    name: str = "net"

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not registry.known(name):
            allowed = ", ".join(repr(n) for n in registry.names())
            raise PydanticCustomError("network", f"Input should be {allowed}")
        return name

    width: float = Field(
        1.0, gt=0, le=16
    )  # net, cnn, resnet9: multiplies every layer's channels and units
    depth: int = Field(3, ge=1, le=5)  # cnn: conv blocks (3×3 conv, [batch norm], ReLU, max-pool 2)
    batch_norm: bool = False  # cnn: batch norm after each convolution
    dropout: float = Field(0.0, ge=0, lt=1)  # net, cnn: p of dropout before each dense layer
    conv_dropout: float = Field(
        0.0, ge=0, lt=1
    )  # net, cnn: p of spatial dropout after each conv block
    # EfficientNet-Lite: p of the dropout before the classifier; null = the network's own (0.2,
    # Lite2 0.3). In the trainable suffix: the feature cache still applies.
    head_dropout: float | None = Field(None, ge=0, lt=1)
    # none | imagenet | a state-dict file | runs:/<run id>/model or models:/... (stages/networks/weights.py)
    pretrained: str = Field("none", min_length=1)
    input_size: int | None = Field(
        None, ge=16, le=512
    )  # pixels the network sees (resized in the model); null = data.image_size
    freeze: str = Field(
        "none", pattern=r"^(none|backbone|all_but_last_[1-9][0-9]*)$"
    )  # parameters held fixed
    freeze_bn: bool = False  # batch-norm statistics and affine parameters fixed


class EarlyStopping(Section):
    enabled: bool = False
    monitor: Literal["val_loss", "val_accuracy"] = "val_loss"  # also defines best_epoch
    patience: int = Field(5, ge=1)  # epochs without improvement before stopping
    min_delta: float = Field(0.0, ge=0)  # smaller changes don't count as improvement
    restore_best: bool = True  # save the best epoch's weights, not the last


class Train(Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(100, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.001, gt=0)  # peak learning rate
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    weight_decay: float = Field(0.0, ge=0)  # the optimizer's decay (decoupled for adamw)
    l1: float = Field(0.0, ge=0)  # loss += l1 * sum |w| over weights (not biases or norm layers)
    l2: float = Field(0.0, ge=0)  # loss += l2 * sum w^2 over the same weights
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weighting: Literal["none", "balanced"] = "none"  # balanced: weight_c = N / (K * n_c)
    schedule: Literal["none", "cosine", "step", "onecycle"] = (
        "none"  # learning-rate schedule, per step
    )
    step_epochs: int = Field(
        10, ge=1
    )  # schedule=step: multiply the lr by step_gamma every this many epochs
    step_gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: int = Field(
        0, ge=0
    )  # linear warm-up from 0 (none/cosine/step; onecycle has its own)
    early_stopping: EarlyStopping = EarlyStopping()
    backbone_lr_mult: float = Field(1.0, ge=0)  # lr of everything but the head = lr * this
    # block k counted from the head (head: k = 0) trains at lr * this^k; 1 = off
    layer_lr_decay: float = Field(1.0, gt=0, le=1)
    unfreeze_at_epoch: int = Field(0, ge=0)  # from this epoch on, model.freeze is lifted; 0 = never
    l2_sp: float = Field(0.0, ge=0)  # loss += l2_sp * sum (w - w_pretrained)^2 (L2-SP)
    # false: biases and norm layers (1-D parameters) get no weight decay (timm's usual groups)
    decay_bias_and_norm: bool = True
    # keep, measure and save an EMA of the weights: avg = decay * avg + (1 - decay) * w per step
    ema_decay: float = Field(0.0, ge=0, lt=1)
    swa_start_epoch: int = Field(0, ge=0)  # SWA: the mean of the weights after each epoch from this
    sam_rho: float = Field(0.0, ge=0)  # SAM: radius of the ascent step (L2 norm of the weights)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the GPU when there is one
    compile: bool = False  # torch.compile the model (slower for net on a CPU: docs/speed.md)
    # with model.freeze: the frozen blocks' outputs computed once per image and reused every
    # epoch, when nothing random reaches them (stages/networks/feature_cache.py); false recomputes
    feature_cache: bool = True
    # PyTorch CPU threads; 0 = every core this process may use when it computes alone, its share
    # when others of the pipeline compute on this machine too (runtime.CoreShare)
    threads: int = Field(0, ge=0)
    # processes of distributed data-parallel training (torchrun, one per GPU or a share of the
    # CPU cores each); batch_size stays the global batch. Under torchrun, its --nproc-per-node rules.
    nproc: int = Field(1, ge=1, le=64)


# CIFAR-10's classes in two groups: the default for tasks.coarse.groups
VEHICLES_ANIMALS = {
    "vehicle": ["airplane", "automobile", "ship", "truck"],
    "animal": ["bird", "cat", "deer", "dog", "frog", "horse"],
}


class Coarse(Section):
    weight: float = Field(0.0, ge=0)  # loss weight of predicting each image's group; 0 = off
    # group name -> class names: every class of the data in exactly one group (checked by train)
    groups: dict[str, list[str]] = Field(default_factory=lambda: dict(VEHICLES_ANIMALS))

    @field_validator("groups")
    @classmethod
    def _groups(cls, groups: dict[str, list[str]]) -> dict[str, list[str]]:
        if len(groups) < 2:
            raise ValueError("needs at least two groups")
        seen: dict[str, str] = {}
        for group, names in groups.items():
            if not names:
                raise ValueError(f"group {group!r} is empty")
            for name in names:
                if name in seen:
                    raise ValueError(
                        f"class {name!r} is in groups {seen[name]!r} and {group!r}: "
                        "every class belongs to exactly one group"
                    )
                seen[name] = group
        return groups


class Rotation(Section):
    weight: float = Field(0.0, ge=0)  # loss weight of predicting the 0/90/180/270° turn; 0 = off


class Tasks(Section):
    # fixed: loss = main + sum weight * task loss; uncertainty: weights learned (Kendall et al., 2018)
    weighting: Literal["fixed", "uncertainty"] = "fixed"
    coarse: Coarse = Coarse()
    rotation: Rotation = Rotation()


class Evaluate(Section):
    # The verdict (docs/pipeline.md: "Overfitting, underfitting"): underfitting when the model is poor on
    # its own training data; overfitting when it is good there but much worse on new data.
    min_train_accuracy: float = Field(0.6, ge=0, le=1)  # below: underfitting
    max_gap: float = Field(0.1, ge=0, le=1)  # train - test accuracy above this: overfitting
    # WiSE-FT (Wortsman et al., 2022): backbone = (1 - a) * pretrained + a * fine-tuned, for each a
    # here (and a = 1); a picked on validation. Needs model.pretrained; [] = off
    wise_alphas: list[float] = Field(default_factory=list)

    @field_validator("wise_alphas")
    @classmethod
    def _alphas(cls, alphas: list[float]) -> list[float]:
        if any(not 0 <= a <= 1 for a in alphas):
            raise ValueError("every alpha must be in [0, 1] (0: pretrained, 1: fine-tuned)")
        return alphas


class Mlflow(Section):
    experiment: str = Field("overfitting", min_length=1)
    # null: $MLFLOW_TRACKING_URI if set, else sqlite:///<repository root>/mlflow.db;
    # journal:<folder>: no MLflow, a journal replayed later (stages/tracking/journal.py)
    tracking_uri: str | None = None


class Params(Section):
    seed: int = Field(0, ge=0)
    data: Data = Data()
    augment: Augment = Augment()
    model: Model = Model()
    train: Train = Train()
    tasks: Tasks = Tasks()
    evaluate: Evaluate = Evaluate()
    mlflow: Mlflow = Mlflow()


def parse(raw: dict[str, Any]) -> Params:
    """Validate a params dict; raise ParamsError with one line naming key, value and rule."""
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            section = _section_of(err["loc"][:-1])
            allowed = ", ".join(section.model_fields)
            raise ParamsError(
                f"params.yaml: unknown key '{key}' = {_show(err['input'])} "
                f"(allowed here: {allowed})"
            ) from None
        raise ParamsError(f"params.yaml: {key} = {_show(err['input'])}: {err['msg']}") from None
    check_combinations(params)
    return params


SHAPE_KEYS = (
    "width",
    "depth",
    "batch_norm",
    "dropout",
    "conv_dropout",
    "head_dropout",
)  # of some networks only


def input_sizes(m: Model) -> tuple[int, int, str]:
    """(smallest, largest, why): the model.input_size range that makes sense for the network."""
    return network_of(m).input_sizes(m)


def network_of(m: Model) -> registry.Network:
    """model.name's registry entry; for timm/<architecture>, one timm makes (an unknown
    architecture is a ParamsError)."""
    try:
        return registry.network(m.name)
    except (KeyError, ValueError) as error:
        raise ParamsError(f"params.yaml: model.name = {m.name}: {error.args[0]}") from None


def check_combinations(params: Params) -> None:
    """Values that are fine alone but mean nothing together: an error, not a silent no-op."""
    m, t = params.model, params.train
    if params.data.source in OFFICIAL_SOURCES and params.data.sha256:
        # The usual way here: switching the bundled default to the official download with -S
        # data.source=cifar10 while data.sha256 still pins the bundled file.
        raise ParamsError(
            f"params.yaml: data.source = {params.data.source} is checked against its published "
            f"MD5, so data.sha256 must be null (it is {params.data.sha256[:12]}…): "
            "add -S data.sha256=null"
        )
    entry = network_of(m)
    for key in SHAPE_KEYS:
        default = Model.model_fields[key].default
        if key not in entry.shape_keys and getattr(m, key) != default:
            models = [n for n, e in registry.NETWORKS.items() if key in e.shape_keys]
            raise ParamsError(
                f"params.yaml: model.{key} = {getattr(m, key)!r} applies to "
                f"{' and '.join(models)}, not to {m.name} (leave it at {default!r})"
            )
    a = params.augment
    if a.resized_crop_scale is None and a.resized_crop_ratio != Augment().resized_crop_ratio:
        raise ParamsError(
            f"params.yaml: augment.resized_crop_ratio = {a.resized_crop_ratio} shapes the "
            "resized crop, which is off (augment.resized_crop_scale is null)"
        )
    if entry.mean_std is not None and params.data.normalize == "dataset":
        raise ParamsError(
            f"params.yaml: data.normalize = dataset is for networks without weights of their "
            f"own; {m.name} normalizes its inputs as its ImageNet weights expect"
        )
    if entry.weights is None and m.pretrained == "imagenet":
        raise ParamsError(
            f"params.yaml: model.pretrained = imagenet: there are no ImageNet "
            f"weights for {m.name} (allowed: {', '.join(backbones())})"
        )
    # What the network sees: model.input_size, or the data's own size. Checked here, so that the
    # check stage refuses it before download and augment have run.
    low, high, why = input_sizes(m)
    if m.input_size is not None and not low <= m.input_size <= high:
        raise ParamsError(
            f"params.yaml: model.input_size = {m.input_size}: {m.name} takes "
            f"{low}…{high} pixels ({why})"
        )
    if m.input_size is None and not low <= params.data.image_size <= high:
        raise ParamsError(
            f"params.yaml: data.image_size = {params.data.image_size}: {m.name} takes "
            f"{low}…{high} pixels ({why}); set model.input_size to resize inside the model, "
            "or change data.image_size"
        )
    if m.freeze.startswith("all_but_last_") and entry.block_count is not None:
        keep, blocks = int(m.freeze.rsplit("_", 1)[1]), entry.block_count(m)
        if keep > blocks:
            raise ParamsError(
                f"params.yaml: model.freeze = {m.freeze}: {m.name} has only {blocks} blocks "
                f"(all_but_last_{blocks} or none trains every one)"
            )
    if m.freeze_bn and not entry.batch_norm(m):
        raise ParamsError(
            f"params.yaml: model.freeze_bn = true, but {m.name} has no batch norm "
            "here (cnn needs model.batch_norm = true)"
        )
    if t.l2_sp and m.pretrained == "none":
        raise ParamsError(
            "params.yaml: train.l2_sp needs pretrained weights to stay close to "
            "(model.pretrained is none)"
        )
    if not t.decay_bias_and_norm and not t.weight_decay:
        raise ParamsError(
            "params.yaml: train.decay_bias_and_norm = false exempts biases and norm layers "
            "from weight decay, but train.weight_decay is 0"
        )
    if t.ema_decay and t.swa_start_epoch:
        raise ParamsError(
            "params.yaml: train.ema_decay and train.swa_start_epoch are two ways to average the "
            "weights: choose one (set the other to 0)"
        )
    if t.swa_start_epoch > t.epochs:
        raise ParamsError(
            f"params.yaml: train.swa_start_epoch = {t.swa_start_epoch}, but training stops "
            f"after train.epochs = {t.epochs}: nothing would be averaged"
        )
    if t.layer_lr_decay != 1 and t.backbone_lr_mult != 1:
        raise ParamsError(
            f"params.yaml: train.layer_lr_decay = {t.layer_lr_decay} and train.backbone_lr_mult = "
            f"{t.backbone_lr_mult}: both set the backbone's learning rate; use one "
            "(backbone_lr_mult is one rate for every block, layer_lr_decay one per block)"
        )
    if params.evaluate.wise_alphas and m.pretrained == "none":
        raise ParamsError(
            "params.yaml: evaluate.wise_alphas interpolates between the pretrained and the "
            "fine-tuned weights, but model.pretrained is none: set it, or wise_alphas: []"
        )
    if t.unfreeze_at_epoch and m.freeze == "none":
        raise ParamsError(
            f"params.yaml: train.unfreeze_at_epoch = {t.unfreeze_at_epoch}, but "
            "model.freeze is none: nothing to unfreeze"
        )


# Keys that say where a run is logged or how it is computed, not what it learns or measures:
# dvc.yaml lists them for no stage but check (changing one reruns nothing), a saved model's
# params leave them out (so its bytes don't follow them), and the MLflow run still logs them.
# train.threads is not one of them: another thread count sums in another order (docs/pipeline.md).
NOT_RESULT_KEYS = ("mlflow", "train.feature_cache")  # a section, or one key of a section


def result_params(params: Params) -> dict[str, Any]:
    """params as a nested dict without NOT_RESULT_KEYS: what a saved model keeps of them."""
    exclude: dict[str, Any] = {}
    for key in NOT_RESULT_KEYS:
        section, _, leaf = key.partition(".")
        exclude[section] = {**exclude.get(section, {}), leaf: True} if leaf else True
    return params.model_dump(exclude=exclude)


def load(path: Path = PARAMS_FILE) -> Params:
    return parse(read_yaml(path))


class _StrictLoader(yaml.SafeLoader):
    """YAML as DVC reads it: a key given twice in one mapping is an error, not a silent override."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ParamsError(
                    f"{self.name}: key '{key}' is given twice (lines {seen[key]} and {line}); "
                    "the second would silently replace the first: merge them"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path = PARAMS_FILE) -> dict:
    """A params file as a dict: valid YAML, a mapping at the top, no key given twice."""
    path = Path(path)
    try:
        loader = _StrictLoader(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path} not found: run the stages from the repository root") from None
    loader.name = str(path)
    try:
        raw = loader.get_single_data() or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    finally:
        loader.dispose()
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping of sections, not {type(raw).__name__}")
    return raw


def with_changes(raw: dict, changes: dict[str, Any]) -> dict:
    """A copy of a params dict with dotted changes applied: {"train.lr": 0.01} sets train: lr."""
    import copy

    out = copy.deepcopy(raw)
    for key, value in changes.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def set_options(changes: dict[str, Any]) -> list[str]:
    """Dotted changes as `dvc exp run` options: ["-S", "train.lr=0.01", ...] (None is null)."""
    return [
        arg
        for key, value in changes.items()
        for arg in ("-S", f"{key}={'null' if value is None else value}")
    ]


def flatten(params: Params) -> dict[str, Any]:
    """{'train.lr': 0.001, ...}: the names MLflow logs, as written in params.yaml."""
    return flatten_dict(params.model_dump())


def flatten_dict(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {'dotted.key': value}."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten_dict(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _show(value: Any, limit: int = 80) -> str:
    """A value as the error line shows it: its repr (one line), cut short if it is long."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _section_of(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = Params
    for part in loc:
        model = model.model_fields[part].annotation  # type: ignore[assignment]
    return model
