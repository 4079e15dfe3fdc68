"""Loading the optional data-stage models (Swin2SR, CLIPSeg, BLIP) from a local folder, hub id or s3://.

``sdtune.models.loading.resolve_base`` expects a diffusers folder (``model_index.json``), so only its S3
mirror is reused here. Every failure is one :class:`~sdtune.errors.ConfigError` line naming the setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdtune.errors import ConfigError


def resolve_weights(ref: str | None, setting: str, cache_dir: str) -> str:
    """A local folder for ``ref`` (s3:// is mirrored into ``cache_dir`` once), or a hub id unchanged."""
    if not ref:
        raise ConfigError(f"{setting} is not set: give a local folder, a hub id or s3://bucket/prefix")
    if ref.startswith("s3://"):
        from sdtune.models.loading import download_s3

        return str(download_s3(ref, Path(cache_dir)))
    path = Path(ref).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if ref.startswith((".", "/", "~")):
        raise ConfigError(f"{setting}: folder not found: {ref}")
    return ref


def load_pretrained(cls: Any, ref: str | None, setting: str, cache_dir: str) -> Any:
    """``cls.from_pretrained`` on the resolved weights, in eval mode for models, errors as one line."""
    import pickle

    from sdtune.models.loading import load_error_line, weights_kwargs

    where = resolve_weights(ref, setting, cache_dir)
    try:
        loaded = cls.from_pretrained(where, local_files_only=Path(where).is_dir(), **weights_kwargs(cls))
    except (OSError, ValueError, pickle.UnpicklingError) as exc:
        raise ConfigError(f"{setting}={ref}: cannot load {cls.__name__} ({load_error_line(exc)})") from None
    return loaded.eval() if hasattr(loaded, "eval") else loaded
