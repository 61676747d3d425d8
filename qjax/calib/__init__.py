"""Calibration: text and token windows, statistics, and the blockwise sequential runner."""
