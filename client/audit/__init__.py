"""The site's privacy audit (`spine-fl audit`): one module per check, listed in checks.py; the verdict,
the report and the CLI beside them.
"""
