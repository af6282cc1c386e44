"""
Who lives here: local domains, mailboxes, aliases and postmaster.

Pure lookups over the configuration, shared by the inbound recipient check
(is this address ours, and does it exist?) and by local delivery (which
Maildir?).
"""

from __future__ import annotations

import unicodedata

import attrs

from twisted_mta.address import AddressError, a_label
from twisted_mta.config import LocalSettings

MAX_ALIAS_DEPTH = 10


class UnknownRecipient(Exception):
    """
    The address is in a local domain but no mailbox or alias has that name.
    """


class AliasLoop(Exception):
    """
    Alias expansion did not end within L{MAX_ALIAS_DEPTH} steps.
    """


@attrs.frozen
class LocalDirectory:
    settings: LocalSettings

    @property
    def _users(self) -> dict[str, str]:
        return {_key(u): u for u in self.settings.users}

    def is_local_domain(self, domain: str) -> bool:
        """
        Whether C{domain} is ours; a UTF-8 (U-label) domain is compared in
        its A-label form, the form the configuration lists.
        """
        if domain.lower() in self.settings.domains:
            return True
        if domain.isascii():
            return False
        try:
            return a_label(domain) in self.settings.domains
        except AddressError:
            return False

    @property
    def primary_domain(self) -> str:
        return self.settings.domains[0] if self.settings.domains else "localhost"

    def _qualify(self, target: str, domain: str) -> str:
        return target if "@" in target else f"{target}@{domain}"

    def expand(self, address: str) -> tuple[str, ...]:
        """
        Resolve an address in a local domain to final addresses: local
        mailboxes (C{user@domain}) and, for forwarding aliases, remote ones.
        Raise L{UnknownRecipient} when nothing matches.
        """
        result: list[str] = []
        self._expand(address, result, 0)
        return tuple(dict.fromkeys(result))

    def _expand(self, address: str, out: list[str], depth: int) -> None:
        if depth > MAX_ALIAS_DEPTH:
            raise AliasLoop(address)
        local, _, domain = address.rpartition("@")
        if not local:
            local, domain = address, self.primary_domain
        domain = domain.lower()
        if not self.is_local_domain(domain):
            out.append(f"{local}@{domain}")
            return
        key = _key(local)
        aliases = self.settings.aliases
        if (key == "postmaster" and key not in self._users and key not in aliases
                and f"{key}@{domain}" not in aliases):
            # Configuration check guarantees the target is a user or alias.
            self._expand(self._qualify(self.settings.postmaster, domain), out, depth + 1)
            return
        targets = aliases.get(f"{key}@{domain}") or aliases.get(key)
        if targets:
            for target in targets:
                self._expand(self._qualify(target, domain), out, depth + 1)
            return
        user = self._users.get(key)
        if user is None:
            raise UnknownRecipient(address)
        out.append(f"{user}@{domain}")

    def mailbox_of(self, address: str) -> tuple[str, str]:
        """
        The user (as configured) and the lower-cased domain of a final
        local address from L{expand}; L{UnknownRecipient} if it is none.
        """
        local, _, domain = address.rpartition("@")
        user = self._users.get(_key(local))
        if user is None or not self.is_local_domain(domain):
            raise UnknownRecipient(address)
        return user, domain.lower()

    def maildir_for(self, address: str) -> str:
        """
        The Maildir path of a final local address from L{expand}: the
        user's name as configured (UTF-8 allowed, never "/" nor a leading
        "."), the domain as an A-label: one safe directory name each.
        """
        user, domain = self.mailbox_of(address)
        return self.settings.mailbox.format(user=user, domain=a_label(domain))


def _key(local: str) -> str:
    """
    A local part as the users and aliases tables are keyed: lower case and,
    for UTF-8 (RFC 6531), Unicode NFC, so a name typed decomposed finds
    its mailbox.
    """
    key = local.lower()
    return key if key.isascii() else unicodedata.normalize("NFC", key)
