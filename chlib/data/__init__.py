"""Data layer: extraction pipeline, splits, importers, dataset tools, training chunks, sampler."""
