//! Calls of one policy's reservations gathered into one: the reservations that come for a
//! policy while its calls are in flight wait, and go together in the next call, at most
//! [`MAX_BATCH`] to a call (`reserve.lua` takes them in turn, each as a call of its own would).
//! Nothing waits for a timer: a reservation that finds no call of its policy in flight starts
//! one at once. Before a call goes (unless it is full) its task yields to the runtime
//! (`tokio::task::yield_now`), and the call takes the reservations that came meanwhile; again
//! while each round brings some, up to [`MAX_YIELDS`] rounds. In tokio 1.54 a task that yields
//! runs again once its worker has no task ready (or at its upkeep, every 61 tasks run), after
//! polling for I/O where it can, and before the tasks that poll made ready: so the first round
//! lets run the work the service already has in hand, and the next ones the requests just
//! read, which reach their reservation meanwhile. When idle a call waits for one empty round
//! (at 300 sponsorships a second the p50 rose by 0.02-0.09 ms). This is the scheduler's behaviour,
//! not a documented promise: `a_call_takes_what_comes_while_its_task_yields` below fails if a
//! tokio upgrade changes it. Under load a policy's calls come back with several waiting, and
//! Redis runs one `FCALL` for them: its dispatch, `TIME` and the reads of the counters they
//! share, once (docs/performance.md, "What changed").
//!
//! A policy has one call in flight, and a second only for a full batch ([`MAX_IN_FLIGHT`]): a
//! call that lands while another is in flight takes what waits only if that fills a call, else
//! it leaves it to the other. So under load each call carries as many as came during the one
//! before and during its yields (what redis-server's CPU per reservation falls with), and only
//! a policy whose reservations come faster than one call a round trip takes them has two. At
//! most [`MAX_WAITING`] reservations wait: beyond, a reservation is refused at once (fail
//! closed, retryable) rather than queued without end. So a reservation waits for at most
//! `MAX_WAITING / MAX_BATCH / MAX_IN_FLIGHT` (8) rounds of calls before its own, each bounded
//! by the Redis timeout, and after two of the policy's calls in a row that fail whole what
//! waits is refused at once; one whose client hung up meanwhile (or while its call yields) is
//! dropped before its call, not reserved.
//!
//! The Redis ledger gathers a policy's checks (stubs, explanations: `check_only`) apart from its
//! signing runs, in a `Batches` of their own: each has its own calls in flight and its own bound
//! on those waiting (a policy so has up to twice the figures below), so a flood of checks
//! refuses no signing run.
//!
//! The calls run in tasks of their own, not in the requests that started them: a client that
//! hangs up cancels no one else's call. Each ledger (each replica) gathers its own.
//!
//! Each `Batches` counts the calls it made and the operations they carried ([`CallCounts`],
//! `/metrics`): over the calls, how full they are, which one policy's rate at one replica
//! during a call and its yields decides.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::session::StoreError;

/// Most reservations in one call (32 take redis-server about 0.6 ms). 64 filled calls further
/// (41 a call against 28 in the bench's closed loop under sessions) but spared redis-server
/// nothing, and the rate fell by a tenth (docs/performance.md, "Not there yet", 2026-12-05).
pub const MAX_BATCH: usize = 32;

/// Most calls of one policy in flight at once: one, and a second only while a full batch
/// waits (the module doc). Each call is a wake-up of redis-server, a socket read and a reply
/// write on a busy machine, with the script's state cold again, which costs it far more than
/// the script's own dispatch: fewer, fuller calls cost it less a reservation. With up to 4
/// calls of 16, each taking what waited when it landed, calls carried half as many and
/// redis-server took 5-7 % more CPU a sponsorship in the closed loop (docs/performance.md, "A
/// run", 0.3.12, and "What changed"). Two full calls a round trip keep a policy's rate where 4
/// of 16 had it.
pub const MAX_IN_FLIGHT: usize = 2;

