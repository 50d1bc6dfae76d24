"""twistd plugin: ``twistd -n mailguard -c policy.ini`` runs the gateway."""

from twisted.application.service import ServiceMaker

mailguard = ServiceMaker(
    "mailguard", "mailguard.tap", "Inspecting SMTP/ESMTP gateway (CBAC / PIX MailGuard style)", "mailguard"
)
