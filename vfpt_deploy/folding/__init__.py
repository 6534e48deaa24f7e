"""Folding trained VFPT models into deployable ones with no FFT left (docs/model.md, section 3)."""
