"""Self-contained HTML pages (audit, model card): jinja2 templates with autoescape, plots embedded as
data URIs, no scripts.
"""
