"""Find the base model and load its parts for training or inference.

``cfg.model.base`` may be:

- a local diffusers folder: used as it is;
- ``s3://bucket/prefix``: downloaded once (``minio`` client; ``S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``) into ``cfg.model.cache_dir/<bucket>/<prefix>``; a ``.complete`` marker makes
  later runs reuse it, and a half-finished download is redone;
- anything else: a Hugging Face hub id, passed to ``from_pretrained`` (works where the cluster has the hub
  or a mirror; offline it ends in one clear :class:`ModelLoadError` line).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sdtune.config import RunConfig, strip_url_credentials
from sdtune.errors import ModelLoadError

COMPLETE_MARKER = ".complete"


def resolve_base(base: str, cache_dir: str | Path, revision: str | None = None) -> str:
    """Return what ``from_pretrained`` should get: a local folder path, or the hub id unchanged."""
    from sdtune.models.single_file import diffusers_folder, is_single_file

    if is_single_file(base):  # model.safetensors in the original (A1111/Civitai) layout
        return diffusers_folder(base, cache_dir)
    if base.startswith("s3://"):
        return str(download_s3(base, Path(cache_dir)))
    path = Path(base).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise ModelLoadError(f"{path} is not a diffusers model folder (no model_index.json)")
        return str(path.resolve())
    if base.startswith((".", "/", "~")) or path.suffix in {".safetensors", ".ckpt"}:
        raise ModelLoadError(
            f"base model folder not found: {base} (build the tiny one with `sdtune models tiny --out {base}`)"
        )
    return base  # a hub id


def download_s3(uri: str, cache_dir: Path) -> Path:
    """Mirror ``s3://bucket/prefix/`` into ``cache_dir/bucket/prefix`` once; return the local folder.

    The folder is emptied before a (re)download, so it must lie strictly inside ``cache_dir``: a reference
    with ``.``/``..`` segments is refused before anything is touched, and the resolved folder is checked too
    (a symlink inside the cache could still point elsewhere)."""
    from sdtune.config import s3_reference_problem

    problem = s3_reference_problem(uri) if uri.startswith("s3://") else "expected s3://bucket/prefix"
    if problem:
        raise ModelLoadError(f"bad S3 address {strip_url_credentials(uri)!r}: {problem}")
    parsed = urlparse(uri)
    bucket, prefix = parsed.netloc, parsed.path.lstrip("/").rstrip("/")
    root = Path(cache_dir).resolve()
    target = (root / bucket / prefix).resolve()
    if not target.is_relative_to(root) or target == root:
        raise ModelLoadError(f"{uri}: the cache folder {target} is not inside cache_dir {root}")
    if (target / COMPLETE_MARKER).is_file():
        return target
    from sdtune.data.s3 import client_from_env

    client = client_from_env()
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True, exist_ok=True)
    count = 0
    try:
        for obj in client.list_objects(bucket, prefix=prefix + "/" if prefix else "", recursive=True):
            if obj.is_dir:
                continue
            rel = obj.object_name[len(prefix) :].lstrip("/")
            dest = (target / rel).resolve()
            if ".." in Path(rel).parts or not dest.is_relative_to(target):
                raise ModelLoadError(f"{uri}: refusing object name {obj.object_name!r}")
            client.fget_object(bucket, obj.object_name, str(dest))
            count += 1
    except ModelLoadError:
        raise
    except Exception as exc:  # minio raises S3Error, urllib3 errors, …
        raise ModelLoadError(f"cannot download {uri}: {exc.__class__.__name__}: {exc}") from None
    if count == 0:
        raise ModelLoadError(f"{uri}: no objects under that prefix")
    (target / COMPLETE_MARKER).write_text(f"{count}\n", encoding="utf-8")
    return target


PICKLE_OPT_IN = "SDTUNE_ALLOW_PICKLE_WEIGHTS"


def pickle_weights_allowed() -> bool:
    """Weights are read from ``.safetensors`` only, unless the operator sets ``SDTUNE_ALLOW_PICKLE_WEIGHTS=1``
    (then ``.bin``/``.ckpt``/``.pt`` files load too, through the libraries' ``weights_only=True`` unpickler):
    a pickle file can run code when it is loaded, and base models come from outside."""
    return os.environ.get(PICKLE_OPT_IN, "") == "1"


def weights_kwargs(cls: Any) -> dict[str, Any]:
    """``from_pretrained`` keywords for ``cls``: safetensors only for models and pipelines (tokenizers,
    schedulers and processors read JSON/text and take no such option)."""
    if pickle_weights_allowed():
        return {}
    import sys

    import torch

    # A pipeline class comes from diffusers, so diffusers is imported already when ``cls`` is one.
    diffusers = sys.modules.get("diffusers")
    kinds = (torch.nn.Module, diffusers.DiffusionPipeline) if diffusers else (torch.nn.Module,)
    if isinstance(cls, type) and issubclass(cls, kinds):
        return {"use_safetensors": True}
    return {}


def load_error_line(exc: BaseException) -> str:
    """The first line of a loading error, with the way out when only pickle weights were there."""
    import pickle

    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, pickle.UnpicklingError):
        return f"refused to unpickle a weights file ({first})"
    if ".safetensors" in first and not pickle_weights_allowed():
        first += f" (only .safetensors weights are read; {PICKLE_OPT_IN}=1 allows .bin/.ckpt/.pt, see docs/security.md)"
    return first


def _from_pretrained(cls: Any, source: str, revision: str | None, **kwargs: Any) -> Any:
    import pickle

    local = Path(source).is_dir()
    try:
        return cls.from_pretrained(
            source,
            revision=None if local else revision,
            local_files_only=local,
            **weights_kwargs(cls),
            **kwargs,
        )
    except (OSError, ValueError, pickle.UnpicklingError) as exc:
        what = kwargs.get("subfolder") or cls.__name__
        if local:
            raise ModelLoadError(f"cannot load {what} from {source}: {load_error_line(exc)}") from None
        raise ModelLoadError(
            f"cannot load {what} of hub model {source!r} (no network or no access?): {load_error_line(exc)}"
        ) from None


@dataclass
class SDComponents:
    """The parts a training recipe needs: ``text_encoder_2``/``tokenizer_2`` for SDXL and SD3 (CLIP-G);
    SD3 has a ``transformer`` instead of the ``unet`` and the T5 encoder ``text_encoder_3``/``tokenizer_3``."""

    source: str
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    transformer: Any = None
    text_encoder_3: Any = None
    tokenizer_3: Any = None

    @property
    def is_sd3(self) -> bool:
        return self.transformer is not None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None and not self.is_sd3

    @property
    def denoiser(self) -> Any:
        """The network that predicts the noise (the UNet) or the velocity (SD3's MMDiT transformer)."""
        return self.transformer if self.is_sd3 else self.unet


def load_components(cfg: RunConfig, base: str | None = None) -> SDComponents:
    """Load the denoiser, VAE, text encoder(s), tokenizer(s) and the training scheduler (DDPM; SD3: its
    flow-matching scheduler), all fp32 on CPU and frozen."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if cfg.model.arch == "sd3":
        return _sd3_components(cfg, base)
    source = resolve_base(base or cfg.model.base, cfg.model.cache_dir, cfg.model.revision)
    check_arch(source, cfg.model.arch)
    rev = cfg.model.revision
    sdxl = cfg.model.arch == "sdxl"
    if cfg.model.arch not in ("sd15", "sd2", "sdxl"):
        raise ModelLoadError(f"model.arch {cfg.model.arch!r} is not supported by the training recipes yet")
    parts = SDComponents(
        source=source,
        unet=_from_pretrained(UNet2DConditionModel, source, rev, subfolder="unet"),
        vae=_from_pretrained(AutoencoderKL, source, rev, subfolder="vae"),
        text_encoder=_from_pretrained(CLIPTextModel, source, rev, subfolder="text_encoder"),
        tokenizer=_from_pretrained(CLIPTokenizer, source, rev, subfolder="tokenizer"),
        noise_scheduler=_from_pretrained(DDPMScheduler, source, rev, subfolder="scheduler"),
    )
    if sdxl:
        parts.text_encoder_2 = _from_pretrained(
            CLIPTextModelWithProjection, source, rev, subfolder="text_encoder_2"
        )
        parts.tokenizer_2 = _from_pretrained(CLIPTokenizer, source, rev, subfolder="tokenizer_2")
    elif getattr(parts.unet.config, "addition_embed_type", None) == "text_time":
        raise ModelLoadError(f"{source} is an SDXL model: set model.arch=sdxl")
    return _frozen(parts)


# model_index.json's pipeline class → the model.arch values it can be (inpainting variants included)
ARCH_OF_PIPELINE = {
    "StableDiffusionPipeline": ("sd15", "sd2"),
    "StableDiffusionInpaintPipeline": ("sd15", "sd2"),
    "StableDiffusionXLPipeline": ("sdxl",),
    "StableDiffusionXLInpaintPipeline": ("sdxl",),
    "StableDiffusion3Pipeline": ("sd3",),
}


def index_class_name(source: str | None) -> str:
    """The pipeline class a local diffusers folder's ``model_index.json`` names; "" when there is none."""
    import json

    if not source:
        return ""
    try:
        return str(
            json.loads((Path(source) / "model_index.json").read_text(encoding="utf-8")).get("_class_name", "")
        )
    except (OSError, ValueError, AttributeError):
        return ""


def check_arch(source: str, arch: str) -> None:
    """Refuse a ``model.arch`` that the base model's ``model_index.json`` contradicts: loaded anyway, an SD 1.5
    folder under ``arch=sdxl`` failed deep in diffusers (``'NoneType' object has no attribute 'tokenize'``)."""
    name = index_class_name(source)  # "" where there is no local index: the loaders say what is wrong
    allowed = ARCH_OF_PIPELINE.get(name)
    if allowed and arch not in allowed:
        raise ModelLoadError(
            f"model.base {source} is a {name} (model_index.json) but model.arch is {arch}: "
            f"set model.arch={allowed[0]}"
        )


def _sd3_components(cfg: RunConfig, base: str | None) -> SDComponents:
    """SD3's parts, as its pipeline loads them (the classes are the pipeline's to know)."""
    source = resolve_base(base or cfg.model.base, cfg.model.cache_dir, cfg.model.revision)
    pipe = load_pipeline(cfg, source)
    names = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")
    parts = SDComponents(
        source=source,
        unet=None,
        noise_scheduler=pipe.scheduler,
        text_encoder_3=pipe.text_encoder_3,
        tokenizer_3=pipe.tokenizer_3,
        **{name: getattr(pipe, name) for name in names},
    )
    return _frozen(parts)


def _frozen(parts: SDComponents) -> SDComponents:
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if (module := getattr(parts, name)) is not None:
            module.requires_grad_(False)
    return parts


def pipeline_class_for(arch: str, source: str | None = None) -> Any:
    """The diffusers pipeline class for ``arch``; a local inpainting folder (``model_index.json`` names an
    inpaint pipeline) gets ``StableDiffusionInpaintPipeline`` (SDXL: ``StableDiffusionXLInpaintPipeline``)."""
    from diffusers import (
        StableDiffusion3Pipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )

    if arch == "sd3":
        return StableDiffusion3Pipeline
    inpaint = "Inpaint" in index_class_name(source)
    if arch == "sdxl":
        return StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLPipeline
    return StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline


def load_pipeline(cfg: RunConfig, base: str | None = None, torch_dtype: Any = None, **components: Any) -> Any:
    """The inference pipeline for ``cfg.model.arch`` (no safety checker: evaluation only).

    ``components`` (``unet=…``/``transformer=…``, ``text_encoder=…``) replace the stored ones without loading
    them — how validation during training samples with the weights being trained."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    source = resolve_base(base or cfg.model.base, cfg.model.cache_dir, cfg.model.revision)
    check_arch(source, cfg.model.arch)
    cls = pipeline_class_for(cfg.model.arch, source)
    kwargs: dict[str, Any] = {"dtype": torch_dtype} if torch_dtype is not None else {}
    if cls in (StableDiffusionPipeline, StableDiffusionInpaintPipeline):  # SDXL/SD3 have no safety checker
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = _from_pretrained(cls, source, cfg.model.revision, **kwargs, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe
