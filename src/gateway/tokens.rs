//! Bearer tokens for the gRPC API: `arpcp token create|list|revoke` keep them in
//! `DATA_DIR/tokens.json`, and a running gateway looks callers' tokens up there.
//!
//! A JSON file and not the sled store, because `arpcp token` runs beside a gateway
//! that holds sled's lock. Only a token's SHA-256 is stored, so reading the file
//! gives no one a usable token. Every write goes to a temporary file that is renamed
//! over the old one, so the gateway never reads half a file; it re-reads the file
//! when its identity (inode, size, modification time) changes, looked at no more
//! than once per `RELOAD_INTERVAL`, so a token created or revoked takes effect
//! without a restart.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::tls::Role;

/// The token file in the gateway's data directory.
pub const TOKENS_FILE: &str = "tokens.json";
/// Most tokens one gateway keeps: the file is read whole into memory.
pub const MAX_TOKENS: usize = 1000;
/// Largest token file read; `MAX_TOKENS` entries fit several times over.
pub const MAX_TOKENS_FILE_BYTES: u64 = 1024 * 1024;
/// Longest token name.
pub const MAX_TOKEN_NAME_CHARS: usize = 64;
/// Longest bearer token a caller may send; ours are far shorter (`arpcp_` + 64 hex digits).
pub const MAX_TOKEN_CHARS: usize = 256;
/// What every token starts with, so one found in a log or a script is recognisable.
pub const TOKEN_PREFIX: &str = "arpcp_";
/// Random bytes in a token (256 bits: not guessable, and not worth slowing down
/// with a password hash).
pub const TOKEN_RANDOM_BYTES: usize = 32;
/// The gateway looks at the token file at most this often.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// One token as stored: never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenEntry {
    pub name: String,
    /// `reader`, `submitter` or `operator`.
    pub role: String,
    /// Hex SHA-256 of the token.
    pub sha256: String,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TokenFile {
    tokens: Vec<TokenEntry>,
}

#[derive(Debug, Error)]
pub enum TokenError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_TOKENS_FILE_BYTES} bytes: not a token file")]
    TooLarge { path: PathBuf },
    #[error("{path} is not a valid token file: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid token name {name:?}: {reason}")]
    BadName { name: String, reason: String },
    #[error("a token named {name:?} already exists; revoke it first (`arpcp token revoke {name}`) or choose another name")]
    Exists { name: String },
    #[error("no token named {name:?} (see `arpcp token list`)")]
    NotFound { name: String },
    #[error("{path} already holds {MAX_TOKENS} tokens, the most a gateway keeps; revoke unused ones first")]
    TooMany { path: PathBuf },
    #[error("role {0} is not a client role: reader, submitter or operator expected")]
    NotClientRole(Role),
    #[error("the system's random number generator failed")]
    Random,
}

/// The token file of a data directory.
pub fn path_in(data_dir: &Path) -> PathBuf {
    data_dir.join(TOKENS_FILE)
}

