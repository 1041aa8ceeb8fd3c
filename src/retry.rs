//! The one retry helper: capped exponential backoff with jitter, a bound on tries
//! and on total waiting, and a stop that ends any wait at once.
//!
//! Jitter matters here because retries are synchronised by the events that cause
//! them: when a gateway restarts, every agent's SIGNALs and announcements fail at
//! the same moment, and with plain doubling they would all come back in the same
//! millisecond, again and again. Each delay is drawn from `[nominal × (1 − jitter),
//! nominal]`, so a retry never waits longer than the plain schedule did, and the
//! retries of many agents spread over half of each step.

use std::future::Future;
use std::time::Duration;

use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// How a loop retries: the first delay, doubling up to `cap`, each shortened by up
/// to `jitter` of itself, for at most `max_tries` retries and `max_wait` of waiting
/// in total (`None`: until stopped).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub first: Duration,
    pub cap: Duration,
    /// In `[0, 1]`: the fraction a delay may be shortened by at random.
    pub jitter: f64,
    pub max_tries: Option<u32>,
    /// The sum of the delays handed out; the last one is cut to fit.
    pub max_wait: Option<Duration>,
}

impl Policy {
    /// Doubling from `first` up to `cap`, half-width jitter, no bound but a stop.
    pub const fn doubling(first: Duration, cap: Duration) -> Policy {
        Policy {
            first,
            cap,
            jitter: DEFAULT_JITTER,
            max_tries: None,
            max_wait: None,
        }
    }

    pub const fn with_max_tries(mut self, n: u32) -> Policy {
        self.max_tries = Some(n);
        self
    }

    pub const fn with_max_wait(mut self, d: Duration) -> Policy {
        self.max_wait = Some(d);
        self
    }

    pub const fn with_jitter(mut self, jitter: f64) -> Policy {
        self.jitter = jitter;
        self
    }
}

/// A delay is at least half its nominal value: enough spread to break up a herd of
/// agents, and the backoff still grows.
pub const DEFAULT_JITTER: f64 = 0.5;

/// The delays of one retry loop, in order; `None` once its tries or its waiting
/// are spent.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: Policy,
    nominal: Duration,
    tries: u32,
    waited: Duration,
    rng: fastrand::Rng,
}

impl Backoff {
    pub fn new(policy: Policy) -> Backoff {
        Backoff::from_rng(policy, fastrand::Rng::new())
    }

    /// The same delays for the same seed (tests, simulations).
    pub fn with_seed(policy: Policy, seed: u64) -> Backoff {
        Backoff::from_rng(policy, fastrand::Rng::with_seed(seed))
    }

    fn from_rng(policy: Policy, rng: fastrand::Rng) -> Backoff {
        Backoff {
            nominal: policy.first.min(policy.cap),
            policy,
            tries: 0,
            waited: Duration::ZERO,
            rng,
        }
    }

    /// Retries handed out so far.
    pub fn tries(&self) -> u32 {
        self.tries
    }

    /// The next delay, or `None` when the policy allows no more retries.
    pub fn next_delay(&mut self) -> Option<Duration> {
        if self.policy.max_tries.is_some_and(|n| self.tries >= n) {
            return None;
        }
        let jitter = self.policy.jitter.clamp(0.0, 1.0);
        let mut delay = self.nominal.mul_f64(1.0 - jitter * self.rng.f64());
        if let Some(max) = self.policy.max_wait {
            let left = max.saturating_sub(self.waited);
            if left.is_zero() {
                return None;
            }
            delay = delay.min(left);
        }
        self.tries += 1;
        self.waited += delay;
        self.nominal = self.nominal.saturating_mul(2).min(self.policy.cap);
        Some(delay)
    }

    /// Sleeps the next delay unless `stop` finishes first. `false` when stopped, or
    /// when the policy allows no more retries.
    pub async fn wait_or(&mut self, stop: impl Future<Output = ()>) -> bool {
        let Some(delay) = self.next_delay() else {
            return false;
        };
        tokio::select! {
            _ = stop => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    /// [`Backoff::wait_or`] with a cancellation token as the stop.
    pub async fn wait(&mut self, stop: &CancellationToken) -> bool {
        self.wait_or(stop.cancelled()).await
    }
}

impl Iterator for Backoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        self.next_delay()
    }
}

/// What one try says about trying again.
#[derive(Debug)]
pub enum Attempt<E> {
    /// Worth another try (a refused connection, a peer busy for now).
    Transient(E),
    /// Trying again cannot help (a refusal that is final).
    Permanent(E),
}

/// Why [`retry`] gave up.
#[derive(Debug, Error, PartialEq)]
pub enum RetryError<E: std::fmt::Display> {
    #[error("stopped while retrying{}", .last.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    Stopped { last: Option<E> },
    #[error("gave up after {tries} tries: {last}")]
    Exhausted { tries: u32, last: E },
    #[error("{0}")]
    Permanent(E),
}

