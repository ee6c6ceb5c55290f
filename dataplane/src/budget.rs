//! The retry budget (a port of `RetryBudget` in sidecar/retry.py): retries in
//! flight may not exceed max(budget_min, budget_ratio x active calls).
//!
//! A retry over the budget waits its turn (first come, first served) for a
//! bounded time instead of failing at once: the instance that just died had
//! every caller's call in flight, so its callers all retry at the same
//! instant, and turning the fourth one away would fail a call that a moment
//! later had somewhere to go. Waiting costs the peers nothing, so the cap on
//! concurrent retries still protects a dying cluster.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;

#[derive(Debug)]
struct State {
    active: u32,
    retrying: u32,
    /// Waiting retries, oldest first. A waiter is handed a slot by being
    /// popped under the lock, with `retrying` counted for it at that moment:
    /// whether it is still queued says, alone, whether it holds a slot.
    waiters: VecDeque<(u64, oneshot::Sender<()>)>,
    next_waiter: u64,
}

#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min: u32,
    state: Mutex<State>,
}

impl RetryBudget {
    pub fn new(ratio: f64, min: u32) -> RetryBudget {
        RetryBudget {
            ratio,
            min,
            state: Mutex::new(State {
                active: 0,
                retrying: 0,
                waiters: VecDeque::new(),
                next_waiter: 0,
            }),
        }
    }

    pub fn from_policy(policy: &crate::retry::RetryPolicy) -> RetryBudget {
        RetryBudget::new(policy.budget_ratio, policy.budget_min)
    }

    /// A panic elsewhere while holding the lock leaves plain counters behind,
    /// still consistent enough to keep counting with.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn limit(&self, state: &State) -> u32 {
        // Python's int(ratio * active): truncation (a saturating cast here).
        let share = (self.ratio * f64::from(state.active)) as u32;
        self.min.max(share)
    }

    /// Retry slots allowed now.
    pub fn current_limit(&self) -> u32 {
        let state = self.lock();
        self.limit(&state)
    }

    pub fn active(&self) -> u32 {
        self.lock().active
    }

    pub fn retrying(&self) -> u32 {
        self.lock().retrying
    }

    /// A call began: the limit may have grown enough to let a waiter go.
    pub fn call_started(&self) {
        let mut state = self.lock();
        state.active = state.active.saturating_add(1);
        self.hand_over(&mut state);
    }

    pub fn call_ended(&self) {
        let mut state = self.lock();
        state.active = state.active.saturating_sub(1);
    }

    /// A slot now, if one is free and nobody waits for one (no queue jumping).
    pub fn try_acquire(&self) -> bool {
        let mut state = self.lock();
        if !state.waiters.is_empty() || state.retrying >= self.limit(&state) {
            return false;
        }
        state.retrying += 1;
        true
    }

    /// Take a retry slot, waiting at most `wait` for one to free, in arrival
    /// order. A slot handed over just as the wait ran out is kept (true).
    /// Dropping the future releases a slot handed to it, so a call cancelled
    /// while waiting leaks nothing.
    pub async fn acquire(&self, wait: Duration) -> bool {
        let (id, turn) = {
            let mut state = self.lock();
            if state.waiters.is_empty() && state.retrying < self.limit(&state) {
                state.retrying += 1;
                return true;
            }
            if wait.is_zero() {
                return false;
            }
            let (tx, rx) = oneshot::channel();
            let id = state.next_waiter;
            state.next_waiter = state.next_waiter.wrapping_add(1);
            state.waiters.push_back((id, tx));
            (id, rx)
        };
        let mut waiting = Waiting {
            budget: self,
            id,
            done: false,
        };
        // The sender is only dropped after popping (a slot handed over) or by
        // `leave`, so either result of the turn means the same: check the queue.
        let _ = tokio::time::timeout(wait, turn).await;
        waiting.done = true;
        self.leave(id)
    }

    /// Out of the queue: true if a slot was handed over, false if still
    /// waiting (then no longer).
    fn leave(&self, id: u64) -> bool {
        let mut state = self.lock();
        match state.waiters.iter().position(|(w, _)| *w == id) {
            Some(at) => {
                state.waiters.remove(at);
                false
            }
            None => true,
        }
    }

    pub fn release(&self) {
        let mut state = self.lock();
        state.retrying = state.retrying.saturating_sub(1);
        self.hand_over(&mut state);
    }

    fn hand_over(&self, state: &mut State) {
        while state.retrying < self.limit(state) {
            let Some((_, turn)) = state.waiters.pop_front() else {
                break;
            };
            state.retrying += 1;
            // A waiter whose future is being dropped gets the slot all the
            // same; its drop gives it back.
            let _ = turn.send(());
        }
    }
}

