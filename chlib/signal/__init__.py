"""Signal layer: audio decoding, the two CQT flavours, tempo stretch, spectral augmentation."""
