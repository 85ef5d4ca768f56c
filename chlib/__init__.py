"""chlib: a notebook-driven research kit for cover song identification.

A from-scratch re-implementation of CoverHunter (Liu Feng et al., 2023) and its fork
CoverHunterMPS. The numbered notebooks in ``notebooks/`` are the front door; every cell calls
into the modules of this package. See ``docs/DESIGN.md`` for the layout and data on disk.
"""

__version__ = "0.1.0"
