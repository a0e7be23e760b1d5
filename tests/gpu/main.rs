//! Every GPU test in one binary: each test binary links wgpu and naga, so one binary instead of
//! one per file saves CI a link (and a copy of wgpu's generic code) per file. The modules share
//! `tests/common`'s contexts (one device per kind for the whole binary); a test that destroys a
//! device makes its own. Each module's header says what it checks and why its tolerance holds.

#[path = "../common/mod.rs"]
mod common;

mod backward;
mod backward_split;
mod backward_split_coarse_q;
mod backward_split_coarse_rows;
mod backward_split_head;
mod coarse;
mod coarse_backward;
mod concurrency;
mod coop;
mod decode;
mod decode_fast;
mod decode_variants;
mod dense_backward_split;
mod dense_keys;
mod depth_counts;
mod errors;
mod f16;
mod f16_decode;
mod f16_pieces;
mod fine_tiled;
mod forward;
mod geometry;
mod grid;
mod grid_backward;
mod grid_backward_split;
mod grid_split;
mod large_block;
mod loop_limit;
mod nonfinite;
mod pool_chunks;
mod profile;
mod properties;
mod shapes;
mod split;
mod variants;
mod variants_runs;
mod varlen;
mod varlen_backward;
mod varlen_backward_groups;
