"""One row per chip: its footprint, CLS embedding and mean patch embedding, as GeoParquet,
GeoPackage or FlatGeobuf.

:class:`ChipEmbeddingWriter` is a pipeline consumer (``add``/``skip``/``close``) for the
:class:`~dinov3_geo.tasks.embed.ChipTokens` model. Rows are kept in memory (two vectors a chip)
and written by ``close`` atomically. GeoParquet (``.parquet``): geopandas writes the metadata (CRS
as PROJJSON, WKB footprints, the ``dinov3_geo`` attributes: backbone id, width, tile, overlap),
pyarrow adds the embeddings as fixed-size list columns of float32. GeoPackage (``.gpkg``) and
FlatGeobuf (``.fgb``), for clients without Parquet (GDAL builds without it, QGIS 3.22): the same
columns, each embedding a BLOB of little-endian float32 (``numpy.frombuffer(blob, "<f4")``: a table
of 2 x 1024 columns would pass SQLite's 2000), the attributes as JSON in the layer's metadata item
``dinov3_geo``. :func:`read_chip_embeddings` reads all three alike.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyogrio
import shapely
from affine import Affine
from rasterio.windows import Window

from dinov3_geo.errors import InputError, OutputError
from dinov3_geo.io.atomic import atomic_output
from dinov3_geo.io.georef import vector_transform
from dinov3_geo.io.gpkg import GPKG_VERSION

PATCH = 16
#: Key of the GeoDataFrame attributes (``gdf.attrs``) that describe how the embeddings were made
#: (in GeoPackage and FlatGeobuf files: the layer metadata item of this name, JSON).
ATTRS_KEY = "dinov3_geo"
#: Layer of the chips in a GeoPackage or FlatGeobuf file.
CHIPS_LAYER = "chips"
#: The file types chip embeddings are written as, by suffix: OGR driver (None: GeoParquet by pyarrow).
CHIP_FORMATS = {".parquet": None, ".gpkg": "GPKG", ".fgb": "FlatGeobuf"}
EMBEDDINGS = ("cls", "mean_patch")


def cell_valid(valid: np.ndarray, cells: int | None = None, patch: int = PATCH) -> np.ndarray:
    """Per 16-px cell: True where any pixel of ``valid`` (bool ``[h, w]``) is valid; ``[ceil(h/16),
    ceil(w/16)]``, or ``[cells, cells]`` padded with False (a chip smaller than its tile)."""
    h, w = valid.shape
    rows, cols = -(-h // patch), -(-w // patch)
    padded = np.zeros((rows * patch, cols * patch), bool)
    padded[:h, :w] = valid
    out = padded.reshape(rows, patch, cols, patch).any(axis=(1, 3))
    if cells is not None:
        full = np.zeros((cells, cells), bool)
        full[:rows, :cols] = out[:cells, :cells]
        out = full
    return out


def window_polygon(window: Window, transform: Affine) -> shapely.Polygon:
    """The footprint of ``window`` in map coordinates (rotated grids included)."""
    r, c, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
    corners = [transform @ (c, r), transform @ (c + w, r), transform @ (c + w, r + h), transform @ (c, r + h)]
    return shapely.Polygon(corners)


class ChipEmbeddingWriter:
    """Consumer of ``[D, 1 + t*t]`` chip tokens that writes one GeoParquet row per non-empty chip.

    Columns: ``chip_row``, ``chip_col`` (position in the chip grid), ``row_off``, ``col_off``,
    ``height``, ``width`` (pixels), ``valid_fraction``, ``cls`` and ``mean_patch`` (fixed-size
    lists of ``embed_dim`` float32; the mean is over the cells holding a valid pixel), and the
    footprint ``geometry`` in the scene's CRS (a scene without georeference: where GIS tools draw
    it, x = column, y = -row). The file type follows the suffix of ``output`` (:data:`CHIP_FORMATS`).
    """

    def __init__(self, output, scene, windows, embed_dim: int, attrs: dict, overwrite: bool = False):
        self.output, self.overwrite = output, overwrite
        self.scene_path = scene.path
        self.crs, self.transform = scene.crs, vector_transform(scene.crs, scene.transform)
        self.embed_dim = int(embed_dim)
        self.attrs = dict(attrs, embed_dim=self.embed_dim)
        self.rows_of = {r: i for i, r in enumerate(sorted({int(w.row_off) for w in windows}))}
        self.cols_of = {c: i for i, c in enumerate(sorted({int(w.col_off) for w in windows}))}
        self.records: list[dict] = []
        self.cls: list[np.ndarray] = []
        self.mean: list[np.ndarray] = []

    def add(self, window: Window, tokens: np.ndarray, valid: np.ndarray) -> None:
        """Keep chip ``window``'s CLS and its mean patch token over valid cells."""
        d, n = tokens.shape
        cells = int(round((n - 1) ** 0.5))
        if d != self.embed_dim or cells * cells != n - 1:
            raise OutputError(self.output, f"chip tokens of shape {tokens.shape}, expected "
                                           f"({self.embed_dim}, 1 + t*t)")
        keep = cell_valid(valid, cells).ravel()
        patches = tokens[:, 1:][:, keep]
        self.cls.append(np.asarray(tokens[:, 0], np.float32))
        self.mean.append(patches.mean(axis=1, dtype=np.float64).astype(np.float32))
        self.records.append(dict(
            chip_row=self.rows_of[int(window.row_off)], chip_col=self.cols_of[int(window.col_off)],
            row_off=int(window.row_off), col_off=int(window.col_off), height=int(window.height),
            width=int(window.width), valid_fraction=float(valid.mean()),
            geometry=window_polygon(window, self.transform)))

    def skip(self, window: Window) -> None:
        """A chip without valid pixels gets no row."""

    def close(self) -> None:
        """Write the file (atomically: nothing at ``output`` unless complete)."""
        columns = {name: np.array([r[name] for r in self.records], dtype) for name, dtype in _COLUMNS.items()}
        geometry = gpd.GeoSeries([r["geometry"] for r in self.records], crs=self.crs)
        frame = gpd.GeoDataFrame(columns, geometry=geometry, crs=self.crs)
        frame.attrs[ATTRS_KEY] = self.attrs
        driver = chip_format(self.output)
        with atomic_output(self.output, self.overwrite, inputs=[self.scene_path]) as tmp:
            if driver is None:
                pq.write_table(self._parquet_table(frame), tmp)
            else:
                os.unlink(tmp)      # the OGR driver creates the file itself
                self._write_ogr(frame, tmp, driver)

    def _parquet_table(self, frame: gpd.GeoDataFrame) -> pa.Table:
        """GeoParquet of ``frame`` with the embeddings as fixed-size lists of float32."""
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        buffer.seek(0)
        table = pq.read_table(buffer)
        for name, vectors in zip(EMBEDDINGS, (self.cls, self.mean)):
            table = table.append_column(name, _fixed_size_list(vectors, self.embed_dim))
        return table

    def _write_ogr(self, frame: gpd.GeoDataFrame, path: Path, driver: str) -> None:
        """``frame`` with the embeddings as BLOBs of little-endian float32, as layer ``chips`` of a
        GeoPackage (the version :func:`~dinov3_geo.io.vector.write_gpkg_layer` writes) or FlatGeobuf."""
        table = pa.table(frame.to_arrow(geometry_encoding="WKB"))
        for name, vectors in zip(EMBEDDINGS, (self.cls, self.mean)):
            table = table.append_column(name, pa.array([v.astype("<f4").tobytes() for v in vectors], pa.binary()))
        options = {"dataset_options": {"VERSION": GPKG_VERSION}} if driver == "GPKG" else {}
        pyogrio.write_arrow(table, str(path), layer=CHIPS_LAYER, driver=driver, geometry_name="geometry",
                            geometry_type="Polygon", crs=self.crs.to_wkt() if self.crs is not None else None,
                            layer_metadata={ATTRS_KEY: json.dumps(self.attrs)}, **options)


