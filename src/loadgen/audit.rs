//! The books of one run, checked (`yibao bench run --audit`): the hottest 1% of the population's
//! accounts, where concurrent payments on the same account meet. Their balances are read before
//! the run and after it; every settlement the gateway answered OK adds what it drew from each of
//! them (the answer's debits), and every request answered with an error on a payer that could have
//! drawn on them is looked up afterwards by its request id (`GetSettlement`), since an error does
//! not by itself prove nothing was paid. Each account must have fallen by exactly what was drawn
//! from it, to the fen, and none may be negative: load neither loses, creates nor double-pays money.

use super::Population;
use crate::domain::Money;
use crate::rpc::pb;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tonic::transport::Channel;

/// Reads in flight while opening and closing the books.
const CONCURRENCY: usize = 64;
/// How long the books wait for the audited accounts to have no hold open, before the first read
/// and before looking requests up: a payment whose caller gave up may still commit until its hold's
/// lease ends (30 s by default, `hold_lease_ms`) and the sweeper's grace after it (5 s), so "not
/// found" is final only once no hold is left; when one still is after this wait, every request
/// not found counts as unresolved. (A gateway run with a longer lease needs a longer wait.)
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(45);
/// Between two reads while waiting.
const SETTLE_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// The audited accounts and their balances before the run.
pub struct Books {
    before: HashMap<String, Money>,
    /// Payers whose payments may draw on an audited account: the audited ones themselves and
    /// every family payer (their sources are funded payers, some of them hot).
    watched: HashSet<String>,
}

/// What the run's answers drew from the audited accounts.
#[derive(Debug, Default)]
pub struct Drawn {
    by_owner: HashMap<String, Money>,
    settlements: u64,
    /// Request ids of the watched payers' requests answered with an error, to look up afterwards.
    errored: Vec<String>,
}

/// What the ledger holds for a request answered with an error.
enum Lookup {
    Settled(Box<pb::Settlement>),
    NotPaid,
    /// Another error, or a settlement in another state (a bench run neither reverses nor refunds).
    Unresolved,
}

/// The audit's verdict, in the run's report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditReport {
    pub accounts: usize,
    /// Settlements that drew on an audited account (answered OK, or found settled afterwards).
    pub settlements: u64,
    /// Of those, requests answered with an error that the ledger nevertheless holds as settled.
    pub settled_despite_error: u64,
    /// Requests answered with an error whose outcome the lookup could not tell.
    pub unresolved: u64,
    /// Total drawn from the audited accounts, yuan.
    pub drawn: String,
    /// Accounts whose balance did not fall by exactly what was drawn from them.
    pub mismatched: u64,
    pub negative: u64,
    /// Accounts whose available amount is still below their balance after waiting `SETTLE_WAIT`
    /// for every payment in flight to end. Shown, not failed: it is a hold not yet released, or a
    /// cached balance below the ledger's (allowed: the cache may understate, never overstate), and
    /// either way the balance compared above is the ledger's.
    pub holds_open: u64,
    /// The first few mismatches, each "<psn_no>: before B, drawn D, after A".
    pub examples: Vec<String>,
}

impl AuditReport {
    pub fn passed(&self) -> bool {
        self.mismatched == 0 && self.negative == 0 && self.unresolved == 0
    }

    pub fn summary(&self) -> String {
        let verdict = if self.passed() {
            "balances match".to_string()
        } else {
            format!(
                "FAILED: {} mismatched, {} negative, {} unresolved{}",
                self.mismatched,
                self.negative,
                self.unresolved,
                if self.examples.is_empty() { String::new() } else { format!("; e.g. {}", self.examples.join("; ")) }
            )
        };
        let holds = match self.holds_open {
            0 => String::new(),
            open => format!(", {open} with less available than their balance"),
        };
        format!(
            "audit: {} accounts, {} settlements on them ({} despite an error), {} drawn{holds}: {verdict}",
            self.accounts, self.settlements, self.settled_despite_error, self.drawn
        )
    }
}