/// Leaves the queue if `acquire` is dropped while waiting, giving back a
/// slot that was handed over in the meantime.
struct Waiting<'a> {
    budget: &'a RetryBudget,
    id: u64,
    done: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.done && self.budget.leave(self.id) {
            self.budget.release();
        }
    }
}

#[cfg(test)]
mod tests {
    //! The budget cases of tests/unit/test_retry.py, on tokio's paused clock.
    use super::*;
    use std::future::Future;
    use std::pin::{pin, Pin};
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};
    use tokio::task::yield_now;

    fn budget(active: u32) -> Arc<RetryBudget> {
        let budget = RetryBudget::from_policy(&crate::retry::RetryPolicy::default());
        for _ in 0..active {
            budget.call_started();
        }
        Arc::new(budget)
    }

    fn poll_once<F: Future>(future: Pin<&mut F>) -> Poll<F::Output> {
        future.poll(&mut Context::from_waker(Waker::noop()))
    }

    fn spawn_acquire(budget: &Arc<RetryBudget>, wait: Duration) -> tokio::task::JoinHandle<bool> {
        let budget = budget.clone();
        tokio::spawn(async move { budget.acquire(wait).await })
    }

    #[test]
    fn budget_allows_twenty_percent_of_active_with_a_minimum_of_three() {
        let small = budget(4);
        let got: Vec<bool> = (0..4).map(|_| small.try_acquire()).collect();
        assert_eq!(got, [true, true, true, false]);
        small.release();
        assert!(small.try_acquire());
        let big = budget(50);
        assert_eq!((0..20).filter(|_| big.try_acquire()).count(), 10);
        assert_eq!(big.current_limit(), 10);
        assert_eq!(budget(16).current_limit(), 3, "int(0.2 x 16) = 3");
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_over_the_budget_waits_for_a_slot_in_arrival_order() {
        let budget = budget(4);
        assert!((0..3).all(|_| budget.try_acquire()));
        let first = spawn_acquire(&budget, Duration::from_secs(5));
        let second = spawn_acquire(&budget, Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!first.is_finished() && !second.is_finished());
        assert!(!budget.try_acquire(), "nobody jumps the queue");
        budget.release();
        assert!(first.await.unwrap());
        assert!(!second.is_finished());
        assert_eq!(budget.retrying(), 3);
        budget.release();
        assert!(second.await.unwrap());
        assert_eq!(budget.retrying(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_retry_gives_up_after_its_wait_and_holds_nothing() {
        let budget = budget(1);
        assert!((0..3).all(|_| budget.try_acquire()));
        assert!(!budget.acquire(Duration::ZERO).await);
        let start = tokio::time::Instant::now();
        assert!(!budget.acquire(Duration::from_millis(20)).await);
        assert_eq!(start.elapsed(), Duration::from_millis(20));
        assert_eq!(budget.retrying(), 3);
        for _ in 0..3 {
            budget.release();
        }
        assert_eq!(budget.retrying(), 0);
        assert!(budget.acquire(Duration::ZERO).await);
    }

    #[tokio::test(start_paused = true)]
    async fn more_active_calls_let_a_waiting_retry_go() {
        let budget = budget(15); // limit max(3, 0.2 x 15) = 3
        assert!((0..3).all(|_| budget.try_acquire()));
        let waiting = spawn_acquire(&budget, Duration::from_secs(5));
        yield_now().await;
        budget.call_started(); // 16 active: limit 3 still
        yield_now().await;
        assert!(!waiting.is_finished());
        for _ in 0..4 {
            budget.call_started(); // 20 active: limit 4
        }
        assert!(waiting.await.unwrap());
        assert_eq!(budget.retrying(), 4);
        assert_eq!(budget.active(), 20);
        budget.call_ended();
        assert_eq!(budget.active(), 19);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_cancelled_while_waiting_leaks_no_slot() {
        let budget = budget(1);
        assert!((0..3).all(|_| budget.try_acquire()));
        let waiting = spawn_acquire(&budget, Duration::from_secs(5));
        yield_now().await;
        waiting.abort();
        assert!(waiting.await.unwrap_err().is_cancelled());
        budget.release();
        assert_eq!(
            budget.retrying(),
            2,
            "the slot is not handed to the cancelled call"
        );

        // Handed over, then cancelled before it could run: the slot comes back.
        let waiting = spawn_acquire(&budget, Duration::from_secs(5));
        assert!(budget.try_acquire()); // before the task even ran
        yield_now().await;
        budget.release(); // hands the slot to the waiting call...
        assert_eq!(budget.retrying(), 3);
        waiting.abort(); // ...which is cancelled before it resumes
        assert!(waiting.await.unwrap_err().is_cancelled());
        assert_eq!(budget.retrying(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_wait_gives_back_a_slot_handed_to_it() {
        let budget = budget(1);
        assert!((0..3).all(|_| budget.try_acquire()));
        {
            let mut wait = pin!(budget.acquire(Duration::from_secs(5)));
            assert!(poll_once(wait.as_mut()).is_pending());
            budget.release();
            assert_eq!(budget.retrying(), 3, "handed to the waiter");
        }
        assert_eq!(budget.retrying(), 2, "given back on drop");
        assert!(budget.try_acquire());
        {
            let mut wait = pin!(budget.acquire(Duration::from_secs(5)));
            assert!(poll_once(wait.as_mut()).is_pending());
        }
        budget.release();
        assert!(budget.try_acquire(), "a dropped waiter leaves the queue");
        assert_eq!(budget.retrying(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_handed_over_as_the_wait_runs_out_is_kept() {
        let budget = budget(1);
        assert!((0..3).all(|_| budget.try_acquire()));
        let mut wait = pin!(budget.acquire(Duration::from_millis(10)));
        assert!(poll_once(wait.as_mut()).is_pending());
        tokio::time::advance(Duration::from_millis(10)).await; // the wait has run out...
        budget.release(); // ...and a slot is handed over before it resumes
        assert_eq!(poll_once(wait.as_mut()), Poll::Ready(true));
        assert_eq!(budget.retrying(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_first_come_first_served() {
        let budget = budget(0);
        assert!((0..3).all(|_| budget.try_acquire()));
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..5 {
            let (budget, order) = (budget.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                if budget.acquire(Duration::from_secs(5)).await {
                    order.lock().unwrap().push(i);
                    budget.release();
                }
            }));
            yield_now().await;
        }
        budget.release();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3, 4]);
        assert_eq!(budget.retrying(), 2);
    }

    #[test]
    fn counters_never_go_below_zero() {
        let budget = budget(0);
        budget.call_ended();
        budget.release();
        assert_eq!((budget.active(), budget.retrying()), (0, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shared_between_threads_it_never_exceeds_its_limit() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<RetryBudget>();
        let budget = budget(10); // limit 3
        let peak = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let (budget, peak) = (budget.clone(), peak.clone());
                tokio::spawn(async move {
                    let wait = Duration::from_millis(i % 3);
                    if budget.acquire(wait).await {
                        peak.fetch_max(budget.retrying(), std::sync::atomic::Ordering::Relaxed);
                        yield_now().await;
                        budget.release();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(budget.retrying(), 0);
        assert!(peak.load(std::sync::atomic::Ordering::Relaxed) <= 3);
    }
}
