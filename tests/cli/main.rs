//! Integration tests of the `multipole-attn` binary, in one test binary (each links the
//! library, wgpu and naga). Most run with `--reference` (the f64 CPU path) and so pass without a
//! GPU; the GPU ones skip where `info` finds no adapter, and never under CI.

#[path = "../common/mod.rs"]
mod common;
mod scratch;

mod decode;
mod grad;
mod grid;
mod inputs;
mod no_levels;
mod quiet;
mod run;
mod storage;
