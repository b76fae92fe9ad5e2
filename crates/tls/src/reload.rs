//! Configs built from files, rebuilt when the files change.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::{CertInfo, TlsError};

type Build<T> = dyn Fn() -> Result<(T, Option<CertInfo>), TlsError> + Send + Sync;
type Check = dyn Fn(&CertInfo) -> Result<(), String> + Send + Sync;

/// A value (a rustls config) built from files; [`Reload::reload_if_changed`] rebuilds it
/// when their contents changed. Readers take the current value per connection.
pub struct Reloading<T> {
    name: &'static str,
    files: Vec<PathBuf>,
    build: Box<Build<T>>,
    current: RwLock<(Arc<T>, Option<CertInfo>)>,
    /// Hash of the files' contents the current value was built from.
    built_from: Mutex<u64>,
    /// What a rebuilt certificate must satisfy (see [`Reloading::require`]).
    check: Mutex<Option<Box<Check>>>,
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Builds the value once; an error here is a start-up error.
    pub fn new(
        name: &'static str,
        files: Vec<PathBuf>,
        build: impl Fn() -> Result<(T, Option<CertInfo>), TlsError> + Send + Sync + 'static,
    ) -> Result<Arc<Self>, TlsError> {
        let stamp = fingerprint(&files);
        let (value, cert) = build()?;
        Ok(Arc::new(Self {
            name,
            files,
            build: Box::new(build),
            current: RwLock::new((Arc::new(value), cert)),
            built_from: Mutex::new(stamp),
            check: Mutex::new(None),
        }))
    }

    /// A condition every later certificate must meet to replace the current one (e.g.
    /// keep the identity this instance registered); one that does not is refused like
    /// unreadable files.
    pub fn require(&self, check: impl Fn(&CertInfo) -> Result<(), String> + Send + Sync + 'static) {
        *self.check.lock().expect("tls lock") = Some(Box::new(check));
    }

    pub fn current(&self) -> Arc<T> {
        self.current.read().expect("tls lock").0.clone()
    }
}

/// Something [`watch`] keeps current.
pub trait Reload: Send + Sync {
    /// Which plane or connection this is (`client`, `peer`, `etcd`, ...).
    fn name(&self) -> &'static str;
    /// Rebuilds when the files changed: `None` when they did not, else whether the rebuild
    /// worked (a failed one keeps the previous value and is retried on the next check).
    fn reload_if_changed(&self) -> Option<Result<(), TlsError>>;
    /// The certificate presented (its leaf), if any.
    fn certificate(&self) -> Option<CertInfo>;
}

impl<T: Send + Sync + 'static> Reload for Reloading<T> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn reload_if_changed(&self) -> Option<Result<(), TlsError>> {
        let stamp = fingerprint(&self.files);
        let mut built_from = self.built_from.lock().expect("tls lock");
        if *built_from == stamp {
            return None;
        }
        let built = (self.build)().and_then(|(value, cert)| {
            if let (Some(check), Some(c)) = (self.check.lock().expect("tls lock").as_ref(), &cert) {
                check(c).map_err(|reason| TlsError::Invalid {
                    path: self.files.first().cloned().unwrap_or_default(),
                    reason,
                })?;
            }
            Ok((value, cert))
        });
        Some(built.map(|(value, cert)| {
            *self.current.write().expect("tls lock") = (Arc::new(value), cert);
            *built_from = stamp;
        }))
    }

    fn certificate(&self) -> Option<CertInfo> {
        self.current.read().expect("tls lock").1.clone()
    }
}

/// Hash of the files' contents (a missing file hashes as empty). Contents, not mtimes:
/// Kubernetes swaps a Secret's files through a symlink, and a rewrite within one second
/// keeps the mtime.
fn fingerprint(files: &[PathBuf]) -> u64 {
    let mut h = DefaultHasher::new();
    for f in files {
        std::fs::read(f).unwrap_or_default().hash(&mut h);
    }
    h.finish()
}

/// Checks every `interval` whether the files behind `items` changed, rebuilds them, and
/// calls `observe` with each (to publish expiry metrics) after every check.
pub async fn watch(
    items: Vec<Arc<dyn Reload>>,
    interval: Duration,
    cancel: CancellationToken,
    observe: impl Fn(&dyn Reload),
) {
    loop {
        for item in &items {
            match item.reload_if_changed() {
                None => {}
                Some(Ok(())) => tracing::info!(
                    tls = item.name(),
                    certificate = %item.certificate().map(|c| c.to_string()).unwrap_or_default(),
                    "TLS files changed; new connections use the new certificate"
                ),
                Some(Err(e)) => tracing::warn!(
                    tls = item.name(),
                    error = %e,
                    "TLS files changed but cannot be used; keeping the previous certificate"
                ),
            }
            observe(item.as_ref());
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn rebuilds_only_when_contents_change_and_keeps_the_old_value_on_failure() {
        let dir = std::env::temp_dir().join(format!("lh-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cert.pem");
        std::fs::write(&file, "one").unwrap();
        let builds = Arc::new(AtomicU32::new(0));
        let (f, b) = (file.clone(), builds.clone());
        let r = Reloading::new("test", vec![file.clone()], move || {
            b.fetch_add(1, Ordering::SeqCst);
            let text = std::fs::read_to_string(&f).unwrap();
            if text == "bad" {
                return Err(TlsError::NoCertificate { path: f.clone() });
            }
            Ok((text, None))
        })
        .unwrap();
        assert_eq!(*r.current(), "one");
        assert!(r.reload_if_changed().is_none(), "unchanged: no rebuild");
        std::fs::write(&file, "bad").unwrap();
        assert!(matches!(r.reload_if_changed(), Some(Err(_))));
        assert_eq!(*r.current(), "one", "a failed rebuild keeps the old value");
        assert!(
            matches!(r.reload_if_changed(), Some(Err(_))),
            "and is retried"
        );
        std::fs::write(&file, "two").unwrap();
        assert!(matches!(r.reload_if_changed(), Some(Ok(()))));
        assert_eq!(*r.current(), "two");
        assert_eq!(builds.load(Ordering::SeqCst), 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
