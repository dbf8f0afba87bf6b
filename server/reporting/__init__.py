"""What a run leaves behind: the run result (one record, one writer of metrics.json for both engines),
plots and the model card.
"""
