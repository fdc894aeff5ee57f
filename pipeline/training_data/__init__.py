"""The training-data job: labeled vectors + GeoTIFF scenes -> COCO tiles (`prepare`), with the label reading
(`labels`), the COCO records (`coco`) and the spatial train/validation split (`split`)."""
