"""A site: the ClientApp that trains on the site's data without sending it anywhere, its privacy guards
and ledgers, its audit, and the site's process on the deployment engine.
"""
