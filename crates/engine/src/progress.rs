//! Progress display: one line per stage with rows, rate and ETA when stderr is a terminal;
//! nothing at all otherwise (logs and CI output stay clean).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone)]
pub struct Progress {
    multi: MultiProgress,
    visible: bool,
}

impl Progress {
    /// Visible when stderr is a terminal and `quiet` is false.
    pub fn new(quiet: bool) -> Progress {
        let visible = !quiet && std::io::stderr().is_terminal();
        let target = if visible { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        Progress { multi: MultiProgress::with_draw_target(target), visible }
    }

    pub fn hidden() -> Progress {
        Progress::new(true)
    }

    /// A line for one stage; `set_length` turns it from a spinner into a bar with an ETA.
    pub fn stage(&self, name: &str) -> ProgressBar {
        if !self.visible {
            return ProgressBar::hidden();
        }
        let pb = self.multi.add(ProgressBar::no_length());
        pb.set_style(style());
        pb.set_prefix(format!("{name:>12}"));
        pb.enable_steady_tick(Duration::from_millis(200));
        pb
    }
}

fn style() -> ProgressStyle {
    // The template is a constant checked by the tests; it cannot fail at run time.
    ProgressStyle::with_template("{prefix} {spinner} {pos:>7}/{len:7} rows  {per_sec:>10}  eta {eta:>4}  {msg}")
        .expect("valid progress template")
}

#[cfg(test)]
mod tests {
    #[test]
    fn template_is_valid() {
        let _ = super::style();
    }
}