/// Most reservations of one policy waiting for a call: sixteen calls' worth, about 10 ms of
/// Redis' work, so that a burst against a healthy Redis waits, while a stalled one still
/// refuses at once what comes past them. (400 requests at once at one replica: 23-25 refused
/// with 64 waiting, as 0.3.11 had, in three runs of a copy of the HTTP test
/// `a_burst_at_one_replica_waits_for_a_healthy_redis_rather_than_being_refused` that counted
/// the answers; the test fails with those bounds. With every call held, as in
/// `a_burst_of_400_waits_for_a_held_call` below, they held 1 + 3 x 16 + 64 and refused 287.)
pub const MAX_WAITING: usize = 16 * MAX_BATCH;

/// Most rounds of the runtime's ready tasks a call's task lets run before its call goes
/// (`tokio::task::yield_now`, the module doc), the second and third only while the round before
/// brought reservations: enough for what the service has in hand to reach the call. In the
/// bench's closed loops under sessions calls carried about 20 reservations with no round, 26
/// with one, 28-29 with up to three, and redis-server's CPU a sponsorship fell by 1-6 % with
/// one round and 2-5 % with three (the means of three sets of paired rounds; about 4 % without
/// sessions); at 0.6 of that rate, from 5.7-5.9 a call to 7.7-8.4 and 8.8-9.1, 9 % and 11 % less
/// (docs/performance.md, "A run", 0.3.13). When idle the first round brings nothing, and the
/// call goes after it.
const MAX_YIELDS: usize = 3;

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
    /// Calls made, and the operations they carried ([`Batches::counts`]).
    calls: AtomicU64,
    operations: AtomicU64,
}

/// Calls made and the operations they carried, since the ledger was made: over the calls, how
/// full calls are (`/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallCounts {
    /// Calls made, counted as they go: one that failed counts, even one that never reached
    /// Redis; one the ledger sent again after Redis lost its library counts once.
    pub calls: u64,
    /// Operations those calls carried: each as it was sent, whatever its answer (reserved, a
    /// repeat's stored answer, refused for a budget; for checks, checked, reserving nothing).
    pub operations: u64,
}

