//! The Ed25519 checkpoint key: generation, loading with permission checks, and public keys in
//! the forms `audit verify --key` accepts.
//!
//! On disk the private key is PKCS#8 v1 PEM (RFC 8410, `-----BEGIN PRIVATE KEY-----`), the
//! same format `openssl genpkey -algorithm ed25519` writes, so OpenSSL can read it:
//! `openssl pkey -in audit.key -pubout` prints the public key as PEM.
//! A public key is shown as its raw 32 bytes in standard base64.

use std::{
    fs::{DirBuilder, File, OpenOptions},
    io::{Read as _, Write as _},
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::Path,
};

use base64::Engine as _;
use ed25519_dalek::{
    SigningKey, VerifyingKey,
    pkcs8::{
        DecodePrivateKey as _, DecodePublicKey as _, EncodePrivateKey as _, KeypairBytes,
        spki::der::pem::LineEnding,
    },
};

use super::AuditError;

/// Largest key file read.
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

/// Generates a key and writes it to `path` with mode 0600, creating a missing parent
/// directory with mode 0700. Refuses to overwrite an existing file (`O_EXCL`). Returns the
/// public half.
pub fn generate_key_file(path: &Path) -> Result<VerifyingKey, AuditError> {
    let key_err = |source| AuditError::KeyWrite {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.exists()
    {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(key_err)?;
    }
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    // v1 (no embedded public key): the most widely understood form.
    let pem = KeypairBytes {
        secret_key: key.to_bytes(),
        public_key: None,
    }
    .to_pkcs8_pem(LineEnding::LF)
    .map_err(|e| AuditError::KeyFormat {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                AuditError::KeyExists {
                    path: path.to_owned(),
                }
            } else {
                key_err(source)
            }
        })?;
    let written = file
        .write_all(pem.as_bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| fsync_parent(path));
    if let Err(source) = written {
        drop(file);
        // A half-written key is worse than none; the O_EXCL create above makes it ours.
        let _ = std::fs::remove_file(path);
        return Err(key_err(source));
    }
    Ok(key.verifying_key())
}

/// Loads the signing key for the daemon. Refuses a missing file (naming `enforcer keygen`),
/// a file readable or writable by group or others, and a file owned by another user than
/// the one running the daemon.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, AuditError> {
    let (mut file, meta) = open_key(path)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(AuditError::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(AuditError::KeyOwner {
            path: path.to_owned(),
            owner: meta.uid(),
            euid,
        });
    }
    let text = read_key_text(path, &mut file)?;
    parse_private_key(path, &text)
}

/// The public half of the private key at `path`, with no permission checks (for `audit
/// verify`, which only needs to read it).
pub fn load_public_half(path: &Path) -> Result<VerifyingKey, AuditError> {
    let (mut file, _) = open_key(path)?;
    let text = read_key_text(path, &mut file)?;
    parse_private_key(path, &text).map(|k| k.verifying_key())
}

/// A public key given as standard base64 of the raw 32 bytes, a PEM `PUBLIC KEY`, or (for
/// convenience) a PEM `PRIVATE KEY`, whose public half is taken.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    let text = text.trim();
    if text.contains("-----BEGIN PUBLIC KEY-----") {
        return VerifyingKey::from_public_key_pem(text)
            .map_err(|e| format!("not an Ed25519 PEM public key: {e}"));
    }
    if text.contains("-----BEGIN PRIVATE KEY-----") {
        return SigningKey::from_pkcs8_pem(text)
            .map(|k| k.verifying_key())
            .map_err(|e| format!("not an Ed25519 PKCS#8 private key: {e}"));
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| format!("not base64 ({e}); give the base64 printed by `enforcer keygen`"))?;
    let raw: [u8; 32] = raw.try_into().map_err(|raw: Vec<u8>| {
        format!(
            "decodes to {} bytes, an Ed25519 public key is 32; give the base64 printed by \
             `enforcer keygen`",
            raw.len()
        )
    })?;
    VerifyingKey::from_bytes(&raw).map_err(|_| "not a valid Ed25519 public key".to_owned())
}

/// The public key as `enforcer keygen` prints it: standard base64 of the raw 32 bytes.
pub fn public_key_base64(key: &VerifyingKey) -> String {
    base64::engine::general_purpose::STANDARD.encode(key.as_bytes())
}

fn open_key(path: &Path) -> Result<(File, std::fs::Metadata), AuditError> {
    let file = File::open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            AuditError::KeyMissing {
                path: path.to_owned(),
            }
        } else {
            AuditError::KeyRead {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    // fstat the open file, so the checks apply to what is read.
    let meta = file.metadata().map_err(|source| AuditError::KeyRead {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() {
        return Err(AuditError::KeyFormat {
            path: path.to_owned(),
            message: "not a regular file".into(),
        });
    }
    Ok((file, meta))
}

fn read_key_text(path: &Path, file: &mut File) -> Result<String, AuditError> {
    let mut text = String::new();
    file.take(MAX_KEY_FILE_BYTES)
        .read_to_string(&mut text)
        .map_err(|source| AuditError::KeyRead {
            path: path.to_owned(),
            source,
        })?;
    Ok(text)
}

fn parse_private_key(path: &Path, text: &str) -> Result<SigningKey, AuditError> {
    SigningKey::from_pkcs8_pem(text).map_err(|e| AuditError::KeyFormat {
        path: path.to_owned(),
        message: format!("not an Ed25519 PKCS#8 PEM private key ({e})"),
    })
}

/// fsyncs the directory holding `path`, so a create or rename in it is durable.
pub(super) fn fsync_parent(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_round_trips_and_public_forms_parse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/audit.key");
        let public = generate_key_file(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777,
            0o700
        );
        let key = load_signing_key(&path).unwrap();
        assert_eq!(key.verifying_key(), public);
        assert_eq!(load_public_half(&path).unwrap(), public);

        let b64 = public_key_base64(&public);
        assert_eq!(parse_public_key(&format!("{b64}\n")).unwrap(), public);
        let pem = std::fs::read_to_string(&path).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
        assert_eq!(parse_public_key(&pem).unwrap(), public);
        assert!(parse_public_key("AAAA").unwrap_err().contains("32"));
        assert!(parse_public_key("not base64!").is_err());

        assert!(matches!(
            generate_key_file(&path),
            Err(AuditError::KeyExists { .. })
        ));
    }
}
