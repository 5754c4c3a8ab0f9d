"""Training and evaluating light heads on frozen DINOv3 features (GEO-Bench protocol).

    training input (chips folder, raster pairs, GeoPackage, GEO-Bench, torchgeo) -> ChipDataset
    -> frozen features (cached on disk) -> probe / linear / DPT head -> one head file
"""