fn auth<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = format!("Bearer {key}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// An amount as the gateway wrote it, any sign (a negative balance must be counted, not refused).
fn money(field: &str, text: &str) -> Result<Money, String> {
    Money::from_ledger_text(text).ok_or_else(|| format!("the gateway answered {field} {text:?}, not an amount"))
}

/// Runs `read` over `items`, `CONCURRENCY` at a time, and returns each item's answer.
async fn read_all<T, F, Fut>(items: Vec<String>, read: F) -> Result<Vec<(String, T)>, String>
where
    T: Send + 'static,
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>> + Send + 'static,
{
    let permits = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for item in items {
        let permit = permits.clone().acquire_owned().await.map_err(|e| e.to_string())?;
        let reading = read(item.clone());
        tasks.spawn(async move {
            let answer = reading.await;
            drop(permit);
            answer.map(|answer| (item, answer))
        });
    }
    let mut answers = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        answers.push(joined.map_err(|e| e.to_string())??);
    }
    Ok(answers)
}

/// Each account's (balance, available).
async fn balances(
    channel: &Channel,
    key: &str,
    psn_nos: Vec<String>,
) -> Result<HashMap<String, (Money, Money)>, String> {
    let answers = read_all(psn_nos, |psn_no| {
        let mut account = pb::account_service_client::AccountServiceClient::new(channel.clone());
        let request = auth(pb::GetBalanceRequest { psn_no: psn_no.clone() }, key);
        async move {
            let balance =
                account.get_balance(request).await.map_err(|s| format!("balance of {psn_no}: {}", s.message()))?;
            let balance = balance.into_inner();
            Ok((money("balance", &balance.balance)?, money("available", &balance.available)?))
        }
    })
    .await?;
    Ok(answers.into_iter().collect())
}

