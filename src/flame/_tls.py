"""Opt-in TLS for the runner connections (``Pool(tls=True)``).

The parent makes one ephemeral self-signed certificate per process (an ECDSA P-256 key
that never touches disk, made with the ``cryptography`` package) and hands each runner the
certificate's SHA-256 fingerprint inside ``FLAME_PARENT``. The runner skips the usual CA
and host name checks (there is no CA and the parent's address may be any IP) and instead
accepts only a peer whose certificate has exactly that fingerprint. The HMAC handshake of
:mod:`flame._wire` still runs inside the encrypted channel, so a runner must prove the
secret as before; TLS adds confidentiality and integrity of everything after it.

Both ends do the TLS handshake without blocking their event loop
(:func:`handshake`); afterwards :class:`flame._wire.Connection` works on the
``ssl.SSLSocket`` like on a plain one, with a lock around each non-blocking TLS read or
write, since an OpenSSL connection object must not be used by two threads at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket
import ssl
import threading

_INSTALL_HINT = (
    "tls=True needs the cryptography package, which is not installed: pip install 'flame-py[tls]'"
)

_lock = threading.Lock()
_server: tuple[ssl.SSLContext, str] | None = None


class TLSError(Exception):
    """The TLS layer failed (handshake, or a certificate that does not match the pin)."""


def require() -> None:
    """Raise ``ImportError`` naming the extra to install if TLS cannot work here."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise ImportError(_INSTALL_HINT) from None


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def server_context() -> tuple[ssl.SSLContext, str]:
    """The parent's server context and its certificate's fingerprint (made once)."""
    global _server
    with _lock:
        if _server is None:
            _server = _make_server_context()
        return _server


def _make_server_context() -> tuple[ssl.SSLContext, str]:
    import datetime  # here, not at import: a pool without TLS never needs them
    import tempfile

    require()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flame parent")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    pem_cert = cert.public_bytes(serialization.Encoding.PEM)
    pem_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # ssl loads a certificate chain from files only: a private temporary directory, removed
    # at once (the key lives on in memory only)
    with tempfile.TemporaryDirectory(prefix="flame-tls-") as tmp:
        cert_path = os.path.join(tmp, "cert.pem")
        key_path = os.path.join(tmp, "key.pem")
        for path, data in ((cert_path, pem_cert), (key_path, pem_key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert_path, key_path)
    return ctx, fingerprint(der)


def client_context() -> ssl.SSLContext:
    """The runner's context: no CA, no host name; the fingerprint is checked after."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def handshake(
    sock: socket.socket,
    ctx: ssl.SSLContext,
    *,
    server_side: bool,
    timeout: float,
    pin: str | None = None,
) -> ssl.SSLSocket:
    """Wrap a connected non-blocking socket and run the TLS handshake on the running loop.

    ``pin``: the client's expected certificate fingerprint; a mismatch raises
    :class:`TLSError`. On any failure the socket is closed."""
    loop = asyncio.get_running_loop()
    try:
        tls = ctx.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False)
    except (OSError, ValueError) as exc:
        sock.close()
        raise TLSError(f"TLS set-up failed: {exc}") from None
    fd = tls.fileno()
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await _ready(loop, fd, write=False)
                except ssl.SSLWantWriteError:
                    await _ready(loop, fd, write=True)
        if pin is not None:
            der = tls.getpeercert(binary_form=True)
            if der is None or not hmac.compare_digest(fingerprint(der), pin):
                raise TLSError(
                    "the parent's TLS certificate does not match the fingerprint this runner "
                    "was given: not connecting"
                )
    except TimeoutError:
        tls.close()
        raise TLSError(f"TLS handshake did not finish within {timeout:g}s") from None
    except (ssl.SSLError, OSError) as exc:
        tls.close()
        raise TLSError(f"TLS handshake failed: {exc}") from None
    except BaseException:
        tls.close()
        raise
    return tls


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, *, write: bool) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def done() -> None:
        if not fut.done():
            fut.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, done)
    try:
        await fut
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)
