"""Ray's authentication token, kept private.

Ray 2.60 turns token authentication on for a new local runtime, and its GCS, raylets and workers listen
on all interfaces (not 127.0.0.1), so the token is all that stands between the other users of the machine
and running code as this user. Ray writes a token it generates with the process umask (0o644 under the
usual 0o022). :func:`create_token_privately` has it written under umask 0o077 before ``ray.init`` (the
umask is restored before any Ray process starts, so the trials' files keep the user's), and
:func:`make_token_private` leaves the token file the runtime uses (:func:`auth_token_path`) at mode 0o600
after any start or join. Token authentication is never turned off.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path


def auth_token_path() -> Path | None:
    """The file a Ray runtime started here takes its authentication token from: ``RAY_AUTH_TOKEN_PATH``
    if set, else ``~/.ray/auth_token`` (Ray 2.60's C++ ``AuthenticationTokenLoader``); None when the token
    is given in the ``RAY_AUTH_TOKEN`` variable itself, which comes first."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    custom = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(custom).expanduser() if custom else default_token_path()


def default_token_path() -> Path:
    """Where Ray 2.60 writes a token it generates (``generate_and_save_token``), whatever
    ``RAY_AUTH_TOKEN_PATH`` says."""
    return Path.home() / ".ray" / "auth_token"


def create_token_privately() -> None:
    """What ``ray.init`` does first for a new local runtime, done here under umask 0o077: turn token
    authentication on unless ``RAY_AUTH_MODE`` says otherwise, and generate ``~/.ray/auth_token`` if no
    token is found (Ray writes it with the process umask). The umask is restored before any Ray process
    starts, so the runtime's processes, and the files the trials write, keep the user's umask."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            enable_token_auth_by_default,
            ensure_token_if_auth_enabled,
        )
    except ImportError:  # another Ray: ray.init generates it, and make_token_private chmods it after
        return
    umask = os.umask(0o077)
    try:
        enable_token_auth_by_default()
        ensure_token_if_auth_enabled(None, create_token_if_missing=True)
    finally:
        os.umask(umask)


def make_token_private(created_folder: Path | None) -> None:
    """Leave the token files (:func:`auth_token_path` and Ray's default one) at mode 0o600 if they are
    this user's regular files, and ``created_folder`` (``~/.ray`` when this start created it) at 0o700."""
    for path in {p for p in (auth_token_path(), default_token_path()) if p is not None}:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue  # absent, a symlink, unreadable: not ours to change
        try:
            info = os.fstat(fd)
            if stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) != 0o600:
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
    if created_folder is not None and created_folder.is_dir() and not created_folder.is_symlink():
        os.chmod(created_folder, 0o700)
