"""Packaging for mailguard-example-filter, an example mailguard message-filter plugin."""

from setuptools import setup

setup(
    name="mailguard-example-filter",
    version="0.1.0",
    description="Example mailguard message-filter plugin: 'example-filter', subject and recipient rules",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # mailguard.plugins is listed without an __init__.py here: only the
    # plugin module is installed, into mailguard's plugin directory.
    packages=["mailguard_example_filter", "mailguard.plugins"],
    install_requires=["mailguard"],
)
