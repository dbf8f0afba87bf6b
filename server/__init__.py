"""Coordinator side: the ServerApp, its strategy and the results it writes."""
