//! Callers: bearer API keys (`authorization: Bearer <key>`), each with one role. The first operator
//! key comes from `YIBAO_OPERATOR_KEY` (or a file named in the config) and is held only as a hash;
//! every other key is issued through the API and stored hashed in the ledger database.

use crate::admin::hash_api_key;
use crate::domain::Role;
use crate::error::{Failure, Outcome, Reason};
use crate::ledger::{InstitutionRecord, Ledger, Principal};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Known keys cached in memory at most; beyond it the cache is cleared (keys reload on use).
const KEY_CACHE_MAX: usize = 10_000;

pub struct Authenticator {
    ledger: Arc<dyn Ledger>,
    bootstrap_operator_hash: Option<String>,
    known: RwLock<HashMap<String, Principal>>,
}

impl Authenticator {
    pub fn new(ledger: Arc<dyn Ledger>, bootstrap_operator_key: Option<&str>) -> Authenticator {
        Authenticator {
            ledger,
            bootstrap_operator_hash: bootstrap_operator_key.filter(|k| !k.is_empty()).map(hash_api_key),
            known: RwLock::new(HashMap::new()),
        }
    }

    /// The principal behind an `authorization` header value.
    pub async fn authenticate(&self, header: Option<&str>) -> Outcome<Principal> {
        let unauthenticated =
            || Failure::new(Reason::Unauthenticated, "missing or unknown API key (authorization: Bearer <key>)");
        let key = header
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(unauthenticated)?;
        let hash = hash_api_key(key);
        if self.bootstrap_operator_hash.as_deref() == Some(hash.as_str()) {
            return Ok(Principal { key_id: "bootstrap-operator".into(), role: Role::Operator, institution: None });
        }
        if let Some(principal) = self.known.read().unwrap_or_else(|p| p.into_inner()).get(&hash) {
            return Ok(principal.clone());
        }
        let principal = self.ledger.principal(&hash).await?.ok_or_else(unauthenticated)?;
        let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
        if known.len() >= KEY_CACHE_MAX {
            known.clear();
        }
        known.insert(hash, principal.clone());
        Ok(principal)
    }
}

impl Principal {
    /// Passes when the caller has one of `roles`.
    pub fn require(&self, roles: &[Role]) -> Outcome<()> {
        if roles.contains(&self.role) {
            Ok(())
        } else {
            let names: Vec<&str> = roles.iter().map(|r| r.name()).collect();
            Err(Failure::new(Reason::PermissionDenied, format!("this method needs a {} key", names.join(" or "))))
        }
    }

    pub fn institution(&self) -> Outcome<&InstitutionRecord> {
        self.require(&[Role::Institution])?;
        self.institution
            .as_ref()
            .ok_or_else(|| Failure::new(Reason::PermissionDenied, "this key belongs to no institution"))
    }
}
