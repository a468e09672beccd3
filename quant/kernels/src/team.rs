//! A team of threads that share the parts of one computation with spin-waiting, for work too
//! fine for a task pool: one image's convolutions at batch size 1, where each convolution is a
//! few dozen microseconds and waking a sleeping pool thread per convolution costs as much.
//!
//! [`with_team`] runs its closure on the calling thread while the helpers (rayon tasks) spin;
//! the closure hands out work with [`Team::split`], whose parts any member may claim and which
//! returns once all are done. A helper that starts late, or never, costs nothing but parallelism:
//! the caller claims every part nobody else took, so the team cannot deadlock on a busy pool.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

type Part<'a> = &'a (dyn Fn(usize) + Sync + 'a);

/// The shared state of a team. See the module documentation.
pub struct Team {
    threads: usize,
    grain: usize,
    /// The current job's epoch (high 32 bits) and next unclaimed part (low 32 bits): one word,
    /// so a claim can never take a part of a job other than the one whose epoch it read.
    state: AtomicU64,
    /// Parts of the current job.
    parts: AtomicUsize,
    /// Parts of the current job finished.
    done: AtomicUsize,
    /// The current job: a pointer to a `Part` on the stack of [`Team::split`]'s caller.
    job: AtomicPtr<()>,
    finished: AtomicBool,
    panicked: AtomicBool,
}

/// Run `main` with a team of `threads` threads (the caller and `threads - 1` helpers from
/// rayon's pool); with one thread, `main` runs alone and [`Team::split`] is a plain loop.
/// `grain` is the least work worth splitting, in the caller's unit ([`Team::parts_for`]).
pub fn with_team<R: Send>(threads: usize, grain: usize, main: impl FnOnce(&Team) -> R + Send) -> R {
    let team = Team {
        threads: threads.max(1),
        grain,
        state: AtomicU64::new(0),
        parts: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        job: AtomicPtr::new(std::ptr::null_mut()),
        finished: AtomicBool::new(false),
        panicked: AtomicBool::new(false),
    };
    if team.threads == 1 {
        return main(&team);
    }
    /// Releases the helpers however `main` ends.
    struct Finish<'a>(&'a Team);
    impl Drop for Finish<'_> {
        fn drop(&mut self) {
            self.0.finished.store(true, Ordering::Release);
        }
    }
    let t = &team;
    let (r, ()) = rayon::join(
        move || {
            let _f = Finish(t);
            main(t)
        },
        move || {
            rayon::scope(|s| {
                for _ in 2..t.threads {
                    s.spawn(move |_| t.help());
                }
                t.help();
            })
        },
    );
    r
}

impl Team {
    /// Threads in the team, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// How many parts to split `work` (in the grain's unit) into, at most `max`: one below the
    /// grain, else one per thread.
    pub fn parts_for(&self, work: usize, max: usize) -> usize {
        if work < self.grain {
            1
        } else {
            self.threads.min(max).max(1)
        }
    }

