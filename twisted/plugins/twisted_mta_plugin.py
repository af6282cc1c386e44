# Kept import-light: every twistd plugin scan imports this file.
from twisted.application.service import ServiceMaker

twisted_mta = ServiceMaker(
    "twisted-mta", "twisted_mta.tap", "A mail transfer agent (ESMTP, queue, Maildir)", "mta"
)
