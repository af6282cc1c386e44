"""
The users file: who may authenticate (SMTP AUTH) and with which password.

One user per line, C{name:hash}; blank lines and lines starting with C{#}
are ignored.  The hash is scrypt (the standard library's, RFC 7914) with a
random salt, in the form C{$scrypt$ln=15,r=8,p=1$SALT$HASH} (base64), so
the parameters can be raised later without breaking old entries.  Plain
text passwords are never stored or accepted in the file.

SECURITY: password checks cost tens of milliseconds on purpose; run
L{UserDatabase.check} off the reactor thread.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import unicodedata

import attrs

SCRYPT_LOG_N = 15
SCRYPT_R = 8
SCRYPT_P = 1
_HASH = re.compile(r"^\$scrypt\$ln=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$")
# A local part, or a whole address; UTF-8 (RFC 6531) allowed, but never
# ":" (the separator), spaces or control characters.
_NAME = re.compile(r"^[A-Za-z0-9._%+\u00a0-\U0010ffff-]+(@[A-Za-z0-9.\u00a0-\U0010ffff-]+)?$")


def canonical_name(name: str) -> str:
    """
    A user name (or an address to compare with one) as the users file is
    keyed: lower case and, for UTF-8, Unicode NFC.
    """
    key = name.lower()
    return key if key.isascii() else unicodedata.normalize("NFC", key)


class UsersFileError(Exception):
    """
    The users file cannot be used; C{str()} names the file and line.
    """


def hash_password(password: str, *, log_n: int = SCRYPT_LOG_N) -> str:
    salt = os.urandom(16)
    digest = _scrypt(password.encode("utf-8"), salt, log_n, SCRYPT_R, SCRYPT_P)
    return (f"$scrypt$ln={log_n},r={SCRYPT_R},p={SCRYPT_P}$"
            f"{base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}")


def _scrypt(password: bytes, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    n = 1 << log_n
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=2 * 128 * r * n + 2**20,
                          dklen=32)


def verify_password(password: str, encoded: str) -> bool:
    m = _HASH.match(encoded)
    if not m:
        return False
    log_n, r, p = int(m.group(1)), int(m.group(2)), int(m.group(3))
    salt, expected = base64.b64decode(m.group(4)), base64.b64decode(m.group(5))
    return hmac.compare_digest(_scrypt(password.encode("utf-8"), salt, log_n, r, p), expected)


# Checked when the user is unknown, so that the answer takes as long.
_DUMMY = "$scrypt$ln=15,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


@attrs.frozen
class UserDatabase:
    path: str
    users: dict[str, str]  # lower-cased name -> encoded hash

    @classmethod
    def load(cls, path: str) -> "UserDatabase":
        return cls(path=path, users=read_users_file(path))

    def check(self, name: str, password: str) -> str | None:
        """
        The user's canonical name if C{password} is right, else C{None}.
        Blocking (scrypt).
        """
        encoded = self.users.get(canonical_name(name))
        ok = verify_password(password, encoded or _DUMMY)
        return canonical_name(name) if ok and encoded is not None else None


def read_users_file(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise UsersFileError(f"{path}: no such file")
    except (OSError, UnicodeDecodeError) as e:
        raise UsersFileError(f"{path}: cannot read: {e}")
    users: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, encoded = line.partition(":")
        if not sep or not _NAME.match(name):
            raise UsersFileError(f"{path}:{number}: expected name:hash")
        if not _HASH.match(encoded):
            raise UsersFileError(f"{path}:{number}: the password of {name!r} is not an scrypt "
                                 "hash (write it with 'twisted-mta user add')")
        users[canonical_name(name)] = encoded
    return users


def write_user(path: str, name: str, password: str | None) -> None:
    """
    Add, replace (C{password} given) or remove (C{None}) a user, rewriting
    the file atomically with mode 0600.
    """
    if not _NAME.match(name):
        raise UsersFileError(f"{name!r} is not a valid user name")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = []
    key = canonical_name(name)
    kept = [line for line in lines if canonical_name(line.partition(":")[0].strip()) != key]
    if password is not None:
        kept.append(f"{key}:{hash_password(password)}")
    elif len(kept) == len(lines):
        raise UsersFileError(f"{path}: no user {name!r}")
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(kept) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
