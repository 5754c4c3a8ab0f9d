"""Rasters as images the page embeds: the scene in colour (WebP with transparency, lossy: a picture),
values and classes as palette PNGs (lossless: 255 colour steps of a matplotlib colour map, or the
file's own colour table), each a ``data:`` URI; and the legends that go with them."""
from __future__ import annotations

import base64
import io
from typing import Optional, Sequence

import numpy as np

#: Colour steps of a value ramp; palette index ``TRANSPARENT`` is nodata.
STEPS = 255
TRANSPARENT = 255
#: WebP quality of the scene picture (the COGs keep every value; the page shows a picture).
WEBP_QUALITY = 85
#: Colours a legend's CSS gradient is sampled at.
LEGEND_STOPS = 11


def data_uri(raw: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def hex_colour(rgba: Sequence[int]) -> str:
    """``#rrggbb`` of 0..255 components."""
    return "#" + "".join(f"{int(v):02x}" for v in rgba[:3])


def ramp_colours(cmap: str, steps: int = STEPS) -> np.ndarray:
    """``[steps, 4]`` uint8 RGBA samples of a matplotlib colour map, low to high."""
    from matplotlib import colormaps

    return (colormaps[cmap](np.linspace(0.0, 1.0, steps)) * 255 + 0.5).astype(np.uint8)


def ramp_stops(cmap: str) -> list[str]:
    """CSS colours of ``cmap`` for a legend gradient."""
    return [hex_colour(c) for c in ramp_colours(cmap, LEGEND_STOPS)]


def ramp_index(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Palette indexes ``0..STEPS-1`` of ``values`` stretched from ``lo`` to ``hi`` (clipped);
    ``TRANSPARENT`` where NaN. The page's similarity ramp uses the same rule."""
    scaled = (values.astype(np.float64) - lo) / (hi - lo) * (STEPS - 1)
    index = np.clip(np.rint(np.nan_to_num(scaled, nan=0.0)), 0, STEPS - 1).astype(np.uint8)
    index[np.isnan(values)] = TRANSPARENT
    return index


def palette_png(index: np.ndarray, colours: np.ndarray) -> str:
    """A palette PNG of ``index`` ``[h, w]`` uint8 with ``colours`` ``[256, 4]`` RGBA (alpha kept)."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(index, np.uint8), mode="P")
    image.putpalette(colours[:, :3].astype(np.uint8).tobytes(), rawmode="RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True, transparency=colours[:, 3].astype(np.uint8).tobytes())
    return data_uri(buf.getvalue(), "image/png")


def values_image(values: np.ndarray, lo: float, hi: float, cmap: str) -> str:
    """A continuous band (NaN = nodata) as a palette PNG of ``cmap`` from ``lo`` to ``hi``."""
    colours = np.zeros((256, 4), np.uint8)
    colours[:STEPS] = ramp_colours(cmap)
    return palette_png(ramp_index(values, lo, hi), colours)


def classes_image(values: np.ndarray, table: dict[int, Sequence[int]]) -> str:
    """A class band (NaN = nodata) in its colour table (classes without a colour: grey)."""
    colours = np.zeros((256, 4), np.uint8)
    colours[:, :3], colours[:, 3] = 128, 255
    for value, rgba in table.items():
        colours[int(value)] = (tuple(rgba) + (255,))[:4]
    nodata = np.isnan(values)
    index = np.where(nodata, 0, values).astype(np.uint8)
    if nodata.any():             # a palette entry no class uses, fully transparent
        free = _free_entry(index[~nodata])
        index[nodata] = free
        colours[free] = (0, 0, 0, 0)
    return palette_png(index, colours)


def _free_entry(used: np.ndarray) -> int:
    present = np.zeros(256, bool)
    present[np.unique(used)] = True
    free = np.flatnonzero(~present)
    return int(free[-1]) if free.size else TRANSPARENT


def rgb_image(rgb: np.ndarray, valid: np.ndarray) -> str:
    """A colour picture ``[3, h, w]`` in 0..1, transparent where not ``valid``: lossy WebP (PNG
    where Pillow has no WebP)."""
    from PIL import Image, features

    pixels = np.empty(rgb.shape[1:] + (4,), np.uint8)
    pixels[..., :3] = np.clip(np.rint(np.moveaxis(rgb, 0, -1) * 255), 0, 255)
    pixels[..., 3] = np.where(valid, 255, 0)
    image = Image.fromarray(pixels, mode="RGBA")
    buf = io.BytesIO()
    if features.check("webp"):
        image.save(buf, format="WEBP", quality=WEBP_QUALITY, method=4)
        return data_uri(buf.getvalue(), "image/webp")
    image.save(buf, format="PNG", optimize=True)
    return data_uri(buf.getvalue(), "image/png")


def stretch(values: np.ndarray, domain: tuple[Optional[float], Optional[float]] = (None, None),
            percentiles: tuple[float, float] = (2.0, 98.0)) -> tuple[float, float]:
    """(lo, hi) of the valid values' percentiles, kept inside ``domain``; never empty."""
    finite = values[np.isfinite(values)]
    lo, hi = (float(v) for v in np.percentile(finite, percentiles)) if finite.size else (0.0, 1.0)
    low, high = domain
    lo = max(lo, low) if low is not None else lo
    hi = min(hi, high) if high is not None else hi
    if not hi > lo:
        hi = lo + (abs(lo) * 1e-3 or 1.0)
    return lo, hi


def ramp_legend(label: str, units: str, cmap: str, lo: float, hi: float) -> dict:
    return {"kind": "ramp", "label": label, "units": units, "colours": ramp_stops(cmap),
            "min": float(lo), "max": float(hi)}


def classes_legend(label: str, items: Sequence[tuple[str, str]]) -> dict:
    return {"kind": "classes", "label": label, "items": [{"name": n, "colour": c} for n, c in items]}
