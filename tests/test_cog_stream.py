"""COG blocks encoded while streaming: the same file GDAL's COG copy makes, value for value."""
import numpy as np
import pytest
import rasterio
import rasterio.shutil
from rasterio.control import GroundControlPoint
from rasterio.windows import Window
from rio_cogeo.cogeo import cog_validate

from dinov3_geo.io.cog import COGSink
from dinov3_geo.io.scene import open_scene
from helpers import mean_model, stream

RGB = "rasterio_RGB.byte.tif"           # 791 x 718: odd sides
SALT = "landsat7_saltlake_truecolor_utm12n.tif"


def flat_scene(path, height, width):
    """A uniform 3-band uint8 scene of ``height`` x ``width`` on a UTM grid: the grid results are written on."""
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=rasterio.Affine(10, 0, 400000, 0, -10, 5000000)) as ds:
        ds.write(np.full((3, height, width), 7, np.uint8))
    return path


def three_features(x):
    return np.stack([x[0] - x[1], x[2] * 2.0, x.mean(0) ** 2]).astype(np.float32)


def both_ways(scene, folder, model, channels, **sink_kw):
    """The result written with blocks encoded while streaming and through GDAL's COG copy."""
    outs = {}
    for streamed in (True, False):
        out = folder / f"{'streamed' if streamed else 'gdal'}.tif"
        with COGSink(out, scene, count=channels, stream_blocks=streamed, **sink_kw) as sink:
            assert sink.streams_blocks == streamed
            stream(scene, sink, model, channels, 256, 32)
        outs[streamed] = out
    return outs[True], outs[False]


def assert_same_raster(mine, gdal, same_overviews=True):
    valid, errors, warnings = cog_validate(mine, strict=True, quiet=True)
    assert valid, (errors, warnings)
    with rasterio.open(mine) as a, rasterio.open(gdal) as b:
        assert a.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert {**a.profile, "nodata": str(a.nodata)} == {**b.profile, "nodata": str(b.nodata)}
        assert (a.tags(), a.descriptions, a.scales) == (b.tags(), b.descriptions, b.scales)
        assert [repr(g) for g in a.gcps[0]] == [repr(g) for g in b.gcps[0]] and a.gcps[1] == b.gcps[1]
        np.testing.assert_array_equal(a.read(), b.read())          # bit for bit, NaN where NaN
        assert a.overviews(1) == b.overviews(1) and a.overviews(1)
        levels = len(a.overviews(1))
    for level in range(levels):
        with rasterio.open(mine, overview_level=level) as o, rasterio.open(gdal, overview_level=level) as g:
            x, y = o.read(), g.read()
            assert x.shape == y.shape
            if same_overviews and x.dtype.kind in "iu":
                np.testing.assert_array_equal(x, y)        # GDAL rounds integer means half up
            elif same_overviews:
                np.testing.assert_array_equal(np.isnan(x), np.isnan(y))
                np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_streamed_blocks_equal_gdal_cog_on_a_scene_whose_sides_halve(sample, tmp_path):
    crop = tmp_path / "crop.tif"        # 1024 x 1152: both sides divide by 2**2 (two levels)
    with rasterio.open(sample(SALT)) as src:
        profile = {**src.profile, "width": 1152, "height": 1024}
        with rasterio.open(crop, "w", **profile) as dst:
            dst.write(src.read(window=Window(0, 200, 1152, 1024)))
    with open_scene(crop) as scene:
        mine, gdal = both_ways(scene, tmp_path, mean_model, 1, band_descriptions=["mean"],
                               tags={"UNITS": "m"})
    assert_same_raster(mine, gdal)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crop.tif", "gdal.tif", "streamed.tif"]


def test_streamed_blocks_on_odd_sides_and_three_bands(sample, tmp_path):
    """Odd sides: full resolution bit for bit; overviews are exact 2x2 means of the pixels they
    cover (GDAL stretches its windows to a little over 2 pixels to reach the last odd pixel)."""
    with open_scene(sample(RGB)) as scene:
        assert scene.width % 2
        mine, gdal = both_ways(scene, tmp_path, three_features, 3, scales=[0.5, 1.0, 2.0])
    assert_same_raster(mine, gdal, same_overviews=False)
    with rasterio.open(mine) as a, rasterio.open(mine, overview_level=0) as o:
        full, half = a.read(), o.read()
        h, w = half.shape[1:]
        with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning, match="empty slice"):
            two_by_two = np.nanmean(full[:, :2 * h, :2 * w].reshape(3, h, 2, w, 2), axis=(2, 4))
        np.testing.assert_allclose(half, two_by_two, rtol=1e-6, atol=1e-6)


