"""Inference: a finished checkpoint's anomaly maps, and everything built on them.

Evaluation, prediction, the :class:`~.detector.Detector`, tiling, prediction files and export all
take their maps from one place, :mod:`.maps`.
"""
