"""What is on disk and in a slot: the KVTC codec (docs/kvtc-layout.md), its bit
packing and quantizer, the calibration file formats (ours and the shipped
pickle), fitting a codec from statistics, and reference attention on slots.

Import the modules themselves; this package imports nothing.
"""