def test_streamed_blocks_keep_ground_control_points(tmp_path):
    px, x0, y0 = 2.0, 500000.0, 4100000.0
    gcps = [GroundControlPoint(row, col, x0 + col * px + row * 0.5, y0 - row * px + col * 0.25)
            for row, col in [(0, 0), (0, 699), (599, 0), (599, 699), (300, 350)]]
    src = tmp_path / "gcps.tif"
    data = (np.indices((600, 700)).sum(0) % 251).astype(np.uint8)
    with rasterio.open(src, "w", driver="GTiff", width=700, height=600, count=3, dtype="uint8",
                       gcps=gcps, crs="EPSG:32618") as ds:
        ds.write(np.stack([data, data[::-1], data[:, ::-1]]))
    with open_scene(src) as scene:
        mine, gdal = both_ways(scene, tmp_path, mean_model, 1)
    assert_same_raster(mine, gdal)
    with rasterio.open(mine) as ds:
        assert len(ds.gcps[0]) == 5 and ds.gcps[1] == rasterio.crs.CRS.from_epsg(32618)


@pytest.mark.parametrize("dtype, nodata, streamed", [("float32", float("nan"), True), ("uint16", 65535, True),
                                                     ("uint8", 255, True), ("uint16", None, False),
                                                     ("int16", -1, False)])
def test_which_results_stream_blocks(sample, tmp_path, dtype, nodata, streamed):
    with open_scene(sample(RGB)) as scene:
        with COGSink(tmp_path / "o.tif", scene, dtype=dtype, nodata=nodata) as sink:
            assert sink.streams_blocks == streamed
            sink.write(0, np.zeros((1, scene.height, scene.width), dtype))


def test_streamed_blocks_carry_gdal_block_leaders_and_trailers(sample, tmp_path):
    """The ghost header promises a size leader and a repeated trailer around every block (GDAL
    reads COGs over HTTP by them): each block's are right, and the blocks lie in GDAL's order."""
    import tifffile

    with open_scene(sample(SALT)) as scene:
        mine, _ = both_ways(scene, tmp_path, mean_model, 1)
    data = mine.read_bytes()
    assert b"BLOCK_LEADER=SIZE_AS_UINT4" in data[:400] and b"KNOWN_INCOMPATIBLE_EDITION=NO" in data[:400]
    with tifffile.TiffFile(mine) as tif:
        firsts = []
        for page in tif.pages:
            for offset, size in zip(page.dataoffsets, page.databytecounts):
                assert int.from_bytes(data[offset - 4:offset], "little") == size
                assert data[offset + size:offset + size + 4] == data[offset + size - 4:offset + size]
            firsts.append(page.dataoffsets[0])
    assert firsts == sorted(firsts, reverse=True)       # smallest overview first, full resolution last


@pytest.mark.parametrize("height, width, nodata", [(16, 17, float("nan")), (80, 100, -9999.0),
                                                   (512, 512, float("nan")), (1024, 513, -9999.0),
                                                   (1100, 1536, float("nan")), (1024, 1536, -9999.0)])
def test_streamed_blocks_on_any_size_and_nodata(tmp_path, height, width, nodata):
    """The smallest scene, sub-block, whole-block and ragged sizes, NaN or a number as nodata: the same
    full-resolution file as GDAL's COG copy, rows written in uneven pieces; overviews that ignore
    nodata as GDAL's do (the same where the sides halve evenly)."""
    src = flat_scene(tmp_path / "in.tif", height, width)
    rng = np.random.default_rng(height * 7 + width)
    values = rng.normal(10, 5, (1, height, width)).astype(np.float32)
    values[:, rng.random((height, width)) < 0.1] = nodata
    written_both_ways(src, tmp_path, values, nodata=nodata)


