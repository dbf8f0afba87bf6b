"""Flower process control: starting and stopping SuperLink/SuperNode processes, TLS and SuperNode
credentials, the app bundle and its hash, short polling.
"""
