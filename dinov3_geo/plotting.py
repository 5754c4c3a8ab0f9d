"""Maps for notebooks: the scene beside a result, in map coordinates, with a legend and a scale bar.

Everything is drawn with matplotlib in the raster's own CRS (axes in its units), decimated to at
most ``MAX_SIDE`` pixels a side so large scenes stay cheap to show; the scale bar is
matplotlib-scalebar's (metres, for projected CRSs). Needs the ``notebook`` extra.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import rasterio
from rasterio.enums import Resampling

MAX_SIDE = 1200


def read_for_display(path, bands: Sequence[int] = (1,), resampling=Resampling.nearest):
    """``(array [bands, h, w] as float with NaN for nodata, extent (left, right, bottom, top), crs)``,
    decimated to at most ``MAX_SIDE`` pixels a side."""
    with rasterio.open(path) as ds:
        f = max(1.0, max(ds.width, ds.height) / MAX_SIDE)
        shape = (len(bands), max(1, int(ds.height / f)), max(1, int(ds.width / f)))
        data = ds.read(list(bands), out_shape=shape, resampling=resampling, masked=True)
        extent = (ds.bounds.left, ds.bounds.right, ds.bounds.bottom, ds.bounds.top)
        return data.astype(np.float64).filled(np.nan), extent, ds.crs


def add_scale_bar(ax, crs) -> None:
    """A scale bar in metres (projected CRSs; none on a geographic one)."""
    from matplotlib_scalebar.scalebar import ScaleBar

    if crs is None or crs.is_geographic:
        return
    factor = crs.linear_units_factor[1] if crs.linear_units else 1.0
    ax.add_artist(ScaleBar(factor, "m", location="lower left", box_alpha=0.7))


def _finish(ax, title: str, crs) -> None:
    ax.set_title(title)
    ax.set_xlabel(f"x ({crs.linear_units if crs is not None and crs.linear_units else 'map units'})")
    ax.set_ylabel("y")
    ax.tick_params(labelsize=7)
    ax.ticklabel_format(useOffset=False, style="plain")
    add_scale_bar(ax, crs)


def show_image(ax, path, bands: Sequence[int] = (1, 2, 3), title: str = "image") -> None:
    """The scene as a colour image (2-98 % stretch per band), nodata transparent."""
    data, extent, crs = read_for_display(path, bands, Resampling.average)
    rgb = np.empty(data.shape[1:] + (4,))
    for i, band in enumerate(data[:3]):
        lo, hi = np.nanpercentile(band, (2, 98)) if np.isfinite(band).any() else (0, 1)
        rgb[..., i] = np.clip((band - lo) / max(hi - lo, 1e-9), 0, 1)
    rgb[..., 3] = np.isfinite(data).all(axis=0)
    ax.imshow(np.nan_to_num(rgb), extent=extent)
    _finish(ax, title, crs)


def show_values(ax, path, title: str, label: str, cmap: str = "viridis", vmin: Optional[float] = None,
                vmax: Optional[float] = None) -> None:
    """A continuous single-band raster with a colour bar labelled ``label``."""
    data, extent, crs = read_for_display(path)
    im = ax.imshow(data[0], extent=extent, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.figure.colorbar(im, ax=ax, shrink=0.8, label=label)
    _finish(ax, title, crs)


def show_classes(ax, path, title: str, names: Optional[Sequence[str]] = None) -> None:
    """A class raster (uint8, 255 nodata) in its own colour table, with a legend of the classes present."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    data, extent, crs = read_for_display(path)
    with rasterio.open(path) as ds:
        table = ds.colormap(1)
    present = [int(v) for v in np.unique(data[np.isfinite(data)]) if v != 255]
    colours = np.array([table.get(v, (128, 128, 128, 255)) for v in range(256)], float) / 255
    ax.imshow(np.where(np.isfinite(data[0]), data[0], 255), extent=extent, cmap=ListedColormap(colours),
              vmin=-0.5, vmax=255.5, interpolation="nearest")
    labels = [names[v] if names is not None and v < len(names) else f"class {v}" for v in present]
    ax.legend(handles=[Patch(color=colours[v], label=lab) for v, lab in zip(present, labels)],
              loc="upper right", fontsize=7, framealpha=0.8)
    _finish(ax, title, crs)


def beside(image_path, title: str = "image", bands: Sequence[int] = (1, 2, 3), width: float = 12.0,
           dpi: int = 72):
    """A figure with the scene on the left; returns ``(figure, right axes)`` for the result."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(width, width * 0.42), sharex=True, sharey=True,
                                      constrained_layout=True, dpi=dpi)
    show_image(left, image_path, bands, title)
    return fig, right
