//! The data plane's tokio runtime, on a thread of its own.
//!
//! One thread by default: a current-thread runtime, no work stealing, no
//! cross-thread wake-ups (a sidecar shares its cores with the app). The
//! runtime is built by the sidecar when it starts (never at import, since
//! threads do not survive a fork) and is shut down from the thread that owns
//! it, never from inside a task.

use std::future::Future;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

pub struct Driver {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Driver {
    /// A runtime with `threads` worker threads (1: a current-thread runtime).
    pub fn start(threads: usize) -> std::io::Result<Driver> {
        let runtime = if threads <= 1 {
            Builder::new_current_thread().enable_all().build()?
        } else {
            Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("ringmesh-dataplane")
                .enable_all()
                .build()?
        };
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("ringmesh-dataplane".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })?;
        Ok(Driver {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Run `future` on the runtime and wait for it here (a thread that is not
    /// the runtime's), at most `limit`; true if it finished.
    pub fn run_blocking<F>(&self, future: F, limit: Duration) -> bool
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (done, finished) = std::sync::mpsc::channel();
        self.handle.spawn(async move {
            future.await;
            let _ = done.send(());
        });
        finished.recv_timeout(limit).is_ok()
    }

    /// Stop the runtime (its tasks are dropped) and join its thread.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_runs_on_the_runtime_and_stops_with_it() {
        for threads in [1, 2] {
            let mut driver = Driver::start(threads).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            assert!(driver.run_blocking(
                async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    tx.send(7).unwrap();
                },
                Duration::from_secs(5)
            ));
            assert_eq!(rx.recv().unwrap(), 7);
            assert!(!driver.run_blocking(
                async { tokio::time::sleep(Duration::from_secs(60)).await },
                Duration::from_millis(20)
            ));
            driver.stop();
        }
    }
}
