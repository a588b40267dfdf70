//! Calls of one policy's reservations gathered into one: the reservations that come for a
//! policy while its calls are in flight wait, and go together in the next call, at most
//! [`MAX_BATCH`] to a call (`reserve.lua` takes them in turn, each as a call of its own would).
//! Nothing waits for a timer: a reservation that finds no call of its policy in flight goes at
//! once, alone. Under load a policy's calls come back with several waiting, and Redis runs one
//! `FCALL` for them: its dispatch, `TIME` and the reads of the counters they share, once
//! (docs/performance.md, "What changed").
//!
//! At most [`MAX_IN_FLIGHT`] calls of a policy are in flight at once (a full batch does not
//! wait for a free one while fewer are), and at most [`MAX_WAITING`] reservations wait: beyond,
//! a reservation is refused at once (fail closed, retryable) rather than queued without end.
//! So a reservation waits for a few calls at most before its own, each bounded by the Redis
//! timeout; one whose client hung up meanwhile is dropped before its call, not reserved.
//!
//! The Redis ledger gathers a policy's checks (stubs, explanations: `check_only`) apart from its
//! signing runs, in a `Batches` of their own: each has its own calls in flight and its own bound
//! on those waiting (a policy so has up to twice the figures below), so a flood of checks
//! refuses no signing run.
//!
//! The calls run in tasks of their own, not in the requests that started them: a client that
//! hangs up cancels no one else's call. Each ledger (each replica) gathers its own.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::session::StoreError;

/// Most reservations in one call.
pub(super) const MAX_BATCH: usize = 32;

/// Most calls of one policy in flight at once. One: what comes for the policy while its call
/// is in flight waits for the next, and each call carries more. redis-server's CPU per
/// reservation falls with the reservations a call carries, well beyond the script's own
/// dispatch (each call is a wake-up, a socket read and a reply write on a busy machine, and
/// the script's state cold again), and the next call leaves as soon as one lands: a policy's
/// rate is at most MAX_BATCH a round trip, tens of thousands a second a replica even with a
/// millisecond to Redis (docs/performance.md, "What changed": 4 in flight, 16 a call, took
/// about a tenth more of redis-server's CPU a sponsorship in the closed loop).
pub(super) const MAX_IN_FLIGHT: usize = 1;

/// Most reservations of one policy waiting for a call: sixteen calls' worth, about 10 ms of
/// Redis' work, so that a burst against a healthy Redis waits (400 requests at once to one
/// replica were refused a tenth with four calls' worth), while a stalled one still refuses at
/// once what comes past them.
pub(super) const MAX_WAITING: usize = 16 * MAX_BATCH;

/// What makes a call: the operations in order, their replies in the same order (as many), or
/// one error for all of them.
pub(super) type CallFn<Op, Reply> = Arc<
    dyn Fn(Vec<Op>) -> Pin<Box<dyn Future<Output = Result<Vec<Reply>, StoreError>> + Send>>
        + Send
        + Sync,
>;

/// The policies with calls in flight, and what waits for each.
pub(super) struct Batches<Op, Reply> {
    policies: Mutex<HashMap<String, Policy<Op, Reply>>>,
    call: CallFn<Op, Reply>,
}

/// A policy with calls in flight (a policy with none has no entry).
struct Policy<Op, Reply> {
    in_flight: usize,
    waiting: VecDeque<Waiter<Op, Reply>>,
}

struct Waiter<Op, Reply> {
    op: Op,
    answer: oneshot::Sender<Result<Reply, StoreError>>,
}

