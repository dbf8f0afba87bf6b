"""The site data contract: what a site folder must hold for a task (clinical table, manifest, DICOM
files), the tasks themselves, and the validator that checks a folder before any training.
"""
