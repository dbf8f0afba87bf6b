"""The model registry: which network a task trains (Opacus-compatible: GroupNorm, no BatchNorm), and
the device it runs on.
"""
