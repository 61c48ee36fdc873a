"""Data: datasets, the host input pipeline, pre-cropped stores, device prefetch."""
