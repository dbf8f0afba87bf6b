"""Scoring a site's own patients with a finished run's model (`spine-fl predict`), with explanations.

Runs at the site, on the site's folder, offline: nothing is sent anywhere. `predict.py` loads the
model and the folder and writes the predictions; shared/models/explain.py computes the attributions (Captum);
`plots.py` draws them.
"""
