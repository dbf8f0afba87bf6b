"""DICOM -> tensor: pydicom decoding, modality/VOI LUTs, pixel-spacing-aware cropping to the model
input.
"""
