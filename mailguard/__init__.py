"""mailguard: an inspecting SMTP/ESMTP gateway on Twisted."""
