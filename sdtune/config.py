"""Typed run configuration: one YAML file names a whole run (data → caption → train → evaluate → register).

Every section is a strict pydantic model: an unknown key or a bad value is a :class:`ConfigError` with one
line naming the key. ``train`` is the section of ``train.method`` (one class per method, flat in the YAML), so
an option of another method is refused with the options this method takes. Presets live in ``configs/<model>/<method>_<hardware>.yaml``; ``key=value``
overrides use dotted paths from the root (``train.learning_rate=5e-5``) and YAML values (``true``, ``[a,b]``).

This module imports pydantic and yaml only, so it is safe to import anywhere (components, pipelines, tests).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from sdtune.errors import ConfigError

# "register" is the natural YAML name of the registry section; it shadows ABCMeta.register, harmlessly.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)

Arch = Literal["sd15", "sd2", "sdxl", "sd3"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    """The base model: a local diffusers folder, a hub id (on a cluster) or ``s3://bucket/prefix``."""

    base: str = ".sdtune/models/tiny-sd15"
    arch: Arch = "sd15"
    revision: str | None = None
    cache_dir: str = ".sdtune/cache/models"


class IngestConfig(Section):
    sources: list[str] = Field(default_factory=list)
    min_images: int = Field(5, ge=1)
    max_reject_fraction: float = Field(0.5, ge=0.0, le=1.0)
    max_aspect_ratio: float = Field(4.0, ge=1.0)
    background: str = "white"  # what transparent pixels are composited onto
    # Limits for untrusted input; docs/data.md explains each one.
    min_side: int = Field(64, ge=1)  # shorter side in pixels, before any upscaling
    max_image_bytes: int = Field(64 << 20, ge=1)
    max_image_pixels: int = Field(64_000_000, ge=1)  # decompression-bomb limit
    near_duplicate_distance: int | None = Field(4, ge=0, le=64)  # phash Hamming distance; None disables
    zip_max_entries: int = Field(10_000, ge=1)
    zip_max_total_bytes: int = Field(4 << 30, ge=1)
    zip_max_ratio: float = Field(200.0, ge=1.0)  # per member, uncompressed / compressed
    fetch_connect_timeout_s: float = Field(10.0, gt=0)
    fetch_total_timeout_s: float = Field(120.0, gt=0)  # per object, whatever the server trickles
    fetch_max_redirects: int = Field(5, ge=0, le=20)
    fetch_retries: int = Field(3, ge=0, le=10)  # on 5xx, 429 and connection resets, with backoff
    max_download_bytes: int = Field(2 << 30, ge=1)  # per downloaded zip
    fetch_allow_networks: list[str] = Field(default_factory=list)  # CIDRs allowed besides public addresses
    image_column: str = "image"  # catalogue (CSV/JSONL/Parquet) column naming the image: path, URL or s3://
    caption_column: str = "caption"
    # Buckets a catalogue's s3:// rows may name (rows are fetched with the pipeline's own keys); besides
    # these, only the buckets of the run's own s3:// sources. Other rows: bad_row "bucket not allowed".
    catalogue_buckets: list[str] = Field(default_factory=list)
    shard_size: int = Field(0, ge=0)  # records per shard for fanned-out preprocessing; 0: one shard

    @field_validator("fetch_allow_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for net in value:
            ipaddress.ip_network(net, strict=False)  # ValueError → one-line ConfigError naming the key
        return value


class PreprocessConfig(Section):
    resolution: int = Field(512, ge=8, multiple_of=8)  # the VAE's 8× downsampling; pipelines refuse others
    crop: Literal["center", "face", "none"] = "center"  # face: square around the faces (opencv extra)
    upscaler: Literal["lanczos", "swin2sr"] = "lanczos"
    upscaler_model: str | None = None  # Swin2SR weights: local folder, hub id or s3://bucket/prefix
    mask_prompt: str | None = None  # e.g. "a dog": CLIPSeg subject masks saved as NNNNNN.mask.png
    mask_model: str | None = None  # CLIPSeg weights: local folder, hub id or s3://bucket/prefix
    mask_threshold: float = Field(0.4, ge=0.0, le=1.0)  # CLIPSeg probability counted as subject
    # clipseg: masks when mask_prompt is set; face: feathered ellipses over the faces OpenCV finds (faces extra)
    mask_source: Literal["clipseg", "face"] = "clipseg"
    workers: int | None = Field(None, ge=1)  # processes; None: min(4, CPUs); model steps run in-process
    cache_dir: str = ".sdtune/cache/models"  # where s3:// model weights are downloaded
    parallel_shards: int = Field(8, ge=1)  # preprocess tasks running at once when ingest is sharded


class CaptionConfig(Section):
    trigger: str = "sks"
    class_noun: str = "person"
    template: str = "a photo of {trigger} {class_noun}"
    use_sidecars: bool = True
    holdout_fraction: float = Field(0.15, ge=0.0, lt=1.0)  # held out for evaluation (≥1 image if ≥5)
    # blip / blip2 / florence2: a captioning model for uncaptioned images
    captioner: Literal["template", "blip", "blip2", "florence2"] = "template"
    captioner_model: str | None = None  # the model's weights: local folder, hub id or s3://bucket/prefix
    florence2_task: Literal["<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>"] = "<CAPTION>"
    model_template: str = "a photo of {trigger} {class_noun}, {caption}"  # wraps a model's caption
    batch_size: int = Field(8, ge=1)  # images per captioning-model call
    max_new_tokens: int = Field(30, ge=1)  # longest caption the model may generate
    tokenizer: str | None = (
        None  # training tokenizer (folder, or a diffusers model folder) for the length check
    )
    max_tokens: int = Field(77, ge=2)  # the text encoder's context, special tokens included
    cache_dir: str = ".sdtune/cache/models"  # where s3:// model weights are downloaded

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        return plain_template(value, PROMPT_FIELDS)

    @field_validator("model_template")
    @classmethod
    def _model_template(cls, value: str) -> str:
        return plain_template(value, (*PROMPT_FIELDS, "caption"))


class TrainConfig(Section):
    """What every method shares. Method-specific options live in the method's own section below (flat in the
    YAML: ``train.rank`` stays ``train.rank``); ``train.method`` picks the section, and an option of another
    method is a config error naming the options this method takes (:func:`method_options`)."""

    method: str = "lora"
    max_steps: int = Field(500, ge=1)
    batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: Literal["constant", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    adam_weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    log_every: int = Field(1, ge=1)
    num_processes: int = Field(1, ge=1)  # processes per node (GPUs); >1 launches through torchrun
    prediction_type: Literal["epsilon", "v_prediction"] | None = None  # None: the scheduler's own
    snr_gamma: float | None = Field(None, gt=0)  # min-SNR-γ loss weighting (5.0 is the usual value)
    noise_offset: float = Field(0.0, ge=0)  # e.g. 0.05: helps very dark/bright images
    # auto: off when the planner says the run fits the GPU without it (it costs ~1/3 more FLOPs), on when not;
    # off on a CPU (sdtune.train.plan.checkpointing_choice). The choice is in train_summary.json.
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    # denoiser: eager, torch.compile whole/per repeated block, CUDA graphs (CUDA only): sdtune/train/compile.py
    compile: Literal["none", "default", "regional", "graphs"] = "none"
    # Validation during training: every N optimizer steps (0: off) rank 0 samples evaluate.prompts ×
    # evaluate.seeds with the current weights → <out>/validation/step_NNNNNN.png (+ the tracking logger).
    validation_every: int = Field(0, ge=0)
    validation_inference_steps: int = Field(20, ge=1)
    # Optimizer: AdamW for real runs; plain SGD (no momentum) makes N×b vs 1×(N·b) equal to fp32 round-off.
    # adamw8bit: bitsandbytes' 8-bit AdamW (needs the package and a CUDA GPU).
    optimizer: Literal["adamw", "adamw8bit", "sgd"] = "adamw"
    # Scale-out (docs/distributed.md): DDP replicates the model; FSDP2 shards weights, grads and optimizer
    # state over the ranks (dreambooth/full only: a LoRA's trainable part is too small to be worth sharding).
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    # Checkpoints and resume (docs/distributed.md): every N optimizer steps (0: only when preempted),
    # the newest K kept, in <out>/checkpoints unless set (a folder or s3://bucket/prefix).
    checkpoint_every: int = Field(500, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    checkpoint_dir: str | None = None
    resume: str = "auto"  # auto: the newest complete checkpoint, if any; never; or a checkpoint path/URI
    preempt_grace_s: float = Field(60.0, gt=0)  # SIGTERM → checkpoint written and exit 75 within this
    # Flow matching (model families whose objective is flow matching: model.arch=sd3, any method; refused on
    # other families when set to a non-default value). Timesteps drawn from a logit-normal density (SD3 paper:
    # mean 0, std 1) or uniformly; T5 prompt length in tokens (the CLIP encoders keep 77).
    timestep_density: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    max_sequence_length: int = Field(77, ge=1, le=512)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        # YAML 1.1 reads an unquoted `no` as false; `mixed_precision: no` means the "no" mode.
        return "no" if value is False else value

    def option(self, name: str, default: Any = None) -> Any:
        """``train.<name>`` when this method takes that option, else ``default`` — for code shared by methods
        (planner, outputs) that reads an option only some methods have. A name no method knows is a bug."""
        if name not in ALL_TRAIN_OPTIONS:
            raise AttributeError(f"no method has a train option {name!r}")
        return getattr(self, name, default)


# Options some methods share, as mixins (fields only): a method's section lists the mixins it takes.
class LoraAdapter(Section):
    rank: int = Field(4, ge=1)
    alpha: float | None = None  # defaults to rank (scale 1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


class KohyaExport(Section):
    export_kohya: bool = True  # also write lora_kohya.safetensors (A1111/ComfyUI/kohya)


class Dora(Section):
    use_dora: bool = False  # weight-decomposed LoRA (peft); no kohya file (kohya's format has no DoRA)


class ConceptTokens(Section):
    # the concept is <trigger> (+ <trigger>_1 …), num_vectors tokens in all
    num_vectors: int = Field(1, ge=1)
    initializer_token: str | None = None  # default: the last word of caption.class_noun


class PriorPreservation(Section):
    """Each step also denoises class images; loss = instance + ``prior_loss_weight`` × class."""

    with_prior_preservation: bool = True
    prior_loss_weight: float = Field(1.0, ge=0)
    num_class_images: int = Field(100, ge=1)
    class_prompt: str = "a photo of {class_noun}"
    class_data_dir: str | None = None  # images of the class; generated with the base model when missing
    class_image_steps: int = Field(25, ge=1)  # inference steps for generated class images
    # Guidance for generated class images. Lower keeps them closer to what the base itself predicts for the
    # class prompt (the prior to preserve): on a v-prediction tiny base, class images at 7.5 raised the class
    # prompt's held-out loss 22–56 %, at 2 it stayed within ±5 % (docs/evaluation.md).
    class_image_guidance: float = Field(7.5, ge=1.0)

    @field_validator("class_prompt")
    @classmethod
    def _class_prompt(cls, value: str) -> str:
        return plain_template(value, PROMPT_FIELDS)


class TextEncoderTraining(Section):
    # the text encoder(s) train too (lora: a LoRA on them; dreambooth: the whole encoders), at their own lr;
    # captions are then tokenized once and encoded every step (sdtune/train/text_encoders.py)
    train_text_encoder: bool = False
    text_encoder_lr: float | None = Field(None, gt=0)  # default: learning_rate


class SingleFileExport(Section):
    # also model.safetensors in the original SD layout (SD 1.x, 2.x, SDXL: sdtune.train.single_file)
    export_single_file: bool = True


# One section per method. The mixins come first so that the shared fields lead in a dumped config.
class LoraTrain(LoraAdapter, Dora, KohyaExport, PriorPreservation, TextEncoderTraining, TrainConfig):
    method: Literal["lora"] = "lora"
    text_encoder_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"]
    )
    with_prior_preservation: bool = False  # opt-in for LoRA (DreamBooth-LoRA)


class TextualInversionTrain(ConceptTokens, TrainConfig):
    method: Literal["textual_inversion"] = "textual_inversion"


class PivotalTrain(LoraAdapter, KohyaExport, ConceptTokens, TrainConfig):
    method: Literal["pivotal"] = "pivotal"
    embedding_learning_rate: float | None = Field(None, gt=0)  # lr of the new embeddings
    embedding_train_fraction: float = Field(1.0, gt=0, le=1)  # then LoRA-only for the rest


class DreamboothTrain(PriorPreservation, TextEncoderTraining, SingleFileExport, TrainConfig):
    method: Literal["dreambooth"] = "dreambooth"


class InpaintTrain(LoraAdapter, Dora, KohyaExport, TrainConfig):
    method: Literal["inpaint"] = "inpaint"
    inpaint_full_unet: bool = False  # the whole 9-channel UNet instead of a LoRA
    inpaint_masks: Literal["random", "supplied", "both"] = "both"  # supplied: <file>.mask.png from preprocess
    inpaint_masks_per_image: int = Field(4, ge=1)  # random masks drawn (seeded) and encoded once per image


class FullTrain(SingleFileExport, TrainConfig):
    method: Literal["full"] = "full"
    # EMA of the UNet weights, saved instead of the raw ones; latents cached on disk in shards
    use_ema: bool = False
    ema_decay: float = Field(0.9999, gt=0, lt=1)
    cache_shard_size: int = Field(256, ge=1)  # images per <out>/cache/latents-NNNNN.safetensors shard


METHOD_SECTIONS: dict[str, type[TrainConfig]] = {
    cls.model_fields["method"].default: cls
    for cls in (LoraTrain, TextualInversionTrain, PivotalTrain, DreamboothTrain, InpaintTrain, FullTrain)
}
SHARED_TRAIN_OPTIONS = tuple(TrainConfig.model_fields)
ALL_TRAIN_OPTIONS = frozenset(name for cls in METHOD_SECTIONS.values() for name in cls.model_fields)
# Options that only the flow-matching families read (refused elsewhere unless left at their defaults).
FLOW_MATCHING_OPTIONS = ("timestep_density", "logit_mean", "logit_std", "max_sequence_length")


def method_options(method: str) -> list[str]:
    """The options ``method`` takes besides the shared ones: its mixins' in order, then its own."""
    section = METHOD_SECTIONS[method]
    names: list[str] = []
    for part in (*section.__bases__, section):
        names += [n for n in part.model_fields if n not in SHARED_TRAIN_OPTIONS and n not in names]
    return names


def merge_updates(data: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` (overrides, a sweep trial) applied over ``data`` (a file, a stored config). When it switches
    ``train.method``, the options ``data`` held for its own method that the new one lacks are dropped: they
    were consistent where they came from (``tiny_cpu.yaml train.method=dreambooth`` drops the preset's
    ``rank``), while a misapplied option given in ``update`` itself stays an error."""
    train, new = data.get("train"), update.get("train")
    method = new.get("method") if isinstance(new, dict) else None
    if (
        isinstance(train, dict)
        and isinstance(method, str)
        and method in METHOD_SECTIONS
        and method != train.get("method", "lora")
    ):
        takes = METHOD_SECTIONS[method].model_fields
        kept = {k: v for k, v in train.items() if k in takes or k not in ALL_TRAIN_OPTIONS}
        data = {**data, "train": kept}
    return _merge(data, update)


def _method_tag(value: Any) -> str | None:
    method = value.get("method", "lora") if isinstance(value, dict) else getattr(value, "method", None)
    return method if isinstance(method, str) else repr(method)  # not a method: union_tag_invalid


# The train section as RunConfig holds it: the section of train.method (lora when unset).
TrainSection = Annotated[
    Union[tuple(Annotated[cls, Tag(name)] for name, cls in METHOD_SECTIONS.items())],  # noqa: UP007
    Discriminator(_method_tag),
]


Seed = Annotated[int, Field(ge=0, lt=2**63)]  # what torch.Generator.manual_seed takes


class EvaluateConfig(Section):
    prompts: list[str] = Field(
        min_length=1,
        default_factory=lambda: [
            "a photo of {trigger} {class_noun}",
            "a photo of {trigger} {class_noun} on a beach",
            "a painting of {trigger} {class_noun}",
        ],
    )
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1], min_length=1)
    num_inference_steps: int = Field(25, ge=1)
    guidance_scale: float = 7.5
    # Timesteps of the 1,000-step training schedule every SD model shares (SD3: σ = t / 1000).
    loss_timesteps: list[Annotated[int, Field(ge=0, lt=1000)]] = Field(
        default_factory=lambda: [100, 300, 500, 700, 900], min_length=1
    )
    loss_seeds: list[Seed] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    image_metric_samples: int = Field(8, ge=1)  # pictures per prompt for the image-space subject metric
    # Fidelity encoders (local folder, hub id or s3://); unset → those metrics are skipped with a note.
    clip_model: str | None = None  # e.g. openai/clip-vit-large-patch14: CLIP-T, CLIP-I
    dino_model: str | None = None  # e.g. facebook/dino-vits16: DINO subject fidelity
    fid_model: str | None = None  # feature model for FID/KID on large held-out sets
    fid_min_images: int = Field(50, ge=2)

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, value: list[str]) -> list[str]:
        return [plain_template(p, PROMPT_FIELDS) for p in value]


class RegisterConfig(Section):
    """The registry and the retrain gate: a new version always gets ``alias``; it replaces the champion only
    when ``gate_metric`` beats the champion's by more than ``gate_margin`` (the first version is promoted)."""

    model_name: str = "sdtune-model"
    alias: str = "candidate"
    champion_alias: str = "champion"
    gate_metric: str = "loss_tuned_trigger"
    gate_direction: Literal["minimize", "maximize"] = "minimize"
    gate_margin: float = Field(0.0, ge=0.0)


class CacheConfig(Section):
    """Content-addressed step cache (see ``sdtune/cache.py``): unchanged inputs skip the step."""

    enabled: bool = True
    steps: list[Literal["ingest", "preprocess", "caption", "train", "evaluate"]] = Field(
        default_factory=lambda: ["ingest", "preprocess", "caption", "train", "evaluate"]
    )


class TrackingConfig(Section):
    experiment: str = "sdtune"


class Toleration(Section):
    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class StepResources(Section):
    """Requests/limits of one pipeline step; ``gpus`` > 0 requests ``nvidia.com/gpu`` and the GPU node pool."""

    cpu_request: str = "500m"
    cpu_limit: str = "2"
    memory_request: str = "1Gi"
    memory_limit: str = "4Gi"
    gpus: int = Field(0, ge=0)
    # DataLoader workers share tensors through /dev/shm; the container default (64 MiB) kills them.
    shm: bool = False


# Subclasses only change defaults, so an override like ``cluster.steps.train.gpus=8`` keeps the other
# train defaults (a dict of StepResources would reset them to the light ones).
class DataStepResources(StepResources):
    cpu_request: str = "2"
    cpu_limit: str = "4"
    memory_request: str = "4Gi"
    memory_limit: str = "16Gi"
    shm: bool = True


class GpuStepResources(StepResources):
    cpu_request: str = "8"
    cpu_limit: str = "16"
    memory_request: str = "64Gi"
    memory_limit: str = "96Gi"
    gpus: int = Field(1, ge=0)
    shm: bool = True


class StepsConfig(Section):
    start_run: StepResources = Field(default_factory=StepResources)
    ingest: StepResources = Field(default_factory=StepResources)
    preprocess: DataStepResources = Field(default_factory=DataStepResources)
    caption: DataStepResources = Field(default_factory=DataStepResources)
    train: GpuStepResources = Field(default_factory=GpuStepResources)
    evaluate: GpuStepResources = Field(default_factory=GpuStepResources)
    register: StepResources = Field(default_factory=StepResources)


class SecretEnv(Section):
    """A Kubernetes Secret exposed to tasks as env vars (``env`` maps ENV_NAME → key in the Secret)."""

    name: str
    env: dict[str, str]
    optional: bool = False


class ClusterConfig(Section):
    """How the pipeline runs on Kubernetes; ignored by local runs (see docs/cluster.md).

    ``launcher`` picks the training path: ``single_node`` runs torchrun inside the KFP task with
    ``train.num_processes`` ranks, one GPU each; ``trainjob`` / ``pytorchjob`` start a Kubeflow Trainer v2
    TrainJob / Training Operator v1 PyTorchJob of ``num_nodes`` nodes × ``train.num_processes`` GPUs
    (``sdtune.cluster.placement``: the GPUs requested are always the GPUs the ranks use).
    """

    namespace: str | None = None  # None: the namespace the pipeline pod runs in
    service_account: str = "sdtune-pipeline"
    # Training job and Katib trial pods: no role bindings, no token mounted (manifests/base).
    job_service_account: str = "sdtune-training"
    launcher: Literal["single_node", "trainjob", "pytorchjob"] = "single_node"
    num_nodes: int = Field(1, ge=1)
    # None: train.num_processes. Set, it must equal train.num_processes (or be 0: CPU-only nodes).
    gpus_per_node: int | None = Field(None, ge=0)
    # A planner GPU name (a100-80gb, h100-80gb, …): GPU pods get a node affinity on nvidia.com/gpu.product.
    gpu_model: str | None = None
    trainjob_runtime: str = "torch-distributed"
    job_timeout_s: int = Field(7 * 24 * 3600, ge=60)
    steps: StepsConfig = Field(default_factory=StepsConfig)
    shm_size: str = "16Gi"
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    gpu_node_selector: dict[str, str] = Field(default_factory=dict)
    gpu_tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
    )
    # Default S3 keys: those of the object store Kubeflow Pipelines already runs (synced to profile
    # namespaces); HF_TOKEN (gated models such as SD3) from an optional Secret.
    secrets: list[SecretEnv] = Field(
        default_factory=lambda: [
            SecretEnv(
                name="mlpipeline-minio-artifact",
                env={"AWS_ACCESS_KEY_ID": "accesskey", "AWS_SECRET_ACCESS_KEY": "secretkey"},
            ),
            SecretEnv(
                name="sdtune-mlflow-auth",
                env={"MLFLOW_TRACKING_USERNAME": "username", "MLFLOW_TRACKING_PASSWORD": "password"},
            ),
            SecretEnv(name="sdtune-hf-token", env={"HF_TOKEN": "token"}, optional=True),
        ]
    )
    config_map: str = "sdtune-env"  # MLFLOW_TRACKING_URI, MLFLOW_S3_ENDPOINT_URL (manifests/base)
    # Multi-node jobs exchange the dataset and outputs, and in-cluster runs keep their checkpoints, under
    # this prefix. ``{namespace}`` becomes the profile namespace at run time: KFP >= 2.15 lets a namespace
    # write only under ``allowed_s3_prefixes``.
    staging_uri: str = Field(
        "s3://mlpipeline/private-artifacts/{namespace}/sdtune/staging", validate_default=True
    )
    allowed_s3_prefixes: list[str] = Field(
        default_factory=lambda: [
            "s3://mlpipeline/artifacts/",
            "s3://mlpipeline/private-artifacts/{namespace}/",
            "s3://mlpipeline/private/{namespace}/",
            "s3://mlpipeline/shared/",
        ]
    )
    train_image: str | None = None  # image of the job's pods; the pipeline fills in the train image
    train_retries: int = Field(2, ge=0)
    retry_backoff: str = "120s"
    # Job pods request ephemeral storage: twice the staged dataset (download + latent cache) plus this.
    ephemeral_storage_base: str = "50Gi"
    # A ReadWriteMany PVC mounted at the model cache and the step cache of GPU pods (base model fetched once
    # per cluster, a retrain hits the step cache); None: per-pod caches.
    cache_pvc: str | None = None
    image_pull_secrets: list[str] = Field(default_factory=list)
    # Kueue: jobs and GPU tasks carry kueue.x-k8s.io/queue-name (admitted whole or not at all).
    kueue_queue: str | None = None
    kueue_priority_class: str | None = None  # a WorkloadPriorityClass
    # Egress (manifests/base NetworkPolicies): pods that fetch models or URL sources get HTTPS to the
    # internet; False keeps every pod inside the cluster (models from s3:// or the cache PVC).
    internet_access: bool = True
    # Istio: False (default) keeps task and job pods out of the mesh, like MLflow in manifests/base; True
    # puts them in with a native sidecar (exits with the pod), for MLflow in the mesh
    # (manifests/components/istio-mesh). The two must agree (docs/cluster.md, "Istio").
    istio_sidecar: bool = False
    # How the trained model reaches evaluate and register (sdtune.cluster.outputs, docs/cluster.md): "auto"
    # by S3 URI for the methods whose outputs are whole pipelines (full, dreambooth: GBs), as a KFP
    # artifact for the others; "uri" / "artifact" force one way. A run that succeeded deletes its staged
    # data, job outputs and checkpoints under <staging_uri>/<run id>/ unless keep_staging.
    outputs_by: Literal["auto", "uri", "artifact"] = "auto"
    keep_staging: bool = False

    @field_validator("gpu_model")
    @classmethod
    def _known_gpu(cls, value):
        from sdtune.cluster.placement import GPU_PRODUCTS

        if value is not None and value not in GPU_PRODUCTS:
            raise ValueError(f"unknown GPU model {value!r}; one of {', '.join(GPU_PRODUCTS)}")
        return value

    @field_validator("staging_uri")
    @classmethod
    def _namespaced(cls, value, info):
        # cluster.namespace, or inside a pod its own namespace: a run's prefixes are concrete from then on.
        if "{namespace}" not in value:
            return value
        namespace = info.data.get("namespace")
        ns_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        if not namespace and ns_file.is_file():
            namespace = ns_file.read_text().strip()
        return value.replace("{namespace}", namespace) if namespace else value

    def step(self, name: str) -> StepResources:
        """Resources of a pipeline step; a step without its own section gets the light defaults."""
        found = getattr(self.steps, name, None)
        return found if isinstance(found, StepResources) else StepResources()


class SweepConfig(Section):
    """A hyperparameter/prompt sweep (``sdtune sweep``, docs/sweeps.md): the search space, the metric to
    optimise and how failures are tolerated. Keys of ``grid``/``ranges`` are dotted config paths."""

    metric: str = "loss_tuned_trigger"  # an evaluation metric (metrics.json of `sdtune evaluate`)
    direction: Literal["minimize", "maximize"] = "minimize"
    grid: dict[str, list[Any]] = Field(default_factory=dict)  # every combination (or choices with random)
    ranges: dict[str, str] = Field(default_factory=dict)  # "loguniform:1e-5:1e-3", "uniform:a:b", "int:a:b"
    prompts: list[str] = Field(default_factory=list)  # variants of `prompt_key`, one dimension more
    prompt_key: str = "caption.template"
    algorithm: Literal["grid", "random", "bayesianoptimization", "tpe"] = "grid"
    max_trials: int | None = Field(None, ge=1)  # random/bayesian/tpe: how many trials
    seed: int = 0  # random sampling
    parallelism: int = Field(2, ge=1)  # trials at once
    max_failed: int = Field(0, ge=0)  # failed trials tolerated before the sweep fails
    engine: Literal["kfp", "katib"] = "kfp"


class RunConfig(Section):
    """A whole run. ``name`` names the MLflow run and, by default, the registered model."""

    name: str = "sdtune-run"
    model: ModelConfig = Field(default_factory=ModelConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    caption: CaptionConfig = Field(default_factory=CaptionConfig)
    train: TrainSection = Field(default_factory=LoraTrain)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    register: RegisterConfig = Field(default_factory=RegisterConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)

    @model_validator(mode="after")
    def _s3_references(self) -> RunConfig:
        check_s3_references(self)
        return self

    @model_validator(mode="after")
    def _family_options(self) -> RunConfig:
        from pydantic_core import PydanticCustomError

        from sdtune.models.families import FAMILIES

        family = FAMILIES[self.model.arch]
        if problem := family.method_problem(self.train.method):
            raise PydanticCustomError(
                "family_method",
                "{problem}",
                {"where": "train.method", "also": "model.arch", "problem": problem},
            )
        if family.objective != "flow_matching":
            for name in FLOW_MATCHING_OPTIONS:
                if getattr(self.train, name) != TrainConfig.model_fields[name].default:
                    flow = ", ".join(a for a, f in FAMILIES.items() if f.objective == "flow_matching")
                    raise PydanticCustomError(
                        "family_option",
                        "{problem}",
                        {
                            "where": f"train.{name}",
                            "problem": f"applies to flow-matching families only (model.arch {flow}), "
                            f"not to model.arch {self.model.arch} ({family.title})",
                        },
                    )
        return self

    def digest(self) -> str:
        """Stable hash of the resolved config (used for cache keys and resume checks)."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def to_param(self) -> str:
        """One-line JSON: how the config travels as a pipeline parameter (KFP writes parameter defaults
        into a comment header of the compiled YAML, which a multi-line value would break)."""
        return self.model_dump_json()

    def storable(self, *, refuse: bool = False) -> RunConfig:
        """This config as it may be stored (see :func:`storable_config`)."""
        return storable_config(self, refuse=refuse)

    def format_prompt(self, template: str) -> str:
        return template.format(trigger=self.caption.trigger, class_noun=self.caption.class_noun)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.rank=8", "ingest.sources=[a,b]"]`` → nested dict, values parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value")
        # YAML 1.2 booleans only: `on`, `off`, `yes`, `no` stay strings (`mixed_precision=no`).
        value = (
            raw
            if raw.strip().lower() in {"yes", "no", "on", "off", "y", "n"}
            else load_yaml(raw, f"override {item[:200]!r}")
            if raw != ""
            else ""
        )
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(
    data: dict[str, Any], overrides: list[str] | None = None, origin: str = "config"
) -> RunConfig:
    data = merge_updates(data or {}, parse_overrides(overrides or []))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_invalid(exc, origin, overrides or [])) from None


def describe_invalid(exc: ValidationError, origin: str, overrides: list[str]) -> str:
    """One line for the first error: blamed on the command-line override that set the key (not the YAML
    file), with the closest known key for a misspelt one."""
    first = exc.errors()[0]
    loc = [str(p) for p in first["loc"]]
    method = None
    if loc[:1] == ["train"] and len(loc) > 1 and loc[1] in METHOD_SECTIONS:
        method = loc.pop(1)  # pydantic names the method's section: train.lora.rank is train.rank
    where = ".".join(loc) or "(root)"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    message = ": " + first["msg"]
    if first["type"] == "extra_forbidden" and method and loc[-1] in ALL_TRAIN_OPTIONS:
        takes = ", ".join(method_options(method)) or "only the shared options"
        message = f" does not apply to method {method}; {method} takes: {takes}"
    elif first["type"] == "extra_forbidden":
        message = ": unknown key"
        if guess := _closest_key(loc, method):
            message += f" (did you mean {guess}?)"
    elif first["type"] == "union_tag_invalid" and loc == ["train"] and not isinstance(first["input"], dict):
        message = ": must be a mapping of train options"
    elif first["type"] == "union_tag_invalid" and loc == ["train"]:
        where = "train.method"
        message = f": unknown method {first['input'].get('method')!r}; one of {', '.join(METHOD_SECTIONS)}"
    settings = [where]
    if not loc and "where" in first.get("ctx", {}):  # a whole-config check names the setting itself
        where, message = first["ctx"]["where"], ": " + first["ctx"]["problem"]
        settings = [where, *([first["ctx"]["also"]] if "also" in first["ctx"] else [])]
    for item in overrides:
        key = item.partition("=")[0].strip()
        if any(s == key or s.startswith(key + ".") or key.startswith(s + ".") for s in settings):
            return f"override {item}: {where}{message}{more}"
    return f"{origin}: {where}{message}{more}"


def _closest_key(loc: list[str], method: str | None = None) -> str | None:
    """The known key nearest to the unknown ``loc[-1]`` in the section ``loc[:-1]`` (for ``train``: the
    section of ``method``)."""
    import difflib
    import typing

    if loc[:-1] == ["train"] and method:
        match = difflib.get_close_matches(
            loc[-1], list(METHOD_SECTIONS[method].model_fields), n=1, cutoff=0.6
        )
        return f"train.{match[0]}" if match else None
    model: Any = RunConfig
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    match = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.6)
    return ".".join([*loc[:-1], match[0]]) if match else None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML preset (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = load_yaml(path.read_text(encoding="utf-8", errors="replace"), str(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    return config_from_dict(data, overrides, origin=origin)


def config_from_yaml(text: str) -> RunConfig:
    """Inverse of :meth:`RunConfig.to_yaml` and :meth:`RunConfig.to_param` (JSON is YAML)."""
    data = load_yaml(text, "pipeline config") or {}
    if not isinstance(data, dict):
        raise ConfigError("pipeline config: top level must be a mapping")
    return config_from_dict(data, origin="pipeline config")


def resolve_local_paths(cfg: RunConfig, root: Path) -> RunConfig:
    """Make relative local paths absolute against ``root`` (pipeline tasks may run in another cwd)."""
    cfg = cfg.model_copy(deep=True)

    def fix(value: str) -> str:
        if "://" in value or value.startswith("@") or Path(value).is_absolute():
            return value
        candidate = root / value
        # A bare hub id ("org/name") stays as it is unless such a folder exists locally.
        if value.startswith((".", "/")) or candidate.exists():
            return str(candidate.resolve())
        return value

    cfg.model.base = fix(cfg.model.base)
    cfg.model.cache_dir = (
        str((root / cfg.model.cache_dir).resolve())
        if not Path(cfg.model.cache_dir).is_absolute()
        else cfg.model.cache_dir
    )
    cfg.ingest.sources = [fix(s) for s in cfg.ingest.sources]
    return cfg


# --- Untrusted text in configs: YAML budgets, prompt templates, s3:// references, credentials -------------
# A config arrives from users, sweep files and pipeline parameters; docs/security.md lists what is refused.

MAX_YAML_BYTES = 4 << 20
MAX_YAML_NODES = 200_000  # after aliases are expanded: a 520-byte "billion laughs" document expands to 10⁹
PROMPT_FIELDS = ("trigger", "class_noun")


def load_yaml(text: str, origin: str = "config") -> Any:
    """``yaml.safe_load`` under a size budget and an alias-expansion budget (one ConfigError line each)."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{origin}: {len(text)} characters is over the {MAX_YAML_BYTES}-character limit")
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # the reader already refuses control characters here
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node, origin)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{origin}: not valid YAML: {first}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_expanded_size(root: yaml.Node, origin: str) -> None:
    """Count the nodes the document would have with every alias expanded (memoised per shared node)."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in in_progress:
            raise ConfigError(f"{origin}: a YAML alias refers to itself (recursive document)")
        in_progress.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        in_progress.discard(key)
        sizes[key] = total
        if total > MAX_YAML_NODES:
            raise ConfigError(
                f"{origin}: YAML expands to more than {MAX_YAML_NODES} nodes through aliases (refused)"
            )
        return total

    size(root)


def plain_template(template: str, allowed: tuple[str, ...]) -> str:
    """A prompt template may hold ``{name}`` fields from ``allowed`` and ``{{``/``}}`` only: a format spec
    (``{trigger:>99999999}``) or an attribute/index lookup (``{trigger.__class__}``) is refused."""
    import string

    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"{template!r} is not a valid template ({exc})") from None
    names = ", ".join("{" + name + "}" for name in allowed)
    for _literal, name, spec, conversion in fields:
        if name is None:
            continue
        if name not in allowed or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f"template field {shown[:80]!r} is not allowed: use only {names}")
    return template


def s3_reference_problem(uri: str) -> str | None:
    """Why an ``s3://bucket/key`` reference is refused, or None. ``.``/``..`` segments would leave the local
    cache folder the object is mirrored into; userinfo would be a credential in the config."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if "@" in parts.netloc:
        return "credentials in an s3:// address (give keys as a Kubernetes Secret, see docs/security.md)"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}", parts.netloc):
        return f"invalid bucket name {parts.netloc[:80]!r}"
    if parts.query or parts.fragment:
        return "an s3:// address takes no query string or fragment"
    if any(segment in (".", "..") for segment in parts.path.split("/")):
        return "'.' and '..' segments are not allowed in an s3:// key"
    return None


def s3_references(cfg: RunConfig) -> list[tuple[str, str]]:
    """(setting, value) of every ``s3://`` reference in the config: model weights, sources, checkpoints."""
    out = []
    for where, value in _strings(cfg.model_dump(mode="json"), ""):
        if value.lower().startswith("s3://"):
            out.append((where, value))
    return out


def check_s3_references(cfg: RunConfig) -> None:
    from pydantic_core import PydanticCustomError

    for where, value in s3_references(cfg):
        problem = s3_reference_problem(value)
        if problem:  # a custom error: the one-line message names the setting, without "Value error, "
            raise PydanticCustomError(
                "s3_reference", "{where}: {problem}", {"where": where, "problem": problem}
            )


# A query or fragment parameter whose name holds one of these carries a credential: AWS/GCS presigned URLs
# (X-Amz-Signature, X-Amz-Credential, X-Goog-Signature), Azure SAS (sig), bearer tokens, API keys. Matched
# anywhere in the name, so "??sig=", "0?sig=" and "api_key[]=" are caught; a false positive only strips more.
_SECRET_NAME = re.compile(r"sig|token|secret|passw|credential|key|auth|session", re.IGNORECASE)


def _secret_pieces(part: str) -> list[str]:
    return [p for p in re.split(r"[&;]", part) if _SECRET_NAME.search(p.split("=", 1)[0])]


def _strings(value: Any, where: str) -> list[tuple[str, str]]:
    if isinstance(value, str):
        return [(where, value)]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(v, f"{where}.{k}" if where else str(k))]
    if isinstance(value, list):
        return [s for i, v in enumerate(value) for s in _strings(v, f"{where}[{i}]")]
    return []


def url_has_credentials(value: str) -> bool:
    """``user[:password]@`` in a URL, or a query/fragment parameter that carries a credential."""
    from urllib.parse import urlsplit

    if "://" not in value:
        return False
    try:
        parts = urlsplit(value)
    except ValueError:  # e.g. an unbalanced IPv6 bracket: unparsable, so it cannot be shown to be clean
        return True
    # The fragment too: it is never sent, but `#access_token=…` (OAuth) carries a secret all the same.
    return "@" in parts.netloc or bool(_secret_pieces(parts.query) or _secret_pieces(parts.fragment))


def strip_url_credentials(value: str) -> str:
    """``https://user:pw@host/a?X-Amz-Signature=…&v=2`` → ``https://host/a?v=2``; a clean value unchanged."""
    from urllib.parse import urlsplit, urlunsplit

    if not url_has_credentials(value):
        return value
    try:
        parts = urlsplit(value)
    except ValueError:
        return "<unparsable URL removed>"
    secret = set(_secret_pieces(parts.query))
    query = "&".join(p for p in re.split(r"[&;]", parts.query) if p and p not in secret)
    fragment = "" if _secret_pieces(parts.fragment) else parts.fragment
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, query, fragment))


def credential_settings(cfg: RunConfig) -> list[str]:
    """Settings whose value holds a credential (``user:password@`` or a signed query string)."""
    return [where for where, value in _strings(cfg.model_dump(mode="json"), "") if url_has_credentials(value)]


def storable_config(cfg: RunConfig, *, refuse: bool = False) -> RunConfig:
    """The config as it may be stored: written to ``config.yaml``, logged to MLflow, put in the registered
    model, a compiled pipeline or a job's args. Credentials are stripped from every URL; with ``refuse``
    (where the stored copy is also the one the run works from, so stripping would break it) a config holding
    one is refused with a pointer to Kubernetes Secrets."""
    found = credential_settings(cfg)
    if not found:
        return cfg
    if refuse:
        raise ConfigError(
            f"{found[0]} holds a credential (user:password@ or a signed query string), which the compiled "
            "pipeline or Katib trial would store: give keys to the pipeline as a Kubernetes Secret "
            "(cluster.secrets) and use s3:// or unsigned URLs; see docs/security.md"
        )

    def scrub(value: Any) -> Any:
        if isinstance(value, str):
            return strip_url_credentials(value)
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value

    return RunConfig.model_validate(scrub(cfg.model_dump(mode="json")))
