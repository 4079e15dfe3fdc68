"""A single-file base model (``model.base: path/or/s3/model.safetensors``) in the original layout that
AUTOMATIC1111, ComfyUI and Civitai use: SD 1.x, SD 2.x, SDXL (and their inpainting variants).

The file is converted once into a diffusers folder under ``model.cache_dir/single-file/<digest>/`` (a
``.complete`` marker makes later runs reuse it); the rest of sdtune then sees an ordinary diffusers folder.
The family comes from the checkpoint's keys. The architecture's config files come from the file itself when
sdtune wrote it (``sdtune.train.single_file`` embeds them), otherwise diffusers fetches the family's configs
from the hub (a few kB, cached): offline, such a file ends in one ``ModelLoadError`` line.

safetensors only: a ``.ckpt`` is a pickle, and loading one can run code.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from sdtune.errors import ModelLoadError, SdtuneError

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
COMPLETE = ".complete"


def is_single_file(base: str) -> bool:
    return base.lower().endswith(SUFFIXES)


def diffusers_folder(base: str, cache_dir: str | Path) -> str:
    """The diffusers folder for the single-file checkpoint ``base`` (a path or ``s3://bucket/key``)."""
    if not base.lower().endswith(".safetensors"):
        raise ModelLoadError(
            f"{base}: only .safetensors single files load (a .ckpt/.pt/.bin is a pickle that can run code); "
            "convert it to safetensors first"
        )
    cache = Path(cache_dir) / "single-file"
    path = _download_s3(base, cache / "downloads") if base.startswith("s3://") else Path(base).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"single-file base model not found: {base}")
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache / digest
    if (target / COMPLETE).is_file():
        return str(target)
    shutil.rmtree(target, ignore_errors=True)
    try:
        _convert(path, target)
    except SdtuneError:
        raise
    except Exception as exc:  # diffusers raises ValueError, OSError, KeyError… on files it cannot map
        shutil.rmtree(target, ignore_errors=True)
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise ModelLoadError(f"cannot load single file {base}: {first}") from None
    (target / COMPLETE).write_text(f"{base}\n", encoding="utf-8")
    return str(target)


def family(path: Path) -> tuple[str, bool]:
    """(``sd15`` | ``sd2`` | ``sdxl``, inpainting?) from the checkpoint's keys and its first conv's inputs."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        keys = set(fh.keys())
        conv_in = "model.diffusion_model.input_blocks.0.0.weight"
        inpaint = conv_in in keys and fh.get_slice(conv_in).get_shape()[1] == 9
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl", inpaint
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2", inpaint
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd15", inpaint
    raise ModelLoadError(f"{path}: not an SD 1.x/2.x/SDXL checkpoint in the original layout")


def _convert(path: Path, target: Path) -> None:
    from diffusers import (
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )
    from safetensors import safe_open

    arch, inpaint = family(path)
    if arch == "sdxl":
        cls = StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLPipeline
    else:
        cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    with safe_open(str(path), "pt") as fh:
        embedded = (fh.metadata() or {}).get("sdtune_diffusers_config")
    kwargs = {} if arch == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    with tempfile.TemporaryDirectory() as tmp:
        if embedded:
            for name, text in json.loads(embedded).items():
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / name).write_text(text, encoding="utf-8")
            kwargs.update(config=tmp, local_files_only=True)
        pipe = cls.from_single_file(str(path), **kwargs)
    pipe.save_pretrained(target, safe_serialization=True)


def _download_s3(uri: str, into: Path) -> Path:
    """One object, ``s3://bucket/key.safetensors``, downloaded once (same client settings as folders)."""
    from sdtune.data.s3 import client_from_env

    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket or not key:
        raise ModelLoadError(f"bad S3 address {uri!r}: expected s3://bucket/path/model.safetensors")
    dest = into / bucket / key
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    try:
        client_from_env().fget_object(bucket, key, str(partial))
    except Exception as exc:  # minio raises S3Error, urllib3 errors, …
        raise ModelLoadError(f"cannot download {uri}: {exc.__class__.__name__}: {exc}") from None
    partial.replace(dest)
    return dest
