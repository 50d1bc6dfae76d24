"""Packaging for mailguard, an inspecting SMTP/ESMTP gateway on Twisted."""

from setuptools import Extension, setup

setup(
    name="mailguard",
    version="0.1.0",
    description="Inspecting SMTP/ESMTP gateway (CBAC / PIX MailGuard style) on Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # twisted.plugins is listed explicitly and has no __init__.py, so that
    # installing mailguard drops its plugin into Twisted's plugin namespace.
    # mailguard.plugins holds the built-in inspector protocols (as plugins);
    # only its .py modules are shipped, never a dropin.cache.
    packages=["mailguard", "mailguard.plugins", "twisted.plugins"],
    package_data={"twisted": ["plugins/mailguard_plugin.py"], "mailguard": ["static/*"]},
    # What mailguard imports, plus what twisted.internet.ssl needs for the
    # TLS legs (pyOpenSSL, service_identity: Twisted's "tls" extra).
    install_requires=[
        "Twisted>=24.7",
        "zope.interface>=6",
        "cryptography>=42",
        "pyOpenSSL>=24",
        "service_identity>=24",
        "prometheus_client>=0.17",
        "google-re2>=1.1",
    ],
    extras_require={
        "test": ["aiosmtpd>=1.4", "hypothesis>=6", "trustme>=1.1", "dkimpy>=1.0"],
    },
    # Optional accelerator of the DATA fast path; without a compiler the
    # pure-Python path (same output) is used.
    ext_modules=[Extension("mailguard._scan", ["mailguard/_scan.c"], optional=True)],
    entry_points={"console_scripts": ["mailguard = mailguard.cli:main"]},
)
