//! Typed records over the sled trees of a durable [`Store`], one layer for the gateway's
//! and the agent's stores: get, put, insert-if-absent, change, remove, scan, each
//! decoding and encoding in one place, with errors that name the store, the tree and
//! the key.
//!
//! A change is read, decode, change, encode, then a compare-and-swap against the bytes
//! that were read; a swap lost to another writer is decided again on what that writer
//! left. Nothing is written unless a new value encoded: a record that fails to encode
//! stays as it was (sled's `fetch_and_update` deletes a record whose closure answers
//! `None`, which is why the change is not built on it).

use std::marker::PhantomData;
use std::ops::ControlFlow;

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use crate::durable::{DurableError, OpenError, Store};

/// The key given for an entry sled cannot read, whose key is unknown.
pub const UNREADABLE_KEY: &str = "?";

/// What a store layer can fail with.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error(transparent)]
    Durable(#[from] DurableError),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("the {store} holds an unreadable record {key:?} in {tree}: {reason}")]
    Corrupt {
        store: &'static str,
        tree: &'static str,
        key: String,
        reason: String,
    },
    #[error(
        "the {store} cannot encode record {key:?} of {tree}: {reason}; nothing was written, \
         the stored record is as it was"
    )]
    Encode {
        store: &'static str,
        tree: &'static str,
        key: String,
        reason: String,
    },
}

impl StoreError {
    /// Writes fail for now (a full disk) and will work again once the store has
    /// recovered: worth waiting for.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Durable(DurableError::Unwritable { .. }))
    }
}

// Both daemons answer a peer whose request met a store failure with the same code.
impl From<StoreError> for crate::arpcp::ProtocolError {
    fn from(e: StoreError) -> Self {
        crate::arpcp::ProtocolError::Internal(e.to_string())
    }
}

/// How the values of a tree are kept as bytes.
pub trait Codec {
    type Value;
    fn encode(value: &Self::Value) -> Result<Vec<u8>, String>;
    fn decode(bytes: &[u8]) -> Result<Self::Value, String>;
}

/// Records as JSON.
pub struct Json<R>(PhantomData<fn() -> R>);

impl<R: Serialize + DeserializeOwned> Codec for Json<R> {
    type Value = R;
    fn encode(value: &R) -> Result<Vec<u8>, String> {
        serde_json::to_vec(value).map_err(|e| e.to_string())
    }
    fn decode(bytes: &[u8]) -> Result<R, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

/// Plain text (ids, addresses). Bytes that are not UTF-8 are read with replacement
/// characters rather than refused, as the stores always did.
pub struct Text;

impl Codec for Text {
    type Value = String;
    fn encode(value: &String) -> Result<Vec<u8>, String> {
        Ok(value.as_bytes().to_vec())
    }
    fn decode(bytes: &[u8]) -> Result<String, String> {
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
}

/// What a change decided for the record it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit {
    /// Leave the stored record as it is.
    Keep,
    /// Store the changed record.
    Write,
    /// Remove the record.
    Remove,
}

/// The records of one tree of a [`Store`]. The tree is looked up through the store for
/// every call, so the store can reopen itself under it (see `durable.rs`).
pub struct Records<T, C> {
    store: Store<T>,
    tree: fn(&T) -> &sled::Tree,
    /// Names the tree in errors.
    name: &'static str,
    codec: PhantomData<fn() -> C>,
}

impl<T, C> Clone for Records<T, C> {
    fn clone(&self) -> Self {
        Records {
            store: self.store.clone(),
            tree: self.tree,
            name: self.name,
            codec: PhantomData,
        }
    }
}

impl<T: Send + Sync + 'static, C: Codec> Records<T, C> {
    pub fn new(store: Store<T>, name: &'static str, tree: fn(&T) -> &sled::Tree) -> Self {
        Records {
            store,
            tree,
            name,
            codec: PhantomData,
        }
    }

    fn decode(&self, key: &[u8], bytes: &[u8]) -> Result<C::Value, StoreError> {
        C::decode(bytes).map_err(|reason| StoreError::Corrupt {
            store: self.store.label(),
            tree: self.name,
            key: String::from_utf8_lossy(key).into_owned(),
            reason,
        })
    }

