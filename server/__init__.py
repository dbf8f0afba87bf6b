"""The coordinator: the ServerApp (strategy, SecAgg+ workflow, round loop, checkpoints), the deployment
engine's coordinator process, and the run's reports.
"""
