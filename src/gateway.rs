//! The gateway's shared state: one cheap `Arc` handle that every request handler holds. Built by
//! `app`, used by `settle`, `accounts` and `admin`; it knows no gRPC.

use crate::cache::memory::unix_ms;
use crate::cache::{BalanceCache, Claim};
use crate::clock::Clock;
use crate::domain::policy::{Policies, RegionPolicy};
use crate::error::{Failure, Outcome, Reason};
use crate::ledger::{Ledger, PersonRecord, SettlementKey};
use crate::pin::PinHasher;
use crate::settle::commit::Committer;
use crate::settle::sweeper::SWEEP_GRACE_MS;
use argon2::password_hash::rand_core::{OsRng, RngCore};
use chrono_tz::Asia::Shanghai;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Tunables of the settlement path, each with its unit in the name.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A hold's lease: after it, the sweeper settles the hold against the ledger.
    pub hold_lease_ms: u64,
    /// How long a payment waits for its ledger commit before answering UNAVAILABLE.
    pub commit_timeout_ms: u64,
    /// Writes gathered into one ledger transaction at most.
    pub batch_len_max: usize,
    /// Writes waiting for the committer at most; more wait to enqueue.
    pub commit_queue_max: usize,
    /// Money-moving requests in flight at most; beyond it a request is refused at once with
    /// OVERLOADED rather than queueing past its deadline (which would only waste work).
    pub in_flight_max: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            hold_lease_ms: 30_000,
            commit_timeout_ms: 10_000,
            batch_len_max: 256,
            commit_queue_max: 4096,
            in_flight_max: 1024,
        }
    }
}

pub struct Gateway {
    pub ledger: Arc<dyn Ledger>,
    pub cache: Arc<dyn BalanceCache>,
    pub committer: Committer,
    pub pins: PinHasher,
    pub policies: Policies,
    pub clock: Arc<dyn Clock>,
    pub settings: Settings,
    /// Admission: one permit per money-moving request in flight (`Settings::in_flight_max`).
    pub admission: Arc<tokio::sync::Semaphore>,
    /// Settlement critical sections and the work they leave after the answer (ending the claim,
    /// finding out an unknown commit's fate), which a graceful stop waits for.
    pub background: Background,
}

impl Gateway {
    /// A permit to move money now, or OVERLOADED at once.
    pub fn admit(&self) -> Outcome<tokio::sync::OwnedSemaphorePermit> {
        self.admission.clone().try_acquire_owned().map_err(|_| {
            Failure::new(Reason::Overloaded, "the gateway is at capacity; retry shortly (nothing was done)")
        })
    }