/// Runs `op` until it succeeds, fails permanently, the policy is spent, or `stop`
/// is cancelled (checked before every try and during every wait).
pub async fn retry<T, E, F, Fut>(
    policy: Policy,
    stop: &CancellationToken,
    mut op: F,
) -> Result<T, RetryError<E>>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Attempt<E>>>,
{
    let mut backoff = Backoff::new(policy);
    let mut last = None;
    loop {
        if stop.is_cancelled() {
            return Err(RetryError::Stopped { last });
        }
        let e = match op().await {
            Ok(v) => return Ok(v),
            Err(Attempt::Permanent(e)) => return Err(RetryError::Permanent(e)),
            Err(Attempt::Transient(e)) => e,
        };
        let Some(delay) = backoff.next_delay() else {
            return Err(RetryError::Exhausted {
                tries: backoff.tries() + 1,
                last: e,
            });
        };
        tokio::select! {
            _ = stop.cancelled() => return Err(RetryError::Stopped { last: Some(e) }),
            _ = tokio::time::sleep(delay) => {}
        }
        last = Some(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const SIGNAL_RETRY: Policy =
        Policy::doubling(Duration::from_millis(100), Duration::from_secs(5));

    #[test]
    fn without_jitter_the_delays_double_up_to_the_cap() {
        let p = Policy::doubling(100 * MS, 1000 * MS).with_jitter(0.0);
        let got: Vec<_> = Backoff::new(p).take(7).collect();
        let want: Vec<_> = [100, 200, 400, 800, 1000, 1000, 1000]
            .map(|n| n * MS)
            .to_vec();
        assert_eq!(got, want);
    }

    #[test]
    fn jittered_delays_stay_within_their_step_and_under_the_cap() {
        let p = Policy::doubling(100 * MS, 5000 * MS);
        for seed in 0..200 {
            let mut nominal = 100 * MS;
            for d in Backoff::with_seed(p, seed).take(20) {
                assert!(d <= nominal, "seed {seed}: {d:?} over {nominal:?}");
                assert!(
                    d >= nominal / 2,
                    "seed {seed}: {d:?} under half of {nominal:?}"
                );
                nominal = (nominal * 2).min(5000 * MS);
            }
        }
    }

    #[test]
    fn jitter_spreads_the_delays_of_many_loops() {
        // 100 agents retrying after the same failure: their 4th delays differ.
        let p = Policy::doubling(100 * MS, 5000 * MS);
        let fourth: std::collections::BTreeSet<_> = (0..100)
            .map(|seed| Backoff::with_seed(p, seed).nth(3))
            .collect();
        assert!(fourth.len() > 90, "{} distinct of 100", fourth.len());
        let (lo, hi) = (
            fourth.first().unwrap().unwrap(),
            fourth.last().unwrap().unwrap(),
        );
        assert!(hi - lo > 200 * MS, "spread {lo:?}..{hi:?}");
    }

    #[test]
    fn the_same_seed_gives_the_same_delays() {
        let a: Vec<_> = Backoff::with_seed(SIGNAL_RETRY, 7).take(10).collect();
        let b: Vec<_> = Backoff::with_seed(SIGNAL_RETRY, 7).take(10).collect();
        let c: Vec<_> = Backoff::with_seed(SIGNAL_RETRY, 8).take(10).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn tries_and_total_wait_are_bounded() {
        let p = Policy::doubling(100 * MS, 1000 * MS).with_jitter(0.0);
        assert_eq!(Backoff::new(p.with_max_tries(3)).count(), 3);
        let waits: Vec<_> = Backoff::new(p.with_max_wait(1000 * MS)).collect();
        // 100 + 200 + 400, then the 800 is cut to the 300 left.
        assert_eq!(waits, [100, 200, 400, 300].map(|n| n * MS).to_vec());
        let total: Duration = Backoff::with_seed(SIGNAL_RETRY.with_max_wait(60_000 * MS), 3).sum();
        assert_eq!(total, 60_000 * MS);
    }

    #[test]
    fn a_first_delay_over_the_cap_is_capped() {
        let p = Policy::doubling(10_000 * MS, 1000 * MS).with_jitter(0.0);
        assert_eq!(Backoff::new(p).next(), Some(1000 * MS));
    }

    #[tokio::test]
    async fn retry_classifies_errors_and_stops() {
        let p = Policy::doubling(MS, 4 * MS);
        let stop = CancellationToken::new();

        let mut n = 0;
        let r: Result<u32, RetryError<String>> = retry(p, &stop, || {
            n += 1;
            let n = n;
            async move {
                if n < 4 {
                    Err(Attempt::Transient(format!("refused {n}")))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(r, Ok(4));

        let r: Result<(), _> = retry(p, &stop, || async {
            Err(Attempt::Permanent("unknown procedure".to_string()))
        })
        .await;
        assert_eq!(r, Err(RetryError::Permanent("unknown procedure".into())));

        let r: Result<(), _> = retry(p.with_max_tries(2), &stop, || async {
            Err(Attempt::Transient("busy".to_string()))
        })
        .await;
        assert_eq!(r.unwrap_err().to_string(), "gave up after 3 tries: busy");

        // Cancelled during an hour's wait: returns with the last error (a test that
        // hangs here fails by the harness's timeout).
        let canceller = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(50 * MS).await;
            canceller.cancel();
        });
        let r: Result<(), _> = retry(
            Policy::doubling(3_600_000 * MS, 3_600_000 * MS),
            &stop,
            || async { Err(Attempt::Transient("down".to_string())) },
        )
        .await;
        assert_eq!(
            r,
            Err(RetryError::Stopped {
                last: Some("down".into())
            })
        );
    }

    #[tokio::test]
    async fn wait_ends_when_stopped_or_spent() {
        let stop = CancellationToken::new();
        let mut b = Backoff::new(Policy::doubling(MS, MS).with_max_tries(1));
        assert!(b.wait(&stop).await);
        assert!(!b.wait(&stop).await, "no tries left");
        stop.cancel();
        let mut b = Backoff::new(SIGNAL_RETRY);
        assert!(!b.wait(&stop).await, "stopped");
    }
}