    /// Run `f(0)`, ..., `f(parts - 1)`, each once, spread over the team; returns when all have
    /// run. A panic in any part is raised here once every part has ended.
    pub fn split(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.threads == 1 || parts <= 1 {
            (0..parts).for_each(f);
            return;
        }
        assert!(parts < 1 << 32, "team: too many parts");
        let part: Part<'_> = f;
        self.done.store(0, Ordering::Relaxed);
        self.parts.store(parts, Ordering::Relaxed);
        self.job
            .store(&part as *const Part<'_> as *mut (), Ordering::Relaxed);
        let epoch = (self.state.load(Ordering::Relaxed) >> 32) + 1;
        // Publishes the job, part count and reset counter above to helpers that read this epoch.
        self.state.store(epoch << 32, Ordering::Release);
        // Every claimed part counts itself done, panicking or not, so the wait below ends.
        let mut mine = None;
        while let Some(i) = self.claim(epoch) {
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(i))) {
                mine.get_or_insert(p);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
        // Helpers may still be running parts that borrow `f`: wait for them before returning
        // (or unwinding), which ends the borrow.
        while self.done.load(Ordering::Acquire) < parts {
            std::hint::spin_loop();
        }
        if let Some(p) = mine {
            resume_unwind(p);
        }
        if self.panicked.swap(false, Ordering::AcqRel) {
            panic!("team: a part of the job panicked on a helper thread");
        }
    }

    /// Run `f` once on each of `items` (disjoint bands of an output, say), spread over the team
    /// as [`Team::split`]'s parts.
    pub fn for_each<T: Send>(&self, items: Vec<T>, f: &(dyn Fn(T) + Sync)) {
        let slots: Vec<Mutex<Option<T>>> = items.into_iter().map(|t| Mutex::new(Some(t))).collect();
        self.split(slots.len(), &|i| {
            let item = slots[i].lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(t) = item {
                f(t);
            }
        });
    }

    /// Claim the next part of the job of `epoch`, if any is left.
    fn claim(&self, epoch: u64) -> Option<usize> {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            if s >> 32 != epoch {
                return None;
            }
            let i = (s & u64::from(u32::MAX)) as usize;
            if i >= self.parts.load(Ordering::Relaxed) {
                return None;
            }
            match self
                .state
                .compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(i),
                Err(now) => s = now,
            }
        }
    }

    /// A helper's loop: claim and run parts of whatever job is current until `main` finishes.
    fn help(&self) {
        while !self.finished.load(Ordering::Acquire) {
            let epoch = self.state.load(Ordering::Acquire) >> 32;
            if epoch == 0 {
                std::hint::spin_loop();
                continue;
            }
            match self.claim(epoch) {
                Some(i) => {
                    let p = self.job.load(Ordering::Acquire) as *const Part<'_>;
                    // SAFETY: the claim succeeded for `epoch`, so the job of `epoch` cannot
                    // complete (and `split` cannot return and end the borrow of `p`'s target)
                    // before this part counts itself done below; `split` stored `p` before
                    // publishing `epoch` with Release, and the claim read it with Acquire.
                    let f: Part<'_> = unsafe { *p };
                    if catch_unwind(AssertUnwindSafe(|| f(i))).is_err() {
                        self.panicked.store(true, Ordering::Release);
                    }
                    self.done.fetch_add(1, Ordering::Release);
                }
                None => std::hint::spin_loop(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_over_many_jobs() {
        for threads in [1, 2, 3] {
            let counts: Vec<AtomicUsize> = (0..200).map(|_| AtomicUsize::new(0)).collect();
            let total = with_team(threads, 0, |team| {
                assert_eq!(team.threads(), threads);
                let mut total = 0;
                for job in 0..500 {
                    let parts = job % 7;
                    team.split(parts, &|i| {
                        counts[(job * 7 + i) % 200].fetch_add(1, Ordering::Relaxed);
                    });
                    total += parts;
                }
                total
            });
            let seen: usize = counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
            assert_eq!(seen, total, "{threads} threads");
        }
    }

    #[test]
    fn parts_write_disjoint_borrowed_slices() {
        let mut y = vec![0u32; 1000];
        with_team(2, 0, |team| {
            for round in 1..=50u32 {
                let bands: Vec<Mutex<&mut [u32]>> = y.chunks_mut(100).map(Mutex::new).collect();
                team.split(bands.len(), &|i| {
                    for v in bands[i].lock().unwrap().iter_mut() {
                        *v += round;
                    }
                });
            }
        });
        assert!(y.iter().all(|&v| v == 50 * 51 / 2));
    }

    #[test]
    fn for_each_hands_every_item_to_one_part() {
        let mut y = vec![0u32; 1000];
        with_team(2, 0, |team| {
            for round in 1..=50u32 {
                team.for_each(y.chunks_mut(100).collect(), &|band: &mut [u32]| {
                    for v in band.iter_mut() {
                        *v += round;
                    }
                });
            }
        });
        assert!(y.iter().all(|&v| v == 50 * 51 / 2));
    }

    #[test]
    fn a_panicking_part_panics_the_caller_after_the_others() {
        let ran = AtomicUsize::new(0);
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            with_team(2, 0, |team| {
                team.split(8, &|i| {
                    ran.fetch_add(1, Ordering::Relaxed);
                    assert!(i != 3, "part 3");
                })
            })
        }));
        assert!(r.is_err());
        assert_eq!(ran.load(Ordering::Relaxed), 8);
    }
}