/// A policy with calls in flight (a policy with none has no entry).
struct Policy<Op, Reply> {
    in_flight: usize,
    waiting: VecDeque<Waiter<Op, Reply>>,
    /// Its calls that failed whole, in a row, as they landed (any that did not resets it).
    failed_in_a_row: usize,
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
            calls: AtomicU64::new(0),
            operations: AtomicU64::new(0),
        })
    }

    /// The calls made so far and the operations they carried (two counters read apart: a call
    /// made meanwhile may be in one and not yet in the other).
    pub(super) fn counts(&self) -> CallCounts {
        CallCounts {
            calls: self.calls.load(Ordering::Relaxed),
            operations: self.operations.load(Ordering::Relaxed),
        }
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
                            failed_in_a_row: 0,
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
            // Before a call that is not full, the tasks ready on this worker run (and it polls
            // for I/O) first: those that come to reserve for the policy meanwhile go in it.
            // Again while each round brings some, up to MAX_YIELDS rounds.
            for _ in 0..MAX_YIELDS {
                if batch.len() >= MAX_BATCH {
                    break;
                }
                let before = batch.len();
                tokio::task::yield_now().await;
                let mut policies = batches.lock();
                if let Some(p) = policies.get_mut(&self.policy) {
                    top_up(&mut batch, &mut p.waiting);
                }
                if batch.len() == before {
                    break;
                }
            }
            // Those whose clients hung up while it yielded are not reserved either. The outcome:
            // None when no call was made (all of them gone), else the error of a call that
            // failed whole, if it did.
            batch.retain(|w| !w.answer.is_closed());
            let called = if batch.is_empty() {
                None
            } else {
                Some(call(&batches, &mut batch).await)
            };
            let mut policies = batches.lock();
            let Some(p) = policies.get_mut(&self.policy) else {
                // (Defensive: while this flight is counted, no one removes its policy's entry.)
                self.landed = true;
                return;
            };
            match called {
                Some(Some(_)) => p.failed_in_a_row += 1,
                Some(None) => p.failed_in_a_row = 0,
                None => {}
            }
            if let Some(Some(e)) = called
                && p.failed_in_a_row >= 2
            {
                // A call fails whole only for what Redis did to it (a timeout, a lost
                // connection, a refusal of every write, replicas that did not acknowledge).
                // After one such call of the policy's the next goes as usual (the failure may
                // have passed); after two in a row (of either call in flight), what waits would
                // most likely fail the same way, each round of calls after its own timeout: it
                // is refused now, as it would be once the queue is full (nothing of it was
                // sent).
                let e = StoreError::Unavailable(format!(
                    "not sent to Redis: the calls before it failed (the last: {e})"
                ));
                for w in p.waiting.drain(..) {
                    let _ = w.answer.send(Err(e.clone()));
                }
            }
            // A second call in flight goes on only with a full batch; else what waits goes in
            // the other's next call.
            batch = if p.in_flight > 1 && p.waiting.len() < MAX_BATCH {
                Vec::new()
            } else {
                take(&mut p.waiting)
            };
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

/// Makes the call of `batch`'s operations and answers each waiter (all of `batch` taken);
/// returns the error of a call that failed whole (every waiter got it), if it did.
async fn call<Op, Reply>(
    batches: &Batches<Op, Reply>,
    batch: &mut Vec<Waiter<Op, Reply>>,
) -> Option<StoreError> {
    let (ops, answers): (Vec<Op>, Vec<_>) = batch.drain(..).map(|w| (w.op, w.answer)).unzip();
    let count = ops.len();
    batches
        .operations
        .fetch_add(count as u64, Ordering::Relaxed);
    batches.calls.fetch_add(1, Ordering::Relaxed);
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
            None
        }
        Err(e) => {
            for answer in answers {
                let _ = answer.send(Err(e.clone()));
            }
            Some(e)
        }
    }
}

/// The next call's waiters: up to MAX_BATCH, skipping those whose client is gone (their
/// operations are not reserved).
fn take<Op, Reply>(waiting: &mut VecDeque<Waiter<Op, Reply>>) -> Vec<Waiter<Op, Reply>> {
    let mut batch = Vec::with_capacity(waiting.len().min(MAX_BATCH));
    top_up(&mut batch, waiting);
    batch
}

