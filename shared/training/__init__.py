"""Local training at a site (plain or DP-SGD with Opacus), prediction, scoring on a split, and the
privacy accounting of a DP-SGD history.
"""
