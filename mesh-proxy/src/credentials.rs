//! Kubernetes Secrets named by `credentialName`, read from a credentials directory
//! (`gateway.credentialsDir`): one directory per Secret of the proxy's namespace, holding
//! `tls.crt`, `tls.key`, `ca.crt` and `ca.crl` as a `kubernetes.io/tls` Secret mounted as
//! a volume does (or an Opaque Secret's `cert`, `key`, `cacert` and `crl`).
//!
//! A path is built only from a validated [`SecretRef`] name, which is one path component
//! and never `.` or `..`; each file is then resolved through its symlinks (Kubernetes'
//! `..data` swaps) and refused when it ends up outside the credentials directory.

use std::path::{Path, PathBuf};

use mesh_core::config::SecretRef;

/// Why a credential's file cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("credential {name}: {what}")]
pub struct CredentialError {
    /// The Secret's name.
    pub name: String,
    /// What is wrong.
    pub what: String,
}

/// The files of one Secret in the credentials directory: `<credentialsDir>/<name>/`.
#[derive(Clone, Debug)]
pub struct CredentialFiles {
    /// The credentials directory, canonical.
    root: PathBuf,
    /// `<root>/<name>`.
    dir: PathBuf,
    name: String,
}

impl CredentialFiles {
    /// The Secret `secret` in the credentials directory `credentials`.
    pub fn open(credentials: &Path, secret: &SecretRef) -> Result<Self, CredentialError> {
        let err = |what: String| CredentialError {
            name: secret.name.clone(),
            what,
        };
        let mut parts = Path::new(&secret.name).components();
        if !matches!(
            (parts.next(), parts.next()),
            (Some(std::path::Component::Normal(_)), None)
        ) {
            return Err(err("not a Secret name".to_owned()));
        }
        let root = credentials
            .canonicalize()
            .map_err(|e| err(format!("credentials directory: {e}")))?;
        Ok(Self {
            dir: root.join(&secret.name),
            root,
            name: secret.name.clone(),
        })
    }

    /// The canonical path of `file` of the Secret.
    pub fn join(&self, file: &str) -> Result<PathBuf, CredentialError> {
        let err = |what: String| CredentialError {
            name: self.name.clone(),
            what,
        };
        let real = self
            .dir
            .join(file)
            .canonicalize()
            .map_err(|e| err(format!("{file}: {e}")))?;
        if !real.starts_with(&self.root) {
            return Err(err(format!(
                "{file} resolves outside the credentials directory"
            )));
        }
        Ok(real)
    }

    /// Whether the Secret has `file` (inside the credentials directory).
    pub fn has(&self, file: &str) -> bool {
        self.join(file).is_ok()
    }

    /// The canonical path of the first of `files` the Secret holds (a key and its
    /// Opaque-Secret alias, such as `tls.crt` and `cert`); `None` when it holds none. A
    /// file that is there but resolves outside the credentials directory is an error,
    /// never skipped.
    pub fn find(&self, files: &[&str]) -> Option<Result<PathBuf, CredentialError>> {
        files
            .iter()
            .find(|f| self.dir.join(f).symlink_metadata().is_ok())
            .map(|f| self.join(f))
    }

    /// The Secret's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}
