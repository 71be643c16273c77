"""Reliability tests by subject (a package, so that its conftest.py and modules never shadow tests/conftest.py)."""
