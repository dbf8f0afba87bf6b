"""A site on Flower's deployment engine: its SuperNode process and the long-lived ClientApp worker that
serves every message with the site's installed code.
"""
