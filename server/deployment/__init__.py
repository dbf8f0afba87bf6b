"""The coordinator on Flower's deployment engine: the federation file, site enrolment, the SuperLink
and the long-lived ServerApp worker.
"""
