//! Calls of one policy's reservations gathered into one: while a policy's call is in flight,
//! the reservations that come for it wait, and go together in the next call, at most
//! [`MAX_BATCH`] to a call (`reserve.lua` takes them in turn, each as a call of its own would).
//! Nothing waits for a timer: a reservation that finds no call of its policy in flight goes at
//! once, alone. Under load the calls of a policy come back with several waiting, and Redis runs
//! one `FCALL` for them: its dispatch, and the reads of a counter they share, once
//! (docs/performance.md).
//!
//! The calls run in a task of their own, not in the request that started them: a client that
//! hangs up does not cancel the call of the others, and a policy never stays marked in flight.
//! One call of a policy is in flight at a time in a process (each replica has its own).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::session::StoreError;

/// Most reservations in one call.
pub(super) const MAX_BATCH: usize = 16;

/// What runs a call: the operations in order, their replies in the same order (as many), or
/// one error for all of them.
pub(super) type Run<Op, Reply> = Arc<
    dyn Fn(Vec<Op>) -> Pin<Box<dyn Future<Output = Result<Vec<Reply>, StoreError>> + Send>>
        + Send
        + Sync,
>;

/// The policies with a call in flight, and what waits for each.
pub(super) struct Batches<Op, Reply> {
    waiting: Mutex<HashMap<String, Vec<Waiter<Op, Reply>>>>,
    run: Run<Op, Reply>,
}

struct Waiter<Op, Reply> {
    op: Op,
    answer: oneshot::Sender<Result<Reply, StoreError>>,
}

impl<Op: Send + 'static, Reply: Send + 'static> Batches<Op, Reply> {
    pub(super) fn new(run: Run<Op, Reply>) -> Arc<Self> {
        Arc::new(Self {
            waiting: Mutex::new(HashMap::new()),
            run,
        })
    }

    /// `op`'s reply, from the call it went in.
    pub(super) async fn submit(
        self: &Arc<Self>,
        policy: &str,
        op: Op,
    ) -> Result<Reply, StoreError> {
        let (answer, reply) = oneshot::channel();
        let waiter = Waiter { op, answer };
        let lead = {
            let mut waiting = self.lock();
            match waiting.get_mut(policy) {
                Some(queue) => {
                    queue.push(waiter);
                    None
                }
                None => {
                    waiting.insert(policy.to_owned(), Vec::new());
                    Some(waiter)
                }
            }
        };
        if let Some(waiter) = lead {
            tokio::spawn(Arc::clone(self).drive(policy.to_owned(), vec![waiter]));
        }
        // The driving task answers every waiter it takes (a sender dropped unanswered means
        // that task died: the call's outcome is unknown, refused like a Redis error).
        reply.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the ledger's call ended without an answer".into(),
            ))
        })
    }

    /// Runs `batch`, then what waited for `policy` meanwhile, until nothing waits.
    async fn drive(self: Arc<Self>, policy: String, mut batch: Vec<Waiter<Op, Reply>>) {
        // Should the call panic, the policy is no longer in flight and what waits for it is
        // refused (its senders dropped), rather than waiting for ever.
        let _unmark = Unmark {
            batches: &self,
            policy: &policy,
        };
        loop {
            let (ops, answers): (Vec<Op>, Vec<_>) =
                batch.drain(..).map(|w| (w.op, w.answer)).unzip();
            let count = ops.len();
            match (self.run)(ops).await {
                Ok(replies) if replies.len() == count => {
                    for (answer, reply) in answers.into_iter().zip(replies) {
                        let _ = answer.send(Ok(reply));
                    }
                }
                Ok(replies) => {
                    let e = format!("{} replies to a call of {count}", replies.len());
                    for answer in answers {
                        let _ = answer.send(Err(StoreError::Unavailable(e.clone())));
                    }
                }
                Err(e) => {
                    for answer in answers {
                        let _ = answer.send(Err(match &e {
                            StoreError::Unavailable(why) => StoreError::Unavailable(why.clone()),
                            StoreError::Corrupt(id) => StoreError::Corrupt(*id),
                        }));
                    }
                }
            }
            let mut waiting = self.lock();
            let Some(queue) = waiting.get_mut(&policy) else {
                return;
            };
            if queue.is_empty() {
                waiting.remove(&policy);
                return;
            }
            let take = queue.len().min(MAX_BATCH);
            batch.extend(queue.drain(..take));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Waiter<Op, Reply>>>> {
        // A panic elsewhere while it was held leaves the map as it was between two statements.
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Unmarks a policy whose driving task unwinds (see `Batches::drive`).
struct Unmark<'a, Op: Send + 'static, Reply: Send + 'static> {
    batches: &'a Batches<Op, Reply>,
    policy: &'a str,
}

impl<Op: Send + 'static, Reply: Send + 'static> Drop for Unmark<'_, Op, Reply> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.batches.lock().remove(self.policy);
        }
    }
}
