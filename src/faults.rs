//! Fault injection at the steps of a durable write, for the tests that prove a write failing at
//! any step leaves a state that reopens cleanly with nothing acknowledged lost.
//!
//! The store's and the audit log's writes call [`check`] before each step; in a test build it
//! fails the step the calling thread planned with [`fail_at`], once. In every other build it is
//! an empty inline function.

/// A step of a durable write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Creating the temporary file.
    Open,
    /// Writing the bytes.
    Write,
    /// `fsync`/`fdatasync` of the file.
    Fsync,
    /// Renaming the temporary file over the target.
    Rename,
    /// `fsync` of the directory (after a rename or an unlink).
    DirFsync,
}

impl Step {
    #[cfg(test)]
    pub(crate) const ALL: [Step; 5] = [
        Step::Open,
        Step::Write,
        Step::Fsync,
        Step::Rename,
        Step::DirFsync,
    ];
}

#[cfg(test)]
thread_local! {
    /// The step to fail, after letting this many of its kind pass.
    static PLAN: std::cell::Cell<Option<(Step, u32)>> = const { std::cell::Cell::new(None) };
}

/// Fails the `(skip + 1)`-th `step` this thread reaches from now on, once.
#[cfg(test)]
pub(crate) fn fail_at(step: Step, skip: u32) {
    PLAN.with(|p| p.set(Some((step, skip))));
}

/// Whether the planned fault has happened (and so is no longer planned); clears the plan.
#[cfg(test)]
pub(crate) fn take_fired() -> bool {
    PLAN.with(|p| p.replace(None).is_none())
}

/// `Err` if this step was planned to fail.
#[inline(always)]
pub(crate) fn check(step: Step) -> std::io::Result<()> {
    #[cfg(test)]
    {
        let fire = PLAN.with(|p| match p.get() {
            Some((planned, 0)) if planned == step => {
                p.set(None);
                true
            }
            Some((planned, n)) if planned == step => {
                p.set(Some((planned, n - 1)));
                false
            }
            _ => false,
        });
        if fire {
            return Err(std::io::Error::other(format!("injected fault at {step:?}")));
        }
    }
    let _ = step;
    Ok(())
}
