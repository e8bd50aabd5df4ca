"""``python -m workers.identity``: write password hashes and the password file."""

from __future__ import annotations

import argparse
import getpass
import os
import stat
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from .errors import IdentityConfigError
from .passwords import (
    ARGON2_LANES,
    ARGON2_MEMORY_KIB,
    ARGON2_TIME,
    ARGON2ID,
    PBKDF2_ITERATIONS,
    PBKDF2_SHA256,
    SCHEMES,
    SCRYPT,
    SCRYPT_N,
    SCRYPT_P,
    SCRYPT_R,
    hash_password,
    parse_password_lines,
)

__all__ = ["main"]


def _read_password(stdin: TextIO) -> bytes:
    """From the terminal (asked twice) or the first line of standard input."""
    if stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Repeat: ") != first:
            raise SystemExit("error: the passwords differ")
        password = first
    else:
        password = stdin.readline().removesuffix("\n").removesuffix("\r")
    if not password:
        raise SystemExit("error: empty password")
    return password.encode("utf-8")


def _check_user(user: str) -> None:
    if not user or user != user.strip() or any(c in user for c in ":\r\n") or user[0] == "#":
        raise SystemExit(
            f"error: user name {user!r}: not empty, no ':' or line breaks, no leading '#' or spaces"
        )


def _scheme(args: argparse.Namespace) -> str:
    """The scheme asked for: ``--scheme``, else the one whose options were given, else
    argon2id (the scrypt and PBKDF2 schemes remain for files that already use them)."""
    if args.scheme is not None:
        return str(args.scheme)
    if any(v is not None for v in (args.n, args.r, args.p)):
        return SCRYPT
    if args.iterations is not None:
        return PBKDF2_SHA256
    return ARGON2ID


def _hash_from_args(args: argparse.Namespace, password: bytes) -> str:
    def given(value: int | None, default: int) -> int:
        return default if value is None else value

    try:
        return hash_password(
            password,
            _scheme(args),
            memory_kib=given(args.memory_kib, ARGON2_MEMORY_KIB),
            time_cost=given(args.time_cost, ARGON2_TIME),
            lanes=given(args.lanes, ARGON2_LANES),
            n=given(args.n, SCRYPT_N),
            r=given(args.r, SCRYPT_R),
            p=given(args.p, SCRYPT_P),
            iterations=given(args.iterations, PBKDF2_ITERATIONS),
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def _add_user(path: Path, user: str, hashed: str, out: TextIO) -> None:
    try:
        text = path.read_text("utf-8") if path.exists() else ""
        mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o600
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"error: cannot read {path}: {exc}") from None
    lines = text.splitlines()
    try:
        parse_password_lines(lines, str(path))
    except IdentityConfigError as exc:
        raise SystemExit(f"error: {exc} (fix the file first)") from None
    new_line = f"{user}:{hashed}"
    replaced = False
    for i, line in enumerate(lines):
        if line.partition(":")[0] == user and not line.lstrip().startswith("#"):
            lines[i] = new_line
            replaced = True
    if not replaced:
        lines.append(new_line)
    data = "".join(f"{line}\n" for line in lines)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    print(f"{'replaced' if replaced else 'added'} user {user!r} in {path}", file=out)


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """``python -m workers.identity hash-password [USER]`` or ``add-user FILE USER``.

    The password is read from the terminal (twice) or, when standard input is not a
    terminal, from its first line.
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    parser = argparse.ArgumentParser(
        prog="python -m workers.identity",
        description="Manage the user identity password file of pacs-receiver.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    hash_cmd = sub.add_parser(
        "hash-password", help="print 'USER:hash' (or the hash alone) for a password"
    )
    hash_cmd.add_argument("user", nargs="?", help="user name to prefix the line with")
    add_cmd = sub.add_parser("add-user", help="add a user to FILE, or change their password")
    add_cmd.add_argument("file", type=Path)
    add_cmd.add_argument("user")
    for cmd in (hash_cmd, add_cmd):
        cmd.add_argument(
            "--scheme",
            choices=SCHEMES,
            default=None,
            help="argon2id (default), or scrypt / pbkdf2-sha256 (implied by their options)",
        )
        cmd.add_argument(
            "--argon2-memory",
            dest="memory_kib",
            type=int,
            help=f"argon2id memory, KiB ({ARGON2_MEMORY_KIB})",
        )
        cmd.add_argument(
            "--argon2-time", dest="time_cost", type=int, help=f"argon2id passes ({ARGON2_TIME})"
        )
        cmd.add_argument(
            "--argon2-lanes", dest="lanes", type=int, help=f"argon2id lanes ({ARGON2_LANES})"
        )
        cmd.add_argument("--scrypt-n", dest="n", type=int, help=f"scrypt N ({SCRYPT_N})")
        cmd.add_argument("--scrypt-r", dest="r", type=int, help=f"scrypt r ({SCRYPT_R})")
        cmd.add_argument("--scrypt-p", dest="p", type=int, help=f"scrypt p ({SCRYPT_P})")
        cmd.add_argument("--iterations", type=int, help=f"PBKDF2 iterations ({PBKDF2_ITERATIONS})")
    args = parser.parse_args(argv)
    try:
        if args.user is not None:
            _check_user(args.user)
        hashed = _hash_from_args(args, _read_password(stdin))
        if args.command == "hash-password":
            print(hashed if args.user is None else f"{args.user}:{hashed}", file=stdout)
        else:
            _add_user(args.file, args.user, hashed, stderr)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
