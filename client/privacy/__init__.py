"""A site's privacy guards, as Flower client mods: site policy and budget, DP-SGD planning, the
persistent privacy ledger and the signed egress ledger.
"""