impl<Op: Send + 'static, Reply: Send + 'static> Batches<Op, Reply> {
    pub(super) fn new(call: CallFn<Op, Reply>) -> Arc<Self> {
        Arc::new(Self {
            policies: Mutex::new(HashMap::new()),
            call,
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
        let start = {
            let mut policies = self.lock();
            match policies.get_mut(policy) {
                None => {
                    policies.insert(
                        policy.to_owned(),
                        Policy {
                            in_flight: 1,
                            waiting: VecDeque::new(),
                        },
                    );
                    Some(vec![waiter])
                }
                Some(p) => {
                    if p.waiting.len() >= MAX_WAITING {
                        // Those whose clients hung up hold no place.
                        p.waiting.retain(|w| !w.answer.is_closed());
                        if p.waiting.len() >= MAX_WAITING {
                            return Err(StoreError::Unavailable(format!(
                                "the ledger has {MAX_WAITING} reservations of this policy waiting"
                            )));
                        }
                    }
                    p.waiting.push_back(waiter);
                    // A full batch goes now if a call may still be in flight.
                    (p.waiting.len() >= MAX_BATCH && p.in_flight < MAX_IN_FLIGHT).then(|| {
                        p.in_flight += 1;
                        take(&mut p.waiting)
                    })
                }
            }
        };
        if let Some(batch) = start {
            // Counted in flight above: from here the flight ends only through its guard.
            let flight = Flight {
                batches: Arc::clone(self),
                policy: policy.to_owned(),
                landed: false,
            };
            tokio::spawn(flight.drive(batch));
        }
        // The driving task answers every waiter it takes (a sender dropped unanswered means
        // that task ended abnormally: the call's outcome is unknown, refused like a Redis error).
        reply.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the ledger's call ended without an answer".into(),
            ))
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Policy<Op, Reply>>> {
        // A panic elsewhere while it was held leaves the map as it was between two statements.
        self.policies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<Op: Send + 'static, Reply: Send + 'static> Flight<Op, Reply> {
    /// Runs `batch`, then what waits for the policy, until nothing does.
    async fn drive(mut self, mut batch: Vec<Waiter<Op, Reply>>) {
        let batches = Arc::clone(&self.batches);
        loop {
            let (ops, answers): (Vec<Op>, Vec<_>) =
                batch.drain(..).map(|w| (w.op, w.answer)).unzip();
            let count = ops.len();
            let replies = match (batches.call)(ops).await {
                Ok(replies) if replies.len() == count => Ok(replies),
                Ok(replies) => Err(StoreError::Unavailable(format!(
                    "{} replies to a call of {count} reservations",
                    replies.len()
                ))),
                Err(e) => Err(e),
            };
            match replies {
                Ok(replies) => {
                    for (answer, reply) in answers.into_iter().zip(replies) {
                        let _ = answer.send(Ok(reply));
                    }
                }
                Err(e) => {
                    for answer in answers {
                        let _ = answer.send(Err(e.clone()));
                    }
                }
            }
            let mut policies = batches.lock();
            let Some(p) = policies.get_mut(&self.policy) else {
                // (Defensive: while this flight is counted, no one removes its policy's entry.)
                self.landed = true;
                return;
            };
            batch = take(&mut p.waiting);
            if batch.is_empty() {
                p.in_flight -= 1;
                if p.in_flight == 0 {
                    policies.remove(&self.policy);
                }
                self.landed = true;
                return;
            }
        }
    }
}

/// The next call's waiters: up to MAX_BATCH, skipping those whose client is gone (their
/// operations are not reserved).
fn take<Op, Reply>(waiting: &mut VecDeque<Waiter<Op, Reply>>) -> Vec<Waiter<Op, Reply>> {
    let mut batch = Vec::with_capacity(waiting.len().min(MAX_BATCH));
    while batch.len() < MAX_BATCH
        && let Some(w) = waiting.pop_front()
    {
        if !w.answer.is_closed() {
            batch.push(w);
        }
    }
    batch
}

/// A call of a policy's in flight, counted when it starts (under the lock), and its driving
/// task: should the task end otherwise than by running out of waiters (its call panicked, the
/// runtime dropped it, even before it first ran), the call no longer counts as in flight, and
/// when none is left, what waits is refused (its senders dropped) rather than waiting for ever.
struct Flight<Op: Send + 'static, Reply: Send + 'static> {
    batches: Arc<Batches<Op, Reply>>,
    policy: String,
    landed: bool,
}

impl<Op: Send + 'static, Reply: Send + 'static> Drop for Flight<Op, Reply> {
    fn drop(&mut self) {
        if self.landed {
            return;
        }
        let mut policies = self.batches.lock();
        if let Some(p) = policies.get_mut(&self.policy) {
            p.in_flight = p.in_flight.saturating_sub(1);
            if p.in_flight == 0 {
                policies.remove(&self.policy);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::Semaphore;

    use super::*;

    /// Batches whose calls echo their operations, each call waiting for a permit of `gate`
    /// (but those of operations from 1000 on);
    /// `sizes` records each call's size.
    fn echo(gate: Arc<Semaphore>, sizes: Arc<Mutex<Vec<usize>>>) -> Arc<Batches<u32, u32>> {
        Batches::new(Arc::new(move |ops: Vec<u32>| {
            let (gate, sizes) = (gate.clone(), sizes.clone());
            Box::pin(async move {
                // (Operations from 1000 on are another policy's, never held.)
                let _permit = if ops.iter().all(|&op| op >= 1000) {
                    None
                } else {
                    Some(
                        gate.acquire()
                            .await
                            .map_err(|e| StoreError::Unavailable(e.to_string()))?,
                    )
                };
                sizes
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(ops.len());
                Ok(ops)
            })
        }))
    }

    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn waiters_go_together_each_with_its_own_reply() -> Result<(), StoreError> {
        let gate = Arc::new(Semaphore::new(0));
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let batches = echo(gate.clone(), sizes.clone());
        let tasks: Vec<_> = (0..40u32)
            .map(|i| {
                let b = batches.clone();
                tokio::spawn(async move { b.submit("p", i).await })
            })
            .collect();
        settle().await;
        gate.add_permits(1000);
        for (i, task) in tasks.into_iter().enumerate() {
            let reply = task
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))??;
            assert_eq!(reply as usize, i, "each its own reply");
        }
        let mut sizes = sizes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        sizes.sort_unstable();
        // The first alone (no call in flight); then, when it landed, MAX_BATCH (32) of the
        // 39 that waited for it, then the last 7 (one call in flight at a time).
        assert_eq!(sizes, vec![1, 7, 32]);
        assert!(batches.lock().is_empty(), "nothing left in flight");
        Ok(())
    }

    #[tokio::test]
    async fn a_failed_call_fails_each_of_its_reservations_and_no_more() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let batches: Arc<Batches<u32, u32>> = Batches::new(Arc::new(move |ops: Vec<u32>| {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                match n {
                    0 => Err(StoreError::Unavailable("down".into())),
                    1 => Ok(vec![0; ops.len() + 1]),
                    2 => panic!("a call that panics"),
                    _ => Ok(ops),
                }
            })
        }));
        for expected in ["down", "2 replies to a call of 1", "without an answer"] {
            match batches.submit("p", 1).await {
                Err(StoreError::Unavailable(why)) => assert!(why.contains(expected), "{why}"),
                other => panic!("{other:?}"),
            }
        }
        // The policy is not left in flight by the call that panicked.
        assert_eq!(batches.submit("p", 7).await.ok(), Some(7));
        assert!(batches.lock().is_empty());
    }

    #[tokio::test]
    async fn waiters_whose_clients_hung_up_hold_no_place_and_are_not_called() {
        let gate = Arc::new(Semaphore::new(0));
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let batches = echo(gate.clone(), sizes.clone());
        // Every call in flight, MAX_WAITING waiting.
        let in_flight = 1 + (MAX_IN_FLIGHT - 1) * MAX_BATCH;
        let tasks: Vec<_> = (0..(in_flight + MAX_WAITING) as u32)
            .map(|i| {
                let b = batches.clone();
                tokio::spawn(async move { b.submit("p", i).await })
            })
            .collect();
        settle().await;
        // The waiting ones' clients hang up.
        for task in &tasks[in_flight..] {
            task.abort();
        }
        settle().await;
        let b = batches.clone();
        let late = tokio::spawn(async move { b.submit("p", 777).await });
        settle().await;
        gate.add_permits(10_000);
        assert_eq!(
            late.await.ok().and_then(Result::ok),
            Some(777),
            "not refused"
        );
        for task in tasks.into_iter().take(in_flight) {
            assert!(matches!(task.await, Ok(Ok(_))));
        }
        // The calls: those in flight, then the late one alone.
        let called: usize = sizes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .sum();
        assert_eq!(called, in_flight + 1);
    }

    #[tokio::test]
    async fn what_waits_is_bounded_and_policies_do_not_wait_for_each_other() {
        let gate = Arc::new(Semaphore::new(0));
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let batches = echo(gate.clone(), sizes.clone());
        let total = MAX_IN_FLIGHT * MAX_BATCH + MAX_WAITING + 5;
        let tasks: Vec<_> = (0..total as u32)
            .map(|i| {
                let b = batches.clone();
                tokio::spawn(async move { b.submit("p", i).await })
            })
            .collect();
        settle().await;
        // Another policy's call goes while p's are all stuck.
        let other = batches.clone();
        let q = tokio::spawn(async move { other.submit("q", 5000).await });
        assert_eq!(q.await.ok().and_then(Result::ok), Some(5000));
        gate.add_permits(10_000);
        let mut refused = 0;
        for task in tasks {
            match task.await {
                Ok(Ok(_)) => {}
                Ok(Err(StoreError::Unavailable(why))) if why.contains("waiting") => refused += 1,
                other => panic!("{other:?}"),
            }
        }
        // In flight: one call of 1 and, while more may be, full batches of MAX_BATCH (the next
        // full batch found no room); then MAX_WAITING wait; the rest are refused.
        assert_eq!(
            refused,
            total - (1 + (MAX_IN_FLIGHT - 1) * MAX_BATCH + MAX_WAITING)
        );
    }
}
