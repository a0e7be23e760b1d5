//! Writing results to stdout without `println!`'s panic on a closed pipe.
//!
//! `multipole-attn plan ... | head` closes the pipe after ten lines; `println!` then panics
//! ("failed printing to stdout: Broken pipe"). A reader that stopped reading wants no more
//! output, so, as Unix tools do, the process ends quietly with status 0; any other write
//! error ends it with status 1 and one `error:` line.

use std::io::Write;

/// Writes `args` to stdout (with a newline when `newline`), then flushes.
pub fn write(args: std::fmt::Arguments, newline: bool) {
    let mut out = std::io::stdout().lock();
    let written = out
        .write_fmt(args)
        .and_then(|()| {
            if newline {
                out.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|()| out.flush());
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// `println!` for results: see the module's docs.
macro_rules! outln {
    ($($arg:tt)*) => { $crate::stdout::write(format_args!($($arg)*), true) };
}

/// `print!` for results: see the module's docs.
macro_rules! out {
    ($($arg:tt)*) => { $crate::stdout::write(format_args!($($arg)*), false) };
}
