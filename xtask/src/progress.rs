//! Progress on stderr for long offline steps: an indicatif bar on a terminal, and a plain line every tenth of
//! the work (or every 10 s) otherwise, so logs of CI runs and scripts still show where the time goes.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// One step's progress.
pub(crate) struct Progress {
    what: String,
    unit: String,
    bar: Option<ProgressBar>,
    start: Instant,
    last_line: Instant,
    last_tenth: u64,
}

impl Progress {
    /// Progress of a step named `what`, counted in `unit`s.
    pub(crate) fn new(what: &str, unit: &str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let pb = ProgressBar::new(0);
            let template = format!(
                "{{prefix:>10}} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{elapsed}}, eta {{eta}}) {{msg}}"
            );
            pb.set_style(
                ProgressStyle::with_template(&template).expect("valid template").progress_chars("=> "),
            );
            pb.set_prefix(what.to_string());
            pb.enable_steady_tick(Duration::from_millis(200));
            pb
        });
        let now = Instant::now();
        Progress { what: what.into(), unit: unit.into(), bar, start: now, last_line: now, last_tenth: 0 }
    }

    /// `done` of `total` units, with an optional note.
    pub(crate) fn update(&mut self, done: u64, total: u64, msg: &str) {
        if let Some(pb) = &self.bar {
            pb.set_length(total);
            pb.set_position(done);
            pb.set_message(msg.to_string());
            return;
        }
        let tenth = (done * 10).checked_div(total).unwrap_or(10);
        if tenth > self.last_tenth || self.last_line.elapsed() > Duration::from_secs(10) {
            self.last_tenth = tenth;
            self.last_line = Instant::now();
            let t = self.start.elapsed().as_secs_f64();
            eprintln!("{}: {done}/{total} {} ({t:.1} s) {msg}", self.what, self.unit);
        }
    }

    /// Ends the step, leaving `line` (with the elapsed time) on stderr.
    pub(crate) fn finish(self, line: &str) {
        if let Some(pb) = &self.bar {
            pb.finish_and_clear();
        }
        eprintln!("{}: {line} in {:.1} s", self.what, self.start.elapsed().as_secs_f64());
    }
}
