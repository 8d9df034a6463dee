//! Group commit (DESIGN §2): one committer task takes whatever writes queued while the previous
//! ledger commit was in flight — no timer, so an idle gateway pays one commit of latency and a busy
//! one amortises it — and commits them as one batch, each with its own outcome.

use crate::ledger::{Ledger, LedgerResult, LedgerUnavailable, LedgerWrite, WriteDecline, WriteResult};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// A write, when it was queued, and where its outcome goes.
type Job = (LedgerWrite, Instant, oneshot::Sender<LedgerResult<WriteResult>>);

#[derive(Clone)]
pub struct Committer {
    queue: mpsc::Sender<Job>,
}

impl Committer {
    /// Starts the committer task on the current runtime. It ends when every `Committer` clone
    /// is dropped and the queue is drained. A write still queued `start_within` after it was
    /// queued is answered `HoldExpired` without touching the database: its caller has given up,
    /// and doing the work anyway is how an overloaded system collapses.
    pub fn start(ledger: Arc<dyn Ledger>, batch_len_max: usize, queue_max: usize, start_within: Duration) -> Committer {
        assert!(batch_len_max >= 1 && queue_max >= 1);
        let (queue, mut jobs) = mpsc::channel::<Job>(queue_max);
        tokio::spawn(async move {
            let mut batch: Vec<Job> = Vec::with_capacity(batch_len_max);
            // Waits for one write, then takes whatever else is queued, up to the batch's length.
            while jobs.recv_many(&mut batch, batch_len_max).await > 0 {
                let now = Instant::now();
                let mut writes = Vec::with_capacity(batch.len());
                let mut replies = Vec::with_capacity(batch.len());
                for (write, queued, reply) in batch.drain(..) {
                    if now.duration_since(queued) > start_within {
                        let _ = reply.send(Ok(Err(WriteDecline::HoldExpired)));
                    } else {
                        writes.push(write);
                        replies.push(reply);
                    }
                }
                if writes.is_empty() {
                    continue;
                }
                let count = writes.len();
                match ledger.commit_batch(writes).await {
                    Ok(results) => {
                        assert_eq!(results.len(), count, "one outcome per write");
                        for (reply, result) in replies.into_iter().zip(results) {
                            let _ = reply.send(Ok(result));
                        }
                    }
                    Err(error) => {
                        for reply in replies {
                            let _ = reply.send(Err(error.clone()));
                        }
                    }
                }
            }
        });
        Committer { queue }
    }

    /// Queues one write and waits for its outcome.
    pub async fn commit(&self, write: LedgerWrite) -> LedgerResult<WriteResult> {
        let (reply, outcome) = oneshot::channel();
        self.queue
            .send((write, Instant::now(), reply))
            .await
            .map_err(|_| LedgerUnavailable("committer stopped".into()))?;
        outcome.await.map_err(|_| LedgerUnavailable("committer stopped".into()))?
    }
}
