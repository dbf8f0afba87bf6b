"""What both sides need: data contract, DICOM pipeline, tasks, models, metrics, config."""