/// `batch` filled from the front of `waiting` up to MAX_BATCH, dropping the waiters whose
/// client is gone (their operations are not reserved).
fn top_up<Op, Reply>(
    batch: &mut Vec<Waiter<Op, Reply>>,
    waiting: &mut VecDeque<Waiter<Op, Reply>>,
) {
    while batch.len() < MAX_BATCH
        && let Some(w) = waiting.pop_front()
    {
        if !w.answer.is_closed() {
            batch.push(w);
        }
    }
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

    /// The sizes of the calls made, in order.
    type Sizes = Arc<Mutex<Vec<usize>>>;

    /// A gate with no permits, the sizes of the calls made, and batches whose calls echo their
    /// operations, each call waiting for a permit of the gate and using it up (but those of
    /// operations from 1000 on): a permit lets one call land.
    fn echo() -> (Arc<Semaphore>, Sizes, Arc<Batches<u32, u32>>) {
        let gate = Arc::new(Semaphore::new(0));
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let (held, made) = (gate.clone(), sizes.clone());
        let batches = Batches::new(Arc::new(move |ops: Vec<u32>| {
            let (gate, sizes) = (held.clone(), made.clone());
            Box::pin(async move {
                // (Operations from 1000 on are another policy's, never held.)
                if ops.iter().any(|&op| op < 1000) {
                    gate.acquire()
                        .await
                        .map_err(|e| StoreError::Unavailable(e.to_string()))?
                        .forget();
                }
                sizes
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(ops.len());
                Ok(ops)
            })
        }));
        (gate, sizes, batches)
    }

    /// How many of `tasks` were reserved and how many refused for want of room to wait
    /// (anything else fails the test).
    async fn reserved_and_refused(
        tasks: Vec<tokio::task::JoinHandle<Result<u32, StoreError>>>,
    ) -> (usize, usize) {
        let (mut reserved, mut refused) = (0, 0);
        for task in tasks {
            match task.await {
                Ok(Ok(_)) => reserved += 1,
                Ok(Err(StoreError::Unavailable(why))) if why.contains("waiting") => refused += 1,
                other => panic!("{other:?}"),
            }
        }
        (reserved, refused)
    }

    /// Batches whose calls, counted in `calls`, each wait for a permit of `gate` and use it
    /// up, then fail whole ("timed out") where `fails` says so of their number (from 0), else
    /// echo their operations.
    fn gated(
        gate: Arc<Semaphore>,
        calls: Arc<AtomicUsize>,
        fails: fn(usize) -> bool,
    ) -> Arc<Batches<u32, u32>> {
        Batches::new(Arc::new(move |ops: Vec<u32>| {
            let (gate, calls) = (gate.clone(), calls.clone());
            Box::pin(async move {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                gate.acquire()
                    .await
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?
                    .forget();
                if fails(n) {
                    Err(StoreError::Unavailable("timed out".into()))
                } else {
                    Ok(ops)
                }
            })
        }))
    }

    /// `ids` submitted to policy `p` at once, each in a task of its own.
    fn submit_all(
        batches: &Arc<Batches<u32, u32>>,
        ids: std::ops::Range<u32>,
    ) -> Vec<tokio::task::JoinHandle<Result<u32, StoreError>>> {
        ids.map(|i| {
            let b = batches.clone();
            tokio::spawn(async move { b.submit("p", i).await })
        })
        .collect()
    }

    /// What `Batches::counts` says of `calls` carrying `operations`.
    fn sent(calls: u64, operations: u64) -> CallCounts {
        CallCounts { calls, operations }
    }

    /// The sizes of the calls made so far, in order.
    fn calls_made(sizes: &Mutex<Vec<usize>>) -> Vec<usize> {
        sizes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A call of 1 in flight (submitted first, alone), a full one of MAX_BATCH beside it, then
    /// 5 waiting (ids 100-104): the submitters' tasks.
    async fn a_call_of_1_a_full_one_and_5_waiting(
        batches: &Arc<Batches<u32, u32>>,
    ) -> Vec<tokio::task::JoinHandle<Result<u32, StoreError>>> {
        let mut tasks = submit_all(batches, 0..1);
        settle().await;
        tasks.extend(submit_all(batches, 1..1 + MAX_BATCH as u32));
        settle().await;
        tasks.extend(submit_all(batches, 100..105));
        settle().await;
        assert_eq!(batches.lock()["p"].in_flight, 2);
        tasks
    }

    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn waiters_go_together_each_with_its_own_reply() -> Result<(), StoreError> {
        let (gate, sizes, batches) = echo();
        let n = MAX_BATCH + 8;
        let tasks = submit_all(&batches, 0..n as u32);
        settle().await;
        gate.add_permits(1000);
        for (i, task) in tasks.into_iter().enumerate() {
            let reply = task
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))??;
            assert_eq!(reply as usize, i, "each its own reply");
        }
        // The MAX_BATCH after the first filled a call, which went at once as a second in
        // flight; the first's task yielded before its call, which took the 7 after them and
        // went second.
        assert_eq!(calls_made(&sizes), vec![MAX_BATCH, n - MAX_BATCH]);
        assert!(batches.lock().is_empty(), "nothing left in flight");
        Ok(())
    }

    /// A call's task yields before its call goes (unless full): what comes meanwhile goes in
    /// it, and it yields again while each round brings some. Here 5 wait while a call of 1 is
    /// in flight; it lands, and 4 more come right after it does (ready to run behind its task,
    /// as requests read off sockets then are), and 3 a round later: the next call takes all 12.
    /// Without the yields it takes the 5 and the rest go after it; with one round only, 9 and
    /// then 3. (It shows two rounds or more, not the third.)
    #[tokio::test]
    async fn a_call_takes_what_comes_while_its_task_yields() {
        let (gate, sizes, batches) = echo();
        let mut tasks = submit_all(&batches, 0..1);
        settle().await;
        tasks.extend(submit_all(&batches, 1..6));
        settle().await;
        gate.add_permits(1000);
        tasks.extend(submit_all(&batches, 6..10));
        // (A task that yields, then starts the 3: they first run after the call's task has
        // run again once.)
        let b = batches.clone();
        let late = tokio::spawn(async move {
            tokio::task::yield_now().await;
            submit_all(&b, 10..13)
        });
        for task in tasks.into_iter().chain(late.await.into_iter().flatten()) {
            assert!(matches!(task.await, Ok(Ok(_))));
        }
        assert_eq!(calls_made(&sizes), vec![1, 12]);
        assert_eq!(batches.counts(), sent(2, 13));
        assert!(batches.lock().is_empty());
    }

    /// A second call in flight is for a full batch only: one that lands while the other is in
    /// flight leaves what waits (less than a full batch) to the other's next call.
    #[tokio::test]
    async fn a_second_call_in_flight_goes_for_a_full_batch_and_no_further() {
        let (gate, sizes, batches) = echo();
        let mut tasks = a_call_of_1_a_full_one_and_5_waiting(&batches).await;
        // The call of 1 lands (the gate's permits go in turn): the 5 stay waiting.
        gate.add_permits(1);
        settle().await;
        {
            let policies = batches.lock();
            assert_eq!(
                (policies["p"].in_flight, policies["p"].waiting.len()),
                (1, 5)
            );
        }
        // 3 more come; then the full call lands, and takes the 8 in one call.
        tasks.extend(submit_all(&batches, 200..203));
        settle().await;
        gate.add_permits(1000);
        for task in tasks {
            assert!(matches!(task.await, Ok(Ok(_))));
        }
        let sizes = calls_made(&sizes);
        assert_eq!(sizes, vec![1, MAX_BATCH, 8]);
        assert!(batches.lock().is_empty());
    }

    /// After two calls in a row fail whole (Redis timed out, say), what waits is refused at
    /// once, rather than each call of it failing after a timeout of its own; after one, the
    /// next call goes as usual.
    #[tokio::test]
    async fn two_failed_calls_in_a_row_refuse_what_waits() {
        let (gate, calls) = (Arc::new(Semaphore::new(0)), Arc::new(AtomicUsize::new(0)));
        let batches = gated(gate.clone(), calls.clone(), |_| true);
        // A call of 1, then 31 waiting (less than a full batch: no second call).
        let mut tasks = submit_all(&batches, 0..1);
        settle().await;
        tasks.extend(submit_all(&batches, 1..32));
        settle().await;
        // It fails; the 31 go in the next call, and 20 more wait for it.
        gate.add_permits(1);
        settle().await;
        assert_eq!(calls.load(Ordering::SeqCst), 2, "the next call went");
        tasks.extend(submit_all(&batches, 100..120));
        settle().await;
        // It fails too: the 20 are refused, not sent.
        gate.add_permits(1);
        let mut refused = 0;
        for task in tasks {
            // (Sent in a call of their own, they would wait for a permit that never comes.)
            let answer = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
            match answer {
                Ok(Ok(Err(StoreError::Unavailable(why)))) if why == "timed out" => {}
                Ok(Ok(Err(StoreError::Unavailable(why)))) if why.starts_with("not sent") => {
                    refused += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(refused, 20);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "the 20 waiting were not sent"
        );
        assert!(batches.lock().is_empty());
        // The next goes as usual.
        gate.add_permits(1);
        assert!(batches.submit("p", 9).await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    /// The run of failures is the policy's, counted across its calls in flight: the call of 1
    /// fails, then the full call beside it fails too, and the 5 that waited meanwhile are
    /// refused unsent (two in a row); what either call carried gets the error of its call.
    #[tokio::test]
    async fn failures_of_two_calls_in_flight_count_as_a_run() {
        let (gate, calls) = (Arc::new(Semaphore::new(0)), Arc::new(AtomicUsize::new(0)));
        let batches = gated(gate.clone(), calls.clone(), |_| true);
        let tasks = a_call_of_1_a_full_one_and_5_waiting(&batches).await;
        // The call of 1 fails: one failure, and it leaves the 5 to the other call.
        gate.add_permits(1);
        settle().await;
        {
            let policies = batches.lock();
            let p = &policies["p"];
            assert_eq!((p.in_flight, p.waiting.len(), p.failed_in_a_row), (1, 5, 1));
        }
        // The full one fails: two in a row.
        gate.add_permits(1);
        let (mut failed, mut refused) = (0, 0);
        for task in tasks {
            match tokio::time::timeout(std::time::Duration::from_secs(5), task).await {
                Ok(Ok(Err(StoreError::Unavailable(why)))) if why == "timed out" => failed += 1,
                Ok(Ok(Err(StoreError::Unavailable(why)))) if why.starts_with("not sent") => {
                    refused += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!((failed, refused), (1 + MAX_BATCH, 5));
        assert_eq!(calls.load(Ordering::SeqCst), 2, "the 5 were not sent");
        // Calls that failed count as made; the refused, never sent, do not.
        assert_eq!(batches.counts(), sent(2, 1 + MAX_BATCH as u64));
        assert!(batches.lock().is_empty());
    }

    /// A call that does not fail ends a run of failures: calls that fail, succeed, fail and
    /// succeed refuse nothing they were not sent with.
    #[tokio::test]
    async fn a_call_that_lands_ends_a_run_of_failures() {
        let (gate, calls) = (Arc::new(Semaphore::new(0)), Arc::new(AtomicUsize::new(0)));
        // The 1st, 3rd, … fail.
        let batches = gated(gate.clone(), calls.clone(), |n| n % 2 == 0);
        // A call of 1, then each time it lands 10 more waiting for the next.
        let mut tasks = submit_all(&batches, 0..1);
        for round in 1..=3u32 {
            settle().await;
            tasks.extend(submit_all(&batches, round * 100..round * 100 + 10));
            settle().await;
            gate.add_permits(1);
        }
        settle().await;
        gate.add_permits(1);
        let (mut failed, mut landed) = (0, 0);
        for task in tasks {
            match tokio::time::timeout(std::time::Duration::from_secs(5), task).await {
                Ok(Ok(Ok(_))) => landed += 1,
                Ok(Ok(Err(StoreError::Unavailable(why)))) if why == "timed out" => failed += 1,
                other => panic!("{other:?}"),
            }
        }
        // Calls of 1 (failed), 10 (landed), 10 (failed), 10 (landed).
        assert_eq!((failed, landed), (11, 20));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    /// A burst of 400 at a policy whose call is held waits, none refused (0.3.11's 4 calls of
    /// 16 and 64 waiting held 113, and refused 287).
    #[tokio::test]
    async fn a_burst_of_400_waits_for_a_held_call() {
        let (gate, sizes, batches) = echo();
        let tasks = submit_all(&batches, 0..400u32);
        settle().await;
        gate.add_permits(1000);
        for (i, task) in tasks.into_iter().enumerate() {
            assert_eq!(task.await.ok().and_then(Result::ok), Some(i as u32));
        }
        let sizes = calls_made(&sizes);
        assert_eq!(sizes.iter().sum::<usize>(), 400);
        assert!(sizes.iter().all(|&n| n <= MAX_BATCH), "{sizes:?}");
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
        let (gate, sizes, batches) = echo();
        // Both calls in flight (one of 1, one full), MAX_WAITING waiting.
        let in_flight = 1 + (MAX_IN_FLIGHT - 1) * MAX_BATCH;
        let mut tasks = submit_all(&batches, 0..1);
        settle().await;
        tasks.extend(submit_all(&batches, 1..(in_flight + MAX_WAITING) as u32));
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
        let called: usize = calls_made(&sizes).iter().sum();
        assert_eq!(called, in_flight + 1);
    }

    /// A waiter whose client hangs up while the call that took it yields is not sent: the call
    /// of 1 lands and takes the 5 waiting, which hang up before its task runs again.
    #[tokio::test]
    async fn waiters_that_hang_up_while_their_call_yields_are_not_sent() {
        let (gate, sizes, batches) = echo();
        let first = submit_all(&batches, 0..1);
        settle().await;
        // 5 submitted from this task, each polled once (so waiting), dropped below.
        let mut waiting: Vec<_> = (1..6).map(|i| Box::pin(batches.submit("p", i))).collect();
        for w in &mut waiting {
            std::future::poll_fn(|cx| {
                assert!(w.as_mut().poll(cx).is_pending());
                std::task::Poll::Ready(())
            })
            .await;
        }
        assert_eq!(batches.lock()["p"].waiting.len(), 5);
        gate.add_permits(1000);
        // One round: the call lands and takes the 5, its task yields, and this one runs first.
        tokio::task::yield_now().await;
        assert!(batches.lock()["p"].waiting.is_empty(), "taken");
        assert_eq!(calls_made(&sizes), vec![1], "not yet sent");
        drop(waiting);
        for task in first {
            assert!(matches!(task.await, Ok(Ok(0))));
        }
        settle().await;
        assert_eq!(calls_made(&sizes), vec![1]);
        // (Nor counted: `/metrics` shows the calls made and what they carried.)
        assert_eq!(batches.counts(), sent(1, 1));
        assert!(batches.lock().is_empty());
    }

    /// A flood holds at most MAX_IN_FLIGHT full calls and MAX_WAITING waiting, however the
    /// first call fills as its task yields: of 600 at once, then 100 more, 576 are reserved,
    /// in calls of at most MAX_BATCH, and the rest refused.
    #[tokio::test]
    async fn a_flood_holds_at_most_two_full_calls_and_the_queue() {
        let (gate, sizes, batches) = echo();
        let mut tasks = submit_all(&batches, 0..600);
        settle().await;
        tasks.extend(submit_all(&batches, 600..700));
        settle().await;
        gate.add_permits(10_000);
        let (reserved, refused) = reserved_and_refused(tasks).await;
        let held = MAX_IN_FLIGHT * MAX_BATCH + MAX_WAITING;
        assert_eq!((reserved, refused), (held, 700 - held));
        let sizes = calls_made(&sizes);
        assert!(sizes.iter().all(|&n| n <= MAX_BATCH), "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), held);
    }

    #[tokio::test]
    async fn what_waits_is_bounded_and_policies_do_not_wait_for_each_other() {
        let (gate, _, batches) = echo();
        let total = MAX_IN_FLIGHT * MAX_BATCH + MAX_WAITING + 5;
        let mut tasks = submit_all(&batches, 0..1);
        settle().await;
        tasks.extend(submit_all(&batches, 1..total as u32));
        settle().await;
        // Another policy's call goes while p's are all stuck.
        let other = batches.clone();
        let q = tokio::spawn(async move { other.submit("q", 5000).await });
        assert_eq!(q.await.ok().and_then(Result::ok), Some(5000));
        gate.add_permits(10_000);
        let (_, refused) = reserved_and_refused(tasks).await;
        // In flight: one call of 1 and a full one of MAX_BATCH (the next full batch found no
        // room); then MAX_WAITING wait; the rest are refused.
        assert_eq!(
            refused,
            total - (1 + (MAX_IN_FLIGHT - 1) * MAX_BATCH + MAX_WAITING)
        );
    }
}
