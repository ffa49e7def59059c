//! A thread's CPU time from `/proc/self/task/TID/schedstat`: time on a CPU,
//! time runnable but waiting, timeslices (the kernel's schedstats).

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadTimes {
    pub run_ns: u64,
    pub wait_ns: u64,
}

/// `None` when the thread is gone or the kernel has no schedstat.
pub fn of_thread(tid: i32) -> Option<ThreadTimes> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    parse(&text)
}

fn parse(text: &str) -> Option<ThreadTimes> {
    let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
    Some(ThreadTimes {
        run_ns: fields.next()??,
        wait_ns: fields.next()??,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernels_format_and_reads_this_thread() {
        assert_eq!(
            parse("123 456 7\n"),
            Some(ThreadTimes {
                run_ns: 123,
                wait_ns: 456
            })
        );
        assert_eq!(parse("x 1 2"), None);
        assert_eq!(parse(""), None);
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(5) {}
        let t = of_thread(tid).expect("schedstat of this thread");
        assert!(t.run_ns > 0, "{t:?}");
        assert_eq!(of_thread(i32::MAX), None);
    }
}