/// Hex SHA-256 of a token, as stored.
pub fn hash(token: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check_name(name: &str) -> Result<(), TokenError> {
    let bad = |reason: String| TokenError::BadName {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("it is empty".into()));
    }
    if name.chars().count() > MAX_TOKEN_NAME_CHARS {
        return Err(bad(format!(
            "longer than {MAX_TOKEN_NAME_CHARS} characters"
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(bad(format!(
            "{c:?} is not allowed (letters, digits, '.', '-', '_')"
        )));
    }
    Ok(())
}

/// The file's tokens; none when it does not exist yet.
fn read(path: &Path) -> Result<TokenFile, TokenError> {
    let read_err = |source| TokenError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TokenFile::default()),
        Err(e) => return Err(read_err(e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_TOKENS_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_TOKENS_FILE_BYTES {
        return Err(TokenError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    let malformed = |reason: String| TokenError::Malformed {
        path: path.to_path_buf(),
        reason,
    };
    let file: TokenFile = serde_json::from_slice(&bytes).map_err(|e| malformed(e.to_string()))?;
    if file.tokens.len() > MAX_TOKENS {
        return Err(malformed(format!(
            "{} tokens, at most {MAX_TOKENS}",
            file.tokens.len()
        )));
    }
    for t in &file.tokens {
        if client_role(&t.role).is_none() {
            return Err(malformed(format!(
                "token {:?} has role {:?}: reader, submitter or operator expected",
                t.name, t.role
            )));
        }
        if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed(format!(
                "token {:?}: sha256 must be 64 hex digits",
                t.name
            )));
        }
    }
    Ok(file)
}

fn client_role(s: &str) -> Option<Role> {
    Role::from_ou(s).filter(|r| r.is_client())
}

/// Replaces the file: a temporary file (0600) written and synced, then renamed over
/// it, so a reader sees the old file or the new one, never a mix.
fn write(path: &Path, file: &TokenFile) -> Result<(), TokenError> {
    let write_err = |source| TokenError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = serde_json::to_vec_pretty(file).map_err(|e| write_err(e.into()))?;
    bytes.push(b'\n');
    let tmp = path.with_extension("json.tmp");
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(write_err)?;
    out.write_all(&bytes).map_err(write_err)?;
    out.sync_all().map_err(write_err)?;
    drop(out);
    std::fs::rename(&tmp, path).map_err(write_err)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(write_err)?;
    }
    Ok(())
}

/// Makes a token for NAME with `role`, stores its hash in DATA_DIR's token file and
/// returns the token: the only time it is ever seen.
pub fn create(data_dir: &Path, name: &str, role: Role) -> Result<String, TokenError> {
    check_name(name)?;
    if !role.is_client() {
        return Err(TokenError::NotClientRole(role));
    }
    let path = path_in(data_dir);
    let mut file = read(&path)?;
    if file.tokens.iter().any(|t| t.name == name) {
        return Err(TokenError::Exists {
            name: name.to_string(),
        });
    }
    if file.tokens.len() >= MAX_TOKENS {
        return Err(TokenError::TooMany { path });
    }
    let mut random = [0u8; TOKEN_RANDOM_BYTES];
    SystemRandom::new()
        .fill(&mut random)
        .map_err(|_| TokenError::Random)?;
    let token = format!("{TOKEN_PREFIX}{}", hex(&random));
    file.tokens.push(TokenEntry {
        name: name.to_string(),
        role: role.as_ou().to_string(),
        sha256: hash(&token),
        created_ms: crate::gateway::model::now_ms(),
    });
    crate::durable::create_data_dir(data_dir).map_err(|source| TokenError::Write {
        path: data_dir.to_path_buf(),
        source,
    })?;
    write(&path, &file)?;
    Ok(token)
}

/// The tokens in DATA_DIR's token file (their hashes, not the tokens).
pub fn list(data_dir: &Path) -> Result<Vec<TokenEntry>, TokenError> {
    Ok(read(&path_in(data_dir))?.tokens)
}

/// Removes NAME's token; a gateway refuses it from its next look at the file on.
pub fn revoke(data_dir: &Path, name: &str) -> Result<TokenEntry, TokenError> {
    let path = path_in(data_dir);
    let mut file = read(&path)?;
    let Some(i) = file.tokens.iter().position(|t| t.name == name) else {
        return Err(TokenError::NotFound {
            name: name.to_string(),
        });
    };
    let removed = file.tokens.remove(i);
    write(&path, &file)?;
    Ok(removed)
}

/// Who a valid token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenHolder {
    pub name: String,
    pub role: Role,
}

/// What the file looked like when it was last read: a rename gives a new inode, so
/// every write of ours changes this even within one timestamp tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

fn stamp(path: &Path) -> std::io::Result<Option<Stamp>> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some(Stamp {
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

struct Cache {
    checked: Option<Instant>,
    stamp: Option<Stamp>,
    /// By hash; or why the file could not be read, in which case every token is
    /// refused (a file that cannot be read may be the one that revoked a token).
    tokens: Result<HashMap<String, TokenHolder>, String>,
}

/// The gateway's view of its token file.
pub struct TokenStore {
    path: PathBuf,
    cache: Mutex<Cache>,
}

impl TokenStore {
    pub fn new(data_dir: &Path) -> TokenStore {
        TokenStore {
            path: path_in(data_dir),
            cache: Mutex::new(Cache {
                checked: None,
                stamp: None,
                tokens: Ok(HashMap::new()),
            }),
        }
    }

    /// Whose token this is (`None`: no such token), from the file as it is now
    /// (at most `RELOAD_INTERVAL` old); `Err` says why the file cannot be used.
    pub fn lookup(&self, token: &str) -> Result<Option<TokenHolder>, String> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache
            .checked
            .is_none_or(|at| at.elapsed() >= RELOAD_INTERVAL)
        {
            self.refresh(&mut cache);
        }
        match &cache.tokens {
            Ok(by_hash) => Ok(by_hash.get(&hash(token)).cloned()),
            Err(e) => Err(e.clone()),
        }
    }

    fn refresh(&self, cache: &mut Cache) {
        cache.checked = Some(Instant::now());
        let now = match stamp(&self.path) {
            Ok(s) => s,
            Err(e) => {
                let why = format!("cannot read {}: {e}", self.path.display());
                tracing::warn!("{why}; bearer tokens are refused until it can be read");
                cache.tokens = Err(why);
                cache.stamp = None;
                return;
            }
        };
        if now == cache.stamp && cache.tokens.is_ok() {
            return;
        }
        cache.stamp = now;
        cache.tokens = match read(&self.path) {
            Ok(file) => {
                let by_hash: HashMap<_, _> = file
                    .tokens
                    .into_iter()
                    .filter_map(|t| {
                        let role = client_role(&t.role)?;
                        Some((
                            t.sha256.to_ascii_lowercase(),
                            TokenHolder { name: t.name, role },
                        ))
                    })
                    .collect();
                tracing::info!(tokens = by_hash.len(), path = %self.path.display(), "token file read");
                Ok(by_hash)
            }
            Err(e) => {
                tracing::warn!("{e}; bearer tokens are refused until it is fixed");
                Err(e.to_string())
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_list_revoke_and_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path());
        let token = create(dir.path(), "ci", Role::Submitter).unwrap();
        assert!(token.starts_with(TOKEN_PREFIX));
        assert_eq!(token.len(), TOKEN_PREFIX.len() + 2 * TOKEN_RANDOM_BYTES);
        let listed = list(dir.path()).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].role, "submitter");
        assert_eq!(listed[0].sha256, hash(&token));
        assert!(!std::fs::read_to_string(path_in(dir.path()))
            .unwrap()
            .contains(&token));
        let mode = std::fs::metadata(path_in(dir.path())).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            store.lookup(&token).unwrap(),
            Some(TokenHolder {
                name: "ci".into(),
                role: Role::Submitter
            })
        );
        assert_eq!(store.lookup("arpcp_nope").unwrap(), None);
        assert!(matches!(
            create(dir.path(), "ci", Role::Reader),
            Err(TokenError::Exists { .. })
        ));
        revoke(dir.path(), "ci").unwrap();
        assert!(matches!(
            revoke(dir.path(), "ci"),
            Err(TokenError::NotFound { .. })
        ));
    }

    #[test]
    fn names_and_roles_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let e = create(dir.path(), "a b", Role::Reader).unwrap_err();
        assert!(e.to_string().contains("' ' is not allowed"), "{e}");
        let e = create(dir.path(), "x", Role::Agent).unwrap_err();
        assert!(e.to_string().contains("not a client role"), "{e}");
        let long = "a".repeat(MAX_TOKEN_NAME_CHARS + 1);
        assert!(create(dir.path(), &long, Role::Reader).is_err());
    }

    #[test]
    fn a_malformed_file_refuses_every_token() {
        let dir = tempfile::tempdir().unwrap();
        let token = create(dir.path(), "ci", Role::Reader).unwrap();
        std::fs::write(path_in(dir.path()), b"{not json").unwrap();
        let store = TokenStore::new(dir.path());
        let e = store.lookup(&token).unwrap_err();
        assert!(e.contains("not a valid token file"), "{e}");
    }
}
