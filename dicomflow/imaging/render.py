"""Render a frame as a consumer image (PS3.18 8.3.5 rendered query parameters; blocking, offload it).

Grayscale: Modality LUT, then the requested window (or the instance's own VOI), then MONOCHROME1
inversion (PS3.4 N.2 grayscale pipeline). Colour: decoded as RGB; palette colour through its LUT.
Then the viewport (crop and fit, aspect ratio kept) and the output encoding (quality for JPEG).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut

from dicomflow.errors import InvalidRequestError, NotAcceptableError
from dicomflow.imaging.frames import decode_frame

RENDERED_TYPES = ("image/jpeg", "image/png", "image/gif")
_PIL_FORMAT = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF"}
WINDOW_FUNCTIONS = ("linear", "linear-exact", "sigmoid")
THUMBNAIL_SIZE = 128
MAX_VIEWPORT = 8192
MAX_ANIMATION_FRAMES = 1000


@dataclass(frozen=True, slots=True)
class Viewport:
    """PS3.18 8.3.5.1.2: output size ``vw,vh`` and optional source region ``sx,sy,sw,sh``."""

    width: int
    height: int
    sx: float | None = None
    sy: float | None = None
    sw: float | None = None
    sh: float | None = None


@dataclass(frozen=True, slots=True)
class RenderOptions:
    media_type: str = "image/jpeg"
    #: PS3.18 8.3.5.1.4: 1..100 (lossy formats only)
    quality: int | None = None
    viewport: Viewport | None = None
    #: PS3.18 8.3.5.1.3: (center, width, function)
    window: tuple[float, float, str] | None = None


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidRequestError(f"{what} must be a number") from None
    if not np.isfinite(value):
        raise InvalidRequestError(f"{what} must be finite")
    return value


def parse_render_options(query: Mapping[str, str], media_type: str, *, thumbnail: bool = False) -> RenderOptions:
    """Rendered query parameters (PS3.18 8.3.5.1; thumbnails take only ``viewport``, 8.3.5.2). Bad values: 400."""
    allowed = {"viewport"} if thumbnail else {"viewport", "window", "quality", "annotation", "iccprofile"}
    unknown = sorted(set(query) - allowed - {"charset", "accept"})  # accept: PS3.18 8.3.3.1
    if unknown:
        raise InvalidRequestError(f"unsupported query parameter(s) for rendered resources: {', '.join(unknown)}")
    quality = None
    if "quality" in query:
        q = _number(query["quality"], "quality")
        if not 1 <= q <= 100 or q != int(q):
            raise InvalidRequestError("quality must be an integer from 1 to 100 (PS3.18 8.3.5.1.4)")
        quality = int(q)
    viewport = None
    if "viewport" in query:
        parts = [p.strip() for p in query["viewport"].split(",")]
        if len(parts) not in (2, 6) or not parts[0] or not parts[1]:
            raise InvalidRequestError("viewport is vw,vh[,sx,sy,sw,sh] (PS3.18 8.3.5.1.2)")
        vw, vh = _number(parts[0], "vw"), _number(parts[1], "vh")
        if vw != int(vw) or vh != int(vh) or not (0 < vw <= MAX_VIEWPORT and 0 < vh <= MAX_VIEWPORT):
            raise InvalidRequestError(f"viewport width and height must be integers from 1 to {MAX_VIEWPORT}")
        region: list[float | None] = [None, None, None, None]
        if len(parts) == 6:
            region = [_number(p, "viewport region") if p else None for p in parts[2:]]
        viewport = Viewport(int(vw), int(vh), *region)
    window = None
    if "window" in query:
        parts = [p.strip() for p in query["window"].split(",")]
        if len(parts) != 3:
            raise InvalidRequestError("window is center,width,function (PS3.18 8.3.5.1.3)")
        center, width = _number(parts[0], "window center"), _number(parts[1], "window width")
        function = parts[2].lower()
        if function not in WINDOW_FUNCTIONS:
            raise InvalidRequestError("window function must be linear, linear-exact or sigmoid")
        if width <= 0 or (function == "linear" and width < 1):
            raise InvalidRequestError("window width must be positive (>= 1 for linear, PS3.3 C.11.2.1.2)")
        window = (center, width, function)
    if "annotation" in query and query["annotation"].strip():
        raise InvalidRequestError("annotation is not supported")
    return RenderOptions(media_type, quality, viewport, window)


def apply_window(x: np.ndarray[Any, Any], center: float, width: float, function: str) -> np.ndarray[Any, Any]:
    """PS3.3 C.11.2.1.2/C.11.2.1.3: VOI window to 0..255."""
    x = x.astype(np.float64, copy=False)
    if function == "sigmoid":
        return 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "linear-exact":
        y = ((x - center) / width + 0.5) * 255.0
    else:
        y = ((x - (center - 0.5)) / (width - 1.0) + 0.5) * 255.0
    return np.clip(y, 0.0, 255.0)


def _first(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        value = value[0] if len(value) else None
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _to_uint8(arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    arr = arr.astype(np.float64, copy=False)
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return ((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _gray(arr: np.ndarray[Any, Any], ds: Dataset, opts: RenderOptions) -> np.ndarray[Any, Any]:
    values = apply_modality_lut(arr, ds)
    if opts.window is not None:
        out = apply_window(values, *opts.window)
    else:
        center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
        if center is not None and width is not None and width > 0:
            function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").lower().replace("_", "-")
            if function not in WINDOW_FUNCTIONS or (function == "linear" and width < 1):
                function = "linear-exact"
            out = apply_window(values, center, width, function)
        elif "VOILUTSequence" in ds:
            out = _to_uint8(apply_voi_lut(values, ds))
        else:
            out = _to_uint8(values)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        out = 255.0 - out
    return np.asarray(out, dtype=np.float64).round().astype(np.uint8)


def _colour(arr: np.ndarray[Any, Any], ds: Dataset) -> np.ndarray[Any, Any]:
    if str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        bits = 16 if arr.dtype.itemsize > 1 else 8
    else:
        bits = int(ds.get("BitsStored", 8) or 8)
    if arr.dtype == np.uint8:
        return arr
    shift = max(bits - 8, 0)
    out: np.ndarray[Any, Any] = np.clip(arr.astype(np.int64) >> shift, 0, 255).astype(np.uint8)
    return out


def _viewport(img: Image.Image, vp: Viewport | None, default_box: int | None) -> Image.Image:
    if vp is not None and None not in (vp.sx, vp.sy, vp.sw, vp.sh):
        assert vp.sx is not None and vp.sy is not None and vp.sw is not None and vp.sh is not None
        x0, y0, w, h = vp.sx, vp.sy, vp.sw, vp.sh
        flip_x, flip_y = w < 0, h < 0  # PS3.18 8.3.5.1.2: negative sw/sh flip the region
        box = (min(x0, x0 + w), min(y0, y0 + h), max(x0, x0 + w), max(y0, y0 + h))
        if box[2] - box[0] >= 1 and box[3] - box[1] >= 1:
            img = img.crop((round(box[0]), round(box[1]), round(box[2]), round(box[3])))
            if flip_x:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if flip_y:
                img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if vp is not None:
        target = (vp.width, vp.height)
    elif default_box is not None:
        target = (default_box, default_box)
    else:
        return img
    scale = min(target[0] / img.width, target[1] / img.height)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img if size == img.size else img.resize(size, Image.Resampling.LANCZOS)


def _frame_image(ds: Dataset, frame: int, opts: RenderOptions, thumbnail: bool) -> Image.Image:
    arr = decode_frame(ds, frame)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if samples == 1 and photometric != "PALETTE COLOR":
        img = Image.fromarray(_gray(arr, ds, opts), mode="L")
    else:
        img = Image.fromarray(_colour(arr, ds), mode="RGB")
    return _viewport(img, opts.viewport, THUMBNAIL_SIZE if thumbnail else None)


def render_dataset_frame(ds: Dataset, frame: int, opts: RenderOptions, *, thumbnail: bool = False) -> bytes:
    """Render the 1-based ``frame`` of ``ds`` (with pixel data) to ``opts.media_type`` bytes."""
    img = _frame_image(ds, frame, opts, thumbnail)
    buf = io.BytesIO()
    fmt = _PIL_FORMAT[opts.media_type]
    if fmt == "JPEG":
        img.save(buf, fmt, quality=opts.quality or 90)
    else:
        img.save(buf, fmt)
    return buf.getvalue()


def render_frame(fh: BinaryIO, frame: int, opts: RenderOptions, *, thumbnail: bool = False) -> bytes:
    """Render one frame of a stored Part 10 file (reads that one instance)."""
    ds = pydicom.dcmread(fh, force=True)
    return render_dataset_frame(ds, frame, opts, thumbnail=thumbnail)


def render_animation(fh: BinaryIO, opts: RenderOptions) -> bytes:
    """Every frame of a multi-frame instance as an animated GIF (a multi-frame rendered media type, PS3.18
    8.7.4), timed by Frame Time (0018,1063) when present."""
    ds = pydicom.dcmread(fh, force=True)
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if count > MAX_ANIMATION_FRAMES:
        raise NotAcceptableError(f"more than {MAX_ANIMATION_FRAMES} frames: retrieve frames one by one")
    images = [_frame_image(ds, n, opts, False) for n in range(1, count + 1)]
    try:
        duration = max(int(float(ds.get("FrameTime", 100) or 100)), 20)
    except (TypeError, ValueError):
        duration = 100
    buf = io.BytesIO()
    images[0].save(buf, "GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)
    return buf.getvalue()