def written_both_ways(src, folder, values, **sink_kw):
    """``values`` written on the grid of ``src`` in uneven pieces (not whole strips), with blocks
    streamed and through GDAL's COG copy, then compared: the same full resolution; the same
    overviews where the sides halve evenly (GDAL stretches its windows otherwise)."""
    bands, height, width = values.shape
    with open_scene(src) as scene:
        for streamed in (True, False):
            with COGSink(folder / f"{streamed}.tif", scene, count=bands, stream_blocks=streamed, **sink_kw) as sink:
                assert sink.streams_blocks == streamed
                for row in range(0, height, 300):
                    sink.write(row, values[:, row:row + 300].copy())
    if height > 512 or width > 512:
        halves = height % 4 == 0 and width % 4 == 0
        assert_same_raster(folder / "True.tif", folder / "False.tif", same_overviews=halves)
    else:
        _same_small(folder / "True.tif", folder / "False.tif")


def _same_small(mine, gdal):
    """A result of one block level: no overviews to compare."""
    valid, errors, warnings = cog_validate(mine, strict=True, quiet=True)
    assert valid, (errors, warnings)
    with rasterio.open(mine) as a, rasterio.open(gdal) as b:
        assert {**a.profile, "nodata": str(a.nodata)} == {**b.profile, "nodata": str(b.nodata)}
        np.testing.assert_array_equal(a.read(), b.read())
        assert a.overviews(1) == b.overviews(1) == []