    fn encode(&self, key: &str, value: &C::Value) -> Result<Vec<u8>, StoreError> {
        C::encode(value).map_err(|reason| StoreError::Encode {
            store: self.store.label(),
            tree: self.name,
            key: key.to_string(),
            reason,
        })
    }

    fn with<R>(&self, f: impl FnOnce(&sled::Tree) -> sled::Result<R>) -> Result<R, StoreError> {
        let tree = self.tree;
        Ok(self.store.with(|t| f(tree(t)))?)
    }

    pub fn get(&self, key: &str) -> Result<Option<C::Value>, StoreError> {
        self.with(|t| t.get(key))?
            .map(|v| self.decode(key.as_bytes(), &v))
            .transpose()
    }

    /// Stores `value` under `key`, not yet durable (see [`Store::commit`]). Returns
    /// whether the stored bytes changed.
    pub fn put(&self, key: &str, value: &C::Value) -> Result<bool, StoreError> {
        let bytes = self.encode(key, value)?;
        let old = self.with(|t| t.insert(key, bytes.as_slice()))?;
        Ok(old.as_deref() != Some(bytes.as_slice()))
    }

    /// Stores `value` unless `key` holds a record, atomically: `None` when stored,
    /// else the record that was there.
    pub fn insert_new(&self, key: &str, value: &C::Value) -> Result<Option<C::Value>, StoreError> {
        let bytes = self.encode(key, value)?;
        let swapped =
            self.with(|t| t.compare_and_swap(key, None as Option<&[u8]>, Some(bytes.as_slice())))?;
        match swapped {
            Ok(()) => Ok(None),
            // A swap from "absent" fails only on a present value.
            Err(cas) => cas
                .current
                .map(|v| self.decode(key.as_bytes(), &v))
                .transpose(),
        }
    }

    /// Changes the record under `key`, if there is one: `change` gets it decoded and
    /// says what to do with it. Returns the record as `change` left it and what was
    /// done, or `None` for no record. An error (unreadable, not encodable, not
    /// writable) leaves the stored record as it was.
    pub fn edit(
        &self,
        key: &str,
        mut change: impl FnMut(&mut C::Value) -> Edit,
    ) -> Result<Option<(C::Value, Edit)>, StoreError> {
        // Ends: a swap fails only when another write to this key succeeded meanwhile.
        loop {
            let Some(old) = self.with(|t| t.get(key))? else {
                return Ok(None);
            };
            let mut rec = self.decode(key.as_bytes(), &old)?;
            let edit = change(&mut rec);
            let new = match edit {
                Edit::Keep => return Ok(Some((rec, edit))),
                Edit::Write => Some(self.encode(key, &rec)?),
                Edit::Remove => None,
            };
            let swapped = self.with(|t| t.compare_and_swap(key, Some(&old), new))?;
            if swapped.is_ok() {
                return Ok(Some((rec, edit)));
            }
        }
    }

    /// [`Records::edit`] for a change that only writes or keeps: the answer says
    /// whether it wrote.
    pub fn update(
        &self,
        key: &str,
        mut change: impl FnMut(&mut C::Value) -> bool,
    ) -> Result<Option<(C::Value, bool)>, StoreError> {
        let edited = self.edit(
            key,
            |rec| {
                if change(rec) {
                    Edit::Write
                } else {
                    Edit::Keep
                }
            },
        )?;
        Ok(edited.map(|(rec, edit)| (rec, edit == Edit::Write)))
    }

