"""Quantization methods, one file each; the METHODS registry imports every module here."""
