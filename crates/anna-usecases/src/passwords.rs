//! Password hashing off the async runtime, on a fixed set of threads.
//!
//! Argon2id takes tens of milliseconds and `m` KiB of memory per hash. Hashes run on
//! `concurrency` dedicated threads (`AUTH_HASH_CONCURRENCY`), each keeping its Argon2 memory
//! from one hash to the next, so a login flood costs at most `concurrency` × `m` KiB however
//! long it lasts, and never starves the runtime. Requests beyond that wait in line.

use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};

use anna_domain::password::{Argon2Cost, ArgonMemory, PasswordHasher};
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error(transparent)]
    Hash(#[from] anna_domain::password::PasswordError),
    #[error("the password hashing threads are gone")]
    PoolGone,
    #[error("cannot start a password hashing thread: {0}")]
    Spawn(#[from] std::io::Error),
}

type Job = Box<dyn FnOnce(&PasswordHasher, &mut ArgonMemory) + Send>;

#[derive(Clone)]
pub struct Passwords {
    hasher: PasswordHasher,
    jobs: mpsc::Sender<Job>,
}

impl Passwords {
    /// Starts `concurrency` hashing threads. They end when the last clone of this is dropped.
    pub fn new(cost: Argon2Cost, concurrency: usize) -> Result<Self, PasswordError> {
        let hasher = PasswordHasher::new(cost)?;
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for n in 0..concurrency.max(1) {
            let queue = queue.clone();
            let hasher = hasher.clone();
            std::thread::Builder::new().name(format!("anna-hash-{n}")).spawn(move || {
                let mut memory = ArgonMemory::default();
                loop {
                    // The lock is held only while waiting for the next job, never while hashing.
                    let job = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
                    match job {
                        // A panicking hash must not take the thread (and a hashing slot) with it.
                        Ok(job) => {
                            let ran =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&hasher, &mut memory)));
                            if ran.is_err() {
                                tracing::error!("a password hash panicked");
                                memory = ArgonMemory::default();
                            }
                        }
                        Err(mpsc::RecvError) => return,
                    }
                }
            })?;
        }
        Ok(Self { hasher, jobs })
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&PasswordHasher, &mut ArgonMemory) -> T + Send + 'static,
    ) -> Result<T, PasswordError> {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move |hasher, memory| {
            // The request gave up while waiting in line (client gone): no hash for nobody.
            if done.is_closed() {
                return;
            }
            let _ = done.send(work(hasher, memory));
        });
        self.jobs.send(job).map_err(|_| PasswordError::PoolGone)?;
        result.await.map_err(|_| PasswordError::PoolGone)
    }

    /// Hashes a new password with the configured cost.
    pub async fn hash(&self, password: String) -> Result<String, PasswordError> {
        Ok(self.run(move |hasher, memory| hasher.hash_in(&password, memory)).await??)
    }

    /// Checks a password against a stored hash; with `None`, burns the same time on a dummy
    /// hash and answers false, so an unknown account takes as long as a wrong password.
    pub async fn verify(&self, password: String, stored: Option<String>) -> Result<bool, PasswordError> {
        self.run(move |hasher, memory| match stored {
            Some(stored) => hasher.verify_in(&password, &stored, memory),
            None => {
                hasher.verify_dummy_in(&password, memory);
                false
            }
        })
        .await
    }

    /// Whether a stored hash was made with another cost than the configured one.
    pub fn needs_rehash(&self, stored: &str) -> bool {
        self.hasher.needs_rehash(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap(concurrency: usize) -> Passwords {
        Passwords::new(Argon2Cost { memory_kib: 1024, iterations: 1, parallelism: 1 }, concurrency)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test]
    async fn hashes_and_verifies_on_its_threads() {
        let passwords = cheap(2);
        let hashes = futures_join(&passwords).await;
        for (i, hash) in hashes.iter().enumerate() {
            assert!(passwords.verify(format!("password {i}"), Some(hash.clone())).await.unwrap_or(false));
            assert!(!passwords.verify("wrong".into(), Some(hash.clone())).await.unwrap_or(true));
        }
        assert!(!passwords.verify("anything".into(), None).await.unwrap_or(true));
    }

    /// Many hashes at once on two threads: all answered.
    async fn futures_join(passwords: &Passwords) -> Vec<String> {
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let passwords = passwords.clone();
                tokio::spawn(async move { passwords.hash(format!("password {i}")).await })
            })
            .collect();
        let mut hashes = Vec::new();
        for task in tasks {
            hashes.push(task.await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|e| panic!("{e}")));
        }
        hashes
    }
}
