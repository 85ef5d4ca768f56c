"""Faces: figures, notebook widgets, the papermill runner."""
