//! Payment PINs: argon2id with a server-side pepper (argon2's secret input) and a per-PIN salt,
//! stored as a PHC string in the ledger database (DESIGN §2). A 6-digit PIN has only 10^6 values,
//! so the pepper is what makes a stolen table useless; it comes from a file or the environment,
//! never from the database.
//!
//! Hashing never runs on the async workers: it runs on tokio's blocking pool behind a semaphore
//! sized to the cores, each thread reusing one pre-allocated memory block so a check does not
//! page-fault its way through `m_cost` KiB of fresh memory.

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// A PIN or other secret text: never printed, never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Secret {
        Secret(text.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(****)")
    }
}

/// argon2 cost: memory in KiB, passes, lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinCost {
    pub memory_kib: u32,
    pub passes: u32,
}

impl PinCost {
    /// OWASP's minimum for argon2id: m = 19 MiB, t = 2, p = 1 (~29 ms here).
    pub const OWASP: PinCost = PinCost { memory_kib: 19 * 1024, passes: 2 };
    /// For tests only: cheap, still argon2id with the pepper.
    pub const TEST: PinCost = PinCost { memory_kib: 256, passes: 1 };

    fn params(self) -> Result<Params, PinError> {
        Params::new(self.memory_kib, self.passes, 1, Some(32)).map_err(|_| PinError::BadCost)
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum PinError {
    #[error("argon2 cost parameters are invalid")]
    BadCost,
    #[error("stored PIN hash is unreadable")]
    BadStoredHash,
    #[error("PIN hashing task failed")]
    TaskFailed,
}

thread_local! {
    /// One argon2 memory area per blocking thread, grown to the largest cost seen.
    static BLOCKS: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

#[derive(Clone)]
pub struct PinHasher {
    pepper: Arc<[u8]>,
    cost: PinCost,
    permits: Arc<Semaphore>,
}

impl fmt::Debug for PinHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinHasher").field("cost", &self.cost).field("pepper", &"****").finish()
    }
}

impl PinHasher {
    /// `concurrency`: hashes running at once (the cores); more wait for a permit.
    pub fn new(pepper: Vec<u8>, cost: PinCost, concurrency: usize) -> Result<PinHasher, PinError> {
        cost.params()?;
        Ok(PinHasher { pepper: pepper.into(), cost, permits: Arc::new(Semaphore::new(concurrency.max(1))) })
    }

    /// A PHC string for a new PIN, with a fresh salt and the configured cost.
    pub async fn hash(&self, pin: &Secret) -> Result<String, PinError> {
        let mut salt = [0u8; 16];
        OsRng.fill_bytes(&mut salt);
        let params = self.cost.params()?;
        let output = self.run(pin.clone(), salt.to_vec(), params.clone()).await?;
        let salt = SaltString::encode_b64(&salt).map_err(|_| PinError::BadStoredHash)?;
        let output = argon2::password_hash::Output::new(&output).map_err(|_| PinError::BadStoredHash)?;
        Ok(format!(
            "$argon2id$v=19$m={},t={},p={}${}${}",
            params.m_cost(),
            params.t_cost(),
            params.p_cost(),
            salt.as_str(),
            output
        ))
    }

    /// True when `pin` matches the stored PHC string (at the cost it was stored with).
    pub async fn verify(&self, pin: &Secret, phc: &str) -> Result<bool, PinError> {
        let parsed = PasswordHash::new(phc).map_err(|_| PinError::BadStoredHash)?;
        let params = Params::try_from(&parsed).map_err(|_| PinError::BadStoredHash)?;
        let mut salt_buf = [0u8; 64];
        let salt = parsed
            .salt
            .ok_or(PinError::BadStoredHash)?
            .decode_b64(&mut salt_buf)
            .map_err(|_| PinError::BadStoredHash)?;
        let expected = parsed.hash.ok_or(PinError::BadStoredHash)?;
        let params = Params::new(params.m_cost(), params.t_cost(), params.p_cost(), Some(expected.len()))
            .map_err(|_| PinError::BadStoredHash)?;
        let actual = self.run(pin.clone(), salt.to_vec(), params).await?;
        // Constant time: every byte is compared whatever the first difference.
        let differences = actual.iter().zip(expected.as_bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        Ok(differences == 0 && actual.len() == expected.len())
    }

    async fn run(&self, pin: Secret, salt: Vec<u8>, params: Params) -> Result<Vec<u8>, PinError> {
        let _permit = self.permits.acquire().await.map_err(|_| PinError::TaskFailed)?;
        let pepper = self.pepper.clone();
        tokio::task::spawn_blocking(move || {
            let argon = Argon2::new_with_secret(&pepper, Algorithm::Argon2id, Version::V0x13, params.clone())
                .map_err(|_| PinError::BadCost)?;
            let mut output = vec![0u8; params.output_len().unwrap_or(32)];
            BLOCKS.with(|blocks| {
                let mut blocks = blocks.borrow_mut();
                if blocks.len() < params.block_count() {
                    blocks.resize(params.block_count(), Block::default());
                }
                argon
                    .hash_password_into_with_memory(
                        pin.expose().as_bytes(),
                        &salt,
                        &mut output,
                        &mut blocks[..params.block_count()],
                    )
                    .map_err(|_| PinError::BadCost)
            })?;
            Ok(output)
        })
        .await
        .map_err(|_| PinError::TaskFailed)?
    }
}

/// A 6-digit PIN is exactly six ASCII digits.
pub fn is_well_formed(pin: &str, length: usize) -> bool {
    pin.len() == length && pin.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hash_then_verify() {
        let hasher = PinHasher::new(b"pepper-one".to_vec(), PinCost::TEST, 2).unwrap();
        let phc = hasher.hash(&Secret::new("284617")).await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=256,t=1,p=1$"), "{phc}");
        assert!(!phc.contains("284617"));
        assert!(hasher.verify(&Secret::new("284617"), &phc).await.unwrap());
        assert!(!hasher.verify(&Secret::new("284618"), &phc).await.unwrap());
        // Another pepper cannot verify: the stolen table alone is useless.
        let other = PinHasher::new(b"pepper-two".to_vec(), PinCost::TEST, 2).unwrap();
        assert!(!other.verify(&Secret::new("284617"), &phc).await.unwrap());
    }

    #[test]
    fn secrets_do_not_print() {
        assert_eq!(format!("{:?}", Secret::new("123456")), "Secret(****)");
    }
}