@pytest.mark.parametrize("streamed", [True, False])
def test_overviews_ignore_a_numeric_nodata_as_gdal_average_does(tmp_path, streamed):
    height, width, nodata = 1024, 1536, -9999.0
    geo = dict(crs="EPSG:32633", transform=rasterio.Affine(10, 0, 400000, 0, -10, 5000000))
    src = flat_scene(tmp_path / "in.tif", height, width)
    rng = np.random.default_rng(1)
    values = rng.normal(10, 5, (1, height, width)).astype(np.float32)
    values[:, rng.random((height, width)) < 0.3] = nodata
    values[:, :40, :40] = nodata
    with open_scene(src) as scene, COGSink(tmp_path / "out.tif", scene, nodata=nodata,
                                           stream_blocks=streamed) as sink:
        sink.write(0, values)
    plain = tmp_path / "plain.tif"
    with rasterio.open(plain, "w", driver="GTiff", width=width, height=height, count=1, dtype="float32",
                       nodata=nodata, **geo) as ds:
        ds.write(values)
    rasterio.shutil.copy(plain, tmp_path / "gdal.tif", driver="COG", overview_resampling="AVERAGE")
    for level in range(2):
        with rasterio.open(tmp_path / "out.tif", overview_level=level) as o, \
                rasterio.open(tmp_path / "gdal.tif", overview_level=level) as g:
            mine, gdal = o.read(1), g.read(1)
            np.testing.assert_array_equal(mine == nodata, gdal == nodata)
            np.testing.assert_allclose(mine, gdal, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("height, width, bands", [(80, 100, 1), (1024, 1536, 1), (1100, 1536, 1), (1024, 1152, 3)])
def test_streamed_uint16_blocks_equal_gdal_cog(tmp_path, height, width, bands):
    """uint16 results (the quantised heights of ``dtype="uint16"``: nodata 65535, a band scale):
    horizontal differencing and ZSTD as GDAL encodes them, full resolution bit for bit; overviews
    rounded half up, each level from the one above, equal to GDAL's AVERAGE where the sides halve."""
    src = flat_scene(tmp_path / "in.tif", height, width)
    rng = np.random.default_rng(height + width + bands)
    values = rng.integers(0, 400, (bands, height, width)).astype(np.uint16)
    values[:, rng.random((height, width)) < 0.1] = 65535
    values[:, : height // 3, : width // 4] = 65535          # a nodata area
    values[:, -5:, -7:] = 65534                             # the largest value, beside nodata
    written_both_ways(src, tmp_path, values, dtype="uint16", nodata=65535, scales=[0.1] * bands)
    with rasterio.open(tmp_path / "True.tif") as ds:
        assert ds.dtypes[0] == "uint16" and ds.nodata == 65535 and ds.scales == (0.1,) * bands
        np.testing.assert_array_equal(ds.read(), values)


@pytest.mark.parametrize("height, width", [(80, 100), (1024, 1536), (1100, 1536)])
def test_streamed_float16_blocks_equal_gdal_cog(tmp_path, height, width):
    """float32 results stored as half floats (``nbits=16``, ``dtype="float16"``): the values GDAL
    stores (truncated to float16, not rounded), the floating-point predictor on 2-byte words; the same
    file as GDAL's COG copy, full resolution bit for bit, overviews where the sides halve."""
    src = flat_scene(tmp_path / "in.tif", height, width)
    rng = np.random.default_rng(height * 3 + width)
    values = rng.normal(15, 10, (1, height, width)).astype(np.float32)
    values[:, rng.random((height, width)) < 0.05] = np.nan
    values[:, : height // 3, : width // 4] = np.nan
    values[0, -1, :6] = [70000.0, 65519.0, 3e-6, -2e-8, 1.0 + 2 ** -12, -0.0]   # beyond float16, subnormal
    written_both_ways(src, tmp_path, values, nbits=16)
    with rasterio.open(tmp_path / "True.tif") as ds:
        got = ds.read(1)
        assert ds.dtypes[0] == "float32" and ds.tags(1, ns="IMAGE_STRUCTURE")["NBITS"] == "16"
    assert np.all((np.abs(got) <= np.abs(values[0])) | np.isnan(values[0]) | np.isinf(got))  # truncated
    assert np.isinf(got[-1, 0]) and got[-1, 1] == 65504.0


def test_half_floats_are_cut_as_gdal_stores_them(tmp_path):
    """``truncated_half`` against the half floats GDAL stores for NBITS=16 (read back raw with
    tifffile) on float32 patterns across every exponent: normal, subnormal, beyond range, NaN."""
    import tifffile

    from dinov3_geo.io.cog.encoder import truncated_half

    rng = np.random.default_rng(0)
    bits = np.concatenate([np.arange(0, 2 ** 32, 8191, dtype=np.uint64).astype(np.uint32),
                           rng.integers(0, 2 ** 32, 100_000, dtype=np.uint64).astype(np.uint32)])
    values = np.resize(bits, (bits.size // 1024, 1024)).view(np.float32)
    path = tmp_path / "half.tif"
    with rasterio.open(path, "w", driver="GTiff", width=1024, height=values.shape[0], count=1,
                       dtype="float32", nbits=16, crs="EPSG:32633",
                       transform=rasterio.Affine(10, 0, 400000, 0, -10, 5000000)) as ds:
        ds.write(values, 1)
    gdal = tifffile.imread(path)
    assert gdal.dtype == np.float16
    np.testing.assert_array_equal(truncated_half(values).view(np.uint16), gdal.view(np.uint16))


@pytest.mark.parametrize("height, width", [(80, 100), (1024, 1536), (1100, 1537)])
def test_streamed_class_blocks_equal_gdal_cog(tmp_path, height, width):
    """Classes (uint8, nodata 255, a colour table, class names): horizontal differencing and ZSTD,
    overviews by GDAL's NEAREST (the top-left pixel of each 2x2 cell); the same file as GDAL's COG
    copy, overviews too where the sides halve."""
    src = flat_scene(tmp_path / "in.tif", height, width)
    rng = np.random.default_rng(height + width)
    classes = rng.integers(0, 6, (1, height, width)).astype(np.uint8)
    classes[:, rng.random((height, width)) < 0.1] = 255
    classes[:, : height // 3, : width // 4] = 255
    colours = {k: (40 * k, 255 - 40 * k, 128, 255) for k in range(6)}
    written_both_ways(src, tmp_path, classes, dtype="uint8", nodata=255, colormap=colours,
                      tags={"CLASS_0": "water", "CLASS_1": "trees"})
    with rasterio.open(tmp_path / "True.tif") as a, rasterio.open(tmp_path / "False.tif") as b:
        assert a.colormap(1) == b.colormap(1) and a.colormap(1)[3] == colours[3]
        np.testing.assert_array_equal(a.read(), classes)
    if max(height, width) > 1024 and height % 4 == 0 and width % 4 == 0:      # two levels
        with rasterio.open(tmp_path / "True.tif", overview_level=1) as o:
            np.testing.assert_array_equal(o.read(), classes[:, ::4, ::4])
