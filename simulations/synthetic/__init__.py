"""Data to run on without a hospital: synthetic consortia with real DICOM files, and the real UCI
vertebral column data split into sites.
"""
