"""Registers the message filter ``example-filter`` with mailguard (a twisted.plugin plugin module).

Installed into ``mailguard/plugins/``; this distribution ships no
``mailguard/__init__.py`` and no ``mailguard/plugins/__init__.py``.
"""

from mailguard_example_filter import ExampleFilterFactory

example_filter = ExampleFilterFactory()
