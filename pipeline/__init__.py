"""Geography for aerial instance segmentation: windows, rasters, labels, Ray inference, seam merge, GeoPackage."""
