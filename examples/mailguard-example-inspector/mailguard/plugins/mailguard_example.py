"""Registers protocol ``example`` with mailguard (a twisted.plugin plugin module).

This file is installed into the ``mailguard/plugins/`` directory; this
distribution ships no ``mailguard/__init__.py`` and no
``mailguard/plugins/__init__.py`` (mailguard's own package has those).
"""

from mailguard_example import ExampleInspectorFactory

example = ExampleInspectorFactory()