    /// One settlement attempt at a time per (institution, request id), across every gateway that
    /// shares the cache: a duplicate sent while an attempt is in flight (a retry to another node
    /// behind a balancer, say) waits for it, then finds its answer, instead of reserving against
    /// the same balances and, in partial mode, possibly reaching the ledger first holding less.
    /// The wait ends when the attempt ends its claim: once its outcome is known (a commit that timed
    /// out: once the ledger has said what became of it, and its holds are settled), or when the
    /// ledger is found to hold the request's settlement (asked after each lease of waiting, for a
    /// holder that vanished), at the latest when the claim runs out. A cache that cannot be asked
    /// fails the request closed, as its reservation would.
    pub async fn claim_request(&self, institution_code: &str, request_id: &str) -> Outcome<RequestClaim> {
        let ttl_ms = claim_ttl_ms(self.settings.hold_lease_ms);
        // The guard exists before the first call, so a claim the cache may have taken is released
        // whatever happens to this future (ending a claim somebody else holds does nothing).
        let mut guard = ClaimGuard {
            cache: self.cache.clone(),
            background: self.background.clone(),
            institution_code: institution_code.to_string(),
            request_id: request_id.to_string(),
            owner: self.new_id('C'),
            held: true,
            expires_at_ms: 0,
            waited: false,
        };
        let mut pause = std::time::Duration::from_millis(2);
        // A holder that vanished (its gateway crashed) never ends its claim: after a lease of
        // waiting, when its write has either committed or can no longer, the ledger is asked too.
        let ask_every = std::time::Duration::from_millis(self.settings.hold_lease_ms);
        let mut ask_ledger_at = tokio::time::Instant::now() + ask_every;
        loop {
            if guard.waited && tokio::time::Instant::now() >= ask_ledger_at {
                let key = SettlementKey::Request {
                    institution_code: institution_code.to_string(),
                    request_id: request_id.to_string(),
                };
                if let Some(settled) = self.ledger.settlement(key).await? {
                    guard.held = false;
                    return Ok(RequestClaim::Answered(settled.setl_id, guard));
                }
                ask_ledger_at = tokio::time::Instant::now() + ask_every;
            }
            let asked_at_ms = unix_ms();
            match self.cache.claim_request(institution_code, request_id, &guard.owner, ttl_ms).await? {
                Claim::Answered(setl_id) => {
                    guard.held = false;
                    return Ok(RequestClaim::Answered(setl_id, guard));
                }
                Claim::Claimed => {
                    guard.expires_at_ms = asked_at_ms + ttl_ms;
                    return Ok(RequestClaim::Attempt(guard));
                }
                Claim::Busy => {
                    guard.waited = true;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_millis(50));
                }
            }
        }
    }

    pub fn policy(&self, region: &str) -> Outcome<&Arc<RegionPolicy>> {
        self.policies
            .region(region)
            .ok_or_else(|| Failure::new(Reason::Internal, format!("no policy loaded for region {region}")))
    }

    pub async fn person(&self, psn_no: &str) -> Outcome<PersonRecord> {
        self.ledger.person(psn_no).await?.ok_or_else(|| {
            Failure::new(Reason::UnknownPerson, format!("person {} is not known", crate::domain::mask_psn_no(psn_no)))
        })
    }

    /// A fresh identifier: prefix, Asia/Shanghai timestamp to the second, then 16 hex digits of
    /// a process-wide sequence that starts at a random 64-bit value. Unique across gateways (two
    /// processes collide only if their sequences meet within the same second), and increasing
    /// within a process, so the ledger's indexes keyed by these ids (settlements, their debits,
    /// hold fates) take each new id at their right edge instead of dirtying a random page each: a
    /// random suffix cost about three written pages per settlement.
    pub fn new_id(&self, prefix: char) -> String {
        id_at(prefix, self.clock.now(), next_id_sequence())
    }
}

/// Tasks that must finish whatever happens to the request that started them (a settlement's
/// critical section, the work after its answer); `drain` waits for them at a graceful stop.
#[derive(Clone, Default)]
pub struct Background {
    running: Arc<(std::sync::atomic::AtomicUsize, tokio::sync::Notify)>,
}

impl Background {
    /// Spawns `work`, counted until it ends (or panics).
    pub fn spawn<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        struct Counted(Arc<(std::sync::atomic::AtomicUsize, tokio::sync::Notify)>);
        impl Drop for Counted {
            fn drop(&mut self) {
                if self.0 .0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                    self.0 .1.notify_waiters();
                }
            }
        }
        self.running.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let counted = Counted(self.running.clone());
        tokio::spawn(async move {
            let _counted = counted;
            work.await
        })
    }

    /// Waits until no such task runs, or `within` has passed; returns how many still run.
    pub async fn drain(&self, within: std::time::Duration) -> usize {
        use std::sync::atomic::Ordering;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let idle = self.running.1.notified();
            let running = self.running.0.load(Ordering::SeqCst);
            if running == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.running.0.load(Ordering::SeqCst);
            }
        }
    }
}

/// How long a request's claim lasts if its holder never ends it: long enough for an attempt that
/// reserves up to one lease after claiming to see its hold deadline and the sweeper's grace pass.
pub fn claim_ttl_ms(hold_lease_ms: u64) -> u64 {
    hold_lease_ms.saturating_mul(2).saturating_add(SWEEP_GRACE_MS)
}

/// What `Gateway::claim_request` found.
pub enum RequestClaim {
    /// The request settled before (the cache remembers its setl_id). The guard holds no claim; it
    /// can remember another answer should the ledger not know this one.
    Answered(String, ClaimGuard),
    /// This caller may attempt the request now.
    Attempt(ClaimGuard),
}

