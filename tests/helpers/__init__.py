"""Builders shared by several test modules: hand-made problems, graphs, clusters and fake measurers.

Test modules import these (never each other); pytest fixtures built on them live in
``tests/conftest.py``.
"""
