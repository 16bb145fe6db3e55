"""Signing credentials for C2PA manifests: the user's certificate chain and key, or a
local development CA made on first use.

  SORA_JAX_C2PA_CERT=chain.pem SORA_JAX_C2PA_KEY=key.pem sora-jax sample ...   # your identity
  sora-jax sample ...          # a local, untrusted identity in ~/.config/sora_jax/c2pa/

Certificates are checked before anything is generated (`check_certificate`): an EC or
RSA end-entity certificate, within its validity, with the digitalSignature key usage and
an extended key usage C2PA validators accept, whose key matches the private key.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Extended key usages the C2PA specification allows for claim signing.
ALLOWED_EKUS = {
    ExtendedKeyUsageOID.EMAIL_PROTECTION.dotted_string: "emailProtection",
    "1.3.6.1.5.5.7.3.36": "documentSigning",
    ExtendedKeyUsageOID.TIME_STAMPING.dotted_string: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING.dotted_string: "OCSPSigning",
    "1.3.6.1.4.1.62558.2.1": "c2pa-kp-claimSigning",
}
LOCAL_SUBJECT = "sora_jax local signer (untrusted)"


class CredentialError(ValueError):
  """Signing credentials C2PA cannot use (names the problem)."""


@dataclasses.dataclass(frozen=True)
class Credentials:
  """A PEM certificate chain (end-entity first), its PEM private key, the signing
  algorithm, and whether it is the local development identity."""
  chain_pem: bytes
  key_pem: bytes
  alg: str
  local: bool

  @property
  def subject(self) -> str:
    cert = x509.load_pem_x509_certificates(self.chain_pem)[0]
    return cert.subject.rfc4514_string()


def config_dir() -> str:
  """`$XDG_CONFIG_HOME/sora_jax/c2pa` (default `~/.config/sora_jax/c2pa`)."""
  base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
  return os.path.join(base, "sora_jax", "c2pa")


def check_certificate(chain_pem: bytes, key_pem: bytes) -> str:
  """Checks credentials as C2PA validators will; returns the signing algorithm
  (`es256`, `es384`, `ps256`) or raises `CredentialError` naming what is wrong."""
  try:
    chain = x509.load_pem_x509_certificates(chain_pem)
  except ValueError as e:
    raise CredentialError(f"the certificate chain is not PEM certificates ({e}).") from None
  try:
    key = serialization.load_pem_private_key(key_pem, password=None)
  except (ValueError, TypeError) as e:
    raise CredentialError(f"the private key is not an unencrypted PEM key ({e}).") from None
  cert = chain[0]
  now = datetime.datetime.now(datetime.timezone.utc)
  if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
    raise CredentialError(f"certificate {cert.subject.rfc4514_string()} is not valid now "
                          f"({cert.not_valid_before_utc} to {cert.not_valid_after_utc}).")
  ext = cert.extensions
  try:
    if ext.get_extension_for_class(x509.BasicConstraints).value.ca:
      raise CredentialError("the signing certificate is a CA certificate; C2PA signs with an "
                            "end-entity certificate.")
  except x509.ExtensionNotFound:
    pass
  try:
    usage = ext.get_extension_for_class(x509.KeyUsage).value
  except x509.ExtensionNotFound:
    raise CredentialError("the signing certificate has no key usage extension; C2PA needs "
                          "digitalSignature.") from None
  if not usage.digital_signature:
    raise CredentialError("the signing certificate's key usage lacks digitalSignature, which "
                          "C2PA requires.")
  try:
    ekus = {o.dotted_string for o in ext.get_extension_for_class(x509.ExtendedKeyUsage).value}
  except x509.ExtensionNotFound:
    raise CredentialError("the signing certificate has no extended key usage; C2PA needs one "
                          f"of {sorted(ALLOWED_EKUS.values())}.") from None
  if not ekus & set(ALLOWED_EKUS):
    raise CredentialError(f"the signing certificate's extended key usages {sorted(ekus)} include "
                          f"none C2PA accepts ({sorted(ALLOWED_EKUS.values())}).")
  public = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
  if public != cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo):
    raise CredentialError("the private key does not match the signing certificate.")
  if isinstance(key, ec.EllipticCurvePrivateKey):
    return {"secp256r1": "es256", "secp384r1": "es384"}.get(key.curve.name) or _bad(key.curve.name)
  if isinstance(key, rsa.RSAPrivateKey):
    return "ps256"
  raise CredentialError(f"unsupported key type {type(key).__name__}; use EC P-256 or RSA.")


def _bad(curve: str) -> str:
  raise CredentialError(f"unsupported EC curve {curve}; use P-256 or P-384.")


def load_credentials(cert_path: str, key_path: str) -> Credentials:
  """The user's credentials from PEM files, checked (`check_certificate`)."""
  for path in (cert_path, key_path):
    if not os.path.isfile(path):
      raise CredentialError(f"{path!r} does not exist.")
  with open(cert_path, "rb") as f:
    chain = f.read()
  with open(key_path, "rb") as f:
    key = f.read()
  return Credentials(chain, key, check_certificate(chain, key), local=False)


def _name(common_name: str) -> x509.Name:
  return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sora_jax local")])


def make_dev_credentials(directory: str) -> None:
  """Writes a development CA (`ca.pem`) and a signing certificate it issued
  (`signer.pem`: the chain, `signer.key`) to `directory`, owner-only (0700 / 0600)."""
  os.makedirs(directory, mode=0o700, exist_ok=True)
  os.chmod(directory, 0o700)
  now = datetime.datetime.now(datetime.timezone.utc)
  ca_key = ec.generate_private_key(ec.SECP256R1())
  ca = (x509.CertificateBuilder().subject_name(_name("sora_jax local development CA"))
        .issuer_name(_name("sora_jax local development CA")).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256()))
  key = ec.generate_private_key(ec.SECP256R1())
  cert = (x509.CertificateBuilder().subject_name(_name(LOCAL_SUBJECT)).issuer_name(ca.subject)
          .public_key(key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=825))
          .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                       False), critical=True)
          .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]),
                         critical=False)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                         critical=False)
          .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
  pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
  files = {"ca.pem": pem(ca), "signer.pem": pem(cert) + pem(ca),
           "signer.key": key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())}
  for name, data in files.items():
    path = os.path.join(directory, name)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(path + ".tmp", path)


def local_ca_pem(directory: str | None = None) -> str:
  """The local development CA's certificate (PEM), the trust anchor of what the local
  identity signs (made on first use, with `dev_credentials`)."""
  directory = directory or config_dir()
  dev_credentials(directory)
  with open(os.path.join(directory, "ca.pem"), encoding="utf-8") as f:
    return f.read()


def dev_credentials(directory: str | None = None) -> Credentials:
  """The local development identity, made on first use (`make_dev_credentials`)."""
  directory = directory or config_dir()
  if not os.path.isfile(os.path.join(directory, "signer.key")):
    make_dev_credentials(directory)
  creds = load_credentials(os.path.join(directory, "signer.pem"),
                           os.path.join(directory, "signer.key"))
  return dataclasses.replace(creds, local=True)


def default_credentials() -> Credentials:
  """`SORA_JAX_C2PA_CERT` / `SORA_JAX_C2PA_KEY` when set (both), else the local identity."""
  cert, key = os.environ.get("SORA_JAX_C2PA_CERT"), os.environ.get("SORA_JAX_C2PA_KEY")
  if cert or key:
    if not (cert and key):
      raise CredentialError("set both SORA_JAX_C2PA_CERT and SORA_JAX_C2PA_KEY.")
    return load_credentials(cert, key)
  return dev_credentials()
