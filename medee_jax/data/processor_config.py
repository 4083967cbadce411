"""The checkpoint's own image processor settings: the default image sizes of a run.

`read_image_processor(dir)` reads the image processor's config the way transformers 5.x does: the "image_processor"
object of `processor_config.json` when there is one, else `preprocessor_config.json`. From it:
- Qwen2-VL / Qwen2.5-VL (`Qwen2VLImageProcessor*`): resize bounds in pixels. transformers' precedence: `size`
  ({"shortest_edge": min, "longest_edge": max}; the class default when absent), then `min_pixels` / `max_pixels`
  override its two edges when set. A size without both edges is an error (transformers raises at call time).
- InternVL (`GotOcr2ImageProcessor*`): tile limits `min_patches` / `max_patches` (class defaults 1 / 12), the tile
  size `size` {"height", "width"} and `crop_to_patches` (InternVL's processor crops by default).

`resolve_image_bounds(dirs, min_pixels, max_pixels, min_tiles, max_tiles)`: config values > 0 override the
processor's, 0 means "the checkpoint's processor" (the Qwen2-VL class defaults when no directory has a processor
config), with a one-line description of where each value came from, for the run's log. `data.image_max_pixels`
(LLaMA-Factory's pre-resize) is separate and applied before the processor.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

from medee_jax.data.images import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
INTERNVL_MIN_TILES, INTERNVL_MAX_TILES = 1, 12


@dataclasses.dataclass(frozen=True)
class ImageProcessorSettings:
    """What the data pipeline takes from a checkpoint's image processor config.

    kind: "qwen2_vl" or "internvl". source: the file read. Qwen fields (pixels) or InternVL fields (tiles) are
    None for the other kind.
    """

    kind: str
    source: str
    min_pixels: int | None = None
    max_pixels: int | None = None
    min_tiles: int | None = None
    max_tiles: int | None = None
    tile_size: int | None = None
    crop_to_patches: bool | None = None


def _load(directory: str) -> tuple[dict, str] | None:
    """(image processor config dict, file) of a directory, transformers' order; None when there is none."""
    nested = os.path.join(directory, "processor_config.json")
    if os.path.isfile(nested):
        with open(nested, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data.get("image_processor"), dict):
            return data["image_processor"], f"{nested} (image_processor)"
    flat = os.path.join(directory, "preprocessor_config.json")
    if os.path.isfile(flat):
        with open(flat, encoding="utf-8") as f:
            return json.load(f), flat
    return None


def _kind(cfg: dict) -> str | None:
    name = str(cfg.get("image_processor_type", ""))
    if name.startswith("Qwen2VLImageProcessor"):
        return "qwen2_vl"
    if name.startswith("GotOcr2ImageProcessor"):
        return "internvl"
    if "min_pixels" in cfg or "max_pixels" in cfg or "shortest_edge" in (cfg.get("size") or {}):
        return "qwen2_vl"
    if "max_patches" in cfg or "crop_to_patches" in cfg:
        return "internvl"
    return None


def qwen_pixel_bounds(cfg: dict, where: str = "preprocessor_config.json") -> tuple[int, int]:
    """(min_pixels, max_pixels) of a Qwen2-VL image processor config, with transformers 5.x's precedence."""
    size = dict(cfg.get("size") or {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS})
    if cfg.get("min_pixels") is not None:
        size["shortest_edge"] = cfg["min_pixels"]
    if cfg.get("max_pixels") is not None:
        size["longest_edge"] = cfg["max_pixels"]
    if not size.get("shortest_edge") or not size.get("longest_edge"):
        raise ValueError(f"{where}: the Qwen2-VL image processor needs size.shortest_edge and size.longest_edge "
                         f"(or min_pixels and max_pixels); got size {size}")
    return int(size["shortest_edge"]), int(size["longest_edge"])


def read_image_processor(directory: str | os.PathLike) -> ImageProcessorSettings | None:
    """The image processor settings of a checkpoint (or tokenizer) directory; None when it has no processor
    config. Raises ValueError for a config it cannot use."""
    loaded = _load(os.fspath(directory))
    if loaded is None:
        return None
    cfg, where = loaded
    kind = _kind(cfg)
    if kind == "qwen2_vl":
        low, high = qwen_pixel_bounds(cfg, where)
        return ImageProcessorSettings("qwen2_vl", where, min_pixels=low, max_pixels=high)
    if kind == "internvl":
        size = cfg.get("size") or {}
        return ImageProcessorSettings(
            "internvl", where, min_tiles=int(cfg.get("min_patches", INTERNVL_MIN_TILES)),
            max_tiles=int(cfg.get("max_patches", INTERNVL_MAX_TILES)), tile_size=size.get("height"),
            crop_to_patches=bool(cfg.get("crop_to_patches", True)))
    raise ValueError(f"{where}: image processor {cfg.get('image_processor_type')!r} is neither Qwen2-VL's nor "
                     "InternVL's (GotOcr2)")


@dataclasses.dataclass(frozen=True)
class ImageBounds:
    """The image sizes a run uses. description: where they came from, one line for the log."""

    min_pixels: int
    max_pixels: int
    min_tiles: int
    max_tiles: int
    description: str


def resolve_image_bounds(dirs: Sequence[str | os.PathLike | None], min_pixels: int = 0, max_pixels: int = 0,
                         min_tiles: int = 0, max_tiles: int = 0) -> ImageBounds:
    """Config values (> 0) over the first of `dirs` that has an image processor config, over class defaults."""
    settings = None
    for directory in dirs:
        if directory and os.path.isdir(directory):
            settings = read_image_processor(directory)
            if settings is not None:
                break
    origin = settings.source if settings is not None else "the Qwen2-VL class defaults (no processor config)"
    chosen, parts = {}, []
    defaults = {"min_pixels": QWEN_MIN_PIXELS, "max_pixels": QWEN_MAX_PIXELS, "min_tiles": INTERNVL_MIN_TILES,
                "max_tiles": INTERNVL_MAX_TILES}
    for name, configured in (("min_pixels", min_pixels), ("max_pixels", max_pixels), ("min_tiles", min_tiles),
                             ("max_tiles", max_tiles)):
        from_processor = getattr(settings, name, None) if settings is not None else None
        if configured and configured > 0:
            chosen[name], where = int(configured), f"data.{name}"
        elif from_processor is not None:
            chosen[name], where = int(from_processor), "processor"
        else:
            chosen[name], where = defaults[name], "default"
        parts.append(f"{name}={chosen[name]} ({where})")
    if chosen["min_pixels"] > chosen["max_pixels"]:
        raise ValueError(f"image min_pixels {chosen['min_pixels']} > max_pixels {chosen['max_pixels']} "
                         f"({'; '.join(parts)})")
    return ImageBounds(description=f"image sizes: {', '.join(parts)}; processor: {origin}", **chosen)
