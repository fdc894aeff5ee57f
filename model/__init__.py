"""Mask R-CNN with a Swin-Transformer (T/S/B) or ResNet-50 FPN backbone.

This package knows nothing about GeoTIFFs: images in, instances out.
"""