/// Waits until none of the accounts has a hold open, for at most `SETTLE_WAIT`; false if one still
/// has (or shows less available than its balance for another reason: a cached balance below the
/// ledger's, or a negative balance, whose available amount reads 0.00).
async fn wait_for_no_hold(channel: &Channel, key: &str, psn_nos: &[String]) -> Result<bool, String> {
    let deadline = tokio::time::Instant::now() + SETTLE_WAIT;
    loop {
        let read = balances(channel, key, psn_nos.to_vec()).await?;
        if read.values().all(|(balance, available)| balance == available) {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
}

impl Books {
    /// Reads the population's hot accounts before the run, once no payment is in flight on them
    /// (an earlier run's, say). The population must be this run's alone while it runs.
    pub async fn open(channel: &Channel, key: &str, population: &Population) -> Result<Books, String> {
        let audited: Vec<String> = population.hot_payers().to_vec();
        wait_for_no_hold(channel, key, &audited).await?;
        let before = balances(channel, key, audited.clone())
            .await?
            .into_iter()
            .map(|(psn_no, (balance, _))| (psn_no, balance))
            .collect();
        let watched = audited.into_iter().chain(population.family_payers.iter().cloned()).collect();
        Ok(Books { before, watched })
    }

    /// Counts one answered request: what a settlement drew from the audited accounts, or, for an
    /// error on a watched payer, its request id to look up after the run.
    /// (`answer` is the settlement, or `None` for an error.)
    pub fn record(&self, drawn: &mut Drawn, psn_no: &str, request_id: &str, answer: Option<&pb::Settlement>) {
        match answer {
            Some(settlement) => self.add(drawn, settlement),
            None if self.watched.contains(psn_no) => drawn.errored.push(request_id.to_string()),
            None => {}
        }
    }

    fn add(&self, drawn: &mut Drawn, settlement: &pb::Settlement) {
        let mut touched = false;
        for debit in &settlement.debits {
            if self.before.contains_key(&debit.owner_psn_no) {
                // An unreadable amount counts as nothing drawn: the account will then mismatch.
                let amount = Money::from_ledger_text(&debit.amount).unwrap_or(Money::ZERO);
                let total = drawn.by_owner.entry(debit.owner_psn_no.clone()).or_insert(Money::ZERO);
                *total = total.checked_add(amount).unwrap_or(*total);
                touched = true;
            }
        }
        drawn.settlements += u64::from(touched);
    }

    /// Waits for every payment in flight on the audited accounts to end, looks up the requests
    /// answered with an error, reads the balances again and compares.
    pub async fn close(&self, channel: &Channel, key: &str, mut drawn: Drawn) -> Result<AuditReport, String> {
        let audited: Vec<String> = self.before.keys().cloned().collect();
        // Until every hold has ended, a request not found may still commit: not final.
        let quiet = wait_for_no_hold(channel, key, &audited).await?;
        let errored = std::mem::take(&mut drawn.errored);
        let found = read_all(errored, |request_id| {
            let mut settlements = pb::settlement_service_client::SettlementServiceClient::new(channel.clone());
            let request = auth(
                pb::GetSettlementRequest { key: Some(pb::get_settlement_request::Key::RequestId(request_id)) },
                key,
            );
            async move {
                Ok(match settlements.get_settlement(request).await {
                    Ok(found) if found.get_ref().status == pb::SettlementStatus::Settled as i32 => {
                        Lookup::Settled(Box::new(found.into_inner()))
                    }
                    Err(status) if status.code() == tonic::Code::NotFound => Lookup::NotPaid,
                    _ => Lookup::Unresolved,
                })
            }
        })
        .await?;
        let (mut settled_despite_error, mut unresolved) = (0, 0);
        for (_, lookup) in found {
            match lookup {
                Lookup::Settled(settlement) => {
                    settled_despite_error += 1;
                    self.add(&mut drawn, &settlement);
                }
                Lookup::NotPaid if quiet => {}
                Lookup::NotPaid => unresolved += 1,
                Lookup::Unresolved => unresolved += 1,
            }
        }
        let after = balances(channel, key, audited).await?;
        let mut report = AuditReport {
            accounts: self.before.len(),
            settlements: drawn.settlements,
            settled_despite_error,
            unresolved,
            drawn: Money::sum(drawn.by_owner.values().copied()).to_string(),
            mismatched: 0,
            negative: 0,
            holds_open: 0,
            examples: Vec::new(),
        };
        let mut accounts: Vec<&String> = self.before.keys().collect();
        accounts.sort();
        for psn_no in accounts {
            let before = self.before[psn_no];
            let taken = drawn.by_owner.get(psn_no).copied().unwrap_or(Money::ZERO);
            let (balance, available) = after[psn_no];
            report.negative += u64::from(balance.is_negative() || available.is_negative());
            report.holds_open += u64::from(available != balance);
            if before.checked_sub(taken) != Some(balance) {
                report.mismatched += 1;
                if report.examples.len() < 5 {
                    report.examples.push(format!("{psn_no}: before {before}, drawn {taken}, after {balance}"));
                }
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settlement(debits: &[(&str, &str)]) -> pb::Settlement {
        pb::Settlement {
            status: pb::SettlementStatus::Settled as i32,
            debits: debits
                .iter()
                .map(|(owner, amount)| pb::Debit {
                    owner_psn_no: owner.to_string(),
                    amount: amount.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn only_audited_accounts_are_counted_and_only_watched_payers_looked_up() {
        let books = Books {
            before: [("H1".to_string(), Money::parse("10.00").unwrap())].into(),
            watched: ["H1".to_string(), "F1".to_string()].into(),
        };
        let mut drawn = Drawn::default();
        books.record(&mut drawn, "H1", "r1", Some(&settlement(&[("H1", "1.23")])));
        books.record(&mut drawn, "F1", "r2", Some(&settlement(&[("C9", "0.50"), ("H1", "0.70")])));
        books.record(&mut drawn, "C9", "r3", Some(&settlement(&[("C9", "5.00")])));
        books.record(&mut drawn, "H1", "r4", None);
        books.record(&mut drawn, "C9", "r5", None);
        assert_eq!(drawn.by_owner["H1"].to_string(), "1.93");
        assert!(!drawn.by_owner.contains_key("C9"), "an account not audited is not counted");
        assert_eq!(drawn.settlements, 2);
        assert_eq!(drawn.errored, vec!["r4".to_string()], "errors on payers that cannot touch H1 are not looked up");
    }
}
