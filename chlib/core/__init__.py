"""Plumbing, the lowest layer: errors, atomic io, device choice, typed config, manifests."""
