"""Make the GEO-Bench reference files of ``tests/test_train_geobench.py`` with GEO-Bench's own loader.

Run once, in a separate environment that has ServiceNow's ``geobench`` package (not a dependency
of dinov3-geo):

    python -m venv /work/venv-geobench && /work/venv-geobench/bin/pip install geobench
    /work/venv-geobench/bin/python tests/reference/make_geobench_reference.py

It writes ``tests/reference/geobench_reference.npz``: for the real samples in ``data_samples/``
(brick kiln ``examples_0_9``, Chesapeake ``id_000051``), the RGB bands as ``Sample.pack_to_3d``
returns them, normalised with the band statistics as GEO-Bench's ``GeobenchDataset.rgb_stats`` /
``normalization_stats`` give them, ``(x - mean) / std``, and the labels. Chesapeake's 256 x 256
chip is stored at every 4th pixel, with each band's sum, minimum and maximum over the whole chip.

It also writes ``tests/reference/geobench_multilabel_sample.hdf5`` with geo-bench's own
``write_sample_hdf5``: the brick-kiln sample's RGB bands RELABELLED with a made-up 43-entry
multi-label vector (BigEarthNet's size; there is no BigEarthNet sample in geo-bench's public test
data), to check that our reader takes m-bigearthnet's label format as geo-bench writes it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import geobench
import geobench.dataset as gd
import geobench.label as gl
import geobench.task as gt

# The samples were written by geo-bench 0.x, whose pickles name the modules ccb.io.*.
for name, module in {"ccb": geobench, "ccb.io": geobench, "ccb.io.dataset": gd, "ccb.io.label": gl,
                     "ccb.io.task": gt}.items():
    sys.modules[name] = module

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RGB = ["red", "green", "blue"]
#: The made-up multi-label vector of the relabelled sample (which of the 43 labels are on).
MULTILABEL_ON = (2, 11, 20, 41)


def normalised_rgb(sample_path: Path) -> tuple[np.ndarray, object]:
    """(RGB [3,H,W] float32 normalised as GEO-Bench's loader and statistics do, the label)."""
    sample = gd.load_sample_hdf5(sample_path)
    data, names = sample.pack_to_3d(band_names=RGB)
    stats = gd._load_band_stats(sample_path.parent)
    mean = np.array([stats[n].mean for n in names])
    std = np.array([stats[n].std for n in names])
    x = ((data - mean) / std).transpose(2, 0, 1).astype(np.float32)
    label = sample.label.data if isinstance(sample.label, gd.Band) else sample.label
    return x, label


def main() -> None:
    kiln, kiln_label = normalised_rgb(ROOT / "data_samples/geobench_brick_kiln/examples_0_9.hdf5")
    ches, ches_label = normalised_rgb(ROOT / "data_samples/geobench_chesapeake/id_000051.hdf5")
    multilabel = np.zeros(43, np.int64)
    multilabel[list(MULTILABEL_ON)] = 1
    np.savez_compressed(
        HERE / "geobench_reference.npz",
        brick_kiln_image=kiln, brick_kiln_label=np.int64(kiln_label),
        chesapeake_image_every4=ches[:, ::4, ::4], chesapeake_band_sum=ches.astype(np.float64).sum((1, 2)),
        chesapeake_band_min=ches.min((1, 2)), chesapeake_band_max=ches.max((1, 2)),
        chesapeake_label=np.asarray(ches_label, np.uint8), multilabel=multilabel,
        geobench_version=np.array(getattr(geobench, "__version__", "1.0.0")))
    source = gd.load_sample_hdf5(ROOT / "data_samples/geobench_brick_kiln/examples_0_9.hdf5")
    rgb = [b for b in source.bands if b.band_info.name in ("04 - Red", "03 - Green", "02 - Blue")]
    relabelled = gd.Sample(rgb, label=multilabel, sample_name="geobench_multilabel_sample")
    gd.write_sample_hdf5(relabelled, str(HERE))
    print("wrote", HERE / "geobench_reference.npz", HERE / "geobench_multilabel_sample.hdf5")


if __name__ == "__main__":
    main()
