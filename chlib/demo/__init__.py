"""The offline demo dataset: folk tunes from music21 (``tunes``) rendered as synthetic
performances (``perform``: how versions differ, ``synth``) into a dataset (``generate``).
Units: pitches MIDI, note times in beats (quarter notes), tempi in bpm, audio times in seconds."""

from chlib.demo.generate import DEMO_PREP_CONFIG, make_demo_dataset
from chlib.demo.perform import (
           FORMS,
           INSTRUMENTS,
           DemoPerformanceParams,
           describe_performance,
           draw_performance_params,
           tune_form,
)
from chlib.demo.synth import render_performance
from chlib.demo.tunes import Note, Pass, Tune, default_tune_cache_dir, demo_tunes

__all__ = ["Note", "Pass", "Tune", "DemoPerformanceParams", "INSTRUMENTS", "FORMS", "demo_tunes",
           "default_tune_cache_dir", "draw_performance_params", "tune_form", "render_performance",
           "describe_performance", "make_demo_dataset", "DEMO_PREP_CONFIG"]
