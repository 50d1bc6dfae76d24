"""mailguard: an inspecting SMTP/ESMTP gateway on Twisted."""

#: The version of this source tree (setup.py's ``version``).
__version__ = "0.1.0"
