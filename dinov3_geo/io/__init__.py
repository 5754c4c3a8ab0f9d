"""Reading scenes, cutting chips, stitching and writing results."""