    /// Removes the record; true if there was one.
    pub fn remove(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.with(|t| t.remove(key))?.is_some())
    }

    /// The keys, in order: a snapshot, so that no iterator is held across the store's
    /// handle, which a write error may swap.
    pub fn keys(&self) -> Result<Vec<String>, StoreError> {
        self.with(|t| {
            t.iter()
                .keys()
                .map(|k| k.map(|k| String::from_utf8_lossy(&k).into_owned()))
                .collect()
        })
    }

    /// Visits every record in key order until `visit` breaks; a record that does not
    /// decode, or an entry sled cannot read, is handed over as its error.
    pub fn scan<B>(
        &self,
        visit: impl FnMut(&str, Result<C::Value, StoreError>) -> ControlFlow<B>,
    ) -> Result<Option<B>, StoreError> {
        self.walk(None, false, visit)
    }

    /// As [`Records::scan`], from the last key before `before` (or the last key) back.
    pub fn scan_back<B>(
        &self,
        before: Option<&str>,
        visit: impl FnMut(&str, Result<C::Value, StoreError>) -> ControlFlow<B>,
    ) -> Result<Option<B>, StoreError> {
        self.walk(before, true, visit)
    }

    fn walk<B>(
        &self,
        before: Option<&str>,
        back: bool,
        mut visit: impl FnMut(&str, Result<C::Value, StoreError>) -> ControlFlow<B>,
    ) -> Result<Option<B>, StoreError> {
        self.with(|t| {
            let iter = match before {
                Some(b) => t.range(..b.as_bytes().to_vec()),
                None => t.iter(),
            };
            let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = if back {
                Box::new(iter.rev())
            } else {
                Box::new(iter)
            };
            for kv in iter {
                let flow = match kv {
                    Ok((k, v)) => visit(&String::from_utf8_lossy(&k), self.decode(&k, &v)),
                    // One entry sled cannot read does not hide the others.
                    Err(e) => visit(
                        UNREADABLE_KEY,
                        Err(StoreError::Corrupt {
                            store: self.store.label(),
                            tree: self.name,
                            key: UNREADABLE_KEY.into(),
                            reason: e.to_string(),
                        }),
                    ),
                };
                if let ControlFlow::Break(b) = flow {
                    return Ok(Some(b));
                }
            }
            Ok(None)
        })
    }

    /// Counts the records that do not decode and the entries sled cannot read, and
    /// with `drop_bad` removes the records that do not decode (logging each key).
    pub fn audit(&self, drop_bad: bool) -> Result<(usize, usize), StoreError> {
        self.with(|t| {
            let (mut bad, mut unreadable) = (0, 0);
            for kv in t.iter() {
                let Ok((k, v)) = kv else {
                    unreadable += 1;
                    continue;
                };
                if C::decode(&v).is_ok() {
                    continue;
                }
                bad += 1;
                if drop_bad {
                    tracing::warn!(store = self.store.label(), tree = self.name,
                        key = %String::from_utf8_lossy(&k),
                        "damaged store: dropping a record that does not decode");
                    t.remove(&k)?;
                }
            }
            Ok((bad, unreadable))
        })
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serializer};

    use super::*;
    use crate::durable::{DamagePolicy, Spec};

    /// A record that refuses to be written while `refuse` is set, as no real record
    /// can be made to.
    #[derive(Debug, Clone, PartialEq, Deserialize)]
    struct Flaky {
        n: u32,
        #[serde(default)]
        refuse: bool,
    }

    impl Serialize for Flaky {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            if self.refuse {
                return Err(serde::ser::Error::custom(
                    "this record refuses to be written",
                ));
            }
            use serde::ser::SerializeStruct;
            let mut st = s.serialize_struct("Flaky", 1)?;
            st.serialize_field("n", &self.n)?;
            st.end()
        }
    }

    struct Trees {
        flaky: sled::Tree,
    }

    fn open(dir: &std::path::Path) -> Records<Trees, Json<Flaky>> {
        let opened = Store::open(
            Spec {
                label: "test store",
                path: dir.join("test.sled"),
                cache_bytes: 1024 * 1024,
                trees: |db| {
                    Ok(Trees {
                        flaky: db.open_tree("flaky")?,
                    })
                },
            },
            DamagePolicy::Refuse,
        )
        .unwrap();
        Records::new(opened.store, "flaky", |t| &t.flaky)
    }

    #[test]
    fn a_record_that_fails_to_encode_stays_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let records = open(dir.path());
        let stored = Flaky {
            n: 1,
            refuse: false,
        };
        records.put("k1", &stored).unwrap();

        let err = records
            .update("k1", |r| {
                r.n = 2;
                r.refuse = true;
                true
            })
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Encode { key, tree: "flaky", .. } if key == "k1"),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("\"k1\"") && text.contains("refuses to be written"),
            "{text}"
        );
        assert_eq!(records.get("k1").unwrap(), Some(stored.clone()));

        let err = records.edit("k1", |r| {
            r.refuse = true;
            Edit::Write
        });
        assert!(matches!(err, Err(StoreError::Encode { .. })), "{err:?}");
        assert_eq!(records.get("k1").unwrap(), Some(stored.clone()));

        let refused = Flaky { n: 3, refuse: true };
        assert!(matches!(
            records.put("k1", &refused),
            Err(StoreError::Encode { .. })
        ));
        assert!(matches!(
            records.insert_new("k2", &refused),
            Err(StoreError::Encode { .. })
        ));
        assert_eq!(records.get("k1").unwrap(), Some(stored));
        assert_eq!(records.get("k2").unwrap(), None);
    }

    #[test]
    fn an_unreadable_record_is_named_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let records = open(dir.path());
        let raw: Records<Trees, Text> = Records::new(records.store.clone(), "flaky", |t| &t.flaky);
        raw.put("bad", &"not json".to_string()).unwrap();

        let err = records.update("bad", |_| true).unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt { key, .. } if key == "bad"),
            "{err:?}"
        );
        assert_eq!(raw.get("bad").unwrap().as_deref(), Some("not json"));
        assert_eq!(records.audit(false).unwrap(), (1, 0));
        assert_eq!(records.audit(true).unwrap(), (1, 0));
        assert_eq!(raw.get("bad").unwrap(), None);
    }

    #[test]
    fn concurrent_changes_are_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let records = open(dir.path());
        records
            .put(
                "c",
                &Flaky {
                    n: 0,
                    refuse: false,
                },
            )
            .unwrap();
        let (threads, rounds) = (8, 100);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    for _ in 0..rounds {
                        records
                            .update("c", |r| {
                                r.n += 1;
                                true
                            })
                            .unwrap();
                    }
                });
            }
        });
        assert_eq!(
            records.get("c").unwrap().map(|r| r.n),
            Some(threads * rounds)
        );
    }

    #[test]
    fn changes_keep_write_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let records = open(dir.path());
        for n in 0..4 {
            let first = records
                .insert_new(&format!("k{n}"), &Flaky { n, refuse: false })
                .unwrap();
            assert_eq!(first, None);
        }
        let again = records
            .insert_new(
                "k0",
                &Flaky {
                    n: 9,
                    refuse: false,
                },
            )
            .unwrap();
        assert_eq!(again.map(|r| r.n), Some(0));

        assert_eq!(
            records
                .update("k1", |r| {
                    r.n = 10;
                    true
                })
                .unwrap()
                .map(|(r, w)| (r.n, w)),
            Some((10, true))
        );
        assert_eq!(records.get("k1").unwrap().map(|r| r.n), Some(10));
        assert_eq!(
            records.update("k1", |_| false).unwrap().map(|(_, w)| w),
            Some(false)
        );
        assert!(records.update("missing", |_| true).unwrap().is_none());
        assert_eq!(
            records
                .edit("k2", |_| Edit::Remove)
                .unwrap()
                .map(|(_, e)| e),
            Some(Edit::Remove)
        );
        assert_eq!(records.keys().unwrap(), ["k0", "k1", "k3"]);

        let mut back = Vec::new();
        let stopped = records
            .scan_back(Some("k3"), |k, r| {
                back.push((k.to_string(), r.unwrap().n));
                ControlFlow::<()>::Continue(())
            })
            .unwrap();
        assert_eq!(stopped, None);
        assert_eq!(back, [("k1".to_string(), 10), ("k0".to_string(), 0)]);
        let first = records
            .scan(|k, _| ControlFlow::Break(k.to_string()))
            .unwrap();
        assert_eq!(first.as_deref(), Some("k0"));
    }
}