def chip_format(path) -> str | None:
    """The OGR driver of a chip-embedding file by its suffix, None for GeoParquet (any suffix but
    ``.gpkg`` and ``.fgb``)."""
    return CHIP_FORMATS.get(Path(path).suffix.lower())


_COLUMNS = {"chip_row": "int32", "chip_col": "int32", "row_off": "int64", "col_off": "int64",
            "height": "int32", "width": "int32", "valid_fraction": "float32"}


def _fixed_size_list(vectors: list[np.ndarray], width: int) -> pa.FixedSizeListArray:
    """``[N, width]`` float32 rows as a pyarrow fixed-size list array."""
    flat = np.concatenate(vectors) if vectors else np.zeros(0, np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.astype(np.float32, copy=False)), width)


def read_chip_embeddings(path: str | os.PathLike) -> gpd.GeoDataFrame:
    """A chip-embedding file (GeoParquet, GeoPackage or FlatGeobuf) as a GeoDataFrame: ``cls`` and
    ``mean_patch`` hold float32 vectors, ``attrs["dinov3_geo"]`` says how they were made."""
    driver = chip_format(path)
    if driver is None:
        return gpd.read_parquet(path)
    try:
        frame = pyogrio.read_dataframe(path, layer=CHIPS_LAYER)
        metadata = pyogrio.read_info(path, layer=CHIPS_LAYER).get("layer_metadata") or {}
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as exc:
        raise InputError(path, f"not a chip-embedding file ({exc})") from None
    for name in EMBEDDINGS:
        frame[name] = [np.frombuffer(blob, "<f4") for blob in frame[name]]
    frame.attrs[ATTRS_KEY] = json.loads(metadata.get(ATTRS_KEY, "{}"))
    return frame