/// The claim of one attempt at a request. End it when the attempt is over; dropped unended (the
/// request's future dropped), it is released in the background.
pub struct ClaimGuard {
    cache: Arc<dyn BalanceCache>,
    /// Where a claim dropped unended is released (a graceful stop waits for it).
    background: Background,
    institution_code: String,
    request_id: String,
    owner: String,
    /// The cache may hold the claim for `owner`.
    held: bool,
    /// When the claim runs out (Unix ms), if held.
    expires_at_ms: u64,
    /// Another attempt held the claim first.
    waited: bool,
}

impl ClaimGuard {
    /// Whether another attempt at the request held the claim before this one got it.
    pub fn waited(&self) -> bool {
        self.waited
    }

    /// The latest hold deadline an attempt under this claim may take: its write must become
    /// impossible (deadline and sweeper's grace) before the claim runs out. None if no claim.
    pub fn hold_deadline_limit_ms(&self) -> Option<u64> {
        (self.held && self.expires_at_ms > 0).then(|| self.expires_at_ms.saturating_sub(SWEEP_GRACE_MS))
    }

    /// Remembers `setl_id` (the request's answer), if any, and releases the claim.
    pub async fn end(mut self, setl_id: Option<&str>) {
        if self.held || setl_id.is_some() {
            if let Err(error) =
                self.cache.end_claim(&self.institution_code, &self.request_id, &self.owner, setl_id).await
            {
                // A duplicate then waits for the claim to run out, or replays from the ledger.
                tracing::warn!(%error, "could not end a request's claim");
            }
        }
        self.held = false;
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return; // no runtime left to run it on: the claim runs out
        }
        let cache = self.cache.clone();
        let (code, id, owner) = (
            std::mem::take(&mut self.institution_code),
            std::mem::take(&mut self.request_id),
            std::mem::take(&mut self.owner),
        );
        self.background.spawn(async move {
            if let Err(error) = cache.end_claim(&code, &id, &owner, None).await {
                tracing::warn!(%error, "could not release a request's claim");
            }
        });
    }
}

fn next_id_sequence() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQUENCE: std::sync::LazyLock<AtomicU64> = std::sync::LazyLock::new(|| AtomicU64::new(OsRng.next_u64()));
    SEQUENCE.fetch_add(1, Ordering::Relaxed)
}

fn id_at(prefix: char, at: chrono::DateTime<chrono::Utc>, sequence: u64) -> String {
    use chrono::{Datelike, Timelike};
    use std::fmt::Write;
    let t = at.with_timezone(&Shanghai);
    let mut id = String::with_capacity(31);
    // (Fields written directly: a strftime pattern is parsed again on every call.)
    let _ = write!(
        id,
        "{prefix}{:04}{:02}{:02}{:02}{:02}{:02}{sequence:016x}",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
    );
    id
}

/// Hex SHA-256 of the parts, separated so that ("ab","c") and ("a","bc") differ.
pub fn digest(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(64);
    for byte in hasher.finalize() {
        hex.push(HEX[usize::from(byte >> 4)] as char);
        hex.push(HEX[usize::from(byte & 0x0f)] as char);
    }
    hex
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_the_hex_sha256_of_the_length_prefixed_parts() {
        // Computed apart: sha256(le_u64(9) "settle/v1" le_u64(2) "P1").
        assert_eq!(digest(&["settle/v1", "P1"]), "95f75bbe2f66793e2a0f4f14484fcd7a7c890e5873a4a57265ae93e38266207e");
        assert_ne!(digest(&["ab", "c"]), digest(&["a", "bc"]));
    }

    #[test]
    fn ids_carry_the_shanghai_second_and_increase_within_a_process() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-11-29T16:05:09Z").unwrap().with_timezone(&chrono::Utc);
        assert_eq!(id_at('S', at, 0x2a), "S20261130000509000000000000002a");
        let (first, second) = (next_id_sequence(), next_id_sequence());
        assert_ne!(first, second);
        // Within one second the ids sort in the order they were taken (barring the sequence's
        // one wrap in 2^64).
        if first < second {
            assert!(id_at('S', at, first) < id_at('S', at, second));
        }
    }
}
