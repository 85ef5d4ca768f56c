"""The offline demo dataset: folk tunes from music21 rendered as synthetic performances."""
