//! Progress bars on stderr for the two long waits of a run: the connect ramp and each load
//! step. They are drawn only when stderr is a terminal; otherwise every bar is hidden, so CI
//! logs and the scripts that read the output see the same plain lines as before.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressFinish, ProgressStyle};

/// Redraws per second at most: the generator shares the CPU with the server it measures, so a
/// bar must cost next to nothing.
const REFRESH_HZ: u8 = 8;

fn bar(tty: bool, len: u64, template: &str) -> ProgressBar {
    if !tty {
        return ProgressBar::hidden();
    }
    // The templates are constants; a bad one falls back to the plain bar rather than failing
    // the run.
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    // Cleared when dropped too: a run that fails mid-step leaves no half-drawn bar above
    // its error message.
    ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr_with_hz(REFRESH_HZ))
        .with_style(style)
        .with_finish(ProgressFinish::AndClear)
}

/// The connect ramp up to `upto` clients: position = clients ready.
pub(crate) fn connect(tty: bool, upto: u32) -> ProgressBar {
    bar(
        tty,
        u64::from(upto),
        "[connect] [{bar:32}] {pos:>6}/{len} ready  {msg}  {elapsed}",
    )
}

/// Step `n` sending `rate` msg/s for `secs`: position = milliseconds of sending done.
pub(crate) fn step(tty: bool, n: usize, rate: f64, secs: f64) -> ProgressBar {
    let b = bar(
        tty,
        (secs * 1000.0) as u64,
        "[step {prefix}] [{bar:32}] {percent:>3}%  {msg}  {elapsed}",
    );
    b.set_prefix(n.to_string());
    b.set_message(format!("sending {rate:.1} msg/s for {secs} s"));
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_unless_a_terminal() {
        assert!(connect(false, 100).is_hidden());
        assert!(step(false, 1, 50.0, 3.0).is_hidden());
        // A hidden bar still takes updates (the controller does not check).
        let b = step(false, 2, 50.0, 3.0);
        b.set_position(1_500);
        assert_eq!(b.position(), 1_500);
        b.finish_and_clear();
    }
}
