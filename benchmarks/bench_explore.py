"""Sizes, build and load times of the explorer's page (``dinov3geo view``): the sample scenes with
the README's outputs, and a 10 000 x 10 000 px scene.

The large scene is a VRT tiling the NAIP sample (real pixels, 934 x 723, repeated 11 x 14 times and
cut to ``--size``), with the 2019 sample tiled the same way as its other date; the README's outputs
(canopy and its polygons, patch features, similarity, k-means units and their polygons, change) are
made on it with the demo models (``--outputs``; slow on a CPU: about 2 000 chips of 512 px). Each
page is built ``--runs`` times (median) and opened as many times in headless Chromium with the
network off: load = from navigation to the page's script done (``window.dinov3geo.loadedMs``),
click = one similarity computation and drawing. One JSON object per case, then a list of all as
the last line.

    python benchmarks/bench_explore.py --work DIR [--size 10000] [--runs 3] [--screenshot docs/explore.png]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

import rasterio

import dinov3_geo
from dinov3_geo.hostmem import keep_freed_memory
from dinov3_geo.testing.tiled_scene import tiled_vrt

SAMPLES = Path(__file__).resolve().parent.parent / "data_samples"
NAIP = SAMPLES / "opengeos_naip_m_4709963_se_14_1_20200831.tif"
NAIP_2019 = SAMPLES / "naip_m_4709963_se_14_1_20190904.tif"
OTHER_SAMPLES = ["landsat7_saltlake_truecolor_utm12n.tif", "rasterio_RGB.byte.tif", "stars_L7_ETMs.tif"]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


OUTPUTS = ("canopy.tif", "canopy.gpkg", "units.tif", "units.gpkg", "similar.tif", "change.tif", "feats.zarr")


def make_outputs(scene: Path, before: Path, work: Path, tile: int, overlap: int, reuse: bool) -> list[Path]:
    """The README's land-analysis and canopy outputs of ``scene`` (demo models), in ``work``
    (kept from an earlier run with ``reuse``)."""
    if reuse and all((work / n).exists() for n in OUTPUTS):
        return [work / n for n in OUTPUTS]
    run = dict(tile=tile, overlap=overlap, progress=False, overwrite=True)
    backbone = dinov3_geo.load_backbone("demo")
    with rasterio.open(scene) as ds:
        at = ds.xy(ds.height // 3, ds.width // 3)
    steps = [
        ("canopy", lambda: dinov3_geo.segment(scene, task="canopy", output=work / "canopy.tif", weights="demo",
                                              vector=work / "canopy.gpkg", **run)),
        ("embed --patch", lambda: dinov3_geo.embed(scene, work / "feats.zarr", patch=True, backbone=backbone, **run)),
        ("similar", lambda: dinov3_geo.similar(scene, work / "similar.tif", at=at, features=work / "feats.zarr",
                                               backbone=backbone, **run)),
        ("cluster", lambda: dinov3_geo.cluster(scene, work / "units.tif", k=6, vector=work / "units.gpkg",
                                               features=work / "feats.zarr", backbone=backbone, **run)),
        ("change", lambda: dinov3_geo.change(before, scene, work / "change.tif", backbone=backbone, **run)),
    ]
    for name, step in steps:
        t0 = time.perf_counter()
        step()
        print(f"{scene.name}: {name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return [work / n for n in OUTPUTS]


def build(scene: Path, outputs: list[Path], page: Path, runs: int, **kw) -> tuple[dict, object]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        made = dinov3_geo.explore(scene, *outputs, output=page, overwrite=True, **kw)
        times.append(time.perf_counter() - t0)
    return {"build_s": round(statistics.median(times), 2), "build_runs_s": [round(t, 2) for t in times],
            "page_mb": round(page.stat().st_size / 2**20, 2), "layers": len(made.layers),
            "headline": made.headline}, made


def open_in_browser(browser, page: Path, runs: int, click) -> dict:
    loads, clicks = [], []
    for _ in range(runs):
        context = browser.new_context(viewport={"width": 1280, "height": 820}, offline=True)
        tab = context.new_page()
        errors = []
        tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        tab.goto(page.resolve().as_uri())
        tab.wait_for_function("window.dinov3geo && window.dinov3geo.ready", timeout=120_000)
        loads.append(tab.evaluate("window.dinov3geo.loadedMs") / 1000)
        if click is not None:
            clicks.append(tab.evaluate("""([x, y]) => { const t0 = performance.now();
                window.dinov3geo.similarity.select(x, y); return performance.now() - t0; }""", list(click)) / 1000)
        assert not errors, errors
        context.close()
    out = {"load_s": round(statistics.median(loads), 2), "load_runs_s": [round(t, 2) for t in loads]}
    if clicks:
        out.update(click_s=round(statistics.median(clicks), 3), click_runs_s=[round(t, 3) for t in clicks])
    return out


def screenshot(browser, scene: Path, results: Path, path: Path) -> None:
    """The README's picture: the NAIP sample's page with its first result turned off, a click on a
    field and the similarity threshold at 0.8, as a 128-colour PNG."""
    from PIL import Image

    page = dinov3_geo.explore(scene, *(results / n for n in ("units.tif", "canopy.tif", "units.gpkg", "similar.tif",
                                                              "change.tif", "feats.zarr")),
                              bands=[1, 2, 3], output=results / "screenshot.html", overwrite=True)
    tab = browser.new_page(viewport={"width": 1040, "height": 660})
    tab.goto(page.output.resolve().as_uri())
    tab.wait_for_function("window.dinov3geo.ready")
    tab.hover(".leaflet-control-layers")
    tab.locator(".leaflet-control-layers-overlays label", has_text="units.tif").locator("input").uncheck()
    tab.mouse.move(500, 300)
    at = tab.evaluate("window.dinov3geo.toPage(488030, 5207470)")
    tab.mouse.click(at["x"], at["y"])
    tab.locator(".dg-threshold input").fill("0.8")
    tab.mouse.move(at["x"] + 120, at["y"] + 60)
    tab.wait_for_timeout(300)
    raw = path.with_suffix(".raw.png")
    tab.screenshot(path=str(raw))
    tab.close()
    Image.open(raw).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT,
                                            dither=Image.Dither.NONE).save(path, optimize=True)
    raw.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder for the scenes, outputs and pages")
    parser.add_argument("--size", type=int, default=10_000, help="side of the large scene in px (10000)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--outputs", action=argparse.BooleanOptionalAction, default=True,
                        help="make the README's outputs on the large scene (slow on a CPU)")
    parser.add_argument("--reuse", action="store_true", help="keep the outputs an earlier run made in --work")
    parser.add_argument("--chromium", default=os.environ.get("DINOV3GEO_CHROMIUM") or shutil.which("chromium"))
    parser.add_argument("--screenshot", type=Path, help="save a screenshot of the sample's page here (PNG)")
    args = parser.parse_args()
    keep_freed_memory()     # as the dinov3geo command does; library runs leave the allocator alone
    warnings.simplefilter("ignore")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    results = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=ARGS)
        cases = [("naip_sample", NAIP, NAIP_2019, True, 256, 32)]
        cases += [(name.split(".")[0], SAMPLES / name, None, False, 256, 32) for name in OTHER_SAMPLES]
        big = tiled_vrt(NAIP, args.size, args.size, work / f"naip_tiled_{args.size}.vrt")
        big_before = tiled_vrt(NAIP_2019, args.size, args.size, work / f"naip2019_tiled_{args.size}.vrt")
        cases.append((f"naip_tiled_{args.size}", big, big_before, args.outputs, 512, 64))
        for name, scene, before, with_outputs, tile, overlap in cases:
            folder = work / name
            folder.mkdir(exist_ok=True)
            outputs = make_outputs(scene, before, folder, tile, overlap, args.reuse) if with_outputs else []
            with rasterio.open(scene) as ds:
                click = ds.xy(ds.height // 2, ds.width // 2) if with_outputs else None
                size = [ds.width, ds.height]
            row, _ = build(scene, outputs, folder / "explore.html", args.runs, bands=[1, 2, 3] if
                           "naip" in name else None)
            row.update(open_in_browser(browser, folder / "explore.html", args.runs, click))
            if args.screenshot is not None and name == "naip_sample":
                screenshot(browser, scene, folder, args.screenshot)
            row = {"case": name, "scene_px": size, "outputs": [o.name for o in outputs], **row}
            print(json.dumps(row), flush=True)
            results.append(row)
        browser.close()
    print(json.dumps({"machine": os.uname().nodename, "cpus": os.cpu_count(),
                      "load_average": [round(v, 2) for v in os.getloadavg()], "runs": args.runs, "cases": results}))


if __name__ == "__main__":
    main()
